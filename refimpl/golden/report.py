"""Text output: the verify/check table and the listing of a file (returned as strings; the CLI
prints them). Every table goes through :func:`refimpl.table.render_table`."""
import numpy as np

from ..table import render_table
from .registry import golden_path, judging_suite
from .schema import FAILURES, read_file


def _fmt(v, spec):
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _count(values):
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def coverage_line(suite, precision, t):
    """One line: how many tensors of the valid cases were a test at ``precision`` (compared
    against a bound below their magnitude), how many UNTESTABLE, how many not compared (a
    possible spike flip); a warning when fewer than half were a test."""
    n = t["tested"] + t["untestable"] + t["not_compared"]
    share = t["tested"] / n if n else 0.0
    line = (f"  tensors at {precision}: {t['tested']} of {n} tested ({100 * share:.1f} %), "
            f"{t['untestable']} UNTESTABLE, {t['not_compared']} not compared (spikes may flip)")
    if n and share < 0.5:
        line += (f"\n  WARNING: most tensors of {suite} are not a test at {precision}: this "
                 f"verdict says little")
    return line


def format_report(report, verbose=False):
    """The verify/check table: one row per passing case, one per failing tensor (and for
    ``check`` one STALE and one DRIFT row per case that has them).

    Columns: suite, case, status, tensor, worst index, value, reference, bound. With
    ``verbose`` a detail column is added. Ends with one summary line per file (every status
    counted), then the details of the failing rows.
    """
    header = ("suite", "case", "status", "tensor", "worst index", "value", "reference", "bound")
    lines = []
    for f in report["files"]:
        rows = []
        for r in f["rows"]:
            row = (r["suite"], r["case"], r["status"], r["tensor"], r["index"],
                   _fmt(r["value"], ".17g"), _fmt(r["reference"], ".17g"), _fmt(r["bound"], ".3g"))
            rows.append(row + ((r["detail"],) if verbose else ()))
        table = render_table(header + (("detail",) if verbose else ()), rows).split("\n")
        # a second, indented line under each failing row: the case's flags and comment
        out = table[:2]
        for r, line in zip(f["rows"], table[2:]):
            out.append(line)
            if r["status"] in FAILURES and (r.get("flags") or r.get("comment")):
                out.append(f"    flags: {','.join(r.get('flags') or []) or '-'}; "
                           f"comment: {r.get('comment') or '-'}")
        lines.append("\n".join(out))
        s = f["summary"]
        st = ", ".join(f"{v} {k}" for k, v in sorted(s["statuses"].items()))
        verdict = "PASSED" if f["passed"] else "FAILED"
        sel = (f", {s['selected']} of {s['total']} selected" if "selected" in s else "")
        prec = f" at {f['precision']}" if f.get("precision", "float64") != "float64" else ""
        lines.append(f"{verdict}: {f['suite']}{prec}: {s['cases']} cases{sel}, "
                     f"{s['cases_failed']} failed (rows: {st}); {f['candidate']} vs {f['golden']}")
        if "tensors" in s and "precision" in f:
            lines.append(coverage_line(f["suite"], f.get("precision", "float64"), s["tensors"]))
        if "resolution" in s:
            lines.append(f"  resolution at {f.get('precision', 'float64')}: worst half-width "
                         f"/ max|ref| of a passing tensor {s['resolution']:.3g} "
                         f"({s['resolution_at']}); {s['coarse']} case(s) whose bound exceeds "
                         f"1e-3 of some tensor's magnitude")
        for r in f["rows"]:
            if r["status"] in FAILURES and r["detail"] and not verbose:
                lines.append(f"  {r['case']} {r['status']} {r['tensor']}: {r['detail']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_coverage(tables):
    """A Markdown table of :func:`.verify.coverage` results, ``{precision: {suite: counts}}``:
    per suite and profile the tested share, then the totals."""
    rows, totals = [], {}
    for prec, per in tables.items():
        tot = totals.setdefault(prec, {"cases": 0, "tested": 0, "untestable": 0,
                                       "not_compared": 0})
        for suite, c in per.items():
            for k in tot:
                tot[k] += c[k]
            rows.append((suite, prec, c))
    rows += [("all", prec, tot) for prec, tot in totals.items()]
    out = ["| suite | profile | valid cases | tensors | tested | UNTESTABLE | not compared |",
           "|---|---|---|---|---|---|---|"]
    for suite, prec, c in rows:
        n = c["tested"] + c["untestable"] + c["not_compared"]
        share = f"{100 * c['tested'] / n:.1f} %" if n else "-"
        name = f"**{suite}**" if suite == "all" else f"`{suite}`"
        out.append(f"| {name} | {prec} | {c['cases']} | {n} | {c['tested']} ({share}) | "
                   f"{c['untestable']} | {c['not_compared']} |")
    return "\n".join(out) + "\n"


def show(path, case_id=None):
    """A readable listing of a golden or candidate file (one case in detail with ``case_id``).

    ``path`` may also be a suite name: the installed committed file (:func:`.registry.golden_path`).
    """
    gf = read_file(golden_path(path))
    a = gf.attrs
    lines = [f"{gf.path}: suite {gf.suite!r}, schema {a.get('schema')} v{a.get('schema_version')}, "
             f"{len(gf.cases)} cases"]
    prov = [f"{k} {a[k]}" for k in ("generator", "numpy", "numba", "python", "seed", "size",
                                    "created") if k in a]
    if prov:
        lines.append("  " + ", ".join(prov))
    try:
        math = judging_suite(gf.suite).math
    except ValueError:  # a file of no registered suite or op: shown, not judged
        math = ""
    if math:
        lines.append("  math: " + math)
    counts = _count(c.result for c in gf.cases.values())
    lines.append("  results: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    lines.append("")
    if case_id is None:
        rows = [(c.id, c.op, c.result, _fmt(c.extra.get("margin"), ".3g"),
                 ",".join(c.flags) or "-", c.comment) for c in gf.cases.values()]
        lines.append(render_table(("id", "op", "result", "margin", "flags", "comment"), rows))
        return "\n".join(lines) + "\n"
    if case_id not in gf.cases:
        raise KeyError(f"{gf.path}: no case {case_id!r}; cases are {', '.join(gf.cases)}")
    c = gf.cases[case_id]
    lines += [f"case {c.id}: op {c.op}, result {c.result}",
              f"  comment: {c.comment}", f"  flags: {', '.join(c.flags) or '-'}"]
    for k, v in {**c.config, **c.extra}.items():  # array attributes (chunks) as lists
        lines.append(f"  {k} = {v.tolist() if isinstance(v, np.ndarray) else v!r}")
    rows = []
    for p, v in c.data.items():
        m = c.meta.get(p, {})
        other = ", ".join(f"{k}={m[k]!r}" for k in m if k not in ("compare", "rtol", "atol"))
        rows.append((p, str(tuple(np.shape(v))), str(np.asarray(v).dtype), m.get("compare", ""),
                     _fmt(m.get("rtol"), ".3g"), _fmt(m.get("atol"), ".3g"), other))
    lines.append("")
    lines.append(render_table(("dataset", "shape", "dtype", "compare", "rtol", "atol",
                               "other attrs"), rows))
    return "\n".join(lines) + "\n"
