"""The caption reader of `crem-eval retrieval` / `compositional` / `generation` keeps image paths inside the image
root with the check the MMEB and training readers use (`formats.outside_root`): refused with an error naming the
row and the path, as a function and as a command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import colour_image

from crem_hf.evaluation.cli import main as crem_eval
from crem_hf.evaluation.retrieval import load_caption_rows
from crem_hf.formats import OUTSIDE_ROOT
from crem_hf.training import load_retrieval_pairs


@pytest.fixture
def layout(tmp_path):
    """`root/red.png` inside the image root, `outside/blue.png` next to it; returns (root, outside file)."""
    root, elsewhere = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    elsewhere.mkdir()
    colour_image("red", 0).save(root / "red.png")
    colour_image("blue", 1).save(elsewhere / "blue.png")
    return root, elsewhere / "blue.png"


def write_rows(path, images: list[str]) -> str:
    path.write_text("".join(json.dumps({"image": image, "captions": ["a colour"]}) + "\n" for image in images))
    return str(path)


def error_lines(stderr: str) -> list[str]:
    """stderr without datasets' "Generating train split" progress lines (printed by any first read of a file)."""
    return [line for line in stderr.strip().splitlines() if "examples/s" not in line]


def escapes(root, outside) -> list[str]:
    """Paths that leave `root`, each naming an existing file: ../, absolute, ../ after a sub-folder."""
    return [f"../{outside.parent.name}/{outside.name}", str(outside), f"sub/../../{outside.parent.name}/{outside.name}"]


def test_escaping_image_paths_are_refused_naming_the_row_and_the_path(layout, tmp_path):
    root, outside = layout
    assert load_caption_rows(write_rows(tmp_path / "ok.jsonl", ["red.png"]), ("captions",), str(root))[0]["image"] == (
        str(root / "red.png")
    )
    for path in escapes(root, outside):
        data = write_rows(tmp_path / "rows.jsonl", ["red.png", path])
        with pytest.raises(ValueError) as caught:
            load_caption_rows(data, ("captions",), str(root))
        message = str(caught.value)
        assert f"rows.jsonl, row 1: {OUTSIDE_ROOT} ({path})." in message and "no ../" in message
    # Without an image root, paths are used as they are (as in the MMEB reader).
    data = write_rows(tmp_path / "rows.jsonl", [str(outside)])
    assert load_caption_rows(data, ("captions",))[0]["image"] == str(outside)


def test_crem_eval_retrieval_refuses_an_escaping_path_in_one_line_before_loading_the_model(layout, tmp_path, capsys):
    root, outside = layout
    data = write_rows(tmp_path / "rows.jsonl", ["red.png", str(outside)])
    no_model = tmp_path / "model"  # exists, holds nothing: the data is refused before any model is loaded
    no_model.mkdir()
    argv = ["retrieval", "--model", str(no_model), "--data", data, "--image-root", str(root), "--device", "cpu"]
    assert crem_eval(argv) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("crem-eval: error: ") and OUTSIDE_ROOT in lines[0], lines
    assert str(outside) in lines[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "crem_hf.evaluation.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 1 and done.stdout == ""
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and OUTSIDE_ROOT in lines[0] and str(outside) in lines[0], done.stderr


def test_a_link_inside_the_root_is_followed_as_by_the_training_reader(layout, tmp_path):
    """The shared check reads the path's text (a root made of links works): a link placed in the root is trusted,
    by this reader and the training reader alike; only the data file's paths are checked."""
    root, outside = layout
    os.symlink(outside, root / "linked.png")
    rows = load_caption_rows(write_rows(tmp_path / "rows.jsonl", ["linked.png"]), ("captions",), str(root))
    assert rows[0]["image"] == str(root / "linked.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"qry": "<|image_1|>\nRepresent it.", "qry_image_path": "linked.png", "pos_text": "x"}))
    _, report = load_retrieval_pairs(str(pairs), image_root=str(root))
    assert report.kept == 1 and report.skipped == {}
