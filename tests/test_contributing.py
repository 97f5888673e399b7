"""CONTRIBUTING.md's recipes stay true (issue 22): every recipe the issue asks for is there, says
which files to touch (each exists), and names the tests that back it (each exists, and so does
every test function or fixture it names). The recipes' behaviour is tested where each one
says: a toy op (tests/toy_op.py, test_ops.py, test_golden_ops.py), a toy reset
(test_reset_recipe.py), the CLI option walk (test_cli_options.py), the family registry
(test_model.py, test_lint_family.py), the surrogate registry (test_surrogates.py).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "CONTRIBUTING.md").read_text()

#: The recipes issue 22 asks for, by the start of their heading.
REQUIRED = ("A surrogate gradient", "A reset", "An activation family", "An op", "A golden suite",
            "A shared CLI option")

#: Files a recipe may name that live outside the repository: the spec (../shared/DESIGN.md) and
#: the model the CLI options follow (rasterio's rio/options.py).
OUTSIDE = {"DESIGN.md", "rio/options.py"}


def sections():
    parts = re.split(r"^## ", TEXT, flags=re.M)[1:]
    return {p.splitlines()[0]: p for p in parts}


def recipe(title):
    found = [body for head, body in sections().items() if head.startswith(title + " (")]
    assert len(found) == 1, f"CONTRIBUTING.md has {len(found)} recipes {title!r}"
    return found[0]


def paths(text):
    """Backticked repository paths (``a/b.py``, ``x.md``) in ``text``; globs expanded."""
    out = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.split("'")[0]
        if "<" in token or token.startswith(("-", "..")):
            continue
        if re.fullmatch(r"[\w./*-]+\.(py|md|h5)|[\w-]+/[\w./-]*", token):
            out.add(token.rstrip("/"))
    return out


@pytest.mark.parametrize("title", REQUIRED)
def test_recipe_lists_its_files_and_they_exist(title):
    body = recipe(title)
    files = re.search(r"^Files: (.*?)(?:\n\n)", body, flags=re.M | re.S)
    assert files, f"{title}: no 'Files:' paragraph listing every file to touch"
    listed = paths(files.group(1))
    assert listed, f"{title}: the Files paragraph names no file"
    for path in sorted(paths(body)):
        if path in OUTSIDE:
            continue
        hits = list(ROOT.glob(path)) if "*" in path else [ROOT / path]
        assert all(h.exists() for h in hits) and hits, f"{title}: {path} does not exist"


@pytest.mark.parametrize("title", REQUIRED)
def test_recipe_names_the_tests_that_back_it(title):
    body = recipe(title)
    tests = [p for p in paths(body) if p.startswith("tests/test_")]
    assert tests, f"{title}: the recipe names no test that backs it"
    source = "".join((ROOT / t).read_text() for t in tests)
    for name in re.findall(r"`(test_\w+)`", body):
        if name.endswith(".py"):
            continue
        assert re.search(rf"def {name}\b", source), f"{title}: {name} is in none of {tests}"


def test_paths_finds_what_a_recipe_names():
    """The parser itself: a path, a glob, a folder; not a flag or a call."""
    text = "`refimpl/ops.py`, `golden/v1/<name>.h5`, `tests/test_*.py`, `--seed`, `cli/`, `f(x)`"
    assert paths(text) == {"refimpl/ops.py", "tests/test_*.py", "cli"}
