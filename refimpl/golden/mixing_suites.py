"""Golden suites of the feature-mixing layers GLU and GSU (DESIGN.md 7).

The GSU's ternariser ``Ter`` acts like a spike: ``Tx`` and ``TW`` are recorded as spikes (flip
detection) and ``|v| / max|v|`` against ``TERNARY_RATIO`` (0.15) as membranes (the ``margin``):
the ``gsu`` op's diagnostics (:func:`refimpl.layers.gsu_diagnostics`).
"""
import math

import numpy as np

from ..layers import TERNARY_RATIO
from .registry import Spec, dyadic, register


# ---- GLU -------------------------------------------------------------------------------------


def _linear_init(rng, shape, fan_in):
    b = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-b, b, size=shape)


def _glu_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=4, L=16, spikes=True, wscale=1.0, edit=None):
        rng = rngs()
        s = ((rng.random((B, H, L)) < 0.3).astype(np.float64) if spikes
             else rng.normal(size=(B, H, L)))
        W = wscale * _linear_init(rng, (2 * H, H), H)
        b = wscale * _linear_init(rng, (2 * H,), H)
        inputs = {"s": s}
        if edit:
            edit(inputs)
        out.append(Spec(comment, list(flags), {"H": H}, inputs, {"W": W, "b": b}))

    add("spike input (rate 0.3), W (2H, H), b (2H,)", ["default"], L=16 * big)
    add("real-valued input (GLU after a non-spiking activation)", spikes=False, L=16 * big)
    add("all-zero input: z = b[:H] sigmoid(b[H:])", ["all_zero"],
        edit=lambda i: i["s"].fill(0.0))
    add("saturation: W, b scaled by 300, |o| up to ~1e3: sigmoid(+-1e3) must not overflow",
        ["saturation"], spikes=False, wscale=300.0)
    add("H = 1", H=1)
    add("H = 16, L = 64", H=16, L=64)
    return out


def _mix_depth(case):
    key = "inputs/s" if "inputs/s" in case.data else "inputs/x"
    Bsz, H, L = case.data[key].shape
    return {"*": H + 8, "grads/W": Bsz * L + 8, "grads/b": Bsz * L + 8, "grads/c": Bsz * L + 8}


register(
    name="glu",
    math="o = W s + b, z = o[:H] sigmoid(o[H:])",
    specs=_glu_specs,
    depth=_mix_depth,
)


# ---- GSU -------------------------------------------------------------------------------------


def _gsu_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=4, L=16, bc=True, edit=None, result="valid", exact=False):
        rng = rngs()
        x = rng.normal(size=(B, H, L))
        W = _linear_init(rng, (H, H), H)
        b = 0.1 * rng.normal(size=H) if bc else np.zeros(H)
        c = 0.1 * rng.normal(size=H) if bc else np.zeros(H)
        inputs, params = {"x": x}, {"W": W, "b": b, "c": c}
        if edit:
            edit(inputs, params)
        out.append(Spec(comment, list(flags), {"H": H, "ternary_ratio": TERNARY_RATIO}, inputs,
                        params, result, exact))

    add("z = (Ter(x) W + b) * (x Ter(W) + c)", ["default"], L=16 * big)
    add("b = c = 0 (their initial values)", bc=False, L=16 * big)

    def zero(i, p):
        i["x"][:] = 0.0

    add("all-zero input: Ter(0) = 0 (max|x| = 0 guard)", ["all_zero"], edit=zero)

    def at_ter(i, p):
        x = dyadic(np.random.default_rng(3), i["x"].shape, -1.0, 1.0, 0.25)
        x[:, 0, :] = 2.0  # max |x| per token = 2
        x[:, 1, :] = 0.3  # = 0.15 * 2 exactly in float64: Ter = 1 (>=)
        x[:, 2, :] = -0.3
        i["x"] = x
        W = p["W"]
        W[0, 0] = 1.0
        W[1, 1] = 0.15 * np.abs(W).max()  # exactly at the weight threshold
        p["W"] = W

    add("values exactly at the ternarisation threshold 0.15 max|v| (>= keeps them); a backend "
        "computing |v| / max|v| >= 0.15 may differ", ["ternary_threshold"], edit=at_ter,
        result="acceptable", exact=True)
    add("H = 16", H=16)
    add("L = 1", ["short_sequence"], L=1)
    return out


register(
    name="gsu",
    math="z = (Ter(x) W + b) (x Ter(W) + c)",
    specs=_gsu_specs,
    depth=_mix_depth,
)
