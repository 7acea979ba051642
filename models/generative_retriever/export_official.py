"""``genius export-official``: a native run written in the layout of the released GENIUS files.

    genius export-official --rq checkpoint/large/rq/rq.pt --generator checkpoint/large/gen/generator.pt \
        --out checkpoint/large/official

writes ``<out>/rq_clip_large.pth`` (the quantizer) and, with ``--generator``, ``<out>/GENIUS_t5small.pth``
(a ``quantizer.*`` copy, the T5 as ``id_generator.*``, ``embed_projector.0.*``), each a
``{model, config, epoch}`` dict with the official tensor names, shapes, dtypes and aliasing (see
the two ``official.py`` modules, which hold the name maps both ways). ``config`` is plain data
(what the files were made from, and the official ``codebook_config`` values), so the files load
with ``torch.load(weights_only=True)``. Users of the official code can evaluate them there, and
``genius eval`` evaluates them with ``paths.official_checkpoint`` (identical results to the native
run's, which the tests check). The written files are loaded back and checked before returning.

What the layout cannot express is refused:
- an ``assigned``-modality quantizer (the default of train-rq). Its level 0 is the item's
  modality, given from metadata; the official code, and this project's official loader, pick
  level 0 by the nearest of the three codewords instead, so some candidates would get other IDs
  than the run assigned them. ``--allow-assigned`` exports anyway, with a warning (``config``
  records the source arch, modality_mode included); the level-0 codewords are the per-modality
  centroids, so most items keep their modality code (assign-codes' stats.json reports the share
  as ``level0_matches_modality``), and genius eval refuses the run's own assigned codes for it.
- a generator whose settings the official loader cannot read from the tensor shapes (it assumes
  t5-small's relative-attention distance, layer-norm epsilon and ReLU feed-forward).
The quantizer's training-only settings (EMA decay and eps, dead-code threshold) leave no trace
in tensors; loaders assume the official values, and ``config`` records the run's.
Shapes the official code does not build by default (anything but the paper's Combiner widths and
t5-small) are written with a warning: they load here, but the official code needs its widths changed.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from genius.common.io import atomic_torch_save, sha256_file
from genius.common.stage import ArgumentParser, add_debug_flag, setup_logging, user_errors_exit
from genius.models.generative_retriever import official as gen_official
from genius.models.generative_retriever.generator import T5_SMALL, IDGenerator, load_generator
from genius.models.residual_quantization import official as rq_official
from genius.models.residual_quantization.model import RQModel, cpu_state, load_rq, rq_record, state_fingerprint

log = logging.getLogger("genius.export_official")

RQ_FILE, GENERATOR_FILE = "rq_clip_large.pth", "GENIUS_t5small.pth"
# The widths the official code builds (CLIP ViT-L/14 features, its Combiner, t5-small, 30 prefix vectors).
OFFICIAL_COMBINER = {"dim": 768, "proj_dim": 2560, "hidden_dim": 5120}
OFFICIAL_T5 = {"num_prefix": 30, **{key: T5_SMALL[key] for key in (
    "d_model", "num_heads", "d_kv", "d_ff", "num_decoder_layers", "relative_attention_num_buckets")}}


class ExportError(ValueError):
    """A run the official layout cannot express (or inputs that do not belong together)."""


def _plain(obj) -> dict:
    """JSON-level data only, so the file loads with torch.load(weights_only=True)."""
    return json.loads(json.dumps(obj, default=str))


def _last_epoch(config: dict) -> int | None:
    """The official loops count epochs from 0 and save the index of the last finished one."""
    epochs = (config or {}).get("train", {}).get("epochs")
    return epochs - 1 if isinstance(epochs, int) else None


def _differences(arch: dict, official: dict) -> list[str]:
    return [f"{key} {arch.get(key)} (official {value})" for key, value in official.items() if arch.get(key) != value]


def check_rq(rq: RQModel, rq_path: Path, allow_assigned: bool) -> None:
    if not rq.has_modality_level:
        raise ExportError(f"{rq_path} has no modality level (model.modality_level: false, IRGen's ID shape); the "
                          "official layout's first level is the 3-code modality level, so the official code cannot "
                          "load it (genius loads it as is)")
    if rq.arch["modality_mode"] != "learned":
        message = (f"{rq_path} is an {rq.arch['modality_mode']!r}-modality quantizer: its level 0 is each item's "
                   "modality, but the official code picks level 0 by nearest codeword, so some candidates would get "
                   "other IDs than this run gave them")
        if not allow_assigned:
            raise ExportError(f"{message}; train with model.modality_mode: learned, or pass --allow-assigned to "
                              "export anyway")
        log.warning("%s; exporting anyway (--allow-assigned). Run genius assign-codes on the exported file and read "
                    "level0_matches_modality in stats.json for the share of candidates that keep their modality", message)
    if _differences(rq.arch, OFFICIAL_COMBINER):
        log.warning("%s: Combiner %s; the official code builds the paper's widths, so it needs them changed to load "
                    "this file (genius loads it as is)", rq_path, ", ".join(_differences(rq.arch, OFFICIAL_COMBINER)))


def check_generator(generator: IDGenerator, state: dict, gen_path: Path) -> None:
    """Refuse settings the official loader would not rebuild from the shapes (dropout does not
    matter at evaluation); warn about shapes the official code does not build."""
    if generator.arch.get("condition", "prefix") != "prefix":
        raise ExportError(f"{gen_path}: model.condition {generator.arch['condition']!r} (IRGen's decoder over image "
                          "tokens) has no official layout: the official generator reads prefix vectors")
    inferred = gen_official.official_arch(state, generator.codebook_sizes)
    lost = [key for key in generator.arch if key != "dropout" and inferred.get(key) != generator.arch[key]]
    if lost:
        raise ExportError(f"{gen_path}: {', '.join(f'{k}={generator.arch[k]!r}' for k in lost)} cannot be expressed "
                          "in the official layout (it holds tensors only; the official code uses t5-small's values)")
    if _differences(generator.arch, OFFICIAL_T5):
        log.warning("%s: %s; the official code builds t5-small with 30 prefix vectors, so it needs these changed to "
                    "load this file (genius loads it as is)", gen_path, ", ".join(_differences(generator.arch, OFFICIAL_T5)))


def export_official(rq_path: Path, out_dir: Path, gen_path: Path | None = None, allow_assigned: bool = False,
                    overwrite: bool = False) -> list[Path]:
    """Write the official-layout files of a native run; returns their paths (module docstring).

    Everything is checked before anything is written. Existing files are replaced only with
    ``overwrite`` (``--out`` could be the folder of the downloaded release); then a
    GENIUS_t5small.pth not rewritten is removed, since it would not match the new quantizer.
    """
    for path, stage in ((rq_path, "genius train-rq"), (gen_path, "genius train-gen")):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run {stage} first (or fix the path)")
    existing = [path.name for path in (out_dir / RQ_FILE, out_dir / GENERATOR_FILE) if path.exists()]
    if existing and not overwrite:
        raise ExportError(f"{out_dir} already holds {' and '.join(existing)}; pass --overwrite to replace "
                          "(or choose another --out)")
    rq, record = load_rq(rq_path), rq_record(rq_path)
    check_rq(rq, rq_path, allow_assigned)
    rq_state, sizes = cpu_state(rq), rq.codebook_sizes
    provenance = {"rq": {"file": str(rq_path.resolve()), "fingerprint": record["fingerprint"], "arch": rq.arch,
                         "config": record.get("config")}}
    files = {out_dir / RQ_FILE: (rq_official.to_official_state(rq_state, rq.arch), record.get("config"))}
    generator = None
    if gen_path is not None:
        generator, meta = load_generator(gen_path)
        if meta.get("rq") != record["fingerprint"]:
            raise ExportError(f"{gen_path} was trained on a different rq.pt than {rq_path}; pass the quantizer it was "
                              "trained with")
        # state_dict keeps the tied embeddings as views of one storage, so they are written once.
        generator_state = {name: tensor.detach() for name, tensor in generator.state_dict().items()}
        state = gen_official.to_official_state(generator_state, rq_state, rq.arch)
        check_generator(generator, {name: t for name, t in state.items()
                                    if not name.startswith(rq_official.GENERATOR_QUANTIZER_PREFIX)}, gen_path)
        provenance["generator"] = {"file": str(gen_path.resolve()), "sha256": sha256_file(gen_path),
                                   "arch": generator.arch, "config": meta.get("config")}
        files[out_dir / GENERATOR_FILE] = (state, meta.get("config"))
    config = _plain({"exported_by": "genius export-official",
                     "codebook_config": {"codebook_level": len(sizes) - 1, "codebook_vocab": max(sizes[1:], default=0)},
                     "genius": provenance})
    for path, (state, training_config) in files.items():
        atomic_torch_save({"model": state, "config": config, "epoch": _last_epoch(training_config)}, path)
    if gen_path is None and (out_dir / GENERATOR_FILE).exists():
        log.warning("removing %s: an earlier export's generator, which does not match the new quantizer",
                    out_dir / GENERATOR_FILE)
        (out_dir / GENERATOR_FILE).unlink()
    verify(list(files), record["fingerprint"], generator)
    return list(files)


def verify(written: list[Path], rq_fp: str, generator: IDGenerator | None) -> None:
    """Load the files back with the official loaders: the same quantizer and generator weights."""
    quantizers = [rq_official.load_official_rq(written[0])]
    if generator is not None:
        loaded, quantizer = gen_official.load_official_generator(written[1])
        quantizers.append(quantizer)
        if state_fingerprint(loaded.state_dict()) != state_fingerprint(generator.state_dict()):
            raise ExportError(f"{written[1]} does not load back to the exported generator's weights (a bug)")
    for path, quantizer in zip(written, quantizers):
        if rq_official.quantizer_fingerprint(quantizer) != rq_fp:
            raise ExportError(f"{path} does not load back to the exported quantizer's weights (a bug)")


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = ArgumentParser(prog="genius export-official",
                            description="Write a native run as rq_clip_large.pth / GENIUS_t5small.pth "
                                        "(the official GENIUS checkpoint layout).")
    parser.add_argument("--rq", required=True, type=Path, help="the run's rq.pt (genius train-rq)")
    parser.add_argument("--generator", type=Path, default=None,
                        help="the run's generator.pt (genius train-gen); without it only rq_clip_large.pth is written")
    parser.add_argument("--out", required=True, type=Path, help=f"folder for {RQ_FILE} and {GENERATOR_FILE}")
    parser.add_argument("--allow-assigned", action="store_true",
                        help="export an assigned-modality quantizer although the official code assigns level 0 "
                             "by nearest codeword (some candidates then get other IDs)")
    parser.add_argument("--overwrite", action="store_true", help=f"replace {RQ_FILE} / {GENERATOR_FILE} in --out")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        written = export_official(args.rq, args.out, args.generator, args.allow_assigned, args.overwrite)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
