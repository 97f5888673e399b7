"""Static checks that ruff cannot make: Numba options and the package list.

``python tools/check_style.py`` (part of ``make lint``; ``tests/test_style.py`` runs the same
functions in ``make test``) prints one ``path:line: message`` per finding and exits 1 if any.

1. **fastmath from the one config value** (STYLE.md "Numba"; stumpy's ``fastmath.py`` and its
   test that every njit function uses ``config.STUMPY_FASTMATH_FLAGS``). Every use of a Numba
   compiler in ``refimpl/`` (``njit``, ``jit``, ``vectorize``, ``guvectorize``, ``cfunc``; as
   ``@njit(...)``, ``@numba.njit(...)`` or a plain call ``njit(...)(fn)``) must
   take ``fastmath`` from :mod:`refimpl.config`: either ``**NJIT_OPTS`` / ``**config.NJIT_OPTS``
   (any options dict defined in ``refimpl/config.py`` whose ``fastmath`` is ``FASTMATH``) or
   ``fastmath=FASTMATH`` / ``fastmath=config.FASTMATH``. A bare ``@njit`` (numba's default,
   ``fastmath=False``, silently ignores ``REFIMPL_FASTMATH``), a literal ``fastmath=True`` and a
   missing ``fastmath`` are findings. So is ``parallel=True`` together with an options dict
   that sets ``cache=True`` (STYLE.md: no ``cache`` on parallel kernels; pynndescent #175).

   ``--strict`` also reports, as notes that do not fail, decorators that spell options inline
   (``@njit(parallel=True, fastmath=config.FASTMATH)``) instead of naming one options dict in
   ``refimpl/config.py``.

2. **setup.cfg lists every package.** ``packages`` is an explicit list (``find:`` cannot be
   combined with the ``package_dir`` mapping of ``cli/`` and ``golden/``), so a new subpackage
   would silently be left out of the wheel. The list must equal the folders with an
   ``__init__.py`` under ``refimpl/`` plus those under each mapped folder; a folder of ``.py``
   files without ``__init__.py`` is a finding too.
"""
import argparse
import ast
import configparser
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Numba entry points that compile a Python function and accept ``fastmath``.
NUMBA_COMPILERS = frozenset({"njit", "jit", "vectorize", "guvectorize", "cfunc"})

FASTMATH_NAME = "FASTMATH"


# --------------------------------------------------------------------------------------------
# 1. Numba options
# --------------------------------------------------------------------------------------------


def _is_true(node):
    return isinstance(node, ast.Constant) and node.value is True


def config_option_dicts(config_source):
    """Module-level option dicts in ``refimpl/config.py``:
    ``{name: {"fastmath_ok": bool, "cache": bool, "parallel": bool}}``.

    A dict counts when it is written ``NAME = dict(..., fastmath=FASTMATH, ...)`` or
    ``NAME = {"fastmath": FASTMATH, ...}``.
    """
    out = {}
    for node in ast.parse(config_source).body:
        target = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if not isinstance(target, ast.Name):
            continue
        items = None
        if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id == "dict" and not value.args):
            items = {k.arg: k.value for k in value.keywords if k.arg is not None}
        elif isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) for k in value.keys):
            items = {k.value: v for k, v in zip(value.keys, value.values, strict=True)}
        if items is None or "fastmath" not in items:
            continue
        fm = items["fastmath"]
        out[target.id] = {
            "fastmath_ok": isinstance(fm, ast.Name) and fm.id == FASTMATH_NAME,
            "cache": _is_true(items.get("cache")),
            "parallel": _is_true(items.get("parallel")),
        }
    return out


class _Imports:
    """What a module's imports make of names: numba compilers, numba, refimpl.config."""

    def __init__(self, tree):
        self.compilers = {}     # local name -> numba compiler name (from numba import njit as nj)
        self.numba = set()      # local names bound to the numba module
        self.config = set()     # local names bound to refimpl.config
        self.from_config = {}   # local name -> name in refimpl.config
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "numba":
                        self.numba.add(a.asname or "numba")
                    elif a.name == "refimpl.config" and a.asname:
                        self.config.add(a.asname)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                for a in node.names:
                    local = a.asname or a.name
                    if mod == "numba" and a.name in NUMBA_COMPILERS:
                        self.compilers[local] = a.name
                    elif a.name == "config" and (mod in ("", "refimpl") and (node.level or mod)):
                        self.config.add(local)
                    elif (mod == "config" and node.level) or mod == "refimpl.config":
                        self.from_config[local] = a.name

    def compiler(self, expr):
        """The numba compiler ``expr`` names (``njit``, ``numba.njit``), else None."""
        if isinstance(expr, ast.Name):
            return self.compilers.get(expr.id)
        if (isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name)
                and expr.value.id in self.numba and expr.attr in NUMBA_COMPILERS):
            return expr.attr
        return None

    def config_name(self, expr):
        """The ``refimpl.config`` attribute ``expr`` names (``NJIT_OPTS``, ``config.X``)."""
        if isinstance(expr, ast.Name):
            return self.from_config.get(expr.id)
        if (isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name)
                and expr.value.id in self.config):
            return expr.attr
        return None


def numba_findings(source, filename="<string>", option_dicts=None, strict=False):
    """Check every Numba compiler use in ``source``.

    Returns ``(findings, notes)``: lists of ``(filename, line, message)``. ``option_dicts`` is
    :func:`config_option_dicts` of ``refimpl/config.py`` (read from the tree when None). Notes
    (inline options) are collected only with ``strict``.
    """
    if option_dicts is None:
        option_dicts = config_option_dicts((ROOT / "refimpl" / "config.py").read_text())
    tree = ast.parse(source, filename)
    imp = _Imports(tree)
    findings, notes = [], []

    def add(node, msg, where=findings):
        where.append((filename, node.lineno, msg))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                name = imp.compiler(d)
                if name is not None:  # bare @njit: no options at all
                    add(d, f"bare @{name} on {node.name}(): numba's default fastmath=False "
                           f"ignores config.FASTMATH; write @{name}(**config.NJIT_OPTS)")
        if not isinstance(node, ast.Call):
            continue
        name = imp.compiler(node.func)
        if name is None:
            continue
        fastmath_from, cache, parallel, inline = [], False, False, []
        for kw in node.keywords:
            if kw.arg is None:  # **opts
                opts = imp.config_name(kw.value)
                if opts in option_dicts:
                    if option_dicts[opts]["fastmath_ok"]:
                        fastmath_from.append(f"**{opts}")
                    else:
                        add(node, f"{name}(**{opts}): config.{opts}['fastmath'] is not "
                                  f"config.FASTMATH")
                        fastmath_from.append("bad")
                    cache = cache or option_dicts[opts]["cache"]
                    parallel = parallel or option_dicts[opts]["parallel"]
                else:
                    add(node, f"{name}(**{ast.unparse(kw.value)}): options must be a dict "
                              f"from refimpl/config.py (known: {', '.join(option_dicts)})")
                    fastmath_from.append("bad")
            elif kw.arg == "fastmath":
                inline.append(kw.arg)
                if imp.config_name(kw.value) == FASTMATH_NAME:
                    fastmath_from.append("fastmath=FASTMATH")
                else:
                    add(node, f"{name}(fastmath={ast.unparse(kw.value)}): take it from "
                              f"config.FASTMATH (or **config.NJIT_OPTS), never a literal")
                    fastmath_from.append("bad")
            else:
                inline.append(kw.arg)
                cache = cache or (kw.arg == "cache" and _is_true(kw.value))
                parallel = parallel or (kw.arg == "parallel" and _is_true(kw.value))
        if not fastmath_from:
            add(node, f"{name}({ast.unparse(node)[len(ast.unparse(node.func)) + 1:-1]}) sets no "
                      f"fastmath: use **config.NJIT_OPTS or fastmath=config.FASTMATH")
        elif len(fastmath_from) > 1 and "bad" not in fastmath_from:
            add(node, f"{name}(...) sets fastmath twice ({', '.join(fastmath_from)})")
        if parallel and cache:
            add(node, f"{name}(parallel=True) with cache=True: STYLE.md allows cache only on "
                      "serial leaf kernels (pynndescent #175)")
        if strict and inline:
            add(node, f"{name}(...) spells {', '.join(inline)} inline; name one options dict "
                      "in refimpl/config.py (as PARALLEL_OPTS) and pass **config.<it>",
                where=notes)
    return findings, notes


def numba_tree_findings(root=ROOT, strict=False):
    """:func:`numba_findings` over every ``.py`` file under ``root/refimpl``."""
    option_dicts = config_option_dicts((root / "refimpl" / "config.py").read_text())
    findings, notes = [], []
    for path in sorted((root / "refimpl").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        f, n = numba_findings(path.read_text(encoding="utf-8"), rel, option_dicts, strict)
        findings += f
        notes += n
    return findings, notes


# --------------------------------------------------------------------------------------------
# 2. setup.cfg packages
# --------------------------------------------------------------------------------------------


def _cfg_list(value):
    return [x.strip() for x in value.replace(",", "\n").splitlines() if x.strip()]


def _packages_under(folder, name):
    """Dotted package names of ``folder`` (named ``name``) and its subfolders with ``__init__``;
    plus the folders that hold ``.py`` files but no ``__init__.py``."""
    found, orphans = set(), []
    for init in folder.rglob("__init__.py"):
        rel = init.parent.relative_to(folder)
        found.add(".".join((name, *rel.parts)))
    for py in folder.rglob("*.py"):
        d = py.parent
        if "__pycache__" in d.parts:
            continue
        if not (d / "__init__.py").exists() and d not in orphans:
            orphans.append(d)
    return found, orphans


def package_findings(root=ROOT):
    """Compare setup.cfg's ``packages`` with the tree. Returns ``[(file, line, message)]``."""
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg", encoding="utf-8")
    listed = _cfg_list(cfg.get("options", "packages", fallback=""))
    mapping = {}
    for line in _cfg_list(cfg.get("options", "package_dir", fallback="")):
        name, _, folder = (x.strip() for x in line.partition("="))
        mapping[name] = folder
    findings = []
    where = ("setup.cfg", _line_of(root / "setup.cfg", "packages ="))
    if listed == ["find:"] or any(p.startswith("find") for p in listed):
        return [(*where, "packages must be an explicit list (find: cannot honour package_dir)")]
    roots = {"refimpl": root / "refimpl"}
    roots.update({name: root / folder for name, folder in mapping.items() if name})
    expected, orphans = set(), []
    for name, folder in roots.items():
        if not (folder / "__init__.py").exists():
            findings.append((*where, f"{name} maps to {folder.relative_to(root)}/, which has no "
                                     "__init__.py"))
            continue
        found, orph = _packages_under(folder, name)
        # a mapped folder inside refimpl/ would be counted twice; nothing does that today
        expected |= found
        orphans += orph
    dupes = sorted({p for p in listed if listed.count(p) > 1})
    missing = sorted(expected - set(listed))
    extra = sorted(set(listed) - expected)
    if dupes:
        findings.append((*where, f"listed twice: {', '.join(dupes)}"))
    if missing:
        findings.append((*where, f"not in packages (would be missing from the wheel): "
                                 f"{', '.join(missing)}"))
    if extra:
        findings.append((*where, f"listed but not a folder with __init__.py: {', '.join(extra)}"))
    for d in sorted(set(orphans)):
        rel = d.relative_to(root).as_posix()
        findings.append((rel, 0, f"{rel}/ holds .py files but no __init__.py: it would not be "
                                 "installed (add __init__.py and list it in setup.cfg)"))
    return findings


def _line_of(path, text):
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith(text):
            return i
    return 0


# --------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/check_style.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--strict", action="store_true",
                   help="also note Numba options spelled inline (notes never fail)")
    p.add_argument("--root", type=Path, default=ROOT, help="project folder (default: this one)")
    args = p.parse_args(argv)
    findings, notes = numba_tree_findings(args.root, strict=args.strict)
    findings += package_findings(args.root)
    for f, line, msg in findings:
        print(f"{f}:{line}: {msg}")
    for f, line, msg in notes:
        print(f"{f}:{line}: note: {msg}")
    n = len(findings)
    print(f"check_style: {n} finding{'s' if n != 1 else ''}"
          + (f", {len(notes)} note{'s' if len(notes) != 1 else ''}" if args.strict else ""),
          file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
