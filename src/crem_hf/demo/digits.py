"""Offline CREM data from the 1,797 real handwritten digit scans that ship with scikit-learn.

Written as files in the forms the real pipeline reads: MMEB-train retrieval pairs, LLaVA conversations, MMEB-eval
subsets, QA rows, a caption set and a swap set. Single digits saturate quickly, so pairs of scans are also composed
side by side ("three left of seven"): harder retrieval, a question about one side, and a swap set whose swapped
caption must score lower. Train and evaluation are split by source scan: no scan appears on both sides.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..formats import LLAVA_IMAGE_PLACEHOLDER, MMEB_IMAGE_PLACEHOLDER
from ..instructions import CLASSIFY_INSTRUCTION, I2T_INSTRUCTION, T2I_INSTRUCTION, VQA_INSTRUCTION
from ..processing_crem import DEFAULT_IMAGE_INSTRUCTION, DEFAULT_SYSTEM_PROMPT

__all__ = ["DIGIT_REGISTRY", "DigitsData", "PROMPT_CORPUS", "WORDS", "build_digits_data"]

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION = "Which digit is shown?"
LEFT_QUESTION = "What is the left digit?"
RIGHT_QUESTION = "What is the right digit?"
#: One scan, upscaled from 8 x 8: 2 x 2 patches of 28 px, i.e. 4 merged image tokens; a pair is 4 x 2 patches.
SCAN_SIDE = 56
#: Share of the scans held out for evaluation.
TEST_SHARE = 0.2
#: Candidates per MMEB-style query (ground truth first), as in the 10-way digit classification.
NUM_CANDIDATES = 10
#: Meta-task and out-of-distribution flag of each evaluation subset (all in-distribution: same scans' source).
DIGIT_REGISTRY = {
    "digits_cls": ("Classification", False),
    "digits_vqa": ("VQA", False),
    "digits_t2i": ("Retrieval", False),
    "pairs_i2t": ("Retrieval", False),
    "pairs_t2i": ("Retrieval", False),
}
#: The words and phrases of every prompt, for a tokenizer that keeps them short.
PROMPT_CORPUS = [
    DEFAULT_SYSTEM_PROMPT,
    "system\n",
    "user\n",
    "assistant\n",
    CLASSIFY_INSTRUCTION,
    VQA_INSTRUCTION,
    QUESTION,
    LEFT_QUESTION,
    RIGHT_QUESTION,
    T2I_INSTRUCTION,
    I2T_INSTRUCTION,
    DEFAULT_IMAGE_INSTRUCTION,
    "the digit",
    "left of",
    *WORDS,
    *[" " + word for word in WORDS],
]


def label(digit: int) -> str:
    """The class text of a digit. A phrase, not a bare word: after stage 1 a bare answer word right after the user
    header carries almost no information into the chorus block of the tiny model, and label embeddings collapse."""
    return f"the digit {WORDS[digit]}"


def caption(left: int, right: int) -> str:
    return f"{WORDS[left]} left of {WORDS[right]}"


@dataclass
class DigitsData:
    """Paths of the written data (all under `folder`)."""

    folder: str
    train_retrieval: list[str]  # one MMEB-train file per task, as MMEB-train ships its subsets
    train_conversations: str
    eval_folder: str
    qa_single: str
    qa_pairs: str
    swap: str
    captions: str

    @property
    def subsets(self) -> list[str]:
        return list(DIGIT_REGISTRY)


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def _train_pair(query: str, query_image: str, positive: str, positive_image: str = "") -> dict:
    """One MMEB-train row."""
    return {"qry": query, "qry_image_path": query_image, "pos_text": positive, "pos_image_path": positive_image}


def _eval_row(query: str, query_image: str, texts: list[str], images: list[str] | None = None) -> dict:
    """One MMEB-eval row (ground truth first)."""
    images = images if images is not None else [""] * len(texts)
    texts = texts if len(texts) == len(images) else texts * len(images)
    return {"qry_text": query, "qry_img_path": query_image, "tgt_text": texts, "tgt_img_path": images}


def _conversation(name: str, image: str, turns: list[str]) -> dict:
    """One LLaVA row: alternating human / gpt turns, the image placeholder in the first."""
    turns = [f"{LLAVA_IMAGE_PLACEHOLDER}\n{turns[0]}", *turns[1:]]
    messages = [{"from": "gpt" if i % 2 else "human", "value": text} for i, text in enumerate(turns)]
    return {"id": name, "image": image, "conversations": messages}


def _scan_image(pixels: np.ndarray) -> Image.Image:
    grey = (pixels / 16 * 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB").resize((SCAN_SIDE, SCAN_SIDE), Image.BILINEAR)


class _Writer:
    """Writes scan and pair images once, returning their paths relative to the data folder."""

    def __init__(self, folder: str, images: np.ndarray):
        self.folder, self.images = folder, images
        os.makedirs(os.path.join(folder, "images"), exist_ok=True)

    def scan(self, index: int) -> str:
        path = f"images/scan_{index:04d}.png"
        if not os.path.exists(os.path.join(self.folder, path)):
            _scan_image(self.images[index]).save(os.path.join(self.folder, path))
        return path

    def pair(self, left: int, right: int) -> str:
        path = f"images/pair_{left:04d}_{right:04d}.png"
        if not os.path.exists(os.path.join(self.folder, path)):
            canvas = Image.new("RGB", (2 * SCAN_SIDE, SCAN_SIDE))
            canvas.paste(_scan_image(self.images[left]), (0, 0))
            canvas.paste(_scan_image(self.images[right]), (SCAN_SIDE, 0))
            canvas.save(os.path.join(self.folder, path))
        return path


def _pairs(indices: list[int], labels: np.ndarray, count: int, rng: random.Random) -> list[tuple[int, int]]:
    """`count` ordered pairs of scans from `indices` showing different digits."""
    pairs = []
    while len(pairs) < count:
        left, right = rng.sample(indices, 2)
        if labels[left] != labels[right]:
            pairs.append((left, right))
    return pairs


def _others(correct: str, pool: list[str], rng: random.Random) -> list[str]:
    """`correct` followed by NUM_CANDIDATES - 1 distinct other entries of `pool`."""
    return [correct] + rng.sample([p for p in dict.fromkeys(pool) if p != correct], NUM_CANDIDATES - 1)


def build_digits_data(folder: str | os.PathLike, seed: int = 0) -> DigitsData:
    """Write the training and evaluation files under `folder` (deterministic for a seed) and return their paths."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    folder = os.fspath(folder)
    digits = load_digits()
    labels = digits.target
    train, test = train_test_split(np.arange(len(labels)), test_size=TEST_SHARE, random_state=seed, stratify=labels)
    train, test = sorted(train.tolist()), sorted(test.tolist())
    rng = random.Random(seed)
    writer = _Writer(folder, digits.images)
    image = MMEB_IMAGE_PLACEHOLDER + "\n"

    # ---- training: retrieval pairs (MMEB-train form) and conversations (LLaVA form), train scans only
    retrieval: dict[str, list[dict]] = {name: [] for name in DIGIT_REGISTRY}
    conversations = []
    for index in train:
        word, path = WORDS[labels[index]], writer.scan(index)
        text = label(labels[index])
        retrieval["digits_cls"].append(_train_pair(image + CLASSIFY_INSTRUCTION, path, text))
        retrieval["digits_vqa"].append(_train_pair(f"{image}{VQA_INSTRUCTION} {QUESTION}", path, text))
        retrieval["digits_t2i"].append(
            _train_pair(f"{T2I_INSTRUCTION} {text}", "", image + DEFAULT_IMAGE_INSTRUCTION, path)
        )
        conversations.append(_conversation(f"scan-{index}", path, [QUESTION, word]))
    for left, right in _pairs(train, labels, len(train), rng):
        path, text = writer.pair(left, right), caption(labels[left], labels[right])
        retrieval["pairs_i2t"].append(_train_pair(image + I2T_INSTRUCTION, path, text))
        retrieval["pairs_t2i"].append(
            _train_pair(f"{T2I_INSTRUCTION} {text}", "", image + DEFAULT_IMAGE_INSTRUCTION, path)
        )
        turns = [LEFT_QUESTION, WORDS[labels[left]], RIGHT_QUESTION, WORDS[labels[right]]]
        conversations.append(_conversation(f"pair-{left}-{right}", path, turns))
    data = DigitsData(
        folder=folder,
        train_retrieval=[os.path.join(folder, "train", f"{name}.jsonl") for name in DIGIT_REGISTRY],
        train_conversations=os.path.join(folder, "train", "conversations.json"),
        eval_folder=os.path.join(folder, "eval"),
        qa_single=os.path.join(folder, "eval", "qa_single.jsonl"),
        qa_pairs=os.path.join(folder, "eval", "qa_pairs.jsonl"),
        swap=os.path.join(folder, "eval", "swap.jsonl"),
        captions=os.path.join(folder, "eval", "captions.jsonl"),
    )
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    for path, rows in zip(data.train_retrieval, retrieval.values(), strict=True):
        _write_jsonl(path, rows)
    with open(data.train_conversations, "w", encoding="utf-8") as handle:
        json.dump(conversations, handle)

    # ---- evaluation: test scans only
    os.makedirs(data.eval_folder, exist_ok=True)
    test_pairs = _pairs(test, labels, len(test), rng)
    by_digit = {d: [i for i in test if labels[i] == d] for d in range(len(WORDS))}
    cls, vqa, t2i, qa_single = [], [], [], []
    for index in test:
        digit, path = labels[index], writer.scan(index)
        candidates = _others(label(digit), [label(d) for d in range(len(WORDS))], rng)
        cls.append(_eval_row(image + CLASSIFY_INSTRUCTION, path, candidates))
        vqa.append(_eval_row(f"{image}{VQA_INSTRUCTION} {QUESTION}", path, candidates))
        other_digits = rng.sample([d for d in range(len(WORDS)) if d != digit], NUM_CANDIDATES - 1)
        images = [path] + [writer.scan(rng.choice(by_digit[d])) for d in other_digits]
        t2i.append(_eval_row(f"{T2I_INSTRUCTION} {label(digit)}", "", [image + DEFAULT_IMAGE_INSTRUCTION], images))
        qa_single.append({"image": path, "question": QUESTION, "answer": WORDS[digit]})
    pair_captions = [caption(labels[a], labels[b]) for a, b in test_pairs]
    pair_paths = [writer.pair(a, b) for a, b in test_pairs]
    i2t, pairs_t2i, qa_pairs, swap, captions = [], [], [], [], []
    for (left, right), path, text in zip(test_pairs, pair_paths, pair_captions, strict=True):
        swapped = caption(labels[right], labels[left])
        # The swapped caption / image is always among the candidates: the hardest distractor.
        distractors = list(dict.fromkeys(c for c in pair_captions if c not in (text, swapped)))
        i2t.append(
            _eval_row(image + I2T_INSTRUCTION, path, [text, swapped, *rng.sample(distractors, NUM_CANDIDATES - 2)])
        )
        others = [p for p, c in zip(pair_paths, pair_captions, strict=True) if c not in (text, swapped)]
        images = [path, writer.pair(right, left), *rng.sample(others, NUM_CANDIDATES - 2)]
        pairs_t2i.append(_eval_row(f"{T2I_INSTRUCTION} {text}", "", [image + DEFAULT_IMAGE_INSTRUCTION], images))
        qa_pairs.append({"image": path, "question": LEFT_QUESTION, "answer": WORDS[labels[left]]})
        swap.append({"image": path, "caption": text, "negative_caption": swapped})
        captions.append({"image": path, "captions": [text]})
    for name, rows in zip(DIGIT_REGISTRY, (cls, vqa, t2i, i2t, pairs_t2i), strict=True):
        _write_jsonl(os.path.join(data.eval_folder, f"{name}.jsonl"), rows)
    _write_jsonl(data.qa_single, qa_single)
    _write_jsonl(data.qa_pairs, qa_pairs)
    _write_jsonl(data.swap, swap)
    _write_jsonl(data.captions, captions)
    return data
