"""Stage 1 building blocks: k-means, EMA codebooks, the modality level, the residual quantizer's
properties (prefix codes, encode/decode), the straight-through gradient, and real CLIP vectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from genius.models.residual_quantization.model import Combiner, RQModel
from genius.models.residual_quantization.quantizer import EMACodebook, ResidualQuantizer, kmeans


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def trained_quantizer(z: torch.Tensor, modality: torch.Tensor, levels: int, k: int, passes: int = 3,
                      batch: int = 32, mode: str = "assigned") -> ResidualQuantizer:
    """Initialise on ``z`` by k-means, then run EMA passes over it in batches."""
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(z.shape[1], levels, k, mode)
    quantizer.initialise(z, modality, kmeans_iters=20, generator=torch.Generator().manual_seed(0))
    quantizer.train()
    for _ in range(passes):
        order = torch.randperm(len(z))
        for start in range(0, len(z), batch):
            rows = order[start:start + batch]
            quantizer(z[rows], modality[rows])
    return quantizer.eval()


# ---- k-means and EMA ------------------------------------------------------------------------
def test_kmeans_seeds_distinct_codes_even_from_a_batch_with_repeats():
    x = unit(20, 8, 0)
    centroids, counts = kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(centroids, dim=0)) == 8
    assert counts.sum() == 20

    repeated = unit(5, 8, 1).repeat(6, 1)  # 30 rows, 5 distinct, 8 codes wanted
    centroids, counts = kmeans(repeated, 8, iters=10, generator=torch.Generator().manual_seed(0))
    assert len(torch.unique(centroids[:5], dim=0)) == 5  # every distinct row seeds its own code
    assert counts[:5].tolist() == [6] * 5 and counts[5:].sum() == 0  # surplus codes start dead


def test_ema_update_follows_the_formula_with_laplace_smoothing():
    book = EMACodebook(size=3, dim=2, decay=0.9, eps=1e-5, dead_code_threshold=0)
    book.set_codewords(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]), torch.tensor([4.0, 2.0, 1.0]))
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 2.0]])
    codes = torch.tensor([0, 1, 1])
    book.ema_update(x, codes)
    size = torch.tensor([0.9 * 4 + 0.1 * 1, 0.9 * 2 + 0.1 * 2, 0.9 * 1])
    avg = torch.stack([0.9 * torch.tensor([0.0, 0.0]) + 0.1 * x[0],
                       0.9 * torch.tensor([2.0, 2.0]) + 0.1 * (x[1] + x[2]),
                       0.9 * torch.tensor([5.0, 5.0])])
    smoothed = (size + 1e-5) / (size.sum() + 3e-5) * size.sum()
    assert torch.allclose(book.cluster_size, size)
    assert torch.allclose(book.embed, avg / smoothed[:, None], atol=1e-6)


def test_dead_codes_are_reseeded_with_batch_residuals():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(4, 2, 4, dead_code_threshold=2.0)
    z = unit(32, 4, 2)
    modality = torch.zeros(32, dtype=torch.long)
    quantizer.initialise(z, modality, 10, torch.Generator().manual_seed(0))
    far = torch.full((4,), 100.0)
    book = quantizer.levels[1]
    codewords = book.embed.clone()
    codewords[3] = far  # never the nearest: its EMA count decays below 2
    book.set_codewords(codewords, book.cluster_size.clone().clamp(min=4.0))
    quantizer.train()
    resets = [int(quantizer(z, modality).resets[1]) for _ in range(25)]
    assert sum(resets) > 0
    residuals = z - quantizer.levels[0].embed[0]
    replacement = quantizer.levels[1].embed[3]
    assert not torch.equal(replacement, far)
    assert quantizer.levels[1].cluster_size.min() >= 2.0 - 1e-6
    assert torch.cdist(replacement[None], residuals).min() < 0.5  # seeded near a batch residual, then EMA


def test_training_needs_initialised_codebooks_and_valid_modalities():
    quantizer = ResidualQuantizer(4, 3, 8).train()
    with pytest.raises(RuntimeError, match="initialise"):
        quantizer(unit(4, 4, 0), torch.zeros(4, dtype=torch.long))
    quantizer.eval()
    with pytest.raises(ValueError, match="modality code 3"):
        quantizer(unit(2, 4, 0), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="level-0 modality"):
        quantizer(unit(2, 4, 0), None)


# ---- the modality level ---------------------------------------------------------------------
def test_assigned_level0_is_the_modality_and_its_codeword_the_modality_mean():
    z = unit(60, 8, 3)
    modality = torch.arange(60) % 3
    quantizer = ResidualQuantizer(8, 3, 4)
    quantizer.initialise(z, modality, 10, torch.Generator().manual_seed(0))
    codes = quantizer(z, modality, update=False).codes
    assert torch.equal(codes[:, 0], modality)
    for m in range(3):
        assert torch.allclose(quantizer.levels[0].embed[m], z[modality == m].mean(0), atol=1e-6)
    # a batch without text items leaves the text centroid where it was (up to Laplace smoothing)
    text_centroid = quantizer.levels[0].embed[1].clone()
    for _ in range(20):
        quantizer.train()(z[modality != 1], modality[modality != 1])
    assert torch.allclose(quantizer.levels[0].embed[1], text_centroid, rtol=1e-4)


# ---- properties -----------------------------------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(levels=st.integers(1, 4), seed=st.integers(0, 1000))
def test_a_truncated_quantizer_gives_a_prefix_of_the_codes(levels, seed):
    z = unit(64, 6, seed)
    modality = torch.arange(64) % 3
    full = ResidualQuantizer(6, 5, 8)
    full.initialise(z, modality, 5, torch.Generator().manual_seed(seed))
    short = ResidualQuantizer(6, levels, 8)
    short.load_state_dict({k: v for k, v in full.state_dict().items() if int(k.split(".")[1]) < levels})
    assert torch.equal(short(z, modality, update=False).codes, full(z, modality, update=False).codes[:, :levels])


@settings(max_examples=20, deadline=None)
@given(codes=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=16),
       mode=st.sampled_from(["assigned", "learned"]))
def test_encode_decode_round_trip(codes, mode):
    """With well-separated codebooks (each level 10x finer), encode(decode(c)) == c, and the
    quantized output always equals decode(encode(z))."""
    dim = 16
    quantizer = ResidualQuantizer(dim, 3, 8, mode)
    for level, book in enumerate(quantizer.levels):
        directions = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(level)))[0]
        book.set_codewords(directions[: book.size] * 10.0 ** -level, torch.ones(book.size))
    codes = torch.tensor(codes)
    z = quantizer.decode(codes)
    out = quantizer(z, codes[:, 0], update=False)
    assert torch.equal(out.codes, codes)
    noisy = z + 0.01 * unit(len(z), dim, 5)
    out = quantizer(noisy, codes[:, 0], update=False)
    assert torch.allclose(out.quantized, quantizer.decode(out.codes), atol=1e-6)


def test_straight_through_gradient_is_the_identity():
    quantizer = ResidualQuantizer(8, 3, 4)
    z0 = unit(30, 8, 4)
    modality = torch.arange(30) % 3
    quantizer.initialise(z0, modality, 5, torch.Generator().manual_seed(0))
    z = z0.clone().requires_grad_()
    out = quantizer(z, modality, update=False)
    weights = torch.randn(30, 8)
    (out.quantized * weights).sum().backward()
    assert torch.equal(z.grad, weights)
    # commitment: d/dz of mean_l mse(residual_l, codeword_l); every residual_l is z minus constants
    z.grad = None
    quantizer(z, modality, update=False).commit_loss.backward()
    books = [quantizer.levels[l].embed[out.codes[:, l]] for l in range(3)]
    residuals = [z0 - sum(books[:l], torch.zeros_like(z0)) for l in range(3)]
    expected = sum(2 * (r - b) / r.numel() for r, b in zip(residuals, books)) / 3
    assert torch.allclose(z.grad, expected, atol=1e-7)


# ---- the Combiner ---------------------------------------------------------------------------
def test_combiner_matches_the_reference_formula():
    torch.manual_seed(0)
    model = RQModel(dim=6, proj_dim=5, hidden_dim=7, num_levels=2, codebook_size=4)
    c: Combiner = model.combiner
    img, txt = torch.randn(4, 6), torch.randn(4, 6)
    img_mask, txt_mask = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    i, t = img * img_mask[:, None], txt * txt_mask[:, None]
    projected = torch.cat([torch.relu(t @ c.text_projection_layer.weight.T + c.text_projection_layer.bias),
                           torch.relu(i @ c.image_projection_layer.weight.T + c.image_projection_layer.bias)], -1)
    branch = c.output_layer(torch.relu(c.combiner_layer(projected)))
    gate = torch.sigmoid(c.gate_out(torch.relu(c.gate_hidden(projected))))
    expected = F.normalize(branch + gate * t + (1 - gate) * i, dim=-1)
    assert torch.allclose(model.embed(img, txt, img_mask, txt_mask), expected, atol=1e-6)


# ---- real CLIP geometry ---------------------------------------------------------------------
def test_real_clip_vectors_error_falls_with_every_level_and_no_code_is_dead(shared_data):
    path = shared_data / "clip_vitb32_embeddings" / "coco128_image_embeddings.npy"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    z = F.normalize(torch.from_numpy(np.load(path).astype(np.float32)), dim=-1)  # 378 image vectors
    modality = torch.zeros(len(z), dtype=torch.long)
    levels, k = 5, 8
    quantizer = trained_quantizer(z, modality, levels, k, passes=8, batch=63)
    codes = quantizer(z, modality, update=False).codes
    reconstruction, errors = torch.zeros_like(z), [float(z.pow(2).sum(1).mean())]
    for level in range(levels):
        reconstruction += quantizer.levels[level].embed[codes[:, level]]
        errors.append(float((z - reconstruction).pow(2).sum(1).mean()))
    print("CLIP ViT-B/32 quantization error: input", errors[0], "after each level", errors[1:])
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    for level in range(1, levels):
        used = torch.bincount(codes[:, level], minlength=k)
        assert (used > 0).all(), f"level {level} has unused codes: {used.tolist()}"
        assert (quantizer.levels[level].cluster_size >= 2.0 - 1e-6).all()
