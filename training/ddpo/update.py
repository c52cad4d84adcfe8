"""DDPO's update (paper Sec. 3.3): advantages from the gathered rewards, and the PPO-clipped policy
gradient on the stored SDE transitions, re-scored under the current policy.

Everything a process computes here is a function of the gathered reward table and of generators
keyed by (run seed, what, iteration, ...), so every process and every resumed run takes the same
minibatches in the same order.
"""
from __future__ import annotations

import torch

from .config import DDPOConfig
from .objective import (
    PerPromptStatTracker,
    RewardBaseline,
    clip_advantages,
    ddpo_loss,
    gaussian_kl,
    zero_advantage_group_share,
)
from ..evaluation import by_bucket
from ..seeds import keyed_generator
from .rollout import DRAWS, Slot, model_fn_for
from ..sampler import logprob_of_transition, train_step_indices


def compute_advantages(table: torch.Tensor, slots: list[Slot], keys: list[str], baseline: RewardBaseline,
                       tracker: PerPromptStatTracker, cfg: DDPOConfig):
    """Advantages (NaN for unjudged slots, which are dropped) from the gathered reward table, the same
    on every process. The baseline always advances, so it is reported in per_prompt mode too."""
    judged = table[:, 0] > 0
    out = torch.full((len(slots),), float("nan"))
    if not judged.any():
        return out, {"zero_adv_groups": None, "baseline": baseline.value}
    rewards = table[judged, 1]
    groups = [keys[s.prompt] for s, j in zip(slots, judged.tolist()) if j]
    advantages = baseline.advantages(rewards)
    if cfg.ddpo.advantage == "per_prompt":
        advantages = tracker.advantages(groups, rewards)
    advantages = clip_advantages(advantages, cfg.ddpo.adv_clip)
    out[judged] = advantages
    return out, {"zero_adv_groups": zero_advantage_group_share(groups, advantages), "baseline": baseline.value,
                 "adv_abs_mean": float(advantages.abs().mean())}


def policy_loss(logp_new, logp_old, advantages, clip_range: float, weight: float, kl=None, kl_weight: float = 0.0):
    """The loss one chunk backpropagates: the DDPO/PPO clipped surrogate (+ KL) of its entries, scaled
    by ``weight`` = entries in the chunk / entries in the global minibatch, so that summing every
    chunk's gradient over every process gives the gradient of the minibatch's mean loss."""
    loss, stats = ddpo_loss(logp_new, logp_old, advantages, clip_range, kl, kl_weight)
    return loss * weight, stats


def policy_update(cfg: DDPOConfig, transformer, params, optimizer, accelerator, dataset, rollouts, slots,
                  advantages: torch.Tensor, iteration: int, layout: str, gates, device, autocast=None) -> dict:
    """PPO epochs over the iteration's judged samples. Minibatches are drawn from the *global* slot
    order, each process trains on the members it sampled, gradients are summed across processes."""
    d, world, rank = cfg.ddpo, accelerator.num_processes, accelerator.process_index
    traj, seed = rollouts.trajectory, cfg.run.seed
    row = {s.index: i for i, s in enumerate(rollouts.slots)}
    steps = {s.index: train_step_indices(1, traj.stochastic_steps, cfg.rollout.train_fraction,
                                         keyed_generator(DRAWS, seed, "steps", iteration, s.index))[0] for s in slots}
    judged = ~torch.isnan(advantages)
    sums = torch.zeros(5, dtype=torch.float64)  # entries, policy_loss, approx_kl, clip_fraction, kl_ref (sums)
    first_error, grad_norms = 0.0, []
    for p in params:  # a process without members in a minibatch still adds (zero) gradients to the sum
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    transformer.train()
    for epoch in range(d.inner_epochs):
        order = torch.randperm(len(slots), generator=keyed_generator(DRAWS, seed, "order", iteration, epoch)).tolist()
        for start in range(0, len(order), d.train_batch):
            members = [i for i in order[start:start + d.train_batch] if judged[i]]
            total = sum(len(steps[i]) for i in members)  # entries in the global minibatch
            if not total:
                continue
            optimizer.zero_grad(set_to_none=False)
            mine = [slots[i] for i in members if i % world == rank]
            for chunk in by_bucket(dataset, mine, d.train_chunk, key=lambda s: s.prompt):
                rows = torch.tensor([row[s.index] for s in chunk])
                fn, _ = model_fn_for(transformer, dataset, chunk, layout, gates, device, traj.guidance[rows])
                adv = advantages[[s.index for s in chunk]].to(device)
                for j in range(len(steps[chunk[0].index])):
                    step = torch.stack([steps[s.index][j] for s in chunk])
                    x_t, x_next, sigma, sigma_next, old = (t.to(device) for t in _transition(traj, rows, step))
                    with torch.autocast(torch.device(device).type, autocast or torch.bfloat16,
                                        enabled=autocast is not None):
                        kl, ref = None, None
                        if d.kl_weight > 0:  # the reference first: disabling toggles the adapter's requires_grad
                            with torch.no_grad():
                                transformer.disable_adapters()
                                ref = logprob_of_transition(fn, x_t, x_next, sigma, sigma_next, traj.noise_level)
                                transformer.enable_adapters()
                        score = logprob_of_transition(fn, x_t, x_next, sigma, sigma_next, traj.noise_level,
                                                      traj.reduction)
                        if ref is not None:
                            kl = gaussian_kl(score.mean, ref.mean, score.std)
                    loss, st = policy_loss(score.logprob, old, adv, d.clip_range, len(chunk) / total, kl, d.kl_weight)
                    loss.backward()
                    error = float((score.logprob.detach() - old).exp().sub(1).abs().max())
                    if epoch == 0 and start == 0:
                        first_error = max(first_error, error)  # before any update: on-policy, ratio must be 1
                    sums += torch.tensor([len(chunk), st["policy_loss"] * len(chunk), st["approx_kl"] * len(chunk),
                                          st["clip_fraction"] * len(chunk), st.get("kl_ref", 0.0) * len(chunk)],
                                         dtype=torch.float64)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            flat = accelerator.reduce(flat, "sum")  # every process adds its members' share of the mean
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            if cfg.optim.grad_clip > 0:
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)))
            else:
                grad_norms.append(float(torch.linalg.vector_norm(flat)))
            optimizer.step()
    sums = accelerator.reduce(sums, "sum")
    n = max(float(sums[0]), 1.0)
    out = {"policy_loss": float(sums[1]) / n, "approx_kl": float(sums[2]) / n, "clip_fraction": float(sums[3]) / n,
           "onpolicy_ratio_error": float(accelerator.reduce(torch.tensor([first_error]), "max")),
           "optimizer_steps": len(grad_norms), "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else None}
    if d.kl_weight > 0:
        out["kl_ref"] = float(sums[4]) / n
    return out


def _transition(traj, rows, step):
    x_t = traj.latents[rows, step]
    return x_t, traj.latents[rows, step + 1], traj.sigmas[rows, step], traj.sigmas[rows, step + 1], \
        traj.log_probs[rows, step]
