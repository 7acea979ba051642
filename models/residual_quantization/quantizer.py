"""Residual vector quantizer with a modality level, EMA codebooks and dead-code reset.

With ``modality_level`` (the default) level 0 has 3 codes, one per modality (0 image, 1 text,
2 image+text). In the default ``"assigned"`` mode its code is *given* (a candidate's own modality,
or for a query the modality its instruction asks for) and its codeword is the EMA mean of the
vectors assigned to it, so the first code means what the paper says by construction. ``"learned"``
mode is the official code's plain 3-entry nearest-codeword level (needed to load the released
checkpoint). Without a modality level (IRGen's IDs for an image-only collection) every level is a
K-code level and the modality is never read.

Levels 1..L-1 have K codes each. Every level quantizes the residual left by the levels before it,
by Euclidean nearest codeword; the quantized vector is the sum of the selected codewords.
Codebooks are buffers, never touched by the optimizer: in training mode each step moves them by
an exponential moving average of the vectors assigned to each code (decay 0.9, Laplace-smoothed
counts), and a code whose EMA count drops below the dead-code threshold is re-seeded with a
random residual of the current batch. Under torch.distributed the EMA statistics are summed over
ranks and rank 0 draws the replacements, so every rank holds bit-identical codebooks.

Gradients (``gradient_estimator``): the quantized output's value is always the sum of the
selected codewords; what differs is the gradient it passes back to its input z.
- ``straight_through`` (default): the identity, once for the whole stack.
- ``straight_through_per_level``: what vector-quantize-pytorch up to 1.17.x computes for the
  official code. Every level passes the identity to its own input residual, whose gradient to z
  is the identity again (earlier codewords are constants), and ResidualVQ sums the L levels'
  outputs: L times the identity. A loss on the quantized output weighs L times more than with
  ``straight_through``.
- ``rotation``: the rotation trick (Fifty et al. 2024, arXiv 2410.06424), per level as
  vector-quantize-pytorch >= 1.18 does by default. For level input e and codeword c, with
  u = e/|e|, q = c/|c|, w = (u + q)/|u + q| and s = |c|/|e|, all held constant, the level passes
  back through (e - 2 (e.w) w + 2 (e.u) q) s, which equals c in value and maps u onto q: the
  gradient is rotated and scaled like the vector was. The levels' terms are summed.
In every mode the commitment loss pulls each level's input residual towards its (constant)
codeword. ``partials`` hands the training objectives the reconstruction after each level (as
constants), which IRGen's tokenizer loss classifies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from genius.common.progress import Progress

log = logging.getLogger("genius.rq")

NUM_MODALITIES = 3
ModalityMode = Literal["assigned", "learned"]
GradientEstimator = Literal["straight_through", "straight_through_per_level", "rotation"]
KmeansSeeds = Literal["distinct_rows", "random_rows"]
# vector-quantize-pytorch's floor on the norms the rotation trick divides by.
ROTATION_EPS = 1e-6


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def nearest_codes(x: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
    """Index of the Euclidean-nearest codeword for every row of ``x`` [N, d] -> [N] (ties: lowest index)."""
    distances = (x.pow(2).sum(1, keepdim=True) - 2 * x @ codewords.T + codewords.pow(2).sum(1)[None])
    return distances.argmin(dim=1)


def code_counts(codes: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of ``size`` codes occurs in ``codes`` [N] -> int64 [size]. Unlike
    ``torch.bincount``, which reads the largest code back to the host on a GPU, no sync."""
    return torch.zeros(size, dtype=torch.long, device=codes.device).index_add_(0, codes, torch.ones_like(codes))


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator,
           seeds: KmeansSeeds = "distinct_rows") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x`` [N, d]: (centroids [k, d], member counts [k]).

    ``seeds``: ``distinct_rows`` starts from k rows with distinct values, so no two codes start
    equal; only when ``x`` holds fewer than k distinct rows (the whole training set is smaller
    than K) do the surplus codes start as copies of distinct rows. They lose every distance tie to
    the original (lower index), usually end with a count of 0, and the dead-code reset re-seeds
    them in the first training steps. ``random_rows`` is vector-quantize-pytorch's choice: k
    distinct row *indices* (k draws with replacement when N < k), so rows that repeat a value,
    e.g. a query and its identical positive, can seed two equal codes.

    A cluster that loses all its members keeps its centroid. The counts are those of the
    assignment the final centroids were averaged from (as the library returns them), so
    centroid x count is that cluster's member sum. Stops once the assignment repeats: from there
    on every further iteration would reproduce the same centroids.
    """
    if seeds == "random_rows":
        rows = (torch.randperm(len(x), generator=generator)[:k] if len(x) >= k
                else torch.randint(len(x), (k,), generator=generator))
        centroids = x[rows.to(x.device)].clone()
    else:
        distinct = torch.unique(x, dim=0)
        order = torch.randperm(len(distinct), generator=generator).to(x.device)
        if len(distinct) >= k:
            centroids = distinct[order[:k]].clone()
        else:
            log.warning("k-means: only %d distinct vectors for %d codes; %d codes start unused",
                        len(distinct), k, k - len(distinct))
            extra = torch.randint(len(distinct), (k - len(distinct),), generator=generator).to(x.device)
            centroids = torch.cat([distinct[order], distinct[extra]])
    assignment, counts = None, torch.zeros(k, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        new_assignment = nearest_codes(x, centroids)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        counts = code_counts(assignment, k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, counts


def rotation_trick(e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Rows of ``c`` in value; backward, the gradient rotated from e's direction to c's and scaled
    by |c|/|e| (see the module docstring). ``e`` [N, d] carries the gradient, ``c`` is constant."""
    e_norm = e.detach().norm(dim=-1, keepdim=True).clamp(min=ROTATION_EPS)
    c_norm = c.detach().norm(dim=-1, keepdim=True)
    u = e.detach() / e_norm
    q = c.detach() / c_norm.clamp(min=ROTATION_EPS)
    w = F.normalize(u + q, dim=-1, eps=ROTATION_EPS)
    rotated = e - 2 * (e * w).sum(-1, keepdim=True) * w + 2 * (e * u).sum(-1, keepdim=True) * q
    return rotated * (c_norm / e_norm)


class EMACodebook(nn.Module):
    """One level's codebook: codewords and their EMA statistics, all buffers (saved, not optimised)."""

    def __init__(self, size: int, dim: int, decay: float, eps: float, dead_code_threshold: float,
                 update_only_present: bool = False):
        super().__init__()
        self.size, self.dim = size, dim
        self.decay, self.eps, self.dead_code_threshold = decay, eps, dead_code_threshold
        # The assigned modality level keeps a centroid for a modality absent from a batch
        # instead of letting it decay towards zero.
        self.update_only_present = update_only_present
        self.register_buffer("embed", torch.zeros(size, dim))
        self.register_buffer("embed_avg", torch.zeros(size, dim))
        self.register_buffer("cluster_size", torch.zeros(size))
        self.register_buffer("initted", torch.tensor(False))

    def set_codewords(self, codewords: torch.Tensor, counts: torch.Tensor) -> None:
        self.embed.copy_(codewords)
        self.embed_avg.copy_(codewords * counts[:, None])
        self.cluster_size.copy_(counts)
        self.initted.fill_(True)

    def ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Move codewords towards the mean of the vectors assigned to them (sums over all ranks)."""
        counts = code_counts(codes, self.size).to(x.dtype)
        sums = torch.zeros_like(self.embed).index_add_(0, codes, x)
        if _distributed():
            stats = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
        rate = torch.full_like(counts, 1 - self.decay)
        if self.update_only_present:
            rate = rate * (counts > 0)
        self.cluster_size.add_(rate * (counts - self.cluster_size))
        self.embed_avg.add_(rate[:, None] * (sums - self.embed_avg))
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.size * self.eps) * total  # Laplace smoothing
        self.embed.copy_(self.embed_avg / smoothed[:, None])

    def dead_codes(self) -> torch.Tensor:
        """bool [size]: the codes whose EMA count fell below the threshold (none when it is 0)."""
        return self.cluster_size < self.dead_code_threshold

    def reset_dead_codes(self, x: torch.Tensor, dead: torch.Tensor, num_dead: int) -> None:
        """Re-seed the ``num_dead`` codes ``dead`` marks (rank 0's mask) with random rows of ``x``.

        Rank 0 draws (from its own batch) and broadcasts, so all ranks agree."""
        if num_dead == 0:
            return
        if _is_rank0():
            rows = torch.randperm(len(x))[:num_dead] if len(x) >= num_dead else torch.randint(len(x), (num_dead,))
            samples = x[rows.to(x.device)]
        else:
            samples = torch.empty(num_dead, self.dim, dtype=x.dtype, device=x.device)
        if _distributed():
            dist.broadcast(samples, src=0)
        # The dead codes in ascending order, as a bool-mask assignment takes them, but without the
        # host sync a mask index costs on a GPU (the count is known).
        codes = torch.nonzero_static(dead, size=num_dead).squeeze(1)
        self.embed.index_copy_(0, codes, samples)
        self.embed_avg.index_copy_(0, codes, samples * self.dead_code_threshold)
        self.cluster_size.index_fill_(0, codes, self.dead_code_threshold)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, dim] value = sum of the selected codewords; gradient: the estimator
    codes: torch.Tensor  # [B, L] int64
    commit_loss: torch.Tensor  # scalar: mean over levels of MSE(level input, detached codeword)
    partials: torch.Tensor  # [L, B, dim] detached: sum of the codewords of levels 0..l, for each l
    resets: torch.Tensor  # [L] int64, codes re-seeded this step (zeros unless updating)


class ResidualQuantizer(nn.Module):
    def __init__(self, dim: int, num_levels: int, codebook_size: int, modality_mode: ModalityMode = "assigned",
                 decay: float = 0.9, eps: float = 1e-5, dead_code_threshold: float = 2.0,
                 gradient_estimator: GradientEstimator = "straight_through", modality_level: bool = True):
        super().__init__()
        if modality_mode not in get_args(ModalityMode):
            raise ValueError(f"modality_mode must be 'assigned' or 'learned', got {modality_mode!r}")
        if gradient_estimator not in get_args(GradientEstimator):
            raise ValueError(f"gradient_estimator must be one of {', '.join(get_args(GradientEstimator))}, "
                             f"got {gradient_estimator!r}")
        if num_levels < 1:
            raise ValueError(f"num_levels must be at least 1, got {num_levels}")
        self.dim, self.modality_mode, self.gradient_estimator = dim, modality_mode, gradient_estimator
        self.modality_level = modality_level
        # The modality level never re-seeds codes (threshold 0), as in the official code.
        first = ([EMACodebook(NUM_MODALITIES, dim, decay, eps, 0.0, update_only_present=modality_mode == "assigned")]
                 if modality_level else [])
        self.levels = nn.ModuleList(first + [
            EMACodebook(codebook_size, dim, decay, eps, dead_code_threshold)
            for _ in range(num_levels - len(first))
        ])

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def codebook_sizes(self) -> list[int]:
        return [book.size for book in self.levels]

    @property
    def initialised(self) -> bool:
        return bool(torch.stack([book.initted for book in self.levels]).all())  # one host sync

    def _modality_codes(self, modality: torch.Tensor | None, n: int) -> torch.Tensor:
        if modality is None:
            raise ValueError("modality_mode 'assigned' needs the level-0 modality code of every vector "
                             "(0 image, 1 text, 2 image+text; for queries the target modality)")
        modality = torch.as_tensor(modality).long().reshape(-1)
        if len(modality) != n:
            raise ValueError(f"got {len(modality)} modality codes for {n} vectors")
        invalid = (modality < 0) | (modality >= NUM_MODALITIES)
        if invalid.any():
            bad = modality[invalid][0]
            raise ValueError(f"modality code {int(bad)} is not 0 (image), 1 (text) or 2 (image+text)")
        return modality

    def _assigned(self, level: int) -> bool:
        """Whether ``level``'s code is given by the modality rather than chosen by nearest codeword."""
        return level == 0 and self.modality_level and self.modality_mode == "assigned"

    def _level_codes(self, level: int, residual: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
        if self._assigned(level):
            return self._modality_codes(modality, len(residual)).to(residual.device)
        return nearest_codes(residual, self.levels[level].embed)

    @torch.no_grad()
    def initialise(self, z: torch.Tensor, modality: torch.Tensor | None, kmeans_iters: int,
                   generator: torch.Generator, seeds: KmeansSeeds = "distinct_rows") -> None:
        """Fit every level on a sample ``z`` [N, dim], level by level on the residuals.

        Assigned modality level: per-modality means. Other levels: k-means seeded as ``seeds``
        says. Call it on the same sample on every rank, or on rank 0 and broadcast the buffers.
        """
        residual = z.float()
        # At paper size (16384 vectors, K = 4096, up to 1000 iterations) a level can take a while.
        progress = Progress(self.num_levels, "k-means initialisation", unit="level", logger=log)
        for level, book in enumerate(progress.wrap(self.levels)):
            if self._assigned(level):
                codes = self._modality_codes(modality, len(residual)).to(residual.device)
                counts = code_counts(codes, book.size).to(residual.dtype)
                sums = torch.zeros_like(book.embed).index_add_(0, codes, residual)
                book.set_codewords(sums / counts.clamp(min=1)[:, None], counts)
            else:
                book.set_codewords(*kmeans(residual, book.size, kmeans_iters, generator, seeds))
            residual = residual - book.embed[self._level_codes(level, residual, modality)]

    def forward(self, z: torch.Tensor, modality: torch.Tensor | None = None,
                update: bool | None = None) -> QuantizerOutput:
        """Quantize ``z`` [B, dim]; ``update`` (default: training mode) applies EMA and dead-code reset."""
        update = self.training if update is None else update
        if update and not self.initialised:
            raise RuntimeError("the quantizer's codebooks are not initialised; call initialise() on a sample "
                               "of training vectors before training")
        with torch.autocast(device_type=z.device.type, enabled=False):  # distances need fp32
            x = z.float()
            residual, codeword_sum, carrier = x, torch.zeros_like(x), torch.zeros_like(x)
            chosen, commit, level_inputs, partials = [], [], [], []
            for level, book in enumerate(self.levels):
                codes = self._level_codes(level, residual, modality)
                codeword = book.embed[codes]  # a copy: later EMA updates do not change it
                commit.append(F.mse_loss(residual, codeword.detach()))
                level_inputs.append(residual.detach())
                if self.gradient_estimator == "straight_through_per_level":
                    carrier = carrier + residual
                elif self.gradient_estimator == "rotation" and residual.requires_grad:
                    carrier = carrier + rotation_trick(residual, codeword)
                residual = residual - codeword
                codeword_sum = codeword_sum + codeword
                chosen.append(codes)
                partials.append(codeword_sum.detach())
            if self.gradient_estimator == "straight_through":
                carrier = x
            # The value is exactly the codeword sum (carrier - carrier.detach() is 0); the
            # gradient is the carrier's.
            quantized = codeword_sum + (carrier - carrier.detach())
        resets = self._update_codebooks(level_inputs, chosen) if update else [0] * self.num_levels
        return QuantizerOutput(
            quantized=quantized,
            codes=torch.stack(chosen, dim=1),
            commit_loss=torch.stack(commit).mean(),
            partials=torch.stack(partials),
            resets=torch.tensor(resets, dtype=torch.long),
        )

    @torch.no_grad()
    def _update_codebooks(self, level_inputs: list[torch.Tensor], codes: list[torch.Tensor]) -> list[int]:
        """EMA update, then dead-code reset, of every level; returns the codes re-seeded per level.

        A level's update changes only its own codebook, after its codeword was taken, so running
        them once the codes of all levels are chosen gives what updating level by level gives,
        with one host sync for the dead-code counts of all levels instead of one per level (and
        the random draws of the resets in the same order)."""
        for book, x, level_codes in zip(self.levels, level_inputs, codes):
            book.ema_update(x, level_codes)
        dead = [book.dead_codes() for book in self.levels]
        if _distributed():  # rank 0 decides
            dead = broadcast_from_rank0(torch.cat(dead)).split([book.size for book in self.levels])
        counts = torch.stack([mask.sum() for mask in dead]).tolist()
        for book, x, mask, num_dead in zip(self.levels, level_inputs, dead, counts):
            book.reset_dead_codes(x, mask, num_dead)
        if any(counts):  # the trainer logs each epoch's sums; this step's detail only when debugging
            log.debug("dead codes reset per level this step: %s", counts)
        return counts

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the codewords named by ``codes`` [B, L'] (L' <= L levels, a prefix)."""
        if codes.shape[1] > self.num_levels:
            raise ValueError(f"codes have {codes.shape[1]} levels, the quantizer has {self.num_levels}")
        out = torch.zeros(len(codes), self.dim, device=self.levels[0].embed.device)
        for level in range(codes.shape[1]):
            out = out + self.levels[level].embed[codes[:, level].to(out.device)]
        return out


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of ``tensor``, as a new tensor."""
    wire = tensor.clone()
    dist.broadcast(wire, src=0)
    return wire


@torch.no_grad()
def broadcast_codebooks(quantizer: ResidualQuantizer) -> None:
    """Give every rank rank 0's codebooks (after rank 0 alone initialised them)."""
    if _distributed():
        for buffer in quantizer.buffers():
            buffer.copy_(broadcast_from_rank0(buffer))


@torch.no_grad()
def check_codebooks_in_sync(quantizer: ResidualQuantizer) -> None:
    """Raise if any rank's codebook buffers differ from rank 0's (a bug, never expected)."""
    if not _distributed():
        return
    for name, buffer in quantizer.named_buffers():
        reference = broadcast_from_rank0(buffer)
        if not torch.equal(reference, buffer):
            raise RuntimeError(f"quantizer buffer {name} differs between rank {dist.get_rank()} and rank 0")
