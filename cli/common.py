"""What every ``refimpl`` subcommand shares: the one error path and option helpers.

The CLI is a thin click layer (STYLE.md): it parses, calls the library, writes files and shows
progress. Library errors reach the user as one line through :func:`fail`, never a traceback.
"""
import sys

import click

from refimpl.progress import EpochEnd, Step


def fail(message):
    """Stop the command with ``Error: <message>`` on one line and exit status 1."""
    raise click.ClickException(" ".join(str(message).split()))


def choice(registry):
    """A ``click.Choice`` over a library registry's names (the registry is the one list)."""
    return click.Choice(list(registry))


class progress_bar:
    """A click progress bar on stderr driven by :mod:`refimpl.progress` events.

    Use as ``with progress_bar(total, "train") as on_event: run(..., progress=on_event)``. Each
    :class:`~refimpl.progress.Step` advances the bar and shows epoch, loss and firing rate; an
    :class:`~refimpl.progress.EpochEnd` shows ``summary(event)`` if given. Click redraws the bar
    in place on a terminal and prints plain lines (about one per second) when stderr is not a
    terminal, so a log file shows progress too.
    """

    def __init__(self, total, label, summary=None):
        self._bar = click.progressbar(length=max(int(total), 0), label=label, file=sys.stderr,
                                      show_pos=True, item_show_func=lambda s: s)
        self._summary = summary

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def __call__(self, event):
        if isinstance(event, Step):
            rate = "" if event.rate is None else f" rate {event.rate:.3f}"
            self._bar.update(
                1, f"epoch {event.epoch + 1}/{event.epochs} loss {event.loss:.4g}{rate}")
        elif isinstance(event, EpochEnd) and self._summary is not None:
            self._bar.update(0, self._summary(event))
