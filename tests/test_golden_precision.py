"""Precision profiles of ``refimpl golden verify`` against a float32 NumPy backend (issue 10).

``tests/float32_backend.py`` computes every case of ``s4d_kernel``, ``fftconv``, ``s4d_layer``,
``neuron``, ``pmbc``, ``glu``, ``sdn``, ``block`` and ``model_stream`` (the stateful cases
included: from the stored state, with the end state) in float32. Shown here:

- the correct candidate passes ``precision="float32"`` with no failing row (ACCEPTABLE and
  UNTESTABLE allowed, their counts in the message), also when written as float32 datasets;
- it fails ``precision="float64"`` (the profile matters);
- each planted bug fails float32 with a MISMATCH row on the tensor the bug affects (among them
  stateful ones: the initial membrane or counter ignored, the counter not decremented at the
  last step, the S4D state ignored or its end-state power off by one, the model's state dropped
  between chunks);
- a relative error of 1e-3 in any output or gradient is a MISMATCH on that tensor, and in
  every ``float32_resolution`` case of ``s4d_kernel`` and ``s4d_layer`` (issue 10);
- computing ``exp(dt A) - 1`` by subtraction (``naive_expm1``) is no false alarm.
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
            if not t.endswith(("/iterations", "/count_end", ".count")):  # integers: exact
                yield pytest.param(suite, t, id=f"{suite}:{t}")


@needs_precision
@pytest.mark.parametrize("suite,target", list(_rel_targets()))
def test_relative_error_1e_3_is_caught(cand, suite, target):
    rep = run(cand(suite, fb.REL_ERROR, target), "float32")
    rows = [r for r in rep["rows"] if r["tensor"] == target]
    # a spike tensor times 1.001 holds values that are no spikes: BAD_VALUE (issue 21)
    mism = [r for r in rows if r["status"] in ("MISMATCH", "BAD_VALUE")]
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


# ---- S4D at float32: the float32_resolution cases, and the naive expm1 -----------------------

S4D = ("s4d_kernel", "s4d_layer")


def _case_info(suite):
    """``{case id: (flags, disc, {tensor path: max|ref|})}`` of the committed golden file."""
    import h5py
    from refimpl.golden import golden_path
    out = {}
    with h5py.File(golden_path(suite), "r") as f:
        for cid, g in f["cases"].items():
            flags = [x.decode() if isinstance(x, bytes) else str(x)
                     for x in np.atleast_1d(g.attrs.get("flags", []))]
            mags = {}
            for group in ("outputs", "grads"):
                if group in g:
                    mags.update({f"{group}/{n}": float(np.max(np.abs(g[group][n][()])))
                                 for n in g[group]})
            disc = g.attrs.get("disc", b"")
            out[cid] = (flags, disc.decode() if isinstance(disc, bytes) else str(disc), mags)
    return out


def _f32_targets():
    for suite in S4D:
        for t in fb.tensor_names(suite):
            yield pytest.param(suite, t, id=f"{suite}:{t}")


@needs_precision
@pytest.mark.parametrize("suite,target", list(_f32_targets()))
def test_float32_resolution_cases_catch_1e_3_in_every_tensor(cand, suite, target):
    """Every ``float32_resolution`` case sees a 1e-3 relative error in each of its nonzero
    outputs and gradients (``C_im`` of the S4D-Real cases is exactly 0: nothing to see)."""
    info = _case_info(suite)
    want = {cid for cid, (flags, _, mags) in info.items()
            if "float32_resolution" in flags and mags.get(target, 0.0) > 0.0}
    if not want:
        # C_im of S4D-Real is 0; the end state x_re, x_im exists in the stateful cases only
        assert target in ("grads/C_im", "outputs/x_re", "outputs/x_im") \
            or target.startswith("grads/B_"), target
        return
    rep = run(cand(suite, fb.REL_ERROR, target), "float32")
    hit = {r["case"] for r in rep["rows"] if r["tensor"] == target and r["status"] == "MISMATCH"}
    assert want <= hit, (f"{suite} {target} x (1 + 1e-3) not caught in float32_resolution "
                         f"cases {sorted(want - hit)}")


@needs_precision
@pytest.mark.parametrize("suite", S4D)
def test_naive_expm1_is_no_false_alarm(cand, suite):
    """``exp(dt A) - 1`` by subtraction (and the closed-form derivative) is a correct float32
    implementation: it passes every case but the ``extreme_dt`` ZOH ones, which use the tight
    scale and fail it by design (SCHEMA.md, Tolerance policy)."""
    info = _case_info(suite)
    rep = run(cand(suite, "naive_expm1"), "float32")
    bad = [r for r in rep["rows"] if r["status"] in FAILURES]
    alarms = [r for r in bad if not ("extreme_dt" in info[r["case"]][0]
                                     and info[r["case"]][1] == "zoh")]
    assert not alarms, _fmt(alarms)
    f32 = [cid for cid, (flags, _, _) in info.items() if "float32_resolution" in flags]
    assert f32 and not {r["case"] for r in bad} & set(f32)
    print(f"{suite} naive_expm1 float32: {_statuses(rep)}; failing only in extreme_dt ZOH cases "
          f"{sorted({r['case'] for r in bad})}")
