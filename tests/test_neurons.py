"""Iterative neurons: forward == naive loops, properties, backward by finite differences, errors.

Tolerances: the kernel and the naive loops perform the same floating-point operations, so
forwards are compared for exact equality wherever they involve only ``+ - * /`` and comparisons
(hard spikes, and smooth spikes through the arithmetic surrogates triangle, rectangle and
fast_sigmoid). Smooth spikes through ``sigmoid`` / ``atan`` call ``exp`` / ``atan``: the kernel
and the oracle both run the one Numba scalar formula of :mod:`refimpl.surrogates`, but compiled
into different loops, and a vectorising build (Numba with SVML) or a NumPy oracle would differ
by an ulp in a few % of values (issue 11: AVX-512 NumPy vs libm). Those are compared to
``1e-12`` times the size of the membrane's terms (:func:`assert_forward_equal`): ~4500 ulps, room
for a few ulps of ``G`` amplified by the recurrence, far below any real error (O(theta)).
Checked with ``NUMBA_CPU_NAME=generic`` + ``NPY_DISABLE_CPU_FEATURES`` and with
``REFIMPL_TEST_ULP_JITTER=1`` (``tests/conftest.py``). Finite differences (central, eps = 1e-6,
on the smooth forward) are compared with the hand-written backward to 1e-7 relative to the
scale of the dot product; forward-mode tangents (naive JVP) with reverse mode (kernel VJP) to
1e-11.
"""
import dataclasses
import math
import zlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from naive import neuron_jvp_naive
from refimpl import neurons
from refimpl.reference import neuron_trace
from refimpl.neurons import (GRAD_MODES, RESETS, NeuronConfig, neuron_bwd, neuron_fwd,
                             threshold_scale_bwd, threshold_scale_fwd)
from refimpl.surrogates import SURROGATES, get_surrogate
from strategies_neurons import cotangents, neuron_configs, neuron_inputs

EPS = 1e-6  # finite-difference step


def naive(x, cfg, rho=None, smooth=False, **kw):
    """The naive oracle for a config, :func:`refimpl.reference.neuron_trace`: returns
    ``(s, h, u, m, allowed)``."""
    G = None
    if smooth:
        sur = get_surrogate(cfg.surrogate)
        G = lambda z: sur.primitive(z, cfg.scale)  # noqa: E731
    return neuron_trace(x, cfg.tau, cfg.theta, cfg.reset, cfg.u_reset, rho,
                        cfg.refractory_steps, cfg.spike_condition, G=G, **kw)


#: Surrogates whose g / G evaluate a transcendental function (exp, atan).
TRANSCENDENTAL = ("sigmoid", "atan")


def assert_forward_equal(got, want, cfg, x, rho=None, smooth=False):
    """``(s, h, u)`` of the kernel == the oracle's: exactly, or to 1e-12 of the membrane's term
    size where smooth spikes go through exp / atan (module docstring)."""
    if smooth and cfg.surrogate in TRANSCENDENTAL:
        c = abs(cfg.theta) + abs(cfg.u_reset) + (float(np.max(rho)) if rho is not None else 0.0)
        tol = 1e-12 * (1.0 + c + float(np.max(np.abs(x), initial=0.0)))
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=tol)
    else:
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def surrogate_fn(cfg):
    sur = get_surrogate(cfg.surrogate)
    return lambda z: float(sur.grad(z, cfg.scale))


def kink_margin(cfg, h):
    """Distance of ``h - theta`` to the points where the smooth forward is not C^2.

    The surrogate's kinks, and (with a refractory period) the threshold itself, where the hard
    spike that drives the constant mask flips.
    """
    z = (h - cfg.theta).ravel()
    pts = list(get_surrogate(cfg.surrogate).kinks(cfg.scale))
    if cfg.refractory_steps > 0:
        pts.append(0.0)
    if not pts:
        return np.inf
    return float(np.min(np.abs(z[:, None] - np.array(pts)[None, :])))


def dot(a, b):
    return float(np.sum(a * b))


# --------------------------------------------------------------------------------------------
# Forward: kernel == naive loops (exact)
# --------------------------------------------------------------------------------------------


@given(data=st.data(), smooth=st.booleans())
def test_forward_equals_naive(data, smooth):
    cfg = data.draw(neuron_configs())
    x, rho = data.draw(neuron_inputs(cfg, max_B=2, max_H=3))
    s, h, u = neuron_fwd(x, cfg, rho, smooth=smooth)
    s0, h0, u0, _, _ = naive(x, cfg, rho, smooth=smooth)
    assert s.dtype == h.dtype == u.dtype == np.float64
    assert s.shape == h.shape == u.shape == x.shape
    assert_forward_equal((s, h, u), (s0, h0, u0), cfg, x, rho, smooth)


@given(data=st.data())
def test_forward_equals_naive_with_ties(data):
    """Dyadic inputs make ``h == theta`` happen: ge and gt then differ exactly as in the loops."""
    cfg = data.draw(neuron_configs(quantized=True))
    x, rho = data.draw(neuron_inputs(cfg, quantized=True))
    s, h, u = neuron_fwd(x, cfg, rho)
    s0, h0, u0, _, _ = naive(x, cfg, rho)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_array_equal(u, u0)


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("R", [0, 2])
def test_grouped_rows_equal_naive_on_long_rows(reset, R):
    """Many rows (groups of four plus leftovers) and L well past the grouping threshold."""
    rng = np.random.default_rng(7)
    x = rng.normal(0.4, 1.0, size=(3, 3, 150))  # 9 rows: two groups of 4 and one leftover
    cfg = NeuronConfig(reset=reset, tau=0.7, refractory_steps=R,
                       u_reset=-0.2 if RESETS[reset].u_reset else 0.0)
    rho = rng.uniform(0, 1, 3) if RESETS[reset].param else None
    s, h, u = neuron_fwd(x, cfg, rho)
    s0, h0, u0, _, _ = naive(x, cfg, rho)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_array_equal(u, u0)
    assert 0 < s.mean() < 1


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("cond", ["ge", "gt"])
@pytest.mark.parametrize("R", [0, 2])
@pytest.mark.parametrize("reset", list(RESETS))
def test_every_option_combination_equals_naive(reset, R, cond, smooth):
    rng = np.random.default_rng(12)
    x = np.round(rng.normal(0.5, 1.0, size=(2, 3, 61)) * 8) / 8  # (B, H, L) with exact ties
    cfg = NeuronConfig(reset=reset, tau=0.5, refractory_steps=R, spike_condition=cond,
                       surrogate="atan", u_reset=0.25 if RESETS[reset].u_reset else 0.0)
    rho = np.array([0.0, 0.5, 1.25]) if RESETS[reset].param else None
    got, want = neuron_fwd(x, cfg, rho, smooth=smooth), naive(x, cfg, rho, smooth=smooth)[:3]
    assert_forward_equal(got, want, cfg, x, rho, smooth)


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("R", [0, 3])
def test_long_sequences_equal_naive(reset, R):
    rng = np.random.default_rng(13)
    x = rng.normal(0.3, 1.0, size=(2, 5, 5000))  # (B, H, L)
    cfg = NeuronConfig(reset=reset, tau=0.9, refractory_steps=R, theta=1.5)
    rho = rng.uniform(0, 1, 5) if RESETS[reset].param else None
    for a, b in zip(neuron_fwd(x, cfg, rho), naive(x, cfg, rho)):
        np.testing.assert_array_equal(a, b)


def test_ge_and_gt_differ_exactly_at_the_threshold():
    x = np.array([[[1.0, 0.0, 0.5, 0.75]]])  # ge: h = 1 (spike, reset to 0), 0, 0.5, 1 (spike)
    s_ge, _, _ = neuron_fwd(x, NeuronConfig(reset="hard", tau=0.5, spike_condition="ge"))
    s_gt, h_gt, _ = neuron_fwd(x, NeuronConfig(reset="hard", tau=0.5, spike_condition="gt"))
    np.testing.assert_array_equal(s_ge[0, 0], [1, 0, 0, 1])
    np.testing.assert_array_equal(h_gt[0, 0], [1.0, 0.5, 0.75, 1.125])
    np.testing.assert_array_equal(s_gt[0, 0], [0, 0, 0, 1])


def test_states_start_at_zero_and_rows_are_independent():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 20))
    cfg = NeuronConfig(reset="soft", tau=0.6)
    s, h, u = neuron_fwd(x, cfg)
    np.testing.assert_array_equal(h[..., 0], x[..., 0])  # m_0 = tau u_{-1} = 0
    s1, h1, _ = neuron_fwd(x[1:2, 2:3].copy(), cfg)
    np.testing.assert_array_equal(h1, h[1:2, 2:3])


def test_non_contiguous_input_is_accepted():
    rng = np.random.default_rng(2)
    x = np.asfortranarray(rng.normal(size=(2, 3, 60)))
    cfg = NeuronConfig()
    for a, b in zip(neuron_fwd(x, cfg), neuron_fwd(np.ascontiguousarray(x), cfg)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# Forward properties
# --------------------------------------------------------------------------------------------


@given(data=st.data())
def test_memoryless_heaviside(data):
    """``tau = 0, reset = none, theta = 0`` is the plain Heaviside of Binary S4D."""
    x, _ = data.draw(neuron_inputs(NeuronConfig(reset="none"), quantized=True))
    for cond, expect in (("ge", x >= 0), ("gt", x > 0)):
        cfg = NeuronConfig(reset="none", tau=0.0, theta=0.0, spike_condition=cond)
        s, h, u = neuron_fwd(x, cfg)
        np.testing.assert_array_equal(s, expect.astype(np.float64))
        np.testing.assert_array_equal(h, x)
        np.testing.assert_array_equal(u, x)


def _scaled_pair(cfg, x, rho, theta):
    """``neuron(x; theta)`` and ``neuron(x / theta; 1)`` (rho and u_reset scaled likewise)."""
    a = neuron_fwd(x, cfg.replace(theta=theta, u_reset=cfg.u_reset * theta),
                   None if rho is None else rho * theta)
    b = neuron_fwd(x / theta, cfg.replace(theta=1.0), rho)
    return a, b


@given(data=st.data(), k=st.integers(-3, 3))
def test_threshold_scaling_is_exact_for_powers_of_two(data, k):
    """Scaling by 2^k commutes with every rounding: spikes and membranes agree bit for bit."""
    cfg = data.draw(neuron_configs(resets=("hard", "soft", "refractory", "none")))
    cfg = cfg.replace(theta=1.0)
    x, rho = data.draw(neuron_inputs(cfg))
    theta = 2.0**k
    (s1, h1, u1), (s2, h2, u2) = _scaled_pair(cfg, x, rho, theta)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(h1, h2 * theta)
    np.testing.assert_array_equal(u1, u2 * theta)


@given(data=st.data(), theta=st.floats(0.05, 20.0))
def test_threshold_scaling_spike_for_spike(data, theta):
    """``neuron(x; theta) == neuron(x / theta; 1)`` for hard (u_reset = 0), soft, refractory, none.

    Any theta: the two runs round differently, so spikes must agree wherever the margin
    ``|h - theta| / theta`` exceeds a rounding bound; below it the case is skipped (``assume``).
    """
    cfg = data.draw(neuron_configs(resets=("hard", "soft", "refractory", "none")))
    cfg = cfg.replace(theta=1.0, u_reset=0.0)
    x, rho = data.draw(neuron_inputs(cfg))
    (s1, h1, _), (s2, h2, _) = _scaled_pair(cfg, x, rho, theta)
    bound = 1e-10 * (1.0 + np.max(np.abs(h2)))
    assume(np.min(np.abs(h1 / theta - 1.0)) > bound)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_allclose(h1 / theta, h2, rtol=1e-12, atol=1e-12 * np.max(np.abs(h2)))


@pytest.mark.parametrize("R", [0, 1, 3])
@pytest.mark.parametrize("reset", ["hard", "soft", "refractory", "none"])
def test_refractory_period_blocks_exactly_R_steps(reset, R):
    """Strong constant drive: spikes at 0, R+1, 2(R+1), ...; blocked steps integrate, no reset."""
    L = 12
    x = np.full((1, 1, L), 5.0)
    cfg = NeuronConfig(reset=reset, tau=0.5, refractory_steps=R)
    rho = np.array([0.25]) if RESETS[reset].param else None
    s, h, u = neuron_fwd(x, cfg, rho)
    expect = np.zeros(L)
    expect[::R + 1] = 1.0
    np.testing.assert_array_equal(s[0, 0], expect)
    blocked = s[0, 0] == 0
    np.testing.assert_array_equal(u[0, 0][blocked], h[0, 0][blocked])  # no reset while blocked


def test_resets_match_design_table():
    x = np.array([[[1.5, 0.25]]])
    rho = np.array([0.5])
    for reset, u0 in (("hard", -0.25), ("soft", 0.5), ("refractory", 0.0), ("none", 1.5)):
        cfg = NeuronConfig(reset=reset, tau=0.5, theta=1.0,
                           u_reset=-0.25 if RESETS[reset].u_reset else 0.0)
        s, h, u = neuron_fwd(x, cfg, rho if RESETS[reset].param else None)
        assert s[0, 0, 0] == 1.0 and h[0, 0, 0] == 1.5 and u[0, 0, 0] == u0
        assert h[0, 0, 1] == 0.5 * u0 + 0.25


# --------------------------------------------------------------------------------------------
# Backward: finite differences of the smooth forward (the correctness test of every mode)
# --------------------------------------------------------------------------------------------


def _mode_forward(cfg, x, rho):
    """``f(x, rho) -> (s, h, u)``: the smooth forward whose plain derivative is cfg.grad_mode's.

    ``bptt``: the smooth forward itself; ``detach_reset``: the spikes inside reset() frozen at
    the base run's values; ``sltt``: ``m_t`` frozen at the base run's values. The refractory
    mask is frozen in all three (it is a constant by definition).
    """
    s0, h0, u0, m0, mask0 = naive(x, cfg, rho, smooth=True)
    kw = {"mask": mask0}
    if cfg.grad_mode == "detach_reset":
        kw["reset_spikes"] = s0
    if cfg.grad_mode == "sltt":
        kw["m_fixed"] = m0
    return (lambda x_, rho_: naive(x_, cfg, rho_, smooth=True, **kw)[:3]), h0


def _check_fd(cfg, x, rho, rng, directions=2):
    f, h0 = _mode_forward(cfg, x, rho)
    cots = cotangents(rng, x.shape)
    s, h, u = neuron_fwd(x, cfg, rho, smooth=True)
    dx, drho = neuron_bwd(x, s, h, cfg, *cots, rho=rho, smooth=True)
    assert (drho is None) == (cfg.reset_rule.param is None)
    for _ in range(directions):
        vx = rng.normal(size=x.shape)
        vr = None if rho is None else rng.normal(size=rho.shape)
        plus = f(x + EPS * vx, None if rho is None else rho + EPS * vr)
        minus = f(x - EPS * vx, None if rho is None else rho - EPS * vr)
        fd = sum(dot(c, p - m) for c, p, m in zip(cots, plus, minus)) / (2 * EPS)
        an = dot(dx, vx) + (0.0 if rho is None else dot(drho, vr))
        scale = np.sum(np.abs(dx * vx)) + (0.0 if rho is None else np.sum(np.abs(drho * vr)))
        assert abs(fd - an) <= 1e-7 * (scale + 1e-3), (fd, an, scale)


def _random_case(rng, reset, grad_mode, surrogate):
    """A config with random tau, theta, R, condition, scale, and an input away from the kinks."""
    for _ in range(100):
        cfg = NeuronConfig(
            reset=reset, grad_mode=grad_mode, surrogate=surrogate,
            tau=float(rng.choice([0.0, 0.3, 0.5, 0.9])),
            theta=float(rng.uniform(0.3, 1.5) if RESETS[reset].theta_positive
                        else rng.uniform(-1, 1)),
            u_reset=float(rng.uniform(-0.5, 0.3)) if RESETS[reset].u_reset else 0.0,
            refractory_steps=int(rng.integers(0, 3)),
            spike_condition=str(rng.choice(["ge", "gt"])),
            surrogate_scale=None if rng.random() < 0.5 else float(rng.uniform(0.5, 3.0)),
        )
        H = int(rng.integers(1, 3))
        x = rng.normal(0.5, 1.0, size=(2, H, int(rng.integers(3, 14))))  # (B, H, L)
        rho = rng.uniform(0.0, 1.0, size=H) if RESETS[reset].param else None
        _, h, _, _, _ = naive(x, cfg, rho, smooth=True)
        if kink_margin(cfg, h) > 1e-4:
            return cfg, x, rho
    raise AssertionError("no case away from the kinks")


@pytest.mark.parametrize("surrogate", list(SURROGATES))
@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
@pytest.mark.parametrize("reset", list(RESETS))
def test_backward_equals_finite_differences(reset, grad_mode, surrogate):
    """Every reset x grad_mode x surrogate: FD of the mode's smooth forward == neuron_bwd."""
    rng = np.random.default_rng(zlib.crc32(f"{reset}/{grad_mode}/{surrogate}".encode()))
    for _ in range(3):
        cfg, x, rho = _random_case(rng, reset, grad_mode, surrogate)
        _check_fd(cfg, x, rho, rng)


@given(data=st.data())
def test_backward_equals_finite_differences_hypothesis(data):
    cfg = data.draw(neuron_configs())
    x, rho = data.draw(neuron_inputs(cfg, max_B=2, max_H=2, lengths=st.integers(1, 12)))
    _, h, _, _, _ = naive(x, cfg, rho, smooth=True)
    assume(kink_margin(cfg, h) > 1e-4)
    _check_fd(cfg, x, rho, np.random.default_rng(data.draw(st.integers(0, 2**31))))


@pytest.mark.parametrize("reset", list(RESETS))
def test_bptt_equals_finite_differences_of_the_kernel(reset):
    """The smooth *kernel* forward (not the naive loops), differentiated as it is."""
    rng = np.random.default_rng(11)
    cfg, x, rho = _random_case(rng, reset, "bptt", "sigmoid")
    cfg = cfg.replace(refractory_steps=0)
    cots = cotangents(rng, x.shape)
    s, h, u = neuron_fwd(x, cfg, rho, smooth=True)
    dx, drho = neuron_bwd(x, s, h, cfg, *cots, rho=rho, smooth=True)
    vx = rng.normal(size=x.shape)
    vr = None if rho is None else rng.normal(size=rho.shape)

    def at(e):
        return neuron_fwd(x + e * vx, cfg, None if rho is None else rho + e * vr, smooth=True)

    plus, minus = at(EPS), at(-EPS)
    fd = sum(dot(c, p - m) for c, p, m in zip(cots, plus, minus)) / (2 * EPS)
    an = dot(dx, vx) + (0.0 if rho is None else dot(drho, vr))
    assert fd == pytest.approx(an, rel=1e-7, abs=1e-9)


# --------------------------------------------------------------------------------------------
# Backward: dot-product test against forward-mode tangents (hard and smooth spikes)
# --------------------------------------------------------------------------------------------


@given(data=st.data(), smooth=st.booleans())
def test_vjp_dot_jvp(data, smooth):
    """``<c, J v> == <J^T c, v>`` with J v from the naive forward-mode loop, every mode."""
    cfg = data.draw(neuron_configs())
    x, rho = data.draw(neuron_inputs(cfg, lengths=st.integers(1, 20)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    cots = cotangents(rng, x.shape)
    vx = rng.normal(size=x.shape)
    vr = None if rho is None else rng.normal(size=rho.shape)
    sur = get_surrogate(cfg.surrogate)
    G = (lambda z: float(sur.primitive(z, cfg.scale))) if smooth else None
    tangents = neuron_jvp_naive(x, vx, cfg.reset, cfg.tau, cfg.theta, cfg.u_reset, rho, vr,
                                cfg.refractory_steps, cfg.spike_condition, g=surrogate_fn(cfg),
                                G=G, grad_mode=cfg.grad_mode)
    s, h, u = neuron_fwd(x, cfg, rho, smooth=smooth)
    dx, drho = neuron_bwd(x, s, h, cfg, *cots, rho=rho, smooth=smooth)
    lhs = sum(dot(c, t) for c, t in zip(cots, tangents))
    rhs = dot(dx, vx) + (0.0 if rho is None else dot(drho, vr))
    scale = np.sum(np.abs(dx * vx)) + (0.0 if rho is None else np.sum(np.abs(drho * vr)))
    assert abs(lhs - rhs) <= 1e-11 * (scale + 1.0)


# --------------------------------------------------------------------------------------------
# Backward: the modes' closed forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", ["soft", "refractory"])
def test_detach_reset_is_a_linear_reverse_scan(reset):
    """DESIGN.md: for soft/refractory, ``gh_t = dh_t + du_t + gs_t g_t + tau gh_{t+1}``."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 1.0, size=(2, 2, 30))
    rho = rng.uniform(0, 1, 2) if RESETS[reset].param else None
    cfg = NeuronConfig(reset=reset, tau=0.8, grad_mode="detach_reset", surrogate="atan")
    ds, dh, du = cotangents(rng, x.shape)
    s, h, u = neuron_fwd(x, cfg, rho)
    dx, drho = neuron_bwd(x, s, h, cfg, ds, dh, du, rho=rho)
    g = get_surrogate("atan").grad(h - cfg.theta)  # (B, H, L)
    gh = np.zeros_like(x)
    nxt = np.zeros(x.shape[:2])
    for t in range(x.shape[-1] - 1, -1, -1):
        nxt = dh[..., t] + du[..., t] + ds[..., t] * g[..., t] + cfg.tau * nxt
        gh[..., t] = nxt
    np.testing.assert_allclose(dx, gh, rtol=1e-13, atol=1e-13)
    if RESETS[reset].param:
        gu = du + cfg.tau * np.concatenate([gh[..., 1:], np.zeros(x.shape[:2] + (1,))], -1)
        np.testing.assert_allclose(drho, -(gu * s).sum((0, 2)), rtol=1e-13)


@pytest.mark.parametrize("reset", list(RESETS))
def test_sltt_with_spike_cotangent_only_is_local(reset):
    """``sltt``: ``dx_t = ds_t allowed_t g(h_t - theta)``, nothing from other steps."""
    rng = np.random.default_rng(4)
    x = rng.normal(0.5, 1.0, size=(2, 2, 25))
    rho = rng.uniform(0, 1, 2) if RESETS[reset].param else None
    cfg = NeuronConfig(reset=reset, tau=0.5, grad_mode="sltt", refractory_steps=1)
    ds = rng.normal(size=x.shape)
    s, h, u = neuron_fwd(x, cfg, rho)
    dx, drho = neuron_bwd(x, s, h, cfg, ds, rho=rho)
    allowed = naive(x, cfg, rho)[4]
    np.testing.assert_array_equal(dx, ds * allowed * get_surrogate("triangle").grad(h - 1.0))
    if drho is not None:
        np.testing.assert_array_equal(drho, np.zeros(2))


@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
def test_no_reset_makes_bptt_and_detach_reset_agree(grad_mode):
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 1.0, size=(2, 2, 25))
    cots = cotangents(rng, x.shape)
    cfg = NeuronConfig(reset="none", tau=0.5, grad_mode="bptt")
    out = neuron_fwd(x, cfg)
    ref = neuron_bwd(x, *out[:2], cfg, *cots)[0]
    if grad_mode != "sltt":
        got = neuron_bwd(x, *out[:2], cfg.replace(grad_mode=grad_mode), *cots)[0]
        np.testing.assert_array_equal(got, ref)


def test_backward_reads_only_spikes_and_membrane():
    """PMBC reuses neuron_bwd with its own arrays: the values of ``x`` are not read (and ``u``
    is not even an argument)."""
    rng = np.random.default_rng(6)
    x = rng.normal(0.5, 1.0, size=(2, 3, 40))
    rho = rng.uniform(0, 1, 3)
    cfg = NeuronConfig(reset="refractory", refractory_steps=2)
    cots = cotangents(rng, x.shape)
    s, h, u = neuron_fwd(x, cfg, rho)
    a = neuron_bwd(x, s, h, cfg, *cots, rho=rho)
    b = neuron_bwd(np.zeros_like(x), s, h, cfg, *cots, rho=rho)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


def test_cotangent_none_means_zero():
    rng = np.random.default_rng(8)
    x = rng.normal(0.5, 1.0, size=(1, 2, 30))
    cfg = NeuronConfig(reset="hard", tau=0.5)
    out = neuron_fwd(x, cfg)
    ds = rng.normal(size=x.shape)
    z = np.zeros_like(x)
    np.testing.assert_array_equal(neuron_bwd(x, *out[:2], cfg, ds)[0],
                                  neuron_bwd(x, *out[:2], cfg, ds, z, z)[0])


# --------------------------------------------------------------------------------------------
# Learnable threshold by input scaling
# --------------------------------------------------------------------------------------------


def test_threshold_scale_forward_and_backward():
    rng = np.random.default_rng(9)
    y = rng.normal(size=(2, 3, 7))
    ln_vth = rng.normal(0, 0.5, size=3)
    z = threshold_scale_fwd(y, ln_vth)
    # exp(ln_vth) is NumPy's here and (today) in the library too, but may come from Numba's
    # libm exp or another SIMD width: allow 2 ulps of exp plus the division's rounding
    np.testing.assert_allclose(z, y / np.exp(ln_vth)[:, None], rtol=4 * np.finfo(float).eps,
                               atol=0)
    dz = rng.normal(size=y.shape)
    dy, dl = threshold_scale_bwd(y, ln_vth, dz)
    vy, vl = rng.normal(size=y.shape), rng.normal(size=3)
    fd = (dot(dz, threshold_scale_fwd(y + EPS * vy, ln_vth + EPS * vl))
          - dot(dz, threshold_scale_fwd(y - EPS * vy, ln_vth - EPS * vl))) / (2 * EPS)
    assert fd == pytest.approx(dot(dy, vy) + dot(dl, vl), rel=1e-8)


def test_threshold_scale_then_neuron_chain_rule():
    """``ln_vth`` learned through a smooth neuron with theta = 1: FD of the composition."""
    rng = np.random.default_rng(10)
    y = rng.normal(0.5, 1.0, size=(2, 2, 15))
    ln_vth = np.array([0.2, -0.3])
    cfg = NeuronConfig(reset="soft", tau=0.5, surrogate="sigmoid")
    ds = rng.normal(size=y.shape)

    def loss(lv):
        return dot(ds, neuron_fwd(threshold_scale_fwd(y, lv), cfg, smooth=True)[0])

    z = threshold_scale_fwd(y, ln_vth)
    out = neuron_fwd(z, cfg, smooth=True)
    dz, _ = neuron_bwd(z, *out[:2], cfg, ds, smooth=True)
    _, dl = threshold_scale_bwd(y, ln_vth, dz)
    for hh in range(2):
        e = np.zeros(2)
        e[hh] = EPS
        assert (loss(ln_vth + e) - loss(ln_vth - e)) / (2 * EPS) == pytest.approx(dl[hh], rel=1e-7)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_defaults_and_helpers():
    cfg = NeuronConfig()
    assert (cfg.reset, cfg.tau, cfg.theta, cfg.u_reset, cfg.refractory_steps, cfg.spike_condition,
            cfg.surrogate, cfg.surrogate_scale, cfg.grad_mode) == (
        "hard", 0.5, 1.0, 0.0, 0, "ge", "triangle", None, "bptt")
    assert cfg.scale == 1.0
    assert NeuronConfig(surrogate="fast_sigmoid").scale == 25.0
    assert cfg.attrs()["surrogate_scale"] == 1.0
    assert cfg.replace(tau=0.25).tau == 0.25
    assert isinstance(NeuronConfig(tau=0).tau, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tau = 0.1


def test_reset_coefficients_reproduce_the_table():
    rho = np.array([0.5, 1.0])
    for reset, a, b in (("hard", 1.0, [-0.5, -0.5]), ("soft", 0.0, [-2.0, -2.0]),
                        ("refractory", 0.0, [-2.5, -3.0]), ("none", 0.0, [0.0, 0.0])):
        cfg = NeuronConfig(reset=reset, theta=2.0, u_reset=-0.5 if RESETS[reset].u_reset else 0.0)
        got_a, got_b = neurons.reset_coefficients(cfg, rho if RESETS[reset].param else None, 2)
        assert got_a == a
        np.testing.assert_array_equal(got_b, b)


# --------------------------------------------------------------------------------------------
# Validation: one test per rule, message included
# --------------------------------------------------------------------------------------------

X = np.zeros((2, 3, 5))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(reset="leaky"), ValueError,
     r"unknown reset 'leaky'; valid names are 'hard', 'soft', 'refractory', 'none'"),
    (dict(surrogate="erf"), ValueError, r"unknown surrogate 'erf'; valid names are 'triangle'"),
    (dict(grad_mode="tbptt"), ValueError,
     r"unknown grad_mode 'tbptt'; valid names are 'bptt', 'detach_reset', 'sltt'"),
    (dict(spike_condition=">="), ValueError,
     r"unknown spike_condition '>='; valid names are 'ge', 'gt'"),
    (dict(tau=1.0), ValueError, r"tau must be in \[0.0, 1.0\), got 1.0"),
    (dict(tau=-0.1), ValueError, r"tau must be in \[0.0, 1.0\), got -0.1"),
    (dict(tau=math.nan), ValueError, r"tau must be finite, got nan"),
    (dict(tau="0.5"), TypeError, r"tau must be a real number, got '0.5'"),
    (dict(theta=0.0), ValueError, r"theta \(with reset='hard'\) must be in \(0.0, inf\], got 0.0"),
    (dict(reset="soft", theta=-1.0), ValueError, r"theta \(with reset='soft'\) must be in \(0.0"),
    (dict(reset="refractory", theta=0.0), ValueError, r"theta \(with reset='refractory'\)"),
    (dict(reset="soft", u_reset=0.5), ValueError,
     r"u_reset applies only to reset='hard'.*; got u_reset=0.5 with reset='soft'"),
    (dict(refractory_steps=-1), ValueError, r"refractory_steps must be >= 0, got -1"),
    (dict(refractory_steps=1.5), TypeError, r"refractory_steps must be an integer, got 1.5"),
    (dict(refractory_steps=True), TypeError, r"refractory_steps must be an integer, got True"),
    (dict(surrogate_scale=0.0), ValueError,
     r"surrogate_scale \(w of 'triangle'\) must be in \(0.0"),
])
def test_config_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        NeuronConfig(**kwargs)


def test_theta_may_be_any_real_without_reset():
    assert NeuronConfig(reset="none", theta=-2.0).theta == -2.0
    assert NeuronConfig(reset="none", theta=0.0).theta == 0.0


@pytest.mark.parametrize("x, err, match", [
    (np.full((1, 1, 3), np.nan), ValueError,
     r"x contains non-finite values \(first at index \(0, 0, 0\): nan\)"),
    (np.array([[[0.0, np.inf]]]), ValueError,
     r"x contains non-finite values \(first at index \(0, 0, 1\): inf\)"),
    (np.zeros((2, 3, 5), dtype=np.float32), TypeError,
     r"x must have dtype float64, got float32.*astype"),
    (np.zeros((2, 3, 5), dtype=np.int64), TypeError, r"x must have dtype float64, got int64"),
    ([[[0.0]]], TypeError, r"x must be a numpy.ndarray of float64, got list"),
    (np.zeros((3, 5)), ValueError, r"x must have rank 3, got shape \(3, 5\)"),
    (np.zeros((2, 3, 0)), ValueError, r"x must have at least one time step \(L >= 1\)"),
])
def test_forward_input_validation(x, err, match):
    with pytest.raises(err, match=match):
        neuron_fwd(x, NeuronConfig())


def test_forward_needs_a_config():
    with pytest.raises(TypeError, match=r"cfg must be a refimpl.neurons.NeuronConfig, got dict"):
        neuron_fwd(X, {"reset": "hard"})


def test_smooth_must_be_bool():
    with pytest.raises(TypeError, match=r"smooth must be a bool, got 1"):
        neuron_fwd(X, NeuronConfig(), smooth=1)


@pytest.mark.parametrize("reset, rho, err, match", [
    ("refractory", None, ValueError, r"reset='refractory' needs rho"),
    ("soft", np.zeros(3), ValueError,
     r"rho is only used with reset='refractory'.*; got rho with reset='soft'"),
    ("refractory", np.array([0.1, -0.5, 0.0]), ValueError,
     r"rho must be >= 0 everywhere, got rho\[1\] = -0.5"),
    ("refractory", np.zeros(2), ValueError, r"rho must have shape \(3\), got \(2,\)"),
    ("refractory", np.zeros(3, dtype=np.float32), TypeError, r"rho must have dtype float64"),
    ("refractory", np.array([0.0, np.nan, 0.0]), ValueError, r"rho contains non-finite values"),
])
def test_rho_validation(reset, rho, err, match):
    with pytest.raises(err, match=match):
        neuron_fwd(X, NeuronConfig(reset=reset), rho)
    with pytest.raises(err, match=match):
        neuron_bwd(X, X, X, NeuronConfig(reset=reset), X, rho=rho)


@pytest.mark.parametrize("name", ["s", "h", "ds", "dh", "du"])
def test_backward_shape_mismatch(name):
    args = dict(s=X, h=X, ds=X, dh=None, du=None)
    args[name] = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=rf"{name} must have shape \(2, 3, 5\), got \(2, 3, 4\)"):
        neuron_bwd(X, args["s"], args["h"], NeuronConfig(), args["ds"],
                   dh=args["dh"], du=args["du"])


def test_backward_wrong_dtype():
    with pytest.raises(TypeError, match=r"dh must have dtype float64, got float32"):
        neuron_bwd(X, X, X, NeuronConfig(), X, dh=X.astype(np.float32))


def test_backward_nonfinite_cotangent():
    ds = X.copy()
    ds[0, 1, 2] = np.inf
    with pytest.raises(ValueError,
                       match=r"ds contains non-finite values \(first at index \(0, 1, 2\)"):
        neuron_bwd(X, X, X, NeuronConfig(), ds)


def test_backward_hard_mode_needs_binary_spikes():
    s = X.copy()
    s[1, 0, 3] = 0.5
    with pytest.raises(ValueError,
                       match=r"s must hold spikes 0/1 when smooth=False, got s\[1, 0, 3\] = 0.5"):
        neuron_bwd(X, s, X, NeuronConfig(), X)


@pytest.mark.parametrize("ln_vth, match", [
    (np.zeros(2), r"ln_vth must have shape \(3\), got \(2,\)"),
    (np.array([0.0, 800.0, 0.0]),
     r"exp\(ln_vth\) must be finite and > 0, but ln_vth\[1\] = 800.0"),
    (np.array([0.0, 0.0, -800.0]),
     r"exp\(ln_vth\) must be finite and > 0, but ln_vth\[2\] = -800.0"),
])
def test_threshold_scale_validation(ln_vth, match):
    with pytest.raises(ValueError, match=match):
        threshold_scale_fwd(X, ln_vth)
    with pytest.raises(ValueError, match=match):
        threshold_scale_bwd(X, ln_vth, X)


def test_threshold_scale_cotangent_shape():
    with pytest.raises(ValueError, match=r"dz must have shape \(2, 3, 5\), got \(2, 3, 4\)"):
        threshold_scale_bwd(X, np.zeros(3), np.zeros((2, 3, 4)))
