"""HDF5 files: atomic writes, provenance, and schema-checked reading.

Every file refimpl writes carries ``schema``, ``schema_version`` and provenance attributes on
its root group; readers reject other schemas and unknown versions with a one-line
:class:`FileFormatError`. Writes go through :func:`refimpl.atomic.atomic_path`: a temporary
file in the destination folder, renamed into place only after it was closed successfully, so an
interrupted or failed run never leaves a half-written file behind (NIR ``serialization.py`` is
the model, with its nested-group bug as the caution: nested groups are written and read
recursively here).
"""
import contextlib
import datetime
import os
import platform

import h5py
import numpy as np

from .atomic import atomic_path


class FileFormatError(ValueError):
    """A file that is not what it should be (not HDF5, truncated, other schema or version)."""


def provenance():
    """Attributes that say what wrote a file."""
    import numba

    from . import __version__

    return {
        "generator": f"refimpl {__version__}",
        "numpy": np.__version__,
        "numba": numba.__version__,
        "h5py": h5py.__version__,
        "python": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def atomic_h5(path, schema, schema_version, overwrite=False, attrs=None):
    """Open a new HDF5 file for writing, atomically replacing ``path`` on success.

    Parameters
    ----------
    path : str or os.PathLike
    schema : str
        The value of the root attribute ``schema`` (e.g. ``"refimpl-golden"``).
    schema_version : int
    overwrite : bool, default False
        Without it an existing ``path`` raises ``FileExistsError`` before anything is written.
    attrs : dict or None
        Extra root attributes (added after the provenance ones).

    Yields
    ------
    h5py.File
        Open on a temporary file in the same folder; renamed to ``path`` when the block exits
        without an exception, deleted otherwise.
    """
    with atomic_path(path, overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = schema
            f.attrs["schema_version"] = int(schema_version)
            for k, v in {**provenance(), **(attrs or {})}.items():
                f.attrs[k] = v
            yield f


def open_h5(path, schema, versions=(1,)):
    """Open an HDF5 file for reading after checking its schema and version.

    Raises :class:`FileFormatError` (one line, naming the file) for a missing, truncated or
    non-HDF5 file, another schema, or an unknown version; returns an open ``h5py.File``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: no such file")
    try:
        ok = h5py.is_hdf5(path)
    except OSError as e:  # unreadable
        raise FileFormatError(f"{path}: cannot be read ({e})") from None
    if not ok:
        raise FileFormatError(f"{path}: not an HDF5 file (corrupted, truncated or another format)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FileFormatError(f"{path}: corrupted or truncated HDF5 file ({e})") from None
    try:
        got = f.attrs.get("schema")
        version = f.attrs.get("schema_version")
    except Exception as e:  # a damaged attribute heap: h5py raises OSError, TypeError, ...
        with contextlib.suppress(Exception):
            f.close()
        msg = " ".join(str(e).split()) or type(e).__name__
        raise FileFormatError(f"{path}: corrupted HDF5 file, its root attributes cannot be read "
                              f"({msg}); restore or regenerate it") from None
    if isinstance(got, bytes):
        got = got.decode(errors="replace")
    if not isinstance(got, str) or got != schema:
        f.close()
        raise FileFormatError(f"{path}: schema is {_short(got)}, expected {schema!r}")
    if not _supported(version, versions):
        f.close()
        raise FileFormatError(f"{path}: schema_version {_short(version)} of {schema!r} is not "
                              f"supported (this refimpl reads the integer version(s) "
                              f"{list(versions)})")
    return f


def _supported(version, versions):
    """Only a scalar integer (Python or NumPy, not bool) equal to a supported version counts:
    the string ``"1"``, the float ``1.5`` (or ``1.0``) and arrays are not version 1."""
    if isinstance(version, np.ndarray):
        if version.shape != ():
            return False
        version = version[()]
    if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
        return False
    return int(version) in versions


def _short(v):
    """A one-line, bounded repr of an attribute value for an error message."""
    if isinstance(v, np.generic):
        v = v.item()
    r = " ".join(repr(v).split())
    return r if len(r) <= 60 else r[:57] + "..."


def write_tree(group, tree):
    """Write a nested dict of arrays / scalars / dicts into ``group`` (sub-dicts become groups)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            write_tree(group.create_group(k), v)
        else:
            group.create_dataset(k, data=np.asarray(v))


def read_tree(group):
    """Inverse of :func:`write_tree`: nested dict of NumPy arrays (scalars as 0-d arrays)."""
    out = {}
    for k, v in group.items():
        out[k] = read_tree(v) if isinstance(v, h5py.Group) else v[()]
    return out
