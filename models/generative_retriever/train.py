"""Stage 2: train the ID generator (``genius train-gen``).

For each (query, positive) pair of the training queries the frozen stage-1 model gives the
normalised Combiner outputs z_q and z_c and the positive's L codes (recomputed every batch; level
0 from the candidate's modality when the quantizer has a modality level). The generator reads
the query-target mix of z_q and z_c and is trained with cross-entropy on the L code tokens
(teacher forcing). AdamW with linear warm-up and cosine decay to 0, per step; gradient clipping;
fp16 autocast with GradScaler on GPU; DDP under torchrun. Checkpoints after every
``checkpoint_every`` epochs.
``model.condition: image_tokens`` (IRGen's decoder, generator module docstring) reads the query's
image instead: its pixels from ``data.root`` + ``query_img_path``, through the visual tower of
the stage-0 CLIP-SF ``model.vision_checkpoint``, trained at ``optim.lr`` x ``optim.vision_lr_scale``
(0 freezes it); the targets are the positives' codes as above, and mixing does not apply.
``optim.warmup_start``, ``optim.no_decay`` and ``train.positives`` select the official code's
warm-up, weight-decay rule and fixed positives (configs_scripts/large/train_gen.yaml sets them).

Outputs in ``out_dir``: ``generator.pt`` (see ``generator.load_generator``), ``metrics.jsonl``
(loss, teacher-forced exact match, per-level accuracy, lr), ``config.yaml``, ``checkpoints/``,
``training_curves.png``, ``done.json``. A re-run does nothing when ``done.json`` records the same
run (semantic config, the query file's content, the two stores' content ids, rq.pt's fingerprint,
the global batch; with image_tokens also the vision checkpoint's content and the query images'
paths, sizes and mtimes: genius.common.runstate), resumes from the last checkpoint of the same run, or
else moves the old run with its logs to ``out_dir/stale/<time>/`` and starts afresh;
``train.force=true`` always retrains. Every number of the config is range-checked before any work.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from genius.common import training
from genius.common.checkpoint import checkpoint_file, load_scaler_state, load_state_dict_strict, save_training_checkpoint
from genius.common.config import config_to_dict, resolve_path
from genius.common.config_checks import check_output_dir
from genius.common.mbeir import older_revision_twin
from genius.common.distributed import (
    DistInfo, all_reduce_mean, barrier, cleanup, init_distributed, recheck_threads, seed_everything, wrap_ddp,
)
from genius.common.cpu import fp32_products_in_onednn
from genius.common.fp_env import subnormals_flushed
from genius.common.pairs import (
    PositiveDraw, RowSource, TrainingPairs, add_self_pairs, iterate_batches, load_training_pairs,
)
from genius.common.plots import plot_training_curves
from genius.common.progress import Progress, clock_time
from genius.common.ranges import BATCH, EPOCHS, SEED, THREADS, WIDTH, check_ranges, ranged
from genius.common.runstate import RunKey, file_content
from genius.common.stage import (
    MetricsLog,
    parse_stage_config,
    record_run,
    setup_logging,
    stage_parser,
    user_errors_exit,
)
from genius.common.store import EmbeddingStore, StoreError, store_path
from genius.models.generative_retriever.generator import (
    IMAGE_TOKENS,
    PREFIX,
    T5_SMALL,
    IDGenerator,
    load_pretrained_t5,
    make_arch,
    save_generator,
    vision_arch,
)
from genius.models.generative_retriever.mixing import mix_query_target
from genius.models.generative_retriever.query_images import (
    QueryImages, images_digest, query_image_paths,
)
from genius.models.generative_retriever.vocab import code_offsets, codes_to_tokens

log = logging.getLogger("genius.train_gen")


# ---- config ---------------------------------------------------------------------------------
@dataclass
class DataConfig:
    root: str = "M-BEIR"  # M-BEIR-format data root
    embed_root: str = "extracted_embed"
    encoder: str = "CLIP_SF"  # encoder name of the embedding stores
    train_queries: str = "query/union_train/mbeir_union_up_train.jsonl"  # relative to root
    train_pool: str = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"  # relative to root
    rq: str = "checkpoint/large/rq/rq.pt"  # the frozen stage-1 model
    # Candidate pools to index (DSI's indexing), relative to root: each of their candidates that the
    # training pool lacks is also trained on as a pair (candidate -> itself), read from the pool's
    # store (the one eval reads: <embed_root>/<encoder>/cand/<pool stem>), so the generator learns
    # the IDs of the candidates it will be asked to retrieve. Empty: the training pairs alone (paper).
    index_pools: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    num_prefix: int = ranged(30, "[1, 4096]")
    d_model: int = ranged(T5_SMALL["d_model"], WIDTH)
    num_heads: int = ranged(T5_SMALL["num_heads"], "[1, 1024]")
    d_kv: int = ranged(T5_SMALL["d_kv"], WIDTH)
    d_ff: int = ranged(T5_SMALL["d_ff"], WIDTH)
    num_decoder_layers: int = ranged(T5_SMALL["num_decoder_layers"], "[1, 256]")
    dropout: float = ranged(T5_SMALL["dropout"], "[0, 1)")
    pretrained: str | None = None  # a local T5 directory (save_pretrained format); shapes then come from it
    code_embedding_scale: float = ranged(100.0, "> 0")
    # prefix: num_prefix vectors projected from the query's Combiner output (GENIUS). image_tokens:
    # the query image's tokens from the visual tower of vision_checkpoint (IRGen); needs mixing off.
    condition: Literal["prefix", "image_tokens"] = PREFIX
    vision_checkpoint: str | None = None  # the stage-0 CLIP-SF checkpoint (clip_sf.pt); image_tokens only


@dataclass
class MixingConfig:
    enabled: bool = True
    alpha: float = ranged(2.0, "> 0")  # the mixing weights' Beta(alpha, alpha)


@dataclass
class OptimConfig:
    lr: float = ranged(1e-4, "> 0")
    betas: list[float] = ranged(spec="[0, 1)", factory=lambda: [0.9, 0.98])
    eps: float = ranged(1e-6, "> 0")
    weight_decay: float = ranged(1e-4, ">= 0")  # on the parameters no_decay leaves decayed
    # Which parameters get no weight decay. ndim: those with < 2 dimensions (biases, norms).
    # official_names: the official rule, < 2 dimensions or a name containing 'bn', 'ln', 'bias'
    # or 'logit_scale'; on this model that also exempts T5's relative_attention_bias embedding
    # [buckets, heads], the only matrix whose name says bias.
    no_decay: Literal["ndim", "official_names"] = "ndim"
    warmup_steps: int = ranged(500, ">= 0")
    # Linear warm-up factor at step t (counted from 0). first_step: (t + 1) / warmup_steps, so the
    # first update already moves the weights and the last warm-up step reaches lr. zero: the
    # official t / warmup_steps, whose first update has lr 0 (it only fills AdamW's moments).
    warmup_start: training.WarmupStart = "first_step"
    grad_clip: float = ranged(1.0, "> 0")
    vision_lr_scale: float = ranged(0.01, ">= 0")  # the vision tower's lr = lr x this (image_tokens); 0 freezes it
    label_smoothing: float = ranged(0.0, "[0, 1)")  # of the code-token cross-entropy, over the level's codes (code_loss)


@dataclass
class TrainConfig:
    epochs: int = ranged(31, EPOCHS)
    batch_size: int = ranged(256, BATCH)  # per process (the run key records batch_size x processes)
    seed: int = ranged(2023, SEED)
    # per_epoch: each query's positive is drawn anew every epoch. fixed: one draw for the whole
    # run, as the official dataset drew once at construction.
    positives: PositiveDraw = "per_epoch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = ranged(None, THREADS)  # CPU torch threads (null: common.distributed.ThreadPolicy)
    amp: bool = True  # fp16 autocast + GradScaler (GPU only)
    log_every: int = ranged(50, ">= 1")  # steps
    checkpoint_every: int = ranged(1, ">= 1")  # epochs
    keep_checkpoints: int = ranged(2, ">= 1")
    force: bool = False  # retrain even when out_dir holds this run finished (the old run moves to stale/)


@dataclass
class TrainGenConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "checkpoint/large/gen"


def check_config(cfg: TrainGenConfig) -> None:
    """Every number in its range (before any work)."""
    check_ranges(cfg)
    if len(cfg.optim.betas) != 2:
        raise ValueError(f"optim.betas: {cfg.optim.betas} must hold two numbers in [0, 1), e.g. [0.9, 0.98]")
    if cfg.model.condition == IMAGE_TOKENS:
        if cfg.mixing.enabled:
            raise ValueError("mixing.enabled: query-target mixing mixes prefix vectors and does not apply to "
                             "model.condition: image_tokens; set mixing.enabled: false")
        if cfg.model.vision_checkpoint is None:
            raise ValueError("model.vision_checkpoint: model.condition image_tokens needs the stage-0 CLIP-SF "
                             "checkpoint whose visual tower reads the query images; set it (e.g. "
                             "checkpoint/<setting>/clip_sf/clip_sf.pt)")
    elif cfg.model.vision_checkpoint is not None:
        raise ValueError("model.vision_checkpoint: only read with model.condition: image_tokens; set the condition "
                         "or remove the checkpoint")
    if cfg.data.index_pools and cfg.model.condition == IMAGE_TOKENS:
        raise ValueError("data.index_pools: indexing trains on (candidate -> itself) through the candidates' "
                         "embeddings, which model.condition: image_tokens does not read; set data.index_pools: []")


# What does not change what a run computes (logging, cadence, device, paths: the inputs are
# fingerprinted by content instead); the per-process batch size counts as the global batch.
NOT_IN_RUN_KEY = ("out_dir", "train.device", "train.cpu_threads", "train.force", "train.log_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.batch_size", "data.root",
                  "data.embed_root", "data.train_queries", "data.train_pool", "data.rq", "data.index_pools",
                  "model.pretrained", "model.vision_checkpoint")
# Options added after runs were recorded, at the value those runs computed with.
ADDED_LATER = {"model.condition": "prefix", "optim.vision_lr_scale": 0.01, "optim.label_smoothing": 0.0}
FINAL = "generator.pt"


# ---- the loop -------------------------------------------------------------------------------
def train(cfg: TrainGenConfig) -> Path:
    """Train (or resume, or skip when done); returns the path of ``generator.pt``."""
    check_config(cfg)
    # a decoder layer's feed-forward matmul over the batch's prefix tokens
    info = init_distributed(cfg.train.device, cfg.train.cpu_threads, op_macs=cfg.train.batch_size
                            * cfg.model.num_prefix * cfg.model.d_model * cfg.model.d_ff)
    out_dir = check_output_dir("out_dir", resolve_path(cfg.out_dir))
    rq, rq_print = load_frozen_rq(resolve_path(cfg.data.rq), info.device)
    pairs, queries, pool, inputs = open_training_data(cfg, rq.arch["dim"])
    inputs["rq"] = rq_print
    if cfg.model.pretrained:
        inputs["pretrained"] = folder_content(resolve_path(cfg.model.pretrained))
    root, image_paths = resolve_path(cfg.data.root), None
    if cfg.model.condition == IMAGE_TOKENS:
        image_paths = query_image_paths(root / cfg.data.train_queries, queries, root, rows=pairs.query_rows)
        inputs["vision"] = file_content(check_vision_checkpoint(cfg.model.vision_checkpoint))
        inputs["query_images"] = images_digest(root, image_paths)
    key = RunKey.of(cfg, NOT_IN_RUN_KEY, inputs, added_later=ADDED_LATER,
                    **training.batch_extra(cfg.train.batch_size, info.world_size))
    run = training.make_run(out_dir, key, FINAL, stage="genius train-gen", force=cfg.train.force, info=info)
    with run.hold():
        if training.skip_if_done(run, out_dir / FINAL, "train.force"):
            return out_dir / FINAL
        steps_per_epoch = training.steps_per_epoch(len(pairs), cfg.train.batch_size, info.world_size,
                                                   "train.batch_size")
        seed_everything(cfg.train.seed + info.rank)
        # built before a previous run is set aside, so a bad pretrained folder or vision checkpoint
        # leaves that run in place; a resumed run restores its own weights and RNG over it
        fresh = new_generator(cfg.model, rq)
        resume = training.resume_point(run, info, batch_key="train.batch_size", force_key="train.force")
        generator = (IDGenerator(resume["arch"]) if resume else fresh).to(info.device)
        del fresh  # resumed: not kept beside the run's own
        images = None
        if image_paths is not None:
            images = QueryImages(root, image_paths, generator.preprocess)
            if cfg.optim.vision_lr_scale == 0:
                generator.vision.requires_grad_(False)
        optimizer, scheduler = make_optimizer(generator, cfg.optim, steps_per_epoch * cfg.train.epochs)
        scaler = training.grad_scaler(cfg.train.amp, info.device)
        start_epoch = restore(resume, generator, optimizer, scheduler, scaler, info, cfg.train.seed) if resume else 0
        model = wrap_ddp(generator, info)
        step = start_epoch * steps_per_epoch
        if info.is_main:
            record_run(out_dir, cfg)
            training.keep_metrics(out_dir / "metrics.jsonl", lambda r: r["step"] <= step)
        metrics, window = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main), Window()
        record = {**training.checkpoint_record(run, info), "rq": rq_print}
        # CPU training: subnormals flushed (common/fp_env.py), fp32 products in oneDNN on AMD CPUs (common/cpu.py)
        with subnormals_flushed(info.device), fp32_products_in_onednn(info.device):
            for epoch in range(start_epoch, cfg.train.epochs):
                train_mode(model, generator, cfg.optim.vision_lr_scale)
                started, epoch_loss = time.monotonic(), EpochLoss()
                batches = iterate_batches(pairs, queries, pool, batch_size=cfg.train.batch_size, epoch=epoch,
                                          seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                                          positives=cfg.train.positives)
                progress = Progress(steps_per_epoch, f"train-gen: epoch {epoch}", logger=log, end_line=False,
                                    enabled=info.is_main)
                for batch in progress.wrap(batches):
                    if images is not None:
                        batch["q_pixels"] = images(batch["q_row"].numpy())
                    recheck_threads()
                    loss, hits = train_step(model, rq, batch, optimizer, scheduler, scaler, cfg, info.device)
                    window.add(loss, hits)
                    progress.set_postfix(loss=loss.item)  # read only when a progress line shows it
                    step += 1
                    if step % cfg.train.log_every == 0 or step % steps_per_epoch == 0:
                        counted, logged = window.count, window.flush()
                        if not math.isfinite(logged["loss"]):
                            check_weights_finite(generator, cfg, epoch, step)
                        metrics.write(epoch=epoch, step=step, lr=scheduler.get_last_lr()[0],
                                      **epoch_loss.add(counted, logged))
                if info.is_main:
                    log.info("train-gen: epoch %d: loss %.4f, exact match %.3f, %s", epoch, epoch_loss.loss,
                             epoch_loss.exact_match, clock_time(time.monotonic() - started))
                if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
                    save_checkpoint(out_dir, epoch, generator, optimizer, scheduler, scaler, record, info, cfg)
        final = out_dir / FINAL
        if info.is_main:
            fingerprint = save_generator(final, generator, config_to_dict(cfg), rq_print, run_key=key.as_dict())
            log.info("wrote %s", final)
            plot_training_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", "stage 2: ID generator")
            run.finish([final], fingerprint=fingerprint, world_size=info.world_size, epochs=cfg.train.epochs,
                       steps=step, last=metrics.read()[-1:])
        barrier()
        return final


def train_step(model, rq, batch: dict, optimizer, scheduler, scaler, cfg: TrainGenConfig,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step; returns the loss and the teacher-forced hits [B, L] (detached).

    The generator reads the query-target mix of z_q and z_c, or with image_tokens the batch's
    ``q_pixels`` (uint8 query images)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.no_grad():
        z_c = rq.embed(batch["c_img"], batch["c_txt"], batch["c_img_mask"], batch["c_txt_mask"])
        target = rq.encode(z_c, batch["c_modality"] if rq.has_modality_level else None)
        if "q_pixels" not in batch:
            z_q = rq.embed(batch["q_img"], batch["q_txt"], batch["q_img_mask"], batch["q_txt_mask"])
    tokens = codes_to_tokens(target, rq.codebook_sizes)
    if "q_pixels" in batch:
        inputs = batch["q_pixels"]
    else:
        inputs = mix_query_target(z_q, z_c, cfg.mixing.alpha, cfg.mixing.enabled)
    with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
        logits = model(inputs, target)
    loss = code_loss(logits, tokens, rq.codebook_sizes, cfg.optim.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    training.optimizer_step(scaler, optimizer, scheduler, (model.parameters(), cfg.optim.grad_clip))
    return loss.detach(), (logits.detach().argmax(-1) == tokens)


def check_weights_finite(generator, cfg: TrainGenConfig, epoch: int, step: int) -> None:
    """After a logged window with a NaN or infinite loss: stop when the weights hold NaN/inf (the
    run diverged; every later step would train on them). Finite weights mean fp16's loss scaler
    skipped the overflowing steps, and training goes on. Checked where every rank logs the same
    window, before any checkpoint of the epoch is written."""
    if all(bool(p.isfinite().all()) for p in generator.parameters()):
        return
    raise FloatingPointError(
        f"train-gen diverged: the loss is not finite at epoch {epoch} step {step} and the generator's weights hold "
        f"NaN/inf; training stopped, the last checkpoint is intact. Lower optim.lr (now {cfg.optim.lr:g}) or "
        f"model.code_embedding_scale (now {cfg.model.code_embedding_scale:g}), or check the stores for NaN/inf vectors")


class Window:
    """Running sums of the logged metrics between two log lines (kept on the device: no sync per step)."""

    def __init__(self):
        self.loss, self.hits, self.count = 0.0, None, 0

    def add(self, loss: torch.Tensor, hits: torch.Tensor) -> None:
        exact = hits.all(dim=1, keepdim=True)
        summed = torch.cat([hits, exact], dim=1).float().sum(0)
        self.hits = summed if self.hits is None else self.hits + summed
        self.loss, self.count = self.loss + loss * len(hits), self.count + len(hits)

    def flush(self) -> dict:
        """Means over the window (and over ranks): loss, exact_match, level_acc [L]."""
        values = all_reduce_mean(torch.cat([self.loss.reshape(1), self.hits]) / self.count).tolist()
        self.__init__()
        return {"loss": values[0], "exact_match": values[-1], "level_acc": values[1:-1]}


class EpochLoss:
    """An epoch's mean loss and exact match, from the logged windows (host numbers: no sync)."""

    def __init__(self):
        self.pairs, self.loss, self.exact_match = 0, 0.0, 0.0

    def add(self, pairs: int, window: dict) -> dict:
        """Count a flushed window of ``pairs`` pairs in; returns the window."""
        total = self.pairs + pairs
        self.loss += (window["loss"] - self.loss) * pairs / total
        self.exact_match += (window["exact_match"] - self.exact_match) * pairs / total
        self.pairs = total
        return window


# ---- pieces ---------------------------------------------------------------------------------
def load_frozen_rq(path: Path, device: torch.device):
    """The stage-1 model (eval mode, no gradients) and the fingerprint of its rq.pt."""
    from genius.models.residual_quantization.model import load_rq, rq_fingerprint

    if not path.is_file():
        raise FileNotFoundError(f"stage-1 model {path} does not exist; run train-rq first (or set data.rq)")
    rq = load_rq(path).to(device).eval().requires_grad_(False)
    return rq, rq_fingerprint(path)


def open_training_data(cfg: TrainGenConfig, dim: int) -> tuple[TrainingPairs, RowSource, RowSource, dict]:
    """Training pairs over the query and pool stores, with ``data.index_pools``' self-pairs over
    stacks of stores; also the fingerprints of what the result depends on (the query file's
    content, the stores' content ids)."""
    root, embed_root = resolve_path(cfg.data.root), resolve_path(cfg.data.embed_root)
    query_file, pool_file = root / cfg.data.train_queries, older_revision_twin(root / cfg.data.train_pool)
    stores = []
    for source, kind in ((query_file, "query"), (pool_file, "candidate")):
        path = store_path(embed_root, cfg.data.encoder, "train", source)
        stores.append(EmbeddingStore.open(path, dim=dim, encoder=cfg.data.encoder, kind=kind, source=source))
    # before the training file's read, so that a wrong entry fails at once
    index_stores = [open_index_store(cfg, root, embed_root, i, dim) for i in range(len(cfg.data.index_pools))]
    pairs = load_training_pairs(query_file, *stores)
    if pairs.dropped_queries:
        log.warning("%d training queries have no positive in %s; skipped", pairs.dropped_queries, stores[1].path)
    inputs = {"train_queries": file_content(query_file), "query_store": stores[0].content_id,
              "pool_store": stores[1].content_id}
    queries, pool = stores
    if index_stores:
        trained = len(pairs)
        pairs, queries, pool, added = add_self_pairs(pairs, queries, pool, index_stores)
        for store, count in zip(index_stores, added):
            log.info("train-gen: indexing %d of the %d candidates of %s (the others are in the training pool or an "
                     "earlier index pool)", count, len(store), store.path)
        log.info("train-gen: %d training pairs and %d self-pairs", trained, len(pairs) - trained)
        # the order counts: a candidate in two index pools is indexed from the first
        inputs["index_stores"] = [store.content_id for store in index_stores]
    return pairs, queries, pool, inputs


def open_index_store(cfg: TrainGenConfig, root: Path, embed_root: Path, i: int, dim: int) -> EmbeddingStore:
    """The candidate store of ``data.index_pools[i]``, as stage 0 extracted it for eval."""
    key = f"data.index_pools[{i}]"
    source = older_revision_twin(root / cfg.data.index_pools[i])
    if not source.is_file():
        raise FileNotFoundError(f"{key}: {source} does not exist; name a candidate pool jsonl relative to data.root "
                                "(e.g. cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl)")
    path = store_path(embed_root, cfg.data.encoder, "cand", source)
    try:
        return EmbeddingStore.open(path, dim=dim, encoder=cfg.data.encoder, kind="candidate", source=source)
    except StoreError as err:
        raise StoreError(f"{key}: {err}") from None


def code_loss(logits: torch.Tensor, tokens: torch.Tensor, codebook_sizes: list[int], smoothing: float) -> torch.Tensor:
    """Cross-entropy of the code tokens [B, L] under the full-vocabulary logits [B, L, V]. Label
    smoothing puts its share on the level's own codes, uniformly: the only tokens the trie ever
    allows at that step (IRGen's vocabulary is one level's codes), not the other levels' codes or
    the special tokens."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    if smoothing == 0:
        return nll
    log_probs = F.log_softmax(logits.float(), dim=-1)
    spread = torch.stack([-log_probs[:, level, lo : lo + size].mean(-1) for level, (lo, size)
                          in enumerate(zip(code_offsets(codebook_sizes), codebook_sizes))], dim=1)
    return (1 - smoothing) * nll + smoothing * spread.mean()


def folder_content(folder: Path) -> dict:
    """The content fingerprints of every file in ``folder`` (a pretrained T5 directory)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model.pretrained: {folder} is not a folder; point it at a T5 directory saved with "
                                "save_pretrained")
    return {p.relative_to(folder).as_posix(): file_content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def new_generator(cfg: ModelConfig, rq) -> IDGenerator:
    """Randomly initialised (or pretrained-T5) generator with code embeddings from the codebooks;
    with image_tokens, its vision tower holds the visual tower of ``cfg.vision_checkpoint``."""
    codebooks = [c.detach().float().cpu() for c in rq.codebooks()]
    shape = {k: getattr(cfg, k) for k in ("d_model", "num_heads", "d_kv", "d_ff", "num_decoder_layers", "dropout")}
    clip, vision = None, None
    if cfg.condition == IMAGE_TOKENS:
        from genius.feature_extraction.clip_model import load_clip

        clip, name, clip_cfg = load_clip(check_vision_checkpoint(cfg.vision_checkpoint), None)
        vision = vision_arch(name, clip_cfg)
    arch = make_arch(codebooks[0].shape[1], rq.codebook_sizes, cfg.num_prefix, vision, **shape)
    t5 = None
    if cfg.pretrained:
        t5, arch = load_pretrained_t5(resolve_path(cfg.pretrained), arch)
    generator = IDGenerator(arch, t5)
    generator.init_code_embeddings(codebooks, scale=cfg.code_embedding_scale)
    if clip is not None:
        tower = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}  # the tower keeps no projection
        load_state_dict_strict(generator.vision, tower, f"visual tower of {cfg.vision_checkpoint}")
    return generator


def check_vision_checkpoint(path: str) -> Path:
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"model.vision_checkpoint: {resolved} does not exist; run genius train-clip (or point "
                                "it at the stage-0 CLIP-SF checkpoint the stores were extracted with)")
    return resolved


def train_mode(model, generator: IDGenerator, vision_lr_scale: float) -> None:
    """Training mode, except a frozen vision tower (``optim.vision_lr_scale`` 0), which stays in
    eval mode (its patch dropout off) as well as without gradients."""
    model.train()
    if generator.condition == IMAGE_TOKENS and vision_lr_scale == 0:
        generator.vision.eval()


# Name parts that exempt a parameter from weight decay under the official rule.
OFFICIAL_NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale")


def decays(name: str, param: torch.Tensor, rule: str) -> bool:
    """Whether ``optim.no_decay`` = ``rule`` leaves the parameter ``name`` weight-decayed."""
    if param.ndim < 2:
        return False
    return rule == "ndim" or not any(part in name for part in OFFICIAL_NO_DECAY_NAMES)


def make_optimizer(generator: IDGenerator, cfg: OptimConfig, total_steps: int):
    """AdamW (weight decay as ``cfg.no_decay`` says) and warm-up + cosine-to-zero, per iteration.
    A trainable vision tower's parameters get groups of their own at lr x ``cfg.vision_lr_scale``
    (the schedule scales every group's lr alike); the first group stays the decoder's."""
    optimizer = training.adamw(generator, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps, betas=cfg.betas,
                               decays=lambda name, param: decays(name, param, cfg.no_decay))
    if generator.condition == IMAGE_TOKENS:
        tower = {id(p) for p in generator.vision.parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in tower]
            group["params"] = [p for p in group["params"] if id(p) not in tower]
            if moved:
                optimizer.add_param_group({"params": moved, "weight_decay": group["weight_decay"],
                                           "lr": cfg.lr * cfg.vision_lr_scale})
    return optimizer, training.warmup_cosine(optimizer, cfg.warmup_steps, total_steps, cfg.warmup_start)


# ---- checkpoints ----------------------------------------------------------------------------
def save_checkpoint(out_dir: Path, epoch: int, generator: IDGenerator, optimizer, scheduler, scaler, record: dict,
                    info: DistInfo, cfg: TrainGenConfig) -> None:
    states = training.gather_rng_states(info)  # dropout and mixing draws differ per rank
    if not info.is_main:
        return
    save_training_checkpoint(out_dir, epoch, {
        "model": generator.state_dict(), "arch": generator.arch, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": states, **record})
    for old in range(epoch - cfg.train.keep_checkpoints * cfg.train.checkpoint_every, -1, -1):
        checkpoint_file(out_dir, old).unlink(missing_ok=True)


def restore(state: dict, generator: IDGenerator, optimizer, scheduler, scaler, info: DistInfo, seed: int) -> int:
    """Load a training checkpoint into the live objects; returns the first epoch still to run."""
    load_state_dict_strict(generator, state["model"], "training checkpoint")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    load_scaler_state(scaler, state["scaler"])
    training.restore_rng_states(state["rng"], info, seed, (state["epoch"] + 1,))
    log.info("resumed after epoch %d", state["epoch"])
    return state["epoch"] + 1


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("genius train-gen", "Stage 2: train the T5 ID generator on frozen stage-1 codes.")
    cfg, _ = parse_stage_config(TrainGenConfig, parser, argv)
    try:
        with user_errors_exit(parser):
            train(cfg)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
