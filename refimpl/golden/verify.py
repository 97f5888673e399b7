"""Verify: a candidate backend's files against the golden ones (golden/SCHEMA.md, "Candidate
layout", "Precision profiles", "16-bit profiles").

Per case, in every profile:

1. structure: a missing case or dataset, another shape or dtype, an invalid case computed, a
   valid one rejected, an extra dataset;
2. values no backend may write (:func:`.tensors.bad_values`): non-finite where the reference
   is finite, spikes other than 0/1 (-1/0/1 ternary) — ``BAD_VALUE``, failing in every case,
   acceptable ones included;
3. spike flips (:mod:`.spikes`): which differing spikes are acceptable and what they make
   incomparable;
4. every remaining element against its interval (:mod:`.tensors`): ``MISMATCH`` outside it.

The reference is the golden file's own data (float64, float32), or, at bfloat16 and float16,
refimpl's float64 evaluation at the inputs as the backend reads them (:func:`references`):
what a backend storing 16-bit values and computing in float32 must round to.
"""
import dataclasses
import fnmatch
from pathlib import Path

import numpy as np

from ..h5io import FileFormatError
from . import spikes as S
from .generate import run
from .profiles import (PROFILES, SelectError, bound as profile_bound, compute_profile,
                        get_profile, overflows, read_as, round_to, selector, underflows,
                        _case_attrs)
from .registry import SUITES, judging_suite
from .schema import DEFAULT_DIR, FAILURES, read_candidate, read_golden
from .tensors import allclose, bad_values, outside, rounded

#: A tested tensor whose bound exceeds this fraction of its magnitude cannot see a relative
#: error of 1e-3: counted as ``coarse`` in the summary (it still passes or fails).
COARSE = 1e-3


def _row(suite, cid, status, tensor="-", index="", value=None, reference=None, bound=None,
         detail=""):
    return {"suite": suite, "case": cid, "status": status, "tensor": tensor, "index": index,
            "value": value, "reference": reference, "bound": bound, "detail": detail}


def _finding_row(suite, cid, status, path, f):
    return _row(suite, cid, status, path, f.index, f.value, f.reference, f.bound, f.detail)


def annotate(rows, gcase):
    """Every row carries its case's flags and comment (reports point at the cause)."""
    for r in rows:
        r.setdefault("flags", list(gcase.flags) if gcase is not None else [])
        r.setdefault("comment", gcase.comment if gcase is not None else "")
    return rows


def _skipped(cid, tensor, skip):
    key = f"{cid}/{tensor}"
    return any(fnmatch.fnmatchcase(key, pat) or fnmatch.fnmatchcase(tensor, pat) for pat in skip)


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    """What a candidate case is judged against: ``case`` (inputs, params, cotangents as the
    backend reads them; outputs and grads refimpl's answer), ``read`` (how the inputs were
    rounded: ``"stored"``, ``"direct"``, ``"via float32"``), ``diag`` (the forward's spikes
    and membranes when recomputed), ``error`` (refimpl rejected the rounded inputs)."""
    case: object
    read: str = "stored"
    diag: dict = None
    error: str = ""


_REFERENCES = {}


def _rounded(gcase, prof, via):
    data = {}
    for p, v in gcase.data.items():
        if not p.startswith(("inputs/", "params/", "cotangents/")):
            continue
        v = np.asarray(v)
        data[p] = read_as(v, prof, via) if v.dtype.kind == "f" else v
    return dataclasses.replace(gcase, data=data, extra={}, meta=dict(gcase.meta))


def references(suite_name, gcase, prof):
    """The references of a valid or acceptable case under ``prof``.

    float64, float32: the golden case itself. bfloat16, float16: the case with every float
    input, parameter and cotangent rounded to the format (to nearest, ties to even) and
    refimpl's float64 outputs and grads at those values; a backend may round the stored
    float64 values directly or through float32 (PyTorch does the latter), which differs in
    about one value in 2^16: where it does, both are references and a candidate matching
    either passes. Cached per case contents."""
    if not prof.rounds:
        return [Reference(gcase)]
    key = (S.case_key(suite_name, gcase), prof.name)
    if key not in _REFERENCES:
        suite = judging_suite(suite_name)
        refs, seen = [], []
        for via, read in ((None, "direct"), (PROFILES["float32"], "via float32")):
            rc = _rounded(gcase, prof, via)
            if any(all(np.array_equal(rc.data[p], o.data[p]) for p in rc.data) for o in seen):
                continue
            seen.append(rc)
            try:
                outputs, grads, diag, _ = run(suite, rc, cot=rc.group("cotangents"))
            except (ValueError, TypeError, FloatingPointError) as e:
                refs.append(Reference(rc, read, error=" ".join(str(e).split())))
                continue
            rc.data.update({"outputs/" + k: np.asarray(v) for k, v in outputs.items()})
            rc.data.update({"grads/" + k: np.asarray(v) for k, v in grads.items()})
            refs.append(Reference(rc, read, diag))
        _REFERENCES[key] = refs
    return _REFERENCES[key]


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------

def compare_case(suite, gcase, ccase, skip=(), precision="float64"):
    """Rows of one case: PASS, ACCEPTABLE, REJECTED, SKIP, UNTESTABLE or one row per failing
    tensor; every row carries the case's ``flags`` and ``comment``, and the case's tensor
    counts (``tensors``: tested / untestable / not compared) ride on its first row.

    ``precision`` (a :data:`~.profiles.PROFILES` name) chooses the reference and the
    intervals (module docstring; golden/SCHEMA.md)."""
    prof = get_profile(precision)
    rows, counts = _compare_case(suite, gcase, ccase, skip, prof)
    extra = _extra_rows(suite, gcase, ccase, skip)
    if extra:  # replaces a PASS / SKIP row: the case fails
        rows = [r for r in rows if r["status"] not in ("PASS", "SKIP")] + extra
    if rows and counts:
        rows[0]["tensors"] = counts
    return annotate(rows, gcase)


def _extra_rows(suite, gcase, ccase, skip):
    """An ``outputs/`` or ``grads/`` dataset of the candidate case that the golden case lacks
    fails as EXTRA, like an extra case: a backend writing a tensor under the wrong name (or
    the wrong case) must not pass silently. Skipped names (``--skip``) are exempt."""
    if ccase is None:
        return []
    return [_row(suite, gcase.id, "EXTRA", p, detail="dataset not in the golden case")
            for p in ccase.data
            if p.startswith(("outputs/", "grads/")) and p not in gcase.data
            and not _skipped(gcase.id, p, skip)]


def _compare_case(suite, gcase, ccase, skip, prof):
    cid = gcase.id
    if ccase is None:
        return [_row(suite, cid, "MISSING", detail="case not in candidate")], None
    err = ccase.extra.get("error")
    if gcase.result == "invalid":
        if err:
            return [_row(suite, cid, "REJECTED", detail=f"rejected as required: {err}")], None
        return [_row(suite, cid, "NOT_REJECTED",
                     detail=f"invalid case must be rejected (set the case attribute 'error'); "
                            f"refimpl: {gcase.extra.get('error', '')}")], None
    over = overflows(gcase, prof) if prof.name != "float64" else None
    if over:
        rows = [_row(suite, cid, "UNTESTABLE", over[0], bound=prof.max, detail=(
            f"{over[0]} holds {over[1]:.3g}, beyond the largest {prof.name} ({prof.max:.5g}): "
            f"not a test at this precision (a rejection is fine)"))]
        if not err:  # computed anyway: its spikes must still be spikes
            rows += _spike_values(suite, gcase, ccase)
        return rows, None
    # float32's bounds are relative; the 16-bit profiles round to the format's subnormals
    under = underflows(gcase, prof) if prof.name != "float64" and not prof.rounds else None
    if under:
        rows = [_row(suite, cid, "UNTESTABLE", under[0], bound=2.0 ** (prof.emin - 1), detail=(
            f"{under[0]} holds only values up to {under[1]:.3g}, below the smallest normal "
            f"{prof.name} ({2.0 ** (prof.emin - 1):.3g}): not a test at this precision"))]
        if not err:
            rows += _spike_values(suite, gcase, ccase)
        return rows, None
    if err:
        return [_row(suite, cid, "ERROR",
                     detail=f"valid case rejected by the candidate: {err}")], None
    best = None
    for ref in references(suite, gcase, prof):
        if ref.error:
            out = ([_row(suite, cid, "UNTESTABLE", detail=(
                f"refimpl rejects the inputs as read at {prof.name} ({ref.read}): {ref.error}; "
                f"not a test at this precision"))], None)
        else:
            out = _judge(suite, gcase, ccase, skip, prof, ref)
        if best is None or _failures(out[0]) < _failures(best[0]):
            best = out  # the reading the candidate matches best (a MISSING tensor fails both)
    return best


def _spike_values(suite, gcase, ccase):
    """BAD_VALUE rows of the spike outputs of a candidate case (0/1, -1/0/1 ternary)."""
    spec, rows = judging_suite(suite), []
    for name in spec.spikes:
        p = "outputs/" + name
        if p in ccase.data and p in gcase.data:
            f = bad_values(np.asarray(ccase.data[p]), np.asarray(gcase.data[p]), spike=True,
                           ternary=name in spec.ternary)
            if f:
                rows.append(_finding_row(suite, gcase.id, "BAD_VALUE", p, f))
    return rows


def _failures(rows):
    return sum(r["status"] in FAILURES for r in rows)


def _present(suite, gcase, ccase, skip):
    """The output/grad paths of ``gcase`` to compare: ``(paths, rows, skipped)`` with a
    MISSING row for each one the candidate lacks and the count of ``--skip``ped ones."""
    paths, rows, skipped = [], [], 0
    for p in gcase.data:
        if not p.startswith(("outputs/", "grads/")):
            continue
        if _skipped(gcase.id, p, skip):
            skipped += 1
        elif p not in ccase.data:
            rows.append(_row(suite, gcase.id, "MISSING", p, detail="dataset not in candidate"))
        else:
            paths.append(p)
    return paths, rows, skipped


def _check_dtype(cand, ref, prof):
    """None if the candidate's dtype is acceptable under ``prof``, else the DTYPE detail:
    float64 or the profile's storage dtypes for float datasets, the golden dtype otherwise."""
    if ref.dtype.kind == "f":
        ok = ("float64",) + tuple(d for d in prof.storage if d != "float64")
        if cand.dtype.name in ok:
            return None
        return f"dtype {cand.dtype}, expected {' or '.join(ok)} at {prof.name}"
    if cand.dtype != ref.dtype:
        return f"dtype {cand.dtype}, expected {ref.dtype}"
    return None


def _interval(ref, meta, prof):
    """``(lo, hi, atol, what)`` of one dataset under ``prof``: ``lo = hi = ref`` for exact ones
    (spikes, integers); for allclose ones the stored bound (float64), the float32 bound
    (float32), or the 16-bit values a float32 evaluation may round to; ``what`` ends a
    finding's detail."""
    if ref.dtype.kind != "f" or meta.get("compare") == "exact":
        return ref, ref, 0.0, "differ (exact)"
    atol, rtol = profile_bound(meta, compute_profile(prof))
    if prof.rounds:
        lo, hi = rounded(ref, atol, rtol, prof)
        return lo, hi, atol, (f"outside the {prof.name} roundings of ref -/+ (atol {atol:.3g} "
                              f"+ rtol |ref|), the {compute_profile(prof).name} bound")
    lo, hi = allclose(ref, atol, rtol)
    return lo, hi, atol, f"outside atol {atol:.3g} + rtol |ref|"


def _outside_interval(cand, ref, meta, prof, mask):
    """:func:`.tensors.outside` of one dataset with its interval under ``prof``."""
    lo, hi, _, what = _interval(ref, meta, prof)
    return outside(cand, ref, lo, hi, mask, what)


def _spike_rule(suite, gcase, ref, cand, prof, paths):
    """The suite's flip rule (:mod:`.spikes`) on the reference ``ref``."""
    spec = judging_suite(suite)
    cp = compute_profile(prof)
    rc = ref.case
    if spec.flips and "outputs/s" in cand:
        if spec.flips == "rows":
            atol, rtol = profile_bound(gcase.meta.get("outputs/h", {}), cp)
            exact = S.exact_at(rc, cp)
            elem = atol + rtol * np.abs(rc.data["outputs/h"])
            return S.neuron_rows(rc, cand["outputs/s"], elem, exact)
        atol, rtol = profile_bound(gcase.meta.get("outputs/m", {}), cp)
        elem = atol + rtol * np.abs(rc.data["outputs/m"]) + cp.eps * np.abs(rc.data["inputs/x"])
        return S.elements(rc, cand["outputs/s"], elem)
    if spec.flips or (prof.name == "float64" and gcase.result != "acceptable"):
        return S.Flips()
    mem, parts = S.membrane_parts(suite, rc)
    if not mem:
        return S.Flips()
    if ref.diag is not None:  # recomputed at the rounded inputs: the membranes of that run
        mem = ref.diag.get("membranes", mem)
    return S.internal(suite, rc, mem, S.membrane_bound(parts, cp), paths,
                      gcase.result == "acceptable")


def _judge(suite, gcase, ccase, skip, prof, ref):
    """Rows and tensor counts of a valid or acceptable case against one reference."""
    cid = gcase.id
    spec = judging_suite(suite)
    rc = ref.case
    paths, rows, skipped = _present(suite, gcase, ccase, skip)
    cand = {}
    for p in paths:
        v, r = np.asarray(ccase.data[p]), np.asarray(rc.data[p])
        bad = _check_dtype(v, r, prof)
        if bad:
            rows.append(_row(suite, cid, "DTYPE", p, detail=bad))
        elif v.shape != r.shape:
            rows.append(_row(suite, cid, "SHAPE", p, detail=f"shape {v.shape}, expected {r.shape}"))
        else:
            cand[p] = v.astype(np.float64) if r.dtype.kind == "f" else v
    for p, v in cand.items():
        name = p.split("/", 1)[1]
        f = bad_values(v, rc.data[p], spike=p.startswith("outputs/") and name in spec.spikes,
                       ternary=name in spec.ternary)
        if f:
            rows.append(_finding_row(suite, cid, "BAD_VALUE", p, f))
    flips = _spike_rule(suite, gcase, ref, cand, prof, list(cand))
    if flips.untestable:
        rows.append(_row(suite, cid, "UNTESTABLE", "outputs/s", detail=flips.untestable))
    internal = flips.t_star is not None  # internal spikes may flip: flips.masks is advisory
    if flips.detail and not internal:
        f0 = flips.accepted[0] if flips.accepted else None
        rows.append(_row(suite, cid, "ACCEPTABLE", "outputs/s" if f0 else "-",
                         S.index_str(f0) if f0 else "",
                         detail=f"at {prof.name}: {flips.detail}"))
    counts = {"tested": 0, "untestable": 0, "not_compared": 0}
    notes, res, excused = [], (0.0, "-"), []
    bad_paths = {r["tensor"] for r in rows if r["status"] == "BAD_VALUE"}
    for p in cand:
        r, meta = np.asarray(rc.data[p]), gcase.meta.get(p, {})
        if p == "outputs/iterations" and prof.name != "float64":
            notes.append(f"iterations not compared at {prof.name}")
            counts["not_compared"] += 1
            continue
        mask = np.asarray(flips.masks.get(p, np.ones(r.shape, bool)))
        if r.size and not mask.any() and not internal:
            counts["not_compared"] += 1
            continue
        if p in bad_paths:
            counts["tested"] += 1
            continue
        if internal and not mask.all():
            # a spike may flip: the steps the flip cannot reach must agree; a difference
            # elsewhere is excused (ACCEPTABLE), agreement is reported but proves nothing there
            key = "tested" if mask.any() else "not_compared"
            full = _outside_interval(cand[p], r, meta, prof, None)
            if full is not None:
                part = _outside_interval(cand[p], r, meta, prof, mask) if mask.any() else None
                if part is not None:
                    rows.append(_finding_row(suite, cid, "MISMATCH", p, part))
                    key = "tested"
                else:
                    excused.append(p.split("/", 1)[1])
            counts[key] += 1
            continue
        lo, hi, atol, what = _interval(r, meta, prof)
        f = outside(cand[p], r, lo, hi, mask, what)
        mag = float(np.max(np.abs(r[mask]))) if r.size and r.dtype.kind == "f" else 0.0
        untestable = prof.name != "float64" and atol > 0 and atol >= mag
        if f is not None:
            rows.append(_finding_row(suite, cid, "MISMATCH", p, f))
            counts["tested"] += 1
        elif untestable:
            counts["untestable"] += 1
            rows.append(_row(suite, cid, "UNTESTABLE", p, bound=atol, detail=(
                f"atol {atol:.3g} of the {compute_profile(prof).name} evaluation >= max|ref| "
                f"{mag:.3g}: not a test at {prof.name}")))
        else:
            counts["tested"] += 1
            if r.dtype.kind == "f" and mag > 0 and atol > 0 and prof.name != "float64":
                half = float(np.max(((hi - lo) / 2.0)[mask]))
                res = max(res, (half / mag, p))
    if internal:
        if excused:
            rows.append(_row(suite, cid, "ACCEPTABLE", detail=(
                f"at {prof.name}: {flips.detail}; differing: {', '.join(excused)}")))
        else:
            notes.append(flips.detail)
    if gcase.result == "acceptable" and not spec.flips and not spec.spikes and not internal:
        _mark_acceptable(rows, gcase)  # no spike structure to go by: the file's word
    if not any(r["status"] in FAILURES or r["status"] == "ACCEPTABLE" for r in rows):
        extra = "; ".join(notes + ([f"{skipped} dataset(s) skipped"] if skipped else []))
        if prof.name == "float64":
            if not rows:
                rows.append(_row(suite, cid, "PASS" if not skipped else "SKIP", detail=extra))
        elif counts["tested"]:
            how = f" (inputs read {ref.read})" if prof.rounds else ""
            resolution = (f"; resolution: half-width / max|ref| <= {res[0]:.3g} ({res[1]})"
                          if res[0] > 0 else "")
            rows.append(_row(suite, cid, "PASS", detail=(
                f"at {prof.name}{how}{resolution}" + (f"; {extra}" if extra else ""))))
            if res[0] > 0:
                rows[-1]["resolution"] = res[0]
                rows[-1]["resolution_tensor"] = res[1]
        elif skipped and not rows:
            rows.append(_row(suite, cid, "SKIP", detail=extra))
        elif not rows:
            rows.append(_row(suite, cid, "UNTESTABLE", detail=(
                f"nothing in this case is a test at {prof.name}" + (f": {extra}" if extra
                                                                     else ""))))
    return rows, counts


def _mark_acceptable(rows, gcase):
    """In an ``acceptable`` case of a suite without spikes a MISMATCH is ACCEPTABLE (in
    place)."""
    for r in rows:
        if r["status"] == "MISMATCH":
            r["status"] = "ACCEPTABLE"
            r["detail"] = "acceptable case (" + ", ".join(gcase.flags) + "): " + r["detail"]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def summarise(rows, selected=None, total=None):
    """The file summary: cases, failed cases, status counts, tensor counts (tested,
    untestable, not compared), the worst resolution."""
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    res = [r for r in rows if "resolution" in r]
    cases_failed = len({(r["suite"], r["case"]) for r in rows if r["status"] in FAILURES})
    cases = len({(r["suite"], r["case"]) for r in rows})
    out = {"cases": cases, "cases_failed": cases_failed, "statuses": counts}
    tensors = {"tested": 0, "untestable": 0, "not_compared": 0}
    seen = False
    for r in rows:
        for k, v in r.get("tensors", {}).items():
            tensors[k] += v
            seen = True
    if seen:
        out["tensors"] = tensors
    if selected is not None:
        out.update(selected=selected, total=total)
    if res:
        worst = max(res, key=lambda r: r["resolution"])
        at = f"{worst['case']} {worst.get('resolution_tensor', worst['tensor'])}"
        out.update(resolution=worst["resolution"], resolution_at=at,
                   coarse=sum(r["resolution"] > COARSE for r in res))
    return out


def _no_match(select, cases, suite):
    """The SelectError for a selection that matches no case: the values each named attribute
    takes in the suite."""
    parts = []
    for e in select:
        if "=" in e and not e.startswith("flag:"):
            name = e.split("=", 1)[0].strip()
            vals = sorted({str(_case_attrs(c).get(name)) for c in cases
                           if name in _case_attrs(c)})
            parts.append(f"{name} takes {', '.join(vals)}")
    return SelectError(f"--select {' '.join(select)} matches no case of suite {suite!r}"
                       + (f" ({'; '.join(parts)})" if parts else ""))


_GOLDEN = {}


def _golden(path):
    """:func:`~.schema.read_golden`, cached per process by path, size and modification time
    (verifying many candidates against one suite reads its golden file once; the verifier never
    writes into a golden case)."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _GOLDEN:
        if len(_GOLDEN) > 32:
            _GOLDEN.clear()
        _GOLDEN[key] = read_golden(path)
    return _GOLDEN[key]


def verify_file(candidate, golden_dir=DEFAULT_DIR, skip=(), precision="float64", select=()):
    """Compare one candidate file with ``<golden_dir>/<suite>.h5``; returns a file report dict
    ``{candidate, golden, suite, precision, passed, summary, rows}``. Bad files raise
    FileFormatError; a ``select`` expression naming no attribute / flag of the suite's cases,
    or matching no case, raises :class:`~.profiles.SelectError`. Cases not selected are left
    out (the summary has ``selected`` and ``total``)."""
    prof = get_profile(precision)
    cf = read_candidate(candidate)
    suite = cf.suite
    gpath = Path(golden_dir) / f"{suite}.h5"
    if not gpath.exists():
        raise FileFormatError(f"{candidate}: suite {suite!r} has no golden file {gpath}")
    gf = _golden(gpath)
    chosen = selector(select, list(gf.cases.values()), suite) if select else None
    if chosen is not None and not any(chosen(c) for c in gf.cases.values()):
        raise _no_match(select, list(gf.cases.values()), suite)
    rows, selected = [], 0
    for cid, gcase in gf.cases.items():
        if chosen is not None and not chosen(gcase):
            continue
        selected += 1
        if any(fnmatch.fnmatchcase(cid, pat) for pat in skip):
            rows.extend(annotate([_row(suite, cid, "SKIP", detail="case skipped")], gcase))
            continue
        rows.extend(compare_case(suite, gcase, cf.cases.get(cid), skip, prof.name))
    for cid in cf.cases:
        if cid not in gf.cases:
            rows.extend(annotate([_row(suite, cid, "EXTRA", detail=f"case not in {gpath}")],
                                 None))
    summary = summarise(rows, *((selected, len(gf.cases)) if select else (None, None)))
    return {"candidate": str(candidate), "golden": str(gpath), "suite": suite,
            "precision": prof.name, "passed": summary["cases_failed"] == 0,
            "summary": summary, "rows": rows}


def verify(candidates, golden_dir=DEFAULT_DIR, skip=(), precision="float64", select=()):
    """Verify candidate files; returns ``{passed, precision, files: [file reports]}``. Never
    writes. ``precision``: a :data:`~.profiles.PROFILES` name; ``select``: ``--select``
    expressions (``NAME=VALUE``, ``flag:NAME``; AND of all)."""
    prof = get_profile(precision)
    files = [verify_file(c, golden_dir, skip, prof.name, select) for c in candidates]
    return {"passed": all(f["passed"] for f in files), "precision": prof.name, "files": files}


def compare_tensor(cand, ref, meta):
    """Compare one dataset at float64 with its stored bound (``meta``: ``compare``, ``atol``,
    ``rtol``). Returns None on agreement, else ``(status, index, value, reference, bound,
    detail)``; ``status`` is MISMATCH, SHAPE or DTYPE."""
    cand, ref = np.asarray(cand), np.asarray(ref)
    if cand.dtype != ref.dtype:
        return "DTYPE", "", None, None, None, f"dtype {cand.dtype}, expected {ref.dtype}"
    if cand.shape != ref.shape:
        return "SHAPE", "", None, None, None, f"shape {cand.shape}, expected {ref.shape}"
    if ref.size == 0:
        return None
    f = _outside_interval(cand, ref, meta, PROFILES["float64"], None)
    return None if f is None else ("MISMATCH", f.index, f.value, f.reference, f.bound, f.detail)


def coverage(golden_dir=DEFAULT_DIR, suites=None, precision="float64", progress=None):
    """How much of the committed set is a test at ``precision``: per suite, the valid and
    acceptable cases judged with refimpl's own answer as the candidate (the reference rounded to
    the format: a perfect backend, so no spike flips of its own) and the tensors counted as in
    :func:`summarise` (tested, untestable, not compared). Returns ``{suite: {cases, tested,
    untestable, not_compared, untestable_cases}}``; ``progress(1)`` per case."""
    prof = get_profile(precision)
    out = {}
    for name in (suites or list(SUITES)):
        gf = read_golden(Path(golden_dir) / f"{name}.h5")
        t = {"cases": 0, "tested": 0, "untestable": 0, "not_compared": 0,
             "untestable_cases": 0}
        for gcase in gf.cases.values():
            if progress:
                progress(1)
            if gcase.result == "invalid":
                continue
            t["cases"] += 1
            refs = references(name, gcase, prof)
            ref = refs[0].case if refs and not refs[0].error else gcase
            cand = dataclasses.replace(gcase, data={
                p: (round_to(v, prof) if np.asarray(v).dtype.kind == "f" else v)
                for p, v in ref.data.items() if p.startswith(("outputs/", "grads/"))},
                extra={}, meta={})
            rows = compare_case(name, gcase, cand, (), prof.name)
            counts = rows[0].get("tensors") if rows else None
            if counts is None:  # the whole case is not a test (overflow, refimpl rejects)
                t["untestable_cases"] += 1
                t["untestable"] += sum(p.startswith(("outputs/", "grads/")) for p in gcase.data)
                continue
            for k, v in counts.items():
                t[k] += v
        out[name] = t
    return out
