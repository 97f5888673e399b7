"""The spiking SSM forward, stated plainly in NumPy: the readable spec and the test oracle.

Standalone on purpose: no Numba, no imports from the rest of refimpl. Every function here is a
direct transcription of DESIGN.md, written for clarity, not speed (loops and einsums over
materialised ``(H, N2, L)`` arrays). Shapes: ``(B, H, L)`` = batch, channels, time.
"""
import numpy as np


def s4d_discretize(log_dt, log_A_real, A_imag, B=None, disc="zoh"):
    """DESIGN.md section 2: ``dA, dB`` of shape (H, N2)."""
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

    ``C`` is complex (H, N2) or (2, H, N2); returns (H, L) or (2, H, L).
    """
    dA, dB = s4d_discretize(log_dt, log_A_real, A_imag, B, disc)
    powers = np.exp(np.log(dA)[:, :, None] * np.arange(L))  # (H, N2, L)
    return 2.0 * np.einsum("...hn,hnl->...hl", C * dB, powers).real


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
        x = dA * x + dB * u[:, :, t, None]
        y[:, :, t] = 2.0 * (C0 * x).sum(-1).real
    if C1 is not None:
        r = np.zeros_like(x)  # (B, H, N2)
        for t in range(L - 2, -1, -1):
            r = dA * r + dB * u[:, :, t + 1, None]
            y[:, :, t] += 2.0 * (C1 * r).sum(-1).real
    if D is not None:
        y += D[:, None] * u
    return y


def neuron(x, tau, theta, reset="hard", u_reset=0.0, rho=None, refractory_steps=0,
           spike_condition="ge"):
    """DESIGN.md section 4, one step at a time over ``x (B, H, L)``; returns ``s, h, u``.

    ``m_t = tau u_{t-1}``, ``h_t = m_t + x_t``, ``s_t = Theta(h_t - theta)`` (``ge``: ``h >= theta``,
    ``gt``: ``h > theta``), no spike within ``refractory_steps`` steps after a spike, and
    ``u_t`` = ``h (1 - s) + s u_reset`` (hard), ``h - theta s`` (soft),
    ``h - (theta + rho) s`` (refractory, ``rho (H,)``), ``h`` (none).
    """
    Bsz, H, L = x.shape
    s, h, u = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)  # (B, H, L) each
    u_prev = np.zeros((Bsz, H))  # (B, H)
    since = np.full((Bsz, H), np.inf)  # steps since the last spike
    c = theta + (np.zeros(H) if rho is None else rho)  # (H,)
    for t in range(L):
        h[:, :, t] = tau * u_prev + x[:, :, t]
        fire = h[:, :, t] >= theta if spike_condition == "ge" else h[:, :, t] > theta
        s[:, :, t] = fire & (since > refractory_steps)
        since = np.where(s[:, :, t] > 0, 1.0, since + 1.0)
        if reset == "hard":
            u[:, :, t] = h[:, :, t] * (1 - s[:, :, t]) + s[:, :, t] * u_reset
        elif reset == "soft":
            u[:, :, t] = h[:, :, t] - theta * s[:, :, t]
        elif reset == "refractory":
            u[:, :, t] = h[:, :, t] - c * s[:, :, t]
        elif reset == "none":
            u[:, :, t] = h[:, :, t]
        else:
            raise ValueError(f"unknown reset {reset!r}")
        u_prev = u[:, :, t]
    return s, h, u


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
