"""Stage 2: train the ID generator (``genius train-gen``).

For each (query, positive) pair of the training queries the frozen stage-1 model gives the
normalised Combiner outputs z_q and z_c and the positive's L codes (recomputed every batch; level
0 from the candidate's modality). The generator reads the query-target mix of z_q and z_c and is
trained with cross-entropy on the L code tokens (teacher forcing). AdamW with linear warm-up and
cosine decay to 0, per step; gradient clipping; fp16 autocast with GradScaler on GPU; DDP under
torchrun. Checkpoints after every ``checkpoint_every`` epochs; a re-run resumes from the last one.
``optim.warmup_start``, ``optim.no_decay`` and ``train.positives`` select the official code's
warm-up, weight-decay rule and fixed positives (configs_scripts/large/train_gen.yaml sets them).

Outputs in ``out_dir``: ``generator.pt`` (see ``generator.load_generator``), ``metrics.jsonl``
(loss, teacher-forced exact match, per-level accuracy, lr), ``config.yaml``, ``checkpoints/``,
``done.json`` (a re-run with the same config and inputs is skipped).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from genius.common.checkpoint import (
    checkpoint_file,
    latest_checkpoint,
    load_own_checkpoint,
    load_scaler_state,
    load_state_dict_strict,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from genius.common.config import config_to_dict, require_positive, resolve_path
from genius.common.mbeir import older_revision_twin
from genius.common.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    seed_everything,
)
from genius.common.io import atomic_write_text
from genius.common.pairs import (
    PositiveDraw,
    TrainingPairs,
    batches_per_epoch,
    iterate_batches,
    load_training_pairs,
)
from genius.common.plots import plot_training_curves
from genius.common.stage import (
    DONE_FILE,
    MetricsLog,
    archive_stale_run,
    is_up_to_date,
    mark_done,
    parse_stage_config,
    progress_disabled,
    record_run,
    setup_logging,
    stage_fingerprint,
    stage_parser,
    user_errors_exit,
)
from genius.common.store import EmbeddingStore, store_path
from genius.models.generative_retriever.generator import (
    T5_SMALL,
    IDGenerator,
    load_pretrained_t5,
    make_arch,
    save_generator,
)
from genius.models.generative_retriever.mixing import mix_query_target
from genius.models.generative_retriever.vocab import codes_to_tokens
from tqdm import tqdm

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


@dataclass
class ModelConfig:
    num_prefix: int = 30
    d_model: int = T5_SMALL["d_model"]
    num_heads: int = T5_SMALL["num_heads"]
    d_kv: int = T5_SMALL["d_kv"]
    d_ff: int = T5_SMALL["d_ff"]
    num_decoder_layers: int = T5_SMALL["num_decoder_layers"]
    dropout: float = T5_SMALL["dropout"]
    pretrained: str | None = None  # a local T5 directory (save_pretrained format); shapes then come from it
    code_embedding_scale: float = 100.0

    def validate(self) -> None:
        require_positive({"num_prefix": self.num_prefix, "d_model": self.d_model, "num_heads": self.num_heads,
                          "d_kv": self.d_kv, "d_ff": self.d_ff, "num_decoder_layers": self.num_decoder_layers,
                          "code_embedding_scale": self.code_embedding_scale})
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


@dataclass
class MixingConfig:
    enabled: bool = True
    alpha: float = 2.0

    def validate(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"mixing.alpha must be > 0, got {self.alpha}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-4  # on the parameters no_decay leaves decayed
    # Which parameters get no weight decay. ndim: those with < 2 dimensions (biases, norms).
    # official_names: the official rule, < 2 dimensions or a name containing 'bn', 'ln', 'bias'
    # or 'logit_scale'; on this model that also exempts T5's relative_attention_bias embedding
    # [buckets, heads], the only matrix whose name says bias.
    no_decay: Literal["ndim", "official_names"] = "ndim"
    warmup_steps: int = 500
    # Linear warm-up factor at step t (counted from 0). first_step: (t + 1) / warmup_steps, so the
    # first update already moves the weights and the last warm-up step reaches lr. zero: the
    # official t / warmup_steps, whose first update has lr 0 (it only fills AdamW's moments).
    warmup_start: Literal["first_step", "zero"] = "first_step"
    grad_clip: float = 1.0

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must hold two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0 or self.eps <= 0 or self.grad_clip <= 0:
            raise ValueError(f"lr, eps and grad_clip must be positive, got {self.lr}, {self.eps}, {self.grad_clip}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"weight_decay and warmup_steps must be >= 0, got {self.weight_decay}, "
                             f"{self.warmup_steps}")


@dataclass
class TrainConfig:
    epochs: int = 31
    batch_size: int = 256  # per process
    seed: int = 2023
    # per_epoch: each query's positive is drawn anew every epoch. fixed: one draw for the whole
    # run, as the official dataset drew once at construction.
    positives: PositiveDraw = "per_epoch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = None  # torch threads on CPU (null: torch's default, one per core)
    amp: bool = True  # fp16 autocast + GradScaler (GPU only)
    log_every: int = 50  # steps
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    force: bool = False  # retrain even when done.json matches

    def validate(self) -> None:
        require_positive({"epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every,
                          "checkpoint_every": self.checkpoint_every, "keep_checkpoints": self.keep_checkpoints,
                          "cpu_threads": self.cpu_threads})
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass
class TrainGenConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "checkpoint/large/gen"


# ---- the loop -------------------------------------------------------------------------------
def train(cfg: TrainGenConfig) -> Path:
    """Train (or resume, or skip when up to date); returns the path of ``generator.pt``."""
    info = init_distributed(cfg.train.device, cfg.train.cpu_threads)
    out_dir = resolve_path(cfg.out_dir)
    rq, rq_print = load_frozen_rq(resolve_path(cfg.data.rq), info.device)
    pairs, queries, pool, inputs = open_training_data(cfg, rq.arch["dim"])
    # What the weights depend on: logging and checkpoint cadence do not count.
    fingerprint = stage_fingerprint(cfg, inputs + [resolve_path(cfg.data.rq)],
                                    ignore=("device", "cpu_threads", "force", "log_every", "checkpoint_every",
                                            "keep_checkpoints"))
    if is_up_to_date(out_dir, fingerprint) and not cfg.train.force:
        log.info("%s is up to date with its config and inputs; skipping (set train.force=true to retrain)", out_dir)
        return out_dir / "generator.pt"
    seed_everything(cfg.train.seed + info.rank)
    steps_per_epoch = batches_per_epoch(len(pairs), cfg.train.batch_size, info.world_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} training pairs give no full batch of {cfg.train.batch_size} x {info.world_size}")
    resume = load_resume_state(out_dir, fingerprint, rq_print, cfg.train.batch_size * info.world_size, info)
    generator = (IDGenerator(resume["arch"]) if resume else new_generator(cfg.model, rq)).to(info.device)
    optimizer, scheduler = make_optimizer(generator, cfg.optim, steps_per_epoch * cfg.train.epochs)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp and info.device.type == "cuda")
    start_epoch = restore(resume, generator, optimizer, scheduler, scaler, info, cfg.train.seed) if resume else 0
    model = wrap_ddp(generator, info)
    step = start_epoch * steps_per_epoch
    if info.is_main:
        record_run(out_dir, cfg)
        drop_metrics_after(out_dir / "metrics.jsonl", step)
    metrics, window = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main), Window()
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        batches = iterate_batches(pairs, queries, pool, batch_size=cfg.train.batch_size, epoch=epoch,
                                  seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                                  positives=cfg.train.positives)
        for batch in tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}", disable=progress_disabled()):
            window.add(*train_step(model, rq, batch, optimizer, scheduler, scaler, cfg, info.device))
            step += 1
            if step % cfg.train.log_every == 0 or step % steps_per_epoch == 0:
                metrics.write(epoch=epoch, step=step, lr=scheduler.get_last_lr()[0], **window.flush())
        if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
            save_checkpoint(out_dir, epoch, generator, optimizer, scheduler, scaler, rq_print, fingerprint, info, cfg)
    final = out_dir / "generator.pt"
    if info.is_main:
        save_generator(final, generator, config_to_dict(cfg), rq_print)
        mark_done(out_dir, fingerprint, epochs=cfg.train.epochs, steps=step, last=metrics.read()[-1:])
        log.info("wrote %s", final)
        plot_training_curves(out_dir / "metrics.jsonl", out_dir / "training_curves.png", "stage 2: ID generator")
    return final


def train_step(model, rq, batch: dict, optimizer, scheduler, scaler, cfg: TrainGenConfig,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step; returns the loss and the teacher-forced hits [B, L] (detached)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.no_grad():
        z_q = rq.embed(batch["q_img"], batch["q_txt"], batch["q_img_mask"], batch["q_txt_mask"])
        z_c = rq.embed(batch["c_img"], batch["c_txt"], batch["c_img_mask"], batch["c_txt_mask"])
        target = rq.encode(z_c, batch["c_modality"])
    tokens = codes_to_tokens(target, rq.codebook_sizes)
    z_in = mix_query_target(z_q, z_c, cfg.mixing.alpha, cfg.mixing.enabled)
    with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
        logits = model(z_in, target)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach(), (logits.detach().argmax(-1) == tokens)


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


# ---- pieces ---------------------------------------------------------------------------------
def load_frozen_rq(path: Path, device: torch.device):
    """The stage-1 model (eval mode, no gradients) and the fingerprint of its rq.pt."""
    from genius.models.residual_quantization.model import load_rq, rq_fingerprint

    if not path.is_file():
        raise FileNotFoundError(f"stage-1 model {path} does not exist; run train-rq first (or set data.rq)")
    rq = load_rq(path).to(device).eval().requires_grad_(False)
    return rq, rq_fingerprint(path)


def open_training_data(cfg: TrainGenConfig, dim: int) -> tuple[TrainingPairs, EmbeddingStore, EmbeddingStore, list[Path]]:
    """Training pairs over the query and pool stores; also the files the result depends on."""
    root, embed_root = resolve_path(cfg.data.root), resolve_path(cfg.data.embed_root)
    query_file, pool_file = root / cfg.data.train_queries, older_revision_twin(root / cfg.data.train_pool)
    stores = []
    for source, kind in ((query_file, "query"), (pool_file, "candidate")):
        path = store_path(embed_root, cfg.data.encoder, "train", source)
        stores.append(EmbeddingStore.open(path, dim=dim, encoder=cfg.data.encoder, kind=kind, source=source))
    pairs = load_training_pairs(query_file, *stores)
    if pairs.dropped_queries:
        log.warning("%d training queries have no positive in %s; skipped", pairs.dropped_queries, stores[1].path)
    return pairs, stores[0], stores[1], [query_file, pool_file] + [s.path / "meta.json" for s in stores]


def new_generator(cfg: ModelConfig, rq) -> IDGenerator:
    """Randomly initialised (or pretrained-T5) generator with code embeddings from the codebooks."""
    codebooks = [c.detach().float().cpu() for c in rq.codebooks()]
    shape = {k: getattr(cfg, k) for k in ("d_model", "num_heads", "d_kv", "d_ff", "num_decoder_layers", "dropout")}
    arch = make_arch(codebooks[0].shape[1], rq.codebook_sizes, cfg.num_prefix, **shape)
    t5 = None
    if cfg.pretrained:
        t5, arch = load_pretrained_t5(resolve_path(cfg.pretrained), arch)
    generator = IDGenerator(arch, t5)
    generator.init_code_embeddings(codebooks, scale=cfg.code_embedding_scale)
    return generator


# Name parts that exempt a parameter from weight decay under the official rule.
OFFICIAL_NO_DECAY_NAMES = ("bn", "ln", "bias", "logit_scale")


def decays(name: str, param: torch.Tensor, rule: str) -> bool:
    """Whether ``optim.no_decay`` = ``rule`` leaves the parameter ``name`` weight-decayed."""
    if param.ndim < 2:
        return False
    return rule == "ndim" or not any(part in name for part in OFFICIAL_NO_DECAY_NAMES)


def make_optimizer(generator: IDGenerator, cfg: OptimConfig, total_steps: int):
    """AdamW (weight decay as ``cfg.no_decay`` says) and warm-up + cosine-to-zero, per iteration."""
    named = list(generator.named_parameters())  # each tied tensor once
    groups = [{"params": [p for n, p in named if decays(n, p, cfg.no_decay)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if not decays(n, p, cfg.no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    offset = 1 if cfg.warmup_start == "first_step" else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + offset) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def wrap_ddp(generator: IDGenerator, info: DistInfo):
    if not info.enabled:
        return generator
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(generator, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


# ---- checkpoints ----------------------------------------------------------------------------
def _rng_states(info: DistInfo) -> list[dict]:
    """Every rank's RNG state (dropout and mixing draws differ per rank), gathered for rank 0."""
    state = {"host": rng_state(), "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None}
    if not info.enabled:
        return [state]
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(out_dir: Path, epoch: int, generator: IDGenerator, optimizer, scheduler, scaler,
                    rq_print: str, fingerprint: str, info: DistInfo, cfg: TrainGenConfig) -> None:
    states = _rng_states(info)
    if not info.is_main:
        return
    save_training_checkpoint(out_dir, epoch, {
        "model": generator.state_dict(), "arch": generator.arch, "rq": rq_print, "run": fingerprint,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": states,
        "global_batch": cfg.train.batch_size * info.world_size,
    })
    for old in range(epoch - cfg.train.keep_checkpoints * cfg.train.checkpoint_every, -1, -1):
        checkpoint_file(out_dir, old).unlink(missing_ok=True)


def load_resume_state(out_dir: Path, fingerprint: str, rq_print: str, global_batch: int, info: DistInfo) -> dict | None:
    """The last training checkpoint of this same run in ``out_dir``, if any.

    A run of another config, other training data or another rq.pt is set aside (moved to
    ``out_dir/stale/``) and training starts afresh. The same run with another global batch
    (batch_size x processes) is refused: it would change the step count the learning-rate
    schedule was laid out for.
    """
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    state = load_own_checkpoint(path)
    if state.get("run") != fingerprint or state["rq"] != rq_print:
        reason = "stage-1 model changed" if state["rq"] != rq_print else "config or training data changed"
        barrier()  # every rank has read the old checkpoint before rank 0 moves it
        if info.is_main:
            archive_stale_run(out_dir, ("checkpoints", "generator.pt", "metrics.jsonl", "config.yaml", DONE_FILE,
                                        "training_curves.png"), reason)
        barrier()
        return None
    if state["global_batch"] != global_batch:
        raise ValueError(f"{path} was trained with a global batch of {state['global_batch']} (batch_size x processes), "
                         f"this run has {global_batch}; set train.batch_size to keep the global batch to resume")
    log.info("resuming from %s", path)
    return state


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget the log lines of steps an interrupted attempt ran past its last checkpoint."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


def restore(state: dict, generator: IDGenerator, optimizer, scheduler, scaler, info: DistInfo, seed: int) -> int:
    """Load a training checkpoint into the live objects; returns the first epoch still to run."""
    load_state_dict_strict(generator, state["model"], "training checkpoint")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    load_scaler_state(scaler, state["scaler"])
    rng = state["rng"]
    if len(rng) == info.world_size:  # same world size: continue every rank's random streams exactly
        set_rng_state(rng[info.rank]["host"])
        if rng[info.rank]["cuda"] is not None and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng[info.rank]["cuda"])
    else:  # another world size: fresh, distinct streams per rank
        seed_everything(seed + 1000 * (state["epoch"] + 1) + info.rank)
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
