#!/usr/bin/env bash
# One prepared benchmark for a GPU machine (issue 12), unattended, within 8 minutes:
#   - a venv from the package registries (torch from PyPI: its Linux wheels are CUDA builds),
#     then this package (`pip install -e .`);
#   - `treerpo bench gpu`: bf16 checks (ratio exactly 1 on the first update, 20 iterations
#     without NaN), then `bench speed` of dynamic-treerpo / mixgrpo / mixgrpo-flash / dancegrpo
#     on a FLUX-width transformer with random weights (LoRA, 512 px, T=25, bf16), peak memory
#     per preset and the model-FLOPs utilisation;
#   - the tree and MixGRPO at 1, 2, 4 and 8 prompts per iteration (all prompts' trees in one batch);
#   - writes $OUT/gpu-bench.json and $OUT/gpu-bench.log (OUT defaults to ./bench-out).
#
#   bench/gpu.sh                  on a GPU machine with pip access to PyPI
#   bench/gpu.sh --no-venv        use the current python (an environment built beforehand)
#   bench/gpu.sh --cpu-smoke      the same path on the CPU at tiny sizes (reuses ./.venv if present)
# PYTHON=... picks the interpreter for --no-venv; BENCH_VENV=... where the venv goes;
# BENCH_TIMEOUT=... seconds for the whole script (default 480); extra `treerpo bench gpu`
# options (e.g. --peak-tflops 989) after `--`.
set -euo pipefail
t0=$(date +%s)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-./bench-out}
smoke=0
venv=1
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) smoke=1 ;;
        --no-venv) venv=0 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown option $1 (expected --cpu-smoke, --no-venv, -- EXTRA)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log="$OUT/gpu-bench.log"
: > "$log"
say() { echo "[gpu.sh $(( $(date +%s) - t0 ))s] $*" | tee -a "$log"; }

if [ "$venv" = 0 ]; then
    PY=${PYTHON:-python3}
elif [ "$smoke" = 1 ] && [ -x "$here/.venv/bin/python" ]; then
    PY="$here/.venv/bin/python"
else
    V=${BENCH_VENV:-$here/.venv-gpu}
    say "creating $V from the package registries"
    [ -x "$V/bin/python" ] || python3 -m venv "$V"
    "$V/bin/pip" install -q --upgrade pip >>"$log" 2>&1
    if [ "$smoke" = 1 ]; then
        "$V/bin/pip" install -q torch==2.13.0 >>"$log" 2>&1  # the small CPU build (Makefile's pin)
    else
        "$V/bin/pip" install -q torch >>"$log" 2>&1  # PyPI's Linux x86-64 torch is a CUDA build
    fi
    "$V/bin/pip" install -q -e "$here" >>"$log" 2>&1
    PY="$V/bin/python"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# the repository root is the package `treerpo`: where it is not installed, import it through a link
if ! "$PY" -c "import treerpo.cli.main" 2>/dev/null; then
    pkg=$(mktemp -d)
    ln -s "$here" "$pkg/treerpo"
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import treerpo.cli.main" 2>>"$log" || {
        say "error: $PY cannot import treerpo's dependencies (see $log); install them or drop --no-venv"; exit 1; }
fi
say "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'))"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$log" 2>&1 || true

left=$(( ${BENCH_TIMEOUT:-480} - ($(date +%s) - t0) ))
[ "$left" -gt 30 ] || { say "error: the venv took the whole time budget"; exit 1; }
args=(--out "$OUT")
[ "$smoke" = 1 ] && args+=(--cpu-smoke)
say "treerpo bench gpu ${args[*]} ${extra[*]:-} (time left ${left}s)"
set +e
timeout --signal=INT --kill-after=20 "$left" "$PY" -m treerpo.cli.main bench gpu "${args[@]}" "${extra[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 124 ] && say "stopped at the time limit: $OUT/gpu-bench.json holds what was measured"
say "exit $rc; $OUT/gpu-bench.json, $log"
exit "$rc"
