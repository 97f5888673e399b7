"""Text for language models (issue 14, DESIGN.md section 11): vocabularies, the train/validation
split of one file, training and evaluation windows, and the count-based baselines.

| vocabulary | tokens | size ``V`` | reads |
|---|---|---|---|
| ``bytes`` | the file's bytes | 256 | any file |
| ``chars`` | its characters (code points) | distinct characters in the file | UTF-8 only |

The file is read as bytes (no newline translation, no BOM removal), tokenised, and split by
position: the last ``val_frac`` of the tokens is the validation part, the rest the training
part. Training draws random windows of ``context + 1`` tokens (:func:`windows`; inputs
``w[:, :-1]``, targets ``w[:, 1:]``); validation scores every validation token after the first
once (:func:`eval_windows`). The unigram and bigram baselines (:func:`unigram_bpt`,
:func:`bigram_bpt`) score the same targets in bits per token (bits per byte for ``bytes``).

Token ids are int64 everywhere (DESIGN.md: tokens ``x (B, L)`` int); a 1 MB text is 8 MB of ids.
"""
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import stat
from typing import NamedTuple

import numpy as np

from ._checks import check_array, check_int, check_name
from .tasks import check_recorded_file

#: Vocabulary kinds, in the order the CLI lists them (``--vocab``); ``bytes`` is the default.
VOCABS = ("bytes", "chars")

#: Smallest context: a window must hold at least two inputs (one would be a bigram model).
MIN_CONTEXT = 2

#: ``load_text``'s default context (tokens per training window).
DEFAULT_CONTEXT = 128

#: How many distinct unknown characters an encoding error names.
_MAX_NAMED = 5

#: The largest text file :func:`load_text` reads, in bytes (128 MiB; ``max_bytes`` and
#: ``refimpl train --max-text-bytes`` raise it). Its tokens take 8 bytes each (int64), so the
#: limit is 1 GiB of token ids, a few GiB at the peak of a ``chars`` vocabulary; enwik8 (10^8
#: bytes, the usual byte-level benchmark) fits.
MAX_TEXT_BYTES = 1 << 27

#: What :func:`read_text_file` calls a file that is not a regular one (``stat`` tests).
_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))

_LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------


def _check_kind(kind):
    """ValueError listing :data:`VOCABS` unless ``kind`` is one of them."""
    check_name("vocab", kind, dict.fromkeys(VOCABS))


def _codepoints(text):
    """Code points of a str as uint32 ``(len(text),)`` (lone surrogates kept as their value)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _utf8(data, where="text"):
    """Decode UTF-8 bytes strictly; a one-line ValueError saying where and what to do."""
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start} is "
            f"not valid UTF-8); --vocab chars needs UTF-8 text: use --vocab bytes, which reads "
            f"any file"
        ) from None


def _utf8_escaped(text):
    """UTF-8 bytes of a str whose raw bytes are escaped as U+DC80..U+DCFF (``surrogateescape``);
    ValueError naming the first other lone surrogate."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds the lone surrogate {text[e.start]!r} at position "
                         f"{e.start}, which is neither a character nor an escaped raw byte; "
                         f"pass the bytes themselves") from None


def _char_name(c):
    """``repr(c)``, or for a raw byte escaped as U+DC80..U+DCFF the byte it stands for."""
    if "\udc80" <= c <= "\udcff":
        return f"the raw byte 0x{ord(c) - 0xDC00:02x} (not UTF-8)"
    return repr(c)


@dataclasses.dataclass(frozen=True)
class Vocab:
    """A vocabulary: ``kind`` (one of :data:`VOCABS`), ``size`` ``V``, and for ``chars`` the
    sorted characters (``chars[i]`` is token ``i``; sorted by code point).

    Build one with :func:`byte_vocab`, :func:`char_vocab` or :func:`make_vocab`; store it in a
    checkpoint with :meth:`to_json` and read it back with :meth:`from_json`.

    ``bytes``: token = byte value, ``V = 256``; :meth:`decode` reads the bytes as UTF-8 with
    ``errors="replace"`` (a model may emit a byte sequence that is not UTF-8; each bad byte
    becomes U+FFFD). ``chars``: token = index of the character in ``chars``; a character outside
    ``chars`` cannot be encoded (ValueError naming it and its position).
    """

    kind: str
    size: int
    chars: tuple = ()

    def __post_init__(self):
        _check_kind(self.kind)
        check_int("vocab size", self.size, 1)
        if not isinstance(self.chars, tuple):
            raise TypeError(f"Vocab.chars must be a tuple of characters, got "
                            f"{type(self.chars).__name__}; pass tuple(chars)")
        if self.kind == "bytes":
            if self.size != 256 or self.chars:
                raise ValueError(f"a bytes vocabulary has size 256 and no chars, got size "
                                 f"{self.size} and {len(self.chars)} chars; use byte_vocab()")
            return
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            bad = next(c for c in self.chars if not isinstance(c, str) or len(c) != 1)
            raise ValueError(f"Vocab.chars must hold single characters, got {bad!r}")
        if len(self.chars) != self.size:
            raise ValueError(f"a chars vocabulary of size {self.size} needs {self.size} chars, "
                             f"got {len(self.chars)}")
        codes = self._codes  # (V,)
        if np.any(codes[1:] <= codes[:-1]):
            i = int(np.argmax(codes[1:] <= codes[:-1]))
            raise ValueError(f"Vocab.chars must be sorted by code point without repeats, got "
                             f"{self.chars[i]!r} before {self.chars[i + 1]!r} at index {i}; "
                             f"use char_vocab(text)")

    @functools.cached_property
    def _codes(self):
        """Sorted code points of ``chars``, uint32 ``(V,)`` (empty for bytes)."""
        return _codepoints("".join(self.chars))

    @property
    def unit(self):
        """What one token is, for "bits per ...": ``"byte"`` or ``"char"``."""
        return "byte" if self.kind == "bytes" else "char"

    def encode(self, text):
        """Token ids of ``text`` (str, or bytes-like read as UTF-8 for ``chars``): int64 ``(T,)``.

        ``bytes``: a str is encoded as UTF-8 first, so ``T`` is its UTF-8 length; a raw byte
        that a str carries as a lone surrogate U+DC80..U+DCFF (Python's ``surrogateescape``:
        how ``sys.argv`` and ``os.fsdecode`` keep bytes that are not UTF-8) is that byte
        again, so a command-line prompt reaches the model as the bytes typed; any other lone
        surrogate is no character and raises ValueError. ``chars``: ``T = len(text)``; bytes
        that are not UTF-8, or a character outside ``chars``, raise ValueError.
        """
        if isinstance(text, (bytearray, memoryview)):
            text = bytes(text)
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"text must be a str or bytes, got {type(text).__name__}")
        if self.kind == "bytes":
            if isinstance(text, str):
                text = _utf8_escaped(text)
            return np.frombuffer(text, dtype=np.uint8).astype(np.int64)  # (T,)
        if isinstance(text, bytes):
            text = _utf8(text)
        cp = _codepoints(text)  # (T,)
        idx = np.searchsorted(self._codes, cp)  # (T,)
        idx_c = np.minimum(idx, self.size - 1)  # (T,)
        unknown = self._codes[idx_c] != cp  # (T,)
        if np.any(unknown):
            raise ValueError(self._unknown_message(text, unknown))
        return idx.astype(np.int64)  # (T,)

    def _unknown_message(self, text, unknown):
        pos = np.flatnonzero(unknown)  # (U,)
        first = {}
        for p in pos.tolist():
            if text[p] not in first:
                first[text[p]] = p
                if len(first) == _MAX_NAMED:
                    break
        named = ", ".join(f"{_char_name(c)} at position {p}" for c, p in first.items())
        more = "" if len(first) < _MAX_NAMED else ", ..."
        return (f"text has {len(pos)} character(s) outside the vocabulary of {self.size} "
                f"characters: {named}{more}; use only characters the model was trained on "
                f"(Vocab.chars), or train with --vocab bytes")

    def decode(self, ids):
        """The text of token ids (a 1-D integer array or sequence), as a str.

        ``bytes``: the bytes read as UTF-8 with ``errors="replace"``; ``chars``: the characters
        joined. Ids outside ``[0, V)`` raise ValueError.
        """
        a = np.asarray(ids)
        if a.size == 0:
            return ""
        if a.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {a.dtype}; pass token ids "
                            f"(e.g. np.asarray(ids, dtype=np.int64))")
        if a.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {a.shape}; decode one sequence at a "
                             f"time")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.size:
            raise ValueError(f"ids must lie in [0, {self.size}) for this {self.kind} "
                             f"vocabulary, got [{lo}, {hi}]")
        if self.kind == "bytes":
            return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        return self._codes[a].tobytes().decode("utf-32-le", "surrogatepass")

    def to_json(self):
        """The vocabulary as a JSON string (ASCII only), for a checkpoint attribute."""
        return json.dumps({"kind": self.kind, "size": self.size, "chars": list(self.chars)})

    @classmethod
    def from_json(cls, s):
        """The vocabulary :meth:`to_json` wrote; ValueError if ``s`` is not one."""
        if isinstance(s, bytes):
            s = s.decode("utf-8")
        if not isinstance(s, str):
            raise TypeError(f"Vocab.from_json takes the JSON string Vocab.to_json wrote, got "
                            f"{type(s).__name__}")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a vocabulary JSON string ({e}); it comes from "
                             f"Vocab.to_json()") from None
        if not isinstance(d, dict) or set(d) != {"kind", "size", "chars"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"a vocabulary JSON object has keys ['chars', 'kind', 'size'], "
                             f"got {got}")
        if not isinstance(d["chars"], list):
            raise ValueError(f"vocabulary 'chars' must be a list, got {d['chars']!r}")
        return cls(kind=d["kind"], size=d["size"], chars=tuple(d["chars"]))


def byte_vocab():
    """The byte vocabulary (``V = 256``)."""
    return Vocab("bytes", 256)


def char_vocab(text):
    """The character vocabulary of ``text`` (str, or UTF-8 bytes): its distinct characters
    sorted by code point. ValueError for empty text or bytes that are not UTF-8."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = _utf8(text)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str or bytes, got {type(text).__name__}")
    if not text:
        raise ValueError("cannot build a chars vocabulary from empty text")
    codes = np.unique(_codepoints(text))  # (V,)
    chars = tuple(codes.tobytes().decode("utf-32-le", "surrogatepass"))
    return Vocab("chars", len(chars), chars)


def make_vocab(kind, text):
    """The vocabulary of ``kind`` for ``text``: bytes ignore it, chars take its characters."""
    _check_kind(kind)
    return byte_vocab() if kind == "bytes" else char_vocab(text)


# --------------------------------------------------------------------------------------------
# One file, split by position
# --------------------------------------------------------------------------------------------


class TextData(NamedTuple):
    """A tokenised text file split by position.

    Attributes
    ----------
    train : int64 ``(T_train,)``
        The first tokens of the file.
    val : int64 ``(T_val,)``
        The last ``round(val_frac * T)`` tokens.
    vocab : Vocab
    path : str
        Absolute path of the file.
    sha256 : str
        Hex SHA-256 of the file's bytes.
    context, val_frac
        As given to :func:`load_text` (both parts hold at least ``context + 1`` tokens).
    """

    train: np.ndarray
    val: np.ndarray
    vocab: Vocab
    path: str
    sha256: str
    context: int
    val_frac: float

    @property
    def recipe(self):
        """``{"text", "sha256", "vocab", "context", "val_frac"}``: what a checkpoint records;
        :func:`text_from_recipe` rebuilds the same data from it."""
        return {"text": self.path, "sha256": self.sha256, "vocab": self.vocab.kind,
                "context": self.context, "val_frac": self.val_frac}


def split_sizes(n, val_frac):
    """``(n_train, n_val)`` for ``n >= 0`` tokens and ``val_frac`` in (0, 1):
    ``n_val = round(val_frac * n)`` (half to even)."""
    n = check_int("n", n, 0)
    val_frac = _check_val_frac(val_frac)
    n_val = int(round(val_frac * n))
    return n - n_val, n_val


def min_tokens(context, val_frac):
    """The fewest tokens a text needs so that both parts hold ``context + 1`` tokens."""
    need = context + 1
    # round(f n) >= need needs f n >= need - 1/2; n - round(f n) >= need needs
    # (1 - f) n >= need - 1/2; start just below both bounds and step up past float rounding.
    n = max(2 * need, int((need - 0.5) / val_frac), int((need - 0.5) / (1.0 - val_frac))) - 2
    while min(split_sizes(n, val_frac)) < need:
        n += 1
    return n


def _check_val_frac(val_frac):
    if (isinstance(val_frac, (bool, np.bool_)) or not isinstance(val_frac, numbers.Real)):
        raise TypeError(f"val_frac must be a real number in (0, 1), got {val_frac!r} of type "
                        f"{type(val_frac).__name__}")
    v = float(val_frac)
    if not 0.0 < v < 1.0:  # NaN fails too
        raise ValueError(f"val_frac must be in (0, 1) (the fraction of the text, from its end, "
                         f"held out for validation), got {val_frac}; e.g. 0.1")
    return v


def _check_context(context):
    context = check_int("context", context)
    if context < MIN_CONTEXT:
        raise ValueError(f"context must be >= {MIN_CONTEXT} (tokens the model sees per "
                         f"training window), got {context}")
    return context


def read_text_file(path, max_bytes=MAX_TEXT_BYTES):
    """The bytes of the text file ``path``: a regular file of at most ``max_bytes`` bytes.

    Anything else is refused before a byte is read, with a one-line ValueError: a missing or
    unreadable file, a folder, a named pipe, a device or a socket (reading one may never end:
    a FIFO without a writer blocks, ``/dev/zero`` never ends), and a file larger than
    ``max_bytes`` (the message names ``--max-text-bytes``, the option that raises it). The file
    is opened without blocking and checked on the open descriptor (``fstat``), so a name
    swapped for a FIFO after the check cannot block either, and the read is bounded by
    ``max_bytes`` whatever size the file claims (a ``/proc`` file says 0, a growing one more
    than it had).
    """
    max_bytes = check_int("max_bytes", max_bytes, 1)
    try:
        _check_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; give the path of a text file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        _check_regular(path, st.st_mode)
        if st.st_size > max_bytes:
            raise ValueError(_too_large(path, f"{st.st_size} bytes", max_bytes))
        try:
            want = st.st_size + 1  # one more byte than it says: is it still growing?
            raw = fh.read(want)
            if len(raw) == want:  # longer than fstat said: read on, never past the limit
                raw += fh.read(max_bytes + 1 - len(raw))
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise ValueError(_too_large(path, "more bytes than that", max_bytes))
    return raw


def _check_regular(path, mode):
    """ValueError unless ``mode`` (``st_mode``) is a regular file's."""
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    raise ValueError(f"{path}: cannot read {kind}: a text is read from a regular file only (a "
                     f"pipe or a device may never end); give the path of a text file")


def _too_large(path, size, max_bytes):
    return (f"{path}: {size}, more than the limit of {max_bytes} bytes for a text file "
            f"(MAX_TEXT_BYTES); pass --max-text-bytes (load_text's max_bytes) to raise it, or "
            f"give a smaller file")


def load_text(path, vocab="bytes", context=DEFAULT_CONTEXT, val_frac=0.1,
              max_bytes=MAX_TEXT_BYTES):
    """Read a text file, tokenise it and split it by position.

    Parameters
    ----------
    path : str or os.PathLike
        Any file for ``vocab="bytes"``; UTF-8 text for ``vocab="chars"``.
    vocab : {"bytes", "chars"}, default "bytes"
        ``chars``: the vocabulary is every character of the whole file (training and validation
        parts), so the validation part never holds an unknown character; only the set of
        characters is taken from the validation part, not their counts.
    context : int, default 128
        Tokens per training window (>= 2); both parts must hold at least ``context + 1`` tokens.
    val_frac : float in (0, 1), default 0.1
        The last ``round(val_frac * T)`` of the ``T`` tokens are the validation part.
    max_bytes : int, default MAX_TEXT_BYTES (128 MiB)
        The largest file read (:func:`read_text_file`).

    Returns
    -------
    TextData
        ``train``, ``val`` (int64), ``vocab``, ``path`` (absolute), ``sha256``, ``context``,
        ``val_frac``; ``.recipe`` for a checkpoint.

    Raises ValueError / TypeError, one line naming the problem: a missing or unreadable file,
    one that is not a regular file (a FIFO, a device, a socket, a folder), one larger than
    ``max_bytes``, an empty file, a text too short for ``context`` (with the numbers of tokens
    needed and present), a file that is not UTF-8 with ``vocab="chars"``, bad ``context`` or
    ``val_frac``.
    """
    _check_kind(vocab)
    context = _check_context(context)
    val_frac = _check_val_frac(val_frac)
    raw = read_text_file(path, max_bytes)
    if not raw:
        raise ValueError(f"{path}: the file is empty; give a text of at least "
                         f"{min_tokens(context, val_frac)} tokens for context {context} and "
                         f"val_frac {val_frac}")
    if vocab == "chars":
        text = _utf8(raw, where=str(path))
        voc = char_vocab(text)
        ids = voc.encode(text)  # (T,)
    else:
        voc = byte_vocab()
        ids = voc.encode(raw)  # (T,)
    n = len(ids)
    n_train, n_val = split_sizes(n, val_frac)
    if min(n_train, n_val) < context + 1:
        unit = f"{voc.unit}s"
        raise ValueError(
            f"{path}: text too short for context {context}: its {n} {unit} split into "
            f"{n_train} for training and {n_val} for validation (val_frac {val_frac}), and each "
            f"part needs at least context + 1 = {context + 1}; give a text of at least "
            f"{min_tokens(context, val_frac)} {unit}, or a smaller --context"
        )
    return TextData(train=ids[:n_train], val=ids[n_train:], vocab=voc,
                    path=os.path.abspath(path), sha256=hashlib.sha256(raw).hexdigest(),
                    context=context, val_frac=val_frac)


def text_from_recipe(recipe, max_bytes=MAX_TEXT_BYTES):
    """Rebuild the :class:`TextData` a ``recipe`` (``TextData.recipe``) describes
    (``max_bytes``: as for :func:`load_text`).

    The file must still exist with the recorded SHA-256; otherwise ValueError (one line).
    """
    path = check_recorded_file(recipe["text"], recipe["sha256"], "text", "--text", "--text")
    return load_text(path, vocab=recipe["vocab"], context=recipe["context"],
                     val_frac=recipe["val_frac"], max_bytes=max_bytes)


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def _check_ids(name, ids, context):
    ids = check_array(name, ids, ndim=1, dtype=np.int64, finite=False)
    if len(ids) < context + 1:
        raise ValueError(f"{name} has {len(ids)} tokens, fewer than one window of context + 1 "
                         f"= {context + 1}; use a longer text or a smaller context")
    return ids


def windows(ids, context, batch_size, rng):
    """``batch_size`` random windows of ``context + 1`` consecutive tokens: int64
    ``(B, context + 1)``; inputs ``w[:, :-1]``, targets ``w[:, 1:]``.

    Start positions are uniform on ``0 .. T - context - 1`` (every full window equally likely),
    drawn independently (with replacement) by ``rng.integers``, so the batch is a deterministic
    function of the generator's state.
    """
    context = _check_context(context)
    batch_size = check_int("batch_size", batch_size, 1)
    ids = _check_ids("ids", ids, context)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
                        f"pass np.random.default_rng(seed)")
    start = rng.integers(0, len(ids) - context, size=batch_size, dtype=np.int64)  # (B,)
    return ids[start[:, None] + np.arange(context + 1)]  # (B, context + 1)


def eval_windows(ids, context):
    """Windows that score each token of ``ids`` after the first exactly once: int64
    ``(n_windows, context + 1)``, window ``k = ids[k * context : k * context + context + 1]``.

    Consecutive windows share one token (the last target of one is the first input of the
    next), so the targets ``w[:, 1:]`` are ``ids[1 : 1 + n_windows * context]`` in order, with
    ``n_windows = (T - 1) // context``. The last ``(T - 1) % context`` tokens (fewer than
    ``context``) would make a partial window and are **dropped**;
    ``ids[: n_windows * context + 1]`` is the part scored, and the baselines given that slice
    score the same targets. Each window starts with an empty state, like a training window.
    """
    context = _check_context(context)
    ids = _check_ids("ids", ids, context)
    n_windows = (len(ids) - 1) // context
    start = np.arange(n_windows, dtype=np.int64) * context  # (n_windows,)
    return ids[start[:, None] + np.arange(context + 1)]  # (n_windows, context + 1)


# --------------------------------------------------------------------------------------------
# Baselines and units
# --------------------------------------------------------------------------------------------


def _check_baseline_ids(train_ids, val_ids, V):
    V = check_int("V", V, 1)
    train_ids = check_array("train_ids", train_ids, ndim=1, dtype=np.int64, finite=False)
    val_ids = check_array("val_ids", val_ids, ndim=1, dtype=np.int64, finite=False)
    if len(val_ids) < 2:
        raise ValueError(f"val_ids must hold at least 2 tokens (the first is context only), "
                         f"got {len(val_ids)}")
    for name, a in (("train_ids", train_ids), ("val_ids", val_ids)):
        if len(a) and (a.min() < 0 or a.max() >= V):
            raise ValueError(f"{name} must lie in [0, V) = [0, {V}), got [{a.min()}, {a.max()}]; "
                             f"pass the vocabulary size as V")
    return train_ids, val_ids, V


def unigram_bpt(train_ids, val_ids, V):
    """Unigram baseline: bits per token of the validation targets under add-one smoothed
    training counts.

    With ``c(v)`` the count of token ``v`` in the ``N`` training tokens:

        p(v) = (c(v) + 1) / (N + V)
        bpt  = -1/(T - 1) * sum_{t=1}^{T-1} log2 p(val[t])

    The targets are ``val[1:]``, those a language model predicts (:func:`eval_windows`); for
    ``bytes`` this is bits per byte. A text where every token is equally frequent gives
    ``p = 1/V`` and ``bpt = log2 V``.
    """
    train_ids, val_ids, V = _check_baseline_ids(train_ids, val_ids, V)
    counts = np.bincount(train_ids, minlength=V)  # (V,)
    log2p = np.log2((counts + 1.0) / (len(train_ids) + V))  # (V,)
    return float(-np.mean(log2p[val_ids[1:]]))


def bigram_bpt(train_ids, val_ids, V):
    """Bigram baseline: bits per token of the validation targets given the previous token,
    under add-one smoothed training pair counts.

    With ``c(u, w)`` the number of training pairs ``(train[i-1], train[i]) = (u, w)`` and
    ``c(u, .) = sum_w c(u, w)`` (pairs that start with ``u``; the last training token starts
    none):

        p(w | u) = (c(u, w) + 1) / (c(u, .) + V)
        bpt      = -1/(T - 1) * sum_{t=1}^{T-1} log2 p(val[t] | val[t-1])

    The first validation token is context only (as for a language model); an unseen ``u`` gives
    the uniform ``1/V``. Pair counts are kept sparse (sorted keys ``u * V + w``), so a large
    ``chars`` vocabulary costs no ``V x V`` table.
    """
    train_ids, val_ids, V = _check_baseline_ids(train_ids, val_ids, V)
    keys = np.unique(train_ids[:-1] * V + train_ids[1:], return_counts=True)  # (P,), (P,)
    row = np.bincount(train_ids[:-1], minlength=V)  # (V,)  c(u, .)
    q = val_ids[:-1] * V + val_ids[1:]  # (T-1,)
    pos = np.minimum(np.searchsorted(keys[0], q), max(len(keys[0]) - 1, 0))  # (T-1,)
    pair = np.where(keys[0][pos] == q, keys[1][pos], 0) if len(keys[0]) else np.zeros_like(q)
    log2p = np.log2((pair + 1.0) / (row[val_ids[:-1]] + V))  # (T-1,)
    return float(-np.mean(log2p))


def bits_per_token(loss_nats):
    """``loss_nats / ln 2``: a mean cross-entropy in nats as bits per token (per byte for the
    ``bytes`` vocabulary). A scalar gives a float, an array an array."""
    if isinstance(loss_nats, np.ndarray) and loss_nats.dtype.kind == "f":
        return loss_nats / _LN2
    if isinstance(loss_nats, (bool, np.bool_)) or not isinstance(loss_nats, numbers.Real):
        raise TypeError(f"loss_nats must be a real number (a cross-entropy in nats) or a float "
                        f"array, got {type(loss_nats).__name__}")
    return float(loss_nats) / _LN2
