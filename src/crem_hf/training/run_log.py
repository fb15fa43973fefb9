"""The run's loss over every step, also across a resume.

The Trainer's own `train_loss` averages only the steps since the last resume. With a log entry at every checkpoint
and at the last step, the logged interval means partition the whole run, and the log history (which a checkpoint
carries) gives the exact mean over all steps.
"""

from __future__ import annotations

from transformers import TrainerCallback

__all__ = ["LogAtCheckpointsCallback", "whole_run_loss"]


class LogAtCheckpointsCallback(TrainerCallback):
    """Log whenever a checkpoint is saved and at the last step, so no step's loss falls outside a logged interval."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_training_stop:
            control.should_log = True
        return control


def whole_run_loss(log_history: list[dict]) -> float | None:
    """
    Mean training loss over every step of the run, from a log history whose "loss" entries are interval means
    (one entry per logging step, as the Trainer writes them). `None` when nothing was logged.
    """
    total, last_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last_step)
            last_step = entry["step"]
    return total / last_step if last_step else None
