"""The Gradio demo (`crem-demo`), served on 127.0.0.1 and driven by headless Chromium: uploads, queries, clicks, and
what the page shows checked against the model and the memory called directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import answers_both_ways, colour_image, cosines_one_by_one, free_port, write_upload_images
from PIL import Image
from playwright import sync_api

from crem_hf.demo.app import (
    UploadLimits,
    build_app,
    digits_gallery,
    guarded,
    launch,
    main,
    read_upload,
)
from crem_hf.instructions import T2I_INSTRUCTION

CHROMIUM = "/usr/bin/chromium"
#: Small limits, so that a "huge" upload is small on disk: 60 kB and 200 x 200 px.
LIMITS = UploadLimits(max_bytes=60_000, max_pixels=200 * 200)
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A PNG per colour, a text file, a file over the byte limit and an image over the pixel limit."""
    folder = tmp_path_factory.mktemp("uploads")
    paths = write_upload_images(folder)
    noise = np.random.default_rng(0).integers(0, 256, (150, 150, 3), dtype=np.uint8)
    paths["heavy"] = str(folder / "heavy.png")  # 150 x 150 px of noise: ~68 kB, over the 60 kB limit
    Image.fromarray(noise).save(paths["heavy"])
    paths["giant"] = str(folder / "giant.png")  # ~480 kB: beyond gradio's own cap (4 x the limit), refused on upload
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(paths["giant"])
    paths["wide"] = str(folder / "wide.png")  # 400 x 300 px of one colour: tiny file, over the 40,000 px limit
    Image.new("RGB", (400, 300), (10, 200, 10)).save(paths["wide"])
    return paths


@pytest.fixture(scope="module")
def served(model, processor, images, tmp_path_factory):
    """The app on a free local port, its gallery four colour squares."""
    gallery = [(name, images[name], {"label": name}) for name in ("red", "green", "blue", "yellow")]
    app = build_app(
        model, processor, gallery=gallery, workdir=str(tmp_path_factory.mktemp("demo")), limits=LIMITS, top_k=3
    )
    _, url, _ = launch(app, "127.0.0.1", free_port(), block=False, quiet=True)
    yield app, url
    app.close()


@pytest.fixture(scope="module")
def browser():
    # A missing browser fails the tests (never a silent skip): scripts/install-browser.sh installs Debian's chromium.
    assert os.path.exists(CHROMIUM), (
        f"no Chromium at {CHROMIUM}: run scripts/install-browser.sh (apt-get install chromium)"
    )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served[1])
    yield page
    assert "Traceback" not in page.content()
    page.close()


def upload(page, elem_id: str, *paths: str) -> None:
    """Set the files of a `gr.File` and wait until the page lists them (uploaded to the server)."""
    page.locator(f"#{elem_id} input[type=file]").set_input_files(list(paths))
    for path in paths:
        page.locator(f'#{elem_id} td.filename[aria-label="{os.path.basename(path)}"]').wait_for(timeout=WAIT_MS)


def clear_file(page, elem_id: str) -> None:
    """Press the Clear button of a `gr.File`."""
    page.locator(f"#{elem_id} button[aria-label='Clear']").click()
    page.locator(f"#{elem_id} td.filename").first.wait_for(state="detached", timeout=WAIT_MS)


def set_number(page, elem_id: str, value: int) -> None:
    """Type a slider's value into its number box."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def table(page, elem_id: str) -> list[list[str]]:
    """The body cells of the HTML table in an element, once it has rows."""
    page.locator(f"#{elem_id} td").first.wait_for(timeout=WAIT_MS)
    rows = page.locator(f"#{elem_id} tbody tr")
    return [rows.nth(i).locator("td").all_inner_texts() for i in range(rows.count())]


def error_of(page, elem_id: str, *fragments: str) -> str:
    """The error line an element shows, checked to hold `fragments`."""
    alert = page.locator(f"#{elem_id} .crem-error")
    for fragment in fragments:
        sync_api.expect(alert).to_contain_text(fragment, timeout=WAIT_MS)
    return alert.inner_text()


def test_ask_tab_shows_native_and_compressed_answers_with_their_cache(page, model, processor, images):
    page.get_by_role("tab", name="Ask").click()
    upload(page, "ask-image", images["red"])
    page.locator("#ask-question textarea").fill("What is in the image?")
    set_number(page, "ask-tokens", 4)
    page.locator("#ask-button").click()
    native, compressed = table(page, "native-stats"), table(page, "compressed-stats")

    oracle = answers_both_ways(model, processor, "What is in the image?", images["red"], 4)
    prompt, kept, slot_bytes, answers = oracle["prompt"], oracle["kept"], oracle["slot_bytes"], oracle["answers"]
    assert [int(native[0][0]), int(compressed[0][0])] == [prompt, kept] and kept < prompt
    assert [native[0][1], compressed[0][1]] == [f"{prompt * slot_bytes:,}", f"{kept * slot_bytes:,}"]
    assert float(native[0][2]) > 0 and float(compressed[0][2]) > 0
    assert page.locator("#native-answer textarea").input_value() == answers[0]
    assert page.locator("#compressed-answer textarea").input_value() == answers[1]
    saved = round(100 * (1 - kept / prompt))
    sync_api.expect(page.locator("#ask-status")).to_contain_text(f"Prompt of {prompt} tokens")
    sync_api.expect(page.locator("#ask-status")).to_contain_text(f"{saved}% fewer slots")


def test_search_tab_ranks_the_gallery_and_answers_from_a_picked_hit(page, served, model, processor, images):
    memory = served[0].crem_demo.memory
    upload(page, "search-image", images["blue"])
    page.locator("#search-button").click()
    rows = table(page, "search-hits")
    expected = memory.search(image=processor.load_image(images["blue"]), k=3)
    assert [row[1] for row in rows] == [hit.id for hit in expected]
    assert [row[2] for row in rows] == [f"{hit.score:.4f}" for hit in expected]
    assert rows[0][1:] == ["blue", "1.0000", "blue"]  # the query image itself is stored: cosine 1
    assert page.locator("#search-results img").count() == 3

    # A text query: its own ranking, the same as the memory's.
    clear_file(page, "search-image")
    page.locator("#search-text textarea").fill("a green square")
    set_number(page, "search-k", 4)
    page.locator("#search-button").click()
    sync_api.expect(page.locator("#search-status")).to_contain_text("4 hit(s) out of 4", timeout=WAIT_MS)
    text_hits = memory.search(text="a green square", k=4)  # after the page's: the server's calls hold a lock
    assert [row[1] for row in table(page, "search-hits")] == [hit.id for hit in text_hits]

    # Pick the third thumbnail: the dropdown follows, and the answer comes from that item's stored context.
    page.locator("#search-results button.thumbnail-item").nth(2).click()
    picked = text_hits[2].id
    sync_api.expect(page.locator("#search-pick input")).to_have_value(picked, timeout=WAIT_MS)
    page.locator("#search-question textarea").fill("What is in the image?")
    page.locator("#search-ask").click()
    sync_api.expect(page.locator("#search-status")).to_contain_text(f"context of {picked}", timeout=WAIT_MS)
    answer = memory.ask("What is in the image?", [picked], max_new_tokens=16)[0]
    assert page.locator("#search-answer textarea").input_value() == answer


def test_embed_tab_draws_the_similarity_matrix(page, model, processor, images):
    page.get_by_role("tab", name="Embed").click()
    upload(page, "embed-images", images["red"], images["green"])
    page.locator("#embed-texts textarea").fill("red\n\n  a green square  ")
    page.locator("#embed-button").click()
    rows = table(page, "embed-table")
    expected = cosines_one_by_one(  # the oracle: each item embedded alone (batch independence), cosine by hand
        model, processor, [images["red"], images["green"]], ["red", "a green square"], T2I_INSTRUCTION
    )
    assert [row[0] for row in rows] == ["red.png", "green.png", "red", "a green square"]
    shown = torch.tensor([[float(v) for v in row[1:]] for row in rows])
    assert torch.allclose(shown, expected, atol=2e-3) and torch.equal(shown, shown.T)
    assert page.locator("#embed-plot img").count() == 1
    sync_api.expect(page.locator("#embed-status")).to_contain_text("4 items compared")


def test_bad_inputs_are_messages_in_the_page_and_the_server_keeps_serving(page, served, images):
    page.get_by_role("tab", name="Ask").click()
    page.locator("#ask-button").click()
    error_of(page, "ask-status", "Drop an image")
    for name, fragments in (
        ("text", ("notes.png", "not an image")),
        ("heavy", ("heavy.png", "at most 0.1 MB")),
        ("wide", ("wide.png", "400x300 px", "at most 0.0 megapixels")),
    ):
        if name != "text":
            clear_file(page, "ask-image")
        upload(page, "ask-image", images[name])
        page.locator("#ask-button").click()
        error_of(page, "ask-status", *fragments)
        assert page.locator("#native-answer textarea").input_value() == ""
    clear_file(page, "ask-image")
    page.locator("#ask-image input[type=file]").set_input_files(images["giant"])
    sync_api.expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible(timeout=WAIT_MS)
    upload(page, "ask-image", images["green"])
    page.locator("#ask-button").click()
    assert int(table(page, "native-stats")[0][0]) > 0  # still serving

    page.get_by_role("tab", name="Embed").click()
    upload(page, "embed-images", images["red"], images["text"])
    page.locator("#embed-button").click()
    error_of(page, "embed-status", "notes.png", "not an image")

    page.get_by_role("tab", name="Search").click()
    page.locator("#search-button").click()
    error_of(page, "search-status", "Type a query")
    page.get_by_text("Add images to the gallery").click()  # opens the accordion
    page.locator("#gallery-clear").click()
    sync_api.expect(page.locator("#search-status")).to_contain_text("empty now", timeout=WAIT_MS)
    page.locator("#search-text textarea").fill("red")
    page.locator("#search-button").click()
    error_of(page, "search-status", "gallery is empty")
    upload(page, "gallery-upload", images["purple"], images["orange"])
    page.locator("#gallery-add").click()
    sync_api.expect(page.locator("#search-status")).to_contain_text("Added 2 image(s)", timeout=WAIT_MS)
    page.locator("#search-button").click()
    rows = table(page, "search-hits")
    assert sorted(row[3] for row in rows) == ["orange.png", "purple.png"]  # k=3 clamped to the 2 items
    assert served[0].crem_demo.gallery_size() == 2


def test_read_upload_checks_bytes_pixels_and_format_before_decoding(processor, images):
    assert read_upload(images["red"], processor, LIMITS).size == (56, 56)
    for name, fragment in (("text", "not an image"), ("heavy", "0.1 MB"), ("wide", "0.0 megapixels")):
        with pytest.raises(ValueError, match=fragment):
            read_upload(images[name], processor, LIMITS)
    with pytest.raises(ValueError, match="gone from the server"):
        read_upload(images["red"] + ".missing", processor, LIMITS)


def test_digits_gallery_reads_the_held_out_scans(tmp_path):
    """The gallery rows come from the held-out QA file (a written folder is read, not rebuilt)."""
    (tmp_path / "eval").mkdir()
    rows = [{"image": f"images/scan_{i:04d}.png", "question": "Which digit is shown?", "answer": w} for i, w in
            ((21, "one"), (24, "four"), (30, "zero"))]  # fmt: skip
    (tmp_path / "eval" / "qa_single.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = digits_gallery(tmp_path, limit=2)
    assert items == [
        ("scan_0021", str(tmp_path / "images" / "scan_0021.png"), {"label": "one"}),
        ("scan_0024", str(tmp_path / "images" / "scan_0024.png"), {"label": "four"}),
    ]


def test_crem_demo_refuses_what_is_not_a_crem_model_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    for argv, fragments in (
        (["--model", str(tmp_path / "nothing")], ("nothing", "no such folder")),
        (["--model", str(tmp_path / "empty")], ("empty", "holds no model")),
        (["--model", str(tmp_path / "bert")], ("'bert'", "expected a CREM folder")),
        (["--model", str(tmp_path / "bert"), "--port", "0"], ("--port 0",)),
    ):
        assert main(argv) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("crem-demo: error:"), lines
        assert all(fragment in lines[0] for fragment in fragments), lines[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-m", "crem_hf.demo.app", "--model", str(tmp_path / "bert")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crem-demo: error:") and "'bert'" in lines[0], done.stderr


def test_an_unexpected_error_is_one_line_in_the_page_and_a_traceback_in_the_log(caplog):
    def broken(value):
        raise RuntimeError(f"boom\nat {value}")

    outputs = guarded(broken, ("", None))("x")
    assert outputs[:2] == ("", None)
    assert (
        outputs[2]
        == '<div class="crem-status crem-error" role="alert">Unexpected error (RuntimeError): boom at x</div>'
    )
    assert "Traceback" in caplog.text and "boom" in caplog.text
    user = guarded(lambda: (_ for _ in ()).throw(ValueError("<b>bad</b> input")), ("",))()
    assert user == ("", '<div class="crem-status crem-error" role="alert">&lt;b&gt;bad&lt;/b&gt; input</div>')


def test_a_folder_gallery_or_none(model, processor, images, tmp_path):
    folder = tmp_path / "gallery"
    folder.mkdir()
    for name in ("red", "blue"):
        colour_image(name, 7).save(folder / f"{name}.png")
    demo = build_app(model, processor, gallery=str(folder), workdir=str(tmp_path / "work")).crem_demo
    hits = demo.search(None, str(folder / "blue.png"), 5)  # k above the gallery's size: the whole gallery
    assert [hit.id for hit in hits] == ["blue.png", "red.png"] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    empty = build_app(model, processor, gallery="none", workdir=str(tmp_path / "empty")).crem_demo
    with pytest.raises(ValueError, match="gallery is empty"):
        empty.search("red", None, 3)
    with pytest.raises(ValueError, match="expected 'digits', 'none' or a folder"):
        build_app(model, processor, gallery=str(tmp_path / "missing"), workdir=str(tmp_path / "other"))
