"""MMEB (v1) evaluation in the TIGER-Lab MMEB-eval form: Precision@1 per subset, meta-task and IND/OOD averages.

Each row holds a query (`qry_text` with its instruction, `<|image_1|>` marking `qry_img_path`) and its own
candidates (`tgt_text` / `tgt_img_path` lists, ground truth at index 0). A query is correct when the ground truth
scores highest; as in the reference evaluation (an `argmax`), a tie with the ground truth counts for the ground
truth, so exact duplicates of it among the candidates do not cost a point.

A local copy of the data is read in the Hub layout (`<folder>/<subset>/test-00000-of-00001.parquet`, as
`huggingface-cli download TIGER-Lab/MMEB-eval` leaves it; the images come in `images.zip`, to unzip into the image
root) or the flat one (`<folder>/<subset>.jsonl`, `.json` or `.parquet`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..encoding import encode
from ..formats import OUTSIDE_ROOT, OUTSIDE_ROOT_HINT, locate_subset, parse_side, read_rows
from ..io import check_writable_folder, format_markdown_table, write_files_atomically

__all__ = [
    "MMEB_DATASETS",
    "MMEB_RESULT_FILES",
    "META_TASKS",
    "MMEBRow",
    "evaluate_mmeb",
    "load_mmeb_subset",
    "markdown_table",
    "precision_at_1",
    "summarize",
]

META_TASKS = ("Classification", "VQA", "Retrieval", "Grounding")
#: What `evaluate_mmeb` writes into its output folder: the results, and the table made from them.
MMEB_RESULT_FILES = ("mmeb_results.json", "mmeb_results.md")

#: The 36 MMEB datasets: meta-task and whether they are out-of-distribution (not in MMEB-train).
MMEB_DATASETS: dict[str, tuple[str, bool]] = {
    **{name: ("Classification", False) for name in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")},
    **{name: ("Classification", True) for name in ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{name: ("VQA", False) for name in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    **{name: ("VQA", True) for name in ("ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{
        name: ("Retrieval", False)
        for name in (
            "VisDial",
            "CIRR",
            "VisualNews_t2i",
            "VisualNews_i2t",
            "MSCOCO_t2i",
            "MSCOCO_i2t",
            "NIGHTS",
            "WebQA",
        )
    },  # fmt: skip
    **{name: ("Retrieval", True) for name in ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    "MSCOCO": ("Grounding", False),
    **{name: ("Grounding", True) for name in ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}


@dataclass
class MMEBRow:
    """One parsed query: its text and image, and its candidates' texts and images (ground truth first)."""

    query_text: str
    query_image: str
    candidate_texts: list[str]
    candidate_images: list[str]


#: The columns of an MMEB-eval row.
MMEB_EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


def _parse_row(row: dict[str, Any], image_root: str | None, where: str, missing_hint: str = "") -> MMEBRow:
    texts, images = row.get("tgt_text"), row.get("tgt_img_path")
    if isinstance(images, list) and texts in (None, ""):
        # Some copies give image-only candidates as one empty tgt_text; VLM2Vec pairs it with every image.
        texts = [""] * len(images)
    elif isinstance(texts, str) and isinstance(images, list):
        raise ValueError(
            f"{where}: tgt_text is one string ({texts[:60]!r}) beside a list of {len(images)} tgt_img_path; expected "
            'a list with one text per candidate (or "" for image-only candidates).'
        )
    if not isinstance(texts, list) or not isinstance(images, list):
        raise ValueError(f"{where}: tgt_text and tgt_img_path must be lists.")
    if not texts:
        raise ValueError(f"{where}: empty candidate list.")
    if len(texts) != len(images):
        raise ValueError(f"{where}: {len(texts)} candidate texts but {len(images)} candidate images.")
    hints = {"missing image": missing_hint, OUTSIDE_ROOT: OUTSIDE_ROOT_HINT}
    query_text, query_image, problem = parse_side(row.get("qry_text"), row.get("qry_img_path"), image_root)
    if problem:
        raise ValueError(f"{where}: query: {problem} ({query_image or query_text!r}).{hints.get(problem, '')}")
    candidate_texts, candidate_images = [], []
    for k, (text, image) in enumerate(zip(texts, images, strict=True)):
        text, image, problem = parse_side(text, image, image_root)
        if problem:
            label = "ground truth (candidate 0)" if k == 0 else f"candidate {k}"
            raise ValueError(f"{where}: {label}: {problem} ({image or text!r}).{hints.get(problem, '')}")
        candidate_texts.append(text)
        candidate_images.append(image)
    return MMEBRow(query_text, query_image, candidate_texts, candidate_images)


def _subset_named_by(path: str) -> str | None:
    """The MMEB subset a file's name says it holds (`ImageNet-1K.jsonl`, `ImageNet-1K/test-....parquet`), if any."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in MMEB_DATASETS:
        return stem
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if stem.startswith("test-") and folder in MMEB_DATASETS else None


def _missing_image_hint(source: str, image_root: str | None) -> str:
    """What to do about a missing image, naming MMEB-eval's `images.zip` when it lies beside the data."""
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    zips = [os.path.normpath(os.path.join(folder, up, "images.zip")) for up in ("", "..")]
    zips = [path for path in zips if os.path.isfile(path)]
    root = f"the image root ({image_root})" if image_root is not None else "no image root (--image-root)"
    if zips:
        return f" MMEB-eval keeps its images in {zips[0]}: unzip it and give that folder as the image root; got {root}."
    return f" Got {root}: it must be the folder the rows' image paths are relative to."


def load_mmeb_subset(source: str | os.PathLike, subset: str, image_root: str | None = None) -> list[MMEBRow]:
    """
    Rows of one subset: from a local folder in the Hub layout (`<source>/<subset>/test-*.parquet`) or the flat one
    (`<source>/<subset>.jsonl`, `.json` or `.parquet`), from one local json/jsonl/parquet file (which holds this
    subset only), or from a Hub dataset (`TIGER-Lab/MMEB-eval`, split `test`; online only).

    Raises:
        ValueError: naming the subset, the file and the row of a missing image, an empty candidate list, a missing
            ground truth or candidate lists of different lengths; naming the file when it lacks a column, or when
            its name says it holds another MMEB subset.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        files = locate_subset(source, subset, "test")
    elif os.path.exists(source):
        named = _subset_named_by(source)
        if named is not None and named != subset:
            raise ValueError(f"{source} holds the {named} subset, not {subset}.")
        files = [source]
    else:
        files = None
    hint = _missing_image_hint(source, image_root) if files is not None else ""
    if files is not None:
        parts = [(path, read_rows(path)) for path in files]
    else:
        parts = [(source, read_rows(source, "test", subset))]
    parsed = []
    for path, rows in parts:
        missing = [column for column in MMEB_EVAL_COLUMNS if column not in rows.column_names]
        if missing:
            raise ValueError(f"Subset {subset}: {path} has no column {missing} (it has {rows.column_names}).")
        for i, row in enumerate(rows):
            try:
                parsed.append(_parse_row(row, image_root, f"Subset {subset}, row {i}", hint))
            except ValueError as error:
                raise ValueError(f"{error} (file: {path})") from None
    return parsed


def precision_at_1(query_embeddings: torch.Tensor, candidate_embeddings: torch.Tensor, candidates: list[list[int]]):
    """
    Fraction of queries whose first candidate (the ground truth) scores highest among their own candidates.

    Args:
        query_embeddings: `(num_queries, dim)`.
        candidate_embeddings: `(num_unique_candidates, dim)`.
        candidates: per query, the indices of its candidates into `candidate_embeddings`, ground truth first.
    Returns:
        `(precision, correct)`: the fraction and a per-query list of booleans.
    """
    correct = []
    for query, index in zip(query_embeddings, candidates, strict=True):
        # Each distinct candidate is scored once and its score shared by its duplicates: a matrix product may sum
        # the rows of a repeated embedding in different orders, which would break an exact tie by rounding.
        unique, inverse = torch.tensor(index).unique(return_inverse=True)
        scores = (candidate_embeddings[unique] @ query)[inverse]
        correct.append(bool(scores.argmax() == 0))  # argmax takes the first maximum: ties go to the ground truth
    return sum(correct) / max(len(correct), 1), correct


def score_subset(
    model, processor, rows: list[MMEBRow], batch_size: int = 32, name: str = "", dim: int | None = None
) -> dict[str, Any]:
    """P@1 of one subset (at the Matryoshka size `dim`, if given); each unique candidate (text, image) is encoded
    once."""
    unique: dict[tuple[str, str], int] = {}
    candidates = []
    for row in rows:
        pairs = zip(row.candidate_texts, row.candidate_images, strict=True)
        candidates.append([unique.setdefault(pair, len(unique)) for pair in pairs])
    items = list(unique)
    # MMEB writes "" for a side's missing text or image.
    candidate_embeddings = encode(
        model,
        processor,
        images=[image or None for _, image in items],
        texts=[text or None for text, _ in items],
        batch_size=batch_size,
        dim=dim,
        desc=f"{name} candidates",
    )
    query_embeddings = encode(
        model,
        processor,
        images=[row.query_image or None for row in rows],
        texts=[row.query_text or None for row in rows],
        batch_size=batch_size,
        dim=dim,
        desc=f"{name} queries",
    )
    precision, _ = precision_at_1(query_embeddings, candidate_embeddings, candidates)
    return {"precision_at_1": precision, "num_queries": len(rows), "num_unique_candidates": len(items)}


def summarize(scores: dict[str, float], registry: dict[str, tuple[str, bool]] | None = None) -> dict[str, float]:
    """
    Averages of per-subset scores: per meta-task, over IND and OOD subsets, and over all (each the plain mean of
    the subsets it covers, as the paper computes them).
    """
    registry = registry if registry is not None else MMEB_DATASETS
    unknown = sorted(set(scores) - set(registry))
    if unknown:
        raise ValueError(f"No meta-task known for subsets {unknown}; pass a registry for them.")

    def mean(names: list[str]) -> float | None:
        return sum(scores[n] for n in names) / len(names) if names else None

    summary = {task: mean([n for n in scores if registry[n][0] == task]) for task in META_TASKS}
    summary["IND"] = mean([n for n in scores if not registry[n][1]])
    summary["OOD"] = mean([n for n in scores if registry[n][1]])
    summary["Overall"] = mean(list(scores))
    return {key: value for key, value in summary.items() if value is not None}


def markdown_table(
    scores: dict[str, float], registry: dict[str, tuple[str, bool]] | None = None, column: str = "CREM"
) -> str:
    """Per-subset scores (x100) grouped by meta-task with their averages, then All / IND / OOD (paper Table 6)."""
    registry = registry if registry is not None else MMEB_DATASETS
    summary = summarize(scores, registry)
    rows = []
    for task in META_TASKS:
        names = [n for n in scores if registry[n][0] == task]
        if not names:
            continue
        rows += [(f"{n}{'°' if registry[n][1] else ''}", f"{100 * scores[n]:.1f}") for n in names]
        rows.append((f"*All {task}*", f"{100 * summary[task]:.1f}"))
    rows.append((f"**All ({len(scores)})**", f"{100 * summary['Overall']:.1f}"))
    rows += [(f"All {key}", f"{100 * summary[key]:.1f}") for key in ("IND", "OOD") if key in summary]
    return format_markdown_table(("Dataset", column), rows)


def evaluate_mmeb(
    model,
    processor,
    source: str | os.PathLike,
    subsets: list[str],
    image_root: str | None = None,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    registry: dict[str, tuple[str, bool]] | None = None,
    dim: int | None = None,
) -> dict[str, Any]:
    """
    Evaluate subsets (at the Matryoshka embedding size `dim`, recorded as `embedding_dim`, if given) and, with
    `output_dir`, write `mmeb_results.json` and `mmeb_results.md`. The output folder is checked first and every
    subset read and checked before any is scored; the two files are written together and atomically at the end
    (`write_files_atomically`), so an interrupted or failed run never overwrites finished results and the table
    never sits beside another run's results.
    """
    registry = registry if registry is not None else MMEB_DATASETS
    unknown = [s for s in subsets if s not in registry]
    if unknown:
        raise ValueError(f"No meta-task known for subsets {unknown}; pass a registry for them.")
    if os.path.isfile(source) and len(subsets) != 1:
        raise ValueError(
            f"{os.fspath(source)} is one file, so it holds one subset, but {len(subsets)} subsets were asked for "
            f"({subsets}); give the folder that holds one file (or Hub-layout folder) per subset."
        )
    if output_dir is not None:
        check_writable_folder(output_dir, MMEB_RESULT_FILES)
    model.config.check_embedding_dim(dim)
    loaded = {subset: load_mmeb_subset(source, subset, image_root) for subset in subsets}
    per_subset = {
        subset: score_subset(model, processor, rows, batch_size, subset, dim) for subset, rows in loaded.items()
    }
    scores = {subset: result["precision_at_1"] for subset, result in per_subset.items()}
    results = {
        "subsets": {s: {**r, "meta_task": registry[s][0], "ood": registry[s][1]} for s, r in per_subset.items()},
        "summary": summarize(scores, registry),
    }
    if dim is not None:
        results["embedding_dim"] = dim
    if output_dir is not None:
        json_path, table_path = (os.path.join(output_dir, name) for name in MMEB_RESULT_FILES)
        # One write for both, so the folder never shows a table beside another run's results.
        table = markdown_table(scores, registry)
        write_files_atomically({json_path: json.dumps(results, indent=2) + "\n", table_path: table})
    return results
