"""A mutation run: does the test suite notice a one-line change to the code users rely on?

Each mutant of :data:`MUTANTS` replaces one exact snippet of one module (it must occur exactly
once) and runs the tests that should notice it (``-x``, the ``dev`` hypothesis profile, slow
tests excluded: a subset of ``make test``). A mutant is *killed* when those tests fail; one
that survives the subset is run against the whole of ``make test``'s selection before it is
called a survivor. The module is restored after every mutant, also on an interrupt.

Run it in a checkout nobody else is editing (it rewrites the modules in place)::

    .venv/bin/python tools/mutation_run.py [--only ID ...] [--json out.json]

It prints one line per mutant and the kill rate; ``--json`` writes the results.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
          "--hypothesis-profile=dev", "-m", "not slow"]

#: (id, module, snippet, replacement, tests that should notice it).
MUTANTS = []


def mutant(mid, path, old, new, *tests):
    MUTANTS.append((mid, path, old, new, tests))


LM = ("tests/test_pinned_lm.py", "tests/test_lm_train.py", "tests/test_lm.py")
TEXT = ("tests/test_text.py", "tests/test_pinned_lm.py", "tests/test_generate_validation.py")
SAMPLING = ("tests/test_generate_validation.py", "tests/test_lm.py")
STREAM = ("tests/test_pinned_stream_plot.py", "tests/test_stream_model.py")
VERIFY = ("tests/test_pinned_verify.py", "tests/test_golden_half.py", "tests/test_golden.py")
PLOT = ("tests/test_pinned_stream_plot.py", "tests/test_plot.py", "tests/test_plot_metrics.py")

# lm_train: what train --text reports
mutant("eval-loss-weight", "refimpl/lm_train.py", "loss_sum += float(loss) * len(x)",
       "loss_sum += float(loss) * batch_size", *LM)
mutant("eval-rate-weight", "refimpl/lm_train.py",
       "v in st[\"rates\"]]) * len(x)", "v in st[\"rates\"]]) * batch_size", *LM)
mutant("eval-mean", "refimpl/lm_train.py", "    loss = loss_sum / n\n",
       "    loss = loss_sum / (n + 1)\n", *LM)
mutant("eval-tokens", "refimpl/lm_train.py", "\"tokens\": n * context}",
       "\"tokens\": n * (context + 1)}", *LM)
mutant("baseline-slice", "refimpl/lm_train.py", "* C + 1]  # what evaluate_lm scores",
       "* C]  # what evaluate_lm scores", *LM)
mutant("bits-ln2", "refimpl/lm_train.py", "\"bits_per_token\": loss / math.log(2)",
       "\"bits_per_token\": loss / math.log(2.0001)", *LM)
# text: windows, baselines, splits
mutant("unigram-smoothing", "refimpl/text.py", "np.log2((counts + 1.0) / (len(train_ids) + V))",
       "np.log2((counts + 1.0) / (len(train_ids) + V - 1))", *TEXT)
mutant("unigram-targets", "refimpl/text.py", "return float(-np.mean(log2p[val_ids[1:]]))",
       "return float(-np.mean(log2p[val_ids[:-1]]))", *TEXT)
mutant("bigram-smoothing", "refimpl/text.py",
       "np.log2((pair + 1.0) / (row[val_ids[:-1]] + V))",
       "np.log2((pair + 1.0) / (row[val_ids[:-1]] + V + 1))", *TEXT)
mutant("eval-windows-count", "refimpl/text.py", "n_windows = (len(ids) - 1) // context",
       "n_windows = len(ids) // context", *TEXT)
mutant("windows-start", "refimpl/text.py",
       "start = rng.integers(0, len(ids) - context, size=batch_size",
       "start = rng.integers(0, len(ids) - context - 1, size=batch_size", *TEXT)
mutant("split-round", "refimpl/text.py", "n_val = int(round(val_frac * n))",
       "n_val = int(val_frac * n)", *TEXT)
# sampling
mutant("cdf-scale", "refimpl/sampling.py", "cdf = np.cumsum(p, axis=1)",
       "cdf = 0.999 * np.cumsum(p, axis=1)", *SAMPLING)
mutant("cdf-compare", "refimpl/sampling.py", "pick = (cdf <= u[:, None]).sum(axis=1)",
       "pick = (cdf < u[:, None]).sum(axis=1)", *SAMPLING)
mutant("top-k-cut", "refimpl/sampling.py", "order[:, top_k:]] = 0.0",
       "order[:, top_k + 1:]] = 0.0", *SAMPLING)
mutant("temperature", "refimpl/sampling.py",
       "e = (z - z.max(axis=1, keepdims=True)) / temperature",
       "e = (z - z.max(axis=1, keepdims=True)) * temperature", *SAMPLING)
mutant("greedy", "refimpl/sampling.py",
       "return z.argmax(axis=1).astype(np.int64)\n    return _draw(_probabilities(z, temperature, "
       "top_k), rng", "return z.argmin(axis=1).astype(np.int64)\n    return _draw(_probabilities("
       "z, temperature, top_k), rng", *SAMPLING)
# stream tolerances
mutant("stream-membrane-bound", "refimpl/stream.py", "membrane.append(16 * EPS * depth * scale)",
       "membrane.append(160 * EPS * depth * scale)", *STREAM)
mutant("stream-readout", "refimpl/stream.py",
       "readout = L if cfg.head == \"classifier\" else H",
       "readout = H if cfg.head == \"classifier\" else L", *STREAM)
mutant("stream-norm-gain", "refimpl/stream.py", "depth *= max(1.0, rec[\"norm_gain\"])",
       "depth *= rec[\"norm_gain\"]", *STREAM)
mutant("stream-depth", "refimpl/stream.py",
       "layer_depth = 2 * math.ceil(math.log2(2 * L)) + 2 * L + N2 + 4 * H + 16",
       "layer_depth = 2 * math.ceil(math.log2(2 * L)) + L + N2 + 4 * H + 16", *STREAM)
# golden verify / profiles
mutant("verify-worst-index", "refimpl/golden/tensors.py",
       "i = np.unravel_index(int(np.argmax(ratio)), ref.shape)",
       "i = np.unravel_index(int(np.argmin(ratio)), ref.shape)", *VERIFY)
mutant("untestable-half", "refimpl/golden/verify.py", "atol > 0 and atol >= mag",
       "atol > 0 and atol >= mag / 2", *VERIFY)
mutant("profile-input-rounding", "refimpl/golden/profiles.py",
       "(1.0 + INPUT_ROUNDING) * k * spread)", "k * spread)", *VERIFY)
mutant("profile-safety", "refimpl/golden/profiles.py", "return a, SAFETY * profile.eps",
       "return a, 2 * SAFETY * profile.eps", *VERIFY)
mutant("select-tolerance", "refimpl/golden/profiles.py", "rel_tol=0.0,\n",
       "rel_tol=1e-3,\n", *VERIFY)
mutant("profile-floor", "refimpl/golden/profiles.py", "            k * floor)",
       "            floor)", *VERIFY)
# plot
mutant("raster-peak", "refimpl/plot.py", "peak = np.max(membrane, axis=1)",
       "peak = np.min(membrane, axis=1)", *PLOT)
mutant("raster-order", "refimpl/plot.py", "    return order[:k]\n", "    return order[-k:]\n",
       *PLOT)
mutant("raster-count", "refimpl/plot.py",
       "order = np.lexsort((np.arange(len(count)), -peak, -count))",
       "order = np.lexsort((np.arange(len(count)), -peak, count))", *PLOT)
# optim: the schedule every trainer reports
mutant("warmup-linear", "refimpl/optim.py", "        return (step + 1) / warm",
       "        return step / warm", "tests/test_pinned_lm.py", "tests/test_optim.py")
mutant("cosine-denominator", "refimpl/optim.py", "progress = (step - warm) / (total - warm)",
       "progress = (step - warm) / (total - warm - 1)", "tests/test_pinned_lm.py",
       "tests/test_optim.py")
mutant("warmup-rounding", "refimpl/train.py",
       "warmup_steps=min(int(round(tcfg.warmup_frac * total)), total - 1)",
       "warmup_steps=min(int(tcfg.warmup_frac * total), total - 1)", "tests/test_pinned_lm.py",
       "tests/test_training_loop.py")


def run_tests(tests, timeout):
    """True when the tests pass (the mutant survived them)."""
    try:
        r = subprocess.run(PYTEST + list(tests), cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False  # a hang is noticed (make test would not finish)
    return r.returncode == 0


def apply(path, old, new):
    """Replace ``old`` (exactly once) in ``path``; returns the original text."""
    p = ROOT / path
    text = p.read_text(encoding="utf-8")
    n = text.count(old)
    if n != 1:
        raise SystemExit(f"{path}: the snippet {old!r} occurs {n} times, not once")
    p.write_text(text.replace(old, new), encoding="utf-8")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run these mutant ids only")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--full", action="store_true",
                    help="check survivors against the whole make test selection")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only]
    results = []
    for mid, path, old, new, tests in chosen:
        original = apply(path, old, new)
        t0 = time.perf_counter()
        try:
            survived = run_tests(tests, timeout=600)
            if survived and args.full:
                survived = run_tests(["tests"], timeout=1800)
        finally:
            (ROOT / path).write_text(original, encoding="utf-8")
        status = "SURVIVED" if survived else "killed"
        results.append({"id": mid, "module": path, "from": old, "to": new,
                        "tests": list(tests), "status": status,
                        "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{status:8s} {mid:28s} {path}  ({results[-1]['seconds']} s)", flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    rate = 100.0 * killed / max(len(results), 1)
    print(f"{killed} of {len(results)} mutants killed ({rate:.1f} %)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
