"""Who is computing a chunk: owner names for claims, and whether an owner is still alive.

A claim names its owner as `host:pid:token`. A claim held by a process that no longer exists on
this host can be taken at once (a precompute killed half-way resumes without waiting for its
claims to time out); claims from other hosts are trusted until they expire.
"""

from __future__ import annotations

import os
import socket
import uuid


def new_owner() -> str:
    """A name for this process's claims, unique per store handle."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True when `owner` was a process on this host that has exited."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
