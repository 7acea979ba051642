"""train-gen's ``data.index_pools`` (DSI's indexing): the generator also trains on (candidate ->
itself) for the candidates of further pools that the training pool lacks, read from the stores eval
reads. Learning: on a world whose evaluated pool holds only candidates no training query targets,
a generator that indexed that pool retrieves held-out queries' positives by their IDs far more
often than the same generator trained on the training pairs alone. Also what is indexed, the run
key, and the mistakes."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from genius.common.config import load_config
from genius.common.mbeir import MODALITY_CODE, hash_did, hash_qid
from genius.common.store import StoreArrays, store_path, write_store
from genius.models.generative_retriever import train as train_gen
from genius.models.generative_retriever.beam_search import constrained_beam_search
from genius.models.generative_retriever.generator import load_generator
from genius.models.residual_quantization.model import RQModel, load_rq, save_rq
from genius.trie_cpp.python_trie import PythonTrie

DIM, K, TRAINED, INDEXED, SHARED = 16, 16, 160, 160, 20
NOISE = 0.15  # of a query around its positive, on unit-scale features


def text_arrays(ids: np.ndarray, vecs: np.ndarray) -> StoreArrays:
    n = len(ids)
    text = np.full(n, MODALITY_CODE["text"], np.int8)
    return StoreArrays(ids=ids, img=np.zeros_like(vecs, np.float32), txt=vecs.astype(np.float32),
                       img_mask=np.zeros(n, np.uint8), txt_mask=np.ones(n, np.uint8), modality=text,
                       target_modality=text)


def embed(rq: RQModel, vecs: np.ndarray) -> torch.Tensor:
    n = len(vecs)
    return rq.embed(torch.zeros(n, DIM), torch.from_numpy(vecs).float(), torch.zeros(n), torch.ones(n))


def jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def pool_records(dids: list[str]) -> list[dict]:
    return [{"did": d, "txt": f"text {d}", "img_path": None, "modality": "text"} for d in dids]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Text candidates in two pools: the training pool (one training query each, its positive plus
    noise) and the evaluated pool, whose candidates no training query targets, except SHARED of
    them that are in the training pool too. A stage-1 model whose IDs come from k-means on both."""
    root = tmp_path_factory.mktemp("index_world")
    data, embed_root = root / "data", root / "embed"
    data.mkdir()
    rng = np.random.default_rng(0)
    trained_vecs = rng.standard_normal((TRAINED, DIM))
    new_vecs = rng.standard_normal((INDEXED, DIM))
    train_dids = [f"21:{i}" for i in range(TRAINED)]
    new_dids = [f"21:{1000 + i}" for i in range(INDEXED)]
    jsonl(data / "train_pool.jsonl", pool_records(train_dids))
    jsonl(data / "train.jsonl", [{"qid": f"21:{i}", "query_txt": f"query {i}", "query_img_path": None,
                                  "query_modality": "text", "pos_cand_list": [d], "neg_cand_list": [], "task_id": 1}
                                 for i, d in enumerate(train_dids)])
    shared = list(range(SHARED))
    eval_dids = new_dids + [train_dids[i] for i in shared]
    eval_vecs = np.concatenate([new_vecs, trained_vecs[shared]])
    jsonl(data / "eval_pool.jsonl", pool_records(eval_dids))
    write_store(store_path(embed_root, "enc", "train", "train_pool.jsonl"),
                text_arrays(np.array([hash_did(d) for d in train_dids]), trained_vecs), encoder="enc",
                kind="candidate", source=data / "train_pool.jsonl")
    query_vecs = trained_vecs + NOISE * rng.standard_normal((TRAINED, DIM))
    write_store(store_path(embed_root, "enc", "train", "train.jsonl"),
                text_arrays(np.array([hash_qid(f"21:{i}") for i in range(TRAINED)]), query_vecs), encoder="enc",
                kind="query", source=data / "train.jsonl")
    write_store(store_path(embed_root, "enc", "cand", "eval_pool.jsonl"),
                text_arrays(np.array([hash_did(d) for d in eval_dids]), eval_vecs), encoder="enc",
                kind="candidate", source=data / "eval_pool.jsonl")
    torch.manual_seed(0)
    rq = RQModel(DIM, 32, 32, num_levels=3, codebook_size=K)
    every = np.concatenate([trained_vecs, new_vecs])
    text = torch.full((len(every),), MODALITY_CODE["text"], dtype=torch.long)
    with torch.no_grad():
        rq.quantizer.initialise(embed(rq, every), text, kmeans_iters=20, generator=torch.Generator().manual_seed(0))
    save_rq(root / "rq.pt", rq, config={}, inputs={})
    # held-out queries of the new candidates, as the evaluation would pose them
    queries = new_vecs + NOISE * np.random.default_rng(5).standard_normal(new_vecs.shape)
    return {"root": root, "new_vecs": new_vecs, "queries": queries}


def data_overrides(root: Path) -> list[str]:
    """train-gen's data section over ``world``, as --set overrides."""
    return [f"data.root={root / 'data'}", f"data.embed_root={root / 'embed'}", "data.encoder=enc",
            "data.train_queries=train.jsonl", "data.train_pool=train_pool.jsonl", f"data.rq={root / 'rq.pt'}"]


def config(root: Path, out: str, *overrides: str) -> train_gen.TrainGenConfig:
    return load_config(train_gen.TrainGenConfig, None, [
        *data_overrides(root), f"out_dir={root / out}", "model.num_prefix=4", "model.d_model=32", "model.num_heads=2", "model.d_kv=16",
        "model.d_ff=64", "model.num_decoder_layers=2", "model.dropout=0.0", "model.code_embedding_scale=15.0",
        "optim.lr=0.003", "optim.warmup_steps=10", "train.epochs=10", "train.batch_size=16", "train.device=cpu",
        "train.cpu_threads=1", "train.log_every=1000", *overrides])


INDEX = "data.index_pools=[eval_pool.jsonl]"


def top_beam_hits(root: Path, generator_path: Path, queries: np.ndarray, targets: np.ndarray) -> float:
    """The share of queries whose top beam under the trie of the targets' IDs is their own target's ID."""
    rq = load_rq(root / "rq.pt")
    generator, _ = load_generator(generator_path)
    text = torch.full((len(targets),), MODALITY_CODE["text"], dtype=torch.long)
    with torch.no_grad():
        codes = rq.encode(embed(rq, targets), text)
        beams = constrained_beam_search(generator, embed(rq, queries), PythonTrie.build(codes.numpy()),
                                        rq.codebook_sizes, num_beams=5)
    return float((beams.codes[:, 0] == codes).all(1).float().mean())


def test_indexing_teaches_the_generator_the_ids_of_the_pool_it_will_search(world, caplog):
    root = world["root"]
    plain = train_gen.train(config(root, "plain"))
    with caplog.at_level(logging.INFO, logger="genius.train_gen"):
        indexed = train_gen.train(config(root, "indexed", INDEX))
    # the evaluated pool's candidates minus those of the training pool, each once, after the training pairs
    assert f"indexing {INDEXED} of the {INDEXED + SHARED} candidates" in caplog.text
    assert f"{TRAINED} training pairs and {INDEXED} self-pairs" in caplog.text
    before = top_beam_hits(root, plain, world["queries"], world["new_vecs"])
    after = top_beam_hits(root, indexed, world["queries"], world["new_vecs"])
    # chance under the trie is about 1 / 160; measured 0.22 -> 0.75 (10 epochs; 0.34 -> 0.99 at 30)
    assert after > 0.5 and after > before + 0.3, (before, after)
    # the index store is an input of the run: its content is in the run key, so a change retrains
    keys = [torch.load(p, weights_only=True)["run_key"] for p in (plain, indexed)]
    assert "index_stores" not in keys[0]["inputs"] and len(keys[1]["inputs"]["index_stores"]) == 1
    assert keys[0]["config"] == keys[1]["config"]  # the pools' paths are not in it: their content is


@pytest.mark.parametrize("overrides, message", [
    (["data.index_pools=[missing_pool.jsonl]"], r"data\.index_pools\[0\]: .*missing_pool\.jsonl does not exist"),
    (["data.index_pools=[eval_pool.jsonl, train_pool.jsonl]"], r"data\.index_pools\[1\]: no embedding store at "),
])
def test_index_pool_mistakes_end_in_one_line_naming_the_entry(world, capsys, tmp_path, overrides, message):
    (tmp_path / "train_gen.yaml").write_text("{}\n")
    argv = ["--config", str(tmp_path / "train_gen.yaml"), f"--set=out_dir={tmp_path / 'bad'}"]
    argv += [f"--set={o}" for o in [*data_overrides(world["root"]), *overrides]]
    with pytest.raises(SystemExit) as exit_info:
        train_gen.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "bad" / "generator.pt").exists()
