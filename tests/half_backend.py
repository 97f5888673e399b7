"""A NumPy backend emulating 16-bit storage with float32 compute (issue 21).

What a GPU kernel that ships bfloat16 or float16 does, and what ``refimpl golden verify
--precision bfloat16|float16`` declares as its compute model: every input, parameter and
cotangent is read rounded to the 16-bit format (round to nearest, ties to even), everything is
computed in float32 / complex64 (configuration scalars such as ``tau``, ``theta`` as float32),
and every output and gradient is rounded to the 16-bit format once, at the op's boundary
(composite suites such as ``block`` keep their intermediates in float32). bfloat16 values are
written as float32 datasets (NumPy has no bfloat16), float16 values as float16 datasets;
integer datasets (counters) stay int64.

The ops are those of ``tests/float32_backend.py`` (:func:`float32_backend.compute`: its ops in
the op contract's terms, and the model-level suites; its :func:`float32_backend.impl` switches
select the variants and plant the bugs); this module adds the storage format: :func:`round_to`
when a case is read and when the candidate is written. The rounding is implemented here from
the bits (bfloat16: the float32 value rounded to its upper 16 bits, nearest even, as
PyTorch's ``c10::BFloat16``; float16: NumPy's ``float16`` cast), independently of refimpl.

``fmt`` is one of :data:`PROFILES`: ``"float64"`` (the same code in float64, no rounding),
``"float32"`` (the float32 backend), ``"bfloat16"``, ``"float16"``.

Variants (:data:`VARIANTS`, all correct): ``fft`` (the FFT convolution, the default),
``direct`` (time-domain convolution, sequential sum over the lags), ``order`` (every
contraction and reduction summed in a random order, seeded), ``chunked`` (the neuron and the
causal S4D forward chunk by chunk, 5 + 1 + 10 + 16 + ..., carrying their state), ``jitter``
(every inexact intermediate moved by -1, 0 or +1 float32 ulp at random, seeded) and
``rounding`` (a random rounding variant per seed: random order and jitter, direct or FFT
convolution and chunked or whole by the seed). Bugs: ``float32_backend.BUGS`` (planted bugs)
and ``float32_backend.GARBAGE_SPIKES`` (the block's internal spikes inverted / halved).
"""
import os

import h5py
import numpy as np

from refimpl.golden import golden_path

import float32_backend as fb

FORMATS = ("bfloat16", "float16")
PROFILES = ("float64", "float32") + FORMATS
SUITES = fb.SUITES
VARIANTS = ("fft", "direct", "order", "chunked", "jitter", "rounding")
SEEDED = ("order", "jitter", "rounding")
CHUNKS = (5, 1, 10, 16)
#: the dtype of the float datasets written for each format
WRITE_DTYPE = {"float64": np.float64, "float32": np.float32, "bfloat16": np.float32,
               "float16": np.float16}


def round_bf16(a):
    """bfloat16 values (as float32) of ``a``: rounded to float32 first, then to the upper 16
    bits of its bit pattern, to nearest, ties to even (``c10::BFloat16``'s
    ``round_to_nearest_even``): overflow gives +-inf, a NaN stays a NaN."""
    x = np.asarray(a, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> np.uint64(16)) & np.uint64(1)
    r = ((bits + np.uint64(0x7FFF) + lsb) >> np.uint64(16)) << np.uint64(16)
    out = r.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), out).astype(np.float32)


def round_f16(a):
    """float16 values (as float32) of ``a``: NumPy's cast, to nearest, ties to even, directly
    from float64 (no double rounding); beyond 65520 +-inf."""
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=np.float64).astype(np.float16).astype(np.float32)


def round_to(a, fmt):
    """``a`` (float) rounded to ``fmt``, in the compute type (float64 for ``float64``, else
    float32 holding the format's values)."""
    if fmt == "float64":
        return np.asarray(a, dtype=np.float64)
    if fmt == "float32":
        return np.asarray(a, dtype=np.float32)
    if fmt == "bfloat16":
        return round_bf16(a)
    if fmt == "float16":
        return round_f16(a)
    raise ValueError(f"unknown format {fmt!r}")


def impl_options(variant, seed=None):
    """Keyword arguments of :func:`float32_backend.impl` for ``variant`` (and ``seed``)."""
    if variant in (None, "fft"):
        return {}
    if variant == "direct":
        return {"conv": "direct"}
    if variant == "chunked":
        return {"chunks": CHUNKS}
    if variant not in SEEDED:
        raise ValueError(f"unknown variant {variant!r}")
    if seed is None:
        raise ValueError(f"variant {variant!r} needs a seed")
    ss = np.random.SeedSequence([21, int(seed)])
    order, ulp, pick = (np.random.default_rng(s) for s in ss.spawn(3))
    if variant == "order":
        return {"order": order}
    if variant == "jitter":
        return {"ulp": ulp}
    # rounding: another summation order and rounding everywhere, and the seed picks the
    # convolution and the chunking (5 random chunk lengths 1..40, cycled)
    kw = {"order": order, "ulp": ulp, "conv": "direct" if pick.random() < 0.5 else "fft"}
    if pick.random() < 0.5:
        kw["chunks"] = tuple(int(c) for c in pick.integers(1, 41, size=5))
    return kw


class _Dataset:
    """A read-only snapshot of an h5py dataset (``ds[()]``, ``ds.dtype``, ``ds.attrs``)."""

    def __init__(self, ds):
        self.array = ds[()]
        if isinstance(self.array, np.ndarray):
            self.array.setflags(write=False)
        self.attrs = dict(ds.attrs)
        self.dtype = ds.dtype

    def __getitem__(self, key):
        return self.array[key]


class _Group:
    """A read-only snapshot of an h5py group: ``attrs``, children by name or by path."""

    def __init__(self, grp):
        self.attrs = dict(grp.attrs)
        self._items = {n: (_Group(o) if isinstance(o, h5py.Group) else _Dataset(o))
                       for n, o in grp.items()}

    def __getitem__(self, path):
        node = self
        for part in path.split("/"):
            node = node._items[part]
        return node

    def __contains__(self, path):
        try:
            self[path]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self):
        return iter(self._items)

    def items(self):
        return self._items.items()


_SNAPSHOTS = {}


def golden_cases(suite):
    """``{case id: snapshot of /cases/<id>}`` of the committed golden file (memoised by path,
    size and modification time: each case is read from disk once per process)."""
    path = golden_path(suite)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SNAPSHOTS:
        with h5py.File(path, "r") as gold:
            _SNAPSHOTS[key] = {cid: _Group(g) for cid, g in gold["cases"].items()}
    return _SNAPSHOTS[key]


def compute_case(suite, gcase, fmt, bug=None, variant=None, seed=None):
    """``(outputs, grads)`` of one golden h5 group as the backend writes them (floats rounded
    to ``fmt``, integers int64), or raises :class:`float32_backend.Reject`."""
    dtype = np.float64 if fmt == "float64" else np.float32
    with fb.impl(dtype=dtype, bug=bug, **impl_options(variant, seed)):
        case = fb.Case(gcase, read=lambda v: round_to(v, fmt).astype(dtype))
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            outputs, grads = fb.compute(suite, case)

    def store(arr):
        arr = np.asarray(arr)
        if arr.dtype.kind in "iub":
            return np.asarray(arr, dtype=np.int64)
        return round_to(arr, fmt)  # once, at the boundary

    return ({k: store(v) for k, v in outputs.items()}, {k: store(v) for k, v in grads.items()})


_CACHE = {}


def compute_suite(suite, fmt, bug=None, variant=None, seed=None):
    """``{case id: (outputs, grads) or rejection message}`` for the committed golden file,
    memoised per (suite, format, bug, variant, seed)."""
    cases = golden_cases(suite)
    key = (id(cases), suite, fmt, bug, variant, seed)
    if key not in _CACHE:
        res = {}
        for cid, gcase in cases.items():
            try:
                res[cid] = compute_case(suite, gcase, fmt, bug, variant, seed)
            except fb.Reject as e:
                res[cid] = str(e)
        _CACHE[key] = res
    return _CACHE[key]


def forget(**match):
    """Drop the memoised results whose bug / variant / seed equal ``match`` (memory)."""
    names = ("path", "suite", "fmt", "bug", "variant", "seed")
    for key in [k for k in _CACHE if all(dict(zip(names, k))[n] == v for n, v in match.items())]:
        del _CACHE[key]


def write_candidate(suite, path, fmt, bug=None, variant=None, seed=None, dtype=None,
                    corrupt=None):
    """Write the candidate of ``suite`` computed at ``fmt`` to ``path`` (returned).

    ``bug``: a key of ``float32_backend.BUGS`` or ``GARBAGE_SPIKES``; ``variant``, ``seed``: see
    :data:`VARIANTS`; ``dtype``: the float datasets' dtype (default :data:`WRITE_DTYPE`);
    ``corrupt(case_id, "outputs/<name>", array) -> array``: applied to every float or integer
    dataset before it is written (garbage candidates)."""
    if bug is not None and bug not in fb.BUGS and bug not in fb.GARBAGE_SPIKES:
        raise ValueError(f"unknown bug {bug!r}")
    dtype = WRITE_DTYPE[fmt] if dtype is None else dtype
    results = compute_suite(suite, fmt, bug, variant, seed)
    label = " ".join(f"{k}={v}" for k, v in (("bug", bug), ("variant", variant), ("seed", seed))
                     if v is not None)

    def store(cid, dpath, arr):
        arr = np.array(arr)
        if corrupt is not None:
            arr = np.asarray(corrupt(cid, dpath, arr))
        return arr.astype(np.int64 if arr.dtype.kind in "iub" else dtype)
    return fb.write_results(path, suite, results, golden_cases(suite),
                            f"tests/half_backend.py {fmt} {label}".strip(), store)


if __name__ == "__main__":  # python tests/half_backend.py OUTDIR FMT [VARIANT [SEED]]
    import sys
    from pathlib import Path
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    fmt_ = sys.argv[2]
    var = sys.argv[3] if len(sys.argv) > 3 else None
    sd = int(sys.argv[4]) if len(sys.argv) > 4 else None
    for s in SUITES:
        print(write_candidate(s, out / f"{s}.h5", fmt_, variant=var, seed=sd))
