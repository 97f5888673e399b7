"""Building golden cases: run refimpl on each spec, derive the tolerances, write the files.

Tolerance policy (also in ``golden/SCHEMA.md``)
------------------------------------------------
Spikes (and integer outputs such as PMBC iteration counts) compare **exactly**. Every other
float dataset compares as ``|candidate - golden| <= atol + rtol |golden|`` with
``rtol = SAFETY eps`` and::

    atol = max(SAFETY (depth eps scale + spread), floor)          (:func:`tolerance`)

- ``depth eps scale``: the rounding of a float64 evaluation whose longest chain of dependent
  sums or recurrence steps has ``depth`` terms of magnitude at most ``scale`` (the standard
  ``gamma_n`` bound). ``depth`` is stated per suite (``L`` for a sequence op, ``L + N2`` for the
  kernel, ...); ``scale`` is the tensor's own ``max |T|`` or, for multilinear ops (convolution),
  the same op evaluated on absolute values, so cancellation cannot shrink the bound below the
  rounding of the terms.
- ``spread``: the conditioning term. A different but backward-stable evaluation equals the exact
  result at inputs perturbed by a few ulps, so refimpl re-runs the case ``N_PERTURB`` times with
  every float input, parameter and cotangent perturbed by a random relative ``PERTURB = 2 eps``
  and takes the largest change of each tensor.
- ``floor``: a suite's documented minimum (neuron membranes: :func:`refimpl.pmbc.rounding_bound`,
  any evaluation order with chunks of up to 64 steps); 0 when the suite has none.

Each allclose dataset stores ``depth``, ``scale``, ``spread`` (and ``floor`` when the suite sets
one) next to ``atol``, so the bound can be re-derived, and ``refimpl golden check`` can tell
an edited or outdated ``atol`` from rounding noise in ``spread`` (see :mod:`.compare`).

``SAFETY = 16`` covers random-sign versus worst-case accumulation. A case whose margin to a
threshold (``min |h - theta|``; for the GSU the ternarisation threshold) is within the membrane's
bound, or whose spikes flipped under the perturbation, is marked ``acceptable`` with the flag
``near_threshold``: a backend may legitimately differ there, and ``verify`` reports such a
difference as ``ACCEPTABLE`` rather than a failure.
"""
import contextlib
import dataclasses
import itertools
import math
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import config
from ..atomic import check_writable
from ..campaign import iter_tasks
from ..precision import require_reference
from .registry import SUITES, get_suite, maxabs, suite_specs
from .schema import DEFAULT_DIR, NO_GRADS, Case, flatten, read_golden, write_file

EPS = float(np.finfo(np.float64).eps)
SAFETY = 16.0
PERTURB = 2.0 * EPS
N_PERTURB = 3


def tolerance(depth, scale, spread, floor=0.0):
    """``atol = max(SAFETY (depth eps scale + spread), floor)``: the one formula (plain float
    arithmetic, so the same bits on every machine for the same operands)."""
    return max(SAFETY * (depth * EPS * scale + spread), floor)


def lookup(table, path):
    """A per-path value of a suite's ``depth`` table: ``path``, else ``group/*``, else ``*``."""
    if path in table:
        return table[path]
    group = path.split("/")[0] + "/*"
    return table.get(group, table.get("*", 1))


def _perturbed(case, rng):
    """A copy of ``case`` with every float input and parameter moved by a few ulps."""
    data = dict(case.data)
    for p, v in case.data.items():
        if p.startswith(("inputs/", "params/")) and v.dtype.kind == "f":
            data[p] = v + v * (PERTURB * rng.uniform(-1.0, 1.0, size=v.shape))
    return dataclasses.replace(case, data=data)


def run(suite, case, cot=None, rng=None):
    """``(outputs, grads, diag, cotangents)`` of a valid case (flat dicts).

    Without ``cot`` the cotangents are drawn from ``rng`` (or ``suite.cotangents``). A case
    flagged ``no_grads`` has neither: ``grads`` and ``cotangents`` are empty, the backward is
    not run.
    """
    outputs, state, diag = suite.fwd(case)
    outputs = flatten(outputs)
    if NO_GRADS in case.flags:  # explicitly without cotangents and grads (SCHEMA.md)
        return outputs, {}, diag, {}
    if cot is None:
        if suite.cotangents is not None:
            cot = suite.cotangents(outputs, rng)
        else:
            cot = {k: rng.normal(size=np.shape(outputs[k])) for k in suite.differentiable}
    grads = suite.bwd(case, state, cot)
    return outputs, grads, diag, cot


def _spikes_equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def case_from_spec(suite, cid, spec):
    """The :class:`~.schema.Case` of a spec before refimpl ran it (inputs, params, config)."""
    data = {"inputs/" + k: np.asarray(v) for k, v in spec.inputs.items()}
    data.update({"params/" + k: np.asarray(v) for k, v in spec.params.items()})
    return Case(id=cid, op=suite.op, comment=spec.comment, flags=list(spec.flags),
                result=spec.result, config=dict(spec.config), data=data, meta=dict(spec.meta))


def _expect_rejection(suite, case):
    """Run an invalid case; return refimpl's one-line error message (RuntimeError if accepted)."""
    try:
        suite.fwd(case)
    except (ValueError, TypeError) as e:
        return str(e).splitlines()[0]
    raise RuntimeError(f"{suite.name} case {case.id} ({case.comment}) is marked invalid but "
                       f"refimpl accepted it")


class Built(NamedTuple):
    """A built case and how far rounding may move its ``margin`` (the largest rounding bound of
    the membranes it is the distance of; 0 without membranes). ``check`` uses the latter."""
    case: Case
    margin_bound: float


def regenerate(suite, cid, spec, seed):
    """Run refimpl on one spec: outputs, cotangents, grads, tolerances, margin, result, and
    the suite's dataset attributes (``suite.meta``).

    Returns :class:`Built`; ``build_case`` returns only the case.
    """
    require_reference("golden generation")
    case = case_from_spec(suite, cid, spec)
    if spec.result == "invalid":
        case.extra["error"] = _expect_rejection(suite, case)
        margin_bound = 0.0
    else:
        margin_bound = _compute(suite, case, spec, seed)
    if suite.meta is not None:
        for p, m in suite.meta(case).items():
            case.meta.setdefault(p, {}).update(m)
    return Built(case, margin_bound)


def _compute(suite, case, spec, seed):
    """Fill a valid case in place (see :func:`regenerate`); returns its margin's bound."""
    cid = case.id
    key = [seed, zlib.crc32(suite.name.encode()), int(cid), 1]
    outputs, grads, diag, cot = run(suite, case, rng=np.random.default_rng(key))
    key[-1] = 2
    prng = np.random.default_rng(key)
    base = {**{"outputs/" + k: v for k, v in outputs.items()},
            **{"grads/" + k: v for k, v in grads.items()}}
    spikes = diag.get("spikes", {})
    membranes = diag.get("membranes", {})
    spread = {p: 0.0 for p in base}
    mspread = {m: 0.0 for m in membranes}
    flipped = False
    if not spec.exact:
        for _ in range(N_PERTURB):
            pc = _perturbed(case, prng)
            pcot = {k: v + v * (PERTURB * prng.uniform(-1.0, 1.0, size=np.shape(v)))
                    for k, v in cot.items()}
            o2, g2, d2, _ = run(suite, pc, cot=pcot)
            if not _spikes_equal(spikes, d2.get("spikes", {})):
                flipped = True
                continue
            new = {**{"outputs/" + k: v for k, v in o2.items()},
                   **{"grads/" + k: v for k, v in g2.items()}}
            for p, v in base.items():
                if v.dtype.kind == "f":
                    spread[p] = max(spread[p], maxabs(new[p] - v))
            for m, (h, _) in membranes.items():
                mspread[m] = max(mspread[m], maxabs(d2["membranes"][m][0] - h))
    depth = suite.depth(case)
    scales = suite.scales(case, outputs, grads, cot) if suite.scales else {}
    floors = suite.floors(case) if suite.floors else {}
    # margin to threshold, and whether rounding may flip a spike
    margin, near, margin_bound = None, flipped, 0.0
    for m, (h, theta) in membranes.items():
        mg = float(np.min(np.abs(h - theta))) if np.size(h) else math.inf
        bound = max(SAFETY * (lookup(depth, "outputs/*") * EPS * maxabs(h) + mspread[m]),
                    floors.get("membrane/" + m, 0.0))
        margin = mg if margin is None else min(margin, mg)
        margin_bound = max(margin_bound, bound)
        near = near or (mg <= bound and not spec.exact)
    for p, v in base.items():
        m = dict(case.meta.get(p, {}))
        if p[len("outputs/"):] in suite.spikes and p.startswith("outputs/"):
            m.update(compare="exact", rtol=0.0, atol=0.0,
                     margin=math.inf if margin is None else margin)
        elif v.dtype.kind != "f":
            m.update(compare="exact", rtol=0.0, atol=0.0)
        else:
            d, scale = int(lookup(depth, p)), scales.get(p, maxabs(v))
            m.update(compare="allclose", rtol=SAFETY * EPS,
                     atol=tolerance(d, scale, spread[p], floors.get(p, 0.0)),
                     depth=d, scale=scale, spread=spread[p])
            if p in floors:
                m["floor"] = floors[p]
        case.meta[p] = m
    case.data.update({"cotangents/" + k: np.asarray(v) for k, v in cot.items()})
    case.data.update(base)
    if margin is not None:
        case.extra["margin"] = margin
    if near and case.result == "valid":
        case.result = "acceptable"
        if "near_threshold" not in case.flags:
            case.flags.append("near_threshold")
    return margin_bound


def build_case(suite, cid, spec, seed):
    """One case exactly as :func:`generate` writes it (see :func:`regenerate`)."""
    return regenerate(suite, cid, spec, seed).case


def _build_task(task):
    """One case of a campaign (:func:`build_suite`, :func:`generate`): ``(suite name, id, spec,
    seed) -> Case``. Runs in a worker process or on a cluster: the suite is looked up by name
    there (the suites registered by importing :mod:`refimpl.golden`)."""
    name, cid, spec, seed = task
    return build_case(get_suite(name), cid, spec, seed)


def _cases(todo, seed, size, progress, workers, scheduler):
    """``(name, cases)`` per suite of ``todo`` in order, each as soon as its cases are built;
    every case is a task of :func:`refimpl.campaign.iter_tasks` (its draws come from its own
    generators, :func:`.registry.rngs` and the ``[seed, crc32(suite), id, k]`` keys of
    :func:`_compute`, so the cases are the same bits wherever they run)."""
    specs = [(n, suite_specs(n, seed, size)) for n in todo]
    tasks = [(n, cid, spec, seed) for n, sp in specs for cid, spec in sp]
    with contextlib.closing(iter_tasks(_build_task, tasks, workers=workers, scheduler=scheduler,
                                       progress=progress, label="golden generate")) as built:
        for n, sp in specs:
            yield n, list(itertools.islice(built, len(sp)))


def build_suite(name, seed=0, size="small", progress=None, workers=1, scheduler=None):
    """All cases of suite ``name`` computed by refimpl: list of :class:`~.schema.Case`.

    ``workers``/``scheduler``: where the cases are computed (:func:`refimpl.campaign.run_tasks`;
    the default is this process); the cases are the same whichever."""
    ((_, cases),) = _cases([name], seed, size, progress, workers, scheduler)
    return cases


def check_fastmath():
    """Golden data is never produced with fast-math kernels (STYLE.md)."""
    if config.FASTMATH:
        raise RuntimeError("refusing to generate golden data with fast-math kernels "
                           "(REFIMPL_FASTMATH is set); unset it and run again")


def plan_generate(out_dir=DEFAULT_DIR, suites=None, overwrite=False, missing_only=False):
    """The ``(suite, path)`` pairs :func:`generate` would write, after every check it makes
    before computing anything (fast-math, names, the folder, existing files); raises the same
    one-line errors. The CLI calls it before it shows progress."""
    check_fastmath()
    if overwrite and missing_only:
        raise ValueError("--overwrite and --missing-only contradict each other; pass one")
    names = list(SUITES) if not suites else list(suites)
    for n in names:
        get_suite(n)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"cannot write into {out_dir}: it is a file, not a folder; "
                                 f"choose another --out")
    paths = [out_dir / f"{n}.h5" for n in names]
    for p in paths:
        check_writable(p)
    if missing_only:
        todo = [(n, p) for n, p in zip(names, paths) if not p.exists()]
    else:
        todo = list(zip(names, paths))
        if not overwrite:
            existing = [str(p) for p in paths if p.exists()]
            if existing:
                raise FileExistsError(f"{', '.join(existing)} exist(s); pass --overwrite "
                                      f"(overwrite=True) to replace, or --missing-only to "
                                      f"write only the absent suites")
    return todo


def generate(out_dir=DEFAULT_DIR, suites=None, seed=0, size="small", overwrite=False,
             progress=None, missing_only=False, workers=1, scheduler=None):
    """Write ``<out_dir>/<suite>.h5`` for each suite (all by default).

    Deterministic from ``seed``; float64; atomic writes, one suite at a time (the file mode
    follows the umask, :mod:`refimpl.atomic`), so a kill leaves every suite file either
    complete or absent (a stale hidden temporary of a killed write is removed by the next write
    of the same file). Refuses fast-math (:func:`check_fastmath`), a folder in which no file can
    be created, and, without ``overwrite`` or ``missing_only``, existing files
    (``FileExistsError``); all raised before anything is computed. ``missing_only`` writes only
    the suites whose file does not exist yet (continuing an interrupted run). Returns the list
    of written paths.

    ``workers``/``scheduler``: where the cases are computed (:func:`refimpl.campaign.run_tasks`:
    this process by default, ``workers=None`` a pool of local processes, ``scheduler`` a Dask
    cluster; a suite registered at run time, outside :mod:`refimpl.golden`, needs this
    process). The files are written here, each as soon as its cases are in, and hold the same
    data and attributes whichever (the provenance's ``created`` time aside).
    """
    require_reference("golden generation")
    todo = plan_generate(out_dir, suites, overwrite, missing_only)
    built = _cases([n for n, _ in todo], seed, size, progress, workers, scheduler)
    with contextlib.closing(built):  # an error here stops the campaign at once
        for (n, path), (_, cases) in zip(todo, built):
            write_file(path, n, cases, overwrite=overwrite,
                       attrs={"seed": int(seed), "size": size,
                              "fastmath": bool(config.FASTMATH), "case_count": len(cases)})
    return [str(p) for _, p in todo]


def repack(path, out=None):
    """Rewrite the golden file ``path`` in the current storage layout (:mod:`refimpl.h5io`)
    without recomputing anything: every case, dataset and attribute is written back as read,
    the root's provenance included (it says what computed the values, which do not change; a
    provenance attribute the file lacks is added, as :func:`refimpl.h5io.atomic_h5` writes it).

    Regenerating instead would move values by rounding wherever another machine wrote the file
    (``DRIFT``). Writes ``out`` (default: ``path`` itself), atomically, replacing it; returns
    its path.
    """
    gf = read_golden(path)
    attrs = {k: v for k, v in gf.attrs.items() if k not in ("schema", "schema_version", "suite")}
    out = path if out is None else out
    write_file(out, gf.suite, list(gf.cases.values()), overwrite=True, attrs=attrs)
    return str(out)
