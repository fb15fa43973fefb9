"""Question answering accuracy (exact match after normalisation), natively or from the compressed context."""

from __future__ import annotations

import re
import string
from typing import Any

import torch
from tqdm.auto import tqdm

from ..formats import conversation_messages
from ..parallel import gather_objects, is_main_process, share_of_this_process

__all__ = ["evaluate_generation", "normalize_answer"]

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@torch.inference_mode()
def evaluate_generation(
    model,
    processor,
    rows: list[dict],
    compress: bool,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    chorus: bool = True,
) -> dict[str, Any]:
    """
    Rows `{"image", "question", "answer"}`: greedy answers, scored by exact match after `normalize_answer`. Under a
    process group every process must call it with the same rows: batches are dealt out whole, round robin, and the
    answers gathered (`crem_hf.parallel`), so every process returns the one-process results.

    Args:
        compress: answer from the compressed context (the chorus tokens alone).
        chorus: use the CREM prompt (chorus block present, the paper's native mode); `False` gives the backbone's plain
            chat prompt (native only).
    Returns:
        `accuracy`, `num_rows` and the `predictions`.
    """
    if compress and not chorus:
        raise ValueError("Compressed generation needs the chorus block (chorus=True).")
    device = next(model.parameters()).device
    starts = range(0, len(rows), batch_size)
    mine = share_of_this_process(len(starts))  # whole batches per process: each padded as on one process
    indices, answers = [], []
    desc = "compressed QA" if compress else "native QA"
    for b in tqdm(mine, desc=desc, disable=not is_main_process(), leave=False):
        chunk = rows[starts[b] : starts[b] + batch_size]
        conversations = [conversation_messages(r["image"], [r["question"]]) for r in chunk]
        batch = processor.process_chat(conversations=conversations, compress_layout=chorus).to(device)
        mode = {"compress": True} if compress else {}  # native: a plain backbone model works too
        out = model.generate(**batch, **mode, max_new_tokens=max_new_tokens, do_sample=False)
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        indices += range(starts[b], starts[b] + len(chunk))
    predictions = gather_objects(indices, answers, len(rows))
    correct = [normalize_answer(p) == normalize_answer(r["answer"]) for p, r in zip(predictions, rows, strict=True)]
    return {"accuracy": sum(correct) / max(len(rows), 1), "num_rows": len(rows), "predictions": predictions}
