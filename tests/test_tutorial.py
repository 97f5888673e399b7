"""examples/tutorial.md runs: its ```python blocks, executed in order in one fresh namespace in a
temporary working directory, and what its prose says about their output holds.

Run as a script (``.venv/bin/python tests/test_tutorial.py [RUNS]``) it runs the tutorial the
way a new user does, as one script in a fresh Python process (Numba compilation included), and
prints the wall time of each run and their median. Speed is measured there, never asserted here.
"""
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "examples" / "tutorial.md"


def tutorial_blocks(text=None):
    """The tutorial's ```python blocks, in order."""
    text = TUTORIAL.read_text() if text is None else text
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def run_blocks(blocks, ns=None, first=0):
    """Execute ``blocks`` in ``ns`` (a fresh namespace by default) in the current directory; a
    failure names the block (its number counts from ``first``)."""
    ns = {"__name__": "__tutorial__"} if ns is None else ns
    for i, code in enumerate(blocks, start=first):
        exec(compile(code, f"{TUTORIAL.name}, python block {i}", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """The namespace after the whole tutorial, run in a temporary working directory."""
    cwd = tmp_path_factory.mktemp("tutorial")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        ns = run_blocks(tutorial_blocks())
    finally:
        os.chdir(old)
    return ns, cwd


def section(number):
    """The python blocks of section ``number`` (``## <number>. ...``) and the index of its
    first block among all blocks."""
    parts = re.split(r"^(?=## \d+\. )", TUTORIAL.read_text(), flags=re.M)  # intro, sections
    first = sum(len(tutorial_blocks(p)) for p in parts[:number])
    return tutorial_blocks(parts[number]), first


def test_tutorial_has_its_five_sections():
    text = TUTORIAL.read_text()
    titles = re.findall(r"^## (\d+)\. ", text, re.M)
    assert titles == ["1", "2", "3", "4", "5"]
    for n in range(1, 6):
        blocks, _ = section(n)
        assert blocks, f"section {n} has no python block"


def test_train_reaches_the_stated_accuracy(tutorial):
    ns, cwd = tutorial
    # the data as the comments and the text state it: 600 sequences of 32 steps, 80 % training
    assert ns["x_train"].shape == (480, 32, 5) and ns["x_test"].shape == (120, 32, 5)
    assert ns["y_train"].shape == (480,) and ns["y_test"].shape == (120,)
    history = ns["history"]
    assert len(history) == ns["tcfg"].epochs == 10
    # "the mean training loss falls, the test accuracy climbs far above chance (above 90 %
    # at the last epoch)": chance is 1 / 4 classes
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["accuracy"] > 0.9
    assert ns["data"]["n_classes"] == 4
    # "under a fifth in both layers, the first layer sparser than the second"
    for h in history:
        assert all(0.0 < r < 0.2 for r in h["rates"]), h["rates"]
    assert history[-1]["rates"][0] < history[-1]["rates"][1]


def test_checkpoint_holds_the_trained_model(tutorial):
    ns, cwd = tutorial
    from refimpl.train import load_checkpoint
    ck = load_checkpoint(cwd / "run" / "checkpoint.h5")
    assert ck.cfg == ns["cfg"] and ck.tcfg == ns["tcfg"]
    assert set(ck.params) == set(ns["params"])
    for k, v in ns["params"].items():
        np.testing.assert_array_equal(ck.params[k], v, err_msg=k)  # HDF5 float64: exact
    assert ck.data_recipe == ns["data"]["recipe"]


def test_record_shows_what_the_text_says(tutorial):
    ns, _ = tutorial
    from refimpl.model import RECORD_NAMES
    cfg, records, stats = ns["cfg"], ns["records"], ns["stats"]
    assert len(records) == cfg.n_layers
    theta = ns["theta"]
    assert theta == 1.0
    for i, rec in enumerate(records):
        assert tuple(rec) == RECORD_NAMES["lif"]
        for name, a in rec.items():
            assert a.shape == (8, cfg.d_model, 32), name
        # "the same number model_fwd reports in stats['rates']" (the mean of the same spikes)
        assert rec["s"].mean() == stats["rates"][i]
        assert rec["s"].any(), f"layer {i} never fires: nothing to look at"
        # "s = 1 exactly where h >= theta", "u is 0 at every spike"
        np.testing.assert_array_equal(rec["s"] == 1, rec["h"] >= theta)
        assert np.all(rec["u"][rec["s"] == 1] == 0)
        # "h at the next step is v at that step" after a spike (0 * tau + v: exact)
        after = rec["s"][..., :-1] == 1
        np.testing.assert_array_equal(rec["h"][..., 1:][after], rec["v"][..., 1:][after])
    # the membrane trace printed: a channel with both spikes and silence; "SPIKE" lines are
    # the ones with ten marks or more
    h, s = ns["h"], ns["s"]
    assert 0 < s.sum() < len(s)
    marks = np.minimum((10 * np.maximum(h, 0.0)).astype(int), 20)
    np.testing.assert_array_equal(marks >= 10, s == 1)


def test_stream_equals_the_parallel_form(tutorial):
    ns, _ = tutorial
    stream, params = ns["stream"], ns["params"]
    for k, v in params.items():  # the stream read the checkpoint of the trained model
        np.testing.assert_array_equal(stream.params[k], v, err_msg=k)
    assert ns["state"].steps == 32
    logits = ns["logits"]
    # "far below 1e-12": the streamed forms round differently from the FFT form, by a few ulps
    # of logits of order 1-10 (compare_forms' bound for this model is ~1e-11)
    assert np.abs(ns["step_logits"] - logits).max() < 1e-12
    assert np.abs(ns["chunk_logits"] - logits).max() < 1e-12
    assert ns["first"].shape == (8, 10, 4)
    cmp = ns["cmp"]
    # "The worst logit error is below its bound, the worst membrane error a small fraction of
    # its bound, and there are no mismatches"
    assert cmp["worst_error"] <= cmp["logit_bound"]
    assert cmp["worst_membrane"] < 0.1
    assert cmp["mismatches"] == 0


def test_own_block_gradients_match_finite_differences(tutorial):
    ns, _ = tutorial
    rel = ns["rel_errors"]
    expected = {"x", "W", "b"} | {"ssm." + k for k in ns["block"]["ssm"]}
    assert set(rel) == expected and len(rel) == 9
    assert max(rel.values()) < 1e-6, rel  # the tutorial's stated bound (why: in its text)


def test_own_block_check_catches_the_missing_residual(tutorial):
    """The prose: 'drop `dout +` from `my_block_bwd` and `x`'s check fails (the other rows still
    agree)'."""
    ns, _ = tutorial
    blocks, first = section(4)
    src = [b.replace("return dout + dx,", "return dx,") for b in blocks]
    assert src != blocks, "the residual line of my_block_bwd is not where the test expects it"
    broken = run_blocks(src, dict(ns), first)
    rel = broken["rel_errors"]
    assert rel["x"] > 1e-2
    assert max(v for k, v in rel.items() if k != "x") < 1e-6


def _statuses(report):
    rows = report["files"][0]["rows"]
    return {(r["case"], r["tensor"]): r["status"] for r in rows}


def test_golden_check_passes_then_catches_the_planted_bug(tutorial):
    ns, _ = tutorial
    gold, skip = ns["gold"], ns["SKIP"]
    chosen = ns["chosen"]
    selected = [c for c in gold.cases.values() if chosen(c)]
    valid = [c.id for c in selected if c.result == "valid" and "stateful" not in c.flags]
    invalid = [c.id for c in selected if c.result == "invalid" and "stateful" not in c.flags]
    # the prose: "REJECTED for the three invalid ones, SKIP for the two stateful ones"
    assert skip == ["0039", "0053"] and len(invalid) == 3
    # "(a `tau` out of range, a NaN input, `theta = 0`)"
    bad = [gold.cases[c] for c in invalid]
    assert sorted(["tau" if not 0 <= c.config["tau"] < 1 else "nan" if "nan_input" in c.flags
                   else "theta" if c.config["theta"] == 0 else "?" for c in bad]) == [
        "nan", "tau", "theta"]
    # the selection holds the at_threshold cases the prose mentions
    assert any("at_threshold" in gold.cases[c].flags for c in valid)

    report = ns["report"]
    assert report["passed"]
    st = _statuses(report)
    assert {c: st[(c, "-")] for c in valid} == {c: "PASS" for c in valid}
    assert {c: st[(c, "-")] for c in invalid} == {c: "REJECTED" for c in invalid}
    assert {c: st[(c, "-")] for c in skip} == {c: "SKIP" for c in skip}
    assert len(st) == len(valid) + len(invalid) + len(skip)

    buggy = ns["buggy"]
    assert not buggy["passed"]
    st = _statuses(buggy)
    # "every valid case with a spike followed by more steps has MISMATCH rows, for outputs/s,
    # outputs/h, outputs/u and grads/x ... The only valid case that still passes is the
    # all-zero input"
    zero = [c for c in valid if "all_zero" in gold.cases[c].flags]
    assert len(zero) == 1 and st[(zero[0], "-")] == "PASS"
    assert not gold.cases[zero[0]].data["outputs/s"].any()  # "no spike, so no reset"
    for c in valid:
        if c in zero:
            continue
        assert gold.cases[c].data["outputs/s"][..., :-1].any()  # a spike followed by a step
        got = {t for (case, t), status in st.items() if case == c and status == "MISMATCH"}
        assert got == {"outputs/s", "outputs/h", "outputs/u", "grads/x"}, (c, got)
    assert {c: st[(c, "-")] for c in invalid + skip} == {
        **{c: "REJECTED" for c in invalid}, **{c: "SKIP" for c in skip}}


def test_the_stated_verify_command_gives_the_same_verdicts(tutorial):
    """The command line the tutorial quotes: exit status 1 on the buggy candidate the tutorial
    leaves behind, 0 once the correct kernel's candidate is written again."""
    from refimpl.cli.golden_commands import golden  # the `refimpl golden` group alone
    ns, cwd = tutorial
    text = " ".join(TUTORIAL.read_text().split())
    m = re.search(r"`(refimpl golden verify candidates/neuron\.h5[^`]*)`", text)
    assert m, "the tutorial no longer quotes the verify command"
    args = shlex.split(m.group(1))
    assert args[:3] == ["refimpl", "golden", "verify"]
    old = os.getcwd()
    os.chdir(cwd)
    try:
        runner = CliRunner()
        res = runner.invoke(golden, args[2:])
        assert res.exit_code == 1, res.output
        ns["write_candidate"]("candidates/neuron.h5")
        res = runner.invoke(golden, args[2:])
        assert res.exit_code == 0, res.output
        assert "PASSED" in res.output
    finally:
        os.chdir(old)


# --------------------------------------------------------------------------------------------
# As a new user runs it: one script, a fresh process (python tests/test_tutorial.py [RUNS])
# --------------------------------------------------------------------------------------------


def fresh_process_run(python=sys.executable):
    """Run the tutorial as one script in a fresh process in a temporary directory; returns the
    wall time in seconds (raises on failure)."""
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "tutorial.py"
        script.write_text("\n\n".join(tutorial_blocks()))
        t0 = time.perf_counter()
        subprocess.run([python, str(script)], cwd=d, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    times = [fresh_process_run() for _ in range(runs)]
    print("tutorial wall time per fresh-process run:",
          ", ".join(f"{t:.1f} s" for t in times), f"(median {statistics.median(times):.1f} s)")
