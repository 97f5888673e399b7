"""Check: refimpl against its own committed files (:func:`check`), and :func:`recompute`.
:func:`verify` (a candidate against golden files) lives in :mod:`.verify`, re-exported here.

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
import math
from pathlib import Path

import numpy as np

from .generate import EPS, SAFETY, case_from_spec, regenerate, run, tolerance
from .registry import SUITES, get_suite, suite_specs
from .schema import DEFAULT_DIR, read_golden
from .tensors import excess, index_str as _index
from .verify import (_row, annotate as _annotate, compare_case, summarise as _summary,  # noqa: F401
                     verify, verify_file)


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
        allowance = np.broadcast_to(np.asarray(allowance, dtype=np.float64), old.shape)
        # |new - old| / allowance: the excess over the interval old -/+ allowance, plus 1
        ratio = np.where(same, 0.0, excess(new, old - allowance, old + allowance) + 1.0)
        i = np.unravel_index(int(np.argmax(ratio)), old.shape)
        beyond = int((ratio > 1.0).sum())
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
