"""Two processes (torchrun, gloo, CPU) take the same step as one process on the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "distributed_step.py")


def run(out, *options, processes: int = 1) -> dict:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    result = subprocess.run([*launcher, SCRIPT, str(out), *options], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ("--lora", "--gc-chunk-size", "2"),
        (),
        ("--lora", "--gc-chunk-size", "2", "--matryoshka-dims", "16", "32", "full"),
    ],
    ids=["lora-gradient-cache", "full-plain", "lora-gradient-cache-matryoshka"],
)
def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path, options):
    # float64, so that the comparison sees the method, not float32 rounding of differently shaped matmuls.
    two = run(tmp_path / "two.pt", *options, "--float64", processes=2)
    one = run(tmp_path / "one.pt", *options, "--float64")
    assert (two["world"], one["world"]) == (2, 1)
    assert abs(float(two["loss"] - one["loss"])) <= 1e-6
    assert two["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        assert float((two["grads"][name] - grad).abs().max()) <= 1e-6, name
    if "--lora" in options:
        assert any("trainable_tokens_delta" in name for name in one["grads"])
