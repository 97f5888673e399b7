"""Tensors: the one comparison primitive of the verifier and the value checks every profile
makes.

A comparison is an interval per element, ``lo <= candidate <= hi``:

- allclose (float64, float32 profiles): ``ref -/+ (atol + rtol |ref|)``;
- at the rounding points (bfloat16, float16; golden/SCHEMA.md "16-bit profiles"): the 16-bit
  values a float32 evaluation may round to, ``[round_p(ref - d), round_p(ref + d)]`` with
  ``d`` the float32 bound;
- exact (spikes, integers): ``lo = hi = ref``.

:func:`outside` reports the worst element outside its interval (largest distance in units of
the interval's half-width; a NaN is infinitely far), :func:`bad_values` what no backend may
write whatever the bound: a non-finite value where the reference is finite, a spike that is not
0 or 1 (-1, 0 or 1 for a ternary spike).
"""
import dataclasses

import numpy as np

from .profiles import round_to


@dataclasses.dataclass(frozen=True)
class Finding:
    """The worst element of a comparison: its ``index`` (a string such as ``(0, 3, 17)``),
    the candidate's ``value``, the ``reference``, the ``bound`` (half-width of its interval,
    0 for exact), and ``detail`` (how many elements fail, of how many compared)."""
    index: str
    value: object
    reference: object
    bound: float
    detail: str


def index_str(i):
    return "(" + ", ".join(str(int(k)) for k in i) + ")" if len(i) != 1 else f"({int(i[0])},)"


def allclose(ref, atol, rtol):
    """``(lo, hi)`` of ``|c - ref| <= atol + rtol |ref|``."""
    ref = np.asarray(ref, dtype=np.float64)
    b = atol + rtol * np.abs(ref)
    return ref - b, ref + b


def rounded(ref, atol, rtol, profile):
    """``(lo, hi)``: every value ``profile`` may round an evaluation within ``atol + rtol |ref|``
    of ``ref`` to (round-to-nearest is monotone, so the ends' roundings bound them all)."""
    lo, hi = allclose(ref, atol, rtol)
    return round_to(lo, profile), round_to(hi, profile)


def excess(values, lo, hi):
    """Per element, how far ``values`` lie outside ``[lo, hi]`` in units of the interval's
    half-width: ``(|v - mid| - half) / half``, <= 0 inside, ``inf`` for NaN. The one measure of
    "how bad" behind every worst element the verifier and ``check`` report."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    half = np.maximum((hi - lo) / 2.0, 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        dist = np.abs(np.asarray(values, np.float64) - (lo + hi) / 2.0) - half
        return np.where(np.isnan(dist), np.inf, dist / np.maximum(half, 1e-300))


def outside(cand, ref, lo, hi, mask=None, what=""):
    """The worst element of ``cand`` outside ``[lo, hi]`` (over ``mask``) as a
    :class:`Finding`, or None. ``what`` ends the detail ``"N of M <what>"``."""
    cand = np.asarray(cand)
    ref = np.asarray(ref)
    c = cand.astype(np.float64) if cand.dtype.kind != "f" else cand.astype(np.float64,
                                                                           copy=False)
    with np.errstate(invalid="ignore"):
        ok = (c >= lo) & (c <= hi)
        if ref.dtype.kind == "f":
            ok |= np.isnan(c) & np.isnan(ref)  # a NaN the reference has too (exact datasets)
    if mask is not None:
        ok |= ~mask
    if ok.all():
        return None
    half = np.maximum((np.asarray(hi, np.float64) - np.asarray(lo, np.float64)) / 2.0, 0.0)
    ratio = np.where(ok, -1.0, excess(c, lo, hi))
    i = np.unravel_index(int(np.argmax(ratio)), ref.shape)
    n = int((~ok).sum())
    total = int(mask.sum()) if mask is not None else ref.size
    return Finding(index_str(i), cand[i].item(), ref[i].item(), float(np.broadcast_to(half,
                   ref.shape)[i]), f"{n} of {total} {what}".rstrip())


def bad_values(cand, ref, spike=False, ternary=False):
    """What no backend may write, as a :class:`Finding` or None: a NaN or inf where the
    reference is finite; for a ``spike`` tensor a value other than 0 or 1 (-1, 0, 1 if
    ``ternary``)."""
    cand, ref = np.asarray(cand), np.asarray(ref)
    if cand.dtype.kind not in "fc" or cand.shape != ref.shape:
        return None
    c = cand.astype(np.float64)
    bad = ~np.isfinite(c) & np.isfinite(ref)
    why = "not finite where the reference is"
    if not bad.any() and spike:
        allowed = (-1.0, 0.0, 1.0) if ternary else (0.0, 1.0)
        bad = ~np.isin(c, allowed) & np.isfinite(ref)
        why = f"not a spike ({', '.join(f'{a:g}' for a in allowed)})"
    if not bad.any():
        return None
    i = np.unravel_index(int(np.argmax(bad)), ref.shape)
    return Finding(index_str(i), cand[i].item(), ref[i].item(), 0.0,
                   f"{int(bad.sum())} of {ref.size} {why}")
