"""Export a complete Hugging Face Hub folder for a CREM model, and push it.

The folder holds safetensors weights (LoRA merged by default, or the adapter alone), `config.json` with `auto_map`
(AutoConfig, AutoModel, AutoModelForImageTextToText), the processor, tokenizer and chat template with `auto_map`
for AutoProcessor, the three remote-code files, `generation_config.json`, a sentence-transformers module and a
`README.md` model card whose code runs against the folder; with `--space`, also a Gradio Space's `app.py` (the
`crem-demo` app on the folder) and `requirements.txt`.

    crem-export --model outputs/main/model --output-dir hub/crem-tiny --repo-id org/crem-tiny \\
        --eval-results outputs/main/eval_after/mmeb_results.json [--push]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch

from . import __version__
from .configuration_crem import CREMConfigMixin
from .io import (
    ArgumentParser,
    apply_umask,
    check_model_source,
    check_writable_folder,
    format_markdown_table,
    run_command,
    write_text_atomically,
)
from .loading import BACKBONE_CREM_CLASSES, CREM_CLASSES, checkpoint_kind, load_crem, merge_adapter
from .processing_crem import CREMProcessor

__all__ = [
    "CardInfo",
    "build_parser",
    "export_from_args",
    "export_hub_folder",
    "load_for_export",
    "main",
    "push_folder",
    "remove_stale_exports",
    "render_model_card",
    "space_files",
    "write_space_files",
]

try:  # POSIX: staging folders are marked live by a lock the kernel drops when their process dies
    import fcntl
except ImportError:  # pragma: no cover (Windows: no stale-folder clean-up)
    fcntl = None

#: Files that may hold pickled objects; an exported folder never contains any.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: The sentence-transformers module shipped in the folder (see `st_module.py`).
ST_MODULE_FILE = "custom_st.py"


@dataclass
class CardInfo:
    """What the model card says besides the code: Hub id, lineage, data and results."""

    repo_id: str = "org/crem"
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    eval_results: dict[str, Any] | None = None  # an `mmeb_results.json` as written by `evaluate_mmeb`
    # more `huggingface_hub.EvalResult` entries, e.g. from mteb result files (crem_hf.integrations.mteb)
    extra_eval_results: list[Any] = field(default_factory=list)
    training: str = ""  # a short description of how this checkpoint was trained


# ---------------------------------------------------------------------------------------------------- loading


def load_for_export(path: str | os.PathLike, base_model: str | os.PathLike | None = None, merge: bool = True):
    """
    `(model, processor)` from a CREM folder, or from a LoRA adapter folder (`adapter_config.json`, with its
    processor) on a CREM base or on the backbone checkpoint it was trained from (Qwen2-VL, Qwen2.5-VL, Qwen3-VL):
    `crem_hf.load_crem`, the one loader.

    Raises:
        ValueError: a plain backbone checkpoint (nothing trained to export), a missing processor, an adapter that
            does not fit the base (chorus ids or shapes), or weights that do not load exactly.
    """
    path = os.fspath(path)
    if (kind := checkpoint_kind(path)) in BACKBONE_CREM_CLASSES:
        raise ValueError(
            f"{path} is a plain {kind!r} checkpoint, not a trained CREM model: train it (examples/train_lora.py) and "
            "export the result, or convert it with crem_hf.load_crem and export that model with export_hub_folder."
        )
    return load_crem(path, base_model=base_model, merge=merge)


# ---------------------------------------------------------------------------------------------------- the card


def _results_rows(eval_results: dict[str, Any] | None, extra: list[Any] = ()) -> str:
    if not eval_results and not extra:
        return "No evaluation results were given for this export."
    tables = []
    if eval_results:
        rows = [(name, f"{100 * r['precision_at_1']:.1f}") for name, r in eval_results["subsets"].items()]
        rows += [(f"**{key}**", f"{100 * value:.1f}") for key, value in eval_results.get("summary", {}).items()]
        tables.append(format_markdown_table(("subset", "Precision@1"), rows))
    if extra:
        rows = [(e.dataset_name, e.dataset_split, e.metric_name, f"{e.metric_value:.2f}") for e in extra]
        tables.append(format_markdown_table(("task", "split", "metric", "score"), rows))
    return "\n".join(tables).rstrip("\n")


def render_model_card(config: CREMConfigMixin, info: CardInfo):
    """
    The model card (`huggingface_hub.ModelCard`): metadata, what CREM is, runnable usage, recipe, limitations. The
    backbone (its name, its plain class and the CREM class) is read from the CREM config's `model_type`.

    Raises:
        ValueError: `config` is not a CREM config of a known backbone.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    crem_class = CREM_CLASSES.get(getattr(config, "model_type", None))
    if crem_class is None:
        raise ValueError(
            f"A model card needs a CREM config ({', '.join(CREM_CLASSES)}), got {type(config).__name__} "
            f"({getattr(config, 'model_type', None)!r})."
        )
    backbone_class = crem_class._backbone_class

    eval_results = []
    for name, result in ((info.eval_results or {}).get("subsets") or {}).items():
        eval_results.append(
            EvalResult(
                task_type="feature-extraction",
                dataset_type="TIGER-Lab/MMEB-eval",
                dataset_name=f"MMEB {name}",
                dataset_config=name,
                dataset_split="test",
                metric_type="precision_at_1",
                metric_name="Precision@1",
                metric_value=round(100 * result["precision_at_1"], 2),
            )
        )
    eval_results += info.extra_eval_results
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=info.license,
        base_model=info.base_model,
        datasets=info.datasets or None,
        tags=[
            "crem",
            backbone_class.config_class.model_type,
            "multimodal-embedding",
            "retrieval",
            "sentence-transformers",
            "custom_code",
        ],
        model_name=info.repo_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    template = resources.files("crem_hf").joinpath("model_card_template.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        data,
        template_str=template,
        repo_id=info.repo_id,
        backbone=crem_class._backbone_title,
        crem_class=crem_class.__name__,
        backbone_class=backbone_class.__name__,
        num_chorus_tokens=config.num_chorus_tokens,
        hidden_size=config.text_config.hidden_size,
        results=_results_rows(info.eval_results, info.extra_eval_results),
        training=info.training or "See the crem-hf repository for the training recipe.",
    )


# ---------------------------------------------------------------------------------------------------- export


def _check_target(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{output_dir} exists and is not a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"{output_dir} is not empty; pass overwrite=True (--overwrite) to replace it.")


# An export to NAME works in hidden entries beside it that share one random STEM (`.NAME.incomplete-XXXXXXXX`):
# `STEM.lock`, flock-ed for the whole export, then the staging folder `STEM` and, when it replaces an older
# folder, `STEM.old` (that folder on its way out). The lock is taken before the folders exist and released after
# they are gone, so a folder whose lock nobody holds belongs to an export that died (the kernel drops the locks
# of a process however it ends, SIGKILL included) and can go; one whose lock is held is never touched.
_LOCK_SUFFIX = ".lock"
_RETIRED_SUFFIX = ".old"
#: Hidden export folders without a lock come from crem-hf versions before the lock; they are removed once they
#: have not changed for this long.
UNLOCKED_STALE_SECONDS = 3600


def _staging_prefix(output_dir: str) -> str:
    return f".{os.path.basename(output_dir)}.incomplete-"


def _open_staging(output_dir: str) -> tuple[str, int | None]:
    """A new staging folder beside `output_dir` (mode from the umask) and the descriptor of its held lock."""
    parent, prefix = os.path.dirname(output_dir), _staging_prefix(output_dir)
    if fcntl is None:
        return tempfile.mkdtemp(prefix=prefix, dir=parent), None
    while True:
        lock, lock_path = tempfile.mkstemp(prefix=prefix, suffix=_LOCK_SUFFIX, dir=parent)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A clean-up may have taken the fresh lock file for an orphan and removed it before we locked it.
            if not os.path.samestat(os.fstat(lock), os.stat(lock_path)):
                raise FileNotFoundError(lock_path)
        except (BlockingIOError, FileNotFoundError):  # that clean-up removes (or removed) the file: try another
            os.close(lock)
            continue
        staging = lock_path[: -len(_LOCK_SUFFIX)]
        try:
            os.mkdir(staging)  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
        except BaseException as error:
            os.unlink(lock_path)
            os.close(lock)
            if isinstance(error, FileExistsError):  # an older version's folder of the same name: pick another
                continue
            raise
        return staging, lock


def _close_staging(staging: str, lock: int | None) -> None:
    """Remove what is left of the staging folder, then its lock file, and release the lock (in that order)."""
    leftovers = False
    for folder in (staging, staging + _RETIRED_SUFFIX):
        if os.path.lexists(folder):
            shutil.rmtree(folder, ignore_errors=True)
            leftovers |= os.path.lexists(folder)
    if lock is not None:
        if not leftovers:  # else the lock file stays, released, so that the next export removes them
            try:
                os.unlink(staging + _LOCK_SUFFIX)
            except FileNotFoundError:
                pass
        os.close(lock)


def remove_stale_exports(output_dir: str | os.PathLike) -> list[str]:
    """
    Remove what interrupted exports to `output_dir` left beside it: hidden staging folders `.NAME.incomplete-*`
    (and `.NAME.old-*` of older versions) whose export process is gone. A folder whose export still runs, in this
    process or another, is never touched. Runs at the start of every export to `output_dir`.

    Returns:
        The paths removed.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    parent, prefix = os.path.dirname(output_dir), _staging_prefix(output_dir)
    legacy_prefix = f".{os.path.basename(output_dir)}.old-"
    try:
        entries = sorted(os.listdir(parent)) if fcntl is not None else []
    except OSError:  # nothing to clean where we cannot look
        return []
    removed: list[str] = []
    stems = set()
    for entry in entries:
        if entry.startswith(prefix):
            stems.add(entry.removesuffix(_LOCK_SUFFIX).removesuffix(_RETIRED_SUFFIX))
        elif entry.startswith(legacy_prefix):
            removed += _remove_if_unchanged(os.path.join(parent, entry))
    for stem in sorted(stems):
        removed += _remove_if_dead(os.path.join(parent, stem))
    return removed


def _removed(folders: list[str]) -> list[str]:
    """Remove `folders` as far as we may (another user's stay); returns those that are gone."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return [folder for folder in folders if not os.path.lexists(folder)]


def _remove_if_unchanged(folder: str) -> list[str]:
    """An unlocked hidden folder (an older version's): removed once it has not changed for a while."""
    try:
        idle = time.time() - os.lstat(folder).st_mtime
    except OSError:
        return []
    if idle < UNLOCKED_STALE_SECONDS or not os.path.isdir(folder):
        return []
    return _removed([folder])


def _remove_if_dead(stem: str) -> list[str]:
    """The folders of one staging stem, and its lock file, if no live export holds the lock."""
    lock_path = stem + _LOCK_SUFFIX
    try:
        lock = os.open(lock_path, os.O_RDWR)  # (on NFS, an exclusive lock needs a writable descriptor)
    except FileNotFoundError:
        return [path for folder in (stem, stem + _RETIRED_SUFFIX) for path in _remove_if_unchanged(folder)]
    except OSError:
        return []  # another user's export: not ours to judge
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(lock), os.stat(lock_path)):
                return []  # replaced since we opened it: not the file we hold
        except OSError:  # BlockingIOError: its export is running; FileNotFoundError: cleaned meanwhile
            return []
        folders = [path for path in (stem, stem + _RETIRED_SUFFIX) if os.path.isdir(path)]
        removed = _removed(folders)
        if removed == folders:  # else the lock file stays, for a later try
            try:
                os.unlink(lock_path)
            except OSError:
                pass
        return removed
    finally:
        os.close(lock)


def export_hub_folder(
    model,
    processor: CREMProcessor,
    output_dir: str | os.PathLike,
    info: CardInfo | None = None,
    merge: bool = True,
    overwrite: bool = False,
    space_requirement: str | None = None,
) -> str:
    """
    Write a complete Hub folder for `model` (a CREM model or a peft model on one) and `processor`.

    The folder is assembled under a hidden name beside `output_dir` (`.NAME.incomplete-*`) and renamed into place
    at the end, so an interrupted export never leaves a folder that looks complete, and an existing folder is
    replaced only by a finished one. What a killed export leaves behind is removed by the next export to the same
    `output_dir` (`remove_stale_exports`). Files and folders get the umask's permissions.

    Args:
        merge: merge LoRA into the weights (default); `False` writes the adapter alone (its base must be on the
            Hub: the card loads it with peft).
        overwrite: replace a non-empty `output_dir`.
        space_requirement: also write a Space-ready `app.py` (the `crem-demo` app on this folder) and a
            `requirements.txt` holding this install line of crem-hf (see `space_files`).
    Returns:
        The folder's path.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    _check_target(output_dir, overwrite)
    info = info or CardInfo()
    if not isinstance(processor, CREMProcessor):
        raise ValueError("A CREMProcessor is needed to export a usable folder (the processor builds every prompt).")
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    remove_stale_exports(output_dir)
    staging, lock = _open_staging(output_dir)
    try:
        exported = merge_adapter(model) if merge else model
        config = exported.config if merge else exported.get_base_model().config
        exported.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if merge:
            _write_sentence_transformers_files(staging)
        render_model_card(config, info).save(os.path.join(staging, "README.md"))
        if space_requirement is not None:
            write_space_files(staging, info.repo_id, space_requirement)
        pickles = [name for name in os.listdir(staging) if name.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise RuntimeError(f"The export wrote pickle files {pickles}; refusing to publish them.")
        apply_umask(staging)  # safetensors writes its files 0600
        if os.path.exists(output_dir):
            retired = staging + _RETIRED_SUFFIX
            os.replace(output_dir, retired)
            try:
                os.replace(staging, output_dir)
            except BaseException:
                os.replace(retired, output_dir)  # the old folder stays where it was
                raise
        else:
            os.replace(staging, output_dir)
    finally:
        _close_staging(staging, lock)  # the retired folder, or the staging folder after a failure
    return output_dir


def _write_sentence_transformers_files(folder: str) -> None:
    """The custom sentence-transformers module and the files that point at it."""
    source = resources.files("crem_hf").joinpath("st_module.py").read_text(encoding="utf-8")
    write_text_atomically(os.path.join(folder, ST_MODULE_FILE), source)
    # One module: get_embedding already L2-normalises (config.normalize_embeddings), so no Normalize module.
    modules = [{"idx": 0, "name": "0", "path": "", "type": "custom_st.CREMSentenceEmbedding"}]
    write_text_atomically(os.path.join(folder, "modules.json"), json.dumps(modules, indent=2) + "\n")
    settings = {
        "model_type": "SentenceTransformer",
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    write_text_atomically(
        os.path.join(folder, "config_sentence_transformers.json"), json.dumps(settings, indent=2) + "\n"
    )


_SPACE_APP = '''"""The crem-demo Gradio app for a CREM model, written by `crem-export --space`.

Serves CREM_MODEL (a folder or a Hub id) when set, else the model in this file's folder when there is one (`python
app.py` in the exported folder), else the Hub model {repo_id!r}: copy this file and requirements.txt into a Gradio
Space and it serves that model.
"""

import os

from crem_hf.demo.app import build_app, launch, load_demo_model

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL = any(os.path.isfile(os.path.join(HERE, name)) for name in ("config.json", "adapter_config.json"))
MODEL = os.environ.get("CREM_MODEL") or (HERE if LOCAL else {repo_id!r})

if __name__ == "__main__":
    model, processor = load_demo_model(MODEL)
    launch(build_app(model, processor), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"), port=7860)
'''


def space_files(repo_id: str, requirement: str) -> dict[str, str]:
    """
    The files of a Space for the model: `app.py` (the `crem-demo` app, `crem_hf.demo.app`, on the model folder it
    sits in, or on `repo_id`) and `requirements.txt` (`requirement`, the crem-hf install line with its demo extra,
    e.g. `crem-hf[demo]==0.1.0` or `crem-hf[demo] @ git+https://...`).
    """
    if not requirement.strip() or "\n" in requirement:
        raise ValueError(f"The Space requirement must be one install line, got {requirement!r}.")
    return {"app.py": _SPACE_APP.format(repo_id=repo_id), "requirements.txt": requirement.strip() + "\n"}


def write_space_files(folder: str | os.PathLike, repo_id: str, requirement: str) -> list[str]:
    """Write `space_files` into `folder` (atomically, each); returns their paths."""
    paths = []
    for name, text in space_files(repo_id, requirement).items():
        paths.append(os.path.join(os.fspath(folder), name))
        write_text_atomically(paths[-1], text)
    return paths


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` if needed and upload the exported folder. Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=os.fspath(folder), repo_id=repo_id, commit_message="Upload CREM model")
    return str(commit)


def _read_eval_results(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"--eval-results {path} is not JSON: {error}.") from error
    if not isinstance(results, dict) or not isinstance(results.get("subsets"), dict):
        raise ValueError(f"--eval-results {path} is not an mmeb_results.json (no 'subsets' mapping).")
    return results


def _read_mteb_results(paths: list[str]) -> list[Any]:
    try:
        from .integrations.mteb import mteb_eval_results
    except ImportError as error:
        raise ValueError(f"--mteb-results needs mteb ({error}): pip install 'crem-hf[mteb]'.") from error
    try:
        return mteb_eval_results(paths)
    except ValueError as error:
        raise ValueError(f"--mteb-results: {error}") from error


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="crem-export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="CREM folder or LoRA adapter folder (with its processor)")
    parser.add_argument("--base-model", default=None, help="base CREM folder of an adapter (default: its config's)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--adapter-only", action="store_true", help="export the adapter instead of merged weights")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--repo-id", default="org/crem")
    parser.add_argument("--card-base-model", default=None, help="the `base_model` of the card's metadata")
    parser.add_argument("--datasets", nargs="*", default=[])
    parser.add_argument("--eval-results", default=None, help="an mmeb_results.json for the card's model-index")
    parser.add_argument("--mteb-results", nargs="+", default=[], help="mteb result files or folders, for the same")
    parser.add_argument("--push", action="store_true", help="upload to --repo-id after exporting")
    parser.add_argument("--private", action="store_true")
    parser.add_argument(
        "--space",
        nargs="?",
        const=f"crem-hf[demo]=={__version__}",
        default=None,
        metavar="REQUIREMENT",
        help="also write a Gradio Space (app.py, requirements.txt with REQUIREMENT, default crem-hf[demo]==version)",
    )
    return parser


def export_from_args(args: argparse.Namespace) -> str:
    """
    Run a parsed `crem-export`: the target, its parent folder and the card's inputs are checked before the model is
    loaded. Prints the folder (and the upload's commit) to stdout; returns the folder.
    """
    output_dir = os.path.abspath(args.output_dir)
    _check_target(output_dir, args.overwrite)
    check_writable_folder(os.path.dirname(output_dir))
    check_model_source(args.model)
    eval_results = _read_eval_results(args.eval_results) if args.eval_results else None
    mteb_results = _read_mteb_results(args.mteb_results) if args.mteb_results else []
    model, processor = load_for_export(args.model, args.base_model, merge=not args.adapter_only)
    info = CardInfo(
        args.repo_id, args.card_base_model, args.datasets, eval_results=eval_results, extra_eval_results=mteb_results
    )
    with torch.no_grad():
        folder = export_hub_folder(
            model,
            processor,
            output_dir,
            info,
            merge=not args.adapter_only,
            overwrite=args.overwrite,
            space_requirement=args.space,
        )
    print(f"Exported {folder}")
    if args.push:
        print(push_folder(folder, args.repo_id, private=args.private))
    return folder


def main(argv: list[str] | None = None) -> int:
    """The `crem-export` command: exit status 0 on success, 1 with a one-line reason on stderr (2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    return run_command("crem-export", lambda: export_from_args(args))


if __name__ == "__main__":
    raise SystemExit(main())
