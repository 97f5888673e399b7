"""Comparison: :func:`verify` (a candidate against golden files) and :func:`check` (refimpl
against its own committed files).

Both return ``{passed, files: [{candidate, golden, suite, passed, summary, rows}]}``; a row is
a dict with ``suite, case, status, tensor, index, value, reference, bound, detail``
(:mod:`.report` prints it). Statuses: :data:`~.schema.STATUSES`; the ones in
:data:`~.schema.FAILURES` fail.

``check`` asks two questions of every committed case:

1. **Regression** (``PASS``, ``MISMATCH``, ``ERROR``, ...): refimpl recomputes the case from
   the file's own inputs, parameters, configuration and cotangents, and the result must lie
   within the *stored* bounds, exactly as a candidate backend's would (:func:`compare_case`).
2. **Staleness** (``STALE``, ``DRIFT``): the generator rebuilds the case from its definition
   (:func:`.generate.regenerate`) and everything it would write is compared with what the file
   holds (:func:`staleness`). The committed files are made on one machine and checked on others,
   whose libm, SIMD paths (NumPy) and FFT may round differently, so a difference only makes the
   file ``STALE`` when rounding cannot explain it:

   - strings, integers, booleans, flags, case ids, dataset names, shapes and dtypes: any
     difference; an attribute the generator writes and the file lacks (or the reverse);
   - inputs, params, cotangents (seeded draws through a few ``exp``/``log``):
     ``|new - old| > SAFETY eps max|old|`` elementwise (integer arrays: any difference);
   - outputs and grads: the stored bound ``atol + rtol |old|`` (a value outside it is the
     regression check's ``MISMATCH``, or follows from a stale input, and is not repeated here);
   - the tolerance attributes, from how each is made: ``scale`` (a magnitude of a tensor, or of
     the op on absolute values) may move as much as the tensor, ``atol + rtol scale``;
     ``spread`` is a difference of two evaluations on each machine, each within the rounding
     term ``SAFETY depth eps scale`` of the exact value, so it may move by 4 times that;
     ``atol`` must be exactly :func:`.generate.tolerance` of the stored ``depth``, ``scale``,
     ``spread``, ``floor`` (plain float arithmetic: the same bits everywhere), so an edited or
     outdated ``atol`` is STALE however small the edit; ``margin`` may move by the largest
     rounding bound of the membranes it measures; other floats (rtol, config values,
     ``floor``, learning rates) by ``SAFETY eps`` relative;
   - in ``acceptable`` cases (either side) every numerical difference is within rounding by
     definition (a spike may flip), and a case whose margin is within twice its membrane bound
     may turn ``valid`` <-> ``acceptable`` (with the ``near_threshold`` flag) on another machine.

   Everything else that is not bit-identical is ``DRIFT``: reported, counted, never failing.
   Regenerate (``refimpl golden generate --overwrite``) on STALE; DRIFT only says that this
   machine rounds differently from the one that wrote the file.
"""
import dataclasses
import fnmatch
import hashlib
import math
from pathlib import Path

import numpy as np

from ..h5io import FileFormatError
from .generate import EPS, SAFETY, case_from_spec, regenerate, run, tolerance
from .registry import SUITES, get_suite, suite_specs
from .precision import (INPUT_ROUNDING, bound as profile_bound,
                        get_profile, overflows, representable, selector)
from .schema import DEFAULT_DIR, FAILURES, read_candidate, read_golden


def _row(suite, cid, status, tensor="-", index="", value=None, reference=None, bound=None,
         detail=""):
    return {"suite": suite, "case": cid, "status": status, "tensor": tensor, "index": index,
            "value": value, "reference": reference, "bound": bound, "detail": detail}


def _annotate(rows, gcase):
    """Every row carries its case's flags and comment (reports point at the cause)."""
    for r in rows:
        r.setdefault("flags", list(gcase.flags) if gcase is not None else [])
        r.setdefault("comment", gcase.comment if gcase is not None else "")
    return rows


def _index(i):
    return "(" + ", ".join(str(int(k)) for k in i) + ")" if len(i) != 1 else f"({int(i[0])},)"


def compare_tensor(cand, ref, meta):
    """Compare one dataset. Returns None on agreement, else ``(status, index, value, reference,
    bound, detail)``; ``status`` is MISMATCH, SHAPE or DTYPE."""
    cand, ref = np.asarray(cand), np.asarray(ref)
    if cand.dtype != ref.dtype:
        return "DTYPE", "", None, None, None, f"dtype {cand.dtype}, expected {ref.dtype}"
    if cand.shape != ref.shape:
        return "SHAPE", "", None, None, None, f"shape {cand.shape}, expected {ref.shape}"
    if ref.size == 0:
        return None
    if meta.get("compare") == "exact":
        bad = ~((cand == ref) | (np.isnan(cand) & np.isnan(ref)) if ref.dtype.kind == "f"
                else (cand == ref))
        if not bad.any():
            return None
        if ref.dtype.kind in "iuf":
            diff = np.where(bad, np.abs(cand.astype(np.float64) - ref.astype(np.float64)), -1.0)
            diff = np.where(np.isnan(diff), np.inf, diff)
            i = np.unravel_index(int(np.argmax(diff)), ref.shape)
        else:
            i = np.unravel_index(int(np.argmax(bad)), ref.shape)
        n = int(bad.sum())
        return ("MISMATCH", _index(i), cand[i].item(), ref[i].item(), 0.0,
                f"{n} of {ref.size} differ (exact)")
    rtol, atol = float(meta.get("rtol", 0.0)), float(meta.get("atol", 0.0))
    diff = np.abs(cand - ref)
    bound = atol + rtol * np.abs(ref)
    ok = diff <= bound
    if ok.all():
        return None
    ratio = np.where(ok, 0.0, np.where(np.isnan(diff), np.inf, diff / np.maximum(bound, 1e-300)))
    i = np.unravel_index(int(np.argmax(ratio)), ref.shape)
    n = int((~ok).sum())
    return ("MISMATCH", _index(i), cand[i].item(), ref[i].item(), float(bound[i]),
            f"{n} of {ref.size} outside atol {atol:.3g} + rtol {rtol:.3g} |ref|")


def _skipped(cid, tensor, skip):
    key = f"{cid}/{tensor}"
    return any(fnmatch.fnmatchcase(key, pat) or fnmatch.fnmatchcase(tensor, pat) for pat in skip)


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


def compare_case(suite, gcase, ccase, skip=(), precision="float64"):
    """Rows of one case: PASS, ACCEPTABLE, REJECTED, SKIP, UNTESTABLE or one row per failing
    tensor; every row carries the case's ``flags`` and ``comment``.

    ``precision`` (a :data:`~.precision.PROFILES` name): float64 compares with the stored
    bounds; the others with the bounds re-derived for that format and the spike rules of
    :func:`_compare_profile` (golden/SCHEMA.md, "Precision profiles")."""
    rows = _compare_case(suite, gcase, ccase, skip, get_profile(precision))
    extra = _extra_rows(suite, gcase, ccase, skip)
    if extra:  # replaces a PASS / SKIP row: the case fails
        rows = [r for r in rows if r["status"] not in ("PASS", "SKIP")] + extra
    return _annotate(rows, gcase)


def _compare_case(suite, gcase, ccase, skip, prof):
    cid = gcase.id
    if ccase is None:
        return [_row(suite, cid, "MISSING", detail="case not in candidate")]
    err = ccase.extra.get("error")
    if gcase.result == "invalid":
        if err:
            return [_row(suite, cid, "REJECTED", detail=f"rejected as required: {err}")]
        return [_row(suite, cid, "NOT_REJECTED",
                     detail=f"invalid case must be rejected (set the case attribute 'error'); "
                            f"refimpl: {gcase.extra.get('error', '')}")]
    over = overflows(gcase, prof) if prof.name != "float64" else None
    if over:
        return [_row(suite, cid, "UNTESTABLE", over[0], bound=prof.max, detail=(
            f"{over[0]} holds {over[1]:.3g}, beyond the largest {prof.name} ({prof.max:.5g}): "
            f"not a test at this precision (a rejection is fine)"))]
    if err:
        return [_row(suite, cid, "ERROR", detail=f"valid case rejected by the candidate: {err}")]
    if prof.name != "float64":
        return _compare_profile(suite, gcase, ccase, skip, prof)
    paths, rows, skipped = _present(suite, gcase, ccase, skip)
    for path in paths:
        r = compare_tensor(ccase.data[path], gcase.data[path], gcase.meta.get(path, {}))
        if r is not None:
            status, index, value, reference, bound, detail = r
            rows.append(_row(suite, cid, status, path, index, value, reference, bound, detail))
    _mark_acceptable(rows, gcase)
    if not rows:
        rows.append(_row(suite, cid, "PASS" if not skipped else "SKIP",
                         detail=f"{skipped} dataset(s) skipped" if skipped else ""))
    return rows


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


def _mark_acceptable(rows, gcase):
    """In an ``acceptable`` case a MISMATCH is ACCEPTABLE (in place)."""
    if gcase.result != "acceptable":
        return
    for r in rows:
        if r["status"] == "MISMATCH":
            r["status"] = "ACCEPTABLE"
            r["detail"] = "acceptable case (" + ", ".join(gcase.flags) + "): " + r["detail"]


# --------------------------------------------------------------------------------------------
# Precision profiles (float32, bfloat16, float16)
# --------------------------------------------------------------------------------------------

#: Suites whose spikes ``s`` come from the stored membrane ``h`` of the same row (stateful).
_NEURON_SUITES = ("neuron", "pmbc")
#: Suites whose spikes are internal; judged by the case ``margin`` (:func:`membrane_bound`).
_INTERNAL_SPIKES = ("block", "model_step", "lm_step", "model_stream")
#: Flipped-spike indices listed in a row's detail.
_LIST_FLIPS = 8


def _check_dtype(cand, ref, prof):
    """None if the candidate's dtype is acceptable under ``prof``, else the DTYPE detail:
    float64 or the profile's storage dtype for float datasets, the golden dtype otherwise."""
    cand, ref = np.asarray(cand), np.asarray(ref)
    if ref.dtype.kind == "f":
        ok = ("float64",) + prof.storage
        if cand.dtype.name in ok:
            return None
        return f"dtype {cand.dtype}, expected {' or '.join(ok)} at {prof.name}"
    if cand.dtype != ref.dtype:
        return f"dtype {cand.dtype}, expected {ref.dtype}"
    return None


def _close(cand, ref, atol, rtol, mask):
    """allclose over ``mask``: None, or ``(index, value, reference, bound, detail)``."""
    diff = np.abs(cand - ref)
    bnd = atol + rtol * np.abs(ref)
    ok = (diff <= bnd) | ~mask
    if ok.all():
        return None
    ratio = np.where(ok, 0.0, np.where(np.isnan(diff), np.inf, diff / np.maximum(bnd, 1e-300)))
    i = np.unravel_index(int(np.argmax(ratio)), ref.shape)
    n = int((~ok).sum())
    return (_index(i), cand[i].item(), ref[i].item(), float(bnd[i]),
            f"{n} of {int(mask.sum())} outside atol {atol:.3g} + rtol {rtol:.3g} |ref|")


def _exact(cand, ref, mask):
    bad = (cand != ref) & mask
    if not bad.any():
        return None
    i = np.unravel_index(int(np.argmax(bad)), ref.shape)
    return (_index(i), cand[i].item(), ref[i].item(), 0.0,
            f"{int(bad.sum())} of {int(mask.sum())} differ (exact)")


def _exact_at(gcase, prof):
    """Whether an ``at_threshold`` neuron case is computed exactly in ``prof``'s arithmetic:
    every input, parameter, configuration value, membrane ``h``, ``u`` and product
    ``tau u`` is representable, so each step's exact result is (dyadic cases, tau = 0.5)."""
    if "at_threshold" not in gcase.flags:
        return False
    c = gcase.config
    u = gcase.data.get("outputs/u")
    u0 = gcase.data.get("inputs/u0")  # stateful cases: h_0 = tau u0 + x_0
    vals = [gcase.data.get("inputs/x"), gcase.data.get("params/rho"), gcase.data.get("outputs/h"),
            u, None if u is None else c.get("tau", 0.0) * u,
            u0, None if u0 is None else c.get("tau", 0.0) * u0,
            np.array([c.get("tau", 0.0), c.get("theta", 0.0), c.get("u_reset", 0.0)])]
    return all(representable(v, prof) for v in vals if v is not None)


_MEMBRANE_CACHE = {}


def membrane_bound(suite_name, gcase, prof):
    """The profile bound of a block's / model's internal membranes, derived as for the neuron's
    ``h``: refimpl recomputes them from the case's inputs (and ``N_PERTURB`` copies perturbed by
    ``PERTURB``, the measured ``spread``); ``max(SAFETY (depth eps_p max|h| + (1 + 1/4) k
    spread), k floor)`` with the suite's output depth. 0 when the case has no membranes."""
    from .generate import N_PERTURB, _perturbed, lookup  # the generator's own recipe
    digest = hashlib.sha1()
    for p in sorted(gcase.data):
        if p.startswith(("inputs/", "params/")):
            digest.update(p.encode() + np.ascontiguousarray(gcase.data[p]).tobytes())
    key = (suite_name, gcase.id, digest.hexdigest())
    if key not in _MEMBRANE_CACHE:
        suite = get_suite(suite_name)
        case = dataclasses.replace(gcase, data={p: v for p, v in gcase.data.items()
                                                if p.startswith(("inputs/", "params/"))})
        _, _, diag = suite.fwd(case)
        mem = diag.get("membranes", {})
        rng = np.random.default_rng([int(gcase.id), 3])
        spread = {m: 0.0 for m in mem}
        for _ in range(N_PERTURB):
            _, _, d2 = suite.fwd(_perturbed(case, rng))
            for m, (h, _) in mem.items():
                spread[m] = max(spread[m], float(np.max(np.abs(d2["membranes"][m][0] - h)))
                                if np.size(h) else 0.0)
        depth = int(lookup(suite.depth(case), "outputs/*"))
        floors = suite.floors(case) if suite.floors else {}
        parts = [(depth, float(np.max(np.abs(h))) if np.size(h) else 0.0, spread[m],
                  floors.get("membrane/" + m, 0.0)) for m, (h, _) in mem.items()]
        _MEMBRANE_CACHE[key] = parts
    k = prof.k
    return max((max(SAFETY * (d * prof.eps * sc + (1.0 + INPUT_ROUNDING) * k * sp), k * fl)
                for d, sc, sp, fl in _MEMBRANE_CACHE[key]), default=0.0)


def _flip_rows(suite, gcase, cand_s, prof, compared):
    """Judge spike flips by the reference margin; returns ``(masks, rows, notes)``.

    ``masks`` maps dataset paths to boolean arrays of the elements still comparable.
    neuron / pmbc: per row (b, c) the first differing step t0 is an acceptable flip when
    ``|h - theta| <= atol_h + rtol_h |h|`` there (0 in cases computed exactly at this precision,
    ``at_threshold``); then ``s``, ``h``, ``u`` are compared only before t0, ``grads/x`` of the
    row, the row's end state (``u_end``, ``count_end``, stateful cases) and ``grads/rho`` of
    the channel not at all. sdn (stateless): each flip with
    ``|m + x - theta| <= atol_m + rtol_m |m| + eps_p |x|`` is acceptable on its own.
    """
    cid, c = gcase.id, gcase.config
    ref_s = gcase.data["outputs/s"]
    theta = float(c.get("theta", 0.0))
    if suite in _NEURON_SUITES:
        h = gcase.data["outputs/h"]
        atol, rtol = profile_bound(gcase.meta.get("outputs/h", {}), prof)
        exact = _exact_at(gcase, prof)
        elem = np.zeros_like(h) if exact else atol + rtol * np.abs(h)
        margin = np.abs(h - theta)
    else:  # sdn
        m, x = gcase.data["outputs/m"], gcase.data["inputs/x"]
        atol, rtol = profile_bound(gcase.meta.get("outputs/m", {}), prof)
        exact = False
        elem = atol + rtol * np.abs(m) + prof.eps * np.abs(x)
        margin = np.abs(m + x - theta)
    within = margin <= elem if not exact else np.zeros(margin.shape, bool)
    rows, masks, notes = [], {}, []
    if ref_s.size and within.all():
        rows.append(_row(suite, cid, "UNTESTABLE", "outputs/s", detail=(
            f"every spike's margin is within the membrane bound at {prof.name} "
            f"(largest margin {float(margin.max()):.3g}): the spikes are not a test here")))
    differ = cand_s != ref_s
    if not differ.any():
        return masks, rows, notes
    flips = []
    if suite in _NEURON_SUITES:
        B, H, L = ref_s.shape
        keep = np.ones(ref_s.shape, bool)
        row_ok = np.ones((B, H), bool)
        for b, ch in zip(*np.nonzero(differ.any(axis=-1))):
            t0 = int(np.argmax(differ[b, ch]))
            if within[b, ch, t0]:
                flips.append((int(b), int(ch), t0))
                keep[b, ch, t0:] = False
                row_ok[b, ch] = False
        for p in ("outputs/s", "outputs/h", "outputs/u"):
            masks[p] = keep
        masks["grads/x"] = np.broadcast_to(row_ok[:, :, None], ref_s.shape)
        masks["outputs/u_end"] = masks["outputs/count_end"] = row_ok
        masks["grads/rho"] = row_ok.all(axis=0)
        if flips:
            notes.append("rows with an acceptable flip are compared up to the flip only")
    else:
        acc = differ & within
        flips = [tuple(int(k) for k in i) for i in zip(*np.nonzero(acc))]
        masks["outputs/s"] = ~acc
    if flips:
        shown = ", ".join(_index(f) for f in flips[:_LIST_FLIPS])
        more = f" and {len(flips) - _LIST_FLIPS} more" if len(flips) > _LIST_FLIPS else ""
        rows.append(_row(suite, cid, "ACCEPTABLE", "outputs/s", _index(flips[0]),
                         float(cand_s[flips[0]]), float(ref_s[flips[0]]),
                         float(elem[flips[0]]),
                         f"{len(flips)} spike flip(s) within the membrane bound at {prof.name} "
                         f"(margin {float(margin[flips[0]]):.3g} <= {float(elem[flips[0]]):.3g})"
                         f": {shown}{more}"
                         + ("; the rest of each row is not comparable"
                            if suite in _NEURON_SUITES else "")))
    return masks, rows, notes


def _compare_profile(suite, gcase, ccase, skip, prof):
    """Rows of a valid or acceptable case under a non-float64 profile (SCHEMA.md)."""
    cid = gcase.id
    margin = gcase.extra.get("margin")
    if suite in _INTERNAL_SPIKES and isinstance(margin, float) and math.isfinite(margin):
        mb = membrane_bound(suite, gcase, prof)
        if margin <= mb:
            return [_row(suite, cid, "ACCEPTABLE", "-", "", margin, None, mb,
                         f"margin {margin:.3g} of the internal spikes is within the membrane "
                         f"bound {mb:.3g} at {prof.name}: a spike may flip; not compared")]
    paths, rows, skipped = _present(suite, gcase, ccase, skip)
    tested, cand, res = 0, {}, (0.0, "-")
    for p in paths:
        v, ref = np.asarray(ccase.data[p]), np.asarray(gcase.data[p])
        bad = _check_dtype(v, ref, prof)
        if bad:
            rows.append(_row(suite, cid, "DTYPE", p, detail=bad))
        elif v.shape != ref.shape:
            rows.append(_row(suite, cid, "SHAPE", p,
                             detail=f"shape {v.shape}, expected {ref.shape}"))
        else:
            cand[p] = v.astype(np.float64) if ref.dtype.kind == "f" else v
    masks, notes = {}, []
    if "outputs/s" in cand and (suite in _NEURON_SUITES or suite == "sdn"):
        masks, frows, notes = _flip_rows(suite, gcase, cand["outputs/s"], prof, cand)
        rows += frows
    for p in paths:
        if p not in cand:
            continue
        ref, meta = np.asarray(gcase.data[p]), gcase.meta.get(p, {})
        if p == "outputs/iterations":
            notes.append(f"iterations not compared at {prof.name}")
            continue
        mask = np.asarray(masks.get(p, np.ones(ref.shape, bool)))
        if not mask.any():
            continue
        if meta.get("compare") == "exact" or ref.dtype.kind != "f":
            r = _exact(cand[p], ref, mask)
            untestable = False
        else:
            atol, rtol = profile_bound(meta, prof)
            r = _close(cand[p], ref, atol, rtol, mask)
            mag = float(np.max(np.abs(ref))) if ref.size else 0.0
            untestable = atol > 0 and atol >= mag  # incl. a structurally zero tensor
        if r is not None:
            rows.append(_row(suite, cid, "MISMATCH", p, *r))
        elif untestable:
            rows.append(_row(suite, cid, "UNTESTABLE", p, bound=atol, detail=(
                f"atol {atol:.3g} at {prof.name} >= max|ref| {mag:.3g}: not a test at this "
                f"precision")))
        else:
            tested += 1
            if ref.dtype.kind == "f" and meta.get("compare") != "exact" and mag > 0:
                res = max(res, (atol / mag, p))
    _mark_acceptable(rows, gcase)
    if not any(r["status"] in FAILURES or r["status"] == "ACCEPTABLE" for r in rows):
        if tested:
            detail = "; ".join(notes + ([f"{skipped} dataset(s) skipped"] if skipped else []))
            rows.append(_row(suite, cid, "PASS", detail=(
                f"at {prof.name}; resolution: atol / max|ref| <= {res[0]:.3g} ({res[1]})"
                + (f"; {detail}" if detail else ""))))
            if res[0] > 0:
                rows[-1]["resolution"] = res[0]
                rows[-1]["resolution_tensor"] = res[1]
        elif skipped and not rows:
            rows.append(_row(suite, cid, "SKIP", detail=f"{skipped} dataset(s) skipped"))
    return rows


#: A tested tensor whose profile bound exceeds this fraction of its magnitude cannot see a
#: relative error of 1e-3: counted as ``coarse`` in the summary (it still passes or fails).
COARSE = 1e-3


def _summary(rows, selected=None, total=None):
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    res = [r for r in rows if "resolution" in r]
    cases_failed = len({(r["suite"], r["case"]) for r in rows if r["status"] in FAILURES})
    cases = len({(r["suite"], r["case"]) for r in rows})
    out = {"cases": cases, "cases_failed": cases_failed, "statuses": counts}
    if selected is not None:
        out.update(selected=selected, total=total)
    if res:
        worst = max(res, key=lambda r: r["resolution"])
        at = f"{worst['case']} {worst.get('resolution_tensor', worst['tensor'])}"
        out.update(resolution=worst["resolution"], resolution_at=at,
                   coarse=sum(r["resolution"] > COARSE for r in res))
    return out


def verify_file(candidate, golden_dir=DEFAULT_DIR, skip=(), precision="float64", select=()):
    """Compare one candidate file with ``<golden_dir>/<suite>.h5``; returns a file report dict
    ``{candidate, golden, suite, precision, passed, summary, rows}``. Bad files raise
    FileFormatError; a ``select`` expression naming no attribute / flag of the suite's cases
    raises :class:`~.precision.SelectError`. Cases not selected are left out (the summary
    has ``selected`` and ``total``)."""
    prof = get_profile(precision)
    cf = read_candidate(candidate)
    suite = cf.suite
    gpath = Path(golden_dir) / f"{suite}.h5"
    if not gpath.exists():
        raise FileFormatError(f"{candidate}: suite {suite!r} has no golden file {gpath}")
    gf = read_golden(gpath)
    chosen = selector(select, list(gf.cases.values()), suite) if select else None
    rows, selected = [], 0
    for cid, gcase in gf.cases.items():
        if chosen is not None and not chosen(gcase):
            continue
        selected += 1
        if any(fnmatch.fnmatchcase(cid, pat) for pat in skip):
            rows.extend(_annotate([_row(suite, cid, "SKIP", detail="case skipped")], gcase))
            continue
        rows.extend(compare_case(suite, gcase, cf.cases.get(cid), skip, prof.name))
    for cid in cf.cases:
        if cid not in gf.cases:
            rows.extend(_annotate([_row(suite, cid, "EXTRA", detail=f"case not in {gpath}")],
                                  None))
    summary = _summary(rows, *((selected, len(gf.cases)) if select else (None, None)))
    return {"candidate": str(candidate), "golden": str(gpath), "suite": suite,
            "precision": prof.name, "passed": summary["cases_failed"] == 0,
            "summary": summary, "rows": rows}


def verify(candidates, golden_dir=DEFAULT_DIR, skip=(), precision="float64", select=()):
    """Verify candidate files; returns ``{passed, precision, files: [file reports]}``. Never
    writes. ``precision``: a :data:`~.precision.PROFILES` name; ``select``: ``--select``
    expressions (``NAME=VALUE``, ``flag:NAME``; AND of all)."""
    prof = get_profile(precision)
    files = [verify_file(c, golden_dir, skip, prof.name, select) for c in candidates]
    return {"passed": all(f["passed"] for f in files), "precision": prof.name, "files": files}


def recompute(suite_name, gcase):
    """refimpl's answer to a golden case, from the case's own inputs, params and cotangents:
    a candidate-like :class:`Case` (outputs and grads, or ``error`` for a rejection)."""
    suite = get_suite(suite_name)
    case = dataclasses.replace(gcase, data={p: v for p, v in gcase.data.items()
                                            if p.startswith(("inputs/", "params/"))},
                               extra={}, meta={})
    if gcase.result == "invalid":
        try:
            suite.fwd(case)
        except (ValueError, TypeError) as e:
            case.extra["error"] = str(e).splitlines()[0]
        return case
    cot = gcase.group("cotangents")
    outputs, grads, _, _ = run(suite, case, cot=cot)
    case.data.update({"outputs/" + k: v for k, v in outputs.items()})
    case.data.update({"grads/" + k: np.asarray(v) for k, v in grads.items()})
    return case




# --------------------------------------------------------------------------------------------
# Staleness: the file against what the generator writes now
# --------------------------------------------------------------------------------------------

_ABSENT = object()


def _is_float(v):
    return isinstance(v, float)


def _show(v):
    return "absent" if v is _ABSENT else repr(v)


class _Differences:
    """Items that differ between a file's case and the regenerated one, sorted into ``stale``
    (beyond rounding) and ``drift`` (within); each item is ``(ratio, item, index, new, old,
    allowance, note)`` with ``ratio = |new - old| / allowance`` (inf when not numerical)."""

    def __init__(self):
        self.stale, self.drift = [], []

    def exact(self, item, old, new):
        if old is _ABSENT or new is _ABSENT:
            note = "missing from the file" if old is _ABSENT else "no longer written"
            self.stale.append((math.inf, item, "", None, None, None, note))
        elif type(old) is not type(new) or (
                not np.array_equal(old, new) if isinstance(old, np.ndarray) else old != new):
            self.stale.append((math.inf, item, "", None, None, None,
                               f"is {_show(old)} in the file, {_show(new)} now"))

    def number(self, item, old, new, allowance, loose=False):
        """Float scalars: bit-identical, within ``allowance`` (DRIFT) or beyond (STALE)."""
        if old is _ABSENT or new is _ABSENT or not isinstance(old, (int, float)) \
                or isinstance(old, bool):
            self.exact(item, old, new)
            return
        old, new = float(old), float(new)
        if old == new or (math.isnan(old) and math.isnan(new)):
            return
        diff = abs(new - old)
        diff = math.inf if math.isnan(diff) else diff
        ratio = diff / allowance if allowance > 0 else math.inf
        entry = (ratio, item, "", new, old, allowance, f"differs by {diff:.3g}")
        (self.drift if loose or diff <= allowance else self.stale).append(entry)

    def array(self, item, old, new, allowance, loose=False, skip_beyond=False):
        """Arrays elementwise against ``allowance`` (scalar or array; 0 for integer arrays)."""
        old, new = np.asarray(old), np.asarray(new)
        if old.dtype != new.dtype or old.shape != new.shape:
            self.stale.append((math.inf, item, "", None, None, None, f"is {old.dtype} "
                               f"{old.shape} in the file, {new.dtype} {new.shape} now"))
            return
        same = (old == new) | (np.isnan(old) & np.isnan(new)) if old.dtype.kind in "fc" \
            else (old == new)
        if same.all():
            return
        if old.dtype.kind not in "fc":
            i = np.unravel_index(int(np.argmax(~same)), old.shape)
            entry = (math.inf, item, _index(i), new[i].item(), old[i].item(), 0.0,
                     f"{int((~same).sum())} of {old.size} elements differ (exact)")
            if loose:
                self.drift.append(entry)
            elif not skip_beyond:
                self.stale.append(entry)
            return
        diff = np.where(same, 0.0, np.abs(new.astype(np.float64) - old))
        diff = np.where(np.isnan(diff), np.inf, diff)
        allowance = np.broadcast_to(np.asarray(allowance, dtype=np.float64), old.shape)
        ratio = np.where(diff == 0, 0.0, diff / np.maximum(allowance, 1e-300))
        i = np.unravel_index(int(np.argmax(ratio)), old.shape)
        beyond = int((diff > allowance).sum())
        note = (f"{int((~same).sum())} of {old.size} elements differ"
                + (f", {beyond} beyond rounding" if beyond else ""))
        entry = (float(ratio[i]), item, _index(i), new[i].item(), old[i].item(),
                 float(allowance[i]), note)
        if loose or not beyond:
            self.drift.append(entry)
        elif not skip_beyond:
            self.stale.append(entry)


def _ambiguous(old, new, margin_bound):
    """Whether rounding alone decides valid <-> acceptable: a margin within twice its bound."""
    margins = [c.extra.get("margin") for c in (old, new)]
    margins = [m for m in margins if isinstance(m, float) and math.isfinite(m)]
    return bool(margins) and min(margins) <= 2.0 * margin_bound


def _dataset_attrs(d, path, old, new, loose, margin_bound):
    """The attributes of one dataset (see the module docstring for each rule)."""
    depth, scale = new.get("depth", 0), new.get("scale", 0.0)
    rounding = SAFETY * depth * EPS * scale if isinstance(scale, float) else 0.0
    allow = {
        "scale": new.get("atol", 0.0) + new.get("rtol", 0.0) * abs(scale or 0.0),
        "spread": 4.0 * rounding,
        "margin": margin_bound,
    }
    allow["atol"] = (SAFETY * (depth * EPS * allow["scale"] + allow["spread"])
                     + SAFETY * EPS * new.get("floor", 0.0))
    keys = list(new) + [k for k in old if k not in new]
    if all(k in old for k in ("atol", "depth", "scale", "spread")):
        want = tolerance(old["depth"], old["scale"], old["spread"], old.get("floor", 0.0))
        if old["atol"] != want:
            d.stale.append((math.inf, f"{path}@atol", "", want, old["atol"], 0.0,
                            "does not follow from the stored depth, scale, spread, floor"))
            keys.remove("atol")
    for k in keys:
        a, b, item = old.get(k, _ABSENT), new.get(k, _ABSENT), f"{path}@{k}"
        if _is_float(b) and k in allow:
            d.number(item, a, b, allow[k], loose=loose)
        elif _is_float(b):
            d.number(item, a, b, SAFETY * EPS * max(abs(b), abs(a) if _is_float(a) else 0.0))
        else:
            d.exact(item, a, b)


def staleness(gcase, built):
    """Compare a file's case with :func:`.generate.regenerate`'s :class:`~.generate.Built`.

    Returns a :class:`_Differences` (``stale`` and ``drift`` item lists); the criterion is the
    module docstring's.
    """
    new, margin_bound = built.case, built.margin_bound
    d = _Differences()
    loose = "acceptable" in (gcase.result, new.result)
    d.exact("@op", gcase.op, new.op)
    d.exact("@comment", gcase.comment, new.comment)
    old_flags, new_flags = list(gcase.flags), list(new.flags)
    if gcase.result != new.result and {gcase.result, new.result} == {"valid", "acceptable"} \
            and _ambiguous(gcase, new, margin_bound):
        d.drift.append((math.inf, "@result", "", None, None, None,
                        f"{gcase.result} in the file, {new.result} now: the margin is within "
                        f"rounding of its bound"))
        old_flags = [f for f in old_flags if f != "near_threshold"]
        new_flags = [f for f in new_flags if f != "near_threshold"]
    else:
        d.exact("@result", gcase.result, new.result)
    d.exact("@flags", old_flags, new_flags)
    old_attrs, new_attrs = {**gcase.config, **gcase.extra}, {**new.config, **new.extra}
    for k in list(new_attrs) + [k for k in old_attrs if k not in new_attrs]:
        a, b = old_attrs.get(k, _ABSENT), new_attrs.get(k, _ABSENT)
        if k == "margin":
            d.number("@margin", a, b, margin_bound, loose=loose)
        elif _is_float(b):
            d.number(f"@{k}", a, b, SAFETY * EPS * max(abs(b), abs(a) if _is_float(a) else 0.0))
        else:
            d.exact(f"@{k}", a, b)
    for path in list(new.data) + [p for p in gcase.data if p not in new.data]:
        if path not in gcase.data or path not in new.data:
            d.exact(path, gcase.data.get(path, _ABSENT), new.data.get(path, _ABSENT))
            continue
        old, cur = gcase.data[path], new.data[path]
        om, nm = gcase.meta.get(path, {}), new.meta.get(path, {})
        if path.startswith(("outputs/", "grads/")):
            allow = (float(om.get("atol", 0.0)) + float(om.get("rtol", 0.0)) * np.abs(old)
                     if np.asarray(old).dtype.kind == "f" else 0.0)
            d.array(path, old, cur, allow, loose=loose, skip_beyond=True)
        else:
            o = np.asarray(old)
            scale = float(np.nanmax(np.abs(o))) if o.dtype.kind == "f" and o.size \
                and not np.isnan(o).all() else 0.0
            d.array(path, old, cur, SAFETY * EPS * scale)
        _dataset_attrs(d, path, om, nm, loose, margin_bound)
    return d


def _stale_rows(suite, cid, d):
    """At most one STALE and one DRIFT row for a case: the worst item, and the list in detail."""
    rows = []
    for status, items, what in (("STALE", d.stale, "beyond rounding (regenerate)"),
                                ("DRIFT", d.drift, "within rounding")):
        if not items:
            continue
        items = sorted(items, key=lambda it: -it[0])
        _, item, index, new, old, allowance, _ = items[0]
        rows.append(_row(suite, cid, status, item, index, new, old, allowance,
                         f"{len(items)} difference(s) from the generator {what}: "
                         + _summarise(items)))
    return rows


def _summarise(items, n=6):
    """``item note; ...`` for the first ``n`` items, attributes missing from the file grouped
    by name (an older file lacks the same attributes on every dataset)."""
    missing, listed = {}, []
    for it in items:
        name, note = it[1], it[6]
        if note == "missing from the file" and "@" in name:
            path, attr = name.rsplit("@", 1)
            missing.setdefault(attr, []).append(path)
        else:
            listed.append(f"{name} {note}")
    parts = []
    for attr, paths in missing.items():
        on_datasets = [p for p in paths if p]  # "" is the case group itself
        parts.append(f"@{attr} missing from the file" if not on_datasets else
                     f"{attr} missing from the file on {len(on_datasets)} dataset(s)")
    parts += listed[:n]
    more = len(listed) - n
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _structure(case):
    """What must agree before a case can be recomputed and compared: op, input shapes, dtypes."""
    return case.op, {p: (np.shape(v), np.asarray(v).dtype.str) for p, v in case.data.items()
                     if p.startswith(("inputs/", "params/"))}


def _error_row(suite, cid, e, doing=""):
    msg = " ".join(str(e).split())
    return _row(suite, cid, "ERROR", detail=f"refimpl raised {type(e).__name__}{doing}: {msg}")


def check_case(name, cid, gcase, spec, seed):
    """Rows of one committed case: the regression rows, then STALE / DRIFT rows."""
    suite = get_suite(name)
    want, got = _structure(case_from_spec(suite, cid, spec)), _structure(gcase)
    if want != got:
        what = [n for n, a, b in zip(("op", "input shapes"), want, got) if a != b]
        return [_row(name, cid, "STALE", detail=f"{', '.join(what)} differ from the case "
                     "definition: regenerate")]
    try:
        rows = compare_case(name, gcase, recompute(name, gcase))
    except Exception as e:  # a crash of refimpl is a regression, reported as a row
        rows = [_error_row(name, cid, e)]
    try:
        built = regenerate(suite, cid, spec, seed)
    except Exception as e:
        if not any(r["status"] == "ERROR" for r in rows):
            rows.append(_error_row(name, cid, e, " regenerating the case"))
        return _annotate(rows, gcase)
    return _annotate(rows + _stale_rows(name, cid, staleness(gcase, built)), gcase)


def check(golden_dir=DEFAULT_DIR, suites=None, progress=None):
    """Regression and staleness test of refimpl against its committed golden files.

    For every case of ``<golden_dir>/<suite>.h5``: recompute with the installed code from the
    stored inputs, params and cotangents and compare with the stored outputs and grads under the
    stored tolerances (invalid cases must still be rejected); then rebuild the case from its
    definition and report ``STALE`` for differences beyond rounding (ids, ops, shapes,
    attributes, values: the module docstring states the criterion) and ``DRIFT`` for
    differences within rounding (not a failure). ``progress(1)`` is called per case.
    Returns the same report structure as :func:`verify`.
    """
    names = list(SUITES) if not suites else list(suites)
    files = []
    for name in names:
        get_suite(name)
        gpath = Path(golden_dir) / f"{name}.h5"
        gf = read_golden(gpath)
        seed = int(gf.attrs.get("seed", 0))
        rows = []
        specs = dict(suite_specs(name, seed, gf.attrs.get("size", "small")))
        for cid in sorted(set(specs) | set(gf.cases)):
            if cid not in gf.cases:
                rows.append(_row(name, cid, "STALE", detail="case defined in refimpl.golden but "
                                 "not in the file: regenerate"))
            elif cid not in specs:
                rows.append(_row(name, cid, "STALE", detail="case in the file but no longer "
                                 "defined: regenerate"))
            else:
                rows.extend(check_case(name, cid, gf.cases[cid], specs[cid], seed))
            if progress:
                progress(1)
        summary = _summary(rows)
        files.append({"candidate": "refimpl (recomputed)", "golden": str(gpath), "suite": name,
                      "passed": summary["cases_failed"] == 0, "summary": summary, "rows": rows})
    return {"passed": all(f["passed"] for f in files), "files": files}
