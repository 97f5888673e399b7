"""PMBC: exact parallel spiking by boundary compression (SPikE-SSM; DESIGN.md section 5).

Given the spike train ``S`` of a row, the membrane is a *linear* recurrence, so it can be
computed by a parallel scan. Every reset is ``u = h (1 - a s) + b_r s``
(:data:`refimpl.neurons.RESETS`; ``b_r`` per channel). For the *linear* resets (``a = 0``:
``soft`` / ``refractory`` with ``c = -b_r = theta + rho``, ``none`` with ``c = 0``)::

    h = b - c tau leaky(shift(S)),   b = leaky(x),   leaky(z)_t = sum_{i<=t} tau^(t-i) z_i

and for the *hard* ones (``a = 1``, reset to ``u_reset = b_r``: ``hard``)
``h_t = a_t h_{t-1} + x_t + tau u_reset S_{t-1}`` with ``a_t = tau (1 - S_{t-1})``. The spike
map ``F(S) = Theta(h(S) - theta)`` (times the absolute refractory mask: no spike within ``R``
steps after a spike of ``S``) is strictly causal, so the iteration ``S_0 = 0,
S_{k+1} = F(S_k)`` reaches the unique fixed point, which is the iterative neuron's spike
train, after at most ``L`` steps.

Freezing. If ``S_k`` is correct on ``[0, p)`` and ``F(S_k)`` first differs from ``S_k`` at
``q >= p``, then both are correct on ``[0, q)`` and ``F(S_k)`` also at ``q`` (each spike depends
only on earlier ones). So the kernel keeps a per-row frontier ``p``, recomputes only ``[p, L)``
from the frozen state at ``p - 1``, moves ``p`` to ``q + 1`` and stops a row when an evaluation
changes nothing. This argument needs strict causality only, not the antitone sandwich, so it
is valid for ``hard`` reset as well (where odd/even iterates are *not* upper/lower bounds; see
:func:`spike_map` and the tests).

Parallel scan. Each membrane evaluation is a two-level (chunked) scan of
``y_t = a_t y_{t-1} + beta_t``: independent local scans over chunks of :data:`CHUNK` steps,
then the carries. Its rounding differs from the iterative neuron's, so a membrane within a
rounding distance of ``theta`` may flip a spike (:func:`rounding_bound`); elsewhere the spike
trains are identical and the membranes agree to rounding.

State (DESIGN.md section 10). A chunk may start from a :class:`refimpl.neurons.NeuronState`
``(u_{-1}, count0)``. LINEAR resets: ``b`` is the scan of ``x`` started from the carry
``u_{-1}``, ``b_t = leaky(x)_t + tau^(t+1) u_{-1}`` (``S_{-1} = 0``: the previous chunk's resets
are already in ``u_{-1}``). HARD: ``h_{-1} := u_{-1}`` with ``S_{-1} = 0``, so
``h_0 = tau u_{-1} + x_0``. The counter enters ``F``: ``count0 > 0`` acts as a virtual spike at
``t = count0 - 1 - R`` (blocking steps ``0 .. count0-1``; ``count0 = 0`` puts it at ``-(R+1)``,
where it blocks nothing). The state is a constant of ``F``, so ``F`` stays strictly causal and
the freezing argument and the convergence in at most ``L`` steps hold unchanged. The zero state
(the default) gives exactly the stateless results; the end state is
:func:`refimpl.neurons.end_state` of the chunk's spikes and membranes.

The backward pass is the iterative neuron's (it needs only ``x, s, h, u``):
:func:`pmbc_bwd` delegates to :func:`refimpl.neurons.neuron_bwd`.
"""
import numpy as np
from numba import njit

from . import config
from . import ops as _ops
from . import threads
from ._checks import check_array, check_int, check_shape
from .precision import require_reference
from .neurons import (NEURON_OP, NeuronCache, NeuronConfig, NeuronState, check_rho,
                      check_state, end_state, neuron_bwd, reset_coefficients)

#: Chunk length of the two-level scan.
CHUNK = 64

#: Kernel codes of the reset: every reset of :data:`refimpl.neurons.RESETS` is
#: ``u = h (1 - a s) + b s``; ``a = 0`` makes it linear in the spikes (``u = h - c s`` with
#: ``c = -b``: soft, refractory, none with ``c = 0``), ``a = 1`` is the hard reset to
#: ``u_reset = b``. The kernels take ``b`` per row and derive both from it.
LINEAR, HARD = 1, 2


@njit(**config.NJIT_OPTS)
def _scan_segment(a, beta, y0, start, stop, y, P):
    """``y[t] = a[t] y[t-1] + beta[t]`` for ``t in [start, stop)``, ``y[start-1] = y0``.

    Two-level scan: per chunk of CHUNK steps a local scan from zero with the running product
    ``P`` of ``a``, then ``y[t] += P[t] * carry`` with the carry of the previous chunk.
    Equivalent to the sequential loop up to rounding. ``P`` is scratch of length >= CHUNK.
    """
    carry = y0
    for c0 in range(start, stop, CHUNK):
        c1 = min(c0 + CHUNK, stop)
        acc = 0.0
        prod = 1.0
        for t in range(c0, c1):
            acc = a[t] * acc + beta[t]
            prod = prod * a[t]
            y[t] = acc
            P[t - c0] = prod
        for t in range(c0, c1):
            y[t] += P[t - c0] * carry
        carry = y[c1 - 1]


@njit(**config.NJIT_OPTS)
def _last_spike_before(S, t, R, c0):
    """Index of the last spike of ``S`` in ``[t - R, t)``, or if none the virtual spike of the
    initial counter ``c0``, at ``c0 - 1 - R`` (``-(R + 1)`` for ``c0 = 0``: blocks nothing)."""
    for j in range(t - 1, max(t - R, 0) - 1, -1):
        if S[j] != 0.0:
            return j
    return c0 - 1 - R


@njit(**config.NJIT_OPTS)
def _evaluate(x, u0, c0, S, tau, theta, c, u_reset, kind, R, theta_fire, p, b, r, h, S_new, a,
              beta, P):
    """One evaluation of ``F(S)`` on ``[p, L)`` from the initial state ``(u0, c0)``: writes ``h``
    and ``S_new`` there.

    ``kind``: LINEAR (``u = h - c s``: soft/refractory with ``c = theta + rho``, none with
    ``c = 0``) or HARD. For LINEAR, ``b = leaky(x)`` from the carry ``u0`` must be filled and
    ``r[p-1]`` must hold ``leaky(shift(S))[p-1]``; ``r`` is updated on ``[p, L)``. HARD starts
    from ``h_{-1} = u0`` (``S_{-1} = 0``).
    """
    L = x.shape[0]
    if kind == HARD:
        for t in range(p, L):
            sp = S[t - 1] if t > 0 else 0.0
            a[t] = tau * (1.0 - sp)
            beta[t] = x[t] + tau * u_reset * sp
        _scan_segment(a, beta, h[p - 1] if p > 0 else u0, p, L, h, P)
    else:
        for t in range(p, L):
            a[t] = tau
            beta[t] = S[t - 1] if t > 0 else 0.0
        _scan_segment(a, beta, r[p - 1] if p > 0 else 0.0, p, L, r, P)
        for t in range(p, L):
            h[t] = b[t] - c * tau * r[t]
    last = _last_spike_before(S, p, R, c0)
    for t in range(p, L):
        if t > 0 and S[t - 1] != 0.0:
            last = t - 1
        fire = h[t] >= theta_fire  # the neuron's one spike test (NeuronConfig.theta_fire)
        S_new[t] = 1.0 if (fire and t - last > R) else 0.0


@njit(**config.NJIT_OPTS)
def _pmbc_row(x, u0, c0, tau, theta, b_r, kind, R, theta_fire, max_iter, s, h, u):
    """PMBC on one row ``x (L,)`` from the state ``(u0, c0)`` with the reset ``u = h (1 - a s) +
    b_r s`` (``a`` = 1 for ``kind`` HARD, else 0); writes ``s, h, u (L,)``; returns the number
    of evaluations of ``F`` (``-1`` if ``max_iter`` was reached without convergence)."""
    c = -b_r  # LINEAR: u = h - c s
    u_reset = b_r  # HARD: u = h (1 - s) + u_reset s
    L = x.shape[0]
    b = np.empty(L)
    r = np.empty(L)
    S_new = np.empty(L)
    a = np.empty(L)
    beta = np.empty(L)
    P = np.empty(CHUNK)
    for t in range(L):
        s[t] = 0.0
    if kind != HARD:
        for t in range(L):
            a[t] = tau
        _scan_segment(a, x, u0, 0, L, b, P)  # b = leaky(x) + tau^(t+1) u0
    p = 0
    it = 0
    while it < max_iter:
        it += 1
        _evaluate(x, u0, c0, s, tau, theta, c, u_reset, kind, R, theta_fire, p, b, r, h, S_new, a,
                  beta, P)
        q = L
        for t in range(p, L):
            if S_new[t] != s[t]:
                q = t
                break
        if q == L:
            break
        for t in range(p, L):
            s[t] = S_new[t]
        p = q + 1
        if p >= L:  # every step is now known (h[L-1] was computed from a correct prefix)
            break
    else:
        return -1
    for t in range(L):
        if kind == HARD:
            u[t] = h[t] * (1.0 - s[t]) + s[t] * u_reset
        else:
            u[t] = h[t] - c * s[t]
    return it


@njit(**config.NJIT_OPTS)
def _pmbc_rows(x, u0, c0, tau, theta, b, kind, R, theta_fire, max_iter, s, h, u, iters):
    """Rows of ``x (M, L)`` one after the other (disjoint writes per row); ``b (M,)`` the reset
    offset per row. Cached on disk and ``nogil``: :func:`pmbc_fwd` shares row ranges out over
    :func:`refimpl.threads.run`'s threads (no ``parallel=True`` kernel: that one was compiled
    again in every process, about a second before a generated model's first token, issue 25)."""
    for m in range(x.shape[0]):
        iters[m] = _pmbc_row(x[m], u0[m], c0[m], tau, theta, b[m], kind, R, theta_fire,
                             max_iter, s[m], h[m], u[m])


def _check(x, cfg, rho, state=None):
    """Validate like :func:`refimpl.neurons.neuron_fwd`; returns ``x``, the kernel's reset code
    (from the reset's ``a``), ``b`` per row (B*H,), the reset's offset (``u = h (1 - a s) +
    b s``: the hard kind resets to ``b``, the linear kind subtracts ``c = -b``), and the initial
    state per row ``u0 (B*H,)``, ``c0 (B*H,) int64`` (zeros for ``state=None``)."""
    require_reference("PMBC (its exactness argument is in float64; under float32 run "
                      "refimpl.neurons.neuron_fwd, the form PMBC equals)")
    if not isinstance(cfg, NeuronConfig):
        raise TypeError(f"cfg must be a refimpl.neurons.NeuronConfig, got {type(cfg).__name__}")
    x = check_array("x", x, 3)
    Bsz, H, L = x.shape
    if L < 1:
        raise ValueError(f"x must have at least one time step (L >= 1), got shape {x.shape}")
    rho = check_rho(cfg, rho, H)
    a, b = reset_coefficients(cfg, rho, H)  # u = h (1 - a s) + b s; linear resets: b = -c
    kind = HARD if a == 1.0 else LINEAR
    b_rows = np.ascontiguousarray(np.broadcast_to(b, (Bsz, H)).reshape(-1))  # (B*H,)
    if state is None:
        u0, c0 = np.zeros(Bsz * H), np.zeros(Bsz * H, dtype=np.int64)  # (B*H,) each
    else:
        state = check_state(state, cfg, Bsz, H)
        u0, c0 = state.u.reshape(-1), state.count.reshape(-1)  # (B*H,) each
    return x, kind, b_rows, u0, c0


def pmbc_fwd(x, cfg, rho=None, max_iter=None, parallel=True, state=None, return_state=False):
    """Exact parallel spiking of the neuron ``cfg`` by boundary compression.

    Parameters
    ----------
    x : float64 (B, H, L)
    cfg : refimpl.neurons.NeuronConfig
        Any reset (``soft``/``refractory`` are the SPikE-SSM case; ``hard`` and ``none`` are
        exact too, see the module docstring), ``refractory_steps``, ``spike_condition``.
    rho : float64 (H,) or None
        Refractory magnitude, required iff the reset takes it
        (:func:`refimpl.neurons.check_rho`).
    max_iter : int or None
        Cap on evaluations of ``F`` per row; default ``L + 1`` (always enough).
    parallel : bool, default True
        Row ranges on :func:`refimpl.threads.run`'s threads (when ``x`` is large enough to
        gain); ``False`` keeps every row on the calling thread. Same results.
    state : refimpl.neurons.NeuronState or None, default None
        Initial state (module docstring); ``None`` is the zero state.
    return_state : bool, default False
        Also return the end state (:func:`refimpl.neurons.end_state` of this chunk).

    Returns
    -------
    s, h, u : float64 (B, H, L)
        Spikes, membrane before reset, membrane after reset (as :func:`refimpl.neurons.neuron_fwd`).
    iterations : int64 (B, H)
        Evaluations of ``F`` per row, the confirming one included.
    state : refimpl.neurons.NeuronState
        Only with ``return_state=True``.
    """
    x, kind, b_rows, u0, c0 = _check(x, cfg, rho, state)
    if not isinstance(return_state, (bool, np.bool_)):
        raise TypeError(f"return_state must be a bool, got {return_state!r}")
    Bsz, H, L = x.shape
    max_iter = L + 1 if max_iter is None else check_int("max_iter", max_iter, 1)
    x2 = x.reshape(-1, L)  # (B*H, L)
    s, h, u = (np.empty_like(x2) for _ in range(3))  # (B*H, L)
    iters = np.empty(x2.shape[0], dtype=np.int64)  # (B*H,)
    tau, theta, R = float(cfg.tau), float(cfg.theta), int(cfg.refractory_steps)

    def rows(m0, m1):
        _pmbc_rows(x2[m0:m1], u0[m0:m1], c0[m0:m1], tau, theta, b_rows[m0:m1], kind, R,
                   cfg.theta_fire, max_iter, s[m0:m1], h[m0:m1], u[m0:m1], iters[m0:m1])
    # a row costs a few passes over its L elements (one per boundary found): weigh it as 8
    threads.run(rows, x2.shape[0], 8 * x2.size if parallel else 0)
    if np.any(iters < 0):
        raise RuntimeError(f"PMBC did not converge within max_iter={max_iter} evaluations on "
                           f"{int((iters < 0).sum())} rows; raise max_iter (L + 1 always suffices)")
    shape = (Bsz, H, L)
    s, h, u = s.reshape(shape), h.reshape(shape), u.reshape(shape)  # (B, H, L) each
    if not return_state:
        return s, h, u, iters.reshape(Bsz, H)
    init = NeuronState(u0.reshape(Bsz, H), c0.reshape(Bsz, H))
    return s, h, u, iters.reshape(Bsz, H), end_state(s, u, cfg, init)


def pmbc_bwd(x, s, h, cfg, ds, dh=None, du=None, rho=None, state=None):
    """Backward of :func:`pmbc_fwd`: the iterative neuron's backward for ``cfg.grad_mode``.

    PMBC changes how the forward is computed, not what it is, so its VJP is
    :func:`refimpl.neurons.neuron_bwd` evaluated at PMBC's own ``s, h, u``; returns ``(dx, drho)``.
    ``state`` is the forward's initial state (its counter sets the refractory mask at the start).
    """
    return neuron_bwd(x, s, h, cfg, ds, dh=dh, du=du, rho=rho, state=state)


def spike_map(S, x, cfg, rho=None, state=None):
    """One full evaluation of ``F(S)`` on every step (no freezing): float64 (B, H, L) of 0/1.

    Used to study the iterates ``S_{k+1} = F(S_k)``: for ``soft``/``refractory`` even iterates
    from ``S_0 = 0`` are lower bounds and odd ones upper bounds of the true spike train; for
    ``hard`` reset they are not in general. ``state``: the initial state (module docstring).
    """
    x, kind, b_rows, u0, c0 = _check(x, cfg, rho, state)
    S = check_array("S", S, 3)
    check_shape("S", S, x.shape)
    Bsz, H, L = x.shape
    x2, S2 = x.reshape(-1, L), S.reshape(-1, L)
    out = np.empty_like(x2)  # (B*H, L)
    _spike_map_rows(x2, S2, u0, c0, float(cfg.tau), float(cfg.theta), b_rows, kind,
                    int(cfg.refractory_steps), cfg.theta_fire, out)
    return out.reshape(x.shape)


@njit(**config.NJIT_OPTS)
def _spike_map_rows(x, S, u0, c0, tau, theta, b_rows, kind, R, theta_fire, out):
    """``out[m] = F(S[m])`` for every row from its state ``(u0[m], c0[m])`` and reset offset
    ``b_rows[m]`` (full evaluation from ``p = 0``)."""
    M, L = x.shape
    b, r, h, a = np.empty(L), np.empty(L), np.empty(L), np.empty(L)
    beta = np.empty(L)
    P = np.empty(CHUNK)
    for m in range(M):
        if kind != HARD:
            for t in range(L):
                a[t] = tau
            _scan_segment(a, x[m], u0[m], 0, L, b, P)
        _evaluate(x[m], u0[m], c0[m], S[m], tau, theta, -b_rows[m], b_rows[m], kind, R, theta_fire,
                  0, b, r, h, out[m], a, beta, P)


def rounding_bound(x, cfg, rho=None, state=None):
    """A bound on ``|h_pmbc - h_iterative|`` while the spike trains agree, per case.

    Both membranes are sums of ``tau^k``-weighted terms of size at most
    ``M = max|x| + c + |u_reset| + |theta|`` (``c = theta + max rho``; from a ``state``,
    ``+ max|state.u|``, the initial membrane's term); each differs from the exact sum by
    ``O(CHUNK eps)`` relative per term (chunk products and reassociation), so
    ``|diff| <= 4 CHUNK eps M / (1 - tau)``. A spike can flip only where the iterative margin
    ``|h - theta|`` is below this bound.

    ``c + |u_reset|`` stands for the reset's offset ``max |b|`` (``u = h (1 - a s) + b s``),
    which it bounds for the four resets of DESIGN.md; a reset whose ``max |b|`` exceeds it
    adds the excess (0.0, exactly, for those four: their bounds are unchanged bit for bit).
    """
    eps = np.finfo(np.float64).eps
    c = cfg.theta + (float(np.max(rho)) if rho is not None and np.size(rho) else 0.0)
    M = float(np.max(np.abs(x))) + abs(c) + abs(cfg.u_reset) + abs(cfg.theta)
    if rho is not None or cfg.reset_rule.param != "rho":
        _, b = reset_coefficients(cfg, rho, np.shape(x)[1])  # (H,) the reset's offset
        M += max(0.0, float(np.max(np.abs(b), initial=0.0)) - abs(c) - abs(cfg.u_reset))
    if state is not None:
        u0 = check_state(state, cfg, *np.shape(x)[:2]).u  # (B, H)
        M += float(np.max(np.abs(u0)))
    return 4 * CHUNK * eps * M / (1.0 - cfg.tau)


# ---- the op contract (refimpl.ops) -----------------------------------------------------------


def _pmbc_op(inputs, params, cfg=None, state=None, end_state=True, parallel=True):
    cfg = NeuronConfig() if cfg is None else cfg
    x, rho = inputs["x"], params.get("rho")
    if end_state:
        s, h, u, it, end = pmbc_fwd(x, cfg, rho=rho, parallel=parallel, state=state,
                                    return_state=True)
    else:
        (s, h, u, it), end = pmbc_fwd(x, cfg, rho=rho, parallel=parallel, state=state), None
    return _ops.Result({"s": s, "h": h, "u": u, "iterations": it},
                       NeuronCache(x, s, h, cfg, rho, state, False), end)


PMBC_OP = _ops.defop(
    name="pmbc", math="the neuron's s, h, u by boundary compression (exact, parallel over rows)",
    inputs=("x",), params=("rho",), optional=("rho",), outputs=("s", "h", "u", "iterations"),
    differentiable=("s", "h", "u"), spikes=("s",), config=NeuronConfig, state=NeuronState,
    time={"x": 2, "s": 2, "h": 2, "u": 2},
    fwd=_pmbc_op, vjp=NEURON_OP.vjp, smooth=NEURON_OP.smooth, exact_vjp=NEURON_OP.exact_vjp,
    depth=NEURON_OP.depth, examples=NEURON_OP.examples, diagnostics=NEURON_OP.diagnostics,
    float32=False,
)
