"""
`CREMMemory`: a visual memory on LanceDB. One CREM forward per item yields its embedding (for search) and its
compressed context (the chorus block's keys and values, from which the model answers without the image); both are
stored in one row, the prompt prefix every context shares (system prompt and turn header) once per memory.

Layout of a memory (a LanceDB database: a local folder or any LanceDB URI, e.g. on object storage):

* table `crem_memory`, one row: the format version, the fingerprint of the model that wrote it, the storage format of
  the contexts (`context_format`: `model`, `int8` or `int4`, see `quantize.py`), the search layout of the embeddings
  (`vector_format`: `float32`, `int8` or `binary`, `vector_dim` and `full_vectors`, see `search_formats.py`) and the
  shared prefix (its exact keys/values, token ids and positions);
* table `items`, one row per item (its format, encoded and decoded: `rows.py`): `id`, the embedding (cosine search)
  and, where the search layout needs one, its own search vector, the compressed context (keys/values of the chorus
  slots, exact or quantised, with its SHA-256, token ids and MRoPE positions), and the user's `source`, `text` and
  `metadata`.

Every `add` batch is one LanceDB commit (atomic): a killed run leaves whole rows only, and running it again skips the
ids already stored. The commit is a merge-insert keyed on `id`, the items table's (unenforced) primary key: Lance then
records the keys a commit inserts, so of two writers inserting one id at once, one commits and the other's commit
conflicts and is retried against the new version, where the id is found and skipped. Any number of processes (or
machines, on object storage) can index into one memory: each id is stored once, and readers see whole commits only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import lancedb
import numpy as np
import pyarrow as pa
import torch
from lancedb.index import BTree
from PIL import Image
from tqdm.auto import tqdm
from transformers import DynamicCache

from .. import parallel
from ..instructions import T2I_INSTRUCTION
from ..modeling_crem import CREMCompressedContext
from .quantize import CONTEXT_FORMATS, check_context_format
from .rows import (
    CONTEXT_COLUMNS,
    HIT_COLUMNS,
    RowCodec,
    bytes_tensor,
    is_primary_key,
    items_schema,
    rows_table,
    sha256,
    slots_bytes,
)
from .search_formats import SEARCH_COLUMN, SearchLayout, check_vector_dim, check_vector_format, trained_dims
from .sources import MemoryItem, check_items, read_source

__all__ = ["CREMMemory", "IndexReport", "MemoryHit", "model_fingerprint"]

#: Version of the table layout; a memory of another version is refused.
FORMAT_VERSION = 1
META_TABLE = "crem_memory"
ITEMS_TABLE = "items"
#: The scalar (B-tree) index on `id` that makes reading a context a point lookup, not a scan of the table.
ID_INDEX = "id_idx"
#: Fingerprint fields that must match for a model to read a memory (`crem_hf_version` is informative only).
MATCHING_FIELDS = (
    "config_sha256",
    "weights_sha256",
    "dtype",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "chorus_token_ids",
)
#: The backbone (CREM `model_type`) of a memory written before the fingerprint recorded it: only Qwen2-VL existed.
LEGACY_BACKBONE = "crem"
#: Rows from which `index` builds an approximate (IVF) index; smaller tables are scanned exactly.
ANN_MIN_ROWS = 100_000
#: Candidates per hit that an approximate search re-scores exactly.
REFINE_FACTOR = 10
#: LanceDB's own probe count (its `nprobes` default): the fewest partitions a search probes by default.
LANCEDB_NPROBES = 20
#: Share of the approximate index's partitions a search probes by default (see `default_nprobes`).
PROBE_FRACTION = 0.1
#: Config keys that say where or how a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "auto_map")
#: Elements of each parameter the weights fingerprint reads (an evenly strided sample: cheap even at 7B).
_SAMPLED_ELEMENTS = 4096
RERANK_QUESTION = "Does this match: {query}? Answer yes or no."
#: Our own attempts at a commit (a batch's merge-insert, the id index's refresh) whose conflicts outlast Lance's own
#: retries (many writers at once).
COMMIT_ATTEMPTS = 8
#: Words of the LanceDB errors that a retried commit can overcome (the write lost a race; nothing was committed).
_RETRYABLE_COMMIT_ERRORS = ("conflict", "contention", "timed out", "timeout")
T = TypeVar("T")


@dataclass(frozen=True)
class MemoryHit:
    """
    One search result.

    Args:
        id: the item's id.
        score: cosine similarity of the query and item embeddings.
        rank: 0 for the best hit.
        source: the image path (or URL) the item was read from, if any.
        text: the item's text, if any.
        metadata: the user's metadata.
        judgement: after [`CREMMemory.rerank`], the model's log-odds that the item matches the query.
    """

    id: str
    score: float
    rank: int
    source: str | None = None
    text: str | None = None
    metadata: dict = field(default_factory=dict)
    judgement: float | None = None


@dataclass
class IndexReport:
    """What an `add`/`index` call did (summed over processes under a launcher)."""

    added: int = 0
    skipped_existing: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def __str__(self) -> str:
        return f"added {self.added}, already stored {self.skipped_existing}, failed to load {self.failed}"


def _check_positive(name: str, value: object) -> None:
    """A `ValueError` naming `name` unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def ann_partitions(rows: int) -> int:
    """
    Partitions that `build_ann_index` asks for over `rows` rows by default: sqrt(rows). (LanceDB trains fewer for an
    IVF-PQ index below 65,536 rows: at most one per 256 rows.)
    """
    return max(1, math.isqrt(rows))


def default_nprobes(partitions: int) -> int:
    """
    Partitions a search probes by default in an approximate index of `partitions` partitions: `PROBE_FRACTION` of
    them, and never fewer than LanceDB's own default (`LANCEDB_NPROBES`, which probes every partition of a small
    index). A share rather than LanceDB's fixed count: with sqrt(rows) partitions, a fixed count probes an ever
    smaller share of the table as it grows (20 of 1,000 partitions at 10^6 rows, 2 %) and misses the partition of
    the item sought more and more often; a fixed share keeps recall level while the codes scanned grow as
    sqrt(rows) (measured in `benchmarks/memory_scale.py`). More probes than partitions probe them all.
    """
    return max(LANCEDB_NPROBES, math.ceil(PROBE_FRACTION * partitions))


def model_fingerprint(model) -> dict[str, Any]:
    """
    What a memory's contexts depend on: the backbone (the CREM `model_type`: `crem` for Qwen2-VL, `crem_qwen2_5_vl`,
    `crem_qwen3_vl`), the config (hash), the weights (hash of an evenly strided sample of every parameter), the dtype,
    the cache geometry and the chorus ids; and the crem-hf version, for the record.
    """
    from .. import __version__

    config = json.loads(model.config.to_json_string(use_diff=False))
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    for sub in ("text_config", "vision_config"):
        for key in _VOLATILE_CONFIG_KEYS:
            if isinstance(config.get(sub), dict):
                config[sub].pop(key, None)
    weights = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            flat = parameter.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLED_ELEMENTS)][:_SAMPLED_ELEMENTS]
            weights.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
            weights.update(sample.float().cpu().numpy().tobytes())
    text = model.config.text_config
    return {
        "backbone": model.config.model_type,
        "config_sha256": sha256(json.dumps(config, sort_keys=True).encode()),
        "weights_sha256": weights.hexdigest(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "num_layers": text.num_hidden_layers,
        "num_kv_heads": text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "hidden_size": text.hidden_size,
        "chorus_token_ids": list(model.config.chorus_token_ids),
        "crem_hf_version": __version__,
    }


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _sql_string(value: str) -> str:
    """A SQL string literal holding `value` verbatim (user ids are data, never SQL)."""
    return "'" + value.replace("'", "''") + "'"


def _table_names(db) -> set[str]:
    listed = db.list_tables()
    return set(getattr(listed, "tables", listed))


def _connect(uri: str, storage_options: dict[str, str] | None):
    """A connection whose every read sees the latest commit: other processes may be appending to the memory."""
    return lancedb.connect(uri, storage_options=storage_options, read_consistency_interval=timedelta(0))


def _check_location(uri: str, create: bool) -> None:
    """A local path must be a folder (or, with `create`, not exist yet): nothing is created by a failed open."""
    if not _is_local(uri):
        return
    path = uri.removeprefix("file://")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{uri} is not a CREM memory: it is a file (a memory is a LanceDB folder or URI).")
    if not create and not os.path.isdir(path):
        raise ValueError(f"{uri} is not a CREM memory: no such folder (pass create=True to make one).")


def _open_committed(db, name: str):
    """The table `name`, or None while it has no committed version (never created, or being created right now:
    LanceDB lists a table whose first commit is still being written, or was killed, but cannot open it)."""
    try:
        return db.open_table(name)
    except ValueError as error:
        if "not found" in str(error) or "does not exist" in str(error):
            return None
        raise


def _read_meta(uri: str, storage_options: dict[str, str] | None) -> tuple[Any, dict]:
    """Connect to the memory at `uri` and read its meta row, checking that it is a memory of this format."""
    db = _connect(uri, storage_options)
    names = _table_names(db)
    meta_table = _open_committed(db, META_TABLE) if META_TABLE in names else None
    if meta_table is None:
        raise ValueError(
            f"{uri} is not a CREM memory (it has no '{META_TABLE}' table). Index into it with create=True "
            "(`crem-memory index`), or give the folder of an existing memory."
        )
    meta = meta_table.to_arrow().to_pylist()
    if len(meta) != 1:
        raise ValueError(f"{uri}: the '{META_TABLE}' table must hold one row, it holds {len(meta)}.")
    meta = meta[0]
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{uri} has memory format version {meta['format_version']}; this crem-hf reads version "
            f"{FORMAT_VERSION}. Re-index it with this version."
        )
    # Memories written before quantised contexts have no format field: their contexts are exact.
    meta["context_format"] = meta.get("context_format") or "model"
    if meta["context_format"] not in CONTEXT_FORMATS:
        raise ValueError(
            f"{uri} stores its contexts in format {meta['context_format']!r}, which this crem-hf does not read (it "
            f"reads {', '.join(CONTEXT_FORMATS)}). Open it with the crem-hf that wrote it, or re-index it."
        )
    hidden = json.loads(meta["fingerprint"])["hidden_size"]
    meta["search_layout"] = SearchLayout.from_meta(meta, hidden, uri)
    if ITEMS_TABLE not in names:
        raise ValueError(f"{uri} is damaged: it has no '{ITEMS_TABLE}' table.")
    return db, meta


def _backbone_title(backbone: str) -> str:
    """The backbone's name for messages (`Qwen3-VL` for `crem_qwen3_vl`), or the `model_type` itself if unknown."""
    from ..loading import CREM_CLASSES

    cls = CREM_CLASSES.get(backbone)
    return cls._backbone_title if cls is not None else backbone


def _describe(uri: str, db, meta: dict) -> dict[str, Any]:
    items = db.open_table(ITEMS_TABLE)
    stats = items.stats()
    rows = stats["num_rows"]
    indices = items.list_indices()
    fingerprint = json.loads(meta["fingerprint"])
    fingerprint.setdefault("backbone", LEGACY_BACKBONE)
    layout = meta["search_layout"]
    return {
        "uri": uri,
        "backbone": f"{_backbone_title(fingerprint['backbone'])} ({fingerprint['backbone']})",
        "rows": rows,
        "items_bytes": stats["total_bytes"],
        "bytes_per_item": stats["total_bytes"] / rows if rows else None,
        "shared_prefix_bytes": db.open_table(META_TABLE).stats()["total_bytes"],
        "shared_prefix_slots": len(meta["prefix_ids"]),
        "context_slots_per_item": len(fingerprint["chorus_token_ids"]),
        "context_format": meta["context_format"],
        "vector_format": layout.format,
        "vector_dim": layout.dim,
        "full_vectors": layout.full_vectors,
        "search_column": layout.column,
        "ann_index": any(layout.column in index.columns for index in indices),
        "id_index": any(index.name == ID_INDEX for index in indices),
        "model": fingerprint,
    }


def _retry_commit(commit: Callable[[], T], before_retry: Callable[[], None] | None = None) -> T:
    """
    `commit()`, tried again (up to `COMMIT_ATTEMPTS` times in all) while it fails with a commit conflict of a
    concurrent writer that outlasted LanceDB's own retries; `before_retry` runs before each new try. Any other error,
    or a conflict on the last try, is raised.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return commit()
        except Exception as error:
            if attempt == COMMIT_ATTEMPTS or not any(word in str(error).lower() for word in _RETRYABLE_COMMIT_ERRORS):
                raise
            if before_retry is not None:
                before_retry()
    raise AssertionError("unreachable")


def _refresh_id_index(items) -> bool:
    """
    Make the B-tree index on `id` cover every row (rebuilding it from the id column alone: no data file is
    rewritten); returns whether it was (re)built. Rows appended after it stay readable (LanceDB scans the unindexed
    fragments), only slower, until the next refresh.
    """

    def refresh() -> bool:
        if any(index.name == ID_INDEX for index in items.list_indices()):
            stats = items.index_stats(ID_INDEX)
            if stats is not None and stats.num_unindexed_rows == 0:
                return False
        items.create_index("id", config=BTree(), replace=True, name=ID_INDEX)
        return True

    # Another writer committed meanwhile (rows, or its own refresh): look again at the latest version.
    return _retry_commit(refresh, before_retry=items.checkout_latest)


class CREMMemory:
    """
    A visual memory: items (images, texts or both) encoded once by a CREM model, searched by embedding and answered
    from their stored compressed contexts, without the image, the vision tower or the long prefill.

    Open (or create) one with [`CREMMemory.open`]; the model and processor must be the ones that wrote it.
    """

    def __init__(self, uri: str, db, meta: dict, items, model, processor):
        self.uri, self.db, self.items = uri, db, items
        self.model, self.processor = model, processor
        self._items_schema = items.schema  # read once: each `.schema` is a call into LanceDB
        self.fingerprint = json.loads(meta["fingerprint"])
        self.context_format = meta["context_format"]
        self.search_layout: SearchLayout = meta["search_layout"]
        self.num_chorus_tokens = model.config.num_chorus_tokens
        self.dtype = model.dtype
        f = self.fingerprint
        self.prefix_ids = torch.tensor(meta["prefix_ids"], dtype=torch.long)
        self.rows = RowCodec(
            uri=uri,
            layout=self.search_layout,
            context_format=self.context_format,
            dtype=self.dtype,
            kv_shape=(f["num_layers"], 2, f["num_kv_heads"], self.num_chorus_tokens, f["head_dim"]),
            prefix_ids=self.prefix_ids,
        )
        self.rows.check_schema(self._items_schema)
        prefix = meta["prefix_kv"]
        if sha256(prefix) != meta["prefix_sha256"]:
            raise ValueError(f"{uri}: the shared prefix context is corrupt (its SHA-256 does not match).")
        self.prefix_positions = torch.tensor(meta["prefix_positions"], dtype=torch.long).reshape(3, -1)
        self.prefix_kv = bytes_tensor(
            prefix, self.dtype, (f["num_layers"], 2, f["num_kv_heads"], len(self.prefix_ids), f["head_dim"])
        )

    # -------------------------------------------------------------------------------------------- open / create

    @classmethod
    def open(
        cls,
        uri: str | os.PathLike,
        model,
        processor,
        *,
        create: bool = False,
        storage_options: dict[str, str] | None = None,
        context_format: str | None = None,
        vector_format: str | None = None,
        vector_dim: int | None = None,
        full_vectors: bool | None = None,
    ) -> CREMMemory:
        """
        Open the memory at `uri` (a folder, or any LanceDB URI such as `s3://bucket/memory`) for `model`.

        Args:
            uri: where the memory lives.
            model: the `CREMForEmbeddingAndGeneration` that wrote (or will write) it.
            processor: its `CREMProcessor`.
            create: create the memory when `uri` holds none (under a launcher, the main process creates it).
            storage_options: passed to `lancedb.connect` (object-storage credentials and the like).
            context_format: how the contexts are stored: `model` (exact, in the model's dtype; the default of a new
                memory), `int8` or `int4` (quantised, dequantised into the model's dtype when read; see
                `quantize.py`). `None`: the memory's own format (`model` for a new one). A memory holds one format.
            vector_format: how the embeddings are searched: `float32` (the default of a new memory), `int8` or
                `binary` (quantised candidates re-scored exactly; see `search_formats.py`). `None`: the memory's own.
            vector_dim: the search dim: a Matryoshka dim the model was trained for (`config.matryoshka_dims`) or the
                hidden size (the default of a new memory); embeddings and queries are truncated to it and
                renormalised. `None`: the memory's own.
            full_vectors: whether the `vector` column keeps the whole embeddings (the default of a new memory; the
                re-scoring source of `binary`, which is refused without it). `None`: the memory's own.
        Raises:
            ValueError: `uri` is not a memory (and `create` is False), was written by another model, another format
                version or in another context format or search layout than the requested ones, or is damaged; a
                format is unknown, `vector_dim` is not a trained dim or exceeds the hidden size, or `binary` has no
                re-scoring source (nothing is written).
        """
        uri = os.fspath(uri)
        if context_format is not None:
            check_context_format(context_format)
        requested = cls._requested_layout(model, vector_format, vector_dim, full_vectors)
        _check_location(uri, create)
        if create and parallel.is_main_process():
            db = _connect(uri, storage_options)
            if _open_committed(db, META_TABLE) is None:
                cls._create(db, uri, model, processor, context_format or "model", requested)
        parallel.barrier()  # the main process has created the memory before the others read it
        db, meta = _read_meta(uri, storage_options)
        cls._check_format(uri, meta["context_format"], context_format)
        cls._check_search_layout(
            uri, meta["search_layout"], {"format": vector_format, "dim": vector_dim, "full_vectors": full_vectors}
        )
        cls._check_model(uri, json.loads(meta["fingerprint"]), model_fingerprint(model))
        return cls(uri, db, meta, db.open_table(ITEMS_TABLE), model, processor)

    @staticmethod
    def describe(uri: str | os.PathLike, storage_options: dict[str, str] | None = None) -> dict[str, Any]:
        """What `info` says, without a model: rows, bytes, the shared prefix and the model that wrote the memory."""
        uri = os.fspath(uri)
        _check_location(uri, create=False)
        db, meta = _read_meta(uri, storage_options)
        return _describe(uri, db, meta)

    @staticmethod
    def _check_format(uri: str, stored: str, requested: str | None) -> None:
        """A memory holds one context format: opening it for another (to add rows of that format) is refused."""
        if requested is not None and stored != requested:
            raise ValueError(
                f"{uri} stores its contexts in format {stored!r}, not {requested!r}: a memory holds one format. "
                "Open it without a format (or with its own), or index into a new memory."
            )

    @staticmethod
    def _requested_layout(
        model, vector_format: str | None, vector_dim: int | None, full_vectors: bool | None
    ) -> SearchLayout:
        """The search layout a new memory gets (the defaults where None), checked against the model: before any
        write, so that a bad format or dim creates nothing."""
        hidden = model.config.text_config.hidden_size
        if vector_format is not None:
            check_vector_format(vector_format)
        if vector_dim is not None:
            check_vector_dim(vector_dim, hidden, trained_dims(model.config, hidden))
        if full_vectors is not None and not isinstance(full_vectors, bool):
            raise ValueError(f"full_vectors must be True or False, got {full_vectors!r}.")
        layout = SearchLayout(
            format=vector_format or "float32",
            dim=vector_dim or hidden,
            hidden_size=hidden,
            full_vectors=True if full_vectors is None else full_vectors,
        )
        return layout.check()

    @staticmethod
    def _check_search_layout(uri: str, stored: SearchLayout, requested: dict[str, Any]) -> None:
        """A memory holds one search layout: opening it for another (format, dim or full vectors) is refused."""
        names = {"format": "vector format", "dim": "vector dim", "full_vectors": "full_vectors"}
        for key, value in requested.items():
            if value is not None and getattr(stored, key) != value:
                raise ValueError(
                    f"{uri} stores its search vectors as {stored.describe()}, not {names[key]} {value!r}: a memory "
                    "holds one search layout. Open it without one (or with its own), or index into a new memory."
                )

    @staticmethod
    def _check_model(uri: str, stored: dict, current: dict) -> None:
        written, this = stored.get("backbone", LEGACY_BACKBONE), current["backbone"]
        if written != this:
            raise ValueError(
                f"{uri} was written by a {_backbone_title(written)} CREM model ({written}); this model is "
                f"{_backbone_title(this)} ({this}). Contexts are model-specific: open it with the model that wrote "
                "it, or index into a new memory."
            )
        differing = [key for key in MATCHING_FIELDS if stored.get(key) != current.get(key)]
        if differing:
            details = "; ".join(f"{key}: memory {stored.get(key)!r}, model {current.get(key)!r}" for key in differing)
            raise ValueError(
                f"{uri} was written by another model (crem-hf {stored.get('crem_hf_version')}); contexts are "
                f"model-specific. Differences: {details}. Open it with the model that wrote it, or index into a new "
                "memory."
            )

    @classmethod
    def _create(cls, db, uri: str, model, processor, context_format: str, layout: SearchLayout) -> None:
        """
        Write the items table (empty), then the meta row: a memory is complete once its meta table exists. Safe when
        several processes create the same memory at once: each table's first commit succeeds once (LanceDB commits a
        version with put-if-absent), the losers keep the winner's tables, and `open` then checks that the winner's
        fingerprint and context format are this model's and the requested ones.
        """
        fingerprint = model_fingerprint(model)
        # The prefix every context shares: the kept slots in front of the chorus block of any item.
        inputs = processor.process_embedding_inputs(texts=["."]).to(model.device)
        context = model.compress(**inputs)
        n = model.config.num_chorus_tokens
        prefix_length = context.input_ids.shape[1] - n
        prefix = slots_bytes(context.cache, 0, prefix_length)[0]
        try:
            items = db.create_table(ITEMS_TABLE, schema=items_schema(layout), exist_ok=True)
        except Exception:
            items = _open_committed(db, ITEMS_TABLE)
            if items is None:  # not a lost race: a real failure
                raise
        _refresh_id_index(items)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": json.dumps(fingerprint),
            "context_format": context_format,
            **layout.to_meta(),
            "prefix_kv": prefix,
            "prefix_sha256": sha256(prefix),
            "prefix_ids": context.input_ids[0, :prefix_length].tolist(),
            "prefix_positions": context.position_ids[:, 0, :prefix_length].reshape(-1).tolist(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        meta_schema = pa.schema(
            [
                pa.field("format_version", pa.int32()),
                pa.field("fingerprint", pa.string()),
                pa.field("context_format", pa.string()),
                pa.field("vector_format", pa.string()),
                pa.field("vector_dim", pa.int32()),
                pa.field("full_vectors", pa.bool_()),
                pa.field("prefix_kv", pa.large_binary()),
                pa.field("prefix_sha256", pa.string()),
                pa.field("prefix_ids", pa.list_(pa.int32())),
                pa.field("prefix_positions", pa.list_(pa.int32())),
                pa.field("created", pa.string()),
            ]
        )
        try:
            db.create_table(META_TABLE, data=pa.Table.from_pylist([meta], schema=meta_schema))
        except Exception:
            if _open_committed(db, META_TABLE) is None:  # not a lost race: a real failure
                raise

    # -------------------------------------------------------------------------------------------- writing

    def __len__(self) -> int:
        return self.items.count_rows()

    def stored_ids(self) -> set[str]:
        """Every id in the memory (reads the id column only)."""
        count = len(self)
        if count == 0:
            return set()
        rows = self.items.search().select(["id"]).limit(count).to_arrow()
        return set(rows.column("id").to_pylist())

    def add(
        self,
        *,
        ids: Sequence[str],
        images: Sequence[Any] | None = None,
        texts: Sequence[str | None] | None = None,
        metadata: Sequence[dict | None] | None = None,
        instruction: str | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
    ) -> IndexReport:
        """
        Encode items and store them, one forward per batch for the embedding and the context together.

        Ids already stored are skipped; an image that fails to load skips its item and is counted in the report
        (with the reason); each batch is one atomic commit. Under a launcher (`torchrun`, `accelerate launch`)
        each process encodes its share of the batches and the report sums over processes.

        Args:
            ids: one unique, non-empty id per item.
            images: one image (PIL, path, URL or `None`) per item.
            texts: one text (or `None`) per item.
            metadata: one JSON-serialisable dict (or `None`) per item.
            instruction: the embedding instruction (default: the processor's, as `process_embedding_inputs`).
            batch_size: items per forward.
            show_progress: a progress bar (on the main process).
        """
        items = [
            MemoryItem(id=i, image=im, text=t, metadata=m or {})
            for i, im, t, m in zip(
                ids,
                images if images is not None else [None] * len(ids),
                texts if texts is not None else [None] * len(ids),
                metadata if metadata is not None else [None] * len(ids),
                strict=True,
            )
        ]
        return self._add_items(items, instruction, batch_size, show_progress, failures=[])

    def index(
        self,
        source: str | os.PathLike,
        *,
        image_root: str | os.PathLike | None = None,
        instruction: str | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
        build_ann_index: bool | None = None,
    ) -> IndexReport:
        """
        Index a folder of images (ids: their paths relative to it) or a JSONL file of `{"id", "image", "text", ...}`
        records (other keys become metadata; see [`read_source`]). Resumable: ids already stored are skipped.

        Args:
            source: the folder or `.jsonl` file.
            image_root: where relative image paths of a JSONL file are found (default: the file's folder).
            build_ann_index: build an approximate (IVF) index afterwards; default: when the memory holds at least
                `ANN_MIN_ROWS` rows (smaller ones are scanned exactly).
        """
        items, failures = read_source(source, image_root)
        report = self._add_items(items, instruction, batch_size, show_progress, failures)
        if parallel.is_main_process():
            if build_ann_index or (build_ann_index is None and len(self) >= ANN_MIN_ROWS):
                self.build_ann_index()  # refreshes the id index too
            else:
                self.refresh_id_index()
        parallel.barrier()
        return report

    def refresh_id_index(self) -> bool:
        """
        Bring the scalar index on `id` up to date with every stored row, so that reading a context by id is a point
        lookup (`index` and `build_ann_index` call it; after `add` the new rows are found by a scan of just
        them until then). Returns whether the index was rebuilt.
        """
        return _refresh_id_index(self.items)

    def _add_items(
        self,
        items: list[MemoryItem],
        instruction: str | None,
        batch_size: int,
        show_progress: bool,
        failures: list[tuple[str, str]],
    ) -> IndexReport:
        """
        Store the `items` (checked first: `check_items`) whose ids are not stored yet, in batches of `batch_size`,
        each process its share of the batches; the report (with the reader's `failures`) sums over processes.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        check_items(items)
        stored = self.stored_ids()
        parallel.barrier()  # every process has read the stored ids before any process appends
        pending = [item for item in items if item.id not in stored]
        report = IndexReport(skipped_existing=len(items) - len(pending))
        # Loading an image is where an item can fail: load them batch by batch, in a fixed order on every process.
        batches = [pending[start : start + batch_size] for start in range(0, len(pending), batch_size)]
        mine = [batches[b] for b in parallel.share_of_this_process(len(batches))]
        local_failures = self._write_batches(mine, instruction, show_progress, report)
        report.failures = failures + local_failures
        if parallel.world_size() > 1:
            report = self._summed(report, failures, local_failures, len(items) - len(pending))
        return report

    def _write_batches(
        self, batches: list[list[MemoryItem]], instruction: str | None, show_progress: bool, report: IndexReport
    ) -> list[tuple[str, str]]:
        """
        Load, encode and commit `batches` in order, counting the rows into `report`; returns `(id, reason)` of the
        items whose image failed to load. One writer thread commits batch i (transfer, checks, bytes, checksums,
        LanceDB) while batch i + 1 is encoded; at most one commit is in flight, so rows land in order and an error
        surfaces at the next batch.
        """
        failures: list[tuple[str, str]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crem-memory-writer") as writer:
            commit = None
            for batch in tqdm(batches, desc="Indexing", disable=not (show_progress and parallel.is_main_process())):
                loaded = self._load_images(batch, failures)
                if not loaded:
                    continue
                encoded = self._encode_batch(loaded, instruction)
                if commit is not None:
                    self._count(report, *commit.result())
                commit = writer.submit(self._commit, *encoded)
            if commit is not None:
                self._count(report, *commit.result())
        return failures

    @staticmethod
    def _count(report: IndexReport, batch: int, inserted: int) -> None:
        """A batch's rows that another writer committed first (after our pre-check) were found stored, not added."""
        report.added += inserted
        report.skipped_existing += batch - inserted

    def _load_images(
        self, items: list[MemoryItem], failures: list[tuple[str, str]]
    ) -> list[tuple[MemoryItem, Image.Image | None]]:
        """The items whose image loads (or that have none), with it; the others go to `failures` with the reason."""
        loaded = []
        for item in items:
            try:
                image = None if item.image is None else self.processor.load_image(item.image, f"item {item.id!r}")
            except (ValueError, OSError) as error:
                failures.append((item.id, str(error)))
                continue
            loaded.append((item, image))
        return loaded

    @staticmethod
    def _summed(report: IndexReport, shared: list, local: list, shared_skipped: int) -> IndexReport:
        """
        The report over every process: `failures` of the source reader and the ids the pre-check found stored are
        the same on each; what each process added, and found stored at its commits, is its own.
        """
        raced = report.skipped_existing - shared_skipped
        gathered = parallel.gather_objects([parallel.rank()], [(report.added, raced, local)], parallel.world_size())
        return IndexReport(
            added=sum(added for added, _, _ in gathered),
            skipped_existing=shared_skipped + sum(raced for _, raced, _ in gathered),
            failures=shared + [failure for _, _, failures in gathered for failure in failures],
        )

    @torch.no_grad()
    def _encode_batch(
        self, loaded: list[tuple[MemoryItem, Image.Image | None]], instruction: str | None
    ) -> tuple[list[MemoryItem], CREMCompressedContext]:
        """One compressed forward over a batch: the items and their context (with embeddings), on the model's device."""
        inputs = self.processor.process_embedding_inputs(
            images=[image for _, image in loaded], texts=[item.text for item, _ in loaded], instruction=instruction
        ).to(self.model.device)
        return [item for item, _ in loaded], self.model.compress(**inputs, return_embeddings=True)

    @torch.no_grad()
    def _commit(self, items: list[MemoryItem], context: CREMCompressedContext) -> tuple[int, int]:
        """
        Encode one batch into rows (checked against the memory's format: `RowCodec.encode`) and write them as one
        LanceDB commit (nothing of the batch when a check fails); returns the batch's size and the rows written (the
        others were stored by another writer meanwhile). Runs on the writer thread, so that the main thread never
        waits for the device: the transfers to the CPU happen here.
        """
        columns = self.rows.encode(items, context)
        return len(items), self._merge_insert(rows_table(columns, self._keyed_items_schema()))

    def _keyed_items_schema(self) -> pa.Schema:
        """The items schema, with `id` declared the primary key (done once for a memory written before it was)."""
        if not is_primary_key(self._items_schema.field("id")):
            try:
                self.items.set_unenforced_primary_key("id")
            except Exception:  # another writer declared it at the same moment: it is declared either way
                self.items.checkout_latest()
            self._items_schema = self.items.schema
        return self._items_schema

    def _merge_insert(self, rows: pa.Table) -> int:
        """
        Insert the rows whose id is not stored yet, in one commit; returns how many it inserted. Lance retries a
        commit that conflicts with a concurrent one (same ids inserted) on the new version, where those ids now
        match and are skipped; conflicts that outlast its retries are tried again here, as a whole.
        """
        return _retry_commit(
            lambda: self.items.merge_insert("id").when_not_matched_insert_all().execute(rows).num_inserted_rows
        )

    def build_ann_index(self, num_partitions: int | None = None) -> None:
        """
        Build the approximate index of the memory's search column (see `search_formats.py`): IVF-PQ (cosine) for
        `float32`, IVF-SQ (cosine, 8-bit codes) for `int8`, IVF_FLAT (hamming, on the packed sign bits) for
        `binary`, with `num_partitions` partitions (default: `ann_partitions(rows)`, sqrt(rows)); searches then use
        it. Its recall against the exact scan is measured in `benchmarks/memory.py` and `benchmarks/memory_scale.py`.
        """
        rows = len(self)
        if rows < 256:
            raise ValueError(f"An approximate index needs at least 256 rows; the memory holds {rows}.")
        layout = self.search_layout
        options: dict[str, Any] = {"num_partitions": num_partitions or ann_partitions(rows)}
        if layout.format == "float32":
            d = layout.dim
            options["num_sub_vectors"] = next(s for s in (d // 16, d // 8, d // 4, 1) if s and d % s == 0)
        index_type = {"float32": "IVF_PQ", "int8": "IVF_SQ", "binary": "IVF_FLAT"}[layout.format]
        self.items.create_index(
            metric=layout.metric, vector_column_name=layout.column, index_type=index_type, replace=True, **options
        )
        self.refresh_id_index()

    # -------------------------------------------------------------------------------------------- reading

    def default_nprobes(self) -> int | None:
        """
        The partitions a search probes when it is given no `nprobes`: [`default_nprobes`] of the partitions that
        `build_ann_index` makes by default over the rows the search column's index covers (an index built with
        another `num_partitions` is best searched with an explicit `nprobes`). `None` without an approximate index
        (searches scan the column).
        """
        indexed = [index for index in self.items.list_indices() if self.search_layout.column in index.columns]
        return default_nprobes(ann_partitions(indexed[0].num_indexed_rows)) if indexed else None

    def info(self) -> dict[str, Any]:
        """The memory's size on storage, its rows, its shared prefix and the model that wrote it."""
        return _describe(
            self.uri,
            self.db,
            {
                "fingerprint": json.dumps(self.fingerprint),
                "prefix_ids": self.prefix_ids,
                "context_format": self.context_format,
                "search_layout": self.search_layout,
            },
        )

    @torch.no_grad()
    def embed_queries(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Any] | None = None,
        instruction: str | None = None,
    ) -> torch.Tensor:
        """
        Query embeddings `(num_queries, hidden_size)` float32. Text-only queries get the caption-to-image
        instruction by default; queries with an image get the processor's image instruction (or their text).
        """
        count = len(texts) if texts is not None else len(images) if images is not None else 0
        texts = list(texts) if texts is not None else [None] * count
        images = list(images) if images is not None else [None] * count
        if count == 0:
            raise ValueError("A search needs at least one query: a text and/or an image.")
        if len(texts) != len(images):
            raise ValueError(f"Got {len(texts)} query texts for {len(images)} query images.")
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            if (text is None or text == "") and image is None:
                raise ValueError(f"Query {i} has neither a text nor an image.")
        if instruction is None and all(image is None for image in images):
            instruction = T2I_INSTRUCTION
        inputs = self.processor.process_embedding_inputs(images=images, texts=texts, instruction=instruction)
        return self.model.get_embedding(**inputs.to(self.model.device)).float().cpu()

    def search(
        self,
        text: str | None = None,
        image: Any = None,
        *,
        k: int = 5,
        instruction: str | None = None,
        nprobes: int | None = None,
        rescore_factor: int = REFINE_FACTOR,
    ) -> list[MemoryHit]:
        """The `k` stored items closest (cosine) to a text and/or image query, best first (see [`search_vector`])."""
        return self.search_many(
            texts=[text], images=[image], k=k, instruction=instruction, nprobes=nprobes, rescore_factor=rescore_factor
        )[0]

    def search_many(
        self,
        *,
        texts: Sequence[str | None] | None = None,
        images: Sequence[Any] | None = None,
        k: int = 5,
        instruction: str | None = None,
        exact: bool = False,
        nprobes: int | None = None,
        rescore_factor: int = REFINE_FACTOR,
    ) -> list[list[MemoryHit]]:
        """
        Search for several queries (see [`embed_queries`]); one list of `k` hits per query (see [`search_vector`]).
        """
        vectors = self.embed_queries(texts, images, instruction)
        if nprobes is None and not exact:  # once for every query: it reads the table's index list
            nprobes = self.default_nprobes()
        options = {"k": k, "exact": exact, "nprobes": nprobes, "rescore_factor": rescore_factor}
        return [self.search_vector(vector, **options) for vector in vectors]

    def search_vector(
        self,
        vector: torch.Tensor | Sequence[float],
        *,
        k: int = 5,
        exact: bool = False,
        nprobes: int | None = None,
        rescore_factor: int = REFINE_FACTOR,
    ) -> list[MemoryHit]:
        """
        The `k` items closest (cosine, at the memory's search dim) to an embedding `(hidden_size,)`; each score is
        the exact cosine of the query and the item, both truncated to the search dim and renormalised.

        The candidates come from the search column (see `search_formats.py`): through its approximate index if it
        has one (`build_ann_index`) and `exact` is False, else by a scan of it. The index is searched in the
        `nprobes` partitions nearest the query (default: [`default_nprobes`], a share of the partitions; more probes
        find more of the true neighbours, slower; at least the index's partition count probes them all). `float32` /
        `int8`: the best `rescore_factor * k` candidates of an indexed search are re-scored exactly on the float32
        column (a scan is exact already). `binary`: the best `rescore_factor * k` by Hamming distance are re-scored
        exactly from the stored float32 vectors; with `exact`, every row is (a full scan of the vectors: the exact
        ranking). With every partition probed and `rescore_factor * k` at least the rows, an indexed search returns
        the exact top `k`. `nprobes` has no effect on a scan.

        Raises:
            ValueError: the memory is empty, `k`, `nprobes` or `rescore_factor` is not a positive integer, `k`
                exceeds the memory, or a candidate's search vector is not what the memory's format makes of its
                stored vector (a row written with another format or dim: it is named).
        """
        rows = len(self)
        if rows == 0:
            raise ValueError(f"{self.uri} is empty: index items before searching.")
        _check_positive("k", k)
        if k > rows:
            raise ValueError(f"k={k} is larger than the memory ({rows} items).")
        if nprobes is not None:
            _check_positive("nprobes", nprobes)
        _check_positive("rescore_factor", rescore_factor)
        layout = self.search_layout
        full = torch.as_tensor(vector, dtype=torch.float32).cpu().numpy()
        query = self.items.search(layout.query(full), vector_column_name=layout.column).distance_type(layout.metric)
        probes = None if exact else nprobes or self.default_nprobes()
        if probes is not None:  # with an approximate index (LanceDB ignores it on a scan)
            query = query.nprobes(probes)
        columns = HIT_COLUMNS
        checked = layout.column == SEARCH_COLUMN  # rows whose search vector is derived from `vector`: checked
        if layout.format == "binary":
            # Hamming candidates (all rows for an exact search), re-scored below from the stored float32 vectors.
            pool = rows if exact else min(rows, rescore_factor * k)
            query = query.bypass_vector_index() if exact else query
            found = query.select([*columns, "_distance", "vector", SEARCH_COLUMN]).limit(pool).to_arrow()
        else:
            if exact:
                query = query.bypass_vector_index()
            else:  # with an approximate index: re-score rescore_factor x k candidates exactly on the float32 column
                query = query.refine_factor(rescore_factor)
            found = query.select([*columns, "_distance", *(["vector", SEARCH_COLUMN] if checked else [])])
            found = found.limit(k).to_arrow()
        if checked:
            stored = self.rows.stored_vectors(found)
        if layout.format == "binary":
            scores = layout.rescore(full, stored)
            order = np.argsort(-scores, kind="stable")[:k]
        else:
            scores = 1.0 - found.column("_distance").to_numpy().astype(np.float64)
            order = np.arange(found.num_rows)
        meta = found.select(columns).to_pylist()
        return [
            MemoryHit(
                id=meta[i]["id"],
                score=float(scores[i]),
                rank=rank,
                source=meta[i]["source"],
                text=meta[i]["text"],
                metadata=json.loads(meta[i]["metadata"] or "{}"),
            )
            for rank, i in enumerate(order)
        ]

    def contexts(self, hits: Sequence[MemoryHit | str]) -> CREMCompressedContext:
        """
        The stored contexts of `hits` (or ids), in order, as one batch: the shared prefix followed by each item's
        chorus slots, on the model's device, ready for `model.generate(context=...)`.
        """
        ids = [hit.id if isinstance(hit, MemoryHit) else hit for hit in hits]
        if not ids:
            raise ValueError("No hits given: search first, then ask about the hits.")
        for i in ids:
            if not isinstance(i, str):
                raise TypeError(f"A hit is a MemoryHit or an id string, got {type(i).__name__}.")
        wanted = sorted(set(ids))
        where = f"id IN ({', '.join(_sql_string(i) for i in wanted)})"
        found = self.items.search().where(where).select(CONTEXT_COLUMNS).limit(len(wanted)).to_arrow().to_pylist()
        by_id = {row["id"]: row for row in found}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise ValueError(f"{self.uri} holds no item with id {', '.join(map(repr, missing[:5]))}.")
        device = self.model.device
        keys_values, item_ids, positions = [], [], []
        for i in ids:
            kv, slot_ids, slot_positions = self.rows.decode(by_id[i])
            keys_values.append(kv)
            item_ids.append(slot_ids)
            positions.append(slot_positions)
        batch = len(ids)
        kv = torch.stack(keys_values).to(device)  # (batch, layers, 2, kv_heads, n, head_dim)
        prefix = self.prefix_kv.to(device)
        cache = DynamicCache(config=self.model.config)
        for layer in range(kv.shape[1]):
            keys = torch.cat([prefix[layer, 0].expand(batch, -1, -1, -1), kv[:, layer, 0]], dim=2)
            values = torch.cat([prefix[layer, 1].expand(batch, -1, -1, -1), kv[:, layer, 1]], dim=2)
            cache.update(keys, values, layer)
        input_ids = torch.cat([self.prefix_ids.expand(batch, -1), torch.tensor(item_ids)], dim=1)
        position_ids = torch.cat(
            [self.prefix_positions[:, None].expand(-1, batch, -1), torch.stack(positions, dim=1)], dim=2
        )
        return CREMCompressedContext(
            cache=cache,
            input_ids=input_ids.to(device),
            attention_mask=torch.ones_like(input_ids).to(device),
            position_ids=position_ids.to(device),
        )

    @torch.no_grad()
    def answer_ids(
        self, question: str, hits: Sequence[MemoryHit | str], *, max_new_tokens: int = 32, **generate_kwargs
    ) -> torch.LongTensor:
        """
        The answer tokens `(num_hits, new_tokens)` to `question` about each hit, from the stored contexts: one
        batched decode, no image loaded. Greedy by default; `do_sample=True` samples (seed with `torch.manual_seed`).
        """
        context = self.contexts(hits)
        followups = self.processor.process_followups(questions=[question] * len(hits)).to(self.model.device)
        generate_kwargs.setdefault("do_sample", False)
        sequences = self.model.generate(context=context, **followups, max_new_tokens=max_new_tokens, **generate_kwargs)
        return sequences[:, followups["input_ids"].shape[1] :]

    def ask(
        self, question: str, hits: Sequence[MemoryHit | str], *, max_new_tokens: int = 32, **generate_kwargs
    ) -> list[str]:
        """One answer per hit to `question`, from the stored contexts (see [`answer_ids`])."""
        tokens = self.answer_ids(question, hits, max_new_tokens=max_new_tokens, **generate_kwargs)
        return [answer.strip() for answer in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def kv_bytes_per_row(self, question_tokens: int, max_new_tokens: int) -> int:
        """
        Estimated KV-cache bytes of one row of a batched ask: the shared prefix and chorus slots twice (the stored
        context read from the memory, and the copy `generate` extends), then the question's and the new tokens'.
        """
        f = self.fingerprint
        slot = f["num_layers"] * 2 * f["num_kv_heads"] * f["head_dim"] * self.dtype.itemsize
        context = len(self.prefix_ids) + self.num_chorus_tokens
        return slot * (2 * context + question_tokens + max_new_tokens)

    def answer_ids_many(
        self,
        pairs: Sequence[tuple[str, MemoryHit | str]],
        *,
        max_new_tokens: int = 32,
        memory_budget_bytes: int = 2**30,
        max_batch_size: int = 64,
        show_progress: bool = True,
        **generate_kwargs,
    ) -> list[torch.LongTensor]:
        """
        The answer tokens of many `(question, hit or id)` pairs, in input order: one `(new_tokens,)` tensor each,
        ending at the first end-of-turn token (included) or after `max_new_tokens`. Pairs are batched by question
        length (so no row is padded and each answer is the one `answer_ids` gives the pair alone), each batch at most
        `max_batch_size` rows whose estimated KV cache ([`kv_bytes_per_row`]) fits `memory_budget_bytes`.
        Greedy by default; with `do_sample=True` the draws depend on the batching.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if not isinstance(max_batch_size, int) or max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}.")
        questions, hits = [], []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
                raise ValueError(f"pairs[{i}] must be a (question, hit or id) pair with a non-empty question.")
            questions.append(pair[0])
            hits.append(pair[1])
        if not questions:
            raise ValueError("No (question, hit) pairs given.")
        lengths = [int(row.sum()) for row in self.processor.process_followups(questions=questions)["attention_mask"]]
        longest = max(lengths)
        if self.kv_bytes_per_row(longest, max_new_tokens) > memory_budget_bytes:
            raise ValueError(
                f"memory_budget_bytes={memory_budget_bytes:,} is below one row's KV cache "
                f"({self.kv_bytes_per_row(longest, max_new_tokens):,} bytes for a question of {longest} tokens and "
                f"max_new_tokens={max_new_tokens})."
            )
        # Equal question lengths per batch, in input order within a length; each batch within the budget.
        order = sorted(range(len(questions)), key=lambda i: (lengths[i], i))
        batches, start = [], 0
        while start < len(order):
            length = lengths[order[start]]
            rows = min(max_batch_size, memory_budget_bytes // self.kv_bytes_per_row(length, max_new_tokens))
            stop = start
            while stop < len(order) and stop - start < rows and lengths[order[stop]] == length:
                stop += 1
            batches.append(order[start:stop])
            start = stop
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        answers: list[torch.LongTensor | None] = [None] * len(questions)
        with tqdm(total=len(questions), desc="Answering", disable=not show_progress) as progress:
            for batch in batches:
                context = self.contexts([hits[i] for i in batch])
                followups = self.processor.process_followups(questions=[questions[i] for i in batch])
                followups = followups.to(self.model.device)
                options = {"do_sample": False, **generate_kwargs}
                with torch.no_grad():
                    sequences = self.model.generate(
                        context=context, **followups, max_new_tokens=max_new_tokens, **options
                    )
                for i, tokens in zip(batch, sequences[:, followups["input_ids"].shape[1] :].cpu(), strict=True):
                    ends = [k for k, token in enumerate(tokens.tolist()) if token in eos]
                    answers[i] = tokens[: ends[0] + 1] if ends else tokens
                progress.update(len(batch))
        return answers

    def ask_many(
        self,
        pairs: Sequence[tuple[str, MemoryHit | str]],
        *,
        max_new_tokens: int = 32,
        memory_budget_bytes: int = 2**30,
        max_batch_size: int = 64,
        show_progress: bool = True,
        **generate_kwargs,
    ) -> list[str]:
        """One answer per `(question, hit or id)` pair, in input order, batched (see [`answer_ids_many`])."""
        tokens = self.answer_ids_many(
            pairs,
            max_new_tokens=max_new_tokens,
            memory_budget_bytes=memory_budget_bytes,
            max_batch_size=max_batch_size,
            show_progress=show_progress,
            **generate_kwargs,
        )
        texts = self.processor.batch_decode([answer.tolist() for answer in tokens], skip_special_tokens=True)
        return [answer.strip() for answer in texts]

    @torch.no_grad()
    def rerank(self, query: str, hits: Sequence[MemoryHit], *, question: str = RERANK_QUESTION) -> list[MemoryHit]:
        """
        Reorder `hits` by the model's own judgement, from each stored context, of whether the item matches `query`:
        the log-odds of "yes" against "no" as the first answer token (ties keep the search order).
        """
        if not hits:
            raise ValueError("No hits to rerank: search first.")
        context = self.contexts(hits)
        # The query is user text: substituted verbatim (no str.format on anything the user wrote).
        prompt = question.replace("{query}", query) if "{query}" in question else f"{question} {query}"
        followups = self.processor.process_followups(questions=[prompt] * len(hits)).to(self.model.device)
        outputs = self.model.generate(
            context=context,
            **followups,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logprobs = outputs.logits[0].float().log_softmax(-1)
        yes, no = self._answer_token_ids(("yes", "Yes")), self._answer_token_ids(("no", "No"))
        judgement = (logprobs[:, yes].logsumexp(-1) - logprobs[:, no].logsumexp(-1)).tolist()
        order = sorted(range(len(hits)), key=lambda i: (-judgement[i], i))
        return [replace(hits[i], judgement=judgement[i], rank=rank) for rank, i in enumerate(order)]

    def _answer_token_ids(self, words: tuple[str, ...]) -> list[int]:
        """The first token of each spelling of an answer word (deduplicated)."""
        tokenizer = self.processor.tokenizer
        return sorted({tokenizer.encode(word, add_special_tokens=False)[0] for word in words})
