"""Feature mixing and the other layers of a spiking SSM, forward and backward side by side.

DESIGN.md sections 7-8. Sequences are ``(B, H, L)``; per-token vectors run over ``H``.
Every ``*_fwd`` returns ``(out, cache)``; every ``*_bwd(cache, d_out)`` returns the input
gradient first, then one gradient per parameter in argument order, all freshly allocated
(overwrite semantics; callers accumulate where a parameter is shared).

The matrix products are BLAS calls on the ``(B, H, L)`` layout as it is (no transposed copies,
:func:`chanmix`, :func:`chanmix_dW`); the elementwise passes of the GLU and of LayerNorm are
fused into serial Numba kernels (``fastmath`` from :mod:`refimpl.config`, one pass instead of
several NumPy temporaries), each next to its NumPy form in a comment. Large passes run on
``numba.get_num_threads()`` threads over disjoint batch rows (:func:`_over_batch`); sums over
the batch are kept per row and added in row order afterwards (:func:`_sum_rows`), so the
results do not depend on refimpl's thread count. BLAS's own threads: ``dgemm`` (float64) sums
in the same order at any thread count; OpenBLAS's threaded ``sgemm`` does not on every CPU
(one float32 ulp on an AMD EPYC, tests/test_speed_threads.py), so the float32 variant is
reproducible for a given ``OPENBLAS_NUM_THREADS``.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np
from numba import njit
from scipy.special import erf

from . import config
from ._checks import check_array
from .precision import float_dtype


def _check_dtypes(**arrays):
    """Each array's dtype must be the current precision (TypeError naming it, as every op;
    ``None`` entries skipped). No finite-value scan: the layers' inputs come from checked ops,
    and a non-finite result is caught where it is used (the model's next op, the trainer)."""
    for name, a in arrays.items():
        if a is not None:
            check_array(name, a, finite=False)


# --------------------------------------------------------------------------------------------
# Both cores for the elementwise passes, deterministically
# --------------------------------------------------------------------------------------------

#: Elements per pass below which :func:`_over_batch` stays on the calling thread (the thread
#: hand-off costs more than it saves on small arrays).
PARALLEL_MIN_ELEMENTS = 1 << 18

_POOLS = {}  # (pid, threads) -> ThreadPoolExecutor; per process (a forked child starts afresh)


def _over_batch(fn, Bsz, size):
    """Run ``fn(b0, b1)`` over contiguous batch ranges covering ``range(Bsz)``.

    On ``numba.get_num_threads()`` threads (``NUMBA_NUM_THREADS``) when the pass touches at
    least :data:`PARALLEL_MIN_ELEMENTS` elements (``size``), else in one call. ``fn`` must write
    disjoint outputs per batch row (the cached serial kernels release the GIL: ``nogil``), so
    the result is the same for any split.
    """
    n = min(numba.get_num_threads(), Bsz)
    if n <= 1 or size < PARALLEL_MIN_ELEMENTS:
        fn(0, Bsz)
        return
    key = (os.getpid(), n)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(n, thread_name_prefix="refimpl-rows")
    bounds = [Bsz * k // n for k in range(n + 1)]
    for f in [pool.submit(fn, bounds[k], bounds[k + 1]) for k in range(n)]:
        f.result()


@njit(**config.NJIT_OPTS)
def _sum_rows(part, out):
    """``out[j] = sum_i part[i, j]`` in row order, from 0.0 (the order of a serial loop over
    the batch). Preconditions: C-contiguous float64 ``part (B, J)``, ``out (J,)`` overwritten."""
    out[:] = 0.0
    for i in range(part.shape[0]):
        for j in range(part.shape[1]):
            out[j] += part[i, j]


# --------------------------------------------------------------------------------------------
# Linear (1x1 convolution over channels) and token embedding
# --------------------------------------------------------------------------------------------


#: Longest ``L`` for which :func:`chanmix` / :func:`chanmix_dW` run one small GEMM per batch row
#: on the arrays as they are; above it one large GEMM over ``B L`` columns pays for the
#: transposed copies (fewer, larger BLAS calls: fewer thread synchronisations; issue 13).
BATCHED_MAX_L = 256


def chanmix(W, x):
    """``y[b, o, l] = sum_i W[o, i] x[b, i, l]``: x (B, I, L), W (O, I) -> y (B, O, L).

    Equivalent to ``np.einsum("oi,bil->bol", W, x)``. Short sequences (``L <=``
    :data:`BATCHED_MAX_L`): ``np.matmul`` broadcasts ``W`` over the batch, one
    ``(O, I) @ (I, L)`` GEMM per row written straight into ``(B, O, L)`` (5-8x faster than
    the copies of the one-GEMM form at ``L = 40``). Longer: one ``(O, I) @ (I, B L)`` GEMM
    (``tensordot``, with a transposed copy of ``x`` and of the result).
    """
    W = np.ascontiguousarray(W)  # NumPy's stacked matmul calls BLAS only for row-major blocks
    if x.shape[-1] <= BATCHED_MAX_L:
        return np.matmul(W, x)  # (B, O, L)
    return np.ascontiguousarray(np.tensordot(W, x, axes=([1], [1])).transpose(1, 0, 2))


def chanmix_dW(dy, x):
    """``dW[o, i] = sum_{b, l} dy[b, o, l] x[b, i, l]``: dy (B, O, L), x (B, I, L) -> (O, I).

    Equivalent to ``np.tensordot(dy, x, axes=([0, 2], [0, 2]))`` (the form used for
    ``L >`` :data:`BATCHED_MAX_L`). Short sequences: one GEMM ``dy[b] @ x[b].T`` per batch row
    on the arrays as they are (BLAS reads the transposed view), accumulated in batch order.
    Either way the order is fixed: the result does not depend on the thread count.
    """
    if dy.shape[0] == 0:
        return np.zeros((dy.shape[1], x.shape[1]), dtype=dy.dtype)  # (O, I): an empty sum
    if dy.shape[-1] > BATCHED_MAX_L:
        return np.tensordot(dy, x, axes=([0, 2], [0, 2]))  # (O, I)
    dW = dy[0] @ x[0].T  # (O, I)
    tmp = np.empty_like(dW)  # (O, I)
    for b in range(1, dy.shape[0]):
        np.matmul(dy[b], x[b].T, out=tmp)
        dW += tmp
    return dW


def linear_fwd(x, W, b=None):
    """``y[:, o, t] = sum_i W[o, i] x[:, i, t] + b[o]``: x (B, Hin, L) -> (B, Hout, L)."""
    _check_dtypes(x=x, W=W, b=b)
    y = chanmix(W, x)  # (B, Hout, L)
    if b is not None:
        y += b[:, None]
    return y, (x, W, b is not None)


def linear_bwd(cache, dy):
    """Returns ``(dx, dW, db)``; ``db`` is None when the layer has no bias."""
    x, W, has_b = cache
    _check_dtypes(dy=dy)
    dx = chanmix(W.T, dy)  # (B, Hin, L)
    dW = chanmix_dW(dy, x)  # (Hout, Hin) = sum_{b,l} dy x^T
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
    dE = np.zeros((V, dy.shape[1]), dtype=dy.dtype)  # (V, H)
    np.add.at(dE, tokens.ravel(), dy.transpose(0, 2, 1).reshape(-1, dy.shape[1]))
    return None, dE


# --------------------------------------------------------------------------------------------
# Activations and mixing
# --------------------------------------------------------------------------------------------


_SQRT2 = math.sqrt(2.0)  # a Python float: keeps float32 arrays float32

#: Chebyshev coefficients of ``f(u) = erf(sqrt u) / sqrt u`` on ``u`` in ``[0, 16]`` (argument
#: ``u / 8 - 1``), degree 18: ``numpy.polynomial.chebyshev.chebinterpolate`` of ``f`` with
#: ``scipy.special.erf`` (``tests/test_speed_kernels.py`` regenerates them and checks the
#: accuracy). Used by :func:`_erf32`, the float32 variant's erf.
ERF32_CHEB = np.array([
    0.48591295690286307, -0.34540785500494964, 0.16182910121364597, -0.07648275610550885,
    0.03466993680050745, -0.014811864147814725, 0.005922937956232062, -0.0022118406588101966,
    0.0007714154278403952, -0.0002515965878096198, 7.688658221094143e-05,
    -2.206549593889761e-05, 5.961274041306694e-06, -1.5197750687930365e-06,
    3.664930258133397e-07, -8.378986749464708e-08, 1.8200721725080663e-08,
    -3.760101586816757e-09, 7.174542677793196e-10])
#: ``|z|`` beyond which :func:`_erf32` returns ``sign(z)``: ``1 - erf(4) = 1.5e-8`` is below
#: half a float32 ulp of 1 (``6e-8``), so ``erf(z)`` rounds to +-1 in float32 there.
ERF32_CLAMP = 4.0


@njit(**config.NJIT_OPTS)
def _erf32(z, out):
    """``out = erf(z)`` for the float32 variant: ``t f(t^2)`` with ``t = min(|z|, 4)`` and the
    series :data:`ERF32_CHEB` by Clenshaw's recurrence in float64, signed, rounded once to
    ``out``'s float32. Relative error of the float64 value <= 4e-10 (tested), far below
    float32's ``eps / 2 = 6e-8``; a flat loop without calls that the compiler vectorises
    (``scipy.special.erf`` costs about 12 ns per element). Flat C-contiguous ``z``, ``out``."""
    c = ERF32_CHEB
    n = c.size
    for i in range(z.size):
        zi = np.float64(z[i])
        t = min(abs(zi), ERF32_CLAMP)
        x = t * t / 8.0 - 1.0
        b1 = 0.0
        b2 = 0.0
        for k in range(n - 1, 0, -1):
            b0 = 2.0 * x * b1 - b2 + c[k]
            b2 = b1
            b1 = b0
        v = t * (x * b1 - b2 + c[0])
        out[i] = v if zi >= 0.0 else -v


@njit(**config.NJIT_OPTS)
def _gelu_post(x, Phi, y):
    """``Phi = 0.5 (1 + Phi)`` in place (``Phi`` holds ``erf(x / sqrt 2)`` on entry) and
    ``y = x Phi``, one pass over flat C-contiguous float64 arrays; ``y`` overwritten."""
    for i in range(x.size):
        p = 0.5 * (1.0 + Phi[i])
        Phi[i] = p
        y[i] = x[i] * p


@njit(**config.NJIT_OPTS)
def _gelu_bwd_post(x, Phi, e, dy, dx):
    """``dx = dy (Phi + x (e / sqrt(2 pi)))`` with ``e = exp(-x^2 / 2)``, one pass over flat
    C-contiguous float64 arrays; ``dx`` overwritten."""
    c = np.sqrt(2.0 * np.pi)
    for i in range(x.size):
        dx[i] = dy[i] * (Phi[i] + x[i] * (e[i] / c))


def gelu_fwd(x):
    """Exact GELU ``x Phi(x)`` with ``Phi(x) = (1 + erf(x / sqrt 2)) / 2`` (torch ``nn.GELU()``).

    Equivalent to ``Phi = 0.5 * (1.0 + erf(x / np.sqrt(2.0))); y = x * Phi``: the same
    operations, with the elementwise arithmetic after ``erf`` in one pass.
    """
    _check_dtypes(x=x)
    x = np.ascontiguousarray(x)
    z = x / _SQRT2  # (B, H, L)
    if z.dtype == np.float32:  # the float32 variant: erf by _erf32 (out of place: an aliased
        Phi = np.empty_like(z)  # output would keep the compiler from vectorising), both cores
        _over_batch(lambda b0, b1: _erf32(z[b0:b1].reshape(-1), Phi[b0:b1].reshape(-1)),
                    z.shape[0], z.size)
    else:
        Phi = erf(z, out=z)  # (B, H, L), erf(x / sqrt 2) until _gelu_post
    y = np.empty_like(x)  # (B, H, L)
    _gelu_post(x.reshape(-1), Phi.reshape(-1), y.reshape(-1))
    return y, (x, Phi)


def gelu_bwd(cache, dy):
    """``d/dx [x Phi(x)] = Phi(x) + x phi(x)``, ``phi`` the standard normal density.

    Equivalent to ``phi = np.exp(-0.5 * x * x) / np.sqrt(2 pi); dx = dy * (Phi + x * phi)``
    (NumPy's SIMD ``exp``, then one fused pass).
    """
    x, Phi = cache
    _check_dtypes(dy=dy)
    e = -0.5 * x  # (B, H, L)
    e *= x
    np.exp(e, out=e)
    dx = np.empty_like(x)  # (B, H, L)
    _gelu_bwd_post(x.reshape(-1), Phi.reshape(-1), e.reshape(-1),
                   np.ascontiguousarray(dy).reshape(-1), dx.reshape(-1))
    return (dx,)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@njit(**config.NJIT_OPTS)
def _glu_gate_pre(o, b, a, q):
    """``a = o[:, :H] + b[:H]``, ``q = 0.5 (o[:, H:] + b[H:])`` in one pass (the argument of
    the ``tanh`` in :func:`_sigmoid`). Preconditions: float64, ``o (B, 2H, L)`` (any strides:
    a view of a channel-major array too), ``b (2H,)``, ``a, q (B, H, L)`` C-contiguous,
    overwritten."""
    Bsz, H, L = a.shape
    for i in range(Bsz):
        for h in range(H):
            ba, bg = b[h], b[H + h]
            for t in range(L):
                a[i, h, t] = o[i, h, t] + ba
                q[i, h, t] = 0.5 * (o[i, H + h, t] + bg)


@njit(**config.NJIT_OPTS)
def _glu_gate_post(a, g, z):
    """``g = 0.5 (1 + g)`` in place (``g`` holds ``tanh(q)`` on entry) and ``z = a g``.
    Preconditions: C-contiguous float64 ``(B, H, L)``; ``z`` overwritten."""
    Bsz, H, L = a.shape
    for i in range(Bsz):
        for h in range(H):
            for t in range(L):
                gv = 0.5 * (1.0 + g[i, h, t])
                g[i, h, t] = gv
                z[i, h, t] = a[i, h, t] * gv


@njit(**config.NJIT_OPTS)
def _glu_gate_bwd(dz, a, g, do, db):
    """``do = [dz g, dz a g (1 - g)]`` and ``db[b] = sum_t do[b]`` per batch row, in one pass.

    Equivalent to ``do = np.concatenate([dz * g, dz * a * g * (1.0 - g)], axis=1);
    db = do.sum(axis=2)`` (``do`` bit-identical; ``db`` summed in ``t`` order; the caller adds
    the rows with :func:`_sum_rows`). Preconditions: C-contiguous float64 ``dz, a, g
    (B, H, L)``; ``do (B, 2H, L)`` (any strides: a view of a channel-major array too) and
    ``db (B, 2H)`` overwritten.
    """
    Bsz, H, L = a.shape
    for i in range(Bsz):
        for h in range(H):
            sa, sg = 0.0, 0.0
            for t in range(L):
                gv = g[i, h, t]
                da = dz[i, h, t] * gv
                dg = dz[i, h, t] * a[i, h, t] * gv * (1.0 - gv)
                do[i, h, t] = da
                do[i, H + h, t] = dg
                sa += da
                sg += dg
            db[i, h] = sa
            db[i, H + h] = sg


#: GLU sequences ``GLU_BATCHED_MIN_L < L <= BATCHED_MAX_L`` mix with one GEMM per batch row
#: (:func:`chanmix`); shorter and longer ones with one channel-major GEMM (:func:`glu_fwd`).
#: Measured on the 2-core machine (fwd + bwd, float64 / float32): B=64 H=64 L=40: 3.5 / 1.7 ms
#: channel-major vs 4.9 / 2.1 ms per row; L=100-128: equal within 5 %; B=32 H=128 L=256:
#: 33-39 / 19 ms vs 31-40 / 16-18 ms; L=1024: 295 / 183 vs 437 / 245 ms.
GLU_BATCHED_MIN_L = 64


def _channel_major(x):
    """``x (B, C, L)`` as a C-contiguous ``(C, B, L)`` copy: one GEMM operand ``(C, B L)``."""
    return np.ascontiguousarray(x.transpose(1, 0, 2))


def glu_fwd(s, W, b):
    """GLU mixing (SpikingSSM, S4D): ``o = W s + b``, ``z = o[:H] * sigmoid(o[H:])``.

    s (B, H, L), W (2H, H), b (2H,) -> z (B, H, L). The cache is ``(linear cache, a, g)``
    with ``a = o[:H]`` and ``g = sigmoid(o[H:])``, ``(B, H, L)`` each; the linear cache is
    ``(s, W, True)``, or ``(s_cm, W, False)`` with ``s_cm`` the channel-major copy ``(H, B, L)``
    for long sequences.

    Short and long sequences (outside ``(GLU_BATCHED_MIN_L, BATCHED_MAX_L]``, see
    :data:`GLU_BATCHED_MIN_L`): one ``(2H, H) @ (H, B L)`` GEMM on a channel-major copy of
    ``s`` (kept for the backward's ``dW``), whose output the gate reads in place through a
    ``(B, 2H, L)`` view (rows over ``t`` stay contiguous): one transposed copy instead of
    :func:`chanmix`'s two for long rows, one GEMM instead of ``B`` small ones for short rows,
    and no copy in the backward's ``dW``.
    """
    _check_dtypes(s=s, W=W, b=b)
    Bsz, H, L = s.shape
    if GLU_BATCHED_MIN_L < L <= BATCHED_MAX_L:
        o = chanmix(W, s)  # (B, 2H, L), without the bias (added in the gate's first pass)
        a, g, z = _glu_gate(o, b)  # (B, H, L) each
        return z, ((s, W, True), a, g)
    s_cm = _channel_major(s)  # (H, B, L)
    o = (np.ascontiguousarray(W) @ s_cm.reshape(H, Bsz * L)).reshape(2 * H, Bsz, L)
    a, g, z = _glu_gate(o.transpose(1, 0, 2), b)  # (B, 2H, L) view of (2H, B, L)
    return z, ((s_cm, W, False), a, g)


def _glu_gate(o, b):
    """``(a, g, z)`` from ``o = W s`` without the bias: ``(B, H, L)`` each.

    Equivalent to ``o += b[:, None]; a, g = o[:, :H], _sigmoid(o[:, H:]); z = a * g``: the same
    operations in the same order, with NumPy's (SIMD) ``tanh`` in the middle (several times
    faster than a libm call per element in a Numba loop) and two fused passes around it.
    """
    Bsz, H2, L = o.shape
    a, g, z = (np.empty((Bsz, H2 // 2, L), dtype=o.dtype) for _ in range(3))  # (B, H, L) each
    b = np.ascontiguousarray(b)

    def rows(b0, b1):
        _glu_gate_pre(o[b0:b1], b, a[b0:b1], g[b0:b1])
        np.tanh(g[b0:b1], out=g[b0:b1])
        _glu_gate_post(a[b0:b1], g[b0:b1], z[b0:b1])
    _over_batch(rows, Bsz, o.size)
    return a, g, z


def glu_bwd(cache, dz):
    """Returns ``(ds, dW, db)``: ``da = dz g``, ``dg_pre = dz a g (1 - g)``.

    A channel-major cache (short and long sequences, see :func:`glu_fwd`): ``do`` is written
    channel-major ``(2H, B, L)`` through a view, so ``dW = do s^T`` is one GEMM on the two
    channel-major arrays and ``ds = W^T do`` one GEMM plus the transposed copy back to
    ``(B, H, L)``.
    """
    (s, W, batch_major), a, g = cache
    _check_dtypes(dz=dz)
    Bsz, H, L = a.shape
    do_cm = None
    if batch_major:
        do = np.empty((Bsz, 2 * H, L), dtype=a.dtype)  # (B, 2H, L)
    else:
        do_cm = np.empty((2 * H, Bsz, L), dtype=a.dtype)  # (2H, B, L)
        do = do_cm.transpose(1, 0, 2)  # (B, 2H, L) view
    db_rows, db = np.empty((Bsz, 2 * H), a.dtype), np.empty(2 * H, a.dtype)  # (B, 2H), (2H,)
    dz = np.ascontiguousarray(dz)
    _over_batch(lambda b0, b1: _glu_gate_bwd(dz[b0:b1], a[b0:b1], g[b0:b1], do[b0:b1],
                                             db_rows[b0:b1]), Bsz, do.size)
    _sum_rows(db_rows, db)
    if batch_major:
        return chanmix(W.T, do), chanmix_dW(do, s), db
    do2 = do_cm.reshape(2 * H, Bsz * L)  # (2H, B L)
    dW = do2 @ s.reshape(H, Bsz * L).T  # (2H, H)
    ds = (np.ascontiguousarray(W.T) @ do2).reshape(H, Bsz, L).transpose(1, 0, 2)  # (B, H, L)
    return np.ascontiguousarray(ds), dW, db


#: The GSU quantiser's ratio (DESIGN.md section 7): ``Ter(v)`` keeps ``|v| >= 0.15 max|v|``.
TERNARY_RATIO = 0.15


def ternary(v, axis=None, ratio=TERNARY_RATIO):
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
    _check_dtypes(x=x, W=W, b=b, c=c, Tx=Tx, TW=TW)
    Tx = ternary(x, axis=1) if Tx is None else Tx  # (B, H, L), max over channels per token
    TW = ternary(W) if TW is None else TW  # (H, H), max over the matrix
    P = chanmix(W.T, Tx) + b[:, None]  # (B, H, L): P[:, j] = sum_i Tx[:, i] W[i, j]
    Q = chanmix(TW.T, x) + c[:, None]  # (B, H, L)
    return P * Q, GSUCache(Tx, TW, P, Q)


def gsu_bwd(cache, dz):
    """Returns ``(dx, dW, db, dc)``. ``Ter`` passes no gradient **[choice]**: ``dx`` flows only
    through ``Q = x Ter(W) + c`` and ``dW`` only through ``P = Ter(x) W + b``."""
    Tx, TW, P, Q = cache
    _check_dtypes(dz=dz)
    dP, dQ = dz * Q, dz * P  # (B, H, L) each
    dW = chanmix_dW(Tx, dP)  # (H, H) = sum_{b,l} Tx dP^T
    db = dP.sum(axis=(0, 2))  # (H,)
    dx = chanmix(TW, dQ)  # (B, H, L)
    dc = dQ.sum(axis=(0, 2))  # (H,)
    return dx, dW, db, dc


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


@njit(**config.NJIT_OPTS)
def _layernorm_fwd(x, gamma, beta, eps, y, xh, rstd):
    """LayerNorm over ``h`` per ``(b, t)``, one token row of sums at a time.

    Equivalent to ``mu = x.mean(1); xc = x - mu; rstd = 1 / sqrt((xc * xc).mean(1) + eps);
    xh = xc rstd; y = xh gamma + beta`` (the sums over ``h`` run in ``h`` order, as NumPy's
    reduction over a strided axis does). Preconditions: C-contiguous float64, ``x, y, xh
    (B, H, L)``, ``gamma, beta (H,)``, ``rstd (B, 1, L)``; ``y, xh, rstd`` overwritten.
    """
    Bsz, H, L = x.shape
    mu = np.empty(L)  # (L,)
    var = np.empty(L)  # (L,)
    for i in range(Bsz):
        mu[:] = 0.0
        for h in range(H):
            for t in range(L):
                mu[t] += x[i, h, t]
        for t in range(L):
            mu[t] = mu[t] / H
        var[:] = 0.0
        for h in range(H):
            for t in range(L):
                d = x[i, h, t] - mu[t]
                var[t] += d * d
        for t in range(L):
            rstd[i, 0, t] = 1.0 / np.sqrt(var[t] / H + eps)
        for h in range(H):
            gh, bh = gamma[h], beta[h]
            for t in range(L):
                v = (x[i, h, t] - mu[t]) * rstd[i, 0, t]
                xh[i, h, t] = v
                y[i, h, t] = v * gh + bh


@njit(**config.NJIT_OPTS)
def _layernorm_bwd(xh, rstd, gamma, dy, dx, dgamma, dbeta):
    """Backward of :func:`_layernorm_fwd`, one token row of sums at a time.

    Equivalent to ``g = dy gamma; dx = rstd (g - g.mean(1) - xh (g xh).mean(1));
    dgamma = (dy xh).sum(2); dbeta = dy.sum(2)`` (means over ``h`` in ``h`` order, the
    parameter sums per batch row in ``t`` order; the caller adds the rows with
    :func:`_sum_rows`). Preconditions: C-contiguous float64, ``xh, dy, dx (B, H, L)``,
    ``rstd (B, 1, L)``, ``gamma (H,)``; ``dx``, ``dgamma, dbeta (B, H)`` overwritten.
    """
    Bsz, H, L = xh.shape
    m1 = np.empty(L)  # (L,) mean over h of g
    m2 = np.empty(L)  # (L,) mean over h of g xh
    for i in range(Bsz):
        m1[:] = 0.0
        m2[:] = 0.0
        for h in range(H):
            gh = gamma[h]
            sg, sb = 0.0, 0.0
            for t in range(L):
                g = dy[i, h, t] * gh
                m1[t] += g
                m2[t] += g * xh[i, h, t]
                sg += dy[i, h, t] * xh[i, h, t]
                sb += dy[i, h, t]
            dgamma[i, h] = sg
            dbeta[i, h] = sb
        for t in range(L):
            m1[t] = m1[t] / H
            m2[t] = m2[t] / H
        for h in range(H):
            gh = gamma[h]
            for t in range(L):
                g = dy[i, h, t] * gh
                dx[i, h, t] = rstd[i, 0, t] * (g - m1[t] - xh[i, h, t] * m2[t])


def layernorm_fwd(x, gamma, beta, eps=1e-5):
    """LayerNorm over channels per token: x (B, H, L), gamma, beta (H,).

    The cache is ``(xh (B, H, L), rstd (B, 1, L), gamma)``.
    """
    _check_dtypes(x=x, gamma=gamma, beta=beta)
    x = np.ascontiguousarray(x)
    y, xh = np.empty_like(x), np.empty_like(x)  # (B, H, L) each
    rstd = np.empty((x.shape[0], 1, x.shape[2]), dtype=x.dtype)  # (B, 1, L)
    gamma, beta, eps = np.ascontiguousarray(gamma), np.ascontiguousarray(beta), float(eps)
    _over_batch(lambda b0, b1: _layernorm_fwd(x[b0:b1], gamma, beta, eps, y[b0:b1], xh[b0:b1],
                                              rstd[b0:b1]), x.shape[0], x.size)
    return y, (xh, rstd, gamma)


def layernorm_bwd(cache, dy):
    """Returns ``(dx, dgamma, dbeta)``: ``dx = rstd (g - mean(g) - xh mean(g xh))``,
    ``g = dy gamma``."""
    xh, rstd, gamma = cache
    _check_dtypes(dy=dy)
    Bsz, H, _ = xh.shape
    dx = np.empty_like(xh)  # (B, H, L)
    dg_rows, db_rows = np.empty((Bsz, H), xh.dtype), np.empty((Bsz, H), xh.dtype)  # per row
    dy = np.ascontiguousarray(dy)
    _over_batch(lambda b0, b1: _layernorm_bwd(xh[b0:b1], rstd[b0:b1], gamma, dy[b0:b1],
                                              dx[b0:b1], dg_rows[b0:b1], db_rows[b0:b1]),
                Bsz, xh.size)
    dgamma, dbeta = np.empty(H, xh.dtype), np.empty(H, xh.dtype)  # (H,) each
    _sum_rows(dg_rows, dgamma)
    _sum_rows(db_rows, dbeta)
    return dx, dgamma, dbeta


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
    _check_dtypes(x=x, gamma=gamma, beta=beta, running_mean=running_mean,
                  running_var=running_var)
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
    _check_dtypes(dy=dy)
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
    """One mask per (batch, channel), shared over time: (B, H, 1) of 0 or 1/(1-p), in the
    current precision (:func:`refimpl.precision.float_dtype`; the draws do not depend on it)."""
    if p <= 0.0:
        return None
    keep = rng.random(shape[:2] + (1,)) >= p  # (B, H, 1)
    return (keep / (1.0 - p)).astype(float_dtype(), copy=False)


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
