"""The embedded default: the bundled digit data and a shrunken main job."""

from __future__ import annotations

import json
import re

import pytest

from crem_hf.demo.digits import DIGIT_REGISTRY, NUM_CANDIDATES, build_digits_data
from crem_hf.formats import read_rows
from crem_hf.io import current_umask


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return build_digits_data(tmp_path_factory.mktemp("digits"), seed=0)


def scans(text: str) -> set[int]:
    """The source scans an image path (a scan or a pair of scans) was made from."""
    return {int(n) for n in re.findall(r"(\d{4})", text)}


def test_train_and_eval_share_no_scan(digits):
    train = set()
    for path in digits.train_retrieval:
        for row in read_rows(path):
            train |= scans(row["qry_image_path"]) | scans(row["pos_image_path"])
    for row in json.load(open(digits.train_conversations)):
        train |= scans(row["image"])
    held_out = set()
    for name in DIGIT_REGISTRY:
        for row in read_rows(f"{digits.eval_folder}/{name}.jsonl"):
            held_out |= scans(row["qry_img_path"]) | {s for p in row["tgt_img_path"] for s in scans(p)}
    assert len(train) == 1437 and len(held_out) == 360
    assert not train & held_out


def test_eval_subsets_follow_the_mmeb_form(digits):
    cls = read_rows(f"{digits.eval_folder}/digits_cls.jsonl")
    assert len(cls) == 360
    row = cls[0]
    assert row["qry_text"].startswith("<|image_1|>") and row["qry_img_path"].endswith(".png")
    assert len(row["tgt_text"]) == len(set(row["tgt_text"])) == NUM_CANDIDATES
    pairs = read_rows(f"{digits.eval_folder}/pairs_i2t.jsonl")[0]
    left, _, right = pairs["tgt_text"][0].partition(" left of ")
    assert pairs["tgt_text"][1] == f"{right} left of {left}", "the swapped caption is the hardest distractor"
    swap = read_rows(digits.swap)[0]
    assert swap["negative_caption"] != swap["caption"] and sorted(swap["caption"].split()) == sorted(
        swap["negative_caption"].split()
    )


def test_training_files_hold_every_task(digits):
    assert [len(read_rows(p)) for p in digits.train_retrieval] == [1437] * 5
    conversations = json.load(open(digits.train_conversations))
    assert len(conversations) == 2 * 1437
    assert conversations[-1]["conversations"][0]["value"].startswith("<image>\n")
    assert len(conversations[-1]["conversations"]) == 4


def test_backbone_settings_reach_the_config_unless_a_flag_is_given(monkeypatch):
    """The command's config: the defaults on Qwen2-VL, a backbone's settings on the others, a given flag over both."""
    import crem_hf.demo.main as main_job

    configs = []
    monkeypatch.setattr(main_job, "run", configs.append)
    for argv in ([], ["--backbone", "qwen3_vl"], ["--backbone", "qwen2_5_vl", "--stage2-steps", "5"]):
        assert main_job.main(argv) == 0
    default, qwen3, given = configs
    assert default == main_job.MainJobConfig() and default.stage2_steps == 360
    assert qwen3 == main_job.MainJobConfig(backbone="qwen3_vl", **main_job.BACKBONE_SETTINGS["qwen3_vl"])
    assert qwen3.stage2_steps != default.stage2_steps
    assert given.backbone == "qwen2_5_vl" and given.stage2_steps == 5


@pytest.mark.slow
def test_shrunken_main_job_learns_clearly(tmp_path):
    """The main job's whole loop with fewer steps: retrieval and compressed answers far above chance."""
    from crem_hf.demo.main import MainJobConfig, run

    config = MainJobConfig(output_dir=str(tmp_path), stage1_steps=120, stage2_steps=100, warmup_steps=10)
    summary = run(config)
    before, after = summary["results"]["before stage 2"], summary["results"]["after stage 2"]
    assert after["P@1 digits_cls"] > 0.6, after  # chance: 0.1
    # Compressed answering learns more slowly than retrieval: 0.47 after these 100 steps (chance 0.1, 0.96 in the
    # full main job).
    assert after["QA single compressed"] > 0.3 > before["QA single compressed"] + 0.1, (before, after)
    assert summary["results"]["stage 1 (base)"]["QA single native"] > 0.6
    # The memory stage: answers from stored contexts are the compressed answers, item for item.
    memory = summary["memory"]
    assert memory["items"] == 720 and memory["stored answers equal compressed answers"], memory
    assert memory["QA single from stored contexts"] == after["QA single compressed"]
    assert memory["QA pairs from stored contexts"] == after["QA pairs compressed"]
    assert memory["digit query R@1"] > 0.5 and memory["full KV / stored bytes"] > 1, memory
    for name in ("results.json", "results.md", "training.png", "model/config.json", "model/modeling_crem.py"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "results.json").read_text())["data"][0]["kept"] == 5 * 1437
    # safetensors writes 0600; the saved model gets the modes the umask gives.
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
