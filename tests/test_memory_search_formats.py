"""A memory's search layouts: a truncated (Matryoshka) dim and/or int8 / binary candidates, re-scored exactly, so that
every score is the numpy cosine of the truncated vectors and the top k is the exact oracle's whenever the candidate
pool covers it; the ANN index is built on the chosen column; the layout is recorded, and a reader refuses what it
does not know; bad input writes nothing."""

from __future__ import annotations

import json

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from helpers import memory_cli, save_crem

from crem_hf.memory import CREMMemory
from crem_hf.memory.search_formats import SEARCH_COLUMN, SearchLayout
from crem_hf.testing import make_tiny_crem

HIDDEN = 64
TRAINED = [16, 32]
#: More than the 256 rows an approximate index needs.
ROWS = 260
WORDS = "red green blue seven three digit cat dog house tree river stone light dark small large old new".split()
QUERIES = ["a red digit seven", "the old stone house", "small dark river"]
INDEX_TYPES = {"float32": "IvfPq", "int8": "IvfSq", "binary": "IvfFlat"}


@pytest.fixture(scope="module")
def matryoshka_model(processor):
    """The tiny model, as if trained with Matryoshka dims 16 and 32 (hidden size 64)."""
    model = make_tiny_crem(processor, seed=0)
    model.config.matryoshka_dims = list(TRAINED)
    assert model.config.text_config.hidden_size == HIDDEN
    return model


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(ROWS)]


@pytest.fixture(scope="module")
def memories(matryoshka_model, processor, texts, tmp_path_factory):
    """One memory per (format, dim), each holding the same ROWS text items; filled on first use."""
    root = tmp_path_factory.mktemp("search-formats")
    opened = {}

    def get(fmt: str, dim: int) -> CREMMemory:
        if (fmt, dim) not in opened:
            memory = CREMMemory.open(
                root / f"{fmt}-{dim}", matryoshka_model, processor, create=True, vector_format=fmt, vector_dim=dim
            )
            ids = [f"t{i}" for i in range(ROWS)]
            assert memory.add(ids=ids, texts=texts, batch_size=130, show_progress=False).added == ROWS
            opened[fmt, dim] = memory
        return opened[fmt, dim]

    return get


def _stored(memory: CREMMemory) -> tuple[list[str], np.ndarray]:
    """Every row's id and stored `vector` `(rows, width)`, read straight from the table."""
    table = memory.items.to_arrow()
    return table.column("id").to_pylist(), np.stack(table.column("vector").to_numpy(zero_copy_only=False))


def _cosines(vectors: np.ndarray, query: np.ndarray, dim: int) -> np.ndarray:
    """The oracle: cosines of the prefixes of length `dim`, in float64 numpy."""
    a = vectors[:, :dim].astype(np.float64)
    q = query[:dim].astype(np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))


def _check_exact(hits, ids, cosines, k):
    """The hits are the oracle's top k (ids in order, up to ties) with its scores."""
    order = np.argsort(-cosines, kind="stable")[:k]
    assert [hit.score for hit in hits] == pytest.approx(cosines[order].tolist(), abs=1e-5)
    assert {hit.id for hit in hits} == {ids[i] for i in order}
    assert [hit.rank for hit in hits] == list(range(k))


def _hamming(bits: np.ndarray, query_bits: np.ndarray) -> np.ndarray:
    return np.unpackbits(bits ^ query_bits, axis=1).sum(axis=1)


def _check_binary_pool(memory, hits, ids, vectors, query, cosines, k, pool):
    """
    The hits are the best `k` by exact cosine among the `pool` rows nearest by Hamming distance (up to ties at the
    pool's edge): each is within the pool's Hamming radius, and no row strictly inside it scores above the k-th hit.
    """
    layout = memory.search_layout
    distances = _hamming(layout.search_values(vectors), layout.query(query)[None])
    radius = np.sort(distances)[pool - 1]
    index = {item: i for i, item in enumerate(ids)}
    assert [hit.score for hit in hits] == pytest.approx([cosines[index[hit.id]] for hit in hits], abs=1e-5)
    assert all(distances[index[hit.id]] <= radius for hit in hits)
    inside = np.flatnonzero(distances < radius)
    kth = hits[-1].score
    missing = [ids[i] for i in inside if cosines[i] > kth + 1e-5 and ids[i] not in {hit.id for hit in hits}]
    assert not missing, missing


@pytest.mark.parametrize("dim", [16, HIDDEN])
@pytest.mark.parametrize("fmt", ["float32", "int8", "binary"])
def test_scores_are_exact_cosines_and_top_k_is_the_exact_oracle(memories, fmt, dim):
    memory = memories(fmt, dim)
    layout = memory.search_layout
    assert (layout.format, layout.dim, layout.full_vectors) == (fmt, dim, True)
    ids, vectors = _stored(memory)
    assert vectors.shape == (ROWS, HIDDEN)  # the full embeddings are kept: the re-scoring source
    # The search column holds what the format makes of each embedding's renormalised prefix.
    if layout.column == SEARCH_COLUMN:
        search = np.stack(memory.items.to_arrow().column(SEARCH_COLUMN).to_numpy(zero_copy_only=False))
        prefix = vectors[:, :dim] / np.linalg.norm(vectors[:, :dim], axis=1, keepdims=True)
        expected = np.packbits(prefix > 0, axis=1) if fmt == "binary" else prefix
        np.testing.assert_allclose(search, expected, atol=1e-6)
    k = 5
    for text in QUERIES:
        query = memory.embed_queries(texts=[text])[0].numpy()
        cosines = _cosines(vectors, query, dim)
        _check_exact(memory.search_vector(query, k=k, exact=True), ids, cosines, k)
        covering = -(-ROWS // k)  # a candidate pool of every row: the exact answer for every format
        _check_exact(memory.search_vector(query, k=k, rescore_factor=covering), ids, cosines, k)
        hits = memory.search_vector(query, k=k, rescore_factor=2)
        if fmt == "binary":
            _check_binary_pool(memory, hits, ids, vectors, query, cosines, k, pool=2 * k)
        else:  # no index yet: a scan of the float32 column, exact
            _check_exact(hits, ids, cosines, k)
    # The ANN index is built on the search column, of the format's type; with it, scores stay exact cosines.
    memory.build_ann_index(num_partitions=4)
    indexed = [index for index in memory.items.list_indices() if layout.column in index.columns]
    assert [index.index_type for index in indexed] == [INDEX_TYPES[fmt]] and memory.info()["ann_index"]
    for text in QUERIES:
        query = memory.embed_queries(texts=[text])[0].numpy()
        cosines = _cosines(vectors, query, dim)
        index = {item: i for i, item in enumerate(ids)}
        hits = memory.search_vector(query, k=k)
        assert [hit.score for hit in hits] == pytest.approx([cosines[index[hit.id]] for hit in hits], abs=1e-5)
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        _check_exact(memory.search_vector(query, k=k, rescore_factor=-(-ROWS // k)), ids, cosines, k)
        _check_exact(memory.search_vector(query, k=k, exact=True), ids, cosines, k)
    # Text search goes the same way (the query truncated as the items).
    hits = memory.search(QUERIES[0], k=3, rescore_factor=-(-ROWS // 3))
    _check_exact(hits, ids, _cosines(vectors, memory.embed_queries(texts=[QUERIES[0]])[0].numpy(), dim), 3)


def test_quantised_columns_are_smaller_and_truncation_is_recorded(memories):
    info = {key: memories(*key).info() for key in [("float32", 16), ("binary", 16), ("binary", HIDDEN)]}
    assert info["binary", 16]["vector_format"] == "binary" and info["binary", 16]["vector_dim"] == 16
    assert info["float32", 16]["search_column"] == SEARCH_COLUMN
    described = CREMMemory.describe(memories("binary", 16).uri)
    assert (described["vector_format"], described["vector_dim"], described["full_vectors"]) == ("binary", 16, True)
    schema = memories("binary", 16).items.schema
    assert schema.field(SEARCH_COLUMN).type == pa.list_(pa.uint8(), 2)  # 16 sign bits: 2 bytes a row
    assert memories("int8", HIDDEN).search_layout.column == "vector"  # the int8 codes live in the IVF-SQ index


def test_without_full_vectors_only_the_truncated_vector_is_stored(matryoshka_model, processor, texts, tmp_path):
    memory = CREMMemory.open(
        tmp_path / "m", matryoshka_model, processor, create=True, vector_dim=16, full_vectors=False
    )
    memory.add(ids=[f"t{i}" for i in range(20)], texts=texts[:20], show_progress=False)
    ids, vectors = _stored(memory)
    assert vectors.shape == (20, 16) and memory.search_layout.column == "vector"
    assert SEARCH_COLUMN not in memory.items.schema.names
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    full = matryoshka_model.get_embedding(**processor.process_embedding_inputs(texts=texts[:20])).detach().numpy()
    order = [int(i[1:]) for i in ids]
    np.testing.assert_allclose(vectors, full[order, :16] / np.linalg.norm(full[order, :16], axis=1, keepdims=True),
                               atol=1e-5)  # fmt: skip
    query = memory.embed_queries(texts=[QUERIES[1]])[0].numpy()
    _check_exact(memory.search_vector(query, k=4), ids, _cosines(vectors, query, 16), 4)
    with pytest.raises(ValueError, match="not full_vectors True"):
        CREMMemory.open(memory.uri, matryoshka_model, processor, full_vectors=True)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"vector_format": "int4"}, r"Unknown vector format 'int4'; expected one of float32, int8, binary"),
        (
            {"vector_dim": 24},
            r"vector_dim=24 is not a dim this model was trained for; it can be truncated to 16, 32, 64",
        ),
        ({"vector_dim": 128}, r"vector_dim=128 is larger than the model's hidden size \(64\)"),
        ({"vector_dim": 0}, r"vector_dim must be a positive integer, got 0"),
        (
            {"vector_format": "binary", "full_vectors": False},
            r"vector format 'binary' needs a full-precision re-scoring source",
        ),
    ],
)
def test_bad_layouts_are_refused_by_name_and_write_nothing(matryoshka_model, processor, tmp_path, options, message):
    target = tmp_path / "new"
    with pytest.raises(ValueError, match=message):
        CREMMemory.open(target, matryoshka_model, processor, create=True, **options)
    assert not target.exists()


def test_a_model_without_matryoshka_dims_searches_at_its_hidden_size_only(model, processor, tmp_path):
    assert getattr(model.config, "matryoshka_dims", None) is None
    with pytest.raises(ValueError, match="vector_dim=16 is not a dim this model was trained for; it can be truncated "
                                         "to 64 "):  # fmt: skip
        CREMMemory.open(tmp_path / "m", model, processor, create=True, vector_dim=16)
    assert not (tmp_path / "m").exists()
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True, vector_dim=HIDDEN, vector_format="int8")
    assert memory.search_layout.column == "vector"


def test_binary_dims_must_fill_bytes():
    with pytest.raises(ValueError, match="vector_dim=12 is not a multiple of 8"):
        SearchLayout(format="binary", dim=12, hidden_size=HIDDEN).check()


def test_the_layout_is_the_memorys_own_and_another_is_refused(memories, matryoshka_model, processor):
    uri = memories("binary", 16).uri
    assert CREMMemory.open(uri, matryoshka_model, processor).search_layout == memories("binary", 16).search_layout
    CREMMemory.open(uri, matryoshka_model, processor, vector_format="binary", vector_dim=16, full_vectors=True)
    for options, named in (
        ({"vector_format": "float32"}, "vector format 'float32'"),
        ({"vector_dim": 32}, "vector dim 32"),
        ({"vector_format": "binary", "vector_dim": HIDDEN}, "vector dim 64"),
    ):
        with pytest.raises(ValueError, match=f"stores its search vectors as binary at dim 16 of 64 .*, not {named}"):
            CREMMemory.open(uri, matryoshka_model, processor, create=True, **options)


def _rewrite_meta(uri, change) -> None:
    db = lancedb.connect(str(uri))
    rows = [change(row) for row in db.open_table("crem_memory").to_arrow().to_pylist()]
    db.drop_table("crem_memory")
    db.create_table("crem_memory", data=pa.Table.from_pylist(rows))


def test_a_memory_of_an_unknown_search_format_is_refused_by_name(matryoshka_model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", matryoshka_model, processor, create=True, vector_format="binary",
                             vector_dim=16)  # fmt: skip
    memory.add(ids=["a"], texts=["one"], show_progress=False)
    _rewrite_meta(memory.uri, lambda row: {**row, "vector_format": "ternary"})
    for read in (
        lambda: CREMMemory.open(memory.uri, matryoshka_model, processor),
        lambda: CREMMemory.describe(memory.uri),
    ):
        with pytest.raises(ValueError, match="search vectors in format 'ternary', which this crem-hf does not read"):
            read()


def test_a_memory_written_before_search_formats_reads_as_float32_at_the_hidden_size(model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    memory.add(ids=["a", "b", "c"], texts=["one", "two", "three"], show_progress=False)
    before = memory.search("two", k=3)
    layout_fields = ("vector_format", "vector_dim", "full_vectors")
    _rewrite_meta(memory.uri, lambda row: {key: value for key, value in row.items() if key not in layout_fields})
    assert not set(layout_fields) & set(lancedb.connect(str(memory.uri)).open_table("crem_memory").schema.names)
    old = CREMMemory.open(memory.uri, model, processor)
    assert old.search_layout == SearchLayout(format="float32", dim=HIDDEN, hidden_size=HIDDEN, full_vectors=True)
    assert old.search("two", k=3) == before
    with pytest.raises(ValueError, match="not vector format 'binary'"):
        CREMMemory.open(memory.uri, model, processor, vector_format="binary")


@pytest.mark.parametrize("fmt", ["float32", "binary"])
def test_a_row_of_another_layout_mixed_into_the_table_is_refused_naming_the_item(memories, fmt):
    """A row whose search vector is not what the memory's layout makes of its stored vector (another writer's format
    or dim) is named when a search meets it, never scored silently."""
    memory = memories(fmt, 16)
    query = memory.embed_queries(texts=[QUERIES[2]])[0].numpy()
    # Its search vector is the query's own (so it is the best candidate), its stored vector the item farthest from it.
    search = memory.search_layout.query(query)
    ids, vectors = _stored(memory)
    far = ids[int(np.argmin(_cosines(vectors, query, 16)))]
    row = memory.items.search().where(f"id = '{far}'").limit(1).to_arrow().to_pylist()[0]
    search = search if fmt == "binary" else search * 0.5  # a float prefix normalised for another dim
    memory.items.add([{**row, "id": "mixed-in", SEARCH_COLUMN: search.tolist()}])
    try:
        with pytest.raises(
            ValueError, match="search vector of item 'mixed-in' is not what this memory's search layout"
        ):
            memory.search_vector(query, k=3, rescore_factor=ROWS)  # every row a candidate: ties cannot hide it
    finally:
        memory.items.delete("id = 'mixed-in'")
    assert len(memory.search_vector(query, k=3)) == 3


@pytest.fixture(scope="module")
def saved_model(matryoshka_model, processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("search-formats-cli") / "model"
    return save_crem(matryoshka_model, processor, folder)


def _one_line_error(done, code, text, after_load=False):
    """Exit status `code` and a one-line reason holding `text` on stderr (its last line, after the weights' loading
    bar, for a check that needs the model)."""
    assert done.returncode == code, done.stderr
    reason = done.stderr.splitlines()[-1] if after_load else done.stderr
    assert reason.count("\n") <= 1 and reason.startswith(("crem-memory: error: ", "crem-memory index: error: ")), (
        done.stderr
    )
    assert text in reason, done.stderr


def test_cli_index_takes_a_search_layout(saved_model, tmp_path):
    source = tmp_path / "items.jsonl"
    source.write_text("".join(json.dumps({"id": f"n{i}", "text": f"note {i} {WORDS[i]}"}) + "\n" for i in range(6)))
    uri = tmp_path / "m"
    done = memory_cli("index", "--model", saved_model, "--memory", uri, source, "--vector-format", "binary",
                "--vector-dim", 16)  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = json.loads(memory_cli("info", "--memory", uri).stdout)
    assert (info["vector_format"], info["vector_dim"], info["full_vectors"], info["rows"]) == ("binary", 16, True, 6)
    found = memory_cli("search", "--model", saved_model, "--memory", uri, "--text", "note 3", "--k", 2, "--json")
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 2, found.stderr
    # Another layout for this memory: refused before the model is loaded.
    _one_line_error(memory_cli("index", "--model", saved_model, "--memory", uri, source, "--vector-format", "int8"), 1,
                    "not vector format 'int8'")  # fmt: skip
    # Bad input for a new memory: a one-line reason, and no folder.
    other = tmp_path / "other"
    _one_line_error(memory_cli("index", "--model", saved_model, "--memory", other, source, "--vector-dim", 24), 1,
                    "vector_dim=24 is not a dim this model was trained for", after_load=True)  # fmt: skip
    _one_line_error(memory_cli("index", "--model", saved_model, "--memory", other, source, "--vector-format",
                               "binary", "--no-full-vectors"), 1,
                    "needs a full-precision re-scoring source")  # fmt: skip
    _one_line_error(memory_cli("index", "--model", saved_model, "--memory", other, source, "--vector-format",
                               "int4"), 2, "invalid choice: 'int4'")  # fmt: skip
    assert not other.exists()
