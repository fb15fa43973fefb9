"""Visual memory at scale (`crem_hf.memory`): 10^4 / 10^5 / 10^6 items in one LanceDB table on local disk.

Part `search` (no model forward): synthetic items written in chunks into a real `CREMMemory`'s items table (the
memory is created by a tiny CREM model whose hidden size is 1536, the 2B's, so the table layout is the library's own).
For each size it reports the disk size, search latency p50/p95 with the approximate index (IVF-PQ,
`build_ann_index`, searched with the default probe count) and with the exact scan, recall@10 of the index against an
exact oracle (numpy, computed while the vectors are generated, independent of LanceDB), the planted neighbour found at
rank 1, the point-lookup latency of one context by id (the query `CREMMemory.contexts` runs, served by the id index:
its plan is checked), and the index build times; then the same search figures as a function of `nprobes` (the
partitions of the index probed), up to all of them.

Part `formats`: the search layouts of `search_formats.py` at each size, one memory per layout holding the same
synthetic items: float32 at the full 1536 dims, float32 truncated to 256 (Matryoshka), int8 (IVF-SQ) and binary
(sign bits, Hamming IVF_FLAT), the quantised ones re-scored exactly. For each: disk size, index size and build time,
ANN search p50/p95, recall@10 against the exact full-dim scan and against the exact scan at the layout's own dim
(both numpy oracles), and the planted neighbour at rank 1.

Part `throughput`: answers per second from stored contexts (`CREMMemory.ask_many`) against answers from the images
(`generate`, native and `compress=True`) at batch 1 / 8 / 32, on the benchmark model of benchmarks/memory.py (the
Qwen2-VL-2B KV geometry, small MLP and vision tower on CPU).

Not in CI. Run: python benchmarks/memory_scale.py --part search [--rows 10000 100000 1000000] [--nprobes 5 10 ...]
              python benchmarks/memory_scale.py --part formats [--rows 10000 100000]
              python benchmarks/memory_scale.py --part throughput [--batches 1 8 32]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time

import lancedb
import numpy as np
import pyarrow as pa
import torch
from common import arguments, image_with_tokens, machine, markdown_rows
from memory import build_published, disk_bytes

from crem_hf.io import write_json_atomically, write_text_atomically
from crem_hf.memory import CREMMemory
from crem_hf.memory.rows import CONTEXT_COLUMNS, rows_table
from crem_hf.memory.search_formats import SearchLayout, truncate
from crem_hf.memory.store import LANCEDB_NPROBES, PROBE_FRACTION, ann_partitions
from crem_hf.testing import make_tiny_crem, make_tiny_processor

DIM = 1536
SEED = 0
CHUNK = 10_000
#: Bytes of the synthetic stored context of each item (see the notes written with the figures).
CONTEXT_BYTES = 16 * 1024
#: Noise of a planted query around its item: cosine to it ~0.9, far above any other item's (~0.08 at most).
PLANT_NOISE = 0.48


# ---------------------------------------------------------------------------------------------------- search


def chunk_vectors(start: int, count: int) -> np.ndarray:
    """Random unit vectors `(count, DIM)` float32 of rows `[start, start + count)`: a fixed seed per chunk."""
    rng = np.random.default_rng((SEED, start))
    points = rng.standard_normal((count, DIM), dtype=np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def chunk_table(
    start: int, vectors: np.ndarray, schema: pa.Schema, context_bytes: int, layout: SearchLayout | None = None
) -> pa.Table:
    """Rows of the memory's items schema: random context bytes of `context_bytes` each, with their checksums, and
    the embedding columns the memory's search layout makes of `vectors` (its own `columns`, as `add` writes them)."""
    count = len(vectors)
    rng = np.random.default_rng((SEED + 1, start))
    blob = rng.bytes(count * context_bytes)
    contexts = [blob[i * context_bytes : (i + 1) * context_bytes] for i in range(count)]
    layout = layout or SearchLayout(format="float32", dim=DIM, hidden_size=DIM)
    columns = {
        "id": pa.array([f"item-{start + i}" for i in range(count)], pa.string()),
        **layout.columns(vectors),
        "context": pa.array(contexts, pa.large_binary()),
        "context_sha256": pa.array([hashlib.sha256(c).hexdigest() for c in contexts], pa.string()),
        "context_ids": pa.array([[]] * count, pa.list_(pa.int32())),
        "context_positions": pa.array([[]] * count, pa.list_(pa.int32())),
        "source": pa.nulls(count, pa.string()),
        "text": pa.nulls(count, pa.string()),
        "metadata": pa.array(["{}"] * count, pa.string()),
    }
    return rows_table(columns, schema)


class ExactTopK:
    """The exact top-k (cosine) of fixed queries over every row seen so far, merged chunk by chunk (the oracle)."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries, self.k = queries, k
        self.scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        self.rows = np.zeros((len(queries), 0), dtype=np.int64)

    def update(self, start: int, vectors: np.ndarray) -> None:
        scores = np.concatenate([self.scores, self.queries @ vectors.T], axis=1)
        rows = np.concatenate(
            [self.rows, np.broadcast_to(np.arange(start, start + len(vectors)), scores[:, -len(vectors) :].shape)],
            axis=1,
        )
        best = np.argsort(-scores, axis=1, kind="stable")[:, : self.k]
        self.scores, self.rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)

    def ids(self) -> list[list[str]]:
        return [[f"item-{row}" for row in rows] for rows in self.rows]


def pq_partitions(rows: int) -> int:
    """The partitions LanceDB trains for the IVF-PQ index `build_ann_index` asks for over `rows` rows: sqrt(rows),
    but at most one per 256 rows (below 65,536 rows it trains fewer than asked, and says so)."""
    return min(ann_partitions(rows), rows // 256)


def percentiles(times: list[float]) -> tuple[float, float]:
    return 1000 * float(np.percentile(times, 50)), 1000 * float(np.percentile(times, 95))


def timed_searches(memory: CREMMemory, queries: np.ndarray, **options) -> tuple[list[float], list[list[str]]]:
    """Each query's `search_vector(k=10, **options)`: its time (s) and its hit ids, after one warm-up search."""
    memory.search_vector(queries[0], k=10, **options)
    times, found = [], []
    for query in queries:
        t = time.perf_counter()
        hits = memory.search_vector(query, k=10, **options)
        times.append(time.perf_counter() - t)
        found.append([hit.id for hit in hits])
    return times, found


def quality(found: list[list[str]], expected: list[list[str]], planted: np.ndarray) -> tuple[float, float]:
    """Mean recall@10 of `found` against the oracle's `expected`, and the share of queries whose planted item is
    found at rank 1."""
    recall = statistics.mean(len(set(a) & set(e)) / 10 for a, e in zip(found, expected, strict=True))
    at_1 = statistics.mean(a[0] == f"item-{p}" for a, p in zip(found, planted, strict=True))
    return recall, at_1


def lookup_query(memory: CREMMemory, item_id: str):
    """The read `CREMMemory.contexts` runs for one id."""
    return memory.items.search().where(f"id IN ('{item_id}')").select(CONTEXT_COLUMNS).limit(1)


def search_part(args) -> dict:
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    processor = make_tiny_processor()
    # Layers/heads do not matter here (contexts are synthetic bytes); the hidden size sets the vector column.
    model = make_tiny_crem(processor, hidden_size=DIM, num_layers=1, num_heads=12)
    memory = CREMMemory.open(os.path.join(work, "memory"), model, processor, create=True)
    schema = memory.items.schema
    rng = np.random.default_rng(SEED + 2)
    first = chunk_vectors(0, CHUNK)
    planted = rng.choice(CHUNK, size=args.queries, replace=False)  # in the first chunk: present at every size
    noisy = first[planted] + PLANT_NOISE * rng.standard_normal((args.queries, DIM), dtype=np.float32) / np.sqrt(DIM)
    queries = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    oracle = ExactTopK(queries, 10)
    lookups = [f"item-{i}" for i in rng.integers(0, CHUNK, args.lookups)]
    rows, sweep, written, log = [], [], 0, []
    started = time.perf_counter()
    for size in sorted(args.rows):
        write_start = time.perf_counter()
        while written < size:
            count = min(CHUNK, size - written)
            vectors = first if written == 0 else chunk_vectors(written, count)
            memory.items.add(chunk_table(written, vectors, schema, args.context_bytes))
            oracle.update(written, vectors)
            written += count
            if written % (10 * CHUNK) == 0:
                print(f"[{time.perf_counter() - started:.0f}s] wrote {written} rows", flush=True)
        write_s = time.perf_counter() - write_start
        start = time.perf_counter()
        memory.refresh_id_index()
        id_index_s = time.perf_counter() - start
        plan = lookup_query(memory, lookups[0]).explain_plan(True)
        start = time.perf_counter()
        memory.build_ann_index()
        ann_s = time.perf_counter() - start
        print(f"[{time.perf_counter() - started:.0f}s] {size}: ANN index built in {ann_s:.0f} s", flush=True)
        table_bytes = disk_bytes(os.path.join(work, "memory", "items.lance"))
        index_bytes = disk_bytes(os.path.join(work, "memory", "items.lance", "_indices"))

        ann_times, ann_ids = timed_searches(memory, queries)
        exact_times, exact_agree = [], []
        expected = oracle.ids()
        for q in range(args.exact_queries):
            t = time.perf_counter()
            hits = memory.search_vector(queries[q], k=10, exact=True)
            exact_times.append(time.perf_counter() - t)
            exact_agree.append([hit.id for hit in hits] == expected[q])
        recall, planted_at_1 = quality(ann_ids, expected, planted)
        oracle_at_1 = statistics.mean(e[0] == f"item-{p}" for e, p in zip(expected, planted, strict=True))
        lookup_query(memory, lookups[0]).to_arrow()  # warm-up
        lookup_times = []
        for item_id in lookups:
            t = time.perf_counter()
            found = lookup_query(memory, item_id).to_arrow()
            lookup_times.append(time.perf_counter() - t)
            if found.num_rows != 1 or len(found.column("context")[0].as_py()) != args.context_bytes:
                raise RuntimeError(f"The point lookup of {item_id} returned {found.num_rows} rows.")
        row = {
            "items": size,
            "disk, items table (GiB)": table_bytes / 2**30,
            "of which indices (MiB)": index_bytes / 2**20,
            "write (s)": write_s,
            "IVF-PQ build (s)": ann_s,
            "id index build (s)": id_index_s,
            "partitions": pq_partitions(size),
            "nprobes (default)": memory.default_nprobes(),
            "ANN search p50 (ms)": percentiles(ann_times)[0],
            "ANN search p95 (ms)": percentiles(ann_times)[1],
            "recall@10 vs exact": recall,
            "planted item at rank 1 (ANN)": planted_at_1,
            "planted item at rank 1 (exact)": oracle_at_1,
            "exact scan p50 (ms)": percentiles(exact_times)[0],
            "exact scan p95 (ms)": percentiles(exact_times)[1],
            "exact scan == numpy oracle": f"{sum(exact_agree)}/{len(exact_agree)}",
            "lookup by id p50 (ms)": percentiles(lookup_times)[0],
            "lookup by id p95 (ms)": percentiles(lookup_times)[1],
            "lookup uses id index": "ScalarIndexQuery" in plan and "id_idx" in plan,
        }
        rows.append(row)
        log.append({"items": size, "lookup_plan": plan})
        print(json.dumps(row), flush=True)
        write_results(args, rows, sweep, log, time.perf_counter() - started)
        partitions = pq_partitions(size)
        for nprobes in sorted({n for n in args.nprobes if n < partitions} | {partitions}):
            times, found = timed_searches(memory, queries, nprobes=nprobes)
            recall, at_1 = quality(found, expected, planted)
            point = {
                "items": size,
                "partitions": partitions,
                "nprobes": nprobes,
                "share of partitions": nprobes / partitions,
                "default": nprobes == memory.default_nprobes(),
                "ANN search p50 (ms)": percentiles(times)[0],
                "ANN search p95 (ms)": percentiles(times)[1],
                "recall@10 vs exact": recall,
                "planted item at rank 1": at_1,
            }
            sweep.append(point)
            print(f"[{time.perf_counter() - started:.0f}s] {json.dumps(point)}", flush=True)
            write_results(args, rows, sweep, log, time.perf_counter() - started)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "nprobes": sweep}


def write_results(args, rows: list[dict], sweep: list[dict], log: list[dict], seconds: float) -> None:
    """Rewrite the report after each size, so that a run stopped at 10^6 keeps the smaller sizes."""
    load = os.getloadavg()
    header = (
        f"### memory_scale: search and point lookup at 10^4-10^6 items\n\nMachine: {machine()}; lancedb "
        f"{lancedb.__version__}; load average now {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}; run so far "
        f"{seconds:.0f} s.\n\n"
    )
    note = (
        f"Synthetic items in a `CREMMemory`'s own items table (created by `CREMMemory.open` with a tiny CREM model of "
        f"hidden size {DIM}, the 2B's), written in chunks of {CHUNK:,} rows, the table growing from one size to the "
        f"next: random unit vectors of {DIM} dims (seed {SEED}) and random context bytes of {args.context_bytes:,} "
        "bytes per item with their SHA-256. The context size is chosen to fit 10^6 items on this machine's disk "
        "(~77 GB free): the int4 context of issue 18 (~120 KiB at the 2B geometry) would need ~120 GB at 10^6. "
        "LanceDB stores columns separately, so the context column sets the disk size but not the vector search, "
        "which reads the vector column (and its index) only; a point lookup reads one row's context. "
        f"Queries: {args.queries} planted near-duplicates of items of the first chunk (each query is its item plus "
        "Gaussian noise, cosine ~0.9 to it, ~0.1 at most to any other), so the right answer is known at every size. "
        "ANN = `build_ann_index()` (IVF-PQ, cosine, 96 sub-vectors, sqrt(rows) partitions asked: LanceDB trains at "
        "most one per 256 rows, so 39 at 10^4; `partitions` is what it trains) and "
        f"`search_vector(k=10)` with the default probe count (`CREMMemory.default_nprobes`: {PROBE_FRACTION:.0%} of "
        f"the partitions, at least LanceDB's {LANCEDB_NPROBES}) and the memory's re-scoring of 10x candidates "
        "(exact cosines on the float32 column); "
        "recall@10 = overlap of its top 10 with the exact top 10 of a numpy oracle computed while the vectors "
        "were generated (the other 9 exact neighbours of a random unit vector in 1536 dims are nearly tied at "
        "cosine ~0.08, a worst case for any quantised index; the planted item's rank 1 is the meaningful part). "
        f"Exact scan: `search_vector(exact=True)` on {args.exact_queries} of the queries, checked against the "
        f"oracle. Lookup by id: the read `CREMMemory.contexts` runs (`where(\"id IN ('...')\")`, one row, the "
        f"context column) for {args.lookups} random ids; its plan is checked for the B-tree id index "
        "(`ScalarIndexQuery ... id_idx`). Disk: the apparent size of every file of the items table's folder "
        "(data, indices, manifests; old index versions included)."
    )
    sweep_note = (
        "The same queries, index and oracle, searched with `search_vector(k=10, nprobes=N)` (re-scoring 10x "
        "candidates as above) for each N up to every partition; `default`: the N that `search_vector` probes when "
        "given none. Probing every partition ranks every row by its PQ code, so what is left approximate at the "
        "last N is the PQ ranking of the 100 candidates that are re-scored."
    )
    text = header + markdown_rows(rows) + "\n" + note + "\n"
    if sweep:
        text += "\n#### ANN search by probe count (`nprobes`)\n\n" + markdown_rows(sweep) + "\n" + sweep_note + "\n"
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomically(os.path.join(args.output_dir, "memory_scale.md"), text)
    payload = {
        "name": "memory_scale",
        "machine": machine(),
        "args": vars(args),
        "rows": rows,
        "nprobes": sweep,
        "plans": log,
    }
    write_json_atomically(os.path.join(args.output_dir, "memory_scale.json"), json.loads(json.dumps(payload)))


# ---------------------------------------------------------------------------------------------------- formats

#: The search layouts compared: (label, vector_format, vector_dim, full_vectors).
LAYOUTS = [
    ("float32, 1536", "float32", DIM, True),
    ("float32, 256 (truncated)", "float32", 256, True),
    ("float32, 256, no full vectors", "float32", 256, False),
    ("int8, 1536", "int8", DIM, True),
    ("binary, 1536", "binary", DIM, True),
]


def formats_part(args) -> dict:
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    processor = make_tiny_processor()
    model = make_tiny_crem(processor, hidden_size=DIM, num_layers=1, num_heads=12)
    model.config.matryoshka_dims = [256]  # as a model trained with a 256-dim Matryoshka prefix
    memories = {
        label: CREMMemory.open(
            os.path.join(work, f"{fmt}-{dim}-{full}"),
            model,
            processor,
            create=True,
            vector_format=fmt,
            vector_dim=dim,
            full_vectors=full,
        )
        for label, fmt, dim, full in LAYOUTS
    }
    rng = np.random.default_rng(SEED + 2)
    first = chunk_vectors(0, CHUNK)
    planted = rng.choice(CHUNK, size=args.queries, replace=False)
    noisy = first[planted] + PLANT_NOISE * rng.standard_normal((args.queries, DIM), dtype=np.float32) / np.sqrt(DIM)
    queries = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    # Oracles: the exact top 10 at the full dim, and at each truncated dim (queries and rows truncated alike).
    dims = sorted({dim for _, _, dim, _ in LAYOUTS})
    oracles = {dim: ExactTopK(truncate(queries, dim), 10) for dim in dims}
    rows, written, log = [], 0, []
    started = time.perf_counter()
    for size in sorted(args.rows):
        write_s = dict.fromkeys(memories, 0.0)
        while written < size:
            count = min(CHUNK, size - written)
            vectors = first if written == 0 else chunk_vectors(written, count)
            for label, memory in memories.items():
                t = time.perf_counter()
                memory.items.add(
                    chunk_table(written, vectors, memory.items.schema, args.format_context_bytes, memory.search_layout)
                )
                write_s[label] += time.perf_counter() - t
            for dim, oracle in oracles.items():
                oracle.update(written, truncate(vectors, dim))
            written += count
        print(f"[{time.perf_counter() - started:.0f}s] wrote {written} rows to each memory", flush=True)
        for label, memory in memories.items():
            layout = memory.search_layout
            start = time.perf_counter()
            memory.build_ann_index()
            build_s = time.perf_counter() - start
            folder = os.path.join(memory.uri, "items.lance")
            memory.search_vector(queries[0], k=10)  # warm-up
            times, found = [], []
            for query in queries:
                t = time.perf_counter()
                hits = memory.search_vector(query, k=10)
                times.append(time.perf_counter() - t)
                found.append([hit.id for hit in hits])
            full, own = oracles[DIM].ids(), oracles[layout.dim].ids()
            search_bytes = sum(f.type.list_size * f.type.value_type.bit_width // 8 for f in layout.fields())
            row = {
                "items": size,
                "layout": label,
                "search column": layout.column,
                "vector bytes / item": search_bytes,
                "disk, items table (GiB)": disk_bytes(folder) / 2**30,
                "ANN index (MiB)": disk_bytes(os.path.join(folder, "_indices")) / 2**20,
                "index build (s)": build_s,
                "write (s)": write_s[label],
                "ANN search p50 (ms)": percentiles(times)[0],
                "ANN search p95 (ms)": percentiles(times)[1],
                "recall@10 vs exact full-dim scan": statistics.mean(
                    len(set(a) & set(e)) / 10 for a, e in zip(found, full, strict=True)
                ),
                "recall@10 vs exact scan at its dim": statistics.mean(
                    len(set(a) & set(e)) / 10 for a, e in zip(found, own, strict=True)
                ),
                "planted item at rank 1": statistics.mean(
                    a[0] == f"item-{p}" for a, p in zip(found, planted, strict=True)
                ),
            }
            rows.append(row)
            log.append({"items": size, "layout": label, "indices": [str(i) for i in memory.items.list_indices()]})
            print(f"[{time.perf_counter() - started:.0f}s] {json.dumps(row)}", flush=True)
            write_format_results(args, rows, log, time.perf_counter() - started)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows}


def write_format_results(args, rows: list[dict], log: list[dict], seconds: float) -> None:
    """Rewrite the formats report after each layout and size (a run stopped early keeps what it measured)."""
    load = os.getloadavg()
    header = (
        f"### memory_scale: search formats (truncated / int8 / binary, re-scored) at 10^4-10^5 items\n\n"
        f"Machine: {machine()}; lancedb {lancedb.__version__}; load average now {load[0]:.2f}/{load[1]:.2f}/"
        f"{load[2]:.2f}; run so far {seconds:.0f} s.\n\n"
    )
    note = (
        f"One `CREMMemory` per search layout (`CREMMemory.open(..., vector_format=, vector_dim=)`, a tiny CREM model "
        f"of hidden size {DIM} whose config lists the Matryoshka dim 256), each holding the same synthetic items, "
        f"written in chunks of {CHUNK:,} rows through the layout's own `SearchLayout.columns` (the columns `add` "
        f"writes): random unit vectors of {DIM} dims (seed {SEED}; the full float32 vector is kept, the re-scoring "
        "source, in every layout but `no full vectors`, whose `vector` column holds the 256-dim prefix only) and "
        f"{args.format_context_bytes:,} random context bytes per item (small here, so that the disk size shows the "
        "vector columns). Vector bytes / item: the `vector` column plus the search "
        "column where it is one of its own (`search_vector`: the 256-dim truncated float32 prefix, or the 1536 sign "
        "bits packed in 192 bytes). ANN index: `build_ann_index()` with sqrt(rows) partitions: IVF-PQ (cosine) for "
        "float32, IVF-SQ (cosine, 8-bit codes) for int8, IVF_FLAT (hamming, on the sign bits) for binary; "
        "`search_vector(k=10)` with LanceDB's default probes and the default re-scoring of 10 x k candidates "
        "(float32 / int8: LanceDB's refine on the float32 column; binary: the memory re-scores the 100 Hamming "
        "candidates from the stored float32 vectors), so every returned score is an exact cosine at the layout's "
        f"dim. Queries: {args.queries} planted near-duplicates of items of the first chunk (cosine ~0.9 to their "
        "item, ~0.1 at most to any other). recall@10 vs exact full-dim scan: overlap with the exact top 10 of a "
        "numpy oracle over the full 1536-dim vectors; vs exact scan at its dim: with the oracle over the vectors "
        "and queries truncated to the layout's dim and renormalised (what the layout can reach at best). The other "
        "9 exact neighbours of a random unit vector are nearly tied (cosine ~0.08), a worst case for every "
        "quantised or truncated search; random vectors have no Matryoshka structure either (a trained model packs "
        "the most information into the prefix), so the truncated layout's full-dim recall here is a floor. The "
        "planted item at rank 1 is the meaningful part for a near-duplicate query. Disk: the apparent size of "
        "every file of the items table's folder (data, indices, manifests)."
    )
    text = header + markdown_rows(rows) + "\n" + note + "\n"
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomically(os.path.join(args.output_dir, "memory_scale_formats.md"), text)
    payload = {"name": "memory_scale_formats", "machine": machine(), "args": vars(args), "rows": rows, "log": log}
    write_json_atomically(os.path.join(args.output_dir, "memory_scale_formats.json"), json.loads(json.dumps(payload)))


# ---------------------------------------------------------------------------------------------------- throughput


def throughput_part(args) -> dict:
    args.full_size = args.device.startswith("cuda") if args.full_size is None else args.full_size
    args.image_tokens = [args.throughput_image_tokens]
    model, processor, label = build_published(args)
    n_items = max(args.batches)
    images = [image_with_tokens(processor, args.throughput_image_tokens, seed=500 + i) for i in range(n_items)]
    ids = [f"image-{i}" for i in range(n_items)]
    question = "What is in the image?"
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    memory = CREMMemory.open(os.path.join(work, "throughput"), model, processor, create=True)
    memory.add(ids=ids, images=images, batch_size=8, show_progress=False)
    new = args.new_tokens

    def from_images(batch: int, compress: bool) -> None:
        inputs = processor.process_generation_inputs(questions=[question] * batch, images=images[:batch])
        with torch.no_grad():
            model.generate(
                **inputs.to(model.device), max_new_tokens=new, min_new_tokens=new, do_sample=False, compress=compress
            )

    def stored(batch: int) -> None:
        memory.ask_many(
            [(question, i) for i in ids[:batch]], max_new_tokens=new, max_batch_size=batch, show_progress=False,
            min_new_tokens=new,
        )  # fmt: skip

    rows = []
    stored(1), from_images(1, True), from_images(1, False)  # warm-up
    for batch in args.batches:
        timed = {}
        for name, run in (
            ("stored context", lambda batch=batch: stored(batch)),
            ("compress=True from image", lambda batch=batch: from_images(batch, True)),
            ("native from image", lambda batch=batch: from_images(batch, False)),
        ):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            timed[name] = statistics.median(times)
        row = {"batch": batch, **{f"{name} (answers/s)": batch / s for name, s in timed.items()}}
        row["stored / compress=True"] = timed["compress=True from image"] / timed["stored context"]
        row["stored / native"] = timed["native from image"] / timed["stored context"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    note = (
        f"Model: {label}; dtype {args.dtype}. {n_items} images of {args.throughput_image_tokens} image tokens stored "
        f"with `CREMMemory.add`; each answer is {new} greedy tokens (min_new_tokens = max_new_tokens, so every path "
        "decodes the same count) to the same question. Stored context = `CREMMemory.ask_many` over `batch` (question, "
        "id) pairs in one batch (reading the contexts from LanceDB included); from the image = "
        "`processor.process_generation_inputs` + `generate` on `batch` images (image processing, vision tower, "
        f"prefill included). Median of {args.repeats} runs after one warm-up of each path at batch 1."
    )
    text = f"### memory_scale: stored-answer throughput\n\nMachine: {machine()}.\n\n{markdown_rows(rows)}\n{note}\n"
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomically(os.path.join(args.output_dir, "memory_throughput.md"), text)
    write_json_atomically(
        os.path.join(args.output_dir, "memory_throughput.json"),
        json.loads(json.dumps({"name": "memory_throughput", "machine": machine(), "rows": rows, "note": note})),
    )
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], backbone=True)
    parser.set_defaults(dtype="bfloat16", repeats=2)
    parser.add_argument("--part", choices=["search", "formats", "throughput"], required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--context-bytes", type=int, default=CONTEXT_BYTES)
    parser.add_argument(
        "--format-context-bytes", type=int, default=1024, help="part formats: context bytes of each synthetic item"
    )
    parser.add_argument("--queries", type=int, default=100, help="planted queries per size (ANN)")
    parser.add_argument("--exact-queries", type=int, default=10, help="of which timed with the exact scan")
    parser.add_argument("--lookups", type=int, default=200, help="point lookups per size")
    parser.add_argument(
        "--nprobes",
        type=int,
        nargs="+",
        default=[5, 10, 20, 50, 100, 200, 500],
        help="part search: probe counts of the sweep (below each size's partitions; all partitions are added)",
    )
    parser.add_argument("--work-dir", default="/tmp/crem_memory_scale")
    parser.add_argument("--keep", action="store_true", help="keep the table afterwards")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--throughput-image-tokens", type=int, default=256)
    parser.add_argument("--full-size", action="store_true", default=None)
    args = parser.parse_args()
    if any(size % CHUNK for size in args.rows) or min(args.rows) < CHUNK:
        raise SystemExit(f"--rows must be multiples of {CHUNK}.")
    {"search": search_part, "formats": formats_part, "throughput": throughput_part}[args.part](args)


if __name__ == "__main__":
    main()
