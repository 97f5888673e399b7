"""Packaging facts that need no build (``make wheel-check`` builds and installs the wheel):
the LICENSE, setup.cfg's license and extras, and the content rules of tools/check_dist.py."""
import configparser
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_dist  # noqa: E402


def _cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def test_license_is_mit_and_declared():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the refimpl developers" in text
    cfg = _cfg()
    assert cfg.get("metadata", "license") == "MIT"
    assert cfg.get("metadata", "license_files").split() == ["LICENSE"]


def test_dev_extra_has_the_lint_and_build_tools():
    dev = [line.split(">")[0].split("<")[0].strip()
           for line in _cfg().get("options.extras_require", "dev").splitlines() if line.strip()]
    assert {"ruff", "build"} <= set(dev)


def _wheel_names():
    names = [p.replace(".", "/") + "/__init__.py" for p in check_dist._packages(ROOT)]
    names += ["refimpl/golden/data/SCHEMA.md"]
    names += [f"refimpl/golden/data/v1/{p.name}" for p in (ROOT / "golden" / "v1").glob("*.h5")]
    names += ["refimpl-0.1.0.dist-info/licenses/LICENSE",
              "refimpl-0.1.0.dist-info/entry_points.txt"]
    return names


def test_check_dist_wheel_rules():
    good = _wheel_names()
    assert check_dist.wheel_problems(good, ROOT) == []
    assert check_dist.wheel_problems(good + ["cli/__init__.py"], ROOT) == [
        "wheel: top-level entries besides refimpl/ and the dist-info: ['cli']"]
    no_license = [n for n in good if not n.endswith("LICENSE")]
    assert check_dist.wheel_problems(no_license, ROOT) == ["wheel: no LICENSE in the dist-info"]
    no_h5 = [n for n in good if not n.endswith("fftconv.h5")]
    assert check_dist.wheel_problems(no_h5, ROOT) == [
        "wheel: refimpl/golden/data/v1/fftconv.h5 missing"]
    no_cli = [n for n in good if not n.startswith("refimpl/cli/")]
    assert check_dist.wheel_problems(no_cli, ROOT) == [
        "wheel: package refimpl.cli missing (refimpl/cli/__init__.py)"]


def test_check_dist_sdist_rules():
    want = ["LICENSE", "README.md", "setup.cfg", "pyproject.toml", "golden/SCHEMA.md"]
    want += check_dist._tracked(ROOT, "golden/v1/*.h5") + check_dist._tracked(ROOT, "tests/*.py")
    good = [f"refimpl-0.1.0/{w}" for w in want]
    assert check_dist.sdist_problems(good, ROOT) == []
    assert check_dist.sdist_problems(
        [n for n in good if not n.endswith("/LICENSE")], ROOT) == [
        "sdist: refimpl-0.1.0/LICENSE missing"]
    assert check_dist.sdist_problems(
        [n for n in good if not n.endswith("conftest.py")], ROOT) == [
        "sdist: refimpl-0.1.0/tests/conftest.py missing"]
