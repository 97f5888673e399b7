"""The ``lm_step`` golden suite (issue 14): one training step of a causal language model.

Shown here, on the committed file (``golden/v1/lm_step.h5``):

- it covers every activation family, a tied and an untied decoder, two-token rows, a long
  context, and rejects a token outside the vocabulary, one-token rows and a bidirectional model;
- the stored loss is the next-token cross-entropy of the stored logits (an independent
  log-sum-exp over positions ``0 .. L-2`` written here), and the stored parameters after the
  step are the AdamW update of the stored parameters and gradients (the formula of SCHEMA.md,
  written here): an independent candidate built from them passes ``verify``;
- the stored gradients of the non-spiking case (GELU, tied decoder) are the derivative of the
  loss: directional finite differences of a forward that computes the loss itself;
- typical language-model bugs fail ``verify``: the loss aligned to the current token instead of
  the next one, the last position counted, the tied embedding's gradient missing its decoder
  use.
"""
import numpy as np
import pytest

from refimpl import golden as G
from refimpl.golden.model_suites import _model_buffers, _model_config
from refimpl.model import model_bwd, model_fwd, lm_loss

from gradcheck import directional_fd
from test_golden import candidate_cases  # a candidate with the golden outputs and grads

COMMITTED = G.DEFAULT_DIR


@pytest.fixture(scope="module")
def lm_golden():
    return G.read_golden(COMMITTED / "lm_step.h5")


def valid(gf):
    return [c for c in gf.cases.values() if c.result == "valid"]


def verify(tmp_path, cases):
    path = tmp_path / "lm_step-cand.h5"
    G.write_file(path, "lm_step", list(cases.values()), overwrite=True,
                 schema=G.CANDIDATE_SCHEMA)
    return G.verify([path])["files"][0]


def failing(report):
    return {(r["case"], r["status"], r["tensor"]) for r in report["rows"]
            if r["status"] not in ("PASS", "REJECTED")}


def next_token_ce(logits, tokens, shift=1):
    """Mean over ``b`` and ``t < L - shift`` of ``-log softmax(logits[b, t])[tokens[b, t +
    shift]]``, by log-sum-exp with the row maximum subtracted (written here, not refimpl's)."""
    B, L, V = logits.shape
    z = logits[:, :L - shift]
    m = z.max(axis=2, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=2)) + m[..., 0]
    picked = np.take_along_axis(z, tokens[:, shift:, None], axis=2)[..., 0]
    return float(np.mean(lse - picked))


def adamw_oracle(case):
    """Parameters after one AdamW step (step 1, zero moments), SCHEMA.md's formula: the decay,
    the optional global-norm clip, the bias-corrected update, then ``rho = max(rho, 0)``."""
    c = case.config
    grads = case.group("grads")
    clip = 1.0
    if c["clip_norm"] > 0:
        norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
        clip = min(1.0, c["clip_norm"] / (norm + 1e-6))
    out = {}
    for k, g in grads.items():
        meta = case.meta["params/" + k]
        lr = c["lr_scale"] * meta["lr"]
        p = case.data["params/" + k] * (1.0 - lr * meta["weight_decay"])
        g = g * clip
        m, v = (1 - c["beta1"]) * g, (1 - c["beta2"]) * g * g
        p = p - lr * (m / (1 - c["beta1"])) / (np.sqrt(v / (1 - c["beta2"])) + c["eps"])
        out[k] = np.maximum(p, 0.0) if k.endswith(".rho") else p
    return out


def test_cases_cover_the_families_the_decoders_and_the_rejections(lm_golden):
    cases = list(lm_golden.cases.values())
    ok = valid(lm_golden)
    assert {c.config["activation"] for c in ok} == {"gelu", "binary", "binary_gsu", "lif", "sdn",
                                                    "refractory"}
    assert {c.config["tie_embedding"] for c in ok} == {True, False}
    assert all(c.config["head"] == "lm" and not c.config["bidirectional"] for c in ok)
    assert {c.data["inputs/x"].shape[1] for c in ok} >= {2, 256}
    for c in ok:
        B, L = c.data["inputs/x"].shape
        assert c.data["inputs/x"].dtype == np.int64 and "inputs/labels" not in c.data
        assert c.data["outputs/logits"].shape == (B, L, c.config["vocab"])
        assert ("grads/decoder.W" in c.data) is (not c.config["tie_embedding"])
    errors = {c.comment.split(":")[0]: c.extra["error"] for c in cases if c.result == "invalid"}
    assert len(errors) == 3, errors
    assert any("[0, 7)" in e for e in errors.values()), errors
    assert any("L >= 2" in e for e in errors.values()), errors
    assert any("causal" in e for e in errors.values()), errors


def test_stored_loss_is_the_next_token_cross_entropy_of_the_stored_logits(lm_golden):
    for c in valid(lm_golden):
        loss = next_token_ce(c.data["outputs/logits"], c.data["inputs/x"])
        bound = c.meta["outputs/loss"]["atol"] + c.meta["outputs/loss"]["rtol"] * abs(loss)
        assert abs(loss - float(c.data["outputs/loss"])) <= bound, (c.id, loss)


def test_independent_candidate_from_the_schema_formulas_passes(tmp_path, lm_golden):
    """Loss from the logits and parameters from the gradients, by the formulas above: within
    every stored bound (the bounds accept an implementation that is not refimpl's)."""
    cases = candidate_cases(lm_golden)
    for c in valid(lm_golden):
        cand = cases[c.id].data
        cand["outputs/loss"] = np.asarray(next_token_ce(c.data["outputs/logits"],
                                                        c.data["inputs/x"]))
        for k, v in adamw_oracle(c).items():
            cand["outputs/params/" + k] = v
    rep = verify(tmp_path, cases)
    assert rep["passed"], failing(rep)


def _case_model(case):
    cfg = _model_config(case.config)
    params = case.group("params")
    buf = _model_buffers(cfg, params)
    p = {k: v for k, v in params.items() if not k.startswith("sdn.")}
    return cfg, p, buf


def test_stored_gradients_are_the_loss_derivative_gelu_tied(lm_golden):
    """The GELU case (smooth, no spikes) with the tied decoder: for every parameter, ``<grad,
    v>`` equals the directional finite difference of the loss, which is computed here from the
    logits (the tied embedding moves the embedding and the decoder together)."""
    (case,) = [c for c in valid(lm_golden) if c.config["activation"] == "gelu"]
    assert case.config["tie_embedding"]
    cfg, p, buf = _case_model(case)
    x = case.data["inputs/x"]
    rng = np.random.default_rng(0)
    for k in p:
        v = rng.normal(size=p[k].shape)

        def loss(q, k=k):
            logits = model_fwd(cfg, {**p, k: q}, buf, x, training=True)[0]
            return next_token_ce(logits, x)

        fd = directional_fd(loss, p[k], v, eps=1e-4)
        an = float(np.sum(case.data["grads/" + k] * v))
        # Richardson FD error O(eps^4 f''''') ~ 1e-16 for these O(1) functions, plus rounding
        # eps64 |loss| / eps ~ 2e-12: 1e-8 of the directional derivative's scale is generous
        assert abs(fd - an) <= 1e-8 * max(abs(fd), abs(an), 1e-2), (k, fd, an)


def _recomputed(case, edit_loss=None, untie=False):
    """The case's gradient computed with a planted bug."""
    cfg, p, buf = _case_model(case)
    x = case.data["inputs/x"]
    if untie:  # the decoder reads a copy of E: its gradient no longer reaches the embedding
        cfg = _model_config({**case.config, "tie_embedding": False})
        p = {**p, "decoder.W": p["embedding.E"].copy()}
    logits, cache, _, _ = model_fwd(cfg, p, buf, x, training=True)
    loss, dlogits = edit_loss(logits, x) if edit_loss else lm_loss(logits, x)
    return loss, model_bwd(cfg, p, cache, dlogits)


def _current_token_loss(logits, x):
    """The bug: position t trained on token t (itself) instead of t + 1."""
    B, L, V = logits.shape
    z = logits - logits.max(axis=2, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    onehot = np.eye(V)[x]
    return (next_token_ce(logits, x, shift=0), (prob - onehot) / (B * L))


def _wrapped(logits, x):
    """The bug: the last position's prediction is given a target (the first token, wrapped)."""
    B, L, V = logits.shape
    target = np.roll(x, -1, axis=1)  # the last position's target wraps to the first token
    z = logits - logits.max(axis=2, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    loss = float(np.mean(np.log(np.exp(z).sum(axis=2))
                         - np.take_along_axis(z, target[..., None], axis=2)[..., 0]))
    return loss, (prob - np.eye(V)[target]) / (B * L)


@pytest.mark.parametrize("bug", ["current_token", "last_position_counted", "tied_grad_dropped"])
def test_language_model_bugs_fail_verify(tmp_path, lm_golden, bug):
    case = next(c for c in valid(lm_golden) if c.config["tie_embedding"])
    cases = candidate_cases(lm_golden)
    if bug == "tied_grad_dropped":
        loss, grads = _recomputed(case, untie=True)
        grads = {"embedding.E": grads["embedding.E"]}
    else:
        loss, grads = _recomputed(case, _current_token_loss if bug == "current_token"
                                  else _wrapped)
        cases[case.id].data["outputs/loss"] = np.asarray(loss)
    for k, g in grads.items():
        if "grads/" + k in cases[case.id].data:
            cases[case.id].data["grads/" + k] = g
    rep = verify(tmp_path, cases)
    bad = failing(rep)
    assert not rep["passed"] and {cid for cid, _, _ in bad} == {case.id}, bad
    assert {s for _, s, _ in bad} == {"MISMATCH"}, bad
    names = {d for _, _, d in bad}
    assert "grads/embedding.E" in names, names
    if bug != "tied_grad_dropped":
        assert "outputs/loss" in names, names
