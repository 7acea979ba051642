"""Checkpoint IO and training-pair sampling shared by the training stages."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from genius.common.checkpoint import (
    CheckpointMismatchError, latest_checkpoint, load_official_checkpoint, load_state_dict_strict,
    remove_step_checkpoints, save_training_checkpoint,
)
from genius.common.pairs import add_self_pairs, batches_per_epoch, iterate_batches, load_training_pairs
from genius.common.store import EmbeddingStore, StoreArrays, write_store


def test_strict_loading_names_every_problem():
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state.pop("0.bias")
    state["1.weight"] = torch.zeros(2, 5)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_strict(module, state, "test.pth")
    msg = str(err.value)
    assert "missing keys (1): 0.bias" in msg and "unexpected keys (1): extra.weight" in msg
    assert "1.weight: checkpoint (2, 5) vs model (2, 4)" in msg


def test_official_file_with_pickled_omegaconf_loads_without_omegaconf(tmp_path, monkeypatch):
    # Build a file that pickles an object of an 'omegaconf' class, as UniIR/GENIUS files do, then
    # load it in a process state where that library is not importable.
    fake = types.ModuleType("omegaconf")
    fake_dictconfig = types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self):
            self.content = {"lr": 1e-4}

    DictConfig.__module__ = "omegaconf.dictconfig"
    DictConfig.__qualname__ = "DictConfig"
    fake_dictconfig.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", fake)
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", fake_dictconfig)
    weights = {"clip_model.logit_scale": torch.tensor(4.6)}
    torch.save({"model": weights, "config": DictConfig(), "epoch": 19}, tmp_path / "official.pth")
    monkeypatch.delitem(sys.modules, "omegaconf")
    monkeypatch.delitem(sys.modules, "omegaconf.dictconfig")
    with pytest.raises(Exception):
        torch.load(tmp_path / "official.pth", weights_only=True)
    loaded = load_official_checkpoint(tmp_path / "official.pth")
    assert loaded["epoch"] == 19 and torch.equal(loaded["model"]["clip_model.logit_scale"], torch.tensor(4.6))
    torch.save(weights, tmp_path / "bare.pth")
    assert set(load_official_checkpoint(tmp_path / "bare.pth")["model"]) == set(weights)
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "none.pth")


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (0, 2, 10):
        save_training_checkpoint(tmp_path, epoch, {"model": {}})
    assert latest_checkpoint(tmp_path).name == "epoch_0010.pt"
    assert torch.load(latest_checkpoint(tmp_path), weights_only=True)["epoch"] == 10
    # Steps inside epoch 11 come after epoch 10; the finished epoch 11 after any of its steps.
    save_training_checkpoint(tmp_path, 11, {"model": {}}, step=500)
    save_training_checkpoint(tmp_path, 11, {"model": {}}, step=40)
    state = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert latest_checkpoint(tmp_path).name == "epoch_0011_step_0000500.pt" and (state["epoch"], state["step"]) == (11, 500)
    save_training_checkpoint(tmp_path, 11, {"model": {}})
    assert latest_checkpoint(tmp_path).name == "epoch_0011.pt"
    remove_step_checkpoints(tmp_path, keep=tmp_path / "checkpoints" / "epoch_0011_step_0000040.pt")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch_0000.pt", "epoch_0002.pt", "epoch_0010.pt", "epoch_0011.pt", "epoch_0011_step_0000040.pt"]


def arrays(ids, value_of) -> StoreArrays:
    """Store rows whose image and text vectors are ``value_of(id)`` in every dimension."""
    n = len(ids)
    vec = np.stack([np.full(4, value_of(i), dtype=np.float32) for i in ids])
    return StoreArrays(np.array(ids, dtype=np.int64), vec, vec, np.zeros(n), np.ones(n), np.ones(n), np.ones(n))


@pytest.fixture
def pair_world(tmp_path):
    """10 queries; query n has positives n and n + 10 (plus one query whose positive is missing)."""
    queries = tmp_path / "q.jsonl"
    lines = [{"qid": f"1:{n}", "query_txt": f"q{n}", "query_img_path": None, "query_modality": "text",
              "pos_cand_list": [f"1:{n}", f"1:{n + 10}"], "task_id": 1} for n in range(1, 11)]
    lines.append({"qid": "1:99", "query_txt": "x", "query_img_path": None, "query_modality": "text",
                  "pos_cand_list": ["1:999"], "task_id": 1})
    queries.write_text("\n".join(json.dumps(line) for line in lines) + "\n")

    qids = [500_000 + n for n in range(1, 12)][::-1]  # store order differs from file order
    write_store(tmp_path / "qs", arrays(qids, lambda i: i - 500_000), encoder="e", kind="query")
    dids = [10_000_000 + n for n in range(1, 21)]
    write_store(tmp_path / "cs", arrays(dids, lambda i: i - 10_000_000), encoder="e", kind="candidate")
    return queries, EmbeddingStore.open(tmp_path / "qs"), EmbeddingStore.open(tmp_path / "cs")


def test_pairs_join_and_resample(pair_world):
    path, qstore, cstore = pair_world
    pairs = load_training_pairs(path, qstore, cstore)
    assert len(pairs) == 10 and pairs.dropped_queries == 1
    picks = []
    for epoch in range(6):
        (batch,) = list(iterate_batches(pairs, qstore, cstore, batch_size=10, epoch=epoch, seed=1))
        q, c = batch["q_txt"][:, 0].numpy(), batch["c_txt"][:, 0].numpy()
        assert set(q.tolist()) == set(range(1, 11))
        assert all(ci in (qi, qi + 10) for qi, ci in zip(q, c))  # each candidate is a positive of its query
        picks.append(tuple(c[np.argsort(q)]))
    assert len(set(picks)) > 1  # positives are re-drawn per epoch


def test_ranks_split_the_global_batch(pair_world):
    path, qstore, cstore = pair_world
    pairs = load_training_pairs(path, qstore, cstore)
    whole = list(iterate_batches(pairs, qstore, cstore, batch_size=4, epoch=3, seed=7))
    shards = [list(iterate_batches(pairs, qstore, cstore, batch_size=2, epoch=3, seed=7, rank=r, world_size=2))
              for r in range(2)]
    assert len(whole) == batches_per_epoch(10, 4) == 2
    for step, batch in enumerate(whole):
        joined = torch.cat([shards[0][step]["q_txt"], shards[1][step]["q_txt"]])
        torch.testing.assert_close(joined, batch["q_txt"])


def test_self_pairs_index_the_candidates_no_training_pool_holds_reading_each_side_from_its_own_store(
        pair_world, tmp_path):
    path, qstore, cstore = pair_world
    pairs = load_training_pairs(path, qstore, cstore)

    def index_store(name, dids, value):
        write_store(tmp_path / name, arrays(dids, value), encoder="e", kind="candidate")
        return EmbeddingStore.open(tmp_path / name)

    # first: 2 candidates of the training pool (1, 20) and 3 new ones; second: one of those again and 2 new
    first = index_store("i1", [10_000_000 + d for d in (101, 1, 102, 20, 103)], lambda d: d - 10_000_000)
    second = index_store("i2", [10_000_000 + d for d in (104, 102, 105)], lambda d: d - 10_000_000 + 1000)
    indexed, queries, pool, added = add_self_pairs(pairs, qstore, cstore, [first, second])
    assert added == [3, 2] and len(indexed) == len(pairs) + 5
    np.testing.assert_array_equal(indexed.pos_rows[: len(pairs.pos_rows)], pairs.pos_rows)
    batches = list(iterate_batches(indexed, queries, pool, batch_size=len(indexed), epoch=0, seed=3))
    (batch,) = batches
    q, c = batch["q_txt"][:, 0].numpy(), batch["c_txt"][:, 0].numpy()
    self_pairs = sorted(zip(q[q > 100].tolist(), c[q > 100].tolist()))
    # each side read from the index store's own row: 102 from the first store, 104 and 105 from the second
    assert self_pairs == [(101, 101), (102, 102), (103, 103), (1104, 1104), (1105, 1105)]
    trained = q < 100
    assert set(q[trained].tolist()) == set(range(1, 11))
    assert all(ci in (qi, qi + 10) for qi, ci in zip(q[trained], c[trained]))
    # the rows handed to the stages are the stacks' rows, and the stores' other fields come along
    assert batch["c_row"].max().item() < len(pool) and batch["q_row"].max().item() < len(queries)
    assert batch["c_modality"].dtype == torch.int64 and batch["c_img_mask"].shape == (len(indexed),)
    # without index stores nothing changes: the same pairs and the same batches
    plain, *_ = add_self_pairs(pairs, qstore, cstore, [])
    (a,), (b,) = (list(iterate_batches(p, qstore, cstore, batch_size=10, epoch=1, seed=3)) for p in (plain, pairs))
    torch.testing.assert_close(a, b)


def test_training_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    from genius.common.plots import plot_training_curves
    from genius.common.stage import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(10):
        log.write(epoch=step // 5, step=step, loss=1.0 / (step + 1), level_acc=[0.5, step / 10])
    log.write(epoch=1, epoch_summary=True, loss=0.2, perplexity=[3.0, 12.5])
    out = plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", "test")
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training_curves(tmp_path / "none.jsonl", tmp_path / "empty.png", "empty") is None


def test_init_distributed_applies_cpu_threads():
    from genius.common.distributed import init_distributed

    before = torch.get_num_threads()
    try:
        assert init_distributed("cpu", cpu_threads=3).device.type == "cpu"
        assert torch.get_num_threads() == 3
        init_distributed("cpu")  # None keeps whatever is set
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_scaler_state_resumes_across_devices_and_precision_settings():
    """A checkpoint of a disabled scaler (a CPU run, or amp off) holds an empty state; resuming it
    with amp on starts a fresh scaler instead of failing, and a disabled scaler ignores a saved one."""
    from genius.common.checkpoint import load_scaler_state

    saved_disabled = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved_disabled == {}
    with pytest.raises(RuntimeError):  # what resuming did before
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(saved_disabled)
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler_state(fresh, saved_disabled)
    assert fresh.get_scale() == torch.amp.GradScaler("cpu", enabled=True).get_scale()

    trained = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    resumed = torch.amp.GradScaler("cpu", enabled=True)
    load_scaler_state(resumed, trained.state_dict())
    assert resumed.get_scale() == 1024.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    load_scaler_state(disabled, trained.state_dict())
    assert not disabled.is_enabled()


# ---- common/training.py: the optimiser, schedule, RNG and world-size policy the trainers share --
def test_warmup_cosine_starts_one_step_in_or_at_zero_and_cuts_a_warmup_longer_than_the_run():
    from genius.common.training import warmup_cosine

    def factors(warmup, total, start):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = warmup_cosine(opt, warmup, total, start)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert factors(4, 10, "first_step")[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors(4, 10, "zero")[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert factors(0, 4, "first_step")[0] == 1.0 and factors(0, 4, "first_step")[-1] < 0.2
    cut = factors(50, 5, "first_step")  # warm-up cut to total - 1 steps: the lr reaches 1 at the last step
    assert cut == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_adamw_decays_matrices_only_unless_told_otherwise():
    from genius.common.training import adamw

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    opt = adamw(model, lr=0.1, weight_decay=0.5, eps=1e-6, betas=(0.8, 0.9))
    (decayed, plain) = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 3)] and decayed["weight_decay"] == 0.5
    assert [p.shape for p in plain["params"]] == [(4,), (4,)] and plain["weight_decay"] == 0.0  # frozen one left out
    assert decayed["betas"] == (0.8, 0.9)
    by_name = adamw(model, lr=0.1, weight_decay=0.5, eps=1e-6, decays=lambda name, p: name.endswith("bias"))
    assert len(by_name.param_groups[0]["params"]) == 2


def test_rng_states_restore_exactly_on_the_same_world_and_reseed_deterministically_on_another(caplog):
    import random

    from genius.common.distributed import DistInfo
    from genius.common.training import gather_rng_states, restore_rng_states

    one = DistInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(3)
    random.seed(3)
    saved = gather_rng_states(one)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    restore_rng_states(saved, one, seed=1, position=(2,))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]

    draws = []
    for _ in range(2):  # saved by one process, resumed by two: rank 1 reseeds from (seed, position, rank)
        restore_rng_states(saved, DistInfo(1, 2, 1, torch.device("cpu")), seed=1, position=(2,))
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], expected[0])
    restore_rng_states(saved, DistInfo(0, 2, 0, torch.device("cpu")), seed=1, position=(2,))
    assert not torch.equal(torch.rand(3), draws[0])  # ranks get distinct streams
    assert "not bit-identical" in caplog.text


def test_a_changed_process_count_that_changes_the_global_batch_is_refused_naming_the_fix(tmp_path):
    from genius.common.runstate import RunKey, RunState
    from genius.common.training import batch_extra, check_world_size

    def key(batch, world, **extra):
        return RunKey({"train.lr": 0.1}, {"data": "abc"}, {**batch_extra(batch, world), **extra})

    run = RunState(tmp_path, key(32, 1), ("x",), stage="test")
    recorded = key(32, 2).as_dict()  # 2 x 32 before, 1 x 32 now
    with pytest.raises(ValueError) as err:
        check_world_size(recorded, 2, run, 1, tmp_path / "ckpt.pt", "train.batch_size", "train.force")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'ckpt.pt'}: ") and "\n" not in message
    assert "set train.batch_size=64 to keep its global batch of 64" in message and "train.force=true" in message
    # same process count: a changed batch size is a changed setting, left to RunState (set aside)
    check_world_size(key(16, 1).as_dict(), 1, run, 1, tmp_path, "train.batch_size", "train.force")
    # another config anyway: left to RunState
    other = {**recorded, "config": {"train.lr": 0.2}}
    check_world_size(other, 2, run, 1, tmp_path, "train.batch_size", "train.force")
    # a result that depends on the process count itself: run with the old count
    local = RunState(tmp_path, key(64, 1, world_size=1), ("x",), stage="test")
    with pytest.raises(ValueError, match=r"run with 2 process\(es\) to go on with it"):
        check_world_size(key(32, 2, world_size=2).as_dict(), 2, local, 1, tmp_path, "train.batch_size", "train.force")


def test_keep_metrics_drops_the_lines_past_the_resumed_checkpoint(tmp_path):
    from genius.common.training import keep_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 2, 3)))
    keep_metrics(path, lambda r: r["step"] <= 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 2]
    keep_metrics(tmp_path / "none.jsonl", lambda r: True)  # no log yet: nothing to do


# ---- the optimiser step under loss scaling ---------------------------------------------------
def _scaled_step(scaler, optimizer, scheduler, model, inf_grad: bool = False, clip=None) -> bool:
    from genius.common.training import optimizer_step

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(model(torch.ones(2, 3)).square().sum()).backward()
    if inf_grad:  # what an fp16 overflow in the backward pass leaves
        model.weight.grad[0, 0] = float("inf")
    return optimizer_step(scaler, optimizer, scheduler, clip)


def test_the_schedule_does_not_step_when_the_scaler_skips_the_optimiser_step():
    from genius.common.training import warmup_cosine

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=3, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # enabled: loss scaling as fp16 on a GPU uses it
    assert scaler.is_enabled()

    assert _scaled_step(scaler, optimizer, scheduler, model)
    assert scheduler.last_epoch == 1 and scaler.get_scale() == 1024.0
    weights, lr = model.weight.detach().clone(), scheduler.get_last_lr()
    assert not _scaled_step(scaler, optimizer, scheduler, model, inf_grad=True)
    assert scheduler.last_epoch == 1 and scheduler.get_last_lr() == lr  # no step of the schedule either
    assert torch.equal(model.weight, weights) and scaler.get_scale() == 512.0  # skipped, scale backed off
    assert _scaled_step(scaler, optimizer, scheduler, model, clip=(model.parameters(), 1e-3))
    assert scheduler.last_epoch == 2 and not torch.equal(model.weight, weights)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])) <= 1e-3 * 1.0001


def test_with_the_scaler_disabled_the_step_is_a_plain_optimiser_and_schedule_step():
    from genius.common.training import warmup_cosine

    runs = []
    for helper in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=5)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for _ in range(4):
            if helper:
                _scaled_step(scaler, optimizer, scheduler, model, clip=(model.parameters(), 0.5))
            else:
                optimizer.zero_grad(set_to_none=True)
                model(torch.ones(2, 3)).square().sum().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                optimizer.step()
                scheduler.step()
        runs.append((model.weight.detach(), scheduler.last_epoch))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1] == 4
