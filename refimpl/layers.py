"""Feature mixing and the other layers of a spiking SSM, forward and backward side by side.

DESIGN.md sections 7-8. Sequences are ``(B, H, L)``; per-token vectors run over ``H``.
Every ``*_fwd`` returns ``(out, cache)``; every ``*_bwd(cache, d_out)`` returns the input
gradient first, then one gradient per parameter in argument order, all freshly allocated
(overwrite semantics; callers accumulate where a parameter is shared).

The matrix products are BLAS calls on the ``(B, H, L)`` layout as it is (no transposed copies,
:func:`chanmix`, :func:`chanmix_dW`); the elementwise passes of the GLU and of LayerNorm are
fused into serial Numba kernels (``fastmath`` from :mod:`refimpl.config`, one pass instead of
several NumPy temporaries), each next to its NumPy form in a comment. Large passes run on
threads over disjoint batch rows (:func:`_over_batch`, :mod:`refimpl.threads`); sums over
the batch are kept per row and added in row order afterwards (:func:`_sum_rows`), so the
results do not depend on refimpl's thread count. BLAS runs on one thread inside refimpl
(:func:`refimpl.threads.owned`) and every GEMM is split into calls whose shapes depend on the
arrays only (one per batch row, or fixed column blocks: :func:`_column_blocks`): OpenBLAS's own
threaded ``sgemm`` summed in another order than its single-threaded one (one float32 ulp on an
AMD EPYC), so the float32 variant too is bit-identical at any thread count.
"""
import math
from typing import NamedTuple

import numpy as np
from numba import njit
from scipy.special import erf

from . import config
from . import ops as _ops
from . import threads
from ._checks import check_array, check_real, check_shape
from .precision import float_dtype


def _check_dtypes(ndim=None, **arrays):
    """Each array's dtype must be the current precision (TypeError naming it, as every op;
    ``None`` entries skipped) and, for the names in ``ndim`` (``{name: rank}``), its rank
    (ValueError). No finite-value scan: the layers' inputs come from checked ops, and a
    non-finite result is caught where it is used (the model's next op, the trainer). The
    shapes are checked by each layer (O(1); the Numba kernels read without bounds checks)."""
    ndim = ndim or {}
    for name, a in arrays.items():
        if a is not None:
            check_array(name, a, ndim.get(name), finite=False)


def _check_rank(name, a, ndim):
    """``a``'s rank only (an op whose ``*_fwd`` checks the dtype and takes any rank): the
    message of :func:`refimpl._checks.check_array`'s."""
    if isinstance(a, np.ndarray) and a.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {a.shape} (rank {a.ndim})")


def _check_shape(name, a, shape, axes):
    """:func:`refimpl._checks.check_shape` (``None`` matches any size), its message naming the
    axes too: ``b must have shape (2H,) = (8,), got (9,)``."""
    if a.shape == shape:  # the common case, without the helper's loop
        return
    try:
        check_shape(name, a, shape)
    except ValueError:
        want = ", ".join("*" if n is None else str(n) for n in shape)
        raise ValueError(f"{name} must have shape {axes} = ({want}{',' * (len(shape) == 1)}), "
                         f"got {a.shape}") from None


def _check_cotangent(name, d, shape):
    """A cotangent's dtype and shape (the backward kernels read it without bounds checks)."""
    _check_dtypes(**{name: d})
    _check_shape(name, d, shape, "(B, H, L)")


# --------------------------------------------------------------------------------------------
# The cores for the large passes, deterministically (refimpl.threads)
# --------------------------------------------------------------------------------------------

#: Elements per pass below which a pass stays on the calling thread (the thread hand-off costs
#: more than it saves on small arrays): :data:`refimpl.threads.MIN_ELEMENTS`.
PARALLEL_MIN_ELEMENTS = threads.MIN_ELEMENTS


def _over_batch(fn, Bsz, size):
    """Run ``fn(b0, b1)`` over contiguous batch ranges covering ``range(Bsz)``:
    :func:`refimpl.threads.run` when the pass touches at least :data:`PARALLEL_MIN_ELEMENTS`
    elements (``size``), else one call. ``fn`` must write disjoint outputs per batch row (the
    cached serial kernels release the GIL: ``nogil``; so does BLAS), so the result is the same
    for any split."""
    threads.run(fn, Bsz, None if size >= PARALLEL_MIN_ELEMENTS else 0)


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


def chanmix(W, x):
    """``y[b, o, l] = sum_i W[o, i] x[b, i, l]``: x (B, I, L), W (O, I) -> y (B, O, L).

    Equivalent to ``np.einsum("oi,bil->bol", W, x)``: one ``(O, I) @ (I, L)`` GEMM per batch
    row (``np.matmul`` broadcasting ``W``), written straight into ``(B, O, L)`` with no
    transposed copies, the rows split over :func:`refimpl.threads.run`'s threads and BLAS on
    one thread: every row is the same GEMM whatever the split, so the result does not depend on
    the thread count (issue 25; one large threaded GEMM did, in float32, and its threads spun
    against refimpl's).
    """
    W = np.ascontiguousarray(W)  # NumPy's stacked matmul calls BLAS only for row-major blocks
    Bsz, _, L = x.shape
    y = np.empty((Bsz, W.shape[0], L), dtype=np.result_type(W, x))  # (B, O, L)
    _over_batch(lambda b0, b1: np.matmul(W, x[b0:b1], out=y[b0:b1]), Bsz,
                W.shape[0] * W.shape[1] * L * Bsz // 8)
    return y


def chanmix_dW(dy, x):
    """``dW[o, i] = sum_{b, l} dy[b, o, l] x[b, i, l]``: dy (B, O, L), x (B, I, L) -> (O, I).

    Equivalent to ``np.tensordot(dy, x, axes=([0, 2], [0, 2]))``: one GEMM ``dy[b] @ x[b].T``
    per batch row on the arrays as they are (BLAS reads the transposed view; the rows split
    over threads as in :func:`chanmix`), added in batch order. The order is fixed: the result
    does not depend on the thread count.
    """
    Bsz, O, L = dy.shape
    I = x.shape[1]
    if Bsz == 0:
        return np.zeros((O, I), dtype=dy.dtype)  # (O, I): an empty sum
    part = np.empty((Bsz, O, I), dtype=np.result_type(dy, x))  # (B, O, I) one GEMM per row
    _over_batch(lambda b0, b1: np.matmul(dy[b0:b1], x[b0:b1].transpose(0, 2, 1),
                                         out=part[b0:b1]), Bsz, O * I * L * Bsz // 8)
    return threads.sum_in_order(part)  # (O, I)


def linear_fwd(x, W, b=None):
    """``y[:, o, t] = sum_i W[o, i] x[:, i, t] + b[o]``: x (B, Hin, L) -> (B, Hout, L)."""
    _check_dtypes(x=x, W=W, b=b, ndim={"x": 3, "W": 2, "b": 1})
    _check_shape("W", W, (None, x.shape[1]), "(Hout, Hin)")
    if b is not None:
        _check_shape("b", b, (W.shape[0],), "(Hout,)")
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
    _embedding_scatter(tokens, np.ascontiguousarray(dy), dE)  # np.add.at, in its order
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
    _check_cotangent("dy", dy, x.shape)
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


#: Longest ``L`` for which :func:`glu_fwd` mixes with one GEMM per batch row (:func:`chanmix`);
#: above it one channel-major GEMM pays for its transposed copy.
BATCHED_MAX_L = 256

#: GLU sequences ``GLU_BATCHED_MIN_L < L <= BATCHED_MAX_L`` mix with one GEMM per batch row
#: (:func:`chanmix`); shorter and longer ones with one channel-major GEMM (:func:`glu_fwd`).
#: Measured on the 2-core machine (fwd + bwd, float64 / float32): B=64 H=64 L=40: 3.5 / 1.7 ms
#: channel-major vs 4.9 / 2.1 ms per row; L=100-128: equal within 5 %; B=32 H=128 L=256:
#: 33-39 / 19 ms vs 31-40 / 16-18 ms; L=1024: 295 / 183 vs 437 / 245 ms.
GLU_BATCHED_MIN_L = 64


#: Columns per block of :func:`_gemm_columns` (at least; the blocks depend on the shape only).
GEMM_BLOCK_COLUMNS = 256


def _column_blocks(n):
    """Fixed column blocks ``[(c0, c1)]`` of an ``n``-column GEMM: at most 8, each at least
    :data:`GEMM_BLOCK_COLUMNS` wide (one block below that). They depend on ``n`` only, never on
    the thread count: each block is the same BLAS call however the blocks are shared out."""
    k = max(1, min(8, n // GEMM_BLOCK_COLUMNS))
    return [(n * j // k, n * (j + 1) // k) for j in range(k)]


def _gemm_columns(A, X):
    """``A (M, K) @ X (K, N)`` in the fixed column blocks of :func:`_column_blocks`, shared out
    over :func:`refimpl.threads.run`'s threads (BLAS on one thread)."""
    out = np.empty((A.shape[0], X.shape[1]), dtype=np.result_type(A, X))  # (M, N)
    blocks = _column_blocks(X.shape[1])

    def run(j0, j1):
        for c0, c1 in blocks[j0:j1]:
            np.matmul(A, X[:, c0:c1], out=out[:, c0:c1])
    threads.run(run, len(blocks), A.shape[0] * X.size // 8)
    return out


def _gemm_columns_dW(D, X):
    """``D (M, N) @ X (K, N)^T`` summed over the fixed column blocks of :func:`_column_blocks`
    in block order (one partial product per block; shared out as :func:`_gemm_columns`)."""
    blocks = _column_blocks(D.shape[1])
    part = np.empty((len(blocks), D.shape[0], X.shape[0]), np.result_type(D, X))  # (k, M, K)

    def run(j0, j1):
        for j in range(j0, j1):
            c0, c1 = blocks[j]
            np.matmul(D[:, c0:c1], X[:, c0:c1].T, out=part[j])
    threads.run(run, len(blocks), D.shape[0] * X.size // 8)
    return threads.sum_in_order(part)  # (M, K)


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
    _check_dtypes(s=s, W=W, b=b, ndim={"s": 3, "W": 2, "b": 1})
    Bsz, H, L = s.shape
    _check_shape("W", W, (2 * H, H), "(2H, H)")
    _check_shape("b", b, (2 * H,), "(2H,)")  # the gate kernel reads b[H + h] for every h < H
    if GLU_BATCHED_MIN_L < L <= BATCHED_MAX_L:
        o = chanmix(W, s)  # (B, 2H, L), without the bias (added in the gate's first pass)
        a, g, z = _glu_gate(o, b)  # (B, H, L) each
        return z, ((s, W, True), a, g)
    s_cm = _channel_major(s)  # (H, B, L)
    o = _gemm_columns(np.ascontiguousarray(W), s_cm.reshape(H, Bsz * L)).reshape(2 * H, Bsz, L)
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
    _check_cotangent("dz", dz, a.shape)
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
    dW = _gemm_columns_dW(do2, s.reshape(H, Bsz * L))  # (2H, H)
    ds = _gemm_columns(np.ascontiguousarray(W.T), do2).reshape(H, Bsz, L).transpose(1, 0, 2)
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
    _check_dtypes(x=x, W=W, b=b, c=c, Tx=Tx, TW=TW, ndim={"x": 3})
    H = x.shape[1]
    for name, a, shape, axes in (("W", W, (H, H), "(H, H)"), ("b", b, (H,), "(H,)"),
                                 ("c", c, (H,), "(H,)"), ("Tx", Tx, x.shape, "(B, H, L)"),
                                 ("TW", TW, (H, H), "(H, H)")):
        if a is not None:
            _check_shape(name, a, shape, axes)
    Tx = ternary(x, axis=1) if Tx is None else Tx  # (B, H, L), max over channels per token
    TW = ternary(W) if TW is None else TW  # (H, H), max over the matrix
    P = chanmix(W.T, Tx) + b[:, None]  # (B, H, L): P[:, j] = sum_i Tx[:, i] W[i, j]
    Q = chanmix(TW.T, x) + c[:, None]  # (B, H, L)
    return P * Q, GSUCache(Tx, TW, P, Q)


def gsu_bwd(cache, dz):
    """Returns ``(dx, dW, db, dc)``. ``Ter`` passes no gradient **[choice]**: ``dx`` flows only
    through ``Q = x Ter(W) + c`` and ``dW`` only through ``P = Ter(x) W + b``."""
    Tx, TW, P, Q = cache
    _check_cotangent("dz", dz, P.shape)
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

    The cache is ``(xh (B, H, L), rstd (B, 1, L), gamma)``. ``eps > 0`` (0 would divide by
    zero on a constant token).
    """
    _check_dtypes(x=x, gamma=gamma, beta=beta, ndim={"x": 3})
    _check_shape("gamma", gamma, (x.shape[1],), "(H,)")  # the kernel reads gamma[h], beta[h]
    _check_shape("beta", beta, (x.shape[1],), "(H,)")
    check_real("eps", eps, lo=0.0, lo_open=True)
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
    _check_cotangent("dy", dy, xh.shape)
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
    H = x.shape[channel_axis]
    for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_shape(name, a, (H,), "(H,)")
    check_real("momentum", momentum, 0.0, 1.0)
    check_real("eps", eps, lo=0.0, lo_open=True)
    if H and running_var.min() < 0:  # O(H): a variance, read as such in eval mode
        c = int(running_var.argmin())
        raise ValueError(f"running_var must be >= 0 (a variance), got {running_var[c]} at "
                         f"channel {c}")
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
    """Mean cross-entropy: logits (B, C), labels int64 (B,) in ``[0, C)`` -> scalar loss, cache.

    The shapes and the label range are checked (O(B); a label out of range would index another
    row's logit, or wrap: -1 the last class); not the dtypes (the callers' evaluation loops
    pass the model's float32 logits outside ``precision.using``; the op checks them)."""
    if np.ndim(logits) != 2:
        raise ValueError(f"logits must have rank 2 (B, C), got shape {np.shape(logits)}")
    Bsz, C = logits.shape
    labels = np.asarray(labels)
    if labels.shape != (Bsz,):
        raise ValueError(f"labels must have shape ({Bsz},) (one per row of logits), got "
                         f"{labels.shape}")
    if Bsz and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"labels must lie in [0, {C}) (C = logits.shape[1]), got range "
                         f"[{labels.min()}, {labels.max()}]")
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


def _next_token_ce(z, tokens, scale, d, loss_rows):
    """Next-token cross-entropy of the rows ``z[b]`` (L, V), forward and backward:
    ``loss_rows[b] = sum_{t < L-1} (lse(z[b, t]) - z[b, t, tokens[b, t+1]])`` and
    ``d[b, t] = (softmax(z[b, t]) - onehot) * scale`` (``d[b, L-1] = 0``: no target).

    The operations of :func:`cross_entropy_fwd` / :func:`cross_entropy_bwd` (max subtracted,
    NumPy's SIMD ``exp``, ``d = exp(z - m) / sum``) on the rows in place, without their copy of
    the first ``L - 1`` positions, the log-probabilities array or the one-hot pass.
    ``z, d (B, L, V)``, ``tokens (B, L)`` in ``[0, V)``, ``loss_rows (B,)`` float64."""
    zt, dt = z[:, :-1], d[:, :-1]  # (B, L-1, V) views: positions with a target
    m = zt.max(axis=2, keepdims=True)  # (B, L-1, 1)
    np.subtract(zt, m, out=dt)
    np.exp(dt, out=dt)
    tot = dt.sum(axis=2, keepdims=True)  # (B, L-1, 1)
    dt *= scale / tot
    y = tokens[:, 1:, None]  # (B, L-1, 1) targets
    zy = np.take_along_axis(zt, y, axis=2)  # (B, L-1, 1)
    dy = np.take_along_axis(dt, y, axis=2) - np.asarray(scale, d.dtype)
    np.put_along_axis(dt, y, dy, axis=2)
    d[:, -1] = 0.0
    lse = (m + np.log(tot)).astype(np.float64)  # (B, L-1, 1)
    loss_rows[:] = (lse - zy)[:, :, 0].sum(axis=1)  # per row over t: the same at any split


def next_token_cross_entropy(logits, tokens):
    """A language model's loss and its gradient in one pass: ``(loss, dlogits (B, L, V))``.

    ``loss = mean_{b, t < L-1} CE(logits[b, t], tokens[b, t+1])`` (nats), ``dlogits[:, L-1] =
    0`` (no target after the last token). Rows of the batch on :func:`_over_batch`'s threads,
    their sums added in row order (the same result at any thread count). ``logits`` of the
    current precision, ``tokens`` int64 in ``[0, V)`` (checked)."""
    _check_dtypes(logits=logits, ndim={"logits": 3})
    Bsz, L, V = logits.shape
    if not isinstance(tokens, np.ndarray) or tokens.dtype != np.int64:
        raise TypeError(f"tokens must be an int64 array (B, L), got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tokens.shape != (Bsz, L) or L < 2:
        raise ValueError(f"tokens must have shape (B, L) = {(Bsz, L)} with L >= 2 (logits "
                         f"{logits.shape}), got {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"tokens must lie in [0, {V}) (V = logits.shape[2]), got range "
                         f"[{tokens.min()}, {tokens.max()}]")
    z = np.ascontiguousarray(logits)
    tokens = np.ascontiguousarray(tokens)
    d = np.empty_like(z)  # (B, L, V)
    loss_rows = np.empty(Bsz)  # (B,) float64
    scale = 1.0 / (Bsz * (L - 1))
    _over_batch(lambda b0, b1: _next_token_ce(z[b0:b1], tokens[b0:b1], scale, d[b0:b1],
                                              loss_rows[b0:b1]), Bsz, 4 * z.size)
    loss = 0.0
    for b in range(Bsz):  # in row order
        loss += loss_rows[b]
    return loss * scale, d


@njit(**config.NJIT_OPTS)
def _embedding_scatter(tokens, dy, dE):
    """``dE[tokens[b, t]] += dy[b, :, t]`` in ``(b, t)`` order (``np.add.at``'s order).
    Preconditions: ``tokens (B, L)`` in range, ``dy (B, H, L)``, ``dE (V, H)`` zeroed."""
    Bsz, H, L = dy.shape
    for b in range(Bsz):
        for t in range(L):
            row = tokens[b, t]
            for h in range(H):
                dE[row, h] += dy[b, h, t]


# --------------------------------------------------------------------------------------------
# The op contract (refimpl.ops, DESIGN.md section 12)
# --------------------------------------------------------------------------------------------
#
# One op per layer above, entered as ``op.fwd(inputs, params, cfg) -> Result`` and
# ``op.vjp(cache, cotangents) -> {name: gradient}``. Each wraps the layer's ``*_fwd`` /
# ``*_bwd`` unchanged: the positional caches those return are kept in named records here and
# rebuilt inside the op's own VJP (only this module reads them). The ``depth`` of each op is
# its longest chain of dependent roundings (the ``gamma_n`` model of DESIGN.md section 9; a sum
# of ``n`` terms counts ``n``), with the reason next to each number; tests/test_float32.py
# derives the per-element float32 bounds these chains summarise. Where a result can be far
# smaller than its terms (the norms' ``dx``, cross-entropy near a confident fit) ``scales``
# gives the terms' magnitude (the abs analogue) for the bound in place of ``max |T|``.


def _fresh(a):
    """A copy of ``a``: the contract's outputs and gradients never alias its arguments."""
    return np.array(a, copy=True)


def _check_integer(name, a):
    """Integer labels or tokens (the wrappers below; the kernels do not check)."""
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iu":
        dtype = getattr(a, "dtype", type(a).__name__)
        raise TypeError(f"{name} must be an integer numpy.ndarray, got {dtype}; "
                        f"pass {name}.astype(np.int64)")


# ---- linear ----------------------------------------------------------------------------------


class LinearCache(NamedTuple):
    """What the linear op's VJP reads (:data:`LINEAR_OP`)."""
    x: np.ndarray  # (B, Hin, L) the input
    W: np.ndarray  # (Hout, Hin)
    has_b: bool  # whether a bias was given (then ``db`` is returned)


def _linear_op(inputs, params, cfg=None, state=None):
    y, (x, W, has_b) = linear_fwd(inputs["x"], params["W"], params.get("b"))
    return _ops.Result({"y": y}, LinearCache(x, W, has_b), None)


def _linear_op_vjp(cache, cotangents):
    dy = _ops.cotangent(cotangents, "y", np.empty((cache.x.shape[0], cache.W.shape[0],
                                                   cache.x.shape[2]), cache.x.dtype))
    dx, dW, db = linear_bwd((cache.x, cache.W, cache.has_b), dy)
    return {"x": dx, "W": dW, **({"b": db} if cache.has_b else {})}


def linear_depth(inputs, params, cfg):
    """``y``: a dot product of ``Hin`` terms plus the bias (``Hin + 1``); ``dx = W^T dy`` sums
    ``Hout`` terms; ``dW`` and ``db`` sum ``B L`` (batch and time)."""
    Bsz, Hin, L = inputs["x"].shape
    Hout = params["W"].shape[0]
    return {"*": Hin + 1, "y": Hin + 1, "dx": Hout, "dW": Bsz * L, "db": Bsz * L}


def linear_examples(rng):
    """With a bias, without one (``db`` absent), ``Hout < Hin`` and ``L = 1``."""
    return [_ops.Example({"x": rng.normal(size=(2, 3, 5))},
                         {"W": rng.normal(size=(4, 3)), "b": rng.normal(size=4)}),
            _ops.Example({"x": rng.normal(size=(3, 4, 6))}, {"W": rng.normal(size=(2, 4))}),
            _ops.Example({"x": rng.normal(size=(2, 5, 1))},
                         {"W": rng.normal(size=(3, 5)), "b": rng.normal(size=3)})]


LINEAR_OP = _ops.defop(
    name="linear", math="y[:, o, t] = sum_i W[o, i] x[:, i, t] + b[o]",
    inputs=("x",), params=("W", "b"), optional=("b",), outputs=("y",),
    fwd=_linear_op, vjp=_linear_op_vjp, depth=linear_depth, examples=linear_examples,
)


# ---- embedding -------------------------------------------------------------------------------


class EmbeddingCache(NamedTuple):
    """What the embedding op's VJP reads (:data:`EMBEDDING_OP`)."""
    tokens: np.ndarray  # (B, L) int64
    V: int  # vocabulary size (rows of E)
    H: int  # embedding width (columns of E)


def _embedding_op(inputs, params, cfg=None, state=None):
    E = params["E"]
    _check_dtypes(E=E)
    y, (tokens, V) = embedding_fwd(inputs["tokens"], E)
    return _ops.Result({"y": y}, EmbeddingCache(tokens, V, E.shape[1]), None)


def _embedding_op_vjp(cache, cotangents):
    Bsz, L = cache.tokens.shape
    dy = _ops.cotangent(cotangents, "y", np.zeros((Bsz, cache.H, L), float_dtype()))
    _, dE = embedding_bwd((cache.tokens, cache.V), dy)
    return {"E": dE}


def embedding_depth(inputs, params, cfg):
    """``y`` is a gather: exact (0 roundings). ``dE[v]`` adds the cotangents of every
    occurrence of token ``v``: as many terms as its most frequent token's repeats."""
    tokens = inputs["tokens"]
    repeats = int(np.bincount(tokens.ravel()).max()) if tokens.size else 1
    return {"*": 0, "y": 0, "dE": repeats}


def embedding_examples(rng):
    """Repeated tokens (``dE`` accumulates), every token once, and an unused vocabulary row."""
    return [_ops.Example({"tokens": rng.integers(0, 5, size=(3, 7))},
                         {"E": rng.normal(size=(5, 4))}),
            _ops.Example({"tokens": rng.permutation(6).reshape(2, 3).astype(np.int64)},
                         {"E": rng.normal(size=(6, 2))}),
            _ops.Example({"tokens": rng.integers(0, 3, size=(2, 4))},
                         {"E": rng.normal(size=(4, 3))})]


EMBEDDING_OP = _ops.defop(
    name="embedding", math="y[b, :, t] = E[tokens[b, t]]",
    inputs=("tokens",), params=("E",), nondiff=("tokens",), outputs=("y",),
    fwd=_embedding_op, vjp=_embedding_op_vjp, depth=embedding_depth,
    examples=embedding_examples,
)


# ---- GELU ------------------------------------------------------------------------------------


class GELUCache(NamedTuple):
    """What the GELU op's VJP reads (:data:`GELU_OP`)."""
    x: np.ndarray  # (B, H, L) the input (C-contiguous)
    Phi: np.ndarray  # (B, H, L) the normal CDF at x


def _gelu_op(inputs, params, cfg=None, state=None):
    _check_rank("x", inputs["x"], 3)  # gelu_fwd itself takes any rank (elementwise)
    y, (x, Phi) = gelu_fwd(inputs["x"])
    return _ops.Result({"y": y}, GELUCache(x, Phi), None)


def _gelu_op_vjp(cache, cotangents):
    (dx,) = gelu_bwd((cache.x, cache.Phi), _ops.cotangent(cotangents, "y", cache.x))
    return {"x": dx}


def gelu_depth(inputs, params, cfg):
    """``y``: ``x / sqrt 2`` (1), ``erf`` (~2 ulps: 2), ``1 + erf`` (1), ``x Phi`` (1): 6 with
    the halving, i.e. tests/test_float32.py's ``6 eps (|x| + |y|)``. ``dx``: that test's
    ``8 eps |dy| (1 + (1 + x^2) |x| phi)``, whose factor is at most ``8 (1 + 0.633) = 13``
    (``max (1 + x^2) |x| phi(x) = 0.633``: ``exp``'s argument error amplified by ``x^2``)."""
    return {"*": 6, "y": 6, "dx": 13}


def gelu_examples(rng):
    """Both signs, the tails (``|x|`` up to ~6: ``Phi`` saturates) and a single element."""
    return [_ops.Example({"x": 2.0 * rng.normal(size=(2, 3, 6))}, {}),
            _ops.Example({"x": rng.uniform(-6.0, 6.0, size=(1, 4, 5))}, {}),
            _ops.Example({"x": rng.normal(size=(1, 1, 1))}, {})]


GELU_OP = _ops.defop(
    name="gelu", math="y = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2",
    inputs=("x",), params=(), outputs=("y",),
    fwd=_gelu_op, vjp=_gelu_op_vjp, depth=gelu_depth, examples=gelu_examples,
)


# ---- GLU -------------------------------------------------------------------------------------


class GLUCache(NamedTuple):
    """What the GLU op's VJP reads (:data:`GLU_OP`): :func:`glu_fwd`'s cache by name."""
    s: np.ndarray  # the input as the backward reads it: (B, H, L), or (H, B, L) channel-major
    W: np.ndarray  # (2H, H)
    batch_major: bool  # True: ``s`` is (B, H, L) (see glu_fwd)
    a: np.ndarray  # (B, H, L) o[:H], the value half
    g: np.ndarray  # (B, H, L) sigmoid(o[H:]), the gate


def _glu_op(inputs, params, cfg=None, state=None):
    z, ((s, W, batch_major), a, g) = glu_fwd(inputs["s"], params["W"], params["b"])
    return _ops.Result({"z": z}, GLUCache(s, W, batch_major, a, g), None)


def _glu_op_vjp(cache, cotangents):
    c = cache
    ds, dW, db = glu_bwd(((c.s, c.W, c.batch_major), c.a, c.g),
                         _ops.cotangent(cotangents, "z", c.a))
    return {"s": ds, "W": dW, "b": db}


def glu_depth(inputs, params, cfg):
    """Forward ``f = H + 8``: ``o = W s + b`` sums ``H + 1`` terms, the gate ``0.5 (1 +
    tanh(0.5 o))`` adds 4 (``tanh`` ~2 ulps), ``z = a g`` 1, rounded up (golden/mixing_suites.py's
    ``_mix_depth``). Backward: ``do = [dz g, dz a g (1 - g)]`` adds 4 to the cached ``a, g``'s
    ``f``; ``ds = W^T do`` sums ``2H`` terms (``_mix_depth``'s ``H + 8`` undercounts it for
    ``H > 8``), ``dW`` and ``db`` sum ``B L``."""
    Bsz, H, L = inputs["s"].shape
    f = H + 8
    return {"*": f, "z": f, "ds": f + 4 + 2 * H, "dW": f + 4 + Bsz * L, "db": f + 4 + Bsz * L}


def glu_examples(rng):
    """Spike input on the channel-major path (``L <=`` :data:`GLU_BATCHED_MIN_L`), real input
    on the batch-major path (``GLU_BATCHED_MIN_L < L <= BATCHED_MAX_L``), and ``H = 1``."""
    def case(Bsz, H, L, spikes):
        s = ((rng.random((Bsz, H, L)) < 0.3).astype(np.float64) if spikes
             else rng.normal(size=(Bsz, H, L)))  # (B, H, L)
        bound = 1.0 / math.sqrt(H)
        return _ops.Example({"s": s}, {"W": rng.uniform(-bound, bound, size=(2 * H, H)),
                                       "b": rng.uniform(-bound, bound, size=2 * H)})
    return [case(2, 3, 6, True), case(1, 2, GLU_BATCHED_MIN_L + 6, False), case(2, 1, 4, False)]


GLU_OP = _ops.defop(
    name="glu", math="o = W s + b, z = o[:H] sigmoid(o[H:])",
    inputs=("s",), params=("W", "b"), outputs=("z",),
    fwd=_glu_op, vjp=_glu_op_vjp, depth=glu_depth, examples=glu_examples,
)


# ---- GSU -------------------------------------------------------------------------------------


def _gsu_op(inputs, params, cfg=None, state=None):
    z, cache = gsu_fwd(inputs["x"], params["W"], params["b"], params["c"], inputs.get("Tx"),
                       inputs.get("TW"))
    return _ops.Result({"z": z}, cache, None)  # GSUCache: Tx, TW (the ternary "spikes"), P, Q


def _gsu_op_vjp(cache, cotangents):
    dx, dW, db, dc = gsu_bwd(cache, _ops.cotangent(cotangents, "z", cache.P))
    return {"x": dx, "W": dW, "b": db, "c": dc}


def gsu_depth(inputs, params, cfg):
    """``P = Ter(x) W + b`` and ``Q = x Ter(W) + c`` sum ``H + 1`` terms each, ``z = P Q`` 1
    more: ``H + 2`` (``_mix_depth`` allows ``H + 8``). Backward: ``dP = dz Q``, ``dQ = dz P``
    carry ``H + 2``; ``dx = Ter(W) dQ`` sums ``H`` more (``2H + 2``; ``_mix_depth``'s ``H + 8``
    undercounts it for ``H > 6``); ``dW, db, dc`` sum ``B L`` more. ``Ter`` itself rounds
    nothing (a comparison: equal in every precision away from the cut)."""
    Bsz, H, L = inputs["x"].shape
    return {"*": H + 2, "z": H + 2, "dx": 2 * H + 2, "dW": H + 2 + Bsz * L,
            "db": H + 2 + Bsz * L, "dc": H + 2 + Bsz * L}


def _off_the_cut(v, axis, ratio=TERNARY_RATIO, gap=0.05):
    """``v`` with every ``|v|`` within ``gap max|v|`` of the cut ``ratio max|v|`` moved to
    ``2 ratio max|v|`` (sign kept; the max unchanged), so that neither the finite differences'
    steps nor float32's rounding change ``Ter(v)``: ``Ter`` is locally constant there and its
    zero gradient (the **[choice]** of :func:`gsu_bwd`) is the exact one."""
    m = np.abs(v).max(axis=axis, keepdims=axis is not None)
    near = np.abs(np.abs(v) - ratio * m) < gap * m
    return np.where(near, np.sign(v) * 2 * ratio * m, v)


def gsu_examples(rng):
    """A few tokens (``Ter(x)`` per token, ``Ter(W)`` over the matrix, both with zeros and
    both signs), ``H = 6`` and ``L = 1``; every value at least ``0.05 max|v|`` off the
    ternarisation cut. An all-zero token (the ``max|v| = 0`` guard) is left to the golden suite:
    ``Ter`` jumps there, so no finite difference sees its VJP."""
    def case(Bsz, H, L):
        x = _off_the_cut(rng.normal(size=(Bsz, H, L)), axis=1)  # (B, H, L)
        W = _off_the_cut(rng.uniform(-1.0, 1.0, size=(H, H)) / math.sqrt(H), axis=None)
        return _ops.Example({"x": x}, {"W": W, "b": 0.1 * rng.normal(size=H),
                                       "c": 0.1 * rng.normal(size=H)})
    return [case(2, 4, 5), case(1, 6, 3), case(3, 3, 1)]


def ternary_margins(x, W, ratio=TERNARY_RATIO):
    """``{"ter_x": (|x| / max_h |x|, ratio), "ter_W": (|W| / max |W|, ratio)}``: what decides
    ``Ter`` in relative form (a zero maximum: 1, far from the cut)."""
    mx = np.abs(x).max(axis=1, keepdims=True)  # (B, 1, L)
    rel_x = np.where(mx > 0, np.abs(x) / np.where(mx > 0, mx, 1.0), 1.0)
    mw = np.abs(W).max()
    rel_w = np.abs(W) / mw if mw > 0 else np.ones_like(W)
    return {"ter_x": (rel_x, ratio), "ter_W": (rel_w, ratio)}


def gsu_diagnostics(inputs, params, cfg, result):
    """The ternarised ``Tx``, ``TW`` act as spikes; their margins in relative form."""
    c = result.cache
    return {"spikes": {"Tx": c.Tx, "TW": c.TW},
            "membranes": ternary_margins(inputs["x"], params["W"])}


GSU_OP = _ops.defop(
    name="gsu", math="z = (Ter(x) W + b) (x Ter(W) + c)",
    # Tx, TW: given, they stand for Ter(x), Ter(W) (constants a finite-difference check of a
    # model holds fixed, refimpl.model.model_fwd's frozen)
    inputs=("x", "Tx", "TW"), optional=("Tx", "TW"), nondiff=("Tx", "TW"),
    params=("W", "b", "c"), outputs=("z",),
    fwd=_gsu_op, vjp=_gsu_op_vjp, depth=gsu_depth, examples=gsu_examples,
    diagnostics=gsu_diagnostics,
)


# ---- normalisation ---------------------------------------------------------------------------


def _norm_depth(n, m):
    """Rounding depths of a normalisation over ``n`` values whose parameter gradients sum ``m``.

    ``mu`` sums ``n`` terms and divides (``n + 1``), the centring adds 1, ``var`` sums ``n``
    squares and divides (``n + 2``), ``rstd = 1 / sqrt(var + eps)`` 3, ``xh = xc rstd`` 1:
    ``xh`` carries ``2n + 8``, ``y = xh gamma + beta`` 2 more. The backward ``dx = rstd (g -
    mean g - xh mean(g xh))`` with ``g = dy gamma``: ``mean(g xh)`` sums ``n`` more products of
    the cached ``xh``, then 3 more: ``3n + 14``; ``dgamma = sum dy xh``: ``xh``'s ``2n + 8``
    plus ``m + 1``; ``dbeta = sum dy``: ``m``. Each on the magnitude of its terms
    (:func:`_norm_scales`), not of the result: both cancel."""
    return {"*": 2 * n + 10, "y": 2 * n + 10, "dx": 3 * n + 14, "dgamma": 2 * n + m + 9,
            "dbeta": m}


def _norm_scales(x, xh, rstd, mu_abs, gamma, beta, dy, axes, training):
    """The magnitudes of the terms of a normalisation's results (``Op.scales``), by name.

    The abs analogue: ``xh = (x - mu) rstd`` has terms ``A = (|x| + |mu|_abs) rstd``, where
    ``|mu|_abs`` is ``mean |x|`` over the ``axes`` (the batch statistic: its rounding is relative
    to that, the centring's cancellation) or ``|running_mean|`` (eval). Then ``y``: ``A |gamma|
    + |beta|``; ``dx = rstd (g - mean g - xh mean(g xh))``: ``rstd (|g| + mean|g| + A mean(|g|
    |xh|) + |xh| mean(|g| A))`` (to first order: the rounding of either factor of ``xh mean(g
    xh)`` times the other; ``|g| rstd`` in eval: no statistic depends on ``x``); ``dgamma``:
    ``sum |dy| A``; ``dbeta``: ``sum |dy|``. Each result can be far below these: ``dx`` over
    ``n = 2`` values is ``eps / (var + eps)`` of its terms (``xh = +-1`` whatever ``x``).
    Shapes: ``x, xh, dy (B, H, L)``; ``rstd``, ``mu_abs`` broadcast against them; ``gamma,
    beta (H,)``; ``dy`` None: ``y`` only.
    """
    col = (1, -1, 1)
    A = (np.abs(x) + mu_abs) * rstd  # (B, H, L)
    out = {"y": float(np.max(A * np.abs(gamma).reshape(col) + np.abs(beta).reshape(col),
                             initial=0.0))}
    if dy is None:
        return out
    ady = np.abs(dy)  # (B, H, L)
    g = ady * np.abs(gamma).reshape(col)  # (B, H, L)
    if training:
        keep = dict(axis=axes, keepdims=True)
        axh = np.abs(xh)  # (B, H, L)
        dx = rstd * (g + g.mean(**keep) + A * (g * axh).mean(**keep)
                     + axh * (g * A).mean(**keep))  # (B, H, L)
    else:
        dx = g * rstd  # (B, H, L)
    out.update(dx=float(np.max(dx, initial=0.0)),
               dgamma=float(np.max((ady * A).sum(axis=(0, 2)), initial=0.0)),
               dbeta=float(np.max(ady.sum(axis=(0, 2)), initial=0.0)))
    return out


class LayerNormConfig(NamedTuple):
    """LayerNorm's configuration: ``eps`` added to the variance."""
    eps: float = 1e-5


class LayerNormCache(NamedTuple):
    """What the LayerNorm op's VJP reads (:data:`LAYERNORM_OP`)."""
    xh: np.ndarray  # (B, H, L) the normalised input
    rstd: np.ndarray  # (B, 1, L) 1 / sqrt(var + eps) per token
    gamma: np.ndarray  # (H,)


def _layernorm_op(inputs, params, cfg=None, state=None):
    cfg = LayerNormConfig() if cfg is None else cfg
    y, (xh, rstd, gamma) = layernorm_fwd(inputs["x"], params["gamma"], params["beta"], cfg.eps)
    return _ops.Result({"y": y}, LayerNormCache(xh, rstd, gamma), None)


def _layernorm_op_vjp(cache, cotangents):
    dx, dgamma, dbeta = layernorm_bwd((cache.xh, cache.rstd, cache.gamma),
                                      _ops.cotangent(cotangents, "y", cache.xh))
    return {"x": dx, "gamma": dgamma, "beta": dbeta}


def layernorm_depth(inputs, params, cfg):
    """:func:`_norm_depth` over the ``H`` channels of a token; the parameters sum ``B L``."""
    Bsz, H, L = inputs["x"].shape
    return _norm_depth(H, Bsz * L)


def layernorm_scales(inputs, params, cfg, cotangents):
    """:func:`_norm_scales` over the channels of each token (``rstd`` of the float64 run)."""
    cfg = LayerNormConfig() if cfg is None else cfg
    x = inputs["x"]
    _, (xh, rstd, _) = layernorm_fwd(x, params["gamma"], params["beta"], cfg.eps)
    return _norm_scales(x, xh, rstd, np.abs(x).mean(axis=1, keepdims=True), params["gamma"],
                        params["beta"], cotangents.get("y"), (1,), True)


def layernorm_examples(rng):
    """An offset mean (the centring matters), a large ``eps`` (``eps`` matters) and ``H = 2``
    (``xh = +-1``: ``dx`` is ``eps / (var + eps)`` of its terms, the cancellation
    :func:`_norm_scales` allows for)."""
    return [_ops.Example({"x": rng.normal(0.5, 1.0, size=(2, 5, 4))},
                         {"gamma": rng.normal(1.0, 0.3, size=5), "beta": rng.normal(size=5)}),
            _ops.Example({"x": rng.normal(size=(1, 4, 6))},
                         {"gamma": rng.normal(size=4), "beta": rng.normal(size=4)},
                         LayerNormConfig(eps=0.5)),
            _ops.Example({"x": rng.normal(size=(3, 2, 2))},
                         {"gamma": rng.normal(size=2), "beta": rng.normal(size=2)})]


LAYERNORM_OP = _ops.defop(
    name="layernorm", math="y = (x - mean_h x) / sqrt(var_h x + eps) gamma + beta",
    inputs=("x",), params=("gamma", "beta"), outputs=("y",), config=LayerNormConfig,
    fwd=_layernorm_op, vjp=_layernorm_op_vjp, depth=layernorm_depth, scales=layernorm_scales,
    examples=layernorm_examples,
)


class BatchNormConfig(NamedTuple):
    """BatchNorm's configuration (see :func:`batchnorm_fwd`)."""
    training: bool = True  # batch statistics (and new running ones), else the running ones
    momentum: float = 0.1  # weight of the batch statistic in the new running statistic
    eps: float = 1e-5  # added to the variance


class BatchNormCache(NamedTuple):
    """What the BatchNorm op's VJP reads (:data:`BATCHNORM_OP`): :func:`batchnorm_fwd`'s cache
    by name."""
    xh: np.ndarray  # (B, H, L) the normalised input
    rstd: np.ndarray  # (H,) 1 / sqrt(var + eps), batch or running var
    gamma: np.ndarray  # (H,)
    training: bool
    axes: tuple  # the reduced axes, (0, 2)
    col: tuple  # the broadcast shape of a per-channel vector, (1, H, 1)


def _batchnorm_op(inputs, params, cfg=None, state=None):
    cfg = BatchNormConfig() if cfg is None else cfg
    _check_rank("x", inputs["x"], 3)  # batchnorm_fwd itself takes any rank (channel_axis)
    y, cache, (mean, var) = batchnorm_fwd(inputs["x"], params["gamma"], params["beta"],
                                          inputs["running_mean"], inputs["running_var"],
                                          cfg.training, cfg.momentum, cfg.eps)
    if not cfg.training:  # eval returns the running statistics themselves: copy them
        mean, var = _fresh(mean), _fresh(var)
    return _ops.Result({"y": y, "running_mean": mean, "running_var": var},
                       BatchNormCache(*cache), None)


def _batchnorm_op_vjp(cache, cotangents):
    dx, dgamma, dbeta = batchnorm_bwd(tuple(cache), _ops.cotangent(cotangents, "y", cache.xh))
    return {"x": dx, "gamma": dgamma, "beta": dbeta}


def batchnorm_depth(inputs, params, cfg):
    """Training: :func:`_norm_depth` over the ``n = B L`` values of a channel (the parameters
    sum the same ``n``); the new running mean ``(1 - m) r + m mu`` adds 3 to ``mu``'s ``n + 1``,
    the running variance ``n / (n - 1)`` (2) and the mixing (3) to ``var``'s ``2n + 4``. Eval:
    an affine map, ``y``: ``rstd`` 3, centring 1, ``xh`` 1, ``y`` 2; ``dx = dy gamma rstd``:
    ``rstd`` 3 and 2 products; ``dgamma`` sums ``n`` products of ``xh`` (5); ``dbeta`` ``n``;
    the running statistics are returned as they came (0)."""
    cfg = BatchNormConfig() if cfg is None else cfg
    Bsz, H, L = inputs["x"].shape
    n = Bsz * L
    if cfg.training:
        return {**_norm_depth(n, n), "running_mean": n + 4, "running_var": 2 * n + 9}
    return {"*": 7, "y": 7, "dx": 5, "dgamma": n + 6, "dbeta": n, "running_mean": 0,
            "running_var": 0}


def batchnorm_scales(inputs, params, cfg, cotangents):
    """:func:`_norm_scales` over ``(B, L)`` per channel (``rstd`` of the float64 run); the new
    running statistics' terms ``(1 - m) |r| + m |stat|_abs``, with ``mean |x|`` for the mean and
    ``n / (n - 1) mean (|x| + mean |x|)^2`` for the variance (the centring's cancellation)."""
    cfg = BatchNormConfig() if cfg is None else cfg
    x, rm, rv = inputs["x"], inputs["running_mean"], inputs["running_var"]
    _, cache, _ = batchnorm_fwd(x, params["gamma"], params["beta"], rm, rv, cfg.training,
                                cfg.momentum, cfg.eps)
    c = BatchNormCache(*cache)
    col = (1, -1, 1)
    rstd = c.rstd.reshape(col)  # (1, H, 1)
    dy = cotangents.get("y")
    if not cfg.training:
        return _norm_scales(x, c.xh, rstd, np.abs(rm).reshape(col), params["gamma"],
                            params["beta"], dy, (0, 2), False)
    mu_abs = np.abs(x).mean(axis=(0, 2), keepdims=True)  # (1, H, 1)
    n = x.size // x.shape[1]
    m = cfg.momentum
    var_abs = ((np.abs(x) + mu_abs) ** 2).mean(axis=(0, 2)) * n / max(n - 1, 1)  # (H,)
    return {**_norm_scales(x, c.xh, rstd, mu_abs, params["gamma"], params["beta"], dy, (0, 2),
                           True),
            "running_mean": float(np.max((1 - m) * np.abs(rm) + m * mu_abs.ravel(),
                                         initial=0.0)),
            "running_var": float(np.max((1 - m) * np.abs(rv) + m * var_abs, initial=0.0))}


def batchnorm_examples(rng):
    """Training (with its new running statistics) and eval, a momentum of 0.3, two values per
    channel (``n = 2``: ``dx`` cancels, as LayerNorm's over ``H = 2``) and one (``n = 1``: the
    unbiased variance's ``max(n - 1, 1)`` guard)."""
    def case(Bsz, H, L, cfg):
        return _ops.Example({"x": rng.normal(0.5, 1.0, size=(Bsz, H, L)),
                             "running_mean": rng.normal(0.2, 0.1, size=H),
                             "running_var": rng.uniform(0.5, 1.5, size=H)},
                            {"gamma": rng.normal(1.0, 0.3, size=H), "beta": rng.normal(size=H)},
                            cfg)
    return [case(3, 4, 5, BatchNormConfig()), case(2, 3, 4, BatchNormConfig(training=False)),
            case(2, 2, 3, BatchNormConfig(momentum=0.3, eps=0.1)),
            case(1, 3, 2, BatchNormConfig()), case(1, 3, 1, BatchNormConfig())]


BATCHNORM_OP = _ops.defop(
    name="batchnorm",
    math="y = (x - mu) / sqrt(var + eps) gamma + beta, (mu, var) over (B, L) per channel "
         "(training) or the running ones (eval)",
    inputs=("x", "running_mean", "running_var"), params=("gamma", "beta"),
    nondiff=("running_mean", "running_var"), outputs=("y", "running_mean", "running_var"),
    differentiable=("y",), config=BatchNormConfig,
    fwd=_batchnorm_op, vjp=_batchnorm_op_vjp, depth=batchnorm_depth, scales=batchnorm_scales,
    examples=batchnorm_examples,
)


# ---- mean pooling ----------------------------------------------------------------------------


class MeanPoolCache(NamedTuple):
    """What the mean-pooling op's VJP reads (:data:`MEANPOOL_OP`)."""
    shape: tuple  # (B, H, L) of the input


def _meanpool_op(inputs, params, cfg=None, state=None):
    x = inputs["x"]
    _check_dtypes(x=x, ndim={"x": 3})
    if x.shape[2] < 1:
        raise ValueError(f"x must have at least one time step (L >= 1), got shape {x.shape}")
    y, shape = meanpool_fwd(x)
    return _ops.Result({"y": y}, MeanPoolCache(shape), None)


def _meanpool_op_vjp(cache, cotangents):
    dy = _ops.cotangent(cotangents, "y", np.zeros(cache.shape[:2], float_dtype()))
    (dx,) = meanpool_bwd(cache.shape, dy)
    return {"x": dx}


def meanpool_depth(inputs, params, cfg):
    """``y`` sums ``L`` terms and divides (``L + 1``); ``dx = dy / L``: one division."""
    L = inputs["x"].shape[2]
    return {"*": L + 1, "y": L + 1, "dx": 1}


def meanpool_examples(rng):
    return [_ops.Example({"x": rng.normal(size=(2, 3, 7))}, {}),
            _ops.Example({"x": rng.normal(size=(1, 2, 1))}, {})]


MEANPOOL_OP = _ops.defop(
    name="meanpool", math="y[b, h] = mean_t x[b, h, t]",
    inputs=("x",), params=(), outputs=("y",),
    fwd=_meanpool_op, vjp=_meanpool_op_vjp, depth=meanpool_depth, examples=meanpool_examples,
)


# ---- cross-entropy ---------------------------------------------------------------------------


class CrossEntropyCache(NamedTuple):
    """What the cross-entropy op's VJP reads (:data:`CROSS_ENTROPY_OP`)."""
    logp: np.ndarray  # (B, C) log-softmax of the logits
    labels: np.ndarray  # (B,) integer


def _cross_entropy_op(inputs, params, cfg=None, state=None):
    logits, labels = inputs["logits"], inputs["labels"]
    _check_dtypes(logits=logits)
    _check_integer("labels", labels)
    loss, (logp, labels) = cross_entropy_fwd(logits, labels)
    return _ops.Result({"loss": np.asarray(loss, dtype=logp.dtype)},  # () in the precision
                       CrossEntropyCache(logp, labels), None)


def _cross_entropy_op_vjp(cache, cotangents):
    dloss = _ops.cotangent(cotangents, "loss", np.zeros((), cache.logp.dtype))
    (dlogits,) = cross_entropy_bwd((cache.logp, cache.labels), dloss)
    return {"logits": dlogits}


def cross_entropy_depth(inputs, params, cfg):
    """``logp = z - log sum_c exp z`` (``z`` the logits less their max, exact up to 1): ``exp``
    2, the sum ``C``, ``log`` 2, the difference 1 (``C + 6``); the loss averages ``B`` of them
    (``B + 1``). ``dlogits = (exp(logp) - onehot) dloss / B``: ``exp`` 2, the difference 1, the
    scaling 2 more. On the terms' magnitudes (:func:`cross_entropy_scales`): both cancel."""
    Bsz, C = inputs["logits"].shape
    return {"*": C + Bsz + 7, "loss": C + Bsz + 7, "dlogits": C + 11}


def cross_entropy_scales(inputs, params, cfg, cotangents):
    """The magnitudes of the terms (``Op.scales``). ``z <= 0 <= lse`` enter ``-logp = lse - z``
    with one sign, so ``logp``'s terms are ``|logp|``, but ``lse = log S`` is rounded
    *absolutely*: ``S = sum exp z >= 1`` errs relatively, which ``log`` makes an absolute ``C
    eps``. So the loss's terms are ``mean_b (|logp[b, label]| + 1) = loss + 1`` (a confidently
    right batch has a loss far below that), and ``dlogits``' are ``(p (|logp| + 1) + onehot)
    |dloss| / B`` (``p = exp(logp)`` inherits ``logp``'s absolute error relatively; ``p - 1``
    cancels for a confident label)."""
    logits, labels = inputs["logits"], inputs["labels"]
    loss, (logp, _) = cross_entropy_fwd(logits, labels)
    out = {"loss": loss + 1.0}
    dloss = cotangents.get("loss")
    if dloss is not None:
        Bsz = logits.shape[0]
        onehot = np.zeros_like(logp)  # (B, C)
        onehot[np.arange(Bsz), labels] = 1.0
        terms = (np.exp(logp) * (np.abs(logp) + 1.0) + onehot) * (abs(float(dloss)) / Bsz)
        out["dlogits"] = float(np.max(terms, initial=0.0))  # terms: (B, C)
    return out


def cross_entropy_examples(rng):
    """A few classes at logit scale 3 (confident and unsure rows), a confidently right batch
    (loss ~1e-5: the cancellation :func:`cross_entropy_scales` allows for) and one row."""
    confident = rng.normal(size=(4, 3))  # (B, C)
    labels = rng.integers(0, 3, size=4)
    confident[np.arange(4), labels] += 12.0
    return [_ops.Example({"logits": rng.normal(0.0, 3.0, size=(6, 5)),
                          "labels": rng.integers(0, 5, size=6)}, {}),
            _ops.Example({"logits": confident, "labels": labels}, {}),
            _ops.Example({"logits": rng.normal(size=(1, 3)),
                          "labels": rng.integers(0, 3, size=1)}, {})]


CROSS_ENTROPY_OP = _ops.defop(
    name="cross_entropy", math="loss = -mean_b log softmax(logits[b])[labels[b]]",
    inputs=("logits", "labels"), params=(), nondiff=("labels",), outputs=("loss",),
    fwd=_cross_entropy_op, vjp=_cross_entropy_op_vjp, depth=cross_entropy_depth,
    scales=cross_entropy_scales, examples=cross_entropy_examples,
)


# ---- dropout ---------------------------------------------------------------------------------


class DropoutCache(NamedTuple):
    """What the dropout op's VJP reads (:data:`DROPOUT_OP`)."""
    mask: object  # (B, H, 1) of 0 or 1 / (1 - p) (:func:`dropout_mask`), or None: identity
    shape: tuple  # (B, H, L) of the input


def _dropout_op(inputs, params, cfg=None, state=None):
    x, mask = inputs["x"], inputs.get("mask")
    _check_dtypes(x=x, mask=mask, ndim={"x": 3, "mask": 3})
    if mask is not None:  # one value per batch row and channel, shared over time
        _check_shape("mask", mask, x.shape[:2] + (1,), "(B, H, 1)")
    y, mask = dropout_fwd(x, mask)
    return _ops.Result({"y": _fresh(y) if mask is None else y}, DropoutCache(mask, x.shape),
                       None)


def _dropout_op_vjp(cache, cotangents):
    dy = _ops.cotangent(cotangents, "y", np.zeros(cache.shape, float_dtype()))
    (dx,) = dropout_bwd(cache.mask, dy)
    return {"x": _fresh(dx) if cache.mask is None else dx}


def dropout_depth(inputs, params, cfg):
    """One product each way (the mask is given, already rounded to the precision)."""
    return {"*": 1, "y": 1, "dx": 1}


def dropout_examples(rng):
    """A mask of ``p = 0.3`` (:func:`dropout_mask`) and none (the identity)."""
    x = rng.normal(size=(3, 4, 5))  # (B, H, L)
    return [_ops.Example({"x": x, "mask": dropout_mask(rng, x.shape, 0.3)}, {}),
            _ops.Example({"x": rng.normal(size=(2, 2, 3))}, {})]


DROPOUT_OP = _ops.defop(
    name="dropout", math="y = x mask (mask in {0, 1 / (1 - p)}, shared over time)",
    inputs=("x", "mask"), params=(), optional=("mask",), nondiff=("mask",), outputs=("y",),
    fwd=_dropout_op, vjp=_dropout_op_vjp, depth=dropout_depth, examples=dropout_examples,
)
