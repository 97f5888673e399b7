"""HDF5 files: atomic writes, provenance, and schema-checked reading.

Every file refimpl writes carries ``schema``, ``schema_version`` and provenance attributes on
its root group; readers reject other schemas and unknown versions with a one-line
:class:`FileFormatError`. Writes go through :func:`refimpl.atomic.atomic_writer`: a temporary
file in the destination folder, renamed into place only after it was written and synced
successfully, so an interrupted or failed run never leaves a half-written file behind (NIR
``serialization.py`` is the model, with its nested-group bug as the caution: nested groups are
written and read recursively here).

HDF5 never writes to the disk itself (issue 23): :func:`atomic_h5` builds the file in memory
(h5py's file-object driver on an ``io.BytesIO``) and hands the finished bytes to the one checked
write path of :mod:`refimpl.atomic`. A write that fails inside HDF5 cannot be recovered from:
with HDF5 2.0 / h5py 3.16 on a full disk, closing a dataset whose data could not be flushed
fails (h5py reports "Can't decrement id ref count" and ignores it) and leaves the dataset's ID
half-destroyed, and closing the file then flushes every open dataset (``H5F__dest`` ->
``H5D_flush_all``) and dereferences it: a segmentation fault, with the temporary file and the
run's lock left behind. In memory the only failure is ``MemoryError``, before anything is
written; the disk sees one ``os.write`` loop whose ``ENOSPC`` or ``EIO`` is an ordinary
:class:`refimpl.atomic.WriteError`.

Storage layout (issue 22): what a file holds does not depend on it, only its size does. Every file
is written in the HDF5 1.10 object formats (``LIBVER``: version-2 object headers, links and
attributes kept in the header instead of a fractal heap and B-tree per object, the single-chunk
index), so HDF5 1.10 or later (any h5py >= 3.8) reads it. Datasets above
``COMPRESS_MIN_BYTES`` are one gzip chunk with the byte shuffle; smaller ones, scalars and empty
arrays are contiguous as before. Files written before (HDF5's earliest formats, contiguous
datasets) read the same: readers never look at the layout. Measured on the committed golden set
(4174 datasets, 1237 groups, 2.34 MiB of array data): 5.95 MiB before, 4.29 MiB after; the
object headers with their attributes (about 0.45 KiB for a dataset with the six tolerance
attributes) are most of what remains beyond the data.
"""
import contextlib
import datetime
import io
import os
import platform

import h5py
import numpy as np

from .atomic import atomic_writer

#: HDF5 format bounds of every file refimpl writes: the 1.10 formats, never newer ones (a newer
#: feature raises instead of making the file unreadable for HDF5 1.10). The earliest formats
#: (h5py's default) keep groups as symbol tables, about 1 KiB each.
LIBVER = (h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_V110)
#: Attributes an object keeps in its header before HDF5 moves them into dense storage (a
#: fractal heap and a B-tree, about 1.4 KiB more per object, measured). HDF5's default is 8; a
#: golden case group has up to 46 (``lm_step``), the root group 13.
ATTRS_IN_HEADER = 1024
#: Datasets larger than this are gzip-compressed (shuffle, level ``GZIP_LEVEL``); below it the
#: filter's description in the header costs more than compression saves (measured: 256 is the
#: best threshold of 0, 128, 256, 512, 1024 and 4096 bytes on the golden set).
COMPRESS_MIN_BYTES = 256
#: 4 saves within 0.2 % of level 9 on the golden set, at a fraction of the time.
GZIP_LEVEL = 4
#: A dataset up to this size is one chunk (no chunk index beyond the single-chunk record);
#: larger ones are split by h5py's chunk guess, so that reading a slice stays cheap.
MAX_SINGLE_CHUNK_BYTES = 1 << 20


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
        Open on an in-memory file (module docstring). When the block exits without an
        exception the file is closed and its bytes written to a temporary file in the same
        folder (created when the block starts, so a kill leaves its hidden temporary as any
        write does), which is renamed to ``path``; otherwise nothing is written and the
        temporary is deleted. The file and the groups created through it are written in the
        storage layout of the module docstring; create datasets with :func:`create_dataset`
        (or :func:`write_tree`) for theirs.

    Raises
    ------
    refimpl.atomic.WriteError
        The disk refused the bytes (``ENOSPC``, ``EIO``, ...): one line; the temporary is
        removed and ``path`` is unchanged.
    """
    with atomic_writer(path, overwrite) as write:
        image = io.BytesIO()
        with _create(image) as f:
            f.attrs["schema"] = schema
            f.attrs["schema_version"] = int(schema_version)
            for k, v in {**provenance(), **(attrs or {})}.items():
                f.attrs[k] = v
            yield f
        write(image.getbuffer())


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


def _header_attrs(plist):
    """``plist`` (a creation property list) keeping up to ``ATTRS_IN_HEADER`` attributes in the
    object header; without timestamps, which would make equal content differ between writes."""
    plist.set_attr_phase_change(ATTRS_IN_HEADER, 0)
    plist.set_obj_track_times(False)
    return plist


class _Group(h5py.Group):
    """A group whose ``create_group`` makes groups in the storage layout (module docstring)."""

    def create_group(self, name, track_order=None):
        if track_order:  # creation-order indexes: h5py's own property list
            return super().create_group(name, track_order=track_order)
        lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
        lcpl.set_create_intermediate_group(True)
        try:
            name = name.encode("ascii")
        except UnicodeEncodeError:  # as h5py does: ASCII names stay ASCII, others are UTF-8
            name = name.encode("utf-8")
            lcpl.set_char_encoding(h5py.h5t.CSET_UTF8)
        gcpl = _header_attrs(h5py.h5p.create(h5py.h5p.GROUP_CREATE))
        return _Group(h5py.h5g.create(self.id, name, lcpl=lcpl, gcpl=gcpl))


class _File(h5py.File, _Group):
    """An ``h5py.File`` whose groups are :class:`_Group` (see :func:`_create`)."""


def _create(image):
    """A new HDF5 file in the file-like object ``image`` (an empty ``io.BytesIO``), in the
    storage layout of the module docstring; its bytes are complete once it is closed."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(*LIBVER)
    fapl.set_fileobj_driver(h5py.h5fd.fileobj_driver, image)
    fcpl = _header_attrs(h5py.h5p.create(h5py.h5p.FILE_CREATE))  # the root group's attributes
    name = repr(image).encode("ascii", "replace")  # as h5py names a file object
    return _File(h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fapl=fapl, fcpl=fcpl))


def create_dataset(group, name, data):
    """``group[name] = data`` in the storage layout (module docstring); returns the dataset.

    Numeric and boolean arrays of more than ``COMPRESS_MIN_BYTES`` bytes are stored compressed
    (gzip with the byte shuffle, lossless: the values read back bit for bit), when this HDF5 has
    the deflate filter; everything else contiguous, as h5py stores it by default (for a scalar
    h5py also ignores the property list: its attributes follow HDF5's defaults).
    """
    a = np.asarray(data)
    dcpl = _header_attrs(h5py.h5p.create(h5py.h5p.DATASET_CREATE))
    kw = {}
    if (a.dtype.kind in "biuf" and a.ndim and a.nbytes > COMPRESS_MIN_BYTES
            and h5py.h5z.filter_avail(h5py.h5z.FILTER_DEFLATE)):
        kw = dict(chunks=a.shape if a.nbytes <= MAX_SINGLE_CHUNK_BYTES else True,
                  compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True)
    return group.create_dataset(name, data=a, dcpl=dcpl, **kw)


def write_tree(group, tree):
    """Write a nested dict of arrays / scalars / dicts into ``group`` (sub-dicts become groups,
    arrays datasets through :func:`create_dataset`)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            write_tree(group.create_group(k), v)
        else:
            create_dataset(group, k, v)


def read_tree(group):
    """Inverse of :func:`write_tree`: nested dict of NumPy arrays (scalars as 0-d arrays)."""
    out = {}
    for k, v in group.items():
        out[k] = read_tree(v) if isinstance(v, h5py.Group) else v[()]
    return out
