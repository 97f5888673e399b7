"""``refimpl conform`` (issue 24): the engine, its verdicts, its minimal cases, its campaigns.

- The NumPy adapter of the reference (tests/conform_adapters.py) conforms for every op at
  float64, and its float32 variant at ``--precision float32``.
- Every planted bug (at least one per op, :data:`conform_adapters.BUGS`) is found; its minimal
  case is small, fails ``refimpl golden verify`` for the buggy adapter and passes for the
  correct one. The three bugs no committed golden case exposes shrink to the smallest sizes
  their conditions allow: L = 1025 (L > 1024 and not a multiple of 1024), H = 9 (H > 8 and not
  a multiple of 8), one neuron for one step from a nonzero refractory count.
- The report is the same in this process, on the process pool and on a Dask LocalCluster.
- The command line: exit status, report, progress, JSON, replay, the file exchange, errors.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from refimpl.cli.main import main
from refimpl.conform import engine as E
from refimpl.conform.strategies import Limits
from refimpl.golden.schema import read_golden
from refimpl.golden.verify import verify_file
from refimpl.ops import all_ops

import conform_adapters as ca

HERE = Path(__file__).resolve().parent
#: refimpl's own ops (a test may register a toy op into the same registry)
OPS = {n: o for n, o in all_ops().items() if o.fwd.__module__.startswith("refimpl.")}


def spec(name):
    """The adapter spec of an object of tests/conform_adapters.py (loadable by workers)."""
    return f"{HERE / 'conform_adapters.py'}:{name}"


# --------------------------------------------------------------------------------------------
# The reference conforms
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter, precision", [("reference", "float64"),
                                                ("reference32", "float32")])
def test_the_reference_adapter_conforms_for_every_op(adapter, precision, tmp_path):
    report = E.conform(spec(adapter), ops=list(OPS), precision=precision, examples=20, seed=0,
                       out=tmp_path / "failures")
    assert set(report["ops"]) == set(OPS)
    for name, t in report["ops"].items():
        assert t["failures"] == 0, (name, t["minimal"])
        assert t["examples"] == 20 and t["discarded"] == [], name
        assert t["gradients"], name
        forms = ["whole"] + (["chunked", "step"] if OPS[name].state is not None else [])
        assert t["forms"] == forms, name
    assert report["passed"]
    assert not (tmp_path / "failures").exists()  # nothing written without a failure


def test_the_same_seed_gives_the_same_report_and_another_seed_other_examples(tmp_path):
    a = E.conform(spec("bug_neuron_ge_as_gt"), ops=["neuron", "glu"], examples=20, seed=5,
                  out=tmp_path / "a")
    b = E.conform(spec("bug_neuron_ge_as_gt"), ops=["neuron", "glu"], examples=20, seed=5,
                  out=tmp_path / "b")
    assert _normal(a, tmp_path / "a") == _normal(b, tmp_path / "b")
    assert _case_bytes(tmp_path / "a" / "neuron.h5") == _case_bytes(tmp_path / "b" / "neuron.h5")


# --------------------------------------------------------------------------------------------
# Planted bugs
# --------------------------------------------------------------------------------------------

#: Sizes a bug needs beyond the default limits (its condition in conform_adapters.BUGS).
LIMITS = {"fftconv_long_tail_block": Limits(length=1100)}

#: The smallest sizes a required bug's condition allows (from the condition, not from a run).
SMALLEST = {"fftconv_long_tail_block": {"L": 1025},  # L > 1024, not a multiple of 1024
            "glu_tail_gate_bias": {"H": 9},  # H > 8, not a multiple of 8
            "neuron_gt_ignores_count0": {"B": 1, "H": 1, "L": 1}}  # one neuron, one step

#: Bugs only a form other than the whole sequence from the start can show.
FORM = {"neuron_step_count_stuck": "step", "s4d_layer_step_no_D": "step"}


def test_every_op_has_a_planted_bug():
    assert {op for op, _, _ in ca.BUGS.values()} == set(OPS)
    assert set(ca.REQUIRED.values()) <= set(ca.BUGS)


@pytest.mark.parametrize("bug", sorted(ca.BUGS))
def test_a_planted_bug_is_found_and_its_minimal_case_reproduces(bug, tmp_path):
    op, _, _ = ca.BUGS[bug]
    out = tmp_path / "failures"
    report = E.conform(spec(f"bug_{bug}"), ops=[op], examples=60, seed=0,
                       limits=LIMITS.get(bug, Limits()), out=out)
    t = report["ops"][op]
    assert not report["passed"] and t["failures"] >= 1, (bug, t)
    m = t["minimal"]
    assert Path(m["path"]) == out / f"{op}.h5" and Path(m["path"]).is_file()
    for k, v in SMALLEST.get(bug, {}).items():
        assert m["sizes"][k] == v, (bug, m["sizes"])
    limits = LIMITS.get(bug, Limits())
    caps = {"B": limits.batch, "H": max(limits.channels, limits.features),
            "L": limits.length, "V": limits.vocab, "N": limits.state}
    assert all(v <= caps.get(k, v) for k, v in m["sizes"].items()), m["sizes"]
    if bug in FORM:
        assert m["form"] == FORM[bug]
    case = read_golden(m["path"]).cases["0000"]
    if bug == "neuron_gt_ignores_count0":
        assert case.config["spike_condition"] == "gt"
        assert np.any(case.data["inputs/count0"] > 0)
    # the written case reproduces: the buggy adapter fails it, the reference passes it
    for adapter, passes in ((f"bug_{bug}", False), ("reference", True)):
        cand = tmp_path / f"{adapter}.h5"
        E.replay(spec(adapter), m["path"], cand)
        rep = verify_file(cand, out)
        assert rep["passed"] is passes, (adapter, rep["rows"])


# --------------------------------------------------------------------------------------------
# Campaigns: in process, on the pool, on Dask
# --------------------------------------------------------------------------------------------

def _normal(report, out):
    """A report with the output folder taken out of its paths (the rest must be equal)."""
    return json.loads(json.dumps(report, default=str).replace(str(out), "OUT"))


def _case_bytes(path):
    case = read_golden(path).cases["0000"]
    return {p: np.asarray(v).tobytes() for p, v in case.data.items()}


CAMPAIGN = dict(ops=["fftconv", "glu", "neuron"], examples=25, seed=3)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    return E.conform(spec("bug_glu_tail_gate_bias"), workers=1, out=out, **CAMPAIGN), out


def test_the_process_pool_gives_the_report_of_one_process(serial, tmp_path):
    report, out = serial
    assert report["ops"]["glu"]["failures"] and not report["ops"]["neuron"]["failures"]
    pool = E.conform(spec("bug_glu_tail_gate_bias"), workers=2, out=tmp_path, **CAMPAIGN)
    assert _normal(pool, tmp_path) == _normal(report, out)
    assert _case_bytes(tmp_path / "glu.h5") == _case_bytes(out / "glu.h5")


def test_a_dask_local_cluster_gives_the_report_of_one_process(serial, tmp_path):
    distributed = pytest.importorskip("distributed")  # the 'dask' extra; make install has it
    report, out = serial
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        dask = E.conform(spec("bug_glu_tail_gate_bias"), workers=None,
                         scheduler=cluster.scheduler_address, out=tmp_path, **CAMPAIGN)
    assert _normal(dask, tmp_path) == _normal(report, out)
    assert _case_bytes(tmp_path / "glu.h5") == _case_bytes(out / "glu.h5")


def test_an_adapter_object_runs_in_process_only(tmp_path):
    with pytest.raises(E.AdapterError, match="in this process only"):
        E.conform(ca.reference, ops=["glu"], examples=2, workers=2, out=tmp_path)
    report = E.conform(ca.reference, ops=["glu"], examples=3, out=tmp_path)
    assert report["passed"] and report["ops"]["glu"]["examples"] == 3


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def _run(args):
    return CliRunner().invoke(main, ["conform", *map(str, args)])


def test_cli_passes_with_progress_and_a_json_report(tmp_path):
    r = _run([spec("reference"), "--op", "glu", "--op", "neuron", "--examples", "4",
              "--workers", "1", "--json", tmp_path / "r.json", "--out", tmp_path / "f"])
    assert r.exit_code == 0, r.output
    assert "PASSED: 2 op(s) at float64" in r.output
    assert "conform (4 examples per op): 2/2" in r.stderr  # progress, also off a terminal
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["passed"] and doc["ops"]["neuron"]["examples"] == 4


def test_cli_fails_writes_the_minimal_case_and_replay_reproduces_it(tmp_path):
    out = tmp_path / "f"
    r = _run([spec("bug_glu_tail_gate_bias"), "--op", "glu", "--examples", "30",
              "--workers", "1", "--out", out])
    assert r.exit_code == 1, r.output
    assert "FAILED: glu" in r.output and str(out / "glu.h5") in r.output
    for adapter, code in (("bug_glu_tail_gate_bias", 1), ("reference", 0)):
        cand = tmp_path / f"{adapter}.h5"
        r = _run([spec(adapter), "--replay", out / "glu.h5", "--candidate", cand])
        assert r.exit_code == 0, r.output
        v = CliRunner().invoke(main, ["golden", "verify", str(cand), "--golden", str(out)])
        assert v.exit_code == code, v.output


def test_cli_fixed_configuration_reaches_every_example(tmp_path):
    report_path = tmp_path / "r.json"
    r = _run([spec("bug_neuron_ge_as_gt"), "--op", "neuron", "--examples", "30",
              "--config", "spike_condition=gt", "--workers", "1", "--out", tmp_path / "f",
              "--json", report_path])
    # the bug turns ge into gt: with every example at gt it cannot show
    assert r.exit_code == 0, r.output
    r = _run([spec("reference"), "--op", "glu", "--config", "glu.tau=0.5"])
    assert r.exit_code == 1 and "no configuration field" in r.output


def test_cli_file_exchange_runs_a_command_backend(tmp_path):
    backend = f"{sys.executable} {HERE / 'conform_command_backend.py'} {{cases}} {{candidate}}"
    for extra, code in (("", 0), (" --bug", 1)):
        out = tmp_path / f"out{extra.strip()}"
        r = _run(["--command", backend + extra, "--op", "meanpool", "--examples", "4",
                  "--workers", "1", "--out", out])
        assert r.exit_code == code, r.output
    # the bug (dx without 1 / L) shrinks to the smallest sequence that shows it: L = 2
    m = read_golden(out / "meanpool.h5").cases["0000"]
    assert m.data["inputs/x"].shape[2] == 2


def test_cli_errors_are_one_line(tmp_path):
    cases = [([tmp_path / "nope.py"], "no such file"),
             ([spec("nothing_here")], "has no attribute 'nothing_here'"),
             ([spec("reference"), "--op", "bogus"], "unknown op 'bogus'"),
             ([spec("reference"), "--replay", __file__], "--replay and --candidate go "
                                                         "together"),
             ([], "give an ADAPTER")]
    for args, message in cases:
        r = _run(args)
        assert r.exit_code != 0 and message in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_cli_lists_the_ops():
    r = _run(["--list-ops"])
    assert r.exit_code == 0
    for name in OPS:
        assert f"\n{name} " in r.output


# --------------------------------------------------------------------------------------------
# README: the conform section works as shown
# --------------------------------------------------------------------------------------------

def test_readme_conform_section_works_as_shown(tmp_path, monkeypatch):
    """Its file blocks written where they say, its commands run from a folder outside the
    checkout with the exit status they state (``# exit 1``; else 0)."""
    import re
    import shlex
    text = (HERE.parent / "README.md").read_text()
    start = text.index("## Check a live backend at its own shapes: `refimpl conform`")
    section = text[start:text.index("\n## ", start + 10)]
    root = str(tmp_path / "my_backend")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    files = ran = 0
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", section, re.S):
        body = body.replace("/tmp/my_backend", root)
        if lang == "python":
            first, _, code = body.partition("\n")
            assert first.startswith("# file: "), first
            path = Path(first[len("# file: "):])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(code)
            files += 1
            continue
        for line in body.splitlines():
            command, _, comment = line.partition("#")
            args = shlex.split(command)
            assert args[0] == "refimpl", line
            want = 1 if "exit 1" in comment else 0
            r = CliRunner().invoke(main, args[1:])
            assert r.exit_code == want, (line, r.output)
            ran += 1
    assert files == 1 and ran == 6
    # what the section says the minimal case is
    failures = tmp_path / "my_backend" / "failures"
    case = read_golden(failures / "fftconv.h5").cases["0000"]
    assert case.data["inputs/u"].shape == (1, 1, 65)  # L > 64: the smallest is 65
    # ... and the correct adapter passes the committed case
    cand = tmp_path / "good.h5"
    r = CliRunner().invoke(main, ["conform", f"{root}/my_adapter.py", "--replay",
                                  str(failures / "fftconv.h5"), "--candidate", str(cand)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["golden", "verify", str(cand), "--golden", str(failures)])
    assert r.exit_code == 0, r.output


def test_a_case_file_of_an_op_that_passes_now_is_removed_and_others_are_kept(tmp_path):
    out = tmp_path / "f"
    E.conform(spec("bug_glu_tail_gate_bias"), ops=["glu"], examples=30, out=out)
    assert (out / "glu.h5").is_file()
    (out / "meanpool.h5").write_bytes(b"not conform's")  # a file conform did not write
    report = E.conform(spec("reference"), ops=["glu", "meanpool"], examples=5, out=out)
    assert report["passed"] and report["ops"]["glu"]["removed"] == str(out / "glu.h5")
    assert not (out / "glu.h5").exists() and (out / "meanpool.h5").read_bytes() == \
        b"not conform's"


def test_cli_size_limits_reach_every_example(tmp_path):
    r = _run([spec("reference"), "--op", "meanpool", "--examples", "10", "--workers", "1",
              "--max-batch", "1", "--max-channels", "2", "--max-length", "3",
              "--json", tmp_path / "r.json"])
    assert r.exit_code == 0, r.output
    limits = json.loads((tmp_path / "r.json").read_text())["limits"]
    assert (limits["batch"], limits["channels"], limits["length"]) == (1, 2, 3)
    # a bug that needs L > 1 cannot hide behind the limit: at L <= 3 it still shows
    r = _run([spec("bug_meanpool_vjp_no_divide"), "--op", "meanpool", "--examples", "20",
              "--workers", "1", "--max-length", "3", "--out", tmp_path / "f"])
    assert r.exit_code == 1, r.output
    x = read_golden(tmp_path / "f" / "meanpool.h5").cases["0000"].data["inputs/x"]
    assert x.shape[2] <= 3 and x.shape[2] == 2
