"""The recurrent form of a diagonal SSM (DESIGN.md section 2), as a neuromorphic chip runs it.

    x_t = dA * x_{t-1} + dB * u_t          complex state x (B, H, N2), x_{-1} = 0
    y_t = 2 Re( sum_n C[h, n] x_t[n] ) + D u_t

Three implementations of the same map:

- :func:`ssm_step`: one time step, state in and state out (streaming inference);
- :func:`ssm_recurrence`: the whole sequence in a Numba kernel;
- :func:`ssm_scan`: the associative scan with the S5 operator
  ``(a_i, b_i) o (a_j, b_j) = (a_j a_i, a_j b_i + b_j)`` (Hillis-Steele, ``ceil(log2 L)`` levels,
  each a vectorised elementwise step: the parallel form).

Bidirectional ``C (2, H, N2)`` adds the anti-causal state ``r_t = dA r_{t+1} + dB u_{t+1}``
(``r_{L-1} = 0``) with ``y_t += 2 Re sum_n C[1] r_t``; its kernel is
``K1[j] = 2 Re sum C1 dB dA^j``.
"""
import numpy as np
from numba import njit

from . import config
from ._checks import check_array, check_shape


def _check_coeffs(dA, dB, C, D, H=None):
    dA = check_array("dA", dA, 2, dtype=np.complex128)
    if H is not None:
        check_shape("dA", dA, (H, None))
    if np.any(np.abs(dA) >= 1):
        i = tuple(int(k) for k in np.argwhere(np.abs(dA) >= 1)[0])
        raise ValueError(f"unstable mode: |dA| must be < 1, got |dA{list(i)}| = {abs(dA[i])}")
    dB = check_array("dB", dB, 2, dtype=np.complex128)
    check_shape("dB", dB, dA.shape)
    C = check_array("C", C, (2, 3), dtype=np.complex128)
    check_shape("C", C, ((2,) if C.ndim == 3 else ()) + dA.shape)
    if D is not None:
        D = check_array("D", D, 1)
        check_shape("D", D, (dA.shape[0],))
    return dA, dB, C, D


def _check_u(u):
    u = check_array("u", u, 3)
    if u.shape[-1] < 1:
        raise ValueError(f"u must have at least one time step (L >= 1), got shape {u.shape}")
    return u


def ssm_step(x, u_t, dA, dB, C, D=None):
    """One step of the causal recurrence.

    Parameters
    ----------
    x : complex128 (B, H, N2)
        State after step ``t-1`` (zeros before the first step).
    u_t : float64 (B, H)
        Input at step ``t``.
    dA, dB, C : complex128 (H, N2)
    D : float64 (H,) or None

    Returns
    -------
    y_t : float64 (B, H)
    x : complex128 (B, H, N2)
        The new state (a new array; the input state is not modified).
    """
    u_t = check_array("u_t", u_t, 2)
    dA, dB, C, D = _check_coeffs(dA, dB, C, D, u_t.shape[1])
    if C.ndim == 3:
        raise ValueError("ssm_step is causal: C must have shape (H, N2), got a bidirectional "
                         f"C of shape {C.shape}; run ssm_recurrence for bidirectional models")
    x = check_array("x", x, 3, dtype=np.complex128)
    check_shape("x", x, (u_t.shape[0],) + dA.shape)
    x = dA * x + dB * u_t[:, :, None]  # (B, H, N2)
    y_t = 2.0 * np.einsum("hn,bhn->bh", C, x).real  # (B, H)
    if D is not None:
        y_t = y_t + D * u_t
    return y_t, x


def ssm_zero_state(Bsz, H, N2):
    """The initial state ``x_{-1} = 0``, complex128 ``(B, H, N2)``."""
    return np.zeros((Bsz, H, N2), dtype=np.complex128)


@njit(**config.NJIT_OPTS)
def _recurrence(u, dA, dB, C0, C1, bidirectional, y):
    """Whole-sequence recurrence; preconditions: C-contiguous, ``u, y (B, H, L)`` float64,
    ``dA, dB, C0, C1 (H, N2)`` complex128; ``y`` is overwritten.

    Equivalent to looping :func:`ssm_step` over ``t`` (then the anti-causal sweep).
    """
    Bsz, H, L = u.shape
    N2 = dA.shape[1]
    x = np.empty(N2, dtype=np.complex128)
    for b in range(Bsz):
        for h in range(H):
            for n in range(N2):
                x[n] = 0.0
            for t in range(L):
                acc = 0.0
                ut = u[b, h, t]
                for n in range(N2):
                    x[n] = dA[h, n] * x[n] + dB[h, n] * ut
                    acc += (C0[h, n] * x[n]).real
                y[b, h, t] = 2.0 * acc
            if bidirectional:
                for n in range(N2):
                    x[n] = 0.0
                for t in range(L - 2, -1, -1):
                    acc = 0.0
                    ut = u[b, h, t + 1]
                    for n in range(N2):
                        x[n] = dA[h, n] * x[n] + dB[h, n] * ut
                        acc += (C1[h, n] * x[n]).real
                    y[b, h, t] += 2.0 * acc


def ssm_recurrence(u, dA, dB, C, D=None):
    """Run the recurrence over a whole sequence ``u (B, H, L)``; returns ``y (B, H, L)``.

    ``dA, dB (H, N2)`` and ``C (H, N2)`` or bidirectional ``(2, H, N2)`` are complex128.
    """
    u = _check_u(u)
    dA, dB, C, D = _check_coeffs(dA, dB, C, D, u.shape[1])
    C0, C1 = (C[0], C[1]) if C.ndim == 3 else (C, C)
    y = np.empty_like(u)  # (B, H, L)
    _recurrence(u, dA, dB, np.ascontiguousarray(C0), np.ascontiguousarray(C1), C.ndim == 3, y)
    if D is not None:
        y += D[:, None] * u
    return y


def s5_combine(a_i, b_i, a_j, b_j):
    """The S5 operator ``(a_i, b_i) o (a_j, b_j) = (a_j a_i, a_j b_i + b_j)`` (associative)."""
    return a_j * a_i, a_j * b_i + b_j


def associative_scan(a, b):
    """Inclusive scan of ``(a_t, b_t)`` under :func:`s5_combine` along the last axis.

    Returns ``x`` with ``x_t = a_t x_{t-1} + b_t`` (``x_{-1} = 0``), computed by Hillis-Steele
    doubling: at offset ``d = 1, 2, 4, ...`` every ``t >= d`` combines with ``t - d``.
    """
    a = a.copy()
    b = b.copy()
    L = a.shape[-1]
    d = 1
    while d < L:
        a_new, b_new = s5_combine(a[..., :-d], b[..., :-d], a[..., d:], b[..., d:])
        a[..., d:] = a_new
        b[..., d:] = b_new
        d *= 2
    return b


def ssm_scan(u, dA, dB, C, D=None):
    """The recurrence as an associative scan (same arguments and result as :func:`ssm_recurrence`).

    Materialises ``(B, H, N2, L)`` complex arrays: meant for checking, not for long sequences.
    """
    u = _check_u(u)
    dA, dB, C, D = _check_coeffs(dA, dB, C, D, u.shape[1])
    Bsz, H, L = u.shape
    C0 = C[0] if C.ndim == 3 else C
    a = np.broadcast_to(dA[None, :, :, None], (Bsz,) + dA.shape + (L,))  # (B, H, N2, L)
    b = dB[None, :, :, None] * u[:, :, None, :]  # (B, H, N2, L)
    x = associative_scan(a, b)  # (B, H, N2, L)
    y = 2.0 * np.einsum("hn,bhnl->bhl", C0, x).real  # (B, H, L)
    if C.ndim == 3:
        # anti-causal: r_t = dA r_{t+1} + dB u_{t+1}: scan the time-reversed, shifted input
        b_rev = np.zeros_like(b)  # (B, H, N2, L)
        b_rev[..., 1:] = b[..., :0:-1]  # reversed time tau = L-1-t; input at tau is u_{t+1}
        r = associative_scan(a, b_rev)[..., ::-1]  # (B, H, N2, L), r[..., t]
        y += 2.0 * np.einsum("hn,bhnl->bhl", C[1], r).real
    if D is not None:
        y += D[:, None] * u
    return y
