"""Evaluation: the MMEB scorer against hand-computed values and the paper, recall@k, bad eval data."""

from __future__ import annotations

import json

import pytest
import torch

from crem_hf.evaluation import MMEB_DATASETS, evaluate_mmeb, load_mmeb_subset, markdown_table, summarize
from crem_hf.evaluation.generation import normalize_answer
from crem_hf.evaluation.mmeb import precision_at_1
from crem_hf.evaluation.retrieval import recall_at_k

# The CREM 2B column of the paper's Table 6 (supplement), per dataset.
CREM_2B = {
    "ImageNet-1K": 82.6, "N24News": 77.8, "HatefulMemes": 62.1, "VOC2007": 80.8, "SUN397": 77.5, "Place365": 41.5,
    "ImageNet-A": 47.6, "ImageNet-R": 90.8, "ObjectNet": 72.2, "Country211": 25.1, "OK-VQA": 63.9, "A-OKVQA": 53.4,
    "DocVQA": 91.7, "InfographicsVQA": 65.2, "ChartQA": 53.3, "Visual7W": 52.7, "ScienceQA": 42.5, "VizWiz": 48.2,
    "GQA": 54.0, "TextVQA": 82.4, "VisDial": 80.5, "CIRR": 58.2, "VisualNews_t2i": 71.3, "VisualNews_i2t": 76.9,
    "MSCOCO_t2i": 75.1, "MSCOCO_i2t": 72.2, "NIGHTS": 66.8, "WebQA": 89.3, "FashionIQ": 16.1, "Wiki-SS-NQ": 61.0,
    "OVEN": 67.4, "EDIS": 84.5, "MSCOCO": 65.0, "RefCOCO": 86.5, "RefCOCO-Matching": 89.3, "Visual7W-Pointing": 74.7,
}  # fmt: skip


def test_registry_has_the_36_datasets_with_20_ind_and_16_ood():
    assert len(MMEB_DATASETS) == 36 and set(CREM_2B) == set(MMEB_DATASETS)
    assert sum(not ood for _, ood in MMEB_DATASETS.values()) == 20
    counts = {
        task: sum(t == task for t, _ in MMEB_DATASETS.values())
        for task in ("Classification", "VQA", "Retrieval", "Grounding")
    }
    assert counts == {"Classification": 10, "VQA": 10, "Retrieval": 12, "Grounding": 4}


def test_averages_reproduce_the_paper():
    summary = summarize({name: value / 100 for name, value in CREM_2B.items()})
    expected = {"Classification": 65.80, "VQA": 60.73, "Retrieval": 68.28, "Grounding": 78.88, "IND": 70.81,
                "OOD": 61.49, "Overall": 66.67}  # fmt: skip
    for key, value in expected.items():
        assert 100 * summary[key] == pytest.approx(value, abs=0.01), key
    table = markdown_table({name: value / 100 for name, value in CREM_2B.items()})
    assert "| **All (36)** | 66.7 |" in table and "| *All VQA* | 60.7 |" in table and "| Place365° | 41.5 |" in table


def test_precision_at_1_by_hand_with_ties_and_duplicates():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0]])
    # row 0: ground truth 0 scores 1.0 > 0.0, 0.8 -> correct
    # row 1: ground truth 2 scores 0.6 < candidate 1's 1.0 -> wrong
    # row 2: ground truth 0 ties with its exact duplicate 3 (both 1.0) -> the tie goes to the ground truth: correct
    # row 3: ground truth 3 (0.6) loses to 2 (0.96) -> wrong
    index = [[0, 1, 2], [2, 1], [0, 3, 1], [3, 2, 0]]
    precision, correct = precision_at_1(queries, candidates, index)
    assert correct == [True, False, True, False] and precision == 0.5


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    # row 0 ranks its relevant candidate 2nd, row 1 ranks it 3rd
    assert recall_at_k(scores, [{2}, {2}], ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}


def test_normalize_answer():
    assert normalize_answer("  Seven. ") == "seven" and normalize_answer("A-OK") == "a ok"


def write_subset(folder, name, rows):
    with open(folder / f"{name}.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def eval_folder(tmp_path):
    from helpers import colour_image

    for i, name in enumerate(("red", "green", "blue")):
        colour_image(name, i).save(tmp_path / f"{name}.png")
    image = "<|image_1|>\nRepresent the given image for classification."
    rows = [
        {"qry_text": image, "qry_img_path": f"{c}.png", "tgt_text": [c, "x", "y"], "tgt_img_path": ["", "", ""]}
        for c in ("red", "green", "blue")
    ]
    write_subset(tmp_path, "ImageNet-1K", rows)
    return tmp_path


@pytest.mark.parametrize(
    ("row_update", "message"),
    [
        ({"qry_img_path": "missing.png"}, "Subset ImageNet-1K, row 1: query: missing image"),
        ({"tgt_text": [], "tgt_img_path": []}, "Subset ImageNet-1K, row 1: empty candidate list"),
        ({"tgt_text": ["", "x", "y"]}, "Subset ImageNet-1K, row 1: ground truth \\(candidate 0\\): empty text"),
        ({"tgt_img_path": ["", ""]}, "Subset ImageNet-1K, row 1: 3 candidate texts but 2 candidate images"),
    ],
)
def test_bad_eval_rows_name_subset_and_row(eval_folder, row_update, message):
    rows = [json.loads(line) for line in (eval_folder / "ImageNet-1K.jsonl").read_text().splitlines()]
    rows[1].update(row_update)
    write_subset(eval_folder, "ImageNet-1K", rows)
    with pytest.raises(ValueError, match=message):
        load_mmeb_subset(eval_folder, "ImageNet-1K", image_root=str(eval_folder))


def test_evaluate_mmeb_writes_results_and_never_overwrites_them_on_failure(model, processor, eval_folder, tmp_path):
    out = tmp_path / "results"
    results = evaluate_mmeb(model, processor, eval_folder, ["ImageNet-1K"], str(eval_folder), out, batch_size=2)
    subset = results["subsets"]["ImageNet-1K"]
    assert subset["num_queries"] == 3 and subset["num_unique_candidates"] == 5
    assert 0.0 <= subset["precision_at_1"] <= 1.0
    assert json.loads((out / "mmeb_results.json").read_text()) == json.loads(json.dumps(results))
    before = (out / "mmeb_results.json").read_text()
    write_subset(eval_folder, "N24News", [{"qry_text": "q", "qry_img_path": "", "tgt_text": [], "tgt_img_path": []}])
    with pytest.raises(ValueError, match="N24News, row 0"):
        evaluate_mmeb(model, processor, eval_folder, ["ImageNet-1K", "N24News"], str(eval_folder), out)
    assert (out / "mmeb_results.json").read_text() == before
    with pytest.raises(ValueError, match="No meta-task"):
        evaluate_mmeb(model, processor, eval_folder, ["digits"], str(eval_folder), out)


def test_encoding_is_order_independent(model, processor):
    from helpers import colour_image

    from crem_hf import encode

    texts, images = (
        ["a", None, "long text here", None],
        [None, colour_image("red", 0), None, colour_image("blue", 1, 112)],
    )
    together = encode(model, processor, images=images, texts=texts, batch_size=3, show_progress=False)
    one_by_one = torch.cat(
        [
            encode(model, processor, images=[i], texts=[t], show_progress=False)
            for t, i in zip(texts, images, strict=True)
        ]
    )
    assert torch.allclose(together, one_by_one, atol=1e-5)


def test_cli_runs_mmeb_and_generation(model, processor, eval_folder, tmp_path, capsys):
    from crem_hf.evaluation.cli import main

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "res"
    common = ["--model", str(folder), "--image-root", str(eval_folder), "--device", "cpu"]
    status = main(["mmeb", *common, "--data", str(eval_folder), "--subsets", "ImageNet-1K", "--output-dir", str(out)])
    assert status == 0
    results = json.loads((out / "mmeb_results.json").read_text())
    assert results["subsets"]["ImageNet-1K"]["num_queries"] == 3
    assert capsys.readouterr().out == (out / "mmeb_results.md").read_text()  # the table on stdout
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"image": f"{c}.png", "question": "Colour?", "answer": c}) + "\n" for c in ("red", "blue"))
    )
    assert main(["generation", *common, "--data", str(qa), "--compress", "--output", str(tmp_path / "qa.json")]) == 0
    scored = json.loads((tmp_path / "qa.json").read_text())
    assert scored["num_rows"] == 2 and len(scored["predictions"]) == 2
    assert json.loads(capsys.readouterr().out)["num_rows"] == 2


def test_exact_duplicates_of_the_ground_truth_tie_exactly():
    """A candidate repeated in a row is one embedding: its copies must score exactly alike (no rounding tie-break)."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(50, 64, generator=generator), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(50, 64, generator=generator), dim=-1)
    precision, correct = precision_at_1(queries, candidates, [[i, i, i] for i in range(50)])
    assert precision == 1.0 and all(correct)
