"""Built-in tasks, generated deterministically from a seed (no downloads), and user data.

Every task returns a dict ``x_train, y_train, x_test, y_test`` plus metadata: float inputs
``(N, L, C)`` (float64) or integer tokens ``(N, L)`` (int64), integer labels ``(N,)``.

| task | label | what it tests |
|---|---|---|
| ``adding`` | ``1[sum of the two marked values > 1]`` | long-range memory |
| ``listops`` | its value 0..9 | hierarchical structure |
| ``recall`` | the cue's class | delayed recall: memory over the whole sequence |
| ``parity`` | number of pulses mod 2 | counting; sensitive to how neurons reset |

The inputs:

- ``adding`` (the adding problem, as classification): ``(L, 2)``: values U[0, 1] and a marker
  channel with two ones.
- ``listops``: tokens of a nested expression (LRA's ListOps generator, scaled down).
- ``recall``: ``(L, K + 1)``: a one-hot cue among ``K = 4`` channels early in the sequence,
  noise on the last channel throughout.
- ``parity``: ``(L, 1)`` sparse 0/1 pulses.
"""
import hashlib
import os
import zipfile

import numpy as np

from ._checks import check_int, check_name

# ListOps vocabulary: 0 pad, 1-10 digits 0-9, operators, brackets
LISTOPS_OPS = ("MIN", "MAX", "MED", "SM")
LISTOPS_VOCAB = ["<pad>"] + [str(d) for d in range(10)] + [f"[{op}" for op in LISTOPS_OPS] + ["]"]
_TOK = {t: i for i, t in enumerate(LISTOPS_VOCAB)}


def _split(n, rng, test_fraction=0.2):
    n_test = max(1, int(round(n * test_fraction)))
    return n - n_test, n_test


def adding(n=1000, L=200, seed=0):
    """The adding problem as binary classification (balanced: the threshold is the median)."""
    rng = np.random.default_rng(seed)
    vals = rng.random((n, L))  # (N, L)
    marks = np.zeros((n, L))
    half = max(1, L // 2)
    i = rng.integers(0, half, size=n)
    j = rng.integers(half, L, size=n) if L > 1 else i
    marks[np.arange(n), i] = 1.0
    marks[np.arange(n), j] = 1.0
    total = vals[np.arange(n), i] + vals[np.arange(n), j]
    y = (total > 1.0).astype(np.int64)
    x = np.stack([vals, marks], axis=-1)  # (N, L, 2)
    return _package(x, y, 2, "adding")


def _listops_tree(rng, depth, max_depth, max_args):
    if depth >= max_depth or (depth > 0 and rng.random() < 0.25):
        d = int(rng.integers(0, 10))
        return [str(d)], d
    op = LISTOPS_OPS[int(rng.integers(0, len(LISTOPS_OPS)))]
    k = int(rng.integers(2, max_args + 1))
    toks, vals = [f"[{op}"], []
    for _ in range(k):
        t, v = _listops_tree(rng, depth + 1, max_depth, max_args)
        toks += t
        vals.append(v)
    toks.append("]")
    value = {"MIN": min(vals), "MAX": max(vals), "MED": int(np.median(vals)),
             "SM": sum(vals) % 10}[op]
    return toks, value


def listops(n=1000, L=128, seed=0, max_depth=4, max_args=4):
    """ListOps-style expressions (LRA generator, scaled down): tokens padded to ``L``.

    ``MED`` takes the lower median's integer part as LRA's ``int(np.median)``; expressions
    longer than ``L`` are redrawn.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((n, L), dtype=np.int64)  # (N, L)
    y = np.zeros(n, dtype=np.int64)
    for k in range(n):
        while True:
            toks, v = _listops_tree(rng, 0, max_depth, max_args)
            if len(toks) <= L:
                break
        x[k, :len(toks)] = [_TOK[t] for t in toks]
        y[k] = v
    return _package(x, y, 10, "listops", vocab=len(LISTOPS_VOCAB))


def recall(n=1000, L=200, seed=0, K=4):
    """Delayed recall: a one-hot cue at a random step in the first tenth, then noise only."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, L, K + 1))  # (N, L, K+1)
    y = rng.integers(0, K, size=n).astype(np.int64)
    t = rng.integers(0, max(1, L // 10), size=n)
    x[np.arange(n), t, y] = 1.0
    x[:, :, K] = rng.normal(size=(n, L))
    return _package(x, y, K, "recall")


def parity(n=1000, L=64, seed=0, rate=0.1):
    """Sparse 0/1 pulses; label = number of pulses mod 2."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, L)) < rate).astype(np.float64)  # (N, L)
    y = (x.sum(1) % 2).astype(np.int64)
    return _package(x[:, :, None], y, 2, "parity")


def _package(x, y, n_classes, name, vocab=0):
    n_train, _ = _split(len(y), None)
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:],
            "y_test": y[n_train:], "n_classes": n_classes, "vocab": vocab, "name": name}


TASKS = {"adding": adding, "listops": listops, "recall": recall, "parity": parity}


def make_task(name, n=1000, L=None, seed=0):
    """Generate a built-in task by name (``L=None``: the task's default length).

    The result's ``recipe`` (``{"task", "samples", "length", "seed"}``) rebuilds it exactly.
    """
    fn = check_name("task", name, TASKS)
    check_int("n", n, 2)
    check_int("seed", seed, 0)
    kw = {} if L is None else {"L": check_int("L", L, 1)}
    data = fn(n=n, seed=seed, **kw)
    data["recipe"] = {"task": name, "samples": int(n), "length": int(data["x_train"].shape[1]),
                      "seed": int(seed)}
    return data


def file_sha256(path):
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_from_recipe(recipe):
    """Rebuild the data set a ``recipe`` (from :func:`make_task` / :func:`load_npz`) describes.

    A recorded ``.npz`` must still exist and have the recorded SHA-256; otherwise ValueError
    (one line) saying the recorded data cannot be rebuilt.
    """
    if "task" in recipe:
        return make_task(recipe["task"], n=recipe["samples"], L=recipe["length"],
                         seed=recipe["seed"])
    path = check_recorded_file(recipe["data"], recipe["sha256"], "data", "--task or --data",
                               "--data")
    return load_npz(path, tokens=recipe.get("tokens", 0))


def check_recorded_file(path, sha256, what, choose, use):
    """A file a checkpoint recorded (``path`` and its ``sha256``) must still exist unchanged;
    otherwise ValueError naming the options that ``choose`` other data or ``use`` it anyway.
    Returns ``path``."""
    if not os.path.isfile(path):
        raise ValueError(f"the recorded {what} file {path} no longer exists; pass {choose} to "
                         f"choose the {what}")
    digest = file_sha256(path)
    if digest != sha256:
        raise ValueError(f"the recorded {what} file {path} has changed since training (SHA-256 "
                         f"{digest[:12]}... not {sha256[:12]}...); pass {use} to use it anyway")
    return path


def load_data(task=None, path=None, tokens=0, n=1000, L=None, seed=0):
    """A data set from exactly one source: a built-in ``task`` name (:func:`make_task` with
    ``n``, ``L``, ``seed``) or an ``.npz`` file at ``path`` (:func:`load_npz` with ``tokens``)."""
    if (task is None) == (path is None):
        raise ValueError("give exactly one of task (a built-in task name, --task) or path "
                         "(an .npz file, --data)")
    if task is not None:
        return make_task(task, n=n, L=L, seed=seed)
    return load_npz(path, tokens=tokens)


REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path, tokens=0):
    """Load user data: ``x_train (N, L)`` or ``(N, L, C)``, integer ``y_train (N,)``, same for
    test, and optionally an integer scalar ``n_classes`` (default: max label + 1). Float inputs
    may be float64, float32 or float16; float32/float16 are widened to float64, which is exact
    (every float32 value is a float64 value). Integer inputs need ``tokens = V`` (vocabulary
    size) and use the embedding.

    Labels are class indices: ``n_classes`` (declared or max label + 1) may be at most
    :func:`max_classes` of the distinct labels present, so a stray huge label is refused before
    a model is allocated. Pickled members are never loaded (``allow_pickle=False``).

    The result's ``recipe`` (``{"data": absolute path, "sha256", "tokens"}``) identifies the file.
    Raises ValueError / TypeError with one line naming the problem.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if magic == b"\x93NUMPY":
        raise ValueError(f"{path}: a single-array .npy file, not a .npz (zip) file; save the "
                         f"arrays with np.savez(path, x_train=..., y_train=..., ...)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a .npz (zip) file; save the arrays with "
                         f"np.savez(path, x_train=..., y_train=..., ...)")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError, OSError ...
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    for k, v in data.items():
        if not isinstance(v, np.ndarray):  # a member without an NPY header comes back as bytes
            raise ValueError(f"{path}: member {k!r} is not a NumPy array (no .npy header, e.g. "
                             f"a raw pickle; it was not unpickled); save it with np.savez")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; need {list(REQUIRED_KEYS)}")
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{path}: y_{split} must hold integer labels, got dtype {y.dtype}")
        if y.ndim != 1:
            raise ValueError(f"{path}: y_{split} must have shape (N,), got {y.shape}")
        if x.ndim not in (2, 3):
            raise ValueError(f"{path}: x_{split} must have shape (N, L) or (N, L, C), "
                             f"got {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"{path}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if len(y) == 0:
            raise ValueError(f"{path}: the {split} split is empty")
        if tokens:
            if not np.issubdtype(x.dtype, np.integer):
                raise TypeError(f"{path}: --tokens needs integer x_{split}, got dtype {x.dtype}")
            if x.ndim != 2:
                raise ValueError(f"{path}: token input x_{split} must have shape (N, L), "
                                 f"got {x.shape}")
            if x.min() < 0 or x.max() >= tokens:
                raise ValueError(f"{path}: x_{split} tokens must lie in [0, {tokens}), got "
                                 f"[{x.min()}, {x.max()}]")
        else:
            if np.issubdtype(x.dtype, np.integer):
                raise TypeError(f"{path}: x_{split} holds integers ({x.dtype}); pass --tokens V "
                                f"for token input, or store float64 values")
            if x.dtype not in (np.float64, np.float32, np.float16):
                raise TypeError(f"{path}: x_{split} must be float64 (or float32/float16), got "
                                f"{x.dtype}; save x_{split}.astype(np.float64)")
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{path}: x_{split} contains NaN or inf values")
    if data["x_train"].shape[1:] != data["x_test"].shape[1:]:
        raise ValueError(f"{path}: x_train and x_test shapes differ after the sample axis: "
                         f"{data['x_train'].shape[1:]} vs {data['x_test'].shape[1:]}")
    # labels as Python ints: exact for every integer dtype (uint64 included)
    lo = min(int(data["y_train"].min()), int(data["y_test"].min()))
    hi = max(int(data["y_train"].max()), int(data["y_test"].max()))
    if lo < 0:
        raise ValueError(f"{path}: labels must be >= 0, got {lo}")
    distinct = len(set(np.unique(data["y_train"]).tolist())
                   | set(np.unique(data["y_test"]).tolist()))
    cap = max_classes(distinct)
    if hi >= cap:
        raise ValueError(f"{path}: labels must be class indices in [0, {cap}) (at most "
                         f"max(1000, 10 x {distinct} distinct labels) classes), got max label "
                         f"{hi}; relabel with np.unique(y, return_inverse=True)")
    n_classes = hi + 1
    if "n_classes" in data:
        declared = _declared_classes(path, data["n_classes"])
        if n_classes > declared:
            raise ValueError(f"{path}: labels out of range: max label {n_classes - 1} but the file "
                             f"declares n_classes = {declared}")
        if declared > cap:
            raise ValueError(f"{path}: n_classes = {declared} is too large for {distinct} "
                             f"distinct labels (at most max(1000, 10 x distinct) = {cap}); "
                             f"store the real number of classes, or omit n_classes")
        n_classes = declared
    if n_classes < 2:
        raise ValueError(f"{path}: labels must span at least 2 classes, got only {n_classes}")
    out = {k: data[k] for k in REQUIRED_KEYS}
    for k in ("y_train", "y_test"):
        out[k] = out[k].astype(np.int64)
    for k in ("x_train", "x_test"):
        out[k] = out[k].astype(np.int64 if tokens else np.float64)  # float32 -> float64: exact
    recipe = {"data": os.path.abspath(path), "sha256": file_sha256(path), "tokens": int(tokens)}
    return {**out, "n_classes": n_classes, "vocab": int(tokens), "name": str(path),
            "recipe": recipe}


def max_classes(distinct):
    """The most classes a data file may declare (or imply by its largest label) given its
    number of ``distinct`` labels: ``max(1000, 10 * distinct)``.

    The decoder is ``(n_classes, H)`` and the logits ``(B, n_classes)``, so a stray label of
    10**9 would allocate gigabytes. Real label sets are dense (0..K-1, every class seen) or at
    least mostly present; 1000 covers ImageNet-sized label sets even in a small sample, and
    10 x the labels present leaves room for classes missing from a subset.
    """
    return max(1000, 10 * int(distinct))


def _declared_classes(path, value):
    a = np.asarray(value)
    if a.size != 1 or a.ndim > 1:
        raise ValueError(f"{path}: n_classes must be a scalar integer, got shape {a.shape}")
    v = a.reshape(()).item()
    if a.dtype.kind == "f" and np.isfinite(v) and float(v).is_integer():
        v = int(v)
    if a.dtype.kind not in "iuf" or not isinstance(v, int):
        raise ValueError(f"{path}: n_classes must be an integer, got {v!r} ({a.dtype}); store "
                         f"np.int64(number of classes)")
    return v
