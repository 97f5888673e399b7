"""Atomic file writes: a temporary file in the destination folder, renamed into place.

One helper for every file refimpl writes (HDF5 through :func:`refimpl.h5io.atomic_h5`, JSON,
text). An interrupted or failed write never leaves a half-written file and never touches the
destination; a successful one replaces it in one ``os.replace``. The new file gets the mode a
plain ``open(path, "w")`` would give it (``0o666`` less the process umask): ``mkstemp`` alone
would make it private (``0o600``).

A write that fails (a full disk ``ENOSPC``, a quota ``EDQUOT``, an I/O error ``EIO``, ...)
raises :class:`WriteError`: an ``OSError`` with the original ``errno`` whose message is one line
naming the destination, the reason and that the destination is unchanged. The temporary is
removed first. The data reaches the disk through one checked path (:func:`atomic_writer`:
``os.write`` until every byte is written, then ``os.fsync``, so an error the kernel reports
only on writeback is seen too) before the rename; :func:`refimpl.h5io.atomic_h5` builds the
HDF5 file in memory and writes it through that path, because HDF5 itself crashes (a
segmentation fault) when a write fails inside it.

No writer follows a symbolic link planted at a name it writes: the temporary is created by
``mkstemp`` (``O_EXCL``: never an existing name, never through a link) and written through the
descriptor it returns, and ``os.replace`` replaces a link at the destination instead of writing
through it.

A kill (SIGKILL, power loss) during a write cannot run any cleanup, so it leaves the hidden
temporary ``.<name>.<pid>.<random>.tmp``. The writer's PID is part of the name: every new write
to the same destination first removes the temporaries of that destination whose process is no
longer alive (:func:`remove_stale_temporaries`), so a rerun leaves no stray file behind.
"""
import contextlib
import errno
import json
import os
import re
import tempfile


class WriteError(OSError):
    """A file could not be written (one-line message; ``errno`` is the system's reason)."""

    def __str__(self):
        return self.strerror


def write_error(path, e, kept=None):
    """:class:`WriteError` for the failed write ``e`` (an ``OSError``) of ``path``: one line
    naming the file, the system's reason and its errno name, and ``kept`` (what is unchanged;
    default: whether ``path`` existed before)."""
    if isinstance(e, WriteError):
        return e
    path = os.fspath(path)
    if kept is None:
        kept = ("the existing file is unchanged" if os.path.lexists(path) else
                "nothing was written")
    code = e.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else type(e).__name__
    reason = " ".join(str(e.strerror or e).split())
    return WriteError(code, f"cannot write {path}: {reason} ({name}); {kept}")


def _umask():
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


def _inside(path, folder):
    """Whether ``path`` (absolute, may not exist) is ``folder`` or lies inside it."""
    try:
        folder = os.path.realpath(folder)
        real = os.path.realpath(path)
        return os.path.commonpath([real, folder]) == folder
    except ValueError:  # different drives
        return False


def check_writable(path):
    """Raise ``PermissionError`` / ``NotADirectoryError`` (one line, naming the fix) unless a
    file ``path`` can be created: the nearest existing ancestor folder must be a writable folder
    (missing folders below it are created by the writers). Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot write {path}: {folder} is not a folder; choose "
                                 f"another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: folder {folder} is not writable; choose "
                              f"another path or fix its permissions")
    return path


def check_destination(path, overwrite=False, protected=()):
    """Refuse ``path`` before any work is done: an existing file without ``overwrite``, a folder,
    a place where no file can be created (:func:`check_writable`), or one of the ``protected``
    paths (inputs of the same command). A protected *folder* protects everything inside it
    (e.g. the golden set). Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; name a file to write")
    for p in protected:
        p = os.fspath(p)
        if os.path.isdir(p):
            if _inside(path, p):
                raise ValueError(f"refusing to write {path}: it is inside {p}, which this "
                                 f"command only reads; choose a path outside it")
        elif os.path.realpath(p) == os.path.realpath(path) or (
                os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path)):
            raise ValueError(f"refusing to write {path}: it is an input of this command; "
                             f"choose another path")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    check_writable(path)
    return path


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def remove_stale_temporaries(path):
    """Remove the temporaries ``.<name>.<pid>.<random>.tmp`` of destination ``path`` left by
    writers that are no longer running (killed mid-write). Returns the removed paths.

    Temporaries of live processes (a concurrent writer) are left alone; temporaries without a
    PID (older refimpl) are not touched either, since their owner cannot be known."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    pattern = re.compile(r"\." + re.escape(name) + r"\.(\d+)\.[A-Za-z0-9_]+\.tmp\Z")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
    return removed


def write_all(fd, data):
    """``os.write`` every byte of ``data`` (bytes-like) to descriptor ``fd``; a short write is
    continued, an error (``ENOSPC``, ``EIO``) raises its ``OSError``."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[:1 << 30])  # Linux writes at most ~2 GiB per call
        view = view[n:]


@contextlib.contextmanager
def _temporary(path, overwrite):
    """The life of a temporary next to ``path``: yield ``(fd, tmp)`` (``fd`` open for writing
    on the new, empty ``tmp``); when the block succeeds, ``fsync`` and rename ``tmp`` to
    ``path``. On any exception the temporary is removed and ``path`` left as it was; an
    ``OSError`` of the write becomes a :class:`WriteError`."""
    path = os.fspath(path)
    if not overwrite:
        check_destination(path)
    folder = os.path.dirname(os.path.abspath(path))
    kept = ("the existing file is unchanged" if os.path.lexists(path) else
            "nothing was written")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise write_error(path, e, kept) from None
    remove_stale_temporaries(path)
    prefix = f".{os.path.basename(path)}.{os.getpid()}."
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    except OSError as e:
        raise write_error(path, e, kept) from None
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            yield fd, tmp
            os.fsync(fd)  # writeback errors (EIO, ENOSPC on some file systems) show here
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e, kept) from None
        raise


@contextlib.contextmanager
def atomic_writer(path, overwrite=True):
    """Yield ``write(data)``, which appends bytes to a temporary next to ``path``; rename it
    to ``path`` (after ``fsync``) if the block succeeds.

    The one checked write path: every byte goes through :func:`write_all` on the descriptor
    ``mkstemp`` returned, so nothing is written through a link, and a failure raises
    :class:`WriteError` with the temporary removed and ``path`` unchanged.
    """
    with _temporary(path, overwrite) as (fd, _):
        yield lambda data: write_all(fd, data)


@contextlib.contextmanager
def atomic_path(path, overwrite=True):
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    The temporary file exists (empty) when the block starts; the block writes it by name (for
    libraries such as matplotlib that open the path themselves; prefer :func:`atomic_writer`).
    On any exception, including ``KeyboardInterrupt``, it is deleted and ``path`` is left as it
    was. Its name carries the PID, ``.<name>.<pid>.<random>.tmp``; stale ones of dead writers
    are removed first. What the block wrote is ``fsync``-ed before the rename (through the
    temporary's own descriptor: ``fsync`` covers the file, whichever descriptor wrote it), and
    an ``OSError`` of the block or of the rename becomes a :class:`WriteError`.
    """
    with _temporary(path, overwrite) as (_, tmp):
        yield tmp


def atomic_write_bytes(path, data, overwrite=True):
    """Write ``data`` (bytes-like) to ``path`` atomically."""
    with atomic_writer(path, overwrite) as write:
        write(data)


def atomic_write_text(path, text, overwrite=True):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_json(path, obj, overwrite=True, **dump_kwargs):
    """Write ``obj`` as JSON (indent 2, trailing newline) atomically; ``dump_kwargs`` go to
    ``json.dumps`` (pass ``allow_nan=False`` for strict JSON).

    The JSON text is made before the file is opened, so an object that cannot be serialised
    raises without creating anything.
    """
    text = json.dumps(obj, **{"indent": 2, **dump_kwargs}) + "\n"
    atomic_write_text(path, text, overwrite)
