"""Atomic file writes: a crash or an interrupted run never leaves half a file, nor overwrites a finished one."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["write_json_atomically", "write_text_atomically"]


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def write_json_atomically(path: str | os.PathLike, payload: Any) -> None:
    """`write_text_atomically` of `payload` as indented JSON."""
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")
