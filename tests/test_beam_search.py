"""Constrained beam search: exact agreement with transformers ``generate``, trie validity, absent beams."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genius.common import cpu
from genius.models.generative_retriever import beam_search, fused_decoder
from genius.models.generative_retriever.beam_search import (
    constrained_beam_search, cpu_has_bf16, generate_reference, prepare_decoder,
)
from genius.models.generative_retriever.device_trie import DeviceTrie
from genius.models.generative_retriever.fused_decoder import FusedDecoder
from genius.models.generative_retriever.generator import IDGenerator, make_arch
from genius.trie_cpp import build_trie
from genius.trie_cpp.python_trie import PythonTrie

# pytest runs with --import-mode=importlib, which leaves tests/ off sys.path; the sync counter is
# a plain module next to this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_syncs import count_host_syncs  # noqa: E402


def tiny_generator(seed: int, sizes: list[int], dim: int = 12, d_model: int = 16, layers: int = 2) -> IDGenerator:
    torch.manual_seed(seed)
    arch = make_arch(dim, sizes, num_prefix=3, d_model=d_model, num_heads=2, d_kv=8, d_ff=32, num_decoder_layers=layers)
    generator = IDGenerator(arch).eval()
    # Random T5 init gives nearly flat distributions; widen the output rows so beams are well separated.
    with torch.no_grad():
        generator.t5.shared.weight.mul_(4.0)
    return generator


def random_codes(rng: np.random.Generator, sizes: list[int], n: int) -> np.ndarray:
    return np.stack([rng.integers(0, k, size=n) for k in sizes], axis=1)


def queries(rng: np.random.Generator, n: int, dim: int = 12) -> torch.Tensor:
    return F.normalize(torch.from_numpy(rng.standard_normal((n, dim))).float(), dim=-1)


def teacher_forced_scores(generator: IDGenerator, z: torch.Tensor, codes: torch.Tensor, level_head: bool) -> torch.Tensor:
    """Sum of log-probs of ``codes`` [Q, B, L] under teacher forcing, normalised as the search does."""
    num_queries, beams, levels = codes.shape
    with torch.no_grad():
        logits = generator(z.repeat_interleave(beams, 0), codes.reshape(-1, levels).clamp(min=0))
    total = torch.zeros(num_queries * beams)
    for level, (offset, size) in enumerate(zip(generator.offsets, generator.codebook_sizes)):
        step = logits[:, level].float()
        log_probs = step[:, offset : offset + size].log_softmax(-1) if level_head else step.log_softmax(-1)[:, offset:]
        total += log_probs.gather(1, codes.reshape(-1, levels)[:, level : level + 1].clamp(min=0)).squeeze(1)
    return total.view(num_queries, beams)


# 24 cases: random generators and code sets; pools larger and smaller than the beam count,
# shared prefixes (few codes per level), one level only, and a single beam.
CASES = [
    # seed, codebook sizes, pool size, beams, decoder layers
    (0, [3, 7, 7, 7], 200, 10, 2), (1, [3, 7, 7, 7], 200, 30, 1), (2, [3, 5, 5], 12, 20, 2),
    (3, [3, 5, 5], 12, 12, 2), (4, [3, 9, 9, 9], 60, 50, 2), (5, [3, 4, 4, 4, 4], 300, 25, 1),
    (6, [3, 6, 6], 5, 8, 2), (7, [2, 3, 3], 18, 18, 2), (8, [3, 11, 11], 40, 1, 2),
    (9, [3, 11, 11], 40, 2, 2), (10, [3, 8, 8, 8], 1, 4, 2), (11, [3, 8, 8, 8], 500, 16, 3),
    (12, [5], 5, 3, 1), (13, [3, 16, 16], 100, 40, 2), (14, [3, 6, 6, 6], 30, 7, 2),
    (15, [3, 3, 3, 3, 3, 3], 150, 20, 1), (16, [3, 10, 10], 90, 33, 2), (17, [3, 7, 7, 7], 3, 50, 2),
    (18, [1, 8, 8], 64, 64, 2), (19, [3, 12, 12, 12], 400, 12, 2), (20, [3, 5, 5, 5], 40, 60, 2),
    (21, [3, 9, 9], 81, 5, 1), (22, [3, 4, 4], 16, 16, 2), (23, [3, 20, 20], 25, 11, 2),
]


@pytest.mark.parametrize("seed,sizes,pool,beams,layers", CASES)
def test_full_vocabulary_search_equals_transformers_generate(seed, sizes, pool, beams, layers):
    rng = np.random.default_rng(seed)
    generator = tiny_generator(seed, sizes, layers=layers)
    trie = PythonTrie.build(random_codes(rng, sizes, pool))
    z = queries(rng, 3)
    ours = constrained_beam_search(generator, z, trie, sizes, num_beams=beams, level_head=False, batch_size=2)
    reference = generate_reference(generator, z, trie, beams, length_penalty=float(rng.choice([0.0, 1.0, 2.0])))
    reachable = min(beams, len(trie))
    assert ours.valid.sum(1).tolist() == [reachable] * 3
    assert torch.equal(ours.valid, reference.valid)
    assert torch.equal(ours.codes, reference.codes)
    torch.testing.assert_close(ours.scores, reference.scores, atol=1e-4, rtol=1e-5)
    assert not ours.level_head


@pytest.mark.parametrize("seed,sizes,pool,beams,layers", CASES[::2])
def test_the_cpu_kernels_give_the_beams_of_torchs_ops(seed, sizes, pool, beams, layers):
    """On a CPU the step's attention, norms and beam selection run in C++ (decoder_kernels.cpp);
    without them (a GPU's way: SDPA on gathered histories, add + mask + topk) the beams are the same."""
    rng = np.random.default_rng(seed)
    generator = tiny_generator(seed, sizes, layers=layers)
    trie = build_trie(random_codes(rng, sizes, pool), backend="cpp")
    z = queries(rng, 5)
    with_kernels = prepare_decoder(generator, torch.device("cpu"))
    without = prepare_decoder(generator, torch.device("cpu"))
    assert with_kernels.kernels is not None
    without.kernels = None
    results = [constrained_beam_search(generator, z, trie, sizes, num_beams=beams, decoder=decoder)
               for decoder in (with_kernels, without)]
    assert torch.equal(results[0].codes, results[1].codes) and torch.equal(results[0].valid, results[1].valid)
    torch.testing.assert_close(results[0].scores, results[1].scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level_head", [True, False])
def test_returned_ids_exist_and_absent_beams_are_marked(level_head):
    rng = np.random.default_rng(7)
    sizes = [3, 6, 6, 6]
    generator = tiny_generator(7, sizes)
    codes = random_codes(rng, sizes, 9)
    for backend in ("python", "cpp"):
        trie = build_trie(codes, backend=backend)
        result = constrained_beam_search(generator, queries(rng, 4), trie, sizes, num_beams=15, level_head=level_head)
        known = {tuple(row) for row in codes.tolist()}
        assert result.codes.shape == (4, 15, 4) and result.level_head is level_head
        assert all(tuple(row) in known for row in result.codes[result.valid].tolist())
        distinct = len(known)
        assert result.valid[:, :distinct].all() and not result.valid[:, distinct:].any()
        assert (result.codes[:, distinct:] == -1).all() and torch.isneginf(result.scores[:, distinct:]).all()
        assert (result.scores[:, 1:distinct] <= result.scores[:, : distinct - 1]).all()  # sorted


@pytest.mark.parametrize("level_head", [True, False])
def test_beams_covering_the_pool_rank_every_id_by_its_exact_score(level_head):
    # With at least as many beams as IDs nothing is pruned: the result must be the whole trie,
    # ordered by the teacher-forced sequence score under the chosen normalisation.
    rng = np.random.default_rng(3)
    sizes = [3, 5, 5]
    generator = tiny_generator(3, sizes)
    trie = PythonTrie.build(random_codes(rng, sizes, 30))
    z = queries(rng, 2)
    result = constrained_beam_search(generator, z, trie, sizes, num_beams=len(trie), level_head=level_head)
    assert result.valid.all()
    for q in range(2):
        assert {tuple(r) for r in result.codes[q].tolist()} == {tuple(r) for r in trie.ids().tolist()}
    torch.testing.assert_close(result.scores, teacher_forced_scores(generator, z, result.codes, level_head),
                               atol=1e-4, rtol=1e-5)


def test_query_batching_and_bf16_autocast():
    rng = np.random.default_rng(5)
    sizes = [3, 8, 8, 8]
    generator = tiny_generator(5, sizes)
    trie = PythonTrie.build(random_codes(rng, sizes, 120))
    z = queries(rng, 5)
    whole = constrained_beam_search(generator, z, trie, sizes, num_beams=10, batch_size=64)
    split = constrained_beam_search(generator, z, trie, sizes, num_beams=10, batch_size=2)
    assert torch.equal(whole.codes, split.codes)
    torch.testing.assert_close(whole.scores, split.scores)
    bf16 = constrained_beam_search(generator, z, trie, sizes, num_beams=10, autocast=True)
    known = {tuple(r) for r in trie.ids().tolist()}
    assert bf16.valid.all() and all(tuple(r) in known for r in bf16.codes.reshape(-1, 4).tolist())
    # bf16 keeps ~3 significant digits: the best beam survives, scores agree loosely.
    assert (bf16.codes[:, 0] == whole.codes[:, 0]).all(-1).float().mean() >= 0.8
    torch.testing.assert_close(bf16.scores[:, 0], whole.scores[:, 0], atol=0.1, rtol=0.05)


CPUINFO = {  # the flags lines Linux lists (trimmed), and an ARM CPU's, which lists "Features"
    "ice_lake": "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni\n",
    "cooper_lake": "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni avx512_bf16\n",
    "sapphire_rapids": "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8\n",
    "zen3": "flags\t\t: fpu sse2 avx2 fma\nbugs\t\t: avx512_bf16\n",
    "arm": "Features\t: fp asimd bf16 i8mm\n",
}


def test_bf16_is_native_only_with_avx512_bf16_or_amx(tmp_path):
    """oneDNN reports bf16 support on every AVX-512 CPU, but without AVX512_BF16 or AMX it converts
    to fp32 and bf16 decoding runs slower than fp32: such a CPU does not count as having bf16."""
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    native = {}
    for name, text in CPUINFO.items():
        (tmp_path / name).write_text(f"processor\t: 0\n{text}")
        native[name] = cpu_has_bf16(tmp_path / name)
    assert native == {"ice_lake": False, "cooper_lake": onednn, "sapphire_rapids": onednn, "zen3": False,
                      "arm": onednn}  # ARM's features are not read: oneDNN's answer stands


def test_bf16_search_on_a_cpu_without_bf16_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(beam_search, "cpu_has_bf16", lambda: False)
    beam_search._warn_emulated_bf16.cache_clear()
    rng = np.random.default_rng(6)
    sizes = [3, 8, 8, 8]
    generator, trie, z = tiny_generator(6, sizes), PythonTrie.build(random_codes(rng, sizes, 50)), queries(rng, 4)
    with caplog.at_level("WARNING", logger="genius"):
        for _ in range(2):
            constrained_beam_search(generator, z, trie, sizes, num_beams=5, batch_size=2, autocast=True)
    warnings = [r.getMessage() for r in caplog.records if "bf16 decoding runs emulated" in r.getMessage()]
    assert len(warnings) == 1 and "decoding.autocast=false" in warnings[0]
    beam_search._warn_emulated_bf16.cache_clear()


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.9])
def test_modality_threshold_searches_only_the_modalities_it_keeps(threshold):
    # Pruning level 0 must equal an unpruned search over the pool restricted, per query, to the
    # modalities whose probability is at least threshold x the best allowed one's.
    rng = np.random.default_rng(11)
    sizes = [3, 6, 6, 6]
    generator = tiny_generator(11, sizes)
    with torch.no_grad():  # spread the modality logits so that some, not all, modalities pass
        generator.t5.shared.weight[generator.offsets[0] : generator.offsets[0] + 3] *= 3.0
    codes = random_codes(rng, sizes, 150)
    z = queries(rng, 8)
    pruned = constrained_beam_search(generator, z, PythonTrie.build(codes), sizes, num_beams=20,
                                     modality_threshold=threshold)
    with torch.no_grad():
        modality_log_probs = generator(z, torch.zeros(len(z), len(sizes), dtype=torch.long))[:, 0, 3:6].log_softmax(-1)
    pruned_some = False
    for q in range(len(z)):
        allowed = np.isin(np.arange(3), codes[:, 0])
        best = modality_log_probs[q][torch.from_numpy(allowed)].max()
        keep = [m for m in range(3) if allowed[m] and modality_log_probs[q, m] >= best + np.log(threshold)]
        pruned_some |= len(keep) < allowed.sum()
        restricted = codes[np.isin(codes[:, 0], keep)]
        reference = constrained_beam_search(generator, z[q : q + 1], PythonTrie.build(restricted), sizes, num_beams=20)
        assert torch.equal(pruned.codes[q], reference.codes[0]) and torch.equal(pruned.valid[q], reference.valid[0])
        torch.testing.assert_close(pruned.scores[q], reference.scores[0])
    assert pruned_some  # the case exercises pruning
    plain = constrained_beam_search(generator, z, PythonTrie.build(codes), sizes, num_beams=20)
    off = constrained_beam_search(generator, z, PythonTrie.build(codes), sizes, num_beams=20, modality_threshold=0.0)
    assert torch.equal(plain.codes, off.codes)


def diverse_reference(generator: IDGenerator, z: torch.Tensor, trie: PythonTrie, beams: int, penalty: float):
    """Sibling-penalty beam search for one query, prefix by prefix with teacher forcing: the r-th
    best allowed child of each prefix competes with its score lowered by penalty x r at that level."""
    sizes, hyps = generator.codebook_sizes, [((), 0.0)]
    for level, (offset, size) in enumerate(zip(generator.offsets, sizes)):
        competing = []
        for prefix, score in hyps:
            codes = torch.tensor([list(prefix) + [0] * (len(sizes) - level)])
            with torch.no_grad():
                log_probs = generator(z[None], codes)[0, level, offset : offset + size].float().log_softmax(-1)
            children = sorted(trie.children(prefix).tolist(), key=lambda c: -log_probs[c].item())
            competing += [(score + log_probs[c].item() - penalty * rank, prefix + (c,), score + log_probs[c].item())
                          for rank, c in enumerate(children)]
        competing.sort(key=lambda x: -x[0])
        hyps = [(prefix, true) for _, prefix, true in competing[:beams]]
    return sorted(hyps, key=lambda h: -h[1])


@pytest.mark.parametrize("seed, sizes, pool, beams, penalty", [
    (0, [3, 6, 6, 6], 120, 8, 0.5), (1, [3, 6, 6, 6], 120, 8, 3.0), (2, [3, 9, 9], 60, 20, 1.0),
    (3, [3, 5, 5, 5], 40, 50, 0.7), (4, [2, 8, 8, 8], 200, 5, 100.0), (5, [3, 4, 4, 4, 4], 150, 12, 0.2),
])
def test_diverse_beams_equal_the_sibling_penalty_reference(seed, sizes, pool, beams, penalty):
    rng = np.random.default_rng(seed)
    generator = tiny_generator(seed, sizes)
    trie = PythonTrie.build(random_codes(rng, sizes, pool))
    z = queries(rng, 3)
    result = constrained_beam_search(generator, z, trie, sizes, num_beams=beams, sibling_penalty=penalty)
    plain = constrained_beam_search(generator, z, trie, sizes, num_beams=beams)
    differs = False
    for q in range(len(z)):
        reference = diverse_reference(generator, z[q], trie, beams, penalty)
        count = len(reference)
        assert [tuple(r) for r in result.codes[q, :count].tolist()] == [prefix for prefix, _ in reference]
        torch.testing.assert_close(result.scores[q, :count], torch.tensor([s for _, s in reference]), atol=1e-4, rtol=1e-5)
        assert result.valid[q, :count].all() and not result.valid[q, count:].any()
        differs |= not torch.equal(result.codes[q], plain.codes[q])
    # true sequence scores, best first: GENIUS ranks diverse beams by the model's own scores
    torch.testing.assert_close(result.scores[result.valid], teacher_forced_scores(generator, z, result.codes, True)
                               [result.valid], atol=1e-4, rtol=1e-5)
    assert differs or penalty < 1  # a strong penalty changes the beams of some query


def test_diverse_beams_spread_over_more_prefixes():
    # With a huge penalty every surviving prefix gets a child before any gets a second, so the final
    # beams cover as many distinct parents as can be reached; plain beam search covers fewer here.
    rng = np.random.default_rng(7)
    sizes = [3, 8, 8, 8]
    generator = tiny_generator(7, sizes)
    trie = PythonTrie.build(random_codes(rng, sizes, 400))
    z = queries(rng, 6)

    def parents(result):
        return [len({tuple(r[:-1]) for r in codes.tolist()}) for codes in result.codes]

    diverse = constrained_beam_search(generator, z, trie, sizes, num_beams=16, sibling_penalty=1e6)
    plain = constrained_beam_search(generator, z, trie, sizes, num_beams=16, sibling_penalty=0.0)
    assert all(p == 16 for p in parents(diverse))  # 400 IDs: every one of the 16 prefixes has a child
    assert sum(parents(plain)) < sum(parents(diverse))
    assert (diverse.scores[:, 1:] <= diverse.scores[:, :-1]).all()


def test_bad_arguments_are_named():
    sizes = [3, 4]
    generator = tiny_generator(0, sizes)
    trie = PythonTrie.build(np.array([[0, 1]]))
    with pytest.raises(ValueError, match="codebook sizes"):
        constrained_beam_search(generator, queries(np.random.default_rng(0), 1), trie, [3, 5])
    with pytest.raises(ValueError, match="modality_threshold"):
        constrained_beam_search(generator, queries(np.random.default_rng(0), 1), trie, sizes, modality_threshold=1.5)
    with pytest.raises(ValueError, match="sibling_penalty"):
        constrained_beam_search(generator, queries(np.random.default_rng(0), 1), trie, sizes, sibling_penalty=-1.0)
    with pytest.raises(ValueError, match=r"z_query must be \[Q, 12\]"):
        constrained_beam_search(generator, torch.zeros(2, 7), trie, sizes)


# ---- numerics under autocast, and host syncs (the GPU path, checked on the CPU) ----------------
@pytest.mark.parametrize("level_head", [True, False])
def test_head_logits_are_fp32_under_autocast(level_head, monkeypatch):
    # With bf16 weights the decoder runs in bf16 but the head must not: the level's
    # log-probabilities equal an fp32 head (outside autocast) on the same decoder state, also
    # when the caller is inside autocast. The decoder's own head is fp32 where torch has no MKL
    # (made so here); with MKL it sums bf16 inputs in fp32 (tests/test_fused_decoder.py).
    monkeypatch.setattr(fused_decoder, "_mkl_bf16_gemm", lambda: None)
    sizes = [3, 8, 8]
    generator = tiny_generator(4, sizes)
    z = queries(np.random.default_rng(4), 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = FusedDecoder(generator, torch.bfloat16)
        assert not decoder.bf16_head
        search = decoder.start(generator.encode(z), len(z), 1)
        state = decoder.step(search, torch.zeros(len(z), dtype=torch.long), None)
        log_probs = generator.level_log_probs(state, 0, level_head)
        in_workspace = decoder.level_log_probs(generator, state, 0, level_head, search)  # the search's own call
    weight = generator.t5.lm_head.weight.detach()
    hidden = state.float() * generator.d_model**-0.5
    lo, hi = generator.offsets[0], generator.offsets[0] + sizes[0]

    def level_log_probs(logits_of):  # normalised as the search does
        return logits_of(weight[lo:hi]).log_softmax(-1) if level_head else logits_of(weight).log_softmax(-1)[:, lo:hi]

    with torch.no_grad():
        expected = level_log_probs(lambda rows: F.linear(hidden, rows))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head = generator.head_logits(state, slice(lo, hi))
            in_autocast = level_log_probs(lambda rows: F.linear(hidden, rows).float())  # a head inside autocast
    assert log_probs.dtype == head.dtype == torch.float32
    assert torch.equal(log_probs, expected) and torch.equal(head, F.linear(hidden, weight[lo:hi]))
    assert torch.equal(in_workspace, expected)
    logits = search.workspace.buffers["logits", torch.float32, torch.device("cpu")]
    assert in_workspace.data_ptr() == logits.data_ptr() + lo * (not level_head) * 4
    assert not torch.equal(in_autocast, expected)  # so the equalities above are the fp32 head's


@pytest.mark.parametrize("where,level", [("head_row_level0", 0), ("head_row_level1", 1), ("query", 0)])
@pytest.mark.parametrize("level_head", [True, False])
def test_nan_in_the_weights_or_the_query_is_an_error_not_a_dropped_beam(where, level, level_head):
    sizes = [3, 6, 6]
    generator = tiny_generator(9, sizes)
    rng = np.random.default_rng(9)
    trie = build_trie(random_codes(rng, sizes, 40), backend="cpp")
    z = queries(rng, 4)
    if where == "query":
        z[2, 5] = float("nan")
    else:  # one row of the (tied) output head: a code of level 0 or 1
        with torch.no_grad():
            generator.t5.lm_head.weight[generator.offsets[level] + 1, 3] = float("nan")
    # The full-vocabulary head normalises over every row: a NaN anywhere breaks the first level.
    expected_level = level if level_head else 0
    queries_hit = "1 of 4" if where == "query" else "4 of 4"
    with pytest.raises(FloatingPointError, match=rf"NaN or \+inf scores at level {expected_level} for {queries_hit} "
                                                 r"queries; the generator's weights or inputs hold NaN/inf"):
        constrained_beam_search(generator, z, trie, sizes, num_beams=5, level_head=level_head)


def test_decode_loop_copies_to_the_host_once_per_level():
    # The trie needs the chosen parents, codes and beam states on the host at every level: one
    # copy for all of them; the masks go the other way from a reused (on a GPU, pinned) buffer.
    rng = np.random.default_rng(2)
    for sizes in ([3, 8, 8], [3, 8, 8, 8, 8, 8]):
        generator = tiny_generator(2, sizes)
        trie = build_trie(random_codes(rng, sizes, 200), backend="cpp")
        z = queries(rng, 6)
        for autocast in (False, True):
            with count_host_syncs() as calls:
                constrained_beam_search(generator, z, trie, sizes, num_beams=8, batch_size=3, autocast=autocast)
            assert sum(calls.values()) == 2 * len(sizes), (sizes, autocast, dict(calls))  # 2 batches x 1 per level


def test_decode_loop_with_a_device_trie_copies_to_the_host_once_per_batch():
    # The GPU-ready loop: the trie's mask and step run on the decoding device, and the only host
    # copy is the score check after the last level, however many levels there are.
    rng = np.random.default_rng(2)
    for sizes in ([3, 8, 8], [3, 8, 8, 8, 8, 8]):
        generator = tiny_generator(2, sizes)
        trie = DeviceTrie.from_trie(build_trie(random_codes(rng, sizes, 200), backend="cpp"), sizes)
        z = queries(rng, 6)
        with count_host_syncs() as calls:
            constrained_beam_search(generator, z, trie, sizes, num_beams=8, batch_size=3)
        assert sum(calls.values()) == 2, (sizes, dict(calls))  # 2 batches x 1


@pytest.mark.parametrize("seed,sizes,pool,beams,layers", CASES[::3])
@pytest.mark.parametrize("dense_budget", [0, 2**24])
def test_a_device_trie_gives_the_host_tries_beams(seed, sizes, pool, beams, layers, dense_budget):
    rng = np.random.default_rng(seed)
    generator = tiny_generator(seed, sizes, layers=layers)
    host = build_trie(random_codes(rng, sizes, pool), backend="cpp")
    device = DeviceTrie.from_trie(host, sizes, dense_budget=dense_budget)
    z = queries(rng, 5)
    for level_head, threshold in ((True, 0.0), (False, 0.3)):
        expected = constrained_beam_search(generator, z, host, sizes, num_beams=beams, level_head=level_head,
                                           batch_size=2, modality_threshold=threshold)
        ours = constrained_beam_search(generator, z, device, sizes, num_beams=beams, level_head=level_head,
                                       batch_size=2, modality_threshold=threshold)
        assert torch.equal(ours.codes, expected.codes) and torch.equal(ours.valid, expected.valid)
        assert torch.equal(ours.scores, expected.scores)


@pytest.mark.parametrize("level_head", [True, False])
def test_nan_with_a_device_trie_is_the_same_error_after_the_search(level_head):
    sizes = [3, 6, 6]
    generator = tiny_generator(5, sizes)
    with torch.no_grad():
        generator.t5.shared.weight[generator.offsets[1] + 2] = float("nan")
    rng = np.random.default_rng(5)
    trie = DeviceTrie.from_trie(build_trie(random_codes(rng, sizes, 60), backend="cpp"), sizes)
    expected_level = 1 if level_head else 0
    with pytest.raises(FloatingPointError, match=rf"NaN or \+inf scores at level {expected_level} for 4 of 4 queries"):
        constrained_beam_search(generator, queries(rng, 4), trie, sizes, num_beams=5, level_head=level_head)


def test_int8_decoding_returns_trie_ids_close_to_fp32():
    """int8 products: every beam a trie ID, the best beam mostly the fp32 one, scores close; the
    search refuses int8 together with autocast."""
    rng = np.random.default_rng(6)
    sizes = [3, 8, 8, 8]
    generator = tiny_generator(6, sizes)
    trie = PythonTrie.build(random_codes(rng, sizes, 150))
    z = queries(rng, 12)
    exact = constrained_beam_search(generator, z, trie, sizes, num_beams=10)
    int8 = constrained_beam_search(generator, z, trie, sizes, num_beams=10, int8=True)
    known = {tuple(r) for r in trie.ids().tolist()}
    assert int8.valid.all() and all(tuple(r) in known for r in int8.codes.reshape(-1, 4).tolist())
    assert (int8.codes[:, 0] == exact.codes[:, 0]).all(-1).float().mean() >= 0.8
    assert not torch.equal(int8.scores, exact.scores)
    torch.testing.assert_close(int8.scores[:, 0], exact.scores[:, 0], atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="exclude each other"):
        constrained_beam_search(generator, z, trie, sizes, num_beams=10, int8=True, autocast=True)


def test_a_prepared_decoder_gives_the_searchs_own_beams_and_must_match_its_settings():
    """A decoder prepared once and passed to every search (as evaluation does, int8 packing being
    costly) gives exactly the beams of a search that prepares its own; each search without one
    reads the weights as they are then; a decoder of other settings is refused."""
    rng = np.random.default_rng(7)
    sizes = [3, 6, 6]
    generator = tiny_generator(7, sizes)
    trie = PythonTrie.build(random_codes(rng, sizes, 40))
    z = queries(rng, 4)
    for int8 in (False, True):
        decoder = prepare_decoder(generator, z.device, int8=int8)
        own = constrained_beam_search(generator, z, trie, sizes, num_beams=5, int8=int8)
        for _ in range(2):
            reused = constrained_beam_search(generator, z, trie, sizes, num_beams=5, int8=int8, decoder=decoder)
            assert torch.equal(reused.codes, own.codes) and torch.equal(reused.scores, own.scores)
    with torch.no_grad():
        generator.t5.decoder.block[0].layer[2].DenseReluDense.wo.weight.mul_(-3.0)  # as an optimizer step would
    after = constrained_beam_search(generator, z, trie, sizes, num_beams=5)
    torch.testing.assert_close(after.scores, teacher_forced_scores(generator, z, after.codes, True), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="prepare one with the search's settings"):
        constrained_beam_search(generator, z, trie, sizes, num_beams=5, decoder=decoder)  # an int8 one, fp32 asked


def test_a_search_makes_its_fp32_products_in_onednn_where_the_cpu_wants_it_and_keeps_generates_beams(monkeypatch):
    """The search runs under ``fp32_products_in_onednn`` (on for AMD CPUs with AVX-512): inside it
    torch's switch is set, after it restored; at shapes large enough for oneDNN (50 beams, d_model
    128) the full-vocabulary beams are still ``generate``'s, made with torch's default products."""
    rng = np.random.default_rng(31)
    sizes = [3, 16, 16, 16]
    generator = tiny_generator(31, sizes, d_model=128)
    trie = PythonTrie.build(random_codes(rng, sizes, 2000))
    z = queries(rng, 6)
    precision = torch.backends.mkldnn.matmul
    before, seen, encode = precision.fp32_precision, [], generator.encode

    def recording_encode(queries):
        seen.append(precision.fp32_precision)
        return encode(queries)

    monkeypatch.setattr(generator, "encode", recording_encode)
    for on in (cpu.onednn_fp32_on(), True):
        monkeypatch.setattr(cpu, "onednn_fp32_on", lambda: on)
        seen.clear()
        ours = constrained_beam_search(generator, z, trie, sizes, num_beams=50, level_head=False, batch_size=3)
        assert seen == ["bf16" if on else before] * 2 and precision.fp32_precision == before
        reference = generate_reference(generator, z, trie, 50)
        assert torch.equal(ours.codes, reference.codes) and torch.equal(ours.valid, reference.valid)
        torch.testing.assert_close(ours.scores, reference.scores, atol=1e-4, rtol=1e-5)
