"""No file a user points at can run code when loaded (issue 13): every loader that takes a path
refuses a planted pickle with one clear line, and the marker file its unpickling would create never
appears; official files with a real pickled OmegaConf config still load, and our own checkpoints
round-trip through torch's weights-only unpickler."""
from __future__ import annotations

import json
import pickle
import random
import warnings
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from genius.common.checkpoint import (
    UnsafeCheckpointError,
    load_official_checkpoint,
    load_own_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from genius.common.distributed import init_distributed
from genius.feature_extraction import train_clip
from genius.feature_extraction.clip_model import build_clip, load_clip, model_config, own_checkpoint, read_clip_checkpoint
from genius.feature_extraction.encoders import EncoderConfig, build_encoder

OPEN = re.escape(f"'{open.__module__}.open'")  # how pickle names the builtin open


class Planted:
    """Unpickling this creates ``marker``: a stand-in for any code a malicious checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture
def planted(tmp_path):
    """(write(path): a checkpoint-shaped file with the planted object inside, marker path)."""
    marker = tmp_path / "MARKER"

    def write(path: Path, **entries) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {"w": torch.zeros(2)}, **entries, "config": Planted(marker)}, path)
        return path

    yield write, marker
    assert not marker.exists(), "a planted pickle ran code"


def refused(path: Path):
    """The one-line refusal naming the file and the object it wanted."""
    return pytest.raises(UnsafeCheckpointError, match=rf"^{re.escape(str(path))}: refused to load: it needs the "
                                                      rf"Python object {OPEN}, which is not one of the allowed "
                                                      r"checkpoint contents \([^)]*\); this file could run code")


# ---- stage 0 ---------------------------------------------------------------------------------
def test_extract_encoder_checkpoint(planted, tmp_path):
    write, _ = planted
    path = write(tmp_path / "clip_sf_large.pth")
    with refused(path) as err:
        build_encoder(EncoderConfig(checkpoint=str(path)), "cpu")
    assert "\n" not in str(err.value)


def test_extract_torchscript_archive_runs_nothing(planted, tmp_path, monkeypatch):
    """An OpenAI-style TorchScript archive is read without torch.jit.load, and its pickle is
    held to the same allow-list (TorchScript module classes become inert stand-ins)."""
    _, marker = planted
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load compiles the archive's code"))
    path = tmp_path / "ViT-L-14.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ViT-L-14/data.pkl", pickle.dumps(Planted(marker), protocol=2))
        archive.writestr("ViT-L-14/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("ViT-L-14/version", "3\n")
        archive.writestr("ViT-L-14/code/__torch__.py", f"open({str(marker)!r}, 'w')\n")
    with refused(path):
        read_clip_checkpoint(path)


def train_clip_config(tmp_path: Path, **model) -> train_clip.TrainClipConfig:
    data = tmp_path / "data"
    cfg = train_clip.TrainClipConfig(model=train_clip.ModelConfig(name="clip-sf-tiny", **model),
                                     runtime=train_clip.RuntimeConfig(device="cpu", num_workers=0))
    cfg.data.root, cfg.output.run_dir = str(data), str(tmp_path / "run")
    cfg.instructions.mode, cfg.optim.batch_size = "none", 1
    records = {"train_queries": {"qid": "1:1", "query_txt": "a dog", "query_img_path": None, "query_modality": "text",
                                 "pos_cand_list": ["1:1"], "neg_cand_list": [], "task_id": 1},
               "train_pool": {"did": "1:1", "txt": "a dog", "img_path": None, "modality": "text"}}
    for name, record in records.items():
        (data / getattr(cfg.data, name)).parent.mkdir(parents=True, exist_ok=True)
        (data / getattr(cfg.data, name)).write_text(json.dumps(record) + "\n")
    return cfg


def test_train_clip_init_checkpoint(planted, tmp_path):
    write, _ = planted
    path = write(tmp_path / "init.pth")
    with refused(path):
        train_clip.train(train_clip_config(tmp_path, init_checkpoint=str(path)))


def test_training_resume_reads_checkpoints_safely(planted, tmp_path):
    """train-clip, train-rq and train-gen all resume through ``common.training.resume_point``: a
    checkpoint in the run folder that needs more than plain data (an older version of this code
    pickled numpy objects) is never unpickled; its run is set aside in ``stale/`` and training
    starts afresh (the fixture asserts the planted object never ran)."""
    from genius.common import training
    from genius.common.runstate import RunKey, RunState

    write, _ = planted
    path = write(tmp_path / "checkpoints" / "epoch_0001.pt")
    run = RunState(tmp_path, RunKey({}, {}), training.run_outputs("x.pt"), stage="test")
    assert training.resume_point(run, init_distributed("cpu"), batch_key="train.batch_size",
                                 force_key="train.force") is None
    assert not path.exists()
    assert [p.name for p in (tmp_path / "stale").glob("*/checkpoints/*.pt")] == ["epoch_0001.pt"]


def test_a_checkpoint_from_an_older_version_is_set_aside_not_resumed(tmp_path):
    """A training checkpoint without the content digest (what this code wrote before digests)
    cannot be checked, so resuming sets its run aside instead of stopping or trusting it."""
    from genius.common import training
    from genius.common.runstate import RunKey, RunState

    path = tmp_path / "checkpoints" / "epoch_0003.pt"
    path.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, path)
    run = RunState(tmp_path, RunKey({}, {}), training.run_outputs("x.pt"), stage="test")
    assert training.resume_point(run, init_distributed("cpu"), batch_key="train.batch_size",
                                 force_key="train.force") is None
    assert [p.name for p in (tmp_path / "stale").glob("*/checkpoints/*.pt")] == ["epoch_0003.pt"]


# ---- stage 1 ---------------------------------------------------------------------------------
def test_official_rq(planted, tmp_path):
    from genius.models.residual_quantization.official import load_official_rq

    write, _ = planted
    path = write(tmp_path / "rq_clip_large.pth", epoch=20)
    with refused(path):
        load_official_rq(path)


def test_rq_pt_read_by_later_stages(planted, tmp_path):
    """rq.pt as train-gen, eval and search read it (``load_rq``, and the mmapped record)."""
    from genius.models.residual_quantization.model import load_rq, rq_record

    write, _ = planted
    path = write(tmp_path / "rq.pt", arch={}, fingerprint="0")
    with refused(path):
        load_rq(path)
    with refused(path):
        rq_record(path)


def test_assign_codes_quantizer(planted, tmp_path):
    from genius.models.residual_quantization.assign_codes import load_quantizer

    write, _ = planted
    path = write(tmp_path / "rq.pt", arch={}, fingerprint="0")
    with refused(path):
        load_quantizer(path)


# ---- stage 2 and search ----------------------------------------------------------------------
def test_official_generator(planted, tmp_path):
    from genius.models.generative_retriever.official import load_official_generator

    write, _ = planted
    path = write(tmp_path / "GENIUS_t5small.pth")
    with refused(path):
        load_official_generator(path)


def test_eval_generator(planted, tmp_path):
    from genius.models.generative_retriever.generator import load_generator

    write, _ = planted
    path = write(tmp_path / "generator.pt")
    with refused(path):
        load_generator(path)


def test_search_run_with_planted_generator(planted, tmp_path):
    """``genius search --run`` (and eval) load the run's models through ``load_models``."""
    from genius.models.generative_retriever.evaluate import EvalConfig, PathsConfig, load_models
    from genius.models.residual_quantization.model import RQModel, save_rq

    write, _ = planted
    save_rq(tmp_path / "rq" / "rq.pt", RQModel(8, 8, 8, num_levels=2, codebook_size=4), config={})
    path = write(tmp_path / "gen" / "generator.pt")
    cfg = EvalConfig(paths=PathsConfig(rq_run=str(tmp_path / "rq"), gen_run=str(tmp_path / "gen")))
    with refused(path):
        load_models(cfg, torch.device("cpu"))


def test_a_raw_pickle_is_refused_too(planted, tmp_path):
    """Not a torch.save zip: torch's legacy reader, same allow-list, a message without the name."""
    _, marker = planted
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(Planted(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=rf"^{re.escape(str(path))}: refused to load: .*could run code"):
        load_official_checkpoint(path)


# ---- what does load ---------------------------------------------------------------------------
OFFICIAL_YAML = """
experiment: {instruct_status: Instruct, exp_name: InBatch, description: null}
model:
  name: CLIPScoreFusion
  short_name: clip_sf_large
  clip_vision_model_name: ViT-L/14
  ckpt_config: {ckpt_dir: checkpoint/CLIP_SF, ckpt_name: clip_sf_large.pth, resume_training: false}
data_config:
  image_size: 224, 224
  enable_query_instruct: true
  shuffle_cand: true
  in_batch_neg_num: 0
  train_query_data_path: M-BEIR/query/union_train/mbeir_union_up_train.jsonl
dataloader_config: {num_workers: 5, train_batch_size: 105, valid_batch_size: 1024}
trainer_config: {gradient_accumulation_steps: 1, learning_rate: 1.0e-05, warmup_steps: 0, num_train_epochs: 20}
evaluator: {enable_eval: true, eval_freq: 1, print_freq: 10, datasets: [mscoco, cirr], tasks: [0, 3, 7]}
dist_config: {dist_url: env://}
seed: 2023
"""


def official_like(path: Path, state: dict) -> None:
    """A file laid out like clip_sf_large.pth / rq_clip_large.pth: the state dict beside the AdamW,
    cosine-schedule and GradScaler states and the run's config as a real pickled OmegaConf DictConfig."""
    omegaconf = pytest.importorskip("omegaconf")
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "weight_decay": 0.2}, {"params": params[1:], "weight_decay": 0}])
    (params[0].sum() + params[1].sum()).backward()
    optimizer.step()
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    lam = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    config = omegaconf.OmegaConf.create(OFFICIAL_YAML)
    config.dist_config.gpu_id = 0  # UniIR sets run-time values on the loaded config
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "scheduler": cosine.state_dict(),
                "lambda_scheduler": lam.state_dict(), "config": config, "epoch": 19,
                "scaler": scaler.state_dict()}, path)


def test_official_file_with_real_omegaconf_config_loads(tmp_path):
    torch.manual_seed(0)
    source = build_clip(model_config("clip-sf-tiny"))
    state = {f"clip_model.{k}": v for k, v in source.state_dict().items()}
    official_like(tmp_path / "clip_sf_large.pth", state)
    with pytest.raises(pickle.UnpicklingError):  # torch's default refuses the config ...
        torch.load(tmp_path / "clip_sf_large.pth", weights_only=True)
    loaded = load_official_checkpoint(tmp_path / "clip_sf_large.pth")  # ... our allow-list reads it
    assert loaded["epoch"] == 19 and loaded["scaler"]["scale"] == 65536.0
    assert loaded["optimizer"]["param_groups"][0]["weight_decay"] == 0.2 and len(loaded["optimizer"]["state"]) == 2
    assert loaded["scheduler"]["T_max"] == 100 and loaded["lambda_scheduler"]["lr_lambdas"] == [None, None]
    assert not type(loaded["config"]).__module__.startswith("omegaconf")  # an inert stand-in
    assert all(torch.equal(loaded["model"][k], v) for k, v in state.items())
    model, name, _ = load_clip(tmp_path / "clip_sf_large.pth", "clip-sf-tiny")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_own_checkpoints_round_trip_with_weights_only(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.98))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # numpy now holds a cached Gaussian, which must survive too
    path = save_training_checkpoint(tmp_path, 0, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": [rng_state()], "inputs": {"config": {"lr": 1e-4, "betas": (0.9, 0.98)}}})
    expected = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    state = torch.load(path, weights_only=True)  # torch's default reader, no allow-list needed
    assert load_own_checkpoint(path)["inputs"] == {"config": {"lr": 1e-4, "betas": (0.9, 0.98)}}
    set_rng_state(state["rng"][0])
    again = (random.random(), np.random.normal(), np.random.randint(1 << 30), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])
    cfg = model_config("clip-sf-tiny")
    torch.save(own_checkpoint(build_clip(cfg), "clip-sf-tiny", cfg, inputs={"files": {}}), tmp_path / "clip_sf.pt")
    assert torch.load(tmp_path / "clip_sf.pt", weights_only=True)["model_name"] == "clip-sf-tiny"


def test_an_old_checkpoint_with_numpy_state_gets_one_line_advice(tmp_path):
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, tmp_path / "epoch_0001.pt")
    with pytest.raises(UnsafeCheckpointError, match="numpy") as err:
        load_own_checkpoint(tmp_path / "epoch_0001.pt")
    message = str(err.value)
    assert "\n" not in message and message.endswith("delete it and re-run the stage that writes it")


# ---- damaged pickles and the wrong stage's checkpoint -----------------------------------------
def zip_with_pickle(path: Path, data_pkl: bytes) -> Path:
    """A torch.save-style zip whose data.pkl is ``data_pkl`` (hand-made opcodes)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/byteorder", "little")
    return path


@pytest.mark.parametrize("opcodes", [
    b"\x80\x02R.",  # REDUCE on an empty stack: the unpickler's IndexError
    b"\x80\x02}]]s.",  # a list as a dict key: TypeError (unhashable)
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.",  # an allowed global with the wrong arguments: TypeError
    # an official file's stand-in given arguments: TypeError (our own loader refuses the global itself)
    b"\x80\x02comegaconf.dictconfig\nDictConfig\n(K\x01K\x02tR.",
])
def test_a_damaged_pickle_is_one_line_naming_the_file(tmp_path, opcodes):
    from genius.common.checkpoint import CorruptCheckpointError

    path = zip_with_pickle(tmp_path / "damaged.pt", opcodes)
    official_only = b"omegaconf" in opcodes
    for load in (load_official_checkpoint,) if official_only else (load_own_checkpoint, load_official_checkpoint):
        with pytest.raises(CorruptCheckpointError, match=rf"^{re.escape(str(path))}: cannot be read: the file is "
                                                         "truncated, corrupt or not a PyTorch checkpoint"):
            load(path)


def test_another_stages_checkpoint_is_named_for_what_it_is(tmp_path):
    from genius.common.checkpoint import CheckpointMismatchError, save_own_checkpoint
    from genius.models.generative_retriever.generator import load_generator
    from genius.models.residual_quantization.model import load_rq

    rq_like = save_own_checkpoint({"model": {}, "arch": {"num_levels": 3}, "fingerprint": "x"}, tmp_path / "rq.pt")
    gen_like = tmp_path / "generator.pt"
    save_own_checkpoint({"model": {}, "arch": {"d_model": 8}, "fingerprint": "y"}, gen_like)
    assert rq_like
    with pytest.raises(CheckpointMismatchError, match=r"generator.pt: this is a generator.pt \(genius train-gen\), "
                                                      r"not an rq.pt \(genius train-rq\) as expected here"):
        load_rq(gen_like)
    with pytest.raises(CheckpointMismatchError, match=r"rq.pt: this is an rq.pt \(genius train-rq\), not a "
                                                      r"generator.pt \(genius train-gen\)"):
        load_generator(tmp_path / "rq.pt")


def test_a_checkpoint_cut_short_is_one_line_naming_the_file_also_when_mapped(tmp_path):
    """Mapping a file cut short fails inside torch with EINVAL ('Invalid argument', naming nothing);
    read or mapped, it is the file's one line, and the detail is the cause, not torch's paragraph
    suggesting weights_only=False."""
    from genius.common.checkpoint import CorruptCheckpointError, save_own_checkpoint
    from genius.models.residual_quantization.model import rq_fingerprint

    whole = tmp_path / "whole.pt"
    save_own_checkpoint({"model": {"w": torch.randn(20_000)}, "arch": {"num_levels": 3}, "fingerprint": "x"}, whole)
    cut = tmp_path / "rq.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])
    for load in (rq_fingerprint, load_own_checkpoint):
        with pytest.raises(CorruptCheckpointError, match=rf"^{re.escape(str(cut))}: cannot be read: the file is "
                                                         "truncated, corrupt or not a PyTorch checkpoint"):
            load(cut)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"w": 1}, protocol=4))  # torch warns about the protocol before failing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CorruptCheckpointError) as refused:
            load_own_checkpoint(legacy)
    assert "weights_only" not in str(refused.value) and "Unsupported operand" in str(refused.value)
