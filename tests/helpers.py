"""Test helpers that import neither crem_hf nor pytest, so the remote-code subprocess can use them too."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import torch
from PIL import Image


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a launcher's rendezvous or a test server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def random_image(height: int, width: int, seed: int) -> Image.Image:
    """A reproducible RGB noise image of the given size."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def greedy_with_logits(model, inputs: dict, max_new_tokens: int, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Greedy `model.generate` over `inputs` (with `options`, e.g. `compress`): the sequences `(batch, prompt + new)` and
    the logits of each new token `(batch, new, vocab)`.
    """
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **options,
    )
    return out.sequences, torch.stack(out.logits, 1)


def outputs_of(model, processor) -> dict[str, list]:
    """
    Embeddings, and native and compressed greedy generations of a fixed two-row batch with the logits of each step
    (`native_logits`, `compressed_logits`: `(2, 5, vocab)`), as plain lists. The logits tell two models apart where
    their greedy tokens agree.
    """
    images = [random_image(56, 84, 1), random_image(112, 112, 2)]
    embedding_inputs = processor.process_embedding_inputs(images=images, texts=["a cat", None])
    generation_inputs = processor.process_generation_inputs(questions=["What is it?", "Which one?"], images=images)
    outputs = {}
    with torch.no_grad():
        outputs["embeddings"] = model.get_embedding(**embedding_inputs).tolist()
        for name, compress in (("native", False), ("compressed", True)):
            sequences, logits = greedy_with_logits(model, generation_inputs, 5, compress=compress)
            outputs[name] = sequences.tolist()
            outputs[f"{name}_logits"] = logits.tolist()
    return outputs


def assert_outputs_match(ours: dict, theirs: dict, embeddings_atol: float = 0.0, logits_atol: float = 0.0) -> None:
    """
    Two `outputs_of` results agree: the same greedy tokens, and embeddings and logits within the tolerances (0:
    equal). Another process (its own thread count) may sum in another order: its logits differ in the last bits.
    """
    assert ours.keys() == theirs.keys()
    for key in ("native", "compressed"):
        assert ours[key] == theirs[key], key
    for key, atol in (
        ("embeddings", embeddings_atol),
        ("native_logits", logits_atol),
        ("compressed_logits", logits_atol),
    ):
        difference = float((torch.tensor(ours[key]) - torch.tensor(theirs[key])).abs().max())
        assert difference <= atol, (key, difference)


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (150, 40, 180),
    "orange": (240, 140, 20),
}


def colour_image(name: str, seed: int, size: int = 56) -> Image.Image:
    """A square of one colour with a little noise, so that no two images are identical."""
    rng = np.random.default_rng(seed)
    pixels = np.array(COLOURS[name], dtype=np.int16)[None, None] + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_colour_data(folder, copies: int = 4) -> dict[str, str]:
    """
    Tiny real-format training data about coloured squares, written under `folder`: MMEB-train retrieval pairs
    (image -> colour name) as jsonl, LLaVA conversations (image + question -> colour name) as json, and the images.
    """
    import json
    import os

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    pairs, conversations = [], []
    for i in range(copies):
        for name in COLOURS:
            relative = f"images/{name}_{i}.png"
            colour_image(name, seed=i * 100 + len(pairs)).save(os.path.join(folder, relative))
            pairs.append(
                {
                    "qry": "<|image_1|>\nRepresent the given image for classification.",
                    "qry_image_path": relative,
                    "pos_text": name,
                    "pos_image_path": "",
                    "neg_text": "",
                    "neg_image_path": "",
                }
            )
            conversations.append(
                {
                    "id": f"{name}-{i}",
                    "image": relative,
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat colour is it?"},
                        {"from": "gpt", "value": name},
                    ],
                }
            )
    retrieval = os.path.join(folder, "retrieval.jsonl")
    with open(retrieval, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in pairs)
    generation = os.path.join(folder, "conversations.json")
    with open(generation, "w") as handle:
        json.dump(conversations, handle)
    return {"retrieval": retrieval, "generation": generation, "image_root": os.fspath(folder)}


def mixed_batch(processor, rows, generation_rows, compress):
    """
    One CREMTrainer step's inputs (a `StepBatch`) over the given rows of a fixed six-colour set: image queries, text
    targets and one hard negative each (keys mark duplicates), and conversations with the given compress flags.
    """
    from crem_hf.training import GenerationBatch, RetrievalBatch, StepBatch  # here: the module stays crem_hf-free

    names = list(COLOURS)
    rows, generation_rows = list(rows), list(generation_rows)
    images = [colour_image(name, seed=i) for i, name in enumerate(names)]
    negatives = [(i + 1) % len(names) for i in rows]
    conversations = [
        [
            {"role": "user", "content": [{"type": "image", "image": images[i]}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": names[i]},
        ]
        for i in generation_rows
    ]
    generation = dict(processor.process_chat(conversations=conversations, return_labels=True))
    return StepBatch(
        retrieval=RetrievalBatch(
            query=dict(processor.process_embedding_inputs(images=[images[i] for i in rows])),
            target=dict(processor.process_embedding_inputs(texts=[names[i] for i in rows])),
            negative=dict(processor.process_embedding_inputs(texts=[names[i] for i in negatives])),
            target_keys=torch.tensor(rows),
            negative_keys=torch.tensor(negatives),
        ),
        generation=GenerationBatch(inputs=generation, compress=torch.tensor(list(compress))),
    )


def randomize_lora_b(model, std: float = 0.05, seed: int = 0):
    """LoRA's B matrices start at zero; give them values so that every LoRA gradient is non-trivial."""
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, std)
    return model


# ---------------------------------------------------------------- the dense compression mask: the tests' oracle


def dense_compression_mask(model, input_ids, attention_mask=None, compress=True) -> torch.Tensor:
    """
    The compression as one dense additive mask `(batch_size, 1, length, length)` in the model's dtype: causal and
    padding-aware, and in compressed rows the tokens after the chorus block may not attend to the compressed span
    (the image and the input text). 0 where attention is allowed, the dtype's minimum elsewhere; every position keeps
    itself, so no row is all masked. This is the mechanism compression replaced (`batch x length x length` memory,
    masked attention kernels only): the model never builds it, the tests compare the model with it.

    Args:
        model: a CREM model (its `chorus_layout` gives the spans; its dtype, the mask's).
        input_ids: `(batch_size, length)`.
        attention_mask: `(batch_size, length)` 2-D padding mask, optional.
        compress: `True`/`False` for every row, or a bool tensor `(batch_size,)`.
    """
    batch, length = input_ids.shape
    layout = model.chorus_layout(input_ids, attention_mask)
    device = input_ids.device
    flags = torch.as_tensor(compress, dtype=torch.bool, device=device).expand(batch)
    positions = torch.arange(length, device=device)
    allowed = (positions[:, None] >= positions[None, :])[None].expand(batch, -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    after_chorus = positions[None, :, None] >= layout.chorus_end[:, None, None]
    hidden_keys = layout.compressed_span(length)[:, None, :]
    allowed = (allowed & ~(flags[:, None, None] & after_chorus & hidden_keys)) | torch.eye(
        length, dtype=torch.bool, device=device
    )
    mask = torch.zeros(allowed.shape, dtype=model.dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(model.dtype).min)[:, None]


def dense_oracle_states(model, batch: dict, compress=True) -> torch.Tensor:
    """
    Last hidden states `(batch_size, length, hidden_size)` of one no-cache forward of the inner Qwen2-VL model under
    `dense_compression_mask`, positions from the 2-D padding mask. Differentiable.
    """
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    positions = model.compute_position_ids(ids, mask, batch.get("image_grid_thw"), batch.get("mm_token_type_ids"))
    return model.model(
        input_ids=ids,
        attention_mask=dense_compression_mask(model, ids, mask, compress),
        position_ids=positions,
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
    ).last_hidden_state


def plain_twin(model):
    """A plain model of the CREM model's backbone (`Qwen2VLForConditionalGeneration`, ...) with its weights, kernel
    and generation config."""
    plain_class = model._backbone_class
    config_class = plain_class.config_class
    values = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config = config_class(
        **{k: v for k, v in values.items() if k in config_class.__dataclass_fields__ or k.endswith("_config")}
    )
    config._attn_implementation = model.config._attn_implementation
    plain = plain_class(config).eval()
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def memory_cli(*args, env=None, launcher=()) -> subprocess.CompletedProcess:
    """`crem-memory ARGS...` run as a command (`python -m crem_hf.memory.cli`, or under `launcher`, e.g. torchrun)."""
    command = [*(launcher or [sys.executable]), "-m", "crem_hf.memory.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def save_crem(model, processor, folder) -> str:
    """`model` and `processor` saved into `folder` (a CREM folder the command-line tools take); its path."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def write_upload_images(folder) -> dict[str, str]:
    """The demo's uploads in `folder`: a PNG per colour (`colour_image(name, i)`), and `notes.png`, a text file."""
    import os

    paths = {}
    for i, name in enumerate(COLOURS):
        paths[name] = os.path.join(folder, f"{name}.png")
        colour_image(name, i).save(paths[name])
    paths["text"] = os.path.join(folder, "notes.png")
    with open(paths["text"], "w") as handle:
        handle.write("not an image\n")
    return paths


def answers_both_ways(model, processor, question: str, image, max_new_tokens: int) -> dict:
    """
    The oracle of the demo's Ask tab, from the model called directly: the prompt's tokens, the slots of its
    compressed context (`model.compress`), the bytes of one KV slot (from the config) and the greedy
    `[native, compressed]` answers.
    """
    inputs = processor.process_generation_inputs(questions=[question], images=[image])
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        kept = model.compress(**inputs).cache.get_seq_length()
        answers = [
            processor.tokenizer.decode(
                model.generate(**inputs, compress=mode, max_new_tokens=max_new_tokens, do_sample=False)[0, prompt:],
                skip_special_tokens=True,
            ).strip()
            for mode in (False, True)
        ]
    text = model.config.text_config
    slot_bytes = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    slot_bytes *= torch.finfo(model.dtype).bits // 8
    return {"prompt": prompt, "kept": kept, "slot_bytes": slot_bytes, "answers": answers}


def cosines_one_by_one(model, processor, images, texts, instruction: str) -> torch.Tensor:
    """The oracle of the demo's Embed tab: the images', then the texts' cosine matrix `(n, n)`, each embedded alone."""
    with torch.no_grad():
        vectors = [model.get_embedding(**processor.process_embedding_inputs(images=[image]))[0] for image in images]
        vectors += [
            model.get_embedding(**processor.process_embedding_inputs(texts=[text], instruction=instruction))[0]
            for text in texts
        ]
    stacked = torch.nn.functional.normalize(torch.stack(vectors), dim=-1)
    return stacked @ stacked.T
