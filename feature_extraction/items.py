"""What the encoders see for each M-BEIR record: its text (with the query instruction) and image.

Shared by extraction and CLIP-SF training so both build identical inputs:
- a query's text is ``query_text_with_instruction(instruction, query_txt)``; an image-only query
  thus gets the instruction alone as its text (text mask 1); with instructions off it keeps
  ``format_string(query_txt)`` (empty for an image-only query, text mask 0);
- a candidate's text is ``format_string(txt)``, never with an instruction;
- masks follow content: text mask 1 iff the final text is non-empty, image mask 1 iff there is an
  image path.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from genius.common.mbeir import (
    MODALITY_CODE,
    Candidate,
    InstructionMode,
    Instructions,
    Query,
    format_string,
    query_text_with_instruction,
)


@dataclass
class InstructionConfig:
    mode: InstructionMode = "deterministic"  # deterministic | random | first | none (see Instructions.choose)
    # "random" mode: draws are seeded by (seed, file, chunk) in extraction and (seed, epoch, query) in
    # training, so the process count never changes which instruction a query gets.
    seed: int = 2023


@dataclass(frozen=True)
class Item:
    id: int  # hashed qid / did
    text: str  # what the text tower embeds ("" = no text)
    img_path: str | None  # relative to the data root
    modality: int  # the record's own modality code
    target_modality: int  # queries: what the task asks for; candidates: = modality


class QueryText:
    """Builds query texts: the instruction chosen by ``Instructions.choose`` in ``mode``."""

    def __init__(self, instructions_file: str | Path | None, mode: InstructionMode):
        self.mode = mode
        if mode == "none":
            self.instructions = None
        elif instructions_file is None or not Path(instructions_file).is_file():
            raise FileNotFoundError(f"data.instructions: {instructions_file} does not exist, and instructions.mode "
                                    f"{mode!r} needs it; fix data.instructions (relative to data.root) or set "
                                    "instructions.mode: none to embed queries without instructions")
        else:
            self.instructions = Instructions.load(instructions_file)
        self.instructions_file = instructions_file

    def __call__(self, query: Query, target: str, rng: random.Random | None = None) -> str:
        if self.instructions is None:
            return format_string(query.text)
        try:
            instruction = self.instructions.choose(query.qid, query.modality, target, self.mode, rng)
        except KeyError as err:
            dataset = query.qid.split(":")[0]
            raise ValueError(f"query {query.qid}: {err.args[0]}; add a row 'query_modality<TAB>cand_modality<TAB>"
                             f"name<TAB>{dataset}<TAB>instruction' for {query.modality} -> {target} to "
                             f"{self.instructions_file}, or set instructions.mode: none") from None
        return query_text_with_instruction(instruction, query.text)


def query_item(query: Query, target: str, text: str) -> Item:
    return Item(query.hashed, text, query.img_path, MODALITY_CODE[query.modality], MODALITY_CODE[target])


def candidate_item(cand: Candidate) -> Item:
    code = MODALITY_CODE[cand.modality]
    return Item(cand.hashed, format_string(cand.text), cand.img_path, code, code)
