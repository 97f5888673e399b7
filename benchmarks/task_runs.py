"""Full training runs on every built-in task for the main activation families (issue 5).

    .venv/bin/python benchmarks/task_runs.py [--only-task adding] [--only-family lif]

Each run uses the default size below (trains in well under 10 minutes on 2 cores), writes
its run folder under ``runs/bench/`` (not committed), and the table of final test accuracy,
mean firing rate and wall time goes to ``benchmarks/task_runs.json`` and to the generated
region ``task-runs`` of ``BENCHMARKS.md``. The SDN family uses the published SpikingSSM SDN
weights from ``../shared/external`` when present, else refimpl's own trained weights
(``--sdn-weights``).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

from refimpl.activations import ACTIVATIONS  # noqa: E402
from refimpl.atomic import atomic_write_json, atomic_write_text  # noqa: E402

TASKS = {"adding": {"length": 200}, "listops": {"length": 128}, "recall": {"length": 200},
         "parity": {"length": 64}}
FAMILIES = ["gelu", "binary", "lif", "sdn", "refractory"]
SIZE = {"samples": 1000, "d_model": 32, "d_state": 16, "layers": 2, "epochs": 12,
        "batch_size": 32, "lr": 1e-2}
SHARED_SDN = ROOT.parent / "shared" / "external" / "sdn_spikingssm_tau0125.npz"


def run_one(task, family, sdn_weights, out_root):
    from refimpl import model as M
    from refimpl.sdn import load_weights
    from refimpl.tasks import make_task
    from refimpl.train import TrainConfig, train

    data = make_task(task, n=SIZE["samples"], L=TASKS[task]["length"], seed=0)
    cfg = M.ModelConfig.for_data(data, d_model=SIZE["d_model"], d_state=SIZE["d_state"],
                                 n_layers=SIZE["layers"], activation=family)
    tcfg = TrainConfig(epochs=SIZE["epochs"], batch_size=SIZE["batch_size"], lr=SIZE["lr"], seed=0)
    w = load_weights(sdn_weights)[0] if cfg.family.needs_sdn_weights else None
    t0 = time.perf_counter()
    metrics = train(cfg, tcfg, data, str(out_root / f"{task}-{family}"), sdn_weights=w,
                    overwrite=True)
    wall = time.perf_counter() - t0
    m = metrics[-1]
    return {"task": task, "family": family, "test_accuracy": m["test_accuracy"],
            "train_accuracy": m["train_accuracy"], "mean_firing_rate": m["mean_firing_rate"],
            "wall_s": wall, "epochs": SIZE["epochs"], "length": TASKS[task]["length"],
            "energy_pj": m["energy_pj"], "energy_ann_pj": m["energy_ann_pj"]}


def render(doc):
    s = doc["size"]
    lines = ["## Full training runs on the built-in tasks", "",
             f"Measured {doc['machine']['date']} on {doc['machine']['cpu_model']} "
             f"({doc['machine']['cpu_count']} cores). Size: {s['samples']} samples (80 % train), "
             f"d_model {s['d_model']}, d_state {s['d_state']}, {s['layers']} layers, "
             f"{s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']}, seed 0. "
             "Energy: SpikingSSM estimate per sample (mixing layers only), ANN = all MACs.",
             "",
             "| task | L | family | test acc | train acc | mean firing rate | energy / ANN "
             "| wall time |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        rate = "-" if r["mean_firing_rate"] is None else f"{r['mean_firing_rate']:.3f}"
        lines.append(f"| {r['task']} | {r['length']} | {r['family']} | {r['test_accuracy']:.3f} | "
                     f"{r['train_accuracy']:.3f} | {rate} | "
                     f"{r['energy_pj'] / r['energy_ann_pj']:.3f} | {r['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only-task", action="append", choices=sorted(TASKS))
    p.add_argument("--only-family", action="append", choices=FAMILIES)
    p.add_argument("--sdn-weights", default=str(SHARED_SDN))
    args = p.parse_args(argv)
    out_json = HERE / "task_runs.json"
    doc = json.loads(out_json.read_text()) if out_json.exists() else {"runs": []}
    doc["size"] = SIZE
    doc["machine"] = harness.machine_info(ROOT)
    keep = {(r["task"], r["family"]): r for r in doc["runs"]}
    for task in args.only_task or list(TASKS):
        for fam in args.only_family or FAMILIES:
            if ACTIVATIONS[fam].needs_sdn_weights and not os.path.exists(args.sdn_weights):
                print(f"skip {task}/sdn: no SDN weights at {args.sdn_weights}", file=sys.stderr)
                continue
            print(f"[task runs] {task} / {fam} ...", file=sys.stderr, flush=True)
            r = run_one(task, fam, args.sdn_weights, ROOT / "runs" / "bench")
            print(f"[task runs] {task} / {fam}: test acc {r['test_accuracy']:.3f}, "
                  f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
            keep[(task, fam)] = r
            doc["runs"] = [keep[k] for k in sorted(keep, key=lambda k: (list(TASKS).index(k[0]),
                                                                          FAMILIES.index(k[1])))]
            atomic_write_json(out_json, doc)
            md = ROOT / "BENCHMARKS.md"
            text = md.read_text() if md.exists() else None
            atomic_write_text(md, harness.merge_markdown(text, {"task-runs": render(doc)}))


if __name__ == "__main__":
    main()
