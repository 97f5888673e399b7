"""The spiking SSM block, stated plainly in NumPy: the readable spec and the test oracle.

Standalone on purpose: NumPy and the standard library only, no Numba, no imports from the rest
of refimpl. Every function is a direct transcription of DESIGN.md sections 2-8, written for
clarity, not speed (loops over time, einsums over materialised ``(H, N2, L)`` arrays), and the
fast path is tested against it. Shapes: ``(B, H, L)`` = batch, channels, time; ``N2`` complex
modes per channel.

Contents, in the order of DESIGN.md:

- section 2, S4D kernel: :func:`s4d_discretize`, :func:`s4d_kernel`;
- section 3, convolution: :func:`causal_conv` (direct sums, causal or bidirectional),
  :func:`ssm_recurrence` (the recurrent form), :func:`s4d_layer` (kernel + convolution + D);
- section 4, neurons: :func:`neuron` and :func:`neuron_trace` (every reset of the table
  :data:`RESETS`, ``ge``/``gt``, absolute refractory period, smooth mode),
  :func:`threshold_scale` (``y / exp(ln_vth)``), and the surrogate table :data:`SURROGATES`
  (``g`` and its primitive ``G``);
- section 6, SDN: :func:`sdn_predict` (the fused network), :func:`sdn_neuron`;
- section 7, feature mixing: :func:`gelu`, :func:`glu`, :func:`ternary`, :func:`gsu`;
- section 8, normalisation and block: :func:`layernorm`, :func:`batchnorm`, :data:`FAMILIES`,
  :func:`block_trace`, :func:`block_forward`.

Gradients are not stated here: the hand-written backward passes are checked by finite
differences of the smooth forward (DESIGN.md section 4).
"""
import math
from typing import NamedTuple

import numpy as np

# ============================================================================================
# S4D kernel (DESIGN.md section 2)
# ============================================================================================


def s4d_discretize(log_dt, log_A_real, A_imag, B=None, disc="zoh"):
    """``dA, dB`` of shape (H, N2) (``B = 1`` when not given)."""
    dt = np.exp(log_dt)[:, None]  # (H, 1)
    A = -np.exp(log_A_real) + 1j * A_imag  # (H, N2)
    B = np.ones_like(A) if B is None else B  # (H, N2)
    if disc == "zoh":
        dA = np.exp(dt * A)  # (H, N2)
        dB = (np.exp(dt * A) - 1.0) / A * B  # (H, N2)
    elif disc == "bilinear":
        dA = (1.0 + dt * A / 2) / (1.0 - dt * A / 2)  # (H, N2)
        dB = dt * B / (1.0 - dt * A / 2)  # (H, N2)
    else:
        raise ValueError(f"unknown disc {disc!r}")
    return dA, dB


def s4d_kernel(log_dt, log_A_real, A_imag, C, L, B=None, disc="zoh"):
    """``K[h, l] = 2 Re sum_n C dB dA^l`` with powers taken as ``exp(l log dA)``.

    ``C`` is complex (H, N2) or, bidirectional, (2, H, N2); returns (H, L) or (2, H, L).
    """
    dA, dB = s4d_discretize(log_dt, log_A_real, A_imag, B, disc)  # (H, N2) each
    powers = np.exp(np.log(dA)[:, :, None] * np.arange(L))  # (H, N2, L)
    return 2.0 * np.einsum("...hn,hnl->...hl", C * dB, powers).real  # (H, L) or (2, H, L)


# ============================================================================================
# Convolution and the recurrent form (DESIGN.md section 3)
# ============================================================================================


def causal_conv(u, K, D=None):
    """``y[t] = sum_{s<=t} K[t-s] u[s] (+ sum_{s>t} K1[s-t-1] u[s]) + D u[t]`` by direct loops.

    ``u (B, H, L)``, ``K (H, L)`` or bidirectional ``(2, H, L)``, ``D (H,)``.
    """
    Bsz, H, L = u.shape
    K0, K1 = (K[0], K[1]) if K.ndim == 3 else (K, None)
    y = np.zeros_like(u)  # (B, H, L)
    for t in range(L):
        for s in range(t + 1):
            y[:, :, t] += K0[:, t - s] * u[:, :, s]
        if K1 is not None:
            for s in range(t + 1, L):
                y[:, :, t] += K1[:, s - t - 1] * u[:, :, s]
    if D is not None:
        y += D[:, None] * u
    return y


def ssm_recurrence(u, dA, dB, C, D=None):
    """``x_t = dA x_{t-1} + dB u_t``, ``y_t = 2 Re sum_n C x_t + D u_t``, one step at a time.

    Bidirectional ``C (2, H, N2)`` adds the anti-causal part
    ``r_t = dA r_{t+1} + dB u_{t+1}`` (``r_{L-1} = 0``), ``y_t += 2 Re sum_n C1 r_t``.
    """
    Bsz, H, L = u.shape
    C0, C1 = (C[0], C[1]) if C.ndim == 3 else (C, None)
    y = np.zeros_like(u)  # (B, H, L)
    x = np.zeros((Bsz,) + dA.shape, dtype=complex)  # (B, H, N2)
    for t in range(L):
        x = dA * x + dB * u[:, :, t, None]  # (B, H, N2)
        y[:, :, t] = 2.0 * (C0 * x).sum(-1).real  # (B, H)
    if C1 is not None:
        r = np.zeros_like(x)  # (B, H, N2)
        for t in range(L - 2, -1, -1):
            r = dA * r + dB * u[:, :, t + 1, None]  # (B, H, N2)
            y[:, :, t] += 2.0 * (C1 * r).sum(-1).real  # (B, H)
    if D is not None:
        y += D[:, None] * u
    return y


def s4d_layer(u, ssm, disc="zoh"):
    """The S4D layer ``y = causal_conv(u, K) + D u`` from a parameter dict.

    ``ssm`` holds ``log_dt (H,)``, ``log_A_real, A_imag (H, N2)``, ``C_re, C_im`` ((H, N2), or
    (2, H, N2) for a bidirectional layer), ``D (H,)`` and optionally ``B_re, B_im (H, N2)``.
    """
    C = ssm["C_re"] + 1j * ssm["C_im"]  # (H, N2) or (2, H, N2)
    B = ssm["B_re"] + 1j * ssm["B_im"] if "B_re" in ssm else None  # (H, N2)
    K = s4d_kernel(ssm["log_dt"], ssm["log_A_real"], ssm["A_imag"], C, u.shape[-1], B, disc)
    return causal_conv(u, K, ssm["D"])  # (B, H, L)


# ============================================================================================
# Spiking neurons (DESIGN.md section 4)
# ============================================================================================


def fires(h, theta, spike_condition="ge"):
    """``Theta(h - theta)``: ``h >= theta`` (``ge``) or ``h > theta`` (``gt``), as booleans."""
    if spike_condition == "ge":
        return h >= theta
    if spike_condition == "gt":
        return h > theta
    raise ValueError(f"unknown spike_condition {spike_condition!r}")


#: reset name -> ``u = reset(h, s)`` as a function of ``(h, s, theta, u_reset, rho)``, each
#: literally as DESIGN.md section 4's table states it (``rho`` per channel). The oracle's own
#: statement of every reset of ``refimpl.neurons.RESETS`` (not its ``u = h (1 - a s) + b s``
#: form): a new reset adds its table row here.
RESETS = {
    "hard": lambda h, s, theta, u_reset, rho: h * (1.0 - s) + s * u_reset,
    "soft": lambda h, s, theta, u_reset, rho: h - theta * s,
    "refractory": lambda h, s, theta, u_reset, rho: h - (theta + rho) * s,
    "none": lambda h, s, theta, u_reset, rho: h,
}


def reset_affine(reset, theta, u_reset=0.0, rho=0.0):
    """``(a, b, drho)`` of ``u = h (1 - a s) + b s`` read off the literal formula of
    :data:`RESETS` (no other statement of it): ``b = u(h=0, s=1)`` exactly, ``a = 1`` where the
    spike erases ``h`` (``u(h=1, s=1) == u(h=0, s=1)``) else 0, and ``drho = du/drho / s``:
    -1 where ``b`` moves with ``rho`` (the only slope a trainable reset has), else 0. ``b`` has
    ``rho``'s shape (a scalar without one)."""
    b = reset_membrane(reset, 0.0, 1.0, theta, u_reset, rho)
    a = 1.0 if np.all(reset_membrane(reset, 1.0, 1.0, theta, u_reset, rho) == b) else 0.0
    moved = reset_membrane(reset, 0.0, 1.0, theta, u_reset, np.asarray(rho) + 0.5)
    drho = -1.0 if np.any(moved != b) else 0.0
    return a, b, drho


def reset_membrane(reset, h, s, theta, u_reset=0.0, rho=0.0):
    """``u = reset(h, s)`` literally as DESIGN.md's table states it (:data:`RESETS`; ``rho`` per
    channel)."""
    if reset not in RESETS:
        raise ValueError(f"unknown reset {reset!r}")
    return RESETS[reset](h, s, theta, u_reset, rho)


class NeuronTrace(NamedTuple):
    """Everything the neuron loop computes, each (B, H, L)."""
    s: np.ndarray  # spikes (or G(h - theta) in smooth mode)
    h: np.ndarray  # membrane before reset
    u: np.ndarray  # membrane after reset
    m: np.ndarray  # decayed potential tau u_{t-1}
    allowed: np.ndarray  # 1 where the absolute refractory period lets the neuron fire


def neuron_trace(x, tau, theta, reset="hard", u_reset=0.0, rho=None, refractory_steps=0,
                 spike_condition="ge", G=None, mask=None, reset_spikes=None, m_fixed=None):
    """The iterative neuron, one time step at a time over all rows of ``x (B, H, L)``.

    With ``u_{-1} = 0``::

        m_t = tau u_{t-1}
        h_t = m_t + x_t
        s_t = allowed_t Theta(h_t - theta)        (ge: h >= theta; gt: h > theta)
        u_t = reset(h_t, s_t)                      (see reset_membrane)

    where ``allowed_t = 0`` for the ``refractory_steps`` steps after a spike.

    Parameters
    ----------
    x : (B, H, L) float64
    tau : float
        Decay, ``0 <= tau < 1``.
    theta : float
        Threshold.
    reset : str, default "hard"
        A name in :data:`RESETS` (``hard``, ``soft``, ``refractory``, ``none``).
    u_reset : float, default 0.0
        Potential after a hard reset.
    rho : (H,) or None
        Refractory magnitude per channel (``reset="refractory"``).
    refractory_steps : int, default 0
        Absolute refractory period ``R``.
    spike_condition : {"ge", "gt"}, default "ge"
    G : callable or None
        Smooth mode: ``s_t = allowed_t G(h_t - theta)`` with ``G`` a surrogate primitive applied
        elementwise to (B, H) arrays; the refractory mask still follows the hard spikes.
    mask, reset_spikes, m_fixed : (B, H, L) or None
        Quantities held fixed, so that the plain derivative of this forward is a backward mode
        of DESIGN.md section 4: ``mask`` replaces ``allowed`` (a constant in every mode);
        ``reset_spikes`` replaces ``s_t`` inside ``reset()`` (with the base run's spikes:
        ``detach_reset``); ``m_fixed`` replaces ``tau u_{t-1}`` (with the base run's ``m``:
        ``sltt``).

    Returns
    -------
    NeuronTrace
        ``s, h, u, m, allowed``, each (B, H, L).
    """
    Bsz, H, L = x.shape
    rho = np.zeros(H) if rho is None else rho  # (H,)
    s, h, u, m, allowed = (np.zeros((Bsz, H, L)) for _ in range(5))  # (B, H, L) each
    u_prev = np.zeros((Bsz, H))  # (B, H)
    blocked_for = np.zeros((Bsz, H), dtype=int)  # (B, H) steps left in the refractory period
    for t in range(L):
        m[:, :, t] = tau * u_prev if m_fixed is None else m_fixed[:, :, t]  # (B, H)
        h[:, :, t] = m[:, :, t] + x[:, :, t]  # (B, H)
        ok = blocked_for == 0 if mask is None else mask[:, :, t] > 0  # (B, H)
        hard = ok & fires(h[:, :, t], theta, spike_condition)  # (B, H)
        if G is None:
            s[:, :, t] = hard
        else:
            s[:, :, t] = np.where(ok, G(h[:, :, t] - theta), 0.0)
        blocked_for = np.where(hard, refractory_steps, np.maximum(blocked_for - 1, 0))  # (B, H)
        s_reset = s[:, :, t] if reset_spikes is None else reset_spikes[:, :, t]  # (B, H)
        u[:, :, t] = reset_membrane(reset, h[:, :, t], s_reset, theta, u_reset, rho)
        allowed[:, :, t] = ok
        u_prev = u[:, :, t]
    return NeuronTrace(s, h, u, m, allowed)


def neuron(x, tau, theta, reset="hard", u_reset=0.0, rho=None, refractory_steps=0,
           spike_condition="ge", G=None):
    """The iterative neuron (see :func:`neuron_trace`): returns ``s, h, u``, each (B, H, L)."""
    tr = neuron_trace(x, tau, theta, reset, u_reset, rho, refractory_steps, spike_condition, G)
    return tr.s, tr.h, tr.u


def threshold_scale(y, ln_vth):
    """Learnable threshold by input scaling (SpikingSSM): ``y / exp(ln_vth)[h]``, (B, H, L).

    The neuron after it runs with ``theta = 1``.
    """
    return y / np.exp(ln_vth)[:, None]  # (B, H, L)


# --------------------------------------------------------------------------------------------
# Surrogate gradients: g(z) replaces dTheta/dz; its primitive G (G' = g) is the smooth step
# --------------------------------------------------------------------------------------------


def sigmoid(v):
    """``1 / (1 + exp(-v))`` (``exp`` overflowing to inf gives the exact limit 0)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-v))


def triangle_grad(z, w):
    """``max(0, 1 - |z|/w) / w``."""
    return np.maximum(0.0, 1.0 - np.abs(z) / w) / w


def triangle_primitive(z, w):
    """``0 (z <= -w); (1 + z/w)^2 / 2 (z <= 0); 1 - (1 - z/w)^2 / 2 (z < w); 1``."""
    v = z / w  # shape of z
    return np.select([v <= -1.0, v <= 0.0, v < 1.0],
                     [0.0, 0.5 * (1.0 + v) ** 2, 1.0 - 0.5 * (1.0 - v) ** 2], 1.0)


def rectangle_grad(z, w):
    """``1[|z| < w/2] / w``."""
    return np.where(np.abs(z) < w / 2, 1.0 / w, 0.0)


def rectangle_primitive(z, w):
    """``clip(z/w + 1/2, 0, 1)``."""
    return np.clip(z / w + 0.5, 0.0, 1.0)


def sigmoid_grad(z, a):
    """``a sig(a z) (1 - sig(a z))``."""
    return a * sigmoid(a * z) * (1.0 - sigmoid(a * z))


def sigmoid_primitive(z, a):
    """``sig(a z)``."""
    return sigmoid(a * z)


def atan_grad(z, a):
    """``(a/2) / (1 + (pi a z / 2)^2)``."""
    return (a / 2) / (1.0 + (np.pi * a * z / 2) ** 2)


def atan_primitive(z, a):
    """``1/2 + arctan(pi a z / 2) / pi``."""
    return 0.5 + np.arctan(np.pi * a * z / 2) / np.pi


def fast_sigmoid_grad(z, k):
    """``1 / (1 + k |z|)^2``."""
    return 1.0 / (1.0 + k * np.abs(z)) ** 2


def fast_sigmoid_primitive(z, k):
    """``1/k + z / (1 + k |z|)``: from 0 to ``2/k`` (snntorch's surrogate is not normalised)."""
    return 1.0 / k + z / (1.0 + k * np.abs(z))


#: name -> (default shape constant w, a or k; g; G), the table of DESIGN.md section 4.
SURROGATES = {
    "triangle": (1.0, triangle_grad, triangle_primitive),
    "rectangle": (1.0, rectangle_grad, rectangle_primitive),
    "sigmoid": (4.0, sigmoid_grad, sigmoid_primitive),
    "atan": (2.0, atan_grad, atan_primitive),
    "fast_sigmoid": (25.0, fast_sigmoid_grad, fast_sigmoid_primitive),
}


# ============================================================================================
# SDN (DESIGN.md section 6): the fused Surrogate Dynamic Network
# ============================================================================================


def sdn_predict(x, weights):
    """The fused SDN's prediction ``m`` of the decayed potential ``tau u_{t-1}``.

    ::

        h1[c, t] = relu(b1[c] + sum_{k=0..7} W1[c, k] x[t-8+k])      (x[j] = 0 for j < 0)
        h2[c, t] = relu(b2[c] + sum_j W2[c, j] h1[j, t] + h1[c, t])
        m[t]     = b3 + sum_c w3[c] h2[c, t]

    Parameters
    ----------
    x : (..., L) float64
        Every row (last axis) is an independent sequence.
    weights : dict
        The published layout ``w0 .. w5``: ``W1 = w0[:, 0, :]`` (8, 8), ``b1 = w1`` (8,),
        ``W2 = w2[:, :, 0]`` (8, 8), ``b2 = w3`` (8,), ``w3 = w4[0, :, 0]`` (8,),
        ``b3 = w5[0]``.

    Returns
    -------
    m : (..., L) float64
        Strictly causal: ``m[t]`` depends on ``x[t-8 .. t-1]`` only.
    """
    W1 = np.asarray(weights["w0"])[:, 0, :]  # (C, K)
    b1 = np.asarray(weights["w1"])  # (C,)
    W2 = np.asarray(weights["w2"])[:, :, 0]  # (C, C)
    b2 = np.asarray(weights["w3"])  # (C,)
    w3 = np.asarray(weights["w4"])[0, :, 0]  # (C,)
    b3 = np.asarray(weights["w5"])[0]  # ()
    K = W1.shape[1]
    L = x.shape[-1]
    xp = np.concatenate([np.zeros(x.shape[:-1] + (K,)), x], axis=-1)  # (..., K + L)
    win = np.stack([xp[..., k:k + L] for k in range(K)], axis=-1)  # (..., L, K): x[t-K+k]
    h1 = np.maximum(b1 + win @ W1.T, 0.0)  # (..., L, C)
    h2 = np.maximum(b2 + h1 @ W2.T + h1, 0.0)  # (..., L, C)
    return b3 + h2 @ w3  # (..., L)


def sdn_neuron(x, weights, theta=1.0, spike_condition="ge"):
    """The SDN neuron ``s = Theta(m + x - theta)`` with ``m = sdn_predict(x)``; returns ``s, m``.

    ``m`` is a constant for differentiation (DESIGN.md section 6); both (..., L).
    """
    m = sdn_predict(x, weights)  # (..., L)
    s = fires(m + x, theta, spike_condition).astype(np.float64)  # (..., L)
    return s, m


# ============================================================================================
# Feature mixing and activations (DESIGN.md sections 7-8)
# ============================================================================================


def gelu(x):
    """Exact GELU ``x Phi(x)``, ``Phi(x) = (1 + erf(x / sqrt 2)) / 2``."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return x * 0.5 * (1.0 + erf(x / math.sqrt(2.0)))  # (B, H, L)


def glu(s, W, b):
    """GLU: ``o = W s + b`` per token, ``z = o[:H] * sigmoid(o[H:])``.

    ``s (B, H, L)``, ``W (2H, H)``, ``b (2H,)``; returns ``z (B, H, L)``.
    """
    H = s.shape[1]
    o = np.einsum("oi,bil->bol", W, s) + b[:, None]  # (B, 2H, L)
    return o[:, :H] * sigmoid(o[:, H:])  # (B, H, L)


def ternary(v, axis=None, ratio=0.15):
    """``Ter(v) = sign(v) 1[|v| >= ratio max|v|]``, the max over ``axis`` (None: all entries).

    An all-zero ``v`` gives zeros.
    """
    vmax = np.abs(v).max(axis=axis, keepdims=True)  # (1, 1) or (B, 1, L)
    return np.where((vmax > 0) & (np.abs(v) >= ratio * vmax), np.sign(v), 0.0)  # shape of v


def gsu(x, W, b, c):
    """GSU (Binary S4D): ``z = (Ter(x) W + b) * (x Ter(W) + c)`` per token (row vectors).

    ``x (B, H, L)`` the real SSM output, ``W (H, H)``, ``b, c (H,)``; ``Ter(x)`` takes the max
    over channels per token, ``Ter(W)`` over the matrix. Returns ``z (B, H, L)``.
    """
    Tx = ternary(x, axis=1)  # (B, H, L)
    TW = ternary(W)  # (H, H)
    P = np.einsum("bil,ij->bjl", Tx, W) + b[:, None]  # (B, H, L)
    Q = np.einsum("bil,ij->bjl", x, TW) + c[:, None]  # (B, H, L)
    return P * Q  # (B, H, L)


# ============================================================================================
# Normalisation (DESIGN.md section 8)
# ============================================================================================


def layernorm(x, gamma, beta, eps=1e-5):
    """Over channels per token: ``(x - mean) / sqrt(var + eps) gamma + beta`` (biased var)."""
    mu = x.mean(axis=1, keepdims=True)  # (B, 1, L)
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)  # (B, 1, L)
    return (x - mu) / np.sqrt(var + eps) * gamma[:, None] + beta[:, None]  # (B, H, L)


def batchnorm(x, gamma, beta, running_mean, running_var, training=False, momentum=0.1,
              eps=1e-5):
    """BatchNorm per channel over (batch, time), as ``torch.nn.BatchNorm1d``.

    Eval mode normalises with the running statistics; training mode with the batch mean and
    biased variance, and the running statistics move to ``(1 - momentum) r + momentum stat``
    with the *unbiased* variance. Returns ``y (B, H, L)`` and the new ``(mean, var)`` (H,).
    """
    if training:
        n = x.shape[0] * x.shape[2]
        mu = x.mean(axis=(0, 2))  # (H,)
        var = ((x - mu[:, None]) ** 2).mean(axis=(0, 2))  # (H,)
        new_mean = (1 - momentum) * running_mean + momentum * mu  # (H,)
        new_var = (1 - momentum) * running_var + momentum * var * n / max(n - 1, 1)  # (H,)
    else:
        mu, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    xh = (x - mu[:, None]) / np.sqrt(var[:, None] + eps)  # (B, H, L)
    y = xh * gamma[:, None] + beta[:, None]  # (B, H, L)
    return y, (new_mean, new_var)


# ============================================================================================
# The block (DESIGN.md section 8)
# ============================================================================================

#: Activation families **[choice]**, as refimpl's model builds them: the activation, the mixing
#: layer, whether ``y`` is divided by ``exp(ln_vth)``, and the neuron's settings.
FAMILIES = {
    "gelu": dict(activation="gelu", mixing="glu", threshold=False),
    "binary": dict(activation="neuron", mixing="glu", threshold=False,
                   reset="none", tau=0.0, theta=0.0),  # Heaviside Theta(y) (Binary S4D)
    "binary_gsu": dict(activation=None, mixing="gsu", threshold=False),  # GSU reads y
    "lif": dict(activation="neuron", mixing="glu", threshold=True,
                reset="hard", tau=0.125, theta=1.0),  # SpikingSSM
    "sdn": dict(activation="sdn", mixing="glu", threshold=True, theta=1.0),  # SpikingSSM
    "refractory": dict(activation="neuron", mixing="glu", threshold=True,
                       reset="refractory", tau=0.5, theta=1.0),  # SPikE-SSM, rho per channel
}


def _norm(x, params, config):
    """The block's norm: ``(y, new running statistics or None)``."""
    gamma, beta = params["norm.gamma"], params["norm.beta"]  # (H,) each
    if config["norm"] == "layer":
        return layernorm(x, gamma, beta), None
    if config["norm"] == "batch":
        return batchnorm(x, gamma, beta, params["norm.running_mean"],
                         params["norm.running_var"], config.get("training", False))
    raise ValueError(f"unknown norm {config['norm']!r}")


def block_trace(x, params, config):
    """One block, returning every intermediate (see :func:`block_forward`).

    Returns
    -------
    dict
        ``z`` the S4D input, ``y`` the S4D output (after threshold scaling), ``s`` the
        activation (None for ``binary_gsu``), ``h`` the neuron's membrane or ``m`` the SDN
        prediction where the family has them, ``mix`` the mixing output, ``out`` the block
        output, ``running_stats`` the new BatchNorm statistics (None for LayerNorm); arrays
        (B, H, L).
    """
    fam = FAMILIES[config["activation"]]
    tr = {}
    z = x  # (B, H, L)
    if config["prenorm"]:
        z, tr["running_stats"] = _norm(x, params, config)  # (B, H, L)
    tr["z"] = z
    ssm = {k[4:]: v for k, v in params.items() if k.startswith("ssm.")}
    y = s4d_layer(z, ssm, config.get("disc", "zoh"))  # (B, H, L)
    if fam["threshold"]:
        y = threshold_scale(y, params["ln_vth"])  # (B, H, L)
    tr["y"] = y
    if fam["activation"] == "gelu":
        s = gelu(y)  # (B, H, L)
    elif fam["activation"] == "neuron":
        s, tr["h"], _ = neuron(y, fam["tau"], fam["theta"], fam["reset"],
                               rho=params.get("rho"))  # (B, H, L) each
    elif fam["activation"] == "sdn":
        weights = {k[4:]: v for k, v in params.items() if k.startswith("sdn.")}
        s, tr["m"] = sdn_neuron(y, weights, fam["theta"])  # (B, H, L) each
    else:
        s = None
    tr["s"] = s
    if fam["mixing"] == "glu":
        mix = glu(s, params["mix.W"], params["mix.b"])  # (B, H, L)
    else:
        mix = gsu(y, params["mix.W"], params["mix.b"], params["mix.c"])  # (B, H, L)
    tr["mix"] = mix
    out = x + mix  # (B, H, L) residual
    if not config["prenorm"]:
        out, tr["running_stats"] = _norm(out, params, config)  # (B, H, L)
    tr["out"] = out
    return tr


def block_forward(x, params, config):
    """One spiking SSM block (dropout off)::

        z = norm(x) if prenorm else x
        y = causal_conv(z, K(ssm)) + D z
        y = y / exp(ln_vth)                 families with a learnable threshold
        s = activation(y)                   gelu | Heaviside | LIF | SDN | refractory
        z = GLU(s)  or  GSU(y)
        x = x + z;  x = norm(x) if not prenorm (postnorm)

    Parameters
    ----------
    x : (B, H, L) float64
    params : dict
        One layer's parameters and buffers, named as in refimpl's model without the
        ``layers.i.`` prefix: ``ssm.log_dt, ssm.log_A_real, ssm.A_imag, ssm.C_re, ssm.C_im,
        ssm.D`` (and ``ssm.B_re, ssm.B_im``; ``C`` of shape (2, H, N2) makes the layer
        bidirectional), ``ln_vth`` (H,), ``rho`` (H,) (``refractory``), ``mix.W, mix.b``
        (and ``mix.c`` for GSU), ``norm.gamma, norm.beta`` and for BatchNorm
        ``norm.running_mean, norm.running_var``; the ``sdn`` family also reads the fused SDN
        weights ``sdn.w0 .. sdn.w5``.
    config : mapping
        ``activation`` (a key of :data:`FAMILIES`), ``norm`` (``"layer"`` or ``"batch"``),
        ``prenorm`` (bool), ``disc`` (``"zoh"`` or ``"bilinear"``, default ``"zoh"``),
        ``training`` (bool, default False: BatchNorm with batch statistics).

    Returns
    -------
    out : (B, H, L) float64
    """
    return block_trace(x, params, config)["out"]
