"""Hostile files (issue 23): links planted where refimpl writes, and inputs that are not
regular files or are too large. Every case: one ``Error:`` line, exit status 1, no traceback,
nothing written, and the files involved (the link's target, the input) unchanged.

- The run's lock ``OUT/.lock`` is opened with ``O_NOFOLLOW`` and checked on the open
  descriptor (:func:`refimpl.loop.lock_output`): a symbolic link (also a dangling one, which
  ``O_CREAT`` would otherwise create at its target), a hard link or a FIFO there is refused.
- Atomic writes create their temporary with ``O_EXCL`` and rename it over the destination, so
  a link at the destination is replaced, never written through (:mod:`refimpl.atomic`).
- A text input is read only from a regular file of at most ``--max-text-bytes`` bytes
  (:func:`refimpl.text.read_text_file`): a FIFO without a writer (which blocked forever),
  ``/dev/zero`` (which never ends), other devices, sockets and folders are refused before a
  byte is read. The dangerous ones run in a subprocess with a time limit and an address-space
  limit, so a regression fails the test instead of hanging it or exhausting the machine.
"""
import contextlib
import errno
import os
import re
import socket
import stat
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner
import test_full_disk
from test_full_disk import SMALL, one_error_line

from refimpl.atomic import WriteError, atomic_write_json
from refimpl.cli.main import main
from refimpl.loop import lock_output
from refimpl.text import MAX_TEXT_BYTES, load_text, read_text_file

CLI = [sys.executable, "-m", "refimpl.cli.main"]
ENV = dict(os.environ, REFIMPL_THREADS="1")
#: Address space of a subprocess reading a hostile input: enough for the interpreter, NumPy
#: and Numba (about 1.5 GiB of mappings measured), far below what reading /dev/zero takes.
ADDRESS_SPACE = 6 << 30
VICTIM = b"a file of someone else's\n"


text_file = test_full_disk.text_file  # the fixture: a small text


def snapshot(root):
    """Every entry under ``root``: a regular file's bytes, a link's target, another file's
    kind (never opened: a FIFO would block)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            out[os.path.relpath(p, root)] = (
                ("link", os.readlink(p)) if stat.S_ISLNK(mode) else
                open(p, "rb").read() if stat.S_ISREG(mode) else stat.S_IFMT(mode))
    return out


def train(text, out):
    return CliRunner().invoke(main, ["train", "--text", str(text), "--epochs", "1",
                                     "--out", str(out)] + SMALL)


# --------------------------------------------------------------------------------------------
# The lock file
# --------------------------------------------------------------------------------------------


def _symlink(out, victim):
    os.symlink(victim, out / ".lock")


def _hardlink(out, victim):
    os.link(victim, out / ".lock")


def _fifo(out, victim):
    os.mkfifo(out / ".lock")


@pytest.mark.parametrize("plant, why", [
    (_symlink, "it is a symbolic link"),
    (_hardlink, "it is a hard link (2 names share it)"),
    (_fifo, "it is not a regular file"),
])
def test_train_refuses_a_planted_lock_and_leaves_its_target_alone(tmp_path, text_file,
                                                                  plant, why):
    """Measured before: with ``OUT/.lock`` a link to another file, the run exited 0 and the
    other file held only the run's PID."""
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_bytes(VICTIM)
    out.mkdir()
    plant(out, victim)
    before = snapshot(tmp_path)
    r = train(text_file, out)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    one_error_line(r.output, f"the lock file {out / '.lock'}", why, "remove it and rerun")
    assert snapshot(tmp_path) == before and victim.read_bytes() == VICTIM


def test_a_dangling_lock_link_creates_nothing_at_its_target(tmp_path):
    target = tmp_path / "elsewhere" / "created.txt"
    target.parent.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / ".lock")
    with pytest.raises(WriteError, match="is a symbolic link") as e:
        with lock_output(out):
            pass
    assert e.value.errno == errno.ELOOP
    assert not target.exists() and os.path.islink(out / ".lock")


def test_a_normal_lock_is_still_taken_and_removed(tmp_path):
    out = tmp_path / "out"
    with lock_output(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        assert not os.path.islink(out / ".lock")
    assert not out.exists()  # made by the lock, removed with it


# --------------------------------------------------------------------------------------------
# Atomic writes replace a link, never write through it
# --------------------------------------------------------------------------------------------


def test_an_atomic_write_replaces_a_link_at_the_destination(tmp_path):
    victim, dest = tmp_path / "victim.json", tmp_path / "report.json"
    victim.write_bytes(VICTIM)
    os.symlink(victim, dest)
    atomic_write_json(dest, {"a": 1})
    assert victim.read_bytes() == VICTIM
    assert not os.path.islink(dest) and dest.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["report.json", "victim.json"]


# --------------------------------------------------------------------------------------------
# Inputs that are not regular files
# --------------------------------------------------------------------------------------------


def _limit_address_space():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_guarded(args):
    """Run the CLI in a subprocess that cannot hang the tests (60 s) or take the machine's
    memory (:data:`ADDRESS_SPACE`)."""
    try:
        return subprocess.run(CLI + args, env=ENV, capture_output=True, text=True, timeout=60,
                              preexec_fn=_limit_address_space)
    except subprocess.TimeoutExpired:
        pytest.fail(f"refimpl {' '.join(args)} did not return within 60 s")


def test_train_text_refuses_a_fifo_without_a_writer(tmp_path):
    """Measured before: blocked forever in open()."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = run_guarded(["train", "--text", str(fifo), "--out", str(tmp_path / "o")] + SMALL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    one_error_line(r.stderr, f"{fifo}: cannot read a named pipe (FIFO)", "regular file")
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_train_text_refuses_dev_zero(tmp_path):
    """Measured before: read without end (a MemoryError traceback at best)."""
    r = run_guarded(["train", "--text", "/dev/zero", "--out", str(tmp_path / "o")] + SMALL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    one_error_line(r.stderr, "/dev/zero: cannot read a character device")
    assert os.listdir(tmp_path) == []


class _Unblock:
    """While active, open the FIFO ``path`` for writing whenever a reader waits, and close it
    at once (end of file): a regressed reader gets an empty file instead of blocking."""

    def __init__(self, path):
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.05):
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _socket(tmp_path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    return tmp_path / "sock", "a socket", s


def _pipe(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    return tmp_path / "pipe", "a named pipe (FIFO)", None


def _folder(tmp_path):
    (tmp_path / "dir").mkdir()
    return tmp_path / "dir", "a folder", None


def _dev_null(tmp_path):
    return "/dev/null", "a character device", None


@pytest.mark.parametrize("make", [_socket, _pipe, _folder, _dev_null])
def test_load_text_refuses_what_is_not_a_regular_file(tmp_path, make):
    path, kind, keep = make(tmp_path)
    try:
        with _Unblock(path) if kind.endswith("(FIFO)") else \
                contextlib.nullcontext():
            with pytest.raises(ValueError, match=re.escape(f"{path}: cannot read {kind}: a "
                                                          f"text is read from a regular file")):
                load_text(path, context=2)
    finally:
        if keep is not None:
            keep.close()


# --------------------------------------------------------------------------------------------
# Size limits
# --------------------------------------------------------------------------------------------


def test_train_text_refuses_a_file_above_the_limit_and_names_the_option(tmp_path):
    """A sparse file one byte above :data:`MAX_TEXT_BYTES` (no disk used): refused from its
    size, before a byte is read (guarded: without the limit the run reads and trains on it)."""
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)
    r = run_guarded(["train", "--text", str(big), "--out", str(tmp_path / "o")] + SMALL)
    assert r.returncode == 1, (r.returncode, r.stderr)
    one_error_line(r.stderr, f"{big}: {MAX_TEXT_BYTES + 1} bytes, more than the limit of "
                             f"{MAX_TEXT_BYTES} bytes", "--max-text-bytes")
    assert sorted(os.listdir(tmp_path)) == ["big.txt"]
    assert os.stat(big).st_blocks == 0  # still sparse: nothing was written to it


def test_the_limit_is_inclusive_and_max_bytes_raises_it(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"abcdefgh" * 8)  # 64 bytes
    assert len(load_text(path, context=2, max_bytes=64).train) > 0
    with pytest.raises(ValueError, match=r"64 bytes, more than the limit of 63 bytes .*"
                                         r"--max-text-bytes \(load_text's max_bytes\)"):
        load_text(path, context=2, max_bytes=63)
    with pytest.raises(ValueError, match="max_bytes must be"):
        load_text(path, context=2, max_bytes=0)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc")
def test_the_read_is_bounded_whatever_size_the_file_claims():
    """A /proc file is a regular file of size 0 that holds more: read in full within the limit,
    refused (after reading at most the limit + 1) above it."""
    status = read_text_file("/proc/self/status")
    assert status.startswith(b"Name:") and len(status) > 64
    with pytest.raises(ValueError, match=r"/proc/self/status: more bytes than that, more than "
                                         r"the limit of 64 bytes"):
        read_text_file("/proc/self/status", max_bytes=64)


def test_max_text_bytes_raises_the_limit_from_the_cli(tmp_path):
    """``--max-text-bytes`` is the option the refusal names: below the file's size it refuses
    (one line, nothing written), at the size it trains; it applies to --text only."""
    from click.testing import CliRunner
    from refimpl.cli.main import main as cli_main
    text = tmp_path / "t.txt"
    text.write_bytes(b"the cat sat on the mat. " * 40)  # 960 bytes
    size = text.stat().st_size
    r = CliRunner().invoke(cli_main, ["train", "--text", str(text), "--out", str(tmp_path / "a"),
                                      "--max-text-bytes", str(size - 1)] + SMALL)
    assert r.exit_code == 1, r.output
    one_error_line(r.output, f"{size} bytes, more than the limit of {size - 1} bytes",
                   "--max-text-bytes")
    assert not (tmp_path / "a").exists()
    r = CliRunner().invoke(cli_main, ["train", "--text", str(text), "--out", str(tmp_path / "b"),
                                      "--max-text-bytes", str(size)] + SMALL)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli_main, ["train", "--task", "recall", "--samples", "64",
                                      "--out", str(tmp_path / "c"), "--max-text-bytes", "10"])
    assert r.exit_code == 1 and "--max-text-bytes" in r.output, r.output
    assert not (tmp_path / "c").exists()
