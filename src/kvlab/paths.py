"""Where kvlab keeps what it builds once: converted models, hardware figures."""

from __future__ import annotations

import os
from pathlib import Path


def kvlab_home() -> Path:
    """`$KVLAB_HOME`, or `~/.cache/kvlab`; created on first use."""
    home = Path(os.environ.get("KVLAB_HOME") or Path.home() / ".cache" / "kvlab").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
