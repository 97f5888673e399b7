"""The S4D layer: kernel + convolution + ``D`` skip, forward and backward (DESIGN.md 2-3, 10).

    K = s4d_kernel(params, L)           (H, L) or (2, H, L)
    y = fftconv(u, K) + D u             (B, H, L)

Parameters travel as a dict with the DESIGN.md names: ``log_dt, log_A_real, A_imag, C_re,
C_im, D`` and optionally ``B_re, B_im`` (see :func:`refimpl.ssm.s4d_init`).

**State** (DESIGN.md section 10). The layer's state is its complex modes ``x`` complex128
``(B, H, N2)`` after the last step of a chunk: the state of the recurrence
``x_t = dA x_{t-1} + dB u_t`` (:mod:`refimpl.recurrence`). The zero state (``x_{-1} = 0``,
:func:`s4d_zero_state`, or ``state=None``) gives the results of the stateless layer exactly
(the state term is skipped, not added as zeros).

**Chunk rule.** A chunk ``u_0 .. u_{T-1}`` started from ``x_{-1}`` gives::

    y_t   = (K * u)_t + D u_t + 2 Re sum_n C[h, n] dA[h, n]^(t+1) x_{-1}[b, h, n]
    x_end = dA^T x_{-1} + sum_{s=0..T-1} dA^(T-1-s) dB u_s

The first line is the whole-sequence convolution split at the chunk boundary: the inputs of
earlier chunks reach ``y_t`` only through ``x_{-1}`` (``K[l] = 2 Re sum C dB dA^l``). The state
term is one Vandermonde product (:func:`refimpl.ssm.vandermonde` with ``W = C dA x_{-1}``), so a
sequence processed in chunks of any sizes, each handed the previous chunk's ``x_end``, equals the
whole sequence up to rounding.

**Why the end state is exact.** ``x_end`` is the closed form above, not the recurrence run over
the chunk: the powers ``dA^k = exp(k log dA)`` come from one accurately computed logarithm
(``log|dA|`` through ``log1p`` near the unit circle, where slow modes live), and the sum over
``s`` is a real matrix product of ``u`` with the power table, blocked over time so the table
never exceeds :data:`STATE_BLOCK_BYTES`. No rounding error is carried from one step to the next,
as it is in the recurrence (``T`` dependent steps); the error of each term is that of one
``exp`` of a product, ``k d + O(eps)`` relative, where ``d`` is the absolute error of
``log dA``: at most a few eps, and a few ``eps |log dA|`` for slow modes near ``dA = 1``. On a
step response of 3000 steps with ``dt = 1e-3`` the end state is within 2-4 eps of an
extended-precision reference, the recurrence within about 160 eps
(``tests/test_stream_s4d_sdn.py``). It is computed only when ``return_state=True``.

**Stepping.** :func:`s4d_step_coeffs` discretizes once per stream and :func:`s4d_layer_step`
runs one step of the recurrence, the same floating-point operations in the same order as
:func:`refimpl.recurrence.ssm_recurrence` (so a loop of steps equals it exactly).

A bidirectional layer (``C`` of shape ``(2, H, N2)``) has no streaming state: its output at
``t`` reads later inputs.

**float32** (:mod:`refimpl.precision`). Under ``using("float32")`` the layer takes and returns
float32 (``u``, the parameters, ``y``, ``du`` and the parameter gradients), but the kernel is
always generated in float64 from the exactly up-cast parameters and rounded once to float32
(:func:`_kernel`): ``dA^l`` from float32 arithmetic would lose about ``l`` eps32 relative at
position ``l``, while the generation costs ``O(H N L)``, little beside the convolution. Its
backward likewise runs in float64 on the up-cast ``dK``. States and steps are float64 only.
"""
from typing import NamedTuple, Optional

import numpy as np
from numba import njit

from . import config
from . import ops as _ops
from . import precision
from ._checks import check_array, check_name, check_shape
from .conv import ConvCache, conv_fwd, conv_vjp, fftconv_bwd
from .conv import fft_length
from .ssm import (DISCRETIZATIONS, KERNEL_PARAMS, discretize_params, s4d_kernel,
                  s4d_kernel_bwd, ssm_examples_params, vandermonde)

#: Every parameter of the layer: the kernel's and the skip ``D``.
LAYER_PARAMS = KERNEL_PARAMS + ("D",)
TRAINABLE_B = ("B_re", "B_im")

#: Upper bound of the power table's memory per time block when computing the end state.
STATE_BLOCK_BYTES = 64 << 20

_NO_BIDIRECTIONAL_STATE = ("a bidirectional S4D layer has no streaming state (its output at t "
                           "reads later inputs)")


class S4DCache(NamedTuple):
    """What :func:`s4d_layer_bwd` needs from :func:`s4d_layer_fwd`."""
    u: np.ndarray  # (B, H, L)
    K: np.ndarray  # (H, L) or (2, H, L)
    params: dict
    disc: str
    state: Optional[np.ndarray]  # (B, H, N2) nonzero initial state, or None (zero state)
    conv: Optional[ConvCache] = None  # the convolution's spectra, reused by the backward


class S4DStepCoeffs(NamedTuple):
    """The recurrent form's coefficients, from :func:`s4d_step_coeffs` (once per stream)."""
    dA: np.ndarray  # complex128 (H, N2)
    dB: np.ndarray  # complex128 (H, N2)
    C: np.ndarray  # complex128 (H, N2)
    D: np.ndarray  # float64 (H,)


def _kernel_args(params):
    missing = [k for k in LAYER_PARAMS if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; build it with refimpl.ssm.s4d_init")
    args = [params[k] for k in KERNEL_PARAMS]
    B = {k: params[k] for k in TRAINABLE_B if k in params}
    if len(B) == 1:
        raise ValueError("params must hold both B_re and B_im (trainable B) or neither")
    return args, B


def _kernel(args, B, L, disc):
    """``s4d_kernel`` in float64 whatever the precision (see the module docstring): under
    float32 the checked float32 parameters are up-cast exactly and ``K`` is rounded once."""
    dtype = precision.float_dtype()
    if dtype == np.float64:
        return s4d_kernel(*args, L, disc=disc, **B)
    args = [check_array(k, a, (1, 2, 3)).astype(np.float64) for k, a in zip(KERNEL_PARAMS, args)]
    B = {k: check_array(k, a, 2).astype(np.float64) for k, a in B.items()}
    with precision.using("float64"):
        K = s4d_kernel(*args, L, disc=disc, **B)
    return K.astype(dtype)


def _kernel_bwd(args, B, dK, disc):
    """``s4d_kernel_bwd`` in float64 (as :func:`_kernel`); gradients in ``dK``'s precision."""
    dtype = precision.float_dtype()
    if dtype == np.float64:
        return s4d_kernel_bwd(*args, dK, disc=disc, **B)
    args = [a.astype(np.float64) for a in args]
    B = {k: a.astype(np.float64) for k, a in B.items()}
    dK = check_array("dK", dK, (2, 3)).astype(np.float64)
    with precision.using("float64"):
        g = s4d_kernel_bwd(*args, dK, disc=disc, **B)
    return tuple(a.astype(dtype) for a in g)


def s4d_zero_state(B, H, N2):
    """The zero state ``x_{-1} = 0``: complex128 ``(B, H, N2)``."""
    return np.zeros((B, H, N2), dtype=np.complex128)


def check_state(state, B, H, N2, name="state"):
    """Validate an S4D layer state: complex128 ``(B, H, N2)``, finite; returns it C-contiguous.

    Nothing is cast: a real array raises ``TypeError`` (the state is the complex modes).
    """
    want = f"complex128 of shape (B, H, N2) = ({B}, {H}, {N2})"
    if not isinstance(state, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, {want} (the S4D layer's complex "
                        f"modes), got {type(state).__name__}; start from "
                        "refimpl.s4d.s4d_zero_state(B, H, N2)")
    if state.dtype != np.complex128:
        raise TypeError(f"{name} must be {want} (the S4D layer's complex modes), got dtype "
                        f"{state.dtype}; refimpl never casts silently: build it as "
                        f"x_re + 1j * x_im, or pass {name}.astype(np.complex128) if the "
                        "imaginary part is truly zero")
    if state.shape != (B, H, N2):
        raise ValueError(f"{name} must have shape (B, H, N2) = ({B}, {H}, {N2}), got "
                         f"{state.shape}")
    return check_array(name, state, 3, dtype=np.complex128)


def _power_log(dA):
    """``log dA`` for ``0 <= |dA| < 1``, accurate near the unit circle; ``(H, N2)`` complex.

    ``log|z| = log1p((re - 1)(re + 1) + im^2) / 2`` for ``|z| >= 1/2`` (no cancellation in
    ``|z|^2 - 1`` beyond the terms' own, which ``log|z| = log(|z|)`` would lose); ``log(|z|)``
    below. ``dA = 0`` gives ``log|z| = -800``: ``exp(k (-800))`` is 1 for ``k = 0`` and 0 after,
    exactly the powers of 0 (``e^-800`` underflows to 0).
    """
    re, im = dA.real, dA.imag
    a = np.abs(dA)  # (H, N2)
    with np.errstate(divide="ignore"):
        near = 0.5 * np.log1p((re - 1.0) * (re + 1.0) + im * im)  # (H, N2)
        far = np.log(a)  # (H, N2)
    log_abs = np.maximum(np.where(a >= 0.5, near, far), -800.0)  # (H, N2)
    return log_abs + 1j * np.arctan2(im, re)  # (H, N2)


def _end_state(u, dA, dB, x0):
    """``x_end = dA^T x0 + dB sum_s dA^(T-1-s) u_s`` for ``u (B, H, T)``; complex ``(B, H, N2)``.

    The power table ``P[h, j, n] = dA[h, n]^(T-1-s0-j)`` of one time block is built from
    :func:`_power_log`; ``sum_s u[b, h, s] P[h, s, n]`` is two batched real matrix products
    (real and imaginary parts) over ``h``.
    """
    Bsz, H, T = u.shape
    N2 = dA.shape[1]
    log_dA = _power_log(dA)  # (H, N2)
    acc_re = np.zeros((H, Bsz, N2))  # (H, B, N2)
    acc_im = np.zeros((H, Bsz, N2))  # (H, B, N2)
    uh = u.transpose(1, 0, 2)  # (H, B, T) view
    per_step = 32 * H * N2 + 8 * Bsz * H  # complex table + its real/imag copies + the u block
    Tb = int(max(1, min(T, STATE_BLOCK_BYTES // per_step)))
    for s0 in range(0, T, Tb):
        s1 = min(T, s0 + Tb)
        k = (T - 1 - np.arange(s0, s1)).astype(np.float64)  # (Tb,) exponents T-1-s
        P = np.exp(k[None, :, None] * log_dA[:, None, :])  # (H, Tb, N2)
        ub = np.ascontiguousarray(uh[:, :, s0:s1])  # (H, B, Tb)
        acc_re += np.matmul(ub, np.ascontiguousarray(P.real))  # (H, B, N2)
        acc_im += np.matmul(ub, np.ascontiguousarray(P.imag))  # (H, B, N2)
    x = dB[None] * (acc_re + 1j * acc_im).transpose(1, 0, 2)  # (B, H, N2)
    if x0 is not None:
        x = x + np.exp(float(T) * log_dA)[None] * x0  # (B, H, N2)
    return x


def s4d_layer_fwd(u, params, disc="zoh", state=None, return_state=False):
    """Forward of the S4D layer, optionally from a state and returning the end state.

    Parameters
    ----------
    u : float64 (B, H, L)
    params : dict of float64 arrays (see module docstring)
    disc : {"zoh", "bilinear"}, default "zoh"
    state : complex128 (B, H, N2) or None, default None
        The modes ``x_{-1}`` before ``u[..., 0]`` (the previous chunk's end state); None or
        zeros: the zero state (today's results exactly).
    return_state : bool, default False
        Also return the end state ``x_{L-1}`` (computed in closed form, see module docstring).

    Returns
    -------
    y : float64 (B, H, L)
    cache : S4DCache
        What :func:`s4d_layer_bwd` needs.
    x_end : complex128 (B, H, N2)
        Only when ``return_state``.

    Raises
    ------
    ValueError
        A bidirectional layer with a ``state`` or ``return_state``.
    """
    check_name("disc", disc, DISCRETIZATIONS)
    u = check_array("u", u, 3)
    args, B = _kernel_args(params)
    K = _kernel(args, B, u.shape[-1], disc)  # (H, L) or (2, H, L)
    y, conv_c = conv_fwd(u, K, params["D"])  # (B, H, L): FFT, or Toeplitz for short L
    if state is None and not return_state:
        return y, S4DCache(u, K, params, disc, None, conv_c)
    precision.require_reference("s4d_layer_fwd with a state")
    if K.ndim == 3:
        raise ValueError(_NO_BIDIRECTIONAL_STATE)
    Bsz, H, L = u.shape
    N2 = params["log_A_real"].shape[1]
    if state is not None:
        state = check_state(state, Bsz, H, N2)
        if not state.any():
            state = None  # the zero state: no term at all (bit-exact with no state)
    dA, dB = discretize_params(args[0], args[1], args[2], B.get("B_re"), B.get("B_im"), disc)
    if state is not None:
        C = params["C_re"] + 1j * params["C_im"]  # (H, N2)
        W = ((C * dA)[None] * state).reshape(-1, N2)  # (B H, N2)
        z = np.broadcast_to(dA[None], state.shape).reshape(-1, N2)  # (B H, N2)
        y += vandermonde(W, z, L).reshape(Bsz, H, L)  # 2 Re sum C dA^(t+1) x_{-1}
    cache = S4DCache(u, K, params, disc, state, conv_c)
    if not return_state:
        return y, cache
    return y, cache, _end_state(u, dA, dB, state)


def s4d_layer_bwd(cache, dy):
    """Backward of the S4D layer: returns ``(du, grads)``.

    ``grads`` is a dict with one freshly allocated gradient per entry of ``params``
    (``log_dt, log_A_real, A_imag, C_re, C_im, D`` and ``B_re, B_im`` when present).

    Raises
    ------
    NotImplementedError
        The cache comes from a forward started from a nonzero state (the state term's
        gradient is not implemented; a zero or None state is fine).
    """
    u, K, params, disc, state, conv_c = cache
    if state is not None:
        raise NotImplementedError(
            "s4d_layer_bwd: this cache comes from a forward started from a nonzero state; the "
            "gradient of the state term 2 Re sum_n C dA^(t+1) x0 (with respect to the "
            "parameters and the state) is not implemented. Differentiate a forward from the "
            "zero state (state=None), e.g. the whole sequence in one chunk")
    if conv_c is not None:
        du, dK, dD = conv_vjp(conv_c, dy)  # the forward's spectra / Toeplitz matrices
    else:
        du, dK, dD = fftconv_bwd(u, K, params["D"], dy)
    args, B = _kernel_args(params)
    g = _kernel_bwd(args, B, dK, disc)
    grads = dict(zip(KERNEL_PARAMS + tuple(B), g))
    grads["D"] = dD
    return du, grads


# --------------------------------------------------------------------------------------------
# One step at a time (the recurrent form a chip runs)
# --------------------------------------------------------------------------------------------


def s4d_step_coeffs(params, disc="zoh"):
    """Discretize once per stream: ``S4DStepCoeffs(dA, dB, C, D)``.

    ``dA, dB, C`` complex128 ``(H, N2)``, ``D`` float64 ``(H,)``. A bidirectional layer raises
    ``ValueError`` (no streaming state).
    """
    precision.require_reference("s4d_step_coeffs")
    check_name("disc", disc, DISCRETIZATIONS)
    args, B = _kernel_args(params)
    C_re = check_array("C_re", params["C_re"], (2, 3))
    if C_re.ndim == 3:
        raise ValueError(_NO_BIDIRECTIONAL_STATE)
    s4d_kernel(*args, 1, disc=disc, **B)  # validates every kernel parameter
    dA, dB = discretize_params(args[0], args[1], args[2], B.get("B_re"), B.get("B_im"), disc)
    C = np.ascontiguousarray(params["C_re"] + 1j * params["C_im"])  # (H, N2)
    D = check_array("D", params["D"], 1)
    check_shape("D", D, (dA.shape[0],))
    return S4DStepCoeffs(np.ascontiguousarray(dA), np.ascontiguousarray(dB), C, D)


@njit(**config.NJIT_OPTS)
def _step(x, u_t, dA, dB, C, x_new, y):
    """One causal step: ``x_new = dA x + dB u_t``, ``y = 2 Re sum_n C x_new``.

    Preconditions: C-contiguous; ``x, x_new (B, H, N2)`` complex128, ``u_t, y (B, H)``
    float64, ``dA, dB, C (H, N2)`` complex128; ``x_new`` and ``y`` are overwritten. The same
    operations in the same order as the loop body of ``refimpl.recurrence._recurrence``.
    """
    Bsz, H, N2 = x.shape
    for b in range(Bsz):
        for h in range(H):
            acc = 0.0
            ut = u_t[b, h]
            for n in range(N2):
                xn = dA[h, n] * x[b, h, n] + dB[h, n] * ut
                x_new[b, h, n] = xn
                acc += (C[h, n] * xn).real
            y[b, h] = 2.0 * acc


def s4d_layer_step(u_t, coeffs, state):
    """One step of the S4D layer: ``x = dA x + dB u_t``, ``y_t = 2 Re sum_n C x + D u_t``.

    Parameters
    ----------
    u_t : float64 (B, H)
    coeffs : S4DStepCoeffs
        From :func:`s4d_step_coeffs`.
    state : complex128 (B, H, N2)
        The modes after the previous step (:func:`s4d_zero_state` before the first).

    Returns
    -------
    y_t : float64 (B, H)
    x_new : complex128 (B, H, N2), a new array (the input state is not modified).
    """
    if not isinstance(coeffs, tuple) or len(coeffs) != 4:
        raise TypeError("coeffs must be the (dA, dB, C, D) of refimpl.s4d.s4d_step_coeffs, "
                        f"got {type(coeffs).__name__}")
    precision.require_reference("s4d_layer_step")
    u_t = check_array("u_t", u_t, 2)
    Bsz, H = u_t.shape
    dA = check_array("coeffs.dA", coeffs[0], 2, dtype=np.complex128)
    check_shape("coeffs.dA", dA, (H, None))
    dB = check_array("coeffs.dB", coeffs[1], 2, dtype=np.complex128)
    check_shape("coeffs.dB", dB, dA.shape)
    C = check_array("coeffs.C", coeffs[2], 2, dtype=np.complex128)
    check_shape("coeffs.C", C, dA.shape)
    D = check_array("coeffs.D", coeffs[3], 1)
    check_shape("coeffs.D", D, (H,))
    state = check_state(state, Bsz, H, dA.shape[1])
    x_new = np.empty_like(state)  # (B, H, N2)
    y = np.empty_like(u_t)  # (B, H)
    _step(state, u_t, dA, dB, C, x_new, y)
    return y + D * u_t, x_new


# ---- the op contract (refimpl.ops) -----------------------------------------------------------


class S4DConfig(NamedTuple):
    """Configuration of the ``s4d_layer`` op: the discretization."""
    disc: str = "zoh"


class S4DState(NamedTuple):
    """The S4D layer's state between chunks: the complex modes ``x_{T-1}`` (DESIGN.md 10)."""
    x: np.ndarray  # complex128 (B, H, N2)


def _layer_op(inputs, params, cfg=None, state=None, end_state=True):
    cfg = S4DConfig() if cfg is None else cfg
    u, x0 = inputs["u"], None if state is None else state.x
    bidirectional = params["C_re"].ndim == 3  # no streaming form: no state to return
    float32 = precision.float_dtype() != np.float64  # states are float64 only
    if not end_state or bidirectional or (float32 and state is None):
        y, cache = s4d_layer_fwd(u, params, disc=cfg.disc, state=x0)
        return _ops.Result({"y": y}, cache, None)
    y, cache, x_end = s4d_layer_fwd(u, params, disc=cfg.disc, state=x0, return_state=True)
    return _ops.Result({"y": y}, cache, S4DState(x_end))


def _layer_op_vjp(cache, cotangents):
    du, grads = s4d_layer_bwd(cache, _ops.cotangent(cotangents, "y", cache.u))
    return {"u": du, **grads}


def layer_depth(inputs, params, cfg):
    """The convolution's ``L`` terms and FFTs plus the kernel's ``N2`` modes (and, from a
    state, the state term's ``N2``-term sum); gradients sum over ``B L`` more."""
    Bsz, H, L = inputs["u"].shape
    N2 = params["log_A_real"].shape[1]
    f = 2 * int(np.ceil(np.log2(fft_length(L))))
    return {"*": L + 2 * N2 + f, **{"d" + k: Bsz * L + L + N2 + f for k in params}}


def layer_examples(rng):
    """Both discretizations, trainable ``B``, a start from a state. (A bidirectional layer has
    no streaming form and returns no state; its convolution and kernel are the ``fftconv`` and
    ``s4d_kernel`` ops' examples.)"""
    out = []
    for disc, tb, bi, with_state in (("zoh", False, False, False), ("bilinear", True, False, True),
                                     ("zoh", True, False, True)):
        p = ssm_examples_params(rng, 3, 4, disc=disc, trainable_B=tb, bidirectional=bi)
        p["D"] = rng.normal(size=3)
        state = (S4DState(rng.normal(size=(2, 3, 2)) + 1j * rng.normal(size=(2, 3, 2)))
                 if with_state else None)
        out.append(_ops.Example({"u": rng.normal(size=(2, 3, 11))}, p, S4DConfig(disc), state))
    return out


LAYER_OP = _ops.defop(
    name="s4d_layer", math="y = conv(u, K(params)) + D u",
    inputs=("u",), params=KERNEL_PARAMS + ("B_re", "B_im", "D"), optional=("B_re", "B_im"),
    outputs=("y",), config=S4DConfig, state=S4DState, time={"u": 2, "y": 2},
    fwd=_layer_op, vjp=_layer_op_vjp, depth=layer_depth, examples=layer_examples,
    vjp_from_state=False,
)
