"""The Python API (``genius.api.Retriever``) and ``genius search`` built on it.

On the synthetic two-task world of test_evaluate (stand-in generator and encoder): loading,
typed hits, the target modality a pool implies, instructions, errors. On the finished tiny run:
the API, the command line and the evaluation's run files agree, and the README's example runs.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genius.common.config import save_config
from genius.common.mbeir import TASKS, Instructions
from genius.common.store import store_path
from genius.models.generative_retriever import api, search
from genius.models.generative_retriever.api import Hit, Query, Retriever, choose_instruction
from genius.models.generative_retriever.evaluate import evaluate
from genius.models.generative_retriever.metrics import read_run_file
from genius.models.generative_retriever.run_models import StaleInputError

# pytest runs with --import-mode=importlib, which leaves tests/ off sys.path; the synthetic world
# is test_evaluate's.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_evaluate import DATASET, DIM, ENCODER, fake_models, make_world  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UNION = "mbeir_union_test_cand_pool"
TEXT_POOL = "mbeir_shapes_task3_cand_pool"  # the I->T task's local pool: captions only


# ---- a finished run of the synthetic world ----------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api_world")
    cfg = make_world(tmp)
    evaluate(cfg, fake_models(cfg))
    query_store = store_path(cfg.paths.stores_root, ENCODER, "test",
                             Path(cfg.paths.data_root) / "query/test/mbeir_shapes_task0_test.jsonl")
    return cfg, np.load(query_store / "txt.npy").astype(np.float32)


class Encoder:
    """A stand-in stage-0 encoder: every text "encodes" as the caption of query 20:4 (row 3)."""

    dim = DIM

    def __init__(self, captions: np.ndarray):
        self.captions, self.seen = captions, []

    def encode_texts(self, texts):
        self.seen += texts
        return np.repeat(self.captions[3:4], len(texts), axis=0)


def write_instructions(cfg, rows: list[tuple[str, str]]) -> None:
    """An instructions file for dataset 20 with one variant per (query modality, target modality)."""
    path = Path(cfg.paths.data_root) / "instructions" / "query_instructions.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\n" +
                    "".join(f"{q}\t{c}\tshapes\t{DATASET}\tfind {c} for this {q}\n" for q, c in rows))


def load(cfg, captions, pool=None, **kwargs) -> Retriever:
    return Retriever.load(cfg.paths.results, pool, "cpu", models=fake_models(cfg, **kwargs), encoder=Encoder(captions))


def test_search_a_finished_run(world):
    """Manifest -> pool, trie, codes, fused embeddings -> ranked, typed hits."""
    cfg, captions = world
    write_instructions(cfg, [("text", "image"), ("text", "text")])
    retriever = load(cfg, captions)
    hits = retriever.search(text="a small red circle", instruction="", k=3)
    assert retriever.encoder.seen == ["A small red circle."]  # format_string, as extraction embeds query texts
    best = hits[0]
    assert (best.id, best.modality, best.text, best.method) == ("20:4", "image", "", "genius_r")
    assert best.image_path == str(Path(cfg.paths.data_root) / "img/3.png")  # opens from any working directory
    codes = np.load(Path(cfg.paths.rq_run) / "codes" / UNION / "codes.npy")
    ids = np.load(Path(cfg.paths.rq_run) / "codes" / UNION / "ids.npy")
    for hit in hits:  # the ID decoded for a candidate is its code
        assert hit.generated_id == tuple(codes[ids == 20 * 10_000_000 + int(hit.id.split(":")[1])][0])
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
    with pytest.raises(AttributeError):
        best.score = 1.0  # frozen
    table = search.format_hits(hits)
    assert "20:4" in table and ",".join(map(str, best.generated_id)) in table

    # GENIUS without re-ranking: the best beam's ID holds 20:4 among others sharing it, tied on its beam score
    local = load(cfg, captions, pool="mbeir_shapes_task0_cand_pool").search(text="a small red circle", instruction="",
                                                                             k=8, method="genius")
    tied = [h for h in local if h.score == local[0].score]
    assert "20:4" in [h.id for h in tied] and len(local) == 8 and len({h.generated_id for h in tied}) == 1
    dense = retriever.search(text="a small red circle", instruction="", k=3, method="dense")
    assert dense[0].id == "20:4" and all(h.generated_id is None and h.method == "dense" for h in dense)


def test_hits_whose_image_is_gone_are_named(world, caplog):
    """The hits are ranked by the vectors stored at extraction; an image deleted since is said, not shown silently."""
    cfg, captions = world
    write_instructions(cfg, [("text", "image"), ("text", "text")])
    retriever = load(cfg, captions)
    image = Path(cfg.paths.data_root) / "img/3.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    for name in {Path(h.image_path).name for h in retriever.search(text="a small red circle", instruction="", k=3)}:
        (image.parent / name).write_bytes(b"")  # every hit's image there: nothing to say
    caplog.clear()
    retriever.search(text="a small red circle", instruction="", k=3)
    assert "gone since extraction" not in caplog.text
    image.unlink()
    retriever.search(text="a small red circle", instruction="", k=3)
    assert f"1 image(s) of the hits are gone since extraction, first {image}" in caplog.text


def test_loading_errors_are_one_line_and_name_the_file(world, tmp_path):
    cfg, captions = world
    write_instructions(cfg, [("text", "image")])
    with pytest.raises(ValueError, match=r"run\.json: pool 'nope' was not evaluated in this run; choices: "):
        load(cfg, captions, pool="nope")
    with pytest.raises(FileNotFoundError, match="run.json"):
        Retriever.load(tmp_path)
    save_config(cfg, tmp_path / "setting" / "eval.yaml")  # a setting's config folder names its results
    assert api.find_manifest(tmp_path / "setting") == Path(cfg.paths.results) / "run.json"
    with pytest.raises(StaleInputError, match="changed after"):
        load(cfg, captions, generator_fp="new")
    retriever = load(cfg, captions)
    with pytest.raises(ValueError, match="unknown method 'bm25'; valid choices"):
        retriever.search(text="x", method="bm25")
    with pytest.raises(ValueError, match="give a query"):
        retriever.search()
    with pytest.raises(FileNotFoundError, match="missing.png"):
        retriever.search(image=tmp_path / "missing.png", instruction="")


def test_the_target_modality_comes_from_a_single_modality_pool(world, caplog):
    """A text-only pool: text queries look for texts, with the text -> text instruction (an
    instructions file without a text -> image row, as a text corpus has), and no log of an image
    target. A mixed pool keeps the paired default and says how to choose."""
    cfg, captions = world
    write_instructions(cfg, [("text", "text")])
    retriever = load(cfg, captions, pool=TEXT_POOL)
    caplog.set_level(logging.INFO, logger="genius.search")
    hits = retriever.search(text="a small red circle", k=5)
    assert retriever.encoder.seen == ["Find text for this text a small red circle."]
    assert len(hits) == 5 and {h.modality for h in hits} == {"text"}
    assert "(text -> text)" in caplog.text and "-> image" not in caplog.text
    with pytest.raises(ValueError, match=f"pool {TEXT_POOL} holds only text"):
        retriever.search(text="x", target_modality="image")

    caplog.clear()
    union = load(cfg, captions)  # image and text candidates
    with pytest.raises(ValueError, match="no row for text -> image"):
        union.search(text="a small red circle")
    assert "text query -> image candidates by default" in caplog.text and "target_modality=" in caplog.text
    assert "--target-modality" in caplog.text
    union.search(text="a small red circle", target_modality="text")  # the instruction is what asks for texts
    assert union.encoder.seen == ["Find text for this text a small red circle."]


def test_search_instruction_choice():
    instructions = Instructions({(20, "text", "image"): ["find an image", "show a picture"],
                                 (21, "text", "image"): ["other"], (20, "image", "text"): ["caption it"]}, {})
    assert Query("x").modality == "text" and Query("x", "a.png").modality == "image,text"
    first = choose_instruction(instructions, "deterministic", "text", "image", "a caption")
    assert first == choose_instruction(instructions, "deterministic", "text", "image", "a caption")
    assert first in ("find an image", "show a picture")  # dataset 20: the lowest id with this task
    assert choose_instruction(instructions, "first", "text", "image", "k", dataset=21) == "other"
    assert choose_instruction(instructions, "none", "text", "image", "k") == ""
    with pytest.raises(ValueError, match="no row for image -> image"):
        choose_instruction(instructions, "first", "image", "image", "k")
    with pytest.raises(ValueError, match="no row of dataset 21 for image -> text"):
        choose_instruction(instructions, "first", "image", "text", "k", dataset=21)


def test_search_many_is_search_of_each(world):
    cfg, captions = world
    write_instructions(cfg, [("text", "image"), ("text", "text")])
    retriever = load(cfg, captions)
    queries = [Query("a small red circle", instruction=""), "a blue square",
               Query("a caption", target_modality="text", instruction="find a caption")]
    many = retriever.search_many(queries, k=4)
    assert many == [retriever.search(q.text, q.image, 4, q.target_modality, q.instruction)
                    for q in (Query(q) if isinstance(q, str) else q for q in queries)]
    assert all(isinstance(h, Hit) for hits in many for h in hits)


@pytest.mark.parametrize("call, error, message", [
    (lambda r: r.search(text=123), TypeError, "query text: expected a str, got int"),
    (lambda r: r.search(text="a", image=5), TypeError, "query image: expected a path or a PIL image"),
    (lambda r: r.search(text="a", target_modality="video"), ValueError, "target_modality 'video': expected one of"),
    (lambda r: r.search(text="a", k="5"), ValueError, "k must be an integer in [1, 100000], got '5'"),
    (lambda r: r.search_many("abc"), TypeError, "search_many takes a list of queries"),  # 3 one-letter searches
    (lambda r: r.search_many([None]), TypeError, "each query is a Query or a str, got NoneType"),
    (lambda r: r.search_many([{"text": "x"}]), TypeError, "each query is a Query or a str, got dict"),
])
def test_api_misuse_is_named(world, call, error, message):
    """Each was an AttributeError or TypeError from deep inside the search (or a silent wrong search)."""
    cfg, captions = world
    with pytest.raises(error, match=re.escape(message)):
        call(load(cfg, captions))
    assert Query(None, "photo.png").text == "" and Query(None, "photo.png").modality == "image"


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_a_device_the_api_cannot_use_is_refused(world, device):
    cfg, captions = world  # it ran on the CPU instead, silently
    with pytest.raises(ValueError, match=rf"device '{re.escape(device)}': expected 'auto', 'cpu' or 'cuda'"):
        Retriever.load(cfg.paths.results, None, device, models=fake_models(cfg), encoder=Encoder(captions))


# ---- the finished tiny run: API = command line = evaluation ---------------------------------
def tiny_queries(world: Path, stem: str, count: int) -> list[tuple[str, Query]]:
    """The first ``count`` test queries of a query file with the instruction evaluation gave them."""
    instructions = Instructions.load(world / "instructions/query_instructions.tsv")
    out = []
    for line in open(world / f"query/test/{stem}.jsonl").readlines()[:count]:
        q = json.loads(line)
        query_mod, target = TASKS[q["task_id"]]
        image = str(world / q["query_img_path"]) if q.get("query_img_path") else None
        out.append((q["qid"], Query(q.get("query_txt") or "", image, target,
                                    instructions.choose(q["qid"], query_mod, target))))
    return out


@pytest.fixture
def counted_loads(monkeypatch):
    """How often the models and the encoder are loaded."""
    calls = {"models": 0, "encoder": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(api, "load_models", counting("models", api.load_models))
    monkeypatch.setattr(api, "build_encoder", counting("encoder", api.build_encoder))
    return calls


@pytest.mark.slow
def test_api_command_line_and_evaluation_agree(finished_tiny_root, counted_loads, capsys):
    """Text (T->I) and image (I->T) test queries in one batch: the API's rankings are the run
    files' for all three methods, the command line prints the same, and the models and encoder
    were loaded once for all of them."""
    results, world = finished_tiny_root / "results/tiny", finished_tiny_root / "worlds/tiny"
    queries = (tiny_queries(world, "mbeir_shapesnews_task0_test", 4) +
               tiny_queries(world, "mbeir_shapesnews_task3_test", 4))
    retriever = Retriever.load(results, device="cpu")
    assert retriever.pool.stem == UNION
    for method in ("genius_r", "genius", "dense"):
        many = retriever.search_many([q for _, q in queries], k=10, method=method)
        for (qid, query), hits in zip(queries, many):
            stem = "mbeir_shapesnews_task0_test" if query.image is None else "mbeir_shapesnews_task3_test"
            expected = read_run_file(results / "runs" / UNION / stem / f"{method}.run")[qid]
            assert [h.id for h in hits] == [e.did for e in expected], (method, qid)
            np.testing.assert_allclose([h.score for h in hits], [e.score for e in expected], rtol=1e-4, atol=1e-4)
    _, image_query = queries[-1]  # an I->T query: a PIL image searches like its file
    with Image.open(image_query.image) as image:
        from_pil = retriever.search(image=image.copy(), target_modality="text", instruction=image_query.instruction)
    assert from_pil == retriever.search(image=image_query.image, target_modality="text",
                                        instruction=image_query.instruction)
    assert counted_loads == {"models": 1, "encoder": 1}  # 26 searches, one load

    qid, query = queries[0]
    assert search.main(["--run", str(results), "--text", query.text, "--instruction", query.instruction,
                        "--target-modality", "image", "--device", "cpu"]) == 0
    printed = [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert printed == [h.id for h in retriever.search(query.text, k=10, target_modality="image",
                                                      instruction=query.instruction)]
    assert counted_loads == {"models": 2, "encoder": 2}  # the command line loads per query


def readme_example() -> str:
    """The README's Python API example: the python block after the marker."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- python-api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its Python API example (marker <!-- python-api-example -->)"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_example_runs(finished_tiny_root, capsys, monkeypatch):
    """The example as written, on the tiny run instead of the demo's, from the root's folder."""
    code = readme_example()
    assert 'Retriever.load("results/demo")' in code
    monkeypatch.chdir(finished_tiny_root)
    namespace: dict = {}
    exec(compile(code.replace("results/demo", "results/tiny"), "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    hits, captions = namespace["hits"], namespace["captions"]
    assert len(hits) == 5 and all(isinstance(h, Hit) and h.method == "genius_r" for h in hits)
    assert len(lines) == 5 and lines[0].split()[:2] == ["1", hits[0].id]
    assert len(captions) == 3 and all(isinstance(h, Hit) for h in captions)
    assert [len(b) for b in namespace["batch"]] == [3, 3]


def test_pool_records_are_read_by_did(tmp_path):
    """Only the hits' lines are read; a did quoted inside a text is not taken for the record's, and a
    pool file changed after loading is named rather than misread."""
    pool = tmp_path / "pool.jsonl"
    rows = [{"txt": 'says "did": "7:7"', "modality": "text", "did": "7:1"},
            {"did": "7:2", "modality": "image", "img_path": "a.png"}]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = api.PoolRecords(pool)
    assert records.read([7 * 10_000_000 + 2, 7 * 10_000_000 + 1]) == {7 * 10_000_000 + 2: rows[1],
                                                                    7 * 10_000_000 + 1: rows[0]}
    with pytest.raises(StaleInputError, match="7:7 of its store"):
        records.read([7 * 10_000_000 + 7])
    pool.write_text(json.dumps({"did": "7:9", "modality": "text", "txt": "new first line"}) + "\n" + pool.read_text())
    with pytest.raises(StaleInputError, match=f"{pool}: candidate 7:1 .* the pool file changed"):
        records.read([7 * 10_000_000 + 1])


def test_an_encoder_checkpoint_changed_since_extraction_is_refused(tiny_root_copy, monkeypatch):
    """The same checkpoint path with other weights would embed queries into another space than the
    pool's: search (and the index, which builds its encoder the same way) refuse it by content."""
    from genius.common.checkpoint import CONTENT_KEY, load_own_checkpoint, save_own_checkpoint

    monkeypatch.setenv("GENIUS_ROOT", str(tiny_root_copy))
    checkpoint = tiny_root_copy / "checkpoint/tiny/clip_sf/clip_sf.pt"
    original = checkpoint.read_bytes()
    obj = load_own_checkpoint(checkpoint)
    obj.pop(CONTENT_KEY)
    name = next(k for k, v in obj["model"].items() if v.is_floating_point())
    obj["model"][name] = obj["model"][name] + 0.01
    save_own_checkpoint(obj, checkpoint)
    with pytest.raises(StaleInputError, match=rf"{re.escape(str(checkpoint))}: the encoder's weights changed after "
                                              r"the run's stores were extracted with them"):
        Retriever.load(tiny_root_copy / "results/tiny", device="cpu")
    checkpoint.write_bytes(original)  # the weights the stores were made with: loads again
    assert Retriever.load(tiny_root_copy / "results/tiny", device="cpu").pool.stem == UNION


def test_a_query_image_is_read_as_extraction_reads_the_candidates(tmp_path):
    """16-bit grey levels scaled to 8 bits (Pillow's convert("RGB") would clip them near white);
    a float image refused naming the file."""
    deep, flat = tmp_path / "deep.png", tmp_path / "flat.tif"
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(deep)  # 32896 / 257 = 128
    assert np.asarray(api._open_image(deep)).tolist() == [[[128] * 3] * 4] * 4
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(flat)
    with pytest.raises(ValueError, match=rf"^query image {re.escape(str(flat))}: a float image \(Pillow mode F\)"):
        api._open_image(flat)
