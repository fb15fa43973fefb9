"""Training data readers: MMEB-train retrieval pairs and LLaVA / ShareGPT4V conversations, validated up front.

Bad rows (missing or unreadable images, empty texts or answers, unknown image placeholders, uneven negative lists,
conversations without an image) are skipped and counted by reason, with a warning, or raise when `on_bad_row="raise"`.
Nothing is dropped silently: every reader returns a [`SkipReport`].
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import torch
from PIL import Image

__all__ = [
    "MixedStepDataset",
    "SkipReport",
    "load_conversations",
    "load_retrieval_pairs",
    "read_rows",
]

logger = logging.getLogger(__name__)

#: MMEB's (Phi-3-V) image placeholder; the processor puts the image first in the user turn instead.
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
#: LLaVA's image placeholder.
LLAVA_IMAGE_PLACEHOLDER = "<image>"
_ANY_PLACEHOLDER = re.compile(r"<\|image_\d+\|>|<image>|<\|image_pad\|>|<\|vision_start\|>")
_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BadRowPolicy = Literal["skip", "raise"]


@dataclass
class SkipReport:
    """Rows read from one source and the rows left out, counted by reason."""

    source: str
    total: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return self.total - sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.most_common())
        return f"{self.source}: kept {self.kept} of {self.total} rows" + (f"; skipped {reasons}" if reasons else "")

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "total": self.total, "kept": self.kept, "skipped": dict(self.skipped)}


def read_rows(
    source: str | os.PathLike | list[str], split: str = "train", subset: str | None = None
) -> datasets.Dataset:
    """
    Rows from local json/jsonl/parquet file(s) (one path or a list), or a Hub dataset name (online only).
    """
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


def _image_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return "missing image"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises many types for broken files
        return "unreadable image"
    return None


def _resolve(path: str | None, root: str | None) -> str:
    if not path:
        return ""
    return path if os.path.isabs(path) or root is None else os.path.join(root, path)


def _side(text: Any, image: Any, root: str | None, placeholder: str) -> tuple[str, str, str | None]:
    """One query/target side: `(text without the placeholder, image path or "", problem or None)`."""
    text = text if isinstance(text, str) else ""
    image = _resolve(image if isinstance(image, str) else None, root)
    has_placeholder = placeholder in text
    text = text.replace(placeholder, "").strip()
    if _ANY_PLACEHOLDER.search(text):
        return text, image, "unknown image placeholder"
    if has_placeholder and not image:
        return text, image, "placeholder without image"
    if image and not has_placeholder:
        return text, image, "image without placeholder"
    if not image and not text:
        return text, image, "empty text"
    return text, image, _image_problem(image) if image else None


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _normalise_pair(row: dict[str, Any], image_root: str | None) -> dict[str, Any]:
    query_text, query_image, problem = _side(
        row.get("qry"), row.get("qry_image_path"), image_root, MMEB_IMAGE_PLACEHOLDER
    )
    pos_text, pos_image, pos_problem = _side(
        row.get("pos_text"), row.get("pos_image_path"), image_root, MMEB_IMAGE_PLACEHOLDER
    )
    problem = problem or pos_problem
    neg_texts_raw, neg_images_raw = _as_list(row.get("neg_text")), _as_list(row.get("neg_image_path"))
    neg_texts, neg_images = [], []
    if neg_images_raw and len(neg_images_raw) != len(neg_texts_raw):
        problem = problem or "uneven negative lists"
    else:
        for i, text in enumerate(neg_texts_raw):
            image = neg_images_raw[i] if neg_images_raw else None
            text, image, neg_problem = _side(text, image, image_root, MMEB_IMAGE_PLACEHOLDER)
            problem = problem or neg_problem
            neg_texts.append(text)
            neg_images.append(image)
    return {
        "query_text": query_text,
        "query_image": query_image,
        "pos_text": pos_text,
        "pos_image": pos_image,
        "neg_texts": neg_texts,
        "neg_images": neg_images,
        "problem": problem or "",
    }


def _normalise_conversation(row: dict[str, Any], image_root: str | None) -> dict[str, Any]:
    image = _resolve(row.get("image") if isinstance(row.get("image"), str) else None, image_root)
    turns, problem = [], None
    expected = ("human", "gpt")
    for i, message in enumerate(row.get("conversations") or []):
        speaker, value = message.get("from"), message.get("value")
        if speaker != expected[i % 2]:
            problem = problem or "turns out of order"
        if not isinstance(value, str) or not value.replace(LLAVA_IMAGE_PLACEHOLDER, "").strip():
            problem = problem or ("empty answer" if speaker == "gpt" else "empty question")
            value = value if isinstance(value, str) else ""
        if LLAVA_IMAGE_PLACEHOLDER in value and i > 0:
            problem = problem or "image placeholder after the first turn"
        value = value.replace(LLAVA_IMAGE_PLACEHOLDER, "").strip() if i == 0 else value.strip()
        if _ANY_PLACEHOLDER.search(value):
            problem = problem or "unknown image placeholder"
        turns.append(value)
    if len(turns) < 2:
        problem = problem or "no answer"
    if not image:
        problem = problem or "conversation without an image"
    elif problem is None:
        problem = _image_problem(image)
    return {"image": image, "turns": turns, "problem": problem or ""}


def _validated(
    rows: datasets.Dataset,
    normalise,
    image_root: str | None,
    source: str,
    on_bad_row: BadRowPolicy,
    num_proc: int | None,
) -> tuple[datasets.Dataset, SkipReport]:
    if on_bad_row not in ("skip", "raise"):
        raise ValueError(f"on_bad_row must be 'skip' or 'raise', got {on_bad_row!r}.")
    normalised = rows.map(
        normalise,
        fn_kwargs={"image_root": image_root},
        remove_columns=rows.column_names,
        num_proc=num_proc,
        desc=f"Checking {source}",
    )
    report = SkipReport(source=source, total=len(normalised), skipped=Counter(p for p in normalised["problem"] if p))
    if report.skipped:
        if on_bad_row == "raise":
            first = next(i for i, p in enumerate(normalised["problem"]) if p)
            raise ValueError(f"{report.summary()} (first bad row: {first}, {normalised[first]['problem']}).")
        logger.warning("Skipping bad rows. %s", report.summary())
    kept = normalised.filter(lambda row: not row["problem"], num_proc=num_proc).remove_columns("problem")
    return kept, report


def load_retrieval_pairs(
    source: str | os.PathLike | list[str],
    image_root: str | None = None,
    split: str = "train",
    subset: str | None = None,
    on_bad_row: BadRowPolicy = "skip",
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, SkipReport]:
    """
    Retrieval pairs in the MMEB-train form (`qry`, `qry_image_path`, `pos_text`, `pos_image_path`, optional
    `neg_text` / `neg_image_path`, strings or lists), with `<|image_1|>` marking an image.

    Returns:
        The kept rows as `query_text`, `query_image`, `pos_text`, `pos_image`, `neg_texts`, `neg_images` (image
        paths resolved against `image_root`; "" where a side has no image), and the [`SkipReport`].
    """
    rows = read_rows(source, split=split, subset=subset)
    return _validated(rows, _normalise_pair, image_root, f"retrieval data {source}", on_bad_row, num_proc)


def load_conversations(
    source: str | os.PathLike | list[str],
    image_root: str | None = None,
    split: str = "train",
    subset: str | None = None,
    on_bad_row: BadRowPolicy = "skip",
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, SkipReport]:
    """
    Generation conversations in the LLaVA / ShareGPT4V form (`image`, `conversations` of `{"from": "human" |
    "gpt", "value": ...}`, `<image>` in the first human turn), single or multi-turn.

    Returns:
        The kept rows as `image` (resolved path) and `turns` (alternating user / assistant texts, placeholder
        removed), and the [`SkipReport`].
    """
    rows = read_rows(source, split=split, subset=subset)
    return _validated(rows, _normalise_conversation, image_root, f"generation data {source}", on_bad_row, num_proc)


class MixedStepDataset(torch.utils.data.Dataset):
    """
    One item = one optimisation step's rows for one process: `retrieval_per_step` retrieval pairs and
    `generation_per_step` conversations (the two parts have separate batch sizes, as in the paper: 1024 and 128
    globally). Retrieval rows are visited once per epoch in a seeded order; generation rows cycle independently.

    Use it with `per_device_train_batch_size=1`: the Trainer's sampler then shuffles and shards whole steps.
    """

    def __init__(
        self,
        retrieval: datasets.Dataset | None,
        generation: datasets.Dataset | None,
        retrieval_per_step: int,
        generation_per_step: int,
        seed: int = 0,
    ):
        if retrieval_per_step < 0 or generation_per_step < 0:
            raise ValueError("Batch sizes must be >= 0.")
        self.retrieval = retrieval if retrieval_per_step else None
        self.generation = generation if generation_per_step else None
        if self.retrieval is None and self.generation is None:
            raise ValueError("Training needs retrieval data, generation data or both (with a batch size > 0).")
        for name, data, per_step in (
            ("retrieval", self.retrieval, retrieval_per_step),
            ("generation", self.generation, generation_per_step),
        ):
            if data is not None and len(data) < per_step:
                raise ValueError(f"The {name} data has {len(data)} rows, fewer than one step's {per_step}.")
        self.retrieval_per_step = retrieval_per_step
        self.generation_per_step = generation_per_step
        generator = torch.Generator().manual_seed(seed)
        self._retrieval_order = torch.randperm(len(retrieval), generator=generator) if self.retrieval else None
        self._generation_order = torch.randperm(len(generation), generator=generator) if self.generation else None

    def __len__(self) -> int:
        if self.retrieval is not None:
            return len(self.retrieval) // self.retrieval_per_step
        return len(self.generation) // self.generation_per_step

    def __getitem__(self, step: int) -> dict[str, Any]:
        item: dict[str, Any] = {"step": step}
        if self.retrieval is not None:
            rows = self._retrieval_order[step * self.retrieval_per_step : (step + 1) * self.retrieval_per_step]
            item["retrieval"] = self.retrieval[rows.tolist()]
        if self.generation is not None:
            chunks = len(self.generation) // self.generation_per_step
            start = (step % chunks) * self.generation_per_step
            rows = self._generation_order[start : start + self.generation_per_step]
            item["generation"] = self.generation[rows.tolist()]
        return item
