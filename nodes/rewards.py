"""Load reward (HPS-v2.1, PickScore, ImageReward from models/treerpo_rewards, or a weight-free
reward) and Combine rewards with weights. Both output a core RewardSet."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .choices import NOT_CONNECTED, check_combined_weights, check_reward_weight, linked
from .common import CATEGORY, REWARDS_FOLDER, Rewards, model_folder, queue_check, torch_device

DTYPES = ("auto", "float32", "bfloat16", "float16")


class LoadReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..core.rewards import available_rewards

        return io.Schema(
            node_id="TreeRPOLoadReward",
            display_name="Load reward (TreeRPO)",
            category=CATEGORY,
            description="A reward model scoring images against their prompt. hps, pickscore and imagereward read "
                        "their original checkpoints from models/treerpo_rewards/<name>/ (see docs/rewards.md); the "
                        "others need no weights.",
            inputs=[
                io.Combo.Input("reward", options=available_rewards(), default="hps",
                               tooltip="Which reward: hps (HPS-v2.1), pickscore, imagereward from "
                                       "models/treerpo_rewards, or a weight-free one (jpeg, brightness, ...; shapes = "
                                       "prompt fidelity for the shapes-world model)."),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Weight of this reward's normalised advantage in the sum (paper: 1 each)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="Reward model precision: auto = bf16 on a GPU, fp32 on the CPU."),
            ],
            outputs=[Rewards.Output(display_name="rewards", tooltip="A weighted set of reward models.")],
        )

    @classmethod
    def validate_inputs(cls, reward, weight, dtype):
        from ..core.rewards.registry import check_rewards

        def files():  # a model reward's checkpoint files are there (nothing is read)
            if reward is not None:
                check_rewards([reward], model_folder(REWARDS_FOLDER))

        return queue_check(cls, {"reward": reward, "weight": weight, "dtype": dtype},
                           lambda: check_reward_weight(weight), files)

    @classmethod
    def execute(cls, reward, weight, dtype) -> io.NodeOutput:
        from ..core.rewards import RewardSet, load_reward

        device = torch_device()
        if dtype == "auto":
            dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dt = getattr(torch, dtype)
        r = load_reward(reward, model_folder(REWARDS_FOLDER), device=device, dtype=dt)
        return io.NodeOutput(RewardSet([r], [weight]))


class CombineRewards(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOCombineRewards",
            display_name="Combine rewards (TreeRPO)",
            category=CATEGORY,
            description="Several reward sets as one: each reward is normalised per prompt, then summed with its "
                        "weight times the weight given here (paper Eq. 2).",
            inputs=[
                Rewards.Input("rewards_1", tooltip="First reward (set)."),
                io.Float.Input("weight_1", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Multiplies the weights of rewards_1."),
                Rewards.Input("rewards_2", optional=True, tooltip="Second reward (set), optional."),
                io.Float.Input("weight_2", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Multiplies the weights of rewards_2."),
                Rewards.Input("rewards_3", optional=True, tooltip="Third reward (set), optional."),
                io.Float.Input("weight_3", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Multiplies the weights of rewards_3."),
                Rewards.Input("rewards_4", optional=True, tooltip="Fourth reward (set), optional."),
                io.Float.Input("weight_4", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Multiplies the weights of rewards_4."),
            ],
            outputs=[Rewards.Output(display_name="rewards", tooltip="The combined, weighted reward set.")],
        )

    @classmethod
    def validate_inputs(cls, weight_1, weight_2, weight_3, weight_4, rewards_2=NOT_CONNECTED,
                        rewards_3=NOT_CONNECTED, rewards_4=NOT_CONNECTED):
        weights = (weight_1, weight_2, weight_3, weight_4)
        used = {"rewards_1"} | linked(rewards_2=rewards_2, rewards_3=rewards_3, rewards_4=rewards_4)  # 1: required
        return queue_check(cls, {f"weight_{i}": w for i, w in enumerate(weights, 1)},
                           lambda: check_combined_weights(weights, used))

    @classmethod
    def execute(cls, rewards_1, weight_1, weight_2, weight_3, weight_4, rewards_2=None, rewards_3=None,
                rewards_4=None) -> io.NodeOutput:
        from ..core.rewards import RewardSet

        models, weights = [], []
        for rs, w in ((rewards_1, weight_1), (rewards_2, weight_2), (rewards_3, weight_3), (rewards_4, weight_4)):
            if rs is None:
                continue
            models += list(rs.rewards)
            weights += [float(x) * float(w) for x in rs.weights]
        # RewardSet names a duplicate reward and all-zero weights itself
        return io.NodeOutput(RewardSet(models, weights))


NODES = [LoadReward, CombineRewards]
