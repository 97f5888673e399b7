"""Family knowledge lives in the family's registry entry (issue 22), and the AST checks of
``tools/check_style.py`` that keep it there (rules 3 and 4 of its docstring).

- the checks catch what they define, in a planted file, and pass what they allow;
- the real tree has no family-name branch and no positional read of another op's cache;
- the facts the rest of the package used to spell out by name are the registry's: record names,
  options, SDN weights, thresholds and margins; a ``ModelConfig`` resolves its family and
  builds its ``NeuronConfig`` once, not per block call.
"""
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from refimpl import model as M
from refimpl import neurons
from refimpl.activations import ACTIVATIONS, Activation
from refimpl.layers import TERNARY_RATIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_style  # noqa: E402

FAMILIES, OTHER = check_style.family_vocabulary()

def family(body):
    found = check_style.family_findings(textwrap.dedent(body), "planted.py", FAMILIES, OTHER)
    return [msg for _, _, msg in found]


def cache(body, fields=("norm", "mix")):
    found = check_style.cache_findings(textwrap.dedent(body), "planted.py", set(fields))
    return [msg.split(":")[0] for _, _, msg in found]


# ---- rule 3: family names -------------------------------------------------------------------


def test_vocabulary_is_read_from_the_registries():
    assert FAMILIES == set(ACTIVATIONS)
    assert OTHER["reset"] == set(neurons.RESETS) and "refractory" in OTHER["reset"]


@pytest.mark.parametrize("body, what", [
    ('if cfg.activation == "sdn":\n    pass', "family name 'sdn' (cfg.activation == 'sdn')"),
    ('x = 1 if "binary_gsu" != act else 2', "family name 'binary_gsu'"),
    ('ok = act in ("lif", "refractory")', "family name 'lif', 'refractory'"),
    ('ok = act not in {"gelu"}', "family name 'gelu'"),
    ('ok = options["activation"] is "lif"', "family name 'lif'"),
    ('ok = 0 < n and name == "lif"', "family name 'lif'"),
    ('ok = cfg.reset == "lif"', "family name 'lif'"),  # not a reset: the exception is per name
    ('match cfg.activation:\n    case "sdn":\n        pass', "matches family name 'sdn'"),
    ('match a:\n    case "x" | "gelu":\n        pass', "matches family name 'gelu'"),
    ('NAMES = {"gelu": 1, "lif": 2}', "a per-family table (keys 'gelu', 'lif')"),
    ('class K:\n    T = dict(lif=1, sdn=2)', "a per-family table (keys 'lif', 'sdn')"),
    ('def f(a):\n    return {"lif": 1, "sdn": 2}[a]', "a per-family table"),
    ('def f(a):\n    return {"lif": 1}.get(a)', "a per-family table (keys 'lif')"),
])
def test_family_branch_is_found(body, what):
    (msg,) = family(body)
    assert what in msg and "refimpl.activations.ACTIVATIONS" in msg


@pytest.mark.parametrize("body", [
    'cfg = ModelConfig(n_classes=2, activation="lif")',
    'def f(activation="sdn"):\n    return ACTIVATIONS["sdn"].threshold',
    'FAMILIES = ("lif", "refractory", "sdn")',
    'def f(base):\n    steps = {"gelu": base}\n    return steps',  # run-time data, not a table
    'RESETS = {"hard": 1, "refractory": 2}',  # another registry sharing a word
    'ok = cfg.reset == "refractory"',
    'ok = config["reset"] != "refractory"',
    'ok = c.get("reset") in ("soft", "refractory")',
    'match cfg.reset:\n    case "refractory":\n        pass',
    'ok = cfg.activation == "lifx" or cfg.norm == "layer"',
    'ok = cfg.family.needs_sdn_weights',
])
def test_family_values_and_other_vocabularies_pass(body):
    assert family(body) == []


def test_a_planted_branch_is_found_in_a_file_of_the_tree(tmp_path):
    """A copy of the tree's plot.py with its pre-issue-22 branch put back: found there, by
    the tree walk, at that line."""
    (tmp_path / "refimpl").mkdir()
    src = (ROOT / "refimpl" / "plot.py").read_text(encoding="utf-8")
    planted = src.replace("def _rate_label(activation):\n",
                          "def _rate_label(activation):\n"
                          "    if activation == \"binary_gsu\":\n"
                          "        return \"nonzero Ter(v) per channel per step\"\n", 1)
    assert planted != src
    (tmp_path / "refimpl" / "plot.py").write_text(planted, encoding="utf-8")
    (tmp_path / "refimpl" / "activations.py").write_text('if a == "lif":\n    pass\n')
    found = check_style.family_tree_findings(tmp_path, FAMILIES, OTHER)
    line = planted.splitlines().index('    if activation == "binary_gsu":') + 1
    assert [(f, n) for f, n, _ in found] == [("refimpl/plot.py", line)]  # the registry: exempt


def test_tree_branches_on_no_family_name_outside_the_registry():
    found = {(f, m.split(": family knowledge")[0]) for f, _, m in
             check_style.family_tree_findings(ROOT)}
    new = sorted(found)
    assert new == [], "\n".join(f"{f}: {m}" for f, m in new)


def test_family_exemptions_are_files_that_exist():
    for rel in check_style.FAMILY_EXEMPT:
        assert (ROOT / rel).is_file(), rel


# ---- rule 4: positional cache reads ---------------------------------------------------------


@pytest.mark.parametrize("body, what", [
    ("def f(x):\n    z, cache = gsu_fwd(x)\n    return cache[0]", "cache[0]"),
    ("def f(x):\n    cache = Ly.gelu_fwd(x)[1]\n    return cache[-1]", "cache[-1]"),
    ("def f(c):\n    return c.norm[2]", "c.norm[2]"),
    ("def f(c):\n    mix = c.mix\n    return mix[1]", "mix[1]"),
    ("def f(s):\n    return s.cache[1]", "s.cache[1]"),
    ("def f(caches):\n    for cache in caches:\n        cache[0]", "cache[0]"),
    ("def g_bwd(cache):\n    return cache[0]", "cache[0]"),  # no _fwd here: not its cache
])
def test_positional_cache_read_is_found(body, what):
    assert cache(body) == [what]


@pytest.mark.parametrize("body", [
    "def g_fwd(x):\n    return x, (x, x)\n\ndef g_bwd(cache, d):\n    return cache[0] * d",
    "def g_fwd(x):\n    return x, (x,)\n\ndef f(x):\n    y, cache = g_fwd(x)\n    return cache[0]",
    "def f(x):\n    z, cache = gsu_fwd(x)\n    return cache.Tx, cache.TW",
    "def f(x):\n    z, cache = gsu_fwd(x)\n    tx, tw, *_ = cache\n    return tx",
    "def f(c):\n    return c.norm.rstd, c.y[0], c.shape[1]",
])
def test_named_and_own_cache_reads_pass(body):
    assert cache(body) == []


def test_opaque_cache_fields_come_from_the_cache_classes():
    fields = check_style.opaque_cache_fields(ROOT)
    assert {"norm", "ssm", "act", "mix", "embed", "pool"} <= fields  # BlockCache, ModelCache
    assert "y" not in fields and "ln_vth" not in fields  # arrays, not caches


def test_tree_reads_no_cache_by_position_beyond_the_pending_ones():
    found = {(f, m.split(":")[0]) for f, _, m in check_style.cache_tree_findings(ROOT)}
    new = sorted(found)
    assert new == [], "\n".join(f"{f}: {m}" for f, m in new)


def test_cli_fails_on_family_branches_and_notes_cache_reads(tmp_path, capsys):
    root = tmp_path
    (root / "setup.cfg").write_text(
        "[options]\npackage_dir =\n    refimpl.cli = cli\n    refimpl.golden.data = golden\n"
        "packages =\n    refimpl\n    refimpl.cli\n    refimpl.golden.data\n")
    for pkg in ("refimpl", "cli", "golden"):
        (root / pkg).mkdir()
        (root / pkg / "__init__.py").write_text("")
    (root / "refimpl" / "config.py").write_text("FASTMATH = False\n")
    (root / "refimpl" / "x.py").write_text("def f(c):\n    return c.cache[0]\n")
    assert check_style.main(["--root", str(root), "--strict"]) == 0
    assert "refimpl/x.py:2: note: c.cache[0]" in capsys.readouterr().out
    assert check_style.main(["--root", str(root), "--positional-caches"]) == 1
    (root / "cli" / "y.py").write_text('def g(act):\n    return act == "sdn"\n')
    assert check_style.main(["--root", str(root)]) == 1
    assert "cli/y.py:2: compares with family name 'sdn'" in capsys.readouterr().out


# ---- the registry holds the facts -----------------------------------------------------------

#: Written from DESIGN.md 8 and the CLI's documented refusals, not from the code:
#: (record entries of the family, options it reads, needs SDN weights, threshold of the record)
SPEC = {
    "gelu": ((), set(), False, None),
    "binary": (("s", "h", "u"), {"surrogate", "grad_mode"}, False, 0.0),
    "lif": (("s", "h", "u"), {"surrogate", "grad_mode"}, False, 1.0),
    "refractory": (("s", "h", "u"), {"surrogate", "grad_mode", "neuron_impl"}, False, 1.0),
    "sdn": (("s", "m+x", "m"), {"surrogate", "grad_mode"}, True, 1.0),
    "binary_gsu": (("Tx",), set(), False, None),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_family_facts_are_the_spec(name):
    record, options, sdn, theta = SPEC[name]
    fam = ACTIVATIONS[name]
    assert fam.record_names == ("y", "v", *record, "out") == M.RECORD_NAMES[name]
    assert fam.options == options
    assert fam.needs_sdn_weights is sdn
    cfg = M.ModelConfig(n_classes=2, activation=name)
    assert fam.theta == theta == M.spike_threshold(cfg)
    assert cfg.family is fam


def test_record_names_is_a_view_of_the_registry(monkeypatch):
    class Extra(Activation):
        name = "extra"
        record = ("q",)

    monkeypatch.setitem(ACTIVATIONS, "extra", Extra())
    assert M.RECORD_NAMES["extra"] == ("y", "v", "q", "out")
    assert list(M.RECORD_NAMES) == list(ACTIVATIONS)


def test_margins_are_distances_to_the_threshold():
    rng = np.random.default_rng(0)
    rec = {k: rng.normal(size=(2, 3, 5)) for k in ("v", "h", "m+x")}
    np.testing.assert_array_equal(ACTIVATIONS["lif"].margins(rec)["s"], np.abs(rec["h"] - 1.0))
    np.testing.assert_array_equal(ACTIVATIONS["sdn"].margins(rec)["s"],
                                  np.abs(rec["m+x"] - 1.0))
    a = np.abs(rec["v"])
    want = np.abs(a - TERNARY_RATIO * a.max(axis=1, keepdims=True))  # per token, over channels
    np.testing.assert_array_equal(ACTIVATIONS["binary_gsu"].margins(rec)["Tx"], want)
    assert ACTIVATIONS["gelu"].margins(rec) == {}
    one = {k: v[0] for k, v in rec.items()}  # a plot's (H, L) record: the same per token
    np.testing.assert_array_equal(ACTIVATIONS["binary_gsu"].margins(one)["Tx"], want[0])


def test_neuron_config_is_built_once_per_model_config(monkeypatch):
    """The family and its NeuronConfig are resolved on construction: a training step and a
    streamed sequence build no NeuronConfig (they rebuilt one per block call before)."""
    cfg = M.ModelConfig(n_classes=2, activation="refractory", n_layers=2, neuron_impl="iterative")
    p, buf = M.init_model(cfg, 0)
    built = []
    init = neurons.NeuronConfig.__post_init__
    monkeypatch.setattr(neurons.NeuronConfig, "__post_init__",
                        lambda self: built.append(1) or init(self))
    x = np.random.default_rng(0).normal(size=(2, 6, 1))
    M.loss_and_grads(cfg, p, buf, x, np.array([0, 1]))
    from refimpl.stream import ModelStream
    ModelStream(cfg, p, buf).run(x, chunks="step")
    assert built == []
    assert cfg.neuron_config() is cfg.neuron_config()
    M.ModelConfig(n_classes=2, activation="lif")
    assert built == [1]  # construction is where it is built
