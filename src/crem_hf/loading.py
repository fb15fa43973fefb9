"""Load a CREM model and processor from a CREM folder or a plain Qwen2-VL checkpoint (converted on the fly)."""

from __future__ import annotations

import os

from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2VLProcessor

from .configuration_crem import CREMConfig
from .modeling_crem import CREMForEmbeddingAndGeneration
from .processing_crem import CREMProcessor

__all__ = ["Qwen2VLImageOnlyProcessor", "load_crem", "load_qwen2vl_processor"]


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template
        )


def load_qwen2vl_processor(name_or_path: str | os.PathLike) -> Qwen2VLProcessor:
    """
    A Qwen2-VL checkpoint's processor; without torchvision (no video processor) it is assembled from the image
    processor, the tokenizer and the chat template alone.
    """
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, ImportError, AttributeError):
        pass  # e.g. the video processor needs torchvision: fall back to the image-only parts below
    if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
        return processor
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return Qwen2VLImageOnlyProcessor(
        image_processor=AutoImageProcessor.from_pretrained(name_or_path),
        tokenizer=tokenizer,
        chat_template=getattr(processor, "chat_template", None) or tokenizer.chat_template,
    )


def load_crem(
    name_or_path: str | os.PathLike, num_chorus_tokens: int = 16, **from_pretrained_kwargs
) -> tuple[CREMForEmbeddingAndGeneration, CREMProcessor]:
    """
    `(model, processor)` from a CREM folder, or from a Qwen2-VL checkpoint (the processor gains N chorus tokens and
    the model is converted with `CREMForEmbeddingAndGeneration.from_qwen2vl`).
    """
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == CREMConfig.model_type:
        model = CREMForEmbeddingAndGeneration.from_pretrained(name_or_path, **from_pretrained_kwargs)
        return model, CREMProcessor.from_pretrained(name_or_path)
    if config.model_type != "qwen2_vl":
        raise ValueError(f"{name_or_path} is a {config.model_type!r} model; expected a Qwen2-VL or a CREM checkpoint.")
    processor = CREMProcessor.from_qwen2vl_processor(load_qwen2vl_processor(name_or_path), num_chorus_tokens)
    model = CREMForEmbeddingAndGeneration.from_qwen2vl(name_or_path, processor, **from_pretrained_kwargs)
    return model, processor
