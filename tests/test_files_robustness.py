"""Files that are damaged, odd or in the wrong place (issue 11, items 2, 3 and 6).

Every CLI failure here must be one line on stderr naming the problem and the fix, a nonzero exit
status, no traceback, and the affected folder exactly as it was (names and contents).
"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from refimpl import golden as G
from refimpl.atomic import (atomic_path, atomic_write_json, check_destination,
                            remove_stale_temporaries)
from refimpl.cli.main import main
from refimpl.h5io import FileFormatError, atomic_h5, open_h5

COMMITTED = G.DEFAULT_DIR


def snapshot(*folders):
    """Names and contents of every file under ``folders`` (hidden ones included)."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    out[p] = f.read()
    return out


def one_line_error(r, *words):
    """A CliRunner result that failed cleanly: exit != 0, no traceback, one stderr line."""
    assert r.exit_code != 0, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _golden_like(path, schema="refimpl-golden", version=1):
    with atomic_h5(path, schema, version, attrs={"suite": "fftconv"}) as f:
        f.create_group("cases")


# ----------------------------------------------------------------------------------------------
# Item 2: unreadable attributes, odd schema_version values
# ----------------------------------------------------------------------------------------------

def _flip_schema_attribute(src, dst):
    """Copy ``src`` to ``dst`` with one byte of the ``schema`` attribute message flipped such
    that the file still opens but reading the attribute fails (searched, not hard-coded: the
    offsets past the attribute name are the datatype / global-heap reference)."""
    raw = open(src, "rb").read()
    at = raw.find(b"schema\0")
    assert at > 0
    for off in range(at + 32, at + 64):
        b = bytearray(raw)
        b[off] ^= 0xFF
        with open(dst, "wb") as f:
            f.write(b)
        try:
            f = h5py.File(dst, "r")
        except OSError:
            continue
        try:
            f.attrs.get("schema")
            f.attrs.get("schema_version")
        except Exception:
            return
        finally:
            try:
                f.close()
            except Exception:
                pass
    pytest.skip("no byte flip of this HDF5 layout makes the schema attribute unreadable")


def test_unreadable_schema_attribute_is_a_one_line_file_format_error(tmp_path):
    good = tmp_path / "good.h5"
    _golden_like(good)
    bad = tmp_path / "bad.h5"
    _flip_schema_attribute(good, bad)
    with pytest.raises(FileFormatError) as e:
        open_h5(bad, "refimpl-golden")
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "root attributes cannot be read" in msg
    with pytest.raises(FileFormatError):
        G.read_golden(bad)


def test_cli_show_and_verify_with_a_bit_flipped_file(tmp_path):
    """``golden show FILE`` and ``golden verify --golden DIR`` whose golden file is damaged."""
    work = tmp_path / "work"
    gdir = tmp_path / "gold"
    work.mkdir()
    gdir.mkdir()
    src = COMMITTED / "glu.h5"
    _flip_schema_attribute(src, gdir / "glu.h5")
    shutil.copy(src, work / "cand.h5")
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["golden", "show", str(gdir / "glu.h5")])
    one_line_error(r, str(gdir / "glu.h5"), "corrupted")
    r = CliRunner().invoke(main, ["golden", "verify", str(work / "cand.h5"), "--golden",
                                  str(gdir)])
    one_line_error(r, "glu.h5", "corrupted")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("version", [np.array([1]), np.array([1, 1]), "1", b"1", 1.5, 1.0,
                                     True, np.float64(1.0), -1, 2])
def test_schema_version_must_be_a_supported_integer(tmp_path, version):
    """``"1"`` and ``1.5`` (or an array) are not version 1; each gives one line naming it."""
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "refimpl-golden"
        f.attrs["schema_version"] = version
    with pytest.raises(FileFormatError) as e:
        open_h5(path, "refimpl-golden")
    msg = str(e.value)
    assert "\n" not in msg and "schema_version" in msg and "integer" in msg
    r = CliRunner().invoke(main, ["golden", "show", str(path)])
    one_line_error(r, "schema_version")


@pytest.mark.parametrize("version", [1, np.int64(1), np.int32(1), np.uint8(1), np.array(1)])
def test_schema_version_integers_of_any_width_are_accepted(tmp_path, version):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "refimpl-golden"
        f.attrs["schema_version"] = version
    open_h5(path, "refimpl-golden").close()


def test_cli_verify_json_into_an_impossible_place_fails_before_any_work(tmp_path):
    cand = tmp_path / "cand.h5"
    shutil.copy(COMMITTED / "glu.h5", cand)
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["golden", "verify", str(cand), "--json",
                                  str(tmp_path / "afile" / "sub" / "r.json")])
    one_line_error(r, "--json", "not a folder", "choose another path")
    assert r.stdout == ""  # refused before the comparison ran
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any folder")
def test_cli_verify_json_into_a_read_only_folder(tmp_path):
    cand = tmp_path / "cand.h5"
    shutil.copy(COMMITTED / "glu.h5", cand)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = CliRunner().invoke(main, ["golden", "verify", str(cand), "--json",
                                      str(ro / "r.json")])
        one_line_error(r, "not writable")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_cli_generate_into_an_impossible_folder_fails_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "glu", "--out",
                                  str(tmp_path / "afile" / "sub")])
    one_line_error(r, "not a folder", "another path")
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "glu", "--out",
                                  str(tmp_path / "afile")])  # click's own usage error
    assert r.exit_code == 2 and "is a file" in r.stderr and "Traceback" not in r.output
    with pytest.raises(NotADirectoryError, match="not a folder"):
        G.generate(tmp_path / "afile", ["glu"])
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Item 3: outputs never overwrite the inputs or the golden set
# ----------------------------------------------------------------------------------------------

def test_verify_json_never_replaces_a_golden_file_or_a_candidate(tmp_path):
    cand = tmp_path / "cand.h5"
    shutil.copy(COMMITTED / "glu.h5", cand)
    gdir = tmp_path / "gold"
    gdir.mkdir()
    shutil.copy(COMMITTED / "glu.h5", gdir / "glu.h5")
    before = snapshot(tmp_path, COMMITTED)
    cases = [
        (COMMITTED / "fftconv.h5", "inside"),            # the installed golden set
        (COMMITTED / "new_report.json", "inside"),       # even a new file in it
        (cand, "input of this command"),                 # the candidate itself
        (gdir / "glu.h5", "inside"),                     # the --golden folder's file
        (gdir / "r.json", "inside"),
    ]
    for dest, why in cases:
        args = ["golden", "verify", str(cand), "--json", str(dest)]
        if dest.parent == gdir:
            args += ["--golden", str(gdir)]
        r = CliRunner().invoke(main, args)
        one_line_error(r, "--json", why, "choose")
        assert r.stdout == ""
    # a second candidate is an input too
    other = tmp_path / "other.h5"
    shutil.copy(COMMITTED / "gsu.h5", other)
    before = snapshot(tmp_path, COMMITTED)
    r = CliRunner().invoke(main, ["golden", "verify", str(cand), str(other), "--json",
                                  str(other)])
    one_line_error(r, "input of this command")
    r = CliRunner().invoke(main, ["golden", "check", "--suite", "glu", "--json",
                                  str(COMMITTED / "glu.h5")])
    one_line_error(r, "inside")
    assert snapshot(tmp_path, COMMITTED) == before


def test_verify_json_replaces_a_report_but_not_another_file(tmp_path):
    cand = tmp_path / "cand.h5"
    shutil.copy(COMMITTED / "glu.h5", cand)
    report = tmp_path / "r.json"
    for _ in range(2):  # an existing JSON report is replaced
        r = CliRunner().invoke(main, ["golden", "verify", str(cand), "--json", str(report)])
        assert r.exit_code == 0, r.output
    (tmp_path / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["golden", "verify", str(cand), "--json",
                                  str(tmp_path / "notes.txt")])
    one_line_error(r, "not a JSON report", "choose another path")
    assert snapshot(tmp_path) == before


def test_check_destination_protects_folders_and_inputs(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "in.h5").write_text("x")
    with pytest.raises(ValueError, match="inside"):
        check_destination(tmp_path / "g" / "deep" / "x.json", True, protected=[tmp_path / "g"])
    with pytest.raises(ValueError, match="input"):
        check_destination(tmp_path / "in.h5", True, protected=[tmp_path / "in.h5"])
    with pytest.raises(ValueError, match="input"):  # through a symlink
        os.symlink(tmp_path / "in.h5", tmp_path / "link.h5")
        check_destination(tmp_path / "link.h5", True, protected=[tmp_path / "in.h5"])
    assert check_destination(tmp_path / "out.json", protected=[tmp_path / "g"]) == str(
        tmp_path / "out.json")


# ----------------------------------------------------------------------------------------------
# Item 6: temporaries of killed writers; golden generate continues after a kill
# ----------------------------------------------------------------------------------------------

def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_names_carry_the_pid(tmp_path):
    with atomic_path(tmp_path / "x.txt") as tmp:
        assert os.path.basename(tmp).startswith(f".x.txt.{os.getpid()}.")
        assert tmp.endswith(".tmp")


def test_a_new_write_removes_stale_temporaries_of_dead_writers_only(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".x.h5.{dead}.abc123.tmp"
    mine = tmp_path / f".x.h5.{os.getpid()}.zzz.tmp"      # this process: alive
    parent = tmp_path / f".x.h5.{live}.def456.tmp"       # a live process (concurrent writer)
    other = tmp_path / f".y.h5.{dead}.abc123.tmp"        # another destination
    legacy = tmp_path / ".x.h5.k2j3h4.tmp"               # no PID: owner unknown
    for p in (stale, mine, parent, other, legacy):
        p.write_text("half")
    atomic_write_json(tmp_path / "x.h5", {"a": 1})
    left = sorted(os.listdir(tmp_path))
    assert stale.name not in left
    assert {mine.name, parent.name, other.name, legacy.name, "x.h5"} == set(left)
    assert remove_stale_temporaries(tmp_path / "y.h5") == [str(other)]


KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from refimpl.h5io import atomic_h5
    with atomic_h5(sys.argv[1], "refimpl-golden", 1, overwrite=True) as f:
        f["a"] = [1.0, 2.0]
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_golden_generate_after_a_kill_mid_write_leaves_no_temporary(tmp_path):
    """A SIGKILL during the write of glu.h5 leaves its hidden temporary; ``--missing-only``
    then writes only the absent suites, removes the stale temporary, and the result equals an
    uninterrupted run (every dataset and case attribute; provenance times aside)."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "gsu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    gsu_before = (out / "gsu.h5").read_bytes()
    p = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(out / "glu.h5")])
    assert p.returncode == -signal.SIGKILL
    assert [n for n in os.listdir(out) if n.endswith(".tmp")], "the kill left no temporary"
    assert not (out / "glu.h5").exists()
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "gsu", "--suite", "glu",
                                  "--out", str(out), "--missing-only"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["glu.h5", "gsu.h5"]
    assert (out / "gsu.h5").read_bytes() == gsu_before  # present suites are not rewritten
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "glu", "--out", str(ref)])
    assert r.exit_code == 0, r.output
    a, b = G.read_golden(out / "glu.h5"), G.read_golden(ref / "glu.h5")
    assert list(a.cases) == list(b.cases)
    for cid in a.cases:
        ca, cb = a.cases[cid], b.cases[cid]
        assert ca.config == cb.config and ca.extra == cb.extra and ca.meta == cb.meta
        assert set(ca.data) == set(cb.data)
        for k in ca.data:
            np.testing.assert_array_equal(ca.data[k], cb.data[k])
    # nothing left to do
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "gsu", "--suite", "glu",
                                  "--out", str(out), "--missing-only"])
    assert r.exit_code == 0 and "nothing to write" in r.output


def test_generate_missing_only_and_overwrite_contradict(tmp_path):
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "glu", "--out", str(tmp_path),
                                  "--missing-only", "--overwrite"])
    one_line_error(r, "--missing-only")
    assert os.listdir(tmp_path) == []
