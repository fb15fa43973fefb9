"""Sentence Transformers module for CREM (loaded with ``SentenceTransformer(path, trust_remote_code=True)``).

Shipped as ``custom_st.py`` in exported Hub folders (see ``crem_hf.hub``); needs sentence-transformers >= 6.

Wraps ``AutoModel`` + ``AutoProcessor`` (both remote code from the same folder) and calls
``model.get_embedding(**processor.process_embedding_inputs(images=..., texts=..., instruction=...))``: what
``crem_hf.encode`` does, cut where Sentence Transformers wants it (``preprocess``: the processor; ``forward``:
``get_embedding``), since Sentence Transformers batches, sorts and reports progress itself. It imports nothing of
``crem_hf``: the file ships alone, next to the remote code.

Accepted inputs, one vector each: ``str`` (text, or an image path/URL as Sentence Transformers classifies it),
``PIL.Image`` / ``(H, W, C)`` uint8 array (image), ``{"text": ..., "image": ...}`` (either key optional), and a
chat message / list of messages whose content holds at most one image and some text. Texts, images and
pairs may be mixed in one batch. The encode ``prompt`` (or ``prompt_name``) becomes CREM's embedding instruction.

Matryoshka sizes: ``encode(..., dim=d)`` is ``get_embedding(dim=d)`` (unit vectors; a size the model was not trained
for is refused by name). Sentence Transformers' own ``truncate_dim`` cuts this module's unit vector after it runs
(and normalises again only with ``normalize_embeddings=True``): with that flag it gives the same vectors as
``get_embedding(dim=d)``, and its cosine scores are the same either way; it does not check ``d``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from sentence_transformers.base.modality import infer_modality
from sentence_transformers.base.modules import InputModule
from transformers import AutoConfig, AutoModel, AutoProcessor


class CREMSentenceEmbedding(InputModule):
    # NOT "config.json": this module is saved in the folder root, next to the transformers config.json.
    config_file_name = "crem_sentence_config.json"
    # encode() keywords passed on to forward (Sentence Transformers routes them by this attribute).
    forward_kwargs = {"dim"}
    config_keys = ["instruction", "processing_kwargs"]
    save_in_root = True

    def __init__(
        self,
        model_name_or_path: str | None = None,
        instruction: str | None = None,
        processing_kwargs: dict[str, Any] | None = None,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        model: torch.nn.Module | None = None,
        processor: Any = None,
    ) -> None:
        super().__init__()
        self.instruction = instruction  # default instruction when encode() gets no prompt
        self.processing_kwargs = dict(processing_kwargs or {})  # e.g. {"max_pixels": 602112}
        if model is None or processor is None:
            if model_name_or_path is None:
                raise ValueError("Give model_name_or_path, or both model and processor.")
            model_kwargs = dict(model_kwargs or {})
            processor_kwargs = dict(processor_kwargs or {})
            if config_kwargs:
                config_hub = {k: model_kwargs[k] for k in _HUB_KEYS if k in model_kwargs}
                model_kwargs["config"] = AutoConfig.from_pretrained(model_name_or_path, **config_hub, **config_kwargs)
            if model is None:
                model = AutoModel.from_pretrained(model_name_or_path, **model_kwargs)
            if processor is None:
                processor = AutoProcessor.from_pretrained(model_name_or_path, **processor_kwargs)
        self.model = model.eval()
        self.processor = processor

    # ------------------------------------------------------------------ Sentence Transformers API

    @property
    def modalities(self) -> list:
        # "message" must be listed: Sentence Transformers reports a batch mixing texts/images/pairs as "message"
        # and refuses it unless the input module supports that modality.
        return ["text", "image", ("image", "text"), "message"]

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def get_embedding_dimension(self) -> int | None:
        config = self.model.config
        for cfg in (config, getattr(config, "text_config", None)):
            if getattr(cfg, "hidden_size", None):
                return cfg.hidden_size
        return None

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        # kwargs may hold `task` (encode_query/encode_document) and `processing_kwargs` (per-call overrides).
        images, texts = [], []
        for index, sample in enumerate(inputs):
            image, text = self._split(sample, index)
            images.append(image)
            texts.append(text)
        call_kwargs = {**self.processing_kwargs, **(kwargs.get("processing_kwargs") or {})}
        batch = self.processor.process_embedding_inputs(
            images=images if any(image is not None for image in images) else None,
            texts=texts,
            instruction=prompt or self.instruction or None,
            **call_kwargs,
        )
        return dict(batch)  # flat dict of tensors: SentenceTransformer moves them to the model's device

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        device = self.model.device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        if isinstance(inputs.get("pixel_values"), torch.Tensor):
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        features["sentence_embedding"] = self.model.get_embedding(**inputs, dim=kwargs.get("dim"))
        return features

    # ------------------------------------------------------------------ save / load

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path)
        self.processor.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        config_kwargs: dict[str, Any] | None = None,
        **kwargs,  # backend, init_defaults, ... (unused)
    ) -> CREMSentenceEmbedding:
        config = cls.load_config(
            model_name_or_path,
            subfolder=subfolder,
            token=token,
            cache_folder=cache_folder,
            revision=revision,
            local_files_only=local_files_only,
        )
        config = {k: v for k, v in config.items() if k in cls.config_keys}
        hub = {
            "token": token,
            "cache_dir": cache_folder,
            "revision": revision,
            "local_files_only": local_files_only,
            "trust_remote_code": trust_remote_code,
        }
        if subfolder:
            if os.path.isdir(model_name_or_path):
                model_name_or_path = os.path.join(model_name_or_path, subfolder)
            else:
                hub["subfolder"] = subfolder
        return cls(
            model_name_or_path,
            model_kwargs={**hub, **(model_kwargs or {})},
            processor_kwargs={**hub, **(processor_kwargs or {})},
            config_kwargs=config_kwargs,
            **config,
        )

    # ------------------------------------------------------------------ input parsing

    def _split(self, sample: Any, index: int) -> tuple[Any, str | None]:
        """One input -> (image or None, text or None)."""
        modality = infer_modality(sample, supported_modalities=self.modalities)
        if modality == "text":
            if isinstance(sample, dict):
                return None, self._text(sample["text"], index)
            if not isinstance(sample, str):
                raise ValueError(f"inputs[{index}]: text pairs are not supported, embed each text separately.")
            return None, sample
        if modality == "image":
            if isinstance(sample, dict):
                sample = sample["image"]
            return self._image(sample, index), None
        if modality == ("image", "text"):
            return self._image(sample["image"], index), self._text(sample["text"], index)
        if modality == "message":
            return self._from_messages(sample, index)
        raise ValueError(f"inputs[{index}]: modality {modality!r} is not supported by CREM (text and image only).")

    @staticmethod
    def _image(image: Any, index: int) -> Any:
        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise ValueError(f"inputs[{index}]: CREM embeds one image per input, got {len(image)}.")
            image = image[0]
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        return image  # PIL image, path/URL or (H, W[, C]) uint8 array: the processor loads it

    @staticmethod
    def _text(text: Any, index: int) -> str:
        if isinstance(text, (list, tuple)):
            text = " ".join(text)
        if not isinstance(text, str):
            raise ValueError(f"inputs[{index}]: text must be a string, got {type(text).__name__}.")
        return text

    def _from_messages(self, messages: Any, index: int) -> tuple[Any, str | None]:
        messages = [messages] if isinstance(messages, dict) else list(messages)
        images, texts = [], []
        for k, message in enumerate(messages):
            if message.get("role", "user") != "user":
                raise ValueError(f"inputs[{index}]: only user messages can be embedded.")
            # The processor's parser (remote code of the same folder): one reading of message parts.
            found, text = self.processor.split_message_content(message["content"], f"inputs[{index}] message {k}")
            images += found
            texts += [text] if text is not None else []
        if len(images) > 1:
            raise ValueError(f"inputs[{index}]: CREM embeds one image per input, got {len(images)}.")
        return (self._image(images[0], index) if images else None), (" ".join(texts) or None)


# Hub keys shared by AutoConfig/AutoModel/AutoProcessor.from_pretrained.
_HUB_KEYS = ("token", "cache_dir", "revision", "local_files_only", "trust_remote_code", "subfolder")
