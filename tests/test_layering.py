"""The layering rule of README "Layering", checked on every module's imports.

``common`` is the library and imports no stage; stages import ``common`` and earlier stages only;
``trie_cpp`` stands alone; commands that need a stage-0 encoder at query time (``genius search``)
may import ``feature_extraction.encoders``, and the image_tokens generator ``feature_extraction.clip_model``;
nothing else of stage 0.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# package -> the genius packages its modules may import (besides itself)
ALLOWED = {
    "common": {"common"},
    "trie_cpp": {"trie_cpp"},
    "synthetic": {"common", "synthetic"},
    "feature_extraction": {"common", "feature_extraction"},
    "models.residual_quantization": {"common", "models.residual_quantization"},
    "models.generative_retriever": {"common", "trie_cpp", "models.residual_quantization",
                                    "models.generative_retriever", "feature_extraction.encoders",
                                    # image_tokens: the stage-0 CLIP-SF's vision tower and image crops
                                    "feature_extraction.clip_model"},
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "models" else parts[0]


def genius_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genius."):
            found.append((node.lineno, node.module[len("genius."):]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name[len("genius."):]) for a in node.names if a.name.startswith("genius.")]
    return found


def allowed(importer: str, imported: str) -> bool:
    for target in ALLOWED[importer]:
        if imported == target or imported.startswith(target + "."):
            return True
    return False


def test_imports_follow_the_layering_rule():
    violations = []
    for package in ALLOWED:
        folder = REPO / package.replace(".", "/")
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.py")):
            for line, module in genius_imports(path):
                if not allowed(package, module):
                    violations.append(f"{path.relative_to(REPO)}:{line} imports genius.{module}")
    assert not violations, "imports against the layering rule:\n" + "\n".join(violations)


def test_the_rule_is_checked_on_real_modules():
    """Guard against the check passing vacuously (a renamed folder would hide every module)."""
    counted = {package: sum(len(genius_imports(p)) for p in (REPO / package.replace(".", "/")).rglob("*.py"))
               for package in ALLOWED if (REPO / package.replace(".", "/")).is_dir()}
    assert all(counted[p] > 0 for p in ("common", "feature_extraction", "models.residual_quantization",
                                        "models.generative_retriever")), counted
