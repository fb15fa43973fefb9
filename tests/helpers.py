"""Test helpers that import neither crem_hf nor pytest, so the remote-code subprocess can use them too."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def random_image(height: int, width: int, seed: int) -> Image.Image:
    """A reproducible RGB noise image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def outputs_of(model, processor) -> dict[str, list]:
    """Embeddings, native and compressed greedy generations of a fixed two-row batch (as plain lists)."""
    images = [random_image(56, 84, 1), random_image(112, 112, 2)]
    embedding_inputs = processor.process_embedding_inputs(images=images, texts=["a cat", None])
    generation_inputs = processor.process_generation_inputs(questions=["What is it?", "Which one?"], images=images)
    with torch.no_grad():
        return {
            "embeddings": model.get_embedding(**embedding_inputs).tolist(),
            "native": model.generate(**generation_inputs, max_new_tokens=5, do_sample=False).tolist(),
            "compressed": model.generate(
                **generation_inputs, compress=True, max_new_tokens=5, do_sample=False
            ).tolist(),
        }
