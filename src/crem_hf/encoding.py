"""One call from images and texts to embeddings: `encode` (the processor's embedding inputs and `get_embedding`,
batched) and `similarity` (cosine scores of two sets of embeddings).

    from crem_hf import encode, load_crem, similarity

    model, processor = load_crem("path/to/crem")
    images = encode(model, processor, images=["cat.jpg", "dog.png"])
    captions = encode(model, processor, texts=["a cat", "a dog"], instruction="Find an image that matches:")
    scores = similarity(captions, images)  # (2, 2)

`encode` is a function of the model and its processor, not a model method: the model never holds a processor (it is
built from weights alone, and the Hub remote-code files import only torch, transformers and PIL), and batching, the
progress bar and the split across processes belong to this package. It is the one embedding path of `crem-eval`,
the mteb encoder, the demo and the quickstart.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .parallel import gather_rows, is_main_process, share_of_this_process
from .processing_crem import ImageLike

__all__ = ["encode", "similarity"]

# Sort key of an image whose size is not known without downloading or decoding it (a URL, an unreadable file):
# first, so that such images are batched together and a bad one is reported before the rest is encoded.
_UNKNOWN_AREA = -1


def _area(image: ImageLike | None) -> int:
    """Pixels of `image` as cheaply as they can be known (a file's header only); `_UNKNOWN_AREA` otherwise."""
    if image is None:
        return 0
    if isinstance(image, Image.Image):
        return image.width * image.height
    if hasattr(image, "__array_interface__"):
        shape = getattr(image, "shape", ())
        return int(shape[0]) * int(shape[1]) if len(shape) >= 2 else _UNKNOWN_AREA
    if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
        try:
            with Image.open(image) as opened:  # reads the header only
                return opened.width * opened.height
        except (OSError, ValueError, Image.DecompressionBombError):
            return _UNKNOWN_AREA  # the processor names the problem when it loads the image
    return _UNKNOWN_AREA


@torch.inference_mode()
def encode(
    model,
    processor,
    *,
    images: Sequence[ImageLike | None] | None = None,
    texts: Sequence[str | None] | None = None,
    instruction: str | Sequence[str | None] | None = None,
    batch_size: int = 32,
    dim: int | None = None,
    show_progress: bool = True,
    desc: str = "Encoding",
    **processing_kwargs: Any,
) -> torch.Tensor:
    """
    Embed images, texts or (image, text) pairs: `model.get_embedding` of `processor.process_embedding_inputs`, in
    batches of similar length (images by area, then texts by length), returned in the order of the inputs.

    The arguments are those of `process_embedding_inputs`: per-sample lists (a bare string or image is refused),
    `images[i]` and `texts[i]` together make a pair, and either may be `None` in a sample. Every input is checked
    before the first batch, and an error names the input by its index here (`texts[7]`, `images[12]`).

    Under a process group (`torchrun`, `accelerate launch`; see `crem_hf.parallel`) every process must call it with
    the same inputs: the batches are dealt out whole, round robin, and the embeddings gathered, so each batch is the
    one a single process would run and every process returns all the embeddings.

    Args:
        model: a CREM model of any backbone (or a PEFT model around one), on the device it should run on.
        processor: its `CREMProcessor`.
        images: one image (PIL image, path, URL or `(H, W[, C])` uint8 array) or `None` per sample.
        texts: one text or `None` per sample.
        instruction: the embedding instruction, one for all samples or one (or `None`) per sample; an image with
            neither instruction nor text gets the processor's `image_instruction`.
        batch_size: samples per forward.
        dim: a Matryoshka size the model was trained for (`config.matryoshka_dims`); default: the full embedding.
        show_progress: show a progress bar over the batches (on the main process only).
        desc: the progress bar's label.
        **processing_kwargs: per-call processor options (`min_pixels`, `max_pixels`, `max_length`).
    Returns:
        `(num_samples, dim or hidden_size)` float32 embeddings on the CPU (unit vectors when
        `config.normalize_embeddings`, the default).
    Raises:
        TypeError: a bare string or image where a per-sample list is expected, a text or image of the wrong type.
        ValueError: a bad `dim` or `batch_size`, lists of different lengths, an empty text, a sample with nothing
            to embed, or an image that cannot be read.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    dim = model.config.check_embedding_dim(dim)
    samples = processor.embedding_samples(images=images, texts=texts, instruction=instruction)
    width = dim or model.config.text_config.hidden_size
    order = sorted(range(len(samples)), key=lambda i: (_area(samples[i][0]), len(samples[i][1] or "")))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine = share_of_this_process(len(batches))
    device = next(model.parameters()).device
    indices = [i for b in mine for i in batches[b]]
    rows = torch.empty(len(indices), width)
    done = 0
    for b in tqdm(mine, desc=desc, unit="batch", disable=not (show_progress and is_main_process()), leave=False):
        index = batches[b]
        # Loaded here, under their index in `images`, so that a missing or unreadable image is named as given;
        # the processor takes the loaded image as it is.
        loaded = [
            processor.load_image(samples[i][0], f"images[{i}]", processing_kwargs.get("max_pixels"))
            if samples[i][0] is not None
            else None
            for i in index
        ]
        batch = processor.process_embedding_inputs(
            images=loaded,
            texts=[samples[i][1] for i in index],
            instruction=[samples[i][2] for i in index],
            **processing_kwargs,
        )
        rows[done : done + len(index)] = model.get_embedding(**batch.to(device), dim=dim).float().cpu()
        done += len(index)
    return gather_rows(torch.tensor(indices, dtype=torch.long), rows, len(samples))


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """
    Cosine similarity of every embedding in `a` with every embedding in `b`: the dot products of the L2-normalised
    rows, in float32.

    Args:
        a: `(n, d)` embeddings.
        b: `(m, d)` embeddings of the same size `d`, on the same device.
    Returns:
        `(n, m)` scores in [-1, 1].
    Raises:
        ValueError: `a` or `b` is not 2-D, or their embedding sizes differ.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"similarity needs two (n, d) and (m, d) embedding matrices of one size d, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
