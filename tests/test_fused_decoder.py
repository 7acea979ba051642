"""The fused decoder step computes transformers' T5 decoder: step by step, with beams reordered."""
from __future__ import annotations

import sys

import pytest
import torch

from genius.common import cpu
from genius.common.cpu import cpu_flags, cpu_vendor, fp32_products_in_onednn, multiplies_in_fp32, onednn_fp32_on
from genius.models.generative_retriever import fused_decoder
from genius.models.generative_retriever.fused_decoder import (
    ABSORBED_MIN_BEAMS,
    FusedDecoder,
    Workspace,
    bf16_gemm_fp32_out,
    bf16_head_on,
    Int8Weight,
    flush_subnormal_,
    int8_levels,
)
from genius.models.generative_retriever.generator import IDGenerator, make_arch
from genius.models.generative_retriever.vocab import PAD


def generator_of(seed: int, feed_forward_proj: str, layers: int = 2, num_prefix: int = 3) -> IDGenerator:
    torch.manual_seed(seed)
    arch = make_arch(12, [3, 9, 9, 9], num_prefix=num_prefix, d_model=32, num_heads=4, d_kv=8, d_ff=48,
                     num_decoder_layers=layers, feed_forward_proj=feed_forward_proj)
    generator = IDGenerator(arch).eval()
    with torch.no_grad():  # T5's random init is nearly flat; larger embeddings exercise the norms
        generator.t5.shared.weight.mul_(4.0)
    return generator


def decoder_states(generator: IDGenerator, encoder_hidden: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """transformers' decoder, no cache, on whole token sequences [R, T]: the last position's
    final-norm state [R, d_model]. ``encoder_hidden`` has one row per sequence."""
    with torch.no_grad():
        return generator.t5.decoder(input_ids=sequences, encoder_hidden_states=encoder_hidden).last_hidden_state[:, -1]


def surviving_beams(generator: IDGenerator, level: int, num_queries: int, rows_per_query: int, beams: int,
                    rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``parents`` and new ``tokens`` of the next step's rows, as a beam search makes them: beams
    survive in a shuffled order, some twice, and row r continues row parents[r] of its query."""
    choice = torch.randint(0, rows_per_query, (num_queries, beams), generator=rng)
    parents = (choice + torch.arange(num_queries)[:, None] * rows_per_query).view(-1)
    tokens = generator.offsets[level] + torch.randint(0, generator.codebook_sizes[level], (len(parents),), generator=rng)
    return parents, tokens


def steps_in_lockstep(generator: IDGenerator, decoders, z: torch.Tensor, seed: int, beams: int = 4):
    """Each decoder's step outputs, level by level, over one search's steps with the same
    reordered beams (:func:`surviving_beams`) for all: a list per level."""
    rng = torch.Generator().manual_seed(seed)
    levels, num_queries = len(generator.codebook_sizes), len(z)
    with torch.no_grad():
        encoder_hidden = generator.encode(z)
        states = [decoder.start(encoder_hidden, num_queries * beams, levels) for decoder in decoders]
        tokens, parents, rows_per_query = torch.full((num_queries,), PAD), None, 1
        for level in range(levels):
            yield [decoder.step(state, tokens, parents) for decoder, state in zip(decoders, states)]
            parents, tokens = surviving_beams(generator, level, num_queries, rows_per_query, beams, rng)
            rows_per_query = beams


@pytest.mark.parametrize("num_prefix,absorbed", [(3, True), (8, False)])
@pytest.mark.parametrize("attention", ["kernel", "gathered"])
@pytest.mark.parametrize("feed_forward_proj,layers,beams", [("relu", 2, ABSORBED_MIN_BEAMS), ("gated-gelu", 3, 4),
                                                            ("relu", 1, 1)])
def test_each_step_equals_the_decoder_module_on_the_beams_token_paths(feed_forward_proj, layers, beams, attention,
                                                                      num_prefix, absorbed, monkeypatch):
    """Both self-attentions: the C++ one reading histories in place (a CPU's) and SDPA over the
    rows' gathered histories (a GPU's); both cross-attentions: absorbed into per-query products
    (fp32, T = 3 < d_kv = 8, at the steps with ABSORBED_MIN_BEAMS rows per query; the first
    step's one row per query runs the plain products) and over the keys and values (T = 8, no
    longer the smaller product, or too few beams)."""
    generator = generator_of(0, feed_forward_proj, layers, num_prefix)
    num_queries, generator_rng = 3, torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(num_queries, 12, generator=generator_rng), dim=-1)
    with torch.no_grad():
        encoder_hidden = generator.encode(z)
    decoder = FusedDecoder(generator)
    assert decoder.kernels is not None  # built with the package, and used on a CPU in fp32
    if attention == "gathered":
        decoder.kernels = None
    state = decoder.start(encoder_hidden, num_queries * beams, 4)
    absorbed = absorbed and beams >= ABSORBED_MIN_BEAMS
    assert (state.cross_absorbed is not None) == absorbed == decoder.absorbs_cross_attention(num_prefix, beams)
    absorbed_rows, absorbed_step = [], decoder._absorbed_cross_attention
    monkeypatch.setattr(decoder, "_absorbed_cross_attention",
                        lambda stream, *rest: absorbed_rows.append(len(stream)) or absorbed_step(stream, *rest))
    paths = torch.full((num_queries, 1), PAD)  # each row's tokens so far
    tokens, parents, rows_per_query = paths[:, 0], None, 1
    for level in range(4):
        absorbed_rows.clear()
        with torch.no_grad():
            fused = decoder.step(state, tokens, parents)
        assert absorbed_rows == ([num_queries * beams] * layers if absorbed and level else [])
        expected = decoder_states(generator, encoder_hidden.repeat_interleave(rows_per_query, 0), paths)
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
        parents, tokens = surviving_beams(generator, level, num_queries, rows_per_query, beams, generator_rng)
        paths = torch.cat([paths[parents], tokens[:, None]], dim=1)
        rows_per_query = beams


@pytest.mark.parametrize("num_prefix", [3, 8])  # absorbed cross-attention, then over the keys and values
def test_peaked_attention_flushes_subnormal_probabilities_and_still_equals_the_decoder_module(num_prefix):
    """Trained attention can be peaked enough that some probabilities are subnormal (under
    1.2e-38), which the CPU multiplies through a slow assist: q scaled 30x gives such scores. The
    cross-attention's probabilities are flushed to zero, and the states still equal
    transformers' decoder (which keeps them) to 1e-5."""
    generator = generator_of(0, "relu", 2, num_prefix)
    with torch.no_grad():
        for block in generator.t5.decoder.block:
            block.layer[0].SelfAttention.q.weight.mul_(30.0)
            block.layer[1].EncDecAttention.q.weight.mul_(30.0)
    num_queries, beams, rng = 3, ABSORBED_MIN_BEAMS, torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(num_queries, 12, generator=rng), dim=-1)
    with torch.no_grad():
        encoder_hidden = generator.encode(z)
    decoder = FusedDecoder(generator)
    state = decoder.start(encoder_hidden, num_queries * beams, 4)
    paths = torch.full((num_queries, 1), PAD)
    tokens, parents, rows_per_query, subnormal_before_flush = paths[:, 0], None, 1, 0
    cpu, tiny = torch.device("cpu"), torch.finfo(torch.float32).tiny
    for level in range(4):
        with torch.no_grad():
            fused = decoder.step(state, tokens, parents)
        expected = decoder_states(generator, encoder_hidden.repeat_interleave(rows_per_query, 0), paths)
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
        size = len(tokens) * decoder.heads * num_prefix  # the last layer's scores and probabilities
        scores, probs = (state.workspace.buffers[(name, torch.float32, cpu)][:size].view(-1, num_prefix)
                         for name in ("cross_scores", "cross_probs"))
        unflushed = torch.softmax(scores, -1)
        subnormal_before_flush += int(((unflushed > 0) & (unflushed < tiny)).sum())
        assert not torch.any((probs > 0) & (probs < tiny))
        torch.testing.assert_close(probs, unflushed, atol=tiny, rtol=0)
        parents, tokens = surviving_beams(generator, level, num_queries, rows_per_query, beams, rng)
        paths = torch.cat([paths[parents], tokens[:, None]], dim=1)
        rows_per_query = beams
    assert subnormal_before_flush > 0  # the case arose


def test_flush_subnormal_zeroes_subnormals_alone_and_keeps_nan():
    tiny = torch.finfo(torch.float32).tiny
    probs = torch.tensor([0.0, tiny / 2, tiny * (1 - 2 ** -23), tiny, 1e-30, 0.5, 1.0, float("nan")])
    out = flush_subnormal_(probs)
    assert out.data_ptr() == probs.data_ptr()  # in place
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, tiny, 1e-30, 0.5, 1.0, float("nan")]), rtol=0, atol=0,
                               equal_nan=True)


def test_steps_run_on_inputs_that_carry_gradients():
    """A caller outside no_grad (the encoder output then needs a gradient) gets the same states:
    decoding runs in inference mode, so the C++ kernels can read every tensor."""
    generator = generator_of(1, "relu")
    z = torch.nn.functional.normalize(torch.randn(2, 12, generator=torch.Generator().manual_seed(2)), dim=-1)
    encoder_hidden = generator.encode(z)
    assert encoder_hidden.requires_grad
    decoder = FusedDecoder(generator)
    hidden = decoder.step(decoder.start(encoder_hidden, 2, 1), torch.full((2,), PAD), None)
    with torch.no_grad():
        expected = decoder_states(generator, encoder_hidden, torch.full((2, 1), PAD))
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)


def test_bf16_weights_stay_close_and_the_residual_stream_stays_fp32():
    generator = generator_of(2, "relu")
    z = torch.nn.functional.normalize(torch.randn(2, 12, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        encoder_hidden = generator.encode(z)
        exact = FusedDecoder(generator).step(FusedDecoder(generator).start(encoder_hidden, 2, 1), torch.full((2,), PAD), None)
        low = FusedDecoder(generator, torch.bfloat16)
        hidden = low.step(low.start(encoder_hidden, 2, 1), torch.full((2,), PAD), None)
    assert hidden.dtype == torch.float32 and low.layers[0]["qkv"].dtype == torch.bfloat16
    assert not low.absorbs_cross_attention(3, 50)  # bf16 products would round the absorbed scores
    assert not torch.equal(hidden, exact)  # the GEMMs did run in bf16 ...
    torch.testing.assert_close(hidden, exact, atol=0.05, rtol=0.05)  # ... to bf16's precision


needs_mkl = pytest.mark.skipif(fused_decoder._mkl_bf16_gemm() is None,
                               reason="this torch carries no MKL (its x86 builds do)")


@needs_mkl
def test_bf16_gemm_sums_bf16_inputs_in_fp32_and_returns_fp32():
    """MKL's bf16 product equals the fp32 product of the same bf16 values (its sums are fp32), at
    odd shapes too; a logit near 48 keeps fp32's precision, where a bf16 output is 0.25 off."""
    rng = torch.Generator().manual_seed(21)
    for m, k, n in [(1, 7, 3), (37, 64, 130), (300, 512, 96)]:
        a, w = torch.randn(m, k, generator=rng).bfloat16(), torch.randn(n, k, generator=rng).bfloat16()
        out = torch.full((m, n), float("nan"))
        assert bf16_gemm_fp32_out(a, w, out) is out
        torch.testing.assert_close(out, a.float() @ w.float().t(), atol=1e-4, rtol=1e-5)
    # one logit of 48.1: sixteen terms of 3.0 and sixteen of 0.00625 (all exact in bf16)
    a = torch.tensor([[1.0] * 32], dtype=torch.bfloat16)
    w = torch.tensor([[3.0] * 16 + [0.00625] * 16], dtype=torch.bfloat16)
    exact = (a.double() @ w.double().t()).item()
    assert abs(bf16_gemm_fp32_out(a, w, torch.empty(1, 1)).item() - exact) < 1e-5
    assert abs((a @ w.t()).float().item() - exact) > 0.05  # torch's bf16 product rounds its output
    assert torch.equal(bf16_gemm_fp32_out(a[:, :0], w[:, :0], torch.ones(1, 1)), torch.zeros(1, 1))
    assert bf16_gemm_fp32_out(a[:0], w, torch.empty(0, 1)).shape == (0, 1)


@needs_mkl
@pytest.mark.parametrize("bad", ["fp32 input", "transposed weight", "output shape", "bf16 output", "not on the CPU"])
def test_bf16_gemm_refuses_what_it_cannot_read(bad):
    a, w, out = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(6, 8, dtype=torch.bfloat16), torch.zeros(4, 6)
    if bad == "not on the CPU":  # MKL would read a device pointer as host memory
        out = torch.zeros(4, 6, device="meta")
    elif bad == "fp32 input":
        a = a.float()
    elif bad == "transposed weight":
        w = torch.zeros(8, 6, dtype=torch.bfloat16).t()
    elif bad == "output shape":
        out = torch.zeros(6, 4)
    else:
        out = out.bfloat16()
    with pytest.raises(ValueError, match="bf16_gemm_fp32_out"):
        bf16_gemm_fp32_out(a, w, out)


@needs_mkl
@pytest.mark.parametrize("level_head", [True, False])
def test_bf16_decoder_head_sums_the_rounded_state_in_fp32(level_head):
    """A bf16 decoder with MKL scores the level from its bf16-rounded (scaled) state and bf16
    head rows, summed and normalised in fp32: not the fp32 head's numbers, but within bf16 input
    rounding of them; with or without the search's workspace the same."""
    generator = generator_of(12, "relu")
    z = torch.nn.functional.normalize(torch.randn(3, 12, generator=torch.Generator().manual_seed(13)), dim=-1)
    with pytest.MonkeyPatch.context() as patch:  # the head MKL runs on Intel CPUs, tested on any
        patch.setattr(fused_decoder, "cpu_vendor", lambda: "GenuineIntel")
        decoder = FusedDecoder(generator, torch.bfloat16)
    assert decoder.bf16_head
    with torch.no_grad():
        search = decoder.start(generator.encode(z), 3, 2)
        hidden = decoder.step(search, torch.full((3,), PAD), None) * 3.0  # logits of a confident head
        in_workspace = decoder.level_log_probs(generator, hidden, 1, level_head, search).clone()
        alone = decoder.level_log_probs(generator, hidden, 1, level_head)
    scaled = hidden * generator.d_model**-0.5
    lo, hi = generator.offsets[1], generator.offsets[1] + generator.codebook_sizes[1]
    weight = generator.t5.lm_head.weight.detach()[lo:hi] if level_head else generator.t5.lm_head.weight.detach()

    def log_probs(logits):
        return logits.log_softmax(-1) if level_head else logits.log_softmax(-1)[:, lo:hi]

    rounded = log_probs(scaled.bfloat16().float() @ weight.bfloat16().float().t())
    fp32 = log_probs(scaled @ weight.t())
    torch.testing.assert_close(in_workspace, rounded, atol=1e-5, rtol=1e-5)
    assert torch.equal(alone, in_workspace)
    assert not torch.allclose(in_workspace, fp32, atol=1e-5, rtol=1e-5)  # the inputs were rounded ...
    torch.testing.assert_close(in_workspace, fp32, atol=0.05, rtol=0.01)  # ... to bf16's precision


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_bf16_relu_in_the_product_is_the_product_then_relu_bit_for_bit(feed_forward_proj):
    """On a CPU a bf16 decoder's ReLU runs inside the feed-forward's product (oneDNN's post-op):
    its steps equal those of the product followed by ``relu_``, bit for bit, over several steps
    with reordered beams; a gated feed-forward keeps its own path."""
    generator = generator_of(14, feed_forward_proj, layers=2)
    z = torch.nn.functional.normalize(torch.randn(3, 12, generator=torch.Generator().manual_seed(15)), dim=-1)
    fused, separate = FusedDecoder(generator, torch.bfloat16), FusedDecoder(generator, torch.bfloat16)
    assert fused.relu_in_product and not FusedDecoder(generator).relu_in_product
    separate.relu_in_product = False
    for fused_step, separate_step in steps_in_lockstep(generator, (fused, separate), z, seed=16):
        assert torch.equal(fused_step, separate_step)


def test_bf16_decoder_head_is_fp32_where_torch_has_no_mkl_or_the_cpu_is_not_intels(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_decoder, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(fused_decoder, "_mkl_bf16_gemm", lambda: None)
    generator = generator_of(12, "relu")
    assert not FusedDecoder(generator, torch.bfloat16).bf16_head
    monkeypatch.setattr(fused_decoder, "_mkl_bf16_gemm", lambda: "MKL's bf16 GEMM")
    assert FusedDecoder(generator, torch.bfloat16).bf16_head and not FusedDecoder(generator).bf16_head
    assert not fused_decoder.bf16_head_on(torch.device("cuda"))  # a GPU's head is fp32 (the head's F.linear)
    for vendor in ("AuthenticAMD", None):  # MKL's bf16 GEMM on an AMD CPU is slower than the fp32 head
        monkeypatch.setattr(fused_decoder, "cpu_vendor", lambda: vendor)
        assert not FusedDecoder(generator, torch.bfloat16).bf16_head
    amd, intel = tmp_path / "amd", tmp_path / "intel"  # two files: the answer is cached per file
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nflags\t\t: fpu avx512_bf16\n")
    intel.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu amx_bf16\n")
    assert cpu_vendor(amd) == "AuthenticAMD" and cpu_vendor(intel) == "GenuineIntel"
    assert cpu_vendor(tmp_path / "absent") is None
    assert cpu_flags(amd) == {"fpu", "avx512_bf16"}



def test_the_fp32_probe_tells_fp32_products_from_products_that_round_their_inputs_to_bf16():
    assert multiplies_in_fp32(torch.mm)
    assert not multiplies_in_fp32(lambda a, b: a.bfloat16().float() @ b)  # the fine entries rounded
    assert not multiplies_in_fp32(lambda a, b: a @ b.bfloat16().float())  # the same, with the roles swapped
    assert not multiplies_in_fp32(lambda a, b: (a @ b).bfloat16().float())  # an output rounded to bf16


def test_fp32_products_run_in_onednn_only_on_amd_cpus_with_avx512_and_the_switch_is_counted(monkeypatch):
    precision = torch.backends.mkldnn.matmul
    before = precision.fp32_precision
    gate = onednn_fp32_on.__wrapped__
    for vendor, flags in (("GenuineIntel", {"avx512f"}), ("AuthenticAMD", {"avx2"}), (None, {"avx512f"}),
                          ("AuthenticAMD", {"avx512f", "amx_bf16"})):
        monkeypatch.setattr(cpu, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
        assert not gate()
    monkeypatch.setattr(cpu, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert gate()  # torch's oneDNN multiplies fp32 unrounded without AMX (the probe ran under the switch)
    assert precision.fp32_precision == before
    monkeypatch.setattr(cpu, "multiplies_in_fp32", lambda product: False)
    assert not gate()  # a oneDNN that rounds under the switch is not used
    monkeypatch.setattr(cpu, "onednn_fp32_on", lambda: True)
    with fp32_products_in_onednn(torch.device("cpu")):
        assert precision.fp32_precision == "bf16"
        with fp32_products_in_onednn(torch.device("cpu")):  # a second search in another thread, say
            assert precision.fp32_precision == "bf16"
        assert precision.fp32_precision == "bf16"  # still one user inside
        with pytest.raises(RuntimeError):
            with fp32_products_in_onednn(torch.device("cpu")):
                raise RuntimeError("a search that fails")
        assert precision.fp32_precision == "bf16"
    assert precision.fp32_precision == before
    with fp32_products_in_onednn(torch.device("cuda")):  # another device: nothing changes
        assert precision.fp32_precision == before
    monkeypatch.setattr(cpu, "onednn_fp32_on", lambda: False)
    with fp32_products_in_onednn(torch.device("cpu")):
        assert precision.fp32_precision == before


@pytest.mark.skipif(not onednn_fp32_on(), reason="fp32 products go to oneDNN on AMD CPUs with AVX-512 only")
def test_fp32_products_in_onednn_stay_fp32_at_the_decoders_shapes():
    """Where the switch is on (this CPU), the products a search makes under it (mm into a buffer,
    addmm_ into the residual stream, baddbmm_) are fp32's: unrounded inputs, float rounding."""
    rng = torch.Generator().manual_seed(3)
    x, w = torch.randn(3200, 512, generator=rng), torch.randn(2048, 512, generator=rng)
    stream, scores = torch.randn(3200, 2048, generator=rng), torch.randn(64, 50, 9, generator=rng)
    q, k = torch.randn(64, 50, 32, generator=rng), torch.randn(64, 32, 9, generator=rng)
    with fp32_products_in_onednn(torch.device("cpu")):
        assert multiplies_in_fp32(torch.mm)
        product, added, batched = torch.empty(3200, 2048), stream.clone(), scores.clone()
        torch.mm(x, w.t(), out=product)
        added.addmm_(x, w.t())
        batched.baddbmm_(q, k)
    exact = x.double() @ w.double().t()  # sums of about 22 in size: fp32 is off by 1e-4, bf16 inputs by up to 0.3
    torch.testing.assert_close(product.double(), exact, rtol=0, atol=1e-3)
    torch.testing.assert_close(added.double(), stream.double() + exact, rtol=0, atol=1e-3)
    torch.testing.assert_close(batched.double(), scores.double() + q.double() @ k.double(), rtol=0, atol=1e-5)

def test_bf16_decoder_steps_agree_between_the_kernel_and_sdpa():
    """The bf16 decoder on a CPU runs the kernel; over several steps with reordered beams it stays
    within bf16 rounding of SDPA over the gathered rows (the GPU's path) on the same weights."""
    generator = generator_of(4, "relu", layers=2)
    z = torch.nn.functional.normalize(torch.randn(3, 12, generator=torch.Generator().manual_seed(5)), dim=-1)
    kernel, gathered = FusedDecoder(generator, torch.bfloat16), FusedDecoder(generator, torch.bfloat16)
    assert kernel.kernels is not None
    gathered.kernels = None
    for kernel_step, gathered_step in steps_in_lockstep(generator, (kernel, gathered), z, seed=6):
        torch.testing.assert_close(kernel_step, gathered_step, atol=0.03, rtol=0.03)


def test_searches_reuse_a_workspace_and_two_live_searches_never_share_one():
    """A dropped search's workspace serves the next search (its buffers reused, not reallocated),
    while the step's output the caller holds stays intact; two searches alive at once, stepped in
    turn on two different generators, each get their own buffers and equal transformers' decoder."""
    generators = [generator_of(seed, "relu", layers=2) for seed in (7, 8)]
    rng = torch.Generator().manual_seed(9)
    z = torch.nn.functional.normalize(torch.randn(2, 12, generator=rng), dim=-1)
    with torch.no_grad():
        encoder_hidden = [generator.encode(z) for generator in generators]
    decoders = [FusedDecoder(generator) for generator in generators]
    first = decoders[0].start(encoder_hidden[0], 2 * 3, 3)
    held = decoders[0].step(first, torch.full((2,), PAD), None)
    kept, workspace = held.clone(), first.workspace
    buffers = {key: tensor.data_ptr() for key, tensor in workspace.buffers.items()}
    step_buffers = {"history", "q", "hidden", "normed", "cross_kv", "cross_keys_t", "cross_values"}
    assert step_buffers <= {name for name, _, _ in buffers}
    del first  # the search ends: its workspace goes back to the pool

    states = [decoder.start(hidden, 2 * 3, 3) for decoder, hidden in zip(decoders, encoder_hidden)]
    assert states[0].workspace is workspace and states[1].workspace is not workspace
    paths = torch.full((2, 1), PAD)
    tokens, parents, rows_per_query = paths[:, 0], None, 1
    for level in range(3):
        outputs = [decoder.step(state, tokens, parents) for decoder, state in zip(decoders, states)]
        for generator, hidden, output in zip(generators, encoder_hidden, outputs):
            expected = decoder_states(generator, hidden.repeat_interleave(rows_per_query, 0), paths)
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
        parents, tokens = surviving_beams(generators[0], level, 2, rows_per_query, 3, rng)
        paths = torch.cat([paths[parents], tokens[:, None]], dim=1)
        rows_per_query = 3
    assert {key: tensor.data_ptr() for key, tensor in workspace.buffers.items() if key in buffers} == buffers
    assert torch.equal(held, kept)


def test_a_workspace_keeps_one_buffer_per_name_and_dtype_and_grows_only_when_asked_for_more():
    workspace, cpu = Workspace(), torch.device("cpu")
    first = workspace.tensor("x", (4, 4), torch.float32, cpu).data_ptr()
    assert workspace.tensor("x", (4, 4), torch.bfloat16, cpu).data_ptr() != first  # a bf16 search's own
    assert workspace.tensor("x", (2, 8), torch.float32, cpu).data_ptr() == first  # the fp32 one kept
    assert workspace.tensor("x", (5, 5), torch.float32, cpu).data_ptr() != first  # 25 > 16 values: grown
    workspace.max_rows = 10
    rows = workspace.rows("y", 2, 3, torch.float32, cpu)
    assert rows.shape == (2, 3) and workspace.buffers["y", torch.float32, cpu].numel() == 30  # for 10 rows


def test_only_cpu_workspaces_are_pooled():
    """A workspace holding GPU memory (here the meta device stands for it) is freed when its
    search ends, not kept idle in the pool; a CPU one is kept and taken first."""
    on_cpu, on_device = Workspace(), Workspace()
    on_cpu.tensor("x", (2, 3), torch.float32, torch.device("cpu"))
    on_device.tensor("x", (2, 3), torch.float32, torch.device("meta"))
    Workspace.give_back(on_cpu)
    Workspace.give_back(on_device)
    assert on_device not in Workspace._pool and Workspace.take(4) is on_cpu


def test_int8_levels_are_the_widest_the_cpus_product_multiplies_exactly():
    """127 levels on CPUs with VNNI or AMX; 63 where oneDNN's int8 kernels add pairs of products
    into saturating int16s (a row of 127s times a column of 127s came out 261,120). oneDNN is
    capped at AVX2 in a subprocess to stand for such a CPU on any x86 machine; a product at the
    levels found is exact at the extremes."""
    flags = cpu_flags() or frozenset()
    levels = int8_levels()
    assert levels == (127 if {"avx512_vnni", "avx_vnni", "amx_int8"} & flags else 63)
    a, b = torch.full((8, 512), levels, dtype=torch.int8), torch.full((512, 8), -levels, dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b), torch.full((8, 8), -levels * levels * 512, dtype=torch.int32))
    if "avx2" in flags:
        import os
        import subprocess

        capped = subprocess.run([sys.executable, "-c", "from genius.models.generative_retriever.fused_decoder "
                                 "import int8_levels; print(int8_levels())"], capture_output=True, text=True,
                                env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, check=True)
        assert capped.stdout.split() == ["63"]


def test_int8_weights_are_symmetric_per_output_row():
    weight = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    quantized = Int8Weight.of(weight, 127)
    assert quantized.values.shape == (3, 3) and quantized.values.is_contiguous()  # [in, out]: the right operand
    torch.testing.assert_close(quantized.scales, torch.tensor([1 / 127, 0.0, 3 / 127]))
    assert quantized.values.t().tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -32]]  # 63.5 and -31.75 to even
    torch.testing.assert_close(quantized.values.t().float() * quantized.scales[:, None], weight, atol=0.012, rtol=0)
    assert Int8Weight.of(weight, 63).values.abs().max() == 63


def test_int8_products_stay_close_on_all_positive_inputs():
    """Inputs and weights at their largest codes are where kernels without VNNI saturate; at the
    levels :func:`int8_levels` picks, the decoder's int8 product stays at int8's rounding."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.rand(64, 256, generator=gen) * 0.1 + 0.9, torch.rand(32, 256, generator=gen) * 0.1 + 0.9
    decoder = FusedDecoder(generator_of(0, "relu"), int8=True)
    product = decoder._linear(x, Int8Weight.of(weight, decoder.levels), Workspace(), "unused")
    scaled = product.values.double() * product.row_scales.double()[:, None] * product.column_scales.double()
    exact = x.double() @ weight.double().t()
    assert float((scaled - exact).norm() / exact.norm()) < 0.01


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_int8_step_quantizes_the_step_products_and_stays_close_to_fp32(feed_forward):
    """int8: the six per-step products run on int8 weights (kv_cross, used once per query, stays
    fp32), the output is fp32 and within int8's error of the fp32 step, step by step, with ReLU
    (scaled back, ReLU'd and quantized in one pass) and a gated feed-forward; so are the output
    head's log-probabilities, with the search's workspace and without."""
    generator = generator_of(4, feed_forward, layers=3)
    z = torch.nn.functional.normalize(torch.randn(2, 12, generator=torch.Generator().manual_seed(5)), dim=-1)
    exact, int8 = FusedDecoder(generator), FusedDecoder(generator, int8=True)
    layer = int8.layers[0]
    assert all(isinstance(layer[k], Int8Weight) for k in ("qkv", "o_self", "q_cross", "o_cross", "wi", "wo"))
    assert layer["kv_cross"].dtype == torch.float32
    with torch.no_grad():
        encoder_hidden = generator.encode(z)
        states = [decoder.start(encoder_hidden, 6, 3) for decoder in (exact, int8)]
        tokens, parents = torch.full((2,), PAD), None
        for level in range(3):
            expected, hidden = (d.step(s, tokens, parents) for d, s in zip((exact, int8), states))
            assert hidden.dtype == torch.float32 and not torch.equal(hidden, expected)
            assert float((hidden - expected).norm() / expected.norm()) < 0.05
            # The head: fp32 is the generator's own; int8's product is int8, its log-softmax fp32,
            # over the level's rows or the whole vocabulary.
            for level_head in (True, False):
                reference = generator.level_log_probs(hidden, level, level_head)
                assert torch.equal(exact.level_log_probs(generator, hidden, level, level_head), reference)
                quantized = int8.level_log_probs(generator, hidden, level, level_head)
                assert quantized.dtype == torch.float32 and quantized.shape == reference.shape
                assert not torch.equal(quantized, reference)
                torch.testing.assert_close(quantized, reference, atol=0.1, rtol=0.05)
                in_workspace = int8.level_log_probs(generator, hidden, level, level_head, states[1])
                assert torch.equal(in_workspace, quantized)
            parents = torch.tensor([0, 0, 0, 1, 1, 1]) if level == 0 else torch.tensor([2, 0, 1, 5, 3, 3])
            tokens = generator.offsets[level] + torch.tensor([0, 1, 2, 0, 1, 2])
    levels = {(generator.offsets[level], generator.offsets[level] + generator.codebook_sizes[level])
              for level in range(3)}
    assert set(int8.head_packed) == levels | {(None, None)}  # packed once per level used, and whole once


def test_int8_is_refused_where_it_cannot_run(monkeypatch):
    from genius.models.generative_retriever.fused_decoder import int8_decoding_problem

    assert int8_decoding_problem(torch.device("cpu")) is None  # the CI machines are x86 with the kernels built
    assert "CPU only" in int8_decoding_problem(torch.device("cuda"))
    assert "exclude each other" in int8_decoding_problem(torch.device("cpu"), torch.bfloat16)
    with monkeypatch.context() as patch:
        patch.setattr(fused_decoder, "int8_levels", lambda: None)
        assert "not exact even on 7-bit operands" in int8_decoding_problem(torch.device("cpu"))
        patch.setattr(fused_decoder, "decoder_kernels", lambda: None)
        assert "C++ decoding kernels, which are not built" in int8_decoding_problem(torch.device("cpu"))
    with pytest.raises(ValueError, match="exclude each other"):
        FusedDecoder(generator_of(0, "relu"), torch.bfloat16, int8=True)
