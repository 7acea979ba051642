"""The generator's token vocabulary: three special tokens, then every level's code tokens.

pad 0, eos 1, unk 2; level 0 code c is token 3 + c; level l's codes follow level l-1's, so with
codebook sizes [3, K, K, ...] level l >= 1, code c is token 6 + (l - 1) * K + c. At paper size
(3 + 8 x 4096 codes) the vocabulary has 32,774 tokens, the same ids as the official WordLevel
tokenizer (<pad> <\\s> <unk> <a0..a2> <b0..b4095> ... <i0..i4095>).
"""
from __future__ import annotations

from typing import Sequence

import torch

PAD, EOS, UNK = 0, 1, 2
NUM_SPECIAL = 3


def code_offsets(codebook_sizes: Sequence[int]) -> list[int]:
    """Token id of code 0 at each level."""
    offsets = [NUM_SPECIAL]
    for size in codebook_sizes[:-1]:
        offsets.append(offsets[-1] + int(size))
    return offsets


def vocab_size(codebook_sizes: Sequence[int]) -> int:
    return NUM_SPECIAL + sum(int(k) for k in codebook_sizes)


def codes_to_tokens(codes: torch.Tensor, codebook_sizes: Sequence[int]) -> torch.Tensor:
    """Codes [..., L] (level-local indices) -> token ids [..., L]; out-of-range codes raise."""
    sizes = torch.as_tensor(list(codebook_sizes), device=codes.device)
    if codes.shape[-1] != len(sizes):
        raise ValueError(f"codes have {codes.shape[-1]} levels, the vocabulary has {len(sizes)}")
    if codes.numel() and ((codes < 0) | (codes >= sizes)).any():
        raise ValueError(f"codes out of range for codebook sizes {list(codebook_sizes)}")
    return codes.long() + torch.as_tensor(code_offsets(codebook_sizes), device=codes.device)


def tokens_to_codes(tokens: torch.Tensor, codebook_sizes: Sequence[int]) -> torch.Tensor:
    """Token ids [..., L] -> level-local codes [..., L]; a token of the wrong level raises."""
    offsets = torch.as_tensor(code_offsets(codebook_sizes), device=tokens.device)
    codes = tokens.long() - offsets
    sizes = torch.as_tensor(list(codebook_sizes), device=tokens.device)
    if codes.numel() and ((codes < 0) | (codes >= sizes)).any():
        raise ValueError("tokens are not the code tokens of their levels (special token or wrong level)")
    return codes
