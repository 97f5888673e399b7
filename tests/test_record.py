"""The record option (issue 15): ``model_fwd(..., record=True)`` and the model stream's records.

Shown for every activation family, on models whose neurons fire and stay silent in places:

- recording changes nothing: the logits are bitwise those of the plain forward;
- each layer's record holds exactly the names of ``RECORD_NAMES``, as ``(B, H, L)`` arrays;
- the records are the values the forward used: the spikes are the arrays the backward reads
  (compared exactly with the cache), each spike is the spike test of the recorded membrane
  against ``spike_threshold`` (``h >= theta``; sdn ``m + x >= theta`` with ``m+x == m + v``),
  the recorded ``v`` is the recorded ``y`` after the threshold scaling, a layer's recorded
  output is the block applied to the recorded spikes (its input being the previous layer's
  recorded output), and the last output is the features the decoder read;
- a record is a copy: writing to it changes neither the cache nor the gradient;
- the model stream records the same names, and its parallel form the same values exactly.
"""
import numpy as np
import pytest

from refimpl import layers as Ly
from refimpl.activations import ACTIVATIONS
from refimpl.model import (RECORD_NAMES, ModelConfig, _block_out, embed_fwd, init_model, model_bwd,
                           model_fwd, spike_threshold)
from refimpl.stream import ModelStream

from test_model import sdn_weights  # small fixed SDN weights (a valid fused network)

FAMILIES = sorted(ACTIVATIONS)


def setup(activation, seed=0, **kw):
    cfg = ModelConfig(n_classes=3, d_input=2, d_model=6, d_state=4, n_layers=2,
                      activation=activation, **kw)
    p, buf = init_model(cfg, seed=seed, sdn_weights=sdn_weights() if activation == "sdn" else None)
    rng = np.random.default_rng(seed + 2)
    for k in p:  # thresholds and refractory offsets away from their initial constants
        if k.endswith("ln_vth"):
            p[k] = rng.normal(-0.5, 0.3, size=p[k].shape)
        elif k.endswith(".rho"):
            p[k] = rng.uniform(0.2, 1.0, size=p[k].shape)
    x = np.random.default_rng(seed + 1).normal(0.0, 3.0, size=(2, 30, 2))
    return cfg, p, buf, x


def test_every_family_has_its_names():
    assert set(RECORD_NAMES) == set(ACTIVATIONS)


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("activation", FAMILIES)
def test_record_is_what_the_forward_used(activation, norm):
    cfg, p, buf, x = setup(activation, norm=norm)
    plain = model_fwd(cfg, p, buf, x)[0]
    logits, cache, _, stats = model_fwd(cfg, p, buf, x, record=True)
    np.testing.assert_array_equal(logits, plain)  # recording computes nothing else
    rec = stats["record"]
    assert len(rec) == cfg.n_layers
    theta = spike_threshold(cfg)
    h_in = embed_fwd(cfg, p, x)[0]
    fired = 0
    for i, (r, c) in enumerate(zip(rec, cache.blocks)):
        assert set(r) == set(RECORD_NAMES[activation]), sorted(r)
        assert all(a.shape == (2, cfg.d_model, 30) for a in r.values())
        pre = f"layers.{i}."
        vth = np.exp(p[pre + "ln_vth"])[:, None] if ACTIVATIONS[activation].threshold else 1.0
        np.testing.assert_array_equal(r["v"], r["y"] / vth)
        if "s" in r:
            np.testing.assert_array_equal(r["s"], c.act.s)  # what the backward reads
            membrane = r["h"] if "h" in r else r["m+x"]
            np.testing.assert_array_equal(r["s"], (membrane >= theta).astype(r["s"].dtype))
            fired += int(r["s"].sum())
        if "u" in r:  # DESIGN.md 4: h_t = tau u_{t-1} + x_t, u_t = reset(h_t, s_t)
            ncfg = cfg.neuron_config()
            jump = {"hard": r["h"], "soft": ncfg.theta, "none": 0.0,
                    "refractory": ncfg.theta + p.get(pre + "rho", np.zeros(1))[:, None]}
            u = r["h"] - jump[ncfg.reset] * r["s"]
            # PMBC (refractory) reaches h, u by its own closed form: they agree with the
            # recursion to rounding, a few eps of the membranes' O(1-10) scale; 1e-12 is
            # ~4500 eps, and a wrong tensor (h for u, a missing tau) is off by O(0.1-1)
            scale = 1e-12 * max(1.0, float(np.abs(r["h"]).max()))
            np.testing.assert_allclose(r["u"], u, rtol=0, atol=scale)
            h = ncfg.tau * r["u"][..., :-1] + r["v"][..., 1:]
            np.testing.assert_allclose(r["h"][..., 1:], h, rtol=0, atol=scale)
            np.testing.assert_allclose(r["h"][..., 0], r["v"][..., 0], rtol=0, atol=scale)
        if "m+x" in r:
            np.testing.assert_array_equal(r["m+x"], r["m"] + r["v"])
        if "Tx" in r:
            np.testing.assert_array_equal(r["Tx"], c.mix.Tx)
            assert set(np.unique(r["Tx"])) <= {-1.0, 0.0, 1.0}
        s = Ly.gelu_fwd(r["v"])[0] if activation == "gelu" else r.get("s")
        out, _ = _block_out(cfg, p, buf, pre, h_in, s, r["v"], False, None, new_buf={})
        np.testing.assert_array_equal(r["out"], out)
        h_in = r["out"]
    np.testing.assert_array_equal(rec[-1]["out"], stats["features"])
    if ACTIVATIONS[activation].neuron and activation != "binary_gsu":
        assert 0 < fired < rec[0]["s"].size * cfg.n_layers, "the case should fire and rest"


@pytest.mark.parametrize("activation", ["lif", "binary_gsu"])
def test_a_record_is_a_copy(activation):
    cfg, p, buf, x = setup(activation)
    logits, cache, _, stats = model_fwd(cfg, p, buf, x, record=True)
    dlogits = np.random.default_rng(5).normal(size=logits.shape)
    before = model_bwd(cfg, p, cache, dlogits)
    for r in stats["record"]:
        for a in r.values():
            a[...] = 7.0
    after = model_bwd(cfg, p, cache, dlogits)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


@pytest.mark.parametrize("activation", FAMILIES)
def test_stream_records_the_same_names_and_the_parallel_form_the_same_values(activation):
    cfg, p, buf, x = setup(activation)
    stream = ModelStream(cfg, p, buf)
    _, _, _, stats = model_fwd(cfg, p, buf, x, record=True)
    _, par = stream.parallel(x, record=True)
    _, chunked = stream.run(x, chunks=[7, 23], record=True)
    for r, rp, rc in zip(stats["record"], par, chunked):
        assert set(rc) == set(r) == set(rp) - {"norm_gain"}
        for k in r:
            np.testing.assert_array_equal(rp[k], r[k])  # the same blocks in eval mode
