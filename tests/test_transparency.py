"""Transparent images (RGBA, LA, palette PNGs with tRNS) become RGB composited onto white, in the processor, the
memory and the demo; checked against a composite computed here with numpy from the pixels each image was made of."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from crem_hf.demo.app import UploadLimits, _thumbnail, read_upload
from crem_hf.memory import CREMMemory, read_source
from crem_hf.processing_crem import rgb_on_white

HEIGHT, WIDTH = 56, 84


def composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The oracle: colour * a + 255 * (1 - a), a = alpha / 255, rounded; `colour` (H, W, 3) or (H, W), uint8."""
    if colour.ndim == 2:
        colour = np.repeat(colour[..., None], 3, axis=2)
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(colour * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _alpha(rng: np.random.Generator) -> np.ndarray:
    """Random alpha with fully transparent and fully opaque patches."""
    alpha = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    alpha[:10, :20] = 0
    alpha[-10:, -20:] = 255
    return alpha


@pytest.fixture(scope="module")
def transparent(tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    """Name -> (a PNG written to disk, its expected composite), one per kind of transparency."""
    folder = tmp_path_factory.mktemp("transparent")
    rng = np.random.default_rng(7)
    cases = {}

    colour = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    alpha = _alpha(rng)
    colour[alpha == 0] = 0  # what editors often leave under transparent pixels: black
    cases["rgba"] = (Image.fromarray(np.dstack([colour, alpha]), "RGBA"), composite(colour, alpha))

    grey = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    alpha = _alpha(rng)
    cases["la"] = (Image.fromarray(np.dstack([grey, alpha]), "LA"), composite(grey, alpha))

    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (HEIGHT, WIDTH), dtype=np.uint8)
    indices[:10, :20] = 5
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.tobytes())
    cases["p-index"] = (image, composite(palette[indices], np.where(indices == 5, 0, 255)))

    entry_alpha = rng.integers(0, 256, 16, dtype=np.uint8)
    entry_alpha[3] = 0
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.tobytes())
    cases["p-alpha"] = (image, composite(palette[indices], entry_alpha[indices]))
    transparency = {"p-index": 5, "p-alpha": entry_alpha.tobytes()}

    written = {}
    for name, (image, expected) in cases.items():
        path = folder / f"{name}.png"
        image.save(path, **({"transparency": transparency[name]} if name in transparency else {}))
        written[name] = (str(path), expected)
    with Image.open(written["p-index"][0]) as opened:
        assert opened.mode == "P" and opened.info["transparency"] == 5, "a real tRNS chunk, one transparent index"
    with Image.open(written["p-alpha"][0]) as opened:
        assert opened.mode == "P" and isinstance(opened.info["transparency"], bytes), "tRNS with per-entry alpha"
    return written


CASES = ["rgba", "la", "p-index", "p-alpha"]


def dropped_alpha(path: str) -> Image.Image:
    """What the old `convert("RGB")` gave: alpha dropped (the colour key PIL keeps in `info` stripped as well)."""
    with Image.open(path) as opened, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's advice to go through RGBA, which is the point here
        return Image.fromarray(np.asarray(opened.convert("RGB")))


@pytest.mark.parametrize("name", CASES)
def test_rgb_on_white_is_the_composite_and_plain_conversion_is_not(transparent, name):
    path, expected = transparent[name]
    with Image.open(path) as opened:
        composed = rgb_on_white(opened)
    naive = np.asarray(dropped_alpha(path))
    assert composed.mode == "RGB"
    assert np.array_equal(np.asarray(composed), expected)
    assert not np.array_equal(naive, expected), "the case must be one that dropping alpha gets wrong"


def test_opaque_rgb_and_grayscale_images_are_unchanged_byte_for_byte(processor, tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    for pixels in (rgb, grey):
        image = Image.fromarray(pixels)
        expected = (pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)).tobytes()
        assert rgb_on_white(image).tobytes() == expected
        image.save(tmp_path / "opaque.png")
        assert processor.load_image(str(tmp_path / "opaque.png")).tobytes() == expected


@pytest.mark.parametrize("name", CASES)
def test_processor_pixel_values_are_those_of_the_composited_image(processor, transparent, name):
    path, expected = transparent[name]
    oracle = Image.fromarray(expected)
    assert np.array_equal(np.asarray(processor.load_image(path)), expected)
    want = processor.process_embedding_inputs(images=[oracle])["pixel_values"]
    for source in (path, Image.open(path)):
        assert torch.equal(processor.process_embedding_inputs(images=[source])["pixel_values"], want)
    naive = processor.process_embedding_inputs(images=[dropped_alpha(path)])["pixel_values"]
    assert not torch.equal(naive, want)


def test_uint8_arrays_with_alpha_are_composited(processor, transparent):
    rng = np.random.default_rng(11)
    colour = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    alpha = _alpha(rng)
    loaded = processor.load_image(np.dstack([colour, alpha]))
    assert np.array_equal(np.asarray(loaded), composite(colour, alpha))


def test_a_large_transparent_image_is_composited_before_it_is_reduced(processor, tmp_path):
    """Reducing first would average the black hidden under transparent pixels into the result."""
    rng = np.random.default_rng(5)
    side = 1200
    colour = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    alpha = np.zeros((side, side), dtype=np.uint8)
    alpha[:, side // 2 :] = rng.integers(0, 256, (side, side // 2), dtype=np.uint8)
    colour[alpha == 0] = 0
    Image.fromarray(np.dstack([colour, alpha]), "RGBA").save(tmp_path / "large.png")
    loaded = processor.load_image(str(tmp_path / "large.png"), max_pixels=56 * 56)
    expected = processor.load_image(Image.fromarray(composite(colour, alpha)), max_pixels=56 * 56)
    assert loaded.size == expected.size and loaded.size[0] < side
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))
    assert (np.asarray(loaded)[:, : loaded.size[0] // 2 - 1] == 255).all(), "the transparent half is white"


def test_the_memory_stores_what_the_composited_images_embed_to(model, processor, transparent, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in CASES:
        (folder / f"{name}.png").write_bytes(open(transparent[name][0], "rb").read())
    items, failures = read_source(folder)
    assert failures == [] and [item.id for item in items] == sorted(f"{name}.png" for name in CASES)
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    report = memory.add(ids=[i.id for i in items], images=[i.image for i in items], batch_size=2, show_progress=False)
    assert (report.added, report.failed) == (4, 0)
    stored = {row["id"]: torch.tensor(row["vector"]) for row in memory.items.to_arrow().to_pylist()}
    names = [item.id.removesuffix(".png") for item in items]
    oracle = [Image.fromarray(transparent[name][1]) for name in names]
    with torch.no_grad():
        expected = model.get_embedding(**processor.process_embedding_inputs(images=oracle))
        naive = model.get_embedding(
            **processor.process_embedding_inputs(images=[dropped_alpha(transparent[n][0]) for n in names])
        )
    got = torch.stack([stored[item.id] for item in items])
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, naive, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_the_demo_reads_uploads_and_thumbnails_composited(processor, transparent, name):
    path, expected = transparent[name]
    upload = read_upload(path, processor, UploadLimits(max_bytes=1_000_000, max_pixels=1_000_000))
    assert np.array_equal(np.asarray(upload), expected)
    thumbnail = _thumbnail(path)
    oracle = Image.fromarray(expected)
    scale = thumbnail.size[0] / WIDTH
    assert thumbnail.size == (round(WIDTH * scale), round(HEIGHT * scale))
    assert np.array_equal(np.asarray(thumbnail), np.asarray(oracle.resize(thumbnail.size, Image.NEAREST)))
