"""The policy DDPO samples and trains: the transformer (base + merged SFT LoRA + trainable DDPO
LoRA), how it reads the references (layout, gates), and where and in what precision it runs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dual_rope.diffusers_adapter import prepare_references

from ..cache import CachedDataset
from ..sampler import flux_model_fn


@dataclass
class Policy:
    transformer: torch.nn.Module
    layout: str  # dual_rope method, the SFT LoRA's
    gates: list[float] | None  # learned per-reference strengths of the SFT LoRA, if any
    device: torch.device
    autocast: torch.dtype | None = None  # bf16: frozen base in bf16, LoRA and log-probs in fp32

    def precision(self):
        """The context every forward pass of the policy runs in."""
        return torch.autocast(self.device.type, self.autocast or torch.bfloat16, enabled=self.autocast is not None)

    def model_fn(self, dataset: CachedDataset, slots, guidance: torch.Tensor | None = None):
        """``(model_fn, latent shape)`` for a batch of slots: their references, instruction and guidance."""
        batch = dataset.batch([s.prompt for s in slots])
        refs = [r.to(self.device) for r in batch.refs]
        shape = latent_shape(dataset, slots[0].prompt, refs[0].shape[1])
        sequence = prepare_references(shape[-2:], refs, self.layout, self.gates)
        if guidance is None:
            guidance = torch.tensor([s.guidance for s in slots], dtype=torch.float32)
        scale = guidance.to(self.device) if self.transformer.config.guidance_embeds else None
        fn = flux_model_fn(self.transformer, sequence, batch.prompt_embeds.to(self.device),
                           batch.pooled.to(self.device), guidance=scale)
        return fn, shape


def latent_shape(dataset: CachedDataset, prompt: int, channels: int) -> tuple[int, int, int]:
    """The output latent's (C, h, w): the target's size, else reference 1's (as Kontext outputs)."""
    shapes = dataset.entries[prompt].shapes
    h, w = shapes[0] if shapes[0] is not None else shapes[1]
    return channels, h, w
