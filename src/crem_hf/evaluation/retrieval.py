"""Zero-shot cross-domain retrieval (image-caption sets such as Flickr30K / COCO: Recall@1/5/10 both ways) and
SugarCrepe-style compositional accuracy (the true caption must outscore a perturbed one)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..encoding import encode
from ..formats import OUTSIDE_ROOT, OUTSIDE_ROOT_HINT, image_problem, outside_root, read_rows, resolve_path
from ..instructions import I2T_INSTRUCTION, T2I_INSTRUCTION

__all__ = [
    "evaluate_compositional",
    "evaluate_image_text_retrieval",
    "load_caption_rows",
    "recall_at_k",
]

RECALL_KS = (1, 5, 10)


def load_caption_rows(source: str | os.PathLike, fields: tuple[str, ...], image_root: str | None = None) -> list[dict]:
    """
    Rows of a json/jsonl/parquet file, checked: each needs an existing image and the non-empty `fields`. Under an
    `image_root`, image paths must stay inside it (the MMEB and training readers' check: no absolute path, no ../).
    """
    rows = []
    for i, row in enumerate(read_rows(source)):
        if outside_root(row.get("image"), image_root):
            raise ValueError(f"{source}, row {i}: {OUTSIDE_ROOT} ({row['image']}).{OUTSIDE_ROOT_HINT}")
        image = resolve_path(row.get("image"), image_root)
        problem = image_problem(image) if image else "no image"
        if problem:
            raise ValueError(f"{source}, row {i}: {problem} ({image}).")
        for name in fields:
            value = row.get(name)
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and v.strip() for v in values):
                raise ValueError(f"{source}, row {i}: empty or missing {name!r}.")
        rows.append({**row, "image": image})
    return rows


def recall_at_k(scores: torch.Tensor, relevant: list[set[int]], ks=RECALL_KS) -> dict[int, float]:
    """
    Recall@k for queries scored against candidates: `scores` `(num_queries, num_candidates)`; a query counts when
    one of its `relevant` candidates is among its k best (ties are broken towards lower candidate indices).
    """
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    out = {}
    for k in ks:
        top = ranked[:, :k].tolist()
        out[k] = sum(bool(relevant[q] & set(top[q])) for q in range(len(relevant))) / max(len(relevant), 1)
    return out


def evaluate_image_text_retrieval(
    model, processor, rows: list[dict], batch_size: int = 32, dim: int | None = None
) -> dict[str, float]:
    """
    Rows `{"image": path, "captions": [str, ...]}`. Text-to-image: each caption against all images; image-to-text:
    each image against all captions (any of its own counts). Returns `t2i_R@k` and `i2t_R@k` for k in 1, 5, 10.
    With `dim`, at that Matryoshka embedding size.
    """
    model.config.check_embedding_dim(dim)
    options = {"batch_size": batch_size, "dim": dim}
    captions = [c for row in rows for c in row["captions"]]
    owner = [i for i, row in enumerate(rows) for _ in row["captions"]]
    images = [row["image"] for row in rows]
    caption_queries = encode(
        model, processor, texts=captions, instruction=T2I_INSTRUCTION, desc="t2i queries", **options
    )
    # No instruction: the processor gives an image without one its `image_instruction` (MMEB's for image targets).
    image_targets = encode(model, processor, images=images, desc="t2i images", **options)
    image_queries = encode(model, processor, images=images, instruction=I2T_INSTRUCTION, desc="i2t queries", **options)
    caption_targets = encode(model, processor, texts=captions, desc="i2t captions", **options)
    t2i = recall_at_k(caption_queries @ image_targets.T, [{o} for o in owner])
    own = [{j for j, o in enumerate(owner) if o == i} for i in range(len(rows))]
    i2t = recall_at_k(image_queries @ caption_targets.T, own)
    return {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}


def evaluate_compositional(
    model, processor, rows: list[dict], batch_size: int = 32, dim: int | None = None
) -> dict[str, Any]:
    """
    Rows `{"image", "caption", "negative_caption"}`: the fraction where the caption outscores the negative (with
    `dim`, at that Matryoshka embedding size).
    """
    model.config.check_embedding_dim(dim)
    options = {"batch_size": batch_size, "dim": dim}
    images = [row["image"] for row in rows]
    image_queries = encode(model, processor, images=images, instruction=I2T_INSTRUCTION, desc="images", **options)
    positives = encode(model, processor, texts=[r["caption"] for r in rows], desc="captions", **options)
    negatives = encode(model, processor, texts=[r["negative_caption"] for r in rows], desc="negatives", **options)
    wins = (image_queries * positives).sum(-1) > (image_queries * negatives).sum(-1)
    return {"accuracy": float(wins.float().mean()), "num_rows": len(rows)}
