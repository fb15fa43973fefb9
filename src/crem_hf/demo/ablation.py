"""Ablations on the embedded default, mirroring the paper's Tables 3-4: compression probability p, LM weight
alpha_g, mean vs last-token pooling and the number N of chorus tokens. Stage 1 is trained once; every variant
trains stage 2 from it.

    python -m crem_hf.demo.ablation [--output-dir outputs/ablation] [--seed 0]

Writes `ablation.md` (one table) and `ablation.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from ..io import (
    ArgumentParser,
    format_markdown_table,
    positive_int,
    run_command,
    write_json_atomically,
    write_text_atomically,
)
from .main import MainJobConfig, evaluate_base, prepare, train_stage1, train_stage2

__all__ = ["VARIANTS", "main", "run"]

#: Stage-2 variants, each a change to the main job's settings (the first is CREM itself).
VARIANTS: dict[str, dict[str, Any]] = {
    "CREM (p 0.5, alpha_g 0.5, mean, N 16)": {},
    "p = 0 (never compressed)": {"compress_probability": 0.0},
    "p = 1 (always compressed)": {"compress_probability": 1.0},
    "alpha_g = 0 (retrieval only)": {"alpha_g": 0.0},
    "last-token pooling": {"pooling": "last"},
    "N = 1 chorus token": {"num_chorus_tokens": 1},
    "N = 4 chorus tokens": {"num_chorus_tokens": 4},
}
#: The columns of the table: (heading, result key).
COLUMNS = [
    ("P@1 cls", "P@1 digits_cls"),
    ("P@1 vqa", "P@1 digits_vqa"),
    ("P@1 t2i", "P@1 digits_t2i"),
    ("P@1 pairs i2t", "P@1 pairs_i2t"),
    ("P@1 pairs t2i", "P@1 pairs_t2i"),
    ("QA native", "QA single native"),
    ("QA compressed", "QA single compressed"),
    ("pairs QA compressed", "QA pairs compressed"),
    ("swap", "swap accuracy"),
]


def table(rows: dict[str, dict[str, float]], base: dict[str, float]) -> str:
    lines = [["stage 1 base (no chorus)", *(f"{100 * base[k]:.1f}" if k in base else "-" for _, k in COLUMNS)]]
    lines += [[name, *(f"{100 * result[k]:.1f}" for _, k in COLUMNS)] for name, result in rows.items()]
    return format_markdown_table(["variant", *(heading for heading, _ in COLUMNS)], lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m crem_hf.demo.ablation`: exit status 0 on success, 1 with a one-line reason on stderr (2: usage)."""
    prog = "python -m crem_hf.demo.ablation"
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/ablation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage2-steps", type=positive_int, default=MainJobConfig.stage2_steps)
    args = parser.parse_args(argv)
    return run_command(prog, lambda: run(args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train every variant and write the table; returns what `ablation.json` holds."""
    started = time.time()
    config = MainJobConfig(output_dir=args.output_dir, seed=args.seed, stage2_steps=args.stage2_steps)
    workspace = prepare(config)
    base, _ = train_stage1(workspace, config)
    base_results = evaluate_base(base, workspace.processor(config.num_chorus_tokens), workspace.data, config)
    rows = {}
    for index, (name, change) in enumerate(VARIANTS.items()):
        variant = dataclasses.replace(config, **change)
        folder = os.path.join(args.output_dir, f"variant_{index}")
        _, _, _, after, _ = train_stage2(workspace, base, variant, folder, evaluate_before=False)
        rows[name] = after
        print(f"{name}: " + ", ".join(f"{h} {100 * after[k]:.1f}" for h, k in COLUMNS), flush=True)
    markdown = table(rows, base_results)
    write_text_atomically(os.path.join(args.output_dir, "ablation.md"), markdown)
    summary = {
        "variants": VARIANTS,
        "stage2_steps": args.stage2_steps,
        "base": base_results,
        "results": rows,
        "seconds": round(time.time() - started),
    }
    write_json_atomically(os.path.join(args.output_dir, "ablation.json"), summary)
    print("\n" + markdown)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
