"""The T5 decoder's cached step for constrained beam search, written out as plain tensor ops.

``transformers``' T5 decoder spends a large share of a decoding step outside its matrix products
at beam-search batch sizes: per layer it builds position biases and masks, routes through the
attention interface, grows its cache by concatenation and reorders it layer by layer, and runs
T5's layer norm as five element-wise ops. At 50 beams the step's GEMMs are small enough
([800, 512] x [512, 2048] for 16 queries) that this overhead is about a quarter of the time.
:class:`FusedDecoder` computes the same function with the weights read once per search:

- the self-attention's k and v products write straight into the step's slot of the history (int8
  runs q, k and v as one product, whose sums are scaled back into q's buffer and that slot); the
  cross-attention keys and values are computed once per query (not per beam) from
  the encoder output. In fp32,
  with fewer encoder vectors than d_kv (the paper's 30 of 64), the cross-attention's q and o
  products are absorbed into them (:meth:`FusedDecoder._absorb`): a query's beams get their scores
  from their normed states in one product, and their update from the probabilities in another,
  2.3x fewer operations than q, attention and o, at the steps with enough beams per query to pay
  for reading the absorbed products (:data:`ABSORBED_MIN_BEAMS`). Otherwise the B beams of a
  query attend to its keys as B rows of two batched GEMMs per head;
- the relative position bias of every step is looked up once, from T5's own bucket function;
- the self-attention history is never moved: a step writes its keys and values once, at
  [step, row] of one buffer per layer, and a beam reads its history through its ancestors, the
  row it descends from at each earlier step (a [steps, rows] table the step updates from the
  parents). ``transformers`` reorders every layer's whole history by the parents and concatenates
  it into a new tensor at each step: two copies of it and fresh pages, before attention reads it
  a third time;
- the step's outputs, the output head's logits and its log-softmax are written into a
  :class:`Workspace` the search keeps (and its next batch reuses), not into fresh tensors: at an
  evaluation's batch (64 queries x 50 beams) each is 6-50 MB (400 MB for the full vocabulary), and
  glibc maps a fresh block of that size anew, so each step faulted in hundreds of MB of zeroed
  pages (BENCHMARKS.md measures the difference);
- on a CPU (fp32, int8 and bf16) the step's memory-bound parts run as C++ kernels
  (``decoder_kernels.cpp``, on torch's own OpenMP threads): the self-attention, reading each
  row's history where it lies, and each residual update together with the layer norm after it,
  reading a bf16 product's update and writing the bf16 input of the next in the same pass
  (beam search's one-pass selection lives there too). Elsewhere (a GPU) the rows' histories are
  gathered for SDPA, and the norms are torch's;
- attention probabilities that would be subnormal (under 1.2e-38: a score more than 87.3 under
  its row's top, common in trained decoders) are zero, in the cross-attention
  (:func:`flush_subnormal_`) and the C++ self-attention: a CPU multiplies subnormal operands
  through a microcode assist, and with a tenth of them subnormal the cross-attention's update
  product ran 20-25x slower, the whole search 1.6-1.7x (BENCHMARKS.md). Each dropped term is
  below the sum's rounding;
- in fp32 each sublayer's output product adds itself into the residual stream (``addmm_``,
  ``baddbmm_``: the GEMM's beta = 1), so no update is written and read back before the norm;
- ``dtype`` bf16/fp16 casts the weights once, not at every op as ``autocast`` does; the residual
  stream and the layer norms stay fp32 (as under autocast). The output head's logits are fp32:
  a bf16 output would round a logit of 32-64 to 0.25. On an Intel CPU whose torch carries MKL
  (x86 builds link it and export its BLAS) the head multiplies the bf16-rounded state by the bf16
  head with fp32 accumulation and fp32 output (:func:`bf16_gemm_fp32_out`, MKL's
  ``cblas_gemm_bf16bf16f32``, on AMX tiles where the CPU has them: 6-7x the fp32 product alone,
  3x inside the search; :func:`bf16_head_on`);
  its logits differ from the fp32 head's by the inputs' rounding, a few thousandths, not the
  output's (:func:`precision_record` names which a run used). Elsewhere
  :meth:`IDGenerator.head_logits` scores the level in fp32 (on an AMD CPU with AVX-512 in oneDNN,
  as all the search's fp32 products: ``genius.common.cpu``). On a CPU the feed-forward's ReLU
  runs inside its bf16 product (oneDNN's post-op, the same bits as a pass after it).
- ``int8`` (CPU) runs the step's six products per layer, and the output head's
  (:meth:`level_log_probs`), as ``torch._int_mm``: int8 operands, int32 sums, into the
  workspace. The weights are quantized once, symmetric with one scale per output row; each
  product's input symmetric with one scale per row, by the C++ kernel that writes it (the norm
  before it, or the scaling of the product before it, the feed-forward's ReLU between them), and
  the sums are scaled back by the kernel that reads them (the residual update inside the next
  norm, q and the history). Operands use 127 levels where the CPU multiplies them exactly (VNNI,
  AMX), 63 where only 7-bit operands are safe (oneDNN's kernels without VNNI add pairs of
  products into saturating int16s): :func:`int8_levels` finds out by multiplying once. The bare
  products run 3-9x faster than fp32's on the CPUs measured (3.05x Ice Lake, 4.06x with AMX,
  9.25x Zen 5: BENCHMARKS.md), at about 1-2 % of the largest output. Everything else stays fp32: the cross-attention keys and values (once per
  query), attention, the residual stream, the log-softmax and the scores. Its beams are not the
  fp32 beams; BENCHMARKS.md measures how often they retrieve the same. Each row's quantization is
  its own, but the fp32 parts' rounding differs between batch shapes by about 1e-5, which can
  flip an int8 rounding, so a query's int8 beams are those of its batch.

In fp32 it gives the decoder's last hidden state to float rounding (the tests hold it to 1e-5 of
``transformers``' own decoder, step by step, and the beams to ``generate``'s); dropout is off, as
in ``eval()``.
"""
from __future__ import annotations

import ctypes
import math
import threading
import warnings
import weakref
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.t5.modeling_t5 import T5Attention

from genius.common.cpu import cpu_vendor
from genius.models.generative_retriever.generator import IDGenerator


class FusedDecoder:
    """One search's decoder: ``start`` once per batch of queries, then ``step`` once per level."""

    def __init__(self, generator: IDGenerator, dtype: torch.dtype = torch.float32, int8: bool = False):
        if int8:
            check_int8_decoding(generator.t5.device, dtype)
        decoder, config = generator.t5.decoder, generator.t5.config
        self.int8 = int8
        # int8 operands lie in [-levels, levels]: 127, or 63 where only 7-bit operands multiply exactly
        self.levels = int8_levels() if int8 else None
        self.dtype, self.heads, self.d_kv = dtype, config.num_heads, config.d_kv
        # fp32 products add themselves into the fp32 residual stream (:meth:`_residual`)
        self.adds_in_gemm = dtype == torch.float32 and not int8
        self.inner = self.heads * self.d_kv
        self.eps = config.layer_norm_epsilon
        self.d_model = config.d_model
        self.embed = decoder.embed_tokens.weight.detach().float()  # the residual stream is fp32
        self.final_norm = decoder.final_layer_norm.weight.detach()
        self.layers = [self._layer_weights(block, dtype, self.levels) for block in decoder.block]
        # The C++ kernels on a CPU (fp32, int8 and bf16): self-attention here, beam selection in
        # beam_search. None: SDPA on the rows' gathered histories, and torch's topk (a GPU's way).
        self.kernels = decoder_kernels() if self.embed.device.type == "cpu" and dtype in _KERNEL_STORAGE else None
        # int8's and bf16's output head: the tied head's rows, quantized (int8) or cast (bf16) per
        # slice (a level's, or all) on first use
        self.head_weight, self.head_packed = generator.t5.lm_head.weight.detach(), {}
        self.bf16_head = dtype == torch.bfloat16 and bf16_head_on(self.head_weight.device)
        # bf16 on a CPU: the feed-forward's ReLU as the product's oneDNN post-op (bit for bit the
        # product then relu_, whose separate bf16 pass cost half the product's time at 3200 rows)
        self.relu_in_product = (dtype == torch.bfloat16 and self.embed.device.type == "cpu"
                                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
        first = decoder.block[0].layer[0].SelfAttention
        self.bias_weight = first.relative_attention_bias.weight.detach()  # [buckets, heads]
        self.num_buckets, self.max_distance = first.relative_attention_num_buckets, first.relative_attention_max_distance

    @staticmethod
    def _layer_weights(block, dtype: torch.dtype, levels: int | None) -> dict:
        """A layer's weights as the step uses them; with int8 ``levels`` the per-step products'
        weights are :class:`Int8Weight` (``kv_cross``, used once per query, stays ``dtype``)."""
        self_attn, cross_attn, ff = block.layer
        sa, ca, dense = self_attn.SelfAttention, cross_attn.EncDecAttention, ff.DenseReluDense

        def cast(*linears):
            return torch.cat([linear.weight.detach() for linear in linears]).to(dtype)

        def step_weight(*linears):
            return Int8Weight.of(cast(*linears), levels) if levels else cast(*linears)

        gated = hasattr(dense, "wi_0")
        return {
            "norm_self": self_attn.layer_norm.weight.detach(), "qkv": step_weight(sa.q, sa.k, sa.v),
            "o_self": step_weight(sa.o), "norm_cross": cross_attn.layer_norm.weight.detach(),
            "q_cross": step_weight(ca.q), "kv_cross": cast(ca.k, ca.v), "o_cross": step_weight(ca.o),
            "norm_ff": ff.layer_norm.weight.detach(),
            "wi": step_weight(dense.wi_0, dense.wi_1) if gated else step_weight(dense.wi), "wo": step_weight(dense.wo),
            "gated": gated, "act": dense.act,
        }

    def _linear(self, x, weight, workspace: Workspace, name: str):
        """One of the step's products, ``x`` times ``weight`` transposed (``F.linear``'s own GEMM)
        into the workspace's buffer ``name``; with ``int8`` ``torch._int_mm`` of ``x`` (a
        :class:`Quantized`, or fp32 rows quantized here) and an :class:`Int8Weight`, its
        :class:`Int8Sums` in the workspace."""
        if self.int8:
            if isinstance(x, torch.Tensor):
                x = self._quantize(x, workspace, "quantized")
            sums = workspace.rows("int8_sums", len(x.values), weight.values.shape[1], torch.int32, x.values.device)
            return Int8Sums(torch._int_mm(x.values, weight.values, out=sums), x.scales, weight.scales)
        return torch.mm(x, weight.t(), out=workspace.rows(name, len(x), len(weight), self.dtype, x.device))

    @staticmethod
    def _quantized_buffers(workspace: Workspace, name: str, rows: int, cols: int) -> Quantized:
        """Room for [rows, cols] quantized rows: the workspace's buffers ``name`` and ``name``_scales."""
        return Quantized(workspace.rows(name, rows, cols, torch.int8, torch.device("cpu")),
                         workspace.rows(name + "_scales", rows, 1, torch.float32, torch.device("cpu")).view(rows))

    def _quantize(self, x: torch.Tensor, workspace: Workspace, name: str) -> Quantized:
        """fp32 rows ``x`` as an int8 product's input, into the workspace's buffers ``name``."""
        out = self._quantized_buffers(workspace, name, *x.shape)
        self.kernels.quantize(x.numpy(), out.values.numpy(), out.scales.numpy(), self.levels, torch.get_num_threads())
        return out

    def _scale_back(self, sums: Int8Sums, columns: slice, out: torch.Tensor) -> torch.Tensor:
        """An int8 product's ``columns`` scaled back into fp32 rows ``out`` (rows may lie apart)."""
        self.kernels.scale_sums(sums.values[:, columns].numpy(), sums.row_scales.numpy(),
                                sums.column_scales[columns].numpy(), False, out.numpy(), None, self.levels,
                                torch.get_num_threads())
        return out

    def _residual(self, stream: torch.Tensor, x: torch.Tensor, weight, workspace: Workspace) -> torch.Tensor | None:
        """A sublayer's output product, ``x`` times ``weight`` transposed, as the residual
        ``stream``'s update: in fp32 added by the GEMM itself (beta = 1, ``addmm_``), so the norm
        after it reads no separate update (None is returned); otherwise the update, for
        :meth:`_add_norm` to add."""
        if self.adds_in_gemm:
            stream.addmm_(x, weight.t())
            return None
        return self._linear(x, weight, workspace, "update")

    @torch.inference_mode()  # decoding only; the workspace's buffers are written in place
    def level_log_probs(self, generator: IDGenerator, hidden: torch.Tensor, level: int, level_head: bool,
                        state: DecodeState | None = None) -> torch.Tensor:
        """fp32 log-probabilities [N, K_level] of level ``level``'s codes from ``step``'s states:
        :meth:`IDGenerator.level_log_probs`, whose head product is int8 with ``int8`` (the
        log-softmax stays fp32). ``generator``: the one this decoder was made from. With the
        search's ``state`` they are written into its workspace: valid while the state lives, until
        its next level's."""
        workspace = None if state is None else state.workspace
        if self.int8:
            product = partial(self._int8_head, workspace)
        elif self.bf16_head:
            product = partial(self._bf16_head, workspace)
        elif workspace is not None:
            product = partial(self._head_into, workspace)
        else:
            product = None
        return generator.level_log_probs(hidden, level, level_head, product)

    def _head_into(self, workspace: Workspace, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        """The output head's ``rows`` times ``hidden`` in fp32 (a ``HeadProduct``: the generator's
        own ``F.linear``, bit for bit), into ``workspace``."""
        weight = self.head_weight[rows].float()
        out = workspace.rows("logits", len(hidden), len(weight), torch.float32, hidden.device)
        return torch.mm(hidden, weight.t(), out=out)

    def _bf16_head(self, workspace: Workspace | None, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        """The output head's ``rows`` times ``hidden``, both rounded to bf16, accumulated and
        returned in fp32 (a ``HeadProduct``; :func:`bf16_gemm_fp32_out`), into ``workspace`` (None: a
        new tensor)."""
        weight = self._head_rows(rows, lambda rows_weight: rows_weight.to(torch.bfloat16).contiguous())
        shape = (len(hidden), len(weight))
        if workspace is None:
            inputs, out = hidden.to(torch.bfloat16, memory_format=torch.contiguous_format), torch.empty(shape)
        else:
            inputs = workspace.rows("head_inputs", len(hidden), hidden.shape[1], torch.bfloat16, hidden.device)
            inputs.copy_(hidden)
            out = workspace.rows("logits", *shape, torch.float32, hidden.device)
        return bf16_gemm_fp32_out(inputs, weight, out)

    def _int8_head(self, workspace: Workspace | None, hidden: torch.Tensor, rows: slice) -> torch.Tensor:
        """The output head's ``rows`` times ``hidden`` as one of the step's int8 products, scaled back
        into fp32 (a ``HeadProduct``), in ``workspace`` (None: a fresh one's, new tensors)."""
        workspace = Workspace() if workspace is None else workspace
        sums = self._linear(hidden.contiguous(), self._head_rows(rows, partial(Int8Weight.of, levels=self.levels)),
                            workspace, "logits")
        out = workspace.rows("logits", len(hidden), sums.values.shape[1], torch.float32, hidden.device)
        return self._scale_back(sums, slice(None), out)

    def _head_rows(self, rows: slice, form):
        """The head's ``rows`` in the form the decoder multiplies them in (``form`` of the fp32 rows:
        int8's quantized weight, bf16's cast), made on first use and kept per slice."""
        key = (rows.start, rows.stop)
        if key not in self.head_packed:  # a plain dict write: two threads forming at once store equal forms
            self.head_packed[key] = form(self.head_weight[rows])
        return self.head_packed[key]

    def _add_norm(self, x: torch.Tensor, delta, weight: torch.Tensor, dtype: torch.dtype | None = None,
                  out=None):
        """The residual stream's update ``x += delta`` (in place; none when ``delta`` is None), then
        T5's layer norm of ``x`` (RMS, no mean, no bias) in fp32, in ``dtype`` (default: the GEMM
        dtype). One C++ pass on a CPU in fp32 or bf16 (a bf16 update widened, a bf16 output rounded
        as ``.to`` rounds), into ``out`` (``dtype``; None: a new tensor). int8: ``delta`` is the
        output product's :class:`Int8Sums`, and the norm is the next product's :class:`Quantized`
        input (``out``, the workspace's), or fp32 with ``dtype`` fp32."""
        if self.int8:
            sums = (None,) * 3 if delta is None else (delta.values.numpy(), delta.row_scales.numpy(),
                                                      delta.column_scales.numpy())
            if dtype == torch.float32:
                normed, scales = torch.empty(x.shape), None
            else:
                normed, scales = out.values, out.scales.numpy()
            self.kernels.add_rms_norm_int8(x.numpy(), *sums, weight.numpy(), self.eps, normed.numpy(), scales,
                                           self.levels, torch.get_num_threads())
            return normed if dtype == torch.float32 else out
        dtype = dtype or self.dtype
        if self.kernels is not None and dtype in _KERNEL_STORAGE and (delta is None or delta.dtype in _KERNEL_STORAGE):
            out = torch.empty(x.shape, dtype=dtype) if out is None else out
            update = None if delta is None else _storage(delta.contiguous())
            self.kernels.add_rms_norm(x.numpy(), update, weight.numpy(), self.eps, _storage(out), torch.get_num_threads())
            return out
        if delta is not None:
            x += delta
        return F.rms_norm(x, weight.shape, weight, self.eps).to(dtype)

    def _position_bias(self, position: int) -> torch.Tensor:
        """[heads, position + 1]: the bias of the query at ``position`` over keys 0..position."""
        relative = torch.arange(position + 1, device=self.bias_weight.device) - position
        buckets = T5Attention._relative_position_bucket(relative, bidirectional=False, num_buckets=self.num_buckets,
                                                        max_distance=self.max_distance)
        return self.bias_weight[buckets].t().to(self.dtype).contiguous()

    def _self_attention(self, q: torch.Tensor, history: torch.Tensor, ancestors: torch.Tensor, bias: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """[rows, inner]: each row's query ``q`` [rows, inner] over its history, the keys and values
        ``history`` [2, steps, max_rows, inner] at [s, ancestors[s, row]] for s < bias.shape[1];
        into ``out`` on a CPU (SDPA makes its own output)."""
        rows, steps = len(q), bias.shape[1]
        if self.kernels is not None:
            q, keys, values, out_array = (_storage(x) for x in (q, history[0], history[1], out))
            attend = getattr(self.kernels, _KERNEL_STORAGE[self.dtype][0])
            attend(q, keys, values, ancestors.numpy(), bias.float().numpy(), out_array, torch.get_num_threads())
            return out
        lineage = ancestors[:steps, :rows]
        keys, values = history[:, torch.arange(steps, device=q.device)[:, None], lineage]  # [2, steps, rows, inner]
        keys, values = (x.view(steps, rows, self.heads, self.d_kv).permute(1, 2, 0, 3) for x in (keys, values))
        attended = F.scaled_dot_product_attention(q.view(rows, self.heads, 1, self.d_kv), keys, values,
                                                  attn_mask=bias[None, :, None, :], scale=1.0)
        return attended.reshape(rows, self.inner)

    def _cross_attention(self, q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, workspace: Workspace,
                         out: torch.Tensor) -> torch.Tensor:
        """[rows, inner]: the rows' queries ``q`` [rows, inner] (B beams per query, in query order)
        over their query's encoder keys ``keys_t`` [Q * heads, d_kv, T] (transposed) and ``values``
        [Q * heads, T, d_kv], in fp32, into ``out`` (``q``'s dtype). Per query and head, the B beams'
        scores are one [B, d_kv] x [d_kv, T] product, so the step runs two batched GEMMs and a
        softmax over [rows * heads, T]: at T = 30 this is 1.6-2x faster than SDPA's CPU kernel
        (BENCHMARKS.md), which runs each (query, head) as blocks of its flash loop. Under bf16 the
        scores and the softmax stay fp32, as in SDPA; the output rounds once."""
        rows, num_queries, length = len(q), len(keys_t) // self.heads, keys_t.shape[-1]
        beams, float32, device = rows // num_queries, torch.float32, q.device
        per_head = workspace.rows("cross_q", rows, self.inner, float32, device).view(num_queries, self.heads, beams,
                                                                                  self.d_kv)
        per_head.copy_(q.view(num_queries, beams, self.heads, self.d_kv).transpose(1, 2))
        per_head = per_head.view(-1, beams, self.d_kv)
        scores, probs = (workspace.rows(name, rows, self.heads * length, float32, device).view(-1, beams, length)
                         for name in ("cross_scores", "cross_probs"))
        torch.bmm(per_head, keys_t, out=scores)
        flush_subnormal_(torch.softmax(scores, -1, out=probs))
        mixed = workspace.rows("cross_mixed", rows, self.inner, float32, device)
        torch.bmm(probs, values, out=mixed.view(-1, beams, self.d_kv))
        out.view(num_queries, beams, self.heads, self.d_kv).copy_(
            mixed.view(num_queries, self.heads, beams, self.d_kv).transpose(1, 2))
        return out

    def absorbs_cross_attention(self, length: int, beams: int) -> bool:
        """Whether a step with ``beams`` rows per query over ``length`` encoder vectors runs the
        cross-attention absorbed (:meth:`_absorb`, :func:`cross_attention_absorbed`)."""
        return cross_attention_absorbed(length, self.d_kv, self.dtype, self.int8, beams)

    def _absorb(self, keys_t: torch.Tensor, values: torch.Tensor, layer: dict, workspace: Workspace,
                into_scores: torch.Tensor, out_of_values: torch.Tensor) -> None:
        """A layer's cross-attention, absorbed into two products per query, for the search's
        queries' keys and values as the plain path holds them (fp32, per head: ``keys_t`` [Q *
        heads, d_kv, T], ``values`` [Q * heads, T, d_kv]). A beam's score over key t of
        head h is (x W_q,h) . k_t,h = x . (W_q,h^T k_t,h), so ``into_scores`` [Q, d_model, heads * T]
        holds W_q,h^T k_t,h for every (h, t) of each query, and the scores of a query's beams are
        one product with their normed states x; likewise its update is the sum over (h, t) of
        p_h,t (v_t,h W_o,h^T), one product of the probabilities with ``out_of_values``
        [Q, heads * T, d_model]. At the paper's shape (T = 30, heads * d_kv = d_model = 512) this
        replaces the q and o products and the attention between them (3.6 GFLOP per 64 x 50 rows
        and layer) by 1.6 GFLOP: the same function, its sums in another order (float rounding)."""
        num_queries, length = len(keys_t) // self.heads, keys_t.shape[-1]
        keys = keys_t.view(num_queries, self.heads, self.d_kv, length).permute(1, 2, 0, 3).reshape(
            self.heads, self.d_kv, num_queries * length)  # k_h^T of every query
        values = values.view(num_queries, self.heads, length, self.d_kv)
        q_weight_t = layer["q_cross"].view(self.heads, self.d_kv, self.d_model).transpose(1, 2)  # W_q,h^T
        o_weight_t = layer["o_cross"].view(self.d_model, self.heads, self.d_kv).permute(1, 2, 0)  # W_o,h^T
        # The scores' side, stored [d_model, heads * T] per query so that the step's product reads
        # it untransposed (5.4 against 7.5 ms per layer and step at 64 queries): one product per
        # head over all the queries, then one copy into place (17 against 27 ms per layer for a
        # product per query written in place, whose output torch copies per call).
        product = workspace.tensor("cross_absorb", (self.heads, self.d_model, num_queries * length), torch.float32,
                                   keys_t.device)
        torch.bmm(q_weight_t, keys, out=product)
        into_scores.view(num_queries, self.d_model, self.heads, length).copy_(
            product.view(self.heads, self.d_model, num_queries, length).permute(2, 1, 0, 3))
        for query in range(num_queries):  # the values' side: in place, one product over the heads per query
            torch.bmm(values[query], o_weight_t, out=out_of_values[query].view(self.heads, length, self.d_model))

    def _absorbed_cross_attention(self, stream: torch.Tensor, normed: torch.Tensor, into_scores: torch.Tensor,
                                  out_of_values: torch.Tensor, workspace: Workspace) -> None:
        """The cross-attention (its o product included) of the rows' normed states [rows, d_model]
        (B beams per query, in query order), from their query's absorbed products
        (:meth:`_absorb`), added into the residual ``stream`` by the update's product (fp32 only)."""
        rows, (num_queries, _, width) = len(normed), into_scores.shape
        beams, length, float32, device = rows // num_queries, width // self.heads, torch.float32, normed.device
        scores, probs = (workspace.rows(name, rows, width, float32, device) for name in ("cross_scores", "cross_probs"))
        torch.bmm(normed.view(num_queries, beams, self.d_model), into_scores, out=scores.view(num_queries, beams, width))
        per_head = (rows, self.heads, length)
        flush_subnormal_(torch.softmax(scores.view(per_head), -1, out=probs.view(per_head)))
        stream.view(num_queries, beams, self.d_model).baddbmm_(probs.view(num_queries, beams, width), out_of_values)

    @torch.inference_mode()  # decoding only; the C++ kernels read tensors that need no gradient
    def start(self, encoder_hidden: torch.Tensor, max_rows: int, num_steps: int) -> "DecodeState":
        """A search's state for ``max_rows`` beam rows at most and ``num_steps`` steps: the
        cross-attention keys and values of every layer, once per query, and their absorbed
        products where the search's widest steps run absorbed (:meth:`absorbs_cross_attention`;
        :class:`DecodeState`), a self-attention history per layer ([2, num_steps, max_rows,
        inner]), the rows' ancestors and the step's buffers (a :class:`Workspace`, back to the
        pool once the state is dropped)."""
        num_queries, length, _ = encoder_hidden.shape
        source = encoder_hidden.to(self.dtype)
        workspace = Workspace.take(max_rows)
        absorbed = self.absorbs_cross_attention(length, max_rows // num_queries)
        if absorbed:  # per layer, the products of each query's keys and of its values
            into_scores = workspace.tensor("cross_into_scores", (len(self.layers), num_queries, self.d_model,
                                                                 self.heads * length), torch.float32, source.device)
            out_of_values = workspace.tensor("cross_out_of_values", (len(self.layers), num_queries,
                                                                     self.heads * length, self.d_model),
                                             torch.float32, source.device)
        # Every layer's keys (transposed) and values in fp32, and each layer's product on the way,
        # in the workspace: as new tensors they were about 20 MB of fresh pages per layer at 64
        # queries, and their page faults took 30-60 ms a search (as long as its first two steps).
        per_head = num_queries * self.heads
        keys_ts = workspace.tensor("cross_keys_t", (len(self.layers), per_head, self.d_kv, length), torch.float32,
                                   source.device)
        all_values = workspace.tensor("cross_values", (len(self.layers), per_head, length, self.d_kv), torch.float32,
                                      source.device)
        product = workspace.tensor("cross_kv", (num_queries * length, 2 * self.inner), self.dtype, source.device)
        cross, cross_absorbed = [], [] if absorbed else None
        for index, layer in enumerate(self.layers):
            kv = torch.mm(source.reshape(-1, self.d_model), layer["kv_cross"].t(), out=product).view(
                num_queries, length, 2, self.heads, self.d_kv)
            keys_t, values = keys_ts[index], all_values[index]  # [Q * heads, d_kv, T], [Q * heads, T, d_kv]
            keys_t.view(num_queries, self.heads, self.d_kv, length).copy_(kv[:, :, 0].permute(0, 2, 3, 1))
            values.view(num_queries, self.heads, length, self.d_kv).copy_(kv[:, :, 1].transpose(1, 2))
            cross.append((keys_t, values))
            if absorbed:
                self._absorb(keys_t, values, layer, workspace, into_scores[index], out_of_values[index])
                cross_absorbed.append((into_scores[index], out_of_values[index]))
        history = workspace.tensor("history", (len(self.layers), 2, num_steps, max_rows, self.inner), self.dtype,
                                   source.device)
        ancestors = workspace.tensor("ancestors", (num_steps, max_rows), torch.long, source.device)
        state = DecodeState(cross=cross, cross_absorbed=cross_absorbed, history=list(history), ancestors=ancestors,
                            workspace=workspace)
        weakref.finalize(state, Workspace.give_back, workspace)
        return state

    @torch.inference_mode()
    def step(self, state: DecodeState, tokens: torch.Tensor, parents: torch.Tensor | None) -> torch.Tensor:
        """The final-norm decoder state [R, d_model] (fp32) of ``tokens`` [R], each row's newest token.

        ``parents`` [R] (None at the first step): the row of the previous step each row continues,
        grouped by query; its self-attention history is taken from there.
        """
        rows, position, workspace, device = len(tokens), state.position, state.workspace, tokens.device
        keys_t = state.cross[0][0]  # [Q * heads, d_kv, T]
        absorbed = state.cross_absorbed is not None and self.absorbs_cross_attention(
            keys_t.shape[-1], rows * self.heads // len(keys_t))

        def buffer(name: str, cols: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return workspace.rows(name, rows, cols, dtype, device)

        # the C++ norm's output, the next product's input; torch's norm (a GPU's) makes its own
        if self.int8:
            normed_out = self._quantized_buffers(workspace, "normed", rows, self.d_model)
        else:
            normed_out = buffer("normed", self.d_model) if self.kernels is not None else None

        bias = self._position_bias(position)
        # A row's ancestors are its parent's, then itself (the history is read in place, not moved).
        if position:
            state.ancestors[:position, :rows] = state.ancestors[:position, parents]
        torch.arange(rows, out=state.ancestors[position, :rows])
        # The residual stream x (fp32, a copy of the embeddings, updated in place) and its norm
        # ahead of each sublayer, computed together with the update before it.
        x = torch.index_select(self.embed, 0, tokens, out=buffer("x", self.d_model, torch.float32))
        normed = self._add_norm(x, None, self.layers[0]["norm_self"], out=normed_out)
        for index, layer in enumerate(self.layers):
            history = state.history[index]
            if self.int8:  # one product, scaled back into q and, for k and v, straight into the history
                qkv = self._linear(normed, layer["qkv"], workspace, "qkv")
                q = self._scale_back(qkv, slice(0, self.inner), buffer("q", self.inner))
                for side in (1, 2):
                    self._scale_back(qkv, slice(side * self.inner, (side + 1) * self.inner),
                                     history[side - 1, position, :rows])
            else:  # q into the workspace, k and v straight into the history (no copy)
                weight = layer["qkv"].view(3, self.inner, self.d_model)
                q = torch.mm(normed, weight[0].t(), out=buffer("q", self.inner))
                for side in (1, 2):
                    torch.mm(normed, weight[side].t(), out=history[side - 1, position, :rows])
            attended = self._self_attention(q, history, state.ancestors, bias, buffer("attended", self.inner))
            update = self._residual(x, attended, layer["o_self"], workspace)
            normed = self._add_norm(x, update, layer["norm_cross"], out=normed_out)

            if absorbed:
                self._absorbed_cross_attention(x, normed, *state.cross_absorbed[index], workspace)
                update = None
            else:
                q = self._linear(normed, layer["q_cross"], workspace, "q")
                if self.int8:
                    q = self._scale_back(q, slice(None), buffer("q", self.inner, torch.float32))
                attended = self._cross_attention(q, *state.cross[index], workspace, buffer("attended", self.inner))
                update = self._residual(x, attended, layer["o_cross"], workspace)
            normed = self._add_norm(x, update, layer["norm_ff"], out=normed_out)

            relu = not layer["gated"] and isinstance(layer["act"], torch.nn.ReLU)
            if self.int8:
                hidden = self._linear(normed, layer["wi"], workspace, "hidden")
                if relu:  # scaled back, ReLU'd and quantized for the next product in one pass
                    quantized = self._quantized_buffers(workspace, "quantized", rows, hidden.values.shape[1])
                    self.kernels.scale_sums(hidden.values.numpy(), hidden.row_scales.numpy(),
                                            hidden.column_scales.numpy(), True, quantized.values.numpy(),
                                            quantized.scales.numpy(), self.levels, torch.get_num_threads())
                    hidden = quantized
                else:
                    hidden = self._scale_back(hidden, slice(None), buffer("hidden", hidden.values.shape[1]))
                    if layer["gated"]:
                        gate, linear = hidden.chunk(2, dim=-1)
                        hidden = layer["act"](gate) * linear
                    else:
                        hidden = layer["act"](hidden)
            elif relu and self.relu_in_product:  # a new tensor (the op has no ``out``), still 1.03x the search
                hidden = torch.ops.mkldnn._linear_pointwise(normed, layer["wi"], None, "relu", [], "")
            else:
                hidden = self._linear(normed, layer["wi"], workspace, "hidden")
                if layer["gated"]:
                    gate, linear = hidden.chunk(2, dim=-1)
                    hidden = layer["act"](gate) * linear
                elif relu:
                    hidden.relu_()  # in place on the product's output (a new [rows, d_ff] tensor would be new pages)
                else:
                    hidden = layer["act"](hidden)
            last = index + 1 == len(self.layers)
            next_norm = self.final_norm if last else self.layers[index + 1]["norm_self"]
            update = self._residual(x, hidden, layer["wo"], workspace)
            # the last norm's output is the step's, the caller's to keep: a new tensor
            normed = self._add_norm(x, update, next_norm, torch.float32 if last else None,
                                    None if last else normed_out)
        state.position += 1
        return normed


# Below this many beam rows per query, reading a query's absorbed products (2 x d_model x heads x T
# fp32 values per layer, from memory at every step) costs more than the q and o products they
# replace. Measured at the paper's shape (T = 30, 64 queries), the cross-attention per layer,
# absorbed against q, attention and o: 1 row 2.6 / 0.8 ms, 3 rows 3.0 / 1.5, 8 rows 4.6 / 2.6,
# 16 rows 5.0 / 4.9, 32 rows 5.8 / 9.0, 50 rows 7.2 / 14.6 (BENCHMARKS.md).
ABSORBED_MIN_BEAMS = 16


# The largest subnormal fp32: probabilities at or below it are flushed to zero (flush_subnormal_).
_LARGEST_SUBNORMAL = float(torch.finfo(torch.float32).tiny) * (1 - 2.0 ** -23)


def flush_subnormal_(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` (in place) with its subnormal values (under fp32's smallest normal, 1.2e-38) set
    to zero. A CPU multiplies subnormal operands through a microcode assist: the product of
    attention probabilities with 11 % of them subnormal ran 20-25x slower (BENCHMARKS.md), and
    trained attention is that peaked (the demo's decoder: 2 % of its cross-attention
    probabilities, score spreads up to 254). Each dropped term is under 1.2e-38 times a value, in
    a sum whose largest weight is at least 1 / T: far below the sum's rounding. One pass, in place
    (at most 5 % of the product's time)."""
    return F.threshold_(probs, _LARGEST_SUBNORMAL, 0.0)


def cross_attention_absorbed(length: int, d_kv: int, dtype: torch.dtype, int8: bool, beams: int) -> bool:
    """Whether the fused decoder's step with ``beams`` rows per query absorbs W_q and W_o into the
    keys and values of ``length`` encoder vectors (:meth:`FusedDecoder._absorb`): in fp32 (bf16
    products would round the scores themselves; int8 keeps its int8 products), where that is the
    smaller product (heads * T < heads * d_kv), and for at least :data:`ABSORBED_MIN_BEAMS` rows."""
    return dtype == torch.float32 and not int8 and length < d_kv and beams >= ABSORBED_MIN_BEAMS


def int8_decoding_problem(device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    """Why int8 decoding cannot run here, or None when it can."""
    if device.type != "cpu":
        return f"int8 decoding runs on a CPU only (its C++ kernels and torch._int_mm), not on {device.type}"
    if dtype != torch.float32:
        return "int8 decoding and autocast (bf16/fp16 weights) exclude each other: choose one"
    if decoder_kernels() is None:
        return ("int8 decoding needs the C++ decoding kernels, which are not built: reinstall the package "
                "(`pip install -e .` from the repository root), or decode in fp32 (turn int8 off)")
    if int8_levels() is None:
        return "this CPU's int8 products (torch._int_mm) are not exact even on 7-bit operands: decode in fp32 (turn int8 off)"
    return None


def check_int8_decoding(device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    problem = int8_decoding_problem(device, dtype)
    if problem:
        raise ValueError(problem)


@cache
def int8_levels() -> int | None:
    """The widest symmetric range [-levels, levels] whose int8 operands ``torch._int_mm`` multiplies
    exactly on this CPU: 127 with VNNI or AMX; 63 on CPUs without them, where oneDNN multiplies an
    operand shifted to 0..255 by the other with ``vpmaddubsw``, whose int16 pair sums saturate
    beyond 7-bit operands (measured: a row of 127s times a column of 127s came out 261,120 instead
    of 33,032,192); None if not even 63 is exact. Found by multiplying the extremes of each range
    (and a random block) once per process and comparing with exact integer products."""
    generator = torch.Generator().manual_seed(0)
    for levels in (127, 63):
        blocks = [(torch.full((32, 64), a, dtype=torch.int8), torch.full((64, 16), b, dtype=torch.int8))
                  for a in (levels, -levels) for b in (levels, -levels)]
        blocks.append((torch.randint(-levels, levels + 1, (48, 80), dtype=torch.int8, generator=generator),
                       torch.randint(-levels, levels + 1, (80, 24), dtype=torch.int8, generator=generator)))
        if all(torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()) for a, b in blocks):
            return levels
    return None


def precision_record(device: torch.device, dtype: torch.dtype, int8: bool) -> dict:
    """What a cache or run key records of the decoder's numbers beyond its dtype. int8: how its
    products quantize (per row, and the operands' levels: 127, or 63 on CPUs without VNNI), so
    decodings of the earlier int8 products (fbgemm's, one range per matrix), which recorded none
    or ``int8_inputs``, are not taken for these. bf16: a head that sums bf16 inputs in fp32
    (:func:`bf16_head_on`) gives other beams than the fp32 head, so decodings made before it, or on
    a torch without MKL or a CPU not Intel's, are not taken for its (nor its for theirs)."""
    if int8:
        return {"int8_products": f"rows quantized one by one, {int8_levels()} levels"}
    return {"head": "bf16 inputs, fp32 sums"} if dtype == torch.bfloat16 and bf16_head_on(device) else {}


@cache
def _mkl_bf16_gemm():
    """MKL's ``cblas_gemm_bf16bf16f32`` from torch's own CPU library, or None where this torch has
    no MKL (ARM and macOS builds) or its library cannot be opened. x86 builds of torch link MKL
    statically and export its BLAS; opening the already loaded library again only finds it."""
    libraries = sorted((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*"))
    for library in libraries:
        try:
            gemm = ctypes.CDLL(str(library)).cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            continue
        gemm.restype = None
        # (layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), MKL_INT 32-bit (LP64)
        gemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                              ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        return gemm
    return None


def bf16_head_on(device: torch.device) -> bool:
    """Whether a bf16 decoder on ``device`` scores its head with :func:`bf16_gemm_fp32_out`: on an
    Intel CPU whose torch carries MKL's bf16 GEMM. MKL picks its code paths by the CPU's vendor:
    on an AMD CPU with AVX512_BF16 (Zen 5) its bf16 GEMM ran at the fp32 product's rate (178
    GFLOP/s each at the head's shape, where oneDNN's bf16 product with a bf16 output ran at 810),
    so it only rounded the inputs; elsewhere the head stays fp32, the generator's own numbers (the
    whole bf16 search 1.03x faster so on Zen 5, the same top beams)."""
    return device.type == "cpu" and cpu_vendor() == "GenuineIntel" and _mkl_bf16_gemm() is not None



def bf16_gemm_fp32_out(a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` [m, n] (fp32) = ``a`` [m, k] times ``weight`` [n, k] transposed, both bf16 and
    contiguous, with fp32 accumulation: MKL's bf16 GEMM (AMX tiles or AVX-512 BF16 where the CPU has
    them), on torch's threads. torch on a CPU has no bf16 product with an fp32 output."""
    m, k = a.shape
    n = len(weight)
    tensors = (a, weight, out)
    if not (a.dtype == weight.dtype == torch.bfloat16 and out.dtype == torch.float32 and weight.shape[1] == k
            and out.shape == (m, n) and all(t.is_contiguous() and t.device.type == "cpu" for t in tensors)
            and max(m, n, k) < 2**31):  # MKL's LP64 ints
        raise ValueError(f"bf16_gemm_fp32_out: {a.dtype} {tuple(a.shape)} x {weight.dtype} {tuple(weight.shape)}^T "
                         f"into {out.dtype} {tuple(out.shape)}, on {', '.join(t.device.type for t in tensors)}")
    row_major, no_trans, trans = 101, 111, 112  # MKL's CBLAS enums
    if not k:  # MKL refuses a leading dimension of 0 (and prints so)
        return out.zero_()
    if m and n:
        _mkl_bf16_gemm()(row_major, no_trans, trans, m, n, k, 1.0, a.data_ptr(), k, weight.data_ptr(), k, 0.0,
                         out.data_ptr(), n)
    return out


@dataclass
class Quantized:
    """fp32 rows as an int8 product's input: ``values`` [rows, cols] int8, ``scales`` [rows] fp32
    (a row is ``values * scale``)."""

    values: torch.Tensor
    scales: torch.Tensor


@dataclass
class Int8Weight:
    """A weight [out, in] as the int8 products take it: ``values`` [in, out] int8 (the product's
    right operand, contiguous), ``scales`` [out] fp32, one per output row, symmetric."""

    values: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, levels: int) -> Int8Weight:
        """``weight`` quantized to [-levels, levels] per output row (an all-zero row: scale 0, values 0)."""
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1) / levels
        values = torch.round(weight / torch.where(scales > 0, scales, 1.0)[:, None]).clamp_(-levels, levels)
        return cls(values.to(torch.int8).t().contiguous(), scales)


@dataclass
class Int8Sums:
    """An int8 product's int32 sums [rows, out], and how to scale them back: row i, column j is
    ``values[i, j] * row_scales[i] * column_scales[j]`` (its input's row scale, its weight's)."""

    values: torch.Tensor
    row_scales: torch.Tensor
    column_scales: torch.Tensor


class Workspace:
    """A search's buffers by name, flat tensors viewed at each request's shape: the step's outputs,
    the self-attention history, the head's logits. A buffer grows to the largest request (rows up
    to ``max_rows``, so the first step's few rows do not make it regrow at the next) and is kept:
    the next batch's search, taking this workspace from the pool, writes into memory already
    mapped. One per live :class:`DecodeState`, so two searches at once (threads, or two decoders
    stepped in turn) never share one; a dropped state's workspace goes back to the pool, which
    keeps the ``POOL_SIZE`` latest idle workspaces in CPU memory (each the memory of its largest
    batch: at 256 queries x 50 beams, 2.8 GB of fp32 history, 1.7 GB of full-vocabulary logits and
    1.6 GB of absorbed cross-attention with the product that forms it, at the paper's shape)."""

    POOL_SIZE = 2
    _pool: list[Workspace] = []
    _pool_lock = threading.RLock()  # re-entrant: a state collected inside take() gives its workspace back

    def __init__(self):
        self.max_rows = 0
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    @classmethod
    def take(cls, max_rows: int) -> Workspace:
        with cls._pool_lock:
            workspace = cls._pool.pop() if cls._pool else cls()
        workspace.max_rows = max_rows
        return workspace

    @classmethod
    def give_back(cls, workspace: Workspace) -> None:
        """Return a dropped search's workspace, to be taken first; the oldest idle one beyond
        ``POOL_SIZE`` is freed. One holding GPU memory is freed too: CUDA's caching allocator
        reuses freed blocks without new pages, and idle buffers would keep GBs from what runs
        after decoding (the dense search)."""
        if any(buffer.device.type != "cpu" for buffer in workspace.buffers.values()):
            return
        with cls._pool_lock:
            cls._pool.append(workspace)
            del cls._pool[:-cls.POOL_SIZE]

    def tensor(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device, reserve: int = 0
               ) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` in buffer ``name`` of that dtype and device (one
        per dtype: searches in fp32 and bf16 taking turns keep both), which holds at least
        ``reserve`` values."""
        key, size = (name, dtype, torch.device(device)), math.prod(shape)
        held = self.buffers.get(key)
        if held is None or held.numel() < size:
            self.buffers.pop(key, None)  # free the old one first
            held = self.buffers[key] = torch.empty(max(size, reserve), dtype=dtype, device=device)
        return held[:size].view(shape)

    def rows(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [rows, cols] tensor in buffer ``name``, reserved for ``max_rows`` rows."""
        return self.tensor(name, (rows, cols), dtype, device, reserve=max(rows, self.max_rows) * cols)


# The C++ attention's entry point per decoder dtype, and the dtype numpy sees its tensors as
# (numpy has no bf16: bf16 goes as its bits).
_KERNEL_STORAGE = {torch.float32: ("attend", torch.float32), torch.bfloat16: ("attend_bf16", torch.int16)}


def _storage(tensor: torch.Tensor):
    """A contiguous fp32 or bf16 CPU tensor as the numpy array the C++ kernels take (bf16 as its bits)."""
    return tensor.view(_KERNEL_STORAGE[tensor.dtype][1]).numpy()


@cache
def decoder_kernels():
    """The C++ kernels of a CPU search (built with the package), or None with a warning once if they are not."""
    try:
        from genius.models.generative_retriever import _decoder_kernels
    except ImportError:
        warnings.warn("the C++ decoding kernels genius.models.generative_retriever._decoder_kernels are not built, "
                      "so CPU decoding runs slower; reinstall the package (`pip install -e .` from the repository root)",
                      RuntimeWarning, stacklevel=3)
        return None
    return _decoder_kernels


@dataclass
class DecodeState:
    """Per batch of queries: per layer, the cross-attention's keys (transposed) and values
    ([Q * heads, d_kv, T], [Q * heads, T, d_kv]) and, unless ``cross_absorbed`` is None, its
    absorbed pair ([Q, d_model, heads * T], [Q, heads * T, d_model], :meth:`FusedDecoder._absorb`,
    used by the steps with enough rows per query); per
    layer the self-attention keys and values of every step's rows [2, steps, max_rows, inner],
    written once; ``ancestors`` [steps, max_rows], the row each current row descends from at each
    step (its own at the newest); the search's buffers; the next step's position."""

    cross: list
    cross_absorbed: list | None
    history: list
    ancestors: torch.Tensor
    workspace: Workspace
    position: int = 0
