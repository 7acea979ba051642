"""Stage 2: vocabulary, the ID generator, query-target mixing, training (learning, resume) and
loading the official checkpoint layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genius.common import cpu, fp_env
from genius.common.checkpoint import CheckpointMismatchError
from genius.common.config import load_config
from genius.common.mbeir import MODALITY_CODE
from genius.common.store import StoreArrays, store_path, write_store
from genius.models.generative_retriever import official, train as train_gen
from genius.models.generative_retriever.generator import (
    IDGenerator, generator_fingerprint, load_generator, make_arch, save_generator, t5_config,
)
from genius.models.generative_retriever.mixing import mix_query_target, sample_mixing_weights
from genius.models.generative_retriever.vocab import code_offsets, codes_to_tokens, tokens_to_codes, vocab_size
from genius.models.residual_quantization.model import RQModel, load_rq, rq_fingerprint, save_rq

REPO = Path(__file__).resolve().parent.parent

PAPER_SIZES = [3] + [4096] * 8


def tiny_arch(sizes=(3, 8, 8), dim=12) -> dict:
    return make_arch(dim, list(sizes), num_prefix=4, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_decoder_layers=2)


# ---- vocabulary -----------------------------------------------------------------------------
def test_vocabulary_matches_the_official_token_ids():
    assert vocab_size(PAPER_SIZES) == 32774
    assert code_offsets(PAPER_SIZES)[:3] == [3, 6, 6 + 4096]
    codes = torch.tensor([[2, 0, 4095, 0, 0, 0, 0, 0, 7]])
    tokens = codes_to_tokens(codes, PAPER_SIZES)
    assert tokens[0, :3].tolist() == [5, 6, 6 + 2 * 4096 - 1]
    assert tokens[0, 8] == 6 + 7 * 4096 + 7 == 32774 - 4096 + 7
    assert torch.equal(tokens_to_codes(tokens, PAPER_SIZES), codes)
    with pytest.raises(ValueError, match="out of range"):
        codes_to_tokens(torch.tensor([[3, 0, 0, 0, 0, 0, 0, 0, 0]]), PAPER_SIZES)
    with pytest.raises(ValueError, match="wrong level"):
        tokens_to_codes(torch.tensor([[6, 6, 6, 6, 6, 6, 6, 6, 6]]), PAPER_SIZES)


# ---- the generator --------------------------------------------------------------------------
def test_paper_shaped_generator_has_t5_small_shapes_and_the_official_parameter_count():
    arch = make_arch(768, PAPER_SIZES)
    config = t5_config(arch)
    assert (config.d_model, config.num_heads, config.d_kv, config.d_ff) == (512, 8, 64, 2048)
    assert (config.num_layers, config.num_decoder_layers, config.vocab_size) == (0, 6, 32774)
    assert (config.decoder_start_token_id, config.pad_token_id, config.eos_token_id) == (0, 0, 1)
    with torch.device("meta"):  # shapes only, no memory or init time
        generator = IDGenerator(arch)
    assert len(generator.t5.encoder.block) == 0 and len(generator.t5.decoder.block) == 6
    assert generator.embed_projector.weight.shape == (30 * 512, 768) and generator.embed_projector.bias is not None
    # 53.8 M distinct trainable parameters, as in the official layout notes.
    assert sum(p.numel() for p in generator.parameters()) == 53_768_448


def test_tied_code_embeddings_are_a_linear_image_of_the_normalised_codewords():
    torch.manual_seed(0)
    arch = tiny_arch(sizes=(3, 20, 20))
    generator = IDGenerator(arch)
    t5 = generator.t5
    assert t5.shared.weight is t5.lm_head.weight is t5.decoder.embed_tokens.weight is t5.encoder.embed_tokens.weight
    specials = t5.shared.weight[:3].clone()
    codebooks = [torch.randn(k, 12) * 3 for k in (3, 20, 20)]
    generator.init_code_embeddings(codebooks, scale=100.0)
    rows = t5.shared.weight[3:].detach()
    x = F.normalize(torch.cat(codebooks), dim=-1)
    # One bias-free W for all levels: rows = 100 * x W^T exactly (least squares leaves no residual).
    w = torch.linalg.lstsq(x.double(), rows.double() / 100).solution
    assert torch.allclose((x.double() @ w) * 100, rows.double(), atol=1e-3)
    assert torch.equal(t5.shared.weight[:3], specials)


def test_level_log_softmax_flushes_subnormal_exponentials_to_the_same_numbers(record_subnormal_mode):
    torch.manual_seed(0)
    generator = IDGenerator(tiny_arch(sizes=(3, 512, 512))).eval()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # states scaled so that the logits spread past 87: some exponentials are subnormal
        hidden = torch.randn(4096, 32) * 200
        with torch.no_grad():
            lo = generator.offsets[1]
            expected = F.log_softmax(generator.head_logits(hidden, slice(lo, lo + 512)), dim=-1)
            assert ((expected.exp() > 0) & (expected.exp() < torch.finfo(torch.float32).tiny)).any()
            flushing = record_subnormal_mode(torch, "log_softmax")
            log_probs = generator.level_log_probs(hidden, 1, level_head=True)
        assert flushing == [True]  # every thread flushed while it ran
        assert torch.equal(log_probs, expected)  # bit for bit: a subnormal term cannot move a sum >= 1
        assert fp_env.flushing_threads() == 0  # and the mode is given back
    finally:
        torch.set_num_threads(before)


def test_teacher_forcing_starts_from_pad_and_is_causal():
    torch.manual_seed(1)
    generator = IDGenerator(tiny_arch()).eval()
    z = F.normalize(torch.randn(2, 12), dim=-1)
    codes = torch.tensor([[0, 3, 5], [2, 7, 1]])
    logits = generator(z, codes)
    assert logits.shape == (2, 3, vocab_size([3, 8, 8]))
    assert generator.prefix(z).shape == (2, 4, 32)
    changed = codes.clone()
    changed[:, 2] = 0  # the last code is a label only, never an input (no EOS follows it)
    assert torch.equal(generator(z, changed), logits)
    changed[:, 1] = 0
    assert torch.equal(generator(z, changed)[:, :2], logits[:, :2])
    assert not torch.equal(generator(z, changed)[:, 2], logits[:, 2])


def test_generator_file_round_trip_and_pretrained_t5(tmp_path):
    torch.manual_seed(2)
    generator = IDGenerator(tiny_arch())
    fingerprint = save_generator(tmp_path / "generator.pt", generator, {"x": 1}, rq_fingerprint="abc")
    loaded, meta = load_generator(tmp_path / "generator.pt")
    assert meta == {"arch": generator.arch, "config": {"x": 1}, "rq": "abc", "fingerprint": fingerprint}
    assert not loaded.training and generator_fingerprint(tmp_path / "generator.pt") == fingerprint
    assert all(torch.equal(a, b) for a, b in zip(generator.state_dict().values(), loaded.state_dict().values()))
    assert loaded.t5.shared.weight is loaded.t5.lm_head.weight

    from transformers import T5Config, T5ForConditionalGeneration

    from genius.models.generative_retriever.train import ModelConfig, new_generator

    pretrained = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=24, d_kv=6, d_ff=40, num_heads=4,
                                                     num_layers=2, num_decoder_layers=3))
    pretrained.save_pretrained(tmp_path / "t5")
    rq = RQModel(12, 16, 16, num_levels=3, codebook_size=8)
    built = new_generator(ModelConfig(pretrained=str(tmp_path / "t5")), rq)
    assert (built.arch["d_model"], built.arch["num_decoder_layers"], built.arch["d_kv"]) == (24, 3, 6)
    assert len(built.t5.encoder.block) == 0 and built.t5.shared.weight.shape == (vocab_size([3, 8, 8]), 24)
    assert built.t5.lm_head.weight is built.t5.shared.weight and built.t5.config.decoder_start_token_id == 0
    block = "decoder.block.2.layer.2.DenseReluDense.wo.weight"
    assert torch.equal(built.t5.state_dict()[block], pretrained.state_dict()[block])


# ---- mixing ---------------------------------------------------------------------------------
def test_mixing_weights_follow_beta_2_2_per_sample_and_dimension():
    torch.manual_seed(3)
    s = sample_mixing_weights(torch.Size([4000, 64]), alpha=2.0)
    # Beta(2, 2): mean 1/2, variance 1/20; 256k draws give standard errors ~1e-3 (mean), ~1.5e-4 (var).
    assert abs(s.mean().item() - 0.5) < 5e-3
    assert abs(s.var().item() - 0.05) < 1e-3
    assert s.min() > 0 and s.max() < 1
    # Independent per dimension: the correlation between two dimensions is ~0 (SE 1/sqrt(4000)).
    assert abs(np.corrcoef(s[:, 0].numpy(), s[:, 1].numpy())[0, 1]) < 0.06

    z_q = F.normalize(torch.randn(8, 64), dim=-1)
    z_c = F.normalize(torch.randn(8, 64), dim=-1)
    torch.manual_seed(4)
    mixed = mix_query_target(z_q, z_c, alpha=2.0)
    torch.manual_seed(4)
    s = sample_mixing_weights(z_q.shape, alpha=2.0)
    assert torch.allclose(mixed, F.normalize(s.sqrt() * z_q + (1 - s).sqrt() * z_c, dim=-1))  # sqrt weights
    assert torch.allclose(mixed.norm(dim=-1), torch.ones(8))
    assert (F.cosine_similarity(mixed, z_q) > 0.3).all() and (F.cosine_similarity(mixed, z_c) > 0.3).all()
    assert mix_query_target(z_q, z_c, enabled=False) is z_q  # off: the plain query


# ---- training -------------------------------------------------------------------------------
DIM, K, LEVELS = 16, 16, 3


def write_world(root: Path, n_cands: int = 256, queries_per_cand: int = 2, seed: int = 0) -> dict:
    """Query/candidate stores, jsonl files and a real stage-1 rq.pt fitted to the candidates.

    Candidates are image vectors around 16 cluster centres; a query is its positive plus noise.
    Returns held-out queries (fresh noise) with their positives' rows for evaluation.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((K, DIM)) * 2
    cands = centres[rng.integers(0, K, n_cands)] + rng.standard_normal((n_cands, DIM)) * 0.6
    pos = np.repeat(np.arange(n_cands), queries_per_cand)
    qvecs = cands[pos] + rng.standard_normal((len(pos), DIM)) * 0.2
    data = root / "data"
    (data / "query").mkdir(parents=True)
    (data / "pool").mkdir()
    did = [f"20:{i}" for i in range(n_cands)]
    (data / "pool/pool.jsonl").write_text("".join(
        json.dumps({"did": d, "img_path": f"{d}.png", "txt": None, "modality": "image"}) + "\n" for d in did))
    (data / "query/train.jsonl").write_text("".join(json.dumps(
        {"qid": f"20:{i}", "query_img_path": "q.png", "query_modality": "image", "pos_cand_list": [did[p]],
         "task_id": 4}) + "\n" for i, p in enumerate(pos)))

    def arrays(ids, vecs):
        n = len(ids)
        image = np.full(n, MODALITY_CODE["image"], np.int8)
        return StoreArrays(ids=np.asarray(ids), img=vecs, txt=np.zeros_like(vecs), img_mask=np.ones(n, np.uint8),
                           txt_mask=np.zeros(n, np.uint8), modality=image, target_modality=image)

    embed = root / "embed"
    write_store(store_path(embed, "enc", "train", "pool.jsonl"), arrays(10_000_000 * 20 + np.arange(n_cands), cands),
                encoder="enc", kind="candidate", source=data / "pool/pool.jsonl")
    write_store(store_path(embed, "enc", "train", "train.jsonl"), arrays(500_000 * 20 + np.arange(len(pos)), qvecs),
                encoder="enc", kind="query", source=data / "query/train.jsonl")
    torch.manual_seed(seed)
    rq = RQModel(DIM, 32, 32, num_levels=LEVELS, codebook_size=K)
    with torch.no_grad():
        z = rq.embed(*(torch.from_numpy(a).float() for a in (cands, np.zeros_like(cands))),
                     torch.ones(n_cands), torch.zeros(n_cands))
    rq.quantizer.initialise(z, torch.zeros(n_cands, dtype=torch.long), kmeans_iters=30,
                            generator=torch.Generator().manual_seed(seed))
    save_rq(root / "rq.pt", rq, config={}, inputs={})
    held_out = cands + rng.standard_normal(cands.shape) * 0.2
    return {"cands": cands, "held_out": held_out}


def gen_config(root: Path, out: str, **train_overrides) -> train_gen.TrainGenConfig:
    """A tiny run. The code-embedding scale keeps the paper's initial logit spread: the random
    projection's rows grow like 1/sqrt(dim), so x100 at dim 768 is about x15 at dim 16."""
    overrides = [f"data.root={root / 'data'}", f"data.embed_root={root / 'embed'}", "data.encoder=enc",
                 "data.train_queries=query/train.jsonl", "data.train_pool=pool/pool.jsonl", f"data.rq={root / 'rq.pt'}",
                 f"out_dir={root / out}", "model.d_model=32", "model.num_heads=2", "model.d_kv=16", "model.d_ff=64",
                 "model.num_decoder_layers=2", "model.num_prefix=4", "model.code_embedding_scale=15.0",
                 "optim.lr=0.005", "optim.warmup_steps=10",
                 "train.batch_size=32", "train.device=cpu", "train.log_every=4"]
    overrides += [f"train.{key}={value}" for key, value in train_overrides.items()]
    return load_config(train_gen.TrainGenConfig, None, overrides)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_world")
    return root, write_world(root)


def test_tiny_generator_learns_the_first_semantic_level(world):
    root, data = world
    cfg = gen_config(root, "learn", epochs=8)
    path = train_gen.train(cfg)
    generator, meta = load_generator(path)
    rq = load_rq(root / "rq.pt")
    assert meta["rq"] == rq_fingerprint(root / "rq.pt") and meta["config"]["train"]["epochs"] == 8
    # Teacher-forced accuracy on held-out queries (fresh noise), the plain query as input.
    n = len(data["cands"])

    def z_of(vecs):
        return rq.embed(torch.from_numpy(vecs).float(), torch.zeros(n, DIM), torch.ones(n), torch.zeros(n))

    with torch.no_grad():
        target = rq.encode(z_of(data["cands"]), torch.zeros(n, dtype=torch.long))
        logits = generator(z_of(data["held_out"]), target)
    hits = logits.argmax(-1) == codes_to_tokens(target, rq.codebook_sizes)
    level1 = hits[:, 1].float().mean().item()
    # Chance is 1/K = 0.0625; the most frequent code alone would give the largest code share.
    majority = np.bincount(target[:, 1].numpy(), minlength=K).max() / n
    assert level1 > max(0.8, 4 * majority), (level1, majority)
    assert hits[:, 0].all()  # level 0: the single modality

    records = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in records])
    assert len(records) == 128 // 4 and len(records[-1]["level_acc"]) == LEVELS
    chunks = losses.reshape(4, -1).mean(axis=1)  # smoothed: means over 4 consecutive windows of 4 logs
    assert (np.diff(chunks) < 0).all(), chunks
    assert (path.parent / "config.yaml").is_file() and (path.parent / "done.json").is_file()


def test_training_steps_run_with_subnormals_flushed_and_fp32_products_in_onednn_where_wanted(
        world, record_subnormal_mode, record_fp32_library, monkeypatch):
    root, _ = world
    before = torch.backends.mkldnn.matmul.fp32_precision
    flushing = record_subnormal_mode(train_gen, "train_step")
    library = record_fp32_library(train_gen, "train_step")
    monkeypatch.setattr(cpu, "onednn_fp32_on", lambda: True)  # as on an AMD CPU with AVX-512
    train_gen.train(gen_config(root, "flushed", epochs=1))
    assert len(flushing) == 16 and all(flushing)
    assert library == ["bf16"] * 16  # torch's switch that sends fp32 products to oneDNN
    assert fp_env.flushing_threads() == 0 and torch.backends.mkldnn.matmul.fp32_precision == before  # given back


def test_killed_run_resumes_to_the_same_weights(world, monkeypatch):
    root, _ = world
    reference = train_gen.train(gen_config(root, "straight", epochs=3))

    real_step, calls = train_gen.train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 16 + 5:  # in the middle of the third epoch (16 steps per epoch)
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_gen, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_gen.train(gen_config(root, "killed", epochs=3))
    assert not (root / "killed/generator.pt").exists()
    assert sorted(p.name for p in (root / "killed/checkpoints").iterdir()) == ["epoch_0000.pt", "epoch_0001.pt"]
    monkeypatch.setattr(train_gen, "train_step", real_step)
    resumed = train_gen.train(gen_config(root, "killed", epochs=3))
    a, b = torch.load(reference)["model"], torch.load(resumed)["model"]
    # Same seed, same batches, restored optimizer/scheduler/RNG: bit-identical on the CPU.
    assert all(torch.equal(a[name], b[name]) for name in a)
    steps = [json.loads(line)["step"] for line in (root / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 48  # the crashed attempt's lines were dropped

    # A finished run with the same config and inputs is skipped, not retrained.
    before = resumed.stat().st_mtime_ns
    monkeypatch.setattr(train_gen, "train_step", crashing_step)
    train_gen.train(gen_config(root, "killed", epochs=3))
    assert resumed.stat().st_mtime_ns == before


def test_checkpoints_of_another_config_are_set_aside_not_resumed(world):
    root, _ = world
    train_gen.train(gen_config(root, "changed", epochs=2))
    # A finished run, then the YAML changes (a different learning rate): the old checkpoints must
    # neither be resumed nor block training. The new weights equal a run in an empty folder.
    changed = gen_config(root, "changed", epochs=2)
    changed.optim.lr = 0.002
    path = train_gen.train(changed)
    fresh = gen_config(root, "fresh", epochs=2)
    fresh.optim.lr = 0.002
    reference = torch.load(train_gen.train(fresh))["model"]
    weights = torch.load(path)["model"]
    assert all(torch.equal(weights[name], reference[name]) for name in reference)
    (stale,) = (root / "changed" / "stale").iterdir()
    assert {"generator.pt", "checkpoints", "done.json"} <= {p.name for p in stale.iterdir()}
    # Logging cadence is not part of the run: changing it neither retrains nor sets anything aside.
    before = path.stat().st_mtime_ns
    relogged = gen_config(root, "changed", epochs=2, log_every=2)
    relogged.optim.lr = 0.002
    train_gen.train(relogged)
    assert path.stat().st_mtime_ns == before and len(list((root / "changed" / "stale").iterdir())) == 1


def test_setting_yamls_load_and_large_has_the_paper_settings():
    configs = {s: load_config(train_gen.TrainGenConfig, REPO / f"configs_scripts/{s}/train_gen.yaml")
               for s in ("tiny", "demo", "large")}
    large = configs["large"]
    assert (large.train.batch_size, large.train.epochs, large.model.num_prefix) == (256, 31, 30)
    assert (large.model.d_model, large.model.num_decoder_layers, large.model.d_ff) == (512, 6, 2048)
    optim = large.optim
    assert (optim.lr, optim.betas, optim.warmup_steps, large.mixing.alpha) == (1e-4, [0.9, 0.98], 500, 2.0)
    assert {s: c.data.encoder for s, c in configs.items()} == {"tiny": "clip_sf_tiny", "demo": "clip_sf_demo",
                                                              "large": "CLIP_SF"}
    for setting, cfg in configs.items():
        assert cfg.out_dir == f"checkpoint/{setting}/gen" and cfg.data.rq == f"checkpoint/{setting}/rq/rq.pt"
    with pytest.raises(Exception, match="mixing.alpah"):
        load_config(train_gen.TrainGenConfig, None, ["mixing.alpah=2"])


# ---- the official checkpoint ----------------------------------------------------------------
# The real file is ~0.6 GB (T5 + a full-width quantizer), too big to fabricate in a 2-core test,
# so the test writes the layout's exact key set with every width scaled down (same names, same
# relative structure): 512 -> 16 (d_model; 8 heads -> 2 of 8 dims), 768 -> 8, 2048 -> 32,
# 4096 -> 4 codes (vocab 32774 -> 38), Combiner 2560/5120 -> 12/24, prefix 30 x 16.
SMALL = {512: 16, 768: 8, 2048: 32, 4096: 4, 32774: 3 + 3 + 8 * 4, 15360: 30 * 16, 2560: 12, 5120: 24}


def small_official_state(layout: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, spec in layout["tensors"].items():
        shape = [SMALL.get(d, d) for d in spec["shape"]]
        if name.endswith("relative_attention_bias.weight"):
            shape = [32, 2]
        if "same_tensor_as" in spec and any(other in state for other in spec["same_tensor_as"]):
            state[name] = state[next(o for o in spec["same_tensor_as"] if o in state)]
            continue
        state[name] = torch.randn(shape, generator=gen)
    for level in range(9):  # codebooks hold real (finite) statistics; initted is a float flag
        state[f"quantizer.residual_rq.layers.{level}._codebook.initted"].fill_(1.0)
        state[f"quantizer.residual_rq.layers.{level}._codebook.cluster_size"].abs_()
    return state


@pytest.fixture(scope="module")
def layout(shared_data):
    path = shared_data / "official_checkpoint_layouts/GENIUS_t5small.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


def test_our_generator_has_exactly_the_official_names_and_shapes(layout):
    with torch.device("meta"):
        generator = IDGenerator(make_arch(768, PAPER_SIZES))
    ours = {official.to_official_name(n): list(t.shape) for n, t in generator.state_dict().items()}
    theirs = {n: spec["shape"] for n, spec in layout["tensors"].items() if not n.startswith("quantizer.")}
    assert ours == theirs


def test_official_layout_checkpoint_loads_strictly(layout, tmp_path):
    state = small_official_state(layout)
    state["contra_projector.weight"] = torch.zeros(16, 8)  # a known legacy extra: ignored
    torch.save({"model": state, "optimizer": {}, "epoch": 30}, tmp_path / "GENIUS_t5small.pth")
    generator, rq = official.load_official_generator(tmp_path / "GENIUS_t5small.pth")
    assert generator.codebook_sizes == rq.codebook_sizes == [3] + [4] * 8
    assert generator.arch["num_prefix"] == 30 and generator.arch["d_model"] == 16
    assert torch.equal(generator.t5.lm_head.weight, state["id_generator.shared.weight"])
    assert generator.t5.lm_head.weight is generator.t5.shared.weight
    assert torch.equal(generator.embed_projector.bias, state["embed_projector.0.bias"])
    assert torch.equal(rq.codebooks()[3], state["quantizer.residual_rq.layers.3._codebook.embed"][0])
    block = "decoder.block.5.layer.1.EncDecAttention.v.weight"
    assert torch.equal(generator.t5.state_dict()[block], state[f"id_generator.{block}"])
    z = F.normalize(torch.randn(2, 8), dim=-1)
    assert generator(z, torch.zeros(2, 9, dtype=torch.long)).shape == (2, 9, 38)


def test_official_checkpoint_mismatches_name_the_tensor(layout, tmp_path):
    state = small_official_state(layout)
    broken_quantizer = {k: v for k, v in state.items() if k != "quantizer.residual_rq.layers.2._codebook.embed_avg"}
    torch.save({"model": broken_quantizer}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match=r"quantizer\.\* part(.|\n)*layers\.2\._codebook\.embed_avg"):
        official.load_official_generator(tmp_path / "broken.pth")
    generator_state, quantizer_state = official.split_official_state(state)
    sizes = official.official_codebook_sizes(quantizer_state)
    broken = dict(generator_state)
    broken["id_generator.decoder.block.3.layer.2.DenseReluDense.wi.weight"] = torch.zeros(33, 16)
    with pytest.raises(CheckpointMismatchError, match=r"block\.3\.layer\.2\.DenseReluDense\.wi\.weight"):
        official.generator_from_official_state(broken, sizes)
    missing = {k: v for k, v in generator_state.items() if k != "embed_projector.0.bias"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): embed_projector\.0\.bias"):
        official.generator_from_official_state(missing, sizes)
    untied = dict(generator_state, **{"id_generator.lm_head.weight": generator_state["id_generator.shared.weight"] + 1})
    with pytest.raises(CheckpointMismatchError, match=r"tied embeddings differ .*id_generator\.lm_head\.weight"):
        official.generator_from_official_state(untied, sizes)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        official.generator_from_official_state(dict(generator_state, **{"id_generator.extra": torch.zeros(1)}), sizes)


def test_a_damaged_pretrained_t5_folder_is_named(tmp_path):
    from transformers import T5Config

    from genius.models.generative_retriever.generator import load_pretrained_t5

    T5Config(d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, vocab_size=32).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # cut short
    with pytest.raises(ValueError, match=rf"model.pretrained: {tmp_path}: not a loadable T5 folder"):
        load_pretrained_t5(tmp_path, {"codebook_sizes": [3, 4]})
