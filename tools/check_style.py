"""Static checks that ruff cannot make: Numba options, the package list, family names outside
the family registry and positional reads of another op's cache.

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

3. **No branch on an activation family's name outside its registry** (issue 22; STYLE.md
   "Variants live in registries"). Family facts (record names, margins, plot labels, options,
   SDN weights) live in the family's entry of ``refimpl.activations.ACTIVATIONS``; code asks
   ``cfg.family`` or ``ACTIVATIONS[name]``. The family names are read from ``ACTIVATIONS`` at
   lint time. In every ``.py`` file under :data:`FAMILY_SCOPE` except :data:`FAMILY_EXEMPT`, a
   finding is

   - a comparison ``==``, ``!=``, ``in``, ``not in``, ``is``, ``is not`` one of whose operands
     is a string literal naming a family, or a tuple / list / set display holding one
     (``cfg.activation == "sdn"``, ``act in ("lif", "sdn")``, ``"lif" != name``);
   - a ``case`` pattern matching such a literal (``case "sdn":``, ``case "lif" | "gelu":``);
   - a per-family table: a dict display (or ``dict(lif=...)``) whose keys are all family
     names, assigned at module or class level (``RECORD_NAMES = {"gelu": ..., ...}``) or
     subscripted / ``.get``-called where it stands (``{"lif": a, "sdn": b}[cfg.activation]``).

   Not findings: a family name as a *value* (``activation="lif"``, ``ACTIVATIONS["lif"]``, a
   default, a list of families to run), a dict built at run time with family keys; and a
   comparison whose other operand names a field of another vocabulary that shares the word
   (:data:`OTHER_VOCABULARIES`: ``reset == "refractory"`` compares a reset of
   ``refimpl.neurons.RESETS``, not the family): the operand's last name (``reset``,
   ``cfg.reset``, ``config["reset"]``, ``config.get("reset")``) is the field, and the literal
   must belong to that vocabulary. The check reads syntax: a name reached through a variable
   (``name = "sdn"`` then ``x == name``) or built (``"s" + "dn"``) is not seen. ``tests/`` is
   outside the scope: tests state the families'
   settings from the spec, by name, on purpose (``tests/test_activation_settings.py``); a test
   that asked the registry would check the registry against itself.

4. **No positional read of another op's cache** (STYLE.md "Forward and backward side by side":
   nobody outside an op indexes its cache by position; DESIGN.md section 12). In every ``.py``
   file under :data:`CACHE_SCOPE` (tests included), a finding is a subscript ``E[k]`` with an
   integer literal ``k`` (``0``, ``-1``) where ``E`` is

   - an attribute that holds another op's cache: a field of a ``...Cache`` class in
     ``refimpl/`` annotated ``object`` or with a ``...Cache`` type (``BlockCache.norm``,
     ``.mix``, ...: :func:`opaque_cache_fields`), or any attribute whose name contains
     ``cache`` (``c.norm[0]``, ``self.cache[1]``);
   - a name containing ``cache`` bound in the enclosing function by an assignment from a call
     of a function not defined in this module (``z, cache = gsu_fwd(...)`` then ``cache[0]``),
     or from a loop or anything else the check cannot trace to this module; a *parameter*
     containing ``cache`` only in a module that defines no ``..._fwd`` function (an op's own
     backward receives its own cache as a parameter and may index it);
   - a name assigned in the enclosing function from one of the above (``mix = c.mix`` then
     ``mix[1]``).

   Not findings: unpacking (``s, W = cache``) and reads by name (``cache.Tx``). Without
   ``--positional-caches`` the rule only prints notes; ``make lint`` passes the flag, so a
   positional read fails it.
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
# 3. Family names only in the family registry
# --------------------------------------------------------------------------------------------

#: Folders (under the project root) whose ``.py`` files may not branch on a family name.
FAMILY_SCOPE = ("refimpl", "cli", "golden", "benchmarks", "examples", "tools")

#: Files that state the families themselves, by design: path -> why.
FAMILY_EXEMPT = {
    "refimpl/activations.py": "the family registry itself",
    "refimpl/reference.py": "the standalone oracle (STYLE.md: no imports from the package) "
                            "states every family again, so that comparing it is not circular",
    "benchmarks/peers/torch_model.py": "the PyTorch peer, an independent implementation "
                                       "(torch and numpy only) compared with refimpl",
}

#: Fields of other vocabularies that share a word with a family name: field -> the registry
#: (module, attribute) whose keys it takes. ``reset == "refractory"`` names a reset.
OTHER_VOCABULARIES = {"reset": ("refimpl.neurons", "RESETS"),
                      "init": ("refimpl.sdn", "INITS")}


def family_vocabulary():
    """``(family names, {field: names of that other vocabulary})``, read from the registries
    (``refimpl.activations.ACTIVATIONS`` and :data:`OTHER_VOCABULARIES`)."""
    import importlib
    families = frozenset(importlib.import_module("refimpl.activations").ACTIVATIONS)
    other = {field: frozenset(getattr(importlib.import_module(mod), attr))
             for field, (mod, attr) in OTHER_VOCABULARIES.items()}
    return families, other


def _field(expr):
    """The last name of ``expr`` (``reset``, ``cfg.reset``, ``c["reset"]``, ``c.get("reset")``),
    or None."""
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        return expr.attr
    if (isinstance(expr, ast.Subscript) and isinstance(expr.slice, ast.Constant)
            and isinstance(expr.slice.value, str)):
        return expr.slice.value
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)
            and expr.func.attr == "get" and expr.args and isinstance(expr.args[0], ast.Constant)
            and isinstance(expr.args[0].value, str)):
        return expr.args[0].value
    return None


def _str_literals(expr):
    """The string literals ``expr`` is or displays (a tuple / list / set of them)."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in expr.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


_COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


def _named_families(literal_expr, other_expr, families, other):
    """Family names ``literal_expr`` compares ``other_expr`` with (none when ``other_expr`` is a
    field of another vocabulary holding every such name)."""
    names = [n for n in _str_literals(literal_expr) if n in families]
    vocabulary = other.get(_field(other_expr))
    if names and vocabulary is not None and all(n in vocabulary for n in names):
        return []
    return names


def _dict_keys(node):
    """The keys of a dict display or ``dict(k=...)`` call if all are string literals, else
    None."""
    if isinstance(node, ast.Dict):
        if node.keys and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                             for k in node.keys):
            return [k.value for k in node.keys]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
          and not node.args and node.keywords and all(k.arg for k in node.keywords)):
        return [k.arg for k in node.keywords]
    return None


def family_findings(source, filename="<string>", families=None, other=None):
    """Rule 3 over ``source``: ``[(filename, line, message)]``. ``families`` / ``other`` as
    :func:`family_vocabulary` returns them (read from the registries when None)."""
    if families is None:
        families, other = family_vocabulary()
    other = other or {}
    tree = ast.parse(source, filename)
    found = []

    def add(node, what):
        found.append((filename, node.lineno, f"{what}: family knowledge belongs in the family's "
                                             "entry of refimpl.activations.ACTIVATIONS (ask "
                                             "cfg.family / ACTIVATIONS[name])"))

    tables = set()  # dict displays that stand as module/class constants or are looked up at once
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef)):
            for st in node.body:
                if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None:
                    tables.add(id(st.value))
        elif isinstance(node, ast.Subscript):
            tables.add(id(node.value))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get"):
            tables.add(id(node.func.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, a, b in zip(node.ops, operands, operands[1:]):
                if not isinstance(op, _COMPARISONS):
                    continue
                names = (_named_families(a, b, families, other)
                         + _named_families(b, a, families, other))
                if names:
                    add(node, f"compares with family name {', '.join(map(repr, names))} "
                              f"({ast.unparse(node)})")
                    break
        elif isinstance(node, ast.Match):
            for case in node.cases:
                for pat in ast.walk(case.pattern):
                    if isinstance(pat, ast.MatchValue):
                        names = _named_families(pat.value, node.subject, families, other)
                        if names:
                            add(pat, f"matches family name {', '.join(map(repr, names))}")
        elif id(node) in tables:
            keys = _dict_keys(node)
            if keys and all(k in families for k in keys):
                add(node, f"a per-family table (keys {', '.join(map(repr, keys))})")
    return sorted(found, key=lambda f: f[1:])


def family_tree_findings(root=ROOT, families=None, other=None):
    """:func:`family_findings` over every ``.py`` file under :data:`FAMILY_SCOPE` of ``root``
    but :data:`FAMILY_EXEMPT`."""
    if families is None:
        families, other = family_vocabulary()
    found = []
    for path in _py_files(root, FAMILY_SCOPE):
        rel = path.relative_to(root).as_posix()
        if rel not in FAMILY_EXEMPT:
            found += family_findings(path.read_text(encoding="utf-8"), rel, families, other)
    return found


def _py_files(root, folders):
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


# --------------------------------------------------------------------------------------------
# 4. No positional read of another op's cache
# --------------------------------------------------------------------------------------------

#: Folders whose ``.py`` files may not index another op's cache by position.
CACHE_SCOPE = FAMILY_SCOPE + ("tests",)


def _is_cache_type(ann):
    """An annotation naming another op's cache: ``object`` or a ``...Cache`` class (possibly
    inside ``Optional[...]``)."""
    for n in ast.walk(ann):
        if isinstance(n, ast.Name) and (n.id == "object" or n.id.endswith("Cache")):
            return True
        if isinstance(n, ast.Attribute) and n.attr.endswith("Cache"):
            return True
    return False


def opaque_cache_fields(root=ROOT):
    """Fields of the ``...Cache`` classes in ``root/refimpl`` that hold another op's cache
    (annotated ``object`` or with a ``...Cache`` type): ``{field name}``."""
    fields = set()
    for path in _py_files(root, ("refimpl",)):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Cache"):
                for st in node.body:
                    if (isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
                            and _is_cache_type(st.annotation)):
                        fields.add(st.target.id)
    return fields


def _int_index(node):
    s = node.slice
    if isinstance(s, ast.UnaryOp) and isinstance(s.op, (ast.USub, ast.UAdd)):
        s = s.operand
    return isinstance(s, ast.Constant) and type(s.value) is int


def _names_bound(target):
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for e in target.elts for n in _names_bound(e)]
    if isinstance(target, ast.Starred):
        return _names_bound(target.value)
    return []


def _own_scope(fn):
    """The nodes of function (or module) ``fn`` outside its nested functions and classes."""
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                 ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))


def cache_findings(source, filename="<string>", fields=None):
    """Rule 4 over ``source``: ``[(filename, line, message)]``; ``fields`` as
    :func:`opaque_cache_fields` (read from the tree when None)."""
    if fields is None:
        fields = opaque_cache_fields()
    tree = ast.parse(source, filename)
    defined = {n.name for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    makes_caches = any(name.endswith("_fwd") for name in defined)
    found = []

    def foreign_attr(expr):
        return isinstance(expr, ast.Attribute) and (expr.attr in fields
                                                    or "cache" in expr.attr.lower())

    def own_call(expr):
        f = expr.func if isinstance(expr, ast.Call) else None
        return isinstance(f, ast.Name) and f.id in defined

    scopes = [tree] + [n for n in ast.walk(tree)
                       if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for fn in scopes:
        params = set()
        if not isinstance(fn, ast.Module):
            a = fn.args
            params = {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg,
                                      a.kwarg] if x is not None}
        nodes = list(_own_scope(fn))
        own, aliases = set(), set()  # cache names bound from this module's calls; aliases
        for node in nodes:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n for t in targets for n in _names_bound(t)]
                if own_call(node.value):
                    own.update(names)
                elif foreign_attr(node.value) or (isinstance(node.value, ast.Name)
                                                  and node.value.id in aliases):
                    aliases.update(names)
        for node in nodes:
            if not (isinstance(node, ast.Subscript) and _int_index(node)):
                continue
            e, why = node.value, None
            if foreign_attr(e):
                why = "holds another op's cache"
            elif isinstance(e, ast.Name) and e.id in aliases:
                why = "is another op's cache (assigned from one)"
            elif isinstance(e, ast.Name) and "cache" in e.id.lower() and e.id not in own:
                if e.id not in params:
                    why = "is a cache made by another module"
                elif not makes_caches:
                    why = "is a cache passed in to a module that makes none"
            if why:
                found.append((filename, node.lineno,
                              f"{ast.unparse(node)}: {ast.unparse(e)} {why}; read it by name "
                              "(its op's named cache), never by position"))
    return sorted(found, key=lambda f: f[1:])


def cache_tree_findings(root=ROOT):
    """:func:`cache_findings` over every ``.py`` file under :data:`CACHE_SCOPE` of ``root``."""
    fields = opaque_cache_fields(root)
    found = []
    for path in _py_files(root, CACHE_SCOPE):
        rel = path.relative_to(root).as_posix()
        found += cache_findings(path.read_text(encoding="utf-8"), rel, fields)
    return found


# --------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/check_style.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--strict", action="store_true",
                   help="also note Numba options spelled inline (notes never fail)")
    p.add_argument("--positional-caches", action="store_true",
                   help="positional reads of another op's cache fail (default: --strict notes "
                        "them, until the tree is clean)")
    p.add_argument("--root", type=Path, default=ROOT, help="project folder (default: this one)")
    args = p.parse_args(argv)
    findings, notes = numba_tree_findings(args.root, strict=args.strict)
    findings += package_findings(args.root)
    findings += family_tree_findings(args.root)
    if args.positional_caches:
        findings += cache_tree_findings(args.root)
    elif args.strict:
        notes += cache_tree_findings(args.root)
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
