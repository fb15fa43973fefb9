"""The CREM demo: a Gradio app with three tabs.

* **Search**: a gallery memory (`crem_hf.memory`; by default the bundled held-out digit scans, or images dropped
  in) searched by a text or an image query: the top-k thumbnails with their cosine scores; pick a hit and ask a
  question, answered from its stored compressed context alone.
* **Ask**: an image and a question, answered natively (the whole prompt in the KV cache) and from the chorus tokens
  alone (`compress=True`), side by side with each one's KV slots, bytes and time.
* **Embed**: several images and texts, their cosine similarity matrix as a heat map and a table.

    crem-demo [--model outputs/main/model] [--host 127.0.0.1] [--port 7860] [--gallery digits|none|FOLDER]
              [--concurrency 2] [--queue-size 64]

Several users at once: the page's model events share one Gradio queue; at most `--concurrency` of them run at a
time, each on its own worker (a copy of the model's modules that shares its weights, a processor and a handle on
the gallery memory), and at most `--queue-size` wait; a request beyond that is refused with a "busy" message. The
gallery is one for everyone on the page: adding or clearing waits for the searches in flight.

Every bad input (an upload that is not an image or is too large, an empty gallery, an empty query) is a message in
the page; the server keeps serving. Unexpected errors are logged with their traceback on the server and named in
one line in the page, never as a stack trace.

Read top to bottom: uploads and the gallery; `CREMDemo`, the work (thread safe, no page); `DemoPage`, what each
event of the page shows (its view tuple, errors included); one function per tab that lays out the components and
wires them to `DemoPage`; `build_app`, the page; the command line.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import html
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from ..encoding import encode, similarity
from ..instructions import T2I_INSTRUCTION
from ..io import USER_ERRORS, ArgumentParser, check_model_source, positive_int, run_command
from ..processing_crem import CREMProcessor, rgb_on_white

__all__ = [
    "DEFAULT_MODEL",
    "AskResult",
    "AskView",
    "CREMDemo",
    "DemoPage",
    "EmbedView",
    "GalleryAddView",
    "SearchView",
    "StoredAnswerView",
    "UploadLimits",
    "build_app",
    "build_parser",
    "digits_gallery",
    "load_demo_model",
    "main",
    "read_upload",
]

logger = logging.getLogger(__name__)

#: Where `python -m crem_hf.demo.main` writes its trained model: the demo works right after the main job.
DEFAULT_MODEL = "outputs/main/model"
#: The embedding instruction of texts in the Embed tab: the one text queries of the memory get.
TEXT_INSTRUCTION = T2I_INSTRUCTION
#: Most items the Embed tab compares at once (the heat map stays readable, the batch small).
MAX_EMBED_ITEMS = 16
#: Most hits a search shows.
MAX_TOP_K = 20
#: Side in pixels of the thumbnails in the search results.
THUMBNAIL_SIDE = 112
#: Model events run at once by default (each on its own worker), and requests that may wait in the queue.
DEFAULT_CONCURRENCY = 2
DEFAULT_QUEUE_SIZE = 64


# ---------------------------------------------------------------------------------------------------- uploads


@dataclass(frozen=True)
class UploadLimits:
    """What an uploaded image may weigh: file bytes and decoded pixels (checked from the header, before decoding)."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"Upload limits must be positive, got {self.max_bytes} bytes, {self.max_pixels} pixels.")


def _megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:.1f} MB"


def read_upload(path: str | os.PathLike, processor: CREMProcessor, limits: UploadLimits) -> Image.Image:
    """
    An uploaded file as the upright RGB image the processor would read, checked before any decoding: its size in
    bytes, that Pillow recognises it as an image, and its pixel count (from the header).

    Raises:
        ValueError: naming the file and what was expected (an image, at most so many MB and megapixels).
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ValueError(f"The upload {name} is gone from the server; upload it again.")
    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise ValueError(f"{name} is {_megabytes(size)}; uploads may be at most {_megabytes(limits.max_bytes)}.")
    try:
        with Image.open(path) as opened:  # reads the header only
            width, height = opened.size
    except Image.DecompressionBombError as error:  # Pillow refuses the header itself: far beyond any limit
        raise ValueError(f"{name} has too many pixels to open safely ({error}).") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise ValueError(
            f"{name} is not an image Pillow can read; expected a PNG, JPEG, WebP, GIF, BMP or TIFF file."
        ) from None
    if width * height > limits.max_pixels:
        raise ValueError(
            f"{name} is {width}x{height} px ({width * height / 1e6:.1f} megapixels); images may have at most "
            f"{limits.max_pixels / 1e6:.1f} megapixels."
        )
    return processor.load_image(path, where=name)


def _upload_paths(files: Any) -> list[str]:
    """The paths of a `gr.File` value: None, a path, an object with `.name`, or a list of those."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [os.fspath(getattr(item, "name", item)) for item in files if item is not None]


# ---------------------------------------------------------------------------------------------------- the gallery


def _cache_folder() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "crem_hf")


def digits_gallery(
    folder: str | os.PathLike | None = None, limit: int | None = None, seed: int = 0
) -> list[tuple[str, str, dict]]:
    """
    The bundled held-out digit scans (`crem_hf.demo.digits`, the evaluation split) as gallery items: `(id, image
    path, {"label": "seven"})`, in the split's order. The data are written once into `folder` (default: the user's
    cache, `~/.cache/crem_hf/digits-seed{seed}`); a half-written folder is never taken for a finished one.

    Args:
        limit: keep the first `limit` scans (default: all 360).
    """
    from .digits import build_digits_data

    folder = os.fspath(folder) if folder is not None else os.path.join(_cache_folder(), f"digits-seed{seed}")
    rows_file = os.path.join(folder, "eval", "qa_single.jsonl")
    if not os.path.isfile(rows_file):
        logger.info("Writing the digit scans to %s (once)", folder)
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.incomplete-", dir=parent)
        try:
            build_digits_data(staging, seed=seed)
            try:
                os.replace(staging, folder)
            except OSError:  # another process finished first (or a stale empty folder is in the way)
                if not os.path.isfile(rows_file):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    with open(rows_file, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:limit]
    return [
        (
            os.path.splitext(os.path.basename(row["image"]))[0],
            os.path.join(folder, row["image"]),
            {"label": row["answer"]},
        )
        for row in rows
    ]


# ---------------------------------------------------------------------------------------------------- the logic


@dataclass
class AskResult:
    """One answer of the Ask tab and what it cost."""

    mode: str  # "native" or "compressed"
    answer: str
    prompt_tokens: int  # tokens of the generation prompt
    kv_slots: int  # KV cache slots the prompt occupies while answering
    kv_bytes: int  # their bytes, summed over layers, keys and values
    seconds: float


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


class _GalleryLock:
    """
    Many readers (searches, answers) or one writer (adding to or clearing the gallery). A waiting writer holds back
    new readers, so a stream of searches never starves a gallery change. Not reentrant.
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._changed:
            self._writers_waiting += 1
            self._changed.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


def share_weights(model):
    """
    A copy of `model`'s modules that shares its parameters (no weight memory): generation keeps per-call state on
    the modules (every Qwen-VL backbone's `rope_deltas`, set by one prompt's prefill and read by its decoding
    steps), so two calls on one module tree at once would mix their positions. Buffers (rotary frequencies) are
    copied; they are small.
    """
    return copy.deepcopy(model, {id(parameter): parameter for parameter in model.parameters()})


@dataclass
class _Worker:
    """What one model event runs on: its own module tree (shared weights), processor and gallery handle."""

    model: Any
    processor: CREMProcessor
    memory: Any = None


@dataclass
class CREMDemo:
    """
    What the app does, without the page: a CREM model, its processor and the gallery memory. Every method raises a
    ValueError naming the bad input; the page turns it into a message.

    Safe to call from several threads: each search, answer or comparison checks out one of `concurrency` workers
    (`share_weights` copies of the model, processor copies, their own memory handles), waiting while all are busy,
    so no call sees another's state; adding to or clearing the gallery waits for the calls in flight and runs
    alone. `memory` (on `model` itself) is for direct use outside the page's events.

    Args:
        model: a CREM model (eval mode is set).
        processor: its processor.
        workdir: where the gallery memory and uploaded gallery images live.
        limits: what an upload may weigh.
        concurrency: workers, the most model calls that run at once.
    """

    model: Any
    processor: CREMProcessor
    workdir: str
    limits: UploadLimits = field(default_factory=UploadLimits)
    memory: Any = None
    concurrency: int = DEFAULT_CONCURRENCY
    _gallery: _GalleryLock = field(default_factory=_GalleryLock, repr=False)
    _uri: str | None = None

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}.")
        self.model.eval()
        os.makedirs(os.path.join(self.workdir, "uploads"), exist_ok=True)
        self.workers = [
            _Worker(share_weights(self.model), copy.deepcopy(self.processor)) for _ in range(self.concurrency)
        ]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self.workers:
            self._idle.put(worker)

    @contextmanager
    def _worker(self) -> Iterator[_Worker]:
        """An idle worker for one call (waits while all are busy), under the gallery's read lock."""
        with self._gallery.read():
            worker = self._idle.get()
            try:
                with torch.no_grad():
                    yield worker
            finally:
                self._idle.put(worker)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ gallery

    def new_gallery(self, clear: bool = False) -> None:
        """
        Open the gallery memory: `workdir/memory` at first (kept between runs of one `workdir`: items already
        stored are not encoded again), then, on `clear`, an empty one under a new name (the old one is removed).
        """
        from ..memory import CREMMemory

        with self._gallery.write():
            old = self._uri
            uri = os.path.join(self.workdir, "memory")
            number = 1
            while old is not None and os.path.exists(uri):
                number += 1
                uri = os.path.join(self.workdir, f"memory-{number}")
            self.memory = CREMMemory.open(uri, self.model, self.processor, create=True)
            for worker in self.workers:  # idle: the write lock waits for the calls in flight
                worker.memory = CREMMemory.open(uri, worker.model, worker.processor)
            self._uri = uri
            if clear and old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def start_gallery(
        self, gallery: str | os.PathLike | Sequence[tuple[str, Any, dict]] | None, size: int | None = None
    ) -> None:
        """
        Open the gallery memory and fill it with the page's starting gallery: `"digits"` (the first `size` bundled
        held-out digit scans, default all), a folder of images (`CREMMemory.index`), `(id, image, metadata)` items,
        or `None` / `"none"` (empty).

        Raises:
            ValueError: a string that is neither 'digits', 'none' nor a folder.
        """
        self.new_gallery()
        started = time.perf_counter()
        if gallery == "digits":
            self.add_items(digits_gallery(limit=size))
        elif isinstance(gallery, (str, os.PathLike)) and gallery != "none":
            if not os.path.isdir(gallery):
                raise ValueError(f"--gallery {gallery}: expected 'digits', 'none' or a folder of images.")
            report = self.memory.index(os.fspath(gallery))
            if report.failed:
                logger.warning("%d gallery images could not be indexed: %s", report.failed, report.failures[:3])
        elif gallery is not None and gallery != "none":
            self.add_items(list(gallery))
        logger.info("Gallery: %d items indexed in %.1f s", self.gallery_size(), time.perf_counter() - started)

    def gallery_size(self) -> int:
        with self._gallery.read():
            return 0 if self.memory is None else len(self.memory)

    def add_items(self, items: Sequence[tuple[str, Any, dict]], show_progress: bool = True):
        """Add `(id, image, metadata)` items to the gallery; returns the memory's `IndexReport`."""
        if self.memory is None:
            self.new_gallery()
        ids, images, metadata = (list(column) for column in zip(*items, strict=True)) if items else ([], [], [])
        with self._gallery.write(), torch.no_grad():  # alone: the workers see the new rows when it is done
            return self.memory.add(
                ids=ids, images=images, texts=[None] * len(ids), metadata=metadata, show_progress=show_progress
            )

    def add_uploads(self, paths: Sequence[str]) -> str:
        """
        Check and add uploaded images to the gallery (kept as PNG copies under `workdir/uploads`, named after their
        file and content, so the same file added twice is one item). Returns a one-line report.
        """
        if not paths:
            raise ValueError("No images to add: drop one or more image files first.")
        items: dict[str, tuple[str, str, dict]] = {}
        for path in paths:
            image = read_upload(path, self.processor, self.limits)
            stem = os.path.splitext(os.path.basename(path))[0]
            digest = hashlib.sha256(image.tobytes()).hexdigest()[:10]
            item_id = f"{stem}-{digest}"
            if item_id in items:  # the same file twice in one drop: one item
                continue
            copy = os.path.join(self.workdir, "uploads", f"{item_id}.png")
            if not os.path.exists(copy):
                # Another user may drop the same file at once: each writes its own file, the rename is atomic.
                partial = f"{copy}.{os.getpid()}.{threading.get_ident()}.tmp"
                image.save(partial, format="PNG")
                os.replace(partial, copy)
            items[item_id] = (item_id, copy, {"label": os.path.basename(path)})
        report = self.add_items(list(items.values()), show_progress=False)
        repeated = len(paths) - len(items)
        return (
            f"Added {report.added} image(s), {report.skipped_existing + repeated} already in the gallery"
            + (f", {report.failed} failed" if report.failed else "")
            + f"; the gallery holds {self.gallery_size()} item(s)."
        )

    def search(self, text: str | None, image_path: str | None, k: int) -> list:
        """
        The top `k` gallery items for a text or an image query (one of them): a list of `MemoryHit`. `k` above the
        gallery's size shows the whole gallery.
        """
        text = (text or "").strip() or None
        if text is None and image_path is None:
            raise ValueError("Type a query or drop a query image first.")
        if text is not None and image_path is not None:
            raise ValueError("Give one query: a text or an image (clear the other).")
        if not 1 <= int(k) <= MAX_TOP_K:
            raise ValueError(f"Top-k must be between 1 and {MAX_TOP_K}, got {k}.")
        image = read_upload(image_path, self.processor, self.limits) if image_path is not None else None
        with self._worker() as worker:
            size = len(worker.memory)
            if size == 0:
                raise ValueError("The gallery is empty: add images under 'Add images to the gallery' first.")
            return worker.memory.search(text=text, image=image, k=min(int(k), size))

    def ask_stored(self, question: str, item_id: str | None, max_new_tokens: int) -> str:
        """Answer `question` about a gallery item from its stored compressed context alone."""
        question = (question or "").strip()
        if not item_id:
            raise ValueError("Pick a search result first (search, then choose one of the hits).")
        if not question:
            raise ValueError("Type a question about the picked image.")
        with self._worker() as worker:
            return worker.memory.ask(question, [item_id], max_new_tokens=int(max_new_tokens))[0]

    # ------------------------------------------------------------------ ask

    def answer(self, image_path: str | None, question: str, max_new_tokens: int) -> list[AskResult]:
        """
        Answer `question` about the image natively and compressed (greedy): `[native, compressed]`.

        KV slots are the prompt's share of the cache `generate` returns: the cache holds the prompt's slots and
        every new token but the last, so `kv_slots = cache length - (new tokens - 1)`; bytes are in proportion.
        """
        question = (question or "").strip()
        if image_path is None:
            raise ValueError("Drop an image to ask about first.")
        if not question:
            raise ValueError("Type a question about the image.")
        image = read_upload(image_path, self.processor, self.limits)
        results = []
        with self._worker() as worker:
            inputs = worker.processor.process_generation_inputs(questions=[question], images=[image]).to(self.device)
            prompt = inputs["input_ids"].shape[1]
            for mode in ("native", "compressed"):
                started = time.perf_counter()
                output = worker.model.generate(
                    **inputs,
                    compress=mode == "compressed",
                    max_new_tokens=int(max_new_tokens),
                    do_sample=False,
                    return_dict_in_generate=True,
                )
                seconds = time.perf_counter() - started
                new = output.sequences.shape[1] - prompt
                held = output.cache.get_seq_length()
                slots = held - (new - 1)
                answer = worker.processor.tokenizer.decode(output.sequences[0, prompt:], skip_special_tokens=True)
                results.append(
                    AskResult(mode, answer.strip(), prompt, slots, _cache_bytes(output.cache) * slots // held, seconds)
                )
        return results

    # ------------------------------------------------------------------ embed

    def similarity(
        self, image_paths: Sequence[str], texts: str | Sequence[str], instruction: str | None = TEXT_INSTRUCTION
    ) -> tuple[list[str], torch.Tensor]:
        """
        Labels and the cosine similarity matrix `(n, n)` of the images (first) and texts (one per line of `texts`;
        empty lines are skipped). Texts get `instruction`, images the processor's image instruction.
        """
        lines = texts.splitlines() if isinstance(texts, str) else list(texts)
        lines = [line.strip() for line in lines if line.strip()]
        count = len(image_paths) + len(lines)
        if count < 2:
            raise ValueError(f"Give at least two items to compare (images and/or lines of text); got {count}.")
        if count > MAX_EMBED_ITEMS:
            raise ValueError(f"At most {MAX_EMBED_ITEMS} items can be compared at once; got {count}.")
        images = [read_upload(path, self.processor, self.limits) for path in image_paths]
        instruction = (instruction or "").strip() or None
        with self._worker() as worker:
            vectors = encode(
                worker.model,
                worker.processor,
                images=[*images, *[None] * len(lines)],
                texts=[*[None] * len(images), *lines],
                instruction=[*[None] * len(images), *[instruction] * len(lines)],
                batch_size=MAX_EMBED_ITEMS,
                show_progress=False,
            )
        labels = _unique([os.path.basename(path) for path in image_paths] + lines)
        return labels, similarity(vectors, vectors)


def _unique(labels: list[str]) -> list[str]:
    """Labels made distinct with ` (2)`, ` (3)`, ... (two uploads of one name are two rows)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


# ---------------------------------------------------------------------------------------------------- the page


def _status(message: str, kind: str = "ok") -> str:
    """A status line: HTML-escaped (user file names and text are content, never markup)."""
    role = ' role="alert"' if kind == "error" else ""
    return f'<div class="crem-status crem-{kind}"{role}>{html.escape(message)}</div>'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table with every cell escaped."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="crem-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def guarded(handler: Callable[..., tuple], empty: tuple) -> Callable[..., tuple]:
    """
    `handler` for a page event: its outputs end with a status line. A user error (ValueError, OSError, TypeError)
    clears the other outputs (`empty`; a stale result is never shown as the new one) and becomes the status line;
    any other exception too, named in one line, with its traceback in the server log. The server keeps serving.
    """

    def run(*args):
        try:
            return handler(*args)
        except (*USER_ERRORS, TypeError) as error:
            message = " ".join(str(error).split()) or type(error).__name__
        except Exception as error:  # a bug: the traceback goes to the log, the page gets one line
            logger.exception("The demo's %s failed", getattr(handler, "__name__", "handler"))
            message = f"Unexpected error ({type(error).__name__}): {' '.join(str(error).split())[:300]}"
        return (*empty, _status(message, "error"))

    run.__name__ = getattr(handler, "__name__", "handler")
    return run


def _heat_map(labels: list[str], matrix: torch.Tensor):
    """A matplotlib figure of the similarity matrix with its values written in the cells."""
    from matplotlib.figure import Figure

    size = len(labels)
    figure = Figure(figsize=(2.2 + 0.65 * size, 1.6 + 0.6 * size), dpi=100)
    axes = figure.add_subplot()
    shown = axes.imshow(matrix.numpy(), cmap="viridis", vmin=-1.0, vmax=1.0)
    short = [label if len(label) <= 28 else label[:27] + "…" for label in labels]
    axes.set_xticks(range(size), short, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(size), short, fontsize=8)
    for row in range(size):
        for column in range(size):
            value = float(matrix[row, column])
            axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="black" if value > 0.3 else "white")  # fmt: skip
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="cosine similarity")
    axes.set_title("Similarity matrix")
    figure.tight_layout()
    return figure


def _thumbnail(source: str | None) -> Image.Image:
    """A gallery thumbnail from a stored image path (small scans enlarged, large photos reduced while decoding), or a
    grey square when the file is gone or unreadable (a URL, a moved file)."""
    side = THUMBNAIL_SIDE
    try:
        with Image.open(source) as opened:
            opened.draft("RGB", (side, side))  # JPEG: decode at a fraction of the size
            image = rgb_on_white(opened)
    except (OSError, TypeError, ValueError, AttributeError, Image.DecompressionBombError):
        return Image.new("RGB", (side, side), (200, 200, 200))
    if max(image.size) >= side:
        image.thumbnail((side, side))
        return image
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)


def _update(**properties) -> dict[str, Any]:
    """gradio's update of an output component's properties (`gr.update`); with none, the output is left as it is."""
    import gradio as gr

    return gr.update(**properties)


def _cost_table(result: AskResult) -> str:
    """What one answer's prompt holds in the cache, and the answer's time."""
    return _table(
        ["KV slots", "KV bytes", "seconds"], [[result.kv_slots, f"{result.kv_bytes:,}", f"{result.seconds:.3f}"]]
    )


# A view is what one page event shows: the new values of its output components, in the order the tab wires them,
# the status line last. Each view's `empty` is what it shows when nothing is to be shown (after an error, a clear).


class SearchView(NamedTuple):
    """The Search tab after a search or a gallery change."""

    thumbnails: list[tuple[Image.Image, str]]  # (thumbnail, "#rank id · score") per hit, best first
    hits: str  # HTML table: rank, id, score, label
    picker: dict[str, Any]  # the "Ask about hit" dropdown's update: the hits' ids as choices, the first picked
    hit_ids: list[str]  # the hits' ids, best first (the page's state: a picked thumbnail's index -> its id)
    status: str

    @classmethod
    def empty(cls, status: str = "") -> SearchView:
        return cls([], "", _update(choices=[], value=None), [], status)


class StoredAnswerView(NamedTuple):
    """The Search tab's answer about a picked hit, from its stored compressed context."""

    answer: str
    status: str

    @classmethod
    def empty(cls, status: str = "") -> StoredAnswerView:
        return cls("", status)


class GalleryAddView(NamedTuple):
    """The Search tab after adding uploads to the gallery."""

    uploads: Any  # None: the added files leave the upload box; on an error they stay (an empty update)
    status: str

    @classmethod
    def empty(cls, status: str = "") -> GalleryAddView:
        return cls(_update(), status)


class AskView(NamedTuple):
    """The Ask tab: the image and its two answers, each with its cost table."""

    preview: Image.Image | None
    native_answer: str
    native_cost: str  # HTML table: KV slots, KV bytes, seconds
    compressed_answer: str
    compressed_cost: str
    status: str

    @classmethod
    def empty(cls, status: str = "") -> AskView:
        return cls(None, "", "", "", "", status)


class EmbedView(NamedTuple):
    """The Embed tab: the similarity matrix as a heat map (a matplotlib figure) and as a table."""

    heat_map: Any
    table: str  # HTML table: a row and a column per item
    status: str

    @classmethod
    def empty(cls, status: str = "") -> EmbedView:
        return cls(None, "", status)


def _event(view: type) -> Callable[[Callable], Callable]:
    """A `DemoPage` method as a page event (see `guarded`): it returns a `view`; on an error, the view's `empty`
    one with the error as its status line."""

    def decorate(method: Callable[..., tuple]) -> Callable[..., tuple]:
        @functools.wraps(method)
        def event(*args):
            return view._make(guarded(method, view.empty()[:-1])(*args))

        return event

    return decorate


class DemoPage:
    """
    What each event of the page shows, without the page: one method per event takes the values of the event's
    input components (uploads as `gr.File` values: a path, a list of paths, or None) and returns its view, the new
    values of its outputs. A bad input (or a bug) is the view's status line, the other outputs emptied; nothing
    raises. Holds no state of its own: one object serves every user (`demo` makes the calls safe at once).
    """

    HIT_HEADERS = ("rank", "id", "score", "label")

    def __init__(self, demo: CREMDemo):
        self.demo = demo

    def gallery_line(self) -> str:
        return _status(f"The gallery holds {self.demo.gallery_size()} item(s).")

    @_event(SearchView)
    def search(self, text: str | None, image_file: Any, k: int) -> SearchView:
        """The top `k` gallery items for a text or an image query: thumbnails, a table, the picker on the best."""
        hits = self.demo.search(text, (_upload_paths(image_file) or [None])[0], k)
        ids = [hit.id for hit in hits]
        line = f"{len(hits)} hit(s) out of {self.demo.gallery_size()} gallery item(s)."
        return SearchView(
            [(_thumbnail(hit.source), f"#{hit.rank + 1} {hit.id} · {hit.score:.3f}") for hit in hits],
            _table(
                self.HIT_HEADERS,
                [[hit.rank + 1, hit.id, f"{hit.score:.4f}", hit.metadata.get("label", hit.text or "")] for hit in hits],
            ),
            _update(choices=ids, value=ids[0]),
            ids,
            _status(line),
        )

    def pick(self, hit_ids: list[str], index: int | None) -> str | dict[str, Any]:
        """The id of the thumbnail picked at `index` (the picker follows the gallery); else the picker as it is."""
        return hit_ids[index] if hit_ids and index is not None and index < len(hit_ids) else _update()

    @_event(StoredAnswerView)
    def ask_stored(self, item_id: str | None, question: str, max_new_tokens: int) -> StoredAnswerView:
        answer = self.demo.ask_stored(question, item_id, max_new_tokens)
        return StoredAnswerView(answer, _status(f"Answered from the stored compressed context of {item_id}."))

    @_event(GalleryAddView)
    def add(self, files: Any) -> GalleryAddView:
        return GalleryAddView(None, _status(self.demo.add_uploads(_upload_paths(files))))

    @_event(SearchView)
    def clear(self) -> SearchView:
        """An empty gallery, and no hits shown."""
        self.demo.new_gallery(clear=True)
        return SearchView.empty(_status("The gallery is empty now."))

    @_event(AskView)
    def ask(self, image_file: Any, question: str, max_new_tokens: int) -> AskView:
        """The question answered natively and compressed, each with its cache's size and time."""
        path = (_upload_paths(image_file) or [None])[0]
        native, compressed = self.demo.answer(path, question, max_new_tokens)
        preview = read_upload(path, self.demo.processor, self.demo.limits)
        saved = 1 - compressed.kv_slots / native.kv_slots
        line = f"Prompt of {native.prompt_tokens} tokens; the compressed cache holds {saved:.0%} fewer slots."
        return AskView(
            preview, native.answer, _cost_table(native), compressed.answer, _cost_table(compressed), _status(line)
        )

    @_event(EmbedView)
    def embed(self, files: Any, texts: str | None, instruction: str | None) -> EmbedView:
        """The images' and texts' cosine similarity matrix."""
        labels, matrix = self.demo.similarity(_upload_paths(files), texts or "", instruction)
        rows = [[label, *(f"{v:.3f}" for v in row)] for label, row in zip(labels, matrix.tolist(), strict=True)]
        return EmbedView(
            _heat_map(labels, matrix), _table(["", *labels], rows), _status(f"{len(labels)} items compared.")
        )


# ---------------------------------------------------------------------------------------------------- the layout

_CSS = """
.crem-status { padding: 6px 10px; border-radius: 6px; margin: 4px 0; }
.crem-ok { background: #eef6ee; color: #1d4d1d; }
.crem-error { background: #fdecec; color: #8a1111; font-weight: 600; }
.crem-table { border-collapse: collapse; font-size: 0.9em; }
.crem-table th, .crem-table td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
"""


def search_tab(page: DemoPage, model_event: dict, question: str, top_k: int, max_new_tokens: int) -> None:
    """The Search tab: the query and the gallery's changes on the left; the hits and a question about one on the
    right. `model_event`: the keyword arguments of every event that uses the model."""
    import gradio as gr

    with gr.Tab("Search", id="search"):
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Textbox(label="Text query", placeholder="the digit seven", elem_id="search-text")
                query_image = gr.File(label="…or a query image", file_count="single", elem_id="search-image")
                k = gr.Slider(1, MAX_TOP_K, value=top_k, step=1, label="Top-k", elem_id="search-k")
                search_button = gr.Button("Search", variant="primary", elem_id="search-button")
                with gr.Accordion("Add images to the gallery", open=False):
                    uploads = gr.File(label="Images", file_count="multiple", elem_id="gallery-upload")
                    with gr.Row():
                        add_button = gr.Button("Add to gallery", elem_id="gallery-add")
                        clear_button = gr.Button("Clear gallery", elem_id="gallery-clear")
            with gr.Column(scale=2):
                status = gr.HTML(page.gallery_line(), elem_id="search-status")
                results = gr.Gallery(
                    label="Top hits", columns=5, height=280, object_fit="contain", elem_id="search-results"
                )
                hits_table = gr.HTML(elem_id="search-hits")
                hit_ids = gr.State([])
                with gr.Row():
                    picked = gr.Dropdown(choices=[], label="Ask about hit", elem_id="search-pick")
                    stored_question = gr.Textbox(value=question, label="Question", elem_id="search-question")
                stored_tokens = gr.Slider(
                    1, 64, value=max_new_tokens, step=1, label="Max new tokens", elem_id="search-tokens"
                )
                stored_button = gr.Button("Ask the stored context", elem_id="search-ask")
                stored_answer = gr.Textbox(label="Answer", interactive=False, elem_id="search-answer")

    def pick(ids: list[str], event: gr.SelectData):
        return page.pick(ids, event.index)

    pick.__annotations__ = {"event": gr.SelectData}  # gradio passes the selection by this (resolved) annotation
    search_view = [results, hits_table, picked, hit_ids, status]  # SearchView's fields
    search_button.click(page.search, [query, query_image, k], search_view, api_name="search", **model_event)
    results.select(pick, [hit_ids], [picked], queue=False)  # no model: never waits behind the model events
    stored_inputs = [picked, stored_question, stored_tokens]
    stored_button.click(page.ask_stored, stored_inputs, [stored_answer, status], api_name="ask_stored", **model_event)
    add_button.click(page.add, [uploads], [uploads, status], api_name="add", **model_event)  # GalleryAddView
    clear_button.click(page.clear, None, search_view, api_name="clear", **model_event)


def ask_tab(page: DemoPage, model_event: dict, question: str, max_new_tokens: int) -> None:
    """The Ask tab: an image and a question on the left; the native and the compressed answer side by side."""
    import gradio as gr

    with gr.Tab("Ask", id="ask"):
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Image", file_count="single", elem_id="ask-image")
                question_box = gr.Textbox(value=question, label="Question", elem_id="ask-question")
                tokens = gr.Slider(1, 64, value=max_new_tokens, step=1, label="Max new tokens", elem_id="ask-tokens")
                button = gr.Button("Answer both ways", variant="primary", elem_id="ask-button")
                preview = gr.Image(label="The image", interactive=False, height=220, elem_id="ask-preview")
            with gr.Column(scale=1):
                gr.Markdown("### Native\nThe whole prompt (image included) stays in the KV cache.")
                native_answer = gr.Textbox(label="Answer", interactive=False, elem_id="native-answer")
                native_cost = gr.HTML(elem_id="native-stats")
            with gr.Column(scale=1):
                gr.Markdown("### Compressed\nThe image and text are dropped; the chorus tokens carry them.")
                compressed_answer = gr.Textbox(label="Answer", interactive=False, elem_id="compressed-answer")
                compressed_cost = gr.HTML(elem_id="compressed-stats")
        status = gr.HTML(elem_id="ask-status")
    ask_view = [preview, native_answer, native_cost, compressed_answer, compressed_cost, status]  # AskView's fields
    button.click(page.ask, [image, question_box, tokens], ask_view, api_name="ask", **model_event)


def embed_tab(page: DemoPage, model_event: dict) -> None:
    """The Embed tab: images and lines of text on the left; their similarity matrix on the right."""
    import gradio as gr

    with gr.Tab("Embed", id="embed"):
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images", file_count="multiple", elem_id="embed-images")
                texts = gr.Textbox(label="Texts, one per line", lines=4, elem_id="embed-texts")
                instruction = gr.Textbox(
                    value=TEXT_INSTRUCTION, label="Instruction for the texts", elem_id="embed-instruction"
                )
                button = gr.Button("Compare", variant="primary", elem_id="embed-button")
            with gr.Column(scale=2):
                status = gr.HTML(elem_id="embed-status")
                heat_map = gr.Plot(label="Cosine similarity", format="png", elem_id="embed-plot")
                table = gr.HTML(elem_id="embed-table")
    embed_view = [heat_map, table, status]  # EmbedView's fields
    button.click(page.embed, [files, texts, instruction], embed_view, api_name="embed", **model_event)


def build_app(
    model,
    processor: CREMProcessor,
    *,
    gallery: str | Sequence[tuple[str, Any, dict]] | None = "digits",
    gallery_size: int | None = None,
    workdir: str | os.PathLike | None = None,
    limits: UploadLimits | None = None,
    top_k: int = 5,
    max_new_tokens: int = 16,
    title: str = "CREM demo",
    concurrency: int = DEFAULT_CONCURRENCY,
    queue_size: int = DEFAULT_QUEUE_SIZE,
):
    """
    The demo page (`gradio.Blocks`; call `.launch()`).

    Args:
        model: a CREM model; processor: its processor.
        gallery: the Search tab's starting gallery: `"digits"` (the bundled held-out digit scans), a folder of
            images (indexed with `CREMMemory.index`), `(id, image, metadata)` items, or `None` (empty).
        gallery_size: keep the first `gallery_size` digit scans (default: all 360).
        workdir: where the gallery memory and uploads live (default: a temporary folder removed at exit).
        limits: what an upload may weigh (default `UploadLimits()`: 20 MB, 25 megapixels).
        top_k: the search's default number of hits; max_new_tokens: the answers' default length.
        concurrency: the most model events (search, answers, comparisons, gallery changes) that run at once, over
            all users; queue_size: the most that wait in the queue (the page shows each user's place), beyond which
            a request is refused as busy. Together they bound the work in flight and its memory.
    Raises:
        ValueError: an unknown gallery, or a folder that is not one; a concurrency or queue size below 1.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    if queue_size < 1:
        raise ValueError(f"queue_size must be at least 1, got {queue_size}.")
    temporary = tempfile.TemporaryDirectory(prefix="crem-demo-") if workdir is None else None
    workdir = os.fspath(workdir) if temporary is None else temporary.name
    demo = CREMDemo(model, processor, workdir, limits or UploadLimits(), concurrency=concurrency)
    demo.start_gallery(gallery, gallery_size)
    page = DemoPage(demo)
    question = "Which digit is shown?" if gallery == "digits" else "What is in the image?"
    # Every event that uses the model is one concurrency group: at most `concurrency` of them run at once over all
    # users (one per worker), the rest wait in the queue.
    model_event = {"concurrency_id": "model", "concurrency_limit": concurrency}
    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# {html.escape(title)}\nOne model for search (embeddings) and answers (native or from the chorus "
            f"tokens alone). Model: {model.config.text_config.hidden_size}-wide, "
            f"{model.config.num_chorus_tokens} chorus tokens."
        )
        with gr.Tabs():
            search_tab(page, model_event, question, top_k, max_new_tokens)
            ask_tab(page, model_event, question, max_new_tokens)
            embed_tab(page, model_event)
    app.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    app.crem_demo = demo  # the logic behind the page (tests, scripts)
    app.crem_page = page  # what each event shows
    app.crem_workdir = temporary  # kept alive with the app; removed at exit
    app.crem_css = _CSS
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = None, block: bool = True, **kwargs):
    """
    Serve `app` (from `build_app`) on `host:port`: gradio's own upload cap is four times the app's byte limit (the
    app names a file over its limit in the page; gradio refuses files far beyond it before they are stored).
    Returns `(fastapi app, local url, share url)` as `gradio.Blocks.launch`.
    """
    limit = app.crem_demo.limits.max_bytes
    return app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        max_file_size=4 * limit,
        css=app.crem_css,
        ssr_mode=False,
        show_error=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------- command line


def load_demo_model(path: str, device: str = "cpu"):
    """
    `(model, processor)` of a CREM folder or a LoRA adapter folder on one (`crem_hf.load_crem`), in eval mode on
    `device`.

    Raises:
        ValueError: a missing folder, a folder that holds no model, a plain backbone checkpoint (Qwen2-VL, Qwen2.5-VL,
            Qwen3-VL) or another model type.
    """
    from ..loading import BACKBONE_CREM_CLASSES, checkpoint_kind, load_crem

    if path == DEFAULT_MODEL and not os.path.exists(path):
        raise ValueError(f"--model {path}: no such folder; train it with `python -m crem_hf.demo.main`, or pass one.")
    check_model_source(path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"--model {path} holds no model (no config.json); expected a CREM model folder.")
    if (kind := checkpoint_kind(path)) in BACKBONE_CREM_CLASSES:
        raise ValueError(
            f"--model {path} is a plain {kind!r} checkpoint, not a CREM model: train it first (examples/"
            "train_lora.py or python -m crem_hf.demo.main)."
        )
    model, processor = load_crem(path)
    return model.to(device).eval(), processor


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="crem-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"CREM folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--gallery", default="digits", help="'digits' (held-out scans), 'none' or a folder of images")
    parser.add_argument("--gallery-size", type=positive_int, default=None, help="first N digit scans (default: all)")
    parser.add_argument("--workdir", default=None, help="where the gallery memory lives (default: a temporary one)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0)
    parser.add_argument("--max-upload-megapixels", type=float, default=25.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        help=f"model requests served at once, over all users (default: {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--queue-size",
        type=positive_int,
        default=DEFAULT_QUEUE_SIZE,
        help=f"requests that may wait; more are refused as busy (default: {DEFAULT_QUEUE_SIZE})",
    )
    return parser


def serve(args: argparse.Namespace) -> None:
    """Load the model, build the page and serve it until Ctrl-C."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 1 to 65535.")
    if args.max_upload_mb <= 0 or args.max_upload_megapixels <= 0:
        raise ValueError("--max-upload-mb and --max-upload-megapixels must be positive.")
    limits = UploadLimits(int(args.max_upload_mb * 1024 * 1024), int(args.max_upload_megapixels * 1e6))
    model, processor = load_demo_model(args.model, args.device)
    app = build_app(
        model,
        processor,
        gallery=args.gallery,
        gallery_size=args.gallery_size,
        workdir=args.workdir,
        limits=limits,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
    )
    launch(app, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    """The `crem-demo` command: serves until Ctrl-C; exit status 1 with a one-line reason (2: bad usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)  # the gallery's size and time; not every HTTP request of the libraries
    return run_command("crem-demo", lambda: serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
