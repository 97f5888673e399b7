"""Static checks of the tree (tools/check_style.py), run in ``make test``; ``make lint`` runs the
same checks from the command line.

- every Numba kernel in ``refimpl/`` takes ``fastmath`` from :mod:`refimpl.config` (STYLE.md);
- setup.cfg's explicit ``packages`` list matches the folders with an ``__init__.py``.
"""
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_style  # noqa: E402

CONFIG = textwrap.dedent("""
    import os
    FASTMATH = os.environ.get("REFIMPL_FASTMATH", "0") != "0"
    NJIT_OPTS = dict(cache=True, fastmath=FASTMATH, nogil=True)
    PARALLEL_OPTS = dict(parallel=True, fastmath=FASTMATH, nogil=True)
    LITERAL_OPTS = {"fastmath": True}
""")
OPTS = check_style.config_option_dicts(CONFIG)


def findings(body, strict=False):
    src = textwrap.dedent(body)
    found, notes = check_style.numba_findings(src, "snippet.py", OPTS, strict=strict)
    return [msg for _, _, msg in found], [msg for _, _, msg in notes]


def test_tree_numba_kernels_take_fastmath_from_config():
    found, _ = check_style.numba_tree_findings(ROOT)
    assert found == [], "\n".join(f"{f}:{n}: {m}" for f, n, m in found)


def test_tree_packages_listed_in_setup_cfg():
    found = check_style.package_findings(ROOT)
    assert found == [], "\n".join(f"{f}:{n}: {m}" for f, n, m in found)


def test_config_option_dicts():
    assert OPTS == {
        "NJIT_OPTS": {"fastmath_ok": True, "cache": True, "parallel": False},
        "PARALLEL_OPTS": {"fastmath_ok": True, "cache": False, "parallel": True},
        "LITERAL_OPTS": {"fastmath_ok": False, "cache": False, "parallel": False},
    }
    real = check_style.config_option_dicts((ROOT / "refimpl" / "config.py").read_text())
    assert real["NJIT_OPTS"]["fastmath_ok"]


@pytest.mark.parametrize("body", [
    """
    from numba import njit
    from . import config
    @njit(**config.NJIT_OPTS)
    def f(x): return x
    """,
    """
    from numba import njit, prange
    from refimpl import config
    @njit(**config.PARALLEL_OPTS)
    def f(x): return x
    """,
    """
    from numba import njit
    from .config import NJIT_OPTS
    @njit(**NJIT_OPTS)
    def f(x): return x
    """,
    """
    import numba
    from . import config
    @numba.njit(parallel=True, fastmath=config.FASTMATH)
    def f(x): return x
    """,
    """
    from numba import vectorize
    from .config import FASTMATH
    @vectorize(["float64(float64)"], fastmath=FASTMATH)
    def f(x): return x
    """,
    """
    from numba import njit
    from . import config
    def g(x): return x
    f = njit(**config.NJIT_OPTS)(g)
    """,
    """
    def njit(f): return f      # not numba's
    @njit
    def f(x): return x
    """,
])
def test_accepted(body):
    assert findings(body)[0] == []


@pytest.mark.parametrize("body, message", [
    ("""
     from numba import njit
     @njit
     def f(x): return x
     """, "bare @njit on f()"),
    ("""
     import numba as nb
     @nb.jit
     def f(x): return x
     """, "bare @jit on f()"),
    ("""
     from numba import njit
     @njit(fastmath=True)
     def f(x): return x
     """, "njit(fastmath=True): take it from config.FASTMATH"),
    ("""
     from numba import njit
     @njit(cache=True)
     def f(x): return x
     """, "njit(cache=True) sets no fastmath"),
    ("""
     import numba
     @numba.njit(parallel=True)
     def f(x): return x
     """, "njit(parallel=True) sets no fastmath"),
    ("""
     from numba import guvectorize
     @guvectorize(["void(float64[:], float64[:])"], "(n)->(n)", fastmath={"reassoc"})
     def f(x, y): pass
     """, "guvectorize(fastmath={'reassoc'})"),
    ("""
     from numba import njit
     from . import config
     opts = dict(fastmath=False)
     @njit(**opts)
     def f(x): return x
     """, "njit(**opts): options must be a dict from refimpl/config.py"),
    ("""
     from numba import njit
     from . import config
     @njit(**config.LITERAL_OPTS)
     def f(x): return x
     """, "config.LITERAL_OPTS['fastmath'] is not config.FASTMATH"),
    ("""
     from numba import njit
     from . import config
     @njit(parallel=True, **config.NJIT_OPTS)
     def f(x): return x
     """, "parallel=True) with cache=True"),
    ("""
     from numba import njit
     from . import config
     @njit(fastmath=config.FASTMATH, **config.NJIT_OPTS)
     def f(x): return x
     """, "sets fastmath twice"),
    ("""
     from numba import njit
     def g(x): return x
     f = njit(g)
     """, "njit(g) sets no fastmath"),
])
def test_rejected(body, message):
    found, _ = findings(body)
    assert len(found) == 1 and message in found[0], found


def test_strict_notes_inline_options():
    """pmbc.py before commit 86e2233 spelled its parallel kernel's options inline: accepted (its
    fastmath is config.FASTMATH) but noted by --strict."""
    body = """
    from numba import njit, prange
    from . import config
    @njit(parallel=True, fastmath=config.FASTMATH)
    def _pmbc_rows(x): return x
    """
    found, notes = findings(body, strict=True)
    assert found == [] and len(notes) == 1 and "spells parallel, fastmath inline" in notes[0]
    assert findings(body)[1] == []  # notes only with strict


def _tree(tmp_path, packages, folders):
    (tmp_path / "setup.cfg").write_text(
        "[options]\npackage_dir =\n    refimpl.cli = cli\n    refimpl.golden.data = golden\n"
        "packages =\n" + "".join(f"    {p}\n" for p in packages))
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    return tmp_path


BASE = ["refimpl", "refimpl.cli", "refimpl.golden", "refimpl.golden.data"]
BASE_FOLDERS = ["refimpl", "refimpl/golden", "cli", "golden"]


def test_package_list_ok(tmp_path):
    assert check_style.package_findings(_tree(tmp_path, BASE, BASE_FOLDERS)) == []


def test_package_list_new_subpackage_not_listed(tmp_path):
    root = _tree(tmp_path, BASE, BASE_FOLDERS + ["refimpl/sdn", "cli/sub"])
    (msg,) = [m for _, _, m in check_style.package_findings(root)]
    assert "refimpl.cli.sub, refimpl.sdn" in msg and "missing from the wheel" in msg


def test_package_list_listed_but_absent(tmp_path):
    root = _tree(tmp_path, BASE + ["refimpl.sdn"], BASE_FOLDERS)
    (msg,) = [m for _, _, m in check_style.package_findings(root)]
    assert "listed but not a folder with __init__.py: refimpl.sdn" in msg


def test_package_list_folder_without_init(tmp_path):
    root = _tree(tmp_path, BASE, BASE_FOLDERS)
    (root / "refimpl" / "kernels").mkdir()
    (root / "refimpl" / "kernels" / "fast.py").write_text("")
    found = check_style.package_findings(root)
    assert [(f, m.split(":")[0]) for f, _, m in found] == [
        ("refimpl/kernels", "refimpl/kernels/ holds .py files but no __init__.py")]


def test_package_list_find_is_refused(tmp_path):
    (msg,) = [m for _, _, m in check_style.package_findings(
        _tree(tmp_path, ["find:"], BASE_FOLDERS))]
    assert "explicit list" in msg
