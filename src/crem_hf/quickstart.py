"""Quickstart on the embedded default: a tiny random CREM, offline, in seconds.

Shows the three things a CREM model does: embed images and texts into one space, search with those vectors, and
answer a question natively or from the compressed context (the chorus tokens alone), reporting how much of the
KV cache compression keeps. The weights are random, so the answers are gibberish; the shapes, the search mechanics
and the cache figures are real. Run: ``python -m crem_hf.quickstart``.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from .encoding import encode, similarity
from .io import ArgumentParser, positive_int, run_command
from .testing import make_tiny_crem, make_tiny_processor

__all__ = ["main", "run", "sample_images"]

# Images up to 448 x 448 px: 256 image tokens, the paper's lower bound, so the compressed cache is visibly small.
QUICKSTART_MAX_PIXELS = 448 * 448


def sample_images() -> dict[str, Image.Image]:
    """Real photos shipped with scikit-image when it is installed, else simple generated pictures."""
    try:
        from skimage import data

        return {
            "a cat": Image.fromarray(data.chelsea()),
            "a cup of coffee": Image.fromarray(data.coffee()),
            "a rocket": Image.fromarray(data.rocket()),
        }
    except ImportError:
        colours = {"a red square": (220, 30, 30), "a green square": (30, 200, 60), "a blue square": (40, 60, 220)}
        return {name: Image.new("RGB", (112, 112), colour) for name, colour in colours.items()}


def main(argv: list[str] | None = None) -> int:
    """The `crem-quickstart` command: exit status 0 on success, 1 with a one-line reason on stderr (2: bad usage)."""
    parser = ArgumentParser(prog="crem-quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    args = parser.parse_args(argv)
    return run_command("crem-quickstart", lambda: run(args))


def run(args: argparse.Namespace) -> None:
    """Build the tiny model and print what it does (see the module docstring)."""
    torch.manual_seed(args.seed)
    processor = make_tiny_processor(max_pixels=QUICKSTART_MAX_PIXELS)
    model = make_tiny_crem(processor, seed=args.seed)
    images = sample_images()
    names = list(images)
    print(
        f"Tiny CREM: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{model.config.num_chorus_tokens} chorus tokens\n"
    )

    image_vectors = encode(model, processor, images=list(images.values()), show_progress=False)
    text_vectors = encode(
        model, processor, texts=names, instruction="Find an image that matches the caption:", show_progress=False
    )
    scores = similarity(text_vectors, image_vectors)
    print(f"Embeddings: {tuple(image_vectors.shape)}, unit norm: {image_vectors.norm(dim=-1).tolist()}")
    print("Text-to-image cosine similarities (random weights: no meaning yet):")
    for name, row in zip(names, scores.tolist(), strict=True):
        best = names[max(range(len(row)), key=row.__getitem__)]
        print(f"  {name!r:20} -> best match {best!r:20} scores {[round(s, 3) for s in row]}")

    inputs = processor.process_generation_inputs(
        questions=["What is in the image?"] * len(images), images=list(images.values())
    )
    prompt_length = inputs["input_ids"].shape[1]
    native = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    compressed = model.generate(**inputs, compress=True, max_new_tokens=args.max_new_tokens, do_sample=False)
    context = model.compress(**inputs)
    print(
        f"\nGeneration prompt: {prompt_length} tokens per row (after padding); the compressed context keeps "
        f"{context.cache.get_seq_length()} KV slots ({context.cache.get_seq_length() / prompt_length:.0%})."
    )
    decode = processor.tokenizer.batch_decode
    for name, a, b in zip(names, decode(native[:, prompt_length:]), decode(compressed[:, prompt_length:]), strict=True):
        print(f"  {name!r:20} native: {a!r}\n  {'':20} compressed: {b!r}")


if __name__ == "__main__":
    raise SystemExit(main())
