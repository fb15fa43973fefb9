"""The demo page's event handlers (`DemoPage`) called directly, without a server or a browser: each view tuple
checked against the model and the memory called on their own, every bad input a status line of an emptied view, and
the page's wiring (each event's outputs are its view's fields, in order)."""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import torch
from helpers import COLOURS, answers_both_ways, cosines_one_by_one, write_upload_images
from matplotlib.figure import Figure

from crem_hf.demo.app import (
    THUMBNAIL_SIDE,
    AskView,
    CREMDemo,
    DemoPage,
    EmbedView,
    GalleryAddView,
    SearchView,
    StoredAnswerView,
    UploadLimits,
    build_app,
    read_upload,
)
from crem_hf.instructions import T2I_INSTRUCTION

LIMITS = UploadLimits(max_bytes=60_000, max_pixels=200 * 200)
GALLERY = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_upload_images(tmp_path_factory.mktemp("uploads"))


def new_page(model, processor, images, workdir) -> DemoPage:
    demo = CREMDemo(model, processor, str(workdir), LIMITS)
    demo.start_gallery([(name, images[name], {"label": name}) for name in GALLERY])
    return DemoPage(demo)


@pytest.fixture(scope="module")
def page(model, processor, images, tmp_path_factory):
    """A page over a gallery of four colour squares (never changed: the gallery's own test makes its page)."""
    return new_page(model, processor, images, tmp_path_factory.mktemp("page"))


def cells(html: str) -> list[list[str]]:
    """The body rows of an HTML table, as cell texts."""
    body = html.split("<tbody>", 1)[1]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def is_error(status: str, *fragments: str) -> bool:
    return 'class="crem-status crem-error" role="alert"' in status and all(f in status for f in fragments)


def assert_empty(view, *fragments: str) -> None:
    """`view` is its class's empty view with an error line holding `fragments`."""
    assert is_error(view.status, *fragments), view.status
    assert view[:-1] == type(view).empty()[:-1]


def test_search_shows_the_memory_s_ranking_and_picks_the_best(page, images):
    memory = page.demo.memory
    view = page.search("a green square", None, 4)
    hits = memory.search(text="a green square", k=4)
    ids = [hit.id for hit in hits]
    assert isinstance(view, SearchView) and view.hit_ids == ids and sorted(ids) == sorted(GALLERY)
    assert cells(view.hits) == [[str(h.rank + 1), h.id, f"{h.score:.4f}", h.id] for h in hits]
    assert [caption for _, caption in view.thumbnails] == [f"#{h.rank + 1} {h.id} · {h.score:.3f}" for h in hits]
    for (thumbnail, _), hit in zip(view.thumbnails, hits, strict=True):  # each thumbnail shows its item's colour
        assert max(thumbnail.size) == THUMBNAIL_SIDE
        mean = np.asarray(thumbnail, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - COLOURS[hit.id]).max() < 10, (hit.id, mean)
    assert view.picker == {"__type__": "update", "choices": ids, "value": ids[0]}
    assert view.status == '<div class="crem-status crem-ok">4 hit(s) out of 4 gallery item(s).</div>'

    by_image = page.search("  ", [images["blue"]], 2)  # a gr.File value may be a list; a blank text is no text
    expected = memory.search(image=read_upload(images["blue"], page.demo.processor, LIMITS), k=2)
    assert by_image.hit_ids == [hit.id for hit in expected] and by_image.hit_ids[0] == "blue"
    assert cells(by_image.hits)[0][:3] == ["1", "blue", "1.0000"]  # the query image itself is stored


def test_pick_follows_the_picked_thumbnail(page):
    ids = ["blue", "green", "red"]
    assert page.pick(ids, 2) == "red"
    for hit_ids, index in ((ids, None), (ids, 3), ([], 0)):  # nothing to pick: the picker stays as it is
        assert page.pick(hit_ids, index) == {"__type__": "update"}


def test_ask_stored_answers_from_the_item_s_stored_context(page):
    view = page.ask_stored("green", "What is in the image?", 6)
    assert isinstance(view, StoredAnswerView)
    assert view.answer == page.demo.memory.ask("What is in the image?", ["green"], max_new_tokens=6)[0]
    assert view.status == (
        '<div class="crem-status crem-ok">Answered from the stored compressed context of green.</div>'
    )
    assert_empty(page.ask_stored(None, "What is in the image?", 6), "Pick a search result first")
    assert_empty(page.ask_stored("green", "   ", 6), "Type a question")


def test_ask_answers_natively_and_compressed_as_generate(page, model, processor, images):
    question, tokens = "Which colour is it?", 5
    view = page.ask(images["red"], question, tokens)
    oracle = answers_both_ways(model, processor, question, images["red"], tokens)
    prompt, kept, slot_bytes = oracle["prompt"], oracle["kept"], oracle["slot_bytes"]
    assert isinstance(view, AskView) and [view.native_answer, view.compressed_answer] == oracle["answers"]
    (native,), (compressed,) = cells(view.native_cost), cells(view.compressed_cost)
    assert native[:2] == [str(prompt), f"{prompt * slot_bytes:,}"]
    assert compressed[:2] == [str(kept), f"{kept * slot_bytes:,}"] and kept < prompt
    assert float(native[2]) > 0 and float(compressed[2]) > 0
    assert view.preview.tobytes() == read_upload(images["red"], processor, LIMITS).tobytes()
    saved = round(100 * (1 - kept / prompt))
    assert view.status == (
        f'<div class="crem-status crem-ok">Prompt of {prompt} tokens; the compressed cache holds {saved}% fewer '
        "slots.</div>"
    )
    assert_empty(page.ask(None, question, tokens), "Drop an image")
    assert_empty(page.ask(images["text"], question, tokens), "notes.png", "not an image")


def test_embed_compares_every_item_with_every_other(page, model, processor, images):
    view = page.embed([images["red"], images["green"]], "red\n\n  a green square  ", T2I_INSTRUCTION)
    expected = cosines_one_by_one(
        model, processor, [images["red"], images["green"]], ["red", "a green square"], T2I_INSTRUCTION
    )
    rows = cells(view.table)
    assert isinstance(view, EmbedView) and [row[0] for row in rows] == ["red.png", "green.png", "red", "a green square"]
    shown = torch.tensor([[float(v) for v in row[1:]] for row in rows])
    assert torch.allclose(shown, expected, atol=2e-3)
    assert isinstance(view.heat_map, Figure) and view.heat_map.axes[0].get_title() == "Similarity matrix"
    assert view.status == '<div class="crem-status crem-ok">4 items compared.</div>'
    assert_empty(page.embed([images["red"]], "", T2I_INSTRUCTION), "at least two items", "got 1")
    assert_empty(page.embed([images["red"], images["text"]], None, T2I_INSTRUCTION), "notes.png", "not an image")


def test_the_gallery_grows_by_uploads_and_clears(model, processor, images, tmp_path):
    page = new_page(model, processor, images, tmp_path)
    added = page.add([images["purple"], images["orange"]])
    assert isinstance(added, GalleryAddView) and added.uploads is None  # the added files leave the upload box
    ok = '<div class="crem-status crem-ok">'
    assert added.status == f"{ok}Added 2 image(s), 0 already in the gallery; the gallery holds 6 item(s).</div>"
    again = page.add(images["purple"])  # the same file again: the same item
    assert again.status == f"{ok}Added 0 image(s), 1 already in the gallery; the gallery holds 6 item(s).</div>"
    assert page.gallery_line() == '<div class="crem-status crem-ok">The gallery holds 6 item(s).</div>'
    twice = page.add([images["green"], images["green"]])  # the same file twice in one drop: one item
    assert twice.status == f"{ok}Added 1 image(s), 1 already in the gallery; the gallery holds 7 item(s).</div>"
    assert not [name for name in os.listdir(page.demo.workdir + "/uploads") if name.endswith(".tmp")]
    failed = page.add([images["text"]])
    assert failed.uploads == {"__type__": "update"} and is_error(failed.status, "notes.png", "not an image")
    assert_empty(page.add(None), "No images to add")

    cleared = page.clear()
    assert cleared == SearchView.empty('<div class="crem-status crem-ok">The gallery is empty now.</div>')
    assert page.demo.gallery_size() == 0
    assert_empty(page.search("red", None, 3), "gallery is empty")
    assert page.add(images["blue"]).status.endswith("the gallery holds 1 item(s).</div>")
    (only,) = page.search("red", None, 3).hit_ids  # k clamped to the one item: the upload, named after its file
    assert re.fullmatch(r"blue-[0-9a-f]{10}", only)


def test_a_bad_query_or_a_bug_is_a_status_line_and_the_hits_are_emptied(page, images, monkeypatch, caplog):
    assert_empty(page.search(None, None, 3), "Type a query")
    assert_empty(page.search("red", images["red"], 3), "Give one query")
    assert_empty(page.search("red", None, 0), "Top-k must be between 1 and 20")

    def broken(*args):
        raise RuntimeError("boom\nin search")

    monkeypatch.setattr(page.demo, "search", broken)
    with caplog.at_level(logging.ERROR):
        view = page.search("red", None, 3)
    assert_empty(view, "Unexpected error (RuntimeError): boom in search")
    assert "Traceback" in caplog.text and "The demo's search failed" in caplog.text


def test_each_event_of_the_page_shows_its_view(model, processor, tmp_path):
    """The page wires each handler to the components of its view's fields, in order, status line last."""
    app = build_app(model, processor, gallery=None, workdir=str(tmp_path))
    events = {fn.api_name: fn for fn in app.fns.values() if fn.api_name}
    expected = {
        "search": (SearchView, ["search-results", "search-hits", "search-pick", None, "search-status"]),
        "clear": (SearchView, ["search-results", "search-hits", "search-pick", None, "search-status"]),
        "ask_stored": (StoredAnswerView, ["search-answer", "search-status"]),
        "add": (GalleryAddView, ["gallery-upload", "search-status"]),
        "ask": (AskView, ["ask-preview", "native-answer", "native-stats", "compressed-answer", "compressed-stats",
                          "ask-status"]),
        "embed": (EmbedView, ["embed-plot", "embed-table", "embed-status"]),
    }  # fmt: skip
    assert set(expected) <= set(events)
    for name, (view, elem_ids) in expected.items():
        assert events[name].fn == getattr(app.crem_page, name)
        assert [output.elem_id for output in events[name].outputs] == elem_ids and len(view._fields) == len(elem_ids)
        assert events[name].concurrency_id == "model"
    picks = [fn for fn in app.fns.values() if fn.collects_event_data]
    assert len(picks) == 1 and [output.elem_id for output in picks[0].outputs] == ["search-pick"]
    app.close()
