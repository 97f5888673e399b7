"""Surrogate gradients for the Heaviside spike function, each with its primitive.

DESIGN.md section 4. The forward pass of a spiking neuron emits ``s = Theta(z)`` with
``z = h - theta``; the backward pass replaces ``dTheta/dz`` by a surrogate ``g(z)``. Every
surrogate here ships with its **primitive** ``G`` (``G' = g``), a smooth step. A neuron run in
``smooth`` mode uses ``G`` instead of ``Theta`` in its forward pass, and then finite differences
of that forward must equal the hand-written backward: this is how every backward is tested.

| name | g(z) | G(z) |
|---|---|---|
| ``triangle`` | ``max(0, 1 - abs(z)/w) / w`` | piecewise quadratic, 0 -> 1 |
| ``rectangle`` | ``1[abs(z) < w/2] / w`` | ``clip(z/w + 1/2, 0, 1)`` |
| ``sigmoid`` | ``a sig(a z) (1 - sig(a z))`` | ``sig(a z)`` |
| ``atan`` | ``(a/2) / (1 + (pi a z / 2)^2)`` | ``1/2 + arctan(pi a z / 2) / pi`` |
| ``fast_sigmoid`` | ``1 / (1 + k abs(z))^2`` | ``1/k + z / (1 + k abs(z))``, 0 -> 2/k |

| name | scale (default) | used by |
|---|---|---|
| ``triangle`` | ``w`` (1) | SpikingSSM code ("piecewise_quadratic") |
| ``rectangle`` | ``w`` (1) | |
| ``sigmoid`` | ``a`` (4) | spikingjelly default |
| ``atan`` | ``a`` (2) | snntorch default, Binary S4D |
| ``fast_sigmoid`` | ``k`` (25) | snntorch, Binary S4D ablation |

``fast_sigmoid`` is used as snntorch defines it, unnormalised: its integral is ``2/k``, so its
primitive climbs from 0 to ``2/k`` rather than to 1. Every other ``G`` goes from 0 to 1.

One implementation of each formula: a Numba scalar function, reached through
:func:`surrogate_grad` and :func:`surrogate_primitive`, which dispatch on an integer code.
Kernels call these (a jitted callable passed as an argument would miss Numba's on-disk cache,
pynndescent #226; an integer code does not). Plain-Python callers use
:meth:`Surrogate.grad` / :meth:`Surrogate.primitive`, which run the same scalar functions over
an array, so a model, a golden trace and a kernel see the same numbers. The independent oracle
is the NumPy table in :mod:`refimpl.reference` (``tests/test_surrogates.py``).

:data:`SURROGATES` maps each name to a :class:`Surrogate` record (code, default scale, kinks).
Unknown names raise ``ValueError`` listing the valid ones.

Precision: the float arrays documented as float64 are float32 under
``refimpl.precision.using("float32")`` (the training variant, :mod:`refimpl.precision`);
nothing is cast: the inputs must be of the current precision.
"""
import math
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
from numba import njit

from . import config
from ._checks import check_array, check_name, check_real
from .precision import float_dtype

# Integer codes understood by surrogate_grad / surrogate_primitive (and stored nowhere else).
TRIANGLE = 0
RECTANGLE = 1
SIGMOID = 2
ATAN = 3
FAST_SIGMOID = 4

# --------------------------------------------------------------------------------------------
# Numba scalar kernels (tiny leaves: the docstring is the formula)
# --------------------------------------------------------------------------------------------


@njit(**config.NJIT_OPTS)
def _triangle_grad(z, w):
    """``g(z) = max(0, 1 - |z|/w) / w``."""
    return max(0.0, 1.0 - abs(z) / w) / w


@njit(**config.NJIT_OPTS)
def _triangle_primitive(z, w):
    """``G(z) = 0 (z <= -w); (1 + z/w)^2 / 2 (-w < z <= 0); 1 - (1 - z/w)^2 / 2 (0 < z < w); 1``."""
    if z <= -w:
        return 0.0
    if z <= 0.0:
        p = 1.0 + z / w
        return 0.5 * p * p
    if z < w:
        q = 1.0 - z / w
        return 1.0 - 0.5 * q * q
    return 1.0


@njit(**config.NJIT_OPTS)
def _rectangle_grad(z, w):
    """``g(z) = 1[|z| < w/2] / w``."""
    return 1.0 / w if abs(z) < 0.5 * w else 0.0


@njit(**config.NJIT_OPTS)
def _rectangle_primitive(z, w):
    """``G(z) = clip(z/w + 1/2, 0, 1)``."""
    return min(max(z / w + 0.5, 0.0), 1.0)


@njit(**config.NJIT_OPTS)
def _sigmoid_grad(z, a):
    """``g(z) = a sig(a z) (1 - sig(a z)) = a e / (1 + e)^2`` with ``e = exp(-|a z|)``.

    The second form is the same number without the cancellation of ``1 - sig`` for large ``a z``.
    """
    e = math.exp(-abs(a * z))
    return a * e / ((1.0 + e) * (1.0 + e))


@njit(**config.NJIT_OPTS)
def _sigmoid_primitive(z, a):
    """``G(z) = sig(a z) = 1 / (1 + exp(-a z))`` (evaluated without overflow)."""
    az = a * z
    if az >= 0.0:
        return 1.0 / (1.0 + math.exp(-az))
    e = math.exp(az)
    return e / (1.0 + e)


@njit(**config.NJIT_OPTS)
def _atan_grad(z, a):
    """``g(z) = (a/2) / (1 + (pi a z / 2)^2)``."""
    v = 0.5 * math.pi * a * z
    return 0.5 * a / (1.0 + v * v)


@njit(**config.NJIT_OPTS)
def _atan_primitive(z, a):
    """``G(z) = 1/2 + arctan(pi a z / 2) / pi``."""
    return 0.5 + math.atan(0.5 * math.pi * a * z) / math.pi


@njit(**config.NJIT_OPTS)
def _fast_sigmoid_grad(z, k):
    """``g(z) = 1 / (1 + k |z|)^2``."""
    d = 1.0 + k * abs(z)
    return 1.0 / (d * d)


@njit(**config.NJIT_OPTS)
def _fast_sigmoid_primitive(z, k):
    """``G(z) = 1/k + z / (1 + k |z|)``: ``G(-inf) = 0``, ``G(0) = 1/k``, ``G(+inf) = 2/k``."""
    return 1.0 / k + z / (1.0 + k * abs(z))


@njit(**config.NJIT_OPTS)
def surrogate_grad(code, z, scale):
    """Surrogate derivative ``g(z)`` of the surrogate with integer ``code`` and shape ``scale``.

    Callable from other Numba kernels. Preconditions: ``code`` is one of the module's codes
    (:data:`TRIANGLE` ... :data:`FAST_SIGMOID`), ``scale > 0``; an unknown code returns NaN.
    """
    if code == TRIANGLE:
        return _triangle_grad(z, scale)
    if code == RECTANGLE:
        return _rectangle_grad(z, scale)
    if code == SIGMOID:
        return _sigmoid_grad(z, scale)
    if code == ATAN:
        return _atan_grad(z, scale)
    if code == FAST_SIGMOID:
        return _fast_sigmoid_grad(z, scale)
    return np.nan


@njit(**config.NJIT_OPTS)
def surrogate_primitive(code, z, scale):
    """Primitive ``G(z)`` (``G' = g``) of the surrogate ``code``; see :func:`surrogate_grad`."""
    if code == TRIANGLE:
        return _triangle_primitive(z, scale)
    if code == RECTANGLE:
        return _rectangle_primitive(z, scale)
    if code == SIGMOID:
        return _sigmoid_primitive(z, scale)
    if code == ATAN:
        return _atan_primitive(z, scale)
    if code == FAST_SIGMOID:
        return _fast_sigmoid_primitive(z, scale)
    return np.nan


# --------------------------------------------------------------------------------------------
# Array kernels: the scalar dispatchers above, applied elementwise (one formula per surrogate)
# --------------------------------------------------------------------------------------------


@njit(**config.NJIT_OPTS)
def _elementwise(code, primitive, z, scale, out):
    """``out[i] = G(z[i])`` if ``primitive`` else ``g(z[i])``, for the surrogate ``code``.

    Preconditions: ``z``, ``out`` flat float64 arrays of one size, ``scale > 0``.
    """
    for i in range(z.size):
        if primitive:
            out[i] = surrogate_primitive(code, z[i], scale)
        else:
            out[i] = surrogate_grad(code, z[i], scale)


def _check_z(z):
    """``z`` as an array of the current precision (float64 unless under
    ``refimpl.precision.using``): such arrays as they are, Python/NumPy real scalars as 0-d."""
    dtype = float_dtype()
    if isinstance(z, np.ndarray):
        check_array("z", z, finite=False)  # the dtype (its copy would make a 0-d array 1-d)
        return z
    if isinstance(z, (int, float, np.integer, np.floating)) and not isinstance(z, bool):
        return np.array(float(z), dtype)  # ()
    raise TypeError(f"z must be a {dtype.name} array or a real number, got {type(z).__name__}")


def _apply(code, primitive, z, scale):
    """:func:`_elementwise` on ``z``; returns float64 of ``z``'s shape (a NumPy scalar for a
    scalar ``z``, as a ufunc would)."""
    z = _check_z(z)
    flat = np.ascontiguousarray(z).reshape(-1)  # (n,)
    out = np.empty_like(flat)  # (n,)
    _elementwise(code, primitive, flat, scale, out)
    return out.reshape(z.shape) if z.ndim else out[0]


@dataclass(frozen=True)
class Surrogate:
    """One registry entry of :data:`SURROGATES`.

    Attributes
    ----------
    name : str
    code : int
        The integer the Numba dispatchers :func:`surrogate_grad` / :func:`surrogate_primitive`
        understand.
    default_scale : float
        The shape constant of DESIGN.md's table (``w``, ``a`` or ``k``).
    scale_name : str
        ``"w"``, ``"a"`` or ``"k"``.
    g, G : str
        The formulas, as documentation (the code is the Numba scalar kernels).
    kinks : callable ``scale -> tuple of float``
        Points where ``g`` is not differentiable (where ``G`` is only C^1, or for ``rectangle``
        only C^0). Finite-difference tests keep ``z`` away from them.
    total : callable ``scale -> float``
        ``G(+inf) - G(-inf)``, the integral of ``g``: 1, except ``2/k`` for ``fast_sigmoid``.
    """

    name: str
    code: int
    default_scale: float
    scale_name: str
    g: str
    G: str
    kinks: Callable[[float], Tuple[float, ...]]
    total: Callable[[float], float]

    def grad(self, z, scale=None):
        """``g(z)`` elementwise by :func:`surrogate_grad`; ``scale=None`` is the default shape
        constant.

        ``z``: a float64 array (any shape) or a real number. Returns float64 of ``z``'s shape (a
        NumPy float for a scalar). A float array of another dtype raises ``TypeError``.
        """
        return _apply(self.code, False, z, self.resolve_scale(scale))

    def primitive(self, z, scale=None):
        """``G(z)`` elementwise by :func:`surrogate_primitive`; arguments as :meth:`grad`."""
        return _apply(self.code, True, z, self.resolve_scale(scale))

    def resolve_scale(self, scale=None):
        """The shape constant to use: ``default_scale`` for ``None``, else a finite float > 0."""
        if scale is None:
            return self.default_scale
        return check_real(f"surrogate_scale ({self.scale_name} of {self.name!r})", scale, 0.0,
                          lo_open=True)


def _one(scale):
    return 1.0


SURROGATES = {
    "triangle": Surrogate(
        "triangle", TRIANGLE, 1.0, "w",
        "max(0, 1 - |z|/w) / w",
        "0 for z <= -w; (1 + z/w)^2 / 2 for -w < z <= 0; 1 - (1 - z/w)^2 / 2 for 0 < z < w; 1",
        lambda w: (-w, 0.0, w), _one),
    "rectangle": Surrogate(
        "rectangle", RECTANGLE, 1.0, "w",
        "1[|z| < w/2] / w",
        "clip(z/w + 1/2, 0, 1)",
        lambda w: (-0.5 * w, 0.5 * w), _one),
    "sigmoid": Surrogate(
        "sigmoid", SIGMOID, 4.0, "a",
        "a sig(a z) (1 - sig(a z))",
        "sig(a z)",
        lambda a: (), _one),
    "atan": Surrogate(
        "atan", ATAN, 2.0, "a",
        "(a/2) / (1 + (pi a z / 2)^2)",
        "1/2 + arctan(pi a z / 2) / pi",
        lambda a: (), _one),
    "fast_sigmoid": Surrogate(
        "fast_sigmoid", FAST_SIGMOID, 25.0, "k",
        "1 / (1 + k |z|)^2",
        "1/k + z / (1 + k |z|)  (from 0 to 2/k: snntorch's surrogate is not normalised)",
        lambda k: (0.0,), lambda k: 2.0 / k),
}


def get_surrogate(name):
    """The :class:`Surrogate` for ``name``; unknown names raise ValueError listing valid ones."""
    return check_name("surrogate", name, SURROGATES)
