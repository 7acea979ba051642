"""Stage 1 end to end on tiny structured features: genius train-rq and genius assign-codes.

The features imitate CLIP-SF output without stage 0: every candidate belongs to one of 12
semantic clusters; image vectors and text vectors of the same content share the semantic part
but sit around different offsets (the modality gap). Text queries ask for image candidates
(task 0), image queries for text candidates (task 3), text queries for image+text candidates
(task 2). Stores are written with genius.common.store.write_store.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from genius.common import cpu, fp_env
from genius.common.config import load_config
from genius.common.store import StoreArrays, write_store
from genius.models.residual_quantization import assign_codes, train
from genius.models.residual_quantization.model import load_rq, rq_fingerprint

DIM = 16
ENCODER = "synthetic"
CAND_MODALITY_TASK = {0: (1, 0), 1: (0, 3), 2: (1, 2)}  # candidate modality -> (query modality, task)
MODALITY_NAMES = ("image", "text", "image,text")



def _vectors(semantic: np.ndarray, gap: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    return (semantic + gap + noise * rng.standard_normal(semantic.shape)).astype(np.float32)


def make_world(root: Path, num_items: int = 384, seed: int = 0) -> dict:
    """Query/candidate jsonl + stores with cluster structure and a modality gap; returns paths."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, DIM))
    cluster = rng.integers(0, 12, num_items)
    semantic = centres[cluster] + 0.35 * rng.standard_normal((num_items, DIM))
    gap = {"img": 1.5 * rng.standard_normal(DIM), "txt": 1.5 * rng.standard_normal(DIM)}
    cand_modality = np.arange(num_items) % 3
    query_modality = np.array([CAND_MODALITY_TASK[m][0] for m in cand_modality])

    def side(modality: np.ndarray, noise: float) -> dict:
        img_mask = (modality != 1).astype(np.uint8)
        txt_mask = (modality != 0).astype(np.uint8)
        return {"img": _vectors(semantic, gap["img"], rng, noise) * img_mask[:, None],
                "txt": _vectors(semantic, gap["txt"], rng, noise) * txt_mask[:, None],
                "img_mask": img_mask, "txt_mask": txt_mask}

    dids = [f"20:{i}" for i in range(num_items)]
    pool_file, query_file = root / "pool.jsonl", root / "queries.jsonl"
    with open(pool_file, "w") as f:
        for i, did in enumerate(dids):
            m = MODALITY_NAMES[cand_modality[i]]
            f.write(json.dumps({"did": did, "modality": m, "txt": "caption" if "text" in m else "",
                                "img_path": "img.png" if "image" in m else None}) + "\n")
    with open(query_file, "w") as f:
        for i, did in enumerate(dids):
            m = MODALITY_NAMES[query_modality[i]]
            f.write(json.dumps({"qid": f"20:{i}", "query_modality": m, "query_txt": "a query" if "text" in m else "",
                                "query_img_path": "q.png" if "image" in m else None, "pos_cand_list": [did],
                                "neg_cand_list": [], "task_id": CAND_MODALITY_TASK[cand_modality[i]][1]}) + "\n")
    cand = side(cand_modality, 0.05)
    query = side(query_modality, 0.15)
    paths = {"query_file": query_file, "pool_file": pool_file, "query_store": root / "embed" / "train" / "queries",
             "pool_store": root / "embed" / "train" / "pool", "cand_dir": root / "embed" / "cand"}
    write_store(paths["query_store"], StoreArrays(
        ids=np.array([20 * 500_000 + i for i in range(num_items)]), modality=query_modality,
        target_modality=cand_modality, **query), encoder=ENCODER, kind="query", source=query_file)
    pool_arrays = StoreArrays(ids=np.array([20 * 10_000_000 + i for i in range(num_items)]), modality=cand_modality,
                              target_modality=cand_modality, **cand)
    write_store(paths["pool_store"], pool_arrays, encoder=ENCODER, kind="candidate", source=pool_file)
    # evaluation pools: two "local" pools and their union
    half = num_items // 2
    pools = {"mbeir_a_task0_cand_pool": np.arange(half), "mbeir_b_task3_cand_pool": np.arange(half, num_items),
             "mbeir_union_test_cand_pool": np.arange(num_items)}
    for name, rows in pools.items():
        write_store(paths["cand_dir"] / name, pool_arrays.take(rows), encoder=ENCODER, kind="candidate", source=pool_file)
    return paths


def write_configs(root: Path, world: dict, out: str = "rq", **train_overrides) -> tuple[Path, Path]:
    train_cfg = {
        "data": {k: str(world[k]) for k in ("query_file", "pool_file", "query_store", "pool_store")} | {"encoder": ENCODER},
        "model": {"proj_dim": 32, "hidden_dim": 64, "num_levels": 3, "codebook_size": 16},
        "train": {"batch_size": 32, "epochs": 6, "lr": 1e-3, "min_lr": 1e-4, "kmeans_iters": 20,
                  "kmeans_init_vectors": 256, "save_every": 2, "log_every": 1, "device": "cpu", **train_overrides},
        "out_dir": str(root / out),
    }
    assign_cfg = {"rq_path": str(root / out / "rq.pt"), "embed_dir": str(world["cand_dir"]), "encoder": ENCODER,
                  "out_dir": str(root / out / "codes"), "batch_size": 100, "device": "cpu"}
    paths = root / f"train_{out}.yaml", root / f"assign_{out}.yaml"
    paths[0].write_text(yaml.safe_dump(train_cfg))
    paths[1].write_text(yaml.safe_dump(assign_cfg))
    return paths


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run and code assignment shared by the tests below."""
    root = tmp_path_factory.mktemp("rq")
    world = make_world(root)
    train_yaml, assign_yaml = write_configs(root, world)
    assert train.main(["--config", str(train_yaml)]) == 0
    assert assign_codes.main(["--config", str(assign_yaml)]) == 0
    return root, world, train_yaml, assign_yaml


# ---- training and codes ---------------------------------------------------------------------
def test_training_writes_the_contracted_outputs(trained):
    root, world, train_yaml, _ = trained
    run = root / "rq"
    model = load_rq(run / "rq.pt")
    assert model.codebook_sizes == [3, 16, 16] and model.arch["dim"] == DIM and not model.training
    assert len(rq_fingerprint(run / "rq.pt")) == 64
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_0002.pt", "epoch_0004.pt", "epoch_0006.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("epoch_summary")]
    assert len(epochs) == 6
    for key in ("loss", "contrastive", "mse", "commit", "perplexity", "codes_used", "modality_accuracy", "prefix_match"):
        assert key in epochs[-1]
    assert epochs[-1]["modality_accuracy"] == 1.0  # assigned mode: target modality == positive's modality
    assert epochs[-1]["contrastive"] < epochs[0]["contrastive"]
    steps = [r for r in records if "step" in r]
    assert steps[-1]["lr"] < steps[0]["lr"]


def test_level0_is_the_modality_of_every_candidate(trained):
    root, world, _, _ = trained
    for pool in ("mbeir_a_task0_cand_pool", "mbeir_b_task3_cand_pool", "mbeir_union_test_cand_pool"):
        out = root / "rq" / "codes" / pool
        codes, ids = np.load(out / "codes.npy"), np.load(out / "ids.npy")
        modality = np.load(world["cand_dir"] / pool / "modality.npy")
        assert codes.dtype == np.int64 and codes.shape == (len(ids), 3)
        assert np.array_equal(ids, np.load(world["cand_dir"] / pool / "ids.npy"))
        assert (codes[:, 0] == modality).mean() == 1.0
        stats = json.loads((out / "stats.json").read_text())
        assert stats["level0_matches_modality"] == 1.0
        meta = json.loads((out / "meta.json").read_text())
        assert meta["rq"] == rq_fingerprint(root / "rq" / "rq.pt") and meta["codebook_sizes"] == [3, 16, 16]


def test_query_and_positive_share_their_level1_code_far_above_chance(trained):
    """Chance is the agreement of independent codes with the observed marginals, sum_k p_q(k) p_c(k)
    (>= 1/16 here); a trained quantizer must beat it 5-fold, i.e. it maps a query and its
    positive to the same first semantic code, not merely to popular codes."""
    root, world, _, _ = trained
    model = load_rq(root / "rq" / "rq.pt")
    codes = {}
    for side, store in (("q", "query_store"), ("c", "pool_store")):
        a = {name: torch.from_numpy(np.load(world[store] / f"{name}.npy").astype(np.float32))
             for name in ("img", "txt", "img_mask", "txt_mask")}
        level0 = torch.from_numpy(np.load(world[store] / "target_modality.npy").astype(np.int64))
        codes[side] = model.encode(model.embed(a["img"], a["txt"], a["img_mask"], a["txt_mask"]), level0).numpy()
    agreement = (codes["q"][:, 1] == codes["c"][:, 1]).mean()
    p_q, p_c = (np.bincount(codes[s][:, 1], minlength=16) / len(codes[s]) for s in ("q", "c"))
    chance = float(p_q @ p_c)
    full_id = (codes["q"] == codes["c"]).all(1).mean()
    print(f"level-1 agreement {agreement:.3f}, chance {chance:.3f} (1/K = {1 / 16:.3f}), full-ID agreement {full_id:.3f}")
    assert agreement > 5 * max(chance, 1 / 16)


def test_collision_statistics_are_reported(trained):
    root, _, _, _ = trained
    stats = json.loads((root / "rq" / "codes" / "mbeir_union_test_cand_pool" / "stats.json").read_text())
    codes = np.load(root / "rq" / "codes" / "mbeir_union_test_cand_pool" / "codes.npy")
    _, counts = np.unique(codes, axis=0, return_counts=True)
    print("union pool stats:", json.dumps(stats))
    assert stats["num_candidates"] == 384
    assert stats["distinct_ids"] == len(counts) and stats["largest_bucket"] == counts.max()
    assert stats["collision_rate"] == pytest.approx(counts[counts > 1].sum() / 384)
    assert stats["codes_used_per_level"][0] == 3 and len(stats["perplexity_per_level"]) == 3
    errors = stats["quantization_error_per_level"]
    assert errors[-1] == pytest.approx(stats["mean_quantization_error"]) and errors[-1] < errors[0]


def test_assign_codes_skips_up_to_date_pools_and_recomputes_stale_ones(trained, caplog):
    root, world, _, assign_yaml = trained
    codes_file = root / "rq" / "codes" / "mbeir_a_task0_cand_pool" / "codes.npy"
    before = codes_file.stat().st_mtime_ns
    assign_codes.main(["--config", str(assign_yaml)])
    assert codes_file.stat().st_mtime_ns == before
    # an extra disambiguating level is a different request: recomputed, every ID unique
    assign_codes.main(["--config", str(assign_yaml), "--set", "unique_level=true",
                       "--set", f"out_dir={root / 'unique_codes'}"])
    out = root / "unique_codes" / "mbeir_union_test_cand_pool"
    codes, stats = np.load(out / "codes.npy"), json.loads((out / "stats.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert codes.shape[1] == 4 and len(np.unique(codes, axis=0)) == len(codes)
    assert meta["codebook_sizes"] == [3, 16, 16, stats["largest_bucket"]] and codes[:, 3].max() < stats["largest_bucket"]
    # a re-extracted store (other vectors: another content id) makes its codes stale
    store = world["cand_dir"] / "mbeir_a_task0_cand_pool"
    arrays = {name: np.load(store / f"{name}.npy") for name in
              ("ids", "img", "txt", "img_mask", "txt_mask", "modality", "target_modality")}
    arrays["img"][0] += 1
    write_store(store, StoreArrays(**arrays), encoder=ENCODER, kind="candidate", source=world["pool_file"])
    assign_codes.main(["--config", str(assign_yaml)])
    assert codes_file.stat().st_mtime_ns != before


def test_assign_codes_takes_its_threads_from_the_policy_or_the_config(trained, monkeypatch):
    """On a CPU, assign-codes hands its threads to the thread policy, sized by a batch through the
    Combiner's widest layer; ``cpu_threads`` pins them instead (and is not part of the run key)."""
    from genius.common import distributed

    root, _, _, assign_yaml = trained
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    started = []
    monkeypatch.setattr(distributed, "start_thread_policy", started.append)
    before = torch.get_num_threads()
    try:
        assert assign_codes.main(["--config", str(assign_yaml), "--set", "force=true"]) == 0
        model = load_rq(root / "rq" / "rq.pt")
        widest = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert [p.op_macs for p in started if p is not None] == [100 * widest]  # batch_size 100
        started.clear()
        codes = root / "rq" / "codes" / "mbeir_a_task0_cand_pool" / "codes.npy"
        written = codes.stat().st_mtime_ns
        assert assign_codes.main(["--config", str(assign_yaml), "--set", "cpu_threads=1"]) == 0
        assert not any(started) and torch.get_num_threads() == 1  # no policy started: pinned
        assert codes.stat().st_mtime_ns == written  # pinning threads does not redo finished codes
    finally:
        torch.set_num_threads(before)


def test_a_finished_run_is_not_retrained_and_a_changed_config_starts_afresh(trained, tmp_path):
    root, world, train_yaml, _ = trained
    rq = root / "rq" / "rq.pt"
    before = rq.stat().st_mtime_ns
    assert train.main(["--config", str(train_yaml)]) == 0
    assert rq.stat().st_mtime_ns == before
    # a different epoch count is a different run: the old one is archived, not overwritten
    assert train.main(["--config", str(train_yaml), "--set", "train.epochs=2", "--set", "train.kmeans_iters=2"]) == 0
    stale = list((root / "rq" / "stale").iterdir())
    assert len(stale) == 1 and (stale[0] / "rq.pt").is_file()
    assert sorted(p.name for p in (root / "rq" / "checkpoints").iterdir()) == ["epoch_0002.pt"]


# ---- resume ---------------------------------------------------------------------------------
OFFICIAL_OPTIONS = ["model.modality_mode=learned", "model.gradient_estimator=rotation", "train.positives=fixed",
                    "train.kmeans_seeds=random_rows", "train.contrastive_gather=local_only"]


@pytest.mark.parametrize("options", [[], OFFICIAL_OPTIONS], ids=["ours", "official"])
def test_interrupted_and_resumed_training_matches_an_uninterrupted_run(tmp_path, options):
    """Stopping after 2 of 3 epochs (checkpoint only) and re-running must give the same final
    weights and codebooks as one uninterrupted run: every piece of state is in the checkpoint.
    On CPU the runs are deterministic, so the tolerance is zero."""
    world = make_world(tmp_path, num_items=192)
    straight, _ = write_configs(tmp_path, world, out="straight", epochs=3, save_every=1, batch_size=32)
    resumed, _ = write_configs(tmp_path, world, out="resumed", epochs=3, save_every=1, batch_size=32)
    sets = [arg for option in options for arg in ("--set", option)]
    assert train.main(["--config", str(straight), *sets]) == 0
    assert train.main(["--config", str(resumed), *sets, "--set", "train.stop_after_epochs=2"]) == 0
    assert not (tmp_path / "resumed" / "rq.pt").exists()
    assert train.main(["--config", str(resumed), *sets]) == 0
    a, b = load_state(tmp_path / "straight" / "rq.pt"), load_state(tmp_path / "resumed" / "rq.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_learned_modality_mode_trains_and_encodes_without_modalities(tmp_path):
    """The official variant: level 0 is a 3-code k-means/EMA codebook; modality accuracy is then
    a real measurement, not 1 by construction."""
    world = make_world(tmp_path, num_items=96)
    train_yaml, _ = write_configs(tmp_path, world, epochs=2)
    assert train.main(["--config", str(train_yaml), "--set", "model.modality_mode=learned"]) == 0
    model = load_rq(tmp_path / "rq" / "rq.pt")
    assert model.arch["modality_mode"] == "learned"
    assert model.encode(torch.nn.functional.normalize(torch.randn(4, DIM), dim=-1)).shape == (4, 3)
    summary = [json.loads(line) for line in (tmp_path / "rq" / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= summary["modality_accuracy"] <= 1


def test_training_steps_run_with_subnormals_flushed_and_fp32_products_in_onednn_where_wanted(
        tmp_path, record_subnormal_mode, record_fp32_library, monkeypatch):
    world = make_world(tmp_path, num_items=96)
    train_yaml, _ = write_configs(tmp_path, world, epochs=1)
    before = torch.backends.mkldnn.matmul.fp32_precision
    flushing = record_subnormal_mode(train, "optimise")
    library = record_fp32_library(train, "optimise")
    monkeypatch.setattr(cpu, "onednn_fp32_on", lambda: True)  # as on an AMD CPU with AVX-512
    assert train.main(["--config", str(train_yaml)]) == 0
    assert flushing and all(flushing)
    assert library and set(library) == {"bf16"}  # torch's switch that sends fp32 products to oneDNN
    assert fp_env.flushing_threads() == 0 and torch.backends.mkldnn.matmul.fp32_precision == before  # given back


def test_a_non_finite_loss_stops_training_with_a_clear_message(tmp_path):
    world = make_world(tmp_path, num_items=96)
    img = np.load(world["query_store"] / "img.npy")
    img[5, 0] = np.inf
    arrays = {name: np.load(world["query_store"] / f"{name}.npy") for name in
              ("ids", "txt", "img_mask", "txt_mask", "modality", "target_modality")}
    write_store(world["query_store"], StoreArrays(img=img, **arrays), encoder=ENCODER, kind="query",
                source=world["query_file"])
    train_yaml, _ = write_configs(tmp_path, world, batch_size=32)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 0"):
        train.train(load_config(train.RQTrainConfig, train_yaml))


def test_a_training_step_reads_device_values_a_fixed_few_times_whatever_the_number_of_levels(tmp_path):
    """On a GPU every read of a device value stalls the step. Counted on the CPU (tests/host_syncs.py),
    4 reads per step for 2 levels as for 6: the finite check, the quantizer's initialised check,
    the dead-code counts of all levels (3 syncs), and the check of the level-0 modality codes,
    which stay on the host. A log step adds 1."""
    from genius.common.distributed import init_distributed
    from genius.common.pairs import iterate_batches

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host_syncs import count_host_syncs

    world = make_world(tmp_path, num_items=96)
    train_yaml, _ = write_configs(tmp_path, world, batch_size=16)
    info = init_distributed("cpu")
    for levels in (2, 6):
        cfg = load_config(train.RQTrainConfig, train_yaml, [f"model.num_levels={levels}"])
        data = train.open_training_data(cfg.data, cfg.model.dim)
        t = train.build_trainer(cfg, data, None, info)
        net, tally = t.model.train(), train.EpochTally(t.model.codebook_sizes, info.device)
        batches = iterate_batches(data.pairs, data.queries, data.pool, batch_size=16, epoch=0, seed=0)
        counts = []
        for step, batch in zip(range(3), batches):
            with count_host_syncs(project_only=True) as calls:
                train.optimise(net, t, batch, cfg.train, info.device, tally, 0, step)
            counts.append(sum(calls.values()))
        assert counts == [4, 4, 4], (levels, counts)
        assert sum(tally.resets.tolist()) > 0  # the dead-code reset ran (its sync is the one counted)


# ---- two processes ---------------------------------------------------------------------------
WORKER = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist, torch.nn.functional as F
    from genius.models.residual_quantization import train
    from genius.models.residual_quantization.quantizer import ResidualQuantizer, check_codebooks_in_sync

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    # 1. codebooks stay identical on all ranks while dead codes are re-seeded from rank-specific data
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(8, 3, 8, dead_code_threshold=2.0)
    sample = F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    quantizer.initialise(sample, torch.arange(64) % 3, 10, torch.Generator().manual_seed(0))
    quantizer.train()
    resets = 0
    for step in range(10):
        z = F.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(10 * step + rank)), dim=-1)
        resets += int(quantizer(z * (1 + rank), torch.arange(16) % 3).resets.sum())
    check_codebooks_in_sync(quantizer)
    states = [None, None]
    dist.all_gather_object(states, {k: v.clone() for k, v in quantizer.state_dict().items()})
    in_sync = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    dist.destroy_process_group()
    with open(sys.argv[2] + f".rank{rank}.json", "w") as f:
        json.dump({"resets": resets, "in_sync": in_sync}, f)
    # 2. a training run on this rank's half of every global batch
    os.environ["MASTER_PORT"] = os.environ["SECOND_PORT"]
    sys.exit(train.main(["--config", sys.argv[1]]))
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """2 gloo ranks x 16 pairs vs 1 process x 32 pairs: same per-step losses and final weights.

    This checks the gathered contrastive gradient (each rank sees the whole global batch's
    negatives and DDP averages), the all-reduced EMA statistics and the k-means init on gathered
    vectors. Dead-code re-seeding draws from rank 0's own batch, so it is switched off here; the
    first phase of the worker checks that with re-seeding on, all ranks keep identical codebooks.
    Tolerances: float32 sums in a different order (measured: 3e-7 relative on losses, 2e-6 on
    weights; asserted: rtol 1e-5, atol 1e-5). With the official code's local-only gather gradient the
    weights differ by far more.
    """
    world = make_world(tmp_path, num_items=128)
    two, _ = write_configs(tmp_path, world, out="two", batch_size=16, epochs=2, dead_code_threshold=0.0)
    one, _ = write_configs(tmp_path, world, out="one", batch_size=32, epochs=2, dead_code_threshold=0.0)
    for path in (one, two):  # dead_code_threshold is a model setting
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["dead_code_threshold"] = cfg["train"].pop("dead_code_threshold")
        path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "SECOND_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "GENIUS_LOG_LEVEL": "WARNING"}
    workers = [subprocess.Popen([sys.executable, str(script), str(two), str(tmp_path / "phase1")],
                                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    assert train.main(["--config", str(one)]) == 0
    for worker in workers:
        _, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err[-3000:]
    for rank in range(2):
        phase1 = json.loads((tmp_path / f"phase1.rank{rank}.json").read_text())
        assert phase1["in_sync"] and phase1["resets"] > 0
    losses = {}
    for run in ("one", "two"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        losses[run] = np.array([[r[k] for k in ("loss", "contrastive", "mse", "commit")] for r in records if "step" in r])
    assert losses["one"].shape == losses["two"].shape == (8, 4)
    print("largest relative loss difference, 2 ranks vs 1:", np.abs(losses["two"] / losses["one"] - 1).max())
    np.testing.assert_allclose(losses["two"], losses["one"], rtol=1e-5, atol=1e-6)
    a, b = load_state(tmp_path / "one" / "rq.pt"), load_state(tmp_path / "two" / "rq.pt")
    print("largest weight difference:", max(float((a[k].float() - b[k].float()).abs().max()) for k in a))
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-5), name


# ---- the shipped settings ---------------------------------------------------------------------
SETTINGS = Path(__file__).resolve().parent.parent / "configs_scripts"


@pytest.mark.parametrize("setting", ["tiny", "demo", "large", "large_improved"])
def test_every_setting_has_valid_stage1_configs(setting):
    cfg = load_config(train.RQTrainConfig, SETTINGS / setting / "train_rq.yaml")
    codes = load_config(assign_codes.AssignCodesConfig, SETTINGS / setting / "assign_codes.yaml")
    assert cfg.data.encoder == codes.encoder and Path(codes.rq_path).parent == Path(cfg.out_dir)
    assert cfg.model.dim is None  # taken from the stores, so another encoder needs no --set
    if setting.startswith("large"):
        assert (cfg.model.proj_dim, cfg.model.hidden_dim) == (2560, 5120)
        assert (cfg.model.num_levels, cfg.model.codebook_size) == (9, 4096)
        assert (cfg.train.batch_size, cfg.train.epochs) == (2000, 21)
        assert len(codes.pools) == 17 and codes.pools[-1] == "mbeir_union_test_cand_pool"


def _store_from_jsonl(path: Path, out: Path, kind: str, rng: np.random.Generator, dim: int = 64) -> None:
    from genius.common.mbeir import MODALITY_CODE, TASKS, iter_candidates, iter_queries
    records = list(iter_queries(path) if kind == "query" else iter_candidates(path))
    modality = np.array([MODALITY_CODE[r.modality] for r in records])
    target = np.array([MODALITY_CODE[TASKS[r.task_id][1]] for r in records]) if kind == "query" else modality
    write_store(out, StoreArrays(
        ids=np.array([r.hashed for r in records]), img=rng.standard_normal((len(records), dim)),
        txt=rng.standard_normal((len(records), dim)), img_mask=(modality != 1).astype(np.uint8),
        txt_mask=(modality != 0).astype(np.uint8), modality=modality, target_modality=target),
        encoder="clip_sf_tiny", kind=kind, source=path)


def test_the_tiny_setting_runs_on_a_generated_world(tmp_path):
    """The shipped tiny YAMLs, unchanged but for their paths, on the M-BEIR-mini world's files
    (random vectors stand in for stage 0)."""
    from genius.synthetic.world import write_world
    world, embed, rng = tmp_path / "world", tmp_path / "extracted_embed" / "clip_sf_tiny", np.random.default_rng(0)
    write_world(world, "test")
    _store_from_jsonl(world / "query/union_train/mbeir_union_up_train.jsonl", embed / "train/mbeir_union_up_train",
                      "query", rng)
    _store_from_jsonl(world / "cand_pool/global/mbeir_union_train_cand_pool.jsonl",
                      embed / "train/mbeir_union_train_cand_pool", "candidate", rng)
    pools = sorted((world / "cand_pool/local").glob("*.jsonl"))
    pools.append(world / "cand_pool/global/mbeir_union_test_cand_pool.jsonl")
    for pool in pools:
        _store_from_jsonl(pool, embed / "cand" / pool.stem, "candidate", rng)
    sets = ["--set", f"data.query_file={world}/query/union_train/mbeir_union_up_train.jsonl",
            "--set", f"data.pool_file={world}/cand_pool/global/mbeir_union_train_cand_pool.jsonl",
            "--set", f"data.query_store={embed}/train/mbeir_union_up_train",
            "--set", f"data.pool_store={embed}/train/mbeir_union_train_cand_pool",
            "--set", f"out_dir={tmp_path}/rq"]
    assert train.main(["--config", str(SETTINGS / "tiny" / "train_rq.yaml"), *sets]) == 0
    assert assign_codes.main(["--config", str(SETTINGS / "tiny" / "assign_codes.yaml"),
                              "--set", f"rq_path={tmp_path}/rq/rq.pt", "--set", f"embed_dir={embed}/cand",
                              "--set", f"out_dir={tmp_path}/rq/codes"]) == 0
    levels = load_config(train.RQTrainConfig, SETTINGS / "tiny" / "train_rq.yaml").model.num_levels
    for pool in pools:
        codes = np.load(tmp_path / "rq" / "codes" / pool.stem / "codes.npy")
        assert codes.shape[1] == levels
        assert (codes[:, 0] == np.load(embed / "cand" / pool.stem / "modality.npy")).all()
