"""``--help`` of every ``refimpl`` command and group: a one-line summary, a description, an
``Examples:`` block of invocations that parse against the commands' own parsers, a help line
for every option and every argument named in the text.

The click tree is walked when the tests are collected, so a command added later is checked
without touching this file. Examples are parsed with ``make_context`` (types, choices, required
options and unknown names are checked) and never invoked.
"""
import shlex

import click
import pytest

from refimpl.cli.main import main

#: The line that opens the example block; the next paragraph is click's ``\b`` (verbatim) one.
EXAMPLES_HEADING = "Examples:"
NOT_DOCUMENTED = {"help", "version"}  # click's own options


def walk(cmd, path=("refimpl",)):
    """``(command path, command)`` for ``cmd`` and every command below it."""
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from walk(cmd.commands[name], path + (name,))


COMMANDS = dict(walk(main))


def paragraphs(cmd):
    """The help text's paragraphs (click has already dedented the docstring)."""
    return [p for p in (cmd.help or "").split("\n\n") if p.strip()]


def examples(cmd):
    """The lines of the ``\\b`` paragraph after ``Examples:`` (stripped); None without one."""
    paras = paragraphs(cmd)
    if EXAMPLES_HEADING not in [p.strip() for p in paras]:
        return None
    i = [p.strip() for p in paras].index(EXAMPLES_HEADING)
    if i + 1 == len(paras) or paras[i + 1].split("\n")[0].strip() != "\b":
        return []  # the block is missing or would be rewrapped by click
    return [line.strip() for line in paras[i + 1].split("\n")[1:] if line.strip()]


def parse(example):
    """Parse ``refimpl ...`` with the parser of every group and command it names and return the
    last command's context; raises click's UsageError / BadParameter where it does not parse.
    Nothing is invoked."""
    words = shlex.split(example)
    assert words[0] == "refimpl", example
    cmd, name, args, parent = main, "refimpl", words[1:], None
    while True:
        ctx = cmd.make_context(name, list(args), parent=parent, resilient_parsing=False)
        if not isinstance(cmd, click.Group):
            return ctx
        protected = getattr(ctx, "_protected_args", None)  # click >= 8.2
        if protected is None:
            protected = ctx.protected_args
        name, cmd, args = cmd.resolve_command(ctx, [*protected, *ctx.args])
        parent = ctx


EXAMPLES = [(path, ex) for path, cmd in COMMANDS.items() for ex in (examples(cmd) or [])]


def test_the_walk_finds_the_tree():
    """The walk reaches nested commands (a broken walk would check nothing)."""
    assert {"refimpl", "refimpl train", "refimpl golden verify", "refimpl sdn eval"} <= set(
        COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_summary_and_description(path):
    paras = paragraphs(COMMANDS[path])
    assert paras, f"{path}: no help text"
    summary = paras[0].strip()
    assert "\n" not in summary, f"{path}: the summary is not one line: {summary!r}"
    assert summary.endswith("."), f"{path}: the summary is not a sentence: {summary!r}"
    heading = [p.strip() for p in paras].index(EXAMPLES_HEADING) if examples(
        COMMANDS[path]) is not None else len(paras)
    assert heading >= 2, f"{path}: no description between the summary and the examples"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_examples_block(path):
    lines = examples(COMMANDS[path])
    assert lines is not None, f"{path}: no {EXAMPLES_HEADING!r} paragraph"
    assert lines, f"{path}: {EXAMPLES_HEADING!r} is not followed by a \\b paragraph of examples"
    assert 1 <= len(lines) <= 3, f"{path}: {len(lines)} examples (1 to 3)"
    for line in lines:
        assert line.startswith("refimpl "), f"{path}: {line!r} is not a refimpl invocation"
    invoked = [parse(line).command_path.split() for line in lines]
    mine = path.split()
    assert any(words[:len(mine)] == mine for words in invoked), \
        f"{path}: no example invokes {path}"


@pytest.mark.parametrize("path, example", EXAMPLES)
def test_example_parses(path, example):
    try:
        parse(example)
    except click.ClickException as e:
        pytest.fail(f"{path}: example {example!r} does not parse: {e.format_message()}")


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_has_a_help_line(path):
    missing = [p.opts[0] for p in COMMANDS[path].params
               if isinstance(p, click.Option) and p.name not in NOT_DOCUMENTED
               and not (p.help or "").strip()]
    assert not missing, f"{path}: options without help: {missing}"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_argument_is_named_in_the_help(path):
    cmd = COMMANDS[path]
    missing = [p.human_readable_name for p in cmd.params
               if isinstance(p, click.Argument) and p.human_readable_name not in (cmd.help or "")]
    assert not missing, f"{path}: arguments the help text does not describe: {missing}"


def test_help_renders_the_examples_verbatim():
    """click prints the \\b block as written (not rewrapped into one paragraph)."""
    from click.testing import CliRunner

    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0, r.output
    shown = [line.strip() for line in r.output.splitlines()]
    for line in examples(COMMANDS["refimpl train"]):
        assert line in shown, line


def _readme_commands():
    """Every ``refimpl ...`` line of README.md's code blocks (comments cut)."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang:
            continue  # Python blocks: tests/test_golden.py and tests/test_conform.py run them
        for line in body.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("refimpl ") and "ADAPTER" not in command:
                lines.append(command)
    return lines


@pytest.mark.parametrize("command", _readme_commands())
def test_every_readme_command_parses(command):
    """Every command the README shows parses against today's parsers (options renamed or
    removed fail here; files the command names need not exist: nothing is invoked)."""
    try:
        parse(command)
    except click.exceptions.Exit as e:  # --help, --version: parsed, and printed
        assert e.exit_code == 0, command
    except click.ClickException as e:
        pytest.fail(f"README: {command!r} does not parse: {e.format_message()}")
