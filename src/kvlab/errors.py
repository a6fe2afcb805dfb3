"""The one exception type for errors a user can cause.

The CLI prints a KvlabError as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class KvlabError(Exception):
    """A user-facing error: bad input, missing or corrupt file, mismatched models."""

    exit_code = 2
