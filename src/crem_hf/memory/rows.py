"""
The row format of a memory's items table, in one place: its schema, how an encoded batch becomes rows (`encode`),
how a stored row is read back (`decode`, and the stored vectors of search candidates), and the checks that refuse a
row, a batch or a table of another format. The two parts of a row that have formats of their own are coded by their
modules: the context bytes by `quantize.py` (`model`, `int8`, `int4`), the embedding columns by `search_formats.py`
(`float32`, `int8`, `binary`, at a truncated dim or not).

One row per item, in this order:

* `id`: string, the table's (unenforced) primary key (see `store.py`);
* the embedding columns of the memory's search layout (`SearchLayout.fields`): `vector` (float32), then
  `search_vector` where the layout searches a column of its own;
* `context`: the keys and values of the item's chorus slots, `(layers, 2, kv_heads, slots, head_dim)`, as
  `quantize.py` stores them in the memory's context format; `context_sha256`: their SHA-256 (hex);
* `context_ids`: the slots' token ids `(slots,)`; `context_positions`: their MRoPE positions `(3, slots)`, flattened;
* `source` and `text`: the item's image path or URL and its text (or null); `metadata`: the user's metadata, JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from transformers import DynamicCache

from ..modeling_crem import CREMCompressedContext
from .quantize import decode_context, encode_contexts
from .search_formats import SEARCH_COLUMN, SearchLayout
from .sources import MemoryItem

__all__ = [
    "CONTEXT_COLUMNS",
    "HIT_COLUMNS",
    "PRIMARY_KEY_METADATA",
    "RowCodec",
    "bytes_tensor",
    "is_primary_key",
    "items_schema",
    "rows_table",
    "sha256",
    "slots_bytes",
]

#: Field metadata declaring `id` the primary key: Lance then detects two commits that insert the same id (a conflict,
#: retried on the newer version) instead of committing both (a duplicated row).
PRIMARY_KEY_METADATA = {"lance-schema:unenforced-primary-key": "true"}
#: The columns `RowCodec.decode` reads: what answering from a row needs.
CONTEXT_COLUMNS = ["id", "context", "context_sha256", "context_ids", "context_positions"]
#: The columns a search hit reports.
HIT_COLUMNS = ["id", "source", "text", "metadata"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bytes_tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes as a tensor of `dtype` and `shape` (a copy: the bytes stay untouched)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def slots_bytes(cache: DynamicCache, start: int, stop: int | None = None, context_format: str = "model") -> list[bytes]:
    """
    Each row's keys and values of slots `[start, stop)`, as stored in a memory: `(layers, 2, kv_heads, slots,
    head_dim)` in the cache's dtype (`context_format="model"`) or quantised (`int8`, `int4`: see `quantize.py`),
    brought to the CPU in one transfer for the whole batch.
    """
    kv = torch.stack(
        [torch.stack([layer.keys[:, :, start:stop], layer.values[:, :, start:stop]], dim=1) for layer in cache.layers],
        dim=1,
    )
    return encode_contexts(kv, context_format)


def is_primary_key(column: pa.Field) -> bool:
    """Whether Lance knows `column` as the primary key (declared at creation, or later with its position)."""
    return any(key.startswith(b"lance-schema:unenforced-primary-key") for key in (column.metadata or {}))


def items_schema(layout: SearchLayout) -> pa.Schema:
    """The schema of a new items table whose embeddings are stored in `layout`."""
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False, metadata=PRIMARY_KEY_METADATA),
            *layout.fields(),
            pa.field("context", pa.large_binary()),
            pa.field("context_sha256", pa.string()),
            pa.field("context_ids", pa.list_(pa.int32())),
            pa.field("context_positions", pa.list_(pa.int32())),
            pa.field("source", pa.string()),
            pa.field("text", pa.string()),
            pa.field("metadata", pa.string()),
        ]
    )


def rows_table(columns: dict[str, pa.Array | list], schema: pa.Schema) -> pa.Table:
    """The rows of `columns` (from `RowCodec.encode`) as a table of the items table's own `schema`."""
    arrays = [c if isinstance(c := columns[f.name], pa.Array) else pa.array(c, f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class RowCodec:
    """
    How the rows of one memory are written and read.

    Args:
        uri: the memory (named in errors).
        layout: its search layout.
        context_format: its context format (`model`, `int8` or `int4`).
        dtype: the model's dtype (of exact contexts, and of the zero points of quantised ones).
        kv_shape: `(layers, 2, kv_heads, slots, head_dim)` of one item's stored context.
        prefix_ids: `(prefix,)` the token ids of the shared prefix, which every encoded context starts with.
    """

    uri: str
    layout: SearchLayout
    context_format: str
    dtype: torch.dtype
    kv_shape: tuple[int, int, int, int, int]
    prefix_ids: torch.Tensor

    @property
    def num_slots(self) -> int:
        """The chorus slots each row stores."""
        return self.kv_shape[3]

    def check_schema(self, schema: pa.Schema) -> None:
        """The items table must have the embedding columns of the search layout, of their types; else it is damaged."""
        for expected in self.layout.fields():
            found = schema.field(expected.name).type if expected.name in schema.names else None
            if found != expected.type:
                raise ValueError(
                    f"{self.uri} is damaged: its search layout ({self.layout.describe()}) needs a column "
                    f"{expected.name!r} of type {expected.type}, the items table has {found}."
                )

    def encode(self, items: Sequence[MemoryItem], context: CREMCompressedContext) -> dict[str, pa.Array | list]:
        """
        The columns of the rows of `items`, from their compressed `context` (one batch, with embeddings; slots after
        the shared prefix are the items' own), on the CPU; see `rows_table`.

        Raises:
            ValueError: the batch's contexts do not have the memory's shared prefix and chorus slots (another
                processor: system prompt, template).
        """
        n, p = self.num_slots, len(self.prefix_ids)
        if context.input_ids.shape[1] != p + n or not bool(context.attention_mask.all()):
            raise ValueError(
                f"An item's compressed context has {context.input_ids.shape[1]} slots; this memory stores a shared "
                f"prefix of {p} and {n} chorus slots per item. Was the processor changed (system prompt, template)?"
            )
        input_ids = context.input_ids.cpu()
        if not torch.equal(input_ids[:, :p], self.prefix_ids.expand(len(items), -1)):
            raise ValueError("An item's prompt prefix differs from the memory's shared prefix (another processor?).")
        contexts = slots_bytes(context.cache, p, context_format=self.context_format)
        vectors = context.embeddings.float().cpu().numpy()
        return {
            "id": [item.id for item in items],
            **self.layout.columns(vectors),
            "context": contexts,
            "context_sha256": [sha256(kv) for kv in contexts],
            "context_ids": input_ids[:, p:].tolist(),
            "context_positions": context.position_ids[:, :, p:].cpu().permute(1, 0, 2).reshape(len(items), -1).tolist(),
            "source": [item.source for item in items],
            "text": [item.text for item in items],
            "metadata": [json.dumps(item.metadata) for item in items],
        }

    def decode(self, row: dict) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """
        A stored row (its `CONTEXT_COLUMNS`) as the item's context: keys and values `kv_shape` in the model's dtype
        (dequantised), on the CPU, its slots' token ids `(slots,)` and positions `(3, slots)`.

        Raises:
            ValueError: the context's checksum or positions do not match (corrupt), or it has the size of another
                format (a row mixed into the table by hand: refused, never misread); the item is named.
        """
        n, data = self.num_slots, row["context"]
        if sha256(data) != row["context_sha256"] or len(row["context_positions"]) != 3 * n:
            raise ValueError(f"{self.uri}: the stored context of item {row['id']!r} is corrupt (checksum mismatch).")
        try:
            kv = decode_context(data, self.context_format, self.dtype, self.kv_shape)
        except ValueError as error:
            raise ValueError(
                f"{self.uri}: the stored context of item {row['id']!r} does not fit the memory: {error}."
            ) from None
        return kv, row["context_ids"], torch.tensor(row["context_positions"]).reshape(3, n)

    def stored_vectors(self, found: pa.Table) -> np.ndarray:
        """
        The stored `vector`s `(rows, vector_width)` float32 of search candidates `found` (with their `vector` and
        `search_vector` columns), each checked to be what the layout makes of it.

        Raises:
            ValueError: a row's search vector is not what the layout makes of its stored vector (written with
                another format or dim); the item is named.
        """
        stored = np.asarray(found.column("vector").combine_chunks().flatten(), dtype=np.float32)
        stored = stored.reshape(found.num_rows, -1)
        search = found.column(SEARCH_COLUMN).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        bad = self.layout.inconsistent(stored, search.reshape(found.num_rows, -1))
        if bad.any():
            item = found.column("id")[int(np.argmax(bad))].as_py()
            raise ValueError(
                f"{self.uri}: the search vector of item {item!r} is not what this memory's search layout "
                f"({self.layout.describe()}) makes of its stored vector: it was written with another format or dim."
            )
        return stored
