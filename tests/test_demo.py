"""`treerpo demo` (what `make demo` runs): the bundled tiny-demo workflow through `treerpo run`, shortened
to a few iterations, writes every output a user is pointed to and prints clean output."""

import csv
import json

from PIL import Image

from runcli import treerpo


def test_short_demo_writes_every_output(comfy_runtime, tmp_path):
    base = tmp_path / "demo"
    p = treerpo("demo", "--out", base, "--iterations", "2", timeout=1500)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    out = p.stdout + p.stderr
    # no library noise a user cannot act on (transformers' torchvision notices, tracebacks)
    for noise in ("requires torchvision", "Traceback", "FutureWarning", "UserWarning"):
        assert noise not in out, out[-3000:]
    assert "shapes test set: shapes-crisp-asked reward, 128 prompts x 2 seeds" in p.stdout, p.stdout
    assert "(missing)" not in p.stdout, p.stdout

    run = base / "output" / "treerpo_runs" / "tiny-demo"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert float(rows[-1]["reward_mean"]) == lines[-1]["reward_mean"]
    ev = json.loads((run / "evaluation.json").read_text())
    assert set(ev["mean"]) == {"base", "after"} and ev["iteration"] == 2
    # the protocol's test set, never trained on (the demo trains on the training set)
    from treerpo.core.shapes.world import prompt_set

    assert ev["set"] == "shapes test set" and ev["prompts"] == prompt_set("test")
    assert all(0.0 <= s <= 1.0 for row in ev["scores"]["base"] for s in row)
    iv, gain = ev["interval"], ev["gain"]["after-base"]
    assert iv["base"]["lo"] <= ev["mean"]["base"] <= iv["base"]["hi"] and gain["lo"] <= gain["mean"] <= gain["hi"]
    # trained on shapes-crisp-asked; prompt fidelity scored beside it at weight 0, each with its own gain
    assert ev["rewards"] == ["shapes-crisp-asked", "shapes-layout", "shapes"] and ev["weights"] == [1.0, 0.0, 0.0]
    own = ev["reward_gain"]["after-base"]
    assert own["shapes-crisp-asked"] == gain
    for name in ("shapes-layout", "shapes"):
        g = own[name]
        assert f"; {name} beside it {g['mean']:+.4f} [{g['lo']:+.4f}, {g['hi']:+.4f}]" in p.stdout
    # the numbers printed are the evaluation's
    assert f"base model {ev['mean']['base']:.4f} [{iv['base']['lo']:.4f}, {iv['base']['hi']:.4f}]" in p.stdout
    assert f"after 2 iterations {ev['mean']['after']:.4f}" in p.stdout
    assert f"gain over the base {gain['mean']:+.4f} [{gain['lo']:+.4f}, {gain['hi']:+.4f}] (paired)" in p.stdout

    loras = list((base / "models" / "loras" / "treerpo").glob("tiny_demo_*_.safetensors"))
    assert len(loras) == 1
    images = base / "output" / "tiny-demo"
    for name in ("before_after", "reward_curve", "tree"):
        files = list(images.glob(f"{name}_*.png"))
        assert len(files) == 1, (name, sorted(images.iterdir()))
        w, h = Image.open(files[0]).size
        assert w >= 300 and h >= 200, (name, w, h)
