"""The suite registry: :class:`Spec`, :class:`Suite`, :data:`SUITES` and :func:`register`.

A suite is one op family. Its module defines the case specifications and its tolerance model
and registers them in one call; a suite of a registered op (:mod:`refimpl.ops`) is computed by
that op, with no code of its own::

    register(
        name="fftconv",                        # the op refimpl.ops.get_op("fftconv")
        math="y[t] = sum_{s<=t} K0[t-s] u[s] + D u[t]",
        specs=_fftconv_specs,                  # (rngs, size) -> [Spec]
        scales=_fftconv_scales,                # tolerance model (generate.py); the depth
    )                                          # is the op's (Op.depth) unless given

The op reads the case's ``inputs/<name>`` and ``params/<name>`` by its declared names and its
configuration from the case attributes of the same names; a case holding the initial state
(``inputs/<field>0`` per state field, complex fields as ``_re``/``_im`` pairs) is run from it and
writes the end state (``outputs/<field>_end``, or the suite's ``state_out`` pattern). The
outputs that get a cotangent, the spikes and the spikes' margins (``Op.diagnostics``) are the
op's. A suite that is not one op (a block, a model) passes ``fwd`` and ``bwd`` itself.

Adding a suite = one module (or one ``register`` block in a family module) imported by
``refimpl/golden/__init__.py``. Suites are generated and checked in registration order.
"""
import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..h5io import FileFormatError
from ..ops import config_fields, diagnose, get_op
from .schema import DEFAULT_DIR, SIZES


@dataclasses.dataclass
class Spec:
    """A case before refimpl ran it. ``exact`` marks dyadic inputs that every float64
    arithmetic computes exactly: no perturbation, and a zero margin stays ``valid``."""

    comment: str
    flags: list
    config: dict
    inputs: dict
    params: dict
    result: str = "valid"
    exact: bool = False
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Suite:
    """One op family (keyword arguments only; see :func:`register`).

    - ``name``: the suite (file ``<name>.h5``); ``op``: the case attribute (default ``name``);
      ``math``: the formula the cases sample, shown by ``refimpl golden show``.
    - ``specs(rngs, size) -> [Spec]``: the cases; ``rngs()`` returns the next case's generator.
    - ``fwd(case) -> (outputs, state, diag)``; ``bwd(case, state, cotangents) -> grads``.
      ``diag`` may hold ``spikes`` (name -> array, for flip detection) and ``membranes``
      (name -> (array, threshold), for margins). Omitted (None) for the suite of a registered
      op ``op``: derived from it (:func:`op_fwd`, :func:`op_bwd`), as are ``differentiable``
      and ``spikes``. ``state_in``/``state_out``: the patterns of the state datasets' names.
    - ``differentiable``: outputs that get a N(0, 1) cotangent, unless ``cotangents(outputs,
      rng)`` supplies them; ``spikes``: outputs compared exactly.
    - Tolerance model: ``depth(case) -> {path or group/* or *: depth}`` (default: the op's,
      :func:`op_depth`); ``scales(case, outputs,
      grads, cot) -> {path: scale}`` (default ``max |T|``); ``floors(case) -> {path: minimal
      atol}``; ``meta(case) -> {path: attrs}`` adds dataset attributes.
    - Spike structure, read by the verifier (:mod:`.spikes`): ``flips`` says how a spike flip
      within the membrane bound propagates: ``"rows"`` (a stateful neuron: the flip changes its
      row from that step on; the outputs hold the membrane ``h``), ``"elements"`` (a stateless
      spike: only itself; the outputs hold ``m`` and the inputs ``x``), or ``""`` (spikes, if
      any, are internal: ``fwd``'s ``diag`` names their membranes). ``ternary``: spike outputs
      that hold -1/0/1 (the others 0/1). ``causal(case) -> {output name: time axis}``: outputs
      whose value at step ``t`` depends on steps ``<= t`` only, compared before the first step
      at which an internal spike may flip.
    """

    name: str
    specs: Callable
    depth: Optional[Callable] = None
    fwd: Optional[Callable] = None
    bwd: Optional[Callable] = None
    differentiable: Optional[tuple] = None
    op: str = ""
    math: str = ""
    scales: Optional[Callable] = None
    floors: Optional[Callable] = None
    spikes: tuple = ()
    cotangents: Optional[Callable] = None
    meta: Optional[Callable] = None
    flips: str = ""
    ternary: tuple = ()
    causal: Optional[Callable] = None
    state_in: str = "{}0"
    state_out: str = "{}_end"

    def __post_init__(self):
        if not self.op:
            object.__setattr__(self, "op", self.name)
        if self.fwd is None or self.bwd is None:
            op = get_op(self.op)
            object.__setattr__(self, "fwd", functools.partial(op_fwd, op, self))
            object.__setattr__(self, "bwd", functools.partial(op_bwd, op))
            if self.differentiable is None:
                object.__setattr__(self, "differentiable", op.differentiable)
            if not self.spikes:
                object.__setattr__(self, "spikes", op.spikes)
        if self.depth is None:  # the op's own tolerance model (refimpl.ops: Op.depth)
            object.__setattr__(self, "depth", functools.partial(op_depth, get_op(self.op)))
        if self.differentiable is None:
            raise ValueError(f"suite {self.name!r}: a suite with its own fwd/bwd lists its "
                             "differentiable outputs")
        if self.flips not in ("", "rows", "elements"):
            raise ValueError(f"suite {self.name!r}: flips must be '', 'rows' or 'elements', "
                             f"got {self.flips!r}")


def read_state(op, pattern, data):
    """The op's initial state from ``inputs/<pattern(field)>`` (complex as ``_re``/``_im``),
    or None when the case holds none."""
    if op.state is None:
        return None
    fields = {}
    for f in op.state._fields:
        key = "inputs/" + pattern.format(f)
        if key in data:
            fields[f] = data[key]
        elif key + "_re" in data:
            fields[f] = data[key + "_re"] + 1j * data[key + "_im"]
        else:
            return None
    return op.state(**fields)


def _state_outputs(state, pattern):
    """``{pattern(field): array}`` of an end state, complex fields as ``_re``/``_im`` pairs."""
    out = {}
    for f, v in zip(state._fields, state):
        name = pattern.format(f)
        if np.iscomplexobj(v):
            out.update({name + "_re": v.real.copy(), name + "_im": v.imag.copy()})
        else:
            out[name] = v
    return out


def op_args(op, case):
    """``(inputs, params, cfg)`` of a case for ``op``: arrays by the op's names, the
    configuration from the case attributes named as its fields."""
    inputs = {n: case.data["inputs/" + n] for n in op.inputs if "inputs/" + n in case.data}
    params = {n: case.data["params/" + n] for n in op.params if "params/" + n in case.data}
    cfg = None
    if op.config is not None:
        cfg = op.config(**{k: case.config[k] for k in config_fields(op.config)
                           if k in case.config})
    return inputs, params, cfg


def op_fwd(op, suite, case):
    """A suite's forward through its registered op: ``(outputs, cache, diag)``."""
    inputs, params, cfg = op_args(op, case)
    state = read_state(op, suite.state_in, case.data)
    res = op.fwd(inputs, params, cfg, state)
    outputs = dict(res.outputs)
    if state is not None:
        outputs.update(_state_outputs(res.state, suite.state_out))
    return outputs, res.cache, diagnose(op, inputs, params, cfg, res)


def op_depth(op, case):
    """The suite's depth table from the op's (:attr:`refimpl.ops.Op.depth`): an output's name
    becomes ``outputs/<name>``, a gradient's ``d<name>`` ``grads/<name>``, ``*`` stays."""
    inputs, params, cfg = op_args(op, case)
    table = {}
    for k, d in op.depth(inputs, params, cfg).items():
        if k == "*":
            table[k] = d
        elif k not in op.outputs and k[1:] in op.grads:
            table["grads/" + k[1:]] = d
        else:
            table["outputs/" + k] = d
    return table


def op_bwd(op, case, cache, cotangents):
    """A suite's VJP through its registered op."""
    return op.vjp(cache, cotangents)


#: suite name -> :class:`Suite`, in registration (= generation) order.
SUITES = {}


def register(**fields):
    """Register the suite ``Suite(**fields)`` under its name and return it.

    Raises ``ValueError`` if the name is taken (two modules defining one suite).
    """
    suite = Suite(**fields)
    if suite.name in SUITES:
        raise ValueError(f"golden suite {suite.name!r} is registered twice")
    SUITES[suite.name] = suite
    return suite


def get_suite(name):
    """The registered suite ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites are {', '.join(SUITES)}")
    return SUITES[name]


def rngs(seed, suite):
    """Factory of per-case generators: case ``i`` draws from ``[seed, crc32(suite), i]`` only."""
    key = zlib.crc32(suite.encode())
    state = {"i": 0}

    def next_rng():
        rng = np.random.default_rng([seed, key, state["i"]])
        state["i"] += 1
        return rng

    return next_rng


#: op name -> the suite derived from the op (:func:`judging_suite`), built on first use.
_OP_SUITES = {}


def judging_suite(name):
    """The suite a file of suite ``name`` is judged with: the registered golden suite, else,
    for a registered op without one (``refimpl conform``'s case files of ``linear``,
    ``layernorm``, ...), the suite derived from the op (no specs of its own: nothing to
    generate, everything to verify). ``ValueError`` listing both otherwise."""
    if name in SUITES:
        return SUITES[name]
    if name not in _OP_SUITES:
        from ..ops import all_ops
        ops = all_ops()
        if name not in ops:
            raise ValueError(f"unknown suite {name!r}; valid suites are {', '.join(SUITES)} "
                             f"and the ops {', '.join(o for o in ops if o not in SUITES)}")
        op = ops[name]
        scales = functools.partial(op_scales, op) if op.scales is not None else None
        _OP_SUITES[name] = Suite(name=name, specs=None, math=op.math, scales=scales)
    return _OP_SUITES[name]


def op_scales(op, case, outputs, grads, cotangents):
    """A derived suite's scales from the op's (:attr:`refimpl.ops.Op.scales`): an output's
    name becomes ``outputs/<name>``, a gradient's ``d<name>`` ``grads/<name>`` (as
    :func:`op_depth`)."""
    inputs, params, cfg = op_args(op, case)
    table = {}
    for k, v in op.scales(inputs, params, cfg, cotangents).items():
        if k not in op.outputs and k[1:] in op.grads:
            table["grads/" + k[1:]] = v
        else:
            table["outputs/" + k] = v
    return table


def suite_specs(name, seed=0, size="small"):
    """The case specifications of suite ``name``: list of ``(id, Spec)``."""
    suite = get_suite(name)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes are {list(SIZES)}")
    specs = suite.specs(rngs(seed, name), size)
    return [(f"{i:04d}", s) for i, s in enumerate(specs)]


def golden_path(name_or_path, golden_dir=DEFAULT_DIR):
    """A golden file named by path or by suite.

    An existing path is returned as is; otherwise a registered suite name gives
    ``<golden_dir>/<name>.h5`` (the installed committed set by default), so that
    ``refimpl golden show neuron`` works from any folder. Anything else raises a one-line
    :class:`~refimpl.h5io.FileFormatError` listing the suites.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path) in SUITES:
        return Path(golden_dir) / f"{name_or_path}.h5"
    raise FileFormatError(f"{name_or_path}: no such file, and not a suite name "
                          f"(suites: {', '.join(SUITES)})")


def maxabs(a):
    """``max |a|`` as a float (0 for an empty array): the default scale of a tensor."""
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def dyadic(rng, shape, lo=-1.0, hi=2.0, step=0.125):
    """Multiples of ``step`` in [lo, hi]: sums and halvings of these are exact in float64."""
    n = int(round((hi - lo) / step))
    return lo + step * rng.integers(0, n + 1, size=shape).astype(np.float64)
