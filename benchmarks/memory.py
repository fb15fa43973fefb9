"""Visual memory (`crem_hf.memory`): what storing an item costs and what answering from it saves, in one run.

1. Bytes per stored item, on disk (LanceDB), against the full KV cache of the same item stored the same way, at
   256 / 1280 / 4096 image tokens (target: <= 1/70 at 1280).
2. Time to the first answer token from a stored context (`CREMMemory.answer_ids`) against `generate` from the image,
   native and `compress=True` (target: >= 20x at 1280).
3. Indexing cost: `CREMMemory.add` against `get_embedding` alone on the same items and batches (target: <= 1.15x).
4. Search latency p50/p95 at 10k and 100k items (synthetic unit vectors), exact scan and approximate (IVF-PQ) index,
   with the index's recall@10 against the exact scan.
5. Context storage formats (`CREMMemory.open(context_format=...)`): bytes per item at 1280 image tokens in the model
   dtype (bf16) / int8 / int4, scales included, against the full KV cache (target: int4 <= 1/300); and the answer
   fidelity of int8 / int4 contexts against the exact ones (whole-answer agreement, accuracy) on the main job's
   trained model and held-out QA (`--fidelity-model outputs/main/model --fidelity-data outputs/main/data`), or, without
   one, on a tiny random-init model (agreement only). `--formats-only` runs this section alone.

The model is the published config of the backbone's model (`--backbone`: Qwen2-VL-2B, Qwen2.5-VL-3B or Qwen3-VL-2B,
read from tests/fixtures; nothing is downloaded) with random weights and that model's real tokenizer, template and
image processor: the real KV geometry (Qwen2-VL-2B: 28 language layers, 2 key/value heads of 128, hidden 1536;
Qwen2.5-VL-3B: 36 x 2 x 128, hidden 2048; Qwen3-VL-2B: 28 x 8 x 128, hidden 2048; each with its 151,936-row tied
vocabulary), in bf16. On CPU (the default there) the MLP and the vision tower are shrunk so that it runs;
`--full-size` (the default on CUDA) keeps them. `--sections` runs some parts (e.g. `bytes` alone;
`formats` is section 5; `--formats-only` runs it alone into memory_formats.md).
Run: python benchmarks/memory.py [--backbone qwen3_vl] [--device cuda --attn flash_attention_2] [--formats-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time

import lancedb
import numpy as np
import pyarrow as pa
import torch
from common import (
    arguments,
    backbone_processor,
    geometry,
    image_with_tokens,
    machine,
    markdown_rows,
    median_seconds,
    published_files,
    synchronize,
    test_helpers,
)

from crem_hf.evaluation import load_caption_rows
from crem_hf.evaluation.generation import normalize_answer
from crem_hf.io import write_json_atomically, write_text_atomically
from crem_hf.loading import load_crem
from crem_hf.memory import CREMMemory
from crem_hf.memory.quantize import CONTEXT_FORMATS, context_nbytes
from crem_hf.memory.rows import slots_bytes
from crem_hf.modeling_crem import CREMMixin
from crem_hf.testing import BACKBONES

IMAGE_TOKENS = (256, 1280, 4096)
QUESTION = "What is in the image?"
#: The shrunk parts of the CPU model (the KV geometry is untouched), per backbone: its vision tower's own keys.
CPU_MLP_WIDTH = 1024
CPU_VISION = {
    "qwen2_vl": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
    "qwen2_5_vl": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "fullatt_block_indexes": [1],
    },
    # three DeepStack levels, as the real one feeds the first three decoder layers
    "qwen3_vl": {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "deepstack_visual_indexes": [0, 1, 2],
    },
}
SECTIONS = ("bytes", "first_token", "indexing", "search", "formats")
INDEX_IMAGE_TOKENS = 256
INDEX_BATCH = 8
#: Clusters of the synthetic search vectors (points of one cluster share a direction, as embeddings of similar items).
CLUSTERS = 1000
WRITE_CHUNK = 10_000
TARGETS = {"bytes": 70.0, "first_token": 20.0, "indexing": 1.15}
#: Section 5's targets: full KV / int4 item; int8 whole-answer agreement; accuracy drops (points) of int8 / int4.
FORMAT_TARGETS = {"int4_ratio": 300.0, "int8_agreement": 0.99, "int8_points": 0.5, "int4_points": 2.0}
FIDELITY_TOKENS = 16


# ---------------------------------------------------------------------------------------------------- model


def build_published(args) -> tuple[CREMMixin, object, str]:
    """
    The CREM model on the published config of `args.backbone`'s model with random weights, its processor (the
    model's real tokenizer, template and image processor), and a label.
    """
    _, plain_class, crem_class = BACKBONES[args.backbone]
    name = geometry(args.backbone)["model"]
    processor = backbone_processor(args.backbone, real_vocabulary=True)
    processor.set_image_token_range(1, max(args.image_tokens))
    config = plain_class.config_class.from_pretrained(published_files(args.backbone))
    if args.full_size:
        label = f"{name} (full size, random weights)"
    else:
        mlp = config.text_config.intermediate_size
        config.text_config.intermediate_size = CPU_MLP_WIDTH
        vision = CPU_VISION[args.backbone]
        before = f"{config.vision_config.depth} blocks"
        for key, value in vision.items():
            setattr(config.vision_config, key, value)
        if hasattr(config.vision_config, "out_hidden_size"):
            config.vision_config.out_hidden_size = config.text_config.hidden_size
        label = (
            f"{name} KV geometry (random weights; MLP {mlp} -> {CPU_MLP_WIDTH}, vision tower {before} -> "
            f"{vision['depth']} blocks of width {vision.get('embed_dim') or vision['hidden_size']})"
        )
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it runs: no 2B-parameter copy from the CPU
        base = plain_class(config)
    base = base.to(dtype=getattr(torch, args.dtype)).eval()
    base.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    base.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model = crem_class.from_backbone(base, processor).eval()
    return model, processor, label


# ---------------------------------------------------------------------------------------------------- helpers


def disk_bytes(path: str) -> int:
    """Apparent size of every file under `path` (as `du -b`): data files, manifests, transactions."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def timed(run, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def full_cache_row(model, processor, image, item_id: str, schema: pa.Schema) -> dict:
    """
    The item's prompt with every slot kept (no compression: the full KV cache a per-token cache store keeps), as a
    row of the memory's own items schema: the same columns, only the context holds all the prompt's slots.
    """
    inputs = processor.process_embedding_inputs(images=[image]).to(model.device)
    every_row_native = torch.zeros(1, dtype=torch.bool, device=model.device)
    full = model.compress(**inputs, rows=every_row_native, return_embeddings=True)
    data = slots_bytes(full.cache, 0)[0]  # every slot, in the layout of a memory's contexts
    return {
        "id": item_id,
        "vector": full.embeddings[0].float().cpu().tolist(),
        "context": data,
        "context_sha256": hashlib.sha256(data).hexdigest(),
        "context_ids": full.input_ids[0].tolist(),
        "context_positions": full.position_ids[:, 0].reshape(-1).tolist(),
        "source": None,
        "text": None,
        "metadata": "{}",
    }


def target(what: str, goal: str, measured: str, met: bool) -> dict:
    return {"what": what, "target": goal, "measured": measured, "met": "met" if met else "MISSED"}


# ---------------------------------------------------------------------------------------------------- 1. bytes


def stored_bytes(model, processor, work: str, images: dict[int, object]) -> tuple[list[dict], CREMMemory, dict]:
    memory = CREMMemory.open(os.path.join(work, "memory"), model, processor, create=True)
    tokens = sorted(images)
    memory.add(
        ids=[f"image-{n}" for n in tokens], images=[images[n] for n in tokens], batch_size=1, show_progress=False
    )
    info = memory.info()
    rows = info["rows"]
    item_disk = disk_bytes(os.path.join(work, "memory", "items.lance")) / rows
    folder_disk = disk_bytes(os.path.join(work, "memory")) / rows
    full_db = lancedb.connect(os.path.join(work, "full_kv"))
    f = memory.fingerprint
    slot_bytes = f["num_layers"] * 2 * f["num_kv_heads"] * f["head_dim"] * model.dtype.itemsize
    results = []
    for n in tokens:
        row = full_cache_row(model, processor, images[n], f"image-{n}", memory.items.schema)
        table = full_db.create_table(f"full_{n}", data=pa.Table.from_pylist([row], schema=memory.items.schema))
        slots = len(row["context_ids"])
        full_disk = disk_bytes(os.path.join(work, "full_kv", f"full_{n}.lance"))
        results.append(
            {
                "image tokens": n,
                "prompt slots": slots,
                "stored slots": memory.num_chorus_tokens,
                "full KV computed (bytes)": slots * slot_bytes,
                "stored KV computed (bytes)": memory.num_chorus_tokens * slot_bytes,
                "stored / full KV (computed)": memory.num_chorus_tokens / slots,
                "full KV computed (MiB)": slots * slot_bytes / 2**20,
                "full KV on disk (MiB)": full_disk / 2**20,
                "full KV table stats (MiB)": table.stats()["total_bytes"] / 2**20,
                "item on disk (KiB)": item_disk / 2**10,
                "item, info() (KiB)": info["bytes_per_item"] / 2**10,
                "memory folder / rows (KiB)": folder_disk / 2**10,
                "full / item (on disk)": full_disk / item_disk,
                "full / item (info)": table.stats()["total_bytes"] / info["bytes_per_item"],
            }
        )
        print(results[-1], flush=True)
    extra = {
        "shared_prefix_slots": info["shared_prefix_slots"],
        "shared_prefix_bytes": info["shared_prefix_bytes"],
        "stored_context_bytes_computed": memory.num_chorus_tokens * slot_bytes,
        "vector_bytes": 4 * f["hidden_size"],
        "rows": rows,
    }
    return results, memory, extra


# ---------------------------------------------------------------------------------------------------- 2. first token


def first_token(model, processor, memory: CREMMemory, images: dict[int, object], args) -> list[dict]:
    device = args.device

    last = {}  # the latest answer of each path (to compare first tokens without another call)

    def paths(n: int):
        def stored():
            last["stored"] = memory.answer_ids(QUESTION, [f"image-{n}"], max_new_tokens=1)

        def from_image(compress: bool):
            batch = processor.process_generation_inputs(questions=[QUESTION], images=[images[n]]).to(device)
            with torch.no_grad():
                last[compress] = model.generate(**batch, max_new_tokens=1, do_sample=False, compress=compress)

        return stored, lambda: from_image(False), lambda: from_image(True)

    # The floor of any answer: `generate` (native, one new token) from a text-only prompt as long as the follow-up
    # turn, the tokens the stored path runs (over its cached slots), without reading anything from the memory.
    floor_length = processor.process_followups(questions=[QUESTION])["input_ids"].shape[1]
    words = processor.tokenizer("A plain text prompt with nothing special in it. " * floor_length)["input_ids"]
    floor_ids = torch.tensor([words[:floor_length]], device=device)

    def floor():
        with torch.no_grad():
            model.generate(
                input_ids=floor_ids, attention_mask=torch.ones_like(floor_ids), max_new_tokens=1, do_sample=False
            )

    for run in paths(min(images)):  # warm every path once on the smallest image
        run()
    floor_s = median_seconds(floor, args.stored_repeats, device, warmup=1)
    # Expensive paths get no per-size warm-up on CPU (seconds each); on CUDA one is cheap.
    warmup = 1 if device.startswith("cuda") else 0
    rows = []
    for n in sorted(images):
        stored, native, compressed = paths(n)
        stored_s = median_seconds(stored, args.stored_repeats, device, warmup=1)
        read_s = median_seconds(lambda n=n: memory.contexts([f"image-{n}"]), args.stored_repeats, device, warmup=1)
        native_s = median_seconds(native, args.image_repeats, device, warmup)
        compressed_s = median_seconds(compressed, args.image_repeats, device, warmup)
        same = int(last["stored"][0, -1]) == int(last[True][0, -1])
        rows.append(
            {
                "image tokens": n,
                "stored context (ms)": 1000 * stored_s,
                "of which reading it (ms)": 1000 * read_s,
                f"floor: generate from {floor_length} text tokens (ms)": 1000 * floor_s,
                "native from image (ms)": 1000 * native_s,
                "compress=True from image (ms)": 1000 * compressed_s,
                "native / stored": native_s / stored_s,
                "compress=True / stored": compressed_s / stored_s,
                "same first token as compress=True": same,
            }
        )
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- 3. indexing


def indexing_cost(model, processor, work: str, args) -> dict:
    images = [image_with_tokens(processor, INDEX_IMAGE_TOKENS, seed=100 + i) for i in range(args.index_items)]
    ids = [f"item-{i}" for i in range(len(images))]
    device = args.device

    def forward_only(compress: bool):
        for start in range(0, len(images), INDEX_BATCH):
            batch = processor.process_embedding_inputs(images=images[start : start + INDEX_BATCH]).to(device)
            with torch.no_grad():
                model.compress(**batch, return_embeddings=True) if compress else model.get_embedding(**batch)

    names = ("get_embedding", "add", "compress")
    walls, cpus = {name: [] for name in names}, {name: [] for name in names}
    forward_only(False)  # warm-up
    forward_only(True)
    for repeat in range(args.index_repeats):
        # A fresh memory per repeat (made outside the clock: creating one runs the shared prefix once).
        memory = CREMMemory.open(os.path.join(work, f"index-{repeat}"), model, processor, create=True)
        runs = {
            "get_embedding": lambda: forward_only(False),
            "add": lambda memory=memory: memory.add(
                ids=ids, images=images, batch_size=INDEX_BATCH, show_progress=False
            ),
            "compress": lambda: forward_only(True),
        }
        # Rotate the order so that drift on a shared machine does not favour one side.
        for name in names[repeat % 3 :] + names[: repeat % 3]:
            wall, cpu = timed(runs[name], device)
            walls[name].append(wall)
            cpus[name].append(cpu)
        if len(memory) != len(ids):
            raise RuntimeError(f"The indexing run stored {len(memory)} of {len(ids)} items.")
    wall = {name: statistics.median(values) for name, values in walls.items()}
    cpu = {name: statistics.median(values) for name, values in cpus.items()}
    row = {
        "items": len(images),
        "batch": INDEX_BATCH,
        "image tokens": INDEX_IMAGE_TOKENS,
        "get_embedding (s)": wall["get_embedding"],
        "add (s)": wall["add"],
        "add / get_embedding (wall)": wall["add"] / wall["get_embedding"],
        "get_embedding CPU (s)": cpu["get_embedding"],
        "add CPU (s)": cpu["add"],
        "add / get_embedding (CPU)": cpu["add"] / cpu["get_embedding"],
        "of add: compress(return_embeddings) (s)": wall["compress"],
        "of add: storing (s)": wall["add"] - wall["compress"],
    }
    print(row, flush=True)
    return row


# ---------------------------------------------------------------------------------------------------- 4. search


def synthetic_table(start: int, vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Rows of a memory's items schema holding `vectors`, with 16-byte placeholder contexts (never read by search)."""
    count, dim = vectors.shape
    dummy = bytes(16)
    columns = {
        "id": pa.array([f"synthetic-{start + i}" for i in range(count)], pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        "context": pa.array([dummy] * count, pa.large_binary()),
        "context_sha256": pa.array([hashlib.sha256(dummy).hexdigest()] * count, pa.string()),
        "context_ids": pa.array([[]] * count, pa.list_(pa.int32())),
        "context_positions": pa.array([[]] * count, pa.list_(pa.int32())),
        "source": pa.nulls(count, pa.string()),
        "text": pa.nulls(count, pa.string()),
        "metadata": pa.array(["{}"] * count, pa.string()),
    }
    return pa.Table.from_arrays([columns[field.name] for field in schema], schema=schema)


def search_latency(model, processor, work: str, args) -> list[dict]:
    memory = CREMMemory.open(os.path.join(work, "search"), model, processor, create=True)
    dim = memory.fingerprint["hidden_size"]
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((CLUSTERS, dim), dtype=np.float32)

    def unit_vectors(count: int) -> np.ndarray:
        points = centers[rng.integers(0, CLUSTERS, count)] + rng.standard_normal((count, dim), dtype=np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    queries = unit_vectors(args.queries)
    rows, written = [], 0
    for size in sorted(args.search_rows):
        while written < size:
            chunk = min(WRITE_CHUNK, size - written)
            memory.items.add(synthetic_table(written, unit_vectors(chunk), memory.items.schema))
            written += chunk

        def latencies(exact: bool) -> tuple[list[float], list[list[str]]]:
            memory.search_vector(queries[0], k=10, exact=exact)  # warm-up
            times, found = [], []
            for query in queries:
                start = time.perf_counter()
                hits = memory.search_vector(query, k=10, exact=exact)
                times.append(time.perf_counter() - start)
                found.append([hit.id for hit in hits])
            return times, found

        exact_times, exact_ids = latencies(exact=True)
        start = time.perf_counter()
        memory.build_ann_index()
        build_s = time.perf_counter() - start
        ann_times, ann_ids = latencies(exact=False)
        recall = statistics.mean(len(set(a) & set(e)) / len(e) for a, e in zip(ann_ids, exact_ids, strict=True))
        for label, times in (("exact scan", exact_times), ("IVF-PQ index", ann_times)):
            rows.append(
                {
                    "items": size,
                    "search": label,
                    "p50 (ms)": 1000 * float(np.percentile(times, 50)),
                    "p95 (ms)": 1000 * float(np.percentile(times, 95)),
                    "recall@10 vs exact": recall if label == "IVF-PQ index" else 1.0,
                    "index build (s)": build_s if label == "IVF-PQ index" else 0.0,
                }
            )
            print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------- 5. formats


def format_bytes(model, processor, work: str, image) -> list[dict]:
    """One memory per context format holding the same 1280-token item: its context bytes and its row on disk."""
    prompt_slots = int(processor.process_embedding_inputs(images=[image])["attention_mask"].sum())
    rows = []
    for fmt in CONTEXT_FORMATS:
        memory = CREMMemory.open(os.path.join(work, f"format-{fmt}"), model, processor, create=True, context_format=fmt)
        memory.add(ids=["image-1280"], images=[image], show_progress=False)
        f = memory.fingerprint
        shape = (f["num_layers"], 2, f["num_kv_heads"], memory.num_chorus_tokens, f["head_dim"])
        stored = len(memory.items.to_arrow().column("context")[0].as_py())
        if stored != context_nbytes(fmt, model.dtype, shape):
            raise RuntimeError(f"A {fmt} context has {stored} bytes, not {context_nbytes(fmt, model.dtype, shape)}.")
        full = prompt_slots * context_nbytes("model", model.dtype, shape) // memory.num_chorus_tokens
        disk = disk_bytes(os.path.join(work, f"format-{fmt}", "items.lance"))
        rows.append(
            {
                "format": f"model ({str(model.dtype).removeprefix('torch.')})" if fmt == "model" else fmt,
                "context incl. scales (KiB)": stored / 2**10,
                "item on disk (KiB)": disk / 2**10,
                "full KV cache (MiB)": full / 2**20,
                "full KV / context": full / stored,
                "full KV / item on disk": full / disk,
            }
        )
        print(rows[-1], flush=True)
    return rows


def _trimmed(tokens: torch.Tensor, stop_ids: set[int]) -> list[list[int]]:
    """Each row's answer tokens up to (without) its first end-of-sequence or padding token."""
    answers = []
    for row in tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        answers.append(row[:end])
    return answers


def answer_fidelity(args, work: str) -> tuple[list[dict], str]:
    """
    Every held-out QA item indexed into one memory per format; each asked its question (greedy, up to
    FIDELITY_TOKENS tokens) from its stored context. Rows per format: whole-answer agreement with the exact
    format's answers, token agreement (positions where both answers have a token), accuracy.
    """
    if args.fidelity_model:
        model, processor = load_crem(args.fidelity_model)
        data = args.fidelity_data
        rows = []
        for name in ("qa_single", "qa_pairs"):
            rows += load_caption_rows(os.path.join(data, "eval", f"{name}.jsonl"), ("question", "answer"), data)
        label = f"the trained model {args.fidelity_model} on its {len(rows)} held-out QA items ({data})"
    else:
        from crem_hf.testing import make_tiny_crem, make_tiny_processor

        processor = make_tiny_processor()
        model = make_tiny_crem(processor, seed=0)
        noise = test_helpers().random_image
        rows = [
            {"image": noise(56 + 28 * (i % 3), 56 + 28 * (i % 2), seed=500 + i), "question": QUESTION, "answer": None}
            for i in range(args.fidelity_items)
        ]
        label = f"a tiny random-init model (no trained model given) on {len(rows)} noise images: agreement only"
    model = model.to(args.device).eval()
    config = model.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stop_ids = {token for token in [*eos, config.pad_token_id, processor.tokenizer.pad_token_id] if token is not None}
    ids = [f"qa-{i:04d}" for i in range(len(rows))]
    by_question: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_question.setdefault(row["question"], []).append(i)
    answers: dict[str, list[list[int]]] = {}
    for fmt in CONTEXT_FORMATS:
        memory = CREMMemory.open(
            os.path.join(work, f"fidelity-{fmt}"), model, processor, create=True, context_format=fmt
        )
        memory.add(ids=ids, images=[row["image"] for row in rows], batch_size=args.fidelity_batch, show_progress=False)
        found: list[list[int] | None] = [None] * len(rows)
        for question, members in by_question.items():
            for start in range(0, len(members), args.fidelity_batch):
                chunk = members[start : start + args.fidelity_batch]
                tokens = memory.answer_ids(question, [ids[i] for i in chunk], max_new_tokens=FIDELITY_TOKENS)
                for i, answer in zip(chunk, _trimmed(tokens, stop_ids), strict=True):
                    found[i] = answer
        answers[fmt] = found
    exact = answers["model"]
    results = []
    for fmt in CONTEXT_FORMATS:
        texts = [processor.tokenizer.decode(answer, skip_special_tokens=True) for answer in answers[fmt]]
        same_tokens = [
            sum(a == b for a, b in zip(x, y, strict=False)) for x, y in zip(answers[fmt], exact, strict=True)
        ]
        positions = [max(len(x), len(y)) for x, y in zip(answers[fmt], exact, strict=True)]
        result = {
            "format": fmt,
            "items": len(rows),
            "whole answers equal to exact": statistics.mean(a == b for a, b in zip(answers[fmt], exact, strict=True)),
            "answer tokens equal to exact": sum(same_tokens) / max(1, sum(positions)),
        }
        if rows[0]["answer"] is not None:
            correct = [normalize_answer(t) == normalize_answer(r["answer"]) for t, r in zip(texts, rows, strict=True)]
            result["accuracy"] = statistics.mean(correct)
        results.append(result)
        print(results[-1], flush=True)
    if "accuracy" in results[0]:
        for result in results:
            result["accuracy - exact (points)"] = 100 * (result["accuracy"] - results[0]["accuracy"])
    return results, label


def format_targets(bytes_rows: list[dict], fidelity_rows: list[dict]) -> list[dict]:
    int4 = next(row for row in bytes_rows if row["format"] == "int4")
    by = {row["format"]: row for row in fidelity_rows}
    targets = [
        target(
            "int4 context (scales included) / full KV cache, 1280 image tokens",
            f"<= 1/{FORMAT_TARGETS['int4_ratio']:g}",
            f"1/{int4['full KV / context']:.1f} ({int4['context incl. scales (KiB)']:.1f} KiB; item on disk: "
            f"1/{int4['full KV / item on disk']:.1f})",
            int4["full KV / context"] >= FORMAT_TARGETS["int4_ratio"],
        ),
        target(
            "int8 answers equal to the exact ones",
            f">= {100 * FORMAT_TARGETS['int8_agreement']:g} %",
            f"{100 * by['int8']['whole answers equal to exact']:.1f} % (int4: "
            f"{100 * by['int4']['whole answers equal to exact']:.1f} %)",
            by["int8"]["whole answers equal to exact"] >= FORMAT_TARGETS["int8_agreement"],
        ),
    ]
    for fmt, key in (("int8", "int8_points"), ("int4", "int4_points")):
        if "accuracy" in by[fmt]:
            drop = -by[fmt]["accuracy - exact (points)"]
            targets.append(
                target(
                    f"{fmt} accuracy drop vs exact contexts",
                    f"<= {FORMAT_TARGETS[key]:g} points",
                    f"{drop:.2f} points ({100 * by[fmt]['accuracy']:.1f} % vs {100 * by['model']['accuracy']:.1f} %)",
                    drop <= FORMAT_TARGETS[key],
                )
            )
    return targets


FORMAT_BYTES_NOTE = (
    "One memory per format, each holding the same 1280-token item (written by `CREMMemory.add`). Context: the stored "
    "`context` bytes of its 16 chorus slots, scales included (min/max groups, each a float16 scale and a zero point "
    "in the model dtype; values per slot over the head dim; int8 keys per channel over the slots (KIVI), int4 keys "
    "Hadamard-rotated over the head dim, then per slot; int4 two codes a byte). Item on disk: the whole one-row "
    "items table folder (embedding, ids, positions, checksum, LanceDB's manifests). Full KV cache: every prompt slot "
    "of the item in the model dtype (computed)."
)


# ---------------------------------------------------------------------------------------------------- report


def plot(path: str, bytes_rows: list[dict], token_rows: list[dict]) -> None:
    """Two panels: bytes per item and time to the first token, against the image size (log scales)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    tokens = [row["image tokens"] for row in bytes_rows]
    left.plot(tokens, [row["full KV on disk (MiB)"] for row in bytes_rows], "o-", label="full KV cache")
    left.plot(tokens, [row["item on disk (KiB)"] / 2**10 for row in bytes_rows], "o-", label="memory item")
    left.set(xlabel="image tokens", ylabel="MiB on disk per item", xscale="log", yscale="log")
    left.set_title("Stored bytes per item")
    tokens = [row["image tokens"] for row in token_rows]
    for key, label in (
        ("native from image (ms)", "generate from image"),
        ("compress=True from image (ms)", "generate(compress=True) from image"),
        ("stored context (ms)", "memory.answer_ids (stored context)"),
    ):
        right.plot(tokens, [row[key] for row in token_rows], "o-", label=label)
    floor = next(key for key in token_rows[0] if key.startswith("floor"))
    right.plot(tokens, [row[floor] for row in token_rows], "k:", label="floor: one generate call, text prompt")
    right.set(xlabel="image tokens", ylabel="ms to the first answer token", xscale="log", yscale="log")
    right.set_title("Time to the first answer token")
    for axis in (left, right):
        axis.set_xticks(tokens, [str(n) for n in tokens])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.legend(fontsize=8)
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    partial = path + ".partial.png"
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    os.replace(partial, path)


def section(title: str, rows: list[dict], notes: str) -> str:
    return f"#### {title}\n\n{markdown_rows(rows)}\n" + (f"{notes}\n\n" if notes else "\n")


def fidelity_note(label: str) -> str:
    return (
        f"Measured on {label}. Each item is indexed into one memory per format and asked its question from its "
        f"stored context (greedy, up to {FIDELITY_TOKENS} new tokens, batches of questions alike). Whole answers "
        "equal: the answer's tokens (up to end of sequence) are the exact format's; answer tokens equal: positions "
        "where both answers agree over the longer one's length; accuracy: the normalised answer is the label."
    )


def formats_only(model, processor, image, label: str, args, started: float, load_start) -> None:
    """Section 5 alone, written as memory_formats.md / .json."""
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        format_rows = format_bytes(model, processor, work, image)
        fidelity_rows, fidelity_label = answer_fidelity(args, work)
    targets = format_targets(format_rows, fidelity_rows)
    load_end = os.getloadavg()
    seconds = time.perf_counter() - started
    header = (
        f"### memory: context formats\n\nMachine: {machine()}; bytes: model {label}, dtype {args.dtype}; lancedb "
        f"{lancedb.__version__}. Load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/"
        f"{load_start[2]:.2f}, at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; whole run {seconds:.0f} s."
        "\n\n"
    )
    target_rows = [
        {"target": t["what"], "goal": t["target"], "measured": t["measured"], "status": t["met"]} for t in targets
    ]
    text = header + section("Targets", target_rows, "")
    text += section("5a. Context formats: bytes per item", format_rows, FORMAT_BYTES_NOTE)
    text += section("5b. Context formats: answer fidelity", fidelity_rows, fidelity_note(fidelity_label))
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomically(os.path.join(args.output_dir, "memory_formats.md"), text)
    payload = {
        "name": "memory_formats",
        "machine": machine(),
        "model": label,
        "args": vars(args),
        "seconds": seconds,
        "targets": targets,
        "context_formats": {"bytes": format_rows, "fidelity": fidelity_rows, "fidelity_model": fidelity_label},
        "notes": {"bytes": FORMAT_BYTES_NOTE, "fidelity": fidelity_note(fidelity_label)},
    }
    path = os.path.join(args.output_dir, "memory_formats.json")
    write_json_atomically(path, json.loads(json.dumps(payload, default=str)))
    missed = [t["what"] for t in targets if t["met"] != "met"]
    print("Targets missed: " + "; ".join(missed) if missed else "Every target met.")


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], backbone=True)
    parser.set_defaults(dtype="bfloat16")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="the parts to run")
    parser.add_argument(
        "--full-size", action=argparse.BooleanOptionalAction, default=None, help="real MLP and vision tower"
    )
    parser.add_argument("--image-tokens", type=int, nargs="+", default=list(IMAGE_TOKENS))
    parser.add_argument("--image-repeats", type=int, default=None, help="timed generate calls from the image")
    parser.add_argument("--stored-repeats", type=int, default=10, help="timed answers from a stored context")
    parser.add_argument("--index-items", type=int, default=None)
    parser.add_argument("--index-repeats", type=int, default=None)
    parser.add_argument("--search-rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=50, help="search queries per table size")
    parser.add_argument("--work-dir", default=None, help="where the memories are written (default: a temporary folder)")
    parser.add_argument(
        "--fidelity-model",
        default="outputs/main/model" if os.path.isdir("outputs/main/model") else None,
        help="the trained CREM folder for the answer fidelity of quantised contexts (default: the main job's, if any; "
        "else a tiny random-init model)",
    )
    parser.add_argument("--fidelity-data", default="outputs/main/data", help="the main job's data folder (held-out QA)")
    parser.add_argument("--fidelity-items", type=int, default=64, help="noise images when no trained model is given")
    parser.add_argument("--fidelity-batch", type=int, default=32)
    parser.add_argument("--formats-only", action="store_true", help="run section 5 (context formats) alone")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.full_size = cuda if args.full_size is None else args.full_size
    args.image_repeats = args.image_repeats or (3 if cuda else 1)
    args.index_items = args.index_items or (64 if cuda else 16)
    args.index_repeats = args.index_repeats or (3 if cuda else 2)
    if 1280 not in args.image_tokens:
        raise SystemExit("--image-tokens must include 1280 (the size the targets are set at).")
    load_start = os.getloadavg()
    started = time.perf_counter()

    if "first_token" in args.sections and "bytes" not in args.sections:
        raise SystemExit("--sections first_token needs bytes too (it answers from the memory that part writes).")

    if args.formats_only:
        args.image_tokens = [1280]
    model, processor, label = build_published(args)
    text, shape = model.config.text_config, geometry(args.backbone)
    built = (text.num_hidden_layers, text.num_key_value_heads, getattr(text, "head_dim", None) or shape["head_dim"])
    if built != (shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]):
        raise SystemExit(f"The model's KV geometry {built} is not {shape['model']}'s: the benchmark is misbuilt.")
    images = {n: image_with_tokens(processor, n, seed=n) for n in args.image_tokens}
    if args.formats_only:
        formats_only(model, processor, images[1280], label, args, started, load_start)
        return
    run = set(args.sections)
    format_rows, fidelity_rows, fidelity_label = [], [], ""
    bytes_rows, bytes_extra, token_rows, index_row, search_rows = [], {}, [], {}, []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        if "bytes" in run:
            bytes_rows, memory, bytes_extra = stored_bytes(model, processor, work, images)
        if "first_token" in run:
            token_rows = first_token(model, processor, memory, images, args)
        if "indexing" in run:
            index_row = indexing_cost(model, processor, work, args)
        if "search" in run:
            search_rows = search_latency(model, processor, work, args)
        if "formats" in run:
            format_rows = format_bytes(model, processor, work, images[1280])
            fidelity_rows, fidelity_label = answer_fidelity(args, work)
    seconds = time.perf_counter() - started
    load_end = os.getloadavg()

    targets = []
    if "bytes" in run:
        at = {row["image tokens"]: row for row in bytes_rows}[1280]
        full_ratio, info_ratio = at["full / item (on disk)"], at["full / item (info)"]
        targets.append(
            target(
                "memory item / full KV cache, on disk, 1280 image tokens",
                f"<= 1/{TARGETS['bytes']:g}",
                f"1/{full_ratio:.1f} (info(): 1/{info_ratio:.1f})",
                full_ratio >= TARGETS["bytes"],
            )
        )
    if "first_token" in run:
        first = {row["image tokens"]: row for row in token_rows}[1280]
        by_compressed, by_native = first["compress=True / stored"], first["native / stored"]
        targets += [
            target(
                "first token from the image, generate(compress=True) / stored context, 1280",
                f">= {TARGETS['first_token']:g}x",
                f"{by_compressed:.1f}x",
                by_compressed >= TARGETS["first_token"],
            ),
            target(
                "first token from the image, native generate / stored context, 1280",
                f">= {TARGETS['first_token']:g}x",
                f"{by_native:.1f}x",
                by_native >= TARGETS["first_token"],
            ),
        ]
    if "indexing" in run:
        wall_ratio, cpu_ratio = index_row["add / get_embedding (wall)"], index_row["add / get_embedding (CPU)"]
        targets.append(
            target(
                "indexing, add / get_embedding (wall)",
                f"<= {TARGETS['indexing']:g}x",
                f"{wall_ratio:.3f}x (CPU time: {cpu_ratio:.3f}x)",
                wall_ratio <= TARGETS["indexing"],
            )
        )
    if "formats" in run:
        targets += format_targets(format_rows, fidelity_rows)

    header = (
        f"### memory\n\nMachine: {machine()}; dtype {args.dtype}; attention {args.attn}; model: {label}; "
        f"lancedb {lancedb.__version__}. Load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/"
        f"{load_start[2]:.2f}, at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; whole run {seconds:.0f} s."
        "\n\n"
    )
    shape = geometry(args.backbone)
    geometry_note = (
        f"Backbone {args.backbone}: {shape['model']}'s KV geometry (its config.json), {shape['num_layers']} layers x "
        f"{shape['num_kv_heads']} key/value heads x {shape['head_dim']} = {shape['kv_bytes_per_slot']:,} bytes per "
        "cached token in bf16. "
    )
    # Notes of the parts not run are left out of the report (their figures are placeholders here).
    bytes_extra = bytes_extra or dict.fromkeys(
        ("rows", "stored_context_bytes_computed", "vector_bytes", "shared_prefix_slots", "shared_prefix_bytes"), 0
    )
    stored_chorus = bytes_rows[0]["stored slots"] if bytes_rows else 0
    slot_note = geometry_note + (
        f"The memory holds {bytes_extra['rows']} items (one per size, written by `CREMMemory.add`); an item stores "
        f"{stored_chorus} chorus slots ({bytes_extra['stored_context_bytes_computed']:,} bytes of keys/"
        f"values) and its {bytes_extra['vector_bytes']:,}-byte embedding, plus ids, positions and a checksum; the "
        f"shared prefix ({bytes_extra['shared_prefix_slots']} slots, {bytes_extra['shared_prefix_bytes']:,} bytes in "
        "the meta table) is stored once per memory. The full KV cache is every slot of the same item's prompt "
        "(prefix, image, instruction, chorus block), from an uncompressed prefill, written as one row of the same "
        "schema in its own LanceDB table. On disk: the apparent size of every file of the table's folder (data, "
        "manifests, transactions) per row; info(): LanceDB's table statistics per row; memory folder: the whole "
        "memory (both tables) per row."
    )
    stored_slots = bytes_extra["shared_prefix_slots"] + stored_chorus
    token_note = (
        f"Time to the first answer token (`max_new_tokens=1`, greedy, question '{QUESTION}'), each path including its "
        "input processing: from a stored context = `memory.answer_ids` (reading the context from LanceDB, the "
        f"follow-up prompt, the question run over the {stored_slots} stored slots); from the image = the image "
        "processed and prefilled with the question (`generate`, native or `compress=True`). The floor is `generate` "
        "from a text prompt as long as the follow-up turn (no cache, no memory read, no image): the fixed cost of one "
        "`generate` call running as many tokens as the stored path does, which that path cannot beat. Medians of "
        f"{args.stored_repeats} (stored, floor) and {args.image_repeats} (from the image) timed calls"
        + (", after one warm-up call per path." if cuda else ", every path warmed up once at the smallest size.")
    )
    index_note = (
        f"{args.index_items} noise images of {INDEX_IMAGE_TOKENS} tokens in batches of {INDEX_BATCH}, each side "
        f"run {args.index_repeats} times in rotating order (medians): `add` into a fresh memory each time "
        "(processing, one compressed forward per batch giving embedding and context, serialisation, checksums, one "
        "LanceDB commit per batch); `get_embedding` on the same batches (processing and forward); and, to split "
        "`add`, `compress(return_embeddings=True)` alone on the same batches (its model share; storing = the rest, "
        "a negative value being within the noise). CPU seconds: this process's, all threads (LanceDB's included)."
    )
    search_note = (
        f"Synthetic unit vectors ({model.config.text_config.hidden_size} dims; {CLUSTERS} Gaussian clusters, noise as "
        "large as the centres) written straight into a memory's items table with 16-byte placeholder contexts; "
        f"{args.queries} queries from the same distribution, k=10, through `CREMMemory.search_vector` (which also "
        "counts the rows); one warm-up query. The approximate index is `build_ann_index()` (IVF-PQ, cosine, "
        "sqrt(rows) partitions, 16-dim sub-vectors) with LanceDB's default search settings; recall@10 is its top 10 "
        "against the exact scan's. LanceDB trains at most rows / 256 partitions (at 10k: 39 of the 100 asked for; it "
        "says so on stderr)."
    )
    target_rows = [
        {"target": t["what"], "goal": t["target"], "measured": t["measured"], "status": t["met"]} for t in targets
    ]
    text = header + section("Targets", target_rows, "")
    parts = {
        "bytes": ("1. Stored bytes per item vs the full KV cache", bytes_rows, slot_note),
        "first_token": ("2. Time to the first answer token", token_rows, token_note),
        "indexing": ("3. Indexing cost", [index_row], index_note),
        "search": ("4. Search latency", search_rows, search_note),
    }
    for part in SECTIONS:
        if part in run and part != "formats":
            text += section(*parts[part])
    if "formats" in run:
        text += section("5a. Context formats: bytes per item", format_rows, FORMAT_BYTES_NOTE)
        text += section("5b. Context formats: answer fidelity", fidelity_rows, fidelity_note(fidelity_label))
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomically(os.path.join(args.output_dir, "memory.md"), text)
    payload = {
        "name": "memory",
        "machine": machine(),
        "model": label,
        "args": vars(args),
        "lancedb": lancedb.__version__,
        "load_average": {"start": load_start, "end": load_end},
        "seconds": seconds,
        "targets": targets,
        "stored_bytes": {"rows": bytes_rows, **bytes_extra},
        "first_token": token_rows,
        "indexing": index_row,
        "search": search_rows,
        "context_formats": {"bytes": format_rows, "fidelity": fidelity_rows, "fidelity_model": fidelity_label},
        "notes": {"bytes": slot_note, "first_token": token_note, "indexing": index_note, "search": search_note},
    }
    write_json_atomically(os.path.join(args.output_dir, "memory.json"), json.loads(json.dumps(payload, default=str)))
    if bytes_rows and token_rows:
        plot(os.path.join(args.output_dir, "memory.png"), bytes_rows, token_rows)
    missed = [t["what"] for t in targets if t["met"] != "met"]
    print("Targets missed: " + "; ".join(missed) if missed else "Every target met.")


if __name__ == "__main__":
    main()
