"""Check what a built wheel and sdist hold (``make wheel-check`` runs it after the build).

``python tools/check_dist.py DIST_DIR`` finds the one ``*.whl`` and the one ``*.tar.gz`` in
``DIST_DIR`` and compares them with this checkout:

- wheel: every package of setup.cfg, installed under ``refimpl/`` only (no top-level ``cli``
  or ``golden``), ``refimpl/golden/data/SCHEMA.md`` and every ``golden/v1/*.h5`` of the checkout
  as ``refimpl/golden/data/v1/*.h5``, the LICENSE in ``*.dist-info``, the console script;
- sdist: LICENSE, setup.cfg, pyproject.toml, the golden files and every ``tests/*.py`` that git
  tracks (so the sdist can run the test suite; untracked files never reach an sdist).

Prints one line per problem and exits 1 if any; prints a one-line summary otherwise.
"""
import configparser
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one(folder, pattern):
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} in {folder}, found {[p.name for p in found]}")
    return found[0]


def _packages(root):
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg", encoding="utf-8")
    return [p.strip() for p in cfg.get("options", "packages").splitlines() if p.strip()]


def _tracked(root, pattern):
    """Files matching ``pattern`` that git tracks (what setuptools-scm puts in the sdist);
    outside a git checkout, every matching file."""
    try:
        out = subprocess.run(["git", "ls-files", "--", pattern], cwd=root, capture_output=True,
                             text=True, check=True, timeout=30).stdout
        return sorted(out.split())
    except (OSError, subprocess.SubprocessError):
        return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))


def wheel_problems(names, root=ROOT):
    """Problems with a wheel whose member names are ``names``."""
    names = set(names)
    problems = []
    tops = {n.split("/", 1)[0] for n in names}
    stray = sorted(t for t in tops if t != "refimpl" and not t.endswith(".dist-info"))
    if stray:
        problems.append(f"wheel: top-level entries besides refimpl/ and the dist-info: {stray}")
    for pkg in _packages(root):
        init = pkg.replace(".", "/") + "/__init__.py"
        if init not in names:
            problems.append(f"wheel: package {pkg} missing ({init})")
    want = ["refimpl/golden/data/SCHEMA.md"]
    h5 = sorted((root / "golden" / "v1").glob("*.h5"))
    want += [f"refimpl/golden/data/v1/{p.name}" for p in h5]
    if len(want) == 1:
        problems.append(f"checkout: no golden/v1/*.h5 under {root}")
    problems += [f"wheel: {w} missing" for w in want if w not in names]
    if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in names):
        problems.append("wheel: no LICENSE in the dist-info")
    ep = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    if not ep:
        problems.append("wheel: no entry_points.txt (the refimpl command)")
    return problems


def sdist_problems(names, root=ROOT):
    """Problems with an sdist whose member names are ``names`` (``refimpl-X.Y.Z/...``)."""
    prefix = {n.split("/", 1)[0] for n in names}
    if len(prefix) != 1:
        return [f"sdist: expected one top folder, found {sorted(prefix)}"]
    (prefix,) = prefix
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    want = ["LICENSE", "README.md", "setup.cfg", "pyproject.toml", "golden/SCHEMA.md"]
    want += _tracked(root, "golden/v1/*.h5") + _tracked(root, "tests/*.py")
    if not any(w.startswith("tests/") for w in want):
        return [f"checkout: no tests/*.py under {root}"]
    return [f"sdist: {prefix}/{w} missing" for w in want if w not in rel]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python tools/check_dist.py DIST_DIR")
    dist = Path(argv[0])
    whl, sdist = _one(dist, "*.whl"), _one(dist, "*.tar.gz")
    with zipfile.ZipFile(whl) as z:
        wnames = z.namelist()
    with tarfile.open(sdist) as t:
        snames = t.getnames()
    problems = wheel_problems(wnames) + sdist_problems(snames)
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"check_dist: {whl.name} ({len(wnames)} files) and {sdist.name} ({len(snames)} "
          "entries) hold the packages, golden files, LICENSE and tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
