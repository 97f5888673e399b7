"""What every ``refimpl`` subcommand shares: the one error path and option helpers.

The CLI is a thin click layer (STYLE.md): it parses, calls the library, writes files and shows
progress. Library errors reach the user as one line through :func:`fail`, never a traceback.
"""
import click


def fail(message):
    """Stop the command with ``Error: <message>`` on one line and exit status 1."""
    raise click.ClickException(" ".join(str(message).split()))


def choice(registry):
    """A ``click.Choice`` over a library registry's names (the registry is the one list)."""
    return click.Choice(list(registry))
