"""Config, conversion from Qwen2-VL, save/load, and Hub remote code in a process where crem_hf is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_outputs_match, outputs_of
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from crem_hf import CREMConfig, CREMForEmbeddingAndGeneration, CREMProcessor
from crem_hf.testing import make_tiny_qwen2vl


def test_config_validates_and_round_trips(tmp_path):
    config = CREMConfig(num_chorus_tokens=2, chorus_token_ids=[7, 8], pooling="last", normalize_embeddings=False)
    config.save_pretrained(tmp_path)
    loaded = CREMConfig.from_pretrained(tmp_path)
    assert (loaded.num_chorus_tokens, loaded.chorus_token_ids, loaded.pooling, loaded.normalize_embeddings) == (
        2,
        [7, 8],
        "last",
        False,
    )
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_crem.CREMForEmbeddingAndGeneration"
    )
    with pytest.raises(ValueError, match="num_chorus_tokens"):
        CREMConfig(num_chorus_tokens=3, chorus_token_ids=[1, 2])
    with pytest.raises(ValueError, match="pooling"):
        CREMConfig(pooling="max")
    with pytest.raises(ValueError, match="distinct"):
        CREMConfig(num_chorus_tokens=2, chorus_token_ids=[1, 1])


def test_a_config_saved_with_the_old_contrastive_temperature_loads_without_it(tmp_path):
    """The training arguments own the temperature: an older config.json that records it still loads, and the
    value (no part of the model) is neither kept nor saved again."""
    CREMConfig(num_chorus_tokens=2, chorus_token_ids=[7, 8]).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "contrastive_temperature": 0.05}))
    loaded = CREMConfig.from_pretrained(tmp_path)
    assert loaded.chorus_token_ids == [7, 8] and not hasattr(loaded, "contrastive_temperature")
    loaded.save_pretrained(tmp_path / "again")
    assert "contrastive_temperature" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_generation_config_takes_no_training_setting(model):
    """A config field named `temperature` would become the sampling temperature of `generate`."""
    assert model.generation_config.temperature in (None, 1.0)


def test_from_qwen2vl_shares_weights_and_initialises_chorus_rows(processor):
    base_vocab = min(processor.chorus_token_ids)
    base = make_tiny_qwen2vl(processor.tokenizer, seed=4, vocab_size=base_vocab)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = CREMForEmbeddingAndGeneration.from_qwen2vl(base, processor)
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    chorus = model.get_input_embeddings().weight[processor.chorus_token_ids].detach()
    rows = reference["model.language_model.embed_tokens.weight"]
    # Typical tokens around the mean embedding: the rows' spread, centred on their mean, each slot its own row.
    assert 0.5 < float(chorus.std(0).mean() / rows.std(0).mean()) < 2.0
    assert (chorus.mean(0) - rows.mean(0)).norm() < 0.5 * (rows - rows.mean(0)).norm(dim=1).mean()
    assert torch.unique(chorus, dim=0).shape[0] == processor.num_chorus_tokens
    for key, value in reference.items():
        if "embed_tokens" in key or "lm_head" in key:
            assert torch.equal(model.state_dict()[key][:base_vocab], value)
        else:
            assert torch.equal(model.state_dict()[key], value), key
    rope = model.model.language_model.rotary_emb.inv_freq
    assert rope.device.type == "cpu" and torch.equal(rope, base.model.language_model.rotary_emb.inv_freq)


def test_from_qwen2vl_uses_spare_rows_without_resizing(processor):
    base = make_tiny_qwen2vl(processor.tokenizer, seed=4, vocab_size=len(processor.tokenizer) + 8)
    model = CREMForEmbeddingAndGeneration.from_qwen2vl(base, processor)
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer) + 8


def test_from_qwen2vl_checkpoint_in_the_old_key_layout(processor, tmp_path):
    """Hub Qwen2-VL checkpoints store `model.layers.*` / `visual.*` (the layout before transformers 4.52)."""
    base = make_tiny_qwen2vl(processor.tokenizer, seed=4, vocab_size=len(processor.tokenizer))
    base.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old = {}
    for key, value in weights.items():
        key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        old[key] = value
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = CREMForEmbeddingAndGeneration.from_qwen2vl(str(tmp_path), processor)
    assert torch.equal(model.model.visual.patch_embed.proj.weight, base.model.visual.patch_embed.proj.weight)
    assert torch.equal(
        model.model.language_model.layers[0].self_attn.q_proj.weight,
        base.model.language_model.layers[0].self_attn.q_proj.weight,
    )


def test_processor_and_model_must_match(processor):
    base = make_tiny_qwen2vl(processor.tokenizer, seed=4)
    base.config.image_token_id = 3
    with pytest.raises(ValueError, match="image_token_id"):
        CREMForEmbeddingAndGeneration.from_qwen2vl(base, processor)


def test_save_and_load_in_process(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pkl"))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is CREMForEmbeddingAndGeneration
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_processor) is CREMProcessor
    assert_outputs_match(outputs_of(loaded, loaded_processor), outputs_of(model, processor))


def test_load_crem_reads_crem_folders_and_converts_qwen2vl_checkpoints(model, processor, tmp_path):
    from crem_hf.loading import load_crem
    from crem_hf.testing import make_tiny_qwen2vl_processor

    model.save_pretrained(tmp_path / "crem")
    processor.save_pretrained(tmp_path / "crem")
    loaded, loaded_processor = load_crem(tmp_path / "crem")
    assert_outputs_match(outputs_of(loaded, loaded_processor), outputs_of(model, processor))
    plain = make_tiny_qwen2vl_processor()
    make_tiny_qwen2vl(plain.tokenizer, seed=3).save_pretrained(tmp_path / "qwen")
    plain.save_pretrained(tmp_path / "qwen")
    converted, converted_processor = load_crem(tmp_path / "qwen", num_chorus_tokens=4)
    assert converted.config.num_chorus_tokens == 4
    assert converted.config.chorus_token_ids == converted_processor.chorus_token_ids
    assert converted_processor.chat_template == plain.chat_template


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["crem_hf"] = None  # the package is not importable: only the folder's code may run
    sys.path.insert(0, sys.argv[2])
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    from helpers import outputs_of
    folder = sys.argv[1]
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__ == "CREMConfig"
    image_text = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    names = [type(model).__module__, type(image_text).__module__, type(processor).__module__]
    assert all(name.startswith("transformers_modules.") for name in names), names
    print(json.dumps(outputs_of(model, processor)))
    """
)


def test_remote_code_loads_without_crem_hf(model, processor, tmp_path):
    folder = tmp_path / "crem-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert {"configuration_crem.py", "modeling_crem.py", "processing_crem.py"} <= set(os.listdir(folder))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    tests_dir = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert_outputs_match(remote, outputs_of(model, processor), logits_atol=1e-4)
