"""Edge rules of the precision profiles: values beyond a format's range, structurally zero
tensors (golden/SCHEMA.md, "Precision profiles")."""
import shutil

import h5py
import numpy as np

from refimpl import golden as G


def _rows(report):
    return [r for f in report["files"] for r in f["rows"]]


def _copy(tmp_path, suite):
    path = tmp_path / f"{suite}.h5"
    shutil.copy(G.golden_path(suite), path)
    return path


def test_a_case_beyond_float16_range_is_untestable_not_an_error(tmp_path):
    """The neuron suite's saturation case holds inputs beyond 65504: a float16 backend cannot
    even read them, so rejecting it is no error at float16 (but is one at float64)."""
    path = _copy(tmp_path, "neuron")
    with h5py.File(path, "r+") as f:
        big = [cid for cid, c in f["cases"].items() if c.attrs["result"] == "valid"
               and np.abs(c["inputs/x"][()]).max() > np.finfo(np.float16).max]
        assert big, "the committed neuron suite has a case beyond float16's range"
        for cid in big:
            f["cases"][cid].attrs["error"] = "x overflows float16"
    rows16 = _rows(G.verify([path], precision="float16"))
    for cid in big:
        mine = [r for r in rows16 if r["case"] == cid]
        assert [r["status"] for r in mine] == ["UNTESTABLE"], mine
        assert "beyond the largest float16" in mine[0]["detail"]
    rows64 = _rows(G.verify([path], precision="float64"))
    assert {r["status"] for r in rows64 if r["case"] in big} == {"ERROR"}


def test_a_structurally_zero_tensor_is_untestable_under_a_reduced_profile(tmp_path):
    """A reference that is exactly zero with a positive bound cannot see an error smaller than
    the bound: UNTESTABLE, not PASS."""
    path = _copy(tmp_path, "glu")
    with h5py.File(path, "r+") as f:
        case = f["cases/0000"]
        case["grads/b"][...] = 0.0  # make the reference zero; the candidate is the same file
    gold = tmp_path / "gold"
    gold.mkdir()
    shutil.copy(path, gold / "glu.h5")
    rows = _rows(G.verify([path], golden_dir=gold, precision="float32"))
    mine = [r for r in rows if r["case"] == "0000"]
    assert any(r["status"] == "UNTESTABLE" and r["tensor"] == "grads/b" for r in mine), mine
