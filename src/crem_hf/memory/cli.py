"""`crem-memory`: index items into a visual memory, search it, ask about the hits from their stored contexts.

crem-memory index --model outputs/main/model --memory scans.lance scans/ [--context-format int8]
    [--vector-format float32|int8|binary] [--vector-dim 256] [--no-full-vectors]
crem-memory search --model outputs/main/model --memory scans.lance --text "the digit seven" --k 3
    [--nprobes 100] [--rescore-factor 10]
crem-memory ask --model outputs/main/model --memory scans.lance --text "the digit seven" --question "Which digit?"
crem-memory ask --model outputs/main/model --memory scans.lance --questions asks.jsonl --output answers.jsonl
crem-memory info --memory scans.lance
Under `torchrun` or `accelerate launch`, `index` encodes each process's share of the items into the one table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .. import parallel
from ..io import (
    ArgumentParser,
    check_model_source,
    format_markdown_table,
    positive_int,
    run_command,
    write_text_atomically,
)
from ..loading import load_crem
from .quantize import CONTEXT_FORMATS
from .search_formats import VECTOR_FORMATS, SearchLayout, check_rescoring_source
from .sources import read_source
from .store import REFINE_FACTOR, CREMMemory, MemoryHit

__all__ = ["build_parser", "main", "run"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="crem-memory", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("index", "search", "ask", "info"):
        command = commands.add_parser(name)
        command.add_argument("--memory", required=True, help="the memory: a folder or a LanceDB URI")
        command.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="object-storage option for LanceDB (e.g. aws_endpoint=http://...); repeatable",
        )
        if name == "info":
            continue
        command.add_argument("--model", required=True, help="the CREM folder that writes (wrote) the memory")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if name == "index":
            command.add_argument("source", help="a folder of images or a .jsonl file of {id, image, text} records")
            command.add_argument("--image-root", default=None, help="root of a JSONL file's relative image paths")
            command.add_argument("--instruction", default=None, help="embedding instruction for every item")
            command.add_argument("--batch-size", type=positive_int, default=8)
            command.add_argument("--ann", action="store_true", help="build an approximate index afterwards")
            command.add_argument(
                "--context-format",
                default=None,
                choices=CONTEXT_FORMATS,
                help="how contexts are stored: model (exact, the model's dtype), int8 or int4 (quantised); default: "
                "model for a new memory, the memory's own for an existing one",
            )
            command.add_argument(
                "--vector-format",
                default=None,
                choices=VECTOR_FORMATS,
                help="how embeddings are searched: float32, int8 (8-bit index) or binary (sign bits, Hamming), the "
                "quantised ones re-scored exactly; default: float32 for a new memory, the memory's own otherwise",
            )
            command.add_argument(
                "--vector-dim",
                type=positive_int,
                default=None,
                help="search dim: a Matryoshka dim the model was trained for, or its hidden size (the default)",
            )
            command.add_argument(
                "--no-full-vectors",
                dest="full_vectors",
                action="store_const",
                const=False,
                default=None,
                help="keep only the truncated search vectors, no full-precision copy (float32/int8 only)",
            )
            continue
        command.add_argument("--text", default=None, help="query text")
        command.add_argument("--image", default=None, help="query image (path or URL)")
        command.add_argument("--k", type=positive_int, default=5)
        command.add_argument(
            "--nprobes",
            type=positive_int,
            default=None,
            help="partitions of the approximate index searched (more: higher recall, slower); default: a share of "
            "the index's partitions (CREMMemory.default_nprobes); no effect without an index",
        )
        command.add_argument(
            "--rescore-factor",
            type=positive_int,
            default=REFINE_FACTOR,
            help="candidates per hit re-scored exactly from the float32 vectors after an approximate search",
        )
        command.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
        if name == "ask":
            command.add_argument("--question", default=None, help="one question about the hits (or --ids)")
            command.add_argument("--ids", nargs="+", default=None, help="ask about these items (no search)")
            command.add_argument(
                "--questions",
                default=None,
                metavar="FILE.jsonl",
                help='many questions: one {"question": ..., "id": ...} per line, answered in batches',
            )
            command.add_argument("--output", default=None, help="with --questions: write the JSONL answers here")
            command.add_argument("--batch-size", type=positive_int, default=32, help="with --questions: rows per batch")
            command.add_argument(
                "--memory-budget-mib",
                type=positive_int,
                default=1024,
                help="with --questions: KV-cache budget of one batch (MiB)",
            )
            command.add_argument("--max-new-tokens", type=positive_int, default=32)
    return parser


def _hits(memory: CREMMemory, args: argparse.Namespace) -> list[MemoryHit]:
    if args.text is None and args.image is None:
        raise ValueError(f"crem-memory {args.command} needs a query: --text and/or --image.")
    return memory.search(args.text, args.image, k=args.k, nprobes=args.nprobes, rescore_factor=args.rescore_factor)


def _print_hits(hits: list[MemoryHit], answers: list[str] | None, as_json: bool) -> None:
    rows = []
    for i, hit in enumerate(hits):
        row = {"rank": hit.rank + 1, "id": hit.id, "score": round(hit.score, 4), "source": hit.source or ""}
        if answers is not None:
            row["answer"] = answers[i]
        rows.append(row)
    if as_json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_markdown_table(list(rows[0]), [list(row.values()) for row in rows]), end="")


def read_questions(path: str) -> list[dict]:
    """The `{"question", "id"}` records of a JSONL file (blank lines skipped); a bad line is an error naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"--questions {path}: no such file.")
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg}).") from None
            if not isinstance(record, dict):
                raise ValueError(f'{path}: line {number} must be a JSON object with "question" and "id".')
            for key in ("question", "id"):
                if not isinstance(record.get(key), str) or not record[key]:
                    raise ValueError(f"{path}: line {number} needs a non-empty string {key!r}.")
            records.append({"line": number, "id": record["id"], "question": record["question"]})
    if not records:
        raise ValueError(f"{path}: no questions in the file.")
    return records


def _ask_file(memory: CREMMemory, records: list[dict], args: argparse.Namespace) -> list[dict]:
    answers = memory.ask_many(
        [(record["question"], record["id"]) for record in records],
        max_new_tokens=args.max_new_tokens,
        memory_budget_bytes=args.memory_budget_mib * 2**20,
        max_batch_size=args.batch_size,
    )
    results = [{**record, "answer": answer} for record, answer in zip(records, answers, strict=True)]
    text = "".join(json.dumps(result) + "\n" for result in results)
    if args.output:
        write_text_atomically(args.output, text)
    else:
        print(text, end="")
    return results


def _storage_options(pairs: list[str]) -> dict[str, str] | None:
    options = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"--storage-option {pair!r}: expected KEY=VALUE.")
        options[key] = value
    return options or None


def run(args: argparse.Namespace) -> object:
    """Run one parsed command and print its result."""
    storage = _storage_options(args.storage_option)
    if args.command == "info":
        print(json.dumps(CREMMemory.describe(args.memory, storage), indent=2))
        return None
    # The cheap checks come before the model is loaded: the memory (or the source to index), then the model path.
    records = None
    if args.command == "index":
        read_source(args.source, args.image_root)
        if args.full_vectors is False and args.vector_format is not None:
            check_rescoring_source(args.vector_format, args.full_vectors)
        layout = {"format": args.vector_format, "dim": args.vector_dim, "full_vectors": args.full_vectors}
        if args.context_format is not None or any(value is not None for value in layout.values()):
            try:
                stored = CREMMemory.describe(args.memory, storage)
            except ValueError:
                stored = None  # no memory there yet (or not one): `open` creates it or says why it cannot
            if stored is not None:
                CREMMemory._check_format(args.memory, stored["context_format"], args.context_format)
                stored_layout = SearchLayout(
                    format=stored["vector_format"],
                    dim=stored["vector_dim"],
                    hidden_size=stored["model"]["hidden_size"],
                    full_vectors=stored["full_vectors"],
                )
                CREMMemory._check_search_layout(args.memory, stored_layout, layout)
    else:
        if args.command == "ask":
            if (args.question is None) == (args.questions is None):
                raise ValueError("crem-memory ask needs one of --question (with a query or --ids) or --questions.")
            if args.questions is not None:
                if args.ids or args.text is not None or args.image is not None:
                    raise ValueError("--questions names its items itself: drop --ids, --text and --image.")
                records = read_questions(args.questions)
            elif args.output is not None:
                raise ValueError("--output is for --questions (the JSONL answers); --question prints its table.")
        CREMMemory.describe(args.memory, storage)
    check_model_source(args.model)
    parallel.initialize_from_environment()
    try:
        model, processor = load_crem(args.model)
        model = model.to(args.device).eval()
        memory = CREMMemory.open(
            args.memory,
            model,
            processor,
            create=args.command == "index",
            storage_options=storage,
            context_format=args.context_format if args.command == "index" else None,
            **(
                {"vector_format": args.vector_format, "vector_dim": args.vector_dim, "full_vectors": args.full_vectors}
                if args.command == "index"
                else {}
            ),
        )
        if args.command == "index":
            report = memory.index(
                args.source,
                image_root=args.image_root,
                instruction=args.instruction,
                batch_size=args.batch_size,
                build_ann_index=True if args.ann else None,
            )
            if parallel.is_main_process():
                print(f"{args.memory}: {report}; {len(memory)} items stored")
                for where, reason in report.failures:
                    print(f"  skipped {where}: {reason}")
            return report
        if records is not None:
            return _ask_file(memory, records, args)
        if args.command == "ask" and args.ids:
            hits = [MemoryHit(id=i, score=float("nan"), rank=r) for r, i in enumerate(args.ids)]
        else:
            hits = _hits(memory, args)
        answers = memory.ask(args.question, hits, max_new_tokens=args.max_new_tokens) if args.command == "ask" else None
        _print_hits(hits, answers, args.json)
        return hits
    finally:
        parallel.shutdown()


def main(argv: list[str] | None = None) -> int:
    """The `crem-memory` command: exit status 0 on success, 1 with a one-line reason on stderr (2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    return run_command("crem-memory", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
