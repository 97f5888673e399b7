"""The conform engine: examples drawn by hypothesis, judged as golden cases, failures shrunk.

One campaign is a list of independent **tasks**: ``(op, shard)`` pairs, each a hypothesis run
of at most ``SHARD`` examples seeded by ``(seed, op, shard)`` only. A task builds each example's
golden case (:func:`judge`: :func:`refimpl.golden.generate.regenerate`, the reference and its
bounds), computes the backend's candidate in each of its forms (:func:`candidate`: whole,
chunked, step by step) and judges it with the golden verifier
(:func:`refimpl.golden.verify.compare_case`) at the precision profile. The first failing example
of a task is shrunk by hypothesis; the task returns its counts and its minimal case. Tasks run
in this process, on a pool of local processes or on a Dask cluster (:mod:`refimpl.campaign`);
the merged report (:func:`merge`) depends on the seed and the number of examples only.
"""
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import shlex
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

from ..golden.generate import regenerate
from ..golden.registry import judging_suite, read_state
from ..golden.schema import (CANDIDATE_SCHEMA, FAILURES, NO_GRADS, SCHEMA, Case,
                             read_candidate, read_file, write_file)
from ..golden.verify import compare_case
from ..golden.profiles import get_profile
from ..ops import all_ops, config_fields, get_op
from .strategies import GENERATORS, Limits, draw_spec, sizes

#: Examples per task: the unit of work of a campaign (a task's hypothesis run). Fixed, so that
#: the tasks, and with them the report, do not depend on the number of workers.
SHARD = 10

#: The forms of a backend's op that conform checks against the reference.
FORMS = ("whole", "chunked", "step")


class AdapterError(ValueError):
    """An adapter that cannot be loaded or does not follow the protocol (one line)."""


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------

def load_adapter(spec):
    """The adapter object named by ``spec``: ``path/to/file.py``, ``package.module``, either
    with ``:NAME`` for an attribute; an object is returned as is."""
    if not isinstance(spec, str):
        return spec
    target, _, attr = spec.partition(":")
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise AdapterError(f"adapter {spec!r}: no such file {target}")
        path = path.resolve()
        name = f"refimpl_adapter_{zlib.crc32(str(path).encode()):08x}"
        module = sys.modules.get(name)
        if module is None:
            if str(path.parent) not in sys.path:  # the adapter may import its neighbours
                sys.path.insert(0, str(path.parent))
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            try:
                loader.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise AdapterError(f"adapter {spec!r}: importing {target} failed: "
                                   f"{type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise AdapterError(f"adapter {spec!r}: cannot import {target!r} ({e}); pass a "
                               f"file path (path/to/adapter.py) or an importable module") from e
    if not attr:
        return module
    if not hasattr(module, attr):
        raise AdapterError(f"adapter {spec!r}: {target} has no attribute {attr!r}")
    return getattr(module, attr)


def adapter_name(adapter, spec=None):
    """A short name for reports: ``NAME`` of the adapter, else the spec, else its type."""
    name = getattr(adapter, "NAME", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(spec, str):
        return spec
    return getattr(adapter, "__name__", type(adapter).__name__)


def _takes_state(fn):
    try:
        return "state" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class Provided:
    """What an adapter provides for one op: its functions and the forms conform checks."""
    op: str
    fwd: object
    vjp: object = None
    step: object = None
    stateful: bool = False  # the forward takes a state (stateful starts, the chunked form)

    @property
    def forms(self):
        forms = ["whole"]
        if self.stateful:
            forms.append("chunked")
        if self.step is not None:
            forms.append("step")
        return tuple(forms)


def provided(adapter, op_name):
    """The :class:`Provided` functions of ``adapter`` for op ``op_name``, or None."""
    op = get_op(op_name)
    fwd = getattr(adapter, op_name, None)
    if fwd is None:
        return None
    if not callable(fwd):
        raise AdapterError(f"adapter attribute {op_name!r} is not a function")
    vjp = getattr(adapter, op_name + "_vjp", None)
    step = getattr(adapter, op_name + "_step", None) if op.state is not None else None
    stateful = op.state is not None and _takes_state(fwd)
    return Provided(op_name, fwd, vjp, step, stateful)


def fixed_config(adapter, op_name, extra=None):
    """The configuration fields an adapter fixes for op ``op_name``: its ``CONFIG[op]``, then
    ``extra`` (the CLI's ``--config``) over it; checked against the op's fields."""
    fixed = dict((getattr(adapter, "CONFIG", None) or {}).get(op_name, {}))
    fixed.update(extra or {})
    op = get_op(op_name)
    names = config_fields(op.config) if op.config is not None else ()
    stray = [k for k in fixed if k not in names]
    if stray:
        raise AdapterError(f"op {op_name!r} has no configuration field(s) {stray}; its fields "
                           f"are {list(names)}")
    return fixed


class CommandAdapter:
    """A backend that is not Python: ``command`` (``{cases}`` and ``{candidate}`` replaced by
    file paths) reads a golden-format file without outputs and gradients and writes the
    candidate file (golden/SCHEMA.md, "Candidate layout")."""

    def __init__(self, command, ops):
        if "{cases}" not in command or "{candidate}" not in command:
            raise AdapterError("--command must contain {cases} and {candidate} (the file "
                               "refimpl writes and the file the backend writes)")
        if not ops:
            raise AdapterError("--command needs --op: the ops the backend implements")
        self.command, self.ops, self.NAME = command, tuple(ops), command.split()[0]

    def run(self, suite, gcase):
        """The candidate case of ``gcase`` computed by the command."""
        keep = ("inputs/", "params/", "cotangents/")
        case = dataclasses.replace(gcase, data={p: v for p, v in gcase.data.items()
                                                if p.startswith(keep)},
                                   meta={}, extra={})
        with tempfile.TemporaryDirectory(prefix="refimpl-conform-") as tmp:
            cases, cand = Path(tmp) / "cases.h5", Path(tmp) / "candidate.h5"
            write_file(cases, suite.name, [case], attrs={"conform": True})
            cmd = self.command.replace("{cases}", shlex.quote(str(cases)))
            cmd = cmd.replace("{candidate}", shlex.quote(str(cand)))
            proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
            if proc.returncode != 0 or not cand.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                raise AdapterError(f"--command exited {proc.returncode} without a candidate "
                                   f"file: {tail[0]}")
            cf = read_candidate(cand)
        return cf.cases.get(gcase.id)


# --------------------------------------------------------------------------------------------
# One example
# --------------------------------------------------------------------------------------------

#: Adapter objects passed to :func:`conform` (not picklable specs): run in this process only.
_OBJECTS = {}


def suite_for(op_name):
    """The suite an op's examples are built and judged with: the golden suite of the same name
    when there is one (its tolerance model and spike rules), else the one derived from the op
    (:func:`refimpl.golden.registry.judging_suite`, which ``refimpl golden verify`` uses too)."""
    suite = judging_suite(op_name)
    if suite.op != op_name:
        raise ValueError(f"golden suite {op_name!r} runs op {suite.op!r}, not {op_name!r}")
    return suite


def _state_dict(op, data):
    """The case's initial state as ``{field: array}`` (complex fields recombined), or None."""
    state = read_state(op, "{}0", data)
    return None if state is None else dict(zip(state._fields, state))


def _end_state(op, out):
    """``{field: array}`` from a candidate's ``<field>_end`` entries (complex from _re/_im)."""
    state = {}
    for f in op.state._fields:
        if f + "_end" in out:
            state[f] = np.asarray(out[f + "_end"])
        elif f + "_end_re" in out:
            state[f] = np.asarray(out[f + "_end_re"]) + 1j * np.asarray(out[f + "_end_im"])
        else:
            raise AdapterError(f"op {op.name!r}: the forward with a state must return the end "
                               f"state as '{f}_end' (got {sorted(out)})")
    return state


def _end_names(op, suite):
    """``{adapter's end-state name: the suite's}``: the protocol's ``<field>_end`` (complex:
    ``<field>_end_re``/``_im``) to the golden suite's ``state_out`` pattern."""
    if op.state is None:
        return {}
    names = {}
    for f in op.state._fields:
        golden = suite.state_out.format(f)
        names[f + "_end"] = golden
        names.update({f + "_end" + part: golden + part for part in ("_re", "_im")})
    return names


def _call(fn, inputs, params, config, state, takes_state):
    out = fn(inputs, params, state=state, **config) if takes_state else fn(inputs, params,
                                                                           **config)
    if not isinstance(out, dict):
        raise AdapterError(f"{getattr(fn, '__name__', fn)} returned {type(out).__name__}, "
                           "not a dict of arrays by output name")
    return {k: np.asarray(v) for k, v in out.items()}


def _run_forms(op, prov, form, inputs, params, config, state, bounds):
    """The adapter's outputs in ``form`` (whole: one call; chunked: ``bounds``; step: one
    step at a time), with the end state of the last call."""
    if form == "whole":
        return _call(prov.fwd, inputs, params, config, state, prov.stateful)
    fn = prov.fwd if form == "chunked" else prov.step
    L = inputs[next(iter(op.time))].shape[op.time[next(iter(op.time))]]
    if form == "step":
        bounds = list(range(L + 1))
    parts, out = {}, {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk = {k: (np.take(v, np.arange(lo, hi), axis=op.time[k]) if k in op.time else v)
                 for k, v in inputs.items()}
        out = _call(fn, chunk, params, config, state, True)
        state = _end_state(op, out)
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: (np.concatenate(v, axis=op.time[k]) if k in op.time else v[-1])
            for k, v in parts.items()}


def candidate(adapter, prov, suite, gcase, form="whole", bounds=None):
    """The backend's candidate :class:`~refimpl.golden.schema.Case` for the golden case
    ``gcase`` in ``form``; an exception of the backend becomes the case's ``error``."""
    if isinstance(adapter, CommandAdapter):
        try:
            ccase = adapter.run(suite, gcase)
        except AdapterError as e:
            return Case(id=gcase.id, op=gcase.op, extra={"error": str(e)})
        return ccase
    op = get_op(gcase.op)
    inputs = {n: gcase.data["inputs/" + n] for n in op.inputs if "inputs/" + n in gcase.data}
    params = {n: gcase.data["params/" + n] for n in op.params if "params/" + n in gcase.data}
    config = ({k: gcase.config[k] for k in config_fields(op.config) if k in gcase.config}
              if op.config is not None else {})
    state = _state_dict(op, gcase.data) if op.state is not None else None
    data = {}
    try:
        out = _run_forms(op, prov, form, inputs, params, config, state, bounds)
        names = _end_names(op, suite)
        for k, v in out.items():
            if k in names:  # the suite's name of an end-state dataset (outputs/x_re: s4d_layer)
                if "outputs/" + names[k] not in gcase.data:
                    continue  # an end state the case does not hold (a zero-state start)
                k = names[k]
            data["outputs/" + k] = v
        if any(p.startswith("cotangents/") for p in gcase.data):
            cot = gcase.group("cotangents")
            grads = (prov.vjp(inputs, params, cot, state=state, **config)
                     if _takes_state(prov.vjp) else prov.vjp(inputs, params, cot, **config))
            if not isinstance(grads, dict):
                raise AdapterError(f"{op.name}_vjp returned {type(grads).__name__}, not a dict "
                                   "of gradients by input or parameter name")
            data.update({"grads/" + k: np.asarray(v) for k, v in grads.items()})
    except AdapterError:
        raise
    except Exception as e:  # the backend rejected the case: its message
        msg = " ".join(str(e).split()) or type(e).__name__
        return Case(id=gcase.id, op=gcase.op, extra={"error": f"{type(e).__name__}: {msg}"})
    return Case(id=gcase.id, op=gcase.op, data=data)


def build(suite, spec, seed, prov):
    """The golden case of ``spec`` (refimpl's reference and bounds), as ``refimpl golden
    generate`` builds one. Forward only (flag ``no_grads``) where the backend has no VJP or the
    op's VJP from a nonzero state is not implemented."""
    op = get_op(suite.op)
    spec = dataclasses.replace(spec, flags=list(spec.flags), config=dict(spec.config))
    stateful_start = op.state is not None and any(
        k.startswith(tuple(f + "0" for f in op.state._fields)) for k in spec.inputs)
    forward_only = prov.vjp is None or (stateful_start and not op.vjp_from_state)
    if forward_only and spec.result != "invalid" and NO_GRADS not in spec.flags:
        spec.flags.append(NO_GRADS)
    return regenerate(suite, "0000", spec, seed).case


def form_case(gcase, form, bounds=None):
    """The case of ``gcase`` for a backend's chunked or step form: forward only (flag
    ``no_grads``: a form run chunk by chunk has no VJP), with the attributes ``form`` and
    ``chunks`` (the boundaries) that :func:`replay` reads."""
    if form == "whole":
        return gcase
    drop = ("grads/", "cotangents/")
    config = {**gcase.config, "form": form}
    if form == "chunked":
        config["chunks"] = np.asarray(bounds, dtype=np.int64)
    flags = list(gcase.flags) + ([NO_GRADS] if NO_GRADS not in gcase.flags else [])
    return dataclasses.replace(
        gcase, flags=flags, config=config,
        data={p: v for p, v in gcase.data.items() if not p.startswith(drop)},
        meta={p: m for p, m in gcase.meta.items() if not p.startswith(drop)})


def _skip_for(form, op):
    """Datasets a form cannot reproduce: outputs without a time axis (PMBC's iteration count
    is per call) when the sequence is cut into chunks."""
    if form == "whole":
        return ()
    return tuple("outputs/" + k for k in op.outputs if k not in op.time)


def judge(adapter, prov, suite, gcase, precision, form="whole", bounds=None):
    """``(failed, failing rows, case)`` of the backend on one built case in one form."""
    op = get_op(suite.op)
    case = form_case(gcase, form, bounds)
    ccase = candidate(adapter, prov, suite, case, form, bounds)
    rows = compare_case(suite.name, case, ccase, _skip_for(form, op), precision)
    return any(r["status"] in FAILURES for r in rows), rows, case


# --------------------------------------------------------------------------------------------
# One task: a hypothesis run over SHARD examples of one op
# --------------------------------------------------------------------------------------------

class _Failed(Exception):
    """Raised inside the hypothesis test when an example fails (hypothesis shrinks it)."""


def task_seed(seed, op_name, shard):
    """The hypothesis seed of a task: from ``(seed, op, shard)`` only."""
    return zlib.crc32(f"{int(seed)}:{op_name}:{int(shard)}".encode())


def _draw_bounds(draw, L):
    """Chunk boundaries ``0 = b0 < b1 < ... = L`` (hypothesis; shrinks to one cut)."""
    import hypothesis.strategies as st
    if L < 2:
        return [0, L]
    cuts = draw(st.lists(st.integers(1, L - 1), min_size=1, max_size=min(4, L - 1),
                         unique=True))
    return [0] + sorted(cuts) + [L]


def _has_end_state(op, spec):
    """Whether refimpl's op ends this example in a state (the chunked and step forms need
    one; a bidirectional S4D layer has none)."""
    cfg = op.config(**{k: v for k, v in spec.config.items()
                       if k in config_fields(op.config)}) if op.config is not None else None
    inputs = {k: v for k, v in spec.inputs.items() if k in op.inputs}
    try:
        return op.fwd(inputs, dict(spec.params), cfg, None).state is not None
    except (ValueError, TypeError):
        return False


def _seq_length(op, spec):
    name = next(iter(op.time))
    if name in spec.inputs:
        return int(np.shape(spec.inputs[name])[op.time[name]])
    return 0


def run_task(task):
    """Run one task (a dict, picklable: ``adapter`` spec or ``command``, ``op``, ``shard``,
    ``examples``, ``seed``, ``precision``, ``limits``, ``fixed``, ``invalid``); returns a dict:
    ``op``, ``shard``, ``examples`` (judged before the first failure, that one included),
    ``shrinks`` (examples judged while shrinking), ``discarded`` (examples refimpl could not
    build, with the reason: a gap of the strategies, reported), ``failed``, ``case`` (the
    minimal failing golden case or None), ``rows`` (its verifier rows), ``form``, ``forms``,
    ``gradients``."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, reject, seed as hseed, settings
    from hypothesis.errors import Unsatisfiable
    from hypothesis import strategies as st

    if task.get("command"):
        adapter = CommandAdapter(task["command"], [task["op"]])
        prov = Provided(task["op"], fwd=None, vjp="command")  # the command writes gradients
    else:
        adapter = _OBJECTS.get(task["adapter"]) or load_adapter(task["adapter"])
        prov = provided(adapter, task["op"])
    op = get_op(task["op"])
    suite = suite_for(op.name)
    limits, fixed = task["limits"], task["fixed"]
    state = {"examples": 0, "shrinks": 0, "fail": None, "discarded": []}

    @settings(database=None, max_examples=task["examples"], deadline=None,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink),
              report_multiple_bugs=False, verbosity=Verbosity.quiet, print_blob=False)
    @hseed(task_seed(task["seed"], op.name, task["shard"]))
    @given(st.data())
    def prop(data):
        spec = draw_spec(op.name, data.draw, limits, fixed, task["invalid"],
                         state=prov.stateful or bool(task.get("command")))
        forms = prov.forms if spec.result != "invalid" else ("whole",)
        if len(forms) > 1 and not _has_end_state(op, spec):
            forms = ("whole",)  # e.g. a bidirectional S4D layer: no state to carry
        counted = state["fail"] is None
        if counted:
            state["examples"] += 1
        else:
            state["shrinks"] += 1
        try:
            gcase = build(suite, spec, task["seed"], prov)
        except (RuntimeError, ValueError, TypeError, IndexError, FloatingPointError) as e:
            # refimpl itself accepted an example drawn as invalid, or rejected a valid one: a
            # gap in the strategies, not the backend's failure; counted, never hidden
            state["discarded"].append(f"{spec.comment}: {' '.join(str(e).split())}"[:300])
            reject()
        for form in forms:
            bounds = None
            if form == "chunked":
                bounds = _draw_bounds(data.draw, _seq_length(op, spec))
            elif form == "step" and _seq_length(op, spec) < 1:
                continue
            failed, rows, case = judge(adapter, prov, suite, gcase, task["precision"], form,
                                       bounds)
            if failed:
                state["fail"] = (case, [r for r in rows if r["status"] in FAILURES], form)
                raise _Failed(form)

    try:
        prop()
    except (_Failed, Unsatisfiable):
        pass
    gcase, rows, form = state["fail"] or (None, [], None)
    return {"op": op.name, "shard": task["shard"], "examples": state["examples"],
            "shrinks": state["shrinks"], "failed": gcase is not None, "case": gcase,
            "rows": rows, "form": form, "forms": list(prov.forms),
            "gradients": prov.vjp is not None, "discarded": state["discarded"]}


# --------------------------------------------------------------------------------------------
# A campaign
# --------------------------------------------------------------------------------------------

def plan(adapter, ops=None, examples=20, seed=0, precision="float64", limits=None,
         fixed=None, invalid=True, command=None):
    """The tasks of a campaign (after every check: adapter, ops, configuration, limits,
    precision), ``(tasks, adapter object, {op: reason}` of requested ops it lacks)``."""
    get_profile(precision)
    limits = Limits() if limits is None else limits
    limits.check()
    if examples < 1:
        raise ValueError(f"--examples must be >= 1, got {examples}")
    registered = all_ops()
    for name in ops or ():
        get_op(name)
    if command is not None:
        obj = CommandAdapter(command, ops)
        names = list(ops)
    else:
        obj = load_adapter(adapter)
        names = [n for n in (ops or registered) if provided(obj, n) is not None]
    no_strategy = [n for n in names if n not in GENERATORS]
    if ops and no_strategy:
        raise AdapterError(f"conform has no strategy for op(s) {no_strategy} (an op registered "
                           f"outside refimpl.conform.strategies.GENERATORS)")
    names = [n for n in names if n in GENERATORS]
    missing = {n: "not provided by the adapter" for n in (ops or ()) if n not in names}
    if not names:
        raise AdapterError(f"adapter {adapter_name(obj, adapter)!r} provides none of the ops "
                           f"{list(ops or registered)} (a function named as the op; "
                           f"`refimpl conform --list-ops`)")
    tasks = []
    for name in names:
        fx = fixed_config(obj, name, (fixed or {}).get(name) if fixed else None)
        for shard in range(math.ceil(examples / SHARD)):
            n = min(SHARD, examples - shard * SHARD)
            tasks.append({"adapter": adapter if isinstance(adapter, str) else None,
                          "command": command, "op": name, "shard": shard, "examples": n,
                          "seed": int(seed), "precision": precision, "limits": limits,
                          "fixed": fx, "invalid": bool(invalid)})
    return tasks, obj, missing


def _case_size(case):
    return sum(int(np.size(v)) for p, v in case.data.items() if p.startswith(("inputs/",
                                                                               "params/")))


def merge(results, missing=None):
    """The report's ``ops`` table from the task results (in task order): per op the examples
    judged, the failures (tasks that found one), the shrink steps and the minimal case (the
    smallest over the tasks, the first on ties)."""
    table = {}
    for r in results:
        t = table.setdefault(r["op"], {"examples": 0, "failures": 0, "shrinks": 0,
                                       "forms": r["forms"], "gradients": r["gradients"],
                                       "minimal": None, "_case": None, "discarded": []})
        t["examples"] += r["examples"]
        t["discarded"] += r["discarded"]
        t["shrinks"] += r["shrinks"]
        if r["failed"]:
            t["failures"] += 1
            size = _case_size(r["case"])
            if t["_case"] is None or size < t["_size"]:
                t.update(_case=r["case"], _size=size, _rows=r["rows"], _form=r["form"])
    for name, reason in (missing or {}).items():
        table[name] = {"examples": 0, "failures": 0, "shrinks": 0, "forms": [],
                       "gradients": False, "minimal": None, "skipped": reason}
    return table


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _stale(path):
    """Whether ``path`` is a case file an earlier conform run wrote (root ``conform_adapter``)."""
    try:
        return "conform_adapter" in read_file(path, (SCHEMA,)).attrs
    except (OSError, ValueError):
        return False


def write_minimal(table, out, attrs):
    """Write each op's minimal case as ``<out>/<op>.h5`` (a one-case golden file, suite =
    the op) and fill the report's ``minimal`` entries. The case file of an op that passes now,
    left by an earlier run, is removed (a folder of failures holds this run's only); a file
    conform did not write is never touched."""
    for name, t in table.items():
        case = t.pop("_case", None)
        t.pop("_size", None)
        suite = suite_for(name)
        path = Path(out) / f"{suite.name}.h5"
        if case is None:
            if "skipped" not in t and path.is_file() and _stale(path):
                path.unlink()
                t["removed"] = str(path)
            continue
        Path(out).mkdir(parents=True, exist_ok=True)
        write_file(path, suite.name, [case], overwrite=True, attrs=attrs)
        op = get_op(name)
        t["minimal"] = {
            "path": str(path), "case": case.id, "form": t.pop("_form"),
            "sizes": sizes(name, _spec_like(case, op)), "elements": _case_size(case),
            "comment": case.comment, "flags": list(case.flags), "result": case.result,
            "rows": [{k: _jsonable(v) for k, v in r.items()} for r in t.pop("_rows")]}
    return table


def _spec_like(case, op):
    """A :class:`~refimpl.golden.registry.Spec` view of a built case (for :func:`sizes`)."""
    from ..golden.registry import Spec
    return Spec(comment=case.comment, flags=case.flags, config=case.config,
                inputs=case.group("inputs"), params=case.group("params"), result=case.result)


def conform(adapter, ops=None, precision="float64", examples=20, seed=0, limits=None,
            out="conform-failures", workers=1, scheduler=None, fixed=None, invalid=True,
            command=None, progress=None):
    """Run a campaign; returns the report ``{passed, adapter, precision, seed, examples,
    limits, ops: {op: {examples, failures, shrinks, forms, gradients, minimal}}}``.

    ``adapter``: an adapter spec (module, file, ``:NAME``) or object (objects run in this
    process only); ``command``: a file-exchange backend instead (``--command``). ``fixed``:
    ``{op: {config field: value}}`` over the adapter's ``CONFIG``. ``workers`` (1: in this
    process; None: a pool of one process per core) and ``scheduler`` (a Dask scheduler's
    address): :func:`refimpl.campaign.run_tasks`; the report does not depend on them. The minimal
    failing case of each op is written to ``<out>/<op>.h5``; nothing is written without a
    failure. ``progress(n)`` per finished task."""
    tasks, obj, missing = plan(adapter, ops, examples, seed, precision, limits, fixed, invalid,
                               command)
    local = workers == 1 and scheduler is None
    if command is None and not isinstance(adapter, str):
        if scheduler is not None or (workers or 1) > 1:
            raise AdapterError("an adapter object runs in this process only (workers=1); "
                               "name it by file or module to run it on a pool or a cluster")
        local = True
        key = f"<object {id(obj):x}>"
        _OBJECTS[key] = obj
        for t in tasks:
            t["adapter"] = key
    try:
        if local:
            results = []
            for t in tasks:
                results.append(run_task(t))
                if progress:
                    progress(1)
        else:
            from ..campaign import run_tasks
            results = run_tasks(run_task, tasks, workers=workers, scheduler=scheduler,
                                progress=progress, label="conform")  # in task order
    finally:
        _OBJECTS.pop(tasks[0]["adapter"], None)
    table = merge(results, missing)
    limits = tasks[0]["limits"]
    attrs = {"conform_adapter": adapter_name(obj, adapter), "conform_seed": int(seed),
             "conform_precision": precision}
    write_minimal(table, out, attrs)
    return {"passed": not any(t["failures"] for t in table.values()),
            "adapter": adapter_name(obj, adapter), "precision": precision, "seed": int(seed),
            "examples": int(examples), "limits": dataclasses.asdict(limits), "ops": table}


# --------------------------------------------------------------------------------------------
# Replay: a backend's candidate for a written case file
# --------------------------------------------------------------------------------------------

def replay(adapter, case_file, out, command=None):
    """Run ``adapter`` on every case of the golden-format ``case_file`` (conform's minimal
    cases, or any golden file of a registered op) in the form each case names (its ``form``
    and ``chunks`` attributes; whole by default) and write the candidate file ``out``; returns
    its path. ``refimpl golden verify OUT --golden DIR`` then judges it."""
    gf = read_file(case_file, (SCHEMA,))  # a golden file, or --command's cases (no outputs)
    obj = CommandAdapter(command, [c.op for c in gf.cases.values()]) if command else \
        load_adapter(adapter)
    cases = []
    for cid, gcase in gf.cases.items():
        suite = suite_for(gcase.op)
        prov = None
        if not isinstance(obj, CommandAdapter):
            prov = provided(obj, gcase.op)
            if prov is None:
                raise AdapterError(f"{case_file} case {cid}: the adapter does not provide op "
                                   f"{gcase.op!r}")
        form = gcase.config.get("form", "whole")
        bounds = [int(b) for b in np.asarray(gcase.config.get("chunks", ()))] or None
        cases.append(candidate(obj, prov, suite, gcase, form, bounds))
    write_file(out, gf.suite, cases, overwrite=True, schema=CANDIDATE_SCHEMA,
               attrs={"backend": adapter_name(obj, adapter)})
    return str(out)
