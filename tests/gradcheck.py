"""Finite-difference and dot-product helpers for the gradient tests (float64 only)."""
import numpy as np


def directional_fd(f, x, v, eps=1e-6):
    """Central difference of ``f`` at ``x`` along ``v`` with one Richardson step (error O(eps^4)).

    ``f`` maps an array of ``x``'s shape to a scalar.
    """
    d1 = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    d2 = (f(x + 2 * eps * v) - f(x - 2 * eps * v)) / (4 * eps)
    return (4 * d1 - d2) / 3


def coordinate_fd(f, x, eps=1e-6):
    """Gradient of scalar ``f`` at ``x`` by central differences, one coordinate at a time."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = 1.0
        g[i] = directional_fd(f, x, e, eps)
    return g


def assert_close_scalar(a, b, rtol, atol_scale, what=""):
    """``|a - b| <= rtol * max(|a|, |b|, atol_scale)``."""
    bound = rtol * max(abs(a), abs(b), atol_scale)
    assert abs(a - b) <= bound, f"{what}: {a!r} vs {b!r} (|diff| {abs(a - b):.3e} > {bound:.3e})"


def assert_every_parameter(loss, p, g, seed=2, eps=1e-4, rtol=1e-7, atol_scale=1e-2):
    """Each parameter ``k`` of the dict ``p`` along a random direction ``v``: ``<g[k], v>``
    equals the directional finite difference of ``loss(q)`` with ``q[k]`` varied (the other
    entries of ``p`` fixed). ``loss(q)`` returns a scalar; ``g`` the hand-written gradients."""
    rng = np.random.default_rng(seed)
    for k in p:
        v = rng.normal(size=p[k].shape)

        def f(val, k=k):
            return loss({**p, k: val})

        fd = directional_fd(f, p[k], v, eps)
        assert_close_scalar(float((g[k] * v).sum()), fd, rtol, atol_scale, k)
