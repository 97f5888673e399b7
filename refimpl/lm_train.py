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
"""
import dataclasses
import math
import os
import time

import numpy as np

from . import model as M
from .atomic import atomic_write_json
from .memory import retain_freed_memory
from .optim import adamw_init, adamw_step, cosine_schedule, make_groups
from .progress import EpochEnd, Step
from .text import bigram_bpt, eval_windows, unigram_bpt, windows
from .train import Diverged, load_checkpoint, lock_output, save_checkpoint


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


def train_lm(cfg, tcfg, text, out_dir, progress=None, sdn_weights=None, overwrite=False,
             resume=False):
    """Train ``cfg`` on ``text`` for ``tcfg.epochs`` epochs (see the module docstring); holds
    ``out_dir``'s lock (:func:`refimpl.train.lock_output`). Returns the per-epoch metrics.

    Refuses a classifier config, a vocabulary size other than the text's, and (without
    ``overwrite`` or ``resume``) an existing checkpoint in ``out_dir``; a non-finite loss,
    gradient or parameter stops the run with :class:`refimpl.train.Diverged` before that epoch
    is written. ``resume=True`` continues ``out_dir/checkpoint.h5``, which must have been
    written with the same configs (``epochs`` included: the schedule depends on the total) and
    the same text (path, SHA-256, vocabulary, context, validation part): every update draws
    from ``(seed, epoch, step)``, so the resumed run is the uninterrupted run, bit for bit.
    """
    if cfg.head != "lm":
        raise ValueError("train_lm trains a language model: build the config with "
                         "ModelConfig.for_lm(vocab, ...)")
    if cfg.vocab != text.vocab.size:
        raise ValueError(f"the model's vocab ({cfg.vocab}) must be the text's vocabulary size "
                         f"({text.vocab.size}, {text.vocab.kind})")
    ckpt = os.path.join(out_dir, "checkpoint.h5")
    if os.path.exists(ckpt) and not (overwrite or resume):
        raise FileExistsError(f"{ckpt} exists; pass resume=True (--resume) to continue it or "
                              f"overwrite=True (--overwrite) to start again")
    with lock_output(out_dir):
        start = _resumed(cfg, tcfg, text, ckpt) if resume else None
        return _run(cfg, tcfg, text, out_dir, ckpt, progress, sdn_weights, start)


def _resumed(cfg, tcfg, text, ckpt):
    """The checkpoint's state ``(params, buffers, opt, epoch, metrics)`` after checking that it
    is this run's."""
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    c = load_checkpoint(ckpt)
    if c.cfg != cfg or c.tcfg != tcfg:
        raise ValueError(f"--resume: {ckpt} was written with other settings ({c.cfg}, "
                         f"{c.tcfg}); rerun with the same options (--epochs included)")
    recorded = {k: v for k, v in (c.data_recipe or {}).items() if k != "vocab_json"}
    if recorded != text.recipe or (c.data_recipe or {}).get("vocab_json") != \
            text.vocab.to_json():
        raise ValueError(f"--resume: {ckpt} was trained on another text or split "
                         f"({recorded.get('text')}, context {recorded.get('context')}, "
                         f"val_frac {recorded.get('val_frac')}); rerun with the same --text "
                         f"options")
    return c.params, c.buffers, c.opt, c.epoch, c.metrics


def _run(cfg, tcfg, text, out_dir, ckpt, progress, sdn_weights, start=None):
    retain_freed_memory()  # no page faults for the arrays every step reuses (memory.py)
    if start is None:
        params, buffers = M.init_model(cfg, tcfg.seed, sdn_weights=sdn_weights)
        opt, first, metrics = adamw_init(params), 0, []
    else:
        params, buffers, opt, first, metrics = start
    groups = make_groups(params, tcfg.lr, tcfg.weight_decay, M.optimizer_rules(tcfg.lr))
    per_epoch = steps_per_epoch(text, tcfg.batch_size)
    total = tcfg.epochs * per_epoch
    warmup = min(int(round(tcfg.warmup_frac * total)), total - 1)
    C = text.context
    scored = text.val[:len(eval_windows(text.val, C)) * C + 1]  # the targets evaluate_lm scores
    baselines = {"unigram_bits_per_token": unigram_bpt(text.train, scored, cfg.vocab),
                 "bigram_bits_per_token": bigram_bpt(text.train, scored, cfg.vocab)}
    recipe = {**text.recipe, "vocab_json": text.vocab.to_json()}
    config = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
              "data": recipe}
    for epoch in range(first, tcfg.epochs):
        loss_sum, t0 = 0.0, time.perf_counter()
        for step in range(per_epoch):
            x = windows(text.train, C, tcfg.batch_size, np.random.default_rng([tcfg.seed, epoch,
                                                                               step]))
            drop_rng = np.random.default_rng([tcfg.seed, epoch, step, 1])
            with np.errstate(all="ignore"):  # overflow is detected below, not warned about
                loss, _, grads, buffers, st = M.loss_and_grads(cfg, params, buffers, x, None,
                                                               training=True, rng=drop_rng)
                bad = ("the loss" if not np.isfinite(loss) else
                       next((f"the gradient of {k}" for k, g in grads.items()
                             if not np.all(np.isfinite(g))), None))
                if bad is not None:
                    raise _diverged(ckpt, epoch, step, bad)
                adamw_step(params, grads, opt, groups,
                           lr_scale=cosine_schedule(int(opt["step"]), total, warmup),
                           clip_norm=tcfg.clip_norm or None)
                M.project(params, cfg)
            loss_sum += float(loss)
            if progress is not None:
                spiking = [r for r in st["rates"] if r is not None]
                progress(Step(epoch, tcfg.epochs, step, per_epoch, int(opt["step"]) - 1, total,
                              float(loss), float(np.mean(spiking)) if spiking else None))
        seconds = time.perf_counter() - t0
        ev = evaluate_lm(cfg, params, buffers, text.val, C)
        metrics.append(_epoch_metrics(cfg, text, epoch, loss_sum / per_epoch, ev, baselines,
                                      per_epoch * tcfg.batch_size * C / seconds))
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint(ckpt, cfg, tcfg, params, buffers, opt, epoch + 1, metrics, recipe)
        atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
        atomic_write_json(os.path.join(out_dir, "config.json"), config)
        if progress is not None:
            progress(EpochEnd(epoch, tcfg.epochs, metrics[-1]["loss"], metrics[-1]))
    return metrics


def _epoch_metrics(cfg, text, epoch, train_loss, ev, baselines, tokens_per_second):
    e = M.energy(cfg, ev["rates"], text.context)  # per window of `context` tokens
    spiking = [r for r in ev["rates"] if r is not None]
    return {"epoch": epoch, "loss": train_loss, "unit": text.vocab.unit,
            "train_bits_per_token": train_loss / math.log(2),
            "val_loss": ev["loss"], "val_bits_per_token": ev["bits_per_token"],
            **baselines, "firing_rate": ev["rates"],
            "mean_firing_rate": float(np.mean(spiking)) if spiking else None,
            "energy_per_token_pj": e["energy_pj"] / text.context,
            "energy_ann_per_token_pj": e["energy_ann_pj"] / text.context,
            "tokens_per_second": tokens_per_second}


def _diverged(ckpt, epoch, step, what):
    done = f"{ckpt} holds the last completed epoch" if epoch > 0 else "nothing was written"
    return Diverged(f"training diverged at epoch {epoch + 1}, step {step + 1}: {what} is not "
                    f"finite; {done}; lower --lr or enable --clip-norm")
