"""``refimpl train --text`` (a language model on a text file) and ``refimpl generate``."""
import os
import sys

import click
import numpy as np

from refimpl.sampling import TOKEN_BYTES, check_memory, check_temperature, check_top_k
from refimpl.sampling import generate as generate_tokens
from refimpl.h5io import FileFormatError
from refimpl.lm_train import steps_per_epoch, train_lm
from refimpl.model import ModelConfig
from refimpl.stream import ModelStream
from refimpl.text import DEFAULT_CONTEXT, MAX_TEXT_BYTES, VOCABS, Vocab, load_text
from refimpl.train import load_checkpoint

from . import options
from .common import choice, fail, progress, progress_bar

USER_ERRORS = (OSError, ValueError, TypeError)

def train_text(path, vocab, context, val_frac, tcfg, out_dir, overwrite, resume, sdn_weights,
               model_options, max_bytes=MAX_TEXT_BYTES):
    """The ``--text`` branch of ``refimpl train``: validated before anything is written."""
    try:
        text = load_text(path, vocab=vocab, context=context, val_frac=val_frac,
                         max_bytes=max_bytes)
        cfg = ModelConfig.for_lm(text.vocab.size, **model_options)
    except USER_ERRORS as e:
        fail(e)
    per_epoch = steps_per_epoch(text, tcfg.batch_size)
    unit = text.vocab.unit
    done = _epochs_done(out_dir) if resume else 0  # the bar counts the steps still to run

    def epoch_summary(ev):
        m = ev.metrics
        return (f"epoch {m['epoch'] + 1} val {m['val_bits_per_token']:.3f} bits/{unit} "
                f"(bigram {m['bigram_bits_per_token']:.3f}) "
                f"{m['tokens_per_second']:.0f} tok/s")

    click.echo(f"training a {cfg.activation} language model on {path} ({text.vocab.kind}, "
               f"V = {text.vocab.size}): {len(text.train)} train / {len(text.val)} validation "
               f"tokens, context {context}, {tcfg.epochs} epochs of {per_epoch} steps"
               f"{f' (resuming after epoch {done})' if done else ''} -> {out_dir}", err=True)
    try:
        with progress_bar(max(tcfg.epochs - done, 0) * per_epoch, "train", epoch_summary,
                          tokens_per_step=tcfg.batch_size * context) as on_event:
            metrics = train_lm(cfg, tcfg, text, out_dir, progress=on_event,
                               sdn_weights=sdn_weights, overwrite=overwrite, resume=resume)
    except USER_ERRORS as e:
        fail(e)
    m = metrics[-1]
    click.echo(f"activation        {cfg.activation}")
    click.echo(f"epochs            {m['epoch'] + 1}")
    click.echo(f"train loss        {m['loss']:.4f} ({m['train_bits_per_token']:.3f} bits/{unit})")
    click.echo(f"validation        {m['val_bits_per_token']:.3f} bits/{unit} "
               f"(unigram {m['unigram_bits_per_token']:.3f}, bigram "
               f"{m['bigram_bits_per_token']:.3f})")
    rates = ", ".join("-" if r is None else f"{r:.3f}" for r in m["firing_rate"])
    click.echo(f"firing rate       {rates}")
    click.echo(f"energy / token    {m['energy_per_token_pj']:.1f} pJ (ANN baseline "
               f"{m['energy_ann_per_token_pj']:.1f} pJ)")
    click.echo(f"throughput        {m['tokens_per_second']:.0f} tokens/s (training)")

def _epochs_done(out_dir):
    """Epochs in ``out_dir``'s checkpoint (0 if there is none or it cannot be read: train_lm
    then says why it cannot resume)."""
    try:
        return load_checkpoint(os.path.join(out_dir, "checkpoint.h5")).epoch
    except (OSError, ValueError, KeyError, FileFormatError):
        return 0


def text_options(f):
    """The ``--text`` options of ``refimpl train``."""
    return options.compose(
        options.text_opt(),
        click.option("--vocab", "text_vocab", default=VOCABS[0], show_default=True,
                     type=choice(VOCABS), help="--text tokens: bytes (V = 256, any file) or "
                                               "chars (UTF-8; the vocabulary is stored)."),
        click.option("--context", default=DEFAULT_CONTEXT, show_default=True,
                     type=click.IntRange(min=2), help="--text: tokens per training window."),
        click.option("--val-frac", default=0.1, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="--text: the last fraction of the file, held out for validation."),
        click.option("--tie-embedding", is_flag=True,
                     help="--text: the decoder is the token embedding (shared weights)."),
        click.option("--max-text-bytes", default=MAX_TEXT_BYTES, show_default=True,
                     type=click.IntRange(min=1),
                     help="--text: the largest file read (its tokens take 8 bytes each in "
                          "memory); a larger file is refused before it is read."),
    )(f)

#: Bytes ``generate`` holds per generated token beyond the library's int64 ids, at its peak:
#: decoding (the ids of prompt and continuation joined, int64 8; their uint8 or uint32 codes
#: and those as bytes, up to 4 + 4; the str, up to 4 a character once one needs UCS-4), then
#: the echo (the str, the str with its newline, its UTF-8 bytes: up to 4 each). Measured
#: (tests/test_generate_validation.py, output kept in memory by CliRunner): 24-25; 32 bounds it.
TEXT_BYTES = 32


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--prompt", required=True,
              help="Text the model reads before it writes (bytes that are not UTF-8 reach a "
                   "bytes model as those bytes).")
@click.option("--length", default=200, show_default=True, type=int,
              help="Tokens to generate (>= 1; refused before anything runs when they would "
                   "not fit in memory).")
@click.option("--temperature", default=1.0, show_default=True, type=float,
              help="Softmax temperature: 0 = greedy (always the most likely token), else any "
                   "finite value > 0 (lower is more conservative).")
@click.option("--top-k", default=0, show_default=True, type=int,
              help="Sample among the k most likely tokens (0 = all; at most the vocabulary "
                   "size).")
@options.seed_opt(0)
def generate(checkpoint, prompt, length, temperature, top_k, seed):
    """Continue a prompt with a trained language model.

    CHECKPOINT is OUT/checkpoint.h5 of a 'refimpl train --text' run (it stores the
    vocabulary). The --prompt text runs through the model stream, then --length tokens are
    sampled one at a time from softmax(logits / temperature) over the --top-k most likely
    tokens; the prompt and its continuation go to stdout, the speed to stderr. A model trained
    with --dtype float32 generates in float64 from the float64 master weights its checkpoint
    stores (the stream is float64 only).

    Examples:

    \b
      refimpl generate runs/lm/checkpoint.h5 --prompt "The " --length 100 --temperature 0.8
      refimpl generate runs/lm/checkpoint.h5 --prompt "Once" --top-k 5 --seed 1
      refimpl generate runs/lm/checkpoint.h5 --prompt "The " --temperature 0
    """
    if length < 1:
        fail(f"--length must be >= 1, got {length}")
    try:
        temperature = check_temperature(temperature, "--temperature")
        check_memory(length, TOKEN_BYTES + TEXT_BYTES, name="--length")
        ck = load_checkpoint(checkpoint)
    except (FileFormatError, *USER_ERRORS) as e:
        fail(e)
    if ck.cfg.head != "lm" or not (ck.data_recipe or {}).get("vocab_json"):
        fail(f"{checkpoint} is a classifier checkpoint; generate needs a language model "
             f"(train one with refimpl train --text FILE)")
    try:
        vocab = Vocab.from_json(ck.data_recipe["vocab_json"])
        top_k = check_top_k(top_k, vocab.size, "--top-k")
        ids = vocab.encode(prompt)
        if ids.size == 0:
            fail("--prompt must not be empty")
        stream = ModelStream.from_model(ck.cfg, ck.params, ck.buffers)
    except USER_ERRORS as e:
        fail(e)
    if stream.trained_dtype != "float64":
        click.echo(f"a {stream.trained_dtype}-trained model: generating in float64 from its "
                   f"float64 master weights", err=True)
    try:
        with progress(length, "generating") as bar:
            out, info = generate_tokens(stream, ids[None], length, temperature=temperature,
                                        top_k=top_k, seed=seed, progress=bar.update)
    except USER_ERRORS as e:
        fail(e)
    except MemoryError:  # check_memory passed, yet an allocation failed: the room shrank
        fail(f"out of memory while generating --length {length} tokens; lower --length")
    click.echo(vocab.decode(np.concatenate([ids, out[0]])))  # one text: no split character
    click.echo(f"{length} tokens in {info['seconds']:.2f} s: {info['tokens_per_second']:.0f} "
               f"tokens/s (prompt of {ids.size} tokens: {info['prompt_seconds'] * 1e3:.1f} ms)",
               err=True)
    sys.stdout.flush()
