"""Memory savers for one GPU: a frozen base quantised to int8 or fp8 (torchao, weight-only) under a LoRA.

torchao's quantised ``nn.Linear`` dequantises its weight for every matmul, and autograd then keeps that
bf16 copy for the input gradient: without gradient checkpointing every LoRA'd layer's weight would sit in
memory twice until backward (measured: tests/test_memory_savers.py). :class:`FrozenQuantLinear` computes
the same linear through a function that keeps only the quantised weight and dequantises it again in
backward, so the saved activations are exactly those of a bf16 base (training.memory's formula).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import BASE_QUANT, ConfigError


class _DequantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight, ctx.x_dtype = weight, x.dtype  # the quantised weight: resident anyway
        return F.linear(x, weight.dequantize(), bias)

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight.dequantize()
        return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None, None


class FrozenQuantLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose frozen weight is a torchao quantised tensor (see the module docstring)."""

    def forward(self, x):
        return _DequantLinear.apply(x, self.weight, self.bias)


def quantize_base(transformer: torch.nn.Module, kind: str) -> int:
    """Quantise every frozen ``nn.Linear`` weight of ``transformer`` (the LoRA's own layers stay as they
    are) to ``kind`` (int8 | fp8), per output row; returns the number of layers quantised."""
    if kind not in BASE_QUANT[1:]:
        raise ConfigError(f"train.base_quant={kind!r} is not allowed; use one of {', '.join(BASE_QUANT)}")
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    device = next(transformer.parameters()).device
    if kind == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"train.base_quant=fp8 needs an fp8-capable GPU (compute capability 8.9+: Ada, "
                          f"Hopper); {torch.cuda.get_device_name(device)} is not: use train.base_quant=int8")

    def frozen(module, fqn):
        return type(module) is torch.nn.Linear and "lora_" not in fqn and not module.weight.requires_grad

    layers = [m for n, m in transformer.named_modules() if frozen(m, n)]
    quantize_(transformer, Float8WeightOnlyConfig() if kind == "fp8" else Int8WeightOnlyConfig(), filter_fn=frozen)
    for module in layers:
        module.__class__ = FrozenQuantLinear
    return len(layers)
