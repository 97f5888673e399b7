"""Language-model runs (issue 14): bits per byte on >= 1 MB of English that ships with Python.

    .venv/bin/python benchmarks/lm_runs.py [--only-family lif] [--minutes 10] [--quick]

The corpus (:func:`stdlib_english`) is the documentation that ships with the running Python:
the pydoc topics (``pydoc_data.topics.topics``) and then the docstrings of the standard
library's modules, classes and functions in sorted module order, until ``--min-bytes``
(default 1.1 MB); its SHA-256 and the Python version are recorded (another Python version gives
another corpus). Per family a byte-level model (``SIZE``) is trained for as many epochs as fit
in ``--minutes`` of training (estimated from timed steps before the run; the schedule needs the
total up front), then scored on the held-out last 10 %: validation bits per byte beside the
unigram and bigram baselines of the same bytes, per-layer firing rate, energy per token, the
training time, the generation speed and a 200-byte sample (temperature 0.8, seed 0). Results go
to ``benchmarks/lm_runs.json`` and the generated region ``lm-runs`` of ``BENCHMARKS.md``; run
folders under ``runs/bench-lm/`` (not committed). ``--quick`` is a smoke test (a 60 KB corpus,
seconds per family, written to ``--out-dir``).
"""
import argparse
import ast
import hashlib
import json
import os
import pkgutil
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

from refimpl.activations import ACTIVATIONS  # noqa: E402
from refimpl.atomic import atomic_write_json, atomic_write_text  # noqa: E402

FAMILIES = ["gelu", "binary", "lif", "sdn", "refractory"]
SIZE = {"d_model": 64, "d_state": 32, "layers": 2, "context": 128, "batch_size": 32,
        "lr": 3e-3, "val_frac": 0.1}
QUICK = {"d_model": 8, "d_state": 4, "layers": 1, "context": 32, "batch_size": 8, "lr": 1e-2,
         "val_frac": 0.1}
SHARED_SDN = ROOT.parent / "shared" / "external" / "sdn_spikingssm_tau0125.npz"


def stdlib_english(min_bytes):
    """English prose shipped with Python: the pydoc topics, then stdlib docstrings (sorted
    modules; module, class and function docstrings in source order), UTF-8, >= min_bytes."""
    from pydoc_data.topics import topics
    parts = [topics[k] for k in sorted(topics)]
    size = sum(len(p.encode()) for p in parts)
    stdlib = sysconfig.get_paths()["stdlib"]
    for m in sorted(pkgutil.iter_modules([stdlib]), key=lambda m: m.name):
        if size >= min_bytes:
            break
        path = os.path.join(stdlib, m.name + ".py")
        if not os.path.isfile(path):
            continue
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree] + [n for n in ast.walk(tree) if isinstance(
                n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]:
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
                size += len(doc.encode()) + 2
    return "\n\n".join(parts)


def run_one(family, corpus_path, size, minutes, sdn_weights, out_root):
    import numpy as np

    from refimpl import model as M
    from refimpl.sampling import generate
    from refimpl.lm_train import steps_per_epoch, train_lm
    from refimpl.optim import adamw_init, adamw_step, make_groups
    from refimpl.sdn import load_weights
    from refimpl.stream import ModelStream
    from refimpl.text import load_text, windows
    from refimpl.train import TrainConfig, load_checkpoint

    text = load_text(corpus_path, vocab="bytes", context=size["context"],
                     val_frac=size["val_frac"])
    cfg = M.ModelConfig.for_lm(text.vocab.size, d_model=size["d_model"], d_state=size["d_state"],
                               n_layers=size["layers"], activation=family)
    w = load_weights(sdn_weights)[0] if cfg.family.needs_sdn_weights else None
    # the step time, to fit the epochs into the budget (the cosine schedule needs the total)
    p, buf = M.init_model(cfg, 0, sdn_weights=w)
    opt, groups = adamw_init(p), make_groups(p, size["lr"], 1e-2, M.optimizer_rules(size["lr"]))
    x = windows(text.train, text.context, size["batch_size"], np.random.default_rng(0))
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        _, _, g, buf, _ = M.loss_and_grads(cfg, p, buf, x, None, training=True)
        adamw_step(p, g, opt, groups)
        times.append(time.perf_counter() - t0)
    per_epoch = steps_per_epoch(text, size["batch_size"])
    epoch_s = sorted(times[1:])[1] * per_epoch * 1.1  # median of 3, 10 % for evaluation
    epochs = max(1, int(minutes * 60 // epoch_s))
    tcfg = TrainConfig(epochs=epochs, batch_size=size["batch_size"], lr=size["lr"], seed=0)
    out = out_root / f"lm-{family}"
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    metrics = train_lm(cfg, tcfg, text, str(out), sdn_weights=w, overwrite=True)
    wall = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    if wall > minutes * 60 * 1.2:  # the machine was busier than when the steps were timed
        print(f"[lm runs] {family}: training took {wall:.0f} s, over the {minutes:g}-minute "
              f"budget (load {load[0]:.1f} -> {load[1]:.1f}): rerun it on a quieter machine",
              file=sys.stderr)
    ck = load_checkpoint(str(out / "checkpoint.h5"))
    prompt = text.vocab.encode("The ")[None]
    ids, info = generate(ModelStream(ck.cfg, ck.params, ck.buffers), prompt, 200,
                         temperature=0.8, seed=0)
    m = metrics[-1]
    return {"family": family, "epochs": epochs, "steps": epochs * per_epoch, "train_s": wall,
            "load_before_after": load,
            "val_bits_per_byte": m["val_bits_per_token"],
            "unigram_bits_per_byte": m["unigram_bits_per_token"],
            "bigram_bits_per_byte": m["bigram_bits_per_token"],
            "firing_rate": m["firing_rate"], "mean_firing_rate": m["mean_firing_rate"],
            "energy_per_token_pj": m["energy_per_token_pj"],
            "energy_ann_per_token_pj": m["energy_ann_per_token_pj"],
            "train_tokens_per_second": m["tokens_per_second"],
            "generate_tokens_per_second": info["tokens_per_second"],
            "sample": "The " + text.vocab.decode(ids[0])}


def render(doc):
    s, c = doc["size"], doc["corpus"]
    lines = ["## Language models on English text (issue 14)", "",
             f"Measured {doc['machine']['date']} on {doc['machine']['cpu_model']} "
             f"({doc['machine']['cpu_count']} cores). Corpus: {c['bytes']:,} bytes of the "
             f"documentation shipped with Python {c['python']} (pydoc topics, then stdlib "
             f"docstrings; SHA-256 {c['sha256'][:12]}...), bytes (V = 256), the last "
             f"{s['val_frac']:.0%} held out. Model: d_model {s['d_model']}, d_state "
             f"{s['d_state']}, {s['layers']} layers, context {s['context']}, batch "
             f"{s['batch_size']}, lr {s['lr']}; as many epochs as fit in "
             f"{doc['minutes']:g} minutes of training. Baselines: add-one unigram and bigram on "
             "the same validation bytes.", "",
             "| family | val bits/byte | unigram | bigram | firing rate | energy / token (ANN) "
             "| training | generation |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in doc["runs"]:
        rates = ", ".join("-" if v is None else f"{v:.3f}" for v in r["firing_rate"])
        lines.append(f"| {r['family']} | {r['val_bits_per_byte']:.3f} | "
                     f"{r['unigram_bits_per_byte']:.3f} | {r['bigram_bits_per_byte']:.3f} | "
                     f"{rates} | {r['energy_per_token_pj']:.0f} pJ "
                     f"({r['energy_ann_per_token_pj']:.0f} pJ) | {r['train_s']:.0f} s, "
                     f"{r['epochs']} epochs, {r['train_tokens_per_second']:.0f} tok/s | "
                     f"{r['generate_tokens_per_second']:.0f} tok/s |")
    lines += ["", "Samples (prompt `The `, 200 bytes, temperature 0.8, seed 0):", ""]
    for r in doc["runs"]:
        lines += [f"- `{r['family']}`: " + json.dumps(r["sample"], ensure_ascii=False)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only-family", action="append", choices=FAMILIES)
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per family")
    p.add_argument("--min-bytes", type=int, default=1_100_000)
    p.add_argument("--sdn-weights", default=str(SHARED_SDN))
    p.add_argument("--quick", action="store_true", help="smoke test (tiny corpus and model)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write lm_runs.json and BENCHMARKS.md here (required with --quick)")
    args = p.parse_args(argv)
    if args.quick and args.out_dir is None:
        p.error("--quick would overwrite the committed results: pass --out-dir")
    size = QUICK if args.quick else SIZE
    minutes = 0.05 if args.quick else args.minutes
    out_dir = args.out_dir or HERE
    runs_root = (args.out_dir or ROOT / "runs") / "bench-lm"
    runs_root.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_english(60_000 if args.quick else args.min_bytes)
    corpus_path = runs_root / "corpus.txt"
    corpus_path.write_text(corpus, encoding="utf-8")
    data = corpus.encode()
    out_json = out_dir / "lm_runs.json"
    doc = json.loads(out_json.read_text()) if out_json.exists() else {"runs": []}
    doc.update(size=size, minutes=minutes, machine=harness.machine_info(ROOT),
               corpus={"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "python": sys.version.split()[0]})
    keep = {r["family"]: r for r in doc["runs"]}
    for fam in args.only_family or FAMILIES:
        if ACTIVATIONS[fam].needs_sdn_weights and not os.path.exists(args.sdn_weights):
            print(f"skip sdn: no SDN weights at {args.sdn_weights}", file=sys.stderr)
            continue
        print(f"[lm runs] {fam} ...", file=sys.stderr, flush=True)
        r = run_one(fam, corpus_path, size, minutes, args.sdn_weights, runs_root)
        print(f"[lm runs] {fam}: {r['val_bits_per_byte']:.3f} bits/byte (bigram "
              f"{r['bigram_bits_per_byte']:.3f}), {r['train_s']:.0f} s", file=sys.stderr,
              flush=True)
        keep[fam] = r
        doc["runs"] = [keep[k] for k in FAMILIES if k in keep]
        atomic_write_json(out_json, doc)
        md = (args.out_dir or ROOT) / "BENCHMARKS.md"
        old = md.read_text() if md.exists() else None
        atomic_write_text(md, harness.merge_markdown(old, {"lm-runs": render(doc)}))


if __name__ == "__main__":
    main()
