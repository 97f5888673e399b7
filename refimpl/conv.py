"""Causal and bidirectional convolution with the ``D`` skip (DESIGN.md section 3).

    y[t] = sum_{s<=t} K0[t-s] u[s]  (+ sum_{s>t} K1[s-t-1] u[s] when bidirectional)  + D u[t]

Shapes: ``u, y (B, H, L)``; ``K (H, L)`` causal or ``(2, H, L)`` bidirectional; ``D (H,)``.

The FFT form pads to a fast length ``n >= 2L`` (:func:`fft_length`) so the circular
convolution equals the linear one on ``t < L``. Both directions fold into one length-``n``
circular kernel ``k``: ``k[j] = K0[j]`` and ``k[n-1-j] = K1[j]`` for ``j < L``, zero elsewhere.

For training (issue 13), :func:`conv_fwd` returns a :class:`ConvCache` that :func:`conv_vjp`
reads: the kernel and input spectra of the FFT form are computed once, not again in the
backward; short sequences (``L <=`` :data:`TOEPLITZ_MAX_L`) use the Toeplitz form instead, one
``(B, L) @ (L, L)`` BLAS product per channel (the same sums taken directly, cheaper than the
transforms at that length). :func:`fftconv` / :func:`fftconv_bwd` are always the FFT form.

Precision: the float arrays documented as float64 are float32 under
``refimpl.precision.using("float32")`` (the training variant, :mod:`refimpl.precision`);
nothing is cast: the inputs must be of the current precision.
"""
from typing import NamedTuple, Optional

import numpy as np
import scipy.fft as sfft
from numba import njit

from . import config
from . import threads
from . import ops as _ops
from ._checks import check_array, check_name, check_shape


def fft_length(L):
    """Smallest 5-smooth length ``n >= 2L`` (``scipy.fft.next_fast_len(2L, real=True)``)."""
    return sfft.next_fast_len(2 * L, real=True)


def _rfft(a, n):
    """Real FFT of length ``n`` along the last axis (rows in parallel, same result)."""
    return sfft.rfft(a, n=n, axis=-1, workers=threads.count())


def _irfft(a, n):
    """Inverse of :func:`_rfft`."""
    return sfft.irfft(a, n=n, axis=-1, workers=threads.count())


def _check_conv(u, K, D):
    u = check_array("u", u, 3)
    Bsz, H, L = u.shape
    if L < 1:
        raise ValueError(f"u must have at least one time step (L >= 1), got shape {u.shape}")
    K = check_array("K", K, (2, 3))
    if K.ndim == 3:
        check_shape("K", K, (2, H, L))
    else:
        check_shape("K", K, (H, L))
    if D is not None:
        D = check_array("D", D, 1)
        check_shape("D", D, (H,))
    return u, K, D


def _circular_kernel(K, n):
    """Fold ``K (H, L)`` or ``(2, H, L)`` into a length-``n`` circular kernel ``(H, n)``."""
    L = K.shape[-1]
    k = np.zeros(K.shape[-2:-1] + (n,), dtype=K.dtype)  # (H, n)
    if K.ndim == 3:
        k[:, :L] = K[0]
        k[:, n - L:] = K[1][:, ::-1]  # k[n-1-j] = K1[j]
    else:
        k[:, :L] = K
    return k


def _uncircular_kernel(dk, L, bidirectional):
    """Adjoint of :func:`_circular_kernel`: ``(H, n)`` -> ``(H, L)`` or ``(2, H, L)``."""
    n = dk.shape[-1]
    if bidirectional:
        return np.stack([dk[:, :L], dk[:, n - L:][:, ::-1]])  # (2, H, L)
    return dk[:, :L].copy()  # (H, L)


def _check_finite(what, **arrays):
    """Raise ValueError if a result computed from finite inputs overflowed (inf / NaN).

    The inputs are validated finite (:func:`refimpl._checks.check_array`); a convolution of
    finite values can still exceed the float64 range (``|u| |K| L`` beyond 1.8e308), and the
    FFT's intermediate sums may overflow even where the exact result would not. A check of
    the result is exact (no false refusal of inputs whose result fits) and costs one pass;
    a bound on the input magnitudes would refuse valid inputs."""
    for name, a in arrays.items():
        if a is not None and not np.all(np.isfinite(a)):
            i = tuple(int(k) for k in np.argwhere(~np.isfinite(a))[0])
            raise ValueError(f"{what} overflows the {a.dtype.name} range: {name}{list(i)} = "
                             f"{a[i]} from finite inputs; scale u, K (or dy) down")


class ConvCache(NamedTuple):
    """What :func:`fftconv_vjp` needs from :func:`fftconv_fwd`: the inputs and their spectra
    (computed once in the forward and reused by the backward, never recomputed)."""
    u: np.ndarray  # (B, H, L)
    K: np.ndarray  # (H, L) or (2, H, L)
    D: Optional[np.ndarray]  # (H,) or None
    kf: Optional[np.ndarray]  # complex (H, n//2+1) spectrum of the circular kernel (FFT form)
    uf: Optional[np.ndarray]  # complex (B, H, n//2+1) spectrum of u (FFT form)
    n: int  # FFT length (fft_length(L)); 0 in the Toeplitz form
    T: Optional[np.ndarray] = None  # (H, L, L) Toeplitz matrices (Toeplitz form), else None


def _spectra(u, K):
    """``(kf, uf, n)``: the spectra of the circular kernel and of ``u`` (checked inputs)."""
    n = fft_length(u.shape[-1])
    kf = _rfft(_circular_kernel(K, n), n)  # (H, n//2+1)
    uf = _rfft(u, n)  # (B, H, n//2+1)
    return kf, uf, n


#: ``(b, h)`` rows per block of the FFT form (at least one batch row): a block is transformed,
#: multiplied and cropped while it is in cache, and the blocks are shared out over
#: :func:`refimpl.threads.run`'s threads. The blocks depend on the shape only.
FFT_BLOCK_ROWS = 256


def _batch_blocks(Bsz, H):
    """Fixed batch ranges ``[(b0, b1)]`` of about :data:`FFT_BLOCK_ROWS` ``(b, h)`` rows each."""
    per = max(1, FFT_BLOCK_ROWS // max(H, 1))
    return [(b, min(Bsz, b + per)) for b in range(0, Bsz, per)]


def _fwd(u, K, D):
    """The forward on checked inputs: ``(y, ConvCache)``; ``y = irfft(rfft(u) kf)`` cropped,
    plus ``D u``, block by block (:func:`_batch_blocks`: each row's transforms and products are
    the same whatever the blocks or threads)."""
    Bsz, H, L = u.shape
    n = fft_length(L)
    kf = _rfft(_circular_kernel(K, n), n)  # (H, n//2+1)
    uf = np.empty((Bsz, H, n // 2 + 1), dtype=kf.dtype)  # (B, H, n//2+1), kept for the VJP
    y = np.empty_like(u)  # (B, H, L)
    Dv, blocks = (np.zeros(H, u.dtype) if D is None else D), _batch_blocks(Bsz, H)

    def run(j0, j1):
        for b0, b1 in blocks[j0:j1]:
            ufb = sfft.rfft(u[b0:b1], n=n, axis=-1, workers=1)  # (b, H, n//2+1)
            uf[b0:b1] = ufb
            ufb *= kf
            _crop_skip_kernel(sfft.irfft(ufb, n=n, axis=-1, workers=1), Dv, u[b0:b1],
                              D is not None, y[b0:b1])
    with np.errstate(over="ignore", invalid="ignore"):
        threads.run(run, len(blocks), Bsz * H * n)
    _check_finite("fftconv", y=y)
    return y, ConvCache(u, K, D, kf, uf, n)


@njit(**config.NJIT_OPTS)
def _crop_skip_kernel(full, D, u, has_D, out):
    """``out = full[..., :L] + D[:, None] u`` (or the crop alone), one pass. Preconditions:
    C-contiguous float64, ``full (B, H, n)`` with ``n >= L``, ``u, out (B, H, L)``, ``D (H,)``;
    ``out`` overwritten."""
    Bsz, H, L = out.shape
    for i in range(Bsz):
        for h in range(H):
            d = D[h]
            for t in range(L):
                if has_D:
                    out[i, h, t] = full[i, h, t] + d * u[i, h, t]
                else:
                    out[i, h, t] = full[i, h, t]


@njit(**config.NJIT_OPTS)
def _spectral_bwd(dyf, kf, uf, duf, dkf):
    """``duf = dyf conj(kf)`` and ``dkf = sum_b dyf conj(uf)`` in one pass over ``dyf``.

    Equivalent to ``duf = dyf * np.conj(kf); dkf = (dyf * np.conj(uf)).sum(0)`` (the same
    complex products, the sum over ``b`` in ``b`` order as NumPy's reduction over the leading
    axis). Preconditions: C-contiguous complex128 (complex64 in the float32 variant), ``dyf, uf,
    duf (B, H, F)``, ``kf, dkf
    (H, F)``; ``duf`` and ``dkf`` overwritten.
    """
    Bsz, H, F = dyf.shape
    for h in range(H):
        for f in range(F):
            dkf[h, f] = dyf[0, h, f] * uf[0, h, f].conjugate()
    for i in range(Bsz):
        for h in range(H):
            for f in range(F):
                d = dyf[i, h, f]
                duf[i, h, f] = d * kf[h, f].conjugate()
                if i > 0:
                    dkf[h, f] += d * uf[i, h, f].conjugate()


def _bwd(c, dy):
    """The backward from a :class:`ConvCache` and a checked ``dy``: ``(du, dK, dD)``."""
    if c.T is not None:
        return _toeplitz_bwd(c, dy)
    u, K, D, kf, uf, n, _ = c
    Bsz, H, L = u.shape
    du = np.empty_like(dy)  # (B, H, L)
    blocks = _batch_blocks(Bsz, H)
    dkf_blocks = np.empty((len(blocks),) + kf.shape, dtype=kf.dtype)  # one partial per block
    Dv = np.zeros(H, u.dtype) if D is None else D

    def run(j0, j1):
        for j in range(j0, j1):
            b0, b1 = blocks[j]
            dyf = sfft.rfft(dy[b0:b1], n=n, axis=-1, workers=1)  # (b, H, n//2+1)
            duf = np.empty_like(dyf)
            _spectral_bwd(dyf, kf, uf[b0:b1], duf, dkf_blocks[j])
            _crop_skip_kernel(sfft.irfft(duf, n=n, axis=-1, workers=1), Dv, dy[b0:b1],
                              D is not None, du[b0:b1])
    with np.errstate(over="ignore", invalid="ignore"):
        threads.run(run, len(blocks), Bsz * H * n)
        dkf = threads.sum_in_order(dkf_blocks)  # (H, n//2+1), the blocks' partials in order
        dk = _irfft(dkf, n)  # (H, n)
        dK = _uncircular_kernel(dk, L, K.ndim == 3)
        dD = None if D is None else np.einsum("bhl,bhl->h", dy, u)  # (H,)
    _check_finite("fftconv_bwd", du=du, dK=dK, dD=dD)
    return du, dK, dD


#: Longest ``L`` for which :func:`conv_fwd` convolves by Toeplitz matrix products (measured
#: crossover with the FFT form on a 2-core machine, issue 13; both forms are exact up to rounding).
TOEPLITZ_MAX_L = 64


@njit(**config.NJIT_OPTS)
def _toeplitz_fill(K0, K1, bidirectional, T, Tt):
    """``T[h, t, s] = K0[h, t-s]`` for ``s <= t``, ``K1[h, s-t-1]`` for ``s > t`` when
    bidirectional, else 0; ``Tt`` its transpose (both C-contiguous, so that every matrix
    product below runs in BLAS). Preconditions: C-contiguous float64, ``K0, K1 (H, L)``,
    ``T, Tt (H, L, L)`` overwritten."""
    H, L, _ = T.shape
    for h in range(H):
        for t in range(L):
            for s in range(L):
                if s <= t:
                    v = K0[h, t - s]
                elif bidirectional:
                    v = K1[h, s - t - 1]
                else:
                    v = 0.0
                T[h, t, s] = v
                Tt[h, s, t] = v


def _toeplitz(K, L):
    """``(T, Tt)``, ``(H, L, L)`` each, with ``y[t] = sum_s T[t, s] u[s]`` (see
    :func:`_toeplitz_fill`)."""
    K0, K1 = (K[0], K[1]) if K.ndim == 3 else (K, K)
    H = K0.shape[0]
    T, Tt = np.empty((H, L, L), K.dtype), np.empty((H, L, L), K.dtype)  # (H, L, L) each
    _toeplitz_fill(np.ascontiguousarray(K0), np.ascontiguousarray(K1), K.ndim == 3, T, Tt)
    return T, Tt


@njit(**config.NJIT_OPTS)
def _diagonal_sums(dT, bidirectional, dK0, dK1):
    """Adjoint of :func:`_toeplitz`: ``dK0[h, j] = sum_t dT[h, t, t-j]``, ``dK1[h, j] =
    sum_t dT[h, t, t+j+1]`` (sums in ``t`` order). Preconditions: C-contiguous float64,
    ``dT (H, L, L)``, ``dK0, dK1 (H, L)`` overwritten (``dK1`` only when bidirectional)."""
    H, L, _ = dT.shape
    for h in range(H):
        for j in range(L):
            acc = 0.0
            for t in range(j, L):
                acc += dT[h, t, t - j]
            dK0[h, j] = acc
            if bidirectional:
                acc = 0.0
                for t in range(L - j - 1):
                    acc += dT[h, t, t + j + 1]
                dK1[h, j] = acc


def _over_channels(fn, u):
    """``fn(h0, h1)`` over channel ranges on :func:`refimpl.threads.run`'s threads: one
    ``(B, L) @ (L, L)`` GEMM per channel whatever the split (BLAS on one thread)."""
    Bsz, H, L = u.shape
    threads.run(fn, H, Bsz * H * L * L // 8)


def _toeplitz_fwd(u, K, D):
    """The Toeplitz form of :func:`_fwd`: one ``(B, L) @ (L, L)`` GEMM per channel."""
    T, Tt = _toeplitz(K, u.shape[-1])  # (H, L, L) each
    uh = u.transpose(1, 0, 2)  # (H, B, L) view, rows contiguous (BLAS reads it as it is)
    with np.errstate(over="ignore", invalid="ignore"):
        yh = np.empty(uh.shape, np.result_type(uh, Tt))  # (H, B, L)
        _over_channels(lambda h0, h1: np.matmul(uh[h0:h1], Tt[h0:h1], out=yh[h0:h1]), u)
        y = np.ascontiguousarray(yh.transpose(1, 0, 2))  # (B, H, L)
        if D is not None:
            y += D[:, None] * u  # (B, H, L)
    _check_finite("conv", y=y)
    return y, ConvCache(u, K, D, None, None, 0, T)  # Tt is not needed by the backward


def _toeplitz_bwd(c, dy):
    """The Toeplitz form of :func:`_bwd`: ``du = dy T``, ``dT = sum_b dy^T u`` folded to ``K``."""
    u, K, D, T = c.u, c.K, c.D, c.T
    H, L = T.shape[0], T.shape[1]
    dyh = dy.transpose(1, 0, 2)  # (H, B, L) view, rows contiguous
    dyt = np.ascontiguousarray(dy.transpose(1, 2, 0))  # (H, L, B): NumPy's stacked matmul
    # calls BLAS only for matrices with contiguous rows, so dy^T is copied once
    with np.errstate(over="ignore", invalid="ignore"):
        duh = np.empty(dyh.shape, np.result_type(dyh, T))  # (H, B, L)
        dT = np.empty(T.shape, np.result_type(dyt, u))  # (H, L, L) = sum_b dy^T u
        uh = u.transpose(1, 0, 2)  # (H, B, L) view

        def channels(h0, h1):
            np.matmul(dyh[h0:h1], T[h0:h1], out=duh[h0:h1])
            np.matmul(dyt[h0:h1], uh[h0:h1], out=dT[h0:h1])
        _over_channels(channels, u)
        du = np.ascontiguousarray(duh.transpose(1, 0, 2))  # (B, H, L)
        dK0, dK1 = np.empty((H, L), dT.dtype), np.empty((H, L), dT.dtype)  # (H, L) each
        _diagonal_sums(dT, K.ndim == 3, dK0, dK1)
        dK = np.stack([dK0, dK1]) if K.ndim == 3 else dK0  # (2, H, L) or (H, L)
        dD = None
        if D is not None:
            du += D[:, None] * dy
            dD = np.einsum("bhl,bhl->h", dy, u)  # (H,)
    _check_finite("conv_bwd", du=du, dK=dK, dD=dD)
    return du, dK, dD


CONV_METHODS = ("auto", "fft", "toeplitz")


def conv_fwd(u, K, D=None, method="auto"):
    """``y = conv(u, K) + D u`` (the map of :func:`fftconv`) and its cache for :func:`conv_vjp`.

    ``method``: ``"fft"`` (:func:`fftconv_fwd`), ``"toeplitz"`` (one ``(B, L) @ (L, L)`` matrix
    product per channel with the Toeplitz matrix of ``K``: ``O(B H L^2)`` work in BLAS, faster
    than the FFTs for short sequences) or ``"auto"``: Toeplitz for ``L <=``
    :data:`TOEPLITZ_MAX_L`, FFT above. Both forms compute the same sums (the Toeplitz form
    sums directly, the more accurate of the two). Returns ``(y (B, H, L), ConvCache)``.
    """
    check_name("method", method, {k: k for k in CONV_METHODS})
    u, K, D = _check_conv(u, K, D)
    if method == "toeplitz" or (method == "auto" and u.shape[-1] <= TOEPLITZ_MAX_L):
        return _toeplitz_fwd(u, K, D)
    return _fwd(u, K, D)


def conv_vjp(cache, dy):
    """VJP of :func:`conv_fwd` from its cache: ``(du, dK, dD)`` in the forward's form."""
    dy = check_array("dy", dy, 3)
    check_shape("dy", dy, cache.u.shape)
    return _bwd(cache, dy)


def fftconv(u, K, D=None):
    """FFT convolution ``y = conv(u, K) + D u``; see the module docstring.

    Parameters
    ----------
    u : float64 (B, H, L)
    K : float64 (H, L) or (2, H, L)
    D : float64 (H,) or None

    Returns
    -------
    y : float64 (B, H, L)
    """
    return fftconv_fwd(u, K, D)[0]


def fftconv_bwd(u, K, D, dy):
    """VJP of :func:`fftconv`: returns ``(du, dK, dD)`` (``dD`` is None when ``D`` is None).

    ``du[s] = sum_t dy[t] k[(t-s) mod n] + D dy[s]`` (a correlation: ``conj`` of the kernel
    spectrum), ``dk[j] = sum_{b,t} dy[t] u[(t-j) mod n]`` folded back to ``K``'s shape,
    ``dD = sum_{b,t} dy u``. All freshly allocated. Recomputes the forward's spectra; a caller
    that ran the forward uses :func:`fftconv_fwd` and :func:`fftconv_vjp` instead (the same
    numbers, two FFTs fewer).
    """
    u, K, D = _check_conv(u, K, D)
    dy = check_array("dy", dy, 3)
    check_shape("dy", dy, u.shape)
    kf, uf, n = _spectra(u, K)
    return _bwd(ConvCache(u, K, D, kf, uf, n), dy)


def fftconv_fwd(u, K, D=None):
    """:func:`fftconv` that also returns the :class:`ConvCache` for :func:`fftconv_vjp`.

    Returns ``(y, cache)``; ``y`` is bit-identical to :func:`fftconv`'s.
    """
    return conv_fwd(u, K, D, method="fft")


def fftconv_vjp(cache, dy):
    """:func:`fftconv_bwd` from the forward's :class:`ConvCache`: the kernel and input spectra
    are reused, not recomputed (one FFT of ``dy`` and two inverse FFTs remain). Bit-identical
    to ``fftconv_bwd(u, K, D, dy)``."""
    return conv_vjp(cache, dy)


@njit(**config.NJIT_OPTS)
def _direct_conv(u, K0, K1, bidirectional, y):
    """``y[b,h,t] = sum_{s<=t} K0[h,t-s] u[b,h,s] (+ sum_{s>t} K1[h,s-t-1] u[b,h,s])``, O(L^2).

    Preconditions: C-contiguous float64, ``u, y (B, H, L)``, ``K0, K1 (H, L)``; ``y`` overwritten.
    """
    Bsz, H, L = u.shape
    for b in range(Bsz):
        for h in range(H):
            for t in range(L):
                acc = 0.0
                for s in range(t + 1):
                    acc += K0[h, t - s] * u[b, h, s]
                if bidirectional:
                    for s in range(t + 1, L):
                        acc += K1[h, s - t - 1] * u[b, h, s]
                y[b, h, t] = acc


def direct_conv(u, K, D=None):
    """The O(L^2) direct form of :func:`fftconv` (same arguments, same result up to rounding)."""
    u, K, D = _check_conv(u, K, D)
    K0, K1 = (K[0], K[1]) if K.ndim == 3 else (K, K)
    y = np.empty_like(u)  # (B, H, L)
    _direct_conv(u, np.ascontiguousarray(K0), np.ascontiguousarray(K1), K.ndim == 3, y)
    with np.errstate(over="ignore", invalid="ignore"):
        if D is not None:
            y += D[:, None] * u
    _check_finite("direct_conv", y=y)
    return y


# ---- the op contract (refimpl.ops) -----------------------------------------------------------


class ConvConfig(NamedTuple):
    """Configuration of the ``fftconv`` op: the form (:data:`CONV_METHODS`; ``"fft"`` is the
    golden suite's)."""
    method: str = "fft"


def _conv_op(inputs, params, cfg=None, state=None):
    cfg = ConvConfig() if cfg is None else cfg
    y, cache = conv_fwd(inputs["u"], params["K"], params.get("D"), method=cfg.method)
    return _ops.Result({"y": y}, cache, None)


def _conv_op_vjp(cache, cotangents):
    du, dK, dD = conv_vjp(cache, _ops.cotangent(cotangents, "y", cache.u))
    return {"u": du, "K": dK} if dD is None else {"u": du, "K": dK, "D": dD}


def conv_depth(inputs, params, cfg):
    """An ``L``-term sum, plus a forward and an inverse FFT; ``dK``/``dD`` sum over ``B L``."""
    Bsz, H, L = inputs["u"].shape
    f = 2 * int(np.ceil(np.log2(fft_length(L))))
    return {"*": L + f, "dK": Bsz * L + f, "dD": Bsz * L + f}


def conv_scales(inputs, params, cfg, cotangents):
    """The magnitudes of the summed terms: the same op on absolute values (no cancellation)."""
    u, K = np.abs(inputs["u"]), np.abs(params["K"])
    D = None if params.get("D") is None else np.abs(params["D"])
    y, cache = conv_fwd(u, K, D, method="toeplitz")
    out = {"y": float(np.max(y))}
    if "y" in cotangents:
        du, dK, dD = conv_vjp(cache, np.abs(cotangents["y"]))
        out.update(du=float(np.max(du)), dK=float(np.max(dK)))
        if dD is not None:
            out["dD"] = float(np.max(dD))
    return out


def conv_examples(rng):
    """Causal with and without ``D``, bidirectional, both forms."""
    out = []
    for method, bi, with_D, L in (("fft", False, True, 12), ("fft", True, True, 9),
                                  ("toeplitz", False, False, 7), ("fft", False, False, 1)):
        K = rng.normal(size=(2, 3, L) if bi else (3, L)) / L
        params = {"K": K, "D": rng.normal(size=3)} if with_D else {"K": K}
        out.append(_ops.Example({"u": rng.normal(size=(2, 3, L))}, params, ConvConfig(method)))
    return out


CONV_OP = _ops.defop(
    name="fftconv", math="y[t] = sum_{s<=t} K0[t-s] u[s] (+ K1 anticausal) + D u[t]",
    inputs=("u",), params=("K", "D"), optional=("D",), outputs=("y",), config=ConvConfig,
    fwd=_conv_op, vjp=_conv_op_vjp, depth=conv_depth, scales=conv_scales,
    examples=conv_examples,
)
