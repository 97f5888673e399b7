"""Iterative spiking neurons: the LIF family with four resets, forward and hand-written backward.

DESIGN.md section 4. Input ``x (B, H, L)``; every row ``(b, h)`` runs, from ``u_{-1} = 0``
(or the state's ``u``, see *State* below)::

    m_t = tau * u_{t-1}              decayed potential (what the SDN predicts)
    h_t = m_t + x_t                  membrane before reset
    s_t = Theta(h_t - theta)         ge: h_t >= theta (default);  gt: h_t > theta
    u_t = reset(h_t, s_t)

| ``reset=`` | ``u_t`` | ``a`` | ``b`` | ``theta`` | takes |
|---|---|---|---|---|---|
| ``hard`` | ``h_t (1 - s_t) + u_reset s_t`` | 1 | ``u_reset`` | ``> 0`` | ``u_reset`` |
| ``soft`` | ``h_t - theta s_t`` | 0 | ``-theta`` | ``> 0`` | |
| ``refractory`` | ``h_t - (theta + rho[h]) s_t`` | 0 | ``-(theta + rho[h])`` | ``> 0`` | ``rho`` |
| ``none`` | ``h_t`` | 0 | 0 | any real | |

For ``refractory``, ``rho >= 0`` is per channel (``rho[h]``), a trainable parameter (an array
argument of the forward and backward, not configuration); ``u_reset`` is configuration and
must stay 0 for a reset that does not take it.

All four are one formula, ``u_t = h_t (1 - a s_t) + b s_t`` (the columns ``a``, ``b``); for
spikes in {0, 1} it gives bit for bit the same numbers as the per-reset form in the table, so
the kernels use it and the tests compare them with the literal per-reset loops of
:func:`refimpl.reference.neuron_trace` for exact equality. Its partial derivatives, used by
the backward pass, are
``du/dh = 1 - a s``, ``du/ds = b - a h`` and, for a reset taking ``rho``, ``du/drho = -s``.

Each row of the table is one :class:`Reset` in :data:`RESETS`, registered with
:func:`register_reset` beside its coefficient function ``(cfg, rho, H) -> (a, b)``; the other
columns are the entry's facts (``theta_positive``, ``u_reset``, ``param``), which
:class:`NeuronConfig`, :func:`check_rho`, :func:`neuron_bwd`, PMBC, the golden suites and the
equivalence checks read instead of comparing reset names (CONTRIBUTING.md, "A reset").

**Absolute refractory period** ``refractory_steps = R`` (default 0): for the ``R`` steps after a
spike (``t+1 .. t+R``) the neuron integrates (``h``, ``u`` evolve as usual) but cannot fire:
``s_t = 0`` there whatever ``h_t`` is. The mask ``allowed_t`` (1 when the neuron may fire) is a
constant for differentiation: no surrogate gradient flows at a blocked step.

**State** (DESIGN.md section 10): :class:`NeuronState` ``(u, count)``, both ``(B, H)``: ``u`` the
membrane after reset at the last step (``u_{T-1}``, the next chunk's ``u_{-1}``) and ``count``
(int64) the steps still blocked by the refractory period (``0 <= count <= R``; the next chunk's
steps ``0 .. count-1`` cannot fire). The zero state (``u = 0``, ``count = 0``,
:func:`neuron_zero_state`) is the default and gives exactly the stateless results. Chunk rule:
feeding the state out of one chunk (``return_state=True``, or :func:`end_state`) into the next
reproduces the unchunked run bit for bit, because every step performs the same operations in
the same order; :func:`neuron_step` is the same kernel on ``L = 1``. The backward takes the
forward's initial state (only ``count`` matters there: it sets the refractory mask at the start
of the chunk) and returns no gradient with respect to it.

**Smooth mode** (``smooth=True``, for testing the backward): ``s_t = allowed_t G(h_t - theta)``
with ``G`` the surrogate's primitive (:mod:`refimpl.surrogates`), real-valued, and used inside
``reset`` too. The refractory mask is still computed from the *hard* spikes
``allowed_t Theta(h_t - theta)`` and is held constant. With ``G' = g``, finite differences of the
smooth forward equal the backward exactly (up to rounding).

Backward modes (``grad_mode=``), all with ``ds_t/dh_t := allowed_t g(h_t - theta)``:

- ``bptt``: the derivative of the whole forward, including the reset path ``du_t/ds_t``;
  matches spikingjelly ``detach_reset=False``.
- ``detach_reset``: the derivative of the forward in which the spike inside ``reset()`` is a
  constant (``du_t/ds_t`` dropped; ``du_t/dh_t = 1 - a s_t`` and ``du_t/drho = -s_t`` kept);
  matches spikingjelly ``detach_reset=True`` and snntorch (its reset signal is detached). For
  ``soft``/``refractory`` it is the linear reverse scan ``gh_t = gs_t g_t + tau gh_{t+1}``.
- ``sltt``: the derivative of the forward in which ``m_t`` is a constant (stop-gradient), so
  nothing crosses time steps (SLTT, Meng et al. 2023; SpikingSSM's SDN training). Within a step
  everything is differentiated as in ``bptt``: a cotangent on ``h_t`` reaches ``x_t`` directly;
  a cotangent on ``u_t`` reaches ``x_t`` through ``u_t = reset(h_t, s_t)``, including its spike
  path ``(b - a h_t) g_t``, and reaches ``rho`` as ``-s_t``. With a cotangent on ``s`` only,
  ``dx_t = ds_t allowed_t g(h_t - theta)``.

**Learnable threshold by input scaling** (SpikingSSM): :func:`threshold_scale_fwd` computes
``y / exp(ln_vth)[h]`` for a neuron with ``theta = 1``; for ``hard`` (``u_reset = 0``), ``soft``,
``refractory`` (``rho`` scaled likewise) and ``none``, ``neuron(x; theta) == neuron(x / theta; 1)``
spike for spike.

Conventions of other libraries
------------------------------
Each row is reproduced in ``tests/test_neuron_conventions.py`` by an independent loop
transcribed from that library's update rule (no torch needed). "bit-exact" means the same
floating-point operations in the same order; "to rounding" means the same real-number
recurrence evaluated in a different order (spikes then agree wherever ``|h - theta|`` exceeds a
few ulps).

| row | library, model | refimpl ``reset=`` | agreement |
|---|---|---|---|
| 1 | snntorch ``Leaky``, ``reset_mechanism="zero"`` | ``hard`` | bit-exact |
| 2 | snntorch ``Leaky``, ``"subtract"``, ``reset_delay=True`` | ``refractory`` | to rounding |
| 3 | snntorch ``Leaky``, ``"subtract"``, ``reset_delay=False`` | ``soft`` | bit-exact (see 3) |
| 4 | snntorch ``Leaky``, ``reset_mechanism="none"`` | ``none`` | bit-exact |
| 5 | spikingjelly ``LIFNode``, ``v_reset=0.0`` | ``hard`` | bit-exact |
| 6 | spikingjelly ``LIFNode``, ``v_reset=None`` (soft) | ``soft`` | bit-exact |
| 7 | spikingjelly ``LIFNode``, ``v_reset=vr != 0`` | ``hard`` | to rounding |
| 8 | spikingjelly ``detach_reset``, ``surrogate.Sigmoid`` | (backward) | same definitions |
| 9 | norse ``lif_feed_forward_step`` | ``hard`` | to rounding |

Each row in full (library, model: refimpl config; input, outputs; agreement):

1. snntorch ``Leaky(beta, threshold=thr, reset_mechanism="zero")``:
   ``reset="hard", u_reset=0, tau=beta, theta=thr, spike_condition="gt"``;
   ``x = input``; ``spk = s``; returned ``mem = h`` (``reset_delay=True``, default) or ``u``
   (``reset_delay=False``); bit-exact.
2. snntorch ``Leaky(..., reset_mechanism="subtract")``, ``reset_delay=True`` (default):
   ``reset="refractory", rho = thr (1 - beta) / beta, tau=beta, theta=thr, "gt"``
   (``beta > 0``); ``mem = h``; to rounding: snntorch subtracts ``thr`` *after* the decay, from
   the previous step's spike, ``mem_t = beta mem_{t-1} + x_t - thr s_{t-1}``; refimpl subtracts
   ``theta + rho = thr / beta`` before it.
3. snntorch ``Leaky(..., reset_mechanism="subtract", reset_delay=False)``:
   ``reset="soft", tau=beta, theta=thr, "gt"``; ``mem = u``; bit-exact while ``h <= 2 thr`` at
   every spike; after a spike with ``h > 2 thr`` the stored membrane still exceeds ``thr``, and
   snntorch's next step subtracts a delayed reset before its threshold test (adding it back
   after), so it fires there only if ``h > 2 thr``.
4. snntorch ``Leaky(..., reset_mechanism="none")``: ``reset="none", tau=beta, theta=thr, "gt"``;
   ``mem = h``; bit-exact.
5. spikingjelly ``LIFNode(tau=T, decay_input=False, v_reset=0.0, v_threshold=vth)``:
   ``reset="hard", u_reset=0, tau = 1 - 1/T, theta=vth, "ge"``; ``H = h``, ``V = u``,
   ``S = s``; bit-exact.
6. spikingjelly ``LIFNode(..., decay_input=False, v_reset=None)`` (soft):
   ``reset="soft", tau = 1 - 1/T, theta=vth, "ge"``; outputs as in row 5; bit-exact.
7. spikingjelly ``LIFNode(..., decay_input=False, v_reset=vr != 0)``:
   ``reset="hard", u_reset=0, tau = 1 - 1/T, theta = vth - vr``; ``h = H - vr``,
   ``u = V - vr``; to rounding (spikingjelly leaks towards ``vr``, refimpl towards 0).
8. spikingjelly ``detach_reset=False / True``, ``surrogate.Sigmoid(alpha)``:
   ``grad_mode="bptt" / "detach_reset"``, ``surrogate="sigmoid", surrogate_scale=alpha``;
   same definitions.
9. norse ``lif_feed_forward_step`` (``LIFParameters``, ``dt``):
   ``reset="hard", tau = 1 - dt tau_mem_inv, theta = v_th, u_reset = v_reset, "gt"``;
   ``x_t = dt tau_mem_inv (v_leak + i_t)`` with the synaptic current entering step ``t``:
   ``i_0 = 0``, ``i_{t+1} = (1 - dt tau_syn_inv) i_t + input_t`` (feed-forward, so computable
   in advance; the input reaches ``v`` one step late); norse's ``v = u``; to rounding (norse
   evaluates ``v + dt tau_mem_inv ((v_leak - v) + i)``); reproduces norse's published sequence
   ``0, 0.1, 0.27, 0.487, 0.7335, 0.9963, 0, 0.3951, 0.7717, 0``
   (``norse/torch/functional/test/test_lif.py``).

snntorch's ``Leaky`` docstring states the "zero" rule as ``U[t+1] = beta U[t] + I[t+1] -
R (beta U[t] + I[t+1])`` (the input is zeroed too); its code (``_base_zero``) instead zeroes the
previous membrane before the decay, ``mem = (1 - reset) mem; mem = beta mem + input``. The table
follows the code, which is what runs.

Precision: the float arrays documented as float64 are float32 under
``refimpl.precision.using("float32")`` (the training variant, :mod:`refimpl.precision`);
nothing is cast: the inputs must be of the current precision. In float32 each step's ``h_t``
and ``u_t`` are computed from float32 operands (and the float64 constants ``tau``, ``theta``,
the reset) and rounded once when stored; the stored values decide the spike and carry to the
next step, so the spikes are those of the float32 membranes the caller sees.
"""
import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
from numba import njit

from . import config
from . import threads
from . import ops as _ops
from ._checks import check_array, check_int, check_name, check_real, check_shape
from .precision import float_dtype, require_reference
from .surrogates import get_surrogate, surrogate_grad, surrogate_primitive

# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reset:
    """One reset rule ``u = h (1 - a s) + b s`` (a row of the module docstring's table) and the
    facts the package reads from it instead of comparing reset names.

    Attributes
    ----------
    name : str
        The ``reset=`` value (a key of :data:`RESETS`).
    coefficients : callable ``(cfg, rho, H) -> (a, b)``
        ``a`` in {0.0, 1.0} (a Python float), ``b`` float64 ``(H,)`` per channel; ``rho`` is the
        validated ``(H,)`` array or None. Its docstring is the formula. ``a = 1`` resets to ``b``
        (PMBC's hard kind), ``a = 0`` subtracts ``-b`` (PMBC's linear kind).
    theta_positive : bool, default True
        :class:`NeuronConfig` requires ``theta > 0``; False: any real ``theta``.
    u_reset : bool, default False
        The reset reads ``cfg.u_reset`` (any real); False: ``u_reset`` must stay 0.
    param : {None, "rho"}, default None
        The trainable per-channel parameter it takes. ``"rho"``: float64 ``(H,)``, ``>= 0``
        (:func:`check_rho`), entering ``b`` with slope -1 (``db/drho = -1``, so
        ``du/drho = -s``: the ``drho`` that :func:`neuron_bwd` accumulates).
    """

    name: str
    coefficients: Callable
    theta_positive: bool = True
    u_reset: bool = False
    param: Optional[str] = None

    def __post_init__(self):
        if self.param not in (None, "rho"):
            raise ValueError(f"reset {self.name!r}: param must be None or 'rho' (the only "
                             f"parameter the kernels differentiate), got {self.param!r}")


#: reset name -> :class:`Reset`, in registration order (:func:`register_reset`).
RESETS = {}


def register_reset(name, **facts):
    """Decorator: register ``fn(cfg, rho, H) -> (a, b)`` as the reset ``name`` with the
    :class:`Reset` facts ``facts``; returns ``fn``. A name taken is a ValueError."""
    def register(fn):
        if name in RESETS:
            raise ValueError(f"reset {name!r} is registered twice")
        RESETS[name] = Reset(name, fn, **facts)
        return fn
    return register


@register_reset("hard", u_reset=True)
def _reset_hard(cfg, rho, H):
    """``u = h (1 - s) + u_reset s``."""
    return 1.0, np.full(H, cfg.u_reset)  # (H,)


@register_reset("soft")
def _reset_soft(cfg, rho, H):
    """``u = h - theta s``."""
    return 0.0, np.full(H, -cfg.theta)  # (H,)


@register_reset("refractory", param="rho")
def _reset_refractory(cfg, rho, H):
    """``u = h - (theta + rho) s`` (SPikE-SSM reset-refractory, ``rho (H,) >= 0``)."""
    return 0.0, -(cfg.theta + rho)  # (H,)


@register_reset("none", theta_positive=False)
def _reset_none(cfg, rho, H):
    """``u = h``."""
    return 0.0, np.zeros(H)  # (H,)


def _resets_with(fact, value=True):
    """``"reset='hard'"`` (joined by ``or``): the registered resets whose ``fact`` is ``value``,
    for error messages."""
    return " or ".join(f"reset={n!r}" for n, r in RESETS.items() if getattr(r, fact) == value)


BPTT = 0
DETACH_RESET = 1
SLTT = 2

#: grad_mode name -> integer code used by the backward kernel.
GRAD_MODES = {"bptt": BPTT, "detach_reset": DETACH_RESET, "sltt": SLTT}

#: spike_condition name -> strict flag (``ge``: ``h >= theta``; ``gt``: ``h > theta``; the
#: kernels see it as ``theta_fire``).
SPIKE_CONDITIONS = {"ge": False, "gt": True}


@dataclass(frozen=True)
class NeuronConfig:
    """Configuration of an iterative neuron (DESIGN.md section 4); validated on construction.

    Parameters
    ----------
    reset : str, default "hard"
        A name in :data:`RESETS` (``hard``, ``soft``, ``refractory``, ``none``; the module
        docstring's table). A reset whose :class:`Reset` takes ``param="rho"``
        (``refractory``) takes ``rho`` as an array argument of the forward/backward (it is a
        trainable parameter, not configuration).
    tau : float in [0, 1), default 0.5
        Decay factor of the membrane, ``m_t = tau u_{t-1}``.
    theta : float, default 1.0
        Threshold; ``> 0`` where the reset says so (``Reset.theta_positive``: ``hard``,
        ``soft``, ``refractory``); any real otherwise (``none``).
    u_reset : float, default 0.0
        Reset potential of a reset that takes it (``Reset.u_reset``: ``hard``); must stay 0
        for the others.
    refractory_steps : int >= 0, default 0
        Absolute refractory period ``R``: no spike at ``t+1 .. t+R`` after a spike at ``t``.
    spike_condition : {"ge", "gt"}, default "ge"
        ``ge``: spike when ``h >= theta`` (SpikingSSM, spikingjelly); ``gt``: ``h > theta``
        (snntorch, norse, NIR).
    surrogate : str, default "triangle"
        A name in :data:`refimpl.surrogates.SURROGATES`.
    surrogate_scale : float or None, default None
        The surrogate's shape constant (``w``, ``a`` or ``k``), ``> 0``; ``None`` = its default.
    grad_mode : {"bptt", "detach_reset", "sltt"}, default "bptt"
        See the module docstring.

    Raises
    ------
    ValueError
        Unknown names (the message lists the valid ones), values out of range.
    TypeError
        Non-numeric ``tau``/``theta``/``u_reset``/``surrogate_scale``, non-integer
        ``refractory_steps``.
    """

    reset: str = "hard"
    tau: float = 0.5
    theta: float = 1.0
    u_reset: float = 0.0
    refractory_steps: int = 0
    spike_condition: str = "ge"
    surrogate: str = "triangle"
    surrogate_scale: Optional[float] = None
    grad_mode: str = "bptt"

    def __post_init__(self):
        rule = check_name("reset", self.reset, RESETS)
        check_name("spike_condition", self.spike_condition, SPIKE_CONDITIONS)
        check_name("grad_mode", self.grad_mode, GRAD_MODES)
        sur = get_surrogate(self.surrogate)
        tau = check_real("tau", self.tau, 0.0, 1.0, hi_open=True)
        if rule.theta_positive:
            theta = check_real(f"theta (with reset={self.reset!r})", self.theta, 0.0, lo_open=True)
        else:
            theta = check_real("theta", self.theta)
        u_reset = check_real("u_reset", self.u_reset)
        if not rule.u_reset and u_reset != 0.0:
            raise ValueError(f"u_reset applies only to {_resets_with('u_reset')}; got "
                             f"u_reset={self.u_reset} with reset={self.reset!r}")
        R = check_int("refractory_steps", self.refractory_steps, 0)
        scale = None if self.surrogate_scale is None else sur.resolve_scale(self.surrogate_scale)
        for name, value in (("tau", tau), ("theta", theta), ("u_reset", u_reset),
                            ("refractory_steps", R), ("surrogate_scale", scale)):
            object.__setattr__(self, name, value)

    @property
    def reset_rule(self):
        """The :class:`Reset` of ``reset`` (its coefficients and facts)."""
        return RESETS[self.reset]

    @property
    def theta_fire(self):
        """The spike test as one ``>=`` comparison, ``s = [h >= theta_fire]``: ``theta`` for
        ``ge``; for ``gt`` the next float above ``theta`` (``h > theta`` iff ``h >= nextafter(theta,
        inf)`` for every finite float). Every kernel (neurons, PMBC, the SDN neuron) fires on
        this value, so the spike condition is encoded once."""
        strict = SPIKE_CONDITIONS[self.spike_condition]
        return float(np.nextafter(self.theta, np.inf)) if strict else float(self.theta)

    @property
    def scale(self):
        """The surrogate shape constant in use (``surrogate_scale`` or the surrogate's default)."""
        return get_surrogate(self.surrogate).resolve_scale(self.surrogate_scale)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def attrs(self):
        """The config as the scalar attributes of a golden case (DESIGN.md section 9)."""
        d = dataclasses.asdict(self)
        d["surrogate_scale"] = self.scale
        return d


# --------------------------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------------------------

#: The fast forward advances this many rows together (the count is unrolled by hand below).
_ROWS = 4
#: Row ``k`` of a group runs ``k * _SKEW`` steps behind row 0. Rows are ``L * 8`` bytes apart,
#: usually a multiple of 4 KiB, so unskewed rows would hit the same L1 sets and alias in the
#: store buffer; 16 steps = two cache lines apart they do not.
_SKEW = 16

# Kernel conventions shared below:
# - ``theta_fire`` is the firing threshold as a ``>=`` test: ``theta`` for ``ge`` and
#   ``nextafter(theta, +inf)`` for ``gt`` (for every float h, ``h > theta`` iff
#   ``h >= nextafter(theta, +inf)``), so no kernel branches on the condition.
# - ``R`` is the refractory period. The fast forward takes an int > 0, or ``None`` for none:
#   Numba compiles a separate specialisation for ``None`` in which the refractory counter is
#   pruned away. The smooth forward and the backward take an int >= 0 (one compilation each).
# - ``u0 (M,)`` float64 and ``c0 (M,)`` int64 are each row's initial state, the membrane
#   ``u_{-1}`` and the refractory counter (``0 <= c0 <= R``; zeros for the stateless call).


@njit(**config.NJIT_OPTS)
def _fwd_step(x, s, h, u, r, t, u_prev, cnt, tau, theta_fire, a, b_r, R):
    """One time step of row ``r``; returns ``(u_t, cnt)``.

    ``h_t = tau u_prev + x_t``; ``s_t = allowed Theta(h_t - theta)`` with ``allowed = cnt == 0``;
    ``u_t = h_t (1 - a s_t) + b_r s_t``; ``cnt`` counts the remaining refractory steps.
    """
    h[r, t] = tau * u_prev + x[r, t]
    h_t = h[r, t]  # as stored: under float32 the rounded value decides and is carried
    fire = h_t >= theta_fire
    if R is not None:
        fire = fire & (cnt == 0)
        cnt = R if fire else max(cnt - 1, 0)
    s_t = np.float64(fire)
    # u_t = h_t (1 - a s_t) + b_r s_t, evaluated as a select of its two cases so the
    # dependency chain is shorter; both branches round exactly like the formula
    # (a * 1 = a, b * 1 = b, h * 1 = h), so the result is bit-identical.
    u_t = h_t * (1.0 - a) + b_r if fire else h_t + b_r * 0.0
    s[r, t] = s_t
    u[r, t] = u_t
    return u[r, t], cnt


@njit(**config.NJIT_OPTS)
def _fwd_span(x, s, h, u, r, t0, t1, u_prev, cnt, tau, theta_fire, a, b_r, R):
    """Steps ``t0 .. t1-1`` of row ``r`` from state ``(u_prev, cnt)``; returns the new state."""
    for t in range(t0, t1):
        u_prev, cnt = _fwd_step(x, s, h, u, r, t, u_prev, cnt, tau, theta_fire, a, b_r, R)
    return u_prev, cnt


@njit(**config.NJIT_OPTS)
def _neuron_fwd(x, u0, c0, tau, theta_fire, a, b, R, s, h, u):
    """Hard-spike forward of all rows of ``x (M, L)`` from ``(u0, c0)``, into ``s, h, u (M, L)``.

    Preconditions: C-contiguous float64, ``b (M,)`` the per-row reset offset, ``u0 (M,)``
    float64 and ``c0 (M,)`` int64 the initial state (``c0`` is ignored when ``R`` is None), ``R``
    an int > 0 or None. Equivalent to (and bit-identical with) the plain loop::

        for r in range(M):
            _fwd_span(x, s, h, u, r, 0, L, u0[r], c0[r], tau, theta_fire, a, b[r], R)

    which is latency bound: each step waits for the previous one (multiply, add, compare,
    reset: about 20 cycles). Here four rows advance together so that their independent
    recurrences overlap; row ``k`` of a group lags row 0 by ``k * _SKEW`` steps (a prologue and
    an epilogue finish the staggered ends). Every row still performs exactly the same operations
    in the same order, so the grouping cannot change a result.
    """
    M, L = x.shape
    D = _SKEW
    r = 0
    if L > (_ROWS - 1) * D:
        while r + _ROWS <= M:
            r1, r2, r3 = r + 1, r + 2, r + 3
            b0, b1, b2, b3 = b[r], b[r1], b[r2], b[r3]
            # prologue: row k runs (3 - k) * D steps on its own before the joint loop
            w0, n0 = _fwd_span(x, s, h, u, r, 0, 3 * D, u0[r], c0[r], tau, theta_fire, a, b0, R)
            w1, n1 = _fwd_span(x, s, h, u, r1, 0, 2 * D, u0[r1], c0[r1], tau, theta_fire, a, b1,
                               R)
            w2, n2 = _fwd_span(x, s, h, u, r2, 0, D, u0[r2], c0[r2], tau, theta_fire, a, b2, R)
            w3, n3 = u0[r3], c0[r3]
            for t in range(3 * D, L):  # four recurrences in flight
                w0, n0 = _fwd_step(x, s, h, u, r, t, w0, n0, tau, theta_fire, a, b0, R)
                w1, n1 = _fwd_step(x, s, h, u, r1, t - D, w1, n1, tau, theta_fire, a, b1, R)
                w2, n2 = _fwd_step(x, s, h, u, r2, t - 2 * D, w2, n2, tau, theta_fire, a, b2, R)
                w3, n3 = _fwd_step(x, s, h, u, r3, t - 3 * D, w3, n3, tau, theta_fire, a, b3, R)
            # epilogue: row k finishes its last k * D steps
            _fwd_span(x, s, h, u, r1, L - D, L, w1, n1, tau, theta_fire, a, b1, R)
            _fwd_span(x, s, h, u, r2, L - 2 * D, L, w2, n2, tau, theta_fire, a, b2, R)
            _fwd_span(x, s, h, u, r3, L - 3 * D, L, w3, n3, tau, theta_fire, a, b3, R)
            r += _ROWS
    while r < M:  # leftover rows (and short sequences), one at a time
        _fwd_span(x, s, h, u, r, 0, L, u0[r], c0[r], tau, theta_fire, a, b[r], R)
        r += 1


@njit(**config.NJIT_OPTS)
def _neuron_fwd_smooth(x, u0, c0, tau, theta, theta_fire, a, b, R, code, scale, s, h, u, c_end):
    """Smooth forward: ``s_t = allowed_t G(h_t - theta)``; the mask follows the hard spikes.

    Preconditions as :func:`_neuron_fwd` but ``R >= 0`` an int; ``code``/``scale`` select the
    primitive (:func:`refimpl.surrogates.surrogate_primitive`). Writes the final refractory
    counter of each row into ``c_end (M,)`` int64 (the smooth spikes do not show it). A plain
    row-by-row loop (testing only).
    """
    M, L = x.shape
    for r in range(M):
        u_prev = u0[r]
        cnt = c0[r]
        for t in range(L):
            h[r, t] = tau * u_prev + x[r, t]
            h_t = h[r, t]  # as stored (see _fwd_step)
            allowed = cnt == 0
            if R > 0:
                fired = allowed and h_t >= theta_fire  # the hard spike drives the mask
                cnt = R if fired else max(cnt - 1, 0)
            s_t = surrogate_primitive(code, h_t - theta, scale) if allowed else 0.0
            u_t = h_t * (1.0 - a * s_t) + b[r] * s_t
            s[r, t] = s_t
            u[r, t] = u_t
            u_prev = u[r, t]
        c_end[r] = cnt


@njit(**config.NJIT_OPTS)
def _neuron_fwd_memoryless(x, theta_fire, a, b, s, h, u):
    """Hard-spike forward of a neuron without memory (``tau = 0``, no refractory period, e.g.
    the Binary S4D family): ``h_t = x_t`` does not depend on ``u_{t-1}``, so every element is
    independent (a flat loop the compiler vectorises, no recurrence). The same operations as
    :func:`_fwd_step` (``tau u_prev = +-0`` added to ``x_t`` is ``x_t``): equal results, up to
    the sign of a zero membrane. Preconditions as :func:`_neuron_fwd`."""
    M, L = x.shape
    for r in range(M):
        b_r = b[r]
        for t in range(L):
            h[r, t] = x[r, t]
            h_t = h[r, t]
            fire = h_t >= theta_fire
            s[r, t] = 1.0 if fire else 0.0
            u[r, t] = h_t * (1.0 - a) + b_r if fire else h_t + b_r * 0.0


# --------------------------------------------------------------------------------------------
# Backward kernel
# --------------------------------------------------------------------------------------------


@njit(**config.NJIT_OPTS)
def _neuron_bwd(s, h, ds, dh, du, has_dh, has_du, c0, tau, theta, theta_fire, a, b, R, smooth,
                code, scale, mode, dx, g_rho):
    """Reverse-time VJP of every row; writes ``dx (M, L)`` and ``g_rho (M,)`` (both overwritten).

    Preconditions: C-contiguous float64 ``s, h, ds, dx (M, L)``; ``dh``/``du`` are ``(M, L)``
    when ``has_dh``/``has_du``, otherwise ignored; ``b (M,)``; ``R >= 0``; ``c0 (M,)`` int64 the
    forward's initial refractory counters. Per row, with
    ``g_t = allowed_t g(h_t - theta)`` and ``gh_L = 0``, for ``t = L-1 .. 0``::

        gu_t = du_t + tau gh_{t+1}                 (sltt: gu_t = du_t)
        gs_t = ds_t + gu_t (b - a h_t)             (detach_reset: gs_t = ds_t)
        gh_t = dh_t + gu_t (1 - a s_t) + gs_t g_t
        dx_t = gh_t,   g_rho += -gu_t s_t

    ``allowed_t`` is recomputed from ``c0`` and the spikes ``s`` (smooth mode: from
    ``Theta(h - theta)``), so only ``(s, h)`` of a forward pass are needed, whichever forward
    produced them.
    """
    M, L = s.shape
    allowed = np.ones(L)  # (L,)
    for r in range(M):
        if R > 0:
            cnt = c0[r]
            for t in range(L):
                ok = cnt == 0
                if smooth:
                    fired = ok and h[r, t] >= theta_fire
                else:
                    fired = s[r, t] != 0.0
                allowed[t] = 1.0 if ok else 0.0
                cnt = R if fired else max(cnt - 1, 0)
        b_r = b[r]
        gh_next = 0.0
        acc_rho = 0.0
        for t in range(L - 1, -1, -1):
            h_t = h[r, t]
            s_t = s[r, t]
            gu = du[r, t] if has_du else 0.0
            if mode != SLTT:
                gu += tau * gh_next
            gs = ds[r, t]
            if mode != DETACH_RESET:
                gs += gu * (b_r - a * h_t)
            g_t = allowed[t] * surrogate_grad(code, h_t - theta, scale)
            gh = gu * (1.0 - a * s_t) + gs * g_t
            if has_dh:
                gh += dh[r, t]
            dx[r, t] = gh
            gh_next = gh
            acc_rho -= gu * s_t
        g_rho[r] = acc_rho


@njit(**config.NJIT_OPTS)
def _neuron_bwd_memoryless(s, h, ds, dh, du, has_dh, has_du, theta, a, b, code, scale, mode, dx,
                           g_rho):
    """:func:`_neuron_bwd` for ``tau = 0`` and no refractory period: ``gh_{t+1}`` enters only
    as ``tau gh_{t+1} = +-0``, so every step is independent (the same operations per element,
    without the reverse-time dependency; equal results up to the sign of a zero)."""
    M, L = s.shape
    for r in range(M):
        b_r = b[r]
        for t in range(L):  # independent steps: a loop without a carried sum vectorises
            h_t = h[r, t]
            s_t = s[r, t]
            gu = du[r, t] if has_du else 0.0
            gs = ds[r, t]
            if mode != DETACH_RESET:
                gs += gu * (b_r - a * h_t)
            g_t = surrogate_grad(code, h_t - theta, scale)
            gh = gu * (1.0 - a * s_t) + gs * g_t
            if has_dh:
                gh += dh[r, t]
            dx[r, t] = gh
        acc_rho = 0.0  # -sum_t du_t s_t, in reverse time as the stateful VJP adds it
        if has_du:
            for t in range(L - 1, -1, -1):
                acc_rho -= du[r, t] * s[r, t]
        g_rho[r] = acc_rho


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_cfg(cfg):
    if not isinstance(cfg, NeuronConfig):
        raise TypeError(f"cfg must be a refimpl.neurons.NeuronConfig, got {type(cfg).__name__}; "
                        "build one with NeuronConfig(reset=..., tau=..., ...)")
    return cfg


def _check_x(name, x):
    x = check_array(name, x, 3)
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one time step (L >= 1), got shape {x.shape}")
    return x


def check_rho(cfg, rho, H):
    """Validate ``rho``: float64 ``(H,)``, finite, ``>= 0``, given iff the reset takes it
    (``Reset.param == "rho"``: ``refractory``).

    Returns ``rho`` (C-contiguous) or ``None``.
    """
    if cfg.reset_rule.param != "rho":
        if rho is not None:
            raise ValueError(f"rho is only used with {_resets_with('param', 'rho')}; got rho "
                             f"with reset={cfg.reset!r} (pass rho=None)")
        return None
    if rho is None:
        raise ValueError(f"reset={cfg.reset!r} needs rho, a float64 array (H,) >= 0 "
                         "(the per-channel refractory magnitude)")
    rho = check_array("rho", rho, 1)
    check_shape("rho", rho, (H,))
    if np.any(rho < 0):
        i = int(np.argmin(rho))
        raise ValueError(f"rho must be >= 0 everywhere, got rho[{i}] = {rho[i]}")
    return rho


def _check_smooth(smooth):
    if not isinstance(smooth, (bool, np.bool_)):
        raise TypeError(f"smooth must be a bool, got {smooth!r} of type {type(smooth).__name__}")
    return bool(smooth)


def reset_coefficients(cfg, rho, H):
    """``(a, b)`` of the unified reset ``u = h (1 - a s) + b s``: ``a`` in {0, 1}, ``b (H,)``."""
    return cfg.reset_rule.coefficients(cfg, rho, H)


def _kernel_args(cfg, rho, Bsz, H):
    """``(theta_fire, a, b_rows (B*H,), R)`` as the kernels take them (see kernel conventions)."""
    a, b = reset_coefficients(cfg, rho, H)
    b_rows = np.ascontiguousarray(np.broadcast_to(b, (Bsz, H)).reshape(-1))  # (B*H,)
    return cfg.theta_fire, a, b_rows, cfg.refractory_steps


class NeuronState(NamedTuple):
    """State of a neuron's rows between chunks (DESIGN.md section 10).

    ``u``: float64 ``(B, H)``, the membrane after reset at the last step, ``u_{T-1}`` (the next
    chunk's ``u_{-1}``; zero state: 0). ``count``: int64 ``(B, H)``, the steps still blocked by
    the absolute refractory period (0 = may fire at the next step; ``0 <= count <=
    refractory_steps``).
    """

    u: np.ndarray
    count: np.ndarray


def neuron_zero_state(B, H):
    """The zero state ``(u = 0.0, count = 0)`` of ``B x H`` rows: the stateless default."""
    B = check_int("B", B, 1)
    H = check_int("H", H, 1)
    return NeuronState(np.zeros((B, H)), np.zeros((B, H), dtype=np.int64))  # (B, H) each


def check_state(state, cfg, B, H, name="state"):
    """Validate a neuron state for ``B x H`` rows of ``cfg``; returns a :class:`NeuronState`.

    ``state`` is a :class:`NeuronState` or any 2-tuple ``(u, count)``: ``u`` float64 ``(B, H)``
    finite; ``count`` of an integer dtype ``(B, H)`` with ``0 <= count <= cfg.refractory_steps``
    (widened to int64, which is lossless; a float or bool count is a TypeError, never cast).
    Errors name the entry (``state.u``, ``state.count``). Arrays are returned C-contiguous.
    """
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name} must be a refimpl.neurons.NeuronState (u, count), got "
                        f"{type(state).__name__}; start from neuron_zero_state(B, H) or take the "
                        "state returned by neuron_fwd(..., return_state=True)")
    u, count = state
    for entry, v in (("u", u), ("count", count)):
        if not isinstance(v, np.ndarray):
            raise TypeError(f"{name}.{entry} must be a numpy.ndarray of shape ({B}, {H}), got "
                            f"{type(v).__name__}")
    if u.dtype != np.float64:
        raise TypeError(f"{name}.u must have dtype float64, got {u.dtype}; refimpl never casts "
                        f"silently: pass {name}.u.astype(np.float64)")
    if count.dtype.kind not in "iu":
        raise TypeError(f"{name}.count must be int64 (the refractory counter), got {count.dtype}; "
                        f"refimpl never casts silently: pass {name}.count.astype(np.int64)")
    for entry, v in (("u", u), ("count", count)):
        if v.shape != (B, H):
            raise ValueError(f"{name}.{entry} must have shape ({B}, {H}) (batch, channels), got "
                             f"{v.shape}")
    if not np.all(np.isfinite(u)):
        i = [int(k) for k in np.argwhere(~np.isfinite(u))[0]]
        raise ValueError(f"{name}.u must be finite, got {u[tuple(i)]} at {i}")
    R = cfg.refractory_steps
    if np.any(count < 0):
        i = [int(k) for k in np.argwhere(count < 0)[0]]
        raise ValueError(f"{name}.count{i} = {count[tuple(i)]} is negative; counts are in "
                         f"[0, refractory_steps = {R}]")
    if np.any(count > R):
        i = [int(k) for k in np.argwhere(count > R)[0]]
        raise ValueError(f"{name}.count{i} = {count[tuple(i)]} exceeds refractory_steps = {R}")
    return NeuronState(np.ascontiguousarray(u), np.ascontiguousarray(count, dtype=np.int64))


def end_state(s, u, cfg, state=None):
    """The state after a chunk, from its hard spikes ``s`` and membranes ``u`` (B, H, L).

    ``u_end = u[..., -1]``; the counter: if the chunk's last spike in a row is at ``j``,
    ``count = max(R - (L-1-j), 0)``; without a spike in the chunk, ``count = max(count0 - L, 0)``
    (``count0`` from ``state``, the chunk's initial state; 0 without). Exact: the kernels'
    counter. For smooth outputs use ``neuron_fwd(..., return_state=True)`` (the counter follows
    the hard spikes, which smooth ``s`` does not show).
    """
    cfg = _check_cfg(cfg)
    s = _check_x("s", s)
    u = check_array("u", u, 3)
    check_shape("u", u, s.shape)
    Bsz, H, L = s.shape
    R = cfg.refractory_steps
    c0 = np.zeros((Bsz, H), dtype=np.int64) if state is None else \
        check_state(state, cfg, Bsz, H).count  # (B, H)
    u_end = u[..., -1].copy()  # (B, H)
    if R == 0:
        return NeuronState(u_end, np.zeros((Bsz, H), dtype=np.int64))
    w = min(R, L)  # only a spike in the last R steps leaves a count > 0
    fired = s[..., L - w:] != 0.0  # (B, H, w)
    since = np.argmax(fired[..., ::-1], axis=-1)  # (B, H) steps since the last spike, L-1-j
    count = np.where(fired.any(-1), R - since, np.maximum(c0 - L, 0))  # (B, H)
    return NeuronState(u_end, count.astype(np.int64))


def _initial_rows(state, cfg, Bsz, H):
    """``(u0 (M,), c0 (M,) int64)`` of ``state`` (zeros for ``None``) as the kernels take them;
    ``u0`` in the current precision (states themselves are float64 only)."""
    if state is None:
        return np.zeros(Bsz * H, float_dtype()), np.zeros(Bsz * H, dtype=np.int64)  # (M,) each
    require_reference("a neuron state")
    state = check_state(state, cfg, Bsz, H)
    return state.u.reshape(-1), state.count.reshape(-1)  # (M,) each


def _check_flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} of type {type(value).__name__}")
    return bool(value)


def neuron_fwd(x, cfg, rho=None, smooth=False, state=None, return_state=False):
    """Run the iterative neuron over ``x``.

    Parameters
    ----------
    x : float64 array (B, H, L)
        Input current, finite; ``L >= 1``.
    cfg : NeuronConfig
    rho : float64 array (H,) or None, default None
        Refractory magnitude, ``>= 0``; required iff the reset takes it (:func:`check_rho`).
    smooth : bool, default False
        Use the surrogate primitive ``G`` in place of ``Theta`` (testing the backward; see the
        module docstring). The refractory mask still follows the hard spikes.
    state : NeuronState or None, default None
        Initial state (:func:`check_state`): the recursion starts from ``u_{-1} = state.u`` and
        steps ``0 .. state.count-1`` cannot fire. ``None`` is the zero state (same results bit
        for bit).
    return_state : bool, default False
        Also return the state this chunk ends in (:func:`end_state`).

    Returns
    -------
    s, h, u : float64 arrays (B, H, L)
        Spikes (0/1, real in smooth mode), membrane before reset, membrane after reset.
        Freshly allocated.
    state : NeuronState
        Only with ``return_state=True``: the end state, to pass to the next chunk.

    Notes
    -----
    DESIGN.md section 4; resets from SpikingSSM (hard, tau = 0.125), snntorch/spikingjelly
    (soft) and SPikE-SSM (refractory). The hard-spike kernel advances four rows together (see
    :func:`_neuron_fwd`); results are bit-identical to the row-by-row loop.
    """
    cfg = _check_cfg(cfg)
    x = _check_x("x", x)
    smooth = _check_smooth(smooth)
    return_state = _check_flag("return_state", return_state)
    if return_state:
        require_reference("neuron_fwd(return_state=True)")
    Bsz, H, L = x.shape
    rho = check_rho(cfg, rho, H)
    u0, c0 = _initial_rows(state, cfg, Bsz, H)  # (M,) each
    theta_fire, a, b_rows, R = _kernel_args(cfg, rho, Bsz, H)
    xr = x.reshape(Bsz * H, L)  # (M, L), M = B*H rows
    s, h, u = (np.empty((Bsz, H, L), x.dtype) for _ in range(3))  # (B, H, L) each
    sr, hr, ur = (v.reshape(Bsz * H, L) for v in (s, h, u))  # views (M, L)
    # rows are independent: ranges of them on refimpl's threads (disjoint writes)
    if smooth:
        sur = get_surrogate(cfg.surrogate)
        c_end = np.empty(Bsz * H, dtype=np.int64)  # (M,)

        def rows(m0, m1):
            _neuron_fwd_smooth(xr[m0:m1], u0[m0:m1], c0[m0:m1], cfg.tau, cfg.theta, theta_fire,
                               a, b_rows[m0:m1], R, sur.code, cfg.scale, sr[m0:m1], hr[m0:m1],
                               ur[m0:m1], c_end[m0:m1])
    elif cfg.tau == 0.0 and R == 0:  # no memory: elementwise (the binary family)
        def rows(m0, m1):
            _neuron_fwd_memoryless(xr[m0:m1], theta_fire, a, b_rows[m0:m1], sr[m0:m1],
                                   hr[m0:m1], ur[m0:m1])
    else:
        def rows(m0, m1):
            _neuron_fwd(xr[m0:m1], u0[m0:m1], c0[m0:m1], cfg.tau, theta_fire, a, b_rows[m0:m1],
                        R if R > 0 else None, sr[m0:m1], hr[m0:m1], ur[m0:m1])
    threads.run(rows, Bsz * H, 4 * x.size)
    if not return_state:
        return s, h, u
    if smooth:
        new = NeuronState(u[..., -1].copy(), c_end.reshape(Bsz, H))  # (B, H) each
    else:
        new = end_state(s, u, cfg, None if state is None else
                        NeuronState(u0.reshape(Bsz, H), c0.reshape(Bsz, H)))
    return s, h, u, new


def neuron_step(x_t, cfg, state, rho=None):
    """One time step of the neuron, ``x_t (B, H)``: the same kernel as :func:`neuron_fwd` on
    ``L = 1``, for a model run step by step.

    Parameters
    ----------
    x_t : float64 array (B, H)
    cfg : NeuronConfig
    state : NeuronState or None
        The state before the step (``None``: the zero state).
    rho : float64 array (H,) or None

    Returns
    -------
    s_t, h_t, u_t : float64 arrays (B, H)
    state : NeuronState
        The state after the step.
    """
    x_t = check_array("x_t", x_t, 2)
    s, h, u, new = neuron_fwd(x_t[:, :, None], cfg, rho=rho, state=state, return_state=True)
    return s[..., 0], h[..., 0], u[..., 0], new


def neuron_bwd(x, s, h, cfg, ds, dh=None, du=None, rho=None, smooth=False, state=None):
    """VJP of :func:`neuron_fwd` for the config's ``grad_mode``.

    Parameters
    ----------
    x : float64 array (B, H, L)
        The forward's input (only its shape is used).
    s, h : float64 arrays (B, H, L)
        Spikes and membrane before reset from any forward that produced them (the iterative
        kernel, PMBC): the only forward outputs the formulas need (not ``u``); in hard mode
        ``s`` must be 0/1.
    cfg : NeuronConfig
    ds : float64 array (B, H, L)
        Cotangent of ``s`` (required).
    dh, du : float64 arrays (B, H, L) or None, default None
        Cotangents of ``h`` and ``u``; ``None`` means zero.
    rho : float64 array (H,) or None
        As in the forward (required iff the reset takes it).
    smooth : bool, default False
        Must match the forward. The surrogate derivative ``g`` is the same in both modes; in
        smooth mode it is exactly the derivative of the forward's ``G``.
    state : NeuronState or None, default None
        The forward's initial state. Only its ``count`` matters here (the refractory mask at the
        start of the chunk); the gradient with respect to the initial state is not returned.

    Returns
    -------
    dx : float64 array (B, H, L)
        Freshly allocated.
    drho : float64 array (H,) or None
        Summed over batch and time (``rho`` is shared by every step); ``None`` unless the
        reset takes ``rho``.

    Notes
    -----
    The recursion is in :func:`_neuron_bwd`; the modes are defined in the module docstring:
    ``bptt`` differentiates everything, ``detach_reset`` treats the spike inside ``reset()`` as
    a constant, ``sltt`` treats ``m_t`` as a constant. The refractory mask is a constant in all
    modes.
    """
    cfg = _check_cfg(cfg)
    x = _check_x("x", x)
    smooth = _check_smooth(smooth)
    shape = x.shape
    Bsz, H, L = shape
    arrays = {}
    for name, v in (("s", s), ("h", h), ("ds", ds), ("dh", dh), ("du", du)):
        if v is None and name in ("dh", "du"):
            arrays[name] = None
            continue
        v = check_array(name, v, 3)
        check_shape(name, v, shape)
        arrays[name] = v
    s, h = arrays["s"], arrays["h"]
    if not smooth and not np.all((s == 0.0) | (s == 1.0)):
        i = tuple(int(k) for k in np.argwhere((s != 0.0) & (s != 1.0))[0])
        raise ValueError(f"s must hold spikes 0/1 when smooth=False, got s{list(i)} = {s[i]}; "
                         "pass smooth=True for the outputs of a smooth forward")
    rho = check_rho(cfg, rho, H)
    _, c0 = _initial_rows(state, cfg, Bsz, H)  # (M,)
    theta_fire, a, b_rows, R = _kernel_args(cfg, rho, Bsz, H)
    M = Bsz * H
    empty = np.empty((0, 0), x.dtype)  # stands in for an absent cotangent (never read)
    dh_r = empty if arrays["dh"] is None else arrays["dh"].reshape(M, L)
    du_r = empty if arrays["du"] is None else arrays["du"].reshape(M, L)
    dx = np.empty(shape, x.dtype)  # (B, H, L)
    g_rho = np.empty(M, x.dtype)  # (M,) per-row sums
    sur = get_surrogate(cfg.surrogate)
    mode = GRAD_MODES[cfg.grad_mode]
    sm, hm, dsm, dxm = (v.reshape(M, L) for v in (s, h, arrays["ds"], dx))  # (M, L) views
    has_dh, has_du = arrays["dh"] is not None, arrays["du"] is not None

    def rows(m0, m1):  # independent rows on refimpl's threads (disjoint writes)
        dh_m = dh_r[m0:m1] if has_dh else dh_r
        du_m = du_r[m0:m1] if has_du else du_r
        if cfg.tau == 0.0 and R == 0:  # no memory: elementwise (the binary family)
            _neuron_bwd_memoryless(sm[m0:m1], hm[m0:m1], dsm[m0:m1], dh_m, du_m, has_dh, has_du,
                                   cfg.theta, a, b_rows[m0:m1], sur.code, cfg.scale, mode,
                                   dxm[m0:m1], g_rho[m0:m1])
        else:
            _neuron_bwd(sm[m0:m1], hm[m0:m1], dsm[m0:m1], dh_m, du_m, has_dh, has_du, c0[m0:m1],
                        cfg.tau, cfg.theta, theta_fire, a, b_rows[m0:m1], R, smooth, sur.code,
                        cfg.scale, mode, dxm[m0:m1], g_rho[m0:m1])
    threads.run(rows, M, 4 * dx.size)
    drho = g_rho.reshape(Bsz, H).sum(0) if cfg.reset_rule.param == "rho" else None  # (H,)
    return dx, drho


def _check_ln_vth(ln_vth, H):
    ln_vth = check_array("ln_vth", ln_vth, 1)
    check_shape("ln_vth", ln_vth, (H,))
    with np.errstate(over="ignore", under="ignore"):
        vth = np.exp(ln_vth)  # (H,)
    if not np.all(np.isfinite(vth) & (vth > 0)):
        i = int(np.argmax(~(np.isfinite(vth) & (vth > 0))))
        raise ValueError(f"exp(ln_vth) must be finite and > 0, but ln_vth[{i}] = {ln_vth[i]} "
                         "overflows or underflows; keep |ln_vth| < 700")
    return ln_vth, vth


def threshold_scale_fwd(y, ln_vth):
    """Learnable threshold by input scaling (SpikingSSM): ``z = y / exp(ln_vth)[h]``.

    Parameters
    ----------
    y : float64 array (B, H, L)
    ln_vth : float64 array (H,)
        Log threshold per channel; the neuron after this runs with ``theta = 1``.

    Returns
    -------
    z : float64 array (B, H, L)
    """
    y = check_array("y", y, 3)
    ln_vth, vth = _check_ln_vth(ln_vth, y.shape[1])
    return y / vth[:, None]  # (B, H, L)


def threshold_scale_bwd(y, ln_vth, dz):
    """VJP of :func:`threshold_scale_fwd`: returns ``(dy (B, H, L), dln_vth (H,))``.

    ``dy = dz / exp(ln_vth)``; ``dln_vth[h] = -sum_{b,t} dz z`` (since ``dz/dln_vth = -z``),
    summed over batch and time. Both freshly allocated.
    """
    y = check_array("y", y, 3)
    ln_vth, vth = _check_ln_vth(ln_vth, y.shape[1])
    dz = check_array("dz", dz, 3)
    check_shape("dz", dz, y.shape)
    z = y / vth[:, None]  # (B, H, L)
    dy = dz / vth[:, None]  # (B, H, L)
    dln_vth = -np.einsum("bhl,bhl->h", dz, z)  # (H,)
    return dy, dln_vth


# ---- the op contract (refimpl.ops) -----------------------------------------------------------


class NeuronCache(NamedTuple):
    """What the neuron's VJP reads (:data:`NEURON_OP`)."""
    x: np.ndarray  # (B, H, L) the input (its shape)
    s: np.ndarray  # (B, H, L) spikes (real in smooth mode)
    h: np.ndarray  # (B, H, L) membrane before reset
    cfg: NeuronConfig
    rho: Optional[np.ndarray]  # (H,) or None
    state: Optional[NeuronState]  # the initial state (its counter masks the first steps)
    smooth: bool


def _neuron_op(inputs, params, cfg=None, state=None, end_state=True, smooth=False):
    cfg = NeuronConfig() if cfg is None else cfg
    x, rho = inputs["x"], params.get("rho")
    if end_state and float_dtype() == np.float64:
        s, h, u, end = neuron_fwd(x, cfg, rho=rho, smooth=smooth, state=state,
                                  return_state=True)
    else:  # states are float64 only (require_reference): the float32 variant has none
        s, h, u = neuron_fwd(x, cfg, rho=rho, smooth=smooth, state=state)
        end = None
    return _ops.Result({"s": s, "h": h, "u": u}, NeuronCache(x, s, h, cfg, rho, state, smooth),
                       end)


def _neuron_op_smooth(inputs, params, cfg=None, state=None, end_state=True):
    return _neuron_op(inputs, params, cfg, state, end_state, smooth=True)


def _neuron_op_vjp(cache, cotangents):
    c = cache
    dx, drho = neuron_bwd(c.x, c.s, c.h, c.cfg, _ops.cotangent(cotangents, "s", c.s),
                          dh=cotangents.get("h"), du=cotangents.get("u"), rho=c.rho,
                          smooth=c.smooth, state=c.state)
    return {"x": dx} if drho is None else {"x": dx, "rho": drho}


def neuron_depth(inputs, params, cfg):
    """Rounding depth of the neuron: ``L`` steps of the recursion; ``drho`` sums ``B L`` more."""
    Bsz, H, L = inputs["x"].shape
    return {"*": L, "drho": Bsz * L + L}


def neuron_examples(rng):
    """Small neuron calls: every reset, both spike conditions, a refractory period, a state,
    and the grad modes whose VJP is a gradient (``bptt``) or not (``detach_reset``, ``sltt``)."""
    out = []
    for i, (reset, rule) in enumerate(RESETS.items()):
        cfg = NeuronConfig(reset=reset, tau=0.6, theta=0.8 if rule.theta_positive else 0.3,
                           u_reset=-0.2 if rule.u_reset else 0.0,
                           refractory_steps=1 if i == 1 else 0,
                           spike_condition="gt" if i % 2 else "ge")
        x = rng.normal(0.5, 0.8, size=(2, 3, 12))
        params = {"rho": rng.uniform(0.1, 0.5, size=3)} if rule.param else {}
        state = None
        if i >= 2:
            state = NeuronState(rng.normal(0.2, 0.3, size=(2, 3)),
                                rng.integers(0, cfg.refractory_steps + 1, size=(2, 3)))
        out.append(_ops.Example({"x": x}, params, cfg, state))
    for mode in ("detach_reset", "sltt"):
        out.append(_ops.Example({"x": rng.normal(0.5, 0.8, size=(2, 2, 10))}, {},
                                NeuronConfig(tau=0.5, grad_mode=mode)))
    return out


def neuron_diagnostics(inputs, params, cfg, result):
    """The spikes and the membrane ``h`` that decided them, against ``theta``."""
    cfg = NeuronConfig() if cfg is None else cfg
    return {"spikes": {"s": result.outputs["s"]},
            "membranes": {"h": (result.outputs["h"], cfg.theta)}}


NEURON_OP = _ops.defop(
    name="neuron",
    math="h_t = tau u_{t-1} + x_t, s_t = Theta(h_t - theta), u_t = h_t (1 - a s_t) + b s_t",
    inputs=("x",), params=("rho",), optional=("rho",), outputs=("s", "h", "u"),
    spikes=("s",), config=NeuronConfig, state=NeuronState, time={"x": 2, "s": 2, "h": 2, "u": 2},
    fwd=_neuron_op, vjp=_neuron_op_vjp, smooth=_neuron_op_smooth,
    exact_vjp=lambda inputs, params, cfg: cfg is None or cfg.grad_mode == "bptt",
    depth=neuron_depth, examples=neuron_examples, diagnostics=neuron_diagnostics,
)
