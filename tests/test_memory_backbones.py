"""`crem-memory` on each backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), run as commands on a saved tiny CREM folder of
the backbone and checked against oracles that do not go through the memory: the stored vectors are `get_embedding`
of the original items, a search is the exact cosine ranking of those, every answer (`ask --ids`, `ask --questions`,
batched and alone) is `generate(compress=True)` on the original items token for token, quantised contexts answer
and stay within their bound, `info` names the backbone, and each backbone refuses the memory of every other by name.

The items: images of several sizes (whole 32-px tokens, Qwen3-VL's merged patch; images under one merged token per
side, upscaled: one on every backbone, one under 32 px but over 28 px, upscaled on Qwen3-VL only), a text-only item
and an image+text item.
"""

from __future__ import annotations

import json

import backbones
import pytest
import torch
from helpers import memory_cli, random_image, save_crem
from test_memory_formats import check_row_sizes, check_within_half_a_scale

from crem_hf.instructions import T2I_INSTRUCTION
from crem_hf.memory import CREMMemory
from crem_hf.memory.cli import main as memory_main
from crem_hf.testing import BACKBONES, make_tiny_crem, make_tiny_processor

# The per-backbone fixtures (they override the session's Qwen2-VL ones here): each test runs on every backbone.
backbone = backbones.backbone
model = backbones.model

QUESTION = "Which digit is shown?"
TOKENS = 6
#: id -> (image size (height, width) or None, text or None).
ITEMS = {
    "wide": ((56, 140), None),  # two of Qwen2.5-VL's 112-px attention windows side by side
    "square": ((112, 112), None),
    "grid-32": ((64, 96), None),  # whole 32-px tokens (Qwen3-VL), 28-px ones rounded (Qwen2-VL, Qwen2.5-VL)
    "note": (None, "just a text item"),
    "small": ((20, 40), None),  # under 28 px: upscaled on every backbone
    "between+text": ((30, 60), "a caption"),  # 28 to 32 px: upscaled on Qwen3-VL only; with a text
}
#: What a memory names each backbone by: its title and its CREM `model_type`.
BACKBONE_NAMES = {
    "qwen2_vl": ("Qwen2-VL", "crem"),
    "qwen2_5_vl": ("Qwen2.5-VL", "crem_qwen2_5_vl"),
    "qwen3_vl": ("Qwen3-VL", "crem_qwen3_vl"),
}


@pytest.fixture(scope="module")
def processor(backbone):
    """The backbone's tiny processor, upscaling images under one merged token per side (28 px; Qwen3-VL: 32 px)."""
    return make_tiny_processor(backbone=backbone, upscale_small_images=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The items as PIL images and texts, and as a JSONL file of `{id, image, text}` records with PNG images."""
    folder = tmp_path_factory.mktemp("items")
    images, texts, lines = [], [], []
    for seed, (item_id, (size, text)) in enumerate(ITEMS.items()):
        image = None if size is None else random_image(*size, seed=50 + seed)
        record = {"id": item_id, "text": text}
        if image is not None:
            record["image"] = f"{seed}.png"
            image.save(folder / record["image"])
        images.append(image)
        texts.append(text)
        lines.append(json.dumps(record) + "\n")
    (folder / "items.jsonl").write_text("".join(lines))
    return {"ids": list(ITEMS), "images": images, "texts": texts, "jsonl": folder / "items.jsonl", "folder": folder}


@pytest.fixture(scope="module")
def saved_model(model, processor, tmp_path_factory):
    return save_crem(model, processor, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def memory(saved_model, source, model, processor, tmp_path_factory):
    """The items indexed by `crem-memory index` (batches of 4: rows of different sizes side by side), opened here
    with the original model: the loaded folder wrote what the model in this process would."""
    uri = tmp_path_factory.mktemp("memory") / "m"
    done = memory_cli("index", "--model", saved_model, "--memory", uri, source["jsonl"], "--batch-size", 4)
    assert done.returncode == 0, done.stderr
    assert f"added {len(ITEMS)}, already stored 0, failed to load 0; {len(ITEMS)} items stored" in done.stdout
    return CREMMemory.open(uri, model, processor)


def _run(capsys, *argv) -> str:
    """`crem-memory ARGV` in this process (the command's `main`): its standard output; exit status 0 asserted."""
    assert memory_main([str(arg) for arg in argv]) == 0
    return capsys.readouterr().out


def _generated(model, processor, source, questions, rows, **options):
    """
    The oracle: `generate(compress=True)` (greedy unless `options` say otherwise) on the original items of `rows`,
    one question each, as one batch: the new tokens `(len(rows), TOKENS)` and their logits `(TOKENS, len(rows),
    vocab)`.
    """
    batch = processor.process_generation_inputs(
        questions=questions,
        images=[source["images"][i] for i in rows],
        texts=[source["texts"][i] for i in rows],
    )
    with torch.no_grad():
        out = model.generate(
            **batch, compress=True, max_new_tokens=TOKENS, output_logits=True, return_dict_in_generate=True,
            **{"do_sample": False, **options},
        )  # fmt: skip
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.logits)


def _from_memory(memory: CREMMemory, question: str, ids: list[str]):
    """Greedy generation from the stored contexts of `ids` (what `answer_ids` runs): the new tokens and logits."""
    followups = memory.processor.process_followups(questions=[question] * len(ids))
    with torch.no_grad():
        out = memory.model.generate(
            context=memory.contexts(ids), **followups, max_new_tokens=TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[:, followups["input_ids"].shape[1] :], torch.stack(out.logits)


def _until_end(tokens: list[int], model) -> list[int]:
    """`tokens` up to and including the first end-of-turn token."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ends = [k for k, token in enumerate(tokens) if token in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def _text(processor, tokens) -> str:
    return processor.decode(tokens, skip_special_tokens=True).strip()


def test_index_stores_get_embedding_and_info_names_the_backbone(memory, model, processor, source, backbone, capsys):
    with torch.no_grad():
        expected = model.get_embedding(
            **processor.process_embedding_inputs(images=source["images"], texts=source["texts"])
        )
    stored = {row["id"]: torch.tensor(row["vector"]) for row in memory.items.to_arrow().to_pylist()}
    assert sorted(stored) == sorted(ITEMS)
    assert torch.allclose(torch.stack([stored[i] for i in source["ids"]]), expected, atol=1e-6)
    info = json.loads(_run(capsys, "info", "--memory", memory.uri))
    assert (
        info["backbone"] == "{} ({})".format(*BACKBONE_NAMES[backbone])
        and info["model"]["backbone"] == model.config.model_type
    )
    assert (info["rows"], info["context_format"], info["context_slots_per_item"]) == (len(ITEMS), "model", 16)


def test_search_by_text_and_by_image_is_the_exact_cosine_ranking(memory, saved_model, model, processor, source, capsys):
    with torch.no_grad():
        items = model.get_embedding(
            **processor.process_embedding_inputs(images=source["images"], texts=source["texts"])
        )
        query = model.get_embedding(
            **processor.process_embedding_inputs(texts=["a digit"], instruction=T2I_INSTRUCTION)
        )
    scores = torch.nn.functional.normalize(items, dim=-1) @ torch.nn.functional.normalize(query[0], dim=-1)
    order = scores.argsort(descending=True).tolist()
    shown = _run(
        capsys, "search", "--model", saved_model, "--memory", memory.uri, "--text", "a digit", "--k", 4, "--json"
    )
    hits = [json.loads(line) for line in shown.splitlines()]
    assert [hit["id"] for hit in hits] == [source["ids"][i] for i in order[:4]]
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4]
    assert [hit["score"] for hit in hits] == pytest.approx(scores[order[:4]].tolist(), abs=1e-4)  # printed to 4 places
    # An image query: the stored image itself (embedded with the same instruction) first, at cosine 1.
    image = source["folder"] / "2.png"
    shown = _run(capsys, "search", "--model", saved_model, "--memory", memory.uri, "--image", image, "--k", 2, "--json")
    best = json.loads(shown.splitlines()[0])
    assert best["id"] == "grid-32" and best["score"] == pytest.approx(1.0, abs=1e-4)


def test_ask_answers_token_for_token_as_compressed_generation_on_the_original_items(
    memory, saved_model, model, processor, source, capsys
):
    """
    Batched and each item alone: the stored contexts give the tokens and the logits of `generate(compress=True)` on
    the original items. (The logits differ between items even where greedy tokens agree: they show that each item's
    own context was read.)
    """
    ids, rows = source["ids"], range(len(ITEMS))
    expected, expected_logits = _generated(model, processor, source, [QUESTION] * len(ITEMS), rows)
    assert float((expected_logits[0, 1:] - expected_logits[0, :1]).abs().amax(-1).min()) > 1e-2  # items differ
    tokens, logits = _from_memory(memory, QUESTION, ids)
    assert torch.equal(tokens, expected) and torch.allclose(logits, expected_logits, atol=1e-5)
    assert torch.equal(memory.answer_ids(QUESTION, ids, max_new_tokens=TOKENS), expected)
    for i, item_id in enumerate(ids):  # each item alone, at its own size, against generation on it alone
        alone, alone_logits = _generated(model, processor, source, [QUESTION], [i])
        tokens, logits = _from_memory(memory, QUESTION, [item_id])
        assert torch.equal(tokens, alone) and torch.allclose(logits, alone_logits, atol=1e-5), item_id
        assert torch.equal(memory.answer_ids(QUESTION, [item_id], max_new_tokens=TOKENS), alone), item_id
    # The command: a batch of all the items, the answers as text.
    shown = _run(capsys, "ask", "--model", saved_model, "--memory", memory.uri, "--ids", *ids, "--question", QUESTION,
                 "--max-new-tokens", TOKENS, "--json")  # fmt: skip
    answers = [json.loads(line) for line in shown.splitlines()]
    assert [answer["id"] for answer in answers] == ids
    assert [answer["answer"] for answer in answers] == [_text(processor, row) for row in expected]


def test_ask_questions_file_answers_each_pair_as_compressed_generation(
    memory, saved_model, model, processor, source, tmp_path, capsys
):
    """
    `crem-memory ask --questions` (`ask_many`: batched by question length, two rows a batch) against greedy
    generation on each original item alone with its question, cut at the end of the turn; and `ask_many` sampling
    (one batch of every item) draws what sampled generation on the original items draws with the same seed.
    """
    questions = [QUESTION, "What?", "Describe the picture in a few words, please."]
    pairs = [(questions[i % 3], source["ids"][(5 * i) % len(ITEMS)]) for i in range(7)]  # every item, mixed lengths
    expected = [
        _until_end(_generated(model, processor, source, [q], [source["ids"].index(i)])[0][0].tolist(), model)
        for q, i in pairs
    ]
    assert len({tuple(row) for row in expected}) > 1, "the pairs' answers differ, so the comparison can fail"
    tokens = memory.answer_ids_many(pairs, max_new_tokens=TOKENS, max_batch_size=2, show_progress=False)
    assert [row.tolist() for row in tokens] == expected
    (tmp_path / "asks.jsonl").write_text("".join(json.dumps({"question": q, "id": i}) + "\n" for q, i in pairs))
    output = tmp_path / "answers.jsonl"
    _run(capsys, "ask", "--model", saved_model, "--memory", memory.uri, "--questions", tmp_path / "asks.jsonl",
         "--output", output, "--batch-size", 2, "--max-new-tokens", TOKENS)  # fmt: skip
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(answer["question"], answer["id"]) for answer in answers] == pairs
    assert [answer["answer"] for answer in answers] == [_text(processor, row) for row in expected]
    # Sampling: each row's draws follow its own item's distribution.
    ids = source["ids"]
    torch.manual_seed(7)
    sampled = memory.answer_ids_many([(QUESTION, i) for i in ids], max_new_tokens=TOKENS, do_sample=True, top_k=0,
                                     show_progress=False)  # fmt: skip
    torch.manual_seed(7)
    drawn, _ = _generated(model, processor, source, [QUESTION] * len(ITEMS), range(len(ITEMS)), do_sample=True, top_k=0)
    assert [row.tolist() for row in sampled] == [_until_end(row.tolist(), model) for row in drawn]
    assert len({tuple(row.tolist()) for row in sampled}) > 1


@pytest.fixture(scope="module")
def quantised(memory, saved_model, source, model, processor, tmp_path_factory):
    """The items indexed again by the command, with `--context-format int8` and `int4`; and the exact memory."""
    root = tmp_path_factory.mktemp("quantised")
    opened = {"model": memory}
    for fmt in ("int8", "int4"):
        argv = ["index", "--model", saved_model, "--memory", root / fmt, source["jsonl"], "--context-format", fmt]
        assert memory_main([str(arg) for arg in argv]) == 0
        opened[fmt] = CREMMemory.open(root / fmt, model, processor)
    return opened


def test_quantised_contexts_open_within_their_bound_and_answer(quantised, model, processor, source, capsys):
    """
    int8 and int4 memories of the backbone (as test_memory_formats.py checks on Qwen2-VL): rows of the format's
    size, `info` records the format, every element within half its quantisation step of the exact context, and every
    item answers from it. Equal answers are not guaranteed (the tiny models' top logits are near ties); the logits
    move, int4 more than int8.
    """
    check_row_sizes(quantised, model.config.num_chorus_tokens)
    ids = source["ids"]
    _, exact_logits = _from_memory(quantised["model"], QUESTION, ids)
    moved = {}
    for fmt in ("int8", "int4"):
        info = json.loads(_run(capsys, "info", "--memory", quantised[fmt].uri))
        assert (info["context_format"], info["rows"]) == (fmt, len(ITEMS))
        assert info["model"]["backbone"] == model.config.model_type
        check_within_half_a_scale(quantised["model"], quantised[fmt], ids)
        tokens, logits = _from_memory(quantised[fmt], QUESTION, ids)
        assert tokens.shape == (len(ITEMS), TOKENS)
        moved[fmt] = float((logits[0] - exact_logits[0]).abs().max())
        assert len(quantised[fmt].ask(QUESTION, ids, max_new_tokens=TOKENS)) == len(ITEMS)
    assert 0 < moved["int8"] < moved["int4"], moved


def test_the_memory_refuses_a_model_of_every_other_backbone_naming_both(memory, backbone, tmp_path, capsys):
    """Every ordered pair (this module runs once per writing backbone): `CREMMemory.open` and the command refuse a
    model of another backbone with one message naming both; the memory stays as it was."""
    title, model_type = BACKBONE_NAMES[backbone]
    for reader in BACKBONES:
        if reader == backbone:
            continue
        reader_processor = make_tiny_processor(backbone=reader)
        reader_model = make_tiny_crem(reader_processor, backbone=reader)
        reader_title, reader_type = BACKBONE_NAMES[reader]
        expected = (
            f"{memory.uri} was written by a {title} CREM model ({model_type}); this model is {reader_title} "
            f"({reader_type}). Contexts are model-specific"
        )
        with pytest.raises(ValueError) as refused:
            CREMMemory.open(memory.uri, reader_model, reader_processor)
        assert str(refused.value).startswith(expected)
        folder = save_crem(reader_model, reader_processor, tmp_path / reader)
        argv = ["search", "--model", folder, "--memory", memory.uri, "--text", "a digit"]
        assert memory_main(argv) == 1
        reason = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
        assert reason.startswith("crem-memory: error: ") and expected in reason
    assert len(memory) == len(ITEMS)
