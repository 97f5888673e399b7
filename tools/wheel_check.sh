#!/usr/bin/env bash
# make wheel-check: build the sdist and the wheel (the wheel from the sdist, so the sdist must be
# complete), check what they hold (tools/check_dist.py), install the wheel into a fresh virtual
# environment outside the checkout and run the installed `refimpl golden` commands from a
# temporary folder, where the checkout cannot be imported by accident.
#
# Usage: tools/wheel_check.sh PYTHON
#   PYTHON  an interpreter with `build` installed (the project's .venv/bin/python); the fresh
#           environment is made with the same interpreter.
# Everything goes into one `mktemp -d` folder, removed on exit (also on failure or Ctrl-C).
# pip's cache is used as usual, so after the first run nothing is downloaded.
set -euo pipefail

PY=${1:?usage: tools/wheel_check.sh PYTHON}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/refimpl-wheel-check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
unset PYTHONPATH PYTHONHOME
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { printf '\n== wheel-check: %s\n' "$*"; }
t0=$SECONDS

step "build the sdist, then the wheel from it"
# The build runs in the checkout (setuptools-scm reads git for the sdist's file list); only
# refimpl.egg-info/ (git-ignored) is written there, the artefacts go to $TMP/dist.
"$PY" -m build --outdir "$TMP/dist" "$ROOT" > "$TMP/build.log" 2>&1 || {
    cat "$TMP/build.log"; echo "wheel-check: the build failed" >&2; exit 1; }
ls -l "$TMP/dist"

step "contents of the wheel and the sdist"
"$PY" "$ROOT/tools/check_dist.py" "$TMP/dist"

step "install the wheel into a fresh environment ($TMP/venv)"
# Resolve symlinks so the new venv is built on the base interpreter, not nested in .venv.
"$PY" -c 'import sys; print(sys._base_executable)' > "$TMP/base"
"$(cat "$TMP/base")" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install --quiet "$TMP"/dist/*.whl

mkdir "$TMP/run"
cd "$TMP/run"
step "the installed package (from $PWD)"
"$VPY" - "$TMP/venv" <<'EOF'
import importlib.resources
import importlib.util
import os
import sys

import refimpl
import refimpl.cli.main

venv = os.path.realpath(sys.argv[1])
for mod in (refimpl, refimpl.cli.main):
    where = os.path.realpath(mod.__file__)
    assert where.startswith(venv + os.sep), f"{mod.__name__} imported from {where}, not {venv}"
for top in ("cli", "golden"):
    assert importlib.util.find_spec(top) is None, f"a top-level package {top!r} is installed"
data = importlib.resources.files("refimpl.golden.data")
assert (data / "SCHEMA.md").is_file(), "refimpl.golden.data/SCHEMA.md missing"
h5 = sorted(p.name for p in (data / "v1").iterdir() if p.name.endswith(".h5"))
assert h5, "no golden files in refimpl.golden.data/v1"
print(f"refimpl {refimpl.__version__} from {os.path.dirname(refimpl.__file__)}; "
      f"no top-level cli/golden; {len(h5)} golden files: {', '.join(h5)}")
EOF

step "refimpl golden check (every committed case, recomputed by the installed refimpl)"
"$TMP/venv/bin/refimpl" golden check > check.txt || { cat check.txt; exit 1; }
grep -E '^(PASSED|FAILED)' check.txt

step "refimpl golden verify: a golden file, a candidate, a wrong candidate"
GOLDEN=$("$VPY" -c 'import importlib.resources as r; print(r.files("refimpl.golden.data") / "v1/fftconv.h5")')
cp "$GOLDEN" fftconv.h5
chmod u+w fftconv.h5
# verify accepts a golden file as its own candidate (read_candidate takes both schemas)
"$TMP/venv/bin/refimpl" golden verify fftconv.h5 | tail -n 1
"$VPY" - <<'EOF'
import shutil

import h5py
import numpy as np

shutil.copy("fftconv.h5", "candidate.h5")
with h5py.File("candidate.h5", "r+") as f:
    f.attrs["schema"] = "refimpl-golden-candidate"
shutil.copy("candidate.h5", "wrong.h5")
with h5py.File("wrong.h5", "r+") as f:
    for cid, case in f["cases"].items():
        outs = case.get("outputs")
        floats = [d for d in (outs.values() if outs else ()) if d.dtype.kind == "f" and d.size]
        if floats:
            floats[0][...] = np.asarray(floats[0]) + 1.0
            print(f"wrong.h5: case {cid}, {floats[0].name} shifted by 1")
            break
    else:
        raise SystemExit("no float output to perturb in fftconv.h5")
EOF
"$TMP/venv/bin/refimpl" golden verify candidate.h5 | tail -n 1
if "$TMP/venv/bin/refimpl" golden verify wrong.h5 > wrong.txt; then
    cat wrong.txt; echo "wheel-check: verify accepted a wrong candidate" >&2; exit 1
fi
grep -m1 MISMATCH wrong.txt

step "refimpl golden show neuron (a suite name, resolved in the installed package data)"
"$TMP/venv/bin/refimpl" golden show neuron > show.txt || { cat show.txt; exit 1; }
head -n 5 show.txt

step "refimpl plot without matplotlib (installed without extras): one line naming the install"
# The plot extra is optional: the fresh environment has no matplotlib, so the command must stop
# with exit status 1 and one line saying how to install it (not a traceback).
"$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("matplotlib") is not None)' || {
    echo "wheel-check: matplotlib is installed in the fresh environment; the check needs it absent" >&2; exit 1; }
rc=0
"$TMP/venv/bin/refimpl" plot . > plot.txt 2>&1 || rc=$?
if [ "$rc" -ne 1 ] || [ "$(wc -l < plot.txt)" -ne 1 ] || ! grep -qF "pip install 'refimpl[plot]'" plot.txt; then
    cat plot.txt
    echo "wheel-check: refimpl plot without matplotlib must exit 1 (got $rc) with one line naming pip install 'refimpl[plot]'" >&2
    exit 1
fi
cat plot.txt

step "refimpl conform: an adapter file of the user's, in process and on the process pool"
# hypothesis comes with the wheel (install_requires); the pool's spawned workers import the
# installed refimpl and load the adapter by its path. A correct adapter passes, a planted bug
# fails with its minimal case, which the installed verify reproduces. Without the dask extra,
# --scheduler stops with one line naming it.
cat > adapter.py <<'EOF2'
import numpy as np


def meanpool(inputs, params):
    x = inputs["x"]
    if x.ndim != 3 or x.shape[2] == 0:
        raise ValueError("x must be (B, H, L), L >= 1")
    return {"y": x.mean(axis=2)}


def meanpool_vjp(inputs, params, cotangents):
    x = inputs["x"]
    return {"x": np.broadcast_to(cotangents["y"][:, :, None] / x.shape[2], x.shape).copy()}


class buggy:  # the VJP without 1 / L
    meanpool = staticmethod(meanpool)

    @staticmethod
    def meanpool_vjp(inputs, params, cotangents):
        x = inputs["x"]
        return {"x": np.broadcast_to(cotangents["y"][:, :, None], x.shape).copy()}
EOF2
"$TMP/venv/bin/refimpl" conform adapter.py --examples 10 --workers 1 | tail -n 1
"$TMP/venv/bin/refimpl" conform adapter.py --examples 20 --workers 2 | tail -n 1
if "$TMP/venv/bin/refimpl" conform adapter.py:buggy --examples 10 --workers 1 --out fails > conform.txt; then
    cat conform.txt; echo "wheel-check: conform passed a planted bug" >&2; exit 1
fi
tail -n 1 conform.txt
"$TMP/venv/bin/refimpl" conform adapter.py:buggy --replay fails/meanpool.h5 --candidate cand.h5 > /dev/null
if "$TMP/venv/bin/refimpl" golden verify cand.h5 --golden fails > verify.txt; then
    cat verify.txt; echo "wheel-check: the minimal case did not reproduce" >&2; exit 1
fi
grep -m1 MISMATCH verify.txt
rc=0
"$TMP/venv/bin/refimpl" conform adapter.py --scheduler tcp://127.0.0.1:8786 > dask.txt 2>&1 || rc=$?
if [ "$rc" -ne 1 ] || ! grep -qF "pip install 'refimpl[dask]'" dask.txt; then
    cat dask.txt; echo "wheel-check: --scheduler without dask must name the extra" >&2; exit 1
fi
cat dask.txt

step "passed in $((SECONDS - t0)) s"
