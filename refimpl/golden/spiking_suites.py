"""Golden suites of the spiking neurons (DESIGN.md 4), PMBC (5) and the fused SDN (6).

Spikes compare exactly and record their ``margin`` (min |membrane - threshold|); cases whose
margin is within the membrane's rounding bound become ``acceptable``. Membranes ``h``, ``u``
get at least :func:`refimpl.pmbc.rounding_bound` (any evaluation order with chunks of up to 64
steps), through the suites' ``floors``.
"""
import functools

import numpy as np

from ..neurons import RESETS, NeuronConfig
from ..pmbc import rounding_bound
from ..ops import get_op
from ..sdn import fold, init_train_params
from ..sdn.fused import random_weights
from ..sdn.weights import C
from ..surrogates import SURROGATES
from .registry import Spec, dyadic, op_args, read_state, register

#: What the neuron and PMBC cases sample (``golden show``).
NEURON_MATH = "m_t = tau u_{t-1}, h_t = m_t + x_t, s_t = Theta(h_t - theta), u_t = reset(h_t, s_t)"

#: The resets of the committed (schema v1) neuron cases, in the order of their per-reset case
#: lists, and PMBC's order. Frozen: the cases of a reset registered beyond these
#: (:data:`refimpl.neurons.RESETS`) are appended after every v1 case (:func:`_new_reset_specs`),
#: so a new reset adds cases and renumbers none.
V1_RESETS = ("hard", "soft", "refractory", "none")
V1_PMBC_RESETS = ("soft", "refractory", "hard", "none")

#: The default configuration (the ``default`` flag marks its case).
_DEFAULT = NeuronConfig()


# ---- neurons and PMBC ------------------------------------------------------------------------


def _neuron_config(reset="hard", tau=0.5, theta=1.0, u_reset=0.0, refractory_steps=0,
                   spike_condition="ge", surrogate="triangle", surrogate_scale=None,
                   grad_mode="bptt"):
    """The scalar attributes of a neuron case (NeuronConfig fields, surrogate_scale resolved)."""
    if surrogate_scale is None:
        surrogate_scale = SURROGATES[surrogate].default_scale
    return dict(reset=reset, tau=float(tau), theta=float(theta), u_reset=float(u_reset),
                refractory_steps=int(refractory_steps), spike_condition=spike_condition,
                surrogate=surrogate, surrogate_scale=float(surrogate_scale), grad_mode=grad_mode)


def _neuron_specs(rngs, size, pmbc=False):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=3, L=32, shift=0.5, scale=1.0, x=None, rho=None,
            result="valid", exact=False, state=None, **cfg):
        rng = rngs()
        config = _neuron_config(**cfg)
        if x is None:
            x = shift + scale * rng.normal(size=(B, H, L))
        elif callable(x):
            x = x(rng)
        params = {}
        if RESETS[config["reset"]].param == "rho":
            params["rho"] = rng.uniform(0.0, 1.5, size=x.shape[1]) if rho is None else rho
        inputs = {"x": x}
        if state is not None:  # stateful cases (appended): state(rng, config, x) -> (u0, count0)
            u0, count0 = state(rng, config, x)
            inputs.update(u0=np.asarray(u0, dtype=np.float64),
                          count0=np.asarray(count0, dtype=np.int64))
        out.append(Spec(comment, list(flags), config, inputs, params, result, exact))

    sur = ["triangle", "atan", "sigmoid", "fast_sigmoid", "rectangle"]
    taus = [0.125, 0.5, 0.9, 0.25]
    resets = V1_PMBC_RESETS if pmbc else V1_RESETS
    i = 0
    for reset in resets:
        rule = RESETS[reset]
        for gm in ("bptt", "detach_reset", "sltt"):
            extra = {"u_reset": [0.0, -0.5, 0.3][i % 3]} if rule.u_reset else {}
            theta = 0.0 if not rule.theta_positive and i % 2 else [1.0, 0.5, 2.0][i % 3]
            default = reset == _DEFAULT.reset and gm == _DEFAULT.grad_mode
            flags = ["default"] if default else []
            add(f"reset {reset}, grad_mode {gm}, surrogate {sur[i % 5]}, "
                f"{['ge', 'gt'][i % 2]}, tau {taus[i % 4]}", flags, L=32 * big,
                shift=0.6 * (theta if theta else 1.0), reset=reset, grad_mode=gm,
                surrogate=sur[i % 5], spike_condition=["ge", "gt"][i % 2], tau=taus[i % 4],
                theta=theta, **extra)
            i += 1
    for j, reset in enumerate(resets):
        add(f"absolute refractory period R = {j + 1}, reset {reset}", L=32 * big, shift=1.0,
            reset=reset, refractory_steps=j + 1, surrogate=sur[j], grad_mode="bptt",
            spike_condition=["gt", "ge"][j % 2], tau=0.5)
    add("non-default surrogate scales: triangle w = 0.5", reset="soft", surrogate="triangle",
        surrogate_scale=0.5)
    add("atan a = 4, sigmoid-like sharpness", reset="refractory", surrogate="atan",
        surrogate_scale=4.0, grad_mode="detach_reset")
    add("rectangle w = 2, fast_sigmoid-free wide window", reset="hard", surrogate="rectangle",
        surrogate_scale=2.0, grad_mode="sltt")
    add("fast_sigmoid k = 10", reset="none", surrogate="fast_sigmoid", surrogate_scale=10.0)

    def at_threshold(rng, B=2, H=2, L=16):
        x = dyadic(rng, (B, H, L))
        x[:, :, 0] = 1.0  # h_0 = x_0 = theta exactly: spike for ge, none for gt
        x[:, :, 1] = 0.5
        x[:, :, 2] = 0.75  # soft/hard from u_1 = 0.5 or 0.25 ... stays dyadic
        return x

    for cond in ("ge", "gt"):
        for reset in ("hard", "soft"):
            add(f"membrane exactly at theta = 1 at t = 0 (and later): {cond} decides; dyadic "
                f"inputs with tau = 0.5 are exact in any float64 arithmetic",
                ["at_threshold", "spike_at_t0"] if cond == "ge" else ["at_threshold"],
                x=at_threshold, exact=True, reset=reset, spike_condition=cond, tau=0.5,
                surrogate="atan")
    add("membrane within an ulp of theta (tau = 0.1, x_0 = 0.7, x_1 = 0.93): rounding decides",
        ["near_threshold"], x=np.array([[[0.7, 0.93, 0.2, 0.8, 0.93, 0.0, 0.7, 0.93]]]),
        result="acceptable", reset="none", tau=0.1, surrogate="triangle")
    add("all-zero input: no spike, gradients through the surrogate at h - theta = -theta",
        ["all_zero"], x=lambda rng: np.zeros((2, 3, 16)), reset="hard", tau=0.125)
    add("spike at t = 0 in every row (x_0 = theta + 0.5)", ["spike_at_t0"],
        x=lambda rng: np.concatenate([np.full((2, 3, 1), 1.5), rng.normal(size=(2, 3, 15))], -1),
        reset="refractory", tau=0.5)
    add("long sequence, tau = 0.9", ["long_sequence"], B=1, H=1, L=(1024 if pmbc else 2048) * big,
        shift=0.2,
        reset="soft" if pmbc else "hard", tau=0.9, surrogate="sigmoid")
    add("saturation: x ~ 1e6 spikes at every step, surrogate tails ~ 0", ["saturation"],
        x=lambda rng: 1e6 * (1.0 + rng.random((2, 2, 16))), reset="soft", tau=0.5,
        surrogate="atan")
    add("saturation: tau = 0.99 soft reset accumulates, spikes most steps", ["saturation"],
        shift=3.0, reset="soft", tau=0.99, surrogate="fast_sigmoid")
    add("memoryless Heaviside (Binary S4D): reset none, tau = 0, theta = 0", reset="none",
        tau=0.0, theta=0.0, shift=0.0, surrogate="atan")
    add("refractory with rho = 0 (equals soft reset)", rho=np.zeros(3), reset="refractory",
        tau=0.5)
    add("hard reset to u_reset = -0.5 with negative inputs (a reset can raise the membrane)",
        shift=-0.3, scale=1.5, reset="hard", u_reset=-0.5, tau=0.5)
    add("B = H = L = 1", ["short_sequence"], B=1, H=1, L=1, shift=1.5, reset="soft")
    add("tau = 1 is outside [0, 1): must be rejected", ["invalid_config"], result="invalid",
        reset="soft", tau=1.0)
    add("tau = -0.25 is outside [0, 1): must be rejected", ["invalid_config"], result="invalid",
        reset="hard", tau=-0.25)
    add("NaN input: must be rejected", ["nan_input"], result="invalid",
        x=lambda rng: np.where(np.arange(32) == 5, np.nan, rng.normal(size=(2, 3, 32))),
        reset="hard")
    add("negative rho: must be rejected", ["invalid_config"], result="invalid",
        rho=np.array([0.5, -0.1, 0.2]), reset="refractory")
    add("theta = 0 with a hard reset: must be rejected (theta > 0 required)", ["invalid_config"],
        result="invalid", reset="hard", theta=0.0)
    _stateful_specs(add, resets)
    _new_reset_specs(add, [r for r in RESETS if r not in V1_RESETS], big)
    return out


def _random_state(umax=1.5, counts=False):
    """``state(rng, config, x)``: ``u0`` uniform in ``[-umax/2, umax] theta`` (some rows above
    threshold), ``count0`` uniform in ``[0, refractory_steps]`` (zeros unless ``counts``)."""
    def state(rng, config, x):
        B, H = x.shape[:2]
        th = config["theta"] if config["theta"] else 1.0
        u0 = th * rng.uniform(-0.5 * umax, umax, size=(B, H))
        R = config["refractory_steps"]
        c0 = rng.integers(0, R + 1, size=(B, H)) if counts and R else np.zeros((B, H), int)
        if counts and R:  # every count value 0 .. R occurs
            c0.reshape(-1)[:R + 1] = np.arange(R + 1)
        return u0, c0
    return state


def _stateful_specs(add, resets):
    """Stateful cases (DESIGN.md 10; appended to schema v1, the cases above are unchanged):
    ``inputs/u0`` (B, H) float64 and ``inputs/count0`` (B, H) int64 -> extra outputs
    ``u_end``, ``count_end``; grads as for the others, given the state's counter."""
    sur = ["atan", "triangle", "sigmoid", "fast_sigmoid"]
    for j, reset in enumerate(resets):
        gm = ("bptt", "detach_reset", "sltt")[j % 3]
        extra = {"u_reset": 0.25} if RESETS[reset].u_reset else {}
        add(f"stateful: reset {reset}, grad_mode {gm}, initial membrane u0 != 0 (some rows start "
            "above threshold), count0 = 0", ["stateful"], L=24, shift=0.4, reset=reset,
            grad_mode=gm, surrogate=sur[j], tau=[0.5, 0.25, 0.9, 0.125][j],
            spike_condition=["ge", "gt"][j % 2], state=_random_state(), **extra)
    for j, reset in enumerate(resets):
        R = j + 2
        extra = {"u_reset": -0.25} if RESETS[reset].u_reset else {}
        add(f"stateful: absolute refractory period R = {R}, reset {reset}, initial counts "
            f"0 .. {R} (rows with count0 > 0 cannot fire at steps 0 .. count0-1 even above "
            "threshold)", ["stateful"], L=24, shift=1.0, reset=reset, refractory_steps=R,
            grad_mode="bptt", surrogate=sur[j], tau=0.5, spike_condition="ge",
            state=_random_state(umax=3.0, counts=True), **extra)

    def at_theta(rng, config, x):
        # h_0 = tau u0 + x_0 = 0.5 * 1.5 + 0.25 = 1 = theta exactly (dyadic: exact everywhere)
        B, H = x.shape[:2]
        return np.full((B, H), 1.5), np.zeros((B, H), int)

    def x_at_theta(rng, B=2, H=2, L=16):
        x = dyadic(rng, (B, H, L))
        x[:, :, 0] = 0.25
        return x

    for cond in ("ge", "gt"):
        add(f"stateful: the initial state puts h_0 = tau u0 + x_0 exactly at theta = 1 "
            f"(tau = 0.5, u0 = 1.5, x_0 = 0.25; dyadic, exact in any float64 arithmetic): "
            f"{cond} decides", ["stateful", "at_threshold"], x=x_at_theta, exact=True,
            reset="soft", spike_condition=cond, tau=0.5, surrogate="atan", state=at_theta)

    def near(rng, config, x):
        # h_0 within a few ulps of theta from the state alone (x_0 = 0 in every row)
        B, H = x.shape[:2]
        return np.full((B, H), 1.0 / 0.9 + 2e-16), np.zeros((B, H), int)

    add("stateful: u0 = 1/0.9 (+ an ulp), x_0 = 0, tau = 0.9: h_0 = tau u0 within rounding of "
        "theta = 1", ["stateful", "near_threshold"],
        x=lambda rng: np.concatenate([np.zeros((1, 2, 1)), rng.normal(0.3, 1.0, (1, 2, 7))], -1),
        result="acceptable", reset="soft", tau=0.9, surrogate="triangle", state=near)

    def hard_state(rng, config, x):
        B, H = x.shape[:2]
        u0 = np.where(rng.random((B, H)) < 0.5, config["u_reset"], rng.uniform(-1.0, 1.5, (B, H)))
        return u0, rng.integers(0, config["refractory_steps"] + 1, size=(B, H))

    add("stateful: hard reset to u_reset = 0.5 != 0, rows starting at u_reset (just reset) and "
        "elsewhere, R = 1 with counts 0 / 1", ["stateful"], L=24, shift=0.7, scale=1.2,
        reset="hard", u_reset=0.5, refractory_steps=1, tau=0.5, surrogate="sigmoid",
        state=hard_state)
    add("stateful: L = 1, one step from a state (the step a chip runs)",
        ["stateful", "short_sequence"], L=1, shift=0.6, reset="refractory", refractory_steps=2,
        tau=0.5, state=_random_state(umax=3.0, counts=True))

    def too_many(rng, config, x):
        B, H = x.shape[:2]
        c0 = np.zeros((B, H), int)
        c0[0, 1] = config["refractory_steps"] + 1
        return np.zeros((B, H)), c0

    add("stateful: count0 = refractory_steps + 1 is out of range: must be rejected",
        ["stateful", "invalid_config"], result="invalid", reset="soft", refractory_steps=2,
        state=too_many)

    def nan_u0(rng, config, x):
        B, H = x.shape[:2]
        u0 = np.zeros((B, H))
        u0[1, 0] = np.nan
        return u0, np.zeros((B, H), int)

    add("stateful: NaN in the initial membrane u0: must be rejected", ["stateful", "nan_input"],
        result="invalid", reset="hard", state=nan_u0)


def _new_reset_specs(add, resets, big):
    """Cases of the resets registered beyond :data:`V1_RESETS`, appended after the v1 cases in
    registration order, five per reset: each grad mode (surrogates, ``ge``/``gt``, ``tau`` and
    ``theta`` varied; ``theta = 0`` where the reset allows it, ``u_reset != 0`` and a drawn
    ``rho`` where it takes them), an absolute refractory period, and a stateful case (``u0``
    and counts ``0 .. R``)."""
    sur = ["triangle", "atan", "sigmoid", "fast_sigmoid", "rectangle"]
    for j, reset in enumerate(resets):
        rule = RESETS[reset]
        for k, gm in enumerate(("bptt", "detach_reset", "sltt")):
            theta = 0.0 if not rule.theta_positive and k == 1 else [1.0, 0.5, 2.0][k]
            extra = {"u_reset": [0.25, -0.5, 0.3][k]} if rule.u_reset else {}
            add(f"reset {reset}, grad_mode {gm}, surrogate {sur[(j + k) % 5]}, "
                f"{['ge', 'gt'][k % 2]}, tau {[0.125, 0.5, 0.9][k]}", L=32 * big,
                shift=0.6 * (theta if theta else 1.0), reset=reset, grad_mode=gm,
                surrogate=sur[(j + k) % 5], spike_condition=["ge", "gt"][k % 2],
                tau=[0.125, 0.5, 0.9][k], theta=theta, **extra)
        extra = {"u_reset": -0.25} if rule.u_reset else {}
        add(f"absolute refractory period R = 2, reset {reset}", L=32 * big, shift=1.0,
            reset=reset, refractory_steps=2, surrogate=sur[(j + 3) % 5], spike_condition="gt",
            tau=0.5, **extra)
        add(f"stateful: reset {reset}, R = 2, initial membrane u0 != 0 (some rows start above "
            "threshold) and counts 0 .. 2", ["stateful"], L=24, shift=1.0, reset=reset,
            refractory_steps=2, surrogate=sur[(j + 4) % 5], tau=0.5,
            state=_random_state(umax=3.0, counts=True), **extra)


def _neuron_floors(case):
    """PMBC's rounding bound of the membranes (the neuron and PMBC cases are the same)."""
    op = get_op(case.op)
    inputs, params, cfg = op_args(op, case)
    state = read_state(op, "{}0", case.data)
    b = rounding_bound(inputs["x"], cfg, params.get("rho"), state=state)
    floors = {"outputs/h": b, "outputs/u": b, "membrane/h": b}
    if state is not None:
        floors["outputs/u_end"] = b
    return floors


#: What the neuron and PMBC suites share: outputs, exact spikes and the tolerance model.
_NEURON_OUTPUTS = dict(floors=_neuron_floors, flips="rows")

register(
    name="neuron",
    math=NEURON_MATH,
    specs=functools.partial(_neuron_specs, pmbc=False),
    **_NEURON_OUTPUTS,
)

register(
    name="pmbc",
    math="PMBC fixed-point iteration S_{k+1} = F(S_k) of the neuron below; " + NEURON_MATH,
    specs=functools.partial(_neuron_specs, pmbc=True),
    **_NEURON_OUTPUTS,
)


# ---- SDN -------------------------------------------------------------------------------------


def _sdn_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=2, L=32, theta=1.0, spike_condition="ge",
            surrogate="triangle", surrogate_scale=None, result="valid", edit=None):
        rng = rngs()
        w = random_weights(rng)
        x = rng.normal(size=(B, H, L))
        if edit:
            x = edit(x)
        scale = SURROGATES[surrogate].default_scale if surrogate_scale is None else surrogate_scale
        cfg = dict(tau=0.125, theta=float(theta), spike_condition=spike_condition,
                   surrogate=surrogate, surrogate_scale=float(scale))
        out.append(Spec(comment, list(flags), cfg, {"x": x}, w, result))

    add("SpikingSSM setting: tau = 0.125, theta = 1, ge, triangle", ["default"], L=32 * big)
    add("gt, atan surrogate", spike_condition="gt", surrogate="atan", L=32 * big)
    add("sigmoid surrogate, a = 2", surrogate="sigmoid", surrogate_scale=2.0)
    add("fast_sigmoid surrogate", surrogate="fast_sigmoid")
    add("rectangle surrogate, theta = 0.5", surrogate="rectangle", theta=0.5)
    add("L = 5 < 8 taps: the window is partly before t = 0", ["short_sequence"], L=5)
    add("L = 1: m_0 = b3 + sum_c w3[c] relu(b2 + W2 relu(b1) + relu(b1))", ["short_sequence"],
        L=1)
    add("all-zero input", ["all_zero"], edit=lambda x: np.zeros_like(x))
    add("long sequence, L = 2048", ["long_sequence"], B=1, H=1, L=2048 * big)

    def nan(x):
        x[1, 0, 4] = np.nan
        return x

    add("NaN input: must be rejected", ["nan_input"], result="invalid", edit=nan)

    # Appended (schema v1; the cases above are unchanged): the weights come from
    # refimpl.sdn.fold(params, buffers) of a small *training* network, not from random fused
    # weights, so the suite covers the BatchNorm folding (encoder and eval-mode BatchNorms
    # folded into w0..w5). The running statistics are non-trivial (mean != 0, var != 1), and
    # the BatchNorm affine parameters are moved off 1 / 0, so a fold that ignores any of them,
    # or uses the wrong epsilon, gives other weights and outputs.
    rng = rngs()
    params, buffers = init_train_params(seed=rng, init="lif")
    for k in ("bn1", "bn2"):
        buffers[f"{k}.running_mean"] = rng.normal(0.0, 0.5, size=buffers[f"{k}.running_mean"].shape)
        buffers[f"{k}.running_var"] = rng.uniform(0.2, 3.0, size=buffers[f"{k}.running_var"].shape)
        params[f"{k}.weight"] = params[f"{k}.weight"] * rng.uniform(0.5, 1.5, size=C)
        params[f"{k}.bias"] = params[f"{k}.bias"] + rng.normal(0.0, 0.2, size=C)
    w = fold(params, buffers)
    x = rng.normal(size=(2, 2, 32))
    cfg = dict(tau=0.125, theta=1.0, spike_condition="ge", surrogate="triangle",
               surrogate_scale=float(SURROGATES["triangle"].default_scale))
    out.append(Spec("weights from refimpl.sdn.fold of a training network (init 'lif') with "
                    "non-trivial BatchNorm running statistics and affine parameters",
                    ["bn_folding"], cfg, {"x": x}, w, "valid"))
    return out


register(
    name="sdn",
    math="m = fused SDN(x), s = Theta(m + x - theta); dx = ds g(m + x - theta)",
    specs=_sdn_specs,
    flips="elements",
)
