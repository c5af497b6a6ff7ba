"""`bench/gpu.sh`'s ComfyUI fp8 step (python -m treerpo.cli.bench_gpu --comfy-dir ...) at its --cpu-smoke size in
the real ComfyUI 0.3.75 runtime: a FLUX-shaped random state dict through ComfyUI's UNETLoader path at
fp8_e4m3fn, the route's LoRA, checkpointing, micro-batch 1, both resolutions; the memory plan's prediction
beside it (no peak on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_comfy_fp8_step_cpu_smoke(comfy_runtime, tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "treerpo").symlink_to(REPO, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(pkg), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([str(comfy_runtime / "venv" / "bin" / "python"), "-m", "treerpo.cli.bench_gpu",
                           "--comfy-dir", str(comfy_runtime / "ComfyUI"), "--out", str(tmp_path / "out"),
                           "--cpu-smoke"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "comfy fp8 route passed" in done.stdout
    data = json.loads((tmp_path / "out" / "gpu-bench-comfy.json").read_text())
    c = data["comfy"]
    assert data["cpu_smoke"] and c["ok"] and c["device"] == "cpu"
    assert c["weight_dtype"] == "torch.float8_e4m3fn" and c["compute_dtype"] == "torch.float32"
    assert [r["resolution"] for r in c["rows"]] == [32, 48]
    for r in c["rows"]:
        assert r["ratio_first_update"][0] == 1.0 and all(t > 0 for t in r["seconds_per_iteration"])
        assert r["peak_gib"] is None and r["measured_over_predicted"] is None  # no GPU: nothing to compare
        parts = r["predicted_parts_gib"]
        assert all(parts[k] > 0 for k in ("weights", "lora_adamw_fp32", "activations", "comfy_weight_copies"))
        assert abs(parts["weights"] - c["weights_gib"]) < 1e-12
        assert abs(sum(v for k, v in parts.items() if k != "total") - r["predicted_gib"]) < 1e-9
    # activations grow with the image: 48 px holds more than 32 px
    assert c["rows"][1]["predicted_parts_gib"]["activations"] > c["rows"][0]["predicted_parts_gib"]["activations"]
