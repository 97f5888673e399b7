"""The fast training path's kernels (issue 13) against their old NumPy forms, finite differences
and dot products.

- ``fftconv_fwd`` / ``fftconv_vjp`` reuse the forward's spectra: the same floating-point
  operations as ``fftconv`` / ``fftconv_bwd`` in the same order, so compared exactly.
- ``chanmix`` (batched GEMM) and ``chanmix_dW`` (GEMM per batch row) against the old
  ``tensordot`` forms: a different summation order. Both sides are sums of ``K`` products, each
  within ``K eps sum |terms|`` of the exact value (Higham, Accuracy and Stability, eq. 3.5, any
  order), so they differ by at most ``2 K eps sum |terms|``.
- The fused GLU gate and LayerNorm kernels against the NumPy expressions they replace (kept
  here verbatim as ``_old_*``): the tolerance of each comparison is derived next to it.
- Finite differences (central, Richardson, ``eps = 1e-5``: truncation O(eps^4), rounding about
  1e-11 relative) and dot-product tests ``<J v, c> = <v, J^T c>`` on every new kernel.
"""
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from refimpl import conv, layers as Ly, threads as refimpl_threads
from refimpl.s4d import s4d_layer_bwd, s4d_layer_fwd

from gradcheck import assert_close_scalar, coordinate_fd, directional_fd
from strategies import ssm_cases

EPS = np.finfo(np.float64).eps
FD_TOL = 1e-7  # finite differences: O(eps_fd^4) truncation + ~1e-11 rounding, margin 1e4


# --------------------------------------------------------------------------------------------
# The convolution's cached spectra
# --------------------------------------------------------------------------------------------


@given(ssm_cases(max_L=200), st.booleans())
def test_cached_spectra_equal_recomputed(case, with_D):
    p, u, disc = case
    K = np.random.default_rng(0).normal(size=(2,) * (p["C_re"].ndim == 3) + u.shape[1:])
    D = p["D"] if with_D else None
    y, cache = conv.fftconv_fwd(u, K, D)
    assert np.array_equal(y, conv.fftconv(u, K, D))
    dy = np.random.default_rng(1).normal(size=u.shape)
    for new, old in zip(conv.fftconv_vjp(cache, dy), conv.fftconv_bwd(u, K, D, dy)):
        assert (new is None and old is None) or np.array_equal(new, old)


@given(ssm_cases(max_L=150))
@settings(max_examples=10)
def test_s4d_layer_backward_reuses_spectra(case):
    p, u, disc = case
    assume(u.shape[-1] > conv.TOEPLITZ_MAX_L)  # the FFT form (the Toeplitz form: below)
    y, cache = s4d_layer_fwd(u, p, disc)
    assert cache.conv is not None
    dy = np.random.default_rng(2).normal(size=u.shape)
    du, g = s4d_layer_bwd(cache, dy)
    du0, g0 = s4d_layer_bwd(cache._replace(conv=None), dy)  # the recomputing path
    assert np.array_equal(du, du0)
    assert g.keys() == g0.keys() and all(np.array_equal(g[k], g0[k]) for k in g)


def test_vjp_checks_dy():
    _, cache = conv.fftconv_fwd(np.ones((1, 2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="dy must have shape"):
        conv.fftconv_vjp(cache, np.ones((1, 2, 4)))
    with pytest.raises(TypeError, match="dy must have dtype float64"):
        conv.fftconv_vjp(cache, np.ones((1, 2, 3), dtype=np.float32))


# --------------------------------------------------------------------------------------------
# Channel mixing GEMMs
# --------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), st.integers(1, 50))


@given(shapes, st.integers(0, 2**32 - 1), st.booleans())
def test_chanmix_against_tensordot(shape, seed, long):
    Bsz, I, O, L = shape
    L += (Ly.BATCHED_MAX_L - 40) * long  # both forms: batched GEMMs and one GEMM
    rng = np.random.default_rng(seed)
    W, x, dy = rng.normal(size=(O, I)), rng.normal(size=(Bsz, I, L)), rng.normal(size=(Bsz, O, L))
    old = np.tensordot(W, x, axes=([1], [1])).transpose(1, 0, 2)  # the old chanmix
    bound = 2 * I * EPS * np.matmul(np.abs(W), np.abs(x))  # K = I terms per output
    assert np.all(np.abs(Ly.chanmix(W, x) - old) <= bound)
    old_dW = np.tensordot(dy, x, axes=([0, 2], [0, 2]))  # (O, I)
    bound = 2 * Bsz * L * EPS * np.tensordot(np.abs(dy), np.abs(x), axes=([0, 2], [0, 2]))
    assert np.all(np.abs(Ly.chanmix_dW(dy, x) - old_dW) <= bound)


def test_chanmix_dot_products():
    """Both GEMMs are linear: ``<chanmix(W, v), c> = <v, chanmix(W^T, c)>`` and
    ``<chanmix_dW(c, x), V> = <c, chanmix(V, x)>``; sums of ~B H L = 240 products of O(1)
    values: 1e-13 relative is ~400 eps."""
    rng = np.random.default_rng(5)
    W, v, c = rng.normal(size=(6, 4)), rng.normal(size=(3, 4, 10)), rng.normal(size=(3, 6, 10))
    assert_close_scalar(float((Ly.chanmix(W, v) * c).sum()),
                        float((v * Ly.chanmix(W.T, c)).sum()), 1e-13, 1.0)
    V = rng.normal(size=(6, 4))
    assert_close_scalar(float((Ly.chanmix_dW(c, v) * V).sum()),
                        float((c * Ly.chanmix(V, v)).sum()), 1e-13, 1.0)


def test_chanmix_dW_empty_batch():
    assert np.array_equal(Ly.chanmix_dW(np.ones((0, 3, 4)), np.ones((0, 2, 4))), np.zeros((3, 2)))


# --------------------------------------------------------------------------------------------
# GLU gate and LayerNorm: old NumPy forms, verbatim
# --------------------------------------------------------------------------------------------


# The library's own NumPy for the transcendental ufuncs of the old forms (the same code on both
# sides, so exact comparisons hold; under REFIMPL_TEST_ULP_JITTER this module's ``np`` is
# jittered, the library's is not).
LIB_NP = Ly.np


def _old_glu_gate(o, b):
    H = o.shape[1] // 2
    o = o + b[:, None]
    a, g = o[:, :H], 0.5 * (1.0 + LIB_NP.tanh(0.5 * o[:, H:]))
    return a, g, a * g


def _old_glu_gate_bwd(dz, a, g):
    do = np.concatenate([dz * g, dz * a * g * (1.0 - g)], axis=1)
    return do, do.sum(axis=(0, 2))


def _old_layernorm(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)
    xh = xc * rstd
    return xh * gamma[:, None] + beta[:, None], xh, rstd


def _old_layernorm_bwd(xh, rstd, gamma, dy):
    g = dy * gamma[:, None]
    dx = rstd * (g - g.mean(axis=1, keepdims=True) - xh * (g * xh).mean(axis=1, keepdims=True))
    return dx, (dy * xh).sum(axis=(0, 2)), dy.sum(axis=(0, 2))


@given(shapes, st.integers(0, 2**32 - 1), st.floats(0.1, 30.0))
def test_glu_gate_against_numpy(shape, seed, scale):
    Bsz, H, _, L = shape
    rng = np.random.default_rng(seed)
    o, b = scale * rng.normal(size=(Bsz, 2 * H, L)), rng.normal(size=2 * H)
    a, g, z = Ly._glu_gate(o, b)
    a0, g0, z0 = _old_glu_gate(o, b)
    # the same operations in the same order (NumPy's tanh on both sides): exact
    assert np.array_equal(a, a0) and np.array_equal(g, g0) and np.array_equal(z, z0)
    dz = rng.normal(size=(Bsz, H, L))
    do, db_rows, db = np.empty((Bsz, 2 * H, L)), np.empty((Bsz, 2 * H)), np.empty(2 * H)
    Ly._glu_gate_bwd(dz, a0, g0, do, db_rows)
    Ly._sum_rows(db_rows, db)
    do0, db0 = _old_glu_gate_bwd(dz, a0, g0)
    assert np.array_equal(do, do0)  # the same products in the same order
    bound = 2 * Bsz * L * EPS * np.abs(do0).sum(axis=(0, 2))  # sums of B L terms, any order
    assert np.all(np.abs(db - db0) <= bound)


@given(shapes, st.integers(0, 2**32 - 1), st.floats(-3.0, 3.0))
def test_layernorm_against_numpy(shape, seed, offset):
    Bsz, H, _, L = shape
    rng = np.random.default_rng(seed)
    x = offset + rng.normal(size=(Bsz, H, L))
    gamma, beta = 1 + 0.1 * rng.normal(size=H), rng.normal(size=H)
    y, (xh, rstd, gam) = Ly.layernorm_fwd(x, gamma, beta)
    y0, xh0, rstd0 = _old_layernorm(x, gamma, beta)
    # Mean and variance are sums of H terms (each side within H eps sum|terms|, any order);
    # their errors reach xh through (x - mu) rstd: |d xh| <= c H eps (max|x| rstd) (1 + |xh|^2)
    # with c = 4 (two sums, two sides). The other operations are the same on both sides.
    amp = np.abs(x).max(axis=1, keepdims=True) * rstd0  # (B, 1, L) relative amplification
    tol = 4 * (H + 2) * EPS * amp * (1 + xh0 * xh0)
    assert np.all(np.abs(rstd - rstd0) <= tol.max(axis=1, keepdims=True) * rstd0)
    assert np.all(np.abs(xh - xh0) <= tol)
    assert np.all(np.abs(y - y0) <= tol * np.abs(gamma)[:, None] + 2 * EPS * (np.abs(y0) + 1))
    dy = rng.normal(size=x.shape)
    dx, dgamma, dbeta = Ly.layernorm_bwd((xh0, rstd0, gamma), dy)
    dx0, dgamma0, dbeta0 = _old_layernorm_bwd(xh0, rstd0, gamma, dy)
    # dx: two means over H terms, 2 H eps of sum|g| and sum|g xh| each, times rstd.
    gab = np.abs(dy * gamma[:, None])
    tol = 4 * (H + 2) * EPS * rstd0 * (gab.sum(1, keepdims=True) / H * (1 + np.abs(xh0)) * 2
                                       + gab * (1 + np.abs(xh0)))
    assert np.all(np.abs(dx - dx0) <= tol)
    n = Bsz * L  # parameter sums over B L terms
    assert np.all(np.abs(dgamma - dgamma0) <= 2 * n * EPS * np.abs(dy * xh0).sum(axis=(0, 2)))
    assert np.all(np.abs(dbeta - dbeta0) <= 2 * n * EPS * np.abs(dy).sum(axis=(0, 2)))


# --------------------------------------------------------------------------------------------
# Finite differences and dot products through the public wrappers
# --------------------------------------------------------------------------------------------


def _check_fd(fwd, bwd, args, rng):
    """Every gradient of ``bwd(cache, c)`` against coordinate and directional differences of
    ``<fwd(*args), c>``, and the dot-product test ``<J v, c> = <v, J^T c>`` (``J v`` by a
    directional difference, since the maps are nonlinear)."""
    out, cache = fwd(*args)
    c = rng.normal(size=out.shape)
    grads = bwd(cache, c)
    for i, g in enumerate(grads):
        def f(v, i=i):
            a = list(args)
            a[i] = v
            return float((fwd(*a)[0] * c).sum())
        fd = coordinate_fd(f, args[i], 1e-5)
        np.testing.assert_allclose(g, fd, rtol=FD_TOL, atol=FD_TOL * (1 + np.abs(fd).max()))
        v = rng.normal(size=args[i].shape)
        assert_close_scalar(float((g * v).sum()), directional_fd(f, args[i], v, 1e-5), FD_TOL,
                            1.0)


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 1), (3, 2, 2)])
def test_layernorm_fd_and_dot_product(shape):
    rng = np.random.default_rng(8)
    x = rng.normal(size=shape)
    gamma, beta = 1 + 0.1 * rng.normal(size=shape[1]), rng.normal(size=shape[1])
    _check_fd(lambda x, g, b: Ly.layernorm_fwd(x, g, b), Ly.layernorm_bwd, [x, gamma, beta], rng)


def test_linear_fd():
    rng = np.random.default_rng(9)
    _check_fd(Ly.linear_fwd, Ly.linear_bwd,
              [rng.normal(size=(3, 4, 6)), rng.normal(size=(5, 4)), rng.normal(size=5)], rng)


# --------------------------------------------------------------------------------------------
# The Toeplitz form of the convolution (short sequences)
# --------------------------------------------------------------------------------------------


def _conv_abs_bound(u, K, D, dy):
    """Rounding bounds of the difference of the two forms, per element.

    Toeplitz form: sums of ``L`` products, each within ``L eps sum|terms|`` (the magnitude
    convolution, computed directly on ``|u|, |K|, |dy|``). FFT form: three transforms in a row
    (forward, product, inverse), each within ``5 log2(n) eps`` of the 2-norms involved
    (Higham, Accuracy and Stability, section 24.1), so an output of row ``(b, h)`` is within
    ``15 log2(n) eps ||u[b, h]|| ||K[h]||`` (``dy`` for ``du``; ``dK`` sums that over ``b``).
    """
    L = u.shape[-1]
    lg = 15 * np.log2(conv.fft_length(L)) * EPS
    Ka = np.abs(K)
    y_mag, cache = conv.conv_fwd(np.abs(u), Ka, None if D is None else np.abs(D),
                                 method="toeplitz")
    du_mag, dK_mag, dD_mag = conv.conv_vjp(cache, np.abs(dy))
    kn = np.sqrt((K * K).reshape(-1, K.shape[-2], L).sum(axis=(0, 2)))  # (H,) ||K[h]||
    un, dyn = np.linalg.norm(u, axis=2), np.linalg.norm(dy, axis=2)  # (B, H) each
    y_b = L * EPS * y_mag + lg * (un * kn)[..., None]
    du_b = L * EPS * du_mag + lg * (dyn * kn)[..., None]
    dK_b = L * EPS * dK_mag + lg * (un * dyn).sum(0)[:, None]
    dD_b = None if dD_mag is None else L * u.shape[0] * EPS * dD_mag
    return [2 * b if b is not None else None for b in (y_b, du_b, dK_b, dD_b)]  # both sides


@given(ssm_cases(max_L=80), st.booleans(), st.integers(0, 2**32 - 1))
def test_toeplitz_form_against_fft(case, with_D, seed):
    p, u, _ = case
    rng = np.random.default_rng(seed)
    K = rng.normal(size=(2,) * (p["C_re"].ndim == 3) + u.shape[1:])
    D = p["D"] if with_D else None
    dy = rng.normal(size=u.shape)
    y_t, c_t = conv.conv_fwd(u, K, D, method="toeplitz")
    y_f, c_f = conv.conv_fwd(u, K, D, method="fft")
    assert c_t.T is not None and c_f.T is None
    bounds = _conv_abs_bound(u, K, D, dy)
    for a, b, bound in zip([y_t, *conv.conv_vjp(c_t, dy)], [y_f, *conv.conv_vjp(c_f, dy)],
                           bounds):
        assert (a is None and b is None) or np.all(np.abs(a - b) <= bound)


def test_toeplitz_against_direct_exactly():
    """The forward's sums run over ``s`` like :func:`refimpl.conv.direct_conv`'s, but BLAS may
    block them differently: compared within ``L eps`` of the magnitudes (both sides)."""
    rng = np.random.default_rng(3)
    u, K = rng.normal(size=(3, 4, 37)), rng.normal(size=(2, 4, 37))
    y = conv.conv_fwd(u, K, method="toeplitz")[0]
    ref = conv.direct_conv(u, K)
    mag = conv.direct_conv(np.abs(u), np.abs(K))
    assert np.all(np.abs(y - ref) <= 2 * 37 * EPS * mag)


def test_auto_method_picks_toeplitz_for_short_sequences():
    rng = np.random.default_rng(4)
    K = rng.normal(size=(2, conv.TOEPLITZ_MAX_L + 1))
    for L, toeplitz in [(conv.TOEPLITZ_MAX_L, True), (conv.TOEPLITZ_MAX_L + 1, False)]:
        _, c = conv.conv_fwd(rng.normal(size=(1, 2, L)), K[:, :L])
        assert (c.T is not None) == toeplitz


def test_conv_method_is_checked():
    with pytest.raises(ValueError, match="unknown method 'direct'"):
        conv.conv_fwd(np.ones((1, 1, 2)), np.ones((1, 2)), method="direct")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_toeplitz_fd_and_dot_product(bidirectional):
    rng = np.random.default_rng(10)
    u = rng.normal(size=(2, 3, 6))
    K = rng.normal(size=(2,) * bidirectional + (3, 6))
    D = rng.normal(size=3)
    _check_fd(lambda u, K, D: conv.conv_fwd(u, K, D, method="toeplitz"), conv.conv_vjp,
              [u, K, D], rng)
    # linear in u: <conv(v), c> = <v, du(c)> to rounding (sums of ~36 O(1) products)
    v, c = rng.normal(size=u.shape), rng.normal(size=u.shape)
    y, cache = conv.conv_fwd(v, K, D, method="toeplitz")
    du = conv.conv_vjp(cache, c)[0]
    assert_close_scalar(float((y * c).sum()), float((v * du).sum()), 1e-13, 1.0)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_spectral_bwd_against_numpy(Bsz, H, F, seed):
    rng = np.random.default_rng(seed)

    def c(*shape):
        return rng.normal(size=shape) + 1j * rng.normal(size=shape)
    dyf, uf, kf = c(Bsz, H, F), c(Bsz, H, F), c(H, F)
    duf, dkf = np.empty_like(dyf), np.empty_like(kf)
    conv._spectral_bwd(dyf, kf, uf, duf, dkf)
    # NumPy's complex product may contract into FMAs (its SIMD loop), Numba's does not: each
    # of the two real parts is a sum of two products, within 2 eps |x||y| (componentwise; the
    # modulus bounds both parts); the sum over b adds (B - 1) roundings of partial sums.
    tol = 4 * EPS * np.abs(dyf) * np.abs(kf)
    assert np.all(np.abs(duf - dyf * np.conj(kf)) <= tol)
    tol = (4 + 2 * Bsz) * EPS * (np.abs(dyf) * np.abs(uf)).sum(0)
    assert np.all(np.abs(dkf - (dyf * np.conj(uf)).sum(0)) <= tol)


def test_gelu_against_numpy_form():
    """The same operations in the same order (NumPy's ``exp`` and SciPy's ``erf`` on both
    sides, the rest IEEE ``+ * /``): exact."""
    from scipy.special import erf
    rng = np.random.default_rng(12)
    x, dy = 3 * rng.normal(size=(3, 5, 17)), rng.normal(size=(3, 5, 17))
    y, cache = Ly.gelu_fwd(x)
    Phi = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    _, Phi_cached = cache  # gelu_fwd's own (x, Phi)
    assert np.array_equal(y, x * Phi) and np.array_equal(Phi_cached, Phi)
    (dx,) = Ly.gelu_bwd(cache, dy)
    phi = LIB_NP.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    assert np.array_equal(dx, dy * (Phi + x * phi))


def test_gelu_fd_and_dot_product():
    rng = np.random.default_rng(13)
    _check_fd(Ly.gelu_fwd, Ly.gelu_bwd, [2 * rng.normal(size=(2, 3, 4))], rng)


def _glu_form(monkeypatch, form):
    """Force :func:`refimpl.layers.glu_fwd`'s form at any length: ``"batched"`` (one GEMM per
    batch row) or ``"channel_major"`` (one GEMM on a channel-major copy)."""
    if form == "batched":
        monkeypatch.setattr(Ly, "GLU_BATCHED_MIN_L", 0)
        monkeypatch.setattr(Ly, "BATCHED_MAX_L", 10**9)
    else:
        monkeypatch.setattr(Ly, "BATCHED_MAX_L", 0)


@pytest.mark.parametrize("form", ["batched", "channel_major"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 1), (3, 1, 2)])
def test_glu_forms_fd_and_dot_product(monkeypatch, shape, form):
    """Each GLU form (forced at a small shape)."""
    _glu_form(monkeypatch, form)
    rng = np.random.default_rng(17)
    Bsz, H, L = shape
    s, W, b = rng.normal(size=shape), rng.normal(size=(2 * H, H)), rng.normal(size=2 * H)
    assert Ly.glu_fwd(s, W, b)[1][0][2] is (form == "batched")  # the cache of the form
    _check_fd(Ly.glu_fwd, Ly.glu_bwd, [s, W, b], rng)


@given(st.tuples(st.integers(1, 4), st.integers(1, 7), st.integers(1, 30)),
       st.integers(0, 2**32 - 1))
def test_glu_channel_major_against_batch_major(shape, seed):
    """Both GLU forms compute the same sums, each a GEMM in BLAS's own order: ``o``, ``ds``
    (``H`` or ``2H`` products per entry) and ``dW`` (``B L`` products) may differ by the two
    forms' rounding, at most ``2 K eps sum|terms|`` for ``K`` terms; the gate then maps ``o``
    elementwise (sigmoid slope <= 1/4, |a| <= |o| + |b|), so ``a, g, z`` inherit the bound."""
    Bsz, H, L = shape
    rng = np.random.default_rng(seed)
    s, W, b = rng.normal(size=shape), rng.normal(size=(2 * H, H)), rng.normal(size=2 * H)
    dz = rng.normal(size=shape)
    runs = []
    for form in ("batched", "channel_major"):
        with pytest.MonkeyPatch.context() as mp:
            _glu_form(mp, form)
            z, c = Ly.glu_fwd(s, W, b)
            assert c[0][2] is (form == "batched")
            runs.append((z, c, *Ly.glu_bwd(c, dz)))
    (z0, c0, ds0, dW0, db0), (z1, c1, ds1, dW1, db1) = runs
    absW = np.abs(W)
    o_abs = np.matmul(absW, np.abs(s)) + np.abs(b)[:, None]  # (B, 2H, L) sum|terms| of o
    e_o = 2 * H * EPS * o_abs
    # z = a g: |dz| <= |da| g + |a| |dg| <= e_a + |a| e_g / 4 (e_a, e_g the entries of e_o)
    a_abs = o_abs[:, :H]
    bound_z = e_o[:, :H] + a_abs * e_o[:, H:] / 4 + 4 * EPS * np.abs(z0)
    assert np.all(np.abs(z1 - z0) <= bound_z)
    # the backward: do = [dz g, dz a g (1-g)] from (a, g) within the bounds above, then GEMMs
    do_abs = np.concatenate([np.abs(dz), np.abs(dz) * (a_abs + e_o[:, :H])], axis=1)
    e_do = np.concatenate([np.abs(dz) * e_o[:, H:] / 4,
                           np.abs(dz) * (e_o[:, :H] / 4 + a_abs * e_o[:, H:] / 4)], axis=1)
    e_do += 4 * EPS * do_abs
    bound_ds = np.matmul(absW.T, e_do) + 2 * 2 * H * EPS * np.matmul(absW.T, do_abs)
    assert np.all(np.abs(ds1 - ds0) <= bound_ds)
    sum_terms = np.tensordot(do_abs, np.abs(s), axes=([0, 2], [0, 2]))  # (2H, H)
    bound_dW = np.tensordot(e_do, np.abs(s), axes=([0, 2], [0, 2])) + 2 * Bsz * L * EPS * sum_terms
    assert np.all(np.abs(dW1 - dW0) <= bound_dW)
    assert np.all(np.abs(db1 - db0) <= e_do.sum(axis=(0, 2)) + 2 * Bsz * L * EPS *
                  do_abs.sum(axis=(0, 2)))


@pytest.mark.parametrize("form", ["batched", "channel_major"])
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_batch_split_gives_identical_results(monkeypatch, threads, form):
    """GLU and LayerNorm split over batch rows (any number of threads, even uneven ranges)
    equal the single-call results exactly: rows are independent and the batch sums are added
    in row order after the split."""
    rng = np.random.default_rng(14)
    Bsz, H, L = 7, 6, 9
    s, W, b = rng.normal(size=(Bsz, H, L)), rng.normal(size=(2 * H, H)), rng.normal(size=2 * H)
    gamma, beta = 1 + 0.1 * rng.normal(size=H), rng.normal(size=H)
    dz = rng.normal(size=(Bsz, H, L))
    _glu_form(monkeypatch, form)

    def run():
        z, c = Ly.glu_fwd(s, W, b)
        y, cn = Ly.layernorm_fwd(z, gamma, beta)
        return [z, *c[1:], *Ly.glu_bwd(c, dz), y, *cn[:2], *Ly.layernorm_bwd(cn, dz)]

    monkeypatch.setattr(Ly, "GEMM_BLOCK_COLUMNS", 8)  # several column blocks at this size
    monkeypatch.setattr(refimpl_threads, "MIN_ELEMENTS", 0)  # and every pass split
    with refimpl_threads.using(1):
        one = run()
    monkeypatch.setattr(Ly, "PARALLEL_MIN_ELEMENTS", 0)
    with refimpl_threads.using(threads):
        many = run()
    assert len(one) == len(many) == 12
    assert all(np.array_equal(x, y) for x, y in zip(one, many))


def test_over_batch_covers_every_row_once(monkeypatch):
    monkeypatch.setattr(Ly, "PARALLEL_MIN_ELEMENTS", 0)
    seen = []
    with refimpl_threads.using(3):
        Ly._over_batch(lambda b0, b1: seen.extend(range(b0, b1)), 8, 1)
    assert sorted(seen) == list(range(8))


# --------------------------------------------------------------------------------------------
# The float32 variant's erf
# --------------------------------------------------------------------------------------------


def test_erf32_coefficients_regenerate():
    """ERF32_CHEB is what its docstring says: chebinterpolate of erf(sqrt u)/sqrt u, degree 18
    (regenerated here; the transform's own rounding differs between machines by a few eps of
    the largest coefficient, hence 1e-14)."""
    from numpy.polynomial import chebyshev as C
    from scipy.special import erf

    def f(x):
        r = np.sqrt(8 * (x + 1))
        return np.where(r > 0, erf(r) / np.where(r > 0, r, 1.0), 2 / np.sqrt(np.pi))
    assert np.max(np.abs(C.chebinterpolate(f, 18) - Ly.ERF32_CHEB)) <= 1e-14


def test_erf32_accuracy():
    """The series evaluated in float64 (an output array of float64 keeps it unrounded):
    relative error <= 4e-10 against scipy's float64 erf (the series' truncation error, 3.9e-10
    measured by the fit on a dense grid; Clenshaw's rounding adds a few eps), over [-6, 6] and
    tiny arguments, where erf(z) ~ 2 z / sqrt(pi) and a relative bound is the strict one."""
    from scipy.special import erf
    z = np.concatenate([np.linspace(-6, 6, 200001), np.geomspace(1e-30, 1e-3, 1000),
                        -np.geomspace(1e-30, 1e-3, 1000), [0.0, 4.0, -4.0, 3.999999]])
    out = np.empty_like(z)
    Ly._erf32(z, out)
    ref = erf(z)
    rel = np.abs(out - ref) / np.maximum(np.abs(ref), np.finfo(float).tiny)
    # beyond the clamp the kernel returns +-erf(4): 1 - erf(4) = 1.5e-8 relative
    inside = np.abs(z) <= Ly.ERF32_CLAMP
    assert rel[inside].max() <= 4e-10
    assert rel[~inside].max() <= 1.6e-8
    # in float32 that is within one ulp of the correctly rounded value everywhere
    out32 = np.empty(z.size, np.float32)
    Ly._erf32(z.astype(np.float32), out32)
    ref32 = erf(z.astype(np.float32).astype(np.float64))
    assert np.all(np.abs(out32 - ref32) <= np.spacing(np.abs(ref32).astype(np.float32)) + 1e-45)
