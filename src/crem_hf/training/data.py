"""Training data readers: MMEB-train retrieval pairs and LLaVA / ShareGPT4V conversations, validated up front.

Bad rows (missing or unreadable images, image paths outside the image root, empty texts or answers, unknown image
placeholders, uneven negative lists, malformed or image-less conversations) are skipped and counted by reason, with a
warning, or raise when `on_bad_row="raise"`. Nothing is dropped silently: every reader returns a [`SkipReport`].
Every kept row remembers its origin (`source`: the file, or the Hub dataset; `source_row`: its index there), so that
a row that fails later, when the collator builds it, is named by file and row too (see [`build_step_rows`]).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import datasets
import torch

from ..formats import (
    ANY_PLACEHOLDER,
    LLAVA_IMAGE_PLACEHOLDER,
    MMEB_IMAGE_PLACEHOLDER,
    OUTSIDE_ROOT,
    image_problem,
    locate_subset,
    outside_root,
    parse_side,
    read_rows,
    resolve_path,
    subset_names,
)

__all__ = [
    "MixedStepDataset",
    "SkipReport",
    "build_step_rows",
    "load_conversations",
    "load_retrieval_pairs",
]

logger = logging.getLogger(__name__)

BadRowPolicy = Literal["skip", "raise"]
_Built = TypeVar("_Built")


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


def _negatives(texts: Any, images: Any) -> tuple[list, list, str | None]:
    """
    A row's hard negatives as parallel `(texts, images)` lists, and a problem or None. Two strings are VLM2Vec's form
    (one negative, either side may be empty: an image-only negative is kept); lists pair up item by item, an empty
    or missing side meaning no text (or no image) for every negative.
    """
    if not isinstance(texts, (list, tuple)) and not isinstance(images, (list, tuple)):
        return ([texts or ""], [images or ""], None) if (texts or images) else ([], [], None)
    texts, images = _as_list(texts), _as_list(images)
    texts, images = texts or [""] * len(images), images or [""] * len(texts)
    if len(texts) != len(images):
        return [], [], "uneven negative lists"
    return texts, images, None


def _normalise_pair(
    row: dict[str, Any], index: int, image_root: str | None, allow_outside_root: bool
) -> dict[str, Any]:
    def side(text, image):
        return parse_side(text, image, image_root, MMEB_IMAGE_PLACEHOLDER, allow_outside_root=allow_outside_root)

    query_text, query_image, problem = side(row.get("qry"), row.get("qry_image_path"))
    pos_text, pos_image, pos_problem = side(row.get("pos_text"), row.get("pos_image_path"))
    problem = problem or pos_problem
    neg_texts_raw, neg_images_raw, neg_problem = _negatives(row.get("neg_text"), row.get("neg_image_path"))
    problem = problem or neg_problem
    neg_texts, neg_images = [], []
    for text, image in zip(neg_texts_raw, neg_images_raw, strict=True):
        text, image, neg_problem = side(text, image)
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
        "source_row": index,
    }


def _normalise_conversation(
    row: dict[str, Any], index: int, image_root: str | None, allow_outside_root: bool
) -> dict[str, Any]:
    raw_image = row.get("image") if isinstance(row.get("image"), str) else None
    image = resolve_path(raw_image, image_root)
    turns, problem = [], None
    conversation = row.get("conversations")
    if not isinstance(conversation, list):
        problem, conversation = "malformed conversation", []
    expected = ("human", "gpt")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict):  # e.g. a bare string instead of {"from": ..., "value": ...}
            problem = problem or "malformed turn"
            turns.append("")
            continue
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
    elif not allow_outside_root and outside_root(raw_image, image_root):
        problem = problem or OUTSIDE_ROOT
    elif problem is None:
        problem = image_problem(image)
    return {"image": image, "turns": turns, "problem": problem or "", "source_row": index}


#: Columns a reader needs: at least one of each tuple.
_RETRIEVAL_COLUMNS = (("qry", "qry_image_path"), ("pos_text", "pos_image_path"))
_CONVERSATION_COLUMNS = (("conversations",),)
_TEXTS = datasets.Sequence(datasets.Value("string"))
# Declared, so that files whose rows all lack (say) negatives still concatenate with the others.
_PAIR_FEATURES = datasets.Features(
    {
        **{key: datasets.Value("string") for key in ("query_text", "query_image", "pos_text", "pos_image")},
        "neg_texts": _TEXTS,
        "neg_images": _TEXTS,
        "problem": datasets.Value("string"),
        "source_row": datasets.Value("int64"),
    }
)
_CONVERSATION_FEATURES = datasets.Features(
    {
        "image": datasets.Value("string"),
        "turns": _TEXTS,
        "problem": datasets.Value("string"),
        "source_row": datasets.Value("int64"),
    }
)


def _validated(
    rows: datasets.Dataset,
    normalise,
    image_root: str | None,
    source: str,
    label: str,
    on_bad_row: BadRowPolicy,
    num_proc: int | None,
    allow_outside_root: bool,
    columns: tuple[tuple[str, ...], ...],
    features: datasets.Features,
) -> tuple[datasets.Dataset, SkipReport]:
    missing = [" or ".join(names) for names in columns if not set(names) & set(rows.column_names)]
    if missing:
        raise ValueError(f"{source}: no column {', '.join(missing)} (it has {rows.column_names}).")
    normalised = rows.map(
        normalise,
        with_indices=True,
        fn_kwargs={"image_root": image_root, "allow_outside_root": allow_outside_root},
        remove_columns=rows.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"Checking {source}",
    )
    report = SkipReport(
        source=f"{label} {source}", total=len(normalised), skipped=Counter(p for p in normalised["problem"] if p)
    )
    if report.skipped:
        if on_bad_row == "raise":
            first = next(i for i, p in enumerate(normalised["problem"]) if p)
            raise ValueError(f"{source}, row {first}: {normalised[first]['problem']} ({report.summary()}).")
        logger.warning("Skipping bad rows. %s", report.summary())
    kept = normalised.filter(lambda row: not row["problem"], num_proc=num_proc).remove_columns("problem")
    return kept.add_column("source", [source] * len(kept)), report


def _parts(
    source: str | os.PathLike | list[str], split: str, subset: str | list[str] | None
) -> list[tuple[int, str, str, str | None]]:
    """
    What to read, one entry per file: `(group, name, source, subset)`. A group is one input file, one subset of a
    local folder (all its shards) or one subset of a Hub dataset; `name` is the file (or `hub-name[subset]`).
    """
    sources = [os.fspath(s) for s in (source if isinstance(source, list) else [source])]
    subsets = subset if isinstance(subset, list) else [subset]
    if len(sources) > 1 and len(subsets) > 1:
        raise ValueError("Give several files or several subsets of one source, not both.")
    parts: list[tuple[int, str, str, str | None]] = []
    groups = 0
    for path in sources:
        if os.path.isdir(path):
            names = subsets if subset is not None else subset_names(path, split)
            if not names:
                raise ValueError(f"{path}: no <subset>/{split}-*.parquet folder in it; name the subsets to read.")
            if subset is None:
                logger.info("Reading the %d subsets of %s: %s", len(names), path, ", ".join(names))
            for name in names:
                parts += [(groups, shard, shard, None) for shard in locate_subset(path, name, split)]
                groups += 1
        elif os.path.exists(path) or os.path.splitext(path)[1].lower() in (".json", ".jsonl", ".parquet"):
            parts.append((groups, path, path, None))
            groups += 1
        else:  # a Hub dataset name
            for name in subsets:
                parts.append((groups, f"{path}[{name}]" if name else path, path, name))
                groups += 1
    return parts


def _read_all(
    source, split, subset, normalise, columns, features, label, image_root, on_bad_row, num_proc, allow_outside_root
) -> tuple[list[tuple[int, datasets.Dataset]], SkipReport]:
    if on_bad_row not in ("skip", "raise"):
        raise ValueError(f"on_bad_row must be 'skip' or 'raise', got {on_bad_row!r}.")
    parts = _parts(source, split, subset)
    report = SkipReport(source=f"{label} {', '.join(name for _, name, _, _ in parts)}")
    kept_parts = []
    for group, name, path, part_subset in parts:
        rows = read_rows(path, split=split, subset=part_subset)
        kept, part_report = _validated(
            rows, normalise, image_root, name, label, on_bad_row, num_proc, allow_outside_root, columns, features
        )
        kept_parts.append((group, kept))
        report.total += part_report.total
        report.skipped.update(part_report.skipped)
    return kept_parts, report


def load_retrieval_pairs(
    source: str | os.PathLike | list[str],
    image_root: str | None = None,
    split: str = "train",
    subset: str | list[str] | None = None,
    on_bad_row: BadRowPolicy = "skip",
    num_proc: int | None = None,
    allow_outside_root: bool = False,
) -> tuple[datasets.Dataset, SkipReport]:
    """
    Retrieval pairs in the MMEB-train form (`qry`, `qry_image_path`, `pos_text`, `pos_image_path`, optional
    `neg_text` / `neg_image_path`, strings or lists), with `<|image_1|>` marking an image. A side with an image and
    no text is image-only.

    Args:
        source: a file, a list of files (one per subset), a local copy of TIGER-Lab/MMEB-train (a folder holding
            `<subset>/<split>-*.parquet`, or `<subset>.jsonl` files) or a Hub dataset name.
        split: the Hub-layout split (`original` or `diverse_instruction` for MMEB-train); ignored for files.
        subset: the subset(s) of a folder or a Hub dataset; None reads every subset of a folder.
        allow_outside_root: accept image paths that leave `image_root` (absolute, or with `../`); by default such
            rows are bad rows ("image path outside the image root").
    Returns:
        The kept rows as `query_text`, `query_image`, `pos_text`, `pos_image`, `neg_texts`, `neg_images` (image
        paths resolved against `image_root`; "" where a side has no image), `group` (the row's file or subset, for
        homogeneous batches) and `source` / `source_row` (its file and row there), and the [`SkipReport`] over all.
    """
    parts, report = _read_all(
        source,
        split,
        subset,
        _normalise_pair,
        _RETRIEVAL_COLUMNS,
        _PAIR_FEATURES,
        "retrieval data",
        image_root,
        on_bad_row,
        num_proc,
        allow_outside_root,
    )
    grouped = [kept.add_column("group", [group] * len(kept)) for group, kept in parts]
    return datasets.concatenate_datasets(grouped), report


def load_conversations(
    source: str | os.PathLike | list[str],
    image_root: str | None = None,
    split: str = "train",
    subset: str | None = None,
    on_bad_row: BadRowPolicy = "skip",
    num_proc: int | None = None,
    allow_outside_root: bool = False,
) -> tuple[datasets.Dataset, SkipReport]:
    """
    Generation conversations in the LLaVA / ShareGPT4V form (`image`, `conversations` of `{"from": "human" |
    "gpt", "value": ...}`, `<image>` in the first human turn), single or multi-turn, from a file, a list of files or
    a Hub dataset name.

    Args:
        allow_outside_root: accept image paths that leave `image_root` (see [`load_retrieval_pairs`]).
    Returns:
        The kept rows as `image` (resolved path), `turns` (alternating user / assistant texts, placeholder
        removed) and `source` / `source_row` (the row's file and row there), and the [`SkipReport`].
    """
    parts, report = _read_all(
        source,
        split,
        subset,
        _normalise_conversation,
        _CONVERSATION_COLUMNS,
        _CONVERSATION_FEATURES,
        "generation data",
        image_root,
        on_bad_row,
        num_proc,
        allow_outside_root,
    )
    return datasets.concatenate_datasets([kept for _, kept in parts]), report


def row_origin(rows: dict[str, list], index: int) -> str:
    """Where row `index` of a step's rows comes from: `"<file>, row <n>"` when the reader recorded it."""
    if "source" in rows and "source_row" in rows:
        return f"{rows['source'][index]}, row {rows['source_row'][index]}"
    return f"row {index} of the step"


def _take(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
    return {key: [values[i] for i in indices] for key, values in rows.items()}


def build_step_rows(
    build: Callable[[dict[str, list]], _Built],
    rows: dict[str, list],
    part: str,
    on_bad_row: BadRowPolicy = "skip",
    skipped: Counter | None = None,
    keep_size: bool = False,
) -> _Built:
    """
    `build(rows)` for one step's rows of one part (a dict of columns, as [`MixedStepDataset`] gives them). When it
    fails, each row is built alone to find the rows at fault (a failure no single row causes is re-raised as is).
    With `on_bad_row="raise"`, or when every row fails, the first such row's error is raised, named by its file and
    row. With `"skip"` each is logged by origin, counted in `skipped` (reason `"<part> row the processor cannot
    build"`) and left out, or, with `keep_size`, replaced by a copy of one of the step's good rows: the retrieval
    batch keeps the size the cross-process gather needs, and the copy, masked as a false negative of its original
    by the content keys, only gives that row twice the weight in this step.
    """
    try:
        return build(rows)
    except Exception as error:  # any row-dependent failure of the processor; located below
        size = len(next(iter(rows.values())))
        failures: dict[int, Exception] = {}
        for i in range(size):
            try:
                build(_take(rows, [i]))
            except Exception as row_error:
                failures[i] = row_error
        if not failures:
            raise
        first = min(failures)
        if on_bad_row == "raise" or len(failures) == size:
            every = " (every row of the step fails)" if len(failures) == size else ""
            raise ValueError(
                f"{part} data {row_origin(rows, first)}: the processor cannot build this row{every}: "
                f"{type(failures[first]).__name__}: {failures[first]}"
            ) from error
        good = [i for i in range(size) if i not in failures]
        for i, row_error in failures.items():
            logger.warning(
                "Skipping %s data %s: %s: %s", part, row_origin(rows, i), type(row_error).__name__, row_error
            )
        if skipped is not None:
            skipped[f"{part} row the processor cannot build"] += len(failures)
        if keep_size:  # the j-th bad row is replaced by the (j mod #good)-th good row
            stand_ins = iter(good[j % len(good)] for j in range(len(failures)))
            chosen = [next(stand_ins) if i in failures else i for i in range(size)]
        else:
            chosen = good
        return build(_take(rows, chosen))


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
