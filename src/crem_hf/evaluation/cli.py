"""`crem-eval`: evaluate a CREM model of any backbone (a CREM or adapter folder, or a converted backbone checkpoint).

`--model` is what `crem_hf.load_crem` reads: a CREM folder or LoRA adapter folder on Qwen2-VL, Qwen2.5-VL or Qwen3-VL,
or a plain checkpoint of one of them (converted on the fly, chorus tokens added).

crem-eval mmeb --model out/ --data MMEB-eval/ --subsets ImageNet-1K N24News --image-root images/ --output-dir res/
crem-eval retrieval --model out/ --data flickr_test.jsonl --image-root images/ --output res/flickr.json
crem-eval retrieval ... --dim 256     (a Matryoshka size the model was trained for: config.matryoshka_dims)
crem-eval compositional --model out/ --data sugarcrepe_swap.jsonl --output res/swap.json
crem-eval generation --model out/ --data qa.jsonl --compress --output res/qa_compressed.json

Under torchrun or accelerate launch (`torchrun --nproc_per_node 4 --no-python crem-eval mmeb ...`) every process
encodes its share of the batches and the results are gathered; only the first process writes and prints them.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..io import (
    ArgumentParser,
    check_model_source,
    check_writable_file,
    check_writable_folder,
    positive_int,
    run_command,
    write_json_atomically,
)
from ..loading import load_crem
from ..parallel import initialize_from_environment, is_main_process, shutdown
from .generation import evaluate_generation
from .mmeb import MMEB_RESULT_FILES, evaluate_mmeb, markdown_table
from .retrieval import evaluate_compositional, evaluate_image_text_retrieval, load_caption_rows

__all__ = ["build_parser", "evaluate", "main"]

#: The fields each file-based command needs in every row.
ROW_FIELDS = {
    "retrieval": ("captions",),
    "compositional": ("caption", "negative_caption"),
    "generation": ("question", "answer"),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="crem-eval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("mmeb", "retrieval", "compositional", "generation"):
        command = commands.add_parser(name)
        command.add_argument("--model", required=True, help="CREM or adapter folder, or a backbone checkpoint")
        command.add_argument("--data", required=True, help="file (or, for mmeb, a folder of <subset>.jsonl)")
        command.add_argument("--image-root", default=None)
        command.add_argument("--batch-size", type=positive_int, default=32)
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if name != "generation":
            command.add_argument(
                "--dim", type=positive_int, default=None, help="Matryoshka embedding size (default: the full one)"
            )
        if name == "mmeb":
            command.add_argument("--subsets", nargs="+", required=True)
            command.add_argument("--output-dir", default=None)
        else:
            command.add_argument("--output", default=None, help="results JSON (written atomically)")
        if name == "generation":
            command.add_argument("--compress", action="store_true", help="answer from the compressed context")
            command.add_argument("--max-new-tokens", type=positive_int, default=16)
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    """
    Run one parsed command; print its results to stdout and return them. Everything that can be checked cheaply
    (the output location, then the data file) is checked before the model is loaded. In a process group every
    process runs it and gets the results; the main process alone writes and prints them.
    """
    main_process = is_main_process()
    if args.command == "mmeb":
        if args.output_dir is not None:
            check_writable_folder(args.output_dir, MMEB_RESULT_FILES)
    elif args.output is not None:
        check_writable_file(args.output)
    check_model_source(args.model)
    if args.command != "mmeb":
        rows = load_caption_rows(args.data, ROW_FIELDS[args.command], args.image_root)

    model, processor = load_crem(args.model)
    dim = getattr(args, "dim", None)
    model.config.check_embedding_dim(dim)  # before the model moves or anything is encoded
    model = model.to(args.device).eval()
    if args.command == "mmeb":
        output_dir = args.output_dir if main_process else None
        results = evaluate_mmeb(
            model, processor, args.data, args.subsets, args.image_root, output_dir, args.batch_size, dim=dim
        )
        scores = {name: subset["precision_at_1"] for name, subset in results["subsets"].items()}
        if main_process:
            print(markdown_table(scores), end="")
        return results
    if args.command == "retrieval":
        results = evaluate_image_text_retrieval(model, processor, rows, args.batch_size, dim=dim)
    elif args.command == "compositional":
        results = evaluate_compositional(model, processor, rows, args.batch_size, dim=dim)
    else:
        results = evaluate_generation(model, processor, rows, args.compress, args.batch_size, args.max_new_tokens)
    if dim is not None:
        results["embedding_dim"] = dim
    if main_process:
        if args.output:
            write_json_atomically(args.output, results)
        print(json.dumps({k: v for k, v in results.items() if k != "predictions"}, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    """
    The `crem-eval` command: exit status 0 on success, 1 with a one-line reason on stderr (2 for bad arguments).
    Under a launcher it joins the launched processes' group first.
    """
    args = build_parser().parse_args(argv)

    def body() -> None:
        initialize_from_environment()
        evaluate(args)

    status = run_command("crem-eval", body)
    if status == 0:
        shutdown()
    # After a failure no barrier: the other processes may be inside a collective this one never joins. Exiting
    # non-zero makes the launcher stop them.
    return status


if __name__ == "__main__":
    raise SystemExit(main())
