"""Whole-model tests: end-to-end gradient checks for every activation family, determinism,
bit-exact resume, PMBC = iterative inside a model, and learning on small tasks.

Gradient checks run the *smooth* forward for spiking families (the surrogate primitive in
place of the Heaviside; its derivative is exactly the hand-written backward in ``bptt``
mode) and, for the SDN family, hold the SDN's prediction fixed (it is a constant in the
backward by definition). Finite differences: central with a Richardson step at eps = 1e-4;
the loss is O(1), so rounding contributes ~1e-12 to a directional derivative; we require
``|fd - analytic| <= 1e-7 max(|fd|, 1e-2)``, far below the size of any real error.
"""
import dataclasses
import os

import numpy as np
import pytest

from refimpl import model as M
from refimpl.progress import EpochEnd
from refimpl.tasks import make_task
from refimpl.train import TrainConfig, load_checkpoint, train

from gradcheck import assert_close_scalar, assert_every_parameter, directional_fd

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "external",
                      "sdn_spikingssm_tau0125.npz")


def sdn_weights():
    """Small fixed SDN weights (a valid fused network; values need not be trained)."""
    rng = np.random.default_rng(42)
    return {"w0": rng.normal(0, 0.3, (8, 1, 8)), "w1": rng.normal(0, 0.1, 8),
            "w2": rng.normal(0, 0.3, (8, 8, 1)), "w3": rng.normal(0, 0.1, 8),
            "w4": rng.normal(0, 0.3, (1, 8, 1)), "w5": rng.normal(0, 0.1, 1)}


CASES = [
    dict(activation="gelu"),
    dict(activation="gelu", norm="batch", prenorm=True, bidirectional=True),
    dict(activation="binary"),
    dict(activation="binary_gsu"),
    dict(activation="binary_gsu", norm="batch", vocab=7),
    dict(activation="lif"),
    dict(activation="lif", prenorm=True, bidirectional=True, surrogate="sigmoid"),
    dict(activation="sdn"),
    dict(activation="refractory"),
    dict(activation="refractory", norm="batch", surrogate="atan", dropout=0.3),
]


def small_model(**kw):
    cfg = M.ModelConfig(**{**dict(n_classes=3, d_input=2, d_model=4, d_state=4, n_layers=2), **kw})
    p, buf = M.init_model(cfg, 0, sdn_weights=sdn_weights() if cfg.activation == "sdn" else None)
    rng = np.random.default_rng(1)
    # spread the SSM output around the threshold so the smooth surrogates are exercised
    for k in p:
        if k.endswith("ssm.C_re") or k.endswith("ssm.C_im"):
            p[k] = p[k] * 3
    x = rng.integers(0, 7, size=(3, 12)) if cfg.vocab else rng.normal(size=(3, 12, 2))
    return cfg, p, buf, x, np.array([0, 2, 1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_model_gradient_every_parameter(case):
    cfg, p, buf, x, y = small_model(**case)
    frozen = M.frozen_constants(cfg, p, buf, x, rng=np.random.default_rng(5))

    def loss(q):
        return M.loss_and_grads(cfg, q, buf, x, y, training=True, rng=np.random.default_rng(5),
                                smooth=True, frozen=frozen)

    _, _, g, _, _ = loss(p)
    assert set(g) == set(p)
    assert_every_parameter(lambda q: loss(q)[0], p, g)


@pytest.mark.parametrize("activation", ["gelu", "binary_gsu", "lif", "refractory"])
def test_model_dot_product_random_cotangent(activation):
    """Random cotangent c on the logits and random direction v over *all* parameters at once:
    ``<J v, c> == <v, J^T c>`` with ``J v`` by finite differences of the smooth forward."""
    cfg, p, buf, x, y = small_model(activation=activation, norm="batch")
    frozen = M.frozen_constants(cfg, p, buf, x)
    rng = np.random.default_rng(8)
    c = rng.normal(size=(x.shape[0], cfg.n_classes))
    _, cache, _, _ = M.model_fwd(cfg, p, buf, x, training=True, smooth=True, frozen=frozen)
    g = M.model_bwd(cfg, p, cache, c)
    v = {k: rng.normal(size=val.shape) for k, val in p.items()}

    def f(e):
        q = {k: p[k] + e * v[k] for k in p}
        y = M.model_fwd(cfg, q, buf, x, training=True, smooth=True, frozen=frozen)[0]
        return float((y * c).sum())

    jv = directional_fd(lambda e: f(float(e)), np.array(0.0), np.array(1.0), 1e-4)
    vjp = sum(float((g[k] * v[k]).sum()) for k in p)
    assert_close_scalar(vjp, float(jv), 1e-7, 1e-2, "dot product")


def test_refractory_pmbc_equals_iterative_in_a_model():
    cfg, p, buf, x, y = small_model(activation="refractory")
    it = dataclasses.replace(cfg, neuron_impl="iterative")
    la, lg_a, ga, _, sa = M.loss_and_grads(cfg, p, buf, x, y, training=False)
    lb, lg_b, gb, _, sb = M.loss_and_grads(it, p, buf, x, y, training=False)
    assert sa["rates"] == sb["rates"]
    np.testing.assert_allclose(lg_a, lg_b, rtol=1e-12, atol=1e-12)
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-10, atol=1e-12, err_msg=k)


def tiny_task(name="adding", n=96, L=24, seed=0):
    return make_task(name, n=n, L=L, seed=seed)


def model_for(data, **kw):
    return M.ModelConfig.for_data(data, **{**dict(d_model=8, d_state=4, n_layers=1), **kw})


def test_same_seed_same_numbers(tmp_path):
    data = tiny_task()
    cfg = model_for(data, activation="lif", dropout=0.1)
    tcfg = TrainConfig(epochs=2, batch_size=32, seed=3)
    m1 = train(cfg, tcfg, data, str(tmp_path / "a"))
    m2 = train(cfg, tcfg, data, str(tmp_path / "b"))
    assert m1 == m2
    p1 = load_checkpoint(str(tmp_path / "a" / "checkpoint.h5")).params
    p2 = load_checkpoint(str(tmp_path / "b" / "checkpoint.h5")).params
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    m3 = train(cfg, dataclasses.replace(tcfg, seed=4), data, str(tmp_path / "c"))
    assert m3 != m1


class Interrupt(Exception):
    pass


def interrupt_after_first_epoch(ev):
    if isinstance(ev, EpochEnd):
        raise Interrupt  # like Ctrl-C right after the epoch's checkpoint was written


@pytest.mark.parametrize("activation", ["lif", "binary_gsu"])
def test_resume_is_bit_exact(tmp_path, activation):
    data = tiny_task()
    cfg = model_for(data, activation=activation, dropout=0.1, norm="batch")
    tcfg = TrainConfig(epochs=3, batch_size=32, seed=1)
    full = train(cfg, tcfg, data, str(tmp_path / "full"))
    with pytest.raises(Interrupt):
        train(cfg, tcfg, data, str(tmp_path / "part"), progress=interrupt_after_first_epoch)
    assert load_checkpoint(str(tmp_path / "part" / "checkpoint.h5")).epoch == 1
    resumed = train(cfg, tcfg, data, str(tmp_path / "part"), resume=True)
    assert resumed == full
    a = load_checkpoint(str(tmp_path / "full" / "checkpoint.h5"))
    b = load_checkpoint(str(tmp_path / "part" / "checkpoint.h5"))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    for k in a.buffers:
        np.testing.assert_array_equal(a.buffers[k], b.buffers[k])


FAMILY_TASKS = {"gelu": "adding", "binary": "adding", "binary_gsu": "adding", "lif": "adding",
                "sdn": "adding", "refractory": "adding"}


@pytest.mark.parametrize("activation", sorted(FAMILY_TASKS))
def test_each_family_learns(tmp_path, activation):
    """Training loss on the training set drops clearly within a few epochs (small task)."""
    from refimpl.train import evaluate

    data = make_task(FAMILY_TASKS[activation], n=160, L=20, seed=0)
    cfg = model_for(data, activation=activation, d_model=16)
    w = sdn_weights() if activation == "sdn" else None
    p0, b0 = M.init_model(cfg, 0, sdn_weights=w)
    before = evaluate(cfg, p0, b0, data["x_train"], data["y_train"])["loss"]
    train(cfg, TrainConfig(epochs=6, batch_size=16, lr=1e-2, seed=0), data, str(tmp_path),
          sdn_weights=w)
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.h5"))
    after = evaluate(cfg, ckpt.params, ckpt.buffers, data["x_train"], data["y_train"])["loss"]
    assert after < 0.9 * before, (before, after)


def test_energy_counts():
    cfg = M.ModelConfig(n_classes=2, d_model=8, n_layers=2, activation="lif")
    e = M.energy(cfg, [0.25, 0.5], L=10)
    mac = 10 * 8 * 16
    assert e["mac"] == 0 and e["ac"] == 0.75 * mac
    assert e["energy_pj"] == pytest.approx(0.75 * mac * 0.9)
    assert e["energy_ann_pj"] == pytest.approx(2 * mac * 4.6)


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'relu'; valid names are 'gelu'"):
        M.ModelConfig(n_classes=2, activation="relu")


@pytest.mark.parametrize("dt, match", [
    ({"dt_min": 0.2, "dt_max": 0.1}, r"dt_min must be <= dt_max, got dt_min=0.2, dt_max=0.1"),
    ({"dt_min": 0.0}, r"dt_min must be in \(0.0, inf\]"),
    ({"dt_max": float("nan")}, r"dt_max must be finite"),
])
def test_dt_range_is_checked_by_the_config(dt, match):
    """At construction, not at init_model (the config is what a run records and resumes)."""
    with pytest.raises(ValueError, match=match):
        M.ModelConfig(n_classes=2, **dt)


def test_labels_out_of_range():
    cfg, p, buf, x, y = small_model(activation="gelu")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got range \[0, 3\]"):
        M.loss_and_grads(cfg, p, buf, x, np.array([0, 3, 1]))


def test_every_registered_family_is_checked():
    """The gradient checks above and the reference block cover every registered family."""
    from refimpl import reference as R
    from refimpl.activations import ACTIVATIONS

    assert {c["activation"] for c in CASES} == set(ACTIVATIONS)
    assert set(R.FAMILIES) == set(ACTIVATIONS)


def test_a_new_family_is_one_registry_entry(monkeypatch):
    """A family registered in refimpl.activations (here a soft-reset LIF) is a model
    activation with a correct backward, with no change anywhere else."""
    from refimpl.activations import ACTIVATIONS, LIF

    class SoftLIF(LIF):
        name = "soft_lif"
        neuron = dict(reset="soft", tau=0.5, theta=1.0, surrogate="triangle")

    monkeypatch.setitem(ACTIVATIONS, "soft_lif", SoftLIF())
    cfg, p, buf, x, y = small_model(activation="soft_lif")
    assert cfg.neuron_config().reset == "soft" and "layers.0.ln_vth" in p

    def loss(q):
        return M.loss_and_grads(cfg, q, buf, x, y, training=False, smooth=True)

    _, _, g, _, stats = loss(p)
    assert all(r is not None for r in stats["rates"])
    v = np.random.default_rng(3).normal(size=p["layers.0.ln_vth"].shape)

    def f(val):
        return loss({**p, "layers.0.ln_vth": val})[0]

    fd = directional_fd(f, p["layers.0.ln_vth"], v, 1e-4)
    assert_close_scalar(float((g["layers.0.ln_vth"] * v).sum()), fd, 1e-7, 1e-2, "ln_vth")


def test_registering_a_name_twice_is_refused():
    from refimpl.activations import LIF, register

    with pytest.raises(ValueError, match="activation family 'lif' is registered twice"):
        register(LIF)


def test_energy_counts_non_spiking_layers_as_macs():
    """``None`` rates (non-spiking layers: gelu, binary_gsu) are full MACs, never ACs."""
    L, H = 10, 8
    mac = L * H * 2 * H  # L H 2H per feature-mixing layer
    cfg = M.ModelConfig(n_classes=2, d_model=H, n_layers=2, activation="gelu")
    e = M.energy(cfg, [None, None], L=L)
    assert e["mac"] == 2 * mac and e["ac"] == 0
    assert e["energy_pj"] == pytest.approx(2 * mac * 4.6) == e["energy_ann_pj"]
    mixed = M.ModelConfig(n_classes=2, d_model=H, n_layers=3, activation="lif")
    e = M.energy(mixed, [None, 0.25, None], L=L)
    assert e["mac"] == 2 * mac and e["ac"] == 0.25 * mac
    assert e["energy_pj"] == pytest.approx(2 * mac * 4.6 + 0.25 * mac * 0.9)
    assert e["energy_ann_pj"] == pytest.approx(3 * mac * 4.6)


@pytest.mark.parametrize("activation", ["lif", "binary_gsu"])
def test_evaluate_rates_are_weighted_by_batch_size(activation):
    """Batches of 4 over 9 samples (4, 4, 1) give the rates of one batch of 9: the short last
    batch weighs 1/9, not 1/3. Eval mode treats samples independently, so only the order of
    summation differs (1e-12 relative is ~1e4 ulps of slack, far below the ~10 % a
    per-batch mean makes here, checked by the last assertion)."""
    from refimpl.train import evaluate

    cfg, p, buf, _, _ = small_model(activation=activation)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(9, 12, 2)), rng.integers(0, 3, size=9)
    whole = evaluate(cfg, p, buf, x, y, batch_size=9)
    split = evaluate(cfg, p, buf, x, y, batch_size=4)
    assert [r is None for r in whole["rates"]] == [r is None for r in split["rates"]]
    got = [r for r in split["rates"] if r is not None]
    want = [r for r in whole["rates"] if r is not None]
    assert got and got == pytest.approx(want, rel=1e-12)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    assert split["accuracy"] == whole["accuracy"]
    # the check has teeth: the unweighted mean of per-batch rates is clearly different
    per_batch = [evaluate(cfg, p, buf, x[i:i + 4], y[i:i + 4])["rates"] for i in (0, 4, 8)]
    unweighted = [np.mean([b[k] for b in per_batch]) for k, r in enumerate(whole["rates"])
                  if r is not None]
    assert max(abs(u - w) for u, w in zip(unweighted, want)) > 1e-3


def test_optimizer_groups_of_the_model():
    """DESIGN.md 8 (``optimizer_rules``' docstring): the SSM dynamics (``log_dt``,
    ``log_A_real``, ``A_imag``) get ``lr = min(lr, 1e-3)`` and no weight decay; biases, norms,
    ``D``, thresholds ``ln_vth`` and ``rho`` get the default lr and no decay; every other
    weight (encoder/decoder/mixing matrices, ``C``, the GSU gate ``c`` excepted) both
    defaults. Written from the rule, name by name, for every parameter of two models."""
    from refimpl.optim import make_groups

    def expected(name, lr, wd):
        leaf = name.split(".")[-1]
        if ".ssm." in name and leaf in ("log_dt", "log_A_real", "A_imag", "B_re", "B_im"):
            return min(lr, 1e-3), 0.0
        if leaf in ("b", "c", "D", "ln_vth", "rho") or ".norm." in name:
            return lr, 0.0
        return lr, wd

    for kw in (dict(activation="refractory", norm="batch"),
               dict(activation="binary_gsu", vocab=5)):
        cfg = M.ModelConfig(**{**dict(n_classes=3, d_input=2, d_model=4, d_state=4,
                                      n_layers=2), **kw})
        p, _ = M.init_model(cfg, 0)
        for lr, wd in ((1e-2, 0.05), (1e-4, 0.1)):
            groups = make_groups(p, lr, wd, M.optimizer_rules(lr))
            seen = {}
            for g in groups:
                for name in g["params"]:
                    assert name not in seen, name
                    seen[name] = (g["lr"], g["weight_decay"])
            assert set(seen) == set(p)
            for name in p:
                assert seen[name] == expected(name, lr, wd), (kw, lr, name, seen[name])
            decayed = {n for n, (_, d) in seen.items() if d > 0}
            assert decayed and not any(n.split(".")[-1] in ("log_dt", "log_A_real", "A_imag")
                                       for n in decayed)
