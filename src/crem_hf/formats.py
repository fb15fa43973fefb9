"""The public data formats CREM reads (MMEB, LLaVA): their image placeholders and how one text side is parsed.

Shared by the training readers and the evaluation, so both read a row the same way.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import datasets

__all__ = [
    "LLAVA_IMAGE_PLACEHOLDER",
    "MMEB_IMAGE_PLACEHOLDER",
    "image_problem",
    "parse_side",
    "read_rows",
    "resolve_path",
]

#: MMEB's (Phi-3-V) image placeholder; the processor puts the image first in the user turn instead.
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
#: LLaVA's image placeholder.
LLAVA_IMAGE_PLACEHOLDER = "<image>"
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ANY_PLACEHOLDER = re.compile(r"<\|image_\d+\|>|<image>|<\|image_pad\|>|<\|vision_start\|>")


def resolve_path(path: str | None, root: str | None) -> str:
    """`path` under `root` (unless absolute); "" for no path."""
    if not path:
        return ""
    return path if os.path.isabs(path) or root is None else os.path.join(root, path)


def image_problem(path: str) -> str | None:
    """Why the image file cannot be used ("missing image", "unreadable image"), or None."""
    if not os.path.isfile(path):
        return "missing image"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises many types for broken files
        return "unreadable image"
    return None


def parse_side(text, image, root: str | None, placeholder: str = MMEB_IMAGE_PLACEHOLDER, check_image: bool = True):
    """
    One query/target side of an MMEB row: `(text without the placeholder, resolved image path or "", problem)`,
    where problem is None or a short reason (unknown placeholder, placeholder without image, image without
    placeholder, empty text, missing/unreadable image).
    """
    text = text if isinstance(text, str) else ""
    image = resolve_path(image if isinstance(image, str) else None, root)
    has_placeholder = placeholder in text
    text = text.replace(placeholder, "").strip()
    if ANY_PLACEHOLDER.search(text):
        return text, image, "unknown image placeholder"
    if has_placeholder and not image:
        return text, image, "placeholder without image"
    if image and not has_placeholder:
        return text, image, "image without placeholder"
    if not image and not text:
        return text, image, "empty text"
    return text, image, image_problem(image) if image and check_image else None


def read_rows(
    source: str | os.PathLike | list[str], split: str = "train", subset: str | None = None
) -> datasets.Dataset:
    """
    Rows from local json/jsonl/parquet file(s) (one path or a list), or a Hub dataset name (online only).
    """
    import datasets  # noqa: F811 (the train/eval extras, imported when needed)

    paths = [os.fspath(p) for p in (source if isinstance(source, list) else [source])]
    suffixes = {os.path.splitext(p)[1].lower() for p in paths}
    if all(os.path.exists(p) for p in paths):
        if len(suffixes) != 1 or next(iter(suffixes)) not in _LOCAL_FORMATS:
            raise ValueError(f"Local data must be .json, .jsonl or .parquet files of one kind, got {paths}.")
        return datasets.load_dataset(_LOCAL_FORMATS[suffixes.pop()], data_files=paths, split="train")
    missing = [p for p in paths if os.path.splitext(p)[1].lower() in _LOCAL_FORMATS and not os.path.exists(p)]
    if missing:
        raise ValueError(f"Data file(s) not found: {missing}")
    if len(paths) != 1:
        raise ValueError(f"Give one Hub dataset name, got {paths}.")
    return datasets.load_dataset(paths[0], subset, split=split)
