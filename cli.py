"""The ``genius`` command: one subcommand per stage, each a thin door into that stage's ``main``.

Stage modules are imported only when their subcommand runs, so ``genius --help`` is instant and
a stage's heavy imports (torch, open_clip, transformers) cost nothing elsewhere.
"""
from __future__ import annotations

import difflib
import importlib
import sys

SUBCOMMANDS = {
    "world": ("genius.synthetic.world", "write the synthetic M-BEIR-mini world"),
    "check-data": ("genius.common.check_data", "validate an M-BEIR-format data root"),
    "new-setting": ("genius.scaffold", "write a setting (stage YAMLs and run scripts) for your own data root"),
    "import-images": ("genius.common.image_collections",
                      "a class-per-folder image collection as an M-BEIR-layout root (image->image, task 4)"),
    "extract": ("genius.feature_extraction.extract", "stage 0: embed queries and candidate pools"),
    "train-clip": ("genius.feature_extraction.train_clip", "stage 0: train CLIP-SF (score-fusion contrastive)"),
    "train-rq": ("genius.models.residual_quantization.train", "stage 1: train the Combiner and residual quantizer"),
    "assign-codes": ("genius.models.residual_quantization.assign_codes", "stage 1: discrete IDs for every candidate pool"),
    "train-gen": ("genius.models.generative_retriever.train", "stage 2: train the T5 ID generator"),
    "eval": ("genius.models.generative_retriever.evaluate", "stage 3: constrained decoding and M-BEIR evaluation"),
    "search": ("genius.models.generative_retriever.search", "search a finished run with a text and/or image query"),
    "index": ("genius.models.generative_retriever.index", "a living index: build, add, remove, stats (drift report)"),
    "export-qrels": ("genius.models.generative_retriever.ir_metrics",
                     "write M-BEIR qrels as plain TREC qrels (for trec_eval on the run files)"),
    "export-official": ("genius.models.generative_retriever.export_official",
                        "write a run as rq_clip_large.pth / GENIUS_t5small.pth (the official layout)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: genius <command> [options]", "", "GENIUS-style generative universal multimodal retrieval.", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'genius <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        print(f"genius: error: unknown command {name!r}; {hint}run 'genius --help' for the commands", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
