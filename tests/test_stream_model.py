"""Model streams (refimpl.stream): the parallel form, step by step and chunked agree.

For every activation family, random causal models (norms, pre/post, discretizations, neuron
implementations, BatchNorm statistics away from their defaults) and random chunkings:
:func:`refimpl.stream.compare_forms` must find no spike mismatch beyond the derived membrane
bound, logits and membranes within the bounds of :func:`refimpl.stream.tolerances` (derived
there from the depth of the computation), and the flips within the bound are counted (they
are reported by ``hypothesis.event``). Trained checkpoints of every family streamed over their
test set give the parallel form's predictions exactly.
"""
import numpy as np
import pytest
from hypothesis import event, given, strategies as st

from refimpl.activations import ACTIVATIONS
from refimpl.equivalence import _model_case
from refimpl.model import ModelConfig, init_model
from refimpl.stream import ModelStream, StreamState, compare_forms, evaluate_stream
from refimpl.tasks import load_data
from refimpl.train import TrainConfig, evaluate, load_checkpoint, train

from test_model import sdn_weights  # small fixed SDN weights (a valid fused network)

FAMILIES = sorted(ACTIVATIONS)



def make_stream(activation="lif", seed=0, **kw):
    cfg = ModelConfig(n_classes=3, d_input=2, d_model=6, d_state=4, activation=activation, **kw)
    w = sdn_weights() if activation == "sdn" else None
    p, buf = init_model(cfg, seed=seed, sdn_weights=w)
    return ModelStream(cfg, p, buf)


@pytest.mark.parametrize("activation", FAMILIES)
@given(seed=st.integers(0, 2**32 - 1))
def test_parallel_step_and_chunked_forms_agree(activation, seed):
    stream, x, chunks = _model_case(np.random.default_rng(seed), activation)
    r = compare_forms(stream, x, chunks)
    assert r["mismatches"] == 0, r
    assert r["worst_error"] <= r["logit_bound"], r
    assert r["worst_membrane"] <= 1.0, r
    event(f"flips within the bound: {r['flips']}")


@pytest.mark.parametrize("activation", FAMILIES)
def test_chunk_state_handover_equals_one_chunk(activation):
    """Chunk 1's state fed into chunk 2 == one chunk over both (same chunked form)."""
    st_ = make_stream(activation, seed=3)
    x = np.random.default_rng(1).normal(0, 3, size=(2, 40, 2))
    whole, s_whole = st_.forward(x)
    a, s_a = st_.forward(x[:, :17])
    b, s_b = st_.forward(x[:, 17:], s_a)
    assert s_b.steps == s_whole.steps == 40
    scale = max(1.0, np.abs(whole).max())
    # Two FFT convolutions of different lengths vs one: rounding of order eps log2(n) per
    # layer; 1e-12 relative is ~4500 eps (several layers, norms), the outputs agree to ~1e-15.
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), whole, rtol=0, atol=1e-12 * scale)
    for k in s_whole.arrays:
        np.testing.assert_allclose(s_b.arrays[k], s_whole.arrays[k], rtol=0,
                                   atol=1e-12 * max(1.0, np.abs(s_whole.arrays[k]).max()))


def test_last_step_output_is_the_classifier_logits():
    from refimpl.model import model_fwd
    st_ = make_stream("lif", seed=5)
    x = np.random.default_rng(2).normal(0, 3, size=(3, 30, 2))
    logits, _, _, _ = model_fwd(st_.cfg, st_.params, st_.buffers, x)
    steps = st_.run(x, "step")
    # mean over time: pairwise summation (NumPy) vs a running sum, 30 additions: ~30 eps.
    np.testing.assert_allclose(steps[:, -1], logits, rtol=0, atol=1e-12)


def test_bidirectional_model_cannot_stream():
    cfg = ModelConfig(n_classes=2, d_model=4, d_state=4, bidirectional=True)
    p, buf = init_model(cfg, 0)
    with pytest.raises(ValueError, match="bidirectional model cannot stream"):
        ModelStream(cfg, p, buf)


# --------------------------------------------------------------------------------------------
# Bad states
# --------------------------------------------------------------------------------------------


def _with(state, key, value):
    arrays = dict(state.arrays)
    arrays[key] = value
    return StreamState(state.fingerprint, state.steps, arrays)


def test_bad_states_name_the_entry():
    st_ = make_stream("refractory", seed=0)
    s0 = st_.init_state(2)
    x_t = np.zeros((2, 2))
    key = "layers.1.neuron.u"
    with pytest.raises(ValueError, match=r"layers\.1\.neuron\.u.*shape \(2, 6\)"):
        st_.step(x_t, _with(s0, key, np.zeros((2, 5))))
    with pytest.raises(TypeError, match=r"layers\.1\.neuron\.u.*float64"):
        st_.step(x_t, _with(s0, key, np.zeros((2, 6), dtype=np.float32)))
    bad = np.zeros((2, 6))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"layers\.1\.neuron\.u.*not finite at \[1, 2\]"):
        st_.step(x_t, _with(s0, key, bad))
    with pytest.raises(TypeError, match=r"layers\.0\.ssm\.x.*complex128"):
        st_.step(x_t, _with(s0, "layers.0.ssm.x", np.zeros((2, 6, 2))))
    with pytest.raises(TypeError, match=r"layers\.0\.neuron\.count.*int64"):
        st_.step(x_t, _with(s0, "layers.0.neuron.count", np.zeros((2, 6))))
    with pytest.raises(ValueError, match=r"layers\.0\.neuron\.count.*refractory_steps = 0"):
        st_.step(x_t, _with(s0, "layers.0.neuron.count", np.ones((2, 6), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"ssm\.x'\] must have shape \(3, 6, 2\) \(batch 3\)"):
        st_.step(np.zeros((3, 2)), s0)  # state for 2 sequences, input for 3
    with pytest.raises(TypeError, match="StreamState"):
        st_.step(x_t, dict(s0.arrays))


def test_state_of_another_family_or_checkpoint_is_refused():
    lif, sdn = make_stream("lif"), make_stream("sdn")
    with pytest.raises(ValueError, match=r"entry 'layers\.0\.neuron\.count'.*activation 'sdn'"):
        sdn.step(np.zeros((1, 2)), lif.init_state(1))
    other = make_stream("lif", seed=1)  # same architecture, other parameters
    with pytest.raises(ValueError, match="fingerprint.*another checkpoint"):
        other.step(np.zeros((1, 2)), lif.init_state(1))


def test_chunks_argument_is_checked():
    st_ = make_stream("gelu")
    x = np.zeros((1, 10, 2))
    for bad in (0, [3, 3], [5, 5, 0], "steps"):
        with pytest.raises(ValueError, match="chunk"):
            st_.run(x, bad)


# --------------------------------------------------------------------------------------------
# Trained checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", FAMILIES)
def test_trained_checkpoint_streams_to_the_parallel_accuracy(activation, tmp_path):
    data = load_data("recall", n=160, L=40, seed=0)
    cfg = ModelConfig.for_data(data, activation=activation, d_model=8, d_state=8)
    w = sdn_weights() if activation == "sdn" else None
    train(cfg, TrainConfig(epochs=2, batch_size=32, seed=0), data, tmp_path / "run",
          sdn_weights=w)
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.h5")
    x, y = data["x_test"], data["y_test"]
    ref = evaluate(ck.cfg, ck.params, ck.buffers, x, y)
    preds = []
    r = evaluate_stream(ModelStream.from_checkpoint(tmp_path / "run" / "checkpoint.h5"), x, y,
                        batch_size=16, predictions=preds)
    assert r["accuracy"] == ref["accuracy"]
    logits = ModelStream(ck.cfg, ck.params, ck.buffers).parallel(x)[:, -1]
    assert np.array_equal(np.array(preds), logits.argmax(1))
    assert r["steps"] == x.shape[0] * x.shape[1] and r["steps_per_second"] > 0


# --------------------------------------------------------------------------------------------
# The README and the `make run` model
# --------------------------------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_readme_streaming_example_runs():
    text = (REPO / "README.md").read_text()
    section = text.split("## Streaming", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_make_run_model_streams_to_the_parallel_accuracy(tmp_path):
    """Train exactly what `make run` trains (its arguments read from the Makefile), then
    `refimpl evaluate --stream`: the streamed accuracy and every prediction equal the
    parallel form's."""
    import re
    import shlex

    from click.testing import CliRunner

    from refimpl.cli.main import main

    make = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in make.splitlines() if "refimpl train" in ln and "make-run" in ln)
    args = shlex.split(line.split("refimpl", 1)[1])
    out = tmp_path / "make-run"
    args[args.index("--out") + 1] = str(out)
    runner = CliRunner()
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["evaluate", str(out / "checkpoint.h5"), "--stream"])
    assert r.exit_code == 0, r.output
    acc = re.search(r"^test accuracy\s+(\S+)", r.output, re.M).group(1)
    streamed = re.search(r"^streamed accuracy\s+(\S+)", r.output, re.M).group(1)
    same, total = re.search(r"^predictions\s+(\d+) of (\d+) equal", r.output, re.M).groups()
    assert streamed == acc and same == total, r.output
    assert float(acc) > 0.9, r.output  # the make run model learns the task


def test_evaluate_stream_refuses_a_bidirectional_checkpoint(tmp_path):
    from click.testing import CliRunner

    from refimpl.cli.main import main

    runner = CliRunner()
    out = tmp_path / "bi"
    r = runner.invoke(main, ["train", "--task", "parity", "--samples", "64", "--length", "16",
                             "--epochs", "1", "--d-model", "4", "--d-state", "4", "--layers",
                             "1", "--bidirectional", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["evaluate", str(out / "checkpoint.h5"), "--stream"])
    assert r.exit_code != 0
    last = r.output.strip().splitlines()[-1]
    assert "bidirectional model cannot stream" in last and "Traceback" not in r.output
