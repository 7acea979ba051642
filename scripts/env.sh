# Sourced by the quickstart scripts: create or reuse the project's virtual environment under
# .venv and install the project (editable, with the C++ trie) when its install inputs changed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GENIUS_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when what the install depends on changed (dependencies or the C++ source).
stamp_now="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" "$REPO"/trie_cpp/*.cpp 2>/dev/null | sha256sum | cut -d' ' -f1)"
stamp_file="$VENV/.genius_install_stamp"
if [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$stamp_now" ] \
        || ! "$VENV/bin/python" -c "import genius.trie_cpp._trie" 2>/dev/null; then
    echo "[env] installing the project and its dependencies into $VENV (first run takes a few minutes)"
    log="$VENV/install.log"
    if ! "$VENV/bin/pip" install -e "$REPO[all,test]" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "[env] installation failed; the full log is $log" >&2
        exit 1
    fi
    echo "$stamp_now" >"$stamp_file"
fi
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
