"""Precision profiles and case selection for :func:`.compare.verify` (``golden/SCHEMA.md``,
"Precision profiles" and "Selecting cases").

Precision model
---------------
The golden files are computed in float64 and every allclose dataset stores the parts of its
bound, ``depth``, ``scale``, ``spread`` [, ``floor``] (:func:`.generate.tolerance`). A backend
computing in a format with machine epsilon ``eps_p`` (``PROFILES``) is judged against::

    k      = eps_p / eps64
    atol_p = max(SAFETY (depth eps_p scale + (1 + 1/4) k spread), k floor)
    rtol_p = SAFETY eps_p

- ``depth eps_p scale``: the rounding of the backend's own evaluation (the same ``gamma_n``
  model as float64, with the format's epsilon).
- ``k spread``: conditioning. ``spread`` is the largest response of the tensor to a random
  relative perturbation of ``PERTURB = 2 eps64`` of every input, parameter and cotangent; a
  backward-stable evaluation at ``eps_p`` is the exact result at inputs moved by about
  ``2 eps_p``, i.e. ``k`` times that perturbation (first order: the response is linear in the
  perturbation size as long as no spike or ReLU kink is crossed, which the spike rules below
  handle).
- ``k / 4 spread``: input rounding. The backend rounds the stored float64 inputs, parameters and
  cotangents to its format: a relative perturbation of at most ``eps_p / 2``, which is
  ``eps_p / (4 eps64)`` = ``k / 4`` times the measured perturbation of ``2 eps64``.
- ``k floor``: the neuron membranes' floor (:func:`refimpl.pmbc.rounding_bound`) is proportional
  to ``eps`` (``4 * 64 * eps * M / (1 - tau)``); input rounding of ``x`` moves ``h`` by at most
  ``eps_p / 2 max|x| / (1 - tau)``, inside it.

The float64 profile uses the stored ``atol`` and ``rtol`` unchanged (today's verdicts).

A dataset whose bound ``atol_p`` is at least its own magnitude ``max|ref|`` is not a test at that
precision: it is reported ``UNTESTABLE`` (not failing, counted) when the candidate is within the
bound, and ``MISMATCH`` when it is not (the bound is still a valid bound).
"""
import dataclasses
import math

import numpy as np

from .generate import EPS, SAFETY

#: The input-rounding term's share of the conditioning term: rounding to nearest moves an input
#: by at most eps_p / 2 relative, the stored ``spread`` answers a perturbation of 2 eps64.
INPUT_ROUNDING = 0.25


@dataclasses.dataclass(frozen=True)
class Profile:
    """A floating-point format a backend stores (and, for float64 / float32, computes) in.

    ``eps`` is the machine epsilon (2^-(mantissa bits)); unit roundoff is ``eps / 2``.
    ``storage`` are the dtypes a candidate may write float datasets in besides float64.
    ``bits`` is the significand precision (with the implicit bit): :func:`representable`.
    ``max`` is the largest finite value: a case with a value beyond it cannot be computed in
    the format (:func:`overflows`). ``emin`` is the :func:`numpy.frexp` exponent of the smallest
    normal number (below it the spacing stays ``2^(emin - bits)``: subnormals).
    ``compute``: for a storage format (bfloat16, float16) the format the backend computes in
    (float32): the verdict is taken at the rounding points (golden/SCHEMA.md, "16-bit
    profiles"); empty for the formats that are their own compute format.
    """
    name: str
    eps: float
    bits: int
    storage: tuple
    max: float
    emin: int
    compute: str = ""

    @property
    def k(self):
        """``eps_p / eps64``: how much looser than float64."""
        return self.eps / EPS

    @property
    def rounds(self):
        """Whether the verdict is taken at the rounding points (a storage format)."""
        return bool(self.compute)


PROFILES = {
    "float64": Profile("float64", 2.0 ** -52, 53, ("float64",), float(np.finfo(np.float64).max),
                       -1021),
    "float32": Profile("float32", 2.0 ** -23, 24, ("float32",), float(np.finfo(np.float32).max),
                       -125),
    # bfloat16 has no NumPy dtype: a candidate stores it as float32 (or float64)
    "bfloat16": Profile("bfloat16", 2.0 ** -7, 8, ("float32",), (2.0 - 2.0 ** -7) * 2.0 ** 127,
                        -125, compute="float32"),
    "float16": Profile("float16", 2.0 ** -10, 11, ("float16", "float32"),
                       float(np.finfo(np.float16).max), -13, compute="float32"),
}


def get_profile(precision):
    if isinstance(precision, Profile):
        return precision
    if precision not in PROFILES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[precision]


def compute_profile(profile):
    """The profile a backend at ``profile`` computes in (itself, or float32 for 16-bit)."""
    return PROFILES[profile.compute] if profile.rounds else profile


def bound(meta, profile):
    """``(atol, rtol)`` of an allclose dataset under ``profile`` (module docstring).

    float64: the stored values. Files without the parts (older v1) fall back to the stored
    ``atol`` scaled by ``(1 + 1/4) k`` (every term of it scales at most so)."""
    atol, rtol = float(meta.get("atol", 0.0)), float(meta.get("rtol", 0.0))
    if profile.name == "float64":
        return atol, rtol
    k = profile.k
    if "depth" not in meta or "scale" not in meta or "spread" not in meta:
        return atol * k * (1.0 + INPUT_ROUNDING), rtol * k
    depth, scale, spread = float(meta["depth"]), float(meta["scale"]), float(meta["spread"])
    floor = float(meta.get("floor", 0.0))
    a = max(SAFETY * (depth * profile.eps * scale + (1.0 + INPUT_ROUNDING) * k * spread),
            k * floor)
    return a, SAFETY * profile.eps


def round_to(x, profile):
    """``x`` (float64) rounded to nearest, ties to even, in ``profile``'s format: significand
    ``bits``, subnormals below ``2^(emin - 1)``, and ``inf`` beyond the largest finite value
    (where round-to-nearest overflows). Exact in float64 (a power-of-two scaling and
    :func:`numpy.rint`). NaN and inf stay."""
    x = np.asarray(x, dtype=np.float64)
    if profile.bits >= 53:
        return x.copy()
    _, e = np.frexp(x)
    q = np.ldexp(1.0, np.maximum(e, profile.emin) - profile.bits)  # spacing at x
    with np.errstate(invalid="ignore"):
        r = np.rint(x / q) * q  # np.rint: half to even
        r = np.where(np.isfinite(x), r, x)
        return np.where(np.abs(r) > profile.max, np.copysign(np.inf, x), r)


def read_as(x, profile, via=None):
    """``x`` (float64) as a backend at ``profile`` reads it: rounded to the format directly,
    or (``via`` a profile, float32) first to ``via`` and then to the format, as PyTorch's
    ``tensor.to(torch.bfloat16)`` of a float64 tensor does. The two differ only where the
    first rounding lands exactly on a midpoint of the format (about one value in 2^16)."""
    x = np.asarray(x, dtype=np.float64)
    return round_to(round_to(x, via) if via is not None else x, profile)


def overflows(case, profile):
    """The first dataset of ``case`` (inputs, params, cotangents, outputs, grads) holding a
    finite value beyond ``profile.max``, as ``(path, value)``, or None. Such a case cannot be
    computed in the format (float16: 65504), whatever the backend does."""
    for path, v in case.data.items():
        v = np.asarray(v)
        if v.dtype.kind != "f" or not v.size:
            continue
        a = np.abs(v[np.isfinite(v)])
        if a.size and float(a.max()) > profile.max:
            return path, float(a.max())
    return None


def underflows(case, profile):
    """The first float dataset of ``case`` whose values are all below ``profile``'s smallest
    normal number in magnitude, but not all zero, as ``(path, largest |value|)``, or None.
    The format holds such a tensor only as subnormals (float32: below 1.2e-38) with a few bits
    or as zeros, so no relative bound applies: like an overflow, not a test at that precision
    (found by ``refimpl conform``: a threshold of 1e-294 is 0 in float32)."""
    tiny = 2.0 ** (profile.emin - 1)
    for path, v in case.data.items():
        v = np.asarray(v)
        if v.dtype.kind != "f" or not v.size:
            continue
        a = np.abs(v[np.isfinite(v)])
        if a.size and 0.0 < float(a.max()) < tiny:
            return path, float(a.max())
    return None


def representable(x, profile):
    """Whether every element of ``x`` is exact at ``profile``'s precision."""
    x = np.asarray(x, dtype=np.float64)
    fin = np.isfinite(x)
    return bool(np.array_equal(round_to(x[fin], profile), x[fin]))


# --------------------------------------------------------------------------------------------
# --select
# --------------------------------------------------------------------------------------------


class SelectError(ValueError):
    """A ``--select`` expression that names no attribute or flag of the suite's cases."""


def _case_attrs(case):
    return {"op": case.op, "result": case.result, **case.config,
            **({"margin": case.extra["margin"]} if "margin" in case.extra else {})}


def _parse_value(text, like):
    """``text`` as the type of ``like`` (the case's attribute): numbers as numbers, booleans
    from true/false/1/0, strings as strings. None if it cannot be that type."""
    if isinstance(like, bool) or isinstance(like, np.bool_):
        t = text.strip().lower()
        return {"true": True, "1": True, "false": False, "0": False}.get(t)
    if isinstance(like, (int, float, np.integer, np.floating)):
        try:
            return float(text)
        except ValueError:
            return None
    return text


def parse_select(exprs):
    """``[(kind, name, value)]`` from ``--select`` expressions: ``NAME=VALUE`` (attribute
    equality) or ``flag:NAME``. Raises SelectError on a malformed expression."""
    out = []
    for e in exprs:
        if e.startswith("flag:"):
            name = e[len("flag:"):].strip()
            if not name:
                raise SelectError(f"--select {e!r}: expected 'flag:NAME'")
            out.append(("flag", name, None))
        elif "=" in e:
            name, value = e.split("=", 1)
            if not name.strip():
                raise SelectError(f"--select {e!r}: expected 'NAME=VALUE' or 'flag:NAME'")
            out.append(("attr", name.strip(), value.strip()))
        else:
            raise SelectError(f"--select {e!r}: expected 'NAME=VALUE' or 'flag:NAME'")
    return out


def selector(exprs, cases, suite):
    """A predicate ``case -> bool`` for ``--select`` expressions (AND of all), checked against
    the suite's ``cases``: an attribute or flag none of them has is a SelectError listing
    the ones they have."""
    parsed = parse_select(exprs)
    attrs = sorted({k for c in cases for k in _case_attrs(c)})
    flags = sorted({f for c in cases for f in c.flags})
    for kind, name, _ in parsed:
        if kind == "attr" and name not in attrs:
            raise SelectError(f"--select {name}=...: suite {suite!r} cases have no attribute "
                              f"{name!r}; attributes: {', '.join(attrs)}")
        if kind == "flag" and name not in flags:
            raise SelectError(f"--select flag:{name}: no case of suite {suite!r} has the flag "
                              f"{name!r}; flags: {', '.join(flags)}")

    def match(case):
        ca = _case_attrs(case)
        for kind, name, value in parsed:
            if kind == "flag":
                if name not in case.flags:
                    return False
                continue
            if name not in ca:
                return False
            have = ca[name]
            want = _parse_value(value, have)
            if want is None:
                return False
            if isinstance(want, float):
                if isinstance(have, bool) or not math.isclose(float(have), want, rel_tol=0.0,
                                                              abs_tol=0.0):
                    return False
            elif isinstance(want, bool):
                if bool(have) != want:
                    return False
            elif str(have) != want:
                return False
        return True

    return match
