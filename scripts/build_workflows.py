"""Build the bundled UI-format workflows (workflows/*.json) from a running ComfyUI's /object_info.

    python scripts/build_workflows.py --url http://127.0.0.1:8188   # or --object-info info.json

Each graph is described below by its nodes (type, position, widget values by name), links
(by output and input name), groups and notes; the script fills in widget order, socket
types and link ids from /object_info, so the files match what the frontend expects.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
HERE = Path(__file__).resolve().parent.parent / "workflows"
# the demo's settings, chosen on the validation set of the evaluation protocol (docs/demo.md): our
# treerpo-plus preset at 8 steps (the model samples as well as at 16, at half the cost), 8 prompts per
# iteration, lr 1e-3 and a KL term to the base model, on shapes-crisp-asked; prompt fidelity is scored
# beside it (weight 0) in the held-out evaluation
DEMO = dict(
    rank=8, eval_seeds=2, iterations=40, reward="shapes-crisp-asked", beside=("shapes-layout", "shapes"),
    tree_prompt="two red circles on the left and a blue square at the bottom right",
    settings=dict(preset="treerpo-plus", resolution=64, num_steps=8, learning_rate=1e-3, prompts_per_iteration=8,
                  seed=0, more_settings="kl_beta=0.03"),
)


class Graph:
    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def _spec(self, type_: str) -> dict:
        if type_ not in self.info:
            raise KeyError(f"node type {type_} is not in /object_info (is the pack loaded?)")
        return self.info[type_]

    def _inputs(self, spec):
        order = spec.get("input_order") or {k: list(v) for k, v in spec["input"].items()}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                t = spec["input"][section][name]
                kind = t[0]
                opts = t[1] if len(t) > 1 else {}
                widget = isinstance(kind, list) or kind in WIDGET_TYPES
                yield name, kind, opts, widget, section == "optional"

    def add(self, type_: str, pos, title: str | None = None, **values) -> int:
        spec = self._spec(type_)
        nid = len(self.nodes) + 1
        widgets, inputs = [], []
        for name, kind, opts, widget, optional in self._inputs(spec):
            if widget:
                if name in values:
                    v = values.pop(name)
                elif "default" in opts:
                    v = opts["default"]
                elif isinstance(kind, list):
                    v = kind[0]
                else:
                    v = (opts.get("options") or [""])[0]
                widgets.append(v)
                if name in SEED_NAMES or opts.get("control_after_generate"):
                    widgets.append("fixed")  # the frontend adds a control_after_generate widget after seeds
            else:
                inp = {"name": name, "type": kind, "link": None}
                if optional:
                    inp["shape"] = 7
                inputs.append(inp)
        if values:
            raise KeyError(f"{type_}: unknown widget(s) {sorted(values)}")
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(spec["output_name"], spec["output"]))]
        rows = len(widgets) + max(len(inputs), len(outputs))
        node = {"id": nid, "type": type_, "pos": list(pos), "size": [330, 46 + 24 * rows], "flags": {}, "order": 0,
                "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": type_}, "widgets_values": widgets}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return nid

    def note(self, text: str, pos, size=(330, 160)) -> int:
        nid = len(self.nodes) + 1
        self.nodes.append({"id": nid, "type": "Note", "pos": list(pos), "size": list(size), "flags": {}, "order": 0,
                           "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                           "color": "#432", "bgcolor": "#653"})
        return nid

    def link(self, src: int, output: str, dst: int, input_: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, o in enumerate(s["outputs"]) if o["name"] == output)
        dslot = next(i for i, o in enumerate(d["inputs"]) if o["name"] == input_)
        lid = len(self.links) + 1
        s["outputs"][slot]["links"].append(lid)
        d["inputs"][dslot]["link"] = lid
        self.links.append([lid, src, slot, dst, dslot, s["outputs"][slot]["type"]])

    def group(self, title: str, x, y, w, h, color="#3f789e") -> None:
        self.groups.append({"title": title, "bounding": [x, y, w, h], "color": color, "font_size": 24, "flags": {}})

    def to_api(self) -> dict:
        """The API-format prompt of this graph (for quick checks; the tests convert the saved UI files
        through the real frontend)."""
        out = {}
        for n in self.nodes:
            if n["type"] == "Note":
                continue
            spec = self._spec(n["type"])
            values = list(n["widgets_values"])
            inputs = {}
            for name, _, opts, widget, _ in self._inputs(spec):
                if widget:
                    inputs[name] = values.pop(0)
                    if name in SEED_NAMES or opts.get("control_after_generate"):
                        values.pop(0)
            for inp in n["inputs"]:
                if inp["link"] is not None:
                    lk = next(lk for lk in self.links if lk[0] == inp["link"])
                    inputs[inp["name"]] = [str(lk[1]), lk[2]]
            out[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
        return out

    def dump(self) -> dict:
        # execution order: a node after everything it reads from
        order, seen = [], set()

        def visit(n):
            if n in seen:
                return
            seen.add(n)
            for inp in self.nodes[n - 1]["inputs"]:
                if inp["link"] is not None:
                    visit(next(lk[1] for lk in self.links if lk[0] == inp["link"]))
            order.append(n)

        for n in range(1, len(self.nodes) + 1):
            visit(n)
        for i, n in enumerate(order):
            self.nodes[n - 1]["order"] = i
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4}


def api_prompt(info: dict, workflow: dict) -> dict:
    """The API prompt of a saved UI workflow of this script (widget values by name, links as
    [node, slot]), without a browser."""
    g = Graph(info)
    g.nodes, g.links = workflow["nodes"], workflow["links"]
    return g.to_api()


# ------------------------------------------------------------------------ the graphs
class Column:
    """Nodes stacked in one group, top to bottom, with a note explaining the group at its foot."""

    WIDTH, PAD, TITLE = 370, 20, 34

    def __init__(self, g: Graph, x: int, title: str, color: str = "#3f789e"):
        self.g, self.x, self.title, self.color = g, x, title, color
        self.y = self.TITLE + 46  # below the group title and the first node's title bar

    def add(self, type_: str, size=None, **values) -> int:
        nid = self.g.add(type_, (self.x + self.PAD, self.y), **values)
        if size:
            self.g.nodes[nid - 1]["size"] = list(size)
        self.y += self.g.nodes[nid - 1]["size"][1] + 50
        return nid

    def note(self, text: str) -> int:
        lines = sum(1 + len(par) // 52 for par in text.split("\n"))
        height = 30 + 15 * lines
        nid = self.g.note(text, (self.x + self.PAD, self.y - 20), size=(self.WIDTH - 2 * self.PAD, height))
        self.y += height
        return nid

    def close(self, height: int) -> None:
        self.g.group(self.title, self.x, 0, self.WIDTH, max(height, self.y + self.PAD), color=self.color)


# FLUX.1-dev through ComfyUI's own loaders (fp8 weights, as most 24 GB users load it) into
# "TreeRPO model from ComfyUI"
COMFY_LOADERS = dict(unet_name="flux1-dev.safetensors", weight_dtype="fp8_e4m3fn",
                     clip_name1="t5xxl_fp16.safetensors", clip_name2="clip_l.safetensors", vae_name="ae.safetensors")


def model_nodes(g: Graph, c: Column, model: dict) -> int:
    """Column 1: Load FLUX with ``model``'s widgets, or (``model`` is COMFY_LOADERS) ComfyUI's
    Load Diffusion Model, DualCLIPLoader and Load VAE into TreeRPO model from ComfyUI."""
    if model is not COMFY_LOADERS:
        return c.add("TreeRPOLoadFlux", **model)
    unet = c.add("UNETLoader", unet_name=model["unet_name"], weight_dtype=model["weight_dtype"])
    clip = c.add("DualCLIPLoader", clip_name1=model["clip_name1"], clip_name2=model["clip_name2"], type="flux")
    vae = c.add("VAELoader", vae_name=model["vae_name"])
    src = c.add("TreeRPOComfyModel", gradient_checkpointing=True)
    for nid, out, inp in ((unet, "MODEL", "model"), (clip, "CLIP", "clip"), (vae, "VAE", "vae")):
        g.link(nid, out, src, inp)
    return src


def training_graph(info, *, model, rewards, settings, iterations, run_name, prefix, intro):
    g = Graph(info)
    cols = []
    c = Column(g, 0, "1. Model")
    cols.append(c)
    load = model_nodes(g, c, model)
    c.note(intro)
    c = Column(g, 390, "2. Prompts and rewards")
    cols.append(c)
    prompts = c.add("TreeRPOPrompts", text="a photo of a cat\na red cube on a table")
    reward_ids = [c.add("TreeRPOLoadReward", reward=r, weight=w) for r, w in rewards]
    rew = reward_ids[0]
    if len(reward_ids) > 1:
        rew = c.add("TreeRPOCombineRewards")
        for i, rid in enumerate(reward_ids, 1):
            g.link(rid, "rewards", rew, f"rewards_{i}")
    c.note("Prompts: typed here or a .txt/.jsonl file from ComfyUI's input folder. Rewards score every leaf; "
           "each reward is normalised per prompt, then summed with its weight (paper Eq. 2).")
    c = Column(g, 780, "3. Tree settings")
    cols.append(c)
    st = c.add("TreeRPOTreeSettings", **settings)
    c.note("The preset sets everything; a number left at -1 keeps the preset's value. Bad combinations are "
           "refused when you queue, with the engine's message.")
    c = Column(g, 1170, "4. Train", color="#8a4")
    cols.append(c)
    step = c.add("TreeRPOTrainerStep", iterations=iterations, run_name=run_name)
    for src, out, inp in ((load, "model", "model"), (prompts, "prompts", "prompts"), (rew, "rewards", "rewards"),
                          (st, "settings", "settings")):
        g.link(src, out, step, inp)
    c.note("The progress bar previews the best leaves of each iteration. Cancel writes a checkpoint, then stops; "
           "queue again to continue (on_existing=continue) or start over (restart). Run folder: "
           "output/treerpo_runs/<run_name>. Chain another trainer step on 'run' to continue the same run.")
    c = Column(g, 1560, "5. Save and plot", color="#a1309b")
    cols.append(c)
    save = c.add("TreeRPOSaveLora", filename_prefix=prefix)
    g.link(step, "run", save, "run")
    plot = c.add("TreeRPOMetricsPlot")
    g.link(step, "run", plot, "run")
    c.note("Save LoRA writes models/loras/<prefix>_<counter>_.safetensors and its training state beside it "
           "(continue later with Load training state -> resume_from). Its 'lora' output is ComfyUI's LORA_MODEL: "
           "'Load LoRA Model' applies it to a MODEL for sampling right after training.")
    height = max(col.y for col in cols) + 20
    for col in cols:
        col.close(height)
    return g


def demo_graph(info):
    """tiny-demo: what `make demo` runs headless. Trains the bundled tiny-shapes model against
    shapes-crisp-asked, then writes every output a user looks at."""
    d = DEMO
    g = Graph(info)
    cols = []
    c = Column(g, 0, "1. Model")
    cols.append(c)
    load = c.add("TreeRPOLoadFlux", lora_rank=d["rank"], lora_alpha=float(d["rank"]))
    c.note("Tiny demo: Dynamic-TreeRPO on the bundled tiny-shapes model (the FLUX.1-dev architecture, 64 px, "
           "pretrained on coloured shapes; it draws them with soft edges and washed-out fills) against "
           "shapes-crisp-asked, which scores how cleanly the objects are drawn in the colours the prompt asks for. "
           "Runs on a CPU in minutes. "
           "Outputs: the LoRA in models/loras/treerpo, the run folder (metrics.jsonl / .csv, evaluation.json) in "
           "output/treerpo_runs/tiny-demo, and the images in output/tiny-demo.\n\nRe-queue to continue the run; "
           "set on_existing=restart to start over.")
    c = Column(g, 390, "2. Prompts and reward")
    cols.append(c)
    prompts = c.add("TreeRPOPrompts", file="(shapes world: training set)", held_out_fraction=0.0, shuffle_seed=0)
    rew = c.add("TreeRPOLoadReward", reward=d["reward"])
    c.note("Prompts: the shapes world's training set (512 captions). Held-out evaluation scores the test set, 128 "
           "other captions never trained on nor used to choose settings. The reward is in [0, 1]: the share of "
           "object pixels drawn solid in a colour the prompt asks for; turning objects into an easier colour does "
           "not raise it (docs/rewards.md).")
    c = Column(g, 780, "3. Tree settings")
    cols.append(c)
    st = c.add("TreeRPOTreeSettings", **d["settings"])
    c.note("Our preset treerpo-plus (the paper's tree [2,2,2,1] with its dynamic clip and a step per tree layer; the "
           "window frozen on the highest-noise steps, one advantage std over the batch, LayerTuning off) with the "
           "settings chosen for this model on the validation prompts (docs/demo.md): 8 steps, 8 prompts per "
           "iteration, lr 1e-3, and a KL term to the base model (kl_beta in more_settings) that halves what the "
           "reward costs in prompt fidelity.")
    c = Column(g, 1170, "4. Train", color="#8a4")
    cols.append(c)
    step = c.add("TreeRPOTrainerStep", iterations=d["iterations"], run_name="tiny-demo", checkpoint_every=20)
    for src, out, inp in ((load, "model", "model"), (prompts, "prompts", "prompts"), (rew, "rewards", "rewards"),
                          (st, "settings", "settings")):
        g.link(src, out, step, inp)
    save = c.add("TreeRPOSaveLora", filename_prefix="treerpo/tiny_demo")
    g.link(step, "run", save, "run")
    c.note("The progress bar previews the best leaves of each iteration; Cancel writes a checkpoint, then stops.")
    c = Column(g, 1560, "5. What training did", color="#a1309b")
    c.WIDTH = 420
    cols.append(c)
    ev = c.add("TreeRPOHeldOutEvaluation", seeds=d["eval_seeds"], prompt_set="shapes: test set")
    g.link(step, "run", ev, "run")
    # the trained reward at weight 1, prompt fidelity beside it at weight 0: each gets its own gain
    scored = c.add("TreeRPOCombineRewards", weight_2=0.0, weight_3=0.0)
    g.link(rew, "rewards", scored, "rewards_1")
    for i, name in enumerate(d["beside"], 2):
        g.link(c.add("TreeRPOLoadReward", reward=name), "rewards", scored, f"rewards_{i}")
    g.link(scored, "rewards", ev, "rewards")
    sv = c.add("SaveImage", filename_prefix="tiny-demo/before_after")
    g.link(ev, "image", sv, "images")
    plot = c.add("TreeRPOMetricsPlot")
    g.link(step, "run", plot, "run")
    sv = c.add("SaveImage", filename_prefix="tiny-demo/reward_curve")
    g.link(plot, "image", sv, "images")
    c.note("Held-out evaluation: the base model and the trained LoRA on the shapes test set (128 prompts x 2 seeds, "
           "the same noise for both), each mean and the gain with 95 % bootstrap intervals over prompts in the summary "
           "and evaluation.json. shapes-layout and shapes (prompt fidelity) are scored beside the trained reward at "
           "weight 0: their own gains show what it cost. The figure shows the first 16 prompts, base left, trained "
           "right.")
    c = Column(g, 2000, "6. One tree of the trained policy", color="#a1309b")
    cols.append(c)
    smp = c.add("TreeRPOTreeSampler", prompt=d["tree_prompt"], seed=0)
    g.link(step, "run", smp, "run")
    g.link(st, "settings", smp, "settings")
    sc = c.add("TreeRPORewardScorer")
    g.link(rew, "rewards", sc, "rewards")
    g.link(smp, "tree", sc, "tree")
    g.link(step, "run", sc, "run")
    pv = c.add("TreeRPOTreePreview", thumbnail=64)
    g.link(smp, "tree", pv, "tree")
    g.link(sc, "scores", pv, "scores")
    sv = c.add("SaveImage", filename_prefix="tiny-demo/tree")
    g.link(pv, "image", sv, "images")
    c.note("A tree for a prompt outside the training prompts, sampled with the trained policy: "
           "each node's x0 prediction, the branches, the leaves' rewards, advantages and eps, "
           "and the best path in gold.")
    height = max(col.y for col in cols) + 20
    for col in cols:
        col.close(height)
    return g


def tree_inspect(info):
    g = Graph(info)
    c1 = Column(g, 0, "1. Model and tree settings")
    load = c1.add("TreeRPOLoadFlux")
    st = c1.add("TreeRPOTreeSettings", num_steps=8, resolution=64, window_start=2)
    c2 = Column(g, 390, "2. Sample a tree, score its leaves")
    smp = c2.add("TreeRPOTreeSampler", prompt=DEMO["tree_prompt"], seed=0)
    g.link(load, "model", smp, "model")
    g.link(st, "settings", smp, "settings")
    rew = c2.add("TreeRPOLoadReward", reward="shapes")
    sc = c2.add("TreeRPORewardScorer")
    g.link(rew, "rewards", sc, "rewards")
    g.link(smp, "tree", sc, "tree")
    c2.note("Tree inspect: one Dynamic-TreeRPO tree for a prompt and seed with the current policy (as the trainer "
            "samples it at that iteration), its leaves scored: rewards, group advantages and the clip eps each "
            "leaf would get. Runs on the CPU with the bundled tiny-shapes model and the shapes reward; choose "
            "your FLUX.1-dev and hps / pickscore / imagereward for real trees.")
    c3 = Column(g, 780, "3. Tree preview", color="#8a4")
    c3.WIDTH = 760
    pv = c3.add("TreeRPOTreePreview", size=(720, 760))
    g.link(smp, "tree", pv, "tree")
    g.link(sc, "scores", pv, "scores")
    c3.note("Every node's x0 prediction as a thumbnail, the SDE edges, each layer's sigma and noise level, the "
            "leaves' rewards, advantages and eps; the best leaf's path is highlighted.")
    height = max(c.y for c in (c1, c2, c3)) + 20
    for c in (c1, c2, c3):
        c.close(height)
    return g


def build(info: dict, api: bool = False) -> dict[str, dict]:
    flux = dict(model="single files (below)", transformer="flux1-dev.safetensors", clip_l="clip_l.safetensors",
                t5xxl="t5xxl_fp16.safetensors", vae="ae.safetensors", weight_dtype="bfloat16")
    paper_rewards = [("hps", 1.0), ("pickscore", 1.0), ("imagereward", 1.0)]
    out = {
        "tiny-demo": demo_graph(info),
        "flux-dev-dynamic-treerpo": training_graph(
            info, model=flux, rewards=paper_rewards,
            settings=dict(preset="dynamic-treerpo", resolution=720), iterations=100,
            run_name="flux-dev-dynamic-treerpo",
            prefix="treerpo/flux_dev_dynamic_treerpo",
            intro="Dynamic-TreeRPO on FLUX.1-dev with the paper's settings: 25 steps, trees [2,2,2,1] (8 leaves) in "
                  "a sliding window, noise 0.7 growing with depth (beta 0.7), dynamic clip, LayerTuning (lambda "
                  "0.02), HPS-v2.1 + PickScore + ImageReward with equal weights. Put flux1-dev, clip_l, t5xxl and "
                  "ae in models/diffusion_models, text_encoders, vae, and the reward checkpoints in "
                  "models/treerpo_rewards (docs/rewards.md). Needs a large GPU."),
        "flux-dev-dynamic-treerpo-comfy": training_graph(
            info, model=COMFY_LOADERS, rewards=paper_rewards,
            settings=dict(preset="dynamic-treerpo", resolution=720), iterations=100,
            run_name="flux-dev-dynamic-treerpo-comfy", prefix="treerpo/flux_dev_dynamic_treerpo_comfy",
            intro="Dynamic-TreeRPO with the paper's settings on the FLUX.1-dev that ComfyUI's own loaders give: "
                  "Load Diffusion Model (weights kept in fp8_e4m3fn), DualCLIPLoader (type flux), Load VAE, into "
                  "TreeRPO model from ComfyUI. The LoRA is made of ComfyUI's weight adapters (fp32) and is saved "
                  "in ComfyUI's format: LoraLoaderModelOnly loads it. Gradient checkpointing is on (without it every "
                  "adapted layer keeps an upcast weight copy for backward). GGUF models are refused (their layers "
                  "ignore weight adapters). Memory on a 24 GB card is not measured yet (docs/models.md)."),
        "flux-dev-mixgrpo": training_graph(
            info, model=flux, rewards=paper_rewards, settings=dict(preset="mixgrpo", resolution=720),
            iterations=100, run_name="flux-dev-mixgrpo", prefix="treerpo/flux_dev_mixgrpo",
            intro="Baseline MixGRPO on FLUX.1-dev as a setting of the same engine: 12 independent trajectories per "
                  "prompt (branching [12,1,1,1], no shared prefix), SDE only inside the sliding window, fixed clip "
                  "1e-4. Run it beside flux-dev-dynamic-treerpo for a side-by-side comparison (set preset "
                  "mixgrpo-flash for the compressed variant)."),
        "flux-dev-dancegrpo": training_graph(
            info, model=flux, rewards=paper_rewards, settings=dict(preset="dancegrpo", resolution=720),
            iterations=100, run_name="flux-dev-dancegrpo", prefix="treerpo/flux_dev_dancegrpo",
            intro="Baseline DanceGRPO on FLUX.1-dev as a setting of the same engine: 12 trajectories per prompt, "
                  "SDE at every step (constant noise 0.3), 60 % of the steps trained per iteration, the last step "
                  "never trained, fixed clip 1e-4."),
        "tree-inspect": tree_inspect(info),
    }
    return {k: (g.to_api() if api else g.dump()) for k, g in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running ComfyUI with the pack loaded")
    src.add_argument("--object-info", help="a saved /object_info JSON")
    ap.add_argument("--out", default=str(HERE))
    a = ap.parse_args()
    if a.url:
        with urllib.request.urlopen(a.url.rstrip("/") + "/object_info") as r:
            info = json.load(r)
    else:
        info = json.loads(Path(a.object_info).read_text())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, wf in build(info).items():
        (out / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
