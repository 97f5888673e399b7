"""Sampling text from a language model through its stream (DESIGN.md sections 10-11).

:func:`generate` runs the prompt through :class:`refimpl.stream.ModelStream` in one chunk (the
parallel form from the zero state, ending in the state after the prompt), then one
:meth:`~refimpl.stream.ModelStream.step` per new token: the next token is drawn by
:func:`sample` and fed back. The stream's logits equal the parallel forward's at every position
(``tests/test_lm.py``), so a generated sequence is what the model would score.

The distribution (:func:`probabilities`), for logits ``z (V,)``, temperature ``T`` and ``k``:

    kept  = the k largest logits (top_k = 0 or V: all), ties at the k-th broken by lower id
    p_j   = exp((z_j - max z) / T) / sum_{i in kept} exp((z_i - max z) / T)   for j in kept
    p_j   = 0                                                                  otherwise

- ``T = 0`` is **greedy**: the token of the largest logit (the lowest id among equal ones),
  the limit of ``p`` as ``T -> 0``; it draws no random number.
- ``T > 0`` may be any finite value, subnormal ones too. Subtracting the largest logit before
  dividing keeps every exponent at or below 0, so nothing overflows: a quotient that leaves
  the float64 range is ``-inf``, whose weight 0 is what ``exp`` of any number below ``-746``
  rounds to anyway. A tiny ``T`` thus gives the greedy token (among tokens whose logits equal
  the largest), a huge one the uniform distribution over the kept tokens.
- Logits must be finite (a NaN or an infinite logit has no distribution), ``0 <= top_k <= V``.

Drawing (:func:`inverse_cdf`): with ``F`` the cumulative sum of ``p`` over the token ids in
order (dropped tokens add 0) and one uniform ``u`` in ``[0, 1)`` per row, the token is the
``j`` with ``F_{j-1} <= u < F_j``. A token whose probability is below the rounding of ``F``
(about ``V`` eps = 6e-14 for ``V = 256``) may never be drawn; a ``u`` at or above a total ``F``
that rounded below 1 takes the last token of positive probability.

Deterministic for a seed: one ``numpy.random.default_rng(seed)``, one ``rng.random(B)`` per
step (none when greedy).

Memory: the generated ids are int64 ``(B, length)`` (8 bytes a token); :func:`check_memory`
refuses a length whose bytes exceed what the process can still allocate
(:func:`available_bytes`) before anything is allocated.
"""
import math
import numbers
import os
import time

try:
    import resource  # POSIX
except ImportError:  # pragma: no cover - Windows: no limits to read
    resource = None

import numpy as np

from ._checks import check_array, check_int

#: Bytes :func:`generate` holds per generated token: the int64 ids.
TOKEN_BYTES = 8


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_temperature(temperature, name="temperature"):
    """``temperature`` as a float: 0 (greedy) or a finite number > 0; ``name`` is how the
    error names it (``"--temperature"`` for the CLI)."""
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {temperature!r} of type "
                        f"{type(temperature).__name__}")
    t = float(temperature)
    if not (math.isfinite(t) and t >= 0.0):  # NaN fails too
        raise ValueError(f"{name} must be 0 (greedy: the most likely token) or a finite number "
                         f"> 0, got {temperature}")
    return t


def check_top_k(top_k, V, name="top_k"):
    """``top_k`` as an int in ``[0, V]`` (0: every token of the vocabulary of ``V``)."""
    top_k = check_int(name, top_k)
    if not 0 <= top_k <= V:
        raise ValueError(f"{name} must be in [0, {V}] (0 = all {V} tokens of the vocabulary), "
                         f"got {top_k}")
    return top_k


def _check_args(logits, temperature, top_k):
    """``(logits, temperature, top_k)`` validated: float64 ``(B, V)`` finite, see above."""
    z = check_array("logits", logits, ndim=2, dtype=np.float64)  # finite, (B, V)
    if z.shape[1] < 1:
        raise ValueError(f"logits must hold at least one token per row, got shape {z.shape}")
    return z, check_temperature(temperature), check_top_k(top_k, z.shape[1])


# --------------------------------------------------------------------------------------------
# The distribution and the draw
# --------------------------------------------------------------------------------------------


def _probabilities(z, temperature, top_k):
    """``p (B, V)`` of the module docstring for validated ``z`` and ``temperature > 0``."""
    B, V = z.shape
    with np.errstate(over="ignore"):  # -inf quotients: weight 0, as they round to (docstring)
        e = (z - z.max(axis=1, keepdims=True)) / temperature  # (B, V), <= 0, the max 0
    w = np.exp(e)  # (B, V) in [0, 1], 1 at the largest logit
    if 0 < top_k < V:
        order = np.argsort(-z, axis=1, kind="stable")  # (B, V), ties by lower id
        w[np.arange(B)[:, None], order[:, top_k:]] = 0.0  # drop all but the k largest
    return w / w.sum(axis=1, keepdims=True)  # (B, V); the sum is >= 1 (the max's weight)


def _draw(p, u):
    """The token of each row of ``p (B, V)`` whose CDF interval holds ``u (B,)``."""
    cdf = np.cumsum(p, axis=1)  # (B, V)
    pick = (cdf <= u[:, None]).sum(axis=1)  # (B,) the j with F_{j-1} <= u < F_j
    V = p.shape[1]
    last = V - 1 - np.argmax(p[:, ::-1] > 0, axis=1)  # (B,) last token of positive p
    return np.minimum(pick, last).astype(np.int64)  # u >= a total that rounded below 1


def probabilities(logits, temperature=1.0, top_k=0):
    """The distribution :func:`sample` draws from (module docstring): float64 ``(B, V)``, rows
    summing to 1 up to rounding; ``temperature = 0`` gives 1 at the greedy token."""
    z, temperature, top_k = _check_args(logits, temperature, top_k)
    if temperature == 0.0:
        p = np.zeros_like(z)  # (B, V)
        p[np.arange(z.shape[0]), z.argmax(axis=1)] = 1.0
        return p
    return _probabilities(z, temperature, top_k)


def inverse_cdf(logits, temperature, top_k, u):
    """One token per row of ``logits (B, V)`` for given uniforms ``u`` float64 ``(B,)`` in
    ``[0, 1)``: the ``j`` with ``F_{j-1} <= u < F_j`` (module docstring); greedy for
    ``temperature = 0`` (``u`` unused). Returns int64 ``(B,)``. :func:`sample` is this with
    ``u = rng.random(B)``."""
    z, temperature, top_k = _check_args(logits, temperature, top_k)
    u = check_array("u", u, ndim=1, dtype=np.float64)
    if u.shape[0] != z.shape[0] or np.any((u < 0.0) | (u >= 1.0)):
        got = f", range [{u.min()}, {u.max()}]" if u.size else ""
        raise ValueError(f"u must hold one uniform in [0, 1) per row of logits ({z.shape[0]}), "
                         f"got shape {u.shape}{got}")
    if temperature == 0.0:
        return z.argmax(axis=1).astype(np.int64)
    return _draw(_probabilities(z, temperature, top_k), u)


def sample(logits, temperature, top_k, rng):
    """One token per row of ``logits`` float64 ``(B, V)`` (finite) from
    ``softmax(logits / temperature)`` over the ``top_k`` largest logits (0: all), by the inverse
    CDF of one ``rng.random(B)`` (module docstring). ``temperature = 0`` is greedy (the largest
    logit, the lowest id among equal ones; no draw). Returns int64 ``(B,)``.

    Errors: logits not float64 ``(B, V)`` or not finite, a temperature below 0, NaN or
    infinite, ``top_k`` outside ``[0, V]``, ``rng`` not a ``numpy.random.Generator``.
    """
    z, temperature, top_k = _check_args(logits, temperature, top_k)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                        f"pass np.random.default_rng(seed)")
    if temperature == 0.0:
        return z.argmax(axis=1).astype(np.int64)
    return _draw(_probabilities(z, temperature, top_k), rng.random(z.shape[0]))


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _proc_kib(path, field):
    """``field`` of a ``/proc`` file in bytes (its value is in kB), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room():
    """Bytes left under the memory limit of the cgroup v2 mounted at ``/sys/fs/cgroup`` (what
    a container sees as its own), or None (no limit, cgroup v1, not Linux)."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def available_bytes():
    """``(bytes, what limits them)``: what this process can still allocate as far as the system
    says, the smallest of its address-space and data limits (``RLIMIT_AS``, ``RLIMIT_DATA``)
    less what it uses (``VmSize``, ``VmData``), the memory available without swapping
    (``MemAvailable``) and the room under a cgroup v2 memory limit; ``(None, None)`` where none
    is known (not Linux)."""
    room = []
    limits = () if resource is None else (
        (resource.RLIMIT_AS, "VmSize", "address-space limit"),
        (resource.RLIMIT_DATA, "VmData", "data-size limit"))
    for limit, field, what in limits:
        soft = resource.getrlimit(limit)[0]
        used = _proc_kib(f"/proc/{os.getpid()}/status", field)
        if soft != resource.RLIM_INFINITY and used is not None:
            room.append((soft - used, f"{what} {_gb(soft)}, {_gb(used)} in use"))
    free = _proc_kib("/proc/meminfo", "MemAvailable")
    if free is not None:
        room.append((free, "memory available without swapping"))
    cg = _cgroup_room()
    if cg is not None:
        room.append((cg, "room under the cgroup memory limit"))
    return min(room) if room else (None, None)


def _gb(n):
    return f"{n / 2**30:.2f} GiB"


def check_memory(length, bytes_per_token, batch=1, name="length"):
    """ValueError before anything is allocated when ``batch * length`` tokens of
    ``bytes_per_token`` bytes exceed :func:`available_bytes`; the message gives the bytes
    needed and available and the largest ``name`` (the option to lower) that fits."""
    need = batch * length * bytes_per_token
    room, what = available_bytes()
    if room is not None and need > room:
        most = max(room // (batch * bytes_per_token), 0)
        raise ValueError(f"{name} {length} needs {_gb(need)} ({bytes_per_token} bytes per "
                         f"token{f' x {batch} sequences' if batch > 1 else ''}) but "
                         f"{_gb(max(room, 0))} can be allocated ({what}); lower {name} to at "
                         f"most {most}")


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def generate(stream, prompt, length, temperature=1.0, top_k=0, seed=0, progress=None):
    """Continue ``prompt`` (int64 tokens ``(B, P)``, ``P >= 1``) by ``length`` sampled tokens.

    ``temperature`` and ``top_k`` as in :func:`sample` (``temperature = 0``: greedy; ``top_k``
    in ``[0, V]``). Returns ``(tokens (B, length) int64, info)`` with ``info``:
    ``prompt_seconds``, ``seconds`` (the sampling loop), ``tokens_per_second`` (new tokens per
    second over all rows). ``progress(n)`` is called after each new token. Errors (before
    anything runs): a classifier stream, a bidirectional model (refused by the stream itself),
    ``length < 1`` or more tokens than memory holds (:func:`check_memory`), a bad temperature
    or ``top_k``, tokens outside the vocabulary; non-finite logits (a broken model) when they
    occur.
    """
    cfg = stream.cfg
    if cfg.head != "lm":
        raise ValueError("generate needs a language model (head='lm', trained with "
                         "refimpl train --text); this model is a classifier")
    length = check_int("length", length, 1)
    temperature = check_temperature(temperature)
    top_k = check_top_k(top_k, cfg.vocab)
    if not isinstance(prompt, np.ndarray) or prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int64 tokens (B, P) with P >= 1, got "
                         f"{getattr(prompt, 'shape', type(prompt).__name__)}")
    check_memory(length, TOKEN_BYTES, batch=prompt.shape[0])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    logits, state = stream.forward(prompt)  # (B, P, V), the state after the prompt
    t1 = time.perf_counter()
    out = np.empty((prompt.shape[0], length), dtype=np.int64)  # (B, length)
    nxt = sample(logits[:, -1], temperature, top_k, rng)  # (B,)
    for i in range(length):
        out[:, i] = nxt
        if progress is not None:
            progress(1)
        if i + 1 < length:
            step_logits, state = stream.step(nxt, state)  # (B, V)
            nxt = sample(step_logits, temperature, top_k, rng)
    t2 = time.perf_counter()
    n = out.size
    return out, {"prompt_seconds": t1 - t0, "seconds": t2 - t1,
                 "tokens_per_second": n / max(t2 - t1, 1e-12)}
