"""One process of the memory concurrency tests: a writer, a creator or a reader of one CREM memory.

    python tests/memory_worker.py write URI --ids 20:40,0:20 --go GO --out report.json
    python tests/memory_worker.py create URI --rounds 3 --go GO --seed 1 --out created.json
    python tests/memory_worker.py read URI --ready READY --stop STOP --out reads.json

Every process builds the same tiny CREM model (`crem_hf.testing`, fixed seed), so their fingerprints match (a
different `--seed` gives another model). With `--go GO`, a process creates `OUT.ready` once its model is built, then
waits for the file GO and starts at the wall-clock time written in it (seconds since the epoch): processes started
together that way race in their reads of the stored ids, their commits and their creations.
`--storage-options` is a JSON object for object storage. Item `i` is a text item for most `i` and an image for every
third one, the same in every process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
from helpers import random_image

from crem_hf.memory import CREMMemory
from crem_hf.testing import make_tiny_crem, make_tiny_processor

QUESTION = "Which digit is shown?"
QUERIES = ["the digit seven", "a note about two", "an image", "digit one"]
ANSWER_TOKENS = 4


def item_id(i: int) -> str:
    return f"item-{i:03d}"


def item(i: int) -> dict:
    """Item `i`: an image for every third one, otherwise a text."""
    if i % 3 == 2:
        return {"id": item_id(i), "image": random_image(56, 56 + 28 * (i % 2), seed=1000 + i), "text": None}
    return {"id": item_id(i), "image": None, "text": f"item {i}: a note about the digit {i % 10}"}


def parse_ids(spec: str) -> list[int]:
    """`20:40,0:20` -> 20..39 then 0..19 (the order in which they are added)."""
    numbers = []
    for part in spec.split(","):
        start, stop = part.split(":")
        numbers += list(range(int(start), int(stop)))
    return numbers


def wait_until(epoch: float | None) -> None:
    while epoch is not None and time.time() < epoch:
        time.sleep(0.002)


def start_time(options) -> float | None:
    """The time written in the file `--go` (after announcing `OUT.ready`), or None to start at once."""
    if options.go is None:
        return None
    with open(options.out + ".ready", "w"):
        pass
    while not os.path.exists(options.go):
        time.sleep(0.01)
    while True:
        with open(options.go, encoding="utf-8") as handle:
            text = handle.read()
        if text.endswith("\n"):  # written whole
            return float(text)
        time.sleep(0.01)


def build(seed: int):
    processor = make_tiny_processor()
    return make_tiny_crem(processor, seed=seed), processor


def write(options, model, processor) -> dict:
    """Add the items, in order: in one `add` call (one pre-check of the stored ids), or `--chunk` at a time."""
    numbers = parse_ids(options.ids)
    wait_until(start_time(options))
    memory = CREMMemory.open(options.uri, model, processor, create=True, storage_options=options.storage_options)
    chunk = options.chunk or len(numbers)
    totals = {"added": 0, "skipped_existing": 0, "failed": 0}
    for start in range(0, len(numbers), chunk):
        items = [item(i) for i in numbers[start : start + chunk]]
        report = memory.add(
            ids=[it["id"] for it in items],
            images=[it["image"] for it in items],
            texts=[it["text"] for it in items],
            batch_size=options.batch_size,
            show_progress=False,
        )
        totals["added"] += report.added
        totals["skipped_existing"] += report.skipped_existing
        totals["failed"] += report.failed
        time.sleep(options.pause)
    return totals


def create(options, model, processor) -> dict:
    """`--rounds` fresh memories `URI-0`, `URI-1`, ..., each created at `go + round` together with another process."""
    rounds, go = [], start_time(options)
    for r in range(options.rounds):
        wait_until(go + r)
        uri = f"{options.uri}-{r}"
        try:
            memory = CREMMemory.open(uri, model, processor, create=True, storage_options=options.storage_options)
            report = memory.add(ids=[f"seed{options.seed}"], texts=["a note"], show_progress=False)
            rounds.append({"uri": uri, "error": None, "added": report.added, "rows": len(memory)})
        except ValueError as error:
            rounds.append({"uri": uri, "error": str(error)})
    return {"rounds": rounds}


def read(options, model, processor) -> dict:
    """
    Search and ask in a loop until the stop file exists (then once more), recording each call's hits and answers;
    afterwards, a fresh open of the memory answers every recorded call again, for the test to compare.
    """
    memory = CREMMemory.open(options.uri, model, processor, storage_options=options.storage_options)
    with open(options.ready, "w"):
        pass
    reads, errors, last = [], [], False
    while not last:
        last = os.path.exists(options.stop)
        query = QUERIES[len(reads) % len(QUERIES)]
        try:
            rows = len(memory)
            hits = memory.search(query, k=min(options.k, rows))
            ids = [hit.id for hit in hits]
            answers = memory.ask(QUESTION, hits, max_new_tokens=ANSWER_TOKENS)
            tokens = memory.answer_ids(QUESTION, hits, max_new_tokens=ANSWER_TOKENS).tolist()
            reads.append(
                {
                    "query": query,
                    "rows": rows,
                    "hits": ids,
                    "scores": [hit.score for hit in hits],
                    "answers": answers,
                    "answer_ids": tokens,
                }
            )
        except Exception:  # every failure is recorded: the test expects none
            errors.append(traceback.format_exc())
    fresh = CREMMemory.open(options.uri, model, processor, storage_options=options.storage_options)
    for record in reads:
        record["fresh_answers"] = fresh.ask(QUESTION, record["hits"], max_new_tokens=ANSWER_TOKENS)
        record["fresh_answer_ids"] = fresh.answer_ids(QUESTION, record["hits"], max_new_tokens=ANSWER_TOKENS).tolist()
    return {"reads": reads, "errors": errors, "final_rows": len(fresh)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["write", "create", "read"])
    parser.add_argument("uri")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ids", default="0:40")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=0, help="items per add call (default: all in one)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between add calls")
    parser.add_argument("--go", help="start at the time written in this file (see the module's docstring)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--ready", help="a file the reader creates once it has opened the memory")
    parser.add_argument("--stop", help="the reader stops once this file exists")
    parser.add_argument("--storage-options", type=json.loads, default=None)
    options = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = build(options.seed)
    result = {"write": write, "create": create, "read": read}[options.role](options, model, processor)
    with open(options.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
