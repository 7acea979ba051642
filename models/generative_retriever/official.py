"""The published stage-2 checkpoint layout, ``GENIUS_t5small.pth`` (layout:
``official_checkpoint_layouts/GENIUS_t5small.json``): loading it, and writing a generator and its
quantizer in it (``genius export-official``).

The file's ``model`` state dict has three parts:
- ``quantizer.*``: a copy of the stage-1 RQ (the rq_clip_large layout under a prefix), handed to
  stage 1's official loader;
- ``id_generator.*``: the T5 -> our ``t5.*``; ``shared``, ``encoder.embed_tokens``,
  ``decoder.embed_tokens`` and ``lm_head`` are one tied tensor and must agree;
- ``embed_projector.0.{weight,bias}`` (a one-layer Sequential there) -> our ``embed_projector.*``.
Everything is loaded strictly: a missing, unexpected or mis-shaped tensor is an error naming it
by its official name. The only keys ignored are the legacy ``contra_projector.*`` the layout
notes list as possible extras. Shapes are read from the file, so a T5 of another width loads too.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from genius.common.checkpoint import CheckpointMismatchError, check_state_dict, load_official_checkpoint
from genius.models.generative_retriever.generator import T5_SMALL, IDGenerator, make_arch
from genius.models.residual_quantization.official import GENERATOR_QUANTIZER_PREFIX as QUANTIZER_PREFIX
from genius.models.residual_quantization.official import to_official_state as rq_to_official_state

IGNORED_PREFIXES = ("contra_projector.",)  # left by code before 2025-07-06; unused
RENAMES = (("id_generator.", "t5."), ("embed_projector.0.", "embed_projector."))
TIED_EMBEDDINGS = ("id_generator.shared.weight", "id_generator.encoder.embed_tokens.weight",
                   "id_generator.decoder.embed_tokens.weight", "id_generator.lm_head.weight")
_CODEBOOK = re.compile(r"^residual_rq\.layers\.(\d+)\._codebook\.embed$")


def to_official_name(name: str) -> str:
    for official, ours in RENAMES:
        if name.startswith(ours):
            return official + name[len(ours):]
    raise KeyError(f"generator tensor {name} has no official counterpart")


def to_official_state(generator_state: Mapping[str, torch.Tensor], rq_state: Mapping[str, torch.Tensor],
                      rq_arch: Mapping) -> dict[str, torch.Tensor]:
    """Our generator and RQ state dicts -> the ``GENIUS_t5small.pth`` state dict, in the official
    order: ``quantizer.*`` (the RQ layout), ``id_generator.*``, ``embed_projector.0.*``.

    The four tied embedding names (one parameter in ``IDGenerator``) get one tensor object, so
    ``torch.save`` writes one storage, as in the released file.
    """
    state = {QUANTIZER_PREFIX + name: tensor for name, tensor in rq_to_official_state(rq_state, rq_arch).items()}
    state.update({to_official_name(name): tensor for name, tensor in generator_state.items()})
    for name in TIED_EMBEDDINGS[1:]:
        state[name] = state[TIED_EMBEDDINGS[0]]
    return state


def split_official_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(generator part with official names, quantizer part with the prefix removed)."""
    generator, quantizer = {}, {}
    for name, tensor in state.items():
        if name.startswith(QUANTIZER_PREFIX):
            quantizer[name[len(QUANTIZER_PREFIX):]] = tensor
        elif not name.startswith(IGNORED_PREFIXES):
            generator[name] = tensor
    return generator, quantizer


def official_codebook_sizes(quantizer_state: Mapping[str, torch.Tensor]) -> list[int]:
    """[K_0, K_1, ...] from the quantizer's per-level codebook buffers ``[1, K, dim]``."""
    sizes = {int(m[1]): tensor.shape[1] for name, tensor in quantizer_state.items() if (m := _CODEBOOK.match(name))}
    if not sizes or sorted(sizes) != list(range(len(sizes))):
        raise CheckpointMismatchError("official checkpoint: no consecutive "
                                      "quantizer.residual_rq.layers.<l>._codebook.embed buffers "
                                      f"(found levels {sorted(sizes)})")
    return [int(sizes[level]) for level in range(len(sizes))]


def official_arch(state: Mapping[str, torch.Tensor], codebook_sizes: list[int]) -> dict:
    """The generator's arch, read from the tensor shapes (other T5 settings are t5-small's)."""
    try:
        d_model = state["id_generator.shared.weight"].shape[1]
        projected, dim = state["embed_projector.0.weight"].shape
        buckets, heads = state["id_generator.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
        inner = state["id_generator.decoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        d_ff = state["id_generator.decoder.block.0.layer.2.DenseReluDense.wi.weight"].shape[0]
    except KeyError as err:
        raise CheckpointMismatchError(f"official generator checkpoint lacks {err.args[0]}") from None
    layers = len({m[1] for name in state if (m := re.match(r"^id_generator\.decoder\.block\.(\d+)\.", name))})
    return make_arch(dim, codebook_sizes, projected // d_model, d_model=d_model, num_heads=heads, d_kv=inner // heads,
                     d_ff=d_ff, num_decoder_layers=layers, relative_attention_num_buckets=buckets,
                     dropout=T5_SMALL["dropout"])


def generator_from_official_state(state: Mapping[str, torch.Tensor], codebook_sizes: list[int],
                                  what: str = "official generator checkpoint") -> IDGenerator:
    """Strictly load the generator part (official names, no ``quantizer.*``) into an ``IDGenerator``."""
    generator = IDGenerator(official_arch(state, codebook_sizes))
    expected = {to_official_name(name): tensor for name, tensor in generator.state_dict().items()}
    check_state_dict(expected, state, what)
    first = state[TIED_EMBEDDINGS[0]]
    differing = [name for name in TIED_EMBEDDINGS[1:] if not torch.equal(state[name], first)]
    if differing:
        raise CheckpointMismatchError(f"{what}: tied embeddings differ from {TIED_EMBEDDINGS[0]}: {', '.join(differing)}")
    ours = {name: state[to_official_name(name)] for name in generator.state_dict()}
    generator.load_state_dict(ours, strict=True)
    return generator.eval()


def official_quantizer(quantizer_state: Mapping[str, torch.Tensor], what: str = "official generator checkpoint"):
    """Stage 1's RQModel from the checkpoint's ``quantizer.*`` part (prefix removed), loaded strictly."""
    from genius.models.residual_quantization.official import official_rq_from_state

    return official_rq_from_state(quantizer_state, f"{what}: its quantizer.* part (names without that prefix)")


def load_official_generator(path: str | os.PathLike):
    """(IDGenerator, RQModel) from ``GENIUS_t5small.pth``, both in eval mode."""
    state = load_official_checkpoint(path)["model"]
    generator_state, quantizer_state = split_official_state(state)
    sizes = official_codebook_sizes(quantizer_state)
    generator = generator_from_official_state(generator_state, sizes, f"{path} (generator part)")
    rq = official_quantizer(quantizer_state, f"{path}")
    if list(rq.codebook_sizes) != sizes:
        raise CheckpointMismatchError(f"{path}: quantizer codebook sizes {rq.codebook_sizes} differ from {sizes}")
    return generator, rq.eval()
