"""Sampling text from a language model through its stream (DESIGN.md sections 10-11).

:func:`generate` runs the prompt through :class:`refimpl.stream.ModelStream` in one chunk (the
parallel form from the zero state, ending in the state after the prompt), then one
:meth:`~refimpl.stream.ModelStream.step` per new token: the next token is drawn from
``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens
(:func:`sample`), and fed back. The stream's logits equal the parallel forward's at every
position (``tests/test_lm.py``), so a generated sequence is what the model would score.

Deterministic for a seed: one ``numpy.random.default_rng(seed)``, one uniform draw per sequence
and step, inverse-CDF sampling with ties in the top-k ordered by token id.
"""
import time

import numpy as np

from ._checks import check_int, check_real


def sample(logits, temperature, top_k, rng):
    """One token per row of ``logits (B, V)``: ``softmax(logits / temperature)`` over the
    ``top_k`` largest logits (0: all), by the inverse CDF of one ``rng.random()`` per row.
    Returns int64 ``(B,)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature  # (B, V)
    B, V = z.shape
    if top_k and top_k < V:
        order = np.argsort(-z, axis=1, kind="stable")[:, :top_k]  # (B, k), ties by token id
    else:
        order = np.broadcast_to(np.arange(V), (B, V))
    zk = np.take_along_axis(z, order, axis=1)  # (B, k)
    w = np.exp(zk - zk.max(axis=1, keepdims=True))  # (B, k), largest 1
    cdf = np.cumsum(w, axis=1)  # (B, k)
    u = rng.random(B) * cdf[:, -1]  # (B,)
    pick = np.minimum((cdf <= u[:, None]).sum(axis=1), order.shape[1] - 1)  # (B,)
    return order[np.arange(B), pick].astype(np.int64)


def generate(stream, prompt, length, temperature=1.0, top_k=0, seed=0, progress=None):
    """Continue ``prompt`` (int64 tokens ``(B, P)``, ``P >= 1``) by ``length`` sampled tokens.

    Returns ``(tokens (B, length) int64, info)`` with ``info``: ``prompt_seconds``,
    ``seconds`` (the sampling loop), ``tokens_per_second`` (new tokens per second over all
    rows). ``progress(n)`` is called after each new token. Errors: a classifier stream, a
    bidirectional model (refused by the stream itself), ``length < 1``, ``temperature <= 0``,
    ``top_k < 0``, tokens outside the vocabulary.
    """
    cfg = stream.cfg
    if cfg.head != "lm":
        raise ValueError("generate needs a language model (head='lm', trained with "
                         "refimpl train --text); this model is a classifier")
    length = check_int("length", length, 1)
    temperature = check_real("temperature", temperature, 0.0, lo_open=True)
    top_k = check_int("top_k", top_k, 0)
    if not isinstance(prompt, np.ndarray) or prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int64 tokens (B, P) with P >= 1, got "
                         f"{getattr(prompt, 'shape', type(prompt).__name__)}")
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
