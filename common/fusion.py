"""UniIR's score fusion: the one embedding CLIP-SF retrieves with.

fused = normalize(img * img_mask + txt * txt_mask), a plain sum of the raw projection vectors
(so each branch is implicitly weighted by its own norm), then L2-normalised. Stage 0's training,
the dense baseline and GENIUS^R re-ranking all use this one function.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def score_fusion(img: torch.Tensor, txt: torch.Tensor, img_mask: torch.Tensor, txt_mask: torch.Tensor) -> torch.Tensor:
    """[B, D] image and text vectors with [B] masks -> [B, D] unit vectors (computed in fp32)."""
    fused = img.float() * img_mask.float().unsqueeze(-1) + txt.float() * txt_mask.float().unsqueeze(-1)
    return F.normalize(fused, dim=-1)


def fused_store_embeddings(arrays, chunk: int = 65536) -> np.ndarray:
    """Score-fused, normalised fp32 embeddings [N, D] for a store's arrays, in chunks."""
    out = np.empty((len(arrays.ids), arrays.dim), dtype=np.float32)
    for start in range(0, len(out), chunk):
        rows = slice(start, start + chunk)
        # np.array copies the memmap chunk: torch cannot wrap read-only memory without a warning
        out[rows] = score_fusion(*(torch.from_numpy(np.array(getattr(arrays, name)[rows]))
                                   for name in ("img", "txt", "img_mask", "txt_mask"))).numpy()
    return out
