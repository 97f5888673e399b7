"""NumPy adapters of the reference for ``refimpl conform`` (issue 24), with planted bugs.

Adapters (the protocol of :mod:`refimpl.conform`): objects with, for every registered op,
``<op>(inputs, params, state=None, **config)``, ``<op>_vjp(inputs, params, cotangents,
state=None, **config)`` and, for the ops with a state, ``<op>_step(inputs, params, state,
**config)``. They are built from the op registry (:func:`refimpl.ops.all_ops`), one loop, not
one copy per op.

- :data:`reference`: refimpl's registered ops themselves (``op.fwd``, ``op.vjp``) in float64:
  "a NumPy adapter of the reference". Rejections are refimpl's ``ValueError``/``TypeError``;
  the VJP of the S4D layer from a nonzero state (``op.vjp_from_state`` False) raises
  ``NotImplementedError`` (conform asks for no gradients there).
- :data:`reference32`: the same at float32. Every float input, parameter, state and cotangent
  is rounded to float32 when read (complex to complex64); outputs and gradients are float32
  (int64 stays int64). An op with ``op.float32`` runs under ``refimpl.precision.using(
  "float32")``; the others, and every call from a given state (refimpl's float32 variant has
  no states), run in float64 from the rounded values and round the results once. From the
  zero state the float32 variant returns no end state: the neuron's and the SDN neuron's are
  derived from the float32 outputs (``u_end = u[..., -1]``, the refractory counter replayed
  from the spikes; the window = the last 8 inputs), the S4D layer's modes are computed in
  float64 from the rounded values.
- :data:`BUGS`: ``{name: (op, adapter, description)}``, the reference with one op wrong under
  the condition the description names (every one deterministic, every error far beyond
  rounding: a relative error of at least 1e-3 or a flipped spike / a wrong counter). Three of
  them no committed golden case exposes (``tests/test_conform_adapters.py`` checks that):
  :data:`REQUIRED` (only at ``L > 1000``, only from a nonzero refractory count, only for
  ``H`` not a multiple of 8).

:func:`write_candidate` writes an adapter's candidate file for a golden file (forward from the
case's state, the end state, the VJP for the case's cotangents, a rejection as ``error``), for
``refimpl golden verify``.
"""
import math
import types

import numpy as np

from refimpl import precision
from refimpl.golden.registry import read_state
from refimpl.golden.schema import CANDIDATE_SCHEMA, Case, read_golden, write_file
from refimpl.ops import all_ops, config_fields, get_op

#: refimpl's own ops, when this module is imported (a test may later register a toy op)
OPS = {n: o for n, o in all_ops().items() if o.fwd.__module__.startswith("refimpl.")}


# ============================================================================================
# Helpers
# ============================================================================================

def _cfg(op, config):
    """The op's configuration from the keywords (``op.config(**config)``; None without one)."""
    if op.config is None:
        if config:
            raise TypeError(f"op {op.name!r} takes no configuration, got {sorted(config)}")
        return None
    return op.config(**config)


def _state_tuple(op, state, read):
    """``op.state`` from ``{field: array}`` (each array through ``read``), or None."""
    if state is None:
        return None
    if op.state is None:
        raise ValueError(f"op {op.name!r} has no state, got {type(state).__name__}")
    if not isinstance(state, dict):
        raise TypeError(f"op {op.name!r}: state must be a dict {{field: array}}, got "
                        f"{type(state).__name__}")
    missing = [f for f in op.state._fields if f not in state]
    extra = [f for f in state if f not in op.state._fields]
    if missing or extra:
        raise ValueError(f"op {op.name!r}: the state has the fields {list(op.state._fields)}; "
                         f"missing {missing}, unknown {extra}")
    return op.state(**{f: read(state[f]) for f in op.state._fields})


def _end_entries(st):
    """``{<field>_end: array}`` of an end state (complex fields as ``_end_re``/``_end_im``)."""
    out = {}
    for f, v in zip(st._fields, st):
        v = np.asarray(v)
        if np.iscomplexobj(v):
            out[f + "_end_re"] = np.ascontiguousarray(v.real)
            out[f + "_end_im"] = np.ascontiguousarray(v.imag)
        else:
            out[f + "_end"] = v.copy()
    return out


def _read(a, real, complex_):
    """An array as ``real`` / ``complex_`` (integers kept)."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return a.astype(real)
    if a.dtype.kind == "c":
        return a.astype(complex_)
    return a


def _read64(a):
    """An array as float64 / complex128 (integers kept)."""
    return _read(a, np.float64, np.complex128)


def _read32(a):
    """An array rounded to float32 / complex64 (integers kept)."""
    return _read(a, np.float32, np.complex64)


def _up(a):
    """A float32 / complex64 array widened exactly to float64 / complex128."""
    return _read64(a)


def _out32(a):
    """A result as float32 (int64 kept; complex parts are split before this)."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def _cotangents(op, cotangents):
    """The cotangents of the op's differentiable outputs (None dropped); others refused."""
    if not isinstance(cotangents, dict):
        raise TypeError(f"op {op.name!r}: cotangents must be a dict {{output: array}}, got "
                        f"{type(cotangents).__name__}")
    unknown = [k for k in cotangents if k not in op.outputs]
    if unknown:
        raise ValueError(f"op {op.name!r}: cotangents of unknown outputs {unknown} (outputs: "
                         f"{list(op.outputs)})")
    return {k: v for k, v in cotangents.items() if v is not None and k in op.differentiable}


def _check_step(op, inputs):
    """A step form is called with one time step."""
    for name, axis in op.time.items():
        if name in inputs and np.shape(inputs[name])[axis] != 1:
            raise ValueError(f"op {op.name!r}: the step form takes one time step, got "
                             f"{name} of shape {np.shape(inputs[name])}")


def _vjp_state(op, st):
    """The state the VJP starts from: an op without a VJP from a nonzero state raises
    NotImplementedError there (the zero state is the stateless run)."""
    if st is not None and not op.vjp_from_state:
        if any(np.any(np.asarray(v) != 0) for v in st):
            raise NotImplementedError(f"op {op.name!r}: the VJP from a nonzero state is not "
                                      "implemented (refimpl: op.vjp_from_state is False)")
        return None
    return st


# ============================================================================================
# The float64 reference
# ============================================================================================

def forward64(op, inputs, params, state, config):
    """``(outputs with the end state, Result)`` of refimpl's op in float64."""
    op.check_args(inputs, params)
    cfg = _cfg(op, config)
    st = _state_tuple(op, state, _read64)
    res = op.fwd({k: _read64(v) for k, v in inputs.items()},
                 {k: _read64(v) for k, v in params.items()}, cfg, st)
    out = {k: np.asarray(v) for k, v in res.outputs.items()}
    if res.state is not None:
        out.update(_end_entries(res.state))
    return out, res


def vjp64(op, inputs, params, cotangents, state, config):
    """The gradients of refimpl's op in float64 (its forward recomputed)."""
    op.check_args(inputs, params)
    cfg = _cfg(op, config)
    st = _vjp_state(op, _state_tuple(op, state, _read64))
    cot = {k: _read64(v) for k, v in _cotangents(op, cotangents).items()}
    res = op.fwd({k: _read64(v) for k, v in inputs.items()},
                 {k: _read64(v) for k, v in params.items()}, cfg, st)
    return {k: np.asarray(v) for k, v in op.vjp(res.cache, cot).items()}


def _make64(op):
    def fwd(inputs, params, state=None, **config):
        return forward64(op, inputs, params, state, config)[0]

    def vjp(inputs, params, cotangents, state=None, **config):
        return vjp64(op, inputs, params, cotangents, state, config)

    def step(inputs, params, state, **config):
        _check_step(op, inputs)
        return forward64(op, inputs, params, state, config)[0]

    return fwd, vjp, step


# ============================================================================================
# The float32 variant
# ============================================================================================

def _neuron_end32(op, out, config, inputs):
    """The neuron's end state from its float32 outputs (zero start): ``u_end = u[..., -1]``,
    the counter replayed from the spikes (a spike sets it to R, a step without one lowers it)."""
    R = int(config.get("refractory_steps", 0))
    s = out["s"]
    cnt = np.zeros(s.shape[:2], np.int64)
    for t in range(s.shape[2]):
        cnt = np.where(s[..., t] != 0, R, np.maximum(cnt - 1, 0))
    return {"u_end": out["u"][..., -1].copy(), "count_end": cnt}


def _sdn_neuron_end32(op, out, config, inputs):
    """The SDN neuron's end window from a zero start: the last 8 of ``concat(zeros, x)``."""
    x = _read32(inputs["x"])
    K = 8
    ext = np.concatenate([np.zeros(x.shape[:2] + (K,), x.dtype), x], axis=-1)
    return {"window_end": ext[..., -K:].copy()}


#: ops whose float32 variant returns no end state: how it is derived (None: float64)
_END32 = {"neuron": _neuron_end32, "sdn_neuron": _sdn_neuron_end32}


def forward32(op, inputs, params, state, config):
    """The op at float32 (module docstring): outputs and end state as float32 / int64."""
    op.check_args(inputs, params)
    cfg = _cfg(op, config)
    in32 = {k: _read32(v) for k, v in inputs.items()}
    p32 = {k: _read32(v) for k, v in params.items()}
    st32 = _state_tuple(op, state, _read32)
    if op.float32 and st32 is None:
        with precision.using("float32"):
            res = op.fwd(in32, p32, cfg, None)
        out = {k: _out32(v) for k, v in res.outputs.items()}
        if op.state is not None:
            if res.state is not None:
                out.update({k: _out32(v) for k, v in _end_entries(res.state).items()})
            elif op.name in _END32:
                out.update(_END32[op.name](op, out, config, inputs))
            else:  # the end state in float64 from the rounded values (S4D layer's modes)
                res64 = op.fwd({k: _up(v) for k, v in in32.items()},
                               {k: _up(v) for k, v in p32.items()}, cfg, None)
                if res64.state is not None:
                    out.update({k: _out32(v) for k, v in _end_entries(res64.state).items()})
        return out
    st64 = None if st32 is None else op.state(*[_up(v) for v in st32])
    res = op.fwd({k: _up(v) for k, v in in32.items()}, {k: _up(v) for k, v in p32.items()},
                 cfg, st64)
    out = dict(res.outputs)
    if res.state is not None:
        out.update(_end_entries(res.state))
    return {k: _out32(v) for k, v in out.items()}


def vjp32(op, inputs, params, cotangents, state, config):
    """The op's gradients at float32 (as :func:`forward32`)."""
    op.check_args(inputs, params)
    cfg = _cfg(op, config)
    in32 = {k: _read32(v) for k, v in inputs.items()}
    p32 = {k: _read32(v) for k, v in params.items()}
    cot32 = {k: _read32(v) for k, v in _cotangents(op, cotangents).items()}
    st32 = _vjp_state(op, _state_tuple(op, state, _read32))
    if op.float32 and st32 is None:
        with precision.using("float32"):
            res = op.fwd(in32, p32, cfg, None)
            grads = op.vjp(res.cache, cot32)
        return {k: _out32(v) for k, v in grads.items()}
    st64 = None if st32 is None else op.state(*[_up(v) for v in st32])
    res = op.fwd({k: _up(v) for k, v in in32.items()}, {k: _up(v) for k, v in p32.items()},
                 cfg, st64)
    grads = op.vjp(res.cache, {k: _up(v) for k, v in cot32.items()})
    return {k: _out32(v) for k, v in grads.items()}


def _make32(op):
    def fwd(inputs, params, state=None, **config):
        return forward32(op, inputs, params, state, config)

    def vjp(inputs, params, cotangents, state=None, **config):
        return vjp32(op, inputs, params, cotangents, state, config)

    def step(inputs, params, state, **config):
        _check_step(op, inputs)
        return forward32(op, inputs, params, state, config)

    return fwd, vjp, step


# ============================================================================================
# Adapters
# ============================================================================================

def make_adapter(name, make):
    """An adapter object: for every registered op ``<op>``, ``<op>_vjp`` and (ops with a
    state) ``<op>_step`` from ``make(op) -> (fwd, vjp, step)``."""
    fns = {}
    for op_name, op in OPS.items():
        fwd, vjp, step = make(op)
        fwd.__name__, vjp.__name__, step.__name__ = op_name, op_name + "_vjp", op_name + "_step"
        fns[op_name] = fwd
        fns[op_name + "_vjp"] = vjp
        if op.state is not None:
            fns[op_name + "_step"] = step
    return types.SimpleNamespace(NAME=name, **fns)


#: refimpl's ops in float64
reference = make_adapter("reference", _make64)
#: refimpl's ops at float32 (inputs rounded when read, float32 results)
reference32 = make_adapter("reference32", _make32)


def patched(name, base=None, **fns):
    """``base`` (default :data:`reference`) with the functions ``fns`` replaced."""
    base = reference if base is None else base
    attrs = dict(vars(base))
    for k, f in fns.items():
        if k not in attrs:
            raise ValueError(f"adapter has no function {k!r}")
        f.__name__ = k
        attrs[k] = f
    attrs["NAME"] = name
    return types.SimpleNamespace(**attrs)


def _forward_bug(op_name, fwd, vjp=None, step=True):
    """The functions of a forward bug: ``<op>`` (and ``<op>_step``, the same kernel on one
    step, for an op with a state), with ``vjp`` too when given."""
    fns = {op_name: fwd}
    if step and OPS[op_name].state is not None:
        def step_fn(inputs, params, state, **config):
            _check_step(OPS[op_name], inputs)
            return fwd(inputs, params, state=state, **config)
        fns[op_name + "_step"] = step_fn
    if vjp is not None:
        fns[op_name + "_vjp"] = vjp
    return fns


R = reference


# ============================================================================================
# Planted bugs (module docstring): each a function of the reference's, wrong under a condition
# ============================================================================================

# ---- s4d_kernel: the gradient of C_im without the conjugate ---------------------------------

def _s4d_kernel_vjp_conj(inputs, params, cotangents, state=None, **config):
    g = R.s4d_kernel_vjp(inputs, params, cotangents, state=state, **config)
    g["C_im"] = -g["C_im"]
    return g


# ---- fftconv ---------------------------------------------------------------------------------

LONG_BLOCK = 1024


def _fftconv_long_tail(inputs, params, state=None, **config):
    """For L > 1000 an overlap-add path in blocks of 1024 steps whose last, partial block
    (L > 1024, L % 1024 != 0) is convolved on its own: the history before it is dropped."""
    out = R.fftconv(inputs, params, **config)  # validates; the correct full blocks
    u, K = np.asarray(inputs["u"]), np.asarray(params["K"])
    L = u.shape[-1]
    T = LONG_BLOCK * (L // LONG_BLOCK)
    if L > 1000 and T < L:
        n = L - T
        tail_p = {"K": K[..., :n].copy(), **({"D": params["D"]} if "D" in params else {})}
        tail = R.fftconv({"u": u[..., T:].copy()}, tail_p, **config)["y"]
        out["y"] = out["y"].copy()
        out["y"][..., T:] = tail
    return out


def _fftconv_vjp_no_D(inputs, params, cotangents, state=None, **config):
    g = R.fftconv_vjp(inputs, params, cotangents, **config)
    if "D" in params and cotangents.get("y") is not None:
        g["u"] = g["u"] - np.asarray(params["D"])[:, None] * np.asarray(cotangents["y"])
    return g


# ---- s4d_layer ---------------------------------------------------------------------------------

def _dA(params, disc):
    from refimpl.ssm import discretize_params
    dA, _ = discretize_params(params["log_dt"], params["log_A_real"], params["A_imag"],
                              params.get("B_re"), params.get("B_im"), disc)
    return dA  # (H, N2)


def _s4d_layer_x_end_late(inputs, params, state=None, **config):
    """The end state one step late: ``dA x_end`` (the closed form's power off by one)."""
    out = R.s4d_layer(inputs, params, state=state, **config)
    if "x_end_re" in out:
        x = (out["x_end_re"] + 1j * out["x_end_im"]) * _dA(params, config.get("disc", "zoh"))
        out["x_end_re"], out["x_end_im"] = x.real.copy(), x.imag.copy()
    return out


def _s4d_layer_step_no_D(inputs, params, state, **config):
    """The step form forgets the skip term ``D u_t``."""
    out = R.s4d_layer_step(inputs, params, state, **config)
    out["y"] = out["y"] - np.asarray(params["D"])[:, None] * np.asarray(inputs["u"])
    return out


# ---- neuron ------------------------------------------------------------------------------------

def _gt_count_dropped(state, config):
    """The state a 'gt' kernel specialisation reads: the counter not loaded (zero)."""
    if state is not None and config.get("spike_condition", "ge") == "gt":
        state = dict(state)
        state["count"] = np.zeros_like(np.asarray(state["count"]))
    return state


def _neuron_gt_count(inputs, params, state=None, **config):
    out = R.neuron(inputs, params, state=state, **config)  # validates (count0 <= R, ...)
    bug = _gt_count_dropped(state, config)
    return out if bug is state else R.neuron(inputs, params, state=bug, **config)


def _neuron_gt_count_vjp(inputs, params, cotangents, state=None, **config):
    grads = R.neuron_vjp(inputs, params, cotangents, state=state, **config)  # validates
    bug = _gt_count_dropped(state, config)
    return grads if bug is state else R.neuron_vjp(inputs, params, cotangents, state=bug,
                                                   **config)


def _as_gt(config):
    return {**config, "spike_condition": "gt"}


def _neuron_ge_as_gt(inputs, params, state=None, **config):
    return R.neuron(inputs, params, state=state, **_as_gt(config))


def _neuron_ge_as_gt_vjp(inputs, params, cotangents, state=None, **config):
    return R.neuron_vjp(inputs, params, cotangents, state=state, **_as_gt(config))


def _neuron_u_end_before_reset(inputs, params, state=None, **config):
    out = R.neuron(inputs, params, state=state, **config)
    out["u_end"] = out["h"][..., -1].copy()
    return out


def _neuron_step_count_stuck(inputs, params, state, **config):
    """The step form sets the counter on a spike but never lowers it."""
    out = R.neuron_step(inputs, params, state, **config)
    R_steps = int(config.get("refractory_steps", 0))
    c0 = (np.zeros(np.shape(inputs["x"])[:2], np.int64) if state is None
          else np.asarray(state["count"]))
    out["count_end"] = np.where(out["s"][..., -1] != 0, R_steps, c0).astype(np.int64)
    return out


def _neuron_vjp_default_scale(inputs, params, cotangents, state=None, **config):
    _cfg(OPS["neuron"], config)  # validates the configuration (the scale included)
    return R.neuron_vjp(inputs, params, cotangents, state=state,
                        **{**config, "surrogate_scale": None})


def _neuron_vjp_detach_as_bptt(inputs, params, cotangents, state=None, **config):
    if config.get("grad_mode") == "detach_reset":
        config = {**config, "grad_mode": "bptt"}
    return R.neuron_vjp(inputs, params, cotangents, state=state, **config)


# ---- pmbc --------------------------------------------------------------------------------------

def _pmbc_count_end_full(inputs, params, state=None, **config):
    """``count_end = R`` for every row that fired in the chunk (not ``R - (L - 1 - j)``)."""
    out = R.pmbc(inputs, params, state=state, **config)
    if "count_end" in out:
        R_steps = int(config.get("refractory_steps", 0))
        out["count_end"] = np.where(out["s"].any(axis=-1), R_steps,
                                    out["count_end"]).astype(np.int64)
    return out


def _pmbc_vjp_detached_count(inputs, params, cotangents, state=None, **config):
    """grad_mode detach_reset / sltt: the backward's refractory mask starts from a zero
    counter (the forward's initial count is not passed to the backward kernel)."""
    op = OPS["pmbc"]
    if state is None or config.get("grad_mode", "bptt") == "bptt":
        return R.pmbc_vjp(inputs, params, cotangents, state=state, **config)
    op.check_args(inputs, params)
    cfg = _cfg(op, config)
    st = _state_tuple(op, state, _read64)
    res = op.fwd(dict(inputs), dict(params), cfg, st)
    cache = res.cache._replace(state=st._replace(count=np.zeros_like(st.count)))
    return {k: np.asarray(v) for k, v in op.vjp(cache, _cotangents(op, cotangents)).items()}


# ---- SDN -------------------------------------------------------------------------------------

def _sdn_fused_sees_x_t(inputs, params, state=None, **config):
    """The 8-tap window one step late: ``m_t`` reads ``x[t-7 .. t]`` (sees the current input)."""
    R.sdn_fused(inputs, params)  # validates
    x = np.asarray(inputs["x"])
    ext = np.concatenate([x, np.zeros(x.shape[:2] + (1,))], axis=-1)
    return {"m": R.sdn_fused({"x": ext}, params)["m"][..., 1:].copy()}


def _sdn_vjp_default_scale(inputs, params, cotangents, state=None, **config):
    _cfg(OPS["sdn"], config)  # validates the configuration (the scale included)
    return R.sdn_vjp(inputs, params, cotangents, **{**config, "surrogate_scale": None})


def _sdn_neuron_window_from_chunk(inputs, params, state=None, **config):
    """The end window taken from the chunk alone (zero-padded): wrong after a chunk shorter
    than the 8 taps that started from a nonzero window."""
    out = R.sdn_neuron(inputs, params, state=state, **config)
    x = np.asarray(inputs["x"], dtype=np.float64)
    ext = np.concatenate([np.zeros(x.shape[:2] + (8,)), x], axis=-1)
    out["window_end"] = ext[..., -8:].copy()
    return out


# ---- layers -----------------------------------------------------------------------------------

def _linear_vjp_db_mean(inputs, params, cotangents, state=None, **config):
    g = R.linear_vjp(inputs, params, cotangents)
    if "b" in g:
        x = np.asarray(inputs["x"])
        g["b"] = g["b"] / (x.shape[0] * x.shape[2])
    return g


def _tail(H, width=8):
    """The channels a kernel of ``width``-channel blocks leaves to its tail loop (only when
    there is a full block before them: ``H < width`` takes a separate scalar path)."""
    start = width * (H // width)
    return np.arange(start, H) if H > width and start < H else np.arange(0)


def _linear_tail_no_bias(inputs, params, state=None, **config):
    """The tail outputs (``Hout > 8``, ``Hout % 8``) miss the bias."""
    out = R.linear(inputs, params)
    if "b" in params:
        b = np.asarray(params["b"])
        t = _tail(b.shape[0])
        if t.size:
            out["y"] = out["y"].copy()
            out["y"][:, t, :] -= b[t][None, :, None]
    return out


def _embedding_vjp_assign(inputs, params, cotangents, state=None, **config):
    """``dE[token] = dy`` (``=`` for ``+=``): a repeated token keeps its last occurrence."""
    R.embedding_vjp(inputs, params, cotangents)  # validates
    tokens = np.asarray(inputs["tokens"])
    E = np.asarray(params["E"])
    dE = np.zeros_like(E, dtype=np.float64)
    dy = cotangents.get("y")
    if dy is not None and tokens.size:
        flat = tokens.ravel()  # (B L,) in (b, t) order
        rows = np.asarray(dy).transpose(0, 2, 1).reshape(flat.size, -1)  # (B L, H)
        tok, first = np.unique(flat[::-1], return_index=True)
        dE[tok] = rows[flat.size - 1 - first]  # each token's last occurrence
    return {"E": dE}


def _gelu_tanh(inputs, params, state=None, **config):
    """The tanh approximation of GELU (absolute error up to 4.7e-4, at |x| = 2.7)."""
    R.gelu(inputs, params)  # validates
    x = np.asarray(inputs["x"], dtype=np.float64)
    y = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return {"y": y}


def _glu_tail_gate_bias(inputs, params, state=None, **config):
    """The tail channels (``H > 8``, ``H % 8``) gate with the value half's bias ``b[c]``
    instead of ``b[H + c]``."""
    out = R.glu(inputs, params)  # validates
    b = np.asarray(params["b"])
    H = np.shape(inputs["s"])[1] if np.ndim(inputs["s"]) == 3 else 0
    t = _tail(H)
    if t.size and b.shape == (2 * H,):
        b = b.copy()
        b[H + t] = b[t]
        out = R.glu(inputs, {**params, "b": b})
    return out


def _gsu_ter_w_rows(inputs, params, state=None, **config):
    """``Ter(W)`` thresholded per row (0.15 of each row's max) instead of over the matrix."""
    R.gsu(inputs, params)  # validates
    return R.gsu(*_gsu_rows_args(inputs, params))


def _gsu_ter_w_rows_vjp(inputs, params, cotangents, state=None, **config):
    R.gsu_vjp(inputs, params, cotangents)  # validates
    return R.gsu_vjp(*_gsu_rows_args(inputs, params), cotangents)


def _gsu_rows_args(inputs, params):
    from refimpl.layers import ternary
    if "TW" in inputs or np.ndim(params.get("W")) != 2:
        return inputs, params
    W = np.asarray(params["W"], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        TW = ternary(W, axis=1).astype(np.float64)
    return {**inputs, "TW": TW}, params


def _layernorm_unbiased(inputs, params, state=None, **config):
    """The variance over ``H - 1`` (unbiased) instead of ``H``."""
    out = R.layernorm(inputs, params, **config)  # validates
    x = np.asarray(inputs["x"], dtype=np.float64)
    H = x.shape[1]
    if H > 1:
        eps = config.get("eps", 1e-5)
        mu = x.mean(axis=1, keepdims=True)
        var = ((x - mu) ** 2).sum(axis=1, keepdims=True) / (H - 1)
        y = (x - mu) / np.sqrt(var + eps)
        out["y"] = (y * np.asarray(params["gamma"])[None, :, None]
                    + np.asarray(params["beta"])[None, :, None])
    return out


def _batchnorm_running_var_biased(inputs, params, state=None, **config):
    """Training: the new running variance from the biased batch variance (no n / (n - 1))."""
    out = R.batchnorm(inputs, params, **config)
    if config.get("training", True):
        x = np.asarray(inputs["x"], dtype=np.float64)
        m = config.get("momentum", 0.1)
        var = x.var(axis=(0, 2))
        out["running_var"] = (1 - m) * np.asarray(inputs["running_var"]) + m * var
    return out


def _meanpool_vjp_no_divide(inputs, params, cotangents, state=None, **config):
    g = R.meanpool_vjp(inputs, params, cotangents)
    g["x"] = g["x"] * np.shape(inputs["x"])[2]
    return g


def _ce_naive(logits):
    """``(log sum exp z, softmax)`` without subtracting the max (overflow above ~709)."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(logits)
        S = e.sum(axis=1, keepdims=True)
        return np.log(S), e / S


def _cross_entropy_no_max(inputs, params, state=None, **config):
    R.cross_entropy(inputs, params)  # validates
    z = np.asarray(inputs["logits"], dtype=np.float64)
    y = np.asarray(inputs["labels"])
    lse, _ = _ce_naive(z)
    with np.errstate(invalid="ignore"):
        loss = np.mean(lse[:, 0] - z[np.arange(z.shape[0]), y])
    return {"loss": np.asarray(loss, dtype=np.float64)}


def _cross_entropy_no_max_vjp(inputs, params, cotangents, state=None, **config):
    R.cross_entropy_vjp(inputs, params, cotangents)  # validates
    z = np.asarray(inputs["logits"], dtype=np.float64)
    y = np.asarray(inputs["labels"])
    _, p = _ce_naive(z)
    dloss = cotangents.get("loss")
    dloss = 0.0 if dloss is None else float(np.asarray(dloss))
    onehot = np.zeros_like(z)
    onehot[np.arange(z.shape[0]), y] = 1.0
    with np.errstate(invalid="ignore"):
        return {"logits": (p - onehot) * (dloss / z.shape[0])}


def _dropout_keep(inputs):
    if inputs.get("mask") is None:
        return inputs
    mask = np.asarray(inputs["mask"])
    return {**inputs, "mask": (mask != 0).astype(mask.dtype)}


def _dropout_no_rescale(inputs, params, state=None, **config):
    """The kept values are not rescaled by ``1 / (1 - p)`` (the mask used as 0/1)."""
    R.dropout(inputs, params)  # validates
    return R.dropout(_dropout_keep(inputs), params)


def _dropout_no_rescale_vjp(inputs, params, cotangents, state=None, **config):
    R.dropout_vjp(inputs, params, cotangents)  # validates
    return R.dropout_vjp(_dropout_keep(inputs), params, cotangents)


def _lm_decoder_vjp_db_first(inputs, params, cotangents, state=None, **config):
    """``db`` sums the first batch row's cotangents only."""
    g = R.lm_decoder_vjp(inputs, params, cotangents)
    d = cotangents.get("logits")
    if d is not None:
        g["b"] = np.asarray(d)[0].sum(axis=0)
    return g


# ============================================================================================
# The table
# ============================================================================================

def _bug(name, op_name, description, **fns):
    return name, (op_name, patched(f"bug:{name}", **fns), description)


BUGS = dict([
    _bug("s4d_kernel_vjp_C_im_no_conj", "s4d_kernel",
         "gradient only: dC_im has the wrong sign (the conjugate missing); wrong wherever "
         "dC_im != 0, i.e. complex modes (A_imag != 0)",
         s4d_kernel_vjp=_s4d_kernel_vjp_conj),
    _bug("fftconv_long_tail_block", "fftconv",
         "only for L > 1024 not a multiple of 1024 (so only at L > 1000): an overlap-add "
         "path in 1024-step blocks convolves the last, partial block on its own (its history "
         "dropped); one block (L <= 1024) and multiples of 1024 (the committed L = 1000 and "
         "4096) are right",
         **_forward_bug("fftconv", _fftconv_long_tail)),
    _bug("fftconv_vjp_no_D", "fftconv",
         "gradient only: du misses the skip term D dy; wrong whenever D is given and nonzero",
         fftconv_vjp=_fftconv_vjp_no_D),
    _bug("s4d_layer_x_end_one_step_late", "s4d_layer",
         "end state only: x_end is dA times the true end state (the closed form's power off by "
         "one); visible in the end state of a stateful case and in the chunked and step forms",
         **_forward_bug("s4d_layer", _s4d_layer_x_end_late)),
    _bug("s4d_layer_step_no_D", "s4d_layer",
         "step form only: the one-step kernel forgets D u_t; whole and chunked forms are right",
         s4d_layer_step=_s4d_layer_step_no_D),
    _bug("neuron_gt_ignores_count0", "neuron",
         "only from a state with a nonzero refractory count and spike_condition = 'gt': the gt "
         "specialisation does not load count0 (treats it as 0), so a blocked step can fire "
         "(forward, end state, VJP); in the step and chunked forms any count the previous "
         "step left; every committed stateful case with count0 > 0 is 'ge'",
         **_forward_bug("neuron", _neuron_gt_count, _neuron_gt_count_vjp)),
    _bug("neuron_ge_as_gt", "neuron",
         "spike condition 'ge' evaluated as 'gt': wrong only where a membrane equals theta "
         "exactly (h_t == theta; the at_threshold cases)",
         **_forward_bug("neuron", _neuron_ge_as_gt, _neuron_ge_as_gt_vjp)),
    _bug("neuron_u_end_before_reset", "neuron",
         "end state only: u_end is the membrane before the reset, h_{L-1}; wrong when the last "
         "step spikes with a reset other than 'none' (stateful cases, chunked and step forms)",
         **_forward_bug("neuron", _neuron_u_end_before_reset)),
    _bug("neuron_step_count_stuck", "neuron",
         "step form only, refractory_steps > 0: the step sets the counter on a spike but never "
         "lowers it, so the neuron stays blocked after its first spike",
         neuron_step=_neuron_step_count_stuck),
    _bug("neuron_vjp_surrogate_scale_ignored", "neuron",
         "gradient only: the surrogate's default scale is used; wrong when surrogate_scale "
         "differs from the surrogate's default and a surrogate gradient is nonzero",
         neuron_vjp=_neuron_vjp_default_scale),
    _bug("neuron_vjp_detach_reset_as_bptt", "neuron",
         "gradient only, grad_mode = 'detach_reset': the reset path du/ds is not detached "
         "(bptt's gradient); wrong when a spike's surrogate gradient meets a reset with "
         "du/ds != 0 (hard, soft, refractory)",
         neuron_vjp=_neuron_vjp_detach_as_bptt),
    _bug("pmbc_count_end_full", "pmbc",
         "end state only, refractory_steps > 0: count_end = R for every row that fired in the "
         "chunk, not R - (L - 1 - j) after the last spike at j < L - 1",
         **_forward_bug("pmbc", _pmbc_count_end_full)),
    _bug("pmbc_vjp_detached_count0", "pmbc",
         "gradient only, from a state with a nonzero refractory count and grad_mode "
         "'detach_reset' or 'sltt': the backward's refractory mask starts from a zero counter, "
         "so surrogate gradient flows at the blocked first steps",
         pmbc_vjp=_pmbc_vjp_detached_count),
    _bug("sdn_fused_sees_x_t", "sdn_fused",
         "the 8-tap window one step late: m_t reads x[t-7 .. t] (the current input) instead "
         "of x[t-8 .. t-1]; wrong whenever x is not all zero",
         **_forward_bug("sdn_fused", _sdn_fused_sees_x_t)),
    _bug("sdn_vjp_surrogate_scale_ignored", "sdn",
         "gradient only: dx uses the surrogate's default scale; wrong when surrogate_scale "
         "differs from the default and a surrogate gradient is nonzero",
         sdn_vjp=_sdn_vjp_default_scale),
    _bug("sdn_neuron_window_from_chunk", "sdn_neuron",
         "end state only: the end window is taken from the chunk alone, zero-padded; wrong "
         "after a chunk (or step) shorter than 8 steps started from a nonzero window",
         **_forward_bug("sdn_neuron", _sdn_neuron_window_from_chunk)),
    _bug("linear_vjp_db_mean", "linear",
         "gradient only: db is the mean over batch and time instead of the sum; wrong when a "
         "bias is given and B L > 1",
         linear_vjp=_linear_vjp_db_mean),
    _bug("linear_tail_no_bias", "linear",
         "only for Hout > 8 not a multiple of 8: the tail outputs of an 8-channel-block "
         "kernel miss the bias (wrong when a nonzero bias is given)",
         **_forward_bug("linear", _linear_tail_no_bias)),
    _bug("embedding_vjp_assign", "embedding",
         "gradient only: dE[token] = dy instead of += (a token repeated in the batch keeps "
         "only its last occurrence's cotangent)",
         embedding_vjp=_embedding_vjp_assign),
    _bug("gelu_tanh_approximation", "gelu",
         "the tanh approximation of GELU: absolute error up to 4.7e-4 (at |x| = 2.7; 1.5e-4 "
         "at |x| = 1, 1.7e-5 at 0.5, 1.2e-6 at 5): wrong for any x away from 0 and the far "
         "tails",
         **_forward_bug("gelu", _gelu_tanh)),
    _bug("glu_tail_gate_bias", "glu",
         "only for H > 8 not a multiple of 8: the tail channels of an 8-channel-block kernel "
         "gate with the value half's bias b[c] instead of b[H + c] (H < 8 takes a scalar path "
         "and is right, as are the committed H = 1, 4, 16)",
         **_forward_bug("glu", _glu_tail_gate_bias)),
    _bug("gsu_ter_w_per_row", "gsu",
         "Ter(W) thresholded per row (0.15 of each row's max |W|) instead of over the matrix; "
         "wrong when some row with a smaller max holds an entry between 0.15 row max and 0.15 "
         "global max, unless TW is given (forward and VJP)",
         **_forward_bug("gsu", _gsu_ter_w_rows, _gsu_ter_w_rows_vjp)),
    _bug("layernorm_unbiased_variance", "layernorm",
         "the variance over H - 1 instead of H (relative error ~1 / (2H) in the normalised "
         "values); wrong for H > 1",
         **_forward_bug("layernorm", _layernorm_unbiased)),
    _bug("batchnorm_running_var_biased", "batchnorm",
         "training mode: the new running variance mixes in the biased batch variance (no "
         "n / (n - 1)); wrong when momentum > 0 and B L > 1",
         **_forward_bug("batchnorm", _batchnorm_running_var_biased)),
    _bug("meanpool_vjp_no_divide", "meanpool",
         "gradient only: dx = dy (the 1 / L missing); wrong for L > 1",
         meanpool_vjp=_meanpool_vjp_no_divide),
    _bug("cross_entropy_no_max_subtraction", "cross_entropy",
         "log-sum-exp without subtracting the max: inf / NaN once a logit exceeds ~709 "
         "(exp overflows) or every logit of a row is below ~-745 (the sum underflows to 0); "
         "within rounding elsewhere",
         **_forward_bug("cross_entropy", _cross_entropy_no_max, _cross_entropy_no_max_vjp)),
    _bug("dropout_no_rescale", "dropout",
         "the kept values are not rescaled by 1 / (1 - p) (forward and VJP); wrong when a mask "
         "with p > 0 is given",
         **_forward_bug("dropout", _dropout_no_rescale, _dropout_no_rescale_vjp)),
    _bug("lm_decoder_vjp_db_first_row", "lm_decoder",
         "gradient only: db sums the first batch row's cotangents only; wrong for B > 1",
         lm_decoder_vjp=_lm_decoder_vjp_db_first),
])

#: the bugs that no committed golden case exposes (issue 24): L > 1000, a nonzero refractory
#: count, H not a multiple of 8
REQUIRED = {"long_sequence": "fftconv_long_tail_block",
            "refractory_count": "neuron_gt_ignores_count0",
            "channels_not_multiple_of_8": "glu_tail_gate_bias"}


# ============================================================================================
# Candidate files
# ============================================================================================

def _takes_state(fn):
    import inspect
    try:
        return "state" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _state_name(op, suite, name):
    """The golden name of an adapter's output ``name``: an end state ``<field>_end[_re|_im]``
    as the suite's ``state_out`` pattern names it (``s4d_layer``: ``x_re``, ``x_im``)."""
    for f in op.state._fields if op.state is not None else ():
        for part in ("", "_re", "_im"):
            if name == f + "_end" + part:
                return suite.state_out.format(f) + part
    return name


def chunk_bounds(L, form):
    """The boundaries of a sequence of ``L`` steps in ``form``: ``whole`` one chunk,
    ``chunked`` three (cut at a third and two thirds; fewer when short), ``step`` one per
    step."""
    if form == "whole" or L < 2:
        return [0, L]
    if form == "step":
        return list(range(L + 1))
    if form == "chunked":
        return sorted({0, max(1, L // 3), max(1, (2 * L) // 3), L})
    raise ValueError(f"unknown form {form!r}; valid forms are whole, chunked, step")


def run_form(adapter, op, inputs, params, config, state, form="whole"):
    """The adapter's outputs of op ``op`` in ``form`` (``whole``: one call of ``<op>``;
    ``chunked``: ``<op>`` on each chunk of :func:`chunk_bounds`; ``step``: ``<op>_step`` on
    each step), each chunk from the previous one's end state; outputs concatenated along their
    time axes (those without one: the last chunk's), the last end state."""
    fwd = getattr(adapter, op.name)
    if form == "whole" or op.state is None:
        kw = {"state": state} if _takes_state(fwd) else {}
        return fwd(inputs, params, **kw, **config)
    name = next(k for k in op.time if k in inputs)
    L = np.shape(inputs[name])[op.time[name]]
    fn = getattr(adapter, op.name + "_step") if form == "step" else fwd
    bounds = chunk_bounds(L, form)
    parts = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk = {k: (np.take(v, np.arange(lo, hi), axis=op.time[k]) if k in op.time else v)
                 for k, v in inputs.items()}
        out = fn(chunk, params, state=state, **config)
        state = {}
        for f in op.state._fields:
            if f + "_end" in out:
                state[f] = np.asarray(out[f + "_end"])
            else:
                state[f] = np.asarray(out[f + "_end_re"]) + 1j * np.asarray(out[f + "_end_im"])
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: (np.concatenate(v, axis=op.time[k]) if k in op.time else v[-1])
            for k, v in parts.items()}


def compute_case(adapter, gcase, suite, form="whole"):
    """``data`` of the candidate case of one golden :class:`~refimpl.golden.schema.Case`
    (``{"outputs/<name>": array, "grads/<name>": array}``, only the datasets the golden case
    holds; an end state under the ``suite``'s name), or raises what the adapter raised. The
    forward from the case's state (``inputs/<field>0``) in ``form`` (:func:`run_form`; a
    bidirectional S4D layer, which has no streaming form, whole), the gradients from ``<op>_vjp``
    for the case's cotangents."""
    op = get_op(gcase.op)
    inputs = {n: gcase.data["inputs/" + n] for n in op.inputs if "inputs/" + n in gcase.data}
    params = {n: gcase.data["params/" + n] for n in op.params if "params/" + n in gcase.data}
    config = ({k: gcase.config[k] for k in config_fields(op.config) if k in gcase.config}
              if op.config is not None else {})
    st = read_state(op, "{}0", gcase.data) if op.state is not None else None
    state = None if st is None else dict(zip(st._fields, st))
    if op.name == "s4d_layer" and np.ndim(params.get("C_re")) == 3:
        form = "whole"  # bidirectional: no state, no streaming form
    out = run_form(adapter, op, inputs, params, config, state, form)
    data = {}
    for k, v in out.items():
        path = "outputs/" + _state_name(op, suite, k)
        if path in gcase.data:
            data[path] = np.asarray(v)
    cot = gcase.group("cotangents")
    if cot:
        vjp = getattr(adapter, op.name + "_vjp")
        kw = {"state": state} if _takes_state(vjp) else {}
        grads = vjp(inputs, params, cot, **kw, **config)
        data.update({"grads/" + k: np.asarray(v) for k, v in grads.items()
                     if "grads/" + k in gcase.data})
    return data


def write_candidate(adapter, golden_file, out_path, precision="float64", form="whole"):
    """Write ``adapter``'s candidate file for ``golden_file`` (a path, or a suite name's
    committed file) to ``out_path``; returns the path. Float datasets are float64, or at
    ``precision="float32"`` float32 (as the adapter returned them); int64 stays int64. A case
    the adapter rejects (any exception) gets the ``error`` attribute. ``form``: the outputs
    of an op with a state computed ``whole``, ``chunked`` or step by step (``step``), see
    :func:`compute_case` (outputs without a time axis, PMBC's ``iterations``, are then the
    last chunk's: verify with ``skip=("*/outputs/iterations",)``)."""
    from refimpl.golden import golden_path
    from refimpl.golden.registry import judging_suite
    gf = read_golden(golden_path(golden_file))
    suite = judging_suite(gf.suite)
    cases = []
    for cid, gcase in gf.cases.items():
        try:
            with np.errstate(all="ignore"):
                data = compute_case(adapter, gcase, suite, form)
        except Exception as e:  # the adapter rejected the case
            msg = " ".join(str(e).split()) or type(e).__name__
            cases.append(Case(id=cid, op=gcase.op, extra={"error": f"{type(e).__name__}: "
                                                                    f"{msg}"}))
            continue
        for p, v in data.items():
            if v.dtype.kind in "iu":
                data[p] = v.astype(np.int64)
            elif precision == "float32" and v.dtype == np.float32:
                data[p] = v
            else:
                data[p] = v.astype(np.float64)
        cases.append(Case(id=cid, op=gcase.op, data=data))
    write_file(out_path, gf.suite, cases, overwrite=True, schema=CANDIDATE_SCHEMA,
               attrs={"backend": getattr(adapter, "NAME", "adapter"), "form": form})
    return str(out_path)


# Each bug's adapter by name, for adapter specs (``tests/conform_adapters.py:bug_<name>``) that
# pool and Dask workers load by path.
globals().update({f"bug_{name}": adapter for name, (_, adapter, _) in BUGS.items()})
