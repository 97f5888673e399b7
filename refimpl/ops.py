"""The op contract and the op registry (DESIGN.md section 12).

Every op (the S4D kernel and layer, the convolution, the neuron, PMBC, the SDN, GLU, GSU, the
norms, linear, embedding, GELU, pooling, the losses) is entered the same way::

    result = op.fwd(inputs, params, cfg=None, state=None)
    result.outputs      {output name: array}
    result.cache        a named record (a NamedTuple of the op's module) only op.vjp reads
    result.state        the end state (the op's ``state`` NamedTuple), None when stateless
                        (an op with a state also takes ``end_state=False``: the end state is
                        not computed, result.state is None; e.g. the S4D layer's closed form
                        costs twice its forward, which training does not need)
    grads = op.vjp(result.cache, cotangents)
                        {input or parameter name: gradient}

- ``inputs`` and ``params`` are dicts of arrays keyed by the names the op declares
  (:attr:`Op.inputs`, :attr:`Op.params`); a name in :attr:`Op.optional` may be absent (a
  parameter the op does without, e.g. a bias). Extra names are a ``ValueError``.
- ``cfg`` is an instance of :attr:`Op.config` (a frozen dataclass or NamedTuple of scalars), or
  None for the op's defaults (``Op.config()``); ops without a configuration take None.
- ``state`` is an instance of :attr:`Op.state` (a NamedTuple) or None for the zero state (the
  results of a run from the start). Only ops with a time axis have one; they return the state
  they end in, so that a sequence can be run in chunks (:func:`run_chunks`).
- ``cotangents`` maps output names to arrays of the outputs' shapes; a missing (or None)
  cotangent means zero. Non-differentiable outputs (``Op.differentiable`` lists the others,
  e.g. PMBC's iteration count) take none.
- ``vjp`` returns a gradient for every differentiable input and every parameter present
  (``Op.nondiff`` lists the inputs without one, e.g. labels and tokens), in the input's shape.
- A spiking op also has ``smooth``: the same forward with each spike ``Theta(z)`` replaced by
  the primitive ``G(z)`` of its surrogate gradient. ``vjp`` of its cache is the exact gradient
  of that smooth forward: the finite-difference tests check the surrogate backward there.

:data:`OPS` lists every op with its names, its configuration and state types, its tolerance
model (``depth``: rounding depth per output and gradient, DESIGN.md section 9, used by the
golden suites and the float32 checks) and small example arguments (``examples``, used by the
tests that walk the registry: structure, finite differences, dot product, float32, chunked =
whole). An op is registered beside its kernel, in the kernel's module, with :func:`defop`;
:func:`get_op` and :func:`all_ops` import those modules, so the registry is complete whichever
module was imported first. CONTRIBUTING.md ("An op") is the recipe.
"""
import dataclasses
import importlib
from typing import Any, Callable, NamedTuple, Optional

import numpy as np


class Result(NamedTuple):
    """What every op's forward returns."""
    outputs: dict  # output name -> array
    cache: Any  # a named record read by the op's vjp only
    state: Any  # the end state (the op's state NamedTuple), None for a stateless op


class Example(NamedTuple):
    """Arguments of one small call of an op, for the tests that walk the registry."""
    inputs: dict
    params: dict
    cfg: Any = None
    state: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Op:
    """One op of the contract (see the module docstring); register with :func:`defop`.

    - ``name``; ``math``: the formula, one line.
    - ``inputs``, ``params``, ``optional`` (names of either that may be absent), ``outputs``.
    - ``differentiable``: outputs that take a cotangent (default: all); ``nondiff``: inputs
      without a gradient (integer labels, tokens, masks); ``spikes``: outputs holding spikes.
    - ``config``: the configuration type (called with no argument for the defaults) or None.
    - ``state``: the state NamedTuple type, or None for a stateless op; ``time``: for an op
      with a state, ``{input or output name: time axis}`` of the sequences a chunk splits.
    - ``fwd(inputs, params, cfg=None, state=None) -> Result``; ``vjp(cache, cotangents) ->
      {name: gradient}``; ``smooth``: the smooth forward of a spiking op (same signature).
    - ``depth(inputs, params, cfg) -> {name or "*": rounding depth}``: the longest chain of
      dependent roundings of each output (by output name) and gradient (``"d" + name``), the
      ``gamma_n`` model of DESIGN.md section 9; ``"*"`` is the default.
    - ``scales(inputs, params, cfg, cotangents) -> {name: scale}``: the magnitude of the terms
      summed into an output (by name) or gradient (``"d" + name``) where it exceeds the
      result's own (cancellation; e.g. the same op on absolute values); default ``max |T|``.
      The tolerance is ``depth eps scale`` (times the golden files' safety factor).
    - ``diagnostics(inputs, params, cfg, result) -> {"spikes": {name: array}, "membranes":
      {name: (array, threshold)}}``: the spikes a rounding may flip (outputs or internal) and
      the values that decided them, for the golden files' margins and flip rules; default:
      the ``spikes`` outputs, no membranes. The one place a spiking op's margins are derived.
    - ``vjp_from_state``: False when the VJP of a forward started from a nonzero state is not
      implemented (the S4D layer: the state term's gradient; streams are evaluation only).
    - ``float32``: the op runs under ``refimpl.precision.using("float32")`` (else float64 only).
    - ``examples(rng) -> [Example]``: small arguments for the registry tests (every code path
      a config switches on: with and without optional parameters, every reset, ...).
    - ``exact_vjp(inputs, params, cfg) -> bool``: whether the VJP is the gradient of the
      (smooth) forward for those arguments (default: always). A detached backward (the
      neuron's ``detach_reset`` and ``sltt`` modes) is not; its tests compare it with the
      detached graph's tangents.
    """

    name: str
    math: str
    inputs: tuple
    params: tuple
    outputs: tuple
    fwd: Callable
    vjp: Callable
    depth: Callable
    examples: Callable
    optional: tuple = ()
    differentiable: Optional[tuple] = None
    nondiff: tuple = ()
    spikes: tuple = ()
    config: Optional[Callable] = None
    state: Optional[type] = None
    time: dict = dataclasses.field(default_factory=dict)
    smooth: Optional[Callable] = None
    float32: bool = True
    exact_vjp: Optional[Callable] = None
    scales: Optional[Callable] = None
    vjp_from_state: bool = True
    diagnostics: Optional[Callable] = None

    def __post_init__(self):
        if self.differentiable is None:
            object.__setattr__(self, "differentiable", tuple(self.outputs))
        names = self.inputs + self.params
        for group, field in (("optional", self.optional), ("nondiff", self.nondiff)):
            stray = [n for n in field if n not in names]
            if stray:
                raise ValueError(f"op {self.name!r}: {group} names {stray} are neither inputs "
                                 f"nor params ({list(names)})")
        stray = [n for n in self.differentiable + self.spikes if n not in self.outputs]
        if stray:
            raise ValueError(f"op {self.name!r}: {stray} are not outputs ({list(self.outputs)})")
        if (self.state is None) != (not self.time):
            raise ValueError(f"op {self.name!r}: an op with a state declares its time axes "
                             "(time={name: axis}) and a stateless op none")

    @property
    def grads(self):
        """Names the VJP may return: differentiable inputs and parameters."""
        return tuple(n for n in self.inputs + self.params if n not in self.nondiff)

    def default_config(self):
        """``config()`` (the defaults), or None for an op without a configuration."""
        return None if self.config is None else self.config()

    def check_args(self, inputs, params):
        """Validate the names of ``inputs`` and ``params`` (not their values: the kernels do)."""
        for group, given, names in (("inputs", inputs, self.inputs),
                                    ("params", params, self.params)):
            if not isinstance(given, dict):
                raise TypeError(f"op {self.name!r}: {group} must be a dict of arrays by name, "
                                f"got {type(given).__name__}")
            extra = [k for k in given if k not in names]
            missing = [k for k in names if k not in given and k not in self.optional]
            if extra or missing:
                raise ValueError(f"op {self.name!r}: {group} takes {list(names)} (optional: "
                                 f"{[n for n in names if n in self.optional]}); "
                                 f"missing {missing}, unknown {extra}")


#: op name -> :class:`Op`, in registration order.
OPS = {}

#: The modules that register ops (:func:`all_ops` imports them).
OP_MODULES = ("refimpl.ssm", "refimpl.conv", "refimpl.s4d", "refimpl.neurons", "refimpl.pmbc",
              "refimpl.sdn.neuron", "refimpl.sdn.fused", "refimpl.layers", "refimpl.model")


def defop(**fields):
    """Register ``Op(**fields)`` under its name and return it; a name taken is a ValueError."""
    op = Op(**fields)
    if op.name in OPS and OPS[op.name] is not op:
        raise ValueError(f"op {op.name!r} is registered twice")
    OPS[op.name] = op
    return op


def all_ops():
    """Every registered op (after importing :data:`OP_MODULES`), ``{name: Op}``."""
    for module in OP_MODULES:
        importlib.import_module(module)
    return OPS


def get_op(name):
    """The registered op ``name``; ``ValueError`` listing the valid names otherwise."""
    ops = all_ops()
    if name not in ops:
        raise ValueError(f"unknown op {name!r}; valid ops are {', '.join(ops)}")
    return ops[name]


def diagnose(op, inputs, params, cfg, result):
    """``op.diagnostics(...)``, or the default: the spike outputs, no membranes."""
    if op.diagnostics is not None:
        return op.diagnostics(inputs, params, cfg, result)
    return {"spikes": {k: result.outputs[k] for k in op.spikes}, "membranes": {}}


def config_fields(config):
    """The field names of a configuration type (a dataclass or a NamedTuple)."""
    if dataclasses.is_dataclass(config):
        return tuple(f.name for f in dataclasses.fields(config))
    return tuple(config._fields)


def cotangent(cotangents, name, like):
    """The cotangent of output ``name`` (zeros of ``like``'s shape and dtype when missing)."""
    ct = cotangents.get(name)
    return np.zeros_like(like) if ct is None else ct


def optional(mapping, *names):
    """``{name: mapping[name]}`` for the ``names`` present (the optional arguments given)."""
    return {n: mapping[n] for n in names if mapping.get(n) is not None}


def run_chunks(op, inputs, params, cfg, bounds, state=None):
    """Run ``op`` over a sequence in chunks ``[bounds[i], bounds[i + 1])`` of its time axis,
    each started from the previous chunk's end state: ``(outputs concatenated, end state)``.

    Inputs and outputs without a time axis (``op.time``) are passed whole to every chunk, and
    of those outputs the last chunk's is kept. ``bounds`` starts at 0 and ends at the length.
    """
    if op.state is None:
        raise ValueError(f"op {op.name!r} has no state: it cannot be run in chunks")
    parts = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk = {k: (np.take(v, np.arange(lo, hi), axis=op.time[k]) if k in op.time else v)
                 for k, v in inputs.items()}
        res = op.fwd(chunk, params, cfg, state)
        state = res.state
        for k, v in res.outputs.items():
            parts.setdefault(k, []).append(v)
    out = {k: (np.concatenate(v, axis=op.time[k]) if k in op.time else v[-1])
           for k, v in parts.items()}
    return out, state
