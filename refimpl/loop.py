"""The training loop every trainer runs: classifiers, language models and the SDN.

:func:`train` checks, locks, starts or resumes and runs a :class:`Task`; :func:`run` is the loop
alone (for a caller that holds the lock itself, as ``refimpl train`` does)::

    task.check()                                   # options, output folder: nothing written
    with lock_output(task.out_dir, task.lock_name):  # this run owns the folder
        state = task.initial_state()               # fresh, or the checkpoint to resume
        for epoch in range(state.epoch, task.epochs):
            for step, batch in enumerate(task.batches(state, epoch)):
                out = task.forward_backward(state, epoch, step, batch)  # loss, grads
                # ValueError, non-finite loss or gradient -> Diverged(epoch, step)
                adamw_step(state.params, out.grads, state.opt, ...)    # cosine schedule
                task.project(state.params)
                # non-finite parameter -> Diverged(epoch, step)
                progress(Step(...))
            state.metrics.append(task.end_epoch(state, epoch, outcomes, seconds))
            task.save(state)                       # atomic files: refimpl.atomic
            progress(EpochEnd(...))

What the loop owns, the same for every task (the guards):

- **Options before writing.** A task validates its options when it is made; :meth:`Task.check`
  checks the output folder (an existing checkpoint without ``overwrite``, a checkpoint to resume
  that is missing or was written with other settings) and reads only. Both run before the lock
  is taken, so a refused run leaves the folder as it was.
- **The lock.** :func:`lock_output` holds ``out_dir/<lock_name>`` (``fcntl.flock``) for the
  run; a second run on the same output is refused with :class:`OutputLocked`. The kernel
  releases the lock when a process dies, so a lock file left by a killed run blocks nothing.
  The lock file is never opened through a link planted at its name (refused, the link left
  as it is), and every error path once it is taken (a full disk, an exception of the run)
  removes it.
- **Divergence.** A ``ValueError`` of the forward or backward pass (the library's kernels
  refuse non-finite intermediates), a non-finite loss or gradient, and a non-finite parameter
  after the update stop the run with a one-line :class:`Diverged` naming the epoch and the step
  (both from 1) and the task's advice. Nothing of that epoch is written: the output keeps the
  last completed epoch.
- **Progress.** The loop never prints: ``progress`` (a callable, or None) receives a
  :class:`~refimpl.progress.Step` after every update and an
  :class:`~refimpl.progress.EpochEnd` (the epoch's record) after every epoch's files are
  written.
- **Checkpoints.** :meth:`Task.save` runs after every epoch; the tasks write through
  :mod:`refimpl.atomic` (a temporary file renamed into place), so an interrupted write leaves
  the previous epoch's files whole.
- **Resume.** The state after an epoch (parameters, buffers, AdamW moments, a generator whose
  state carries over epochs) is what :meth:`Task.save` writes and :meth:`Task.initial_state`
  reads back, and every other random draw derives from the seed and the position (epoch,
  step), so a resumed run is the uninterrupted run, bit for bit.

What a task plugs in (subclass :class:`Task`): how an epoch's batches are drawn
(:meth:`~Task.batches`), the forward and backward of one batch (:meth:`~Task.forward_backward`,
returning an :class:`Outcome`), the projection after an update (:meth:`~Task.project`), the
epoch's record (:meth:`~Task.end_epoch`: evaluation and metrics), what the checkpoint holds
(:meth:`~Task.save`, :meth:`~Task.initial_state`, :meth:`~Task.check`) and its optimizer
settings (:class:`AdamW`). The tasks: :class:`refimpl.train.ClassifierTask`,
:class:`refimpl.lm_train.LanguageModelTask`, :class:`refimpl.sdn.training.SDNTask`.
"""
import contextlib
import dataclasses
import errno
import fcntl
import os
import stat
import time
from typing import NamedTuple, Optional

import numpy as np

from .atomic import WriteError, write_all, write_error
from .memory import retain_freed_memory
from .optim import adamw_step, cosine_schedule, make_groups
from .progress import EpochEnd, Step


class Diverged(ValueError):
    """Training produced a non-finite loss, gradient or parameter (one-line message)."""


class OutputLocked(OSError):
    """Another run holds the output's lock."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def lock_output(out_dir, name=LOCK_NAME):
    """Own ``out_dir`` for the duration of the block: an exclusive ``fcntl.flock`` on
    ``out_dir/name`` (non-blocking: raises :class:`OutputLocked` if another process holds it).

    Creates ``out_dir`` if needed; on exit removes the lock file, and ``out_dir`` again if this
    call created it and it is empty (a run that failed early leaves the file system as it was).

    The lock file is never opened through a link: a symbolic link at its name (``O_NOFOLLOW``),
    a hard link to another file, or anything but a regular file there raises
    :class:`refimpl.atomic.WriteError` before it is written, and the file it points to is not
    touched. A failed write of the PID (a full disk) raises :class:`~refimpl.atomic.WriteError`
    too, with the lock file removed.
    """
    created = not os.path.isdir(out_dir)
    path = os.path.join(out_dir, name)
    fd = None
    try:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise write_error(path, e, "nothing was written") from None
        for _ in range(10):  # a lock file unlinked by the previous owner: take the new one
            fd = _open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                raise OutputLocked(f"{out_dir} is in use by another run (locked: {path}); wait "
                                   f"for it to finish or choose another --out") from None
            if _same_file(path, fd):
                break
            os.close(fd)
            fd = None
        else:
            raise OutputLocked(f"{out_dir}: could not take the lock {path}; retry")
        try:
            os.ftruncate(fd, 0)
            write_all(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise write_error(path, e, "the run did not start") from None
        yield
    finally:
        if fd is not None:
            if _same_file(path, fd):  # what is there now is still this run's lock file
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty


def _open_lock(path):
    """Open (creating) the lock file ``path`` for writing without following a link, and check
    that it is a regular file with no other name; a one-line ``WriteError`` otherwise."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise WriteError(e.errno, f"refusing to open the lock file {path}: it is a symbolic "
                                      f"link, which would write through to another file; "
                                      f"remove it and rerun") from None
        raise write_error(path, e, "the run did not start") from None
    st = os.fstat(fd)
    what = ("not a regular file" if not stat.S_ISREG(st.st_mode) else
            f"a hard link ({st.st_nlink} names share it)" if st.st_nlink > 1 else None)
    if what is not None:
        os.close(fd)
        raise WriteError(errno.EEXIST, f"refusing to use the lock file {path}: it is {what}, "
                                       f"not a file of its own to write a PID in; remove it "
                                       f"and rerun")
    return fd


def _same_file(path, fd):
    """Whether the name ``path`` (not followed if a link) is the file open as ``fd``."""
    try:
        a, b = os.stat(path, follow_symlinks=False), os.fstat(fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    except FileNotFoundError:
        return False


@dataclasses.dataclass(frozen=True)
class AdamW:
    """A task's optimizer: AdamW (:func:`refimpl.optim.adamw_step`) with parameter groups from
    ``rules`` (:func:`refimpl.optim.make_groups`), the learning rate scaled per update by
    :func:`refimpl.optim.cosine_schedule` over the whole run, and optional gradient clipping
    (``clip_norm`` None: none)."""
    lr: float
    weight_decay: float
    rules: tuple = ()
    warmup_steps: int = 0
    min_lr_factor: float = 0.0
    clip_norm: Optional[float] = None


@dataclasses.dataclass
class State:
    """What a run carries from update to update; :meth:`Task.save` writes it and
    :meth:`Task.initial_state` reads it back."""
    params: dict  # name -> float64 array, updated in place
    buffers: dict  # name -> array (BatchNorm statistics, SDN weights); the task replaces it
    opt: dict  # AdamW state (refimpl.optim); opt["step"] counts the updates of the whole run
    epoch: int = 0  # epochs completed
    metrics: list = dataclasses.field(default_factory=list)  # per-epoch records (dicts)
    rng: Optional[np.random.Generator] = None  # a generator whose state carries over epochs
    seconds: float = 0.0  # wall time of the loop so far, earlier sessions of a resume included


class Outcome(NamedTuple):
    """What :meth:`Task.forward_backward` returns for one batch."""
    loss: float
    grads: dict  # name -> gradient, the keys of State.params
    rate: Optional[float] = None  # mean firing rate (for the progress event), None: no spikes
    tally: object = None  # what the task's end_epoch needs of this update


class Task:
    """A training task for :func:`train` and :func:`run`: subclass it, set the attributes and
    fill in the hooks (see the module docstring for where each is called).

    Attributes
    ----------
    epochs : int
        Epochs of the whole run (the schedule depends on it).
    steps_per_epoch : int
        Updates per epoch: the length of :meth:`batches`.
    adamw : AdamW
    out_dir : path or None
        Where the run writes (None: nowhere; no lock is taken).
    lock_name : str
        The lock file in ``out_dir``.
    checkpoint_path : path or None
        The file :meth:`save` writes (named in the divergence message).
    resume : bool
        Whether :meth:`initial_state` continues a checkpoint.
    advice : str
        The end of the divergence message: what to change.
    """
    epochs: int
    steps_per_epoch: int
    adamw: AdamW
    out_dir = None
    lock_name = LOCK_NAME
    checkpoint_path = None
    resume = False
    advice = "lower --lr"

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    def check(self):
        """Refuse a run that must not start, before anything is written (reads only)."""

    def initial_state(self):
        """The :class:`State` to start from: fresh, or read from the checkpoint (resume)."""
        raise NotImplementedError

    def batches(self, state, epoch):
        """The batches of ``epoch``, one per update (``steps_per_epoch`` of them)."""
        raise NotImplementedError

    def forward_backward(self, state, epoch, step, batch):
        """Loss and gradients of one batch as an :class:`Outcome`; may replace
        ``state.buffers``. A ``ValueError`` here is reported as divergence."""
        raise NotImplementedError

    def project(self, params):
        """Make the parameters feasible again after an update (in place)."""

    def end_epoch(self, state, epoch, outcomes, seconds):
        """The record of ``epoch`` (a dict with the mean training ``"loss"``), from its
        :class:`Outcome` s (gradients dropped) and the seconds its updates took."""
        raise NotImplementedError

    def save(self, state):
        """Write the checkpoint of ``state`` (``state.epoch`` epochs done) atomically."""


def remaining_steps(task, state):
    """Updates still to run from ``state``."""
    return max(task.epochs - state.epoch, 0) * task.steps_per_epoch


def train(task, progress=None):
    """Check ``task``, hold its output's lock, start or resume it and :func:`run` it.
    Returns the final :class:`State`."""
    task.check()
    lock = (contextlib.nullcontext() if task.out_dir is None else
            lock_output(task.out_dir, task.lock_name))
    with lock:
        return run(task, task.initial_state(), progress)


def run(task, state, progress=None):
    """Train ``state`` (in place) for the epochs of ``task`` still to run; the caller holds the
    output's lock. Returns ``state``."""
    retain_freed_memory()  # no page faults for the arrays every step reuses (memory.py)
    adamw = task.adamw
    groups = make_groups(state.params, adamw.lr, adamw.weight_decay, adamw.rules)
    total = task.total_steps
    t0, before = time.perf_counter(), state.seconds
    for epoch in range(state.epoch, task.epochs):
        outcomes, t_epoch = [], time.perf_counter()
        for step, batch in enumerate(task.batches(state, epoch)):
            with np.errstate(all="ignore"):  # overflow is detected below, not warned about
                try:
                    out = task.forward_backward(state, epoch, step, batch)
                except ValueError as e:  # inputs are validated: a non-finite intermediate
                    what = str(e).split(";")[0]  # "u contains non-finite values (...)"
                    raise _diverged(task, epoch, step, f"an intermediate of the forward pass "
                                                       f"({what})") from None
                if not np.isfinite(out.loss):
                    raise _diverged(task, epoch, step, f"the loss ({out.loss})")
                bad = _first_non_finite(out.grads)
                if bad is not None:
                    raise _diverged(task, epoch, step, f"the gradient of {bad}")
                scale = cosine_schedule(int(state.opt["step"]), total, adamw.warmup_steps,
                                        adamw.min_lr_factor)
                adamw_step(state.params, out.grads, state.opt, groups, lr_scale=scale,
                           clip_norm=adamw.clip_norm)
                task.project(state.params)
            bad = _first_non_finite(state.params)
            if bad is not None:
                raise _diverged(task, epoch, step, f"parameter {bad} after the update")
            outcomes.append(out._replace(grads=None))
            if progress is not None:
                progress(Step(epoch, task.epochs, step, task.steps_per_epoch,
                              int(state.opt["step"]) - 1, total, float(out.loss), out.rate))
        record = task.end_epoch(state, epoch, outcomes, time.perf_counter() - t_epoch)
        state.metrics.append(record)
        state.epoch = epoch + 1
        state.seconds = before + time.perf_counter() - t0
        task.save(state)
        if progress is not None:
            progress(EpochEnd(epoch, task.epochs, record["loss"], record))
    return state


def _first_non_finite(arrays):
    """The first name whose array holds a NaN or an infinity, else None."""
    return next((k for k, v in arrays.items() if not np.all(np.isfinite(v))), None)


def _diverged(task, epoch, step, what):
    done = (f"{task.checkpoint_path} holds the last completed epoch"
            if epoch > 0 and task.checkpoint_path is not None else "nothing was written")
    return Diverged(f"training diverged at epoch {epoch + 1}, step {step + 1}: {what} is not "
                    f"finite; {done}; {task.advice}")
