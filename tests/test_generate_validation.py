"""``refimpl generate`` and :mod:`refimpl.sampling` validate what they are given (issue 23), and
the sampler draws from the distribution its docstring states, tail included.

The distribution is pinned against an independent computation: :mod:`decimal` at 50 digits from
the formula (``softmax(logits / T)`` over the ``top_k`` largest logits, ties by lower id; the
inverse CDF over the token ids in order), never a call of the code under test. Two checks:

- exact: :func:`refimpl.sampling.inverse_cdf` at fixed uniforms inside every interval
  ``[F_{j-1}, F_j)`` of probability above 1e-11 (near both ends and in the middle) and on a
  grid, against the token the exact ``F`` gives. Points closer than 1e-13 to a boundary are
  skipped: the float64 cumulative sum of ``V <= 64`` terms is within ``V eps`` = 1.4e-14 of
  the exact one;
- statistical: 200,000 draws of :func:`refimpl.sampling.sample` against the exact
  probabilities by a chi-square test (bins of expected count below 5 pooled; fixed seeds, so
  the outcome is fixed; p > 1e-4 passes).

A sampler whose CDF is off by a factor 0.999 moves every boundary near the end by 1e-3: both
checks fail (the grid and the intervals of the tail tokens, and the last token's count).
"""
import dataclasses
import decimal
import os
import re
import resource
import subprocess
import sys
import tracemalloc
import warnings
from bisect import bisect_right

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from refimpl import sampling
from refimpl.cli import text_commands as text_cli
from refimpl.cli.main import main as cli_main
from refimpl.model import ModelConfig, init_model, model_fwd
from refimpl.sampling import inverse_cdf, probabilities, sample
from refimpl.stream import ModelStream, stream_support
from refimpl.text import Vocab, byte_vocab, split_sizes
from refimpl.train import load_checkpoint

D = decimal.Context(prec=50)
EDGE = 1e-13  # skip uniforms this close to an exact CDF boundary (module docstring)

# --------------------------------------------------------------------------------------------
# The independent distribution
# --------------------------------------------------------------------------------------------


def exact_probabilities(z, T, k):
    """Exact p (list of Decimal, id order) of one row: softmax(z / T) over the k largest
    logits (0: all), ties at the k-th by lower id."""
    V = len(z)
    kept = sorted(range(V), key=lambda j: (-z[j], j))[:k or V]
    zmax = max(decimal.Decimal(float(z[j])) for j in kept)
    t = decimal.Decimal(float(T))
    w = {j: D.exp(D.divide(decimal.Decimal(float(z[j])) - zmax, t)) for j in kept}
    total = D.add(sum(w.values(), decimal.Decimal(0)), 0)
    return [D.divide(w[j], total) if j in w else decimal.Decimal(0) for j in range(V)]


def exact_cdf(p):
    F, acc = [], decimal.Decimal(0)
    for pj in p:
        acc = D.add(acc, pj)
        F.append(acc)
    return F


def tail_logits(V=40, seed=0):
    """Logits whose probabilities (T = 1) span 0.05 .. 1e-11: a tail of small tokens among the
    large ones, and at the highest ids (where the CDF is near 1) 3e-3, 2e-5, 1e-7, 1e-9."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.5, 1.0, V)  # (V,)
    p[rng.choice(V - 4, 6, replace=False)] *= [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-9]
    tail = np.array([3e-3, 2e-5, 1e-7, 1e-9])
    p[:-4] *= (1.0 - tail.sum()) / p[:-4].sum()
    p[-4:] = tail
    return np.log(p)  # (V,)


ROWS = {
    "tail": tail_logits(),
    "ties": np.array([1.0, 2.0, 2.0, 2.0, 0.0, -3.0, 2.0]),  # top-k cut among equal logits
    "spread": np.linspace(-30.0, 5.0, 64),
}
CASES = [("tail", 1.0, 0), ("tail", 0.37, 0), ("tail", 2.5, 7), ("tail", 1.0, 40),
         ("tail", 1e-3, 0), ("tail", 1e300, 3), ("ties", 1.0, 2), ("ties", 0.5, 5),
         ("spread", 4.0, 0), ("spread", 0.8, 20)]


def uniforms_and_tokens(p):
    """Uniforms in [0, 1) and the token the exact inverse CDF of ``p`` gives each."""
    F = exact_cdf(p)
    lo = [decimal.Decimal(0)] + F[:-1]
    us = []
    for j, pj in enumerate(p):
        if pj > decimal.Decimal("1e-11"):
            us += [D.add(lo[j], D.multiply(pj, f)) for f in
                   (decimal.Decimal("0.001"), decimal.Decimal("0.5"), decimal.Decimal("0.999"))]
    us += [decimal.Decimal(float(u)) for u in np.linspace(0.0, 1.0, 5001)[:-1]]
    us.append(decimal.Decimal(float(np.nextafter(1.0, 0.0))))
    last = max(j for j in range(len(p)) if p[j] > 0)  # F_last = 1 exactly: u < 1 stops there
    edge = decimal.Decimal(EDGE)
    keep_u, tokens = [], []
    for u in us:
        uf = float(u)
        ud = decimal.Decimal(uf)  # the float64 uniform the sampler sees
        j = bisect_right(F, ud)  # F[j - 1] <= u < F[j]
        near = [F[i] for i in (j - 1, j) if 0 <= i < len(F)]
        if not 0.0 <= uf < 1.0 or any(abs(ud - b) < edge for b in near):
            continue
        keep_u.append(uf)
        tokens.append(min(j, last))
    return np.array(keep_u), np.array(tokens)


@pytest.mark.parametrize("row, T, k", CASES)
def test_inverse_cdf_at_fixed_uniforms_equals_the_exact_inverse_cdf(row, T, k):
    z = ROWS[row]
    p = exact_probabilities(z, T, k)
    u, want = uniforms_and_tokens(p)
    got = inverse_cdf(np.repeat(z[None], len(u), axis=0), T, k, u)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (f"{bad.size} of {len(u)} uniforms map to another token; first u = "
                           f"{u[bad[0]]!r}: got {got[bad[0]]}, exact {want[bad[0]]}")
    tail = [j for j, pj in enumerate(p) if decimal.Decimal("1e-11") < pj < decimal.Decimal("1e-3")]
    if row == "tail" and T == 1.0:
        assert len(tail) >= 6 and set(tail) <= set(got.tolist())  # every tail token was drawn


@pytest.mark.parametrize("row, T, k", CASES)
def test_probabilities_equal_the_exact_ones(row, T, k):
    """The distribution the docstring states, per entry within ``(2 |e| + 68) eps`` relative
    plus 1e-300 absolute (underflow to 0): the exponent ``e = (z - max z) / T`` is rounded
    twice (``2 |e| eps`` absolute, relative in ``exp(e)``), ``exp`` is within an ulp or two,
    the sum of up to 64 terms within ``64 eps`` and the division an ulp."""
    z = ROWS[row]
    want = np.array([float(v) for v in exact_probabilities(z, T, k)])
    e = np.abs((z - z.max()) / T)  # (V,) exact enough for a tolerance
    got = probabilities(z[None], T, k)[0]
    tol = (2 * e + 68) * np.finfo(float).eps * want + 1e-300
    assert np.all(np.abs(got - want) <= tol), (got, want)


@pytest.mark.parametrize("row, T, k", [("tail", 1.0, 0), ("tail", 0.6, 12), ("ties", 1.0, 2)])
def test_sample_frequencies_pass_a_chi_square_test_against_the_exact_distribution(row, T, k):
    z = ROWS[row]
    n = 200_000
    p = np.array([float(v) for v in exact_probabilities(z, T, k)])  # (V,)
    rng, rows = np.random.default_rng(7), np.repeat(z[None], n // 10, axis=0)  # (n / 10, V)
    got = sum(np.bincount(sample(rows, T, k, rng), minlength=len(z)) for _ in range(10))  # (V,)
    assert got[p == 0].sum() == 0  # dropped tokens are never drawn
    expected = n * p
    big = expected >= 5
    obs = np.append(got[big], got[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # scipy wants equal totals to ~1e-8
    pvalue = stats.chisquare(obs, exp).pvalue
    assert pvalue > 1e-4, (pvalue, obs, exp)


def test_a_uniform_above_the_rounded_total_takes_the_last_kept_token():
    """Rounding can end the float64 CDF below the largest uniform, 1 - 2**-53 (this row, top 3:
    at 1 - 2**-52): that uniform lies in the last kept token's interval (id 2; ids 3..5 are
    dropped), never past it."""
    z = np.array([[1.203258954116498, 0.6370732356261833, 0.5583399616951433,
                   -3.772275156122734, 0.2606297490669398, -0.025445316692543535]])
    u = np.array([np.nextafter(1.0, 0.0)])
    assert np.cumsum(probabilities(z, 1.0, 3)[0])[-1] < u[0]  # the case is the one meant
    assert inverse_cdf(z, 1.0, 3, u).tolist() == [2]


def test_sample_is_the_inverse_cdf_of_one_uniform_per_row():
    z = np.repeat(ROWS["tail"][None], 500, axis=0)  # (500, V)
    a = sample(z, 0.8, 9, np.random.default_rng(3))
    b = inverse_cdf(z, 0.8, 9, np.random.default_rng(3).random(500))
    assert np.array_equal(a, b) and a.dtype == np.int64
    assert np.array_equal(a, sample(z, 0.8, 9, np.random.default_rng(3)))  # a seed, a result


# --------------------------------------------------------------------------------------------
# Temperature 0 and tiny temperatures
# --------------------------------------------------------------------------------------------


def test_temperature_zero_is_greedy_and_draws_nothing():
    z = np.array([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 4.0, 4.9]])
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    assert sample(z, 0.0, 0, rng).tolist() == [1, 0]  # ties: the lower id
    assert rng.bit_generator.state == before
    assert sample(z, 0, 3, rng).tolist() == [1, 0]  # top_k does not change the argmax
    assert probabilities(z, 0.0).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("T", [5e-324, 1e-320, 1e-300, 1e-200])
def test_tiny_temperatures_give_the_greedy_token_without_warnings(T):
    """Subtracting the largest logit first: nothing overflows, the limit is the argmax."""
    z = np.repeat(ROWS["tail"][None], 50, axis=0)  # (50, V) one largest logit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sample(z, T, 0, np.random.default_rng(0))
        p = probabilities(z[:1], T)
    assert np.all(got == z[0].argmax()) and p[0, z[0].argmax()] == 1.0 and p.sum() == 1.0


def test_huge_logit_spread_and_huge_temperature_do_not_overflow():
    z = np.array([[-1e308, 1e308, 0.0, 1e308]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probabilities(z, 1.0).tolist() == [[0.0, 0.5, 0.0, 0.5]]
        assert np.allclose(probabilities(np.array([[1.0, 2.0, 3.0]]), 1e300), 1 / 3)


# --------------------------------------------------------------------------------------------
# Validation of the sampler: one test per rule
# --------------------------------------------------------------------------------------------

Z = np.array([[0.5, 1.0, -2.0]])  # (1, 3)


@pytest.mark.parametrize("T", [-1.0, -5e-324, float("nan"), float("inf"), -float("inf")])
def test_sample_refuses_a_bad_temperature(T):
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy.* or a finite number "
                                         r"> 0, got"):
        sample(Z, T, 0, np.random.default_rng(0))


@pytest.mark.parametrize("T", ["1", True, None])
def test_sample_refuses_a_temperature_that_is_no_number(T):
    with pytest.raises(TypeError, match="temperature must be a real number"):
        sample(Z, T, 0, np.random.default_rng(0))


@pytest.mark.parametrize("k", [-1, 4, 10**9])
def test_sample_refuses_top_k_outside_the_vocabulary(k):
    with pytest.raises(ValueError, match=rf"top_k must be in \[0, 3\] .*got {k}"):
        sample(Z, 1.0, k, np.random.default_rng(0))


def test_sample_refuses_a_top_k_that_is_no_integer():
    with pytest.raises(TypeError, match="top_k must be an integer"):
        sample(Z, 1.0, 1.5, np.random.default_rng(0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_sample_refuses_non_finite_logits(bad):
    z = Z.copy()
    z[0, 2] = bad
    with pytest.raises(ValueError, match=r"logits contains non-finite values \(first at index "
                                         r"\(0, 2\)"):
        sample(z, 1.0, 0, np.random.default_rng(0))


def test_sample_refuses_all_minus_inf_logits():
    with pytest.raises(ValueError, match="logits contains non-finite values"):
        sample(np.full((2, 3), -np.inf), 1.0, 0, np.random.default_rng(0))


def test_sample_refuses_logits_of_another_dtype_or_shape():
    with pytest.raises(TypeError, match=r"logits must have dtype float64.*astype"):
        sample(Z.astype(np.float32), 1.0, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="logits must have rank 2"):
        sample(Z[0], 1.0, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one token per row"):
        sample(np.zeros((2, 0)), 1.0, 0, np.random.default_rng(0))


def test_sample_refuses_a_seed_in_place_of_a_generator():
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        sample(Z, 1.0, 0, 0)


@pytest.mark.parametrize("u", [np.array([1.0]), np.array([-0.1]), np.array([0.1, 0.2])])
def test_inverse_cdf_refuses_uniforms_outside_0_1_or_of_another_count(u):
    with pytest.raises(ValueError, match=r"u must hold one uniform in \[0, 1\) per row"):
        inverse_cdf(Z, 1.0, 0, u)


@pytest.mark.parametrize("n, f, err, match", [
    (-1, 0.1, ValueError, "n must be >= 0, got -1"),
    (10, 1.5, ValueError, r"val_frac must be in \(0, 1\)"),
    (10, 0.0, ValueError, r"val_frac must be in \(0, 1\)"),
    (10.5, 0.1, TypeError, "n must be an integer"),
])
def test_split_sizes_refuses_bad_arguments(n, f, err, match):
    with pytest.raises(err, match=match):
        split_sizes(n, f)


def test_split_sizes_of_zero_tokens():
    assert split_sizes(0, 0.1) == (0, 0)


# --------------------------------------------------------------------------------------------
# Prompts: raw bytes stay bytes
# --------------------------------------------------------------------------------------------


def test_a_bytes_vocabulary_encodes_escaped_raw_bytes_as_those_bytes():
    """sys.argv keeps bytes that are not UTF-8 as U+DC80..U+DCFF (surrogateescape)."""
    raw = b"\xff\xfeA\xc3\xa9"
    text = os.fsdecode(raw)  # '\udcff\udcfeA\xe9', as a command line delivers it
    assert byte_vocab().encode(text).tolist() == list(raw)
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at position 1"):
        byte_vocab().encode("a\ud800")


def test_a_chars_vocabulary_names_a_raw_byte_it_cannot_encode():
    v = Vocab("chars", 3, ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"the raw byte 0xff \(not UTF-8\) at position 1"):
        v.encode("a\udcffb")


# --------------------------------------------------------------------------------------------
# refimpl generate
# --------------------------------------------------------------------------------------------

WORDS = ["spike", "state", "space", "model", "neuron", "threshold"]
SMALL = ["--context", "16", "--epochs", "1", "--d-model", "8", "--d-state", "4", "--layers",
         "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints of ``train --text``: bytes and chars vocabularies, float64 and float32."""
    root = tmp_path_factory.mktemp("gen")
    text = root / "words.txt"
    rng = np.random.default_rng(0)
    text.write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 800)),
                    encoding="utf-8")
    out = {}
    for name, extra in (("bytes", []), ("chars", ["--vocab", "chars"]),
                        ("bytes32", ["--dtype", "float32"])):
        r = CliRunner().invoke(cli_main, ["train", "--text", str(text), "--out",
                                          str(root / name)] + SMALL + extra)
        assert r.exit_code == 0, r.output
        out[name] = str(root / name / "checkpoint.h5")
    return out


def _generate(ck, *args):
    return CliRunner().invoke(cli_main, ["generate", ck] + list(args))


def one_error(r, *parts):
    """Exit 1, ``Error: ...`` as the output's only line that says so, the last, no traceback."""
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("Error:") and sum(ln.startswith("Error:") for ln in lines) == 1
    assert "Traceback" not in r.output and r.exc_info[0] is SystemExit, r.output
    for p in parts:
        assert p in lines[-1], r.output


def test_generate_refuses_a_length_that_does_not_fit_in_memory(runs, monkeypatch):
    monkeypatch.setattr(sampling, "available_bytes", lambda: (4 * 2**30, "a test limit"))
    r = _generate(runs["bytes"], "--prompt", "sp", "--length", "1000000000")
    per = sampling.TOKEN_BYTES + text_cli.TEXT_BYTES
    most = 4 * 2**30 // per
    one_error(r, "--length 1000000000 needs", f"{per} bytes per token", "a test limit",
              f"lower --length to at most {most}")
    monkeypatch.setattr(sampling, "available_bytes", lambda: (per * 20, "a test limit"))
    one_error(_generate(runs["bytes"], "--prompt", "sp", "--length", "21"), "at most 20")
    assert _generate(runs["bytes"], "--prompt", "sp", "--length", "20").exit_code == 0


def test_generate_under_a_4_gib_address_space_limit_refuses_in_one_line(runs):
    """The measured case: no _ArrayMemoryError traceback, the limit is read from the system."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    r = subprocess.run([sys.executable, "-c", "from refimpl.cli.main import main; main()",
                        "generate", runs["bytes"], "--prompt", "sp", "--length", "1000000000"],
                       preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "", r
    assert re.fullmatch(r"Error: --length 1000000000 needs \S+ GiB .*address-space limit "
                        r"4\.00 GiB.*lower --length to at most \d+\n", r.stderr), r.stderr


def test_the_memory_per_token_bounds_what_generate_holds(runs, monkeypatch):
    """tracemalloc's peak over generate's decoding and echo of n tokens (the sampling loop
    replaced by its int64 result, the ids it holds), per token, is within the estimate. The
    continuation is the worst case of each vocabulary: bytes that are not UTF-8 (a str of
    U+FFFD and other characters, UCS-4) and characters."""
    n = 500_000
    for name, hi in (("bytes", 256), ("chars", None)):
        V = Vocab.from_json(load_checkpoint(runs[name]).data_recipe["vocab_json"]).size
        ids = np.random.default_rng(0).integers(128 if hi else 0, hi or V, size=(1, n),
                                                dtype=np.int64)

        def fake(stream, prompt, length, **kw):
            return ids.copy(), {"seconds": 1.0, "tokens_per_second": 1.0, "prompt_seconds": 0.0}

        monkeypatch.setattr(text_cli, "generate_tokens", fake)
        tracemalloc.start()
        try:
            r = _generate(runs[name], "--prompt", "s", "--length", str(n))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert r.exit_code == 0, r.output
        assert peak / n <= sampling.TOKEN_BYTES + text_cli.TEXT_BYTES, (name, peak / n)


@pytest.mark.parametrize("T", ["-1", "nan", "inf", "-0.5"])
def test_generate_refuses_a_bad_temperature(runs, T):
    one_error(_generate(runs["bytes"], "--prompt", "sp", "--temperature", T),
              "--temperature must be 0 (greedy", f"got {float(T)}")


def test_generate_with_a_subnormal_temperature_is_greedy_and_clean(runs):
    tiny = _generate(runs["bytes"], "--prompt", "spike ", "--length", "20", "--temperature",
                     "1e-320")
    greedy = _generate(runs["bytes"], "--prompt", "spike ", "--length", "20", "--temperature",
                       "0", "--seed", "5")
    assert tiny.exit_code == 0 and greedy.exit_code == 0, tiny.output
    assert "\x00" not in tiny.stdout and "Warning" not in tiny.output, tiny.output
    assert tiny.stdout == greedy.stdout and tiny.stdout.startswith("spike ")


@pytest.mark.parametrize("k", ["-1", "257", "100000"])
def test_generate_refuses_top_k_outside_the_vocabulary(runs, k):
    one_error(_generate(runs["bytes"], "--prompt", "sp", "--top-k", k),
              "--top-k must be in [0, 256]", f"got {k}")


def test_generate_top_k_is_bounded_by_the_stored_vocabulary(runs):
    V = Vocab.from_json(load_checkpoint(runs["chars"]).data_recipe["vocab_json"]).size
    one_error(_generate(runs["chars"], "--prompt", "spike", "--top-k", str(V + 1)),
              f"--top-k must be in [0, {V}]")
    assert _generate(runs["chars"], "--prompt", "spike", "--top-k", str(V),
                     "--length", "5").exit_code == 0


def test_generate_feeds_raw_prompt_bytes_to_the_model_as_those_bytes(runs, monkeypatch):
    seen = []
    real = text_cli.generate_tokens

    def spy(stream, prompt, *a, **kw):
        seen.append(prompt.copy())
        return real(stream, prompt, *a, **kw)

    monkeypatch.setattr(text_cli, "generate_tokens", spy)
    prompt = os.fsdecode(b"\xff\xfe")  # what sys.argv holds for these two bytes
    r = _generate(runs["bytes"], "--prompt", prompt, "--length", "5")
    assert r.exit_code == 0, r.output
    assert seen[0].tolist() == [[0xFF, 0xFE]] and "prompt of 2 tokens" in r.stderr
    assert r.stdout.startswith("\ufffd\ufffd")  # shown as invalid UTF-8 is: U+FFFD each


def test_generate_refuses_a_raw_byte_a_chars_model_cannot_read(runs):
    one_error(_generate(runs["chars"], "--prompt", "sp" + os.fsdecode(b"\xff"), "--length",
                        "3"), "the raw byte 0xff (not UTF-8) at position 2")


def test_a_float32_trained_checkpoint_generates_in_float64_from_its_master_weights(runs):
    """It runs (it was refused), says so, and its tokens are those of a float64 model of the
    stored float64 master weights, decoded the same way."""
    r = _generate(runs["bytes32"], "--prompt", "spike ", "--length", "12", "--seed", "2")
    assert r.exit_code == 0, r.output
    assert "float32-trained model: generating in float64" in r.stderr
    ck = load_checkpoint(runs["bytes32"])
    assert ck.cfg.dtype == "float32" and all(v.dtype == np.float64 for v in ck.params.values())
    cfg64 = dataclasses.replace(ck.cfg, dtype="float64")
    from refimpl.sampling import generate
    vocab = byte_vocab()
    ids = vocab.encode("spike ")
    out, _ = generate(ModelStream(cfg64, ck.params, ck.buffers), ids[None], 12, seed=2)
    assert r.stdout == vocab.decode(np.concatenate([ids, out[0]])) + "\n"


# --------------------------------------------------------------------------------------------
# Streams of float32-trained and bidirectional models
# --------------------------------------------------------------------------------------------


def test_stream_support_names_what_cannot_stream():
    assert "bidirectional model cannot stream" in stream_support(
        ModelConfig(n_classes=2, d_model=4, d_state=4, bidirectional=True))
    assert stream_support(ModelConfig(n_classes=2, d_model=4, d_state=4)) is None
    assert stream_support(ModelConfig(n_classes=2, d_model=4, d_state=4, dtype="float32")) is None


def test_from_model_streams_a_float32_model_in_float64_from_its_masters():
    """Exactly the float64 model of the same weights; within float32 rounding of the float32
    forward (a bound of 1e-3 relative: a few float32 ulps times the depth of a 2-layer model,
    measured 1e-6)."""
    cfg32 = ModelConfig.for_lm(7, d_model=4, d_state=4, n_layers=2, dtype="float32")
    cfg64 = ModelConfig.for_lm(7, d_model=4, d_state=4, n_layers=2)
    p, buf = init_model(cfg64, 0)
    x = np.random.default_rng(1).integers(0, 7, size=(2, 9))  # (B, L)
    st = ModelStream.from_model(cfg32, p, buf)
    assert st.cfg.dtype == "float64" and st.trained_dtype == "float32"
    logits = st.run(x, chunks="step")  # (B, L, V)
    assert np.array_equal(logits, ModelStream(cfg64, p, buf).run(x, chunks="step"))
    ref32 = model_fwd(cfg32, p, buf, x)[0]  # (B, L, V) float32
    assert np.max(np.abs(logits - ref32)) <= 1e-3 * max(1.0, np.abs(ref32).max())
    with pytest.raises(TypeError, match="float64 master weights"):
        ModelStream.from_model(cfg32, {k: v.astype(np.float32) for k, v in p.items()}, buf)
    with pytest.raises(ValueError, match="float32 model cannot stream as such.*from_model"):
        ModelStream(cfg32, p, buf)


def test_from_checkpoint_streams_a_float32_checkpoint(runs):
    st = ModelStream.from_checkpoint(runs["bytes32"])
    assert st.trained_dtype == "float32" and st.cfg.dtype == "float64"
    logits, _ = st.forward(byte_vocab().encode("spike")[None])
    assert logits.shape == (1, 5, 256) and np.all(np.isfinite(logits))
