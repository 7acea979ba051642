# Sourced by the quickstart scripts: create or reuse the project's virtual environment under
# .venv and install the project (editable, with its C++ extensions) when its install inputs changed.
#
# By default the install follows requirements-lock.txt (`pip install -c`): the exact versions the
# test suite passed with. GENIUS_RESOLVE=fresh resolves the newest versions pyproject.toml's bounds
# allow instead (best in a separate environment: GENIUS_VENV=/some/dir); scripts/freeze_lock.py
# then writes a new lock from it. GENIUS_VENV and PYTHON choose the environment and its Python.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GENIUS_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
LOCK="$REPO/requirements-lock.txt"
RESOLVE="${GENIUS_RESOLVE:-lock}"
case "$RESOLVE" in
    lock | fresh) ;;
    *) echo "[env] GENIUS_RESOLVE must be 'lock' (the default) or 'fresh', got '$RESOLVE'" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    echo "[env] creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when what the install depends on changed: dependencies and their bounds, the lock
# (when it is used), the resolve mode, or the C++ sources.
stamp_inputs=("$REPO/pyproject.toml" "$REPO/setup.py" "$REPO"/trie_cpp/*.cpp "$REPO"/models/generative_retriever/*.cpp)
if [ "$RESOLVE" = lock ]; then
    stamp_inputs+=("$LOCK")
fi
stamp_now="$( { echo "resolve=$RESOLVE"; cat "${stamp_inputs[@]}" 2>/dev/null; } | sha256sum | cut -d' ' -f1)"
stamp_file="$VENV/.genius_install_stamp"
if [ ! -f "$stamp_file" ] || [ "$(cat "$stamp_file")" != "$stamp_now" ] \
        || ! "$VENV/bin/python" -c "import genius.trie_cpp._trie, genius.models.generative_retriever._decoder_kernels" \
            2>/dev/null; then
    log="$VENV/install.log"
    if [ "$RESOLVE" = lock ]; then
        if [ ! -f "$LOCK" ]; then
            echo "[env] $LOCK is missing; restore it or use GENIUS_RESOLVE=fresh" >&2
            exit 1
        fi
        lock_python="$(sed -n 's/^# Made by .* on Python \([0-9]*\.[0-9]*\)\..*/\1/p' "$LOCK")"
        venv_python="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
        if [ -n "$lock_python" ] && [ "$lock_python" != "$venv_python" ]; then
            echo "[env] note: the lock was made on Python $lock_python, this environment has $venv_python;" \
                 "if the install fails, use GENIUS_RESOLVE=fresh"
        fi
        echo "[env] installing the project and the locked versions of its dependencies into $VENV" \
             "(first run takes a few minutes)"
        # PIP_CONSTRAINT also reaches pip's isolated build environment (setuptools, pybind11).
        install=(env PIP_CONSTRAINT="$LOCK" "$VENV/bin/pip" install -c "$LOCK" -e "$REPO[all,test]")
    else
        echo "[env] installing the project with freshly resolved dependencies (GENIUS_RESOLVE=fresh) into $VENV"
        install=("$VENV/bin/pip" install --upgrade --upgrade-strategy eager -e "$REPO[all,test]")
    fi
    if ! "${install[@]}" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "[env] installation failed; the full log is $log" >&2
        if [ "$RESOLVE" = lock ]; then
            echo "[env] the lock may not fit this Python or platform: GENIUS_RESOLVE=fresh resolves anew" >&2
        fi
        exit 1
    fi
    echo "$stamp_now" >"$stamp_file"
fi
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
