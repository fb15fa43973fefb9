"""What a memory indexes: a folder of images or a JSONL file of records, read into `MemoryItem`s, and the checks every
item passes before any is stored."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..formats import resolve_path

__all__ = ["IMAGE_EXTENSIONS", "MemoryItem", "check_items", "read_source"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Keys of a JSONL record that are not metadata.
RECORD_FIELDS = ("id", "image", "text")


@dataclass
class MemoryItem:
    """
    One item to store.

    Args:
        id: unique within the memory.
        image: a PIL image, a path or URL, or `None`.
        text: the item's text, or `None`.
        metadata: JSON-serialisable user data stored with the item.
    """

    id: str
    image: Any = None
    text: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def source(self) -> str | None:
        """The image's path or URL, when it was given as one."""
        return os.fspath(self.image) if isinstance(self.image, (str, os.PathLike)) else None


def check_items(items: Sequence[MemoryItem]) -> None:
    """
    Refuse, before anything is stored, items that cannot become rows: an id that is not a non-empty string, an id
    given twice, an item with neither an image nor a text, metadata that is not JSON-serialisable (the error names
    its type).
    """
    seen: set[str] = set()
    for item in items:
        if not isinstance(item.id, str) or not item.id:
            raise ValueError(f"Every item needs a non-empty string id; got {item.id!r}.")
        if item.id in seen:
            raise ValueError(f"Item id {item.id!r} appears twice: ids must be unique.")
        seen.add(item.id)
        if item.image is None and not item.text:
            raise ValueError(f"Item {item.id!r} has neither an image nor a text: there is nothing to store.")
        json.dumps(item.metadata)


def read_source(
    source: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> tuple[list[MemoryItem], list[tuple[str, str]]]:
    """
    Items from a folder of images (every image file below it, sorted; id = its path relative to the folder) or a
    JSONL file of records `{"id"?, "image"?, "text"?, ...}` (id = `"id"`, else the image path, else `line-N`;
    every other key goes to the metadata; relative image paths are under `image_root`, default the file's folder).

    Returns:
        The items, and `(where, reason)` for every record that cannot be an item (skipped and counted).
    Raises:
        ValueError: `source` is neither a folder nor a `.jsonl` file, holds no item, or repeats an id.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        items = _folder_items(source)
        failures: list[tuple[str, str]] = []
    elif os.path.isfile(source) and source.endswith(".jsonl"):
        root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(source))
        items, failures = _jsonl_items(source, root)
    else:
        raise ValueError(f"{source} is neither a folder of images nor a .jsonl file of records.")
    if not items and not failures:
        raise ValueError(f"{source} holds no item (images: {', '.join(IMAGE_EXTENSIONS)}; or JSONL records).")
    where: dict[str, int] = {}
    for position, item in enumerate(items):
        if item.id in where:
            raise ValueError(f"{source}: id {item.id!r} appears twice (items {where[item.id]} and {position}).")
        where[item.id] = position
    return items, failures


def _folder_items(folder: str) -> list[MemoryItem]:
    items = []
    for directory, subfolders, files in os.walk(folder):
        subfolders.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(directory, name)
                items.append(MemoryItem(id=os.path.relpath(path, folder).replace(os.sep, "/"), image=path))
    return sorted(items, key=lambda item: item.id)


def _jsonl_items(path: str, root: str) -> tuple[list[MemoryItem], list[tuple[str, str]]]:
    items, failures = [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                failures.append((where, f"not JSON: {error}"))
                continue
            if not isinstance(record, dict):
                failures.append((where, f"a record must be a JSON object, got {type(record).__name__}"))
                continue
            image, text = record.get("image") or None, record.get("text") or None
            if image is not None and not isinstance(image, str) or text is not None and not isinstance(text, str):
                failures.append((where, "'image' and 'text' must be strings"))
                continue
            if image is None and text is None:
                failures.append((where, "a record needs an 'image' or a 'text'"))
                continue
            item_id = record.get("id", image if image is not None else f"line-{number}")
            metadata = {key: value for key, value in record.items() if key not in RECORD_FIELDS}
            image_path = None if image is None else (image if "://" in image else resolve_path(image, root))
            items.append(MemoryItem(id=str(item_id), image=image_path, text=text, metadata=metadata))
    return items, failures
