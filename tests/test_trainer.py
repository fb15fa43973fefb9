"""CREMTrainer: gradient cache exactness, learning, resume, arguments, and examples/train_lora.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_outputs_match, colour_image, mixed_batch, outputs_of, randomize_lora_b, write_colour_data
from safetensors import safe_open

from crem_hf.io import current_umask
from crem_hf.loading import load_crem
from crem_hf.testing import (
    BACKBONES,
    make_tiny_crem,
    make_tiny_processor,
    make_tiny_qwen2vl,
    make_tiny_qwen2vl_processor,
)
from crem_hf.training import (
    CREMTrainer,
    CREMTrainingArguments,
    InfoNCELoss,
    apply_lora,
    build_trainer,
    load_conversations,
    load_retrieval_pairs,
)
from crem_hf.training.gradcache import split_embedding_batch
from crem_hf.training.lora import lora_target_modules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_args(tmp_path, **overrides) -> CREMTrainingArguments:
    defaults = {
        "output_dir": str(tmp_path / "run"),
        "report_to": [],
        "use_cpu": True,
        "retrieval_batch_size": 6,
        "generation_batch_size": 4,
        "gradient_cache_chunk_size": None,
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return CREMTrainingArguments(**{**defaults, **overrides})


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def step_gradients(model, tmp_path, batch, **overrides) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = CREMTrainer(model=model, args=training_args(tmp_path, **overrides))
    trainer.current_gradient_accumulation_steps = 1  # set by train(); this calls one step directly
    model.zero_grad(set_to_none=True)
    loss = trainer.training_step(trainer.model, batch)
    return float(loss), gradients(model)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_lora_wraps_the_language_model_attention_projections_only(backbone):
    """On every backbone peft wraps exactly q/k/v/o of each decoder layer (counted from the config), no vision layer."""
    from peft.tuners.lora import LoraLayer

    model = make_tiny_crem(make_tiny_processor(backbone=backbone), seed=0, backbone=backbone)
    wrapped = apply_lora(model, dropout=0.0)
    names = {name.removeprefix("base_model.model.") for name, m in wrapped.named_modules() if isinstance(m, LoraLayer)}
    layers = model.config.text_config.num_hidden_layers
    expected = {
        f"model.language_model.layers.{i}.self_attn.{p}"
        for i in range(layers)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert names == expected
    assert not [name for name, p in wrapped.named_parameters() if p.requires_grad and "visual" in name]
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert all("lora_" in name or "trainable_tokens" in name for name in trainable), trainable


def test_lora_targets_name_what_a_decoder_lacks():
    model = make_tiny_crem(seed=0)
    for layer in model.model.language_model.layers:
        layer.self_attn.o_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"no \['o_proj'\] linear layers"):
        lora_target_modules(model)


@pytest.mark.parametrize("matryoshka_dims", [None, ["16", "32", "full"]], ids=["full-only", "matryoshka"])
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_cache_equals_full_batch_gradient(processor, tmp_path, lora, matryoshka_dims):
    model = make_tiny_crem(processor, seed=1)
    if lora:
        model = randomize_lora_b(apply_lora(model, dropout=0.0))
    model.train()
    batch = mixed_batch(processor, rows=range(6), generation_rows=range(4), compress=[True, False, True, False])
    dims = {"matryoshka_dims": matryoshka_dims}
    plain_loss, plain = step_gradients(model, tmp_path, batch, gradient_cache_chunk_size=None, **dims)
    cached_loss, cached = step_gradients(model, tmp_path, batch, gradient_cache_chunk_size=4, **dims)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == cached.keys()
    if lora:
        assert any("trainable_tokens_delta" in name for name in plain), "chorus rows must get gradients"
        assert any("lora_A" in name for name in plain)
    for name, grad in plain.items():
        error = (cached[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert error <= 1e-5, (name, float(error))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matryoshka_loss_is_the_mean_of_infonce_over_get_embedding_at_each_dim(processor, tmp_path, chunk_size):
    model = make_tiny_crem(processor, seed=1).eval()
    batch = mixed_batch(processor, rows=range(6), generation_rows=range(2), compress=[True, False])
    settings = {"matryoshka_dims": ["16", "32", "full"], "alpha_g": 0.0, "gradient_cache_chunk_size": chunk_size}
    trainer = CREMTrainer(model=model, args=training_args(tmp_path, **settings))
    assert model.config.matryoshka_dims == [16, 32, 64]  # what every save of the run records
    trainer.current_gradient_accumulation_steps = 1
    loss = float(trainer.training_step(model, batch))
    # The oracle: the model's own truncation (get_embedding(dim=)) and the plain InfoNCE at each dim.
    retrieval = batch.retrieval
    infonce = InfoNCELoss(temperature=0.02)
    with torch.no_grad():
        per_dim = [
            infonce(
                *(model.get_embedding(**side, dim=dim) for side in retrieval.sides().values()),
                positive_keys=retrieval.target_keys,
                negative_keys=retrieval.negative_keys,
            ).loss
            for dim in (16, 32, 64)
        ]
    assert loss == pytest.approx(float(sum(per_dim)) / 3, rel=1e-5)
    assert float(per_dim[0]) != pytest.approx(float(per_dim[2]), rel=1e-3), "the dims must differ for the test to bite"
    logged = trainer._metric_sums
    assert logged["contrastive_loss_d16"] == pytest.approx(float(per_dim[0]), rel=1e-5)
    assert logged["contrastive_loss_d64"] == pytest.approx(float(per_dim[2]), rel=1e-5)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        (["16", "65"], "--matryoshka_dims: dim 65 is larger than the hidden size 64"),
        (["16", "64", "full"], "--matryoshka_dims: dims must be strictly increasing, got 64 after 64"),
    ],
)
def test_matryoshka_dims_beyond_the_model_are_refused_by_the_trainer(processor, tmp_path, dims, message):
    model = make_tiny_crem(processor, seed=1)
    with pytest.raises(ValueError, match=message):
        CREMTrainer(model=model, args=training_args(tmp_path, matryoshka_dims=dims))
    assert model.config.matryoshka_dims is None


def test_split_embedding_batch_keeps_images_with_their_rows(processor):
    images = [colour_image("red", 0), None, colour_image("blue", 1, size=112), None, colour_image("green", 2)]
    batch = processor.process_embedding_inputs(images=images, texts=[None, "a", None, "bb", "c"])
    chunks = split_embedding_batch(batch, 2, processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    assert [c["input_ids"].shape[0] for c in chunks] == [2, 2, 1]
    assert [c["image_grid_thw"].shape[0] for c in chunks] == [1, 1, 1]
    assert chunks[1]["pixel_values"].shape[0] == 64 and chunks[0]["pixel_values"].shape[0] == 16
    assert torch.cat([c["pixel_values"] for c in chunks]).equal(batch["pixel_values"])
    assert all(c["attention_mask"][:, 0].any() for c in chunks), "left padding is trimmed per chunk"


def make_run(processor, data, tmp_path, lora: bool = True, **overrides):
    retrieval, _ = load_retrieval_pairs(data["retrieval"], image_root=data["image_root"])
    generation, _ = load_conversations(data["generation"], image_root=data["image_root"])
    args = training_args(tmp_path, **overrides)
    model = make_tiny_crem(processor, seed=2)
    if lora:
        model = apply_lora(model, dropout=0.1)
    return build_trainer(model, processor, args, retrieval, generation)


def history(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.slow
def test_short_run_lowers_both_losses(processor, tmp_path):
    data = write_colour_data(tmp_path / "data", copies=4)
    # Full fine-tuning: the tiny base is random, so LoRA alone has no language model to adapt.
    trainer = make_run(
        processor, data, tmp_path, lora=False, max_steps=40, learning_rate=3e-3, gradient_cache_chunk_size=3
    )
    trainer.train()
    contrastive, lm = history(trainer, "contrastive_loss"), history(trainer, "lm_loss")
    assert len(contrastive) == 40 and len(lm) == 40
    assert sum(contrastive[-5:]) / 5 < 0.6 * sum(contrastive[:5]) / 5
    assert sum(lm[-5:]) / 5 < 0.6 * sum(lm[:5]) / 5
    fractions = history(trainer, "compressed_fraction")
    assert 0.3 < sum(fractions) / len(fractions) < 0.7
    accuracy = history(trainer, "retrieval_accuracy")
    assert sum(accuracy[-5:]) / 5 > sum(accuracy[:5]) / 5


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(processor, tmp_path):
    data = write_colour_data(tmp_path / "data", copies=2)
    settings = {
        "max_steps": 6,
        "learning_rate": 3e-3,
        "gradient_cache_chunk_size": 2,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    full = make_run(processor, data, tmp_path / "a", **settings)
    full.train()
    checkpoint = tmp_path / "a" / "run" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert (checkpoint / "processor_config.json").exists()
    resumed = make_run(processor, data, tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key in ("loss", "contrastive_loss", "lm_loss"):
        assert history(resumed, key)[-3:] == pytest.approx(history(full, key)[-3:], abs=1e-6), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"compress_probability": 1.2}, "compress_probability"),
        ({"gradient_cache_chunk_size": 0}, "gradient_cache_chunk_size"),
        ({"alpha_r": 0.0, "alpha_g": 0.0}, "alpha_r"),
        ({"per_device_train_batch_size": 4}, "per_device_train_batch_size"),
        ({"include_num_input_tokens_seen": "all"}, "include_num_input_tokens_seen is not supported"),
        ({"matryoshka_dims": ["32", "16"]}, "matryoshka_dims: dims must be strictly increasing, got 16 after 32"),
        ({"matryoshka_dims": ["full", "16"]}, "matryoshka_dims: 'full'"),
        ({"matryoshka_dims": ["0"]}, "matryoshka_dims: dim 0 must be > 0"),
        ({"matryoshka_dims": ["sixteen"]}, "matryoshka_dims: dim 'sixteen' is not a positive integer"),
        ({"matryoshka_dims": ["16"], "matryoshka_weights": [1.0, 2.0]}, "one weight per matryoshka_dims entry"),
        ({"matryoshka_dims": ["16", "32"], "matryoshka_weights": [0.0, 0.0]}, "matryoshka_weights must be >= 0"),
    ],
)
def test_bad_hyper_parameters_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training_args(tmp_path, **overrides)


#: The exported folder in a fresh process without crem_hf: its remote code, through AutoModel, on the fixed batch.
REMOTE_OUTPUTS = """
import json, sys
sys.modules["crem_hf"] = None
sys.path.insert(0, sys.argv[2])
from transformers import AutoModel, AutoProcessor
from helpers import outputs_of
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
print(json.dumps({"class": type(model).__name__, **outputs_of(model, processor)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "processes"), [("qwen2_vl", 1), ("qwen2_vl", 2), ("qwen2_5_vl", 1), ("qwen3_vl", 1)]
)
def test_train_lora_example_end_to_end(tmp_path, backbone, processes):
    """examples/train_lora.py on a plain tiny checkpoint of each backbone, then crem-export of its output folder: the
    exported folder, loaded with AutoModel as remote code in a clean process, gives what load_crem(output) gives."""
    data = write_colour_data(tmp_path / "data", copies=2)
    with open(data["retrieval"], "a") as handle:  # one bad row: skipped, counted, reported
        handle.write(json.dumps({"qry": "<|image_1|> q", "qry_image_path": "missing.png", "pos_text": "red"}) + "\n")
    base = tmp_path / f"{backbone}-tiny"
    processor = make_tiny_qwen2vl_processor(backbone=backbone)
    make_tiny_qwen2vl(processor.tokenizer, seed=0, backbone=backbone, varied_answers=True).save_pretrained(base)
    processor.save_pretrained(base)
    out = tmp_path / "out"
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", "2"] if processes > 1 else [])
    command = [
        *launcher, os.path.join(REPO, "examples", "train_lora.py"),
        "--model", str(base), "--output_dir", str(out),
        "--retrieval_data", data["retrieval"], "--retrieval_image_root", data["image_root"],
        "--generation_data", data["generation"], "--generation_image_root", data["image_root"],
        "--min_image_tokens", "4", "--max_image_tokens", "16",
        "--retrieval_batch_size", "4", "--generation_batch_size", "2", "--gradient_cache_chunk_size", "2",
        "--max_steps", "3", "--save_steps", "2", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert [d["kept"] for d in summary["data"]] == [12, 12]
    assert summary["data"][0]["skipped"] == {"missing image": 1}
    assert "missing image: 1" in result.stderr
    assert summary["train"]["train_loss"] > 0
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-2").is_dir()
    # safetensors writes 0600; the run's files get the modes the umask gives (this process's, inherited).
    assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    # The adapter holds LoRA for q/k/v/o of every decoder layer of this backbone, and nothing of the vision tower.
    with safe_open(out / "adapter_model.safetensors", framework="pt") as handle:
        lora = {key.split(".lora_")[0] for key in handle.keys() if ".lora_" in key}
    layers = BACKBONES[backbone][0](processor.tokenizer).text_config.num_hidden_layers
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert lora == {
        f"base_model.model.model.language_model.layers.{i}.self_attn.{p}" for i in range(layers) for p in projections
    }
    if processes > 1:
        return  # the export of a trained folder is the same for one process or two
    hub = tmp_path / "hub"
    exported = subprocess.run(
        [sys.executable, "-m", "crem_hf.hub", "--model", str(out), "--output-dir", str(hub)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert exported.stdout.strip().splitlines()[-1] == f"Exported {hub}"
    model, trained_processor = load_crem(out)
    reference = outputs_of(model.eval(), trained_processor)
    remote = subprocess.run(
        [sys.executable, "-c", REMOTE_OUTPUTS, str(hub), os.path.dirname(os.path.abspath(__file__))],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr[-4000:]
    loaded = json.loads(remote.stdout.strip().splitlines()[-1])
    assert loaded["class"] == BACKBONES[backbone][2].__name__ == type(model).__name__
    assert_outputs_match({k: v for k, v in loaded.items() if k != "class"}, reference, 1e-5, 1e-4)
