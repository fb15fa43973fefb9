"""Configuration of CREM (Compression-driven Representation Enhanced Model) on Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Part of the Hub remote-code set: imports only ``torch`` and ``transformers``. It also owns what the set's three files
share: the Auto-class lists (one per backbone), the label value that carries no loss, the count of merged image
tokens and the turn header of the chat templates CREM takes.

Each backbone has its own CREM config class (a subclass of that backbone's config, with a `model_type` of its own),
and all of them carry the same CREM fields and checks, from one dataclass mixin ([`CREMConfigMixin`]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

__all__ = [
    "AUTO_CLASSES",
    "BACKBONE_AUTO_CLASSES",
    "CREMConfig",
    "CREMConfigMixin",
    "CREMQwen2_5_VLConfig",
    "CREMQwen3VLConfig",
    "IGNORE_INDEX",
    "POOLING_MODES",
    "REMOTE_CODE_AUTO_MAP",
    "TURN_END",
    "TURN_START",
    "check_matryoshka_dims",
    "merged_image_tokens",
    "register_for_auto_class",
    "turn_header",
]


def _auto_classes(config: str, model: str) -> dict[str, str]:
    return {
        "AutoConfig": f"configuration_crem.{config}",
        "AutoModel": f"modeling_crem.{model}",
        "AutoModelForImageTextToText": f"modeling_crem.{model}",
        "AutoProcessor": "processing_crem.CREMProcessor",
    }


#: Per CREM `model_type`, every Auto class CREM serves, with its class in the remote-code set (`module.Class`): the
#: one list that a saved folder's `auto_map`, each class's `register_for_auto_class` and `crem_hf`'s `Auto*.register`
#: calls read. One processor class serves every backbone (each over its backbone's image processor and template).
BACKBONE_AUTO_CLASSES = {
    "crem": _auto_classes("CREMConfig", "CREMForEmbeddingAndGeneration"),
    "crem_qwen2_5_vl": _auto_classes("CREMQwen2_5_VLConfig", "CREMQwen2_5_VLForEmbeddingAndGeneration"),
    "crem_qwen3_vl": _auto_classes("CREMQwen3VLConfig", "CREMQwen3VLForEmbeddingAndGeneration"),
}
#: The Qwen2-VL classes (the design card's).
AUTO_CLASSES = BACKBONE_AUTO_CLASSES["crem"]


def remote_code_auto_map(model_type: str) -> dict[str, str]:
    """The entries a saved `config.json` of this CREM `model_type` names (the processor's go elsewhere)."""
    return {auto: target for auto, target in BACKBONE_AUTO_CLASSES[model_type].items() if auto != "AutoProcessor"}


#: The entries a saved Qwen2-VL CREM `config.json` names (the processor's goes into `processor_config.json`).
REMOTE_CODE_AUTO_MAP = remote_code_auto_map("crem")
#: Label value that carries no LM loss (the convention of `torch.nn.CrossEntropyLoss` and the HF Trainer).
IGNORE_INDEX = -100
#: What opens and closes every turn of the chat templates CREM takes (Qwen's: `<|im_start|>{role}\n ... <|im_end|>\n`).
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"


def turn_header(role: str) -> str:
    """
    The header that opens a `role` turn: `<|im_start|>{role}\\n`. Under compression the model keeps the header of the
    user turn that holds the chorus block visible: the processor writes its ids into the config (`turn_start_token_id`,
    `turn_header_length`, which the model reads) and checks every prompt against it, and `load_crem` refuses a chat
    template that does not open its turns with it.
    """
    return f"{TURN_START}{role}\n"


#: How the chorus block's last hidden states become one embedding.
POOLING_MODES = ("mean", "last")
#: The token that names the full embedding (the hidden size) in a list of Matryoshka dims.
FULL_DIM = "full"


def check_matryoshka_dims(dims: Any, hidden_size: int, what: str = "matryoshka_dims") -> list[int]:
    """
    `dims` as a list of ints: each a positive integer (or `"full"`, the hidden size, last only), at most
    `hidden_size`, strictly increasing. A ValueError naming `what` and the first bad dim otherwise.
    """
    if isinstance(dims, (str, int)) or not hasattr(dims, "__iter__"):
        raise ValueError(f"{what} must be a list of dims, got {dims!r}.")
    dims = list(dims)
    if not dims:
        raise ValueError(f"{what} must name at least one dim (or be None: the full embedding only).")
    resolved = []
    for position, dim in enumerate(dims):
        if dim == FULL_DIM:
            if position != len(dims) - 1:
                raise ValueError(
                    f"{what}: {FULL_DIM!r} (the hidden size {hidden_size}) must be the last dim, got {dims}."
                )
            dim = hidden_size
        elif isinstance(dim, str) and dim.strip().isdigit():
            dim = int(dim)
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise ValueError(f"{what}: dim {dim!r} is not a positive integer or {FULL_DIM!r}.")
        if dim <= 0:
            raise ValueError(f"{what}: dim {dim} must be > 0.")
        if dim > hidden_size:
            raise ValueError(f"{what}: dim {dim} is larger than the hidden size {hidden_size}.")
        if resolved and dim <= resolved[-1]:
            raise ValueError(f"{what}: dims must be strictly increasing, got {dim} after {resolved[-1]} in {dims}.")
        resolved.append(dim)
    return resolved


@dataclass(repr=False, kw_only=True)
class CREMConfigMixin:
    r"""
    The CREM fields and their checks, shared by every backbone's CREM config (a dataclass mixin: transformers
    configs are dataclasses, so these fields join each subclass's own).

    Args:
        num_chorus_tokens (`int`, *optional*, defaults to 16):
            Number N of learnable chorus tokens. They sit after the image and the embedding instruction and form
            the bottleneck that both the embedding and compressed generation read from.
        chorus_token_ids (`list[int]`, *optional*):
            Vocabulary ids of the N chorus tokens, in prompt order. Set when the model is built from a processor
            (see `CREMForEmbeddingAndGeneration.from_qwen2vl`); required by `get_embedding` and compressed
            generation. Never an image, video or vision id.
        pooling (`str`, *optional*, defaults to `"mean"`):
            `"mean"` averages the final (normed) states of the N chorus tokens (the paper's choice); `"last"` takes
            the state of the last chorus token (an ablation).
        normalize_embeddings (`bool`, *optional*, defaults to `True`):
            L2-normalise the pooled embedding, so that dot products are cosine similarities.
        compression_keep_prefix (`bool`, *optional*, defaults to `True`):
            Under compression, whether tokens after the chorus block may still attend to the prefix before the turn
            that holds the chorus block (whatever the template puts there: a system turn, or nothing) and to that
            turn's header (`<|im_start|>user\n`). The image and the input text are masked either way. With `False`,
            everything before the chorus block is masked.
        turn_start_token_id (`int`, *optional*, defaults to 151644):
            Id of `<|im_start|>`, used to find the header of the turn that holds the chorus block.
        turn_header_length (`int`, *optional*, defaults to 2):
            Number of tokens after `<|im_start|>` that form the turn header (`user`, `\n` for the Qwen tokenizer).
            Computed from the tokenizer when the model is built from a processor.
        matryoshka_dims (`list[int]`, *optional*):
            The embedding sizes the model was trained for (Matryoshka training: `--matryoshka_dims` of
            `examples/train_lora.py`), strictly increasing, each at most the hidden size. `get_embedding(dim=d)`
            accepts these and the hidden size; `None` (the default): the full embedding only.
    """

    num_chorus_tokens: int = 16
    chorus_token_ids: list[int] | None = None
    pooling: str = "mean"
    normalize_embeddings: bool = True
    compression_keep_prefix: bool = True
    turn_start_token_id: int = 151644
    turn_header_length: int = 2
    matryoshka_dims: list[int] | None = None

    def __post_init__(self, **kwargs):
        # Configs saved before the training arguments owned the contrastive temperature carry it: a training
        # setting that plays no part in the model, dropped so that it is not saved again.
        kwargs.pop("contrastive_temperature", None)
        super().__post_init__(**kwargs)
        # Saved folders name their code for every Auto class (save_pretrained merges in the registered ones).
        self.auto_map = {**remote_code_auto_map(type(self).model_type), **(getattr(self, "auto_map", None) or {})}
        if self.num_chorus_tokens < 1:
            raise ValueError(f"num_chorus_tokens must be >= 1, got {self.num_chorus_tokens}.")
        if self.chorus_token_ids is not None:
            self.chorus_token_ids = [int(i) for i in self.chorus_token_ids]
            if len(self.chorus_token_ids) != self.num_chorus_tokens:
                raise ValueError(
                    f"chorus_token_ids has {len(self.chorus_token_ids)} ids but num_chorus_tokens is "
                    f"{self.num_chorus_tokens}."
                )
            if len(set(self.chorus_token_ids)) != len(self.chorus_token_ids):
                raise ValueError(f"chorus_token_ids must be distinct, got {self.chorus_token_ids}.")
        structure = {self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id}
        clash = sorted(set(self.chorus_token_ids or ()) & structure)
        if clash:
            # Image tokens receive image features (and DeepStack features on Qwen3-VL): a chorus id among them would
            # be overwritten by the vision tower.
            raise ValueError(f"chorus_token_ids {clash} are image/video/vision token ids of the backbone.")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.pooling!r}.")
        if self.turn_header_length < 0:
            raise ValueError(f"turn_header_length must be >= 0, got {self.turn_header_length}.")
        if self.matryoshka_dims is not None:
            self.matryoshka_dims = check_matryoshka_dims(self.matryoshka_dims, self.text_config.hidden_size)

    def check_embedding_dim(self, dim: int | None) -> int | None:
        """
        `dim` if `get_embedding` may truncate to it: `None` (the full embedding), the hidden size, or one of the
        trained `matryoshka_dims`; else a ValueError naming it (a prefix the model was not trained for is not an
        embedding of the model).
        """
        if dim is None:
            return None
        hidden_size = self.text_config.hidden_size
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive integer (or None for the full {hidden_size}), got {dim!r}.")
        if dim > hidden_size:
            raise ValueError(f"dim {dim} is larger than the hidden size {hidden_size}.")
        if dim != hidden_size and dim not in (self.matryoshka_dims or ()):
            trained = (
                f"trained for {self.matryoshka_dims}" if self.matryoshka_dims else "not trained with Matryoshka dims"
            )
            raise ValueError(
                f"dim {dim} is not an embedding size this model was trained for ({trained}; the full {hidden_size} "
                "is always allowed)."
            )
        return dim


class CREMConfig(CREMConfigMixin, Qwen2VLConfig):
    r"""
    Configuration of [`CREMForEmbeddingAndGeneration`]: a Qwen2-VL configuration plus the chorus tokens, the
    embedding read-out and the compression-aware attention options (see [`CREMConfigMixin`] for those fields).

    Every Qwen2-VL field (`text_config`, `vision_config`, `image_token_id`, ...) keeps its meaning.

    Example:

    ```python
    >>> from crem_hf import CREMConfig, CREMForEmbeddingAndGeneration
    >>> config = CREMConfig(num_chorus_tokens=16, chorus_token_ids=list(range(151657, 151673)))
    >>> model = CREMForEmbeddingAndGeneration(config)  # random weights, Qwen2-VL-7B sized
    ```
    """

    model_type = "crem"


class CREMQwen2_5_VLConfig(CREMConfigMixin, Qwen2_5_VLConfig):  # noqa: N801 (transformers spells it so)
    r"""
    Configuration of [`CREMQwen2_5_VLForEmbeddingAndGeneration`]: a Qwen2.5-VL configuration plus the CREM fields of
    [`CREMConfigMixin`]. Every Qwen2.5-VL field keeps its meaning.
    """

    model_type = "crem_qwen2_5_vl"


class CREMQwen3VLConfig(CREMConfigMixin, Qwen3VLConfig):
    r"""
    Configuration of [`CREMQwen3VLForEmbeddingAndGeneration`]: a Qwen3-VL (dense) configuration plus the CREM fields
    of [`CREMConfigMixin`]. Every Qwen3-VL field keeps its meaning (`deepstack_visual_indexes`, interleaved MRoPE).
    """

    model_type = "crem_qwen3_vl"


def merged_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """
    `(num_images,)` image tokens each image takes in `input_ids`: its patches `(t, h, w)` of `image_grid_thw`
    `(num_images, 3)`, merged `merge_size x merge_size` into one token (2 x 2 for Qwen2-VL).
    """
    return image_grid_thw.prod(-1) // merge_size**2


def register_for_auto_class(cls: type) -> None:
    """
    Mark `cls` with its first Auto class in `AUTO_CLASSES`, so that `save_pretrained` copies its file into the
    folder and names it in `auto_map`.
    """
    auto = next(
        auto
        for classes in BACKBONE_AUTO_CLASSES.values()
        for auto, target in classes.items()
        if target.rsplit(".", 1)[1] == cls.__name__
    )
    cls.register_for_auto_class(auto)


for _config_class in (CREMConfig, CREMQwen2_5_VLConfig, CREMQwen3VLConfig):
    register_for_auto_class(_config_class)
