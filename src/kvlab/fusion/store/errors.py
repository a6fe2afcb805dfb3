"""The chunk store's errors: what every backend, the codec and the callers agree to raise and catch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kvlab.errors import KvlabError


class StoreError(KvlabError):
    """A store that cannot be opened or used (bad URL, unreachable server, wrong format)."""


class CorruptChunkError(StoreError):
    """A stored chunk whose bytes no longer match its checksum."""


@contextlib.contextmanager
def store_errors(errors: type[BaseException] | tuple[type[BaseException], ...], what: str) -> Iterator[None]:
    """Turn a backend's own failures (lost server, unusable index) into one StoreError line."""
    try:
        yield
    except errors as err:
        text = str(err).strip()
        raise StoreError(f"{what}: {text.splitlines()[0] if text else type(err).__name__}") from None
