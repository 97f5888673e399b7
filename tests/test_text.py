"""refimpl.text: vocabularies, the split by position, windows, baselines (generated text only)."""
import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refimpl.text import (
    VOCABS,
    Vocab,
    bigram_bpt,
    bits_per_token,
    byte_vocab,
    char_vocab,
    eval_windows,
    load_text,
    make_vocab,
    min_tokens,
    split_sizes,
    text_from_recipe,
    unigram_bpt,
    windows,
)

EPS = np.finfo(np.float64).eps

WORDS = ("the", "a", "model", "spikes", "state", "space", "of", "and", "in", "neuron", "fires",
         "café", "naïve", "über", "€uro", "中文", "😀")


def pseudo_english(n_words, seed=0):
    """A deterministic word salad with punctuation, newlines and multi-byte UTF-8 words."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(WORDS) + 1)  # Zipf-like: skewed counts, like real text
    w = rng.choice(len(WORDS), size=n_words, p=p / p.sum())
    out = []
    for k, i in enumerate(w):
        out.append(WORDS[i])
        out.append(".\n" if k % 11 == 10 else ", " if k % 5 == 4 else " ")
    return "".join(out)


def stdlib_text():
    """A realistic sample that ships with Python: the source of the json package."""
    return Path(json.__file__).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [pseudo_english(300), stdlib_text(), "é€😀中\x00\n\r\t"])
def test_bytes_round_trip(text):
    v = byte_vocab()
    ids = v.encode(text)
    raw = text.encode("utf-8")
    assert ids.dtype == np.int64 and ids.shape == (len(raw),)
    assert np.array_equal(ids, np.frombuffer(raw, dtype=np.uint8))
    assert np.array_equal(v.encode(raw), ids)
    assert v.decode(ids) == text
    assert v.size == 256 and v.unit == "byte"


def test_bytes_decode_replaces_invalid_utf8():
    v = byte_vocab()
    # a lone continuation byte, a truncated 3-byte sequence, then valid 'é'
    assert v.decode(np.array([0x80, 0x41, 0xE2, 0x82, 0xC3, 0xA9])) == "\ufffdA\ufffdé"
    assert v.decode([]) == ""


@pytest.mark.parametrize("text", [pseudo_english(300), stdlib_text(), "é€😀中 aé"])
def test_chars_round_trip_multibyte(text):
    v = char_vocab(text)
    assert v.kind == "chars" and v.unit == "char"
    assert list(v.chars) == sorted(set(text)) and v.size == len(set(text))
    ids = v.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert [v.chars[i] for i in ids] == list(text)
    assert v.decode(ids) == text
    assert np.array_equal(v.encode(text.encode("utf-8")), ids)


@given(st.text(min_size=1))
def test_round_trips_for_any_text(text):
    for v in (byte_vocab(), char_vocab(text)):
        assert v.decode(v.encode(text)) == text


@pytest.mark.parametrize("v", [byte_vocab(), char_vocab(pseudo_english(200))])
def test_vocab_json_round_trip(v):
    s = v.to_json()
    assert isinstance(s, str) and s.isascii()
    w = Vocab.from_json(s)
    assert w == v
    text = pseudo_english(50, seed=3)
    assert np.array_equal(w.encode(text), v.encode(text))
    assert make_vocab(v.kind, pseudo_english(200)) == v


def test_unknown_character_names_it_and_its_position():
    v = char_vocab("abc \n")
    with pytest.raises(ValueError, match=r"2 character\(s\) outside the vocabulary of 5 "
                                         r"characters: 'é' at position 2, '\\t' at position 4"):
        v.encode("abé \tc")
    with pytest.raises(ValueError, match="--vocab bytes"):
        v.encode("z")
    # the same from UTF-8 bytes
    with pytest.raises(ValueError, match="'é' at position 1"):
        v.encode("aé".encode())


def test_vocab_errors():
    with pytest.raises(ValueError, match="unknown vocab 'words'; valid names are 'bytes', 'chars'"):
        make_vocab("words", "abc")
    with pytest.raises(ValueError, match="sorted by code point"):
        Vocab("chars", 2, ("b", "a"))
    with pytest.raises(ValueError, match="sorted by code point"):
        Vocab("chars", 2, ("a", "a"))
    with pytest.raises(ValueError, match="size 3 needs 3 chars, got 2"):
        Vocab("chars", 3, ("a", "b"))
    with pytest.raises(ValueError, match="bytes vocabulary has size 256"):
        Vocab("bytes", 100)
    with pytest.raises(ValueError, match="not a vocabulary JSON"):
        Vocab.from_json("{oops")
    with pytest.raises(ValueError, match="keys"):
        Vocab.from_json('{"kind": "bytes"}')
    with pytest.raises(ValueError, match="empty text"):
        char_vocab("")
    with pytest.raises(ValueError, match="not UTF-8 text.*use --vocab bytes"):
        char_vocab(b"ab\xff")
    v = char_vocab("ab")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 2\).*got \[0, 2\]"):
        v.decode(np.array([0, 2]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 256\)"):
        byte_vocab().decode(np.array([-1]))
    with pytest.raises(TypeError, match="ids must be integers"):
        v.decode(np.array([0.0]))
    with pytest.raises(TypeError, match="text must be a str or bytes"):
        v.encode(3)


# --------------------------------------------------------------------------------------------
# load_text: the split by position, and its errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("val_frac", [0.1, 0.25, 0.5])
def test_split_by_position(tmp_path, vocab, val_frac):
    text = pseudo_english(400, seed=1)
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    d = load_text(path, vocab=vocab, context=8, val_frac=val_frac)
    ids = d.vocab.encode(text)
    n = len(ids)
    assert n == (len(text) if vocab == "chars" else len(text.encode()))
    assert len(d.val) == round(val_frac * n) and len(d.train) == n - len(d.val)
    assert np.array_equal(d.train, ids[: len(d.train)])
    assert np.array_equal(d.val, ids[len(d.train):])
    assert d.train.dtype == d.val.dtype == np.int64
    assert d.vocab.kind == vocab
    assert d.path == str(path.resolve())
    assert d.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    r = d.recipe
    assert r == {"text": d.path, "sha256": d.sha256, "vocab": vocab, "context": 8,
                 "val_frac": val_frac}
    e = text_from_recipe(json.loads(json.dumps(r)))  # survives a JSON round trip
    assert np.array_equal(e.train, d.train) and np.array_equal(e.val, d.val)
    assert e.vocab == d.vocab
    path.write_bytes(text.encode("utf-8") + b"!")
    with pytest.raises(ValueError, match="has changed since training"):
        text_from_recipe(r)
    path.unlink()
    with pytest.raises(ValueError, match="no longer exists"):
        text_from_recipe(r)


def test_bytes_reads_any_file_chars_refuses_binary(tmp_path):
    path = tmp_path / "blob.bin"
    raw = bytes(range(256)) * 4
    path.write_bytes(raw)
    d = load_text(path, vocab="bytes", context=16)
    assert np.array_equal(np.concatenate([d.train, d.val]), np.tile(np.arange(256), 4))
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 0x80 at offset 128.*"
                                         r"use --vocab bytes") as e:
        load_text(path, vocab="chars", context=16)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_min_tokens_is_the_threshold():
    for context in (2, 3, 16, 128):
        for val_frac in (0.01, 0.1, 0.3, 0.5, 0.9):
            n = min_tokens(context, val_frac)
            assert min(split_sizes(n, val_frac)) >= context + 1
            assert min(split_sizes(n - 1, val_frac)) < context + 1 or n - 1 < 2 * (context + 1)
            # no smaller n works at all (brute force below the threshold)
            assert all(min(split_sizes(m, val_frac)) < context + 1 for m in range(n))


def test_too_short_text_says_what_is_needed(tmp_path):
    path = tmp_path / "short.txt"
    # val part too short: 100 bytes, val_frac 0.1 -> 90 train, 10 val < 17
    path.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"text too short for context 16: its 100 bytes split "
                                         r"into 90 for training and 10 for validation .*"
                                         r"context \+ 1 = 17; give a text of at least 166 bytes"):
        load_text(path, context=16, val_frac=0.1)
    # train part too short: val_frac 0.9 -> 10 train
    with pytest.raises(ValueError, match=r"10 for training and 90 for validation"):
        load_text(path, context=16, val_frac=0.9)
    # chars count characters: 30 'é' are 60 bytes (enough) but 30 chars (too few)
    path.write_text("é" * 30, encoding="utf-8")
    with pytest.raises(ValueError, match=r"its 30 chars split into 15 for training and 15 .*"
                                         r"at least 34 chars, or a smaller --context"):
        load_text(path, vocab="chars", context=16, val_frac=0.5)
    assert load_text(path, vocab="bytes", context=16, val_frac=0.5).val.shape == (30,)
    # exactly at the threshold it loads
    path.write_bytes(b"y" * min_tokens(16, 0.1))
    assert len(load_text(path, context=16, val_frac=0.1).val) == 17


def test_load_text_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.txt: no such file"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="cannot read"):
        load_text(tmp_path)  # a directory
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.txt: the file is empty; give a text of at "
                                         r"least 1286 tokens for context 128"):
        load_text(empty)
    ok = tmp_path / "ok.txt"
    ok.write_text(pseudo_english(100))
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"val_frac must be in \(0, 1\)"):
            load_text(ok, context=4, val_frac=bad)
    with pytest.raises(TypeError, match="val_frac must be a real number"):
        load_text(ok, context=4, val_frac="0.1")
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match=f"context must be >= 2 .*got {bad}"):
            load_text(ok, context=bad)
    with pytest.raises(TypeError, match="context must be an integer"):
        load_text(ok, context=4.0)
    with pytest.raises(ValueError, match="unknown vocab 'word'"):
        load_text(ok, vocab="word", context=4)


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_windows_deterministic_and_in_range():
    n, context = 30, 5
    ids = np.arange(n, dtype=np.int64) * 7  # distinct tokens: a window's start is w[0] / 7
    a = windows(ids, context, 4000, np.random.default_rng(3))
    b = windows(ids, context, 4000, np.random.default_rng(3))
    c = windows(ids, context, 4000, np.random.default_rng(4))
    assert a.shape == (4000, context + 1) and a.dtype == np.int64
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    start = a[:, 0] // 7
    assert np.array_equal(a, ids[start[:, None] + np.arange(context + 1)])  # consecutive tokens
    # every full window can occur, none reaches past the end: starts 0 .. n - context - 1
    assert set(start.tolist()) == set(range(n - context))
    # uniform: each of the 25 starts has expected count 160, sd sqrt(160 * 24/25) ~ 12.4;
    # 6 sd bounds fail by chance with probability ~1e-8 per start (and the seed is fixed)
    counts = np.bincount(start, minlength=n - context)
    assert counts.min() > 160 - 6 * 12.4 and counts.max() < 160 + 6 * 12.4
    # consecutive calls advance the generator
    rng = np.random.default_rng(3)
    first, second = windows(ids, context, 8, rng), windows(ids, context, 8, rng)
    assert not np.array_equal(first, second)
    # the shortest text: one window only
    assert np.array_equal(windows(ids[:6], 5, 3, rng), np.tile(ids[:6], (3, 1)))


@pytest.mark.parametrize("n, context", [(50, 7), (50, 8), (9, 8), (10, 2), (1000, 128)])
def test_eval_windows_cover_the_validation_targets(n, context):
    ids = np.arange(n, dtype=np.int64) + 3
    w = eval_windows(ids, context)
    n_windows = (n - 1) // context
    assert w.shape == (n_windows, context + 1) and w.dtype == np.int64
    targets = w[:, 1:].ravel()
    # every token after the first is a target exactly once, in order, except a dropped tail
    # of fewer than context tokens
    assert np.array_equal(targets, ids[1: 1 + len(targets)])
    assert 0 <= (n - 1) - len(targets) < context
    assert np.array_equal(w[:, 0], ids[np.arange(n_windows) * context])
    if (n - 1) % context == 0:
        assert targets[-1] == ids[-1]


def test_window_errors():
    ids = np.arange(10, dtype=np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"ids has 10 tokens, fewer than one window of "
                                         r"context \+ 1 = 11"):
        windows(ids, 10, 2, rng)
    with pytest.raises(ValueError, match="ids has 10 tokens"):
        eval_windows(ids, 10)
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator.*default_rng"):
        windows(ids, 4, 2, 0)
    with pytest.raises(TypeError, match=r"ids must have dtype int64.*astype\(np.int64\)"):
        windows(ids.astype(np.int32), 4, 2, rng)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        windows(ids, 4, 0, rng)
    with pytest.raises(ValueError, match="context must be >= 2"):
        eval_windows(ids, 1)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def oracle_unigram(train, val, V):
    c = Counter(train)
    terms = [-math.log2((c[v] + 1) / (len(train) + V)) for v in val[1:]]
    return math.fsum(terms) / len(terms)


def oracle_bigram(train, val, V):
    pairs, rows = Counter(), Counter()
    for i in range(1, len(train)):
        pairs[(train[i - 1], train[i])] += 1
        rows[train[i - 1]] += 1
    terms = [-math.log2((pairs[(val[t - 1], val[t])] + 1) / (rows[val[t - 1]] + V))
             for t in range(1, len(val))]
    return math.fsum(terms) / len(terms)


def _tol(bpt, n):
    """Both sides take the same ``(count + 1) / (total + V)`` (exact integers in float64, one
    rounded division) and a log2 (<= 1 ulp apart between NumPy and libm, abs error <=
    ~2 eps per term since |log2| of a rounded p moves by <= eps/ln2); NumPy sums the n
    non-negative terms pairwise (rel. error <= ceil(log2 n) eps), the oracle with fsum."""
    return (math.ceil(math.log2(n)) + 2) * EPS * bpt + 4 * EPS


@pytest.mark.parametrize("vocab", VOCABS)
def test_baselines_match_brute_force(vocab):
    text = pseudo_english(3000, seed=5)
    v = make_vocab(vocab, text)
    ids = v.encode(text)
    cut = int(0.8 * len(ids))
    train, val = ids[:cut], ids[cut:]
    tl, vl = train.tolist(), val.tolist()
    u, b = unigram_bpt(train, val, v.size), bigram_bpt(train, val, v.size)
    ou, ob = oracle_unigram(tl, vl, v.size), oracle_bigram(tl, vl, v.size)
    assert abs(u - ou) <= _tol(ou, len(val)), (u, ou)
    assert abs(b - ob) <= _tol(ob, len(val)), (b, ob)
    # structured text: the previous token helps, and both beat the uniform log2 V
    assert b < u < math.log2(v.size)


@given(st.lists(st.integers(0, 5), min_size=0, max_size=40),
       st.lists(st.integers(0, 5), min_size=2, max_size=40))
def test_baselines_match_brute_force_small(train, val):
    # V = 7 > max token: one token never appears (zero counts, unseen bigram rows)
    V = 7
    t, v = np.array(train, dtype=np.int64), np.array(val, dtype=np.int64)
    assert abs(unigram_bpt(t, v, V) - oracle_unigram(train, val, V)) <= _tol(3.0, 64)
    assert abs(bigram_bpt(t, v, V) - oracle_bigram(train, val, V)) <= _tol(3.0, 64)


def test_bigram_closed_form():
    # train "abab...ab" (k pairs a->b, k-1 pairs b->a): p(b|a) = (k+1)/(k+2), p(a|b) = k/(k+1)
    k = 50
    train = np.tile([0, 1], k).astype(np.int64)
    val = np.array([0, 1, 0, 1, 0], dtype=np.int64)  # targets b, a, b, a
    want = -(2 * math.log2((k + 1) / (k + 2)) + 2 * math.log2(k / (k + 1))) / 4
    assert abs(bigram_bpt(train, val, 2) - want) <= _tol(want, 4)
    assert abs(unigram_bpt(train, val, 2) - 1.0) <= _tol(1.0, 4)  # equal counts: log2 2


@pytest.mark.parametrize("V", [2, 27, 256])
def test_uniform_text_unigram_is_log2_V(V):
    rng = np.random.default_rng(V)
    # every token equally often in train: p(v) = (k + 1) / (k V + V) = 1/V exactly
    train = rng.permutation(np.repeat(np.arange(V), 9)).astype(np.int64)
    val = rng.integers(0, V, size=500).astype(np.int64)
    assert abs(unigram_bpt(train, val, V) - math.log2(V)) <= _tol(math.log2(V), 500)
    # i.i.d. uniform train: only sampling noise and smoothing move it from log2 V; with
    # 200 V samples the counts' relative spread is ~1/sqrt(200) = 7%, which costs at most
    # ~0.5 * 0.07**2 / ln 2 < 0.01 bits on average over the targets
    train = rng.integers(0, V, size=200 * V).astype(np.int64)
    val = rng.integers(0, V, size=200 * V).astype(np.int64)
    assert abs(unigram_bpt(train, val, V) - math.log2(V)) < 0.02


def test_baseline_errors():
    t = np.array([0, 1, 2], dtype=np.int64)
    for fn in (unigram_bpt, bigram_bpt):
        with pytest.raises(ValueError, match="val_ids must hold at least 2 tokens"):
            fn(t, t[:1], 3)
        with pytest.raises(ValueError, match=r"train_ids must lie in \[0, V\) = \[0, 2\).*"
                                             r"pass the vocabulary size as V"):
            fn(t, t[:2], 2)
        with pytest.raises(TypeError, match="val_ids must have dtype int64"):
            fn(t, t.astype(np.float64), 3)
        with pytest.raises(ValueError, match="V must be >= 1"):
            fn(t, t, 0)


def test_bits_per_token():
    assert bits_per_token(math.log(256)) == pytest.approx(8.0, rel=2 * EPS)  # 2 roundings
    assert bits_per_token(0.0) == 0.0
    a = np.array([math.log(2), 2 * math.log(2)])
    assert np.allclose(bits_per_token(a), [1.0, 2.0], rtol=2 * EPS, atol=0)
    with pytest.raises(TypeError, match="loss_nats must be a real number"):
        bits_per_token("1.0")
