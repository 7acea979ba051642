"""``genius search``: query a finished evaluation run with a text and/or an image.

    genius search --run results/tiny --text "a small red circle on the left" -k 10
    genius search --run configs_scripts/tiny --image photo.png --target-modality text
    genius search --run my_index --text "a newly added caption"

``--run`` is a results directory holding ``run.json`` (written by ``genius eval``), a setting's
config folder (its ``eval.yaml`` names the results directory) or an index folder (``genius index``:
its current version is searched, with the run it serves). A command line over the Python API
(``api.Retriever``: how the run is loaded, the query built and ranked, the target modality
chosen); it prints the candidates with their did, modality, score, generated ID and text or image
path.
"""
from __future__ import annotations

import sys

from genius.common.mbeir import MODALITIES
from genius.common.stage import ArgumentParser, add_debug_flag, exit_user_error, setup_logging, user_errors_exit
from genius.models.generative_retriever.api import MAX_K, Hit, Retriever
from genius.models.generative_retriever.ranking import METHODS


def format_hits(hits: list[Hit]) -> str:
    lines = [f"{'rank':>4}  {'did':<14} {'modality':<10} {'score':>9}  {'generated ID':<16} content"]
    for h in hits:
        content = " | ".join(x for x in (h.text, h.image_path or "") if x)
        generated = "-" if h.generated_id is None else ",".join(map(str, h.generated_id))
        lines.append(f"{h.rank:>4}  {h.id:<14} {h.modality:<10} {h.score:>9.4f}  {generated:<16} {content}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = ArgumentParser(prog="genius search",
                            description="Search a finished GENIUS run with a text and/or image query.")
    parser.add_argument("--run", required=True,
                        help="results directory with run.json, a setting's config folder, or an index folder")
    parser.add_argument("--text", default="", help="query text")
    parser.add_argument("--image", default=None, help="query image file")
    parser.add_argument("--instruction", default=None, help="instruction to prepend (default: chosen as in extraction)")
    parser.add_argument("--target-modality", choices=MODALITIES, default=None,
                        help="what to retrieve (default: the pool's modality if it holds one; otherwise image for "
                             "text and image+text queries, text for image queries)")
    parser.add_argument("--dataset", type=int, default=None, help="dataset id whose instructions to use")
    parser.add_argument("-k", type=int, default=10, help="number of results")
    parser.add_argument("--pool", default=None,
                        help="pool file stem (default: the union pool if evaluated; not with an index folder)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="genius_r (re-ranked), genius (beam order) or dense (default: genius_r if the run "
                             "re-ranked, else genius)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.k <= MAX_K:  # before the run is loaded
        exit_user_error(parser, f"-k {args.k}: expected an integer in [1, {MAX_K}]")
    for flag in ("text", "instruction"):  # bytes the locale could not decode arrive as lone surrogates
        value = getattr(args, flag) or ""
        if any("\udc80" <= ch <= "\udcff" for ch in value):
            raw = value.encode("utf-8", "surrogateescape")[:40]
            exit_user_error(parser, f"--{flag}: not valid UTF-8 (bytes {raw!r}); give it in UTF-8, or set a UTF-8 "
                                    "locale (LANG=C.UTF-8)")
    with user_errors_exit(parser):
        retriever = Retriever.load(args.run, args.pool, args.device)
        hits = retriever.search(args.text, args.image, args.k, args.target_modality, args.instruction, args.method,
                                args.dataset)
    print(format_hits(hits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
