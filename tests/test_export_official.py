"""The official checkpoint layout both ways: ``genius export-official`` and evaluating official files.

A tiny native run (learned modality level, a generator trained for a few steps on the synthetic
world of test_evaluate) is evaluated natively, exported to rq_clip_large.pth / GENIUS_t5small.pth,
and evaluated again through the official path (assign-codes from the exported file, eval with
``paths.official_checkpoint``): every table row, run file and decoded beam is identical. Also: the
exported names, shapes, dtypes and aliasing are the published layout's (paper shapes, meta
device), export -> official loaders is bit-identical, and mismatched inputs are refused by name.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genius.common.config import save_config
from genius.common.store import EmbeddingStore, store_path
from genius.models.generative_retriever import evaluate as evaluate_mod
from genius.models.generative_retriever import export_official
from genius.models.generative_retriever import official as gen_official
from genius.models.generative_retriever.evaluate import evaluate
from genius.models.generative_retriever.pool_assets import load_codes
from genius.models.generative_retriever.run_models import StaleInputError
from genius.models.generative_retriever.generator import IDGenerator, load_generator, make_arch, save_generator
from genius.models.generative_retriever.vocab import codes_to_tokens
from genius.models.residual_quantization import assign_codes
from genius.models.residual_quantization import official as rq_official
from genius.models.residual_quantization.model import RQModel, load_rq, rq_fingerprint, save_rq

# pytest runs with --import-mode=importlib, which leaves tests/ off sys.path; the synthetic world
# is test_evaluate's.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_evaluate import DIM, ENCODER, make_world  # noqa: E402

PAPER_RQ = {"dim": 768, "proj_dim": 2560, "hidden_dim": 5120, "num_levels": 9, "codebook_size": 4096,
            "modality_mode": "learned", "decay": 0.9, "eps": 1e-5, "dead_code_threshold": 2.0}
POOLS = ("mbeir_shapes_task0_cand_pool", "mbeir_shapes_task3_cand_pool", "mbeir_union_test_cand_pool")


# ---- a tiny native run ------------------------------------------------------------------------
def _store_arrays(cfg, split: str, relative: str):
    source = Path(cfg.paths.data_root) / relative
    return EmbeddingStore.open(store_path(cfg.paths.stores_root, ENCODER, split, source)).arrays


def _z(rq: RQModel, arrays) -> torch.Tensor:
    def t(name):
        return torch.from_numpy(np.asarray(getattr(arrays, name), dtype=np.float32))

    with torch.no_grad():
        return rq.embed(t("img"), t("txt"), t("img_mask"), t("txt_mask"))


def train_rq(cfg, out: Path, mode: str = "learned", seed: int = 0) -> Path:
    """k-means initialisation, then a few EMA steps in training mode (so every buffer is non-trivial)."""
    torch.manual_seed(seed)
    rq = RQModel(DIM, 16, 16, num_levels=3, codebook_size=4, modality_mode=mode)
    union = _store_arrays(cfg, "cand", cfg.paths.union_pool)
    modality = torch.from_numpy(np.asarray(union.modality, dtype=np.int64))
    z = _z(rq, union)
    rq.quantizer.initialise(z, modality, kmeans_iters=20, generator=torch.Generator().manual_seed(seed))
    rq.train()
    with torch.no_grad():
        for rows in torch.randperm(len(z)).split(20):
            rq.quantizer(z[rows], modality[rows])
    save_rq(out / "rq.pt", rq.eval(), config={"train": {"epochs": 3}}, inputs={})
    return out / "rq.pt"


def train_generator(cfg, rq_path: Path, out: Path, steps: int = 60) -> Path:
    """Teacher-forced steps mapping each test query to its positive's codes (the test world's
    query i of a task has candidate i of that task's pool as its positive)."""
    rq = load_rq(rq_path)
    torch.manual_seed(0)
    generator = IDGenerator(make_arch(DIM, rq.codebook_sizes, num_prefix=2, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                                      num_decoder_layers=1))
    generator.init_code_embeddings(rq.codebooks(), scale=15.0)
    queries, targets = [], []
    for task in (0, 3):
        queries.append(_z(rq, _store_arrays(cfg, "test", f"query/test/mbeir_shapes_task{task}_test.jsonl")))
        pool = f"cand_pool/local/mbeir_shapes_task{task}_cand_pool.jsonl"
        targets.append(rq.encode(_z(rq, _store_arrays(cfg, "cand", pool))))
    z, codes = torch.cat(queries), torch.cat(targets)
    tokens = codes_to_tokens(codes, rq.codebook_sizes)
    optimizer = torch.optim.Adam(generator.parameters(), lr=0.01)
    generator.train()
    for _ in range(steps):
        loss = F.cross_entropy(generator(z, codes).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out.mkdir(parents=True, exist_ok=True)
    save_generator(out / "generator.pt", generator.eval(), config={"train": {"epochs": 1}},
                   rq_fingerprint=rq_fingerprint(rq_path))
    return out / "generator.pt"


def assign(cfg, rq_path: Path, out_dir: Path, *extra: str) -> Path:
    """genius assign-codes over every candidate store of the world."""
    config = assign_codes.AssignCodesConfig(
        rq_path=str(rq_path), embed_dir=str(Path(cfg.paths.stores_root) / ENCODER / "cand"), encoder=ENCODER,
        out_dir=str(out_dir), device="cpu")
    save_config(config, out_dir.parent / f"{out_dir.name}.yaml")
    assert assign_codes.main(["--config", str(out_dir.parent / f"{out_dir.name}.yaml"), *extra]) == 0
    return out_dir


def official_config(native, checkpoint: Path, codes: Path, results: Path):
    cfg = copy.deepcopy(native)
    cfg.paths.rq_run = cfg.paths.gen_run = None
    cfg.paths.official_checkpoint, cfg.paths.codes, cfg.paths.results = str(checkpoint), str(codes), str(results)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    native = make_world(root)
    native.paths.rq_run, native.paths.gen_run = str(root / "run/rq"), str(root / "run/gen")
    native.paths.results = str(root / "results_native")
    native.decoding.num_beams, native.decoding.level_head = 6, False
    rq_path = train_rq(native, root / "run/rq")
    gen_path = train_generator(native, rq_path, root / "run/gen")
    assign(native, rq_path, root / "run/rq/codes")
    save_config(native, root / "eval_native.yaml")
    assert evaluate_mod.main(["--config", str(root / "eval_native.yaml")]) == 0

    export = root / "export"
    assert export_official.main(["--rq", str(rq_path), "--generator", str(gen_path), "--out", str(export)]) == 0
    # the official Combiner precision setting: fp16 autocast applies on CUDA only, so on CPU it stays fp32
    assign(native, export / "GENIUS_t5small.pth", root / "official_codes", "--set", "autocast=true")
    official = official_config(native, export / "GENIUS_t5small.pth", root / "official_codes", root / "results_official")
    official.decoding.combiner_autocast = True
    save_config(official, root / "eval_official.yaml")
    assert evaluate_mod.main(["--config", str(root / "eval_official.yaml")]) == 0
    return {"root": root, "native": native, "official": official, "rq": rq_path, "gen": gen_path, "export": export}


# ---- the official path gives the native results ------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_official_evaluation_of_an_export_equals_the_native_evaluation(runs):
    root = runs["root"]
    native, official = Path(runs["native"].paths.results), Path(runs["official"].paths.results)
    assert (native / "results.tsv").read_text() == (official / "results.tsv").read_text()
    tsv = (native / "results.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 3 * 2  # (method, query file) rows, each with its local and union value
    native_runs, official_runs = _files(native / "runs"), _files(official / "runs")
    assert len(native_runs) == 3 * 4 and native_runs == official_runs  # every run file, byte for byte
    for pool_dir in (native / "decoded").iterdir():
        for query_dir in pool_dir.iterdir():
            other = official / "decoded" / pool_dir.name / query_dir.name
            for name in ("codes.npy", "scores.npy", "valid.npy"):
                np.testing.assert_array_equal(np.load(query_dir / name), np.load(other / name))
    # one quantizer, one identity: the codes of rq.pt and of the exported file agree in every byte
    # and record the same fingerprint; on the CPU the autocast setting leaves the Combiner in fp32
    for pool in POOLS:
        ours, theirs = root / "run/rq/codes" / pool, root / "official_codes" / pool
        np.testing.assert_array_equal(np.load(ours / "codes.npy"), np.load(theirs / "codes.npy"))
        meta, official_meta = (json.loads((d / "meta.json").read_text()) for d in (ours, theirs))
        assert meta["rq"] == official_meta["rq"] and official_meta["modality_mode"] == "learned"
        assert official_meta["combiner_dtype"] == "float32" and official_meta["rq_path"].endswith("GENIUS_t5small.pth")
    manifest = json.loads((official / "run.json").read_text())
    assert manifest["checkpoints"] == {"rq": str(runs["export"] / "GENIUS_t5small.pth"),
                                       "generator": str(runs["export"] / "GENIUS_t5small.pth")}
    assert manifest["pools"]["mbeir_union_test_cand_pool"]["codes"] == str(root / "official_codes" /
                                                                           "mbeir_union_test_cand_pool")


def test_the_exported_quantizer_file_assigns_the_same_codes(runs):
    root = runs["root"]
    assign(runs["native"], runs["export"] / "rq_clip_large.pth", root / "rq_file_codes")
    for pool in POOLS:
        np.testing.assert_array_equal(np.load(root / "rq_file_codes" / pool / "codes.npy"),
                                      np.load(root / "official_codes" / pool / "codes.npy"))


def test_search_works_from_an_official_run_manifest(runs):
    from genius.models.generative_retriever.api import Retriever

    cfg = runs["native"]
    captions = np.load(store_path(cfg.paths.stores_root, ENCODER, "test", Path(cfg.paths.data_root) /
                                  "query/test/mbeir_shapes_task0_test.jsonl") / "txt.npy").astype(np.float32)

    class Encoder:  # stands in for the stage-0 encoder: "encodes" the caption of query 20:4
        dim = DIM

        def encode_texts(self, texts):
            return captions[3:4]

    hits = {kind: Retriever.load(runs[kind].paths.results, device="cpu", encoder=Encoder()).search(
                text="a caption", instruction="", k=5)
            for kind in ("native", "official")}  # the models come from each run's manifest
    assert hits["official"] == hits["native"] and len(hits["official"]) == 5


# ---- the files: layout, round trip ------------------------------------------------------------
@pytest.fixture(scope="module")
def layouts(shared_data):
    folder = shared_data / "official_checkpoint_layouts"
    if not (folder / "GENIUS_t5small.json").is_file():
        pytest.skip(f"{folder} has no layout files")
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in ("rq_clip_large", "GENIUS_t5small")}


def _check_layout(state: dict, layout: dict) -> None:
    assert list(state) == list(layout["tensors"])  # names, in the published order
    for name, entry in layout["tensors"].items():
        assert list(state[name].shape) == entry["shape"], name
        assert str(state[name].dtype).removeprefix("torch.") == entry["dtype"], name
        for alias in entry.get("same_tensor_as", []):
            assert state[alias] is state[name], (name, alias)  # one tensor, saved once


def test_exported_paper_shaped_state_dicts_have_the_published_layout(layouts):
    arch = make_arch(768, [3] + [4096] * 8)
    with torch.device("meta"):  # shapes only
        rq, generator = RQModel.from_arch(PAPER_RQ), IDGenerator(arch)
    rq_state = rq_official.to_official_state(rq.state_dict(), PAPER_RQ)
    _check_layout(rq_state, layouts["rq_clip_large"])
    _check_layout(gen_official.to_official_state(generator.state_dict(), rq.state_dict(), PAPER_RQ),
                  layouts["GENIUS_t5small"])


def test_exported_files_load_back_bit_identical_and_safely(runs):
    rq_file, gen_file = runs["export"] / "rq_clip_large.pth", runs["export"] / "GENIUS_t5small.pth"
    for path in (rq_file, gen_file):
        saved = torch.load(path, weights_only=True)  # plain data only: no pickled classes
        assert list(saved) == ["model", "config", "epoch"] and saved["epoch"] in (0, 2)
        assert saved["config"]["codebook_config"] == {"codebook_level": 2, "codebook_vocab": 4}
        state = saved["model"]
        prefix = "quantizer." if path == gen_file else ""
        for name in ("initted", "cluster_size", "embed_avg", "embed"):
            vq, level0 = state[f"{prefix}vq._codebook.{name}"], state[f"{prefix}residual_rq.layers.0._codebook.{name}"]
            assert vq.untyped_storage().data_ptr() == level0.untyped_storage().data_ptr()  # stored once
        assert state[f"{prefix}residual_rq.layers.1._codebook.initted"].shape == (1,)
        assert all(t.dtype == torch.float32 for t in state.values())
    state = torch.load(gen_file, weights_only=True)["model"]
    assert len({state[name].untyped_storage().data_ptr() for name in gen_official.TIED_EMBEDDINGS}) == 1

    native_rq, (native_gen, _) = load_rq(runs["rq"]), load_generator(runs["gen"])
    for loaded in (rq_official.load_official_rq(rq_file), rq_official.load_official_rq(gen_file),
                   gen_official.load_official_generator(gen_file)[1]):
        _assert_same_state(loaded.state_dict(), native_rq.state_dict())
    _assert_same_state(gen_official.load_official_generator(gen_file)[0].state_dict(), native_gen.state_dict())


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ---- what is refused --------------------------------------------------------------------------
def test_codes_of_another_quantizer_are_refused_naming_both_files(runs):
    root = runs["root"]
    other = train_rq(runs["native"], root / "other_rq", seed=1)
    assign(runs["native"], other, root / "other_codes")
    cfg = official_config(runs["native"], runs["export"] / "GENIUS_t5small.pth", root / "other_codes",
                          root / "results_other")
    with pytest.raises(StaleInputError, match=r"assigned with the quantizer of .*other_rq/rq\.pt, not the one of "
                                              r".*export/GENIUS_t5small\.pth.*re-run genius assign-codes"):
        evaluate(cfg)


def test_codes_the_generator_cannot_generate_are_refused(runs):
    root = runs["root"]
    assign(runs["native"], runs["export"] / "GENIUS_t5small.pth", root / "unique_codes", "--set", "unique_level=true")
    cfg = official_config(runs["native"], runs["export"] / "GENIUS_t5small.pth", root / "unique_codes",
                          root / "results_unique")
    with pytest.raises(StaleInputError, match=r"codebook sizes \[3, 4, 4, \d+\], the generator of "
                                              r".*GENIUS_t5small\.pth decodes \[3, 4, 4\]"):
        evaluate(cfg)


def test_assigned_modality_runs_are_refused_unless_allowed(runs, tmp_path, capsys, caplog):
    assigned = train_rq(runs["native"], tmp_path / "assigned", mode="assigned")
    with pytest.raises(SystemExit) as exit_info:
        export_official.main(["--rq", str(assigned), "--out", str(tmp_path / "export")])
    assert exit_info.value.code == 2 and not (tmp_path / "export").exists()
    message = capsys.readouterr().err
    assert "'assigned'-modality quantizer" in message and "--allow-assigned" in message
    with caplog.at_level(logging.WARNING):
        assert export_official.main(["--rq", str(assigned), "--out", str(tmp_path / "export"), "--allow-assigned"]) == 0
    assert "exporting anyway" in caplog.text
    # the export loads as a learned quantizer with the same state; the run's own (assigned) codes
    # are refused for it by modality mode, although the fingerprints agree
    assign(runs["native"], assigned, tmp_path / "assigned_codes")
    models = evaluate_mod.Models(None, None, {"rq": rq_official.quantizer_fingerprint(
        rq_official.load_official_rq(tmp_path / "export/rq_clip_large.pth")), "generator": "-"}, [3, 4, 4], "learned",
        {"rq": str(tmp_path / "export/rq_clip_large.pth")})
    store = EmbeddingStore.open(store_path(runs["native"].paths.stores_root, ENCODER, "cand",
                                           Path(runs["native"].paths.data_root) / runs["native"].paths.union_pool))
    with pytest.raises(StaleInputError, match="modality mode 'assigned'"):
        load_codes(tmp_path / "assigned_codes" / "mbeir_union_test_cand_pool", store, models)


def test_a_generator_of_another_quantizer_is_not_exported(runs, tmp_path):
    other = train_rq(runs["native"], tmp_path, seed=2)
    with pytest.raises(export_official.ExportError, match="trained on a different rq.pt"):
        export_official.export_official(other, tmp_path / "export", runs["gen"])
    assert not (tmp_path / "export").exists()  # nothing written before every check passed


def test_existing_files_are_replaced_only_when_asked(runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_official.main(["--rq", str(runs["rq"]), "--generator", str(runs["gen"]), "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        export_official.main(["--rq", str(runs["rq"]), "--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert export_official.main(["--rq", str(runs["rq"]), "--out", str(out), "--overwrite"]) == 0
    # a generator file of the earlier export is not left beside the new quantizer
    assert sorted(p.name for p in out.iterdir()) == ["rq_clip_large.pth"]


def test_irgen_shaped_runs_are_refused_naming_the_option(tmp_path):
    """IRGen's ID shape (no modality level) and its image-token decoder have no official layout."""
    rq = RQModel(dim=8, proj_dim=8, hidden_dim=8, num_levels=2, codebook_size=4, modality_mode="assigned",
                 modality_level=False)
    with pytest.raises(export_official.ExportError, match=r"no modality level \(model\.modality_level: false"):
        export_official.check_rq(rq, tmp_path / "rq.pt", allow_assigned=True)
    generator = IDGenerator(make_arch(8, [4, 4], num_prefix=2, d_model=8, num_heads=2, d_kv=4, d_ff=8,
                                      num_decoder_layers=1))
    generator.arch["condition"] = "image_tokens"  # the check reads the arch before any tensor
    with pytest.raises(export_official.ExportError, match=r"model\.condition 'image_tokens'"):
        export_official.check_generator(generator, generator.state_dict(), tmp_path / "generator.pt")
