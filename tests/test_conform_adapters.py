"""The NumPy adapters of ``refimpl conform`` (tests/conform_adapters.py, issue 24).

(a) the reference adapter passes every committed golden suite of an op it provides at
float64, and its float32 variant at ``--precision float32``; (b) the three planted bugs that
the issue requires to be invisible to the committed set (L > 1000, a nonzero refractory count,
H not a multiple of 8) pass every committed case of their op; (c) each planted bug, called at
its triggering condition, differs from the reference by far more than rounding, and the
required ones only there.
"""
import numpy as np
import pytest

from refimpl.golden import SUITES, verify_file
from refimpl.golden.schema import FAILURES
from refimpl.ops import all_ops, config_fields
from refimpl.sdn.fused import random_weights
from refimpl.ssm import ssm_examples_params

import conform_adapters as ca

#: refimpl's own ops (a test may register a toy op into the same registry)
OPS = {n: o for n, o in all_ops().items() if o.fwd.__module__.startswith("refimpl.")}
#: the committed golden suites of ops the adapters provide
GOLDEN = [name for name, s in SUITES.items() if hasattr(ca.reference, s.op)]


@pytest.fixture(scope="module")
def cand_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("conform-candidates")


def _verify(adapter, suite, cand_dir, precision, label, form="whole"):
    path = ca.write_candidate(adapter, suite,
                              cand_dir / f"{label}-{suite}-{precision}-{form}.h5", precision,
                              form)
    rep = verify_file(path, precision=precision,
                      skip=("*/outputs/iterations",) if form != "whole" else ())
    bad = [(r["case"], r["tensor"], r["status"], r.get("detail")) for r in rep["rows"]
           if r["status"] in FAILURES]
    return rep["passed"], bad


def test_every_op_has_functions():
    for name, op in OPS.items():
        for adapter in (ca.reference, ca.reference32):
            assert callable(getattr(adapter, name))
            assert callable(getattr(adapter, name + "_vjp"))
            assert hasattr(adapter, name + "_step") == (op.state is not None)
    assert set(GOLDEN) == {"s4d_kernel", "fftconv", "s4d_layer", "neuron", "pmbc", "sdn",
                           "glu", "gsu"}


@pytest.mark.parametrize("suite", GOLDEN)
def test_reference_passes_golden(suite, cand_dir):
    passed, bad = _verify(ca.reference, suite, cand_dir, "float64", "reference")
    assert passed, bad[:5]


@pytest.mark.parametrize("suite", GOLDEN)
def test_reference32_passes_golden_at_float32(suite, cand_dir):
    passed, bad = _verify(ca.reference32, suite, cand_dir, "float32", "reference32")
    assert passed, bad[:5]


@pytest.mark.parametrize("suite", [s for s in GOLDEN if OPS[SUITES[s].op].state is not None])
@pytest.mark.parametrize("form", ["chunked", "step"])
def test_reference_forms_pass_golden(suite, form, cand_dir):
    """The stateful ops run in three chunks and step by step, each part from the previous
    one's end state, pass the committed cases (their stateful starts included) at float64,
    and the float32 variant (float32 from the zero state, float64 from the rounded state
    after it) at float32."""
    for adapter, precision in ((ca.reference, "float64"), (ca.reference32, "float32")):
        passed, bad = _verify(adapter, suite, cand_dir, precision, adapter.NAME, form)
        assert passed, (precision, bad[:5])


def test_reference32_is_float32():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5))
    out = ca.reference32.neuron({"x": x}, {}, state=None)
    assert out["h"].dtype == np.float32 and out["count_end"].dtype == np.int64
    assert out["u_end"].dtype == np.float32
    ref = ca.reference.neuron({"x": x}, {})
    assert np.array_equal(out["s"], ref["s"])
    assert 0 < np.max(np.abs(out["h"] - ref["h"])) < 1e-5 * np.max(np.abs(ref["h"]))
    np.testing.assert_array_equal(out["count_end"], ref["count_end"])
    p = ssm_examples_params(rng, 2, 4)
    p["D"] = rng.normal(size=2)
    o32 = ca.reference32.s4d_layer({"u": x[:, :2]}, p)
    o64 = ca.reference.s4d_layer({"u": x[:, :2]}, p)
    assert o32["y"].dtype == np.float32 and o32["x_end_re"].dtype == np.float32
    np.testing.assert_allclose(o32["x_end_im"], o64["x_end_im"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bug", sorted(ca.REQUIRED.values()))
def test_required_bugs_pass_every_committed_case(bug, cand_dir):
    op, adapter, _ = ca.BUGS[bug]
    suites = [name for name, s in SUITES.items() if s.op == op]
    assert suites, f"no committed suite of {op}"
    for suite in suites:
        for precision in ("float64", "float32"):
            passed, bad = _verify(adapter, suite, cand_dir, precision, bug)
            assert passed, (suite, precision, bad[:5])


@pytest.mark.parametrize("bug", ["neuron_step_count_stuck", "s4d_layer_step_no_D"])
def test_step_form_bugs_only_in_the_step_form(bug, cand_dir):
    """A bug of the step form passes the committed cases whole and chunked, fails step by
    step."""
    op, adapter, _ = ca.BUGS[bug]
    for form in ("whole", "chunked", "step"):
        passed, bad = _verify(adapter, op, cand_dir, "float64", bug, form)
        assert passed == (form != "step"), (form, bad[:3])


# --------------------------------------------------------------------------------------------
# Direct calls at the triggering condition
# --------------------------------------------------------------------------------------------

def _call(adapter, op_name, form, ex):
    """``form``: ``whole`` (the forward), ``vjp``, ``step`` (one step at a time from the
    example's state, outputs concatenated) of op ``op_name`` on the example dict."""
    op = OPS[op_name]
    inputs, params, config = ex["inputs"], ex.get("params", {}), ex.get("config", {})
    state = ex.get("state")
    kw = {"state": state} if op.state is not None else {}
    if form == "whole":
        return getattr(adapter, op_name)(inputs, params, **kw, **config)
    if form == "vjp":
        return getattr(adapter, op_name + "_vjp")(inputs, params, ex["cot"], **kw, **config)
    assert form == "step"
    L = next(np.shape(inputs[k])[a] for k, a in op.time.items() if k in inputs)
    parts = {}
    for t in range(L):
        chunk = {k: (np.take(v, [t], axis=op.time[k]) if k in op.time else v)
                 for k, v in inputs.items()}
        out = getattr(adapter, op_name + "_step")(chunk, params, state, **config)
        state = {}
        for f in op.state._fields:
            state[f] = (out[f + "_end"] if f + "_end" in out
                        else out[f + "_end_re"] + 1j * out[f + "_end_im"])
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: (np.concatenate(v, axis=op.time[k]) if k in op.time else v[-1])
            for k, v in parts.items()}


def _error(bug_out, ref_out):
    """The largest difference over the common tensors: ``inf`` for a discrete mismatch (an
    integer or spike output) or a non-finite value where the reference is finite, else
    ``max |a - b| / max |b|`` per tensor."""
    worst = 0.0
    assert set(ref_out) <= set(bug_out), (sorted(ref_out), sorted(bug_out))
    for k, b in ref_out.items():
        a, b = np.asarray(bug_out[k], dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert a.shape == b.shape, k
        if np.array_equal(a, b, equal_nan=True):
            continue
        if np.any(np.isfinite(b) & ~np.isfinite(a)):
            return np.inf
        if np.asarray(ref_out[k]).dtype.kind in "iu" or k == "s":
            if not np.array_equal(a, b):
                return np.inf
            continue
        if not np.all(np.isfinite(a) == np.isfinite(b)):
            return np.inf
        finite = np.isfinite(b)
        scale = np.max(np.abs(b[finite]), initial=0.0)
        diff = np.max(np.abs(a[finite] - b[finite]), initial=0.0)
        if diff > 0:
            worst = max(worst, diff / scale if scale > 0 else np.inf)
    return worst


def _rng():
    return np.random.default_rng(24)


def _s4d(H=2, N=4, kernel=False, **kw):
    """S4D parameters (with ``D`` for the layer; without it for the kernel)."""
    p = ssm_examples_params(_rng(), H, N, **kw)
    p["D"] = _rng().normal(size=H)
    if kernel:
        del p["D"]
    return p


def _x0(B, H, N2):
    r = _rng()
    return r.normal(size=(B, H, N2)) + 1j * r.normal(size=(B, H, N2))


def _neuron_state(B, H, u=0.0, count=0):
    return {"u": np.full((B, H), float(u)), "count": np.full((B, H), count, np.int64)}


def _long_K(H, L):
    r = _rng()
    return r.normal(size=(H, L)) * np.exp(-np.arange(L) / 300.0)


def _ex(inputs, params=None, config=None, state=None, cot=None):
    return {"inputs": inputs, "params": params or {}, "config": config or {}, "state": state,
            "cot": cot}


def _glu_params(H):
    r = _rng()
    return {"W": r.uniform(-1, 1, size=(2 * H, H)) / np.sqrt(H), "b": r.normal(size=2 * H)}


def _gsu_params(H):
    r = _rng()
    W = r.normal(size=(H, H)) / np.sqrt(H)
    W[1:] *= 0.2  # rows with a smaller max than the global one
    return {"W": W, "b": r.normal(size=H), "c": r.normal(size=H)}


R = _rng()
#: bug -> (form, example at its triggering condition)
TRIGGERS = {
    "s4d_kernel_vjp_C_im_no_conj": ("vjp", _ex({}, _s4d(kernel=True),
                                               {"L": 8, "disc": "zoh"},
                                               cot={"K": R.normal(size=(2, 8))})),
    "fftconv_long_tail_block": ("whole", _ex({"u": R.normal(size=(1, 2, 1500))},
                                             {"K": _long_K(2, 1500), "D": R.normal(size=2)})),
    "fftconv_vjp_no_D": ("vjp", _ex({"u": R.normal(size=(2, 2, 6))},
                                    {"K": R.normal(size=(2, 6)), "D": R.normal(size=2)},
                                    cot={"y": R.normal(size=(2, 2, 6))})),
    "s4d_layer_x_end_one_step_late": ("whole", _ex({"u": R.normal(size=(2, 2, 5))}, _s4d(),
                                                   {"disc": "zoh"}, {"x": _x0(2, 2, 2)})),
    "s4d_layer_step_no_D": ("step", _ex({"u": R.normal(size=(2, 2, 4))}, _s4d(),
                                        {"disc": "bilinear"})),
    "neuron_gt_ignores_count0": ("whole", _ex({"x": np.full((2, 3, 6), 2.0)}, {},
                                              {"spike_condition": "gt", "refractory_steps": 3,
                                               "reset": "soft"}, _neuron_state(2, 3, 0.5, 2))),
    "neuron_ge_as_gt": ("whole", _ex({"x": np.array([[[1.0, 0.25, 0.5, 1.0]]])}, {},
                                     {"tau": 0.5, "theta": 1.0, "spike_condition": "ge"})),
    "neuron_u_end_before_reset": ("whole", _ex({"x": np.array([[[0.1, 0.2, 3.0]]])}, {},
                                               {"reset": "hard"}, _neuron_state(1, 1))),
    "neuron_step_count_stuck": ("step", _ex({"x": np.full((1, 2, 8), 2.0)}, {},
                                            {"refractory_steps": 2})),
    "neuron_vjp_surrogate_scale_ignored": ("vjp", _ex(
        {"x": R.normal(0.8, 0.5, size=(2, 2, 6))}, {}, {"surrogate": "atan",
                                                        "surrogate_scale": 7.0},
        cot={"s": R.normal(size=(2, 2, 6))})),
    "neuron_vjp_detach_reset_as_bptt": ("vjp", _ex(
        {"x": R.normal(0.8, 0.5, size=(2, 2, 8))}, {}, {"reset": "soft",
                                                        "grad_mode": "detach_reset"},
        cot={"s": R.normal(size=(2, 2, 8)), "u": R.normal(size=(2, 2, 8))})),
    "pmbc_count_end_full": ("whole", _ex({"x": np.array([[[2.0, 0.0, 0.0, 0.0, 0.0]]])}, {},
                                         {"refractory_steps": 3}, _neuron_state(1, 1))),
    "pmbc_vjp_detached_count0": ("vjp", _ex(
        {"x": np.full((1, 2, 4), 0.9)}, {}, {"refractory_steps": 2, "grad_mode": "sltt"},
        _neuron_state(1, 2, 0.0, 2), cot={"s": np.ones((1, 2, 4))})),
    "sdn_fused_sees_x_t": ("whole", _ex({"x": R.normal(size=(2, 2, 12))}, random_weights(R))),
    "sdn_vjp_surrogate_scale_ignored": ("vjp", _ex(
        {"x": R.normal(0.5, 1.0, size=(2, 2, 10))}, random_weights(R),
        {"surrogate": "sigmoid", "surrogate_scale": 7.0},
        cot={"s": R.normal(size=(2, 2, 10)), "m": R.normal(size=(2, 2, 10))})),
    "sdn_neuron_window_from_chunk": ("whole", _ex({"x": R.normal(size=(2, 2, 3))},
                                                  random_weights(R), {},
                                                  {"window": R.normal(size=(2, 2, 8))})),
    "linear_vjp_db_mean": ("vjp", _ex({"x": R.normal(size=(2, 3, 4))},
                                      {"W": R.normal(size=(5, 3)), "b": R.normal(size=5)},
                                      cot={"y": R.normal(size=(2, 5, 4))})),
    "linear_tail_no_bias": ("whole", _ex({"x": R.normal(size=(2, 3, 4))},
                                         {"W": R.normal(size=(12, 3)), "b": R.normal(size=12)})),
    "embedding_vjp_assign": ("vjp", _ex({"tokens": np.array([[0, 1, 0], [2, 0, 1]])},
                                        {"E": R.normal(size=(3, 4))},
                                        cot={"y": R.normal(size=(2, 4, 3))})),
    "gelu_tanh_approximation": ("whole", _ex({"x": np.linspace(-4, 4, 24).reshape(2, 3, 4)})),
    "glu_tail_gate_bias": ("whole", _ex({"s": (R.random((2, 12, 5)) < 0.5).astype(float)},
                                        _glu_params(12))),
    "gsu_ter_w_per_row": ("whole", _ex({"x": R.normal(size=(2, 6, 4))}, _gsu_params(6))),
    "layernorm_unbiased_variance": ("whole", _ex({"x": R.normal(size=(2, 4, 3))},
                                                 {"gamma": R.normal(size=4),
                                                  "beta": R.normal(size=4)})),
    "batchnorm_running_var_biased": ("whole", _ex(
        {"x": R.normal(size=(2, 3, 4)), "running_mean": R.normal(size=3),
         "running_var": R.uniform(0.5, 1.5, size=3)},
        {"gamma": R.normal(size=3), "beta": R.normal(size=3)}, {"training": True})),
    "meanpool_vjp_no_divide": ("vjp", _ex({"x": R.normal(size=(2, 3, 5))},
                                          cot={"y": R.normal(size=(2, 3))})),
    "cross_entropy_no_max_subtraction": ("whole", _ex(
        {"logits": np.array([[800.0, 1.0, -2.0], [0.5, 0.1, 0.2]]), "labels": np.array([0, 2])})),
    "dropout_no_rescale": ("whole", _ex({"x": R.normal(size=(2, 3, 4)),
                                         "mask": np.array([[[0.0], [1 / 0.7], [1 / 0.7]],
                                                           [[1 / 0.7], [0.0], [1 / 0.7]]])})),
    "lm_decoder_vjp_db_first_row": ("vjp", _ex({"h": R.normal(size=(2, 3, 4))},
                                               {"W": R.normal(size=(5, 3)),
                                                "b": R.normal(size=5)},
                                               cot={"logits": R.normal(size=(2, 4, 5))})),
}


def test_every_bug_has_a_trigger_and_every_op_a_bug():
    assert set(TRIGGERS) == set(ca.BUGS)
    assert {op for op, _, _ in ca.BUGS.values()} == set(OPS)
    assert set(ca.REQUIRED.values()) <= set(ca.BUGS)


@pytest.mark.parametrize("bug", sorted(ca.BUGS))
def test_bug_differs_at_its_trigger(bug):
    op, adapter, description = ca.BUGS[bug]
    form, ex = TRIGGERS[bug]
    with np.errstate(all="ignore"):
        ref = _call(ca.reference, op, form, ex)
        got = _call(adapter, op, form, ex)
        again = _call(adapter, op, form, ex)
    assert _error(got, ref) >= 1e-4, (bug, description)
    assert _error(again, got) == 0.0  # deterministic


def _required_error(bug, form, ex):
    op, adapter, _ = ca.BUGS[bug]
    return _error(_call(adapter, op, form, ex), _call(ca.reference, op, form, ex))


def test_long_sequence_bug_only_above_1000():
    bug = ca.REQUIRED["long_sequence"]
    # one block (L <= 1024) has no history to drop; full blocks have no tail
    for L, wrong in ((1000, False), (1001, False), (1024, False), (1025, True), (1500, True),
                     (2048, False), (2100, True)):
        ex = _ex({"u": _rng().normal(size=(1, 2, L))}, {"K": _long_K(2, L),
                                                      "D": _rng().normal(size=2)})
        err = _required_error(bug, "whole", ex)
        assert (err > 1e-2) if wrong else (err == 0.0), (L, err)


def test_refractory_count_bug_only_from_a_nonzero_count():
    bug = ca.REQUIRED["refractory_count"]
    x = {"x": np.full((2, 3, 6), 1.1)}  # above theta, within the triangle surrogate
    for cond, count, wrong in (("gt", 2, True), ("gt", 3, True), ("gt", 0, False),
                               ("ge", 2, False), ("ge", 3, False)):
        cfg = {"spike_condition": cond, "refractory_steps": 3}
        ex = _ex(x, {}, cfg, _neuron_state(2, 3, 0.5, count), cot={"s": np.ones((2, 3, 6))})
        for form in ("whole", "vjp"):
            err = _required_error(bug, form, ex)
            assert (err == np.inf if form == "whole" else err > 1e-2) if wrong else err == 0.0, \
                (cond, count, form, err)
    # from the zero state the whole form is right; the step form carries the count it makes
    ex = _ex(x, {}, {"spike_condition": "gt", "refractory_steps": 3})
    assert _required_error(bug, "whole", ex) == 0.0
    assert _required_error(bug, "step", ex) == np.inf


def test_channels_bug_only_when_not_a_multiple_of_8():
    bug = ca.REQUIRED["channels_not_multiple_of_8"]
    for H, wrong in ((1, False), (4, False), (7, False), (8, False), (9, True), (12, True),
                     (16, False), (20, True), (24, False)):
        ex = _ex({"s": (_rng().random((2, H, 5)) < 0.5).astype(float)}, _glu_params(H))
        err = _required_error(bug, "whole", ex)
        assert (err > 1e-2) if wrong else (err == 0.0), (H, err)


# --------------------------------------------------------------------------------------------
# The forms of the reference adapters
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op_name", [n for n, op in OPS.items() if op.state is not None])
def test_reference_step_equals_whole(op_name):
    op = OPS[op_name]
    for i, e in enumerate(op.examples(np.random.default_rng(3))):
        state = None if e.state is None else dict(zip(e.state._fields, e.state))
        if op_name == "s4d_layer" and np.ndim(e.params["C_re"]) == 3:
            continue  # bidirectional: no streaming form
        config = {} if e.cfg is None else {k: getattr(e.cfg, k)
                                           for k in config_fields(op.config)}
        ex = _ex(e.inputs, e.params, config, state)
        whole = _call(ca.reference, op_name, "whole", ex)
        step = _call(ca.reference, op_name, "step", ex)
        assert _error(step, {k: v for k, v in whole.items() if k != "iterations"}) < 1e-12, \
            (op_name, i)


def test_s4d_layer_vjp_from_a_state_is_not_implemented():
    ex = TRIGGERS["s4d_layer_x_end_one_step_late"][1]
    cot = {"y": np.ones((2, 2, 5))}
    with pytest.raises(NotImplementedError):
        ca.reference.s4d_layer_vjp(ex["inputs"], ex["params"], cot, state=ex["state"])
    zero = {"x": np.zeros((2, 2, 2), complex)}
    g = ca.reference.s4d_layer_vjp(ex["inputs"], ex["params"], cot, state=zero)
    g0 = ca.reference.s4d_layer_vjp(ex["inputs"], ex["params"], cot)
    assert all(np.array_equal(g[k], g0[k]) for k in g0)


def test_rejections_propagate():
    with pytest.raises(ValueError):
        ca.reference.neuron({"x": np.ones((1, 1, 3))}, {}, tau=1.5)
    with pytest.raises(ValueError):
        ca.reference.glu({"s": np.ones((1, 2, 3)), "q": np.ones(1)}, _glu_params(2))
    with pytest.raises(ValueError):
        ca.reference32.fftconv({"u": np.full((1, 1, 3), np.nan)}, {"K": np.ones((1, 3))})
