"""The golden file format (``golden/SCHEMA.md``): constants, :class:`Case`, reading and writing.

A golden file holds ``/cases/<id>`` groups with scalar attributes (op, comment, flags, result,
configuration) and the datasets ``inputs/``, ``params/``, ``outputs/``, ``cotangents/``,
``grads/`` (nested paths allowed, e.g. ``outputs/params/encoder.W``). A candidate file has the
same layout with only outputs and grads. Writes are atomic (:func:`refimpl.h5io.atomic_h5`);
every read error is a one-line :class:`refimpl.h5io.FileFormatError`.
"""
import dataclasses
import importlib.resources
from pathlib import Path

import h5py
import numpy as np

from ..h5io import FileFormatError, atomic_h5, open_h5, write_tree

SCHEMA = "refimpl-golden"
CANDIDATE_SCHEMA = "refimpl-golden-candidate"
SCHEMA_VERSION = 1

#: The committed set: package data ``refimpl.golden.data`` (the top-level ``golden/`` folder).
DEFAULT_DIR = Path(str(importlib.resources.files("refimpl.golden.data") / f"v{SCHEMA_VERSION}"))

RESULTS = ("valid", "acceptable", "invalid")
GROUPS = ("inputs", "params", "outputs", "cotangents", "grads")
#: Case attributes that are not op configuration.
RESERVED_ATTRS = ("op", "comment", "flags", "result", "margin", "error")
SIZES = ("small", "large")

#: Named flags and what they mark (SCHEMA.md repeats this table).
FLAGS = {
    "default": "the op's default configuration",
    "at_threshold": "a membrane equals theta exactly (dyadic inputs: exact in any float64 "
                    "arithmetic)",
    "near_threshold": "a membrane is within rounding of a threshold: ge/gt or rounding may differ",
    "all_zero": "all-zero input",
    "spike_at_t0": "a spike at t = 0",
    "long_sequence": "a long sequence",
    "short_sequence": "L shorter than the op's window, or L = 1",
    "non_power_of_two": "L whose FFT length is not a power of two",
    "extreme_dt": "dt far outside the default range (cancellation in exp(dt A) - 1, fast "
                  "oscillation)",
    "saturation": "saturated nonlinearities or surrogates (tiny gradients), or spikes at every "
                  "step",
    "ternary_threshold": "a value exactly at the GSU ternarisation threshold 0.15 max|v|",
    "invalid_config": "a configuration value out of range: the backend must reject it",
    "nan_input": "a NaN in an input or parameter: the backend must reject it",
    "bad_shape": "inconsistent shapes: the backend must reject them",
    "bn_folding": "SDN weights folded from a training network with BatchNorm statistics "
                  "(refimpl.sdn.fold)",
    "stateful": "the op starts from a stored initial state and returns the state it ends in "
                "(DESIGN.md 10): what a streaming kernel must reproduce",
    "no_grads": "a valid case without cotangents and grads (forward only: no backward from a "
                "state, or a streamed inference run); the only valid cases without grads",
}
#: The flag of the valid cases that hold no cotangents and grads (:func:`read_golden` refuses
#: a valid case without grads that lacks it, and one with grads that has it).
NO_GRADS = "no_grads"

#: Statuses of report rows (SCHEMA.md repeats this table); the ones in FAILURES make
#: verify/check fail. STALE and DRIFT come from ``check`` only.
STATUSES = {
    "PASS": "every output and grad within its bound",
    "REJECTED": "an invalid case that the candidate rejected",
    "ACCEPTABLE": "a difference in an acceptable case, or (precision profiles) a spike flip "
                  "within the membrane bound, or a case whose internal spikes may flip",
    "UNTESTABLE": "(precision profiles) within a bound that exceeds the tensor's own magnitude, "
                  "or spikes all within rounding of the threshold: not a test at that precision",
    "SKIP": "skipped with --skip",
    "DRIFT": "the file differs from what the generator writes now, but only within rounding",
    "MISMATCH": "outside the bound, or a differing spike",
    "BAD_VALUE": "a value no backend may write, in any case and profile: NaN or inf where the "
                 "reference is finite, a spike other than 0 or 1 (-1, 0, 1 where ternary)",
    "MISSING": "case or dataset absent from the candidate",
    "SHAPE": "dataset of another shape",
    "DTYPE": "dataset of another dtype",
    "NOT_REJECTED": "an invalid case that the candidate computed",
    "ERROR": "a valid or acceptable case that the candidate (or refimpl) rejected",
    "EXTRA": "a case id the golden file does not have, or an outputs/ or grads/ dataset its "
             "case does not have",
    "STALE": "the file differs from what the generator writes now, beyond rounding",
}
FAILURES = ("MISMATCH", "BAD_VALUE", "MISSING", "SHAPE", "DTYPE", "NOT_REJECTED", "ERROR",
            "EXTRA", "STALE")


@dataclasses.dataclass
class Case:
    """One case of a golden (or candidate) file.

    ``data`` maps dataset paths relative to the case group (``"inputs/x"``, ``"grads/rho"``,
    ``"outputs/params/encoder.W"``) to arrays; ``meta`` maps the same paths to the dataset's
    attributes (``compare``, ``rtol``, ``atol``, ``margin``, ...). ``config`` holds the op's
    scalar configuration attributes, ``extra`` the reserved ``margin`` / ``error`` attributes.
    """

    id: str
    op: str = ""
    comment: str = ""
    flags: list = dataclasses.field(default_factory=list)
    result: str = "valid"
    config: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)

    def group(self, name):
        """``{path below name: array}`` for one of :data:`GROUPS` (nested paths keep their '/')."""
        n = len(name) + 1
        return {p[n:]: v for p, v in self.data.items() if p.startswith(name + "/")}


@dataclasses.dataclass
class GoldenFile:
    """A read file: ``path``, root ``attrs`` and ``cases`` (id -> :class:`Case`, in file order)."""

    path: str
    attrs: dict
    cases: dict

    @property
    def suite(self):
        return self.attrs.get("suite", "")

    @property
    def schema(self):
        return self.attrs.get("schema", "")


def _to_python(v):
    """h5py attribute value -> plain Python (str, int, float, bool, list of str, or ndarray)."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "OSU":
            return [x.decode() if isinstance(x, bytes) else str(x) for x in v.ravel()]
        return v
    return v


def _attr_value(v):
    """Python value -> something h5py stores (lists of str as variable-length strings)."""
    if isinstance(v, (list, tuple)):
        return np.array([str(x) for x in v], dtype=h5py.string_dtype())
    return v


def nest(flat):
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree = {}
    for path, v in flat.items():
        node = tree
        *parts, leaf = path.split("/")
        for p in parts:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def flatten(tree, prefix=""):
    """Inverse of :func:`nest`."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def write_file(path, suite, cases, overwrite=False, schema=SCHEMA, attrs=None):
    """Write ``cases`` (list of :class:`Case`) of ``suite`` to ``path`` atomically.

    Root attributes: ``schema``, ``schema_version``, provenance (:func:`refimpl.h5io.provenance`),
    ``suite`` and ``attrs``. Raises ``FileExistsError`` if ``path`` exists and not ``overwrite``.
    """
    root_attrs = {"suite": suite, **(attrs or {})}
    with atomic_h5(path, schema, SCHEMA_VERSION, overwrite=overwrite, attrs=root_attrs) as f:
        root = f.create_group("cases")
        for case in cases:
            g = root.create_group(case.id)
            for k in ("op", "comment", "result"):
                g.attrs[k] = getattr(case, k)
            g.attrs["flags"] = _attr_value(list(case.flags))
            for k, v in {**case.config, **case.extra}.items():
                g.attrs[k] = _attr_value(v)
            write_tree(g, nest(case.data))
            for p, a in case.meta.items():
                for k, v in a.items():
                    g[p].attrs[k] = _attr_value(v)


def _read_case(cid, g):
    attrs = {k: _to_python(v) for k, v in g.attrs.items()}
    data, meta = {}, {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            data[name] = obj[()]
            meta[name] = {k: _to_python(v) for k, v in obj.attrs.items()}

    g.visititems(visit)
    flags = attrs.pop("flags", [])
    if isinstance(flags, str):
        flags = [flags]
    return Case(
        id=cid,
        op=str(attrs.pop("op", "")),
        comment=str(attrs.pop("comment", "")),
        flags=list(flags) if not isinstance(flags, np.ndarray) else [str(x) for x in flags],
        result=str(attrs.pop("result", "valid")),
        extra={k: attrs.pop(k) for k in ("margin", "error") if k in attrs},
        config=attrs,
        data=data,
        meta=meta,
    )


def _open(path, schemas):
    """:func:`refimpl.h5io.open_h5` accepting any of ``schemas``; one-line FileFormatError."""
    path = str(path)
    got = None
    try:
        with h5py.File(path, "r") as f:
            got = _to_python(f.attrs.get("schema"))
    except Exception:  # not readable: let open_h5 produce its one-line message
        pass
    schema = got if got in schemas else schemas[0]
    try:
        return open_h5(path, schema, versions=(SCHEMA_VERSION,))
    except FileFormatError as e:
        if got is not None and got not in schemas:
            want = " or ".join(repr(s) for s in schemas)
            raise FileFormatError(f"{path}: schema is {got!r}, expected {want} "
                                  f"(not a refimpl golden or candidate file)") from None
        raise FileFormatError(str(e).splitlines()[0]) from None


def read_file(path, schemas=(SCHEMA, CANDIDATE_SCHEMA)):
    """Read a golden or candidate file into a :class:`GoldenFile`.

    Raises :class:`refimpl.h5io.FileFormatError` with a one-line message for a missing,
    truncated, corrupted or non-HDF5 file, another schema, an unknown schema version, or a file
    without ``suite`` attribute or ``/cases`` group.
    """
    path = str(path)
    f = _open(path, tuple(schemas))
    try:
        with f:
            attrs = {k: _to_python(v) for k, v in f.attrs.items()}
            if not attrs.get("suite"):
                raise FileFormatError(f"{path}: no 'suite' attribute on the root group (say "
                                      f"which suite the cases belong to, e.g. suite='fftconv')")
            if "cases" not in f or not isinstance(f["cases"], h5py.Group):
                raise FileFormatError(f"{path}: no /cases group")
            cases = {cid: _read_case(cid, g) for cid, g in f["cases"].items()
                     if isinstance(g, h5py.Group)}
    except FileFormatError:
        raise
    except Exception as e:  # h5py raises OSError/KeyError/RuntimeError on damaged files
        msg = " ".join(str(e).split()) or type(e).__name__
        raise FileFormatError(f"{path}: corrupted HDF5 file, reading failed ({msg})") from None
    return GoldenFile(path, attrs, cases)


def read_golden(path):
    """Read a golden file (schema ``refimpl-golden``), checking that every case is well formed:
    a known ``result``, a ``compare`` attribute on every output and grad, and grads in every
    valid or acceptable case unless it is flagged ``no_grads`` (and none if it is)."""
    gf = read_file(path, (SCHEMA,))
    for cid, c in gf.cases.items():
        if c.result not in RESULTS:
            raise FileFormatError(f"{path}: case {cid} has result {c.result!r}, expected one "
                                  f"of {RESULTS}")
        if c.result != "invalid":
            has = any(p.startswith("grads/") for p in c.data)
            if has == (NO_GRADS in c.flags):
                raise FileFormatError(
                    f"{path}: case {cid} " + ("has grads/ datasets but the flag 'no_grads'"
                                              if has else "has no grads/ datasets and no flag "
                                              "'no_grads' (forward-only cases must say so)"))
        for p, m in c.meta.items():
            if p.startswith(("outputs/", "grads/")) and m.get("compare") not in ("exact",
                                                                                 "allclose"):
                raise FileFormatError(f"{path}: case {cid} dataset {p} has no valid 'compare' "
                                      f"attribute")
    return gf


def read_candidate(path):
    """Read a candidate file (schema ``refimpl-golden-candidate``, or a golden file itself)."""
    return read_file(path, (CANDIDATE_SCHEMA, SCHEMA))
