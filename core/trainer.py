"""One Dynamic-TreeRPO training iteration and the loop around it.

iteration = rollout (old policy, no grad) -> decode -> rewards [leaves x K] -> advantages
per prompt -> clipped surrogate over tree edges + lambda * LayerTuning SFT (+ KL) ->
backward into the trainable (LoRA) weights -> clip grad norm -> optimizer step(s) ->
the window moves (a pure function of the iteration).

accelerate provides the device, mixed precision and data parallelism: every process takes
its own prompts, gradients are averaged at the last backward before each optimizer step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch

from . import checkpoint as ckpt
from .advantages import RunningNorm, combined_reward, edge_advantages, reward_std
from .losses import (best_sample_velocity, gaussian_kl, layer_sft_loss, ratio_norm_log_ratio,
                     sft_node_mask, tree_edge_loss)
from .groups import Group, clip_eps, reward_weights, score_group
from .presets import TrainConfig
from .rng import generator
from .schedule import schedule
from .sde import sde_step
from .tree import PromptRows, Tree, TreeSpec, expand_cond, rollout_batch, tree_nfe

log = logging.getLogger("treerpo")
_EMA_PREFIX = "__ema__."


class Trainer:
    """Trains ``policy`` (a velocity model ``v = policy(x, sigma, cond)``) with ``config``.

    rewards: ``rewards(images, prompts) -> Tensor[B, K]`` with ``names`` (and optionally
    ``weights``); non-finite entries mask their sample. encode: ``prompts -> list of cond
    dicts`` (batch dim 1), or None for an unconditional model. decode: ``latents -> images``
    for the rewards, or None to score latents directly.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        config: TrainConfig,
        rewards: Callable,
        encode: Callable | None = None,
        decode: Callable | None = None,
        latent_shape: Sequence[int] = (16, 64, 64),
        accelerator=None,
    ):
        from accelerate import Accelerator

        self.config = config.validate()
        self.rewards, self.encode, self.decode = rewards, encode, decode
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.reward_names = list(getattr(rewards, "names", []) or [])
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the policy has no trainable parameters (requires_grad=True): attach a LoRA first")
        self.param_names = [n for n, _ in named]
        opt = torch.optim.AdamW(
            [p for _, p in named], lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.model, self.optimizer = self.accelerator.prepare(policy, opt)
        self.params = [p for _, p in named]
        self.window = config.window()
        self.sigmas = schedule(config, self.latent_shape)[0]
        self.iteration = 0
        self.history: list[dict] = []
        self.reward_norm = RunningNorm()  # clip_reward="running"
        # EMA of the trainable weights (fp32, on the weights' device), for evaluation and saving
        self.ema = {n: p.detach().float().clone() for n, p in named} if config.ema_decay > 0 else None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in zip(self.param_names, self.params)}

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA of the trainable weights (ema_decay > 0), names as trainable_state_dict()."""
        if self.ema is None:
            return None
        return {n: t.detach().cpu().clone() for n, t in self.ema.items()}

    @contextlib.contextmanager
    def ema_applied(self):
        """Swap the EMA weights into the policy for the duration (evaluation samples, saving
        an EMA LoRA); the trained weights come back afterwards. A no-op without an EMA."""
        if self.ema is None:
            yield self.policy
            return
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for n, p in zip(self.param_names, self.params):
                    p.copy_(self.ema[n].to(p.device, p.dtype))
            yield self.policy
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, saved):
                    p.copy_(t)

    def _update_ema(self) -> None:
        d = self.config.ema_decay
        with torch.no_grad():
            for n, p in zip(self.param_names, self.params):
                self.ema[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def noise_levels(self) -> list[float]:
        return schedule(self.config, self.latent_shape)[1]

    def nfe(self, iteration: int | None = None) -> dict:
        c = self.config
        it = self.iteration if iteration is None else iteration
        spec = TreeSpec(c.num_steps, self.window.position(it), c.branching)
        return tree_nfe(spec, c.share_prefix, c.trained_layers(it), c.compress_ratio)

    def _conds(self, prompts: list[str]) -> list:
        # no cache here: the encoder keeps its own (FLUX: on disk plus a bounded memory LRU)
        if self.encode is None:
            return [None] * len(prompts)
        return [_to_device(cond, self.device) for cond in self.encode(prompts)]

    def _score(self, leaves: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards [leaves, K] of the final latents `leaves`, row i generated for prompts[i]."""
        images = self.decode(leaves) if self.decode is not None else leaves
        r = self.rewards(images, prompts)
        r = torch.as_tensor(r).detach().float().cpu()
        if r.ndim == 1:
            r = r[:, None]
        k = len(self.reward_names) or r.shape[1]
        if r.ndim != 2 or r.shape != (leaves.shape[0], k):
            raise ValueError(
                f"the reward function returned shape {tuple(r.shape)}; expected [{leaves.shape[0]}, {k}] "
                f"(one row per leaf, one column per reward model {self.reward_names or ''})"
            )
        if not self.reward_names:
            self.reward_names = [f"reward{i}" for i in range(k)]
        return r

    @torch.no_grad()
    def _score_trees(self, trees, prompts: list[str]) -> list[torch.Tensor]:
        """Rewards [leaves, K] per prompt. Every prompt's leaves are decoded and scored together,
        `micro_batch` rows per call when set (one call per prompt left the decoder and the
        reward models batch-starved, as the rollout was)."""
        leaves = torch.cat([t.leaves for t in trees])
        rows = [p for t, p in zip(trees, prompts) for _ in range(t.leaves.shape[0])]
        n = self.config.micro_batch or len(leaves)
        r = torch.cat([self._score(leaves[a:a + n], rows[a:a + n]) for a in range(0, len(leaves), n)])
        return list(r.split([t.leaves.shape[0] for t in trees]))

    def _reward_weights(self):
        return reward_weights(self.config, getattr(self.rewards, "weights", None), self.reward_names)

    def _clip_eps(self, groups: list[Group], weights) -> None:
        acc = self.accelerator
        clip_eps(self.config, groups, weights, self.reward_names, self.reward_norm,
                 gather=lambda t: acc.gather(t.to(self.device)).cpu())

    # ------------------------------------------------------------------ one iteration
    def step(self, prompts: Sequence[str]) -> dict:
        """Run one training iteration on this process's ``prompts`` and return metrics."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("step() needs a non-empty list of prompts")
        with _deterministic(self.config.deterministic):
            return self._step(prompts)

    def _step(self, prompts: Sequence[str]) -> dict:
        c, acc = self.config, self.accelerator
        it = self.iteration
        tau = self.window.position(it)
        spec = TreeSpec(c.num_steps, tau, c.branching)
        levels = self.noise_levels()
        dtype = next(self.policy.parameters()).dtype
        conds = self._conds(list(prompts))

        # 1. rollout under the old policy, every prompt's tree in one batch (same autocast and
        #    batch layout as the update, so the first ratio is exactly 1)
        t0 = time.perf_counter()
        # seeded by the prompt's place in the global batch: N processes sample the trees one
        # process would for the same global prompts
        gens = [generator(c.seed, it, acc.process_index * c.prompts_per_iteration + i, 0) for i in range(len(prompts))]
        inits = [torch.randn((1, *self.latent_shape), generator=g).to(self.device) for g in gens]
        with torch.no_grad(), acc.autocast():
            trees = rollout_batch(
                self.policy, conds, spec, self.sigmas, levels, inits, gens, share_prefix=c.share_prefix,
                compress_ratio=c.compress_ratio,
                store_velocity=(c.sft_lambda > 0 and c.sft_target == "velocity") or c.ratio_norm,
                micro_batch=c.micro_batch, offload=c.offload_latents, noise_schedule=c.noise_schedule,
                model_dtype=dtype, sampler=c.sampler,
            )
        t1 = time.perf_counter()

        # 2. rewards of every leaf, advantages per prompt
        rewards = self._score_trees(trees, list(prompts))
        weights = self._reward_weights()  # after the first score: the reward names are known
        std = None
        if c.adv_std == "global":  # Flow-GRPO global_std: one std per reward model over the whole step
            r_all = acc.gather(torch.cat(rewards).to(self.device)).cpu()
            std = reward_std(r_all, c.adv_std_unbiased)
        groups = [score_group(r, weights, c, std) for r in rewards]
        for tree, g in zip(trees, groups):
            # the best-sample LayerTuning target needs the best leaf's final latent; nothing else does
            keep = c.sft_lambda > 0 and c.sft_target != "velocity"
            g.best_x0 = tree.leaves[g.best or 0].unsqueeze(0) if keep else None
            tree.leaves = None  # free the final latents: training needs only the window
        self._clip_eps(groups, weights)
        t2 = time.perf_counter()

        # 3. update: per trained layer, per micro-batch of every prompt's parents a backward
        layers = c.trained_layers(it)
        stats = StepStats(sft_lambda=self.sft_weight())
        # each loss term's weight: an optimizer step sees the mean over its prompts (and over the
        # layers it accumulates); the logged SFT / KL values are means over (layer, prompt) pairs
        share = _Share(weight=(1.0 if c.step_per_layer else 1.0 / len(layers)) / len(trees),
                       mean=1.0 / (len(trees) * len(layers)), prompts=len(trees), dtype=dtype)
        groups_of_steps = [[k] for k in layers] if c.step_per_layer else [layers]
        noised = c.sft_lambda > 0 and c.sft_target == "best-sample-noised"
        for s, step_layers in enumerate(groups_of_steps):
            jobs = [partial(self._layer_backward, trees, k, groups, conds, share, stats) for k in step_layers]
            if noised and s == 0:  # one LayerTuning term per iteration, before the first optimizer step
                jobs += [partial(self._noised_best_backward, p, groups[p], conds[p], len(layers), share, stats)
                         for p in range(len(trees))]
            for j, job in enumerate(jobs):
                last = j == len(jobs) - 1
                with contextlib.nullcontext() if last else acc.no_sync(self.model):
                    job()
            self._optimizer_step(stats)
            if stats.first_update is None:  # on-policy: its mean ratio must be exactly 1
                stats.first_update = (stats.ratio_sum, stats.count)
        t3 = time.perf_counter()

        self.iteration += 1
        if self.ema is not None and self.iteration % c.ema_every == 0:
            self._update_ema()
        metrics = self._metrics(groups, weights, stats, trees, tau, layers, (t1 - t0, t2 - t1, t3 - t2))
        self.history.append(metrics)
        return metrics

    def _layer_backward(self, trees: list[Tree], k: int, groups: list[Group], conds, share: _Share,
                        stats: StepStats):
        """Backward of window layer k of every prompt's tree, in the rollout's batches: the
        layer's parents of all prompts, prompt-major, in chunks of ``micro_batch``; each parent
        is evaluated once and gives the log-probs of all its children."""
        c, acc = self.config, self.accelerator
        b = _LayerBatch(trees, k, groups, c)
        dev = self.device
        parents, children, old_lp = b.parents.to(dev), b.children.to(dev), b.old_lp.to(dev)
        rows_of = PromptRows(conds, b.rows_per_prompt)
        R = parents.shape[0]
        mb = c.micro_batch or R
        for a in range(0, R, mb):
            e = min(R, a + mb)
            sel = (b.term_parent >= a) & (b.term_parent < e)  # terms below this chunk
            edge_sel = (b.parent_index >= a) & (b.parent_index < e)  # edges out of this chunk
            if not bool(sel.any()):
                continue
            local_edge = torch.cumsum(edge_sel.long(), 0) - 1  # edge id -> row among edge_sel
            rows = (b.parent_index[edge_sel] - a).to(dev)
            kids = children[edge_sel.to(dev)]
            x = parents[a:e]
            cond = rows_of.rows(a, e)
            sig = torch.full((e - a,), b.layer.sigma, device=dev)
            with acc.autocast():
                v = self.model(x.to(share.dtype), sig, cond).float()
            step = partial(sde_step, sigma=b.layer.sigma, sigma_next=b.layer.sigma_next,
                           noise_level=b.layer.noise_level, x_next=kids, schedule=c.noise_schedule, sampler=c.sampler)
            st = step(x[rows], v[rows])
            old_e = old_lp[edge_sel.to(dev)]
            log_ratio = None
            if c.ratio_norm:
                old_mean = step(x[rows], b.old_velocity[a:e].to(dev)[rows]).mean
                log_ratio = ratio_norm_log_ratio(st.log_prob, old_e, st.mean, old_mean, st.std)
            loss, s = tree_edge_loss(st.log_prob, old_e, local_edge[b.term_edge[sel]], b.term_adv[sel],
                                     b.term_eps[sel], b.term_weight[sel] * share.weight, log_ratio)
            total = loss
            if b.sft_rows is not None:
                if c.sft_target == "best-sample":  # the velocity carrying each node to its prompt's best leaf
                    target = best_sample_velocity(x, b.best_x0[a:e].to(dev), b.layer.sigma)
                else:
                    target = b.sft_target[a:e].to(dev)
                # the sum over prompts of each one's masked mean over its nodes
                sft = layer_sft_loss(v, target, b.sft_rows[a:e])
                total = total + self.sft_weight() * sft * share.weight
                stats.sft += float(sft.detach()) * share.mean
            if c.kl_beta > 0:
                with torch.no_grad(), self._reference(), acc.autocast():
                    v_ref = self.policy(x.to(share.dtype), sig, cond).float()
                # the sum over prompts of each one's mean over its edges
                kl = gaussian_kl(st.mean, step(x[rows], v_ref[rows]).mean, st.std, b.kl_edges[edge_sel])
                total = total + c.kl_beta * kl * share.weight
                stats.kl += float(kl.detach()) * share.mean
            acc.backward(total)
            stats.loss += float(total.detach())
            stats.add_terms(s, b.layer.step)

    def sft_weight(self) -> float:
        """lambda of Eq. 13 at this iteration: constant, or (sft_decay) falling linearly to 0 at
        ``iterations`` (Fig. 4b: a large lambda speeds the start and limits the end)."""
        c = self.config
        return c.sft_lambda * (max(0.0, 1.0 - self.iteration / c.iterations) if c.sft_decay else 1.0)

    def _noised_best_backward(self, p: int, group: Group, cond, n_draws: int, share: _Share, stats: StepStats):
        """sft_target="best-sample-noised": flow matching on the group's best sample, noised
        afresh to ``n_draws`` steps of the run's schedule (drawn per prompt, seeded), so every
        noise level the sampler visits is regressed, not only the window's. A group without a
        best leaf still runs (weight 0): every process must reach the same backward calls."""
        c, acc = self.config, self.accelerator
        g = generator(c.seed, self.iteration, acc.process_index * c.prompts_per_iteration + p, "sft")
        steps = torch.randint(0, c.num_steps, (n_draws,), generator=g)
        sig = torch.as_tensor(self.sigmas, dtype=torch.float32)[steps]  # steps < T: every sigma > 0
        x0 = group.best_x0.to(self.device).float().expand(n_draws, *group.best_x0.shape[1:])
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        s = sig.to(self.device).reshape(-1, *([1] * (x0.dim() - 1)))
        x = (1 - s) * x0 + s * noise
        with acc.autocast():
            v = self.model(x.to(share.dtype), sig.to(self.device), expand_cond(cond, n_draws)).float()
        sft = layer_sft_loss(v, best_sample_velocity(x, x0, s))
        on = 1.0 if group.best is not None else 0.0
        total = self.sft_weight() * on * sft / share.prompts
        acc.backward(total)
        stats.loss += float(total.detach())
        stats.sft += on * float(sft.detach()) / share.prompts

    def _reference(self):
        ref = getattr(self.policy, "reference", None)
        if ref is None:
            raise ValueError("kl_beta > 0 needs a policy with a reference() context (adapters disabled)")
        return ref()

    def _optimizer_step(self, stats: StepStats):
        c, acc = self.config, self.accelerator
        if c.max_grad_norm and c.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.params, c.max_grad_norm)
        else:
            grads = [p.grad.norm() for p in self.params if p.grad is not None]
            norm = torch.norm(torch.stack(grads)) if grads else 0.0
        norm = float(norm)
        if math.isfinite(norm):
            self.optimizer.step()
        else:  # a non-finite gradient never reaches the weights
            stats.skipped += 1
            log.warning("non-finite gradient norm at iteration %d: optimizer step skipped", self.iteration)
        self.optimizer.zero_grad(set_to_none=True)
        stats.grad_norm.append(norm)

    def _metrics(self, groups, weights, stats, trees, tau, layers, times) -> dict:
        """The iteration's metrics over every process's prompts: rank 0 writes them, so they
        must describe the whole global batch, not its own share."""
        c, acc = self.config, self.accelerator
        r = torch.cat([g.rewards for g in groups])  # [prompts * L, K]
        ok = torch.cat([g.valid for g in groups])
        r_all = acc.gather(r.to(self.device)).cpu()
        ok_all = acc.gather(ok.to(self.device)).cpu().bool()
        m: dict = {"iteration": self.iteration, "window_start": tau}
        # the headline: the combined reward the run optimises (weights and Eq. 11's scales applied)
        combined = combined_reward(r_all, weights, self.reward_names)[ok_all]
        m["reward_mean"] = float(combined.mean()) if combined.numel() else math.nan
        for k, name in enumerate(self.reward_names):
            col = r_all[ok_all, k]
            m[f"reward/{name}/mean"] = float(col.mean()) if col.numel() else math.nan
            m[f"reward/{name}/std"] = float(col.std(unbiased=False)) if col.numel() else math.nan
            m[f"reward/{name}/max"] = float(col.max()) if col.numel() else math.nan
        m["masked_samples"] = int((~ok_all).sum())

        eps = torch.cat([g.eps[g.valid] for g in groups])
        eps = eps if eps.numel() else torch.cat([g.eps for g in groups])
        group_std = [float(g.rewards[g.valid].std(0, unbiased=False).mean()) for g in groups if int(g.valid.sum()) > 1]
        first_sum, first_count = stats.first_update or (0.0, 0)
        # every process's sums and counts, added up; the loss, SFT and KL terms are each process's
        # mean over its prompts (all processes hold as many), so their sum / processes is the mean
        local = {
            "ratio": stats.ratio_sum, "ratio_raw": stats.ratio_raw_sum, "approx_kl": stats.approx_kl_sum,
            "terms": stats.count, "clip_high": stats.clip_high, "clip_low": stats.clip_low,
            "first_sum": first_sum, "first_count": first_count,
            "loss": stats.loss, "sft": stats.sft, "kl": stats.kl,
            "group_std": sum(group_std), "groups_std": len(group_std), "groups": len(groups),
            "zero_variance": sum(1 for g in groups if float(g.adv.abs().sum()) == 0.0),
            # groups whose leaves all scored the same on every reward model: no signal under any std
            "zero_std": sum(1 for g in groups if float(reward_std(g.rewards).max()) <= 1e-6),
            "eps_sum": float(eps.double().sum()), "eps_count": eps.numel(), "nfe": sum(t.nfe for t in trees),
        }
        for j, sums in sorted(stats.log_ratio_by_step.items()):  # every process trains the same steps
            local.update({f"lr_sum/{j}": sums[0], f"lr_sq/{j}": sums[1], f"lr_n/{j}": sums[2]})
        total = dict(zip(local, acc.gather(torch.tensor([list(local.values())], dtype=torch.float64,
                                                        device=self.device)).sum(0).tolist()))
        lo, neg_hi = acc.gather(torch.tensor([[float(eps.min()), -float(eps.max())]], dtype=torch.float64,
                                             device=self.device)).amin(0).tolist()
        n, procs = max(total["terms"], 1), acc.num_processes
        m["group_reward_std"] = total["group_std"] / total["groups_std"] if total["groups_std"] else 0.0
        m["zero_variance_groups"] = int(total["zero_variance"])
        m["zero_std_group_frac"] = total["zero_std"] / total["groups"]
        m["ratio_mean"] = total["ratio"] / n
        m["ratio_mean_raw"] = total["ratio_raw"] / n  # exp(log p - log p_old), before ratio_norm
        m["ratio_first_update"] = total["first_sum"] / total["first_count"] if total["first_count"] else 1.0
        m["approx_kl"] = total["approx_kl"] / n  # Flow-GRPO's: mean of (log p - log p_old)^2 / 2
        m["clip_frac_high"] = total["clip_high"] / n
        m["clip_frac_low"] = total["clip_low"] / n
        # the spread of log r per trained step, to set eps against (Eq. 11 binds only where |log r| > ~eps)
        sq = sum(v for k, v in total.items() if k.startswith("lr_sq/"))
        mean = sum(v for k, v in total.items() if k.startswith("lr_sum/")) / n
        m["log_ratio_std"] = math.sqrt(max(sq / n - mean * mean, 0.0))
        for j in sorted(stats.log_ratio_by_step):
            nj = max(total[f"lr_n/{j}"], 1)
            mj = total[f"lr_sum/{j}"] / nj
            m[f"log_ratio_std/step{j}"] = math.sqrt(max(total[f"lr_sq/{j}"] / nj - mj * mj, 0.0))
        m["loss"] = total["loss"] / procs
        m["sft_loss"] = total["sft"] / procs
        m["sft_lambda"] = stats.sft_lambda
        m["kl"] = total["kl"] / procs
        m["grad_norm"] = max(stats.grad_norm) if stats.grad_norm else 0.0  # of the all-reduced gradient
        m["skipped_steps"] = stats.skipped
        m["eps_mean"], m["eps_min"], m["eps_max"] = total["eps_sum"] / max(total["eps_count"], 1), lo, -neg_hi
        nfe = tree_nfe(trees[0].spec, c.share_prefix, layers, c.compress_ratio)
        m["nfe_old_per_sample"] = nfe["rollout_per_sample"]
        m["nfe_new_per_sample"] = nfe["train_per_sample"]
        m["nfe_old_counted"] = int(total["nfe"])
        m["trained_layers"] = len(layers)
        m["time_rollout"], m["time_reward"], m["time_update"] = times
        return m

    # ------------------------------------------------------------------ loop, checkpoints
    def prompts_for(self, dataset: Sequence[str], iteration: int) -> list[str]:
        """This process's prompts at ``iteration``: a seeded pass through the dataset, each
        process taking a disjoint slice of the global batch."""
        c, acc = self.config, self.accelerator
        per_iter = c.prompts_per_iteration * acc.num_processes
        start = iteration * per_iter
        out = []
        for j in range(start, start + per_iter):
            epoch, pos = divmod(j, len(dataset))
            perm = torch.randperm(len(dataset), generator=generator(c.seed, epoch, "prompts"))
            out.append(dataset[int(perm[pos])])
        return out[acc.process_index * c.prompts_per_iteration : (acc.process_index + 1) * c.prompts_per_iteration]

    def train(
        self,
        dataset: Sequence[str],
        iterations: int,
        checkpoint_dir=None,
        checkpoint_every: int = 10,
        progress: bool = True,
        callback: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """Train until ``iterations`` iterations are done in total (a resumed trainer
        continues where it stopped).

        A checkpoint is written every ``checkpoint_every`` iterations, at the end, and when the
        run stops early: on Ctrl-C, and when ``callback`` (called after each iteration, with its
        metrics) raises, since the iteration before it is complete (a Cancel button, an error in
        the caller's code). A callback that raises ``StopWithoutCheckpoint`` stops the run and
        keeps the last checkpoint (the weights are bad)."""
        if not dataset:
            raise ValueError("the prompt dataset is empty")
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=self.iteration,
                   disable=not (progress and self.accelerator.is_main_process), desc=f"{self.config.preset}", unit="it")
        stop = _DeferredInterrupt()

        stopped_at: list[int] = []  # the iteration a stop checkpoint was written at

        def save_on_stop(why: str) -> None:
            if checkpoint_dir and self.iteration not in stopped_at:
                log.warning("%s: saving a checkpoint at iteration %d", why, self.iteration)
                self.save_checkpoint(checkpoint_dir)
                stopped_at.append(self.iteration)

        try:
            while self.iteration < iterations:
                with stop:
                    m = self.step(self.prompts_for(dataset, self.iteration))
                bar.update(1)
                bar.set_postfix_str(f"{reward_headline(m)}, ratio {m['ratio_mean']:.4f}, tau {m['window_start']}")
                if callback:
                    try:
                        callback(m)
                    except StopWithoutCheckpoint:
                        raise
                    except BaseException as e:  # noqa: BLE001 - whatever stops the run, keep the iteration
                        save_on_stop(f"stopped by {type(e).__name__}")
                        raise
                if checkpoint_dir and (self.iteration % checkpoint_every == 0 or self.iteration == iterations):
                    self.save_checkpoint(checkpoint_dir)
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:  # Ctrl-C after an iteration, or a second one inside it
            save_on_stop("interrupted")
            raise
        finally:
            bar.close()
        return self.history

    def save_checkpoint(self, directory) -> None:
        """Trainable weights, optimizer, iteration and metric history (the window and every
        random draw follow from the iteration and seed). Atomic; main process only."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "iteration": self.iteration,
                "window_start": self.window.position(self.iteration),  # informative: derived from iteration
                "config": self.config.to_dict(),
                "reward_names": self.reward_names,
                "history": self.history,
                "param_names": self.param_names,
                "reward_norm": self.reward_norm.state_dict(),
            }
            tensors = self.trainable_state_dict()
            if self.ema is not None:  # beside the weights, under a prefix no parameter name has
                tensors.update({_EMA_PREFIX + n: t for n, t in self.ema_state_dict().items()})
            ckpt.save_checkpoint(directory, self.iteration, tensors,
                                 self.optimizer.optimizer.state_dict() if hasattr(self.optimizer, "optimizer")
                                 else self.optimizer.state_dict(), state)
        acc.wait_for_everyone()

    def load_checkpoint(self, path) -> None:
        """Resume from a run folder (its newest checkpoint) or one step folder."""
        trainable, opt_state, state, folder = ckpt.load_checkpoint(path)
        ema = {n[len(_EMA_PREFIX):]: t for n, t in trainable.items() if n.startswith(_EMA_PREFIX)}
        trainable = {n: t for n, t in trainable.items() if not n.startswith(_EMA_PREFIX)}
        missing = [n for n in self.param_names if n not in trainable]
        extra = [n for n in trainable if n not in set(self.param_names)]
        if missing or extra:
            raise ValueError(
                f"checkpoint {folder} does not match this policy's trainable weights: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            )
        for n, p in zip(self.param_names, self.params):
            t = trainable[n]
            if t.shape != p.shape:
                raise ValueError(f"checkpoint {folder}: weight {n} has shape {tuple(t.shape)}, "
                                 f"the policy {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t.to(p.device, p.dtype))
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        opt.load_state_dict(opt_state)
        saved = state.get("config", {})
        for key in ("num_steps", "branching", "share_prefix", "seed"):
            if key in saved and saved[key] != self.config.to_dict()[key]:
                log.warning("resuming %s with %s=%r (checkpoint had %r)", folder, key, self.config.to_dict()[key],
                            saved[key])
        if self.ema is not None:
            # a checkpoint written without an EMA starts it from the loaded weights
            for n, p in zip(self.param_names, self.params):
                self.ema[n] = (ema[n] if n in ema else p.detach()).to(p.device, torch.float32).clone()
        self.reward_norm = RunningNorm(**state.get("reward_norm", {}))
        self.iteration = int(state["iteration"])
        self.history = list(state.get("history", []))
        self.reward_names = self.reward_names or list(state.get("reward_names", []))


# ---------------------------------------------------------------------- the update's bookkeeping
@dataclass
class StepStats:
    """What one iteration's update adds up: the loss terms, and the ratio statistics summed
    over the clipped terms (``count`` of them) for the means the metrics report."""

    sft_lambda: float = 0.0
    loss: float = 0.0
    sft: float = 0.0
    kl: float = 0.0
    ratio_sum: float = 0.0
    ratio_raw_sum: float = 0.0
    approx_kl_sum: float = 0.0
    count: int = 0
    clip_high: int = 0
    clip_low: int = 0
    grad_norm: list[float] = field(default_factory=list)
    skipped: int = 0
    first_update: tuple[float, int] | None = None  # ratio_sum and count at the first optimizer step
    # per sampling step trained: [sum, sum of squares, count] of the log-ratio the clip sees
    log_ratio_by_step: dict[int, list[float]] = field(default_factory=dict)

    def add_terms(self, s: dict, step: int) -> None:
        """Add tree_edge_loss's statistics of one chunk of the layer at sampling step ``step``."""
        for key in ("ratio_sum", "ratio_raw_sum", "approx_kl_sum", "count", "clip_high", "clip_low"):
            setattr(self, key, getattr(self, key) + s[key])
        acc = self.log_ratio_by_step.setdefault(step, [0.0, 0.0, 0])
        for i, key in enumerate(("log_ratio_sum", "log_ratio_sq_sum", "count")):
            acc[i] += s[key]


@dataclass(frozen=True)
class _Share:
    """How one backward's terms are weighted: ``weight`` in the loss (the mean over the step's
    prompts and accumulated layers), ``mean`` in the logged per-(layer, prompt) means."""

    weight: float
    mean: float
    prompts: int
    dtype: torch.dtype


def reward_headline(m: dict, fmt: str = ".4g") -> str:
    """``reward 0.512 (pickscore 21.9, hps 0.281)``: the combined reward the run optimises and,
    with several reward models (their scales differ), each model's own mean beside it."""
    each = [(k[len("reward/"):-len("/mean")], v) for k, v in m.items()
            if k.startswith("reward/") and k.endswith("/mean")]
    models = f" ({', '.join(f'{n} {v:{fmt}}' for n, v in each)})" if len(each) > 1 else ""
    return f"reward {m['reward_mean']:{fmt}}{models}"


class _LayerBatch:
    """Window layer k of every prompt's tree as one batch, prompt-major: parents, children and
    old log-probs concatenated, parent and edge indices offset to their prompt's rows, and the
    clipped terms of Eq. 9 (one per leaf on the edge of its path, a shared edge once per
    descendant; or one per edge with its own advantage, ``edge_advantage``) with their
    advantages, eps and weights (Eq. 9's 1/valid leaves per prompt; masked leaves weigh 0).
    With LayerTuning at the tree's nodes: each row's target and weight (its prompt's node mask / the
    mask's size; 0 for a prompt without a best leaf). ``kl_edges``: 1/edges of the prompt."""

    def __init__(self, trees: list[Tree], k: int, groups: list[Group], config: TrainConfig):
        c = config
        layers = [t.layers[k] for t in trees]
        self.layer = layers[0]
        n_rows, n_edges = self.layer.parents.shape[0], self.layer.parent_index.shape[0]
        self.rows_per_prompt = n_rows
        self.parents = torch.cat([lay.parents for lay in layers])
        self.children = torch.cat([lay.children for lay in layers])
        self.old_lp = torch.cat([lay.old_log_prob for lay in layers])
        self.old_velocity = torch.cat([lay.old_velocity for lay in layers]) if c.ratio_norm else None
        self.parent_index = torch.cat([lay.parent_index + p * n_rows for p, lay in enumerate(layers)])
        self.kl_edges = torch.full((len(layers) * n_edges,), 1.0 / n_edges)
        edge, adv, eps, weight = [], [], [], []
        for p, (lay, g) in enumerate(zip(layers, groups)):
            if c.edge_advantage == "leaf":
                w = g.valid.float() / max(int(g.valid.sum()), 1)
                e, a, ep = lay.edge_of_leaf, g.adv, g.eps
            else:
                a, w = edge_advantages(g.adv, g.valid, lay.edge_of_leaf, n_edges, c.edge_advantage)
                ep, _ = edge_advantages(g.eps, g.valid, lay.edge_of_leaf, n_edges, "descendant-mean")  # their mean
                e = torch.arange(n_edges)
            edge.append(e + p * n_edges)
            adv.append(a)
            eps.append(ep)
            weight.append(w)
        self.term_edge, self.term_adv = torch.cat(edge), torch.cat(adv)
        self.term_eps, self.term_weight = torch.cat(eps), torch.cat(weight)
        self.term_parent = self.parent_index[self.term_edge]

        self.sft_rows = self.sft_target = self.best_x0 = None
        if not (c.sft_lambda > 0 and c.sft_target != "best-sample-noised"):
            return
        weights, targets, x0s = [], [], []
        for p, (lay, g, t) in enumerate(zip(layers, groups, trees)):
            parent_of_leaf = lay.parent_index[lay.edge_of_leaf]
            if g.best is None:  # nothing to follow: weight 0
                weights.append(torch.zeros(n_rows))
            else:
                mask = sft_node_mask(parent_of_leaf, g.best, c.sft_nodes, t.spec.branching, k).float()
                weights.append(mask / mask.sum())
            best_row = int(parent_of_leaf[g.best or 0])
            if c.sft_target == "velocity":  # the best leaf's parent's old velocity, for every node
                targets.append(lay.old_velocity[best_row : best_row + 1].expand(n_rows, *lay.old_velocity.shape[1:]))
            else:
                x0s.append(g.best_x0.expand(n_rows, *g.best_x0.shape[1:]))
        self.sft_rows = torch.cat(weights)
        if targets:
            self.sft_target = torch.cat(targets)
        if x0s:
            self.best_x0 = torch.cat(x0s)


class StopWithoutCheckpoint(Exception):
    """Raised by a training callback to stop without a checkpoint of the current weights
    (they are bad, e.g. every reward was NaN): the last checkpoint stays the newest."""


class _DeferredInterrupt:
    """First Ctrl-C during an iteration lets it finish (so the checkpoint holds a whole
    iteration); a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this iteration, then saving a checkpoint (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


@contextlib.contextmanager
def _deterministic(on: bool):
    """Deterministic kernels for the trainer's own work only (deterministic=True): multi-threaded
    CPU and CUDA reductions otherwise differ in the last bits run to run, which RL amplifies; and
    a ComfyUI server runs other workflows after the run, with the state it had before."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _to_device(cond, device):
    if cond is None:
        return None
    if torch.is_tensor(cond):
        return cond.to(device)
    return {k: _to_device(v, device) for k, v in cond.items()}


__all__ = ["StopWithoutCheckpoint", "Trainer", "reward_headline"]
