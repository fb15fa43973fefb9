"""The main job's memory stage: index the held-out scans (single and pairs) into a visual memory, search it with text
queries, answer from the stored contexts, and measure what the memory costs and saves.

* retrieval: "the digit seven" -> is the top hit a single scan of a seven? Each pair caption ("five left of six")
  -> is the top hit a pair with that caption? Then the same after `rerank` of the top 5 (an experiment).
* answers: every stored item is asked its question from its stored context; the accuracy must equal the compressed
  QA accuracy of the same items (`evaluate_generation(compress=True)`), answer for answer.
* costs: bytes per item on disk vs the item's full KV cache; time to the first answer token from a stored context vs
  `generate` from the image (native and compressed), on the same items.

`search_format_stage` then indexes the same items into memories that search int8 / binary vectors (and float32 at
each trained Matryoshka dim) with exact re-scoring, and measures the same two R@1.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..encoding import encode
from ..evaluation import load_caption_rows
from ..evaluation.generation import evaluate_generation, normalize_answer
from ..instructions import T2I_INSTRUCTION
from ..memory import CREMMemory
from ..memory.search_formats import VECTOR_FORMATS, trained_dims
from ..memory.store import REFINE_FACTOR
from .digits import LEFT_QUESTION, QUESTION, WORDS, label

__all__ = ["SCORE_TOLERANCE", "memory_stage", "search_format_stage"]

#: Hits `rerank` reorders per caption query.
RERANK_DEPTH = 5
#: Items timed for the time to the first token (one batch).
TIMED_ITEMS = 32
#: Largest allowed difference of a returned score and the exact cosine (float32 rounding and batch composition).
SCORE_TOLERANCE = 1e-4


def _fresh_memory(path: str, model, processor, **layout) -> CREMMemory:
    """A new memory at `path` (search `layout`: `CREMMemory.open`'s vector options): the previous run's memory
    (another model) is removed, nothing else is."""
    if os.path.exists(path):
        CREMMemory.describe(path)  # refuses to delete a folder that is not a memory
        shutil.rmtree(path)
    return CREMMemory.open(path, model, processor, create=True, **layout)


@dataclass
class Queries:
    """Text queries of the memory and, per query, the ids of the items that answer it."""

    texts: list[str]
    relevant: list[set[str]]

    def recall_at_1(self, top_ids: list[str]) -> float:
        """The fraction of queries whose top hit `top_ids[i]` answers it."""
        return sum(hit in relevant for hit, relevant in zip(top_ids, self.relevant, strict=True)) / len(self.texts)


@dataclass
class HeldOut:
    """The held-out items a memory stage indexes: one per QA single row (a scan) and one per caption row (a pair)."""

    singles: list[dict]
    pairs: list[dict]

    @classmethod
    def load(cls, data) -> HeldOut:
        singles = load_caption_rows(data.qa_single, ("question", "answer"), data.folder)
        return cls(singles, load_caption_rows(data.captions, ("captions",), data.folder))

    @property
    def single_ids(self) -> list[str]:
        return [f"single-{i:03d}" for i in range(len(self.singles))]

    @property
    def pair_ids(self) -> list[str]:
        return [f"pair-{i:03d}" for i in range(len(self.pairs))]

    @property
    def images(self) -> list:
        return [row["image"] for row in self.singles + self.pairs]

    def index(self, memory: CREMMemory, batch_size: int) -> None:
        """Add every item to `memory`; a RuntimeError if one could not be added."""
        ids = self.single_ids + self.pair_ids
        metadata = [{"digit": r["answer"]} for r in self.singles] + [{"caption": r["captions"][0]} for r in self.pairs]
        report = memory.add(ids=ids, images=self.images, metadata=metadata, batch_size=batch_size)
        if report.failed or report.added != len(ids):
            raise RuntimeError(f"The memory stage could not index every held-out scan: {report}.")

    def queries(self) -> dict[str, Queries]:
        """`digit query`: "the digit seven" -> any single scan of a seven; `caption query`: each pair caption ("five
        left of six") -> any pair with that caption."""
        digits = [
            {item for item, row in zip(self.single_ids, self.singles, strict=True) if row["answer"] == word}
            for word in WORDS
        ]
        caption_of = {item: row["captions"][0] for item, row in zip(self.pair_ids, self.pairs, strict=True)}
        captions = sorted(set(caption_of.values()))
        return {
            "digit query": Queries([label(d) for d in range(len(WORDS))], digits),
            "caption query": Queries(captions, [{i for i, c in caption_of.items() if c == t} for t in captions]),
        }


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
    held = HeldOut.load(data)
    singles, single_ids, pair_ids = held.singles, held.single_ids, held.pair_ids
    pair_questions = load_caption_rows(data.qa_pairs, ("question", "answer"), data.folder)
    memory = _fresh_memory(os.path.join(folder, "memory"), model, processor)
    held.index(memory, batch_size)
    indexing_seconds = time.perf_counter() - started
    queries = held.queries()

    # Retrieval: one text query per digit over the whole memory (single scans and pairs).
    digits = queries["digit query"]
    top = [hits[0] for hits in memory.search_many(texts=digits.texts, k=1)]
    # Ask the top hit of each digit query which digit it shows, from its stored context.
    top_answers = memory.ask(QUESTION, top, max_new_tokens=16)
    end_to_end = [normalize_answer(a) == WORDS[d] for d, a in enumerate(top_answers)]

    # Pair captions: R@1, then R@1 after the model's own yes/no rerank of the top hits.
    captions = queries["caption query"]
    searched = memory.search_many(texts=captions.texts, k=RERANK_DEPTH)
    reranked = [memory.rerank(text, hits)[0] for text, hits in zip(captions.texts, searched, strict=True)]

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
        "digit query R@1": digits.recall_at_1([hit.id for hit in top]),
        "digit query top-hit answer accuracy": sum(end_to_end) / len(end_to_end),
        "caption query R@1": captions.recall_at_1([hits[0].id for hits in searched]),
        f"caption query R@1 after rerank@{RERANK_DEPTH}": captions.recall_at_1([hit.id for hit in reranked]),
        "QA single from stored contexts": accuracy(stored_single, singles),
        "QA single compressed": compressed_single["accuracy"],
        "QA pairs from stored contexts": accuracy(stored_pairs, pair_questions),
        "QA pairs compressed": compressed_pairs["accuracy"],
        "stored answers equal compressed answers": all(same),
        "stored answers differing": len(same) - sum(same),
    }
    results.update(_costs(memory, model, processor, singles[:TIMED_ITEMS], single_ids[:TIMED_ITEMS]))
    return results


def search_format_stage(model, processor, data, folder: str, batch_size: int) -> dict[str, Any]:
    """
    R@1 of the digit and caption queries (as in `memory_stage`) when a memory searches its vectors in another
    format: `int8` and `binary` at the full size, and `float32`, `int8` and `binary` at each trained Matryoshka dim
    below it (`config.matryoshka_dims`; `binary` where the dim is a multiple of 8). One memory per layout, under
    `folder/search_formats/`. Each memory but a float32 one gets its ANN index with one partition, so that the
    candidates come from the quantised codes of every item (the format's loss, not the IVF's), and the top
    `REFINE_FACTOR` x k are re-scored exactly from the stored float32 vectors. Every returned score is checked
    against the exact cosine of `get_embedding(dim=...)` of the query and of the item (another path than the
    memory's truncation): a RuntimeError if one differs by more than `SCORE_TOLERANCE`.

    Returns:
        `{"rescore factor", "max |score - exact cosine|", "layouts": {"<format> at dim <D>": {"<query> R@1": ...}}}`.
    """
    model.eval()
    held = HeldOut.load(data)
    queries = held.queries()
    hidden = model.config.text_config.hidden_size
    layouts = [
        (fmt, dim)
        for dim in reversed(trained_dims(model.config, hidden))
        for fmt in VECTOR_FORMATS
        if (fmt != "float32" or dim < hidden) and (fmt != "binary" or dim % 8 == 0)
    ]
    ids = held.single_ids + held.pair_ids
    exact_items: dict[int, dict[str, torch.Tensor]] = {}
    exact_queries: dict[int, dict[str, torch.Tensor]] = {}
    query_vectors: dict[str, torch.Tensor] = {}
    results: dict[str, dict[str, float]] = {}
    worst = 0.0
    for fmt, dim in layouts:
        path = os.path.join(folder, "search_formats", f"{fmt}-{dim}")
        memory = _fresh_memory(path, model, processor, vector_format=fmt, vector_dim=dim)
        held.index(memory, batch_size)
        if fmt != "float32":
            memory.build_ann_index(num_partitions=1)
        if dim not in exact_items:  # the oracle: the model's own embeddings at `dim`
            encoded = encode(model, processor, images=held.images, batch_size=batch_size, dim=dim)
            exact_items[dim] = dict(zip(ids, encoded, strict=True))
            exact_queries[dim] = {
                name: encode(model, processor, texts=q.texts, instruction=T2I_INSTRUCTION, dim=dim)
                for name, q in queries.items()
            }
        row = {}
        for name, q in queries.items():
            if name not in query_vectors:  # what `search_many` embeds
                query_vectors[name] = memory.embed_queries(q.texts)
            hits = [memory.search_vector(vector, k=1)[0] for vector in query_vectors[name]]
            exact = torch.stack([exact_items[dim][hit.id] for hit in hits]).mul(exact_queries[dim][name]).sum(-1)
            deviation = (torch.tensor([hit.score for hit in hits]) - exact).abs().max().item()
            if deviation > SCORE_TOLERANCE:
                raise RuntimeError(f"{fmt} search at dim {dim}: a score is {deviation:.2g} off the exact cosine.")
            worst = max(worst, deviation)
            row[f"{name} R@1"] = q.recall_at_1([hit.id for hit in hits])
        results[f"{fmt} at dim {dim}"] = row
    return {"rescore factor": REFINE_FACTOR, "max |score - exact cosine|": worst, "layouts": results}
