"""Run refimpl's benchmarks: ``make bench`` (all groups) or ``python benchmarks/run.py --only ssm``.

Writes ``benchmarks/results.json`` (machine-readable; groups not rerun keep their stored
results) and regenerates the generated regions of ``BENCHMARKS.md`` at the project top level,
keeping every hand-written line outside them. Both files are written atomically.

Groups live in ``benchmarks/bench_*.py`` modules and register themselves with
``harness.register``; see ``benchmarks/harness.py``. Progress goes to stderr.
"""
import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # run as a script from anywhere, or imported by a test
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402

from refimpl.atomic import atomic_write_text  # noqa: E402
from refimpl.table import render_table  # noqa: E402


def discover():
    """Import every ``bench_*.py`` next to this file (each registers its groups)."""
    for path in sorted(HERE.glob("bench_*.py")):
        importlib.import_module(path.stem)
    return harness.sorted_groups()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", metavar="GROUP",
                   help="run only this group (repeat or comma-separate for several); "
                        "the other groups' stored results are kept")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed repeats per figure after one warm-up call (default 7; "
                        "fewer than 5 is for smoke tests only)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes for smoke-testing (results are marked as quick)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="write results.json and BENCHMARKS.md into this folder instead of "
                        "benchmarks/results.json and ./BENCHMARKS.md")
    p.add_argument("--markdown-only", action="store_true",
                   help="run nothing; regenerate BENCHMARKS.md from the stored JSON")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a target is missed")
    p.add_argument("--list", action="store_true", help="list the groups and exit")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.quick and args.out_dir is None and not args.list:
        p.error("--quick would overwrite the committed reference results with smoke-test "
                "figures; add --out-dir DIR")
    return p, args


def select(parser, groups, only):
    if not only:
        return groups
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    known = {g.name: g for g in groups}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(map(repr, unknown))}; valid groups are "
                     + ", ".join(repr(n) for n in known))
    return [known[n] for n in dict.fromkeys(names)]


def main(argv=None):
    parser, args = parse_args(argv)
    groups = discover()
    if args.list:
        print(render_table(["group", "title"], [(g.name, g.title) for g in groups]))
        return 0
    if args.out_dir is not None:
        json_path = args.out_dir / "results.json"
        md_path = args.out_dir / "BENCHMARKS.md"
    else:
        json_path = HERE / "results.json"
        md_path = ROOT / "BENCHMARKS.md"
    doc = harness.load_results(json_path)

    failed, missed = [], []
    if not args.markdown_only:
        chosen = select(parser, groups, args.only)
        if args.repeats < 5 and not args.quick:
            print(f"warning: --repeats {args.repeats} < 5: medians will be unreliable",
                  file=sys.stderr)
        machine = harness.machine_info(ROOT)
        print(f"benchmarks on {machine['cpu_model']} ({machine['cpu_count']} cores), "
              f"refimpl threads {machine['refimpl_threads']}, "
              f"{args.repeats} repeats{', quick shapes' if args.quick else ''}",
              file=sys.stderr)
        for i, g in enumerate(chosen, 1):
            tag = f"[{g.name} {i}/{len(chosen)}]"

            def progress(msg, tag=tag):
                print(f"{tag} {msg}", file=sys.stderr, flush=True)

            ctx = harness.Context(g.name, args.repeats, args.quick, progress)
            t0 = time.perf_counter()
            try:
                g.fn(ctx)
            except Exception:  # noqa: BLE001 - report, keep the other groups' results
                print(f"{tag} FAILED:\n{traceback.format_exc()}", file=sys.stderr)
                failed.append(g.name)
                continue
            progress(f"done in {time.perf_counter() - t0:.1f} s")
            doc["groups"][g.name] = {
                "title": g.title,
                "description": g.description,
                "quick": args.quick,
                "repeats": args.repeats,
                "params": ctx.params,
                "machine": machine,
                "rows": ctx.rows,
            }
            missed += [f"{g.name}: {r['figure']} {r['speedup']:.2f}x < {r['target_speedup']:g}x"
                       for r in ctx.rows if r["target_met"] is False]
        if len(failed) < len(chosen):
            doc["machine"] = machine
            atomic_write_text(json_path, harness.dump_results(doc))
            print(f"wrote {json_path}", file=sys.stderr)

    existing = md_path.read_text(encoding="utf-8") if md_path.exists() else None
    markdown = harness.merge_markdown(existing, harness.render_regions(doc))
    atomic_write_text(md_path, markdown)
    print(f"wrote {md_path}", file=sys.stderr)

    for m in missed:
        print(f"TARGET MISSED {m}", file=sys.stderr)
    if failed:
        print(f"FAILED groups: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
