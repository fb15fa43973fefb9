"""Processor of CREM: Qwen2-VL's processor plus the chorus tokens and the compression prompt.

Part of the Hub remote-code set: imports only ``torch`` and ``transformers`` (and PIL, which Qwen2-VL's image
processor needs anyway), nothing else of ``crem_hf``.

The prompt (one place builds it: [`CREMProcessor.build_prompt`])::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{images}{instruction + input text}{chorus x N}{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

An embedding input stops right after the chorus block.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, Qwen2VLProcessor
from transformers.image_utils import load_image
from transformers.processing_utils import ProcessingKwargs

__all__ = [
    "CREMProcessor",
    "CREMProcessorKwargs",
    "PromptSpec",
    "chorus_token_strings",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_IMAGE_INSTRUCTION",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: MMEB's wording for image candidates; the embedding instruction of an image without one.
DEFAULT_IMAGE_INSTRUCTION = "Represent the given image."
#: Template of the chorus token strings; `{}` is the slot index.
CHORUS_TOKEN_TEMPLATE = "<|chorus_{}|>"
IGNORE_INDEX = -100
ImageLike = Image.Image | str | os.PathLike  # or an (H, W[, C]) uint8 array


def chorus_token_strings(num_chorus_tokens: int) -> list[str]:
    """The N chorus token strings, in prompt order."""
    return [CHORUS_TOKEN_TEMPLATE.format(i) for i in range(num_chorus_tokens)]


class CREMProcessorKwargs(ProcessingKwargs, total=False):
    """Call defaults: pad to the longest row (left, set on the tokenizer) and return PyTorch tensors."""

    _defaults = {"text_kwargs": {"padding": True}, "common_kwargs": {"return_tensors": "pt"}}


@dataclass
class PromptSpec:
    """
    One sample of the compression prompt, before rendering.

    Args:
        images: the sample's images, placed first in the user turn.
        input_text: what the chorus block summarises besides the images (with the embedding instruction in front).
        question: the generation instruction after the chorus block (`None` for an embedding input).
        answer: the assistant's answer (training), or `None`.
        later_turns: further `(role, text)` turns of a conversation, after the first answer.
        with_chorus: `False` renders a plain Qwen2-VL chat prompt (no chorus block).
    """

    images: list[Image.Image] = field(default_factory=list)
    input_text: str = ""
    question: str | None = None
    answer: str | None = None
    later_turns: list[tuple[str, str]] = field(default_factory=list)
    with_chorus: bool = True


class CREMProcessor(Qwen2VLProcessor):
    r"""
    Builds CREM inputs: Qwen2-VL's image processor and tokenizer (with the N chorus tokens added) and the
    compression prompt for embedding inputs, generation inputs (with labels for training) and chat.

    Works without torchvision (no video processor). Rows are left padded, so the chorus block of embedding inputs
    sits at the same positions in every row. Truncation (`max_length`) cuts the input text, never the chorus block,
    the question or the answer.

    Args:
        image_processor: a Qwen2-VL image processor (the PIL one works without torchvision).
        tokenizer: a Qwen2 tokenizer that already holds the chorus tokens (see [`from_qwen2vl_processor`]).
        chat_template: the Qwen2-VL chat template.
        num_chorus_tokens: N, the number of chorus tokens.
        system_prompt: system message of every prompt (`None`: none, the chat template's default applies).
        image_instruction: embedding instruction for an image that comes with no instruction or text.
        max_length: longest row in tokens (image tokens included), or `None`.
        upscale_small_images: upscale images smaller than one 28 px merged patch per side instead of raising.
    """

    valid_processor_kwargs = CREMProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_chorus_tokens: int = 16,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        image_instruction: str = DEFAULT_IMAGE_INSTRUCTION,
        max_length: int | None = None,
        upscale_small_images: bool = False,
        **kwargs,
    ):
        # Qwen2VLProcessor also takes a video processor; this subclass's signature has none, so none is stored.
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )
        self.num_chorus_tokens = num_chorus_tokens
        self.system_prompt = system_prompt
        self.image_instruction = image_instruction
        self.max_length = max_length
        self.upscale_small_images = upscale_small_images
        vocabulary = tokenizer.get_vocab()  # one copy: a real vocabulary has 151k entries
        missing = [t for t in self.chorus_tokens if t not in vocabulary]
        if missing:
            raise ValueError(
                f"The tokenizer lacks the chorus tokens {missing[:3]}...; build the processor with "
                "CREMProcessor.from_qwen2vl_processor(processor, num_chorus_tokens)."
            )
        tokenizer.padding_side = "left"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_qwen2vl_processor(cls, processor, num_chorus_tokens: int = 16, **kwargs) -> CREMProcessor:
        """
        A CREM processor from a Qwen2-VL processor: copies its tokenizer and adds the N chorus tokens to it as
        special tokens (their ids follow the existing vocabulary).
        """
        tokenizer = copy.deepcopy(processor.tokenizer)
        tokenizer.add_special_tokens(
            {"additional_special_tokens": chorus_token_strings(num_chorus_tokens)},
            replace_extra_special_tokens=False,
        )
        return cls(
            image_processor=processor.image_processor,
            tokenizer=tokenizer,
            chat_template=processor.chat_template,
            num_chorus_tokens=num_chorus_tokens,
            **kwargs,
        )

    @property
    def chorus_tokens(self) -> list[str]:
        """The chorus token strings, in prompt order."""
        return chorus_token_strings(self.num_chorus_tokens)

    @property
    def chorus_token_ids(self) -> list[int]:
        """The chorus token ids, in prompt order."""
        return self.tokenizer.convert_tokens_to_ids(self.chorus_tokens)

    def model_config_updates(self) -> dict[str, Any]:
        """The `CREMConfig` fields this processor determines (chorus ids, special-token ids, the turn header)."""
        tok = self.tokenizer
        return {
            "num_chorus_tokens": self.num_chorus_tokens,
            "chorus_token_ids": self.chorus_token_ids,
            "turn_start_token_id": tok.convert_tokens_to_ids("<|im_start|>"),
            "turn_header_length": len(tok("user\n", add_special_tokens=False)["input_ids"]),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
        }

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]

    # ------------------------------------------------------------------ inputs

    def load_image(self, image: ImageLike, where: str = "image") -> Image.Image:
        """
        An RGB PIL image from a PIL image, a file path, a URL or an `(H, W[, C])` uint8 array.

        Raises:
            ValueError: missing or unreadable file, or an image under 28 px per side (unless
                `upscale_small_images`, which upscales it keeping its aspect ratio).
            TypeError: anything else.
        """
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if path.startswith(("http://", "https://")):
                image = load_image(path)
            elif not os.path.isfile(path):
                raise ValueError(f"{where}: image file not found: {path}")
            else:
                try:
                    with Image.open(path) as opened:
                        opened.load()
                        image = opened.convert("RGB")
                except (UnidentifiedImageError, OSError, SyntaxError) as error:
                    raise ValueError(f"{where}: cannot read image file {path}: {error}") from error
        elif hasattr(image, "__array_interface__") and not isinstance(image, Image.Image):
            if image.ndim not in (2, 3) or str(image.dtype) != "uint8":
                raise ValueError(f"{where}: an array image must be uint8 of shape (H, W) or (H, W, C).")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(
                f"{where}: expected a PIL image, a path, a URL or a uint8 array, got {type(image).__name__}."
            )
        image = image.convert("RGB")
        factor = self.image_processor.patch_size * self.image_processor.merge_size
        width, height = image.size
        if min(width, height) < factor:
            if not self.upscale_small_images:
                raise ValueError(
                    f"{where} is {width}x{height} px; Qwen2-VL needs at least {factor} px per side. Resize it, or "
                    "build the processor with upscale_small_images=True."
                )
            scale = factor / min(width, height)
            image = image.resize((max(factor, round(width * scale)), max(factor, round(height * scale))))
        return image

    @staticmethod
    def _text(value: Any, where: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {type(value).__name__}.")
        if not value.strip():
            raise ValueError(f"{where}: empty text.")
        return value

    # ------------------------------------------------------------------ the prompt (the one place)

    def build_prompt(self, spec: PromptSpec, add_generation_prompt: bool = False) -> str:
        """
        Render one sample with the chat template (the only place the compression prompt is laid out).

        An embedding input (no question) ends right after the chorus block. A generation input ends with the
        assistant header when `add_generation_prompt` and there is no answer.
        """
        content: list[dict[str, str]] = [{"type": "image"} for _ in spec.images]
        if spec.input_text:
            content.append({"type": "text", "text": spec.input_text})
        chorus = "".join(self.chorus_tokens)
        if spec.with_chorus:
            content.append({"type": "text", "text": chorus})
        if spec.question is not None:
            content.append({"type": "text", "text": spec.question})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": content})
        if spec.answer is not None:
            messages.append({"role": "assistant", "content": spec.answer})
        messages += [{"role": role, "content": text} for role, text in spec.later_turns]
        ends_with_user = messages[-1]["role"] == "user"
        text = self.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt and ends_with_user
        )
        if spec.question is None and spec.with_chorus:
            text = text[: text.index(chorus) + len(chorus)]
        return text

    def _image_token_count(self, images: list[Image.Image]) -> int:
        if not images:
            return 0
        grid = self.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
        return int(grid.prod(-1).sum()) // self.image_processor.merge_size**2

    def _fit(self, spec: PromptSpec, index: int, add_generation_prompt: bool) -> str:
        """Render `spec`, cutting its input text (never anything else) until the row fits `max_length`."""
        text = self.build_prompt(spec, add_generation_prompt)
        if self.max_length is None:
            return text
        image_tokens = self._image_token_count(spec.images)
        while True:
            length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + image_tokens - len(spec.images)
            excess = length - self.max_length
            if excess <= 0:
                return text
            ids = self.tokenizer(spec.input_text, add_special_tokens=False)["input_ids"] if spec.input_text else []
            if len(ids) <= excess:
                raise ValueError(
                    f"Sample {index} needs {length} tokens ({image_tokens} for images) but max_length is "
                    f"{self.max_length}, and cutting its input text cannot make it fit; the chorus block, the "
                    "question and the answer are never truncated. Raise max_length or lower max_pixels."
                )
            spec = copy.copy(spec)
            spec.input_text = self.tokenizer.decode(ids[: len(ids) - excess])
            text = self.build_prompt(spec, add_generation_prompt)

    def _encode(
        self, specs: list[PromptSpec], add_generation_prompt: bool, answers_per_row: list[int] | None, **kwargs
    ) -> BatchFeature:
        """Tokenise the rendered rows (and images); with `answers_per_row`, add labels on that many answers a row."""
        texts = [self._fit(spec, i, add_generation_prompt) for i, spec in enumerate(specs)]
        images = [image for spec in specs for image in spec.images]
        size = self._size_kwargs(kwargs.pop("min_pixels", None), kwargs.pop("max_pixels", None))
        batch = self(images=images or None, text=texts, **size, **kwargs)
        if answers_per_row is not None:
            batch["labels"] = self._answer_labels(batch["input_ids"], answers_per_row)
        return batch

    def _size_kwargs(self, min_pixels: int | None, max_pixels: int | None) -> dict[str, Any]:
        if min_pixels is None and max_pixels is None:
            return {}
        size = dict(self.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        return {"images_kwargs": {"size": size}}

    def _answer_labels(self, input_ids: torch.Tensor, expected_turns: list[int]) -> torch.Tensor:
        """Labels: the ids of every assistant answer and its `<|im_end|>`, -100 elsewhere."""
        tok = self.tokenizer
        header = [tok.convert_tokens_to_ids("<|im_start|>")] + tok("assistant\n", add_special_tokens=False)["input_ids"]
        end = tok.convert_tokens_to_ids("<|im_end|>")
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, ids in enumerate(input_ids.tolist()):
            found, i = 0, 0
            while i <= len(ids) - len(header):
                if ids[i : i + len(header)] != header:
                    i += 1
                    continue
                start = i + len(header)
                stop = ids.index(end, start) + 1 if end in ids[start:] else len(ids)
                labels[row, start:stop] = input_ids[row, start:stop]
                found, i = found + 1, stop
            if found != expected_turns[row]:
                raise ValueError(
                    f"Sample {row}: found {found} assistant answers in the tokens, expected {expected_turns[row]} "
                    "(does an answer start with a newline that merges into the assistant header?)."
                )
        return labels

    # ------------------------------------------------------------------ public builders

    def process_embedding_inputs(
        self,
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Embedding inputs: `[image] {instruction} {text} <chorus x N>` per sample, for `get_embedding`.

        Args:
            images: one image (or `None`) per sample.
            texts: one text (or `None`) per sample; `images` and `texts` must have the same length when both given.
            instruction: embedding instruction, one for all samples or one per sample. An image with neither
                instruction nor text gets `image_instruction`.
            **kwargs: processor call options (`min_pixels`, `max_pixels`, `return_tensors`, ...).
        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `mm_token_type_ids` `(batch_size, sequence_length)`
            and, with images, `pixel_values` `(num_patches, patch_dim)` and `image_grid_thw` `(num_images, 3)`.
        """
        images, texts = self._aligned(images, texts)
        instructions = self._per_sample(instruction, len(texts), "instruction")
        specs = []
        for i, (image, text, inst) in enumerate(zip(images, texts, instructions, strict=True)):
            spec = self._input_spec(image, text, inst, i)
            specs.append(spec)
        return self._encode(specs, add_generation_prompt=False, answers_per_row=None, **kwargs)

    def process_generation_inputs(
        self,
        questions: Sequence[str],
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        answers: Sequence[str] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Generation inputs: `[image] {instruction} {text} <chorus x N> {question}`, then the assistant header (for
        `generate`, native or compressed) or the answer with `labels` on the answer tokens only (training).

        Args:
            questions: the generation instruction of each sample (after the chorus block).
            images, texts, instruction: the compressed input, as in [`process_embedding_inputs`].
            answers: one answer per sample for training; adds `labels` `(batch_size, sequence_length)`.
        """
        questions = [self._text(q, f"questions[{i}]") for i, q in enumerate(questions)]
        images, texts = self._aligned(images, texts, len(questions))
        instructions = self._per_sample(instruction, len(questions), "instruction")
        if answers is not None and len(answers) != len(questions):
            raise ValueError(f"Got {len(answers)} answers for {len(questions)} questions.")
        specs = []
        for i, (image, text, inst, question) in enumerate(zip(images, texts, instructions, questions, strict=True)):
            spec = self._input_spec(image, text, inst, i, allow_empty=True)
            spec.question = question
            if answers is not None:
                spec.answer = self._text(answers[i], f"answers[{i}]")
            specs.append(spec)
        answers_per_row = [1] * len(specs) if answers is not None else None
        return self._encode(specs, add_generation_prompt=answers is None, answers_per_row=answers_per_row, **kwargs)

    def process_followups(self, questions: Sequence[str], **kwargs) -> BatchFeature:
        """
        Follow-up turns for a compressed context (`model.compress` of embedding inputs): each question exactly as it
        would follow the chorus block in a generation prompt, then the assistant header.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `(num_questions, length)`, left padded.
        """
        tails = []
        chorus = "".join(self.chorus_tokens)
        for i, question in enumerate(questions):
            spec = PromptSpec(question=self._text(question, f"questions[{i}]"))
            text = self.build_prompt(spec, add_generation_prompt=True)
            tails.append(text[text.index(chorus) + len(chorus) :])
        return BatchFeature(dict(self.tokenizer(tails, padding=True, return_tensors="pt", **kwargs)))

    def process_chat(
        self,
        conversations: Sequence[Sequence[dict]],
        compress_layout: bool = True,
        return_labels: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """
        Chat inputs from qwen-vl-utils style messages: each conversation is a list of
        `{"role": "user" | "assistant", "content": str | [{"type": "image", "image": ...}, {"type": "text",
        "text": ...}]}`, starting with a user turn. The system message is the processor's `system_prompt`.

        With `compress_layout` (the CREM layout, for native or compressed generation) the first user turn's images
        go before the chorus block, with `image_instruction`, and its text after it, as the question. Without it
        the prompt is plain Qwen2-VL chat (no chorus block; native generation only).

        Args:
            conversations: a batch of conversations.
            return_labels: label every assistant turn (training); otherwise end with the assistant header.
        """
        specs = []
        for i, messages in enumerate(conversations):
            if not messages or messages[0].get("role") != "user":
                raise ValueError(f"conversations[{i}] must start with a user turn (got {messages[:1]}).")
            first_images, first_text = self._split_content(messages[0]["content"], f"conversations[{i}][0]")
            turns = []
            for j, message in enumerate(messages[1:], start=1):
                role = message.get("role")
                if role not in ("user", "assistant"):
                    raise ValueError(f"conversations[{i}][{j}]: role must be 'user' or 'assistant', got {role!r}.")
                images, text = self._split_content(message["content"], f"conversations[{i}][{j}]")
                if images:
                    raise ValueError(f"conversations[{i}][{j}]: images are supported in the first user turn only.")
                turns.append((role, text))
            if first_text is None:
                raise ValueError(f"conversations[{i}][0]: the first user turn needs a text question.")
            loaded = [self.load_image(img, f"conversations[{i}][0] image {k}") for k, img in enumerate(first_images)]
            spec = PromptSpec(images=loaded, question=first_text, with_chorus=compress_layout)
            if compress_layout and loaded:
                spec.input_text = self.image_instruction
            if turns and turns[0][0] == "assistant":
                spec.answer = turns.pop(0)[1]
            spec.later_turns = turns
            specs.append(spec)
        if return_labels:
            for i, spec in enumerate(specs):
                if spec.answer is None:
                    raise ValueError(f"conversations[{i}]: return_labels needs at least one assistant turn.")
        answers = [1 + sum(role == "assistant" for role, _ in s.later_turns) for s in specs] if return_labels else None
        return self._encode(specs, add_generation_prompt=not return_labels, answers_per_row=answers, **kwargs)

    # ------------------------------------------------------------------ helpers

    def _split_content(self, content: Any, where: str) -> tuple[list[Any], str | None]:
        if isinstance(content, str):
            return [], self._text(content, where)
        if not isinstance(content, list):
            raise TypeError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}.")
        images, texts = [], []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images.append(part.get("image", part.get("url", part.get("path"))))
            elif kind == "text":
                texts.append(self._text(part.get("text"), f"{where} part {k}"))
            else:
                raise ValueError(f"{where} part {k}: expected a {{'type': 'image' | 'text'}} dict, got {part!r}.")
        return images, " ".join(texts) if texts else None

    def _input_spec(
        self, image: ImageLike | None, text: str | None, instruction: str | None, index: int, allow_empty: bool = False
    ) -> PromptSpec:
        text = self._text(text, f"texts[{index}]", optional=True)
        instruction = self._text(instruction, f"instruction[{index}]", optional=True)
        loaded = [self.load_image(image, f"images[{index}]")] if image is not None else []
        if loaded and instruction is None and text is None:
            instruction = self.image_instruction
        input_text = " ".join(part for part in (instruction, text) if part)
        if not loaded and not input_text and not allow_empty:
            raise ValueError(f"Sample {index} has neither an image nor text to embed.")
        return PromptSpec(images=loaded, input_text=input_text)

    @staticmethod
    def _aligned(images, texts, size: int | None = None) -> tuple[list, list]:
        if images is None and texts is None and size is None:
            raise ValueError("Give images, texts or both.")
        if isinstance(texts, str) or isinstance(images, (str, Image.Image)) or hasattr(images, "__array_interface__"):
            raise TypeError("images and texts are per-sample lists; wrap a single input in a list.")
        size = size if size is not None else len(images if images is not None else texts)
        images = list(images) if images is not None else [None] * size
        texts = list(texts) if texts is not None else [None] * size
        if len(images) != size or len(texts) != size:
            raise ValueError(f"images ({len(images)}), texts ({len(texts)}) and the batch ({size}) differ in length.")
        return images, texts

    @staticmethod
    def _per_sample(value, size: int, name: str) -> list:
        if value is None or isinstance(value, str):
            return [value] * size
        value = list(value)
        if len(value) != size:
            raise ValueError(f"{name} has {len(value)} entries for {size} samples.")
        return value


CREMProcessor.register_for_auto_class("AutoProcessor")
