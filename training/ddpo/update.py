"""DDPO's update (paper Sec. 3.3): advantages from the gathered rewards, and the PPO-clipped policy
gradient on the stored SDE transitions, re-scored under the current policy.

Everything a process computes here is a function of the gathered reward table and of generators
keyed by (run seed, what, iteration, ...), so every process and every resumed run takes the same
minibatches in the same order.
"""
from __future__ import annotations

import torch

from ..evaluation import by_bucket
from ..sampler import logprob_of_transition, train_step_indices
from ..seeds import keyed_generator
from .config import DDPOConfig
from .objective import (
    PerPromptStatTracker,
    RewardBaseline,
    clip_advantages,
    ddpo_loss,
    gaussian_kl,
    tied_groups,
    zero_advantage_group_share,
)
from .policy import Policy
from .rollout import DRAWS, JUDGED, REWARD, Slot


def compute_advantages(table: torch.Tensor, slots: list[Slot], keys: list[str], baseline: RewardBaseline,
                       tracker: PerPromptStatTracker, cfg: DDPOConfig):
    """Advantages (NaN for unjudged slots, which are dropped) from the gathered reward table, the same
    on every process. The baseline always advances, so it is reported in per_prompt mode too."""
    judged = table[:, JUDGED] > 0
    out = torch.full((len(slots),), float("nan"))
    if not judged.any():
        return out, {"zero_adv_groups": None, "baseline": baseline.value}
    rewards = table[judged, REWARD]
    groups = [keys[s.prompt] for s, j in zip(slots, judged.tolist()) if j]
    advantages = baseline.advantages(rewards)
    if cfg.ddpo.advantage == "per_prompt":
        advantages = tracker.advantages(groups, rewards)
    advantages = clip_advantages(advantages, cfg.ddpo.adv_clip)
    stats = {"zero_adv_groups": zero_advantage_group_share(groups, advantages), "baseline": baseline.value,
             "adv_abs_mean": float(advantages.abs().mean())}
    if cfg.ddpo.drop_tied_groups:  # NaN: left out of the update like an unjudged sample
        tied = tied_groups(groups, rewards)
        advantages = advantages.masked_fill(tied, float("nan"))
        stats["dropped_tied"] = float(tied.float().mean())
    out[judged] = advantages
    return out, stats


def policy_loss(logp_new, logp_old, advantages, clip_range: float, weight: float, kl=None, kl_weight: float = 0.0):
    """The loss one chunk backpropagates: the DDPO/PPO clipped surrogate (+ KL) of its entries, scaled
    by ``weight`` = entries in the chunk / entries in the global minibatch, so that summing every
    chunk's gradient over every process gives the gradient of the minibatch's mean loss."""
    loss, stats = ddpo_loss(logp_new, logp_old, advantages, clip_range, kl, kl_weight)
    return loss * weight, stats


SUMS = ("entries", "policy_loss", "approx_kl", "clip_fraction", "kl_ref")  # the update's running sums


def policy_update(cfg: DDPOConfig, policy: Policy, params, optimizer, accelerator, dataset, rollouts, slots,
                  advantages: torch.Tensor, iteration: int) -> dict:
    """PPO epochs over the iteration's judged samples. Minibatches are drawn from the *global* slot
    order, each process trains on the members it sampled, gradients are summed across processes."""
    d, world, rank = cfg.ddpo, accelerator.num_processes, accelerator.process_index
    traj, seed = rollouts.trajectory, cfg.run.seed
    row = {s.index: i for i, s in enumerate(rollouts.slots)}
    steps = {s.index: train_step_indices(1, traj.stochastic_steps, cfg.rollout.train_fraction,
                                         keyed_generator(DRAWS, seed, "steps", iteration, s.index))[0] for s in slots}
    judged = ~torch.isnan(advantages)
    transformer, device = policy.transformer, policy.device
    sums = torch.zeros(len(SUMS), dtype=torch.float64)  # entry-weighted, so their ratio to "entries" is a mean
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
                fn, _ = policy.model_fn(dataset, chunk, traj.guidance[rows])
                adv = advantages[[s.index for s in chunk]].to(device)
                for j in range(len(steps[chunk[0].index])):
                    step = torch.stack([steps[s.index][j] for s in chunk])
                    x_t, x_next, sigma, sigma_next, old = (t.to(device) for t in traj.transition(step, rows))
                    with policy.precision():
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
                    sums += torch.tensor([1.0] + [st.get(name, 0.0) for name in SUMS[1:]],
                                         dtype=torch.float64) * len(chunk)
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
    total = dict(zip(SUMS, accelerator.reduce(sums, "sum").tolist()))
    n = max(total.pop("entries"), 1.0)
    if d.kl_weight <= 0:
        total.pop("kl_ref")
    out = {name: value / n for name, value in total.items()}
    out.update(onpolicy_ratio_error=float(accelerator.reduce(torch.tensor([first_error]), "max")),
               optimizer_steps=len(grad_norms), grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else None)
    return out
