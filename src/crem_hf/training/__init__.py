"""CREM training: data readers, collator, losses, LoRA and the Trainer (`pip install crem-hf[train]`).

The public API is listed in `__all__`; the modules' helpers (`collator.content_key`,
`gradcache.split_embedding_batch`, ...) are internals.
"""

from .batch import GenerationBatch, RetrievalBatch, StepBatch
from .builder import build_trainer
from .collator import CREMCollator
from .data import MixedStepDataset, SkipReport, load_conversations, load_retrieval_pairs
from .gradcache import GradientCache
from .lora import apply_lora
from .losses import ContrastiveOutput, InfoNCELoss, MatryoshkaInfoNCELoss
from .run_log import whole_run_loss
from .trainer import CREMTrainer, CREMTrainingArguments

__all__ = [
    "ContrastiveOutput",
    "CREMCollator",
    "CREMTrainer",
    "CREMTrainingArguments",
    "GenerationBatch",
    "GradientCache",
    "InfoNCELoss",
    "MatryoshkaInfoNCELoss",
    "MixedStepDataset",
    "RetrievalBatch",
    "SkipReport",
    "StepBatch",
    "apply_lora",
    "build_trainer",
    "load_conversations",
    "load_retrieval_pairs",
    "whole_run_loss",
]
