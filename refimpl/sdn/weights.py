"""SDN weights: the fixed sizes, the fused and training layouts, their checks and files.

The fused (published) form has 153 numbers in six tensors ``w0 .. w5``
(:data:`FUSED_LAYOUT`); the training network has 193 parameters (:data:`TRAIN_LAYOUT`) and
four BatchNorm buffers (:data:`BUFFER_LAYOUT`). Weights files are the published ``.npz`` layout
or a refimpl HDF5 file (schema ``"refimpl-sdn"``, version 1, written atomically), recognised by
content.
"""
import os
import zipfile
from typing import NamedTuple

import numpy as np

from .._checks import check_array
from ..h5io import FileFormatError, atomic_h5, open_h5, read_tree, write_tree

#: Hidden channels and taps of the causal convolution (fixed by the published architecture).
C = 8
K = 8

#: BatchNorm epsilon (``torch.nn.BatchNorm1d`` default, also used by the published fold).
BN_EPS = 1e-5

#: The fused (published) layout: key -> (PyTorch name of the fused network, shape).
FUSED_LAYOUT = {
    "w0": ("conv1.weight", (C, 1, K)),
    "w1": ("conv1.bias", (C,)),
    "w2": ("conv2.weight", (C, C, 1)),
    "w3": ("conv2.bias", (C,)),
    "w4": ("conv3.weight", (1, C, 1)),
    "w5": ("conv3.bias", (1,)),
}

#: The training network's parameters (193 numbers) and shapes.
TRAIN_LAYOUT = {
    "encoder.weight": (C, 1, 1),
    "conv1.weight": (C, 1, K),
    "conv1.bias": (C,),
    "bn1.weight": (C,),
    "bn1.bias": (C,),
    "conv2.weight": (C, C, 1),
    "conv2.bias": (C,),
    "bn2.weight": (C,),
    "bn2.bias": (C,),
    "conv3.weight": (1, C, 1),
    "conv3.bias": (1,),
}

#: The training network's BatchNorm running statistics (not trained).
BUFFER_LAYOUT = {
    "bn1.running_mean": (C,),
    "bn1.running_var": (C,),
    "bn2.running_mean": (C,),
    "bn2.running_var": (C,),
}

#: HDF5 weights file schema.
SCHEMA = "refimpl-sdn"
SCHEMA_VERSION = 1


def _tensor_name(key):
    torch_name, shape = FUSED_LAYOUT[key]
    return f"{key} ({torch_name}, shape {shape})"


def check_weights(weights):
    """Validate fused SDN weights; return them as a dict of C-contiguous float64 arrays.

    Parameters
    ----------
    weights : dict
        Keys ``w0 .. w5`` of the shapes in :data:`FUSED_LAYOUT`, float64, finite.

    Raises
    ------
    ValueError
        Missing or unexpected tensor, wrong shape, non-finite values (naming the tensor).
    TypeError
        Not a dict, or a tensor that is not a float64 ndarray (naming the tensor).
    """
    if not hasattr(weights, "keys"):
        raise TypeError(f"SDN weights must be a dict with keys w0 .. w5 (or a path to a weights "
                        f"file: use load_weights), got {type(weights).__name__}")
    missing = [k for k in FUSED_LAYOUT if k not in weights]
    if missing:
        raise ValueError("SDN weights: missing tensor "
                         + ", ".join(_tensor_name(k) for k in missing))
    extra = sorted(set(weights) - set(FUSED_LAYOUT))
    if extra:
        raise ValueError(f"SDN weights: unexpected tensor(s) {extra}; the fused layout has "
                         f"exactly {list(FUSED_LAYOUT)}")
    out = {}
    for key, (torch_name, shape) in FUSED_LAYOUT.items():
        a = check_array(f"SDN weight {key} ({torch_name})", weights[key])
        if a.shape != shape:
            raise ValueError(f"SDN weight {key} ({torch_name}) must have shape {shape}, "
                             f"got {a.shape}")
        out[key] = a
    return out




def _check_tree(tree, layout, what):
    if not hasattr(tree, "keys"):
        raise TypeError(f"SDN {what} must be a dict, got {type(tree).__name__}")
    missing = [k for k in layout if k not in tree]
    if missing:
        raise ValueError(f"SDN {what}: missing tensor(s) {missing}")
    extra = sorted(set(tree) - set(layout))
    if extra:
        raise ValueError(f"SDN {what}: unexpected tensor(s) {extra}")
    out = {}
    for name, shape in layout.items():
        a = check_array(f"SDN {what} {name}", tree[name])
        if a.shape != shape:
            raise ValueError(f"SDN {what} {name} must have shape {shape}, got {a.shape}")
        out[name] = a
    return out


def check_train_params(params):
    """Validate the 193 training parameters (:data:`TRAIN_LAYOUT`), naming a bad tensor."""
    return _check_tree(params, TRAIN_LAYOUT, "training parameter")


def check_buffers(buffers):
    """Validate the BatchNorm running statistics (:data:`BUFFER_LAYOUT`); variances > 0."""
    buffers = _check_tree(buffers, BUFFER_LAYOUT, "buffer")
    for name in ("bn1.running_var", "bn2.running_var"):
        if np.any(buffers[name] < 0):
            raise ValueError(f"SDN buffer {name} must be >= 0, got min {buffers[name].min()}")
    return buffers



class FusedMatrices(NamedTuple):
    """The fused weights as the kernels use them (:func:`unpack`)."""
    W1: np.ndarray  # (C, K)  = w0[:, 0, :]
    b1: np.ndarray  # (C,)    = w1
    W2: np.ndarray  # (C, C)  = w2[:, :, 0]
    b2: np.ndarray  # (C,)    = w3
    w3: np.ndarray  # (C,)    = w4[0, :, 0]
    b3: float  # = w5[0]


def unpack(weights):
    """Checked fused weights ``w0 .. w5`` -> :class:`FusedMatrices` (C-contiguous float64)."""
    return FusedMatrices(np.ascontiguousarray(weights["w0"][:, 0, :]),  # (C, K)
                         weights["w1"],  # (C,)
                         np.ascontiguousarray(weights["w2"][:, :, 0]),  # (C, C)
                         weights["w3"],  # (C,)
                         np.ascontiguousarray(weights["w4"][0, :, 0]),  # (C,)
                         float(weights["w5"][0]))


def _file_tensor(path, key, read):
    """Read one stored tensor with ``read()`` and check it, naming it in every error.

    Floating tensors (float16/32/64) are converted to float64, which is exact; anything else
    is refused.
    """
    torch_name, shape = FUSED_LAYOUT[key]
    what = f"{path}: tensor {key} ({torch_name})"
    try:
        a = np.asarray(read())
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise FileFormatError(f"{what} cannot be read, the file is corrupted ({e})") from None
    if a.dtype.kind != "f":
        raise FileFormatError(f"{what} has dtype {a.dtype}, expected a floating type "
                              f"(float32 or float64)")
    if a.shape != shape:
        raise FileFormatError(f"{what} has shape {a.shape}, expected {shape}")
    if not np.all(np.isfinite(a)):
        raise FileFormatError(f"{what} contains non-finite values")
    return np.ascontiguousarray(a, dtype=np.float64)


def _load_npz(path):
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FileFormatError(f"{path}: not a readable .npz archive ({e})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise FileFormatError(f"{path}: a single .npy array, expected an .npz archive with "
                              f"keys {list(FUSED_LAYOUT)}")
    with archive:
        missing = [k for k in FUSED_LAYOUT if k not in archive.files]
        if missing:
            raise FileFormatError(f"{path}: missing tensor "
                                  + ", ".join(_tensor_name(k) for k in missing)
                                  + f" (the file has {archive.files})")
        weights = {k: _file_tensor(path, k, lambda k=k: archive[k]) for k in FUSED_LAYOUT}
    return weights, {"format": "npz", "path": os.fspath(path)}


def _attrs(obj):
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _load_h5(path):
    f = open_h5(path, SCHEMA, versions=(SCHEMA_VERSION,))  # FileFormatError for bad files
    try:
        with f:
            if "fused" not in f:
                raise FileFormatError(f"{path}: no group /fused with the SDN weights")
            g = f["fused"]
            missing = [k for k in FUSED_LAYOUT if k not in g]
            if missing:
                raise FileFormatError(f"{path}: missing tensor " + ", ".join(
                    f"/fused/{_tensor_name(k)}" for k in missing))
            weights = {k: _file_tensor(path, k, lambda k=k: g[k][()]) for k in FUSED_LAYOUT}
            meta = {"format": "hdf5", "path": os.fspath(path)}
            if "config" in f:
                meta["config"] = _attrs(f["config"])
            if "metrics" in f:
                meta["metrics"] = _attrs(f["metrics"])
    except (OSError, KeyError, RuntimeError) as e:
        raise FileFormatError(f"{path}: corrupted HDF5 file ({e})") from None
    return weights, meta


def load_weights(path):
    """Read fused SDN weights from the published ``.npz`` layout or a refimpl HDF5 file.

    The format is recognised by content, not by the file name.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    weights : dict of float64 arrays
        ``w0 .. w5`` (:data:`FUSED_LAYOUT`); float32 files are converted exactly.
    meta : dict
        ``format`` (``"npz"`` or ``"hdf5"``), ``path`` and, for HDF5 files written by
        :func:`save_weights`, ``config`` (the training configuration: ``tau``, ``theta``, ...)
        and ``metrics``.

    Raises
    ------
    refimpl.h5io.FileFormatError
        (a ValueError) One line naming the file and, where it applies, the tensor: missing
        file, neither HDF5 nor zip, corrupted archive or dataset, missing tensor, wrong shape,
        non-floating dtype, non-finite values, another schema or version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FileFormatError(f"{path}: is a folder, expected an SDN weights file")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return _load_h5(path)
    if magic[:2] == b"PK":
        return _load_npz(path)
    raise FileFormatError(f"{path}: neither an HDF5 file nor an .npz archive (corrupted, "
                          f"truncated or another format)")


def save_weights(path, weights, params=None, buffers=None, train_config=None, metrics=None,
                 history=None, overwrite=False):
    """Write SDN weights (and optionally how they were trained) to an HDF5 file, atomically.

    Layout (schema ``"refimpl-sdn"``, version 1)::

        /                  attrs: schema, schema_version, provenance (refimpl.h5io)
        /fused/w0 .. w5    float64, the fused 153-parameter form (attr torch_name)
        /train/params/*    the 193 training parameters (when given)
        /train/buffers/*   the BatchNorm running statistics (when given)
        /config            attrs: the training configuration (tau, theta, mean, std, ...)
        /metrics           attrs: evaluation results (agreement, membrane_mse, ...)
        /history/*         per-epoch arrays (e.g. loss)

    Parameters
    ----------
    path : str or os.PathLike
    weights : dict
        Fused weights (validated with :func:`check_weights`).
    params, buffers : dict or None
        Training-network parameters and running statistics.
    train_config : dict or None
        Scalars (numbers, str, bool) stored as attributes of ``/config``.
    metrics : dict or None
        Scalars stored as attributes of ``/metrics``.
    history : dict or None
        Arrays stored under ``/history``.
    overwrite : bool, default False
        An existing file raises FileExistsError unless set.
    """
    weights = check_weights(weights)
    if params is not None:
        params = check_train_params(params)
    if buffers is not None:
        buffers = check_buffers(buffers)
    with atomic_h5(path, SCHEMA, SCHEMA_VERSION, overwrite=overwrite) as f:
        g = f.create_group("fused")
        for key, (torch_name, _) in FUSED_LAYOUT.items():
            g.create_dataset(key, data=weights[key]).attrs["torch_name"] = torch_name
        if params is not None or buffers is not None:
            t = f.create_group("train")
            if params is not None:
                write_tree(t.create_group("params"), params)
            if buffers is not None:
                write_tree(t.create_group("buffers"), buffers)
        for name, attrs in (("config", train_config), ("metrics", metrics)):
            if attrs:
                grp = f.create_group(name)
                for k, v in attrs.items():
                    grp.attrs[k] = v
        if history:
            write_tree(f.create_group("history"), history)


def load_training_state(path):
    """Read the training network stored by :func:`save_weights`: ``(params, buffers, config)``.

    Raises FileFormatError when the file has no ``/train`` group or a tensor is missing, is
    not float64, has the wrong shape or holds a NaN or an infinity (naming it).
    """
    path = os.fspath(path)
    with open_h5(path, SCHEMA, versions=(SCHEMA_VERSION,)) as f:
        if "train" not in f or "params" not in f["train"] or "buffers" not in f["train"]:
            raise FileFormatError(f"{path}: no /train/params and /train/buffers (weights only)")
        try:
            params = read_tree(f["train/params"])
            buffers = read_tree(f["train/buffers"])
        except (OSError, KeyError) as e:
            raise FileFormatError(f"{path}: corrupted training state ({e})") from None
        cfg = _attrs(f["config"]) if "config" in f else {}
    for layout, tree, where in ((TRAIN_LAYOUT, params, "params"),
                                (BUFFER_LAYOUT, buffers, "buffers")):
        for name, shape in layout.items():
            if name not in tree:
                raise FileFormatError(f"{path}: missing tensor /train/{where}/{name}")
            a = np.asarray(tree[name])
            if a.dtype != np.float64 or a.shape != shape:
                raise FileFormatError(f"{path}: tensor /train/{where}/{name} is {a.dtype} "
                                      f"{a.shape}, "
                                      f"expected float64 {shape}")
            if not np.all(np.isfinite(a)):
                raise FileFormatError(f"{path}: tensor /train/{where}/{name} contains "
                                      f"non-finite values")
    return params, buffers, cfg


def resolve_weights(weights):
    """A dict is validated; a path is loaded (published ``.npz`` or refimpl HDF5)."""
    if isinstance(weights, (str, os.PathLike)):
        weights, _ = load_weights(weights)
    return check_weights(weights)


# --------------------------------------------------------------------------------------------
# Fused inference
# --------------------------------------------------------------------------------------------
