"""CREM on Qwen2-VL: chorus-token embeddings and compression-aware generation in one model.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedConfig, Qwen2VLForConditionalGeneration
from transformers.cache_utils import Cache, DynamicLayer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.generation.configuration_utils import GenerationConfig
from transformers.generation.utils import GenerateOutput
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_crem import IGNORE_INDEX, CREMConfig, merged_image_tokens, register_for_auto_class

__all__ = [
    "ChorusLayout",
    "CREMCompressedContext",
    "CREMForEmbeddingAndGeneration",
    "CREMOutput",
]

# mm_token_type_ids values of Qwen2-VL.
_TEXT_TYPE, _IMAGE_TYPE, _VIDEO_TYPE = 0, 1, 2
# Attention kernels that take an arbitrary 4-D mask.
_MASKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")
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
_CONVERT_HINT = (
    "convert it with crem_hf.load_crem(path) or CREMForEmbeddingAndGeneration.from_qwen2vl(path, processor) "
    "(a CREMProcessor with the chorus tokens)"
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
    Output of [`CREMForEmbeddingAndGeneration.forward`]: every field of Qwen2-VL's
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
            Key/value cache: as Qwen2-VL when no row is compressed; with `compress`, `return_embeddings` or
            `supervised_logits_only` only when `use_cache=True`.
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


@dataclass
class CREMCompressedContext:
    """
    A prompt compressed into its kept slots: the kept prefix, the chorus block and the tail, left packed so that
    every row ends at the same slot, at their original MRoPE positions. The image and the input text are gone.

    Args:
        cache (`transformers.DynamicCache`): keys/values `(batch_size, kv_heads, cached_slots, head_dim)` of the first
            `cached_slots` slots (all of them, or all but the last when `generate` is to run the last one itself).
        input_ids (`torch.LongTensor` of shape `(batch_size, num_slots)`): token ids of the kept slots.
        attention_mask (`torch.LongTensor` of shape `(batch_size, num_slots)`): 1 on kept slots, 0 on packing pads.
        position_ids (`torch.LongTensor` of shape `(3, batch_size, num_slots)`): the slots' original positions.
    """

    cache: DynamicCache
    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor


def _pack_left(keep: torch.BoolTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """
    Indices that gather the kept slots of each row to the right end, in their original order.

    Args:
        keep: `(batch_size, length)` bool.
    Returns:
        index `(batch_size, num_slots)` and its validity mask `(batch_size, num_slots)`, where `num_slots` is the
        largest number of kept slots in a row; shorter rows are padded on the left (mask False).
    """
    num_slots = int(keep.sum(1).max())
    # A stable sort on 0/1 moves the kept slots to the end without reordering them.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - num_slots :]
    return order, keep.gather(1, order)


def _select_slots(cache: DynamicCache, index: torch.LongTensor) -> None:
    """Keep, in every layer of `cache`, the slots `index` `(batch_size, num_slots)` of each row, in that order."""
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer):
            raise ValueError(f"Cannot prune a {type(layer).__name__} cache layer.")
        gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)


class CREMForEmbeddingAndGeneration(Qwen2VLForConditionalGeneration):
    """
    Qwen2-VL with N learnable chorus tokens: a multimodal embedding model (`get_embedding`) and a chat model that
    answers either natively (`generate(compress=False)`, plain Qwen2-VL) or from the chorus tokens alone
    (`generate(compress=True)`: the image and input text are masked out and dropped from the KV cache).

    Build one from a Qwen2-VL checkpoint with [`from_qwen2vl`], or load a saved CREM folder with `from_pretrained`.
    """

    config_class = CREMConfig
    config: CREMConfig
    #: Most query tokens one forward of a compressed prefill (`compress`, `generate(compress=...)`,
    #: `generate(context=...)`) runs; longer prompts run in chunks of this size, so the attention mask and scores are
    #: `chunk x keys` rather than `length x length`. Set it on an instance to trade speed for memory.
    prefill_chunk_size: int = 1024

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_qwen2vl(
        cls,
        model_or_path: Qwen2VLForConditionalGeneration | str | os.PathLike,
        processor: Any,
        **from_pretrained_kwargs,
    ) -> CREMForEmbeddingAndGeneration:
        """
        Build a CREM model from a Qwen2-VL model (in memory, weights shared, not copied) or checkpoint.

        The config takes the chorus ids and special-token ids from `processor` (a `CREMProcessor`). When the chorus
        ids lie beyond the embedding matrix, it is resized. The chorus rows start at the mean input embedding plus
        noise of the rows' spread, so each slot starts as a distinct, typical token.

        Args:
            model_or_path: a `Qwen2VLForConditionalGeneration` or a path/Hub id of one (old and new key layouts).
            processor: the `CREMProcessor` that will feed the model.
            **from_pretrained_kwargs: passed to `Qwen2VLForConditionalGeneration.from_pretrained` for a path.
        Raises:
            ValueError: a checkpoint whose weights do not all load exactly (missing, unexpected or mismatched keys),
                a CREM model or folder (its chorus rows would be replaced: load it with `from_pretrained`), or a
                processor whose special-token ids differ from the model's.
        """
        if isinstance(model_or_path, (str, os.PathLike)):
            base, info = Qwen2VLForConditionalGeneration.from_pretrained(
                model_or_path, output_loading_info=True, **from_pretrained_kwargs
            )
            _raise_on_inexact_load(info, model_or_path)
        else:
            base = model_or_path
        if isinstance(base, CREMForEmbeddingAndGeneration) or getattr(base.config, "chorus_token_ids", None):
            raise ValueError(
                f"{model_or_path if isinstance(model_or_path, (str, os.PathLike)) else 'The model'} is already a CREM "
                "model (it has chorus tokens): load a CREM folder with CREMForEmbeddingAndGeneration.from_pretrained "
                "or crem_hf.load_crem; from_qwen2vl would replace its chorus rows."
            )
        updates = processor.model_config_updates()
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if getattr(base.config, key) != updates[key]:
                raise ValueError(
                    f"The processor's {key} is {updates[key]} but the model's is {getattr(base.config, key)}: "
                    "they do not belong together."
                )
        values = {k: v for k, v in base.config.to_dict().items() if k not in _CLASS_KEYS}
        config = CREMConfig(**{**values, **updates})
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
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """
        Load a saved CREM folder (weights in either key layout: `model.language_model.*` / `model.visual.*`, or the
        older `model.*` / `visual.*` of Hub Qwen2-VL checkpoints). As `PreTrainedModel.from_pretrained`, but exact:
        a missing, unexpected or mismatched weight is an error, not a warning.

        Raises:
            ValueError: a plain Qwen2-VL checkpoint (it has no chorus tokens: convert it with
                `crem_hf.load_crem(path)` or `CREMForEmbeddingAndGeneration.from_qwen2vl(path, processor)`), another
                model type, or weights that do not load exactly.
        """
        config = kwargs.get("config")
        if isinstance(config, PreTrainedConfig):
            kind, chorus_ids = config.model_type, getattr(config, "chorus_token_ids", None)
        elif pretrained_model_name_or_path is not None:
            source = {k: kwargs[k] for k in _CONFIG_SOURCE_KWARGS if k in kwargs}
            values, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **source)
            kind, chorus_ids = values.get("model_type"), values.get("chorus_token_ids")
        else:
            kind, chorus_ids = CREMConfig.model_type, True  # a state_dict and no config: nothing to check up front
        if kind != CREMConfig.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {kind!r} checkpoint, not a CREM folder. A Qwen2-VL checkpoint "
                f"has no chorus tokens: {_CONVERT_HINT}."
            )
        if not chorus_ids:
            raise ValueError(f"{pretrained_model_name_or_path} has no chorus_token_ids in its config: {_CONVERT_HINT}.")
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        _raise_on_inexact_load(info, pretrained_model_name_or_path)
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """
        As `PreTrainedModel.save_pretrained`, in this model's own key layout (`model.language_model.*`) by default:
        the older layout that transformers writes for Qwen2-VL would not reload through code that reads the
        weights by name (the Trainer's resume of a full fine-tuning run). Both layouts load.
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

    # ------------------------------------------------------------------ layout and masks

    def chorus_layout(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> ChorusLayout:
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
            input_ids: `(batch_size, sequence_length)`.
            attention_mask: `(batch_size, sequence_length)` 2-D padding mask (1 = token), optional.
        Raises:
            ValueError: the config has no chorus ids; a row lacks the complete chorus block (in order, contiguous) or
                holds extra chorus ids; with `compression_keep_prefix`, a row has no `<|im_start|>` before its
                chorus block, or its turn header runs into the chorus block or holds image, vision or chorus tokens.
        """
        chorus_ids = self.config.chorus_token_ids
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
        if not self.config.compression_keep_prefix:
            return ChorusLayout(chorus_start=start, chorus_end=end, span_start=torch.zeros_like(start))
        idx = torch.arange(length, device=device)
        turn_starts = (input_ids == self.config.turn_start_token_id) & real & (idx[None] < start[:, None])
        last_turn = torch.where(turn_starts, idx[None], torch.full_like(input_ids, -1)).max(1).values
        header_end = last_turn + 1 + self.config.turn_header_length
        # The header must be plain text of the turn (e.g. `user`, `\\n`): no structure token, and before the block.
        structure = [self.config.turn_start_token_id, self.config.image_token_id, self.config.video_token_id]
        structure += [self.config.vision_start_token_id, self.config.vision_end_token_id, *chorus_ids]
        header = (last_turn[:, None] + 1 + torch.arange(self.config.turn_header_length, device=device)).clamp(
            min=0, max=length - 1
        )
        header_ok = ~torch.isin(input_ids.gather(1, header), torch.tensor(structure, device=device)).any(1)
        no_turn = (last_turn < 0).nonzero().flatten().tolist()
        broken = ((last_turn >= 0) & ((header_end > start) | ~header_ok)).nonzero().flatten().tolist()
        if no_turn or broken:
            raise ValueError(
                f"Rows {no_turn or broken} "
                + (
                    f"have no turn start (id {self.config.turn_start_token_id}, <|im_start|>) before the chorus block"
                    if no_turn
                    else f"have a turn header of {self.config.turn_header_length} tokens after their last "
                    "<|im_start|> that runs into the chorus block or holds image, vision or chorus tokens"
                )
                + ", so the kept prefix cannot be located. Build inputs with CREMProcessor and a role-based chat "
                "template (Qwen2-VL-Instruct's), or set config.compression_keep_prefix=False to compress everything "
                "before the chorus block."
            )
        return ChorusLayout(chorus_start=start, chorus_end=end, span_start=header_end)

    def build_compression_mask(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        compress: bool | torch.Tensor = True,
        layout: ChorusLayout | None = None,
        queries: slice | None = None,
    ) -> torch.Tensor:
        """
        The compression-aware attention mask: causal and padding-aware, and in compressed rows the tokens after the
        chorus block may not attend to the compressed span (the image and the input text).

        Args:
            input_ids: `(batch_size, sequence_length)`.
            attention_mask: `(batch_size, sequence_length)` 2-D padding mask, optional.
            compress: `True`/`False` for every row, or a bool tensor `(batch_size,)`.
            layout: the rows' [`ChorusLayout`], computed when not given.
            queries: only the mask rows of these query positions `[start, stop)`, over the keys `[0, stop)` (what
                a chunked prefill needs: memory `chunk x stop`, not `length x length`). Default: all positions.
        Returns:
            Additive float mask `(batch_size, 1, num_queries, num_keys)` in the model's dtype (both
            `sequence_length` by default): 0 where attention is allowed, the dtype's minimum elsewhere (the form both
            eager and sdpa attention take).
        """
        if self.config._attn_implementation not in _MASKABLE_ATTENTION:
            raise ValueError(
                f"Compression-aware attention needs an attention kernel that takes a 4-D mask ({_MASKABLE_ATTENTION}),"
                f" but the model uses {self.config._attn_implementation!r}. Load it with attn_implementation='sdpa'."
            )
        batch, length = input_ids.shape
        device = input_ids.device
        layout = layout if layout is not None else self.chorus_layout(input_ids, attention_mask)
        compress = self._compress_flags(compress, batch, device)
        start, stop, _ = (queries or slice(0, length)).indices(length)
        rows = torch.arange(start, stop, device=device)
        keys = torch.arange(stop, device=device)
        allowed = (rows[:, None] >= keys[None, :])[None].expand(batch, -1, -1)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, :stop]
        after_chorus = rows[None, :, None] >= layout.chorus_end[:, None, None]
        hidden_keys = layout.compressed_span(stop)[:, None, :]
        allowed = allowed & ~(compress[:, None, None] & after_chorus & hidden_keys)
        # Every row keeps itself, so padding rows never see an all-masked row.
        allowed = allowed | (rows[:, None] == keys[None, :])[None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)[:, None]

    def compute_position_ids(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """
        MRoPE position ids `(3, batch_size, sequence_length)` from the 2-D padding mask, so that a custom 4-D mask
        never reaches the RoPE code and every row's positions start at 0 after its padding.
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
        **kwargs,
    ) -> torch.Tensor:
        """
        Embed a batch: the pooled last-layer states of the chorus block (mean by default), L2-normalised.

        Runs the inner Qwen2-VL model only (never `lm_head`) and stops at the chorus block: causal attention means
        tokens after it cannot change it. The result does not depend on batch composition or padding.

        Args:
            input_ids: `(batch_size, sequence_length)`, left padded, each row holding the chorus block (as made by
                `CREMProcessor.process_embedding_inputs`).
            attention_mask: `(batch_size, sequence_length)`.
            pixel_values: `(num_patches, patch_dim)` for the batch's images, optional.
            image_grid_thw: `(num_images, 3)`, optional.
            mm_token_type_ids: `(batch_size, sequence_length)`, optional (derived from `input_ids` when absent).
            **kwargs: other processor outputs; ignored when they are not model inputs (e.g. `labels`).
        Returns:
            `torch.FloatTensor` of shape `(batch_size, hidden_size)`.
        """
        return self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            return_embeddings=True,
            return_dict=True,
        ).embeddings

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
        Qwen2-VL's forward, plus compression-aware attention, the chorus embedding and sparse LM logits.

        Without `compress` (or with no row compressed), `return_embeddings` and `supervised_logits_only` this is
        exactly `Qwen2VLForConditionalGeneration.forward`: same loss, logits, cache and other outputs.

        Args:
            compress (`bool` or `torch.BoolTensor` of shape `(batch_size,)`, *optional*):
                Compress these rows: tokens after the chorus block may not attend to the image or the input text
                (the rows need the chorus block). `None` or `False`: plain causal attention. Other types are refused.
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
        if not (compressing or return_embeddings or supervised_logits_only):
            # Exactly Qwen2-VL (the path `generate` takes).
            out = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                logits_to_keep=logits_to_keep,
                mm_encoder_outputs=mm_encoder_outputs,
                return_dict=True,
                **kwargs,
            )
            return CREMOutput(**out, lm_loss=out.loss)
        if input_ids is None:
            raise ValueError(
                "compress, return_embeddings and supervised_logits_only need input_ids (to find the chorus block); "
                "inputs_embeds alone are not enough."
            )
        if pixel_values_videos is not None:
            raise ValueError(
                "CREM does not support video inputs with compress, return_embeddings or supervised_logits_only."
            )
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("forward with compress/labels starts from an empty cache; use generate(compress=True).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.ndim != 2:
            raise ValueError("attention_mask must be the 2-D padding mask; the 4-D mask is built from `compress`.")
        if mm_encoder_outputs is None:
            self._check_images(input_ids, pixel_values, image_grid_thw)
        use_cache = bool(use_cache)  # no cache unless asked: this path serves training and embedding
        embedding_only = return_embeddings and labels is None and not use_cache
        # The chorus rows are causal, so the embedding is the same under any mask: no 4-D mask is needed for it.
        compressing = compressing and not embedding_only
        layout = self.chorus_layout(input_ids, attention_mask) if compressing or return_embeddings else None
        if position_ids is None:
            position_ids = self.compute_position_ids(input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
        if embedding_only:
            # Nothing after the chorus block can reach it, so the tail is not computed (unless it holds image
            # tokens, whose features must stay aligned with pixel_values).
            stop = int(layout.chorus_end.max())
            if not (input_ids[:, stop:] == self.config.image_token_id).any():
                input_ids, attention_mask = input_ids[:, :stop], attention_mask[:, :stop]
                position_ids = position_ids[..., :stop]
                inputs_embeds = inputs_embeds[:, :stop] if inputs_embeds is not None else None
        mask = self.build_compression_mask(input_ids, attention_mask, flags, layout) if compressing else attention_mask
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        loss = logits = supervised_logits = None
        if supervised_logits_only:
            supervised_logits, loss = self._supervised_logits_and_loss(hidden, labels, kwargs.get("num_items_in_batch"))
        elif not embedding_only:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
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
            embeddings=self.pool_chorus(hidden, layout) if return_embeddings else None,
        )

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
    ) -> CREMCompressedContext:
        """
        Prefill a prompt under compression-aware attention and keep only its kept slots (kept prefix, chorus block,
        tail) in the KV cache, at their original positions.

        A prompt that ends with the chorus block (`CREMProcessor.process_embedding_inputs`) gives a reusable context:
        `generate(context=..., **processor.process_followups(questions))` then answers any number of questions from
        it without running the image again.

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
        Returns:
            [`CREMCompressedContext`].
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("Compressed generation needs left padding (every row must end with a real token).")
        self._check_images(input_ids, pixel_values, image_grid_thw)
        if any(layer_type != "full_attention" for layer_type in self.config.text_config.layer_types):
            raise ValueError("KV-cache pruning supports full-attention layers only (no sliding window).")
        batch, length = input_ids.shape
        flags = self._compress_flags(True if rows is None else rows, batch, input_ids.device)
        layout = self.chorus_layout(input_ids, attention_mask)
        if not prefill_last and bool((layout.chorus_end >= length).any()):
            raise ValueError(
                "Compressed generation needs a generation prompt after the chorus block, but some rows end with it. "
                "Build inputs with CREMProcessor.process_generation_inputs, or compress the context first "
                "(model.compress) and ask questions with generate(context=...)."
            )
        hidden_span = layout.compressed_span(length) & flags[:, None]
        position_ids = self.compute_position_ids(input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
        stop = length if prefill_last else length - 1
        cache = DynamicCache(config=self.config)
        split = int(layout.chorus_end[0])
        if bool((layout.chorus_end == split).all()):
            # Every row's chorus block ends at `split`: prefill up to it with plain causal attention (no L x L mask),
            # prune, then run the tail over the kept slots only, which is what the compression mask would allow.
            self._prefill_chunked(
                cache,
                position_ids[..., :split],
                lambda start, end: attention_mask[:, :end],
                inputs_embeds=self._prompt_embeddings(input_ids[:, :split], pixel_values, image_grid_thw),
            )
            index, kept = _pack_left(attention_mask.bool()[:, :split] & ~hidden_span[:, :split])
            _select_slots(cache, index)
            kept_and_tail = torch.cat([kept.long(), attention_mask[:, split:].long()], 1)
            self._prefill_chunked(
                cache,
                position_ids[..., split:stop],
                lambda start, end: kept_and_tail[:, : kept.shape[1] + end],
                input_ids=input_ids[:, split:stop],
            )
            return CREMCompressedContext(
                cache=cache,
                input_ids=torch.cat([input_ids.gather(1, index), input_ids[:, split:]], 1),
                attention_mask=kept_and_tail,
                position_ids=torch.cat(
                    [position_ids.gather(2, index[None].expand(3, -1, -1)), position_ids[..., split:]], 2
                ),
            )
        # Rows end their chorus blocks at different slots: prefill under the compression mask (built chunk by chunk,
        # never whole), then prune.
        self._prefill_chunked(
            cache,
            position_ids[..., :stop],
            lambda start, end: self.build_compression_mask(
                input_ids, attention_mask, flags, layout, queries=slice(start, end)
            ),
            inputs_embeds=self._prompt_embeddings(input_ids[:, :stop], pixel_values, image_grid_thw),
        )
        # The last token is kept in every row, so after packing it is the last slot of every row.
        index, kept = _pack_left(attention_mask.bool() & ~hidden_span)
        _select_slots(cache, index if prefill_last else index[:, :-1])
        return CREMCompressedContext(
            cache=cache,
            input_ids=input_ids.gather(1, index),
            attention_mask=kept.long(),
            position_ids=position_ids.gather(2, index[None].expand(3, -1, -1)),
        )

    def _prompt_embeddings(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
    ) -> torch.Tensor:
        """
        Input embeddings `(batch_size, length, hidden_size)` with the image features in the image-token slots, so a
        prompt can run in chunks that cut through an image.
        """
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        features = self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
        features = torch.cat(features, 0).to(embeds.device, embeds.dtype)
        return embeds.masked_scatter((input_ids == self.config.image_token_id)[..., None], features)

    def _prefill_chunked(
        self,
        cache: DynamicCache,
        position_ids: torch.LongTensor,
        mask_for: Callable[[int, int], torch.Tensor],
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> None:
        """
        Run a stretch of a prompt into `cache`, at most `prefill_chunk_size` query tokens per forward: the attention
        mask and scores are then `chunk x keys`, never `length x length`, and memory stays linear in the length.

        Args:
            cache: the cache to extend; it holds every key that comes before the stretch.
            position_ids: `(3, batch_size, length)` of the stretch.
            mask_for: `mask_for(start, end)`, the attention mask of the stretch's queries `[start, end)` over every
                key so far (the cached ones and the stretch's first `end`): a 2-D padding mask or a 4-D mask.
            input_ids: `(batch_size, length)`, or
            inputs_embeds: `(batch_size, length, hidden_size)`.
        """
        chunk = self.prefill_chunk_size
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"prefill_chunk_size must be a positive int, got {chunk!r}.")
        length = position_ids.shape[-1]
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            self.model(
                input_ids=input_ids[:, start:end] if input_ids is not None else None,
                inputs_embeds=inputs_embeds[:, start:end] if inputs_embeds is not None else None,
                attention_mask=mask_for(start, end),
                position_ids=position_ids[..., start:end],
                cache=cache,
                use_cache=True,
                return_dict=True,
            )

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
        Generate natively (no row compressed: Qwen2-VL's `generate`) or from the chorus tokens alone
        (`compress=True`).

        What differs from `Qwen2VLForConditionalGeneration.generate`:

        * The chorus ids are added to `suppress_tokens` in every mode (they are inputs, never outputs). Otherwise,
          with `compress` unset or `False`, the call and its result are exactly Qwen2-VL's: same arguments, same
          outputs, same `GenerateOutput` fields.
        * Only `inputs` and `generation_config` may be passed by position; every other argument is a keyword.
        * `compress=True` (or a bool tensor `(batch_size,)` choosing rows): the rows' prompts are prefilled under
          compression-aware attention (in chunks of `prefill_chunk_size` tokens, so memory grows linearly with the
          prompt), the KV cache is pruned to the kept prefix, the chorus block and the tail (the question), and
          decoding continues at the original MRoPE positions; the result equals a full forward under the
          compression mask. Rows whose flag is `False` keep their whole prompt (native attention) in the same call.
          Greedy, sampling, beam search, `num_return_sequences`, `output_scores`/`output_logits` and
          `return_dict_in_generate` work; `sequences` start with the caller's prompt. The prompt is prefilled before
          the generation loop, so the loop's first step runs only the prompt's last token: its
          `attentions`/`hidden_states` cover that token, over the kept slots, and the returned cache holds the kept
          slots only. Needs `input_ids` (not `inputs_embeds`), images only (no video, no `mm_encoder_outputs`),
          left padding, and no `cache` of the caller's. `max_length` counts the original prompt.
        * `context=` (from [`compress`]): answer follow-up turns from a compressed context, greedy or sampling with
          one sequence per question; the result holds the follow-up turns and the answers. `compress` is then unset
          or `True`; a row flagged `False` is refused.
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
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if context is not None:
            flags = self._compress_flags(compress, input_ids.shape[0] if input_ids is not None else 0)
            if flags is not None and not bool(flags.all()):
                raise ValueError(
                    "generate(context=...) answers from a compressed context: leave compress unset (or True)."
                )
            kwargs.pop("input_ids", None)
            return self._generate_from_context(context, input_ids, kwargs.pop("attention_mask", None), **kwargs)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        flags = self._compress_flags(compress, reference.shape[0] if reference is not None else 0)
        if flags is None or not bool(flags.any()):
            return super().generate(inputs, **kwargs)
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("generate(compress=...) needs input_ids (batch_size, sequence_length) to find the chorus.")
        for key in ("inputs_embeds", "pixel_values_videos", "mm_encoder_outputs", "cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise ValueError(f"generate(compress=...) does not take {key}: it builds the compressed cache itself.")
        kwargs.pop("input_ids", None)
        context = self.compress(
            input_ids,
            kwargs.pop("attention_mask", None),
            pixel_values=kwargs.pop("pixel_values", None),
            image_grid_thw=kwargs.pop("image_grid_thw", None),
            mm_token_type_ids=kwargs.pop("mm_token_type_ids", None),
            prefill_last=False,
            rows=None if bool(flags.all()) else flags,
        )
        generation_config = kwargs.get("generation_config", self.generation_config)
        max_length = kwargs.pop("max_length", None)
        if kwargs.get("max_new_tokens", generation_config.max_new_tokens) is None:
            # max_length counts the original prompt, which is longer than the kept slots generate() sees.
            max_length = max_length if max_length is not None else generation_config.max_length
            kwargs["max_new_tokens"] = max(max_length - input_ids.shape[1], 1)
        num_beams = kwargs.get("num_beams", generation_config.num_beams) or 1
        num_sequences = kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1
        expand = num_beams if num_beams > 1 else num_sequences
        if expand > 1:
            context.cache.batch_repeat_interleave(expand)
        outputs = super().generate(
            input_ids=context.input_ids,
            attention_mask=context.attention_mask,
            position_ids=context.position_ids,
            cache=context.cache,
            **kwargs,
        )
        return self._with_prompt(outputs, context, input_ids)

    def _with_prompt(self, outputs, context: CREMCompressedContext, prompt: torch.LongTensor):
        """Swap the kept slots generate() saw for the caller's prompt in front of the new tokens."""
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        new_tokens = sequences[:, context.input_ids.shape[1] :]
        prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
        sequences = torch.cat([prompt, new_tokens], dim=1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        return outputs

    def _generate_from_context(
        self,
        context: CREMCompressedContext,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """Answer follow-up turns `(num_questions, length)` from a compressed context (see `generate`)."""
        if input_ids is None or input_ids.ndim != 2:
            raise ValueError("generate(context=...) needs the follow-up turns as input_ids (num_questions, length).")
        if context.cache.get_seq_length() != context.input_ids.shape[1]:
            raise ValueError("The context must be fully prefilled: build it with model.compress(**inputs).")
        rows, contexts = input_ids.shape[0], context.input_ids.shape[0]
        if contexts not in (1, rows):
            raise ValueError(f"A context of batch {contexts} cannot answer {rows} questions (give 1 or {rows}).")
        attention_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("Follow-up turns must be left padded (every row ends with a real token).")
        if kwargs.get("num_beams", 1) > 1 or kwargs.get("num_return_sequences", 1) > 1:
            raise ValueError("generate(context=...) supports greedy and sampling with one sequence per question.")
        if kwargs.pop("pixel_values", None) is not None:
            raise ValueError("Follow-up turns hold no images: the image lives in the context.")
        kwargs.pop("image_grid_thw", None)
        kwargs.pop("mm_token_type_ids", None)
        # The cache is read, never written: generate() gets a copy per call, so the context serves many calls.
        cache = DynamicCache(config=self.config)
        for source, layer in zip(context.cache.layers, cache.layers, strict=True):
            repeat = rows // contexts
            layer.lazy_initialization(source.keys, source.values)
            layer.keys = source.keys.repeat_interleave(repeat, dim=0)
            layer.values = source.values.repeat_interleave(repeat, dim=0)
        expand = rows // contexts
        ctx_ids = context.input_ids.repeat_interleave(expand, dim=0)
        ctx_mask = context.attention_mask.repeat_interleave(expand, dim=0)
        ctx_positions = context.position_ids.repeat_interleave(expand, dim=1)
        # Follow-up tokens continue after the context's last position; their padding sits between the two.
        next_position = ctx_positions[..., -1:] + 1
        offsets = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        positions = torch.cat([ctx_positions, next_position + offsets[None]], dim=2)
        full_mask = torch.cat([ctx_mask, attention_mask.long()], dim=1)
        # All follow-up tokens but the last run here in chunks (linear memory for a long question); generate() runs
        # the last one itself to produce the first new token.
        cached = ctx_ids.shape[1]
        self._prefill_chunked(
            cache,
            positions[..., cached:-1],
            lambda start, end: full_mask[:, : cached + end],
            input_ids=input_ids[:, :-1],
        )
        full_ids = torch.cat([ctx_ids, input_ids], dim=1)
        outputs = super().generate(
            input_ids=full_ids, attention_mask=full_mask, position_ids=positions, cache=cache, **kwargs
        )
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        answers = torch.cat([input_ids, sequences[:, full_ids.shape[1] :]], dim=1)
        if isinstance(outputs, torch.Tensor):
            return answers
        outputs.sequences = answers
        return outputs


register_for_auto_class(CREMForEmbeddingAndGeneration)
# transformers renames Qwen2-VL's older key layout (`model.layers.*`, `visual.*`) while loading, but not for classes
# defined outside it unless their name is registered. Registering here also covers the Hub remote-code copy, so CREM
# folders in either layout load exactly on every path.
register_checkpoint_conversion_mapping(
    CREMForEmbeddingAndGeneration.__name__,
    get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration"),
    overwrite=True,
)
