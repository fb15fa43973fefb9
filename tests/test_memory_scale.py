"""The visual memory at scale: reading a context is a point lookup on the id index (its plan says so), batched asks
answer each pair as a single ask does, at any batch budget, and `crem-memory ask --questions` answers a JSONL file."""

from __future__ import annotations

import json

import lancedb
import pytest
import torch
from helpers import memory_cli, random_image, save_crem

from crem_hf.memory import CREMMemory
from crem_hf.memory.cli import main as memory_main

QUESTIONS = ["Which digit is shown?", "What?", "Describe the picture in a few words, please.", "Is it red?"]


@pytest.fixture(scope="module")
def memory(model, processor, tmp_path_factory):
    memory = CREMMemory.open(tmp_path_factory.mktemp("scale") / "m", model, processor, create=True)
    memory.add(
        ids=["a", "b", "c", "it's"],
        images=[random_image(56, 84, seed=1), random_image(112, 112, seed=2), None, random_image(56, 56, seed=3)],
        texts=[None, "a caption", "just a text item", None],
        show_progress=False,
    )
    return memory


class _QuerySpy:
    """The items table, recording every query builder that `search()` hands out (to read its plan afterwards)."""

    def __init__(self, items):
        self._items, self.queries = items, []

    def search(self, *args, **kwargs):
        query = self._items.search(*args, **kwargs)
        self.queries.append(query)
        return query

    def __getattr__(self, name):
        return getattr(self._items, name)


def _rows_scanned(analysed: str) -> int:
    """`rows_scanned` of the filtering LanceRead node of an `analyze_plan` text (LanceDB writes 4000 as "4.00 K")."""
    read = next(line for line in analysed.splitlines() if "LanceRead" in line and "full_filter" in line)
    value = read.split("rows_scanned=")[1].split(",")[0].strip()
    number, _, unit = value.partition(" ")
    return round(float(number) * {"": 1, "K": 1e3, "M": 1e6}[unit])


def test_reading_contexts_by_id_is_a_point_lookup_on_the_id_index(model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    assert [index.name for index in memory.items.list_indices()] == ["id_idx"]  # created with the table
    memory.add(ids=["x", "y'z"], texts=["one", "two"], show_progress=False)
    template = memory.items.search().where("id = 'x'").limit(1).to_arrow().to_pylist()[0]
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(4000, len(template["vector"]), generator=generator), dim=-1)
    for start in range(0, 4000, 1000):
        rows = [{**template, "id": f"v{i}", "vector": vectors[i].tolist()} for i in range(start, start + 1000)]
        memory.items.add(rows)
    wanted = ["v3999", "x", "y'z", "v17"]
    spy = memory.items = _QuerySpy(memory.items)

    def read() -> tuple[object, str, str]:
        context = memory.contexts(wanted)
        query = spy.queries[-1]
        return context, query.explain_plan(True), query.analyze_plan()

    before, plan_before, analysed_before = read()  # appended rows, not yet indexed: a scan of the table
    assert "ScalarIndexQuery" not in plan_before and _rows_scanned(analysed_before) >= 3990  # ~4002, printed 4.00 K
    assert memory.refresh_id_index() is True and memory.refresh_id_index() is False  # up to date: no rebuild
    stats = memory.items.index_stats("id_idx")
    assert (stats.num_indexed_rows, stats.num_unindexed_rows) == (4002, 0)
    after, plan_after, analysed_after = read()
    assert "ScalarIndexQuery" in plan_after and "id_idx(BTree)" in plan_after
    assert _rows_scanned(analysed_after) == 4  # the four ids, nothing else is read
    # The same contexts either way, and the same answers.
    assert torch.equal(before.input_ids, after.input_ids) and torch.equal(before.position_ids, after.position_ids)
    for old, new in zip(before.cache.layers, after.cache.layers, strict=True):
        assert torch.equal(old.keys, new.keys) and torch.equal(old.values, new.values)
    answers = memory.answer_ids("Which?", ["y'z", "x"], max_new_tokens=4)
    batch = processor.process_generation_inputs(questions=["Which?"] * 2, texts=["two", "one"])
    expected = model.generate(**batch, compress=True, max_new_tokens=4, do_sample=False)
    assert torch.equal(answers, expected[:, batch["input_ids"].shape[1] :])
    # New rows after the index are still found (by a scan of just them) before the next refresh.
    memory.items.add([{**template, "id": "late"}])
    late = memory.contexts(["late", "x"])
    assert torch.equal(late.cache.layers[0].keys[0], late.cache.layers[0].keys[1])
    memory.build_ann_index(num_partitions=2)  # refreshes the id index as well
    assert memory.items.index_stats("id_idx").num_unindexed_rows == 0
    info = memory.info()
    assert info["ann_index"] is True and info["id_index"] is True


def test_info_reports_no_ann_index_beside_the_id_index(memory):
    info = memory.info()
    assert (info["ann_index"], info["id_index"]) == (False, True)


def _single(memory, question, item_id, max_new_tokens):
    """The answer of `ask`/`answer_ids` for one pair alone, cut at the first end-of-turn token."""
    tokens = memory.answer_ids(question, [item_id], max_new_tokens=max_new_tokens)[0].tolist()
    eos = memory.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ends = [k for k, token in enumerate(tokens) if token in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def test_ask_many_answers_each_pair_as_a_single_ask_at_every_batch_budget(memory):
    ids = ["a", "b", "c", "it's"]
    pairs = [(QUESTIONS[(i * 3) % 4], ids[i % 4]) for i in range(11)]  # mixed lengths, repeated ids, input order
    expected_tokens = [_single(memory, q, i, 6) for q, i in pairs]
    expected_text = [memory.ask(q, [i], max_new_tokens=6)[0] for q, i in pairs]
    row = memory.kv_bytes_per_row(40, 6)
    calls = []
    contexts = memory.contexts
    memory.contexts = lambda hits: calls.append(len(hits)) or contexts(hits)
    try:
        for options in (
            {"max_batch_size": 1},
            {"max_batch_size": 3},
            {"memory_budget_bytes": 2 * row},  # at most two rows of (at most) 40 question tokens per batch
            {},
        ):
            calls.clear()
            tokens = memory.answer_ids_many(pairs, max_new_tokens=6, show_progress=False, **options)
            assert [t.tolist() for t in tokens] == expected_tokens, options
            limit = options.get("max_batch_size") or (2 if "memory_budget_bytes" in options else 64)
            assert max(calls) <= limit and sum(calls) == len(pairs)
            if options.get("max_batch_size") == 3:
                assert max(calls) == 3  # pairs of one question length do share a batch
            assert memory.ask_many(pairs, max_new_tokens=6, show_progress=False, **options) == expected_text
    finally:
        del memory.contexts


def test_ask_many_refuses_bad_input_by_name(memory):
    with pytest.raises(ValueError, match="below one row's KV cache"):
        memory.ask_many([("What?", "a")], memory_budget_bytes=1000)
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(question, hit or id\) pair"):
        memory.ask_many([("What?", "a"), "b"])
    with pytest.raises(ValueError, match="No .* pairs"):
        memory.ask_many([])
    with pytest.raises(ValueError, match="no item with id 'nope'"):
        memory.ask_many([("What?", "a"), ("What?", "nope")], show_progress=False)
    with pytest.raises(ValueError, match="max_batch_size"):
        memory.ask_many([("What?", "a")], max_batch_size=0)


@pytest.fixture(scope="module")
def saved_model(model, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale-cli") / "model"
    return save_crem(model, processor, folder)


def test_cli_ask_questions_file_as_a_command(saved_model, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        random_image(56, 56 + 28 * i, seed=40 + i).save(folder / f"{i}.png")
    uri = tmp_path / "m"
    assert memory_main(["index", "--model", saved_model, "--memory", str(uri), str(folder)]) == 0
    capsys.readouterr()
    stats = lancedb.connect(str(uri)).open_table("items").index_stats("id_idx")
    assert (stats.num_indexed_rows, stats.num_unindexed_rows) == (3, 0)  # `index` leaves the id index up to date
    asks = [("2.png", QUESTIONS[0]), ("0.png", QUESTIONS[2]), ("2.png", QUESTIONS[1]), ("1.png", QUESTIONS[0])]
    questions = tmp_path / "asks.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "id": i}) + "\n" for i, q in asks) + "\n")
    out = tmp_path / "answers.jsonl"
    common = ["--model", saved_model, "--memory", uri, "--max-new-tokens", "5"]
    done = memory_cli("ask", *common, "--questions", questions, "--output", out, "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(a["line"], a["id"], a["question"]) for a in answers] == [(n + 1, i, q) for n, (i, q) in enumerate(asks)]
    # Oracle: each question asked alone through the single-question command.
    for (item_id, question), answer in zip(asks, answers, strict=True):
        argv = ["ask", *map(str, common), "--ids", item_id, "--question", question, "--json"]
        assert memory_main(argv) == 0
        assert json.loads(capsys.readouterr().out)["answer"] == answer["answer"]
    to_stdout = memory_cli("ask", *common, "--questions", questions)
    assert to_stdout.returncode == 0 and [json.loads(line) for line in to_stdout.stdout.splitlines()] == answers
    # Bad lines are named by number; nothing is written.
    for content, reason in (
        ('{"question": "q", "id": "0.png"}\n{broken\n', "line 2 is not JSON"),
        ('{"question": "q", "id": "0.png"}\n\n["a list"]\n', "line 3 must be a JSON object"),
        ('{"question": "", "id": "0.png"}\n', "line 1 needs a non-empty string 'question'"),
        ('{"question": "q"}\n', "line 1 needs a non-empty string 'id'"),
        ('{"question": "q", "id": "missing.png"}\n', "no item with id 'missing.png'"),
    ):
        questions.write_text(content)
        bad = memory_cli("ask", *common, "--questions", questions, "--output", tmp_path / "bad.jsonl")
        last = bad.stderr.strip().splitlines()[-1]  # a missing id is found after the model loaded (its progress bar)
        assert bad.returncode == 1 and last.startswith("crem-memory: error: ") and reason in last, bad.stderr
        assert "missing" in content or bad.stderr.count("\n") == 1, bad.stderr
        assert not (tmp_path / "bad.jsonl").exists()
    both = memory_cli("ask", *common, "--questions", questions, "--question", "Which?")
    assert both.returncode == 1 and "one of --question" in both.stderr
