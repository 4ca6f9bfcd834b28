"""Where trainer caches what it can rebuild (tokenized datasets, converted models): one root, defined once."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$TRAINER_CACHE` if set (`~` expanded), else `~/.cache/trainer`. Tokenized data lives under `data/`,
    models the demo builds under `models/`, downloads under `downloads/`."""
    env = os.environ.get("TRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trainer"
