"""The official training's behaviours, each selectable by a config option, against references
computed here from their formulas (never from the code under test):

- stage 1 gradient estimators (per-level straight-through, rotation trick),
- the official GatherLayer's local-only gradient (2 gloo processes),
- one positive per query fixed for the whole run,
- vector-quantize-pytorch's k-means seeding from random rows, the learned level 0,
- stage 2's warm-up from lr 0 and its name-based weight-decay exemption,
- and the "paper settings" YAMLs, which must select every official behaviour.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genius.common.config import config_to_dict, load_config
from genius.common.pairs import TrainingPairs, iterate_batches
from genius.common.runstate import flatten, semantic_config
from genius.common.store import EmbeddingStore, StoreArrays, write_store
from genius.models.generative_retriever import train as train_gen
from genius.models.generative_retriever.generator import IDGenerator, make_arch
from genius.models.residual_quantization import train as train_rq
from genius.models.residual_quantization.model import RQModel
from genius.models.residual_quantization.quantizer import ResidualQuantizer, kmeans

SETTINGS = Path(__file__).resolve().parent.parent / "configs_scripts"
DIM, LEVELS, K, PAIRS = 8, 4, 6, 6


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def initialised(estimator: str, mode: str = "learned") -> ResidualQuantizer:
    quantizer = ResidualQuantizer(DIM, LEVELS, K, mode, gradient_estimator=estimator)
    quantizer.initialise(unit(60, DIM, 0), torch.arange(60) % 3, 10, torch.Generator().manual_seed(0))
    return quantizer.train()


def mse_gradient(estimator: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """d/dz of 100 x MSE(normalize(q_hat_query), normalize(q_hat_positive)) (the stage-1 MSE term)
    for 6 pairs; also the loss's gradient at the quantized output, the codes and z."""
    quantizer = initialised(estimator)
    z = torch.cat([unit(PAIRS, DIM, 1), unit(PAIRS, DIM, 2)]).requires_grad_()
    out = quantizer(z, update=False)
    quantized = F.normalize(out.quantized, dim=-1)
    (100 * F.mse_loss(quantized[:PAIRS], quantized[PAIRS:])).backward()
    # the loss's own gradient at its input, the codeword sum, taken on a detached leaf
    codeword_sum = sum(quantizer.levels[l].embed[out.codes[:, l]] for l in range(LEVELS)).requires_grad_()
    assert torch.equal(out.quantized.detach(), codeword_sum.detach())  # the value is the codeword sum
    normed = F.normalize(codeword_sum, dim=-1)
    (100 * F.mse_loss(normed[:PAIRS], normed[PAIRS:])).backward()
    return z.grad, codeword_sum.grad, out.codes, z.detach()


# ---- stage 1: gradient estimators -----------------------------------------------------------
def test_straight_through_per_level_passes_num_levels_times_the_loss_gradient():
    ours, g, _, _ = mse_gradient("straight_through")
    per_level, g_again, _, _ = mse_gradient("straight_through_per_level")
    assert torch.equal(g, g_again)
    torch.testing.assert_close(ours, g, rtol=0, atol=0)
    torch.testing.assert_close(per_level, LEVELS * g, rtol=1e-6, atol=1e-7)


def test_rotation_trick_gradient_matches_its_formula_per_level():
    grad, g, codes, z = mse_gradient("rotation")
    quantizer = initialised("rotation")
    expected, residual = torch.zeros_like(z), z.clone()
    for level in range(LEVELS):
        c = quantizer.levels[level].embed[codes[:, level]]
        u = residual / residual.norm(dim=-1, keepdim=True)
        q = c / c.norm(dim=-1, keepdim=True)
        w = (u + q) / (u + q).norm(dim=-1, keepdim=True)
        scale = c.norm(dim=-1, keepdim=True) / residual.norm(dim=-1, keepdim=True)
        # out = e (I - 2 w w^T + 2 u q^T) s for row vectors e, so d/de = s (g - 2 (g.w) w + 2 (g.q) u)
        dot = lambda a, b: (a * b).sum(-1, keepdim=True)  # noqa: E731
        expected += scale * (g - 2 * dot(g, w) * w + 2 * dot(g, q) * u)
        residual = residual - c
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    # not merely a rescaled straight-through gradient
    assert F.cosine_similarity(grad.flatten(), g.flatten(), dim=0) < 0.999


def test_the_estimator_only_changes_gradients_and_older_rq_files_default_to_straight_through():
    z = unit(2 * PAIRS, DIM, 3)
    outs = {e: initialised(e)(z, update=False) for e in ("straight_through", "straight_through_per_level", "rotation")}
    for out in outs.values():
        assert torch.equal(out.codes, outs["straight_through"].codes)
        assert torch.equal(out.quantized, outs["straight_through"].quantized)
        assert torch.equal(out.commit_loss, outs["straight_through"].commit_loss)
    arch = {"dim": DIM, "proj_dim": 4, "hidden_dim": 4, "num_levels": LEVELS, "codebook_size": K,
            "modality_mode": "learned", "decay": 0.9, "eps": 1e-5, "dead_code_threshold": 2.0}
    assert RQModel.from_arch(arch).quantizer.gradient_estimator == "straight_through"
    rotated = RQModel.from_arch({**arch, "gradient_estimator": "rotation"})
    assert rotated.quantizer.gradient_estimator == "rotation" and rotated.arch["gradient_estimator"] == "rotation"
    cfg = load_config(train_rq.RQTrainConfig, None, ["model.gradient_estimator=straight_through_per_level"])
    assert train_rq.model_arch(cfg.model, DIM)["gradient_estimator"] == "straight_through_per_level"


# ---- stage 1: k-means seeds and the learned level 0 -----------------------------------------
def reference_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator):
    """vector-quantize-pytorch's k-means written out: seeds are k random row indices (distinct
    when there are enough rows), every iteration assigns by Euclidean distance and averages, an
    empty cluster keeps its mean, and the counts are the last assignment's."""
    if len(x) >= k:
        rows = torch.randperm(len(x), generator=generator)[:k]
    else:
        rows = torch.randint(len(x), (k,), generator=generator)
    means = x[rows].clone()
    counts = torch.zeros(k)
    for _ in range(iters):
        assign = torch.cdist(x, means).argmin(dim=1)
        counts = torch.zeros(k).index_add_(0, assign, torch.ones(len(x)))
        for c in range(k):
            if counts[c] > 0:
                means[c] = x[assign == c].mean(dim=0)
    return means, counts


@pytest.mark.parametrize("rows", [40, 5])
def test_random_row_kmeans_is_the_library_kmeans(rows):
    x = unit(rows, DIM, 4)
    x = torch.cat([x, x[:3]])  # repeated values: a query identical to its positive
    ours = kmeans(x, K, 7, torch.Generator().manual_seed(5), seeds="random_rows")
    reference = reference_kmeans(x, K, 7, torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[1], reference[1])


def test_random_rows_can_seed_equal_codes_where_distinct_rows_cannot():
    x = unit(4, DIM, 6).repeat(3, 1)  # 12 rows, 4 distinct values, 4 codes
    equal_seeds = []
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        equal_seeds.append(len(torch.unique(kmeans(x, 4, 1, generator, "random_rows")[0], dim=0)) < 4)
        assert len(torch.unique(kmeans(x, 4, 1, torch.Generator().manual_seed(seed))[0], dim=0)) == 4
    assert any(equal_seeds)


def test_learned_level0_is_a_3_code_kmeans_then_ema_without_dead_code_reset():
    z = unit(50, DIM, 7)
    quantizer = ResidualQuantizer(DIM, 2, K, "learned", dead_code_threshold=2.0)
    quantizer.initialise(z, None, 6, torch.Generator().manual_seed(8), seeds="random_rows")
    generator = torch.Generator().manual_seed(8)
    means0, counts0 = reference_kmeans(z, 3, 6, generator)  # levels fitted in order, one generator
    level0 = torch.cdist(z, means0).argmin(dim=1)
    means1, counts1 = reference_kmeans(z - means0[level0], K, 6, generator)
    for book, means, counts in ((quantizer.levels[0], means0, counts0), (quantizer.levels[1], means1, counts1)):
        torch.testing.assert_close(book.embed, means, rtol=1e-6, atol=1e-6)
        assert torch.equal(book.cluster_size, counts)
        torch.testing.assert_close(book.embed_avg, means * counts[:, None], rtol=1e-6, atol=1e-6)
    # one training step on vectors near a single level-0 code: EMA by formula, and the two
    # starved codes fall below the dead-code threshold but are never re-seeded on level 0
    book = quantizer.levels[0]
    size, avg = book.cluster_size.clone(), book.embed_avg.clone()
    batch = F.normalize(book.embed[0] + 0.01 * unit(10, DIM, 9), dim=-1)
    codes = torch.cdist(batch, book.embed).argmin(dim=1)
    assert (codes == 0).all()
    out = quantizer.train()(batch)
    assert (out.codes[:, 0] == 0).all() and out.resets[0] == 0
    counts = torch.tensor([10.0, 0.0, 0.0])
    sums = torch.zeros(3, DIM).index_add_(0, codes, batch)
    size, avg = 0.9 * size + 0.1 * counts, 0.9 * avg + 0.1 * sums
    smoothed = (size + 1e-5) / (size.sum() + 3e-5) * size.sum()
    torch.testing.assert_close(book.cluster_size, size)
    torch.testing.assert_close(book.embed, avg / smoothed[:, None], rtol=1e-5, atol=1e-6)
    for _ in range(30):
        assert quantizer(batch).resets[0] == 0
    assert (book.cluster_size[1:] < 2).all()


# ---- stage 1: fixed positives ---------------------------------------------------------------
def test_fixed_positives_are_the_same_in_every_epoch_and_the_batch_order_is_unchanged(tmp_path):
    n_queries, n_pool = 24, 60
    rng = np.random.default_rng(0)

    def store(name: str, n: int) -> EmbeddingStore:
        img = np.zeros((n, 4), np.float32)
        img[:, 0] = np.arange(n)  # the row number, to recognise rows in a batch
        ones = np.ones(n, np.uint8)
        write_store(tmp_path / name, StoreArrays(ids=np.arange(n), img=img, txt=img.copy(), img_mask=ones,
                                                 txt_mask=ones, modality=np.full(n, 2), target_modality=np.full(n, 2)),
                    encoder="e", kind="query" if name == "q" else "candidate", dtype="float32")
        return EmbeddingStore.open(tmp_path / name)

    queries, pool = store("q", n_queries), store("c", n_pool)
    counts = rng.integers(1, 5, n_queries)  # 1 to 4 positives per query
    pairs = TrainingPairs(query_rows=np.arange(n_queries), pos_offsets=np.concatenate([[0], np.cumsum(counts)]),
                          pos_rows=rng.integers(0, n_pool, counts.sum()))

    def epoch(e: int, positives: str) -> tuple[list[int], dict[int, int]]:
        order, chosen = [], {}
        for batch in iterate_batches(pairs, queries, pool, batch_size=4, epoch=e, seed=3, positives=positives):
            q, c = batch["q_img"][:, 0].long().tolist(), batch["c_img"][:, 0].long().tolist()
            order += q
            chosen.update(zip(q, c))
        return order, chosen

    fixed = [epoch(e, "fixed") for e in range(4)]
    redrawn = [epoch(e, "per_epoch") for e in range(4)]
    assert all(f[1] == fixed[0][1] for f in fixed)  # one draw for the whole run
    assert any(r[1] != redrawn[0][1] for r in redrawn)  # per_epoch draws anew
    assert [f[0] for f in fixed] == [r[0] for r in redrawn]  # same batches either way
    assert len({tuple(f[0]) for f in fixed}) == 4  # ... reshuffled every epoch
    for q, c in fixed[0][1].items():  # and every draw is one of the query's positives
        assert c in pairs.pos_rows[pairs.pos_offsets[q] : pairs.pos_offsets[q + 1]]


# ---- stage 1: the official GatherLayer, 2 processes --------------------------------------------
WORKER = textwrap.dedent('''
    import gc, json, os, sys
    import torch, torch.distributed as dist, torch.nn.functional as F
    from genius.common.distributed import init_distributed, wrap_ddp
    from genius.models.residual_quantization import train
    from genius.models.residual_quantization.model import RQModel

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    n, dim, temperature = 5, 8, 0.05
    # every rank can build the global batch; it uses only its own rows
    g = torch.Generator().manual_seed(0)
    Q = F.normalize(torch.randn(world * n, dim, generator=g), dim=-1)
    C = F.normalize(torch.randn(world * n, dim, generator=g), dim=-1)
    mine = slice(rank * n, (rank + 1) * n)
    result = {}
    for mode in ("all_ranks", "local_only"):
        q, c = Q[mine].clone().requires_grad_(), C[mine].clone().requires_grad_()
        train.contrastive_loss(q, c, temperature, mode).backward()
        result[mode] = [q.grad.tolist(), c.grad.tolist()]
    # a DDP training step with only the contrastive term
    batch = {}
    for side, seed in (("q", 10), ("c", 20)):
        g = torch.Generator().manual_seed(seed)
        batch.update({f"{side}_img": torch.randn(world * n, dim, generator=g)[mine],
                      f"{side}_txt": torch.randn(world * n, dim, generator=g)[mine],
                      f"{side}_img_mask": torch.ones(n), f"{side}_txt_mask": torch.ones(n)})
    batch.update(q_target_modality=torch.zeros(n, dtype=torch.long), c_modality=torch.zeros(n, dtype=torch.long))

    def ddp_gradient(mode):
        # in a function, as the training stages do: the DDP wrapper and its gloo work are freed on
        # return, before the group is destroyed (alive at interpreter exit, they can abort it)
        torch.manual_seed(0)
        model = RQModel(dim, 16, 16, 2, 4, "learned")
        sample = F.normalize(torch.randn(40, dim, generator=torch.Generator().manual_seed(1)), dim=-1)
        model.quantizer.initialise(sample, None, 5, torch.Generator().manual_seed(2))
        net = wrap_ddp(model.train(), init_distributed("cpu"), sync_buffers=False)
        cfg = train.TrainConfig(mse_weight=0.0, commit_weight=0.0, temperature=temperature, contrastive_gather=mode)
        losses, _ = train.training_step(net, batch, cfg, torch.device("cpu"), False)
        losses["loss"].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    grads = {mode: ddp_gradient(mode) for mode in ("all_ranks", "local_only")}
    result["ddp_ratio_error"] = float((grads["local_only"] - grads["all_ranks"] / world).abs().max()
                                      / grads["all_ranks"].abs().max())
    with open(sys.argv[1] + f".rank{rank}.json", "w") as f:
        json.dump(result, f)
    gc.collect()  # DDP's reducer sits in reference cycles
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infonce_gradient(Q: torch.Tensor, C: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of (CE(S) + CE(S^T)) / 2, S = Q C^T / T, targets on the diagonal, written out:
    dL/dS = ((row softmax of S - I) + (column softmax of S - I)) / 2N."""
    S = Q @ C.T / temperature
    eye = torch.eye(len(Q))
    dS = ((S.softmax(dim=1) - eye) + (S.softmax(dim=0) - eye)) / (2 * len(Q))
    return dS @ C / temperature, dS.T @ Q / temperature


def test_local_only_gather_keeps_one_over_world_size_of_the_contrastive_gradient(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "GENIUS_LOG_LEVEL": "WARNING"}
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")],
                                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err[-3000:]
    g = torch.Generator().manual_seed(0)
    Q = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    C = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    dQ, dC = infonce_gradient(Q, C, 0.05)
    for rank in range(2):
        result = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        mine = slice(5 * rank, 5 * rank + 5)
        # local_only: this rank's loss alone; all_ranks: both ranks' (identical) losses
        for mode, factor in (("local_only", 1), ("all_ranks", 2)):
            q_grad, c_grad = (torch.tensor(x) for x in result[mode])
            torch.testing.assert_close(q_grad, factor * dQ[mine], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(c_grad, factor * dC[mine], rtol=1e-4, atol=1e-6)
        # after DDP's average: the official contrastive gradient is 1/2 of the true one
        assert result["ddp_ratio_error"] < 1e-5


# ---- stage 2: warm-up and weight decay ------------------------------------------------------
def small_generator() -> IDGenerator:
    torch.manual_seed(0)
    return IDGenerator(make_arch(6, [3, 5, 5], num_prefix=2, d_model=8, num_heads=2, d_kv=4, d_ff=16,
                                 num_decoder_layers=2))


@pytest.mark.parametrize("start, first_factors", [("zero", [0, 1 / 4, 2 / 4, 3 / 4]),
                                                   ("first_step", [1 / 4, 2 / 4, 3 / 4, 4 / 4])])
def test_warmup_starts_at_lr_zero_officially_and_one_step_in_ours(start, first_factors):
    generator, total = small_generator(), 20
    cfg = train_gen.OptimConfig(lr=0.01, warmup_steps=4, warmup_start=start)
    optimizer, scheduler = train_gen.make_optimizer(generator, cfg, total)
    before = [p.detach().clone() for p in generator.parameters()]
    lrs = []
    for step in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        for p in generator.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        if step == 0:  # lr 0: AdamW moves no weight (decay is lr-scaled too)
            unchanged = all(torch.equal(a, b) for a, b in zip(before, generator.parameters()))
            assert unchanged == (start == "zero")
        scheduler.step()
    cosine = [0.5 * (1 + math.cos(math.pi * (t - 4) / (total - 4))) for t in range(4, total)]
    np.testing.assert_allclose(lrs, 0.01 * np.array(first_factors + cosine), rtol=1e-12, atol=1e-15)


def test_official_weight_decay_rule_also_exempts_the_relative_attention_bias():
    generator = small_generator()
    names = {id(p): n for n, p in generator.named_parameters()}
    groups = {}
    for rule in ("ndim", "official_names"):
        optimizer, _ = train_gen.make_optimizer(generator, train_gen.OptimConfig(no_decay=rule), 10)
        decayed, exempt = ({names[id(p)] for p in group["params"]} for group in optimizer.param_groups)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
        assert len(decayed) + len(exempt) == len(names)  # every (tied) parameter exactly once
        groups[rule] = decayed
    matrices = {n for n, p in generator.named_parameters() if p.ndim >= 2}
    bias_table = "t5.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert bias_table in matrices and "t5.shared.weight" in matrices
    assert groups["ndim"] == matrices
    assert groups["official_names"] == matrices - {bias_table}


# ---- the "paper settings" YAMLs ---------------------------------------------------------------
def test_paper_settings_yamls_select_every_official_behaviour():
    rq = load_config(train_rq.RQTrainConfig, SETTINGS / "large" / "train_rq.yaml")
    m, t = rq.model, rq.train
    assert m.dim is None  # taken from the embedding stores
    assert (m.proj_dim, m.hidden_dim, m.num_levels, m.codebook_size) == (2560, 5120, 9, 4096)
    assert (m.modality_mode, m.gradient_estimator, m.decay, m.eps, m.dead_code_threshold) == (
        "learned", "rotation", 0.9, 1e-5, 2.0)
    assert (t.contrastive_gather, t.positives, t.kmeans_seeds, t.kmeans_iters, t.kmeans_init_vectors) == (
        "local_only", "fixed", "random_rows", 1000, 16000)
    assert (t.mse_weight, t.commit_weight, t.temperature) == (100.0, 100.0, 0.01)
    assert (t.lr, t.min_lr, t.adam_eps, t.weight_decay, t.amp) == (1e-4, 1e-5, 1e-6, 0.2, True)
    assert (t.batch_size, t.epochs, t.seed) == (2000, 21, 2023)

    gen = load_config(train_gen.TrainGenConfig, SETTINGS / "large" / "train_gen.yaml")
    o, t = gen.optim, gen.train
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.grad_clip) == (1e-4, [0.9, 0.98], 1e-6, 1e-4, 1.0)
    assert (o.warmup_steps, o.warmup_start, o.no_decay) == (500, "zero", "official_names")
    assert (t.batch_size, t.epochs, t.positives, t.seed, t.amp) == (256, 31, "fixed", 2023, True)
    assert (gen.mixing.enabled, gen.mixing.alpha, gen.model.num_prefix, gen.model.pretrained) == (True, 2.0, 30, None)


def test_the_improved_setting_differs_from_the_official_one_only_by_its_listed_improvements():
    official = load_config(train_rq.RQTrainConfig, SETTINGS / "large" / "train_rq.yaml")
    improved = load_config(train_rq.RQTrainConfig, SETTINGS / "large_improved" / "train_rq.yaml")
    assert (improved.model.modality_mode, improved.model.gradient_estimator) == ("assigned", "straight_through")
    assert (improved.train.contrastive_gather, improved.train.positives, improved.train.kmeans_seeds) == (
        "all_ranks", "per_epoch", "distinct_rows")
    changed = {"model.modality_mode", "model.gradient_estimator", "train.contrastive_gather", "train.positives",
               "train.kmeans_seeds", "out_dir"}
    a, b = (semantic_config(c, train_rq.NOT_IN_RUN_KEY) for c in (official, improved))
    assert {k for k in a if a[k] != b[k]} | {"out_dir"} == changed
    assert improved.out_dir == "checkpoint/large_improved/rq"

    official = load_config(train_gen.TrainGenConfig, SETTINGS / "large" / "train_gen.yaml")
    improved = load_config(train_gen.TrainGenConfig, SETTINGS / "large_improved" / "train_gen.yaml")
    assert (improved.optim.warmup_start, improved.optim.no_decay, improved.train.positives) == (
        "first_step", "ndim", "per_epoch")
    assert improved.data.rq == "checkpoint/large_improved/rq/rq.pt"
    assert improved.out_dir == "checkpoint/large_improved/gen"
    a, b = flatten(config_to_dict(official)), flatten(config_to_dict(improved))
    assert {k for k in a if a[k] != b[k]} == {"optim.warmup_start", "optim.no_decay", "train.positives", "data.rq",
                                             "out_dir"}


def test_every_improved_stage_loads_and_writes_only_under_large_improved():
    from genius.feature_extraction.extract import ExtractConfig
    from genius.feature_extraction.train_clip import TrainClipConfig
    from genius.models.generative_retriever.evaluate import EvalConfig
    from genius.models.residual_quantization.assign_codes import AssignCodesConfig

    folder = SETTINGS / "large_improved"
    load = lambda cls, name: load_config(cls, folder / f"{name}.yaml")  # noqa: E731
    assert load(ExtractConfig, "extract") == load_config(ExtractConfig, SETTINGS / "large" / "extract.yaml")
    assert load(TrainClipConfig, "train_clip").output.run_dir == "checkpoint/large_improved/clip_sf"
    codes = load(AssignCodesConfig, "assign_codes")
    assert (codes.rq_path, codes.out_dir) == ("checkpoint/large_improved/rq/rq.pt", "checkpoint/large_improved/rq/codes")
    evaluation = load(EvalConfig, "eval")
    assert (evaluation.paths.rq_run, evaluation.paths.gen_run, evaluation.paths.results) == (
        "checkpoint/large_improved/rq", "checkpoint/large_improved/gen", "results/large_improved")
    assert (evaluation.decoding.level_head, evaluation.decoding.modality_threshold) == (True, 0.1)
    for stage in ("extract", "train_clip", "train_rq", "assign_codes", "train_gen", "eval"):
        script = (folder / f"run_{stage}.sh").read_text()
        assert 'source "$(dirname "$0")/../common.sh"' in script and f'"$(dirname "$0")/{stage}.yaml"' in script
