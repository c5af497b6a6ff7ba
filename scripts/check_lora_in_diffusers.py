"""Does a trained tiny-shapes LoRA keep its gain outside our engine? Samples the evaluation
protocol's test set (or validation set) with diffusers' own FluxPipeline (its text encoding,
scheduler with dynamic shift, guidance 3.5 and VAE), once without and once with the LoRA loaded by
`load_lora_weights`, from the same initial noise, and prints both means and the paired gain with
95 % bootstrap intervals over prompts (core/evaluate.py) on a reward (default: the demo's, with the
two prompt-fidelity rewards scored beside it).

    python scripts/check_lora_in_diffusers.py demo-output/models/loras/treerpo/tiny_demo_00001_.safetensors
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lora", type=Path, help="a LoRA file saved by Save LoRA / treerpo train (tiny-shapes)")
    ap.add_argument("--set", default="test", choices=["test", "validation"], help="the protocol's prompt set")
    ap.add_argument("--prompts", type=int, default=128, help="the first N prompts of the set")
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt (1000, 1001, ...)")
    ap.add_argument("--steps", type=int, default=8, help="num_inference_steps (the demo trains with 8)")
    ap.add_argument("--batch", type=int, default=32, help="images per pipeline call")
    ap.add_argument("--reward", default="shapes-crisp-asked,shapes-layout,shapes",
                    help="comma list of rewards to score with; the first is the one summarised, each gets its own "
                         "gain (the demo trains shapes-crisp-asked)")
    a = ap.parse_args()
    if not a.lora.is_file():
        raise SystemExit(f"error: LoRA file {a.lora} not found")

    import torch
    from diffusers import FluxPipeline
    from tqdm.auto import tqdm

    from treerpo.core.evaluate import Evaluation
    from treerpo.core.rewards import load_rewards
    from treerpo.core.shapes.model import MAX_TOKENS, pretrained_dir
    from treerpo.core.shapes.world import prompt_set

    prompts, seeds = prompt_set(a.set)[:a.prompts], [1000 + i for i in range(a.seeds)]
    pipe = FluxPipeline.from_pretrained(str(pretrained_dir()), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    reward = load_rewards(a.reward)
    noise = torch.stack([torch.randn((16, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds])
    jobs = [(p, i) for p in prompts for i in range(len(seeds))]

    def scores(label: str) -> torch.Tensor:
        """[prompts, seeds, rewards] scores of the pipeline's current weights."""
        out = []
        for k in tqdm(range(0, len(jobs), a.batch), desc=label, unit="batch"):
            chunk = jobs[k:k + a.batch]
            lat = pipe._pack_latents(noise[[i for _, i in chunk]], len(chunk), 16, 16, 16)
            with torch.no_grad():
                img = pipe(prompt=[p for p, _ in chunk], latents=lat, height=64, width=64,
                           num_inference_steps=a.steps, guidance_scale=3.5, max_sequence_length=MAX_TOKENS,
                           output_type="pt").images
            out.append(torch.as_tensor(reward(img.float(), [p for p, _ in chunk])).float().reshape(len(chunk), -1))
        return torch.cat(out).reshape(len(prompts), len(seeds), -1)

    names = list(reward.names)
    ev = Evaluation(prompts, seeds, f"{names[0]} in diffusers FluxPipeline, {a.steps} steps, shapes {a.set} set")

    def record(state: str, got: torch.Tensor) -> None:
        """The first reward is the summarised score; with several, each gets its own gain."""
        ev.scores[state] = got[..., 0]
        if len(names) > 1:
            ev.by_reward[state] = {n: got[..., i] for i, n in enumerate(names)}

    record("base", scores("base"))
    pipe.load_lora_weights(str(a.lora), adapter_name="treerpo")
    record("lora", scores("with LoRA"))
    print(ev.summary("base", "lora"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
