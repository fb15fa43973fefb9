"""`crem-demo` on each backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): `load_demo_model` loads a saved tiny folder of the
backbone, and the demo's handlers (`CREMDemo`) on it are checked against the original model called directly: the
gallery's searches are the exact cosine ranking of `get_embedding`, a stored answer is the memory's `ask` and
`generate(compress=True)` on the image, the Ask tab's answers are `generate(compress=False/True)`, the Embed tab's
matrix is the cosines of `get_embedding`. One page in headless Chromium on Qwen3-VL: search, pick, ask.
"""

from __future__ import annotations

import backbones
import pytest
import test_app
import torch
from helpers import COLOURS, colour_image, free_port, random_image, save_crem
from playwright import sync_api

from crem_hf.demo.app import TEXT_INSTRUCTION, CREMDemo, UploadLimits, build_app, launch, load_demo_model
from crem_hf.testing import BACKBONES, make_tiny_crem, make_tiny_processor, make_tiny_qwen2vl

# The per-backbone fixtures (they override the session's Qwen2-VL ones here): each test runs on every backbone.
backbone = backbones.backbone
# Headless Chromium, as the Qwen2-VL page tests drive it (tests/test_app.py).
browser = test_app.browser

QUESTION = "What is in the image?"
TOKENS = 5
GALLERY = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNG files: a colour square per colour (56 px), two uploads of other sizes (a 32-px multiple, and 30 px: under
    Qwen3-VL's 32-px token, upscaled there)."""
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for i, name in enumerate(COLOURS):
        paths[name] = str(folder / f"{name}.png")
        colour_image(name, i).save(paths[name])
    paths["grid"] = str(folder / "grid.png")
    random_image(64, 96, seed=5).save(paths["grid"])
    paths["thin"] = str(folder / "thin.png")
    random_image(30, 90, seed=6).save(paths["thin"])
    return paths


@pytest.fixture(scope="module")
def processor(backbone):
    """The backbone's tiny processor, upscaling images under one merged token per side (28 px; Qwen3-VL: 32 px)."""
    return make_tiny_processor(backbone=backbone, upscale_small_images=True)


def untied(model):
    """
    `model` with an output head of its own (as Qwen2.5-VL-7B and Qwen3-VL-8B have; their 3B and 2B tie it to the
    input embeddings, and so do the tiny configs built from those). Tied at tiny random width, greedy decoding
    repeats the prompt's last token whatever the image: answers that could not tell a wrong context from the right one.
    """
    if not model.config.tie_word_embeddings:  # the tiny Qwen2-VL
        return model
    model.config.tie_word_embeddings = False
    if hasattr(model.config.text_config, "tie_word_embeddings"):  # Qwen3-VL keeps the flag in its text config
        model.config.text_config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(1)
    head = torch.randn(model.lm_head.weight.shape, generator=generator) * model.config.text_config.initializer_range
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


@pytest.fixture(scope="module")
def model(processor, backbone):
    """The backbone's tiny CREM model, untied (see `untied`)."""
    return untied(make_tiny_crem(processor, seed=0, backbone=backbone))


@pytest.fixture(scope="module")
def loaded(model, processor, tmp_path_factory):
    """`load_demo_model` on the model saved to a folder."""
    folder = save_crem(model, processor, tmp_path_factory.mktemp("demo-model") / "model")
    return load_demo_model(folder)


@pytest.fixture(scope="module")
def demo(loaded, images, tmp_path_factory):
    """The demo on the loaded model: a gallery of four colour squares (items) and the two other images (uploads)."""
    demo = CREMDemo(*loaded, str(tmp_path_factory.mktemp("work")), UploadLimits(max_bytes=100_000, max_pixels=40_000))
    demo.new_gallery()
    report = demo.add_items([(name, images[name], {"label": name}) for name in GALLERY], show_progress=False)
    assert (report.added, report.failed) == (len(GALLERY), 0)
    added = demo.add_uploads([images["grid"], images["thin"]])
    assert added == "Added 2 image(s), 0 already in the gallery; the gallery holds 6 item(s)."
    again = demo.add_uploads([images["grid"]])  # the same file again: the same item
    assert again == "Added 0 image(s), 1 already in the gallery; the gallery holds 6 item(s)."
    return demo


#: The gallery's items by their label (the colour, or the uploaded file's name).
LABELS = {**{name: name for name in GALLERY}, "grid.png": "grid", "thin.png": "thin"}


def _embed(model, processor, images=None, texts=None, instruction=None) -> torch.Tensor:
    """Unit `get_embedding` vectors of the images or texts, each embedded alone: `(n, hidden_size)`."""
    rows = [{"images": [image]} for image in images or []] + [
        {"texts": [text], "instruction": instruction} for text in texts or []
    ]
    with torch.no_grad():
        vectors = [model.get_embedding(**processor.process_embedding_inputs(**row))[0] for row in rows]
    return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)


def _answer(model, processor, image, question, compress: bool, max_new_tokens: int = TOKENS) -> str:
    """Greedy `generate` on the image, compressed or not: the answer's text."""
    inputs = processor.process_generation_inputs(questions=[question], images=[image])
    with torch.no_grad():
        sequences = model.generate(**inputs, compress=compress, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_load_demo_model_loads_the_backbones_crem_class_with_its_weights(loaded, model, backbone):
    loaded_model, loaded_processor = loaded
    assert type(loaded_model) is BACKBONES[backbone][2] and not loaded_model.training
    assert loaded_model.config.model_type == model.config.model_type
    expected = model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in loaded_model.state_dict().items())
    assert loaded_processor.image_token_side == (32 if backbone == "qwen3_vl" else 28)


def test_load_demo_model_refuses_the_plain_backbone_checkpoint_by_name(backbone, tmp_path):
    """A plain checkpoint of the backbone (no chorus tokens) is named as such, with what to do instead."""
    folder = tmp_path / "plain"
    make_tiny_qwen2vl(backbone=backbone).save_pretrained(folder)
    with pytest.raises(ValueError, match=f"is a plain '{backbone}' checkpoint, not a CREM model: train it first"):
        load_demo_model(str(folder))


def test_gallery_search_by_text_and_by_image_is_the_exact_cosine_ranking(demo, model, processor, images):
    labels = list(LABELS)
    stored = _embed(model, processor, images=[images[LABELS[label]] for label in labels])
    query = _embed(model, processor, texts=["a red square"], instruction=TEXT_INSTRUCTION)[0]
    scores = stored @ query
    order = scores.argsort(descending=True).tolist()
    hits = demo.search("a red square", None, 4)
    assert [hit.metadata["label"] for hit in hits] == [labels[i] for i in order[:4]]
    assert [hit.score for hit in hits] == pytest.approx(scores[order[:4]].tolist(), abs=1e-5)
    # An image query (the upload under Qwen3-VL's 32 px): itself first, at cosine 1; k over the gallery's size
    # shows the whole gallery.
    scores = stored @ stored[labels.index("thin.png")]
    order = scores.argsort(descending=True).tolist()
    hits = demo.search(None, images["thin"], 10)
    assert [hit.metadata["label"] for hit in hits] == [labels[i] for i in order] and order[0] == labels.index(
        "thin.png"
    )
    assert [hit.score for hit in hits] == pytest.approx(scores[order].tolist(), abs=1e-5)
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_ask_stored_is_the_memorys_ask_and_compressed_generation_on_the_image(demo, model, processor, images):
    """Every gallery item; the answers differ between items (8 tokens), so reading another item's context shows."""
    answers = []
    for hit in demo.search("anything", None, len(LABELS)):
        stored = demo.ask_stored(QUESTION, hit.id, 8)
        assert stored == demo.memory.ask(QUESTION, [hit.id], max_new_tokens=8)[0]
        image = images[LABELS[hit.metadata["label"]]]
        assert stored == _answer(model, processor, image, QUESTION, compress=True, max_new_tokens=8), hit.id
        answers.append(stored)
    assert len(answers) == len(LABELS) and len(set(answers)) > 1, answers


def test_answer_native_and_compressed_are_generation_without_and_with_compression(demo, model, processor, images):
    """The Ask tab on a colour square and on the thin image (upscaled on Qwen3-VL); the two modes answer
    differently, so answering one mode for the other shows."""
    shown = []
    for name in ("green", "thin"):
        native, compressed = demo.answer(images[name], QUESTION, TOKENS)
        shown.append((native.answer, compressed.answer))
        assert (native.mode, compressed.mode) == ("native", "compressed")
        assert native.answer == _answer(model, processor, images[name], QUESTION, compress=False)
        assert compressed.answer == _answer(model, processor, images[name], QUESTION, compress=True)
        inputs = processor.process_generation_inputs(questions=[QUESTION], images=[images[name]])
        with torch.no_grad():
            kept = model.compress(**inputs).cache.get_seq_length()
        assert native.prompt_tokens == compressed.prompt_tokens == inputs["input_ids"].shape[1]
        assert (native.kv_slots, compressed.kv_slots) == (native.prompt_tokens, kept) and kept < native.kv_slots
    assert any(native != compressed for native, compressed in shown), shown


def test_similarity_is_the_cosine_of_get_embedding(demo, model, processor, images):
    labels, matrix = demo.similarity([images["red"], images["thin"]], "red\n\n  a thin picture  ")
    assert labels == ["red.png", "thin.png", "red", "a thin picture"]
    vectors = torch.cat(
        [
            _embed(model, processor, images=[images["red"], images["thin"]]),
            _embed(model, processor, texts=["red", "a thin picture"], instruction=TEXT_INSTRUCTION),
        ]
    )
    assert torch.allclose(matrix, vectors @ vectors.T, atol=1e-5)


def test_the_page_on_a_qwen3_vl_model_searches_and_answers_from_a_hit(browser, images, tmp_path):
    """The real page in headless Chromium, served on a Qwen3-VL folder: a text search, a picked hit, its answer."""
    qwen3_processor = make_tiny_processor(backbone="qwen3_vl")
    qwen3 = untied(make_tiny_crem(qwen3_processor, backbone="qwen3_vl"))
    folder = save_crem(qwen3, qwen3_processor, tmp_path / "model")
    model, processor = load_demo_model(folder)
    gallery = [(name, images[name], {"label": name}) for name in GALLERY]
    app = build_app(model, processor, gallery=gallery, workdir=str(tmp_path / "work"), top_k=3)
    _, url, _ = launch(app, "127.0.0.1", free_port(), block=False, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("#search-text textarea").fill("a blue square")
        page.locator("#search-button").click()
        memory = app.crem_demo.memory
        expected = memory.search(text="a blue square", k=3)
        rows = test_app.table(page, "search-hits")
        assert [row[1] for row in rows] == [hit.id for hit in expected]
        page.locator("#search-results button.thumbnail-item").nth(1).click()
        picked = expected[1].id
        sync_api.expect(page.locator("#search-pick input")).to_have_value(picked, timeout=test_app.WAIT_MS)
        page.locator("#search-question textarea").fill(QUESTION)
        page.locator("#search-ask").click()
        sync_api.expect(page.locator("#search-status")).to_contain_text(
            f"context of {picked}", timeout=test_app.WAIT_MS
        )
        shown = page.locator("#search-answer textarea").input_value()
        assert shown == _answer(model, processor, images[picked], QUESTION, compress=True, max_new_tokens=16)
        assert shown == memory.ask(QUESTION, [picked], max_new_tokens=16)[0]  # the page's default answer length
        assert "Traceback" not in page.content()
        page.close()
    finally:
        app.close()
