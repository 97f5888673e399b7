"""A golden suite derived from a registered op, with no code of its own (issue 22).

The toy op of :mod:`toy_op` (registered from outside the library) gets a suite by one
``register`` call holding only its case specifications and tolerance model: refimpl computes
the cases through the op contract (inputs, parameters and configuration by the op's names, a
stateful case from ``inputs/y0`` writing ``outputs/y_end``), ``refimpl golden check``
recomputes them, and ``verify`` passes a correct candidate and fails a wrong one. The library's
own op suites (neuron, s4d_layer, ...) are derived the same way: ``refimpl golden check`` in
make test keeps them equal to the committed files.
"""
import numpy as np
import pytest

import toy_op
from float32_backend import write_results
from refimpl import golden as G
from refimpl.golden.registry import SUITES, Spec

SUITE = "toy_leaky"


def _specs(rngs, size):
    out = []
    for i, (a, L, stateful) in enumerate(((0.7, 9, False), (0.2, 5, True), (0.9, 1, False))):
        rng = rngs()
        inputs = {"x": rng.normal(size=(2, 3, L))}
        if stateful:
            inputs["y0"] = rng.normal(size=(2, 3))
        out.append(Spec(f"toy case {i}", ["stateful"] if stateful else [], {"a": a}, inputs,
                        {"w": rng.normal(size=3)}))
    rng = rngs()
    out.append(Spec("NaN input: must be rejected", ["nan_input"], {"a": 0.5},
                    {"x": np.full((1, 1, 3), np.nan)}, {"w": np.ones(1)}, "invalid"))
    return out


@pytest.fixture
def toy_suite():
    """The toy op's suite, registered for one test (the registry is global: removed after)."""
    assert toy_op.TOY_OP.name == SUITE
    suite = G.register(name=SUITE, math=toy_op.TOY_OP.math, specs=_specs,
                       depth=lambda case: {"*": 2 * case.data["inputs/x"].shape[2] + 2})
    yield suite
    del SUITES[SUITE]


def test_a_registered_op_gets_a_golden_suite_without_adapter_code(toy_suite, tmp_path):
    assert toy_suite.differentiable == ("y",)  # taken from the op
    (path,) = G.generate(tmp_path, suites=[SUITE])
    gf = G.read_golden(path)
    cases = gf.cases
    assert [c.result for c in cases.values()] == ["valid", "valid", "valid", "invalid"]
    # the stateful case ran from its state and wrote the end state; the others did not
    assert set(cases["0001"].data) >= {"inputs/y0", "outputs/y", "outputs/y_end"}
    assert "outputs/y_end" not in cases["0000"].data
    # the values are the toy's own recursion, computed here independently
    for cid in ("0000", "0001", "0002"):
        d, a = cases[cid].data, cases[cid].config["a"]
        x, w = d["inputs/x"], d["params/w"]
        prev = d.get("inputs/y0", np.zeros(x.shape[:2]))
        for t in range(x.shape[2]):
            prev = a * prev + w[None, :] * x[..., t]
            np.testing.assert_allclose(d["outputs/y"][..., t], prev, rtol=1e-14, atol=1e-14)
        # dL/dw = sum_t g_t x_t with g the reversed recursion of the cotangent
        g, dw = np.zeros(x.shape[:2]), np.zeros(w.shape)
        for t in reversed(range(x.shape[2])):
            g = a * g + d["cotangents/y"][..., t]
            dw += np.sum(g * x[..., t], axis=0)
        np.testing.assert_allclose(d["grads/w"], dw, rtol=1e-12, atol=1e-12)
    # golden check recomputes it and finds it current
    report = G.check(tmp_path, suites=[SUITE])
    assert report["passed"], report


def _candidate(gf, path, scale=1.0):
    """refimpl's own answers as a backend would write them (``scale`` plants a bug in dw)."""
    results = {}
    for cid, case in gf.cases.items():
        if case.result == "invalid":
            results[cid] = "rejected: NaN input"
            continue
        outputs = {k[8:]: v for k, v in case.data.items() if k.startswith("outputs/")}
        grads = {k[6:]: v for k, v in case.data.items() if k.startswith("grads/")}
        grads["w"] = grads["w"] * scale
        results[cid] = (outputs, grads)
    return write_results(path, SUITE, results, {c: case.data for c, case in gf.cases.items()},
                         "toy", lambda cid, p, a: a)


def test_the_derived_suite_verifies_a_backend(toy_suite, tmp_path):
    (path,) = G.generate(tmp_path, suites=[SUITE])
    gf = G.read_golden(path)
    good = G.verify_file(_candidate(gf, tmp_path / "good.h5"), golden_dir=tmp_path)
    assert good["passed"], good["summary"]
    bad = G.verify_file(_candidate(gf, tmp_path / "bad.h5", 1.001), golden_dir=tmp_path)
    assert not bad["passed"]
    assert {r["tensor"] for r in bad["rows"] if r["status"] in G.FAILURES} == {"grads/w"}
