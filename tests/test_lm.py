"""The language-model head (DESIGN.md section 11): next-token loss at every position, the
per-token decoder (tied or not), the whole-LM gradient check for every family, errors.

Gradient checks as tests/test_model.py (smooth spiking forward, frozen SDN/GSU constants;
central differences with Richardson steps, ``|fd - analytic| <= 1e-7 max(|fd|, 1e-2)``)."""
import numpy as np
import pytest

from refimpl import model as M
from refimpl.activations import ACTIVATIONS

from gradcheck import assert_close_scalar, assert_every_parameter, directional_fd
from test_model import sdn_weights

V = 7


def small_lm(**kw):
    cfg = M.ModelConfig.for_lm(V, **{**dict(d_model=4, d_state=4, n_layers=2), **kw})
    p, buf = M.init_model(cfg, 0, sdn_weights=sdn_weights() if cfg.activation == "sdn" else None)
    for k in p:  # spread the SSM output around the threshold (as tests/test_model.py)
        if k.endswith("ssm.C_re") or k.endswith("ssm.C_im"):
            p[k] = p[k] * 3
    x = np.random.default_rng(1).integers(0, V, size=(3, 10))  # (B, L) int64 tokens
    return cfg, p, buf, x


CASES = [dict(activation=a) for a in sorted(ACTIVATIONS)] + [
    dict(activation="lif", tie_embedding=True),
    dict(activation="gelu", tie_embedding=True, norm="batch", prenorm=True),
    dict(activation="refractory", dropout=0.3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_lm_gradient_every_parameter(case):
    cfg, p, buf, x = small_lm(**case)
    frozen = M.frozen_constants(cfg, p, buf, x, rng=np.random.default_rng(5))

    def loss(q):
        return M.loss_and_grads(cfg, q, buf, x, None, training=True,
                                rng=np.random.default_rng(5), smooth=True, frozen=frozen)

    _, logits, g, _, _ = loss(p)
    assert logits.shape == (3, 10, V)
    assert set(g) == set(p)
    assert ("decoder.W" in p) != cfg.tie_embedding
    assert_every_parameter(lambda q: loss(q)[0], p, g)


@pytest.mark.parametrize("activation", ["gelu", "lif", "sdn"])
@pytest.mark.parametrize("tied", [False, True])
def test_lm_dot_product_random_cotangent(activation, tied):
    """``<J v, c> == <v, J^T c>`` over all parameters at once, ``c`` on every position's
    logits (the last position included: model_bwd takes any cotangent)."""
    cfg, p, buf, x = small_lm(activation=activation, tie_embedding=tied)
    frozen = M.frozen_constants(cfg, p, buf, x)
    rng = np.random.default_rng(8)
    c = rng.normal(size=(x.shape[0], x.shape[1], V))
    _, cache, _, _ = M.model_fwd(cfg, p, buf, x, training=True, smooth=True, frozen=frozen)
    g = M.model_bwd(cfg, p, cache, c)
    v = {k: rng.normal(size=val.shape) for k, val in p.items()}

    def f(e):
        q = {k: p[k] + e * v[k] for k in p}
        return float((M.model_fwd(cfg, q, buf, x, training=True, smooth=True,
                                  frozen=frozen)[0] * c).sum())

    jv = directional_fd(lambda e: f(float(e)), np.array(0.0), np.array(1.0), 1e-4)
    assert_close_scalar(sum(float((g[k] * v[k]).sum()) for k in p), float(jv), 1e-7, 1e-2,
                        "dot product")


def test_lm_loss_is_next_token_cross_entropy():
    """Against a plain loop: mean over b and t < L-1 of -log softmax(logits[b, t])[x[b, t+1]];
    the last position gets no gradient."""
    rng = np.random.default_rng(3)
    logits, x = rng.normal(size=(2, 5, V)), rng.integers(0, V, size=(2, 5))
    loss, d = M.lm_loss(logits, x)
    terms = [-(logits[b, t, x[b, t + 1]] - np.log(np.exp(logits[b, t]).sum()))
             for b in range(2) for t in range(4)]
    assert abs(loss - np.mean(terms)) <= 1e-14 * max(1.0, abs(loss))
    assert not d[:, -1].any()
    soft = np.exp(logits[0, 0]) / np.exp(logits[0, 0]).sum()
    want = (soft - np.eye(V)[x[0, 1]]) / 8  # 8 predicted positions
    np.testing.assert_allclose(d[0, 0], want, rtol=1e-13, atol=1e-16)


def test_lm_prediction_at_t_reads_tokens_up_to_t_only():
    """Causality: changing token t+1 .. L-1 leaves the logits at 0 .. t unchanged."""
    cfg, p, buf, x = small_lm(activation="lif")
    a = M.model_fwd(cfg, p, buf, x)[0]
    y = x.copy()
    y[:, 6:] = (y[:, 6:] + 1) % V
    b = M.model_fwd(cfg, p, buf, y)[0]
    # rounding: the FFT convolution mixes every position into every output by rounding only
    # (entries of order eps times the sum of |terms|, far below 1e-9)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=0, atol=1e-9)
    assert not np.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("kw, match", [
    (dict(n_classes=5, vocab=7, head="lm"), "n_classes must equal vocab"),
    (dict(n_classes=3, vocab=0, head="lm"), "vocab >= 2"),
    (dict(n_classes=7, vocab=7, head="lm", bidirectional=True), "must be causal"),
    (dict(n_classes=3, tie_embedding=True), "head='lm' only"),
    (dict(n_classes=3, head="decoder"), "unknown head"),
])
def test_lm_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        M.ModelConfig(**kw)


def test_lm_inputs_errors():
    cfg, p, buf, x = small_lm()
    with pytest.raises(ValueError, match="labels=None"):
        M.loss_and_grads(cfg, p, buf, x, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="at least two tokens"):
        M.loss_and_grads(cfg, p, buf, x[:, :1], None)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_lm_streams_every_position(activation):
    """The model stream of an LM: the next-token logits after every step (step by step and in
    chunks) equal the parallel forward's at every position, with the streaming issue's policy
    (refimpl.stream.compare_forms: bounds from the depth; spike flips only within them)."""
    from refimpl.stream import ModelStream, compare_forms
    cfg, p, buf, x = small_lm(activation=activation, tie_embedding=activation == "lif")
    st = ModelStream(cfg, p, buf)
    assert "pool.sum" not in st.init_state(2).arrays
    par = st.parallel(x)
    np.testing.assert_array_equal(par, M.model_fwd(cfg, p, buf, x)[0])  # the same operations
    r = compare_forms(st, x, chunks=[3, 1, 6])
    assert r["mismatches"] == 0
    assert r["worst_error"] <= r["logit_bound"], r
    assert r["worst_membrane"] <= 1.0, r
    logits, _ = st.step(x[:, 0], st.init_state(x.shape[0]))
    assert logits.shape == (x.shape[0], V)


# --------------------------------------------------------------------------------------------
# Sampling and generation (refimpl.sampling)
# --------------------------------------------------------------------------------------------


def test_sample_matches_the_distribution_and_is_deterministic():
    """Frequencies over many draws within 5 binomial standard deviations of softmax(z / T);
    top_k keeps exactly the k largest; the same seed gives the same tokens."""
    from refimpl.sampling import sample
    z = np.log(np.array([[0.5, 0.2, 0.2, 0.1]]))  # (1, 4)
    n = 20000
    rows = np.repeat(z, n, axis=0)  # (n, 4): one draw per row
    for T, k, want in [(1.0, 0, [0.5, 0.2, 0.2, 0.1]), (1.0, 2, [0.5 / 0.7, 0.2 / 0.7, 0, 0]),
                       (0.5, 0, np.array([0.25, 0.04, 0.04, 0.01]) / 0.34)]:
        got = np.bincount(sample(rows, T, k, np.random.default_rng(0)), minlength=4) / n
        want = np.asarray(want)
        sd = np.sqrt(want * (1 - want) / n)
        assert np.all(np.abs(got - want) <= 5 * sd + 1e-12), (T, k, got, want)
    a = sample(rows[:50], 1.0, 0, np.random.default_rng(3))
    b = sample(rows[:50], 1.0, 0, np.random.default_rng(3))
    assert np.array_equal(a, b)
    # top_k = 1 is greedy; ties (two equal largest) go to the lower token id
    assert np.array_equal(sample(np.array([[0.0, 2.0, 2.0, 1.0]]), 1.0, 1,
                                 np.random.default_rng(0)), [1])


def test_generate_is_deterministic_and_scored_by_the_parallel_form():
    """The generated continuation: the same for a seed (different for another), and each
    sampled token came from the logits the parallel forward gives at that position (top_k=1:
    the argmax of the parallel logits, wherever the top two are not within the stream
    tolerance of each other)."""
    from refimpl.sampling import generate
    from refimpl.stream import ModelStream
    cfg, p, buf, x = small_lm(activation="lif")
    st = ModelStream(cfg, p, buf)
    prompt = x[:, :4]
    a, info = generate(st, prompt, 6, temperature=0.8, top_k=3, seed=1)
    b, _ = generate(st, prompt, 6, temperature=0.8, top_k=3, seed=1)
    c, _ = generate(st, prompt, 6, temperature=0.8, top_k=3, seed=2)
    assert a.shape == (3, 6) and a.dtype == np.int64 and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert info["tokens_per_second"] > 0
    g, _ = generate(st, prompt, 6, top_k=1, seed=0)
    full = np.concatenate([prompt, g], axis=1)  # (B, 10)
    logits = M.model_fwd(cfg, p, buf, full)[0]  # (B, 10, V)
    for t in range(6):
        lg = logits[:, 3 + t]  # predicts token 4 + t
        top2 = np.sort(lg, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-9  # rounding cannot reorder these
        assert np.array_equal(lg.argmax(1)[clear], g[clear, t])


@pytest.mark.parametrize("kw, match", [
    (dict(length=0), "length must be >= 1"),
    (dict(length=3, temperature=-1.0), "temperature must be 0 .greedy"),  # 0 is greedy now
    (dict(length=3, top_k=-1), r"top_k must be in \[0, 7\]"),
])
def test_generate_errors(kw, match):
    from refimpl.sampling import generate
    from refimpl.stream import ModelStream
    cfg, p, buf, x = small_lm()
    with pytest.raises(ValueError, match=match):
        generate(ModelStream(cfg, p, buf), x[:, :2], **kw)


def test_generate_refuses_a_classifier():
    from refimpl.sampling import generate
    from refimpl.stream import ModelStream
    from test_model import small_model
    cfg, p, buf, x, _ = small_model(activation="lif", vocab=7)
    with pytest.raises(ValueError, match="needs a language model"):
        generate(ModelStream(cfg, p, buf), x[:, :2], 3)


def test_lm_float32_variant():
    """The float32 variant runs a language model: float32 logits, float64 (up-cast) gradients,
    the loss within the float32 model bound of tests/test_float32.py (C_MODEL x depth x eps32,
    relative) of the float64 loss on the same float32-representable parameters."""
    import dataclasses
    from test_float32 import C_MODEL, EPS32, model_depth
    cfg, p, buf, x = small_lm(activation="lif")
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}
    cfg32 = dataclasses.replace(cfg, dtype="float32")
    l64, _, g64, _, _ = M.loss_and_grads(cfg, p, buf, x, None, training=False)
    l32, lg32, g32, _, _ = M.loss_and_grads(cfg32, p, buf, x, None, training=False)
    assert lg32.dtype == np.float32 and all(v.dtype == np.float64 for v in g32.values())
    tol = C_MODEL * model_depth(cfg, x.shape[1]) * EPS32
    assert 0 < abs(l32 - l64) <= tol * max(1.0, abs(l64)), (l32, l64, tol)


def test_lm_loss_subtracts_the_max_and_gives_every_row_its_gradient():
    """Logits of 1e4 (exp would overflow without the max subtracted): a plain loop in float64
    with the max subtracted; every position but the last, in every row (the rows are shared out
    over threads), has the gradient softmax - onehot over the B (L-1) predicted positions."""
    from refimpl import threads
    rng = np.random.default_rng(4)
    B, L = 5, 6
    logits, x = 1e4 + rng.normal(size=(B, L, V)), rng.integers(0, V, size=(B, L))
    with threads.using(3):
        loss, d = M.lm_loss(logits, x)
    terms, want = [], np.zeros_like(logits)
    for b in range(B):
        for t in range(L - 1):
            z = logits[b, t] - logits[b, t].max()
            terms.append(np.log(np.exp(z).sum()) - z[x[b, t + 1]])
            want[b, t] = (np.exp(z) / np.exp(z).sum() - np.eye(V)[x[b, t + 1]]) / (B * (L - 1))
    assert np.isfinite(loss) and abs(loss - np.mean(terms)) <= 1e-13 * abs(loss)
    np.testing.assert_allclose(d, want, rtol=1e-12, atol=1e-17)


def test_lm_loss_float32_is_float32_within_its_rounding():
    """float32 logits give a float32 gradient within float32 rounding of the float64 one: each
    entry ``exp(z - m) / s`` is a few float32 roundings (exp, the sum of V terms accumulated in
    float32 by NumPy's pairwise sum, one division): ``(V + 4) 2^-24`` relative to 1/(B (L-1))."""
    rng = np.random.default_rng(5)
    logits, x = rng.normal(size=(3, 8, V)), rng.integers(0, V, size=(3, 8))
    loss64, d64 = M.lm_loss(logits, x)
    loss32, d32 = M.lm_loss(logits.astype(np.float32), x)
    assert d32.dtype == np.float32
    scale = 1.0 / (3 * 7)
    assert np.max(np.abs(d32 - d64)) <= (V + 4) * 2.0 ** -24 * scale
    assert abs(loss32 - loss64) <= (V + 4) * 2.0 ** -24 * max(1.0, abs(loss64))


@pytest.mark.parametrize("tokens, match", [
    (np.zeros((2, 4), np.int32), "int64"),
    (np.zeros((2, 3), np.int64), r"shape \(B, L\) = \(2, 4\)"),
    (np.full((2, 4), V, np.int64), r"tokens must lie in \[0, 7\)"),
    (np.full((2, 4), -1, np.int64), r"tokens must lie in \[0, 7\)"),
])
def test_lm_loss_refuses_bad_tokens(tokens, match):
    with pytest.raises((TypeError, ValueError), match=match):
        M.lm_loss(np.zeros((2, 4, V)), tokens)


def test_lm_loss_needs_two_positions():
    with pytest.raises(ValueError, match="L >= 2"):
        M.lm_loss(np.zeros((2, 1, V)), np.zeros((2, 1), np.int64))


def test_embedding_gradient_is_np_add_at_bit_for_bit():
    """The scatter-add kernel adds in np.add.at's order (repeated tokens: many adds per row)."""
    from refimpl import layers as Ly
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 3, size=(4, 50))  # few distinct tokens: long sums per row
    dy = rng.normal(size=(4, 5, 50))  # (B, H, L)
    want = np.zeros((V, 5))
    np.add.at(want, tokens.ravel(), dy.transpose(0, 2, 1).reshape(-1, 5))
    _, got = Ly.embedding_bwd((tokens, V), dy)
    assert np.array_equal(got, want)
