"""Retrieval evaluation: metrics, judged-set parsing, fusion, corpus ingestion, `kb eval` / `kb tune`.

Everything here builds its own small judged set; nothing reads ../shared/data.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lorag.cli import cli
from lorag.errors import LoragError
from lorag.knowledge import metrics
from lorag.knowledge.fusion import Fusion, fuse
from lorag.knowledge.judged import JudgedSetError, load, read_qrels, read_queries
from lorag.knowledge.retrieval import Candidate

pytestmark = pytest.mark.timeout(300)

# ---------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values() -> None:
    judged = {"d1": 1, "d3": 2, "d4": 1, "d9": 0}
    ranked = ["d1", "d2", "d3"]
    # DCG = 1/log2(2) + 2/log2(4) = 2; ideal [2, 1, 1] = 2 + 1/log2(3) + 1/2
    assert metrics.ndcg(ranked, judged) == pytest.approx(2 / (2.5 + 1 / 1.584962500721156))
    assert metrics.recall(ranked, judged) == pytest.approx(2 / 3)
    assert metrics.mrr(ranked, judged) == 1.0
    assert metrics.mrr(["x", "d9", "d4"], judged) == pytest.approx(1 / 3)  # grade 0 is not relevant
    assert metrics.mrr([f"x{i}" for i in range(10)] + ["d1"], judged) == 0.0  # beyond the cut-off
    assert metrics.ndcg(["d3", "d1", "d4"], judged) == pytest.approx(1.0)
    assert metrics.ndcg([], judged) == 0.0 and metrics.recall([], judged) == 0.0
    assert metrics.recall([f"x{i}" for i in range(100)] + ["d1"], judged, 100) == 0.0
    # Queries without a relevant document are not averaged in; a query with no run scores 0.
    mean = metrics.mean_scores({"q1": ["d1"]}, {"q1": {"d1": 1}, "q2": {"d5": 1}, "q3": {"d6": 0}})
    assert mean == {"ndcg@10": 0.5, "recall@100": 0.5, "mrr@10": 0.5}


def test_metrics_agree_with_trec_eval_through_ir_measures() -> None:
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import RR, R, nDCG

    rng = random.Random(3)
    qrels: dict[str, dict[str, int]] = {}
    runs: dict[str, list[str]] = {}
    for q in range(40):
        docs = [f"d{i}" for i in range(150)]
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 12))}
        runs[f"q{q}"] = rng.sample(docs, rng.randint(0, 120))
    reference_qrels = [ir_measures.Qrel(q, d, g) for q, judged in qrels.items() for d, g in judged.items()]
    reference_run = [
        ir_measures.ScoredDoc(q, d, float(1000 - rank)) for q, ranked in runs.items() for rank, d in enumerate(ranked)
    ]
    expected: dict[tuple[str, str], float] = {}
    for row in ir_measures.iter_calc([nDCG @ 10, R @ 100, RR @ 10], reference_qrels, reference_run):
        expected[(row.query_id, str(row.measure))] = row.value
    checked = 0
    for q, ranked in runs.items():
        if not ranked or not any(g > 0 for g in qrels[q].values()):
            continue
        assert metrics.ndcg(ranked, qrels[q], 10) == pytest.approx(expected[(q, "nDCG@10")], abs=1e-9)
        assert metrics.recall(ranked, qrels[q], 100) == pytest.approx(expected[(q, "R@100")], abs=1e-9)
        assert metrics.mrr(ranked, qrels[q], 10) == pytest.approx(expected[(q, "RR@10")], abs=1e-9)
        checked += 1
    assert checked > 30


# ---------------------------------------------------------------------------- fusion


def _ranked(pairs: list[tuple[str, float]]) -> list[Candidate]:
    return [Candidate("kb", chunk, "", {}, score) for chunk, score in pairs]


def test_convex_fusion_normalises_scores_and_looks_up_missing_bm25() -> None:
    vector = _ranked([("a", 0.9), ("b", 0.5)])
    keyword = _ranked([("c", 20.0), ("a", 10.0)])
    exact = {"b": 5.0}
    tmm = fuse(vector, keyword, Fusion(method="convex", norm="tmm"), exact.get)
    scores = {c.id: s for c, s in tmm}
    # tmm: cosine (x + 1) / (0.9 + 1), BM25 x / 20; "c" has no cosine: the list's lowest (0.5).
    assert scores["a"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert scores["b"] == pytest.approx(0.5 * (1.5 / 1.9) + 0.5 * (5 / 20))
    assert scores["c"] == pytest.approx(0.5 * (1.5 / 1.9) + 0.5 * 1.0)
    assert [c.id for c, _ in tmm] == ["c", "a", "b"]
    minmax = {c.id: s for c, s in fuse(vector, keyword, Fusion(method="convex", norm="minmax").with_alpha(0.8), exact.get)}
    assert minmax["a"] == pytest.approx(0.8 * 1.0 + 0.2 * 0.0)
    assert minmax["c"] == pytest.approx(0.8 * 0.0 + 0.2 * 1.0)
    # dist: llama-index's dist_based_score, each list from mean - 3 std to mean + 3 std; a list a chunk is not in adds 0.
    dist = {c.id: s for c, s in fuse(vector, keyword, Fusion(method="convex", norm="dist"), exact.get)}
    v_lo, v_span, k_lo, k_span = 0.7 - 3 * 0.2, 6 * 0.2, 15.0 - 3 * 5.0, 6 * 5.0
    assert dist["a"] == pytest.approx(0.5 * (0.9 - v_lo) / v_span + 0.5 * (10.0 - k_lo) / k_span)
    assert dist["c"] == pytest.approx(0.5 * (20.0 - k_lo) / k_span)
    # One list empty: the other decides alone.
    only = fuse(vector, [], Fusion(method="convex", norm="zscore"))
    assert [c.id for c, _ in only] == ["a", "b"]
    rrf = fuse(vector, keyword, Fusion(method="rrf", rrf_k=60))
    assert rrf[0][0].id == "a" and rrf[0][1] == pytest.approx((1 / 61 + 1 / 62) / (2 / 61))


class _Fixed:
    """A llama-index retriever that returns given (id, score) pairs."""

    @staticmethod
    def make(pairs: list[tuple[str, float]]) -> Any:
        from llama_index.core.retrievers import BaseRetriever
        from llama_index.core.schema import NodeWithScore, TextNode

        class Fixed(BaseRetriever):
            def _retrieve(self, query_bundle: Any) -> list[NodeWithScore]:
                return [NodeWithScore(node=TextNode(id_=chunk, text=f"text of {chunk}"), score=score)
                        for chunk, score in pairs]

        return Fixed()


@pytest.mark.parametrize("seed", range(5))
def test_the_default_fusion_is_llama_indexs_dist_based_score(seed: int) -> None:
    """lorag's default hybrid ranks and scores lorag's two lists as llama-index's QueryFusionRetriever does."""
    from llama_index.core.llms import MockLLM
    from llama_index.core.retrievers import QueryFusionRetriever

    from lorag.knowledge.settings import RetrievalSettings

    rng = random.Random(seed)
    chunks = [f"c{i}" for i in range(40)]
    vector = sorted(((c, rng.uniform(-0.2, 0.9)) for c in rng.sample(chunks, 25)), key=lambda pair: -pair[1])
    keyword = sorted(((c, rng.uniform(0.5, 30.0)) for c in rng.sample(chunks, 25)), key=lambda pair: -pair[1])
    weights = [0.5, 0.5] if seed < 3 else [0.7, 0.3]
    fusion = Fusion.from_settings(RetrievalSettings(vector_weight=weights[0], keyword_weight=weights[1]))
    ours = fuse(_ranked(vector), _ranked(keyword), fusion)
    theirs = QueryFusionRetriever([_Fixed.make(vector), _Fixed.make(keyword)], llm=MockLLM(), mode="dist_based_score",
                                  retriever_weights=weights, similarity_top_k=50, num_queries=1,
                                  use_async=False).retrieve("any question")
    assert [c.id for c, _ in ours] == [n.node.node_id for n in theirs]
    assert [score for _, score in ours] == pytest.approx([n.score for n in theirs])


def test_fusion_settings_round_trip_and_refuse_nonsense() -> None:
    from lorag.knowledge.settings import RetrievalSettings

    tuned = Fusion(method="convex", norm="minmax").with_alpha(0.35)
    assert Fusion.from_settings(RetrievalSettings(), tuned.to_settings()) == tuned
    assert Fusion.from_settings_dict(tuned.to_settings()).alpha == pytest.approx(0.35)
    with pytest.raises(LoragError):
        Fusion(method="median")  # type: ignore[arg-type]
    with pytest.raises(LoragError):
        Fusion(vector_weight=0, keyword_weight=0)


# ---------------------------------------------------------------------------- judged sets


def test_judged_sets_parse_beir_and_trec_layouts() -> None:
    assert read_queries('{"_id": "1", "text": "a"}\n\n{"_id": 2, "text": "b"}\n') == {"1": "a", "2": "b"}
    qrels, lines = read_qrels("query-id\tcorpus-id\tscore\n1\tdA\t1\n1\tdB\t0\n2 0 dC 2\n")
    assert qrels == {"1": {"dA": 1, "dB": 0}, "2": {"dC": 2}} and lines[("2", "dC")] == 4
    judged = load('{"_id": "1", "text": "a"}\n{"_id": "2", "text": "b"}\n{"_id": "3", "text": "c"}\n',
                  "1\tdA\t1\n2\tdB\t0\n")
    assert judged.queries == {"1": "a"}  # query 2 has no relevant document, query 3 no judgement


@pytest.mark.parametrize(
    ("queries", "qrels", "message"),
    [
        ("", "1\td\t1\n", "queries.jsonl: no queries"),
        ('{"_id": "1", "text": "a"}\n', "", "qrels.tsv: no judgements"),
        ('{"_id": "1", "text": "a"}\n{"_id": "2", "text": \n', "1\td\t1\n", "queries.jsonl line 2: not valid JSON"),
        ('{"_id": "1"}\n', "1\td\t1\n", "queries.jsonl line 1: no query 'text'"),
        ('{"_id": "1", "text": "a"}\n', "query-id\tcorpus-id\tscore\n1\td\n", "qrels.tsv line 2: expected"),
        ('{"_id": "1", "text": "a"}\n', "1\td\t1\n1\te\thigh\n", "qrels.tsv line 2: grade 'high'"),
        ('{"_id": "1", "text": "a"}\n', "1\td\t1\n7\td\t1\n", "qrels.tsv line 2: query '7' is not in queries.jsonl"),
        ('{"_id": "1", "text": "a"}\n', "1\td\t1\n1\tnope\t1\n", "qrels.tsv line 2: document 'nope' is not in the knowledge base"),
        ('{"_id": "1", "text": "a"}\n', "1\td\t1\n1\td\t2\n", "qrels.tsv line 2: 1/d judged twice"),
    ],
)
def test_bad_judged_sets_are_one_line_errors_naming_the_line(queries: str, qrels: str, message: str) -> None:
    with pytest.raises(JudgedSetError) as caught:
        load(queries, qrels, documents={"d", "e"})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# ---------------------------------------------------------------------------- end to end

TOPICS = [
    ("etna", "Mount Etna", "Mount Etna is an active stratovolcano on the east coast of Sicily that erupts often."),
    ("bees", "Honeybee dance", "Forager honeybees perform the waggle dance to tell their sisters where flowers with nectar are."),
    ("bread", "Sourdough", "Feed the sourdough starter flour and water every day so the wild yeast stays alive."),
    ("kepler", "Kepler telescope", "The Kepler space telescope found exoplanets by transit photometry, watching stars dim."),
    ("chess", "Chess olympiad", "The chess olympiad in Budapest gathered national teams from 180 countries."),
    ("tides", "Ocean tides", "Tides rise and fall twice a day because of the gravitational pull of the moon and the sun."),
    ("insulin", "Insulin", "Insulin is a hormone made by the pancreas that lets cells take up glucose from the blood."),
    ("bridges", "Suspension bridges", "Suspension bridges hang the deck from vertical cables attached to main cables over towers."),
    ("coffee", "Coffee roasting", "Roasting coffee beans turns green seeds brown through the Maillard reaction and caramelisation."),
    ("glacier", "Glaciers", "Glaciers carve U-shaped valleys as the moving ice grinds the bedrock beneath it."),
    ("violin", "Violin making", "Violin makers carve spruce tops and maple backs and varnish the instrument by hand."),
    ("tariff", "Import tariffs", "An import tariff is a tax on goods brought into a country, raising their price at home."),
]
QUERIES = {
    "q1": ("which volcano erupts in Sicily", {"etna": 2}),
    "q2": ("how do bees tell each other where the flowers are", {"bees": 1}),
    "q3": ("keeping a sourdough starter alive", {"bread": 1}),
    "q4": ("finding planets around other stars by transits", {"kepler": 1}),
    "q5": ("international chess tournament in Hungary", {"chess": 1}),
    "q6": ("why does the sea level change during the day", {"tides": 1}),
    "q7": ("hormone that controls blood sugar", {"insulin": 1, "tariff": 0}),
    "q8": ("how are bridge decks held up by cables", {"bridges": 1}),
    "q9": ("what happens to coffee beans in the roaster", {"coffee": 1}),
    "q10": ("how ice shapes mountain valleys", {"glacier": 1}),
}


def write_judged_set(root: Path) -> tuple[Path, Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    lines = [json.dumps({"_id": doc, "title": title, "text": text, "metadata": {}}) for doc, title, text in TOPICS]
    lines.append(json.dumps({"_id": "blank", "title": "", "text": ""}))  # BEIR sets have empty records
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": q, "text": text}) + "\n" for q, (text, _) in QUERIES.items()), encoding="utf-8")
    qrels = root / "test.tsv"
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, (_, judged) in QUERIES.items() for d, g in judged.items()]
    qrels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return corpus, queries, qrels


@pytest.fixture(autouse=True)
def logs_to_stderr() -> None:
    from lorag.logging import configure_logging

    configure_logging()


def run(*args: str) -> tuple[int, str, str, BaseException | None]:
    result = CliRunner().invoke(cli, ["kb", *args], catch_exceptions=True)
    return result.exit_code, result.stdout, result.stderr, result.exception


def _state(state: list[str]) -> dict[str, Any]:
    """What a bad command must leave alone: every chunk, every record, the base's fusion."""
    from lorag.config import load_settings
    from lorag.knowledge.service import KnowledgeService
    from tests.knowledge_helpers import snapshot

    service = KnowledgeService.from_settings(load_settings(None, {"state_dir": state[1]}))
    try:
        return {"snapshot": snapshot(service, "judged"), "show": service.show("judged", documents=False)["fusion"]}
    finally:
        service.close()


def test_corpus_ingest_eval_and_tune_end_to_end(tmp_path: Path) -> None:
    corpus, queries, qrels = write_judged_set(tmp_path / "set")
    state = ["--state-dir", str(tmp_path / "state")]

    # 1. one document per record, named by its id; the empty record is reported, not fatal.
    code, out, err, exc = run("ingest", "judged", str(corpus), "--create", "--json", *state)
    assert code == 0, (err, exc)
    report = json.loads(out)
    assert len(report["added"]) == len(TOPICS) and all("#" in s for s in report["added"])
    assert "line 13: empty record" in err
    code, out, _, _ = run("query", "judged", "volcano in Sicily", "--json", "-k", "1", *state)
    (hit,) = json.loads(out)["hits"]
    assert hit["source"] == f"{corpus}#etna" and hit["metadata"]["title"] == "Mount Etna"
    assert hit["location"] == "record etna" and hit["text"].startswith("Mount Etna\n")

    # 2. unchanged corpus: nothing written; one changed record: only its chunks replaced.
    code, out, _, _ = run("ingest", "judged", str(corpus), "--json", *state)
    assert json.loads(out)["chunks_written"] == 0 and len(json.loads(out)["unchanged"]) == len(TOPICS)
    before = _state(state)["snapshot"][0]
    lines = corpus.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"_id": "bread", "title": "Sourdough", "text": "Rye sourdough needs a warm proof."})
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, _, _ = run("ingest", "judged", str(corpus), "--json", *state)
    changed = json.loads(out)
    assert changed["updated"] == [f"{corpus}#bread"] and changed["chunks_deleted"] == 1
    after = _state(state)["snapshot"][0]
    assert [row for row in before if "#bread" not in str(row)] == [row for row in after if "#bread" not in str(row)]
    # --sync: a record gone from the corpus is removed; putting it back adds it again.
    corpus.write_text("\n".join(lines[:2] + lines[3:]) + "\n", encoding="utf-8")
    code, out, _, _ = run("ingest", "judged", str(corpus), "--sync", "--json", *state)
    assert json.loads(out)["removed"] == [f"{corpus}#bread"]
    lines[2] = json.dumps({"_id": "bread", "title": "Sourdough", "text": TOPICS[2][2]})
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert run("ingest", "judged", str(corpus), *state)[0] == 0

    # 3. kb eval: a table, and JSON with every mode's three metrics.
    code, out, err, exc = run("eval", "judged", str(queries), str(qrels), *state)
    assert code == 0, (err, exc)
    assert "10 judged queries" in out and "nDCG@10" in out and "evaluating judged" in err
    code, out, _, _ = run("eval", "judged", str(queries), str(qrels), "--json", *state)
    result = json.loads(out)
    assert set(result["modes"]) == {"vector", "keyword", "hybrid"}
    assert all(set(row) == {"ndcg@10", "recall@100", "mrr@10"} for row in result["modes"].values())
    assert result["modes"]["vector"]["ndcg@10"] > 0.8 and result["modes"]["hybrid"]["recall@100"] == 1.0

    # 4. kb tune: held-out report, stored fusion, used by retrieval and shown.
    code, out, err, exc = run("tune", "judged", str(queries), str(qrels), "--json", "--method", "convex", *state)
    assert code == 0, (err, exc)
    tuned = json.loads(out)
    assert tuned["queries"] == {"fit": 7, "held_out": 3} and tuned["stored"] is True
    assert set(tuned["held_out"]) == {"vector", "keyword", "hybrid (default)", "hybrid (tuned)"}
    shown = _state(state)["show"]
    assert shown["tuned"] is True and shown["fusion"] == "convex"
    assert shown["vector_weight"] == tuned["tuned"]["vector_weight"]
    code, out, _, _ = run("eval", "judged", str(queries), str(qrels), "--json", *state)
    assert json.loads(out)["fusion"] == tuned["tuned"]
    code, out, _, _ = run("tune", "judged", "--reset", *state)
    assert code == 0 and _state(state)["show"]["tuned"] is False

    # 5. bad input: one line naming the line, non-zero exit, the base untouched.
    untouched = _state(state)
    bad_qrels = tmp_path / "bad.tsv"
    for content, message in [
        ("q1\tetna\t1\nq2\tmissing-doc\t1\n", "bad.tsv line 2: document 'missing-doc' is not in the knowledge base"),
        ("q1\tetna\t1\nq99\tetna\t1\n", "bad.tsv line 2: query 'q99' is not in queries.jsonl"),
        ("q1\tetna\n", "bad.tsv line 1: expected"),
        ("", "bad.tsv: no judgements"),
    ]:
        bad_qrels.write_text(content, encoding="utf-8")
        for command in ("eval", "tune"):
            code, _, _, exc = run(command, "judged", str(queries), str(bad_qrels), *state)
            assert code != 0 and isinstance(exc, LoragError), (command, content, exc)
            assert str(exc).startswith(message) and "\n" not in str(exc)
    bad_corpus = tmp_path / "bad" / "corpus.jsonl"
    bad_corpus.parent.mkdir()
    bad_corpus.write_text('{"_id": "x1", "text": "fine"}\n{"_id": "x2", "text": "broken"\n', encoding="utf-8")
    code, _, _, exc = run("ingest", "judged", str(bad_corpus), *state)
    assert code != 0 and str(exc).startswith("corpus.jsonl line 2: not valid JSON")
    assert _state(state) == untouched
    # The console entry point prints that one line, no traceback.
    bad_qrels.write_text("q1\tetna\t1\nq1\tnowhere\t1\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "lorag.cli", "kb", "eval", "judged", str(queries), str(bad_qrels), *state],
        capture_output=True, text=True, timeout=240, env={**__import__("os").environ, "LORAG_LOG_LEVEL": "error"},
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: bad.tsv line 2: document 'nowhere' is not in the knowledge base"]


def test_eval_and_tune_over_the_admin_api(tmp_path: Path) -> None:
    import threading
    import time

    import httpx
    import uvicorn

    from lorag.config import load_settings
    from tests.knowledge_helpers import free_port
    from tests.test_knowledge_api import ADMIN, USER, build_app

    corpus, queries, qrels = write_judged_set(tmp_path / "set")
    config = tmp_path / "lorag.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[[server.api_keys]]\nkey = "sk-admin-knowledge"\nadmin = true\n'
        '[[server.api_keys]]\nkey = "sk-user-knowledge"\n'
        f'[knowledge.ingest]\nallowed_roots = ["{corpus.parent}"]\n',
        encoding="utf-8",
    )
    app = build_app(load_settings(config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    body = {"queries": queries.read_text(encoding="utf-8"), "qrels": qrels.read_text(encoding="utf-8")}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=240) as client:
            ingested = client.post("/v1/knowledge/judged/ingest", json={"paths": [str(corpus)], "create": True}, headers=ADMIN)
            assert ingested.status_code == 200 and len(ingested.json()["added"]) == len(TOPICS)
            assert client.post("/v1/knowledge/judged/eval", json=body, headers=USER).status_code == 403
            evaluated = client.post("/v1/knowledge/judged/eval", json={**body, "modes": ["vector", "hybrid"]}, headers=ADMIN)
            assert evaluated.status_code == 200, evaluated.text
            assert set(evaluated.json()["modes"]) == {"vector", "hybrid"}
            bad = client.post("/v1/knowledge/judged/eval", json={**body, "qrels": "q1\tetna\t1\nq1\tghost\t1\n"}, headers=ADMIN)
            assert bad.status_code == 400
            assert bad.json()["error"]["message"] == "qrels line 2: document 'ghost' is not in the knowledge base"
            tuned = client.post("/v1/knowledge/judged/tune", json={**body, "dry_run": True}, headers=ADMIN)
            assert tuned.status_code == 200 and tuned.json()["stored"] is False
            assert client.get("/v1/knowledge/judged", headers=ADMIN).json()["fusion"]["tuned"] is False
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.knowledge.close()
