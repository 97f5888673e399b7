"""A toy op registered from outside the library: what a new op must write, and nothing more.

``toy_leaky``: a leaky integrator with a per-channel input gain, ``y_t = a y_{t-1} + w x_t``
over ``x (B, H, L)``, ``w (H,)``, with ``a`` in the configuration and ``y_{-1}`` the state.
Importing this module registers it; tests/test_ops.py then walks it like every library op
(structure, finite differences, dot product, float32, chunked = whole) and
tests/test_golden_ops.py derives a golden suite from it. Written in plain NumPy (a loop over
time) to keep it short.
"""
from typing import NamedTuple

import numpy as np

from refimpl import ops
from refimpl.precision import float_dtype


class ToyConfig(NamedTuple):
    a: float = 0.5


class ToyState(NamedTuple):
    y: np.ndarray  # (B, H), the last output


class ToyCache(NamedTuple):
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    a: float


def _fwd(inputs, params, cfg=None, state=None, end_state=True):
    cfg = ToyConfig() if cfg is None else cfg
    x, w = inputs["x"], params["w"]
    dtype = float_dtype()
    if x.dtype != dtype or w.dtype != dtype:
        raise TypeError(f"toy_leaky takes {dtype} arrays, got x {x.dtype}, w {w.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError("toy_leaky: x holds NaN or inf")
    a = dtype.type(cfg.a)
    prev = np.zeros(x.shape[:2], dtype) if state is None else state.y.astype(dtype)
    y = np.empty_like(x)
    for t in range(x.shape[2]):
        prev = a * prev + w[None, :] * x[..., t]
        y[..., t] = prev
    end = ToyState(y[..., -1].copy()) if end_state else None
    return ops.Result({"y": y}, ToyCache(x, y, w, cfg.a), end)


def _vjp(cache, cotangents):
    dy = ops.cotangent(cotangents, "y", cache.y)
    a = cache.y.dtype.type(cache.a)
    g = np.zeros(cache.y.shape[:2], cache.y.dtype)  # dL/dy_t, accumulated from later steps
    dx = np.empty_like(cache.x)
    dw = np.zeros(cache.w.shape, cache.y.dtype)
    for t in reversed(range(cache.x.shape[2])):
        g = a * g + dy[..., t]
        dx[..., t] = g * cache.w[None, :]
        dw += np.sum(g * cache.x[..., t], axis=0)
    return {"x": dx, "w": dw}


def _examples(rng):
    return [ops.Example({"x": rng.normal(size=(2, 3, 9))}, {"w": rng.normal(size=3)},
                        ToyConfig(0.7)),
            ops.Example({"x": rng.normal(size=(1, 2, 5))}, {"w": rng.normal(size=2)},
                        ToyConfig(0.2), ToyState(rng.normal(size=(1, 2))))]


TOY_OP = ops.defop(
    name="toy_leaky", math="y_t = a y_{t-1} + w x_t",
    inputs=("x",), params=("w",), outputs=("y",), config=ToyConfig, state=ToyState,
    time={"x": 2, "y": 2}, fwd=_fwd, vjp=_vjp,
    depth=lambda inputs, params, cfg: {"*": 2 * inputs["x"].shape[2] + 2},
    examples=_examples,
)
