"""The main job on the embedded default: train and evaluate a tiny CREM end to end, offline, on a CPU.

    python -m crem_hf.demo.main [--output-dir outputs/main] [--seed 0] [--backbone qwen2_vl|qwen2_5_vl|qwen3_vl]
                                [--matryoshka-dims 32 64]

1. Build the digit data (real scans from scikit-learn) in the MMEB / LLaVA forms.
2. Stage 1: train a tiny model of the backbone (Qwen2-VL by default; Qwen2.5-VL or Qwen3-VL with `--backbone`, each
   shaped as its real config at the same tiny width) from scratch to answer questions about the images natively
   (plain chat prompt, the backbone's own template and patch size): the stand-in for a pretrained VLM.
3. Stage 2: convert it to CREM (16 chorus tokens; the backbone's CREM class) and train LoRA + chorus rows with
   1 x InfoNCE + 0.5 x LM, each generation sample compressed with p = 0.5 (360 steps; 720 on the tied-head
   Qwen2.5-VL and Qwen3-VL stand-ins, `BACKBONE_SETTINGS`).
4. Evaluate stage 1, the converted model before stage 2, and after stage 2.
5. Visual memory: index the held-out scans (`memory/`, LanceDB), search them with text queries, answer from the
   stored contexts and measure bytes per item and the time to the first token (`memory_stage`); then search them
   with int8 / binary vectors re-scored exactly (`search_format_stage`).
With `--matryoshka-dims`, stage 2 trains Matryoshka embeddings at those dims (and the full size), the retrieval
metrics are measured at each dim, and, for comparison, the plain stage 2 (no dims, as the default job) is trained
from the same stage-1 model and measured truncated at the same dims.
Print the tables and write `results.json`, `results.md`, `training.png` and the trained model (`model/`, LoRA
merged, Hub remote code). Each records the backbone (`results.json`: `"backbone"`; the model: its CREM config's
`model_type`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from argparse import SUPPRESS
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from ..configuration_crem import check_matryoshka_dims
from ..evaluation import (
    evaluate_compositional,
    evaluate_generation,
    evaluate_image_text_retrieval,
    evaluate_mmeb,
    load_caption_rows,
)
from ..formats import conversation_messages
from ..io import (
    ArgumentParser,
    apply_umask,
    format_markdown_table,
    run_command,
    write_json_atomically,
    write_text_atomically,
)
from ..loading import merge_adapter
from ..processing_crem import CREMProcessor
from ..testing import BACKBONES, make_tiny_qwen2vl, make_tiny_qwen2vl_processor, make_tiny_tokenizer
from ..training import (
    CREMTrainingArguments,
    apply_lora,
    build_trainer,
    load_conversations,
    load_retrieval_pairs,
)
from .digits import DIGIT_REGISTRY, PROMPT_CORPUS, SCAN_SIDE, DigitsData, build_digits_data
from .memory_stage import memory_stage, search_format_stage

__all__ = [
    "BACKBONE_SETTINGS",
    "MainJobConfig",
    "Workspace",
    "main",
    "prepare",
    "run",
    "train_stage1",
    "train_stage2",
]

#: Where a backbone's main job departs from the defaults (Qwen2-VL's, which reach the targets in 360 stage-2 steps).
#: The rule: stage 2 runs until its training losses flatten. The tied-embedding stand-ins of Qwen2.5-VL and Qwen3-VL
#: start further from the CREM objective (Qwen2.5-VL's chorus embeddings collapse to one vector for ~200 steps;
#: Qwen3-VL's native answers break on the CREM prompt and must be relearnt), and their losses were still falling at
#: step 360: twice the steps, at the same learning rate and warm-up (README, "Main job per backbone").
BACKBONE_SETTINGS: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {"stage2_steps": 720},
    "qwen3_vl": {"stage2_steps": 720},
}


@dataclass
class MainJobConfig:
    """
    Settings of the main job (calibrated to reach the targets on 2 CPU cores in a few minutes): the defaults are
    Qwen2-VL's; `for_backbone` gives another backbone's (`BACKBONE_SETTINGS`).
    """

    output_dir: str = "outputs/main"
    seed: int = 0
    stage1_steps: int = 300
    stage2_steps: int = 360
    batch_size: int = 64
    stage1_learning_rate: float = 1e-3
    stage2_learning_rate: float = 2e-3
    warmup_steps: int = 30
    num_chorus_tokens: int = 16
    compress_probability: float = 0.5
    alpha_g: float = 0.5
    pooling: str = "mean"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vision_embed_dim: int = 64
    vocab_size: int = 512
    eval_batch_size: int = 120
    lora: bool = True
    #: The backbone of the tiny model, a key of `crem_hf.testing.BACKBONES`.
    backbone: str = "qwen2_vl"
    #: Stage 2's Matryoshka dims (ints or "full", strictly increasing); the hidden size is added as the last if
    #: missing. None (the default): the full embedding only.
    matryoshka_dims: list[int | str] | None = None

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {self.backbone!r}.")
        if self.matryoshka_dims is not None:
            dims = check_matryoshka_dims(self.matryoshka_dims, self.hidden_size, "--matryoshka-dims")
            self.matryoshka_dims = dims if dims[-1] == self.hidden_size else [*dims, self.hidden_size]

    @classmethod
    def for_backbone(cls, backbone: str = "qwen2_vl", **settings) -> MainJobConfig:
        """The settings of `backbone`'s main job: the defaults, its `BACKBONE_SETTINGS`, then `settings`."""
        return cls(backbone=backbone, **{**BACKBONE_SETTINGS.get(backbone, {}), **settings})


class PlainChatCollator:
    """Stage 1: plain chat prompts of the backbone (no chorus block) with labels on every answer."""

    def __init__(self, processor: CREMProcessor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        conversations = [conversation_messages(row["image"], row["turns"]) for row in rows]
        batch = self.processor.process_chat(conversations=conversations, compress_layout=False, return_labels=True)
        return dict(batch)


def _history(state, key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in state.log_history if key in entry]


def _common_args(config: MainJobConfig, folder: str, steps: int, learning_rate: float) -> dict[str, Any]:
    return {
        "output_dir": folder,
        "max_steps": steps,
        "learning_rate": learning_rate,
        "warmup_steps": config.warmup_steps,
        "lr_scheduler_type": "cosine",
        "weight_decay": 0.0,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": config.seed,
        "disable_tqdm": False,
        "remove_unused_columns": False,
    }


#: The retrieval metrics the Matryoshka table reports at each dim (`evaluate_retrieval`'s, besides each P@1).
RECALL_METRICS = ("pairs t2i R@1", "pairs i2t R@1")


def evaluate_retrieval(
    model, processor: CREMProcessor, data, config: MainJobConfig, folder: str | None = None, dim: int | None = None
) -> dict[str, float]:
    """
    P@1 of every digits / pairs subset and the pairs R@1 both ways (360 images, 360 captions), at the embedding
    size `dim` (None: the full one); `folder`, if given, gets the MMEB result files.
    """
    model.eval()
    size = config.eval_batch_size
    mmeb = evaluate_mmeb(
        model, processor, data.eval_folder, data.subsets, data.folder, folder, size, DIGIT_REGISTRY, dim=dim
    )
    results = {f"P@1 {k}": v["precision_at_1"] for k, v in mmeb["subsets"].items()}
    captions = load_caption_rows(data.captions, ("captions",), data.folder)
    recall = evaluate_image_text_retrieval(model, processor, captions, size, dim=dim)
    results[RECALL_METRICS[0]], results[RECALL_METRICS[1]] = recall["t2i_R@1"], recall["i2t_R@1"]
    return results


def evaluate_crem(model, processor: CREMProcessor, data, config: MainJobConfig, folder: str) -> dict[str, Any]:
    """Every CREM metric on the held-out digits: retrieval P@1, QA native/compressed, swap, caption recall."""
    model.eval()
    size = config.eval_batch_size
    retrieval = evaluate_retrieval(model, processor, data, config, folder)
    results: dict[str, Any] = {k: v for k, v in retrieval.items() if k not in RECALL_METRICS}
    for name, path in (("single", data.qa_single), ("pairs", data.qa_pairs)):
        rows = load_caption_rows(path, ("question", "answer"), data.folder)
        for mode in ("native", "compressed"):
            scored = evaluate_generation(model, processor, rows, compress=mode == "compressed", batch_size=size)
            results[f"QA {name} {mode}"] = scored["accuracy"]
    results["swap accuracy"] = evaluate_compositional(
        model, processor, load_caption_rows(data.swap, ("caption", "negative_caption"), data.folder), size
    )["accuracy"]
    results.update({k: retrieval[k] for k in RECALL_METRICS})
    return results


def evaluate_dims(model, processor: CREMProcessor, data, config: MainJobConfig, full: dict[str, float]):
    """
    `evaluate_retrieval` at each of `config.matryoshka_dims` below the hidden size, and `full`'s figures (the
    model's `evaluate_crem` results) at the hidden size. The model must accept each dim (`config.matryoshka_dims`).

    Returns:
        `{dim: {metric: value}}`, ascending dims.
    """
    per_dim = {dim: evaluate_retrieval(model, processor, data, config, dim=dim) for dim in config.matryoshka_dims[:-1]}
    per_dim[config.hidden_size] = {k: v for k, v in full.items() if k.startswith("P@1") or k in RECALL_METRICS}
    return per_dim


def matryoshka_stage(
    workspace: Workspace, base, config: MainJobConfig, trained, processor, after: dict[str, float], rng: torch.Tensor
):
    """
    Retrieval at each of `config.matryoshka_dims`: of `trained` (stage 2 with the dims; `after`: its
    `evaluate_crem` results), and of the baseline, the plain stage 2 (no dims: the default job's) trained from the
    same stage-1 `base` and the same global RNG state `rng` as `trained` was (the LoRA initialisation draws from
    it), so that the two differ by the dims alone. The plain model's config claims the dims for this measurement
    only, so that `get_embedding(dim=...)` gives its renormalised prefixes (naive truncation).

    Returns:
        `(the plain model's evaluate_crem results, {"trained with dims" | "plain stage 2, truncated": per dim})`.
    """
    plain_config = dataclasses.replace(config, matryoshka_dims=None)
    folder = os.path.join(config.output_dir, "plain")
    with torch.random.fork_rng(devices=[]):
        torch.random.set_rng_state(rng)
        plain, _, _, plain_after, _ = train_stage2(workspace, base, plain_config, folder, evaluate_before=False)
    plain.config.matryoshka_dims = config.matryoshka_dims
    return plain_after, {
        "trained with dims": evaluate_dims(trained, processor, workspace.data, config, after),
        "plain stage 2, truncated": evaluate_dims(plain, processor, workspace.data, config, plain_after),
    }


def evaluate_base(model, processor: CREMProcessor, data, config: MainJobConfig) -> dict[str, float]:
    """Stage 1 answers natively on the plain chat prompt (it has no chorus tokens)."""
    model.eval()
    results = {}
    for name, path in (("single", data.qa_single), ("pairs", data.qa_pairs)):
        rows = load_caption_rows(path, ("question", "answer"), data.folder)
        scored = evaluate_generation(
            model, processor, rows, compress=False, batch_size=config.eval_batch_size, chorus=False
        )
        results[f"QA {name} native"] = scored["accuracy"]
    return results


def markdown_report(results: dict[str, dict[str, float]]) -> str:
    columns = list(results)
    metrics = list(dict.fromkeys(metric for column in results.values() for metric in column))
    rows = [
        [metric, *(f"{100 * results[c][metric]:.1f}" if metric in results[c] else "-" for c in columns)]
        for metric in metrics
    ]
    return format_markdown_table(["metric", *columns], rows)


def memory_report(memory: dict[str, Any]) -> str:
    """The memory stage as a two-column table: fractions in %, bytes and seconds as they are."""
    rows = []
    for name, value in memory.items():
        if isinstance(value, bool):
            shown = "yes" if value else "no"
        elif isinstance(value, float) and ("R@1" in name or "accuracy" in name or name.startswith("QA")):
            shown = f"{100 * value:.1f}"
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        else:
            shown = str(value)
        rows.append([name, shown])
    return format_markdown_table(["visual memory (after stage 2)", "value"], rows)


def search_report(search: dict[str, Any]) -> str:
    """The search-format stage as a table: layout x R@1 (%), and the re-scoring it ran with."""
    layouts = search["layouts"]
    metrics = list(dict.fromkeys(metric for row in layouts.values() for metric in row))
    rows = [[name, *(f"{100 * row[m]:.1f}" for m in metrics)] for name, row in layouts.items()]
    return (
        f"Memory search with quantised / truncated vectors, top {search['rescore factor']} x k re-scored exactly "
        f"(max |score - exact cosine| {search['max |score - exact cosine|']:.1g}):\n\n"
        + format_markdown_table(["search vectors", *metrics], rows)
    )


def dims_report(matryoshka: dict[str, dict[int, dict[str, float]]]) -> str:
    """One table per model: metric x embedding dim, in %."""
    return "\n".join(
        f"Retrieval at each embedding dim, {name} (%):\n\n"
        + markdown_report({f"dim {dim}": metrics for dim, metrics in per_dim.items()})
        for name, per_dim in matryoshka.items()
    )


def plot(path: str, histories: dict[str, list[tuple[int, float]]], results: dict[str, dict[str, float]]) -> None:
    """Losses of both stages, and the metrics before / after stage 2, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, points in histories.items():
        if points:
            losses.plot([s for s, _ in points], [v for _, v in points], label=name)
    losses.set(xlabel="step", ylabel="loss", title="Training losses")
    losses.legend()
    names = [m for m in results["after stage 2"]]
    positions = torch.arange(len(names)).float()
    width = 0.4
    for offset, column in ((-width / 2, "before stage 2"), (width / 2, "after stage 2")):
        metrics.bar(positions + offset, [100 * results[column].get(n, 0.0) for n in names], width, label=column)
    metrics.set_xticks(positions.tolist(), names, rotation=60, ha="right", fontsize=8)
    metrics.set(ylabel="%", title="Held-out digits", ylim=(0, 100))
    metrics.legend()
    figure.tight_layout()
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)
    plt.close(figure)


@dataclass
class Workspace:
    """What both stages share: the written data, the read training rows, the tokenizer and the backbone."""

    data: DigitsData
    tokenizer: Any
    pairs: Any
    conversations: Any
    reports: list[dict]
    backbone: str = "qwen2_vl"

    def processor(self, num_chorus_tokens: int) -> CREMProcessor:
        """
        A CREM processor with N chorus tokens on the shared tokenizer (the base vocabulary stays the same), with the
        backbone's patch size and template. A scan is 4 merged image tokens and a pair 8 on every backbone: Qwen2-VL
        and Qwen2.5-VL take the 56 x 56 px scan as it is (2 x 2 tokens of 28 px), Qwen3-VL resizes it to 64 x 64 px
        (2 x 2 tokens of 32 px; `make_tiny_qwen2vl_processor` scales the pixel bounds by (32/28)^2).
        """
        pixels = {"min_pixels": SCAN_SIDE * SCAN_SIDE, "max_pixels": 2 * SCAN_SIDE * SCAN_SIDE}  # a scan or a pair
        # from_qwen2vl_processor copies it
        base = make_tiny_qwen2vl_processor(self.tokenizer, backbone=self.backbone, **pixels)
        # Qwen3-VL's template has no default system turn; the others' prompts keep the default system prompt.
        options = {"system_prompt": None} if self.backbone == "qwen3_vl" else {}
        return CREMProcessor.from_qwen2vl_processor(base, num_chorus_tokens=num_chorus_tokens, **options)


def prepare(config: MainJobConfig) -> Workspace:
    data = build_digits_data(os.path.join(config.output_dir, "data"), seed=config.seed)
    conversations, conversation_report = load_conversations(data.train_conversations, image_root=data.folder)
    pairs, pair_report = load_retrieval_pairs(data.train_retrieval, image_root=data.folder)
    tokenizer = make_tiny_tokenizer(config.vocab_size, corpus=PROMPT_CORPUS)
    reports = [pair_report.as_dict(), conversation_report.as_dict()]
    return Workspace(data, tokenizer, pairs, conversations, reports, backbone=config.backbone)


def train_stage1(workspace: Workspace, config: MainJobConfig):
    """
    A tiny plain model of the backbone (`config.backbone`: its tiny config at the main job's width) trained from
    scratch to answer natively. Returns the model and its loss history.
    """
    base = make_tiny_qwen2vl(
        workspace.tokenizer,
        seed=config.seed,
        backbone=config.backbone,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        vision_embed_dim=config.vision_embed_dim,
    ).train()
    args = TrainingArguments(
        per_device_train_batch_size=config.batch_size,
        max_grad_norm=1.0,
        **_common_args(
            config, os.path.join(config.output_dir, "stage1"), config.stage1_steps, config.stage1_learning_rate
        ),
    )
    collator = PlainChatCollator(workspace.processor(config.num_chorus_tokens))
    trainer = Trainer(model=base, args=args, train_dataset=workspace.conversations, data_collator=collator)
    trainer.train()
    return base.eval(), _history(trainer.state, "loss")


def train_stage2(workspace: Workspace, base, config: MainJobConfig, folder: str, evaluate_before: bool = True):
    """
    CREM from a copy of `base` (the base itself stays untouched; converted by its backbone's CREM class, e.g.
    `CREMForEmbeddingAndGeneration.from_qwen2vl` for Qwen2-VL): evaluated before training, trained (LoRA + chorus
    rows unless `config.lora` is off), merged and evaluated again.

    Returns:
        `(model, processor, results before (empty unless `evaluate_before`), results after, histories)`.
    """
    processor = workspace.processor(config.num_chorus_tokens)
    crem = BACKBONES[config.backbone][2].from_backbone(copy.deepcopy(base), processor)
    crem.config.pooling = config.pooling
    before = (
        evaluate_crem(crem, processor, workspace.data, config, os.path.join(folder, "eval_before"))
        if evaluate_before
        else {}
    )
    model = (apply_lora(crem) if config.lora else crem).train()
    args = CREMTrainingArguments(
        retrieval_batch_size=config.batch_size,
        generation_batch_size=config.batch_size,
        gradient_cache_chunk_size=None,
        alpha_g=config.alpha_g,
        matryoshka_dims=config.matryoshka_dims,
        compress_probability=config.compress_probability,
        **_common_args(config, os.path.join(folder, "stage2"), config.stage2_steps, config.stage2_learning_rate),
    )
    trainer = build_trainer(model, processor, args, workspace.pairs, workspace.conversations, homogeneous=True)
    trainer.train()
    trained = merge_adapter(model)
    after = evaluate_crem(trained, processor, workspace.data, config, os.path.join(folder, "eval_after"))
    histories = {
        "stage 2 contrastive": _history(trainer.state, "contrastive_loss"),
        "stage 2 LM": _history(trainer.state, "lm_loss"),
    }
    return trained, processor, before, after, histories


def run(config: MainJobConfig) -> dict[str, Any]:
    started = time.time()
    out = config.output_dir
    torch.manual_seed(config.seed)
    workspace = prepare(config)
    base, stage1_history = train_stage1(workspace, config)
    results = {
        "stage 1 (base)": evaluate_base(base, workspace.processor(config.num_chorus_tokens), workspace.data, config)
    }
    rng = torch.random.get_rng_state()  # what stage 2 starts from (evaluation draws nothing from it)
    trained, processor, before, after, histories = train_stage2(workspace, base, config, out)
    results["before stage 2"], results["after stage 2"] = before, after
    matryoshka = None
    if config.matryoshka_dims:
        plain_after, matryoshka = matryoshka_stage(workspace, base, config, trained, processor, after, rng)
        results["after stage 2 without dims"] = plain_after

    trained.save_pretrained(os.path.join(out, "model"))
    processor.save_pretrained(os.path.join(out, "model"))
    apply_umask(os.path.join(out, "model"))  # safetensors writes 0600 whatever the umask
    histories = {"stage 1 LM": stage1_history, **histories}
    plot(os.path.join(out, "training.png"), histories, results)
    memory = memory_stage(trained, processor, workspace.data, out, config.eval_batch_size)
    search = search_format_stage(trained, processor, workspace.data, out, config.eval_batch_size)
    summary = {
        "backbone": config.backbone,
        "config": asdict(config),
        "results": results,
        **({"matryoshka": matryoshka} if matryoshka else {}),
        "memory": memory,
        "search formats": search,
        "data": workspace.reports,
        "histories": histories,
        "seconds": round(time.time() - started, 1),
        # The figures are exact for one CPU kernel set: another instruction set (AVX2 vs AVX-512) rounds the
        # matmuls differently, and 660 training steps turn that into different held-out scores.
        "machine": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
    }
    table = "\n".join(
        [
            f"Backbone: {config.backbone}\n\n" + markdown_report(results),
            *([dims_report(matryoshka)] if matryoshka else []),
            memory_report(memory),
            search_report(search),
        ]
    )
    write_text_atomically(os.path.join(out, "results.md"), table)
    write_json_atomically(os.path.join(out, "results.json"), summary)
    print("\n" + table)
    print(
        f"Backbone: {config.backbone}. Done in {summary['seconds']} s. Results: {out}/results.json, "
        f"plot: {out}/training.png, model: {out}/model"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m crem_hf.demo.main`: exit status 0 on success, 1 with a one-line reason on stderr (2: bad usage)."""
    prog = "python -m crem_hf.demo.main"
    settings = "; ".join(f"{name}: {values}" for name, values in BACKBONE_SETTINGS.items())
    parser = ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], epilog=f"Other backbones' defaults: {settings}."
    )
    defaults = MainJobConfig()
    # Only the flags given reach the config: the others take the backbone's settings (`MainJobConfig.for_backbone`).
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "backbone":
            parser.add_argument(flag, choices=list(BACKBONES), default=value, help="the tiny model's backbone")
        elif name == "matryoshka_dims":
            help_text = "stage 2's Matryoshka dims, e.g. 32 64 (the full size is added); default: none"
            parser.add_argument(flag, nargs="+", metavar="DIM", default=SUPPRESS, help=help_text)
        elif isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=SUPPRESS)
        else:
            parser.add_argument(flag, type=type(value), default=SUPPRESS, help=f"default: {value}")
    try:
        config = MainJobConfig.for_backbone(**vars(parser.parse_args(argv)))
    except ValueError as error:  # a bad dim (or setting): bad usage, before anything runs
        parser.error(str(error))
    return run_command(prog, lambda: run(config))


if __name__ == "__main__":
    raise SystemExit(main())
