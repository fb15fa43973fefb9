"""The main job's memory stage: index the held-out scans (single and pairs) into a visual memory, search it with text
queries, answer from the stored contexts, and measure what the memory costs and saves.

* retrieval: "the digit seven" -> is the top hit a single scan of a seven? Each pair caption ("five left of six")
  -> is the top hit a pair with that caption? Then the same after `rerank` of the top 5 (an experiment).
* answers: every stored item is asked its question from its stored context; the accuracy must equal the compressed
  QA accuracy of the same items (`evaluate_generation(compress=True)`), answer for answer.
* costs: bytes per item on disk vs the item's full KV cache; time to the first answer token from a stored context vs
  `generate` from the image (native and compressed), on the same items.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch

from ..evaluation import load_caption_rows
from ..evaluation.generation import evaluate_generation, normalize_answer
from ..memory import CREMMemory
from .digits import LEFT_QUESTION, QUESTION, WORDS, label

__all__ = ["memory_stage"]

#: Hits `rerank` reorders per caption query.
RERANK_DEPTH = 5
#: Items timed for the time to the first token (one batch).
TIMED_ITEMS = 32


def _fresh_memory(path: str, model, processor) -> CREMMemory:
    """A new memory at `path`: the previous run's memory (another model) is removed, nothing else is."""
    if os.path.exists(path):
        CREMMemory.describe(path)  # refuses to delete a folder that is not a memory
        shutil.rmtree(path)
    return CREMMemory.open(path, model, processor, create=True)


def _answers(memory: CREMMemory, question: str, ids: list[str], batch_size: int) -> list[str]:
    answers = []
    for start in range(0, len(ids), batch_size):
        answers += memory.ask(question, ids[start : start + batch_size], max_new_tokens=16)
    return answers


def _seconds(function, repeats: int = 3) -> float:
    """The best of `repeats` runs (after one warm-up run)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def _costs(memory: CREMMemory, model, processor, rows: list[dict], ids: list[str]) -> dict[str, float]:
    """Bytes per item vs the full KV cache of the same items, and the time to the first token, three ways."""
    info = memory.info()
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    bytes_per_slot = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * model.dtype.itemsize
    prompt = processor.process_embedding_inputs(images=[row["image"] for row in rows])
    full_bytes = float(prompt["attention_mask"].sum(1).float().mean()) * bytes_per_slot
    questions = [QUESTION] * len(rows)
    inputs = processor.process_generation_inputs(questions=questions, images=[row["image"] for row in rows])
    with torch.inference_mode():
        stored = _seconds(lambda: memory.answer_ids(QUESTION, ids, max_new_tokens=1))
        compressed = _seconds(lambda: model.generate(**inputs, compress=True, max_new_tokens=1, do_sample=False))
        native = _seconds(lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False))
    return {
        "bytes per item (disk)": info["bytes_per_item"],
        "full KV bytes per item": full_bytes,
        "full KV / stored bytes": full_bytes / info["bytes_per_item"],
        "TTFT stored context (s)": stored,
        "TTFT compress=True from image (s)": compressed,
        "TTFT native from image (s)": native,
        "TTFT speed-up vs compress=True": compressed / stored,
        "TTFT speed-up vs native": native / stored,
        "timed items": len(ids),
    }


def memory_stage(model, processor, data, folder: str, batch_size: int) -> dict[str, Any]:
    """
    Index, search, ask and rerank on the held-out digits with the trained `model`; the memory is written to
    `folder/memory`. Returns the metrics (fractions in [0, 1], bytes, seconds) and whether the answers from stored
    contexts equal the compressed QA answers.
    """
    model.eval()
    started = time.perf_counter()
    singles = load_caption_rows(data.qa_single, ("question", "answer"), data.folder)
    pairs = load_caption_rows(data.captions, ("captions",), data.folder)
    pair_questions = load_caption_rows(data.qa_pairs, ("question", "answer"), data.folder)
    memory = _fresh_memory(os.path.join(folder, "memory"), model, processor)
    # One item per QA row (a pair image may occur twice among the rows): ids by row.
    single_ids = [f"single-{i:03d}" for i in range(len(singles))]
    pair_ids = [f"pair-{i:03d}" for i in range(len(pairs))]
    report = memory.add(
        ids=single_ids + pair_ids,
        images=[row["image"] for row in singles + pairs],
        metadata=[{"digit": row["answer"]} for row in singles] + [{"caption": row["captions"][0]} for row in pairs],
        batch_size=batch_size,
    )
    if report.failed or report.added != len(single_ids) + len(pair_ids):
        raise RuntimeError(f"The memory stage could not index every held-out scan: {report}.")
    indexing_seconds = time.perf_counter() - started

    # Retrieval: one text query per digit over the whole memory (single scans and pairs).
    digit_of = {item: row["answer"] for item, row in zip(single_ids, singles, strict=True)}
    queries = [label(d) for d in range(len(WORDS))]
    top = [hits[0] for hits in memory.search_many(texts=queries, k=1)]
    digit_hits = [digit_of.get(hit.id) == WORDS[d] for d, hit in enumerate(top)]
    # Ask the top hit of each digit query which digit it shows, from its stored context.
    top_answers = memory.ask(QUESTION, top, max_new_tokens=16)
    end_to_end = [normalize_answer(a) == WORDS[d] for d, a in enumerate(top_answers)]

    # Pair captions: R@1, then R@1 after the model's own yes/no rerank of the top hits.
    caption_of = {item: row["captions"][0] for item, row in zip(pair_ids, pairs, strict=True)}
    captions = sorted(set(caption_of.values()))
    searched = memory.search_many(texts=captions, k=RERANK_DEPTH)
    caption_r1 = [caption_of.get(hits[0].id) == text for text, hits in zip(captions, searched, strict=True)]
    reranked = [memory.rerank(text, hits)[0] for text, hits in zip(captions, searched, strict=True)]
    rerank_r1 = [caption_of.get(hit.id) == text for text, hit in zip(captions, reranked, strict=True)]

    # Answers from stored contexts vs compressed generation from the images, item for item.
    stored_single = _answers(memory, QUESTION, single_ids, batch_size)
    stored_pairs = _answers(memory, LEFT_QUESTION, pair_ids, batch_size)
    compressed_single = evaluate_generation(model, processor, singles, compress=True, batch_size=batch_size)
    compressed_pairs = evaluate_generation(model, processor, pair_questions, compress=True, batch_size=batch_size)

    def accuracy(answers: list[str], rows: list[dict]) -> float:
        return sum(
            normalize_answer(a) == normalize_answer(r["answer"]) for a, r in zip(answers, rows, strict=True)
        ) / len(rows)

    same = [
        normalize_answer(a) == normalize_answer(b)
        for a, b in zip(
            stored_single + stored_pairs,
            compressed_single["predictions"] + compressed_pairs["predictions"],
            strict=True,
        )
    ]
    results = {
        "items": len(memory),
        "indexing seconds": round(indexing_seconds, 2),
        "digit query R@1": sum(digit_hits) / len(digit_hits),
        "digit query top-hit answer accuracy": sum(end_to_end) / len(end_to_end),
        "caption query R@1": sum(caption_r1) / len(caption_r1),
        f"caption query R@1 after rerank@{RERANK_DEPTH}": sum(rerank_r1) / len(rerank_r1),
        "QA single from stored contexts": accuracy(stored_single, singles),
        "QA single compressed": compressed_single["accuracy"],
        "QA pairs from stored contexts": accuracy(stored_pairs, pair_questions),
        "QA pairs compressed": compressed_pairs["accuracy"],
        "stored answers equal compressed answers": all(same),
        "stored answers differing": len(same) - sum(same),
    }
    results.update(_costs(memory, model, processor, singles[:TIMED_ITEMS], single_ids[:TIMED_ITEMS]))
    return results
