"""A study: one golden run against one or more test runs, diffed.

What `kvlab diff` shows, writes as JSON and as a report, whether the runs were captured first
(`kvlab.study.run_study`) or read from two snapshot folders (`kvlab.study.compare_snapshots`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvlab.compare.diff import DiffResult
from kvlab.snapshot import Snapshot


@dataclass
class Study:
    """One golden run against one or more test runs."""

    golden: Snapshot
    results: list[DiffResult]
    decode: Callable[[list[int]], str] | None = field(default=None, repr=False)
    golden_path: str | None = None
    golden_stop: dict[str, Any] | None = None  # the golden run ended at an end-of-sequence token early

    def stop_note(self) -> str | None:
        """One line when the golden run stopped before the steps asked for (its end-of-sequence token)."""
        stop = self.golden_stop
        if stop is None:
            return None
        text = self.token_text(stop["token"])
        token = repr(text) if text is not None else str(stop["token"])
        return (f"the golden run stopped early at step {stop['step']} (end-of-sequence token "
                f"{token}) after {stop['steps']} of the {stop['asked']} "
                "steps asked: there is less to compare; --ignore-eos keeps it generating")

    @property
    def golden_run(self) -> str:
        return self.golden.run

    def golden_text(self) -> str | None:
        return None if self.decode is None else self.decode(self.golden.token_ids[self.golden.n_prompt:])

    def token_text(self, token: int | None) -> str | None:
        return None if token is None or self.decode is None else self.decode([token])

    def prompt_text(self) -> str | None:
        return None if self.decode is None else self.decode(self.golden.token_ids[: self.golden.n_prompt])

    def tokens(self) -> list[str] | None:
        """The text of the token at each position, or None without a tokenizer."""
        return None if self.decode is None else [self.decode([t]) for t in self.golden.token_ids]

    def position_token(self, position: int) -> str:
        """The token at `position` for a line of text: its text quoted, else its id."""
        ids = self.golden.token_ids
        if not 0 <= position < len(ids):
            return ""
        if self.decode is None:
            return f"[id {ids[position]}]"
        from kvlab.compare.plots import short_token

        return repr(short_token(self.decode([ids[position]]), 24))

    def to_dict(self) -> dict[str, Any]:
        """`kvlab diff --json`: `{"golden": RUN, "tests": [...]}` plus the model and token counts."""
        return {
            "golden": self.golden_run,
            "tests": [r.to_dict() for r in self.results],
            "model": self.golden.model,
            "n_prompt": self.golden.n_prompt,
            "n_tokens": len(self.golden.token_ids),
            "golden_path": self.golden_path,
            "golden_text": self.golden_text(),
            "golden_stopped_early": self.golden_stop,
        }
