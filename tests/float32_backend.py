"""A float32 NumPy backend for refimpl's golden suites, with planted bugs (issue 10).

Independent of refimpl's arithmetic: every input, parameter, cotangent and configuration value
is rounded to float32 when read, and all arithmetic is float32 / complex64 (NumPy 2 keeps
float32 through ``np.fft``; Python scalars are weak under NEP 50, float64 attributes are
converted explicitly). From refimpl it takes only the contract: the op registry
(:mod:`refimpl.ops`: names, configuration fields, state types, ``Result``), the golden suites
(:mod:`refimpl.golden`: which op a suite runs, its state datasets, ``read_state``) and the
committed files (``golden_path``).

The backend's ops follow the op contract (DESIGN.md section 12): :data:`OPS` maps the name of a
registered op to ``fwd(inputs, params, cfg, state=None) -> Result(outputs, cache, state)`` and
``vjp(cache, cotangents) -> {name: gradient}`` (named caches; the neuron and the SDN take a missing
cotangent as zero), and ``config(attrs)``, which reads the configuration from the attributes named
as the registered op's configuration fields. A suite of one of these ops is computed by
:func:`run_op`, one driver for all of them: ``s4d_kernel``, ``fftconv``, ``s4d_layer``, ``neuron``,
``pmbc`` (computed by the iterative neuron; no ``iterations`` output: verify with
``skip=('*/outputs/iterations',)``), ``glu``, ``gsu``, ``sdn``. A stateful case starts from its
stored state and outputs the end state; integer datasets (``count0``, counters) stay int64. The
model-level suites are composed from those ops (:data:`MODELS`): ``block`` (every family, norm and
placement the committed cases use, plus GELU, LayerNorm and BatchNorm) and ``model_stream`` (the
model in eval mode, run chunk by chunk from the previous chunk's state: S4D from its modes with the
closed-form end state, the neuron from ``(u, count)``, the SDN from its window, eval BatchNorm with
the running statistics).

Invalid cases raise :class:`Reject`. ``write_candidate(suite, path, bug)`` writes the candidate
file for the committed golden file. ``BUGS`` lists the planted bugs, ``VARIANTS`` correct
alternative implementations (passed as ``bug``); the special bug ``"rel_error_1e-3"``
multiplies the dataset named by ``target`` (``"outputs/y"``, ``"grads/x"``, ...) by
``1 + 1e-3``.

Implementation switches (issue 21; used by ``tests/half_backend.py``): :func:`impl` sets, for
the calls made inside it, another correct implementation — ``conv="direct"`` (time-domain
convolution, a sequential sum over the lags, instead of the FFT), ``chunks=(5, 1, 10, ...)``
(the neuron and the causal S4D forward run chunk by chunk, carrying their state), ``order=rng``
(a random permutation of the summation order of every contraction and reduction), ``ulp=rng``
(intermediate results moved by -1, 0 or +1 ulp at random, as another evaluation order would:
every nonzero intermediate of the kernel, convolution, GLU, GSU, SDN, norms and the neuron's
backward; in the neuron's forward only membranes that float32 did not compute exactly, so the
dyadic ``at_threshold`` cases stay exact), ``dtype=np.float64`` (the same code in float64 /
complex128) — and ``bug`` (a key of :data:`BUGS` or :data:`GARBAGE_SPIKES`, or a variant of
:data:`VARIANTS`), which the ops read where the bug is planted. Outside :func:`impl` the backend
is the float32 one described above.
"""
import contextlib
import math
from typing import Any, Callable, NamedTuple, Optional

import h5py
import numpy as np

from refimpl.golden import SUITES as GOLDEN_SUITES, golden_path
from refimpl.golden.registry import read_state
from refimpl.ops import Result, config_fields, get_op

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
#: garbage, not bugs (tests/test_golden_garbage.py): the spikes of the spiking ops (in the
#: block: its internal spikes, before the mixing) inverted or made non-binary
GARBAGE_SPIKES = {"spikes_inverted": lambda s: (F32(1) - s).astype(F32),
                  "spikes_half": lambda s: (F32(0.5) * s).astype(F32)}
REL_ERROR = "rel_error_1e-3"
#: correct alternatives (not bugs), passed like a bug: ``naive_expm1`` computes the ZOH
#: ``exp(dt A) - 1`` by subtraction and differentiates ``(exp(w) - 1) / w`` in closed form
#: everywhere (what autograd of DESIGN.md's formula as written does)
VARIANTS = ("naive_expm1",)


class Reject(Exception):
    """The backend rejects the case (written as the case's ``error`` attribute)."""


def f32(a):
    return np.asarray(a, dtype=F32)


# ============================================================================================
# Implementation switches (see the module docstring); module state, set only through impl()
# ============================================================================================

IMPL = dict(conv="fft", chunks=None, order=None, ulp=None, bug=None)


@contextlib.contextmanager
def impl(conv="fft", chunks=None, order=None, ulp=None, dtype=np.float32, bug=None):
    """Compute with another correct implementation (or the planted ``bug``) inside the ``with``
    block (not thread-safe: module state, restored on exit)."""
    global F32, C64
    saved = dict(IMPL), F32, C64
    IMPL.update(conv=conv, chunks=tuple(chunks) if chunks else None, order=order, ulp=ulp,
                bug=bug)
    F32 = np.dtype(dtype).type
    C64 = np.result_type(F32, np.complex64).type
    try:
        yield
    finally:
        IMPL.clear()
        IMPL.update(saved[0])
        F32, C64 = saved[1], saved[2]


def _bug(*names):
    """Whether the planted bug is one of ``names``."""
    return IMPL["bug"] in names


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


def _prefixed(p, prefix):
    """``{name without prefix: array}`` of the entries of ``p`` whose name starts with it."""
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


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


def _powers(logdA, L, off_by_one=False):
    """``dA^l`` for l = 0..L-1 as ``exp(l log dA)``, (H, N2, L) complex64 (``off_by_one``:
    ``dA^(l+1)``, the kernel one step late)."""
    P = np.exp(logdA[:, :, None] * np.arange(L, dtype=F32)).astype(C64)
    if off_by_one:
        P = (P * np.exp(logdA)[:, :, None]).astype(C64)
    return _jit(P)


def _B(p):
    """The input matrix ``B`` (H, N2) complex64: ``B_re + i B_im``, or ones when not trained."""
    return _cplx(p["B_re"], p["B_im"]) if "B_re" in p else np.ones(p["A_imag"].shape, C64)


class KernelCache(NamedTuple):
    p: dict  # the parameters
    L: int
    Cm: Any  # C (..., H, N2) complex
    dt: Any  # (H, 1)
    dB: Any  # (H, N2)
    d: dict  # partial derivatives of dA, dB (_discretize)
    W: Any  # C dB (..., H, N2)
    P: Any  # dA^l (H, N2, L)


def kernel_fwd(p, L, disc):
    """S4D kernel ``K`` (..., H, L) from params ``log_dt, log_A_real, A_imag, C_re, C_im
    [, B_re, B_im]``, and the cache of :func:`kernel_bwd`."""
    for n in ("log_dt", "log_A_real", "A_imag", "C_re", "C_im"):
        if n not in p:
            raise Reject(f"missing parameter {n}")
    _finite(**p)
    if L < 1:
        raise Reject(f"L must be >= 1, got {L}")
    Cm = _cplx(p["C_re"], p["C_im"])  # (H, N2) or (2, H, N2)
    dt, A, dA, dB, d = _discretize(p["log_dt"], p["log_A_real"], p["A_imag"], _B(p), disc,
                                   naive=_bug("naive_expm1"))
    P = _powers(d["logdA"], L, _bug("kernel_power_off_by_one"))  # (H, N2, L)
    W = _jit(Cm * dB)  # (..., H, N2)
    K = _jit((F32(2) * _einsum("...hn,hnl->...hl", W, P).real).astype(F32))
    return K, KernelCache(p, L, Cm, dt, dB, d, W, P)


def kernel_bwd(cache, dK):
    """The param grads of the S4D kernel given the cotangent ``dK``."""
    c, L = cache, cache.L
    G = dK.astype(C64)  # (..., H, L)
    S0 = _jit(_einsum("...hl,hnl->...hn", G, c.P))  # sum_l G_l dA^l
    lG = G[..., 1:] * np.arange(1, L, dtype=F32)
    S1 = _jit(_einsum("...hl,hnl->...hn", lG, c.P[:, :, :L - 1]))  # sum_l l G_l dA^(l-1)
    cC = c.dB * S0
    cdB = c.Cm * S0
    cdA = c.W * S1
    if c.Cm.ndim == 3:  # bidirectional: both directions share dA, dB
        cdB, cdA = _sum(cdB, 0), _sum(cdA, 0)
    grads = {}
    grads["C_re"], grads["C_im"] = _re2(cC)
    if _bug("missing_conj"):  # d/d C_im taken from conj-less c: sign of the imaginary part
        grads["C_im"] = -grads["C_im"]
    c_dt = cdA * c.d["dA_dt"] + cdB * c.d["dB_dt"]
    c_A = cdA * c.d["dA_A"] + cdB * c.d["dB_A"]
    grads["log_dt"] = (F32(2) * _sum(c_dt.real, -1) * c.dt[:, 0]).astype(F32)
    gre, grads["A_imag"] = _re2(c_A)
    grads["log_A_real"] = (-gre * np.exp(c.p["log_A_real"])).astype(F32)
    if "B_re" in c.p:
        grads["B_re"], grads["B_im"] = _re2(cdB * c.d["dB_B"])
    return {k: _jit(v) for k, v in grads.items()}


def _kernel_op_fwd(inputs, params, cfg, state=None):
    K, cache = kernel_fwd(params, cfg["L"], cfg["disc"])
    return Result({"K": K}, cache, None)


def _kernel_op_vjp(cache, cotangents):
    return kernel_bwd(cache, cotangents["K"])


# ============================================================================================
# FFT convolution
# ============================================================================================

class ConvCache(NamedTuple):
    u: Any
    D: Any
    bidir: bool
    n: int  # FFT length (0: the direct convolution)
    kf: Any = None  # rfft of the kernel
    uf: Any = None  # rfft of u
    K0: Any = None  # direct: the causal kernel (H, L)
    K1: Any = None  # direct: the anticausal kernel, or None
    lags: Any = None  # direct: the order of the lags


def conv_fwd(u, K, D):
    """``y = conv(u, K) + D u`` (float32 FFTs, or :func:`_direct_conv_fwd` under
    ``IMPL["conv"]``) and the cache of :func:`conv_bwd`."""
    _finite(u=u, K=K, D=D)
    Bsz, H, L = u.shape
    if K.shape[-2:] != (H, L) or K.ndim not in (2, 3) or (K.ndim == 3 and K.shape[0] != 2):
        raise Reject(f"K must have shape (..., {H}, {L}), got {K.shape}")
    if D.shape != (H,):
        raise Reject(f"D must have shape ({H},), got {D.shape}")
    if IMPL["conv"] == "direct" and not _bug("fft_circular"):
        return _direct_conv_fwd(u, K, D)
    n = L if _bug("fft_circular") else 2 * L  # circular: the FFT of length L wraps around
    k = np.zeros((H, n), F32)
    bidir = K.ndim == 3
    k[:, :L] = K[0] if bidir else K
    if bidir and n == L:
        k[:, 1:] += K[1][:, :L - 1][:, ::-1]
    elif bidir:  # anticausal half: k[n - 1 - j] = K1[j]
        k[:, n - L:] = K[1] if _bug("anticausal_not_reversed") else K[1][:, ::-1]
    kf, uf = np.fft.rfft(k, n), np.fft.rfft(u, n)
    y = _jit((np.fft.irfft(uf * kf, n)[..., :L] + D[:, None] * u).astype(F32))
    return y, ConvCache(u, D, bidir, n, kf=kf, uf=uf)


def conv_bwd(cache, dy):
    """Grads of u, K, D given ``dy``."""
    if cache.n == 0:
        return _direct_conv_bwd(cache, dy)
    u, D, n, L = cache.u, cache.D, cache.n, cache.u.shape[-1]
    dyf = np.fft.rfft(dy, n)
    du = np.fft.irfft(dyf * np.conj(cache.kf), n)[..., :L]
    if not _bug("no_D_in_backward"):
        du = du + D[:, None] * dy
    dk = np.fft.irfft(_sum(dyf * np.conj(cache.uf), 0), n)
    if cache.bidir and n == L:
        dK = np.stack([dk[:, :L], np.concatenate([dk[:, 1:][:, ::-1], dk[:, :1]], -1)])
    elif cache.bidir:
        dK = np.stack([dk[:, :L], dk[:, n - L:][:, ::-1]])
    else:
        dK = dk[:, :L]
    dD = _sum(dy * u, (0, 2))
    return {"u": _jit(du.astype(F32)), "K": _jit(dK.astype(F32)), "D": _jit(dD.astype(F32))}


def _direct_conv_fwd(u, K, D):
    """:func:`conv_fwd` in the time domain: a sequential sum over the lags (in a random order
    under ``IMPL["order"]``), float32 accumulators."""
    Bsz, H, L = u.shape
    bidir = K.ndim == 3
    K0, K1 = (K[0], K[1]) if bidir else (K, None)
    if bidir and _bug("anticausal_not_reversed"):  # the FFT bug, in the time domain
        K1 = K1[:, ::-1]
    rng = IMPL["order"]
    lags = rng.permutation(L) if rng is not None else np.arange(L)
    y = np.zeros_like(u)
    for j in lags:  # y[t] += K0[j] u[t - j]; y[t] += K1[j] u[t + 1 + j]
        y[..., j:] += K0[:, j, None] * u[..., :L - j]
        if bidir and j < L - 1:
            y[..., :L - 1 - j] += K1[:, j, None] * u[..., 1 + j:]
    y = _jit((y + D[:, None] * u).astype(F32))
    return y, ConvCache(u, D, bidir, 0, K0=K0, K1=K1, lags=lags)


def _direct_conv_bwd(cache, dy):
    u, D, K0, K1, bidir = cache.u, cache.D, cache.K0, cache.K1, cache.bidir
    Bsz, H, L = u.shape
    du = np.zeros_like(u)
    dK0, dK1 = np.zeros((H, L), F32), np.zeros((H, L), F32)
    for j in cache.lags:
        du[..., :L - j] += K0[:, j, None] * dy[..., j:]
        dK0[:, j] = _sum(dy[..., j:] * u[..., :L - j], (0, 2))
        if bidir and j < L - 1:
            du[..., 1 + j:] += K1[:, j, None] * dy[..., :L - 1 - j]
            dK1[:, j] = _sum(dy[..., :L - 1 - j] * u[..., 1 + j:], (0, 2))
    if not _bug("no_D_in_backward"):
        du = du + D[:, None] * dy
    dK = np.stack([dK0, dK1]) if bidir else dK0
    dD = _sum(dy * u, (0, 2))
    return {"u": _jit(du.astype(F32)), "K": _jit(dK.astype(F32)), "D": _jit(dD.astype(F32))}


def _conv_op_fwd(inputs, params, cfg=None, state=None):
    y, cache = conv_fwd(inputs["u"], params["K"], params["D"])  # D required (every case has it)
    return Result({"y": y}, cache, None)


def _conv_op_vjp(cache, cotangents):
    return conv_bwd(cache, cotangents["y"])


# ============================================================================================
# S4D layer: the kernel, the FFT convolution with the D skip, and their backward
# ============================================================================================

def s4d_state_terms(p, x0, L, disc, off_by_one=False):
    """The state's contributions for a chunk of length ``L`` from the modes ``x0`` (B, H, N2)
    complex64: ``2 Re sum_n C dA^(t+1) x0`` (B, H, L) and ``dA^L x0`` (B, H, N2)
    (``off_by_one``: ``dA^(L-1) x0``)."""
    _, _, _, _, d = _discretize(p["log_dt"], p["log_A_real"], p["A_imag"], _B(p), disc)
    P = _powers(d["logdA"], L + 1)  # (H, N2, L + 1): dA^0 .. dA^L
    Cm = _cplx(p["C_re"], p["C_im"])  # (H, N2)
    y = (F32(2) * _einsum("hn,hnl,bhn->bhl", Cm, P[:, :, 1:], x0).real).astype(F32)
    Lx = L - 1 if off_by_one else L
    return _jit(y), _jit((P[None, :, :, Lx] * x0).astype(C64))


def s4d_end_state(p, u, disc):
    """``sum_s dA^(T-1-s) dB u_s`` (B, H, N2) complex64: the input's part of the end state."""
    _, _, _, dB, d = _discretize(p["log_dt"], p["log_A_real"], p["A_imag"], _B(p), disc)
    T = u.shape[-1]
    P = _powers(d["logdA"], T)[:, :, ::-1]  # (H, N2, T): dA^(T-1-s)
    return _jit((dB[None] * _einsum("bhs,hns->bhn", u.astype(C64), P)).astype(C64))


def _chunk_sizes_of(chunks, L):
    """Chunk lengths summing to ``L``: ``chunks`` cycled, the last one cut."""
    sizes = []
    while sum(sizes) < L:
        sizes.append(min(chunks[len(sizes) % len(chunks)], L - sum(sizes)))
    return sizes


def s4d_forward(ssm, D, u, disc, x0=None):
    """The S4D layer's ``y`` (B, H, L) from the modes ``x0`` (None: zero) and its end modes
    (None for a whole-sequence layer without ``x0``): the FFT over the whole sequence plus the
    state's terms, or, under ``IMPL["chunks"]`` and causal, chunk by chunk, each from the
    previous chunk's end state."""
    L = u.shape[-1]
    off = _bug("ssm_end_state_power_off_by_one")
    if IMPL["chunks"] and ssm["C_re"].ndim == 2:
        x = np.zeros(u.shape[:2] + ssm["A_imag"].shape[-1:], C64) if x0 is None else x0
        ys, t = [], 0
        for T in _chunk_sizes_of(IMPL["chunks"], L):
            Kc, _ = kernel_fwd(ssm, T, disc)
            yc, _ = conv_fwd(u[..., t:t + T], Kc, D)
            sy, sx = s4d_state_terms(ssm, x, T, disc, off)
            ys.append(yc if _bug("ssm_state_ignored") else (yc + sy).astype(F32))
            x = (s4d_end_state(ssm, u[..., t:t + T], disc) + sx).astype(C64)
            t += T
        return np.concatenate(ys, axis=-1), x
    K, _ = kernel_fwd(ssm, L, disc)
    y, _ = conv_fwd(u, K, D)
    if x0 is None:
        return y, None
    ys, xs = s4d_state_terms(ssm, x0, L, disc, off)
    if not _bug("ssm_state_ignored"):
        y = (y + ys).astype(F32)
    return y, (s4d_end_state(ssm, u, disc) + xs).astype(C64)


class LayerCache(NamedTuple):
    kernel: KernelCache
    conv: ConvCache


def _layer_op_fwd(inputs, params, cfg, state=None):
    u = inputs["u"]
    _finite(u=u, **params)
    if "D" not in params:
        raise Reject("missing parameter D")
    ssm = {k: v for k, v in params.items() if k != "D"}
    D, disc = params["D"], cfg["disc"]
    if state is not None:  # y and the end state (no VJP from a state: refimpl has none)
        _finite(x0=state.x)
        if params["C_re"].ndim == 3:
            raise Reject("a bidirectional layer has no streaming state")
        y, x_end = s4d_forward(ssm, D, u, disc, state.x)
        return Result({"y": y}, None, state._replace(x=x_end))
    K, kcache = kernel_fwd(ssm, u.shape[-1], disc)
    y, ccache = conv_fwd(u, K, D)
    if IMPL["chunks"]:
        y, _ = s4d_forward(ssm, D, u, disc)
    return Result({"y": y}, LayerCache(kcache, ccache), None)


def _layer_op_vjp(cache, cotangents):
    if cache is None:
        raise Reject("the S4D layer has no VJP from a state")
    gc = conv_bwd(cache.conv, cotangents["y"])
    return {"u": gc["u"], "D": gc["D"], **kernel_bwd(cache.kernel, gc["K"])}


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
    """The neuron's (and the SDN's) configuration from the attributes ``prefix + field``."""
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


def _fires(h, theta, cond):
    if cond == "ge" or _bug("ge_for_gt"):
        return h >= theta
    return h > theta


def _neuron_steps(x, rho, cfg, u0=None, count0=None):
    """``(s, h, u, allowed)`` (B, H, L) float32 and the end state ``(u, count)`` ((B, H)
    float32, int64), from the state ``u0`` (B, H) float32 and ``count0`` (B, H) int64 (None:
    zero). Under ``IMPL["chunks"]``: chunk by chunk, each from the previous chunk's state."""
    if IMPL["chunks"] and x.shape[-1] > 1:
        saved, parts, t, end = IMPL["chunks"], [], 0, (u0, count0)
        IMPL["chunks"] = None  # each chunk: the whole-sequence code
        try:
            for T in _chunk_sizes_of(saved, x.shape[-1]):
                seq, end = _neuron_steps(x[..., t:t + T], rho, cfg, *end)
                parts.append(seq)
                t += T
        finally:
            IMPL["chunks"] = saved
        return tuple(np.concatenate(a, axis=-1) for a in zip(*parts)), end
    _finite(x=x, rho=rho, u0=u0)
    if rho is not None and (rho < 0).any():
        raise Reject("rho must be >= 0 everywhere")
    Bsz, H, L = x.shape
    rho = np.zeros(H, F32) if rho is None else rho
    tau, theta, ur, R = cfg["tau"], cfg["theta"], cfg["u_reset"], cfg["R"]
    if count0 is not None and ((count0 < 0).any() or (count0 > R).any()):
        raise Reject(f"count0 must lie in [0, refractory_steps = {R}]")
    if _bug("refractory_counter_off_by_one") and R > 0:
        R = R + 1
    s, h, u, allowed = (np.zeros((Bsz, H, L), F32) for _ in range(4))
    u_prev = np.zeros((Bsz, H), F32) if u0 is None or _bug("state_u0_ignored") else u0
    blocked = np.zeros((Bsz, H), np.int64)
    if count0 is not None and not _bug("state_count0_ignored"):
        blocked = count0.astype(np.int64)
    f8 = np.float64
    for t in range(L):
        ht = tau * u_prev + x[:, :, t]
        if IMPL["ulp"] is not None:  # exact64: the same sum in float64 (exact sums stay)
            ht = _jit(ht, f8(tau) * u_prev.astype(f8) + x[:, :, t].astype(f8))
        ok = blocked == 0
        st = (ok & _fires(ht, theta, cfg["cond"])).astype(F32)
        dec = 0 if _bug("count_end_not_decremented") and t == L - 1 else 1
        blocked = np.where(st > 0, R, np.maximum(blocked - dec, 0))
        if cfg["reset"] == "hard":
            ut = ht * (F32(1) - st) + st * ur
        elif cfg["reset"] == "soft":
            ut = ht - (F32(1.001) if _bug("soft_reset_1001") else F32(1)) * theta * st
        elif cfg["reset"] == "refractory":
            ut = ht - (theta * st if _bug("refractory_theta") else (theta + rho) * st)
        else:
            ut = ht
        if IMPL["ulp"] is not None and cfg["reset"] in ("soft", "refractory"):
            ut = _jit(ut, ht.astype(f8) - (f8(theta) + (rho.astype(f8) if
                                                         cfg["reset"] == "refractory" else 0))
                      * st)
        s[:, :, t], h[:, :, t], u[:, :, t], allowed[:, :, t] = st, ht, ut, ok
        u_prev = ut.astype(F32)
    return (s, h, u, allowed), (u_prev, blocked.astype(np.int64))


#: the neuron's state type (refimpl's): fields u (B, H) and count (B, H) int64
NEURON_STATE = get_op("neuron").state


class NeuronCache(NamedTuple):
    s: Any  # spikes (B, H, L)
    h: Any  # membranes before the reset
    allowed: Any  # 1 where the refractory counter let the neuron fire
    rho: Any  # (H,), or None
    cfg: dict


def _garbage(s):
    """The spikes ``s``, or the garbage the planted bug makes of them (:data:`GARBAGE_SPIKES`)."""
    return GARBAGE_SPIKES[IMPL["bug"]](s) if IMPL["bug"] in GARBAGE_SPIKES else s


def neuron_fwd(inputs, params, cfg, state=None):
    """The neuron op: outputs ``s, h, u`` of ``x`` (B, H, L) [and ``rho``], from the state
    ``NEURON_STATE(u, count)`` if given (then also the end state)."""
    x, rho = inputs["x"], params.get("rho")
    if cfg["reset"] == "refractory" and rho is None:
        raise Reject("refractory reset needs rho")
    u0, count0 = (None, None) if state is None else (state.u, state.count)
    (s, h, u, allowed), (u_end, count_end) = _neuron_steps(x, rho, cfg, u0, count0)
    s = _garbage(s)
    end = None if state is None else state._replace(u=u_end, count=count_end)
    return Result({"s": s, "h": h, "u": u}, NeuronCache(s, h, allowed, rho, cfg), end)


def neuron_vjp(cache, cotangents):
    """Grads of ``x`` [and ``rho``] for the cotangents on s, h, u (missing: zero)."""
    s, h, rho, cfg = cache.s, cache.h, cache.rho, cache.cfg
    gs, gh, gu = (cotangents.get(k) for k in ("s", "h", "u"))
    Bsz, H, L = s.shape
    rho = np.zeros(H, F32) if rho is None else rho
    tau, theta, ur = cfg["tau"], cfg["theta"], cfg["u_reset"]
    scale = cfg["scale"] * (F32(2) if _bug("surrogate_scale_x2") else F32(1))
    mode = cfg["grad_mode"]
    if _bug("detach_reset_as_bptt") and mode == "detach_reset":
        mode = "bptt"
    dsdh = cache.allowed * surrogate_grad(cfg["surrogate"], h - theta, scale)
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
    drho = _sum(drho, 0).astype(F32)
    grads = {"x": (dx * F32(1.001)).astype(F32) if _bug("grad_x1001") else dx}
    if cache.rho is not None:
        grads["rho"] = drho
    return grads


# ============================================================================================
# GLU, GSU, GELU
# ============================================================================================

class GluCache(NamedTuple):
    s: Any
    W: Any
    a: Any  # the value half of W s + b
    sg: Any  # sigmoid of the gate half


def glu_fwd(inputs, params, cfg=None, state=None):
    """The GLU op: ``z = a * sigmoid(gate)`` with ``(a, gate)`` the halves of ``W s + b``."""
    s, W, b = inputs["s"], params["W"], params["b"]
    H = s.shape[1]
    o = _jit(_einsum("oi,bil->bol", W, s) + b[:, None])  # (B, 2H, L)
    a, gate = (o[:, H:], o[:, :H]) if _bug("glu_gate_wrong_half") else (o[:, :H], o[:, H:])
    sg = _jit(_sigmoid(gate))
    z = _jit((a * sg).astype(F32))
    if _bug("glu_output_x1001"):
        z = (z * F32(1.001)).astype(F32)
    return Result({"z": z}, GluCache(s, W, a, sg), None)


def glu_vjp(cache, cotangents):
    dz = cotangents["z"]
    da = dz * cache.sg
    dgate = dz * cache.a * cache.sg * (F32(1) - cache.sg)
    do = _jit(np.concatenate([dgate, da] if _bug("glu_gate_wrong_half") else [da, dgate],
                             axis=1))
    return {"s": _jit(_einsum("oi,bol->bil", cache.W, do).astype(F32)),
            "W": _jit(_einsum("bol,bil->oi", do, cache.s).astype(F32)),
            "b": _jit(_sum(do, (0, 2)).astype(F32))}


def _ternary(v, axis=None):
    vmax = np.abs(v).max(axis=axis, keepdims=True)
    return np.where((vmax > 0) & (np.abs(v) >= F32(0.15) * vmax), np.sign(v), F32(0)).astype(F32)


class GsuCache(NamedTuple):
    Tx: Any  # Ter(x)
    TW: Any  # Ter(W)
    P: Any  # Ter(x) W + b
    Q: Any  # x Ter(W) + c


def gsu_fwd(inputs, params, cfg=None, state=None):
    """The GSU op: ``z = (Ter(x) W + b) * (x Ter(W) + c)`` (Ter(x) over the channels of each
    step)."""
    x, W, b, c = inputs["x"], params["W"], params["b"], params["c"]
    _finite(x=x, **params)
    Tx, TW = _ternary(x, axis=None if _bug("gsu_ternary_global") else 1), _ternary(W)
    if _bug("gsu_bc_swapped"):
        b, c = c, b
    P = _jit(_einsum("bil,ij->bjl", Tx, W) + b[:, None])
    Q = _jit(_einsum("bil,ij->bjl", x, TW) + c[:, None])
    z = _jit((P * Q).astype(F32))
    return Result({"z": z}, GsuCache(Tx, TW, P, Q), None)


def gsu_vjp(cache, cotangents):
    """Grads of x, W, b, c (straight-through: Ter is the identity backward)."""
    dz = cotangents["z"]
    dP, dQ = dz * cache.Q, dz * cache.P
    return {"x": _jit(_einsum("ij,bjl->bil", cache.TW, dQ).astype(F32)),
            "W": _jit(_einsum("bil,bjl->ij", cache.Tx, dP).astype(F32)),
            "b": _jit(_sum(dP, (0, 2)).astype(F32)), "c": _jit(_sum(dQ, (0, 2)).astype(F32))}


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_fwd_bwd(y):
    """``y Phi(y)`` and its derivative (erf correctly rounded to float32)."""
    Phi = _jit((F32(0.5) * (F32(1) + _erf(y / F32(math.sqrt(2.0))).astype(F32))).astype(F32))
    phi = np.exp(-F32(0.5) * y * y) / F32(math.sqrt(2 * math.pi))
    return (y * Phi).astype(F32), (Phi + y * phi).astype(F32)


# ============================================================================================
# SDN
# ============================================================================================

def _sdn_weights(p):
    w = {k: p[k] for k in ("w0", "w1", "w2", "w3", "w4", "w5")}
    return w["w0"][:, 0, :], w["w1"], w["w2"][:, :, 0], w["w3"], w["w4"][0, :, 0], w["w5"][0]


def _flat(a):
    return a.reshape(-1, a.shape[-1])


class SdnCache(NamedTuple):
    p: dict  # the weights w0..w5
    win: Any  # the window x[t-K..t-1] of each step (..., L, K)
    pre1: Any  # first layer before the ReLU (..., L, C)
    h1: Any
    pre2: Any  # second layer (residual) before the ReLU
    h2: Any
    v: Any  # m + x, compared with theta
    cfg: dict


def sdn_fwd(inputs, params, cfg, state=None):
    """The SDN op: the fused prediction ``m`` (..., L) of ``x`` from the weights ``w0..w5``,
    and the spikes ``s = Theta(m + x - theta)``."""
    x = inputs["x"]
    _finite(x=x, **params)
    W1, b1, W2, b2, w3, b3 = _sdn_weights(params)
    K = W1.shape[1]
    L = x.shape[-1]
    xp = np.concatenate([np.zeros(x.shape[:-1] + (K,), F32), x], axis=-1)
    off = 1 if _bug("sdn_sees_x_t") else 0
    win = np.stack([xp[..., k + off:k + off + L] for k in range(K)], axis=-1)  # x[t-K+k]
    pre1 = _jit(b1 + _mm(win, W1.T))  # (..., L, C)
    h1 = np.maximum(pre1, F32(0))
    pre2 = _jit(b2 + _mm(h1, W2.T) + h1)
    h2 = np.maximum(pre2, F32(0))
    m = _jit((b3 + _mm(h2, w3)).astype(F32))
    v = m + x
    s = (v >= cfg["theta"] if cfg["cond"] == "ge" else v > cfg["theta"]).astype(F32)
    return Result({"m": m, "s": _garbage(s)}, SdnCache(params, win, pre1, h1, pre2, h2, v, cfg),
                  None)


def sdn_vjp(cache, cotangents):
    """The weights' grads from the cotangent on ``m`` (zero without one); ``x``'s from the
    one on ``s`` through the surrogate (the SDN's prediction is detached)."""
    dm, cfg = cotangents.get("m"), cache.cfg
    if dm is None:
        grads = {k: np.zeros_like(w) for k, w in cache.p.items()}
    else:
        W1, b1, W2, b2, w3, b3 = _sdn_weights(cache.p)
        lead = tuple(range(dm.ndim))
        g2 = dm[..., None] * w3 * (cache.pre2 > 0)  # (..., L, C)
        g1 = _jit(_mm(g2, W2) + g2) * (cache.pre1 > 0)
        gW1 = _mm(_flat(g1).T, _flat(cache.win))
        gW2 = _mm(_flat(g2).T, _flat(cache.h1))
        grads = {"w0": gW1[:, None, :], "w1": _sum(g1, lead), "w2": gW2[:, :, None],
                 "w3": _sum(g2, lead), "w4": _mm(_flat(cache.h2).T, dm.reshape(-1))[None, :, None],
                 "w5": _sum(dm).reshape(1)}
        grads = {k: _jit(f32(v)) for k, v in grads.items()}
    scale = cfg["scale"] * (F32(2) if _bug("surrogate_scale_x2") else F32(1))
    grads["x"] = (cotangents["s"] * surrogate_grad(cfg["surrogate"], cache.v - cfg["theta"],
                                                   scale)).astype(F32)
    return grads


# ============================================================================================
# The ops in the contract's terms, and the one driver of their golden suites
# ============================================================================================

class BackendOp(NamedTuple):
    """One op of this backend: ``fwd(inputs, params, cfg, state=None) -> Result`` and
    ``vjp(cache, cotangents) -> grads`` (refimpl.ops' contract), ``config(attrs) -> cfg``
    from the attributes named as the registered op's configuration fields (None: no
    configuration)."""
    fwd: Callable
    vjp: Callable
    config: Optional[Callable] = None


_NEURON = BackendOp(neuron_fwd, neuron_vjp, neuron_config)

#: registered op name -> the backend's op
OPS = {
    "s4d_kernel": BackendOp(_kernel_op_fwd, _kernel_op_vjp,
                            lambda a: {"L": int(a["L"]), "disc": a["disc"]}),
    "fftconv": BackendOp(_conv_op_fwd, _conv_op_vjp),
    "s4d_layer": BackendOp(_layer_op_fwd, _layer_op_vjp, lambda a: {"disc": a["disc"]}),
    "neuron": _NEURON,
    "pmbc": _NEURON,  # PMBC's outputs are the iterative neuron's (no iteration count)
    "sdn": BackendOp(sdn_fwd, sdn_vjp, neuron_config),
    "glu": BackendOp(glu_fwd, glu_vjp),
    "gsu": BackendOp(gsu_fwd, gsu_vjp),
}


def run_op(suite, case):
    """``(outputs, grads)`` of a case of the golden suite of a registered op, through the
    backend's op of that name: the arrays and the configuration by the op's declared names
    (as ``refimpl.golden.registry.op_args``), the initial state if the case holds one
    (``read_state``, whose end state is written as the suite's state outputs), the VJP of the
    case's cotangents if the golden case holds gradients."""
    spec = GOLDEN_SUITES[suite]
    ref, op = get_op(spec.op), OPS[spec.op]
    inputs = {n: case.inputs[n] for n in ref.inputs if n in case.inputs}
    params = {n: case.params[n] for n in ref.params if n in case.params}
    cfg = None
    if op.config is not None:
        cfg = op.config({k: case.attrs[k] for k in config_fields(ref.config)
                         if k in case.attrs})
    state = read_state(ref, spec.state_in, {"inputs/" + k: v for k, v in case.inputs.items()})
    res = op.fwd(inputs, params, cfg, state)
    outputs = dict(res.outputs)
    for field, v in ({} if state is None else res.state._asdict()).items():
        name = spec.state_out.format(field)
        outputs.update({name + "_re": v.real, name + "_im": v.imag} if np.iscomplexobj(v)
                       else {name: v})
    return outputs, (op.vjp(res.cache, case.cot) if case.grad_names else {})


# ============================================================================================
# Model-level suites (no registered op): the block, and the model streamed chunk by chunk
# ============================================================================================

EPS_NORM = 1e-5  # converted where used (F32(1e-5): the float32 value; float64 under impl)


class NormCache(NamedTuple):
    xh: Any  # the normalised input
    rstd: Any  # 1 / sqrt(var + eps)
    axes: tuple  # the axes of the statistics


def norm_fwd(x, gamma, beta, kind, eps=EPS_NORM):
    axes = (1,) if kind == "layer" else (0, 2)
    mu = _jit(_mean(x, axes, keepdims=True))
    var = _jit(_mean((x - mu) ** 2, axes, keepdims=True))
    if _bug("layernorm_unbiased") and kind == "layer":  # torch.var's default: N - 1
        var = (var * F32(x.shape[1]) / F32(x.shape[1] - 1)).astype(F32)
    rstd = _jit(F32(1) / np.sqrt(var + F32(eps)))
    xh = _jit(((x - mu) * rstd).astype(F32))
    return (xh * gamma[:, None] + beta[:, None]).astype(F32), NormCache(xh, rstd, axes)


def norm_bwd(dy, gamma, cache):
    xh, rstd, axes = cache.xh, cache.rstd, cache.axes
    red = (0, 2)  # gamma and beta are indexed by the channel axis 1
    dgamma = _sum(dy * xh, red)
    dbeta = _sum(dy, red)
    dxh = dy * gamma[:, None]
    dx = rstd * (dxh - _mean(dxh, axes, keepdims=True)
                 - xh * _mean(dxh * xh, axes, keepdims=True))
    return _jit(dx.astype(F32)), _jit(dgamma.astype(F32)), _jit(dbeta.astype(F32))


def _activation(a, p):
    """The block's spiking activation: ``(op, params, cfg)`` of the SDN or the neuron, or None
    for GELU and the binary GSU (their spikes are the mixing's)."""
    act = a["activation"]
    if act in ("gelu", "binary_gsu"):
        return None
    if act == "sdn":
        return OPS["sdn"], _prefixed(p, "sdn."), neuron_config(a, "neuron_")
    if a.get("activation_kind", "") == "neuron" or act in ("lif", "binary", "refractory"):
        return OPS["neuron"], {k: p[k] for k in ("rho",) if k in p}, neuron_config(a, "neuron_")
    raise Reject(f"unsupported activation {act!r}")


def block(case):
    """The block: [norm] -> S4D layer -> [threshold scaling] -> activation -> GLU or GSU ->
    residual -> [norm], and its VJP, from the ops of :data:`OPS`."""
    a, p = case.attrs, case.params
    u = case.inputs["u"]
    _finite(u=u, **p)
    act, kind = a["activation"], a["norm"]
    if kind not in ("layer", "batch"):
        raise Reject(f"unknown norm {kind!r}")
    gamma, beta = p["norm.gamma"], p["norm.beta"]
    # forward
    z, ncache = norm_fwd(u, gamma, beta, kind) if a["prenorm"] else (u, None)
    layer = OPS["s4d_layer"].fwd({"u": z}, _prefixed(p, "ssm."), {"disc": a.get("disc", "zoh")})
    y0 = layer.outputs["y"]
    thr = bool(a.get("threshold_scaling", False)) and "ln_vth" in p
    if thr:
        sc = np.exp(p["ln_vth"])[:, None]
        y = _jit((y0 / sc).astype(F32))
    else:
        y = y0
    spiking = _activation(a, p)
    if act == "gelu":
        s, dgelu = gelu_fwd_bwd(y)
    elif spiking is not None:
        act_op, act_params, act_cfg = spiking
        fired = act_op.fwd({"x": y}, act_params, act_cfg)
        s = fired.outputs["s"]
    mixing = OPS[a["mixing"]]
    mixed = mixing.fwd({"s": s} if a["mixing"] == "glu" else {"x": y}, _prefixed(p, "mix."))
    out = u + mixed.outputs["z"]
    if not a["prenorm"]:
        out, ncache = norm_fwd(out, gamma, beta, kind)
    # backward
    g = case.cot["y"]
    grads = {}
    if not a["prenorm"]:
        g, grads["norm.gamma"], grads["norm.beta"] = norm_bwd(g, gamma, ncache)
    gm = mixing.vjp(mixed.cache, {"z": g})
    grads.update({"mix." + k: v for k, v in gm.items() if k not in ("s", "x")})
    if a["mixing"] == "gsu":
        gy = gm["x"]
    elif act == "gelu":
        gy = gm["s"] * dgelu
    else:
        ga = act_op.vjp(fired.cache, {"s": gm["s"]})
        gy = ga["x"]
        if "rho" in ga and case.trainable.get("rho", True):
            grads["rho"] = ga["rho"]
    gy = f32(gy)
    if thr:
        grads["ln_vth"] = _jit((-_sum(gy * y, (0, 2))).astype(F32))
        gy = (gy / sc).astype(F32)
    gl = OPS["s4d_layer"].vjp(layer.cache, {"y": gy})
    grads.update({"ssm." + k: v for k, v in gl.items() if k != "u"})
    if a["prenorm"]:
        gz, grads["norm.gamma"], grads["norm.beta"] = norm_bwd(gl["u"], gamma, ncache)
        gu = g + gz
    else:
        gu = g + gl["u"]
    grads["u"] = f32(gu)
    return {"y": out}, grads


def _s4d_chunk(ssm, D, z, x0, disc):
    """One chunk of the S4D layer from the modes ``x0``: ``y`` (B, H, T) float32 and the end
    modes (B, H, N2) complex64 (the whole chunk at once, also under ``IMPL["chunks"]``)."""
    T = z.shape[-1]
    K, _ = kernel_fwd(ssm, T, disc)
    y, _ = conv_fwd(z, K, D)
    ys, xs = s4d_state_terms(ssm, x0, T, disc, _bug("stream_ssm_end_state_off_by_one"))
    return (y + ys).astype(F32), (s4d_end_state(ssm, z, disc) + xs).astype(C64)


def _eval_norm(x, lp, kind):
    gamma, beta = lp["norm.gamma"], lp["norm.beta"]
    if kind == "layer":
        out, _ = norm_fwd(x, gamma, beta, "layer")
        return out
    rm, rv = lp["norm.running_mean"], lp["norm.running_var"]
    rstd = F32(1) / np.sqrt(rv + F32(EPS_NORM))
    return (((x - rm[:, None]) * rstd[:, None]) * gamma[:, None] + beta[:, None]).astype(F32)


def _stream_layer(a, lp, h, st):
    """One block (params ``lp`` named as the block's: without the ``layers.<i>.`` prefix, with
    the SDN weights ``sdn.*`` the layers share) on one chunk ``h`` (B, H, T) from the layer
    state ``st`` (updated in place); returns the block output and its spikes (``("s" | "Tx",
    array)`` or None)."""
    z = _eval_norm(h, lp, a["norm"]) if a["prenorm"] else h
    ssm = _prefixed(lp, "ssm.")
    D = ssm.pop("D")
    y, st["x"] = _s4d_chunk(ssm, D, z, st["x"], a["disc"])
    v = (y / np.exp(lp["ln_vth"])[:, None]).astype(F32) if a["threshold_scaling"] else y
    act, spikes, spiking = a["activation"], None, _activation(a, lp)
    if act == "gelu":
        s, _ = gelu_fwd_bwd(v)
    elif act == "sdn":  # the op from the window of the last steps before the chunk
        _, params, cfg = spiking
        W = st["window"].shape[-1]
        ext = np.concatenate([st["window"], v], axis=-1)  # (B, H, W + T): the window first
        s = OPS["sdn"].fwd({"x": ext}, params, cfg).outputs["s"][..., W:]
        st["window"] = ext[..., -W:]
        spikes = ("s", s)
    elif spiking is not None:
        _, params, cfg = spiking
        state = NEURON_STATE(u=st["u"], count=st["count"])
        res = OPS["neuron"].fwd({"x": v}, params, cfg, state)
        s, st["u"], st["count"] = res.outputs["s"], res.state.u, res.state.count
        spikes = ("s", s)
    if a["mixing"] == "glu":
        mix = OPS["glu"].fwd({"s": s}, _prefixed(lp, "mix.")).outputs["z"]
    else:
        mix = OPS["gsu"].fwd({"x": v}, _prefixed(lp, "mix.")).outputs["z"]
        spikes = ("Tx", _ternary(v, axis=1))
    out = (h + mix).astype(F32)
    if not a["prenorm"]:
        out = _eval_norm(out, lp, a["norm"])
    return out, spikes


def model_stream(case):
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
    sdn = {k: v for k, v in p.items() if k.startswith("sdn.")}
    layers = [{**_prefixed(p, f"layers.{i}."), **sdn} for i in range(nl)]

    def zero_state():
        return [{"x": np.zeros((Bsz, H, N2), C64), "u": np.zeros((Bsz, H), F32),
                 "count": np.zeros((Bsz, H), np.int64), "window": np.zeros((Bsz, H, 8), F32)}
                for _ in range(nl)], np.zeros((Bsz, H), F32)

    states, pool = zero_state()
    logits, spikes, t = [], [[] for _ in range(nl)], 0
    for n in chunks:
        if _bug("stream_state_reset_per_chunk") and t > 0:
            states, pool = zero_state()
            steps0 = 0
        else:
            steps0 = t
        hc = h[:, :, t:t + n]
        for i in range(nl):
            hc, sp = _stream_layer(a, layers[i], hc, states[i])
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


#: the suites that are no registered op: suite -> ``fn(case) -> (outputs, grads)``
MODELS = {"block": block, "model_stream": model_stream}
#: every suite the backend computes, in refimpl's order
SUITES = tuple(n for n, s in GOLDEN_SUITES.items() if s.op in OPS or n in MODELS)


# ============================================================================================
# Candidate files
# ============================================================================================

def compute(suite, case):
    """``(outputs, grads)`` of one :class:`Case` of ``suite`` with the switches in force, or
    raises :class:`Reject`."""
    return MODELS[suite](case) if suite in MODELS else run_op(suite, case)


def compute_case(suite, gcase, bug=None):
    """``(outputs, grads)`` of one golden h5 group in float32 (with the planted ``bug``), or
    raises :class:`Reject`."""
    with impl(bug=bug):
        case = Case(gcase)
        with np.errstate(invalid="ignore", divide="ignore"):
            return compute(suite, case)


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
