"""The released GENIUS quantizer layout, ``rq_clip_large.pth``: loading it into ``RQModel``
(learned level 0), and writing an ``RQModel`` back in it (``genius export-official``).

The file is the official ``RQ`` module's state dict (layout: the project's
``official_checkpoint_layouts/rq_clip_large.json``): the Combiner under ``encoder.`` and
vector-quantize-pytorch codebooks under ``residual_rq.layers.<l>._codebook.`` with a leading
num_codebooks axis of 1 (``embed`` [1, K, dim], ``embed_avg``, ``cluster_size`` [1, K],
``initted`` [1]). The 3-code modality level also appears as ``vq._codebook.`` (the same tensors).

Every name and shape is checked before anything is loaded; the only tensors skipped are the
unused implicit-neural-codebook MLPs that vector-quantize-pytorch 1.16.0-1.17.3 always built
(``residual_rq.mlps.*``, listed in the layout file). ``initted`` is accepted both as the float
[1] of older library versions and as the 0-d bool of versions >= 1.27.

The stage-2 file ``GENIUS_t5small.pth`` carries the same state dict under ``quantizer.``;
``load_official_rq`` takes either file. A quantizer loaded from an official file is identified,
in codes and evaluation artefacts, by ``quantizer_fingerprint``: the state fingerprint of the
loaded ``RQModel`` state, the same definition ``rq.pt`` records, so a native run and its export
have one identity.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from genius.common.checkpoint import (CheckpointMismatchError, check_state_dict, load_official_checkpoint,
                                      load_state_dict_strict)
from genius.models.residual_quantization.model import RQModel, cpu_state, state_fingerprint
from genius.models.residual_quantization.quantizer import NUM_MODALITIES

# official Combiner name -> ours
COMBINER_NAMES = {
    "text_projection_layer": "text_projection_layer",
    "image_projection_layer": "image_projection_layer",
    "combiner_layer": "combiner_layer",
    "output_layer": "output_layer",
    "dynamic_scalar.0": "gate_hidden",
    "dynamic_scalar.3": "gate_out",
}
CODEBOOK_BUFFERS = ("initted", "cluster_size", "embed_avg", "embed")
# GENIUS_t5small.pth holds a full copy of the RQ state dict under this prefix.
GENERATOR_QUANTIZER_PREFIX = "quantizer."
# The official hyperparameters that leave no trace in the state dict.
OFFICIAL_EMA = {"decay": 0.9, "eps": 1e-5, "dead_code_threshold": 2.0}


def official_layout(arch: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in an official RQ state dict with this ``arch``."""
    d, p, h = arch["dim"], arch["proj_dim"], arch["hidden_dim"]
    shapes = {
        "text_projection_layer": ((p, d), (p,)), "image_projection_layer": ((p, d), (p,)),
        "combiner_layer": ((h, 2 * p), (h,)), "output_layer": ((d, h), (d,)),
        "dynamic_scalar.0": ((h, 2 * p), (h,)), "dynamic_scalar.3": ((1, h), (1,)),
    }
    layout = {}
    for name, (weight, bias) in shapes.items():
        layout[f"encoder.{name}.weight"], layout[f"encoder.{name}.bias"] = weight, bias
    sizes = [NUM_MODALITIES] + [arch["codebook_size"]] * (arch["num_levels"] - 1)
    prefixes = [("vq._codebook", NUM_MODALITIES)] + [(f"residual_rq.layers.{l}._codebook", k) for l, k in enumerate(sizes)]
    for prefix, k in prefixes:
        layout.update({f"{prefix}.initted": (1,), f"{prefix}.cluster_size": (1, k),
                       f"{prefix}.embed_avg": (1, k, d), f"{prefix}.embed": (1, k, d)})
    return layout


def _expected_tensors(arch: dict) -> dict[str, torch.Tensor]:
    """``official_layout`` as shape-only tensors, in order, for ``check_state_dict``."""
    return {name: torch.empty(shape, device="meta") for name, shape in official_layout(arch).items()}


def ignorable_extras(num_levels: int) -> set[str]:
    """vector-quantize-pytorch 1.16.0-1.17.3's unused per-level MLPs (``possible_extra_tensors``)."""
    names = set()
    for i in range(num_levels - 1):
        stems = ["proj_in"] + [f"layers.{j}.{k}" for j in range(4) for k in (0, 2)]
        names.update(f"residual_rq.mlps.{i}.{stem}.{part}" for stem in stems for part in ("weight", "bias"))
    return names


def _shape(state: Mapping, name: str, what: str) -> tuple[int, ...]:
    if name not in state:
        raise CheckpointMismatchError(f"{what} is not a GENIUS RQ state dict: it has no tensor {name}")
    return tuple(state[name].shape)


def infer_arch(state: Mapping, what: str) -> dict:
    """The official widths, level count and codebook size, read from the tensor shapes."""
    proj_dim, dim = _shape(state, "encoder.text_projection_layer.weight", what)
    hidden_dim = _shape(state, "encoder.combiner_layer.weight", what)[0]
    num_levels = sum(1 for name in state if name.startswith("residual_rq.layers.") and name.endswith("._codebook.embed"))
    if num_levels < 1:
        raise CheckpointMismatchError(f"{what}: no residual_rq.layers.<l>._codebook.embed tensors")
    codebook_size = _shape(state, "residual_rq.layers.1._codebook.embed", what)[1] if num_levels > 1 else 1
    return {"dim": dim, "proj_dim": proj_dim, "hidden_dim": hidden_dim, "num_levels": num_levels,
            "codebook_size": codebook_size, "modality_mode": "learned", **OFFICIAL_EMA}


def _normalise_initted(state: Mapping) -> dict:
    return {name: (t.reshape(1).float() if name.endswith(".initted") and t.dim() == 0 else t) for name, t in state.items()}


def _name_pairs(num_levels: int):
    """(official name, our name) of every distinct tensor; the ``vq._codebook.*`` aliases aside."""
    for official, ours in COMBINER_NAMES.items():
        for part in ("weight", "bias"):
            yield f"encoder.{official}.{part}", f"combiner.{ours}.{part}"
    for level in range(num_levels):
        for name in CODEBOOK_BUFFERS:
            yield f"residual_rq.layers.{level}._codebook.{name}", f"quantizer.levels.{level}.{name}"


def to_model_state(state: Mapping, num_levels: int) -> dict[str, torch.Tensor]:
    """Official names and shapes -> ``RQModel`` state dict (drops the leading codebook axis)."""
    mapped = {}
    for official, ours in _name_pairs(num_levels):
        tensor = state[official]
        if official.endswith(".initted"):
            tensor = tensor.reshape(()) > 0
        elif official.startswith("residual_rq."):
            tensor = tensor[0]
        mapped[ours] = tensor
    return mapped


def to_official_state(state: Mapping[str, torch.Tensor], arch: Mapping) -> dict[str, torch.Tensor]:
    """``RQModel`` state dict -> official names and shapes, in the official order (the inverse of
    ``to_model_state``).

    Codebook buffers regain the leading num_codebooks axis of 1 and ``initted`` becomes the float
    [1] flag the official library writes. ``vq._codebook.*`` are the very tensors of
    ``residual_rq.layers.0._codebook.*`` (in the official module they are one submodule), so
    ``torch.save`` stores them once, as in the released file.
    """
    mapped = {}
    for official, ours in _name_pairs(arch["num_levels"]):
        tensor = state[ours]
        if official.endswith(".initted"):
            tensor = tensor.reshape(1).float()
        elif official.startswith("residual_rq."):
            tensor = tensor.unsqueeze(0)
        mapped[official] = tensor
    for name in CODEBOOK_BUFFERS:
        mapped[f"vq._codebook.{name}"] = mapped[f"residual_rq.layers.0._codebook.{name}"]
    expected = _expected_tensors(arch)
    check_state_dict(expected, mapped, "the exported RQ state")
    return {name: mapped[name] for name in expected}


def quantizer_fingerprint(model: RQModel) -> str:
    """The identity of a quantizer loaded from an official file (see the module docstring)."""
    return state_fingerprint(cpu_state(model))


def official_rq_from_state(raw: Mapping[str, torch.Tensor], what: str) -> RQModel:
    """An official RQ state dict (e.g. the ``quantizer.`` part of GENIUS_t5small.pth, prefix
    stripped) -> ``RQModel`` in learned modality mode, eval mode, with strict checks."""
    arch = infer_arch(raw, what)
    extras = ignorable_extras(arch["num_levels"])
    state = _normalise_initted({name: t for name, t in raw.items() if name not in extras})
    check_state_dict(_expected_tensors(arch), state, what)
    for name in CODEBOOK_BUFFERS:
        if not torch.equal(state[f"vq._codebook.{name}"], state[f"residual_rq.layers.0._codebook.{name}"]):
            raise CheckpointMismatchError(f"{what}: vq._codebook.{name} and residual_rq.layers.0._codebook.{name} "
                                          "should be the same tensor but differ")
    model = RQModel.from_arch(arch)
    load_state_dict_strict(model, to_model_state(state, arch["num_levels"]), what)
    return model.eval()


def load_official_rq(path: str | os.PathLike) -> RQModel:
    """``rq_clip_large.pth``, or ``GENIUS_t5small.pth`` (its ``quantizer.*`` part) -> ``RQModel`` in
    learned modality mode, eval mode, with strict checks."""
    state = load_official_checkpoint(path)["model"]
    quantizer = {name[len(GENERATOR_QUANTIZER_PREFIX):]: tensor for name, tensor in state.items()
                 if name.startswith(GENERATOR_QUANTIZER_PREFIX)}
    if quantizer:
        return official_rq_from_state(quantizer, f"official generator checkpoint {path}: its quantizer.* part "
                                                 "(names without that prefix)")
    return official_rq_from_state(state, f"official RQ checkpoint {path}")
