"""Feature mixing and the other layers of a spiking SSM, forward and backward side by side.

DESIGN.md sections 7-8. Sequences are ``(B, H, L)``; per-token vectors run over ``H``.
Every ``*_fwd`` returns ``(out, cache)``; every ``*_bwd(cache, d_out)`` returns the input
gradient first, then one gradient per parameter in argument order, all freshly allocated
(overwrite semantics; callers accumulate where a parameter is shared).
Plain NumPy (einsum): these layers are matrix products, not loops.
"""
from typing import NamedTuple

import numpy as np
from scipy.special import erf


# --------------------------------------------------------------------------------------------
# Linear (1x1 convolution over channels) and token embedding
# --------------------------------------------------------------------------------------------


def chanmix(W, x):
    """``y[b, o, l] = sum_i W[o, i] x[b, i, l]`` as one BLAS matrix product.

    Equivalent to ``np.einsum("oi,bil->bol", W, x)``; ``tensordot`` turns it into a single
    ``(O, I) @ (I, B*L)`` GEMM, much faster than einsum's loops or a stacked ``matmul``.
    """
    return np.ascontiguousarray(np.tensordot(W, x, axes=([1], [1])).transpose(1, 0, 2))


def linear_fwd(x, W, b=None):
    """``y[:, o, t] = sum_i W[o, i] x[:, i, t] + b[o]``: x (B, Hin, L) -> (B, Hout, L)."""
    y = chanmix(W, x)  # (B, Hout, L)
    if b is not None:
        y += b[:, None]
    return y, (x, W, b is not None)


def linear_bwd(cache, dy):
    """Returns ``(dx, dW, db)``; ``db`` is None when the layer has no bias."""
    x, W, has_b = cache
    dx = chanmix(W.T, dy)  # (B, Hin, L)
    dW = np.tensordot(dy, x, axes=([0, 2], [0, 2]))  # (Hout, Hin) = sum_{b,l} dy x^T
    db = dy.sum(axis=(0, 2)) if has_b else None  # (Hout,)
    return dx, dW, db


def embedding_fwd(tokens, E):
    """``y[b, :, t] = E[tokens[b, t]]``: tokens int64 (B, L) in [0, V), E (V, H) -> (B, H, L)."""
    if tokens.dtype != np.int64:
        raise TypeError(f"tokens must have dtype int64, got {tokens.dtype}; "
                        "pass tokens.astype(np.int64)")
    V = E.shape[0]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
        raise ValueError(f"tokens must lie in [0, {V}), got range [{tokens.min()}, {tokens.max()}]")
    return np.ascontiguousarray(E[tokens].transpose(0, 2, 1)), (tokens, V)  # (B, H, L)


def embedding_bwd(cache, dy):
    """Returns ``(None, dE)``: integer tokens have no gradient; ``dE`` accumulates repeats."""
    tokens, V = cache
    dE = np.zeros((V, dy.shape[1]))  # (V, H)
    np.add.at(dE, tokens.ravel(), dy.transpose(0, 2, 1).reshape(-1, dy.shape[1]))
    return None, dE


# --------------------------------------------------------------------------------------------
# Activations and mixing
# --------------------------------------------------------------------------------------------


def gelu_fwd(x):
    """Exact GELU ``x Phi(x)`` with ``Phi(x) = (1 + erf(x / sqrt 2)) / 2`` (torch ``nn.GELU()``)."""
    Phi = 0.5 * (1.0 + erf(x / np.sqrt(2.0)))
    return x * Phi, (x, Phi)


def gelu_bwd(cache, dy):
    """``d/dx [x Phi(x)] = Phi(x) + x phi(x)``, ``phi`` the standard normal density."""
    x, Phi = cache
    phi = np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    return (dy * (Phi + x * phi),)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def glu_fwd(s, W, b):
    """GLU mixing (SpikingSSM, S4D): ``o = W s + b``, ``z = o[:H] * sigmoid(o[H:])``.

    s (B, H, L), W (2H, H), b (2H,) -> z (B, H, L).
    """
    H = s.shape[1]
    o, lin_cache = linear_fwd(s, W, b)  # (B, 2H, L)
    a, g = o[:, :H], _sigmoid(o[:, H:])  # (B, H, L) each
    return a * g, (lin_cache, a, g)


def glu_bwd(cache, dz):
    """Returns ``(ds, dW, db)``: ``da = dz g``, ``dg_pre = dz a g (1 - g)``."""
    lin_cache, a, g = cache
    do = np.concatenate([dz * g, dz * a * g * (1.0 - g)], axis=1)  # (B, 2H, L)
    return linear_bwd(lin_cache, do)


def ternary(v, axis=None, ratio=0.15):
    """``Ter(v) = sign(v) 1[|v| >= ratio max|v|]`` with the max over ``axis`` (None: all).

    Binary S4D's GSU quantiser **[choice]** (DESIGN.md section 7): per token over channels for
    activations, over the whole matrix for weights. ``max|v| = 0`` gives all zeros.
    """
    m = np.abs(v).max(axis=axis, keepdims=axis is not None)
    return np.sign(v) * (np.abs(v) >= ratio * m) * (m > 0)


class GSUCache(NamedTuple):
    """What :func:`gsu_bwd` needs: the quantised input and weight and the two factors."""
    Tx: np.ndarray  # (B, H, L) Ter(x), max over channels per token
    TW: np.ndarray  # (H, H) Ter(W), max over the matrix
    P: np.ndarray  # (B, H, L) Ter(x) W + b
    Q: np.ndarray  # (B, H, L) x Ter(W) + c


def gsu_fwd(x, W, b, c, Tx=None, TW=None):
    """Gated Spiking Unit (Binary S4D): ``z = (Ter(x) W + b) * (x Ter(W) + c)`` per token.

    x (B, H, L) real SSM output, W (H, H), b (H,), c (H,) -> z (B, H, L). Token row vectors:
    ``(v W)_j = sum_i v_i W[i, j]``. ``Tx``, ``TW`` may be given to hold the quantised values
    fixed (gradient checks: the backward treats them as constants by definition).
    """
    Tx = ternary(x, axis=1) if Tx is None else Tx  # (B, H, L), max over channels per token
    TW = ternary(W) if TW is None else TW  # (H, H), max over the matrix
    P = chanmix(W.T, Tx) + b[:, None]  # (B, H, L): P[:, j] = sum_i Tx[:, i] W[i, j]
    Q = chanmix(TW.T, x) + c[:, None]  # (B, H, L)
    return P * Q, GSUCache(Tx, TW, P, Q)


def gsu_bwd(cache, dz):
    """Returns ``(dx, dW, db, dc)``. ``Ter`` passes no gradient **[choice]**: ``dx`` flows only
    through ``Q = x Ter(W) + c`` and ``dW`` only through ``P = Ter(x) W + b``."""
    Tx, TW, P, Q = cache
    dP, dQ = dz * Q, dz * P  # (B, H, L) each
    dW = np.tensordot(Tx, dP, axes=([0, 2], [0, 2]))  # (H, H) = sum_{b,l} Tx dP^T
    db = dP.sum(axis=(0, 2))  # (H,)
    dx = chanmix(TW, dQ)  # (B, H, L)
    dc = dQ.sum(axis=(0, 2))  # (H,)
    return dx, dW, db, dc


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def layernorm_fwd(x, gamma, beta, eps=1e-5):
    """LayerNorm over channels per token: x (B, H, L), gamma, beta (H,)."""
    mu = x.mean(axis=1, keepdims=True)  # (B, 1, L)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + eps)  # (B, 1, L)
    xh = xc * rstd  # (B, H, L)
    return xh * gamma[:, None] + beta[:, None], (xh, rstd, gamma)


def layernorm_bwd(cache, dy):
    """Returns ``(dx, dgamma, dbeta)``: ``dx = rstd (g - mean(g) - xh mean(g xh))``,
    ``g = dy gamma``."""
    xh, rstd, gamma = cache
    g = dy * gamma[:, None]  # (B, H, L)
    dx = rstd * (g - g.mean(axis=1, keepdims=True) - xh * (g * xh).mean(axis=1, keepdims=True))
    return dx, (dy * xh).sum(axis=(0, 2)), dy.sum(axis=(0, 2))


def batchnorm_fwd(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5,
                  channel_axis=1):
    """BatchNorm over (B, L) per channel: x (B, H, L); gamma, beta, running stats (H,).

    Training mode normalises with the batch statistics (biased variance) and returns *new*
    running statistics ``(1 - momentum) r + momentum stat`` with the unbiased variance, as
    torch does; eval mode uses the running ones. Returns ``(y, cache, (new_mean, new_var))``.
    ``channel_axis`` names the channel axis of ``x`` (any rank); the statistics run over all the
    other axes. The default is the ``(B, H, L)`` layout; the SDN's training network keeps its
    activations channel-major, ``(C, B, T)``, and passes 0, so that every reduction runs over
    contiguous memory.
    """
    axes = tuple(i for i in range(x.ndim) if i != channel_axis)
    col = tuple(-1 if i == channel_axis else 1 for i in range(x.ndim))  # e.g. (1, H, 1)
    if training:
        n = x.size // x.shape[channel_axis]
        mu = x.mean(axis=axes)  # (H,)
        var = x.var(axis=axes)  # (H,)
        new_stats = ((1 - momentum) * running_mean + momentum * mu,
                     (1 - momentum) * running_var + momentum * var * n / max(n - 1, 1))
    else:
        mu, var = running_mean, running_var
        new_stats = (running_mean, running_var)
    rstd = 1.0 / np.sqrt(var + eps)  # (H,)
    xh = (x - mu.reshape(col)) * rstd.reshape(col)  # (B, H, L)
    y = xh * gamma.reshape(col) + beta.reshape(col)  # (B, H, L)
    return y, (xh, rstd, gamma, training, axes, col), new_stats


def batchnorm_bwd(cache, dy):
    """Returns ``(dx, dgamma, dbeta)``; in eval mode the map is affine (``dx = dy gamma rstd``)."""
    xh, rstd, gamma, training, axes, col = cache
    g = dy * gamma.reshape(col)  # (B, H, L)
    if training:
        dx = rstd.reshape(col) * (g - g.mean(axis=axes, keepdims=True)
                                  - xh * (g * xh).mean(axis=axes, keepdims=True))
    else:
        dx = g * rstd.reshape(col)
    return dx, (dy * xh).sum(axis=axes), dy.sum(axis=axes)


# --------------------------------------------------------------------------------------------
# Dropout, pooling, loss
# --------------------------------------------------------------------------------------------


def dropout_mask(rng, shape, p):
    """One mask per (batch, channel), shared over time: (B, H, 1) of 0 or 1/(1-p)."""
    if p <= 0.0:
        return None
    keep = rng.random(shape[:2] + (1,)) >= p  # (B, H, 1)
    return keep / (1.0 - p)


def dropout_fwd(x, mask):
    """``x * mask`` (identity when ``mask`` is None)."""
    return (x if mask is None else x * mask), mask


def dropout_bwd(mask, dy):
    return (dy if mask is None else dy * mask,)


def meanpool_fwd(x):
    """Mean over time: (B, H, L) -> (B, H)."""
    return x.mean(axis=2), x.shape


def meanpool_bwd(shape, dy):
    return (np.broadcast_to(dy[:, :, None] / shape[2], shape).copy(),)


def cross_entropy_fwd(logits, labels):
    """Mean cross-entropy: logits (B, C), labels int64 (B,) -> scalar loss, cache."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # (B, C)
    loss = -logp[np.arange(len(labels)), labels].mean()
    return float(loss), (logp, labels)


def cross_entropy_bwd(cache, dloss=1.0):
    """``dlogits = (softmax - onehot(labels)) / B * dloss``."""
    logp, labels = cache
    d = np.exp(logp)  # (B, C)
    d[np.arange(len(labels)), labels] -= 1.0
    return (d * (dloss / len(labels)),)
