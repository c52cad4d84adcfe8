"""DDPO arithmetic: advantages (moving-average baseline, per-prompt normalisation), the PPO-style
clipped loss and its diagnostics. Pure torch/Python, no model code.

Rewards reaching these functions are judged ones: an unjudged sample (DESIGN contract 6) must be
dropped before, never passed as 0 or NaN, so non-finite rewards are refused here.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable, Sequence

import torch


def _checked_rewards(rewards) -> torch.Tensor:
    rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if rewards.numel() == 0:
        raise ValueError("no rewards: an iteration needs at least one judged sample")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite: drop unjudged samples (failed judgements) before computing "
                         "advantages; never score them 0")
    return rewards


class RewardBaseline:
    """The paper's moving-average baseline ``b``; advantages are ``A = r - b``.

    ``b`` is an exponential moving average of batch-mean rewards. An iteration's advantages use the
    baseline from *earlier* iterations (so ``b`` does not depend on the rewards it scores); the
    very first batch, with no history, is scored against its own mean. Give :meth:`advantages` the
    rewards gathered from all processes (e.g. ``accelerator.gather``): the update is plain float
    arithmetic on the same numbers, so every process keeps the same state. The state is a few
    plain numbers, saved with :meth:`state_dict`.
    """

    def __init__(self, decay: float = 0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"baseline decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value: float | None = None
        self.updates = 0

    def advantages(self, rewards, all_rewards=None) -> torch.Tensor:
        """``r - b`` (float32) for ``rewards``, then fold the batch mean into ``b``.

        With several processes pass this process's ``rewards`` and everyone's as ``all_rewards``:
        the baseline and its update then come from the whole batch, identically everywhere.
        """
        rewards = _checked_rewards(rewards)
        batch_mean = (rewards if all_rewards is None else _checked_rewards(all_rewards)).mean().item()
        baseline = batch_mean if self.value is None else self.value
        self.update_mean(batch_mean)
        return (rewards - baseline).float()

    def update_mean(self, batch_mean: float) -> None:
        self.value = batch_mean if self.value is None else self.decay * self.value + (1 - self.decay) * batch_mean
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self.value, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.value = None if state["value"] is None else float(state["value"])


class PerPromptStatTracker:
    """Group normalisation ``(r - mean) / (std + eps)`` per prompt, as ddpo-pytorch's tracker.

    Each prompt keeps its last ``buffer_size`` rewards; until it has ``min_count`` of them, the
    whole batch's mean/std are used instead. Standard deviations are population ones (ddof 0).
    ``global_std`` (Flow-GRPO's option) keeps each prompt's mean but divides by the whole batch's std:
    a small group whose rollouts score almost alike then gives advantages near 0 instead of having
    its noise blown up to +-1 by its own tiny std.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6, global_std: bool = False):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.global_std = bool(global_std)
        self.buffers: dict[str, deque] = {}

    def advantages(self, prompts: Sequence[Hashable], rewards) -> torch.Tensor:
        rewards = _checked_rewards(rewards)
        if len(prompts) != rewards.numel():
            raise ValueError(f"{len(prompts)} prompts for {rewards.numel()} rewards")
        keys = [str(p) for p in prompts]
        out = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for key in dict.fromkeys(keys):
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key])
            buffer = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False)
            if self.global_std:
                std = batch_std
            out[rows] = (rewards[rows] - mean) / (std + self.eps)
        return out.float()

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "eps": self.eps,
                "global_std": self.global_std, "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count, self.eps = int(state["buffer_size"]), int(state["min_count"]), state["eps"]
        self.global_std = bool(state.get("global_std", False))  # checkpoints from before the option
        self.buffers = {k: deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def clip_advantages(advantages: torch.Tensor, max_abs: float | None) -> torch.Tensor:
    """Clamp advantages to ``[-max_abs, max_abs]`` (Flow-GRPO uses 5); None leaves them as they are."""
    return advantages if max_abs is None else advantages.clamp(-max_abs, max_abs)


def tied_groups(groups: Sequence[Hashable], rewards: torch.Tensor) -> torch.Tensor:
    """For each entry, whether its group's rewards (this iteration's) are all equal: such a group says
    nothing about which rollout was better, so ``ddpo.drop_tied_groups`` leaves it out of the update
    (Flow-GRPO drops zero-advantage samples the same way) instead of letting it dilute the mean."""
    values: dict[str, list[float]] = {}
    keys = [str(g) for g in groups]
    for key, reward in zip(keys, torch.as_tensor(rewards).reshape(-1).tolist()):
        values.setdefault(key, []).append(reward)
    tied = {key for key, v in values.items() if max(v) == min(v)}
    return torch.tensor([key in tied for key in keys], dtype=torch.bool)


def zero_advantage_group_share(groups: Sequence[Hashable], advantages: torch.Tensor, atol: float = 1e-6) -> float:
    """Share of groups (e.g. prompts) whose every advantage is ~0, i.e. that give no gradient.

    With per-prompt normalisation these are the groups whose rewards were all equal.
    """
    flat = torch.as_tensor(advantages).reshape(-1).abs() <= atol
    keys = [str(g) for g in groups]
    if len(keys) != flat.numel() or not keys:
        raise ValueError(f"{len(keys)} group keys for {flat.numel()} advantages")
    distinct = list(dict.fromkeys(keys))
    zero = sum(all(flat[i] for i, k in enumerate(keys) if k == key) for key in distinct)
    return zero / len(distinct)


def ppo_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    return torch.exp(logp_new.float() - logp_old.float())


def clipped_policy_loss(logp_new, logp_old, advantages, clip_range: float) -> torch.Tensor:
    """DDPO/PPO surrogate ``mean(max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps)))`` over all entries."""
    ratio = ppo_ratio(logp_new, logp_old)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def approx_kl(logp_new, logp_old) -> torch.Tensor:
    """``0.5 * mean((logp_new - logp_old)^2)``, the usual cheap estimate of the policy's drift."""
    return 0.5 * ((logp_new.float() - logp_old.float()) ** 2).mean()


def clip_fraction(logp_new, logp_old, clip_range: float) -> torch.Tensor:
    """Share of entries whose ratio lies outside ``[1-eps, 1+eps]``."""
    return ((ppo_ratio(logp_new, logp_old) - 1).abs() > clip_range).float().mean()


def gaussian_kl(mean, mean_ref, std) -> torch.Tensor:
    """Per-sample KL between two same-std Gaussian steps, averaged over the non-batch dims.

    ``mean_ref`` comes from the reference policy (the adapter disabled) at the same ``x_t``, ``std``
    is the step's std (B,); this is the term Flow-GRPO adds with weight ``beta``.
    """
    sq = (mean.float() - mean_ref.float()) ** 2
    per_sample = sq.mean(dim=tuple(range(1, sq.dim())))
    return per_sample / (2 * std.float().reshape(-1) ** 2)


def ddpo_loss(logp_new, logp_old, advantages, clip_range: float, kl: torch.Tensor | None = None,
              kl_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to backpropagate for one batch of transitions, and its diagnostics."""
    policy = clipped_policy_loss(logp_new, logp_old, advantages, clip_range)
    loss = policy
    stats = {
        "policy_loss": policy.item(),
        "approx_kl": approx_kl(logp_new.detach(), logp_old).item(),
        "clip_fraction": clip_fraction(logp_new.detach(), logp_old, clip_range).item(),
    }
    if kl is not None:
        kl_mean = kl.mean()
        loss = loss + kl_weight * kl_mean
        stats["kl_ref"] = kl_mean.item()
    stats["loss"] = loss.item()
    return loss, stats
