"""CLIP-SF's backbone on open_clip: architectures as JSON, weights from any of four file layouts.

Architectures are data: open_clip's own configs (``ViT-L-14-quickgelu`` for UniIR's CLIP-SF) plus the
small ones in ``feature_extraction/model_configs/*.json``, registered with open_clip on import, so
``open_clip.create_model("clip-sf-tiny")`` works as well. Models are always built with random
weights (no ``pretrained=``: nothing is ever downloaded) and then loaded from a local file:

- UniIR's ``clip_sf_large.pth``: the state dict under ``model`` with the prefix ``clip_model.``, next
  to pickled training objects (an OmegaConf config, read as an inert stand-in by ``read_official_file``);
- this project's ``clip_sf.pt`` (written by ``genius train-clip``): ``model`` plus the architecture
  (``model_name``, ``model_config``), so it rebuilds itself;
- an open_clip training checkpoint (``state_dict``, possibly with DDP's ``module.`` prefix) or a
  bare state dict;
- OpenAI's TorchScript archive (``ViT-L-14.pt``), whose tensors are read without running its code.

No file is ever unpickled beyond tensors, plain data and inert stand-ins (``common.checkpoint.safe_load``).
Files that do not record their architecture (UniIR's, OpenAI's) get it from their tensor shapes.
Every load is strict: a missing, unexpected or mis-shaped tensor is an error listing all of them,
named as they appear in the file.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import open_clip
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, PILToTensor, Resize

from genius.common.checkpoint import (
    PLAIN_CONTENTS,
    CheckpointMismatchError,
    check_own_content,
    check_state_dict,
    official_checkpoint,
    read_official_file,
    safe_load,
)
from genius.common.image_collections import to_rgb

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
        # to_rgb, not convert("RGB"): extraction reads an image as import-images checked it (16-bit scaled, float
        # refused naming the file, which an opened image records)
        return self._to_tensor(self._crop(self._resize(to_rgb(image, getattr(image, "filename", "") or "image"))))

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
            raise OSError(f"image {path} could not be decoded: {err}; replace it with a complete image file or drop "
                          "the records that name it (genius check-data --root <data root> lists every such image)"
                          ) from None
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


class _ScriptObject:
    """Stands in for a TorchScript module class while its archive is unpickled: keeps the
    attributes the pickle hands it, never the class's code."""

    qualified_name: str

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _container_tag(value: Any, *_: Any) -> Any:
    """TorchScript wraps typed lists and dicts in no-op helpers (``torch.jit._pickle``)."""
    return value


_JIT_CONTAINER_TAGS = tuple((_container_tag, f"torch.jit._pickle.{name}") for name in (
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag"))
# The records of a TorchScript archive that torch.save's format shares: the pickled module tree
# and its tensor storages. code/ and constants.pkl (the compiled program) are left behind.
_WEIGHT_RECORDS = re.compile(r"^(data\.pkl|version|\.data/version|byteorder|data/\d+)$")


def _declared_tensors(archive: zipfile.ZipFile, root: str) -> dict[str, set[str]]:
    """Each TorchScript class's parameters and buffers, as its code's ``__parameters__`` and
    ``__buffers__`` lists declare them: other tensor attributes (an attention mask) are not weights.
    The code is only parsed, never compiled or run."""
    declared = {}
    for name in archive.namelist():
        rel = name[len(root) + 1:]
        if not (rel.startswith("code/") and rel.endswith(".py")):
            continue
        module = rel[len("code/"):-len(".py")].replace("/", ".")
        try:
            for node in ast.parse(archive.read(name).decode("utf-8")).body:
                if isinstance(node, ast.ClassDef):
                    lists = {target.id: ast.literal_eval(stmt.value) for stmt in node.body
                             if isinstance(stmt, ast.Assign) for target in stmt.targets
                             if isinstance(target, ast.Name) and target.id in ("__parameters__", "__buffers__")}
                    declared[f"{module}.{node.name}"] = {*lists.get("__parameters__", ()),
                                                         *lists.get("__buffers__", ())}
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as err:  # ValueError: not literals
            raise CheckpointMismatchError(f"{archive.filename}: unsupported TorchScript archive ({name} does not "
                                          f"declare its tensors as literal lists: {' '.join(str(err).split())[:120]});"
                                          " save the weights with torch.save(model.state_dict())") from None
    return declared


def _module_tensors(obj: _ScriptObject, declared: Mapping[str, set[str]], path: Path,
                    prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``obj``'s parameters and buffers and its submodules', named as ``state_dict`` names them."""
    if obj.qualified_name not in declared or not isinstance(getattr(obj, "state", None), Mapping):
        raise CheckpointMismatchError(f"{path}: unsupported TorchScript archive (no definition or state for "
                                      f"{obj.qualified_name}); save the weights with torch.save(model.state_dict())")
    for attr, value in obj.state.items():
        if isinstance(value, _ScriptObject):
            yield from _module_tensors(value, declared, path, f"{prefix}{attr}.")
        elif attr in declared[obj.qualified_name] and isinstance(value, torch.Tensor):
            yield prefix + attr, value.detach()


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (OpenAI's ``ViT-*.pt``) without running it.

    ``torch.jit.load`` would compile and run the archive's code. Instead, the module tree and the
    storages are copied into a torch.save-style zip and read with ``safe_load``, every TorchScript
    class (``__torch__.*``) standing in as an inert ``_ScriptObject``.
    """
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryFile() as plain:
        root = archive.namelist()[0].split("/")[0]
        declared = _declared_tensors(archive, root)
        with zipfile.ZipFile(plain, "w", zipfile.ZIP_STORED) as out:
            for info in archive.infolist():
                if _WEIGHT_RECORDS.match(info.filename[len(root) + 1:]):
                    with archive.open(info) as src, \
                            out.open(info.filename, "w", force_zip64=info.file_size > zipfile.ZIP64_LIMIT) as dst:
                        shutil.copyfileobj(src, dst, 1 << 24)
        plain.seek(0)
        try:
            classes = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(plain)
                       if name.startswith("__torch__.")]
        except pickle.UnpicklingError:  # opcodes the weights-only reader refuses too, with a clear message
            classes = []
        stand_ins = [(type(name, (_ScriptObject,), {"qualified_name": name}), name) for name in classes]
        plain.seek(0)
        tree = safe_load(plain, [*stand_ins, *_JIT_CONTAINER_TAGS], contents=f"{PLAIN_CONTENTS}, TorchScript modules",
                         name=path)
    if not isinstance(tree, _ScriptObject):
        raise CheckpointMismatchError(f"{path}: the TorchScript archive does not hold a module")
    return dict(_module_tensors(tree, declared, path))


def read_clip_checkpoint(path: str | os.PathLike) -> ClipWeights:
    """Read a CLIP checkpoint in any supported layout (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist")
    if _is_torchscript(path):
        state = _read_torchscript(path)
        return ClipWeights({k: v for k, v in state.items() if k not in _OPENAI_JIT_EXTRAS}, "openai_jit", "")
    obj = read_official_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), Mapping):
        # open_clip's own training checkpoints keep the weights under "state_dict".
        state = dict(obj["state_dict"])
        prefix = "module." if state and all(k.startswith("module.") for k in state) else ""
        return ClipWeights(_strip(state, prefix), "open_clip", prefix)
    try:
        obj = official_checkpoint(obj, path)
    except CheckpointMismatchError:
        raise CheckpointMismatchError(f"{path}: not a CLIP checkpoint (expected a state dict under 'model' or "
                                      f"'state_dict', or a TorchScript archive)") from None
    state = dict(obj["model"])
    if obj.get("format") == OWN_CHECKPOINT_FORMAT:
        check_own_content(obj, path)  # the digest train-clip wrote into it
        return ClipWeights(state, "own", "", obj["model_name"], obj["model_config"])
    if any(k.startswith(UNIIR_PREFIX) for k in state):
        return ClipWeights(_strip(state, UNIIR_PREFIX), "uniir", UNIIR_PREFIX)
    return ClipWeights(state, "open_clip", "")


def check_clip_state(model_state: Mapping[str, torch.Tensor], weights: ClipWeights, what: str) -> None:
    """Strict name and shape check, reporting names as the file spells them (e.g. ``clip_model.*``)."""
    expected = {weights.prefix + k: v for k, v in model_state.items()}
    given = {weights.prefix + k: v for k, v in weights.state.items()}
    check_state_dict(expected, given, what)


# OpenAI's CLIP (and so UniIR's CLIP-SF) always uses 64-wide attention heads; head counts leave
# no trace in the tensor shapes, so this is what build_model assumes too.
_OPENAI_HEAD_WIDTH = 64
_NAME_KEYS = "encoder.model for extract, model.name for train-clip"


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def infer_architecture(state: Mapping[str, torch.Tensor], where: str) -> dict:
    """The open_clip architecture of an OpenAI-style ViT CLIP state dict, read from its tensor shapes
    as OpenAI's ``build_model`` does (64-wide heads); QuickGELU, as OpenAI trained with."""
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight",
              "text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight",
              "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in needed if k not in state]
    if len(missing) == len(needed):  # e.g. an rq.pt or generator.pt given for a CLIP: no name would help
        raise CheckpointMismatchError(f"{where}: not a CLIP checkpoint (none of a CLIP's tensors, such as "
                                      f"{needed[0]}, is in it); give a CLIP-SF or CLIP checkpoint")
    if missing:
        raise CheckpointMismatchError(f"{where}: cannot read a ViT CLIP architecture from its shapes (no "
                                      f"{', '.join(missing[:3])}); set the model name ({_NAME_KEYS}) explicitly")
    vision_width, patch = state["visual.conv1.weight"].shape[0], state["visual.conv1.weight"].shape[-1]
    text_width = state["ln_final.weight"].shape[0]
    if vision_width % _OPENAI_HEAD_WIDTH or text_width % _OPENAI_HEAD_WIDTH:
        raise CheckpointMismatchError(f"{where}: widths {vision_width}/{text_width} are not multiples of OpenAI's "
                                      f"{_OPENAI_HEAD_WIDTH}-wide heads, so the head count is unknown; set the model "
                                      f"name ({_NAME_KEYS}) explicitly")
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "quick_gelu": True,
        "vision_cfg": {"image_size": int(patch * grid), "layers": _count_blocks(state, "visual.transformer.resblocks."),
                       "width": int(vision_width), "head_width": _OPENAI_HEAD_WIDTH, "patch_size": int(patch),
                       "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width},
        "text_cfg": {"context_length": int(state["positional_embedding"].shape[0]),
                     "vocab_size": int(state["token_embedding.weight"].shape[0]), "width": int(text_width),
                     "heads": int(text_width // _OPENAI_HEAD_WIDTH), "layers": _count_blocks(state, "transformer.resblocks."),
                     "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width},
    }


def _normalised(cfg: Mapping[str, Any]) -> dict:
    """``cfg`` with open_clip's defaults filled in, so equal architectures compare equal."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    return {**cfg, "quick_gelu": bool(cfg.get("quick_gelu", False)),
            "vision_cfg": dataclasses.asdict(CLIPVisionCfg(**cfg["vision_cfg"])),
            "text_cfg": dataclasses.asdict(CLIPTextCfg(**cfg["text_cfg"]))}


def _registered_names(cfg: Mapping[str, Any]) -> list[str]:
    """The registered open_clip configs (open_clip's and ours) that build exactly ``cfg``."""
    target, found = _normalised(cfg), []
    for name in open_clip.list_models():
        other = open_clip.get_model_config(name)
        try:
            if _normalised(other) == target:
                found.append(name)
        except (KeyError, TypeError):  # configs of other model families (no vision_cfg, extra fields)
            continue
    return found


def architecture_from_weights(weights: ClipWeights, checkpoint: str | os.PathLike) -> tuple[str, dict]:
    """(name, architecture) of a checkpoint that does not record its architecture: inferred from the
    shapes, named after the registered config it equals (e.g. ``ViT-L-14-quickgelu``).

    Only OpenAI's and UniIR's files are known to be QuickGELU models; an open_clip state dict may
    be either (LAION models use GELU) and the weights cannot tell, so it needs an explicit name.
    """
    cfg = infer_architecture(weights.state, f"CLIP checkpoint {checkpoint}")
    if weights.layout == "open_clip":
        gelu = {**cfg, "quick_gelu": False}
        names = _registered_names(cfg) + _registered_names(gelu)
        raise ValueError(f"{checkpoint} does not record its architecture and open_clip weights may use GELU or "
                         f"QuickGELU, which the weights cannot tell: set the model name ({_NAME_KEYS})"
                         + (f"; its shapes fit {' or '.join(names)}" if names else ""))
    names = _registered_names(cfg)
    return (names[0], model_config(names[0])) if names else (f"inferred from {Path(checkpoint).name}", cfg)


def load_clip(checkpoint: str | os.PathLike | None, model_name: str | None) -> tuple[open_clip.CLIP, str, dict]:
    """Build the model and load ``checkpoint`` strictly; returns (model, model name, architecture).

    ``model_name`` None takes the architecture from the checkpoint: own checkpoints record it,
    UniIR's and OpenAI's are read from their shapes (``architecture_from_weights``). A name given
    explicitly is built as named and must fit the weights; ``ViT-L-14-quickgelu`` for UniIR's and
    OpenAI's ViT-L/14 files (plain ``ViT-L-14`` has the same tensor names but nn.GELU, which
    silently changes outputs). With no checkpoint the model keeps its random initialisation
    (training from scratch) and needs a name.
    """
    weights = read_clip_checkpoint(checkpoint) if checkpoint is not None else None
    if weights is not None and weights.model_config is not None:
        if model_name is not None and model_name != weights.model_name:
            raise ValueError(f"{checkpoint} was trained as {weights.model_name!r} but the config asks for "
                             f"{model_name!r}; remove the model name ({_NAME_KEYS}: the checkpoint carries its "
                             "architecture) or fix it")
        model_name, cfg = weights.model_name, weights.model_config
    elif model_name is not None:
        cfg = model_config(model_name)
    elif weights is not None:
        model_name, cfg = architecture_from_weights(weights, checkpoint)
    else:
        raise ValueError("no CLIP architecture: without a checkpoint, set the model name (e.g. ViT-L-14-quickgelu)")
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
