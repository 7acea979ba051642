"""Loading a run's models for decoding: what ``genius eval`` and ``genius search`` share.

The models come either from a native run (``rq.pt`` of genius train-rq and ``generator.pt`` of
genius train-gen) or from an official-layout ``GENIUS_t5small.pth`` (its embedded quantizer in
learned modality mode and its T5). Their identity is a pair of content fingerprints
(:func:`model_fingerprints`), recorded in every decoding, run key and run manifest, so nothing
made by other weights is reused; they hold no paths, so a GENIUS_ROOT copied elsewhere reuses
everything.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from genius.common.checkpoint import CONTENT_KEY, load_own_checkpoint
from genius.common.config import ConfigError
from genius.common.distributed import recheck_threads, set_cpu_threads
from genius.common.runstate import content_sha256
from genius.models.residual_quantization.assign_codes import combiner_autocast


class StaleInputError(ValueError):
    """An input made from something other than what the rest of the evaluation uses."""


@dataclass
class Models:
    """What decoding needs; ``load_models`` builds it from a native run or an official checkpoint.

    ``embed(img, txt, img_mask, txt_mask) -> z [B, dim]`` (float32, CPU tensors in and out) and
    ``decode(queries, trie) -> BeamResult``, where ``queries`` is z, or with ``preprocess`` set (an
    image_tokens generator) the queries' uint8 images [B, 3, S, S] as ``preprocess.to_uint8`` crops
    them; ``fingerprints`` key every cached decoding. Codes are only accepted if made by the
    quantizer ``fingerprints["rq"]`` in ``modality_mode`` with ``codebook_sizes`` (the generator's
    vocabulary).
    """

    embed: Callable[..., torch.Tensor]
    decode: Callable
    fingerprints: dict
    codebook_sizes: list[int]
    modality_mode: str
    files: dict = field(default_factory=dict)  # "rq" / "generator" -> checkpoint path, for messages and the manifest
    preprocess: Any = None  # the ImagePreprocess of an image_tokens generator's query images; None: it reads z

    def changed_files(self, recorded: dict) -> str:
        """The checkpoint files whose fingerprints differ from ``recorded`` (a run's), for a message."""
        changed = [key for key in self.fingerprints if self.fingerprints[key] != recorded.get(key)]
        return " and ".join(dict.fromkeys(str(self.files.get(key, key)) for key in changed)) or "the models"


def checkpoint_files(paths: Any) -> list[Path]:
    """The model files an eval config's ``paths`` section names: [official] or [rq.pt, generator.pt]."""
    from genius.common.config import resolve_path

    if paths.official_checkpoint is not None:
        return [resolve_path(paths.official_checkpoint)]
    return [resolve_path(paths.rq_run) / "rq.pt", resolve_path(paths.gen_run) / "generator.pt"]


def _require_files(paths: Any) -> list[Path]:
    files = checkpoint_files(paths)
    missing = [path for path in files if not path.is_file()]
    if missing:
        hint = ("download GENIUS_t5small.pth (Hugging Face Sungyeon/GENIUS) or run genius export-official"
                if paths.official_checkpoint is not None else "run genius train-rq and genius train-gen first")
        raise FileNotFoundError(f"{missing[0]}: checkpoint does not exist; {hint} (or fix paths in the eval config)")
    return files


def model_fingerprints(paths: Any) -> dict:
    """The models' identity without loading their weights: a native run's quantizer fingerprint
    (recorded in rq.pt) and the generator's content digest (recorded in generator.pt, checked
    when the weights are loaded); an official file's SHA-256 (its quantizer is only known loaded,
    so ``load_models`` adds it)."""
    from genius.models.residual_quantization.model import rq_fingerprint

    files = _require_files(paths)
    if paths.official_checkpoint is not None:
        return {"official": content_sha256(files[0])}
    rq_path, gen_path = files
    return {"rq": rq_fingerprint(rq_path),
            "generator": load_own_checkpoint(gen_path, verify=False, mmap=True, kind="generator")[CONTENT_KEY]}


def reads_query_images(paths: Any, models: Models | None = None) -> bool:
    """Whether the run's generator reads the query images (an image_tokens generator) rather than
    the query store, from the loaded ``models`` or else from generator.pt's recorded arch."""
    if models is not None:
        return models.preprocess is not None
    if paths.official_checkpoint is not None:
        return False
    _, gen_path = _require_files(paths)
    # generator.IMAGE_TOKENS, spelt out: importing generator.py loads transformers
    arch = load_own_checkpoint(gen_path, verify=False, mmap=True, kind="generator")["arch"]
    return arch.get("condition") == "image_tokens"


def check_int8_device(device: torch.device) -> None:
    """decoding.int8 needs a CPU, the C++ decoding kernels and an exact int8 product; otherwise a
    ConfigError naming the key."""
    from genius.models.generative_retriever.fused_decoder import int8_decoding_problem

    problem = int8_decoding_problem(device)
    if problem:
        raise ConfigError(f"decoding.int8: {problem}")


def load_models(cfg: Any, device: torch.device) -> Models:
    """The models of an eval config (``cfg.paths`` and ``cfg.decoding``), on ``device``."""
    # Imported here: the driver and its tests run with stand-in models without loading transformers.
    from genius.models.generative_retriever.beam_search import constrained_beam_search, prepare_decoder
    from genius.models.generative_retriever.device_trie import DeviceTrie

    if cfg.decoding.int8:
        check_int8_device(device)
    paths = cfg.paths
    fingerprints = model_fingerprints(paths)
    if paths.official_checkpoint is not None:
        from genius.models.generative_retriever.official import load_official_generator
        from genius.models.residual_quantization.official import quantizer_fingerprint

        (path,) = checkpoint_files(paths)
        generator, rq = load_official_generator(path)
        fingerprints = {"rq": quantizer_fingerprint(rq), "generator": fingerprints["official"]}
        files = {"rq": str(path), "generator": str(path)}
    else:
        from genius.models.generative_retriever.generator import load_generator
        from genius.models.residual_quantization.model import load_rq

        rq_path, gen_path = checkpoint_files(paths)
        rq = load_rq(rq_path)
        generator, meta = load_generator(gen_path)
        if meta.get("rq") != fingerprints["rq"]:
            raise StaleInputError(f"{gen_path}: trained on a different rq.pt than {rq_path}; retrain the "
                                  "generator (or point paths.rq_run at the quantizer it was trained with)")
        files = {"rq": str(rq_path), "generator": str(gen_path)}
    rq.to(device).eval()
    generator.to(device)
    dec = cfg.decoding
    if device.type == "cpu":  # threads by the size of a decoding step's feed-forward GEMM (common/distributed.py)
        arch = generator.arch
        set_cpu_threads(None, dec.batch_size * dec.num_beams * arch["d_model"] * arch["d_ff"])

    @torch.no_grad()
    def embed(img, txt, img_mask, txt_mask):
        with combiner_autocast(device, dec.combiner_autocast):
            z = rq.embed(img.to(device), txt.to(device), img_mask.to(device), txt_mask.to(device))
        return z.float().cpu()

    device_tries = weakref.WeakKeyDictionary()  # host trie -> its DeviceTrie, built once per pool
    # One prepared decoder for every batch (int8's packing would cost 0.24 s a batch at paper
    # size); these weights are loaded for decoding only and never change.
    decoder = prepare_decoder(generator, device, dec.autocast, dec.int8)

    def decode(queries, trie):
        recheck_threads()
        if dec.device_trie:
            if trie not in device_tries:
                device_tries[trie] = DeviceTrie.from_trie(trie, rq.codebook_sizes, device)
            trie = device_tries[trie]
        return constrained_beam_search(generator, queries.to(device), trie, rq.codebook_sizes, num_beams=dec.num_beams,
                                       batch_size=dec.batch_size, level_head=dec.level_head, autocast=dec.autocast,
                                       modality_threshold=dec.modality_threshold,
                                       modality_level=rq.has_modality_level, sibling_penalty=dec.sibling_penalty,
                                       int8=dec.int8, decoder=decoder)

    return Models(embed, decode, fingerprints, list(generator.codebook_sizes), rq.arch["modality_mode"], files,
                  getattr(generator, "preprocess", None))
