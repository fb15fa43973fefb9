"""Processor of CREM: Qwen2-VL's processor plus the chorus tokens and the compression prompt.

Part of the Hub remote-code set: imports only ``torch`` and ``transformers`` (and PIL, which Qwen2-VL's
image processor needs anyway) besides the standard library, and of ``crem_hf`` only its sibling
``configuration_crem`` (relatively).

Two parts, top to bottom: images (module-level functions: [`load_rgb_image`] reads a PIL image, a path, a URL or an
array into an upright RGB image, as every reader of user images does) and the prompt ([`CREMProcessor`]: its
builders are thin, over one path that renders each sample, turns its segments into ids and its answers into labels,
and pads the batch).

The prompt (one place lays it out: the chat template, rendered by [`CREMProcessor`])::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{images}{instruction + input text}{chorus x N}{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

An embedding input stops right after the chorus block.

User content is content: every user-supplied string (input text, instruction, question, answer, conversation turn,
system prompt) is tokenised as text, so a special-token string inside it (``<|im_start|>``, ``<|chorus_3|>``,
``<|image_pad|>``...) becomes ordinary tokens and can never forge the prompt's structure. Only the chat template's
own text (turn headers, image placeholders) and the chorus block carry special tokens.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import ExifTags, Image, UnidentifiedImageError
from transformers import BatchFeature, Qwen2VLProcessor
from transformers.processing_utils import ProcessingKwargs

from .configuration_crem import (
    IGNORE_INDEX,
    TURN_END,
    TURN_START,
    merged_image_tokens,
    register_for_auto_class,
    turn_header,
)

__all__ = [
    "CREMProcessor",
    "CREMProcessorKwargs",
    "PromptSpec",
    "chorus_token_strings",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_IMAGE_INSTRUCTION",
    "load_rgb_image",
    "rgb_on_white",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
#: MMEB's wording for image candidates; the embedding instruction of an image without one.
DEFAULT_IMAGE_INSTRUCTION = "Represent the given image."
#: Template of the chorus token strings; `{}` is the slot index.
CHORUS_TOKEN_TEMPLATE = "<|chorus_{}|>"
ImageLike = Image.Image | str | os.PathLike  # or an (H, W[, C]) uint8 array

# Stand-ins for user content while the chat template renders: private-use characters around an index. The
# template never sees user text, so no user text can fake one; the rendered string is split at them.
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")
# Per-call options of the builders.
_CALL_OPTIONS = ("min_pixels", "max_pixels", "max_length", "return_tensors")


def chorus_token_strings(num_chorus_tokens: int) -> list[str]:
    """The N chorus token strings, in prompt order."""
    return [CHORUS_TOKEN_TEMPLATE.format(i) for i in range(num_chorus_tokens)]


# ---------------------------------------------------------------------------------------------------- images

#: Seconds a URL image may take to download (the default of `CREMProcessor(image_timeout=...)`).
DEFAULT_IMAGE_TIMEOUT = 10.0
# EXIF orientation -> the transpose that shows the image upright (the EXIF 2.3 table, as ImageOps uses it).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Modes `Image.reduce` takes.
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F", "CMYK", "YCbCr")
#: What transparent pixels show once an image is RGB (the model sees no alpha): white, as a page or a viewer shows them.
TRANSPARENT_BACKGROUND = (255, 255, 255)


def load_rgb_image(
    image: ImageLike,
    where: str = "image",
    *,
    max_pixels: int | None = None,
    min_side: int = 1,
    upscale_small: bool = False,
    timeout: float | None = DEFAULT_IMAGE_TIMEOUT,
) -> Image.Image:
    """
    An upright RGB PIL image from a PIL image, a file path, a URL or an `(H, W[, C])` uint8 array.

    EXIF orientation is applied; 16-bit grayscale is scaled to 8 bits (65535 -> 255); transparency (an alpha
    channel or a PNG tRNS chunk) is composited onto white ([`rgb_on_white`]). An image much larger than the image
    processor will keep (at least 4x `max_pixels` per side) is decoded at reduced size (JPEG `draft`) and
    box-reduced to about twice the kept resolution per side, so a huge file never costs its full size in float
    pixels; the image processor then resizes it as usual.

    Args:
        image: the image or where to find it.
        where: how error messages name it (e.g. `images[3]`).
        max_pixels: the pixel budget the image processor will resize it to (`None`: no reduction here).
        min_side: the smallest side in pixels to accept (the processor's: one merged image token, 28 px for
            Qwen2-VL and Qwen2.5-VL, 32 px for Qwen3-VL).
        upscale_small: upscale an image under `min_side`, keeping its aspect ratio, instead of raising.
        timeout: seconds a URL may take (`None`: no limit).
    Raises:
        ValueError: missing, unreadable or unreachable image, a file too large to decode safely (Pillow's
            decompression-bomb limit), or an image under `min_side` per side (unless `upscale_small`).
        TypeError: anything else.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            data = _download(path, where, timeout)
            image = _decode(io.BytesIO(data), where, f"image {path}", max_pixels)
        elif not os.path.isfile(path):
            raise ValueError(f"{where}: image file not found: {path}")
        else:
            image = _decode(path, where, f"image file {path}", max_pixels)
    elif hasattr(image, "__array_interface__") and not isinstance(image, Image.Image):
        if image.ndim not in (2, 3) or str(image.dtype) != "uint8":
            raise ValueError(f"{where}: an array image must be uint8 of shape (H, W) or (H, W, C).")
        image = _upright_rgb(Image.fromarray(image), max_pixels)
    elif isinstance(image, Image.Image):
        image = _upright_rgb(image, max_pixels)
    else:
        raise TypeError(f"{where}: expected a PIL image, a path, a URL or a uint8 array, got {type(image).__name__}.")
    width, height = image.size
    if min(width, height) < min_side:
        if not upscale_small:
            raise ValueError(
                f"{where} is {width}x{height} px; the image processor needs at least {min_side} px per side (one "
                "merged image token). Resize it, or build the processor with upscale_small_images=True."
            )
        scale = min_side / min(width, height)
        image = image.resize((max(min_side, round(width * scale)), max(min_side, round(height * scale))))
    return image


def _download(url: str, where: str, timeout: float | None) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "crem-hf"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:  # timeouts are OSErrors too
        raise ValueError(
            f"{where}: cannot download image {url} (image_timeout={timeout} s): {error}. Check the address, or "
            "build the processor with another image_timeout."
        ) from error


def _decode(source: str | io.BytesIO, where: str, label: str, max_pixels: int | None) -> Image.Image:
    """Open, decode (at reduced size when much larger than `max_pixels`) and make upright RGB."""
    try:
        with Image.open(source) as opened:
            factor = _reduction_factor(opened.size, max_pixels)
            if factor > 1 and opened.format == "JPEG":
                # Decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, never below the requested size.
                opened.draft(None, (opened.width // factor, opened.height // factor))
            opened.load()
            return _upright_rgb(opened, max_pixels, file_format=opened.format)
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{where}: {label} is too large to decode safely ({error}); resize it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{where}: cannot read {label}: {error}") from error


def _upright_rgb(image: Image.Image, max_pixels: int | None, file_format: str | None = None) -> Image.Image:
    """A new RGB image: 16-bit grayscale scaled to 8 bits, reduced when much larger than `max_pixels`, upright."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    file_format = file_format or image.format
    if image.mode.startswith("I;16") or (image.mode == "I" and file_format == "PNG"):
        # PIL's RGB conversion clips 16-bit values at 255 (a white image); scale 0..65535 to 0..255 instead.
        wide = image.convert("I")  # 32-bit signed, native byte order
        values = torch.frombuffer(bytearray(wide.tobytes()), dtype=torch.int32).long().clamp(0, 65535)
        image = Image.frombytes("L", wide.size, ((values * 255 + 32767) // 65535).to(torch.uint8).numpy().tobytes())
    if image.has_transparency_data:
        # Before reducing: box averages blind to alpha would mix the hidden colour of transparent pixels in.
        image = rgb_on_white(image)
    factor = _reduction_factor(image.size, max_pixels)
    if factor > 1:
        image = (image if image.mode in _REDUCIBLE_MODES else image.convert("RGB")).reduce(factor)
    if orientation not in _UPRIGHT:
        return image.convert("RGB")
    image = image.transpose(_UPRIGHT[orientation]).convert("RGB")
    # Upright now: drop the metadata that says otherwise, so loading the result again keeps it as it is.
    for key in ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"):
        image.info.pop(key, None)
    return image


def rgb_on_white(image: Image.Image) -> Image.Image:
    """
    `image` as RGB, its transparency composited onto white (`TRANSPARENT_BACKGROUND`): an alpha channel (RGBA, LA,
    PA and their premultiplied modes) or a PNG tRNS chunk (a palette image's one transparent index or per-entry
    alpha, a grayscale or RGB image's transparent colour). Each channel becomes
    `round(colour * a + 255 * (1 - a))` with `a = alpha / 255`; `convert("RGB")` would keep the colour that the
    transparent pixels happen to hold (often black). An image without transparency converts exactly as
    `image.convert("RGB")` does.

    Every path that turns a user image into RGB goes through here (the processor, the memory, the demo).
    """
    if not image.has_transparency_data:
        return image.convert("RGB")
    rgba = image.convert("RGBA")  # applies tRNS / a palette's alpha; undoes premultiplication
    composed = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
    composed.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))  # Pillow blends with exact rounding
    return composed


def _reduction_factor(size: tuple[int, int], target: int | None) -> int:
    """
    The integer factor by which an image of `size` may be shrunk before the image processor resizes it to at most
    `target` pixels: it keeps at least twice the final resolution per side (and 56 px on the short side), and is 1
    unless the image is at least 4x larger per side than it will be.
    """
    width, height = size
    if not target or width * height <= target:
        return 1
    factor = min(int(math.sqrt(width * height / target) / 2), min(width, height) // 56)
    return factor if factor >= 2 else 1


# ---------------------------------------------------------------------------------------------------- prompts


@dataclass
class _Segment:
    """A piece of a rendered prompt: template text, one user string, or the chorus block."""

    kind: str  # "structure" (the template's own text), "content" (user text) or "chorus"
    text: str = ""
    role: str = ""  # content only: "system", "input", "question", "answer" or "user"


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

    User strings (texts, instructions, questions, answers, conversation turns, the system prompt) are tokenised as
    text, separately from the chat template's own text: a special-token string in them becomes ordinary tokens, so
    the layout the model reads (chorus block, kept prefix, compressed span, labels) is always the one built here.
    Every builder takes its arguments by keyword only (`images=`, `texts=`, `instruction=`, `questions=`,
    `answers=`, `conversations=`), each a per-sample list; a bare string where a list is expected is a TypeError,
    never split into characters. (The inherited `__call__` / `apply_chat_template(tokenize=True)` are Qwen2-VL's:
    they tokenise a rendered prompt whole and give user text no such protection.)

    Args:
        image_processor: a Qwen2-VL image processor (the PIL one works without torchvision).
        tokenizer: a Qwen2 tokenizer that already holds the chorus tokens (see [`from_qwen2vl_processor`]).
        chat_template: a role-based chat template with `<|im_start|>` turns (Qwen2-VL-Instruct's); the base
            Qwen2-VL template has no turns and is refused with a clear error when a prompt is built.
        num_chorus_tokens: N, the number of chorus tokens.
        system_prompt: system message of every prompt (`None`: none, the chat template's default applies).
        image_instruction: embedding instruction for an image that comes with no instruction or text.
        max_length: longest row in tokens (image tokens included), or `None`.
        upscale_small_images: upscale images smaller than one 28 px merged patch per side instead of raising.
        image_timeout: seconds an image URL may take to download (`None`: no limit).
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
        image_timeout: float | None = DEFAULT_IMAGE_TIMEOUT,
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
        self.image_timeout = image_timeout
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

    @property
    def image_token_side(self) -> int:
        """Side in pixels of the square one merged image token covers: patch size x merge size (28 for Qwen2-VL)."""
        return self.image_processor.patch_size * self.image_processor.merge_size

    def set_image_token_range(self, min_tokens: int, max_tokens: int) -> None:
        """
        Resize every image to between `min_tokens` and `max_tokens` merged image tokens (the paper keeps 256 to
        1280), through the image processor's pixel bounds.
        """
        if not 1 <= min_tokens <= max_tokens:
            raise ValueError(f"Need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}.")
        pixels = self.image_token_side**2
        self.image_processor.size = {"shortest_edge": min_tokens * pixels, "longest_edge": max_tokens * pixels}

    def model_config_updates(self) -> dict[str, Any]:
        """The `CREMConfig` fields this processor determines (chorus ids, special-token ids, the turn header)."""
        tok = self.tokenizer
        return {
            "num_chorus_tokens": self.num_chorus_tokens,
            "chorus_token_ids": self.chorus_token_ids,
            "turn_start_token_id": tok.convert_tokens_to_ids(TURN_START),
            "turn_header_length": len(self._turn_header()) - 1,  # the tokens after the turn start
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
        }

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]

    # ------------------------------------------------------------------ images

    def load_image(
        self,
        image: ImageLike,
        where: str = "image",
        max_pixels: int | None = None,
        timeout: float | None = None,
    ) -> Image.Image:
        """
        [`load_rgb_image`] with this processor's settings: its image processor's pixel budget (or `max_pixels`), one
        merged image token's side as the smallest side, `upscale_small_images`, and `image_timeout` (or `timeout`).
        """
        return load_rgb_image(
            image,
            where,
            max_pixels=max_pixels if max_pixels is not None else self._max_pixels(),
            min_side=self.image_token_side,
            upscale_small=self.upscale_small_images,
            timeout=self.image_timeout if timeout is None else timeout,
        )

    def _max_pixels(self) -> int | None:
        size = self.image_processor.size
        value = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
        return value if value is not None else getattr(self.image_processor, "max_pixels", None)

    # ------------------------------------------------------------------ the prompt (the one place)

    @staticmethod
    def _text(value: Any, where: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {type(value).__name__}.")
        if not value.strip():
            raise ValueError(f"{where}: empty text.")
        return value

    def _render(self, spec: PromptSpec, add_generation_prompt: bool) -> list[_Segment]:
        """
        Lay one sample out with the chat template, user strings kept apart: the template renders a marker in place
        of each one, and the result is split at the markers into template text, user content and the chorus block.
        An embedding input (chorus block, no question) ends right after the chorus block.

        Raises:
            ValueError: the template drops or repeats a message's content (it has no usable turn structure).
        """
        slots: list[_Segment] = []

        def mark(segment: _Segment) -> str:
            slots.append(segment)
            return f"{_MARK_OPEN}{len(slots) - 1}{_MARK_CLOSE}"

        content: list[dict[str, str]] = [{"type": "image"} for _ in spec.images]
        if spec.input_text:
            content.append({"type": "text", "text": mark(_Segment("content", spec.input_text, "input"))})
        if spec.with_chorus:
            content.append({"type": "text", "text": mark(_Segment("chorus"))})
        if spec.question is not None:
            content.append({"type": "text", "text": mark(_Segment("content", spec.question, "question"))})
        messages: list[dict[str, Any]] = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": mark(_Segment("content", self.system_prompt, "system"))})
        messages.append({"role": "user", "content": content})
        if spec.answer is not None:
            messages.append({"role": "assistant", "content": mark(_Segment("content", spec.answer, "answer"))})
        for role, text in spec.later_turns:
            kind = "answer" if role == "assistant" else "user"
            messages.append({"role": role, "content": mark(_Segment("content", text, kind))})
        ends_with_user = messages[-1]["role"] == "user"
        rendered = self.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt and ends_with_user
        )
        parts = _MARKER.split(rendered)
        seen = [int(index) for index in parts[1::2]]
        wrong = [slots[i].role or slots[i].kind for i in range(len(slots)) if seen.count(i) != 1]
        stray = any(_MARK_OPEN in part or _MARK_CLOSE in part for part in parts[::2])
        if wrong or stray:
            what = ", ".join(wrong) or "a mangled placeholder"
            raise ValueError(
                f"The chat template does not render each message's content exactly once ({what}): CREM needs a "
                f"role-based chat template with {TURN_START} turns, such as Qwen2-VL-Instruct's. The base Qwen2-VL "
                "template has no turn structure; pass chat_template=... (e.g. the -Instruct template) when building "
                "the processor."
            )
        segments = []
        for k, part in enumerate(parts):
            if k % 2:
                segments.append(slots[int(part)])
            elif part:
                segments.append(_Segment("structure", part))
        if spec.with_chorus and spec.question is None:
            chorus = next(k for k, segment in enumerate(segments) if segment.kind == "chorus")
            segments = segments[: chorus + 1]
        return segments

    def build_prompt(self, spec: PromptSpec, add_generation_prompt: bool = False) -> str:
        """
        The prompt of one sample as text, for display (image placeholders not expanded).

        Tokenising this text is not how the processor builds inputs, and is unsafe: special-token strings inside
        user content would become control tokens. The processor's builders tokenise user content as text.
        """
        chorus = "".join(self.chorus_tokens)
        return "".join(chorus if s.kind == "chorus" else s.text for s in self._render(spec, add_generation_prompt))

    def _turn_header(self) -> list[int]:
        """`<|im_start|>user\\n` as ids, as the template's text is tokenised: what the model keeps visible of the turn
        that holds the chorus block."""
        return self.tokenizer(turn_header("user"), add_special_tokens=False)["input_ids"]

    def _token_rows(
        self, rendered: list[list[_Segment]], image_tokens: list[list[int]], max_length: int | None
    ) -> tuple[list[list[int]], list[list[int]]]:
        """
        Token ids and labels of rendered rows, one path for every builder: each row's segments with their ids
        ([`_segment_ids`]), cut to `max_length` ([`_truncated`]: the input text only), their labels
        ([`_label_row`]) and, with a chorus block, the turn header checked ([`_check_turn_header`]).

        Args:
            rendered: the segments of each row ([`_render`]).
            image_tokens: per row, the merged-token count of each of its images, in order.
            max_length: longest row in tokens, or `None`.
        Returns:
            `(rows, labels)`: per row, its token ids and one label per token.
        """
        vocabulary = self._segment_vocabulary(rendered)
        rows, labels = [], []
        for index, segments in enumerate(rendered):
            pieces = self._segment_ids(segments, vocabulary, image_tokens[index], index)
            pieces = self._truncated(pieces, index, max_length, sum(image_tokens[index]))
            labels.append(self._label_row(pieces, index))
            if any(segment.kind == "chorus" for segment, _ in pieces):
                self._check_turn_header(pieces, index)
            rows.append([token for _, ids in pieces for token in ids])
        return rows, labels

    def _segment_vocabulary(self, rendered: list[list[_Segment]]) -> dict[tuple[str, str], list[int]]:
        """
        The ids of every distinct template text and user string of a batch, keyed `(kind, text)`, each tokenised
        once: template text with its special tokens, user content as text (special-token strings split into
        ordinary tokens).
        """
        vocabulary: dict[tuple[str, str], list[int]] = {}
        for kind, as_text in (("structure", False), ("content", True)):
            texts = sorted({s.text for row in rendered for s in row if s.kind == kind})
            if texts:
                ids = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]
                vocabulary.update(zip([(kind, text) for text in texts], ids, strict=True))
        return vocabulary

    def _segment_ids(
        self,
        segments: list[_Segment],
        vocabulary: dict[tuple[str, str], list[int]],
        image_tokens: list[int],
        index: int,
    ) -> list[tuple[_Segment, list[int]]]:
        """
        Each segment of row `index` with its ids: template text with each image placeholder expanded to its image's
        merged-token count (`image_tokens`, in order), user content as text, the chorus block's ids.

        Raises:
            ValueError: the template renders more or fewer image placeholders than the row has images.
        """
        counts = iter(image_tokens)
        pieces: list[tuple[_Segment, list[int]]] = []
        for segment in segments:
            if segment.kind == "chorus":
                ids = list(self.chorus_token_ids)
            elif segment.kind == "content":
                ids = list(vocabulary["content", segment.text])
            else:
                ids = []
                for token in vocabulary["structure", segment.text]:
                    if token != self.image_token_id:
                        ids.append(token)
                        continue
                    count = next(counts, None)
                    if count is None:
                        raise ValueError(f"Sample {index}: the chat template renders more images than it got.")
                    ids += [token] * count
            pieces.append((segment, ids))
        if next(counts, None) is not None:
            raise ValueError(f"Sample {index}: the chat template renders fewer images than it got.")
        return pieces

    def _label_row(self, pieces: list[tuple[_Segment, list[int]]], index: int) -> list[int]:
        """
        The labels of row `index`, one per token: every answer's ids and the `<|im_end|>` that closes it, and
        `IGNORE_INDEX` elsewhere.

        Raises:
            ValueError: an answer the template does not close with `<|im_end|>`.
        """
        end = self.tokenizer.convert_tokens_to_ids(TURN_END)
        labels: list[int] = []
        close = False
        for segment, ids in pieces:
            supervised = segment.kind == "content" and segment.role == "answer"
            if close:
                if segment.kind != "structure" or not ids or ids[0] != end:
                    raise ValueError(
                        f"Sample {index}: the chat template does not close an assistant answer with {TURN_END}; "
                        f"CREM labels each answer and the {TURN_END} after it."
                    )
                labels += [ids[0]] + [IGNORE_INDEX] * (len(ids) - 1)
            else:
                labels += ids if supervised else [IGNORE_INDEX] * len(ids)
            close = supervised
        if close:
            raise ValueError(f"Sample {index}: the prompt ends inside an assistant answer (no {TURN_END}).")
        return labels

    def _truncated(
        self, pieces: list[tuple[_Segment, list[int]]], index: int, max_length: int | None, image_tokens: int
    ) -> list[tuple[_Segment, list[int]]]:
        """Cut the input text's last tokens (never anything else) so that the row fits `max_length`."""
        length = sum(len(ids) for _, ids in pieces)
        if max_length is None or length <= max_length:
            return pieces
        excess = length - max_length
        inputs = [k for k, (segment, _) in enumerate(pieces) if segment.role == "input"]
        if not inputs or len(pieces[inputs[0]][1]) <= excess:
            raise ValueError(
                f"Sample {index} needs {length} tokens ({image_tokens} for images) but max_length is {max_length}, "
                "and cutting its input text cannot make it fit; the chorus block, the question and the answer are "
                "never truncated. Raise max_length or lower max_pixels."
            )
        k = inputs[0]
        pieces = list(pieces)
        pieces[k] = (pieces[k][0], pieces[k][1][: len(pieces[k][1]) - excess])
        return pieces

    def _check_turn_header(self, pieces: list[tuple[_Segment, list[int]]], index: int) -> None:
        """
        The model keeps the tokens up to the end of the last `<|im_start|>user\\n` before the chorus block visible
        under compression; check that this header is the template's own, in front of the images and text.
        """
        ids, from_template = [], []
        for segment, piece in pieces:
            if segment.kind == "chorus":
                break
            ids += piece
            from_template += [segment.kind == "structure"] * len(piece)
        header = self._turn_header()
        starts = [k for k, token in enumerate(ids) if token == header[0] and from_template[k]]
        found = starts and ids[starts[-1] : starts[-1] + len(header)] == header
        if not found or not all(from_template[starts[-1] : starts[-1] + len(header)]):
            raise ValueError(
                f"Sample {index}: the chat template does not open the turn that holds the chorus block with "
                f"{turn_header('user')!r}, so the model cannot locate the kept prefix: CREM needs a role-based chat "
                f"template with {TURN_START} turns, such as Qwen2-VL-Instruct's."
            )

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown processor options {unknown}; the builders take {list(_CALL_OPTIONS)}.")
        options = {
            "max_length": kwargs.get("max_length", self.max_length),
            "return_tensors": kwargs.get("return_tensors", "pt"),
            "max_pixels": kwargs.get("max_pixels"),
            "images_kwargs": self._size_kwargs(kwargs.get("min_pixels"), kwargs.get("max_pixels")),
        }
        if options["return_tensors"] not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {options['return_tensors']!r}.")
        return options

    def _size_kwargs(self, min_pixels: int | None, max_pixels: int | None) -> dict[str, Any]:
        if min_pixels is None and max_pixels is None:
            return {}
        size = dict(self.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        return {"size": size}

    def _encode(self, specs: list[PromptSpec], add_generation_prompt: bool, with_labels: bool, options) -> BatchFeature:
        """
        Token rows of `specs`, left padded, with the images: `input_ids`, `attention_mask`, `mm_token_type_ids`
        `(batch_size, sequence_length)`, and with images `pixel_values`, `image_grid_thw`; with `with_labels`,
        `labels` on every answer and its `<|im_end|>`.
        """
        rendered = [self._render(spec, add_generation_prompt) for spec in specs]
        images = [image for spec in specs for image in spec.images]
        image_inputs: dict[str, Any] = {}
        image_tokens: list[list[int]] = [[] for _ in specs]
        if images:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt", **options["images_kwargs"]))
            merged = merged_image_tokens(image_inputs["image_grid_thw"], self.image_processor.merge_size).tolist()
            counts = iter(merged)
            image_tokens = [[next(counts) for _ in spec.images] for spec in specs]
        rows, labels = self._token_rows(rendered, image_tokens, options["max_length"])
        data = self._left_padded(rows, labels if with_labels else None)
        data["mm_token_type_ids"] = (data["input_ids"] == self.image_token_id).long()
        data.update(image_inputs)
        return BatchFeature(data=data, tensor_type=None if options["return_tensors"] == "pt" else "np")

    def _left_padded(self, rows: list[list[int]], labels: list[list[int]] | None) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (Qwen's is <|endoftext|>).")
        width = max(len(row) for row in rows)
        data = {
            "input_ids": torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows]),
        }
        if labels is not None:
            data["labels"] = torch.tensor([[IGNORE_INDEX] * (width - len(row)) + row for row in labels])
        return data

    # ------------------------------------------------------------------ public builders

    def process_embedding_inputs(
        self,
        *,
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
            **kwargs: per-call options `min_pixels`, `max_pixels`, `max_length` and `return_tensors` (`"pt"`).
        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `mm_token_type_ids` `(batch_size, sequence_length)`
            and, with images, `pixel_values` `(num_patches, patch_dim)` and `image_grid_thw` `(num_images, 3)`.
        Raises:
            TypeError: a bare string or image where a per-sample list is expected.
        """
        options = self._options(kwargs)
        samples = self.embedding_samples(images=images, texts=texts, instruction=instruction)
        specs = [
            self._input_spec(image, text, inst, i, options["max_pixels"])
            for i, (image, text, inst) in enumerate(samples)
        ]
        return self._encode(specs, add_generation_prompt=False, with_labels=False, options=options)

    def embedding_samples(
        self,
        *,
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        instruction: str | Sequence[str | None] | None = None,
    ) -> list[tuple[ImageLike | None, str | None, str | None]]:
        """
        The `(image, text, instruction)` of each sample of [`process_embedding_inputs`], checked as it checks them
        but without loading any image. `crem_hf.encode` checks a whole corpus with it before cutting it into
        batches, so that an error names the input's place in the corpus.

        Raises:
            TypeError: a bare string or image where a per-sample list is expected, or a text that is not a string.
            ValueError: lists of different lengths, an empty text, or a sample with nothing to embed.
        """
        images, texts = self._aligned(images, texts)
        instructions = self._per_sample(instruction, len(texts), "instruction")
        samples = []
        for i, (image, text, inst) in enumerate(zip(images, texts, instructions, strict=True)):
            text = self._text(text, f"texts[{i}]", optional=True)
            inst = self._text(inst, f"instruction[{i}]", optional=True)
            if image is None and text is None and inst is None:
                raise ValueError(f"Sample {i} has neither an image nor text to embed.")
            samples.append((image, text, inst))
        return samples

    def process_generation_inputs(
        self,
        *,
        questions: Sequence[str],
        images: Sequence[ImageLike | None] | None = None,
        texts: Sequence[str | None] | None = None,
        instruction: str | Sequence[str | None] | None = None,
        answers: Sequence[str] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Generation inputs: `[image] {instruction} {text} <chorus x N> {question}`, then the assistant header (for
        `generate`, native or compressed) or the answer with `labels` on the answer tokens only (training).

        Args:
            questions: the generation instruction of each sample (after the chorus block), a list.
            images, texts, instruction: the compressed input, as in [`process_embedding_inputs`].
            answers: one answer per sample for training; adds `labels` `(batch_size, sequence_length)`.
            **kwargs: per-call options, as in [`process_embedding_inputs`].
        Raises:
            TypeError: a bare string where a per-sample list is expected (`questions="Why?"`).
        """
        options = self._options(kwargs)
        questions = [self._text(q, f"questions[{i}]") for i, q in enumerate(self._rows(questions, "questions"))]
        images, texts = self._aligned(images, texts, len(questions))
        instructions = self._per_sample(instruction, len(questions), "instruction")
        if answers is not None:
            answers = self._rows(answers, "answers")
            if len(answers) != len(questions):
                raise ValueError(f"Got {len(answers)} answers for {len(questions)} questions.")
        specs = []
        for i, (image, text, inst, question) in enumerate(zip(images, texts, instructions, questions, strict=True)):
            spec = self._input_spec(image, text, inst, i, options["max_pixels"])
            spec.question = question
            if answers is not None:
                spec.answer = self._text(answers[i], f"answers[{i}]")
            specs.append(spec)
        return self._encode(
            specs, add_generation_prompt=answers is None, with_labels=answers is not None, options=options
        )

    def process_followups(self, *, questions: Sequence[str], **kwargs) -> BatchFeature:
        """
        Follow-up turns for a compressed context (`model.compress` of embedding inputs): each question exactly as it
        would follow the chorus block in a generation prompt, then the assistant header.

        Args:
            questions: a list of questions (a bare string is refused with a TypeError).
            **kwargs: `return_tensors` (`"pt"`).
        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` `(num_questions, length)`, left padded.
        """
        options = self._options(kwargs)
        questions = [self._text(q, f"questions[{i}]") for i, q in enumerate(self._rows(questions, "questions"))]
        tails = []
        for question in questions:
            segments = self._render(PromptSpec(question=question), add_generation_prompt=True)
            chorus = next(k for k, segment in enumerate(segments) if segment.kind == "chorus")
            tails.append(segments[chorus + 1 :])
        rows, _ = self._token_rows(tails, [[] for _ in tails], max_length=None)
        data = self._left_padded(rows, None)
        return BatchFeature(data=data, tensor_type=None if options["return_tensors"] == "pt" else "np")

    def process_chat(
        self,
        *,
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
            conversations: a batch (list) of conversations; one conversation is `[conversation]`.
            return_labels: label every assistant turn (training); otherwise end with the assistant header.
            **kwargs: per-call options, as in [`process_embedding_inputs`].
        """
        options = self._options(kwargs)
        conversations = self._rows(conversations, "conversations")
        if conversations and isinstance(conversations[0], dict):
            raise TypeError("conversations is a batch of conversations: wrap a single conversation in a list.")
        specs = []
        for i, messages in enumerate(conversations):
            messages = self._rows(messages, f"conversations[{i}]")
            if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
                raise ValueError(f"conversations[{i}] must start with a user turn (got {messages[:1]}).")
            first_images, first_text = self.split_message_content(messages[0].get("content"), f"conversations[{i}][0]")
            turns = []
            for j, message in enumerate(messages[1:], start=1):
                role = message.get("role") if isinstance(message, dict) else None
                if role not in ("user", "assistant"):
                    raise ValueError(f"conversations[{i}][{j}]: role must be 'user' or 'assistant', got {role!r}.")
                images, text = self.split_message_content(message.get("content"), f"conversations[{i}][{j}]")
                if images:
                    raise ValueError(f"conversations[{i}][{j}]: images are supported in the first user turn only.")
                turns.append((role, text))
            if first_text is None:
                raise ValueError(f"conversations[{i}][0]: the first user turn needs a text question.")
            loaded = [
                self.load_image(img, f"conversations[{i}][0] image {k}", options["max_pixels"])
                for k, img in enumerate(first_images)
            ]
            spec = PromptSpec(images=loaded, question=first_text, with_chorus=compress_layout)
            if compress_layout and loaded:
                spec.input_text = self.image_instruction
            if turns and turns[0][0] == "assistant":
                spec.answer = turns.pop(0)[1]
            spec.later_turns = turns
            if return_labels and spec.answer is None:
                raise ValueError(f"conversations[{i}]: return_labels needs at least one assistant turn.")
            specs.append(spec)
        return self._encode(specs, add_generation_prompt=not return_labels, with_labels=return_labels, options=options)

    # ------------------------------------------------------------------ helpers

    @classmethod
    def split_message_content(cls, content: Any, where: str = "content") -> tuple[list[Any], str | None]:
        """
        The images and the text of one chat message's content: a string, or a list of parts
        `{"type": "image", "image" | "url" | "path": ...}` and `{"type": "text", "text": ...}` (the qwen-vl-utils
        and Sentence Transformers form). The one parser of message parts: `process_chat` and the Sentence
        Transformers module use it.

        Returns:
            `(images, text)`: the images in order, and the texts joined by spaces (`None` when there is none).
        Raises:
            TypeError: content that is neither a string nor a list, or a text that is not a string.
            ValueError: a part of another type, or an empty text; the message says `where`.
        """
        if isinstance(content, str):
            return [], cls._text(content, where)
        if not isinstance(content, list):
            raise TypeError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}.")
        images, texts = [], []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images.append(part.get("image", part.get("url", part.get("path"))))
            elif kind == "text":
                texts.append(cls._text(part.get("text"), f"{where} part {k}"))
            else:
                raise ValueError(f"{where} part {k}: expected a {{'type': 'image' | 'text'}} dict, got {part!r}.")
        return images, " ".join(texts) if texts else None

    def _input_spec(
        self,
        image: ImageLike | None,
        text: str | None,
        instruction: str | None,
        index: int,
        max_pixels: int | None = None,
    ) -> PromptSpec:
        """The compressed input of one sample (an embedding input, or a generation input before its question)."""
        text = self._text(text, f"texts[{index}]", optional=True)
        instruction = self._text(instruction, f"instruction[{index}]", optional=True)
        loaded = [self.load_image(image, f"images[{index}]", max_pixels)] if image is not None else []
        if loaded and instruction is None and text is None:
            instruction = self.image_instruction
        input_text = " ".join(part for part in (instruction, text) if part)
        return PromptSpec(images=loaded, input_text=input_text)

    @staticmethod
    def _rows(value: Any, name: str) -> list:
        """`value` as a per-sample list; a bare string (or bytes, dict, image) is refused, never split up."""
        if isinstance(value, (str, bytes, dict, Image.Image)) or hasattr(value, "__array_interface__"):
            raise TypeError(
                f"{name} takes one entry per sample, got a single {type(value).__name__}: wrap a single sample in a "
                f"list, e.g. {name}=[...]."
            )
        try:
            return list(value)
        except TypeError:
            raise TypeError(f"{name} must be a list with one entry per sample, got {type(value).__name__}.") from None

    @classmethod
    def _aligned(cls, images, texts, size: int | None = None) -> tuple[list, list]:
        if images is None and texts is None and size is None:
            raise ValueError("Give images, texts or both.")
        if isinstance(texts, str) or isinstance(images, (str, Image.Image)) or hasattr(images, "__array_interface__"):
            raise TypeError("images and texts are per-sample lists; wrap a single input in a list.")
        images = cls._rows(images, "images") if images is not None else None
        texts = cls._rows(texts, "texts") if texts is not None else None
        size = size if size is not None else len(images if images is not None else texts)
        images = images if images is not None else [None] * size
        texts = texts if texts is not None else [None] * size
        if len(images) != size or len(texts) != size:
            raise ValueError(f"images ({len(images)}), texts ({len(texts)}) and the batch ({size}) differ in length.")
        return images, texts

    @classmethod
    def _per_sample(cls, value, size: int, name: str) -> list:
        if value is None or isinstance(value, str):
            return [value] * size  # one instruction for every sample (documented)
        value = cls._rows(value, name)
        if len(value) != size:
            raise ValueError(f"{name} has {len(value)} entries for {size} samples.")
        return value


register_for_auto_class(CREMProcessor)
