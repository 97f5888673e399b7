"""The float32 training variant (issue 13): ``refimpl.precision``, the float32 ops, the model,
training, determinism, errors and the CLI.

Every comparison runs the same op twice on the same float32-representable inputs: under
``using("float32")`` on the float32 arrays, and in float64 (the reference path) on the same
values up-cast exactly. The float32 result must be float32 and within a bound derived from
the computation, never copied from the code under test:

- ``eps = 2^-23`` (:data:`EPS32`, the spacing of float32 at 1; a rounding to nearest errs by
  at most ``eps / 2`` relative, and the float64 reference's own rounding is 2^29 times smaller,
  so it is ignored);
- a sum of ``n`` terms in any order errs by at most ``n eps sum|terms|`` (``gamma_n``); the
  "sum of |terms|" of a bilinear op (convolution, channel mixing, reductions) is computed
  exactly as the same float64 op on the absolute values of its inputs (the *abs analogue*);
- an FFT of length ``n`` has a norm-wise error of about ``log2(n)`` eps stages: a convolution by
  FFT errs, in every element, by at most ``C_FFT log2(n) eps ||a||_1 ||b||_2`` (the 2-norm of the
  error bounds each element; ``||a_hat||_inf <= ||a||_1``);
- recurrences (neurons) accumulate one or two roundings per step, damped by ``tau``;
- element-wise nonlinearities add a few eps relative plus their slope (Lipschitz constant)
  times the rounding of their argument.

Spiking ops: spikes must be equal except where the float64 membrane is within the membrane
bound of the threshold (a legitimate rounding flip; counted, they must be rare), and no flip
may occur where the margin exceeds the bound. After a row's first flip its membranes diverge
(a reset happened in one run only), so membranes are compared on the prefix before it.

The worst ratio error / bound of each comparison is collected in :data:`RATIOS`
(``pytest -s`` prints them at the end of the module).
"""
import dataclasses
import json
import math
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import event, given, settings, strategies as st

from refimpl import conv as C
from refimpl import layers as Ly
from refimpl import model as M
from refimpl import precision as P
from refimpl.activations import ACTIVATIONS
from refimpl.cli.main import main as cli_main
from refimpl.neurons import (NeuronConfig, neuron_bwd, neuron_fwd, reset_coefficients,
                             threshold_scale_bwd, threshold_scale_fwd)
from refimpl.pmbc import pmbc_fwd
from refimpl.s4d import s4d_layer_bwd, s4d_layer_fwd
from refimpl.sdn import sdn_forward, sdn_neuron_bwd, sdn_neuron_fwd
from refimpl.ssm import KERNEL_PARAMS, s4d_init, s4d_kernel, s4d_kernel_bwd
from refimpl.stream import ModelStream
from refimpl.surrogates import SURROGATES
from refimpl.tasks import make_task
from refimpl.train import TrainConfig, load_checkpoint, train

from test_model import CASES as MODEL_TEST_CASES  # the whole-model gradient checks
from test_model import sdn_weights, small_model

F32, F64 = np.float32, np.float64
EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
#: FFT constant: three transforms (u, K or dy, the inverse) of log2(n) stages each plus the
#: spectral product, with a factor ~1.5 for the twiddle factors' own rounding.
C_FFT = 5.0

RATIOS = {}


def r32(a):
    """``a`` rounded to float32 (the inputs both runs share)."""
    return np.asarray(a, dtype=F64).astype(F32)


def up(a):
    """Exact up-cast of a float32 array to float64."""
    return np.asarray(a).astype(F64)


def within(got, ref, bound, what):
    """``got`` is float32 and ``|got - ref| <= bound`` element-wise; records the worst ratio."""
    assert isinstance(got, np.ndarray) and got.dtype == F32, \
        f"{what}: expected a float32 array, got {getattr(got, 'dtype', type(got).__name__)}"
    ref = np.asarray(ref, dtype=F64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = np.abs(got.astype(F64) - ref)
    bound = np.broadcast_to(np.asarray(bound, dtype=F64), err.shape)
    bad = err > bound
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[np.argmax(err[bad] - bound[bad])])
        raise AssertionError(f"{what}: |float32 - float64| = {err[i]:.3e} > bound {bound[i]:.3e} "
                             f"at {list(i)} ({int(bad.sum())} of {err.size} elements)")
    ratio = float(np.max(np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), 0.0))) \
        if err.size else 0.0
    RATIOS[what] = max(RATIOS.get(what, 0.0), ratio)
    return ratio


@pytest.fixture(scope="module", autouse=True)
def _print_ratios():
    yield
    if RATIOS:
        print("\nworst |float32 - float64| / bound per comparison:")
        for k in sorted(RATIOS):
            print(f"  {k:48s} {RATIOS[k]:.3g}")


# ============================================================================================
# refimpl.precision
# ============================================================================================


def test_precision_names_default_and_context():
    assert tuple(P.PRECISIONS) == ("float64", "float32")
    assert P.float_dtype() == np.dtype(F64)
    with P.using("float32"):
        assert P.float_dtype() == np.dtype(F32)
        with P.using("float64"):
            assert P.float_dtype() == np.dtype(F64)
        assert P.float_dtype() == np.dtype(F32)
    assert P.float_dtype() == np.dtype(F64)
    with pytest.raises(KeyError):  # restored on an exception too
        with P.using("float32"):
            raise KeyError("inside")
    assert P.float_dtype() == np.dtype(F64)


def test_unknown_precision_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"'float16'.*'float64', 'float32'"):
        with P.using("float16"):
            pass
    with pytest.raises(ValueError, match=r"'float16'.*'float64', 'float32'"):
        M.ModelConfig(n_classes=2, dtype="float16")


def test_require_reference():
    P.require_reference("golden data")  # float64: fine
    with P.using("float32"), pytest.raises(RuntimeError, match="golden data"):
        P.require_reference("golden data")


# ============================================================================================
# Convolution (FFT and Toeplitz forms)
# ============================================================================================


def _fold(K):
    """Both directions of a kernel per channel, ``(H, L)`` or ``(H, 2L)``."""
    return K if K.ndim == 2 else np.concatenate([K[0], K[1]], axis=-1)


def _fft_term(a, b):
    """Per-row factor of the FFT form's bound: ``max(||a||_1 ||b||_2, ||a||_2 ||b||_1)``."""
    a1, a2 = np.abs(a).sum(-1), np.sqrt((a * a).sum(-1))
    b1, b2 = np.abs(b).sum(-1), np.sqrt((b * b).sum(-1))
    return np.maximum(a1 * b2, a2 * b1)


def conv_bounds(u, K, D, dy, kernel_rounding=False):
    """Bounds on ``|float32 - float64|`` of ``y`` and of ``(du, dK, dD)`` of the convolution.

    ``u, K, D, dy`` are the float64 values (float32-representable). Each bound is the sum of
    the bound of either form (Toeplitz: direct sums; FFT: norm-wise), so it holds whichever
    form the op picks:

    - direct: ``y`` sums ``L`` products, plus ``D u`` (2 roundings): ``(L + 2) eps y_abs``;
      ``dK`` sums ``B`` products per Toeplitz entry, then ``L`` diagonals: ``(B + L + 2) eps``;
      ``dD`` sums ``B L`` products;
    - FFT: ``C_FFT log2(n) eps ||K_h||_1 ||u_bh||_2`` per row (``du``: with ``dy``), and for
      ``dK`` the ``B`` spectra summed first: ``(C_FFT log2(n) + B) eps sum_b (...)``;
    - ``kernel_rounding``: ``K`` itself is float64 in the reference and rounded once in the
      float32 run: ``eps / 2`` relative per kernel tap, i.e. one more eps on ``y_abs``, ``du_abs``.
    """
    Bsz, H, L = u.shape
    lg = math.log2(C.fft_length(L))
    au, aK, ady = np.abs(u), np.abs(K), np.abs(dy)
    aD = None if D is None else np.abs(D)
    y_abs = C.direct_conv(au, aK, aD)  # (B, H, L): sum of |terms| of each output
    du_abs, dK_abs, dD_abs = C.fftconv_bwd(au, aK, aD, ady)
    Kf = _fold(K)[None]  # (1, H, L or 2L)
    k = 1.0 if kernel_rounding else 0.0
    y = (L + 2 + k) * EPS32 * y_abs + C_FFT * lg * EPS32 * _fft_term(Kf, u)[..., None]
    du = (L + 2 + k) * EPS32 * du_abs + C_FFT * lg * EPS32 * _fft_term(Kf, dy)[..., None]
    fk = (C_FFT * lg + Bsz) * EPS32 * _fft_term(dy, u).sum(0)  # (H,)
    dK = (Bsz + L + 2) * EPS32 * dK_abs + (fk[:, None] if K.ndim == 2 else fk[None, :, None])
    dD = None if D is None else (Bsz * L + 2) * EPS32 * dD_abs
    return y, (du, dK, dD)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), L=st.sampled_from([1, 7, 16, 64, 65, 100]),
       bidirectional=st.booleans(), with_D=st.booleans())
def test_conv_fwd_vjp(seed, L, bidirectional, with_D):
    """Both forms (Toeplitz for ``L <= 64``, FFT above), causal and bidirectional."""
    rng = np.random.default_rng(seed)
    Bsz, H = 3, 4
    u = r32(rng.normal(size=(Bsz, H, L)))
    K = r32(rng.normal(size=(2, H, L) if bidirectional else (H, L)) * np.exp(-0.05 * np.arange(L)))
    D = r32(rng.normal(size=H)) if with_D else None
    dy = r32(rng.normal(size=(Bsz, H, L)))
    y64, c64 = C.conv_fwd(up(u), up(K), None if D is None else up(D))
    du64, dK64, dD64 = C.conv_vjp(c64, up(dy))
    with P.using("float32"):
        y, c = C.conv_fwd(u, K, D)
        du, dK, dD = C.conv_vjp(c, dy)
    by, (bdu, bdK, bdD) = conv_bounds(up(u), up(K), None if D is None else up(D), up(dy))
    within(y, y64, by, "conv y")
    within(du, du64, bdu, "conv du")
    within(dK, dK64, bdK, "conv dK")
    if D is None:
        assert dD is None
    else:
        within(dD, dD64, bdD, "conv dD")


# ============================================================================================
# The S4D layer
# ============================================================================================


def _kernel_jacobian_abs(p64, L):
    """``|dK[h, l] / dparam|`` for every kernel parameter: ``{name: (L, *param.shape)}``, from
    one float64 kernel backward per position ``l`` (the channels are independent)."""
    args = [p64[k] for k in KERNEL_PARAMS]
    H = p64["log_dt"].shape[0]
    J = {k: [] for k in KERNEL_PARAMS}
    for l in range(L):
        e = np.zeros((H, L))
        e[:, l] = 1.0
        for k, g in zip(KERNEL_PARAMS, s4d_kernel_bwd(*args, e)):
            J[k].append(np.abs(g))
    return {k: np.stack(v) for k, v in J.items()}


@pytest.mark.parametrize("L", [16, 80])
@pytest.mark.parametrize("seed", [0, 1])
def test_s4d_layer_fwd_bwd(L, seed):
    """The kernel is generated in float64 and rounded once (exact check); ``y``, ``du`` and
    ``dD`` within the convolution's bounds (plus the kernel's rounding); the kernel
    parameters' gradients within ``|J|^T e_dK`` (``J = dK/dparam``, ``e_dK`` the bound on
    ``dK``: the kernel backward runs in float64) plus their final rounding (``eps / 2``)."""
    rng = np.random.default_rng(seed)
    Bsz, H, N = 3, 4, 8
    p = s4d_init(H, N, seed=seed)
    p = {k: v * (3.0 if k in ("C_re", "C_im") else 1.0) for k, v in p.items()}
    p32 = {k: r32(v) for k, v in p.items()}
    p64 = {k: up(v) for k, v in p32.items()}
    u = r32(rng.normal(size=(Bsz, H, L)))
    dy = r32(rng.normal(size=(Bsz, H, L)))
    y64, c64 = s4d_layer_fwd(up(u), p64)
    du64, g64 = s4d_layer_bwd(c64, up(dy))
    with P.using("float32"):
        y, c = s4d_layer_fwd(u, p32)
        du, g = s4d_layer_bwd(c, dy)
    K64 = s4d_kernel(*[p64[k] for k in KERNEL_PARAMS], L)
    assert c.K.dtype == F32 and np.array_equal(c.K, K64.astype(F32)), \
        "the float32 layer's kernel must be the float64 kernel rounded once"
    by, (bdu, bdK, bdD) = conv_bounds(up(u), K64, p64["D"], up(dy), kernel_rounding=True)
    within(y, y64, by, "s4d y")
    within(du, du64, bdu, "s4d du")
    assert set(g) == set(g64)
    within(g["D"], g64["D"], bdD, "s4d grad D")
    J = _kernel_jacobian_abs(p64, L)
    for k in KERNEL_PARAMS:
        e = _propagate(J[k], bdK)
        within(g[k], g64[k], e + 0.5 * EPS32 * np.abs(g64[k]), f"s4d grad {k}")


def _propagate(Jk, bdK):
    """``sum_l |J[l, h, ...]| e_dK[h, l]``: the bound ``dK``'s error induces on a parameter."""
    e = bdK.T  # (L, H)
    e = e.reshape(e.shape + (1,) * (Jk.ndim - 2))  # (L, H, 1...) against (L, H, ...)
    return (Jk * e).sum(0)


# ============================================================================================
# Surrogates
# ============================================================================================


def _lipschitz(fn, scale, lo, hi, kinks):
    """``max |f'|`` of an array function on ``[lo, hi]`` (a 2e5-point grid; intervals holding
    a kink of ``g`` are skipped: there ``f`` may jump), times 1.1 for the grid's resolution."""
    z = np.linspace(lo, hi, 200001)
    f = fn(z, scale)
    slope = np.abs(np.diff(f)) / (z[1] - z[0])
    for k in kinks:
        slope[(z[:-1] <= k + 1e-9) & (z[1:] >= k - 1e-9)] = 0.0
    return 1.1 * float(slope.max())


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_surrogates(name):
    """``g`` and ``G`` on float32 ``z``: each evaluates a few operations (a transcendental
    included, ~1-2 ulps) on ``z``: ``|err| <= 8 eps (|f| + Lip(f) |z| + S)``, with the slope term
    for the rounding of intermediate products of ``z`` and ``S`` the function's own size
    (``max g``, resp. ``G``'s total rise) for absolute errors where it cancels (``1 - sig``)."""
    sur = SURROGATES[name]
    scale = sur.default_scale * 1.5
    w = 4.0 / scale if sur.scale_name != "w" else 4.0 * scale
    z = r32(np.random.default_rng(3).uniform(-w, w, 4000))
    for k in sur.kinks(scale):  # keep z off the kinks (a jump of g for the rectangle)
        z = z[np.abs(up(z) - k) > 1e-4 * w]
    g64, G64 = sur.grad(up(z), scale), sur.primitive(up(z), scale)
    with P.using("float32"):
        g, G = sur.grad(z, scale), sur.primitive(z, scale)
        g0 = sur.grad(0.25, scale)
    assert isinstance(g0, np.floating) and g0.dtype == F32
    kinks = sur.kinks(scale)
    lip_g = _lipschitz(sur.grad, scale, -w, w, kinks)
    lip_G = _lipschitz(sur.primitive, scale, -w, w, ())
    gmax = float(np.max(sur.grad(np.linspace(-w, w, 20001), scale)))
    within(g, g64, 8 * EPS32 * (np.abs(g64) + lip_g * np.abs(up(z)) + gmax), f"surrogate g {name}")
    within(G, G64, 8 * EPS32 * (np.abs(G64) + lip_G * np.abs(up(z)) + sur.total(scale)),
           f"surrogate G {name}")


# ============================================================================================
# Iterative neurons
# ============================================================================================

NEURONS = {
    "lif": dict(reset="hard", tau=0.125, theta=1.0, surrogate="triangle"),
    "refractory": dict(reset="refractory", tau=0.5, theta=1.0, surrogate="triangle"),
    "binary": dict(reset="none", tau=0.0, theta=0.0, surrogate="atan"),
    "soft_gt_R2": dict(reset="soft", tau=0.75, theta=0.8, spike_condition="gt",
                       refractory_steps=2, surrogate="sigmoid"),
    "hard_ureset_detach": dict(reset="hard", tau=0.5, theta=1.0, u_reset=-0.25,
                               surrogate="fast_sigmoid", grad_mode="detach_reset"),
    "soft_sltt": dict(reset="soft", tau=0.5, theta=1.0, grad_mode="sltt"),
}


def membrane_bound(cfg, x, h, u, b):
    """``|h32 - h64|`` while the spike trains agree: each step rounds ``tau u + x`` (and the
    soft/refractory reset ``h + b``, ``b`` itself rounded once), at most ``2 eps M`` with
    ``M`` the largest magnitude involved, and the previous error enters damped by ``tau``:
    ``|e| <= 2 eps M / (1 - tau)``; we allow twice that."""
    M_ = max(np.abs(x).max(), np.abs(h).max(), np.abs(u).max(), np.abs(b).max(), abs(cfg.theta))
    return 4 * EPS32 * M_ / (1.0 - cfg.tau)


def compare_spikes(s32, h32, s64, h64, theta, bound, what, extra=()):
    """Spikes equal except legitimate flips; membranes (``h`` and ``extra`` pairs) within
    ``bound`` up to each row's first flip. Returns the number of flipped rows."""
    L = s64.shape[-1]
    rows = lambda a: np.asarray(a).reshape(-1, L)  # noqa: E731
    s32r, s64r, h32r, h64r = rows(s32), rows(s64), rows(h32), rows(h64)
    pairs = [(rows(a), rows(b_)) for a, b_ in extra]
    flips = 0
    for r in range(s64r.shape[0]):
        d = np.flatnonzero(s32r[r] != s64r[r])
        stop = L if d.size == 0 else int(d[0])
        hi = min(L, stop + 1)  # the membrane at the flip is computed from the agreed history
        err = np.abs(up(h32r[r, :hi]) - h64r[r, :hi])
        assert np.all(err <= bound), f"{what}: row {r}: |dh| {err.max():.3e} > {bound:.3e}"
        RATIOS[what + " h"] = max(RATIOS.get(what + " h", 0.0), float(err.max() / bound))
        for a, b_ in pairs:
            e2 = np.abs(up(a[r, :stop]) - b_[r, :stop])
            assert np.all(e2 <= bound), f"{what}: row {r}: |du| {e2.max():.3e} > {bound:.3e}"
        if d.size:
            flips += 1
            margin = abs(h64r[r, stop] - theta)
            assert margin <= bound, (f"{what}: row {r} flips at t={stop} with float64 margin "
                                     f"{margin:.3e} > bound {bound:.3e}")
    return flips


def _neuron_case(seed, name, Bsz, H, L):
    """``(cfg, rng, x, rho, rho64)``: float32-representable input around the threshold and
    ``rho`` (refractory only), with its float64 up-cast."""
    cfg = NeuronConfig(**NEURONS[name])
    rng = np.random.default_rng(seed)
    x = r32(rng.normal(0.5 * cfg.theta + 0.3, 0.8, size=(Bsz, H, L)))
    rho = r32(rng.uniform(0, 1, H)) if cfg.reset == "refractory" else None
    return cfg, rng, x, rho, None if rho is None else up(rho)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(sorted(NEURONS)))
def test_neuron_fwd(seed, name):
    Bsz, H, L = 3, 4, 40
    cfg, rng, x, rho, rho64 = _neuron_case(seed, name, Bsz, H, L)
    s64, h64, u64 = neuron_fwd(up(x), cfg, rho=rho64)
    with P.using("float32"):
        s, h, u = neuron_fwd(x, cfg, rho=rho)
    for a in (s, h, u):
        assert a.dtype == F32
    _, b = reset_coefficients(cfg, rho64, H)
    bound = membrane_bound(cfg, up(x), h64, u64, b)
    flips = compare_spikes(s, h, s64, h64, cfg.theta, bound, f"neuron {name}", [(u, u64)])
    event(f"rows with a rounding flip: {flips}")
    assert flips <= 1, f"{flips} of {Bsz * H} rows flip: not rare"
    assert s64.sum() > 0  # the draw spikes (the check has teeth)


def test_neuron_rounding_flip_is_allowed_and_counted():
    """A constructed flip: ``h_1 = tau x_0 + x_1 = 1 - 2^-30`` exactly (float64: no spike), which
    float32 rounds to ``theta = 1`` (a spike): the float64 margin ``2^-30`` is within the
    membrane bound, so :func:`compare_spikes` accepts and counts it; the rows after the flip
    are not compared (the reset happened in one run only)."""
    cfg = NeuronConfig(reset="hard", tau=0.5, theta=1.0)
    x = np.array([[[2.0**-23 - 2.0**-29, 1 - 2.0**-24, 0.25]]], dtype=F32)
    assert np.array_equal(up(x), [[[2.0**-23 - 2.0**-29, 1 - 2.0**-24, 0.25]]])  # exact
    s64, h64, u64 = neuron_fwd(up(x), cfg)
    with P.using("float32"):
        s, h, u = neuron_fwd(x, cfg)
    assert s64.ravel()[:2].tolist() == [0, 0] and h64[0, 0, 1] == 1 - 2.0**-30
    assert s.ravel()[:2].tolist() == [0, 1] and h[0, 0, 1] == 1.0
    _, b = reset_coefficients(cfg, None, 1)
    bound = membrane_bound(cfg, up(x), h64, u64, b)
    assert compare_spikes(s, h, s64, h64, 1.0, bound, "constructed flip", [(u, u64)]) == 1
    with pytest.raises(AssertionError, match="row 0"):  # refused with a smaller bound
        compare_spikes(s, h, s64, h64, 1.0, 2.0**-31, "constructed flip, tiny bound")


@pytest.mark.parametrize("cond,want", [("ge", [1, 1]), ("gt", [0, 1])])
def test_neuron_spike_condition_is_decided_in_float32(cond, want):
    """``h = theta`` exactly and ``h = nextafter32(theta)``: ``ge`` fires on both, ``gt`` on
    the second only (the float32 membrane as stored decides, exactly)."""
    cfg = NeuronConfig(reset="hard", tau=0.0, theta=1.0, spike_condition=cond)
    x = np.array([[[1.0, np.nextafter(F32(1.0), F32(2.0))]]], dtype=F32)
    with P.using("float32"):
        s, h, _ = neuron_fwd(x, cfg)
    assert s.dtype == F32 and s.ravel().tolist() == want
    assert np.array_equal(h, x)


def neuron_bwd_bound(cfg, s, h, ds, rho):
    """Running-error bound of the neuron backward, from the magnitude recursion
    ``A_t = |ds_t| G_t + tau k_t A_{t+1}`` (``G_t = g_t + Lip(g) |h_t - theta|`` the surrogate
    with the sensitivity of its float32 evaluation; ``k_t = |1 - a s_t| + |b - a h_t| G_t``
    bounds ``du_t/dh_t`` of every grad mode): each of the ``L - t`` steps feeding ``dx_t`` adds
    at most ``c eps`` (``c = 8``: the surrogate's few operations, the products, the reset
    terms and the sum) relative to ``A_t``: ``|err dx_t| <= 8 eps (L - t) A_t``. ``drho`` sums
    ``B L`` terms ``s_t tau A_{t+1}``, each with that bound: ``(8 (L - t) + B L) eps``."""
    Bsz, H, L = h.shape
    a, b = reset_coefficients(cfg, rho, H)
    b = np.asarray(b)[None, :, None]  # (1, H, 1)
    sur = SURROGATES[cfg.surrogate]
    scale = cfg.scale
    z = h - cfg.theta
    lip = _lipschitz(sur.grad, scale, -8, 8, sur.kinks(scale))
    G = np.abs(sur.grad(z, scale)) + lip * np.abs(z)  # (B, H, L)
    kap = np.abs(1.0 - a * s) + np.abs(b - a * h) * G  # (B, H, L)
    A = np.zeros_like(h)
    nxt = np.zeros((Bsz, H))
    for t in reversed(range(L)):
        A[..., t] = np.abs(ds[..., t]) * G[..., t] + cfg.tau * kap[..., t] * nxt
        nxt = A[..., t]
    steps = (L - np.arange(L))[None, None, :]  # (1, 1, L): L - t
    bdx = 8 * EPS32 * steps * A
    nextA = np.concatenate([A[..., 1:], np.zeros((Bsz, H, 1))], axis=-1)
    brho = (EPS32 * s * cfg.tau * nextA * (8 * steps + Bsz * L)).sum((0, 2))  # (H,)
    return bdx, brho


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(sorted(NEURONS)))
def test_neuron_bwd(seed, name):
    """The backward on the same spikes and (rounded) membranes as both runs' input."""
    Bsz, H, L = 3, 4, 24
    cfg, rng, x, rho, rho64 = _neuron_case(seed, name, Bsz, H, L)
    s64, h64, _ = neuron_fwd(up(x), cfg, rho=rho64)
    s, h = r32(s64), r32(h64)
    ds = r32(rng.normal(size=(Bsz, H, L)))
    dx64, drho64 = neuron_bwd(up(x), up(s), up(h), cfg, up(ds), rho=rho64)
    with P.using("float32"):
        dx, drho = neuron_bwd(x, s, h, cfg, ds, rho=rho)
    bdx, brho = neuron_bwd_bound(cfg, up(s), up(h), up(ds), rho64)
    within(dx, dx64, bdx, f"neuron bwd dx {name}")
    if rho is None:
        assert drho is None
    else:
        within(drho, drho64, brho, f"neuron bwd drho {name}")


def test_pmbc_is_float64_only_and_the_model_runs_the_iterative_neuron():
    """PMBC refuses float32 (its exactness argument is a float64 one); a refractory model with
    ``neuron_impl="pmbc"`` in float32 computes exactly what ``"iterative"`` does."""
    x = np.zeros((1, 2, 5), dtype=F32)
    cfg = NeuronConfig(reset="refractory", tau=0.5)
    with P.using("float32"), pytest.raises(RuntimeError, match="PMBC"):
        pmbc_fwd(x, cfg, rho=np.zeros(2, F32))
    mcfg, p, buf, xm, y = small_model(activation="refractory", dtype="float32")
    it = dataclasses.replace(mcfg, neuron_impl="iterative")
    la, lga, ga, _, _ = M.loss_and_grads(mcfg, p, buf, r32(xm), y, training=False)
    lb, lgb, gb, _, _ = M.loss_and_grads(it, p, buf, r32(xm), y, training=False)
    assert la == lb and np.array_equal(lga, lgb)
    for k in ga:
        assert np.array_equal(ga[k], gb[k]), k


# ============================================================================================
# Threshold scaling and the SDN neuron
# ============================================================================================


def test_threshold_scale():
    """``z = y / exp(ln_vth)``: ``exp`` (~1 ulp) and a division: ``3 eps |z|``; ``dy`` alike;
    ``dln_vth = -sum_{b,t} dz z`` sums ``B L`` products of a value with its own ``3 eps``:
    ``(B L + 4) eps sum|dz z|``."""
    rng = np.random.default_rng(4)
    y, dz = r32(rng.normal(size=(3, 5, 20))), r32(rng.normal(size=(3, 5, 20)))
    ln = r32(rng.normal(0, 0.5, 5))
    z64 = threshold_scale_fwd(up(y), up(ln))
    dy64, dln64 = threshold_scale_bwd(up(y), up(ln), up(dz))
    with P.using("float32"):
        z = threshold_scale_fwd(y, ln)
        dy, dln = threshold_scale_bwd(y, ln, dz)
    within(z, z64, 3 * EPS32 * np.abs(z64), "threshold z")
    within(dy, dy64, 3 * EPS32 * np.abs(dy64), "threshold dy")
    within(dln, dln64, (60 + 4) * EPS32 * np.abs(up(dz) * z64).sum((0, 2)), "threshold dln_vth")


def test_sdn_neuron():
    """``m = SDN(x)``: three layers of sums (8 taps + bias, 8 channels + residual + bias, 8
    channels + bias: depth ~ 30); the abs analogue is the network with ``|w|`` on ``|x|``
    (ReLU is the identity on it and it dominates every pre-activation), so
    ``|err m| <= 32 eps m_abs``. Spikes ``m + x >= theta`` flip only where the float64
    ``m + x`` is within that (plus the sum's rounding) of ``theta``. The backward on the same
    ``m``: ``dx = ds g(m + x - theta)``: ``8 eps |ds| (g + Lip(g) (|m| + |x| + theta))``."""
    rng = np.random.default_rng(5)
    w64 = {k: up(r32(v)) for k, v in sdn_weights().items()}
    w32 = {k: r32(v) for k, v in w64.items()}
    cfg = NeuronConfig(reset="hard", tau=0.125, theta=1.0, surrogate="triangle")
    x = r32(rng.normal(0.6, 0.8, size=(3, 4, 30)))
    s64, m64 = sdn_neuron_fwd(up(x), w64, cfg)
    with P.using("float32"):
        s, m = sdn_neuron_fwd(x, w32, cfg)
    m_abs, _ = sdn_forward(np.abs(up(x)), {k: np.abs(v) for k, v in w64.items()}, theta=1.0)
    within(m, m64, 32 * EPS32 * m_abs, "sdn m")
    assert s.dtype == F32
    bound = 32 * EPS32 * m_abs + 2 * EPS32 * (np.abs(m64) + np.abs(up(x)))
    flip = s != s64
    assert np.all(np.abs(m64 + up(x) - 1.0)[flip] <= bound[flip]), "a flip beyond the bound"
    assert flip.sum() <= 1 and s64.sum() > 0
    ds = r32(rng.normal(size=x.shape))
    dx64 = sdn_neuron_bwd(up(x), up(m), cfg, up(ds))
    with P.using("float32"):
        dx = sdn_neuron_bwd(x, m, cfg, ds)
    v = np.abs(up(m)) + np.abs(up(x)) + 1.0
    g = SURROGATES["triangle"].grad(up(m) + up(x) - 1.0)
    within(dx, dx64, 8 * EPS32 * np.abs(up(ds)) * (g + 1.0 * v), "sdn bwd dx")


# ============================================================================================
# Layers
# ============================================================================================


def _rng_arrays(seed, *shapes, loc=0.0):
    rng = np.random.default_rng(seed)
    return [r32(rng.normal(loc, 1.0, size=s)) for s in shapes]


def test_linear():
    """Sums of ``Hin`` products plus the bias; the backward's sums over ``Hout`` and ``B L``:
    ``n eps`` times the abs analogue (the same float64 products of absolute values)."""
    x, W, b, dy = _rng_arrays(6, (3, 5, 20), (7, 5), (7,), (3, 7, 20))
    y64, c64 = Ly.linear_fwd(up(x), up(W), up(b))
    dx64, dW64, db64 = Ly.linear_bwd(c64, up(dy))
    with P.using("float32"):
        y, c = Ly.linear_fwd(x, W, b)
        dx, dW, db = Ly.linear_bwd(c, dy)
    ax, aW, ady = np.abs(up(x)), np.abs(up(W)), np.abs(up(dy))
    within(y, y64, (5 + 1) * EPS32 * (Ly.chanmix(aW, ax) + np.abs(up(b))[:, None]), "linear y")
    within(dx, dx64, 7 * EPS32 * Ly.chanmix(aW.T, ady), "linear dx")
    within(dW, dW64, 60 * EPS32 * Ly.chanmix_dW(ady, ax), "linear dW")
    within(db, db64, 60 * EPS32 * ady.sum((0, 2)), "linear db")


def test_embedding():
    """A gather (exact) and its adjoint, which adds each token's repeats (at most ``B L``)."""
    rng = np.random.default_rng(7)
    E = r32(rng.normal(size=(6, 4)))
    tok = rng.integers(0, 6, size=(3, 10))
    dy = r32(rng.normal(size=(3, 4, 10)))
    y64, c64 = Ly.embedding_fwd(tok, up(E))
    _, dE64 = Ly.embedding_bwd(c64, up(dy))
    with P.using("float32"):
        y, c = Ly.embedding_fwd(tok, E)
        _, dE = Ly.embedding_bwd(c, dy)
    assert y.dtype == F32 and np.array_equal(up(y), y64)
    _, dE_abs = Ly.embedding_bwd(c64, np.abs(up(dy)))
    within(dE, dE64, 30 * EPS32 * dE_abs, "embedding dE")


def test_gelu():
    """``y = x Phi(x)``: ``erf`` (~2 ulps) of ``x / sqrt 2``, ``Phi`` errs by ``<= 3 eps``, so
    ``|err y| <= 6 eps (|x| + |y|)``. ``dx = dy (Phi + x phi)`` with ``phi`` from ``exp(-x^2/2)``
    (the argument's rounding is amplified by ``x^2 / 2``): ``8 eps |dy| (1 + (1 + x^2) |x| phi)``
    (the float32 cache's ``Phi`` included)."""
    x, dy = _rng_arrays(8, (3, 5, 40), (3, 5, 40))
    x = r32(up(x) * 2)
    y64, c64 = Ly.gelu_fwd(up(x))
    (dx64,) = Ly.gelu_bwd(c64, up(dy))
    with P.using("float32"):
        y, c = Ly.gelu_fwd(x)
        (dx,) = Ly.gelu_bwd(c, dy)
    ax = np.abs(up(x))
    within(y, y64, 6 * EPS32 * (ax + np.abs(y64)), "gelu y")
    phi = np.exp(-0.5 * ax * ax) / math.sqrt(2 * math.pi)
    within(dx, dx64, 8 * EPS32 * np.abs(up(dy)) * (1 + (1 + ax * ax) * ax * phi), "gelu dx")


def test_glu():
    """``o = W s + b`` (``H + 1`` terms: ``Ea = (H + 1) eps o_abs``); ``g = sig(o_g)`` errs by
    ``Eg = Ea_g / 4 + 3 eps`` (slope <= 1/4, ``tanh`` ~1-2 ulps); ``z = a g``:
    ``Ea g + |a| Eg + eps |z|``. The backward (on each run's own cache): ``do = [dz g,
    dz a g (1 - g)]`` errs by ``|dz| Eg + eps |do_a|`` and ``|dz| (Ea / 4 + |a| Eg) + 4 eps
    |do_g|``; ``ds = W^T do`` adds ``2H eps`` of its abs analogue, ``dW`` and ``db`` ``B L eps``.
    Everything times 2 for second-order terms."""
    s, W, b, dz = _rng_arrays(9, (3, 6, 20), (12, 6), (12,), (3, 6, 20))
    H, n = 6, 60
    z64, c64 = Ly.glu_fwd(up(s), up(W), up(b))
    ds64, dW64, db64 = Ly.glu_bwd(c64, up(dz))
    with P.using("float32"):
        z, c = Ly.glu_fwd(s, W, b)
        ds, dW, db = Ly.glu_bwd(c, dz)
    _, a, g = c64
    o_abs = Ly.chanmix(np.abs(up(W)), np.abs(up(s))) + np.abs(up(b))[:, None]
    Ea, Eg = (H + 1) * EPS32 * o_abs[:, :H], (H + 1) * EPS32 * o_abs[:, H:] / 4 + 3 * EPS32
    within(z, z64, 2 * (Ea * g + np.abs(a) * Eg + EPS32 * np.abs(z64)), "glu z")
    adz = np.abs(up(dz))
    do_abs = np.concatenate([adz * g, adz * np.abs(a) * g * (1 - g)], axis=1)
    E_do = np.concatenate([adz * Eg + EPS32 * do_abs[:, :H],
                           adz * (Ea / 4 + np.abs(a) * Eg) + 4 * EPS32 * do_abs[:, H:]], axis=1)
    aW, as_ = np.abs(up(W)), np.abs(up(s))
    within(ds, ds64, 2 * (Ly.chanmix(aW.T, E_do) + 2 * H * EPS32 * Ly.chanmix(aW.T, do_abs)),
           "glu ds")
    within(dW, dW64, 2 * (Ly.chanmix_dW(E_do, as_) + n * EPS32 * Ly.chanmix_dW(do_abs, as_)),
           "glu dW")
    within(db, db64, 2 * (E_do.sum((0, 2)) + n * EPS32 * do_abs.sum((0, 2))), "glu db")


def test_gsu():
    """``Ter`` compares ``|v|`` with ``0.15 max|v|``: identical quantisations in both runs
    unless a value sits within a rounding of the cut (asserted away from it). Then ``P`` and
    ``Q`` sum ``H + 1`` terms (abs analogues ``P_abs``, ``Q_abs``), ``z = P Q`` errs by
    ``(H + 1) eps (P_abs |Q| + |P| Q_abs) + eps |z|``; the backward's products ``dP = dz Q``,
    ``dQ = dz P`` inherit those errors and the mixing sums add ``n eps`` of their abs
    analogues (``n = H`` for ``dx``, ``B L`` for ``dW, db, dc``). Times 2 (second order)."""
    x, W, b, c_, dz = _rng_arrays(10, (3, 6, 20), (6, 6), (6,), (6,), (3, 6, 20))
    H, n = 6, 60
    for v, axis in ((up(x), 1), (up(W), None)):
        m = np.abs(v).max(axis=axis, keepdims=axis is not None)
        assert np.abs(np.abs(v) - 0.15 * m).min() > 1e-5 * m.min(), "a value on the cut"
    z64, c64 = Ly.gsu_fwd(up(x), up(W), up(b), up(c_))
    g64 = Ly.gsu_bwd(c64, up(dz))
    with P.using("float32"):
        z, c = Ly.gsu_fwd(x, W, b, c_)
        g = Ly.gsu_bwd(c, dz)
    assert np.array_equal(c.Tx, c64.Tx) and np.array_equal(c.TW, c64.TW)
    Tx, TW, P64, Q64 = c64
    Pa = Ly.chanmix(np.abs(up(W)).T, np.abs(Tx)) + np.abs(up(b))[:, None]
    Qa = Ly.chanmix(np.abs(TW).T, np.abs(up(x))) + np.abs(up(c_))[:, None]
    eP, eQ = (H + 1) * EPS32 * Pa, (H + 1) * EPS32 * Qa
    within(z, z64, 2 * (eP * np.abs(Q64) + np.abs(P64) * eQ + EPS32 * np.abs(z64)), "gsu z")
    adz = np.abs(up(dz))
    dPa, dQa = adz * np.abs(Q64), adz * np.abs(P64)
    edP, edQ = adz * eQ + EPS32 * dPa, adz * eP + EPS32 * dQa
    aTx, aTW = np.abs(Tx), np.abs(TW)
    bounds = [Ly.chanmix(aTW, edQ) + H * EPS32 * Ly.chanmix(aTW, dQa),
              Ly.chanmix_dW(aTx, edP) + n * EPS32 * Ly.chanmix_dW(aTx, dPa),
              edP.sum((0, 2)) + n * EPS32 * dPa.sum((0, 2)),
              edQ.sum((0, 2)) + n * EPS32 * dQa.sum((0, 2))]
    for name, got, ref, bd in zip(("dx", "dW", "db", "dc"), g, g64, bounds):
        within(got, ref, 2 * bd, f"gsu {name}")


def _norm_bounds(x, xh, rstd, gamma, dy, dx, axes, n):
    """Bounds of a normalisation over ``n`` values (``axes``) and of its backward.

    ``mu`` and ``var`` are sums of ``n`` terms: ``mu`` errs by ``n eps max|x|``, which the
    centring turns into ``n eps max|x| rstd`` on ``xh`` (cancellation for an offset mean), and
    ``rstd`` by ``(n + 4) eps`` relative; so ``|err xh| <= Exh = (n + 6) eps (max|x| rstd +
    |xh|)``, ``y = xh gamma + beta``: ``|gamma| Exh + 2 eps (|xh gamma| + |beta|)``. The
    backward ``dx = rstd (g - mean g - xh mean(g xh))``, ``g = dy gamma``: the means' sums
    (``(n + 4) eps`` of their abs analogues), the cache's ``Exh`` through ``mean(g xh)`` and
    ``xh``, and ``rstd``'s relative error on ``|dx|``; ``dgamma = sum dy xh`` and
    ``dbeta = sum dy`` over the other axes. Times 2 (second order)."""
    keep = dict(axis=axes, keepdims=True)
    Mx = np.abs(x).max(**keep)
    Exh = (n + 6) * EPS32 * (Mx * rstd + np.abs(xh))
    g = np.abs(dy * gamma)
    m1, m2 = g.mean(**keep), (g * np.abs(xh)).mean(**keep)
    edx = rstd * ((n + 4) * EPS32 * (g + m1 + np.abs(xh) * m2) + Exh * m2
                  + np.abs(xh) * (g * Exh).mean(**keep)) \
        + np.abs(dx) * (n + 6) * EPS32 * (Mx * rstd + 1)
    red = tuple(i for i in range(x.ndim) if i != 1)
    N_other = x.size // x.shape[1]
    edg = (np.abs(dy) * Exh).sum(red) + (N_other + 2) * EPS32 * np.abs(dy * xh).sum(red)
    edb = (N_other + 2) * EPS32 * np.abs(dy).sum(red)
    return Exh, 2 * edx, 2 * edg, 2 * edb


def test_layernorm():
    x, gamma, beta, dy = _rng_arrays(11, (3, 6, 20), (6,), (6,), (3, 6, 20), loc=0.5)
    y64, c64 = Ly.layernorm_fwd(up(x), up(gamma), up(beta))
    dx64, dg64, db64 = Ly.layernorm_bwd(c64, up(dy))
    with P.using("float32"):
        y, c = Ly.layernorm_fwd(x, gamma, beta)
        dx, dg, db = Ly.layernorm_bwd(c, dy)
    xh, rstd, _ = c64
    G, Bt = up(gamma)[:, None], up(beta)[:, None]
    Exh, edx, edg, edb = _norm_bounds(up(x), xh, rstd, G, up(dy), dx64, (1,), 6)
    within(y, y64, 2 * (np.abs(G) * Exh + 2 * EPS32 * (np.abs(xh * G) + np.abs(Bt))),
           "layernorm y")
    within(dx, dx64, edx, "layernorm dx")
    within(dg, dg64, edg, "layernorm dgamma")
    within(db, db64, edb, "layernorm dbeta")


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm(training):
    """As LayerNorm over ``n = B L`` values per channel; the new running statistics mix the
    old ones with the batch mean and unbiased variance: ``(n + 6) eps`` relative to their
    magnitudes (plus the mean's cancellation term). Eval mode: an affine map (3 roundings)."""
    x, gamma, beta, dy = _rng_arrays(12, (4, 5, 15), (5,), (5,), (4, 5, 15), loc=0.5)
    rm, rv = r32(np.full(5, 0.2)), r32(np.full(5, 1.5))
    y64, c64, (m64, v64) = Ly.batchnorm_fwd(up(x), up(gamma), up(beta), up(rm), up(rv), training)
    dx64, dg64, db64 = Ly.batchnorm_bwd(c64, up(dy))
    with P.using("float32"):
        y, c, (m, v) = Ly.batchnorm_fwd(x, gamma, beta, rm, rv, training)
        dx, dg, db = Ly.batchnorm_bwd(c, dy)
    xh, rstd = c64[0], c64[1][None, :, None]
    G, Bt = up(gamma)[None, :, None], up(beta)[None, :, None]
    if training:
        n = 60
        Exh, edx, edg, edb = _norm_bounds(up(x), xh, rstd, G, up(dy), dx64, (0, 2), n)
        Mx = np.abs(up(x)).max((0, 2))
        within(m, m64, (n + 6) * EPS32 * (np.abs(m64) + Mx), "batchnorm running mean")
        within(v, v64, 2 * (n + 6) * EPS32 * (np.abs(v64) + Mx * Mx), "batchnorm running var")
    else:
        Exh = 3 * EPS32 * (np.abs(xh) + np.abs(up(x)) * rstd)
        edx = 4 * EPS32 * np.abs(dx64)
        edg = 60 * EPS32 * np.abs(up(dy) * xh).sum((0, 2)) + (np.abs(up(dy)) * Exh).sum((0, 2))
        edb = 60 * EPS32 * np.abs(up(dy)).sum((0, 2))
        assert m.dtype == F32 and np.array_equal(m, rm) and np.array_equal(v, rv)
    within(y, y64, 2 * (np.abs(G) * Exh + 2 * EPS32 * (np.abs(xh * G) + np.abs(Bt))),
           f"batchnorm y {training}")
    within(dx, dx64, edx, f"batchnorm dx {training}")
    within(dg, dg64, edg, f"batchnorm dgamma {training}")
    within(db, db64, edb, f"batchnorm dbeta {training}")


def test_dropout_meanpool_cross_entropy():
    """Dropout: the same draws, the mask ``1/(1-p)`` rounded once, one product: ``eps |y|``.
    Mean over ``L``: ``(L + 1) eps`` of the mean of ``|x|``; its adjoint one division.
    Cross-entropy over ``C`` classes: ``logp = z - log sum exp z`` errs by ``(C + 4) eps
    (|z| + |lse| + 1)`` (``z`` shifted by its max, ``exp``/``log`` ~1 ulp; the sum of the
    exponentials is >= 1 and errs by ``C eps`` relative, which ``log`` turns into ``C eps``
    absolute: the ``+ 1``), the loss averages ``B`` of them; ``dlogits = (exp(logp) -
    onehot) / B`` errs by ``softmax`` times that, ``+ eps``."""
    x, dy = _rng_arrays(13, (4, 5, 15), (4, 5, 15))
    mask64 = Ly.dropout_mask(np.random.default_rng(1), x.shape, 0.3)
    with P.using("float32"):
        mask = Ly.dropout_mask(np.random.default_rng(1), x.shape, 0.3)
        xd, _ = Ly.dropout_fwd(x, mask)
        (dd,) = Ly.dropout_bwd(mask, dy)
    assert mask.dtype == F32 and np.array_equal(mask, r32(mask64))
    within(xd, up(x) * mask64, EPS32 * np.abs(up(x) * mask64), "dropout y")
    within(dd, up(dy) * mask64, EPS32 * np.abs(up(dy) * mask64), "dropout dx")
    pool64, shp = Ly.meanpool_fwd(up(x))
    with P.using("float32"):
        pool, shp32 = Ly.meanpool_fwd(x)
        (dp,) = Ly.meanpool_bwd(shp32, r32(pool64))
    within(pool, pool64, 16 * EPS32 * np.abs(up(x)).mean(2), "meanpool y")
    within(dp, np.broadcast_to(up(r32(pool64))[:, :, None] / 15, x.shape),
           EPS32 * np.abs(up(r32(pool64)))[:, :, None] / 15, "meanpool dx")
    rng = np.random.default_rng(14)
    logits = r32(rng.normal(0, 3, size=(8, 5)))
    labels = rng.integers(0, 5, 8)
    loss64, ce64 = Ly.cross_entropy_fwd(up(logits), labels)
    (d64,) = Ly.cross_entropy_bwd(ce64)
    with P.using("float32"):
        loss, ce = Ly.cross_entropy_fwd(logits, labels)
        (d,) = Ly.cross_entropy_bwd(ce)
    logp64 = ce64[0]
    z = up(logits) - up(logits).max(1, keepdims=True)
    elp = (5 + 4) * EPS32 * (np.abs(z) + np.abs(z - logp64) + 1)  # (B, C)
    within(ce[0], logp64, elp, "cross-entropy logp")
    assert abs(loss - loss64) <= (8 + 1) * EPS32 * np.abs(logp64).max() + elp.max()
    within(d, d64, np.exp(logp64) * elp / 8 + EPS32 / 8, "cross-entropy dlogits")


# ============================================================================================
# The whole model
# ============================================================================================

MODEL_CASES = MODEL_TEST_CASES  # tests/test_model.py's cases: every family, norms, options


def model_depth(cfg, L):
    """Rounded operations on the longest path of the forward, counted per stage: encoder
    ``d_input + 1``; per block the convolution (``L`` direct terms or ``C_FFT log2 n``, the
    kernel's rounding), the norm (two sums over ``H`` or ``B L``: ``2H + 10``), the mixing
    (``2H + 8``: sums over ``H`` and the gate), the neuron (``8``: a few per step, damped by
    ``tau``), the threshold scaling (``4``) and the residual; mean over ``L``; decoder ``H + 1``;
    cross-entropy ``C + 6``. The backward traverses the same depth again (factor 2)."""
    H = cfg.d_model
    conv = L + C_FFT * math.log2(C.fft_length(L)) + 1
    block = conv + (2 * H + 10) + (2 * H + 8) + 8 + 4 + 1
    fwd = (cfg.d_input + 1) + cfg.n_layers * block + L + (H + 1) + (cfg.n_classes + 6)
    return 2 * fwd


#: Amplification allowance of the model bound: LayerNorm rescales by ``1 / sigma`` (relative
#: errors kept, cancellation in centring adds about one unit), the surrogates' slopes are
#: <= 1 on the scaled membranes, the GLU's gate slope <= 1/4; 8 covers these on a model of
#: order-one activations (measured worst ratio: see RATIOS).
C_MODEL = 8.0


def _model_pair(case, seed=1):
    """The float64 model on float32-rounded parameters and inputs, and its float32 twin."""
    cfg, p, buf, x, y = small_model(**case)
    p = {k: up(r32(v)) for k, v in p.items()}
    buf = {k: up(r32(v)) for k, v in buf.items()}
    if not cfg.vocab:
        x = up(r32(x))
    return cfg, dataclasses.replace(cfg, dtype="float32"), p, buf, x, y


@pytest.mark.parametrize("case", MODEL_CASES,
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_model_loss_and_grads(case):
    """``loss_and_grads`` (smooth, frozen SDN/GSU constants shared by both runs, rounded to
    float32): float32 logits, float64 gradients that are float32 values, new buffers float64;
    loss and every gradient within ``C_MODEL depth eps`` relative to the tensor's scale
    ``max|g| + 1e-2 max_all|g|`` (an element of a tensor is computed with the same depth as its
    largest element; the floor covers tensors whose gradients cancel to far below the rest,
    whose absolute error is set by the terms that cancel, as in tests/test_model.py)."""
    cfg, cfg32, p, buf, x, y = _model_pair(case)
    frozen = M.frozen_constants(cfg, p, buf, x, rng=np.random.default_rng(5))
    frozen = {k: up(r32(v)) for k, v in frozen.items()}
    frozen32 = {k: r32(v) for k, v in frozen.items()}
    x32 = x if cfg.vocab else r32(x)
    l64, lg64, g64, nb64, _ = M.loss_and_grads(cfg, p, buf, x, y, training=True,
                                               rng=np.random.default_rng(5), smooth=True,
                                               frozen=frozen)
    l32, lg32, g32, nb32, _ = M.loss_and_grads(cfg32, p, buf, x32, y, training=True,
                                               rng=np.random.default_rng(5), smooth=True,
                                               frozen=frozen32)
    assert lg32.dtype == F32 and lg64.dtype == F64
    assert set(g32) == set(p) and set(nb32) == set(nb64)
    for k, v in list(g32.items()) + list(nb32.items()):
        assert v.dtype == F64, k
        assert np.array_equal(up(r32(v)), v), f"{k}: not the up-cast of float32 values"
    tol = C_MODEL * model_depth(cfg, x.shape[1]) * EPS32
    assert abs(l32 - l64) <= tol * max(abs(l64), 1.0), (l32, l64, tol)
    RATIOS["model loss"] = max(RATIOS.get("model loss", 0.0),
                               abs(l32 - l64) / (tol * max(abs(l64), 1.0)))
    within(lg32, lg64, tol * (np.abs(lg64).max() + 1.0), "model logits")
    top = max(float(np.abs(v).max()) for v in g64.values())
    for k in g64:
        scale = float(np.abs(g64[k]).max()) + 1e-2 * top
        within(r32(g32[k]), g64[k], tol * scale, f"model grad {case['activation']}")
    for k in nb64:
        within(r32(nb32[k]), nb64[k], tol * (np.abs(nb64[k]).max() + 1.0), "model buffers")


@pytest.mark.parametrize("activation", ["gelu", "lif"])
def test_float32_is_a_float32_computation(activation):
    """Not float64 then cast: on a generic input the float32 loss differs from the float64
    one (but within the bound above), and the logits differ from the float64 logits rounded
    to float32."""
    cfg, cfg32, p, buf, x, y = _model_pair(dict(activation=activation))
    l64, lg64, _, _, _ = M.loss_and_grads(cfg, p, buf, x, y, training=False)
    l32, lg32, _, _, _ = M.loss_and_grads(cfg32, p, buf, r32(x), y, training=False)
    tol = C_MODEL * model_depth(cfg, x.shape[1]) * EPS32
    assert 0 < abs(l32 - l64) <= tol * max(abs(l64), 1.0), (l32, l64)
    assert not np.array_equal(lg32, r32(lg64))


def test_every_family_is_compared():
    assert {c["activation"] for c in MODEL_CASES} == set(ACTIVATIONS)


def test_model_input_dtypes():
    """A float32 model takes float32 inputs (tokens: int64) and float64 master parameters."""
    cfg, cfg32, p, buf, x, y = _model_pair(dict(activation="lif"))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        M.model_fwd(cfg32, p, buf, x)
    with pytest.raises(TypeError, match="x must have dtype float64"):
        M.model_fwd(cfg, p, buf, r32(x))
    assert M.model_inputs(cfg32, x).dtype == F32 and M.model_inputs(cfg, x) is x
    cfg_t, cfg_t32, p_t, buf_t, tok, y_t = _model_pair(dict(activation="gelu", vocab=7))
    logits, _, _, _ = M.model_fwd(cfg_t32, p_t, buf_t, tok)
    assert logits.dtype == F32


# ============================================================================================
# Training
# ============================================================================================

#: A small recall task (K = 4 keys, chance 0.25) that the float64 model learns to ~0.99 test
#: accuracy in 10 epochs (about half a second).
TASK = dict(name="recall", n=600, L=30, seed=0)
MODEL = dict(d_model=16, d_state=4, n_layers=1, activation="lif")
TRAIN = TrainConfig(epochs=10, batch_size=32, lr=1e-2, seed=0)


def _train(tmp_path, name, dtype, tcfg=TRAIN):
    data = make_task(TASK["name"], n=TASK["n"], L=TASK["L"], seed=TASK["seed"])
    cfg = M.ModelConfig.for_data(data, dtype=dtype, **MODEL)
    losses = []

    def on_event(ev):
        if hasattr(ev, "step") and hasattr(ev, "loss") and not hasattr(ev, "metrics"):
            losses.append(ev.loss)
    metrics = train(cfg, tcfg, data, str(tmp_path / name), progress=on_event)
    return metrics, losses, load_checkpoint(str(tmp_path / name / "checkpoint.h5"))


def test_same_learning(tmp_path):
    """float32 and float64 runs from the same seed.

    Loss curves: the first step's loss differs by the model bound (~1e-4 relative); during
    the warm-up (10 % of 150 steps) each AdamW update moves a parameter by at most
    ``lr k / 15`` and the two runs' updates differ only by the gradients' float32 error
    (Adam's ``m / sqrt(v)`` is a ratio of the same error size), so over the first 5 steps the
    losses agree to 5 times the model bound ``C_MODEL depth eps`` (about ``2e-3`` relative
    here: one bound per step, the differences of the updates adding at most one each).
    Later the runs separate (a spike flip changes a gradient by O(1)), so only the outcome
    is compared: both reach test accuracy >= 0.9 (chance 0.25;
    the float64 run reaches ~0.99) and differ by at most 0.05 (6 of 120 test samples, ~4
    binomial standard deviations at 0.98)."""
    m64, loss64, ck64 = _train(tmp_path, "f64", "float64")
    m32, loss32, ck32 = _train(tmp_path, "f32", "float32")
    assert ck32.cfg.dtype == "float32" and ck64.cfg.dtype == "float64"
    assert all(v.dtype == F64 for v in ck32.params.values())
    assert len(loss32) == len(loss64) == 150
    tol = 5 * C_MODEL * model_depth(ck64.cfg, TASK["L"]) * EPS32
    first = np.abs(np.array(loss32[:5]) - np.array(loss64[:5])) / np.abs(loss64[:5])
    RATIOS["training loss, first 5 steps"] = float(first.max() / tol)
    assert first.max() <= tol, (first, tol)
    assert first.max() > 0  # a float32 run, not the float64 one again
    a32, a64 = m32[-1]["test_accuracy"], m64[-1]["test_accuracy"]
    assert a64 >= 0.9 and a32 >= 0.9, (a32, a64)
    assert abs(a32 - a64) <= 0.05, (a32, a64)


def test_float32_training_is_deterministic(tmp_path):
    tcfg = dataclasses.replace(TRAIN, epochs=2)
    ma, _, a = _train(tmp_path, "a", "float32", tcfg)
    mb, _, b = _train(tmp_path, "b", "float32", tcfg)
    assert ma == mb
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    assert np.array_equal(a.opt["step"], b.opt["step"])
    for part in ("exp_avg", "exp_avg_sq"):
        for k in a.opt[part]:
            assert np.array_equal(a.opt[part][k], b.opt[part][k]), (part, k)


# ============================================================================================
# Errors
# ============================================================================================


def _s4d_inputs(dtype):
    p = {k: v.astype(dtype) for k, v in s4d_init(2, 4, seed=0).items()}
    return np.zeros((1, 2, 5), dtype), p


def _with(pdict, key, dtype):
    return {**pdict, key: pdict[key].astype(dtype)}


NCFG = NeuronConfig(reset="hard", tau=0.125)
Z = {F32: np.zeros((1, 2, 5), F32), F64: np.zeros((1, 2, 5), F64)}

#: name -> (call given (good dtype, bad dtype) -> runs the op with one argument of the bad
#: dtype, the argument's name in the message)
WRONG_DTYPE = {
    "s4d u": (lambda g, b: s4d_layer_fwd(_s4d_inputs(b)[0], _s4d_inputs(g)[1]), "u"),
    "s4d C_re": (lambda g, b: s4d_layer_fwd(_s4d_inputs(g)[0],
                                            _with(_s4d_inputs(g)[1], "C_re", b)), "C_re"),
    "s4d D": (lambda g, b: s4d_layer_fwd(_s4d_inputs(g)[0], _with(_s4d_inputs(g)[1], "D", b)),
              "D"),
    "conv K": (lambda g, b: C.conv_fwd(Z[g], np.zeros((2, 5), b)), "K"),
    "neuron x": (lambda g, b: neuron_fwd(Z[b], NCFG), "x"),
    "neuron rho": (lambda g, b: neuron_fwd(Z[g], NCFG.replace(reset="refractory"),
                                           rho=np.zeros(2, b)), "rho"),
    "neuron_bwd ds": (lambda g, b: neuron_bwd(Z[g], Z[g], Z[g], NCFG, Z[b]), "ds"),
    "threshold ln_vth": (lambda g, b: threshold_scale_fwd(Z[g], np.zeros(2, b)), "ln_vth"),
    "surrogate z": (lambda g, b: SURROGATES["atan"].grad(np.zeros(3, b)), "z"),
    "sdn x": (lambda g, b: sdn_neuron_fwd(Z[b], {k: v.astype(g) for k, v in
                                                 sdn_weights().items()}, NCFG), "x"),
    "layernorm x": (lambda g, b: Ly.layernorm_fwd(Z[b], np.ones(2, g), np.zeros(2, g)), "x"),
    "glu W": (lambda g, b: Ly.glu_fwd(Z[g], np.zeros((4, 2), b), np.zeros(4, g)), "W"),
}


@pytest.mark.parametrize("name", sorted(WRONG_DTYPE))
@pytest.mark.parametrize("mode", ["float32", "float64"])
def test_wrong_dtype_is_a_type_error_naming_the_argument(name, mode):
    """Under ``using("float32")`` a float64 input is refused, outside it a float32 input; the
    message names the argument and the fix (``.astype``), nothing is cast silently."""
    call, arg = WRONG_DTYPE[name]
    good, bad = (F32, F64) if mode == "float32" else (F64, F32)
    with P.using(mode):
        with pytest.raises(TypeError, match=rf"\b{arg}\b.*{np.dtype(bad).name}.*astype"):
            call(good, bad)


STATEFUL = {
    "neuron state": lambda: neuron_fwd(Z[F32], NCFG, state=(np.zeros((1, 2), F32),
                                                             np.zeros((1, 2), np.int64))),
    "neuron return_state": lambda: neuron_fwd(Z[F32], NCFG, return_state=True),
    "s4d return_state": lambda: s4d_layer_fwd(*_s4d_inputs(F32), return_state=True),
    "sdn return_state": lambda: sdn_neuron_fwd(
        Z[F32], {k: r32(v) for k, v in sdn_weights().items()}, NCFG, return_state=True),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_states_are_float64_only(name):
    """Chunk states (streams) belong to the float64 reference path: refused under float32."""
    with P.using("float32"), pytest.raises(RuntimeError, match="float64"):
        STATEFUL[name]()


def test_streams_and_golden_generation_refuse_float32(tmp_path):
    cfg, cfg32, p, buf, _, _ = _model_pair(dict(activation="lif"))
    with pytest.raises(ValueError, match="float32 model cannot stream"):
        ModelStream(cfg32, p, buf)
    from refimpl import golden as G
    with P.using("float32"), pytest.raises(RuntimeError, match="golden generation"):
        G.generate(str(tmp_path / "g"), suites=["fftconv"])
    with P.using("float32"), pytest.raises(RuntimeError, match="golden generation"):
        G.build_suite("fftconv")
    assert not (tmp_path / "g").exists() or not os.listdir(tmp_path / "g")


# ============================================================================================
# The CLI
# ============================================================================================

SMALL = ["--task", "recall", "--samples", "64", "--length", "16", "--d-model", "8",
         "--d-state", "4", "--layers", "1", "--epochs", "2", "--batch-size", "16"]


def test_cli_train_float32_and_evaluate(tmp_path, monkeypatch):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli_main, ["train", "--activation", "lif", "--dtype", "float32",
                                      "--out", str(out)] + SMALL)
    assert r.exit_code == 0, r.output
    with h5py.File(out / "checkpoint.h5", "r") as f:
        assert json.loads(f.attrs["model_config"])["dtype"] == "float32"
    ck = load_checkpoint(str(out / "checkpoint.h5"))
    assert ck.cfg.dtype == "float32"
    assert all(v.dtype == F64 for v in ck.params.values())  # float64 master weights
    assert json.loads((out / "config.json").read_text())["model"]["dtype"] == "float32"
    metrics = json.loads((out / "metrics.json").read_text())
    seen = []
    model_fwd = M.model_fwd

    def spy(cfg, p, buf, x, *args, **kw):
        out_ = model_fwd(cfg, p, buf, x, *args, **kw)
        seen.append((x.dtype, out_[0].dtype))
        return out_
    monkeypatch.setattr(M, "model_fwd", spy)
    r = CliRunner().invoke(cli_main, ["evaluate", str(out / "checkpoint.h5")])
    assert r.exit_code == 0, r.output
    assert seen and all(d == (F32, F32) for d in seen), seen  # computed in float32
    monkeypatch.undo()
    acc = float(r.output.split("test accuracy")[1].split()[0])
    # evaluated in float32 as during training: the same accuracy (printed to 4 places)
    assert acc == pytest.approx(metrics[-1]["test_accuracy"], abs=5e-5)
    # --stream runs the float64 stream from the float64 master weights (issue 23), beside the
    # float64 parallel form it equals
    r = CliRunner().invoke(cli_main, ["evaluate", str(out / "checkpoint.h5"), "--stream"])
    assert r.exit_code == 0, r.output
    assert "runs in float64 from the stored float64 master weights" in r.output
    n = int(r.output.split("predictions")[1].split()[2])
    assert f"predictions       {n} of {n} equal" in r.output


def test_cli_rejects_float16(tmp_path):
    r = CliRunner().invoke(cli_main, ["train", "--dtype", "float16", "--out",
                                      str(tmp_path / "o")] + SMALL)
    assert r.exit_code == 2 and "Invalid value for '--dtype'" in r.output
    assert "'float64'" in r.output and "'float32'" in r.output
    assert not (tmp_path / "o").exists()
