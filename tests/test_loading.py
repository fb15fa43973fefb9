"""Real checkpoints of every backbone: every path that meets a Qwen2-VL, Qwen2.5-VL, Qwen3-VL or CREM checkpoint loads
each weight exactly (checked tensor by tensor against the files and against the plain backbone that transformers
loads from the same folder) or refuses loudly, naming the right entry point or the bad keys.

The test beds are checkpoints laid out as the published Qwen2-VL-2B, Qwen2.5-VL-3B and Qwen3-VL-2B (real config,
tokenizer, processor, template and the real key names, shards and index) at tiny widths, from the real files in
tests/fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import write_colour_data
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from crem_hf import (
    CREMForEmbeddingAndGeneration,
    CREMQwen2_5_VLForEmbeddingAndGeneration,
    CREMQwen3VLForEmbeddingAndGeneration,
)
from crem_hf.loading import load_crem, load_qwen2vl_processor, merge_adapter, template_default_system_turn
from crem_hf.testing import (
    make_qwen2vl_tokenizer,
    make_tiny_processor,
    qwen2vl_files,
    write_tiny_qwen2_5vl_checkpoint,
    write_tiny_qwen2vl_checkpoint,
    write_tiny_qwen3vl_checkpoint,
)
from crem_hf.training.lora import apply_lora

HERE = Path(__file__).resolve().parent
FILES = HERE / "fixtures" / "qwen2-vl-2b"
REAL_ROWS = 151936  # rows of the embedding matrix of every published checkpoint here
CHORUS = list(range(151657, 151673))  # the real Qwen2-VL tokenizer has 151,657 ids
INSTRUCT = (FILES / "instruct_chat_template.jinja").read_text(encoding="utf-8")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json", "config.json")


@dataclass(frozen=True)
class Backbone:
    """A published checkpoint's facts, written here independently of crem_hf's own tables."""

    name: str
    fixture: Path  # the real files without weights
    writer: Callable  # the test-bed writer
    plain: type  # transformers' class
    crem: type  # its CREM class
    convert: str  # the CREM class's conversion
    old_layout: bool  # published under model.* / visual.* (before transformers 4.52)
    keys: int  # published key names
    tokens: int  # ids of the real tokenizer
    vision_key: str  # a published vision weight name

    @property
    def chorus(self) -> list[int]:
        return list(range(self.tokens, self.tokens + 16))


BACKBONES = {
    "qwen2_vl": Backbone(
        "qwen2_vl", FILES, write_tiny_qwen2vl_checkpoint, Qwen2VLForConditionalGeneration,
        CREMForEmbeddingAndGeneration, "from_qwen2vl", True, 729, 151657, "visual.blocks.7.attn.qkv.weight",
    ),
    "qwen2_5_vl": Backbone(
        "qwen2_5_vl", HERE / "fixtures" / "qwen2.5-vl-3b", write_tiny_qwen2_5vl_checkpoint,
        Qwen2_5_VLForConditionalGeneration, CREMQwen2_5_VLForEmbeddingAndGeneration, "from_qwen2_5_vl", True, 824,
        151665, "visual.blocks.7.attn.qkv.weight",
    ),
    "qwen3_vl": Backbone(
        "qwen3_vl", HERE / "fixtures" / "qwen3-vl-2b", write_tiny_qwen3vl_checkpoint,
        Qwen3VLForConditionalGeneration, CREMQwen3VLForEmbeddingAndGeneration, "from_qwen3_vl", False, 625,
        151669, "model.visual.blocks.7.attn.qkv.weight",
    ),
}  # fmt: skip


def published(key: str, old_layout: bool = True) -> str:
    """A key under the name the published checkpoints give it (written here independently of crem_hf)."""
    if not old_layout:
        return key  # Qwen3-VL was published in transformers' current layout
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            return old + key[len(new) :]
    return key


def read_weights(folder, old_layout: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files, under its published name."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update({published(k, old_layout): v for k, v in load_file(os.path.join(folder, name)).items()})
    return tensors


def assert_exact(
    model, saved: dict[str, torch.Tensor], new_chorus_rows: bool = False, spec: Backbone | None = None
) -> None:
    """
    The model holds exactly the saved weights: the same names (the head tied, as in the files), every value equal.
    With `new_chorus_rows`, the chorus rows of the embedding matrix (initialised by the conversion) are not compared.
    """
    assert model.lm_head.weight is model.get_input_embeddings().weight, "the head is tied, as in the files"
    assert_exact_state(model.state_dict(), saved, new_chorus_rows, spec)


def assert_exact_state(
    state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], new_chorus_rows: bool, spec: Backbone | None = None
) -> None:
    spec = spec or BACKBONES["qwen2_vl"]
    state = {published(k, spec.old_layout): v for k, v in state.items() if k != "lm_head.weight"}
    assert set(state) == set(saved)
    embed = published("model.language_model.embed_tokens.weight", spec.old_layout)
    for key, value in saved.items():
        got, value = state[key].float(), value.float()
        if new_chorus_rows and key == embed:
            assert got.shape == value.shape == (REAL_ROWS, value.shape[1])
            others = torch.ones(REAL_ROWS, dtype=torch.bool)
            others[spec.chorus] = False
            got, value = got[others], value[others]
        assert torch.equal(got, value), key


@dataclass
class Bed:
    """A backbone's test bed and what is built from it once."""

    spec: Backbone
    folder: Path
    saved: dict[str, torch.Tensor]
    converted: tuple  # load_crem(folder)
    crem_folders: tuple  # (new layout, old layout or None)


def _build_bed(spec: Backbone, root: Path) -> Bed:
    folder = Path(spec.writer(root / f"{spec.name}-tiny"))
    model, processor = load_crem(folder)
    new, old = root / f"{spec.name}-crem-new-layout", None
    model.save_pretrained(new)
    processor.save_pretrained(new)
    if spec.old_layout:
        old = root / f"{spec.name}-crem-old-layout"
        shutil.copytree(new, old)
        os.remove(old / "model.safetensors")
        save_file(read_weights(new), old / "model.safetensors", metadata={"format": "pt"})
    return Bed(spec, folder, read_weights(folder, spec.old_layout), (model, processor), (new, old))


@pytest.fixture(scope="session")
def beds(tmp_path_factory) -> Callable[[str], Bed]:
    """Each backbone's test bed, written on first use."""
    built: dict[str, Bed] = {}

    def get(name: str) -> Bed:
        if name not in built:
            built[name] = _build_bed(BACKBONES[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(params=list(BACKBONES))
def bed(request, beds) -> Bed:
    return beds(request.param)


@pytest.fixture(scope="session")
def checkpoint(beds) -> Path:
    return beds("qwen2_vl").folder


@pytest.fixture(scope="session")
def saved(beds) -> dict[str, torch.Tensor]:
    return beds("qwen2_vl").saved


@pytest.fixture(scope="session")
def converted(beds):
    """`load_crem` of the Qwen2-VL checkpoint: the CREM model and processor."""
    return beds("qwen2_vl").converted


@pytest.fixture(scope="session")
def crem_folders(beds):
    """A CREM folder converted from the Qwen2-VL checkpoint, saved as is and with its weights in the old layout."""
    return beds("qwen2_vl").crem_folders


def edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of a single-file CREM folder whose weights went through `edit(dict)`."""
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    edit(weights)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


# ---------------------------------------------------------------------------------------------- the real files


def special_ids(tokenizer) -> set[int]:
    """Every special or added token id of a tokenizer."""
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)


def test_chorus_ids_land_in_the_spare_embedding_rows(bed):
    spec, (model, processor) = bed.spec, bed.converted
    real = AutoTokenizer.from_pretrained(spec.fixture, local_files_only=True)
    assert len(real) == spec.tokens and REAL_ROWS > spec.tokens + 16, "the published matrix has spare rows"
    assert processor.chorus_token_ids == spec.chorus and max(spec.chorus) < REAL_ROWS
    assert not set(spec.chorus) & special_ids(real), "no chorus id is a special token of the real tokenizer"
    assert model.get_input_embeddings().num_embeddings == REAL_ROWS, "no resize"
    assert model.config.text_config.vocab_size == REAL_ROWS
    assert model.lm_head.weight.shape[0] == REAL_ROWS


def test_without_spare_rows_the_embeddings_are_resized(bed):
    """A backbone whose matrix ends at the tokenizer's last id gains exactly the chorus rows, the others kept."""
    spec, processor = bed.spec, bed.converted[1]
    base = spec.plain.from_pretrained(bed.folder)
    base.resize_token_embeddings(spec.tokens)  # drop the spare rows
    before = base.get_input_embeddings().weight.detach().clone()
    model = spec.crem.from_backbone(base, processor)
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == spec.tokens + 16 == max(spec.chorus) + 1
    assert model.config.text_config.vocab_size == spec.tokens + 16
    assert torch.equal(rows[: spec.tokens], before) and model.lm_head.weight is rows


def test_qwen2vl_real_tokenizer_and_files(tmp_path):
    assert len(make_qwen2vl_tokenizer()) == 151657
    assert len(make_qwen2vl_tokenizer(FILES)) == 151657
    assert make_tiny_processor(real_tokenizer=True).chorus_token_ids == CHORUS
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


# ---------------------------------------------------------------------------------------------- backbone checkpoints


def test_crem_from_pretrained_refuses_a_plain_checkpoint_of_its_backbone(bed):
    spec = bed.spec
    with pytest.raises(ValueError, match=rf"load_crem\(path\) or {spec.crem.__name__}\.{spec.convert}\("):
        spec.crem.from_pretrained(bed.folder)


def test_a_crem_class_refuses_another_backbones_checkpoint_by_name(bed):
    spec, processor = bed.spec, bed.converted[1]
    kind = spec.plain.config_class.model_type
    for other in BACKBONES.values():
        if other is spec:
            continue
        with pytest.raises(ValueError, match=rf"is a '{kind}' checkpoint, not a CREM folder \({other.crem.__name__}"):
            other.crem.from_pretrained(bed.folder)
        with pytest.raises(ValueError, match=rf"is a '{kind}' checkpoint, but {other.crem.__name__} is CREM on"):
            getattr(other.crem, other.convert)(bed.folder, processor)
        crem_kind = spec.crem.config_class.model_type
        with pytest.raises(ValueError, match=rf"is a '{crem_kind}' checkpoint, another backbone's CREM folder"):
            other.crem.from_pretrained(bed.crem_folders[0])


def test_load_crem_converts_exactly(bed):
    """Every tensor as in the files and as in the plain backbone transformers loads from the same folder."""
    spec, model = bed.spec, bed.converted[0]
    assert type(model) is spec.crem and model.config.chorus_token_ids == spec.chorus
    assert_exact(model, bed.saved, new_chorus_rows=True, spec=spec)
    plain = spec.plain.from_pretrained(bed.folder)
    assert_exact_state(model.state_dict(), read_state(plain, spec), new_chorus_rows=True, spec=spec)
    embed = model.get_input_embeddings().weight
    assert not torch.equal(embed[spec.chorus], plain.get_input_embeddings().weight[spec.chorus]), "new chorus rows"
    assert len({tuple(row.tolist()) for row in embed[spec.chorus].float()}) == 16, "16 distinct chorus rows"


def read_state(model, spec: Backbone) -> dict[str, torch.Tensor]:
    """A plain model's state under the published names, the tied head left out (as in the files)."""
    return {published(k, spec.old_layout): v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_conversion_is_exact_from_a_path_and_in_memory(bed):
    spec, processor = bed.spec, bed.converted[1]
    convert = getattr(spec.crem, spec.convert)
    assert_exact(convert(bed.folder, processor), bed.saved, new_chorus_rows=True, spec=spec)
    base = spec.plain.from_pretrained(bed.folder)
    assert_exact(convert(base, processor), bed.saved, new_chorus_rows=True, spec=spec)
    with pytest.raises(ValueError, match="already a CREM model"):
        convert(bed.crem_folders[0], processor)


def _broken_copy(bed: Bed, target: Path, edit) -> Path:
    """A copy of the test bed whose file holding the vision key went through `edit(weights)` (the index follows)."""
    shutil.copytree(bed.folder, target)
    index_file = target / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    shard = target / (index["weight_map"][bed.spec.vision_key] if index else "model.safetensors")
    weights = load_file(shard)
    edit(weights)
    save_file(weights, shard, metadata={"format": "pt"})
    if index:
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in weights or v != shard.name}
        index["weight_map"].update(dict.fromkeys(weights, shard.name))
        index_file.write_text(json.dumps(index))
    return target


def test_a_test_bed_with_a_missing_or_an_extra_key_is_refused_naming_it(bed, tmp_path):
    spec, processor = bed.spec, bed.converted[1]
    extra = spec.vision_key.replace("blocks.7.attn.qkv", "extra")
    missing = _broken_copy(bed, tmp_path / "missing", lambda w: w.pop(spec.vision_key))
    unexpected = _broken_copy(bed, tmp_path / "unexpected", lambda w: w.update({extra: torch.zeros(2)}))
    for load in (lambda path: load_crem(path), lambda path: getattr(spec.crem, spec.convert)(path, processor)):
        with pytest.raises(ValueError, match=r"not exact: 1 missing \(model\.visual\.blocks\.7\.attn\.qkv\.weight\)"):
            load(missing)
        with pytest.raises(ValueError, match=r"not exact: 1 unexpected \([\w.]*visual\.extra\.weight\)"):
            load(unexpected)


def test_load_crem_converts_exactly_with_the_instruct_template(converted, saved):
    model, processor = converted
    assert processor.chat_template == INSTRUCT, "chat_template.json wins over the tokenizer's base template"
    assert processor.chorus_token_ids == CHORUS
    assert_exact(model, saved, new_chorus_rows=True)


# ---------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_the_published_processor_loads_without_torchvision_as_the_folder_says(name):
    spec = BACKBONES[name]
    settings = json.loads((spec.fixture / "preprocessor_config.json").read_text())
    template = json.loads((spec.fixture / "chat_template.json").read_text())["chat_template"]
    processor = load_qwen2vl_processor(spec.fixture)
    assert type(processor).__name__ == settings["processor_class"].replace("Processor", "ImageOnlyProcessor")
    image = processor.image_processor
    assert (image.patch_size, image.merge_size, image.temporal_patch_size) == (
        settings["patch_size"],
        settings["merge_size"],
        settings["temporal_patch_size"],
    )
    assert image.patch_size == (16 if name == "qwen3_vl" else 14)
    bounds = settings.get("size") or {"shortest_edge": settings["min_pixels"], "longest_edge": settings["max_pixels"]}
    assert (image.size["shortest_edge"], image.size["longest_edge"]) == (
        bounds["shortest_edge"],
        bounds["longest_edge"],
    )
    assert list(image.image_mean) == settings["image_mean"] and list(image.image_std) == settings["image_std"]
    assert processor.chat_template == template


def test_the_crem_processor_keeps_each_template_s_prefix(bed):
    """Qwen2-VL and Qwen2.5-VL put a default system turn before the user turn; Qwen3-VL puts nothing there."""
    spec, processor = bed.spec, bed.converted[1]
    qwen3 = spec.name == "qwen3_vl"
    assert template_default_system_turn(processor) is not qwen3
    assert processor.system_prompt == (None if qwen3 else "You are a helpful assistant.")
    assert processor.image_token_side == (32 if qwen3 else 28)
    batch = processor.process_embedding_inputs(texts=["a cat"])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    system = "" if qwen3 else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text.startswith(system + "<|im_start|>user\n")
    assert "".join(processor.chorus_tokens) in text


def test_a_qwen3vl_template_that_drops_the_system_message_is_refused(tmp_path):
    folder = tmp_path / "qwen3-no-system"
    shutil.copytree(BACKBONES["qwen3_vl"].fixture, folder)
    template = (
        "{% for message in messages %}{% if message['role'] != 'system' %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
        "{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endif %}{% endfor %}"
    )
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(ValueError, match="qwen3-no-system has a chat template without turns"):
        load_qwen2vl_processor(folder)


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


def test_crem_folders_load_exactly_in_both_layouts(bed):
    spec, (new, old) = bed.spec, bed.crem_folders
    assert "model.language_model.embed_tokens.weight" in load_file(new / "model.safetensors")
    folders = [new]
    if spec.old_layout:  # a CREM folder renamed to the layout its backbone was published in loads as well
        assert "model.embed_tokens.weight" in load_file(old / "model.safetensors")
        folders.append(old)
    reference = read_weights(new, spec.old_layout)
    assert_exact(bed.converted[0], reference, spec=spec)
    loaders = {
        "class": spec.crem.from_pretrained,
        "AutoModel": AutoModel.from_pretrained,
        "AutoModelForImageTextToText": AutoModelForImageTextToText.from_pretrained,
        "load_crem": lambda folder: load_crem(folder)[0],
    }
    for folder in folders:
        for name, load in loaders.items():
            model = load(folder)
            assert type(model) is spec.crem, name
            assert model.config.chorus_token_ids == spec.chorus
            assert_exact(model, reference, spec=spec)
    assert load_crem(folders[-1])[1].chorus_token_ids == spec.chorus


def test_inexact_crem_folders_are_errors_naming_the_keys(bed, tmp_path):
    spec, (new, _) = bed.spec, bed.crem_folders
    key = "model.language_model.layers.3.mlp.up_proj.weight"
    missing = edited_copy(new, tmp_path / "missing", lambda w: w.pop(key))
    unexpected = edited_copy(
        new, tmp_path / "unexpected", lambda w: w.update({"model.language_model.extra": torch.ones(3)})
    )
    narrow = edited_copy(new, tmp_path / "mismatched", lambda w: w.update({key: w[key][:, :-1].contiguous()}))
    with pytest.raises(ValueError, match=r"not exact: 1 missing \(model\.language_model\.layers\.3\.mlp\.up_proj"):
        spec.crem.from_pretrained(missing)
    with pytest.raises(ValueError, match=r"not exact: 1 unexpected \(model\.language_model\.extra\)"):
        AutoModel.from_pretrained(unexpected)
    with pytest.raises(ValueError, match=r"not exact: 1 missing \(model\.language_model\.layers\.3\.mlp\.up_proj"):
        load_crem(missing)
    with pytest.raises(ValueError, match=r"not exact: 1 mismatched \(model\.language_model\.layers\.3\.mlp\.up_proj"):
        spec.crem.from_pretrained(narrow, ignore_mismatched_sizes=True)


def test_an_adapter_folder_loads_exactly_on_its_backbone_and_on_its_crem_folder(bed, tmp_path):
    """peft LoRA (as examples/train_lora.py applies and saves it) on a CREM model of each backbone."""
    spec = bed.spec
    model, processor = load_crem(bed.folder)  # a fresh copy: the LoRA wraps it
    peft_model = apply_lora(model, r=2, alpha=4, dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)
    deltas = [p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == 1
    with torch.no_grad():
        deltas[0].normal_(std=0.1)  # as if trained: the chorus rows differ from the base's
    peft_model.peft_config["default"].base_model_name_or_path = str(bed.folder)
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    expected = {k: v.detach().clone() for k, v in merge_adapter(peft_model).state_dict().items()}
    base_state = bed.converted[0].state_dict()
    lora_targets = [k for k in expected if k.endswith("self_attn.q_proj.weight")]
    assert lora_targets and all(not torch.equal(expected[k], base_state[k]) for k in lora_targets), "LoRA applied"
    embed = "model.language_model.embed_tokens.weight"
    assert not torch.equal(expected[embed][spec.chorus], base_state[embed][spec.chorus]), "chorus rows trained"
    for base in (None, bed.crem_folders[0]):  # the backbone test bed named in the adapter, or a CREM folder
        loaded, loaded_processor = load_crem(folder, base_model=base)
        assert type(loaded) is spec.crem and loaded_processor.chorus_token_ids == spec.chorus
        state = loaded.state_dict()
        assert set(state) == set(expected)
        assert all(torch.equal(state[k], expected[k]) for k in expected), base


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
    assert len(report) == 5
    for folder in (new.name, old.name):
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


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_train_lora_on_the_real_layout_then_crem_export(backbone, checkpoint, saved, tmp_path, monkeypatch):
    """examples/train_lora.py on each backbone's test bed (real files, key names and layout), then crem-export: the
    exported weights are the checkpoint's, plus alpha / r x B A on q/k/v/o of every language layer and the trained
    chorus rows; nothing else changed (the vision tower included)."""
    from crem_hf.hub import main as export

    spec = BACKBONES[backbone]

    def name(key: str) -> str:
        return published(key, spec.old_layout)

    if backbone != "qwen2_vl":
        checkpoint = Path(spec.writer(tmp_path / "checkpoint"))
        saved = read_weights(checkpoint, spec.old_layout)
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
    assert chorus == spec.chorus
    assert loaded["tied"] and max(chorus) < REAL_ROWS  # the real tokenizer's spare rows: no resize
    assert_exact_state(loaded["state"], saved, new_chorus_rows=True, spec=spec)

    assert export(["--model", str(out), "--output-dir", str(tmp_path / "hub")]) == 0
    exported = read_weights(
        tmp_path / "hub", spec.old_layout
    )  # saved in the current layout, compared under published names
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
