"""Trie-constrained beam search over fixed-length code IDs: the hot loop of retrieval.

Per batch of queries the encoder runs once. Each of the L steps then runs one cached decoder
step for every live beam, scores the level's codes, masks them with one ``trie.fill_mask`` call
for all beams, keeps the best ``num_beams`` continuations per query and advances each beam's trie
node by its chosen code. Beams whose prefix is not in the trie score -inf; when a query has fewer
reachable IDs than beams, the surplus beams come back marked absent (codes -1, score -inf,
valid False).

Four details keep it fast:
- Level head: at step l only level l's codes can follow, so by default only those K_l rows of
  the tied output head are scored and the log-softmax runs over them. ``level_head=False``
  scores and normalises the full vocabulary and gives exactly the numbers (and beams) of the
  official ``transformers.generate`` decoding; results state which one produced them.
- Fused step: the decoder runs as :class:`~genius.models.generative_retriever.fused_decoder.FusedDecoder`,
  the T5 decoder written out as plain tensor ops (k and v written by their products straight
  into the history, the cross-attention keys and values once per query, not per beam, which at paper size is 37 MB per query; the self-attention
  history written once into buffers kept across searches and read in place through each beam's
  ancestors, by a C++ attention on a CPU).
- Host traffic: with a host trie the masks are filled in one host buffer per search (pinned on a
  GPU, uploaded without blocking), and each step makes one device-to-host copy, of what the trie
  needs. With a :class:`~genius.models.generative_retriever.device_trie.DeviceTrie` the mask and
  the trie step run on the decoding device and the search makes one host copy in all (the score
  check), so a GPU never waits on the host mid-search.
- fp32 products in oneDNN on AMD CPUs with AVX-512, where torch's default (MKL) runs AVX2 code at
  half the rate (``genius.common.cpu.fp32_products_in_onednn``, around the whole search).

With ``autocast`` the decoder's weights are cast once to bf16 (CPU) or fp16 (GPU) and its GEMMs
run in that type (the residual stream and norms stay fp32), but the output head's logits and the
scores stay fp32 (``IDGenerator.head_logits``; on a CPU with MKL the bf16 head sums bf16 inputs
in fp32, ``FusedDecoder``). ``int8`` (x86 CPUs) runs the decoder step's products
and the output head's in int8 instead (``FusedDecoder``); the log-softmax and the scores stay
fp32. A caller that searches again and again with one generator (an evaluation's batches) passes
one prepared decoder (``prepare_decoder``) to every search: int8's packing costs about a quarter
of a second at paper size, which a decoder built per search would pay for every batch. The
decoder holds the weights as they were when it was prepared, so it must not outlive a change
of them; without one each search prepares its own.
A NaN or +inf score is an error naming the level, never a beam silently dropped or kept; -inf
marks what the trie disallows.

Modality decision (``modality_threshold``, off by default): level 0 is the modality code. Plain
beam search adds log-probabilities over all levels, so a wrong modality the generator gives 0.3%
(-5.8 nats) still fills beams whenever the right modality's semantic codes are uncertain enough
that its later beams fall below that (they routinely do: the deep residual levels are close to
unpredictable). With a threshold t > 0 a modality survives the first step only if its probability
is at least t times the most probable allowed modality's, so the beams are spent inside the
modalities the generator actually considers; the decision stays the model's own (no task label
is used). t = 0 is the official decoding. With ``modality_level=False`` (a quantizer without a
modality level, whose level 0 is a semantic level like any other) the threshold is ignored.

Diverse beams (``sibling_penalty``, off by default): a beam's children compete with every other
beam's children for the ``num_beams`` places, so a confident prefix can fill most of them with its
own continuations. With a penalty g > 0 the children of one beam are ranked by score and the r-th
best (r = 0, 1, ...) competes with its score lowered by g * r at that level only (the sibling-rank
penalty of Li, Monroe and Jurafsky, 2016, "A simple, fast diverse decoding algorithm"), which
spreads the places over more prefixes. The beams keep their true log-probabilities and come back
sorted by them, so GENIUS ranks by the model's scores; g = 0 is plain beam search.

``generate_reference`` is the slow reference (``transformers.generate`` with
``prefix_allowed_tokens_fn``) that the tests and benchmarks compare against.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from genius.common.cpu import cpu_flags, fp32_products_in_onednn
from genius.common.distributed import autocast_dtype
from genius.models.generative_retriever.device_trie import DeviceTrie
from genius.models.generative_retriever.fused_decoder import FusedDecoder
from genius.models.generative_retriever.generator import IDGenerator
from genius.models.generative_retriever.vocab import PAD

log = logging.getLogger("genius.beam_search")

ABSENT_NODE = -1
# Raised whenever the search's numbers change on purpose, so decodings cached and evaluations
# finished before are redone, not reused: 2 = output head and scores in fp32 under autocast;
# 3 = the fused decoder step (under autocast the weights are cast once, attention runs in bf16/fp16);
# 4 = the CPU step's C++ kernels (attention over histories read in place, residual update + norm in
# one pass): fp32 and int8 change at float rounding, bf16 attention rounds its output once;
# 5 = the cross-attention: in fp32 absorbed into per-query products, elsewhere two batched GEMMs
# with the scores and softmax in fp32 (bf16 and int8 change at their rounding, fp32 at float's);
# 6 = fp32 output products add into the residual stream inside the GEMM (float rounding);
# 7 = attention weights that would be subnormal (under 1.2e-38) are zero (a term that small dropped);
# 8 = fp32 products in oneDNN on AMD CPUs with AVX-512 (``fp32_products_in_onednn``: float rounding).
NUMERICS_VERSION = 8


@dataclass
class BeamResult:
    codes: torch.Tensor  # int64 [Q, B, L]; -1 for absent beams
    scores: torch.Tensor  # float32 [Q, B], sum of log-probabilities, descending; -inf for absent beams
    valid: torch.Tensor  # bool [Q, B]
    level_head: bool  # True: scores normalised over the level's codes; False: over the full vocabulary


@functools.cache
def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 natively (x86: AVX512_BF16 or AMX-BF16), so that bf16
    decoding is faster than fp32. oneDNN alone is not the test: on AVX-512 CPUs without those
    instructions (Ice Lake, Skylake) it reports bf16 support but converts to fp32, and bf16
    decoding ran 4x slower than fp32 (BENCHMARKS.md, section 7); with AVX2 only it has no bf16
    kernels (about 1 GFLOP/s). Where the CPU's flags cannot be read, oneDNN's answer stands."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    flags = cpu_flags(cpuinfo)
    return flags is None or not flags.isdisjoint({"avx512_bf16", "amx_bf16"})


@functools.cache
def _warn_emulated_bf16() -> None:  # once per process, not once per batch
    log.warning("decoding.autocast: this CPU has no bf16 instructions (AVX512_BF16 or AMX), so bf16 decoding runs "
                "emulated and slower than fp32; set decoding.autocast=false on this machine (the beams may then "
                "differ slightly)")


def _autocast(device: torch.device, enabled: bool):
    """bf16 on CPU, fp16 on GPU (decoding only; scores are always accumulated in fp32)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype(device))


def decoder_dtype(device: torch.device, autocast: bool) -> torch.dtype:
    """The type of the decoder's weights and GEMMs: bf16 (CPU) or fp16 (GPU) under autocast, else fp32."""
    return autocast_dtype(device) if autocast else torch.float32


def prepare_decoder(generator: IDGenerator, device: torch.device, autocast: bool = False,
                    int8: bool = False) -> FusedDecoder:
    """The :class:`FusedDecoder` that ``constrained_beam_search`` runs for these settings, from the
    generator's weights as they are now (refused where the precision cannot run)."""
    return FusedDecoder(generator, decoder_dtype(device, autocast), int8)


def constrained_beam_search(generator: IDGenerator, queries: torch.Tensor, trie, codebook_sizes: Sequence[int],
                            num_beams: int = 50, batch_size: int = 64, level_head: bool = True,
                            autocast: bool = False, modality_threshold: float = 0.0,
                            modality_level: bool = True, sibling_penalty: float = 0.0,
                            int8: bool = False, decoder: FusedDecoder | None = None) -> BeamResult:
    """Top ``num_beams`` trie IDs per query; see module docstring. ``queries``: what the generator
    encodes, normalised Combiner outputs [Q, dim] (prefix) or uint8 images [Q, 3, S, S] (image_tokens).

    ``trie``: any object with the host trie node API (``root``, ``fill_mask``, ``advance``) built
    over level-local codes [N, L] with L = len(codebook_sizes), or a ``DeviceTrie`` on the
    queries' device (identical beams, no host round trip per step). ``modality_level``: whether level 0 is
    the modality code (the quantizer's ``has_modality_level``); without it ``modality_threshold``
    is ignored. ``sibling_penalty``: diverse beams (module docstring); 0 is plain beam search.
    ``int8``: the decoder step's and the output head's products in int8 (x86 CPUs; not with
    ``autocast``); a query's beams then depend on its batch (``FusedDecoder``). ``decoder``: one
    ``prepare_decoder`` made for this generator with the same ``autocast`` and ``int8``, reused
    across searches (module docstring); None prepares one for this search.
    """
    if list(codebook_sizes) != generator.codebook_sizes:
        raise ValueError(f"codebook sizes {list(codebook_sizes)} differ from the generator's {generator.codebook_sizes}")
    if num_beams < 1 or batch_size < 1:
        raise ValueError(f"num_beams ({num_beams}) and batch_size ({batch_size}) must be >= 1")
    if not 0.0 <= modality_threshold <= 1.0:
        raise ValueError(f"modality_threshold must be in [0, 1], got {modality_threshold}")
    if not 0.0 <= sibling_penalty < float("inf"):
        raise ValueError(f"sibling_penalty must be finite and >= 0, got {sibling_penalty}")
    if decoder is None:
        decoder = prepare_decoder(generator, queries.device, autocast, int8)
    elif (decoder.int8, decoder.dtype) != (int8, decoder_dtype(queries.device, autocast)):
        raise ValueError(f"the decoder was prepared for int8={decoder.int8}, dtype {decoder.dtype}; this search asks "
                         f"for int8={int8}, autocast={autocast}: prepare one with the search's settings")
    generator.check_inputs(queries)
    was_training = generator.training
    generator.eval()
    try:
        threshold = modality_threshold if modality_level else 0.0
        if autocast and queries.device.type == "cpu" and not cpu_has_bf16():
            _warn_emulated_bf16()
        with fp32_products_in_onednn(queries.device):  # oneDNN's fp32 products where MKL's are slow (AMD)
            parts = [_search(generator, decoder, chunk, trie, num_beams, level_head, autocast, threshold,
                             sibling_penalty) for chunk in queries.split(batch_size)]
    finally:
        generator.train(was_training)
    if not parts:
        codes = torch.zeros(0, num_beams, len(codebook_sizes), dtype=torch.long)
        return BeamResult(codes, torch.zeros(0, num_beams), torch.zeros(0, num_beams, dtype=torch.bool), level_head)
    codes, scores, valid = (torch.cat(x) for x in zip(*parts))
    return BeamResult(codes, scores, valid, level_head)


@torch.inference_mode()
def _search(generator: IDGenerator, decoder: FusedDecoder, queries: torch.Tensor, trie, num_beams: int,
            level_head: bool, autocast: bool, modality_threshold: float, sibling_penalty: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device, num_queries = queries.device, len(queries)
    on_device = isinstance(trie, DeviceTrie)
    query_base = torch.arange(num_queries, device=device)[:, None]
    with _autocast(device, autocast):
        encoder_hidden = generator.encode(queries)
    masks = _MaskBuffer(num_queries * num_beams, max(generator.codebook_sizes), device, on_device)
    # One beam per query (the root) until the first step has chosen codes.
    beams, parents, broken = 1, None, []
    state = decoder.start(encoder_hidden, num_queries * num_beams, generator.num_levels)
    nodes = trie.root_nodes(num_queries) if on_device else np.full(num_queries, trie.root(), dtype=np.int64)
    scores = torch.zeros(num_queries, 1, device=device)
    codes = torch.zeros(num_queries, 1, 0, dtype=torch.long, device=device)
    tokens = torch.full((num_queries,), PAD, dtype=torch.long, device=device)
    for level, width in enumerate(generator.codebook_sizes):
        log_probs = decoder.level_log_probs(generator, decoder.step(state, tokens, parents), level, level_head, state)
        allowed = masks.fill(trie, level, nodes, width)
        keep = min(num_beams, beams * width)
        thresholded = level == 0 and modality_threshold > 0
        if decoder.kernels is not None and sibling_penalty == 0 and not thresholded:
            scores, flat = _top_allowed(decoder.kernels, scores, log_probs, allowed, beams, keep)
        else:
            total = (scores.view(-1, 1) + log_probs).masked_fill(~allowed, -torch.inf)
            if thresholded:  # one beam (the root) per query here, so total is [Q, K_0]
                best = total.max(dim=1, keepdim=True).values
                total = total.masked_fill(total < best + float(np.log(modality_threshold)), -torch.inf)
            if sibling_penalty > 0:
                scores, flat = _diverse_topk(total.view(num_queries, beams, width), keep, sibling_penalty)
            else:
                scores, flat = total.view(num_queries, beams * width).topk(keep, dim=1)
        parents = (flat // width + query_base * beams).view(-1)  # row of the parent beam
        chosen = flat % width
        codes = torch.cat([codes.view(num_queries * beams, -1)[parents].view(num_queries, keep, -1),
                           chosen[..., None]], dim=2)
        if on_device:  # the trie steps on the device; the scores are checked once, after the search
            broken.append((torch.isnan(scores) | torch.isposinf(scores)).any(dim=1))
            nodes = torch.where(torch.isneginf(scores).view(-1), ABSENT_NODE,
                                trie.advance(level, nodes[parents], chosen.view(-1)))
        else:
            # What the host trie needs, in one device-to-host copy (the level's only sync): parent
            # rows, chosen codes, and each beam's state (-inf: absent; NaN or +inf: broken numerics).
            beam_state = torch.where(torch.isfinite(scores), _FINITE, torch.where(torch.isneginf(scores), _ABSENT, _BROKEN))
            host_parents, host_chosen, host_state = torch.stack([parents, chosen.view(-1), beam_state.view(-1)]).cpu().numpy()
            _check_scores((host_state.reshape(num_queries, keep) == _BROKEN).any(axis=1), level)
            nodes = np.asarray(trie.advance(level, nodes[host_parents], host_chosen), np.int64)
            nodes[host_state == _ABSENT] = ABSENT_NODE
        tokens = (chosen + generator.offsets[level]).view(-1)
        beams = keep
    if on_device:
        for level, queries_broken in enumerate(torch.stack(broken).cpu().numpy()):
            _check_scores(queries_broken, level)
    if sibling_penalty > 0:  # chosen by penalised scores: hand them back in the order of their true ones
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        codes = codes.gather(1, order[..., None].expand_as(codes))
    return _pad_absent(codes, scores, num_beams)


def _top_allowed(kernels, scores: torch.Tensor, log_probs: torch.Tensor, allowed: torch.Tensor, beams: int,
                 keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores + log_probs)`` over the ``allowed`` codes, top ``keep`` per query as ``topk`` would
    give it (scores [Q, keep], flat indices into beams x width), in one C++ pass on a CPU.
    Ties go to the lower index; a query with fewer allowed codes is padded with -inf."""
    num_queries = len(log_probs) // beams
    out_scores = torch.empty(num_queries, keep)
    out_flat = torch.empty(num_queries, keep, dtype=torch.long)
    if log_probs.stride(1) != 1:  # the kernel reads rows where they lie (a full-vocabulary slice), not strided columns
        log_probs = log_probs.contiguous()
    kernels.top_allowed(log_probs.numpy(), scores.reshape(-1).contiguous().numpy(), allowed.numpy(), beams,
                        out_scores.numpy(), out_flat.numpy(), torch.get_num_threads())
    return out_scores, out_flat


def _diverse_topk(total: torch.Tensor, keep: int, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` continuations per query of ``total`` [Q, beams, width] chosen by sibling-rank
    penalised scores; returns their true scores [Q, keep] and flat indices into beams x width.
    Only a beam's best ``keep`` children can be chosen, so only those are ranked."""
    num_queries, beams, width = total.shape
    per_beam = min(keep, width)
    child_scores, child_codes = total.topk(per_beam, dim=2)  # sorted: the sibling rank is the position
    rank_penalty = penalty * torch.arange(per_beam, device=total.device, dtype=total.dtype)
    _, picked = (child_scores - rank_penalty).view(num_queries, beams * per_beam).topk(keep, dim=1)
    scores = child_scores.view(num_queries, -1).gather(1, picked)
    flat = (picked // per_beam) * width + child_codes.view(num_queries, -1).gather(1, picked)
    return scores, flat


_ABSENT, _FINITE, _BROKEN = 0, 1, 2  # a beam's state, as _search copies it to the host


def _check_scores(broken: np.ndarray, level: int) -> None:
    """A NaN or +inf score is an error: CUDA's topk ranks NaN first, and the beam would pass for
    a real one (or, read as not finite, vanish as absent). -inf is a trie-disallowed code.
    ``broken``: bool [Q], whether a query has such a beam after ``level``."""
    if broken.any():
        raise FloatingPointError(
            f"decoding produced NaN or +inf scores at level {level} for {int(broken.sum())} of {len(broken)} "
            f"queries; the generator's weights or inputs hold NaN/inf (check the generator checkpoint and the query "
            f"features), or the decoder overflows in low precision (set decoding.autocast=false)")


class _MaskBuffer:
    """The trie's allowed-code masks of one search, in memory allocated once and reused at every
    level (a level's mask is its first rows x width entries, viewed as [rows, width]).

    A host trie fills a host buffer; on a GPU it is pinned and copied into a device buffer without
    blocking. Reusing it is safe: the next ``fill`` runs after the level's device-to-host copy in
    ``_search``, which waits for all work queued before it, the mask's upload included. A
    :class:`DeviceTrie` fills the device buffer itself."""

    def __init__(self, max_rows: int, max_width: int, device: torch.device, on_device: bool = False):
        size = max_rows * max_width
        self.host = None
        if not on_device or device.type == "cpu":
            self.host = torch.empty(size, dtype=torch.bool, pin_memory=device.type == "cuda")
            self.host_array = self.host.numpy()
        self.device = None if device.type == "cpu" else torch.empty(size, dtype=torch.bool, device=device)

    def fill(self, trie, level: int, nodes, width: int) -> torch.Tensor:
        """The [len(nodes), width] mask of the codes allowed after ``nodes``, on the search's device."""
        count = len(nodes) * width
        if isinstance(trie, DeviceTrie):
            buffer = self.host if self.device is None else self.device
            return trie.allowed(level, nodes, out=buffer[:count].view(len(nodes), width))
        trie.fill_mask(level, nodes, self.host_array[:count].reshape(len(nodes), width))  # fill_mask clears it
        if self.device is None:
            return self.host[:count].view(len(nodes), width)
        return self.device[:count].copy_(self.host[:count], non_blocking=True).view(len(nodes), width)


def _pad_absent(codes: torch.Tensor, scores: torch.Tensor, num_beams: int):
    """Mark -inf beams absent and pad to ``num_beams`` beams per query."""
    num_queries, beams, num_levels = codes.shape
    out_codes = torch.full((num_queries, num_beams, num_levels), -1, dtype=torch.long, device=codes.device)
    out_scores = torch.full((num_queries, num_beams), -torch.inf, dtype=torch.float32, device=codes.device)
    valid = torch.zeros(num_queries, num_beams, dtype=torch.bool, device=codes.device)
    valid[:, :beams] = torch.isfinite(scores)
    out_codes[:, :beams] = codes.masked_fill(~valid[:, :beams, None], -1)
    out_scores[:, :beams] = scores.float().masked_fill(~valid[:, :beams], -torch.inf)
    return out_codes, out_scores, valid


@torch.inference_mode()
def generate_reference(generator: IDGenerator, z_query: torch.Tensor, trie, num_beams: int,
                       length_penalty: float = 1.0) -> BeamResult:
    """The slow reference: ``transformers.generate`` with ``prefix_allowed_tokens_fn`` (full vocabulary).

    It is the official decoding path (one Python trie lookup per beam per step). Beams it could not
    fill come back from ``generate`` with scores near -1e9 (duplicates of its initial dummy beams) or
    -inf; they are reported absent, like ``constrained_beam_search`` does.
    """
    from transformers.modeling_outputs import BaseModelOutput

    generator.eval()
    offsets, num_levels = generator.offsets, generator.num_levels

    def allowed_tokens(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        prefix = input_ids[1:].tolist()  # drop the decoder start token
        codes = [token - offsets[level] for level, token in enumerate(prefix)]
        return [int(c) + offsets[len(prefix)] for c in trie.children(codes)]

    beam_kwargs = {"early_stopping": True, "length_penalty": length_penalty} if num_beams > 1 else {}
    out = generator.t5.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=generator.encode(z_query)), num_beams=num_beams,
        num_return_sequences=num_beams, max_new_tokens=num_levels, do_sample=False,
        prefix_allowed_tokens_fn=allowed_tokens, return_dict_in_generate=True, output_scores=True,
        output_logits=True, **beam_kwargs,
    )
    num_queries = len(z_query)
    tokens = out.sequences[:, 1:].reshape(num_queries, num_beams, num_levels)
    if num_beams > 1:
        scores = out.sequences_scores.float() * num_levels**length_penalty
    else:  # greedy search reports no sequence score: sum the full-vocabulary log-probs of its picks
        log_probs = torch.stack(out.logits, dim=1).float().log_softmax(-1)
        scores = log_probs.gather(2, out.sequences[:, 1:, None]).sum(dim=(1, 2))
    scores = scores.reshape(num_queries, num_beams)
    valid = scores > -1e8
    codes = (tokens - torch.as_tensor(offsets)).masked_fill(~valid[..., None], -1)
    return BeamResult(codes, scores.masked_fill(~valid, -torch.inf), valid, level_head=False)
