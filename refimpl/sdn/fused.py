"""The fused SDN (153 parameters): the fast Numba kernel and its differentiable NumPy form.

Per row (any ``(..., L)`` input is flattened to ``R`` rows), with ``x[j] = 0`` for ``j < 0``::

    win[t, k] = x[t - K + k]                               k = 0 .. K-1   (sees x[t-8 .. t-1])
    a1[t, c]  = b1[c] + sum_k W1[c, k] win[t, k]           h1 = relu(a1)
    a2[t, c]  = b2[c] + sum_j W2[c, j] h1[t, j] + h1[t, c] h2 = relu(a2)
    m[t]      = b3 + sum_c w3[c] h2[t, c]
    s[t]      = Theta(m[t] + x[t] - theta)

with ``W1 = w0[:, 0, :]``, ``b1 = w1``, ``W2 = w2[:, :, 0]``, ``b2 = w3``, ``w3 = w4[0, :, 0]``,
``b3 = w5[0]`` (the published ``.npz`` layout, :data:`~refimpl.sdn.weights.FUSED_LAYOUT`).

- :func:`sdn_forward`: the fast kernel (inference): ``m`` and the spikes ``s``.
- :func:`fused_fwd` / :func:`fused_bwd`: the same ``m`` in plain NumPy with a cache, and its
  VJP with respect to ``x`` *and* the weights ``w0 .. w5`` (golden traces need the weight
  gradients; the SDN *neuron* of a model uses neither, see :mod:`refimpl.sdn.neuron`).

Backward, given ``dm`` of ``m``'s shape (``relu'(0) = 0``, as ``torch.relu``)::

    dh2 = dm w3;  da2 = dh2 [a2 > 0];  dh1 = W2^T da2 + da2;  da1 = dh1 [a1 > 0]
    dw3 = sum dm h2,  db3 = sum dm,  dW2 = sum da2 h1^T,  db2 = sum da2,
    dW1 = sum da1 win^T,  db1 = sum da1,  dx[t - K + k] += sum_c da1[t, c] W1[c, k]

(sums over rows and time: every weight is shared by all of them, so gradients accumulate).
The kernel and the NumPy form agree to rounding (different summation orders; tested to
1e-13 of the output scale).
"""
from typing import NamedTuple, Tuple

import numpy as np
from numba import njit

from .. import config
from .. import threads
from .. import ops as _ops
from .._checks import check_array, check_name, check_real, check_shape
from ..neurons import SPIKE_CONDITIONS
from .weights import K, resolve_weights, unpack


def causal_windows(x2, T):
    """Tap-major input windows ``X[k, r, t] = x2[r, t - K + k]`` for ``t = 0 .. T-1``, zero
    outside ``[0, L)``: shape ``(K, R, T)`` for ``x2 (R, L)``.

    What a causal ``Conv1d(k=K, padding=K)`` reads: the fused network takes ``T = L`` (``m_t``
    sees ``x[t-8 .. t-1]``), the training network all ``T = L + K + 1`` outputs. Tap-major so
    that a depthwise convolution is one matrix product ``W (C, K) @ X (K, R T)``.
    """
    R, L = x2.shape
    xp = np.zeros((R, K + max(L, T)), x2.dtype)  # (R, K + max(L, T)): K leading zeros, x, zeros
    xp[:, K:K + L] = x2
    return np.stack([xp[:, k:k + T] for k in range(K)])  # (K, R, T)


def causal_windows_adjoint(dX, L):
    """Adjoint of :func:`causal_windows`: ``dX (K, R, T)`` -> ``dx (R, L)``, newly allocated.

    ``dx[r, j] = sum_k dX[k, r, j + K - k]`` over the taps whose window holds ``x[r, j]``,
    added in the order ``k = 0 .. K-1``.
    """
    _, R, T = dX.shape
    dxp = np.zeros((R, K + max(L, T)), dX.dtype)  # (R, K + max(L, T)): grad. of the padded x
    for k in range(K):  # X[k, r, t] = xp[r, t + k]
        dxp[:, k:k + T] += dX[k]
    return dxp[:, K:K + L].copy()  # (R, L)


def _check_x(x, ndim=None):
    x = check_array("x", x, ndim)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have at least one time step (L >= 1), got shape {x.shape}")
    return x


# --------------------------------------------------------------------------------------------
# The fast kernel (inference)
# --------------------------------------------------------------------------------------------


@njit(**config.NJIT_OPTS)
def _sdn_rows(x, W1, b1, W2, b2, w3, b3, theta, strict, m, s):
    """Fused SDN over rows: writes ``m (R, L)`` and ``s (R, L)``.

    Per row and step (``x[j] = 0`` for ``j < 0``)::

        h1[c] = relu(b1[c] + sum_k W1[c, k] x[t-K+k])
        h2[c] = relu(b2[c] + sum_j W2[c, j] h1[j] + h1[c])
        m[t]  = b3 + sum_c w3[c] h2[c];   s[t] = (m[t] + x[t] >= theta)  (> when strict)

    Loops run tap- or channel-outer and time-inner (independent iterations that vectorise
    without reassociation); every sum still adds its terms in the order written above
    (``k = 0 .. K-1``, ``j = 0 .. C-1``, then ``+ h1[c]``; ``c = 0 .. C-1``).
    Preconditions: C-contiguous float64, ``W1 (C, K)``, ``W2 (C, C)``.
    """
    R, L = x.shape
    nc, nk = W1.shape
    h1 = np.empty((nc, L))  # (C, L) scratch, one row at a time
    a2 = np.empty(L)  # (L,)
    for r in range(R):
        xr = x[r]
        mr = m[r]
        for c in range(nc):
            hc = h1[c]  # (L,) view
            for t in range(L):
                hc[t] = b1[c]
            for k in range(nk):
                w = W1[c, k]
                off = nk - k  # h1[t] reads x[t - off]
                n = L - off
                if n > 0:
                    ho = hc[off:]
                    for i in range(n):
                        ho[i] += w * xr[i]
            for t in range(L):
                hc[t] = hc[t] if hc[t] > 0.0 else 0.0
        for t in range(L):
            mr[t] = b3
        for c in range(nc):
            for t in range(L):
                a2[t] = b2[c]
            for j in range(nc):
                w = W2[c, j]
                hj = h1[j]
                for t in range(L):
                    a2[t] += w * hj[t]
            hc = h1[c]
            wc = w3[c]
            for t in range(L):
                v = a2[t] + hc[t]
                mr[t] += wc * (v if v > 0.0 else 0.0)  # + 0.0 leaves mr[t] unchanged
        sr = s[r]
        for t in range(L):
            h = mr[t] + xr[t]
            sr[t] = 1.0 if (h > theta if strict else h >= theta) else 0.0




def sdn_forward(x, weights, theta=1.0, spike_condition="ge"):
    """Fused SDN inference (the fast kernel): predicted decayed potential and spikes.

    Parameters
    ----------
    x : float64 array (L,), (R, L) or (B, H, L)
        Input currents; every row (last axis) is an independent sequence.
    weights : dict or str or os.PathLike
        Fused weights ``w0 .. w5`` (:data:`~refimpl.sdn.weights.FUSED_LAYOUT`), or a weights
        file (:func:`~refimpl.sdn.weights.load_weights`).
    theta : float, default 1.0
        Threshold the SDN was trained for (the published network: 1).
    spike_condition : {"ge", "gt"}, default "ge"
        Spike when ``m + x >= theta`` (SpikingSSM) or ``> theta``
        (:data:`refimpl.neurons.SPIKE_CONDITIONS`).

    Returns
    -------
    m : float64, shape of ``x``
        Predicted ``tau u_{t-1}`` (causal: depends on ``x[t-8 .. t-1]`` only).
    s : float64, shape of ``x``
        Spikes ``Theta(m + x - theta)`` in {0, 1}.
    """
    x = _check_x(x, (1, 2, 3))
    W = resolve_weights(weights)
    theta = check_real("theta", theta)
    strict = check_name("spike_condition", spike_condition, SPIKE_CONDITIONS)
    x2 = x.reshape(-1, x.shape[-1])  # (R, L)
    m = np.empty_like(x2)  # (R, L)
    s = np.empty_like(x2)  # (R, L)
    weights = unpack(W)
    # independent rows on refimpl's threads; a row costs about 2 C (K + C) operations a step
    threads.run(lambda r0, r1: _sdn_rows(x2[r0:r1], *weights, theta, strict, m[r0:r1],
                                         s[r0:r1]), x2.shape[0], 32 * x2.size)
    return m.reshape(x.shape), s.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# The differentiable NumPy form
# --------------------------------------------------------------------------------------------


class FusedCache(NamedTuple):
    """What :func:`fused_fwd` saves for :func:`fused_bwd` (R rows of length L)."""
    shape: Tuple[int, ...]  # x.shape
    win: np.ndarray  # (R, L, K) input windows
    W1: np.ndarray  # (C, K)
    W2: np.ndarray  # (C, C)
    w3: np.ndarray  # (C,)
    a1: np.ndarray  # (R, L, C) pre-relu, first layer
    h1: np.ndarray  # (R, L, C)
    a2: np.ndarray  # (R, L, C) pre-relu, residual layer
    h2: np.ndarray  # (R, L, C)


def fused_fwd(x, weights):
    """The fused forward in plain NumPy (the readable form of the kernel), with a cache.

    Parameters
    ----------
    x : float64 array (..., L), L >= 1
        Every row (last axis) is an independent sequence.
    weights : dict or str or os.PathLike
        Fused weights ``w0 .. w5`` or a weights file.

    Returns
    -------
    m : float64, shape of ``x``
        Predicted decayed potential ``tau u_{t-1}`` (strictly causal); equals
        :func:`sdn_forward`'s ``m`` to rounding.
    cache : FusedCache
        For :func:`fused_bwd`.
    """
    x = _check_x(x)
    W1, b1, W2, b2, w3, b3 = unpack(resolve_weights(weights))
    x2 = x.reshape(-1, x.shape[-1])  # (R, L)
    win = np.ascontiguousarray(causal_windows(x2, x2.shape[1]).transpose(1, 2, 0))  # (R, L, K)
    a1 = b1 + win @ W1.T  # (R, L, C)
    h1 = np.maximum(a1, 0.0)  # (R, L, C)
    a2 = b2 + h1 @ W2.T + h1  # (R, L, C)
    h2 = np.maximum(a2, 0.0)  # (R, L, C)
    m = b3 + h2 @ w3  # (R, L)
    return m.reshape(x.shape), FusedCache(x.shape, win, W1, W2, w3, a1, h1, a2, h2)


def fused_bwd(cache, dm):
    """VJP of :func:`fused_fwd` with respect to ``x`` and the weights (formulas: module doc).

    Parameters
    ----------
    cache : FusedCache
        From :func:`fused_fwd`.
    dm : float64 array, shape of ``x``
        Cotangent of ``m``.

    Returns
    -------
    dx : float64, shape of ``x``
        Gradient through the network (the full VJP; the SDN *neuron* of a model ignores it).
    dweights : dict of float64
        ``w0 .. w5`` in their published shapes, summed over rows and time. Freshly allocated
        (overwrite semantics).
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
    dx = causal_windows_adjoint(dwin.transpose(2, 0, 1), L).reshape(shape)  # shape of x
    dweights = {
        "w0": np.einsum("rlc,rlk->ck", da1, win)[:, None, :],  # (C, 1, K)
        "w1": da1.sum(axis=(0, 1)),  # (C,)
        "w2": np.einsum("rlc,rlj->cj", da2, h1)[:, :, None],  # (C, C, 1)
        "w3": da2.sum(axis=(0, 1)),  # (C,)
        "w4": np.einsum("rl,rlc->c", dm2, h2)[None, :, None],  # (1, C, 1)
        "w5": np.array([dm2.sum()]),  # (1,)
    }
    return dx, dweights


# ---- the op contract (refimpl.ops) -----------------------------------------------------------

#: The fused weights' names, in :data:`~refimpl.sdn.weights.FUSED_LAYOUT` order.
WEIGHT_NAMES = ("w0", "w1", "w2", "w3", "w4", "w5")


def random_weights(rng):
    """Random fused weights of the published shapes (for tests and golden cases; the
    published checkpoint is external reference data, not part of refimpl's files)."""
    return {"w0": rng.normal(0.0, 0.4, size=(8, 1, 8)), "w1": rng.normal(0.0, 0.2, size=8),
            "w2": rng.normal(0.0, 0.3, size=(8, 8, 1)), "w3": rng.normal(0.0, 0.2, size=8),
            "w4": rng.normal(0.0, 0.3, size=(1, 8, 1)), "w5": rng.normal(0.0, 0.1, size=1)}


def _fused_op(inputs, params, cfg=None, state=None):
    m, cache = fused_fwd(inputs["x"], params)
    return _ops.Result({"m": m}, cache, None)


def _fused_op_vjp(cache, cotangents):
    dm = cotangents.get("m")
    dx, dw = fused_bwd(cache, np.zeros(cache.shape) if dm is None else dm)
    return {"x": dx, **dw}


def fused_examples(rng):
    """Rows of a few lengths, the first shorter than the 8 taps."""
    return [_ops.Example({"x": rng.normal(size=(2, 2, L))}, random_weights(rng)) for L in (5, 12)]


FUSED_OP = _ops.defop(
    name="sdn_fused", math="m = b3 + w3 . relu(b2 + W2 h1 + h1), h1 = relu(b1 + W1 x[t-8 .. t-1])",
    inputs=("x",), params=WEIGHT_NAMES, outputs=("m",), fwd=_fused_op, vjp=_fused_op_vjp,
    depth=lambda inputs, params, cfg: {"*": 32, **{"d" + k: inputs["x"].size + 32
                                                   for k in WEIGHT_NAMES}},
    examples=fused_examples, float32=False,
)
