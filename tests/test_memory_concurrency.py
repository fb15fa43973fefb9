"""The memory under concurrency, with real processes (tests/memory_worker.py): writers with overlapping ids store each
id once (a local folder and the local S3 server), concurrent creation keeps one memory (and refuses another model),
a writer killed with kill -9 while another writes leaves whole rows, and readers during an index never fail and get
the answers a fresh open gives afterwards."""

from __future__ import annotations

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
from helpers import free_port

from crem_hf.memory import CREMMemory

WORKER = os.path.join(os.path.dirname(__file__), "memory_worker.py")
sys.path.insert(0, os.path.dirname(__file__))
from memory_worker import QUESTION, item, item_id  # noqa: E402

#: Seconds from the moment every process is ready to their common start.
START_DELAY = 0.5


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with one bucket; yields the storage options of a memory there."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    keys = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys).create_bucket(Bucket="memories")
    yield {"aws_endpoint": endpoint, "aws_region": "us-east-1", "allow_http": "true", **keys}
    server.stop()


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """(a memory URI, its storage options) on a local folder or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "memory"), None
    options = request.getfixturevalue("s3")
    return f"s3://memories/{request.node.name.replace('[', '-').replace(']', '')}-{time.time_ns()}", options


def _worker(role: str, uri: str, out, *args, storage_options=None) -> subprocess.Popen:
    command = [sys.executable, WORKER, role, uri, "--out", str(out), *map(str, args)]
    if storage_options is not None:
        command += ["--storage-options", json.dumps(storage_options)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_together(go, outs, processes) -> None:
    """Once every process has built its model (`OUT.ready`), write them a common start time into the file `go`."""
    deadline = time.monotonic() + 180
    while not all(os.path.exists(f"{out}.ready") for out in outs):
        failed = [p for p in processes if p.poll() is not None]
        assert not failed, failed[0].stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    go.write_text(f"{time.time() + START_DELAY}\n")


def _finish(process: subprocess.Popen, out) -> dict:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


def _rows(uri: str, storage_options=None) -> list[dict]:
    table = lancedb.connect(uri, storage_options=storage_options).open_table("items")
    return sorted(table.to_arrow().to_pylist(), key=lambda row: row["id"])


def _assert_consistent(rows: list[dict], hidden: int, slots: int) -> None:
    """Each id once, every row whole: its context matches its checksum, its vector and positions have their sizes."""
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), f"duplicated ids: {sorted({i for i in ids if ids.count(i) > 1})}"
    for row in rows:
        assert hashlib.sha256(row["context"]).hexdigest() == row["context_sha256"], row["id"]
        assert len(row["vector"]) == hidden and len(row["context_positions"]) == 3 * slots, row["id"]
        assert len(row["context_ids"]) == slots, row["id"]


def test_two_writers_with_overlapping_ids_store_each_id_once(location, model, processor, tmp_path):
    """Ids 0-39 and 20-59 from two processes started together, both beginning with ids 20-39 (so their pre-checks
    see nothing and their commits of the same ids race): 60 rows, each id once, and the reports add up."""
    uri, options = location
    CREMMemory.open(uri, model, processor, create=True, storage_options=options)  # creation races: the next test
    go = tmp_path / "go"
    a = _worker("write", uri, tmp_path / "a.json", "--ids", "20:40,0:20", "--go", go, storage_options=options)
    b = _worker("write", uri, tmp_path / "b.json", "--ids", "20:60", "--go", go, storage_options=options)
    _start_together(go, [tmp_path / "a.json", tmp_path / "b.json"], [a, b])
    report_a, report_b = _finish(a, tmp_path / "a.json"), _finish(b, tmp_path / "b.json")
    rows = _rows(uri, options)
    hidden, slots = model.config.text_config.hidden_size, model.config.num_chorus_tokens
    _assert_consistent(rows, hidden, slots)
    assert [row["id"] for row in rows] == [item_id(i) for i in range(60)]
    assert report_a["added"] + report_b["added"] == 60
    assert report_a["added"] + report_a["skipped_existing"] == 40 == report_b["added"] + report_b["skipped_existing"]
    assert report_a["skipped_existing"] + report_b["skipped_existing"] == 20  # each shared id found once
    assert report_a["failed"] == report_b["failed"] == 0
    # The memory is whole: a fresh open counts 60 rows, and an item's stored row is what one writer alone stores.
    memory = CREMMemory.open(uri, model, processor, storage_options=options)
    assert len(memory) == 60 and memory.info()["rows"] == 60
    hits = memory.search("a note about the digit 7", k=60)
    assert sorted(hit.id for hit in hits) == [item_id(i) for i in range(60)]
    reference = CREMMemory.open(tmp_path / "reference", model, processor, create=True)
    sample = [7, 8, 30, 41]  # of writer a only, an image, shared, of writer b only; batches of 2 as the writers'
    for i in sample:
        pair = [item(j) for j in (i - i % 2, i - i % 2 + 1)]
        reference.add(
            ids=[p["id"] for p in pair],
            images=[p["image"] for p in pair],
            texts=[p["text"] for p in pair],
            show_progress=False,
        )
    by_id = {row["id"]: row for row in rows}
    for row in _rows(str(tmp_path / "reference")):
        stored = by_id[row["id"]]
        assert torch.allclose(torch.tensor(stored["vector"]), torch.tensor(row["vector"]), atol=1e-5)
        assert stored["context_positions"] == row["context_positions"]
    ids = [item_id(i) for i in sample]
    assert (
        memory.answer_ids(QUESTION, ids, max_new_tokens=4).tolist()
        == reference.answer_ids(QUESTION, ids, max_new_tokens=4).tolist()
    )


def test_concurrent_creation_keeps_one_memory_and_checks_the_winners_model(location, model, processor, tmp_path):
    """Two processes create the same fresh memory at once, three times: both open it, it has one meta row and both
    items. Then a process with another model races one with this model: one of them is refused by the fingerprint."""
    uri, options = location
    go = tmp_path / "go"
    same = [
        _worker("create", uri, tmp_path / f"same{k}.json", "--rounds", 3, "--go", go, storage_options=options)
        for k in range(2)
    ]
    _start_together(go, [tmp_path / f"same{k}.json" for k in range(2)], same)
    results = [_finish(process, tmp_path / f"same{k}.json") for k, process in enumerate(same)]
    for r in range(3):
        assert [result["rounds"][r]["error"] for result in results] == [None, None]
        memory = CREMMemory.open(f"{uri}-{r}", model, processor, storage_options=options)
        assert memory.db.open_table("crem_memory").count_rows() == 1
        _assert_consistent(_rows(f"{uri}-{r}", options), model.config.text_config.hidden_size, 16)
        # Both added the same id: stored once, added by one of them.
        assert len(memory) == 1 and sorted(result["rounds"][r]["added"] for result in results) == [0, 1]
    go = tmp_path / "go-mixed"
    mixed = {
        seed: _worker("create", f"{uri}-mixed", tmp_path / f"m{seed}.json", "--rounds", 2, "--go", go, "--seed", seed,
                      storage_options=options)
        for seed in (0, 1)
    }  # fmt: skip
    _start_together(go, [tmp_path / f"m{seed}.json" for seed in (0, 1)], list(mixed.values()))
    outcomes = {seed: _finish(process, tmp_path / f"m{seed}.json")["rounds"] for seed, process in mixed.items()}
    for r in range(2):
        errors = [outcomes[seed][r]["error"] for seed in (0, 1)]
        assert sum(error is None for error in errors) == 1, errors
        refused = next(error for error in errors if error is not None)
        assert "was written by another model" in refused and "weights_sha256" in refused
        winner = 0 if errors[0] is None else 1
        rows = _rows(f"{uri}-mixed-{r}", options)
        assert [row["id"] for row in rows] == [f"seed{winner}"]


def test_a_writer_killed_mid_batch_while_another_writes_leaves_the_memory_consistent(model, processor, tmp_path):
    uri = str(tmp_path / "memory")
    go = tmp_path / "go"
    killed = _worker("write", uri, tmp_path / "a.json", "--ids", "0:40", "--batch-size", 1, "--go", go)
    other = _worker("write", uri, tmp_path / "b.json", "--ids", "20:60", "--go", go)
    _start_together(go, [tmp_path / "a.json", tmp_path / "b.json"], [killed, other])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and killed.poll() is None:
        try:
            if sum(row["id"] < item_id(20) for row in _rows(uri)) >= 4:
                break
        except Exception:  # the memory may not exist yet
            pass
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    report_b = _finish(other, tmp_path / "b.json")
    rows = _rows(uri)
    hidden = model.config.text_config.hidden_size
    _assert_consistent(rows, hidden, 16)
    ids = {row["id"] for row in rows}
    of_a = sorted(i for i in ids if i < item_id(20))
    assert 4 <= len(of_a) < 20, "the writer was not killed mid-way"
    assert {item_id(i) for i in range(20, 60)} <= ids  # nothing the other writer committed is lost
    assert report_b["added"] + report_b["skipped_existing"] == 40
    memory = CREMMemory.open(uri, model, processor)
    assert len(memory.search("a note", k=len(rows))) == len(rows)
    # Running the killed writer again adds exactly what it had not stored.
    resumed = _finish(_worker("write", uri, tmp_path / "a2.json", "--ids", "0:40"), tmp_path / "a2.json")
    assert resumed == {"added": 20 - len(of_a), "skipped_existing": 20 + len(of_a), "failed": 0}
    rows = _rows(uri)
    _assert_consistent(rows, hidden, 16)
    assert [row["id"] for row in rows] == [item_id(i) for i in range(60)]


def test_readers_during_an_index_never_fail_and_answer_as_a_fresh_open_after(model, processor, tmp_path):
    """A reader process searches and asks in a loop while a writer process indexes 56 more items in small commits:
    no call fails, reads see the memory grow, every hit's score is its cosine with the stored embedding, and every
    answer equals the answer of a fresh open after the index finished."""
    uri = str(tmp_path / "memory")
    seeded = CREMMemory.open(uri, model, processor, create=True)
    first = [item(i) for i in range(4)]
    seeded.add(
        ids=[it["id"] for it in first],
        images=[it["image"] for it in first],
        texts=[it["text"] for it in first],
        show_progress=False,
    )
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    reader = _worker("read", uri, tmp_path / "reads.json", "--ready", ready, "--stop", stop)
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline and reader.poll() is None:
        time.sleep(0.05)
    assert ready.exists(), reader.stderr.read() if reader.poll() is not None else "the reader did not start"
    writer = _worker("write", uri, tmp_path / "w.json", "--ids", "4:60", "--chunk", 4, "--pause", 0.3)
    report = _finish(writer, tmp_path / "w.json")
    stop.touch()
    result = _finish(reader, tmp_path / "reads.json")
    assert report == {"added": 56, "skipped_existing": 0, "failed": 0}
    assert result["errors"] == []
    assert result["final_rows"] == 60
    reads = result["reads"]
    during = [record for record in reads if 4 < record["rows"] < 60]
    assert len(during) >= 3, [record["rows"] for record in reads]
    memory = CREMMemory.open(uri, model, processor)
    vectors = {row["id"]: torch.tensor(row["vector"]) for row in _rows(uri)}
    queries = {query: memory.embed_queries([query])[0] for query in {record["query"] for record in reads}}
    for record in reads:
        assert len(record["hits"]) == min(3, record["rows"]) == len(set(record["hits"]))
        assert record["answer_ids"] == record["fresh_answer_ids"]
        assert record["answers"] == record["fresh_answers"]
        true = [float(torch.cosine_similarity(queries[record["query"]], vectors[i], dim=0)) for i in record["hits"]]
        assert record["scores"] == pytest.approx(true, abs=1e-4)
