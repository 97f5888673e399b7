"""Training a language model on a text (issue 14, DESIGN.md section 11).

:func:`train_lm` trains a ``head="lm"`` model (:meth:`refimpl.model.ModelConfig.for_lm`) on a
:class:`refimpl.text.TextData`. An epoch is ``max(1, T_train // (batch_size * context))``
updates (about one pass over the training tokens); update ``s`` of epoch ``e`` trains on
``batch_size`` random windows of ``context + 1`` tokens drawn with
``default_rng([seed, e, s])`` (:func:`refimpl.text.windows`; dropout masks from
``default_rng([seed, e, s, 1])``), so a run is deterministic for a seed. The optimiser is the
classifier's (AdamW with the model's parameter groups, cosine schedule with warm-up, optional
clipping: :class:`refimpl.train.TrainConfig`).

After every epoch the model is scored on the validation part (:func:`evaluate_lm`: every
validation target once, :func:`refimpl.text.eval_windows`), and ``out_dir`` gets, atomically,
the checkpoint (its data recipe is the text's recipe plus the vocabulary as JSON, so
generation can decode), ``metrics.json`` and ``config.json``. Per epoch the metrics hold the
training loss, the validation loss and bits per token (per byte for ``bytes``), the per-layer
firing rates and the energy estimate per token on the validation windows, the unigram and
bigram baselines on the same targets (add-one smoothed; computed once), and the training
throughput in tokens per second.

The loop and its guards (the folder's lock, divergence with epoch and step, finite parameters
after every update, progress events, atomic checkpoints, resume) are :mod:`refimpl.loop`'s,
the same as the classifier's; :class:`LanguageModelTask` plugs the text in.
"""
import math

import numpy as np

from . import loop
from . import model as M
from .text import bigram_bpt, eval_windows, unigram_bpt, windows
from .train import ModelTask, mean_rate


def steps_per_epoch(text, batch_size):
    """Updates per epoch: about one pass over the training tokens, at least one."""
    return max(1, len(text.train) // (batch_size * text.context))


def evaluate_lm(cfg, params, buffers, ids, context, batch_size=64):
    """Eval-mode next-token loss over every window of :func:`refimpl.text.eval_windows`:
    ``{"loss" (nats per token), "bits_per_token", "rates" (per layer, weighted by windows),
    "tokens" (targets scored)}``."""
    w = eval_windows(ids, context)  # (n, context + 1)
    loss_sum, rate_sum, n = 0.0, None, len(w)
    for i in range(0, n, batch_size):
        x = w[i:i + batch_size]
        logits, _, _, st = M.model_fwd(cfg, params, buffers, x, training=False)
        loss, _ = M.lm_loss(logits, x)
        loss_sum += float(loss) * len(x)
        r = np.array([np.nan if v is None else v for v in st["rates"]]) * len(x)
        rate_sum = r if rate_sum is None else rate_sum + r
    loss = loss_sum / n
    rates = [None if np.isnan(v) else float(v / n) for v in rate_sum]
    return {"loss": loss, "bits_per_token": loss / math.log(2), "rates": rates,
            "tokens": n * context}


class LanguageModelTask(ModelTask):
    """A language model on a text for :mod:`refimpl.loop` (see the module docstring): random
    windows per update, :func:`evaluate_lm` and the unigram and bigram baselines per epoch.
    Refuses a classifier config and a vocabulary size other than the text's when made."""

    def __init__(self, cfg, tcfg, text, out_dir, resume=False, overwrite=False,
                 sdn_weights=None):
        if cfg.head != "lm":
            raise ValueError("train_lm trains a language model: build the config with "
                             "ModelConfig.for_lm(vocab, ...)")
        if cfg.vocab != text.vocab.size:
            raise ValueError(f"the model's vocab ({cfg.vocab}) must be the text's vocabulary "
                             f"size ({text.vocab.size}, {text.vocab.kind})")
        recipe = {**text.recipe, "vocab_json": text.vocab.to_json()}
        super().__init__(cfg, tcfg, out_dir, steps_per_epoch(text, tcfg.batch_size), recipe,
                         recipe, resume, overwrite, sdn_weights)
        self.text = text
        C = text.context
        scored = text.val[:len(eval_windows(text.val, C)) * C + 1]  # what evaluate_lm scores
        self.baselines = {"unigram_bits_per_token": unigram_bpt(text.train, scored, cfg.vocab),
                          "bigram_bits_per_token": bigram_bpt(text.train, scored, cfg.vocab)}

    def check_recipe(self, stored):
        recorded = {k: v for k, v in (stored or {}).items() if k != "vocab_json"}
        if recorded != self.text.recipe or (stored or {}).get("vocab_json") != \
                self.text.vocab.to_json():
            raise ValueError(f"--resume: {self.checkpoint_path} was trained on another text or "
                             f"split ({recorded.get('text')}, context {recorded.get('context')}, "
                             f"val_frac {recorded.get('val_frac')}); rerun with the same --text "
                             f"options")

    def batches(self, state, epoch):
        text, tcfg = self.text, self.tcfg
        for step in range(self.steps_per_epoch):
            yield windows(text.train, text.context, tcfg.batch_size,
                          np.random.default_rng([tcfg.seed, epoch, step]))  # (b, context + 1)

    def forward_backward(self, state, epoch, step, x):
        loss, _, grads, state.buffers, st = M.loss_and_grads(
            self.cfg, state.params, state.buffers, x, None, training=True,
            rng=np.random.default_rng([self.tcfg.seed, epoch, step, 1]))  # dropout masks
        return loop.Outcome(loss, grads, mean_rate(st["rates"]))

    def end_epoch(self, state, epoch, outcomes, seconds):
        loss_sum = 0.0
        for o in outcomes:
            loss_sum += float(o.loss)
        text, per_epoch = self.text, self.steps_per_epoch
        ev = evaluate_lm(self.cfg, state.params, state.buffers, text.val, text.context)
        return _epoch_metrics(self.cfg, text, epoch, loss_sum / per_epoch, ev, self.baselines,
                              per_epoch * self.tcfg.batch_size * text.context / seconds)


def train_lm(cfg, tcfg, text, out_dir, progress=None, sdn_weights=None, overwrite=False,
             resume=False):
    """Train ``cfg`` on ``text`` for ``tcfg.epochs`` epochs (see the module docstring): a
    :class:`LanguageModelTask` run by :func:`refimpl.loop.train`, which holds ``out_dir``'s
    lock. Returns the per-epoch metrics.

    Refuses a classifier config, a vocabulary size other than the text's, and (without
    ``overwrite`` or ``resume``) an existing checkpoint in ``out_dir``, before anything is
    written; a forward pass that fails on a non-finite value, or a non-finite loss, gradient or
    parameter, stops the run with :class:`refimpl.loop.Diverged` before that epoch is written.
    ``resume=True`` continues ``out_dir/checkpoint.h5``, which must have been written with the
    same configs (``epochs`` included: the schedule depends on the total) and the same text
    (path, SHA-256, vocabulary, context, validation part): every update draws from
    ``(seed, epoch, step)``, so the resumed run is the uninterrupted run, bit for bit.
    """
    task = LanguageModelTask(cfg, tcfg, text, out_dir, resume, overwrite, sdn_weights)
    return loop.train(task, progress).metrics


def _epoch_metrics(cfg, text, epoch, train_loss, ev, baselines, tokens_per_second):
    e = M.energy(cfg, ev["rates"], text.context)  # per window of `context` tokens
    return {"epoch": epoch, "loss": train_loss, "unit": text.vocab.unit,
            "train_bits_per_token": train_loss / math.log(2),
            "val_loss": ev["loss"], "val_bits_per_token": ev["bits_per_token"],
            **baselines, "firing_rate": ev["rates"],
            "mean_firing_rate": mean_rate(ev["rates"]),
            "energy_per_token_pj": e["energy_pj"] / text.context,
            "energy_ann_per_token_pj": e["energy_ann_pj"] / text.context,
            "tokens_per_second": tokens_per_second}
