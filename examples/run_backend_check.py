"""The PyTorch example run for real: ``make example-check``.

Runs ``examples/torch_backend.py`` (in an environment with torch: ``--torch-python``, the
``.venv-peers`` interpreter under make) at ``--dtype float64, float32, bfloat16, float16`` into a
temporary folder, verifies each set of candidates with ``refimpl golden verify --precision`` at
its own profile (``--json``; pmbc's ``iterations`` skipped: the example runs the recurrence, not
PMBC), prints the verdicts, and writes the table of them into ``examples/README.md`` between the
markers ``<!-- example-check:begin -->`` and ``<!-- example-check:end -->`` (atomically; the
rest of the file is kept). Exits 1 if any verdict failed (the table is written all the same, so
the README shows what ran), 2 on a usage or environment error (a missing interpreter, a crashed
example, an unreadable report, missing markers).

This script needs only the standard library and refimpl (for its atomic writer); torch is used
only by the example, in its own environment. ``python examples/run_backend_check.py --help``.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "torch_backend.py"
README = HERE / "README.md"

DTYPES = ("float64", "float32", "bfloat16", "float16")
#: Passed to every verify call: the example computes pmbc's neuron by the recurrence and writes
#: no PMBC iteration counts (no other suite has a dataset of that name).
SKIP = ("*/outputs/iterations",)
#: Row statuses that never fail, one column each (in this order); any other status a report has
#: goes to the last column with its count.
COLUMNS = ("PASS", "ACCEPTABLE", "UNTESTABLE", "REJECTED", "SKIP")
BEGIN, END = "<!-- example-check:begin -->", "<!-- example-check:end -->"
HEADER = (("suite", "dtype", "verdict", "cases", "failed") + COLUMNS
          + ("other rows", "tensors tested", "not compared"))


class CheckError(Exception):
    """The check could not run (not a failed verdict): exit 2 with this message."""


def log(msg):
    print(f"[example-check] {msg}", flush=True)


def run(cmd, what):
    """Run ``cmd``; returns ``(returncode, stdout + stderr)``; a missing program is an error."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise CheckError(f"{what}: cannot run {cmd[0]}: {e}") from e
    return p.returncode, p.stdout


def versions(torch_python):
    """``torch X, numpy Y, h5py Z, Python W`` of the example's environment."""
    code = ("import platform, torch, numpy, h5py; print(f'torch {torch.__version__}, numpy "
            "{numpy.__version__}, h5py {h5py.version.version}, Python "
            "{platform.python_version()}')")
    rc, out = run([torch_python, "-c", code], "reading the example environment's versions")
    if rc != 0:
        raise CheckError(f"{torch_python} cannot import torch, numpy and h5py (build the "
                         f"environment with `make example-check`):\n{out.strip()}")
    return out.strip().splitlines()[-1]


def run_dtype(dtype, torch_python, refimpl, work, golden=None):
    """Candidates at ``dtype``, verified at that profile: the report's per-file dicts."""
    out = os.path.join(work, dtype)
    t0 = time.perf_counter()
    cmd = [torch_python, str(EXAMPLE), "--suite", "all", "--dtype", dtype, "--out", out]
    if golden:
        cmd += ["--golden", golden]
    rc, text = run(cmd, f"torch_backend.py --dtype {dtype}")
    if rc != 0:
        raise CheckError(f"examples/torch_backend.py --dtype {dtype} failed (exit {rc}):\n"
                         f"{text.rstrip()}")
    files = sorted(str(p) for p in Path(out).glob("*.h5"))
    if not files:
        raise CheckError(f"examples/torch_backend.py --dtype {dtype} wrote no candidate into "
                         f"{out}")
    log(f"{dtype}: candidates for {len(files)} suites written in "
        f"{time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    report = os.path.join(work, f"verify-{dtype}.json")
    cmd = [refimpl, "golden", "verify", *files, "--precision", dtype, "--json", report]
    for pattern in SKIP:
        cmd += ["--skip", pattern]
    if golden:
        cmd += ["--golden", golden]
    rc, text = run(cmd, f"refimpl golden verify --precision {dtype}")
    if rc not in (0, 1) or not os.path.exists(report):
        raise CheckError(f"`{shlex.join(cmd)}` exited {rc} without a report:\n{text.rstrip()}")
    with open(report) as f:
        data = json.load(f)
    rows = data.get("files")
    if not isinstance(rows, list) or len(rows) != len(files):
        raise CheckError(f"{report}: expected {len(files)} file reports under 'files', got "
                         f"{rows!r:.200}")
    if (rc == 0) != bool(data.get("passed")):
        raise CheckError(f"{report}: verify exited {rc} but the report says passed = "
                         f"{data.get('passed')!r}")
    for r in rows:
        log(f"{dtype}: {'PASSED' if r['passed'] else 'FAILED'} {r['suite']}: "
            f"{r['summary']['cases']} cases, {r['summary']['cases_failed']} failed "
            f"({_statuses(r['summary']['statuses'])})")
    bad = [row for r in rows for row in r.get("rows", []) if row.get("status") not in COLUMNS]
    for row in bad[:20]:
        print("    " + "  ".join(str(row.get(k, "")) for k in (
            "suite", "case", "status", "tensor", "index", "value", "reference", "bound",
            "detail")), flush=True)
    if len(bad) > 20:
        print(f"    ... and {len(bad) - 20} more rows (--keep DIR keeps the reports)", flush=True)
    log(f"{dtype}: verified in {time.perf_counter() - t0:.0f} s")
    return rows


def _statuses(counts):
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no rows"


def table_rows(reports):
    """``reports``: dtype -> verify's file dicts. One row per suite x dtype (suites in the order
    the example writes them, then dtypes in DTYPES order), as strings in HEADER's order."""
    suites = []
    for rows in reports.values():
        for r in rows:
            if r["suite"] not in suites:
                suites.append(r["suite"])
    out = []
    for suite in suites:
        for dtype in DTYPES:
            if dtype not in reports:
                continue
            r = next((r for r in reports[dtype] if r["suite"] == suite), None)
            if r is None:
                out.append([suite, dtype, "MISSING"] + ["-"] * (len(HEADER) - 3))
                continue
            s = r["summary"]
            counts = s["statuses"]
            other = ", ".join(f"{k} {n}" for k, n in sorted(counts.items()) if k not in COLUMNS)
            t = s.get("tensors")  # coverage of the valid cases' tensors, when verify reports it
            tested = not_compared = "-"
            if t:
                n = t["tested"] + t["untestable"] + t["not_compared"]
                tested, not_compared = f"{t['tested']} of {n}", str(t["not_compared"])
            out.append([suite, dtype, "PASSED" if r["passed"] else "FAILED", str(s["cases"]),
                        str(s["cases_failed"])] + [str(counts.get(c, 0)) for c in COLUMNS]
                       + [other or "0", tested, not_compared])
    return out


def render(rows, env):
    """The README region (without the markers): a sentence on what ran, then the table."""
    lines = [
        "Written by `make example-check`: every suite at every `--dtype`, verified with",
        "`refimpl golden verify --precision` at the same type and `--skip '*/outputs/iterations'`,",
        "against the installed golden set. `cases` and `failed` count cases; the other columns",
        "count the verifier's rows (a passing case is one `PASS` row, otherwise every dataset",
        "gets its own row, so `UNTESTABLE` can exceed the cases); `other rows` lists any other",
        "status with its count (the failing ones: `MISMATCH`, `MISSING`, `ERROR`, ...).",
        "`tensors tested`: the outputs and gradients of the valid cases that were a test at that",
        "profile (not `UNTESTABLE`, and compared: `not compared` counts those left out after an",
        "acceptable spike flip), as verify's summary counts them.",
        f"Environment of the example: {env}.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(HEADER))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def replace_region(text, body, name="examples/README.md"):
    """``text`` with the region between BEGIN and END replaced by ``body``."""
    b, e = text.count(BEGIN), text.count(END)
    if b != 1 or e != 1 or text.index(END) < text.index(BEGIN):
        raise CheckError(f"{name} must hold exactly one {BEGIN} line followed by one {END} line "
                         f"(found {b} and {e}); add them where the table goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def parse_table(text):
    """The rows of the README region as dicts keyed by HEADER (strings); raises ``ValueError``
    if the markers or the table's header are missing or a row has the wrong number of cells."""
    m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    if m is None:
        raise ValueError(f"no {BEGIN} ... {END} region")
    lines = [ln for ln in m.group(1).splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        raise ValueError("the region holds no table")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    if tuple(header) != HEADER:
        raise ValueError(f"table header {header} is not {list(HEADER)}")
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) != len(HEADER):
            raise ValueError(f"row {ln!r} has {len(cells)} cells, expected {len(HEADER)}")
        rows.append(dict(zip(HEADER, cells)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-python", required=True,
                    help="the Python of an environment with torch, numpy, h5py (and refimpl, "
                         "for the installed golden set)")
    ap.add_argument("--refimpl", default="refimpl", help="the refimpl command that verifies")
    ap.add_argument("--readme", default=str(README),
                    help="the file whose example-check region gets the table")
    ap.add_argument("--golden", default=None,
                    help="folder of the golden <suite>.h5 files (default: the installed set)")
    ap.add_argument("--dtype", action="append", choices=DTYPES,
                    help="only this dtype (repeatable; the README is then not written)")
    ap.add_argument("--keep", default=None,
                    help="write candidates and reports into this folder and keep them "
                         "(default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    dtypes = args.dtype or list(DTYPES)
    start = time.perf_counter()
    try:
        readme = Path(args.readme)
        write = set(dtypes) == set(DTYPES)
        if write:  # refuse a README without the markers before the long part
            replace_region(readme.read_text(), "", str(readme))
        env = versions(args.torch_python)
        log(f"example environment: {env}")
        with tempfile.TemporaryDirectory(prefix="refimpl-example-check.") as tmp:
            work = args.keep or tmp
            os.makedirs(work, exist_ok=True)
            reports = {}
            for i, dtype in enumerate(dtypes, 1):
                log(f"[{i}/{len(dtypes)}] --dtype {dtype}")
                reports[dtype] = run_dtype(dtype, args.torch_python, args.refimpl, work,
                                           args.golden)
        rows = table_rows(reports)
        body = render(rows, env)
        print(body, end="", flush=True)
        if write:
            from refimpl.atomic import atomic_write_text
            new = replace_region(readme.read_text(), body, str(readme))
            atomic_write_text(str(readme), new)
            log(f"table written into {readme}")
        else:
            log(f"not all dtypes ran: {readme} left as it is")
    except CheckError as e:
        log(f"error: {e}")
        return 2
    failed = [f"{r[0]} at {r[1]}" for r in rows if r[2] != "PASSED"]
    took = time.perf_counter() - start
    if failed:
        log(f"FAILED in {took:.0f} s: {', '.join(failed)}")
        return 1
    log(f"PASSED in {took:.0f} s: {len(rows)} verdicts (suite x dtype), none failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
