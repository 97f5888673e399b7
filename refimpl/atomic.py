"""Atomic file writes: a temporary file in the destination folder, renamed into place.

One helper for every file refimpl writes (HDF5 through :func:`refimpl.h5io.atomic_h5`, JSON,
text). An interrupted or failed write never leaves a half-written file and never touches the
destination; a successful one replaces it in one ``os.replace``. The new file gets the mode a
plain ``open(path, "w")`` would give it (``0o666`` less the process umask): ``mkstemp`` alone
would make it private (``0o600``).
"""
import contextlib
import json
import os
import tempfile


def _umask():
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


def check_destination(path, overwrite=False, protected=()):
    """Refuse ``path`` before any work is done: an existing file without ``overwrite``, a folder,
    or one of the ``protected`` paths (inputs of the same command). Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; name a file to write")
    for p in protected:
        if os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path):
            raise ValueError(f"refusing to write {path}: it is an input of this command")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    return path


@contextlib.contextmanager
def atomic_path(path, overwrite=True):
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    The temporary file exists (empty) when the block starts; the block writes it by name (for
    libraries such as h5py that open the path themselves). On any exception, including
    ``KeyboardInterrupt``, it is deleted and ``path`` is left as it was.
    """
    path = os.fspath(path)
    if not overwrite:
        check_destination(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path, text, overwrite=True):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path, obj, overwrite=True, **dump_kwargs):
    """Write ``obj`` as JSON (indent 2, trailing newline) atomically; ``dump_kwargs`` go to
    ``json.dumps`` (pass ``allow_nan=False`` for strict JSON).

    The JSON text is made before the file is opened, so an object that cannot be serialised
    raises without creating anything.
    """
    text = json.dumps(obj, **{"indent": 2, **dump_kwargs}) + "\n"
    atomic_write_text(path, text, overwrite)
