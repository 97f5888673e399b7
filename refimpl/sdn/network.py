"""The SDN's 193-parameter training network: initialisation, forward, backward, folding.

PyTorch layer names; activations are kept channel-major, ``(C, B, T)``::

    e  = encoder(x)              Conv1d(1 -> 8, k=1, no bias)        encoder.weight (8, 1, 1)
    z1 = conv1(e)                Conv1d(8 -> 8, k=8, padding=8,      conv1.weight (8, 1, 8),
                                 groups=8), length L + 9             conv1.bias (8,)
    y1 = bn1(z1)                 BatchNorm1d(8) over (B, L + 9)      bn1.weight, bn1.bias (8,)
    h1 = relu(y1[..., :L])       truncate to the first L steps
    z2 = conv2(h1)               Conv1d(8 -> 8, k=1)                 conv2.weight (8, 8, 1),
                                                                     conv2.bias (8,)
    h2 = relu(bn2(z2) + h1)      BatchNorm1d(8), residual            bn2.weight, bn2.bias (8,)
    m  = conv3(h2)               Conv1d(8 -> 1, k=1)                 conv3.weight (1, 8, 1),
                                                                     conv3.bias (1,)

plus the running statistics ``bn{1,2}.running_mean``, ``bn{1,2}.running_var``. Both BatchNorms
are :func:`refimpl.layers.batchnorm_fwd` / ``batchnorm_bwd`` (``channel_axis=0``, eps 1e-5):
training mode normalises by the batch mean and biased variance over ``(B, time)`` and returns
running statistics updated with ``momentum`` and the unbiased variance (``torch.nn.BatchNorm1d``);
eval mode uses the running statistics. As in the original network, ``bn1`` sees all ``L + 9``
outputs of the padded convolution before the truncation, so its batch statistics include the 9
tail steps; in eval mode this makes no difference.

**Folding** (:func:`fold`): with eval-mode BatchNorm every layer before a relu is affine, so
``s1 = bn1.weight / sqrt(bn1.running_var + 1e-5)`` and likewise ``s2`` give::

    W1[c, k] = s1[c] encoder.weight[c] conv1.weight[c, k]
    b1[c]    = s1[c] (conv1.bias[c] - bn1.running_mean[c]) + bn1.bias[c]
    W2[c, j] = s2[c] conv2.weight[c, j]
    b2[c]    = s2[c] (conv2.bias[c] - bn2.running_mean[c]) + bn2.bias[c]

and ``conv3`` unchanged. Fused and unfused forwards agree to rounding (tested to 1e-12).
"""
import math
from typing import NamedTuple, Tuple

import numpy as np

from .. import layers
from .._checks import check_name, check_real
from .fused import causal_windows, causal_windows_adjoint
from .weights import (BN_EPS, BUFFER_LAYOUT, TRAIN_LAYOUT, C, K, check_buffers,
                      check_train_params)

# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def _init_torch(params, rng, tau):
    """PyTorch's defaults only (the depthwise taps stay ``U(-1/sqrt(8), 1/sqrt(8))``)."""
    return params


def _init_lif(params, rng, tau):
    """Depthwise taps start as the LIF's impulse response, eight distinct features.

    Channel ``c`` gets the taps ``sign_c tau^(K-1-k-shift_c)`` (a leaky sum of the inputs
    ending at ``x[t-1]`` for ``shift_c = 0`` or at ``x[t-2]`` for ``shift_c = 1``) with
    ``shift_c = c % 2``, ``sign_c = +1`` for ``c % 4 < 2`` else ``-1``, and a relu threshold
    ``thr_c = 0`` for ``c < 4`` and ``1`` (about the spike threshold in units of the batch
    standard deviation) for ``c >= 4``: ``bn1.bias[c] = -sign_c thr_c``. These are the
    features the reset needs: the reset-free membranes at ``t-1`` and ``t-2``, both signs,
    and where they cross the threshold. The encoder starts at 1 so that it keeps the signs
    (BatchNorm makes its scale irrelevant); ``U(-0.01, 0.01)`` noise is added to the taps.
    """
    w = np.zeros((C, K))  # (C, K)
    j = np.arange(K)[::-1]  # K-1-k: steps back from x[t-1]
    beta = np.zeros(C)  # (C,)
    for c in range(C):
        shift = c % 2
        sign = 1.0 if c % 4 < 2 else -1.0
        w[c, :K - shift] = sign * tau ** j[shift:]
        beta[c] = -sign * (0.0 if c < 4 else 1.0)
    w += rng.uniform(-0.01, 0.01, size=(C, K))
    params["conv1.weight"] = w[:, None, :]  # (C, 1, K)
    params["encoder.weight"] = np.ones((C, 1, 1))  # (C, 1, 1)
    params["bn1.bias"] = beta
    return params


#: Initialisations of the training network (``SDNTrainConfig.init``).
INITS = {"lif": _init_lif, "torch": _init_torch}


def init_train_params(seed=0, init="lif", tau=0.125):
    """Draw the 193 training parameters and fresh BatchNorm buffers.

    Parameters
    ----------
    seed : int or numpy.random.Generator, default 0
    init : {"lif", "torch"}, default "lif"
        ``torch``: as ``torch.nn`` initialises the layers: conv weights and biases
        ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kaiming-uniform with ``a = sqrt(5)``;
        fan_in = 1 for the encoder, 8 for the others), BatchNorm ``weight = 1``, ``bias = 0``.
        ``lif`` **[choice]**: the same, except that the depthwise taps start as the LIF's
        impulse response, with the encoder at 1 and relu thresholds at 0 and 1
        (:func:`_init_lif`). With the published recipe (lr 1e-2, batch 64, cosine), 3200
        updates from ``torch`` ended at 99.72 % spike agreement (loss flat for the last
        half); from ``lif`` the default 6400 updates reach 99.93 % (two seeds measured).
    tau : float, default 0.125
        The LIF decay the ``lif`` taps follow.

    Returns
    -------
    params : dict (:data:`TRAIN_LAYOUT`), buffers : dict (:data:`BUFFER_LAYOUT`)
        Running statistics start at ``mean = 0``, ``var = 1``.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    make = check_name("init", init, INITS)
    tau = check_real("tau", tau, 0.0, 1.0, hi_open=True)
    fan_in = {"encoder": 1, "conv1": K, "conv2": C, "conv3": C}
    params = {}
    for name, shape in TRAIN_LAYOUT.items():
        layer, kind = name.split(".")
        if layer.startswith("bn"):
            params[name] = np.ones(shape) if kind == "weight" else np.zeros(shape)
        else:
            bound = 1.0 / math.sqrt(fan_in[layer])
            params[name] = rng.uniform(-bound, bound, size=shape)
    params = make(params, rng, tau)
    buffers = {name: (np.ones(shape) if name.endswith("var") else np.zeros(shape))
               for name, shape in BUFFER_LAYOUT.items()}
    return params, buffers



# --------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------


class TrainCache(NamedTuple):
    """What :func:`train_fwd` saves for :func:`train_bwd` (``T1 = L + K + 1``)."""
    x_shape: Tuple[int, int]  # (B, L)
    X: np.ndarray  # (K, B, T1) input windows
    conv: np.ndarray  # (C, B, T1) depthwise convolution of x
    a: np.ndarray  # (C,) encoder scale
    Wd: np.ndarray  # (C, K) depthwise taps
    bn1: tuple  # refimpl.layers.batchnorm_fwd cache
    y1t: np.ndarray  # (C, B, L) bn1 output, truncated
    h1: np.ndarray  # (C, B, L)
    W2: np.ndarray  # (C, C)
    bn2: tuple  # refimpl.layers.batchnorm_fwd cache
    pre2: np.ndarray  # (C, B, L) residual sum before the relu
    h2: np.ndarray  # (C, B, L)
    w3: np.ndarray  # (C,)


def train_fwd(x, params, buffers, training=True, momentum=0.1):
    """Forward of the 193-parameter training network.

    Parameters
    ----------
    x : float64 (B, L)
        Input sequences (one channel).
    params : dict
        :data:`~refimpl.sdn.weights.TRAIN_LAYOUT` (not validated here: see
        :func:`~refimpl.sdn.weights.check_train_params`).
    buffers : dict
        :data:`~refimpl.sdn.weights.BUFFER_LAYOUT`; used in eval mode only (training mode uses
        batch statistics).
    training : bool, default True
        BatchNorm mode.
    momentum : float, default 0.1
        BatchNorm momentum of the running statistics (training mode).

    Returns
    -------
    m : float64 (B, L)
        Predicted decayed potential.
    cache : TrainCache
        For :func:`train_bwd`.
    new_buffers : dict
        The running statistics after this batch (``torch.nn.BatchNorm1d`` rule: ``(1 -
        momentum) running + momentum batch`` with the unbiased batch variance); in eval mode
        the input ones. New arrays: ``buffers`` is not modified.

    Notes
    -----
    Channel-major activations make every convolution one matrix product over the ``B T``
    positions and every BatchNorm reduction run over contiguous memory. Plain NumPy on
    purpose: the work is a handful of passes over ``(8, B, L)`` arrays plus 8x8 matrix
    products, which NumPy and BLAS already run at memory speed; fused Numba kernels for the
    same passes (without fastmath, so reductions stay sequential) measured no faster at
    B = 64, L = 1024 (about 30 ms per step either way).
    """
    Bsz, L = x.shape
    T1 = L + K + 1
    a = params["encoder.weight"][:, 0, 0]  # (C,)
    Wd = params["conv1.weight"][:, 0, :]  # (C, K)
    X = causal_windows(x, T1)  # (K, B, T1)
    conv = (Wd @ X.reshape(K, -1)).reshape(C, Bsz, T1)  # (C, B, T1): depthwise conv of x
    z1 = (a * conv.T + params["conv1.bias"]).T  # (C, B, T1): encoder scale a[c], bias
    new = {}
    y1, bn1, (new["bn1.running_mean"], new["bn1.running_var"]) = layers.batchnorm_fwd(
        z1, params["bn1.weight"], params["bn1.bias"], buffers["bn1.running_mean"],
        buffers["bn1.running_var"], training, momentum, BN_EPS, channel_axis=0)  # (C, B, T1)
    y1t = y1[:, :, :L]  # (C, B, L) truncation to the first L steps (a view)
    h1 = np.maximum(y1t, 0.0)  # (C, B, L)
    W2 = params["conv2.weight"][:, :, 0]  # (C, C)
    z2 = (W2 @ h1.reshape(C, -1)).reshape(C, Bsz, L) + params["conv2.bias"][:, None, None]
    y2, bn2, (new["bn2.running_mean"], new["bn2.running_var"]) = layers.batchnorm_fwd(
        z2, params["bn2.weight"], params["bn2.bias"], buffers["bn2.running_mean"],
        buffers["bn2.running_var"], training, momentum, BN_EPS, channel_axis=0)  # (C, B, L)
    pre2 = y2 + h1  # (C, B, L) residual
    h2 = np.maximum(pre2, 0.0)  # (C, B, L)
    w3 = params["conv3.weight"][0, :, 0]  # (C,)
    m = (w3 @ h2.reshape(C, -1)).reshape(Bsz, L) + params["conv3.bias"][0]  # (B, L)
    cache = TrainCache(x.shape, X, conv, a, Wd, bn1, y1t, h1, W2, bn2, pre2, h2, w3)
    return m, cache, {k: np.array(v) for k, v in new.items()}


def train_bwd(cache, dm):
    """Backward of :func:`train_fwd`: gradients for ``x`` and every parameter (overwritten).

    Parameters
    ----------
    cache : TrainCache
        From :func:`train_fwd`.
    dm : float64 (B, L)
        Cotangent of ``m``.

    Returns
    -------
    dx : float64 (B, L)
    grads : dict
        One float64 array per name of :data:`~refimpl.sdn.weights.TRAIN_LAYOUT`, same shapes.
        In training mode the gradient includes the paths through the batch statistics.
    """
    Bsz, L = cache.x_shape
    T1 = L + K + 1
    g = {}
    # m = w3 . h2 + b3
    h2 = cache.h2.reshape(C, -1)  # (C, B L)
    g["conv3.weight"] = (h2 @ dm.reshape(-1))[None, :, None]  # (1, C, 1)
    g["conv3.bias"] = np.array([dm.sum()])  # (1,)
    dpre2 = cache.w3[:, None, None] * dm * (cache.pre2 > 0)  # (C, B, L)
    # h2 = relu(bn2(z2) + h1)
    dz2, g["bn2.weight"], g["bn2.bias"] = layers.batchnorm_bwd(cache.bn2, dpre2)  # (C, B, L)
    dz2_2 = dz2.reshape(C, -1)  # (C, B L)
    g["conv2.weight"] = (dz2_2 @ cache.h1.reshape(C, -1).T)[:, :, None]  # (C, C, 1)
    g["conv2.bias"] = dz2_2.sum(axis=1)  # (C,)
    dh1 = dpre2 + (cache.W2.T @ dz2_2).reshape(C, Bsz, L)  # (C, B, L): residual + conv2
    # h1 = relu(y1[..., :L]); the truncated tail gets no gradient (but shaped the batch stats)
    dy1 = np.zeros((C, Bsz, T1))  # (C, B, T1)
    dy1[:, :, :L] = dh1 * (cache.y1t > 0)
    dz1, g["bn1.weight"], g["bn1.bias"] = layers.batchnorm_bwd(cache.bn1, dy1)  # (C, B, T1)
    # z1 = a * conv(x, Wd) + b
    a, Wd = cache.a, cache.Wd
    dz1_2 = dz1.reshape(C, -1)  # (C, B T1)
    g["conv1.bias"] = dz1_2.sum(axis=1)  # (C,)
    G = dz1_2 @ cache.X.reshape(K, -1).T  # (C, K): sum over positions of dz1 * window
    g["conv1.weight"] = (a[:, None] * G)[:, None, :]  # (C, 1, K)
    g["encoder.weight"] = np.einsum("cn,cn->c", dz1_2, cache.conv.reshape(C, -1))[:, None, None]
    dX = ((a[:, None] * Wd).T @ dz1_2).reshape(K, Bsz, T1)  # (K, B, T1)
    dx = causal_windows_adjoint(dX, L)  # (B, L)
    return dx, {name: g[name] for name in TRAIN_LAYOUT}


# --------------------------------------------------------------------------------------------
# Folding into the fused form
# --------------------------------------------------------------------------------------------


def fold(params, buffers):
    """Fold encoder and eval-mode BatchNorms into the fused 153-parameter form (exact).

    Parameters
    ----------
    params : dict (:data:`TRAIN_LAYOUT`)
    buffers : dict (:data:`BUFFER_LAYOUT`)

    Returns
    -------
    dict
        Fused weights ``w0 .. w5`` (:data:`FUSED_LAYOUT`), float64. See the module docstring
        for the formulas.
    """
    params = check_train_params(params)
    buffers = check_buffers(buffers)
    s1 = params["bn1.weight"] / np.sqrt(buffers["bn1.running_var"] + BN_EPS)  # (C,)
    s2 = params["bn2.weight"] / np.sqrt(buffers["bn2.running_var"] + BN_EPS)  # (C,)
    a = params["encoder.weight"][:, 0, 0]  # (C,)
    W1 = (s1 * a)[:, None] * params["conv1.weight"][:, 0, :]  # (C, K)
    b1 = s1 * (params["conv1.bias"] - buffers["bn1.running_mean"]) + params["bn1.bias"]  # (C,)
    W2 = s2[:, None] * params["conv2.weight"][:, :, 0]  # (C, C)
    b2 = s2 * (params["conv2.bias"] - buffers["bn2.running_mean"]) + params["bn2.bias"]  # (C,)
    return {
        "w0": W1[:, None, :].copy(),  # (C, 1, K)
        "w1": b1,  # (C,)
        "w2": W2[:, :, None].copy(),  # (C, C, 1)
        "w3": b2,  # (C,)
        "w4": params["conv3.weight"].copy(),  # (1, C, 1)
        "w5": params["conv3.bias"].copy(),  # (1,)
    }


