"""Testing utilities: offline builders of a tiny Qwen2-VL-compatible tokenizer, processor and model (CREM and plain
Qwen2-VL), and a test-bed checkpoint with the real Qwen2-VL-2B files.

Tests, the demo, the quickstart and the benchmarks use these: nothing here touches the network. The same code paths
run real checkpoints; only the sizes differ.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from .instructions import CLASSIFY_INSTRUCTION, T2I_INSTRUCTION, VQA_INSTRUCTION
from .loading import Qwen2VLImageOnlyProcessor, load_backbone_processor
from .modeling_crem import (
    CREMForEmbeddingAndGeneration,
    CREMMixin,
    CREMQwen2_5_VLForEmbeddingAndGeneration,
    CREMQwen3VLForEmbeddingAndGeneration,
)
from .processing_crem import DEFAULT_IMAGE_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, CREMProcessor

__all__ = [
    "BACKBONES",
    "QWEN2VL_CHAT_TEMPLATE",
    "QWEN3VL_CHAT_TEMPLATE",
    "QWEN2VL_SPECIAL_TOKENS",
    "TIED_HEAD_INITIALIZER_RANGE",
    "Qwen2VLImageOnlyProcessor",
    "backbone_files",
    "load_backbone_processor",
    "make_qwen2vl_tokenizer",
    "make_tiny_crem",
    "make_tiny_processor",
    "make_tiny_qwen2vl",
    "make_tiny_qwen2vl_processor",
    "make_tiny_tokenizer",
    "qwen2vl_files",
    "qwen3vl_published_keys",
    "write_tiny_qwen2_5vl_checkpoint",
    "write_tiny_qwen3vl_checkpoint",
    "tiny_backbone_config",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2vl_config",
    "tiny_qwen3_vl_config",
    "published_config",
    "write_tiny_qwen2vl_checkpoint",
]

#: Qwen2-VL's special tokens, in the order of their ids in the real vocabulary.
QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

#: The Qwen2-VL chat template (image/text content parts; default system prompt when none is given).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    + DEFAULT_SYSTEM_PROMPT
    + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen3-VL-Instruct's turn and image structure: no system turn unless the messages hold one (unlike Qwen2-VL's).
QWEN3VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Words the tiny BPE learns whole, so prompts stay short.
_CORPUS = [
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_IMAGE_INSTRUCTION,
    "system\n",
    "user\n",
    "assistant\n",
    CLASSIFY_INSTRUCTION,
    "Represent the given text:",
    VQA_INSTRUCTION,
    T2I_INSTRUCTION,
    "Which digit is shown? What is in the image? Describe the image. Answer in one word.",
    "zero one two three four five six seven eight nine left right digit a cat dog red blue green",
    "The quick brown fox jumps over the lazy dog.",
]

# Default sizes: small enough for fast CPU tests, large enough to exercise every code path (2 layers, GQA, MRoPE).
_TINY_HIDDEN = 64
_TINY_LAYERS = 2
_TINY_HEADS = 4
_VISION_DEPTH = 2
_VISION_EMBED = 32
_TINY_IMAGE_PIXELS = (56 * 56, 112 * 112)

# The package's copies of the published config.json files the tiny Qwen2.5-VL / Qwen3-VL configs are built from.
_PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "backbone_configs"
# The ids of `QWEN2VL_SPECIAL_TOKENS` in the real Qwen2-VL / Qwen2.5-VL / Qwen3-VL vocabularies (what configs name).
_REAL_SPECIAL_IDS = dict(
    zip((151643, 151644, 151645, 151652, 151653, 151654, 151655, 151656), QWEN2VL_SPECIAL_TOKENS, strict=True)
)

# The real Qwen2-VL files in a crem-hf checkout (src/crem_hf/testing.py -> tests/fixtures/qwen2-vl-2b).
_CHECKOUT_FILES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "qwen2-vl-2b"
_QWEN2VL_FILES = ("config.json", "model.safetensors.index.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# Files copied as they are into a test-bed checkpoint (the tokenizer's and the image processor's).
_COPIED_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)
_INSTRUCT_TEMPLATE = "instruct_chat_template.jinja"


def make_tiny_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None) -> Qwen2Tokenizer:
    """
    A byte-level BPE trained on prompt words (or `corpus`), with Qwen2-VL's special tokens; any text still encodes.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN2VL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((corpus if corpus is not None else _CORPUS) * 20, trainer)
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2VL_SPECIAL_TOKENS[1:]})
    return tokenizer


def qwen2vl_files(folder: str | os.PathLike | None = None) -> str:
    """
    The folder of real Qwen2-VL-2B files without weights (config, key index, tokenizer, preprocessor, chat
    templates): `folder`, or by default the copy in a crem-hf checkout (`tests/fixtures/qwen2-vl-2b`), which an
    installed wheel does not ship.

    Raises:
        FileNotFoundError: no such folder, or one without the tokenizer and config files.
    """
    if folder is None:
        folder = _CHECKOUT_FILES
        if not folder.is_dir():
            raise FileNotFoundError(
                f"The real Qwen2-VL files are not at {folder} (that copy lives in a crem-hf checkout, not in the "
                "installed package): pass the folder, e.g. tests/fixtures/qwen2-vl-2b of a checkout, or a local "
                "copy of Qwen/Qwen2-VL-2B-Instruct."
            )
    folder = os.fspath(folder)
    missing = [name for name in _QWEN2VL_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the Qwen2-VL files {missing}; expected {list(_QWEN2VL_FILES)}.")
    return folder


def make_qwen2vl_tokenizer(folder: str | os.PathLike | None = None) -> Qwen2Tokenizer:
    """
    The real Qwen2-VL tokenizer (151,657 ids; the 2B embedding matrix has 151,936 rows) from the folder of real
    Qwen2-VL files (see `qwen2vl_files`).
    """
    return AutoTokenizer.from_pretrained(qwen2vl_files(folder), local_files_only=True)


def make_tiny_qwen2vl_processor(
    tokenizer: Qwen2Tokenizer | None = None,
    min_pixels: int = _TINY_IMAGE_PIXELS[0],
    max_pixels: int = _TINY_IMAGE_PIXELS[1],
    backbone: str = "qwen2_vl",
) -> Qwen2VLImageOnlyProcessor:
    """
    A plain processor (no chorus tokens) with small image sizes, for a backbone: Qwen2-VL and Qwen2.5-VL share the
    14-px patches and the template with a default system turn; Qwen3-VL has 16-px patches (32-px merged tokens,
    mean/std 0.5, the pixel bounds scaled by (32/28)^2) and its template without a default system turn.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}.")
    options = {}
    template = QWEN2VL_CHAT_TEMPLATE
    if backbone == "qwen3_vl":
        scale = (32 / 28) ** 2
        min_pixels, max_pixels = round(min_pixels * scale), round(max_pixels * scale)
        options = {"patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        template = QWEN3VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **options
    )
    return Qwen2VLImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else make_tiny_tokenizer(),
        chat_template=template,
    )


def make_tiny_processor(
    num_chorus_tokens: int = 16,
    real_tokenizer: bool = False,
    qwen2vl_folder: str | os.PathLike | None = None,
    **kwargs,
) -> CREMProcessor:
    """
    A tiny CREM processor: the tiny BPE (or, with `real_tokenizer`, the real Qwen2-VL tokenizer) plus the chorus
    tokens.

    Args:
        num_chorus_tokens: N.
        real_tokenizer: use the real Qwen2-VL tokenizer (real ids: chorus ids 151657.., a 151k-row model).
        qwen2vl_folder: where the real tokenizer files are (default: see `qwen2vl_files`).
        **kwargs: `CREMProcessor` options (`max_length`, `upscale_small_images`, ...), `min_pixels`/`max_pixels` and
            `backbone` (see `make_tiny_qwen2vl_processor`; Qwen3-VL's has no system prompt by default).
    """
    pixels = {k: kwargs.pop(k) for k in ("min_pixels", "max_pixels", "backbone") if k in kwargs}
    if pixels.get("backbone") == "qwen3_vl":
        kwargs.setdefault("system_prompt", None)  # Qwen3-VL's template adds no system turn of its own
    tokenizer = make_qwen2vl_tokenizer(qwen2vl_folder) if real_tokenizer else make_tiny_tokenizer()
    base = make_tiny_qwen2vl_processor(tokenizer, **pixels)
    return CREMProcessor.from_qwen2vl_processor(base, num_chorus_tokens=num_chorus_tokens, **kwargs)


def tiny_qwen2vl_config(
    tokenizer: Qwen2Tokenizer,
    hidden_size: int = _TINY_HIDDEN,
    num_layers: int = _TINY_LAYERS,
    num_heads: int = _TINY_HEADS,
    vision_embed_dim: int = _VISION_EMBED,
    vocab_size: int | None = None,
    attn_implementation: str = "sdpa",
) -> Qwen2VLConfig:
    """A Qwen2-VL config of the given size whose special-token ids are the tokenizer's."""
    half_head = hidden_size // num_heads // 2
    # MRoPE splits each head's rotary half into temporal/height/width sections that must sum to head_dim / 2.
    temporal = half_head // 4
    height = (half_head - temporal) // 2
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config={
            "depth": _VISION_DEPTH,
            "embed_dim": vision_embed_dim,
            "hidden_size": hidden_size,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": vocab_size if vocab_size is not None else len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": max(1, num_heads // 2),
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [temporal, height, half_head - temporal - height],
            },
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    config._attn_implementation = attn_implementation
    return config


def published_config(name: str) -> dict:
    """
    The published `config.json` of `"qwen2.5-vl-3b"` (Qwen/Qwen2.5-VL-3B-Instruct) or `"qwen3-vl-2b"`
    (Qwen/Qwen3-VL-2B-Instruct), as stored: the package's copy of `tests/fixtures/<name>/config.json` (an installed
    wheel has no tests folder; a test keeps the two equal).

    Raises:
        ValueError: no published config of that name.
    """
    path = _PUBLISHED_CONFIGS / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in _PUBLISHED_CONFIGS.glob("*.json"))
        raise ValueError(f"No published config named {name!r}; expected one of {known}.")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _scaled_sections(sections: list[int], half_head: int) -> list[int]:
    """MRoPE sections in the published proportion, summing to `half_head` (the remainder to the first)."""
    total = sum(sections)
    scaled = [s * half_head // total for s in sections]
    scaled[0] += half_head - sum(scaled)
    return scaled


def _tiny_id(published_id, tokenizer: Qwen2Tokenizer):
    """
    The tokenizer's id of the special token a published config names by its real id (`None` stays `None`; a list
    maps item by item).

    Raises:
        ValueError: an id that is not one of `QWEN2VL_SPECIAL_TOKENS` in the real vocabularies.
    """
    if published_id is None:
        return None
    if isinstance(published_id, list):
        return [_tiny_id(i, tokenizer) for i in published_id]
    if published_id not in _REAL_SPECIAL_IDS:
        raise ValueError(f"Token id {published_id} is not one of the real special-token ids {_REAL_SPECIAL_IDS}.")
    return tokenizer.convert_tokens_to_ids(_REAL_SPECIAL_IDS[published_id])


def _tiny_from_published(
    config_class: type,
    name: str,
    tokenizer: Qwen2Tokenizer,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    vision_embed_dim: int,
    vocab_size: int | None,
    attn_implementation: str,
    vision: dict,
    head_dim: bool,
):
    """
    The published config of `name` (normalised by `config_class`) with only the sizes, the tokenizer-bound ids and the
    weight dtype changed: the text width, depth, heads, vocabulary, `layer_types` (as long as the depth, of the
    published kind), MRoPE sections (the published proportion at the tiny head width), `head_dim` (when `head_dim`);
    the vision tower's depth, width, heads, output width and `vision` (block indexes within the tiny depth); the
    special-token ids as the tokenizer's ids of the same tokens. `dtype` is dropped: a published `bfloat16` would
    build the language model in bf16 next to a float32 vision tower; the tiny models are float32.
    """
    values = config_class.from_dict(published_config(name)).to_dict()
    text, published_text = dict(values["text_config"]), values["text_config"]
    width = hidden_size // num_heads
    text.update(
        vocab_size=vocab_size if vocab_size is not None else len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        dtype=None,
        **{key: _tiny_id(published_text[key], tokenizer) for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    if "layer_types" in published_text:
        text["layer_types"] = [published_text["layer_types"][0]] * num_layers
    if head_dim:
        text["head_dim"] = width
    rope = dict(published_text["rope_parameters"])
    rope["mrope_section"] = _scaled_sections(rope["mrope_section"], width // 2)
    text["rope_parameters"] = rope
    values["text_config"] = text
    values["vision_config"] = {
        **values["vision_config"],
        "depth": _VISION_DEPTH,
        "hidden_size": vision_embed_dim,
        "intermediate_size": 2 * vision_embed_dim,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        **vision,
    }
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id")
    values.update({key: _tiny_id(values[key], tokenizer) for key in ids if key in values})
    values["dtype"] = None
    config = config_class.from_dict(values)
    config._attn_implementation = attn_implementation
    return config


def tiny_qwen2_5_vl_config(
    tokenizer: Qwen2Tokenizer,
    hidden_size: int = _TINY_HIDDEN,
    num_layers: int = _TINY_LAYERS,
    num_heads: int = _TINY_HEADS,
    vision_embed_dim: int = _VISION_EMBED,
    vocab_size: int | None = None,
    attn_implementation: str = "sdpa",
) -> Qwen2_5_VLConfig:
    """
    Qwen2.5-VL-3B-Instruct's published config (`published_config("qwen2.5-vl-3b")`) at tiny width: only the sizes,
    the tokenizer's ids and the dtype change (see `_tiny_from_published`; tests/test_backbones.py lists the fields);
    the window attention (112-px windows) keeps its full-attention block last (the real one every 8th), the MRoPE
    sections keep the real 16:24:24 proportion, everything else is the real config's.
    """
    return _tiny_from_published(
        Qwen2_5_VLConfig,
        "qwen2.5-vl-3b",
        tokenizer,
        hidden_size,
        num_layers,
        num_heads,
        vision_embed_dim,
        vocab_size,
        attn_implementation,
        vision={"fullatt_block_indexes": [_VISION_DEPTH - 1]},
        head_dim=False,
    )


def tiny_qwen3_vl_config(
    tokenizer: Qwen2Tokenizer,
    hidden_size: int = _TINY_HIDDEN,
    num_layers: int = _TINY_LAYERS,
    num_heads: int = _TINY_HEADS,
    vision_embed_dim: int = _VISION_EMBED,
    vocab_size: int | None = None,
    attn_implementation: str = "sdpa",
) -> Qwen3VLConfig:
    """
    Qwen3-VL-2B-Instruct's published config (`published_config("qwen3-vl-2b")`) at tiny width: only the sizes, the
    tokenizer's ids and the dtype change (see `tiny_qwen2_5_vl_config`); DeepStack takes every tiny vision block into
    the first decoder layers (the real one blocks 5, 11, 17 of 24 into layers 0-2), the interleaved MRoPE keeps the
    real 24:20:20 proportion, the head width is explicit (hidden / heads), everything else is the real config's.
    """
    return _tiny_from_published(
        Qwen3VLConfig,
        "qwen3-vl-2b",
        tokenizer,
        hidden_size,
        num_layers,
        num_heads,
        vision_embed_dim,
        vocab_size,
        attn_implementation,
        vision={"deepstack_visual_indexes": list(range(min(_VISION_DEPTH, num_layers)))},
        head_dim=True,
    )


#: Per backbone name: the tiny config builder, the plain class and the CREM class.
BACKBONES: dict[str, tuple] = {
    "qwen2_vl": (tiny_qwen2vl_config, Qwen2VLForConditionalGeneration, CREMForEmbeddingAndGeneration),
    "qwen2_5_vl": (tiny_qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration, CREMQwen2_5_VLForEmbeddingAndGeneration),
    "qwen3_vl": (tiny_qwen3_vl_config, Qwen3VLForConditionalGeneration, CREMQwen3VLForEmbeddingAndGeneration),
}


def tiny_backbone_config(backbone: str, tokenizer: Qwen2Tokenizer, **config_kwargs):
    """The tiny config of `backbone` (a key of `BACKBONES`)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}.")
    return BACKBONES[backbone][0](tokenizer, **config_kwargs)


#: The initializer range of the tiny models whose output head is their input embedding (Qwen2.5-VL and Qwen3-VL,
#: as published) when built for varied answers. At the published 0.02 and tiny width, the residual stream is mostly
#: the last token's own embedding, which the tied head then scores highest: every greedy answer repeats the prompt's
#: last token ("\n") whatever the image or question, and tests comparing answers compare constants. At 0.2 the layers'
#: updates outweigh that embedding and the answers follow the input (measured on seeds 0, 1 and 5 of both backbones;
#: 0.05 and 0.1 still left some seeds with one answer for every input).
TIED_HEAD_INITIALIZER_RANGE = 0.2


def make_tiny_qwen2vl(
    tokenizer: Qwen2Tokenizer | None = None,
    seed: int = 0,
    backbone: str = "qwen2_vl",
    varied_answers: bool = False,
    **config_kwargs,
) -> Qwen2VLForConditionalGeneration:
    """
    A randomly initialised tiny plain model of `backbone` (Qwen2-VL by default; eval mode), reproducible.

    Args:
        varied_answers: when the backbone's config ties the output head to the input embeddings (Qwen2.5-VL,
            Qwen3-VL), initialise the weights at `TIED_HEAD_INITIALIZER_RANGE` (the config keeps the published range),
            so that greedy answers depend on the input; no effect on an untied config (the tiny Qwen2-VL). Off by
            default: the main job trains its stage-1 model from the published initialisation.
    """
    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    config = tiny_backbone_config(backbone, tokenizer, **config_kwargs)
    # The sub-configs whose `initializer_range` the model's own `_init_weights` reads (the composite one has none).
    parts = [config.get_text_config(), config.vision_config]
    published = [part.initializer_range for part in parts]
    if varied_answers and config.tie_word_embeddings:
        for part in parts:
            part.initializer_range = TIED_HEAD_INITIALIZER_RANGE
    torch.manual_seed(seed)
    try:
        model = BACKBONES[backbone][1](config).eval()
    finally:
        for part, value in zip(parts, published, strict=True):
            part.initializer_range = value
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_tiny_crem(
    processor: CREMProcessor | None = None,
    seed: int = 0,
    backbone: str = "qwen2_vl",
    varied_answers: bool = True,
    **config_kwargs,
) -> CREMMixin:
    """
    A tiny CREM model: a tiny plain model of `backbone` (Qwen2-VL by default) for the processor's base vocabulary
    (chorus rows are added by resizing, as for a real checkpoint without spare rows), converted with its CREM
    class's `from_backbone` (`from_qwen2vl` for Qwen2-VL). `varied_answers` (on by default: tests compare answers)
    as in `make_tiny_qwen2vl`: the tied-head backbones are initialised so that greedy answers depend on the input.
    """
    processor = processor if processor is not None else make_tiny_processor(backbone=backbone)
    base_vocab = min(processor.chorus_token_ids)
    base = make_tiny_qwen2vl(
        processor.tokenizer,
        seed=seed,
        backbone=backbone,
        varied_answers=varied_answers,
        vocab_size=base_vocab,
        **config_kwargs,
    )
    return BACKBONES[backbone][2].from_backbone(base, processor)


def _published_name(key: str) -> str:
    """A Qwen2-VL state-dict key under the name Hub checkpoints store it (the layout before transformers 4.52)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def write_tiny_qwen2vl_checkpoint(
    folder: str | os.PathLike,
    qwen2vl_folder: str | os.PathLike | None = None,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_embed_dim: int = 16,
    chat_template: str | None = "instruct",
    seed: int = 0,
) -> str:
    """
    Write a Qwen2-VL checkpoint laid out as the published Qwen2-VL-2B one, at tiny widths with random weights: the
    real old-style `config.json` with its widths shrunk, the real key names in the old layout (`model.layers.*`,
    `visual.*`; no `lm_head`, which is tied) in the real two shards with their index, in bfloat16, and the real
    tokenizer, image processor and generation config. The test bed for loading real checkpoints.

    Kept from the real config: the layer counts (28 language layers, 32 vision blocks), the vocabulary (151,936 rows)
    and every token id. Shrunk: the widths and head counts (the MRoPE sections follow the head width).

    Args:
        folder: where to write (created).
        qwen2vl_folder: the real Qwen2-VL files (default: see `qwen2vl_files`).
        chat_template: `"instruct"` writes the -Instruct template as `chat_template.json` (what the -Instruct
            checkpoint ships), `"base"` the base model's `chat_template.json`, `None` no chat template anywhere (none
            in `tokenizer_config.json` either). The tokenizer config keeps the base template otherwise.
        seed: seed of the random weights.
    Returns:
        The folder.
    Raises:
        ValueError: an unknown `chat_template`, or weights whose names are not the real checkpoint's.
    """
    if chat_template not in ("instruct", "base", None):
        raise ValueError(f"chat_template must be 'instruct', 'base' or None, got {chat_template!r}.")
    source, folder = qwen2vl_files(qwen2vl_folder), os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    half_head = hidden_size // num_heads // 2
    temporal = half_head // 4
    height = (half_head - temporal) // 2
    config.update(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
    )
    config["rope_scaling"]["mrope_section"] = [temporal, height, half_head - temporal - height]
    config["vision_config"].update(embed_dim=vision_embed_dim, num_heads=2, hidden_size=hidden_size)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    for name in _COPIED_FILES:
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    if chat_template == "instruct":
        with open(os.path.join(source, _INSTRUCT_TEMPLATE), encoding="utf-8") as handle:
            template = {"chat_template": handle.read()}
        with open(os.path.join(folder, "chat_template.json"), "w", encoding="utf-8") as handle:
            json.dump(template, handle, indent=2)
    elif chat_template == "base":
        shutil.copyfile(os.path.join(source, "chat_template.json"), os.path.join(folder, "chat_template.json"))
    else:
        tokenizer_config = os.path.join(folder, "tokenizer_config.json")
        with open(tokenizer_config, encoding="utf-8") as handle:
            settings = json.load(handle)
        settings.pop("chat_template", None)
        with open(tokenizer_config, "w", encoding="utf-8") as handle:
            json.dump(settings, handle, indent=2)

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(folder))
    tied = model.config.tie_word_embeddings
    weights = {
        _published_name(key): value.to(torch.bfloat16).clone()
        for key, value in model.state_dict().items()
        if not (tied and key == "lm_head.weight")
    }
    with open(os.path.join(source, "model.safetensors.index.json"), encoding="utf-8") as handle:
        shards = json.load(handle)["weight_map"]
    if set(weights) != set(shards):
        raise ValueError(
            f"The tiny weights are not named as the real checkpoint's: {sorted(set(weights) - set(shards))[:4]} "
            f"extra, {sorted(set(shards) - set(weights))[:4]} missing."
        )
    for shard in sorted(set(shards.values())):
        tensors = {key: weights[key] for key, name in shards.items() if name == shard}
        save_file(tensors, os.path.join(folder, shard), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
        "weight_map": dict(sorted(shards.items())),
    }
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2)
    return folder


# --- Test-bed checkpoints of the newer backbones (Qwen2.5-VL-3B, Qwen3-VL-2B), laid out as published ---------------

# The real files without weights, in a crem-hf checkout (tests/fixtures/<name>).
_FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
# Files copied as they are into a test bed: the tokenizer's, the processors', the generation config and the template.
_BACKBONE_COPIED_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "chat_template.json",
)
#: The single weight file of a checkpoint published without an index, and the fixture file listing its key names.
QWEN3VL_WEIGHTS_FILE = "model.safetensors"
QWEN3VL_KEYS_FILE = "model.safetensors.keys.txt"


def backbone_files(name: str, folder: str | os.PathLike | None = None) -> str:
    """
    The folder of real files without weights of a backbone checkpoint: `folder`, or by default the copy in a crem-hf
    checkout, `tests/fixtures/<name>` (`"qwen2.5-vl-3b"`: Qwen/Qwen2.5-VL-3B-Instruct, `"qwen3-vl-2b"`:
    Qwen/Qwen3-VL-2B-Instruct). See the README there for where each file came from.

    Raises:
        FileNotFoundError: no such folder, or one without `config.json`, `vocab.json` and `merges.txt`.
    """
    path = Path(folder) if folder is not None else _FIXTURES / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"The real {name} files are not at {path} (that copy lives in a crem-hf checkout, not in the installed "
            f"package): pass the folder, e.g. tests/fixtures/{name} of a checkout."
        )
    missing = [f for f in ("config.json", "vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lacks the files {missing} of the {name} checkpoint.")
    return os.fspath(path)


def _mrope_sections(half_head: int, parts: int = 3) -> list[int]:
    """Temporal/height/width sections summing to `half_head` (= head_dim / 2), as the MRoPE of each backbone needs."""
    temporal = max(1, half_head // 4) if half_head >= 3 else 1
    height = (half_head - temporal) // 2
    return [temporal, height, half_head - temporal - height][:parts]


def _write_tiny_backbone(
    folder: str,
    source: str,
    config: dict,
    model_class: type,
    published_name,
    shards: dict[str, str],
    seed: int,
) -> str:
    """
    Write `config` (a real config.json with shrunk widths), the real tokenizer/processor/template files of `source`,
    and random bf16 weights of `model_class` built from that config under their published names (`published_name`),
    laid out in the published shard files `shards` (key -> file name); an index only if there are several files.

    Raises:
        ValueError: the tiny weights are not named exactly as the published checkpoint's keys.
    """
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    for name in _BACKBONE_COPIED_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    torch.manual_seed(seed)
    model = model_class(model_class.config_class.from_pretrained(folder))
    tied = model.config.tie_word_embeddings
    weights = {}
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # a tied head is not stored in the published checkpoints
        weights[published_name(key)] = value.to(torch.bfloat16).clone()
    if set(weights) != set(shards):
        raise ValueError(
            f"The tiny weights are not named as the published checkpoint's: {sorted(set(weights) - set(shards))[:4]} "
            f"extra, {sorted(set(shards) - set(weights))[:4]} missing."
        )
    files = sorted(set(shards.values()))
    for shard in files:
        tensors = {key: weights[key] for key, name in shards.items() if name == shard}
        save_file(tensors, os.path.join(folder, shard), metadata={"format": "pt"})
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
            "weight_map": dict(sorted(shards.items())),
        }
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
    return folder


def write_tiny_qwen2_5vl_checkpoint(
    folder: str | os.PathLike,
    source_folder: str | os.PathLike | None = None,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_hidden_size: int = 16,
    seed: int = 0,
) -> str:
    """
    Write a Qwen2.5-VL checkpoint laid out as the published Qwen/Qwen2.5-VL-3B-Instruct, at tiny widths with random
    weights: the real old-style `config.json` with its widths shrunk, the real 824 key names in the old layout
    (`model.layers.*`, `visual.*`; no `lm_head`, which is tied) in the real two shards
    (`model-0000{1,2}-of-00002.safetensors`) with their index, in bfloat16, and the real tokenizer (151,665 ids),
    image processor, chat template and generation config.

    Kept from the real config: the layer counts (36 language layers, 32 vision blocks with full attention at blocks
    7/15/23/31 and windowed attention elsewhere, window 112 px), the vocabulary (151,936 rows), every token id,
    patch 14 / merge 2. Shrunk: the widths and head counts (the MRoPE sections follow the head width).

    Args:
        folder: where to write (created).
        source_folder: the real Qwen2.5-VL files (default: `tests/fixtures/qwen2.5-vl-3b` of a checkout).
        hidden_size, num_heads, num_key_value_heads: the language model's width and heads.
        vision_hidden_size: the vision tower's width (2 heads).
        seed: seed of the random weights.
    Returns:
        The folder.
    """
    source, folder = backbone_files("qwen2.5-vl-3b", source_folder), os.fspath(folder)
    with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
    )
    config["rope_scaling"]["mrope_section"] = _mrope_sections(hidden_size // num_heads // 2)
    config["vision_config"].update(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=2,
        out_hidden_size=hidden_size,
    )
    with open(os.path.join(source, "model.safetensors.index.json"), encoding="utf-8") as handle:
        shards = json.load(handle)["weight_map"]
    from transformers import Qwen2_5_VLForConditionalGeneration

    # The published names are the layout before transformers 4.52, as for Qwen2-VL.
    return _write_tiny_backbone(
        folder, source, config, Qwen2_5_VLForConditionalGeneration, _published_name, shards, seed
    )


def qwen3vl_published_keys(source_folder: str | os.PathLike | None = None) -> list[str]:
    """The key names of Qwen/Qwen3-VL-2B-Instruct's single `model.safetensors` (see the fixture's README)."""
    source = backbone_files("qwen3-vl-2b", source_folder)
    with open(os.path.join(source, QWEN3VL_KEYS_FILE), encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def write_tiny_qwen3vl_checkpoint(
    folder: str | os.PathLike,
    source_folder: str | os.PathLike | None = None,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    vision_hidden_size: int = 16,
    seed: int = 0,
) -> str:
    """
    Write a Qwen3-VL checkpoint laid out as the published Qwen/Qwen3-VL-2B-Instruct, at tiny widths with random
    weights: its `config.json` with the widths shrunk, its 625 key names (`model.language_model.*`,
    `model.visual.*`, DeepStack mergers; no `lm_head`, which is tied) in one `model.safetensors` without an index, as
    published, in bfloat16, and the real tokenizer (151,669 ids), image/video processor configs, chat template and
    generation config.

    Kept from the real config: the layer counts (28 language layers, 24 vision blocks, DeepStack features from vision
    blocks 5/11/17 added to the first 3 decoder layers), 2,304 learned vision position embeddings, patch 16 / merge 2
    (a merged token covers 32x32 px), interleaved MRoPE, the vocabulary (151,936 rows) and every token id. Shrunk: the
    widths and head counts (`head_dim` = hidden / heads; the MRoPE sections follow it).

    Args:
        folder: where to write (created).
        source_folder: the real Qwen3-VL files (default: `tests/fixtures/qwen3-vl-2b` of a checkout).
        hidden_size, num_heads, num_key_value_heads: the language model's width and heads.
        vision_hidden_size: the vision tower's width (2 heads).
        seed: seed of the random weights.
    Returns:
        The folder.
    """
    source, folder = backbone_files("qwen3-vl-2b", source_folder), os.fspath(folder)
    with open(os.path.join(source, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    head_dim = hidden_size // num_heads
    config["text_config"].update(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
    )
    config["text_config"]["rope_scaling"]["mrope_section"] = _mrope_sections(head_dim // 2)
    config["vision_config"].update(
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=2,
        out_hidden_size=hidden_size,
    )
    shards = dict.fromkeys(qwen3vl_published_keys(source), QWEN3VL_WEIGHTS_FILE)
    from transformers import Qwen3VLForConditionalGeneration

    # Qwen3-VL was published in transformers' current layout: the state-dict names are the stored names.
    return _write_tiny_backbone(folder, source, config, Qwen3VLForConditionalGeneration, str, shards, seed)
