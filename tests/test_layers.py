"""Layers (DESIGN.md sections 7-8): every backward against central finite differences (all
coordinates, small sizes) and a random-cotangent dot-product test, in float64.

Tolerance: central differences with a Richardson step (O(eps^4) truncation), eps = 1e-5:
rounding ~1e-11 relative; we require rtol 1e-7. GSU's ternary quantiser is piecewise constant:
finite differences see zero through it, which is exactly the [choice] that Ter passes no
gradient, as long as no perturbation crosses a quantisation boundary (inputs are drawn away
from the 0.15 max|v| threshold).
"""
import numpy as np
import pytest

from refimpl import layers as Ly

from gradcheck import assert_close_scalar, coordinate_fd, directional_fd

RNG = np.random.default_rng(11)
B, H, L = 2, 3, 5


def check_layer(fwd, bwd, args, names, rng=RNG, tol=1e-7):
    """fwd(*args) -> (out, cache); bwd(cache, c) -> grads in args order (None = no grad)."""
    out, cache = fwd(*args)[:2]
    c = rng.normal(size=np.shape(out))
    grads = bwd(cache, c)
    for i, (name, g) in enumerate(zip(names, grads)):
        if g is None:
            continue

        def f(v, i=i):
            a = list(args)
            a[i] = v
            return float((fwd(*a)[0] * c).sum())

        fd = coordinate_fd(f, args[i], 1e-5)
        np.testing.assert_allclose(g, fd, rtol=tol, atol=tol * (1 + np.abs(fd).max()), err_msg=name)
        v = rng.normal(size=args[i].shape)
        assert_close_scalar(float((g * v).sum()), directional_fd(f, args[i], v, 1e-5), tol, 1.0,
                            name)


def test_linear():
    check_layer(Ly.linear_fwd, Ly.linear_bwd,
                [RNG.normal(size=(B, H, L)), RNG.normal(size=(4, H)), RNG.normal(size=4)],
                ["x", "W", "b"])


def test_linear_is_linear_dot_product():
    x, W = RNG.normal(size=(B, H, L)), RNG.normal(size=(4, H))
    c, v = RNG.normal(size=(B, 4, L)), RNG.normal(size=(B, H, L))
    _, cache = Ly.linear_fwd(x, W)
    dx, dW, db = Ly.linear_bwd(cache, c)
    assert db is None
    assert_close_scalar(float((Ly.linear_fwd(v, W)[0] * c).sum()), float((v * dx).sum()),
                        1e-13, 1.0)


def test_gelu():
    check_layer(lambda x: Ly.gelu_fwd(x), Ly.gelu_bwd, [RNG.normal(size=(B, H, L)) * 2], ["x"])


def test_gelu_values():
    """GELU(x) = x Phi(x): Phi(0) = 1/2, Phi(1) = 0.8413447460685429 (normal table)."""
    y, _ = Ly.gelu_fwd(np.array([0.0, 1.0, -1.0]))
    np.testing.assert_allclose(y, [0.0, 0.8413447460685429, -1 + 0.8413447460685429], rtol=1e-15)


def test_glu():
    check_layer(Ly.glu_fwd, Ly.glu_bwd,
                [RNG.normal(size=(B, H, L)), RNG.normal(size=(2 * H, H)), RNG.normal(size=2 * H)],
                ["s", "W", "b"])


def away_from_quantisation(shape, rng):
    """Values whose |v| / max|v| stay clear of 0.15 (so FD steps never cross Ter's boundary)."""
    v = rng.uniform(0.3, 1.0, size=shape) * rng.choice([-1, 1], size=shape)
    small = rng.random(shape) < 0.3
    return np.where(small, v * 0.05, v)


def test_gsu():
    rng = np.random.default_rng(3)
    check_layer(Ly.gsu_fwd, Ly.gsu_bwd,
                [away_from_quantisation((B, H, L), rng), away_from_quantisation((H, H), rng),
                 rng.normal(size=H), rng.normal(size=H)],
                ["x", "W", "b", "c"], rng)


def test_ternary_definition():
    v = np.array([[1.0, -0.2, 0.1, -0.14], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(Ly.ternary(v, axis=1), [[1, -1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(Ly.ternary(np.array([2.0, 0.3, -0.29])), [1, 1, 0])


def test_layernorm():
    check_layer(Ly.layernorm_fwd, Ly.layernorm_bwd,
                [RNG.normal(size=(B, H, L)), RNG.normal(size=H), RNG.normal(size=H)],
                ["x", "gamma", "beta"])


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm(training):
    rm, rv = RNG.normal(size=H), RNG.uniform(0.5, 2, size=H)

    def fwd(x, g, b):
        y, cache, _ = Ly.batchnorm_fwd(x, g, b, rm, rv, training)
        return y, cache

    check_layer(fwd, Ly.batchnorm_bwd,
                [RNG.normal(size=(B, H, L)), RNG.normal(size=H), RNG.normal(size=H)],
                ["x", "gamma", "beta"])


def test_batchnorm_running_stats_follow_torch_convention():
    """new = 0.9 old + 0.1 stat, with the *unbiased* batch variance for the running value."""
    x = RNG.normal(size=(B, H, L))
    _, _, (m, v) = Ly.batchnorm_fwd(x, np.ones(H), np.zeros(H), np.zeros(H), np.ones(H), True)
    n = B * L
    np.testing.assert_allclose(m, 0.1 * x.mean(axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(v, 0.9 + 0.1 * x.var(axis=(0, 2), ddof=1), rtol=1e-14)
    assert abs(n / (n - 1) * x.var(axis=(0, 2)) - x.var(axis=(0, 2), ddof=1)).max() < 1e-14


def test_dropout_mask_shared_over_time():
    rng = np.random.default_rng(0)
    mask = Ly.dropout_mask(rng, (64, 32, 100), 0.25)
    assert mask.shape == (64, 32, 1)
    assert set(np.unique(mask)) == {0.0, 1 / 0.75}
    assert abs((mask == 0).mean() - 0.25) < 0.03
    x = rng.normal(size=(64, 32, 100))
    y, m = Ly.dropout_fwd(x, mask)
    dead = (mask[:, :, 0] == 0)
    assert np.all(y[dead] == 0) and np.all(y[~dead] == x[~dead] * (1 / 0.75))
    check_layer(lambda x: Ly.dropout_fwd(x, mask[:B, :H]), Ly.dropout_bwd, [x[:B, :H, :L]], ["x"])
    assert Ly.dropout_mask(rng, (2, 3, 4), 0.0) is None


def test_meanpool():
    check_layer(Ly.meanpool_fwd, Ly.meanpool_bwd, [RNG.normal(size=(B, H, L))], ["x"])


def test_cross_entropy():
    labels = np.array([0, 2])
    logits = RNG.normal(size=(2, 4)) * 3
    loss, cache = Ly.cross_entropy_fwd(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert abs(loss + np.mean(np.log(p[[0, 1], labels]))) < 1e-14
    check_layer(lambda z: Ly.cross_entropy_fwd(z, labels),
                lambda c, d: Ly.cross_entropy_bwd(c, float(d)),
                [logits], ["logits"])


def test_cross_entropy_extreme_logits_are_finite():
    loss, cache = Ly.cross_entropy_fwd(np.array([[1e4, -1e4]]), np.array([1]))
    assert np.isfinite(loss) and abs(loss - 2e4) < 1e-9
    assert np.all(np.isfinite(Ly.cross_entropy_bwd(cache)[0]))


def test_embedding():
    E = RNG.normal(size=(5, H))
    tokens = np.array([[0, 4, 4, 1], [2, 2, 2, 3]], dtype=np.int64)
    y, cache = Ly.embedding_fwd(tokens, E)
    np.testing.assert_array_equal(y[1, :, 0], E[2])
    c = RNG.normal(size=y.shape)
    _, dE = Ly.embedding_bwd(cache, c)
    fd = coordinate_fd(lambda e: float((Ly.embedding_fwd(tokens, e)[0] * c).sum()), E)
    np.testing.assert_allclose(dE, fd, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 5\), got range \[1, 5\]"):
        Ly.embedding_fwd(tokens + 1, E)
    with pytest.raises(TypeError, match=r"tokens must have dtype int64, got int32"):
        Ly.embedding_fwd(tokens.astype(np.int32), E)
