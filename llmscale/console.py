"""Where commands print. Results (tables, summaries) go to stdout on a console from
`stdout_console`; status (startup lines, hints) goes to stderr through `status`, and progress bars
draw on rich's global console. `-q` silences status and progress, never results.

A pipe or a log file has no width of its own: rich would assume 80 columns and cut table cells
to "pre…". There a results console lays tables out as wide as COLUMNS says, else `PIPED_WIDTH`,
leaves lines of text unwrapped (one line stays one line for grep), and, like every rich console
writing to a non-terminal, prints no colour or cursor codes.
"""

from __future__ import annotations

import os
import sys

from rich import get_console
from rich.console import Console

PIPED_WIDTH = 200  # wider than any table the commands print


def stdout_console() -> Console:
    if sys.stdout.isatty():
        return Console()  # rich takes the terminal's width, or COLUMNS
    columns = os.environ.get("COLUMNS", "")
    return Console(width=int(columns) if columns.isdigit() else PIPED_WIDTH, soft_wrap=True)


def set_quiet(quiet: bool) -> None:
    """`-q`. Progress bars are given no console, so they use rich's global one: quieting it
    silences every bar at once, and `status` asks it too."""
    get_console().quiet = quiet


def status(line: str) -> None:
    """A line on what the command is doing, for the person watching it; none under `-q`."""
    if not get_console().quiet:
        print(line, file=sys.stderr, flush=True)


def fmt_bytes(n: float) -> str:
    """A byte count for people: 812 B, 35.7 kB, 1.2 MB (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""
