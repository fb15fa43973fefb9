"""Real Qwen2-VL files and checkpoints: every path that meets a Qwen2-VL or CREM checkpoint loads each weight exactly
(checked tensor by tensor against the files) or refuses loudly, naming the right entry point or the bad keys.

The test bed is a checkpoint laid out as the published Qwen2-VL-2B (real config, tokenizer and the 729 real key
names in the old layout) at tiny widths, from the real files in tests/fixtures/qwen2-vl-2b.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import write_colour_data
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

from crem_hf import CREMForEmbeddingAndGeneration
from crem_hf.loading import load_crem, load_qwen2vl_processor
from crem_hf.testing import (
    make_qwen2vl_tokenizer,
    make_tiny_processor,
    qwen2vl_files,
    write_tiny_qwen2_5vl_checkpoint,
    write_tiny_qwen2vl_checkpoint,
    write_tiny_qwen3vl_checkpoint,
)

HERE = Path(__file__).resolve().parent
FILES = HERE / "fixtures" / "qwen2-vl-2b"
REAL_ROWS = 151936  # rows of the 2B embedding matrix
CHORUS = list(range(151657, 151673))  # the real tokenizer has 151,657 ids
INSTRUCT = (FILES / "instruct_chat_template.jinja").read_text(encoding="utf-8")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json", "config.json")


def published(key: str) -> str:
    """A key under the name the published Qwen2-VL checkpoints give it (written here independently of crem_hf)."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def read_weights(folder, name=published) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, under its published name (`name` of a stored key)."""
    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            tensors.update({name(k): v for k, v in load_file(os.path.join(folder, file)).items()})
    return tensors


def assert_exact(model, saved: dict[str, torch.Tensor], new_chorus_rows: bool = False) -> None:
    """
    The model holds exactly the saved weights: the same names (the head tied, as in the files), every value equal.
    With `new_chorus_rows`, the chorus rows of the embedding matrix (initialised by the conversion) are not compared.
    """
    assert model.lm_head.weight is model.get_input_embeddings().weight, "the head is tied, as in the files"
    assert_exact_state(model.state_dict(), saved, new_chorus_rows)


def assert_exact_state(
    state: dict[str, torch.Tensor],
    saved: dict[str, torch.Tensor],
    new_chorus_rows: bool,
    name=published,
    chorus: list[int] = CHORUS,
) -> None:
    """`state` holds exactly `saved` (published names; `name` maps a state key to its published name)."""
    state = {name(k): v for k, v in state.items() if k != "lm_head.weight"}
    assert set(state) == set(saved)
    for key, value in saved.items():
        got, value = state[key].float(), value.float()
        if new_chorus_rows and key == name("model.language_model.embed_tokens.weight"):
            assert got.shape == value.shape == (REAL_ROWS, value.shape[1])
            others = torch.ones(REAL_ROWS, dtype=torch.bool)
            others[chorus] = False
            got, value = got[others], value[others]
        assert torch.equal(got, value), key


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return Path(write_tiny_qwen2vl_checkpoint(tmp_path_factory.mktemp("hub") / "Qwen2-VL-2B-Instruct-tiny"))


@pytest.fixture(scope="session")
def saved(checkpoint) -> dict[str, torch.Tensor]:
    return read_weights(checkpoint)


@pytest.fixture(scope="session")
def converted(checkpoint):
    """`load_crem` of the Qwen2-VL checkpoint: the CREM model and processor."""
    return load_crem(checkpoint)


@pytest.fixture(scope="session")
def crem_folders(converted, tmp_path_factory):
    """A CREM folder converted from the checkpoint, saved as is and with its weights renamed to the old layout."""
    model, processor = converted
    root = tmp_path_factory.mktemp("crem")
    new, old = root / "new-layout", root / "old-layout"
    model.save_pretrained(new)
    processor.save_pretrained(new)
    shutil.copytree(new, old)
    os.remove(old / "model.safetensors")
    save_file(read_weights(new), old / "model.safetensors", metadata={"format": "pt"})
    return new, old


def edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of a single-file CREM folder whose weights went through `edit(dict)`."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    edit(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


# ---------------------------------------------------------------------------------------------- the real files


def test_real_tokenizer_gives_chorus_ids_inside_the_real_embedding_rows(checkpoint, tmp_path):
    assert len(make_qwen2vl_tokenizer()) == 151657
    assert len(make_qwen2vl_tokenizer(FILES)) == 151657
    processor = make_tiny_processor(real_tokenizer=True)
    assert processor.chorus_token_ids == CHORUS and max(CHORUS) < REAL_ROWS
    base = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint)
    model = CREMForEmbeddingAndGeneration.from_qwen2vl(base, processor)
    assert model.get_input_embeddings().num_embeddings == REAL_ROWS, "no resize"
    assert model.config.text_config.vocab_size == REAL_ROWS
    with pytest.raises(FileNotFoundError, match="lacks the Qwen2-VL files"):
        qwen2vl_files(tmp_path)


def test_test_bed_is_laid_out_as_the_real_checkpoint(checkpoint, saved):
    index = json.loads((FILES / "model.safetensors.index.json").read_text())["weight_map"]
    written = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(index) == 729 and written == index and set(saved) == set(index)
    for shard in set(index.values()):
        assert set(load_file(checkpoint / shard)) == {k for k, v in index.items() if v == shard}
    config, real = (json.loads((folder / "config.json").read_text()) for folder in (checkpoint, FILES))
    assert (config["num_hidden_layers"], config["vision_config"]["depth"], config["vocab_size"]) == (28, 32, REAL_ROWS)
    ids = [k for k in real if k.endswith("token_id")]
    assert len(ids) >= 6 and all(config[k] == real[k] for k in ids)
    assert json.loads((checkpoint / "chat_template.json").read_text())["chat_template"] == INSTRUCT
    assert_exact(Qwen2VLForConditionalGeneration.from_pretrained(checkpoint), saved)


# ---------------------------------------------------------------------------------------------- Qwen2-VL checkpoints


def test_crem_from_pretrained_refuses_a_qwen2vl_checkpoint(checkpoint):
    with pytest.raises(ValueError, match=r"load_crem\(path\) or CREMForEmbeddingAndGeneration.from_qwen2vl\("):
        CREMForEmbeddingAndGeneration.from_pretrained(checkpoint)


def test_from_qwen2vl_is_exact_from_a_path_and_in_memory(checkpoint, saved, converted, crem_folders):
    processor = converted[1]
    from_path = CREMForEmbeddingAndGeneration.from_qwen2vl(checkpoint, processor)
    assert_exact(from_path, saved, new_chorus_rows=True)
    base = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint)
    assert_exact(CREMForEmbeddingAndGeneration.from_qwen2vl(base, processor), saved, new_chorus_rows=True)
    with pytest.raises(ValueError, match="already a CREM model"):
        CREMForEmbeddingAndGeneration.from_qwen2vl(crem_folders[0], processor)


def test_from_qwen2vl_refuses_a_checkpoint_with_missing_or_extra_weights(checkpoint, converted, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    dropped = "visual.blocks.7.attn.qkv.weight"
    shard = broken / index["weight_map"][dropped]
    weights = load_file(shard)
    weights.pop(dropped)
    weights["visual.extra.weight"] = torch.zeros(2)
    save_file(weights, shard, metadata={"format": "pt"})
    index["weight_map"].pop(dropped)
    index["weight_map"]["visual.extra.weight"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"not exact: 1 missing \(model\.visual\.blocks\.7\.attn\.qkv.*1 unexpected"):
        CREMForEmbeddingAndGeneration.from_qwen2vl(broken, converted[1])


def test_load_crem_converts_exactly_with_the_instruct_template(converted, saved):
    model, processor = converted
    assert processor.chat_template == INSTRUCT, "chat_template.json wins over the tokenizer's base template"
    assert processor.chorus_token_ids == CHORUS
    assert_exact(model, saved, new_chorus_rows=True)


def processor_folder(tmp_path, name: str, template: str | None, where: str = "chat_template.json") -> Path:
    """A Qwen2-VL folder without weights: the real tokenizer (base template inside) and image processor files."""
    folder = tmp_path / name
    folder.mkdir()
    for file in TOKENIZER_FILES:
        shutil.copyfile(FILES / file, folder / file)
    if where == "nowhere":
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        settings.pop("chat_template")
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    elif where == "chat_template.jinja":
        (folder / where).write_text(template)
    elif template is not None:
        (folder / where).write_text(json.dumps({"chat_template": template}))
    return folder


def test_processor_fallback_takes_the_folder_template(tmp_path):
    for where in ("chat_template.json", "chat_template.jinja"):
        processor = load_qwen2vl_processor(processor_folder(tmp_path, where, INSTRUCT, where))
        assert processor.chat_template == INSTRUCT, where
        assert processor.image_processor.size["longest_edge"] == 12845056


def test_a_checkpoint_without_a_usable_chat_template_is_refused(tmp_path):
    base = json.loads((FILES / "chat_template.json").read_text())["chat_template"]
    cases = {
        "base-template": (base, "chat_template.json", "has a chat template without turns"),
        "tokenizer-template-only": (None, "chat_template.json", "has a chat template without turns"),
        "no-template": (None, "nowhere", "has no chat template"),
    }
    for name, (template, where, state) in cases.items():
        folder = processor_folder(tmp_path, name, template, where)
        with pytest.raises(ValueError, match=f"{name} {state}: CREM needs a chat template .*system, user and assist"):
            load_qwen2vl_processor(folder)
    with pytest.raises(ValueError, match="base-template has a chat template without turns"):
        load_crem(tmp_path / "base-template")  # what users call: the same error, before any weight is read


# ---------------------------------------------------------------------------------------------- CREM folders


def test_crem_folders_load_exactly_in_both_layouts(crem_folders):
    new, old = crem_folders
    assert "model.language_model.embed_tokens.weight" in load_file(new / "model.safetensors")
    assert "model.embed_tokens.weight" in load_file(old / "model.safetensors")
    reference = read_weights(new)
    loaders = {
        "class": CREMForEmbeddingAndGeneration.from_pretrained,
        "AutoModel": AutoModel.from_pretrained,
        "AutoModelForImageTextToText": AutoModelForImageTextToText.from_pretrained,
    }
    for folder in (new, old):
        for name, load in loaders.items():
            model = load(folder)
            assert type(model) is CREMForEmbeddingAndGeneration, name
            assert model.config.chorus_token_ids == CHORUS
            assert_exact(model, reference)
    model, processor = load_crem(old)
    assert_exact(model, reference)
    assert processor.chorus_token_ids == CHORUS


def test_inexact_crem_folders_are_errors_naming_the_keys(crem_folders, tmp_path):
    new, _ = crem_folders
    key = "model.language_model.layers.3.mlp.up_proj.weight"
    missing = edited_copy(new, tmp_path / "missing", lambda w: w.pop(key))
    unexpected = edited_copy(
        new, tmp_path / "unexpected", lambda w: w.update({"model.language_model.extra": torch.ones(3)})
    )
    narrow = edited_copy(new, tmp_path / "mismatched", lambda w: w.update({key: w[key][:, :-1].contiguous()}))
    with pytest.raises(ValueError, match=r"not exact: 1 missing \(model\.language_model\.layers\.3\.mlp\.up_proj"):
        CREMForEmbeddingAndGeneration.from_pretrained(missing)
    with pytest.raises(ValueError, match=r"not exact: 1 unexpected \(model\.language_model\.extra\)"):
        AutoModel.from_pretrained(unexpected)
    with pytest.raises(ValueError, match=r"not exact: 1 mismatched \(model\.language_model\.layers\.3\.mlp\.up_proj"):
        CREMForEmbeddingAndGeneration.from_pretrained(narrow, ignore_mismatched_sizes=True)


REMOTE = textwrap.dedent(
    """
    import json, sys
    sys.modules["crem_hf"] = None  # only the folder's code may run
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForImageTextToText
    new, old, broken = sys.argv[1:4]

    def published(key):
        for a, b in (("model.language_model.", "model."), ("model.visual.", "visual.")):
            if key.startswith(a):
                return b + key[len(a):]
        return key

    reference = {published(k): v for k, v in load_file(new + "/model.safetensors").items()}
    report = {}
    for folder in (new, old):
        for auto in (AutoModel, AutoModelForImageTextToText):
            model = auto.from_pretrained(folder, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            state = {published(k): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
            differ = sorted(k for k in reference if k not in state or not torch.equal(state[k], reference[k]))
            report[f"{folder.rsplit('/', 1)[-1]} {auto.__name__}"] = [len(state), differ[:3]]
    try:
        AutoModel.from_pretrained(broken, trust_remote_code=True)
        report["broken"] = "loaded"
    except ValueError as error:
        report["broken"] = str(error)
    print(json.dumps(report))
    """
)


def test_remote_code_loads_both_layouts_exactly_and_refuses_inexact_folders(crem_folders, tmp_path):
    new, old = crem_folders
    broken = edited_copy(new, tmp_path / "broken", lambda w: w.pop("model.visual.blocks.7.attn.qkv.weight"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE, str(new), str(old), str(broken)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = [len(read_weights(new)), []]
    for folder in ("new-layout", "old-layout"):
        for auto in ("AutoModel", "AutoModelForImageTextToText"):
            assert report[f"{folder} {auto}"] == expected, (folder, auto)
    assert "not exact: 1 missing (model.visual.blocks.7.attn.qkv.weight)" in report["broken"]


# ---------------------------------------------------------------------------------------------- training and export


def train_lora_module(monkeypatch):
    """examples/train_lora.py as a module (registered while the test runs: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location("train_lora_example", HERE.parent / "examples" / "train_lora.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


#: Per backbone: its test-bed writer (the published layout at tiny widths) and the published name of a state key.
TEST_BEDS = {
    "qwen2_vl": (write_tiny_qwen2vl_checkpoint, published),
    "qwen2_5_vl": (write_tiny_qwen2_5vl_checkpoint, published),  # published in the old layout too
    "qwen3_vl": (write_tiny_qwen3vl_checkpoint, str),  # published in the current layout: the names as they are
}


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(TEST_BEDS))
def test_train_lora_on_the_real_layout_then_crem_export(backbone, checkpoint, saved, tmp_path, monkeypatch):
    """examples/train_lora.py on each backbone's test bed (real files, key names and layout), then crem-export: the
    exported weights are the checkpoint's, plus alpha / r x B A on q/k/v/o of every language layer and the trained
    chorus rows; nothing else changed (the vision tower included)."""
    from crem_hf.hub import main as export

    writer, name = TEST_BEDS[backbone]
    if backbone != "qwen2_vl":
        checkpoint = Path(writer(tmp_path / "checkpoint"))
        saved = read_weights(checkpoint, name)
    module, loaded = train_lora_module(monkeypatch), {}

    def recording_load_crem(*args, **kwargs):
        model, processor = load_crem(*args, **kwargs)
        loaded["tied"] = model.lm_head.weight is model.get_input_embeddings().weight
        loaded["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loaded["chorus"] = processor.chorus_token_ids
        loaded["layers"] = model.config.text_config.num_hidden_layers
        return model, processor

    monkeypatch.setattr(module, "load_crem", recording_load_crem)
    data = write_colour_data(tmp_path / "data", copies=1)
    out = tmp_path / "out"
    # One step on one conversation: the cheapest full run (load, convert, LoRA, a step, save).
    module.main([
        "--model", str(checkpoint), "--output_dir", str(out),
        "--generation_data", data["generation"], "--generation_image_root", data["image_root"],
        "--min_image_tokens", "4", "--max_image_tokens", "4", "--lora_dropout", "0", "--generation_batch_size", "1",
        "--max_steps", "1", "--save_strategy", "no", "--logging_steps", "1", "--warmup_steps", "0",
        "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
    ])  # fmt: skip
    chorus = loaded["chorus"]
    assert backbone != "qwen2_vl" or chorus == CHORUS
    assert loaded["tied"] and max(chorus) < REAL_ROWS  # the real tokenizer's spare rows: no resize
    assert_exact_state(loaded["state"], saved, new_chorus_rows=True, name=name, chorus=chorus)

    assert export(["--model", str(out), "--output-dir", str(tmp_path / "hub")]) == 0
    exported = read_weights(tmp_path / "hub", name)  # saved in the current layout, compared under published names
    adapter = load_file(out / "adapter_model.safetensors")
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == str(checkpoint)
    scale = settings["lora_alpha"] / settings["r"]
    lora = {name(k.split("base_model.model.", 1)[1]): v.float() for k, v in adapter.items() if ".lora_" in k}
    merged = 0
    for key, value in saved.items():
        got = exported[key].float()
        down = lora.get(key.replace(".weight", ".lora_A.weight"))
        if down is not None:  # W + alpha / r * B A, in the precision of the weights
            up = lora[key.replace(".weight", ".lora_B.weight")]
            expected = value.float() + scale * up @ down
            assert (up != 0).any() and torch.allclose(got, expected, atol=1e-2, rtol=1e-2), key
            assert not torch.equal(got, value.float()), key
            assert "visual" not in key and key.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj"), key
            merged += 1
        elif key == name("model.language_model.embed_tokens.weight"):
            (rows,) = [v for k, v in adapter.items() if "trainable_tokens_delta" in k]
            assert torch.equal(got[chorus], rows.float().to(exported[key].dtype).float())
            others = torch.ones(REAL_ROWS, dtype=torch.bool)
            others[chorus] = False
            assert torch.equal(got[others], value.float()[others])
        else:
            assert torch.equal(got, value.float()), key
    assert merged == 4 * loaded["layers"], "q, k, v and o of every language layer"
    assert loaded["layers"] == {"qwen2_vl": 28, "qwen2_5_vl": 36, "qwen3_vl": 28}[backbone]
    if backbone != "qwen2_vl":
        return  # the refusal of a broken adapter does not depend on the backbone

    broken = tmp_path / "broken-adapter"
    shutil.copytree(out, broken)
    dropped = sorted(k for k in adapter if ".lora_A." in k)[0]
    save_file({k: v for k, v in adapter.items() if k != dropped}, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="does not load exactly"):
        load_crem(broken)


def test_a_folder_without_a_model_is_refused_by_what_it_lacks(tmp_path):
    (tmp_path / "generation_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no model: no config.json with a model_type"):
        load_crem(tmp_path)
