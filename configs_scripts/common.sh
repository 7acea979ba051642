# Sourced by every configs_scripts/<setting>/run_<stage>.sh.
# run_stage MODULE ARGS...: one process, or `torchrun --nproc_per_node $NPROC` when NPROC > 1.
# Set GENIUS_PYTHON to use a specific interpreter; by default the project's .venv if present.
set -euo pipefail
GENIUS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GENIUS_CALLER_DIR="$PWD"  # a relative --config names a file from where the script was called
cd "$GENIUS_REPO"
if ! [[ "${NPROC:-1}" =~ ^[1-9][0-9]*$ ]]; then
    echo "$(basename "$0"): error: NPROC=${NPROC}: expected a whole number of processes >= 1" >&2
    exit 2
fi
if [ -z "${GENIUS_PYTHON:-}" ]; then
    if [ -x "$GENIUS_REPO/.venv/bin/python" ]; then GENIUS_PYTHON="$GENIUS_REPO/.venv/bin/python"; else GENIUS_PYTHON=python3; fi
fi
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1

run_stage() {
    local module="$1"; shift
    # The stage runs from the repository; a relative --config given to the script is the caller's.
    local args=() arg after_config=0
    for arg in "$@"; do
        if [ "$after_config" = 1 ] && [[ "$arg" != /* ]]; then arg="$GENIUS_CALLER_DIR/$arg"; fi
        after_config=0
        case "$arg" in
            --config) after_config=1 ;;
            --config=*) [[ "${arg#--config=}" == /* ]] || arg="--config=$GENIUS_CALLER_DIR/${arg#--config=}" ;;
        esac
        args+=("$arg")
    done
    set -- ${args[@]+"${args[@]}"}  # (the guard: bash before 4.4 calls an empty array unbound)
    if [ "${NPROC:-1}" -gt 1 ]; then
        # torchrun sets OMP_NUM_THREADS=1 when it is unset, leaving each rank's host-side work
        # (reading and fusing stores, ranking, code statistics) on one core: share the cores instead.
        if [ -z "${OMP_NUM_THREADS:-}" ]; then
            local cores
            cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
            OMP_NUM_THREADS=$(( cores / NPROC > 0 ? cores / NPROC : 1 ))
            export OMP_NUM_THREADS
        fi
        "$GENIUS_PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m "$module" "$@"
    else
        "$GENIUS_PYTHON" -m "$module" "$@"
    fi
}

# run_pipeline DIR SCRIPT...: DIR/SCRIPT.sh for each SCRIPT in turn (a setting's run_all.sh), with
# each one's time. Every stage skips itself when its inputs and config did not change since its
# last complete run, so re-running a pipeline is cheap.
run_pipeline() {
    local dir="$1"; shift
    local start t0 name
    start=$(date +%s)
    for name in "$@"; do
        t0=$(date +%s)
        echo "==> $name"
        bash "$dir/$name.sh"
        echo "    $name took $(( $(date +%s) - t0 )) s"
    done
    echo "==> pipeline finished in $(( $(date +%s) - start )) s"
}
