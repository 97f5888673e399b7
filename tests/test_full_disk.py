"""Full disks and failing writes (issue 23): every write refimpl makes survives ``ENOSPC`` and
``EIO`` with one ``Error:`` line, exit status 1, no traceback and no crash, no temporary file or
lock left behind, and the files written before (the last epoch's checkpoint, an earlier report)
intact, byte for byte.

Two ways to make writes fail:

- **A real full file system**: a tmpfs of fixed size (:data:`FS_BYTES`) mounted on a folder of
  the test (needs root with ``CAP_SYS_ADMIN``, as in the CI container; skipped, with the
  reason, anywhere else), filled up. The commands run in a subprocess, so a crash fails the
  test instead of killing pytest: before the fix HDF5 died of a segmentation fault there (exit
  139, ``refimpl.h5io`` says where).
- **Injected failures**, everywhere: ``os.write``, ``os.fsync`` or ``os.replace`` raise
  ``OSError(ENOSPC)`` or ``OSError(EIO)`` for the files of one folder whose names start with a
  given prefix (the descriptor's path is read from ``/proc/self/fd``), in process.
"""
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_train_robustness import snapshot  # every file under a folder with its bytes

from refimpl.atomic import (WriteError, atomic_write_bytes, atomic_write_json,
                            atomic_write_text)
from refimpl.cli import text_commands as text_cli
from refimpl.cli.main import main
from refimpl.golden import DEFAULT_DIR
from refimpl.h5io import atomic_h5, create_dataset
from refimpl.progress import EpochEnd
from refimpl.sdn.training import SDNTrainConfig, load_train_state
from refimpl.train import load_checkpoint

CLI = [sys.executable, "-m", "refimpl.cli.main"]
ENV = dict(os.environ, REFIMPL_THREADS="1")
#: The mounted file system: room for a one-epoch run of :data:`SMALL` (~100 KiB) and a filler.
FS_BYTES = 2 << 20
#: Free bytes left on the "nearly full" file system: a lock file's PID and a JSON file fit (a
#: page each), a checkpoint (~90 KiB) or an SDN training state (~23 KiB) does not.
NEARLY_FULL = 16 << 10
SMALL = ["--context", "16", "--d-model", "8", "--d-state", "4", "--layers", "1",
         "--batch-size", "8"]
SDN_SMALL = ["--samples", "64", "--length", "128", "--epochs", "2", "--batch-size", "16",
             "--eval-samples", "4"]
REASONS = {errno.ENOSPC: "No space left on device (ENOSPC)",
           errno.EIO: "Input/output error (EIO)"}


def one_error_line(output, *fragments):
    """The output ends with exactly one ``Error:`` line holding ``fragments``; no traceback, no
    other error line. Returns that line."""
    lines = output.strip().splitlines()
    assert "Traceback" not in output and "Segmentation" not in output, output
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def leftovers(folder):
    """Hidden temporaries and locks under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*")
                  if p.name.endswith((".tmp", ".lock")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["spike", "state", "space", "model", "neuron", "threshold"]
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 800)))
    return path


class _Cut(Exception):
    pass


def _cut_after_the_first_epoch(event):
    """A progress callback that stops the run once its first epoch's files are written."""
    if isinstance(event, EpochEnd):
        raise _Cut()


@pytest.fixture(scope="module")
def one_epoch(text_file, tmp_path_factory):
    """A two-epoch language-model run cut after its first epoch: the good files a failed
    write must keep, and a run to ``--resume``."""
    out = tmp_path_factory.mktemp("run") / "lm"
    bar = contextlib.nullcontext(_cut_after_the_first_epoch)  # in place of the progress bar
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_cli, "progress_bar", lambda *args, **kwargs: bar)
        r = CliRunner().invoke(main, ["train", "--text", str(text_file), "--epochs", "2",
                                      "--out", str(out)] + SMALL)
    assert isinstance(r.exception, _Cut), r.output
    assert load_checkpoint(out / "checkpoint.h5").epoch == 1
    return out


# --------------------------------------------------------------------------------------------
# A real full file system
# --------------------------------------------------------------------------------------------


def _mount_tmpfs(folder, size):
    """Mount a tmpfs of ``size`` bytes on ``folder``; None, or why it cannot be done here."""
    if not sys.platform.startswith("linux"):
        return f"a tmpfs needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (and CAP_SYS_ADMIN); injected failures test the rest"
    if shutil.which("mount") is None:
        return "no mount command"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(folder)], capture_output=True, text=True)
    if r.returncode:
        return (f"mount -t tmpfs is not permitted here ({r.stderr.strip() or r.returncode}); "
                f"injected failures test the rest")
    return None


@pytest.fixture
def small_fs(tmp_path):
    """A folder on a tmpfs of :data:`FS_BYTES` bytes, unmounted afterwards."""
    folder = tmp_path / "fs"
    folder.mkdir()
    why = _mount_tmpfs(folder, FS_BYTES)
    if why:
        pytest.skip(why)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(fs, leave=0):
    """Fill the file system of ``fs`` up (the file ``fs/filler``), then free ``leave`` bytes.
    Returns the free bytes as ``statvfs`` reports them."""
    spare = fs / "spare"
    if leave:
        spare.write_bytes(b"\1" * leave)
    with open(fs / "filler", "ab", buffering=0) as f:
        for block in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\1" * block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    if leave:
        spare.unlink()
    st = os.statvfs(fs)
    return st.f_bavail * st.f_frsize


def run_cli(args):
    return subprocess.run(CLI + args, env=ENV, capture_output=True, text=True, timeout=300)


def test_train_text_resume_on_a_nearly_full_disk_keeps_the_last_epoch(small_fs, one_epoch,
                                                                      text_file):
    """The measured crash (a segmentation fault after h5py's "Can't decrement id ref count",
    a large ``.checkpoint.h5.<pid>.<rand>.tmp`` and ``.lock`` left) is now one line; the
    first epoch's files stay as they were."""
    out = small_fs / "lm"
    shutil.copytree(one_epoch, out)
    assert (out / "checkpoint.h5").stat().st_size > 4 * NEARLY_FULL  # it cannot fit
    before, text = snapshot(out), text_file.read_bytes()
    assert fill(small_fs, NEARLY_FULL) >= 4096  # room for the lock's PID
    r = run_cli(["train", "--text", str(text_file), "--epochs", "2", "--resume",
                 "--out", str(out)] + SMALL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    one_error_line(r.stderr, f"cannot write {out / 'checkpoint.h5'}",
                   REASONS[errno.ENOSPC], "the existing file is unchanged")
    assert snapshot(out) == before and leftovers(small_fs) == []
    assert text_file.read_bytes() == text
    assert load_checkpoint(out / "checkpoint.h5").epoch == 1


def test_train_text_on_a_full_disk_leaves_nothing(small_fs, text_file):
    """Not even the PID fits: refused at the lock, and the folder the run made is gone."""
    fill(small_fs)
    r = run_cli(["train", "--text", str(text_file), "--epochs", "1",
                 "--out", str(small_fs / "new")] + SMALL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    one_error_line(r.stderr, "cannot write", REASONS[errno.ENOSPC])
    assert sorted(os.listdir(small_fs)) == ["filler"]


def test_sdn_train_on_a_nearly_full_disk_leaves_nothing(small_fs):
    """The measured crash of ``refimpl sdn train`` (``.sdn.h5.partial.h5...tmp`` and the lock
    left behind, exit 139)."""
    fill(small_fs, NEARLY_FULL)
    r = run_cli(["sdn", "train", "--out", str(small_fs / "sdn.h5")] + SDN_SMALL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    one_error_line(r.stderr, f"cannot write {small_fs / 'sdn.h5.partial.h5'}",
                   REASONS[errno.ENOSPC], "nothing was written")
    assert sorted(os.listdir(small_fs)) == ["filler"]


def test_golden_verify_json_on_a_full_disk_keeps_the_earlier_report(small_fs):
    """The measured ``OSError`` traceback of ``golden verify --json``."""
    report = small_fs / "report.json"
    args = ["golden", "verify", str(DEFAULT_DIR / "glu.h5"), "--json", str(report)]
    assert CliRunner().invoke(main, args).exit_code == 0
    earlier = report.read_bytes()
    fill(small_fs)
    r = run_cli(args[:-1] + [str(report)])
    assert r.returncode == 1, (r.returncode, r.stderr)
    one_error_line(r.stderr, f"--json: cannot write {report}", REASONS[errno.ENOSPC])
    assert report.read_bytes() == earlier and leftovers(small_fs) == []


# --------------------------------------------------------------------------------------------
# Injected failures
# --------------------------------------------------------------------------------------------


class Faults:
    """Make one system call fail for the files under a folder whose names start with a prefix."""

    def __init__(self, monkeypatch):
        if not os.path.isdir("/proc/self/fd"):
            pytest.skip("injected failures find a descriptor's file in /proc/self/fd")
        self.monkeypatch = monkeypatch
        self.hits = 0

    def arm(self, folder, call="write", code=errno.ENOSPC, prefix=""):
        real = getattr(os, call)
        folder = os.path.realpath(folder) + os.sep

        def aimed(path):
            path = os.fspath(path)
            hit = (path.startswith(folder) and
                   os.path.basename(path).startswith(prefix))
            self.hits += hit
            return hit

        def by_fd(fd, *args):
            if aimed(os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(code, os.strerror(code))
            return real(fd, *args)

        def by_name(src, dst, *args, **kwargs):
            if aimed(os.path.realpath(src)):
                raise OSError(code, os.strerror(code))
            return real(src, dst, *args, **kwargs)

        self.monkeypatch.setattr(os, call, by_name if call == "replace" else by_fd)
        return self


@pytest.fixture
def faults(monkeypatch):
    return Faults(monkeypatch)


def _write_h5(path, overwrite=True):
    with atomic_h5(path, "test", 1, overwrite=overwrite) as f:
        for i in range(20):  # datasets left open until the file closes, as write_tree does
            create_dataset(f, f"w{i}", np.arange(64.0) + i)


WRITERS = {
    "json": lambda p: atomic_write_json(p, {"new": [1, 2, 3]}),
    "text": lambda p: atomic_write_text(p, "new text\n"),
    "bytes": lambda p: atomic_write_bytes(p, b"\0new" * 1000),
    "hdf5": _write_h5,
}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("call", ["write", "fsync", "replace"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_fails_in_one_line_and_keeps_the_file(tmp_path, faults, writer, call, code):
    old, new = tmp_path / "old.dat", tmp_path / "new.dat"
    old.write_bytes(b"the previous good file")
    faults.arm(tmp_path, call, code, prefix=".")  # the temporaries, never the destination
    for path, kept in ((old, "the existing file is unchanged"), (new, "nothing was written")):
        with pytest.raises(WriteError) as e:
            WRITERS[writer](path)
        assert e.value.errno == code
        assert str(e.value) == f"cannot write {path}: {REASONS[code]}; {kept}"
    assert faults.hits >= 2
    assert sorted(os.listdir(tmp_path)) == ["old.dat"]
    assert old.read_bytes() == b"the previous good file"


@pytest.mark.parametrize("name, prefix, call, code", [
    ("checkpoint.h5", ".checkpoint.h5.", "write", errno.ENOSPC),
    ("checkpoint.h5", ".checkpoint.h5.", "fsync", errno.EIO),  # reported on writeback
    ("checkpoint.h5", ".checkpoint.h5.", "replace", errno.EIO),
    (".lock", ".lock", "write", errno.ENOSPC),  # the PID: refused before the first update
    ("metrics.json", ".metrics.json.", "write", errno.EIO),
])
def test_train_text_with_a_failing_write_keeps_the_last_epoch(one_epoch, text_file, tmp_path,
                                                              faults, name, prefix, call, code):
    out = tmp_path / "lm"
    shutil.copytree(one_epoch, out)
    before = snapshot(out)
    faults.arm(out, call, code, prefix)
    r = CliRunner().invoke(main, ["train", "--text", str(text_file), "--epochs", "2",
                                  "--resume", "--out", str(out)] + SMALL)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    one_error_line(r.output, f"cannot write {out / name}", REASONS[code])
    assert faults.hits and leftovers(out) == []
    after = snapshot(out)
    if name == "metrics.json":  # written after the checkpoint, which then holds epoch 2
        assert load_checkpoint(out / "checkpoint.h5").epoch == 2
        after["checkpoint.h5"] = before["checkpoint.h5"]
    assert after == before


def test_sdn_train_failing_at_the_weights_keeps_the_resumable_state(tmp_path, faults):
    """The last write (OUT itself) fails: the training state of the finished epochs stays, so
    ``--resume`` can write OUT later; no temporary, no lock."""
    out = tmp_path / "sdn.h5"
    faults.arm(tmp_path, "write", errno.EIO, prefix=f".sdn.h5.{os.getpid()}.")  # not the state
    r = CliRunner().invoke(main, ["sdn", "train", "--out", str(out)] + SDN_SMALL)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    one_error_line(r.output, f"cannot write {out}", REASONS[errno.EIO], "nothing was written")
    assert sorted(os.listdir(tmp_path)) == ["sdn.h5.partial.h5"]
    cfg = SDNTrainConfig(samples=64, length=128, epochs=2, batch_size=16, eval_samples=4)
    assert load_train_state(tmp_path / "sdn.h5.partial.h5", cfg)[5] == 2


def test_golden_verify_json_with_a_failing_write_keeps_the_report(tmp_path, faults):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"passed": True, "files": []}))
    before = report.read_bytes()
    faults.arm(tmp_path, "write", errno.EIO, prefix=".report.json.")
    r = CliRunner().invoke(main, ["golden", "verify", str(DEFAULT_DIR / "glu.h5"),
                                  "--json", str(report)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    one_error_line(r.output, f"--json: cannot write {report}", REASONS[errno.EIO],
                   "the existing file is unchanged")
    assert report.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["report.json"]


def test_golden_generate_with_a_failing_write_leaves_nothing(tmp_path, faults):
    faults.arm(tmp_path, "write", errno.ENOSPC)
    r = CliRunner().invoke(main, ["golden", "generate", "--suite", "glu",
                                  "--out", str(tmp_path / "g")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    one_error_line(r.output, f"cannot write {tmp_path / 'g' / 'glu.h5'}",
                   REASONS[errno.ENOSPC])
    assert snapshot(tmp_path) in ({}, {"g/": None})
