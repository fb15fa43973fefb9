"""Training data readers: MMEB-train retrieval pairs and LLaVA / ShareGPT4V conversations, validated up front.

Bad rows (missing or unreadable images, empty texts or answers, unknown image placeholders, uneven negative lists,
conversations without an image) are skipped and counted by reason, with a warning, or raise when `on_bad_row="raise"`.
Nothing is dropped silently: every reader returns a [`SkipReport`].
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import torch

from ..formats import (
    ANY_PLACEHOLDER,
    LLAVA_IMAGE_PLACEHOLDER,
    MMEB_IMAGE_PLACEHOLDER,
    image_problem,
    parse_side,
    read_rows,
    resolve_path,
)

__all__ = [
    "MixedStepDataset",
    "SkipReport",
    "load_conversations",
    "load_retrieval_pairs",
    "read_rows",
]

logger = logging.getLogger(__name__)

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


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _normalise_pair(row: dict[str, Any], image_root: str | None) -> dict[str, Any]:
    query_text, query_image, problem = parse_side(
        row.get("qry"), row.get("qry_image_path"), image_root, MMEB_IMAGE_PLACEHOLDER
    )
    pos_text, pos_image, pos_problem = parse_side(
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
            text, image, neg_problem = parse_side(text, image, image_root, MMEB_IMAGE_PLACEHOLDER)
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
    image = resolve_path(row.get("image") if isinstance(row.get("image"), str) else None, image_root)
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
        if ANY_PLACEHOLDER.search(value):
            problem = problem or "unknown image placeholder"
        turns.append(value)
    if len(turns) < 2:
        problem = problem or "no answer"
    if not image:
        problem = problem or "conversation without an image"
    elif problem is None:
        problem = image_problem(image)
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

    Args:
        source: a file, a list of files (one per subset, as MMEB-train ships them) or a Hub dataset name.
    Returns:
        The kept rows as `query_text`, `query_image`, `pos_text`, `pos_image`, `neg_texts`, `neg_images` (image
        paths resolved against `image_root`; "" where a side has no image) and `group` (the index of the row's
        file in `source`, for homogeneous batches), and the [`SkipReport`] over all files.
    """
    sources = source if isinstance(source, list) else [source]
    parts, report = [], SkipReport(source=f"retrieval data {', '.join(map(str, sources))}")
    for group, path in enumerate(sources):
        rows = read_rows(path, split=split, subset=subset)
        kept, part_report = _validated(
            rows, _normalise_pair, image_root, f"retrieval data {path}", on_bad_row, num_proc
        )
        parts.append(kept.add_column("group", [group] * len(kept)))
        report.total += part_report.total
        report.skipped.update(part_report.skipped)
    return datasets.concatenate_datasets(parts), report


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
    With `homogeneous`, every step's retrieval rows come from one `group` (one subset file), as VLM2Vec's
    interleaved batches do: in-batch negatives then share the query's task, which makes them informative.

    Use it with `per_device_train_batch_size=1`: the Trainer's sampler then shuffles and shards whole steps.
    """

    def __init__(
        self,
        retrieval: datasets.Dataset | None,
        generation: datasets.Dataset | None,
        retrieval_per_step: int,
        generation_per_step: int,
        seed: int = 0,
        homogeneous: bool = False,
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
        self._retrieval_steps = self._step_rows(homogeneous, generator) if self.retrieval is not None else []
        self._generation_order = torch.randperm(len(generation), generator=generator) if self.generation else None

    def _step_rows(self, homogeneous: bool, generator: torch.Generator) -> list[list[int]]:
        """The retrieval rows of every step: a seeded order, chunked (per group when homogeneous)."""
        per_step = self.retrieval_per_step
        if not homogeneous:
            order = torch.randperm(len(self.retrieval), generator=generator).tolist()
            return [order[i : i + per_step] for i in range(0, len(order) - per_step + 1, per_step)]
        if "group" not in self.retrieval.column_names:
            raise ValueError("homogeneous batches need a `group` column (load the subsets as a list of files).")
        groups = torch.tensor(self.retrieval["group"])
        steps = []
        for group in groups.unique().tolist():
            rows = (groups == group).nonzero().flatten()
            rows = rows[torch.randperm(len(rows), generator=generator)].tolist()
            steps += [rows[i : i + per_step] for i in range(0, len(rows) - per_step + 1, per_step)]
        if not steps:
            raise ValueError(f"No group has the {per_step} retrieval rows of one step.")
        return [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]

    def __len__(self) -> int:
        if self.retrieval is not None:
            return len(self._retrieval_steps)
        return len(self.generation) // self.generation_per_step

    def __getitem__(self, step: int) -> dict[str, Any]:
        item: dict[str, Any] = {"step": step}
        if self.retrieval is not None:
            item["retrieval"] = self.retrieval[self._retrieval_steps[step]]
        if self.generation is not None:
            chunks = len(self.generation) // self.generation_per_step
            start = (step % chunks) * self.generation_per_step
            rows = self._generation_order[start : start + self.generation_per_step]
            item["generation"] = self.generation[rows.tolist()]
        return item
