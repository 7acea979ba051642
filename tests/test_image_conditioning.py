"""Stage 2/3 with ``model.condition: image_tokens`` (IRGen's decoder): the generator reads the query
image's tokens from a CLIP-SF vision tower. Its arch round trip, the tokens it reads, the lr
groups and the frozen tower, label smoothing, the config's cross-field errors, and learning: a
tiny generator trained through genius train-gen on coloured-square classes generates its held-out
queries' class, teacher-forced and under the trie."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genius.common.checkpoint import save_own_checkpoint
from genius.common.config import load_config
from genius.common.mbeir import MODALITY_CODE
from genius.common.store import EmbeddingStore, StoreArrays, store_path, write_store
from genius.feature_extraction.clip_model import build_clip, load_clip, model_config, own_checkpoint
from genius.models.generative_retriever import train as train_gen
from genius.models.generative_retriever.beam_search import constrained_beam_search
from genius.models.generative_retriever.decode_cache import decode_rows
from genius.models.generative_retriever.generator import load_generator, save_generator
from genius.models.generative_retriever.query_images import QueryImages, query_image_paths
from genius.models.generative_retriever.retrieval import beams_as_arrays
from genius.models.generative_retriever.run_models import Models
from genius.models.generative_retriever.vocab import code_offsets, codes_to_tokens
from genius.models.residual_quantization.model import RQModel, load_rq, save_rq
from genius.trie_cpp.python_trie import PythonTrie

CLASSES, PER_CLASS, SIZE, DIM, K = 4, 24, 32, 16, 8
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 80, 235), (235, 220, 40)]


def class_image(cls: int, rng: np.random.Generator) -> Image.Image:
    """A square of the class's colour (jittered) at a random place and size on a noisy dark ground."""
    pixels = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.int64)
    side = int(rng.integers(8, 14))
    top, left = rng.integers(0, SIZE - side, 2)
    pixels[top:top + side, left:left + side] = np.clip(np.array(COLOURS[cls]) + rng.integers(-25, 26, 3), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def write_images(folder: Path, per_class: int, seed: int) -> tuple[list[str], np.ndarray]:
    """PNG files under folder/<class>/; returns their paths relative to folder's parent and classes."""
    rng = np.random.default_rng(seed)
    paths, classes = [], []
    for cls in range(CLASSES):
        (folder / str(cls)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(cls, rng).save(folder / str(cls) / f"{i:03d}.png")
            paths.append(f"{folder.name}/{cls}/{i:03d}.png")
            classes.append(cls)
    return paths, np.array(classes)


def store_arrays(ids: np.ndarray, vecs: np.ndarray) -> StoreArrays:
    n = len(ids)
    image = np.full(n, MODALITY_CODE["image"], np.int8)
    return StoreArrays(ids=ids, img=vecs.astype(np.float32), txt=np.zeros_like(vecs, np.float32),
                       img_mask=np.ones(n, np.uint8), txt_mask=np.zeros(n, np.uint8), modality=image,
                       target_modality=image)


def class_rq(cand_vecs: np.ndarray, classes: np.ndarray) -> RQModel:
    """A stage-1 model whose first semantic code of a candidate is its class: level 1's codewords
    are the class means of the residuals (codes beyond the classes far away), level 2 from k-means."""
    torch.manual_seed(0)
    rq = RQModel(DIM, 32, 32, num_levels=3, codebook_size=K)
    n = len(cand_vecs)
    image = torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        z = rq.embed(torch.from_numpy(cand_vecs).float(), torch.zeros(n, DIM), torch.ones(n), torch.zeros(n))
        rq.quantizer.initialise(z, image, kmeans_iters=10, generator=torch.Generator().manual_seed(0))
        residual = z - rq.quantizer.levels[0].embed[image]
        words = torch.full((K, DIM), 100.0)
        words[:CLASSES] = torch.stack([residual[torch.from_numpy(classes == c)].mean(0) for c in range(CLASSES)])
        counts = torch.ones(K)
        rq.quantizer.levels[1].set_codewords(words, counts)
        assert torch.equal(rq.encode(z, image)[:, 1], torch.from_numpy(classes))
    return rq


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """IRGen's layout on coloured squares: every image a candidate and a query whose positives are
    the other images of its class; a random tiny CLIP-SF as the stage-0 checkpoint; the rq above."""
    root = tmp_path_factory.mktemp("image_world")
    data = root / "data"
    paths, classes = write_images(data / "images", PER_CLASS, seed=0)
    dids = [f"20:{i}" for i in range(len(paths))]
    (data / "pool.jsonl").write_text("".join(json.dumps(
        {"did": d, "txt": None, "img_path": p, "modality": "image", "src_content": None}) + "\n"
        for d, p in zip(dids, paths)))
    mates = [[d for j, d in enumerate(dids) if classes[j] == classes[i] and j != i] for i in range(len(dids))]
    (data / "train.jsonl").write_text("".join(json.dumps(
        {"qid": f"20:{i}", "query_txt": None, "query_img_path": p, "query_modality": "image",
         "query_src_content": None, "pos_cand_list": mates[i], "neg_cand_list": [], "task_id": 4,
         "exclude_cand_list": [dids[i]]}) + "\n" for i, p in enumerate(paths)))
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((CLASSES, DIM)) * 2
    cand_vecs = centres[classes] + rng.standard_normal((len(paths), DIM)) * 0.3
    embed = root / "embed"
    write_store(store_path(embed, "enc", "train", "pool.jsonl"), store_arrays(10_000_000 * 20 + np.arange(len(paths)),
                cand_vecs), encoder="enc", kind="candidate", source=data / "pool.jsonl")
    write_store(store_path(embed, "enc", "train", "train.jsonl"), store_arrays(500_000 * 20 + np.arange(len(paths)),
                rng.standard_normal((len(paths), DIM))), encoder="enc", kind="query", source=data / "train.jsonl")
    save_rq(root / "rq.pt", class_rq(cand_vecs, classes), config={}, inputs={})
    torch.manual_seed(2)
    clip_cfg = model_config("clip-sf-tiny")
    save_own_checkpoint(own_checkpoint(build_clip(clip_cfg), "clip-sf-tiny", clip_cfg), root / "clip_sf.pt")
    return {"root": root, "classes": classes}


def gen_config_overrides(root: Path, out: str) -> list[str]:
    """A tiny image_tokens run of train-gen over ``world``, as --set overrides."""
    return [f"data.root={root / 'data'}", f"data.embed_root={root / 'embed'}", "data.encoder=enc",
            "data.train_queries=train.jsonl", "data.train_pool=pool.jsonl", f"data.rq={root / 'rq.pt'}",
            f"out_dir={root / out}", "model.condition=image_tokens", f"model.vision_checkpoint={root / 'clip_sf.pt'}",
            "mixing.enabled=false", "model.d_model=32", "model.num_heads=2", "model.d_kv=16", "model.d_ff=64",
            "model.num_decoder_layers=2", "model.dropout=0.0", "model.code_embedding_scale=15.0",
            "optim.lr=0.003", "optim.warmup_steps=5", "train.batch_size=16", "train.device=cpu", "train.log_every=6"]


def gen_config(root: Path, out: str, *overrides: str) -> train_gen.TrainGenConfig:
    return load_config(train_gen.TrainGenConfig, None, [*gen_config_overrides(root, out), *overrides])


def held_out(seed: int = 7, per_class: int = 10) -> tuple[torch.Tensor, np.ndarray]:
    """Fresh images of the classes as the generator reads them: uint8 [N, 3, S, S] and classes."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(CLASSES), per_class)
    images = [torch.from_numpy(np.array(class_image(int(c), rng))).permute(2, 0, 1) for c in classes]
    return torch.stack(images).contiguous(), classes


@pytest.fixture(scope="module")
def untrained(world):
    """A fresh image_tokens generator as train-gen builds it (and the rq it was built from)."""
    rq = load_rq(world["root"] / "rq.pt")
    torch.manual_seed(3)
    return train_gen.new_generator(gen_config(world["root"], "unused").model, rq), rq


# ---- the generator --------------------------------------------------------------------------
def test_vision_tokens_are_the_towers_class_and_patch_tokens_before_the_projection(world, untrained):
    generator, _ = untrained
    clip, _, _ = load_clip(world["root"] / "clip_sf.pt", None)
    pixels, _ = held_out(per_class=2)
    with torch.no_grad():
        tokens = generator.vision_tokens(pixels)
        assert tokens.shape == (8, 1 + (SIZE // 8) ** 2, 64)  # class token + 4 x 4 patches, tower width 64
        # The class token times CLIP's projection is CLIP's image feature: the tokens are the
        # tower's own (its weights loaded), after ln_post and before the projection.
        feature = clip.encode_image(generator.preprocess.normalize(pixels))
        assert torch.allclose(tokens[:, 0] @ clip.visual.proj, feature, atol=1e-5)
        assert generator.encoder_inputs(pixels).shape == (8, 17, 32)
    assert "proj" not in generator.vision.state_dict()


def test_image_tokens_generator_file_round_trip_and_input_checks(world, untrained, tmp_path):
    generator, rq = untrained
    save_generator(tmp_path / "generator.pt", generator, {"x": 1}, rq_fingerprint="abc")
    loaded, meta = load_generator(tmp_path / "generator.pt")  # rebuilt from its arch alone
    assert meta["arch"]["condition"] == "image_tokens" and meta["arch"]["vision"]["image_size"] == SIZE
    assert "num_prefix" not in meta["arch"] and loaded.preprocess.size == SIZE
    pixels, classes = held_out(per_class=2)
    codes = torch.stack([torch.zeros(8, dtype=torch.long), torch.from_numpy(classes), torch.arange(8) % K], dim=1)
    with torch.no_grad():
        assert torch.equal(loaded(pixels, codes), generator.eval()(pixels, codes))
    trie = PythonTrie.build(codes.numpy())
    with pytest.raises(ValueError, match=r"uint8 images \[Q, 3, 32, 32\], got torch.float32 \(8, 3, 32, 32\)"):
        constrained_beam_search(loaded, pixels.float(), trie, rq.codebook_sizes)
    with pytest.raises(ValueError, match=r"uint8 images .*got torch.float32 \(8, 16\)"):
        constrained_beam_search(loaded, torch.zeros(8, DIM), trie, rq.codebook_sizes)


def test_vision_tower_gets_its_own_lr_groups(untrained):
    generator, _ = untrained
    optimizer, scheduler = train_gen.make_optimizer(generator, train_gen.OptimConfig(lr=1e-3, vision_lr_scale=0.1), 10)
    tower = {id(p) for p in generator.vision.parameters()}
    grouped = [(id(p), g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(i for i, _, _ in grouped) == sorted(id(p) for p in generator.parameters())  # each once
    assert {lr for i, lr, _ in grouped if i in tower} == {1e-3 * 0.1}
    assert {lr for i, lr, _ in grouped if i not in tower} == {1e-3}
    assert {wd for i, _, wd in grouped if i in tower} == {0.0, 1e-4}  # the decay rule holds in the tower too
    # The schedule scales both alike: at every step the tower's lr is a tenth of the decoder's.
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        lrs = scheduler.get_last_lr()
        assert lrs[0] > 0 and lrs[-1] == pytest.approx(0.1 * lrs[0])
    assert optimizer.param_groups[0]["initial_lr"] == 1e-3  # group 0, whose lr train-gen logs, is the decoder's


def test_label_smoothing_spreads_over_the_levels_own_codes(world, untrained):
    generator, rq = untrained
    cfg = gen_config(world["root"], "unused", "optim.label_smoothing=0.2")
    pixels, _ = held_out(per_class=2)
    store = EmbeddingStore.open(store_path(world["root"] / "embed", "enc", "train", "pool.jsonl"), dim=DIM)
    rows = np.arange(0, 4 * PER_CLASS, PER_CLASS // 2)[:8]
    a = store.arrays
    batch = {"q_pixels": pixels, "c_img": torch.from_numpy(np.asarray(a.img[rows], np.float32)),
             "c_txt": torch.zeros(8, DIM), "c_img_mask": torch.ones(8), "c_txt_mask": torch.zeros(8),
             "c_modality": torch.zeros(8, dtype=torch.long)}
    target = rq.encode(rq.embed(batch["c_img"], batch["c_txt"], batch["c_img_mask"], batch["c_txt_mask"]),
                       batch["c_modality"])
    with torch.no_grad():  # dropout 0 and no patch dropout: train mode computes the same logits
        logits = generator.eval()(pixels, target).flatten(0, 1)
    tokens = codes_to_tokens(target, rq.codebook_sizes).flatten()
    log_p = logits.log_softmax(-1)
    # Smoothing 0.2 over the level's K codes: 0.8 x NLL + 0.2 x the mean of -log p over the
    # level's codes (the tokens the trie allows there), under the full-vocabulary softmax.
    levels, offsets = len(rq.codebook_sizes), code_offsets(rq.codebook_sizes)
    own_codes = torch.stack([log_p[row, offsets[row % levels]: offsets[row % levels] + rq.codebook_sizes[row % levels]].mean()
                             for row in range(len(log_p))])
    expected = (0.8 * -log_p.gather(1, tokens[:, None]).squeeze(1) - 0.2 * own_codes).mean()
    optimizer, scheduler = train_gen.make_optimizer(generator, cfg.optim, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = {k: v.clone() for k, v in generator.state_dict().items()}
    loss, _ = train_gen.train_step(generator.train(), rq, batch, optimizer, scheduler, scaler, cfg, torch.device("cpu"))
    generator.load_state_dict(state)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # not torch's smoothing over the whole vocabulary (the special tokens and the other levels' codes)
    assert abs(loss.item() - F.cross_entropy(logits, tokens, label_smoothing=0.2).item()) > 0.01
    assert abs(loss.item() - F.cross_entropy(logits, tokens).item()) > 0.01  # far beyond the tolerance above


@pytest.mark.parametrize("overrides, message", [
    (["mixing.enabled=true"], r"mixing\.enabled: .*model\.condition: image_tokens; set mixing\.enabled: false"),
    (["model.vision_checkpoint=null"], r"model\.vision_checkpoint: model\.condition image_tokens needs"),
    (["model.condition=prefix", "mixing.enabled=true"], r"model\.vision_checkpoint: only read with"),
    (["optim.label_smoothing=1.0"], r"optim\.label_smoothing"),
    (["optim.vision_lr_scale=-0.5"], r"optim\.vision_lr_scale"),
    (["model.vision_checkpoint=missing.pt"], r"model\.vision_checkpoint: .*missing\.pt does not exist"),
    (["data.index_pools=[pool.jsonl]"], r"data\.index_pools: indexing .* set data\.index_pools: \[\]"),
])
def test_config_mistakes_end_in_one_line_naming_the_key(world, capsys, tmp_path, overrides, message):
    (tmp_path / "train_gen.yaml").write_text("{}\n")
    argv = ["--config", str(tmp_path / "train_gen.yaml")]
    argv += [f"--set={o}" for o in [*gen_config_overrides(world["root"], "bad"), *overrides]]
    with pytest.raises(SystemExit) as exit_info:
        train_gen.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


# ---- training and decoding -------------------------------------------------------------------
def test_frozen_tower_keeps_the_stage0_weights_and_is_in_the_run_key(world):
    root = world["root"]
    path = train_gen.train(gen_config(root, "frozen", "optim.vision_lr_scale=0", "train.epochs=1"))
    state = torch.load(path, weights_only=True)
    clip, _, _ = load_clip(root / "clip_sf.pt", None)
    tower = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}
    assert all(torch.equal(state["model"][f"vision.{k}"], v) for k, v in tower.items())
    assert not torch.equal(state["model"]["token_projector.weight"],
                           train_gen.IDGenerator(state["arch"]).token_projector.weight)  # the rest trained
    inputs = state["run_key"]["inputs"]
    assert inputs["vision"]["sha256"] and isinstance(inputs["query_images"], str)


@pytest.fixture(scope="module")
def trained(world):
    path = train_gen.train(gen_config(world["root"], "learn", "train.epochs=12", "optim.vision_lr_scale=0.1"))
    generator, _ = load_generator(path)
    return generator, load_rq(world["root"] / "rq.pt")


def test_image_tokens_generator_learns_the_query_class(world, trained):
    generator, rq = trained
    pixels, classes = held_out()
    codes = torch.stack([torch.zeros(len(classes), dtype=torch.long), torch.from_numpy(classes),
                         torch.zeros(len(classes), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = generator(pixels, codes)
    level1 = (logits[:, 1].argmax(-1) == codes_to_tokens(codes, rq.codebook_sizes)[:, 1]).float().mean().item()
    assert level1 > 0.8, level1  # chance: 1 / 4 classes

    # Under the trie of the pool's IDs at one beam: the generated ID is of the query's class.
    root = world["root"]
    store = EmbeddingStore.open(store_path(root / "embed", "enc", "train", "pool.jsonl"), dim=DIM)
    a = store.arrays
    n = len(store)
    pool_codes = rq.encode(rq.embed(torch.from_numpy(np.asarray(a.img, np.float32)), torch.zeros(n, DIM),
                                    torch.ones(n), torch.zeros(n)), torch.zeros(n, dtype=torch.long))
    trie = PythonTrie.build(pool_codes.numpy())
    beams = constrained_beam_search(generator, pixels, trie, rq.codebook_sizes, num_beams=1)
    assert beams.valid.all()
    hit = (beams.codes[:, 0, 1].numpy() == classes).mean()
    assert hit > 0.75, hit

    # genius eval's decoding reads the query images of a store's rows the same way.
    queries = EmbeddingStore.open(store_path(root / "embed", "enc", "train", "train.jsonl"), dim=DIM)
    images = QueryImages(root / "data", query_image_paths(root / "data/train.jsonl", queries, root / "data"),
                         generator.preprocess)
    models = Models(embed=None, fingerprints={}, codebook_sizes=rq.codebook_sizes, modality_mode="assigned",
                    decode=lambda q, t: constrained_beam_search(generator, q, t, rq.codebook_sizes, num_beams=3),
                    preprocess=generator.preprocess)
    pool = type("PoolStub", (), {"decoding": type("Trie", (), {"trie": trie}),
                                 "cmap": type("Map", (), {"num_levels": 3})})
    codes_rows, scores, valid = decode_rows(models, pool, queries.arrays, 5, 40, 16, "decode", images)
    direct = constrained_beam_search(generator, images(np.arange(5, 40)), trie, rq.codebook_sizes, num_beams=3)
    expected = beams_as_arrays(direct)
    assert np.array_equal(codes_rows, expected[0]) and np.allclose(scores, expected[1])
    assert (codes_rows[:, 0, 1] == world["classes"][5:40]).mean() > 0.75  # training queries: their class too
