"""CREMTrainer: the mixed contrastive + stochastic compressed-LM objective, with a gradient cache."""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import Trainer, TrainingArguments

from ..configuration_crem import IGNORE_INDEX, check_matryoshka_dims
from ..io import write_json_atomically
from ..loading import ADAPTER_CREM_SETTINGS
from .batch import GenerationBatch, RetrievalBatch, StepBatch
from .collator import check_compress_probability
from .distributed import all_reduce_sum, world_size
from .gradcache import GradientCache
from .losses import InfoNCELoss, MatryoshkaInfoNCELoss, MatryoshkaOutput, check_temperature
from .run_log import LogAtCheckpointsCallback

__all__ = ["CREMTrainer", "CREMTrainingArguments"]

logger = logging.getLogger(__name__)


@dataclass
class CREMTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` with CREM's objective: the one owner of its settings (the InfoNCE temperature, the loss
    weights, the compression probability p, the batch sizes and the gradient cache), which the trainer and
    `build_trainer` hand to the loss and the collator. Defaults follow the paper's Table 1 (lr 5e-5, cosine, 100 warm-up
    steps, 2000 steps; global batches 1024 retrieval / 128 generation = 128 / 16 per process on 8 GPUs).

    One dataset item is one whole step (see `MixedStepDataset`), so `per_device_train_batch_size` stays 1 and the
    batch sizes are set per part.
    """

    retrieval_batch_size: int = field(default=128, metadata={"help": "Retrieval pairs per step and process."})
    generation_batch_size: int = field(default=16, metadata={"help": "Conversations per step and process."})
    gradient_cache_chunk_size: int | None = field(
        default=8,
        metadata={
            "help": "Gradient-cache chunk size (embeddings per forward); None embeds the batch in one go.",
            "aliases": ["--gc_chunk_size"],
        },
    )
    temperature: float = field(default=0.02, metadata={"help": "InfoNCE softmax temperature over cosine similarities."})
    matryoshka_dims: list[str] | None = field(
        default=None,
        metadata={
            "help": "Matryoshka embedding sizes, strictly increasing, e.g. 64 128 256 512 full ('full': the hidden "
            "size, last only): the contrastive loss is the mean of InfoNCE over each re-normalised prefix. The "
            "trained model's config records them. Default: the full embedding only."
        },
    )
    matryoshka_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight >= 0 per Matryoshka dim (default: all 1; the loss is their mean)."}
    )
    alpha_r: float = field(default=1.0, metadata={"help": "Weight of the contrastive loss."})
    alpha_g: float = field(default=0.5, metadata={"help": "Weight of the LM loss."})
    compress_probability: float = field(default=0.5, metadata={"help": "p: chance a generation sample is compressed."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Steps per item: keep 1."})
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 100
    max_steps: int = 2000
    remove_unused_columns: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_temperature(self.temperature)
        check_compress_probability(self.compress_probability)
        if self.gradient_cache_chunk_size is not None and self.gradient_cache_chunk_size <= 0:
            raise ValueError(
                "gradient_cache_chunk_size must be > 0 (or None to turn the gradient cache off), got "
                f"{self.gradient_cache_chunk_size}."
            )
        if self.matryoshka_dims is not None:
            # The order, sign and spelling of the dims; their bound (the hidden size) is the model's, checked by the
            # trainer.
            check_matryoshka_dims(self.matryoshka_dims, sys.maxsize, "matryoshka_dims")
        if self.matryoshka_weights is not None:
            if self.matryoshka_dims is None or len(self.matryoshka_weights) != len(self.matryoshka_dims):
                raise ValueError(
                    f"matryoshka_weights needs one weight per matryoshka_dims entry, got {self.matryoshka_weights} "
                    f"for {self.matryoshka_dims}."
                )
            if any(w < 0 for w in self.matryoshka_weights) or sum(self.matryoshka_weights) <= 0:
                raise ValueError(f"matryoshka_weights must be >= 0 and not all 0, got {self.matryoshka_weights}.")
        if self.alpha_r < 0 or self.alpha_g < 0 or self.alpha_r + self.alpha_g == 0:
            raise ValueError(f"alpha_r and alpha_g must be >= 0 and not both 0, got {self.alpha_r}, {self.alpha_g}.")
        if self.retrieval_batch_size < 0 or self.generation_batch_size < 0:
            raise ValueError("retrieval_batch_size and generation_batch_size must be >= 0.")
        if self.include_num_input_tokens_seen != "no":
            # The Trainer counts the `input_ids` of a batch; a step batch holds those of several forward passes.
            raise ValueError(
                "include_num_input_tokens_seen is not supported by CREMTrainer (a step batch holds the inputs of "
                f"several forward passes); leave it 'no', got {self.include_num_input_tokens_seen!r}."
            )
        if self.per_device_train_batch_size != 1:
            raise ValueError(
                "per_device_train_batch_size must be 1 (one item is a whole step); set retrieval_batch_size and "
                "generation_batch_size instead."
            )


class CREMTrainer(Trainer):
    """
    Trains CREM: each step combines a retrieval batch and a generation batch,
    `loss = alpha_r * InfoNCE + alpha_g * LM`, where each generation sample is compressed with probability p (the
    collator's flags). Both parts, the in-batch retrieval accuracy and the compressed fraction are logged.

    The contrastive loss (`contrastive`: InfoNCE, or its Matryoshka mean) runs through a [`GradientCache`]: with
    `gradient_cache_chunk_size`, the embeddings are computed in chunks, at the memory of one chunk, and the gradient
    equals the full-batch gradient. Negatives come from all processes.

    The step batch is a [`StepBatch`], a dict the Trainer places as it is; the trainer overrides `compute_loss`, the
    flop count of a step (`floating_point_ops`: the sum over its forward passes), `log` (the parts' means) and
    `_save` (the run's CREM settings next to an adapter).
    """

    # compute_loss returns a per-step mean; the Trainer divides it by the accumulation steps (so do the cache's
    # internal backward passes).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CREMTrainingArguments):
            raise TypeError("CREMTrainer needs CREMTrainingArguments.")
        if self.args.n_gpu > 1:
            raise ValueError("CREMTrainer does not support DataParallel; launch one process per GPU with torchrun.")
        self.matryoshka_dims = self._record_matryoshka_dims()
        if self.matryoshka_dims is None:
            loss = InfoNCELoss(self.args.temperature)
        else:
            loss = MatryoshkaInfoNCELoss(self.args.temperature, self.matryoshka_dims, self.args.matryoshka_weights)
        vision_start_id = self.accelerator.unwrap_model(self.model).config.vision_start_token_id
        self.contrastive = GradientCache(loss, self.args.gradient_cache_chunk_size, vision_start_id)
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._metric_steps = 0
        # Log entries at every checkpoint and at the end, so the log history gives the whole run's loss.
        self.add_callback(LogAtCheckpointsCallback)

    def _record_matryoshka_dims(self) -> list[int] | None:
        """
        The run's Matryoshka dims as ints (checked against the model's hidden size), written into the model's config
        so that every save records what the model was trained for.
        """
        config = self.accelerator.unwrap_model(self.model).config
        dims = self.args.matryoshka_dims
        if dims is not None:
            dims = check_matryoshka_dims(dims, config.text_config.hidden_size, "--matryoshka_dims")
        elif getattr(config, "matryoshka_dims", None):
            logger.warning(
                "The model was trained for Matryoshka dims %s; this run trains the full embedding only, so its "
                "config will no longer list them.",
                config.matryoshka_dims,
            )
        config.matryoshka_dims = dims
        return dims

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """
        As the Trainer saves, plus, for an adapter (which holds no config.json), the CREM config fields the run
        set (`matryoshka_dims`) in `ADAPTER_CREM_SETTINGS`, which `load_crem` applies to the base.
        """
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
            settings = {"matryoshka_dims": self.matryoshka_dims}
            write_json_atomically(os.path.join(output_dir, ADAPTER_CREM_SETTINGS), settings)

    # ------------------------------------------------------------------ loss

    @staticmethod
    def _embed(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**inputs, return_embeddings=True).embeddings

    def _retrieval(self, model, batch: RetrievalBatch) -> torch.Tensor:
        """
        The contrastive loss, through the gradient cache: the chunks it back-propagates during the call (all but the
        last) go without gradient synchronisation, scaled as the Trainer scales the returned loss; the backward of
        the returned loss (by the Trainer) covers the last chunk and synchronises everything accumulated.
        """
        scale = self.args.alpha_r / self.current_gradient_accumulation_steps

        def backward_unsynced(term: torch.Tensor) -> None:
            with self.accelerator.no_sync(model):
                self.accelerator.backward(term * scale)

        out = self.contrastive(partial(self._embed, model), batch, backward_unsynced)
        if isinstance(out, MatryoshkaOutput):  # the loss and accuracy at each dim: contrastive_loss_d64, ...
            for dim, loss, accuracy in zip(self.matryoshka_dims, out.dim_losses, out.dim_accuracies, strict=True):
                self._record(f"contrastive_loss_d{dim}", loss)
                self._record(f"retrieval_accuracy_d{dim}", accuracy)
        self._record("contrastive_loss", out.loss)
        self._record("retrieval_accuracy", out.accuracy)
        return out.loss

    def _generation(self, model, batch: GenerationBatch) -> torch.Tensor:
        """The LM loss: token mean over the answer tokens of the whole (global) generation batch."""
        supervised = (batch.inputs["labels"][:, 1:] != IGNORE_INDEX).sum()
        # Normalise by the global token count, scaled so that DDP's mean over processes gives the global mean.
        denominator = all_reduce_sum(supervised).clamp(min=1) / world_size()
        # Sparse logits: the LM head runs on the answer tokens only, never on the whole batch x length.
        out = model(
            **batch.inputs, compress=batch.compress, num_items_in_batch=denominator, supervised_logits_only=True
        )
        self._record("compressed_fraction", batch.compress.float().mean())
        self._record("lm_loss", out.loss)
        return out.loss

    def compute_loss(self, model, inputs: StepBatch, return_outputs=False, num_items_in_batch=None):
        """The step's objective `alpha_r * InfoNCE + alpha_g * LM` over a [`StepBatch`] (`CREMCollator`'s output)."""
        args = self.args
        if not isinstance(inputs, StepBatch):
            raise TypeError(
                f"CREMTrainer trains on a StepBatch (what CREMCollator builds), got {type(inputs).__name__}."
            )
        # The sum starts in the model's precision (at least float32), so a float64 model gets a float64 loss even
        # when a part (the LM loss, upcast to float32 for half-precision models) comes in float32.
        model_dtype = getattr(self.accelerator.unwrap_model(model), "dtype", torch.float32)
        loss = torch.zeros((), dtype=torch.promote_types(model_dtype, torch.float32), device=args.device)
        if inputs.retrieval is not None and args.alpha_r > 0:
            loss = loss + args.alpha_r * self._retrieval(model, inputs.retrieval)
        if inputs.generation is not None and args.alpha_g > 0:
            loss = loss + args.alpha_g * self._generation(model, inputs.generation)
        if not loss.requires_grad:
            raise ValueError("The batch has neither a retrieval nor a generation part with a weight > 0.")
        self._metric_steps += 1
        return (loss, None) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        """The sum over the step's forward passes (each retrieval side and the generation part)."""
        if isinstance(inputs, StepBatch):
            return sum(super(CREMTrainer, self).floating_point_ops(part) for part in inputs.model_inputs())
        return super().floating_point_ops(inputs)

    # ------------------------------------------------------------------ logging

    def _record(self, name: str, value: torch.Tensor) -> None:
        self._metric_sums[name] += float(value.detach())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metric_steps:
            for name, total in self._metric_sums.items():
                mean = torch.tensor(total / self._metric_steps, device=self.args.device)
                logs[name] = round(float(self.accelerator.reduce(mean, reduction="mean")), 6)
            self._metric_sums.clear()
            self._metric_steps = 0
        super().log(logs, start_time)
