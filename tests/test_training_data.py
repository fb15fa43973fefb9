"""Training data: readers with counted bad rows, the step dataset and the collator's compress flags."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from accelerate.utils import send_to_device
from helpers import colour_image, write_colour_data

from crem_hf.training import CREMCollator, MixedStepDataset, load_conversations, load_retrieval_pairs
from crem_hf.training.collator import content_key


@pytest.fixture
def data(tmp_path):
    return write_colour_data(tmp_path, copies=2)


def append_jsonl(path, rows):
    with open(path, "a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def test_retrieval_reader_maps_placeholder_and_counts_bad_rows(data, tmp_path, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"no image here")
    good = {"qry": "<|image_1|>\nRepresent it.", "qry_image_path": "images/red_0.png", "pos_text": "red"}
    append_jsonl(
        data["retrieval"],
        [
            {**good, "qry_image_path": "images/missing.png"},
            {**good, "qry_image_path": "corrupt.png"},
            {**good, "pos_text": "   "},
            {**good, "qry": "<|image_2|> two images?"},
            {**good, "neg_text": ["a", "b"], "neg_image_path": ["images/red_0.png"]},
            {**good, "qry": "no placeholder"},
            {**good, "neg_text": ["blue"], "neg_image_path": [""]},
        ],
    )
    with caplog.at_level(logging.WARNING):
        rows, report = load_retrieval_pairs(data["retrieval"], image_root=data["image_root"])
    assert report.total == 19 and report.kept == 13
    assert report.skipped == {
        "missing image": 1,
        "unreadable image": 1,
        "empty text": 1,
        "unknown image placeholder": 1,
        "uneven negative lists": 1,
        "image without placeholder": 1,
    }
    assert "kept 13 of 19" in caplog.text
    first = rows[0]
    assert first["query_text"] == "Represent the given image for classification."
    assert first["query_image"].startswith(data["image_root"]) and first["pos_image"] == ""
    assert rows[-1]["neg_texts"] == ["blue"]
    with pytest.raises(ValueError, match="kept 13 of 19"):
        load_retrieval_pairs(data["retrieval"], image_root=data["image_root"], on_bad_row="raise")


def test_conversation_reader_counts_bad_rows(data):
    with open(data["generation"]) as handle:
        rows = json.load(handle)
    good = rows[0]
    human, gpt = good["conversations"]
    rows += [
        {"image": None, "conversations": [human, gpt]},
        {"image": good["image"], "conversations": [human, {"from": "gpt", "value": " "}]},
        {"image": good["image"], "conversations": [human]},
        {"image": good["image"], "conversations": [human, gpt, {"from": "human", "value": "<image> again"}, gpt]},
        {"image": good["image"], "conversations": [gpt, human]},
        {"image": good["image"], "conversations": [human, gpt, {"from": "human", "value": "And?"}, gpt]},
    ]
    with open(data["generation"], "w") as handle:
        json.dump(rows, handle)
    kept, report = load_conversations(data["generation"], image_root=data["image_root"])
    assert report.kept == 13 and len(kept) == 13
    assert report.skipped == {
        "conversation without an image": 1,
        "empty answer": 1,
        "no answer": 1,
        "image placeholder after the first turn": 1,
        "turns out of order": 1,
    }
    assert kept[-1]["turns"] == ["What colour is it?", "red", "And?", "red"]


def test_mixed_step_dataset_gives_each_step_its_rows(data):
    retrieval, _ = load_retrieval_pairs(data["retrieval"], image_root=data["image_root"])
    generation, _ = load_conversations(data["generation"], image_root=data["image_root"])
    steps = MixedStepDataset(retrieval, generation, retrieval_per_step=4, generation_per_step=5, seed=1)
    assert len(steps) == 3
    seen = [q for i in range(3) for q in steps[i]["retrieval"]["query_image"]]
    assert len(set(seen)) == 12, "one epoch visits each retrieval row once"
    assert len(steps[2]["generation"]["image"]) == 5
    with pytest.raises(ValueError, match="fewer than one step"):
        MixedStepDataset(retrieval, generation, retrieval_per_step=100, generation_per_step=1)


def test_collator_builds_both_parts(processor, data):
    retrieval, _ = load_retrieval_pairs(data["retrieval"], image_root=data["image_root"])
    generation, _ = load_conversations(data["generation"], image_root=data["image_root"])
    item = MixedStepDataset(retrieval, generation, 4, 3)[0]
    batch = CREMCollator(processor, compress_probability=0.5)([item])
    query, target = batch.retrieval.query, batch.retrieval.target
    assert query["input_ids"].shape[0] == 4 and target["input_ids"].shape[0] == 4
    assert (query["input_ids"] == processor.image_token_id).sum() == 4 * 4
    assert "pixel_values" not in target
    names = item["retrieval"]["pos_text"]
    assert batch.retrieval.target_keys.tolist() == [content_key(n, "") for n in names]
    generation_batch = batch.generation
    assert generation_batch.compress.dtype == torch.bool and generation_batch.compress.shape == (3,)
    labels = generation_batch.inputs["labels"]
    for row, name in enumerate(item["generation"]["turns"]):
        assert processor.tokenizer.decode(labels[row][labels[row] != -100]) == name[1] + "<|im_end|>"
    with pytest.raises(ValueError, match="per_device_train_batch_size=1"):
        CREMCollator(processor, compress_probability=0.5)([item, item])


def test_compress_flags_follow_p_and_are_reproducible(processor):
    never = CREMCollator(processor, compress_probability=0.0).compress_flags(4000, step=0)
    always = CREMCollator(processor, compress_probability=1.0).compress_flags(4000, step=0)
    half = CREMCollator(processor, compress_probability=0.5, seed=3)
    flags = half.compress_flags(4000, step=7)
    assert not never.any() and always.all()
    assert 0.47 < flags.float().mean().item() < 0.53
    assert torch.equal(flags, half.compress_flags(4000, step=7))
    assert not torch.equal(flags, half.compress_flags(4000, step=8))
    with pytest.raises(ValueError, match="compress_probability"):
        CREMCollator(processor, compress_probability=1.5)


def test_compressed_samples_use_the_compression_mask(model, processor, data):
    generation, _ = load_conversations(data["generation"], image_root=data["image_root"])
    collator = CREMCollator(processor, compress_probability=0.5)
    step = next(s for s in range(50) if 0 < collator.compress_flags(4, s).sum() < 4)
    part = collator.generation_batch(generation[:4], step=step)
    batch, flags = part.inputs, part.compress
    with torch.no_grad():
        mixed = model(**batch, compress=flags, supervised_logits_only=True).supervised_logits
        compressed = model(**batch, compress=True, supervised_logits_only=True).supervised_logits
        native = model(**batch, compress=False, supervised_logits_only=True).supervised_logits
    rows = torch.arange(4).repeat_interleave((batch["labels"][:, 1:] != -100).sum(1))
    for row in range(4):
        expected = compressed if flags[row] else native
        other = native if flags[row] else compressed
        assert torch.allclose(mixed[rows == row], expected[rows == row], atol=1e-5)
        assert not torch.allclose(mixed[rows == row], other[rows == row], atol=1e-3)


def test_content_key_is_stable():
    assert content_key("red", "") == content_key("red", "")
    assert content_key("red", "") != content_key("red", "a.png")
    assert isinstance(content_key("x", "y"), int)
    assert colour_image("red", 0).size == (56, 56)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "is empty"),
        ("empty.json", "", "is empty"),
        ("blank.json", "[]", "holds no rows"),
        ("broken.jsonl", '{"image": "a.png", "conversations": [\n', "Cannot read .*broken.jsonl as json"),
        ("prose.json", "not json at all", "Cannot read .*prose.json as json"),
    ],
)
def test_unreadable_data_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    for reader in (load_conversations, load_retrieval_pairs):
        with pytest.raises(ValueError, match=message) as caught:
            reader(str(path), image_root=str(tmp_path))
        assert str(path) in str(caught.value)


def test_llava_turns_that_are_strings_are_bad_rows(data):
    with open(data["generation"]) as handle:
        rows = json.load(handle)
    path = data["image_root"] + "/strings.json"
    with open(path, "w") as handle:
        json.dump([{"image": rows[0]["image"], "conversations": ["What colour?", "red"]}], handle)
    kept, report = load_conversations([data["generation"], path], image_root=data["image_root"])
    assert report.total == 13 and report.skipped == {"malformed turn": 1} and len(kept) == 12
    with pytest.raises(ValueError, match=r"strings\.json, row 0: malformed turn"):
        load_conversations(path, image_root=data["image_root"], on_bad_row="raise")


def test_image_paths_outside_the_image_root_are_bad_rows(data, tmp_path):
    root = data["image_root"]
    inside = tmp_path / "images" / "red_0.png"
    escapes = ["../" + tmp_path.name + "/images/red_0.png", str(inside), "images/../../x/../" + tmp_path.name]
    good = {"qry": "<|image_1|>\nRepresent it.", "qry_image_path": "images/red_0.png", "pos_text": "red"}
    pairs = tmp_path / "escapes.jsonl"
    append_jsonl(pairs, [{**good, "qry_image_path": path} for path in escapes])
    append_jsonl(pairs, [{**good, "neg_text": "", "neg_image_path": escapes[0]}, good])
    kept, report = load_retrieval_pairs(str(pairs), image_root=root)
    assert report.skipped == {"image path outside the image root": 4} and report.kept == 1
    allowed, report = load_retrieval_pairs(str(pairs), image_root=root, allow_outside_root=True)
    assert report.kept == 4 and report.skipped == {"missing image": 1}  # the last escape names a folder
    assert allowed["query_image"][1] == str(inside)

    conversation = {"conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
    conversations = tmp_path / "escapes.json"
    conversations.write_text(json.dumps([{**conversation, "image": path} for path in escapes[:2]]))
    _, report = load_conversations(str(conversations), image_root=root)
    assert report.skipped == {"image path outside the image root": 2}
    _, report = load_conversations(str(conversations), image_root=root, allow_outside_root=True)
    assert report.kept == 2


def test_train_lora_has_the_data_flags(monkeypatch):
    import importlib.util
    import os
    import sys

    from transformers import HfArgumentParser

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_lora.py")
    spec = importlib.util.spec_from_file_location("train_lora_flags", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    (args,) = HfArgumentParser(module.DataArguments).parse_args_into_dataclasses(
        ["--retrieval_data", "MMEB-train", "--retrieval_subset", "A", "B", "--allow_paths_outside_image_root"]
    )
    assert args.allow_paths_outside_image_root is True and args.retrieval_subset == ["A", "B"]
    (default,) = HfArgumentParser(module.DataArguments).parse_args_into_dataclasses([])
    assert default.allow_paths_outside_image_root is False and default.retrieval_split == "original"


@pytest.fixture
def tiny_image_data(data, tmp_path):
    """The colour data plus one retrieval row and one conversation whose image the processor refuses (10 x 10 px)."""
    colour_image("red", 0, size=10).save(tmp_path / "images" / "tiny.png")
    append_jsonl(
        data["retrieval"],
        [{"qry": "<|image_1|>\nRepresent it.", "qry_image_path": "images/tiny.png", "pos_text": "red"}],
    )
    with open(data["generation"]) as handle:
        rows = json.load(handle)
    rows.append({**rows[0], "image": "images/tiny.png"})
    with open(data["generation"], "w") as handle:
        json.dump(rows, handle)
    return data


def test_collator_names_and_skips_rows_the_processor_cannot_build(processor, tiny_image_data):
    data = tiny_image_data
    retrieval, _ = load_retrieval_pairs(data["retrieval"], image_root=data["image_root"])
    generation, _ = load_conversations(data["generation"], image_root=data["image_root"])
    assert retrieval["source_row"][-1] == 12 and retrieval["source"][-1] == data["retrieval"]
    item = {
        "step": 0,
        "retrieval": retrieval.select([0, 12, 1, 2])[:],
        "generation": generation.select([12, 0, 1])[:],
    }
    strict = CREMCollator(processor, compress_probability=0.5, on_bad_row="raise")
    with pytest.raises(ValueError, match=r"retrieval data .*retrieval\.jsonl, row 12: the processor cannot build"):
        strict([item])
    with pytest.raises(ValueError, match=r"generation data .*conversations\.json, row 12: the processor cannot"):
        strict([{"step": 0, "generation": item["generation"]}])

    collator = CREMCollator(processor, compress_probability=0.5, on_bad_row="skip")
    batch = collator([item])
    assert collator.skipped == {
        "retrieval row the processor cannot build": 1,
        "generation row the processor cannot build": 1,
    }
    query = batch.retrieval.query
    assert query["input_ids"].shape[0] == 4, "the retrieval batch keeps its size (a good row stands in)"
    keys = batch.retrieval.query_keys.tolist()
    assert keys[1] == keys[0] and (query["input_ids"][1] == query["input_ids"][0]).all()
    assert batch.generation.inputs["input_ids"].shape[0] == 2 and batch.generation.compress.shape == (2,)


def test_the_step_batch_is_one_typed_contract(processor, data, tmp_path):
    """The collator builds a StepBatch whose parts check their shapes; the trainer takes nothing else."""
    from crem_hf.testing import make_tiny_crem
    from crem_hf.training import CREMTrainer, CREMTrainingArguments, GenerationBatch, RetrievalBatch, StepBatch

    retrieval, _ = load_retrieval_pairs(data["retrieval"], image_root=data["image_root"])
    generation, _ = load_conversations(data["generation"], image_root=data["image_root"])
    batch = CREMCollator(processor, compress_probability=0.5)([MixedStepDataset(retrieval, generation, 2, 2)[0]])
    assert isinstance(batch, StepBatch) and isinstance(batch.retrieval, RetrievalBatch)
    assert isinstance(batch.generation, GenerationBatch)
    assert len(batch.model_inputs()) == 3, "query, target (no negatives in this data) and the conversations"
    with pytest.raises(ValueError, match="one flag per row"):
        GenerationBatch(inputs=batch.generation.inputs, compress=torch.tensor([True]))
    with pytest.raises(ValueError, match="negative_keys"):
        RetrievalBatch(
            query=batch.retrieval.query,
            target=batch.retrieval.target,
            negative=batch.retrieval.target,
            target_keys=torch.arange(2),
        )
    with pytest.raises(ValueError, match=r"RetrievalBatch needs \['target'\]"):
        RetrievalBatch(query=batch.retrieval.query)
    with pytest.raises(ValueError, match=r"got unknown \['labels'\]"):
        StepBatch(generation=batch.generation, labels=batch.generation.inputs["labels"])
    with pytest.raises(TypeError, match="StepBatch's generation must be a GenerationBatch, got dict"):
        StepBatch(generation=dict(batch.generation))
    args = CREMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = CREMTrainer(model=make_tiny_crem(processor, seed=0), args=args)
    # The Trainer (and accelerate's data loader) place a dict as they find it: every tensor moved, dtypes kept, each
    # part rebuilt as its own type; no "labels" at the top, so the Trainer counts no items (the LM part normalises).
    for placed in (trainer._prepare_inputs(batch), send_to_device(batch, "cpu")):
        assert type(placed) is StepBatch and type(placed.retrieval) is RetrievalBatch
        assert type(placed.generation) is GenerationBatch
        assert placed.generation.inputs["input_ids"].dtype == torch.long
        assert placed.generation.compress.dtype == torch.bool
        assert placed.retrieval.query["input_ids"].equal(batch.retrieval.query["input_ids"])
    assert trainer._get_num_items_in_batch([batch], trainer.args.device) is None
    # Its flops: those of every forward pass of the step, 6 per token and parameter (embeddings aside).
    tokens = sum(part["input_ids"].numel() for part in batch.model_inputs())
    assert trainer.floating_point_ops(batch) == 6 * tokens * trainer.model.num_parameters(exclude_embeddings=True) > 0
    with pytest.raises(TypeError, match="StepBatch"):
        trainer.compute_loss(trainer.model, {"generation": batch.generation.inputs})
