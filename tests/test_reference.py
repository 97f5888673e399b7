"""refimpl.reference, the standalone NumPy statement of the block, equals the fast path.

Tolerances.

- Neuron: :func:`refimpl.reference.neuron` and :func:`refimpl.neurons.neuron_fwd` perform the
  same floating-point operations in the same order: compared exactly.
- SDN: the reference sums each layer with BLAS matmuls, the kernel term by term; both add at
  most 8 products per sum, so they agree to ``64 eps S`` with ``S = sdn_predict(|x|, |w|)``,
  the same network on magnitudes (relu is the identity on non-negative numbers, so ``S`` is
  exactly the sum of the magnitudes of every term).
- Block: the model convolves with FFTs, the reference with direct sums; both compute the same
  real numbers and differ by rounding, ``|dy| <= 1e3 eps S_y`` (the bound of
  ``tests/test_ssm_forms.py``, ``S_y`` the sum of magnitudes, O(10) here, so about 2e-12). Past
  the S4D layer everything is Lipschitz with O(1) constants at these sizes (H = 4, mixing weights
  ~ U(-1/2, 1/2), norms of O(1)-spread tokens), so outputs agree to about 1e-12 (measured: below
  1e-14); we compare with ``atol = BLOCK_ATOL = 1e-10``. A formula error moves outputs by
  O(0.01 - 1). Spikes can flip only where the membrane is within rounding of the threshold, so
  cases are drawn (deterministically, by seed) with every threshold margin above
  ``MARGIN = 1e-9``, 500 times the rounding bound; the block's firing rate must then equal the
  reference's exactly.
"""
import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refimpl.reference as R
from refimpl import layers as Ly
from refimpl.model import ModelConfig, block_fwd, init_model
from refimpl.neurons import NeuronConfig, neuron_fwd
from refimpl.sdn import sdn_forward
from strategies_neurons import neuron_configs, neuron_inputs

EPS = np.finfo(np.float64).eps
BLOCK_ATOL = 1e-10
MARGIN = 1e-9
PUBLISHED = (Path(__file__).resolve().parents[2] / "shared" / "external"
             / "sdn_spikingssm_tau0125.npz")  # reference data, not part of the project


def test_reference_is_standalone():
    """The module docstring's claim: NumPy and the standard library only."""
    tree = ast.parse(Path(R.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert names <= {"math", "typing", "numpy"}, names


# --------------------------------------------------------------------------------------------
# Neuron: exact
# --------------------------------------------------------------------------------------------


def _reference_neuron(x, cfg, rho):
    return R.neuron(x, cfg.tau, cfg.theta, cfg.reset, cfg.u_reset, rho, cfg.refractory_steps,
                    cfg.spike_condition)


@settings(max_examples=15)
@given(data=st.data())
def test_neuron_equals_kernel_exactly(data):
    cfg = data.draw(neuron_configs())
    x, rho = data.draw(neuron_inputs(cfg))
    for a, b in zip(neuron_fwd(x, cfg, rho), _reference_neuron(x, cfg, rho)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reset", ["hard", "soft", "refractory", "none"])
@pytest.mark.parametrize("cond", ["ge", "gt"])
def test_neuron_equals_kernel_with_ties_and_refractory_period(reset, cond):
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(0.6, 1.0, size=(2, 3, 70)) * 4) / 4  # (B, H, L), dyadic: h == theta
    cfg = NeuronConfig(reset=reset, tau=0.5, refractory_steps=2, spike_condition=cond,
                       u_reset=-0.25 if reset == "hard" else 0.0)
    rho = np.array([0.0, 0.25, 1.0]) if reset == "refractory" else None
    out = _reference_neuron(x, cfg, rho)
    assert np.any(out[1] == cfg.theta)  # ties happened
    for a, b in zip(neuron_fwd(x, cfg, rho), out):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# SDN: to rounding
# --------------------------------------------------------------------------------------------


def random_sdn_weights(rng):
    """Fused weights in the published layout, scaled so that both relus are active."""
    return {"w0": rng.normal(0, 0.4, (8, 1, 8)), "w1": rng.normal(0, 0.2, 8),
            "w2": rng.normal(0, 0.3, (8, 8, 1)), "w3": rng.normal(0, 0.2, 8),
            "w4": rng.normal(0, 0.3, (1, 8, 1)), "w5": rng.normal(0, 0.1, 1)}


def _sdn_weight_sets():
    sets = [("random", random_sdn_weights(np.random.default_rng(2)))]
    if PUBLISHED.exists():
        sets.append(("published", {k: v.astype(np.float64) for k, v in np.load(PUBLISHED).items()}))
    return sets


@pytest.mark.parametrize("shape", [(1,), (9,), (3, 8), (2, 3, 50)])
@pytest.mark.parametrize("which, w", _sdn_weight_sets())
def test_sdn_predict_equals_kernel(which, w, shape):
    x = np.random.default_rng(3).normal(size=shape)
    m_ref = R.sdn_predict(x, w)
    m, s = sdn_forward(x, w)
    assert m_ref.shape == shape
    S = R.sdn_predict(np.abs(x), {k: np.abs(v) for k, v in w.items()})  # sum of magnitudes
    np.testing.assert_array_less(np.abs(m - m_ref), 64 * EPS * S + 1e-300)
    s_ref, _ = R.sdn_neuron(x, w)
    keep = np.abs(m_ref + x - 1.0) > 1e3 * EPS * (S + np.abs(x) + 1)
    np.testing.assert_array_equal(s[keep], s_ref[keep])
    assert 0 < s_ref.mean() < 1 or x.size < 10


def test_sdn_predict_is_strictly_causal():
    w = random_sdn_weights(np.random.default_rng(4))
    x = np.random.default_rng(5).normal(size=30)
    m = R.sdn_predict(x, w)
    for t in (0, 7, 29):
        x2 = x.copy()
        x2[t] += 1.0
        m2 = R.sdn_predict(x2, w)
        np.testing.assert_array_equal(m2[:t + 1], m[:t + 1])  # m[t] never sees x[t]
        assert np.any(m2[t + 1:t + 9] != m[t + 1:t + 9]) or t == 29


# --------------------------------------------------------------------------------------------
# Mixing and normalisation: the layers the block is built from
# --------------------------------------------------------------------------------------------


def test_mixing_and_norm_layers_equal_refimpl_layers():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, 7))  # (B, H, L)
    W2, b2 = rng.normal(size=(10, 5)), rng.normal(size=10)
    W, b, c = rng.normal(size=(5, 5)), rng.normal(size=5), rng.normal(size=5)
    g, be = rng.normal(1, 0.2, 5), rng.normal(size=5)
    rm, rv = rng.normal(size=5), rng.uniform(0.5, 2, 5)
    tol = dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(R.gelu(x), Ly.gelu_fwd(x)[0], **tol)
    np.testing.assert_allclose(R.glu(x, W2, b2), Ly.glu_fwd(x, W2, b2)[0], **tol)
    np.testing.assert_allclose(R.gsu(x, W, b, c), Ly.gsu_fwd(x, W, b, c)[0], **tol)
    np.testing.assert_allclose(R.layernorm(x, g, be), Ly.layernorm_fwd(x, g, be)[0], **tol)
    for training in (False, True):
        y_ref, stats_ref = R.batchnorm(x, g, be, rm, rv, training)
        y, _, stats = Ly.batchnorm_fwd(x, g, be, rm, rv, training)
        np.testing.assert_allclose(y_ref, y, **tol)
        np.testing.assert_allclose(stats_ref, stats, **tol)


# --------------------------------------------------------------------------------------------
# The block: reference block_forward == refimpl.model.block_fwd
# --------------------------------------------------------------------------------------------

FAMILY_NAMES = list(R.FAMILIES)


def _margin(fam, tr):
    """Smallest distance of a spike or ternary decision to its threshold."""
    spec = R.FAMILIES[fam]
    if spec["activation"] == "neuron":
        return float(np.abs(tr["h"] - spec["theta"]).min())
    if spec["activation"] == "sdn":
        return float(np.abs(tr["m"] + tr["y"] - spec["theta"]).min())
    if spec["mixing"] == "gsu":
        a = np.abs(tr["y"])  # (B, H, L)
        return float(np.abs(a - 0.15 * a.max(axis=1, keepdims=True)).min())
    return np.inf


def _active(tr):
    """Some spikes and some silence (GSU: some zero and some nonzero ternary values)."""
    v = tr["s"] if tr["s"] is not None else R.ternary(tr["y"], axis=1)
    return 0 < np.abs(v).mean() < 1


def block_case(activation, norm="layer", prenorm=False, bidirectional=False, seed=0, L=24,
               Bsz=2, H=4, training=False, active=True, **cfg_kw):
    """``(cfg, p, buf, x, layer_params, config)`` with every block parameter moved off its
    initial value, re-drawn (by seed) until every threshold margin exceeds :data:`MARGIN` and,
    with ``active``, the spikes are neither all 0 nor all 1."""
    cfg = ModelConfig(n_classes=2, d_model=H, d_state=4, n_layers=1, activation=activation,
                      norm=norm, prenorm=prenorm, bidirectional=bidirectional, **cfg_kw)
    config = dict(dataclasses.asdict(cfg), training=training)
    for s in range(seed * 100, seed * 100 + 100):
        rng = np.random.default_rng(s)
        sdn_w = random_sdn_weights(rng) if activation == "sdn" else None
        p, buf = init_model(cfg, seed=s, sdn_weights=sdn_w)
        pre = "layers.0."
        moves = {"norm.gamma": lambda v: v + rng.normal(0, 0.2, v.shape),
                 "norm.beta": lambda v: v + rng.normal(0, 0.2, v.shape),
                 "ln_vth": lambda v: v + rng.uniform(-0.5, 0.5, v.shape),
                 "rho": lambda v: rng.uniform(0.0, 1.0, v.shape),
                 "mix.b": lambda v: v + rng.normal(0, 0.2, v.shape),
                 "mix.c": lambda v: v + rng.normal(0, 0.5, v.shape),
                 "norm.running_mean": lambda v: rng.normal(0, 0.3, v.shape),
                 "norm.running_var": lambda v: rng.uniform(0.5, 2.0, v.shape)}
        for d in (p, buf):
            for k, f in moves.items():
                if pre + k in d:
                    d[pre + k] = f(d[pre + k])
        x = rng.normal(0.3, 1.0, size=(Bsz, H, L))  # (B, H, L)
        layer = {k[len(pre):]: v for d in (p, buf) for k, v in d.items() if k.startswith(pre)}
        layer.update({k: v for k, v in buf.items() if k.startswith("sdn.")})
        tr = R.block_trace(x, layer, config)
        if _margin(activation, tr) > MARGIN and (not active or _active(tr)):
            return cfg, p, buf, x, layer, config
    raise AssertionError("no case with every margin above MARGIN (and active spikes)")


def check_block(activation, **kw):
    cfg, p, buf, x, layer, config = block_case(activation, **kw)
    tr = R.block_trace(x, layer, config)
    new_buf = {}
    out, _, stats = block_fwd(cfg, p, buf, 0, x, config["training"], None, new_buf=new_buf)
    assert tr["out"].shape == x.shape
    np.testing.assert_allclose(out, tr["out"], rtol=0, atol=BLOCK_ATOL)
    if tr["s"] is not None and R.FAMILIES[activation]["activation"] != "gelu":
        assert stats["rate"] == tr["s"].mean()  # the same spikes
    if config["norm"] == "batch" and config["training"]:
        np.testing.assert_allclose(new_buf["layers.0.norm.running_mean"],
                                   tr["running_stats"][0], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(new_buf["layers.0.norm.running_var"],
                                   tr["running_stats"][1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("activation", FAMILY_NAMES)
def test_block_equals_model(activation, norm, prenorm, bidirectional):
    check_block(activation, norm=norm, prenorm=prenorm, bidirectional=bidirectional)


@pytest.mark.parametrize("activation, kw", [
    ("refractory", dict(neuron_impl="iterative")),
    ("lif", dict(disc="bilinear")),
    ("lif", dict(norm="batch", training=True)),
    ("binary_gsu", dict(norm="batch", prenorm=True, training=True)),
])
def test_block_equals_model_other_options(activation, kw):
    """The iterative neuron in place of PMBC, bilinear discretization, BatchNorm in training
    mode (batch statistics and the new running statistics; dropout stays 0)."""
    check_block(activation, **kw)


@settings(max_examples=10)
@given(activation=st.sampled_from(FAMILY_NAMES), norm=st.sampled_from(["layer", "batch"]),
       prenorm=st.booleans(), bidirectional=st.booleans(), L=st.integers(1, 40),
       Bsz=st.integers(1, 3), H=st.integers(1, 5), seed=st.integers(1, 10**6))
def test_block_equals_model_any_shape(activation, norm, prenorm, bidirectional, L, Bsz, H, seed):
    cfg, p, buf, x, layer, config = block_case(activation, norm, prenorm, bidirectional, seed,
                                               L=L, Bsz=Bsz, H=H, active=False)
    out, _, _ = block_fwd(cfg, p, buf, 0, x, False, None, new_buf={})
    np.testing.assert_allclose(out, R.block_forward(x, layer, config), rtol=0, atol=BLOCK_ATOL)
