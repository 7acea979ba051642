"""IRGen's stage-1 options: IDs without a modality level, the classification tokenizer objective,
and what later stages do with a quantizer without a modality level.

The class-labelled world imitates image features of a class-per-folder collection: every image
belongs to one of 10 classes whose signal is weak next to a nuisance cluster (pose, background)
that is independent of the class, so the first k-means level of the raw features follows the
nuisance, not the class. Records follow the import-images contract (task 4, exclude_cand_list).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from genius.common.mbeir import hash_did, hash_qid
from genius.common.pairs import class_labels, load_training_pairs
from genius.common.store import EmbeddingStore, StoreArrays, write_store
from genius.models.generative_retriever.beam_search import constrained_beam_search
from genius.models.generative_retriever.generator import IDGenerator, make_arch
from genius.models.residual_quantization import assign_codes, train
from genius.models.residual_quantization.assign_codes import read_codes
from genius.models.residual_quantization.model import RQModel, load_rq, save_rq
from genius.trie_cpp.python_trie import PythonTrie

DIM, CLASSES, PER_CLASS, NUISANCES = 32, 10, 30, 6
ENCODER = "synthetic"


def write_records(root: Path, classes: list[int], exclude_self: bool = True) -> tuple[Path, Path]:
    """Pool and training-query jsonl: item i of class classes[i]; each query's positives are the
    other items of its class and its own image is excluded."""
    dids = [f"30:{i}" for i in range(len(classes))]
    pool_file, query_file = root / "pool.jsonl", root / "queries.jsonl"
    with open(pool_file, "w") as f:
        for i, did in enumerate(dids):
            f.write(json.dumps({"did": did, "txt": None, "img_path": f"mbeir_images/c/{i}.png", "modality": "image",
                                "src_content": None}) + "\n")
    with open(query_file, "w") as f:
        for i, did in enumerate(dids):
            positives = [d for j, d in enumerate(dids) if classes[j] == classes[i] and j != i]
            f.write(json.dumps({"qid": did, "query_txt": None, "query_img_path": f"mbeir_images/c/{i}.png",
                                "query_modality": "image", "query_src_content": None, "pos_cand_list": positives,
                                "neg_cand_list": [], "task_id": 4,
                                "exclude_cand_list": [did] if exclude_self else []}) + "\n")
    return pool_file, query_file


def write_stores(root: Path, img: np.ndarray, pool_file: Path, query_file: Path) -> dict:
    n = len(img)
    common = {"img": img.astype(np.float32), "txt": np.zeros_like(img, dtype=np.float32),
              "img_mask": np.ones(n, np.uint8), "txt_mask": np.zeros(n, np.uint8),
              "modality": np.zeros(n, np.int8), "target_modality": np.zeros(n, np.int8)}
    paths = {"query_file": query_file, "pool_file": pool_file, "query_store": root / "embed" / "queries",
             "pool_store": root / "embed" / "cand" / "pool"}
    write_store(paths["query_store"], StoreArrays(ids=np.array([hash_qid(f"30:{i}") for i in range(n)]), **common),
                encoder=ENCODER, kind="query", source=query_file)
    write_store(paths["pool_store"], StoreArrays(ids=np.array([hash_did(f"30:{i}") for i in range(n)]), **common),
                encoder=ENCODER, kind="candidate", source=pool_file)
    return paths


def make_class_world(root: Path, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    class_means = rng.standard_normal((CLASSES, DIM))
    class_means[:, 8:] *= 0.25  # the class shows mostly in 8 of the 32 dims
    nuisance_means = 3.0 * rng.standard_normal((NUISANCES, DIM))
    img = (class_means[labels] + nuisance_means[rng.integers(0, NUISANCES, len(labels))]
           + 0.3 * rng.standard_normal((len(labels), DIM)))
    pool_file, query_file = write_records(root, labels.tolist())
    return write_stores(root, img, pool_file, query_file), labels


def train_config(root: Path, world: dict, out: str, **overrides) -> Path:
    cfg = {
        "data": {k: str(world[k]) for k in ("query_file", "pool_file", "query_store", "pool_store")} | {"encoder": ENCODER},
        "model": {"proj_dim": 32, "hidden_dim": 64, "num_levels": 2, "codebook_size": 16, "modality_level": False},
        "train": {"batch_size": 50, "epochs": 10, "lr": 1e-2, "min_lr": 1e-3, "kmeans_iters": 20,
                  "kmeans_init_vectors": 256, "save_every": 5, "log_every": 10, "device": "cpu", "cpu_threads": 1,
                  "objective": "classification", **overrides},
        "out_dir": str(root / out),
    }
    path = root / f"train_{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pool_codes(rq: RQModel, world: dict) -> np.ndarray:
    a = EmbeddingStore.open(world["pool_store"]).arrays
    tensors = [torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in (a.img, a.txt, a.img_mask, a.txt_mask)]
    return rq.encode(rq.embed(*tensors)).numpy()


def purity(codes: np.ndarray, labels: np.ndarray) -> float:
    """Share of items whose code's most frequent class is their own."""
    return sum(np.bincount(labels[codes == c]).max() for c in np.unique(codes)) / len(codes)


# ---- IDs without a modality level ------------------------------------------------------------
def test_an_rq_without_modality_level_round_trips_and_assigns_every_level(tmp_path):
    torch.manual_seed(0)
    model = RQModel(DIM, 16, 16, num_levels=3, codebook_size=8, modality_level=False)
    assert model.codebook_sizes == [8, 8, 8] and not model.has_modality_level
    z = F.normalize(torch.randn(200, DIM), dim=-1)
    model.quantizer.initialise(z, None, kmeans_iters=10, generator=torch.Generator().manual_seed(0))
    save_rq(tmp_path / "rq" / "rq.pt", model, config={})
    loaded = load_rq(tmp_path / "rq" / "rq.pt")
    assert loaded.arch["modality_level"] is False and loaded.codebook_sizes == [8, 8, 8]
    codes = loaded.encode(z)
    assert codes.shape == (200, 3) and int(codes.min()) >= 0 and int(codes.max()) < 8
    assert len(torch.unique(codes[:, 0])) > 3  # level 0 is a learned 8-code level, not 3 modalities
    # the modality, if passed, is never read
    assert torch.equal(codes, loaded.encode(z, torch.full((200,), 2)))

    world, _ = make_class_world(tmp_path)
    cfg = {"rq_path": str(tmp_path / "rq" / "rq.pt"), "embed_dir": str(tmp_path / "embed" / "cand"),
           "encoder": ENCODER, "out_dir": str(tmp_path / "codes"), "batch_size": 64, "device": "cpu"}
    (tmp_path / "assign.yaml").write_text(yaml.safe_dump(cfg))
    assert assign_codes.main(["--config", str(tmp_path / "assign.yaml")]) == 0
    written, _, meta = read_codes(tmp_path / "codes" / "pool")
    assert meta["codebook_sizes"] == [8, 8, 8] and meta["modality_level"] is False
    # every pool item is an image (modality 0), yet level 0 is the nearest codeword, not 0
    np.testing.assert_array_equal(written, pool_codes(loaded, world))
    assert len(np.unique(written[:, 0])) > 1
    stats = json.loads((tmp_path / "codes" / "pool" / "stats.json").read_text())
    assert "level0_matches_modality" not in stats


def test_a_learned_modality_mode_without_modality_level_is_a_config_error(tmp_path, capsys):
    world, _ = make_class_world(tmp_path)
    config = train_config(tmp_path, world, "rq")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(config), "--set", "model.modality_mode=learned"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "model.modality_mode" in message and "model.modality_level" in message
    assert not (tmp_path / "rq").exists()


# ---- classes ----------------------------------------------------------------------------------
def test_classes_are_the_connected_groups_of_the_relevance(tmp_path):
    # Two 2-item classes are connected only through each query's excluded self; item 4 is in no
    # query's relevance; class 2 is a single query with a single positive.
    classes = [0, 0, 1, 1]
    pool_file, query_file = write_records(tmp_path, classes)
    with open(pool_file, "a") as f:
        for i in (4, 5, 6):
            f.write(json.dumps({"did": f"30:{i}", "txt": None, "img_path": f"x/{i}.png", "modality": "image",
                                "src_content": None}) + "\n")
    with open(query_file, "a") as f:
        f.write(json.dumps({"qid": "30:6", "query_txt": None, "query_img_path": "x/q.png", "query_modality": "image",
                            "query_src_content": None, "pos_cand_list": ["30:5"], "neg_cand_list": [],
                            "task_id": 4}) + "\n")
    world = write_stores(tmp_path, np.zeros((7, DIM)), pool_file, query_file)
    queries, pool = EmbeddingStore.open(world["query_store"]), EmbeddingStore.open(world["pool_store"])
    pairs = load_training_pairs(query_file, queries, pool)
    labels = class_labels(query_file, pool, pairs)
    assert labels.num_classes == 3
    assert labels.pool[0] == labels.pool[1] != labels.pool[2] == labels.pool[3] != labels.pool[5]
    assert labels.pool[4] == -1 and labels.pool[6] == -1  # 30:6 is only a query, never related as a candidate
    np.testing.assert_array_equal(labels.pairs, labels.pool[pairs.pos_rows[pairs.pos_offsets[:-1]]])
    # without the excluded selves, each 2-item class falls apart into single items
    write_records(tmp_path, classes, exclude_self=False)
    assert class_labels(query_file, pool, load_training_pairs(query_file, queries, pool)).num_classes == 4


# ---- the classification objective learns --------------------------------------------------------
@pytest.fixture(scope="module")
def class_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("irgen_rq")
    world, labels = make_class_world(root)
    runs = {}
    for objective in ("classification", "contrastive"):
        assert train.main(["--config", str(train_config(root, world, objective, objective=objective))]) == 0
        runs[objective] = root / objective
    return world, labels, runs


def test_the_classification_objective_makes_the_first_code_predict_the_class(class_runs):
    world, labels, runs = class_runs
    chance = 1 / CLASSES
    found = {name: purity(pool_codes(load_rq(run / "rq.pt"), world)[:, 0], labels) for name, run in runs.items()}
    assert found["classification"] >= 5 * chance, found
    # world seeds 0-2 give 0.86-0.96, against 0.30-0.36 for contrastive training on the same pairs
    assert found["classification"] >= found["contrastive"] + 0.2, found
    records = [json.loads(line) for line in (runs["classification"] / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("epoch_summary")]
    assert len(epochs) == 10 and "modality_accuracy" not in epochs[-1]
    for key in ("classification", "reconstruction_classification", "residual", "classifier_accuracy",
                "reconstruction_accuracy", "first_level_purity"):
        assert key in epochs[-1], key
    assert epochs[-1]["classifier_accuracy"] >= 5 * chance
    assert epochs[-1]["classification"] < epochs[0]["classification"]


def test_the_classifiers_live_in_training_checkpoints_only(class_runs):
    _, _, runs = class_runs
    run = runs["classification"]
    final = torch.load(run / "rq.pt", map_location="cpu", weights_only=True)
    assert not any(name.startswith(("fc", "heads")) for name in final["model"])
    checkpoint = torch.load(run / "checkpoints" / "epoch_0010.pt", map_location="cpu", weights_only=True)
    assert checkpoint["heads"]["fc.weight"].shape == (CLASSES, DIM)
    assert checkpoint["heads"]["fc_rq.weight"].shape == (CLASSES, DIM)


def test_classification_training_resumes_to_the_uninterrupted_result(class_runs, tmp_path):
    world, _, runs = class_runs
    config = train_config(tmp_path, world, "resumed", epochs=10)
    assert train.main(["--config", str(config), "--set", "train.stop_after_epochs=5"]) == 0
    assert train.main(["--config", str(config)]) == 0
    a = torch.load(runs["classification"] / "rq.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "rq.pt", map_location="cpu", weights_only=True)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- decoding without a modality level -------------------------------------------------------------
def test_beam_search_ignores_the_modality_threshold_without_a_modality_level():
    sizes = [6, 6, 6]
    torch.manual_seed(3)
    arch = make_arch(12, sizes, num_prefix=3, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_decoder_layers=2)
    generator = IDGenerator(arch).eval()
    with torch.no_grad():  # spread the level-0 logits, so that a threshold would prune
        generator.t5.shared.weight.mul_(4.0)
    rng = np.random.default_rng(3)
    codes = np.stack([rng.integers(0, k, 120) for k in sizes], axis=1)
    trie = PythonTrie.build(codes)
    z = F.normalize(torch.randn(6, 12), dim=-1)
    plain = constrained_beam_search(generator, z, trie, sizes, num_beams=30)
    ignored = constrained_beam_search(generator, z, trie, sizes, num_beams=30, modality_threshold=0.9,
                                      modality_level=False)
    pruned = constrained_beam_search(generator, z, trie, sizes, num_beams=30, modality_threshold=0.9)
    assert torch.equal(plain.codes, ignored.codes) and torch.equal(plain.scores, ignored.scores)
    assert not torch.equal(plain.codes, pruned.codes)  # the threshold would have pruned level 0
    ids = {tuple(row) for row in codes.tolist()}
    found = ignored.codes[ignored.valid].tolist()
    assert found and all(tuple(row) in ids for row in found)
