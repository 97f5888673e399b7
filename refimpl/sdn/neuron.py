"""The SDN neuron (SpikingSSM): the SDN's prediction in place of the LIF's memory.

DESIGN.md section 6. In a model the iterative hard-reset LIF is replaced by::

    m     = SDN(x)                   the fused network (refimpl.sdn.fused), a constant
    s     = Theta(m + x - theta)     ge: m + x >= theta;  gt: m + x > theta
    ds/dx = g(m + x - theta)         no gradient flows through the network

with ``g`` a surrogate of :mod:`refimpl.surrogates`. This is the ``sltt`` backward of the
iterative neuron (:mod:`refimpl.neurons`) with the SDN's ``m`` in place of ``tau u_{t-1}``. At
inference the iterative LIF can replace it. These two functions are the only place the SDN
neuron is written; the model's ``sdn`` activation family calls them.

**State** (DESIGN.md section 10): :class:`SDNState`, the last ``K = 8`` inputs ``window``
float64 ``(B, H, K)``, oldest first. ``m_t`` reads ``x[t-8 .. t-1]`` only, so a chunk started
from a window runs the fused kernel on ``concat(window, x)`` and keeps its last ``L``
positions; the end state is the last ``K`` inputs of the concatenation. The zero window is the
zero padding before ``t = 0`` (today's results). Chunked, stepped and whole-sequence ``m`` are
bit-identical: each position's sums add the same products in the same order
(``k = 0 .. K-1``), and where the whole run skips a tap before ``t = 0`` the chunked run adds
``w * 0.0 = +-0``, which leaves a nonzero sum unchanged and a zero sum zero (its sign is
erased by the ReLU, which maps ``-0`` to ``0``).

Precision: the float arrays documented as float64 are float32 under
``refimpl.precision.using("float32")`` (the training variant, :mod:`refimpl.precision`);
nothing is cast: the inputs must be of the current precision.
"""
from typing import NamedTuple

import numpy as np

from .. import ops as _ops
from .._checks import check_array, check_int, check_shape
from ..precision import float_dtype, require_reference
from ..neurons import NeuronConfig
from ..surrogates import get_surrogate
from .fused import WEIGHT_NAMES, FusedCache, fused_bwd, fused_fwd, random_weights, sdn_forward
from .weights import K


class SDNState(NamedTuple):
    """The SDN neuron's state: the last ``K = 8`` inputs, oldest first."""
    window: np.ndarray  # float64 (B, H, K)


def sdn_zero_state(B, H):
    """The zero state (the zero padding before ``t = 0``): ``window`` zeros ``(B, H, K)``."""
    B = check_int("B", B, 1)
    H = check_int("H", H, 1)
    return SDNState(np.zeros((B, H, K)))


def check_sdn_state(state, B, H, name="state"):
    """Validate an SDN neuron state for ``(B, H)`` inputs; returns it (window C-contiguous)."""
    if not isinstance(state, SDNState):
        raise TypeError(f"{name} must be a refimpl.sdn.SDNState (the SDN neuron's window of "
                        f"the last {K} inputs), got {type(state).__name__}; start from "
                        "refimpl.sdn.sdn_zero_state(B, H) or wrap the window: SDNState(window)")
    window = check_array(f"{name}.window", state.window, 3)
    check_shape(f"{name}.window", window, (B, H, K))
    return SDNState(window)


def _check_cfg(cfg):
    """The SDN predicts a hard-reset LIF with ``u_reset = 0`` and no refractory period."""
    if not isinstance(cfg, NeuronConfig):
        raise TypeError(f"cfg must be a refimpl.neurons.NeuronConfig, got {type(cfg).__name__}")
    if cfg.reset != "hard":
        raise ValueError(f"reset must be 'hard' for the SDN neuron (the SDN predicts a "
                         f"hard-reset LIF), got reset={cfg.reset!r}")
    if cfg.u_reset != 0.0:
        raise ValueError(f"u_reset must be 0 for the SDN neuron (the SDN predicts a LIF that "
                         f"resets to 0), got u_reset={cfg.u_reset}")
    if cfg.refractory_steps != 0:
        raise ValueError(f"refractory_steps must be 0 for the SDN neuron, got "
                         f"refractory_steps={cfg.refractory_steps}")
    return cfg


def sdn_neuron_fwd(x, weights, cfg, m=None, smooth=False, state=None, return_state=False):
    """SDN neuron forward: ``s = Theta(m + x - theta)`` with ``m = SDN(x)`` a constant.

    Parameters
    ----------
    x : float64 (B, H, L)
    weights : dict or str or os.PathLike
        Fused weights ``w0 .. w5`` or a weights file; not used when ``m`` is given.
    cfg : refimpl.neurons.NeuronConfig
        ``theta``, ``spike_condition``, ``surrogate`` and ``surrogate_scale`` are used;
        ``reset`` must be ``"hard"`` (with ``u_reset = 0``, ``refractory_steps = 0``). ``tau``
        is fixed by the weights (the published network: 0.125) and ``grad_mode`` by the SDN
        (``m`` is a constant), so both are ignored.
    m : float64 (B, H, L) or None, default None
        A precomputed (frozen) SDN prediction; None runs :func:`~refimpl.sdn.sdn_forward`.
    smooth : bool, default False
        Emit the surrogate's primitive ``G(m + x - theta)`` instead of the Heaviside (``m``
        still a constant), so that finite differences check :func:`sdn_neuron_bwd`.
    state : SDNState or None, default None
        The window of the ``K`` inputs before ``x[..., 0]`` (the previous chunk's end state);
        None: zeros. Not used for ``m`` when ``m`` is given.
    return_state : bool, default False
        Also return the end state: the last ``K`` inputs of ``concat(window, x)``.

    Returns
    -------
    s : float64 (B, H, L)
        Spikes in {0, 1} (or ``G(m + x - theta)`` when ``smooth``).
    m : float64 (B, H, L)
        The SDN prediction; pass it to :func:`sdn_neuron_bwd`.
    state : SDNState
        Only when ``return_state``.
    """
    cfg = _check_cfg(cfg)
    x = check_array("x", x, 3)
    xc = x
    if state is not None or return_state:
        require_reference("sdn_neuron_fwd with a state")
        Bsz, H, L = x.shape
        if state is None:
            state = sdn_zero_state(Bsz, H)
        state = check_sdn_state(state, Bsz, H)
        xc = np.concatenate([state.window, x], axis=-1)  # (B, H, K + L), oldest first
    if m is None:
        m, _ = sdn_forward(xc, weights, theta=cfg.theta)  # (B, H, L) or (B, H, K + L)
        m = m[..., xc.shape[-1] - x.shape[-1]:]  # (B, H, L): the chunk's positions
    else:
        m = check_array("m", m, 3)
        if m.shape != x.shape:
            raise ValueError(f"x and m must have the same shape, got x {x.shape}, m {m.shape}")
    v = m + x  # (B, H, L) what the spike test compares with theta
    if smooth:
        s = get_surrogate(cfg.surrogate).primitive(v - cfg.theta, cfg.surrogate_scale)
    else:
        s = (v >= cfg.theta_fire).astype(v.dtype)  # (B, H, L), the neuron's one spike test
    if not return_state:
        return s, m
    return s, m, SDNState(xc[..., -K:].copy())  # (B, H, K)


def sdn_neuron_step(x_t, weights, cfg, state):
    """One step of the SDN neuron: ``(s_t, m_t, state)`` for ``x_t`` float64 ``(B, H)``.

    ``m_t = SDN(window)`` (the last ``K`` inputs, oldest first), ``s_t = Theta(m_t + x_t -
    theta)``; the new window drops the oldest input and appends ``x_t``. Bit-identical to
    position ``t`` of :func:`sdn_neuron_fwd` on the whole sequence.
    """
    x_t = check_array("x_t", x_t, 2)
    s, m, state = sdn_neuron_fwd(x_t[..., None], weights, cfg, state=state, return_state=True)
    return s[..., 0], m[..., 0], state


def sdn_neuron_bwd(x, m, cfg, ds):
    """SDN neuron backward: ``dx = ds * g(m + x - theta)`` (no gradient through the SDN).

    Parameters
    ----------
    x, m : float64 (B, H, L)
        Input and the SDN prediction returned by :func:`sdn_neuron_fwd`.
    cfg : refimpl.neurons.NeuronConfig
        As in the forward (``theta``, ``surrogate``, ``surrogate_scale``).
    ds : float64 (B, H, L)
        Cotangent of the spikes.

    Returns
    -------
    dx : float64 (B, H, L), newly allocated.
    """
    cfg = _check_cfg(cfg)
    x = check_array("x", x, 3)
    m = check_array("m", m, 3)
    ds = check_array("ds", ds, 3)
    if m.shape != x.shape or ds.shape != x.shape:
        raise ValueError(f"x, m and ds must have the same shape, got x {x.shape}, m {m.shape}, "
                         f"ds {ds.shape}")
    return ds * get_surrogate(cfg.surrogate).grad(m + x - cfg.theta, cfg.surrogate_scale)


# ---- the op contract (refimpl.ops) -----------------------------------------------------------


def sdn_diagnostics(inputs, cfg, result):
    """The spikes and what the spike test compares with ``theta``: ``m + x``."""
    theta = (NeuronConfig() if cfg is None else cfg).theta
    return {"spikes": {"s": result.outputs["s"]},
            "membranes": {"m+x": (result.outputs["m"] + inputs["x"], theta)}}


class SDNNeuronCache(NamedTuple):
    """What the SDN neuron's VJP reads."""
    x: np.ndarray  # (B, H, L)
    m: np.ndarray  # (B, H, L) the SDN prediction (a constant)
    cfg: NeuronConfig


def _neuron_op(inputs, params, cfg=None, state=None, end_state=True, smooth=False):
    cfg = NeuronConfig() if cfg is None else cfg
    x, m = inputs["x"], inputs.get("m")
    if end_state and float_dtype() == np.float64:
        s, m, end = sdn_neuron_fwd(x, params, cfg, m=m, smooth=smooth, state=state,
                                   return_state=True)
    else:  # states are float64 only
        s, m = sdn_neuron_fwd(x, params, cfg, m=m, smooth=smooth, state=state)
        end = None
    return _ops.Result({"s": s, "m": m}, SDNNeuronCache(x, m, cfg), end)


def _neuron_op_smooth(inputs, params, cfg=None, state=None, end_state=True):
    return _neuron_op(inputs, params, cfg, state, end_state, smooth=True)


def _neuron_op_vjp(cache, cotangents):
    return {"x": sdn_neuron_bwd(cache.x, cache.m, cache.cfg,
                                _ops.cotangent(cotangents, "s", cache.x))}


def _neuron_examples(rng):
    """The SpikingSSM setting, ``gt`` with another surrogate, from a window, and a frozen
    ``m`` (whose smooth forward the VJP differentiates exactly)."""
    x = rng.normal(0.5, 1.0, size=(2, 2, 11))
    return [
        _ops.Example({"x": x}, random_weights(rng), NeuronConfig(tau=0.125)),
        _ops.Example({"x": x[:, :, :6]}, random_weights(rng),
                     NeuronConfig(tau=0.125, spike_condition="gt", surrogate="atan"),
                     SDNState(rng.normal(size=(2, 2, K)))),
        _ops.Example({"x": x, "m": rng.normal(0.3, 0.5, size=x.shape)}, random_weights(rng),
                     NeuronConfig(tau=0.125, theta=0.8)),
    ]


SDN_NEURON_OP = _ops.defop(
    name="sdn_neuron",
    math="s = Theta(m + x - theta), m = SDN(x) a constant; dx = ds g(m + x - theta)",
    inputs=("x", "m"), params=WEIGHT_NAMES, optional=("m",), nondiff=("m",) + WEIGHT_NAMES,
    outputs=("s", "m"), differentiable=("s",), spikes=("s",), config=NeuronConfig,
    state=SDNState, time={"x": 2, "m": 2, "s": 2}, fwd=_neuron_op, vjp=_neuron_op_vjp,
    smooth=_neuron_op_smooth, exact_vjp=lambda inputs, params, cfg: "m" in inputs,
    depth=lambda inputs, params, cfg: {"*": 32}, examples=_neuron_examples,
    diagnostics=lambda inputs, params, cfg, result: sdn_diagnostics(inputs, cfg, result),
)


class SDNCache(NamedTuple):
    """What the ``sdn`` op's VJP reads: the network's cache and the spike's arguments."""
    fused: FusedCache
    x: np.ndarray
    m: np.ndarray
    cfg: NeuronConfig


def _sdn_op(inputs, params, cfg=None, state=None):
    cfg = NeuronConfig() if cfg is None else cfg
    x = inputs["x"]
    m, s = sdn_forward(x, params, theta=cfg.theta, spike_condition=cfg.spike_condition)
    _, fused = fused_fwd(x, params)
    return _ops.Result({"m": m, "s": s}, SDNCache(fused, x, m, cfg), None)


def _sdn_op_vjp(cache, cotangents):
    c = cache
    g = get_surrogate(c.cfg.surrogate).grad(c.m + c.x - c.cfg.theta, c.cfg.surrogate_scale)
    dm = cotangents.get("m")
    _, dw = fused_bwd(c.fused, np.zeros_like(c.x) if dm is None else dm)
    return {"x": _ops.cotangent(cotangents, "s", c.x) * g, **dw}


SDN_OP = _ops.defop(
    name="sdn", math="m = fused SDN(x), s = Theta(m + x - theta); dx = ds g(m + x - theta)",
    inputs=("x",), params=WEIGHT_NAMES, outputs=("m", "s"), spikes=("s",), config=NeuronConfig,
    fwd=_sdn_op, vjp=_sdn_op_vjp,
    # the golden suite's surrogate path: dx ignores dm/dx (as the SDN neuron does), so the VJP
    # is no gradient; its parts are: sdn_fused (the weights' gradients) and sdn_neuron (dx)
    exact_vjp=lambda inputs, params, cfg: False,
    depth=lambda inputs, params, cfg: {"*": 32, **{"d" + k: inputs["x"].size + 32
                                                   for k in WEIGHT_NAMES}, "dx": 32},
    examples=lambda rng: [_ops.Example({"x": rng.normal(size=(2, 2, 10))}, random_weights(rng),
                                       NeuronConfig(tau=0.125))],
    diagnostics=lambda inputs, params, cfg, result: sdn_diagnostics(inputs, cfg, result),
    float32=False,
)
