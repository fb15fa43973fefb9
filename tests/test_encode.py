"""`crem_hf.encode` against its oracle, `get_embedding` of `process_embedding_inputs` (sample by sample and as one
batch), on every backbone: texts, images of every kind, pairs, instructions, batch sizes, Matryoshka dims, errors that
name the bad input; and `similarity` against cosine scores computed pair by pair."""

from __future__ import annotations

import backbones
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_image

import crem_hf
from crem_hf import encode, similarity

backbone = backbones.backbone
processor = backbones.processor
model = backbones.model

HIDDEN = 64  # the tiny models' hidden size


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Texts alone, images alone (PIL, file path, uint8 array) and pairs, of different lengths and sizes."""
    path = tmp_path_factory.mktemp("images") / "scan.png"
    random_image(84, 56, seed=3).save(path)
    images = [
        None,
        random_image(56, 84, 1),
        str(path),
        np.asarray(random_image(112, 112, 2)),
        None,
        random_image(56, 56, 4),
    ]
    texts = ["a cat", None, None, "a dog on a red sofa, seen from above", "zero", "the digit seven"]
    instructions = ["Find an image that matches:", None, None, "Represent the pair:", None, None]
    return images, texts, instructions


def oracle(model, processor, images, texts, instruction=None, dim=None) -> torch.Tensor:
    """`(n, d)`: each sample alone through `process_embedding_inputs` and `get_embedding`."""
    instructions = instruction if isinstance(instruction, list) else [instruction] * len(texts)
    rows = []
    with torch.no_grad():
        for image, text, inst in zip(images, texts, instructions, strict=True):
            batch = processor.process_embedding_inputs(images=[image], texts=[text], instruction=[inst])
            rows.append(model.get_embedding(**batch, dim=dim).float())
    return torch.cat(rows)


def test_encode_is_process_embedding_inputs_then_get_embedding(model, processor, inputs):
    images, texts, instructions = inputs
    got = encode(model, processor, images=images, texts=texts, instruction=instructions, batch_size=4)
    assert got.shape == (6, HIDDEN) and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, oracle(model, processor, images, texts, instructions), atol=1e-5, rtol=0)
    with torch.no_grad():
        one_batch = model.get_embedding(
            **processor.process_embedding_inputs(images=images, texts=texts, instruction=instructions)
        )
    torch.testing.assert_close(got, one_batch, atol=1e-5, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_texts_images_and_one_instruction_for_all(model, processor, inputs):
    images, texts, _ = inputs
    words = [text for text in texts if text is not None]
    pictures = [image for image in images if image is not None]
    instruction = "Represent the given text:"
    got_texts = encode(model, processor, texts=words, instruction=instruction, batch_size=2)
    expected = oracle(model, processor, [None] * len(words), words, instruction)
    torch.testing.assert_close(got_texts, expected, atol=1e-5, rtol=0)
    # An image with neither instruction nor text gets the processor's image instruction, as in the processor.
    got_images = encode(model, processor, images=pictures, batch_size=3)
    torch.testing.assert_close(
        got_images, oracle(model, processor, pictures, [None] * len(pictures)), atol=1e-5, rtol=0
    )


def test_the_batch_size_does_not_change_the_embeddings(model, processor, inputs):
    images, texts, instructions = inputs
    runs = [
        encode(model, processor, images=images, texts=texts, instruction=instructions, batch_size=size)
        for size in (1, 2, 5, 32)
    ]
    for run in runs[1:]:
        torch.testing.assert_close(run, runs[0], atol=1e-5, rtol=0)


def test_dim_is_get_embedding_at_that_dim(model, processor, inputs, monkeypatch):
    images, texts, instructions = inputs
    monkeypatch.setattr(model.config, "matryoshka_dims", [16, 32, HIDDEN])
    full = encode(model, processor, images=images, texts=texts, instruction=instructions, batch_size=3)
    at_16 = encode(model, processor, images=images, texts=texts, instruction=instructions, batch_size=3, dim=16)
    assert at_16.shape == (6, 16)
    torch.testing.assert_close(at_16, oracle(model, processor, images, texts, instructions, dim=16), atol=1e-5, rtol=0)
    torch.testing.assert_close(at_16, F.normalize(full[:, :16], dim=-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dim 24 is not an embedding size this model was trained for"):
        encode(model, processor, texts=["a cat"], dim=24)


def test_nothing_to_encode_gives_no_rows(model, processor):
    assert encode(model, processor, texts=[]).shape == (0, HIDDEN)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"texts": "a cat"}, TypeError, r"per-sample lists; wrap a single input in a list"),
        ({"images": random_image(56, 56, 0)}, TypeError, r"per-sample lists"),
        ({"texts": ["a cat", "a dog", "  "]}, ValueError, r"texts\[2\]: empty text"),
        ({"texts": ["a cat", 7]}, TypeError, r"texts\[1\]: expected a string, got int"),
        ({"texts": ["a", "c", "b"], "instruction": ["x", None, ""]}, ValueError, r"instruction\[2\]: empty text"),
        ({"texts": ["a", None]}, ValueError, r"Sample 1 has neither an image nor text"),
        ({"texts": ["a", "b"], "images": [None]}, ValueError, r"differ in length"),
        ({"images": [random_image(56, 56, 0), 5]}, TypeError, r"images\[1\]: expected a PIL image"),
        ({"images": [random_image(56, 56, 0), "no/such/scan.png"]}, ValueError, r"images\[1\]: image file not found"),
        ({"images": [random_image(56, 56, 0), random_image(8, 8, 1)]}, ValueError, r"images\[1\] is 8x8 px"),
        ({"texts": ["a"], "batch_size": 0}, ValueError, r"batch_size must be a positive integer, got 0"),
        ({"texts": ["a"], "colour": "red"}, TypeError, r"Unknown processor options \['colour'\]"),
    ],
)
def test_a_bad_input_is_named_by_its_index_before_any_forward(model, processor, monkeypatch, arguments, error, message):
    forwards = []
    get_embedding = model.get_embedding
    monkeypatch.setattr(model, "get_embedding", lambda **batch: forwards.append(batch) or get_embedding(**batch))
    # Good inputs before the bad one, a batch each: the bad one is found before any of them runs.
    arguments = {"batch_size": 1, **arguments}
    with pytest.raises(error, match=message):
        encode(model, processor, show_progress=False, **arguments)
    assert forwards == []


def test_similarity_is_the_cosine_of_every_pair():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, generator=generator), torch.randn(5, 8, generator=generator) * 4
    scores = similarity(a, b)
    assert scores.shape == (3, 5)
    expected = torch.tensor([[F.cosine_similarity(x, y, dim=0).item() for y in b] for x in a])
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert similarity(a.double(), b).dtype == torch.float32
    with pytest.raises(ValueError, match=r"got \(3, 8\) and \(5, 4\)"):
        similarity(a, b[:, :4])
    with pytest.raises(ValueError, match=r"got \(8,\) and \(5, 8\)"):
        similarity(a[0], b)


def test_similarity_of_encoded_unit_vectors_is_their_dot_product(model, processor, inputs):
    images, texts, instructions = inputs
    embeddings = encode(model, processor, images=images, texts=texts, instruction=instructions)
    torch.testing.assert_close(similarity(embeddings, embeddings), embeddings @ embeddings.T, atol=1e-5, rtol=0)


def test_the_package_exports_one_encoder():
    assert crem_hf.encode is encode and crem_hf.similarity is similarity
    assert "encode" in crem_hf.__all__ and "similarity" in crem_hf.__all__
