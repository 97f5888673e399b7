"""README.md's conformance matrix is examples/conform/matrix.json (make conform-matrix).

The real run is `make conform-matrix` (torch and the SNN libraries in their own environment,
.venv-conform; never part of `make test`). These tests run without torch: they check that the
README region is the JSON rendered (every row, nothing else), that every library the issue names
has a row, that every row's verdict is one of the matrix's words, and that every "differs" row
points at a committed minimal counterexample that is a readable one-case golden file.
"""
import importlib.util
import json
from pathlib import Path

import pytest

from refimpl.golden.schema import read_golden

ROOT = Path(__file__).resolve().parent.parent
CONFORM = ROOT / "examples" / "conform"


def _load_runner():
    spec = importlib.util.spec_from_file_location("conform_run_matrix",
                                                  CONFORM / "run_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run_matrix = _load_runner()


@pytest.fixture(scope="module")
def matrix():
    path = CONFORM / "matrix.json"
    assert path.is_file(), "examples/conform/matrix.json is missing: run `make conform-matrix`"
    return json.loads(path.read_text())


def test_readme_region_is_the_json(matrix):
    lines = run_matrix.readme_rows(ROOT / "README.md")
    assert lines is not None, f"README.md has no {run_matrix.START} ... {run_matrix.END} region"
    expected = [ln for ln in run_matrix.render_table(matrix).splitlines() if ln.startswith("| ")]
    assert lines == expected, "README's conformance matrix differs from matrix.json: run " \
        "`make conform-matrix` (or run_matrix.write_readme) again"
    assert matrix["command"] == "make conform-matrix"
    assert "`make conform-matrix`" in (ROOT / "README.md").read_text()


def test_every_library_of_the_issue_has_a_row(matrix):
    libraries = {r["library"] for r in matrix["rows"]}
    for name in ("snntorch", "spikingjelly", "norse", "PyTorch S4D"):
        assert name in libraries, f"no row for {name}"


def _runs(row):
    """A row's campaigns (whole from the zero state; with states, chunks and steps)."""
    return [row[k] for k in run_matrix.RUNS if row.get(k)]


def test_verdicts_are_the_matrix_words(matrix):
    for r in matrix["rows"]:
        v = r["verdict"]
        assert v in ("conforms", "differs") or v.startswith("not installed: "), r
        if v.startswith("not installed"):
            continue
        assert r["dtype"] in ("float32", "float64") and r.get("zero_state"), r
        for run in _runs(r):
            assert run["verdict"] in ("conforms", "differs") and run["examples"] >= 1, r
            assert (run["verdict"] == "differs") == bool(run.get("minimal")), r
        assert (v == "differs") == any(run["verdict"] == "differs" for run in _runs(r)), r


def test_every_difference_has_its_minimal_case(matrix):
    for r in matrix["rows"]:
        for run in _runs(r):
            m = run.get("minimal")
            if not m:
                continue
            path = ROOT / m["path"]
            assert path.is_file(), f"{r['adapter']} {r['op']}: {m['path']} is not committed"
            assert path.resolve().is_relative_to(CONFORM / "cases"), m["path"]
            gf = read_golden(path)
            assert len(gf.cases) == 1 and all(c.op == r["op"] for c in gf.cases.values())
            assert m.get("sizes") and m.get("first"), r


def test_no_stray_case_files(matrix):
    """Every committed case file belongs to a row (a row that now conforms leaves none)."""
    named = {(ROOT / run["minimal"]["path"]).resolve()
             for r in matrix["rows"] for run in _runs(r) if run.get("minimal")}
    files = {p.resolve() for p in (CONFORM / "cases").rglob("*.h5")} if (
        CONFORM / "cases").is_dir() else set()
    assert files <= named, sorted(str(p.relative_to(ROOT)) for p in files - named)


def test_render_round_trip(tmp_path, matrix):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{run_matrix.START}\nSTALE-REGION\n{run_matrix.END}\n\ntail\n")
    run_matrix.write_readme(matrix, readme)
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith("\n\ntail\n") and "STALE-REGION" not in text
    assert len(run_matrix.readme_rows(readme)) == len(matrix["rows"]) + 1  # + the header
