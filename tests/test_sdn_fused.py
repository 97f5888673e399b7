"""The fused SDN's differentiable NumPy form (refimpl.sdn.fused_fwd / fused_bwd): finite
differences, dot product, and agreement of its forward with the fast kernel sdn_forward."""
import numpy as np
import pytest

from refimpl.sdn import (FUSED_LAYOUT, causal_windows, causal_windows_adjoint, fused_bwd,
                         fused_fwd, sdn_forward)
from gradcheck import directional_fd

SHAPES = {k: shape for k, (_, shape) in FUSED_LAYOUT.items()}


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.4, size=s) for k, s in SHAPES.items()}


def inputs(seed=1, shape=(2, 3, 20)):
    return np.random.default_rng(seed).normal(size=shape)


def test_forward_matches_refimpl_sdn_kernel():
    w, x = weights(), inputs()
    m, _ = fused_fwd(x, w)
    m_ref, _ = sdn_forward(x, w)
    np.testing.assert_allclose(m, m_ref, rtol=1e-13, atol=1e-13)


def test_forward_is_strictly_causal_and_sees_eight_steps():
    w, x = weights(), inputs(shape=(1, 30))
    m, _ = fused_fwd(x, w)
    x2 = x.copy()
    x2[0, 10] += 1.0  # affects m[11 .. 18] only
    m2, _ = fused_fwd(x2, w)
    changed = np.flatnonzero(m2[0] != m[0])
    assert changed.min() >= 11 and changed.max() <= 18


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backward_matches_finite_differences(seed):
    """Directional derivatives of <m, dm> along random directions of x and of each weight
    (relu kinks are measure zero; the step 1e-6 stays far from them for these draws)."""
    w, x = weights(seed), inputs(seed + 10, (2, 2, 13))
    rng = np.random.default_rng(seed + 20)
    dm = rng.normal(size=x.shape)
    _, cache = fused_fwd(x, w)
    dx, dw = fused_bwd(cache, dm)
    v = rng.normal(size=x.shape)
    fd = directional_fd(lambda z: float((fused_fwd(z, w)[0] * dm).sum()), x, v)
    assert abs(fd - float((dx * v).sum())) <= 1e-8 * max(1.0, abs(fd))
    for k in SHAPES:
        vk = rng.normal(size=SHAPES[k])

        def f(a, k=k):
            return float((fused_fwd(x, {**w, k: a})[0] * dm).sum())

        fd = directional_fd(f, w[k], vk)
        assert dw[k].shape == SHAPES[k]
        assert abs(fd - float((dw[k] * vk).sum())) <= 1e-8 * max(1.0, abs(fd)), k


def test_dot_product_of_the_linearisation():
    """<J v, c> == <v, J^T c> for the map (x, w) -> m at a fixed point (relu masks fixed)."""
    w, x = weights(3), inputs(4, (3, 17))
    rng = np.random.default_rng(5)
    c = rng.normal(size=x.shape)
    vx = rng.normal(size=x.shape)
    vw = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    _, cache = fused_fwd(x, w)
    dx, dw = fused_bwd(cache, c)
    h = 1e-7
    plus = fused_fwd(x + h * vx, {k: w[k] + h * vw[k] for k in w})[0]
    minus = fused_fwd(x - h * vx, {k: w[k] - h * vw[k] for k in w})[0]
    jv = (plus - minus) / (2 * h)
    lhs = float((jv * c).sum())
    rhs = float((dx * vx).sum()) + sum(float((dw[k] * vw[k]).sum()) for k in SHAPES)
    assert abs(lhs - rhs) <= 1e-7 * max(1.0, abs(lhs))


def test_validation():
    w, x = weights(), inputs()
    with pytest.raises(ValueError, match="missing"):
        fused_fwd(x, {k: v for k, v in w.items() if k != "w3"})
    with pytest.raises(ValueError,
                       match=r"SDN weight w2 \(conv2.weight\) must have shape \(8, 8, 1\)"):
        fused_fwd(x, {**w, "w2": np.zeros((8, 8))[:, :, None][:, :7]})
    with pytest.raises(TypeError, match="float64"):
        fused_fwd(x.astype(np.float32), w)
    with pytest.raises(ValueError, match="non-finite"):
        fused_fwd(np.full((1, 4), np.nan), w)
    _, cache = fused_fwd(x, w)
    with pytest.raises(ValueError, match="dm must have shape"):
        fused_bwd(cache, np.zeros((1, 2)))


@pytest.mark.parametrize("L, T", [(13, 13), (13, 22), (3, 3), (3, 12)])
def test_windows_and_their_adjoint(L, T):
    """X[k, r, t] = x[r, t - 8 + k] (zero outside), and <X(x), dX> == <x, X^T(dX)>."""
    rng = np.random.default_rng(L + T)
    x, dX = rng.normal(size=(2, L)), rng.normal(size=(8, 2, T))
    X = causal_windows(x, T)
    assert X.shape == (8, 2, T)
    for k, r, t in [(0, 0, 0), (7, 1, min(8, T - 1)), (3, 0, T - 1), (0, 1, T - 1), (7, 0, 0)]:
        j = t - 8 + k
        assert X[k, r, t] == (x[r, j] if 0 <= j < L else 0.0)
    dx = causal_windows_adjoint(dX, L)
    assert dx.shape == (2, L)
    assert abs(float((X * dX).sum()) - float((x * dx).sum())) <= 1e-12 * np.abs(dX).sum()
