"""``refimpl.conform.strategies``: the examples ``refimpl conform`` draws for every op.

Every registered op has a generator; its examples have the op's names, dtypes and
configuration fields, sizes within the limits, and refimpl builds them as golden cases
(:func:`refimpl.golden.generate.regenerate`, with the suite the engine uses): valid ones
without error, invalid ones rejected (every kind of :data:`~refimpl.conform.strategies.INVALID`
is checked on its own; a layer's message names the argument the kind made invalid).
``fixed`` fields are honoured, the regimes the issue asks for appear (stateful starts with a
nonzero refractory count, extreme ``dt``, membranes exactly at ``theta``) and hypothesis
shrinks a size-dependent failure to the smallest failing size.
"""
import copy
import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refimpl.golden  # noqa: F401  (registers the golden suites)
from refimpl.conform import strategies
from refimpl.conform.strategies import (GENERATORS, INVALID, Limits, _make_invalid, draw_spec,
                                        sizes)
from refimpl.golden.generate import regenerate
from refimpl.golden.registry import judging_suite, read_state
from refimpl.neurons import RESETS, NeuronConfig
from refimpl.ops import all_ops, config_fields, get_op
from refimpl.surrogates import SURROGATES

#: refimpl's own ops (a test may register a toy op into the same registry)
OPS = [n for n, o in all_ops().items() if o.fwd.__module__.startswith("refimpl.")]
#: Inputs of an integer dtype (int64); every other array is float64.
INTEGER = ("tokens", "labels", "count0")
#: sizes() key -> the Limits field bounding it.
SIZE_LIMITS = {"B": "batch", "H": "channels", "L": "length", "N": "state", "V": "vocab",
               "Hin": "features", "Hout": "features"}
#: Limits the per-op tests draw from: the defaults, the smallest, small odd ones.
LIMITS = (Limits(), Limits(1, 1, 1, 2, 1, 1), Limits(batch=3, channels=5, length=9, state=6,
                                                    vocab=7, features=3))
#: The layer ops (refimpl/layers.py): each has invalid kinds, and refimpl's message for each
#: names the argument the kind changed (tests/test_layers_validation.py tests the checks).
LAYER_OPS = ("linear", "embedding", "gelu", "glu", "gsu", "layernorm", "batchnorm", "meanpool",
             "cross_entropy", "dropout", "lm_decoder")
#: Invalid kinds whose name does not end in the argument they change.
KIND_ARGUMENT = {"eps_zero": "eps", "label_C": "labels", "label_negative": "labels",
                 "empty_L": "x", "mask_per_step": "mask", "running_var_negative": "running_var",
                 "token_V": "tokens", "token_negative": "tokens"}
#: An adapter of a library with one neuron configuration (snntorch's Leaky, reset "zero").
SNNTORCH_ROW = {"reset": "hard", "u_reset": 0.0, "spike_condition": "gt", "surrogate": "atan",
                "surrogate_scale": None, "grad_mode": "detach_reset", "refractory_steps": 0}



def fast(n):
    """Settings of these tests: ``n`` examples, derandomized (the same examples every run)."""
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def build(op_name, spec, seed=0):
    """The golden case the engine builds from ``spec`` (the suite it would use)."""
    return regenerate(judging_suite(op_name), "0000", spec, seed).case


def state_names(op):
    """The names a stateful start puts into ``inputs``."""
    if op.state is None:
        return set()
    return {f"{f}0{s}" for f in op.state._fields for s in ("", "_re", "_im")}


def check_structure(op, spec, limits):
    """(a) names, dtypes, configuration fields, comment and flags; (f) sizes() in limits."""
    assert set(spec.inputs) <= set(op.inputs) | state_names(op), spec.comment
    assert set(spec.params) <= set(op.params), spec.comment
    if spec.result != "invalid":
        for group, names in (("inputs", op.inputs), ("params", op.params)):
            missing = [n for n in names if n not in op.optional
                       and n not in getattr(spec, group)]
            assert not missing, (spec.comment, group, missing)
    for name, a in {**spec.inputs, **spec.params}.items():
        assert isinstance(a, np.ndarray), name
        assert a.dtype == (np.int64 if name in INTEGER else np.float64), (name, a.dtype)
    fields = config_fields(op.config) if op.config is not None else ()
    assert set(fields) <= set(spec.config), (spec.comment, fields)
    for k, v in spec.config.items():
        assert type(v) in (str, int, float, bool), (k, v, type(v))
    assert spec.result in ("valid", "acceptable", "invalid")
    assert "\n" not in spec.comment and spec.comment.startswith(op.name + " ")
    assert all(isinstance(f, str) for f in spec.flags)
    got = sizes(op.name, spec)
    assert got and set(got) <= set(SIZE_LIMITS), got
    if spec.result != "invalid":
        for k, v in got.items():
            assert 1 <= v <= getattr(limits, SIZE_LIMITS[k]), (spec.comment, k, v, limits)
        if op.state is not None and "stateful" in spec.flags:
            assert read_state(op, "{}0", {"inputs/" + k: v for k, v in spec.inputs.items()})


def test_every_op_has_a_generator():
    assert set(GENERATORS) == set(OPS), "an op without a strategy (or a strategy without an op)"
    assert set(INVALID) <= set(OPS)
    assert set(LAYER_OPS) <= set(INVALID), "a layer op without invalid kinds"


def _argument(kind_name):
    """The argument an invalid kind changes: ``shape_b`` -> ``b``, ``config_eps`` -> ``eps``."""
    if kind_name in KIND_ARGUMENT:
        return KIND_ARGUMENT[kind_name]
    return kind_name.split("_", 1)[1]


@pytest.mark.parametrize("op_name", OPS)
def test_examples_build(op_name):
    """(a), (b), (c), (f): drawn examples have the op's layout and refimpl builds them; an
    invalid one is rejected (regenerate raises RuntimeError if refimpl accepts it)."""
    op = get_op(op_name)

    @fast(15)
    @given(st.data())
    def prop(data):
        limits = data.draw(st.sampled_from(LIMITS))
        spec = draw_spec(op_name, data.draw, limits)
        check_structure(op, spec, limits)
        case = build(op_name, spec)
        if spec.result == "invalid":
            assert case.extra["error"], spec.comment
        else:
            assert "error" not in case.extra
            assert any(p.startswith("outputs/") for p in case.data)

    prop()


@pytest.mark.parametrize("op_name", sorted(INVALID))
def test_every_invalid_kind_is_rejected(op_name):
    """(c) each kind of invalid example, applied to drawn valid ones, is rejected by refimpl
    with a ValueError or TypeError (the message is recorded as the case's error; a layer's
    starts with the argument's name)."""
    kinds = INVALID[op_name]
    applied = dict.fromkeys(k.name for k in kinds)

    @fast(25)
    @given(st.data())
    def prop(data):
        base = GENERATORS[op_name](data.draw, Limits(), {})
        for kind in kinds:
            if not kind.applies(base, {}):
                continue
            spec = _make_invalid(copy.deepcopy(base), kind, np.random.default_rng(0))
            assert spec.result == "invalid" and "invalid:" + kind.name in spec.flags
            error = build(op_name, spec).extra["error"]
            assert error, spec.comment
            if op_name in LAYER_OPS:  # the one-line message names the argument first
                assert error.startswith(_argument(kind.name) + " "), (spec.comment, error)
            applied[kind.name] = True

    prop()
    assert all(applied.values()), f"never applicable: {[k for k, v in applied.items() if not v]}"


@pytest.mark.parametrize("op_name", ["neuron", "pmbc"])
def test_fixed_neuron_configuration(op_name):
    """(d) the fields an adapter fixes are never drawn, invalid examples included; the
    default surrogate scale stands for None; no refractory counts without a period."""
    @fast(30)
    @given(st.data())
    def prop(data):
        spec = draw_spec(op_name, data.draw, fixed=SNNTORCH_ROW)
        for k, v in SNNTORCH_ROW.items():
            want = SURROGATES["atan"].default_scale if v is None else v
            assert spec.config[k] == want, (k, spec.comment)
        if "count0" in spec.inputs and spec.result != "invalid":
            assert not spec.inputs["count0"].any()

    prop()


@pytest.mark.parametrize("op_name, fixed", [
    ("s4d_kernel", {"disc": "zoh", "L": 7}),
    ("s4d_layer", {"disc": "bilinear"}),
    ("fftconv", {"method": "toeplitz"}),
    ("batchnorm", {"training": False, "eps": 1e-3}),
    ("sdn", {"theta": 0.75, "spike_condition": "gt"}),
    ("sdn_neuron", {"surrogate": "sigmoid", "surrogate_scale": 2.0}),
])
def test_fixed_fields(op_name, fixed):
    """(d) for the other ops with a configuration."""
    @fast(12)
    @given(st.data())
    def prop(data):
        spec = draw_spec(op_name, data.draw, fixed=fixed)
        assert {k: spec.config[k] for k in fixed} == fixed, spec.comment
        if spec.result != "invalid":
            assert "error" not in build(op_name, spec).extra

    prop()


@pytest.mark.parametrize("op_name, fixed, match", [
    ("neuron", {"bogus": 1}, r"no configuration field\(s\) \['bogus'\]"),
    ("linear", {"eps": 1e-5}, "has no configuration"),
    ("s4d_kernel", {"tau": 0.5}, "'tau'"),
    ("neuron", {"reset": "soft", "u_reset": 0.5}, "fixed configuration"),
    ("neuron", {"reset": "sticky"}, "sticky"),
])
def test_bad_fixed_raises(op_name, fixed, match):
    """(d) a field the op does not have, or a fixed configuration refimpl rejects."""
    @fast(3)
    @given(st.data())
    def prop(data):
        with pytest.raises(ValueError, match=match):
            draw_spec(op_name, data.draw, fixed=fixed, invalid=False)

    prop()


def test_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op 'nope'.*neuron"):
        draw_spec("nope", None)


@pytest.mark.parametrize("field, value, match", [
    ("batch", 0, "--max-batch must be >= 1, got 0"),
    ("length", -3, "--max-length must be >= 1"),
    ("vocab", 0, "--max-vocab"),
    ("features", 0, "--max-features"),
    ("channels", 0, "--max-channels"),
    ("state", 3, "--max-state must be even"),
    ("state", 0, "--max-state"),
])
def test_limits_check(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(Limits(), **{field: value}).check()
    with pytest.raises(TypeError, match="--max-batch must be an integer"):
        Limits(batch=2.5).check()
    assert Limits().check() == Limits()


def test_invalid_false_draws_only_valid_examples():
    @fast(40)
    @given(st.data(), st.sampled_from(sorted(INVALID)))
    def prop(data, op_name):
        assert draw_spec(op_name, data.draw, invalid=False).result != "invalid"

    prop()


@pytest.mark.parametrize("op_name", [n for n in OPS if all_ops()[n].state is not None])
def test_state_false_draws_zero_state_starts(op_name, monkeypatch):
    """``state=False`` (a backend whose forward takes no state): no stateful start, valid or
    invalid (every example invalid in the second run)."""
    op = get_op(op_name)

    @fast(25)
    @given(st.data())
    def prop(data):
        spec = draw_spec(op_name, data.draw, state=False)
        assert not set(spec.inputs) & state_names(op) and "stateful" not in spec.flags
        assert spec.result == "invalid" or strategies.INVALID_ODDS > 1

    prop()
    monkeypatch.setattr(strategies, "INVALID_ODDS", 1)
    prop()


def _collect(op_name, n, limits=None, fixed=None):
    """``n`` specs of ``op_name`` drawn by a derandomized hypothesis run."""
    out = []
    limits = Limits() if limits is None else limits

    @fast(n)
    @given(st.data())
    def prop(data):
        out.append(draw_spec(op_name, data.draw, limits, fixed))

    prop()
    return out


def test_neuron_regimes_appear():
    """(e) stateful starts with a nonzero refractory count; membranes exactly at theta
    (exact dyadic cases: the neuron and PMBC agree bit for bit); near-threshold values that
    refimpl marks acceptable; invalid examples."""
    specs = _collect("neuron", 80)
    nonzero = [s for s in specs if "count0" in s.inputs and s.inputs["count0"].any()]
    assert nonzero and all(s.inputs["count0"].max() <= s.config["refractory_steps"]
                           for s in nonzero if s.result != "invalid")
    exact = [s for s in specs if s.exact]
    assert exact and all("at_threshold" in s.flags for s in exact)
    hits = 0
    for s in exact:
        neuron, pmbc = build("neuron", s), build("pmbc", s)
        assert neuron.result == "valid"
        assert np.array_equal(neuron.data["outputs/h"], pmbc.data["outputs/h"]), s.comment
        hits += int(np.any(neuron.data["outputs/h"] == s.config["theta"]))
    assert hits == len(exact)
    near = [s for s in specs if "near_threshold_values" in s.flags and s.result == "valid"]
    assert near and any(build("neuron", s).result == "acceptable" for s in near)
    assert {s.config["reset"] for s in specs} == set(RESETS)


def test_ssm_regimes_appear():
    """(e) dt at both ends of DT_RANGE, stateful S4D layers (forward only)."""
    kernels = _collect("s4d_kernel", 40)
    log_dt = np.concatenate([s.params["log_dt"] for s in kernels if s.result != "invalid"])
    assert log_dt.min() == np.log(1e-8) and log_dt.max() == np.log(100.0)
    assert any("extreme_dt" in s.flags for s in kernels)
    layers = _collect("s4d_layer", 30)
    stateful = [s for s in layers if "x0_re" in s.inputs and s.result != "invalid"]
    assert stateful and all("no_grads" in s.flags for s in stateful)
    case = build("s4d_layer", stateful[0])
    assert "outputs/x_re" in case.data and not any(p.startswith("grads/") for p in case.data)


def test_threshold_regimes_of_the_other_spiking_ops():
    """(e) the SDN neuron at theta exactly (a frozen dyadic m), the GSU at its cut."""
    sdn = [s for s in _collect("sdn_neuron", 60) if s.exact]
    assert sdn
    for s in sdn:
        v = s.inputs["m"] + s.inputs["x"]
        assert np.any(v == s.config["theta"]) and build("sdn_neuron", s).result == "valid"
    gsu = [s for s in _collect("gsu", 40) if "ternary_threshold" in s.flags]
    assert gsu and all(s.result == "acceptable" for s in gsu)


def _digest(spec):
    h = hashlib.sha256(repr((spec.comment, spec.flags, sorted(spec.config.items()),
                             spec.result, spec.exact)).encode())
    for group in (spec.inputs, spec.params):
        for k in sorted(group):
            h.update(k.encode() + np.ascontiguousarray(group[k]).tobytes())
    return h.hexdigest()


def test_deterministic():
    """The same hypothesis draws give the same examples, bit for bit."""
    for op_name in ("neuron", "sdn_neuron", "s4d_layer"):
        a = [_digest(s) for s in _collect(op_name, 10)]
        b = [_digest(s) for s in _collect(op_name, 10)]
        assert a == b


def _minimal(op_name, fails, limits, fixed=None):
    """The example hypothesis shrinks ``fails`` to (the last one it ran: the replay)."""
    seen = []

    @fast(300)
    @given(st.data())
    def prop(data):
        spec = draw_spec(op_name, data.draw, limits, fixed, invalid=False)
        if fails(spec):
            seen.append(spec)
            raise AssertionError(spec.comment)

    with pytest.raises(AssertionError):
        prop()
    return seen[-1]


def test_shrinks_to_the_smallest_failing_size():
    """A bug only at L > 1000 shrinks to L = 1001, one only for H not a multiple of 8 to
    H = 1, one only with a nonzero refractory count to one row, one step, count 1 (the
    issue's planted bugs)."""
    spec = _minimal("neuron", lambda s: s.inputs["x"].shape[2] > 1000, Limits(length=2000))
    assert spec.inputs["x"].shape == (1, 1, 1001)
    spec = _minimal("fftconv", lambda s: s.inputs["u"].shape[1] % 8 != 0, Limits())
    assert sizes("fftconv", spec) == {"B": 1, "H": 1, "L": 1}
    spec = _minimal("neuron", lambda s: "count0" in s.inputs and s.inputs["count0"].any(),
                    Limits())
    assert spec.inputs["x"].shape == (1, 1, 1) and spec.inputs["count0"].tolist() == [[1]]
    assert spec.config["refractory_steps"] == 1


def test_sizes_of_each_op():
    """(f) the keys sizes() reports per op."""
    want = {"s4d_kernel": {"H", "N", "L"}, "s4d_layer": {"B", "H", "N", "L"},
            "linear": {"B", "Hin", "Hout", "L"}, "embedding": {"B", "H", "L", "V"},
            "cross_entropy": {"B", "V"}, "lm_decoder": {"B", "H", "L", "V"}}

    @fast(1)
    @given(st.data())
    def prop(data):
        for op_name in OPS:
            spec = draw_spec(op_name, data.draw, invalid=False)
            assert set(sizes(op_name, spec)) == want.get(op_name, {"B", "H", "L"}), op_name

    prop()


def test_fixed_neuron_config_is_a_valid_neuron_config():
    """A fixed configuration refimpl accepts stays accepted (NeuronConfig validates it)."""
    specs = _collect("neuron", 10, fixed={"reset": "none", "theta": -0.5, "tau": 0.0})
    for s in specs:
        if s.result != "invalid":
            NeuronConfig(**{k: s.config[k] for k in config_fields(NeuronConfig)})
            assert s.config["theta"] == -0.5
