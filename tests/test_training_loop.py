"""refimpl.loop: one training loop for classifiers, language models and the SDN (issue 22).

Every guard of the loop has one test, run on all three trainers through their public entry
points (:func:`refimpl.train.train`, :func:`refimpl.lm_train.train_lm`,
:func:`refimpl.sdn.train_sdn` with a state file). A :class:`Kind` knows how to start its
trainer in a folder, how to read back the checkpoint it wrote there, and where its forward pass
and its checkpoint writer can be broken. The models are tiny (3 epochs of 2 updates each), so
the file runs in seconds once Numba has compiled.
"""
import dataclasses
import os

import numpy as np
import pytest

from refimpl import loop
from refimpl import model as M
from refimpl import sdn
from refimpl import train as T
from refimpl.lm_train import LanguageModelTask, train_lm
from refimpl.progress import EpochEnd, Step
from refimpl.sdn import training as S
from refimpl.tasks import make_task
from refimpl.text import load_text

EPOCHS, STEPS = 3, 2  # every kind: 3 epochs of 2 updates


class Saved:
    """What a checkpoint holds, the same for every kind."""

    def __init__(self, epoch, params, buffers, opt, losses):
        self.epoch, self.params, self.buffers, self.opt = epoch, params, buffers, opt
        self.losses = losses  # per-epoch mean training loss

    def assert_same(self, other):
        """Bit for bit: parameters, buffers, AdamW state and the loss history."""
        assert self.epoch == other.epoch
        for name in ("params", "buffers", "opt"):
            _assert_bits(getattr(self, name), getattr(other, name), name)
        _assert_bits({"loss": np.asarray(self.losses)}, {"loss": np.asarray(other.losses)}, "")


def _assert_bits(a, b, where):
    assert set(a) == set(b), where
    for k in a:
        if isinstance(a[k], dict):
            _assert_bits(a[k], b[k], f"{where}/{k}")
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert x.dtype == y.dtype and x.shape == y.shape, f"{where}/{k}"
            assert x.tobytes() == y.tobytes(), f"{where}/{k}"


class Kind:
    """One trainer. ``forward`` is the ``(module, name)`` of the function whose calls are the
    training forward passes (one per update) and ``nan_result`` makes its result's loss NaN;
    ``writer`` is the module whose ``write_tree`` writes the checkpoint's groups;
    ``bad_option`` starts a run with an option the trainer refuses, saying ``bad_message``."""
    name: str
    task_class: type  # its refimpl.loop.Task
    forward: tuple
    writer: object
    bad_message: str

    def train(self, out, progress=None, resume=False, overwrite=False, epochs=EPOCHS):
        """Train in the folder ``out`` through the trainer's public function."""
        raise NotImplementedError

    def checkpoint(self, out):
        """The path of the checkpoint a run in ``out`` writes."""
        raise NotImplementedError

    def saved(self, out):
        """The checkpoint in ``out`` as a :class:`Saved`."""
        raise NotImplementedError

    def bad_option(self, out):
        raise NotImplementedError

    @staticmethod
    def nan_result(result):
        return (np.nan,) + tuple(result[1:])

    def __repr__(self):
        return self.name


class Classifier(Kind):
    name, task_class, forward, writer = "classifier", T.ClassifierTask, (M, "loss_and_grads"), T
    bad_message = r"labels must lie in \[0, 2\)"

    def __init__(self):
        self.data = make_task("parity", n=40, L=8)  # 34 training samples: 2 batches of 17
        self.cfg = M.ModelConfig.for_data(self.data, d_model=4, d_state=2, n_layers=1,
                                          activation="lif", dropout=0.1)

    def train(self, out, progress=None, resume=False, overwrite=False, epochs=EPOCHS,
              data=None):
        tcfg = T.TrainConfig(epochs=epochs, batch_size=17, seed=1)
        return T.train(self.cfg, tcfg, data or self.data, str(out), resume=resume,
                       progress=progress, overwrite=overwrite)

    def checkpoint(self, out):
        return os.path.join(out, "checkpoint.h5")

    def saved(self, out):
        c = T.load_checkpoint(self.checkpoint(out))
        return Saved(c.epoch, c.params, c.buffers, c.opt, [m["loss"] for m in c.metrics])

    def bad_option(self, out):
        labels = self.data["y_train"] + 2  # the config has 2 classes
        self.train(out, data={**self.data, "y_train": labels})


class LanguageModel(Classifier):
    name, task_class = "language model", LanguageModelTask
    bad_message = "must be the text's vocabulary size"

    def __init__(self, tmp):
        path = tmp / "words.txt"
        path.write_text(("spike state space model neuron " * 4)[:100], encoding="utf-8")
        self.text = load_text(str(path), vocab="chars", context=8, val_frac=0.2)  # 80 train
        self.cfg = M.ModelConfig.for_lm(self.text.vocab.size, d_model=4, d_state=2,
                                        n_layers=1, activation="lif", dropout=0.1)

    def train(self, out, progress=None, resume=False, overwrite=False, epochs=EPOCHS,
              cfg=None):
        tcfg = T.TrainConfig(epochs=epochs, batch_size=4, seed=1)  # 80 // (4 * 8) = 2 steps
        return train_lm(cfg or self.cfg, tcfg, self.text, str(out), progress=progress,
                        overwrite=overwrite, resume=resume)

    def bad_option(self, out):
        v = self.cfg.vocab + 1
        self.train(out, cfg=dataclasses.replace(self.cfg, vocab=v, n_classes=v))


class SDN(Kind):
    name, task_class, forward, writer = "SDN", S.SDNTask, (S, "train_fwd"), S
    bad_message = r"tau must be in \[0.0, 1.0\), got 1.5"
    options = dict(samples=16, length=16, batch_size=8, eval_samples=2, seed=3)

    def train(self, out, progress=None, resume=False, overwrite=False, epochs=EPOCHS, **bad):
        return sdn.train_sdn(progress=progress, state_path=self.checkpoint(out), resume=resume,
                             overwrite=overwrite, **{**self.options, "epochs": epochs, **bad})

    def checkpoint(self, out):
        return os.path.join(out, "sdn.h5.partial.h5")

    def saved(self, out):
        cfg = S.SDNTrainConfig(**self.options, epochs=EPOCHS)
        params, buffers, opt, _, loss, done, _ = S.load_train_state(self.checkpoint(out), cfg)
        return Saved(done, params, buffers, opt, [float(v) for v in loss])

    def bad_option(self, out):
        self.train(out, tau=1.5)

    @staticmethod
    def nan_result(result):
        m, cache, buffers = result
        return np.full_like(m, np.nan), cache, buffers  # the loss of a NaN prediction is NaN


@pytest.fixture(params=["classifier", "language model", "SDN"])
def kind(request, tmp_path_factory):
    if request.param == "classifier":
        return Classifier()
    if request.param == "language model":
        return LanguageModel(tmp_path_factory.mktemp("text"))
    return SDN()


def _files(folder):
    """Every file below ``folder`` (hidden ones included) with its bytes; None if absent."""
    if not os.path.exists(folder):
        return None
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def _hidden(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


# --------------------------------------------------------------------------------------------
# The three trainers run on the core
# --------------------------------------------------------------------------------------------


def test_every_trainer_runs_on_the_core(kind, tmp_path, monkeypatch):
    tasks = []
    real = loop.run

    def spy(task, state, progress=None):
        tasks.append(task)
        return real(task, state, progress)

    monkeypatch.setattr(loop, "run", spy)
    kind.train(tmp_path / "o")
    assert [type(t) for t in tasks] == [kind.task_class]
    assert tasks[0].epochs == EPOCHS and tasks[0].steps_per_epoch == STEPS


# --------------------------------------------------------------------------------------------
# One test per guard, each on every kind
# --------------------------------------------------------------------------------------------


def test_progress_reports_every_update_and_every_epoch_after_its_checkpoint(kind, tmp_path):
    """A plain list as the consumer (no terminal): a Step per update with its position in the
    run and its loss, then an EpochEnd whose record is the epoch's, reported once the epoch's
    checkpoint is on disk."""
    out = tmp_path / "o"
    events, on_disk = [], []

    def consumer(ev):
        events.append(ev)
        if isinstance(ev, EpochEnd):
            on_disk.append(kind.saved(out).epoch)

    kind.train(out, progress=consumer)
    assert [type(e) for e in events] == ([Step] * STEPS + [EpochEnd]) * EPOCHS
    steps = [e for e in events if isinstance(e, Step)]
    assert [(e.epoch, e.step, e.global_step) for e in steps] == [
        (i // STEPS, i % STEPS, i) for i in range(EPOCHS * STEPS)]
    assert all(e.epochs == EPOCHS and e.steps_per_epoch == STEPS
               and e.total_steps == EPOCHS * STEPS for e in steps)
    assert all(isinstance(e.loss, float) and np.isfinite(e.loss) for e in steps)
    ends = [e for e in events if isinstance(e, EpochEnd)]
    assert [e.epoch for e in ends] == list(range(EPOCHS)) and on_disk == [1, 2, 3]
    assert [e.loss for e in ends] == [e.metrics["loss"] for e in ends] == kind.saved(out).losses


@pytest.mark.parametrize("fault", ["ValueError", "NaN loss", "NaN gradient"])
def test_divergence_names_epoch_and_step_and_keeps_the_last_epoch(kind, fault, tmp_path,
                                                                   monkeypatch):
    """A forward pass that fails on a non-finite value, returns a NaN loss, or a backward pass
    that returns a NaN gradient, at update 2 of epoch 2 stops the run with one line naming the
    epoch and the step; the checkpoint stays epoch 1's."""
    calls, nth, planted = [], STEPS + 2, []
    if fault == "NaN gradient":  # any task: its forward_backward's gradients
        real_fb = kind.task_class.forward_backward

        def poisoned_fb(self, *a):
            out = real_fb(self, *a)
            calls.append(1)
            if len(calls) < nth:
                return out
            first = sorted(out.grads)[0]
            planted.append(first)
            return out._replace(grads={**out.grads, first: out.grads[first] * np.nan})

        monkeypatch.setattr(kind.task_class, "forward_backward", poisoned_fb)
    else:  # the trainer's own forward pass
        module, name = kind.forward
        real = getattr(module, name)

        def poisoned(*a, **k):
            calls.append(1)
            if len(calls) < nth:
                return real(*a, **k)
            if fault == "ValueError":
                raise ValueError("u contains non-finite values (1 of 8); remove NaN/inf")
            return kind.nan_result(real(*a, **k))

        monkeypatch.setattr(module, name, poisoned)
    out = tmp_path / "o"
    with pytest.raises(loop.Diverged) as e:
        kind.train(out)
    what = {"ValueError": "an intermediate of the forward pass (u contains non-finite values "
                          "(1 of 8))",
            "NaN loss": "the loss (nan)",
            "NaN gradient": f"the gradient of {planted[0] if planted else '?'}"}[fault]
    assert str(e.value).startswith(f"training diverged at epoch 2, step 2: {what} is not "
                                   f"finite; {kind.checkpoint(out)} holds the last completed "
                                   f"epoch; lower --lr"), str(e.value)
    assert "\n" not in str(e.value)
    assert kind.saved(out).epoch == 1


def test_divergence_in_the_first_epoch_says_nothing_was_written(kind, tmp_path, monkeypatch):
    module, name = kind.forward
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: kind.nan_result(real(*a, **k)))
    out = tmp_path / "o"
    with pytest.raises(loop.Diverged, match=r"epoch 1, step 1: the loss \(nan\) is not finite; "
                                            r"nothing was written"):
        kind.train(out)
    assert not out.exists()


def test_a_non_finite_parameter_after_an_update_is_caught(kind, tmp_path, monkeypatch):
    """An update that leaves an infinity in a parameter (planted after the real AdamW step of
    update 1 of epoch 2) stops the run there, naming the parameter."""
    real, calls, planted = loop.adamw_step, [], []

    def overflowing(params, grads, *a, **k):
        result = real(params, grads, *a, **k)
        calls.append(1)
        if len(calls) == STEPS + 1:
            name = sorted(params)[0]
            params[name].flat[0] = np.inf
            planted.append(name)
        return result

    monkeypatch.setattr(loop, "adamw_step", overflowing)
    out = tmp_path / "o"
    with pytest.raises(loop.Diverged, match=r"epoch 2, step 1: parameter (\S+) after the update "
                                            r"is not finite") as e:
        kind.train(out)
    assert f"parameter {planted[0]} after" in str(e.value)
    assert kind.saved(out).epoch == 1


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(kind, tmp_path, monkeypatch):
    """The writer fails in the middle of epoch 2's checkpoint (one group written): the file on
    disk is still epoch 1's, whole, and no temporary file is left."""
    real, failing = kind.writer.write_tree, []

    def write_tree(group, tree):
        real(group, tree)
        if failing:
            raise OSError("disk full")

    monkeypatch.setattr(kind.writer, "write_tree", write_tree)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="disk full"):
        kind.train(out, progress=lambda ev: isinstance(ev, EpochEnd) and failing.append(1))
    assert kind.saved(out).epoch == 1
    assert _hidden(out) == []  # no temporary, no lock
    assert kind.writer.write_tree is write_tree  # the write that failed went through it


def test_the_lock_refuses_a_second_run_on_the_same_output(kind, tmp_path):
    """A second run started while the first holds the output (from the first's progress
    consumer, so at a known moment) is refused and writes nothing; the first finishes."""
    out, second = tmp_path / "o", []

    def start_another(ev):
        if isinstance(ev, Step) and ev.global_step == 0:
            with pytest.raises(loop.OutputLocked, match="in use by another run") as e:
                kind.train(out, overwrite=True)
            second.append(e.value)
            assert not os.path.exists(kind.checkpoint(out))

    kind.train(out, progress=start_another)
    assert len(second) == 1 and kind.saved(out).epoch == EPOCHS
    assert _hidden(out) == []  # the lock is gone with its run


def test_resume_continues_to_the_uninterrupted_result_bit_for_bit(kind, tmp_path):
    kind.train(tmp_path / "full")

    class Cut(Exception):
        pass

    def cut_after_epoch_1(ev):
        if isinstance(ev, EpochEnd):
            raise Cut

    with pytest.raises(Cut):
        kind.train(tmp_path / "cut", progress=cut_after_epoch_1)
    assert kind.saved(tmp_path / "cut").epoch == 1
    events = []
    kind.train(tmp_path / "cut", progress=events.append, resume=True)
    assert [e.global_step for e in events if isinstance(e, Step)] == list(
        range(STEPS, EPOCHS * STEPS))
    kind.saved(tmp_path / "full").assert_same(kind.saved(tmp_path / "cut"))


def test_bad_options_are_refused_before_anything_is_written(kind, tmp_path, monkeypatch):
    """Refused before the lock is taken, and the output stays as it was (missing, or the
    previous run's files byte for byte): a bad option in a new folder, then in the folder of a
    finished run a second run without overwrite, a resume with another number of epochs and a
    bad option; a resume where there is nothing to resume."""
    done = tmp_path / "done"
    kind.train(done)
    locks = []
    monkeypatch.setattr(loop, "lock_output", lambda *a, **k: locks.append(a))
    fresh = tmp_path / "fresh"
    for out, attempt, error, message in [
        (fresh, lambda o: kind.bad_option(o), ValueError, kind.bad_message),
        (done, lambda o: kind.train(o), FileExistsError, "pass --resume|resume=True"),
        (done, lambda o: kind.train(o, resume=True, epochs=EPOCHS + 1), ValueError,
         "a run of 3 epochs, not 4|epochs = 3 there, 4 now"),
        (done, lambda o: kind.bad_option(o), ValueError, kind.bad_message),
        (fresh, lambda o: kind.train(o, resume=True), FileNotFoundError, "--resume: no"),
    ]:
        before = _files(out)
        with pytest.raises(error, match=message):
            attempt(out)
        assert _files(out) == before and locks == []
