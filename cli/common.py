"""What every ``refimpl`` subcommand shares: the one error path and option helpers.

The CLI is a thin click layer (STYLE.md): it parses, calls the library, writes files and shows
progress. Library errors reach the user as one line through :func:`fail`, never a traceback.
"""
import sys
import time

import click

from refimpl.progress import EpochEnd, Step


def fail(message):
    """Stop the command with ``Error: <message>`` on one line and exit status 1."""
    raise click.ClickException(" ".join(str(message).split()))


def choice(registry):
    """A ``click.Choice`` over a library registry's names (the registry is the one list)."""
    return click.Choice(list(registry))


class progress:
    """Progress of ``total`` units of work on stderr, for a terminal and for a log file alike.

    On a terminal: a click progress bar redrawn in place. Otherwise (a pipe, a file, CI) click
    would print only the label, so this prints a plain line ``label: done/total (pct) text``
    at most every ``interval`` seconds, and one at the end. Use as a context manager; call
    ``update(n, text=None)`` as work completes.
    """

    def __init__(self, total, label, interval=5.0):
        self.total, self.label, self.interval = max(int(total), 0), label, interval
        self.done, self._text, self._last = 0, "", None
        self._tty = sys.stderr.isatty()
        self._bar = None
        if self._tty:
            self._bar = click.progressbar(length=self.total, label=label, file=sys.stderr,
                                          show_pos=True, item_show_func=lambda t: t)

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
        else:
            self._last = time.monotonic()
            click.echo(f"{self.label}: 0/{self.total}", err=True)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            return self._bar.__exit__(*exc)
        if exc[0] is None:
            self._line()
        return False

    def update(self, n=1, text=None):
        self.done += n
        if text is not None:
            self._text = text
        if self._bar is not None:
            self._bar.update(n, text)
        elif time.monotonic() - self._last >= self.interval:
            self._line()

    def _line(self):
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"  {self._text}" if self._text else ""
        click.echo(f"{self.label}: {self.done}/{self.total} ({pct:.0f} %){text}", err=True)
        self._last = time.monotonic()


class progress_bar(progress):
    """:class:`progress` driven by :mod:`refimpl.progress` events: the object is the callback.

    Use as ``with progress_bar(total, "train") as on_event: run(..., progress=on_event)``. Each
    :class:`~refimpl.progress.Step` advances it and shows epoch, loss and firing rate (and, with
    ``tokens_per_step``, the tokens per second since the first step); an
    :class:`~refimpl.progress.EpochEnd` shows ``summary(event)`` if given.
    """

    def __init__(self, total, label, summary=None, interval=5.0, tokens_per_step=None):
        super().__init__(total, label, interval)
        self._summary = summary
        self._tokens, self._t0, self._steps = tokens_per_step, None, 0

    def __call__(self, event):
        if isinstance(event, Step):
            rate = "" if event.rate is None else f" rate {event.rate:.3f}"
            speed = ""
            if self._tokens:
                now = time.monotonic()
                self._t0 = now if self._t0 is None else self._t0
                self._steps += 1
                if now > self._t0:  # the first step's own time is not known: from the second
                    speed = f" {(self._steps - 1) * self._tokens / (now - self._t0):.0f} tok/s"
            self.update(1, f"epoch {event.epoch + 1}/{event.epochs} loss {event.loss:.4g}{rate}"
                           f"{speed}")
        elif isinstance(event, EpochEnd):
            if self._summary is not None:
                self.update(0, self._summary(event))
            if self._bar is None:
                self._line()  # off a terminal: one line per epoch at least
