"""CREM training: data readers, collator, losses, LoRA and the Trainer (`pip install crem-hf[train]`)."""

from .batch import GenerationBatch, RetrievalBatch, StepBatch
from .builder import build_trainer
from .collator import CREMCollator, content_key
from .data import MixedStepDataset, SkipReport, load_conversations, load_retrieval_pairs, read_rows
from .lora import LORA_TARGET_MODULES, apply_lora
from .losses import ContrastiveOutput, InfoNCELoss
from .run_log import whole_run_loss
from .trainer import CREMTrainer, CREMTrainingArguments, split_embedding_batch

__all__ = [
    "LORA_TARGET_MODULES",
    "ContrastiveOutput",
    "CREMCollator",
    "CREMTrainer",
    "CREMTrainingArguments",
    "GenerationBatch",
    "InfoNCELoss",
    "MixedStepDataset",
    "RetrievalBatch",
    "SkipReport",
    "StepBatch",
    "apply_lora",
    "build_trainer",
    "content_key",
    "load_conversations",
    "load_retrieval_pairs",
    "read_rows",
    "split_embedding_batch",
    "whole_run_loss",
]
