"""Question answering accuracy (exact match after normalisation), natively or from the compressed context."""

from __future__ import annotations

import re
import string
from typing import Any

import torch
from tqdm.auto import tqdm

from ..formats import conversation_messages

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
    Rows `{"image", "question", "answer"}`: greedy answers, scored by exact match after `normalize_answer`.

    Args:
        compress: answer from the compressed context (the chorus tokens alone).
        chorus: use the CREM prompt (chorus block present, the paper's native mode); `False` gives the plain Qwen2-VL
            chat prompt (native only).
    Returns:
        `accuracy`, `num_rows` and the `predictions`.
    """
    if compress and not chorus:
        raise ValueError("Compressed generation needs the chorus block (chorus=True).")
    device = next(model.parameters()).device
    predictions = []
    for start in tqdm(range(0, len(rows), batch_size), desc="compressed QA" if compress else "native QA", leave=False):
        chunk = rows[start : start + batch_size]
        conversations = [conversation_messages(r["image"], [r["question"]]) for r in chunk]
        batch = processor.process_chat(conversations=conversations, compress_layout=chorus).to(device)
        mode = {"compress": True} if compress else {}  # native: any Qwen2-VL model works
        out = model.generate(**batch, **mode, max_new_tokens=max_new_tokens, do_sample=False)
        predictions += processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = [normalize_answer(p) == normalize_answer(r["answer"]) for p, r in zip(predictions, rows, strict=True)]
    return {"accuracy": sum(correct) / max(len(rows), 1), "num_rows": len(rows), "predictions": predictions}
