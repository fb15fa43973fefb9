"""The command lines as a user runs them: exit status 0 with results on stdout, or one line on stderr saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import colour_image

from crem_hf.evaluation.generation import evaluate_generation
from crem_hf.evaluation.retrieval import load_caption_rows
from crem_hf.testing import BACKBONES, make_tiny_crem, make_tiny_processor

BIN = os.path.dirname(sys.executable)


def command(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """An installed console script (or `python -m module` for a name with dots), offline."""
    if "." in name:
        argv = [sys.executable, "-m", name]
    else:
        script = shutil.which(name, path=BIN)
        if script is None:
            pytest.skip(f"{name} is not installed (pip install -e .)")
        argv = [script]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=env, timeout=timeout)


def one_line(stderr: str, *fragments: str) -> str:
    """The single line of `stderr`, checked to hold `fragments` (no traceback, no usage block)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def backbone_model(request, model, processor):
    """`(model, processor)`: the session's Qwen2-VL ones unless parametrized with another backbone."""
    backbone = getattr(request, "param", "qwen2_vl")
    if backbone == "qwen2_vl":
        return model, processor
    processor = make_tiny_processor(backbone=backbone)
    return make_tiny_crem(processor, seed=0, backbone=backbone), processor


@pytest.fixture(scope="module")
def saved_model(backbone_model, tmp_path_factory):
    model, processor = backbone_model
    folder = tmp_path_factory.mktemp("cli") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def qa_file(tmp_path):
    rows = []
    for i, (colour, question) in enumerate((("red", "Colour?"), ("blue", "Which colour is the square?"))):
        colour_image(colour, i).save(tmp_path / f"{colour}.png")
        rows.append({"image": f"{colour}.png", "question": question, "answer": colour})
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("backbone_model", list(BACKBONES), indirect=True)
def test_crem_eval_exits_0_with_its_results_on_stdout(backbone_model, saved_model, qa_file, tmp_path):
    """On a saved folder of each backbone: the command's answers (a batch of two, the model loaded from the folder)
    are the in-memory model's, answered one row at a time; the two rows' answers differ, so the comparison can fail."""
    output = tmp_path / "res" / "qa.json"
    done = command(
        "crem-eval", "generation", "--model", saved_model, "--data", qa_file, "--image-root", str(tmp_path),
        "--output", str(output), "--device", "cpu", "--max-new-tokens", "4", "--compress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["num_rows"] == 2 and "predictions" not in printed
    assert "num_rows" not in done.stderr and "predictions" not in done.stderr
    written = json.loads(output.read_text())
    assert written["num_rows"] == 2
    model, processor = backbone_model
    rows = load_caption_rows(qa_file, ("question", "answer"), str(tmp_path))
    alone = evaluate_generation(model.eval(), processor, rows, compress=True, batch_size=1, max_new_tokens=4)
    assert written["predictions"] == alone["predictions"]
    assert len(set(alone["predictions"])) == 2, alone["predictions"]


def test_crem_eval_checks_its_output_before_loading_the_model(tmp_path, saved_model, qa_file, capsys):
    from crem_hf.evaluation.cli import main

    # The output is a folder: named at once, although neither the model nor the data exist.
    assert main(["generation", "--model", "/no/such/model", "--data", "/no/data.jsonl", "--output", str(tmp_path)]) == 1
    one_line(capsys.readouterr().err, "crem-eval: error:", str(tmp_path), "folder")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    common = ["--model", saved_model, "--image-root", str(tmp_path), "--device", "cpu"]
    cases = [
        ["generation", *common, "--data", qa_file, "--output", str(blocker / "qa.json")],
        ["mmeb", *common, "--data", str(tmp_path), "--subsets", "ImageNet-1K", "--output-dir", str(blocker)],
        ["mmeb", *common, "--data", str(tmp_path), "--subsets", "ImageNet-1K", "--output-dir", str(blocker / "x")],
    ]
    for argv in cases:
        assert main(argv) == 1
        one_line(capsys.readouterr().err, "crem-eval: error:", str(blocker))
    # A bad path and a bad data file are one line too.
    assert main(["generation", *common[2:], "--model", str(tmp_path / "missing"), "--data", qa_file]) == 1
    one_line(capsys.readouterr().err, "missing", "no such folder")
    assert main(["generation", *common, "--data", str(tmp_path / "nothing.jsonl")]) == 1
    one_line(capsys.readouterr().err, "nothing.jsonl")


def test_usage_errors_are_one_line_with_status_2(capsys):
    from crem_hf.evaluation.cli import main as crem_eval
    from crem_hf.hub import main as crem_export

    for main, argv, fragment in [
        (crem_eval, ["mmeb"], "--model"),
        (crem_eval, ["generation", "--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size"),
        (crem_export, ["--model", "m"], "--output-dir"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        one_line(capsys.readouterr().err, "error:", fragment)


def test_crem_export_exits_0_and_names_bad_inputs_in_one_line(saved_model, tmp_path, capsys):
    from crem_hf.hub import main

    target = tmp_path / "hub"
    done = command("crem-export", "--model", saved_model, "--output-dir", str(target))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"Exported {target}" and (target / "README.md").is_file()
    assert main(["--model", saved_model, "--output-dir", str(target)]) == 1
    one_line(capsys.readouterr().err, "crem-export: error:", "not empty")
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    assert main(["--model", saved_model, "--output-dir", str(tmp_path / "other"), "--eval-results", str(bad)]) == 1
    one_line(capsys.readouterr().err, str(bad), "not JSON")
    assert main(["--model", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "other")]) == 1
    one_line(capsys.readouterr().err, "nothing", "no such folder")
    assert not (tmp_path / "other").exists()


def test_crem_quickstart_exits_0_with_its_report_on_stdout(capsys):
    from crem_hf.quickstart import main

    done = command("crem-quickstart", "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "Embeddings: (3, " in done.stdout and "compressed context keeps" in done.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["--max-new-tokens", "0"])
    assert exit_info.value.code == 2
    one_line(capsys.readouterr().err, "crem-quickstart: error:", "--max-new-tokens")


def test_demo_commands_exit_0_or_fail_in_one_line(tmp_path, monkeypatch, capsys):
    import crem_hf.demo.ablation as ablation
    import crem_hf.demo.main as main_job

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    done = command("crem_hf.demo.main", "--output-dir", str(blocker))
    assert done.returncode == 1
    one_line(done.stderr, "crem_hf.demo.main: error:", str(blocker))
    assert ablation.main(["--output-dir", str(blocker)]) == 1
    one_line(capsys.readouterr().err, "crem_hf.demo.ablation: error:", str(blocker))
    # Success is status 0 (what `sys.exit(main())` passes on), not the summary.
    monkeypatch.setattr(main_job, "run", lambda config: {"results": {}})
    monkeypatch.setattr(ablation, "run", lambda args: {"results": {}})
    assert main_job.main(["--stage1-steps", "1"]) == 0 and ablation.main(["--stage2-steps", "1"]) == 0


def test_train_lora_fails_in_one_line(tmp_path):
    """examples/train_lora.py keeps the commands' contract: 1 and one line for a bad input, 2 for bad usage."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_lora.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    common = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu"]
    missing = str(tmp_path / "no-model")
    runs = [
        ([*common, "--model", missing, "--generation_data", "x.json"], 1, missing),
        (common, 2, "--retrieval_data"),
    ]
    for argv, status, fragment in runs:
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == status, done.stderr
        one_line(done.stderr, "examples/train_lora.py: error:", fragment)
