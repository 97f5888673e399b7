"""A float32 NumPy backend for refimpl's golden suites, with planted bugs (issue 10).

Independent of refimpl's kernels: every input, parameter, cotangent and configuration value is
rounded to float32 when read, and all arithmetic is float32 / complex64 (NumPy 2 keeps float32
through ``np.fft``; Python scalars are weak under NEP 50, float64 attributes are converted
explicitly). Only ``refimpl.golden.golden_path`` is used, to find the committed golden file.

Suites: ``s4d_kernel``, ``fftconv``, ``s4d_layer`` (the kernel, the convolution and their
backward), ``neuron``, ``pmbc`` (computed by the iterative neuron; no ``iterations``
output: verify with ``skip=('*/outputs/iterations',)``), ``glu``, ``sdn`` and ``block`` (every
family, norm and placement the committed cases use, composed from the pieces above plus GELU,
GSU, LayerNorm and BatchNorm), and ``model_stream`` (the model in eval mode, run chunk by chunk
from the previous chunk's state: S4D from its modes with the closed-form end state, the neuron
from ``(u, count)``, the SDN from its window, eval BatchNorm with the running statistics).
Stateful ``neuron`` / ``pmbc`` / ``s4d_layer`` cases start from their stored state and output
the end state; integer datasets (``count0``, counters) stay int64.

Each op is ``op(case, bug=None) -> (outputs, grads)`` on a :class:`Case` (float32 arrays read
from a golden case); invalid cases raise :class:`Reject`. ``write_candidate(suite, path, bug)``
writes the candidate file for the committed golden file. ``BUGS`` lists the planted bugs,
``VARIANTS`` correct alternative implementations (passed as ``bug``); the
special bug ``"rel_error_1e-3"`` multiplies the dataset named by ``target`` (``"outputs/y"``,
``"grads/x"``, ...) by ``1 + 1e-3``.

Implementation switches (issue 21; used by ``tests/half_backend.py``): :func:`impl` sets, for
the calls made inside it, another correct implementation — ``conv="direct"`` (time-domain
convolution, a sequential sum over the lags, instead of the FFT), ``chunks=(5, 1, 10, ...)``
(the neuron and the causal S4D forward run chunk by chunk, carrying their state), ``order=rng``
(a random permutation of the summation order of every contraction and reduction), ``ulp=rng``
(intermediate results moved by -1, 0 or +1 ulp at random, as another evaluation order would:
every nonzero intermediate of the kernel, convolution, GLU, GSU, SDN, norms and the neuron's
backward; in the neuron's forward only membranes that float32 did not compute exactly, so the
dyadic ``at_threshold`` cases stay exact), ``dtype=np.float64`` (the same code in float64 /
complex128). Outside
:func:`impl` the backend is the float32 one described above.
"""
import contextlib
import math

import h5py
import numpy as np

from refimpl.golden import golden_path

F32 = np.float32
C64 = np.complex64

#: planted bug -> (suite it is tested on, the tensor it affects)
BUGS = {
    "ge_for_gt": ("neuron", "outputs/s"),
    "refractory_theta": ("neuron", "outputs/u"),
    "surrogate_scale_x2": ("neuron", "grads/x"),
    "anticausal_not_reversed": ("fftconv", "outputs/y"),
    "no_D_in_backward": ("fftconv", "grads/u"),
    "missing_conj": ("s4d_kernel", "grads/C_im"),
    "refractory_counter_off_by_one": ("neuron", "outputs/s"),
    "detach_reset_as_bptt": ("neuron", "grads/x"),
    "sdn_sees_x_t": ("sdn", "outputs/m"),
    "glu_gate_wrong_half": ("glu", "outputs/z"),
    # stateful cases (issue 12)
    "state_u0_ignored": ("neuron", "outputs/h"),
    "state_count0_ignored": ("pmbc", "outputs/s"),
    "count_end_not_decremented": ("neuron", "outputs/count_end"),
    "ssm_state_ignored": ("s4d_layer", "outputs/y"),
    "ssm_end_state_power_off_by_one": ("s4d_layer", "outputs/x_re"),
    "stream_state_reset_per_chunk": ("model_stream", "outputs/logits"),
    "stream_ssm_end_state_off_by_one": ("model_stream", "outputs/state/layers.0.ssm.x_re"),
    # issue 21: structural, discrete and scale bugs a 16-bit port makes
    "fft_circular": ("fftconv", "outputs/y"),
    "kernel_power_off_by_one": ("s4d_kernel", "outputs/K"),
    "soft_reset_1001": ("neuron", "outputs/u"),
    "glu_output_x1001": ("glu", "outputs/z"),
    "grad_x1001": ("neuron", "grads/x"),
    "gsu_ternary_global": ("gsu", "outputs/z"),
    "gsu_bc_swapped": ("gsu", "outputs/z"),
    "layernorm_unbiased": ("block", "outputs/y"),
}
#: garbage, not bugs (tests/test_golden_garbage.py): the block's internal spikes inverted or
#: made non-binary before the mixing
GARBAGE_SPIKES = {"spikes_inverted": lambda s: (F32(1) - s).astype(F32),
                  "spikes_half": lambda s: (F32(0.5) * s).astype(F32)}
REL_ERROR = "rel_error_1e-3"
#: correct alternatives (not bugs), passed like a bug: ``naive_expm1`` computes the ZOH
#: ``exp(dt A) - 1`` by subtraction and differentiates ``(exp(w) - 1) / w`` in closed form
#: everywhere (what autograd of DESIGN.md's formula as written does)
VARIANTS = ("naive_expm1",)
SUITES = ("s4d_kernel", "fftconv", "s4d_layer", "neuron", "pmbc", "glu", "gsu", "sdn", "block",
          "model_stream")


class Reject(Exception):
    """The backend rejects the case (written as the case's ``error`` attribute)."""


def f32(a):
    return np.asarray(a, dtype=F32)


# ============================================================================================
# Implementation switches (see the module docstring); module state, set only through impl()
# ============================================================================================

IMPL = dict(conv="fft", chunks=None, order=None, ulp=None)


@contextlib.contextmanager
def impl(conv="fft", chunks=None, order=None, ulp=None, dtype=np.float32):
    """Compute with another correct implementation inside the ``with`` block (not thread-safe:
    module state, restored on exit)."""
    global F32, C64
    saved = dict(IMPL), F32, C64
    IMPL.update(conv=conv, chunks=tuple(chunks) if chunks else None, order=order, ulp=ulp)
    F32 = np.dtype(dtype).type
    C64 = np.result_type(F32, np.complex64).type
    try:
        yield
    finally:
        IMPL.clear()
        IMPL.update(saved[0])
        F32, C64 = saved[1], saved[2]


def _jit(a, exact=None):
    """``a`` with every element moved by -1, 0 or +1 ulp at random when ``IMPL["ulp"]`` is set
    (real and imaginary parts independently). Exact zeros stay, and so does every element equal
    to ``exact`` (the same quantity computed in float64, when given): rounding never moves an
    exactly representable result."""
    rng = IMPL["ulp"]
    if rng is None:
        return a
    a = np.asarray(a)
    if a.dtype.kind == "c":
        ex = None if exact is None else np.asarray(exact)
        return _cplx(_jit(a.real, None if ex is None else ex.real),
                     _jit(a.imag, None if ex is None else ex.imag)).astype(a.dtype)
    if a.dtype.kind != "f":
        return a
    step = rng.integers(-1, 2, size=a.shape)
    move = (step != 0) & (a != 0) & np.isfinite(a)
    if exact is not None:
        move &= a != np.asarray(exact)
    out = np.where(move, np.nextafter(a, np.where(step > 0, np.inf, -np.inf).astype(a.dtype)), a)
    return out.astype(a.dtype)


def _axes_of(spec, ndim):
    """``{letter: axis}`` of one einsum operand ``spec`` (with an optional leading ``...``)."""
    if spec.startswith("..."):
        tail = spec[3:]
        return {c: ndim - len(tail) + i for i, c in enumerate(tail)}
    return {c: i for i, c in enumerate(spec)}


def _einsum(spec, *ops):
    """``np.einsum``; under ``IMPL["order"]`` every contracted index is first permuted at
    random (the same permutation in every operand): another summation order."""
    rng = IMPL["order"]
    if rng is None:
        return np.einsum(spec, *ops)
    ins, out = spec.split("->")
    ins = ins.split(",")
    ops = [np.asarray(o) for o in ops]
    axes = [_axes_of(sp, o.ndim) for sp, o in zip(ins, ops)]
    for c in sorted(set("".join(ins).replace(".", "")) - set(out)):
        n = next(o.shape[ax[c]] for o, ax in zip(ops, axes) if c in ax)
        perm = rng.permutation(n)
        ops = [np.take(o, perm, axis=ax[c]) if c in ax else o for o, ax in zip(ops, axes)]
    return np.einsum(spec, *ops)


def _mm(a, b):
    """``a @ b``; under ``IMPL["order"]`` the contracted index permuted at random."""
    rng = IMPL["order"]
    if rng is None:
        return a @ b
    perm = rng.permutation(a.shape[-1])
    return a[..., perm] @ (b[perm] if b.ndim == 1 else b[..., perm, :])


def _sum(a, axis=None, keepdims=False):
    """``a.sum(axis)``; under ``IMPL["order"]`` the summed elements in a random order."""
    rng = IMPL["order"]
    a = np.asarray(a)
    if rng is None:
        return a.sum(axis=axis, keepdims=keepdims)
    axis = tuple(range(a.ndim)) if axis is None else (axis,) if np.isscalar(axis) else axis
    axis = tuple(x % a.ndim for x in axis)
    keep = [i for i in range(a.ndim) if i not in axis]
    m = np.transpose(a, keep + list(axis))
    m = m.reshape([a.shape[i] for i in keep] + [-1])
    res = m[..., rng.permutation(m.shape[-1])].sum(-1)
    if keepdims:
        res = np.expand_dims(res, axis)
    return res


def _mean(a, axis, keepdims=False):
    if IMPL["order"] is None:
        return np.asarray(a).mean(axis=axis, keepdims=keepdims)
    n = np.prod([np.shape(a)[x] for x in ((axis,) if np.isscalar(axis) else axis)])
    return (_sum(a, axis, keepdims) / F32(n)).astype(np.asarray(a).dtype)


class Case:
    """One golden case read as float32: ``attrs`` (floats as float32), ``inputs``, ``params``,
    ``cot`` (cotangents) and ``grad_names`` (the grads the golden case holds). ``read``: how a
    float dataset (float64 array) is read (default: rounded to the compute type)."""

    def __init__(self, gcase, read=None):
        read = f32 if read is None else read
        self.attrs = {}
        for k, v in gcase.attrs.items():
            if isinstance(v, (float, np.floating)):
                v = F32(v)
            elif isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, (np.integer,)):
                v = int(v)
            elif isinstance(v, np.bool_):
                v = bool(v)
            self.attrs[k] = v
        def get(g):  # integer datasets (the refractory counter count0) stay int64
            return ({n: (read(v) if v.dtype.kind == "f" else np.asarray(v, np.int64))
                     for n, v in ((n, gcase[g][n][()]) for n in gcase[g])} if g in gcase else {})

        self.inputs, self.params, self.cot = get("inputs"), get("params"), get("cotangents")
        self.trainable = {n: bool(gcase["params"][n].attrs.get("trainable", True))
                          for n in self.params}
        self.grad_names = list(gcase["grads"]) if "grads" in gcase else []
        self.output_names = list(gcase["outputs"]) if "outputs" in gcase else []


def _finite(**arrays):
    for name, a in arrays.items():
        if a is not None and not np.isfinite(a).all():
            raise Reject(f"{name} contains non-finite values")


def _cplx(re, im):
    z = np.empty(np.shape(re), dtype=C64)
    z.real, z.imag = re, im
    return z


def _re2(c):
    """(d/d re, d/d im) of ``f`` when ``df = 2 Re(c dz)``."""
    return (F32(2) * c.real).astype(F32), (F32(-2) * c.imag).astype(F32)


# ============================================================================================
# S4D kernel
# ============================================================================================

def _expm1c(w):
    """``exp(w) - 1`` for complex64 ``w`` without cancellation."""
    x, y = w.real, w.imag
    re = np.expm1(x) * np.cos(y) - F32(2) * np.sin(y / F32(2)) ** 2
    im = np.exp(x) * np.sin(y)
    return _cplx(re, im)


def _dphi1(w, naive=False):
    """``d/dw (exp(w) - 1) / w``: a Taylor series for ``|w| < 1``, the closed form elsewhere
    (``naive``: the closed form with ``exp(w) - 1`` subtracted, everywhere)."""
    if naive:
        return ((w * np.exp(w) - (np.exp(w) - C64(1))) / (w * w)).astype(C64)
    small = np.abs(w) < 1
    ws = np.where(small, w, C64(0))
    series = np.zeros_like(w)
    for k in range(14, 0, -1):  # sum_k k w^(k-1) / (k+1)!
        series = series * ws + C64(k / math.factorial(k + 1))
    wb = np.where(small, C64(1), w)
    closed = (wb * np.exp(wb) - _expm1c(wb)) / (wb * wb)
    return np.where(small, series, closed).astype(C64)


def _discretize(log_dt, lar, aim, B, disc, naive=False):
    """``dA, dB`` and their partial derivatives w.r.t. dt, A, B (complex64, (H, N2));
    ``naive``: ZOH's ``exp(dt A) - 1`` by subtraction (see :data:`VARIANTS`)."""
    dt = np.exp(log_dt)[:, None]  # (H, 1)
    A = _cplx(-np.exp(lar), aim)  # (H, N2)
    w = (dt * A).astype(C64)
    if disc == "zoh":
        dA = np.exp(w)
        E1 = ((dA - C64(1)) if naive else _expm1c(w)) / A  # (exp(dt A) - 1) / A
        dB = E1 * B
        d = dict(dA_dt=dA * A, dA_A=dA * dt, dB_dt=B * dA, dB_A=B * dt * dt * _dphi1(w, naive),
                 dB_B=E1, logdA=w)
    elif disc == "bilinear":
        q = C64(1) - w / F32(2)
        dA = (C64(1) + w / F32(2)) / q
        dB = dt * B / q
        q2 = q * q
        d = dict(dA_dt=A / q2, dA_A=dt / q2, dB_dt=B / q2, dB_A=dt * dt * B / (F32(2) * q2),
                 dB_B=dt / q, logdA=np.log(dA))
    else:
        raise Reject(f"unknown disc {disc!r}")
    return dt, A, _jit(dA.astype(C64)), _jit(dB.astype(C64)), d


def _powers(logdA, L, bug=None):
    """``dA^l`` for l = 0..L-1 as ``exp(l log dA)``, (H, N2, L) complex64."""
    P = np.exp(logdA[:, :, None] * np.arange(L, dtype=F32)).astype(C64)
    if bug == "kernel_power_off_by_one":  # dA^(l+1): the kernel one step late
        P = (P * np.exp(logdA)[:, :, None]).astype(C64)
    return _jit(P)


def kernel_fwd_bwd(p, L, disc, dK=None, bug=None):
    """S4D kernel from params ``log_dt, log_A_real, A_imag, C_re, C_im [, B_re, B_im]``;
    returns ``K`` and, given the cotangent ``dK``, the param grads."""
    for n in ("log_dt", "log_A_real", "A_imag", "C_re", "C_im"):
        if n not in p:
            raise Reject(f"missing parameter {n}")
    _finite(**p)
    if L < 1:
        raise Reject(f"L must be >= 1, got {L}")
    Cm = _cplx(p["C_re"], p["C_im"])  # (H, N2) or (2, H, N2)
    bidir = Cm.ndim == 3
    Bm = _cplx(p["B_re"], p["B_im"]) if "B_re" in p else np.ones(p["A_imag"].shape, C64)
    dt, A, dA, dB, d = _discretize(p["log_dt"], p["log_A_real"], p["A_imag"], Bm, disc,
                                   naive=bug == "naive_expm1")
    P = _powers(d["logdA"], L, bug)  # (H, N2, L)
    W = _jit(Cm * dB)  # (..., H, N2)
    K = _jit((F32(2) * _einsum("...hn,hnl->...hl", W, P).real).astype(F32))
    if dK is None:
        return K, None
    G = dK.astype(C64)  # (..., H, L)
    S0 = _jit(_einsum("...hl,hnl->...hn", G, P))  # sum_l G_l dA^l
    lG = G[..., 1:] * np.arange(1, L, dtype=F32)
    S1 = _jit(_einsum("...hl,hnl->...hn", lG, P[:, :, :L - 1]))  # sum_l l G_l dA^(l-1)
    cC = dB * S0
    cdB = Cm * S0
    cdA = W * S1
    if bidir:
        cdB, cdA = _sum(cdB, 0), _sum(cdA, 0)
    grads = {}
    grads["C_re"], grads["C_im"] = _re2(cC)
    if bug == "missing_conj":  # d/d C_im taken from conj-less c: sign of the imaginary part
        grads["C_im"] = -grads["C_im"]
    c_dt = cdA * d["dA_dt"] + cdB * d["dB_dt"]
    c_A = cdA * d["dA_A"] + cdB * d["dB_A"]
    grads["log_dt"] = (F32(2) * _sum(c_dt.real, -1) * dt[:, 0]).astype(F32)
    gre, grads["A_imag"] = _re2(c_A)
    grads["log_A_real"] = (-gre * np.exp(p["log_A_real"])).astype(F32)
    if "B_re" in p:
        grads["B_re"], grads["B_im"] = _re2(cdB * d["dB_B"])
    return K, {k: _jit(v) for k, v in grads.items()}


def s4d_kernel(case, bug=None):
    a = case.attrs
    K, g = kernel_fwd_bwd(case.params, int(a["L"]), a["disc"], case.cot.get("K"), bug)
    return {"K": K}, g


# ============================================================================================
# FFT convolution
# ============================================================================================

def conv_fwd_bwd(u, K, D, dy=None, bug=None):
    """``y = conv(u, K) + D u`` and, given ``dy``, grads of u, K, D (float32 FFTs)."""
    _finite(u=u, K=K, D=D)
    Bsz, H, L = u.shape
    if K.shape[-2:] != (H, L) or K.ndim not in (2, 3) or (K.ndim == 3 and K.shape[0] != 2):
        raise Reject(f"K must have shape (..., {H}, {L}), got {K.shape}")
    if D.shape != (H,):
        raise Reject(f"D must have shape ({H},), got {D.shape}")
    if IMPL["conv"] == "direct" and bug != "fft_circular":
        return _direct_conv_fwd_bwd(u, K, D, dy, bug)
    n = L if bug == "fft_circular" else 2 * L  # circular: the FFT of length L wraps around
    k = np.zeros((H, n), F32)
    bidir = K.ndim == 3
    k[:, :L] = K[0] if bidir else K
    if bidir and n == L:
        k[:, 1:] += K[1][:, :L - 1][:, ::-1]
    elif bidir:  # anticausal half: k[n - 1 - j] = K1[j]
        k[:, n - L:] = K[1] if bug == "anticausal_not_reversed" else K[1][:, ::-1]
    kf, uf = np.fft.rfft(k, n), np.fft.rfft(u, n)
    y = _jit((np.fft.irfft(uf * kf, n)[..., :L] + D[:, None] * u).astype(F32))
    if dy is None:
        return y, None
    dyf = np.fft.rfft(dy, n)
    du = np.fft.irfft(dyf * np.conj(kf), n)[..., :L]
    if bug != "no_D_in_backward":
        du = du + D[:, None] * dy
    dk = np.fft.irfft(_sum(dyf * np.conj(uf), 0), n)
    if bidir and n == L:
        dK = np.stack([dk[:, :L], np.concatenate([dk[:, 1:][:, ::-1], dk[:, :1]], -1)])
    elif bidir:
        dK = np.stack([dk[:, :L], dk[:, n - L:][:, ::-1]])
    else:
        dK = dk[:, :L]
    dD = _sum(dy * u, (0, 2))
    return y, {"u": _jit(du.astype(F32)), "K": _jit(dK.astype(F32)), "D": _jit(dD.astype(F32))}


def _direct_conv_fwd_bwd(u, K, D, dy=None, bug=None):
    """:func:`conv_fwd_bwd` in the time domain: a sequential sum over the lags (in a random
    order under ``IMPL["order"]``), float32 accumulators."""
    Bsz, H, L = u.shape
    bidir = K.ndim == 3
    K0, K1 = (K[0], K[1]) if bidir else (K, None)
    if bidir and bug == "anticausal_not_reversed":  # the FFT bug, in the time domain
        K1 = K1[:, ::-1]
    rng = IMPL["order"]
    lags = rng.permutation(L) if rng is not None else np.arange(L)
    y = np.zeros_like(u)
    for j in lags:  # y[t] += K0[j] u[t - j]; y[t] += K1[j] u[t + 1 + j]
        y[..., j:] += K0[:, j, None] * u[..., :L - j]
        if bidir and j < L - 1:
            y[..., :L - 1 - j] += K1[:, j, None] * u[..., 1 + j:]
    y = _jit((y + D[:, None] * u).astype(F32))
    if dy is None:
        return y, None
    du = np.zeros_like(u)
    dK0, dK1 = np.zeros((H, L), F32), np.zeros((H, L), F32)
    for j in lags:
        du[..., :L - j] += K0[:, j, None] * dy[..., j:]
        dK0[:, j] = _sum(dy[..., j:] * u[..., :L - j], (0, 2))
        if bidir and j < L - 1:
            du[..., 1 + j:] += K1[:, j, None] * dy[..., :L - 1 - j]
            dK1[:, j] = _sum(dy[..., :L - 1 - j] * u[..., 1 + j:], (0, 2))
    if bug != "no_D_in_backward":
        du = du + D[:, None] * dy
    dK = np.stack([dK0, dK1]) if bidir else dK0
    dD = _sum(dy * u, (0, 2))
    return y, {"u": _jit(du.astype(F32)), "K": _jit(dK.astype(F32)), "D": _jit(dD.astype(F32))}


def fftconv(case, bug=None):
    y, g = conv_fwd_bwd(case.inputs["u"], case.params["K"], case.params["D"],
                        case.cot.get("y"), bug)
    return {"y": y}, g


# ============================================================================================
# S4D layer: the kernel, the FFT convolution with the D skip, and their backward
# ============================================================================================

def s4d_state_terms(p, x0, L, disc, bug=None):
    """The state's contributions for a chunk of length ``L`` from the modes ``x0`` (B, H, N2)
    complex64: ``2 Re sum_n C dA^(t+1) x0`` (B, H, L) and ``dA^L x0`` (B, H, N2)."""
    Bm = _cplx(p["B_re"], p["B_im"]) if "B_re" in p else np.ones(p["A_imag"].shape, C64)
    _, _, _, _, d = _discretize(p["log_dt"], p["log_A_real"], p["A_imag"], Bm, disc)
    P = _powers(d["logdA"], L + 1)  # (H, N2, L + 1): dA^0 .. dA^L
    Cm = _cplx(p["C_re"], p["C_im"])  # (H, N2)
    y = (F32(2) * _einsum("hn,hnl,bhn->bhl", Cm, P[:, :, 1:], x0).real).astype(F32)
    Lx = L - 1 if bug == "ssm_end_state_power_off_by_one" else L
    return _jit(y), _jit((P[None, :, :, Lx] * x0).astype(C64))


def s4d_end_state(p, u, disc):
    """``sum_s dA^(T-1-s) dB u_s`` (B, H, N2) complex64: the input's part of the end state."""
    Bm = _cplx(p["B_re"], p["B_im"]) if "B_re" in p else np.ones(p["A_imag"].shape, C64)
    _, _, _, dB, d = _discretize(p["log_dt"], p["log_A_real"], p["A_imag"], Bm, disc)
    T = u.shape[-1]
    P = _powers(d["logdA"], T)[:, :, ::-1]  # (H, N2, T): dA^(T-1-s)
    return _jit((dB[None] * _einsum("bhs,hns->bhn", u.astype(C64), P)).astype(C64))


def _chunk_sizes_of(chunks, L):
    """Chunk lengths summing to ``L``: ``chunks`` cycled, the last one cut."""
    sizes = []
    while sum(sizes) < L:
        sizes.append(min(chunks[len(sizes) % len(chunks)], L - sum(sizes)))
    return sizes


def _chunk_sizes(L):
    return _chunk_sizes_of(IMPL["chunks"], L)


def s4d_forward(ssm, D, u, disc, x0=None, bug=None):
    """The S4D layer's ``y`` (B, H, L) from the modes ``x0`` (None: zero) and its end modes
    (None for a whole-sequence layer without ``x0``): the FFT over the whole sequence plus the
    state's terms, or, under ``IMPL["chunks"]`` and causal, chunk by chunk, each from the
    previous chunk's end state."""
    L = u.shape[-1]
    if IMPL["chunks"] and ssm["C_re"].ndim == 2:
        x = np.zeros(u.shape[:2] + ssm["A_imag"].shape[-1:], C64) if x0 is None else x0
        ys, t = [], 0
        for T in _chunk_sizes(L):
            Kc, _ = kernel_fwd_bwd(ssm, T, disc, bug=bug)
            yc, _ = conv_fwd_bwd(u[..., t:t + T], Kc, D, None, bug)
            sy, sx = s4d_state_terms(ssm, x, T, disc, bug)
            ys.append(yc if bug == "ssm_state_ignored" else (yc + sy).astype(F32))
            x = (s4d_end_state(ssm, u[..., t:t + T], disc) + sx).astype(C64)
            t += T
        return np.concatenate(ys, axis=-1), x
    K, _ = kernel_fwd_bwd(ssm, L, disc, bug=bug)
    y, _ = conv_fwd_bwd(u, K, D, None, bug)
    if x0 is None:
        return y, None
    ys, xs = s4d_state_terms(ssm, x0, L, disc, bug)
    if bug != "ssm_state_ignored":
        y = (y + ys).astype(F32)
    return y, (s4d_end_state(ssm, u, disc) + xs).astype(C64)


def s4d_layer(case, bug=None):
    a, p = case.attrs, case.params
    u = case.inputs["u"]
    _finite(u=u, **p)
    if "D" not in p:
        raise Reject("missing parameter D")
    ssm = {k: v for k, v in p.items() if k != "D"}
    L = int(a["L"])
    K, _ = kernel_fwd_bwd(ssm, L, a["disc"], bug=bug)
    if "x0_re" in case.inputs:  # stateful: y and the end state, no backward (no cotangents)
        x0 = _cplx(case.inputs["x0_re"], case.inputs["x0_im"])
        _finite(x0_re=case.inputs["x0_re"], x0_im=case.inputs["x0_im"])
        if p["C_re"].ndim == 3:
            raise Reject("a bidirectional layer has no streaming state")
        y, x_end = s4d_forward(ssm, p["D"], u, a["disc"], x0, bug)
        return {"y": y, "x_re": x_end.real.astype(F32), "x_im": x_end.imag.astype(F32)}, {}
    y, gc = conv_fwd_bwd(u, K, p["D"], case.cot.get("y"), bug)
    if IMPL["chunks"]:
        y, _ = s4d_forward(ssm, p["D"], u, a["disc"], None, bug)
    _, gk = kernel_fwd_bwd(ssm, L, a["disc"], gc["K"], bug)
    return {"y": y}, {"u": gc["u"], "D": gc["D"], **gk}


# ============================================================================================
# Neuron (iterative; PMBC's outputs equal it)
# ============================================================================================

def _sigmoid(v):
    with np.errstate(over="ignore"):
        return (F32(1) / (F32(1) + np.exp(-v))).astype(F32)


def surrogate_grad(name, z, c):
    z = f32(z)
    c = F32(c)
    if name == "triangle":
        return np.maximum(F32(0), F32(1) - np.abs(z) / c) / c
    if name == "rectangle":
        return np.where(np.abs(z) < c / F32(2), F32(1) / c, F32(0)).astype(F32)
    if name == "sigmoid":
        sg = _sigmoid(c * z)
        return c * sg * (F32(1) - sg)
    if name == "atan":
        return (c / F32(2)) / (F32(1) + (F32(np.pi) * c * z / F32(2)) ** 2)
    if name == "fast_sigmoid":
        return F32(1) / (F32(1) + c * np.abs(z)) ** 2
    raise Reject(f"unknown surrogate {name!r}")


DEFAULT_SCALE = {"triangle": 1.0, "rectangle": 1.0, "sigmoid": 4.0, "atan": 2.0,
                 "fast_sigmoid": 25.0}


def neuron_config(a, prefix=""):
    def g(k, default=None):
        return a.get(prefix + k, default)

    sur = g("surrogate", "triangle")
    cfg = dict(reset=g("reset", "hard"), tau=F32(g("tau", 0.0)), theta=F32(g("theta", 1.0)),
               u_reset=F32(g("u_reset", 0.0)), R=int(g("refractory_steps", 0)),
               cond=g("spike_condition", "ge"), surrogate=sur,
               scale=F32(g("surrogate_scale", DEFAULT_SCALE.get(sur, 1.0))),
               grad_mode=g("grad_mode", "bptt"))
    if not (0 <= cfg["tau"] < 1):
        raise Reject(f"tau must be in [0.0, 1.0), got {cfg['tau']}")
    if cfg["reset"] not in ("hard", "soft", "refractory", "none"):
        raise Reject(f"unknown reset {cfg['reset']!r}")
    if cfg["reset"] == "hard" and not cfg["theta"] > 0:
        raise Reject(f"theta (with reset='hard') must be > 0, got {cfg['theta']}")
    if cfg["cond"] not in ("ge", "gt") or cfg["R"] < 0 or not np.isfinite(cfg["theta"]):
        raise Reject("bad spike_condition, refractory_steps or theta")
    if cfg["grad_mode"] not in ("bptt", "detach_reset", "sltt"):
        raise Reject(f"unknown grad_mode {cfg['grad_mode']!r}")
    if cfg["surrogate"] not in DEFAULT_SCALE or not cfg["scale"] > 0:
        raise Reject("bad surrogate")
    return cfg


def _fires(h, theta, cond, bug):
    if cond == "ge" or bug == "ge_for_gt":
        return h >= theta
    return h > theta


def neuron_fwd(x, rho, cfg, bug=None, u0=None, count0=None, end=None):
    """``s, h, u, allowed`` (B, H, L) float32, from the state ``u0`` (B, H) float32 and
    ``count0`` (B, H) int64 (None: zero); ``end``, a dict, receives ``u_end`` and
    ``count_end``. Under ``IMPL["chunks"]``: chunk by chunk, each from the previous chunk's
    ``(u, count)``."""
    if IMPL["chunks"] and x.shape[-1] > 1:
        saved, parts, t, uc, cc = IMPL["chunks"], [], 0, u0, count0
        IMPL["chunks"] = None  # each chunk: the whole-sequence code
        try:
            for T in _chunk_sizes_of(saved, x.shape[-1]):
                e = {}
                parts.append(neuron_fwd(x[..., t:t + T], rho, cfg, bug, uc, cc, e))
                uc, cc, t = e["u_end"], e["count_end"], t + T
        finally:
            IMPL["chunks"] = saved
        if end is not None:
            end.update(u_end=uc, count_end=cc)
        return tuple(np.concatenate(a, axis=-1) for a in zip(*parts))
    _finite(x=x, rho=rho, u0=u0)
    if rho is not None and (rho < 0).any():
        raise Reject("rho must be >= 0 everywhere")
    Bsz, H, L = x.shape
    rho = np.zeros(H, F32) if rho is None else rho
    tau, theta, ur, R = cfg["tau"], cfg["theta"], cfg["u_reset"], cfg["R"]
    if count0 is not None and ((count0 < 0).any() or (count0 > R).any()):
        raise Reject(f"count0 must lie in [0, refractory_steps = {R}]")
    if bug == "refractory_counter_off_by_one" and R > 0:
        R = R + 1
    s, h, u, allowed = (np.zeros((Bsz, H, L), F32) for _ in range(4))
    u_prev = np.zeros((Bsz, H), F32) if u0 is None or bug == "state_u0_ignored" else u0
    blocked = np.zeros((Bsz, H), np.int64)
    if count0 is not None and bug != "state_count0_ignored":
        blocked = count0.astype(np.int64)
    f8 = np.float64
    for t in range(L):
        ht = tau * u_prev + x[:, :, t]
        if IMPL["ulp"] is not None:  # exact64: the same sum in float64 (exact sums stay)
            ht = _jit(ht, f8(tau) * u_prev.astype(f8) + x[:, :, t].astype(f8))
        ok = blocked == 0
        st = (ok & _fires(ht, theta, cfg["cond"], bug)).astype(F32)
        dec = 0 if bug == "count_end_not_decremented" and t == L - 1 else 1
        blocked = np.where(st > 0, R, np.maximum(blocked - dec, 0))
        if cfg["reset"] == "hard":
            ut = ht * (F32(1) - st) + st * ur
        elif cfg["reset"] == "soft":
            ut = ht - (F32(1.001) if bug == "soft_reset_1001" else F32(1)) * theta * st
        elif cfg["reset"] == "refractory":
            ut = ht - (theta * st if bug == "refractory_theta" else (theta + rho) * st)
        else:
            ut = ht
        if IMPL["ulp"] is not None and cfg["reset"] in ("soft", "refractory"):
            ut = _jit(ut, ht.astype(f8) - (f8(theta) + (rho.astype(f8) if
                                                         cfg["reset"] == "refractory" else 0))
                      * st)
        s[:, :, t], h[:, :, t], u[:, :, t], allowed[:, :, t] = st, ht, ut, ok
        u_prev = ut.astype(F32)
    if end is not None:
        end.update(u_end=u_prev, count_end=blocked.astype(np.int64))
    return s, h, u, allowed


def neuron_bwd(s, h, allowed, rho, cfg, gs, gh=None, gu=None, bug=None):
    """VJP: ``(dx, drho)`` for cotangents on s, h, u (None = zero)."""
    Bsz, H, L = s.shape
    rho = np.zeros(H, F32) if rho is None else rho
    tau, theta, ur = cfg["tau"], cfg["theta"], cfg["u_reset"]
    scale = cfg["scale"] * (F32(2) if bug == "surrogate_scale_x2" else F32(1))
    mode = cfg["grad_mode"]
    if bug == "detach_reset_as_bptt" and mode == "detach_reset":
        mode = "bptt"
    dsdh = allowed * surrogate_grad(cfg["surrogate"], h - theta, scale)
    zero = np.zeros((Bsz, H), F32)
    dx = np.zeros((Bsz, H, L), F32)
    drho = np.zeros((Bsz, H), F32)
    carry = zero  # gradient reaching u_t from h_{t+1}
    for t in range(L - 1, -1, -1):
        st, ht = s[:, :, t], h[:, :, t]
        gut = carry + (gu[:, :, t] if gu is not None else zero)
        gst = gs[:, :, t] if gs is not None else zero
        reset = cfg["reset"]
        if reset == "hard":
            dudh, duds = F32(1) - st, ur - ht
        elif reset == "soft":
            dudh, duds = F32(1), -theta
        elif reset == "refractory":
            dudh, duds = F32(1), -(theta + rho)
            drho = drho - gut * st
        else:
            dudh, duds = F32(1), F32(0)
        if mode != "detach_reset":
            gst = gst + gut * duds
        ght = _jit((gh[:, :, t] if gh is not None else zero) + gut * dudh + gst * dsdh[:, :, t])
        dx[:, :, t] = ght
        carry = zero if mode == "sltt" else (tau * ght).astype(F32)
    return dx, _sum(drho, 0).astype(F32)


def neuron(case, bug=None):
    cfg = neuron_config(case.attrs)
    x, rho = case.inputs["x"], case.params.get("rho")
    if cfg["reset"] == "refractory" and rho is None:
        raise Reject("refractory reset needs rho")
    end = {} if "u0" in case.inputs else None  # a stateful case
    s, h, u, allowed = neuron_fwd(x, rho, cfg, bug, case.inputs.get("u0"),
                                  case.inputs.get("count0"), end)
    dx, drho = neuron_bwd(s, h, allowed, rho, cfg, case.cot.get("s"), case.cot.get("h"),
                          case.cot.get("u"), bug)
    grads = {"x": (dx * F32(1.001)).astype(F32) if bug == "grad_x1001" else dx}
    if rho is not None:
        grads["rho"] = drho
    return {"s": s, "h": h, "u": u, **(end or {})}, grads


pmbc = neuron  # same outputs; iterations omitted


# ============================================================================================
# GLU, GSU, GELU
# ============================================================================================

def glu_fwd_bwd(s, W, b, dz=None, bug=None):
    H = s.shape[1]
    o = _jit(_einsum("oi,bil->bol", W, s) + b[:, None])  # (B, 2H, L)
    a, gate = (o[:, H:], o[:, :H]) if bug == "glu_gate_wrong_half" else (o[:, :H], o[:, H:])
    sg = _jit(_sigmoid(gate))
    z = _jit((a * sg).astype(F32))
    if bug == "glu_output_x1001":
        z = (z * F32(1.001)).astype(F32)
    if dz is None:
        return z, None
    da = dz * sg
    dgate = dz * a * sg * (F32(1) - sg)
    do = _jit(np.concatenate([dgate, da] if bug == "glu_gate_wrong_half" else [da, dgate],
                             axis=1))
    return z, {"s": _jit(_einsum("oi,bol->bil", W, do).astype(F32)),
               "W": _jit(_einsum("bol,bil->oi", do, s).astype(F32)),
               "b": _jit(_sum(do, (0, 2)).astype(F32))}


def glu(case, bug=None):
    z, g = glu_fwd_bwd(case.inputs["s"], case.params["W"], case.params["b"],
                       case.cot.get("z"), bug)
    return {"z": z}, g


def _ternary(v, axis=None):
    vmax = np.abs(v).max(axis=axis, keepdims=True)
    return np.where((vmax > 0) & (np.abs(v) >= F32(0.15) * vmax), np.sign(v), F32(0)).astype(F32)


def gsu_fwd_bwd(x, W, b, c, dz, bug=None):
    """``z = (Ter(x) W + b) * (x Ter(W) + c)`` (Ter(x) over the channels of each step) and,
    given ``dz``, the grads of x, W, b, c (straight-through: Ter is the identity backward)."""
    Tx, TW = _ternary(x, axis=None if bug == "gsu_ternary_global" else 1), _ternary(W)
    if bug == "gsu_bc_swapped":
        b, c = c, b
    P = _jit(_einsum("bil,ij->bjl", Tx, W) + b[:, None])
    Q = _jit(_einsum("bil,ij->bjl", x, TW) + c[:, None])
    z = _jit((P * Q).astype(F32))
    dP, dQ = dz * Q, dz * P
    return z, {"x": _jit(_einsum("ij,bjl->bil", TW, dQ).astype(F32)),
               "W": _jit(_einsum("bil,bjl->ij", Tx, dP).astype(F32)),
               "b": _jit(_sum(dP, (0, 2)).astype(F32)), "c": _jit(_sum(dQ, (0, 2)).astype(F32))}


def gsu(case, bug=None):
    x, p = case.inputs["x"], case.params
    _finite(x=x, **p)
    z, g = gsu_fwd_bwd(x, p["W"], p["b"], p["c"], case.cot["z"], bug)
    return {"z": z}, g


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_fwd_bwd(y):
    """``y Phi(y)`` and its derivative (erf correctly rounded to float32)."""
    Phi = _jit((F32(0.5) * (F32(1) + _erf(y / F32(math.sqrt(2.0))).astype(F32))).astype(F32))
    phi = np.exp(-F32(0.5) * y * y) / F32(math.sqrt(2 * math.pi))
    return (y * Phi).astype(F32), (Phi + y * phi).astype(F32)


# ============================================================================================
# SDN
# ============================================================================================

def _sdn_weights(p, prefix=""):
    w = {k: p[prefix + k] for k in ("w0", "w1", "w2", "w3", "w4", "w5")}
    return w["w0"][:, 0, :], w["w1"], w["w2"][:, :, 0], w["w3"], w["w4"][0, :, 0], w["w5"][0]


def sdn_fwd_bwd(x, p, prefix="", dm=None, bug=None):
    """Fused SDN prediction ``m`` (..., L) and, given ``dm``, grads of w0..w5."""
    W1, b1, W2, b2, w3, b3 = _sdn_weights(p, prefix)
    K = W1.shape[1]
    L = x.shape[-1]
    xp = np.concatenate([np.zeros(x.shape[:-1] + (K,), F32), x], axis=-1)
    off = 1 if bug == "sdn_sees_x_t" else 0
    win = np.stack([xp[..., k + off:k + off + L] for k in range(K)], axis=-1)  # x[t-K+k]
    pre1 = _jit(b1 + _mm(win, W1.T))  # (..., L, C)
    h1 = np.maximum(pre1, F32(0))
    pre2 = _jit(b2 + _mm(h1, W2.T) + h1)
    h2 = np.maximum(pre2, F32(0))
    m = _jit((b3 + _mm(h2, w3)).astype(F32))
    if dm is None:
        return m, None
    lead = tuple(range(dm.ndim))
    g2 = dm[..., None] * w3 * (pre2 > 0)  # (..., L, C)
    g1 = _jit(_mm(g2, W2) + g2) * (pre1 > 0)
    def flat(a):
        return a.reshape(-1, a.shape[-1])

    gW1 = _mm(flat(g1).T, flat(win))
    gW2 = _mm(flat(g2).T, flat(h1))
    grads = {"w0": gW1[:, None, :], "w1": _sum(g1, lead), "w2": gW2[:, :, None],
             "w3": _sum(g2, lead), "w4": _mm(flat(h2).T, dm.reshape(-1))[None, :, None],
             "w5": _sum(dm).reshape(1)}
    return m, {k: _jit(f32(v)) for k, v in grads.items()}


def sdn(case, bug=None):
    a = case.attrs
    x = case.inputs["x"]
    _finite(x=x, **case.params)
    theta = F32(a.get("theta", 1.0))
    sur = a.get("surrogate", "triangle")
    scale = F32(a.get("surrogate_scale", DEFAULT_SCALE.get(sur, 1.0)))
    m, grads = sdn_fwd_bwd(x, case.params, "", case.cot["m"], bug)
    v = m + x
    s = (v >= theta if a.get("spike_condition", "ge") == "ge" else v > theta).astype(F32)
    if bug == "surrogate_scale_x2":
        scale = scale * F32(2)
    grads["x"] = (case.cot["s"] * surrogate_grad(sur, v - theta, scale)).astype(F32)
    return {"m": m, "s": s}, grads


# ============================================================================================
# Norms and the block
# ============================================================================================

EPS_NORM = 1e-5  # converted where used (F32(1e-5): the float32 value; float64 under impl)


def norm_fwd(x, gamma, beta, kind, eps=EPS_NORM, bug=None):
    axes = (1,) if kind == "layer" else (0, 2)
    mu = _jit(_mean(x, axes, keepdims=True))
    var = _jit(_mean((x - mu) ** 2, axes, keepdims=True))
    if bug == "layernorm_unbiased" and kind == "layer":  # torch.var's default: N - 1
        var = (var * F32(x.shape[1]) / F32(x.shape[1] - 1)).astype(F32)
    rstd = _jit(F32(1) / np.sqrt(var + F32(eps)))
    xh = _jit(((x - mu) * rstd).astype(F32))
    return (xh * gamma[:, None] + beta[:, None]).astype(F32), (xh, rstd, axes)


def norm_bwd(dy, gamma, cache):
    xh, rstd, axes = cache
    other = tuple(a for a in (0, 1, 2) if a not in axes)  # what gamma is indexed by: axis 1
    red = tuple(a for a in (0, 1, 2) if a != 1)
    dgamma = _sum(dy * xh, red)
    dbeta = _sum(dy, red)
    dxh = dy * gamma[:, None]
    dx = rstd * (dxh - _mean(dxh, axes, keepdims=True)
                 - xh * _mean(dxh * xh, axes, keepdims=True))
    del other
    return _jit(dx.astype(F32)), _jit(dgamma.astype(F32)), _jit(dbeta.astype(F32))


def block(case, bug=None):
    a, p = case.attrs, case.params
    u = case.inputs["u"]
    _finite(u=u, **p)
    act, kind = a["activation"], a["norm"]
    if kind not in ("layer", "batch"):
        raise Reject(f"unknown norm {kind!r}")
    gamma, beta = p["norm.gamma"], p["norm.beta"]
    L = u.shape[-1]
    # forward
    if a["prenorm"]:
        z, ncache = norm_fwd(u, gamma, beta, kind, bug=bug)
    else:
        z = u
    ssm = {k[4:]: v for k, v in p.items() if k.startswith("ssm.")}
    D = ssm.pop("D")
    K, _ = kernel_fwd_bwd(ssm, L, a.get("disc", "zoh"))
    if IMPL["chunks"]:
        y0, _ = s4d_forward(ssm, D, z, a.get("disc", "zoh"), None, bug)
    else:
        y0, _ = conv_fwd_bwd(z, K, D, bug=bug)
    thr = bool(a.get("threshold_scaling", False)) and "ln_vth" in p
    if thr:
        sc = np.exp(p["ln_vth"])[:, None]
        y = _jit((y0 / sc).astype(F32))
    else:
        y = y0
    kind_act = a.get("activation_kind", "")
    if act == "gelu":
        s, dgelu = gelu_fwd_bwd(y)
    elif act == "binary_gsu":
        s = None
    elif act == "sdn":
        cfg = neuron_config(a, "neuron_")
        m, _ = sdn_fwd_bwd(y, p, "sdn.", bug=bug)
        v = m + y
        s = (v >= cfg["theta"] if cfg["cond"] == "ge" else v > cfg["theta"]).astype(F32)
    elif kind_act == "neuron" or act in ("lif", "binary", "refractory"):
        cfg = neuron_config(a, "neuron_")
        rho = p.get("rho")
        s, h, _, allowed = neuron_fwd(y, rho, cfg, bug)
    else:
        raise Reject(f"unsupported activation {act!r}")
    if act != "gelu" and s is not None and bug in GARBAGE_SPIKES:  # garbage: see GARBAGE_SPIKES
        s = GARBAGE_SPIKES[bug](s)
    if a["mixing"] == "glu":
        mix, _ = glu_fwd_bwd(s, p["mix.W"], p["mix.b"], bug=bug)
    else:
        mix, _ = gsu_fwd_bwd(y, p["mix.W"], p["mix.b"], p["mix.c"], np.zeros_like(y), bug)
    out = u + mix
    if not a["prenorm"]:
        out, ncache = norm_fwd(out, gamma, beta, kind, bug=bug)
    # backward
    g = case.cot["y"]
    grads = {}
    if not a["prenorm"]:
        g, grads["norm.gamma"], grads["norm.beta"] = norm_bwd(g, gamma, ncache)
    gu = g
    if a["mixing"] == "glu":
        _, gm = glu_fwd_bwd(s, p["mix.W"], p["mix.b"], g, bug)
        grads["mix.W"], grads["mix.b"] = gm["W"], gm["b"]
        gs = gm["s"]
        if act == "gelu":
            gy = gs * dgelu
        elif act == "sdn":
            gy = gs * surrogate_grad(cfg["surrogate"], v - cfg["theta"],
                                     cfg["scale"] * (2 if bug == "surrogate_scale_x2" else 1))
        else:
            gy, grho = neuron_bwd(s, h, allowed, rho, cfg, gs, bug=bug)
            if rho is not None and case.trainable.get("rho", True):
                grads["rho"] = grho
    else:
        _, gm = gsu_fwd_bwd(y, p["mix.W"], p["mix.b"], p["mix.c"], g, bug)
        grads["mix.W"], grads["mix.b"], grads["mix.c"] = gm["W"], gm["b"], gm["c"]
        gy = gm["x"]
    gy = f32(gy)
    if thr:
        grads["ln_vth"] = _jit((-_sum(gy * y, (0, 2))).astype(F32))
        gy = (gy / sc).astype(F32)
    _, gc = conv_fwd_bwd(z, K, D, gy, bug)
    _, gk = kernel_fwd_bwd(ssm, L, a.get("disc", "zoh"), gc["K"], bug)
    for k, v in gk.items():
        grads["ssm." + k] = v
    grads["ssm.D"] = gc["D"]
    if a["prenorm"]:
        gz, grads["norm.gamma"], grads["norm.beta"] = norm_bwd(gc["u"], gamma, ncache)
        gu = gu + gz
    else:
        gu = gu + gc["u"]
    grads["u"] = f32(gu)
    return {"y": out}, grads


# ============================================================================================
# model_stream: the model in eval mode, chunk by chunk from the state of the previous chunk
# ============================================================================================

def _s4d_chunk(ssm, D, z, x0, disc, bug=None):
    """One chunk of the S4D layer from the modes ``x0``: ``y`` (B, H, T) float32 and the end
    modes (B, H, N2) complex64."""
    T = z.shape[-1]
    K, _ = kernel_fwd_bwd(ssm, T, disc)
    y, _ = conv_fwd_bwd(z, K, D)
    off = "ssm_end_state_power_off_by_one" if bug == "stream_ssm_end_state_off_by_one" else None
    ys, xs = s4d_state_terms(ssm, x0, T, disc, off)
    return (y + ys).astype(F32), (s4d_end_state(ssm, z, disc) + xs).astype(C64)


def _eval_norm(x, p, pre, kind):
    gamma, beta = p[pre + "norm.gamma"], p[pre + "norm.beta"]
    if kind == "layer":
        return norm_fwd(x, gamma, beta, "layer")[0]
    rm, rv = p[pre + "norm.running_mean"], p[pre + "norm.running_var"]
    rstd = F32(1) / np.sqrt(rv + F32(EPS_NORM))
    return (((x - rm[:, None]) * rstd[:, None]) * gamma[:, None] + beta[:, None]).astype(F32)


def _stream_layer(a, p, i, h, st, bug):
    """One block on one chunk ``h`` (B, H, T) from the layer state ``st`` (updated in place);
    returns the block output and its spikes (``("s" | "Tx", array)`` or None)."""
    pre = f"layers.{i}."
    z = _eval_norm(h, p, pre, a["norm"]) if a["prenorm"] else h
    ssm = {k[len(pre) + 4:]: v for k, v in p.items() if k.startswith(pre + "ssm.")}
    D = ssm.pop("D")
    y, st["x"] = _s4d_chunk(ssm, D, z, st["x"], a["disc"], bug)
    v = (y / np.exp(p[pre + "ln_vth"])[:, None]).astype(F32) if a["threshold_scaling"] else y
    act, spikes = a["activation"], None
    if act == "gelu":
        s, _ = gelu_fwd_bwd(v)
    elif act == "sdn":
        cfg = neuron_config(a, "neuron_")
        ext = np.concatenate([st["window"], v], axis=-1)  # (B, H, 8 + T): the window first
        m, _ = sdn_fwd_bwd(ext, p, "sdn.")
        m = m[..., st["window"].shape[-1]:]
        st["window"] = ext[..., -st["window"].shape[-1]:]
        s = _fires(m + v, cfg["theta"], cfg["cond"], bug).astype(F32)
        spikes = ("s", s)
    elif act != "binary_gsu":
        cfg = neuron_config(a, "neuron_")
        end = {}
        s, _, _, _ = neuron_fwd(v, p.get(pre + "rho"), cfg, bug, st["u"], st["count"], end)
        st["u"], st["count"] = end["u_end"], end["count_end"]
        spikes = ("s", s)
    if a["mixing"] == "glu":
        mix, _ = glu_fwd_bwd(s, p[pre + "mix.W"], p[pre + "mix.b"])
    else:
        mix, _ = gsu_fwd_bwd(v, p[pre + "mix.W"], p[pre + "mix.b"], p[pre + "mix.c"],
                             np.zeros_like(v))
        spikes = ("Tx", _ternary(v, axis=1))
    out = (h + mix).astype(F32)
    if not a["prenorm"]:
        out = _eval_norm(out, p, pre, a["norm"])
    return out, spikes


def model_stream(case, bug=None):
    """The model run chunk by chunk (``chunks``), each chunk from the previous one's state;
    outputs: logits after every step, every layer's spikes, the end state."""
    a, p, x = case.attrs, case.params, case.inputs["x"]
    _finite(**p)
    if a["bidirectional"]:
        raise Reject("a bidirectional model has no streaming form")
    chunks = [int(c) for c in np.atleast_1d(a["chunks"])]
    Bsz, L = x.shape[0], x.shape[1]
    if sum(chunks) != L or min(chunks) < 1:
        raise Reject(f"chunks {chunks} do not sum to L = {L}")
    if a["vocab"]:
        h = p["embedding.E"][x].transpose(0, 2, 1).astype(F32)  # (B, H, L)
    else:
        _finite(x=x)
        h = (np.einsum("bli,hi->bhl", x, p["encoder.W"]) + p["encoder.b"][:, None]).astype(F32)
    H, N2, nl = int(a["d_model"]), int(a["d_state"]) // 2, int(a["n_layers"])

    def zero_state():
        return [{"x": np.zeros((Bsz, H, N2), C64), "u": np.zeros((Bsz, H), F32),
                 "count": np.zeros((Bsz, H), np.int64), "window": np.zeros((Bsz, H, 8), F32)}
                for _ in range(nl)], np.zeros((Bsz, H), F32)

    states, pool = zero_state()
    logits, spikes, t = [], [[] for _ in range(nl)], 0
    for n in chunks:
        if bug == "stream_state_reset_per_chunk" and t > 0:
            states, pool = zero_state()
            steps0 = 0
        else:
            steps0 = t
        hc = h[:, :, t:t + n]
        for i in range(nl):
            hc, sp = _stream_layer(a, p, i, hc, states[i], bug)
            if sp is not None:
                spikes[i].append(sp)
        csum = pool[:, :, None] + np.cumsum(hc, axis=2)  # (B, H, n)
        pooled = csum / (steps0 + np.arange(1, n + 1, dtype=F32))  # (B, H, n)
        logits.append(np.einsum("bht,ch->btc", pooled, p["decoder.W"]) + p["decoder.b"])
        pool = csum[:, :, -1]
        t += n
    out = {"logits": np.concatenate(logits, axis=1).astype(F32)}
    for i in range(nl):
        if spikes[i]:
            name = spikes[i][0][0]
            out[f"layers.{i}.{name}"] = np.concatenate([s for _, s in spikes[i]], axis=-1)
        pre = f"state/layers.{i}."
        out[pre + "ssm.x_re"], out[pre + "ssm.x_im"] = states[i]["x"].real, states[i]["x"].imag
        out[pre + "neuron.u"], out[pre + "neuron.count"] = states[i]["u"], states[i]["count"]
        out[pre + "sdn.window"] = states[i]["window"]
    out["state/pool.sum"] = pool
    return out, {}  # only the datasets the golden case holds are written


OPS = {"s4d_kernel": s4d_kernel, "fftconv": fftconv, "s4d_layer": s4d_layer, "neuron": neuron,
       "pmbc": pmbc, "glu": glu, "gsu": gsu, "sdn": sdn, "block": block,
       "model_stream": model_stream}


# ============================================================================================
# Candidate files
# ============================================================================================

def compute_case(suite, gcase, bug=None):
    """``(outputs, grads)`` of one golden h5 group, or raises :class:`Reject`."""
    case = Case(gcase)
    if case.attrs.get("L", 1) is not None and suite == "s4d_kernel" and int(case.attrs["L"]) < 1:
        raise Reject(f"L must be >= 1, got {case.attrs['L']}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return OPS[suite](case, bug)


_CACHE = {}


def compute_suite(suite, bug=None):
    """``{case id: (outputs, grads) or rejection message}`` for the committed golden file
    (memoised per suite and bug: the golden files are read-only package data)."""
    key = (str(golden_path(suite)), suite, bug)
    if key not in _CACHE:
        res = {}
        with h5py.File(golden_path(suite), "r") as gold:
            for cid, gcase in gold["cases"].items():
                try:
                    res[cid] = compute_case(suite, gcase, bug)
                except Reject as e:
                    res[cid] = str(e)
        _CACHE[key] = res
    return _CACHE[key]


def write_candidate(suite, path, bug=None, target=None, dtype=np.float64):
    """Write the float32 backend's candidate for the committed golden file of ``suite``.

    ``bug``: a key of :data:`BUGS`, or ``"rel_error_1e-3"`` with ``target`` a dataset path
    (``"outputs/<name>"`` or ``"grads/<name>"``) multiplied by ``1 + 1e-3``. ``dtype``: what
    the float datasets are written as (float64 by default; float32 for a native candidate).
    Returns the path.
    """
    if bug is not None and bug not in BUGS and bug not in VARIANTS and bug != REL_ERROR:
        raise ValueError(f"unknown bug {bug!r}")
    results = compute_suite(suite, None if bug == REL_ERROR else bug)

    def store(cid, dpath, arr):
        if np.asarray(arr).dtype.kind in "iu":  # counters: int64, as golden
            return np.asarray(arr, dtype=np.int64)
        arr = np.asarray(arr, dtype=np.float64)
        if bug == REL_ERROR and dpath == target:
            arr = arr * (1.0 + 1e-3)
        return arr.astype(dtype)
    with h5py.File(golden_path(suite), "r") as gold:
        return write_results(path, suite, results, gold["cases"],
                             "tests/float32_backend.py" + (f" bug={bug}" if bug else ""), store)


def write_results(path, suite, results, cases, backend, store):
    """Write a candidate file: ``results`` maps case ids to ``(outputs, grads)`` or a rejection
    message; ``cases`` the golden cases (id -> something that answers ``"outputs/<name>" in``):
    only the datasets the golden case holds are written, as ``store(case id, path, array)``."""
    with h5py.File(path, "w") as cand:
        cand.attrs.update(schema="refimpl-golden-candidate", schema_version=1, suite=suite,
                          backend=backend)
        for cid, gcase in cases.items():
            grp = cand.create_group(f"cases/{cid}")
            if isinstance(results[cid], str):
                grp.attrs["error"] = results[cid]
                continue
            outputs, grads = results[cid]
            for group, tensors in (("outputs", outputs), ("grads", grads)):
                for name, arr in tensors.items():
                    dpath = f"{group}/{name}"
                    if dpath in gcase:
                        grp[dpath] = store(cid, dpath, arr)
    return path


def tensor_names(suite):
    """Every ``outputs/<name>`` and ``grads/<name>`` path that occurs in the golden suite."""
    names = set()
    with h5py.File(golden_path(suite), "r") as gold:
        for gcase in gold["cases"].values():
            for group in ("outputs", "grads"):
                if group in gcase:  # nested paths too (model_stream's outputs/state/...)
                    gcase[group].visititems(lambda n, obj, g=group: names.add(f"{g}/{n}") if
                                            isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


if __name__ == "__main__":  # python tests/float32_backend.py OUTDIR [BUG]
    import sys
    from pathlib import Path
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for s in SUITES:
        print(write_candidate(s, out / f"{s}.h5", sys.argv[2] if len(sys.argv) > 2 else None))
