"""Tree settings, Tree sampler, Reward scorer and Tree preview: look at one tree of the engine."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from .choices import (
    KEEP, NOT_CONNECTED, TUNABLE_NAMES, TUNABLES, check_sampler, check_scorer, check_settings, given, linked,
    settings_config,
)
from .common import (
    CATEGORY, FluxModel, Rewards, Run, SampledTree, Scores, Settings, TreeSettings, TreeT, from_comfy_images,
    grad_enabled, is_main_process, pil_to_comfy, queue_check, to_comfy_images,
)

class TreeSettingsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..core.presets import ADV_STD_MODES, CLIP_REWARDS, PRESETS
        from ..core.window import WINDOW_MODES

        tun = []
        for t in TUNABLES:
            typ = io.Float if t.kind == "float" else io.Int
            tun.append(typ.Input(t.name, default=KEEP, tooltip=t.tip + " -1 = the preset's value.", **t.opts))
        return io.Schema(
            node_id="TreeRPOTreeSettings",
            display_name="Tree settings (TreeRPO)",
            category=CATEGORY,
            description="A preset (Dynamic-TreeRPO, its ablations, or a baseline) plus the settings users tune. "
                        "Every number left at -1 keeps the preset's value.",
            inputs=[
                io.Combo.Input("preset", options=list(PRESETS), default="dynamic-treerpo",
                               tooltip="dynamic-treerpo = the paper; tree / tree-clip = its ablations; mixgrpo, "
                                       "mixgrpo-flash, dancegrpo = the baselines as settings of the same engine."),
                io.String.Input("branching", default="",
                                tooltip="Children per node at each window step, e.g. 2,2,2,1 (8 leaves) or 2,2,2,2 "
                                        "(16); empty = the preset's tree."),
                io.Int.Input("group_size", default=0, min=0, max=64,
                             tooltip="Baselines only: trajectories per prompt G (branching G,1,1,...); 0 = preset."),
                io.Combo.Input("window_mode", options=["preset", *WINDOW_MODES], default="preset",
                               tooltip="How the sliding window moves over iterations (progressive, random, frozen)."),
                io.Combo.Input("clip_reward", options=["preset", *CLIP_REWARDS], default="preset",
                               tooltip="The reward R of the dynamic clip (Eq. 11): the combined reward value, its "
                                       "running normalisation over the run, or the group's min-max."),
                io.Combo.Input("adv_std", options=["preset", *ADV_STD_MODES], default="preset",
                               tooltip="Advantage scale: each prompt's group std (the papers), or one std over the "
                                       "whole batch (Flow-GRPO's global_std: groups whose rewards barely differ get "
                                       "small advantages instead of amplified noise)."),
                io.Int.Input("resolution", default=512, min=16, max=2048, step=16,
                             tooltip="Image size in pixels (square); a multiple of 16."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of every random draw of the run (noise, SDE branches, prompt order)."),
                *tun,
                io.String.Input("more_settings", default="", multiline=True, optional=True,
                                tooltip="Any other engine setting as key=value, one per line (docs/engine.md lists "
                                        "them), e.g. sft_target=best-sample-noised or edge_advantage="
                                        "depth-standardised. These win over the widgets above."),
            ],
            outputs=[Settings.Output(display_name="settings", tooltip="Validated training settings.")],
        )

    @classmethod
    def validate_inputs(cls, **kw):
        # taking **kw, ComfyUI checks no widget itself; a tunable's own rule names -1 in its message
        return queue_check(cls, {k: v for k, v in kw.items() if k not in TUNABLE_NAMES},
                           lambda: check_settings(**kw))

    @classmethod
    def execute(cls, **kw) -> io.NodeOutput:
        config, resolution = settings_config(**kw)
        return io.NodeOutput(TreeSettings(config=config, resolution=resolution))


class TreeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOTreeSampler",
            display_name="Tree sampler (TreeRPO)",
            category=CATEGORY,
            description="Samples one tree for a prompt and seed with the current policy (as the trainer would at "
                        "that iteration) and decodes its leaves.",
            inputs=[
                Settings.Input("settings", tooltip="Tree shape, steps, window and noise from Tree settings."),
                io.String.Input("prompt", default="a photo of a cat", multiline=True,
                                tooltip="The prompt of the tree."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the initial noise and the SDE branches."),
                io.Int.Input("iteration", default=0, min=0, max=100000,
                             tooltip="Training iteration whose window position the tree uses."),
                FluxModel.Input("model", optional=True,
                                tooltip="The FLUX bundle from Load FLUX (its current weights: trained ones after a "
                                        "trainer step ran on it)."),
                Run.Input("run", optional=True,
                          tooltip="Sample with this run's policy after its training (instead of model): the tree "
                                  "waits for the trainer step."),
            ],
            outputs=[
                TreeT.Output(display_name="tree", tooltip="The sampled tree (nodes, edges, log-probs, leaves)."),
                io.Image.Output(display_name="leaves", tooltip="The decoded leaf images."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompt, model=NOT_CONNECTED, run=NOT_CONNECTED):
        return queue_check(cls, {}, lambda: check_sampler(prompt, linked(model=model, run=run)))

    @classmethod
    def execute(cls, settings, prompt, seed, iteration, model=None, run=None) -> io.NodeOutput:
        from ..core.one_tree import sample_tree

        check_sampler(prompt, given(model=model, run=run))
        if run is not None:
            model = run.bundle
        stack = model.stack
        with grad_enabled():  # the encoder keeps embeddings in memory: training reuses them with grad
            cond = stack.encode([str(prompt).strip()])[0]
        shape = settings.latent_shape(stack)
        with torch.no_grad():
            tree = sample_tree(stack.policy, settings.config, cond, seed, shape, iteration=iteration,
                               device=model.device)
            images = stack.decode(tree.leaves)
        out = SampledTree(tree=tree, prompt=str(prompt).strip(), seed=int(seed), images=images.cpu(), bundle=model,
                          settings=settings)
        return io.NodeOutput(out, to_comfy_images(images))


class RewardScorer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPORewardScorer",
            display_name="Reward scorer (TreeRPO)",
            category=CATEGORY,
            description="Scores a tree's leaves (or any images) per reward model, with the group advantages and "
                        "the clip eps each leaf would get in training.",
            inputs=[
                Rewards.Input("rewards", tooltip="Reward set from Load reward / Combine rewards."),
                TreeT.Input("tree", optional=True, tooltip="A sampled tree; its leaves and prompt are scored."),
                io.Image.Input("images", optional=True, tooltip="Images to score instead of a tree's leaves."),
                io.String.Input("prompt", default="", optional=True,
                                tooltip="Prompt of the images (ignored when a tree is connected)."),
                Settings.Input("settings", optional=True,
                               tooltip="Settings for advantages and eps (default: the tree's settings)."),
                Run.Input("run", optional=True,
                          tooltip="A training run whose running reward statistics set the eps (clip_reward "
                                  "running); without it this group alone sets them."),
            ],
            outputs=[
                Scores.Output(display_name="scores", tooltip="Rewards [leaves x models], advantages, eps."),
                io.String.Output(display_name="table", tooltip="The scores as a readable table."),
            ],
        )

    @classmethod
    def validate_inputs(cls, prompt="", tree=NOT_CONNECTED, images=NOT_CONNECTED, settings=NOT_CONNECTED):
        return queue_check(cls, {}, lambda: check_scorer(prompt, linked(tree=tree, images=images, settings=settings)))

    @classmethod
    def execute(cls, rewards, tree=None, images=None, prompt="", settings=None, run=None) -> io.NodeOutput:
        from ..core.one_tree import score_leaves

        check_scorer(prompt, given(tree=tree, images=images, settings=settings))
        if tree is not None:
            imgs, text, cfg = tree.images, tree.prompt, (settings or tree.settings).config
        else:
            imgs, text, cfg = from_comfy_images(images), str(prompt).strip(), settings.config
        norm = run.run.trainer.reward_norm if run is not None else None
        scores = score_leaves(imgs, text, rewards, cfg, running_norm=norm)
        return io.NodeOutput(scores, scores.table())


class TreePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOTreePreview",
            display_name="Tree preview (TreeRPO)",
            category=CATEGORY,
            description="Draws the tree: every node's x0 prediction as a thumbnail, the edges, each layer's "
                        "sigma and noise level, the leaves' rewards and advantages, the best path highlighted.",
            is_output_node=True,
            inputs=[
                TreeT.Input("tree", tooltip="A tree from Tree sampler."),
                Scores.Input("scores", optional=True, tooltip="Scores from Reward scorer (rewards, advantages, eps)."),
                io.Int.Input("thumbnail", default=96, min=32, max=512, step=8, tooltip="Thumbnail size in pixels."),
                io.String.Input("title", default="", tooltip="Title drawn above the tree (default: the prompt)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The tree drawing.")],
        )

    @classmethod
    def execute(cls, tree, thumbnail, title, scores=None) -> io.NodeOutput:
        from ..core.preview import node_x0, render_tree, to_pil

        decode = tree.bundle.stack.decode
        with torch.no_grad():
            thumbs = [to_pil(decode(x.to(tree.bundle.device))) for x in node_x0(tree.tree)]
        kw = {}
        if scores is not None:
            kw = dict(rewards=scores.rewards, reward_names=scores.names, advantages=scores.advantages, eps=scores.eps)
        img = render_tree(tree.tree, thumbs, title=title or f"{tree.prompt} (seed {tree.seed})", thumb=thumbnail, **kw)
        out = pil_to_comfy(img)
        return io.NodeOutput(out, ui=ui.PreviewImage(out, cls=cls) if is_main_process() else None)


NODES = [TreeSettingsNode, TreeSampler, RewardScorer, TreePreview]
