"""genius train-clip: UniIR's CLIP-SF recipe (score-fusion in-batch contrastive training).

Each training query (with its instruction) and one of its positive candidates, re-drawn every
epoch, are embedded by both CLIP towers and score-fused (``genius.common.fusion.score_fusion``):
``q = normalize(img_q * m + txt_q * m)``, ``c`` likewise. Logits are ``exp(logit_scale) q . c``
against every candidate of the global batch (gathered across ranks with gradients); the loss is
cross-entropy, symmetric (q->c and c->q) by default or UniIR's one-directional q->c
(``loss.direction``). An in-batch candidate that is the query's own positive (the same candidate
drawn twice, or a repeated query of the up-sampled training file) is not scored as a negative.

Optimisation follows UniIR: AdamW (weight decay on matrices only), cosine schedule (optional
warm-up), fp16 autocast + GradScaler on GPU, fp32 on CPU; ``logit_scale`` is learnable and kept
at most ``loss.max_logit_scale`` (CLIP's clamp). Training reads raw images and texts, not stores.

Outputs in ``output.run_dir``: ``checkpoints/epoch_XXXX.pt`` (resume state), ``metrics.jsonl``,
``config.yaml``, ``training_curves.png``, ``done.json`` and the final ``clip_sf.pt`` (weights +
architecture) that ``genius extract`` loads. A re-run does nothing when ``done.json`` records the
same run (semantic config; the content of the training files, the instructions and the initial
checkpoint; the size and time of every image; the global batch: genius.common.runstate), resumes
from the last checkpoint of the same run, or else moves the old run with its logs to
``stale/<time>/`` and starts over; ``output.force=true`` always retrains. Every number of the
config is range-checked before any work.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from genius.common import training
from genius.common.checkpoint import (
    load_scaler_state,
    remove_step_checkpoints,
    save_own_checkpoint,
    save_training_checkpoint,
)
from genius.common.config import config_to_dict, resolve_path
from genius.common.config_checks import check_output_dir
from genius.common.plots import plot_training_curves
from genius.common.distributed import (
    all_gather_with_grad,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    recheck_threads,
    seed_everything,
    set_cpu_threads,
    transformer_op_macs,
)
from genius.common.fusion import score_fusion
from genius.common.mbeir import hash_did, iter_candidates, load_queries, older_revision_twin, target_modality
from genius.common.pairs import TrainingPairs, batches_per_epoch
from genius.common.progress import Progress, clock_time
from genius.common.ranges import BATCH, EPOCHS, SEED, THREADS, check_ranges, ranged
from genius.common.runstate import RunKey, file_content, files_digest
from genius.common.stage import (
    MetricsLog,
    parse_stage_config,
    record_run,
    setup_logging,
    stage_parser,
    user_errors_exit,
)
from genius.feature_extraction.clip_model import (
    ImagePreprocess,
    ImageReader,
    image_size,
    load_clip,
    own_checkpoint,
    tokenizer_for,
)
from genius.feature_extraction.items import InstructionConfig, Item, QueryText, candidate_item, query_item

log = logging.getLogger("genius.train_clip")
FINAL_NAME = "clip_sf.pt"


# ---- config --------------------------------------------------------------------------------
@dataclass
class DataConfig:
    root: str = "M-BEIR"
    train_queries: str = "query/union_train/mbeir_union_up_train.jsonl"
    train_pool: str = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    instructions: str = "instructions/query_instructions.tsv"
    cache_images: bool = False  # keep decoded crops in RAM (small worlds; per DataLoader worker)


@dataclass
class ModelConfig:
    name: str = "ViT-L-14-quickgelu"  # open_clip architecture (ours: feature_extraction/model_configs/)
    init_checkpoint: str | None = None  # start from these weights (UniIR/OpenAI/open_clip/own); null: from scratch


@dataclass
class OptimConfig:
    epochs: int = ranged(20, EPOCHS)
    batch_size: int = ranged(105, BATCH)  # per process; the global batch (the negatives) is batch_size x processes
    lr: float = ranged(1e-5, "> 0")
    betas: tuple[float, float] = ranged((0.9, 0.98), "[0, 1)")
    eps: float = ranged(1e-6, "> 0")
    # matrices only (ndim >= 2); gains, biases, embeddings' 1-d vectors, logit_scale: 0
    weight_decay: float = ranged(0.2, ">= 0")
    warmup_steps: int = ranged(0, ">= 0")
    grad_clip_norm: float | None = ranged(None, "> 0")  # null: no clipping


@dataclass
class LossConfig:
    direction: Literal["symmetric", "query_to_candidate"] = "symmetric"  # UniIR: query_to_candidate
    mask_own_positives: bool = True  # an in-batch copy of the query's own positive is not a negative
    # Every in-batch candidate that is one of the query's positives is not a negative either. For
    # class-level relevance (genius import-images: every image of the query's class is relevant)
    # a batch holds several; scoring them as negatives pushes a class apart. UniIR: false.
    mask_all_positives: bool = False
    max_logit_scale: float = ranged(100.0, ">= 1")  # logit_scale is clamped to [0, log(max_logit_scale)]


@dataclass
class OutputConfig:
    run_dir: str = "checkpoint/large/clip_sf"
    save_every_epochs: int = ranged(1, ">= 1")
    # Also save every N optimiser steps inside an epoch (0: at epoch ends only). An M-BEIR epoch
    # is hours of GPU time; a re-run resumes from the step, with the same batches still to come.
    save_every_steps: int = ranged(0, ">= 0")
    log_every_steps: int = ranged(50, ">= 0")  # 0: epoch lines only
    force: bool = False  # retrain even when run_dir holds this run finished (the old run moves to stale/)


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp16: bool = True  # autocast + GradScaler on GPU; CPU always trains in fp32
    num_workers: int = ranged(4, ">= 0")
    cpu_threads: int | None = ranged(None, THREADS)  # CPU torch threads (null: common.distributed.ThreadPolicy)


@dataclass
class TrainClipConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    instructions: InstructionConfig = field(default_factory=InstructionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seed: int = ranged(2023, SEED)


def check_config(cfg: TrainClipConfig) -> None:
    """Every number in its range (before any work)."""
    check_ranges(cfg)


# What does not change what a run computes (logging, cadence, workers, device, paths: the inputs
# are fingerprinted by content instead); the per-process batch size counts as the global batch.
NOT_IN_RUN_KEY = ("output", "runtime.device", "runtime.num_workers", "runtime.cpu_threads", "optim.batch_size",
                  "data.root", "data.train_queries", "data.train_pool", "data.instructions", "data.cache_images",
                  "model.init_checkpoint")
# Options added after runs were recorded, at the value those runs computed with.
ADDED_LATER = {"loss.mask_all_positives": False}


# ---- data ----------------------------------------------------------------------------------
def data_file(cfg: TrainClipConfig, name: str) -> Path:
    """``data.<name>`` under the data root (an older M-BEIR's cand_pool/union_pool/ is found too)."""
    return older_revision_twin(resolve_path(cfg.data.root) / getattr(cfg.data, name))


class PairData(Dataset):
    """(query, positive candidate) pairs from the raw jsonl files; item = (query, candidate, epoch).

    Positives are re-drawn every epoch by ``epoch_batches``. Each item becomes the encoders'
    inputs (once ``attach`` gave the model's image preprocessing and tokenizer): CLIP tokens of
    the text (if any) and the uint8 crop of the image (if any).
    """

    def __init__(self, cfg: TrainClipConfig):
        self.queries = load_queries(data_file(cfg, "train_queries"))
        self.pool = [candidate_item(c) for c in iter_candidates(data_file(cfg, "train_pool"))]
        row_of = {item.id: row for row, item in enumerate(self.pool)}
        modality_of = {item.id: item.modality for item in self.pool}
        query_rows, offsets, positives = [], [0], []
        for i, query in enumerate(self.queries):
            rows = [row_of[h] for h in map(hash_did, query.pos) if h in row_of]
            if rows:
                query_rows.append(i)
                positives += rows
                offsets.append(len(positives))
        if not query_rows:
            raise ValueError(f"no training query has a positive in {data_file(cfg, 'train_pool')}")
        self.pairs = TrainingPairs(np.array(query_rows, np.int64), np.array(offsets, np.int64),
                                   np.array(positives, np.int64), len(self.queries) - len(query_rows))
        self.targets = [target_modality(q, modality_of) for q in self.queries]
        self.positive_ids = [frozenset(map(hash_did, q.pos)) for q in self.queries]
        self.query_text = QueryText(data_file(cfg, "instructions"), cfg.instructions.mode)
        self.seed = cfg.seed
        self.root, self.cache_images = resolve_path(cfg.data.root), cfg.data.cache_images
        self.reader, self.tokenizer = None, None

    def attach(self, preprocess: ImagePreprocess, tokenizer) -> None:
        self.reader = ImageReader(self.root, preprocess, cache=self.cache_images)
        self.tokenizer = tokenizer

    def image_paths(self) -> list[Path]:
        """Every image training reads: those of the queries with a positive and of the positives."""
        rel = {self.queries[i].img_path for i in self.pairs.query_rows.tolist()}
        rel |= {self.pool[row].img_path for row in set(self.pairs.pos_rows.tolist())}
        return [self.root / p for p in sorted(r for r in rel if r)]

    def __len__(self) -> int:
        return len(self.pairs)

    def query_item(self, index: int, epoch: int) -> Item:
        query = self.queries[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # "random" instruction mode: a new draw each epoch
        return query_item(query, self.targets[index], self.query_text(query, self.targets[index], rng))

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Item, Item, dict]:
        query_index, pool_row, epoch = key
        q, c = self.query_item(query_index, epoch), self.pool[pool_row]
        inputs = {side: self._inputs(item) for side, item in (("q", q), ("c", c))}
        return q, c, {**inputs, "positives": self.positive_ids[query_index]}

    def _inputs(self, item: Item) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        tokens = self.tokenizer([item.text])[0] if item.text else None
        pixels = self.reader(item.img_path) if item.img_path else None
        return pixels, tokens


def epoch_batches(pairs: TrainingPairs, batch_size: int, epoch: int, seed: int, rank: int,
                  world_size: int) -> list[list[tuple[int, int, int]]]:
    """This rank's slice of each global batch, as genius.common.pairs.iterate_batches cuts them.

    One seeded permutation and one positive draw per epoch; W ranks x batch B see exactly the
    pairs of one rank with batch W x B. Incomplete global batches are dropped.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(pairs))
    positives = pairs.sample_positives(rng)
    global_batch = batch_size * world_size
    batches = []
    for start in range(0, len(order) - global_batch + 1, global_batch):
        mine = order[start + rank * batch_size: start + (rank + 1) * batch_size]
        batches.append([(int(pairs.query_rows[i]), int(positives[i]), epoch) for i in mine])
    return batches


class EpochBatchSampler:
    """Batch sampler whose batches change with ``set_epoch``; lets one DataLoader (and its
    workers and image caches) live for the whole run."""

    def __init__(self, pairs: TrainingPairs, batch_size: int, seed: int, rank: int, world_size: int):
        self.args = (pairs, batch_size)
        self.seed, self.rank, self.world_size, self.epoch, self.skip = seed, rank, world_size, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The batches of ``epoch`` after its first ``skip`` (those a resumed run has already done)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return iter(epoch_batches(*self.args, self.epoch, self.seed, self.rank, self.world_size)[self.skip:])

    def __len__(self) -> int:
        return batches_per_epoch(len(self.args[0]), self.args[1], self.world_size) - self.skip


def _side(inputs: list[tuple[torch.Tensor | None, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    img_rows = [i for i, (pixels, _) in enumerate(inputs) if pixels is not None]
    txt_rows = [i for i, (_, tokens) in enumerate(inputs) if tokens is not None]
    return {
        "pixels": torch.stack([inputs[i][0] for i in img_rows]) if img_rows else torch.zeros(0, dtype=torch.uint8),
        "img_rows": torch.tensor(img_rows, dtype=torch.long),
        "tokens": torch.stack([inputs[i][1] for i in txt_rows]) if txt_rows else torch.zeros(0, dtype=torch.long),
        "txt_rows": torch.tensor(txt_rows, dtype=torch.long),
    }


def collate(batch: list[tuple[Item, Item, dict]]) -> dict:
    queries, cands, inputs = zip(*batch)
    return {"q": _side([x["q"] for x in inputs]), "c": _side([x["c"] for x in inputs]), "n": len(batch),
            "q_ids": torch.tensor([q.id for q in queries]), "c_ids": torch.tensor([c.id for c in cands]),
            "positives": [x["positives"] for x in inputs]}


# ---- model ---------------------------------------------------------------------------------
class ScoreFusionCLIP(torch.nn.Module):
    """Both sides of a batch through CLIP and score fusion, in one forward (so DDP syncs it)."""

    def __init__(self, clip: torch.nn.Module, preprocess: ImagePreprocess):
        super().__init__()
        self.clip, self.preprocess = clip, preprocess

    def forward(self, q: dict, c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One tower call per modality for both sides: bigger batches, one pass.
        pixels = torch.cat([q["pixels"], c["pixels"]])
        tokens = torch.cat([q["tokens"], c["tokens"]])
        img = self.clip.encode_image(self.preprocess.normalize(pixels)) if len(pixels) else None
        txt = self.clip.encode_text(tokens) if len(tokens) else None
        n_q_img, n_q_txt = len(q["pixels"]), len(q["tokens"])
        fused_q = self._fuse(q, img[:n_q_img] if img is not None else None, txt[:n_q_txt] if txt is not None else None)
        fused_c = self._fuse(c, img[n_q_img:] if img is not None else None, txt[n_q_txt:] if txt is not None else None)
        return fused_q, fused_c, self.clip.logit_scale.exp()

    def _fuse(self, side: dict, img: torch.Tensor | None, txt: torch.Tensor | None) -> torch.Tensor:
        n, dim, device = side["n"], self.clip.text_projection.shape[1], self.clip.logit_scale.device
        full_img = torch.zeros(n, dim, device=device)
        full_txt = torch.zeros(n, dim, device=device)
        img_mask = torch.zeros(n, device=device)
        txt_mask = torch.zeros(n, device=device)
        if img is not None and len(side["img_rows"]):
            full_img = full_img.index_copy(0, side["img_rows"], img.float())
            img_mask[side["img_rows"]] = 1
        if txt is not None and len(side["txt_rows"]):
            full_txt = full_txt.index_copy(0, side["txt_rows"], txt.float())
            txt_mask[side["txt_rows"]] = 1
        return score_fusion(full_img, full_txt, img_mask, txt_mask)


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(out, ids)
    return torch.cat(out)


def contrastive_loss(q: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, q_ids: torch.Tensor,
                     c_ids: torch.Tensor, cfg: LossConfig, rank: int,
                     positives: list[frozenset[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch InfoNCE of this rank's pairs against the global batch -> (loss, q->c top-1 accuracy).

    ``positives``: each query's positive (hashed) dids, for ``cfg.mask_all_positives``."""
    all_q, all_c = all_gather_with_grad(q), all_gather_with_grad(c)
    labels = torch.arange(len(q), device=q.device) + rank * len(q)
    own = torch.zeros(len(q), len(all_c), dtype=torch.bool, device=q.device)
    if cfg.mask_own_positives or cfg.mask_all_positives:
        all_q_ids, all_c_ids = _gather_ids(q_ids), _gather_ids(c_ids)
    if cfg.mask_own_positives:
        own = (c_ids[:, None] == all_c_ids[None, :]) | (q_ids[:, None] == all_q_ids[None, :])
    if cfg.mask_all_positives:
        if positives is None:
            raise ValueError("loss.mask_all_positives needs each query's positives")
        batch_ids = all_c_ids.tolist()
        own |= torch.tensor([[did in pos for did in batch_ids] for pos in positives], device=q.device)
    own[torch.arange(len(q)), labels] = False
    logits_qc = (scale * q @ all_c.T).masked_fill(own, float("-inf"))
    loss = F.cross_entropy(logits_qc, labels)
    if cfg.direction == "symmetric":
        logits_cq = (scale * c @ all_q.T).masked_fill(own, float("-inf"))
        loss = (loss + F.cross_entropy(logits_cq, labels)) / 2
    accuracy = (logits_qc.argmax(1) == labels).float().mean()
    return loss, accuracy


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """UniIR's AdamW: weight decay on matrices only (cosine schedule: ``training.warmup_cosine``)."""
    return training.adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, betas=cfg.betas)


# ---- run state -----------------------------------------------------------------------------
def run_key(cfg: TrainClipConfig, data: PairData, world_size: int) -> RunKey:
    """What the trained weights depend on: the semantic config, the training files' and the
    initial checkpoint's content, every image's size and time, the global batch."""
    inputs = {name: file_content(data_file(cfg, name)) for name in ("train_queries", "train_pool", "instructions")
              if cfg.instructions.mode != "none" or name != "instructions"}
    if cfg.model.init_checkpoint:
        inputs["init_checkpoint"] = file_content(resolve_path(cfg.model.init_checkpoint))
    inputs["images"] = files_digest(data.image_paths(), relative_to=data.root)
    return RunKey.of(cfg, NOT_IN_RUN_KEY, inputs, added_later=ADDED_LATER,
                     **training.batch_extra(cfg.optim.batch_size, world_size))


# ---- training ------------------------------------------------------------------------------
def train(cfg: TrainClipConfig) -> Path:
    check_config(cfg)
    dist = init_distributed(cfg.runtime.device, cfg.runtime.cpu_threads)
    try:
        return _train(cfg, dist)
    finally:
        cleanup()


def _train(cfg: TrainClipConfig, dist) -> Path:
    run_dir = check_output_dir("output.run_dir", resolve_path(cfg.output.run_dir))
    data = PairData(cfg)
    run = training.make_run(run_dir, run_key(cfg, data, dist.world_size), FINAL_NAME, stage="genius train-clip",
                            force=cfg.output.force, info=dist)
    with run.hold():
        if training.skip_if_done(run, run_dir / FINAL_NAME, "output.force"):
            return run_dir / FINAL_NAME
        return _train_run(cfg, dist, data, run)


def _train_run(cfg: TrainClipConfig, dist, data: PairData, run) -> Path:
    run_dir = run.out_dir
    sampler = EpochBatchSampler(data.pairs, cfg.optim.batch_size, cfg.seed, dist.rank, dist.world_size)
    training.steps_per_epoch(len(data), cfg.optim.batch_size, dist.world_size, "optim.batch_size")
    seed_everything(cfg.seed)  # identical initial weights on every rank
    # the initial checkpoint is read before a previous run is set aside, so a bad one leaves that run in place
    clip, model_name, arch = load_clip(resolve_path(cfg.model.init_checkpoint) if cfg.model.init_checkpoint else None,
                                       cfg.model.name)
    state = training.resume_point(run, dist, batch_key="optim.batch_size", force_key="output.force")
    if dist.device.type == "cpu":
        set_cpu_threads(cfg.runtime.cpu_threads, transformer_op_macs(clip, cfg.optim.batch_size))
    preprocess = ImagePreprocess(image_size(arch))
    model = ScoreFusionCLIP(clip, preprocess).to(dist.device)
    data.attach(preprocess, tokenizer_for(arch))
    log.info("%d training pairs (%d queries without a positive in the pool dropped), %s, %d process(es)",
             len(data), data.pairs.dropped_queries, model_name, dist.world_size)
    # The loader draws its worker seeds from its own generator, not the global RNG, so a run resumed
    # mid-epoch (which creates one more iterator) continues the global RNG exactly.
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.runtime.num_workers,
                        persistent_workers=cfg.runtime.num_workers > 0, pin_memory=dist.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = training.warmup_cosine(optimizer, cfg.optim.warmup_steps, cfg.optim.epochs * len(sampler))
    use_fp16 = cfg.runtime.fp16 and dist.device.type == "cuda"
    scaler = training.grad_scaler(cfg.runtime.fp16, dist.device)
    start_epoch, skip, first_totals = 0, 0, None
    if state is not None:
        model.clip.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        load_scaler_state(scaler, state["scaler"])
        if state.get("step") is None:
            start_epoch = state["epoch"] + 1
            log.info("resuming after epoch %d", state["epoch"])
        else:
            start_epoch, skip = state["epoch"], state["step"]
            first_totals = state.get("epoch_totals")  # absent from checkpoints of earlier versions
            log.info("resuming epoch %d after step %d", start_epoch, skip)
        training.restore_rng_states(state["rng"], dist, cfg.seed, (start_epoch, skip))
    if dist.is_main:
        record_run(run_dir, cfg)
        training.keep_metrics(run_dir / "metrics.jsonl", lambda r: r["epoch"] < start_epoch or (
            r["epoch"] == start_epoch and "step" in r and r["step"] <= skip))
    # find_unused_parameters: a rank whose batch holds no image (or no text) leaves a tower unused.
    ddp = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None,
                                  find_unused_parameters=True) if dist.world_size > 1 else model
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main)
    record = training.checkpoint_record(run, dist)

    def save(epoch: int, step: int | None = None, totals: torch.Tensor | None = None) -> None:
        """Rank 0 writes the resume state (mid-epoch: with the epoch's loss and accuracy sums so far,
        averaged over the ranks); step checkpoints before it are removed (all ranks wait)."""
        rng = training.gather_rng_states(dist)
        sums = {} if totals is None else {"epoch_totals": all_reduce_mean(totals).cpu()}
        if dist.is_main:
            path = save_training_checkpoint(run_dir, epoch, {
                "model": model.clip.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng, **sums, **record},
                step=step)
            remove_step_checkpoints(run_dir, keep=path)
        barrier()

    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch, skip if epoch == start_epoch else 0)
        stats = run_epoch(ddp, model, loader, optimizer, scheduler, scaler, use_fp16, cfg, dist, epoch, metrics,
                          first_step=sampler.skip, first_totals=first_totals if epoch == start_epoch else None,
                          save_step=lambda step, totals, epoch=epoch: save(epoch, step, totals))
        metrics.write(epoch=epoch, **stats)
        log.info("train-clip: epoch %d: loss %.4f, in-batch accuracy %.3f, %s", epoch, stats["loss"],
                 stats["accuracy"], clock_time(stats["seconds"]))
        if (epoch + 1) % cfg.output.save_every_epochs == 0 or epoch + 1 == cfg.optim.epochs:
            save(epoch)
    final = run_dir / FINAL_NAME
    if dist.is_main:
        save_own_checkpoint(own_checkpoint(model.clip, model_name, arch, run_key=run.key.as_dict(),
                                           config=config_to_dict(cfg)), final)
        log.info("wrote %s", final)
        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png", "stage 0: CLIP-SF training")
        run.finish([final], world_size=dist.world_size, epochs=cfg.optim.epochs)
    barrier()
    return final


def run_epoch(ddp, model, loader, optimizer, scheduler, scaler, use_fp16, cfg, dist, epoch, metrics,
              first_step: int = 0, first_totals: torch.Tensor | None = None, save_step=None) -> dict:
    """Train over the loader's batches (steps ``first_step`` onwards of ``epoch``; ``first_totals``:
    the loss and accuracy sums of the steps before, from a mid-epoch checkpoint, so the epoch's means
    cover all its steps); ``save_step(n, sums)`` is called after every ``output.save_every_steps``-th
    step n that does not end the epoch."""
    ddp.train()
    device, started = dist.device, time.time()
    totals = torch.zeros(2, device=device) if first_totals is None else first_totals.to(device, torch.float32)
    counted = 0 if first_totals is None else first_step  # steps whose sums ``totals`` holds already
    last_step = first_step + len(loader)
    progress = Progress(last_step, f"train-clip: epoch {epoch}", done=first_step, logger=log, end_line=False,
                        enabled=dist.is_main)
    for step, batch in enumerate(progress.wrap(loader), start=first_step):
        recheck_threads()
        q, c = (_to_device(batch[side], batch["n"], device) for side in ("q", "c"))
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_fp16):
            fused_q, fused_c, scale = ddp(q, c)
        loss, accuracy = contrastive_loss(fused_q, fused_c, scale.float(), batch["q_ids"].to(device),
                                          batch["c_ids"].to(device), cfg.loss, dist.rank, batch["positives"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch} step {step}; "
                                     "lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        clip = None if cfg.optim.grad_clip_norm is None else (model.parameters(), cfg.optim.grad_clip_norm)
        training.optimizer_step(scaler, optimizer, scheduler, clip)
        with torch.no_grad():  # CLIP's clamp: a temperature below 1/max_logit_scale destabilises training
            model.clip.logit_scale.clamp_(0, math.log(cfg.loss.max_logit_scale))
        totals += torch.stack([loss.detach(), accuracy.detach()])
        progress.set_postfix(loss=loss.detach().item)  # read only when a progress line shows it
        if cfg.output.log_every_steps and (step + 1) % cfg.output.log_every_steps == 0:
            metrics.write(epoch=epoch, step=step + 1, loss=loss.item(), accuracy=accuracy.item(),
                          lr=scheduler.get_last_lr()[0], logit_scale=model.clip.logit_scale.exp().item())
        every = cfg.output.save_every_steps
        if save_step is not None and every and (step + 1) % every == 0 and step + 1 < last_step:
            save_step(step + 1, totals)
    mean = all_reduce_mean(totals / max(1, last_step - first_step + counted))
    return {"loss": mean[0].item(), "accuracy": mean[1].item(), "lr": scheduler.get_last_lr()[0],
            "logit_scale": model.clip.logit_scale.exp().item(), "seconds": round(time.time() - started, 2)}


def _to_device(side: dict, n: int, device: torch.device) -> dict:
    return {"n": n, **{k: v.to(device, non_blocking=True) for k, v in side.items()}}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("genius train-clip", "Stage 0: train CLIP-SF with UniIR's score-fusion contrastive recipe.")
    cfg, _ = parse_stage_config(TrainClipConfig, parser, argv)
    with user_errors_exit(parser):
        train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
