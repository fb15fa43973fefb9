"""CREM as an `mteb` 2.x model (MTEB and its image extension MIEB).

- `CREMEncoder`: an mteb encoder (`mteb.models.AbsEncoder`) on a CREM model and its processor. It embeds text, image
  and image+text inputs with `crem_hf.encode` (batched and length-sorted, as `crem-eval` embeds them), and maps
  mteb's prompt types and task types to CREM instructions (`CREMEncoder.get_instruction`).
- `crem_model_meta` / `load_crem_encoder`: an mteb `ModelMeta` (modalities, embedding size, max tokens, licence,
  training data) whose loader builds the encoder, so mteb's own machinery runs it: `mteb.evaluate(meta, tasks)`, or
  `mteb.get_model(name)` after `register_crem_model(meta)`.
- `caption_retrieval_task`: a local image-to-text or text-to-image retrieval task over the caption rows that
  `crem-eval retrieval` reads, so both evaluators can be run on the same data.
- `mteb_eval_results`: model-card `model-index` entries from mteb result files (for `crem-export --mteb-results`).

    import mteb
    from crem_hf.integrations.mteb import crem_model_meta

    meta = crem_model_meta("outputs/main/model", name="org/crem-tiny")
    results = mteb.evaluate(meta, mteb.get_tasks(tasks=["MSCOCOI2TRetrieval"]), cache=mteb.ResultCache("mteb-cache"))
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedConfig

from ..configuration_crem import CREMConfigMixin
from ..encoding import encode
from ..evaluation.retrieval import load_caption_rows
from ..instructions import CLASSIFY_INSTRUCTION, I2T_INSTRUCTION, T2I_INSTRUCTION, VQA_INSTRUCTION
from ..loading import CREM_CLASSES, load_crem

if TYPE_CHECKING:
    from huggingface_hub import EvalResult
    from mteb.abstasks import AbsTask
    from torch.utils.data import DataLoader

__all__ = [
    "CATEGORY_INSTRUCTIONS",
    "CREMEncoder",
    "CREMModelMeta",
    "CaptionRetrievalTask",
    "TASK_TYPE_INSTRUCTIONS",
    "caption_retrieval_task",
    "TRAINING_DATASETS",
    "crem_model_meta",
    "load_crem_encoder",
    "mteb_eval_results",
    "register_crem_model",
]

#: The query-side instruction (MMEB's wording, the training data's) of a retrieval task without a prompt of its own,
#: by mteb task category (query modality 2 document modality).
CATEGORY_INSTRUCTIONS = {
    "t2i": T2I_INSTRUCTION,  # MSCOCO_t2i
    "i2t": I2T_INSTRUCTION,  # MSCOCO_i2t
    "i2i": "Find a day-to-day image that looks similar to the provided image.",  # NIGHTS
    "it2t": VQA_INSTRUCTION,  # OK-VQA, A-OKVQA
    "it2i": "Given an image, find a similar everyday image with the described changes:",  # CIRR
    "t2it": "Find a Wikipedia image-passage pair that answers this question:",  # WebQA
}
#: The instruction of other task types without a prompt of their own (symmetric tasks: every item gets it, except
#: the label texts of zero-shot classification, which are targets).
TASK_TYPE_INSTRUCTIONS = {
    "ImageClassification": CLASSIFY_INSTRUCTION,  # ImageNet-1K, VOC2007, SUN397
    "ZeroShotClassification": CLASSIFY_INSTRUCTION,
    "ImageClustering": CLASSIFY_INSTRUCTION,
    "Any2AnyMultiChoice": VQA_INSTRUCTION,
    "VisionCentricQA": VQA_INSTRUCTION,
}
_RETRIEVAL_TYPES = ("Any2AnyRetrieval", "Any2AnyMultilingualRetrieval", "Any2AnyReranking")

#: The mteb tasks built from CREM's training data. Contrastive stage: MMEB-train (TIGER-Lab/MMEB-train), whose
#: subsets overlap these MIEB tasks (ImageNet-1K, N24News, A-OKVQA, DocVQA, InfographicsVQA, ChartQA, Visual7W and
#: VisDial have no mteb task of the same data). Generation stage: the LLaVA / ShareGPT4V 665K mix, whose images
#: include COCO's (the MSCOCO tasks, listed already); its other sources (GQA, OCR-VQA, TextVQA, Visual Genome) have
#: no mteb task. Listed so that mteb marks scores on them as not zero-shot.
TRAINING_DATASETS = frozenset(
    {
        "HatefulMemesI2TRetrieval",
        "HatefulMemesT2IRetrieval",
        "SUN397",
        "SUN397ZeroShot",
        "VOC2007",
        "OKVQAIT2TRetrieval",
        "CIRRIT2IRetrieval",
        "NIGHTSI2IRetrieval",
        "WebQAT2ITRetrieval",
        "WebQAT2TRetrieval",
        "VisualNewsI2TRetrieval",
        "VisualNewsT2IRetrieval",
        "MSCOCOI2TRetrieval",
        "MSCOCOT2IRetrieval",
    }
)
PUBLIC_TRAINING_DATA = (
    "https://huggingface.co/datasets/TIGER-Lab/MMEB-train, https://huggingface.co/datasets/Lin-Chen/ShareGPT4V"
)
CITATION = """@article{crem2026,
  title   = {CREM: Compression-Driven Representation Enhancement for Multimodal Retrieval and Comprehension},
  author  = {Liu and Wang and Yang and Li and Cao and Luo and Chen and Wu and Yuan and Yang and Ding and Gao and Zhou},
  journal = {arXiv preprint arXiv:2602.19091},
  year    = {2026}
}"""
#: Items collected from mteb's loader before one length-sorted `encode` pass, in mteb batches: sorting needs
#: many items at once, and a bounded window keeps a large corpus's decoded images out of memory.
SORT_WINDOW_BATCHES = 8
_UNSUPPORTED_INPUTS = ("audio", "video")


def _default_instruction(task_metadata: TaskMetadata) -> str | None:
    """CREM's instruction (MMEB's wording) for a task's queries, or for every item of a symmetric task."""
    if task_metadata.type in _RETRIEVAL_TYPES:
        return CATEGORY_INSTRUCTIONS.get(task_metadata.category)
    return TASK_TYPE_INSTRUCTIONS.get(task_metadata.type)


class CREMEncoder(AbsEncoder):
    """
    A CREM model as an mteb encoder: text, image and image+text items, embedded through the processor and
    `get_embedding` in length-sorted batches (`crem_hf.encode`).

    Instructions (`get_instruction`), first match wins:
        1. `prompts`, keyed as mteb keys model prompts (`"{task}-{query|document}"`, `"{task}"`,
           `"{task type}-{query|document}"`, `"{task type}"`, `"query"`, `"document"`); `""` means no instruction.
        2. Documents (retrieval targets): the task's own `"document"` prompt if it has one, else none; a bare image
           then gets the processor's `image_instruction`, as in MMEB and `crem-eval`.
        3. The task's own prompt (`TaskMetadata.prompt`: a string, or the `"query"` entry of a dict).
        4. CREM's MMEB-style default for the task (`CATEGORY_INSTRUCTIONS` for retrieval, by category;
           `TASK_TYPE_INSTRUCTIONS` otherwise); none for other tasks (the item's text alone).

    Args:
        model: a CREM model of any backbone (on the device it should run on).
        processor: its `CREMProcessor`.
        prompts: instruction overrides (see above), checked by mteb's `validate_task_to_prompt_name`.
        batch_size: items per forward; `None` takes mteb's `encode_kwargs["batch_size"]`.
        meta: the `ModelMeta` to report; default: one built from the model's config under `name`.
        name: the model name ("organization/model") of the default `meta`.
        dim: the Matryoshka embedding size to encode at (one of `config.matryoshka_dims`); default: the full one.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        prompts: Mapping[str, str] | None = None,
        batch_size: int | None = None,
        meta: ModelMeta | None = None,
        name: str = "local/crem",
        dim: int | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(model, "get_embedding") or not hasattr(processor, "process_embedding_inputs"):
            raise TypeError(
                f"CREMEncoder needs a CREM model and a CREMProcessor, got {type(model).__name__} and "
                f"{type(processor).__name__}."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.dim = model.config.check_embedding_dim(dim)
        self.model = model.eval()
        self.processor = processor
        self.model_prompts = self.validate_task_to_prompt_name(dict(prompts)) if prompts else None
        self.batch_size = batch_size
        at_dim = {"embed_dim": dim} if dim is not None else {}
        self.mteb_model_meta = meta if meta is not None else _meta_from_config(model.config, name, None, **at_dim)

    def get_instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str:
        """The CREM instruction for `prompt_type` items of a task (order in the class docstring); `""`: none."""
        if self.model_prompts:
            key = self.get_prompt_name(task_metadata, prompt_type)
            if key is not None:
                return self.model_prompts[key]
        task_prompt = task_metadata.prompt
        if isinstance(task_prompt, Mapping):
            task_prompt = task_prompt.get(prompt_type.value) if prompt_type is not None else None
        elif prompt_type == PromptType.document:
            task_prompt = None  # a task's single prompt is for its queries; targets carry no instruction in CREM
        if prompt_type == PromptType.document or task_prompt:
            return task_prompt or ""
        return _default_instruction(task_metadata) or ""

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """
        Embed every item of mteb's loader (batches of `{"text": [...], "image": [...], ...}`).

        Returns:
            `(num_items, dim or hidden_size)` float32 embeddings (L2-normalised unless the config says otherwise),
            in the loader's order.
        Raises:
            ValueError: an item with neither text nor image, an image of an unsupported type, or an audio / video
                input (named by task, split and item).
        """
        instruction = self.get_instruction(task_metadata, prompt_type) or None
        batch_size = self.batch_size or kwargs.get("batch_size") or 32
        where = f"{task_metadata.name} ({hf_subset}/{hf_split}, {prompt_type.value if prompt_type else 'items'})"
        texts: list[str | None] = []
        images: list[Any] = []
        out: list[torch.Tensor] = []
        for batch in tqdm(inputs, desc=f"CREM {where}", disable=not kwargs.get("show_progress_bar", True)):
            batch_texts, batch_images = self._batch_items(batch, where, start=len(texts) + sum(map(len, out)))
            texts += batch_texts
            images += batch_images
            if len(texts) >= SORT_WINDOW_BATCHES * batch_size:
                out.append(self._encode_window(texts, images, instruction, task_metadata, prompt_type, batch_size))
                texts, images = [], []
        if texts:
            out.append(self._encode_window(texts, images, instruction, task_metadata, prompt_type, batch_size))
        if not out:
            return np.zeros((0, self.dim or self.model.config.text_config.hidden_size), dtype=np.float32)
        return torch.cat(out).numpy()

    @staticmethod
    def _batch_items(batch: Mapping[str, Any], where: str, start: int) -> tuple[list, list]:
        """One mteb batch as `(texts, images)`, each item checked."""
        unsupported = [key for key in _UNSUPPORTED_INPUTS if key in batch]
        if unsupported:
            raise ValueError(f"{where}: CREM embeds text and images, not {unsupported[0]}.")
        size = len(batch["text"]) if "text" in batch else len(batch.get("image", []))
        texts = list(batch["text"]) if "text" in batch else [None] * size
        images = list(batch["image"]) if "image" in batch else [None] * size
        ids = list(batch["id"]) if "id" in batch else [None] * size
        for k, (text, image, item_id) in enumerate(zip(texts, images, ids, strict=True)):
            name = f"item {start + k}" + (f" (id {item_id!r})" if item_id is not None else "")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}, {name}: text must be a string, got {type(text).__name__}.")
            if image is not None and not isinstance(image, (Image.Image, str, os.PathLike)):
                raise ValueError(
                    f"{where}, {name}: image must be a PIL image or a file path, got {type(image).__name__}."
                )
            if image is None and not (text or "").strip():
                raise ValueError(f"{where}, {name}: neither text nor image to embed.")
        return texts, images

    def _encode_window(
        self,
        texts: list[str | None],
        images: list[Any],
        instruction: str | None,
        task_metadata: TaskMetadata,
        prompt_type: PromptType | None,
        batch_size: int,
    ) -> torch.Tensor:
        # Zero-shot classification encodes its label texts with no prompt type, as it does its images: labels are
        # targets (no instruction, as in MMEB), recognised by carrying no image.
        if prompt_type is None and task_metadata.type == "ZeroShotClassification" and not any(images):
            instruction = None
        # An item's empty text beside its image is no text (`_batch_items` refuses an item with neither).
        return encode(
            self.model,
            self.processor,
            images=[image or None for image in images],
            texts=[text or None for text in texts],
            instruction=instruction,
            batch_size=batch_size,
            dim=self.dim,
            show_progress=False,
        )


class CREMModelMeta(ModelMeta):
    """mteb's `ModelMeta` for CREM models: their images are read by CREM's own (PIL) processor, so loading does not
    require mteb's `image` extra (torchvision), which mteb otherwise demands of every image model."""

    def _resolve_extras_groups(self) -> list[str]:
        return [group for group in super()._resolve_extras_groups() if group != "image"]


def load_crem_encoder(
    model_name: str,
    revision: str | None = None,
    *,
    model_path: str | os.PathLike | None = None,
    device: str | None = None,
    prompts: Mapping[str, str] | None = None,
    batch_size: int | None = None,
    dim: int | None = None,
    **from_pretrained_kwargs,
) -> CREMEncoder:
    """
    The `ModelMeta` loader: a `CREMEncoder` on the CREM model at `model_path` (a local folder), or else at the Hub
    id `model_name` (at `revision`: the model and its processor come from the same snapshot).

    Args:
        device: where the model runs (default: CUDA when available).
        **from_pretrained_kwargs: for the model's `from_pretrained` (`dtype`, `attn_implementation`, ...).
    """
    source = os.fspath(model_path) if model_path is not None else model_name
    if model_path is None and revision is not None and not os.path.isdir(source):
        from huggingface_hub import snapshot_download

        source = snapshot_download(model_name, revision=revision)
    model, processor = load_crem(source, **from_pretrained_kwargs)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return CREMEncoder(model, processor, prompts=prompts, batch_size=batch_size, name=model_name, dim=dim)


def _count_parameters(folder: str) -> tuple[int | None, float | None]:
    """`(parameters, MiB)` from the safetensors headers of a local folder; `(None, None)` without weights there."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if os.path.isdir(folder) else []
    if not files:
        return None, None
    count = size = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                numel = int(np.prod(tensor.get_shape()))
                count += numel
                size += numel * _DTYPE_BYTES.get(tensor.get_dtype(), 4)
    return count, round(size / 2**20)


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _meta_from_config(
    config: CREMConfigMixin, name: str, loader: Any, revision: str | None = None, **fields: Any
) -> CREMModelMeta:
    text = config.text_config
    values: dict[str, Any] = {
        "loader": loader,
        "name": name,
        "revision": revision,
        "release_date": None,
        "languages": ["eng-Latn"],
        "n_parameters": None,
        "n_embedding_parameters": text.vocab_size * text.hidden_size,
        "memory_usage_mb": None,
        "max_tokens": text.max_position_embeddings,
        "embed_dim": text.hidden_size,
        "license": "apache-2.0",
        "open_weights": True,
        "public_training_code": None,
        "public_training_data": PUBLIC_TRAINING_DATA,
        "framework": ["PyTorch", "Transformers", "safetensors", "Sentence Transformers"],
        # get_embedding L2-normalises by default: the dot product is then the cosine, computed as crem-eval does.
        "similarity_fn_name": ScoringFunction.DOT_PRODUCT if config.normalize_embeddings else ScoringFunction.COSINE,
        "use_instructions": True,
        "training_datasets": set(TRAINING_DATASETS),
        "adapted_from": None,  # the backbone checkpoint it was trained from: pass adapted_from=
        "modalities": ["image", "text"],
        "model_type": ["dense"],
        "citation": CITATION,
    }
    unknown = set(fields) - set(ModelMeta.model_fields)
    if unknown:
        raise ValueError(
            f"Unknown ModelMeta fields {sorted(unknown)}; expected some of {sorted(ModelMeta.model_fields)}."
        )
    return CREMModelMeta(**{**values, **fields})


def crem_model_meta(
    source: str | os.PathLike, *, name: str | None = None, revision: str | None = None, **fields: Any
) -> CREMModelMeta:
    """
    The mteb `ModelMeta` of a CREM model: modalities image + text, embedding size (the hidden size), max tokens
    (the language model's context), licence apache-2.0, training data MMEB-train + the LLaVA / ShareGPT4V mix
    (`TRAINING_DATASETS`), parameters and memory from the safetensors headers of a local folder, and
    `load_crem_encoder` as its loader.

    Args:
        source: a local CREM folder or a Hub id (its `config.json` is read).
        name: the model's name in mteb and in its results ("organization/model"; default: `source` when it is a
            Hub id, else "local/<folder name>").
        revision: the Hub revision (a commit) the results are for.
        **fields: other `ModelMeta` fields to set (`release_date`, `reference`, `loader_kwargs`, ...).
    Raises:
        ValueError: `source` is not a CREM model, or an unknown field.
    """
    source = os.fspath(source)
    local = os.path.isdir(source)
    if name is None:
        name = f"local/{os.path.basename(os.path.abspath(source))}" if local else source
    kind = PreTrainedConfig.get_config_dict(source, revision=revision)[0].get("model_type")
    if kind not in CREM_CLASSES:  # CREM folders of every backbone; a plain checkpoint has no chorus tokens to read
        raise ValueError(f"{source} is a {kind!r} model, not a CREM model (expected one of {', '.join(CREM_CLASSES)}).")
    config = CREM_CLASSES[kind].config_class.from_pretrained(source, revision=revision)
    n_parameters, memory = _count_parameters(source) if local else (None, None)
    loader_kwargs = {"model_path": os.path.abspath(source)} if local else {}
    fields = {
        "n_parameters": n_parameters,
        "memory_usage_mb": memory,
        "reference": None if local else f"https://huggingface.co/{source}",
        **fields,
        "loader_kwargs": {**loader_kwargs, **fields.get("loader_kwargs", {})},
    }
    return _meta_from_config(config, name, load_crem_encoder, revision, **fields)


def register_crem_model(meta: ModelMeta) -> ModelMeta:
    """
    Add `meta` to mteb's model registry, so that `mteb.get_model(meta.name)` / `mteb.get_model_meta` find it (in
    this process). Registering the same name again replaces a CREM entry.

    Raises:
        ValueError: the name belongs to a model mteb ships.
    """
    from mteb.models.model_implementations import MODEL_REGISTRY

    existing = MODEL_REGISTRY.get(meta.name)
    if existing is not None and not isinstance(existing, CREMModelMeta):
        raise ValueError(f"{meta.name} is an mteb model already; register the CREM model under another name.")
    MODEL_REGISTRY[meta.name] = meta
    return meta


# ---------------------------------------------------------------------------------------------------- local task


class CaptionRetrievalTask(AbsTaskRetrieval):
    """
    A local mteb retrieval task over caption rows `{"image": path, "captions": [str, ...]}` (the file
    `crem-eval retrieval` reads), one direction; built by `caption_retrieval_task`, one class per data file (mteb
    keeps a task's metadata on its class: `unload_data` drops an instance's own).

    - `"i2t"`: each image queries all captions (documents `caption-{index:05d}`, in file order); its own count.
    - `"t2i"`: each caption queries all images (documents `image-{index:05d}`).

    mteb ranks tied documents by id, descending (pytrec_eval's rule); `crem-eval` ranks ties by index, ascending.
    """

    rows: list[dict]
    direction: str

    def __init__(self, **kwargs: Any) -> None:
        if "metadata" not in type(self).__dict__:
            raise TypeError("Build a CaptionRetrievalTask with caption_retrieval_task(source, direction, ...).")
        super().__init__(**kwargs)

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        """Build queries, corpus and relevance from the rows (no download)."""
        from datasets import Dataset
        from datasets import Image as ImageFeature

        if self.data_loaded:
            return
        captions = [(i, text) for i, row in enumerate(self.rows) for text in row["captions"]]
        image_ids = [f"image-{i:05d}" for i in range(len(self.rows))]
        caption_ids = [f"caption-{j:05d}" for j in range(len(captions))]
        images = Dataset.from_dict({"id": image_ids, "image": [row["image"] for row in self.rows]})
        images = images.cast_column("image", ImageFeature())
        texts = Dataset.from_dict({"id": caption_ids, "text": [text for _, text in captions]})
        if self.direction == "i2t":
            queries, corpus = images, texts
            relevant = {image_ids[i]: {} for i in range(len(self.rows))}
            for j, (i, _) in enumerate(captions):
                relevant[image_ids[i]][caption_ids[j]] = 1
        else:
            queries, corpus = texts, images
            relevant = {caption_ids[j]: {image_ids[i]: 1} for j, (i, _) in enumerate(captions)}
        split = {"corpus": corpus, "queries": queries, "relevant_docs": relevant, "top_ranked": None}
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


def caption_retrieval_task(
    source: str | os.PathLike, direction: str = "i2t", name: str | None = None, image_root: str | None = None
) -> CaptionRetrievalTask:
    """
    A `CaptionRetrievalTask` over the caption rows of `source` (json, jsonl or parquet; checked as `crem-eval
    retrieval` checks them) in one direction.

    Args:
        direction: `"i2t"` (images query captions) or `"t2i"` (captions query images).
        name: the task's name in mteb results (default `Local{I2T|T2I}Retrieval-<file stem>`).
        image_root: folder of relative image paths.
    Raises:
        ValueError: a bad row (missing image, empty caption), no rows, or another direction.
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}.")
    rows = load_caption_rows(source, ("captions",), image_root)
    if not rows:
        raise ValueError(f"{source} holds no rows.")
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
    stem = Path(os.fspath(source)).stem
    metadata = TaskMetadata(
        name=name or f"Local{direction.upper()}Retrieval-{stem}",
        description=f"Caption retrieval ({direction}) over the rows of {os.fspath(source)}.",
        dataset={"path": f"local/{stem}", "revision": digest},
        type="Any2AnyRetrieval",
        category=direction,
        modalities=["image", "text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="recall_at_1",
    )
    attributes = {"metadata": metadata, "rows": rows, "direction": direction, "__doc__": metadata.description}
    return type(f"CaptionRetrievalTask_{digest}", (CaptionRetrievalTask,), attributes)()


# ---------------------------------------------------------------------------------------------------- model card


def _result_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.json") if p.name != "model_meta.json")
            if not found:
                raise ValueError(f"{path} holds no mteb result files (*.json).")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such mteb result file or folder.")
    return files


def mteb_eval_results(paths: Iterable[str | os.PathLike], tasks: Sequence[AbsTask] = ()) -> list[EvalResult]:
    """
    `huggingface_hub.EvalResult` entries (the model card's `model-index`) from mteb result files: one per task,
    split and subset, with the task's main score in percent. The entry's task type is the mteb task's name (its
    task name the mteb task type): the Hub groups model-index metrics by task type, dataset, config, split and
    revision, and MIEB tasks share datasets (CIFAR10 / CIFAR10ZeroShot, HatefulMemes I2T / T2I), which must stay
    separate entries.

    Args:
        paths: result files (`<TaskName>.json`, as `mteb.evaluate` writes them) or folders of them (e.g. a
            `ResultCache`'s `results/<model>/<revision>/`; `model_meta.json` is skipped).
        tasks: task objects for tasks mteb does not ship (e.g. from `caption_retrieval_task`); others are looked up.
    Raises:
        ValueError: a missing path, a file that is not an mteb result, or a task mteb does not know.
    """
    import mteb
    from huggingface_hub import EvalResult
    from mteb.results import TaskResult

    local = {task.metadata.name: task.metadata for task in tasks}
    entries = []
    for file in _result_files(paths):
        try:
            result = TaskResult.from_disk(file)
        except Exception as error:  # pydantic / JSON errors: name the file
            raise ValueError(f"{file} is not an mteb result file: {str(error).splitlines()[0]}") from error
        metadata = local.get(result.task_name)
        if metadata is None:
            try:
                metadata = mteb.get_task(result.task_name).metadata
            except KeyError as error:
                raise ValueError(
                    f"{file}: mteb does not know the task {result.task_name!r}; pass its task object (tasks=)."
                ) from error
        for split, subsets in result.scores.items():
            for scores in subsets:
                subset = scores.get("hf_subset", "default")
                entries.append(
                    EvalResult(
                        task_type=metadata.name,
                        task_name=metadata.type,
                        dataset_type=metadata.dataset["path"],
                        dataset_name=f"MTEB {metadata.name} ({subset})",
                        dataset_config=subset,
                        dataset_split=split,
                        dataset_revision=metadata.dataset["revision"],
                        metric_type=metadata.main_score,
                        metric_name=metadata.main_score,
                        metric_value=round(100 * scores["main_score"], 2),
                        source_name="MTEB",
                        source_url="https://github.com/embeddings-benchmark/mteb",
                    )
                )
    return entries
