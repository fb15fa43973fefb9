"""Load a CREM model and processor: the one place that understands CREM folders of every backbone, LoRA adapter
folders (as `examples/train_lora.py` writes them) and plain backbone checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL;
converted on the fly). Every load is exact.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoProcessor, PreTrainedConfig, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor
from transformers.utils import cached_file
from transformers.utils.peft_utils import find_adapter_config_file

from .configuration_crem import TURN_END, TURN_START, check_matryoshka_dims, turn_header
from .modeling_crem import (
    CREMForEmbeddingAndGeneration,
    CREMMixin,
    CREMQwen2_5_VLForEmbeddingAndGeneration,
    CREMQwen3VLForEmbeddingAndGeneration,
)
from .processing_crem import CREMProcessor

__all__ = [
    "BACKBONE_CREM_CLASSES",
    "CREM_CLASSES",
    "Qwen2VLImageOnlyProcessor",
    "backbone_crem_processor",
    "checkpoint_kind",
    "load_backbone_processor",
    "load_crem",
    "load_qwen2vl_processor",
    "merge_adapter",
    "template_default_system_turn",
]

_CLASSES = (
    CREMForEmbeddingAndGeneration,
    CREMQwen2_5_VLForEmbeddingAndGeneration,
    CREMQwen3VLForEmbeddingAndGeneration,
)
#: Per CREM `model_type` (`crem`, `crem_qwen2_5_vl`, `crem_qwen3_vl`): its CREM class.
CREM_CLASSES: dict[str, type[CREMMixin]] = {cls.config_class.model_type: cls for cls in _CLASSES}
#: Per plain backbone `model_type` (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`): the CREM class that converts it.
BACKBONE_CREM_CLASSES: dict[str, type[CREMMixin]] = {
    cls._backbone_class.config_class.model_type: cls for cls in _CLASSES
}

#: The CREM config fields a LoRA run changed (today `matryoshka_dims`), saved next to its adapter by `CREMTrainer`: an
#: adapter folder holds no config.json, and loading applies them to the base's config.
ADAPTER_CREM_SETTINGS = "crem_adapter_settings.json"
ADAPTER_CREM_FIELDS = ("matryoshka_dims",)

# What a usable chat template renders for a system, a user and an assistant turn (as the -Instruct template does).
_PROBE = {"system": "crem-probe-system", "user": "crem-probe-user", "assistant": "crem-probe-assistant"}


def _image_only(processor_class: type) -> type:
    """`processor_class` without its video processor (which needs torchvision), built from its other parts."""

    def init(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
        )

    name = processor_class.__name__.replace("Processor", "ImageOnlyProcessor")
    doc = f"{processor_class.__name__} without its video processor (which needs torchvision)."
    return type(name, (processor_class,), {"__init__": init, "__doc__": doc, "__module__": __name__})


#: Qwen2-VL's processor without its video processor (which needs torchvision).
Qwen2VLImageOnlyProcessor = _image_only(Qwen2VLProcessor)
# Per plain backbone `model_type`: its processor less the video processor (the fallback without torchvision).
_IMAGE_ONLY_PROCESSORS = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": _image_only(Qwen2_5_VLProcessor),
    "qwen3_vl": _image_only(Qwen3VLProcessor),
}


def _render(processor: Qwen2VLProcessor, messages: list[dict]) -> str:
    """The template's text for `messages`, or "" when it cannot render them."""
    if not processor.chat_template:
        return ""
    try:
        return processor.apply_chat_template(messages, tokenize=False)
    except Exception:  # any template that cannot render these turns is unusable alike
        return ""


def _check_chat_template(processor: Qwen2VLProcessor, name_or_path: str | os.PathLike) -> None:
    """
    Refuse a chat template that does not lay out system, user and assistant turns (e.g. the base model's). A
    default system turn is not required (Qwen3-VL's template adds none), but a given system message must render.
    """
    messages = [
        {"role": role, "content": [{"type": "text", "text": text}] if role == "user" else text}
        for role, text in _PROBE.items()
    ]
    rendered = _render(processor, messages)
    turns = [turn_header(role) for role in _PROBE]
    if not all(turn in rendered for turn in turns) or not all(text in rendered for text in _PROBE.values()):
        state = "has no chat template" if not processor.chat_template else "has a chat template without turns"
        raise ValueError(
            f"{name_or_path} {state}: CREM needs a chat template that renders system, user and assistant turns "
            f"({TURN_START}role ... {TURN_END}), as the -Instruct templates of Qwen2-VL, Qwen2.5-VL and Qwen3-VL do. "
            "Put one in the folder as chat_template.jinja or chat_template.json (the base model's template lays out "
            "no turns)."
        )


def template_default_system_turn(processor: Qwen2VLProcessor) -> bool:
    """
    Whether the processor's chat template puts a system turn before a conversation that has none (Qwen2-VL's and
    Qwen2.5-VL's do, "You are a helpful assistant."; Qwen3-VL's does not).
    """
    messages = [{"role": "user", "content": [{"type": "text", "text": _PROBE["user"]}]}]
    return turn_header("system") in _render(processor, messages)


def _model_type(name_or_path: str | os.PathLike) -> str | None:
    """The folder's `model_type`, or None without a config.json."""
    try:
        return PreTrainedConfig.get_config_dict(os.fspath(name_or_path))[0].get("model_type")
    except OSError:
        return None


def load_backbone_processor(name_or_path: str | os.PathLike) -> Qwen2VLProcessor:
    """
    A Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint's processor, as published: `AutoProcessor`'s, or without
    torchvision (no video processor) the backbone's own processor class (by the folder's `model_type`; Qwen2-VL's
    without a config.json) assembled from its tokenizer, its image processor (patch and merge size, pixel bounds,
    mean/std from the folder's `preprocessor_config.json`) and its chat template. Either way the folder's
    `chat_template.jinja` / `chat_template.json` takes precedence over the tokenizer's template, as in
    transformers. The template is not checked here (see `load_qwen2vl_processor`).

    Raises:
        ValueError: a folder of another model type.
    """
    kind = _model_type(name_or_path)
    if kind is not None and kind not in _IMAGE_ONLY_PROCESSORS:
        raise ValueError(
            f"{name_or_path} is a {kind!r} checkpoint; expected one of {', '.join(_IMAGE_ONLY_PROCESSORS)}."
        )
    processor = None
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, ImportError, AttributeError):
        pass  # e.g. the video processor needs torchvision: fall back to the image-only parts below
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        processor = _IMAGE_ONLY_PROCESSORS[kind or "qwen2_vl"].from_pretrained(name_or_path)
    if not processor.chat_template:
        processor.chat_template = processor.tokenizer.chat_template
    return processor


def load_qwen2vl_processor(name_or_path: str | os.PathLike) -> Qwen2VLProcessor:
    """
    `load_backbone_processor` of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, with its chat template checked.

    Raises:
        ValueError: the checkpoint has no chat template that lays out system, user and assistant turns.
    """
    processor = load_backbone_processor(name_or_path)
    _check_chat_template(processor, name_or_path)
    return processor


def backbone_crem_processor(name_or_path: str | os.PathLike, num_chorus_tokens: int = 16) -> CREMProcessor:
    """
    The CREM processor of a backbone checkpoint (what `load_crem` converts it with): its processor
    (`load_qwen2vl_processor`) with `num_chorus_tokens` chorus tokens, and a system prompt only where the
    checkpoint's template has a default system turn (the same text then: Qwen2-VL, Qwen2.5-VL); on Qwen3-VL, whose
    template adds none, the kept prefix is what the template puts before the user turn header.
    """
    base = load_qwen2vl_processor(name_or_path)
    options = {} if template_default_system_turn(base) else {"system_prompt": None}
    return CREMProcessor.from_qwen2vl_processor(base, num_chorus_tokens, **options)


def _has_file(name_or_path: str, filename: str) -> bool:
    return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False) is not None


def checkpoint_kind(name_or_path: str | os.PathLike) -> str:
    """
    What a folder or Hub id holds: `"adapter"` (a LoRA adapter, `adapter_config.json`), a CREM `model_type` (a key
    of `CREM_CLASSES`: a CREM model) or a plain backbone's `model_type` (a key of `BACKBONE_CREM_CLASSES`).

    Raises:
        ValueError: any other model type.
    """
    name_or_path = os.fspath(name_or_path)
    if find_adapter_config_file(name_or_path) is not None:
        return "adapter"
    kind = PreTrainedConfig.get_config_dict(name_or_path)[0].get("model_type")
    if kind is None:
        raise ValueError(
            f"{name_or_path} holds no model: no config.json with a model_type (and no adapter_config.json)."
        )
    if kind not in CREM_CLASSES and kind not in BACKBONE_CREM_CLASSES:
        raise ValueError(
            f"{name_or_path} is a {kind!r} model; expected a CREM folder ({', '.join(CREM_CLASSES)}), a LoRA adapter "
            f"folder on a CREM or backbone base, or a backbone checkpoint ({', '.join(BACKBONE_CREM_CLASSES)})."
        )
    return kind


def _saved_processor(name_or_path: str) -> CREMProcessor:
    if not _has_file(name_or_path, "processor_config.json"):
        raise ValueError(
            f"{name_or_path} holds no processor (processor_config.json); save the processor with the model."
        )
    return CREMProcessor.from_pretrained(name_or_path)


def load_crem(
    name_or_path: str | os.PathLike,
    num_chorus_tokens: int = 16,
    base_model: str | os.PathLike | None = None,
    merge: bool = True,
    **from_pretrained_kwargs,
) -> tuple[Any, CREMProcessor]:
    """
    `(model, processor)` from any checkpoint CREM meets, loaded exactly (a weight that does not load is an error):

    * a CREM folder of any backbone (either key layout): its CREM class's `from_pretrained` and its processor;
    * a LoRA adapter folder with its processor (what `examples/train_lora.py` writes): its base (`base_model`, or
      the adapter's `base_model_name_or_path`), a CREM folder or the backbone checkpoint it was trained from
      (converted with the adapter folder's processor, so the chorus ids agree), with the adapter loaded on it and
      merged (`merge=False` returns the peft model);
    * a backbone checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the processor gains `num_chorus_tokens` chorus tokens
      and the model is converted with its CREM class's `from_backbone` (new chorus rows; `num_chorus_tokens` applies
      only here).

    Args:
        **from_pretrained_kwargs: for the model's `from_pretrained` (`dtype`, `attn_implementation`, ...).
    Raises:
        ValueError: a missing processor, an adapter that does not fit its base, an unusable chat template, another
            model type, or weights that do not load exactly.
    """
    name_or_path = os.fspath(name_or_path)
    kind = checkpoint_kind(name_or_path)
    if kind in CREM_CLASSES:
        processor = _saved_processor(name_or_path)
        return CREM_CLASSES[kind].from_pretrained(name_or_path, **from_pretrained_kwargs), processor
    if kind in BACKBONE_CREM_CLASSES:
        processor = backbone_crem_processor(name_or_path, num_chorus_tokens)
        model = BACKBONE_CREM_CLASSES[kind].from_backbone(name_or_path, processor, **from_pretrained_kwargs)
        return model, processor
    return _load_adapter(name_or_path, base_model, merge, from_pretrained_kwargs)


def merge_adapter(model) -> CREMMixin:
    """
    A plain CREM model from a peft model (LoRA merged into the weights, the trained chorus rows written into the
    embeddings); any other model is returned as it is. The one merge: loading, export and the demo use it.
    """
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _load_adapter(path: str, base_model: str | os.PathLike | None, merge: bool, from_pretrained_kwargs: dict):
    """A LoRA adapter folder on its base (see `load_crem`)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    processor = _saved_processor(path)
    with open(find_adapter_config_file(path), encoding="utf-8") as handle:
        settings = json.load(handle)
    base_path = os.fspath(base_model) if base_model is not None else settings.get("base_model_name_or_path")
    if not base_path:
        raise ValueError(f"The adapter in {path} names no base model; pass base_model (--base-model).")
    base_kind = checkpoint_kind(base_path)
    if base_kind == "adapter":
        raise ValueError(f"The base {base_path} of the adapter in {path} is itself an adapter; pass its base model.")
    if base_kind in BACKBONE_CREM_CLASSES:
        base = BACKBONE_CREM_CLASSES[base_kind].from_backbone(base_path, processor, **from_pretrained_kwargs)
    else:
        base = CREM_CLASSES[base_kind].from_pretrained(base_path, **from_pretrained_kwargs)
    _apply_adapter_crem_settings(path, base.config)
    adapter_chorus = (settings.get("trainable_token_indices") or {}).get("embed_tokens")
    if adapter_chorus is not None and list(adapter_chorus) != list(base.config.chorus_token_ids):
        raise ValueError(
            f"The adapter trains chorus ids {adapter_chorus} but the base {base_path} has "
            f"{base.config.chorus_token_ids}: the adapter does not belong to this base."
        )
    if processor.chorus_token_ids != base.config.chorus_token_ids:
        raise ValueError(
            f"The processor in {path} (chorus ids {processor.chorus_token_ids}) and the base {base_path} "
            f"({base.config.chorus_token_ids}) disagree on the chorus ids."
        )
    try:
        model = PeftModel.from_pretrained(base, path)
    except RuntimeError as error:  # size mismatches of LoRA matrices
        raise ValueError(f"The adapter in {path} does not fit the base {base_path}: {error}") from error
    # peft only warns about adapter weights it could not place: compare what was saved with what the model holds.
    saved, held = load_peft_weights(path), get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(held) - set(saved)), sorted(set(saved) - set(held))
    differ = sorted(k for k in set(saved) & set(held) if not saved[k].to(held[k]).equal(held[k]))
    if missing or unexpected or differ:
        raise ValueError(
            f"The adapter in {path} does not load exactly on {base_path}: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, not loaded {differ[:4]}."
        )
    return (merge_adapter(model) if merge else model), processor


def _apply_adapter_crem_settings(path: str, config) -> None:
    """Set the fields saved in the adapter folder's `ADAPTER_CREM_SETTINGS` (if any) on the base's `config`."""
    found = cached_file(path, ADAPTER_CREM_SETTINGS, _raise_exceptions_for_missing_entries=False)
    if found is None:
        return
    with open(found, encoding="utf-8") as handle:
        fields = json.load(handle)
    unknown = sorted(set(fields) - set(ADAPTER_CREM_FIELDS))
    if unknown:
        raise ValueError(
            f"{ADAPTER_CREM_SETTINGS} in {path} holds unknown fields {unknown}; expected {ADAPTER_CREM_FIELDS}."
        )
    if fields.get("matryoshka_dims") is not None:
        config.matryoshka_dims = check_matryoshka_dims(fields["matryoshka_dims"], config.text_config.hidden_size)
    else:
        config.matryoshka_dims = None
