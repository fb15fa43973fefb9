"""What differs per backbone: Qwen3-VL's DeepStack features in the compressed forward (a test that fails when they
are dropped), its 16-px processor and template without a default system turn, chorus ids never image tokens, the
configs and Auto classes of each backbone (in process and as remote code without crem_hf), and the refusals
(non-full-attention decoders, Qwen3-VL-MoE, another backbone's model or folder). The shared oracles (dense
compression mask, plain backbone) run on every backbone in test_compression, test_modeling and test_api_parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import backbones
import pytest
import torch
from helpers import assert_outputs_match, dense_oracle_states, outputs_of, random_image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen3VLConfig,
)

from crem_hf import (
    CREMConfig,
    CREMForEmbeddingAndGeneration,
    CREMProcessor,
    CREMQwen2_5_VLConfig,
    CREMQwen2_5_VLForEmbeddingAndGeneration,
    CREMQwen3VLConfig,
    CREMQwen3VLForEmbeddingAndGeneration,
)
from crem_hf import testing as crem_testing
from crem_hf.testing import (
    BACKBONES,
    backbone_files,
    make_tiny_crem,
    make_tiny_processor,
    make_tiny_qwen2vl,
    published_config,
    tiny_backbone_config,
)

# The per-backbone fixtures (they override the session's Qwen2-VL ones here): each test runs on every backbone.
backbone = backbones.backbone
processor = backbones.processor
model = backbones.model

CLASSES = {
    "qwen2_vl": (CREMConfig, CREMForEmbeddingAndGeneration, "crem"),
    "qwen2_5_vl": (CREMQwen2_5_VLConfig, CREMQwen2_5_VLForEmbeddingAndGeneration, "crem_qwen2_5_vl"),
    "qwen3_vl": (CREMQwen3VLConfig, CREMQwen3VLForEmbeddingAndGeneration, "crem_qwen3_vl"),
}


@pytest.fixture(scope="module")
def qwen3():
    processor = make_tiny_processor(backbone="qwen3_vl")
    return make_tiny_crem(processor, seed=0, backbone="qwen3_vl").eval(), processor


def chat_batch(processor) -> dict:
    """Three labelled rows of different lengths (re-packing needed), images of three sizes."""
    images = [random_image(32, 64, 0), random_image(64, 96, 1), random_image(96, 96, 2)]
    return dict(
        processor.process_generation_inputs(
            questions=["What is it?", "Which digit is shown? Answer in one word, please.", "Why?"],
            images=images,
            texts=["a cat", None, "a long description of a very small picture"],
            answers=["a cat", "seven", "because"],
        )
    )


# ---------------------------------------------------------------- Qwen3-VL: DeepStack


def test_deepstack_features_reach_the_image_positions_in_the_compressed_forward(qwen3, monkeypatch):
    """
    The compressed forward equals the dense-mask oracle (a plain Qwen3-VL forward, DeepStack included) only with the
    DeepStack features: with them dropped from the two-phase run the logits are far off, so the oracle test would fail.
    """
    model, processor = qwen3
    batch = chat_batch(processor)
    compress = torch.tensor([True, False, True])
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs.get("inputs_embeds"), kwargs.get("visual_pos_masks"))),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            ours = model(**batch, compress=compress).logits
            reference = model.lm_head(dense_oracle_states(model, batch, compress))
    finally:
        hook.remove()
    real = batch["attention_mask"].bool()
    assert (ours - reference)[real].abs().max() <= 1e-4
    # Phase 1 (the heads, re-packed) got every image position, and only image positions: never a chorus slot.
    phase_1 = calls[0][1]
    assert phase_1 is not None and int(phase_1.sum()) == int((batch["input_ids"] == model.config.image_token_id).sum())
    assert phase_1.shape[1] < batch["input_ids"].shape[1], "the heads run re-packed, apart from the tails"

    monkeypatch.setattr(type(model), "_deepstack_slots", lambda self, *args: None)
    with torch.no_grad():
        dropped = model(**batch, compress=compress).logits
    assert (dropped - reference)[real].abs().max() > 1e-2


def test_deepstack_follows_the_slots_when_the_prefill_runs_in_chunks(qwen3):
    """Chunked prefill (each chunk adds only its own slots' DeepStack features) gives the one-pass result."""
    model, processor = qwen3
    batch = dict(
        processor.process_generation_inputs(
            questions=["What is it?", "Which digit is shown? Answer in one word, please."],
            images=[random_image(64, 96, 1), random_image(96, 128, 2)],
        )
    )
    whole = model.generate(**batch, compress=True, max_new_tokens=4, do_sample=False)
    model.prefill_chunk_size = 5  # cuts through the image tokens
    try:
        chunked = model.generate(**batch, compress=True, max_new_tokens=4, do_sample=False)
    finally:
        del model.prefill_chunk_size
    assert torch.equal(whole, chunked)


def test_qwen3_vl_positions_are_interleaved_mrope_from_its_own_rope_index(qwen3):
    model, processor = qwen3
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True
    batch = processor.process_embedding_inputs(images=[random_image(64, 96, 1)])
    positions = model.compute_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    expected, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    assert torch.equal(positions, expected)
    image = batch["input_ids"][0] == model.config.image_token_id
    assert len(set(positions[1, 0, image].tolist())) == 2 and len(set(positions[2, 0, image].tolist())) == 3


# ---------------------------------------------------------------- Qwen3-VL: processor and template


def test_qwen3_vl_processor_has_16px_patches_and_32px_tokens(qwen3):
    _, processor = qwen3
    batch = processor.process_embedding_inputs(images=[random_image(64, 96, 1)])
    assert processor.image_token_side == 32
    assert batch["pixel_values"].shape == (24, 3 * 2 * 16 * 16)  # 4 x 6 patches of 16 px, 2 frames
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 6  # (64 / 32) x (96 / 32)


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_qwen3_vl_template_and_the_kept_prefix(qwen3, system):
    """No system turn unless one is given; the kept prefix is whatever precedes the user turn, plus its header."""
    model, processor = qwen3
    processor.system_prompt = system
    try:
        batch = processor.process_generation_inputs(questions=["What is it?"], images=[random_image(64, 96, 1)])
    finally:
        processor.system_prompt = None
    ids = batch["input_ids"][0]
    text = processor.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief." if system else "<|im_start|>user\n")
    layout = model.chorus_layout(batch["input_ids"], batch["attention_mask"])
    prefix = processor.tokenizer.decode(ids[: int(layout.span_start[0])])
    assert prefix == ("<|im_start|>system\nBe brief.<|im_end|>\n" if system else "") + "<|im_start|>user\n"
    context = model.compress(**processor.process_embedding_inputs(images=[random_image(64, 96, 1)]))
    kept = processor.tokenizer.decode(context.input_ids[0][context.attention_mask[0].bool()])
    assert kept == "<|im_start|>user\n" + "".join(processor.chorus_tokens)


# ---------------------------------------------------------------- chorus ids are never image tokens


def test_chorus_ids_are_never_image_or_vision_ids(backbone):
    config_class = CLASSES[backbone][0]
    with pytest.raises(ValueError, match="image/video/vision token ids"):
        config_class(num_chorus_tokens=2, chorus_token_ids=[5, 151655])


# ---------------------------------------------------------------- configs, Auto classes, remote code


def test_each_backbone_has_its_config_and_auto_classes(model, processor, backbone, tmp_path):
    config_class, model_class, model_type = CLASSES[backbone]
    assert type(model) is model_class and isinstance(model, BACKBONES[backbone][1])
    assert type(model.config) is config_class and model.config.model_type == model_type
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == model_type
    assert saved["auto_map"]["AutoModel"] == f"modeling_crem.{model_class.__name__}"
    assert saved["auto_map"]["AutoConfig"] == f"configuration_crem.{config_class.__name__}"
    assert type(AutoConfig.from_pretrained(tmp_path)) is config_class
    for auto in (AutoModel, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is model_class
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_processor) is CREMProcessor
    assert loaded_processor.image_token_side == processor.image_token_side
    assert_outputs_match(outputs_of(loaded, loaded_processor), outputs_of(model, processor))


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["crem_hf"] = None  # the package is not importable: only the folder's code may run
    sys.path.insert(0, sys.argv[2])
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    from helpers import outputs_of
    folder, config_name, model_name = sys.argv[1], sys.argv[3], sys.argv[4]
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == config_name
    image_text = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__name__ == type(image_text).__name__ == model_name
    names = [type(model).__module__, type(image_text).__module__, type(processor).__module__]
    assert all(name.startswith("transformers_modules.") for name in names), names
    print(json.dumps(outputs_of(model, processor)))
    """
)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_remote_code_of_each_new_backbone_loads_without_crem_hf(name, tmp_path):
    processor = make_tiny_processor(backbone=name)
    model = make_tiny_crem(processor, seed=0, backbone=name)
    config_class, model_class, _ = CLASSES[name]
    folder = tmp_path / name
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert {"configuration_crem.py", "modeling_crem.py", "processing_crem.py"} <= set(os.listdir(folder))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    arguments = [str(folder), os.path.dirname(__file__), config_class.__name__, model_class.__name__]
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, *arguments], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert_outputs_match(remote, outputs_of(model, processor), logits_atol=1e-4)


# ---------------------------------------------------------------- refused clearly


@pytest.mark.parametrize("kind", ["sliding_attention", "linear_attention"])
def test_a_decoder_that_is_not_all_full_attention_is_refused_at_construction(backbone, processor, kind):
    base = make_tiny_qwen2vl(processor.tokenizer, seed=0, backbone=backbone, vocab_size=min(processor.chorus_token_ids))
    base.config.text_config.layer_types = ["full_attention", kind]
    with pytest.raises(ValueError, match=f"'{kind}' layers \\(layers \\[1\\]\\)"):
        CLASSES[backbone][1].from_backbone(base, processor)
    values = {k: v for k, v in base.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = CLASSES[backbone][0](**{**values, **processor.model_config_updates()})
    config.text_config.layer_types = [kind, kind]
    with pytest.raises(ValueError, match=f"'{kind}' layers"):
        CLASSES[backbone][1](config)


def test_qwen3_vl_moe_and_other_backbones_are_refused_by_name(processor, backbone, tmp_path):
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    with pytest.raises(ValueError, match="'qwen3_vl_moe' checkpoint.*Qwen3-VL-MoE is not supported"):
        CREMQwen3VLForEmbeddingAndGeneration.from_qwen3_vl(moe, processor)
    other = next(name for name in BACKBONES if name != backbone)
    base = make_tiny_qwen2vl(processor.tokenizer, seed=0, backbone=other)
    with pytest.raises(ValueError, match=f"takes a {BACKBONES[backbone][1].__name__}"):
        CLASSES[backbone][1].from_backbone(base, processor)


def test_another_backbones_crem_folder_is_refused_by_name(model, backbone, tmp_path):
    model.save_pretrained(tmp_path)
    other = next(name for name in BACKBONES if name != backbone)
    with pytest.raises(ValueError, match=f"'{CLASSES[backbone][2]}' checkpoint, another backbone's CREM folder"):
        CLASSES[other][1].from_pretrained(tmp_path)


def test_tiny_configs_keep_the_real_structure():
    """The tiny builders keep what the real configs' code paths depend on (not their sizes)."""
    tokenizer = make_tiny_processor().tokenizer
    qwen3 = tiny_backbone_config("qwen3_vl", tokenizer)
    assert isinstance(qwen3, Qwen3VLConfig) and qwen3.vision_config.patch_size == 16
    assert qwen3.vision_config.deepstack_visual_indexes and qwen3.text_config.head_dim
    assert sum(qwen3.text_config.rope_parameters["mrope_section"]) == qwen3.text_config.head_dim // 2
    qwen25 = tiny_backbone_config("qwen2_5_vl", tokenizer)
    assert qwen25.vision_config.fullatt_block_indexes and qwen25.vision_config.window_size == 112


# What the tiny config of each backbone changes in its published config (nested keys joined by dots): the sizes, the
# block indexes within the tiny depths, the tokenizer-bound ids and the dtype (float32 tiny models); nothing else.
_SIZES = {
    "text_config.vocab_size",
    "text_config.hidden_size",
    "text_config.intermediate_size",
    "text_config.num_hidden_layers",
    "text_config.num_attention_heads",
    "text_config.rope_parameters.mrope_section",
    "vision_config.depth",
    "vision_config.hidden_size",
    "vision_config.intermediate_size",
    "vision_config.num_heads",
    "vision_config.out_hidden_size",
}
_IDS = {
    "text_config.bos_token_id",
    "text_config.eos_token_id",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
}
TINY_CHANGES = {
    "qwen2_5_vl": _SIZES
    | _IDS
    | {"text_config.layer_types", "vision_config.fullatt_block_indexes", "vision_token_id"}
    | {"dtype", "text_config.dtype"},
    # Qwen3-VL-2B has 8 KV heads (the tiny config 2; Qwen2.5-VL-3B's 2 stay 2) and an explicit head width.
    "qwen3_vl": _SIZES
    | _IDS
    | {"text_config.num_key_value_heads", "text_config.head_dim", "vision_config.deepstack_visual_indexes"}
    | {"text_config.dtype"},
}
PUBLISHED = {"qwen2_5_vl": ("qwen2.5-vl-3b", Qwen2_5_VLConfig), "qwen3_vl": ("qwen3-vl-2b", Qwen3VLConfig)}


def _flat(values: dict, prefix: str = "") -> dict:
    """A config dict with its nested dicts (text/vision configs, rope parameters) flattened to dotted keys."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("text_config", "vision_config", "rope_parameters"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("name", [name for name, _ in PUBLISHED.values()])
def test_package_copies_of_the_published_configs_are_the_fixtures(name):
    """The tiny configs are built from the package's copies: they must be the fixtures' real files, byte for byte."""
    fixture = os.path.join(backbone_files(name), "config.json")
    with open(fixture, "rb") as handle:
        real = handle.read()
    copy = os.path.join(os.path.dirname(crem_testing.__file__), "backbone_configs", f"{name}.json")
    with open(copy, "rb") as handle:
        assert handle.read() == real
    assert published_config(name) == json.loads(real)
    with pytest.raises(ValueError, match="No published config named 'qwen9-vl'.*qwen2.5-vl-3b"):
        published_config("qwen9-vl")


@pytest.mark.parametrize("backbone", list(PUBLISHED))
def test_tiny_configs_differ_from_the_published_ones_only_in_sizes_and_ids(backbone):
    name, config_class = PUBLISHED[backbone]
    tokenizer = make_tiny_processor().tokenizer
    tiny = _flat(tiny_backbone_config(backbone, tokenizer).to_dict())
    real = _flat(config_class.from_dict(published_config(name)).to_dict())
    assert set(tiny) == set(real)
    assert {key for key in real if tiny[key] != real[key]} == TINY_CHANGES[backbone]
    # Each id names the same token in the tiny tokenizer as in the real one (from the fixture's files).
    real_tokenizer = AutoTokenizer.from_pretrained(backbone_files(name), local_files_only=True)
    for key in TINY_CHANGES[backbone] & (_IDS | {"vision_token_id"}):
        assert tokenizer.convert_ids_to_tokens(tiny[key]) == real_tokenizer.convert_ids_to_tokens(real[key]), key
    assert tiny["text_config.pad_token_id"] is real["text_config.pad_token_id"] is None
    # The sizes keep the published proportions and stay within the tiny depths.
    text_width = tiny["text_config.hidden_size"] // tiny["text_config.num_attention_heads"]
    sections = tiny["text_config.rope_parameters.mrope_section"]
    real_sections = real["text_config.rope_parameters.mrope_section"]
    assert sum(sections) == text_width // 2 and len(sections) == len(real_sections) == 3 and min(sections) > 0
    scale = sum(sections) / sum(real_sections)
    assert all(abs(s - r * scale) < 2 for s, r in zip(sections, real_sections, strict=True)), (sections, real_sections)
    depth = tiny["vision_config.depth"]
    blocks = tiny.get("vision_config.fullatt_block_indexes", tiny.get("vision_config.deepstack_visual_indexes"))
    assert blocks and max(blocks) < depth
    if "text_config.layer_types" in tiny:
        assert tiny["text_config.layer_types"] == ["full_attention"] * tiny["text_config.num_hidden_layers"]
    # A model of it is float32 throughout (a published bfloat16 dtype would build the language model in bf16).
    model = make_tiny_qwen2vl(tokenizer, backbone=backbone)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---------------------------------------------------------------- the tiny test models answer what they are asked


def test_the_tiny_models_greedy_answers_follow_the_image_and_the_question(model, processor):
    """
    The per-backbone test model's greedy answers to two images x two questions, natively and compressed, take at
    least three values: then some question is answered differently on the two images, and some image differently to
    the two questions, so tests comparing answers compare something. Built at the published initialisation, the
    tied-head tiny Qwen2.5-VL and Qwen3-VL answered every input with the same repeated token (see
    `crem_hf.testing.TIED_HEAD_INITIALIZER_RANGE`).
    """
    images = [random_image(56, 84, 11), random_image(84, 56, 12)] * 2
    questions = ["What is in the image?"] * 2 + ["Which digit is shown? Answer in one word."] * 2
    batch = processor.process_generation_inputs(questions=questions, images=images)
    for compress in (False, True):
        with torch.no_grad():
            out = model.generate(**batch, compress=compress, max_new_tokens=6, do_sample=False)
        answers = {tuple(row) for row in out[:, batch["input_ids"].shape[1] :].tolist()}
        assert len(answers) >= 3, (compress, processor.batch_decode(sorted(answers)))
