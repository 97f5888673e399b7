"""Hand-written backward passes of the SSM core against finite differences and dot products.

Finite differences: central, with one Richardson step (truncation O(eps^4)); with eps = 1e-5
the rounding error is about 1e-16 * |f| / eps ~ 1e-11 |f|, so agreement is required to
``rtol = 1e-7`` of the larger side (scaled by the norm of the cotangent-weighted output, so
that a directional derivative that happens to be tiny is not judged relatively).
Dot products: for the *linear* maps (convolution in u, in K, in D) ``<J v, c> == <v, J^T c>``
holds to rounding (``1e-12`` relative).
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.conv import fftconv, fftconv_bwd
from refimpl.s4d import s4d_layer_bwd, s4d_layer_fwd
from refimpl.ssm import s4d_init, s4d_kernel, s4d_kernel_bwd

from gradcheck import assert_close_scalar, coordinate_fd, directional_fd
from strategies import ssm_cases

KERNEL_PARAMS = ("log_dt", "log_A_real", "A_imag", "C_re", "C_im")


def kernel_loss(p, L, disc, c):
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    return float((s4d_kernel(*(p[k] for k in KERNEL_PARAMS), L, disc, **B) * c).sum())


def kernel_grads(p, L, disc, c):
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    g = s4d_kernel_bwd(*(p[k] for k in KERNEL_PARAMS), c, disc, **B)
    return dict(zip(KERNEL_PARAMS + tuple(B), g))


def perturbed(p, name, value):
    q = dict(p)
    q[name] = value
    return q


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
@pytest.mark.parametrize("init", ["lin", "inv", "real"])
@pytest.mark.parametrize("bidirectional,trainable_B", [(False, False), (True, True)])
def test_kernel_backward_coordinatewise(disc, init, bidirectional, trainable_B):
    """Every coordinate of every kernel parameter's gradient, small sizes."""
    rng = np.random.default_rng(7)
    p = s4d_init(2, 6, init, seed=rng, bidirectional=bidirectional, trainable_B=trainable_B)
    if trainable_B:
        p["B_im"] = 0.3 * rng.normal(size=p["B_im"].shape)
    L = 23
    c = rng.normal(size=(2, 2, L) if bidirectional else (2, L))
    g = kernel_grads(p, L, disc, c)
    scale = float(np.abs(c).sum())
    for name in g:
        fd = coordinate_fd(lambda v: kernel_loss(perturbed(p, name, v), L, disc, c), p[name], 1e-5)
        np.testing.assert_allclose(g[name], fd, rtol=1e-7, atol=1e-9 * scale, err_msg=name)


@given(ssm_cases(max_L=200))
def test_kernel_backward_directional(case):
    """Random direction per parameter: ``<grad, v> == d/de loss(p + e v)`` (hypothesis)."""
    p, u, disc = case
    L = u.shape[-1]
    rng = np.random.default_rng(L)
    c = rng.normal(size=p["C_re"].shape[:-1] + (L,))
    g = kernel_grads(p, L, disc, c)
    scale = float(np.abs(c).sum())
    for name in g:
        v = rng.normal(size=p[name].shape)
        fd = directional_fd(lambda x: kernel_loss(perturbed(p, name, x), L, disc, c), p[name], v,
                            1e-5)
        assert_close_scalar(float((g[name] * v).sum()), fd, 1e-7, 1e-3 * scale, name)


def test_zoh_gradient_accurate_for_tiny_dtA():
    """dt = 1e-3 with |A| = 1/2: dt A ~ 5e-4, where the closed form of d(dB)/dA cancels.
    The backward uses a series there; compare with finite differences at a tight tolerance."""
    rng = np.random.default_rng(3)
    p = s4d_init(1, 2, "lin", seed=rng, dt_min=1e-3, dt_max=1e-3)  # the single mode A = -1/2
    L = 50
    c = rng.normal(size=(1, L))
    g = kernel_grads(p, L, "zoh", c)
    for name in ("log_A_real", "A_imag", "log_dt"):
        fd = coordinate_fd(lambda v: kernel_loss(perturbed(p, name, v), L, "zoh", c), p[name], 1e-5)
        np.testing.assert_allclose(g[name], fd, rtol=1e-8, err_msg=name)


@given(ssm_cases(), st.integers(0, 2**31))
def test_fftconv_dot_product(case, seed):
    """fftconv is linear in u, in K and in D separately: <J v, c> == <v, J^T c> for each."""
    p, u, disc = case
    rng = np.random.default_rng(seed)
    L = u.shape[-1]
    K = rng.normal(size=p["C_re"].shape[:-1] + (L,))
    D = p["D"]
    c = rng.normal(size=u.shape)
    du, dK, dD = fftconv_bwd(u, K, D, c)
    v_u, v_K, v_D = rng.normal(size=u.shape), rng.normal(size=K.shape), rng.normal(size=D.shape)
    zero_D = np.zeros_like(D)
    lhs = [(fftconv(v_u, K, D) * c).sum(), (fftconv(u, v_K, zero_D) * c).sum(),
           (fftconv(u, np.zeros_like(K), v_D) * c).sum()]
    rhs = [(v_u * du).sum(), (v_K * dK).sum(), (v_D * dD).sum()]
    for a, b, name in zip(lhs, rhs, ("u", "K", "D")):
        scale = float(np.abs(c).sum() * (np.abs(u).max() + np.abs(K).max() + 1) * L)
        assert_close_scalar(float(a), float(b), 1e-12, scale * 1e-3, name)


@given(ssm_cases(max_L=120))
def test_fftconv_backward_coordinatewise_in_u(case):
    p, u, disc = case
    u = u[:, :, :12]
    L = u.shape[-1]
    rng = np.random.default_rng(1)
    K = rng.normal(size=p["C_re"].shape[:-1] + (L,))
    c = rng.normal(size=u.shape)
    du, dK, dD = fftconv_bwd(u, K, p["D"], c)
    fd_u = coordinate_fd(lambda x: float((fftconv(x, K, p["D"]) * c).sum()), u)
    fd_K = coordinate_fd(lambda x: float((fftconv(u, x, p["D"]) * c).sum()), K)
    # FFT rounding of the loss, amplified by 1/eps of the difference quotient
    atol = 1e-9 * float(np.abs(c).sum() * (1 + np.abs(u).max() + np.abs(K).max()))
    np.testing.assert_allclose(du, fd_u, rtol=1e-7, atol=atol)
    np.testing.assert_allclose(dK, fd_K, rtol=1e-7, atol=atol)


@given(ssm_cases(max_L=150))
def test_s4d_layer_backward(case):
    """The composed layer: input and every parameter, directional FD + dot product in u."""
    p, u, disc = case
    rng = np.random.default_rng(u.shape[-1])
    c = rng.normal(size=u.shape)
    y, cache = s4d_layer_fwd(u, p, disc)
    du, grads = s4d_layer_bwd(cache, c)
    assert set(grads) == set(p)
    scale = float(np.abs(c).sum() * (1 + np.abs(u).max()))

    def loss(q, x):
        return float((s4d_layer_fwd(x, q, disc)[0] * c).sum())

    v_u = rng.normal(size=u.shape)
    assert_close_scalar(float((du * v_u).sum()), directional_fd(lambda x: loss(p, x), u, v_u, 1e-5),
                        1e-7, 1e-3 * scale, "u")
    for name in p:
        v = rng.normal(size=p[name].shape)
        fd = directional_fd(lambda x: loss(perturbed(p, name, x), u), p[name], v, 1e-5)
        assert_close_scalar(float((grads[name] * v).sum()), fd, 1e-7, 1e-3 * scale, name)
    # the layer is linear in u: exact dot-product identity
    y_v, _ = s4d_layer_fwd(v_u, p, disc)
    assert_close_scalar(float((y_v * c).sum()), float((v_u * du).sum()), 1e-12, scale, "u dot")
