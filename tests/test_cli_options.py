"""An option two ``refimpl`` commands take is declared once, in ``cli/options.py``, and means
one thing in both: one flag, one type, one help text, one kind of default (CONTRIBUTING.md,
"A shared CLI option").

The click tree is walked when the tests are collected (``tests/test_cli_help.py``), so an
option a command gains later is checked without touching this file. A flag listed in
``options.HOMONYMS`` names different things in different commands; it is checked for being
one. Values are parsed with the commands' own parsers (``make_context``) and never invoked.
"""
import ast
import shlex
from pathlib import Path

import click
import pytest

from refimpl.cli import options
from test_cli_help import COMMANDS, NOT_DOCUMENTED, parse

CLI = Path(options.__file__).parent


def _uses():
    """``{flag: [(command path, option), ...]}`` over every command of the tree."""
    uses = {}
    for path, cmd in COMMANDS.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name not in NOT_DOCUMENTED:
                for flag in p.opts + p.secondary_opts:
                    uses.setdefault(flag, []).append((path, p))
    return uses


#: Flags that two commands or more take.
SHARED = {flag: uses for flag, uses in _uses().items() if len(uses) >= 2}
ONE_MEANING = sorted(set(SHARED) - set(options.HOMONYMS))


def signature(p):
    """What two commands taking option ``p`` must agree on (the default: :func:`default_kind`)."""
    return {"flags": sorted(p.opts) + sorted(p.secondary_opts), "parameter": p.name,
            "type": p.type.to_info_dict(), "help": p.help, "is_flag": p.is_flag,
            "multiple": p.multiple, "count": p.count, "nargs": p.nargs, "required": p.required}


def default_kind(p):
    """The Python type of ``p``'s default; None when there is none (the command decides, and a
    ``show_default`` text may say how), which goes with any kind."""
    d = p.to_info_dict()["default"]  # click's "not given" sentinel reads None here
    return None if d is None else type(d).__name__


def differences(a, b):
    """``{what: (a's, b's)}`` for the ways options ``a`` and ``b`` differ."""
    sa, sb = signature(a), signature(b)
    diff = {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
    ka, kb = default_kind(a), default_kind(b)
    if None not in (ka, kb) and ka != kb:
        diff["default kind"] = (ka, kb)
    return diff


def commands(uses):
    return sorted({path for path, _ in uses})


def test_the_walk_finds_the_shared_options():
    """The walk sees options shared across groups (a broken walk would check nothing)."""
    assert {"--seed", "--overwrite", "--json", "--suite", "--epochs"} <= set(SHARED)
    assert len(commands(SHARED["--seed"])) >= 7


@pytest.mark.parametrize("flag", ONE_MEANING)
def test_a_shared_option_is_declared_in_options_py(flag):
    local = [path for path, p in SHARED[flag] if not isinstance(p, options.SharedOption)]
    assert not local, (f"{flag} is taken by {commands(SHARED[flag])} but declared outside "
                       f"cli/options.py by {local}: declare it once there and use it in each")


@pytest.mark.parametrize("flag", ONE_MEANING)
def test_a_shared_option_means_one_thing(flag):
    (first, a), *rest = SHARED[flag]
    for path, b in rest:
        diff = differences(a, b)
        assert not diff, f"{flag}: '{first}' and '{path}' declare it differently: {diff}"


@pytest.mark.parametrize("flag", sorted(options.HOMONYMS))
def test_a_homonym_is_one(flag):
    """A flag in HOMONYMS is taken by two commands at least, in two ways at least; the
    commands that take it in one way share one declaration of cli/options.py."""
    uses = SHARED.get(flag, [])
    assert len(commands(uses)) >= 2, f"{flag}: taken by {commands(uses)}: drop it from HOMONYMS"
    ways = []  # [[(path, option), ...] per way of declaring it]
    for path, p in uses:
        for way in ways:
            if not differences(way[0][1], p):
                way.append((path, p))
                break
        else:
            ways.append([(path, p)])
    assert len(ways) >= 2, (f"{flag}: every command declares it alike: declare it once in "
                            f"cli/options.py and drop it from HOMONYMS")
    for way in ways:
        local = [path for path, p in way if not isinstance(p, options.SharedOption)]
        assert len(way) == 1 or not local, (
            f"{flag}: {commands(way)} take it alike but {local} declare it themselves: declare "
            f"that one once in cli/options.py")
    shared = [way for way in ways if isinstance(way[0][1], options.SharedOption)]
    assert len(shared) <= 1, f"{flag}: cli/options.py declares it in {len(shared)} ways"


def test_options_py_holds_only_shared_options():
    """An option of cli/options.py that one command alone takes belongs to that command."""
    alone = {}
    for flag, uses in _uses().items():
        mine = [(path, p) for path, p in uses if isinstance(p, options.SharedOption)]
        if len(commands(mine)) == 1:
            alone[flag] = commands(mine)
    assert not alone, f"declared in cli/options.py but taken by one command only: {alone}"


def test_only_options_py_makes_shared_options():
    """No other module of cli/ builds a SharedOption (so each one is declared in one place)."""
    found = []
    for path in sorted(CLI.glob("*.py")):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)
            if name == "SharedOption":
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"SharedOption used outside cli/options.py: {found}"


# -- the same behaviour in every command ------------------------------------------------------

def command_line(path, flag, value):
    """``refimpl <path> <required arguments and options> <flag> <value>`` as one string."""
    cmd, words = COMMANDS[path], path.split()
    for p in cmd.params:
        if p.required and isinstance(p, click.Argument):
            words.append("x")
        elif p.required:
            words += [p.opts[0], "x"]
    return shlex.join(words + [flag, value])


def values(p, tmp_path):
    """``(a value p must refuse, a value it must take)``, from its type."""
    t = p.type
    if hasattr(t, "samples"):  # a type of cli/options.py that says them (SchedulerAddress)
        return t.samples
    if isinstance(t, (click.IntRange, click.FloatRange)) and t.min is not None:
        return str(t.min - 1), str(t.min + 1)
    if isinstance(t, click.Choice):
        return "no-such-choice", str(t.choices[0])
    if isinstance(t, click.Path):
        existing = tmp_path / "existing"
        existing.mkdir(exist_ok=True)
        (tmp_path / "existing.txt").write_text("")
        return (str(existing) if not t.dir_okay else str(tmp_path / "existing.txt")), "new"
    return "not-a-number", "1"


#: Shared options that take a value (one flag each: ``-v`` is ``--verbose``).
VALUED = [flag for flag in ONE_MEANING if flag.startswith("--") and not SHARED[flag][0][1].is_flag]


@pytest.mark.parametrize("flag", VALUED)
def test_a_shared_option_refuses_alike_everywhere(flag, tmp_path):
    """The same bad value gets the same error from every command that takes the option."""
    bad, _ = values(SHARED[flag][0][1], tmp_path)
    errors = {}
    for path in commands(SHARED[flag]):
        line = command_line(path, flag, bad)
        with pytest.raises(click.BadParameter) as e:
            parse(line)
        errors[path] = e.value.format_message()
        assert flag in errors[path], f"{line}: refused for another reason: {errors[path]}"
    assert len(set(errors.values())) == 1, f"{flag} {bad}: {errors}"


@pytest.mark.parametrize("flag", VALUED)
def test_a_shared_option_takes_alike_everywhere(flag, tmp_path):
    """The same good value reaches every command that takes the option as the same value."""
    _, good = values(SHARED[flag][0][1], tmp_path)
    got = {path: parse(command_line(path, flag, good)).params[p.name]
           for path, p in SHARED[flag]}
    assert len({repr(v) for v in got.values()}) == 1, f"{flag} {good}: {got}"


def test_a_negative_seed_is_refused_alike_everywhere():
    """--seed -1 is a usage error with one message in every command that takes --seed (NumPy
    refuses negative seeds; 'refimpl equivalence --seed -1' used to end in a traceback)."""
    paths = commands(SHARED["--seed"])
    for path in paths:
        with pytest.raises(click.BadParameter) as e:
            parse(command_line(path, "--seed", "-1"))
        assert e.value.format_message() == "Invalid value for '--seed': -1 is not in the range " \
                                           "x>=0.", path


def test_the_recipe_names_every_file_it_touches():
    """CONTRIBUTING.md's recipe "A shared CLI option" names cli/options.py, every command module
    that uses it and this test (a new command module that takes a shared option joins the list)."""
    text = (CLI.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    start = text.index("## A shared CLI option")
    end = text.find("\n## ", start + 1)
    recipe = text[start:] if end == -1 else text[start:end]
    users = [f"cli/{path.name}" for path in sorted(CLI.glob("*.py"))
             if "from . import options" in path.read_text(encoding="utf-8")]
    assert len(users) >= 5
    missing = [f for f in ["cli/options.py", *users, "tests/test_cli_options.py"]
               if f"`{f}`" not in recipe]
    assert not missing, f"CONTRIBUTING.md, 'A shared CLI option', does not name {missing}"
