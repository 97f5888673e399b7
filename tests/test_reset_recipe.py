"""CONTRIBUTING.md's "A reset" recipe, proven on toy resets registered at test time (issue 22).

Two toy resets are registered the way the recipe says, from this file only: their coefficient
function with :func:`refimpl.neurons.register_reset` (the entry's facts) and their literal
formula in the oracle's table :data:`refimpl.reference.RESETS`. Nothing else is edited, and
every check below passes for them as for the four resets of DESIGN.md:

- ``half``, ``u = h (1 - s) + (theta / 2) s`` (``a = 1``, ``b = theta / 2``; default facts:
  ``theta > 0``, no ``u_reset``, no ``rho``): PMBC's hard kind resetting to a value that is not
  ``u_reset``;
- ``shift``, ``u = h + (u_reset - theta / 2 - rho) s`` (``a = 0``; every fact the other way:
  any real ``theta``, takes ``u_reset`` and ``rho``): PMBC's linear kind with a trainable
  parameter.

Checked, for every registered reset (the toys included): the configuration validates as the
entry declares; the entry's facts agree with its coefficient function; the iterative kernel
equals the oracle's literal loop exactly (hard and smooth spikes; arithmetic surrogates only,
so both sides perform the same ``+ - * /`` in the same order); PMBC equals the iterative
neuron (hypothesis; the tolerance and margin filter of ``tests/test_pmbc.py``); the backward
passes central finite differences on the smooth forward and a dot-product test (the helpers
and rtol 1e-6 of ``tests/test_ops.py``); the float32 variant runs it within the float32 form
of the golden tolerance model (``tests/test_ops.py``'s bound); the equivalence checks draw it
as declared. For the toys: the golden ``neuron`` and ``pmbc`` suites append their cases after
the committed ones (whose definitions stay as committed), refimpl generates those cases and
its own recomputed results pass ``verify``. For the real resets: the spec rows (the module
docstring's table, DESIGN.md section 4's) and the oracle entry exist. The toys are removed
again when this module ends (:func:`registered`), so other tests see the real registry.
"""
import contextlib
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import test_ops as contract
import test_pmbc
from gradcheck import assert_close_scalar, directional_fd
from refimpl import equivalence, neurons, precision
from refimpl import golden as G
from refimpl import reference
from refimpl.golden.generate import build_case
from refimpl.golden.registry import get_suite, suite_specs
from refimpl.golden.spiking_suites import V1_RESETS
from refimpl.neurons import (NEURON_OP, RESETS, NeuronConfig, NeuronState, check_rho,
                             neuron_bwd, neuron_fwd, register_reset, reset_coefficients)
from refimpl.ops import Example
from refimpl.reference import neuron_trace
from refimpl.surrogates import get_surrogate
from strategies_neurons import neuron_configs, neuron_inputs

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT.parent / "shared" / "DESIGN.md"  # the spec, outside the repository


# ---- the toys: what a contributor writes ----------------------------------------------------


def _reset_half(cfg, rho, H):
    """``u = h (1 - s) + (theta / 2) s``."""
    return 1.0, np.full(H, cfg.theta / 2)  # (H,)


def _reset_shift(cfg, rho, H):
    """``u = h + (u_reset - theta / 2 - rho) s`` (``rho (H,) >= 0``)."""
    return 0.0, cfg.u_reset - cfg.theta / 2 - rho  # (H,)


#: name -> (coefficient function, Reset facts, the oracle's literal formula)
TOYS = {
    "half": (_reset_half, {},
             lambda h, s, theta, u_reset, rho: h * (1.0 - s) + (theta / 2) * s),
    "shift": (_reset_shift, {"theta_positive": False, "u_reset": True, "param": "rho"},
              lambda h, s, theta, u_reset, rho: h + (u_reset - theta / 2 - rho) * s),
}

#: Every reset the checks run over: the registered ones and the toys.
ALL = [*RESETS, *TOYS]

#: Surrogates whose g / G use only + - * / (exact comparisons; tests/test_neurons.py).
ARITHMETIC = ("triangle", "rectangle", "fast_sigmoid")


@contextlib.contextmanager
def registered(toys):
    """Register ``toys`` ({name: (fn, facts, literal)}) as the recipe says; remove them after."""
    try:
        for name, (fn, facts, literal) in toys.items():
            register_reset(name, **facts)(fn)
            reference.RESETS[name] = literal
        yield
    finally:
        for name in toys:
            RESETS.pop(name, None)
            reference.RESETS.pop(name, None)


@pytest.fixture(scope="module", autouse=True)
def toy_resets():
    """The toys for every test of this module (module scope: hypothesis draws configs of them)."""
    with registered(TOYS):
        yield


def test_the_toys_leave_the_registries_as_they_were():
    before = dict(RESETS), dict(reference.RESETS)
    probe = {"probe": (_reset_half, {}, TOYS["half"][2])}
    with registered(probe):
        assert "probe" in RESETS and "probe" in reference.RESETS
        assert NeuronConfig(reset="probe").reset_rule.coefficients is _reset_half
    assert (dict(RESETS), dict(reference.RESETS)) == before
    with pytest.raises(ValueError, match="reset 'half' is registered twice"):
        register_reset("half")(_reset_half)
    with pytest.raises(ValueError, match="param must be None or 'rho'"):
        neurons.Reset("probe", _reset_half, param="tau")
    assert "probe" not in RESETS


# ---- validation and facts -------------------------------------------------------------------


@st.composite
def reset_cases(draw, reset, surrogates=ARITHMETIC, max_L=64, grad_modes=("bptt",)):
    """``(x, cfg, rho)`` for ``reset``, drawn from its entry's facts: ``theta`` any real or
    ``> 0``, ``u_reset`` where it takes one, ``rho (H,) >= 0`` where it takes it."""
    rule = RESETS[reset]
    cfg = draw(neuron_configs(resets=(reset,), surrogates=surrogates, grad_modes=grad_modes))
    theta = draw(st.floats(-1.0, 2.0) if not rule.theta_positive else st.floats(0.1, 3.0))
    u_reset = draw(st.floats(-1.0, 0.5)) if rule.u_reset else 0.0
    cfg = cfg.replace(theta=theta, u_reset=u_reset)
    x, _ = draw(neuron_inputs(cfg, lengths=st.integers(1, max_L)))
    H = x.shape[1]
    rho = None
    if rule.param == "rho":
        rho = np.array(draw(st.lists(st.floats(0.0, 1.5), min_size=H, max_size=H)))  # (H,)
    return x, cfg, rho


def rho_for(reset, H, rng):
    return rng.uniform(0.1, 1.0, size=H) if RESETS[reset].param == "rho" else None  # (H,)


@pytest.mark.parametrize("reset", ALL)
def test_the_config_validates_as_the_entry_declares(reset):
    rule = RESETS[reset]
    for theta in (0.0, -0.5):
        if rule.theta_positive:
            with pytest.raises(ValueError, match=rf"theta \(with reset='{reset}'\) must be in "):
                NeuronConfig(reset=reset, theta=theta)
        else:
            assert NeuronConfig(reset=reset, theta=theta).theta == theta
    if rule.u_reset:
        assert NeuronConfig(reset=reset, u_reset=-0.25).u_reset == -0.25
    else:
        with pytest.raises(ValueError, match=rf"u_reset applies only to reset='hard' or "
                                             rf"reset='shift'; got u_reset=0.5 with "
                                             rf"reset='{reset}'"):
            NeuronConfig(reset=reset, u_reset=0.5)
    cfg = NeuronConfig(reset=reset)
    x = np.full((1, 2, 4), 1.5)  # (B, H, L)
    if rule.param == "rho":
        with pytest.raises(ValueError, match=rf"reset='{reset}' needs rho"):
            check_rho(cfg, None, 2)
        with pytest.raises(ValueError, match=r"rho must be >= 0 everywhere, got rho\[1\]"):
            check_rho(cfg, np.array([0.5, -0.1]), 2)
        rho = np.array([0.5, 0.25])
        s, h, _ = neuron_fwd(x, cfg, rho)
        assert neuron_bwd(x, s, h, cfg, np.ones_like(s), rho=rho)[1].shape == (2,)
    else:
        with pytest.raises(ValueError, match=rf"rho is only used with reset='refractory' or "
                                             rf"reset='shift'; got rho with reset='{reset}'"):
            check_rho(cfg, np.zeros(2), 2)
        s, h, _ = neuron_fwd(x, cfg)
        assert neuron_bwd(x, s, h, cfg, np.ones_like(s))[1] is None


@pytest.mark.parametrize("reset", ALL)
def test_the_facts_agree_with_the_coefficients(reset):
    """``a`` in {0, 1}; ``b`` float64 (H,); ``db/drho = -1`` exactly where the reset takes
    ``rho`` (the backward's ``du/drho = -s``; other resets are called with ``rho=None``);
    ``b`` reads ``u_reset`` iff the reset takes it (declared but unread, a ``u_reset`` would be
    accepted and ignored; read but undeclared, it could never be set). Dyadic values:
    differences are exact."""
    rule = RESETS[reset]
    H = 3
    cfg = NeuronConfig(reset=reset, theta=1.5, u_reset=0.0)
    rho = np.array([0.0, 0.25, 1.0]) if rule.param == "rho" else None  # (H,)
    a, b = reset_coefficients(cfg, rho, H)
    assert a in (0.0, 1.0) and isinstance(a, float), a
    assert isinstance(b, np.ndarray) and b.dtype == np.float64 and b.shape == (H,)
    if rule.param == "rho":
        _, b2 = reset_coefficients(cfg, rho + 0.5, H)
        np.testing.assert_array_equal(b2 - b, -0.5)
    moved = cfg.replace()
    object.__setattr__(moved, "u_reset", 0.5)  # past validation: does b read u_reset?
    reads = not np.array_equal(reset_coefficients(moved, rho, H)[1], b)
    assert reads == rule.u_reset, f"{reset}: b reads u_reset: {reads}, declared {rule.u_reset}"


# ---- forward, PMBC, backward, float32 -------------------------------------------------------


@pytest.mark.parametrize("reset", ALL)
@settings(max_examples=10)
@given(data=st.data(), smooth=st.booleans())
def test_the_kernel_equals_the_oracle_loop(reset, data, smooth):
    """Exact: the kernel's ``h (1 - a s) + b s`` and the oracle's literal per-reset formula
    give the same bits for spikes 0/1, and the same products for smooth spikes."""
    x, cfg, rho = data.draw(reset_cases(reset, grad_modes=tuple(neurons.GRAD_MODES)))
    sur = get_surrogate(cfg.surrogate)
    prim = (lambda z: sur.primitive(z, cfg.scale)) if smooth else None  # G, or hard spikes
    want = neuron_trace(x, cfg.tau, cfg.theta, cfg.reset, cfg.u_reset, rho,
                        cfg.refractory_steps, cfg.spike_condition, G=prim)
    for got, ref in zip(neuron_fwd(x, cfg, rho, smooth=smooth), want[:3]):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("reset", ALL)
@settings(max_examples=10)
@given(data=st.data())
def test_pmbc_equals_the_iterative_neuron(reset, data):
    x, cfg, rho = data.draw(reset_cases(reset, max_L=200))
    test_pmbc.check_against_iterative(x, cfg, rho)


def example(reset, rng, state=False):
    """A neuron op call of ``reset`` built from its entry's facts (``bptt``: the VJP is the
    gradient of the smooth forward); ``state``: from a nonzero initial state, ``R = 1``."""
    rule = RESETS[reset]
    cfg = NeuronConfig(reset=reset, tau=0.6, theta=0.8 if rule.theta_positive else -0.3,
                       u_reset=-0.2 if rule.u_reset else 0.0, refractory_steps=int(state),
                       surrogate="sigmoid")
    x = rng.normal(0.5, 0.8, size=(2, 3, 12))  # (B, H, L)
    rho = rho_for(reset, 3, rng)
    st0 = None
    if state:
        st0 = NeuronState(rng.normal(0.2, 0.3, size=(2, 3)), rng.integers(0, 2, size=(2, 3)))
    return Example({"x": x}, {} if rho is None else {"rho": rho}, cfg, st0)


@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("reset", ALL)
def test_the_backward_passes_finite_differences_and_the_dot_product(reset, state):
    """tests/test_ops.py's two gradient checks on the smooth forward (step 1e-5 with one
    Richardson step, rtol 1e-6 of the dot product's scale: see there): every coordinate of
    ``x`` and ``rho`` on a few coordinates, and one random direction of all at once."""
    op, ex = NEURON_OP, example(reset, np.random.default_rng(7), state)
    rng = np.random.default_rng(2)
    outputs = op.smooth(ex.inputs, ex.params, ex.cfg, ex.state).outputs
    cot = contract.random_cotangents(op, outputs, rng)
    f = contract._objective(op, ex, cot)
    grads = contract._gradients(op, ex, cot)
    names = contract.grad_names(op, ex)
    assert names == (["x", "rho"] if RESETS[reset].param == "rho" else ["x"])
    base = {**ex.inputs, **ex.params}
    scale = sum(float(np.sum(np.abs(outputs[k] * cot[k]))) for k in cot) + 1e-3
    for k in names:
        for j in rng.choice(base[k].size, size=3, replace=False):
            e = np.zeros(base[k].shape)
            e.flat[j] = 1.0
            fd = directional_fd(lambda v, k=k: f({k: v}), base[k], e, eps=1e-5)
            assert_close_scalar(float(grads[k].flat[j]), fd, 1e-6, scale, f"{reset}: d{k}[{j}]")
    v = {k: rng.normal(size=base[k].shape) for k in names}
    fd = directional_fd(lambda e: f({k: base[k] + e * v[k] for k in names}), 0.0, 1.0, eps=1e-5)
    vjp = sum(float(np.sum(grads[k] * v[k])) for k in names)
    assert_close_scalar(vjp, fd, 1e-6, scale, f"{reset}: dot product")


@pytest.mark.parametrize("reset", ALL)
def test_the_float32_variant_runs_it(reset):
    """Under ``precision.using("float32")`` on float32-representable arguments: float32
    outputs and gradients within ``SAFETY depth eps32 max|T64|`` of float64 on the same
    values (tests/test_ops.py's bound), spikes equal."""
    op, ex = NEURON_OP, example(reset, np.random.default_rng(11))
    i32, p32 = contract.r32(ex.inputs), contract.r32(ex.params)
    res64 = op.fwd(contract.up(i32), contract.up(p32), ex.cfg)
    with precision.using("float32"):
        res32 = op.fwd(i32, p32, ex.cfg)
    depth = op.depth(contract.up(i32), contract.up(p32), ex.cfg)
    cot = contract.r32(contract.random_cotangents(op, res64.outputs, np.random.default_rng(4)))
    np.testing.assert_array_equal(res32.outputs["s"], res64.outputs["s"])
    g64 = op.vjp(res64.cache, contract.up(cot))
    with precision.using("float32"):
        g32 = op.vjp(res32.cache, cot)
    for k, got, ref in ([(k, res32.outputs[k], res64.outputs[k]) for k in ("h", "u")]
                        + [("d" + k, g32[k], g64[k]) for k in g64]):
        assert got.dtype == np.float32, f"{reset}: {k} is {got.dtype}"
        b = contract.bound(op, contract.EPS32, depth, {}, k, ref)
        err = float(np.max(np.abs(got.astype(np.float64) - ref)))
        assert err <= b, f"{reset}: {k} float32 error {err:.3e} > bound {b:.3e}"


def test_the_op_examples_and_the_equivalence_checks_draw_the_toys():
    """The neuron op's examples iterate the registry (so tests/test_ops.py walks a new reset),
    and ``refimpl equivalence``'s PMBC cases draw every registered reset as its entry declares
    (``u_reset`` and ``rho`` where it takes them)."""
    resets = {ex.cfg.reset for ex in NEURON_OP.examples(np.random.default_rng(0))}
    assert resets >= set(TOYS)
    drawn = {}
    rng = np.random.default_rng(0)
    while set(drawn) < set(RESETS):
        x, cfg, rho = equivalence._neuron_case(rng)
        drawn.setdefault(cfg.reset, (x, cfg, rho))
    for reset, (x, cfg, rho) in drawn.items():
        assert (rho is not None) == (RESETS[reset].param == "rho"), reset
        assert cfg.u_reset == 0.0 or RESETS[reset].u_reset, reset
        neuron_fwd(x, cfg, rho=rho)  # a valid case


# ---- golden cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("suite", ["neuron", "pmbc"])
def test_the_golden_suites_append_the_toy_cases_after_the_committed_ones(suite):
    committed = G.read_golden(G.DEFAULT_DIR / f"{suite}.h5")
    specs = suite_specs(suite, int(committed.attrs.get("seed", 0)),
                        committed.attrs.get("size", "small"))
    n = len(committed.cases)
    assert [cid for cid, _ in specs[:n]] == sorted(committed.cases)
    for cid, spec in specs[:n]:  # the committed definitions, unchanged by the toys
        case = committed.cases[cid]
        assert (spec.comment, spec.config["reset"]) == (case.comment, case.config["reset"])
        for k, v in spec.inputs.items():
            np.testing.assert_array_equal(v, case.data["inputs/" + k], err_msg=f"{cid} {k}")
    assert {c.config["reset"] for c in committed.cases.values()} == set(V1_RESETS)
    appended = [spec.config["reset"] for _, spec in specs[n:]]
    assert appended == [r for r in TOYS for _ in range(5)]
    for (cid, spec) in specs[n:]:
        assert ("rho" in spec.params) == (RESETS[spec.config["reset"]].param == "rho"), cid


def toy_cases(suite):
    """The toys' cases of ``suite`` exactly as ``refimpl golden generate`` writes them."""
    specs = suite_specs(suite)
    return [build_case(get_suite(suite), cid, spec, 0) for cid, spec in specs
            if spec.config["reset"] in TOYS]


@pytest.mark.parametrize("suite", ["neuron", "pmbc"])
def test_refimpl_generates_the_toy_cases_and_its_own_results_verify(suite, tmp_path):
    cases = toy_cases(suite)
    assert len(cases) == 5 * len(TOYS)
    assert any("stateful" in c.flags for c in cases)
    assert all(c.result in ("valid", "acceptable") for c in cases)
    for c in cases:  # the cases hold what the toy computes: u follows the literal formula
        d = c.data
        rho = d.get("params/rho", 0.0)
        u = reference.RESETS[c.config["reset"]](d["outputs/h"], d["outputs/s"],
                                                c.config["theta"], c.config["u_reset"],
                                                np.asarray(rho)[..., None])
        np.testing.assert_array_equal(d["outputs/u"], u, err_msg=f"{suite} {c.id}")
    G.write_file(tmp_path / f"{suite}.h5", suite, cases, attrs={"seed": 0, "size": "small"})
    golden = G.read_golden(tmp_path / f"{suite}.h5")
    for planted, passed in ((1.0, True), (1.001, False)):
        cand = []
        for gcase in golden.cases.values():
            c = G.recompute(suite, gcase)
            c.data["outputs/u"] = c.data["outputs/u"] * planted
            cand.append(c)
        path = tmp_path / f"cand-{planted}.h5"
        G.write_file(path, suite, cand, overwrite=True, schema=G.CANDIDATE_SCHEMA)
        report = G.verify_file(path, golden_dir=tmp_path)
        assert report["passed"] is passed, report["summary"]


# ---- the spec and the oracle of the real resets ---------------------------------------------


def test_every_real_reset_has_its_spec_rows_and_its_oracle():
    """The recipe's other steps, for every reset the library registers: a row in the module
    docstring's table, a row in DESIGN.md section 4's table (when the spec is present) and the
    literal formula in the oracle's table."""
    real = [r for r in RESETS if r not in TOYS]
    assert real[:len(V1_RESETS)] == list(V1_RESETS)
    rows = set(re.findall(r"^\| ``(\w+)`` \|", neurons.__doc__, flags=re.M))
    assert rows == set(real), "refimpl/neurons.py's docstring table"
    assert set(reference.RESETS) == set(RESETS), "refimpl/reference.py's RESETS"
    if DESIGN.exists():
        text = DESIGN.read_text()
        section = text[text.index("## 4."):text.index("### Surrogate gradients")]
        assert set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M)) == set(real), "DESIGN.md"
