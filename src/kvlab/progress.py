"""Progress bars for long work (rich), on stderr so stdout stays clean for results.

Bars are drawn only when stderr is a terminal: logs and CI output stay free of them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class Bar:
    """What a long loop reports to: `advance(n)` per unit, `finish()` if it stops early."""

    def __init__(self, progress=None, task=None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    __call__ = advance

    def finish(self) -> None:
        """Mark the work complete (e.g. generation stopped at end-of-sequence)."""
        if self._progress is not None:
            done = self._progress.tasks[0].completed
            self._progress.update(self._task, total=done)


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, enabled: bool = True) -> Iterator[Bar]:
    """Yield a Bar; draws it with rate and time left when `enabled` and stderr is a terminal."""
    if not (enabled and sys.stderr.isatty()):
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        bar = Bar(progress, progress.add_task(description, total=total))
        yield bar
        bar.finish()
