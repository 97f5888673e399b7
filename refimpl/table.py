"""Plain-text tables: the one renderer behind every table refimpl prints."""


def render_table(header, rows, rule=True):
    """Left-aligned columns separated by two spaces, with a dashed rule under the header.

    Parameters
    ----------
    header : sequence of str
    rows : iterable of sequences (cells are turned into ``str``)
    rule : bool, default True
        Draw the ``----`` line under the header.

    Returns
    -------
    str
        The lines joined by newlines, trailing spaces stripped (no final newline).
    """
    table = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    n = max(len(r) for r in table)
    widths = [max((len(r[i]) for r in table if i < len(r)), default=0) for i in range(n)]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0 and rule:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
