"""``refimpl sdn``: train and evaluate the Surrogate Dynamic Network (DESIGN.md section 6).

A thin click layer over :mod:`refimpl.sdn`: it parses, calls the library, draws the progress
bar (on stderr, :func:`~refimpl.cli.common.progress_bar`) and reports. Problems with files or
values become one-line errors through :func:`~refimpl.cli.common.fail` (exit status 1, no
traceback).
"""
import contextlib
import os
import time

import click

from refimpl.atomic import check_destination
from refimpl.sdn import INITS, LOSSES, SDNTrainConfig, evaluate, load_weights, train_sdn
from refimpl.sdn.training import load_train_state, partial_path

from . import options
from .common import choice, fail, progress_bar

_DEFAULTS = SDNTrainConfig()

#: Errors the library raises for bad values or files: shown as one line.
USER_ERRORS = (OSError, ValueError, TypeError)  # FileFormatError is a ValueError


@click.group()
def sdn():
    """Surrogate Dynamic Network: train it, score it against the LIF.

    The SDN (SpikingSSM, DESIGN.md section 6) is a small causal CNN that predicts the decayed
    membrane m_t = tau u_{t-1} of a hard-reset LIF from the input sequence, so spikes can be
    computed in parallel. 'train' fits one from scratch on the iterative LIF, 'eval' scores a
    weights file on fresh inputs; 'refimpl train --activation sdn --sdn-weights FILE' uses it.

    Examples:

    \b
      refimpl sdn train --out runs/sdn.h5
      refimpl sdn eval runs/sdn.h5
    """


@sdn.command()
@options.tau_opt(_DEFAULTS.tau)
@options.theta_opt(_DEFAULTS.theta)
@options.mean_opt(_DEFAULTS.mean)
@options.std_opt(_DEFAULTS.std)
@options.samples_opt(_DEFAULTS.samples)
@options.length_opt(_DEFAULTS.length)
@options.epochs_opt(_DEFAULTS.epochs)
@options.batch_size_opt(_DEFAULTS.batch_size)
@options.lr_opt(_DEFAULTS.lr)
@options.weight_decay_opt(_DEFAULTS.weight_decay)
@click.option("--loss", default=_DEFAULTS.loss, show_default=True,
              type=choice(LOSSES), help="Training loss on m.")
@click.option("--init", default=_DEFAULTS.init, show_default=True,
              type=choice(INITS),
              help="Initialisation of the training network (see refimpl.sdn.init_train_params).")
@click.option("--eval-samples", default=_DEFAULTS.eval_samples, show_default=True,
              type=click.IntRange(min=1), help="Fresh sequences for the final score.")
@options.seed_opt(_DEFAULTS.seed)
@click.option("--out", "out", default="sdn.h5", show_default=True,
              type=click.Path(dir_okay=False), help="Weights file to write (HDF5).")
@options.overwrite_opt
@options.resume_opt
def train(tau, theta, mean, std, samples, length, epochs, batch_size, lr, weight_decay, loss,
          init, eval_samples, seed, out, overwrite, resume):
    """Train an SDN on the iterative LIF and write its weights.

    The SDN learns from scratch to predict the membrane of the iterative hard-reset LIF (--tau,
    --theta) on Gaussian inputs (--mean, --std). The file OUT holds the fused weights (w0 ..
    w5), the training network with its BatchNorm statistics, the training configuration and the
    final scores. While training, the whole state is saved atomically after every epoch to
    OUT.partial.h5 (a file `sdn eval` refuses); OUT itself is written only at the end, then
    OUT.partial.h5 is removed. After an interruption, `--resume` with the same options continues
    bit-identically.

    Examples:

    \b
      refimpl sdn train --out runs/sdn.h5
      refimpl sdn train --out runs/sdn.h5 --resume
      refimpl sdn train --tau 0.25 --epochs 20 --seed 1 --out runs/sdn_tau025.h5
    """
    partial = partial_path(out)
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other: --resume continues OUT.partial.h5, "
             "--overwrite starts again")
    try:
        cfg = SDNTrainConfig(tau=tau, theta=theta, mean=mean, std=std, samples=samples,
                             length=length, epochs=epochs, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, loss=loss, init=init,
                             eval_samples=eval_samples, seed=seed)
        # Everything is checked before the expensive work and before anything is written.
        if resume:
            check_destination(out, overwrite=True)  # not a folder
            if not os.path.exists(partial):
                done = " (" + out + " exists: that run finished)" if os.path.exists(out) else ""
                fail(f"--resume: no interrupted run to continue, {partial} does not exist{done}")
            done = load_train_state(partial, cfg)[5]  # settings must match
        else:
            check_destination(out, overwrite)
            check_destination(partial, overwrite=True)
            if os.path.exists(partial) and not overwrite:
                fail(f"{partial} holds an interrupted run; pass --resume to continue it or "
                     f"--overwrite to start again")
            done = 0
    except FileExistsError:
        fail(f"{out} exists; pass --overwrite to replace it")
    except USER_ERRORS as e:
        fail(e)
    t0 = time.perf_counter()
    try:
        if not resume:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)  # a stale state of an interrupted run (--overwrite)
        with progress_bar(cfg.total_steps - done * cfg.steps_per_epoch, "training SDN",
                          _epoch_summary) as on_event:
            result = train_sdn(cfg, progress=on_event, state_path=partial, resume=resume)
        # The run that created OUT.partial.h5 was allowed to write OUT.
        result.save(out, overwrite=overwrite or resume)
        os.remove(partial)  # only after OUT is complete: a kill before leaves a resumable run
    except USER_ERRORS as e:
        fail(e)
    wall = time.perf_counter() - t0
    m = result.metrics
    click.echo(f"wrote {out}")
    click.echo(f"training time: {result.seconds:.1f} s (total {wall:.1f} s)")
    _report(m)


def _epoch_summary(event):
    return f"epoch {event.epoch + 1}/{event.epochs} mean loss {event.loss:.2e}"


def _report(m):
    click.echo(f"spike agreement: {100 * m['agreement']:.2f} % "
               f"({m['mismatches']} of {m['steps']} steps differ)")
    click.echo(f"membrane MSE: {m['membrane_mse']:.3e}")
    click.echo(f"firing rate: LIF {100 * m['rate_lif']:.2f} %, SDN {100 * m['rate_sdn']:.2f} %")


@sdn.command("eval")
@click.argument("weights", type=click.Path(dir_okay=False))
@options.tau_opt(None, described="the file's training tau, else 0.125")
@options.theta_opt(None, described="the file's training theta, else 1")
@options.mean_opt(0.0)
@options.std_opt(1.0)
@options.length_opt(1024)
@options.samples_opt(200)
@options.seed_opt(0)
def eval_(weights, tau, theta, mean, std, length, samples, seed):
    """Score SDN weights against the iterative LIF on fresh inputs.

    WEIGHTS is a file of 'refimpl sdn train' (HDF5) or the published SpikingSSM .npz. Prints
    the spike agreement, the membrane MSE and both firing rates on --samples Gaussian
    sequences of --length steps, drawn from --seed (a stream training never uses).

    Examples:

    \b
      refimpl sdn eval runs/sdn.h5
      refimpl sdn eval sdn_spikingssm_tau0125.npz --length 4096 --samples 100
    """
    try:
        w, meta = load_weights(weights)
        trained = meta.get("config", {})
        tau = trained.get("tau", 0.125) if tau is None else tau
        theta = trained.get("theta", 1.0) if theta is None else theta
        m = evaluate(w, tau=tau, theta=theta, mean=mean, std=std, length=length,
                     samples=samples, seed=seed)
    except USER_ERRORS as e:
        fail(e)
    click.echo(f"weights: {weights} ({meta['format']}); LIF tau = {tau:g}, theta = {theta:g}; "
               f"inputs N({mean:g}, {std:g}^2), {samples} x {length}")
    _report(m)
