"""genius assign-codes: the discrete ID of every candidate in every pool, with collision statistics.

For each candidate store (stage 0 output, one per local pool plus the union pool) it writes
``<out_dir>/<pool stem>/``:

- ``codes.npy`` int64 [N, L]: level 0 = the candidate's modality (assigned mode), then one code
  per residual level (without a modality level, every level is a residual level);
  ``ids.npy`` int64 [N]: hashed dids in store order;
- ``stats.json``: codes used and perplexity per level, collision rate (share of candidates whose
  full ID another candidate shares), distinct IDs, largest bucket, mean quantization error
  ||z - decode(codes)||^2 (and after each level), and with a modality level the share of
  candidates whose level-0 code is their modality;
- ``meta.json``: what the codes were made from (the quantizer's fingerprint and modality mode,
  the Combiner's precision, the store) and num_levels, codebook_sizes, the quantizer's file.

``rq_path`` is this project's ``rq.pt`` or an official-layout ``.pth``: ``rq_clip_large.pth``, or
``GENIUS_t5small.pth`` whose embedded ``quantizer.*`` copy is used (learned modality mode). The
quantizer of an official file is identified by the state fingerprint of its loaded state, the
same definition rq.pt records, so ``genius eval`` can refuse codes of another quantizer.

Run state, per pool folder (``genius.common.runstate``): the run key is the semantic config (all
but ``NOT_IN_RUN_KEY``: paths, batch size, device) with the quantizer's fingerprint, the
candidate store's content id (``EmbeddingStore.content_id``), the modality mode and the Combiner's
precision. A pool whose done.json records the same key, with its code files intact (their
SHA-256 in meta.json), is skipped; otherwise whatever an earlier run left (codes, stats, meta,
done.json) moves to ``<pool>/stale/<time>/`` with one log line saying what changed, and the codes
are computed again. ``force: true`` recomputes every pool. A re-extracted store (another CLIP
checkpoint, a replaced image) thus gets new codes, and meta.json's ``store_content`` lets a later
stage refuse codes of another store. The main process holds the lock of ``out_dir``: a second
assign-codes into the same folder exits naming the holder. :func:`read_codes` is the checked
reader of a pool's codes.

With ``unique_level: true`` an extra last level numbers the candidates inside each shared ID
(0, 1, ...), so every ID is unique; its size is the largest bucket. The paper does not do this
(shared IDs return all their candidates), so it is off by default. Under torchrun every pool's
candidates are split among the processes (contiguous runs of batches) and rank 0 writes the pool's
files, so a big pool is not one rank's work while the others wait.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from genius.common.checkpoint import UnsafeCheckpointError, safe_load
from genius.common.config import resolve_path
from genius.common.distributed import (
    DistInfo, barrier, broadcast_from_main, cleanup, gather_to_main, group_rank, init_distributed, recheck_threads,
    set_cpu_threads, shard_bounds, transformer_op_macs,
)
from genius.common.config_checks import check_dir, check_output_dir
from genius.common.progress import Progress
from genius.common.ranges import BATCH, THREADS, check_ranges, ranged
from genius.common.io import atomic_save_npy, atomic_write_json
from genius.common.runstate import RunKey, RunState, acquire_lock, content_sha256, portable_path, release_lock
from genius.common.stage import parse_stage_config, record_run, setup_logging, stage_parser, user_errors_exit
from genius.common.store import EmbeddingStore, StoreError, read_meta
from genius.models.residual_quantization.code_stats import collision_stats, level_usage, rank_in_bucket
from genius.models.residual_quantization.model import RQModel, load_rq, rq_fingerprint
from genius.models.residual_quantization.official import load_official_rq, quantizer_fingerprint

log = logging.getLogger("genius.assign_codes")


@dataclass
class AssignCodesConfig:
    rq_path: str = "checkpoint/large/rq/rq.pt"  # rq.pt, or an official rq_clip_large.pth / GENIUS_t5small.pth
    embed_dir: str = "extracted_embed/CLIP_SF/cand"  # candidate stores, one directory per pool
    pools: list[str] | None = None  # store names (pool file stems) under embed_dir; None: every store there
    encoder: str | None = None  # the encoder name every store must record (None: not checked)
    out_dir: str = "checkpoint/large/rq/codes"
    batch_size: int = ranged(4096, BATCH)
    unique_level: bool = False
    # The Combiner under fp16 autocast on CUDA, as the official evaluation ran it; on CPU it stays
    # fp32. Nearest-codeword search is fp32 either way.
    autocast: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = ranged(None, THREADS)  # CPU torch threads (null: common.distributed.ThreadPolicy)
    force: bool = False  # recompute every pool's codes, even those whose done.json records the same run key

    def validate(self) -> None:
        if self.pools is not None and not self.pools:
            raise ValueError("pools: an empty list; list pool names or leave it out to take every store")


# Keys the codes do not depend on: where things are (the inputs' fingerprints stand for them), how
# fast it runs, and autocast (the Combiner's effective precision is in the key instead).
NOT_IN_RUN_KEY = ("rq_path", "embed_dir", "pools", "encoder", "out_dir", "batch_size", "autocast", "device",
                  "cpu_threads", "force")
CODE_FILES = ("codes.npy", "ids.npy")
OUTPUTS = (*CODE_FILES, "stats.json", "meta.json")
STAGE = "genius assign-codes"
RQ_FILES = ("rq_path is an rq.pt of genius train-rq, or a released rq_clip_large.pth / GENIUS_t5small.pth "
            "(Hugging Face Sungyeon/GENIUS, folder checkpoint/), or one written by genius export-official")
RERUN = "re-run genius assign-codes (run_assign_codes.sh) to write the codes again"


def check_config(cfg: AssignCodesConfig) -> None:
    """Every number in its declared range, the quantizer and the stores present (before any work;
    one-line errors naming the key and the allowed range)."""
    check_ranges(cfg)
    rq = resolve_path(cfg.rq_path)
    if not rq.is_file():
        raise FileNotFoundError(f"rq_path: {rq} does not exist; {RQ_FILES}")
    embed_dir = check_dir("embed_dir", resolve_path(cfg.embed_dir), "candidate stores of genius extract")
    for i, name in enumerate(cfg.pools or []):
        if not (embed_dir / name / "meta.json").is_file():
            raise FileNotFoundError(f"pools[{i}]: no candidate store {embed_dir / name}; run genius extract for that "
                                    "pool or fix the name (a pool file's stem)")


def pool_stores(embed_dir: Path, pools: list[str] | None) -> list[Path]:
    if pools is not None:
        return [embed_dir / name for name in pools]
    folders = sorted(p for p in embed_dir.iterdir() if p.is_dir()) if embed_dir.is_dir() else []
    for folder in folders:  # never skip a pool without a word
        if (folder / "ids.npy").is_file() and not (folder / "meta.json").is_file():
            raise StoreError(f"{folder}: a store's arrays without its meta.json (damaged, or its extraction did "
                             "not finish); re-run genius extract for that pool, or list the pools to assign in pools")
    found = [p for p in folders if (read_meta(p) or {}).get("kind") == "candidate"]
    if not found:
        raise StoreError(f"no candidate stores under {embed_dir} (run feature extraction for the pools first)")
    return found


def combiner_dtype(device: torch.device, autocast: bool) -> str:
    """The precision the Combiner runs in: fp16 autocast is applied on CUDA only."""
    return "float16" if autocast and device.type == "cuda" else "float32"


def combiner_autocast(device: torch.device, autocast: bool):
    """Context for ``RQModel.embed``: fp16 autocast on CUDA if asked for, else nothing (fp32)."""
    if combiner_dtype(device, autocast) == "float16":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def is_native_rq(path: Path) -> bool:
    """Whether ``path`` is an rq.pt of genius train-rq (reads the pickle only; the weights are mmapped)."""
    try:
        obj = safe_load(path, mmap=True)
    except UnsafeCheckpointError:  # the released .pth files pickle an OmegaConf config
        return False
    return isinstance(obj, dict) and {"arch", "fingerprint"} <= set(obj)


def load_quantizer(path: Path) -> tuple[RQModel, str]:
    """(model in eval mode, fingerprint) of an rq.pt or an official-layout .pth (module docstring)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; {RQ_FILES}")
    if is_native_rq(path):
        return load_rq(path), rq_fingerprint(path)
    model = load_official_rq(path)
    return model, quantizer_fingerprint(model)


def run_key(cfg: AssignCodesConfig, fingerprint: str, model: RQModel, store: EmbeddingStore,
            device: torch.device) -> RunKey:
    """What a pool's codes are made from (module docstring)."""
    return RunKey.of(cfg, NOT_IN_RUN_KEY, {"rq": fingerprint, "store": store.content_id},
                     modality_mode=model.arch["modality_mode"], combiner_dtype=combiner_dtype(device, cfg.autocast))


def codes_intact(out: Path) -> str | None:
    """None when the pool's code files are present with the content meta.json records; else why not."""
    meta = _meta(out)
    if meta is None:
        return f"{out / 'meta.json'} is missing or unreadable"
    for name in CODE_FILES:
        path = out / name
        if not path.is_file():
            return f"{path} is missing"
        if meta.get("files", {}).get(name) != {"size": path.stat().st_size, "sha256": content_sha256(path)}:
            return f"{path} does not match the size and SHA-256 in meta.json"
    return None


def _meta(out: Path) -> dict | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def read_codes(codes_dir: str | os.PathLike, store: EmbeddingStore | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A pool's (codes [N, L], ids [N], meta), checked: the files exist with the size and SHA-256
    meta.json records, and (given ``store``) were made from that store's content. Every failure is
    a one-line ValueError naming the file and what to re-run."""
    codes_dir = Path(codes_dir)
    if not (codes_dir / "meta.json").is_file():
        raise StoreError(f"{codes_dir / 'meta.json'}: no codes for this pool; run genius assign-codes "
                         f"(run_assign_codes.sh) with out_dir {codes_dir.parent} first")
    problem = codes_intact(codes_dir)
    if problem is not None:
        raise StoreError(f"{problem}; {RERUN}")
    meta = _meta(codes_dir)
    if store is not None and meta.get("store_content") != store.content_id:
        raise StoreError(f"{codes_dir / 'meta.json'}: the codes were made from another version of the store "
                         f"{store.path} (its content changed, e.g. re-extracted with another encoder); {RERUN}")
    return np.load(codes_dir / "codes.npy"), np.load(codes_dir / "ids.npy"), meta


@torch.no_grad()
def encode_rows(model: RQModel, store: EmbeddingStore, start: int, stop: int, batch_size: int, device: torch.device,
                autocast: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start .. stop`` of the store: (codes int64 [n, L], per-batch sums of ||z - decode(codes[:, :l+1])||^2
    float64 [batches, L]), in batches of ``batch_size`` starting at ``start``."""
    arrays, levels = store.arrays, model.num_levels
    codes = np.empty((stop - start, levels), dtype=np.int64)
    error_sums = np.zeros((len(range(start, stop, batch_size)), levels))
    codebooks = model.codebooks()
    progress = Progress(len(error_sums), f"assign-codes: {store.path.name}", unit="batch", logger=log)
    for batch, begin in enumerate(progress.wrap(range(start, stop, batch_size))):
        recheck_threads()
        rows = slice(begin, min(begin + batch_size, stop))

        def take(arr, dtype=np.float32):
            return torch.from_numpy(np.asarray(arr[rows], dtype=dtype)).to(device)

        with combiner_autocast(device, autocast):
            z = model.embed(take(arrays.img), take(arrays.txt), take(arrays.img_mask), take(arrays.txt_mask))
        batch_codes = model.encode(z, take(arrays.modality, np.int64))
        codes[rows.start - start : rows.stop - start] = batch_codes.cpu().numpy()
        reconstruction = torch.zeros_like(z)
        for level in range(levels):
            reconstruction += codebooks[level][batch_codes[:, level]]
            error_sums[batch, level] = (z - reconstruction).pow(2).sum().item()
    return codes, error_sums


def encode_store(model: RQModel, store: EmbeddingStore, batch_size: int, device: torch.device,
                 autocast: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes int64 [N, L], mean ||z - decode(codes[:, :l+1])||^2 for each l) on rank 0, None on the others.

    Under torchrun each rank encodes a contiguous run of whole batches (a 5.6M-candidate pool is
    the long part of this stage) and rank 0 gathers them. The batches are those of one process, and
    the error sums are added in the same order, so the codes and statistics equal a one-process run's.
    """
    rank, world_size = group_rank()
    num_batches = -(-len(store) // batch_size)
    first, last = shard_bounds(num_batches, rank, world_size)
    shard = encode_rows(model, store, min(first * batch_size, len(store)), min(last * batch_size, len(store)),
                        batch_size, device, autocast)
    shards = gather_to_main(shard)
    if shards is None:
        return None
    codes = np.concatenate([c for c, _ in shards])
    error_sums = np.zeros(model.num_levels)
    for batch_errors in np.concatenate([e for _, e in shards]):
        error_sums += batch_errors  # one batch at a time, as a single process adds them
    return codes, error_sums / max(len(store), 1)


def pool_stats(codes: np.ndarray, codebook_sizes: list[int], errors: np.ndarray, modality: np.ndarray | None) -> dict:
    """``modality``: the candidates' modalities when level 0 is the modality level, else None."""
    used, perplexities = level_usage(codes, codebook_sizes)
    stats = {
        "num_candidates": int(len(codes)),
        "num_levels": len(codebook_sizes),
        "codebook_sizes": codebook_sizes,
        "codes_used_per_level": used,
        "perplexity_per_level": perplexities,
        **collision_stats(codes),
        "mean_quantization_error": float(errors[-1]) if len(errors) else 0.0,
        "quantization_error_per_level": [float(e) for e in errors],
    }
    if modality is not None:
        stats["level0_matches_modality"] = float((codes[:, 0] == modality).mean()) if len(codes) else 1.0
    return stats


def assign_pool(model: RQModel, fingerprint: str, store_path: Path, cfg: AssignCodesConfig, info: DistInfo) -> None:
    """One pool's codes, stats and meta. Every rank takes part (``encode_store``); rank 0 decides
    whether the pool is up to date, and alone archives and writes."""
    store = EmbeddingStore.open(store_path, dim=model.arch["dim"], encoder=cfg.encoder, kind="candidate")
    out = resolve_path(cfg.out_dir) / store_path.name
    key = run_key(cfg, fingerprint, model, store, info.device)
    state = RunState(out, key, OUTPUTS, stage=STAGE, force=cfg.force, is_main=info.is_main)
    reason = broadcast_from_main(redo_reason(state, out) if info.is_main else None)
    if reason is None:
        log.info("%s: codes are up to date, skipped", store_path.name)
        return
    if info.is_main and state.leftovers():
        state.archive(reason)
    encoded = encode_store(model, store, cfg.batch_size, info.device, cfg.autocast)
    if encoded is None:  # not rank 0: its rows are with rank 0, which writes them
        return
    codes, errors = encoded
    sizes = list(model.codebook_sizes)
    modality = np.asarray(store.arrays.modality, dtype=np.int64) if model.has_modality_level else None
    stats = pool_stats(codes, sizes, errors, modality)
    if cfg.unique_level:
        # The stats above describe the ID without the extra level (which makes every ID unique).
        codes = np.concatenate([codes, rank_in_bucket(codes)[:, None]], axis=1)
        sizes.append(max(stats["largest_bucket"], 1))
        stats["unique_level_size"] = sizes[-1]
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out / "codes.npy", codes)
    atomic_save_npy(out / "ids.npy", np.asarray(store.ids, dtype=np.int64))
    atomic_write_json(out / "stats.json", stats)
    files = {name: {"size": (out / name).stat().st_size, "sha256": content_sha256(out / name)} for name in CODE_FILES}
    # meta.json, then done.json last: a folder without them is never taken as up to date.
    atomic_write_json(out / "meta.json", {
        "rq": fingerprint, "modality_mode": model.arch["modality_mode"], "modality_level": model.has_modality_level,
        "combiner_dtype": combiner_dtype(info.device, cfg.autocast),
        "store_content": store.content_id,  # the candidate store's content_id: codes belong to that store
        "store": {"path": portable_path(store.path), "source": store.meta.get("source")},
        "unique_level": cfg.unique_level, "num_levels": len(sizes), "codebook_sizes": sizes,
        "rq_path": portable_path(resolve_path(cfg.rq_path)), "files": files})
    state.finish(candidates=stats["num_candidates"])
    log.info("%s: %d candidates, %d distinct IDs, collision rate %.4f, largest bucket %d, quantization error %.4g",
             store_path.name, stats["num_candidates"], stats["distinct_ids"], stats["collision_rate"],
             stats["largest_bucket"], stats["mean_quantization_error"])


def redo_reason(state: RunState, out: Path) -> str | None:
    """Why the pool's codes must be computed (again); None when they are up to date."""
    if state.is_done():
        problem = codes_intact(out)
        return None if problem is None else f"{problem}, computing them again"
    return "force is set" if state.force else state.key.changes_from(state.recorded())


@contextlib.contextmanager
def hold_output(out_dir: Path, is_main: bool):
    """The main process holds ``out_dir``'s lock for the block (a second run exits naming the
    holder; an output folder that cannot be written is an OSError naming it)."""
    fd = acquire_lock(out_dir, STAGE) if is_main else None
    try:
        yield
    finally:
        release_lock(fd)


def assign_codes(cfg: AssignCodesConfig, info: DistInfo) -> None:
    check_config(cfg)
    out_dir = check_output_dir("out_dir", resolve_path(cfg.out_dir))
    with hold_output(out_dir, info.is_main):
        model, fingerprint = load_quantizer(resolve_path(cfg.rq_path))
        model.to(info.device)
        if info.device.type == "cpu":  # threads by the size of a batch through the Combiner's widest layer
            set_cpu_threads(cfg.cpu_threads, transformer_op_macs(model, cfg.batch_size))
        stores = pool_stores(resolve_path(cfg.embed_dir), cfg.pools)
        if info.is_main:
            record_run(out_dir, cfg)
        for store_path in stores:
            assign_pool(model, fingerprint, store_path, cfg, info)
        barrier()  # the lock is held until rank 0 has written the last pool


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = stage_parser("genius assign-codes", "Stage 1: discrete IDs and collision statistics for every pool.")
    cfg, _ = parse_stage_config(AssignCodesConfig, parser, argv)
    with user_errors_exit(parser):  # a bad GENIUS_DIST_TIMEOUT_MIN too
        info = init_distributed(cfg.device)
        try:
            assign_codes(cfg, info)
        finally:
            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
