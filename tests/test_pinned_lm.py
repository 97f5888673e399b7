"""The numbers a language-model run reports, each against an independent computation (issue 23):
the validation loss and bits per token of :func:`refimpl.lm_train.evaluate_lm` and of
``refimpl train --text``, the tokens the unigram and bigram baselines score, and the
learning-rate factor of every update (cosine schedule with warm-up).

Every expected value is a plain loop written from the docstrings (DESIGN.md section 11:
``loss = mean_{b, t} CE(logits[b, t], x[b, t+1])``, bits = loss / ln 2;
:func:`refimpl.text.eval_windows`, :func:`refimpl.text.unigram_bpt`,
:func:`refimpl.text.bigram_bpt`, :func:`refimpl.optim.cosine_schedule`), never a call of the
function under test. The model's forward is not under test here: the loops call
:func:`refimpl.model.model_fwd` on one window at a time and do the rest by hand.

Tolerances: 1e-12 relative where both sides sum the same float64 terms in another order (a
batch of windows against one window at a time; a few hundred terms of size ~5 nats, and the
test modules' transcendental functions may be one ulp off, tests/conftest.py); exact for
counts and integer schedules.
"""
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from refimpl import loop
from refimpl import model as M
from refimpl.cli.main import main as cli_main
from refimpl.lm_train import LanguageModelTask, evaluate_lm, train_lm
from refimpl.optim import cosine_schedule
from refimpl.text import bigram_bpt, load_text, unigram_bpt
from refimpl.train import TrainConfig, load_checkpoint

REL = 1e-12  # float64 sums of the same terms in another order (module docstring)

WORDS = ["spike", "state", "space", "model", "neuron", "threshold", "membrane"]


def _write_text(path, n_words, seed=0):
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)),
                    encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------------------------
# The independent computations
# --------------------------------------------------------------------------------------------


def loop_windows(ids, context):
    """The validation windows by a plain loop: window k is ids[k C : k C + C + 1] while a full
    window fits (eval_windows' docstring)."""
    out, k = [], 0
    while k * context + context + 1 <= len(ids):
        out.append([int(v) for v in ids[k * context:k * context + context + 1]])
        k += 1
    return out


def loop_eval(cfg, params, buffers, ids, context):
    """Loss (nats per target), bits per target, targets scored and per-layer rates by a loop
    over the windows, one forward per window, the cross-entropy written out."""
    total, count, rate_sums = 0.0, 0, None
    wins = loop_windows(ids, context)
    for w in wins:
        x = np.array([w], dtype=np.int64)  # (1, C + 1)
        logits, _, _, st = M.model_fwd(cfg, params, buffers, x, training=False)  # (1, C+1, V)
        for t in range(context):  # position t predicts token t + 1
            row = logits[0, t]
            top = max(float(v) for v in row)
            lse = top + math.log(sum(math.exp(float(v) - top) for v in row))
            total += lse - float(row[w[t + 1]])
            count += 1
        r = [math.nan if v is None else float(v) for v in st["rates"]]
        rate_sums = r if rate_sums is None else [a + b for a, b in zip(rate_sums, r)]
    loss = total / count
    rates = [None if math.isnan(v) else v / len(wins) for v in rate_sums]
    return {"loss": loss, "bits_per_token": loss / math.log(2), "tokens": count,
            "rates": rates, "windows": len(wins)}


def loop_unigram(train, targets, V):
    """Add-one smoothed unigram bits per target (unigram_bpt's docstring)."""
    counts = [0] * V
    for v in train:
        counts[int(v)] += 1
    bits = 0.0
    for v in targets:
        bits -= math.log2((counts[int(v)] + 1) / (len(train) + V))
    return bits / len(targets)


def loop_bigram(train, prev, targets, V):
    """Add-one smoothed bigram bits per target given its previous token (bigram_bpt's
    docstring): c(u, w) over the training pairs, c(u, .) the pairs starting with u."""
    pair, row = {}, [0] * V
    for a, b in zip(train[:-1], train[1:]):
        pair[(int(a), int(b))] = pair.get((int(a), int(b)), 0) + 1
        row[int(a)] += 1
    bits = 0.0
    for u, w in zip(prev, targets):
        bits -= math.log2((pair.get((int(u), int(w)), 0) + 1) / (row[int(u)] + V))
    return bits / len(targets)


def schedule_formula(step, T, W, f=0.0):
    """cosine_schedule's docstring, literally."""
    if step < W:
        return (step + 1) / W
    if step >= T:
        return f
    return f + (1 - f) * (1 + math.cos(math.pi * (step - W) / (T - W))) / 2


def _close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(a), abs(b))


# --------------------------------------------------------------------------------------------
# evaluate_lm
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A small untrained language model (two lif layers: firing rates to weigh) and a
    validation part of 13 windows (a prime: no batch size below it divides it)."""
    path = _write_text(tmp_path_factory.mktemp("lm") / "words.txt", 260)
    text = load_text(path, vocab="chars", context=12, val_frac=0.1)
    cfg = M.ModelConfig.for_lm(text.vocab.size, d_model=8, d_state=4, n_layers=2,
                               activation="lif")
    params, buffers = M.init_model(cfg, 0)
    val = text.val[:13 * 12 + 1 + 5]  # 13 windows and 5 dropped tokens
    return cfg, params, buffers, text, val


def test_the_fixture_has_a_window_count_no_batch_size_divides(lm):
    cfg, params, buffers, text, val = lm
    assert len(loop_windows(val, text.context)) == 13


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 12, 64])
def test_evaluate_lm_equals_a_loop_over_the_validation_windows(lm, batch_size):
    """Loss, bits per token, tokens scored and the per-layer rates, for batch sizes that leave
    a short last batch (2, 3, 5, 12), one window per batch (1) and one batch for all (64):
    a last batch weighted by the batch size instead of its length (the mutant of issue 23)
    changes the loss by the short batch's share."""
    cfg, params, buffers, text, val = lm
    want = loop_eval(cfg, params, buffers, val, text.context)
    ev = evaluate_lm(cfg, params, buffers, val, text.context, batch_size=batch_size)
    assert ev["tokens"] == want["tokens"] == 13 * text.context
    assert _close(ev["loss"], want["loss"]), (ev["loss"], want["loss"])
    assert _close(ev["bits_per_token"], want["bits_per_token"])
    assert all(v is not None for v in want["rates"]) and any(v > 0 for v in want["rates"])
    for got, exp in zip(ev["rates"], want["rates"]):
        assert abs(got - exp) <= 1e-12, (ev["rates"], want["rates"])  # rates lie in [0, 1]


# --------------------------------------------------------------------------------------------
# The baselines' scored tokens
# --------------------------------------------------------------------------------------------


def test_the_baselines_score_exactly_the_targets_evaluate_lm_scores(tmp_path):
    """LanguageModelTask's unigram and bigram baselines (what metrics.json reports) score the
    targets of the validation windows: val[1 : n C + 1], n C of them, every token after the
    first of each window, each once. The validation part here ends with 7 dropped tokens, and
    the last scored target is a character that is rare in training (its term is far from the
    mean), so scoring one target fewer or more changes both numbers."""
    path = _write_text(tmp_path / "words.txt", 300, seed=1)
    raw = open(path, encoding="utf-8").read()
    text = load_text(path, vocab="chars", context=10, val_frac=0.15)
    C = text.context
    cfg = M.ModelConfig.for_lm(text.vocab.size, d_model=8, d_state=4, n_layers=1)
    task = LanguageModelTask(cfg, TrainConfig(epochs=1, batch_size=4), text,
                             str(tmp_path / "run"))
    wins = loop_windows(text.val, C)
    targets = [w[t] for w in wins for t in range(1, C + 1)]  # every window's targets
    prev = [w[t - 1] for w in wins for t in range(1, C + 1)]
    assert len(targets) == len(wins) * C == (len(text.val) - 1) // C * C
    assert targets == [int(v) for v in text.val[1:len(targets) + 1]]
    assert len(text.val) - 1 - len(targets) > 0, "the fixture must drop a partial window"
    ev = evaluate_lm(cfg, *M.init_model(cfg, 0), text.val, C)
    assert ev["tokens"] == len(targets)
    # the last target's unigram term differs from the mean by > 1 bit, so a slice one token
    # short (or long) moves the mean by > 1 / len(targets) bits, far beyond rounding
    V = text.vocab.size
    uni = loop_unigram(text.train, targets, V)
    last = -math.log2((int(np.sum(text.train == targets[-1])) + 1) / (len(text.train) + V))
    assert abs(last - uni) > 0.5, (last, uni, raw[-20:])
    b = task.baselines
    assert _close(b["unigram_bits_per_token"], uni)
    assert _close(b["bigram_bits_per_token"], loop_bigram(text.train, prev, targets, V))
    # and the functions themselves, given the scored slice, are the loops
    scored = text.val[:len(targets) + 1]
    assert _close(unigram_bpt(text.train, scored, V), uni)
    assert _close(bigram_bpt(text.train, scored, V), loop_bigram(text.train, prev, targets, V))


# --------------------------------------------------------------------------------------------
# The learning-rate schedule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T, W, f", [(1, 0, 0.0), (7, 0, 0.0), (7, 3, 0.0), (10, 4, 0.1),
                                     (13, 12, 0.0), (37, 4, 0.25)])
def test_cosine_schedule_at_every_step_is_the_formula(T, W, f):
    """Every step of a small schedule, and two steps past its end (factor f)."""
    for step in range(T + 2):
        got, want = cosine_schedule(step, T, W, f), schedule_formula(step, T, W, f)
        assert abs(got - want) <= 1e-15, (step, got, want)  # one cos, a few + * /
    if W:
        assert cosine_schedule(0, T, W, f) == 1.0 / W and cosine_schedule(W - 1, T, W, f) == 1.0


@pytest.mark.parametrize("epochs, frac, W", [(1, 0.18, 3), (3, 0.5, 22), (1, 0.99, 14)])
def test_a_run_uses_the_warmup_and_factor_of_the_tutorial_at_every_update(
        tmp_path, monkeypatch, epochs, frac, W):
    """The learning-rate factor each update of a real run is given (recorded at
    ``adamw_step``) is ``cosine_schedule``'s formula with ``W = round(warmup_frac * T)``
    (examples/tutorial.md; at most ``T - 1``) over ``T = epochs * steps_per_epoch`` updates,
    at the whole run's update index. With 15 updates per epoch the cases have
    ``warmup_frac * T`` = 2.7 (round: 3, not int's 2), 22.5 (half to even: 22, not 23) and
    14.85 (15, capped at T - 1 = 14)."""
    path = _write_text(tmp_path / "words.txt", 80, seed=2)
    text = load_text(path, vocab="chars", context=8, val_frac=0.1)
    cfg = M.ModelConfig.for_lm(text.vocab.size, d_model=4, d_state=2, n_layers=1,
                               activation="gelu")
    tcfg = TrainConfig(epochs=epochs, batch_size=4, lr=1e-3, warmup_frac=frac)
    per_epoch = len(text.train) // (4 * text.context)  # lm_train's docstring
    T = epochs * per_epoch
    assert per_epoch == 15 and W == min(round(frac * T), T - 1), (per_epoch, frac * T)
    seen = []
    real = loop.adamw_step

    def spy(params, grads, state, groups, lr_scale=1.0, **kw):
        seen.append(lr_scale)
        return real(params, grads, state, groups, lr_scale=lr_scale, **kw)

    monkeypatch.setattr(loop, "adamw_step", spy)
    train_lm(cfg, tcfg, text, str(tmp_path / "run"))
    assert len(seen) == T
    for step, got in enumerate(seen):
        assert abs(got - schedule_formula(step, T, W)) <= 1e-15, (step, got, W)


# --------------------------------------------------------------------------------------------
# refimpl train --text: the printed bits per byte and metrics.json
# --------------------------------------------------------------------------------------------


def test_train_text_reports_the_validation_bits_per_byte_of_a_loop(tmp_path):
    """``refimpl train --text`` (bytes) prints and writes the validation bits per byte that a
    loop over the validation windows computes with the checkpoint's parameters (the epoch's
    evaluation is taken with the parameters the checkpoint stores). The validation part holds
    24 windows, fewer than the evaluation's batch of 64: a batch weighted by the batch size
    instead of its length would report 64 / 24 times the loss."""
    path = _write_text(tmp_path / "words.txt", 560, seed=3)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli_main, ["train", "--text", path, "--context", "16",
                                      "--val-frac", "0.1", "--epochs", "1", "--d-model", "8",
                                      "--d-state", "4", "--layers", "1", "--batch-size", "8",
                                      "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = load_text(path, vocab="bytes", context=16, val_frac=0.1)
    ck = load_checkpoint(str(out / "checkpoint.h5"))
    want = loop_eval(ck.cfg, ck.params, ck.buffers, text.val, 16)
    assert want["windows"] == 24
    m = json.loads((out / "metrics.json").read_text())[-1]
    assert m["unit"] == "byte"
    assert _close(m["val_loss"], want["loss"]) and _close(m["val_bits_per_token"],
                                                          want["bits_per_token"])
    shown = re.search(r"validation\s+([0-9.]+) bits/byte", r.output)
    assert shown, r.output
    assert float(shown.group(1)) == round(want["bits_per_token"], 3)
