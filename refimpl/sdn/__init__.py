"""SDN: the Surrogate Dynamic Network of SpikingSSM (DESIGN.md section 6).

A tiny causal CNN predicts the decayed potential ``m_t = tau u_{t-1}`` of a hard-reset LIF
neuron from the last eight inputs, so that spikes ``s_t = Theta(m_t + x_t - theta)`` are
computed for every ``t`` at once instead of one step after another (Shen et al., SpikingSSMs,
arXiv 2408.14909, section "Surrogate Dynamic Network").

**Fused form** (inference, 153 parameters; the published ``.npz`` layout ``w0 .. w5``)::

    h1[c, t] = relu(b1[c] + sum_{k=0..7} W1[c, k] x[t-8+k])      (x[j] = 0 for j < 0)
    h2[c, t] = relu(b2[c] + sum_j W2[c, j] h1[j, t] + h1[c, t])
    m[t]     = b3 + sum_c w3[c] h2[c, t]
    s[t]     = Theta(m[t] + x[t] - theta)

with ``W1 = w0[:, 0, :]``, ``b1 = w1``, ``W2 = w2[:, :, 0]``, ``b2 = w3``, ``w3 = w4[0, :, 0]``,
``b3 = w5[0]``. It sees ``x[t-8 .. t-1]``, never ``x[t]``: ``m_t`` is strictly causal.

**Training form** (193 parameters, PyTorch layer names)::

    e  = encoder(x)              Conv1d(1 -> 8, k=1, no bias)        encoder.weight (8, 1, 1)
    z1 = conv1(e)                Conv1d(8 -> 8, k=8, padding=8,      conv1.weight (8, 1, 8),
                                 groups=8), length L + 9             conv1.bias (8,)
    y1 = bn1(z1)                 BatchNorm1d(8) over (B, L + 9)      bn1.weight, bn1.bias (8,)
    h1 = relu(y1[..., :L])       truncate to the first L steps
    z2 = conv2(h1)               Conv1d(8 -> 8, k=1)                 conv2.weight (8, 8, 1),
                                                                     conv2.bias (8,)
    h2 = relu(bn2(z2) + h1)      BatchNorm1d(8), residual            bn2.weight, bn2.bias (8,)
    m  = conv3(h2)               Conv1d(8 -> 1, k=1)                 conv3.weight (1, 8, 1),
                                                                     conv3.bias (1,)

plus the running statistics ``bn{1,2}.running_mean``, ``bn{1,2}.running_var`` (buffers, not
trained). Training-mode BatchNorm normalises by the batch mean and biased variance over
``(B, time)`` and updates the running statistics with momentum 0.1 and the unbiased variance
(``torch.nn.BatchNorm1d``); eval mode uses the running statistics. As in the original network,
``bn1`` sees all ``L + 9`` outputs of the padded convolution before the truncation, so its
batch statistics include the 9 tail steps; in eval mode this makes no difference.

**Folding** (:func:`fold`): with eval-mode BatchNorm every layer before a relu is affine, so
``s1 = bn1.weight / sqrt(bn1.running_var + 1e-5)`` and likewise ``s2`` give::

    W1[c, k] = s1[c] encoder.weight[c] conv1.weight[c, k]
    b1[c]    = s1[c] (conv1.bias[c] - bn1.running_mean[c]) + bn1.bias[c]
    W2[c, j] = s2[c] conv2.weight[c, j]
    b2[c]    = s2[c] (conv2.bias[c] - bn2.running_mean[c]) + bn2.bias[c]

and ``conv3`` unchanged. Fused and unfused forwards agree to rounding (tested to 1e-12).

**Training** (:func:`train_sdn`, ``refimpl sdn train``): inputs ``x ~ N(mean, std^2)`` of
length ``L``, targets ``m_t = tau u_{t-1}`` from the iterative hard-reset LIF
(:func:`refimpl.neurons.neuron_fwd`), Huber (or MSE) loss on ``m``, AdamW (lr 1e-2, weight
decay 1e-2, :mod:`refimpl.optim`) with a cosine schedule, batches of 64 sequences, the
forward and backward of the training network by hand (:func:`train_fwd`, :func:`train_bwd`).
Defaults: 1024 sequences of ``L = 1024``, 400 epochs (6400 updates). **[choice]** The
depthwise taps start as the LIF's impulse response (:func:`init_train_params`,
``init="lif"``): from PyTorch's default initialisation the same recipe stalls near 99.7 %
spike agreement for thousands of updates, from the ``lif`` start it passes 99.9 %.

**SDN neuron** (:func:`sdn_neuron_fwd`): in a model the SDN prediction is a constant (no
gradient flows through the CNN); the backward is ``ds/dx = g(m + x - theta)`` with a surrogate
``g`` of :mod:`refimpl.surrogates` (default ``triangle``).

Shapes: ``R`` rows of length ``L`` (any ``(B, H, L)`` is flattened to ``R = B * H`` rows);
``C = 8`` hidden channels, ``K = 8`` taps.
"""
import dataclasses
import math
import os
import time
import zipfile

import numpy as np
from numba import njit

from .. import config
from .._checks import check_array, check_int, check_name, check_real
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

_SPIKE_CONDITIONS = {"ge": True, "gt": False}


# --------------------------------------------------------------------------------------------
# Weights: validation, loading, saving
# --------------------------------------------------------------------------------------------


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


def _unpack(weights):
    """Fused weights -> the kernel's ``W1 (C, K), b1 (C,), W2 (C, C), b2 (C,), w3 (C,), b3``."""
    return (np.ascontiguousarray(weights["w0"][:, 0, :]),  # (C, K)
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

    Raises FileFormatError when the file has no ``/train`` group or a tensor is missing or
    has the wrong shape (naming it).
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
    return params, buffers, cfg


def _resolve_weights(weights):
    """A dict is validated; a path is loaded (published ``.npz`` or refimpl HDF5)."""
    if isinstance(weights, (str, os.PathLike)):
        weights, _ = load_weights(weights)
    return check_weights(weights)


# --------------------------------------------------------------------------------------------
# Fused inference
# --------------------------------------------------------------------------------------------


@njit(**config.NJIT_OPTS)
def _sdn_rows(x, W1, b1, W2, b2, w3, b3, theta, ge, m, s):
    """Fused SDN over rows: writes ``m (R, L)`` and ``s (R, L)``.

    Per row and step (``x[j] = 0`` for ``j < 0``)::

        h1[c] = relu(b1[c] + sum_k W1[c, k] x[t-K+k])
        h2[c] = relu(b2[c] + sum_j W2[c, j] h1[j] + h1[c])
        m[t]  = b3 + sum_c w3[c] h2[c];   s[t] = (m[t] + x[t] >= theta)  (> with ge False)

    Loops run tap- or channel-outer and time-inner (independent iterations that vectorise
    without reassociation); every sum still adds its terms in the order written above
    (``k = 0 .. K-1``, ``j = 0 .. C-1``, then ``+ h1[c]``; ``c = 0 .. C-1``).
    Preconditions: C-contiguous float64, ``W1 (C, K)``, ``W2 (C, C)``.
    """
    R, L = x.shape
    nc, nk = W1.shape
    h1 = np.empty((nc, L))  # (C, L) scratch, one row at a time
    a2 = np.empty(L)  # (L,)
    for r in range(R):
        xr = x[r]
        mr = m[r]
        for c in range(nc):
            hc = h1[c]  # (L,) view
            for t in range(L):
                hc[t] = b1[c]
            for k in range(nk):
                w = W1[c, k]
                off = nk - k  # h1[t] reads x[t - off]
                n = L - off
                if n > 0:
                    ho = hc[off:]
                    for i in range(n):
                        ho[i] += w * xr[i]
            for t in range(L):
                hc[t] = hc[t] if hc[t] > 0.0 else 0.0
        for t in range(L):
            mr[t] = b3
        for c in range(nc):
            for t in range(L):
                a2[t] = b2[c]
            for j in range(nc):
                w = W2[c, j]
                hj = h1[j]
                for t in range(L):
                    a2[t] += w * hj[t]
            hc = h1[c]
            wc = w3[c]
            for t in range(L):
                v = a2[t] + hc[t]
                mr[t] += wc * (v if v > 0.0 else 0.0)  # + 0.0 leaves mr[t] unchanged
        sr = s[r]
        for t in range(L):
            h = mr[t] + xr[t]
            sr[t] = 1.0 if (h >= theta if ge else h > theta) else 0.0


def sdn_forward(x, weights, theta=1.0, spike_condition="ge"):
    """Fused SDN inference: predicted decayed potential and spikes.

    Parameters
    ----------
    x : float64 array (L,), (R, L) or (B, H, L)
        Input currents; every row (last axis) is an independent sequence.
    weights : dict or str or os.PathLike
        Fused weights ``w0 .. w5`` (:data:`FUSED_LAYOUT`), or a weights file
        (:func:`load_weights`).
    theta : float, default 1.0
        Threshold the SDN was trained for (the published network: 1).
    spike_condition : {"ge", "gt"}, default "ge"
        Spike when ``m + x >= theta`` (SpikingSSM) or ``> theta``.

    Returns
    -------
    m : float64, shape of ``x``
        Predicted ``tau u_{t-1}`` (causal: depends on ``x[t-8 .. t-1]`` only).
    s : float64, shape of ``x``
        Spikes ``Theta(m + x - theta)`` in {0, 1}.
    """
    x = check_array("x", x, (1, 2, 3))
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one time step (L >= 1), got shape {x.shape}")
    W = _resolve_weights(weights)
    theta = check_real("theta", theta)
    ge = check_name("spike_condition", spike_condition, _SPIKE_CONDITIONS)
    x2 = x.reshape(-1, x.shape[-1])  # (R, L)
    m = np.empty_like(x2)  # (R, L)
    s = np.empty_like(x2)  # (R, L)
    _sdn_rows(x2, *_unpack(W), theta, ge, m, s)
    return m.reshape(x.shape), s.reshape(x.shape)


def fused_forward_numpy(x, weights):
    """The fused forward in plain NumPy over ``x (R, L)``: the readable form of the kernel.

    Returns ``m (R, L)``. Used as an oracle in tests; no validation.
    """
    W1, b1, W2, b2, w3, b3 = _unpack(weights)
    L = x.shape[1]
    win = _windows(x)[:, :, :L].transpose(1, 2, 0)  # (R, L, K): x[t-8 .. t-1]
    h1 = np.maximum(b1 + win @ W1.T, 0.0)  # (R, L, C)
    h2 = np.maximum(b2 + h1 @ W2.T + h1, 0.0)  # (R, L, C)
    return b3 + h2 @ w3  # (R, L)


# --------------------------------------------------------------------------------------------
# SDN neuron (for models): SDN prediction as a constant, surrogate backward
# --------------------------------------------------------------------------------------------


def sdn_neuron_fwd(x, weights, theta=1.0, spike_condition="ge", surrogate="triangle",
                   surrogate_scale=None, smooth=False):
    """SDN neuron forward: ``s = Theta(m + x - theta)`` with ``m = SDN(x)`` a constant.

    Parameters
    ----------
    x : float64 (B, H, L)
    weights : dict or str or os.PathLike
        Fused weights or a weights file (:func:`load_weights`).
    theta : float, default 1.0
        Threshold (the one the SDN was trained for; the model scales its input by
        ``exp(-ln_vth)`` to get a learnable threshold, DESIGN.md section 8).
    spike_condition : {"ge", "gt"}, default "ge"
    surrogate : str, default "triangle"
        A name of :data:`refimpl.surrogates.SURROGATES`, used by ``smooth`` and the backward.
    surrogate_scale : float or None
        The surrogate's shape constant (w, a or k); ``None`` for its default.
    smooth : bool, default False
        Emit the surrogate's primitive ``G(m + x - theta)`` instead of the Heaviside (``m``
        still a constant), so that finite differences check :func:`sdn_neuron_bwd`.

    Returns
    -------
    s : float64 (B, H, L)
        Spikes in {0, 1} (or ``G(m + x - theta)`` when ``smooth``).
    m : float64 (B, H, L)
        The SDN prediction; pass it to :func:`sdn_neuron_bwd`.
    """
    from ..surrogates import get_surrogate

    x = check_array("x", x, 3)
    sur = get_surrogate(surrogate)
    scale = sur.resolve_scale(surrogate_scale)
    m, s = sdn_forward(x, weights, theta=theta, spike_condition=spike_condition)
    if smooth:
        s = sdn_spikes(m, x, theta, smooth=True, surrogate=surrogate, surrogate_scale=scale)
    return s, m


def sdn_spikes(m, x, theta=1.0, spike_condition="ge", smooth=False, surrogate="triangle",
               surrogate_scale=None):
    """Spikes from a given ``m``: ``Theta(m + x - theta)``, or ``G(m + x - theta)`` if ``smooth``.

    The map the SDN neuron differentiates (``m`` a constant); float64 arrays of one shape.
    """
    from ..surrogates import get_surrogate

    z = m + x - theta  # (B, H, L)
    if smooth:
        return get_surrogate(surrogate).primitive(z, surrogate_scale)
    ge = check_name("spike_condition", spike_condition, _SPIKE_CONDITIONS)
    return ((z >= 0) if ge else (z > 0)).astype(np.float64)


def sdn_neuron_bwd(x, m, ds, theta=1.0, surrogate="triangle", surrogate_scale=None):
    """SDN neuron backward: ``dx = ds * g(m + x - theta)`` (no gradient through the SDN).

    Parameters
    ----------
    x, m : float64 (B, H, L)
        Input and the SDN prediction returned by :func:`sdn_neuron_fwd`.
    ds : float64 (B, H, L)
        Cotangent of the spikes.
    theta, surrogate, surrogate_scale
        As in the forward.

    Returns
    -------
    dx : float64 (B, H, L), newly allocated.

    Notes
    -----
    SpikingSSM trains with the SDN in place of the iterative neuron and treats ``m`` as a
    constant, so the gradient is that of the memoryless ``Theta(x + const - theta)``
    (DESIGN.md section 6). It is the ``sltt`` grad mode of the iterative neuron with the SDN's
    ``m`` in place of ``tau u_{t-1}``.
    """
    from ..surrogates import get_surrogate

    sur = get_surrogate(surrogate)
    scale = sur.resolve_scale(surrogate_scale)
    x = check_array("x", x, 3)
    m = check_array("m", m, 3)
    ds = check_array("ds", ds, 3)
    if m.shape != x.shape or ds.shape != x.shape:
        raise ValueError(f"x, m and ds must have the same shape, got x {x.shape}, m {m.shape}, "
                         f"ds {ds.shape}")
    theta = check_real("theta", theta)
    return ds * sur.grad(m + x - theta, scale)  # (B, H, L)


# --------------------------------------------------------------------------------------------
# Training network: parameters, forward, backward, folding
# --------------------------------------------------------------------------------------------


def _init_torch(params, rng, tau):
    """PyTorch's defaults only (the depthwise taps stay ``U(-1/sqrt(8), 1/sqrt(8))``)."""
    return params


def _init_lif(params, rng, tau):
    """Depthwise taps start as the LIF's impulse response, eight distinct features.

    Channel ``c`` gets the taps ``sign_c tau^(K-1-k-shift_c)`` (a leaky sum of the inputs
    ending at ``x[t-1]`` for ``shift_c = 0`` or at ``x[t-2]`` for ``shift_c = 1``) with
    ``shift_c = c % 2``, ``sign_c = +1`` for ``c % 4 < 2`` else ``-1``, and a relu threshold
    ``thr_c = 0`` for ``c < 4`` and ``1`` (about the spike threshold in units of the batch
    standard deviation) for ``c >= 4``: ``bn1.bias[c] = -sign_c thr_c``. These are the
    features the reset needs: the reset-free membranes at ``t-1`` and ``t-2``, both signs,
    and where they cross the threshold. The encoder starts at 1 so that it keeps the signs
    (BatchNorm makes its scale irrelevant); ``U(-0.01, 0.01)`` noise is added to the taps.
    """
    w = np.zeros((C, K))  # (C, K)
    j = np.arange(K)[::-1]  # K-1-k: steps back from x[t-1]
    beta = np.zeros(C)  # (C,)
    for c in range(C):
        shift = c % 2
        sign = 1.0 if c % 4 < 2 else -1.0
        w[c, :K - shift] = sign * tau ** j[shift:]
        beta[c] = -sign * (0.0 if c < 4 else 1.0)
    w += rng.uniform(-0.01, 0.01, size=(C, K))
    params["conv1.weight"] = w[:, None, :]  # (C, 1, K)
    params["encoder.weight"] = np.ones((C, 1, 1))  # (C, 1, 1)
    params["bn1.bias"] = beta
    return params


#: Initialisations of the training network (``SDNTrainConfig.init``).
INITS = {"lif": _init_lif, "torch": _init_torch}


def init_train_params(seed=0, init="lif", tau=0.125):
    """Draw the 193 training parameters and fresh BatchNorm buffers.

    Parameters
    ----------
    seed : int or numpy.random.Generator, default 0
    init : {"lif", "torch"}, default "lif"
        ``torch``: as ``torch.nn`` initialises the layers: conv weights and biases
        ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kaiming-uniform with ``a = sqrt(5)``;
        fan_in = 1 for the encoder, 8 for the others), BatchNorm ``weight = 1``, ``bias = 0``.
        ``lif`` **[choice]**: the same, except that the depthwise taps start as the LIF's
        impulse response, with the encoder at 1 and relu thresholds at 0 and 1
        (:func:`_init_lif`). With the published recipe (lr 1e-2, batch 64, cosine), 3200
        updates from ``torch`` ended at 99.72 % spike agreement (loss flat for the last
        half); from ``lif`` the default 6400 updates reach 99.93 % (two seeds measured).
    tau : float, default 0.125
        The LIF decay the ``lif`` taps follow.

    Returns
    -------
    params : dict (:data:`TRAIN_LAYOUT`), buffers : dict (:data:`BUFFER_LAYOUT`)
        Running statistics start at ``mean = 0``, ``var = 1``.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    make = check_name("init", init, INITS)
    tau = check_real("tau", tau, 0.0, 1.0, hi_open=True)
    fan_in = {"encoder": 1, "conv1": K, "conv2": C, "conv3": C}
    params = {}
    for name, shape in TRAIN_LAYOUT.items():
        layer, kind = name.split(".")
        if layer.startswith("bn"):
            params[name] = np.ones(shape) if kind == "weight" else np.zeros(shape)
        else:
            bound = 1.0 / math.sqrt(fan_in[layer])
            params[name] = rng.uniform(-bound, bound, size=shape)
    params = make(params, rng, tau)
    buffers = {name: (np.ones(shape) if name.endswith("var") else np.zeros(shape))
               for name, shape in BUFFER_LAYOUT.items()}
    return params, buffers


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


def _windows(x):
    """Windows ``X[k, b, t] = x[b, t - K + k]`` (zero outside ``[0, L)``) for ``t = 0 .. L + K``.

    Shape (K, B, L + K + 1).

    The input windows of ``Conv1d(k=K, padding=K)``, whose output has length ``T1 = L + K + 1``;
    tap-major so that the depthwise convolution is one matrix product ``Wd @ X``.
    """
    Bsz, L = x.shape
    xp = np.zeros((Bsz, L + 2 * K))  # (B, L + 2K)
    xp[:, K:K + L] = x
    T1 = L + K + 1
    return np.stack([xp[:, k:k + T1] for k in range(K)])  # (K, B, T1)


def _bn_fwd(z, gamma, beta, mean, var, training):
    """BatchNorm of channel-major ``z (C, B, T)`` over axes (1, 2); returns ``y``, saved values."""
    if training:
        mean = z.mean(axis=(1, 2))  # (C,)
        var = z.var(axis=(1, 2))  # (C,) biased
    inv = 1.0 / np.sqrt(var + BN_EPS)  # (C,)
    zh = (z - mean[:, None, None]) * inv[:, None, None]  # (C, B, T)
    y = gamma[:, None, None] * zh + beta[:, None, None]  # (C, B, T)
    return y, (zh, inv, mean, var)


def _bn_bwd(dy, gamma, saved, training):
    """Backward of :func:`_bn_fwd`: ``(dz, dgamma, dbeta)``.

    Training mode (batch statistics over ``n = B T`` values per channel)::

        dz = inv * (dzh - mean(dzh) - zh * mean(dzh * zh)),   dzh = gamma * dy

    Eval mode (running statistics are constants): ``dz = inv * gamma * dy``.
    """
    zh, inv, _, _ = saved
    Cn = zh.shape[0]
    n = zh.shape[1] * zh.shape[2]
    dy2 = dy.reshape(Cn, n)  # (C, n)
    dgamma = np.einsum("cn,cn->c", dy2, zh.reshape(Cn, n))  # (C,)
    dbeta = dy2.sum(axis=1)  # (C,)
    scale = (gamma * inv)[:, None, None]  # (C, 1, 1)
    if training:
        dz = scale * (dy - (dbeta / n)[:, None, None]
                      - zh * (dgamma / n)[:, None, None])  # (C, B, T)
    else:
        dz = scale * dy  # (C, B, T)
    return dz, dgamma, dbeta


def train_fwd(x, params, buffers, training=True):
    """Forward of the 193-parameter training network.

    Parameters
    ----------
    x : float64 (B, L)
        Input sequences (one channel).
    params : dict
        :data:`TRAIN_LAYOUT` (not validated here: see :func:`check_train_params`).
    buffers : dict
        :data:`BUFFER_LAYOUT`; used in eval mode only (training mode uses batch statistics).
    training : bool, default True
        BatchNorm mode.

    Returns
    -------
    m : float64 (B, L)
        Predicted decayed potential.
    cache : dict
        Everything :func:`train_bwd` and :func:`update_running_stats` need.

    Notes
    -----
    Hidden activations are kept channel-major, ``(C, B, T)``, so that every convolution is one
    matrix product over the ``B T`` positions and every BatchNorm reduction runs over
    contiguous memory. Plain NumPy on purpose: the work is a handful of passes over
    ``(8, B, L)`` arrays plus 8x8 matrix products, which NumPy and BLAS already run at memory
    speed; fused Numba kernels for the same passes (without fastmath, so reductions stay
    sequential) measured no faster at B = 64, L = 1024 (about 30 ms per step either way).
    """
    Bsz, L = x.shape
    T1 = L + K + 1
    a = params["encoder.weight"][:, 0, 0]  # (C,)
    Wd = params["conv1.weight"][:, 0, :]  # (C, K)
    X = _windows(x)  # (K, B, T1)
    conv = (Wd @ X.reshape(K, -1)).reshape(C, Bsz, T1)  # (C, B, T1): depthwise conv of x
    z1 = (a * conv.T + params["conv1.bias"]).T  # (C, B, T1): encoder scale a[c], bias
    y1, bn1 = _bn_fwd(z1, params["bn1.weight"], params["bn1.bias"],
                      buffers["bn1.running_mean"], buffers["bn1.running_var"], training)
    y1t = y1[:, :, :L]  # (C, B, L) truncation to the first L steps (a view)
    h1 = np.maximum(y1t, 0.0)  # (C, B, L)
    W2 = params["conv2.weight"][:, :, 0]  # (C, C)
    z2 = (W2 @ h1.reshape(C, -1)).reshape(C, Bsz, L) + params["conv2.bias"][:, None, None]
    y2, bn2 = _bn_fwd(z2, params["bn2.weight"], params["bn2.bias"],
                      buffers["bn2.running_mean"], buffers["bn2.running_var"], training)
    pre2 = y2 + h1  # (C, B, L) residual
    h2 = np.maximum(pre2, 0.0)  # (C, B, L)
    w3 = params["conv3.weight"][0, :, 0]  # (C,)
    m = (w3 @ h2.reshape(C, -1)).reshape(Bsz, L) + params["conv3.bias"][0]  # (B, L)
    cache = dict(x_shape=x.shape, X=X, conv=conv, a=a, Wd=Wd, bn1=bn1, y1t=y1t, h1=h1, W2=W2,
                 bn2=bn2, pre2=pre2, h2=h2, w3=w3, training=training,
                 gamma1=params["bn1.weight"], gamma2=params["bn2.weight"])
    return m, cache


def train_bwd(cache, dm):
    """Backward of :func:`train_fwd`: gradients for ``x`` and every parameter (overwritten).

    Parameters
    ----------
    cache : dict
        From :func:`train_fwd`.
    dm : float64 (B, L)
        Cotangent of ``m``.

    Returns
    -------
    dx : float64 (B, L)
    grads : dict
        One float64 array per name of :data:`TRAIN_LAYOUT`, same shapes. In training mode
        the gradient includes the paths through the batch statistics.
    """
    Bsz, L = cache["x_shape"]
    T1 = L + K + 1
    training = cache["training"]
    g = {}
    # m = w3 . h2 + b3
    h2 = cache["h2"].reshape(C, -1)  # (C, B L)
    g["conv3.weight"] = (h2 @ dm.reshape(-1))[None, :, None]  # (1, C, 1)
    g["conv3.bias"] = np.array([dm.sum()])  # (1,)
    dpre2 = cache["w3"][:, None, None] * dm * (cache["pre2"] > 0)  # (C, B, L)
    # h2 = relu(bn2(z2) + h1)
    dz2, g["bn2.weight"], g["bn2.bias"] = _bn_bwd(dpre2, cache["gamma2"], cache["bn2"], training)
    dz2_2 = dz2.reshape(C, -1)  # (C, B L)
    g["conv2.weight"] = (dz2_2 @ cache["h1"].reshape(C, -1).T)[:, :, None]  # (C, C, 1)
    g["conv2.bias"] = dz2_2.sum(axis=1)  # (C,)
    dh1 = dpre2 + (cache["W2"].T @ dz2_2).reshape(C, Bsz, L)  # (C, B, L): residual + conv2
    # h1 = relu(y1[..., :L]); the truncated tail gets no gradient (but shaped the batch stats)
    dy1 = np.zeros((C, Bsz, T1))  # (C, B, T1)
    dy1[:, :, :L] = dh1 * (cache["y1t"] > 0)
    dz1, g["bn1.weight"], g["bn1.bias"] = _bn_bwd(dy1, cache["gamma1"], cache["bn1"], training)
    # z1 = a * conv(x, Wd) + b
    a, Wd = cache["a"], cache["Wd"]
    dz1_2 = dz1.reshape(C, -1)  # (C, B T1)
    g["conv1.bias"] = dz1_2.sum(axis=1)  # (C,)
    G = dz1_2 @ cache["X"].reshape(K, -1).T  # (C, K): sum over positions of dz1 * window
    g["conv1.weight"] = (a[:, None] * G)[:, None, :]  # (C, 1, K)
    g["encoder.weight"] = np.einsum("cn,cn->c", dz1_2, cache["conv"].reshape(C, -1))[:, None, None]
    dX = ((a[:, None] * Wd).T @ dz1_2).reshape(K, Bsz, T1)  # (K, B, T1)
    dxp = np.zeros((Bsz, T1 + K - 1))  # (B, L + 2K): gradient of the padded input
    for k in range(K):  # X[k, b, t] = xp[b, t + k]
        dxp[:, k:k + T1] += dX[k]
    dx = dxp[:, K:K + L].copy()  # (B, L)
    return dx, {name: g[name] for name in TRAIN_LAYOUT}


def update_running_stats(buffers, cache, momentum=0.1):
    """New running statistics after a training-mode forward (``torch.nn.BatchNorm1d`` rule).

    ``running_mean = (1 - momentum) running_mean + momentum batch_mean`` and likewise for the
    variance with the **unbiased** batch variance ``var * n / (n - 1)``, ``n = B * T``.
    Returns a new dict; ``buffers`` is not modified.
    """
    if not cache["training"]:
        raise ValueError("running statistics are only updated after a training-mode forward")
    out = {}
    Bsz, L = cache["x_shape"]
    for bn, n in (("bn1", Bsz * (L + K + 1)), ("bn2", Bsz * L)):
        _, _, mean, var = cache[bn]
        unbiased = var * n / (n - 1) if n > 1 else var  # (C,)
        out[f"{bn}.running_mean"] = (1 - momentum) * buffers[f"{bn}.running_mean"] + momentum * mean
        out[f"{bn}.running_var"] = ((1 - momentum) * buffers[f"{bn}.running_var"]
                                    + momentum * unbiased)
    return out


def fold(params, buffers):
    """Fold encoder and eval-mode BatchNorms into the fused 153-parameter form (exact).

    Parameters
    ----------
    params : dict (:data:`TRAIN_LAYOUT`)
    buffers : dict (:data:`BUFFER_LAYOUT`)

    Returns
    -------
    dict
        Fused weights ``w0 .. w5`` (:data:`FUSED_LAYOUT`), float64. See the module docstring
        for the formulas.
    """
    params = check_train_params(params)
    buffers = check_buffers(buffers)
    s1 = params["bn1.weight"] / np.sqrt(buffers["bn1.running_var"] + BN_EPS)  # (C,)
    s2 = params["bn2.weight"] / np.sqrt(buffers["bn2.running_var"] + BN_EPS)  # (C,)
    a = params["encoder.weight"][:, 0, 0]  # (C,)
    W1 = (s1 * a)[:, None] * params["conv1.weight"][:, 0, :]  # (C, K)
    b1 = s1 * (params["conv1.bias"] - buffers["bn1.running_mean"]) + params["bn1.bias"]  # (C,)
    W2 = s2[:, None] * params["conv2.weight"][:, :, 0]  # (C, C)
    b2 = s2 * (params["conv2.bias"] - buffers["bn2.running_mean"]) + params["bn2.bias"]  # (C,)
    return {
        "w0": W1[:, None, :].copy(),  # (C, 1, K)
        "w1": b1,  # (C,)
        "w2": W2[:, :, None].copy(),  # (C, C, 1)
        "w3": b2,  # (C,)
        "w4": params["conv3.weight"].copy(),  # (1, C, 1)
        "w5": params["conv3.bias"].copy(),  # (1,)
    }


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _mse(d, delta=None):
    """``mean(d^2)`` and its derivative with respect to ``d`` (``delta`` is unused)."""
    return float(np.mean(d * d)), (2.0 / d.size) * d


def _huber(d, delta=1.0):
    """``mean(0.5 d^2 if |d| <= delta else delta (|d| - delta / 2))`` (torch HuberLoss)."""
    ad = np.abs(d)
    quad = ad <= delta
    value = np.where(quad, 0.5 * d * d, delta * (ad - 0.5 * delta))
    grad = np.where(quad, d, delta * np.sign(d)) / d.size
    return float(value.mean()), grad


LOSSES = {"mse": _mse, "huber": _huber}


def loss_fwd_bwd(m, target, loss="huber", delta=1.0):
    """Loss (mean over all elements) of prediction ``m`` against ``target`` and ``dloss/dm``.

    ``delta`` is the Huber threshold (ignored by ``mse``).
    """
    fn = check_name("loss", loss, LOSSES)
    return fn(m - target, delta)


# --------------------------------------------------------------------------------------------
# Data, training, evaluation
# --------------------------------------------------------------------------------------------

#: Independent random streams under one user seed: ``default_rng([stream, seed])``.
_STREAM_DATA, _STREAM_INIT, _STREAM_SHUFFLE, _STREAM_EVAL = 0, 1, 2, 3


def _rng(seed, stream):
    seed = check_int("seed", seed, 0)
    return np.random.default_rng([stream, seed])


def lif_decayed_potential(x, tau, theta=1.0, spike_condition="ge"):
    """The iterative hard-reset LIF on rows ``x (R, L)``: ``m = tau u_{t-1}`` and spikes.

    Uses :func:`refimpl.neurons.neuron_fwd` (reset ``hard``, ``u_reset = 0``). Returns
    ``m (R, L)`` and ``s (R, L)``; ``m[:, 0] = 0``.
    """
    from ..neurons import NeuronConfig, neuron_fwd

    cfg = NeuronConfig(reset="hard", tau=tau, theta=theta, spike_condition=spike_condition)
    s, _, u = neuron_fwd(x[None], cfg)  # (1, R, L) each
    m = np.zeros_like(x)  # (R, L)
    m[:, 1:] = tau * u[0, :, :-1]
    return m, s[0]


def make_dataset(samples, length, tau, theta=1.0, mean=0.0, std=1.0, seed=0,
                 spike_condition="ge", stream=_STREAM_DATA):
    """Training or test data: Gaussian inputs and the iterative LIF's decayed potential.

    Parameters
    ----------
    samples : int, >= 1
        Number of sequences.
    length : int, >= 1
        ``L``.
    tau : float in [0, 1)
    theta : float > 0, default 1.0
    mean, std : float, default 0, 1
        ``x ~ N(mean, std^2)``, ``std >= 0``.
    seed : int >= 0

    Returns
    -------
    x, m, s : float64 (samples, length)
        Inputs, targets ``m_t = tau u_{t-1}`` and the LIF's spikes.
    """
    samples = check_int("samples", samples, 1)
    length = check_int("length", length, 1)
    tau = check_real("tau", tau, 0.0, 1.0, hi_open=True)
    theta = check_real("theta", theta, 0.0, lo_open=True)
    mean = check_real("mean", mean)
    std = check_real("std", std, 0.0)
    x = mean + std * _rng(seed, stream).standard_normal((samples, length))  # (S, L)
    m, s = lif_decayed_potential(x, tau, theta, spike_condition)  # (S, L) each
    return x, m, s


@dataclasses.dataclass(frozen=True)
class SDNTrainConfig:
    """Settings of :func:`train_sdn` (defaults: the ``refimpl sdn train`` defaults).

    ``tau, theta, mean, std, length, samples``: the LIF and the training data;
    ``epochs, batch_size, lr, weight_decay, warmup_steps, min_lr_factor, loss, huber_delta,
    bn_momentum``: the optimisation (AdamW on every parameter, cosine schedule stepped per
    batch; Huber with ``delta = 1`` is half the MSE for errors below 1, which all errors
    here are); ``init``: see :func:`init_train_params`; ``eval_samples``: fresh sequences
    for the final spike agreement; ``seed``: data, initialisation, shuffling and evaluation
    use independent streams of it.
    """

    tau: float = 0.125
    theta: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    length: int = 1024
    samples: int = 1024
    epochs: int = 400
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    loss: str = "huber"
    huber_delta: float = 1.0
    init: str = "lif"
    bn_momentum: float = 0.1
    eval_samples: int = 200
    seed: int = 0

    def validate(self):
        check_real("tau", self.tau, 0.0, 1.0, hi_open=True)
        check_real("theta", self.theta, 0.0, lo_open=True)
        check_real("mean", self.mean)
        check_real("std", self.std, 0.0)
        for name in ("length", "samples", "epochs", "batch_size", "eval_samples"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("seed", self.seed, 0)
        check_real("lr", self.lr, 0.0, lo_open=True)
        check_real("weight_decay", self.weight_decay, 0.0)
        check_real("min_lr_factor", self.min_lr_factor, 0.0, 1.0)
        check_real("bn_momentum", self.bn_momentum, 0.0, 1.0)
        check_name("loss", self.loss, LOSSES)
        check_real("huber_delta", self.huber_delta, 0.0, lo_open=True)
        check_name("init", self.init, INITS)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps must be < the number of updates "
                             f"({self.total_steps}), got {self.warmup_steps}")
        return self

    @property
    def steps_per_epoch(self):
        return -(-self.samples // self.batch_size)

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    def as_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SDNTrainResult:
    """What :func:`train_sdn` returns."""

    weights: dict  # fused w0 .. w5
    params: dict  # the 193 training parameters
    buffers: dict  # BatchNorm running statistics
    config: SDNTrainConfig
    history: dict  # per-epoch arrays: "loss" (mean training loss)
    metrics: dict  # evaluate() on fresh inputs
    seconds: float  # wall time of the training loop (evaluation excluded)

    def save(self, path, overwrite=False):
        """Write everything to an HDF5 weights file (:func:`save_weights`)."""
        save_weights(path, self.weights, self.params, self.buffers,
                     train_config=dict(self.config.as_dict(), train_seconds=self.seconds),
                     metrics=self.metrics, history=self.history, overwrite=overwrite)


def train_sdn(cfg=None, progress=None, **overrides):
    """Train the SDN from scratch on the iterative LIF, then fold and evaluate it.

    Parameters
    ----------
    cfg : SDNTrainConfig or None
        Settings; ``overrides`` replace single fields (``train_sdn(epochs=5)``).
    progress : callable or None
        Called after every update with a dict ``{"step", "total_steps", "epoch", "loss"}``
        (and once per epoch with ``"epoch_loss"`` added). The library draws nothing.

    Returns
    -------
    SDNTrainResult

    Notes
    -----
    The recipe of DESIGN.md section 6: training data ``x ~ N(mean, std^2)`` of length ``L``
    with targets ``m_t = tau u_{t-1}`` from the iterative hard-reset LIF; AdamW (lr 1e-2,
    weight decay 1e-2 on every parameter, as ``torch.optim.AdamW(model.parameters())``) with a
    cosine schedule stepped per batch; batches of 64 sequences reshuffled every epoch;
    training-mode BatchNorm with running statistics. The result is folded with the running
    statistics and scored by :func:`evaluate` on ``eval_samples`` fresh sequences.
    """
    from ..optim import adamw_init, adamw_step, cosine_schedule, make_groups

    cfg = dataclasses.replace(cfg or SDNTrainConfig(), **overrides).validate()
    x, target, _ = make_dataset(cfg.samples, cfg.length, cfg.tau, cfg.theta, cfg.mean,
                                cfg.std, cfg.seed)  # (S, L) each
    params, buffers = init_train_params(_rng(cfg.seed, _STREAM_INIT), cfg.init, cfg.tau)
    groups = make_groups(params, cfg.lr, cfg.weight_decay)
    state = adamw_init(params)
    shuffle = _rng(cfg.seed, _STREAM_SHUFFLE)
    total = cfg.total_steps
    epoch_loss = np.zeros(cfg.epochs)  # (epochs,)
    t0 = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        order = shuffle.permutation(cfg.samples)  # (S,)
        losses = []
        for i in range(0, cfg.samples, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            m, cache = train_fwd(x[idx], params, buffers, training=True)  # (b, L)
            loss, dm = loss_fwd_bwd(m, target[idx], cfg.loss, cfg.huber_delta)
            _, grads = train_bwd(cache, dm)
            buffers = update_running_stats(buffers, cache, cfg.bn_momentum)
            adamw_step(params, grads, state, groups,
                       lr_scale=cosine_schedule(step, total, cfg.warmup_steps, cfg.min_lr_factor))
            step += 1
            losses.append(loss)
            if progress is not None:
                progress({"step": step, "total_steps": total, "epoch": epoch, "loss": loss})
        epoch_loss[epoch] = np.mean(losses)
    seconds = time.perf_counter() - t0
    weights = fold(params, buffers)
    metrics = evaluate(weights, tau=cfg.tau, theta=cfg.theta, mean=cfg.mean, std=cfg.std,
                       length=cfg.length, samples=cfg.eval_samples, seed=cfg.seed)
    return SDNTrainResult(weights, params, buffers, cfg, {"loss": epoch_loss}, metrics, seconds)


def evaluate(weights, tau=0.125, theta=1.0, mean=0.0, std=1.0, length=1024, samples=200,
             seed=0, spike_condition="ge"):
    """Score an SDN against the iterative hard-reset LIF on fresh inputs.

    Parameters
    ----------
    weights : dict or path
        Fused weights or a weights file.
    tau, theta, mean, std, length, samples, seed, spike_condition
        The LIF and the inputs ``x ~ N(mean, std^2)`` of shape ``(samples, length)``, drawn
        from a stream of ``seed`` that training never uses.

    Returns
    -------
    dict
        ``agreement`` (fraction of steps where SDN and LIF spikes agree), ``mismatches``
        (count), ``steps`` (``samples * length``), ``membrane_mse`` (mean squared error of the
        predicted ``m`` against ``tau u_{t-1}``), ``rate_lif`` and ``rate_sdn`` (firing rates).
    """
    W = _resolve_weights(weights)
    x, m_lif, s_lif = make_dataset(samples, length, tau, theta, mean, std, seed,
                                   spike_condition, stream=_STREAM_EVAL)  # (S, L) each
    m_sdn, s_sdn = sdn_forward(x, W, theta=theta, spike_condition=spike_condition)
    mismatches = int(np.count_nonzero(s_sdn != s_lif))
    return {
        "agreement": 1.0 - mismatches / x.size,
        "mismatches": mismatches,
        "steps": int(x.size),
        "membrane_mse": float(np.mean((m_sdn - m_lif) ** 2)),
        "rate_lif": float(s_lif.mean()),
        "rate_sdn": float(s_sdn.mean()),
    }
