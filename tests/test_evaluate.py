"""``genius eval``: artefact keying, outputs and the search manifest on a synthetic two-task world
with a stand-in generator; then the whole tiny chain (world -> stores -> rq -> codes -> generator ->
eval -> search) once the other stages are installed.
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from genius.common.config import ConfigError, load_config, resolve_path
from genius.common.fusion import score_fusion
from genius.common.mbeir import MODALITY_CODE, TASKS, unhash_did, unhash_qid
from genius.common.runstate import content_sha256
from genius.common.store import ARRAYS, EmbeddingStore, StoreArrays, store_path, write_store
from genius.models.generative_retriever.decode_cache import decode_key
from genius.models.generative_retriever.evaluate import EvalConfig, EvalFile, PathsConfig, evaluate
from genius.models.generative_retriever.metrics import read_run_file
from genius.models.generative_retriever.run_models import Models, StaleInputError, check_int8_device, checkpoint_files

DIM = 8
ENCODER = "FAKE"
DATASET = 20
SCENES = 30
CODEBOOK_SIZES = [3, 3, 3]  # the modality level, then two levels of 3 codes (the projections' argmax)


# ---- a synthetic world: scenes seen as images and as captions -------------------------------
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _store(root: Path, split: str, source: Path, kind: str, ids, vectors, modality, target):
    n = len(ids)
    img = np.where(np.isin(modality, [0, 2])[:, None], vectors, 0)
    txt = np.where(np.isin(modality, [1, 2])[:, None], vectors, 0)
    arrays = StoreArrays(np.asarray(ids, np.int64), img, txt, np.isin(modality, [0, 2]).astype(np.uint8),
                         np.isin(modality, [1, 2]).astype(np.uint8), np.asarray(modality, np.int8),
                         np.full(n, target, np.int8) if np.isscalar(target) else np.asarray(target, np.int8))
    write_store(store_path(root, ENCODER, split, source), arrays, encoder=ENCODER, kind=kind, source=source)
    return arrays


def _codes(scene_vectors: np.ndarray, modality: int, projections) -> np.ndarray:
    levels = [np.full(len(scene_vectors), modality)] + [np.argmax(scene_vectors @ p, axis=1) for p in projections]
    return np.stack(levels, axis=1).astype(np.int64)


def _write_codes(rq_run: Path, pool: Path, ids, codes, store: Path, rq_fp="fake-rq") -> None:
    out = rq_run / "codes" / pool.name.removesuffix(".jsonl")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "codes.npy", codes)
    np.save(out / "ids.npy", np.asarray(ids, np.int64))
    (out / "meta.json").write_text(json.dumps({"rq": rq_fp, "modality_mode": "assigned", "num_levels": codes.shape[1],
                                               "codebook_sizes": CODEBOOK_SIZES,
                                               "store_content": EmbeddingStore.open(store).content_id}))
    _record_files(out)


def _record_files(out: Path) -> None:
    """meta.json's record of the code files, as genius assign-codes writes it (eval checks it)."""
    meta = json.loads((out / "meta.json").read_text())
    meta["files"] = {name: {"size": (out / name).stat().st_size, "sha256": content_sha256(out / name)}
                     for name in ("codes.npy", "ids.npy")}
    (out / "meta.json").write_text(json.dumps(meta))


def make_world(tmp: Path, seed: int = 0) -> EvalConfig:
    """Task 0 (caption -> image) and task 3 (image -> caption) over the same scenes, with local pools and a union."""
    rng = np.random.default_rng(seed)
    scenes = rng.normal(size=(SCENES, DIM))
    projections = [rng.normal(size=(DIM, 3)), rng.normal(size=(DIM, 3))]  # few codes: collisions
    data, stores, rq_run = tmp / "data", tmp / "embed", tmp / "rq"
    # an instruction-like offset: queries lean towards the modality they ask for, candidates to their own
    modality_axis = 3 * np.eye(DIM)[:3]
    noisy = lambda code: scenes + 0.3 * rng.normal(size=scenes.shape) + modality_axis[code]  # noqa: E731
    pools, union_rows = {}, []
    for task, cand_mod, base in ((0, "image", 0), (3, "text", 1000)):
        stem = f"mbeir_shapes_task{task}"
        dids = [f"{DATASET}:{base + i + 1}" for i in range(SCENES)]
        pool = data / "cand_pool" / "local" / f"{stem}_cand_pool.jsonl"
        rows = [{"did": d, "modality": cand_mod, "txt": "a caption" if cand_mod == "text" else None,
                 "img_path": f"img/{i}.png" if cand_mod == "image" else None} for i, d in enumerate(dids)]
        _write_jsonl(pool, rows)
        union_rows += rows
        code = MODALITY_CODE[cand_mod]
        cand_vecs = noisy(code)
        arrays = _store(stores, "cand", pool, "candidate", [DATASET * 10_000_000 + base + i + 1 for i in range(SCENES)],
                        cand_vecs, np.full(SCENES, code), code)
        codes = _codes(scenes, code, projections)
        _write_codes(rq_run, pool, arrays.ids, codes, store_path(stores, ENCODER, "cand", pool))
        pools[task] = (arrays, codes)

        query_mod = TASKS[task][0]
        queries = data / "query" / "test" / f"{stem}_test.jsonl"
        qids = [f"{DATASET}:{base + i + 1}" for i in range(SCENES)]
        _write_jsonl(queries, [{"qid": q, "query_modality": query_mod,
                                "query_txt": "a caption" if query_mod == "text" else None,
                                "query_img_path": "img/q.png" if query_mod == "image" else None,
                                "pos_cand_list": [d], "task_id": task} for q, d in zip(qids, dids)])
        _store(stores, "test", queries, "query", [DATASET * 500_000 + base + i + 1 for i in range(SCENES)], noisy(code),
               np.full(SCENES, MODALITY_CODE[query_mod]), code)
        qrels = data / "qrels" / "test" / f"{stem}_test_qrels.txt"
        qrels.parent.mkdir(parents=True, exist_ok=True)
        qrels.write_text("".join(f"{q} 0 {d} 1 {task}\n" for q, d in zip(qids, dids)))

    union = data / "cand_pool" / "global" / "mbeir_union_test_cand_pool.jsonl"
    _write_jsonl(union, union_rows)
    merged = StoreArrays(**{name: np.concatenate([getattr(pools[k][0], name) for k in (0, 3)]) for name in ARRAYS})
    write_store(store_path(stores, ENCODER, "cand", union), merged, encoder=ENCODER, kind="candidate", source=union)
    _write_codes(rq_run, union, merged.ids, np.concatenate([pools[0][1], pools[3][1]]),
                 store_path(stores, ENCODER, "cand", union))
    return EvalConfig(paths=PathsConfig(data_root=str(data), stores_root=str(stores), encoder=ENCODER, rq_run=str(rq_run),
                                        gen_run=str(tmp / "gen"), results=str(tmp / "results")),
                      trie_backend="python", device="cpu")


def fake_models(cfg: EvalConfig, generator_fp: str = "fake-gen", num_beams: int = 4) -> Models:
    """A stand-in generator that ranks the trie's IDs by cosine to the mean of their candidates."""
    paths = cfg.paths
    union = Path(paths.data_root) / paths.union_pool
    arrays = np.load(store_path(paths.stores_root, ENCODER, "cand", union) / "img.npy").astype(np.float32) + \
        np.load(store_path(paths.stores_root, ENCODER, "cand", union) / "txt.npy").astype(np.float32)
    codes = np.load(Path(paths.rq_run) / "codes" / "mbeir_union_test_cand_pool" / "codes.npy")
    centroid = {tuple(c): arrays[(codes == c).all(1)].mean(0) for c in np.unique(codes, axis=0)}

    def decode(z, trie):
        ids = np.asarray(trie.ids())
        unknown = np.zeros(DIM, np.float32)  # IDs the union's codes lack (reassigned local codes)
        cents = torch.tensor(np.stack([centroid.get(tuple(i), unknown) for i in ids]), dtype=torch.float32)
        scores = torch.nn.functional.normalize(z, dim=-1) @ torch.nn.functional.normalize(cents, dim=-1).T
        top = scores.topk(min(num_beams, len(ids)), dim=1)
        out_codes = torch.full((len(z), num_beams, ids.shape[1]), -1, dtype=torch.long)
        out_scores = torch.full((len(z), num_beams), -torch.inf)
        out_codes[:, : top.indices.shape[1]] = torch.from_numpy(ids.astype(np.int64))[top.indices]
        out_scores[:, : top.indices.shape[1]] = top.values
        return SimpleNamespace(codes=out_codes, scores=out_scores, valid=torch.isfinite(out_scores))

    return Models(score_fusion, decode, {"rq": "fake-rq", "generator": generator_fp}, CODEBOOK_SIZES, "assigned")


def _decoded_meta(cfg, pool_stem, query_stem):
    return json.loads((Path(cfg.paths.results) / "decoded" / pool_stem / query_stem / "meta.json").read_text())


# ---- unit-level: the evaluation driver with a stand-in generator -----------------------------
def test_evaluate_writes_keyed_artefacts_and_tables(tmp_path):
    cfg = make_world(tmp_path)
    report = evaluate(cfg, fake_models(cfg))
    out = Path(cfg.paths.results)
    for name in ("results.tsv", "results.md", "metrics.json", "run.json", "config.yaml"):
        assert (out / name).is_file(), name

    got = {(r.method, r.pool_kind, r.query_file): r.value for r in report.results if r.reported}
    assert len(got) == 3 * 2 * 2  # methods x pool kinds x query files
    assert all(r.k == 5 for r in report.results)
    for key, value in got.items():
        assert value >= 3 * 5 / SCENES, key  # far above chance (5 of 30)
    for pool_kind in ("task-specific", "universal"):
        mean = lambda m: np.mean([v for (mm, pk, _), v in got.items() if mm == m and pk == pool_kind])  # noqa: E731
        assert mean("genius_r") >= mean("genius")

    # the universal pass has its own decoded IDs and run files; the local ones are untouched
    for stem in ("mbeir_shapes_task0_cand_pool", "mbeir_union_test_cand_pool"):
        meta = _decoded_meta(cfg, stem, "mbeir_shapes_task0_test")
        assert meta["key"]["models"] == {"rq": "fake-rq", "generator": "fake-gen"}
        runs = read_run_file(out / "runs" / stem / "mbeir_shapes_task0_test" / "genius_r.run")
        assert len(runs) == SCENES and all(len(v) <= 5 for v in runs.values())
    local = np.load(out / "decoded" / "mbeir_shapes_task3_cand_pool" / "mbeir_shapes_task3_test" / "codes.npy")
    assert set(local[..., 0][local[..., 0] >= 0].tolist()) == {MODALITY_CODE["text"]}
    assert _decoded_meta(cfg, "mbeir_shapes_task3_cand_pool", "mbeir_shapes_task3_test")["key"]["codes"] != \
        _decoded_meta(cfg, "mbeir_union_test_cand_pool", "mbeir_shapes_task3_test")["key"]["codes"]

    # single-modality local pools; in the union the stand-in mostly picks the asked-for modality code
    for s in report.stats:
        assert not s.cached and s.num_queries == SCENES and s.genius_candidates_per_query == 5
        assert s.target_modality_share == 1.0 if s.pool_kind == "task-specific" else s.target_modality_share > 0.9
    tsv = (out / "results.tsv").read_text().splitlines()
    assert tsv[0].startswith("Model\tTaskID") and len(tsv) == 1 + 3 * 2
    assert "### Universal pool" in report.markdown and "paper" not in report.markdown
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["default_pool"] == "mbeir_union_test_cand_pool"
    trie = Path(manifest["pools"]["mbeir_union_test_cand_pool"]["trie"])
    assert trie.is_file() and trie.parent == Path(cfg.paths.rq_run) / "codes" / "mbeir_union_test_cand_pool"


def test_task_specific_pools_decoded_under_the_union_trie_as_the_official_evaluation(tmp_path):
    """decoding.task_specific_trie: union decodes each file once, under the universal pool's trie,
    and looks the beams' IDs up among the task-specific pool's candidates (an ID the pool lacks
    returns nothing), as the official evaluation made its task-specific numbers."""
    from genius.models.generative_retriever.pool_assets import open_pool
    from genius.models.generative_retriever.retrieval import beam_leaves, genius_ranking

    cfg = make_world(tmp_path)
    cfg.dense = cfg.rerank = False
    cfg.decoding.task_specific_trie = "union"
    models = fake_models(cfg, num_beams=12)  # more than a pool's 9 IDs: the union's other modality shows
    report = evaluate(cfg, models)
    out = Path(cfg.paths.results)
    assert sorted(p.name for p in (out / "decoded").iterdir()) == ["mbeir_union_test_cand_pool"]
    cached = {(s.pool_kind, s.query_file): s.cached for s in report.stats}
    assert not cached["task-specific", "mbeir_shapes_task0_test"] and cached["universal", "mbeir_shapes_task0_test"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["pools"]["mbeir_shapes_task0_cand_pool"]["decoded_under"] == "mbeir_union_test_cand_pool"
    assert "decoded under the universal pool's trie" in report.markdown

    data = Path(cfg.paths.data_root)
    for task in (0, 3):
        stem = f"mbeir_shapes_task{task}"
        beams = np.load(out / "decoded" / "mbeir_union_test_cand_pool" / f"{stem}_test" / "codes.npy")
        scores = np.load(out / "decoded" / "mbeir_union_test_cand_pool" / f"{stem}_test" / "scores.npy")
        local = open_pool(replace(cfg, decoding=replace(cfg.decoding, task_specific_trie="own")), "task-specific",
                          data / "cand_pool" / "local" / f"{stem}_cand_pool.jsonl", models)
        expected = genius_ranking(local.cmap, beam_leaves(local.cmap, beams, beams[..., 0] >= 0), scores, 5)
        got = read_run_file(out / "runs" / f"{stem}_cand_pool" / f"{stem}_test" / "genius.run")
        queries = EmbeddingStore.open(store_path(cfg.paths.stores_root, ENCODER, "test",
                                                 data / "query" / "test" / f"{stem}_test.jsonl"))
        want = {unhash_qid(q): [unhash_did(local.ids[r]) for r in rows if r >= 0]
                for q, rows in zip(np.asarray(queries.ids).tolist(), expected.rows)}
        assert {q: [e.did for e in got.get(q, [])] for q in want} == want
        local_ids = {tuple(c) for c in np.load(Path(cfg.paths.rq_run) / "codes" / f"{stem}_cand_pool" / "codes.npy")}
        assert any(tuple(c) not in local_ids for c in beams[beams[..., 0] >= 0])  # IDs only the other pool has

    cfg.decoding.task_specific_trie = "own"  # another setting: its own decodings, not the union's
    evaluate(cfg, models)
    assert (out / "decoded" / "mbeir_shapes_task0_cand_pool").is_dir()

    cfg.union, cfg.paths.index, cfg.decoding.task_specific_trie = False, str(tmp_path / "index"), "union"
    with pytest.raises(ValueError, match="decoding.task_specific_trie: union decodes under the universal"):
        cfg.validate()  # an index stands alone


def test_changed_codes_or_generator_invalidate_cached_decodings_and_trie(tmp_path):
    cfg = make_world(tmp_path)
    cfg.dense = False
    evaluate(cfg, fake_models(cfg))
    codes_dir = Path(cfg.paths.rq_run) / "codes" / "mbeir_shapes_task0_cand_pool"
    first_trie = next(codes_dir.glob("trie-*.bin"))

    again = evaluate(cfg, fake_models(cfg))
    assert all(s.cached for s in again.stats)  # same inputs: reused
    assert next(codes_dir.glob("trie-*.bin")) == first_trie

    codes = np.load(codes_dir / "codes.npy")
    codes[:, -1] = (codes[:, -1] + 1) % 3  # reassigned IDs (written as assign-codes writes them)
    np.save(codes_dir / "codes.npy", codes)
    _record_files(codes_dir)
    changed = evaluate(cfg, fake_models(cfg))
    cached = {(s.pool, s.query_file): s.cached for s in changed.stats}
    assert cached[("mbeir_shapes_task0_cand_pool", "mbeir_shapes_task0_test")] is False
    assert cached[("mbeir_shapes_task3_cand_pool", "mbeir_shapes_task3_test")] is True
    assert cached[("mbeir_union_test_cand_pool", "mbeir_shapes_task0_test")] is True
    assert [p.name for p in codes_dir.glob("trie-*.bin")] != [first_trie.name]  # rebuilt, old one removed
    assert len(list(codes_dir.glob("trie-*.bin"))) == 1
    decoded = np.load(Path(cfg.paths.results) / "decoded" / "mbeir_shapes_task0_cand_pool" / "mbeir_shapes_task0_test"
                      / "codes.npy")
    valid = decoded[..., 0] >= 0
    assert {tuple(c) for c in decoded[valid]} <= {tuple(c) for c in codes}  # decoded under the new trie

    regenerated = evaluate(cfg, fake_models(cfg, generator_fp="other-gen"))
    assert not any(s.cached for s in regenerated.stats)


def test_decode_cache_key_records_the_device_and_the_precisions_used(monkeypatch):
    """A decoding made on a CPU (bf16 autocast) is never reused by a GPU run (fp16) or an fp32 run;
    an int8 one with 63 levels (CPUs without VNNI) never by one with 127, nor one of the earlier
    int8 products (one range per matrix) by these; a bf16 one whose head summed bf16 inputs (torch
    with MKL) never by one with the fp32 head."""
    from genius.models.generative_retriever import fused_decoder

    monkeypatch.setattr(fused_decoder, "int8_levels", lambda: 127)
    monkeypatch.setattr(fused_decoder, "_mkl_bf16_gemm", lambda: "MKL's bf16 GEMM")
    monkeypatch.setattr(fused_decoder, "cpu_vendor", lambda: "GenuineIntel")  # MKL's bf16 head runs on Intel CPUs
    cfg = EvalConfig()
    models = SimpleNamespace(fingerprints={"rq": "r", "generator": "g"})
    pool = SimpleNamespace(decoding=SimpleNamespace(codes_hash="c", path=Path("trie-0.bin")))
    queries = SimpleNamespace(content_id="q")

    def key(device: str, autocast: bool, combiner_autocast: bool = False) -> dict:
        cfg.decoding.autocast, cfg.decoding.combiner_autocast = autocast, combiner_autocast
        return decode_key(cfg, models, pool, queries, torch.device(device))

    cpu = key("cpu", autocast=True)
    assert (cpu["device"], cpu["generator_dtype"], cpu["combiner_dtype"]) == ("cpu", "bfloat16", "float32")
    assert cpu["head"] == "bf16 inputs, fp32 sums" and "head" not in key("cpu", autocast=False)
    assert key("cpu", autocast=False)["generator_dtype"] == "float32"
    gpu = key("cuda", autocast=True, combiner_autocast=True)  # building the key does not touch a GPU
    assert (gpu["device"], gpu["generator_dtype"], gpu["combiner_dtype"]) == ("cuda", "float16", "float16")
    assert "head" not in gpu
    monkeypatch.setattr(fused_decoder, "_mkl_bf16_gemm", lambda: None)  # a torch without MKL: the fp32 head
    assert key("cpu", autocast=True) == {k: v for k, v in cpu.items() if k != "head"}
    assert len({json.dumps(k, sort_keys=True) for k in (cpu, key("cpu", autocast=False), gpu)}) == 3
    assert "batching" not in cpu  # fp32 and autocast beams do not depend on the batching
    cfg.decoding.int8 = True
    int8 = key("cpu", autocast=False)
    assert int8["generator_dtype"] == "int8" and int8["batching"] == {"batch_size": 64, "processes": 1}
    assert int8.pop("int8_products") == "rows quantized one by one, 127 levels"  # not the earlier fbgemm keys'
    assert "head" not in int8 and {k: v for k, v in int8.items() if k not in ("generator_dtype", "batching")} == {
        k: v for k, v in cpu.items() if k not in ("generator_dtype", "head")}
    cfg.decoding.batch_size = 32  # int8 beams depend on the batches, so another batching decodes afresh
    assert key("cpu", autocast=False)["batching"]["batch_size"] == 32
    monkeypatch.setattr(fused_decoder, "int8_levels", lambda: 63)
    seven_bits = key("cpu", autocast=False)
    assert seven_bits.pop("int8_products") == "rows quantized one by one, 63 levels"
    assert seven_bits == {**int8, "batching": seven_bits["batching"]}


def test_decode_cache_key_records_diverse_beams_and_keeps_old_keys_without_them():
    """A sibling-penalty decoding is never reused for plain beams; at 0 the key is the one written
    before the option existed (no entry), so earlier cached decodings stay valid."""
    cfg = EvalConfig()
    models = SimpleNamespace(fingerprints={"rq": "r", "generator": "g"})
    pool = SimpleNamespace(decoding=SimpleNamespace(codes_hash="c", path=Path("trie-0.bin")))
    queries = SimpleNamespace(content_id="q")
    plain = decode_key(cfg, models, pool, queries, torch.device("cpu"))
    cfg.decoding.sibling_penalty = 0.5
    diverse = decode_key(cfg, models, pool, queries, torch.device("cpu"))
    assert "sibling_penalty" not in plain and diverse["sibling_penalty"] == 0.5
    assert {k: v for k, v in diverse.items() if k != "sibling_penalty"} == plain


def test_stale_or_mismatched_inputs_are_refused(tmp_path):
    """... before the previous results are set aside: they stay where they were."""
    cfg = make_world(tmp_path)
    evaluate(cfg, fake_models(cfg))
    results = resolve_path(cfg.paths.results)
    assert (results / "results.md").is_file()
    models = fake_models(cfg)
    models.fingerprints["rq"] = "another-rq"  # the codes were assigned with "fake-rq"
    with pytest.raises(StaleInputError, match="assigned with the quantizer of"):
        evaluate(cfg, models)
    assert (results / "results.md").is_file() and not (results / "stale").exists()
    cfg.files = [EvalFile("query/test/missing.jsonl", "cand_pool/local/x.jsonl", "qrels/test/x.txt")]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        evaluate(cfg, fake_models(cfg))


def test_eval_config_is_strict(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("trie_backend: triecpp\n")
    with pytest.raises(ConfigError, match="'cpp', 'python', 'marisa'"):
        load_config(EvalConfig, path)
    path.write_text("task_specific: false\nunion: false\n")
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        load_config(EvalConfig, path)
    path.write_text("decoding: {int8: true, autocast: true}\n")
    with pytest.raises(ConfigError, match="decoding.int8 and decoding.autocast are both true"):
        load_config(EvalConfig, path)
    with pytest.raises(ConfigError, match="decoding.int8: int8 decoding runs on a CPU only"):
        check_int8_device(torch.device("cuda"))  # checked once the device is known, before any work
    repo = Path(__file__).resolve().parent.parent / "configs_scripts"
    for setting in ("tiny", "demo", "large"):
        cfg = load_config(EvalConfig, repo / setting / "eval.yaml")
        assert cfg.paths.results == f"results/{setting}"
    large = load_config(EvalConfig, repo / "large" / "eval.yaml")
    assert len(large.files) == 16 and large.decoding.num_beams == 50 and large.rerank and large.union
    assert {f.k for f in large.files if "fashion" in f.queries} == {None}  # 10 by default for both Fashion sets


def test_eval_config_takes_a_native_run_or_an_official_checkpoint(tmp_path):
    path = tmp_path / "eval.yaml"
    for text, message in (("paths: {rq_run: a, gen_run: b, official_checkpoint: c.pth, codes: d}\n", "not both"),
                          ("paths: {official_checkpoint: c.pth}\n", "paths.codes is required"),
                          ("paths: {rq_run: a}\n", "set rq_run and gen_run")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(EvalConfig, path)
    path.write_text("paths: {official_checkpoint: c.pth, codes: d}\n")
    cfg = load_config(EvalConfig, path)
    assert cfg.codes_root().name == "d" and [p.name for p in checkpoint_files(cfg.paths)] == ["c.pth"]
    path.write_text("paths: {rq_run: a, gen_run: b}\n")
    assert load_config(EvalConfig, path).codes_root().parts[-2:] == ("a", "codes")


def test_paper_settings_decode_like_the_official_code():
    """Every YAML that claims paper settings: 50 beams, full-vocabulary normalisation, re-ranking,
    fp16 autocast of the generator and of the Combiner on both sides, task-specific files decoded
    under the universal pool's trie, as the official evaluation."""
    from genius.models.residual_quantization.assign_codes import AssignCodesConfig

    large = Path(__file__).resolve().parent.parent / "configs_scripts" / "large"
    native, official = (load_config(EvalConfig, large / name) for name in ("eval.yaml", "eval_official.yaml"))
    for cfg in (native, official):
        dec = cfg.decoding
        assert (dec.num_beams, dec.level_head, dec.modality_threshold, dec.sibling_penalty) == (50, False, 0.0, 0.0)
        assert dec.autocast and dec.combiner_autocast and cfg.rerank and cfg.union and len(cfg.files) == 16
        assert dec.task_specific_trie == "union"
    assert native.files == official.files and native.extra_ks == official.extra_ks
    codes, official_codes = (load_config(AssignCodesConfig, large / name)
                             for name in ("assign_codes.yaml", "assign_codes_official.yaml"))
    assert codes.autocast and official_codes.autocast and codes.pools == official_codes.pools
    assert official.paths.official_checkpoint == official_codes.rq_path == "checkpoint/GENIUS_t5small.pth"
    assert official.paths.codes == official_codes.out_dir and official.paths.rq_run is None
    assert native.paths.codes is None and codes.out_dir == f"{native.paths.rq_run}/codes"
    script = (large / "run_eval_official.sh").read_text()
    assert "assign_codes_official.yaml" in script and "eval_official.yaml" in script
    # fp16 autocast of the Combiner is a CUDA-only setting: on the CPU it stays fp32 (and is keyed so)
    from genius.models.residual_quantization.assign_codes import combiner_dtype

    assert combiner_dtype(torch.device("cuda"), True) == "float16"
    assert combiner_dtype(torch.device("cpu"), True) == combiner_dtype(torch.device("cuda"), False) == "float32"


def test_two_process_decoding_equals_one_process(tmp_path):
    """torchrun-style sharded decoding (gloo, 2 ranks) gathers exactly the single-process rows."""
    import os
    import socket
    import subprocess
    import sys

    from genius.common.config import save_config

    cfg = make_world(tmp_path)
    cfg.dense = False
    single = evaluate(cfg, fake_models(cfg))
    cfg.paths.results = str(tmp_path / "results_2proc")
    save_config(cfg, tmp_path / "eval.yaml")
    script = ("import importlib.util, sys\n"
              "from genius.common.config import load_config\n"
              f"spec = importlib.util.spec_from_file_location('evaluate_tests', {str(Path(__file__))!r})\n"
              "tests = importlib.util.module_from_spec(spec); spec.loader.exec_module(tests)\n"
              "cfg = load_config(tests.EvalConfig, sys.argv[1])\n"
              "tests.evaluate(cfg, tests.fake_models(cfg))\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "eval.yaml")],
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                                   "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    for proc in procs:
        output = proc.communicate(timeout=180)[0].decode()
        assert proc.returncode == 0, output
    one, two = Path(single.out_dir), Path(cfg.paths.results)
    for decoded in (one / "decoded").glob("*/*"):
        other = two / "decoded" / decoded.relative_to(one / "decoded")
        for name in ("codes.npy", "scores.npy", "valid.npy"):
            np.testing.assert_array_equal(np.load(decoded / name), np.load(other / name))
        assert json.loads((other / "meta.json").read_text())["processes"] == 2
    assert (one / "results.tsv").read_text() == (two / "results.tsv").read_text()


# ---- positives outside the pool, validation ------------------------------------------------
def test_positives_missing_from_the_pool_are_an_error_or_counted(tmp_path):
    cfg = make_world(tmp_path)
    cfg.dense = cfg.rerank = False
    qrels = Path(cfg.paths.data_root) / "qrels" / "test" / "mbeir_shapes_task0_test_qrels.txt"
    lines = qrels.read_text().splitlines()
    lines[3] = "20:4 0 20:999 1 0"  # query 20:4's only positive is now outside both pools
    qrels.write_text("\n".join(lines + ["20:5 0 20:998 1 0"]) + "\n")  # 20:5 keeps its other positive
    with pytest.raises(ValueError, match=rf"{qrels}:4: qrels positive 20:999 of query 20:4 is not in the evaluated "
                                         r"pool .*mbeir_shapes_task0_cand_pool.jsonl \(2 of the file's 31 positives"):
        evaluate(cfg, fake_models(cfg))

    cfg.missing_positives = "keep"  # M-BEIR's protocol: 20:4 scores a miss
    kept = evaluate(cfg, fake_models(cfg))
    cfg.missing_positives = "exclude"  # 20:4 leaves the scores
    excluded = evaluate(cfg, fake_models(cfg))
    out = Path(cfg.paths.results)
    summary = json.loads((out / "metrics.json").read_text())["positives_not_in_pool"]
    assert {(s["pool"], s["qrels_positives_not_in_pool"], s["queries_excluded"]) for s in summary} == {
        ("mbeir_shapes_task0_cand_pool", 2, 1), ("mbeir_union_test_cand_pool", 2, 1)}
    assert "2 of 31 qrels positives and 0 of 30 pos_cand_list entries are not in the pool; excluded, with 1 " \
           "queries" in (out / "results.md").read_text()
    assert "counted as not retrieved" in kept.markdown

    def recall(report, pool_kind):
        return next(r.value for r in report.results if r.reported and r.pool_kind == pool_kind and r.task_id == 0)

    for pool_kind in ("task-specific", "universal"):
        hits = recall(kept, pool_kind) * SCENES  # 20:4 counted as a miss among 30 queries
        assert recall(excluded, pool_kind) == pytest.approx(hits / (SCENES - 1))


def test_a_query_files_positive_missing_from_the_pool_names_its_line(tmp_path):
    cfg = make_world(tmp_path)
    queries = Path(cfg.paths.data_root) / "query" / "test" / "mbeir_shapes_task3_test.jsonl"
    rows = [json.loads(line) for line in queries.read_text().splitlines()]
    rows[6]["pos_cand_list"].append("20:1999")
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"{queries}:7: pos_cand_list entry 20:1999 of query 20:1007 is not in the "
                                         r"evaluated pool .*\(1 of the file's 31 entries are not, and 0 queries"):
        evaluate(cfg, fake_models(cfg))


def test_every_number_is_range_checked_before_any_work(tmp_path):
    """(Every key, through ``genius eval``: tests/test_reliability_eval.py.)"""
    cfg = make_world(tmp_path)
    cfg.decoding.modality_threshold = 1.5
    with pytest.raises(ValueError, match=r"decoding.modality_threshold: 1.5 is out of range; it must be a number in "
                                         r"\[0, 1\]"):
        evaluate(cfg, fake_models(cfg))
    cfg.decoding.modality_threshold = 0.0
    cfg.files = [EvalFile("q.jsonl", "p.jsonl", "r.txt", k=0)]
    with pytest.raises(ValueError, match=r"files\[0\].k: 0 is out of range"):
        evaluate(cfg, fake_models(cfg))
    assert not Path(cfg.paths.results).exists()
