"""Same seed, same run: model conversion is deterministic, train_lora.py repeats itself, and a resume continues the
same run (weights and the whole run's loss)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
from helpers import write_colour_data
from safetensors.torch import load_file

from crem_hf import CREMForEmbeddingAndGeneration
from crem_hf.testing import make_tiny_processor, make_tiny_qwen2vl, make_tiny_qwen2vl_processor
from crem_hf.training import whole_run_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_lora_main():
    spec = importlib.util.spec_from_file_location("train_lora", os.path.join(REPO, "examples", "train_lora.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_lora"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.main


def test_conversion_is_deterministic_whatever_the_global_random_state():
    processor = make_tiny_processor()
    base = make_tiny_qwen2vl(processor.tokenizer, seed=0, vocab_size=min(processor.chorus_token_ids))
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(CREMForEmbeddingAndGeneration.from_qwen2vl(base, processor).state_dict())
        base = make_tiny_qwen2vl(processor.tokenizer, seed=0, vocab_size=min(processor.chorus_token_ids))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    chorus = torch.tensor(processor.chorus_token_ids)
    # The resized, untied lm_head rows of the chorus ids are fixed (zero), not a fresh random draw.
    assert torch.count_nonzero(states[0]["lm_head.weight"][chorus]) == 0
    embedding_rows = states[0]["model.language_model.embed_tokens.weight"][chorus]
    assert len({tuple(row.tolist()) for row in embedding_rows}) == len(chorus)  # distinct rows


@pytest.mark.slow
def test_same_seed_same_run_and_exact_resume(tmp_path):
    data = write_colour_data(tmp_path / "data", copies=2)
    base = tmp_path / "qwen2vl-tiny"
    qwen_processor = make_tiny_qwen2vl_processor()
    make_tiny_qwen2vl(qwen_processor.tokenizer, seed=0).save_pretrained(base)
    qwen_processor.save_pretrained(base)
    main = _train_lora_main()

    def run(out, *extra):
        argv = [
            "--model", str(base), "--output_dir", str(out),
            "--retrieval_data", data["retrieval"], "--retrieval_image_root", data["image_root"],
            "--generation_data", data["generation"], "--generation_image_root", data["image_root"],
            "--min_image_tokens", "4", "--max_image_tokens", "16",
            "--retrieval_batch_size", "4", "--generation_batch_size", "2", "--gc_chunk_size", "2",
            "--max_steps", "4", "--save_steps", "2", "--logging_steps", "3", "--warmup_steps", "0",
            "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
            "--seed", "7", *extra,
        ]  # fmt: skip
        return main(argv)

    first = run(tmp_path / "a")
    torch.manual_seed(12345)  # whatever happened before, the run follows --seed alone
    second = run(tmp_path / "b")
    losses = [[e["loss"] for e in s["log_history"] if "loss" in e] for s in (first, second)]
    assert losses[0] == losses[1] and len(losses[0]) == 3  # steps 2 (checkpoint), 3 (logging step), 4 (end)
    weights = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # Resume from the step-2 checkpoint of a copy: the same weights and the same whole-run loss.
    resumed_dir = tmp_path / "c"
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(resumed_dir, "--resume_from_checkpoint", str(resumed_dir / "checkpoint-2"))
    resumed_weights = load_file(resumed_dir / "adapter_model.safetensors")
    assert all(torch.equal(weights[0][k], resumed_weights[k]) for k in weights[0])
    assert resumed["train"]["train_loss"] == pytest.approx(first["train"]["train_loss"], rel=1e-6)
    assert resumed["train"]["train_loss"] == pytest.approx(whole_run_loss(first["log_history"]), rel=1e-12)
    on_disk = json.loads((resumed_dir / "run_summary.json").read_text())
    assert on_disk["train"]["train_loss"] == pytest.approx(first["train"]["train_loss"], rel=1e-6)


def test_whole_run_loss_weights_each_interval_by_its_steps():
    history = [
        {"loss": 2.0, "step": 2},
        {"eval_loss": 9.0, "step": 2},
        {"loss": 5.0, "step": 3},
        {"loss": 1.0, "step": 4},
    ]
    assert whole_run_loss(history) == pytest.approx((2.0 * 2 + 5.0 + 1.0) / 4)
    assert whole_run_loss([]) is None
