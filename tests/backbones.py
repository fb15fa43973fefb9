"""Per-backbone fixtures: a test module that imports them runs every test that uses them on each backbone (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL), since they override the session's Qwen2-VL fixtures of the same names within that module:

    from backbones import any_attention_model, backbone, generation_batch, model, processor  # noqa: F401
"""

from __future__ import annotations

import pytest

from crem_hf.testing import BACKBONES, make_tiny_crem, make_tiny_processor


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request) -> str:
    """The backbone's name (a key of `crem_hf.testing.BACKBONES`)."""
    return request.param


@pytest.fixture(scope="module")
def processor(backbone):
    """The backbone's tiny processor (Qwen3-VL: 16-px patches, its template without a default system turn)."""
    return make_tiny_processor(backbone=backbone)


@pytest.fixture(scope="module")
def model(processor, backbone):
    return make_tiny_crem(processor, seed=0, backbone=backbone)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def any_attention_model(request, processor, backbone):
    return make_tiny_crem(processor, seed=0, backbone=backbone, attn_implementation=request.param)


@pytest.fixture(scope="module")
def generation_batch(processor, images):
    """Two rows with different image sizes and question lengths, so the shorter row is left padded."""
    return processor.process_generation_inputs(
        questions=["What is in the image?", "Which digit is shown? Answer in one word, please, left or right."],
        images=images,
        texts=["a cat", None],
    )
