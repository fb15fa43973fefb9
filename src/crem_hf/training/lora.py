"""LoRA through peft: the paper's r 16 / alpha 64 on the language model's q, k, v, o, plus the chorus rows."""

from __future__ import annotations

from ..modeling_crem import CREMForEmbeddingAndGeneration

__all__ = ["LORA_TARGET_MODULES", "apply_lora"]

#: The language model's attention projections (the vision tower uses `qkv`/`proj`, so it is not matched).
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


def apply_lora(
    model: CREMForEmbeddingAndGeneration, r: int = 16, alpha: int = 64, dropout: float = 0.05, **lora_kwargs
):
    """
    Wrap `model` in a peft `PeftModel`: LoRA on the language model's q/k/v/o projections, and the N chorus rows of
    the input embeddings trainable through `trainable_token_indices` (an adapter holds N rows, not the
    vocabulary). Everything else is frozen.

    Returns:
        The `PeftModel`; `get_embedding`, `generate(compress=...)` and `forward(compress=...)` reach the CREM model.
    """
    from peft import LoraConfig, get_peft_model

    if not model.config.chorus_token_ids:
        raise ValueError("The model has no chorus_token_ids; build it with CREMForEmbeddingAndGeneration.from_qwen2vl.")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGET_MODULES,
        trainable_token_indices={"embed_tokens": list(model.config.chorus_token_ids)},
        **lora_kwargs,
    )
    return get_peft_model(model, config)
