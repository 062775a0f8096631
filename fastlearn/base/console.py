"""What the user reads: `say` prints a run's lines on the main process only (torchrun's `RANK`, what `base.ranks.rank`
reads before the process group is up); the terminal test, the width to print in and the shared rich console.
Free of torch and fastai, so that the commands that only print (`--help`, `--version`, `recipes`) start fast."""
from __future__ import annotations

import os
import sys
from typing import IO

__all__ = ["say", "is_main_rank", "is_terminal", "console_width", "console"]


def is_main_rank() -> bool:
    "True on the process that prints: rank 0 under torchrun, the only process otherwise."
    return os.environ.get("RANK", "0") == "0"


def say(text: str, stream: IO | None = None) -> None:
    "Print one or more lines for the user, on the main process only, flushed (a log or `| tee` shows it at once)."
    if is_main_rank():
        print(text, file=stream or sys.stdout, flush=True)


def is_terminal(stream: IO | None = None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def console_width() -> int | None:
    "Columns to print in: $COLUMNS when set, else the terminal's (None: rich asks it), else 80 (piped, a file, CI)."
    cols = os.environ.get("COLUMNS", "").strip()
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    return None if is_terminal() else 80


def console():
    "The shared rich console, `console_width()` wide (plain text, no colour codes, when output is not a terminal)."
    from rich.console import Console  # only the commands that draw need rich
    return Console(highlight=False, soft_wrap=True, width=console_width()) if is_terminal() else \
        Console(highlight=False, soft_wrap=True, force_terminal=False, color_system=None, width=console_width())
