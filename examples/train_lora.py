"""Train CREM: LoRA (r 16, alpha 64, q/k/v/o of the language model) plus the chorus rows, on retrieval pairs
(MMEB-train form) and conversations (LLaVA / ShareGPT4V form), with the mixed loss 1 x InfoNCE + 0.5 x LM and
p = 0.5 compressed generation samples. Defaults follow the paper's Table 1.

    # one process (any backbone: Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-2B-Instruct)
    python examples/train_lora.py --model Qwen/Qwen3-VL-2B-Instruct --output_dir out \\
        --retrieval_data mmeb_train.jsonl --retrieval_image_root images/ \\
        --generation_data sharegpt4v_mix665k.json --generation_image_root images/
    # several (CPU: gloo; GPU: nccl)
    torchrun --nproc_per_node 8 examples/train_lora.py ... [--deepspeed examples/ds_zero2.json --bf16]
    accelerate launch --multi_gpu --num_processes 8 examples/train_lora.py ...

`--model` takes a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (converted on the fly, N chorus tokens added) or a CREM
folder of any of them; LoRA targets the q/k/v/o projections of that model's language model, found on the model.
`--matryoshka_dims 64 128 256 512 full` trains Matryoshka embeddings (the InfoNCE loss averaged over the
re-normalised prefixes); the saved model records them (`config.matryoshka_dims`; beside an adapter, in
crem_adapter_settings.json) and `get_embedding(dim=...)` accepts exactly those.
Checkpoints hold the adapter (with the chorus rows) and the processor; `--resume_from_checkpoint` continues a run.
The run's summary (bad rows skipped per reason, final metrics) is written to `<output_dir>/run_summary.json`.
Exit status 0 on success; 1 with a one-line reason on stderr for a bad input (2: bad usage).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, set_seed

from crem_hf.io import apply_umask, run_command, write_json_atomically
from crem_hf.loading import load_crem
from crem_hf.training import (
    CREMTrainingArguments,
    apply_lora,
    build_trainer,
    load_conversations,
    load_retrieval_pairs,
    whole_run_loss,
)

logger = logging.getLogger("train_lora")
PROG = "examples/train_lora.py"


@dataclass
class ModelArguments:
    model: str = field(
        default="Qwen/Qwen2-VL-2B-Instruct",
        metadata={"help": "A Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, or a CREM folder."},
    )
    num_chorus_tokens: int = field(default=16, metadata={"help": "N chorus tokens (when converting a backbone)."})
    lora: bool = field(default=True, metadata={"help": "LoRA + chorus rows; False trains every weight."})
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2 (compression runs on any of them)."}
    )
    min_image_tokens: int = field(default=256, metadata={"help": "Fewest merged image tokens per image."})
    max_image_tokens: int = field(default=1280, metadata={"help": "Most merged image tokens per image."})
    max_length: int | None = field(default=None, metadata={"help": "Longest row in tokens; cuts input text only."})


@dataclass
class DataArguments:
    retrieval_data: list[str] | None = field(
        default=None,
        metadata={
            "help": "MMEB-train json/jsonl/parquet file(s), a local copy of MMEB-train (a folder of "
            "<subset>/original-*.parquet) or a Hub name."
        },
    )
    retrieval_subset: list[str] | None = field(
        default=None, metadata={"help": "Subset(s) of a --retrieval_data folder (default: all) or Hub dataset."}
    )
    retrieval_split: str = field(
        default="original", metadata={"help": "MMEB-train split: original or diverse_instruction."}
    )
    retrieval_image_root: str | None = None
    generation_data: list[str] | None = field(
        default=None, metadata={"help": "LLaVA-form json/jsonl/parquet or Hub name."}
    )
    generation_split: str = "train"
    generation_image_root: str | None = None
    homogeneous_batches: bool = field(
        default=False, metadata={"help": "Each step's retrieval rows come from one --retrieval_data file (subset)."}
    )
    on_bad_row: str = field(default="skip", metadata={"help": "skip (counted, with a warning) or raise."})
    allow_paths_outside_image_root: bool = field(
        default=False,
        metadata={"help": "Accept image paths that leave the image root (absolute, or with ../); else bad rows."},
    )
    preprocessing_num_proc: int | None = None


class ArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose usage errors are one line, as every crem-hf command's."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _source(paths: list[str]) -> str | list[str]:
    return paths[0] if len(paths) == 1 else paths


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the run's summary (also written to `<output_dir>/run_summary.json`)."""
    parser = ArgumentParser((ModelArguments, DataArguments, CREMTrainingArguments), prog=PROG)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    if not data_args.retrieval_data and not data_args.generation_data:
        parser.error("give --retrieval_data, --generation_data or both")

    # Everything the script builds (chorus rows, LoRA matrices, data order, compress flags) follows --seed.
    set_seed(training_args.seed)
    model, processor = load_crem(
        model_args.model,
        num_chorus_tokens=model_args.num_chorus_tokens,
        attn_implementation=model_args.attn_implementation,
        dtype=torch.bfloat16 if training_args.bf16 else torch.float32,
    )
    processor.set_image_token_range(model_args.min_image_tokens, model_args.max_image_tokens)
    processor.max_length = model_args.max_length
    if model_args.lora:
        model = apply_lora(model, r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()

    reports, retrieval, generation = [], None, None
    read = {
        "on_bad_row": data_args.on_bad_row,
        "num_proc": data_args.preprocessing_num_proc,
        "allow_outside_root": data_args.allow_paths_outside_image_root,
    }
    with training_args.main_process_first(desc="reading data"):
        if data_args.retrieval_data:
            retrieval, report = load_retrieval_pairs(
                _source(data_args.retrieval_data),
                image_root=data_args.retrieval_image_root,
                split=data_args.retrieval_split,
                subset=_source(data_args.retrieval_subset) if data_args.retrieval_subset else None,
                **read,
            )
            reports.append(report)
        if data_args.generation_data:
            generation, report = load_conversations(
                _source(data_args.generation_data),
                image_root=data_args.generation_image_root,
                split=data_args.generation_split,
                **read,
            )
            reports.append(report)
    for report in reports:
        logger.info(report.summary())
    trainer = build_trainer(
        model,
        processor,
        training_args,
        retrieval,
        generation,
        homogeneous=data_args.homogeneous_batches,
        on_bad_row=data_args.on_bad_row,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    summary = {
        "model": asdict(model_args),
        "data": [report.as_dict() for report in reports],
        # Rows the processor could not build, left out while training (counted by this process).
        "skipped_while_collating": dict(trainer.data_collator.skipped),
        # The Trainer's train_loss covers the steps since the last resume; the summary's covers the whole run.
        "train": {**result.metrics, "train_loss": whole_run_loss(trainer.state.log_history)},
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        write_json_atomically(os.path.join(training_args.output_dir, "run_summary.json"), summary)
        # safetensors writes its files 0600 whatever the umask: give the run's files the modes others' get.
        apply_umask(training_args.output_dir)
    # Every process leaves together: one that exits while another still talks to the group gets aborted by gloo.
    trainer.accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    raise SystemExit(run_command(PROG, lambda: main(sys.argv[1:])))
