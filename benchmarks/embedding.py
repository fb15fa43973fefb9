"""`get_embedding` vs the VLM2Vec-style path (a full causal-LM forward with hidden states, which runs `lm_head` at
every position) vs the floor (the inner model up to the chorus block, nothing else).

Two language models: the LM-dominated tiny one (h256, 4 layers) for the floor comparison, and Qwen2-VL-2B's
dimensions with random weights (28 layers, hidden 1536, 151k vocabulary) for the `lm_head` share.
Run: python benchmarks/embedding.py [--skip-2b]
"""

from __future__ import annotations

import torch
from common import arguments, image_with_tokens, median_seconds, report
from transformers import Qwen2VLForConditionalGeneration

from crem_hf.testing import make_tiny_crem, make_tiny_processor

IMAGE_TOKENS = 256
TEXT = "Represent the given image for classification."


def paths(model, batch):
    """The three ways to get the same chorus embedding."""
    stop = int(model.chorus_layout(batch["input_ids"], batch["attention_mask"]).chorus_end.max())
    positions = model.compute_position_ids(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"))

    def crem():
        return model.get_embedding(**batch)

    def vlm2vec():
        out = Qwen2VLForConditionalGeneration.forward(model, **batch, output_hidden_states=True)
        return out.hidden_states[-1]

    def floor():
        return model.model(
            input_ids=batch["input_ids"][:, :stop],
            attention_mask=batch["attention_mask"][:, :stop],
            position_ids=positions[..., :stop],
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            use_cache=False,
        ).last_hidden_state

    return crem, vlm2vec, floor


def measure(name: str, args, batch_size: int, **sizes) -> dict:
    processor = make_tiny_processor(real_tokenizer=True)
    processor.set_image_token_range(1, IMAGE_TOKENS)
    model = make_tiny_crem(processor, attn_implementation=args.attn, **sizes)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    image = image_with_tokens(processor, IMAGE_TOKENS)
    batch = processor.process_embedding_inputs(images=[image] * batch_size, texts=[TEXT] * batch_size).to(args.device)
    times = {}
    with torch.inference_mode():
        for label, run in zip(("get_embedding", "VLM2Vec-style", "floor"), paths(model, batch), strict=True):
            times[label] = median_seconds(run, args.repeats, args.device)
    del model
    return {
        "config": name,
        "batch": batch_size,
        "get_embedding (s)": times["get_embedding"],
        "VLM2Vec-style (s)": times["VLM2Vec-style"],
        "floor (s)": times["floor"],
        "get_embedding / floor": times["get_embedding"] / times["floor"],
        "VLM2Vec-style / get_embedding": times["VLM2Vec-style"] / times["get_embedding"],
    }


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--skip-2b", action="store_true", help="leave out the Qwen2-VL-2B-sized model")
    args = parser.parse_args()
    rows = [measure("LM-dominated (h256, L4, 151k vocab)", args, 8, hidden_size=256, num_layers=4, num_heads=8)]
    print(rows[-1], flush=True)
    if not args.skip_2b:
        sizes = {"hidden_size": 1536, "num_layers": 28, "num_heads": 12}
        rows.append(measure("Qwen2-VL-2B LM dims (random weights)", args, 1, **sizes))
        print(rows[-1], flush=True)
    notes = (
        f"{IMAGE_TOKENS} image tokens + an instruction + 16 chorus tokens per row (tiny vision tower in both configs). "
        "The VLM2Vec-style path computes logits at every position; the floor is the inner model alone."
    )
    report("embedding", args, rows, notes)


if __name__ == "__main__":
    main()
