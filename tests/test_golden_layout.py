"""The storage layout of refimpl's HDF5 files (issue 22, :mod:`refimpl.h5io`): small per dataset,
the same content as before for every reader, and files in the earlier layout still read."""
import h5py
import numpy as np
import pytest

from refimpl import golden as G
from refimpl import h5io
from refimpl.golden.generate import repack
from refimpl.h5io import atomic_h5, read_tree, write_tree

COMMITTED = G.DEFAULT_DIR

#: Bytes of HDF5 structure per dataset of the committed set, beyond the array data. Measured 490
#: (a ~256-byte dataset header, about 60 bytes for each of the six tolerance attributes most
#: outputs and grads carry, a share of the group headers); the earlier layout measured 907.
COMMITTED_BYTES_PER_DATASET = 600
#: Bytes one more small output (4 float64, under the compression threshold) with its six
#: tolerance attributes adds to a golden file, beyond its 32 bytes of data: 524 measured, 669 in
#: the earlier layout.
MARGINAL_BYTES_PER_DATASET = 600


def _value(v):
    """An attribute or dataset value as something ``==`` compares bit for bit."""
    if isinstance(v, np.ndarray) and v.dtype.kind == "O":
        return "O", v.shape, tuple(x.decode() if isinstance(x, bytes) else x for x in v.ravel())
    if isinstance(v, (np.ndarray, np.generic)):
        return v.dtype.str, v.shape, v.tobytes()
    return type(v).__name__, v


def content(path):
    """Everything a reader sees in an HDF5 file, the storage layout aside: every group and
    dataset by path, dataset dtypes, shapes and bytes, and every attribute with its HDF5 type
    (numeric type, or string encoding) and value."""
    def attrs(o):
        out = {}
        for k in o.attrs:
            t = o.attrs.get_id(k).dtype
            out[k] = (t.str, repr(h5py.check_string_dtype(t)), _value(o.attrs[k]))
        return out

    objs = {}
    with h5py.File(path, "r") as f:
        objs["/"] = ("group", attrs(f))

        def visit(name, o):
            if isinstance(o, h5py.Dataset):
                objs[name] = ("dataset", _value(o[()]), attrs(o))
            else:
                objs[name] = ("group", attrs(o))

        f.visititems(visit)
    return objs


def legacy_copy(src, dst):
    """``src`` written again as refimpl wrote every HDF5 file before issue 22: ``h5py.File(path,
    "w")`` with h5py's defaults (HDF5's earliest formats: symbol-table groups, version-1 object
    headers) and ``create_dataset(name, data=...)`` (contiguous), attributes with their types."""
    def copy_attrs(s, d):
        for k in s.attrs:
            d.attrs.create(k, s.attrs[k], dtype=s.attrs.get_id(k).dtype)

    def copy(s, d):
        copy_attrs(s, d)
        for k, o in s.items():
            if isinstance(o, h5py.Group):
                copy(o, d.create_group(k))
            else:
                copy_attrs(o, d.create_dataset(k, data=o[()]))

    with h5py.File(src, "r") as fs, h5py.File(dst, "w") as fd:
        copy(fs, fd)
    return dst


def datasets(f):
    found = []
    f.visititems(lambda _, o: found.append(o) if isinstance(o, h5py.Dataset) else None)
    return found


def test_committed_set_is_small_per_dataset():
    size = n = data = 0
    for p in sorted(COMMITTED.glob("*.h5")):
        size += p.stat().st_size
        with h5py.File(p, "r") as f:
            assert f.id.get_create_plist().get_version()[0] >= 2, f"{p.name}: earliest formats"
            ds = datasets(f)
            n += len(ds)
            data += sum(d.nbytes for d in ds)
    assert n > 1000
    per = (size - data) / n
    assert per < COMMITTED_BYTES_PER_DATASET, (
        f"{per:.0f} bytes of HDF5 structure per dataset: write with refimpl.h5io's layout "
        f"(refimpl.golden.generate.repack rewrites a file without recomputing it)")


def test_one_more_dataset_costs_little(tmp_path):
    rng = np.random.default_rng(0)

    def size(n):
        data = {f"outputs/y{i:04d}": rng.normal(size=4) for i in range(n)}  # (4,) 32 bytes
        meta = {p: dict(compare="allclose", rtol=16 * G.EPS, atol=1e-13, depth=64, scale=1.0,
                        spread=0.0) for p in data}
        path = tmp_path / f"{n}.h5"
        G.write_file(path, "glu", [G.Case(id="0000", op="glu", data=data, meta=meta)])
        return path.stat().st_size

    per = (size(300) - size(100)) / 200 - 32
    assert per < MARGINAL_BYTES_PER_DATASET


@pytest.mark.parametrize("suite", ["sdn", "model_stream"])  # spikes; nested groups and an
def test_earlier_layout_reads_verifies_and_repacks(suite, tmp_path):  # array attribute
    committed = COMMITTED / f"{suite}.h5"
    old = tmp_path / "old" / f"{suite}.h5"
    old.parent.mkdir()
    legacy_copy(committed, old)
    with h5py.File(old, "r") as f:  # really the earlier layout
        assert f.id.get_create_plist().get_version()[0] == 0
        assert all(d.chunks is None for d in datasets(f))
    assert content(old) == content(committed)
    # the readers see the same cases
    a, b = G.read_golden(old), G.read_golden(committed)
    assert list(a.cases) == list(b.cases) and a.attrs == b.attrs
    for cid, ca in a.cases.items():
        cb = b.cases[cid]
        assert (ca.op, ca.comment, ca.flags, ca.result) == (cb.op, cb.comment, cb.flags, cb.result)
        assert ({k: _value(v) for k, v in ca.config.items()}
                == {k: _value(v) for k, v in cb.config.items()})
        assert ca.extra == cb.extra
        assert ca.meta == cb.meta and ca.data.keys() == cb.data.keys()
        assert all(_value(ca.data[p]) == _value(cb.data[p]) for p in ca.data)
    # each layout verifies against the other, as candidate and as golden file
    assert G.verify([old], COMMITTED)["passed"]
    assert G.verify([committed], old.parent)["passed"]
    # repack: the same content in the current layout, smaller
    new = repack(old, tmp_path / f"{suite}.h5")
    assert content(new) == content(committed)
    assert (tmp_path / f"{suite}.h5").stat().st_size < old.stat().st_size


def test_write_tree_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(1)
    tree = {
        "x": rng.normal(size=(3, 5, 7)),                         # compressed, one chunk
        "special": np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324] * 8),
        "spikes": (rng.uniform(size=(2, 64)) < 0.3).astype(np.float64),
        "counts": rng.integers(0, 9, size=(4, 33)),                # int64
        "mask": rng.uniform(size=300) < 0.5,                       # bool
        "big": rng.normal(size=(300, 600)),                       # 1.4 MiB: several chunks
        "small": rng.normal(size=4),                               # contiguous
        "scalar": np.float64(0.1),
        "empty": np.zeros((0, 3)),
        "nested": {"ü": np.arange(3.0)},
    }
    path = tmp_path / "t.h5"
    with atomic_h5(path, "test", 1) as f:
        write_tree(f.create_group("t"), tree)
    with h5py.File(path, "r") as f:
        back = read_tree(f["t"])
        g = f["t"]
        for k in ("x", "special", "spikes", "counts", "mask"):
            assert g[k].compression == "gzip" and g[k].chunks == g[k].shape, k
        assert g["big"].compression == "gzip" and g["big"].chunks != g["big"].shape
        for k in ("small", "scalar", "empty"):
            assert g[k].compression is None and g[k].chunks is None, k

    def flat(t):
        return {k: (flat(v) if isinstance(v, dict) else _value(np.asarray(v)))
                for k, v in t.items()}

    assert flat(back) == flat(tree)


def test_attributes_stay_in_the_object_header(tmp_path):
    """HDF5 moves more than 8 attributes of an object into a fractal heap and a B-tree (about
    1.4 KiB more per object); golden case groups have up to 46, the root group 13."""
    path = tmp_path / "a.h5"
    with atomic_h5(path, "test", 1, attrs={f"r{i}": i for i in range(20)}) as f:
        g = f.create_group("cases/0000")
        g.attrs.update({f"c{i}": float(i) for i in range(50)})
        d = h5io.create_dataset(g, "x", np.arange(100.0))
        d.attrs.update({f"d{i}": i for i in range(12)})
    with h5py.File(path, "r") as f:
        for o in (f, f["cases"], f["cases/0000"], f["cases/0000/x"]):
            info = h5py.h5o.get_info(o.id)
            assert info.num_attrs == len(o.attrs)
            assert info.meta_size.attr.index_size == info.meta_size.attr.heap_size == 0, o.name
