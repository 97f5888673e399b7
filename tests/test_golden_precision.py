"""Precision profiles of ``refimpl golden verify`` against a float32 NumPy backend (issue 10).

``tests/float32_backend.py`` computes every case of ``s4d_kernel``, ``fftconv``, ``neuron``,
``pmbc``, ``glu``, ``sdn`` and ``block`` in float32. Shown here:

- the correct candidate passes ``precision="float32"`` with no failing row (ACCEPTABLE and
  UNTESTABLE allowed, their counts in the message), also when written as float32 datasets;
- it fails ``precision="float64"`` (the profile matters);
- each planted bug fails float32 with a MISMATCH row on the tensor the bug affects;
- a relative error of 1e-3 in any output or gradient is a MISMATCH on that tensor.
"""
import inspect
import time

import numpy as np
import pytest

from refimpl.golden import FAILURES, verify

import float32_backend as fb

HAS_PRECISION = "precision" in inspect.signature(verify).parameters
needs_precision = pytest.mark.skipif(not HAS_PRECISION,
                                     reason="verifier without precision profiles")

#: the backend computes PMBC's spikes iteratively and writes no iteration counts
SKIP = ("*/outputs/iterations",)


@pytest.fixture(scope="module")
def cand(tmp_path_factory):
    """``cand(suite, bug=None, target=None, dtype=float64)`` -> path of the candidate file."""
    root = tmp_path_factory.mktemp("f32cand")
    made = {}

    def make(suite, bug=None, target=None, dtype=np.float64):
        key = (suite, bug, target, np.dtype(dtype).name)
        if key not in made:
            name = "-".join(str(k).replace("/", "_") for k in key if k is not None)
            made[key] = fb.write_candidate(suite, root / f"{name}.h5", bug, target, dtype)
        return made[key]
    return make


def run(path, precision):
    kw = {"precision": precision} if HAS_PRECISION else {}
    return verify([path], skip=SKIP, **kw)["files"][0]


def _fmt(rows):
    return "\n".join(f"  {r['case']} {r['status']} {r['tensor']} {r['index']} value={r['value']} "
                     f"ref={r['reference']} bound={r['bound']} {r['detail']}" for r in rows)


def _statuses(report):
    return report["summary"]["statuses"]


@needs_precision
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["as-float64", "as-float32"])
@pytest.mark.parametrize("suite", fb.SUITES)
def test_correct_float32_candidate_passes_float32_profile(cand, suite, dtype):
    rep = run(cand(suite, dtype=dtype), "float32")
    bad = [r for r in rep["rows"] if r["status"] in FAILURES]
    st = _statuses(rep)
    assert not bad, f"{suite}: {st}\n{_fmt(bad)}"
    assert rep["passed"], st
    # every valid case was computed: nothing ERROR / MISSING, and the invalid ones rejected
    assert st.get("PASS", 0) > 0, st
    print(f"{suite} float32 ({np.dtype(dtype).name}): {st} "
          f"(ACCEPTABLE {st.get('ACCEPTABLE', 0)}, UNTESTABLE {st.get('UNTESTABLE', 0)})")


@pytest.mark.parametrize("suite", fb.SUITES)
def test_correct_float32_candidate_fails_float64_profile(cand, suite):
    rep = run(cand(suite), "float64")
    st = _statuses(rep)
    assert not rep["passed"], st
    assert st.get("MISMATCH", 0) > 0, st
    # float32 rounding is all that is wrong: nothing missing, rejected wrongly or misshapen
    assert set(st) <= {"PASS", "MISMATCH", "ACCEPTABLE", "REJECTED", "UNTESTABLE"}, st


@needs_precision
@pytest.mark.parametrize("bug", sorted(fb.BUGS))
def test_planted_bug_is_named(cand, bug):
    suite, tensor = fb.BUGS[bug]
    rep = run(cand(suite, bug), "float32")
    mism = [r for r in rep["rows"] if r["status"] == "MISMATCH"]
    assert not rep["passed"], f"{bug}: not caught, {_statuses(rep)}"
    tensors = {r["tensor"] for r in mism}
    assert tensor in tensors, f"{bug}: MISMATCH on {sorted(tensors)}, expected {tensor}"
    hit = [r for r in mism if r["tensor"] == tensor]
    assert all(r["value"] is not None and r["reference"] is not None for r in hit)


#: tensors a 1e-3 relative error cannot be seen in at float32 in any case (none so far)
UNTESTABLE_AT_FLOAT32 = set()


def _rel_targets():
    for suite in fb.SUITES:
        for t in fb.tensor_names(suite):
            if not t.endswith("/iterations"):
                yield pytest.param(suite, t, id=f"{suite}:{t}")


@needs_precision
@pytest.mark.parametrize("suite,target", list(_rel_targets()))
def test_relative_error_1e_3_is_caught(cand, suite, target):
    rep = run(cand(suite, fb.REL_ERROR, target), "float32")
    rows = [r for r in rep["rows"] if r["tensor"] == target]
    mism = [r for r in rows if r["status"] == "MISMATCH"]
    others = {r["tensor"] for r in rep["rows"] if r["status"] in FAILURES} - {target}
    assert not others, f"the error in {target} was reported on {sorted(others)}"
    if (suite, target) in UNTESTABLE_AT_FLOAT32:
        assert not mism and rows and all(r["status"] == "UNTESTABLE" for r in rows), _fmt(rows)
        return
    assert mism, f"{suite} {target} x (1 + 1e-3) not caught: {_statuses(rep)}\n{_fmt(rows)}"
    assert not rep["passed"]


def test_suite_timing(cand):
    """The whole backend (all suites, correct candidate) stays fast."""
    t = time.perf_counter()
    for suite in fb.SUITES:
        fb.compute_suite(suite)
    assert time.perf_counter() - t < 20
