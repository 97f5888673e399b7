"""State in and out of the iterative neuron and PMBC (DESIGN.md section 10, issue 12).

Oracles: :func:`loop`, an independent per-row loop of the DESIGN.md section 4 recursion started
from ``(u_{-1}, count)`` (written here, not taken from the package), and :func:`jvp_loop`, its
forward-mode tangents. Tolerances:

- Chunked == whole, step by step == whole, zero state == stateless, kernel == :func:`loop`
  (hard spikes): exact (``np.array_equal``). Every step runs the same ``+ - *`` and comparisons
  in the same order on both sides (:func:`loop` uses the unified reset ``u = h (1 - a s) + b s``,
  which the module docstring of :mod:`refimpl.neurons` states is bit-identical to the kernel's
  select form).
- Smooth chunked == smooth whole: exact too (the same Numba kernel on both sides, so even the
  transcendental surrogates run the same code).
- Finite differences: central differences with one Richardson step (``gradcheck``, error
  O(EPS^4 f^(5)) ~ 1e-24 truncation and ~eps |f| / EPS ~ 1e-10 |f| rounding, f summed over
  at most 2 * 2 * 12 steps of size O(10)), compared to ``1e-7`` of the scale of the dot product.
- Dot-product test: both sides are sums of the same products taken in a different order;
  every tangent/cotangent is a chain of <= 20 steps of ~6 rounded operations, so each side is
  within ~20 * 6 * 2.2e-16 ~ 3e-14 relative of the terms' absolute sum; 1e-11 of that sum
  leaves a factor 300 for growth through ``g <= 4``.
- PMBC chunked vs the iterative neuron whole: PMBC's membrane rounding differs. Per chunk
  :func:`refimpl.pmbc.rounding_bound` (with the chunk's initial ``|u|`` in its magnitude) bounds
  PMBC's own rounding; the chunk's initial membrane error (a previous chunk's) enters only
  multiplied by ``tau^(t+1) <= 1`` or is cleared by a hard reset, so the error of the whole
  chunked run is at most the SUM of the chunks' bounds. The library's bound is itself checked
  against this file's stated tolerance ``1e-12 M / (1 - tau)`` per chunk (as
  tests/test_pmbc.py: ~4500 ulps of M), so an inflated bound cannot make the test pass.
  Spikes must agree up to the first flip of a row, and a flip may only occur where the
  iterative margin ``|h - theta_fire|`` is within that sum (flips are counted as hypothesis
  events); rows without a flip agree to the sum in ``h``, ``u`` and the end membrane, and
  exactly in the end counter.
"""
import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from gradcheck import directional_fd
from refimpl.neurons import (NeuronConfig, NeuronState, check_state, end_state, neuron_bwd,
                             neuron_fwd, neuron_step, neuron_zero_state)
from refimpl.pmbc import pmbc_bwd, pmbc_fwd, rounding_bound, spike_map
from refimpl.reference import reset_affine
from refimpl.surrogates import get_surrogate
from strategies_neurons import cotangents, neuron_configs, neuron_inputs

EPS = 1e-6  # finite-difference step


# --------------------------------------------------------------------------------------------
# Independent oracles
# --------------------------------------------------------------------------------------------


def coefficients(cfg, rho, H):
    """``(a, b (H,), drho)`` of ``u = h (1 - a s) + b s``, read off the oracle's literal
    formula of DESIGN.md section 4's table (:func:`refimpl.reference.reset_affine`)."""
    a, b, drho = reset_affine(cfg.reset, cfg.theta, cfg.u_reset, 0.0 if rho is None else rho)
    return a, np.broadcast_to(np.asarray(b, dtype=np.float64), (H,)), drho


def fires(cfg, h):
    return h > cfg.theta if cfg.spike_condition == "gt" else h >= cfg.theta


def loop(x, cfg, rho, state, G=None, mask=None, reset_spikes=None, m_fixed=None):
    """The recursion from ``state = (u_{-1}, count)`` row by row; returns
    ``(s, h, u, m, allowed, count_end)``.

    ``G``: smooth spikes ``allowed G(h - theta)``; ``mask``, ``reset_spikes``, ``m_fixed``
    freeze the refractory mask, the spikes inside reset() and ``m`` (the constants of the grad
    modes).
    """
    Bsz, H, L = x.shape
    a, b, _ = coefficients(cfg, rho, H)
    R = cfg.refractory_steps
    s, h, u, m, allowed = (np.zeros(x.shape) for _ in range(5))
    count_end = np.zeros((Bsz, H), dtype=np.int64)
    for i in range(Bsz):
        for j in range(H):
            u_prev = state[0][i, j]
            cnt = int(state[1][i, j])
            for t in range(L):
                m_t = cfg.tau * u_prev if m_fixed is None else m_fixed[i, j, t]
                h_t = m_t + x[i, j, t]
                ok = (cnt == 0) if mask is None else bool(mask[i, j, t])
                hard = ok and bool(fires(cfg, h_t))
                cnt = R if hard else max(cnt - 1, 0)
                s_t = (float(G(h_t - cfg.theta)) if ok else 0.0) if G is not None else float(hard)
                s_r = s_t if reset_spikes is None else reset_spikes[i, j, t]
                u_t = h_t * (1.0 - a * s_r) + b[j] * s_r
                s[i, j, t], h[i, j, t], u[i, j, t] = s_t, h_t, u_t
                m[i, j, t], allowed[i, j, t] = m_t, float(ok)
                u_prev = u_t
            count_end[i, j] = cnt
    return s, h, u, m, allowed, count_end


def jvp_loop(x, vx, cfg, rho, vr, s, h, allowed):
    """Forward-mode tangents ``(ds, dh, du)`` of the forward at ``(s, h, allowed)`` for the
    config's grad_mode; the initial state is a constant (zero tangent)."""
    Bsz, H, L = x.shape
    a, b, drho = coefficients(cfg, rho, H)
    g = get_surrogate(cfg.surrogate).grad(h - cfg.theta, cfg.scale) * allowed  # (B, H, L)
    ts, th, tu = (np.zeros(x.shape) for _ in range(3))
    for i in range(Bsz):
        for j in range(H):
            du_prev = 0.0
            for t in range(L):
                dm = 0.0 if cfg.grad_mode == "sltt" else cfg.tau * du_prev
                dh = dm + vx[i, j, t]
                ds = g[i, j, t] * dh
                ds_r = 0.0 if cfg.grad_mode == "detach_reset" else ds
                s_t, h_t = s[i, j, t], h[i, j, t]
                du = dh * (1.0 - a * s_t) + (b[j] - a * h_t) * ds_r
                if drho:
                    du += drho * s_t * vr[j]
                ts[i, j, t], th[i, j, t], tu[i, j, t] = ds, dh, du
                du_prev = du
    return ts, th, tu


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


@st.composite
def chunkings(draw, L, max_chunks=5):
    """Chunk lengths (>= 1) summing to ``L``, 1 .. max_chunks of them."""
    k = draw(st.integers(1, min(max_chunks, L)))
    cuts = sorted(draw(st.sets(st.integers(1, L - 1), min_size=k - 1, max_size=k - 1))) \
        if k > 1 else []
    edges = [0] + cuts + [L]
    return [e1 - e0 for e0, e1 in zip(edges[:-1], edges[1:])]


@st.composite
def states(draw, cfg, Bsz, H):
    """A random state: ``u`` around theta (either side of it), counts uniform in [0, R]."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    width = max(abs(cfg.theta), 0.5)
    u = cfg.theta + width * rng.normal(size=(Bsz, H))  # (B, H)
    count = rng.integers(0, cfg.refractory_steps + 1, size=(Bsz, H)).astype(np.int64)  # (B, H)
    return NeuronState(u, count)


@st.composite
def stream_cases(draw, lengths=None, **cfg_kw):
    cfg = draw(neuron_configs(**cfg_kw))
    kw = {} if lengths is None else {"lengths": lengths}
    x, rho = draw(neuron_inputs(cfg, **kw))
    Bsz, H, L = x.shape
    return cfg, x, rho, draw(states(cfg, Bsz, H)), draw(chunkings(L))


def split(x, chunks):
    edges = np.cumsum([0] + list(chunks))
    return [x[..., e0:e1] for e0, e1 in zip(edges[:-1], edges[1:])]


def run_chunks(x, cfg, rho, state, chunks, smooth=False):
    """``neuron_fwd`` chunk by chunk, each fed the previous chunk's end state."""
    outs = []
    for xc in split(x, chunks):
        s, h, u, state = neuron_fwd(xc, cfg, rho, smooth=smooth, state=state, return_state=True)
        outs.append((s, h, u))
    return tuple(np.concatenate(v, axis=-1) for v in zip(*outs)) + (state,)


def assert_state_equal(a, b):
    assert isinstance(a, NeuronState) and isinstance(b, NeuronState)
    assert a.count.dtype == np.int64 and b.count.dtype == np.int64
    np.testing.assert_array_equal(a.u, b.u)
    np.testing.assert_array_equal(a.count, b.count)


# --------------------------------------------------------------------------------------------
# 1, 2, 5: hard forward, chunked == step by step == whole == loop; end_state == loop's counter
# --------------------------------------------------------------------------------------------


@given(case=stream_cases())
def test_chunked_equals_whole_bit_exact(case):
    cfg, x, rho, state, chunks = case
    s0, h0, u0, end0 = neuron_fwd(x, cfg, rho, state=state, return_state=True)
    s, h, u, end = run_chunks(x, cfg, rho, state, chunks)
    for a, b in zip((s, h, u), (s0, h0, u0)):
        np.testing.assert_array_equal(a, b)
    assert_state_equal(end, end0)


@given(case=stream_cases(lengths=st.integers(1, 20)))
def test_step_by_step_equals_whole_bit_exact(case):
    cfg, x, rho, state, _ = case
    s0, h0, u0, end0 = neuron_fwd(x, cfg, rho, state=state, return_state=True)
    st_ = state
    for t in range(x.shape[-1]):
        s_t, h_t, u_t, st_ = neuron_step(x[..., t], cfg, st_, rho=rho)
        assert s_t.shape == h_t.shape == u_t.shape == x.shape[:2]
        np.testing.assert_array_equal(s_t, s0[..., t])
        np.testing.assert_array_equal(h_t, h0[..., t])
        np.testing.assert_array_equal(u_t, u0[..., t])
    assert_state_equal(st_, end0)


@given(case=stream_cases(), smooth=st.booleans())
def test_zero_state_is_the_stateless_call(case, smooth):
    cfg, x, rho, _, _ = case
    Bsz, H, _ = x.shape
    want = neuron_fwd(x, cfg, rho, smooth=smooth)
    got = neuron_fwd(x, cfg, rho, smooth=smooth, state=neuron_zero_state(Bsz, H))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    s, h, u, end = neuron_fwd(x, cfg, rho, smooth=smooth, return_state=True)
    for a, b in zip((s, h, u), want):
        np.testing.assert_array_equal(a, b)
    if not smooth:  # PMBC from the zero state is PMBC without one
        for a, b in zip(pmbc_fwd(x, cfg, rho, state=neuron_zero_state(Bsz, H)),
                        pmbc_fwd(x, cfg, rho)):
            np.testing.assert_array_equal(a, b)


@given(case=stream_cases())
def test_forward_from_a_state_equals_the_loop(case):
    """The kernel from a nonzero state == :func:`loop`, and its end state == the loop's counter
    (:func:`end_state` and ``return_state``)."""
    cfg, x, rho, state, _ = case
    s, h, u, end = neuron_fwd(x, cfg, rho, state=state, return_state=True)
    s0, h0, u0, _, _, count0 = loop(x, cfg, rho, state)
    for a, b in zip((s, h, u), (s0, h0, u0)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(end.u, u0[..., -1])
    np.testing.assert_array_equal(end.count, count0)
    assert_state_equal(end_state(s0, u0, cfg, state), end)


@given(case=stream_cases(lengths=st.integers(1, 6)), seed=st.integers(0, 2**31))
def test_end_state_counter_on_random_spike_trains(case, seed):
    """end_state on arbitrary legal trains (R-separated spikes, none blocked by count0)."""
    cfg, x, rho, state, _ = case
    R = cfg.refractory_steps
    rng = np.random.default_rng(seed)
    s = np.zeros(x.shape)  # (B, H, L)
    want = np.zeros(x.shape[:2], dtype=np.int64)  # (B, H)
    for i, j in np.ndindex(*x.shape[:2]):
        cnt = int(state.count[i, j])
        for t in range(x.shape[-1]):
            fire = cnt == 0 and rng.random() < 0.5
            s[i, j, t] = float(fire)
            cnt = R if fire else max(cnt - 1, 0)
        want[i, j] = cnt
    got = end_state(s, x, cfg, state)
    np.testing.assert_array_equal(got.count, want)
    np.testing.assert_array_equal(got.u, x[..., -1])


def test_refractory_count_blocks_the_first_steps():
    """A count c blocks exactly steps 0 .. c-1 of the next chunk, whatever the membrane."""
    cfg = NeuronConfig(reset="soft", tau=0.5, refractory_steps=3)
    x = np.full((1, 4, 6), 5.0)  # (B, H, L): far above threshold at every step
    state = NeuronState(np.zeros((1, 4)), np.arange(4, dtype=np.int64)[None])
    s, _, _, end = neuron_fwd(x, cfg, state=state, return_state=True)
    want = np.zeros((4, 6))
    for c in range(4):
        want[c, c::4] = 1.0  # first spike at step c, then every R + 1 = 4 steps
    np.testing.assert_array_equal(s[0], want)
    # last spikes at j = 4, 5, 2, 3 of L = 6: count = max(R - (L-1-j), 0)
    np.testing.assert_array_equal(end.count[0], [2, 3, 0, 1])
    s_p = pmbc_fwd(x, cfg, state=state)[0]
    np.testing.assert_array_equal(s_p[0], want)


# --------------------------------------------------------------------------------------------
# 3: smooth mode and the backward from a state
# --------------------------------------------------------------------------------------------


@given(case=stream_cases())
def test_smooth_chunked_equals_whole_bit_exact(case):
    cfg, x, rho, state, chunks = case
    s0, h0, u0, end0 = neuron_fwd(x, cfg, rho, smooth=True, state=state, return_state=True)
    s, h, u, end = run_chunks(x, cfg, rho, state, chunks, smooth=True)
    for a, b in zip((s, h, u), (s0, h0, u0)):
        np.testing.assert_array_equal(a, b)
    assert_state_equal(end, end0)
    # the smooth run's counter follows its hard spikes: the loop's counter with the same G
    # (NumPy's G may differ from Numba's by an ulp for exp/atan: compare away from theta)
    sur = get_surrogate(cfg.surrogate)
    _, h1, _, _, _, count = loop(x, cfg, rho, state, G=lambda z: sur.primitive(z, cfg.scale))
    if np.min(np.abs(h1 - cfg.theta)) > 1e-9:
        np.testing.assert_array_equal(end0.count, count)


def kink_margin(cfg, h):
    """Distance of ``h - theta`` to the points where the smooth forward is not C^2: the
    surrogate's kinks and (R > 0) the threshold, where the frozen mask would flip."""
    pts = list(get_surrogate(cfg.surrogate).kinks(cfg.scale))
    if cfg.refractory_steps > 0:
        pts.append(0.0)
    if not pts:
        return np.inf
    z = (h - cfg.theta).ravel()
    return float(np.min(np.abs(z[:, None] - np.array(pts)[None, :])))


def mode_forward(cfg, x, rho, state):
    """``f(x, rho) -> (s, h, u)``: the smooth forward from ``state`` whose plain derivative is
    the grad mode's (mask frozen; detach_reset: reset spikes frozen; sltt: ``m`` frozen)."""
    sur = get_surrogate(cfg.surrogate)

    def G(z):
        return sur.primitive(z, cfg.scale)

    s0, h0, _, m0, mask0, _ = loop(x, cfg, rho, state, G=G)
    kw = {"mask": mask0}
    if cfg.grad_mode == "detach_reset":
        kw["reset_spikes"] = s0
    if cfg.grad_mode == "sltt":
        kw["m_fixed"] = m0
    return (lambda x_, rho_: loop(x_, cfg, rho_, state, G=G, **kw)[:3]), h0


@given(case=stream_cases(lengths=st.integers(1, 12)), seed=st.integers(0, 2**31))
@settings(max_examples=20)
def test_backward_from_a_state_equals_finite_differences(case, seed):
    cfg, x, rho, state, _ = case
    f, h0 = mode_forward(cfg, x, rho, state)
    assume(kink_margin(cfg, h0) > 1e-4)
    rng = np.random.default_rng(seed)
    cots = cotangents(rng, x.shape)
    s, h, _ = neuron_fwd(x, cfg, rho, smooth=True, state=state)
    dx, drho = neuron_bwd(x, s, h, cfg, *cots, rho=rho, smooth=True, state=state)
    vx = rng.normal(size=x.shape)  # (B, H, L)
    vr = None if rho is None else rng.normal(size=rho.shape)  # (H,)

    def loss(e):
        out = f(x + e * vx, None if rho is None else rho + e * vr)
        return sum(float(np.sum(c * o)) for c, o in zip(cots, out))

    fd = directional_fd(lambda e: loss(float(e)), 0.0, 1.0, EPS)
    an = float(np.sum(dx * vx)) + (0.0 if rho is None else float(np.sum(drho * vr)))
    scale = np.sum(np.abs(dx * vx)) + (0.0 if rho is None else np.sum(np.abs(drho * vr)))
    assert abs(fd - an) <= 1e-7 * (scale + 1e-3), (fd, an, scale)


@given(case=stream_cases(lengths=st.integers(1, 20)), smooth=st.booleans(),
       seed=st.integers(0, 2**31))
def test_backward_from_a_state_dot_product(case, smooth, seed):
    """``<c, J v> == <J^T c, v>``: J v from :func:`jvp_loop` at the forward from ``state``."""
    cfg, x, rho, state, _ = case
    rng = np.random.default_rng(seed)
    cots = cotangents(rng, x.shape)
    vx = rng.normal(size=x.shape)  # (B, H, L)
    vr = None if rho is None else rng.normal(size=rho.shape)  # (H,)
    s, h, _ = neuron_fwd(x, cfg, rho, smooth=smooth, state=state)
    sur = get_surrogate(cfg.surrogate)
    G = (lambda z: sur.primitive(z, cfg.scale)) if smooth else None
    allowed = loop(x, cfg, rho, state, G=G)[4]  # the mask of the hard spikes from the state
    tangents = jvp_loop(x, vx, cfg, rho, vr, s, h, allowed)
    dx, drho = neuron_bwd(x, s, h, cfg, *cots, rho=rho, smooth=smooth, state=state)
    lhs = sum(float(np.sum(c * t)) for c, t in zip(cots, tangents))
    rhs = float(np.sum(dx * vx)) + (0.0 if rho is None else float(np.sum(drho * vr)))
    scale = (np.sum(np.abs(dx * vx)) + sum(float(np.sum(np.abs(c * t)))
                                            for c, t in zip(cots, tangents))
             + (0.0 if rho is None else np.sum(np.abs(drho * vr))))
    assert abs(lhs - rhs) <= 1e-11 * (scale + 1.0), (lhs, rhs, scale)
    # PMBC's backward forwards the state to this one
    if not smooth:
        dx_p, _ = pmbc_bwd(x, s, h, cfg, *cots, rho=rho, state=state)
        np.testing.assert_array_equal(dx_p, dx)


def test_backward_uses_the_initial_counter():
    """With a count > 0 the first steps are masked: no surrogate gradient flows there."""
    cfg = NeuronConfig(reset="soft", tau=0.5, refractory_steps=2, surrogate="sigmoid")
    x = np.full((1, 1, 4), 0.9)  # (B, H, L): near threshold, g > 0 everywhere
    state = NeuronState(np.zeros((1, 1)), np.array([[2]]))
    s, h, _ = neuron_fwd(x, cfg, state=state)
    ds = np.zeros_like(x)
    ds[..., 0] = 1.0
    dx, _ = neuron_bwd(x, s, h, cfg, ds, state=state)
    np.testing.assert_array_equal(dx, np.zeros_like(x))  # step 0 is blocked: g = 0
    dx0, _ = neuron_bwd(x, s, h, cfg, ds)
    assert dx0[0, 0, 0] > 0.0  # without the state it is not


# --------------------------------------------------------------------------------------------
# 4: PMBC chunked with state vs the iterative neuron whole
# --------------------------------------------------------------------------------------------


def stated_tol(x, cfg, rho, state):
    """This file's tolerance per chunk (module docstring): 1e-12 M / (1 - tau)."""
    c = cfg.theta + (float(np.max(rho)) if rho is not None else 0.0)
    M = (float(np.max(np.abs(x))) + abs(c) + abs(cfg.u_reset) + abs(cfg.theta)
         + float(np.max(np.abs(state.u))))
    return 1e-12 * M / (1.0 - cfg.tau)


@given(case=stream_cases(lengths=st.one_of(st.integers(1, 16), st.integers(60, 300))),
       parallel=st.booleans())
@settings(max_examples=40)
def test_pmbc_chunked_equals_neuron_whole(case, parallel):
    cfg, x, rho, state, chunks = case
    s0, h0, u0, end0 = neuron_fwd(x, cfg, rho, state=state, return_state=True)
    outs, bound, st_ = [], 0.0, state
    for xc in split(x, chunks):
        b = rounding_bound(xc, cfg, rho, state=st_)
        assert 0.0 < b <= stated_tol(xc, cfg, rho, st_)  # the library's bound is not inflated
        bound += b
        s, h, u, it, st_ = pmbc_fwd(xc, cfg, rho, parallel=parallel, state=st_,
                                    return_state=True)
        assert it.min() >= 1 and it.max() <= xc.shape[-1] + 1
        outs.append((s, h, u))
    s, h, u = (np.concatenate([o[k] for o in outs], axis=-1) for k in range(3))
    theta_fire = np.nextafter(cfg.theta, np.inf) if cfg.spike_condition == "gt" else cfg.theta
    flips = 0
    for i, j in np.ndindex(*x.shape[:2]):
        diff = np.flatnonzero(s[i, j] != s0[i, j])
        f = int(diff[0]) if diff.size else x.shape[-1]
        assert np.all(np.abs(h[i, j, :f + 1] - h0[i, j, :f + 1]) <= bound)
        assert np.all(np.abs(u[i, j, :f] - u0[i, j, :f]) <= bound)
        if diff.size:
            flips += 1
            margin = abs(h0[i, j, f] - theta_fire)
            assert margin <= bound, f"spike flipped at t={f} with margin {margin} > {bound}"
        else:
            assert st_.count[i, j] == end0.count[i, j]
            assert abs(st_.u[i, j] - end0.u[i, j]) <= bound
    event(f"rows with a flip: {flips}")


@pytest.mark.parametrize("reset", ["hard", "soft", "refractory", "none"])
def test_pmbc_state_formulas(reset):
    """DESIGN.md 10 directly: b_t = leaky(x)_t + tau^(t+1) u_{-1} (linear resets) and
    h_0 = tau u_{-1} + x_0 (hard), on inputs small enough never to spike."""
    cfg = NeuronConfig(reset=reset, tau=0.5, theta=100.0)
    rho = np.array([0.5, 0.25]) if reset == "refractory" else None
    x = np.random.default_rng(3).normal(size=(2, 2, 7))  # (B, H, L)
    u_init = np.array([[1.0, -2.0], [0.5, 3.0]])  # (B, H)
    _, h, _, _ = pmbc_fwd(x, cfg, rho, state=NeuronState(u_init, np.zeros((2, 2), np.int64)))
    want = np.zeros_like(x)
    carry = u_init.copy()
    for t in range(7):
        carry = 0.5 * carry + x[..., t]
        want[..., t] = carry
    # each value: 7 steps of 2 roundings of terms of size <= M / (1 - tau), M = max|x| + 3
    atol = 2 * 7 * np.finfo(float).eps * (np.max(np.abs(x)) + 3.0) / 0.5
    np.testing.assert_allclose(h, want, rtol=0, atol=atol)


@pytest.mark.parametrize("reset", ["hard", "soft", "none"])
def test_rounding_bound_covers_a_large_initial_membrane(reset):
    """From ``u_{-1} = -1e6`` the membrane is dominated by ``tau^(t+1) u_{-1}``, which PMBC forms
    as a product of chunk factors: its rounding scales with ``|u_{-1}|``, so the bound must
    count ``|state.u|`` (measured: error 2.3e-10, bound without the state's term 3.0e-12, with
    it 5.7e-7). No spike occurs
    (tau^100 1e6 is far below -theta), so the membranes are comparable everywhere."""
    cfg = NeuronConfig(reset=reset, tau=0.9)
    x = np.random.default_rng(5).normal(size=(2, 3, 100))  # (B, H, L)
    state = NeuronState(np.full((2, 3), -1e6), np.zeros((2, 3), np.int64))
    s0, h0, _ = neuron_fwd(x, cfg, state=state)
    s, h, _, _ = pmbc_fwd(x, cfg, state=state)
    assert not s0.any() and not s.any()
    err = float(np.max(np.abs(h - h0)))
    assert err <= rounding_bound(x, cfg, state=state)
    assert rounding_bound(x, cfg, state=state) <= stated_tol(x, cfg, None, state)


@given(case=stream_cases())
def test_spike_map_from_a_state_fixes_the_true_train(case):
    """``F(S) = S`` for the iterative neuron's train from the state (where no membrane is
    within this file's stated tolerance of the threshold), and ``F(0)`` sees the counter."""
    cfg, x, rho, state, _ = case
    s0, h0, _ = neuron_fwd(x, cfg, rho, state=state)
    assume(np.min(np.abs(h0 - cfg.theta)) > stated_tol(x, cfg, rho, state))
    np.testing.assert_array_equal(spike_map(s0, x, cfg, rho, state=state), s0)
    F0 = spike_map(np.zeros_like(x), x, cfg, rho, state=state)  # (B, H, L)
    for i, j in np.ndindex(*x.shape[:2]):
        c = int(state.count[i, j])
        assert not F0[i, j, :c].any()  # steps 0 .. count-1 are blocked


# --------------------------------------------------------------------------------------------
# 6: bad states, each a clear error naming the entry
# --------------------------------------------------------------------------------------------

CFG = NeuronConfig(reset="soft", refractory_steps=2)
GOOD_U = np.zeros((2, 3))
GOOD_C = np.zeros((2, 3), dtype=np.int64)


def _with(u=GOOD_U, count=GOOD_C):
    return NeuronState(u, count)


_nan_u = GOOD_U.copy()
_nan_u[0, 1] = np.nan
_big_c = GOOD_C.copy()
_big_c[1, 0] = 5
_neg_c = GOOD_C.copy()
_neg_c[0, 2] = -1

NOT_A_STATE = r"state must be a refimpl\.neurons\.NeuronState"
BAD_STATES = [
    (_with(u=np.zeros((3, 2))), ValueError,
     r"state\.u must have shape \(2, 3\) \(batch, channels\), got \(3, 2\)"),
    (_with(count=np.zeros((2, 3, 1), np.int64)), ValueError,
     r"state\.count must have shape \(2, 3\)"),
    (_with(count=np.zeros((2, 3))), TypeError,
     r"state\.count must be int64.*got float64.*\.astype\(np\.int64\)"),
    (_with(count=np.zeros((2, 3), bool)), TypeError, r"state\.count must be int64"),
    (_with(count=_big_c), ValueError, r"state\.count\[1, 0\] = 5 exceeds refractory_steps = 2"),
    (_with(count=_neg_c), ValueError, r"state\.count\[0, 2\] = -1 is negative"),
    (_with(u=_nan_u), ValueError, r"state\.u must be finite, got nan at \[0, 1\]"),
    (_with(u=np.zeros((2, 3), np.float32)), TypeError, r"state\.u must have dtype float64.*astype"),
    (_with(u=[[0.0] * 3] * 2), TypeError, r"state\.u must be a numpy\.ndarray"),
    ({"u": GOOD_U, "count": GOOD_C}, TypeError, NOT_A_STATE),
    ((GOOD_U, GOOD_C, GOOD_C), TypeError, NOT_A_STATE),
]

X = np.zeros((2, 3, 4))
ENTRY_POINTS = {
    "neuron_fwd": lambda st_: neuron_fwd(X, CFG, state=st_),
    "neuron_fwd_smooth": lambda st_: neuron_fwd(X, CFG, smooth=True, state=st_),
    "neuron_bwd": lambda st_: neuron_bwd(X, X, X, CFG, X, state=st_),
    "neuron_step": lambda st_: neuron_step(X[..., 0], CFG, st_),
    "end_state": lambda st_: end_state(X, X, CFG, st_),
    "pmbc_fwd": lambda st_: pmbc_fwd(X, CFG, state=st_),
    "pmbc_bwd": lambda st_: pmbc_bwd(X, X, X, CFG, X, state=st_),
    "spike_map": lambda st_: spike_map(X, X, CFG, state=st_),
    "rounding_bound": lambda st_: rounding_bound(X, CFG, state=st_),
    "check_state": lambda st_: check_state(st_, CFG, 2, 3),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("state, err, match", BAD_STATES)
def test_bad_state_is_a_clear_error(entry, state, err, match):
    with pytest.raises(err, match=match):
        ENTRY_POINTS[entry](state)


def test_check_state_names_the_entry_and_normalises():
    with pytest.raises(ValueError, match=r"layer0\.u must be finite"):
        check_state(_with(u=_nan_u), CFG, 2, 3, name="layer0")
    c32 = np.ones((2, 3), dtype=np.int32)
    u_f = np.asfortranarray(np.ones((2, 3)))
    st_ = check_state((u_f, c32), CFG, 2, 3)  # a plain tuple, int32 (lossless), Fortran order
    assert isinstance(st_, NeuronState)
    assert st_.count.dtype == np.int64 and st_.u.flags.c_contiguous
    np.testing.assert_array_equal(st_.count, c32)
    z = neuron_zero_state(2, 3)
    assert z.u.dtype == np.float64 and z.count.dtype == np.int64
    assert not z.u.any() and not z.count.any()
    with pytest.raises(ValueError, match="exceeds refractory_steps = 0"):
        check_state(_with(count=np.ones((2, 3), np.int64)), NeuronConfig(), 2, 3)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        neuron_fwd(X, CFG, return_state=1)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        pmbc_fwd(X, CFG, return_state="yes")


def test_step_accepts_no_state_and_checks_x_t():
    s, h, u, st_ = neuron_step(np.full((2, 3), 2.0), CFG, None)
    np.testing.assert_array_equal(s, np.ones((2, 3)))
    np.testing.assert_array_equal(st_.count, np.full((2, 3), 2))
    with pytest.raises(ValueError, match=r"x_t must have rank 2"):
        neuron_step(np.zeros((2, 3, 1)), CFG, st_)
