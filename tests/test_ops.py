"""The op contract (refimpl.ops, DESIGN.md section 12), checked on every registered op.

Each test walks :func:`refimpl.ops.all_ops` and runs on every example an op declares, so a new
op (the toy op of :mod:`toy_op`, registered by this test module, stands for it) gets all of
these without new test code:

- structure: ``fwd`` returns a :class:`~refimpl.ops.Result` with exactly the declared outputs,
  a named cache, the op's state type (None when stateless); ``vjp`` returns exactly the
  gradients of the differentiable inputs and parameters given, in their shapes; a missing
  cotangent equals a zero one; the forward leaves its arguments unchanged;
- finite differences: every gradient, coordinate by coordinate on a few coordinates, against
  central differences of ``<w, fwd>`` (the smooth forward for a spiking op);
- a dot-product test: ``<vjp(w), v>`` against the directional difference of ``<w, fwd>`` along
  one random direction ``v`` of every argument at once;
- the float32 variant within the float32 form of the golden tolerance model;
- chunked = whole (hypothesis draws the chunk boundaries) for every op with a state.
"""
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import toy_op  # noqa: F401  (registers the toy op)
from gradcheck import assert_close_scalar, directional_fd
from refimpl import precision
from refimpl.golden.generate import SAFETY
from refimpl.ops import Result, all_ops, run_chunks

OPS = all_ops()
EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)


def examples(op):
    """The op's examples, from a generator seeded by its name (the same on every run)."""
    return op.examples(np.random.default_rng(zlib.crc32(op.name.encode())))


CASES = [pytest.param(name, i, id=f"{name}-{i}")
         for name, op in OPS.items() for i in range(len(examples(op)))]


def case(name, i):
    op = OPS[name]
    return op, examples(op)[i]


def is_float(a):
    return np.asarray(a).dtype.kind == "f"


def random_cotangents(op, outputs, rng):
    return {k: rng.normal(size=np.shape(outputs[k])) for k in op.differentiable}


def grad_names(op, ex):
    """The gradients the VJP must return: differentiable inputs and parameters given."""
    return [n for n in op.grads if n in ex.inputs or n in ex.params]


def split(op, ex, args):
    """``args`` ({name: array} over inputs and params) back into ``(inputs, params)``."""
    inputs = {k: args.get(k, v) for k, v in ex.inputs.items()}
    params = {k: args.get(k, v) for k, v in ex.params.items()}
    return inputs, params


def inner(op, outputs, cot):
    return sum(float(np.sum(outputs[k] * cot[k])) for k in cot)


def vjp_exact(op, ex):
    return op.exact_vjp is None or op.exact_vjp(ex.inputs, ex.params, ex.cfg)


def grad_state(op, ex):
    """The initial state of the gradient checks: the example's, unless the op's VJP from a
    nonzero state is not implemented (``vjp_from_state=False``; its forward from the state is
    still checked, by test_structure and test_chunked_equals_whole)."""
    return ex.state if op.vjp_from_state else None


def copy(d):
    return {k: np.array(v, copy=True) for k, v in d.items()}


def test_every_op_has_examples_and_the_registry_lists_the_toy_op():
    assert "toy_leaky" in OPS
    for name, op in OPS.items():
        assert examples(op), f"{name} declares no example"
        names = op.inputs + op.params
        assert len(set(names)) == len(names), f"{name}: a name is both input and parameter"


@pytest.mark.parametrize("name,i", CASES)
def test_structure(name, i):
    op, ex = case(name, i)
    before = (copy(ex.inputs), copy(ex.params))
    res = op.fwd(ex.inputs, ex.params, ex.cfg, ex.state)
    assert isinstance(res, Result)
    assert set(res.outputs) == set(op.outputs), name
    for k, v in res.outputs.items():
        assert isinstance(v, np.ndarray), f"{name}.{k} is {type(v).__name__}"
    # a named record: a NamedTuple (or dataclass) whose fields are read by name
    assert hasattr(res.cache, "_fields") or hasattr(res.cache, "__dataclass_fields__"), \
        f"{name}: the cache is a {type(res.cache).__name__}, not a named record"
    if op.state is None:
        assert res.state is None
    else:
        assert isinstance(res.state, op.state), f"{name}: end state {type(res.state).__name__}"
        # end_state=False: the same outputs, no end state computed
        lean = op.fwd(ex.inputs, ex.params, ex.cfg, ex.state, end_state=False)
        assert lean.state is None, name
        for k in op.outputs:
            np.testing.assert_array_equal(lean.outputs[k], res.outputs[k], err_msg=name)
    for group, b, a in (("inputs", before[0], ex.inputs), ("params", before[1], ex.params)):
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} changed {group}/{k}")
    if grad_state(op, ex) is not ex.state:
        res = op.fwd(ex.inputs, ex.params, ex.cfg, None)
    rng = np.random.default_rng(1)
    cot = random_cotangents(op, res.outputs, rng)
    grads = op.vjp(res.cache, cot)
    assert set(grads) == set(grad_names(op, ex)), name
    for k, g in grads.items():
        ref = ex.inputs.get(k, ex.params.get(k))
        assert np.shape(g) == np.shape(ref), f"{name}: d{k} shape {np.shape(g)}"
    # a missing cotangent is zero: drop each in turn
    for drop in op.differentiable:
        part = {k: v for k, v in cot.items() if k != drop}
        zero = {**part, drop: np.zeros_like(cot[drop])}
        g1, g0 = op.vjp(res.cache, part), op.vjp(res.cache, zero)
        for k in g0:
            np.testing.assert_array_equal(g1[k], g0[k], err_msg=f"{name}: d{k} without {drop}")


def _objective(op, ex, cot):
    fwd = op.smooth or op.fwd

    def f(args):
        inputs, params = split(op, ex, args)
        return inner(op, fwd(inputs, params, ex.cfg, grad_state(op, ex)).outputs, cot)

    return f


def _gradients(op, ex, cot):
    fwd = op.smooth or op.fwd
    return op.vjp(fwd(ex.inputs, ex.params, ex.cfg, grad_state(op, ex)).cache, cot)


def _gradient_check(op, ex, rng):
    """What both gradient checks need: ``f(args)`` = ``<w, (smooth) fwd>`` for random
    cotangents ``w``, the VJP's gradients, the arguments by name, and the scale of the
    objective's terms (``sum |outputs w|``, the atol scale of the comparisons)."""
    outputs = (op.smooth or op.fwd)(ex.inputs, ex.params, ex.cfg, grad_state(op, ex)).outputs
    cot = random_cotangents(op, outputs, rng)
    scale = sum(float(np.sum(np.abs(outputs[k] * cot[k]))) for k in cot) + 1e-3
    return (_objective(op, ex, cot), _gradients(op, ex, cot), {**ex.inputs, **ex.params},
            scale)


EXACT = [c for c in CASES if vjp_exact(*case(*c.values))]


@pytest.mark.parametrize("name,i", EXACT)
def test_finite_differences(name, i):
    """Each gradient on up to 4 coordinates against a central difference with one Richardson
    step (step 1e-5: truncation O(h^4) ~ 1e-20 times the 5th derivative, rounding ~ 1e-16 |f|
    / 1e-5 = 1e-11 relative); rtol 1e-6 leaves room for the surrogates' curvature."""
    op, ex = case(name, i)
    rng = np.random.default_rng(2)
    f, grads, base, scale = _gradient_check(op, ex, rng)
    for k in grad_names(op, ex):
        a = base[k]
        flat = rng.choice(a.size, size=min(4, a.size), replace=False)
        for j in flat:
            e = np.zeros(a.shape)
            e.flat[j] = 1.0
            fd = directional_fd(lambda v, k=k: f({k: v}), a, e, eps=1e-5)
            assert_close_scalar(float(grads[k].flat[j]), fd, 1e-6, scale,
                                f"{name}: d{k}[{j}]")


@pytest.mark.parametrize("name,i", EXACT)
def test_dot_product(name, i):
    """``<vjp(w), v> = d/de <w, fwd(args + e v)>`` along one random direction of every
    differentiable argument at once (tolerance as in test_finite_differences)."""
    op, ex = case(name, i)
    rng = np.random.default_rng(3)
    f, grads, base, scale = _gradient_check(op, ex, rng)
    names = grad_names(op, ex)
    v = {k: rng.normal(size=np.shape(base[k])) for k in names}
    at = {k: base[k] for k in names}

    def along(e):
        return f({k: at[k] + e * v[k] for k in names})

    fd = directional_fd(along, 0.0, 1.0, eps=1e-5)
    vjp = sum(float(np.sum(grads[k] * v[k])) for k in names)
    assert_close_scalar(vjp, fd, 1e-6, scale, f"{name}: dot product")


FLOAT32 = [c for c in CASES if OPS[c.values[0]].float32]


def r32(d):
    return {k: (np.asarray(v).astype(np.float32) if is_float(v) else v) for k, v in d.items()}


def up(d):
    return {k: (np.asarray(v).astype(np.float64) if is_float(v) else v) for k, v in d.items()}


def lookup(depth, key):
    return depth.get(key, depth["*"])


def bound(op, eps, depth, scales, key, ref):
    """``SAFETY depth eps scale`` for output or gradient ``key`` (scale: the op's, else
    ``max |T|``)."""
    scale = scales.get(key, float(np.max(np.abs(ref), initial=0.0)))
    return SAFETY * lookup(depth, key) * eps * scale


@pytest.mark.parametrize("name,i", FLOAT32)
def test_float32_within_its_bound(name, i):
    """The float32 variant on float32-representable arguments against float64 on the same
    values: every output and gradient within ``SAFETY depth eps32 max|T64|``, the float32 form
    of the golden tolerance model (DESIGN.md 9: a chain of ``depth`` dependent roundings of
    terms at most the tensor's scale; SAFETY = 16 as in the golden files). Spikes equal: the
    examples are fixed and drawn from continuous distributions, and a membrane within the
    float32 bound (~1e-5) of its threshold has probability ~1e-3 over all of them, so a
    flip here is a finding to look at, not noise. States are float64 only, so both runs start
    from the zero state."""
    op, ex = case(name, i)
    i32, p32 = r32(ex.inputs), r32(ex.params)
    res64 = op.fwd(up(i32), up(p32), ex.cfg, None)
    with precision.using("float32"):
        res32 = op.fwd(i32, p32, ex.cfg, None)
    depth = op.depth(up(i32), up(p32), ex.cfg)
    rng = np.random.default_rng(4)
    cot = r32(random_cotangents(op, res64.outputs, rng))
    scales = op.scales(up(i32), up(p32), ex.cfg, up(cot)) if op.scales else {}
    for k in op.outputs:
        got, ref = res32.outputs[k], res64.outputs[k]
        if is_float(ref):
            assert got.dtype == np.float32, f"{name}.{k} is {got.dtype} under float32"
        if k in op.spikes:
            np.testing.assert_array_equal(got, ref, err_msg=f"{name}.{k}: a spike flipped")
            continue
        b = bound(op, EPS32, depth, scales, k, ref)
        err = float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0))
        assert err <= b, f"{name}.{k}: float32 error {err:.3e} > bound {b:.3e}"
    g64 = op.vjp(res64.cache, up(cot))
    with precision.using("float32"):
        g32 = op.vjp(res32.cache, cot)
    for k, ref in g64.items():
        got = g32[k]
        assert got.dtype == np.float32, f"{name}: d{k} is {got.dtype} under float32"
        b = bound(op, EPS32, depth, scales, "d" + k, ref)
        err = float(np.max(np.abs(got.astype(np.float64) - ref), initial=0.0))
        assert err <= b, f"{name}: d{k} float32 error {err:.3e} > bound {b:.3e}"


STATEFUL = [c for c in CASES if OPS[c.values[0]].state is not None]


@pytest.mark.parametrize("name,i", STATEFUL)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_chunked_equals_whole(name, i, data):
    """Run in chunks, each from the previous end state, the outputs and the end state equal
    the whole run's within ``SAFETY depth eps64 max|T|`` (bit for bit where the op says so:
    the chunked recursions add the same terms in the same order); spikes equal."""
    op, ex = case(name, i)
    whole = op.fwd(ex.inputs, ex.params, ex.cfg, ex.state)
    axis_name = next(k for k in op.time if k in ex.inputs)
    L = np.shape(ex.inputs[axis_name])[op.time[axis_name]]
    cuts = data.draw(st.lists(st.integers(1, L - 1), max_size=4, unique=True), label="cuts")
    bounds = [0, *sorted(cuts), L]
    out, end = run_chunks(op, ex.inputs, ex.params, ex.cfg, bounds, ex.state)
    depth = op.depth(ex.inputs, ex.params, ex.cfg)
    scales = op.scales(ex.inputs, ex.params, ex.cfg, {}) if op.scales else {}
    for k in (k for k in op.outputs if k in op.time):  # a per-call count has no time axis
        ref = whole.outputs[k]
        if k in op.spikes:
            np.testing.assert_array_equal(out[k], ref, err_msg=f"{name}.{k} chunked {bounds}")
            continue
        np.testing.assert_allclose(out[k], ref, rtol=0,
                                   atol=bound(op, EPS64, depth, scales, k, ref),
                                   err_msg=f"{name}.{k} chunked {bounds}")
    for field, a, b in zip(op.state._fields, end, whole.state):
        scale = float(np.max(np.abs(b), initial=0.0))
        np.testing.assert_allclose(a, b, rtol=0, atol=SAFETY * max(depth.values()) * EPS64 * scale,
                                   err_msg=f"{name}: end state {field}, chunks {bounds}")
