"""The conformance matrix of SNN libraries (issue 24): ``refimpl conform`` on every adapter
object of ``examples/conform/`` (one library configuration at one dtype each), written as
``examples/conform/matrix.json`` and as the ``conform-matrix`` region of ``README.md``.

``make conform-matrix`` builds ``.venv-conform`` (PyTorch 2.13 CPU, snntorch, spikingjelly,
norse, refimpl editable; each library installed on its own, a failure recorded in
``.venv-conform/install-<library>.log``) and runs this file there::

    .venv-conform/bin/python examples/conform/run_matrix.py [--examples N] [--seed S]
        [--only SUBSTRING ...] [--no-write]

Each row: ``conform(ADAPTER, ops=[op], precision=<the object's dtype>, examples=N, seed=S,
out=examples/conform/cases/<library>-<object>)``. The minimal counterexample of a row that
differs is written there as a one-case golden file (``refimpl golden show FILE``;
``refimpl golden verify`` reproduces it). Only valid examples are drawn (``invalid=False``):
the libraries do not validate arguments the way refimpl does, and the matrix is about what
their neurons compute. A library that does not import keeps its rows, with the reason (the
last line of its pip log, else the import error).

Importing this module needs neither torch nor the engine: ``render_table`` and the region
markers are what ``tests/test_conform_matrix.py`` checks the README against.
"""
import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
README = ROOT / "README.md"
MATRIX = HERE / "matrix.json"
CASES = HERE / "cases"
START = "<!-- conform-matrix:start -->"
END = "<!-- conform-matrix:end -->"
COMMAND = "make conform-matrix"

#: (adapter module file, library name as the matrix shows it, pip package or None, the ops)
MODULES = (
    ("snntorch_adapter.py", "snntorch", "snntorch", ("neuron",)),
    ("spikingjelly_adapter.py", "spikingjelly", "spikingjelly", ("neuron",)),
    ("norse_adapter.py", "norse", "norse", ("neuron",)),
    ("torch_s4d_adapter.py", "PyTorch S4D", None, ("s4d_kernel", "fftconv")),
)

#: The neuron configuration fields the matrix shows, in column order.
NEURON_COLUMNS = ("reset", "spike_condition", "surrogate", "grad_mode")

# ---- rendering (no torch, no engine) ------------------------------------------------------

#: A row's two campaigns: whole sequences from the zero state (the ``_nostate`` view of a
#: neuron adapter; the only one of a stateless op), and the adapter with its state (stateful
#: starts, chunked = whole, step by step = whole).
RUNS = ("zero_state", "stateful")


def _cell(v):
    return str(v).replace("|", "\\|").replace("\n", " ")


def counterexample(run):
    """The README text of a campaign's minimal counterexample ('' when it has none)."""
    m = (run or {}).get("minimal")
    if not m:
        return ""
    sizes = " ".join(f"{k}={v}" for k, v in (m.get("sizes") or {}).items())
    notes = list(m.get("flags") or []) + (["from a state"] if m.get("stateful") else [])
    if notes:
        sizes += f" ({', '.join(notes)})"
    first = m.get("first") or {}
    what = first.get("tensor") or ""
    if first.get("index") not in (None, "", []):
        what += str(first["index"])
    if first.get("value") is not None and first.get("reference") is not None:
        v, ref = first["value"], first["reference"]
        what += f" = {_num(v, ref)}, reference {_num(ref, v)}"
    elif first.get("detail"):
        what += f" ({first['detail']})"
    if first.get("status") and first["status"] != "MISMATCH":
        what = f"{first['status']} {what}"
    parts = [p for p in (sizes, m.get("form") if m.get("form") != "whole" else "", what) if p]
    return ", ".join(parts) + f" ([case]({m['path']}))"


def _num(v, other=None):
    """``v`` with the fewest significant digits (6 or more) that tell it from ``other``."""
    if not isinstance(v, float):
        return str(v)
    for p in range(6, 18):
        if not isinstance(other, float) or f"{v:.{p}g}" != f"{other:.{p}g}":
            return f"{v:.{p}g}"
    return repr(v)


def verdict_cell(run):
    if run is None:
        return "-"
    if run["verdict"] == "differs":
        return "differs: " + counterexample(run)
    return run["verdict"]


def render_table(matrix):
    """The README region's table from ``matrix`` (the JSON's dict): one line per row."""
    head = ("| library (version) | adapter | op | reset | spike | surrogate | grad mode | dtype "
            "| whole, zero state | states, chunks, steps |")
    lines = [head, "|" + "---|" * 10]
    for r in matrix["rows"]:
        cfg = r.get("config") or {}
        cols = [f"{r['library']} ({r.get('version') or '-'})", f"`{r['adapter']}`", r["op"]]
        cols += [cfg.get(k, "-") for k in NEURON_COLUMNS]
        cols.append(r["dtype"])
        if r["verdict"].startswith(("not installed", "error")):
            cols += [r["verdict"], "-"]
        else:
            cols += [verdict_cell(r.get(k)) for k in RUNS]
        lines.append("| " + " | ".join(_cell(c) for c in cols) + " |")
    return "\n".join(lines)


def render_region(matrix):
    env = matrix.get("environment") or {}
    versions = ", ".join(f"{k} {v}" for k, v in env.items())
    n = sum(r["verdict"] == "conforms" for r in matrix["rows"])
    return "\n".join([
        START,
        f"Reproduce with `{matrix['command']}` ({matrix['examples']} examples per campaign, "
        f"seed {matrix['seed']}; {versions}). {n} of {len(matrix['rows'])} rows conform. "
        "\"whole, zero state\": whole sequences from the zero state; \"states, chunks, "
        "steps\": from drawn states, in drawn chunks and step by step. A difference shows "
        "its minimal counterexample (sizes, the form when not whole, the first failing "
        "tensor and index, the library's value and the reference): a one-case golden file, "
        "`refimpl golden show FILE`.",
        "",
        render_table(matrix),
        END])


def write_readme(matrix, readme=README):
    """Replace the marked region of ``readme`` (it must hold both markers)."""
    text = Path(readme).read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    Path(readme).write_text(text[:i] + render_region(matrix) + text[j + len(END):])


def readme_rows(readme=README):
    """The table lines of the README region (for the test)."""
    text = Path(readme).read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        return None
    return [ln for ln in text[i:j].splitlines() if ln.startswith("| ")]


# ---- running ------------------------------------------------------------------------------


def install_failure(package):
    """The last line of ``.venv-conform/install-<package>.log`` (pip's error), or None."""
    log = Path(sys.prefix) / f"install-{package}.log"
    if not log.is_file():
        return None
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    if any(ln.startswith("Successfully installed") for ln in lines):
        return None
    return lines[-1] if lines else None


def environment():
    from importlib.metadata import PackageNotFoundError, version
    env = {"python": sys.version.split()[0]}
    for pkg in ("torch", "numpy", "snntorch", "spikingjelly", "norse", "refimpl"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    return env


def _first_row(rows):
    for r in rows or ():
        out = {k: r.get(k) for k in ("status", "tensor", "index", "value", "reference", "bound",
                                      "detail")}
        return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
                for k, v in out.items()}
    return None


def _row(library, version, adapter, op, dtype, config, verdict, **extra):
    return {"library": library, "version": version, "adapter": adapter, "op": op,
            "dtype": dtype, "config": config, "verdict": verdict, **extra}


def _campaign(conform, Limits, target, op, precision, examples, seed, out, takes_invalid):
    """One conform run: ``{verdict, examples, seconds, minimal}`` (minimal: path relative to
    the repository, sizes, form, the first failing row)."""
    stale = out / f"{op}.h5"  # the engine writes <out>/<suite>.h5 (suite = op here)
    if stale.exists():
        stale.unlink()
    kw = {"invalid": False} if takes_invalid else {}
    t0 = time.perf_counter()
    rep = conform(target, ops=[op], precision=precision, examples=examples, seed=seed,
                  limits=Limits(), out=str(out), workers=1, **kw)
    t = rep["ops"][op]
    run = {"verdict": "differs" if t["failures"] else "conforms", "examples": t["examples"],
           "forms": list(t.get("forms") or []),
           "seconds": round(time.perf_counter() - t0, 1)}
    if t.get("discarded"):
        run["discarded"] = len(t["discarded"])
    m = t.get("minimal")
    if m:
        path = Path(m["path"]).resolve()
        run["minimal"] = {
            "path": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "sizes": m.get("sizes"), "form": m.get("form"), "first": _first_row(m.get("rows")),
            "flags": [f for f in (m.get("flags") or []) if f != "stateful"],
            "stateful": "stateful" in (m.get("flags") or []), "comment": m.get("comment")}
    return run


def run_rows(examples, seed, only, log=print, cases=CASES):
    sys.path.insert(0, str(HERE))
    import inspect

    from refimpl.conform.engine import conform
    from refimpl.conform.strategies import Limits
    takes_invalid = "invalid" in inspect.signature(conform).parameters
    rows = []
    for fname, library, package, ops in MODULES:
        try:
            mod = importlib.import_module(fname[:-3])
        except Exception as e:  # the library is missing or broken beside this torch
            reason = (install_failure(package) if package else None) or \
                " ".join(f"{type(e).__name__}: {e}".split())
            log(f"{library}: not installed: {reason}")
            for op in ops:
                rows.append(_row(library, None, "-", op, "-", {}, f"not installed: {reason}"))
            continue
        for name in mod.ADAPTERS:
            obj = getattr(mod, name)
            label = f"{fname[:-3].replace('_adapter', '')}-{name}"
            for op in [op for op in ops if hasattr(obj, op)]:
                if only and not any(s in f"{label}:{op}" for s in only):
                    continue
                fixed = (getattr(obj, "CONFIG", {}) or {}).get(op, {})
                row = _row(library, obj.VERSION, name, op, obj.PRECISION, fixed, "conforms",
                           library_config=obj.LIBRARY_CONFIG)
                view = hasattr(mod, name + "_nostate")
                targets = {"zero_state": (name + "_nostate") if view else name,
                           "stateful": name if view else None}
                try:
                    for key, attr in targets.items():
                        if attr is None:
                            row[key] = None
                            continue
                        row[key] = _campaign(conform, Limits, f"{HERE / fname}:{attr}", op,
                                             obj.PRECISION, examples, seed,
                                             cases / label / key.replace("_", "-"),
                                             takes_invalid)
                except Exception as e:
                    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                    row["verdict"] = f"error: {msg}"
                    log(f"{label} {op}: error: {msg}")
                    rows.append(row)
                    continue
                runs = [row[k] for k in RUNS if row.get(k)]
                row["verdict"] = ("differs" if any(r["verdict"] == "differs" for r in runs)
                                  else "conforms")
                row["examples"] = sum(r["examples"] for r in runs)
                rows.append(row)
                log(f"{label} {op} {obj.PRECISION}: " + "; ".join(
                    f"{k}: {verdict_cell(row[k])}" for k in RUNS if row.get(k)))
    return rows


def _summary(rows):
    """What a matrix says, per row and campaign: the verdict and the minimal counterexample's
    sizes, form and first failing tensor (not timings or paths)."""
    out = {}
    for r in rows:
        for key in RUNS:
            run = r.get(key)
            m = (run or {}).get("minimal") or {}
            first = m.get("first") or {}
            out[(r["library"], r["adapter"], r["op"], key)] = (
                r["verdict"] if run is None else run["verdict"], m.get("sizes"), m.get("form"),
                first.get("status"), first.get("tensor"), first.get("index"))
    return out


def check(examples, seed):
    """``--check``: the matrix computed now against the committed one (exit status)."""
    import tempfile
    committed = json.loads(MATRIX.read_text())
    if (committed["examples"], committed["seed"]) != (examples, seed):
        print(f"--check: matrix.json was made with --examples {committed['examples']} --seed "
              f"{committed['seed']}; run with those", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="conform-matrix-") as tmp:
        rows = run_rows(examples, seed, [], cases=Path(tmp))
    old, new = _summary(committed["rows"]), _summary(rows)
    diffs = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new), key=str)
             if old.get(k) != new.get(k)]
    for k, a, b in diffs:
        print(f"DIFFERS {' '.join(map(str, k))}: committed {a}, now {b}", file=sys.stderr)
    print(f"--check: {len(new)} campaigns, {len(diffs)} differ from matrix.json "
          f"({'run make conform-matrix and commit' if diffs else 'up to date'})")
    return 1 if diffs else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", default=[],
                    help="run only the rows whose '<module>-<object>:<op>' contains this "
                         "(repeatable); the other rows of matrix.json are kept")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--check", action="store_true",
                    help="CI: run every row (case files into a temporary folder), compare each "
                         "campaign's verdict and minimal counterexample with the committed "
                         "matrix.json, write nothing; exit 1 on any difference")
    args = ap.parse_args(argv)
    if args.check:
        return check(args.examples, args.seed)
    os.chdir(ROOT)  # case paths relative to the repository
    t0 = time.perf_counter()
    if not args.only and not args.no_write and CASES.is_dir():
        shutil.rmtree(CASES)  # a full run: no case file of an earlier matrix survives
    rows = run_rows(args.examples, args.seed, args.only)
    if args.only and MATRIX.is_file():  # merge into the committed matrix
        old = json.loads(MATRIX.read_text())["rows"]
        new = {(r["library"], r["adapter"], r["op"]): r for r in rows}
        rows = [new.pop((r["library"], r["adapter"], r["op"]), r) for r in old] + \
            list(new.values())
    matrix = {"command": COMMAND, "examples": args.examples, "seed": args.seed,
              "environment": environment(), "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    differs = sum(r["verdict"] == "differs" for r in rows)
    print(f"{len(rows)} rows: {sum(r['verdict'] == 'conforms' for r in rows)} conform, "
          f"{differs} differ, {len(rows) - differs - sum(r['verdict'] == 'conforms' for r in rows)}"
          f" other, in {matrix['seconds']} s")
    if not args.no_write:
        MATRIX.write_text(json.dumps(matrix, indent=1, sort_keys=False) + "\n")
        write_readme(matrix)
        print(f"wrote {MATRIX.relative_to(ROOT)} and the {START} region of README.md")
    errors = [r for r in rows if r["verdict"].startswith("error")]
    for r in errors:
        print(f"ERROR {r['library']} {r['adapter']} {r['op']}: {r['verdict']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
