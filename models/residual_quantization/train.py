"""genius train-rq: train the Combiner and the modality-decoupled residual quantizer (stage 1).

Reads stage 0's training query store and training pool store plus the training query jsonl (for
positives), trains on (query, positive) pairs with

    loss = InfoNCE(z_q, z_c) + 100 * MSE(q_hat, c_hat) + 100 * commitment

(symmetric InfoNCE at temperature 0.01 over the batch gathered from every rank; q_hat, c_hat the
normalised quantized vectors; codebooks move by EMA only). ``train.objective: classification``
trains IRGen's tokenizer instead (see ``classification_losses``): cross-entropy of a classifier on
z and of a second one on each partial reconstruction, plus a residual penalty, over the classes
the query file's relevance defines (genius.common.pairs.class_labels); the two classifiers exist
only in the training checkpoints. It writes to ``out_dir``:
``rq.pt`` (see model.py), ``checkpoints/epoch_XXXX.pt`` every ``save_every`` epochs and at the end,
``metrics.jsonl``, the resolved ``config.yaml`` and ``done.json``. A re-run does nothing when
``done.json`` records the same run (semantic config, the query file's content and the two stores'
content ids, the global batch: genius.common.runstate), resumes from the last checkpoint of the
same run, or else moves the old run with its logs to ``out_dir/stale/<time>/`` and starts afresh;
``train.force=true`` always retrains. Every number of the config is range-checked before any work.

The defaults are the paper's settings with this project's fixes (assigned modality level,
whole-stack straight-through gradient, all-rank contrastive gradients, per-epoch positives,
distinct k-means seeds); ``model.modality_level: false`` drops the modality level (IRGen's IDs:
``num_levels`` levels of ``codebook_size`` codes); ``model.modality_mode``, ``model.gradient_estimator``,
``train.contrastive_gather``, ``train.positives`` and ``train.kmeans_seeds`` select the official
code's behaviour instead (configs_scripts/large/train_rq.yaml sets all of them).

Single process: ``genius train-rq --config F``; several: ``torchrun --nproc_per_node N -m
genius.models.residual_quantization.train --config F`` (``train.batch_size`` is per process).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from genius.common.checkpoint import load_scaler_state, load_state_dict_strict, save_training_checkpoint
from genius.common.config import config_to_dict, resolve_path
from genius.common.config_checks import check_output_dir
from genius.common.mbeir import older_revision_twin
from genius.common.distributed import (
    DistInfo,
    GatherGradient,
    all_gather_with_grad,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    recheck_threads,
    seed_everything,
    wrap_ddp,
)
from genius.common.cpu import fp32_products_in_onednn
from genius.common.fp_env import subnormals_flushed
from genius.common import training
from genius.common.ranges import BATCH, EPOCHS, SEED, THREADS, WIDTH, check_ranges, ranged
from genius.common.runstate import RunKey, file_content
from genius.common.pairs import (
    ClassLabels,
    PositiveDraw,
    class_labels,
    TrainingPairs,
    iterate_batches,
    load_training_pairs,
)
from genius.common.plots import plot_training_curves
from genius.common.progress import Progress, clock_time
from genius.common.stage import (
    MetricsLog,
    parse_stage_config,
    record_run,
    setup_logging,
    stage_parser,
    user_errors_exit,
)
from genius.common.store import EmbeddingStore, StoreError
from genius.models.residual_quantization.code_stats import perplexity
from genius.models.residual_quantization.model import RQModel, RQOutput, cpu_state, save_rq
from genius.models.residual_quantization.quantizer import (
    GradientEstimator,
    KmeansSeeds,
    ModalityMode,
    broadcast_codebooks,
    check_codebooks_in_sync,
    code_counts,
)

log = logging.getLogger("genius.train_rq")


# ---- config ---------------------------------------------------------------------------------
@dataclass
class DataConfig:  # defaults: M-BEIR with UniIR's CLIP-SF features
    query_file: str = "M-BEIR/query/union_train/mbeir_union_up_train.jsonl"
    pool_file: str = "M-BEIR/cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    query_store: str = "extracted_embed/CLIP_SF/train/mbeir_union_up_train"
    pool_store: str = "extracted_embed/CLIP_SF/train/mbeir_union_train_cand_pool"
    encoder: str | None = None  # the encoder name both stores must record (None: not checked)


@dataclass
class ModelConfig:
    dim: int | None = ranged(None, WIDTH)  # None: the stores' vector width
    proj_dim: int = ranged(2560, WIDTH)
    hidden_dim: int = ranged(5120, WIDTH)
    num_levels: int = ranged(9, "[1, 64]")  # including the modality level
    codebook_size: int = ranged(4096, "[2, 65536]")  # K of levels 1..L-1 (of every level without a modality level)
    # false: no level is the modality, all num_levels levels are k-means/EMA levels of codebook_size
    # codes (IRGen's 4 x 256 IDs for an image-only collection, where the modality says nothing).
    modality_level: bool = True
    # Level 0. assigned: the code is the modality (a candidate's own, for a query the one its
    # instruction asks for) and its codeword that modality's EMA mean, so 0/1/2 = image/text/
    # image+text by construction. learned: the official code's 3-code k-means/EMA level with no
    # dead-code reset, whose codes mean whatever k-means made of them.
    modality_mode: ModalityMode = "assigned"
    decay: float = ranged(0.9, "(0, 1)")
    eps: float = ranged(1e-5, "(0, 1]")
    dead_code_threshold: float = ranged(2.0, ">= 0")  # 0: never re-seed a dead code
    # The gradient the quantized output passes back to the Combiner (quantizer.py's docstring
    # gives the formulas). straight_through: the identity once for the whole stack.
    # straight_through_per_level: vector-quantize-pytorch <= 1.17.x as the official code calls it,
    # the identity per level summed over levels, i.e. num_levels x the identity (MSE gradient 9x
    # ours at paper size). rotation: the rotation trick per level, the library's default since
    # 1.18 (October 2024) and so what an unpinned install of June-July 2025 ran.
    gradient_estimator: GradientEstimator = "straight_through"


Objective = Literal["contrastive", "classification"]


@dataclass
class TrainConfig:
    batch_size: int = ranged(2000, BATCH)  # pairs per process (the run key records batch_size x processes)
    epochs: int = ranged(21, EPOCHS)
    lr: float = ranged(1e-4, "> 0")
    min_lr: float = ranged(1e-5, ">= 0")  # cosine floor (<= lr), stepped per iteration
    adam_eps: float = ranged(1e-6, "> 0")
    weight_decay: float = ranged(0.2, ">= 0")  # matrices only
    temperature: float = ranged(0.01, "> 0")
    mse_weight: float = ranged(100.0, ">= 0")
    commit_weight: float = ranged(100.0, ">= 0")
    # contrastive: the loss above. classification: IRGen's tokenizer loss over the classes of the
    # query file's relevance (its weights below; temperature and the mse and commit weights unused).
    objective: Objective = "contrastive"
    classification_weight: float = ranged(1.0, ">= 0")  # both cross-entropies (on z, on the partial reconstructions)
    residual_weight: float = ranged(1.0, ">= 0")  # sum over levels of mean((z - partial reconstruction)^2)
    amp: bool = True  # fp16 autocast + GradScaler on CUDA; ignored on CPU
    seed: int = ranged(2023, SEED)
    kmeans_iters: int = ranged(1000, ">= 1")
    # query+positive vectors (all ranks) gathered for k-means init; at least model.codebook_size
    kmeans_init_vectors: int = ranged(16384, ">= 1")
    # k-means seeds. distinct_rows: K rows with distinct values, so no two codes start equal.
    # random_rows: K random rows as vector-quantize-pytorch draws them (distinct indices), so a
    # value that occurs twice in the sample (a query identical to its positive) can seed two
    # equal codes, one of which then stays empty until the dead-code reset.
    kmeans_seeds: KmeansSeeds = "distinct_rows"
    # The InfoNCE's gathered embeddings. all_ranks: each rank's vectors get the gradient of every
    # rank's (identical, global) loss, so the update is the global loss's gradient. local_only:
    # the official GatherLayer, which keeps only this rank's own loss's gradient; with DDP's
    # average the contrastive gradient is then 1/processes of the true one (1/4 in the official
    # 4-GPU run) against unchanged MSE and commitment gradients. One process: no difference.
    contrastive_gather: GatherGradient = "all_ranks"
    # per_epoch: each query's positive is drawn anew every epoch (all positives get used).
    # fixed: one draw for the whole run, as the official dataset drew once at construction.
    positives: PositiveDraw = "per_epoch"
    save_every: int = ranged(5, ">= 1")  # epochs
    # end this run early (as if killed) once this many epochs are done
    stop_after_epochs: int | None = ranged(None, ">= 1")
    log_every: int = ranged(50, ">= 1")  # steps
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = ranged(None, THREADS)  # CPU torch threads (null: common.distributed.ThreadPolicy)
    force: bool = False  # retrain even when out_dir holds this run finished (the old run moves to stale/)


@dataclass
class RQTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "checkpoint/large/rq"


def check_config(cfg: RQTrainConfig) -> None:
    """Every number in its range, and the limits between values (before any work)."""
    check_ranges(cfg)
    if cfg.train.min_lr > cfg.train.lr:
        raise ValueError(f"train.min_lr: {cfg.train.min_lr} is above train.lr ({cfg.train.lr}); the cosine floor "
                         "must lie in [0, train.lr]")
    if cfg.train.kmeans_init_vectors < cfg.model.codebook_size:
        raise ValueError(f"train.kmeans_init_vectors: {cfg.train.kmeans_init_vectors} is below model.codebook_size "
                         f"({cfg.model.codebook_size}); it must be at least that, so every code gets a seed row")
    if not cfg.model.modality_level and cfg.model.modality_mode == "learned":
        raise ValueError("model.modality_mode: 'learned' names how the modality level is trained, but "
                         "model.modality_level is false (no such level); drop one of the two")


# What does not change what a run computes (logging, cadence, device, paths: the inputs are
# fingerprinted by content instead); the per-process batch size counts as the global batch.
NOT_IN_RUN_KEY = ("out_dir", "train.save_every", "train.stop_after_epochs", "train.log_every", "train.device",
                  "train.cpu_threads", "train.force", "train.batch_size", "data.query_file", "data.pool_file",
                  "data.query_store", "data.pool_store")
# Options added after runs were recorded, at the value those runs computed with.
ADDED_LATER = {"model.modality_level": True, "train.objective": "contrastive", "train.classification_weight": 1.0,
               "train.residual_weight": 1.0}
FINAL = "rq.pt"


# ---- data -----------------------------------------------------------------------------------
@dataclass
class TrainingData:
    queries: EmbeddingStore
    pool: EmbeddingStore
    pairs: TrainingPairs
    labels: ClassLabels | None  # the training classes (only the classification objective reads them)
    inputs: dict  # fingerprints of what the run reads (portable: a copied GENIUS_ROOT keeps them)


def open_training_data(cfg: DataConfig, dim: int | None, objective: Objective = "contrastive") -> TrainingData:
    query_file, pool_file = resolve_path(cfg.query_file), older_revision_twin(resolve_path(cfg.pool_file))
    query_store, pool_store = resolve_path(cfg.query_store), resolve_path(cfg.pool_store)
    for path in (query_file, pool_file):
        if not path.is_file():
            raise FileNotFoundError(f"training file {path} does not exist (data.query_file / data.pool_file)")
    queries = EmbeddingStore.open(query_store, dim=dim, encoder=cfg.encoder, kind="query", source=query_file)
    pool = EmbeddingStore.open(pool_store, dim=dim, encoder=cfg.encoder, kind="candidate", source=pool_file)
    if queries.dim != pool.dim:
        raise StoreError(f"query store {query_store} holds {queries.dim}-d vectors, pool store {pool_store} {pool.dim}-d")
    pairs = load_training_pairs(query_file, queries, pool)
    labels = class_labels(query_file, pool, pairs) if objective == "classification" else None
    if labels is not None:
        log.info("%d classes among the training pairs (connected groups of the relevance in %s)",
                 labels.num_classes, query_file)
    inputs = {"query_file": file_content(query_file), "query_store": queries.content_id,
              "pool_store": pool.content_id}
    return TrainingData(queries, pool, pairs, labels, inputs)


def model_arch(cfg: ModelConfig, dim: int) -> dict:
    return {"dim": dim, "proj_dim": cfg.proj_dim, "hidden_dim": cfg.hidden_dim, "num_levels": cfg.num_levels,
            "codebook_size": cfg.codebook_size, "modality_mode": cfg.modality_mode, "decay": cfg.decay,
            "eps": cfg.eps, "dead_code_threshold": cfg.dead_code_threshold,
            "gradient_estimator": cfg.gradient_estimator, "modality_level": cfg.modality_level}


# ---- resume -----------------------------------------------------------------------------------
def restore(checkpoint: dict, model, heads, optimizer, scheduler, scaler, info: DistInfo, seed: int) -> int:
    """Load a training checkpoint into the live objects; returns the number of epochs done."""
    load_state_dict_strict(model, checkpoint["model"], "RQ training checkpoint")
    if heads is not None:
        load_state_dict_strict(heads, checkpoint["heads"], "RQ training checkpoint (classifiers)")
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    load_scaler_state(scaler, checkpoint["scaler"])
    training.restore_rng_states(checkpoint["rng"], info, seed, (int(checkpoint["epoch"]),))
    log.info("resumed after epoch %d", checkpoint["epoch"])
    return int(checkpoint["epoch"])


# ---- optimisation ---------------------------------------------------------------------------
def make_optimisation(model: nn.Module, cfg: TrainConfig, total_steps: int, use_amp: bool, device: torch.device):
    """AdamW (torch's default betas; weight decay on matrices only) over ``model`` (the RQ model,
    with the classifiers when there are), per-step cosine to ``min_lr``, GradScaler (fp16 on GPU)."""
    optimizer = training.adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    scheduler = training.cosine_to_floor(optimizer, total_steps, cfg.min_lr)
    return optimizer, scheduler, training.grad_scaler(use_amp, device)


@torch.no_grad()
def initialise_codebooks(model: RQModel, data: TrainingData, cfg: TrainConfig, info: DistInfo) -> None:
    """k-means (level 0: modality means) on at least ``kmeans_init_vectors`` query+positive vectors.

    The first training batches are embedded by the untrained Combiner and gathered from all ranks
    (queries of every rank, then positives: the order of a one-process run with the global batch),
    so a batch smaller than K never forces duplicate seeds. Rank 0 fits, then broadcasts.
    """
    vectors, modalities, count = [], [], 0
    for batch in iterate_batches(data.pairs, data.queries, data.pool, batch_size=cfg.batch_size, epoch=0,
                                 seed=cfg.seed, rank=info.rank, world_size=info.world_size, positives=cfg.positives):
        for side, level0 in (("q", "q_target_modality"), ("c", "c_modality")):
            z = model.embed(*(batch[f"{side}_{k}"] for k in ("img", "txt", "img_mask", "txt_mask")))
            vectors.append(all_gather_with_grad(z))
            modalities.append(all_gather_with_grad(batch[level0].to(info.device)))
            count += len(vectors[-1])
        if count >= cfg.kmeans_init_vectors:
            break
    log.info("initialising codebooks by k-means on %d vectors", count)
    if info.is_main:
        generator = torch.Generator().manual_seed(cfg.seed)
        model.quantizer.initialise(torch.cat(vectors), torch.cat(modalities), cfg.kmeans_iters, generator,
                                   cfg.kmeans_seeds)
    broadcast_codebooks(model.quantizer)


# ---- one step -------------------------------------------------------------------------------
def contrastive_loss(z_q: torch.Tensor, z_c: torch.Tensor, temperature: float,
                     gather: GatherGradient = "all_ranks") -> torch.Tensor:
    """Symmetric InfoNCE over the global batch, gathered with gradients as ``gather`` says
    (``TrainConfig.contrastive_gather``)."""
    q, c = all_gather_with_grad(z_q, gather), all_gather_with_grad(z_c, gather)
    logits = q @ c.T / temperature
    target = torch.arange(len(q), device=q.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class ClassifierHeads(nn.Module):
    """IRGen's two training-only linear classifiers: ``fc`` reads z, ``fc_rq`` every partial reconstruction."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.fc_rq = nn.Linear(dim, num_classes)

    def forward(self, z: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, dim], reconstructions [L, B, dim] -> logits [B, C] and [L, B, C]."""
        return self.fc(z), self.fc_rq(reconstructions)


def classification_losses(heads, out: RQOutput, labels: torch.Tensor, cfg: TrainConfig) -> dict:
    """IRGen's tokenizer loss on z [B, dim] with classes ``labels`` [B]: CE(fc(z)) + sum over levels
    of CE(fc_rq(partial)) + sum over levels of mean((z - partial)^2), each partial reconstruction
    passed straight-through (its value, z's gradient) to the classifier and held constant in the
    penalty; the codebooks themselves move by EMA only."""
    z_logits, rq_logits = heads(out.z, straight_through(out))
    levels = len(out.partials)
    losses = {
        "classification": cfg.classification_weight * F.cross_entropy(z_logits, labels),
        # the mean over levels x rows, times the levels: the sum over levels of each level's mean
        "reconstruction_classification": cfg.classification_weight * levels * F.cross_entropy(
            rq_logits.flatten(0, 1), labels.repeat(levels)),
        "residual": cfg.residual_weight * (out.z - out.partials).pow(2).mean(dim=(1, 2)).sum(),
    }
    losses["loss"] = losses["classification"] + losses["reconstruction_classification"] + losses["residual"]
    return losses


def straight_through(out: RQOutput) -> torch.Tensor:
    """The partial reconstructions [L, B, dim] in value, with z's gradient."""
    return out.z + (out.partials - out.z).detach()


@torch.no_grad()
def classification_hits(heads: ClassifierHeads, out: RQOutput, labels: torch.Tensor, first_level: int) -> dict:
    """The step's counts for the epoch metrics: rows the classifiers get right on z and on the full
    reconstruction, and rows whose ``first_level`` code's most frequent class in the batch is their
    own (none when there is no such level)."""
    z_logits, rq_logits = heads(out.z, out.partials[-1:])
    hits = {"classifier_accuracy": (z_logits.argmax(1) == labels).sum(),
            "reconstruction_accuracy": (rq_logits[0].argmax(1) == labels).sum()}
    if first_level < out.codes.shape[1]:
        hits["first_level_purity"] = majority_hits(out.codes[:, first_level], labels, z_logits.shape[1])
    return hits


def majority_hits(codes: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many of the rows have their own class as their code's most frequent class among the rows."""
    keys, counts = torch.unique(codes * num_classes + labels, return_counts=True)
    majority = torch.zeros(int(keys.max()) // num_classes + 1, dtype=counts.dtype, device=counts.device)
    return majority.scatter_reduce_(0, keys // num_classes, counts, "amax").sum()


def training_step(net, batch: dict, cfg: TrainConfig, device: torch.device, use_amp: bool,
                  heads=None) -> tuple[dict, RQOutput]:
    """Queries then their positives through one forward; level 0 = target modality / own modality
    (when the quantizer has a modality level). ``heads``: the classification objective's classifiers."""
    size = len(batch["q_img"])

    def both(key: str) -> torch.Tensor:
        return torch.cat([batch[f"q_{key}"], batch[f"c_{key}"]]).to(device, non_blocking=True)

    # Left on the host: the quantizer checks the codes there (no sync) and moves them itself.
    level0 = torch.cat([batch["q_target_modality"], batch["c_modality"]])
    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        out = net(both("img"), both("txt"), both("img_mask"), both("txt_mask"), level0)
    if cfg.objective == "classification":
        return classification_losses(heads, out, pair_labels(batch, device), cfg), out
    quantized = F.normalize(out.quantized, dim=-1)
    losses = {
        "contrastive": contrastive_loss(out.z[:size], out.z[size:], cfg.temperature, cfg.contrastive_gather),
        "mse": cfg.mse_weight * F.mse_loss(quantized[:size], quantized[size:]),
        "commit": cfg.commit_weight * out.commit_loss,
    }
    losses["loss"] = losses["contrastive"] + losses["mse"] + losses["commit"]
    return losses, out


def pair_labels(batch: dict, device: torch.device) -> torch.Tensor:
    """The class of every row of a step's forward: queries, then their positives (the same class)."""
    return batch["label"].to(device, non_blocking=True).repeat(2)


def check_finite(losses: dict, epoch: int, step: int) -> None:
    """Stop (on every rank alike) when any loss term is NaN or infinite."""
    finite = torch.stack([v.detach().float() for v in losses.values()]).isfinite().all().float()
    if all_reduce_mean(finite).item() < 1:
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step} ({values} on this rank); training "
                                 "stopped, the last checkpoint is intact. Check the input stores for NaN/inf vectors "
                                 "or lower train.lr.")


def optimise(net, t: Trainer, batch: dict, cfg: TrainConfig, device: torch.device, tally: EpochTally, epoch: int,
             step: int, heads=None) -> dict:
    """One training step (forward, finite check, backward, optimiser and schedule, tally); the losses.

    Its host syncs, whatever the number of levels: the finite check, the quantizer's check that
    it is initialised, and its dead-code counts of all levels (test_rq_training counts them); the
    classification objective's batch purity adds its own. ``heads``: ``t.heads`` as the step runs
    them (under DDP when distributed)."""
    losses, out = training_step(net, batch, cfg, device, t.use_amp, heads)
    hits = ({} if t.heads is None else
            classification_hits(t.heads, out, pair_labels(batch, device), int(t.model.has_modality_level)))
    check_finite(losses, epoch, step)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(losses["loss"]).backward()
    training.optimizer_step(t.scaler, t.optimizer, t.scheduler)
    tally.add(losses, out, hits)
    return losses


class EpochTally:
    """Per-epoch sums of losses, code usage, query/positive code agreement and the classification
    objective's counts (reduced over ranks)."""

    def __init__(self, codebook_sizes: list[int], device: torch.device, modality_level: bool = True):
        self.modality_level = modality_level
        self.losses: dict[str, torch.Tensor] = {}
        self.hits: dict[str, torch.Tensor] = {}
        self.usage = [torch.zeros(k, device=device) for k in codebook_sizes]
        self.prefix_match = torch.zeros(len(codebook_sizes), device=device)
        self.resets = torch.zeros(len(codebook_sizes), dtype=torch.long)
        self.pairs = torch.zeros((), device=device)
        self.steps = 0

    @torch.no_grad()
    def add(self, losses: dict, out: RQOutput, hits: dict | None = None) -> None:
        for key, value in losses.items():
            self.losses[key] = self.losses.get(key, 0) + value.detach().float()
        for key, value in (hits or {}).items():
            self.hits[key] = self.hits.get(key, 0) + value.float()
        for level, usage in enumerate(self.usage):
            usage += code_counts(out.codes[:, level], len(usage))
        size = len(out.codes) // 2
        # share of queries whose first l+1 codes equal their positive's
        self.prefix_match += (out.codes[:size] == out.codes[size:]).long().cumprod(dim=1).sum(0)
        self.resets += out.resets
        self.pairs += size
        self.steps += 1

    def summary(self) -> dict:
        means = {key: all_reduce_mean(value).item() / self.steps for key, value in self.losses.items()}
        usage = [_all_reduce_sum(u).cpu().numpy() for u in self.usage]
        pairs = _all_reduce_sum(self.pairs)
        match = (_all_reduce_sum(self.prefix_match) / pairs).tolist()
        # shares of all rows, queries and positives alike
        shares = {key: (_all_reduce_sum(value) / (2 * pairs)).item() for key, value in self.hits.items()}
        modality = {"modality_accuracy": match[0]} if self.modality_level else {}
        return {**means, **modality, "prefix_match": match, **shares,
                "perplexity": [perplexity(u) for u in usage], "codes_used": [int((u > 0).sum()) for u in usage],
                "dead_code_resets": self.resets.tolist()}


LOSS_TERMS = ("contrastive", "mse", "commit", "classification", "reconstruction_classification", "residual")
CLASSIFICATION_SHARES = ("classifier_accuracy", "reconstruction_accuracy", "first_level_purity")


def log_epoch(epoch: int, summary: dict, seconds: float) -> None:
    """The epoch's figures on the console (metrics.jsonl has them all); the dead-code resets of the
    epoch in one line per epoch (each step's are logged at DEBUG level by the quantizer)."""
    terms = ", ".join(f"{key} {summary[key]:.4f}" for key in LOSS_TERMS if key in summary)
    shares = "".join(f", {key} {summary[key]:.3f}" for key in CLASSIFICATION_SHARES if key in summary)
    log.info("train-rq: epoch %d: loss %.4f (%s)%s, codes used per level %s, %s", epoch, summary["loss"], terms,
             shares, summary["codes_used"], clock_time(seconds))
    log.info("train-rq: epoch %d: dead codes reset per level %s", epoch, summary["dead_code_resets"])


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


# ---- the run --------------------------------------------------------------------------------
def train(cfg: RQTrainConfig) -> Path | None:
    """Run (or resume, or skip when done) training; returns the final ``rq.pt`` path, or None when
    stopped early."""
    check_config(cfg)
    owns_group = not (dist.is_available() and dist.is_initialized())
    # the Combiner's widest matmul
    info = init_distributed(cfg.train.device, cfg.train.cpu_threads,
                            op_macs=cfg.train.batch_size * cfg.model.hidden_dim * cfg.model.proj_dim)
    try:
        return _train(cfg, info)
    finally:
        if owns_group:
            cleanup()


@dataclass
class Trainer:
    model: RQModel
    heads: ClassifierHeads | None  # the classification objective's classifiers (training only)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    use_amp: bool
    start_epoch: int


def build_trainer(cfg: RQTrainConfig, data: TrainingData, checkpoint: dict | None, info: DistInfo) -> Trainer:
    """Model, optimizer, schedule and scaler, restored from ``checkpoint`` or freshly initialised."""
    tc = cfg.train
    steps = training.steps_per_epoch(len(data.pairs), tc.batch_size, info.world_size, "train.batch_size")
    use_amp = tc.amp and info.device.type == "cuda"
    seed_everything(tc.seed)  # identical initial weights on every rank
    model = RQModel.from_arch(model_arch(cfg.model, data.queries.dim)).to(info.device)
    heads = (ClassifierHeads(data.queries.dim, data.labels.num_classes).to(info.device)
             if tc.objective == "classification" else None)
    trained = model if heads is None else nn.ModuleList([model, heads])
    optimizer, scheduler, scaler = make_optimisation(trained, tc, tc.epochs * steps, use_amp, info.device)
    seed_everything(tc.seed + info.rank)
    if checkpoint is not None:
        start = restore(checkpoint, model, heads, optimizer, scheduler, scaler, info, tc.seed)
    else:
        start = 0
        initialise_codebooks(model, data, tc, info)
    return Trainer(model, heads, optimizer, scheduler, scaler, steps, use_amp, start)


def save_checkpoint(run_dir: Path, epochs_done: int, t: Trainer, record: dict, info: DistInfo) -> None:
    rng = training.gather_rng_states(info)
    if info.is_main:
        save_training_checkpoint(run_dir, epochs_done, {
            "model": cpu_state(t.model), "arch": t.model.arch, "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict(), "rng": rng,
            **({} if t.heads is None else {"heads": cpu_state(t.heads)}), **record})


def run_key(cfg: RQTrainConfig, data: TrainingData, world_size: int) -> RunKey:
    """What rq.pt depends on: the semantic config, the inputs' content, the global batch (and the
    process count where train.contrastive_gather=local_only makes the gradient depend on it)."""
    extra = training.batch_extra(cfg.train.batch_size, world_size)
    if cfg.train.contrastive_gather == "local_only":
        extra["world_size"] = world_size
    return RunKey.of(cfg, NOT_IN_RUN_KEY, data.inputs, added_later=ADDED_LATER, **extra)


def _train(cfg: RQTrainConfig, info: DistInfo) -> Path | None:
    tc, run_dir = cfg.train, check_output_dir("out_dir", resolve_path(cfg.out_dir))
    data = open_training_data(cfg.data, cfg.model.dim, tc.objective)
    run = training.make_run(run_dir, run_key(cfg, data, info.world_size), FINAL, stage="genius train-rq",
                            force=tc.force, info=info)
    with run.hold():
        if training.skip_if_done(run, run_dir / FINAL, "train.force"):
            return run_dir / FINAL
        training.steps_per_epoch(len(data.pairs), tc.batch_size, info.world_size, "train.batch_size")
        checkpoint = training.resume_point(run, info, batch_key="train.batch_size", force_key="train.force")
        t = build_trainer(cfg, data, checkpoint, info)
        return _run_epochs(cfg, data, t, run, info)


def _run_epochs(cfg: RQTrainConfig, data: TrainingData, t: Trainer, run, info: DistInfo) -> Path | None:
    tc, run_dir = cfg.train, run.out_dir
    if info.is_main:
        record_run(run_dir, cfg)
        training.keep_metrics(run_dir / "metrics.jsonl", lambda r: r["epoch"] < t.start_epoch)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=info.is_main)
    record = training.checkpoint_record(run, info)
    net = wrap_ddp(t.model, info, sync_buffers=False)
    heads = None if t.heads is None else wrap_ddp(t.heads, info)
    labels = None if data.labels is None else data.labels.pool
    log.info("training on %d pairs, %d steps per epoch, epochs %d..%d", len(data.pairs), t.steps_per_epoch,
             t.start_epoch, tc.epochs - 1)
    # CPU training: subnormals flushed (common/fp_env.py), fp32 products in oneDNN on AMD CPUs (common/cpu.py)
    with subnormals_flushed(info.device), fp32_products_in_onednn(info.device):
        for epoch in range(t.start_epoch, tc.epochs):
            started = time.monotonic()
            tally = EpochTally(t.model.codebook_sizes, info.device, t.model.has_modality_level)
            batches = iterate_batches(data.pairs, data.queries, data.pool, batch_size=tc.batch_size, epoch=epoch,
                                      seed=tc.seed, rank=info.rank, world_size=info.world_size, positives=tc.positives,
                                      labels=labels)
            progress = Progress(t.steps_per_epoch, f"train-rq: epoch {epoch}", logger=log, end_line=False,
                                enabled=info.is_main)
            for step, batch in enumerate(progress.wrap(batches)):
                recheck_threads()
                losses = optimise(net, t, batch, tc, info.device, tally, epoch, step, heads)
                progress.set_postfix(loss=losses["loss"].detach().item)  # read only when a progress line shows it
                if step % tc.log_every == 0:  # the step's losses, read in one host sync
                    values = all_reduce_mean(torch.stack([v.detach().float() for v in losses.values()])).tolist()
                    metrics.write(epoch=epoch, step=epoch * t.steps_per_epoch + step, lr=t.scheduler.get_last_lr()[0],
                                  **dict(zip(losses, values)))
            check_codebooks_in_sync(t.model.quantizer)
            summary = tally.summary()
            metrics.write(epoch=epoch, epoch_summary=True, **summary)
            if info.is_main:
                log_epoch(epoch, summary, time.monotonic() - started)
            done = epoch + 1
            stopping = tc.stop_after_epochs is not None and tc.stop_after_epochs <= done < tc.epochs
            if done % tc.save_every == 0 or done == tc.epochs or stopping:
                save_checkpoint(run_dir, done, t, record, info)
            if stopping:
                log.info("stopping after epoch %d as train.stop_after_epochs asks; re-run to resume", epoch)
                barrier()
                return None
    if info.is_main:
        fingerprint = save_rq(run_dir / FINAL, t.model, config=config_to_dict(cfg), run_key=run.key.as_dict())
        log.info("wrote %s (fingerprint %s)", run_dir / FINAL, fingerprint[:12])
        plot_training_curves(run_dir / "metrics.jsonl", run_dir / "training_curves.png", "stage 1: residual quantizer")
        run.finish([run_dir / FINAL], fingerprint=fingerprint, world_size=info.world_size, epochs=tc.epochs)
    barrier()
    return run_dir / FINAL


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("genius train-rq", "Stage 1: train the Combiner and the residual quantizer.")
    cfg, _ = parse_stage_config(RQTrainConfig, parser, argv)
    with user_errors_exit(parser):
        train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
