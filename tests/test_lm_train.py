"""refimpl.lm_train: a language model trained on a generated text (no downloads)."""
import json
import math

import numpy as np
import pytest

from refimpl import model as M
from refimpl.sampling import generate
from refimpl.lm_train import evaluate_lm, steps_per_epoch, train_lm
from refimpl.stream import ModelStream
from refimpl.text import Vocab, load_text
from refimpl.train import TrainConfig, load_checkpoint


def pattern_text(tmp_path, n=6000, seed=0):
    """A text whose next byte is nearly determined by the current one: words drawn from a
    small list, separated by spaces (a bigram model predicts most bytes)."""
    rng = np.random.default_rng(seed)
    words = ["spike", "state", "space", "model", "neuron"]
    text = " ".join(words[i] for i in rng.integers(0, len(words), n // 6))
    path = tmp_path / "words.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _setup(tmp_path, vocab="chars", epochs=3, **model):
    text = load_text(pattern_text(tmp_path), vocab=vocab, context=24, val_frac=0.2)
    cfg = M.ModelConfig.for_lm(text.vocab.size, **{**dict(d_model=16, d_state=8, n_layers=1,
                                                          activation="lif"), **model})
    return text, cfg, TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, seed=0)


def test_lm_learns_a_predictable_text_and_writes_its_files(tmp_path):
    """On a text of five words the model must beat the unigram baseline clearly (a unigram
    model cannot use the previous letters: ~3 bits per char here; inside a word the next
    letter is determined, so anything that reads context lands far below)."""
    text, cfg, tcfg = _setup(tmp_path)
    out = tmp_path / "run"
    metrics = train_lm(cfg, tcfg, text, str(out))
    assert len(metrics) == 3
    m = metrics[-1]
    assert m["unit"] == "char" and m["val_bits_per_token"] == m["val_loss"] / math.log(2)
    assert m["val_bits_per_token"] < m["unigram_bits_per_token"] - 1.0, m
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"]
    assert m["tokens_per_second"] > 0 and m["energy_per_token_pj"] > 0
    assert len(m["firing_rate"]) == cfg.n_layers and 0 <= m["firing_rate"][0] <= 1
    assert json.loads((out / "metrics.json").read_text()) == metrics
    ck = load_checkpoint(str(out / "checkpoint.h5"))
    assert ck.cfg == cfg and ck.epoch == 3
    vocab = Vocab.from_json(ck.data_recipe["vocab_json"])
    assert vocab == text.vocab
    # generation from the checkpoint decodes to the text's alphabet
    st = ModelStream(ck.cfg, ck.params, ck.buffers)
    ids, _ = generate(st, vocab.encode("spike ")[None], 20, temperature=0.5, seed=0)
    assert set(vocab.decode(ids[0])) <= set(vocab.chars)


def test_lm_training_is_deterministic(tmp_path):
    text, cfg, tcfg = _setup(tmp_path, vocab="bytes", epochs=1, dropout=0.1)
    a = train_lm(cfg, tcfg, text, str(tmp_path / "a"))
    b = train_lm(cfg, tcfg, text, str(tmp_path / "b"))
    for m in (a, b):
        for k in ("tokens_per_second",):
            m[0].pop(k)
    assert a == b
    pa = load_checkpoint(str(tmp_path / "a" / "checkpoint.h5")).params
    pb = load_checkpoint(str(tmp_path / "b" / "checkpoint.h5")).params
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)


def test_evaluate_lm_scores_every_validation_target_once(tmp_path):
    """evaluate_lm's loss equals the mean next-token loss of one forward over all its windows
    (the batching does not change the result beyond rounding: 1e-12 relative)."""
    text, cfg, _ = _setup(tmp_path)
    p, buf = M.init_model(cfg, 0)
    ev = evaluate_lm(cfg, p, buf, text.val, text.context, batch_size=3)
    n = (len(text.val) - 1) // text.context
    assert ev["tokens"] == n * text.context
    from refimpl.text import eval_windows
    w = eval_windows(text.val, text.context)
    loss, _ = M.lm_loss(M.model_fwd(cfg, p, buf, w)[0], w)
    assert abs(ev["loss"] - loss) <= 1e-12 * loss


def test_lm_training_refusals(tmp_path):
    text, cfg, tcfg = _setup(tmp_path)
    with pytest.raises(ValueError, match="ModelConfig.for_lm"):
        train_lm(M.ModelConfig(n_classes=3), tcfg, text, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="vocabulary size"):
        train_lm(M.ModelConfig.for_lm(cfg.vocab + 1), tcfg, text, str(tmp_path / "x"))
    train_lm(cfg, TrainConfig(epochs=1, batch_size=8), text, str(tmp_path / "y"))
    with pytest.raises(FileExistsError, match="overwrite"):
        train_lm(cfg, tcfg, text, str(tmp_path / "y"))
    assert steps_per_epoch(text, 8) == max(1, len(text.train) // (8 * text.context))


def test_lm_trains_in_the_float32_variant(tmp_path):
    """--dtype float32 with a language model: float64 master weights in the checkpoint, and it
    learns the predictable text as float64 does (below the unigram baseline by > 1 bit)."""
    text, cfg, tcfg = _setup(tmp_path, dtype="float32")
    m = train_lm(cfg, tcfg, text, str(tmp_path / "f32"))[-1]
    assert m["val_bits_per_token"] < m["unigram_bits_per_token"] - 1.0, m
    ck = load_checkpoint(str(tmp_path / "f32" / "checkpoint.h5"))
    assert ck.cfg.dtype == "float32" and all(v.dtype == np.float64 for v in ck.params.values())


class Interrupt(Exception):
    pass


def _interrupt_after_first_epoch(ev):
    from refimpl.progress import EpochEnd
    if isinstance(ev, EpochEnd):
        raise Interrupt  # like Ctrl-C right after the epoch's checkpoint was written


def test_lm_resume_is_bit_exact(tmp_path):
    """Interrupted after epoch 1 and resumed: the metrics (but the throughput) and every
    parameter equal the uninterrupted run's; other settings or another split are refused."""
    text, cfg, tcfg = _setup(tmp_path, epochs=3, dropout=0.1)
    full = train_lm(cfg, tcfg, text, str(tmp_path / "full"))
    with pytest.raises(Interrupt):
        train_lm(cfg, tcfg, text, str(tmp_path / "cut"), progress=_interrupt_after_first_epoch)
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.h5")).epoch == 1
    with pytest.raises(FileExistsError, match="resume"):
        train_lm(cfg, tcfg, text, str(tmp_path / "cut"))
    with pytest.raises(ValueError, match="a run of 3 epochs, not 4.*pass --epochs 3"):
        train_lm(cfg, TrainConfig(epochs=4, batch_size=8, lr=1e-2, seed=0), text,
                 str(tmp_path / "cut"), resume=True)
    with pytest.raises(ValueError, match="other settings"):
        train_lm(cfg, TrainConfig(epochs=3, batch_size=8, lr=2e-2, seed=0), text,
                 str(tmp_path / "cut"), resume=True)
    other = load_text(text.path, vocab="chars", context=24, val_frac=0.3)
    with pytest.raises(ValueError, match="another text or split"):
        train_lm(cfg, tcfg, other, str(tmp_path / "cut"), resume=True)
    resumed = train_lm(cfg, tcfg, text, str(tmp_path / "cut"), resume=True)
    strip = [{k: v for k, v in m.items() if k != "tokens_per_second"} for m in full]
    assert [{k: v for k, v in m.items() if k != "tokens_per_second"} for m in resumed] == strip
    a = load_checkpoint(str(tmp_path / "full" / "checkpoint.h5"))
    b = load_checkpoint(str(tmp_path / "cut" / "checkpoint.h5"))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_lm(cfg, tcfg, text, str(tmp_path / "none"), resume=True)
