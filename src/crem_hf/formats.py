"""The public data formats CREM reads (MMEB, LLaVA): their image placeholders, how one text side is parsed, where a
subset's rows live in a local copy of a Hub dataset, and a conversation as chat messages.

Shared by the training readers and the evaluation, so both read a row the same way.
"""

from __future__ import annotations

import glob
import os
import re
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import datasets

__all__ = [
    "LLAVA_IMAGE_PLACEHOLDER",
    "MMEB_IMAGE_PLACEHOLDER",
    "OUTSIDE_ROOT",
    "OUTSIDE_ROOT_HINT",
    "conversation_messages",
    "image_problem",
    "locate_subset",
    "outside_root",
    "parse_side",
    "read_rows",
    "resolve_path",
    "subset_names",
]

#: MMEB's (Phi-3-V) image placeholder; the processor puts the image first in the user turn instead.
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
#: LLaVA's image placeholder.
LLAVA_IMAGE_PLACEHOLDER = "<image>"
#: Why a row is refused when its image path leaves the image root.
OUTSIDE_ROOT = "image path outside the image root"
#: What an error about such a path adds (the evaluation readers, which stop at a bad row).
OUTSIDE_ROOT_HINT = (
    " Under an image root, image paths must stay inside it (no absolute paths, no ../); without an image root"
    " they are used as they are."
)
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_FLAT_SUFFIXES = (".jsonl", ".json", ".parquet")
ANY_PLACEHOLDER = re.compile(r"<\|image_\d+\|>|<image>|<\|image_pad\|>|<\|vision_start\|>")


def conversation_messages(image: Any, turns: list[str]) -> list[dict]:
    """
    One image and alternating user / assistant turns (a `load_conversations` row, or a question alone) as chat
    messages for `CREMProcessor.process_chat`: the image and the first turn's text in the first user message.
    """
    first = [{"type": "image", "image": image}, {"type": "text", "text": turns[0]}]
    later = [{"role": "assistant" if i % 2 else "user", "content": text} for i, text in enumerate(turns[1:], 1)]
    return [{"role": "user", "content": first}, *later]


def resolve_path(path: str | None, root: str | None) -> str:
    """`path` under `root` (unless absolute); "" for no path."""
    if not path:
        return ""
    return path if os.path.isabs(path) or root is None else os.path.join(root, path)


def outside_root(path: str | None, root: str | None) -> bool:
    """
    Whether a data file's image `path` leaves `root`: an absolute path, or a relative one that climbs out of it
    (`../`). Decided on the text of the path (no symlinks followed, so a root holding links still works); False
    when there is no root or no path.
    """
    if not path or root is None:
        return False
    if os.path.isabs(path):
        return True
    normal = os.path.normpath(path)
    return normal == os.pardir or normal.startswith(os.pardir + os.sep)


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


def parse_side(
    text,
    image,
    root: str | None,
    placeholder: str = MMEB_IMAGE_PLACEHOLDER,
    check_image: bool = True,
    allow_outside_root: bool = False,
):
    """
    One query/target side of an MMEB row: `(text without the placeholder, resolved image path or "", problem)`,
    where problem is None or a short reason (unknown placeholder, placeholder without image, image without
    placeholder, empty text, image path outside the image root, missing/unreadable image).

    A side with an image and no text at all is an image-only side (VLM2Vec keeps such negatives and candidates);
    an image beside a text that lacks the placeholder is refused, since the text does not say where it goes. Image
    paths that leave `root` (absolute, or climbing out with `../`) are refused unless `allow_outside_root`.
    """
    text = text if isinstance(text, str) else ""
    raw_image = image if isinstance(image, str) else None
    image = resolve_path(raw_image, root)
    has_placeholder = placeholder in text
    text = text.replace(placeholder, "").strip()
    if ANY_PLACEHOLDER.search(text):
        return text, image, "unknown image placeholder"
    if has_placeholder and not image:
        return text, image, "placeholder without image"
    if image and not has_placeholder and text:
        return text, image, "image without placeholder"
    if not image and not text:
        return text, image, "empty text"
    if not allow_outside_root and outside_root(raw_image, root):
        return text, image, OUTSIDE_ROOT
    return text, image, image_problem(image) if image and check_image else None


def subset_names(folder: str | os.PathLike, split: str) -> list[str]:
    """The subsets of a local Hub-layout copy: sub-folders of `folder` holding `<split>-*.parquet`, sorted."""
    folder = os.fspath(folder)
    pattern = os.path.join(glob.escape(folder), "*", f"{glob.escape(split)}-*.parquet")
    return sorted({os.path.basename(os.path.dirname(path)) for path in glob.glob(pattern)})


def locate_subset(folder: str | os.PathLike, subset: str, split: str) -> list[str]:
    """
    The local file(s) of one subset in `folder`, in either layout:

    - the Hub layout, as `huggingface-cli download` leaves a dataset such as TIGER-Lab/MMEB-eval (split `test`) or
      TIGER-Lab/MMEB-train (splits `original`, `diverse_instruction`): `<folder>/<subset>/<split>-*.parquet`
      (all shards, in order);
    - the flat layout: `<folder>/<subset>.jsonl` (or `.json`, `.parquet`).

    Raises:
        ValueError: when neither exists (naming what the subset's folder holds, if anything), or when more than one
            candidate exists (which one holds the rows would be a guess).
    """
    folder = os.fspath(folder)
    hub = sorted(glob.glob(os.path.join(glob.escape(folder), glob.escape(subset), f"{glob.escape(split)}-*.parquet")))
    flat = [
        path for path in (os.path.join(folder, subset + suffix) for suffix in _FLAT_SUFFIXES) if os.path.isfile(path)
    ]
    if (hub and flat) or len(flat) > 1:
        raise ValueError(
            f"Subset {subset}: several files could hold its rows ({hub + flat}); keep one layout and one file."
        )
    if hub or flat:
        return hub or flat
    subset_folder = os.path.join(folder, subset)
    expected = f"{subset_folder}/{split}-*.parquet (Hub layout) or {subset_folder}.jsonl/.json/.parquet (flat layout)"
    if os.path.isdir(subset_folder):
        held = sorted(os.listdir(subset_folder))
        raise ValueError(f"Subset {subset}: found no {expected}; {subset_folder} holds {held} (another split?).")
    available = subset_names(folder, split)
    hint = f"; subsets with a {split!r} split there: {available}" if available else ""
    raise ValueError(f"Subset {subset}: found no {expected}{hint}.")


def _load_file(path: str) -> datasets.Dataset:
    """One local file's rows; every failure names the file."""
    import datasets  # noqa: F811 (the train/eval extras, imported when needed)

    kind = _LOCAL_FORMATS[os.path.splitext(path)[1].lower()]
    if os.path.getsize(path) == 0:
        raise ValueError(f"Data file {path} is empty.")
    try:
        rows = datasets.load_dataset(kind, data_files=[path], split="train")
    except StopIteration as error:  # what `datasets` raises for a json file without rows
        raise ValueError(f"Data file {path} holds no rows.") from error
    except Exception as error:
        if "corresponds to no data" in str(error):  # `datasets`' words for a json list without rows
            raise ValueError(f"Data file {path} holds no rows.") from error
        cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
        raise ValueError(f"Cannot read {path} as {kind}: {error}{cause}") from error
    if len(rows) == 0:
        raise ValueError(f"Data file {path} holds no rows.")
    return rows


def read_rows(
    source: str | os.PathLike | list[str], split: str = "train", subset: str | None = None
) -> datasets.Dataset:
    """
    Rows from local json/jsonl/parquet file(s) (one path or a list, read file by file so that an error names its
    file), one subset of a local folder (see [`locate_subset`]; `split` picks the Hub-layout files), or a Hub
    dataset name (online only).

    Raises:
        ValueError: naming the file that is missing, empty, or not in its format.
    """
    import datasets  # noqa: F811 (the train/eval extras, imported when needed)

    if not isinstance(source, list) and os.path.isdir(source):
        if subset is None:
            raise ValueError(f"{os.fspath(source)} is a folder: name the subset to read from it.")
        source = locate_subset(source, subset, split)
    paths = [os.fspath(p) for p in (source if isinstance(source, list) else [source])]
    suffixes = {os.path.splitext(p)[1].lower() for p in paths}
    if all(os.path.isfile(p) for p in paths):
        if len(suffixes) != 1 or next(iter(suffixes)) not in _LOCAL_FORMATS:
            raise ValueError(f"Local data must be .json, .jsonl or .parquet files of one kind, got {paths}.")
        parts = [_load_file(p) for p in paths]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    missing = [p for p in paths if os.path.splitext(p)[1].lower() in _LOCAL_FORMATS and not os.path.exists(p)]
    if missing:
        raise ValueError(f"Data file(s) not found: {missing}")
    if len(paths) != 1:
        raise ValueError(f"Give one Hub dataset name, got {paths}.")
    return datasets.load_dataset(paths[0], subset, split=split)
