"""Query-target mixing, the generator's training-time query augmentation (as the official code does it).

For every sample and every feature dimension, s ~ Beta(alpha, alpha) (alpha = 2: mean 1/2,
variance 1/20); the generator's input is normalize(sqrt(s) * z_q + sqrt(1 - s) * z_c). The
square roots keep the mix near unit norm before the re-normalisation (s + (1 - s) = 1 for two
orthogonal unit vectors). At inference, and with mixing off, the plain query z_q is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_mixing_weights(shape: torch.Size, alpha: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """s ~ Beta(alpha, alpha), fp32, drawn from torch's global RNG (so checkpoints can restore it)."""
    concentration = torch.tensor(float(alpha), device=device)
    return torch.distributions.Beta(concentration, concentration).sample(shape)


def mix_query_target(z_query: torch.Tensor, z_target: torch.Tensor, alpha: float = 2.0,
                     enabled: bool = True) -> torch.Tensor:
    """The generator's training input [B, dim] from normalised query and target features [B, dim]."""
    if not enabled:
        return z_query
    s = sample_mixing_weights(z_query.shape, alpha, z_query.device)
    return F.normalize(s.sqrt() * z_query.float() + (1 - s).sqrt() * z_target.float(), dim=-1)
