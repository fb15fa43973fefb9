"""Batched, length-sorted embedding of (text, image) items through the processor and `get_embedding`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["encode_items"]


def _cost(text: str | None, image: str | Image.Image | None) -> tuple[int, int]:
    """Sort key: image area first (it dominates the sequence length), then text length."""
    if image is None or image == "":
        area = 0
    elif isinstance(image, Image.Image):
        area = image.width * image.height
    else:
        with Image.open(image) as opened:  # reads the header only
            area = opened.width * opened.height
    return area, len(text or "")


@torch.inference_mode()
def encode_items(
    model,
    processor,
    texts: Sequence[str | None],
    images: Sequence[str | Image.Image | None],
    instruction: str | None = None,
    batch_size: int = 32,
    desc: str = "Encoding",
    show_progress: bool = True,
) -> torch.Tensor:
    """
    Embed items `(texts[i], images[i])` (either may be None/"") in batches of similar length.

    Returns:
        `(num_items, hidden_size)` float32 embeddings on the CPU, in the order of the inputs.
    """
    if len(texts) != len(images):
        raise ValueError(f"Got {len(texts)} texts for {len(images)} images.")
    order = sorted(range(len(texts)), key=lambda i: _cost(texts[i], images[i]))
    device = next(model.parameters()).device
    out = torch.empty(len(texts), model.config.text_config.hidden_size)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        index = order[start : start + batch_size]
        batch = processor.process_embedding_inputs(
            images=[images[i] or None for i in index], texts=[texts[i] or None for i in index], instruction=instruction
        )
        out[index] = model.get_embedding(**batch.to(device)).float().cpu()
    return out
