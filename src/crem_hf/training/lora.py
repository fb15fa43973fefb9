"""LoRA through peft: the paper's r 16 / alpha 64 on the language model's q, k, v, o, plus the chorus rows.

The target modules are found on the model itself (its decoder, `get_decoder()`), not assumed from one backbone's
names: every CREM backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) gets exactly its language model's attention projections
and never a layer of its vision tower (Qwen2.5-VL's vision MLP has `gate_proj`/`up_proj`/`down_proj` too).
"""

from __future__ import annotations

import re

import torch

from ..modeling_crem import CREMMixin

__all__ = ["LORA_PROJECTIONS", "LORA_TARGET_MODULES", "apply_lora", "lora_target_modules"]

#: The attention projections of the language model that LoRA adapts (the paper's q, k, v, o).
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: What `lora_target_modules` gives on every current backbone (their decoders live at `model.language_model`); kept
#: for adapters and code that name it.
LORA_TARGET_MODULES = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"


def lora_target_modules(model: torch.nn.Module) -> str:
    """
    The peft `target_modules` regex (matched in full against module names) for `model`: the `nn.Linear` q/k/v/o
    projections under its decoder (`model.get_decoder()`), wherever the backbone keeps it, and nothing else.

    Raises:
        ValueError: the model has no decoder among its modules, or its decoder lacks one of the projections (the
            names found are listed).
    """
    decoder = model.get_decoder()
    prefix = next((name for name, module in model.named_modules() if module is decoder and name), None)
    if prefix is None:
        raise ValueError(f"{type(model).__name__}.get_decoder() is not a submodule of it: no LoRA targets to find.")
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in decoder.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_PROJECTIONS
    }
    missing = [projection for projection in LORA_PROJECTIONS if projection not in found]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"The decoder of {type(model).__name__} ({prefix}) has no {missing} linear layers (it has {linear}): "
            f"LoRA targets the attention projections {list(LORA_PROJECTIONS)}."
        )
    return rf"{re.escape(prefix)}\..*\.({'|'.join(LORA_PROJECTIONS)})"


def apply_lora(model: CREMMixin, r: int = 16, alpha: int = 64, dropout: float = 0.05, **lora_kwargs):
    """
    Wrap `model` (a CREM model of any backbone) in a peft `PeftModel`: LoRA on its language model's q/k/v/o
    projections (`lora_target_modules`), and the N chorus rows of the input embeddings trainable through
    `trainable_token_indices` (an adapter holds N rows, not the vocabulary). Everything else is frozen.

    Returns:
        The `PeftModel`; `get_embedding`, `generate(compress=...)` and `forward(compress=...)` reach the CREM model.
    """
    from peft import LoraConfig, get_peft_model

    if not model.config.chorus_token_ids:
        raise ValueError(
            f"The {type(model).__name__} has no chorus_token_ids; build it from its backbone with "
            "crem_hf.load_crem(path) or the CREM class's from_backbone(model, processor)."
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_modules(model),
        trainable_token_indices={"embed_tokens": list(model.config.chorus_token_ids)},
        **lora_kwargs,
    )
    return get_peft_model(model, config)
