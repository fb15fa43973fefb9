"""
Search formats of a memory's embeddings: the column the candidate search runs on, at a truncated (Matryoshka) dim
and/or quantised, and the exact re-scoring that makes every returned score a true cosine.

A memory's search layout is chosen when it is created and recorded in its meta row (`vector_format`, `vector_dim`,
`full_vectors`); a reader refuses a format it does not know, and `open` refuses another layout than the stored one.

* **dim** `D`: the search vectors are the L2-renormalised prefixes of length `D` of the embeddings (Matryoshka
  truncation), and so is the query. `D` must be a dim the model was trained for (`config.matryoshka_dims`) or its
  hidden size. Scores are cosines of the truncated vectors (of the full ones at `D = hidden_size`).
* **format**:

  * `float32`: the search column holds the `(D,)` float32 vectors; the ANN index is IVF-PQ (cosine), and an
    approximate search re-scores `rescore_factor * k` candidates exactly on that column (LanceDB's refine step).
  * `int8`: the same float32 column, searched through LanceDB's 8-bit scalar-quantised index (IVF-SQ, cosine: one
    byte a dim, the per-dim range calibrated by LanceDB over every row each time the index is built, so concurrent
    writers share no calibration state), then re-scored exactly from the float32 column. LanceDB 0.40 can neither
    search nor index an int8 vector column itself ("element type Int8 and the query vector is Float32"; IVF_PQ,
    IVF_FLAT, IVF_SQ and HNSW all refuse `FixedSizeList(Int8)`), so the int8 codes live in the index.
  * `binary`: the search column holds the sign bits of the `(D,)` vector, packed 8 a byte (`(D / 8,)` uint8; `D`
    a multiple of 8); candidates by Hamming distance (ANN index: IVF_FLAT, hamming), then `rescore_factor * k` of
    them re-scored exactly from the stored float32 `vector`.

* **full_vectors**: whether the `vector` column keeps the whole `(hidden_size,)` embedding (the default; the
  re-scoring source of `binary`). Without it (`float32` / `int8` only) `vector` holds the `(D,)` search vectors
  themselves, and no second copy is stored; `binary` without a full-precision copy is refused at creation, since
  nothing could re-score its Hamming candidates.

Where the search column is not `vector` itself it is `search_vector`: a `float32` / `int8` memory at `D < hidden_size`
with full vectors, and every `binary` memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "SEARCH_COLUMN",
    "VECTOR_FORMATS",
    "SearchLayout",
    "check_rescoring_source",
    "check_vector_dim",
    "check_vector_format",
    "trained_dims",
    "truncate",
]

#: The search formats of a memory's embeddings; `float32` at the hidden size is the default (and older memories').
VECTOR_FORMATS = ("float32", "int8", "binary")
#: The column of the search vectors where they are not the `vector` column itself.
SEARCH_COLUMN = "search_vector"
#: Tolerance of the check that a row's float search vector is its stored vector's renormalised prefix.
_CONSISTENCY_ATOL = 1e-5


def check_vector_format(name: object) -> str:
    """`name` if it is a known search format; else a `ValueError` naming it and the known ones."""
    if name not in VECTOR_FORMATS:
        raise ValueError(f"Unknown vector format {name!r}; expected one of {', '.join(VECTOR_FORMATS)}.")
    return name  # type: ignore[return-value]


def check_rescoring_source(fmt: str, full_vectors: bool, prefix: str = "") -> None:
    """A `binary` search column needs the full-precision vectors to re-score from: refused without them."""
    if fmt == "binary" and not full_vectors:
        raise ValueError(
            f"{prefix}vector format 'binary' needs a full-precision re-scoring source: its Hamming candidates are "
            "re-scored from the stored float32 vectors, which full_vectors=False (--no-full-vectors) would drop. "
            "Keep the full vectors, or use vector format float32 or int8."
        )


def trained_dims(config: Any, hidden_size: int) -> list[int]:
    """The embedding dims a model can be truncated to: its Matryoshka dims (`config.matryoshka_dims`, if trained
    with them) and its hidden size, ascending."""
    dims = getattr(config, "matryoshka_dims", None) or []
    return sorted({int(d) for d in dims} | {hidden_size})


def check_vector_dim(dim: object, hidden_size: int, allowed: Sequence[int]) -> int:
    """
    `dim` if the model's embeddings can be truncated to it: a positive integer, at most the hidden size, and one of
    the `allowed` dims (the trained Matryoshka dims and the hidden size); else a `ValueError` naming it.
    """
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
        raise ValueError(f"vector_dim must be a positive integer, got {dim!r}.")
    if dim > hidden_size:
        raise ValueError(f"vector_dim={dim} is larger than the model's hidden size ({hidden_size}).")
    if dim not in allowed:
        raise ValueError(
            f"vector_dim={dim} is not a dim this model was trained for; it can be truncated to "
            f"{', '.join(map(str, allowed))} (config.matryoshka_dims and the hidden size)."
        )
    return int(dim)


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """
    The L2-renormalised prefixes of length `dim` of `vectors` `(n, hidden)` (or one `(hidden,)` vector): `(n, dim)`
    float32 (or `(dim,)`). A prefix of zero norm stays zero.
    """
    prefix = np.asarray(vectors, dtype=np.float32)[..., :dim]
    norm = np.linalg.norm(prefix, axis=-1, keepdims=True)
    return (prefix / np.where(norm > 0, norm, 1)).astype(np.float32)


def _fixed_size(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), arrow_type), values.shape[1])


@dataclass(frozen=True)
class SearchLayout:
    """
    How a memory stores and searches its embeddings (see the module's docstring).

    Args:
        format: `float32`, `int8` or `binary`.
        dim: the search dim `D` (truncation), at most `hidden_size`.
        hidden_size: the model's embedding size.
        full_vectors: whether the `vector` column holds the whole `(hidden_size,)` embeddings.
    """

    format: str = "float32"
    dim: int = 0
    hidden_size: int = 0
    full_vectors: bool = True

    def check(self, where: str = "") -> SearchLayout:
        """The layout if it is coherent; else a `ValueError` (prefixed with `where`) naming what is wrong."""
        check_vector_format(self.format)
        prefix = f"{where}: " if where else ""
        if not (0 < self.dim <= self.hidden_size):
            raise ValueError(f"{prefix}vector_dim={self.dim} must lie in [1, {self.hidden_size}] (the hidden size).")
        check_rescoring_source(self.format, self.full_vectors, prefix)
        if self.format == "binary":
            if self.dim % 8:
                raise ValueError(
                    f"{prefix}vector format 'binary' packs 8 dims a byte: vector_dim={self.dim} is not a multiple of 8."
                )
        return self

    @property
    def column(self) -> str:
        """The column the candidate search runs on."""
        own = self.format != "binary" and (self.dim == self.hidden_size or not self.full_vectors)
        return "vector" if own else SEARCH_COLUMN

    @property
    def vector_width(self) -> int:
        """Dims of the `vector` column."""
        return self.hidden_size if self.full_vectors else self.dim

    @property
    def metric(self) -> str:
        return "hamming" if self.format == "binary" else "cosine"

    def fields(self) -> list[pa.Field]:
        """The items table's embedding columns: `vector`, then `search_vector` where it is a column of its own."""
        fields = [pa.field("vector", pa.list_(pa.float32(), self.vector_width))]
        if self.column == SEARCH_COLUMN:
            search_type = pa.uint8() if self.format == "binary" else pa.float32()
            width = self.dim // 8 if self.format == "binary" else self.dim
            fields.append(pa.field(SEARCH_COLUMN, pa.list_(search_type, width)))
        return fields

    def search_values(self, vectors: np.ndarray) -> np.ndarray:
        """The search column's values of embeddings `(n, hidden)`: `(n, D)` float32, or `(n, D / 8)` uint8 bits."""
        truncated = truncate(vectors, self.dim)
        return np.packbits(truncated > 0, axis=-1) if self.format == "binary" else truncated

    def columns(self, vectors: np.ndarray) -> dict[str, pa.Array]:
        """The embedding columns of rows with embeddings `vectors` `(n, hidden_size)` float32."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.hidden_size:
            raise ValueError(f"Expected embeddings of shape (n, {self.hidden_size}), got {tuple(vectors.shape)}.")
        stored = vectors if self.full_vectors else truncate(vectors, self.dim)
        columns = {"vector": _fixed_size(stored, pa.float32())}
        if self.column == SEARCH_COLUMN:
            values = self.search_values(vectors)
            columns[SEARCH_COLUMN] = _fixed_size(values, pa.uint8() if self.format == "binary" else pa.float32())
        return columns

    def query(self, vector: np.ndarray) -> np.ndarray:
        """What a query embedding `(hidden_size,)` is searched with on the search column (see `search_values`)."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.hidden_size,):
            raise ValueError(f"Expected a query embedding of shape ({self.hidden_size},), got {tuple(vector.shape)}.")
        return self.search_values(vector[None])[0]

    def rescore(self, query: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """Exact cosines `(n,)` of a query `(hidden_size,)` and stored `vector` values `(n, vector_width)`, at `D`."""
        return truncate(stored, self.dim) @ truncate(query, self.dim)

    def inconsistent(self, stored: np.ndarray, search: np.ndarray | None) -> np.ndarray:
        """
        Which rows `(n,)` bool have a search value that is not what this layout makes of their stored vector: rows
        written with another format or dim (mixed into the table). `search` is None where the column is `vector`.
        """
        if search is None or not self.full_vectors:
            return np.zeros(len(stored), dtype=bool)
        expected = self.search_values(stored)
        if self.format == "binary":
            return ~(expected == search).all(axis=1)
        return ~np.isclose(expected, search, atol=_CONSISTENCY_ATOL, rtol=0).all(axis=1)

    def to_meta(self) -> dict[str, Any]:
        return {"vector_format": self.format, "vector_dim": self.dim, "full_vectors": self.full_vectors}

    @classmethod
    def from_meta(cls, meta: dict, hidden_size: int, where: str) -> SearchLayout:
        """
        The layout recorded in a meta row; a memory written before search formats (no fields) is `float32` at the
        hidden size with full vectors. An unknown format is refused by name.
        """
        fmt = meta.get("vector_format") or "float32"
        if fmt not in VECTOR_FORMATS:
            raise ValueError(
                f"{where} stores its search vectors in format {fmt!r}, which this crem-hf does not read (it reads "
                f"{', '.join(VECTOR_FORMATS)}). Open it with the crem-hf that wrote it, or re-index it."
            )
        dim = meta.get("vector_dim") or hidden_size
        full = meta.get("full_vectors")
        layout = cls(format=fmt, dim=int(dim), hidden_size=hidden_size, full_vectors=True if full is None else full)
        return layout.check(where)

    def describe(self) -> str:
        full = "full vectors kept" if self.full_vectors else "no full vectors"
        return f"{self.format} at dim {self.dim} of {self.hidden_size} ({full})"
