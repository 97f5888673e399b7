"""The activation families' settings against the spec (issue 11: no test checked their values).

The expected values below are written from the spec, DESIGN.md section 8 as restated in the
table of :mod:`refimpl.activations`' docstring (the papers' settings), **not** copied from the
code:

| family | activation | mixing | neuron |
|---|---|---|---|
| gelu | exact GELU | GLU | none |
| binary | Heaviside Theta(y) (Binary S4D) | GLU | reset none, tau 0, theta 0, atan |
| binary_gsu | none: GSU ternarises y | GSU | none |
| lif | hard-reset LIF (SpikingSSM) | GLU | hard, tau 0.125, theta 1, triangle, y/exp(ln_vth) |
| sdn | SDN neuron (SpikingSSM) | GLU | theta 1, triangle, y/exp(ln_vth) |
| refractory | reset-refractory (SPikE-SSM) | GLU | refractory, tau 0.5, theta 1, triangle,
|            |                               |     | rho >= 0 trainable (init 0.5), y/exp(ln_vth) |

The SDN family's reset and tau are those of the LIF neuron the published SDN was trained to
predict (SpikingSSM: hard reset, tau 0.125; the shared weight file is ``..._tau0125.npz``).
Each value is checked where the model actually reads it: ``ModelConfig.neuron_config()``, the
family's ``mixing`` / ``threshold`` and the parameters :func:`refimpl.model.init_model` creates.
"""
import numpy as np
import pytest

from refimpl import model as M
from refimpl.activations import ACTIVATIONS

# name: (mixing, learnable threshold, neuron fields or None, per-layer extra parameters)
SPEC = {
    "gelu": ("glu", False, None, {}),
    "binary": ("glu", False, dict(reset="none", tau=0.0, theta=0.0, surrogate="atan"), {}),
    "binary_gsu": ("gsu", False, None, {}),
    "lif": ("glu", True, dict(reset="hard", tau=0.125, theta=1.0, surrogate="triangle"), {}),
    "sdn": ("glu", True, dict(reset="hard", tau=0.125, theta=1.0, surrogate="triangle"), {}),
    "refractory": ("glu", True, dict(reset="refractory", tau=0.5, theta=1.0,
                                     surrogate="triangle"), {"rho": 0.5}),
}


def sdn_weights():
    rng = np.random.default_rng(0)
    return {"w0": rng.normal(0, 0.3, (8, 1, 8)), "w1": rng.normal(0, 0.1, 8),
            "w2": rng.normal(0, 0.3, (8, 8, 1)), "w3": rng.normal(0, 0.1, 8),
            "w4": rng.normal(0, 0.3, (1, 8, 1)), "w5": rng.normal(0, 0.1, 1)}


def test_the_spec_covers_every_registered_family():
    assert set(SPEC) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(SPEC))
def test_family_settings_are_the_spec(name):
    mixing, threshold, neuron, extra = SPEC[name]
    fam = ACTIVATIONS[name]
    assert fam.mixing == mixing
    assert fam.threshold is threshold
    cfg = M.ModelConfig(n_classes=2, d_input=1, d_model=4, d_state=4, n_layers=1,
                        activation=name)
    ncfg = cfg.neuron_config()
    if neuron is None:
        assert ncfg is None
    else:
        got = {k: getattr(ncfg, k) for k in neuron}
        assert got == neuron
        assert ncfg.u_reset == 0.0 and ncfg.refractory_steps == 0  # nothing else changed
        assert ncfg.spike_condition == "ge" and ncfg.grad_mode == "bptt"
    p, _ = M.init_model(cfg, 0, sdn_weights=sdn_weights() if name == "sdn" else None)
    assert ("layers.0.ln_vth" in p) is threshold
    if threshold:
        np.testing.assert_array_equal(p["layers.0.ln_vth"], np.zeros(4))  # exp(0) = theta
    layer = {k.split(".", 2)[2] for k in p if k.startswith("layers.0.")}
    for k, v in extra.items():
        np.testing.assert_array_equal(p["layers.0." + k], np.full(4, v))
    assert ("rho" in layer) == ("rho" in extra)
    assert ("mix.c" in layer) == (mixing == "gsu")  # the GSU's gate vector


@pytest.mark.parametrize("name", [n for n in sorted(SPEC) if SPEC[n][2] is not None])
def test_model_surrogate_overrides_only_the_surrogate(name):
    cfg = M.ModelConfig(n_classes=2, activation=name, surrogate="sigmoid", grad_mode="sltt")
    ncfg = cfg.neuron_config()
    want = {**SPEC[name][2], "surrogate": "sigmoid"}
    assert {k: getattr(ncfg, k) for k in want} == want and ncfg.grad_mode == "sltt"


def test_refractory_rho_is_projected_to_nonnegative():
    rho = np.array([-0.5, 0.0, 0.25])
    ACTIVATIONS["refractory"].project({"rho": rho})
    np.testing.assert_array_equal(rho, [0.0, 0.0, 0.25])
