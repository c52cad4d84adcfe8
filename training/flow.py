"""Flow-matching training objective for Kontext with dual_rope references.

``x_s = (1 - s) x0 + s noise``, the model predicts ``v = noise - x0`` for the *target* tokens only
(references ride along as context, DESIGN data flow), loss = mean squared error per sample.

Sigmas and noise are drawn from a generator keyed by ``(seed, step, slot)`` where ``slot`` is the
sample's place in the global batch. So the draws do not depend on how the batch is split across
processes or on where a run was resumed: one process and two give the same training, and a resumed
run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from dual_rope.diffusers_adapter import dual_reference_forward, prepare_references

from .seeds import keyed_generator


def slot_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The noise and sigma draw of one training slot (step -1: the validation loss's fixed draws)."""
    return keyed_generator("dualref-flow", seed, step, slot)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3/FLUX time shift ``s*t / (1 + (s-1)*t)``; 1 leaves sigmas unchanged."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def draw_sigmas_and_noise(latent_shape, seed: int, step: int, slots: Sequence[int], sampling: str = "logit_normal",
                          mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
    """Per-sample sigma (B,) in (0, 1) and noise (B, C, h, w) for the given global-batch ``slots``."""
    sigmas, noises = [], []
    for slot in slots:
        g = slot_generator(seed, step, slot)
        if sampling == "logit_normal":
            u = torch.sigmoid(mean + std * torch.randn((), generator=g))
        elif sampling == "uniform":
            u = torch.rand((), generator=g)
        else:
            raise ValueError(f"unknown sigma sampling {sampling!r}; use logit_normal or uniform")
        sigmas.append(u)
        noises.append(torch.randn(tuple(latent_shape), generator=g))
    return shift_sigmas(torch.stack(sigmas), shift), torch.stack(noises)


def gate_bias(text_tokens: int, target_tokens: int, reference_tokens: Sequence[int], log_gates: torch.Tensor):
    """Differentiable DESIGN-contract-3 bias: ``log g_k`` on reference k's keys, 0 elsewhere; (1, 1, 1, L)."""
    parts = [log_gates.new_zeros(text_tokens + target_tokens)]
    parts += [log_gates[k].expand(n) for k, n in enumerate(reference_tokens)]
    return torch.cat(parts).view(1, 1, 1, -1)


class FlowMatchingModel(nn.Module):
    """The transformer (+ optional learnable per-reference gates); ``forward`` returns per-sample losses.

    One module so DDP/FSDP see every trainable weight, gates included.
    """

    def __init__(self, transformer, layout: str = "diagonal", guidance: float | None = 1.0,
                 learn_gates: bool = False, references: int = 2, autocast: torch.dtype | None = None):
        super().__init__()
        self.transformer, self.layout, self.guidance = transformer, layout, guidance
        self.autocast = autocast  # e.g. torch.bfloat16: mixed precision for training and validation alike
        self.log_gates = nn.Parameter(torch.zeros(references)) if learn_gates else None

    def gates(self) -> list[float] | None:
        return None if self.log_gates is None else [float(g) for g in self.log_gates.detach().exp()]

    def velocity(self, latents, refs, prompt_embeds, pooled, sigma) -> torch.Tensor:
        batch = latents.shape[0]
        sequence = prepare_references(tuple(latents.shape[-2:]), refs, self.layout)
        kwargs = None
        if self.log_gates is not None:
            n_target = math.prod(-(-s // 2) for s in latents.shape[-2:])
            bias = gate_bias(prompt_embeds.shape[1], n_target, sequence.reference_token_counts,
                             self.log_gates[: len(refs)])
            kwargs = {"attention_mask": bias.to(latents.dtype)}
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), float(self.guidance), device=latents.device)
        with torch.autocast(latents.device.type, self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            return dual_reference_forward(self.transformer, latents, sequence, prompt_embeds, pooled,
                                          sigma.to(latents.dtype), guidance, joint_attention_kwargs=kwargs)

    def forward(self, target, refs, prompt_embeds, pooled, sigma, noise, weights=None) -> torch.Tensor:
        """Per-sample loss: the mean squared velocity error, or its ``weights``-weighted mean
        (``weights``: (B, 1, H, W) per latent pixel, e.g. :func:`edit_weights`)."""
        s = sigma.view(-1, 1, 1, 1).to(target.dtype)
        noisy = (1 - s) * target + s * noise
        prediction = self.velocity(noisy, refs, prompt_embeds, pooled, sigma)
        error = (prediction.float() - (noise - target).float()).pow(2)
        if weights is None:
            return error.mean(dim=(1, 2, 3))
        error, weights = error.mean(dim=1, keepdim=True), weights.to(error)
        return (error * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))


def edit_weights(target: torch.Tensor, reference: torch.Tensor, weight: float, threshold: float) -> torch.Tensor | None:
    """Loss weights (B, 1, H, W) that count the tokens an edit changes ``1 + weight`` times.

    A token (a 2x2 latent patch, what the transformer sees) is *changed* where any latent channel
    differs from reference 1 at the same place by more than ``threshold`` (normalised latent units).
    Most of an edit's target is a copy of reference 1, so a plain mean lets the copy dominate the
    loss long after it is learned; weighting the changed tokens makes the model learn the edit
    itself sooner (toy base, 800 steps: single_edit fidelity 0.094 at weight 1, 0.141 at 3, but the
    copy suffers at 3; docs/toy_tables.md). Returns None (plain mean)
    when reference 1's latent has another shape than the target's, where no token lines up.
    """
    if weight <= 0 or reference.shape != target.shape:
        return None
    diff = (target.float() - reference.float()).abs().amax(dim=1, keepdim=True)
    changed = torch.nn.functional.max_pool2d(diff, 2, ceil_mode=True) > threshold  # per token
    changed = changed.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[..., :target.shape[2], :target.shape[3]]
    return 1.0 + weight * changed.float()
