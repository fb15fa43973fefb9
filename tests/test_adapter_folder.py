"""`CREMForEmbeddingAndGeneration.from_pretrained` on a LoRA adapter folder (adapter_config.json, no config.json, as
`examples/train_lora.py` writes it) names the folder and points to `crem_hf.load_crem`, which does load it; on every
backbone (the adapter on the real layouts: tests/test_loading.py)."""

from __future__ import annotations

import os

import backbones
import pytest
import torch
from peft import LoraConfig, get_peft_model

from crem_hf import CREMForEmbeddingAndGeneration, load_crem
from crem_hf.testing import BACKBONES

# The per-backbone fixtures (they override the session's Qwen2-VL ones here): each test runs on every backbone.
backbone = backbones.backbone
model = backbones.model
processor = backbones.processor


@pytest.fixture(scope="module")
def adapter_folder(model, processor, backbone, tmp_path_factory):
    """A real peft adapter on a saved tiny CREM base, with its processor beside it (train_lora.py's layout)."""
    root = tmp_path_factory.mktemp("adapter")
    base = root / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    peft_model = get_peft_model(
        BACKBONES[backbone][2].from_pretrained(base),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    folder = root / "adapter"
    peft_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert os.path.isfile(folder / "adapter_config.json") and not os.path.exists(folder / "config.json")
    return folder, peft_model


def test_from_pretrained_on_an_adapter_folder_points_to_load_crem(adapter_folder, backbone):
    folder, _ = adapter_folder
    with pytest.raises(ValueError) as caught:
        BACKBONES[backbone][2].from_pretrained(folder)
    message = str(caught.value)
    assert str(folder) in message and "LoRA adapter" in message and "crem_hf.load_crem(path)" in message
    assert "config.json" in message


def test_load_crem_loads_what_the_message_points_to(adapter_folder, processor):
    folder, peft_model = adapter_folder
    loaded, _ = load_crem(folder)
    assert type(loaded) is type(peft_model.get_base_model())
    inputs = processor.process_embedding_inputs(texts=["a red square"])
    with torch.no_grad():
        assert torch.allclose(loaded.get_embedding(**inputs), peft_model.get_embedding(**inputs), atol=1e-5)


def test_a_folder_with_neither_config_says_it_has_no_config_json(tmp_path):
    with pytest.raises(ValueError, match=f"^{tmp_path} has no config.json; expected a CREM folder"):
        CREMForEmbeddingAndGeneration.from_pretrained(tmp_path)
