"""The approximate search's knobs, against a numpy exact-scan oracle on a fixed indexed table: probing more partitions
of the index never lowers recall, probing all of them with a covering re-scoring pool gives the exact top k (true
cosines), the default probe count is a share of the partitions, bad values are refused by name, and `crem-memory
search / ask` take `--nprobes` / `--rescore-factor` as commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import memory_cli, save_crem

from crem_hf.memory import CREMMemory
from crem_hf.memory.cli import main as memory_main
from crem_hf.memory.store import LANCEDB_NPROBES, ann_partitions, default_nprobes


def _partitions_ranked(memory: CREMMemory, query: np.ndarray) -> int:
    """The partitions of the search column's index, as LanceDB's executed plan counts them (`partitions_ranked`)."""
    layout = memory.search_layout
    plan = memory.items.search(layout.query(query), vector_column_name=layout.column).distance_type(layout.metric)
    analysed = plan.nprobes(1).limit(1).analyze_plan()
    return int(analysed.split("partitions_ranked=")[1].split(",")[0])


#: Synthetic rows beside the one encoded item, and the partitions of their index (LanceDB trains one per 256 rows
#: at most).
PARTITIONS = 8
ROWS = 256 * PARTITIONS
K = 10
QUERIES = 12
#: A re-scoring pool of every row: what is left approximate is only which partitions are probed.
COVERING = -(-(ROWS + 1) // K)
TEXTS = ["a red digit seven", "the old stone house", "small dark river"]


def _fill(memory: CREMMemory, seed: int = 0) -> None:
    """`ROWS` random unit vectors written as rows of the memory's own layout (`SearchLayout.columns`), next to one
    encoded item whose other columns they copy; then an index of `PARTITIONS` partitions."""
    memory.add(ids=["seed"], texts=["one"], show_progress=False)
    template = memory.items.to_arrow().to_pylist()[0]
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((ROWS, memory.search_layout.hidden_size)).astype(np.float32)
    columns = memory.search_layout.columns(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    values = {name: column.to_pylist() for name, column in columns.items()}
    memory.items.add(
        [{**template, "id": f"v{i}", **{name: value[i] for name, value in values.items()}} for i in range(ROWS)]
    )
    memory.build_ann_index(num_partitions=PARTITIONS)


@pytest.fixture(scope="module", params=["float32", "int8", "binary"])
def indexed(request, model, processor, tmp_path_factory):
    """A memory of each search format holding the same rows, indexed; with its stored ids and vectors."""
    memory = CREMMemory.open(
        tmp_path_factory.mktemp("probes") / request.param, model, processor, create=True, vector_format=request.param
    )
    _fill(memory)
    table = memory.items.to_arrow()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float64)
    return memory, table.column("id").to_pylist(), vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _queries(hidden: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((QUERIES, hidden))
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def _recall(memory, ids, vectors, queries, **options) -> float:
    """Mean recall@K of `search_vector(**options)` against the exact top K of the numpy oracle."""
    found = []
    for query in queries:
        exact = np.argsort(-(vectors @ query.astype(np.float64)), kind="stable")[:K]
        hits = memory.search_vector(query, k=K, **options)
        found.append(len({hit.id for hit in hits} & {ids[i] for i in exact}) / K)
    return float(np.mean(found))


def test_more_probes_never_lower_recall_and_all_partitions_give_the_exact_top_k(indexed):
    memory, ids, vectors = indexed
    queries = _queries(vectors.shape[1])
    assert _partitions_ranked(memory, queries[0]) == PARTITIONS  # what "every partition" below means
    probes = [1, 2, 4, PARTITIONS]
    recalls = [_recall(memory, ids, vectors, queries, nprobes=n, rescore_factor=COVERING) for n in probes]
    assert recalls == sorted(recalls), dict(zip(probes, recalls, strict=True))
    assert recalls[0] < 0.9  # one partition of 8 misses neighbours: the knob reaches the index
    assert recalls[-1] == 1.0
    for query in queries:  # every partition probed, every candidate re-scored: the oracle's top K, true cosines
        cosines = vectors @ query.astype(np.float64)
        order = np.argsort(-cosines, kind="stable")[:K]
        for nprobes in (PARTITIONS, 10 * PARTITIONS):  # more probes than partitions probe them all
            hits = memory.search_vector(query, k=K, nprobes=nprobes, rescore_factor=COVERING)
            assert [hit.id for hit in hits] == [ids[i] for i in order]
            assert [hit.score for hit in hits] == pytest.approx(cosines[order].tolist(), abs=1e-5)
            assert [hit.rank for hit in hits] == list(range(K))


def test_the_default_probes_a_share_of_the_partitions_and_reaches_the_query(indexed):
    memory, _, vectors = indexed
    assert [default_nprobes(p) for p in (4, 20, 100, 316, 1000, 4000)] == [20, 20, 20, 32, 100, 400]
    assert [ann_partitions(rows) for rows in (256, 10**4, 10**5, 10**6)] == [16, 100, 316, 1000]
    assert LANCEDB_NPROBES == 20
    # The default is computed from the rows the index covers (the partitions `build_ann_index` makes by default).
    assert memory.default_nprobes() == default_nprobes(ann_partitions(ROWS + 1))
    plans = []
    search = memory.items.search

    def spy(*args, **kwargs):
        query = search(*args, **kwargs)
        plans.append(query)
        return query

    memory.items.search = spy
    try:
        query = _queries(vectors.shape[1])[0]
        memory.search_vector(query, k=K)
        memory.search_vector(query, k=K, nprobes=3)
        memory.search_vector(query, k=K, exact=True)
    finally:
        del memory.items.search
    default, three, exact = (plan.explain_plan(True) for plan in plans)
    expected = memory.default_nprobes()
    assert f"minimum_nprobes={expected}, maximum_nprobes=Some({expected})" in default
    assert "minimum_nprobes=3, maximum_nprobes=Some(3)" in three
    assert "ANNIvfPartition" not in exact


def test_a_memory_without_an_index_has_no_default_and_scans(model, processor, tmp_path):
    memory = CREMMemory.open(tmp_path / "m", model, processor, create=True)
    memory.add(ids=["a", "b", "c"], texts=["one", "two", "three"], show_progress=False)
    assert memory.default_nprobes() is None
    query = memory.embed_queries(texts=["two"])[0]
    assert memory.search_vector(query, k=3, nprobes=1) == memory.search_vector(query, k=3, exact=True)


@pytest.mark.parametrize("name", ["nprobes", "rescore_factor"])
@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_bad_knobs_are_refused_by_name(indexed, name, value):
    memory, _, vectors = indexed
    with pytest.raises(ValueError, match=f"^{name} must be a positive integer, got {value!r:s}"):
        memory.search_vector(_queries(vectors.shape[1])[0], k=K, **{name: value})


@pytest.fixture(scope="module")
def cli_memory(model, processor, tmp_path_factory):
    root = tmp_path_factory.mktemp("probes-cli")
    memory = CREMMemory.open(root / "m", model, processor, create=True)
    _fill(memory, seed=2)
    return memory, save_crem(model, processor, root / "model")


def _cli_search(memory, saved, text, *options, capsys=None) -> list[tuple[str, float]]:
    """`crem-memory search ... --json` with `options`: in this process (with `capsys`) or as a command."""
    argv = ["search", "--model", saved, "--memory", memory.uri, "--text", text, "--k", "5", "--json", *options]
    if capsys is None:
        done = memory_cli(*argv)
        assert done.returncode == 0, done.stderr
        out = done.stdout
    else:
        assert memory_main(argv) == 0
        out = capsys.readouterr().out
    return [(row["id"], row["score"]) for row in map(json.loads, out.splitlines())]


def test_cli_search_and_ask_take_the_knobs_as_commands(cli_memory, capsys):
    memory, saved = cli_memory
    one, every = (
        ["--nprobes", "1", "--rescore-factor", "2"],
        ["--nprobes", str(PARTITIONS), "--rescore-factor", str(-(-(ROWS + 1) // 5))],
    )
    differ = False
    for text in TEXTS:
        few = _cli_search(memory, saved, text, *one, capsys=capsys)
        expected = memory.search(text, k=5, nprobes=1, rescore_factor=2)
        assert few == [(hit.id, round(hit.score, 4)) for hit in expected]
        exact = [(hit.id, round(hit.score, 4)) for hit in memory.search_many(texts=[text], k=5, exact=True)[0]]
        assert _cli_search(memory, saved, text, *every, capsys=capsys) == exact
        differ |= few != exact
    assert differ  # one partition of 8 misses some of the exact top 5
    assert _cli_search(memory, saved, TEXTS[0], *one) == _cli_search(memory, saved, TEXTS[0], *one, capsys=capsys)
    argv = ["ask", "--model", saved, "--memory", memory.uri, "--text", TEXTS[0], "--k", "2", "--question", "Which?"]
    assert memory_main([*argv, "--json", *one]) == 0
    asked = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["id"] for row in asked] == [hit.id for hit in memory.search(TEXTS[0], k=2, nprobes=1, rescore_factor=2)]


def test_cli_refuses_bad_knobs_in_one_line(cli_memory, capsys):
    memory, saved = cli_memory
    argv = ["search", "--model", saved, "--memory", memory.uri, "--text", "x"]
    bad = memory_cli(*argv, "--nprobes", "0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "argument --nprobes: expected a positive integer, got '0'" in bad.stderr
    for option, value in [("--nprobes", "-4"), ("--nprobes", "all"), ("--rescore-factor", "0")]:
        with pytest.raises(SystemExit) as exited:
            memory_main([*argv, option, value])
        error = capsys.readouterr().err
        assert exited.value.code == 2 and error.count("\n") == 1
        assert f"argument {option}: expected a positive integer, got {value!r}" in error
