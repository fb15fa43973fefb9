"""The visual memory: stored contexts answer exactly as compressed generation on the original items, search is the
exact cosine ranking, indexing resumes (also after kill -9) and runs across processes, bad input is named."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import lancedb
import pytest
import torch
from helpers import free_port, memory_cli, random_image, save_crem

from crem_hf.memory import CREMMemory, read_source
from crem_hf.memory.cli import main as memory_main
from crem_hf.testing import make_tiny_crem, make_tiny_processor

QUESTION = "Which digit is shown?"


@pytest.fixture(scope="module")
def items():
    """Images of three sizes, a text-only item and an image+text item; an id that needs SQL quoting."""
    return {
        "ids": ["wide", "square", "note", "small+text", "it's"],
        "images": [
            random_image(56, 84, seed=1),
            random_image(112, 112, seed=2),
            None,
            random_image(56, 56, seed=3),
            random_image(84, 56, seed=4),
        ],
        "texts": [None, None, "just a text item", "a caption", None],
    }


@pytest.fixture(scope="module")
def memory(model, processor, items, tmp_path_factory):
    memory = CREMMemory.open(tmp_path_factory.mktemp("memory") / "m", model, processor, create=True)
    report = memory.add(**items, batch_size=2, show_progress=False)
    assert (report.added, report.skipped_existing, report.failed) == (5, 0, 0)
    return memory


@pytest.fixture(scope="module")
def saved_model(model, processor, tmp_path_factory):
    return save_crem(model, processor, tmp_path_factory.mktemp("memory-cli") / "model")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    for i in range(10):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        random_image(56 + 28 * (i % 3), 56, seed=10 + i).save(sub / f"{i:02d}.png")
    return folder


def _generation_answers(model, processor, items, rows, **kwargs):
    batch = processor.process_generation_inputs(
        questions=[QUESTION] * len(rows),
        images=[items["images"][i] for i in rows],
        texts=[items["texts"][i] for i in rows],
    )
    sequences = model.generate(**batch, compress=True, max_new_tokens=6, **kwargs)
    return sequences[:, batch["input_ids"].shape[1] :]


def test_answers_from_stored_contexts_equal_compressed_generation_token_for_token(memory, model, processor, items):
    ids = items["ids"]
    batched = memory.answer_ids(QUESTION, ids, max_new_tokens=6)
    assert torch.equal(batched, _generation_answers(model, processor, items, range(5), do_sample=False))
    for i, item_id in enumerate(ids):  # and each item alone, at its own size
        assert torch.equal(memory.answer_ids(QUESTION, [item_id], max_new_tokens=6)[0], batched[i])
    # Sampling with a seed: the same draws as generate(compress=True) on the original items.
    torch.manual_seed(7)
    sampled = memory.answer_ids(QUESTION, ids[::-1], max_new_tokens=6, do_sample=True, top_k=0)
    torch.manual_seed(7)
    expected = _generation_answers(model, processor, items, range(4, -1, -1), do_sample=True, top_k=0)
    assert torch.equal(sampled, expected)
    assert memory.ask(QUESTION, ids[:2], max_new_tokens=6) == [
        answer.strip() for answer in processor.batch_decode(batched[:2], skip_special_tokens=True)
    ]


def test_stored_embeddings_are_get_embedding_and_search_is_the_exact_cosine_ranking(memory, model, processor, items):
    expected = model.get_embedding(**processor.process_embedding_inputs(images=items["images"], texts=items["texts"]))
    table = memory.items.to_arrow().to_pylist()
    stored = {row["id"]: torch.tensor(row["vector"]) for row in table}
    assert torch.allclose(torch.stack([stored[i] for i in items["ids"]]), expected, atol=1e-6)
    query = memory.embed_queries(texts=["a digit"])[0]
    scores = expected @ query
    order = scores.argsort(descending=True).tolist()
    hits = memory.search("a digit", k=3)
    assert [hit.id for hit in hits] == [items["ids"][i] for i in order[:3]]
    assert [hit.rank for hit in hits] == [0, 1, 2]
    assert [hit.score for hit in hits] == pytest.approx(scores[order[:3]].tolist(), abs=1e-5)
    image_hits = memory.search(image=items["images"][1], k=1)
    assert image_hits[0].id == "square"  # the same image, embedded with the same instruction
    assert image_hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_rerank_orders_by_the_models_yes_no_judgement_from_the_stored_context(memory, model, processor, items):
    hits = memory.search("a caption", k=4)
    reranked = memory.rerank("a caption", hits)
    assert sorted(hit.id for hit in reranked) == sorted(hit.id for hit in hits)
    judgements = [hit.judgement for hit in reranked]
    assert judgements == sorted(judgements, reverse=True)
    # Oracle: the same log-odds from compressed generation on the original items.
    rows = [items["ids"].index(hit.id) for hit in reranked]
    batch = processor.process_generation_inputs(
        questions=["Does this match: a caption? Answer yes or no."] * len(rows),
        images=[items["images"][i] for i in rows],
        texts=[items["texts"][i] for i in rows],
    )
    out = model.generate(
        **batch, compress=True, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, do_sample=False
    )
    logprobs = out.logits[0].log_softmax(-1)
    tokenizer = processor.tokenizer
    yes = sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "Yes")})
    no = sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in ("no", "No")})
    expected = logprobs[:, yes].logsumexp(-1) - logprobs[:, no].logsumexp(-1)
    assert judgements == pytest.approx(expected.tolist(), abs=1e-4)


def test_adding_again_skips_stored_ids_and_counts_items_that_fail_to_load(memory, items, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    report = memory.add(
        ids=["wide", "missing", "broken"],
        images=[items["images"][0], str(tmp_path / "nowhere.png"), str(broken)],
        show_progress=False,
    )
    assert (report.added, report.skipped_existing, report.failed) == (0, 1, 2)
    assert [failure[0] for failure in report.failures] == ["missing", "broken"]
    assert len(memory) == 5 and memory.stored_ids() == set(items["ids"])


def test_a_memory_refuses_another_model_and_names_the_difference(memory, processor):
    other = make_tiny_crem(processor, seed=1)
    with pytest.raises(ValueError, match="another model.*weights_sha256"):
        CREMMemory.open(memory.uri, other, processor)
    with pytest.raises(ValueError, match="dtype: memory 'float32', model 'bfloat16'"):
        CREMMemory.open(memory.uri, make_tiny_crem(processor, seed=0).to(torch.bfloat16), processor)


def test_a_memory_records_its_backbone_and_refuses_another_backbone_by_name(memory, model, saved_model, tmp_path):
    """Qwen3-VL and Qwen2-VL tiny models: each refuses the other's memory naming both backbones, in `open` and in the
    CLI's `index`; `describe` shows the backbone; a memory from before the field existed is Qwen2-VL's."""
    qwen3_processor = make_tiny_processor(backbone="qwen3_vl")
    qwen3 = make_tiny_crem(qwen3_processor, backbone="qwen3_vl")
    uri = tmp_path / "qwen3"
    written = CREMMemory.open(uri, qwen3, qwen3_processor, create=True)
    written.add(ids=["a", "b"], texts=["one digit", "two digits"], show_progress=False)
    assert written.fingerprint["backbone"] == "crem_qwen3_vl" and len(written) == 2
    assert sorted(hit.id for hit in written.search("one digit", k=2)) == ["a", "b"]
    assert written.answer_ids(QUESTION, ["b"], max_new_tokens=3).shape[0] == 1  # a Qwen3-VL memory answers
    info = CREMMemory.describe(uri)
    assert info["backbone"] == "Qwen3-VL (crem_qwen3_vl)" and info["model"]["backbone"] == "crem_qwen3_vl"
    assert memory.info()["backbone"] == "Qwen2-VL (crem)"
    expected = f"{uri} was written by a Qwen3-VL CREM model (crem_qwen3_vl); this model is Qwen2-VL (crem)"
    with pytest.raises(ValueError) as refused:
        CREMMemory.open(uri, model, memory.processor)
    assert str(refused.value).startswith(expected)
    with pytest.raises(ValueError, match=r"written by a Qwen2-VL CREM model \(crem\); this model is Qwen3-VL"):
        CREMMemory.open(memory.uri, qwen3, qwen3_processor)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "items.jsonl").write_text(json.dumps({"id": "c", "text": "three"}) + "\n")
    done = memory_cli("index", "--model", saved_model, "--memory", uri, folder / "items.jsonl")
    reason = done.stderr.splitlines()[-1]  # after the weights' loading bar
    assert done.returncode == 1 and reason.startswith("crem-memory: error: ") and expected in reason
    assert len(CREMMemory.open(uri, qwen3, qwen3_processor)) == 2  # nothing written by the refused run
    # A memory written before the fingerprint had a backbone: Qwen2-VL's.
    legacy = tmp_path / "legacy"
    CREMMemory.open(legacy, model, memory.processor, create=True)
    meta = lancedb.connect(str(legacy)).open_table("crem_memory")
    fingerprint = json.loads(meta.to_arrow().to_pylist()[0]["fingerprint"])
    del fingerprint["backbone"]
    meta.update(values={"fingerprint": json.dumps(fingerprint)})
    assert "backbone" not in json.loads(meta.to_arrow().to_pylist()[0]["fingerprint"])
    assert CREMMemory.describe(legacy)["backbone"] == "Qwen2-VL (crem)"
    CREMMemory.open(legacy, model, memory.processor)  # its own backbone: opens
    with pytest.raises(ValueError, match=r"written by a Qwen2-VL CREM model \(crem\); this model is Qwen3-VL"):
        CREMMemory.open(legacy, qwen3, qwen3_processor)


def test_bad_input_is_named_and_writes_nothing(memory, model, processor, tmp_path):
    missing = tmp_path / "no-memory"
    with pytest.raises(ValueError, match="no such folder"):
        CREMMemory.open(missing, model, processor)
    assert not missing.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="it is a file"):
        CREMMemory.open(tmp_path / "file", model, processor, create=True)
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ValueError, match="is not a CREM memory"):
        CREMMemory.open(tmp_path / "empty-folder", model, processor)
    assert os.listdir(tmp_path / "empty-folder") == []
    empty = CREMMemory.open(tmp_path / "empty", model, processor, create=True)
    with pytest.raises(ValueError, match="is empty"):
        empty.search("x", k=1)
    for k in (0, -1, 6):
        with pytest.raises(ValueError, match="k"):
            memory.search("x", k=k)
    with pytest.raises(ValueError, match="No hits"):
        memory.ask(QUESTION, [])
    with pytest.raises(ValueError, match="no item with id 'nope'"):
        memory.ask(QUESTION, ["nope"])
    with pytest.raises(ValueError, match="appears twice"):
        empty.add(ids=["a", "a"], texts=["x", "y"])
    with pytest.raises(ValueError, match="'b' has neither an image nor a text"):
        empty.add(ids=["a", "b"], texts=["x", None])
    assert len(empty) == 0


def test_a_changed_processor_is_refused_before_its_batches_are_written(model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    memory.add(ids=["kept"], texts=["first"], show_progress=False)
    # Another system prompt changes the shared prefix every stored context continues from.
    memory.processor = copy.deepcopy(processor)
    memory.processor.system_prompt = "You are a different assistant with a longer system prompt."
    with pytest.raises(ValueError, match="shared prefix"):
        memory.add(ids=["a", "b", "c"], texts=["x", "y", "z"], batch_size=1, show_progress=False)
    assert memory.stored_ids() == {"kept"}


def test_a_corrupt_context_row_is_an_error_naming_the_item(model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    memory.add(ids=["good", "bad"], texts=["one", "two"], show_progress=False)
    row = memory.items.search().where("id = 'bad'").limit(1).to_arrow().to_pylist()[0]
    memory.items.delete("id = 'bad'")
    row["context"] = row["context"][:-4] + b"\0\0\0\0"
    memory.items.add([row])
    assert memory.ask(QUESTION, ["good"], max_new_tokens=2)  # the good row still answers
    with pytest.raises(ValueError, match="context of item 'bad' is corrupt"):
        memory.ask(QUESTION, ["good", "bad"])


def test_read_source_folders_and_jsonl(image_folder, tmp_path):
    items, failures = read_source(image_folder)
    assert [item.id for item in items][:3] == ["a/01.png", "a/03.png", "a/05.png"] and failures == []
    assert items[0].source == str(image_folder / "a" / "01.png")
    lines = [
        {"id": "x", "image": "a/01.png", "text": "t", "label": 3},
        {"text": "only text"},
        "not an object",
        {"label": 1},
    ]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken\n")
    items, failures = read_source(data, image_root=image_folder)
    assert [(i.id, i.text, i.metadata) for i in items] == [("x", "t", {"label": 3}), ("line-2", "only text", {})]
    assert items[0].image == str(image_folder / "a" / "01.png")
    assert [where.rsplit(":", 1)[1] for where, _ in failures] == ["3", "4", "5"]
    data.write_text(json.dumps({"id": "x", "text": "a"}) + "\n" + json.dumps({"id": "x", "text": "b"}) + "\n")
    with pytest.raises(ValueError, match="id 'x' appears twice"):
        read_source(data)


def _table_rows(uri) -> list[dict]:
    rows = lancedb.connect(str(uri)).open_table("items").to_arrow().to_pylist()
    return sorted(rows, key=lambda row: row["id"])


def test_cli_index_search_ask_info_as_commands(saved_model, image_folder, tmp_path, capsys):
    uri = tmp_path / "scans"
    done = memory_cli("index", "--model", saved_model, "--memory", uri, image_folder, "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    assert "added 10, already stored 0, failed to load 0; 10 items stored" in done.stdout
    again = memory_cli("index", "--model", saved_model, "--memory", uri, image_folder)
    assert again.returncode == 0 and "added 0, already stored 10" in again.stdout
    assert memory_main(["search", "--model", saved_model, "--memory", str(uri), "--text", "seven", "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("|")[1:5] == [" rank ", " id ", " score ", " source "] and len(table) == 5
    argv = ["ask", "--model", saved_model, "--memory", str(uri), "--ids", "a/01.png", "--question", "Which?", "--json"]
    assert memory_main(argv) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["id"] == "a/01.png" and isinstance(answer["answer"], str)
    assert memory_main(["info", "--memory", str(uri)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 10 and info["context_slots_per_item"] == 16 and info["model"]["dtype"] == "float32"
    bad = memory_cli("search", "--model", saved_model, "--memory", tmp_path / "nothing", "--text", "x")
    assert bad.returncode == 1 and bad.stderr.startswith("crem-memory: error: ") and bad.stderr.count("\n") == 1
    assert "nothing is not a CREM memory: no such folder" in bad.stderr
    assert not (tmp_path / "nothing").exists()


def test_kill_9_mid_index_leaves_whole_rows_and_the_resumed_run_stores_each_item_once(saved_model, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(24):
        random_image(56, 56 + 28 * (i % 2), seed=100 + i).save(folder / f"{i:02d}.png")
    uri = tmp_path / "m"
    args = [sys.executable, "-m", "crem_hf.memory.cli", "index", "--model", saved_model, "--memory", str(uri)]
    process = subprocess.Popen([*args, str(folder), "--batch-size", "1"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    rows = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            rows = lancedb.connect(str(uri)).open_table("items").count_rows()
        except Exception:  # the tables may not exist yet
            rows = 0
        if rows >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stored = _table_rows(uri)
    assert 3 <= len(stored) < 24, "the run was not killed mid-way"
    assert len({row["id"] for row in stored}) == len(stored)
    assert all(hashlib.sha256(row["context"]).hexdigest() == row["context_sha256"] for row in stored)
    resumed = subprocess.run([*args, str(folder)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"already stored {len(stored)}" in resumed.stdout
    assert [row["id"] for row in _table_rows(uri)] == [f"{i:02d}.png" for i in range(24)]


def test_indexing_with_two_processes_stores_what_one_process_stores(saved_model, image_folder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = memory_cli(
        "index", "--model", saved_model, "--memory", tmp_path / "one", image_folder, "--batch-size", "2", env=env
    )
    assert one.returncode == 0, one.stderr
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    two = memory_cli(
        "index", "--model", saved_model, "--memory", tmp_path / "two", image_folder, "--batch-size", "2",
        env=env, launcher=launcher,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "added 10, already stored 0, failed to load 0; 10 items stored" in two.stdout
    single, double = _table_rows(tmp_path / "one"), _table_rows(tmp_path / "two")
    assert [row["id"] for row in single] == [row["id"] for row in double]
    for a, b in zip(single, double, strict=True):
        assert torch.allclose(torch.tensor(a["vector"]), torch.tensor(b["vector"]), atol=1e-6)
        assert a["context"] == b["context"] and a["context_positions"] == b["context_positions"]


def test_a_memory_on_object_storage_works_as_a_local_one(model, processor, tmp_path, capsys):
    """An S3 bucket (moto's S3 server on 127.0.0.1): create, add, reopen, search, ask, and the CLI's info."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        keys = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys).create_bucket(Bucket="memories")
        options = {"aws_endpoint": endpoint, "aws_region": "us-east-1", "allow_http": "true", **keys}
        uri = "s3://memories/scans"
        memory = CREMMemory.open(uri, model, processor, create=True, storage_options=options)
        memory.add(ids=["a", "b"], texts=["one digit", "two digits"], show_progress=False)
        reopened = CREMMemory.open(uri, model, processor, storage_options=options)
        local = CREMMemory.open(tmp_path / "local", model, processor, create=True)
        local.add(ids=["a", "b"], texts=["one digit", "two digits"], show_progress=False)
        assert len(reopened) == 2 and reopened.search("one digit", k=2) == local.search("one digit", k=2)
        assert (
            reopened.answer_ids(QUESTION, ["b"], max_new_tokens=3).tolist()
            == memory.answer_ids(QUESTION, ["b"], max_new_tokens=3).tolist()
        )
        flags = [f"--storage-option={key}={value}" for key, value in options.items()]
        assert memory_main(["info", "--memory", uri, *flags]) == 0
        assert json.loads(capsys.readouterr().out)["rows"] == 2
        with pytest.raises(ValueError, match="is not a CREM memory"):
            CREMMemory.open("s3://memories/elsewhere", model, processor, storage_options=options)
    finally:
        server.stop()


def test_an_approximate_index_serves_searches_and_exact_scans_remain(model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    memory.add(ids=["seed"], texts=["one"], show_progress=False)
    template = memory.items.to_arrow().to_pylist()[0]
    generator = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(600, len(template["vector"]), generator=generator), dim=-1)
    memory.items.add([{**template, "id": f"v{i}", "vector": v.tolist()} for i, v in enumerate(vectors)])
    with pytest.raises(ValueError, match="at least 256 rows"):
        CREMMemory.open(tmp_path / "small", model, processor, create=True).build_ann_index()
    memory.build_ann_index(num_partitions=4)
    assert memory.info()["ann_index"] is True
    query = vectors[7]
    exact = memory.search_vector(query, k=10, exact=True)
    assert exact[0].id == "v7" and exact[0].score == pytest.approx(1.0, abs=1e-5)
    expected = (vectors @ query).topk(10).indices.tolist()
    assert [hit.id for hit in exact] == [f"v{i}" for i in expected]
    approximate = memory.search_vector(query, k=10)
    assert approximate[0].id == "v7"  # the nearest one survives quantisation
    # Candidates are re-scored exactly: the scores are the true cosines (its recall: benchmarks/memory.py).
    true = {f"v{i}": float(vectors[i] @ query) for i in range(len(vectors))}
    assert [hit.score for hit in approximate] == pytest.approx([true[hit.id] for hit in approximate], abs=1e-5)
