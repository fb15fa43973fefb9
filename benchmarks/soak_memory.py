"""Soak test of the visual memory under concurrency (not part of CI: it runs for as long as it is told).

Writer processes index overlapping items into one memory while reader processes search and ask continuously, for a
bounded time. Then every reader asks its recorded questions again from a fresh open of the finished memory, and the
memory is checked row by row. Printed and written as JSON:

* writes/s (rows added by all writers together, per second spent in `add`: with `--pace`, the default, each writer
  spreads its items over the run so that reads overlap writes throughout) and queries/s (searches and asks, all
  readers together), with how many queries ran while the memory was still growing;
* p50 / p95 latency of `search` and of `ask`;
* errors of any call (target 0), duplicated ids (target 0), incomplete rows (checksum or sizes wrong; target 0),
  committed rows lost (added by a writer's report but not stored; target 0), answers differing from the answers of
  the fresh open (target 0).

Every process builds the same tiny CREM model (`crem_hf.testing`, seed 0), so it runs on any machine in minutes.
Run: python benchmarks/soak_memory.py [--items 3000 --seconds 120 --writers 2 --readers 4 --memory s3://...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback

import lancedb
import torch
from common import test_helpers

from crem_hf.io import write_json_atomically
from crem_hf.memory import CREMMemory
from crem_hf.testing import make_tiny_crem, make_tiny_processor

QUESTION = "Which digit is shown?"
QUERIES = ["the digit seven", "a note about two", "a scan of a digit", "digit one", "nine, maybe"]
#: Items stored before the soak starts, so that readers can search from their first call.
SEED_ITEMS = 8


def item_id(i: int) -> str:
    return f"item-{i:06d}"


def items(numbers: list[int]) -> dict:
    """Items `numbers`: every fifth one an image (of two sizes), the others texts; the same in every process."""
    random_image = test_helpers().random_image
    images = [random_image(56, 56 + 28 * (i % 2), seed=i) if i % 5 == 4 else None for i in numbers]
    texts = [None if i % 5 == 4 else f"item {i}: a note about the digit {i % 10}" for i in numbers]
    return {"ids": [item_id(i) for i in numbers], "images": images, "texts": texts}


def writer_share(writer: int, writers: int, count: int, overlap: float) -> list[int]:
    """The items of one writer: its `count / writers` slice widened by `overlap` of a slice on each side."""
    width = count / writers
    start = max(SEED_ITEMS, int((writer - overlap) * width))
    stop = min(count, int((writer + 1 + overlap) * width))
    return list(range(start, stop))


def model_and_processor():
    torch.set_num_threads(1)
    processor = make_tiny_processor()
    return make_tiny_crem(processor, seed=0), processor


def open_memory(options, model, processor) -> CREMMemory:
    return CREMMemory.open(options.memory, model, processor, storage_options=options.storage_options)


def write(options, writer: int, start, results) -> None:
    """Add this writer's items, `--chunk` at a time, until they are all stored or the time is up; with `--pace`,
    chunk i waits for its share of the run (i / chunks of `--seconds`), so that the writes last as long as the reads."""
    model, processor = model_and_processor()
    memory = open_memory(options, model, processor)
    numbers = writer_share(writer, options.writers, options.items, options.overlap)
    start.wait()
    began, deadline = time.monotonic(), time.monotonic() + options.seconds
    report = {"writer": writer, "items": len(numbers), "added": 0, "skipped_existing": 0, "failed": 0, "errors": []}
    report["busy_seconds"] = 0.0
    chunks = range(0, len(numbers), options.chunk)
    for index, first in enumerate(chunks):
        if options.pace:
            time.sleep(max(0.0, began + 0.9 * options.seconds * index / len(chunks) - time.monotonic()))
        if time.monotonic() >= deadline:
            break
        tick = time.perf_counter()
        try:
            done = memory.add(**items(numbers[first : first + options.chunk]), batch_size=8, show_progress=False)
        except Exception:
            report["errors"].append(traceback.format_exc())
            continue
        finally:
            report["busy_seconds"] += time.perf_counter() - tick
        report["added"] += done.added
        report["skipped_existing"] += done.skipped_existing
        report["failed"] += done.failed
    report["seconds"] = time.monotonic() - began
    results.put(("writer", report))


def read(options, reader: int, start, writers_done, results) -> None:
    """Search and ask in a loop until the time is up; then, once the writers are done, ask again from a fresh open."""
    model, processor = model_and_processor()
    memory = open_memory(options, model, processor)
    start.wait()
    began, deadline = time.monotonic(), time.monotonic() + options.seconds
    search_seconds, ask_seconds, errors, asked, rows_seen = [], [], [], [], []
    calls = 0
    while time.monotonic() < deadline:
        query = QUERIES[(calls + reader) % len(QUERIES)]
        calls += 1
        try:
            rows = len(memory)
            tick = time.perf_counter()
            hits = memory.search(query, k=min(options.k, rows))
            tock = time.perf_counter()
            answers = memory.ask(QUESTION, hits, max_new_tokens=options.max_new_tokens)
            search_seconds.append(tock - tick)
            ask_seconds.append(time.perf_counter() - tock)
            asked.append(([hit.id for hit in hits], answers))
            rows_seen.append(rows)
        except Exception:
            errors.append(traceback.format_exc())
    elapsed = time.monotonic() - began
    writers_done.wait()
    fresh = open_memory(options, model, processor)
    final_rows = len(fresh)
    step = max(1, len(asked) // options.verify) if options.verify else 1
    checked = asked[::step]
    differing = sum(
        fresh.ask(QUESTION, ids, max_new_tokens=options.max_new_tokens) != answers for ids, answers in checked
    )
    results.put(
        (
            "reader",
            {
                "reader": reader,
                "seconds": elapsed,
                "searches": len(search_seconds),
                "asks": len(ask_seconds),
                "queries_during_writes": 2 * sum(rows < final_rows for rows in rows_seen),
                "search_seconds": search_seconds,
                "ask_seconds": ask_seconds,
                "errors": errors,
                "answers_checked": len(checked),
                "answers_differing": differing,
            },
        )
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def check_rows(options, model) -> dict:
    """Every stored row, read back: duplicated ids and incomplete rows (checksum, vector and positions sizes)."""
    table = lancedb.connect(options.memory, storage_options=options.storage_options).open_table("items")
    rows = table.to_arrow().to_pylist()
    ids = [row["id"] for row in rows]
    slots, hidden = model.config.num_chorus_tokens, model.config.text_config.hidden_size
    incomplete = sum(
        hashlib.sha256(row["context"]).hexdigest() != row["context_sha256"]
        or len(row["vector"]) != hidden
        or len(row["context_positions"]) != 3 * slots
        for row in rows
    )
    return {
        "rows": len(rows),
        "unique_ids": len(set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "incomplete": incomplete,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=3000, help="items over all writers (default 3000)")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long writers and readers run")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--overlap", type=float, default=0.25, help="of a writer's slice shared with each neighbour")
    parser.add_argument("--chunk", type=int, default=32, help="items per add call of a writer")
    parser.add_argument(
        "--pace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="spread each writer's items over the run (default); --no-pace writes as fast as it can",
    )
    parser.add_argument("--k", type=int, default=3, help="hits per search (each is asked about)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--verify", type=int, default=100, help="recorded asks per reader checked afterwards (0: all)")
    parser.add_argument("--memory", help="the memory's URI (default: a fresh temporary folder)")
    parser.add_argument("--storage-options", type=json.loads, default=None, help="a JSON object, for object storage")
    parser.add_argument("--out", default="outputs/benchmarks/soak_memory.json")
    options = parser.parse_args()
    if options.items <= SEED_ITEMS or options.writers < 1 or options.readers < 0:
        parser.error(f"--items must exceed {SEED_ITEMS}, --writers be at least 1 and --readers at least 0.")
    scratch = None
    if options.memory is None:
        scratch = tempfile.TemporaryDirectory(prefix="crem-soak-")
        options.memory = os.path.join(scratch.name, "memory")
    model, processor = model_and_processor()
    memory = CREMMemory.open(options.memory, model, processor, create=True, storage_options=options.storage_options)
    seeded = memory.add(**items(list(range(SEED_ITEMS))), show_progress=False)

    context = mp.get_context("spawn")
    start = context.Barrier(options.writers + options.readers)
    writers_done = context.Event()
    results = context.Queue()
    writers = [context.Process(target=write, args=(options, w, start, results)) for w in range(options.writers)]
    readers = [
        context.Process(target=read, args=(options, r, start, writers_done, results)) for r in range(options.readers)
    ]
    for process in writers + readers:
        process.start()
    reports = {"writer": [], "reader": []}
    # Results come before the processes end (a full queue would keep them alive): collect while waiting.
    while len(reports["writer"]) < options.writers:
        role, report = results.get(timeout=options.seconds + 900)
        reports[role].append(report)
    writers_done.set()
    while len(reports["reader"]) < options.readers:
        role, report = results.get(timeout=options.seconds + 900)
        reports[role].append(report)
    for process in writers + readers:
        process.join()
    crashed = [p.exitcode for p in writers + readers if p.exitcode != 0]

    rows = check_rows(options, model)
    added = seeded.added + sum(report["added"] for report in reports["writer"])
    searches = [s for report in reports["reader"] for s in report["search_seconds"]]
    asks = [s for report in reports["reader"] for s in report["ask_seconds"]]
    busy_seconds = sum(report["busy_seconds"] for report in reports["writer"]) / options.writers
    read_seconds = max((report["seconds"] for report in reports["reader"]), default=0.0)
    errors = [e for report in reports["writer"] + reports["reader"] for e in report["errors"]]
    result = {
        "items": options.items,
        "seconds": options.seconds,
        "writers": options.writers,
        "readers": options.readers,
        "overlap": options.overlap,
        "memory": options.memory if scratch is None else "(temporary folder)",
        "rows": rows["rows"],
        "writes_per_s": sum(report["added"] for report in reports["writer"]) / busy_seconds,
        "queries_per_s": (len(searches) + len(asks)) / read_seconds if read_seconds else None,
        "searches": len(searches),
        "asks": len(asks),
        "queries_during_writes": sum(report["queries_during_writes"] for report in reports["reader"]),
        "search_ms_p50": 1000 * statistics.median(searches) if searches else None,
        "search_ms_p95": 1000 * percentile(searches, 95) if searches else None,
        "ask_ms_p50": 1000 * statistics.median(asks) if asks else None,
        "ask_ms_p95": 1000 * percentile(asks, 95) if asks else None,
        "errors": len(errors) + len(crashed),
        "duplicates": rows["duplicates"],
        "incomplete_rows": rows["incomplete"],
        "lost_rows": added - rows["unique_ids"],
        "answers_checked": sum(report["answers_checked"] for report in reports["reader"]),
        "answers_differing": sum(report["answers_differing"] for report in reports["reader"]),
        "writer_reports": [
            {
                key: round(report[key], 2) if isinstance(report[key], float) else report[key]
                for key in ("writer", "items", "added", "skipped_existing", "failed", "seconds", "busy_seconds")
            }
            for report in reports["writer"]
        ],
        "first_errors": errors[:3],
    }
    write_json_atomically(options.out, result)
    for key, value in result.items():
        if key not in ("writer_reports", "first_errors"):
            print(f"{key:>21}: {round(value, 2) if isinstance(value, float) else value}")
    for report in result["writer_reports"]:
        print(f"{'writer':>21}: {report}")
    for error in result["first_errors"]:
        print(error)
    print(f"written to {options.out}")
    if scratch is not None:
        scratch.cleanup()
    failed = result["errors"] or result["duplicates"] or result["incomplete_rows"] or result["lost_rows"]
    raise SystemExit(1 if failed or result["answers_differing"] else 0)


if __name__ == "__main__":
    main()
