"""Stage 0 end to end on the synthetic world: extraction (1 vs 2 processes, resume, skip, union)
and CLIP-SF training (learning beyond chance, resume, 2 processes = 1 process)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genius.common.checkpoint import load_own_checkpoint, save_own_checkpoint
from genius.common.config import load_config
from genius.common.distributed import seed_everything
from genius.common.fusion import fused_store_embeddings
from genius.common.mbeir import hash_did, load_pool_index, load_queries
from genius.common.store import ARRAYS, EmbeddingStore, parts_dir
from genius.synthetic.world import write_world
from genius.feature_extraction import extract, train_clip
from genius.feature_extraction.clip_model import build_clip, model_config, own_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs_scripts" / "tiny"
CHUNK = 64



@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "tiny"
    write_world(root, "test")
    return root


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory) -> Path:
    """A randomly initialised tiny CLIP-SF in the own-checkpoint layout (extraction needs weights)."""
    torch.manual_seed(0)
    cfg = model_config("clip-sf-tiny")
    path = tmp_path_factory.mktemp("clip") / "clip_sf.pt"
    save_own_checkpoint(own_checkpoint(build_clip(cfg), "clip-sf-tiny", cfg), path)
    return path


def extract_args(world: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    """The tiny preset, pointed at the test's world, checkpoint and output folder."""
    sets = [f"data.root={world}", f"encoder.checkpoint={checkpoint}", f"output.root={out}",
            f"output.chunk_rows={CHUNK}", "runtime.device=cpu", *extra]
    return ["--config", str(TINY / "extract.yaml")] + [a for s in sets for a in ("--set", s)]


def torchrun(module: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GENIUS_LOG_LEVEL": "WARNING", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)


def stores(out: Path) -> dict[str, EmbeddingStore]:
    return {f"{p.parent.name}/{p.name}": EmbeddingStore.open(p) for p in sorted(out.glob("clip_sf_tiny/*/*"))
            if (p / "meta.json").is_file()}


def metrics(out: Path) -> list[dict]:
    path = out / "clip_sf_tiny" / "extract_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---- extraction ----------------------------------------------------------------------------
def test_two_process_extraction_resumes_and_matches_one_process(world, random_clip, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert extract.main(extract_args(world, random_clip, one)) == 0
    expected = stores(one)
    # 8 local pools + union, 8 test files, training queries and pool
    assert len(expected) == 19 and "cand/mbeir_union_test_cand_pool" in expected

    # "Kill" both ranks after their first part: chunks 0 and 1 of the first store are on disk.
    first = two / "clip_sf_tiny" / "train" / "mbeir_union_train_cand_pool"
    killed = torchrun("genius.feature_extraction.extract", extract_args(world, random_clip, two),
                      {extract.STOP_AFTER_PARTS_ENV: "1"})
    assert killed.returncode != 0
    assert sorted(p.name for p in parts_dir(first).glob("part-*")) == [
        f"part-{0:010d}-{CHUNK:010d}.npz", f"part-{CHUNK:010d}-{2 * CHUNK:010d}.npz"]
    assert not (first / "meta.json").exists()

    done = torchrun("genius.feature_extraction.extract", extract_args(world, random_clip, two))
    assert done.returncode == 0, done.stderr[-3000:]
    n_parts = -(-len(load_pool_index(world / "cand_pool/global/mbeir_union_train_cand_pool.jsonl")) // CHUNK)
    runs = [m for m in metrics(two) if m["store"] == str(first) and m["status"] == "extracted"]
    assert sorted(m["rank"] for m in runs) == [0, 1]
    assert sum(m["parts_reused"] for m in runs) == 2  # the two killed-run parts were not embedded again
    assert sum(m["parts_embedded"] for m in runs) == n_parts - 2

    got = stores(two)
    assert got.keys() == expected.keys()
    for name, store in expected.items():
        other = got[name]
        for array in ("ids", "img_mask", "txt_mask", "modality", "target_modality"):
            np.testing.assert_array_equal(getattr(other.arrays, array), getattr(store.arrays, array), err_msg=name)
        for array in ("img", "txt"):
            np.testing.assert_allclose(np.asarray(getattr(other.arrays, array), np.float32),
                                       np.asarray(getattr(store.arrays, array), np.float32), rtol=2e-3, atol=2e-3)


def test_stores_follow_the_source_files(world, random_clip, tmp_path, capsys):
    out = tmp_path / "embed"
    assert extract.main(extract_args(world, random_clip, out)) == 0
    got = stores(out)
    # every store holds its file's ids in file order; the union is assembled from the local stores
    for name, store in got.items():
        split, stem = name.split("/")
        source = next(world.rglob(f"{stem}.jsonl"))
        if "cand_pool" in str(source):
            np.testing.assert_array_equal(store.ids, load_pool_index(source).ids)
        else:
            np.testing.assert_array_equal(store.ids, [q.hashed for q in load_queries(source)])
    union = got["cand/mbeir_union_test_cand_pool"]
    for name, local in got.items():
        if name.startswith("cand/") and name != "cand/mbeir_union_test_cand_pool":
            rows = union.rows_of(local.ids)
            for array in ARRAYS:
                np.testing.assert_array_equal(np.asarray(getattr(union.arrays, array))[rows],
                                              np.asarray(getattr(local.arrays, array)))
    # queries: image-only queries carry their instruction (text mask 1); candidates never do
    i2t = got["test/mbeir_shapesnews_task3_test"]
    assert i2t.arrays.txt_mask.all() and i2t.arrays.img_mask.all() and (np.asarray(i2t.arrays.target_modality) == 1).all()
    images = got["cand/mbeir_shapesnews_task0_cand_pool"]
    assert not np.asarray(images.arrays.txt_mask).any() and np.asarray(images.arrays.img_mask).all()
    assert (out / "clip_sf_tiny" / "config.yaml").is_file()

    # A re-run does nothing, nor does a touched file (content counts, not times); a source file with
    # other bytes is re-extracted (and the union re-assembled).
    stamp = {name: (s.path / "ids.npy").stat().st_mtime_ns for name, s in got.items()}
    before = len(metrics(out))
    pool = world / "cand_pool/local/mbeir_shapesnews_task0_cand_pool.jsonl"
    os.utime(pool, ns=(time.time_ns(), time.time_ns()))
    assert extract.main(extract_args(world, random_clip, out)) == 0
    assert {m["status"] for m in metrics(out)[before:]} == {"up_to_date"}
    lines = pool.read_text().splitlines()
    pool.write_text("".join(json.dumps(json.loads(line), separators=(",", ":")) + "\n" for line in lines))  # same records, other bytes
    before = len(metrics(out))
    assert extract.main(extract_args(world, random_clip, out)) == 0
    redone = {Path(m["store"]).name for m in metrics(out)[before:] if m["status"] != "up_to_date"}
    assert redone == {"mbeir_shapesnews_task0_cand_pool"}
    again = stores(out)
    changed = {name for name, s in again.items() if (s.path / "ids.npy").stat().st_mtime_ns != stamp[name]}
    assert changed == {"cand/mbeir_shapesnews_task0_cand_pool"}
    # Same records embed to the same arrays: the store's content id is unchanged, so the union
    # assembled from it is still up to date.
    assert again["cand/mbeir_shapesnews_task0_cand_pool"].content_id == got["cand/mbeir_shapesnews_task0_cand_pool"].content_id

    # A union did that no local store holds is an error naming it.
    with pytest.raises(SystemExit) as exit_info:
        extract.main(extract_args(world, random_clip, out,
                                  "data.local_pools=[cand_pool/local/mbeir_shapesnews_task0_cand_pool.jsonl]"))
    assert exit_info.value.code == 2
    assert re.search(r"genius extract: error: .* in none of the local stores.*first missing: 2", capsys.readouterr().err)


def test_missing_image_is_named(random_clip, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "cand_pool/local").mkdir(parents=True)
    record = {"did": "20:1", "txt": None, "img_path": "mbeir_images/none/missing.png", "modality": "image"}
    (root / "cand_pool/local/mbeir_x_task0_cand_pool.jsonl").write_text(json.dumps(record) + "\n")
    args = extract_args(root, random_clip, tmp_path / "out", "data.train_queries=null", "data.train_pool=null",
                        "data.test_queries=[]", "data.union_pool=null", "instructions.mode=none")
    with pytest.raises(SystemExit) as exit_info:
        extract.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{root / 'cand_pool/local/mbeir_x_task0_cand_pool.jsonl'}:1" in err  # the jsonl line that names it
    assert "mbeir_images/none/missing.png" in err and len(err.splitlines()) == 1


# ---- training ------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for the process dying: nothing in the stage catches it (not even as an interrupt)."""


def train_args(world: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"data.root={world}", f"output.run_dir={run_dir}", "runtime.device=cpu", *extra]
    return ["--config", str(TINY / "train_clip.yaml")] + [a for s in sets for a in ("--set", s)]


def dense_hits_at_5(world: Path, out: Path, task_file: str, pool_file: str) -> tuple[np.ndarray, np.ndarray]:
    """Per query: did a positive reach the top 5 of the score-fused ranking of its local pool, and
    the chance of that under a random ranking."""
    queries = EmbeddingStore.open(out / "clip_sf_tiny" / "test" / task_file)
    pool = EmbeddingStore.open(out / "clip_sf_tiny" / "cand" / pool_file)
    scores = fused_store_embeddings(queries.arrays) @ fused_store_embeddings(pool.arrays).T
    top = np.asarray(pool.ids)[np.argsort(-scores, axis=1)[:, :5]]
    records = load_queries(world / "query" / "test" / f"{task_file}.jsonl")
    assert [q.hashed for q in records] == list(queries.ids)
    hits = np.array([bool(set(top[i]) & {hash_did(d) for d in q.pos}) for i, q in enumerate(records)])
    n = len(pool)
    chance = np.array([1 - np.prod([(n - len(q.pos) - j) / (n - j) for j in range(5)]) for q in records])
    return hits, chance


def tail_probability(chances: np.ndarray, observed: int) -> float:
    """P(at least ``observed`` hits) when each query hits independently with its chance (exact)."""
    dist = np.array([1.0])
    for p in chances:
        dist = np.convolve(dist, [1 - p, p])
    return float(dist[observed:].sum())


def test_the_tiny_clip_sf_learns_beyond_chance(finished_tiny_root):
    """The tiny setting's CLIP-SF, trained from scratch by ``run_all.sh`` (the session's finished
    tiny root: the run that GENIUS is then trained on), halves its loss and ranks positives far
    above chance in the stores extracted with it."""
    world, out = finished_tiny_root / "worlds" / "tiny", finished_tiny_root / "extracted_embed"
    run_dir = finished_tiny_root / "checkpoint" / "tiny" / "clip_sf"
    log = [m for m in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()) if "step" not in m]
    epochs = load_config(train_clip.TrainClipConfig, TINY / "train_clip.yaml").optim.epochs
    assert len(log) == epochs and log[-1]["loss"] < 0.5 * log[0]["loss"]

    tasks = {0: ("mbeir_shapesnews_task0_test", "mbeir_shapesnews_task0_cand_pool"),
             3: ("mbeir_shapesnews_task3_test", "mbeir_shapesnews_task3_cand_pool")}
    hits = {t: dense_hits_at_5(world, out, q, p) for t, (q, p) in tasks.items()}
    print("tiny CLIP-SF Recall@5 (chance): "
          + ", ".join(f"task {t} {h.mean():.3f} ({c.mean():.3f})" for t, (h, c) in hits.items()))
    # 40 test queries per task against 600-candidate pools, chance 0.008 (task 0) and 0.017 (task 3:
    # two captions per query). The 15-epoch run measured 0.45 and 0.95; 8 epochs already reached
    # 0.125-0.25 and 0.225-0.425 over four seeds. Each task must beat chance fivefold; learning
    # itself is proved by the total, which chance reaches with p < 1e-3 only from 6 hits up.
    for task, (h, chance) in hits.items():
        assert h.mean() >= 5 * chance.mean(), f"task {task}: Recall@5 {h.mean():.3f} vs chance {chance.mean():.3f}"
    total = sum(int(h.sum()) for h, _ in hits.values())
    assert tail_probability(np.concatenate([c for _, c in hits.values()]), total) < 1e-3


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_own_checkpoint(path)["model"]


def test_training_resumes_exactly_and_two_processes_match_one(world, tmp_path, monkeypatch):
    # Resuming and gathering do not depend on how much data there is: the first 320 training
    # queries (the union file is shuffled, so every task is among them) keep the five runs quick.
    subset = tmp_path / "train_queries.jsonl"
    lines = (world / "query/union_train/mbeir_union_up_train.jsonl").read_text().splitlines(keepends=True)
    subset.write_text("".join(lines[:320]))
    short = ["optim.epochs=2", "optim.warmup_steps=0", f"data.train_queries={subset}"]
    one, resumed, two = tmp_path / "one", tmp_path / "resumed", tmp_path / "two"
    assert train_clip.main(train_args(world, one, *short, "optim.batch_size=32")) == 0
    reference = _weights(one / "clip_sf.pt")

    # Interrupted after epoch 0: resuming gives bit-identical weights.
    shutil.copytree(one, resumed)
    (resumed / "checkpoints" / "epoch_0001.pt").unlink()
    (resumed / "clip_sf.pt").unlink()
    assert train_clip.main(train_args(world, resumed, *short, "optim.batch_size=32")) == 0
    for name, tensor in _weights(resumed / "clip_sf.pt").items():
        assert torch.equal(tensor, reference[name]), name

    # Interrupted in the middle of epoch 1 with step checkpoints on: resuming from the step
    # (not from epoch 0) gives bit-identical weights too.
    stepped = tmp_path / "stepped"
    real_save = train_clip.save_training_checkpoint

    def save_then_die(run_dir, epoch, state, step=None):
        path = real_save(run_dir, epoch, state, step=step)
        if epoch == 1 and step is not None:
            raise Killed(f"killed after {path.name}")
        return path

    monkeypatch.setattr(train_clip, "save_training_checkpoint", save_then_die)
    with pytest.raises(Killed, match="killed after epoch_0001_step_0000002.pt"):
        train_clip.main(train_args(world, stepped, *short, "optim.batch_size=32", "output.save_every_steps=2"))
    monkeypatch.undo()
    assert sorted(p.name for p in (stepped / "checkpoints").iterdir()) == ["epoch_0000.pt", "epoch_0001_step_0000002.pt"]
    real_epoch, started = train_clip.run_epoch, []

    def record_start(*args, **kwargs):
        started.append((args[9], kwargs["first_step"]))  # (epoch, first step)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_clip, "run_epoch", record_start)
    assert train_clip.main(train_args(world, stepped, *short, "optim.batch_size=32", "output.save_every_steps=2")) == 0
    monkeypatch.undo()
    assert started == [(1, 2)]  # only the rest of epoch 1 was trained
    assert sorted(p.name for p in (stepped / "checkpoints").iterdir()) == ["epoch_0000.pt", "epoch_0001.pt"]
    for name, tensor in _weights(stepped / "clip_sf.pt").items():
        assert torch.equal(tensor, reference[name]), name

    # 2 processes x 16 (embeddings gathered with gradients) == 1 process x 32.
    done = torchrun("genius.feature_extraction.train_clip", train_args(world, two, *short, "optim.batch_size=16"))
    assert done.returncode == 0, done.stderr[-3000:]
    seed_everything(2023)  # train_clip's default seed: the weights both runs started from
    preset = load_config(train_clip.TrainClipConfig, TINY / "train_clip.yaml")
    start = build_clip(model_config(preset.model.name)).state_dict()
    width = {"visual": start["visual.conv1.weight"].shape[0], "transformer": start["token_embedding.weight"].shape[1]}
    for name, tensor in _weights(two / "clip_sf.pt").items():
        expected = reference[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias cancels in the softmax: its gradient is rounding noise, which Adam
            # scales up to lr-sized steps, so it differs between any two summation orders.
            w = width[name.split(".")[0]]
            tensor, expected = torch.cat([tensor[:w], tensor[2 * w:]]), torch.cat([expected[:w], expected[2 * w:]])
        torch.testing.assert_close(tensor, expected, rtol=1e-4, atol=2e-5, msg=name)
    moved = sum(float((reference[n] - start[n]).abs().max()) for n in reference)
    assert moved > 0.1  # the comparison is between trained weights, not two untouched copies

    # Another config in the same run directory: the old checkpoints are set aside, not resumed.
    assert train_clip.main(train_args(world, one, "optim.epochs=1", "optim.warmup_steps=0", "optim.lr=0.001",
                                      f"data.train_queries={subset}", "optim.batch_size=32")) == 0
    (archived,) = (one / "stale").iterdir()
    assert sorted(p.name for p in (archived / "checkpoints").iterdir()) == ["epoch_0000.pt", "epoch_0001.pt"]
    assert sorted(p.name for p in (one / "checkpoints").iterdir()) == ["epoch_0000.pt"]
