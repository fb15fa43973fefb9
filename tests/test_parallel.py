"""Encoding across processes (`crem_hf.parallel`): the helpers on one process, then 2 CPU processes (gloo) under
torchrun and accelerate launch give what one process gives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import free_port

import crem_hf.parallel as parallel
from crem_hf.demo.digits import build_digits_data
from crem_hf.evaluation.cli import main as crem_eval
from crem_hf.parallel import gather_objects, gather_rows, share_of_this_process
from crem_hf.training import distributed as training_distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ENCODE_SCRIPT = os.path.join(HERE, "distributed_encode.py")
#: Digits subsets under MMEB names (crem-eval knows the meta-task of MMEB subsets only), cut small: queries each.
MMEB_SUBSETS = {
    "ImageNet-1K": ("digits_cls", 12),
    "VisualNews_t2i": ("digits_t2i", 5),
    "VisualNews_i2t": ("pairs_i2t", 6),
}


# ------------------------------------------------------------------------------------------------ one process


def test_one_process_runs_every_batch():
    assert (parallel.world_size(), parallel.rank(), parallel.is_main_process()) == (1, 0, True)
    assert share_of_this_process(5) == [0, 1, 2, 3, 4]
    assert share_of_this_process(0) == []
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="num_batches"):
            share_of_this_process(bad)
    parallel.barrier()  # nothing to wait for
    assert training_distributed.rank is parallel.rank and training_distributed.world_size is parallel.world_size


def test_gather_rows_puts_each_row_at_its_index():
    rows = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    out = gather_rows(torch.tensor([2, 0, 3, 1]), rows, 4)
    assert out.tolist() == [rows[1].tolist(), rows[3].tolist(), rows[0].tolist(), rows[2].tolist()]
    assert out.dtype == rows.dtype
    assert gather_rows(torch.tensor([], dtype=torch.long), torch.zeros(0, 3), 0).shape == (0, 3)


@pytest.mark.parametrize(
    "indices, total, message",
    [
        ([0, 0, 1], 3, r"1 duplicated \(first \[0\]\) and 1 missing \(first \[2\]\)"),
        ([0, 2, 3], 4, r"1 missing \(first \[1\]\)"),
        ([0, 1, 5], 3, r"\[5\] are outside \[0, 3\)"),
        ([0, 1, 2], -1, "total must be an integer >= 0"),
    ],
)
def test_gather_rows_and_objects_name_missing_duplicated_and_stray_indices(indices, total, message):
    with pytest.raises(ValueError, match=message):
        gather_rows(torch.tensor(indices), torch.zeros(3, 2), total)
    with pytest.raises(ValueError, match=message):
        gather_objects(indices, ["a", "b", "c"], total)


def test_gather_rows_rejects_indices_that_are_not_one_per_row():
    with pytest.raises(ValueError, match="1-D int64"):
        gather_rows(torch.tensor([0.0, 1.0]), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="1-D int64"):
        gather_rows(torch.tensor([True, False]), torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="Got 3 indices for rows of shape"):
        gather_rows(torch.tensor([0, 1, 2]), torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="Got 1 indices for 2 objects"):
        gather_objects([0], ["a", "b"], 2)
    assert gather_objects([1, 0], ["b", "a"], 2) == ["a", "b"]


def test_initialize_needs_a_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_from_environment() is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallel.initialize_from_environment() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set"):
        parallel.initialize_from_environment()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        parallel.initialize_from_environment()
    assert not torch.distributed.is_initialized()
    parallel.shutdown()  # nothing to take down


# ------------------------------------------------------------------------------------------------ two processes


@pytest.fixture(scope="module")
def job(model, processor, tmp_path_factory):
    """One saved tiny CREM model, the digits data and small MMEB subsets made of it (flat layout)."""
    folder = tmp_path_factory.mktemp("parallel")
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    digits = build_digits_data(folder / "digits")
    mmeb = folder / "mmeb"
    mmeb.mkdir()
    for subset, (source, count) in MMEB_SUBSETS.items():
        with open(os.path.join(digits.eval_folder, f"{source}.jsonl"), encoding="utf-8") as handle:
            lines = handle.readlines()[:count]
        (mmeb / f"{subset}.jsonl").write_text("".join(lines))
    return {"model": str(folder / "model"), "digits": digits.folder, "mmeb": str(mmeb)}


def launch(launcher: str, command: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """`command` in 2 CPU processes started by `launcher` ("torchrun" or "accelerate")."""
    port = str(free_port())
    if launcher == "torchrun":
        start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        # --multi_gpu on a machine without GPUs: 2 CPU processes over gloo (--cpu would start only one).
        start = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        start += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        start += ["--main_process_port", port]
    # CPU only, one thread per process, offline.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    # A session of its own, so that a timeout ends the workers too, not only the launcher.
    process = subprocess.Popen(
        [*start, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture
def one_thread():
    """The one-process reference in this process, with the thread count of each launched process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_processes_embed_and_answer_as_one_process(job, tmp_path, one_thread):
    import distributed_encode

    done = launch("accelerate", [ENCODE_SCRIPT, job["model"], job["digits"], str(tmp_path / "two.pt")])
    assert done.returncode == 0, done.stderr[-4000:]
    two = torch.load(tmp_path / "two.pt")
    one = distributed_encode.run(job["model"], job["digits"])

    assert (two["world"], one["world"]) == (2, 1)
    # Whole batches, round robin (5 batches of 3, 3, 3, 3, 2, then one of 2): rank 0 ran batches 0, 2, 4 and the
    # single batch, rank 1 batches 1 and 3.
    assert one["rows"] == [[3, 3, 3, 3, 2, 2]]
    assert two["rows"] == [[3, 3, 2, 2], [3, 3]]
    assert one["embeddings"].shape == (14, 64) and two["one_batch"].shape == (2, 64)
    assert float((two["embeddings"] - one["embeddings"]).abs().max()) <= 1e-6
    assert float((two["one_batch"] - one["one_batch"]).abs().max()) <= 1e-6
    # Same batches, same kernels, one thread each: bitwise the same.
    assert torch.equal(two["embeddings"], one["embeddings"]) and torch.equal(two["one_batch"], one["one_batch"])
    assert two["predictions"] == one["predictions"] and len(one["predictions"]) == 5
    assert one["duplicate_errors"] == [None]
    for error in two["duplicate_errors"]:
        assert error is not None and "1 duplicated (first [0]) and 1 missing (first [1])" in error


def crem_eval_script() -> str:
    """The installed `crem-eval` console script (torchrun --no-python runs it as a user would)."""
    script = shutil.which("crem-eval", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("crem-eval is not installed (pip install -e .)")
    return script


def mmeb_arguments(job, output_dir) -> list[str]:
    return [
        "mmeb", "--model", job["model"], "--data", job["mmeb"], "--image-root", job["digits"],
        "--subsets", *MMEB_SUBSETS, "--batch-size", "4", "--device", "cpu", "--output-dir", str(output_dir),
    ]  # fmt: skip


@pytest.mark.slow
def test_crem_eval_mmeb_under_torchrun_scores_as_one_process(job, tmp_path, one_thread, capsys):
    done = launch("torchrun", ["--no-python", crem_eval_script(), *mmeb_arguments(job, tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-4000:]
    assert crem_eval(mmeb_arguments(job, tmp_path / "one")) == 0
    table = capsys.readouterr().out

    two = json.loads((tmp_path / "two" / "mmeb_results.json").read_text())
    one = json.loads((tmp_path / "one" / "mmeb_results.json").read_text())
    assert two == one
    assert {name: r["num_queries"] for name, r in one["subsets"].items()} == {"ImageNet-1K": 12, **{
        "VisualNews_t2i": 5, "VisualNews_i2t": 6}}  # fmt: skip
    assert (tmp_path / "two" / "mmeb_results.md").read_text() == (tmp_path / "one" / "mmeb_results.md").read_text()
    # Only the main process prints the table.
    assert done.stdout.count("| Dataset") == 1 and table in done.stdout


#: crem-eval whose rank 1 cannot read its first batch (a stand-in for a file that breaks on one process only).
FAILING_CREM_EVAL = """
import os, sys
from crem_hf.processing_crem import CREMProcessor
from crem_hf.evaluation.cli import main

def unreadable(self, *args, **kwargs):
    raise OSError("rank 1 cannot read its batch")

if os.environ["RANK"] == "1":
    CREMProcessor.process_embedding_inputs = unreadable
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failure_in_one_process_ends_the_job_with_its_reason_and_writes_nothing(job, tmp_path):
    # Rank 0 encodes its batches, then waits in a gather that rank 1 never joins: the job must still end, by
    # rank 1 exiting non-zero (without a barrier) and the launcher stopping rank 0.
    command = ["--no-python", sys.executable, "-c", FAILING_CREM_EVAL, *mmeb_arguments(job, tmp_path / "res")]
    done = launch("torchrun", command, timeout=90)
    assert done.returncode != 0
    assert "crem-eval: error: rank 1 cannot read its batch" in done.stderr, done.stderr[-4000:]
    assert not (tmp_path / "res" / "mmeb_results.json").exists()
