"""Loading the released GENIUS quantizer (rq_clip_large.pth) from its published layout.

The real file is not available here, so the test writes one from the layout JSON. At paper size
it would hold ~250 M floats (1 GB), so widths and K are substituted (768 -> 8, 1536 -> 16,
2560 -> 5, 5120 -> 10, 4096 -> 12; 1 and 3 stay; 5120 is both the hidden width and twice the
projection width, so the small pair keeps that ratio): every number in the JSON is one
of these widths, so names, ranks and aliasing are kept exactly and only sizes shrink. The
paper-size layout itself is compared with the JSON name by name and shape by shape.
"""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from genius.common.checkpoint import CheckpointMismatchError
from genius.models.residual_quantization.model import cpu_state
from genius.models.residual_quantization.official import load_official_rq, official_layout, to_official_state

PAPER_ARCH = {"dim": 768, "proj_dim": 2560, "hidden_dim": 5120, "num_levels": 9, "codebook_size": 4096}
SMALL = {768: 8, 1536: 16, 2560: 5, 5120: 10, 4096: 12}


@pytest.fixture(scope="module")
def layout(shared_data):
    path = shared_data / "official_checkpoint_layouts" / "rq_clip_large.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


def small_shape(shape: list[int]) -> tuple[int, ...]:
    assert all(n in SMALL or n in (1, 3) for n in shape), shape
    return tuple(SMALL.get(n, n) for n in shape)


def build_state(layout: dict, extras: bool = False) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout at small widths, aliases sharing values."""
    generator = torch.Generator().manual_seed(0)
    entries = dict(layout["tensors"])
    if extras:
        (group,) = layout["possible_extra_tensors"].values()
        entries.update(group)
    state = {}
    for name, entry in entries.items():
        shape = small_shape(entry["shape"])
        state[name] = torch.ones(shape) if name.endswith("initted") else torch.randn(shape, generator=generator).abs()
    for name in list(state):
        if name.startswith("vq._codebook."):
            state[name] = state[name.replace("vq.", "residual_rq.layers.0.")]
    return state


def save_official(path, state: dict) -> None:
    """torch.save the way GENIUS's train.py did, with a stand-in for the pickled OmegaConf config."""
    module = types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self):
            self.content = {"codebook_config": {"codebook_level": 8, "codebook_vocab": 4096}}

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    module.DictConfig = DictConfig
    package = types.ModuleType("omegaconf")
    package.dictconfig = module
    sys.modules.update({"omegaconf": package, "omegaconf.dictconfig": module})
    try:
        torch.save({"model": state, "optimizer": {}, "scheduler": {}, "config": DictConfig(), "epoch": 20,
                    "scaler": {}}, path)
    finally:
        del sys.modules["omegaconf"], sys.modules["omegaconf.dictconfig"]


def test_our_official_layout_is_the_published_one(layout):
    ours = official_layout(PAPER_ARCH)
    published = {name: tuple(entry["shape"]) for name, entry in layout["tensors"].items()}
    assert list(ours) == list(published)  # same names, same order
    assert ours == published
    assert layout["top_level_keys"][0] == "model"


def test_an_official_checkpoint_loads_with_every_tensor_in_place(layout, tmp_path):
    state = build_state(layout, extras=True)  # the 1.16-1.17 MLPs are ignored
    save_official(tmp_path / "rq_clip_large.pth", state)
    model = load_official_rq(tmp_path / "rq_clip_large.pth")
    assert model.arch["modality_mode"] == "learned" and model.codebook_sizes == [3] + [12] * 8
    assert not model.training
    assert torch.equal(model.combiner.gate_hidden.weight, state["encoder.dynamic_scalar.0.weight"])
    assert torch.equal(model.combiner.gate_out.bias, state["encoder.dynamic_scalar.3.bias"])
    assert torch.equal(model.combiner.text_projection_layer.weight, state["encoder.text_projection_layer.weight"])
    for level, codebook in enumerate(model.codebooks()):
        assert torch.equal(codebook, state[f"residual_rq.layers.{level}._codebook.embed"][0])
        assert torch.equal(model.quantizer.levels[level].cluster_size,
                           state[f"residual_rq.layers.{level}._codebook.cluster_size"][0])
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    z = model.embed(img, txt, torch.ones(5), torch.ones(5))
    codes = model.encode(z)  # learned level 0: no modality needed
    assert codes.shape == (5, 9) and codes[:, 0].max() < 3


def test_a_wrong_shape_fails_naming_the_tensor(layout, tmp_path):
    state = build_state(layout)
    state["residual_rq.layers.3._codebook.embed"] = torch.zeros(1, 13, 8)
    save_official(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointMismatchError, match=r"residual_rq\.layers\.3\._codebook\.embed: checkpoint \(1, 13, 8\)"):
        load_official_rq(tmp_path / "bad.pth")
    state = build_state(layout)
    state["encoder.output_layer.weight"] = torch.zeros(8, 11)
    save_official(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.output_layer\.weight"):
        load_official_rq(tmp_path / "bad.pth")


def test_missing_unknown_and_disagreeing_tensors_are_refused(layout, tmp_path):
    state = build_state(layout)
    del state["encoder.dynamic_scalar.3.bias"]
    state["encoder.extra_head.weight"] = torch.zeros(2, 2)
    save_official(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): encoder\.dynamic_scalar\.3\.bias") as err:
        load_official_rq(tmp_path / "bad.pth")
    assert "encoder.extra_head.weight" in str(err.value)
    state = build_state(layout)
    state["vq._codebook.embed"] = state["vq._codebook.embed"] + 1  # no longer the level-0 tensor
    save_official(tmp_path / "bad.pth", state)
    with pytest.raises(CheckpointMismatchError, match="should be the same tensor"):
        load_official_rq(tmp_path / "bad.pth")


def test_initted_as_written_by_newer_library_versions_is_accepted(layout, tmp_path):
    state = build_state(layout)
    state = {k: (torch.tensor(True) if k.endswith("initted") else v) for k, v in state.items()}
    save_official(tmp_path / "new.pth", state)
    assert load_official_rq(tmp_path / "new.pth").quantizer.initialised


def test_writing_the_official_layout_inverts_loading_it(layout, tmp_path):
    """official file -> RQModel -> official state: the same names, order, shapes, dtypes and values,
    with the level-0 codebook aliased as vq._codebook.* (genius export-official writes this)."""
    state = build_state(layout)
    save_official(tmp_path / "rq_clip_large.pth", state)
    model = load_official_rq(tmp_path / "rq_clip_large.pth")
    written = to_official_state(cpu_state(model), model.arch)
    assert list(written) == list(layout["tensors"])
    for name, tensor in state.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    assert all(written[f"vq._codebook.{b}"] is written[f"residual_rq.layers.0._codebook.{b}"]
               for b in ("initted", "cluster_size", "embed_avg", "embed"))
