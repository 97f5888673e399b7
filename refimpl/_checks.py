"""Validation helpers used by the public wrappers (kernels never validate).

Rules (STYLE.md): wrong dtype -> ``TypeError`` saying how to fix it; bad shape or value ->
``ValueError`` quoting the offending value. Nothing is cast or clipped silently.
"""
import contextlib
import contextvars
import numbers

import numpy as np

from .precision import float_dtype


def check_name(kind, name, registry):
    """Return ``registry[name]``; unknown names raise ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in registry:
        valid = ", ".join(repr(k) for k in registry)
        raise ValueError(f"unknown {kind} {name!r}; valid names are {valid}")
    return registry[name]


def _precision_hint(dtype):
    if dtype != float_dtype() or dtype.kind != "f":
        return ""
    if dtype == np.float64:
        return " (float32 arrays run only under refimpl.precision.using('float32'))"
    return f" (the ops run in {dtype.name} under refimpl.precision.using({dtype.name!r}))"


_INTERMEDIATE = contextvars.ContextVar("refimpl_intermediate_arrays", default=False)


@contextlib.contextmanager
def intermediates():
    """The body passes arrays from refimpl's own ops between ops (a model's forward or
    backward): :func:`check_array` skips its finite scan there, keeping the type, dtype and
    rank checks. The caller checks what comes in from outside (inputs, parameters,
    cotangents), and a value that overflows inside reaches the loss and the gradients, where
    the trainer stops on it naming the step (a scan per op input cost 3-5 % of a language-model
    step on 2 threads, issue 25)."""
    token = _INTERMEDIATE.set(True)
    try:
        yield
    finally:
        _INTERMEDIATE.reset(token)


def check_array(name, a, ndim=None, dtype=None, finite=True):
    """Check that ``a`` is a NumPy array of ``dtype`` and rank ``ndim`` with finite values.

    ``dtype=None``: the current float precision (:func:`refimpl.precision.float_dtype`, float64
    unless inside ``refimpl.precision.using``). Returns a C-contiguous view or copy (a layout
    change never changes values).
    """
    dtype = float_dtype() if dtype is None else np.dtype(dtype)
    if not isinstance(a, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray of {np.dtype(dtype).name}, got {type(a).__name__}; "
            f"convert with np.asarray({name}, dtype=np.{np.dtype(dtype).name})"
        )
    if a.dtype != np.dtype(dtype):
        raise TypeError(
            f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}; refimpl never casts "
            f"silently: pass {name}.astype(np.{np.dtype(dtype).name}){_precision_hint(dtype)}"
        )
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if a.ndim not in ndims:
            want = " or ".join(str(d) for d in ndims)
            raise ValueError(f"{name} must have rank {want}, got shape {a.shape} (rank {a.ndim})")
    # One pass: a finite sum means every entry is finite (a NaN or an inf makes the sum NaN or
    # inf); only a non-finite sum (a bad entry, or an overflow of finite ones) needs the scan.
    finite = finite and not _INTERMEDIATE.get()  # a model's intermediates: checked at its entry
    if finite:
        with np.errstate(over="ignore", invalid="ignore"):
            total = a.sum()
    if finite and not np.isfinite(total) and not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(
            f"{name} contains non-finite values (first at index {tuple(int(i) for i in bad)}: "
            f"{a[tuple(bad)]}); remove NaN/inf before calling"
        )
    return np.ascontiguousarray(a)


def check_shape(name, a, shape):
    """Check ``a.shape == shape`` (``None`` entries match anything)."""
    if len(a.shape) != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")


def check_int(name, value, minimum=None):
    """An integer (not bool) >= minimum."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite real scalar in the given interval."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} "
                        f"of type {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo}"
        hi_s = "inf" if hi is None else f"{hi}"
        raise ValueError(f"{name} must be in {left}{lo_s}, {hi_s}{right}, got {value}")
    return v
