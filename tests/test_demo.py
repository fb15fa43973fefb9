"""The embedded default: the bundled digit data and a shrunken main job."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

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


def test_matryoshka_dims_flag_adds_the_full_size_and_bad_dims_stop_in_one_line(tmp_path, monkeypatch, capsys):
    """`--matryoshka-dims`: the hidden size is added as the last dim; a bad dim is bad usage (status 2, one line)
    before anything runs or is written."""
    import crem_hf.demo.main as main_job

    seen = []
    monkeypatch.setattr(main_job, "run", lambda config: seen.append(config.matryoshka_dims))
    for argv in (["--matryoshka-dims", "32", "64"], ["--matryoshka-dims", "32", "full"], []):
        assert main_job.main(argv) == 0
    assert main_job.main(["--hidden-size", "64", "--matryoshka-dims", "16", "64"]) == 0
    assert seen == [[32, 64, 128], [32, 128], None, [16, 64]]
    out = tmp_path / "out"
    bad = [
        (["64", "32"], "strictly increasing"),
        (["0"], "must be > 0"),
        (["256"], "larger than the hidden size 128"),
        (["full", "32"], "must be the last dim"),
        (["x"], "'x' is not a positive integer"),
        ([], "expected at least one argument"),
    ]
    for dims, fragment in bad:
        with pytest.raises(SystemExit) as exit_info:
            main_job.main(["--output-dir", str(out), "--matryoshka-dims", *dims])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "--matryoshka-dims" in lines[0] and fragment in lines[0], lines
    # As a command: the same line, exit status 2, nothing written.
    argv = [sys.executable, "-m", "crem_hf.demo.main", "--output-dir", str(out), "--matryoshka-dims", "16", "8"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("python -m crem_hf.demo.main: error:"), done.stderr
    assert "strictly increasing" in done.stderr
    assert not out.exists() and seen == [[32, 64, 128], [32, 128], None, [16, 64]]


@pytest.fixture(scope="module")
def matryoshka_model():
    """A tiny random CREM whose config says it was trained for 16, 32 and the full 64."""
    from crem_hf.testing import make_tiny_crem, make_tiny_processor

    processor = make_tiny_processor()
    model = make_tiny_crem(processor, seed=0).eval()
    model.config.matryoshka_dims = [16, 32, 64]
    return model, processor


def test_search_formats_score_every_hit_with_its_exact_cosine(digits, matryoshka_model, tmp_path, monkeypatch):
    """int8 / binary (and truncated float32) search returns the exact cosines of the hand-truncated embeddings."""
    import dataclasses

    import torch.nn.functional as F
    from PIL import Image

    from crem_hf.demo.memory_stage import SCORE_TOLERANCE, search_format_stage
    from crem_hf.instructions import T2I_INSTRUCTION
    from crem_hf.memory import CREMMemory

    model, processor = matryoshka_model
    search = search_format_stage(model, processor, digits, str(tmp_path), batch_size=120)
    assert list(search["layouts"]) == [
        "int8 at dim 64",
        "binary at dim 64",
        *(f"{fmt} at dim {dim}" for dim in (32, 16) for fmt in ("float32", "int8", "binary")),
    ]
    assert search["max |score - exact cosine|"] <= SCORE_TOLERANCE
    for row in search["layouts"].values():
        assert set(row) == {"digit query R@1", "caption query R@1"} and all(0 <= v <= 1 for v in row.values())
    # The oracle: full embeddings from `get_embedding`, truncated and renormalised here.
    texts = ["the digit three", "five left of six"]
    with torch.no_grad():
        queries = model.get_embedding(**processor.process_embedding_inputs(texts=texts, instruction=T2I_INSTRUCTION))
    for name in search["layouts"]:
        fmt, dim = name.split()[0], int(name.split()[-1])
        memory = CREMMemory.open(tmp_path / "search_formats" / f"{fmt}-{dim}", model, processor)
        for query in queries:
            hits = memory.search_vector(query, k=3)
            images = [Image.open(hit.source) for hit in hits]
            with torch.no_grad():
                items = model.get_embedding(**processor.process_embedding_inputs(images=images))
            exact = F.normalize(items[:, :dim], dim=-1) @ F.normalize(query[:dim], dim=-1)
            assert torch.allclose(torch.tensor([hit.score for hit in hits]), exact, atol=SCORE_TOLERANCE), name
    # The stage's own check fails on a score that is not the exact cosine.
    search_vector = CREMMemory.search_vector
    off = lambda self, *a, **k: [dataclasses.replace(h, score=h.score + 1e-3) for h in search_vector(self, *a, **k)]  # noqa: E731
    monkeypatch.setattr(CREMMemory, "search_vector", off)
    with pytest.raises(RuntimeError, match="int8 search at dim 64: a score is 0.001 off the exact cosine"):
        search_format_stage(model, processor, digits, str(tmp_path), batch_size=120)


@pytest.mark.slow
def test_main_job_with_matryoshka_dims_reports_what_the_saved_model_scores_at_each_dim(tmp_path):
    """`matryoshka_dims`: the per-dim table equals `evaluate_mmeb(dim=)` / `evaluate_image_text_retrieval(dim=)`
    on the saved model; the plain stage 2 is measured truncated at the same dims; the memory searches each dim."""
    from crem_hf.demo.main import MainJobConfig, run
    from crem_hf.evaluation import evaluate_image_text_retrieval, evaluate_mmeb, load_caption_rows
    from crem_hf.loading import load_crem

    config = MainJobConfig(
        output_dir=str(tmp_path), stage1_steps=2, stage2_steps=2, warmup_steps=0, matryoshka_dims=[32, 64]
    )
    run(config)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["config"]["matryoshka_dims"] == [32, 64, 128]
    per_dim = summary["matryoshka"]["trained with dims"]
    plain = summary["matryoshka"]["plain stage 2, truncated"]
    assert list(per_dim) == list(plain) == ["32", "64", "128"]
    results = summary["results"]
    for metric, value in per_dim["128"].items():
        assert (
            value == results["after stage 2"][metric]
            and plain["128"][metric] == results["after stage 2 without dims"][metric]
        )
    model, processor = load_crem(str(tmp_path / "model"))
    assert model.config.matryoshka_dims == [32, 64, 128]
    data = build_digits_data(tmp_path / "data", seed=0)
    captions = load_caption_rows(data.captions, ("captions",), data.folder)
    size = config.eval_batch_size
    for dim in (32, 64):
        mmeb = evaluate_mmeb(
            model, processor, data.eval_folder, data.subsets, data.folder, None, size, DIGIT_REGISTRY, dim=dim
        )
        recall = evaluate_image_text_retrieval(model, processor, captions, size, dim=dim)
        expected = {f"P@1 {name}": subset["precision_at_1"] for name, subset in mmeb["subsets"].items()}
        expected |= {"pairs t2i R@1": recall["t2i_R@1"], "pairs i2t R@1": recall["i2t_R@1"]}
        assert per_dim[str(dim)] == expected, dim
    layouts = summary["search formats"]["layouts"]
    assert list(layouts) == [
        "int8 at dim 128",
        "binary at dim 128",
        *(f"{fmt} at dim {dim}" for dim in (64, 32) for fmt in ("float32", "int8", "binary")),
    ]
    table = (tmp_path / "results.md").read_text()
    assert "Retrieval at each embedding dim, trained with dims" in table and "| binary at dim 32 |" in table
