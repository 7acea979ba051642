"""The C++ beam-search self-attention reads each row's history in place and equals plain attention
over the gathered history; inputs it cannot read are refused with a ValueError."""
from __future__ import annotations

import pytest
import torch

from genius.models.generative_retriever import _beam_attention

HEADS, D_KV, MAX_STEPS, MAX_ROWS = 4, 24, 5, 70  # d_kv not a multiple of the kernel's 16 lanes


def problem(rows: int, steps: int, seed: int):
    """A layer's history [2, MAX_STEPS, MAX_ROWS, inner] with random ancestors (each row its own at
    the newest step), a query per row inside a wider qkv-like row, and a position bias."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randn(2, MAX_STEPS, MAX_ROWS, HEADS * D_KV, generator=g)
    ancestors = torch.randint(0, MAX_ROWS, (MAX_STEPS, MAX_ROWS), generator=g)
    ancestors[steps - 1, :rows] = torch.arange(rows)
    q = torch.randn(rows, 3, HEADS * D_KV, generator=g)[:, 0]  # strided rows, as the decoder's qkv gives
    bias = torch.randn(HEADS, steps, generator=g)
    return q, history, ancestors, bias


def reference(q, history, ancestors, bias) -> torch.Tensor:
    """Softmax attention in float64, one row and head at a time, over the row's ancestors' keys."""
    rows, steps = len(q), bias.shape[1]
    out = torch.empty(rows, HEADS * D_KV, dtype=torch.float64)
    for row in range(rows):
        lineage = ancestors[:steps, row]
        keys, values = history[:, torch.arange(steps), lineage].double()  # [steps, inner] each
        for h in range(HEADS):
            part = slice(h * D_KV, (h + 1) * D_KV)
            weights = torch.softmax(keys[:, part] @ q[row, part].double() + bias[h].double(), dim=0)
            out[row, part] = weights @ values[:, part]
    return out


@pytest.mark.parametrize("rows,steps,threads", [(1, 1, 1), (37, 3, 2), (70, 5, 2), (50, 4, 3)])
def test_fp32_equals_attention_over_the_gathered_history(rows, steps, threads):
    q, history, ancestors, bias = problem(rows, steps, seed=rows + steps)
    out = torch.full((rows, HEADS * D_KV), torch.nan)
    _beam_attention.attend(q.numpy(), history[0].numpy(), history[1].numpy(), ancestors.numpy(), bias.numpy(),
                           out.numpy(), threads)
    torch.testing.assert_close(out.double(), reference(q, history, ancestors, bias), atol=1e-5, rtol=1e-5)


def test_bf16_reads_bf16_and_rounds_its_output_once():
    q, history, ancestors, bias = problem(40, 4, seed=7)
    q, history = q.bfloat16(), history.bfloat16()
    out = torch.empty(40, HEADS * D_KV, dtype=torch.bfloat16)
    as_bits = (lambda x: x.view(torch.int16).numpy())
    _beam_attention.attend_bf16(as_bits(q), as_bits(history[0]), as_bits(history[1]), ancestors.numpy(),
                                bias.numpy(), as_bits(out), 2)
    expected = reference(q.float(), history.float(), ancestors, bias)  # the same bf16 inputs, exact math
    assert not torch.equal(out.double(), expected)  # rounded to bf16 ...
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=2 ** -8)  # ... once, from fp32 math


def test_unreadable_inputs_are_refused():
    q, history, ancestors, bias = problem(10, 2, seed=1)
    out = torch.empty(10, HEADS * D_KV)
    keys, values = history[0].numpy(), history[1].numpy()

    def attend(**changed):
        args = dict(q=q.numpy(), keys=keys, values=values, ancestors=ancestors.numpy(), bias=bias.numpy(),
                    out=out.numpy(), threads=2)
        _beam_attention.attend(**{**args, **changed})

    broken = ancestors.clone()
    broken[0, 3] = MAX_ROWS
    with pytest.raises(ValueError, match="ancestor row out of range"):
        attend(ancestors=broken.numpy())
    with pytest.raises(ValueError, match="more steps than the history"):
        attend(bias=torch.zeros(HEADS, MAX_STEPS + 1).numpy())
    with pytest.raises(ValueError, match="differ in width"):
        attend(out=torch.empty(10, HEADS * D_KV + 1).numpy())
    with pytest.raises(ValueError, match="contiguous"):
        attend(keys=history[0].transpose(0, 1).numpy())
    with pytest.raises(TypeError):  # float64 is not converted silently
        attend(q=q.double().numpy())

