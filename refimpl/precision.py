"""The compute precision of the ops: float64 (the reference) or the named float32 variant.

Every public op validates its float inputs against :func:`float_dtype` and returns that dtype.
Outside :func:`using` it is float64, the reference path: golden files, equivalence checks and
streams run there only (:func:`require_reference`). Inside ``using("float32")`` the training
path (S4D layer, convolutions, neurons, PMBC, the SDN neuron, surrogates, layers) takes and
returns float32 arrays; nothing is cast silently in either mode: a float64 array given under
float32 is a ``TypeError`` like a float32 array given under float64.

The setting is a :mod:`contextvars` variable: it holds for the calling thread (and asyncio
task) only, and is restored when the ``with`` block ends, also on an exception.

Where an op keeps a quantity in float64 under float32 it says so in its docstring (the S4D
kernel is generated in float64 and rounded once; see :func:`refimpl.s4d.s4d_layer_fwd`).
"""
import contextlib
import contextvars

import numpy as np

#: The precisions by name; float64 first (the default and the reference).
PRECISIONS = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32)}

_CURRENT = contextvars.ContextVar("refimpl_precision", default=PRECISIONS["float64"])


def float_dtype():
    """The current float dtype of the ops (``np.dtype``; float64 outside :func:`using`)."""
    return _CURRENT.get()


def check_precision(name, what="dtype"):
    """``PRECISIONS[name]``; an unknown name raises ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in PRECISIONS:
        valid = ", ".join(repr(k) for k in PRECISIONS)
        raise ValueError(f"unknown {what} {name!r}; valid names are {valid}")
    return PRECISIONS[name]


@contextlib.contextmanager
def using(name):
    """Run the ops in precision ``name`` (``"float64"`` or ``"float32"``) inside the block."""
    token = _CURRENT.set(check_precision(name, "precision"))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def require_reference(what):
    """Raise RuntimeError unless the ops run in float64 (the reference path)."""
    if float_dtype() != PRECISIONS["float64"]:
        raise RuntimeError(f"{what} runs in float64 only (the reference path; float32 is a "
                           f"training variant and never produces reference results): call it "
                           f"outside refimpl.precision.using({float_dtype().name!r})")
