"""Image loading: 16-bit grayscale, EXIF orientation, decompression bombs, reduced decoding, URLs."""

from __future__ import annotations

import functools
import http.server
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from crem_hf.testing import make_tiny_processor


def ramp_16bit(path) -> np.ndarray:
    """A 16-bit grayscale PNG whose columns go from 0 to 65535; returns the values."""
    values = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))
    Image.fromarray(values).save(path)
    return values


def test_16bit_grayscale_keeps_relative_intensities(processor, tmp_path):
    values = ramp_16bit(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode.startswith("I")
    for source in (str(tmp_path / "ramp.png"), Image.open(tmp_path / "ramp.png")):
        pixels = np.asarray(processor.load_image(source)).astype(int)
        assert pixels.shape == (64, 256, 3) and (pixels[..., 0] == pixels[..., 2]).all()
        assert np.abs(pixels[..., 0] - values / 257.0).max() <= 0.5 + 1e-9
        assert (pixels == 255).mean() < 0.01


def write_rotated_jpeg(path) -> None:
    """A 120x60 (w x h) JPEG, dark on the left and bright on the right, with EXIF orientation 6 (turn 90° right)."""
    pixels = np.zeros((60, 120, 3), dtype=np.uint8)
    pixels[:, 60:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def assert_upright(image: Image.Image) -> None:
    # Turned 90° clockwise, the dark left half is on top.
    pixels = np.asarray(image.convert("L")).astype(int)
    assert image.size == (60, 120)
    assert pixels[:55].mean() < 10 and pixels[65:].mean() > 245


def test_exif_rotated_jpeg_loads_upright(processor, tmp_path):
    path = tmp_path / "rotated.jpg"
    write_rotated_jpeg(path)
    assert Image.open(path).size == (120, 60), "stored sideways"
    assert_upright(processor.load_image(str(path)))
    assert_upright(processor.load_image(Image.open(path)))
    batch = processor.process_embedding_inputs(images=[str(path)])
    assert (
        batch["image_grid_thw"].tolist()
        == processor.process_embedding_inputs(images=[processor.load_image(str(path))])["image_grid_thw"].tolist()
    )


def write_png_header(path, width: int, height: int) -> None:
    """A 1-bit grayscale PNG of the given size that holds one row of data (Image.open reads the header only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x00" * ((width + 7) // 8))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_value_error_naming_the_file(processor, tmp_path):
    path = tmp_path / "huge.png"
    write_png_header(path, 20000, 20000)
    assert path.stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"images\[0\].*huge\.png.*too large"):
        processor.process_embedding_inputs(images=[str(path)])


def smooth_image(size: int) -> Image.Image:
    """A smooth colour gradient of `size` x `size` px (so that every downscaling method agrees on it)."""
    ramp = Image.linear_gradient("L").resize((size, size), Image.Resampling.BILINEAR)
    return Image.merge(
        "RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    )


def test_large_jpeg_decodes_at_reduced_size(processor, tmp_path, monkeypatch):
    path = tmp_path / "large.jpg"
    smooth_image(6000).save(path, quality=90)
    decoded = []
    original_load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    image = processor.load_image(str(path), max_pixels=112 * 112)
    assert decoded and decoded[0] == (750, 750), "the JPEG decoder ran at 1/8 scale (Image.draft)"
    assert max(image.size) <= 4 * 112 and min(image.size) >= 2 * 112
    monkeypatch.undo()
    reduced = processor.process_embedding_inputs(images=[str(path)], max_pixels=112 * 112)
    assert reduced["image_grid_thw"].tolist() == [[1, 8, 8]]  # 112 x 112 px, as for the full image
    # Oracle: the full image resized to 112 x 112 in one step, which the image processor then keeps as it is.
    direct = smooth_image(6000).resize((112, 112), Image.Resampling.BICUBIC)
    reference = processor.process_embedding_inputs(images=[direct], max_pixels=112 * 112)
    assert (reduced["pixel_values"] - reference["pixel_values"]).abs().mean() < 0.02


def test_large_png_is_reduced_before_the_image_processor(processor, tmp_path):
    path = tmp_path / "large.png"
    smooth_image(1200).save(path)
    image = processor.load_image(str(path), max_pixels=56 * 56)
    assert image.size == (120, 120), "box-reduced by 10, about twice the kept resolution per side"
    assert processor.load_image(smooth_image(1200), max_pixels=56 * 56).size == (120, 120)
    assert processor.load_image(str(path), max_pixels=600 * 600).size == (1200, 1200), "no reduction when it fits"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_url_is_a_value_error_with_the_timeout(processor):
    url = f"http://127.0.0.1:{closed_port()}/cat.png"
    with pytest.raises(ValueError, match=r"images\[0\].*cannot download.*127\.0\.0\.1.*image_timeout"):
        processor.process_embedding_inputs(images=[url])


def test_url_timeout_is_honoured(tmp_path):
    processor = make_tiny_processor(image_timeout=0.5)
    errors = []

    def load(url: str) -> None:
        try:
            processor.load_image(url)
        except Exception as error:  # noqa: BLE001 - the test checks which error it is
            errors.append(error)

    with socket.socket() as silent:  # accepts connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        worker = threading.Thread(target=load, args=(f"http://127.0.0.1:{silent.getsockname()[1]}/cat.png",))
        worker.daemon = True
        began = time.monotonic()
        worker.start()
        worker.join(timeout=10)
        assert not worker.is_alive(), "the download must give up after image_timeout"
        assert time.monotonic() - began < 5
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and "image_timeout=0.5" in str(errors[0])
    processor.save_pretrained(tmp_path)
    assert type(processor).from_pretrained(tmp_path).image_timeout == 0.5


def test_url_images_take_the_file_path(processor, tmp_path):
    write_rotated_jpeg(tmp_path / "rotated.jpg")
    values = ramp_16bit(tmp_path / "ramp.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert_upright(processor.load_image(f"{base}/rotated.jpg"))
        from_url = np.asarray(processor.load_image(f"{base}/ramp.png"))
        assert np.abs(from_url[..., 0] - values / 257.0).max() <= 0.5 + 1e-9
        assert np.array_equal(from_url, np.asarray(processor.load_image(str(tmp_path / "ramp.png"))))
    finally:
        server.shutdown()
        server.server_close()
