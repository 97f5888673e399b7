"""What the PyTorch adapters of ``examples/conform/`` share (not an adapter itself).

The adapter protocol is :mod:`refimpl.conform` (its module docstring): NumPy float64 arrays in,
NumPy arrays out (float64, or float32 for an adapter that computes in float32), the op's
configuration as keywords, ``ValueError`` for what the backend refuses. Each library adapter
builds one adapter object per library configuration with :func:`neuron_adapter`: a
``types.SimpleNamespace`` with ``neuron``, ``neuron_vjp``, ``neuron_step`` and ``CONFIG`` (the
refimpl configuration fields that object fixes: conform draws only the others), plus the
descriptive attributes the matrix reads (``LIBRARY``, ``PRECISION``, ``MAPPING``, ...).

Only torch and numpy are used to compute; refimpl is imported for one thing, the default
surrogate scale of a configuration whose ``surrogate_scale`` is None (what the name means).
"""
import types

import numpy as np
import torch

#: adapter dtype name -> (torch dtype, NumPy dtype the outputs are returned in)
DTYPES = {"float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}

#: The neuron configuration fields; every adapter receives all of them as keywords.
NEURON_FIELDS = ("reset", "tau", "theta", "u_reset", "refractory_steps", "spike_condition",
                 "surrogate", "surrogate_scale", "grad_mode")


def surrogate_scale(name, scale):
    """``scale``, or the default shape constant of refimpl's surrogate ``name`` when None."""
    if scale is not None:
        return float(scale)
    from refimpl.surrogates import get_surrogate
    return float(get_surrogate(name).resolve_scale(None))


def check_fixed(library, fixed, config):
    """ValueError naming the field when ``config`` asks for another value of a field the
    adapter object fixes (``fixed``): the library configuration cannot express it."""
    for k, v in fixed.items():
        if k in config and config[k] != v and not (k == "surrogate_scale" and v is None):
            raise ValueError(f"{library}: this adapter object computes {k}={v!r}; "
                             f"{k}={config[k]!r} is not expressible by it")
    if int(config.get("refractory_steps", 0) or 0) != 0:
        raise ValueError(f"{library} has no absolute refractory period "
                         f"(refractory_steps={config['refractory_steps']})")


def as_input(a, dtype, name):
    """A NumPy array as a torch tensor of ``dtype`` (rounded once), NaN/inf rejected."""
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values")
    return torch.tensor(a, dtype=dtype)


def split_state(state, x_shape, library):
    """``(u0 (B, H) float64 or None)`` from the protocol's state; the refractory counter must
    be zero (none of these neurons has a refractory period)."""
    if state is None:
        return None
    u = np.asarray(state["u"], dtype=np.float64)
    if u.shape != tuple(x_shape[:2]):
        raise ValueError(f"state u has shape {u.shape}, expected {tuple(x_shape[:2])}")
    if not np.all(np.isfinite(u)):
        raise ValueError("state u contains non-finite values")
    count = state.get("count")
    if count is not None and np.any(np.asarray(count) != 0):
        raise ValueError(f"{library} has no refractory counter (state count must be 0)")
    return u


def check_x(x):
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be (B, H, L), got shape {x.shape}")
    return x


def neuron_adapter(name, library, version, precision, fixed, run, mapping, **info):
    """The adapter object of one library configuration.

    ``run(x (B, H, L) tensor, u0 (B, H) tensor or None, config dict) -> (s, h, u)`` tensors
    ``(B, H, L)`` computes the library's neuron with autograd on; ``fixed``: the refimpl
    configuration fields this object fixes (its ``CONFIG["neuron"]``).
    """
    tdtype, ndtype = DTYPES[precision]

    def forward(inputs, params, state, config, grad):
        check_fixed(library, fixed, config)
        if params and any(v is not None for v in params.values()):
            raise ValueError(f"{library}: no per-channel parameter {sorted(params)} "
                             "(a reset taking rho)")
        x = check_x(inputs["x"])
        u0 = split_state(state, x.shape, library)
        X = as_input(x, tdtype, "x").requires_grad_(grad)
        U0 = None if u0 is None else as_input(u0, tdtype, "state u")
        with torch.set_grad_enabled(grad):
            s, h, u = run(X, U0, dict(config))
        return X, s, h, u

    def out(t):
        return t.detach().to(tdtype).numpy().astype(ndtype, copy=True)

    def neuron(inputs, params, state=None, **config):
        _, s, h, u = forward(inputs, params, state, config, grad=False)
        res = {"s": out(s), "h": out(h), "u": out(u)}
        res["u_end"] = res["u"][:, :, -1].copy() if res["u"].shape[2] else (
            np.zeros(res["u"].shape[:2], ndtype) if state is None
            else np.asarray(state["u"]).astype(ndtype))
        res["count_end"] = np.zeros(res["u"].shape[:2], dtype=np.int64)
        return res

    def neuron_step(inputs, params, state, **config):
        return neuron(inputs, params, state=state, **config)

    def neuron_vjp(inputs, params, cotangents, state=None, **config):
        X, s, h, u = forward(inputs, params, state, config, grad=True)
        loss = X.new_zeros(())
        for k, t in (("s", s), ("h", h), ("u", u)):
            c = cotangents.get(k)
            if c is not None:
                loss = loss + (t * as_input(c, tdtype, "cotangent " + k)).sum()
        if not loss.requires_grad:
            return {"x": np.zeros(X.shape, dtype=ndtype)}
        (gx,) = torch.autograd.grad(loss, [X], allow_unused=True)
        gx = torch.zeros_like(X) if gx is None else gx
        return {"x": out(gx)}

    for fn in (neuron, neuron_step, neuron_vjp):
        fn.__qualname__ = f"{name}.{fn.__name__}"
    obj = types.SimpleNamespace(
        NAME=f"{library}:{name}", LIBRARY=library, VERSION=version, PRECISION=precision,
        CONFIG={"neuron": dict(fixed)}, MAPPING=mapping, neuron=neuron,
        neuron_vjp=neuron_vjp, neuron_step=neuron_step, **info)
    return obj


def zero_state_view(obj):
    """The adapter ``obj`` without its state: ``neuron`` and ``neuron_vjp`` take no ``state``
    argument and there is no ``neuron_step``, so conform checks whole sequences from the zero
    state only (the protocol's "a function without one is checked from the zero state only").
    The matrix runs both: a library whose state means something else than refimpl's (snntorch
    keeps the membrane before its delayed reset) still shows what its neuron computes."""
    def neuron(inputs, params, **config):
        return obj.neuron(inputs, params, state=None, **config)  # with the zero start's end

    def neuron_vjp(inputs, params, cotangents, **config):
        return obj.neuron_vjp(inputs, params, cotangents, state=None, **config)

    attrs = {k: v for k, v in vars(obj).items() if k not in ("neuron", "neuron_vjp",
                                                               "neuron_step")}
    attrs["NAME"] = obj.NAME + " (zero state)"
    return types.SimpleNamespace(**attrs, neuron=neuron, neuron_vjp=neuron_vjp, VIEW_OF=obj)


def register_adapters(namespace, specs, library, version, runner):
    """Define in ``namespace`` (a module's ``globals()``) one adapter object per library
    configuration of ``specs`` (``{name: (runner options, refimpl fields it fixes, library
    configuration text)}``) and dtype: ``<name>`` (float32), ``<name>_f64`` (float64), each also
    as ``<name>[_f64]_nostate`` (the same neuron without a state argument: checked from the
    zero state only). Returns ``(ADAPTERS, CONFIGS)``: the object names in the matrix's order
    and ``{name: {"neuron": fixed fields}}``. ``runner(opts)`` builds the library's run
    function from the options."""
    configs = {}
    for name, (opts, fixed, lib) in specs.items():
        for suffix, precision in (("", "float32"), ("_f64", "float64")):
            obj = neuron_adapter(name + suffix, library, version, precision, fixed,
                                 runner(opts), mapping=lib, LIBRARY_CONFIG=lib)
            namespace[name + suffix] = obj
            configs[name + suffix] = obj.CONFIG
            namespace[name + suffix + "_nostate"] = zero_state_view(obj)
    return list(configs), configs
