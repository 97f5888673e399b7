"""Hypothesis strategies for the iterative neurons: physically valid configs and small inputs.

Configs draw ``0 <= tau < 1``, ``theta > 0`` (any real for ``reset="none"``), ``rho >= 0``,
``R`` in 0..3, both spike conditions, every surrogate, grad mode and reset. Inputs are drawn
from a seed (a ``numpy`` generator makes the array), with the shape, location and scale drawn by
hypothesis; lengths include values above the fast kernel's grouping threshold
(``3 * _SKEW = 48``) so its prologue/joint/epilogue path and the leftover rows are exercised.

``quantized=True`` rounds everything to multiples of 1/8 and keeps ``tau, theta`` dyadic, so
that early membranes hit ``h == theta`` exactly: the ``ge``/``gt`` tie cases.
"""
import numpy as np
from hypothesis import strategies as st

from refimpl.neurons import GRAD_MODES, RESETS, SPIKE_CONDITIONS, NeuronConfig
from refimpl.surrogates import SURROGATES

RESET_NAMES = tuple(RESETS)
GRAD_MODE_NAMES = tuple(GRAD_MODES)
SURROGATE_NAMES = tuple(SURROGATES)
CONDITIONS = tuple(SPIKE_CONDITIONS)

#: Lengths: short ones, and some past the 4-row kernel's threshold of 48 steps.
LENGTHS = st.one_of(st.integers(1, 16), st.sampled_from([47, 48, 49, 50, 65, 97]))


def _floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def neuron_configs(draw, resets=RESET_NAMES, grad_modes=GRAD_MODE_NAMES,
                   surrogates=SURROGATE_NAMES, conditions=CONDITIONS, max_refractory=3,
                   quantized=False):
    """A valid :class:`NeuronConfig` drawn over the given option sets."""
    reset = draw(st.sampled_from(resets))
    rule = RESETS[reset]  # what the reset allows: theta of any sign, a u_reset
    if quantized:
        tau = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
        thetas = [0.5, 1.0, 1.5, 2.0] + ([] if rule.theta_positive else [0.0, -0.5])
        theta = draw(st.sampled_from(thetas))
        u_reset = draw(st.sampled_from([0.0, -0.25, 0.5])) if rule.u_reset else 0.0
    else:
        tau = draw(st.one_of(st.sampled_from([0.0, 0.125, 0.5, 0.9]), _floats(0.0, 0.95)))
        theta = draw(_floats(0.1, 3.0) if rule.theta_positive else _floats(-1.0, 2.0))
        u_reset = draw(_floats(-1.0, 0.5)) if rule.u_reset else 0.0
    surrogate = draw(st.sampled_from(surrogates))
    return NeuronConfig(
        reset=reset, tau=tau, theta=theta, u_reset=u_reset,
        refractory_steps=draw(st.integers(0, max_refractory)),
        spike_condition=draw(st.sampled_from(conditions)),
        surrogate=surrogate,
        surrogate_scale=draw(st.one_of(st.none(), _floats(0.5, 4.0))),
        grad_mode=draw(st.sampled_from(grad_modes)),
    )


@st.composite
def neuron_inputs(draw, cfg, max_B=2, max_H=3, lengths=LENGTHS, quantized=False):
    """``(x (B, H, L), rho (H,) or None)`` for ``cfg``; inputs of either sign and several scales."""
    Bsz = draw(st.integers(1, max_B))
    H = draw(st.integers(1, max_H))
    L = draw(lengths)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    loc = draw(st.sampled_from([-0.5, 0.0, 0.3, 0.8]))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    x = rng.normal(loc, scale, size=(Bsz, H, L))  # (B, H, L)
    rho = rng.uniform(0.0, 1.5, size=H) if cfg.reset_rule.param else None  # (H,)
    if quantized:
        x = np.round(x * 8.0) / 8.0
        rho = None if rho is None else np.round(rho * 8.0) / 8.0
    return x, rho


def cotangents(rng, shape):
    """Random cotangents ``(ds, dh, du)`` of the neuron's three outputs."""
    return tuple(rng.normal(size=shape) for _ in range(3))
