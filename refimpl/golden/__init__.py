"""Golden traces: the contract between refimpl and every other backend (DESIGN.md section 9).

A golden file ``golden/v1/<suite>.h5`` holds chosen cases of one op family: inputs, parameters,
outputs, a fixed random cotangent for each differentiable output, and the VJP for every input and
parameter. A backend under test reads each case, computes outputs and grads, writes a *candidate*
file with the same ``/cases/<id>/outputs`` and ``/cases/<id>/grads`` layout, and
:func:`verify` compares the two case by case. ``golden/SCHEMA.md`` is the human contract.

This module holds:

- the case definitions of every suite (:data:`SUITES`): chosen cases covering every option of
  the op plus named edge cases, each from its own seeded random stream;
- the generator (:func:`build_suite`, :func:`generate`): runs refimpl, derives the per-dataset
  tolerances, writes atomically with provenance, refuses fast-math;
- the reader (:func:`read_file`, :func:`read_golden`, :func:`read_candidate`) and writer
  (:func:`write_file`);
- :func:`verify` (candidate vs golden), :func:`check` (refimpl vs its own committed files),
  :func:`show`, and :func:`format_report` for the table.

The library never prints: the CLI (``cli/golden.py``) prints what these functions return.

Tolerance policy (also in ``golden/SCHEMA.md``)
------------------------------------------------
Spikes (and integer outputs such as PMBC iteration counts) compare **exactly**. Every other
float dataset compares as ``|candidate - golden| <= atol + rtol |golden|`` with
``rtol = SAFETY eps`` and::

    atol = SAFETY (depth eps scale + spread)

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
- Neuron membranes (``neuron``, ``pmbc``) also get at least :func:`refimpl.pmbc.rounding_bound`,
  the documented bound for any evaluation order with chunks of up to 64 steps.

``SAFETY = 16`` covers random-sign versus worst-case accumulation. A case whose margin to a
threshold (``min |h - theta|``; for the GSU the ternarisation threshold) is within the membrane's
bound, or whose spikes flipped under the perturbation, is marked ``acceptable`` with the flag
``near_threshold``: a backend may legitimately differ there, and :func:`verify` reports such a
difference as ``ACCEPTABLE`` rather than a failure.
"""
import dataclasses
import fnmatch
import importlib.resources
import math
import os
import zlib
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from .. import config
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

EPS = float(np.finfo(np.float64).eps)
SAFETY = 16.0
PERTURB = 2.0 * EPS
N_PERTURB = 3

#: Named flags and what they mark (SCHEMA.md repeats this table).
FLAGS = {
    "default": "the op's default configuration",
    "at_threshold": "a membrane equals theta exactly (dyadic inputs: exact in any float64 arithmetic)",
    "near_threshold": "a membrane is within rounding of a threshold: ge/gt or rounding may differ",
    "all_zero": "all-zero input",
    "spike_at_t0": "a spike at t = 0",
    "long_sequence": "a long sequence",
    "short_sequence": "L shorter than the op's window, or L = 1",
    "non_power_of_two": "L whose FFT length is not a power of two",
    "extreme_dt": "dt far outside the default range (cancellation in exp(dt A) - 1, fast oscillation)",
    "saturation": "saturated nonlinearities or surrogates (tiny gradients), or spikes at every step",
    "ternary_threshold": "a value exactly at the GSU ternarisation threshold 0.15 max|v|",
    "invalid_config": "a configuration value out of range: the backend must reject it",
    "nan_input": "a NaN in an input or parameter: the backend must reject it",
    "bad_shape": "inconsistent shapes: the backend must reject them",
}

#: Statuses of report rows; the ones in FAILURES make verify/check fail.
FAILURES = ("MISMATCH", "MISSING", "SHAPE", "DTYPE", "NOT_REJECTED", "ERROR", "EXTRA", "STALE")


# ============================================================================================
# Cases and files
# ============================================================================================


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


def _nest(flat):
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree = {}
    for path, v in flat.items():
        node = tree
        *parts, leaf = path.split("/")
        for p in parts:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _flatten(tree, prefix=""):
    """Inverse of :func:`_nest`."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, path))
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
            write_tree(g, _nest(case.data))
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
                raise FileFormatError(f"{path}: no 'suite' attribute on the root group "
                                      f"(say which suite the cases belong to, e.g. suite='fftconv')")
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
    """Read a golden file (schema ``refimpl-golden``), checking that every case is well formed."""
    gf = read_file(path, (SCHEMA,))
    for cid, c in gf.cases.items():
        if c.result not in RESULTS:
            raise FileFormatError(f"{path}: case {cid} has result {c.result!r}, expected one of {RESULTS}")
        for p, m in c.meta.items():
            if p.startswith(("outputs/", "grads/")) and m.get("compare") not in ("exact", "allclose"):
                raise FileFormatError(f"{path}: case {cid} dataset {p} has no valid 'compare' attribute")
    return gf


def read_candidate(path):
    """Read a candidate file (schema ``refimpl-golden-candidate``, or a golden file itself)."""
    return read_file(path, (CANDIDATE_SCHEMA, SCHEMA))


# ============================================================================================
# Suites: case specifications and how refimpl computes them
# ============================================================================================


@dataclasses.dataclass
class Spec:
    """A case before refimpl ran it. ``exact`` marks dyadic inputs that every float64
    arithmetic computes exactly: no perturbation, and a zero margin stays ``valid``."""

    comment: str
    flags: list
    config: dict
    inputs: dict
    params: dict
    result: str = "valid"
    exact: bool = False
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Suite:
    """One op family.

    ``specs(rngs, size)`` lists the cases (``rngs()`` returns the next case's generator);
    ``fwd(case) -> (outputs, state, diag)``; ``bwd(case, state, cotangents) -> grads``;
    ``depth(case) -> {path or group/* or *: depth}``; ``scales(case, outputs, grads, cot) ->
    {path: scale}``; ``floors(case) -> {path: minimal atol}``. ``diag`` may hold ``spikes``
    (name -> array, for flip detection) and ``membranes`` (name -> (array, threshold)).
    ``spikes`` names the outputs compared exactly; ``cotangents(outputs, rng)`` replaces the
    default N(0, 1) cotangents; ``meta(case) -> {path: attrs}`` adds dataset attributes.
    """

    name: str
    op: str
    specs: Callable
    fwd: Callable
    bwd: Callable
    differentiable: tuple
    depth: Callable
    scales: Optional[Callable] = None
    floors: Optional[Callable] = None
    spikes: tuple = ()
    cotangents: Optional[Callable] = None
    meta: Optional[Callable] = None
    math: str = ""


def _maxabs(a):
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a))) if a.size else 0.0


def _lookup(table, path):
    if path in table:
        return table[path]
    group = path.split("/")[0] + "/*"
    return table.get(group, table.get("*", 1))


def _rngs(seed, suite):
    """Factory of per-case generators: case ``i`` draws from ``[seed, crc32(suite), i]`` only."""
    key = zlib.crc32(suite.encode())
    state = {"i": 0}

    def next_rng():
        rng = np.random.default_rng([seed, key, state["i"]])
        state["i"] += 1
        return rng

    return next_rng


# ---- S4D kernel ------------------------------------------------------------------------------

KERNEL_NAMES = ("log_dt", "log_A_real", "A_imag", "C_re", "C_im")


def _ssm_params(rng, H, N, init="lin", dt=None, bidirectional=False, trainable_B=False, D=True):
    from ..ssm import s4d_init

    lo, hi = (1e-3, 1e-1) if dt is None else (dt, dt)
    p = s4d_init(H, N, init=init, seed=rng, dt_min=lo, dt_max=hi, trainable_B=trainable_B,
                 bidirectional=bidirectional)
    if trainable_B:  # move B away from 1 so its gradient is exercised in general position
        p["B_re"] = p["B_re"] + 0.3 * rng.normal(size=p["B_re"].shape)
        p["B_im"] = 0.3 * rng.normal(size=p["B_im"].shape)
    if not D:
        del p["D"]
    return p


def _ssm_config(disc, init, L, H, N, trainable_B=False, bidirectional=False):
    return dict(disc=disc, init=init, L=int(L), trainable_B=bool(trainable_B),
                bidirectional=bool(bidirectional), H=int(H), N=int(N))


def _kernel_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), disc="zoh", init="lin", H=2, N=8, L=32, dt=None, bi=False, tb=False,
            result="valid", edit=None):
        rng = rngs()
        p = _ssm_params(rng, H, N, init, dt, bi, tb, D=False)
        cfg = _ssm_config(disc, init, L, H, N, tb, bi)
        if edit:
            edit(p, cfg)
        out.append(Spec(comment, list(flags), cfg, {}, p, result))

    for init in ("lin", "inv", "real"):
        for disc in ("zoh", "bilinear"):
            add(f"init {init}, disc {disc}", ["default"] if (init, disc) == ("lin", "zoh") else [],
                disc, init, L=32 * big)
    add("trainable B (B_re, B_im moved off 1), zoh", disc="zoh", tb=True, L=32 * big)
    add("trainable B, bilinear, S4D-Inv", disc="bilinear", init="inv", tb=True, L=32 * big)
    add("bidirectional: C (2, H, N2), K (2, H, L); both directions share A, dt", bi=True, L=32 * big)
    add("bidirectional, bilinear, S4D-Real, trainable B", disc="bilinear", init="real", bi=True,
        tb=True, L=32 * big)
    add("dt = 1e-6 (zoh): exp(dt A) - 1 cancels unless computed as expm1", ["extreme_dt"], dt=1e-6)
    add("dt = 1e-6 (bilinear)", ["extreme_dt"], disc="bilinear", init="inv", dt=1e-6)
    add("dt = 5 with S4D-Inv: |dt A_imag| up to ~90 rad, fast oscillation and decay",
        ["extreme_dt"], init="inv", dt=5.0)
    add("dt = 5, bilinear, S4D-Real: dA near -1 for large |dt A|", ["extreme_dt"],
        disc="bilinear", init="real", dt=5.0)
    add("long kernel: running powers dA^l over 4096 steps", ["long_sequence"], H=1, N=4,
        L=4096 * big, dt=1e-3)
    add("L = 1: K[h, 0] = 2 Re sum_n C dB", ["short_sequence"], L=1)
    add("one complex mode (N = 2), odd L", N=2, L=7)

    def nan(p, cfg):
        p["log_dt"][1] = np.nan

    add("NaN in log_dt: must be rejected", ["nan_input"], result="invalid", edit=nan)

    def l0(p, cfg):
        cfg["L"] = 0

    add("L = 0: must be rejected", ["invalid_config"], result="invalid", edit=l0)
    return out


def _kernel_B(case):
    return {k: case.data["params/" + k] for k in ("B_re", "B_im") if "params/" + k in case.data}


def _kernel_fwd(case):
    from ..ssm import s4d_kernel

    p = case.group("params")
    K = s4d_kernel(*[p[k] for k in KERNEL_NAMES], case.config["L"], disc=case.config["disc"],
                   **_kernel_B(case))
    return {"K": K}, None, {}


def _kernel_bwd(case, state, cot):
    from ..ssm import s4d_kernel_bwd

    p = case.group("params")
    B = _kernel_B(case)
    g = s4d_kernel_bwd(*[p[k] for k in KERNEL_NAMES], cot["K"], disc=case.config["disc"], **B)
    return dict(zip(KERNEL_NAMES + tuple(B), g))


def _kernel_depth(case):
    return {"*": case.config["L"] + case.group("params")["log_A_real"].shape[1]}


def _kernel_abs_scales(p, disc, L, dK_abs, tight):
    """Magnitudes of the terms of the kernel and its backward (per output / grad name).

    Every quantity of :func:`refimpl.ssm.s4d_kernel_bwd` is propagated with absolute values
    (``Q0 -> sum_l |dK_l| |dA|^l``, ``Q1 -> sum_l l |dK_l| |dA|^(l-1)``, products of moduli), so
    cancellation cannot shrink the bound below the rounding of the terms. Unless ``tight``, the
    ZOH terms also carry the magnitudes of DESIGN.md's formula as written,
    ``dB = (exp(dt A) - 1) / A B`` (``(|exp(dt A)| + 1) / |A|``): an implementation that
    subtracts instead of using ``expm1`` loses ``eps / |dt A|`` relative and is accepted at
    ordinary ``dt``; the ``extreme_dt`` cases are ``tight`` and catch it.
    """
    from ..ssm import DISCRETIZATIONS

    dt = np.exp(p["log_dt"])[:, None]  # (H, 1)
    A = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]  # (H, N2)
    B = p["B_re"] + 1j * p["B_im"] if "B_re" in p else np.ones_like(A)
    dA, dB, part = DISCRETIZATIONS[disc](dt, A, B, partials=True)
    a = {k: np.abs(v) for k, v in part.items()}
    mdB = np.abs(dB)
    if disc == "zoh" and not tight:
        E, aA, aB = np.abs(dA), np.abs(A), np.abs(B)
        mdB = np.maximum(mdB, (E + 1.0) / aA * aB)
        a["dB_dA"] = np.maximum(a["dB_dA"], (dt * E / aA + (E + 1.0) / aA**2) * aB)
        a["dB_dB"] = np.maximum(a["dB_dB"], (E + 1.0) / aA)
    C = np.abs(p["C_re"] + 1j * p["C_im"])  # (H, N2) or (2, H, N2)
    z = np.broadcast_to(np.abs(dA), C.shape)
    mW = C * mdB
    out = {"outputs/K": 2.0 * float(mW.sum(-1).max())}
    if dK_abs is None:
        return out
    dK = np.abs(dK_abs).reshape(C.shape[:-1] + (1, -1))  # (..., H, 1, L)
    l = np.arange(dK.shape[-1])
    zl = z[..., None] ** l  # (..., H, N2, L)
    P0 = (dK * zl).sum(-1)  # (..., H, N2)
    P1 = (dK * l * np.concatenate([np.zeros_like(zl[..., :1]), zl[..., :-1]], -1)).sum(-1)
    g_W = 2.0 * P0
    g_z = 2.0 * mW * P1
    g_dB = C * g_W
    if C.ndim == 3:
        g_z, g_dB = g_z.sum(0), g_dB.sum(0)
    g_A = a["dA_dA"] * g_z + a["dB_dA"] * g_dB  # (H, N2)
    g_dt = (a["dA_ddt"] * g_z + a["dB_ddt"] * g_dB).sum(1)  # (H,)
    out.update({
        "grads/log_dt": float((dt[:, 0] * g_dt).max()),
        "grads/log_A_real": float((np.exp(p["log_A_real"]) * g_A).max()),
        "grads/A_imag": float(g_A.max()),
        "grads/C_re": float((mdB * g_W).max()),
        "grads/C_im": float((mdB * g_W).max()),
    })
    if "B_re" in p:
        out["grads/B_re"] = out["grads/B_im"] = float((a["dB_dB"] * g_dB).max())
    return out


def _kernel_scales(case, outputs, grads, cot):
    tight = "extreme_dt" in case.flags
    s = _kernel_abs_scales(case.group("params"), case.config["disc"], case.config["L"], cot["K"],
                           tight)
    return {k: max(v, _maxabs(outputs[k[8:]]) if k.startswith("outputs/") else _maxabs(grads[k[6:]]))
            for k, v in s.items()}


# ---- FFT convolution -------------------------------------------------------------------------


def _decaying_kernel(rng, shape, L):
    l = np.arange(L)
    rate = rng.uniform(0.02, 0.3, size=shape[:-1] + (1,))
    return rng.normal(size=shape) * np.exp(-rate * l)


def _fftconv_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=2, L=32, bi=False, result="valid", edit=None):
        rng = rngs()
        u = rng.normal(size=(B, H, L))
        K = _decaying_kernel(rng, (2, H, L) if bi else (H, L), L)
        D = rng.normal(size=H)
        inputs, params = {"u": u}, {"K": K, "D": D}
        if edit:
            edit(inputs, params)
        out.append(Spec(comment, list(flags), {"bidirectional": bool(bi)}, inputs, params, result))

    add("causal convolution with D skip", ["default"], L=32 * big)
    add("bidirectional: K (2, H, L), anticausal half K1[s - t - 1]", bi=True, L=32 * big)
    add("L = 1", ["short_sequence"], L=1)
    add("odd L = 7, bidirectional", bi=True, L=7)
    add("L = 1000: FFT length 2000 (5-smooth, not a power of two)", ["non_power_of_two"], B=1,
        L=1000)
    add("long sequence, L = 4096", ["long_sequence"], B=1, H=1, L=4096 * big)

    def zero_u(i, p):
        i["u"][:] = 0.0

    add("all-zero input: y = 0 and dK = 0, dD = 0", ["all_zero"], edit=zero_u)

    def white(i, p):
        p["K"] = np.random.default_rng(7).normal(size=p["K"].shape)

    add("non-decaying white-noise kernel (no cancellation shortcut)", edit=white)

    def nan(i, p):
        i["u"][0, 1, 3] = np.nan

    add("NaN in u: must be rejected", ["nan_input"], result="invalid", edit=nan)

    def bad(i, p):
        p["K"] = np.concatenate([p["K"], p["K"][:, :1]], axis=1)

    add("K longer than u (H, L + 1): must be rejected", ["bad_shape"], result="invalid", edit=bad)
    return out


def _fftconv_fwd(case):
    from ..conv import fftconv

    return {"y": fftconv(case.data["inputs/u"], case.data["params/K"], case.data["params/D"])}, None, {}


def _fftconv_bwd(case, state, cot):
    from ..conv import fftconv_bwd

    du, dK, dD = fftconv_bwd(case.data["inputs/u"], case.data["params/K"], case.data["params/D"],
                             cot["y"])
    return {"u": du, "K": dK, "D": dD}


def _fft_depth(L):
    from ..conv import fft_length

    return 2 * int(math.ceil(math.log2(fft_length(L))))


def _fftconv_depth(case):
    Bsz, H, L = case.data["inputs/u"].shape
    f = _fft_depth(L)
    return {"*": L + f, "grads/K": Bsz * L + f, "grads/D": Bsz * L + f}


def _abs_scales(case, K, cot):
    """Scales of a convolution's outputs and grads: the same op on absolute values."""
    from ..conv import fftconv, fftconv_bwd

    u, D = np.abs(case.data["inputs/u"]), np.abs(case.data["params/D"])
    K = np.abs(K)
    y = fftconv(u, K, D)
    du, dK, dD = fftconv_bwd(u, K, D, np.abs(cot["y"]))
    return {"outputs/y": _maxabs(y), "grads/u": _maxabs(du), "grads/K": _maxabs(dK),
            "grads/D": _maxabs(dD)}


def _fftconv_scales(case, outputs, grads, cot):
    return _abs_scales(case, case.data["params/K"], cot)


# ---- S4D layer -------------------------------------------------------------------------------


def _layer_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), disc="zoh", init="lin", B=2, H=2, N=8, L=32, dt=None, bi=False,
            tb=False, result="valid", edit=None):
        rng = rngs()
        p = _ssm_params(rng, H, N, init, dt, bi, tb, D=True)
        u = rng.normal(size=(B, H, L))
        cfg = _ssm_config(disc, init, L, H, N, tb, bi)
        inputs = {"u": u}
        if edit:
            edit(inputs, p)
        out.append(Spec(comment, list(flags), cfg, inputs, p, result))

    for init in ("lin", "inv", "real"):
        for disc in ("zoh", "bilinear"):
            add(f"init {init}, disc {disc}", ["default"] if (init, disc) == ("lin", "zoh") else [],
                disc, init, L=32 * big)
    add("trainable B", tb=True, L=32 * big)
    add("bidirectional", bi=True, L=32 * big)
    add("bidirectional, bilinear, trainable B", disc="bilinear", init="inv", bi=True, tb=True)
    add("long sequence L = 2048", ["long_sequence"], B=1, H=1, N=4, L=2048 * big)
    add("dt = 1e-6: tiny dB, the D skip dominates", ["extreme_dt"], dt=1e-6)
    add("L = 1", ["short_sequence"], L=1)

    def zero(i, p):
        i["u"][:] = 0.0

    add("all-zero input", ["all_zero"], edit=zero)

    def nan(i, p):
        p["C_re"][0, 0] = np.nan

    add("NaN in C_re: must be rejected", ["nan_input"], result="invalid", edit=nan)
    return out


def _layer_fwd(case):
    from ..s4d import s4d_layer_fwd

    y, cache = s4d_layer_fwd(case.data["inputs/u"], case.group("params"), disc=case.config["disc"])
    return {"y": y}, cache, {}


def _layer_bwd(case, cache, cot):
    from ..s4d import s4d_layer_bwd

    du, g = s4d_layer_bwd(cache, cot["y"])
    return {"u": du, **g}


def _layer_depth(case):
    Bsz, H, L = case.data["inputs/u"].shape
    N2 = case.data["params/log_A_real"].shape[1]
    f = _fft_depth(L)
    return {"*": L + N2 + f, "grads/*": Bsz * L + L + N2 + f}


def _layer_scales(case, outputs, grads, cot):
    from ..conv import fftconv_bwd
    from ..s4d import KERNEL_PARAMS
    from ..ssm import s4d_kernel

    p = case.group("params")
    B = {k: p[k] for k in ("B_re", "B_im") if k in p}
    K = s4d_kernel(*[p[k] for k in KERNEL_PARAMS], case.config["L"], disc=case.config["disc"], **B)
    s = _abs_scales(case, K, cot)
    _, dK_abs, _ = fftconv_bwd(np.abs(case.data["inputs/u"]), np.abs(K), np.abs(p["D"]),
                               np.abs(cot["y"]))
    k = _kernel_abs_scales(p, case.config["disc"], case.config["L"], dK_abs,
                           "extreme_dt" in case.flags)
    k.pop("outputs/K")
    # the kernel's own magnitude enters y through the convolution of |u| with |K|
    Kmag = _kernel_abs_scales(p, case.config["disc"], case.config["L"], None,
                              "extreme_dt" in case.flags)["outputs/K"]
    ratio = max(1.0, Kmag / max(_maxabs(K), 1e-300))
    out = {"outputs/y": s["outputs/y"] * ratio, "grads/u": s["grads/u"] * ratio,
           "grads/D": s["grads/D"], **k}
    return {key: max(v, _maxabs(outputs[key[8:]]) if key.startswith("outputs/")
                     else _maxabs(grads[key[6:]])) for key, v in out.items()}


# ---- neurons and PMBC ------------------------------------------------------------------------


def _neuron_config(reset="hard", tau=0.5, theta=1.0, u_reset=0.0, refractory_steps=0,
                   spike_condition="ge", surrogate="triangle", surrogate_scale=None,
                   grad_mode="bptt"):
    """The scalar attributes of a neuron case (NeuronConfig fields, surrogate_scale resolved)."""
    from ..surrogates import SURROGATES

    if surrogate_scale is None:
        surrogate_scale = SURROGATES[surrogate].default_scale
    return dict(reset=reset, tau=float(tau), theta=float(theta), u_reset=float(u_reset),
                refractory_steps=int(refractory_steps), spike_condition=spike_condition,
                surrogate=surrogate, surrogate_scale=float(surrogate_scale), grad_mode=grad_mode)


def _dyadic(rng, shape, lo=-1.0, hi=2.0, step=0.125):
    """Multiples of ``step`` in [lo, hi]: sums and halvings of these are exact in float64."""
    n = int(round((hi - lo) / step))
    return lo + step * rng.integers(0, n + 1, size=shape).astype(np.float64)


def _neuron_specs(rngs, size, pmbc=False):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=3, L=32, shift=0.5, scale=1.0, x=None, rho=None,
            result="valid", exact=False, **cfg):
        rng = rngs()
        config = _neuron_config(**cfg)
        if x is None:
            x = shift + scale * rng.normal(size=(B, H, L))
        elif callable(x):
            x = x(rng)
        params = {}
        if config["reset"] == "refractory":
            params["rho"] = rng.uniform(0.0, 1.5, size=x.shape[1]) if rho is None else rho
        out.append(Spec(comment, list(flags), config, {"x": x}, params, result, exact))

    sur = ["triangle", "atan", "sigmoid", "fast_sigmoid", "rectangle"]
    taus = [0.125, 0.5, 0.9, 0.25]
    resets = ["soft", "refractory", "hard", "none"] if pmbc else ["hard", "soft", "refractory", "none"]
    i = 0
    for reset in resets:
        for gm in ("bptt", "detach_reset", "sltt"):
            extra = {"u_reset": [0.0, -0.5, 0.3][i % 3]} if reset == "hard" else {}
            theta = 0.0 if reset == "none" and i % 2 else [1.0, 0.5, 2.0][i % 3]
            flags = ["default"] if (reset, gm) == ("hard", "bptt") else []
            add(f"reset {reset}, grad_mode {gm}, surrogate {sur[i % 5]}, "
                f"{['ge', 'gt'][i % 2]}, tau {taus[i % 4]}", flags, L=32 * big,
                shift=0.6 * (theta if theta else 1.0), reset=reset, grad_mode=gm,
                surrogate=sur[i % 5], spike_condition=["ge", "gt"][i % 2], tau=taus[i % 4],
                theta=theta, **extra)
            i += 1
    for j, reset in enumerate(resets):
        add(f"absolute refractory period R = {j + 1}, reset {reset}", L=32 * big, shift=1.0,
            reset=reset, refractory_steps=j + 1, surrogate=sur[j], grad_mode="bptt",
            spike_condition=["gt", "ge"][j % 2], tau=0.5)
    add("non-default surrogate scales: triangle w = 0.5", reset="soft", surrogate="triangle",
        surrogate_scale=0.5)
    add("atan a = 4, sigmoid-like sharpness", reset="refractory", surrogate="atan",
        surrogate_scale=4.0, grad_mode="detach_reset")
    add("rectangle w = 2, fast_sigmoid-free wide window", reset="hard", surrogate="rectangle",
        surrogate_scale=2.0, grad_mode="sltt")
    add("fast_sigmoid k = 10", reset="none", surrogate="fast_sigmoid", surrogate_scale=10.0)

    def at_threshold(rng, B=2, H=2, L=16):
        x = _dyadic(rng, (B, H, L))
        x[:, :, 0] = 1.0  # h_0 = x_0 = theta exactly: spike for ge, none for gt
        x[:, :, 1] = 0.5
        x[:, :, 2] = 0.75  # soft/hard from u_1 = 0.5 or 0.25 ... stays dyadic
        return x

    for cond in ("ge", "gt"):
        for reset in ("hard", "soft"):
            add(f"membrane exactly at theta = 1 at t = 0 (and later): {cond} decides; dyadic "
                f"inputs with tau = 0.5 are exact in any float64 arithmetic",
                ["at_threshold", "spike_at_t0"] if cond == "ge" else ["at_threshold"],
                x=at_threshold, exact=True, reset=reset, spike_condition=cond, tau=0.5,
                surrogate="atan")
    add("membrane within an ulp of theta (tau = 0.1, x_0 = 0.7, x_1 = 0.93): rounding decides",
        ["near_threshold"], x=np.array([[[0.7, 0.93, 0.2, 0.8, 0.93, 0.0, 0.7, 0.93]]]),
        result="acceptable", reset="none", tau=0.1, surrogate="triangle")
    add("all-zero input: no spike, gradients through the surrogate at h - theta = -theta",
        ["all_zero"], x=lambda rng: np.zeros((2, 3, 16)), reset="hard", tau=0.125)
    add("spike at t = 0 in every row (x_0 = theta + 0.5)", ["spike_at_t0"],
        x=lambda rng: np.concatenate([np.full((2, 3, 1), 1.5), rng.normal(size=(2, 3, 15))], -1),
        reset="refractory", tau=0.5)
    add("long sequence, tau = 0.9", ["long_sequence"], B=1, H=1, L=(1024 if pmbc else 2048) * big,
        shift=0.2,
        reset="soft" if pmbc else "hard", tau=0.9, surrogate="sigmoid")
    add("saturation: x ~ 1e6 spikes at every step, surrogate tails ~ 0", ["saturation"],
        x=lambda rng: 1e6 * (1.0 + rng.random((2, 2, 16))), reset="soft", tau=0.5,
        surrogate="atan")
    add("saturation: tau = 0.99 soft reset accumulates, spikes most steps", ["saturation"],
        shift=3.0, reset="soft", tau=0.99, surrogate="fast_sigmoid")
    add("memoryless Heaviside (Binary S4D): reset none, tau = 0, theta = 0", reset="none",
        tau=0.0, theta=0.0, shift=0.0, surrogate="atan")
    add("refractory with rho = 0 (equals soft reset)", rho=np.zeros(3), reset="refractory",
        tau=0.5)
    add("hard reset to u_reset = -0.5 with negative inputs (a reset can raise the membrane)",
        shift=-0.3, scale=1.5, reset="hard", u_reset=-0.5, tau=0.5)
    add("B = H = L = 1", ["short_sequence"], B=1, H=1, L=1, shift=1.5, reset="soft")
    add("tau = 1 is outside [0, 1): must be rejected", ["invalid_config"], result="invalid",
        reset="soft", tau=1.0)
    add("tau = -0.25 is outside [0, 1): must be rejected", ["invalid_config"], result="invalid",
        reset="hard", tau=-0.25)
    add("NaN input: must be rejected", ["nan_input"], result="invalid",
        x=lambda rng: np.where(np.arange(32) == 5, np.nan, rng.normal(size=(2, 3, 32))),
        reset="hard")
    add("negative rho: must be rejected", ["invalid_config"], result="invalid",
        rho=np.array([0.5, -0.1, 0.2]), reset="refractory")
    add("theta = 0 with a hard reset: must be rejected (theta > 0 required)", ["invalid_config"],
        result="invalid", reset="hard", theta=0.0)
    return out


def _neuron_cfg(case):
    from ..neurons import NeuronConfig

    return NeuronConfig(**case.config)


def _rho(case):
    return case.data.get("params/rho")


def _neuron_fwd(case):
    from ..neurons import neuron_fwd

    cfg = _neuron_cfg(case)
    s, h, u = neuron_fwd(case.data["inputs/x"], cfg, rho=_rho(case))
    return {"s": s, "h": h, "u": u}, (s, h, u, cfg), {"spikes": {"s": s},
                                                     "membranes": {"h": (h, cfg.theta)}}


def _spiking_bwd(bwd, case, state, cot):
    """VJP of the neuron / pmbc suites through ``bwd`` (neuron_bwd or pmbc_bwd)."""
    s, h, u, cfg = state
    dx, drho = bwd(case.data["inputs/x"], s, h, u, cfg, cot["s"], dh=cot["h"], du=cot["u"],
                   rho=_rho(case))
    return {"x": dx} if drho is None else {"x": dx, "rho": drho}


def _neuron_bwd(case, state, cot):
    from ..neurons import neuron_bwd

    return _spiking_bwd(neuron_bwd, case, state, cot)


def _pmbc_fwd(case):
    from ..pmbc import pmbc_fwd

    cfg = _neuron_cfg(case)
    s, h, u, it = pmbc_fwd(case.data["inputs/x"], cfg, rho=_rho(case), parallel=False)
    return ({"s": s, "h": h, "u": u, "iterations": it}, (s, h, u, cfg),
            {"spikes": {"s": s}, "membranes": {"h": (h, cfg.theta)}})


def _pmbc_bwd(case, state, cot):
    from ..pmbc import pmbc_bwd

    return _spiking_bwd(pmbc_bwd, case, state, cot)


def _neuron_depth(case):
    Bsz, H, L = case.data["inputs/x"].shape
    return {"*": L, "grads/rho": Bsz * L + L}


def _neuron_floors(case):
    from ..pmbc import rounding_bound

    b = rounding_bound(case.data["inputs/x"], _neuron_cfg(case), _rho(case))
    return {"outputs/h": b, "outputs/u": b, "membrane/h": b}


# ---- SDN -------------------------------------------------------------------------------------


def _sdn_weights(rng):
    """Random fused SDN weights of the published shapes (the published checkpoint is external
    reference data, not part of refimpl's files)."""
    return {"w0": rng.normal(0.0, 0.4, size=(8, 1, 8)), "w1": rng.normal(0.0, 0.2, size=8),
            "w2": rng.normal(0.0, 0.3, size=(8, 8, 1)), "w3": rng.normal(0.0, 0.2, size=8),
            "w4": rng.normal(0.0, 0.3, size=(1, 8, 1)), "w5": rng.normal(0.0, 0.1, size=1)}


def _sdn_specs(rngs, size):
    from ..surrogates import SURROGATES

    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=2, L=32, theta=1.0, spike_condition="ge",
            surrogate="triangle", surrogate_scale=None, result="valid", edit=None):
        rng = rngs()
        w = _sdn_weights(rng)
        x = rng.normal(size=(B, H, L))
        if edit:
            x = edit(x)
        scale = SURROGATES[surrogate].default_scale if surrogate_scale is None else surrogate_scale
        cfg = dict(tau=0.125, theta=float(theta), spike_condition=spike_condition,
                   surrogate=surrogate, surrogate_scale=float(scale))
        out.append(Spec(comment, list(flags), cfg, {"x": x}, w, result))

    add("SpikingSSM setting: tau = 0.125, theta = 1, ge, triangle", ["default"], L=32 * big)
    add("gt, atan surrogate", spike_condition="gt", surrogate="atan", L=32 * big)
    add("sigmoid surrogate, a = 2", surrogate="sigmoid", surrogate_scale=2.0)
    add("fast_sigmoid surrogate", surrogate="fast_sigmoid")
    add("rectangle surrogate, theta = 0.5", surrogate="rectangle", theta=0.5)
    add("L = 5 < 8 taps: the window is partly before t = 0", ["short_sequence"], L=5)
    add("L = 1: m_0 = b3 + sum_c w3[c] relu(b2 + W2 relu(b1) + relu(b1))", ["short_sequence"],
        L=1)
    add("all-zero input", ["all_zero"], edit=lambda x: np.zeros_like(x))
    add("long sequence, L = 2048", ["long_sequence"], B=1, H=1, L=2048 * big)

    def nan(x):
        x[1, 0, 4] = np.nan
        return x

    add("NaN input: must be rejected", ["nan_input"], result="invalid", edit=nan)
    return out


def _sdn_fwd(case):
    from ..sdn import sdn_forward

    x = case.data["inputs/x"]
    c = case.config
    m, s = sdn_forward(x, case.group("params"), theta=c["theta"],
                       spike_condition=c["spike_condition"])
    return {"m": m, "s": s}, m, {"spikes": {"s": s}, "membranes": {"m+x": (m + x, c["theta"])}}


def _sdn_bwd(case, m, cot):
    from ..sdn_fused import sdn_fused_bwd, sdn_fused_fwd
    from ..surrogates import get_surrogate

    x = case.data["inputs/x"]
    c = case.config
    g = get_surrogate(c["surrogate"]).grad(m + x - c["theta"], c["surrogate_scale"])
    _, cache = sdn_fused_fwd(x, case.group("params"))
    _, dw = sdn_fused_bwd(cache, cot["m"])
    return {"x": cot["s"] * g, **dw}


def _sdn_depth(case):
    Bsz, H, L = case.data["inputs/x"].shape
    return {"*": 32, "grads/*": Bsz * H * L + 32, "grads/x": 32}


# ---- GLU and GSU -----------------------------------------------------------------------------


def _linear_init(rng, shape, fan_in):
    b = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-b, b, size=shape)


def _glu_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=4, L=16, spikes=True, wscale=1.0, edit=None):
        rng = rngs()
        s = (rng.random((B, H, L)) < 0.3).astype(np.float64) if spikes else rng.normal(size=(B, H, L))
        W = wscale * _linear_init(rng, (2 * H, H), H)
        b = wscale * _linear_init(rng, (2 * H,), H)
        inputs = {"s": s}
        if edit:
            edit(inputs)
        out.append(Spec(comment, list(flags), {"H": H}, inputs, {"W": W, "b": b}))

    add("spike input (rate 0.3), W (2H, H), b (2H,)", ["default"], L=16 * big)
    add("real-valued input (GLU after a non-spiking activation)", spikes=False, L=16 * big)
    add("all-zero input: z = b[:H] sigmoid(b[H:])", ["all_zero"],
        edit=lambda i: i["s"].fill(0.0))
    add("saturation: W, b scaled by 300, |o| up to ~1e3: sigmoid(+-1e3) must not overflow",
        ["saturation"], spikes=False, wscale=300.0)
    add("H = 1", H=1)
    add("H = 16, L = 64", H=16, L=64)
    return out


def _glu_fwd(case):
    from ..layers import glu_fwd

    z, cache = glu_fwd(case.data["inputs/s"], case.data["params/W"], case.data["params/b"])
    return {"z": z}, cache, {}


def _glu_bwd(case, cache, cot):
    from ..layers import glu_bwd

    ds, dW, db = glu_bwd(cache, cot["z"])
    return {"s": ds, "W": dW, "b": db}


def _mix_depth(case):
    key = "inputs/s" if "inputs/s" in case.data else "inputs/x"
    Bsz, H, L = case.data[key].shape
    return {"*": H + 8, "grads/W": Bsz * L + 8, "grads/b": Bsz * L + 8, "grads/c": Bsz * L + 8}


def _gsu_specs(rngs, size):
    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=4, L=16, bc=True, edit=None, result="valid", exact=False):
        rng = rngs()
        x = rng.normal(size=(B, H, L))
        W = _linear_init(rng, (H, H), H)
        b = 0.1 * rng.normal(size=H) if bc else np.zeros(H)
        c = 0.1 * rng.normal(size=H) if bc else np.zeros(H)
        inputs, params = {"x": x}, {"W": W, "b": b, "c": c}
        if edit:
            edit(inputs, params)
        out.append(Spec(comment, list(flags), {"H": H, "ternary_ratio": 0.15}, inputs, params,
                        result, exact))

    add("z = (Ter(x) W + b) * (x Ter(W) + c)", ["default"], L=16 * big)
    add("b = c = 0 (their initial values)", bc=False, L=16 * big)

    def zero(i, p):
        i["x"][:] = 0.0

    add("all-zero input: Ter(0) = 0 (max|x| = 0 guard)", ["all_zero"], edit=zero)

    def at_ter(i, p):
        x = _dyadic(np.random.default_rng(3), i["x"].shape, -1.0, 1.0, 0.25)
        x[:, 0, :] = 2.0  # max |x| per token = 2
        x[:, 1, :] = 0.3  # = 0.15 * 2 exactly in float64: Ter = 1 (>=)
        x[:, 2, :] = -0.3
        i["x"] = x
        W = p["W"]
        W[0, 0] = 1.0
        W[1, 1] = 0.15 * np.abs(W).max()  # exactly at the weight threshold
        p["W"] = W

    add("values exactly at the ternarisation threshold 0.15 max|v| (>= keeps them); a backend "
        "computing |v| / max|v| >= 0.15 may differ", ["ternary_threshold"], edit=at_ter,
        result="acceptable", exact=True)
    add("H = 16", H=16)
    add("L = 1", ["short_sequence"], L=1)
    return out


def _gsu_ter_margins(x, W, ratio=0.15):
    mx = np.abs(x).max(axis=1, keepdims=True)  # (B, 1, L)
    rel_x = np.where(mx > 0, np.abs(x) / np.where(mx > 0, mx, 1.0), 1.0)
    mw = np.abs(W).max()
    rel_w = np.abs(W) / mw if mw > 0 else np.ones_like(W)
    return {"ter_x": (rel_x, ratio), "ter_W": (rel_w, ratio)}


def _gsu_fwd(case):
    from ..layers import gsu_fwd

    x, W = case.data["inputs/x"], case.data["params/W"]
    z, cache = gsu_fwd(x, W, case.data["params/b"], case.data["params/c"])
    return {"z": z}, cache, {"spikes": {"Tx": cache[0], "TW": cache[1]},
                             "membranes": _gsu_ter_margins(x, W)}


def _gsu_bwd(case, cache, cot):
    from ..layers import gsu_bwd

    dx, dW, db, dc = gsu_bwd(cache, cot["z"])
    return {"x": dx, "W": dW, "b": db, "c": dc}


# ---- block and model step --------------------------------------------------------------------

_MODEL_FIELDS = ("activation", "norm", "prenorm", "bidirectional", "disc", "init", "grad_mode",
                 "surrogate", "neuron_impl")


def _model_attrs(cfg):
    """Scalar attributes of a ModelConfig, with the family's neuron spelled out."""
    from ..model import FAMILIES

    fam = FAMILIES[cfg.activation]
    a = {k: getattr(cfg, k) for k in _MODEL_FIELDS}
    a.update(d_model=cfg.d_model, d_state=cfg.d_state, n_layers=cfg.n_layers,
             n_classes=cfg.n_classes, d_input=cfg.d_input, vocab=cfg.vocab,
             dropout=float(cfg.dropout), training=True, mixing=fam.mixing,
             threshold_scaling=bool(fam.threshold), activation_kind=fam.kind)
    ncfg = cfg.neuron_config()
    if ncfg is not None:
        a["surrogate"] = ncfg.surrogate
        for k, v in ncfg.attrs().items():
            a["neuron_" + k] = v
    return a


def _model_config(attrs):
    from ..model import ModelConfig

    fields = {k: attrs[k] for k in _MODEL_FIELDS + ("d_model", "d_state", "n_layers", "n_classes",
                                                    "d_input", "vocab", "dropout")}
    return ModelConfig(**fields)


def _model_buffers(cfg, params_group):
    """Buffers block_fwd / model_fwd read: SDN weights (stored as non-trainable params) and
    BatchNorm running statistics (unused in training mode: placeholders)."""
    buf = {k: v for k, v in params_group.items() if k.startswith("sdn.")}
    for i in range(cfg.n_layers):
        buf[f"layers.{i}.norm.running_mean"] = np.zeros(cfg.d_model)
        buf[f"layers.{i}.norm.running_var"] = np.ones(cfg.d_model)
    return buf


def _randomise(rng, p, cfg):
    """Move parameters off their initial constants so that every gradient is generic, and put the
    spiking thresholds where the membranes reach them."""
    for k in list(p):
        if k.endswith("ln_vth"):
            p[k] = rng.normal(-1.0, 0.2, size=p[k].shape)
        elif k.endswith("norm.gamma"):
            p[k] = 1.0 + 0.1 * rng.normal(size=p[k].shape)
        elif k.endswith(("norm.beta", "mix.c")) or (k.endswith("mix.b") and cfg.activation == "binary_gsu"):
            p[k] = 0.1 * rng.normal(size=p[k].shape)
        elif k.endswith(".rho"):
            p[k] = rng.uniform(0.2, 1.0, size=p[k].shape)
    return p


def _block_specs(rngs, size):
    from ..model import ModelConfig, init_model

    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=2, H=4, N=4, L=32, uscale=1.0, result="valid", edit=None, **kw):
        rng = rngs()
        cfg = ModelConfig(n_classes=2, d_model=H, d_state=N, n_layers=1, **kw)
        sdn_w = _sdn_weights(rng) if cfg.activation == "sdn" else None
        p, _ = init_model(cfg, seed=rng, sdn_weights=sdn_w)
        p = _randomise(rng, {k[len("layers.0."):]: v for k, v in p.items()
                             if k.startswith("layers.0.")}, cfg)
        meta = {}
        if sdn_w is not None:
            for k, v in sdn_w.items():
                p["sdn." + k] = v
                meta["params/sdn." + k] = {"trainable": False}
        u = uscale * rng.normal(size=(B, H, L))
        inputs = {"u": u}
        if edit:
            edit(inputs, p)
        out.append(Spec(comment, list(flags), _model_attrs(cfg), inputs, p, result, meta=meta))

    add("SpikingSSM block: LIF (hard reset, tau 0.125), threshold scaling, GLU, LayerNorm "
        "after the residual", ["default"], activation="lif", L=32 * big)
    add("GELU (non-spiking S4D), prenorm", activation="gelu", prenorm=True, L=32 * big)
    add("Binary S4D: Heaviside (reset none, tau 0, theta 0, atan), GLU", activation="binary")
    add("Binary S4D + GSU: the GSU ternarises the SSM output", activation="binary_gsu")
    add("SDN neuron: m from the fused SDN (weights sdn.w0..w5, not trained) is a constant",
        activation="sdn")
    add("SPikE-SSM reset-refractory neuron (rho trainable), iterative", activation="refractory",
        neuron_impl="iterative")
    add("refractory neuron, BatchNorm (training mode, batch statistics), prenorm",
        activation="refractory", neuron_impl="iterative", norm="batch", prenorm=True)
    add("LIF, BatchNorm after the residual, bilinear, S4D-Inv", activation="lif", norm="batch",
        disc="bilinear", init="inv")
    add("LIF, bidirectional SSM, S4D-Real", activation="lif", bidirectional=True, init="real")
    add("LIF, grad_mode detach_reset, sigmoid surrogate", activation="lif",
        grad_mode="detach_reset", surrogate="sigmoid")
    add("LIF, grad_mode sltt, fast_sigmoid surrogate", activation="lif", grad_mode="sltt",
        surrogate="fast_sigmoid")
    add("refractory neuron, detach_reset, rectangle surrogate", activation="refractory",
        neuron_impl="iterative", grad_mode="detach_reset", surrogate="rectangle")
    add("long sequence, L = 1024", ["long_sequence"], activation="lif", B=1, H=2, L=1024 * big)

    def zero(i, p):
        i["u"][:] = 0.0

    add("all-zero input (LIF): y = norm(GLU(0))", ["all_zero"], activation="lif", edit=zero)
    add("GELU saturation: inputs scaled by 1e3", ["saturation"], activation="gelu",
        uscale=1e3)

    def nan(i, p):
        i["u"][0, 0, 0] = np.nan

    add("NaN input: must be rejected", ["nan_input"], activation="lif", result="invalid", edit=nan)
    return out


def _block_split(case):
    """``(cfg, p with layers.0. names, buffers)`` from a block case."""
    cfg = _model_config(case.config)
    params = case.group("params")
    p = {"layers.0." + k: v for k, v in params.items() if not k.startswith("sdn.")}
    return cfg, p, _model_buffers(cfg, params)


def _block_fwd(case):
    from ..model import block_fwd

    cfg, p, buf = _block_split(case)
    y, cache, _ = block_fwd(cfg, p, buf, 0, case.data["inputs/u"], True, None, new_buf={})
    return {"y": y}, (cfg, p, cache), _model_diag(cfg, [cache])


def _model_diag(cfg, blocks):
    spikes, membranes = {}, {}
    for i, c in enumerate(blocks):
        act = c.get("act")
        tag = act[0] if isinstance(act, tuple) and act and isinstance(act[0], str) else None
        if tag == "neuron":
            _, s, h, _, ncfg, _, _ = act[1]
            spikes[f"s{i}"] = s
            membranes[f"h{i}"] = (h, ncfg.theta)
        elif tag == "sdn":
            d = act[1]
            v = d["m"] + d["x"]
            spikes[f"s{i}"] = (v >= d["cfg"].theta).astype(np.float64)
            membranes[f"m+x{i}"] = (v, d["cfg"].theta)
        if cfg.activation == "binary_gsu":
            Tx, TW = c["mix"][0], c["mix"][1]
            spikes[f"Tx{i}"], spikes[f"TW{i}"] = Tx, TW
    return {"spikes": spikes, "membranes": membranes}


def _block_bwd(case, state, cot):
    from ..model import block_bwd

    cfg, p, cache = state
    dx, g = block_bwd(cfg, p, 0, cache, cot["y"])
    return {"u": dx, **{k[len("layers.0."):]: v for k, v in g.items()}}


def _block_depth(case):
    Bsz, H, L = case.data["inputs/u"].shape
    N2 = case.config["d_state"] // 2
    d = L + N2 + _fft_depth(L) + 4 * H + 16
    return {"*": d, "grads/*": Bsz * L + d}


#: AdamW settings of the model_step suite (torch.optim.AdamW parametrisation).
ADAMW = dict(lr=1e-2, weight_decay=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def _model_specs(rngs, size):
    from ..model import ModelConfig, init_model
    from ..optim import cosine_schedule

    big = 8 if size == "large" else 1
    out = []

    def add(comment, flags=(), B=3, L=16, clip_norm=0.0, result="valid", edit=None, **kw):
        rng = rngs()
        kw = {"n_classes": 3, "d_input": 2, "d_model": 4, "d_state": 4, "n_layers": 2, **kw}
        cfg = ModelConfig(**kw)
        sdn_w = _sdn_weights(rng) if cfg.activation == "sdn" else None
        p, _ = init_model(cfg, seed=rng, sdn_weights=sdn_w)
        p = _randomise(rng, p, cfg)
        meta = {}
        if sdn_w is not None:
            for k, v in sdn_w.items():
                p["sdn." + k] = v
                meta["params/sdn." + k] = {"trainable": False}
        if cfg.vocab:
            x = rng.integers(0, cfg.vocab, size=(B, L)).astype(np.int64)
        else:
            x = rng.normal(size=(B, L, cfg.d_input))
        labels = rng.integers(0, cfg.n_classes, size=B).astype(np.int64)
        inputs = {"x": x, "labels": labels}
        if edit:
            edit(inputs, p)
        attrs = _model_attrs(cfg)
        attrs.update(ADAMW, lr_scale=cosine_schedule(0, 10, 2), clip_norm=float(clip_norm), step=1)
        out.append(Spec(comment, list(flags), attrs, inputs, p, result, meta=meta))

    add("two LIF blocks (SpikingSSM), LayerNorm, one AdamW step with warm-up factor 0.5",
        ["default"], activation="lif", L=16 * big)
    add("GELU blocks, prenorm", activation="gelu", prenorm=True)
    add("Binary S4D + GSU", activation="binary_gsu")
    add("refractory neurons, BatchNorm (batch statistics), rho projected onto rho >= 0",
        activation="refractory", neuron_impl="iterative", norm="batch")
    add("SDN neurons (sdn.w0..w5 fixed, not updated)", activation="sdn")
    add("token embedding (vocab 5) instead of the linear encoder", activation="lif", vocab=5,
        d_input=1)
    add("global-norm gradient clipping to 0.1 before the step", activation="binary",
        clip_norm=0.1)

    def nan(i, p):
        i["x"][1, 2, 0] = np.nan

    add("NaN input: must be rejected", ["nan_input"], activation="lif", result="invalid", edit=nan)
    return out


def _model_fwd(case):
    from .. import layers as Ly
    from ..model import model_bwd, model_fwd, optimizer_rules, project
    from ..optim import adamw_init, adamw_step, make_groups

    c = case.config
    cfg = _model_config(c)
    params = case.group("params")
    buf = _model_buffers(cfg, params)
    p = {k: v for k, v in params.items() if not k.startswith("sdn.")}
    x, labels = case.data["inputs/x"], case.data["inputs/labels"]
    logits, cache, _, _ = model_fwd(cfg, p, buf, x, training=True)
    loss, ce = Ly.cross_entropy_fwd(logits, labels)
    (dlogits,) = Ly.cross_entropy_bwd(ce)
    grads = model_bwd(cfg, p, cache, dlogits)
    new = {k: np.array(v, dtype=np.float64, copy=True) for k, v in p.items()}
    groups = make_groups(new, c["lr"], c["weight_decay"], optimizer_rules(c["lr"]))
    state = adamw_init(new)
    adamw_step(new, grads, state, groups, lr_scale=c["lr_scale"], betas=(c["beta1"], c["beta2"]),
               eps=c["eps"], clip_norm=c["clip_norm"] or None)
    project(new, cfg)
    outputs = {"loss": np.asarray(loss), "logits": logits,
               **{"params/" + k: v for k, v in new.items()}}
    return outputs, grads, _model_diag(cfg, cache["blocks"])


def _model_bwd(case, grads, cot):
    return {k: v * float(cot["loss"]) for k, v in grads.items()}


def _model_cotangents(outputs, rng):
    return {"loss": np.asarray(1.0)}


def _model_depth(case):
    c = case.config
    x = case.data["inputs/x"]
    Bsz, L = x.shape[0], x.shape[1]
    d = c["n_layers"] * (L + c["d_state"] // 2 + _fft_depth(L) + 4 * c["d_model"] + 16)
    return {"*": d + L, "grads/*": Bsz * L + d + L}


def _model_meta(case):
    """Per-parameter AdamW group settings (lr before the schedule factor, weight_decay)."""
    from ..model import optimizer_rules
    from ..optim import make_groups

    c = case.config
    p = {k: v for k, v in case.group("params").items() if not k.startswith("sdn.")}
    meta = {}
    for g in make_groups(p, c["lr"], c["weight_decay"], optimizer_rules(c["lr"])):
        for name in g["params"]:
            meta["params/" + name] = {"trainable": True, "lr": float(g["lr"]),
                                      "weight_decay": float(g["weight_decay"])}
    return meta


def _neuron_suite(name, pmbc):
    return Suite(
        name=name, op="pmbc" if pmbc else "neuron",
        specs=lambda rngs, size: _neuron_specs(rngs, size, pmbc=pmbc),
        fwd=_pmbc_fwd if pmbc else _neuron_fwd, bwd=_pmbc_bwd if pmbc else _neuron_bwd,
        differentiable=("s", "h", "u"), depth=_neuron_depth, floors=_neuron_floors,
        spikes=("s",),
        math=("PMBC fixed-point iteration S_{k+1} = F(S_k) of the neuron below; " if pmbc else "")
        + "m_t = tau u_{t-1}, h_t = m_t + x_t, s_t = Theta(h_t - theta), u_t = reset(h_t, s_t)")


#: suite name -> :class:`Suite`, in generation order.
SUITES = {
    "s4d_kernel": Suite("s4d_kernel", "s4d_kernel", _kernel_specs, _kernel_fwd, _kernel_bwd, ("K",),
                        _kernel_depth, _kernel_scales,
                        math="K[h, l] = 2 Re sum_n C dB dA^l"),
    "fftconv": Suite("fftconv", "fftconv", _fftconv_specs, _fftconv_fwd, _fftconv_bwd, ("y",),
                     _fftconv_depth, _fftconv_scales,
                     math="y[t] = sum_{s<=t} K0[t-s] u[s] (+ sum_{s>t} K1[s-t-1] u[s]) + D u[t]"),
    "s4d_layer": Suite("s4d_layer", "s4d_layer", _layer_specs, _layer_fwd, _layer_bwd, ("y",),
                       _layer_depth, _layer_scales, math="y = fftconv(u, s4d_kernel(params, L), D)"),
    "neuron": _neuron_suite("neuron", False),
    "pmbc": _neuron_suite("pmbc", True),
    "sdn": Suite("sdn", "sdn", _sdn_specs, _sdn_fwd, _sdn_bwd, ("m", "s"), _sdn_depth,
                 spikes=("s",),
                 math="m = fused SDN(x), s = Theta(m + x - theta); dx = ds g(m + x - theta)"),
    "glu": Suite("glu", "glu", _glu_specs, _glu_fwd, _glu_bwd, ("z",), _mix_depth,
                 math="o = W s + b, z = o[:H] sigmoid(o[H:])"),
    "gsu": Suite("gsu", "gsu", _gsu_specs, _gsu_fwd, _gsu_bwd, ("z",), _mix_depth,
                 math="z = (Ter(x) W + b) (x Ter(W) + c)"),
    "block": Suite("block", "block", _block_specs, _block_fwd, _block_bwd, ("y",), _block_depth,
                   math="one block of DESIGN.md section 8"),
    "model_step": Suite("model_step", "model_step", _model_specs, _model_fwd, _model_bwd,
                        ("loss",), _model_depth, cotangents=_model_cotangents, meta=_model_meta,
                        math="cross-entropy loss, its gradient, one AdamW step"),
}


# ============================================================================================
# Generation
# ============================================================================================


def _perturbed(case, rng):
    """A copy of ``case`` with every float input and parameter moved by a few ulps."""
    data = dict(case.data)
    for p, v in case.data.items():
        if p.startswith(("inputs/", "params/")) and v.dtype.kind == "f":
            data[p] = v + v * (PERTURB * rng.uniform(-1.0, 1.0, size=v.shape))
    return dataclasses.replace(case, data=data)


def _run(suite, case, cot=None, rng=None):
    """``(outputs, grads, diag, cotangents)`` of a valid case (flat dicts)."""
    outputs, state, diag = suite.fwd(case)
    outputs = _flatten(outputs)
    if cot is None:
        if suite.cotangents is not None:
            cot = suite.cotangents(outputs, rng)
        else:
            cot = {k: rng.normal(size=np.shape(outputs[k])) for k in suite.differentiable}
    grads = suite.bwd(case, state, cot)
    return outputs, grads, diag, cot


def _spikes_equal(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def _case_from_spec(suite, cid, spec):
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


def build_case(suite, cid, spec, seed):
    """Run refimpl on one spec: outputs, cotangents, grads, tolerances, margin, result."""
    case = _case_from_spec(suite, cid, spec)
    if spec.result == "invalid":
        case.extra["error"] = _expect_rejection(suite, case)
        return case
    key = [seed, zlib.crc32(suite.name.encode()), int(cid), 1]
    outputs, grads, diag, cot = _run(suite, case, rng=np.random.default_rng(key))
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
            o2, g2, d2, _ = _run(suite, pc, cot=pcot)
            if not _spikes_equal(spikes, d2.get("spikes", {})):
                flipped = True
                continue
            new = {**{"outputs/" + k: v for k, v in o2.items()},
                   **{"grads/" + k: v for k, v in g2.items()}}
            for p, v in base.items():
                if v.dtype.kind == "f":
                    spread[p] = max(spread[p], _maxabs(new[p] - v))
            for m, (h, _) in membranes.items():
                mspread[m] = max(mspread[m], _maxabs(d2["membranes"][m][0] - h))
    depth = suite.depth(case)
    scales = suite.scales(case, outputs, grads, cot) if suite.scales else {}
    floors = suite.floors(case) if suite.floors else {}
    # margin to threshold, and whether rounding may flip a spike
    margin, near = None, flipped
    for m, (h, theta) in membranes.items():
        mg = float(np.min(np.abs(h - theta))) if np.size(h) else math.inf
        bound = max(SAFETY * (_lookup(depth, "outputs/*") * EPS * _maxabs(h) + mspread[m]),
                    floors.get("membrane/" + m, 0.0))
        margin = mg if margin is None else min(margin, mg)
        near = near or (mg <= bound and not spec.exact)
    for p, v in base.items():
        m = dict(case.meta.get(p, {}))
        if p[len("outputs/"):] in suite.spikes and p.startswith("outputs/"):
            m.update(compare="exact", rtol=0.0, atol=0.0, margin=math.inf if margin is None else margin)
        elif v.dtype.kind != "f":
            m.update(compare="exact", rtol=0.0, atol=0.0)
        else:
            scale = scales.get(p, _maxabs(v))
            atol = SAFETY * (_lookup(depth, p) * EPS * scale + spread[p])
            m.update(compare="allclose", rtol=SAFETY * EPS, atol=max(atol, floors.get(p, 0.0)))
        case.meta[p] = m
    case.data.update({"cotangents/" + k: np.asarray(v) for k, v in cot.items()})
    case.data.update(base)
    if margin is not None:
        case.extra["margin"] = margin
    if near and case.result == "valid":
        case.result = "acceptable"
        if "near_threshold" not in case.flags:
            case.flags.append("near_threshold")
    return case


def suite_specs(name, seed=0, size="small"):
    """The case specifications of suite ``name``: list of ``(id, Spec)``."""
    suite = _suite(name)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes are {list(SIZES)}")
    specs = suite.specs(_rngs(seed, name), size)
    return [(f"{i:04d}", s) for i, s in enumerate(specs)]


def build_suite(name, seed=0, size="small", progress=None):
    """All cases of suite ``name`` computed by refimpl: list of :class:`Case`."""
    suite = _suite(name)
    cases = []
    for cid, spec in suite_specs(name, seed, size):
        case = build_case(suite, cid, spec, seed)
        if suite.meta is not None:
            for p, m in suite.meta(case).items():
                case.meta.setdefault(p, {}).update(m)
        cases.append(case)
        if progress:
            progress(1)
    return cases


def _suite(name):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites are {', '.join(SUITES)}")
    return SUITES[name]


def check_fastmath():
    """Golden data is never produced with fast-math kernels (STYLE.md)."""
    if config.FASTMATH:
        raise RuntimeError("refusing to generate golden data with fast-math kernels "
                           "(REFIMPL_FASTMATH is set); unset it and run again")


def generate(out_dir=DEFAULT_DIR, suites=None, seed=0, size="small", overwrite=False,
             progress=None):
    """Write ``<out_dir>/<suite>.h5`` for each suite (all by default).

    Deterministic from ``seed``; float64; atomic writes. Refuses fast-math
    (:func:`check_fastmath`) and, without ``overwrite``, existing files (``FileExistsError``,
    raised before anything is computed). Returns the list of written paths.
    """
    check_fastmath()
    names = list(SUITES) if not suites else list(suites)
    for n in names:
        _suite(n)
    out_dir = Path(out_dir)
    paths = [out_dir / f"{n}.h5" for n in names]
    if not overwrite:
        existing = [str(p) for p in paths if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)} exist(s); pass --overwrite "
                                  f"(overwrite=True) to replace")
    for n, path in zip(names, paths):
        cases = build_suite(n, seed, size, progress)
        write_file(path, n, cases, overwrite=overwrite,
                   attrs={"seed": int(seed), "size": size, "fastmath": bool(config.FASTMATH),
                          "case_count": len(cases)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # the atomic temporary file was created 0600
    return [str(p) for p in paths]


# ============================================================================================
# Comparison: verify (candidate vs golden) and check (refimpl vs committed golden)
# ============================================================================================


def _row(suite, cid, status, tensor="-", index="", value=None, reference=None, bound=None,
         detail=""):
    return {"suite": suite, "case": cid, "status": status, "tensor": tensor, "index": index,
            "value": value, "reference": reference, "bound": bound, "detail": detail}


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


def compare_case(suite, gcase, ccase, skip=()):
    """Rows of one case: PASS, ACCEPTABLE, REJECTED, SKIP or one row per failing tensor."""
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
    if err:
        return [_row(suite, cid, "ERROR", detail=f"valid case rejected by the candidate: {err}")]
    rows, skipped = [], 0
    for path, ref in gcase.data.items():
        if not path.startswith(("outputs/", "grads/")):
            continue
        if _skipped(cid, path, skip):
            skipped += 1
            continue
        if path not in ccase.data:
            rows.append(_row(suite, cid, "MISSING", path, detail="dataset not in candidate"))
            continue
        r = compare_tensor(ccase.data[path], ref, gcase.meta.get(path, {}))
        if r is not None:
            status, index, value, reference, bound, detail = r
            rows.append(_row(suite, cid, status, path, index, value, reference, bound, detail))
    if gcase.result == "acceptable":
        for r in rows:
            if r["status"] == "MISMATCH":
                r["status"] = "ACCEPTABLE"
                r["detail"] = "acceptable case (" + ", ".join(gcase.flags) + "): " + r["detail"]
    if not rows:
        rows.append(_row(suite, cid, "PASS" if not skipped else "SKIP",
                         detail=f"{skipped} dataset(s) skipped" if skipped else ""))
    return rows


def _summary(rows):
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    cases_failed = len({(r["suite"], r["case"]) for r in rows if r["status"] in FAILURES})
    cases = len({(r["suite"], r["case"]) for r in rows})
    return {"cases": cases, "cases_failed": cases_failed, "statuses": counts}


def verify_file(candidate, golden_dir=DEFAULT_DIR, skip=()):
    """Compare one candidate file with ``<golden_dir>/<suite>.h5``; returns a file report dict
    ``{candidate, golden, suite, passed, summary, rows}``. Bad files raise FileFormatError."""
    cf = read_candidate(candidate)
    suite = cf.suite
    gpath = Path(golden_dir) / f"{suite}.h5"
    if not gpath.exists():
        raise FileFormatError(f"{candidate}: suite {suite!r} has no golden file {gpath}")
    gf = read_golden(gpath)
    rows = []
    for cid, gcase in gf.cases.items():
        if any(fnmatch.fnmatchcase(cid, pat) for pat in skip):
            rows.append(_row(suite, cid, "SKIP", detail="case skipped"))
            continue
        rows.extend(compare_case(suite, gcase, cf.cases.get(cid), skip))
    for cid in cf.cases:
        if cid not in gf.cases:
            rows.append(_row(suite, cid, "EXTRA", detail=f"case not in {gpath}"))
    summary = _summary(rows)
    return {"candidate": str(candidate), "golden": str(gpath), "suite": suite,
            "passed": summary["cases_failed"] == 0, "summary": summary, "rows": rows}


def verify(candidates, golden_dir=DEFAULT_DIR, skip=()):
    """Verify candidate files; returns ``{passed, files: [file reports]}``. Never writes."""
    files = [verify_file(c, golden_dir, skip) for c in candidates]
    return {"passed": all(f["passed"] for f in files), "files": files}


def recompute(suite_name, gcase):
    """refimpl's answer to a golden case, from the case's own inputs, params and cotangents:
    a candidate-like :class:`Case` (outputs and grads, or ``error`` for a rejection)."""
    suite = _suite(suite_name)
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
    outputs, grads, _, _ = _run(suite, case, cot=cot)
    case.data.update({"outputs/" + k: v for k, v in outputs.items()})
    case.data.update({"grads/" + k: np.asarray(v) for k, v in grads.items()})
    return case


def _structure(case):
    shapes = {p: tuple(np.shape(v)) for p, v in case.data.items() if p.startswith(("inputs/", "params/"))}
    return case.op, {k: v for k, v in case.config.items()}, shapes


def check(golden_dir=DEFAULT_DIR, suites=None, progress=None):
    """Regression test of refimpl against its committed golden files.

    For every case of ``<golden_dir>/<suite>.h5``: recompute with the installed code from the
    stored inputs, params and cotangents and compare with the stored outputs and grads under the
    stored tolerances (invalid cases must still be rejected); also regenerate the case
    specifications and report ``STALE`` when ids, ops, configs or input shapes no longer match
    the definitions (regenerate with ``refimpl golden generate --overwrite``).
    Returns the same report structure as :func:`verify`.
    """
    names = list(SUITES) if not suites else list(suites)
    files = []
    for name in names:
        _suite(name)
        gpath = Path(golden_dir) / f"{name}.h5"
        gf = read_golden(gpath)
        rows = []
        specs = dict(suite_specs(name, int(gf.attrs.get("seed", 0)), gf.attrs.get("size", "small")))
        for cid in sorted(set(specs) | set(gf.cases)):
            if cid not in gf.cases:
                rows.append(_row(name, cid, "STALE", detail="case defined in refimpl.golden but "
                                 "not in the file: regenerate"))
                continue
            gcase = gf.cases[cid]
            if cid not in specs:
                rows.append(_row(name, cid, "STALE", detail="case in the file but no longer "
                                 "defined: regenerate"))
                continue
            want = _structure(_case_from_spec(SUITES[name], cid, specs[cid]))
            got = _structure(gcase)
            if want != got:
                what = [n for n, a, b in zip(("op", "config", "input shapes"), want, got) if a != b]
                rows.append(_row(name, cid, "STALE", detail=f"{', '.join(what)} differ from the "
                                 "case definition: regenerate"))
                continue
            try:
                mine = recompute(name, gcase)
            except Exception as e:  # a crash of refimpl is a regression, reported as a row
                msg = " ".join(str(e).split())
                rows.append(_row(name, cid, "ERROR", detail=f"refimpl raised "
                                 f"{type(e).__name__}: {msg}"))
                continue
            rows.extend(compare_case(name, gcase, mine))
            if progress:
                progress(1)
        summary = _summary(rows)
        files.append({"candidate": "refimpl (recomputed)", "golden": str(gpath), "suite": name,
                      "passed": summary["cases_failed"] == 0, "summary": summary, "rows": rows})
    return {"passed": all(f["passed"] for f in files), "files": files}


# ============================================================================================
# Text output (returned as strings; the CLI prints them)
# ============================================================================================


def _fmt(v, spec):
    if v is None:
        return ""
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def format_report(report, verbose=False):
    """The verify/check table: one row per passing case, one per failing tensor.

    Columns: suite, case, status, tensor, worst index, value, reference, bound. With
    ``verbose`` a detail column is added. Ends with one summary line per file.
    """
    header = ("suite", "case", "status", "tensor", "worst index", "value", "reference", "bound")
    lines = []
    for f in report["files"]:
        table = [header + (("detail",) if verbose else ())]
        for r in f["rows"]:
            row = (r["suite"], r["case"], r["status"], r["tensor"], r["index"],
                   _fmt(r["value"], ".17g"), _fmt(r["reference"], ".17g"), _fmt(r["bound"], ".3g"))
            if verbose or r["status"] not in ("PASS", "REJECTED", "SKIP"):
                row = row + ((r["detail"],) if verbose else ())
            else:
                row = row + (("",) if verbose else ())
            table.append(row)
        widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
        for i, row in enumerate(table):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        s = f["summary"]
        st = ", ".join(f"{v} {k}" for k, v in sorted(s["statuses"].items()))
        verdict = "PASSED" if f["passed"] else "FAILED"
        lines.append(f"{verdict}: {f['suite']}: {s['cases']} cases, {s['cases_failed']} failed "
                     f"({st}); {f['candidate']} vs {f['golden']}")
        for r in f["rows"]:
            if r["status"] in FAILURES and r["detail"] and not verbose:
                lines.append(f"  {r['case']} {r['status']} {r['tensor']}: {r['detail']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def show(path, case_id=None):
    """A readable listing of a golden or candidate file (one case in detail with ``case_id``)."""
    gf = read_file(path)
    a = gf.attrs
    lines = [f"{gf.path}: suite {gf.suite!r}, schema {a.get('schema')} v{a.get('schema_version')}, "
             f"{len(gf.cases)} cases"]
    prov = [f"{k} {a[k]}" for k in ("generator", "numpy", "numba", "python", "seed", "size",
                                    "created") if k in a]
    if prov:
        lines.append("  " + ", ".join(prov))
    if gf.suite in SUITES and SUITES[gf.suite].math:
        lines.append("  math: " + SUITES[gf.suite].math)
    counts = {}
    for c in gf.cases.values():
        counts[c.result] = counts.get(c.result, 0) + 1
    lines.append("  results: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    lines.append("")
    if case_id is None:
        table = [("id", "op", "result", "margin", "flags", "comment")]
        for c in gf.cases.values():
            mg = c.extra.get("margin")
            table.append((c.id, c.op, c.result, "" if mg is None else f"{mg:.3g}",
                          ",".join(c.flags) or "-", c.comment))
        widths = [max(len(r[i]) for r in table) for i in range(5)]
        for i, r in enumerate(table):
            lines.append("  ".join(x.ljust(w) for x, w in zip(r[:5], widths)) + "  " + r[5])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  -------")
        return "\n".join(lines) + "\n"
    if case_id not in gf.cases:
        raise KeyError(f"{gf.path}: no case {case_id!r}; cases are {', '.join(gf.cases)}")
    c = gf.cases[case_id]
    lines += [f"case {c.id}: op {c.op}, result {c.result}",
              f"  comment: {c.comment}", f"  flags: {', '.join(c.flags) or '-'}"]
    for k, v in {**c.config, **c.extra}.items():
        lines.append(f"  {k} = {v!r}")
    table = [("dataset", "shape", "dtype", "compare", "rtol", "atol", "other attrs")]
    for p, v in c.data.items():
        m = c.meta.get(p, {})
        other = ", ".join(f"{k}={m[k]!r}" for k in m if k not in ("compare", "rtol", "atol"))
        table.append((p, str(tuple(np.shape(v))), str(np.asarray(v).dtype), m.get("compare", ""),
                      _fmt(m.get("rtol"), ".3g"), _fmt(m.get("atol"), ".3g"), other))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines.append("")
    for i, r in enumerate(table):
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"
