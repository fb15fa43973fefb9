"""CREM as an mteb model: metadata and loader, instructions, encoding, an offline evaluation through mteb's own
evaluator that agrees with crem-eval, and model-card entries from mteb result files."""

from __future__ import annotations

import json
import os
import socket

import mteb
import numpy as np
import pytest
import torch
import yaml
from helpers import random_image
from mteb.models.model_implementations import MODEL_REGISTRY
from mteb.results import TaskResult
from mteb.types import PromptType

from crem_hf import encode
from crem_hf.demo.digits import build_digits_data
from crem_hf.evaluation import cli as crem_eval
from crem_hf.evaluation.retrieval import load_caption_rows
from crem_hf.hub import CardInfo, render_model_card
from crem_hf.hub import main as crem_export
from crem_hf.instructions import CLASSIFY_INSTRUCTION, I2T_INSTRUCTION, T2I_INSTRUCTION
from crem_hf.integrations.mteb import (
    TRAINING_DATASETS,
    CREMEncoder,
    caption_retrieval_task,
    crem_model_meta,
    mteb_eval_results,
    register_crem_model,
)
from crem_hf.loading import load_crem
from crem_hf.testing import BACKBONES, make_tiny_crem, make_tiny_processor

pytestmark = pytest.mark.filterwarnings("ignore:`model_revision` is not specified")
NUM_ROWS = 40  # digit-pair scans and their captions: several captions occur twice, so exact ties occur
NAME = "org/crem-tiny"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The first NUM_ROWS rows of the bundled digits' caption set, as a file crem-eval and the mteb task read."""
    data = build_digits_data(tmp_path_factory.mktemp("digits"), seed=0)
    with open(data.captions, encoding="utf-8") as handle:
        lines = handle.readlines()[:NUM_ROWS]
    path = os.path.join(data.folder, "captions_small.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    return path, data.folder


@pytest.fixture(scope="module")
def crem_folder(request, model, processor, tmp_path_factory):
    """A saved tiny CREM folder: Qwen2-VL (the session's model) unless parametrized with another backbone."""
    backbone = getattr(request, "param", "qwen2_vl")
    if backbone != "qwen2_vl":
        processor = make_tiny_processor(backbone=backbone)
        model = make_tiny_crem(processor, seed=0, backbone=backbone)
    folder = tmp_path_factory.mktemp(f"crem-{backbone}") / "crem-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def block_network(patch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: mteb must not download anything."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during an offline test: {args[1:] or kwargs}")

    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def mteb_run(crem_folder, digits, tmp_path_factory):
    """Both directions of the digits caption task, run by `mteb.evaluate` on the CREM ModelMeta (mteb loads it)."""
    path, root = digits
    tasks = {
        d: caption_retrieval_task(path, d, name=f"DigitsPairs{d.upper()}", image_root=root) for d in ("i2t", "t2i")
    }
    out = tmp_path_factory.mktemp("mteb")
    with pytest.MonkeyPatch.context() as patch:
        block_network(patch)
        results = mteb.evaluate(
            crem_model_meta(crem_folder, name=NAME),
            list(tasks.values()),
            cache=mteb.ResultCache(out / "cache"),
            prediction_folder=out / "predictions",
            show_progress_bar=False,
            encode_kwargs={"batch_size": 8},
        )
    scores = {r.task_name: r.scores["test"][0] for r in results.task_results}
    predictions = {
        d: json.loads((out / "predictions" / f"{t.metadata.name}_predictions.json").read_text())["default"]["test"]
        for d, t in tasks.items()
    }
    return tasks, scores, predictions, out / "cache"


# ---------------------------------------------------------------------------------------------------- metadata


def test_model_meta_describes_crem(model, processor, crem_folder, tmp_path):
    meta = crem_model_meta(crem_folder, name=NAME)
    text = model.config.text_config
    assert meta.embed_dim == text.hidden_size == 64
    assert meta.max_tokens == text.max_position_embeddings
    assert meta.modalities == ["image", "text"] and meta.license == "apache-2.0" and meta.use_instructions
    assert meta.n_parameters == sum(p.numel() for p in model.state_dict().values())  # what the folder holds
    assert meta.training_datasets == set(TRAINING_DATASETS)
    for name in TRAINING_DATASETS:  # names mteb knows, so its zero-shot marking works
        assert mteb.get_task(name).metadata.name == name
    assert "MMEB-train" in meta.public_training_data and "ShareGPT4V" in meta.public_training_data
    assert meta.similarity_fn_name == "dot"  # embeddings are L2-normalised: the cosine, computed as crem-eval does
    with pytest.raises(ValueError, match="not_a_field"):
        crem_model_meta(crem_folder, not_a_field=1)
    plain = tmp_path / "plain"
    BACKBONES["qwen3_vl"][0](processor.tokenizer).save_pretrained(plain)  # a plain backbone: no chorus tokens
    with pytest.raises(ValueError, match=r"'qwen3_vl' model, not a CREM model \(expected one of crem, "):
        crem_model_meta(plain)


@pytest.mark.parametrize("crem_folder", list(BACKBONES), indirect=True)
def test_mteb_builds_the_model_by_name(crem_folder, no_network):
    """mteb's own machinery on a CREM folder of each backbone: the ModelMeta's loader, and `mteb.get_model` once
    registered (no torchvision needed); the encoder it builds embeds as the folder's model's get_embedding does."""
    meta = register_crem_model(crem_model_meta(crem_folder, name=NAME))
    try:
        encoder = mteb.get_model(NAME, device="cpu")
        assert isinstance(encoder, CREMEncoder)
        assert encoder.mteb_model_meta.name == NAME and encoder.mteb_model_meta.embed_dim == meta.embed_dim
        assert mteb.get_model_meta(NAME) is meta
    finally:
        MODEL_REGISTRY.pop(NAME, None)
    model, processor = load_crem(crem_folder)  # the oracle: the folder's model, one item per forward
    assert type(encoder.model) is type(model) and meta.embed_dim == model.config.text_config.hidden_size
    assert meta.n_parameters == sum(p.numel() for p in model.parameters())  # a tied head (Qwen2.5-VL's) once
    flickr = mteb.get_task("Flickr30kI2TRetrieval").metadata
    texts, images = ["a red digit", "two", "the digit seven"], [random_image(56, 84, 1), None, random_image(32, 64, 2)]
    got = encoder.encode(
        [{"text": texts, "image": images}],
        task_metadata=flickr,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.query,
    )
    with torch.no_grad():
        want = torch.cat([
            model.get_embedding(**processor.process_embedding_inputs(
                images=None if image is None else [image], texts=[text], instruction=flickr.prompt["query"]
            ))
            for text, image in zip(texts, images, strict=True)
        ])  # fmt: skip
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Alibaba-NLP/gme-Qwen2-VL-2B-Instruct is an mteb model"):
        register_crem_model(crem_model_meta(crem_folder, name="Alibaba-NLP/gme-Qwen2-VL-2B-Instruct"))


# ---------------------------------------------------------------------------------------------------- instructions


def test_prompt_types_and_task_types_map_to_crem_instructions(model, processor, digits):
    encoder = CREMEncoder(model, processor)
    query, document = PromptType.query, PromptType.document
    i2t = caption_retrieval_task(digits[0], "i2t", image_root=digits[1]).metadata
    t2i = caption_retrieval_task(digits[0], "t2i", image_root=digits[1]).metadata
    flickr = mteb.get_task("Flickr30kI2TRetrieval").metadata  # a MIEB task with its own query prompt
    # A task without a prompt: CREM's MMEB wording for its category on queries, nothing on documents.
    assert encoder.get_instruction(i2t, query) == I2T_INSTRUCTION
    assert encoder.get_instruction(t2i, query) == T2I_INSTRUCTION
    assert encoder.get_instruction(i2t, document) == encoder.get_instruction(t2i, document) == ""
    # A task's own prompt comes first (queries only).
    assert encoder.get_instruction(flickr, query) == flickr.prompt["query"]
    assert encoder.get_instruction(flickr, document) == ""
    # Symmetric task types: one instruction for every item.
    assert encoder.get_instruction(mteb.get_task("SUN397").metadata, None) == CLASSIFY_INSTRUCTION
    assert encoder.get_instruction(mteb.get_task("STS12").metadata, None) == ""
    # The user's prompts, keyed as mteb keys model prompts, come before everything; "" removes an instruction.
    custom = CREMEncoder(model, processor, prompts={"Flickr30kI2TRetrieval-query": "", "document": "Represent it."})
    assert custom.get_instruction(flickr, query) == ""
    assert custom.get_instruction(flickr, document) == "Represent it."
    assert custom.get_instruction(i2t, query) == I2T_INSTRUCTION
    with pytest.raises(KeyError, match="NoSuchTask"), pytest.warns(UserWarning, match="NoSuchTask"):
        CREMEncoder(model, processor, prompts={"NoSuchTask": "x"})


# ---------------------------------------------------------------------------------------------------- encoding


def test_encode_text_image_and_both_as_crem_hf_encode(model, processor):
    """Batches of mteb's form, windowed and re-sorted inside, give `crem_hf.encode`'s embeddings in the loader's
    order."""
    images = [random_image(28 * (1 + i % 3), 56, seed=i) for i in range(10)]
    texts = [f"the digit {w}" for w in "zero one two three four five six seven eight nine".split()]
    encoder = CREMEncoder(model, processor, batch_size=1)  # windows of 8 items: 10 items take two
    flickr, query = mteb.get_task("Flickr30kI2TRetrieval").metadata, PromptType.query
    cases = {
        "text": ({"text": texts}, texts, [None] * 10),
        "image": ({"image": images}, [None] * 10, images),
        "both": ({"text": texts, "image": images}, texts, images),
    }
    for name, (batch, item_texts, item_images) in cases.items():
        loader = [{key: value[:4] for key, value in batch.items()}, {key: value[4:] for key, value in batch.items()}]
        got = encoder.encode(loader, task_metadata=flickr, hf_split="test", hf_subset="default", prompt_type=query)
        want = encode(
            model, processor, images=item_images, texts=item_texts, instruction=flickr.prompt["query"], batch_size=4
        )
        assert got.shape == (10, 64) and got.dtype == np.float32, name
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=0, msg=name)
    # Zero-shot classification: its label texts are targets (no instruction), its images get the class wording.
    zero_shot = mteb.get_task("SUN397ZeroShot").metadata
    labels = encoder.encode([{"text": texts}], task_metadata=zero_shot, hf_split="test", hf_subset="default")
    torch.testing.assert_close(torch.from_numpy(labels), encode(model, processor, texts=texts), atol=1e-5, rtol=0)
    scans = encoder.encode([{"image": images}], task_metadata=zero_shot, hf_split="test", hf_subset="default")
    want = encode(model, processor, images=images, instruction=CLASSIFY_INSTRUCTION)
    torch.testing.assert_close(torch.from_numpy(scans), want, atol=1e-5, rtol=0)


def test_bad_items_are_named(model, processor):
    encoder = CREMEncoder(model, processor)
    task = mteb.get_task("Flickr30kI2TRetrieval").metadata
    where = {"task_metadata": task, "hf_split": "test", "hf_subset": "default", "prompt_type": PromptType.document}
    with pytest.raises(
        ValueError, match=r"Flickr30kI2TRetrieval \(default/test, document\), item 1 \(id 'd2'\): neither"
    ):
        encoder.encode([{"id": ["d1", "d2"], "text": ["a cat", " "]}], **where)
    with pytest.raises(ValueError, match="item 0: image must be a PIL image or a file path, got bytes"):
        encoder.encode([{"image": [b"\x89PNG"]}], **where)
    with pytest.raises(ValueError, match="not audio"):
        encoder.encode([{"audio": [np.zeros(16)], "text": ["x"]}], **where)
    with pytest.raises(TypeError, match="CREM model and a CREMProcessor"):
        CREMEncoder(torch.nn.Linear(2, 2), processor)


# ---------------------------------------------------------------------------------------------------- agreement


def r_at_1(scores: torch.Tensor, relevant: list[set[int]], doc_ids: list[str], rule: str) -> list[bool]:
    """Per query: is the top-ranked candidate relevant, with exact ties broken by `rule`: "index" (the lowest
    candidate index, as crem-eval's stable sort) or "trec" (the highest document id, as pytrec_eval / mteb)."""
    hits = []
    for q, row in enumerate(scores):
        tied = torch.nonzero(row == row.max()).flatten().tolist()
        top = min(tied) if rule == "index" else max(tied, key=lambda j: doc_ids[j])
        hits.append(top in relevant[q])
    return hits


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_mteb_recall_at_1_agrees_with_crem_eval(direction, model, processor, crem_folder, digits, mteb_run, tmp_path):
    """
    mteb's evaluator (on the ModelMeta it loads itself) and `crem-eval retrieval` score the same pairs the same and
    their R@1 agree. They break exact ties differently: crem-eval ranks tied candidates by index, ascending (a
    stable sort); mteb by document id, descending (pytrec_eval's rule), i.e. by index descending here. Exact ties
    come from duplicate captions (identical texts, identical embeddings): several digit pairs share a caption.
    """
    path, root = digits
    tasks, scores, predictions, _ = mteb_run
    output = tmp_path / "crem_eval.json"
    argv = ["retrieval", "--model", crem_folder, "--data", path, "--image-root", root, "--device", "cpu"]
    assert crem_eval.main([*argv, "--output", str(output)]) == 0
    crem = json.loads(output.read_text())

    # The independent oracle: crem-eval's encoder with crem-eval's instructions, one score matrix.
    rows = load_caption_rows(path, ("captions",), root)
    captions = [c for row in rows for c in row["captions"]]
    owner = [i for i, row in enumerate(rows) for _ in row["captions"]]
    images = [row["image"] for row in rows]
    if direction == "i2t":
        queries = encode(model, processor, images=images, instruction=I2T_INSTRUCTION)
        targets = encode(model, processor, texts=captions)
        relevant = [{j for j, o in enumerate(owner) if o == i} for i in range(len(rows))]
        query_ids, doc_ids = (
            [f"image-{i:05d}" for i in range(len(rows))],
            [f"caption-{j:05d}" for j in range(len(owner))],
        )
    else:
        queries = encode(model, processor, texts=captions, instruction=T2I_INSTRUCTION)
        targets = encode(model, processor, images=images)
        relevant = [{o} for o in owner]
        query_ids, doc_ids = (
            [f"caption-{j:05d}" for j in range(len(owner))],
            [f"image-{i:05d}" for i in range(len(rows))],
        )
    oracle = queries @ targets.T

    # mteb scored every pair as crem-eval's encoder does (same embeddings, same instructions, same dot product).
    mteb_scores = torch.tensor([[predictions[direction][q][d] for d in doc_ids] for q in query_ids])
    torch.testing.assert_close(mteb_scores, oracle, atol=1e-5, rtol=0)

    by_index = r_at_1(oracle, relevant, doc_ids, "index")
    by_trec = r_at_1(oracle, relevant, doc_ids, "trec")
    mteb_r1 = scores[tasks[direction].metadata.name]["recall_at_1"]
    assert crem[f"{direction}_R@1"] == pytest.approx(sum(by_index) / len(by_index), abs=1e-9)
    assert mteb_r1 == pytest.approx(sum(by_trec) / len(by_trec), abs=1e-6)
    # One caption per image: mteb's recall@1 is the hit rate crem-eval reports (with several, its hit_rate_at_1).
    assert mteb_r1 == scores[tasks[direction].metadata.name]["hit_rate_at_1"]
    assert mteb_r1 == pytest.approx(crem[f"{direction}_R@1"], abs=1e-6)
    # The rules differ only on queries whose top score is an exact tie.
    top_is_tied = [(row == row.max()).sum().item() > 1 for row in oracle]
    differ = [q for q in range(len(by_index)) if by_index[q] != by_trec[q]]
    assert all(top_is_tied[q] for q in differ)
    if direction == "i2t":
        # Here they do differ: rows 25 and 26 share their caption ("zero left of five") and both rank it first, so
        # crem-eval credits row 25 (the lower caption index) and mteb row 26 (the higher id): one hit each, one R@1.
        assert differ == [25, 26] and rows[25]["captions"] == rows[26]["captions"] == ["zero left of five"]
        assert (by_index[25], by_index[26], by_trec[25], by_trec[26]) == (True, False, False, True)
    else:
        assert differ == []  # the images are distinct: no exact ties


# ---------------------------------------------------------------------------------------------------- model card


def test_model_card_model_index_reads_mteb_result_files(model, mteb_run):
    tasks, scores, _, cache = mteb_run
    entries = mteb_eval_results([cache], tasks=list(tasks.values()))  # a results folder: model_meta.json skipped
    by_name = {e.dataset_name: e for e in entries}
    assert set(by_name) == {"MTEB DigitsPairsI2T (default)", "MTEB DigitsPairsT2I (default)"}
    for task in tasks.values():
        entry = by_name[f"MTEB {task.metadata.name} (default)"]
        assert entry.metric_type == "recall_at_1" and entry.dataset_split == "test"
        assert entry.metric_value == round(100 * scores[task.metadata.name]["main_score"], 2)
        assert entry.task_type == task.metadata.name and entry.task_name == "Any2AnyRetrieval"
        assert entry.dataset_revision == task.metadata.dataset["revision"]
    card = render_model_card(model.config, CardInfo(repo_id=NAME, extra_eval_results=entries))
    # Both directions read one data file (one dataset type) and stay two model-index entries.
    index = card.data.to_dict()["model-index"][0]["results"]
    assert sorted(r["dataset"]["name"] for r in index) == sorted(by_name)
    assert len({r["dataset"]["type"] for r in index}) == 1
    assert "| MTEB DigitsPairsI2T (default) | test | recall_at_1 |" in card.text
    with pytest.raises(ValueError, match="does not know the task 'DigitsPairsI2T'; pass its task object"):
        mteb_eval_results([cache])


def test_crem_export_writes_mteb_results_into_the_card(crem_folder, tmp_path, capsys):
    task = mteb.get_task("Flickr30kI2TRetrieval")
    result = TaskResult.from_task_results(
        task, {"test": {"default": {"main_score": 0.4321, "ndcg_at_10": 0.4321}}}, 1.0
    )
    result.to_disk(tmp_path / "Flickr30kI2TRetrieval.json")
    out = tmp_path / "hub"
    argv = ["--model", crem_folder, "--output-dir", str(out), "--repo-id", NAME]
    assert crem_export([*argv, "--mteb-results", str(tmp_path / "Flickr30kI2TRetrieval.json")]) == 0
    header = (out / "README.md").read_text().split("---")[1]
    [entry] = yaml.safe_load(header)["model-index"][0]["results"]
    assert entry["dataset"] == {
        "name": "MTEB Flickr30kI2TRetrieval (default)",
        "type": task.metadata.dataset["path"],
        "config": "default",
        "split": "test",
        "revision": task.metadata.dataset["revision"],
    }
    assert entry["metrics"][0]["type"] == "ndcg_at_10" and entry["metrics"][0]["value"] == 43.21

    (tmp_path / "notes.json").write_text("{not json")
    capsys.readouterr()
    assert crem_export([*argv, "--overwrite", "--mteb-results", str(tmp_path / "notes.json")]) == 1
    assert f"--mteb-results: {tmp_path / 'notes.json'} is not an mteb result file" in capsys.readouterr().err
