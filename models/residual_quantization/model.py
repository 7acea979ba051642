"""The stage-1 model: a Combiner that fuses image and text CLIP vectors, and the residual quantizer.

``RQModel`` is what later stages use: ``embed`` (the normalised fused query/candidate vector that
the generator reads and the trie is built over), ``encode`` (discrete IDs), ``decode``. It is
always rebuilt from its ``arch`` dict, which every saved file carries.

``rq.pt`` = {"model": state dict, "arch": arch, "config": resolved training config, "run_key": what
it was trained from (genius.common.runstate), "fingerprint": sha256 of the state dict, and the
digest of the whole content that every read checks}; the fingerprint identifies the quantizer in
every artefact made from it (codes, generator).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genius.common.checkpoint import CheckpointMismatchError, load_own_checkpoint, load_state_dict_strict, save_own_checkpoint
from genius.models.residual_quantization.quantizer import GradientEstimator, ModalityMode, ResidualQuantizer

ARCH_KEYS = ("dim", "proj_dim", "hidden_dim", "num_levels", "codebook_size", "modality_mode", "decay", "eps",
             "dead_code_threshold")
# Arch keys added later, with the value every file written before them was trained with. The
# estimator only shapes training gradients, so it is recorded but never changes what a loaded
# model computes; every file before ``modality_level`` had one.
ARCH_DEFAULTS = {"gradient_estimator": "straight_through", "modality_level": True}


class Combiner(nn.Module):
    """CLIP4Cir's Combiner as GENIUS uses it (dropout 0, identity output projection).

    Both branches are projected and ReLU'd, concatenated text first, then a combination branch
    and a sigmoid gate lambda read the concatenation:
    out = branch + lambda * text + (1 - lambda) * image, on the masked raw inputs.
    """

    def __init__(self, dim: int, proj_dim: int, hidden_dim: int):
        super().__init__()
        self.text_projection_layer = nn.Linear(dim, proj_dim)
        self.image_projection_layer = nn.Linear(dim, proj_dim)
        self.combiner_layer = nn.Linear(2 * proj_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, dim)
        self.gate_hidden = nn.Linear(2 * proj_dim, hidden_dim)
        self.gate_out = nn.Linear(hidden_dim, 1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Masked raw vectors [B, dim] each -> unnormalised fused vector [B, dim]."""
        projected = torch.cat([F.relu(self.text_projection_layer(txt)), F.relu(self.image_projection_layer(img))], -1)
        branch = self.output_layer(F.relu(self.combiner_layer(projected)))
        gate = torch.sigmoid(self.gate_out(F.relu(self.gate_hidden(projected))))
        return branch + gate * txt + (1 - gate) * img


@dataclass
class RQOutput:
    z: torch.Tensor  # [B, dim] normalised Combiner output (fp32)
    quantized: torch.Tensor  # [B, dim] sum of codewords; gradient to z: the quantizer's estimator
    codes: torch.Tensor  # [B, L]
    commit_loss: torch.Tensor  # scalar
    partials: torch.Tensor  # [L, B, dim] detached reconstruction after each level
    resets: torch.Tensor  # [L] dead codes re-seeded this step


def _column(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1, 1)


class RQModel(nn.Module):
    def __init__(self, dim: int, proj_dim: int, hidden_dim: int, num_levels: int, codebook_size: int,
                 modality_mode: ModalityMode = "assigned", decay: float = 0.9, eps: float = 1e-5,
                 dead_code_threshold: float = 2.0, gradient_estimator: GradientEstimator = "straight_through",
                 modality_level: bool = True):
        super().__init__()
        self.arch = {"dim": dim, "proj_dim": proj_dim, "hidden_dim": hidden_dim, "num_levels": num_levels,
                     "codebook_size": codebook_size, "modality_mode": modality_mode, "decay": decay, "eps": eps,
                     "dead_code_threshold": dead_code_threshold, "gradient_estimator": gradient_estimator,
                     "modality_level": modality_level}
        self.combiner = Combiner(dim, proj_dim, hidden_dim)
        self.quantizer = ResidualQuantizer(dim, num_levels, codebook_size, modality_mode, decay, eps,
                                           dead_code_threshold, gradient_estimator, modality_level)

    @classmethod
    def from_arch(cls, arch: Mapping) -> "RQModel":
        missing = [key for key in ARCH_KEYS if key not in arch]
        if missing:
            raise CheckpointMismatchError(f"RQ arch lacks {', '.join(missing)}; got {dict(arch)}")
        return cls(**{key: arch[key] for key in ARCH_KEYS},
                   **{key: arch.get(key, default) for key, default in ARCH_DEFAULTS.items()})

    @property
    def num_levels(self) -> int:
        return self.quantizer.num_levels

    @property
    def codebook_sizes(self) -> list[int]:
        return self.quantizer.codebook_sizes

    @property
    def has_modality_level(self) -> bool:
        """Whether level 0 is the modality code (False: every level is a learned K-code level)."""
        return self.quantizer.modality_level

    def codebooks(self) -> list[torch.Tensor]:
        return [book.embed for book in self.quantizer.levels]

    def embed(self, img: torch.Tensor, txt: torch.Tensor, img_mask: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
        """Raw image/text vectors [B, dim] with [B] masks -> L2-normalised fused vectors [B, dim], fp32."""
        weight = self.combiner.output_layer.weight
        img = img.to(weight.device, weight.dtype) * _column(img_mask).to(weight.device, weight.dtype)
        txt = txt.to(weight.device, weight.dtype) * _column(txt_mask).to(weight.device, weight.dtype)
        return F.normalize(self.combiner(img, txt).float(), dim=-1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, img_mask: torch.Tensor, txt_mask: torch.Tensor,
                modality: torch.Tensor | None = None) -> RQOutput:
        """Embed and quantize (training mode: EMA codebook updates). ``modality``: level-0 codes
        (read only by an assigned modality level)."""
        z = self.embed(img, txt, img_mask, txt_mask)
        out = self.quantizer(z, modality)
        return RQOutput(z=z, quantized=out.quantized, codes=out.codes, commit_loss=out.commit_loss,
                        partials=out.partials, resets=out.resets)

    @torch.no_grad()
    def encode(self, z: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """Codes [B, L] (int64) of normalised vectors ``z``; never updates the codebooks."""
        return self.quantizer(z, modality, update=False).codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.decode(codes)


# ---- files ----------------------------------------------------------------------------------
def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    return digest.hexdigest()


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}


def save_rq(path: str | os.PathLike, model: RQModel, config: dict, **record) -> str:
    """Write the final ``rq.pt`` atomically; returns its fingerprint. ``record``: plain data kept
    alongside (train-rq stores its run key)."""
    state = cpu_state(model)
    fingerprint = state_fingerprint(state)
    save_own_checkpoint({"model": state, "arch": dict(model.arch), "config": config, **record,
                         "fingerprint": fingerprint}, path)
    return fingerprint


def _read_rq(path: str | os.PathLike, mmap: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no RQ checkpoint at {path} (run genius train-rq first)")
    obj = load_own_checkpoint(path, verify=not mmap, mmap=mmap, kind="rq")
    missing = [key for key in ("model", "arch", "fingerprint") if not (isinstance(obj, dict) and key in obj)]
    if missing:
        raise CheckpointMismatchError(f"{path} is not an rq.pt written by genius train-rq (lacks {', '.join(missing)})")
    return obj


def load_rq(path: str | os.PathLike) -> RQModel:
    """The project's own ``rq.pt``, loaded strictly and checked against its fingerprint, in eval mode."""
    obj = _read_rq(path)
    if state_fingerprint(obj["model"]) != obj["fingerprint"]:
        raise CheckpointMismatchError(f"{path}: the weights do not match the recorded fingerprint (corrupt file?)")
    model = RQModel.from_arch(obj["arch"])
    load_state_dict_strict(model, obj["model"], f"RQ checkpoint {path}")
    return model.eval()


def rq_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint recorded in ``rq.pt`` (memory-mapped read; the weights are not loaded)."""
    return str(_read_rq(path, mmap=True)["fingerprint"])


def rq_record(path: str | os.PathLike) -> dict:
    """Everything in ``rq.pt`` except the weights: arch, config, inputs, fingerprint."""
    obj = _read_rq(path, mmap=True)
    return {key: value for key, value in obj.items() if key != "model"}
