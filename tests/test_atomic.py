"""refimpl.atomic (the one atomic-write helper) and refimpl.table (the one table renderer)."""
import json
import os
import stat

import h5py
import pytest

from refimpl.atomic import atomic_path, atomic_write_json, atomic_write_text, check_destination
from refimpl.h5io import atomic_h5
from refimpl.table import render_table


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    """mkstemp alone makes 0600 files; every writer must give 0666 & ~umask like open()."""
    umask(mask)
    want = 0o666 & ~mask
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    with atomic_h5(tmp_path / "a.h5", "test", 1):
        pass
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: a plain open()
        f.write("x")
    assert _mode(tmp_path / "plain.txt") == want
    for name in ("a.txt", "a.json", "a.h5"):
        assert _mode(tmp_path / name) == want, name


def test_failure_leaves_the_destination_untouched_and_no_temporary(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            with open(tmp, "w") as f:
                f.write("half-writ")
            raise RuntimeError("interrupted")
    assert dest.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_interrupt_during_hdf5_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_h5(tmp_path / "x.h5", "test", 1) as f:
            f["a"] = [1.0, 2.0]
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_unserialisable_json_raises_before_creating_anything(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "r.json", {"a": object()})
    assert os.listdir(tmp_path) == []


def test_json_round_trip_and_replace(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": [1, 2]})
    atomic_write_json(p, {"b": 3})
    assert json.loads(p.read_text()) == {"b": 3}
    assert p.read_text().endswith("\n")


def test_no_overwrite_without_permission(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("keep")
    with pytest.raises(FileExistsError, match=r"a.txt exists; pass overwrite=True"):
        atomic_write_text(p, "new", overwrite=False)
    with pytest.raises(FileExistsError):
        with atomic_h5(p, "test", 1):
            pass
    assert p.read_text() == "keep"


def test_check_destination_refuses_folders_and_inputs(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        check_destination(tmp_path)
    src = tmp_path / "in.h5"
    src.write_text("x")
    with pytest.raises(ValueError, match="it is an input of this command"):
        check_destination(src, overwrite=True, protected=[src])
    assert check_destination(tmp_path / "new.h5") == str(tmp_path / "new.h5")


def test_hdf5_carries_schema_and_provenance(tmp_path):
    with atomic_h5(tmp_path / "x.h5", "my-schema", 3, attrs={"extra": 1}):
        pass
    with h5py.File(tmp_path / "x.h5") as f:
        assert f.attrs["schema"] == "my-schema" and f.attrs["schema_version"] == 3
        assert f.attrs["extra"] == 1 and "generator" in f.attrs


def test_render_table():
    text = render_table(("name", "n"), [("a", 1), ("longer", 22)])
    assert text.splitlines() == ["name    n", "------  --", "a       1", "longer  22"]
    assert render_table(("x",), [], rule=False) == "x"
