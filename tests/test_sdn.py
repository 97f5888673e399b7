"""SDN (DESIGN.md section 6): fused kernel, published weights, folding, training-network
backward, the SDN neuron, weights files, training, the ``refimpl sdn`` commands.

Tolerances: the fused kernel, its NumPy form and refimpl.reference.sdn_predict sum in
different orders (agreement to 1e-13 of the output scale); folding is exact up to rounding
(1e-12, required by the issue);
gradients by central differences with a Richardson step, eps 1e-6 (rtol 1e-6: the BatchNorm
chain loses a few digits), plus a random-direction dot-product test.
"""
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from refimpl.cli.main import main
from refimpl import layers, reference, sdn
from refimpl.h5io import FileFormatError, atomic_h5
from refimpl.neurons import NeuronConfig
from refimpl.progress import EpochEnd, Step
from refimpl.surrogates import get_surrogate

from gradcheck import assert_close_scalar, coordinate_fd, directional_fd

PUBLISHED = (Path(__file__).resolve().parents[2] / "shared" / "external"
             / "sdn_spikingssm_tau0125.npz")


@pytest.fixture(scope="module")
def published():
    if not PUBLISHED.exists():
        pytest.skip(f"published SDN weights not found at {PUBLISHED} (../shared is absent)")
    return sdn.load_weights(PUBLISHED)[0]


def random_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.4, size=shape) for k, (_, shape) in sdn.FUSED_LAYOUT.items()}


def random_training_net(seed=0):
    """Training parameters moved off their init, and non-trivial running statistics."""
    rng = np.random.default_rng(seed)
    p, b = sdn.init_train_params(seed)
    p = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in p.items()}
    b = {k: rng.uniform(0.5, 2.0, v.shape) if k.endswith("var") else rng.normal(size=v.shape)
         for k, v in b.items()}
    return p, b


# --------------------------------------------------------------------------------------------
# Fused inference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 5, 8, 9, 40])
def test_kernel_matches_numpy_and_the_reference(L):
    w = random_weights(L)
    x = np.random.default_rng(L).normal(size=(3, L))
    m, s = sdn.sdn_forward(x, w)
    scale = 1.0 + np.abs(m).max()
    np.testing.assert_allclose(m, sdn.fused_fwd(x, w)[0], rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(m, reference.sdn_predict(x, w), rtol=0, atol=1e-13 * scale)
    np.testing.assert_array_equal(s, (m + x >= 1.0).astype(float))


def test_causal_window_is_x_t_minus_8_to_t_minus_1():
    w = random_weights(1)
    x = np.random.default_rng(2).normal(size=(2, 60))
    m0, _ = sdn.sdn_forward(x, w)
    t0 = 20
    x1 = x.copy()
    x1[:, t0] += 3.0
    m1, _ = sdn.sdn_forward(x1, w)
    np.testing.assert_array_equal(m1[:, :t0 + 1], m0[:, :t0 + 1])  # x[t0] unseen up to t0
    np.testing.assert_array_equal(m1[:, t0 + 9:], m0[:, t0 + 9:])  # and after t0 + 8
    assert np.all(np.abs(m1[:, t0 + 1:t0 + 9] - m0[:, t0 + 1:t0 + 9]).max(axis=1) > 0)


def test_any_leading_shape_and_spike_condition():
    w = random_weights(3)
    x = np.random.default_rng(4).normal(size=(2, 3, 30))
    m, s = sdn.sdn_forward(x, w, theta=0.7, spike_condition="gt")
    m2, _ = sdn.sdn_forward(x.reshape(6, 30), w)
    np.testing.assert_array_equal(m.reshape(6, 30), m2)
    np.testing.assert_array_equal(s, (m + x > 0.7).astype(float))
    m1, _ = sdn.sdn_forward(x[0, 0], w)  # a single row (L,)
    np.testing.assert_array_equal(m1, m[0, 0])


def test_published_weights_reproduce_the_iterative_lif(published):
    # tau 0.125, theta 1, N(0, 1), L = 1024, 200 fresh sequences (204800 steps)
    r = sdn.evaluate(published, tau=0.125, theta=1.0, length=1024, samples=200, seed=0)
    assert r["agreement"] >= 0.9995, r
    assert r["membrane_mse"] < 5e-5, r  # README: 1.9e-5
    assert abs(r["rate_lif"] - 0.151) < 0.01 and abs(r["rate_sdn"] - r["rate_lif"]) < 1e-3


def test_published_npz_is_converted_exactly_to_float64(published):
    with np.load(PUBLISHED) as raw:
        for k in sdn.FUSED_LAYOUT:
            assert raw[k].dtype == np.float32 and published[k].dtype == np.float64
            np.testing.assert_array_equal(published[k], raw[k].astype(np.float64))


def test_weights_may_be_given_as_a_path(published):
    x = np.random.default_rng(0).normal(size=(2, 50))
    np.testing.assert_array_equal(sdn.sdn_forward(x, PUBLISHED)[0],
                                  sdn.sdn_forward(x, published)[0])


# --------------------------------------------------------------------------------------------
# Training network: folding, backward, running statistics
# --------------------------------------------------------------------------------------------


def test_training_network_has_193_parameters_and_fused_153():
    p, _ = sdn.init_train_params(0)
    assert sum(v.size for v in p.values()) == 193
    assert sum(v.size for v in sdn.fold(*random_training_net()).values()) == 153


@pytest.mark.parametrize("seed", [0, 1])
def test_folding_is_exact_in_eval_mode(seed):
    p, b = random_training_net(seed)
    x = np.random.default_rng(seed).normal(size=(3, 70))
    m_unfused, _, _ = sdn.train_fwd(x, p, b, training=False)
    m_fused, _ = sdn.sdn_forward(x, sdn.fold(p, b))
    scale = np.abs(m_unfused).max()
    assert scale > 0.1  # a non-trivial network
    np.testing.assert_allclose(m_fused, m_unfused, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("training", [True, False], ids=["train-mode BN", "eval-mode BN"])
def test_training_network_backward_by_finite_differences(training):
    p, b = random_training_net(5)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 11))
    c = rng.normal(size=(2, 11))
    m, cache, _ = sdn.train_fwd(x, p, b, training)
    dx, grads = sdn.train_bwd(cache, c)

    def loss(name):
        def f(v):
            if name == "x":
                return float((sdn.train_fwd(v, p, b, training)[0] * c).sum())
            q = dict(p, **{name: v})
            return float((sdn.train_fwd(x, q, b, training)[0] * c).sum())
        return f

    for name in list(sdn.TRAIN_LAYOUT) + ["x"]:
        g = dx if name == "x" else grads[name]
        at = x if name == "x" else p[name]
        assert g.shape == at.shape
        fd = coordinate_fd(loss(name), at, 1e-6)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6 * (1 + np.abs(fd).max()),
                                   err_msg=name)


def test_training_network_dot_product():
    # <J v, c> by a directional difference along all parameters and x at once == <v, J^T c>
    p, b = random_training_net(7)
    rng = np.random.default_rng(8)
    x, c = rng.normal(size=(3, 17)), rng.normal(size=(3, 17))
    _, cache, _ = sdn.train_fwd(x, p, b, True)
    dx, grads = sdn.train_bwd(cache, c)
    names = list(sdn.TRAIN_LAYOUT)
    v = {k: rng.normal(size=p[k].shape) for k in names}
    vx = rng.normal(size=x.shape)
    flat = np.concatenate([x.ravel()] + [p[k].ravel() for k in names])
    direction = np.concatenate([vx.ravel()] + [v[k].ravel() for k in names])

    def f(z):
        xs = z[:x.size].reshape(x.shape)
        q, i = {}, x.size
        for k in names:
            q[k] = z[i:i + p[k].size].reshape(p[k].shape)
            i += p[k].size
        return float((sdn.train_fwd(xs, q, b, True)[0] * c).sum())

    jtc = float((dx * vx).sum()) + sum(float((grads[k] * v[k]).sum()) for k in names)
    assert_close_scalar(directional_fd(f, flat, direction, 1e-6), jtc, 1e-7, 1.0, "dot product")


def test_conv_bias_gradient_vanishes_under_train_mode_batchnorm():
    # BatchNorm subtracts the batch mean, so a bias right before it cannot change the output.
    p, b = random_training_net(9)
    x = np.random.default_rng(9).normal(size=(2, 30))
    _, cache, _ = sdn.train_fwd(x, p, b, True)
    _, g = sdn.train_bwd(cache, np.ones((2, 30)))
    assert np.abs(g["conv1.bias"]).max() < 1e-12 and np.abs(g["conv2.bias"]).max() < 1e-12


def test_running_statistics_follow_torch_batchnorm():
    p, b = random_training_net(10)
    x = np.random.default_rng(11).normal(size=(3, 25))
    _, _, new = sdn.train_fwd(x, p, b, True, momentum=0.1)
    # bn1 sees the whole padded convolution, length L + 9, computed here with np.convolve:
    # conv[t] = sum_k Wd[k] x[t - 8 + k] = [0, convolve(x, Wd[::-1], "full"), 0][t]
    a = p["encoder.weight"][:, 0, 0]
    z1 = np.stack([[a[c] * np.concatenate([[0.0], np.convolve(xb, p["conv1.weight"][c, 0, ::-1]),
                                           [0.0]])
                    + p["conv1.bias"][c] for xb in x] for c in range(8)])  # (C, B, L + 9)
    assert z1.shape == (8, 3, 34)
    n = z1[0].size
    np.testing.assert_allclose(new["bn1.running_mean"],
                               0.9 * b["bn1.running_mean"] + 0.1 * z1.mean(axis=(1, 2)), rtol=1e-13)
    np.testing.assert_allclose(new["bn1.running_var"],
                               0.9 * b["bn1.running_var"] + 0.1 * z1.var(axis=(1, 2)) * n / (n - 1),
                               rtol=1e-12)
    for k in b:  # the input dict is not modified
        assert not np.shares_memory(new[k], b[k])


def test_both_batchnorms_are_refimpl_layers_batchnorm(monkeypatch):
    # train_fwd / train_bwd normalise through refimpl.layers (channel-major, channel_axis=0)
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, args[0].shape if name == "fwd" else args[1].shape,
                          kwargs.get("channel_axis")))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(layers, "batchnorm_fwd", spy("fwd", layers.batchnorm_fwd))
    monkeypatch.setattr(layers, "batchnorm_bwd", spy("bwd", layers.batchnorm_bwd))
    p, b = random_training_net(24)
    x = np.random.default_rng(24).normal(size=(3, 20))
    _, cache, _ = sdn.train_fwd(x, p, b, True)
    sdn.train_bwd(cache, np.ones((3, 20)))
    assert calls == [("fwd", (8, 3, 29), 0), ("fwd", (8, 3, 20), 0),
                     ("bwd", (8, 3, 20), None), ("bwd", (8, 3, 29), None)]


def test_channel_major_batchnorm_is_the_b_h_l_batchnorm_transposed():
    rng = np.random.default_rng(25)
    z = rng.normal(size=(8, 3, 29))  # (C, B, T)
    g, beta, rm = rng.normal(size=(3, 8))
    rv = rng.uniform(1, 2, 8)
    dy = rng.normal(size=z.shape)
    for training in (True, False):
        y0, c0, st0 = layers.batchnorm_fwd(z, g, beta, rm, rv, training, channel_axis=0)
        y1, c1, st1 = layers.batchnorm_fwd(z.transpose(1, 0, 2), g, beta, rm, rv, training)
        np.testing.assert_allclose(y0, y1.transpose(1, 0, 2), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(st0, st1, rtol=1e-13)
        grads0 = layers.batchnorm_bwd(c0, dy)
        grads1 = layers.batchnorm_bwd(c1, dy.transpose(1, 0, 2))
        for a0, a1 in zip(grads0, grads1):
            a0 = a0 if a0.ndim == 1 else a0.transpose(1, 0, 2)
            np.testing.assert_allclose(a0, a1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_losses_and_their_gradients(loss):
    rng = np.random.default_rng(12)
    m, target = rng.normal(size=(2, 9)) * 2, rng.normal(size=(2, 9))
    value, dm = sdn.loss_fwd_bwd(m, target, loss)
    d = m - target
    want = np.mean(d**2) if loss == "mse" else np.mean(
        np.where(np.abs(d) <= 1, 0.5 * d**2, np.abs(d) - 0.5))
    assert value == pytest.approx(want, rel=1e-14)
    fd = coordinate_fd(lambda v: sdn.loss_fwd_bwd(v, target, loss)[0], m, 1e-6)
    np.testing.assert_allclose(dm, fd, rtol=1e-7, atol=1e-8)


# --------------------------------------------------------------------------------------------
# SDN neuron
# --------------------------------------------------------------------------------------------


SDN_CFG = NeuronConfig(reset="hard", tau=0.125, theta=1.0)  # the model's sdn family


def test_sdn_neuron_forward_is_the_fused_network(published):
    x = np.random.default_rng(13).normal(size=(2, 3, 64))
    s, m = sdn.sdn_neuron_fwd(x, published, SDN_CFG)
    m_ref, s_ref = sdn.sdn_forward(x, published)
    np.testing.assert_array_equal(m, m_ref)
    np.testing.assert_array_equal(s, s_ref)


@pytest.mark.parametrize("cond", ["ge", "gt"])
def test_sdn_neuron_matches_the_reference(cond):
    w = random_weights(26)
    x = np.random.default_rng(26).normal(size=(2, 3, 40))
    s, m = sdn.sdn_neuron_fwd(x, w, SDN_CFG.replace(theta=0.9, spike_condition=cond))
    s_ref, m_ref = reference.sdn_neuron(x, w, theta=0.9, spike_condition=cond)
    np.testing.assert_allclose(m, m_ref, rtol=0, atol=1e-13 * (1 + np.abs(m).max()))
    h = m + x - 0.9
    assert np.abs(h).min() > 1e-12  # no spike decided by rounding
    np.testing.assert_array_equal(s, s_ref)


@pytest.mark.parametrize("surrogate, scale", [("triangle", None), ("atan", None), ("sigmoid", 2.0)])
def test_sdn_neuron_backward_is_the_surrogate_with_m_constant(surrogate, scale):
    w = random_weights(14)
    rng = np.random.default_rng(15)
    x = rng.normal(size=(2, 2, 20))
    ds = rng.normal(size=x.shape)
    cfg = NeuronConfig(reset="hard", theta=0.8, surrogate=surrogate, surrogate_scale=scale)
    s_smooth, m = sdn.sdn_neuron_fwd(x, w, cfg, smooth=True)
    dx = sdn.sdn_neuron_bwd(x, m, cfg, ds)
    sur = get_surrogate(surrogate)
    if surrogate == "triangle":  # + - * / only: exact
        np.testing.assert_array_equal(dx, ds * sur.grad(m + x - 0.8, scale))
        np.testing.assert_array_equal(s_smooth, sur.primitive(m + x - 0.8, scale))
    else:
        # exp / atan: the kernel and Surrogate.grad run one Numba formula but in different
        # loops, which a vectorising build (SVML) may evaluate an ulp apart (issue 11); allow
        # 8 ulps of g (relative) and of G's range [0, 1] (absolute).
        eps = np.finfo(np.float64).eps
        np.testing.assert_allclose(dx, ds * sur.grad(m + x - 0.8, scale), rtol=8 * eps, atol=0)
        np.testing.assert_allclose(s_smooth, sur.primitive(m + x - 0.8, scale), rtol=0,
                                   atol=8 * eps)

    # finite differences of the smooth forward with the SDN prediction held constant (frozen m)
    def f(v):
        return float((sdn.sdn_neuron_fwd(v, None, cfg, m=m, smooth=True)[0] * ds).sum())

    np.testing.assert_allclose(dx, coordinate_fd(f, x, 1e-6), rtol=1e-6, atol=1e-8)


def test_sdn_neuron_dot_product():
    # <J v, c> by a directional difference of the smooth forward == <v, J^T c>
    rng = np.random.default_rng(22)
    x, m = rng.normal(size=(2, 3, 16)), rng.normal(0.5, 0.3, size=(2, 3, 16))
    c, v = rng.normal(size=x.shape), rng.normal(size=x.shape)
    cfg = SDN_CFG.replace(surrogate="atan")

    def f(z):
        return float((sdn.sdn_neuron_fwd(z, None, cfg, m=m, smooth=True)[0] * c).sum())

    jtc = float((sdn.sdn_neuron_bwd(x, m, cfg, c) * v).sum())
    assert_close_scalar(directional_fd(f, x, v, 1e-6), jtc, 1e-7, 1.0, "dot product")


def test_sdn_neuron_default_surrogate_is_triangle():
    w = random_weights(16)
    x = np.random.default_rng(17).normal(size=(1, 2, 15))
    _, m = sdn.sdn_neuron_fwd(x, w, SDN_CFG)
    z = m + x - 1.0
    np.testing.assert_array_equal(sdn.sdn_neuron_bwd(x, m, SDN_CFG, np.ones_like(x)),
                                  np.maximum(0.0, 1.0 - np.abs(z)))


def test_spike_condition_at_an_exact_tie():
    # every weight 0 except b3 = 0.25: m = 0.25 exactly, and m + x == theta at x = 0.75
    w = {k: np.zeros(shape) for k, (_, shape) in sdn.FUSED_LAYOUT.items()}
    w["w5"][0] = 0.25
    x = np.array([0.75, 0.5, 1.0]).reshape(1, 1, 3)  # tie, below, above
    for cond, want in (("ge", [1.0, 0.0, 1.0]), ("gt", [0.0, 0.0, 1.0])):
        cfg = SDN_CFG.replace(spike_condition=cond)
        m, s = sdn.sdn_forward(x, w, spike_condition=cond)
        np.testing.assert_array_equal(m, 0.25)
        np.testing.assert_array_equal(s.ravel(), want, err_msg=cond)
        np.testing.assert_array_equal(sdn.sdn_neuron_fwd(x, w, cfg)[0].ravel(), want, err_msg=cond)
        np.testing.assert_array_equal(sdn.sdn_neuron_fwd(x, None, cfg, m=m)[0].ravel(), want,
                                      err_msg=cond)


def test_sdn_neuron_uses_a_given_m_instead_of_the_network():
    x = np.random.default_rng(23).normal(size=(1, 2, 10))
    m = np.full(x.shape, 2.0)
    s, m_out = sdn.sdn_neuron_fwd(x, None, SDN_CFG, m=m)
    np.testing.assert_array_equal(m_out, m)
    np.testing.assert_array_equal(s, (x + 2.0 >= 1.0).astype(float))


@pytest.mark.parametrize("change, message", [
    (dict(reset="soft"), r"reset must be 'hard' for the SDN neuron .*got reset='soft'"),
    (dict(reset="refractory"), r"reset must be 'hard' for the SDN neuron .*got reset='refractory'"),
    (dict(u_reset=0.5), r"u_reset must be 0 for the SDN neuron .*got u_reset=0.5"),
    (dict(refractory_steps=2),
     r"refractory_steps must be 0 for the SDN neuron, got refractory_steps=2"),
])
def test_sdn_neuron_refuses_what_the_sdn_does_not_predict(change, message):
    cfg = SDN_CFG.replace(**change)
    x = np.zeros((1, 1, 5))
    with pytest.raises(ValueError, match=message):
        sdn.sdn_neuron_fwd(x, random_weights(), cfg)
    with pytest.raises(ValueError, match=message):
        sdn.sdn_neuron_bwd(x, x, cfg, x)


def test_sdn_neuron_needs_a_neuron_config():
    with pytest.raises(TypeError, match=r"cfg must be a refimpl.neurons.NeuronConfig, got dict"):
        sdn.sdn_neuron_fwd(np.zeros((1, 1, 5)), random_weights(), {"theta": 1.0})


def test_sdn_neuron_given_m_must_match_x():
    with pytest.raises(ValueError, match=r"x and m must have the same shape"):
        sdn.sdn_neuron_fwd(np.zeros((1, 1, 4)), None, SDN_CFG, m=np.zeros((1, 1, 3)))


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------


def test_hdf5_round_trip_with_training_state_and_config(tmp_path):
    p, b = random_training_net(18)
    w = sdn.fold(p, b)
    path = tmp_path / "w.h5"
    sdn.save_weights(path, w, p, b, train_config={"tau": 0.25, "loss": "mse"},
                     metrics={"agreement": 0.5}, history={"loss": np.arange(3.0)})
    w2, meta = sdn.load_weights(path)
    assert meta["format"] == "hdf5" and meta["config"] == {"tau": 0.25, "loss": "mse"}
    assert meta["metrics"] == {"agreement": 0.5}
    for k in w:
        np.testing.assert_array_equal(w2[k], w[k])
    p2, b2, cfg = sdn.load_training_state(path)
    assert cfg["tau"] == 0.25
    for k in p:
        np.testing.assert_array_equal(p2[k], p[k])
    with h5py.File(path) as f:
        assert f.attrs["schema"] == "refimpl-sdn" and f.attrs["schema_version"] == 1
        assert f["fused/w2"].attrs["torch_name"] == "conv2.weight"
    with pytest.raises(FileExistsError, match="exists"):
        sdn.save_weights(path, w)


def _npz(tmp_path, name="w.npz", **changes):
    w = {k: v.astype(np.float32) for k, v in random_weights(19).items()}
    w.update(changes)
    w = {k: v for k, v in w.items() if v is not None}
    path = tmp_path / name
    np.savez(path, **w)
    return path


def test_npz_missing_tensor_is_named(tmp_path):
    with pytest.raises(FileFormatError, match=r"missing tensor w3 \(conv2.bias, shape \(8,\)\)"):
        sdn.load_weights(_npz(tmp_path, w3=None))


def test_npz_wrong_shape_is_named(tmp_path):
    with pytest.raises(FileFormatError,
                       match=r"tensor w2 \(conv2.weight\) has shape \(8, 8\), "
                             r"expected \(8, 8, 1\)"):
        sdn.load_weights(_npz(tmp_path, w2=np.zeros((8, 8), np.float32)))


def test_npz_wrong_dtype_is_named(tmp_path):
    with pytest.raises(FileFormatError, match=r"tensor w1 \(conv1.bias\) has dtype int64"):
        sdn.load_weights(_npz(tmp_path, w1=np.zeros(8, np.int64)))


def test_npz_non_finite_is_named(tmp_path):
    with pytest.raises(FileFormatError, match=r"tensor w5 \(conv3.bias\) contains non-finite"):
        sdn.load_weights(_npz(tmp_path, w5=np.array([np.nan], np.float32)))


def test_npz_corrupted_tensor_is_named(tmp_path):
    path = _npz(tmp_path)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("w2.npy")
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 200] ^= 0xFF  # inside the array payload: the CRC check fails on reading w2
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError,
                       match=r"tensor w2 \(conv2.weight\) cannot be read, the file is corrupted"):
        sdn.load_weights(path)


def test_truncated_npz(tmp_path):
    path = _npz(tmp_path)
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(FileFormatError, match=r"w.npz: (not a readable .npz archive|tensor w\d)"):
        sdn.load_weights(path)


def test_not_a_weights_file(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"this is not a weights file at all")
    with pytest.raises(FileFormatError, match="neither an HDF5 file nor an .npz archive"):
        sdn.load_weights(path)
    with pytest.raises(FileFormatError, match="no such file"):
        sdn.load_weights(tmp_path / "missing.npz")


def test_truncated_hdf5(tmp_path):
    path = tmp_path / "w.h5"
    sdn.save_weights(path, random_weights(20))
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(FileFormatError, match="w.h5"):
        sdn.load_weights(path)


def test_hdf5_of_another_schema(tmp_path):
    path = tmp_path / "other.h5"
    with atomic_h5(path, "refimpl-golden", 1):
        pass
    with pytest.raises(FileFormatError, match="schema is 'refimpl-golden', expected 'refimpl-sdn'"):
        sdn.load_weights(path)


def test_hdf5_missing_and_misshapen_tensors_are_named(tmp_path):
    path = tmp_path / "w.h5"
    sdn.save_weights(path, random_weights(21))
    with h5py.File(path, "a") as f:
        del f["fused/w4"]
    with pytest.raises(FileFormatError, match=r"missing tensor /fused/w4 \(conv3.weight"):
        sdn.load_weights(path)
    with h5py.File(path, "a") as f:
        f["fused/w4"] = np.zeros((8,))
    with pytest.raises(FileFormatError,
                       match=r"tensor w4 \(conv3.weight\) has shape \(8,\), expected \(1, 8, 1\)"):
        sdn.load_weights(path)


# --------------------------------------------------------------------------------------------
# Validation of in-memory arguments (one test per rule)
# --------------------------------------------------------------------------------------------


def test_weights_missing_key():
    w = random_weights()
    del w["w3"]
    with pytest.raises(ValueError, match=r"missing tensor w3 \(conv2.bias, shape \(8,\)\)"):
        sdn.sdn_forward(np.zeros((1, 5)), w)


def test_weights_wrong_shape():
    w = dict(random_weights(), w2=np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"SDN weight w2 \(conv2.weight\) must have shape "
                                         r"\(8, 8, 1\), got \(8, 8\)"):
        sdn.sdn_forward(np.zeros((1, 5)), w)


def test_weights_wrong_dtype():
    w = dict(random_weights(), w0=np.zeros((8, 1, 8), np.float32))
    with pytest.raises(TypeError, match=r"SDN weight w0 \(conv1.weight\) must have dtype "
                                        r"float64, got float32"):
        sdn.sdn_forward(np.zeros((1, 5)), w)


def test_weights_unexpected_key():
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['w6'\]"):
        sdn.sdn_forward(np.zeros((1, 5)), dict(random_weights(), w6=np.zeros(1)))


def test_x_dtype():
    with pytest.raises(TypeError, match=r"x must have dtype float64, got float32"):
        sdn.sdn_forward(np.zeros((1, 5), np.float32), random_weights())


def test_x_non_finite():
    x = np.zeros((1, 5))
    x[0, 2] = np.nan
    with pytest.raises(ValueError, match=r"x contains non-finite values \(first at index \(0, 2\)"):
        sdn.sdn_forward(x, random_weights())


def test_x_empty_sequence():
    with pytest.raises(ValueError, match=r"at least one time step \(L >= 1\)"):
        sdn.sdn_forward(np.zeros((2, 0)), random_weights())


def test_unknown_spike_condition():
    with pytest.raises(ValueError,
                       match=r"unknown spike_condition 'lt'; valid names are 'ge', 'gt'"):
        sdn.sdn_forward(np.zeros((1, 5)), random_weights(), spike_condition="lt")


def test_neuron_backward_shapes_must_match():
    with pytest.raises(ValueError, match=r"x, m and ds must have the same shape"):
        sdn.sdn_neuron_bwd(np.zeros((1, 1, 4)), np.zeros((1, 1, 3)), SDN_CFG, np.zeros((1, 1, 4)))


def test_dataset_tau_range():
    with pytest.raises(ValueError, match=r"tau must be in \[0.0, 1.0\), got 1.0"):
        sdn.make_dataset(2, 10, tau=1.0)


def test_train_config_unknown_loss():
    with pytest.raises(ValueError, match=r"unknown loss 'l1'; valid names are 'mse', 'huber'"):
        sdn.SDNTrainConfig(loss="l1")


def test_train_config_unknown_init():
    with pytest.raises(ValueError, match=r"unknown init 'zeros'; valid names are 'lif', 'torch'"):
        sdn.SDNTrainConfig(init="zeros")


def test_fold_refuses_negative_running_variance():
    p, b = random_training_net()
    b["bn2.running_var"][3] = -1.0
    with pytest.raises(ValueError, match=r"bn2.running_var must be >= 0"):
        sdn.fold(p, b)


# --------------------------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------------------------


def test_dataset_targets_are_tau_times_previous_membrane():
    from refimpl.reference import neuron

    x, m, s = sdn.make_dataset(3, 50, tau=0.3, theta=0.9, mean=0.2, std=0.7, seed=4)
    s_ref, h_ref, u_ref = neuron(x[None], 0.3, 0.9, reset="hard")
    np.testing.assert_array_equal(s, s_ref[0])
    np.testing.assert_allclose(m[:, 1:], 0.3 * u_ref[0, :, :-1], rtol=1e-15, atol=1e-15)
    assert np.all(m[:, 0] == 0.0)
    assert abs(x.mean() - 0.2) < 0.15 and abs(x.std() - 0.7) < 0.1


TINY = dict(samples=16, length=48, epochs=3, batch_size=8, eval_samples=4, seed=3)


def test_tiny_training_run_is_deterministic_and_reports_progress():
    events = []
    r1 = sdn.train_sdn(progress=events.append, **TINY)
    r2 = sdn.train_sdn(**TINY)
    assert r1.config.total_steps == 3 * 2
    steps = [e for e in events if isinstance(e, Step)]
    ends = [e for e in events if isinstance(e, EpochEnd)]
    assert len(steps) + len(ends) == len(events)
    assert [e.global_step for e in steps] == list(range(r1.config.total_steps))
    for k in r1.weights:
        np.testing.assert_array_equal(r1.weights[k], r2.weights[k])
    fused = sdn.fold(r1.params, r1.buffers)
    for k in fused:
        np.testing.assert_array_equal(fused[k], r1.weights[k])
    assert set(r1.metrics) >= {"agreement", "membrane_mse", "rate_lif", "rate_sdn"}
    assert r1.history["loss"].shape == (3,)


def test_training_reports_a_step_per_update_and_an_epoch_end_per_epoch():
    events = []
    r = sdn.train_sdn(progress=events.append, **TINY)
    # per epoch: two Steps (16 samples, batches of 8), then its EpochEnd
    assert [type(e) for e in events] == [Step, Step, EpochEnd] * 3
    steps = [e for e in events if isinstance(e, Step)]
    assert [(e.epoch, e.step) for e in steps] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(e.epochs == 3 and e.steps_per_epoch == 2 and e.total_steps == 6 for e in steps)
    assert all(e.rate is None and isinstance(e.loss, float) and e.loss > 0 for e in steps)
    ends = [e for e in events if isinstance(e, EpochEnd)]
    assert [e.epoch for e in ends] == [0, 1, 2] and all(e.epochs == 3 for e in ends)
    np.testing.assert_array_equal([e.loss for e in ends], r.history["loss"])
    assert ends[0].loss == pytest.approx(np.mean([steps[0].loss, steps[1].loss]), rel=1e-15)


def test_short_training_lowers_the_loss():
    r = sdn.train_sdn(samples=64, length=128, epochs=8, batch_size=16, eval_samples=8, seed=1)
    loss = r.history["loss"]
    assert loss[-1] < 0.5 * loss[0], loss


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

TINY_ARGS = ["--samples", "16", "--length", "48", "--epochs", "2", "--batch-size", "8",
             "--eval-samples", "4", "--seed", "3"]


def test_cli_sdn_is_registered():
    r = CliRunner().invoke(main, ["sdn", "--help"])
    assert r.exit_code == 0 and "train" in r.output and "eval" in r.output


def test_cli_train_writes_a_file_that_reopens(tmp_path):
    out = tmp_path / "sdn.h5"
    r = CliRunner().invoke(main, ["sdn", "train", *TINY_ARGS, "--tau", "0.25", "--loss", "mse",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "spike agreement:" in r.output and "membrane MSE:" in r.output
    w, meta = sdn.load_weights(out)
    cfg = meta["config"]
    assert cfg["tau"] == 0.25 and cfg["loss"] == "mse" and cfg["samples"] == 16
    assert cfg["epochs"] == 2 and cfg["lr"] == 0.01 and cfg["train_seconds"] > 0
    p, b, _ = sdn.load_training_state(out)
    fused = sdn.fold(p, b)
    for k in w:
        np.testing.assert_array_equal(w[k], fused[k])
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind

    # eval of the refimpl file uses its training tau
    r = CliRunner().invoke(main, ["sdn", "eval", str(out), "--samples", "3", "--length", "40"])
    assert r.exit_code == 0, r.output
    assert "tau = 0.25" in r.output and "spike agreement:" in r.output

    # refuses to overwrite without --overwrite, and leaves the file alone
    before = out.read_bytes()
    r = CliRunner().invoke(main, ["sdn", "train", *TINY_ARGS, "--out", str(out)])
    assert r.exit_code == 1 and "exists; pass --overwrite" in r.output
    assert out.read_bytes() == before
    r = CliRunner().invoke(main, ["sdn", "train", *TINY_ARGS, "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output



def test_cli_eval_published_weights(published):
    r = CliRunner().invoke(main, ["sdn", "eval", str(PUBLISHED), "--samples", "200"])
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.startswith("spike agreement:"))
    assert float(line.split()[2]) >= 99.95, line
    assert "membrane MSE:" in r.output and "firing rate:" in r.output


@pytest.mark.parametrize("content, message", [
    (b"garbage", "neither an HDF5 file nor an .npz archive"),
    (None, "missing tensor w5"),
])
def test_cli_eval_bad_file_is_a_one_line_error(tmp_path, content, message):
    if content is None:
        path = _npz(tmp_path, "bad.npz", w5=None)
    else:
        path = tmp_path / "bad.npz"
        path.write_bytes(content)
    r = CliRunner().invoke(main, ["sdn", "eval", str(path)])
    assert r.exit_code == 1
    assert ("Traceback" not in r.output and r.exception is None
            or isinstance(r.exception, SystemExit))
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.output


def test_cli_train_bad_value_is_a_one_line_error(tmp_path):
    r = CliRunner().invoke(main, ["sdn", "train", "--tau", "1.5", "--out", str(tmp_path / "x.h5")])
    assert r.exit_code == 1
    assert r.output.strip() == "Error: tau must be in [0.0, 1.0), got 1.5"
    assert not (tmp_path / "x.h5").exists()


# --------------------------------------------------------------------------------------------
# Resume (issue 11, item 6): OUT.partial.h5 during training, bit-identical continuation
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _stop_after_epoch(n):
    def progress(event):
        if isinstance(event, EpochEnd) and event.epoch + 1 == n:
            raise _Stop
    return progress


def _assert_same_training(a, b):
    for name in ("weights", "params", "buffers"):
        da, db = getattr(a, name), getattr(b, name)
        assert set(da) == set(db)
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=f"{name} {k}")
    np.testing.assert_array_equal(a.history["loss"], b.history["loss"])
    assert a.metrics == b.metrics


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_resumed_training_is_bit_identical(tmp_path, stop):
    state = tmp_path / "s.h5.partial.h5"
    ref = sdn.train_sdn(**TINY)
    with pytest.raises(_Stop):
        sdn.train_sdn(progress=_stop_after_epoch(stop), state_path=state, **TINY)
    events = []
    res = sdn.train_sdn(progress=events.append, state_path=state, resume=True, **TINY)
    _assert_same_training(ref, res)
    steps = [e.global_step for e in events if isinstance(e, Step)]
    assert steps == list(range(2 * stop, 6))  # continues at the next update
    # the state file is not a weights file
    with pytest.raises(FileFormatError, match="schema"):
        sdn.load_weights(state)


def test_resume_refuses_other_settings(tmp_path):
    state = tmp_path / "s.partial.h5"
    with pytest.raises(_Stop):
        sdn.train_sdn(progress=_stop_after_epoch(1), state_path=state, **TINY)
    with pytest.raises(ValueError, match=r"other settings \(epochs = 3 there, 5 now\)"):
        sdn.train_sdn(state_path=state, resume=True, **dict(TINY, epochs=5))


def _invoke(args):
    r = CliRunner().invoke(main, ["sdn", "train", *args])
    return r


def test_cli_resume_continues_bit_identically_and_cleans_up(tmp_path, monkeypatch):
    ref, out = tmp_path / "ref.h5", tmp_path / "sdn.h5"
    assert _invoke([*TINY_ARGS, "--out", str(ref)]).exit_code == 0
    real = sdn.training.save_train_state
    calls = []

    def dying(*a, **k):  # interrupted right after the first epoch's state is on disk
        real(*a, **k)
        calls.append(1)
        raise _Stop

    monkeypatch.setattr(sdn.training, "save_train_state", dying)
    r = _invoke([*TINY_ARGS, "--out", str(out)])
    assert isinstance(r.exception, _Stop) and calls == [1]
    monkeypatch.setattr(sdn.training, "save_train_state", real)
    partial = tmp_path / "sdn.h5.partial.h5"
    assert not out.exists() and partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.h5", "sdn.h5.partial.h5"]

    # no silent restart, no resume with other settings, no resume + overwrite
    before = partial.read_bytes()
    for args, message in [
        ([], "holds an interrupted run; pass --resume"),
        (["--resume", "--length", "40"], "other settings (length = 48 there, 40 now)"),
        (["--resume", "--overwrite"], "exclude each other"),
    ]:
        r = _invoke([*TINY_ARGS, "--out", str(out), *args])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and message in lines[0], r.output
        assert partial.read_bytes() == before and not out.exists()
    with pytest.raises(FileFormatError, match="schema"):  # sdn eval refuses the state file
        sdn.load_weights(partial)

    r = _invoke([*TINY_ARGS, "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.h5", "sdn.h5"]
    wa, ma = sdn.load_weights(ref)
    wb, mb = sdn.load_weights(out)
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])
    pa, ba, _ = sdn.load_training_state(ref)
    pb, bb, _ = sdn.load_training_state(out)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    for k in ba:
        np.testing.assert_array_equal(ba[k], bb[k])
    assert ma["metrics"] == mb["metrics"]
    with h5py.File(ref) as fa, h5py.File(out) as fb:
        np.testing.assert_array_equal(fa["history/loss"][()], fb["history/loss"][()])

    r = _invoke([*TINY_ARGS, "--out", str(out), "--resume"])  # nothing left to continue
    assert r.exit_code == 1 and "no interrupted run to continue" in r.output


def test_cli_overwrite_discards_an_interrupted_run(tmp_path):
    out = tmp_path / "sdn.h5"
    partial = tmp_path / "sdn.h5.partial.h5"
    partial.write_bytes(b"stale")
    r = _invoke([*TINY_ARGS, "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdn.h5"]


# --------------------------------------------------------------------------------------------
# The full default training run (make test-all)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_training_from_scratch_reaches_99_9_percent(tmp_path):
    out = tmp_path / "sdn.h5"
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["sdn", "train", "--out", str(out)])
    seconds = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    assert seconds < 600, f"default training took {seconds:.0f} s (limit 600 s)"
    # score on fresh inputs, more of them than the training command's own check
    m = sdn.evaluate(out, tau=0.125, samples=500, seed=123)
    assert m["agreement"] >= 0.999, m


def test_lif_init_taps_are_the_impulse_response():
    p, _ = sdn.init_train_params(0, init="lif", tau=0.5)
    w = p["conv1.weight"][:, 0, :]
    np.testing.assert_allclose(w[0], 0.5 ** np.arange(7, -1, -1), atol=0.01)  # ends at x[t-1]
    np.testing.assert_allclose(w[1], np.r_[0.5 ** np.arange(6, -1, -1), 0], atol=0.01)  # x[t-2]
    np.testing.assert_allclose(w[2], -w[0], atol=0.02)  # both signs
    np.testing.assert_allclose(w[4], w[0], atol=0.02)  # ... and a second threshold:
    np.testing.assert_array_equal(p["bn1.bias"], [0, 0, 0, 0, -1, -1, 1, 1])
    np.testing.assert_array_equal(p["encoder.weight"], np.ones((8, 1, 1)))
    q, _ = sdn.init_train_params(0, init="torch")
    assert np.all(np.abs(q["conv1.weight"]) <= 1 / np.sqrt(8))
    assert np.all(q["bn1.bias"] == 0)
