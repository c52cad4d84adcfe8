"""Flow-matching sigma schedules as FLUX.1 Kontext samples them.

Convention (diffusers'): ``x_sigma = (1 - sigma) * x_data + sigma * noise``, sigma runs from 1
(pure noise) down to 0 (data), the model predicts the velocity ``v = noise - x_data`` and is
called with ``timestep = sigma``. ``FluxKontextPipeline`` starts from ``linspace(1, 1/N, N)``,
applies FLUX's resolution-dependent time shift (``mu`` grows with the number of *target* image
tokens) and appends a terminal 0. A constant ("plain", SD3-style) shift is offered for toy models,
where shift 1 is the unshifted linear schedule.
"""
from __future__ import annotations

import math

import torch

# FLUX.1's scheduler_config.json (base/max image sequence length and shift).
BASE_SEQ_LEN = 256
MAX_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """FLUX's ``mu``: linear in the target's token count, ``base_shift`` at ``base_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def sigma_schedule(
    num_steps: int,
    image_seq_len: int | None = None,
    shift: float | None = None,
    *,
    base_seq_len: int = BASE_SEQ_LEN,
    max_seq_len: int = MAX_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``num_steps + 1`` float32 sigmas from 1 to 0.

    ``shift=None`` is Kontext's dynamic shift ``exp(mu) / (exp(mu) + 1/t - 1)`` with ``mu`` from
    ``image_seq_len`` (tokens of the target only, as the pipeline counts them); a number is the
    plain shift ``s*t / (1 + (s-1)*t)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # Same arithmetic as the pipeline + FlowMatchEulerDiscreteScheduler: float64 linspace, float32 shift.
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).to(torch.float32)
    if shift is None:
        if image_seq_len is None:
            raise ValueError("the dynamic (FLUX) shift needs image_seq_len, the target's token count; "
                             "or pass a plain shift such as shift=1.0")
        mu = resolution_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
        scale = torch.tensor(math.exp(mu), dtype=torch.float32)  # float32 operand: bit-exact with diffusers
        sigmas = scale / (scale + (1.0 / t - 1.0))
    else:
        if not shift > 0:
            raise ValueError(f"a plain shift must be > 0, got {shift}")
        sigmas = shift * t / (1.0 + (shift - 1.0) * t)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device) if device is not None else sigmas
