"""S4D: diagonal state space parameters, discretization and the convolution kernel K.

DESIGN.md section 2. Per channel ``h`` and complex mode ``n = 0 .. N2-1`` (``N2 = N // 2``)::

    dt = exp(log_dt[h])
    A  = -exp(log_A_real[h, n]) + i A_imag[h, n]
    B  = B_re + i B_im            (default B = 1, not trainable)
    C  = C_re + i C_im            shape (H, N2), or (2, H, N2) when bidirectional
    K[h, l] = 2 Re( sum_n C[h, n] dB[h, n] dA[h, n]^l ),   l = 0 .. L-1

Only ``N2 = N // 2`` complex modes are stored: the real SSM of size ``N`` has its modes in
conjugate pairs, and ``2 Re(.)`` adds the conjugate half back (S4D paper, section 3).

Gradients with respect to a complex number ``z`` are exchanged as the pair
``g_z = dL/dRe z + i dL/dIm z``. For a holomorphic map ``w = f(z)`` and a real loss,
``g_z = conj(f'(z)) g_w``; for a real variable ``t`` feeding ``w(t)``,
``dL/dt = Re(conj(w'(t)) g_w)``.
"""
from typing import NamedTuple

import numpy as np
from numba import njit

from . import config
from . import ops as _ops
from ._checks import check_array, check_int, check_name, check_real, check_shape

# --------------------------------------------------------------------------------------------
# Initialisations (DESIGN.md section 2)
# --------------------------------------------------------------------------------------------


def _init_lin(N):
    """S4D-Lin: ``A_n = -1/2 + i pi n``."""
    n = np.arange(N // 2)  # (N2,)
    return -0.5 + 1j * np.pi * n


def _init_inv(N):
    """S4D-Inv: ``A_n = -1/2 + i (N / pi) (N / (2n + 1) - 1)``."""
    n = np.arange(N // 2)  # (N2,)
    return -0.5 + 1j * (N / np.pi) * (N / (2 * n + 1) - 1)


def _init_real(N):
    """S4D-Real: ``A_n = -(n + 1)``."""
    n = np.arange(N // 2)  # (N2,)
    return -(n + 1.0) + 0j


INITS = {"lin": _init_lin, "inv": _init_inv, "real": _init_real}

#: The kernel's parameter names, in the argument order of :func:`s4d_kernel` (the one list:
#: the S4D layer, the model and golden traces take it from here).
KERNEL_PARAMS = ("log_dt", "log_A_real", "A_imag", "C_re", "C_im")


#: The initial steps :func:`s4d_init` draws from: ``DT_RANGE[0] <= dt_min <= dt_max <=
#: DT_RANGE[1]``. A choice inside the float64 limits, with margin on both sides:
#:
#: - below: the slowest mode decays by ``1 - |exp(dt A)| ~= dt |Re A|`` per step (``Re A = -1/2``
#:   for S4D-Lin and -Inv), resolved to ``eps / (dt / 2)`` relative: 4e-8 at ``dt = 1e-8``;
#:   below ``dt = 2.2e-16`` it rounds to no decay at all (``|exp(dt A)| == 1``).
#: - above: ZOH's ``exp(dt A)`` of the slowest mode underflows to exactly 0 past ``dt = 745``
#:   (S4D-Real, ``Re A = -1``; measured: ``log_dt`` then gets a zero gradient, the layer forgets
#:   everything in one step), and the backward overflows past ``dt ~ 1e153`` (measured:
#:   ``[1e-300, 1e300]`` diverged at the first step).
#:
#: The golden suites' extremes (1e-6 and 5) and the S4 papers' ranges (1e-4 .. 1e-1) lie inside.
DT_RANGE = (1e-8, 1e2)


def check_dt_range(dt_min, dt_max):
    """``(dt_min, dt_max)`` as floats if ``DT_RANGE[0] <= dt_min <= dt_max <= DT_RANGE[1]``
    (:data:`DT_RANGE` says why); ValueError quoting the value otherwise."""
    dt_min = check_real("dt_min", dt_min, 0.0, lo_open=True)
    dt_max = check_real("dt_max", dt_max, 0.0, lo_open=True)
    lo, hi = DT_RANGE
    for name, dt in (("dt_min", dt_min), ("dt_max", dt_max)):
        if not lo <= dt <= hi:
            raise ValueError(f"{name} must be in [{lo:g}, {hi:g}] (refimpl.ssm.DT_RANGE), "
                             f"got {dt:g}")
    if dt_min > dt_max:
        raise ValueError(f"dt_min must be <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    return dt_min, dt_max


def s4d_init(H, N, init="lin", seed=0, dt_min=1e-3, dt_max=1e-1, trainable_B=False,
             bidirectional=False):
    """Draw S4D layer parameters.

    Parameters
    ----------
    H : int
        Channels (``d_model``), >= 1.
    N : int
        Real state size (``d_state``), even, >= 2; ``N2 = N // 2`` complex modes are kept.
    init : {"lin", "inv", "real"}, default "lin"
        Initialisation of ``A`` (S4D paper); see :data:`INITS`.
    seed : int or numpy.random.Generator, default 0
    dt_min, dt_max : float, default 1e-3, 1e-1
        ``log_dt ~ U[ln dt_min, ln dt_max]``, within :data:`DT_RANGE`: ``1e-8 <= dt_min <=
        dt_max <= 100`` (:func:`check_dt_range`).
    trainable_B : bool, default False
        Add ``B_re = 1, B_im = 0`` as parameters.
    bidirectional : bool, default False
        ``C`` gets a leading axis of 2 (forward and backward kernels share ``A`` and ``dt``).

    Returns
    -------
    dict of float64 arrays
        ``log_dt (H,)``, ``log_A_real (H, N2)``, ``A_imag (H, N2)``, ``C_re, C_im (H, N2)`` or
        ``(2, H, N2)``, ``D (H,)`` and, with ``trainable_B``, ``B_re, B_im (H, N2)``.
        ``C ~ N(0, 1/2)`` per real component, ``D ~ N(0, 1)``.
    """
    H = check_int("H", H, 1)
    N = check_int("N", N, 2)
    if N % 2:
        raise ValueError(f"N (d_state) must be even (N2 = N // 2 complex modes), got {N}")
    make_A = check_name("init", init, INITS)
    dt_min, dt_max = check_dt_range(dt_min, dt_max)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    N2 = N // 2
    A = np.broadcast_to(make_A(N), (H, N2))  # (H, N2)
    log_dt = rng.uniform(np.log(dt_min), np.log(dt_max), size=H)  # (H,)
    cshape = (2, H, N2) if bidirectional else (H, N2)
    params = {
        "log_dt": log_dt,
        "log_A_real": np.log(-A.real).copy(),  # (H, N2)
        "A_imag": A.imag.copy(),  # (H, N2)
        "C_re": rng.normal(0.0, np.sqrt(0.5), size=cshape),  # (H, N2) or (2, H, N2)
        "C_im": rng.normal(0.0, np.sqrt(0.5), size=cshape),
        "D": rng.normal(0.0, 1.0, size=H),  # (H,)
    }
    if trainable_B:
        params["B_re"] = np.ones((H, N2))  # (H, N2)
        params["B_im"] = np.zeros((H, N2))  # (H, N2)
    return params


# --------------------------------------------------------------------------------------------
# Discretizations (DESIGN.md section 2): each returns (dA, dB) and the partial derivatives
# the backward pass needs. All maps are holomorphic in A and B, real in dt.
# --------------------------------------------------------------------------------------------


def _cexpm1(w):
    """``exp(w) - 1`` for complex ``w`` without cancellation near 0.

    ``exp(x + iy) - 1 = expm1(x) cos y - 2 sin^2(y/2) + i exp(x) sin y``.
    """
    x, y = w.real, w.imag
    return np.expm1(x) * np.cos(y) - 2.0 * np.sin(0.5 * y) ** 2 + 1j * np.exp(x) * np.sin(y)


def _psi(w):
    """``psi(w) = (w e^w - (e^w - 1)) / w^2 = sum_{k>=2} (k-1)/k! w^(k-2)``.

    The series (24 terms, truncation < 1e-22) is used for ``|w| < 0.5`` where the closed form
    cancels; the closed form elsewhere (relative error about eps / |w|).
    """
    small = np.abs(w) < 0.5
    ws = np.where(small, w, 0.0)
    series = np.zeros_like(w)
    fact = np.prod(np.arange(1, 26, dtype=np.float64))  # 25!
    for k in range(25, 1, -1):  # Horner over coefficients (k-1)/k!
        series = series * ws + (k - 1) / fact
        fact /= k
    wb = np.where(small, 1.0, w)
    closed = (wb * np.exp(wb) - _cexpm1(wb)) / wb**2
    return np.where(small, series, closed)


def _zoh(dt, A, B, partials=False):
    """Zero-order hold: ``dA = exp(dt A)``, ``dB = (exp(dt A) - 1) / A * B``.

    Returns ``(dA, dB)``, plus the dict of partial derivatives when ``partials`` is true.
    """
    w = dt * A
    E = np.exp(w)
    phi = _cexpm1(w) / A  # (exp(dt A) - 1) / A
    dA, dB = E, phi * B
    if not partials:
        return dA, dB
    return dA, dB, {
        "dA_dA": dt * E,
        "dA_ddt": A * E,
        "dB_dA": B * dt**2 * _psi(w),  # B (dt A E - (E - 1)) / A^2
        "dB_ddt": B * E,
        "dB_dB": phi,
    }


def _bilinear(dt, A, B, partials=False):
    """Bilinear (Tustin): ``dA = (1 + dt A/2) / (1 - dt A/2)``, ``dB = dt B / (1 - dt A/2)``.

    Returns ``(dA, dB)``, plus the dict of partial derivatives when ``partials`` is true.
    """
    den = 1.0 - 0.5 * dt * A
    dA = (1.0 + 0.5 * dt * A) / den
    dB = dt * B / den
    if not partials:
        return dA, dB
    return dA, dB, {
        "dA_dA": dt / den**2,
        "dA_ddt": A / den**2,
        "dB_dA": 0.5 * dt**2 * B / den**2,
        "dB_ddt": B / den**2,
        "dB_dB": dt / den,
    }


DISCRETIZATIONS = {"zoh": _zoh, "bilinear": _bilinear}


def discretize(dt, A, B=None, disc="zoh"):
    """Discretize a diagonal continuous-time SSM.

    Parameters
    ----------
    dt : float64 array (H,)
        Step sizes, > 0.
    A : complex128 array (H, N2)
        Continuous-time eigenvalues, ``Re A < 0`` (stable).
    B : complex128 array (H, N2) or None
        Input vector; ``None`` means ``B = 1``.
    disc : {"zoh", "bilinear"}, default "zoh"

    Returns
    -------
    dA, dB : complex128 arrays (H, N2)
    """
    fn = check_name("disc", disc, DISCRETIZATIONS)
    dt = check_array("dt", dt, 1)
    if np.any(dt <= 0):
        raise ValueError(f"dt must be > 0 everywhere, got min(dt) = {dt.min()}")
    A = check_array("A", A, 2, dtype=np.complex128)
    check_shape("A", A, (dt.shape[0], None))
    if np.any(A.real >= 0):
        i = tuple(int(k) for k in np.argwhere(A.real >= 0)[0])
        raise ValueError(f"unstable mode: Re A must be < 0, got A{list(i)} = {A[i]}")
    if B is None:
        B = np.ones_like(A)
    B = check_array("B", B, 2, dtype=np.complex128)
    check_shape("B", B, A.shape)
    return fn(dt[:, None], A, B)


# --------------------------------------------------------------------------------------------
# Vandermonde kernels: K[m, l] = 2 Re sum_n W[m, n] z[m, n]^l, never materialising (M, N2, L)
# --------------------------------------------------------------------------------------------


@njit(**config.NJIT_OPTS)
def _vandermonde_fwd(Wr, Wi, zr, zi, K):
    """``K[m, l] = 2 Re sum_n (Wr + i Wi)[m, n] (zr + i zi)[m, n]^l``, written into ``K (M, L)``.

    Preconditions: C-contiguous float64, ``Wr, Wi, zr, zi (M, N2)``, ``K (M, L)``, ``L >= 1``.
    Equivalent to ``2 * (W[:, :, None] * z[:, :, None] ** arange(L)).real.sum(1)``; the power
    is a running product ``p <- p z`` (relative error grows like ``l * eps``, the same order as
    the rounding of ``z`` itself raised to the power ``l``). The loop over ``n`` is innermost so
    the complex update vectorises; the sum over ``n`` runs in a fixed order.
    """
    M, N2 = Wr.shape
    L = K.shape[1]
    pr = np.empty(N2)
    pi_ = np.empty(N2)
    for m in range(M):
        for n in range(N2):
            pr[n] = Wr[m, n]
            pi_[n] = Wi[m, n]
        for l in range(L):
            acc = 0.0
            for n in range(N2):
                acc += pr[n]
                a = pr[n] * zr[m, n] - pi_[n] * zi[m, n]
                pi_[n] = pr[n] * zi[m, n] + pi_[n] * zr[m, n]
                pr[n] = a
            K[m, l] = 2.0 * acc


@njit(**config.NJIT_OPTS)
def _vandermonde_bwd(dK, zr, zi, Q0r, Q0i, Q1r, Q1i):
    """Polynomial and derivative: ``Q0 = sum_l dK[l] z^l``, ``Q1 = sum_l l dK[l] z^(l-1)``.

    Horner's scheme from ``l = L-1`` down, with the derivative carried alongside
    (``Q1 <- Q1 z + Q0``, then ``Q0 <- Q0 z + dK[l]``). Preconditions: C-contiguous float64,
    ``dK (M, L)``, ``zr, zi, Q* (M, N2)``; outputs are overwritten.
    """
    M, L = dK.shape
    N2 = zr.shape[1]
    for m in range(M):
        for n in range(N2):
            Q0r[m, n] = 0.0
            Q0i[m, n] = 0.0
            Q1r[m, n] = 0.0
            Q1i[m, n] = 0.0
        for l in range(L - 1, -1, -1):
            d = dK[m, l]
            for n in range(N2):
                a, b = zr[m, n], zi[m, n]
                q0r, q0i = Q0r[m, n], Q0i[m, n]
                q1r, q1i = Q1r[m, n], Q1i[m, n]
                Q1r[m, n] = q1r * a - q1i * b + q0r
                Q1i[m, n] = q1r * b + q1i * a + q0i
                Q0r[m, n] = q0r * a - q0i * b + d
                Q0i[m, n] = q0r * b + q0i * a


def vandermonde(W, z, L):
    """``K[m, l] = 2 Re sum_n W[m, n] z[m, n]^l`` for complex ``W, z (M, N2)``; returns
    ``(M, L)``."""
    M = W.shape[0]
    K = np.empty((M, L))  # (M, L)
    _vandermonde_fwd(np.ascontiguousarray(W.real), np.ascontiguousarray(W.imag),
                     np.ascontiguousarray(z.real), np.ascontiguousarray(z.imag), K)
    return K


def vandermonde_bwd(W, z, dK):
    """VJP of :func:`vandermonde`: returns ``(g_W, g_z)``, complex ``(M, N2)``.

    ``K = 2 Re(W P(z))`` with ``P`` the power sum, so ``g_W = 2 conj(Q0)`` and
    ``g_z = 2 conj(W Q1)`` where ``Q0 = sum_l dK[l] z^l`` and ``Q1 = dQ0/dz``.
    """
    shape = z.shape
    Q = [np.empty(shape) for _ in range(4)]  # Q0r, Q0i, Q1r, Q1i, each (M, N2)
    _vandermonde_bwd(np.ascontiguousarray(dK), np.ascontiguousarray(z.real),
                     np.ascontiguousarray(z.imag), *Q)
    Q0 = Q[0] + 1j * Q[1]  # (M, N2)
    Q1 = Q[2] + 1j * Q[3]  # (M, N2)
    return 2.0 * np.conj(Q0), 2.0 * np.conj(W * Q1)


# --------------------------------------------------------------------------------------------
# Public kernel forward / backward
# --------------------------------------------------------------------------------------------


def check_ssm_params(log_dt, log_A_real, A_imag, C_re, C_im, B_re=None, B_im=None):
    """Validate S4D parameters; returns them C-contiguous plus ``(H, N2, bidirectional)``."""
    log_dt = check_array("log_dt", log_dt, 1)
    H = log_dt.shape[0]
    if H < 1:
        raise ValueError("log_dt must have at least one channel (H >= 1), got shape (0,)")
    log_A_real = check_array("log_A_real", log_A_real, 2)
    check_shape("log_A_real", log_A_real, (H, None))
    N2 = log_A_real.shape[1]
    if N2 < 1:
        raise ValueError("log_A_real must have at least one mode (N2 >= 1), "
                         f"got shape {log_A_real.shape}")
    A_imag = check_array("A_imag", A_imag, 2)
    check_shape("A_imag", A_imag, (H, N2))
    C_re = check_array("C_re", C_re, (2, 3))
    bidirectional = C_re.ndim == 3
    check_shape("C_re", C_re, (2, H, N2) if bidirectional else (H, N2))
    C_im = check_array("C_im", C_im, C_re.ndim)
    check_shape("C_im", C_im, C_re.shape)
    if (B_re is None) != (B_im is None):
        raise ValueError("pass both B_re and B_im (trainable B) or neither (B = 1)")
    if B_re is not None:
        B_re = check_array("B_re", B_re, 2)
        check_shape("B_re", B_re, (H, N2))
        B_im = check_array("B_im", B_im, 2)
        check_shape("B_im", B_im, (H, N2))
    with np.errstate(over="ignore"):
        dt, a_re = np.exp(log_dt), np.exp(log_A_real)
    if not np.all(np.isfinite(dt)):
        h = int(np.argmax(~np.isfinite(dt)))
        raise ValueError(f"dt = exp(log_dt) must be finite, but log_dt[{h}] = {log_dt[h]} "
                         "overflows to dt = inf; keep log_dt < 709")
    if not np.all(np.isfinite(a_re)):
        i = tuple(int(k) for k in np.argwhere(~np.isfinite(a_re))[0])
        raise ValueError("unstable mode: Re A = -exp(log_A_real) must be finite, "
                         f"but log_A_real{list(i)} = {log_A_real[i]} overflows to Re A = -inf; "
                         "keep log_A_real < 709")
    if np.any(dt <= 0):
        h = int(np.argmin(dt))
        raise ValueError(f"dt = exp(log_dt) must be > 0, but log_dt[{h}] = {log_dt[h]} underflows "
                         "to dt = 0; keep log_dt > -700")
    if np.any(a_re <= 0):
        i = tuple(int(k) for k in np.argwhere(a_re <= 0)[0])
        raise ValueError("unstable mode: Re A = -exp(log_A_real) must be < 0, "
                         f"but log_A_real{list(i)} = {log_A_real[i]} underflows to Re A = 0; "
                         "keep log_A_real > -700")
    return log_dt, log_A_real, A_imag, C_re, C_im, B_re, B_im, H, N2, bidirectional


def _discrete(log_dt, log_A_real, A_imag, B_re, B_im, disc, partials=False):
    """``(dt (H, 1), A, B, dA, dB)`` and, with ``partials``, the discretization's derivatives."""
    dt = np.exp(log_dt)[:, None]  # (H, 1)
    A = -np.exp(log_A_real) + 1j * A_imag  # (H, N2)
    B = np.ones_like(A) if B_re is None else B_re + 1j * B_im  # (H, N2)
    with np.errstate(over="ignore", invalid="ignore"):
        out = DISCRETIZATIONS[disc](dt, A, B, partials)
    for name, v in zip(("dA", "dB"), out[:2]):
        if not np.all(np.isfinite(v)):
            i = tuple(int(k) for k in np.argwhere(~np.isfinite(v))[0])
            raise ValueError(f"the {disc} discretization overflows: {name}{list(i)} = {v[i]} "
                             f"(dt = {dt[i[0], 0]:.3g}, A = {A[i]:.3g}, B = {B[i]:.3g}); "
                             "reduce log_dt, |A| or |B|")
    return (dt, A, B) + out


def discretize_params(log_dt, log_A_real, A_imag, B_re=None, B_im=None, disc="zoh"):
    """``(dA, dB)`` complex ``(H, N2)`` from S4D parameters (the recurrent form's coefficients)."""
    check_name("disc", disc, DISCRETIZATIONS)
    C0 = np.zeros_like(log_A_real) if isinstance(log_A_real, np.ndarray) else log_A_real
    args = check_ssm_params(log_dt, log_A_real, A_imag, C0, C0, B_re, B_im)
    _, _, _, dA, dB = _discrete(args[0], args[1], args[2], args[5], args[6], disc)
    return dA, dB


def s4d_kernel(log_dt, log_A_real, A_imag, C_re, C_im, L, disc="zoh", B_re=None, B_im=None):
    """S4D convolution kernel ``K[h, l] = 2 Re sum_n C dB dA^l``.

    Parameters
    ----------
    log_dt : float64 (H,)
    log_A_real, A_imag : float64 (H, N2)
    C_re, C_im : float64 (H, N2), or (2, H, N2) for a bidirectional kernel
    L : int, >= 1
    disc : {"zoh", "bilinear"}, default "zoh"
    B_re, B_im : float64 (H, N2) or None (B = 1)

    Returns
    -------
    K : float64 (H, L), or (2, H, L) when C is bidirectional (both directions share A, dt, B).
    """
    check_name("disc", disc, DISCRETIZATIONS)
    L = check_int("L", L, 1)
    log_dt, log_A_real, A_imag, C_re, C_im, B_re, B_im, H, N2, bi = check_ssm_params(
        log_dt, log_A_real, A_imag, C_re, C_im, B_re, B_im)
    _, _, _, dA, dB = _discrete(log_dt, log_A_real, A_imag, B_re, B_im, disc)
    C = C_re + 1j * C_im  # (H, N2) or (2, H, N2)
    with np.errstate(over="ignore", invalid="ignore"):
        W = (C * dB).reshape(-1, N2)  # (H or 2H, N2)
    z = np.broadcast_to(dA, C.shape).reshape(-1, N2)  # (H or 2H, N2)
    K = vandermonde(W, z, L)  # (H or 2H, L)
    if not np.all(np.isfinite(K)):
        raise ValueError("the S4D kernel overflows (non-finite values from finite parameters): "
                         "reduce the magnitude of C or B")
    return K.reshape(C.shape[:-1] + (L,))


def s4d_kernel_bwd(log_dt, log_A_real, A_imag, C_re, C_im, dK, disc="zoh", B_re=None, B_im=None):
    """VJP of :func:`s4d_kernel` given ``dK`` of the kernel's shape.

    Returns
    -------
    tuple of float64 arrays, in input order
        ``(g_log_dt (H,), g_log_A_real (H, N2), g_A_imag (H, N2), g_C_re, g_C_im)`` and, when B is
        given, ``g_B_re, g_B_im (H, N2)``. Freshly allocated (overwrite semantics).

    Notes
    -----
    With ``W = C dB`` and ``z = dA``, the Vandermonde VJP gives ``g_W = 2 conj(Q0)`` and
    ``g_z = 2 conj(W Q1)`` (``Q0 = sum_l dK[l] z^l``, ``Q1 = dQ0/dz``). Then
    ``g_C = conj(dB) g_W``, ``g_dB = conj(C) g_W`` (summed over directions), and through the
    discretization ``g_A = conj(ddA/dA) g_z + conj(ddB/dA) g_dB``,
    ``g_dt = sum_n Re(conj(ddA/ddt) g_z + conj(ddB/ddt) g_dB)``, ``g_B = conj(ddB/dB) g_dB``.
    Finally ``g_log_dt = dt g_dt``, ``g_log_A_real = -exp(log_A_real) Re g_A``,
    ``g_A_imag = Im g_A``. ZOH's ``ddB/dA = B dt^2 psi(dt A)`` uses a series near 0.
    """
    check_name("disc", disc, DISCRETIZATIONS)
    log_dt, log_A_real, A_imag, C_re, C_im, B_re, B_im, H, N2, bi = check_ssm_params(
        log_dt, log_A_real, A_imag, C_re, C_im, B_re, B_im)
    dK = check_array("dK", dK, C_re.ndim)
    check_shape("dK", dK, C_re.shape[:-1] + (None,))
    dt, A, B, dA, dB, p = _discrete(log_dt, log_A_real, A_imag, B_re, B_im, disc, partials=True)
    C = C_re + 1j * C_im  # (H, N2) or (2, H, N2)
    W = (C * dB).reshape(-1, N2)  # (M, N2)
    z = np.broadcast_to(dA, C.shape).reshape(-1, N2)  # (M, N2)
    g_W, g_z = vandermonde_bwd(W, z, dK.reshape(-1, dK.shape[-1]))
    g_W = g_W.reshape(C.shape)
    g_z = g_z.reshape(C.shape)
    g_C = np.conj(dB) * g_W  # (H, N2) or (2, H, N2)
    g_dB = np.conj(C) * g_W
    if bi:
        g_z, g_dB = g_z.sum(0), g_dB.sum(0)  # shared A, dt, B: accumulate both directions
    g_A = np.conj(p["dA_dA"]) * g_z + np.conj(p["dB_dA"]) * g_dB  # (H, N2)
    g_dt = np.real(np.conj(p["dA_ddt"]) * g_z + np.conj(p["dB_ddt"]) * g_dB).sum(1)  # (H,)
    grads = (
        dt[:, 0] * g_dt,  # log_dt (H,)
        -np.exp(log_A_real) * g_A.real,  # log_A_real (H, N2)
        g_A.imag.copy(),  # A_imag (H, N2)
        g_C.real.copy(),  # C_re
        g_C.imag.copy(),  # C_im
    )
    if B_re is not None:
        g_B = np.conj(p["dB_dB"]) * g_dB  # (H, N2)
        grads += (g_B.real.copy(), g_B.imag.copy())
    return grads


# ---- the op contract (refimpl.ops) -----------------------------------------------------------


class KernelConfig(NamedTuple):
    """Configuration of the ``s4d_kernel`` op: the kernel length and the discretization."""
    L: int = 16
    disc: str = "zoh"


class KernelCache(NamedTuple):
    """What the ``s4d_kernel`` op's VJP reads: its parameters and discretization."""
    params: dict
    disc: str


_B_PARAMS = ("B_re", "B_im")


def _kernel_op(inputs, params, cfg=None, state=None):
    cfg = KernelConfig() if cfg is None else cfg
    K = s4d_kernel(*[params[k] for k in KERNEL_PARAMS], cfg.L, disc=cfg.disc,
                   **_ops.optional(params, *_B_PARAMS))
    return _ops.Result({"K": K}, KernelCache(dict(params), cfg.disc), None)


def _kernel_op_vjp(cache, cotangents):
    p = cache.params
    B = _ops.optional(p, *_B_PARAMS)
    dK = cotangents.get("K")
    if dK is None:  # a zero cotangent: zero gradients
        return {k: np.zeros_like(p[k]) for k in KERNEL_PARAMS + tuple(B)}
    g = s4d_kernel_bwd(*[p[k] for k in KERNEL_PARAMS], dK, disc=cache.disc, **B)
    return dict(zip(KERNEL_PARAMS + tuple(B), g))


def kernel_depth(inputs, params, cfg):
    """Rounding depth of the kernel: the ``L``-term power sum plus the ``N2`` modes."""
    L = (cfg or KernelConfig()).L
    return {"*": L + params["log_A_real"].shape[1]}


def ssm_examples_params(rng, H, N, disc="zoh", init="lin", trainable_B=False,
                        bidirectional=False):
    """S4D parameters drawn for the op examples: :func:`s4d_init` at a random seed, ``C``
    from the generator (float64 dict)."""
    p = s4d_init(H, N, init=init, seed=int(rng.integers(1 << 30)), trainable_B=trainable_B,
                 bidirectional=bidirectional)
    return {k: np.asarray(v, dtype=np.float64) for k, v in p.items()}


def kernel_examples(rng):
    """Both discretizations, trainable ``B``, a bidirectional kernel."""
    out = []
    for disc, tb, bi in (("zoh", False, False), ("bilinear", True, False), ("zoh", True, True)):
        p = ssm_examples_params(rng, 3, 4, disc=disc, trainable_B=tb, bidirectional=bi)
        p = {k: v for k, v in p.items() if k in KERNEL_PARAMS + _B_PARAMS}
        out.append(_ops.Example({}, p, KernelConfig(L=10, disc=disc)))
    return out


KERNEL_OP = _ops.defop(
    name="s4d_kernel", math="K[h, l] = 2 Re sum_n C dB dA^l",
    inputs=(), params=KERNEL_PARAMS + _B_PARAMS, optional=_B_PARAMS, outputs=("K",),
    config=KernelConfig, fwd=_kernel_op, vjp=_kernel_op_vjp, depth=kernel_depth,
    examples=kernel_examples, float32=False,
)
