"""Embeddings and compressed answers of fixed items, as one process of a launched job (torchrun, accelerate launch).

    accelerate launch --multi_gpu --num_processes 2 ... tests/distributed_encode.py MODEL DIGITS OUT.pt

Run without a launcher it is the one-process reference. Rank 0 saves the embeddings, the answers, the world size,
how many rows each process embedded, batch by batch (to show that the work was split), and the error each process
got from a gather with a duplicated index, to OUT.pt.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from crem_hf import encode
from crem_hf.evaluation import evaluate_generation
from crem_hf.loading import load_crem
from crem_hf.parallel import gather_objects, gather_rows, initialize_from_environment, rank, shutdown, world_size

#: 4 batches of 3 and one of 2 for the encoding: uneven shares (rank 0 gets 3 batches, rank 1 two).
BATCH_SIZE = 3
NUM_SCANS, NUM_QA = 8, 5


def items(digits: str) -> tuple[list, list]:
    """Texts alone, scans alone and scans with text, of different lengths and image sizes (single and pair scans)."""
    with open(os.path.join(digits, "eval", "qa_single.jsonl"), encoding="utf-8") as handle:
        singles = [os.path.join(digits, json.loads(line)["image"]) for line in handle][:NUM_SCANS]
    with open(os.path.join(digits, "eval", "qa_pairs.jsonl"), encoding="utf-8") as handle:
        pairs = [os.path.join(digits, json.loads(line)["image"]) for line in handle][:3]
    texts = ["the digit seven", "a scan", "two digits side by side, the left one larger"] + [None] * 6
    images = [None] * 3 + singles[:6]
    texts += ["which digit?", "zero", "a pair", None, None]
    images += singles[6:8] + pairs
    return texts, images


def qa_rows(digits: str) -> list[dict]:
    with open(os.path.join(digits, "eval", "qa_single.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][:NUM_QA]
    return [{**row, "image": os.path.join(digits, row["image"])} for row in rows]


def run(model_folder: str, digits: str, device: str = "cpu") -> dict:
    """This process's part of the job; every process returns the same embeddings and answers."""
    model, processor = load_crem(model_folder)
    model.to(device).eval()
    embedded_rows = []  # rows of each get_embedding call this process made
    get_embedding = model.get_embedding

    def counted(**inputs):
        embedded_rows.append(int(inputs["input_ids"].shape[0]))
        return get_embedding(**inputs)

    model.get_embedding = counted
    texts, images = items(digits)
    embeddings = encode(model, processor, images=images, texts=texts, batch_size=BATCH_SIZE, show_progress=False)
    answers = evaluate_generation(model, processor, qa_rows(digits), compress=True, batch_size=2, max_new_tokens=4)
    # Fewer batches than processes: rank 1 has no share and gives no rows.
    one_batch = encode(model, processor, images=images[:2], texts=texts[:2], batch_size=BATCH_SIZE, show_progress=False)
    # Every process gives row 0: each must raise the same error, and the group stay usable after it.
    try:
        gather_rows(torch.tensor([0]), torch.zeros(1, 2), world_size())
        duplicate_error = None
    except ValueError as error:
        duplicate_error = str(error)
    per_rank = gather_objects([rank()], [(embedded_rows, duplicate_error)], world_size())
    return {
        "embeddings": embeddings,
        "one_batch": one_batch,
        "predictions": answers["predictions"],
        "world": world_size(),
        "rows": [rows for rows, _ in per_rank],
        "duplicate_errors": [error for _, error in per_rank],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("digits")
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()
    torch.set_num_threads(1)
    initialize_from_environment()
    result = run(options.model, options.digits, options.device)
    if rank() == 0:
        torch.save(result, options.out)
    shutdown()


if __name__ == "__main__":
    main()
