"""CREM on Qwen2-VL, Qwen2.5-VL and Qwen3-VL: chorus-token embeddings and compression-aware generation in one model.

Part of the Hub remote-code set: imports only ``torch``, ``transformers`` and its sibling files (relatively), so a
saved folder loads with ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` where ``crem_hf`` is absent.

Terms used below, per sample (one row of ``input_ids``, left padded)::

    [pad...] [kept prefix] [compressed span: image + input text] [chorus x N] [tail: question, answer...]

* *chorus block*: the N learnable chorus tokens; the embedding is read from their last-layer states.
* *compressed span*: what the chorus block summarises. Under compression the tail may not attend to it.
* *kept prefix*: the system prompt and the turn header, still visible to the tail (``compression_keep_prefix``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    PreTrainedConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.cache_utils import Cache, DynamicLayer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation.configuration_utils import GenerationConfig
from transformers.generation.utils import GenerateOutput
from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast, MultimodalCausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_crem import (
    IGNORE_INDEX,
    TURN_START,
    CREMConfig,
    CREMConfigMixin,
    CREMQwen2_5_VLConfig,
    CREMQwen3VLConfig,
    merged_image_tokens,
    register_for_auto_class,
)

__all__ = [
    "ChorusCompression",
    "ChorusLayout",
    "CREMCompressedContext",
    "CREMForEmbeddingAndGeneration",
    "CREMMixin",
    "CREMOutput",
    "CREMQwen2_5_VLForEmbeddingAndGeneration",
    "CREMQwen3VLForEmbeddingAndGeneration",
    "DeepStackSlots",
    "check_full_attention",
]

# mm_token_type_ids values of Qwen2-VL, Qwen2.5-VL and Qwen3-VL.
_TEXT_TYPE, _IMAGE_TYPE, _VIDEO_TYPE = 0, 1, 2
# New chorus rows start at the mean input embedding plus noise of this fraction of the rows' standard deviation:
# each row a typical token. Much less noise leaves 16 near-identical rows whose states ignore the input, and the
# contrastive loss then collapses every embedding to one point, where its gradient vanishes (seen with LoRA).
_CHORUS_INIT_NOISE = 1.0
# The chorus rows' noise has its own seed, so that converting the same base twice gives the same model.
_CHORUS_INIT_SEED = 0
# Qwen2VLConfig keys that describe the class, not the model.
_CLASS_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")
# from_pretrained keywords that say where a config is read from (what reading it a second time needs).
_CONFIG_SOURCE_KWARGS = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")


def _convert_hint(cls: type) -> str:
    return (
        f"convert it with crem_hf.load_crem(path) or {cls.__name__}.{cls._from_backbone_name}(path, processor) "
        "(a CREMProcessor with the chorus tokens)"
    )


def check_full_attention(config: PreTrainedConfig) -> None:
    """
    Refuse a decoder that is not all full attention: compression prunes the KV cache to the kept slots, which a
    sliding-window layer (whose window would then cover other tokens) or a linear-attention layer (a recurrent
    state, no per-token cache to prune) cannot honour.

    Args:
        config: a CREM config (its `text_config.layer_types`, when the backbone has them).
    Raises:
        ValueError: naming the layer types other than `full_attention` and where they sit.
    """
    text_config = getattr(config, "text_config", config)
    layer_types = list(getattr(text_config, "layer_types", None) or [])
    other = {i: kind for i, kind in enumerate(layer_types) if kind != "full_attention"}
    if other:
        kinds = sorted(set(other.values()))
        raise ValueError(
            f"CREM compresses by pruning the KV cache, which needs every decoder layer to be full attention; this "
            f"decoder has {', '.join(map(repr, kinds))} layers (layers {sorted(other)[:8]}"
            f"{', ...' if len(other) > 8 else ''}). Backbones with sliding-window or linear-attention layers "
            "(e.g. Qwen3.5) are not supported."
        )


def _raise_on_inexact_load(info: dict[str, list], source: Any) -> None:
    """Refuse a load that left any weight missing, unexpected or of the wrong shape (transformers only warns)."""
    problems = {
        "missing": info.get("missing_keys") or [],
        "unexpected": info.get("unexpected_keys") or [],
        "mismatched": [key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys") or []],
        "failed": info.get("error_msgs") or [],
    }
    found = {kind: sorted(map(str, keys)) for kind, keys in problems.items() if keys}
    if found:
        listed = "; ".join(
            f"{len(keys)} {kind} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
            for kind, keys in found.items()
        )
        raise ValueError(f"Loading {source} is not exact: {listed}. The weights do not belong to this model.")


@dataclass
class CREMOutput(MultimodalCausalLMOutputWithPast):
    """
    Output of the CREM classes' `forward` (on every backbone; Qwen2-VL's names below): every field of Qwen2-VL's
    `MultimodalCausalLMOutputWithPast`, with the same meaning, then CREM's own fields. As a tuple
    (`return_dict=False`) the non-`None` fields come in this order, so Qwen2-VL's come first.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            The LM loss, returned when `labels` is given: next-token cross-entropy over the labelled (label != -100)
            positions, their mean, or their sum divided by `num_items_in_batch` when that is given (Qwen2-VL's loss).
        logits (`torch.FloatTensor` of shape `(batch_size, kept_length, vocab_size)`, *optional*):
            LM-head scores, `kept_length` following `logits_to_keep` (as Qwen2-VL), with or without `labels`. `None`
            on the embedding-only path (`return_embeddings=True` without labels) and with
            `supervised_logits_only=True`.
        cache (`transformers.Cache`, *optional*):
            Key/value cache: as Qwen2-VL when no row is compressed; with `return_embeddings` or
            `supervised_logits_only` only when `use_cache=True`. Never with compressed rows (they run in two phases
            over a pruned cache: `compress` builds a compressed cache).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Per-layer hidden states `(batch_size, sequence_length, hidden_size)`, when `output_hidden_states=True`.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            Per-layer attention weights `(batch_size, num_heads, sequence_length, sequence_length)`, when
            `output_attentions=True` (eager attention only).
        image_outputs (`BaseModelOutputWithPooling`, *optional*):
            The vision encoder's output, when images were encoded.
        video_outputs (`BaseModelOutputWithPooling`, *optional*):
            The vision encoder's output for videos, when videos were encoded.
        audio_outputs (*optional*):
            Always `None` (Qwen2-VL has no audio encoder).
        lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The same tensor as `loss` (CREM's forward computes no other loss), under the name the trainer logs.
        supervised_logits (`torch.FloatTensor` of shape `(num_supervised_tokens, vocab_size)`, *optional*):
            With `supervised_logits_only=True`: the logits of the positions whose next token is labelled, in
            row-major order. No full `batch x length x vocab` tensor is built.
        embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
            Pooled chorus embeddings (as `get_embedding`), returned when `return_embeddings=True`.
    """

    lm_loss: torch.FloatTensor | None = None
    supervised_logits: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None


# ====================================================================================================================
# Compression as pruning: the one mechanism behind compressed training (`forward(compress=...)`) and compressed
# generation (`compress`, `generate(compress=...)`), read top to bottom.
#
# A compressed row's tail (the tokens after its chorus block) may not attend to its compressed span (the image and the
# input text). Attention is causal, so everything up to the chorus block is computed exactly as without compression,
# and only the tail differs. Hence:
#
#   1. layout   find each row's chorus block, kept prefix and compressed span (`ChorusCompression.find_layout`);
#   2. align    re-pack the rows as `[pad][head][pad][tail]`, so that every chorus block ends at the same slot
#               (`ChorusCompression.align`); outputs are mapped back to the caller's columns at the end;
#   3. phase 1  run the heads causally under their 2-D padding mask, keeping every layer's keys and values;
#   4. prune    keep, per layer, the slots a tail may see: all of an uncompressed row's, the kept prefix and the chorus
#               block of a compressed row's (`ChorusCompression.prune`);
#   5. phase 2  run the tails over the pruned cache, under a 2-D padding mask.
#
# No step needs more than a 2-D padding mask, so any attention kernel that takes one serves (eager, sdpa,
# flash_attention_2, ...), and no `batch x length x length` mask is ever built. Gradients flow through the kept keys
# and values into phase 1. The dense compression mask survives only as the tests' oracle.
# ====================================================================================================================


@dataclass
class ChorusLayout:
    """
    Where the chorus block and the compressed span sit in each row.

    Args:
        chorus_start (`torch.LongTensor` of shape `(batch_size,)`): index of the first chorus token.
        chorus_end (`torch.LongTensor` of shape `(batch_size,)`): index one past the last chorus token.
        span_start (`torch.LongTensor` of shape `(batch_size,)`): first index of the compressed span; the span is
            `[span_start, chorus_start)`.
    """

    chorus_start: torch.LongTensor
    chorus_end: torch.LongTensor
    span_start: torch.LongTensor

    def compressed_span(self, length: int) -> torch.BoolTensor:
        """`(batch_size, length)` bool: True on the tokens the chorus block stands in for under compression."""
        idx = torch.arange(length, device=self.chorus_start.device)
        return (idx >= self.span_start[:, None]) & (idx < self.chorus_start[:, None])


def _pack_left(keep: torch.BoolTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """
    Indices that gather the kept slots of each row to the right end, in their original order.

    Args:
        keep: `(batch_size, length)` bool.
    Returns:
        index `(batch_size, num_slots)` and its validity mask `(batch_size, num_slots)`, where `num_slots` is the
        largest number of kept slots in a row (0 when none is kept); shorter rows are padded on the left (mask False,
        index pointing at a slot that is not kept).
    """
    num_slots = int(keep.sum(1).max()) if keep.numel() else 0
    # A stable sort on 0/1 moves the kept slots to the end without reordering them.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - num_slots :]
    return order, keep.gather(1, order)


def _take(tensor: torch.Tensor, index: torch.LongTensor, dim: int = 1) -> torch.Tensor:
    """
    `tensor` gathered along its sequence axis `dim` at `index` `(batch_size, num_slots)`, the batch axis being `dim - 1`
    (`(batch, length, ...)` with `dim=1`, MRoPE positions `(3, batch, length)` with `dim=2`). Differentiable.
    """
    view = [1] * tensor.ndim
    view[dim - 1], view[dim] = index.shape
    size = list(tensor.shape)
    size[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(size))


def _filled(cache: DynamicCache, states: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """`cache` (empty) with its layers holding `states`, one `(keys, values)` pair per layer, as they are (no copy)."""
    for layer, (keys, values) in zip(cache.layers, states, strict=True):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache


def _cache_of(states: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A new `DynamicCache` of full-attention layers holding `states`, one `(keys, values)` pair per layer (no copy)."""
    cache = DynamicCache()
    cache.layers = [DynamicLayer() for _ in states]
    return _filled(cache, states)


@dataclass
class AlignedRows:
    """
    A batch re-packed for the two phases: each row becomes `[pad][head][pad][tail]`, where the head is the row's real
    tokens up to the end of its chorus block and the tail the real tokens after it. Every chorus block then ends at
    slot `split`, heads are left padded and tails are left padded too (so every row still ends with a real token).

    Args:
        index (`torch.LongTensor` of shape `(batch_size, num_slots)`): the caller's column of each slot; a padding slot
            points at some column that it does not stand for.
        mask (`torch.BoolTensor` of shape `(batch_size, num_slots)`): True on real slots.
        split (`int`): the first tail slot; `[0, split)` are the heads.
        kept (`torch.LongTensor` of shape `(batch_size, num_kept)`): the head slots that phase 2 sees (all real slots
            of an uncompressed row; the kept prefix and the chorus block of a compressed one), left packed.
        kept_mask (`torch.BoolTensor` of shape `(batch_size, num_kept)`): True on real entries of `kept`.
        slot_of (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the slot of each of the caller's columns
            (0 on padding columns).
        real (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): the caller's padding mask.
        identity (`bool`): the slots are the caller's columns (the batch came aligned): packing is a no-op.
    """

    index: torch.LongTensor
    mask: torch.BoolTensor
    split: int
    kept: torch.LongTensor
    kept_mask: torch.BoolTensor
    slot_of: torch.LongTensor
    real: torch.BoolTensor
    identity: bool

    def pack(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The caller's `tensor` (sequence axis `dim`, batch axis `dim - 1`) in the slot layout."""
        return tensor if self.identity else _take(tensor, self.index, dim)

    def unpack(self, states: torch.Tensor) -> torch.Tensor:
        """
        `states` `(batch_size, num_slots, ...)` back in the caller's columns `(batch_size, sequence_length, ...)`.
        Padding columns carry no meaning (zeros after re-packing).
        """
        if self.identity:
            return states
        unpacked = _take(states, self.slot_of)
        return unpacked.masked_fill(~self.real.view(*self.real.shape, *[1] * (states.ndim - 2)), 0)


@dataclass
class CREMCompressedContext:
    """
    A prompt compressed into its kept slots: the kept prefix, the chorus block and the tail, left packed so that
    every row ends at the same slot, at their original MRoPE positions. The image and the input text are gone.

    It knows how to continue: [`expand`] repeats its rows (several questions, beams or samples per context) and
    [`continued`] appends follow-up tokens; `generate` then runs the slots the cache lacks and decodes.

    Args:
        cache (`transformers.DynamicCache`): keys/values `(batch_size, kv_heads, cached_slots, head_dim)` of the first
            `cached_slots` slots: all of them, or fewer when `generate` is to run the rest itself
            (`compress(prefill_last=False)`, [`continued`]).
        input_ids (`torch.LongTensor` of shape `(batch_size, num_slots)`): token ids of the kept slots.
        attention_mask (`torch.LongTensor` of shape `(batch_size, num_slots)`): 1 on kept slots, 0 on packing pads.
        position_ids (`torch.LongTensor` of shape `(3, batch_size, num_slots)`): the slots' original positions.
        embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*): the rows' embeddings, pooled
            from the same forward (`compress(..., return_embeddings=True)`), as `get_embedding` gives them.
    """

    cache: DynamicCache
    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor
    embeddings: torch.FloatTensor | None = None

    def expand(self, n: int) -> CREMCompressedContext:
        """
        This context with each row repeated `n` times in a row (row `i` becomes rows `i * n` to `i * n + n - 1`, the
        order in which `generate` expands its inputs for beams and `num_return_sequences`), in a new cache; this
        context itself when `n` is 1.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"expand takes a positive int (the copies of each row), got {n!r}.")
        if n == 1:
            return self

        def rows(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
            return tensor.repeat_interleave(n, dim=dim)

        return CREMCompressedContext(
            cache=_cache_of([(rows(layer.keys), rows(layer.values)) for layer in self.cache.layers]),
            input_ids=rows(self.input_ids),
            attention_mask=rows(self.attention_mask),
            position_ids=rows(self.position_ids, dim=1),
            embeddings=rows(self.embeddings) if self.embeddings is not None else None,
        )

    def continued(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> CREMCompressedContext:
        """
        This context followed by follow-up tokens (e.g. `CREMProcessor.process_followups`): the ids, padding mask and
        MRoPE positions of its slots and then the follow-up's, which continue after the context's last position (a
        row's padding lies between the two). The cache still holds the context's slots only: `generate` runs the
        follow-up. It is a cache of its own over the same tensors (`generate` replaces a layer's tensors as it extends
        or reorders them, never writes into them), so this context stays as it is and answers again.

        Args:
            input_ids: `(batch_size, length)`, left padded, one row per row of this context.
            attention_mask: `(batch_size, length)` 2-D padding mask (default: no padding).
        Raises:
            ValueError: the follow-up is not `(batch_size, length)` or not left padded, or this context's cache lacks
                some of its slots (a `compress(prefill_last=False)` context).
        """
        batch = self.input_ids.shape[0]
        if input_ids is None or input_ids.ndim != 2 or input_ids.shape[0] != batch:
            got = "None" if input_ids is None else f"shape {tuple(input_ids.shape)}"
            raise ValueError(f"A context of batch {batch} continues with follow-up ids ({batch}, length); got {got}.")
        if self.cache.get_seq_length() != self.input_ids.shape[1]:
            raise ValueError("The context must be fully prefilled: build it with model.compress(**inputs).")
        attention_mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).long()
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("Follow-up turns must be left padded (every row ends with a real token).")
        offsets = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        positions = self.position_ids[..., -1:] + 1 + offsets[None]
        return CREMCompressedContext(
            cache=_cache_of([(layer.keys, layer.values) for layer in self.cache.layers]),
            input_ids=torch.cat([self.input_ids, input_ids], dim=1),
            attention_mask=torch.cat([self.attention_mask, attention_mask], dim=1),
            position_ids=torch.cat([self.position_ids, positions], dim=2),
            embeddings=self.embeddings,
        )


@dataclass
class DeepStackSlots:
    """
    Qwen3-VL's DeepStack inputs in a slot layout: the features its decoder adds to the hidden states of its first
    layers at the image positions, with each slot's row in them, so that they follow the rows through re-packing and
    any chunking of the phases (`for_stretch`). Nothing of hidden size is laid out per slot.

    Args:
        visual (`torch.BoolTensor` of shape `(batch_size, num_slots)`): True on real image-token slots.
        feature_row (`torch.LongTensor` of shape `(batch_size, num_slots)`): each image slot's row in `features`
            (0 elsewhere).
        features (`tuple(torch.FloatTensor)`): one `(num_image_tokens, hidden_size)` tensor per DeepStack level
            (decoder layer 0, 1, ...), rows in the order of the image tokens in the caller's batch (row-major).
    """

    visual: torch.BoolTensor
    feature_row: torch.LongTensor
    features: tuple[torch.Tensor, ...]

    def pack(self, rows: AlignedRows) -> DeepStackSlots:
        """These slots in the layout of `rows` (packing pads are never visual)."""
        return replace(self, visual=rows.pack(self.visual) & rows.mask, feature_row=rows.pack(self.feature_row))

    def for_stretch(self, start: int, end: int) -> dict[str, Any]:
        """The decoder keywords (`visual_pos_masks`, `deepstack_visual_embeds`) for the slots `[start, end)`."""
        visual = self.visual[:, start:end]
        if not bool(visual.any()):
            return {}
        # The decoder adds them at `hidden[visual_pos_masks]`, row-major: the same order as this selection.
        chosen = self.feature_row[:, start:end][visual]
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": [level[chosen] for level in self.features]}


class _PhaseCache(DynamicCache):
    """
    The key/value cache of one phase. While the phase runs it is a `DynamicCache` (starting from `start`, one
    `(keys, values)` pair per layer, or empty), except that with `keep` `(batch_size, num_kept)` the phase runs in
    one forward and each layer stores only the slots `keep` of its keys and values: the phase-1 cache is pruned as it
    is written, so the compressed span's keys and values are never held beyond their layer.

    `close()` ends the phase: `update` then returns the start states followed by the new ones and stores nothing,
    which is what the layer got during the phase. So a layer that gradient checkpointing replays in the backward pass
    sees the keys it saw in the forward pass (a `DynamicCache` would append them a second time), and the closed cache
    holds no activations.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        start: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep: torch.LongTensor | None = None,
    ):
        super().__init__(config=config)
        self.start, self.keep, self.closed = start, keep, False
        if start is not None:
            _filled(self, start)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keep is not None:
            # Gathered on a replay too, so that it records the operations of the forward pass.
            index = self.keep[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[-1])
            kept = key_states.gather(2, index), value_states.gather(2, index)
            if not self.closed:
                if self.layers[layer_idx].is_initialized:
                    raise RuntimeError("A cache that prunes as it is written takes one forward per phase.")
                super().update(*kept, layer_idx, *args, **kwargs)
            return key_states, value_states
        if not self.closed:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.start is None:
            return key_states, value_states
        keys, values = self.start[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def close(self) -> None:
        self.closed = True
        for layer in self.layers:
            layer.keys = layer.values = None


@dataclass
class TwoPhaseOutput:
    """
    What [`ChorusCompression.run`] returns, in the slot layout of its [`AlignedRows`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_run, hidden_size)`, *optional*): the final
            states of the slots that ran (heads, then tails), when asked for.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): per-layer states of the same slots, with
            `output_hidden_states=True`.
        cache (`transformers.DynamicCache`, *optional*): with `keep_cache=True`, the pruned cache: the kept head slots
            (`AlignedRows.kept`) followed by the tail slots that ran.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cache: DynamicCache | None = None


class ChorusCompression:
    """
    The compression mechanism over a Qwen-VL decoder (see the section comment above): `find_layout`, `align`, then
    `run` (phase 1, `prune`, phase 2). Every CREM class ([`CREMMixin`]) builds one per call. Backbone-neutral: it
    needs a decoder that takes `inputs_embeds`, a 2-D padding mask, explicit MRoPE `position_ids` and a `cache`;
    Qwen3-VL's DeepStack features come in as [`DeepStackSlots`].

    Args:
        language_model: the decoder (`model.model.language_model`: Qwen2-VL's, Qwen2.5-VL's or Qwen3-VL's text model).
        config: the model's CREM config.
    """

    def __init__(self, language_model: torch.nn.Module, config: CREMConfig):
        self.language_model = language_model
        self.config = config

    # ---------------------------------------------------------------- 1. layout

    @staticmethod
    def find_layout(
        config: CREMConfig, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> ChorusLayout:
        """
        Find the chorus block, the kept prefix and the compressed span of every row, from the prompt's structure.

        The rule, which is the layout `CREMProcessor` builds (it tokenises user content as text, so the only special
        ids in a row are the template's and the chorus block's):

        * the chorus block is the one run of the N chorus ids, complete, contiguous and in order;
        * with `compression_keep_prefix`, the kept prefix ends with the header of the turn that holds the chorus
          block: the last `<|im_start|>` (`turn_start_token_id`) before the block and the `turn_header_length`
          tokens after it (`user`, `\\n`). The compressed span runs from there to the block. Without it, the span
          is everything before the block.

        A row that breaks the rule is refused, never given another span.

        Args:
            config: the model's config (chorus ids, turn-start id, header length, `compression_keep_prefix`).
            input_ids: `(batch_size, sequence_length)`.
            attention_mask: `(batch_size, sequence_length)` 2-D padding mask (1 = token), optional.
        Raises:
            ValueError: the config has no chorus ids; a row lacks the complete chorus block (in order, contiguous) or
                holds extra chorus ids; with `compression_keep_prefix`, a row has no `<|im_start|>` before its
                chorus block, or its turn header runs into the chorus block or holds image, vision or chorus tokens.
        """
        chorus_ids = config.chorus_token_ids
        if not chorus_ids:
            raise ValueError(
                "config.chorus_token_ids is not set: build the model with CREMForEmbeddingAndGeneration.from_qwen2vl"
                "(model, processor) or set the chorus ids of the processor's tokenizer in the config."
            )
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError(
                "input_ids of shape (batch_size, sequence_length) are required to locate the chorus block."
            )
        length = input_ids.shape[1]
        device = input_ids.device
        n = len(chorus_ids)
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        chorus = torch.tensor(chorus_ids, device=device)
        is_chorus = torch.isin(input_ids, chorus) & real
        counts = is_chorus.sum(1)
        start = torch.where(counts > 0, is_chorus.to(torch.int8).argmax(1), torch.zeros_like(counts))
        window = (start[:, None] + torch.arange(n, device=device)).clamp(max=length - 1)
        in_order = (input_ids.gather(1, window) == chorus[None]).all(1)
        bad = ((counts != n) | ~in_order).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"Rows {bad} do not hold the {n} chorus tokens as one contiguous block in order (found "
                f"{counts[bad].tolist()} chorus tokens). Build inputs with CREMProcessor, which tokenises user text "
                "as text (it cannot add chorus ids); with truncation, make sure max_length leaves room for the block."
            )
        end = start + n
        if not config.compression_keep_prefix:
            return ChorusLayout(chorus_start=start, chorus_end=end, span_start=torch.zeros_like(start))
        idx = torch.arange(length, device=device)
        turn_starts = (input_ids == config.turn_start_token_id) & real & (idx[None] < start[:, None])
        last_turn = torch.where(turn_starts, idx[None], torch.full_like(input_ids, -1)).max(1).values
        header_end = last_turn + 1 + config.turn_header_length
        # The header must be plain text of the turn (e.g. `user`, `\\n`): no structure token, and before the block.
        structure = [config.turn_start_token_id, config.image_token_id, config.video_token_id]
        structure += [config.vision_start_token_id, config.vision_end_token_id, *chorus_ids]
        header = (last_turn[:, None] + 1 + torch.arange(config.turn_header_length, device=device)).clamp(
            min=0, max=length - 1
        )
        header_ok = ~torch.isin(input_ids.gather(1, header), torch.tensor(structure, device=device)).any(1)
        no_turn = (last_turn < 0).nonzero().flatten().tolist()
        broken = ((last_turn >= 0) & ((header_end > start) | ~header_ok)).nonzero().flatten().tolist()
        if no_turn or broken:
            raise ValueError(
                f"Rows {no_turn or broken} "
                + (
                    f"have no turn start (id {config.turn_start_token_id}, {TURN_START}) before the chorus block"
                    if no_turn
                    else f"have a turn header of {config.turn_header_length} tokens after their last "
                    f"{TURN_START} that runs into the chorus block or holds image, vision or chorus tokens"
                )
                + ", so the kept prefix cannot be located. Build inputs with CREMProcessor and a role-based chat "
                "template (Qwen2-VL-Instruct's), or set config.compression_keep_prefix=False to compress everything "
                "before the chorus block."
            )
        return ChorusLayout(chorus_start=start, chorus_end=end, span_start=header_end)

    # ---------------------------------------------------------------- 2. align

    @staticmethod
    def align(layout: ChorusLayout, attention_mask: torch.Tensor, compress: torch.BoolTensor) -> AlignedRows:
        """
        Re-pack the rows so that every chorus block ends at the same slot (see [`AlignedRows`]), and choose the
        head slots phase 2 keeps.

        Args:
            layout: the rows' [`ChorusLayout`].
            attention_mask: `(batch_size, sequence_length)` 2-D padding mask (any padding: left, right or holes).
            compress: `(batch_size,)` bool, the rows whose tails may not see their compressed span.
        """
        real = attention_mask.bool()
        batch, length = real.shape
        columns = torch.arange(length, device=real.device)
        head = real & (columns[None] < layout.chorus_end[:, None])
        head_index, head_real = _pack_left(head)
        tail_index, tail_real = _pack_left(real & ~head)
        index, mask = torch.cat([head_index, tail_index], 1), torch.cat([head_real, tail_real], 1)
        hidden = layout.compressed_span(length) & compress[:, None]
        kept, kept_mask = _pack_left(head_real & ~hidden.gather(1, head_index))
        # Every real column has exactly one real slot; padding columns (and padding slots, sent to a spare column
        # that is dropped) map to slot 0.
        slots = torch.arange(index.shape[1], device=real.device).expand(batch, -1)
        slot_of = torch.zeros(batch, length + 1, dtype=torch.long, device=real.device)
        slot_of.scatter_(1, torch.where(mask, index, length), slots)
        # Already aligned when every real slot is its own column (what padding slots point at does not matter).
        identity = index.shape[1] == length and bool(((index == columns) | ~mask).all())
        return AlignedRows(
            index=index,
            mask=mask,
            split=head_index.shape[1],
            kept=kept,
            kept_mask=kept_mask,
            slot_of=slot_of[:, :length] * real,
            real=real,
            identity=identity,
        )

    # ---------------------------------------------------------------- 3-5. phase 1, prune, phase 2

    def run(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        rows: AlignedRows,
        *,
        stop: int | None = None,
        chunk_size: int | None = None,
        keep_cache: bool = False,
        return_hidden: bool = True,
        deepstack: DeepStackSlots | None = None,
        **kwargs,
    ) -> TwoPhaseOutput:
        """
        Phase 1 over the heads, `prune`, phase 2 over the tails: the compressed forward of the aligned rows.

        Args:
            inputs_embeds: `(batch_size, num_slots, hidden_size)`, in the slot layout (`rows.pack`), image features in.
            position_ids: `(3, batch_size, num_slots)` MRoPE positions, in the slot layout.
            rows: the [`AlignedRows`].
            stop: run the slots `[0, stop)` only (default: all). `generate` leaves the last one to its own loop.
            chunk_size: run each phase in forwards of at most this many query tokens (memory linear in the length);
                inference only: under autograd each phase runs in one forward (see `_PhaseCache`).
            keep_cache: return the pruned cache, extended by the tail slots that ran.
            return_hidden: return the final states of the slots that ran.
            deepstack: Qwen3-VL's DeepStack features in the slot layout (`None` on the other backbones): each
                forward adds those of its own slots, so the image positions get them as in one plain forward.
            **kwargs: for the decoder (`output_hidden_states`, ...).
        Returns:
            [`TwoPhaseOutput`].
        """
        check_full_attention(self.config)
        if chunk_size is not None and torch.is_grad_enabled():
            raise ValueError("A chunked two-phase run is for inference: run it under torch.no_grad().")
        stop = rows.mask.shape[1] if stop is None else stop
        split, mask = rows.split, rows.mask.long()
        with self._caches_kept_under_checkpointing():
            # Run whole, phase 1 prunes its cache as it writes it; run in chunks, each chunk needs all earlier keys.
            heads = _PhaseCache(self.config, keep=rows.kept if chunk_size is None else None)
            first = self.prefill(
                heads,
                inputs_embeds[:, :split],
                mask[:, :split],
                position_ids[..., :split],
                chunk_size,
                deepstack=deepstack,
                **kwargs,
            )
            tails = _PhaseCache(self.config, self.prune(heads, rows))
            heads.close()
            second = self.prefill(
                tails,
                inputs_embeds[:, split:stop],
                torch.cat([rows.kept_mask.long(), mask[:, split:stop]], 1),
                position_ids[..., split:stop],
                chunk_size,
                deepstack=deepstack,
                offset=split,
                **kwargs,
            )
        if keep_cache:
            cache = _filled(DynamicCache(config=self.config), [(layer.keys, layer.values) for layer in tails.layers])
        else:
            cache = None
            tails.close()
        outputs = first + second
        hidden = torch.cat([out.last_hidden_state for out in outputs], 1) if return_hidden else None
        layers = None
        if outputs[0].hidden_states is not None:
            per_forward = [out.hidden_states for out in outputs]
            layers = tuple(torch.cat(states, 1) for states in zip(*per_forward, strict=True))
        return TwoPhaseOutput(last_hidden_state=hidden, hidden_states=layers, cache=cache)

    @staticmethod
    def prune(cache: _PhaseCache, rows: AlignedRows) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the `(keys, values)` `(batch_size, kv_heads, num_kept, head_dim)` of the kept head slots."""
        if cache.keep is not None:  # pruned as it was written
            return [(layer.keys, layer.values) for layer in cache.layers]
        states = []
        for layer in cache.layers:
            if not isinstance(layer, DynamicLayer):
                raise ValueError(f"Cannot prune a {type(layer).__name__} cache layer.")
            index = rows.kept[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            states.append((layer.keys.gather(2, index), layer.values.gather(2, index)))
        return states

    def prefill(
        self,
        cache: DynamicCache,
        inputs_embeds: torch.Tensor,
        key_mask: torch.Tensor,
        position_ids: torch.LongTensor,
        chunk_size: int | None = None,
        deepstack: DeepStackSlots | None = None,
        offset: int = 0,
        **kwargs,
    ) -> list:
        """
        Run a stretch of slots into `cache`, in forwards of at most `chunk_size` query tokens (all at once when
        `None`), so that the attention scores are `chunk x keys`, never `length x length`.

        Args:
            cache: the cache to extend; it holds every key before the stretch.
            inputs_embeds: `(batch_size, length, hidden_size)` of the stretch.
            key_mask: `(batch_size, cached + length)` 2-D padding mask over the cached keys and the stretch.
            position_ids: `(3, batch_size, length)` of the stretch.
            deepstack: DeepStack features of all slots (`None`: none), the stretch being slots `offset + [0, length)`.
            offset: the stretch's first slot in `deepstack`.
        Returns:
            The decoder's outputs, one per forward (none for an empty stretch).
        """
        length = inputs_embeds.shape[1]
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"prefill_chunk_size must be a positive int, got {chunk_size!r}.")
        cached = key_mask.shape[1] - length
        step = chunk_size or max(length, 1)
        outputs = []
        for start in range(0, length, step):
            end = min(start + step, length)
            extra = deepstack.for_stretch(offset + start, offset + end) if deepstack is not None else {}
            # The cache object is passed explicitly (use_cache only asks the decoder to create one).
            outputs.append(
                self.language_model(
                    inputs_embeds=inputs_embeds[:, start:end],
                    attention_mask=key_mask[:, : cached + end],
                    position_ids=position_ids[..., start:end],
                    cache=cache,
                    use_cache=False,
                    return_dict=True,
                    **extra,
                    **kwargs,
                )
            )
        return outputs

    @contextmanager
    def _caches_kept_under_checkpointing(self):
        """
        Under gradient checkpointing, transformers drops the cache of a checkpointed decoder layer, because a
        `DynamicCache` would be written a second time when the layer is replayed. The phase caches are safe to replay
        once closed (`_PhaseCache`), so the layers keep them for the run. Reentrant checkpointing is refused: it
        runs the layer without autograd, so no gradient would reach phase 1 through the kept keys and values.
        """
        layers = [layer for layer in self.language_model.layers if getattr(layer, "gradient_checkpointing", False)]
        if not layers or not torch.is_grad_enabled():
            yield
            return
        for layer in layers:
            function = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(function, "keywords", {}).get("use_reentrant") is True:
                raise ValueError(
                    "Compressed training under reentrant gradient checkpointing would lose the gradient that flows "
                    "through the kept keys and values: enable it with gradient_checkpointing_kwargs="
                    "{'use_reentrant': False} (the transformers default)."
                )
        for layer in layers:
            layer._can_checkpoint_with_cache = True
        try:
            yield
        finally:
            for layer in layers:
                del layer._can_checkpoint_with_cache

    # ---------------------------------------------------------------- the compressed context

    @staticmethod
    def context(
        cache: DynamicCache,
        rows: AlignedRows,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor,
        prefill_last: bool,
    ) -> CREMCompressedContext:
        """
        The kept slots of a run with `keep_cache=True`, left packed into one run per row (the packed heads and tails
        leave padding between them), with their ids and positions.

        Args:
            cache: the run's cache: the kept head slots, then the tail slots (all, or all but the last).
            rows: the run's [`AlignedRows`].
            input_ids: `(batch_size, num_slots)` in the slot layout.
            position_ids: `(3, batch_size, num_slots)` in the slot layout.
            prefill_last: whether the run covered the last slot.
        """
        split = rows.split
        ids = torch.cat([_take(input_ids[:, :split], rows.kept), input_ids[:, split:]], 1)
        positions = torch.cat([_take(position_ids[..., :split], rows.kept, 2), position_ids[..., split:]], 2)
        index, valid = _pack_left(torch.cat([rows.kept_mask, rows.mask[:, split:]], 1))
        # Every row ends with a real token, so after packing the last slot is real in every row; a cache without it
        # drops exactly that slot.
        cached = index if prefill_last else index[:, :-1]
        for layer in cache.layers:
            gather = cached[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)
        return CREMCompressedContext(
            cache=cache,
            input_ids=_take(ids, index),
            attention_mask=valid.long(),
            position_ids=_take(positions, index, 2),
        )


class CREMMixin:
    """
    The one CREM implementation, for every backbone: the chorus layout, compression ([`ChorusCompression`]), pooling
    from the decoder's final normed states, `get_embedding`, `compress`, `generate(compress=..., context=...)`, the
    outputs, strict loading and the conversion from a plain checkpoint.

    Why a mixin and not composition: a CREM model must *be* its backbone's `...ForConditionalGeneration` (one
    state dict with the backbone's key names, the backbone's `generate`, `prepare_inputs_for_generation` and
    position logic, PEFT targets, `isinstance` checks of the Trainer and pipelines), so each CREM class subclasses
    it; this mixin comes first in the MRO, so its `forward`/`generate`/`from_pretrained` wrap the backbone's through
    `super()`. A wrapper holding the backbone would have to forward every attribute and rename every key.

    What differs per backbone is a small set of named hooks, set by each concrete class:

    * `_backbone_class` (its plain class: conversion, the type check) and `_backbone_title` (its name in messages);
    * `_from_backbone_name` (the conversion classmethod's name, in messages);
    * `_checkpoint_layout_of` (the class whose key renaming of published checkpoints applies, or none);
    * `_deepstack_slots` (DeepStack inputs of the phase-1 forward; `None` except on Qwen3-VL);
    * the rope index is the backbone's own `model.get_rope_index` (one signature on all three), the vision tower
      its `model.get_image_features`, the layer-type check `check_full_attention` (at construction).
    """

    config: CREMConfigMixin
    _backbone_class: type = None
    _backbone_title: str = ""
    _from_backbone_name: str = "from_backbone"
    _checkpoint_layout_of: str | None = None
    #: Most query tokens one forward of a compressed prefill (`compress`, `generate(compress=...)`,
    #: `generate(context=...)`, whose follow-up turns run in `generate`'s own `prefill_chunk_size` chunks) runs; longer
    #: prompts run in chunks of this size, so the attention mask and scores are `chunk x keys` rather than
    #: `length x length`. Set it on an instance to trade speed for memory.
    prefill_chunk_size: int = 1024

    # ------------------------------------------------------------------ construction

    def __init__(self, config: CREMConfigMixin, *args, **kwargs):
        check_full_attention(config)  # before any weight is allocated
        super().__init__(config, *args, **kwargs)

    @classmethod
    def from_backbone(
        cls,
        model_or_path: torch.nn.Module | str | os.PathLike,
        processor: Any,
        **from_pretrained_kwargs,
    ) -> CREMMixin:
        """
        Build a CREM model from a plain model of this class's backbone (in memory, weights shared, not copied) or
        checkpoint.

        The config takes the chorus ids and special-token ids from `processor` (a `CREMProcessor`). When the chorus
        ids lie beyond the embedding matrix, it is resized. The chorus rows start at the mean input embedding plus
        noise of the rows' spread, so each slot starts as a distinct, typical token.

        Args:
            model_or_path: a plain model of the backbone (`_backbone_class`) or a path/Hub id of one (old and new key
                layouts).
            processor: the `CREMProcessor` that will feed the model.
            **from_pretrained_kwargs: passed to the backbone's `from_pretrained` for a path.
        Raises:
            ValueError: a checkpoint whose weights do not all load exactly (missing, unexpected or mismatched keys),
                a CREM model or folder (its chorus rows would be replaced: load it with `from_pretrained`), a model of
                another backbone (named; Qwen3-VL-MoE included), a decoder that is not all full attention, or a
                processor whose special-token ids differ from the model's.
        """
        name = cls._from_backbone_name
        if isinstance(model_or_path, (str, os.PathLike)):
            kind = PreTrainedConfig.get_config_dict(
                model_or_path,
                **{k: from_pretrained_kwargs[k] for k in _CONFIG_SOURCE_KWARGS if k in from_pretrained_kwargs},
            )[0].get("model_type")
            if kind is not None and not kind.startswith("crem") and kind != cls._backbone_class.config_class.model_type:
                raise ValueError(cls._wrong_backbone(f"{model_or_path} is a {kind!r} checkpoint"))
            base, info = cls._backbone_class.from_pretrained(
                model_or_path, output_loading_info=True, **from_pretrained_kwargs
            )
            _raise_on_inexact_load(info, model_or_path)
        else:
            base = model_or_path
        if isinstance(base, CREMMixin) or getattr(base.config, "chorus_token_ids", None):
            raise ValueError(
                f"{model_or_path if isinstance(model_or_path, (str, os.PathLike)) else 'The model'} is already a CREM "
                f"model (it has chorus tokens): load a CREM folder with {cls.__name__}.from_pretrained "
                f"or crem_hf.load_crem; {name} would replace its chorus rows."
            )
        if not isinstance(base, cls._backbone_class):
            raise ValueError(cls._wrong_backbone(f"The model is a {type(base).__name__} ({base.config.model_type!r})"))
        updates = processor.model_config_updates()
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if getattr(base.config, key) != updates[key]:
                raise ValueError(
                    f"The processor's {key} is {updates[key]} but the model's is {getattr(base.config, key)}: "
                    "they do not belong together."
                )
        values = {k: v for k, v in base.config.to_dict().items() if k not in _CLASS_KEYS}
        config = cls.config_class(**{**values, **updates})
        config._attn_implementation = base.config._attn_implementation
        with torch.device("meta"):
            model = cls(config)
        # Take the base's tensors as they are (no copy), non-persistent buffers (rotary tables) included.
        model.load_state_dict(base.state_dict(), strict=True, assign=True)
        for name, buffer in base.named_buffers():
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner.register_buffer(attr, buffer, persistent=attr not in owner._non_persistent_buffers_set)
        model.tie_weights()
        model.generation_config = base.generation_config
        model.train(base.training)
        model._init_chorus_rows()
        return model

    @classmethod
    def _wrong_backbone(cls, what: str) -> str:
        """The message for a model or checkpoint of another backbone than this class's."""
        return (
            f"{what}, but {cls.__name__} is CREM on {cls._backbone_title} and takes a "
            f"{cls._backbone_class.__name__}. CREM classes: CREMForEmbeddingAndGeneration (Qwen2-VL), "
            "CREMQwen2_5_VLForEmbeddingAndGeneration (Qwen2.5-VL), CREMQwen3VLForEmbeddingAndGeneration (Qwen3-VL, "
            "dense; Qwen3-VL-MoE is not supported)."
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """
        Load a saved CREM folder (weights in either key layout: `model.language_model.*` / `model.visual.*`, or the
        older `model.*` / `visual.*` of Hub Qwen2-VL checkpoints). As `PreTrainedModel.from_pretrained`, but exact:
        a missing, unexpected or mismatched weight is an error, not a warning.

        Raises:
            ValueError: a plain checkpoint of the backbone (it has no chorus tokens: convert it with
                `crem_hf.load_crem(path)` or the class's conversion, e.g.
                `CREMForEmbeddingAndGeneration.from_qwen2vl(path, processor)`), a LoRA adapter folder (load it with
                `crem_hf.load_crem(path)`), another model type (another backbone's CREM folder included), or weights
                that do not load exactly.
        """
        config = kwargs.get("config")
        if isinstance(config, PreTrainedConfig):
            kind, chorus_ids = config.model_type, getattr(config, "chorus_token_ids", None)
        elif pretrained_model_name_or_path is not None:
            source = {k: kwargs[k] for k in _CONFIG_SOURCE_KWARGS if k in kwargs}
            values, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **source)
            if not values:  # no config.json: a LoRA adapter folder (train_lora.py's) loads only on its base model
                from transformers.utils.peft_utils import find_adapter_config_file

                if find_adapter_config_file(os.fspath(pretrained_model_name_or_path), **source) is not None:
                    raise ValueError(
                        f"{pretrained_model_name_or_path} is a LoRA adapter folder (adapter_config.json, no "
                        "config.json), not a CREM model: load it with crem_hf.load_crem(path), which loads its base "
                        "model and applies the adapter."
                    )
                raise ValueError(f"{pretrained_model_name_or_path} has no config.json; expected a CREM folder.")
            kind, chorus_ids = values.get("model_type"), values.get("chorus_token_ids")
        else:
            kind, chorus_ids = cls.config_class.model_type, True  # a state_dict and no config: nothing to check
        if kind != cls.config_class.model_type:
            what = "another backbone's CREM folder" if str(kind).startswith("crem") else "not a CREM folder"
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {kind!r} checkpoint, {what} ({cls.__name__} loads "
                f"{cls.config_class.model_type!r}). A {cls._backbone_title} checkpoint has no chorus tokens: "
                f"{_convert_hint(cls)}."
            )
        if not chorus_ids:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no chorus_token_ids in its config: {_convert_hint(cls)}."
            )
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        _raise_on_inexact_load(info, pretrained_model_name_or_path)
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """
        As `PreTrainedModel.save_pretrained`, in this model's own key layout (`model.language_model.*`) by default:
        the older layout that transformers writes for Qwen2-VL and Qwen2.5-VL would not reload through code that reads
        the weights by name (the Trainer's resume of a full fine-tuning run). Both layouts load.
        """
        kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_chorus_rows(self) -> None:
        """
        Resize the embeddings if the chorus ids do not fit, then set the chorus rows to mean + noise. Deterministic:
        the same base gives the same rows on every load (the noise has its own seed), and rows that resizing adds
        to an untied `lm_head` start at zero rather than at a fresh random draw (chorus ids are never generated, so
        those rows never train; a random draw would differ on every load and break resuming a run).
        """
        ids = self.config.chorus_token_ids
        embeddings = self.get_input_embeddings()
        old_rows = embeddings.num_embeddings
        if max(ids) >= old_rows:
            self.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            embeddings = self.get_input_embeddings()
        with torch.no_grad():
            existing = embeddings.weight[: min(min(ids), old_rows)].float()
            mean = existing.mean(0)
            generator = torch.Generator().manual_seed(_CHORUS_INIT_SEED)
            noise = torch.randn(len(ids), existing.shape[1], generator=generator) * existing.std(0).cpu()
            embeddings.weight[old_rows:] = mean.to(embeddings.weight.dtype)
            rows = mean + (noise * _CHORUS_INIT_NOISE).to(existing.device)
            embeddings.weight[torch.tensor(ids)] = rows.to(embeddings.weight.dtype)
            head = self.get_output_embeddings()
            if head is not None and head.weight is not embeddings.weight:
                head.weight[old_rows:] = 0

    # ------------------------------------------------------------------ layout and positions

    def chorus_layout(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> ChorusLayout:
        """
        Find the chorus block, the kept prefix and the compressed span of every row (see
        [`ChorusCompression.find_layout`], which states the rule and what it refuses).

        Args:
            input_ids: `(batch_size, sequence_length)`.
            attention_mask: `(batch_size, sequence_length)` 2-D padding mask (1 = token), optional.
        """
        return ChorusCompression.find_layout(self.config, input_ids, attention_mask)

    def compute_position_ids(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """
        MRoPE position ids `(3, batch_size, sequence_length)` from the 2-D padding mask, passed explicitly so that
        every row's positions start at 0 after its padding and stay the original ones when the rows are re-packed
        or pruned.
        """
        if mm_token_type_ids is None:
            mm_token_type_ids = torch.zeros_like(input_ids)
            mm_token_type_ids[input_ids == self.config.image_token_id] = _IMAGE_TYPE
            mm_token_type_ids[input_ids == self.config.video_token_id] = _VIDEO_TYPE
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids, _ = self.model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return position_ids

    def _check_images(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None
    ) -> None:
        """Raise a ValueError when image tokens, `image_grid_thw` and `pixel_values` disagree."""
        num_tokens = int((input_ids == self.config.image_token_id).sum())
        if pixel_values is None and image_grid_thw is None:
            if num_tokens:
                raise ValueError(f"input_ids hold {num_tokens} image tokens but no pixel_values/image_grid_thw given.")
            return
        if pixel_values is None or image_grid_thw is None:
            raise ValueError("pixel_values and image_grid_thw must be given together.")
        merge = self.config.vision_config.spatial_merge_size
        expected_tokens = int(merged_image_tokens(image_grid_thw, merge).sum())
        if num_tokens != expected_tokens:
            raise ValueError(
                f"input_ids hold {num_tokens} image tokens but image_grid_thw describes {expected_tokens}: inputs and "
                "images do not match (were they processed together by the processor?)."
            )
        if pixel_values.shape[0] != int(image_grid_thw.prod(-1).sum()):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw describes "
                f"{int(image_grid_thw.prod(-1).sum())}."
            )

    # ------------------------------------------------------------------ embedding

    def pool_chorus(self, hidden_states: torch.Tensor, layout: ChorusLayout) -> torch.Tensor:
        """
        Pool the chorus block of `hidden_states` `(batch_size, sequence_length, hidden_size)` into one vector per
        row `(batch_size, hidden_size)`: mean (or last, per `config.pooling`), L2-normalised if configured.

        Every caller passes the decoder's `last_hidden_state`, which on every backbone is taken after the final
        norm. (`hidden_states[-1]` is not used: on Qwen3-VL transformers records it before the final norm.)
        """
        n = self.config.num_chorus_tokens
        index = layout.chorus_start[:, None] + torch.arange(n, device=hidden_states.device)
        chorus = hidden_states.gather(1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
        pooled = chorus.mean(1) if self.config.pooling == "mean" else chorus[:, -1]
        return F.normalize(pooled, dim=-1) if self.config.normalize_embeddings else pooled

    def get_embedding(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        dim: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Embed a batch: the pooled last-layer states of the chorus block (mean by default), L2-normalised.
        With `dim`, the Matryoshka embedding: the first `dim` components of the pooled state, L2-normalised again
        (a prefix of a unit vector is shorter than 1), as the model was trained for them.

        Runs the inner backbone model only (never `lm_head`) and stops at the chorus block: causal attention means
        tokens after it cannot change it. The result does not depend on batch composition or padding.

        Args:
            input_ids: `(batch_size, sequence_length)`, left padded, each row holding the chorus block (as made by
                `CREMProcessor.process_embedding_inputs`).
            attention_mask: `(batch_size, sequence_length)`.
            pixel_values: `(num_patches, patch_dim)` for the batch's images, optional.
            image_grid_thw: `(num_images, 3)`, optional.
            mm_token_type_ids: `(batch_size, sequence_length)`, optional (derived from `input_ids` when absent).
            dim: the embedding size, optional: one of `config.matryoshka_dims` or the hidden size (the default).
            **kwargs: other processor outputs; ignored when they are not model inputs (e.g. `labels`).
        Returns:
            `torch.FloatTensor` of shape `(batch_size, dim or hidden_size)`.
        Raises:
            ValueError: a `dim` the model was not trained for, or larger than the hidden size (checked first).
        """
        dim = self.config.check_embedding_dim(dim)
        embeddings = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            return_embeddings=True,
            return_dict=True,
        ).embeddings
        if dim is None or dim == embeddings.shape[-1]:
            return embeddings
        # The prefix of the pooled state, re-normalised: normalising the full vector first only scales the prefix,
        # so this is the prefix of the unnormalised mean, normalised (what the Matryoshka loss trains).
        prefix = embeddings[:, :dim]
        return F.normalize(prefix, dim=-1) if self.config.normalize_embeddings else prefix

    # ------------------------------------------------------------------ forward

    @staticmethod
    def _compress_flags(
        compress: bool | torch.Tensor | None, batch_size: int, device: torch.device | None = None
    ) -> torch.BoolTensor | None:
        """
        Check `compress` and give it as one flag per row: `None` stays `None`; a `bool` or a bool tensor of shape
        `(batch_size,)` becomes a bool tensor `(batch_size,)`. Anything else (strings, ints, other shapes or dtypes)
        is a TypeError/ValueError: a truthy non-bool must not silently switch compression on.
        """
        if compress is None:
            return None
        if isinstance(compress, bool):
            return torch.full((batch_size,), compress, dtype=torch.bool, device=device)
        if not isinstance(compress, torch.Tensor) or compress.dtype != torch.bool:
            described = f"a tensor of dtype {compress.dtype}" if isinstance(compress, torch.Tensor) else repr(compress)
            raise TypeError(
                f"compress must be None, a bool, or a bool tensor of shape (batch_size,) = ({batch_size},); got "
                f"{described} ({type(compress).__name__})."
            )
        if tuple(compress.shape) != (batch_size,):
            raise ValueError(
                f"compress must be a bool tensor of shape (batch_size,) = ({batch_size},), one flag per row; got "
                f"shape {tuple(compress.shape)}."
            )
        return compress.to(device) if device is not None else compress

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        compress: bool | torch.Tensor | None = None,
        return_embeddings: bool = False,
        supervised_logits_only: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | CREMOutput:
        """
        The backbone's forward (Qwen2-VL's names below), plus compression, the chorus embedding and sparse LM logits.
        Three modes:

        * plain: without `compress` (or with no row compressed), `return_embeddings` and `supervised_logits_only`,
          exactly `Qwen2VLForConditionalGeneration.forward`: same loss, logits, cache and other outputs;
        * embedding: `return_embeddings=True` without `labels` or `use_cache`: the chorus embedding only (stops at the
          chorus block, no logits);
        * language model: otherwise. Compressed rows run as [`ChorusCompression`] prunes them (causal prefill up to
          the chorus block, prune, the tail over the pruned cache), with any attention kernel; the outputs come back
          in the caller's columns.

        Args:
            compress (`bool` or `torch.BoolTensor` of shape `(batch_size,)`, *optional*):
                Compress these rows: tokens after the chorus block may not attend to the image or the input text
                (the rows need the chorus block). `None` or `False`: plain causal attention. Other types are refused.
                With compressed rows, `output_attentions` and `use_cache` are refused (the forward runs in two
                phases; `compress` builds a compressed cache), and padding positions' logits and hidden states
                carry no meaning.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Next-token targets (-100 = no loss), as Qwen2-VL: `loss` is its loss and `logits` stays
                `(batch_size, kept_length, vocab_size)`.
            return_embeddings (`bool`): return the pooled chorus embedding (`embeddings`). Without `labels` this is the
                embedding path of `get_embedding`: it stops at the chorus block and computes no logits.
            supervised_logits_only (`bool`): with `labels`, compute the LM head only at the labelled positions and
                return those logits as `supervised_logits` `(num_supervised_tokens, vocab_size)` (`logits` is then
                `None`): the training path, which never builds the `batch x length x vocab` tensor.
            **kwargs: as Qwen2-VL (`output_attentions`, `output_hidden_states`, `num_items_in_batch` (the loss is
                then the summed token loss divided by it), `return_dict`, ...).
            Other arguments: as `Qwen2VLForConditionalGeneration.forward`.
        Returns:
            [`CREMOutput`], or its tuple with `return_dict=False`.
        """
        if supervised_logits_only and labels is None:
            raise ValueError("supervised_logits_only=True needs labels: it returns the logits of labelled positions.")
        reference = input_ids if input_ids is not None else inputs_embeds
        flags = self._compress_flags(compress, reference.shape[0] if reference is not None else 0)
        compressing = flags is not None and bool(flags.any())
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
            "mm_token_type_ids": mm_token_type_ids,
            "mm_encoder_outputs": mm_encoder_outputs,
        }
        if not (compressing or return_embeddings or supervised_logits_only):
            return self._forward_plain(
                inputs,
                cache=cache,
                labels=labels,
                use_cache=use_cache,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        inputs = self._checked_inputs(inputs, pixel_values_videos, cache)
        use_cache = bool(use_cache)  # no cache unless asked: these modes serve training and embedding
        if return_embeddings and labels is None and not use_cache:
            return self._forward_embedding(inputs, **kwargs)
        return self._forward_language_model(
            inputs,
            flags if compressing else None,
            labels=labels,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_embeddings=return_embeddings,
            supervised_logits_only=supervised_logits_only,
            **kwargs,
        )

    def _forward_plain(self, inputs: dict, **kwargs) -> CREMOutput:
        """Exactly the backbone's forward (e.g. `Qwen2VLForConditionalGeneration.forward`): what `generate` runs."""
        out = super().forward(**inputs, return_dict=True, **kwargs)
        return CREMOutput(**out, lm_loss=out.loss)

    def _checked_inputs(self, inputs: dict, pixel_values_videos: torch.Tensor | None, cache: Cache | None) -> dict:
        """Refuse what the embedding and language-model modes do not take; fill the padding mask and positions."""
        input_ids = inputs["input_ids"]
        if input_ids is None:
            raise ValueError(
                "compress, return_embeddings and supervised_logits_only need input_ids (to find the chorus block); "
                "inputs_embeds alone are not enough."
            )
        if pixel_values_videos is not None or (inputs["mm_encoder_outputs"] or {}).get("video") is not None:
            raise ValueError(
                "CREM does not support video inputs with compress, return_embeddings or supervised_logits_only."
            )
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("forward with compress/labels starts from an empty cache; use generate(compress=True).")
        inputs = dict(inputs)
        mm_token_type_ids = inputs.pop("mm_token_type_ids")  # for the positions only
        if inputs["attention_mask"] is None:
            inputs["attention_mask"] = torch.ones_like(input_ids)
        if inputs["attention_mask"].ndim != 2:
            raise ValueError(
                "attention_mask must be the 2-D padding mask: compression is applied by pruning, from `compress`."
            )
        if inputs["mm_encoder_outputs"] is None:
            self._check_images(input_ids, inputs["pixel_values"], inputs["image_grid_thw"])
        if inputs["position_ids"] is None:
            inputs["position_ids"] = self.compute_position_ids(
                input_ids, inputs["attention_mask"], inputs["image_grid_thw"], mm_token_type_ids
            )
        elif inputs["position_ids"].ndim == 2:
            inputs["position_ids"] = inputs["position_ids"][None].expand(3, -1, -1)
        return inputs

    def _forward_embedding(self, inputs: dict, **kwargs) -> CREMOutput:
        """
        The chorus embedding only. Nothing after the chorus block can reach it (causal attention), so the tail is
        not computed, unless it holds image tokens, whose features must stay aligned with `pixel_values`.
        """
        layout = self.chorus_layout(inputs["input_ids"], inputs["attention_mask"])
        stop = int(layout.chorus_end.max())
        if not (inputs["input_ids"][:, stop:] == self.config.image_token_id).any():
            inputs = {
                key: value[..., :stop] if key in ("input_ids", "attention_mask", "position_ids") else value
                for key, value in inputs.items()
            }
            if inputs["inputs_embeds"] is not None:
                inputs["inputs_embeds"] = inputs["inputs_embeds"][:, :stop]
        outputs = self.model(**inputs, use_cache=False, return_dict=True, **kwargs)
        return CREMOutput(
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            embeddings=self.pool_chorus(outputs.last_hidden_state, layout),
        )

    def _forward_language_model(
        self,
        inputs: dict,
        compress: torch.BoolTensor | None,
        labels: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool,
        logits_to_keep: int | torch.Tensor,
        return_embeddings: bool,
        supervised_logits_only: bool,
        **kwargs,
    ) -> CREMOutput:
        """
        The language-model mode: hidden states of every position (under compression for the `compress` rows, which
        is not `None` only when some row is compressed), then the LM head, the loss and the embedding.
        """
        if compress is None:
            outputs = self.model(**inputs, cache=cache, use_cache=use_cache, return_dict=True, **kwargs)
        else:
            outputs = self._compressed_states(inputs, compress, use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        loss = logits = supervised_logits = None
        if supervised_logits_only:
            supervised_logits, loss = self._supervised_logits_and_loss(hidden, labels, kwargs.get("num_items_in_batch"))
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
        embeddings = None
        if return_embeddings:
            embeddings = self.pool_chorus(hidden, self.chorus_layout(inputs["input_ids"], inputs["attention_mask"]))
        return CREMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            lm_loss=loss,
            supervised_logits=supervised_logits,
            embeddings=embeddings,
        )

    def _compressed_states(
        self, inputs: dict, compress: torch.BoolTensor, use_cache: bool, **kwargs
    ) -> MultimodalBaseModelOutputWithPast:
        """
        The decoder's states `(batch_size, sequence_length, hidden_size)` with the `compress` rows compressed, by
        [`ChorusCompression`] (align, phase 1, prune, phase 2), mapped back to the caller's columns.
        """
        if use_cache or kwargs.get("output_attentions"):
            raise ValueError(
                f"forward(compress=...) runs in two phases over a pruned cache, so it returns no "
                f"{'cache' if use_cache else 'attention weights'}: build a compressed cache with model.compress(...), "
                "or leave compress unset."
            )
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        rows = ChorusCompression.align(self.chorus_layout(input_ids, attention_mask), attention_mask, compress)
        embeds, image_outputs = self._input_embeddings(
            input_ids,
            inputs["inputs_embeds"],
            inputs["pixel_values"],
            inputs["image_grid_thw"],
            inputs["mm_encoder_outputs"],
        )
        deepstack = self._deepstack_slots(input_ids, attention_mask, image_outputs)
        embeds = rows.pack(embeds)  # drops the caller's layout, which nothing needs any more
        run = self._compression().run(
            embeds,
            rows.pack(inputs["position_ids"], 2),
            rows,
            deepstack=deepstack.pack(rows) if deepstack is not None else None,
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=rows.unpack(run.last_hidden_state),
            hidden_states=tuple(map(rows.unpack, run.hidden_states)) if run.hidden_states is not None else None,
            image_outputs=image_outputs,
        )

    def _compression(self) -> ChorusCompression:
        return ChorusCompression(self.model.language_model, self.config)

    def _input_embeddings(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
        mm_encoder_outputs: dict | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """
        Input embeddings `(batch_size, length, hidden_size)` with the image features in the image-token slots (as
        the backbone's model builds them), so that the sequence can be re-packed and run in pieces; and the vision
        encoder's output (`None` without images).
        """
        embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
        image = (mm_encoder_outputs or {}).get("image")
        if image is not None and pixel_values is not None:
            raise ValueError("Give pixel_values or mm_encoder_outputs, not both.")
        if image is None and pixel_values is not None:
            image = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if image is None:
            return embeds, None
        features = torch.cat(image.pooler_output, 0).to(embeds.device, embeds.dtype)
        return embeds.masked_scatter((input_ids == self.config.image_token_id)[..., None], features), image

    def _deepstack_slots(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, image_outputs: Any
    ) -> DeepStackSlots | None:
        """
        Hook: the features the decoder adds at the image positions of its first layers, per column of the caller's
        `(batch_size, sequence_length)` layout; `None` when the backbone has none (Qwen2-VL, Qwen2.5-VL).
        """
        return None

    def _supervised_logits_and_loss(
        self, hidden: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Logits `(num_supervised, vocab)` at the positions whose next token is labelled, and the LM loss: the same
        value as Qwen2-VL's loss (the summed token cross-entropy in float32, over the number of labelled tokens or
        `num_items_in_batch`), except that no labelled token at all gives 0 rather than NaN.
        """
        targets = labels[:, 1:].to(hidden.device)
        supervised = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][supervised])
        total = F.cross_entropy(logits.float(), targets[supervised], reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp(min=1)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(total.device)
        return logits, total / denominator

    # ------------------------------------------------------------------ generation

    def _chorus_suppressed(self, kwargs: dict) -> dict:
        """Add the chorus ids to `suppress_tokens`: they are inputs only and are never generated."""
        if not self.config.chorus_token_ids:
            return kwargs
        generation_config = kwargs.get("generation_config", self.generation_config)
        suppressed = kwargs.get("suppress_tokens", generation_config.suppress_tokens) or []
        kwargs["suppress_tokens"] = sorted(set(suppressed) | set(self.config.chorus_token_ids))
        return kwargs

    @torch.no_grad()
    def compress(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        prefill_last: bool = True,
        rows: torch.BoolTensor | None = None,
        return_embeddings: bool = False,
    ) -> CREMCompressedContext:
        """
        Prefill a prompt with compression and keep only its kept slots (kept prefix, chorus block, tail) in the KV
        cache, at their original positions: [`ChorusCompression`] aligns the rows, prefills up to the chorus block
        causally, prunes the cache and runs the tail over the pruned cache.

        A prompt that ends with the chorus block (`CREMProcessor.process_embedding_inputs`) gives a reusable context:
        `generate(context=..., **processor.process_followups(questions=questions))` then answers any number of
        questions from it without running the image again.

        The prompt runs in chunks of at most `prefill_chunk_size` query tokens, so memory grows linearly with its
        length (no `length x length` mask or attention scores); the result is the same as one pass.

        Args:
            input_ids: `(batch_size, sequence_length)`, left padded, each row holding the chorus block (followed by
                at least one token when `prefill_last=False`).
            attention_mask: `(batch_size, sequence_length)` 2-D padding mask.
            pixel_values, image_grid_thw, mm_token_type_ids: as the processor returns them.
            prefill_last: also run the last token. With `False` the cache holds every kept slot but the last, which
                `generate` then runs itself to produce the first new token.
            rows: `(batch_size,)` bool, the rows to compress; the others keep every slot (native attention).
                Default: all rows.
            return_embeddings: also pool the chorus block's final states into the rows' embeddings (what
                `get_embedding` returns), from the same forward: encoding an item for search and for answering costs
                one prefill.
        Returns:
            [`CREMCompressedContext`].
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("Compressed generation needs left padding (every row must end with a real token).")
        self._check_images(input_ids, pixel_values, image_grid_thw)
        flags = self._compress_flags(True if rows is None else rows, input_ids.shape[0], input_ids.device)
        layout = self.chorus_layout(input_ids, attention_mask)
        if not prefill_last and bool((layout.chorus_end >= input_ids.shape[1]).any()):
            raise ValueError(
                "Compressed generation needs a generation prompt after the chorus block, but some rows end with it. "
                "Build inputs with CREMProcessor.process_generation_inputs, or compress the context first "
                "(model.compress) and ask questions with generate(context=...)."
            )
        aligned = ChorusCompression.align(layout, attention_mask, flags)
        embeds, image_outputs = self._input_embeddings(input_ids, None, pixel_values, image_grid_thw)
        deepstack = self._deepstack_slots(input_ids, attention_mask, image_outputs)
        positions = self.compute_position_ids(input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
        positions = aligned.pack(positions, 2)
        slots = aligned.mask.shape[1]
        run = self._compression().run(
            aligned.pack(embeds),
            positions,
            aligned,
            deepstack=deepstack.pack(aligned) if deepstack is not None else None,
            stop=slots if prefill_last else slots - 1,
            chunk_size=self.prefill_chunk_size,
            keep_cache=True,
            return_hidden=return_embeddings,
        )
        context = ChorusCompression.context(run.cache, aligned, aligned.pack(input_ids), positions, prefill_last)
        if return_embeddings:
            # Every row's chorus block ends at slot `split` of the aligned layout.
            chorus_start = torch.full_like(layout.chorus_start, aligned.split - self.config.num_chorus_tokens)
            context.embeddings = self.pool_chorus(run.last_hidden_state, replace(layout, chorus_start=chorus_start))
        return context

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        compress: bool | torch.Tensor | None = None,
        context: CREMCompressedContext | None = None,
        **kwargs,
    ) -> torch.LongTensor | GenerateOutput:
        """
        Generate natively (no row compressed: the backbone's `generate`) or from the chorus tokens alone
        (`compress=True`).

        What differs from the backbone's `generate` (e.g. `Qwen2VLForConditionalGeneration.generate`):

        * The chorus ids are added to `suppress_tokens` in every mode (they are inputs, never outputs). Otherwise,
          with `compress` unset or `False`, the call and its result are exactly Qwen2-VL's: same arguments, same
          outputs, same `GenerateOutput` fields.
        * Only `inputs` and `generation_config` may be passed by position; every other argument is a keyword.
        * `compress=True` (or a bool tensor `(batch_size,)` choosing rows): [`compress`] prefills the prompts
          causally up to the chorus block, prunes the KV cache to the kept prefix and the chorus block, runs the tail
          (the question) over it (in chunks of `prefill_chunk_size` tokens, so memory grows linearly with the
          prompt), and decoding continues at the original MRoPE positions, with any attention kernel; the result
          equals a full forward under the dense compression mask (the tests' oracle). Rows whose flag is `False`
          keep their whole prompt (native attention) in the same call.
          Greedy, sampling, beam search, `num_return_sequences`, `output_scores`/`output_logits` and
          `return_dict_in_generate` work; `sequences` start with the caller's prompt. The prompt is prefilled before
          the generation loop, so the loop's first step runs only the prompt's last token: its
          `attentions`/`hidden_states` cover that token, over the kept slots, and the returned cache holds the kept
          slots only. Needs `input_ids` (not `inputs_embeds`), images only (no video, no `mm_encoder_outputs`),
          left padding, and no `cache` of the caller's.
        * `context=` (from [`compress`]): answer follow-up turns from a compressed context, greedy or sampling with
          one sequence per question; the result holds the follow-up turns and the answers. `compress` is then unset
          or `True`; a row flagged `False` is refused.
        * In both, `max_length` and `min_length` count the prompt passed (the caller's prompt, or the follow-up
          turns), as natively, not the kept slots `generate` runs over; the slots the context's cache lacks (the
          prompt's last token, or the follow-up turns) run in `generate`'s first step, in chunks of
          `prefill_chunk_size`.
        * `compress` is `None`, a `bool` or a bool tensor of shape `(batch_size,)`; anything else (a string, an int,
          another shape or dtype) raises a TypeError/ValueError.

        Args:
            inputs: the prompt `(batch_size, sequence_length)`, left padded (or pass `input_ids=`).
            generation_config: as `GenerationMixin.generate`.
            compress: `None`/`False` (native), `True` (every row) or a bool tensor `(batch_size,)` (those rows).
            context: a context from `compress` (a prompt ending with the chorus block, of batch 1 or of the
                questions' batch size); `input_ids` / `attention_mask` are then the follow-up turns
                (`CREMProcessor.process_followups`), left padded, and the result holds only them and the answers.
            **kwargs: as `transformers.GenerationMixin.generate` (`input_ids`, `attention_mask`, `pixel_values`,
                `image_grid_thw`, `mm_token_type_ids`, `max_new_tokens`, `do_sample`, ...).
        Returns:
            As `generate`: the prompt followed by the new tokens, `(batch_size * num_return_sequences, length)`, or a
            `GenerateOutput` whose `sequences` are laid out the same way.
        """
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
        kwargs = self._chorus_suppressed(kwargs)
        if inputs is not None and kwargs.get("input_ids") is not None and (compress is not None or context is not None):
            raise ValueError("Give the prompt once: as `inputs` or as `input_ids`, not both.")
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if context is None:
            reference = prompt if prompt is not None else kwargs.get("inputs_embeds")
            flags = self._compress_flags(compress, reference.shape[0] if reference is not None else 0)
            if flags is None or not bool(flags.any()):
                return super().generate(inputs, **kwargs)
            context = self._compressed_prompt(prompt, flags, kwargs)
        else:
            context = self._continued_context(context, prompt, compress, kwargs)
        seen = context.input_ids.shape[1]
        max_length = self._generation_setting(kwargs, "max_length")
        if max_length is not None and self._generation_setting(kwargs, "max_new_tokens") is None:
            if max_length <= prompt.shape[1]:
                raise ValueError(
                    f"max_length={max_length} leaves no room for new tokens after the prompt of {prompt.shape[1]} "
                    "tokens: raise it or set max_new_tokens."
                )
            kwargs["max_length"] = max_length + seen - prompt.shape[1]  # generate counts the slots it is given
        min_length = self._generation_setting(kwargs, "min_length")
        if min_length and self._generation_setting(kwargs, "min_new_tokens") is None:
            kwargs["min_length"] = max(0, min_length + seen - prompt.shape[1])
        if self._generation_setting(kwargs, "prefill_chunk_size") is None:
            kwargs["prefill_chunk_size"] = self.prefill_chunk_size
        outputs = super().generate(
            input_ids=context.input_ids,
            attention_mask=context.attention_mask,
            position_ids=context.position_ids,
            # generate expands its inputs for beams and samples itself, but not a cache it is given.
            cache=context.expand(self._rows_per_prompt(kwargs)).cache,
            **kwargs,
        )
        return self._with_prompt(outputs, prompt, seen)

    def _compressed_prompt(
        self, input_ids: torch.LongTensor | None, flags: torch.BoolTensor, kwargs: dict
    ) -> CREMCompressedContext:
        """
        `generate(compress=...)`'s context: the prompt `(batch_size, sequence_length)` compressed in the `flags` rows,
        prefilled but for its last token; its inputs are taken out of `kwargs`.
        """
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("generate(compress=...) needs input_ids (batch_size, sequence_length) to find the chorus.")
        for key in ("inputs_embeds", "pixel_values_videos", "mm_encoder_outputs", "cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise ValueError(f"generate(compress=...) does not take {key}: it builds the compressed cache itself.")
        kwargs.pop("input_ids", None)
        return self.compress(
            input_ids,
            kwargs.pop("attention_mask", None),
            pixel_values=kwargs.pop("pixel_values", None),
            image_grid_thw=kwargs.pop("image_grid_thw", None),
            mm_token_type_ids=kwargs.pop("mm_token_type_ids", None),
            prefill_last=False,
            rows=None if bool(flags.all()) else flags,
        )

    def _continued_context(
        self,
        context: CREMCompressedContext,
        input_ids: torch.LongTensor | None,
        compress: bool | torch.Tensor | None,
        kwargs: dict,
    ) -> CREMCompressedContext:
        """
        `generate(context=...)`'s context: `context` (of batch 1 or the questions') followed by the follow-up turns
        `input_ids` `(num_questions, length)`; their inputs are taken out of `kwargs`.
        """
        flags = self._compress_flags(compress, input_ids.shape[0] if input_ids is not None else 0)
        if flags is not None and not bool(flags.all()):
            raise ValueError("generate(context=...) answers from a compressed context: leave compress unset (or True).")
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("generate(context=...) needs the follow-up turns as input_ids (num_questions, length).")
        rows, contexts = input_ids.shape[0], context.input_ids.shape[0]
        if contexts not in (1, rows):
            raise ValueError(f"A context of batch {contexts} cannot answer {rows} questions (give 1 or {rows}).")
        if self._rows_per_prompt(kwargs) > 1:
            raise ValueError("generate(context=...) supports greedy and sampling with one sequence per question.")
        if kwargs.pop("pixel_values", None) is not None:
            raise ValueError("Follow-up turns hold no images: the image lives in the context.")
        for key in ("input_ids", "image_grid_thw", "mm_token_type_ids"):
            kwargs.pop(key, None)
        return context.expand(rows // contexts).continued(input_ids, kwargs.pop("attention_mask", None))

    def _generation_setting(self, kwargs: dict, name: str) -> Any:
        """`name` as `generate` resolves it for this call: the keyword, else the given config's, else the model's."""
        given = kwargs.get("generation_config")
        values = (kwargs.get(name), getattr(given, name, None), getattr(self.generation_config, name, None))
        return next((value for value in values if value is not None), None)

    def _rows_per_prompt(self, kwargs: dict) -> int:
        """How many rows `generate` makes of each prompt row: one per beam or per returned sequence."""
        return max(self._generation_setting(kwargs, name) or 1 for name in ("num_beams", "num_return_sequences"))

    @staticmethod
    def _with_prompt(outputs: torch.LongTensor | GenerateOutput, prompt: torch.LongTensor, seen: int):
        """
        `generate`'s outputs over `seen` given slots, with the caller's `prompt` `(batch_size, length)` in their place
        (each row once per returned sequence) in front of the new tokens.
        """
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences[:, seen:]], dim=1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        return outputs


class CREMForEmbeddingAndGeneration(CREMMixin, Qwen2VLForConditionalGeneration):
    """
    Qwen2-VL with N learnable chorus tokens: a multimodal embedding model (`get_embedding`) and a chat model that
    answers either natively (`generate(compress=False)`, plain Qwen2-VL) or from the chorus tokens alone
    (`generate(compress=True)`: the image and input text are pruned from the KV cache, see [`ChorusCompression`]).

    Build one from a Qwen2-VL checkpoint with [`from_qwen2vl`], or load a saved CREM folder with `from_pretrained`.
    Everything CREM does lives in [`CREMMixin`]; this class names the backbone.
    """

    config_class = CREMConfig
    config: CREMConfig
    _backbone_class = Qwen2VLForConditionalGeneration
    _backbone_title = "Qwen2-VL"
    _from_backbone_name = "from_qwen2vl"
    _checkpoint_layout_of = "Qwen2VLForConditionalGeneration"

    @classmethod
    def from_qwen2vl(
        cls, model_or_path: Qwen2VLForConditionalGeneration | str | os.PathLike, processor: Any, **kwargs
    ) -> CREMForEmbeddingAndGeneration:
        """Build a CREM model from a Qwen2-VL model or checkpoint: [`CREMMixin.from_backbone`]."""
        return cls.from_backbone(model_or_path, processor, **kwargs)


class CREMQwen2_5_VLForEmbeddingAndGeneration(CREMMixin, Qwen2_5_VLForConditionalGeneration):  # noqa: N801 (HF spelling)
    """
    CREM on Qwen2.5-VL (as [`CREMForEmbeddingAndGeneration`] on Qwen2-VL, same API). Its differences from Qwen2-VL
    (window attention in the vision tower, the RMSNorm merger, time-scaled video positions) live inside the
    backbone's own vision tower and rope index, which CREM calls as they are.
    """

    config_class = CREMQwen2_5_VLConfig
    config: CREMQwen2_5_VLConfig
    _backbone_class = Qwen2_5_VLForConditionalGeneration
    _backbone_title = "Qwen2.5-VL"
    _from_backbone_name = "from_qwen2_5_vl"
    _checkpoint_layout_of = "Qwen2_5_VLForConditionalGeneration"

    @classmethod
    def from_qwen2_5_vl(
        cls, model_or_path: Qwen2_5_VLForConditionalGeneration | str | os.PathLike, processor: Any, **kwargs
    ) -> CREMQwen2_5_VLForEmbeddingAndGeneration:
        """Build a CREM model from a Qwen2.5-VL model or checkpoint: [`CREMMixin.from_backbone`]."""
        return cls.from_backbone(model_or_path, processor, **kwargs)


class CREMQwen3VLForEmbeddingAndGeneration(CREMMixin, Qwen3VLForConditionalGeneration):
    """
    CREM on Qwen3-VL (dense), same API. What differs from Qwen2-VL, and where:

    * DeepStack: the vision tower's intermediate features are added to the hidden states of the first decoder
      layers at the image positions. The plain forward (native generation, the embedding path) does it itself; the
      two-phase compressed run gets them through `_deepstack_slots`, in the re-packed slot layout.
    * Interleaved MRoPE: inside the decoder's rotary embedding; CREM passes the backbone's own `get_rope_index`
      positions `(3, batch, length)`, kept through re-packing and pruning as on the other backbones.
    * Final norm: pooled from `last_hidden_state` (after the norm), as on every backbone.
    * 16-px patches (32-px tokens) and its chat template: the processor's.
    """

    config_class = CREMQwen3VLConfig
    config: CREMQwen3VLConfig
    _backbone_class = Qwen3VLForConditionalGeneration
    _backbone_title = "Qwen3-VL"
    _from_backbone_name = "from_qwen3_vl"
    _checkpoint_layout_of = None  # published Qwen3-VL checkpoints already use model.language_model.* / model.visual.*

    @classmethod
    def from_qwen3_vl(
        cls, model_or_path: Qwen3VLForConditionalGeneration | str | os.PathLike, processor: Any, **kwargs
    ) -> CREMQwen3VLForEmbeddingAndGeneration:
        """Build a CREM model from a Qwen3-VL (dense) model or checkpoint: [`CREMMixin.from_backbone`]."""
        return cls.from_backbone(model_or_path, processor, **kwargs)

    def _deepstack_slots(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, image_outputs: Any
    ) -> DeepStackSlots | None:
        """
        The DeepStack features of the image tokens and each column's row in them, row-major over the image tokens as
        Qwen3-VL's model assigns them. Chorus ids are never image tokens (the config refuses it), so no feature lands
        on the chorus block.
        """
        if image_outputs is None:
            return None
        visual = (input_ids == self.config.image_token_id) & attention_mask.bool()
        feature_row = (visual.flatten().long().cumsum(0) - 1).clamp(min=0).view(visual.shape) * visual
        dtype = self.get_input_embeddings().weight.dtype
        features = tuple(torch.cat(level, 0).to(input_ids.device, dtype) for level in image_outputs.deepstack_features)
        return DeepStackSlots(visual=visual, feature_row=feature_row, features=features)


# transformers renames the older key layout of Qwen2-VL / Qwen2.5-VL checkpoints (`model.layers.*`, `visual.*`) while
# loading, but not for classes defined outside it unless their name is registered. Registering here also covers the
# Hub remote-code copy, so CREM folders in either layout load exactly on every path.
for _cls in (
    CREMForEmbeddingAndGeneration,
    CREMQwen2_5_VLForEmbeddingAndGeneration,
    CREMQwen3VLForEmbeddingAndGeneration,
):
    register_for_auto_class(_cls)
    if _cls._checkpoint_layout_of is not None:
        register_checkpoint_conversion_mapping(
            _cls.__name__, get_checkpoint_conversion_mapping(_cls._checkpoint_layout_of), overwrite=True
        )
