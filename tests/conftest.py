"""Shared offline fixtures: the tiny processor, tiny CREM models (sdpa and eager) and synthetic images."""

from __future__ import annotations

import pytest
import torch
from helpers import random_image

from crem_hf.testing import make_tiny_crem, make_tiny_processor

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def processor():
    return make_tiny_processor()


@pytest.fixture(scope="session")
def model(processor):
    return make_tiny_crem(processor, seed=0)


@pytest.fixture(scope="session", params=["sdpa", "eager"])
def any_attention_model(request, processor):
    return make_tiny_crem(processor, seed=0, attn_implementation=request.param)


@pytest.fixture(scope="session")
def images():
    """Two images of different sizes: 6 and 16 merged image tokens."""
    return [random_image(56, 84, seed=1), random_image(112, 112, seed=2)]


@pytest.fixture(scope="session")
def generation_batch(processor, images):
    """Two rows with different image sizes and question lengths, so the shorter row is left padded."""
    return processor.process_generation_inputs(
        questions=["What is in the image?", "Which digit is shown? Answer in one word, please, left or right."],
        images=images,
        texts=["a cat", None],
    )
