"""examples/README.md's verdict table is the output of `make example-check` and says it passed.

The real check is `make example-check` (torch in its own environment, run by .ci/run); these
tests run without torch. They read the generated region of examples/README.md and check that it
covers every suite of examples/torch_backend.py at every dtype, with the committed golden set's
case counts (a table left behind when cases are added fails here), that every verdict passed,
and that the script's region writer and parser agree.
"""
import ast
import importlib.util
from pathlib import Path

import h5py
import pytest

from refimpl.golden import golden_path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_check():
    spec = importlib.util.spec_from_file_location("run_backend_check",
                                                  EXAMPLES / "run_backend_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check = _load_check()


def example_suites():
    """The keys of torch_backend.SUITES, read from the source (importing it needs torch)."""
    tree = ast.parse((EXAMPLES / "torch_backend.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "SUITES" for t in node.targets):
            return [ast.literal_eval(k) for k in node.value.keys]
    raise AssertionError("examples/torch_backend.py defines no SUITES dict")


def golden_counts(suite):
    """(cases, invalid cases) of the committed golden file of ``suite``."""
    with h5py.File(golden_path(suite), "r") as f:
        results = [f["cases"][c].attrs["result"] for c in f["cases"]]
    results = [r.decode() if isinstance(r, bytes) else str(r) for r in results]
    return len(results), results.count("invalid")


@pytest.fixture(scope="module")
def rows():
    return check.parse_table((EXAMPLES / "README.md").read_text())


def test_table_covers_every_suite_at_every_dtype(rows):
    suites = example_suites()
    assert set(suites) >= {"s4d_kernel", "fftconv", "neuron", "glu"}
    keys = [(r["suite"], r["dtype"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicate rows: {keys}"
    assert set(keys) == {(s, d) for s in suites for d in check.DTYPES}


def test_table_verdicts_passed_with_the_golden_case_counts(rows):
    for r in rows:
        where = f"{r['suite']} at {r['dtype']}"
        cases, invalid = golden_counts(r["suite"])
        assert r["verdict"] == "PASSED", where
        assert (r["failed"], r["other rows"]) == ("0", "0"), where
        assert int(r["cases"]) == cases, (where, "the table predates the golden set: run "
                                          "make example-check")
        # the example rejects every invalid case and no valid one
        assert int(r["REJECTED"]) == invalid, where
        # every case gives at least one row; a passing case exactly one PASS row
        counts = [int(r[c]) for c in check.COLUMNS]
        assert sum(counts) >= cases and int(r["PASS"]) <= cases - invalid, where
        if r["tensors tested"] != "-":  # verify's coverage: "tested of total"
            tested, total = (int(v) for v in r["tensors tested"].split(" of "))
            assert 0 < tested <= total and 0 <= int(r["not compared"]) <= total - tested, where


def test_region_writer_and_parser_agree():
    reports = {d: [{"suite": "glu", "passed": d != "float16",
                    "summary": {"cases": 6, "cases_failed": int(d == "float16"),
                                "statuses": {"PASS": 5, "MISMATCH": 2} if d == "float16"
                                else {"PASS": 6},
                                **({"tensors": {"tested": 20, "untestable": 3,
                                                "not_compared": 1}} if d == "float32" else {})}}]
               for d in check.DTYPES}
    body = check.render(check.table_rows(reports), "torch X")
    text = check.replace_region(f"intro\n{check.BEGIN}\nold table\n{check.END}\nrest\n", body)
    assert text.startswith("intro\n") and text.endswith(f"{check.END}\nrest\n")
    assert "old table" not in text
    parsed = check.parse_table(text)
    assert [(r["suite"], r["dtype"], r["verdict"]) for r in parsed] == [
        ("glu", d, "FAILED" if d == "float16" else "PASSED") for d in check.DTYPES]
    bad = parsed[-1]
    assert (bad["failed"], bad["PASS"], bad["other rows"]) == ("1", "5", "MISMATCH 2")
    assert parsed[0]["PASS"] == "6" and parsed[0]["other rows"] == "0"
    assert (parsed[0]["tensors tested"], parsed[0]["not compared"]) == ("-", "-")
    assert (parsed[1]["tensors tested"], parsed[1]["not compared"]) == ("20 of 24", "1")


@pytest.mark.parametrize("text", ["no markers\n", f"{check.BEGIN}\nonly the start\n",
                                  f"{check.END}\n{check.BEGIN}\n",
                                  f"{check.BEGIN}\n{check.END}\n{check.BEGIN}\n{check.END}\n"])
def test_region_writer_refuses_missing_or_unbalanced_markers(text):
    with pytest.raises(check.CheckError, match="exactly one"):
        check.replace_region(text, "table\n")


def test_parser_refuses_a_region_without_the_table():
    with pytest.raises(ValueError, match="no table"):
        check.parse_table(f"{check.BEGIN}\nnothing\n{check.END}\n")
    with pytest.raises(ValueError, match="header"):
        check.parse_table(f"{check.BEGIN}\n| a | b |\n|---|---|\n{check.END}\n")
    with pytest.raises(ValueError, match="cells"):
        header = "| " + " | ".join(check.HEADER) + " |\n|---|\n"
        check.parse_table(f"{check.BEGIN}\n{header}| glu | float64 |\n{check.END}\n")
