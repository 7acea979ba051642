"""The C++ kernels of a CPU search step equal what torch computes without them: the self-attention
reading each row's history in place equals attention over the gathered history, the one-pass beam
selection equals add + mask + topk, the fused residual update + norm equals T5's norm; inputs
they cannot read are refused with a ValueError."""
from __future__ import annotations

import pytest
import torch

from genius.models.generative_retriever import _decoder_kernels
from genius.models.generative_retriever.beam_search import _top_allowed

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
    _decoder_kernels.attend(q.numpy(), history[0].numpy(), history[1].numpy(), ancestors.numpy(), bias.numpy(),
                            out.numpy(), threads)
    torch.testing.assert_close(out.double(), reference(q, history, ancestors, bias), atol=1e-5, rtol=1e-5)


def test_bf16_reads_bf16_and_rounds_its_output_once():
    q, history, ancestors, bias = problem(40, 4, seed=7)
    q, history = q.bfloat16(), history.bfloat16()
    out = torch.empty(40, HEADS * D_KV, dtype=torch.bfloat16)
    as_bits = (lambda x: x.view(torch.int16).numpy())
    _decoder_kernels.attend_bf16(as_bits(q), as_bits(history[0]), as_bits(history[1]), ancestors.numpy(),
                                 bias.numpy(), as_bits(out), 2)
    expected = reference(q.float(), history.float(), ancestors, bias)  # the same bf16 inputs, exact math
    assert not torch.equal(out.double(), expected)  # rounded to bf16 ...
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=2 ** -8)  # ... once, from fp32 math


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_that_would_be_subnormal_are_flushed_to_zero(dtype):
    """A history step scoring more than log(FLT_MIN) = -87.34 under the row's top gets weight 0,
    not exp(score - top) (subnormal, which the CPU multiplies through a slow assist); just above
    that it keeps its weight. The top step's value is 0 and the other's 1e30, so the output is the
    other step's weight x 1e30 exactly where it is kept."""
    gaps = torch.tensor([80.0, 87.0, 87.5, 90.0, 120.0])  # one head each: the second step's score under the first
    heads, rows = len(gaps), 3
    inner = heads * D_KV
    history = torch.zeros(2, 2, rows, inner)
    history[1, 1] = 1e30  # the values of the second step
    ancestors = torch.arange(rows).repeat(2, 1)
    bias = torch.stack([torch.zeros(heads), -gaps], dim=1)  # q is zero: the scores are the bias
    q, out = torch.zeros(rows, inner, dtype=dtype), torch.full((rows, inner), torch.nan, dtype=dtype)
    if dtype == torch.float32:
        _decoder_kernels.attend(q.numpy(), history[0].numpy(), history[1].numpy(), ancestors.numpy(),
                                bias.numpy(), out.numpy(), 2)
    else:
        as_bits = (lambda x: x.view(torch.int16).numpy())
        history = history.to(dtype)
        _decoder_kernels.attend_bf16(as_bits(q), as_bits(history[0]), as_bits(history[1]), ancestors.numpy(),
                                     bias.numpy(), as_bits(out), 2)
    per_head = out.float().view(rows, heads, D_KV)
    kept = torch.exp(-gaps.double()) * 1e30  # the weight x the value (the total is 1 to fp32 rounding)
    for head in (0, 1):  # exp(-80), exp(-87): normal, kept
        torch.testing.assert_close(per_head[:, head].double(), kept[head].expand(rows, D_KV), rtol=1e-2, atol=0)
    assert torch.all(per_head[:, 2:] == 0)  # exp(-87.5), exp(-90), exp(-120): subnormal or zero, dropped


def test_unreadable_inputs_are_refused():
    q, history, ancestors, bias = problem(10, 2, seed=1)
    out = torch.empty(10, HEADS * D_KV)
    keys, values = history[0].numpy(), history[1].numpy()

    def attend(**changed):
        args = dict(q=q.numpy(), keys=keys, values=values, ancestors=ancestors.numpy(), bias=bias.numpy(),
                    out=out.numpy(), threads=2)
        _decoder_kernels.attend(**{**args, **changed})

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


def torch_top_allowed(log_probs, scores, allowed, beams: int, keep: int):
    """What beam search does without the kernel: add, mask, topk."""
    total = (scores.view(-1, 1) + log_probs).masked_fill(~allowed, -torch.inf)
    return total.view(len(log_probs) // beams, -1).topk(keep, dim=1)


def top_allowed(log_probs, scores, allowed, beams: int, keep: int, threads: int = 2):
    """Beam search's call of the kernel, on ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _top_allowed(_decoder_kernels, scores, log_probs, allowed, beams, keep)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("density,threads,columns", [(1.0, 2, None), (0.3, 1, None), (0.002, 2, None),
                                                     (0.3, 2, slice(7, 47))])
def test_top_allowed_equals_add_mask_topk(density, threads, columns):
    """``columns``: the log-probabilities are those columns of a wider tensor (full-vocabulary
    decoding's level slice), rows read where they lie."""
    g = torch.Generator().manual_seed(int(density * 1000) + threads)
    beams, width, queries, keep = 6, 40, 5, 8
    log_probs = torch.randn(queries * beams, width if columns is None else 60, generator=g).log_softmax(-1)
    if columns is not None:
        log_probs = log_probs[:, columns]
        assert not log_probs.is_contiguous()
    scores = torch.randn(queries * beams, generator=g)
    allowed = torch.rand(queries * beams, width, generator=g) < density
    allowed[3] = False  # a beam with nothing allowed
    got_scores, got_flat = top_allowed(log_probs, scores, allowed, beams, keep, threads)
    want_scores, want_flat = torch_top_allowed(log_probs, scores, allowed, beams, keep)
    assert torch.equal(got_scores, want_scores)  # the same float additions, ranked the same
    finite = torch.isfinite(want_scores)
    assert torch.equal(got_flat[finite], want_flat[finite])
    if density < 0.01:
        assert not finite.all()  # some queries have fewer than `keep` allowed codes: padded with -inf
        assert (got_flat[~finite] == 0).all()


def test_top_allowed_refuses_log_probs_whose_columns_lie_apart():
    log_probs, allowed = torch.zeros(4, 6), torch.ones(4, 6, dtype=torch.bool)
    out_scores, out_flat = torch.empty(2, 3), torch.empty(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="contiguous rows"):
        _decoder_kernels.top_allowed(log_probs.t().contiguous().t().numpy(), torch.zeros(4).numpy(), allowed.numpy(), 2,
                                     out_scores.numpy(), out_flat.numpy(), 1)


def test_top_allowed_breaks_ties_by_index_and_ranks_nan_first():
    log_probs = torch.zeros(2, 4)  # one query, two beams, all equal
    allowed = torch.ones(2, 4, dtype=torch.bool)
    _, flat = top_allowed(log_probs, torch.zeros(2), allowed, beams=2, keep=3)
    assert flat.tolist() == [[0, 1, 2]]
    log_probs[1, 2] = torch.nan  # NaN must surface at the top, where beam search's check finds it
    scores, flat = top_allowed(log_probs, torch.zeros(2), allowed, beams=2, keep=3)
    assert torch.isnan(scores[0, 0]) and flat[0, 0] == 6


def test_add_rms_norm_updates_the_stream_and_equals_t5s_norm():
    g = torch.Generator().manual_seed(3)
    x, delta, weight = torch.randn(70, 40, generator=g), torch.randn(70, 40, generator=g), torch.randn(40, generator=g)
    stream, out = x.clone(), torch.empty(70, 40)
    _decoder_kernels.add_rms_norm(stream.numpy(), delta.numpy(), weight.numpy(), 1e-6, out.numpy(), 2)
    updated = x + delta
    assert torch.equal(stream, updated)  # the residual update, in place
    t5_norm = weight * (updated * torch.rsqrt(updated.pow(2).mean(-1, keepdim=True) + 1e-6))  # T5LayerNorm
    torch.testing.assert_close(out, t5_norm, atol=1e-6, rtol=1e-5)
    _decoder_kernels.add_rms_norm(stream.numpy(), None, weight.numpy(), 1e-6, out.numpy(), 1)  # no update
    assert torch.equal(stream, updated)
    torch.testing.assert_close(out, t5_norm, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="delta must be contiguous"):
        _decoder_kernels.add_rms_norm(stream.numpy(), delta[:, :20].numpy(), weight.numpy(), 1e-6, out.numpy(), 1)


def bits(tensor: torch.Tensor):
    return tensor.view(torch.int16).numpy()


def test_add_rms_norm_in_bf16_is_the_fp32_norm_of_the_widened_update_rounded():
    """A bf16 decoder's norm: the bf16 update widened exactly into the fp32 stream, the fp32 norm
    rounded to bf16 to nearest even (torch's ``.to``); the last layer's norm takes a bf16 update
    and gives fp32 (the head's input). Each pair of types is its own compiled loop, whose sum of
    squares the compiler may contract differently (FMA): the fp32 norms agree to an ulp or two."""
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(70, 40, generator=g) * 3, torch.randn(40, generator=g)
    delta = torch.randn(70, 40, generator=g).bfloat16()
    delta[0, :3] = torch.tensor([-0.0, 1e-40, -3e3])  # a negative zero, a subnormal and a large value widen exactly
    fp32_stream, fp32_out = x.clone(), torch.empty(70, 40)
    _decoder_kernels.add_rms_norm(fp32_stream.numpy(), delta.float().numpy(), weight.numpy(), 1e-6, fp32_out.numpy(), 1)
    assert torch.equal(fp32_stream, x + delta.float())

    def assert_rounded(out: torch.Tensor, exact: torch.Tensor) -> None:
        """``out`` (bf16) is ``exact`` rounded to nearest: within half a bf16 step (2^-8 relative;
        truncation errs by up to a whole step), and equal to torch's rounding nearly everywhere
        (the rest are values an fp32 ulp from a tie)."""
        assert out.dtype == torch.bfloat16
        assert ((out.float() - exact).abs() <= exact.abs() * 2.0**-8 * (1 + 2.0**-12) + 1e-30).all()
        assert (out == exact.bfloat16()).float().mean() > 0.99

    for rounded in (True, False):
        stream = x.clone()
        out = torch.empty(70, 40, dtype=torch.bfloat16 if rounded else torch.float32)
        _decoder_kernels.add_rms_norm(stream.numpy(), bits(delta), weight.numpy(), 1e-6,
                                      bits(out) if rounded else out.numpy(), 2)
        assert torch.equal(stream, fp32_stream)
        if rounded:
            assert_rounded(out, fp32_out)
        else:
            torch.testing.assert_close(out, fp32_out, atol=1e-6, rtol=3e-7)
    stream, out = x.clone(), torch.empty(70, 40, dtype=torch.bfloat16)  # no update: the first norm of a step
    _decoder_kernels.add_rms_norm(stream.numpy(), None, weight.numpy(), 1e-6, bits(out), 2)
    _decoder_kernels.add_rms_norm(x.clone().numpy(), None, weight.numpy(), 1e-6, fp32_out.numpy(), 2)
    assert torch.equal(stream, x)
    assert_rounded(out, fp32_out)
    with pytest.raises(ValueError, match="float32 delta with a bf16 out"):
        _decoder_kernels.add_rms_norm(x.numpy(), delta.float().numpy(), weight.numpy(), 1e-6, bits(out), 1)
    with pytest.raises(ValueError, match="out must be a float32 array"):
        _decoder_kernels.add_rms_norm(x.numpy(), None, weight.numpy(), 1e-6, torch.empty(70, 40).double().numpy(), 1)
    with pytest.raises(ValueError, match="delta must be a float32 array"):
        _decoder_kernels.add_rms_norm(x.numpy(), delta.double().numpy(), weight.numpy(), 1e-6, fp32_out.numpy(), 1)


def quantized_reference(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: scale max |x| / levels, values x / scale rounded to nearest even."""
    scales = x.abs().amax(1) / levels
    return torch.round(x / scales[:, None]).clamp(-levels, levels).to(torch.int8), scales


@pytest.mark.parametrize("levels", [127, 63])
def test_quantize_rows_is_symmetric_per_row_and_marks_rows_it_cannot_scale(levels):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 3, 40, generator=g)[:, 1] * torch.logspace(-3, 3, 70)[:, None]  # rows lie apart
    x[3, 7] = -x[3].abs().max() * 2  # the largest value negative: it becomes -levels
    x[4] = 0.0  # a step of 1/16 exactly: halves of it are ties
    x[4, :6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, levels]) / 16
    x[5], x[6, 2], x[7, 9] = 0.0, float("inf"), float("nan")
    values, scales = torch.empty(70, 40, dtype=torch.int8), torch.empty(70)
    _decoder_kernels.quantize(x.numpy(), values.numpy(), scales.numpy(), levels, 2)
    expected, expected_scales = quantized_reference(x, levels)
    fine = [r for r in range(70) if r not in (5, 6, 7)]
    assert torch.equal(values[fine], expected[fine]) and torch.equal(scales[fine], expected_scales[fine])
    assert values[3, 7] == -levels and values.abs().max() == levels
    assert values[4, :8].tolist() == [0, 2, 2, 0, -2, levels, 0, 0]  # ties to even
    assert scales[5] == 0 and not values[5].any()  # zeros: scale 0, its product's outputs 0
    assert scales[6:8].isnan().all() and not values[6:8].any()  # inf or NaN: scale NaN, so the outputs are NaN
    with pytest.raises(ValueError, match="levels must be in 1..127"):
        _decoder_kernels.quantize(x.numpy(), values.numpy(), scales.numpy(), 128, 1)
    with pytest.raises(ValueError, match="out_scales must be contiguous float32 \\[70\\]"):
        _decoder_kernels.quantize(x.numpy(), values.numpy(), scales[:60].numpy(), 127, 1)


def test_scale_sums_scales_back_into_rows_apart_or_relus_and_quantizes_again():
    """An int8 product's sums times the row's and the column's scale: q, k and v of one product
    into three buffers (rows apart in both); or ReLU'd and quantized per row, the feed-forward's
    hidden state on its way into the next product."""
    g = torch.Generator().manual_seed(6)
    sums = torch.randint(-2**20, 2**20, (70, 3 * 32), dtype=torch.int32, generator=g)
    row_scales, column_scales = torch.rand(70, generator=g) * 1e-3, torch.rand(96, generator=g) * 1e-2
    expected = sums.float() * row_scales[:, None] * column_scales
    history = torch.zeros(70, 2, 32)  # k and v interleaved per row: each side's rows lie apart
    for side in range(3):
        columns = slice(side * 32, (side + 1) * 32)
        out = history[:, side - 1] if side else torch.empty(70, 32)
        _decoder_kernels.scale_sums(sums[:, columns].numpy(), row_scales.numpy(), column_scales[columns].numpy(),
                                    False, out.numpy(), None, 127, 2)
        assert torch.equal(out, expected[:, columns])
    assert torch.equal(history.transpose(0, 1).reshape(2, 70, 32), expected[:, 32:].view(70, 2, 32).transpose(0, 1))
    values, scales = torch.empty(70, 96, dtype=torch.int8), torch.empty(70)
    _decoder_kernels.scale_sums(sums.numpy(), row_scales.numpy(), column_scales.numpy(), True, values.numpy(),
                                scales.numpy(), 127, 2)
    relu_values, relu_scales = quantized_reference(expected.relu(), 127)
    assert torch.equal(values, relu_values) and torch.equal(scales, relu_scales) and values.min() == 0
    with pytest.raises(ValueError, match="out_scales must be given exactly when out is int8"):
        _decoder_kernels.scale_sums(sums.numpy(), row_scales.numpy(), column_scales.numpy(), True, values.numpy(),
                                    None, 127, 1)
    with pytest.raises(ValueError, match="sums must be an int32 array"):
        _decoder_kernels.scale_sums(sums.long().numpy(), row_scales.numpy(), column_scales.numpy(), False,
                                    expected.numpy(), None, 127, 1)


def test_add_rms_norm_int8_adds_the_scaled_sums_and_quantizes_the_norm_per_row():
    """The int8 decoder's norm: the output product's sums scaled back into the fp32 stream, T5's
    norm, quantized per row for the next product (or fp32 for the head); as the fp32 kernel's
    norm of the same update, up to an fp32 ulp of the update (the compiler may fuse its multiply
    and add) and so a step of the rounding at a tie."""
    g = torch.Generator().manual_seed(7)
    x, weight = torch.randn(70, 40, generator=g) * 3, torch.randn(40, generator=g)
    sums = torch.randint(-2**16, 2**16, (70, 40), dtype=torch.int32, generator=g)
    row_scales, column_scales = torch.rand(70, generator=g) * 1e-3, torch.rand(40, generator=g) * 1e-2
    update = sums.float() * row_scales[:, None] * column_scales
    fp32_stream, fp32_out = x.clone(), torch.empty(70, 40)
    _decoder_kernels.add_rms_norm(fp32_stream.numpy(), update.numpy(), weight.numpy(), 1e-6, fp32_out.numpy(), 1)
    stream, values, scales = x.clone(), torch.empty(70, 40, dtype=torch.int8), torch.empty(70)
    _decoder_kernels.add_rms_norm_int8(stream.numpy(), sums.numpy(), row_scales.numpy(), column_scales.numpy(),
                                       weight.numpy(), 1e-6, values.numpy(), scales.numpy(), 127, 2)
    torch.testing.assert_close(stream, fp32_stream, atol=1e-6, rtol=1e-6)
    expected, expected_scales = quantized_reference(fp32_out, 127)
    torch.testing.assert_close(scales, expected_scales, atol=0, rtol=1e-5)
    assert (values.int() - expected.int()).abs().max() <= 1 and (values == expected).float().mean() > 0.99
    last_stream, last = x.clone(), torch.empty(70, 40)  # the last layer's: fp32 out, for the head
    _decoder_kernels.add_rms_norm_int8(last_stream.numpy(), sums.numpy(), row_scales.numpy(), column_scales.numpy(),
                                       weight.numpy(), 1e-6, last.numpy(), None, 127, 2)
    assert torch.equal(last_stream, stream)
    torch.testing.assert_close(last, fp32_out, atol=1e-5, rtol=1e-5)
    first, first_scales = torch.empty(70, 40, dtype=torch.int8), torch.empty(70)  # no update: a step's first norm
    _decoder_kernels.add_rms_norm_int8(x.clone().numpy(), None, None, None, weight.numpy(), 1e-6, first.numpy(),
                                       first_scales.numpy(), 63, 1)
    _decoder_kernels.add_rms_norm(x.clone().numpy(), None, weight.numpy(), 1e-6, fp32_out.numpy(), 1)
    assert first.abs().max() == 63
    torch.testing.assert_close(first_scales, fp32_out.abs().amax(1) / 63, atol=0, rtol=1e-6)
    with pytest.raises(ValueError, match="out_scales must be given exactly when out is int8"):
        _decoder_kernels.add_rms_norm_int8(x.numpy(), None, None, None, weight.numpy(), 1e-6, first.numpy(), None,
                                           127, 1)
    with pytest.raises(ValueError, match="sums must be an int32 array or None"):
        _decoder_kernels.add_rms_norm_int8(x.numpy(), update.numpy(), row_scales.numpy(), column_scales.numpy(),
                                           weight.numpy(), 1e-6, last.numpy(), None, 127, 1)
