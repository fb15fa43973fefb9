"""A memory's context storage formats: `model` (exact), `int8` and `int4` (quantised, see `quantize.py`). Quantised
contexts come back within the quantisation bound of the exact ones, int8 answers equal the exact answers on the tiny
model, the format is recorded and a reader refuses what it does not know; bad input writes nothing."""

from __future__ import annotations

import json

import lancedb
import pyarrow as pa
import pytest
import torch
from helpers import memory_cli, random_image, save_crem

from crem_hf.memory import CREMMemory
from crem_hf.memory.quantize import context_nbytes, hadamard, quantize

QUESTION = "Which digit is shown?"
#: Eight items: images of three sizes, text-only and image+text items.
IDS = [f"item-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def items():
    sizes = [(56, 84), (112, 112), None, (56, 56), (84, 56), (56, 112), None, (84, 84)]
    texts = [None, None, "a text item", "a caption", None, None, "another text", "seven"]
    return {
        "ids": IDS,
        "images": [None if size is None else random_image(*size, seed=20 + i) for i, size in enumerate(sizes)],
        "texts": texts,
    }


@pytest.fixture(scope="module")
def memories(model, processor, items, tmp_path_factory):
    """One memory per format, holding the same items."""
    root = tmp_path_factory.mktemp("formats")
    opened = {}
    for fmt in ("model", "int8", "int4"):
        memory = CREMMemory.open(root / fmt, model, processor, create=True, context_format=fmt)
        report = memory.add(**items, batch_size=3, show_progress=False)
        assert report.added == len(IDS)
        opened[fmt] = memory
    return opened


def stored_kv(memory: CREMMemory, ids: list[str] = IDS) -> torch.Tensor:
    """The items' chorus keys/values as read back: `(items, layers, 2, kv_heads, slots, head_dim)`."""
    context = memory.contexts(ids)
    p = len(memory.prefix_ids)
    return torch.stack(
        [torch.stack([layer.keys[:, :, p:], layer.values[:, :, p:]], dim=1) for layer in context.cache.layers], dim=1
    )


def check_within_half_a_scale(exact_memory: CREMMemory, memory: CREMMemory, ids: list[str] = IDS) -> None:
    """
    `memory`'s quantised contexts of `ids` against `exact_memory`'s (the same items in the exact format): each
    element within half its group's scale, the shared prefix exact, the ids and positions those of the exact memory.
    """
    fmt, bits = memory.context_format, {"int8": 8, "int4": 4}[memory.context_format]
    exact, quantised = stored_kv(exact_memory, ids), stored_kv(memory, ids)
    assert quantised.dtype == exact.dtype == torch.float32 and quantised.shape == exact.shape
    # The oracle's scales: each exact context quantised per value slot, and per key channel (int8) or, in the
    # Hadamard-rotated frame, per key slot (int4); each element within half its group's scale.
    _, value_scale, _ = quantize(exact[:, :, 1], bits, dim=-1)
    slack = 1e-5 * float(exact.abs().max())
    keys, exact_keys = quantised[:, :, 0], exact[:, :, 0]
    if fmt == "int4":
        matrix = hadamard(exact.shape[-1])
        keys, exact_keys = keys @ matrix, exact_keys @ matrix
    _, key_scale, _ = quantize(exact_keys, bits, dim=-2 if fmt == "int8" else -1)
    assert bool(((keys - exact_keys).abs() <= key_scale.float() / 2 + slack).all())
    assert bool(((quantised[:, :, 1] - exact[:, :, 1]).abs() <= value_scale.float() / 2 + slack).all())
    assert not torch.equal(quantised, exact)  # it is quantised
    # The shared prefix stays exact, positions and ids are those of the exact memory.
    a, b = exact_memory.contexts(ids), memory.contexts(ids)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.position_ids, b.position_ids)
    p = len(memory.prefix_ids)
    assert torch.equal(a.cache.layers[0].keys[:, :, :p], b.cache.layers[0].keys[:, :, :p])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantised_contexts_come_back_within_half_a_scale_of_the_exact_ones(memories, fmt):
    check_within_half_a_scale(memories["model"], memories[fmt])


def check_row_sizes(memories: dict[str, CREMMemory], num_chorus_tokens: int) -> None:
    """Each memory's context rows (one memory per format, the same items) have the size of their format."""
    f = memories["model"].fingerprint
    shape = (f["num_layers"], 2, f["num_kv_heads"], num_chorus_tokens, f["head_dim"])
    for fmt, memory in memories.items():
        rows = memory.items.to_arrow().column("context").to_pylist()
        assert {len(row) for row in rows} == {context_nbytes(fmt, torch.float32, shape)}
        assert memory.info()["context_format"] == fmt == CREMMemory.describe(memory.uri)["context_format"]
    sizes = {fmt: memory.info()["items_bytes"] for fmt, memory in memories.items()}
    assert sizes["int4"] < sizes["int8"] < sizes["model"]


def test_stored_rows_have_the_size_of_their_format(memories, model):
    check_row_sizes(memories, model.config.num_chorus_tokens)


def _first_logits(memory: CREMMemory, processor) -> torch.Tensor:
    """The logits of the first answer token `(items, vocab)` from the stored contexts."""
    followups = processor.process_followups(questions=[QUESTION] * len(IDS))
    out = memory.model.generate(
        context=memory.contexts(IDS),
        **followups,
        max_new_tokens=1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.logits[0]


def test_quantised_answers_stay_close_to_the_exact_ones(memories, processor):
    """
    On the tiny random-weight model, whose top logits are near ties (margins ~0.05): int8 moves the logits by ~3e-4,
    int4 by ~6e-3. Whole greedy answers of 6 tokens: int8 equals the exact answer on 7 of these 8 items (the eighth
    flips a near-tie at its third token), int4 on 5 of 8; every first token agrees.
    """
    exact_logits = _first_logits(memories["model"], processor)
    moved = {
        fmt: float((_first_logits(memories[fmt], processor) - exact_logits).abs().max()) for fmt in ("int8", "int4")
    }
    assert 0 < moved["int8"] < 1e-3 and moved["int8"] < moved["int4"] < 1e-2, moved
    exact = memories["model"].answer_ids(QUESTION, IDS, max_new_tokens=6)
    answers = {fmt: memories[fmt].answer_ids(QUESTION, IDS, max_new_tokens=6) for fmt in ("int8", "int4")}
    for fmt, tokens in answers.items():
        assert torch.equal(tokens[:, 0], exact[:, 0]), fmt
    whole = {fmt: int((tokens == exact).all(1).sum()) for fmt, tokens in answers.items()}
    assert whole["int8"] >= 7 and whole["int4"] >= 5, whole


def test_the_format_is_the_memorys_own_and_another_is_refused(memories, model, processor, items):
    uri = memories["int4"].uri
    assert CREMMemory.open(uri, model, processor).context_format == "int4"  # no format given: the memory's
    assert CREMMemory.open(uri, model, processor, context_format="int4").context_format == "int4"
    for other in ("model", "int8"):
        with pytest.raises(ValueError, match=f"stores its contexts in format 'int4', not '{other}'"):
            CREMMemory.open(uri, model, processor, create=True, context_format=other)
    # Adding through a reopened handle writes the memory's format.
    reopened = CREMMemory.open(uri, model, processor)
    reopened.add(ids=["late"], texts=["late item"], show_progress=False)
    rows = {row["id"]: row for row in reopened.items.to_arrow().to_pylist()}
    assert len(rows["late"]["context"]) == len(rows["item-0"]["context"])
    reopened.items.delete("id = 'late'")


def test_an_unknown_format_name_is_an_error_and_writes_nothing(model, processor, tmp_path):
    target = tmp_path / "new"
    with pytest.raises(ValueError, match="Unknown context format 'int2'; expected one of model, int8, int4"):
        CREMMemory.open(target, model, processor, create=True, context_format="int2")
    assert not target.exists()


def _rewrite_meta(uri, change) -> None:
    db = lancedb.connect(str(uri))
    table = db.open_table("crem_memory")
    rows = table.to_arrow().to_pylist()
    rows = [change(row) for row in rows]
    db.drop_table("crem_memory")
    db.create_table("crem_memory", data=pa.Table.from_pylist(rows))


def test_a_memory_of_an_unknown_format_is_refused_by_name(model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True, context_format="int8")
    memory.add(ids=["a"], texts=["one"], show_progress=False)
    _rewrite_meta(memory.uri, lambda row: {**row, "context_format": "int2"})
    for read in (lambda: CREMMemory.open(memory.uri, model, processor), lambda: CREMMemory.describe(memory.uri)):
        with pytest.raises(ValueError, match="stores its contexts in format 'int2', which this crem-hf does not read"):
            read()


def test_a_memory_written_before_formats_reads_as_exact(model, processor, tmp_path):
    """A meta row without the `context_format` field (memories written before it) is the exact format."""
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    memory.add(ids=["a"], texts=["one"], show_progress=False)
    expected = memory.answer_ids(QUESTION, ["a"], max_new_tokens=4)
    _rewrite_meta(memory.uri, lambda row: {k: v for k, v in row.items() if k != "context_format"})
    old = CREMMemory.open(memory.uri, model, processor)
    assert old.context_format == "model" and torch.equal(old.answer_ids(QUESTION, ["a"], max_new_tokens=4), expected)
    with pytest.raises(ValueError, match="format 'model', not 'int4'"):
        CREMMemory.open(memory.uri, model, processor, context_format="int4")


def test_a_row_of_another_format_mixed_into_the_table_is_refused_naming_the_item(memories, model, processor):
    exact_row = memories["model"].items.search().where("id = 'item-1'").limit(1).to_arrow().to_pylist()[0]
    int8 = memories["int8"]
    int8.items.add([{**exact_row, "id": "mixed-in"}])  # checksum matches: it is a whole exact row
    try:
        assert int8.ask(QUESTION, ["item-1"], max_new_tokens=2)  # the memory's own rows still answer
        with pytest.raises(ValueError, match="context of item 'mixed-in' does not fit the memory: .*format 'int8'"):
            int8.ask(QUESTION, ["item-1", "mixed-in"])
    finally:
        int8.items.delete("id = 'mixed-in'")


@pytest.fixture(scope="module")
def saved_model(model, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats-cli") / "model"
    return save_crem(model, processor, folder)


def test_cli_index_takes_a_context_format(saved_model, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(3):
        random_image(56, 56 + 28 * i, seed=40 + i).save(folder / f"{i}.png")
    uri = tmp_path / "m"
    done = memory_cli("index", "--model", saved_model, "--memory", uri, folder, "--context-format", "int4")
    assert done.returncode == 0, done.stderr
    info = memory_cli("info", "--memory", uri)
    assert info.returncode == 0 and json.loads(info.stdout)["context_format"] == "int4"
    again = memory_cli("index", "--model", saved_model, "--memory", uri, folder, "--context-format", "int8")
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert again.stderr.startswith("crem-memory: error: ") and "format 'int4', not 'int8'" in again.stderr
    other = tmp_path / "other"
    bad = memory_cli("index", "--model", saved_model, "--memory", other, folder, "--context-format", "int2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'int2'" in bad.stderr
    assert not other.exists()
