"""MMEB data as users download it: the Hub layouts of MMEB-eval and MMEB-train, written here as parquet files with
the real column names, and the row forms real copies contain."""

from __future__ import annotations

import json
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import colour_image

from crem_hf import encode
from crem_hf.evaluation import evaluate_mmeb, load_mmeb_subset
from crem_hf.training import load_retrieval_pairs

CLASSIFY = "<|image_1|>\nRepresent the given image for classification."
COLOURS = ("red", "green", "blue")


def write_parquet(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def eval_rows() -> list[dict]:
    """Three ImageNet-1K-style queries (image -> label text); the last one's candidates are all the same text."""
    rows = [
        {
            "qry_text": CLASSIFY,
            "qry_img_path": f"ImageNet-1K/{c}.png",
            "tgt_text": [c, "x", "y"],
            "tgt_img_path": [""] * 3,
        }
        for c in COLOURS[:2]
    ]
    # A tie of the ground truth with every other candidate: the first maximum is the ground truth, so it counts.
    rows.append(
        {"qry_text": CLASSIFY, "qry_img_path": "ImageNet-1K/blue.png", "tgt_text": ["z"] * 3, "tgt_img_path": [""] * 3}
    )
    return rows


@pytest.fixture
def mmeb_eval(tmp_path):
    """A local copy of TIGER-Lab/MMEB-eval: `<subset>/test-00000-of-00001.parquet`, images unzipped apart."""
    data, images = tmp_path / "MMEB-eval", tmp_path / "eval_images"
    write_parquet(data / "ImageNet-1K" / "test-00000-of-00001.parquet", eval_rows())
    (images / "ImageNet-1K").mkdir(parents=True)
    for i, name in enumerate(COLOURS):
        colour_image(name, i).save(images / "ImageNet-1K" / f"{name}.png")
    return data, images


def test_eval_reads_the_hub_layout_and_scores_ground_truth_first(model, processor, mmeb_eval):
    data, images = mmeb_eval
    rows = load_mmeb_subset(data, "ImageNet-1K", image_root=str(images))
    assert [r.candidate_texts for r in rows] == [["red", "x", "y"], ["green", "x", "y"], ["z", "z", "z"]]
    assert rows[0].query_image == str(images / "ImageNet-1K" / "red.png")
    assert rows[0].query_text == "Represent the given image for classification."

    results = evaluate_mmeb(model, processor, data, ["ImageNet-1K"], str(images), batch_size=2)
    # Independent oracle: each row scored on its own, ground truth at index 0, ties going to it.
    correct = []
    for row in rows:
        query = encode(model, processor, images=[row.query_image], texts=[row.query_text], show_progress=False)[0]
        candidates = encode(model, processor, texts=row.candidate_texts, show_progress=False)
        scores = candidates @ query
        correct.append(bool(scores[0] >= scores.max() - 1e-6))
    assert correct[2], "an all-tie row counts for the ground truth"
    assert results["subsets"]["ImageNet-1K"]["precision_at_1"] == pytest.approx(sum(correct) / 3)
    assert results["subsets"]["ImageNet-1K"]["num_queries"] == 3


def test_eval_flat_layout_and_ambiguous_layouts(mmeb_eval):
    data, images = mmeb_eval
    flat = data.parent / "flat"
    flat.mkdir()
    with open(flat / "ImageNet-1K.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in eval_rows())
    from_flat = load_mmeb_subset(flat, "ImageNet-1K", image_root=str(images))
    assert from_flat == load_mmeb_subset(data, "ImageNet-1K", image_root=str(images))
    write_parquet(data / "ImageNet-1K.parquet", eval_rows())  # now both layouts hold the subset
    with pytest.raises(ValueError, match="several files could hold its rows"):
        load_mmeb_subset(data, "ImageNet-1K", image_root=str(images))
    with pytest.raises(ValueError, match=r"Subset N24News: found no .*N24News/test-\*\.parquet"):
        load_mmeb_subset(flat, "N24News", image_root=str(images))


def test_one_file_is_one_subset(model, processor, mmeb_eval):
    data, images = mmeb_eval
    file = data / "ImageNet-1K" / "test-00000-of-00001.parquet"
    with pytest.raises(ValueError, match="one file, so it holds one subset"):
        evaluate_mmeb(model, processor, file, ["ImageNet-1K", "N24News"], str(images))
    with pytest.raises(ValueError, match="holds the ImageNet-1K subset, not N24News"):
        load_mmeb_subset(file, "N24News", image_root=str(images))
    assert len(load_mmeb_subset(file, "ImageNet-1K", image_root=str(images))) == 3


def test_missing_images_point_at_images_zip(mmeb_eval):
    data, images = mmeb_eval
    with zipfile.ZipFile(data / "images.zip", "w") as archive:
        archive.writestr("ImageNet-1K/red.png", b"")
    with pytest.raises(ValueError, match=r"row 0: query: missing image .*images\.zip: unzip it.*test-00000"):
        load_mmeb_subset(data, "ImageNet-1K", image_root=str(data))


def test_tgt_text_as_one_string_beside_a_list_of_images(mmeb_eval):
    data, images = mmeb_eval
    image_rows = [
        {
            "qry_text": "Find the red one.",
            "qry_img_path": "",
            "tgt_text": "",  # image-only candidates, as VLM2Vec reads them: "" for every image
            "tgt_img_path": [f"ImageNet-1K/{c}.png" for c in COLOURS],
        }
    ]
    write_parquet(data / "VisualNews_t2i" / "test-00000-of-00001.parquet", image_rows)
    (row,) = load_mmeb_subset(data, "VisualNews_t2i", image_root=str(images))
    assert row.candidate_texts == ["", "", ""]
    assert row.candidate_images == [str(images / "ImageNet-1K" / f"{c}.png") for c in COLOURS]

    image_rows[0]["tgt_text"] = "<|image_1|>\nRepresent the given image."
    write_parquet(data / "VisualNews_t2i" / "test-00000-of-00001.parquet", image_rows)
    with pytest.raises(ValueError, match=r"row 0: tgt_text is one string .* list of 3 tgt_img_path.*VisualNews_t2i"):
        load_mmeb_subset(data, "VisualNews_t2i", image_root=str(images))


def train_rows(name: str, count: int) -> list[dict]:
    return [
        {
            "qry": CLASSIFY,
            "qry_image_path": f"images/{name}.png",
            "pos_text": name,
            "pos_image_path": "",
            "neg_text": "",
            "neg_image_path": "",
        }
        for _ in range(count)
    ]


@pytest.fixture
def mmeb_train(tmp_path):
    """A local copy of TIGER-Lab/MMEB-train: `<subset>/{original,diverse_instruction}-00000-of-00001.parquet`."""
    (tmp_path / "images").mkdir()
    for i, name in enumerate(COLOURS):
        colour_image(name, i).save(tmp_path / "images" / f"{name}.png")
    data = tmp_path / "MMEB-train"
    write_parquet(data / "ImageNet_1K" / "original-00000-of-00001.parquet", train_rows("red", 3))
    write_parquet(data / "ImageNet_1K" / "diverse_instruction-00000-of-00001.parquet", train_rows("green", 2))
    write_parquet(data / "N24News" / "original-00000-of-00001.parquet", train_rows("blue", 2))
    return data, tmp_path


def test_train_reads_the_hub_layout(mmeb_train):
    data, root = mmeb_train
    rows, report = load_retrieval_pairs(data, image_root=str(root), split="original", subset=["N24News", "ImageNet_1K"])
    assert report.total == 5 and report.kept == 5
    assert rows["pos_text"] == ["blue"] * 2 + ["red"] * 3
    assert rows["group"] == [0, 0, 1, 1, 1], "one group per subset, for homogeneous batches"
    assert rows["source"][0] == str(data / "N24News" / "original-00000-of-00001.parquet")
    assert rows["source_row"] == [0, 1, 0, 1, 2]

    every, _ = load_retrieval_pairs(data, image_root=str(root), split="original")  # every subset, sorted
    assert every["pos_text"] == ["red"] * 3 + ["blue"] * 2
    diverse, _ = load_retrieval_pairs(data, image_root=str(root), split="diverse_instruction", subset="ImageNet_1K")
    assert diverse["pos_text"] == ["green"] * 2
    files = [str(data / s / "original-00000-of-00001.parquet") for s in ("ImageNet_1K", "N24News")]
    by_files, _ = load_retrieval_pairs(files, image_root=str(root))
    assert by_files["pos_text"] == every["pos_text"] and by_files["group"] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"Subset N24News: found no .*; .*N24News holds \['original-"):
        load_retrieval_pairs(data, image_root=str(root), split="diverse_instruction", subset="N24News")


def test_train_keeps_image_only_negatives(mmeb_train):
    data, root = mmeb_train
    rows = train_rows("red", 1)
    rows[0].update(neg_text="", neg_image_path="images/blue.png")  # VLM2Vec keeps an image-only negative
    write_parquet(data / "ImageNet_1K" / "original-00000-of-00001.parquet", rows)
    kept, report = load_retrieval_pairs(data, image_root=str(root), split="original", subset="ImageNet_1K")
    assert report.skipped == {} and kept["neg_texts"] == [[""]]
    assert kept["neg_images"] == [[str(root / "images" / "blue.png")]]


def test_scores_do_not_depend_on_the_layout(model, processor, mmeb_eval):
    data, images = mmeb_eval
    flat = data.parent / "flat"
    write_parquet(flat / "ImageNet-1K.parquet", eval_rows())
    hub = evaluate_mmeb(model, processor, data, ["ImageNet-1K"], str(images))["subsets"]["ImageNet-1K"]
    plain = evaluate_mmeb(model, processor, flat, ["ImageNet-1K"], str(images))["subsets"]["ImageNet-1K"]
    assert hub == plain
    assert torch.tensor(hub["num_unique_candidates"]) == 5


def test_eval_image_paths_stay_inside_the_image_root(mmeb_eval):
    data, images = mmeb_eval
    rows = eval_rows()
    rows[1]["qry_img_path"] = f"../{images.name}/ImageNet-1K/green.png"  # an existing file, reached through ../
    write_parquet(data / "ImageNet-1K" / "test-00000-of-00001.parquet", rows)
    with pytest.raises(ValueError, match="row 1: query: image path outside the image root"):
        load_mmeb_subset(data, "ImageNet-1K", image_root=str(images))
    rows = eval_rows()
    for row in rows:
        row["qry_img_path"] = str(images / row["qry_img_path"])  # absolute paths, no image root: used as they are
    write_parquet(data / "ImageNet-1K" / "test-00000-of-00001.parquet", rows)
    assert load_mmeb_subset(data, "ImageNet-1K")[0].query_image == str(images / "ImageNet-1K" / "red.png")
