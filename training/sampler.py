"""Sampling Kontext-style flow models: deterministic Euler (evaluation) and SDE rollouts with log-probs (DDPO).

Everything works on a ``model_fn(latents, sigma) -> velocity``: float32 latents (B, C, H, W) and a
per-sample sigma (B,). :func:`flux_model_fn` builds one from a diffusers ``FluxTransformer2DModel``
with dual_rope references; tests use analytic ones.

The stochastic step is Flow-GRPO's SDE, whose marginals equal the ODE's: with ``dt = sigma' - sigma``
(< 0) and noise level ``a``,

    std_t = a * sqrt(sigma / (1 - sigma))        (at sigma = 1 the denominator uses sigma')
    mean  = x * (1 + std_t^2 / (2 sigma) * dt) + v * (1 + std_t^2 (1 - sigma) / (2 sigma)) * dt
    x'    = mean + std_t * sqrt(-dt) * eps

and the step's log-prob is the Gaussian log-density of the stored ``x'``, always in float32 (bf16
overflows here). It is averaged over the non-batch dims by default, as ddpo-pytorch and Flow-GRPO
do: the averaged value, and so the PPO ratio ``exp(logp_new - logp_old)`` and its clip range, do not
depend on the image size; the sum (``reduction="sum"``) is the exact density, D times larger.

Only the first (noisiest) steps are stochastic; the rest, and always the final step to sigma 0,
are plain Euler steps, because the model can remove early noise but not late noise, and low-noise
log-probs are inaccurate (Flow-GRPO's advice, yifan123/flow_grpo issues #62 and #141).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from dual_rope.diffusers_adapter import ReferenceSequence, dual_reference_forward
from dual_rope.packing import token_grid

from .schedule import sigma_schedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REDUCTIONS = ("mean", "sum")


@dataclass
class SamplerConfig:
    """Rollout and evaluation settings (plain values, so a run can save them as JSON)."""

    num_steps: int = 12
    noise_level: float = 0.5  # Flow-GRPO's a; 0 makes every step deterministic
    sde_fraction: float = 0.5  # share of the steps, noisiest first, that are stochastic
    train_fraction: float = 1.0  # share of a sample's stochastic steps it trains on
    shift: float | None = None  # None: FLUX's resolution-dependent shift; a number: plain shift
    guidance: tuple[float, float] = (2.5, 2.5)  # per-sample guidance drawn uniformly in [low, high]
    logprob_reduction: str = "mean"

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not self.noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        for name in ("sde_fraction", "train_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.guidance = tuple(float(g) for g in self.guidance)
        if len(self.guidance) != 2 or self.guidance[0] > self.guidance[1]:
            raise ValueError(f"guidance must be (low, high) with low <= high, got {self.guidance}")
        if self.logprob_reduction not in REDUCTIONS:
            raise ValueError(f"logprob_reduction must be one of {REDUCTIONS}, got {self.logprob_reduction!r}")

    @property
    def stochastic_steps(self) -> int:
        """How many leading steps are SDE steps (never the last one, whose noise would stay in the image)."""
        if self.noise_level == 0:
            return 0
        return min(self.num_steps - 1, math.ceil(self.sde_fraction * self.num_steps - 1e-9))

    def sigmas(self, image_seq_len: int, device=None) -> torch.Tensor:
        return sigma_schedule(self.num_steps, image_seq_len, self.shift, device=device)


class TransitionScore(NamedTuple):
    logprob: torch.Tensor  # (B,) float32
    mean: torch.Tensor  # (B, C, H, W) float32, the step's Gaussian mean (for a KL to a reference)
    std: torch.Tensor  # (B,) float32, the step's Gaussian std, std_t * sqrt(-dt)


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as float32 (B, 1, 1, ...) to broadcast against ``like``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1)
    return value.expand(like.shape[0]).reshape(-1, *([1] * (like.dim() - 1)))


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's ``std_t = a*sqrt(sigma/(1-sigma))``; at sigma = 1 the denominator uses sigma'."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    below_one = torch.where(sigma >= 1, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / (1 - below_one))


def sde_mean(x, velocity, sigma, sigma_next, noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (float32, like ``x``) and std (B,) of the Gaussian SDE transition from ``x`` at ``sigma``."""
    x, velocity = x.float(), velocity.float()
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    std_t = sde_std(s, s_next, noise_level)
    dt = s_next - s
    mean = x * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, (std_t * torch.sqrt(-dt)).reshape(-1)


def sde_step(x, velocity, sigma, sigma_next, noise_level: float, noise: torch.Tensor):
    """One stochastic step: ``(x_next, mean, std)`` with ``x_next = mean + std * noise``."""
    mean, std = sde_mean(x, velocity, sigma, sigma_next, noise_level)
    return mean + _per_sample(std, mean) * noise.float(), mean, std


def euler_step(x, velocity, sigma, sigma_next) -> torch.Tensor:
    """Deterministic Euler step in float32, as FlowMatchEulerDiscreteScheduler.step."""
    x = x.float()
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * velocity.float()


def gaussian_logprob(x, mean, std, reduction: str = "mean") -> torch.Tensor:
    """Per-sample log N(x; mean, std^2) in float32, averaged (or summed) over the non-batch dims."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    x, mean = x.float(), mean.float()
    std = _per_sample(std, x)
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    dims = tuple(range(1, logp.dim()))
    return logp.mean(dims) if reduction == "mean" else logp.sum(dims)


def logprob_of_transition(
    model_fn: ModelFn, x_t, x_next, sigma, sigma_next, noise_level: float, reduction: str = "mean"
) -> TransitionScore:
    """Re-score a stored transition ``x_t -> x_next`` under ``model_fn`` (gradients flow if enabled)."""
    x_t = x_t.float()
    velocity = model_fn(x_t, _per_sample(sigma, x_t).reshape(-1))
    mean, std = sde_mean(x_t, velocity, sigma, sigma_next, noise_level)
    return TransitionScore(gaussian_logprob(x_next, mean, std, reduction), mean, std)


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _draw(shape, generators, device) -> torch.Tensor:
    """One standard-normal draw per sample from its own generator (independent of batch composition)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def initial_noise(latent_shape, seeds: Sequence[int], device=None) -> torch.Tensor:
    """The starting latents (B, C, H, W) for ``seeds``; the same as rollouts and ODE samples start from."""
    return _draw(tuple(latent_shape), _generators(seeds), device)


def image_seq_len(latent_shape) -> int:
    rows, cols = token_grid(tuple(latent_shape[-2:]))
    return rows * cols


@dataclass
class Trajectory:
    """A batch of rollouts; every field has the samples first, so batches can be concatenated."""

    latents: torch.Tensor  # (B, S+1, C, H, W) float32: x at each sigma, final latent last
    log_probs: torch.Tensor  # (B, K) float32, log-probs of the K stochastic steps
    sigmas: torch.Tensor  # (B, S+1) float32; the model's timestep at step i is sigmas[:, i]
    guidance: torch.Tensor  # (B,) float32
    seeds: torch.Tensor  # (B,) int64
    noise_level: float
    reduction: str = "mean"

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    @property
    def stochastic_steps(self) -> int:
        return self.log_probs.shape[1]

    def transition(self, step: torch.Tensor, rows: torch.Tensor | None = None):
        """``(x_t, x_next, sigma, sigma_next, old_logprob)`` at a per-sample step index, for ``rows`` (default:
        every sample; ``step`` has one index per row)."""
        if rows is None:
            rows = torch.arange(self.latents.shape[0], device=step.device)
        return (self.latents[rows, step], self.latents[rows, step + 1],
                self.sigmas[rows, step], self.sigmas[rows, step + 1], self.log_probs[rows, step])

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        first = parts[0]
        if any(p.noise_level != first.noise_level or p.latents.shape[1:] != first.latents.shape[1:]
               or p.stochastic_steps != first.stochastic_steps for p in parts):
            raise ValueError("only trajectories with the same steps, noise level and latent shape concatenate")
        fields = ("latents", "log_probs", "sigmas", "guidance", "seeds")
        joined = {f: torch.cat([getattr(p, f) for p in parts]) for f in fields}
        return Trajectory(**joined, noise_level=first.noise_level, reduction=first.reduction)


@torch.no_grad()
def rollout(model_fn: ModelFn, latent_shape, seeds: Sequence[int], config: SamplerConfig,
            guidance: torch.Tensor | None = None, device=None) -> Trajectory:
    """Sample ``len(seeds)`` latents of ``latent_shape`` (C, H, W), keeping what DDPO re-scores.

    ``guidance`` is only recorded here (``model_fn`` already carries it); pass the values it was
    built with so the trainer can rebuild the same model_fn.
    """
    generators = _generators(seeds)
    x = _draw(tuple(latent_shape), generators, device)
    batch = x.shape[0]
    sigmas = config.sigmas(image_seq_len(latent_shape), device=x.device)
    states, log_probs = [x], []
    for i in range(config.num_steps):
        sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
        velocity = model_fn(x, sigma)
        if i < config.stochastic_steps:
            noise = _draw(tuple(latent_shape), generators, x.device)
            x, mean, std = sde_step(x, velocity, sigma, sigma_next, config.noise_level, noise)
            log_probs.append(gaussian_logprob(x, mean, std, config.logprob_reduction))
        else:
            x = euler_step(x, velocity, sigma, sigma_next)
        states.append(x)
    if guidance is None:
        guidance = torch.full((batch,), float("nan"))
    return Trajectory(
        latents=torch.stack(states, dim=1),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else x.new_zeros(batch, 0),
        sigmas=sigmas.expand(batch, -1).clone(),
        guidance=torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(batch).clone().to(x.device),
        seeds=torch.as_tensor([int(s) for s in seeds], dtype=torch.int64, device=x.device),
        noise_level=float(config.noise_level),
        reduction=config.logprob_reduction,
    )


@torch.no_grad()
def ode_sample(model_fn: ModelFn, latent_shape, seeds: Sequence[int], config: SamplerConfig,
               device=None) -> torch.Tensor:
    """Deterministic Euler sampling (evaluation): the final float32 latents (B, C, H, W)."""
    x = initial_noise(latent_shape, seeds, device)
    sigmas = config.sigmas(image_seq_len(latent_shape), device=x.device)
    for i in range(config.num_steps):
        sigma = sigmas[i].expand(x.shape[0])
        x = euler_step(x, model_fn(x, sigma), sigma, sigmas[i + 1])
    return x


def random_guidance(count: int, low: float, high: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample guidance scales drawn uniformly in [low, high] (paper 3.3: randomised rollouts)."""
    return low + (high - low) * torch.rand(count, generator=generator)


def train_step_indices(count: int, stochastic_steps: int, fraction: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(count, k) step indices each sample trains on: a random ``fraction`` (at least one) of its SDE steps."""
    if stochastic_steps < 1:
        raise ValueError("the rollouts have no stochastic step to train on: raise noise_level or sde_fraction")
    k = max(1, min(stochastic_steps, math.ceil(fraction * stochastic_steps - 1e-9)))
    return torch.stack([torch.randperm(stochastic_steps, generator=generator)[:k] for _ in range(count)])


def flux_model_fn(transformer, sequence: ReferenceSequence, encoder_hidden_states: torch.Tensor,
                  pooled_projections: torch.Tensor, guidance=None, txt_ids: torch.Tensor | None = None,
                  joint_attention_kwargs: dict | None = None) -> ModelFn:
    """A ``model_fn`` for a diffusers ``FluxTransformer2DModel`` with dual_rope references.

    ``guidance`` is a number or one value per sample; Kontext is guidance-distilled (the scale goes
    through an embedding, there is no second CFG pass), so a model with guidance embeddings needs it.
    """
    has_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
    if has_guidance and guidance is None:
        raise ValueError("this transformer embeds a guidance scale: pass guidance= (Kontext's default is 2.5)")
    if guidance is not None and not has_guidance:
        raise ValueError("guidance was given but the transformer has no guidance embedding (guidance_embeds=False)")

    def model_fn(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dtype, batch = transformer.dtype, latents.shape[0]
        # The pipeline's t/1000 with t = sigma*1000 in the latents' dtype, so results match it bit for bit.
        timestep = (sigma.reshape(-1).expand(batch) * 1000).to(dtype) / 1000
        scale = None
        if guidance is not None:
            scale = torch.as_tensor(guidance, dtype=torch.float32, device=latents.device).reshape(-1).expand(batch)
        velocity = dual_reference_forward(
            transformer, latents.to(dtype), sequence, encoder_hidden_states.to(dtype),
            pooled_projections.to(dtype), timestep, scale, txt_ids, joint_attention_kwargs)
        return velocity.float()

    return model_fn
