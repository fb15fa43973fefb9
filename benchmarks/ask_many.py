"""Compress once, ask K questions, vs K full compressed prompts (K = 1, 8).

`model.compress` runs the image and input text once and keeps only the kept slots; `generate(context=...)` answers
every question from that context. The alternative runs the whole prompt, image included, for every question.
Run: python benchmarks/ask_many.py
"""

from __future__ import annotations

import torch
from common import arguments, build, image_with_tokens, median_seconds, report

QUESTIONS = [
    "What is in the image?",
    "Which colour dominates?",
    "Is there any text?",
    "How many objects are there?",
    "Describe the image.",
    "What is on the left?",
    "What is on the right?",
    "Is it a photo?",
]
IMAGE_TOKENS = 1024
NEW_TOKENS = 8


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    model, processor = build(256, 4, False, IMAGE_TOKENS, args)
    image = image_with_tokens(processor, IMAGE_TOKENS)
    options = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
    rows = []
    for k in (1, 8):
        questions = QUESTIONS[:k]

        def once_then_ask(questions=questions):
            with torch.no_grad():
                context = model.compress(**processor.process_embedding_inputs(images=[image]).to(args.device))
                followups = processor.process_followups(questions=questions).to(args.device)
                return model.generate(context=context, **followups, **options)

        def full_prompts(questions=questions, k=k):
            batch = processor.process_generation_inputs(questions=questions, images=[image] * k).to(args.device)
            with torch.no_grad():
                return model.generate(**batch, compress=True, **options)

        once = median_seconds(once_then_ask, args.repeats, args.device)
        full = median_seconds(full_prompts, args.repeats, args.device)
        rows.append(
            {"questions": k, "compress once + ask (s)": once, "full prompts (s)": full, "speed-up": full / once}
        )
        print(rows[-1], flush=True)
    notes = f"{IMAGE_TOKENS} image tokens, {NEW_TOKENS} new tokens per answer, LM h256 / 4 layers; includes processing."
    report("ask_many", args, rows, notes)


if __name__ == "__main__":
    main()
