"""Compressed LM training step: peak memory and time of forward + backward, compressed vs uncompressed.

Every generation row is compressed (the tail may not see the image or the input text: causal prefill up to the chorus
block, prune, the tail over the pruned cache) or none is; a third variant runs the same compressed step under the
dense `batch x L x L` compression mask (`dense_compression_mask` of tests/helpers.py: the oracle the tests compare
with, and what training used before compression became pruning). Two batch layouts: `aligned` (equal questions: no
padding, the chorus blocks end at one column, so the compressed step runs in place) and `varied` (questions of three
lengths: left padding, and the compressed step re-packs its rows first). Each configuration runs in its own process;
on CPU the step's peak memory is the process's resident-memory high-water mark (reset just before the step) above
its resident memory then.

    python benchmarks/train_step.py [--device cuda --dtype bfloat16 --attn flash_attention_2]
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

from common import arguments, build, image_with_tokens, report, synchronize, test_helpers

IMAGE_TOKENS = (1280, 4096)
BATCHES = (4, 8)
LAYOUTS = ("aligned", "varied")
VARIANTS = ("uncompressed", "compressed", "dense mask")


def resident_kib(field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (high-water mark) of this process, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def reset_high_water_mark() -> bool:
    """Reset this process's resident-memory high-water mark to its current size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def one_step(image_tokens: int, batch_size: int, layout: str, variant: str, args) -> dict:
    """Runs in the child process: build, warm up on a small batch, then forward + backward at full size."""
    import torch
    import torch.nn.functional as F

    from crem_hf.configuration_crem import IGNORE_INDEX

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, processor = build(128, 2, False, image_tokens, args, num_heads=4)
    model.train()
    dense_mask = test_helpers().dense_compression_mask if variant == "dense mask" else None

    def make_batch(size: int, tokens: int) -> dict:
        images = [image_with_tokens(processor, tokens, seed=i) for i in range(size)]
        repeats = [i % 3 if layout == "varied" else 0 for i in range(size)]
        batch = processor.process_generation_inputs(
            questions=["Which digit is shown?" + " Answer in one word." * r for r in repeats],
            images=images,
            texts=[f"photo {i}" for i in range(size)],
            answers=["seven"] * size,
        )
        return {k: v.to(args.device) for k, v in batch.items()}

    def step(batch: dict) -> None:
        if variant == "dense mask":
            inner = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask")}
            position_ids = model.compute_position_ids(
                batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"), batch["mm_token_type_ids"]
            )
            mask = dense_mask(model, batch["input_ids"], batch["attention_mask"], True)
            hidden = model.model(**inner, attention_mask=mask, position_ids=position_ids).last_hidden_state
            targets = batch["labels"][:, 1:]
            supervised = targets != IGNORE_INDEX
            loss = F.cross_entropy(model.lm_head(hidden[:, :-1][supervised]).float(), targets[supervised])
        else:
            compress = True if variant == "compressed" else None
            loss = model(**batch, compress=compress, supervised_logits_only=True).loss  # the trainer's LM path
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(make_batch(1, 16))  # warm-up: allocator and kernels
    batch = make_batch(batch_size, image_tokens)
    padded = bool((batch["attention_mask"] == 0).any())
    if args.device == "cpu" and reset_high_water_mark():
        before, high_water = resident_kib("VmRSS"), lambda: resident_kib("VmHWM")
    else:  # no reset: the lifetime high-water mark, above its value before the step (may under-count)
        before, high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before_cuda = torch.cuda.memory_allocated()
    step(batch)  # the first full-size step gives the peak memory; it also pays one-off costs (kernel set-up)
    if args.device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - before_cuda) / 2**20
    else:
        peak = ((high_water() if high_water else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) - before) / 1024
    wall, cpu = [], []
    for _ in range(max(args.repeats, 1)):
        synchronize(args.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        step(batch)
        synchronize(args.device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "seconds": statistics.median(wall),
        "cpu_seconds": statistics.median(cpu),
        "peak_mib": peak,
        "length": int(batch["input_ids"].shape[1]),
        "padded": padded,
    }


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("IMAGE_TOKENS", "BATCH", "LAYOUT", "VARIANT"), default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each step (CPU only)")
    args = parser.parse_args()
    if args.child:
        tokens, batch, layout, variant = int(args.child[0]), int(args.child[1]), args.child[2], args.child[3]
        print(json.dumps(one_step(tokens, batch, layout, variant, args)))
        return
    # On a shared CPU the wall time swings with other processes' load; the CPU time of a one-thread step measures
    # the work (with several threads, waiting threads spin and their CPU time swings too).
    clock = "cpu s" if args.device == "cpu" else "step s"
    # glibc returns every allocation above 64 KiB to the system when freed, so that resident memory follows the
    # tensors alive (otherwise its heap keeps freed blocks and the peak moves by tens of MiB from run to run).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = []
    shared = ["--device", args.device, "--dtype", args.dtype, "--attn", args.attn, "--repeats", str(args.repeats)]
    shared += ["--threads", str(args.threads)]
    for tokens in IMAGE_TOKENS:
        for batch in BATCHES:
            for layout in args.layouts:
                row = {"image tokens": tokens, "batch": batch, "layout": layout}
                for variant in args.variants:
                    out = subprocess.run(
                        [sys.executable, __file__, *shared, "--child", str(tokens), str(batch), layout, variant],
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                    if out.returncode != 0:
                        row[f"{variant} peak MiB"] = row[f"{variant} step s"] = "failed"
                        print(out.stderr[-2000:], file=sys.stderr)
                        continue
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    row["length"], row["padded"] = result["length"], result["padded"]
                    row[f"{variant} peak MiB"] = result["peak_mib"]
                    row[f"{variant} step s"] = result["seconds"]
                    if args.device == "cpu":
                        row[f"{variant} cpu s"] = result["cpu_seconds"]
                for variant in args.variants:
                    if variant == "uncompressed" or not isinstance(row.get(f"{variant} peak MiB"), float):
                        continue
                    if isinstance(row.get("uncompressed peak MiB"), float):
                        base_memory, base_time = row["uncompressed peak MiB"], row[f"uncompressed {clock}"]
                        row[f"{variant} / uncompressed memory"] = row[f"{variant} peak MiB"] / base_memory
                        row[f"{variant} / uncompressed time"] = row[f"{variant} {clock}"] / base_time
                rows.append(row)
                print(row, flush=True)
    notes = (
        "One LM training step (forward + backward, labels on the answer) on the tiny model's vision tower and a "
        "h128, 2-layer language model; every row compressed, or none. Layouts: aligned = equal questions (no "
        "padding; the compressed step runs in place), varied = questions of three lengths (left padding; the "
        "compressed step re-packs its rows so that the chorus blocks end at one slot). Peak = the first full-size "
        "step's resident-memory high-water mark (reset just before it) above the resident memory then (CPU), or its "
        "peak allocated memory (CUDA); allocations above 64 KiB go straight back to the system when freed "
        "(MALLOC_MMAP_THRESHOLD_), so that resident memory follows the live tensors. "
        f"Time = median of --repeats ({args.repeats}) further steps: wall seconds (step s) and, on CPU, the "
        f"process's CPU seconds (cpu s) with {args.threads} thread(s), which the time ratios use (other processes' "
        "load moves the wall time). "
        "Targets: compressed <= 1.05x memory and <= 1.1x time of the uncompressed step."
    )
    report("train_step", args, rows, notes)


if __name__ == "__main__":
    main()
