"""Where the commands write: results on stdout, progress, summaries and errors on stderr."""

from __future__ import annotations

import os
import sys

from rich.console import Console

err = Console(stderr=True, highlight=False)


def print_error(e: BaseException | str) -> None:
    """`maest: error: ...` on stderr, unwrapped (rich would fold long paths across lines). One line,
    unless the message itself has more (a model that cannot be had lists where to put its files)."""
    print(f"maest: error: {e}", file=sys.stderr, flush=True)


def note(text: str) -> None:
    """A line for the user on stderr, never wrapped or marked up."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def stdout_console(piped_width: int = 200) -> Console:
    """A console for tables on stdout: the terminal's width, or `piped_width` in a pipe."""
    return Console(width=None if sys.stdout.isatty() else piped_width)


def stderr_console(piped_width: int = 200) -> Console:
    return Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else piped_width)


def shown_path(path: str) -> str:
    """A path relative to the working directory when it is under it, else as it is."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def names(text: str | None) -> tuple[str, ...] | None:
    """'a, b,,c' -> ('a', 'b', 'c'); None or '' -> None."""
    return tuple(t.strip() for t in text.split(",") if t.strip()) or None if text else None
