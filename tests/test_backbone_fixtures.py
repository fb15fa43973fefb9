"""
The real Qwen2.5-VL-3B-Instruct / Qwen3-VL-2B-Instruct files without weights (tests/fixtures) and the test-bed
checkpoints written from them: the files are the published ones (ids, sizes, architecture), the test beds are laid out
as published, and plain transformers loads and runs them with nothing missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from crem_hf.testing import (
    QWEN3VL_WEIGHTS_FILE,
    backbone_files,
    load_backbone_processor,
    qwen3vl_published_keys,
    write_tiny_qwen2_5vl_checkpoint,
    write_tiny_qwen3vl_checkpoint,
)

QWEN25, QWEN3 = "qwen2.5-vl-3b", "qwen3-vl-2b"
# Special tokens and their ids in the real vocabularies (shared by both; Qwen3 adds <think> and </think>).
SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "<|file_sep|>": 151664,
}
CLASSES = {QWEN25: Qwen2_5_VLForConditionalGeneration, QWEN3: Qwen3VLForConditionalGeneration}
WRITERS = {QWEN25: write_tiny_qwen2_5vl_checkpoint, QWEN3: write_tiny_qwen3vl_checkpoint}


def _json(name: str, file: str) -> dict:
    return json.loads((Path(backbone_files(name)) / file).read_text(encoding="utf-8"))


def _meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The state dict (meta tensors) of the transformers class built from the fixture's real config."""
    config_class = Qwen2_5_VLConfig if name == QWEN25 else Qwen3VLConfig
    with torch.device("meta"):
        model = CLASSES[name](config_class.from_pretrained(backbone_files(name)))
    return model.state_dict()


def _stored_keys(folder: Path) -> dict[str, str]:
    """Every tensor name in the folder's safetensors files -> its file."""
    keys = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            keys.update(dict.fromkeys(handle.keys(), shard.name))
    return keys


@pytest.fixture(scope="module", params=[QWEN25, QWEN3])
def test_bed(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, Path(WRITERS[name](tmp_path_factory.mktemp(name) / "checkpoint"))


# --- the fixtures are the real files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ids", [(QWEN25, 151665), (QWEN3, 151669)])
def test_real_tokenizer_ids(name, ids):
    tokenizer = AutoTokenizer.from_pretrained(backbone_files(name), local_files_only=True)
    assert len(tokenizer) == ids
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert think == (151667 if name == QWEN3 else None)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # byte-level BPE over the real 151,643-token vocabulary and 151,387 merges
    assert len(json.loads((Path(backbone_files(name)) / "vocab.json").read_text(encoding="utf-8"))) == 151643
    merges = (Path(backbone_files(name)) / "merges.txt").read_bytes()
    assert b"\r" not in merges and merges.count(b"\n") == 151388  # header line + merges
    assert tokenizer("Hello world").input_ids == [9707, 1879]


def test_qwen2_5vl_config_and_index():
    config = _json(QWEN25, "config.json")
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (config["vocab_size"], config["num_hidden_layers"], config["hidden_size"]) == (151936, 36, 2048)
    assert config["vision_config"]["fullatt_block_indexes"] == [7, 15, 23, 31]
    assert config["vision_config"]["patch_size"] == 14 and config["tie_word_embeddings"] is True
    assert {k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id")} == {
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
    }
    index = _json(QWEN25, "model.safetensors.index.json")
    weight_map = index["weight_map"]
    assert len(weight_map) == 824 and set(weight_map.values()) == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    # old layout, tied head not stored
    assert "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in weight_map
    assert "visual.merger.mlp.0.weight" in weight_map
    # the index's total is exactly the bf16 size of the architecture built from the config (without the tied head)
    state = _meta_state_dict(QWEN25)
    assert index["metadata"]["total_size"] == 2 * sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
    assert index["metadata"]["total_size"] == 7509245952


def test_qwen3vl_config_and_keys():
    config = _json(QWEN3, "config.json")
    assert config["model_type"] == "qwen3_vl" and config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    assert (text["vocab_size"], text["num_hidden_layers"], text["hidden_size"], text["head_dim"]) == (
        151936,
        28,
        2048,
        128,
    )
    assert text["rope_scaling"]["mrope_interleaved"] is True and sum(text["rope_scaling"]["mrope_section"]) == 64
    assert vision["deepstack_visual_indexes"] == [5, 11, 17] and vision["patch_size"] == 16
    assert vision["spatial_merge_size"] == 2 and vision["out_hidden_size"] == text["hidden_size"]
    for file in ("preprocessor_config.json", "video_preprocessor_config.json"):
        processor = _json(QWEN3, file)
        assert (processor["patch_size"], processor["merge_size"], processor["processor_class"]) == (
            16,
            2,
            "Qwen3VLProcessor",
        )
    keys = qwen3vl_published_keys()
    assert len(keys) == 625 == len(set(keys)) and "lm_head.weight" not in keys
    assert "model.visual.deepstack_merger_list.2.linear_fc2.bias" in keys
    assert "model.language_model.embed_tokens.weight" in keys and "model.visual.pos_embed.weight" in keys
    state = _meta_state_dict(QWEN3)
    assert set(keys) == set(state) - {"lm_head.weight"}
    # 2,127,532,032 bf16 parameters: the published single model.safetensors is 4.26 GB
    assert 2 * sum(state[k].numel() for k in keys) == 4255064064


@pytest.mark.parametrize("name", [QWEN25, QWEN3])
def test_chat_templates(name):
    processor = load_backbone_processor(backbone_files(name))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    body = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    # Qwen2.5-VL adds a default system turn; Qwen3-VL puts nothing before the user turn header
    prefix = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if name == QWEN25 else ""
    assert text == prefix + body
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    rendered = processor.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n" + body


# --- the test beds ---------------------------------------------------------------------------------------------------


def test_test_bed_keys_are_the_published_ones(test_bed):
    name, folder = test_bed
    stored = _stored_keys(folder)
    if name == QWEN25:
        published = _json(QWEN25, "model.safetensors.index.json")["weight_map"]
        assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] == published
    else:
        published = dict.fromkeys(qwen3vl_published_keys(), QWEN3VL_WEIGHTS_FILE)
        assert not (folder / "model.safetensors.index.json").exists()
    assert stored == published  # same names, each in its published file
    with safe_open(next(folder.glob("*.safetensors")), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    assert (folder / "chat_template.json").is_file() and (folder / "preprocessor_config.json").is_file()


def test_test_bed_loads_into_plain_transformers(test_bed):
    name, folder = test_bed
    model, info = CLASSES[name].from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    assert model.config.text_config.vocab_size == 151936 and model.config.image_token_id == 151655
    # the stored values arrived, under the renamed names too (the embedding is also the tied head)
    stored = {}
    for shard in folder.glob("*.safetensors"):
        stored.update(load_file(shard))
    prefix = "model." if name == QWEN25 else "model.language_model."
    embed = stored[prefix + "embed_tokens.weight"]
    assert torch.equal(model.model.language_model.embed_tokens.weight, embed)
    assert torch.equal(model.lm_head.weight, embed)
    visual = (
        "visual.blocks.31.attn.qkv.weight" if name == QWEN25 else "model.visual.deepstack_merger_list.0.norm.weight"
    )
    loaded = model.state_dict()["model." + visual if name == QWEN25 else visual]
    assert torch.equal(loaded, stored[visual])
    if name == QWEN3:
        assert len(model.model.visual.deepstack_merger_list) == 3
        assert model.model.visual.deepstack_visual_indexes == [5, 11, 17]


def test_a_missing_key_is_reported(test_bed, tmp_path):
    """Negative control for the loading test: drop one stored tensor and plain transformers reports it missing."""
    name, folder = test_bed
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    shard = sorted(copy.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    dropped = sorted(k for k in tensors if "norm" in k)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    if name == QWEN25:
        index = json.loads((copy / "model.safetensors.index.json").read_text())
        del index["weight_map"][dropped]
        (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    _, info = CLASSES[name].from_pretrained(copy, output_loading_info=True)
    assert len(info["missing_keys"]) == 1 and not info["unexpected_keys"]


def test_test_bed_generates_with_the_real_processor(test_bed):
    name, folder = test_bed
    processor = load_backbone_processor(folder)
    model = CLASSES[name].from_pretrained(folder).eval()
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"][0]
    patch = 16 if name == QWEN3 else 14
    assert inputs["pixel_values"].shape[-1] == 3 * 2 * patch * patch  # channels x temporal patch x patch x patch
    image_tokens = int((inputs["input_ids"] == 151655).sum())
    assert image_tokens == int(grid.prod()) // 4  # one token per 2x2 merged patches
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(
            **inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert int(out.sequences[0, inputs["input_ids"].shape[1]]) == int(logits.argmax())
    # The first step's logits, not only their argmax: the tied random test bed answers any input with one token.
    assert torch.equal(out.logits[0][0], logits)
