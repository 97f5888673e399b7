"""The fused SDN as a differentiable function of its input *and* its weights (DESIGN.md section 6).

:mod:`refimpl.sdn` runs the fused (inference) network fast and differentiates the *training*
network; golden traces also need the VJP of the fused network with respect to the published
weights ``w0 .. w5``. This module is that: a plain-NumPy forward and a hand-written backward.

Per row (any ``(..., L)`` input is flattened to ``R`` rows), with ``x[j] = 0`` for ``j < 0``::

    win[t, k] = x[t - K + k]                             k = 0 .. K-1   (sees x[t-8 .. t-1])
    a1[t, c]  = b1[c] + sum_k W1[c, k] win[t, k]           h1 = relu(a1)
    a2[t, c]  = b2[c] + sum_j W2[c, j] h1[t, j] + h1[t, c] h2 = relu(a2)
    m[t]      = b3 + sum_c w3[c] h2[t, c]

with ``W1 = w0[:, 0, :]``, ``b1 = w1``, ``W2 = w2[:, :, 0]``, ``b2 = w3``, ``w3 = w4[0, :, 0]``,
``b3 = w5[0]`` (the published ``.npz`` layout, :data:`refimpl.sdn.FUSED_LAYOUT`).

Backward, given ``dm`` of ``m``'s shape (``relu'(0) = 0``, as ``torch.relu``)::

    dh2 = dm w3;  da2 = dh2 [a2 > 0];  dh1 = W2^T da2 + da2;  da1 = dh1 [a1 > 0]
    dw3 = sum dm h2,  db3 = sum dm,  dW2 = sum da2 h1^T,  db2 = sum da2,
    dW1 = sum da1 win^T,  db1 = sum da1,  dx[t - K + k] += sum_c da1[t, c] W1[c, k]

(sums over rows and time: every weight is shared by all of them, so gradients accumulate).

The forward agrees with :func:`refimpl.sdn.sdn_forward` to rounding (a different summation
order); ``tests/test_sdn_fused.py`` checks that, the backward against central finite
differences, and a random-cotangent dot-product test.
"""
import numpy as np

from ._checks import check_array, check_shape

#: Hidden channels and taps of the published network.
C = 8
K = 8

#: Fused weight name -> shape (the published ``.npz`` layout).
SHAPES = {"w0": (C, 1, K), "w1": (C,), "w2": (C, C, 1), "w3": (C,), "w4": (1, C, 1), "w5": (1,)}


def _check_weights(weights):
    if not hasattr(weights, "keys"):
        raise TypeError(f"weights must be a dict with keys w0 .. w5, got {type(weights).__name__}")
    missing = [k for k in SHAPES if k not in weights]
    if missing:
        raise ValueError(f"weights is missing {missing}; the fused layout is {list(SHAPES)}")
    out = {}
    for k, shape in SHAPES.items():
        a = check_array(k, weights[k], len(shape))
        check_shape(k, a, shape)
        out[k] = a
    return out


def _windows(x2):
    """``win[r, t, k] = x[r, t - K + k]`` with zeros before the start: ``(R, L, K)``."""
    R, L = x2.shape
    xp = np.zeros((R, L + K))  # (R, L + K), K leading zeros
    xp[:, K:] = x2
    return np.stack([xp[:, k:k + L] for k in range(K)], axis=-1)  # (R, L, K)


def sdn_fused_fwd(x, weights):
    """Fused SDN forward with a cache for :func:`sdn_fused_bwd`.

    Parameters
    ----------
    x : float64 array (..., L), L >= 1
        Every row (last axis) is an independent sequence.
    weights : dict
        ``w0 .. w5`` float64 of the shapes in :data:`SHAPES`.

    Returns
    -------
    m : float64, shape of ``x``
        Predicted decayed potential ``tau u_{t-1}`` (strictly causal).
    cache : tuple
        ``(shape, win, W1, W2, w3, a1, h1, a2, h2)``.
    """
    x = check_array("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have at least one time step on its last axis, got shape {x.shape}")
    w = _check_weights(weights)
    W1, b1 = w["w0"][:, 0, :], w["w1"]  # (C, K), (C,)
    W2, b2 = w["w2"][:, :, 0], w["w3"]  # (C, C), (C,)
    w3, b3 = w["w4"][0, :, 0], w["w5"][0]  # (C,), scalar
    win = _windows(x.reshape(-1, x.shape[-1]))  # (R, L, K)
    a1 = b1 + win @ W1.T  # (R, L, C)
    h1 = np.maximum(a1, 0.0)
    a2 = b2 + h1 @ W2.T + h1  # (R, L, C)
    h2 = np.maximum(a2, 0.0)
    m = b3 + h2 @ w3  # (R, L)
    return m.reshape(x.shape), (x.shape, win, W1, W2, w3, a1, h1, a2, h2)


def sdn_fused_bwd(cache, dm):
    """VJP of :func:`sdn_fused_fwd`.

    Parameters
    ----------
    cache : from :func:`sdn_fused_fwd`
    dm : float64 array, shape of ``x``

    Returns
    -------
    dx : float64, shape of ``x``
        Gradient through the network (the full VJP; the SDN *neuron* of a model ignores it).
    dweights : dict of float64
        ``w0 .. w5`` in their published shapes, summed over rows and time. Freshly allocated.
    """
    shape, win, W1, W2, w3, a1, h1, a2, h2 = cache
    dm = check_array("dm", dm)
    check_shape("dm", dm, shape)
    R, L, _ = win.shape
    dm2 = dm.reshape(R, L)  # (R, L)
    dh2 = dm2[:, :, None] * w3  # (R, L, C)
    da2 = dh2 * (a2 > 0.0)  # (R, L, C)
    dh1 = da2 @ W2 + da2  # (R, L, C): W2^T da2 per token, plus the residual
    da1 = dh1 * (a1 > 0.0)  # (R, L, C)
    dwin = da1 @ W1  # (R, L, K)
    dxp = np.zeros((R, L + K))  # (R, L + K): adjoint of the zero-padded windows
    for k in range(K):
        dxp[:, k:k + L] += dwin[:, :, k]
    dx = dxp[:, K:].reshape(shape)
    dweights = {
        "w0": np.einsum("rlc,rlk->ck", da1, win)[:, None, :],  # (C, 1, K)
        "w1": da1.sum(axis=(0, 1)),  # (C,)
        "w2": np.einsum("rlc,rlj->cj", da2, h1)[:, :, None],  # (C, C, 1)
        "w3": da2.sum(axis=(0, 1)),  # (C,)
        "w4": np.einsum("rl,rlc->c", dm2, h2)[None, :, None],  # (1, C, 1)
        "w5": np.array([dm2.sum()]),  # (1,)
    }
    return np.ascontiguousarray(dx), dweights
