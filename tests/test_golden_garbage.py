"""Nothing passes unexamined (issue 21, "What must be shown" 2), through the CLI.

Garbage candidates of ``neuron``, ``pmbc``, ``sdn``, ``block`` and ``model_stream`` fail
``refimpl golden verify`` at every profile (float64, float32, bfloat16, float16): exit status
1, and the report (the text table and the ``--json`` rows) names the corrupted tensor:

- all-NaN: every float dataset NaN (each float tensor of the suite fails);
- all-zero: every dataset zero (integers too);
- inverted spikes: ``s -> 1 - s`` (``model_stream``: every spike of the last layer,
  ``outputs/layers.<i>.s``, or ``Tx -> -Tx`` for the ternary GSU layers; ``block``, whose
  spikes are internal: the block computed from inverted spikes): every valid case fails on it;
- non-binary spikes: every spike 1 written as 0.5 (``model_stream``: layer 0; ``block``: the
  block computed from spikes 0.5): every valid case with a spike fails on it;
- ``model_stream`` with NaN logits: every valid case fails on ``outputs/logits``.

Each garbage candidate is the correct candidate of that profile (``tests/half_backend.py``:
float64 / float32 compute, or 16-bit storage with float32 compute) with the corruption
applied, and the correct candidate itself is checked to have no failing row on the tensor:
what fails is the garbage. A ``--select`` that matches no case (``reset=nosuch``,
``reset=HARD``, ``reset=``) is a one-line error listing the values ``reset`` takes.
"""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from refimpl.cli.main import main
from refimpl.golden import FAILURES, golden_path

import half_backend as hb

PROFILES = ("float64", "float32", "bfloat16", "float16")
SUITES = ("neuron", "pmbc", "sdn", "block", "model_stream")
SKIP = ("*/outputs/iterations",)  # the backend writes no PMBC iteration counts
#: the tensor an all-zero candidate must fail on
MAIN = {"neuron": "outputs/h", "pmbc": "outputs/h", "sdn": "outputs/m", "block": "outputs/y",
        "model_stream": "outputs/logits"}
#: model_stream: the layer whose spikes are inverted / made non-binary
STREAM_INVERT_LAYER, STREAM_HALF_LAYER = 1, 0


_GOLDEN = {}


def _golden_cases(suite):
    """``{case id: (result, {dataset path: array})}`` of the committed golden file (outputs
    and grads; memoised)."""
    if suite not in _GOLDEN:
        out = {}
        with h5py.File(golden_path(suite), "r") as f:
            for cid, g in f["cases"].items():
                data = {}
                for group in ("outputs", "grads"):
                    if group in g:
                        g[group].visititems(lambda n, o, grp=group: data.__setitem__(
                            f"{grp}/{n}", o[()]) if isinstance(o, h5py.Dataset) else None)
                res = g.attrs["result"]
                out[cid] = (res.decode() if isinstance(res, bytes) else str(res), data)
        _GOLDEN[suite] = out
    return _GOLDEN[suite]


def _is_spike_path(suite, path, layer=None):
    if suite == "model_stream":
        pre = "outputs/layers." if layer is None else f"outputs/layers.{layer}."
        return path.startswith(pre) and path.endswith((".s", ".Tx"))
    return path == "outputs/s"


def _corrupt(kind, suite):
    """``corrupt(case_id, path, array) -> array`` of a garbage kind (None: no corruption)."""
    if kind == "nan":
        return lambda cid, p, a: np.full_like(a, np.nan) if a.dtype.kind == "f" else a
    if kind == "zero":
        return lambda cid, p, a: np.zeros_like(a)
    if suite == "block":  # spikes are internal: computed from garbage spikes (a bug)
        return None
    if kind == "invert":
        layer = STREAM_INVERT_LAYER if suite == "model_stream" else None
        return lambda cid, p, a: ((-a if p.endswith(".Tx") else 1 - a)
                                  if _is_spike_path(suite, p, layer) else a)
    if kind == "half":
        layer = STREAM_HALF_LAYER if suite == "model_stream" else None
        return lambda cid, p, a: (np.where(a != 0, 0.5 * a, a)
                                  if _is_spike_path(suite, p, layer) else a)
    if kind == "nan_logits":
        return lambda cid, p, a: np.full_like(a, np.nan) if p == "outputs/logits" else a
    raise ValueError(kind)


BLOCK_BUG = {"invert": "spikes_inverted", "half": "spikes_half"}


@pytest.fixture(scope="module")
def cand(tmp_path_factory):
    """``cand(suite, profile, kind=None)`` -> path of the (garbage) candidate (memoised)."""
    root = tmp_path_factory.mktemp("garbage")
    made = {}

    def make(suite, profile, kind=None):
        key = (suite, profile, kind)
        if key not in made:
            bug = BLOCK_BUG.get(kind) if suite == "block" else None
            corrupt = _corrupt(kind, suite) if kind else None
            path = root / ("-".join(str(k) for k in key if k) + ".h5")
            made[key] = hb.write_candidate(suite, path, profile, bug=bug, corrupt=corrupt)
        return made[key]
    return make


def cli_verify(path, profile, tmp_path, *extra):
    """Run ``refimpl golden verify`` on one candidate: ``(click result, JSON report)``."""
    js = tmp_path / f"report-{path.stem}-{profile}.json"
    args = ["golden", "verify", str(path), "--precision", profile, "--json", str(js)]
    for pat in SKIP:
        args += ["--skip", pat]
    r = CliRunner().invoke(main, args + list(extra))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r, (json.loads(js.read_text()) if js.exists() else None)


def failing_rows(report):
    return [r for f in report["files"] for r in f["rows"] if r["status"] in FAILURES]


def text_names(output, tensor):
    """The text table has a failing row naming ``tensor``."""
    return any(tensor in line.split() and any(s in line.split() for s in FAILURES)
               for line in output.splitlines())


def _check_fails(r, rep, tensors, what):
    bad = failing_rows(rep)
    named = {row["tensor"] for row in bad}
    assert r.exit_code == 1, f"{what}: exit {r.exit_code}\n{r.output[-2000:]}"
    assert not rep["passed"], what
    missing = set(tensors) - named
    assert not missing, f"{what}: no failing row on {sorted(missing)} (failing: {sorted(named)})"
    for t in tensors:
        assert text_names(r.output, t), f"{what}: the text report has no failing row on {t}"
    return bad


def _cases_failing_on(bad, pred):
    return {row["case"] for row in bad if pred(row["tensor"])}


# ---- the correct candidates: the base of the garbage --------------------------------------------

@pytest.mark.parametrize("profile", ["float64", "float32"])  # 16-bit: tests/test_golden_half.py
@pytest.mark.parametrize("suite", SUITES)
def test_correct_candidate_passes(cand, tmp_path, suite, profile):
    r, rep = cli_verify(cand(suite, profile), profile, tmp_path)
    bad = failing_rows(rep)
    assert r.exit_code == 0 and not bad, (
        f"{suite} at {profile}: the correct candidate fails\n" + "\n".join(
            f"  {b['case']} {b['status']} {b['tensor']} {b['index']} value={b['value']} "
            f"ref={b['reference']} bound={b['bound']} {b['detail']}" for b in bad[:10]))


# ---- garbage -----------------------------------------------------------------------------------

def _float_tensors(suite):
    """Float dataset paths of the suite's valid cases (every one must fail when all NaN)."""
    names = set()
    for res, data in _golden_cases(suite).values():
        if res != "invalid":
            names |= {p for p, a in data.items() if a.dtype.kind == "f"}
    return names


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("suite", SUITES)
def test_all_nan_fails(cand, tmp_path, suite, profile):
    r, rep = cli_verify(cand(suite, profile, "nan"), profile, tmp_path)
    _check_fails(r, rep, _float_tensors(suite), f"all-NaN {suite} at {profile}")


def _nonzero_int_tensors(suite):
    """Integer datasets that are nonzero in some valid case (all-zero must fail on them)."""
    return {p for res, data in _golden_cases(suite).values() if res == "valid"
            for p, a in data.items() if a.dtype.kind in "iu" and a.any()
            and not p.endswith("/iterations")}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("suite", SUITES)
def test_all_zero_fails(cand, tmp_path, suite, profile):
    r, rep = cli_verify(cand(suite, profile, "zero"), profile, tmp_path)
    tensors = {MAIN[suite]} | _nonzero_int_tensors(suite)  # (the committed counters are 0)
    _check_fails(r, rep, tensors, f"all-zero {suite} at {profile}")


def _spike_expectation(suite, kind, profile):
    """(tensors that must fail, {case id: tensor} of the valid cases that must fail on it).
    Cases the correct backend rejects at ``profile`` are left out: they hold a value beyond the
    format's range (the float16 ``saturation`` case of ``neuron``, ``pmbc``), no candidate
    value is written there (test_overflow_case_spikes_are_still_checked has one written)."""
    rejected = {cid for cid, res in hb.compute_suite(suite, profile).items()
                if isinstance(res, str)}
    if suite == "block":
        cases = {}
        with h5py.File(golden_path(suite), "r") as f:
            for cid, g in f["cases"].items():
                act = g.attrs["activation"]
                act = act.decode() if isinstance(act, bytes) else str(act)
                if (g.attrs["result"] == "valid" and act not in ("gelu", "binary_gsu")
                        and cid not in rejected):
                    cases[cid] = "outputs/y"
        # a block whose spikes are all 0 is not changed by halving them
        return {"outputs/y"}, cases
    layer = {"invert": STREAM_INVERT_LAYER, "half": STREAM_HALF_LAYER}[kind]
    cases = {}
    for cid, (res, data) in _golden_cases(suite).items():
        if res != "valid" or cid in rejected:
            continue
        for p, a in data.items():
            if _is_spike_path(suite, p, layer if suite == "model_stream" else None):
                if kind == "invert" or (a != 0).any():
                    cases[cid] = p
    return set(cases.values()), cases


@pytest.mark.parametrize("kind", ["invert", "half"])
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("suite", SUITES)
def test_garbage_spikes_fail_in_every_case(cand, tmp_path, suite, profile, kind):
    what = f"{'inverted' if kind == 'invert' else 'non-binary (0.5)'} spikes {suite} at {profile}"
    tensors, cases = _spike_expectation(suite, kind, profile)
    assert cases, f"{suite}: no case to corrupt"
    r, rep = cli_verify(cand(suite, profile, kind), profile, tmp_path)
    bad = _check_fails(r, rep, tensors, what)
    hit = {row["case"] for row in bad if cases.get(row["case"]) == row["tensor"]}
    if suite == "block" and kind == "half":
        # spikes of 0.5 leave y unchanged where no spike fired: the cases that spike must fail
        spiking = {cid for cid in cases if _block_spikes(cid)}
        assert spiking <= hit, f"{what}: cases {sorted(spiking - hit)} pass"
        return
    assert set(cases) <= hit, f"{what}: cases {sorted(set(cases) - hit)} pass"


def _block_spikes(cid):
    """Does the correct float32 block of case ``cid`` fire any spike? (spikes_half changes y)."""
    a = hb.compute_suite("block", "float32")[cid]
    b = hb.compute_suite("block", "float32", bug="spikes_half")[cid]
    return not np.array_equal(a[0]["y"], b[0]["y"])


@pytest.mark.parametrize("profile", PROFILES)
def test_stream_nan_logits_fail_in_every_case(cand, tmp_path, profile):
    r, rep = cli_verify(cand("model_stream", profile, "nan_logits"), profile, tmp_path)
    bad = _check_fails(r, rep, {"outputs/logits"}, f"NaN logits at {profile}")
    valid = {cid for cid, (res, _) in _golden_cases("model_stream").items() if res == "valid"}
    hit = _cases_failing_on(bad, lambda t: t == "outputs/logits")
    assert valid <= hit, f"NaN logits pass in cases {sorted(valid - hit)} at {profile}"
    # nothing else is blamed: the other datasets are the correct ones
    assert {row["tensor"] for row in bad} == {"outputs/logits"}


# ---- --select matching no case ------------------------------------------------------------------

@pytest.mark.parametrize("profile", ["float64", "bfloat16"])
@pytest.mark.parametrize("expr", ["reset=nosuch", "reset=HARD", "reset="])
def test_select_matching_no_case_is_an_error(cand, tmp_path, expr, profile):
    resets = set()
    with h5py.File(golden_path("neuron"), "r") as f:
        for g in f["cases"].values():
            v = g.attrs["reset"]
            resets.add(v.decode() if isinstance(v, bytes) else str(v))
    assert {"hard", "soft", "refractory"} <= resets
    r, _ = cli_verify(cand("neuron", profile), profile, tmp_path, "--select", expr)
    assert r.exit_code == 1, f"--select {expr}: exit {r.exit_code}\n{r.output[-1000:]}"
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "reset" in lines[0] and all(v in lines[0] for v in resets), lines[0]
    assert "PASSED" not in r.output


@pytest.mark.parametrize("suite", ["neuron", "pmbc"])
def test_overflow_case_spikes_are_still_checked(cand, tmp_path, suite):
    """The float16 ``saturation`` case holds x ~ 2e6, beyond float16: the verifier excuses a
    rejection (the correct backend rejects it). A candidate that computes it anyway (float32
    values, h beyond float16 written as inf) and writes spikes of 0.5 must still fail: spikes
    are 0 or 1 in every case and profile."""
    f16 = hb.compute_suite(suite, "float16")
    over = [cid for cid, res in f16.items() if isinstance(res, str)
            and _golden_cases(suite)[cid][0] == "valid"]
    assert over, f"{suite}: no valid case beyond float16"
    f32 = hb.compute_suite(suite, "float32")
    path = cand(suite, "float16")
    bad_path = tmp_path / f"{suite}-overflow-half.h5"
    bad_path.write_bytes(path.read_bytes())
    with h5py.File(bad_path, "a") as f:
        for cid in over:
            g = f[f"cases/{cid}"]
            del g.attrs["error"]
            for group, tensors in zip(("outputs", "grads"), f32[cid]):
                for name, a in tensors.items():
                    if f"{group}/{name}" in g or name == "iterations":
                        continue
                    a = np.where(a == 1, 0.5, a) if name == "s" else a
                    with np.errstate(over="ignore"):
                        g[f"{group}/{name}"] = a.astype(np.float16 if a.dtype.kind == "f"
                                                        else np.int64)
    r, rep = cli_verify(bad_path, "float16", tmp_path)
    bad = _check_fails(r, rep, {"outputs/s"}, f"0.5 spikes in the float16 overflow case of {suite}")
    assert set(over) <= {row["case"] for row in bad if row["tensor"] == "outputs/s"}
