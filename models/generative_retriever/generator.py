"""The ID generator: a T5 decoder that reads a query as prefix vectors and writes its code tokens.

The T5 has an encoder of 0 layers (it only applies dropout and the final RMS norm to the prefix)
and a full decoder. The frozen stage-1 Combiner output of the query, L2-normalised, goes through
one linear layer (with bias) and is reshaped into ``num_prefix`` vectors of width ``d_model``;
these are the encoder's ``inputs_embeds`` with no attention mask. The decoder starts from pad
(token 0) and is trained to emit the L code tokens of the target (no EOS). Input and output
embeddings are one tied matrix, and T5 rescales the decoder output by d_model^-0.5 before it.

With ``condition`` ``image_tokens`` (IRGen's decoder) the generator owns a vision tower instead:
the visual tower of a stage-0 CLIP-SF (open_clip's ``VisionTransformer``), whose class and patch
tokens after ``ln_post`` (before CLIP's projection) go through one linear layer to ``d_model``
and are the encoder's ``inputs_embeds``. Its inputs are uint8 images [B, 3, S, S] as stage 0's
``ImageReader`` crops them; the generator normalises them itself, so a caller cannot feed it
differently normalised pixels.

``arch`` (plain JSON, saved in every checkpoint) fixes the shapes, the tower's architecture and
image size included; a model is always rebuilt from it, never from the YAML of a later run or
the stage-0 file. A prefix arch has no ``condition`` key, like every file written before it existed.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from genius.common.checkpoint import content_digest, load_own_checkpoint, load_state_dict_strict, save_own_checkpoint
from genius.common.fp_env import subnormals_flushed
from genius.models.generative_retriever.vocab import EOS, PAD, code_offsets, codes_to_tokens, vocab_size

# t5-small's shapes (google-t5/t5-small config.json); the encoder's 6 layers are dropped.
T5_SMALL = {
    "d_model": 512, "num_heads": 8, "d_kv": 64, "d_ff": 2048, "num_decoder_layers": 6, "dropout": 0.1,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
PREFIX, IMAGE_TOKENS = "prefix", "image_tokens"  # the arch's ``condition``: what the encoder reads
# (states [N, d_model], the output head's rows) -> logits [N, len(rows)]: ``IDGenerator.head_logits``
HeadProduct = Callable[[torch.Tensor, slice], torch.Tensor]


def make_arch(dim: int, codebook_sizes: Sequence[int], num_prefix: int = 30, vision: dict | None = None,
              **t5_shape) -> dict:
    """The generator's ``arch`` dict: codeword dim, codebook sizes, the conditioning and T5 shapes.

    ``vision`` None: the prefix condition with ``num_prefix`` vectors; a :func:`vision_arch` dict:
    the ``image_tokens`` condition (``num_prefix`` is then not used)."""
    unknown = set(t5_shape) - set(T5_SMALL)
    if unknown:
        raise ValueError(f"unknown T5 shape keys {sorted(unknown)}; valid: {sorted(T5_SMALL)}")
    head = {"dim": int(dim), "codebook_sizes": [int(k) for k in codebook_sizes]}
    condition = {"num_prefix": int(num_prefix)} if vision is None else {"condition": IMAGE_TOKENS, "vision": vision}
    return {**head, **condition, **T5_SMALL, **t5_shape}


def vision_arch(model_name: str, clip_cfg: dict) -> dict:
    """The ``vision`` entry of an image_tokens arch: the visual tower of the CLIP-SF architecture
    ``clip_cfg`` (as ``feature_extraction.clip_model.load_clip`` returns it) and its image size;
    the pixels are normalised with CLIP's mean and std, as stage 0 does."""
    from genius.feature_extraction.clip_model import image_size

    return {"model_name": model_name, "embed_dim": int(clip_cfg["embed_dim"]),
            "quick_gelu": bool(clip_cfg.get("quick_gelu", False)), "vision_cfg": dict(clip_cfg["vision_cfg"]),
            "image_size": image_size(clip_cfg)}


def build_vision_tower(vision: dict) -> nn.Module:
    """A randomly initialised visual tower (open_clip's ``VisionTransformer``) from a
    :func:`vision_arch` dict, without CLIP's final projection: the decoder reads the tokens before
    it, and a parameter without gradients would stall DDP."""
    # open_clip is imported by image_tokens generators only: it costs prefix decoding seconds of start-up.
    import open_clip
    from open_clip.transformer import VisionTransformer

    tower = open_clip.model._build_vision_tower(vision["embed_dim"], vision["vision_cfg"],
                                                 quick_gelu=vision["quick_gelu"])
    if not isinstance(tower, VisionTransformer) or tower.attn_pool is not None or tower.final_ln_after_pool:
        raise ValueError(f"model.vision_checkpoint: {vision['model_name']} has no plain ViT visual tower (a ResNet, "
                         "timm or attention-pooled tower); image_tokens needs a ViT CLIP such as ViT-L-14-quickgelu")
    tower.proj = None
    return tower


def t5_config(arch: dict) -> T5Config:
    return T5Config(
        vocab_size=vocab_size(arch["codebook_sizes"]), d_model=arch["d_model"], d_kv=arch["d_kv"], d_ff=arch["d_ff"],
        num_layers=0, num_decoder_layers=arch["num_decoder_layers"], num_heads=arch["num_heads"],
        relative_attention_num_buckets=arch["relative_attention_num_buckets"],
        relative_attention_max_distance=arch["relative_attention_max_distance"], dropout_rate=arch["dropout"],
        layer_norm_epsilon=arch["layer_norm_epsilon"], feed_forward_proj=arch["feed_forward_proj"],
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, tie_word_embeddings=True,
    )


def load_pretrained_t5(path: str | os.PathLike, arch: dict) -> tuple[T5ForConditionalGeneration, dict]:
    """A local T5 checkpoint directory with its encoder blocks dropped and the vocabulary resized.

    Returns the model and ``arch`` updated with the checkpoint's own shapes.
    """
    try:  # transformers reads the weights with torch's weights-only unpickler or safetensors
        config = T5Config.from_pretrained(path)
        config.num_decoder_layers = config.num_decoder_layers or config.num_layers
        config.num_layers = 0
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = PAD, PAD, EOS
        t5 = T5ForConditionalGeneration.from_pretrained(path, config=config)
    except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError, pickle.UnpicklingError,
            SafetensorError) as err:  # a missing, damaged or refused file of the folder
        raise ValueError(f"model.pretrained: {path}: not a loadable T5 folder ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:160]}); point it at a save_pretrained folder of a T5 model "
                         "(config.json and model.safetensors)") from None
    t5.resize_token_embeddings(vocab_size(arch["codebook_sizes"]))
    shapes = {key: getattr(config, key) for key in T5_SMALL if key != "dropout"}
    return t5, {**arch, **shapes, "dropout": config.dropout_rate}


class IDGenerator(nn.Module):
    """T5 (0 encoder layers) fed by ``num_prefix`` projected query vectors or by a vision tower's
    projected tokens; see the module docstring."""

    def __init__(self, arch: dict, t5: T5ForConditionalGeneration | None = None):
        super().__init__()
        self.arch = dict(arch)
        self.codebook_sizes = list(arch["codebook_sizes"])
        self.offsets = code_offsets(self.codebook_sizes)
        self.condition, self.d_model = arch.get("condition", PREFIX), arch["d_model"]
        self.t5 = t5 if t5 is not None else T5ForConditionalGeneration(t5_config(arch))
        if self.condition == PREFIX:
            self.num_prefix = arch["num_prefix"]
            self.embed_projector = nn.Linear(arch["dim"], self.num_prefix * self.d_model)
        elif self.condition == IMAGE_TOKENS:
            from genius.feature_extraction.clip_model import ImagePreprocess

            self.vision = build_vision_tower(arch["vision"])
            self.token_projector = nn.Linear(self.vision.transformer.width, self.d_model)
            self.preprocess = ImagePreprocess(arch["vision"]["image_size"])
        else:
            raise ValueError(f"generator arch: unknown condition {self.condition!r}; valid: {PREFIX}, {IMAGE_TOKENS}")

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @torch.no_grad()
    def init_code_embeddings(self, codebooks: Sequence[torch.Tensor], scale: float = 100.0) -> None:
        """Code-token rows = scale x W normalize(codeword), W a random bias-free Linear dim -> d_model.

        Rows of the special tokens keep T5's random init; the output head shares the matrix.
        """
        if [len(c) for c in codebooks] != self.codebook_sizes:
            raise ValueError(f"codebooks have sizes {[len(c) for c in codebooks]}, the generator {self.codebook_sizes}")
        weight = self.t5.get_input_embeddings().weight
        project = nn.Linear(self.arch["dim"], self.d_model, bias=False).to(weight.device)
        for offset, words in zip(self.offsets, codebooks):
            rows = scale * project(F.normalize(words.to(weight.device, torch.float32), dim=-1))
            weight[offset : offset + len(words)] = rows.to(weight.dtype)

    def prefix(self, z_query: torch.Tensor) -> torch.Tensor:
        """[B, dim] normalised query features -> [B, P, d_model] encoder inputs."""
        return self.embed_projector(z_query).view(len(z_query), self.num_prefix, self.d_model)

    def vision_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, S, S] -> the tower's class and patch tokens [B, 1 + grid^2, width]
        after ``ln_post`` (CLIP's image feature is the class token times its projection)."""
        out = self.vision.forward_intermediates(self.preprocess.normalize(pixels), indices=1,
                                                normalize_intermediates=True, intermediates_only=True,
                                                output_fmt="NLC", output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def encoder_inputs(self, queries: torch.Tensor) -> torch.Tensor:
        """The encoder's ``inputs_embeds`` [B, T, d_model]: the prefix of z [B, dim], or the projected
        tokens of uint8 images [B, 3, S, S] (see :meth:`check_inputs`)."""
        if self.condition == PREFIX:
            return self.prefix(queries)
        return self.token_projector(self.vision_tokens(queries))

    def check_inputs(self, queries: torch.Tensor) -> None:
        """ValueError unless ``queries`` is what this generator reads: z [Q, dim] (prefix) or uint8
        images [Q, 3, S, S] (image_tokens)."""
        if self.condition == PREFIX:
            if queries.ndim != 2 or queries.shape[1] != self.arch["dim"]:
                raise ValueError(f"z_query must be [Q, {self.arch['dim']}], got {tuple(queries.shape)}")
            return
        size = self.arch["vision"]["image_size"]
        if queries.ndim != 4 or tuple(queries.shape[1:]) != (3, size, size) or queries.dtype != torch.uint8:
            raise ValueError(f"an image_tokens generator reads uint8 images [Q, 3, {size}, {size}], got "
                             f"{queries.dtype} {tuple(queries.shape)}")

    def encode(self, queries: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, T, d_model] (the 0-layer encoder: dropout, final norm, dropout)."""
        return self.t5.encoder(inputs_embeds=self.encoder_inputs(queries)).last_hidden_state

    def forward(self, queries: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] for the target codes [B, L] (decoder input: pad, then codes)."""
        tokens = codes_to_tokens(target_codes, self.codebook_sizes)
        decoder_input = torch.cat([torch.full_like(tokens[:, :1], PAD), tokens[:, :-1]], dim=1)
        return self.t5(inputs_embeds=self.encoder_inputs(queries), decoder_input_ids=decoder_input).logits

    def level_log_probs(self, hidden: torch.Tensor, level: int, level_head: bool,
                        product: HeadProduct | None = None) -> torch.Tensor:
        """fp32 log-probabilities [N, K_level] of level ``level``'s codes from decoder states [N, d_model].

        With ``level_head`` only the level's K rows of the output head are scored and normalised
        among themselves; otherwise the full vocabulary is scored and normalised (the official
        decoding's numbers), then the level's slice is returned. ``product``: see :meth:`head_logits`.
        """
        lo, hi = self.offsets[level], self.offsets[level] + self.codebook_sizes[level]
        logits = self.head_logits(hidden, slice(lo, hi) if level_head else slice(None), product)
        if logits.requires_grad:
            log_probs = F.log_softmax(logits, dim=-1)
        else:  # in place (the same numbers): at a search's batch the logits are tens or hundreds of MB
            # A confident head's logits spread past 87, and exp() then writes subnormals, which a CPU
            # computes 4-6x slower (BENCHMARKS.md, section 7). Flushed, each adds under 1.2e-38 to a
            # sum of at least 1 (its row's largest term is 1), so the numbers are bit for bit the same.
            with subnormals_flushed(logits.device, torch.get_num_threads()):
                log_probs = torch.log_softmax(logits, dim=-1, out=logits)
        return log_probs if level_head else log_probs[:, lo:hi]

    def head_logits(self, hidden: torch.Tensor, rows: slice = slice(None),
                    product: HeadProduct | None = None) -> torch.Tensor:
        """fp32 logits [N, len(rows)] of the output head's ``rows`` for decoder states [N, d_model].

        Computed outside autocast on fp32 copies of the state and the weights: fp16 rounds a logit
        in 32..64 to 1/32, enough to reorder near-tied beams, and overflows to inf (then NaN after
        the log-softmax); the head is a small share of a decoder step's FLOPs. ``product(hidden,
        rows)``, when given, multiplies the (scaled) states by the head's ``rows`` instead of the
        fp32 ``F.linear`` (the int8 decoder's, ``FusedDecoder``)."""
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            if self.t5.config.scale_decoder_outputs:
                hidden = hidden * self.d_model**-0.5
            if product is not None:
                return product(hidden, rows)
            return F.linear(hidden, self.t5.lm_head.weight[rows].float())


def save_generator(path: str | os.PathLike, generator: IDGenerator, config: dict, rq_fingerprint: str,
                   **record) -> str:
    """The final ``generator.pt``: weights, arch, resolved config, the fingerprint of the rq.pt it
    was trained with, ``record`` (plain data: train-gen's run key) and ``fingerprint``, a content
    digest of the weights that later stages record (as rq.pt's). The file also carries a digest
    of its whole content, checked on every read. Returns the fingerprint."""
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    fingerprint = content_digest(state)
    save_own_checkpoint({"model": state, "arch": generator.arch, "config": config, "rq": rq_fingerprint, **record,
                         "fingerprint": fingerprint}, path)
    return fingerprint


def load_generator(path: str | os.PathLike) -> tuple[IDGenerator, dict]:
    """Rebuild from the saved arch, load strictly, eval mode. A file whose bytes no longer match
    its digest (a flipped byte, a truncated copy) is refused naming it. Meta: arch, config, rq
    (the fingerprint of its rq.pt), fingerprint (of these weights)."""
    ckpt = load_own_checkpoint(path, kind="generator")
    generator = IDGenerator(ckpt["arch"])
    load_state_dict_strict(generator, ckpt["model"], f"generator checkpoint {path}")
    meta = {key: ckpt[key] for key in ("arch", "config", "rq")}
    meta["fingerprint"] = ckpt.get("fingerprint") or content_digest(ckpt["model"])
    return generator.eval(), meta


def generator_fingerprint(path: str | os.PathLike) -> str:
    """The weights' fingerprint recorded in ``generator.pt`` (a memory-mapped read of the record;
    the content is checked where the weights are loaded)."""
    ckpt = load_own_checkpoint(path, verify=False, mmap=True, kind="generator")
    return str(ckpt.get("fingerprint") or content_digest(ckpt["model"]))
