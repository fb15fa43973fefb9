"""Shared helpers of the benchmarks: timing, models of a given size, images of a given token count, reports.

Every benchmark measures its variants side by side in one run (these machines are noisy) and prints ratios. They run
against the installed package (`pip install -e .` from the repository root), never a path set by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from types import ModuleType

import torch
from PIL import Image

try:
    from crem_hf.io import format_markdown_table, write_json_atomically, write_text_atomically
    from crem_hf.loading import backbone_crem_processor
    from crem_hf.testing import backbone_files, make_tiny_crem, make_tiny_processor, qwen2vl_files
except ImportError as error:
    raise SystemExit(f"The benchmarks need crem-hf installed (pip install -e . in the repository): {error}") from error

#: The tests' helpers (test code, not part of the package): image makers and the dense-mask oracle.
TEST_HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers.py")

# Qwen2-VL-2B's language model: 28 layers, 12 heads of 128, 2 key/value heads, hidden 1536, vocabulary 151,936.
QWEN2VL_2B = {"num_layers": 28, "hidden_size": 1536, "num_heads": 12, "num_kv_heads": 2, "head_dim": 128}
BF16_BYTES = 2
#: Per backbone: the published model whose geometry the benchmarks report, and its real files (tests/fixtures).
PUBLISHED = {
    "qwen2_vl": ("Qwen2-VL-2B", "qwen2-vl-2b"),
    "qwen2_5_vl": ("Qwen2.5-VL-3B", "qwen2.5-vl-3b"),
    "qwen3_vl": ("Qwen3-VL-2B", "qwen3-vl-2b"),
}


def published_files(backbone: str) -> str:
    """The folder of the real files (no weights) of `backbone`'s published model, in this checkout."""
    name = PUBLISHED[backbone][1]
    return qwen2vl_files() if backbone == "qwen2_vl" else backbone_files(name)


def geometry(backbone: str) -> dict:
    """
    The language model's geometry of `backbone`'s published model, read from its real config.json: layers,
    hidden size, heads, key/value heads, head width (explicit, or hidden / heads) and `kv_bytes_per_slot` (keys and
    values of one cached token over every layer, bf16).
    """
    with open(os.path.join(published_files(backbone), "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    text = config.get("text_config", config)
    shape = {
        "model": PUBLISHED[backbone][0],
        "num_layers": text["num_hidden_layers"],
        "hidden_size": text["hidden_size"],
        "num_heads": text["num_attention_heads"],
        "num_kv_heads": text["num_key_value_heads"],
        "head_dim": text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
    }
    shape["kv_bytes_per_slot"] = shape["num_layers"] * 2 * shape["num_kv_heads"] * shape["head_dim"] * BF16_BYTES
    return shape


def backbone_processor(backbone: str, real_vocabulary: bool):
    """
    The CREM processor of `backbone`: with `real_vocabulary`, the published model's own (real tokenizer, template,
    image processor: 14- or 16-px patches), as `load_crem` builds it; otherwise the tiny one.
    """
    if not real_vocabulary:
        return make_tiny_processor(backbone=backbone)
    if backbone == "qwen2_vl":
        return make_tiny_processor(real_tokenizer=True)  # the real tokenizer; its -Instruct template
    return backbone_crem_processor(published_files(backbone))


def test_helpers() -> ModuleType:
    """`tests/helpers.py`, loaded from its file (it imports neither crem_hf nor pytest at module level)."""
    spec = importlib.util.spec_from_file_location("crem_test_helpers", TEST_HELPERS)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers


def arguments(description: str, backbone: bool = False) -> argparse.ArgumentParser:
    """
    The options every benchmark shares: output folder, device, dtype, attention kernel, repeats; with `backbone`,
    `--backbone` too (only benchmarks that honour it take it).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output-dir", default="outputs/benchmarks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--repeats", type=int, default=3)
    if backbone:
        parser.add_argument(
            "--backbone", default="qwen2_vl", choices=list(PUBLISHED), help="whose published geometry and files"
        )
    return parser


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(run: Callable[[], object], repeats: int, device: str, warmup: int = 1) -> float:
    """Median wall time of `run` over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_with_tokens(processor, num_tokens: int, seed: int = 0) -> Image.Image:
    """A noise image whose side lengths give `processor` exactly `num_tokens` merged tokens (a near-square grid)."""
    height = int(num_tokens**0.5)
    while num_tokens % height:
        height -= 1
    width = num_tokens // height
    generator = torch.Generator().manual_seed(seed)
    side = processor.image_token_side
    pixels = torch.randint(0, 256, (height * side, width * side, 3), generator=generator)
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def build(hidden_size: int, num_layers: int, real_vocabulary: bool, max_image_tokens: int, args, num_heads: int = 8):
    """
    A CREM model of `args.backbone` (Qwen2-VL without the option) of the given language-model size (tiny vision
    tower) and its processor (see `backbone_processor`), on the device.
    """
    backbone = getattr(args, "backbone", "qwen2_vl")
    processor = backbone_processor(backbone, real_vocabulary)
    processor.set_image_token_range(1, max_image_tokens)
    model = make_tiny_crem(
        processor,
        backbone=backbone,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        attn_implementation=args.attn,
    )
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval(), processor


def markdown_rows(rows: list[dict]) -> str:
    """A markdown table of `rows` (columns: every key, in order of appearance; floats to 4 significant digits)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [
        [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows
    ]
    return format_markdown_table(columns, cells)


def report(name: str, args, rows: list[dict], notes: str = "") -> str:
    """Print a markdown table of `rows` and write it with the JSON under `--output-dir`."""
    table = f"### {name}\n\nMachine: {machine()}; dtype {args.dtype}; attention {args.attn}.\n\n"
    table += markdown_rows(rows)
    table += f"\n{notes}\n" if notes else ""
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    write_text_atomically(os.path.join(args.output_dir, f"{name}.md"), table)
    payload = {"name": name, "machine": machine(), "args": vars(args), "rows": rows, "notes": notes}
    write_json_atomically(os.path.join(args.output_dir, f"{name}.json"), json.loads(json.dumps(payload, default=str)))
    return table
