"""The one exception type for errors a user can cause.

The CLI prints a KvlabError as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class KvlabError(Exception):
    """A user-facing error: bad input, missing or corrupt file, mismatched models."""

    exit_code = 2


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
