"""Write requirements-lock.txt: the exact versions installed in this environment of everything
genius-retrieval[all,test] needs (its dependency closure; the project itself and stray packages
left out). Run it with the environment's Python after the suite passed there:

    GENIUS_RESOLVE=fresh GENIUS_VENV=/tmp/genius_fresh bash scripts/test.sh
    /tmp/genius_fresh/bin/python scripts/freeze_lock.py

``scripts/env.sh`` installs with ``pip install -c requirements-lock.txt`` by default.
"""
from __future__ import annotations

import argparse
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = "genius-retrieval"
EXTRAS = ("all", "test")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(project: str, extras: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """Installed distributions reachable from ``project[extras]`` through requirements whose markers
    hold in this environment; keyed by canonical name, the project excluded."""
    installed = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    found: dict[str, metadata.Distribution] = {}
    todo = [(canonical(project), set(extras))]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, frozenset(wanted)) in seen:
            continue
        seen.add((name, frozenset(wanted)))
        dist = installed.get(name)
        if dist is None:
            raise SystemExit(f"{name} is required but not installed here; install the project first")
        if name != canonical(project):
            found[name] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            todo.append((canonical(req.name), set(req.extras)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "requirements-lock.txt"))
    args = parser.parse_args()
    dists = closure(PROJECT, EXTRAS)
    lines = [
        f"# The exact versions the test suite passed with (the dependency closure of {PROJECT}[{','.join(EXTRAS)}]).",
        "# scripts/env.sh installs with `pip install -c` this file; GENIUS_RESOLVE=fresh ignores it.",
        f"# Made by scripts/freeze_lock.py on Python {platform.python_version()}, {sys.platform} {platform.machine()}.",
        "# On another Python or platform some pins may not exist: use GENIUS_RESOLVE=fresh (README, Installation).",
    ]
    lines += sorted(f"{d.metadata['Name']}=={d.version}" for d in dists.values())
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(dists)} pinned packages")


if __name__ == "__main__":
    main()
