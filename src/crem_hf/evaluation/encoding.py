"""Batched, length-sorted embedding of (text, image) items through the processor and `get_embedding`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..parallel import gather_rows, is_main_process, share_of_this_process

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
    dim: int | None = None,
) -> torch.Tensor:
    """
    Embed items `(texts[i], images[i])` (either may be None/"") in batches of similar length.

    Under a process group (`torchrun`, `accelerate launch`; see `crem_hf.parallel`) every process must call it with
    the same items: the length-sorted batches are dealt out whole, round robin, and the embeddings gathered, so each
    batch is the one a single process would run and every process returns all the embeddings.

    With `dim`, the Matryoshka embeddings of that size (`get_embedding(dim=...)`; checked before any batch).

    Returns:
        `(num_items, dim or hidden_size)` float32 embeddings on the CPU, in the order of the inputs.
    """
    if len(texts) != len(images):
        raise ValueError(f"Got {len(texts)} texts for {len(images)} images.")
    dim = model.config.check_embedding_dim(dim)
    order = sorted(range(len(texts)), key=lambda i: _cost(texts[i], images[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine = share_of_this_process(len(batches))
    device = next(model.parameters()).device
    indices = [i for b in mine for i in batches[b]]
    rows = torch.empty(len(indices), dim or model.config.text_config.hidden_size)
    done = 0
    show = show_progress and is_main_process()
    for b in tqdm(mine, desc=desc, disable=not show, leave=False):
        index = batches[b]
        batch = processor.process_embedding_inputs(
            images=[images[i] or None for i in index], texts=[texts[i] or None for i in index], instruction=instruction
        )
        rows[done : done + len(index)] = model.get_embedding(**batch.to(device), dim=dim).float().cpu()
        done += len(index)
    return gather_rows(torch.tensor(indices, dtype=torch.long), rows, len(texts))
