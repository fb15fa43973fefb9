"""CREMProcessor: layout, labels, truncation, bad input, save/load, real Qwen ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_image

from crem_hf import CREMProcessor
from crem_hf.testing import make_tiny_processor


def chorus_positions(processor, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(input_ids, torch.tensor(processor.chorus_token_ids))


def test_embedding_layout_ends_with_the_chorus_block_in_every_row(processor, images):
    batch = processor.process_embedding_inputs(images=[images[0], None, images[1]], texts=[None, "a cat", "dog"])
    ids = batch["input_ids"]
    n = processor.num_chorus_tokens
    assert torch.equal(ids[:, -n:], torch.tensor(processor.chorus_token_ids).expand(3, -1))
    assert chorus_positions(processor, ids).sum(1).tolist() == [n] * 3
    assert batch["attention_mask"][1, 0] == 0, "left padding"
    text = processor.tokenizer.decode(ids[0][batch["attention_mask"][0].bool()])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_end|>Represent the given image.<|chorus_0|>" in text
    image_tokens = (ids == processor.image_token_id).sum(1).tolist()
    assert image_tokens == [6, 0, 16]
    assert batch["mm_token_type_ids"].sum().item() == 22


def test_instruction_and_text_are_joined_before_the_chorus(processor):
    batch = processor.process_embedding_inputs(texts=["a red dog"], instruction="Represent the given text:")
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.endswith("user\nRepresent the given text: a red dog" + "".join(processor.chorus_tokens))


def test_generation_layout_and_labels(processor, images):
    batch = processor.process_generation_inputs(
        questions=["What is it?", "Which digit?"], images=images, texts=["a cat", None], answers=["a cat", "seven"]
    )
    tok = processor.tokenizer
    for row, answer in enumerate(["a cat", "seven"]):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert tok.decode(labelled) == answer + "<|im_end|>"
        ids = batch["input_ids"][row]
        text = tok.decode(ids[batch["attention_mask"][row].bool()])
        chorus = "".join(processor.chorus_tokens)
        assert chorus + ("What is it?" if row == 0 else "Which digit?") + "<|im_end|>\n<|im_start|>assistant\n" in text
    prompt_only = processor.process_generation_inputs(questions=["What is it?"], images=images[:1])
    assert "labels" not in prompt_only
    assert processor.tokenizer.decode(prompt_only["input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_chat_messages_multi_turn_labels(processor, images):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "What colour?"},
        {"role": "assistant", "content": "red"},
    ]
    batch = processor.process_chat(conversations=[conversation], return_labels=True)
    tok = processor.tokenizer
    labels = batch["labels"][0]
    assert tok.decode(labels[labels != -100]) == "a cat<|im_end|>red<|im_end|>"
    text = tok.decode(batch["input_ids"][0])
    assert "<|vision_end|>Represent the given image." + "".join(processor.chorus_tokens) + "What is it?" in text
    plain = processor.process_chat(conversations=[conversation[:1]], compress_layout=False)
    plain_text = tok.decode(plain["input_ids"][0])
    assert "<|chorus_0|>" not in plain_text and plain_text.endswith("What is it?<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_cuts_input_text_never_the_chorus():
    processor = make_tiny_processor(max_length=60)
    long_text = "the quick brown fox jumps over the lazy dog " * 20
    batch = processor.process_embedding_inputs(texts=[long_text, "short"])
    assert batch["input_ids"].shape[1] <= 60
    n = processor.num_chorus_tokens
    assert torch.equal(batch["input_ids"][:, -n:], torch.tensor(processor.chorus_token_ids).expand(2, -1))
    assert "the quick brown fox" in processor.tokenizer.decode(batch["input_ids"][0])
    with pytest.raises(ValueError, match="max_length"):
        make_tiny_processor(max_length=20).process_embedding_inputs(texts=["short"])


def test_min_max_pixels_per_call(processor):
    image = random_image(224, 224, 0)
    small = processor.process_embedding_inputs(images=[image], max_pixels=56 * 56)
    large = processor.process_embedding_inputs(images=[image], min_pixels=112 * 112, max_pixels=224 * 224)
    assert (small["input_ids"] == processor.image_token_id).sum() == 4
    assert (large["input_ids"] == processor.image_token_id).sum() == 64


def test_bad_inputs_are_named(processor, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image file .*corrupt.png"):
        processor.process_embedding_inputs(images=[str(corrupt)])
    with pytest.raises(ValueError, match="not found: .*missing.jpg"):
        processor.process_embedding_inputs(images=[str(tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="8x8 px"):
        processor.process_embedding_inputs(images=[np.zeros((8, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="empty text"):
        processor.process_embedding_inputs(texts=["   "])
    with pytest.raises(TypeError, match="expected a string"):
        processor.process_embedding_inputs(texts=[3])
    with pytest.raises(TypeError, match="PIL image"):
        processor.process_embedding_inputs(images=[3.5])
    with pytest.raises(ValueError, match="neither an image nor text"):
        processor.process_embedding_inputs(texts=[None])
    with pytest.raises(ValueError, match="differ in length"):
        processor.process_embedding_inputs(images=[None], texts=["a", "b"])
    with pytest.raises(TypeError, match="per-sample lists"):
        processor.process_embedding_inputs(texts="a cat")


def test_small_images_can_be_upscaled():
    processor = make_tiny_processor(upscale_small_images=True)
    batch = processor.process_embedding_inputs(images=[np.zeros((8, 16, 3), dtype=np.uint8)])
    assert (batch["input_ids"] == processor.image_token_id).sum() >= 1


def test_image_paths_load(processor, tmp_path, images):
    path = tmp_path / "cat.png"
    images[0].save(path)
    from_path = processor.process_embedding_inputs(images=[str(path)])
    from_pil = processor.process_embedding_inputs(images=[images[0]])
    assert torch.equal(from_path["pixel_values"], from_pil["pixel_values"])


def test_save_load_round_trip(processor, images, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = CREMProcessor.from_pretrained(tmp_path)
    assert loaded.num_chorus_tokens == processor.num_chorus_tokens
    assert loaded.chorus_token_ids == processor.chorus_token_ids
    a = processor.process_generation_inputs(questions=["Why?"], images=images[:1], answers=["yes"])
    b = loaded.process_generation_inputs(questions=["Why?"], images=images[:1], answers=["yes"])
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_real_qwen_special_token_ids():
    """The real Qwen2-VL tokenizer (tests/fixtures): 151,657 ids, so the chorus ids follow at 151657..151672."""
    processor = make_tiny_processor(real_tokenizer=True)
    assert len(processor.tokenizer) == 151657 + 16
    updates = processor.model_config_updates()
    assert updates["image_token_id"] == 151655
    assert updates["video_token_id"] == 151656
    assert updates["vision_start_token_id"] == 151652
    assert updates["vision_end_token_id"] == 151653
    assert updates["turn_start_token_id"] == 151644
    assert updates["turn_header_length"] == 2  # "user", "\n"
    assert processor.chorus_token_ids == list(range(151657, 151673))
    batch = processor.process_embedding_inputs(images=[random_image(56, 56, 0)], texts=["a cat"])
    ids = batch["input_ids"][0].tolist()
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|>system\n
    assert ids[-16:] == processor.chorus_token_ids
    assert ids.count(151655) == 4


def test_missing_chorus_tokens_in_tokenizer_are_refused(processor):
    from crem_hf.testing import make_tiny_qwen2vl_processor

    plain = make_tiny_qwen2vl_processor()
    with pytest.raises(ValueError, match="chorus tokens"):
        CREMProcessor(image_processor=plain.image_processor, tokenizer=plain.tokenizer)


def test_every_builder_takes_keywords_only(processor, images):
    """No argument order to remember: images, texts, questions, conversations... are always named."""
    calls = [
        lambda: processor.process_embedding_inputs([images[0]]),
        lambda: processor.process_generation_inputs(["Why?"], [images[0]]),
        lambda: processor.process_followups(["Why?"]),
        lambda: processor.process_chat([[{"role": "user", "content": "Why?"}]]),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="positional"):
            call()
