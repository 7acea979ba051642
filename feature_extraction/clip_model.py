"""CLIP-SF's backbone on open_clip: architectures as JSON, weights from any of four file layouts.

Architectures are data: open_clip's own configs (``ViT-L-14-quickgelu`` for UniIR's CLIP-SF) plus the
small ones in ``feature_extraction/model_configs/*.json``, registered with open_clip on import, so
``open_clip.create_model("clip-sf-tiny")`` works as well. Models are always built with random
weights (no ``pretrained=``: nothing is ever downloaded) and then loaded from a local file:

- UniIR's ``clip_sf_large.pth``: the state dict under ``model`` with the prefix ``clip_model.``, next
  to pickled training objects (an OmegaConf config), read by ``load_official_checkpoint``;
- this project's ``clip_sf.pt`` (written by ``genius train-clip``): ``model`` plus the architecture
  (``model_name``, ``model_config``), so it rebuilds itself;
- an open_clip training checkpoint (``state_dict``, possibly with DDP's ``module.`` prefix) or a
  bare state dict;
- OpenAI's TorchScript archive (``ViT-L-14.pt``).

Every load is strict: a missing, unexpected or mis-shaped tensor is an error listing all of them,
named as they appear in the file.
"""
from __future__ import annotations

import copy
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import open_clip
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, PILToTensor, Resize

from genius.common.checkpoint import CheckpointMismatchError, check_state_dict, load_official_checkpoint

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
OWN_CHECKPOINT_FORMAT = "genius-clip-sf/1"
UNIIR_PREFIX = "clip_model."
# Entries of OpenAI's TorchScript archive that are hyperparameters, not weights.
_OPENAI_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size")

open_clip.add_model_config(MODEL_CONFIG_DIR)


def model_config(name: str) -> dict:
    """The architecture dict of a registered open_clip model config (ours or open_clip's)."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        ours = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise ValueError(f"unknown CLIP model config {name!r}; this project's configs: {', '.join(ours)}; "
                         f"open_clip's include ViT-L-14-quickgelu, ViT-B-32-quickgelu (see open_clip.list_models())")
    return copy.deepcopy(cfg)


def build_clip(cfg: Mapping[str, Any]) -> open_clip.CLIP:
    """A randomly initialised open_clip ``CLIP`` from an architecture dict (fp32)."""
    cfg = dict(copy.deepcopy(cfg))
    unsupported = [k for k in ("custom_text", "multimodal_cfg") if cfg.get(k)]
    unsupported += [k for k in ("hf_model_name", "hf_tokenizer_name") if cfg.get("text_cfg", {}).get(k)]
    if unsupported or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ValueError(f"CLIP-SF needs open_clip's plain CLIP towers; this config uses {unsupported or 'a timm vision tower'}")
    return open_clip.CLIP(**cfg)


def context_length(cfg: Mapping[str, Any]) -> int:
    return int(cfg["text_cfg"].get("context_length", 77))


def image_size(cfg: Mapping[str, Any]) -> int:
    size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"only square image sizes are supported, got {size}")
        size = size[0]
    return int(size)


def tokenizer_for(cfg: Mapping[str, Any]) -> open_clip.tokenizer.SimpleTokenizer:
    """CLIP's BPE (lower-cased, ftfy-fixed), SOT/EOT-wrapped and truncated to the model's context."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length(cfg))


# ---- images --------------------------------------------------------------------------------
class ImagePreprocess:
    """OpenAI CLIP's eval transform, split in two so decoded images can be cached as uint8.

    ``to_uint8``: RGB, resize the short side to ``size`` (bicubic), centre crop -> uint8 [3, S, S];
    ``normalize``: /255 and CLIP's mean/std. Together they equal open_clip's
    ``image_transform(size, is_train=False)`` (tested).
    """

    def __init__(self, size: int, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD):
        self.size = size
        self._resize = Resize(size, interpolation=InterpolationMode.BICUBIC)
        self._crop = CenterCrop(size)
        self._to_tensor = PILToTensor()
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        return self._to_tensor(self._crop(self._resize(image.convert("RGB"))))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> normalised float32."""
        return (pixels.float() / 255.0 - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))


class ImageReader:
    """Reads ``<root>/<relative path>`` into preprocessed uint8 tensors, optionally cached in RAM.

    The cache holds uint8 crops (3*S*S bytes each: 12 KB for a 64-px world image), so a whole
    synthetic world fits; it is per process (DataLoader workers each have their own).
    """

    def __init__(self, root: str | os.PathLike, preprocess: ImagePreprocess, cache: bool = False):
        self.root = Path(root)
        self.preprocess = preprocess
        self._cache: dict[str, torch.Tensor] | None = {} if cache else None

    def __call__(self, rel_path: str) -> torch.Tensor:
        if self._cache is not None and rel_path in self._cache:
            return self._cache[rel_path]
        path = self.root / rel_path
        try:
            with Image.open(path) as image:
                pixels = self.preprocess.to_uint8(image)
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} not found (img_path {rel_path!r} relative to the data root {self.root})") from None
        except OSError as err:
            raise OSError(f"image {path} could not be decoded: {err}") from None
        if self._cache is not None:
            self._cache[rel_path] = pixels
        return pixels


# ---- checkpoints ---------------------------------------------------------------------------
@dataclass
class ClipWeights:
    state: dict[str, torch.Tensor]  # open_clip key names
    layout: str  # "uniir" | "own" | "open_clip" | "openai_jit"
    prefix: str  # what was stripped from the file's names ("" if nothing)
    model_name: str | None = None  # own checkpoints: the architecture they were trained with
    model_config: dict | None = None


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def read_clip_checkpoint(path: str | os.PathLike) -> ClipWeights:
    """Read a CLIP checkpoint in any supported layout (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
    if _is_torchscript(path):
        state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        return ClipWeights({k: v for k, v in state.items() if k not in _OPENAI_JIT_EXTRAS}, "openai_jit", "")
    try:
        obj = load_official_checkpoint(path)
    except CheckpointMismatchError:
        # open_clip's own training checkpoints keep the weights under "state_dict" instead.
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping)):
            raise CheckpointMismatchError(f"{path}: not a CLIP checkpoint (expected a state dict under "
                                          f"'model' or 'state_dict', or a TorchScript archive)") from None
        state = dict(obj["state_dict"])
        prefix = "module." if state and all(k.startswith("module.") for k in state) else ""
        return ClipWeights(_strip(state, prefix), "open_clip", prefix)
    state = dict(obj["model"])
    if obj.get("format") == OWN_CHECKPOINT_FORMAT:
        return ClipWeights(state, "own", "", obj["model_name"], obj["model_config"])
    if any(k.startswith(UNIIR_PREFIX) for k in state):
        return ClipWeights(_strip(state, UNIIR_PREFIX), "uniir", UNIIR_PREFIX)
    return ClipWeights(state, "open_clip", "")


def check_clip_state(model_state: Mapping[str, torch.Tensor], weights: ClipWeights, what: str) -> None:
    """Strict name and shape check, reporting names as the file spells them (e.g. ``clip_model.*``)."""
    expected = {weights.prefix + k: v for k, v in model_state.items()}
    given = {weights.prefix + k: v for k, v in weights.state.items()}
    check_state_dict(expected, given, what)


def load_clip(checkpoint: str | os.PathLike | None, model_name: str | None) -> tuple[open_clip.CLIP, str, dict]:
    """Build the model and load ``checkpoint`` strictly; returns (model, model name, architecture).

    Own checkpoints carry their architecture; for the other layouts ``model_name`` says which
    open_clip config to build (``ViT-L-14-quickgelu`` for UniIR's and OpenAI's ViT-L/14 files:
    plain ``ViT-L-14`` has the same tensor names but nn.GELU, which silently changes outputs).
    With no checkpoint the model keeps its random initialisation (training from scratch).
    """
    weights = read_clip_checkpoint(checkpoint) if checkpoint is not None else None
    if weights is not None and weights.model_config is not None:
        if model_name is not None and model_name != weights.model_name:
            raise ValueError(f"{checkpoint} was trained as {weights.model_name!r} but the config asks for "
                             f"{model_name!r}; remove encoder.model (the checkpoint carries its architecture) or fix it")
        model_name, cfg = weights.model_name, weights.model_config
    elif model_name is None:
        raise ValueError(f"no CLIP architecture: set the model name (e.g. ViT-L-14-quickgelu); "
                         f"{checkpoint or 'no checkpoint'} does not carry one")
    else:
        cfg = model_config(model_name)
    model = build_clip(cfg)
    if weights is not None:
        check_clip_state(model.state_dict(), weights, f"CLIP checkpoint {checkpoint} ({weights.layout} layout) for {model_name}")
        model.load_state_dict(weights.state, strict=True)
    return model, model_name, cfg


def own_checkpoint(model: torch.nn.Module, model_name: str, cfg: Mapping[str, Any], **extra: Any) -> dict:
    """The dict ``genius train-clip`` saves as ``clip_sf.pt`` and ``load_clip`` reads back."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": OWN_CHECKPOINT_FORMAT, "model": state, "model_name": model_name,
            "model_config": json.loads(json.dumps(cfg)), **extra}
