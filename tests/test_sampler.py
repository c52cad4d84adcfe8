"""Sampler: Kontext's schedule, Euler ODE, Flow-GRPO SDE steps with log-probs, on-policy re-scoring."""
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from dual_rope.diffusers_adapter import prepare_references
from training.sampler import (
    SamplerConfig,
    Trajectory,
    euler_step,
    flux_model_fn,
    gaussian_logprob,
    initial_noise,
    logprob_of_transition,
    ode_sample,
    rollout,
    sde_mean,
    sde_step,
    train_step_indices,
)
from training.schedule import resolution_shift, sigma_schedule

LATENT = (4, 8, 8)  # (C, H, W): 16 target tokens


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).eval()


def dual_reference_fn(transformer, batch, guidance, seed=1):
    """A model_fn with two references of different shapes and a random 'text' embedding."""
    g = torch.Generator().manual_seed(seed)
    refs = [torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 6, 10, generator=g)]
    sequence = prepare_references(LATENT[1:], refs)
    text = torch.randn(batch, 5, 32, generator=g)
    pooled = torch.randn(batch, 16, generator=g)
    return flux_model_fn(transformer, sequence, text, pooled, guidance=guidance)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


def test_schedule_is_the_kontext_pipelines_bit_for_bit():
    flux_scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    for steps, tokens in [(8, 64), (12, 64), (28, 4096), (6, 1024)]:
        flux_scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=resolution_shift(tokens))
        assert torch.equal(sigma_schedule(steps, tokens), flux_scheduler.sigmas)
    plain = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain.set_timesteps(8, sigmas=np.linspace(1.0, 1 / 8, 8))
    assert torch.equal(sigma_schedule(8, shift=3.0), plain.sigmas)
    linear = sigma_schedule(4, shift=1.0)
    assert torch.equal(linear, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="image_seq_len"):
        sigma_schedule(8)


def test_ode_is_the_schedulers_euler_loop_and_deterministic(flux):
    fn = dual_reference_fn(flux, 2, guidance=2.5)
    config = SamplerConfig(num_steps=5, noise_level=0.0)
    ours = ode_sample(fn, LATENT, [3, 4], config)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler.set_timesteps(5, sigmas=np.linspace(1.0, 1 / 5, 5), mu=resolution_shift(16))
    x = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(fn(x, (t / 1000).expand(2)), t, x).prev_sample
    assert torch.equal(ours, x)
    assert torch.equal(ours, ode_sample(fn, LATENT, [3, 4], config))
    assert not torch.equal(ours, ode_sample(fn, LATENT, [3, 5], config))
    # A sample's noise depends on its own seed only, not on what else is in the batch.
    assert torch.equal(initial_noise(LATENT, [4])[0], initial_noise(LATENT, [3, 4])[1])


def test_sde_step_by_hand():
    x, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    # sigma 0.5 -> 0.25, a = 0.5: std_t = 0.5*sqrt(0.5/0.5) = 0.5, dt = -0.25,
    # mean = 1*(1 + 0.25/1*(-0.25)) + 2*(1 + 0.25*0.5/1)*(-0.25) = 0.9375 - 0.5625 = 0.375, std = 0.5*sqrt(0.25)
    mean, std = sde_mean(x, v, torch.tensor([0.5]), torch.tensor([0.25]), 0.5)
    assert mean.item() == pytest.approx(0.375) and std.item() == pytest.approx(0.25)
    # At sigma = 1 the denominator uses sigma' = 0.75: std_t = 0.5*sqrt(1/0.25) = 1, std = 1*sqrt(0.25).
    # mean = 1*(1 + 1/2*(-0.25)) + 2*(1 + 0)*(-0.25) = 0.875 - 0.5
    mean, std = sde_mean(x, v, torch.tensor([1.0]), torch.tensor([0.75]), 0.5)
    assert mean.item() == pytest.approx(0.375) and std.item() == pytest.approx(0.5)
    x_next, _, _ = sde_step(x, v, torch.tensor([1.0]), torch.tensor([0.75]), 0.5, torch.full_like(x, -2.0))
    assert x_next.item() == pytest.approx(0.375 - 1.0)


def test_logprob_is_torch_normal_in_float32():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.1, 0.5, 2.0])
    expected = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(x)
    assert torch.allclose(gaussian_logprob(x, mean, std), expected.mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(gaussian_logprob(x, mean, std, "sum"), expected.sum(dim=(1, 2, 3)), atol=1e-4)
    half = gaussian_logprob(x.bfloat16(), mean.bfloat16(), std)
    assert half.dtype == torch.float32
    # Hand case: N(1; 0, 2^2) = -1/8 - log 2 - log(2 pi)/2.
    one = gaussian_logprob(torch.ones(1, 1), torch.zeros(1, 1), torch.tensor([2.0]))
    assert one.item() == pytest.approx(-0.125 - math.log(2) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_noise_level_zero_sde_is_the_ode(flux):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, *LATENT, generator=g), torch.randn(4, *LATENT, generator=g)
    sigmas = sigma_schedule(6, 16)
    for i in range(6):
        s, s_next = sigmas[i].expand(4), sigmas[i + 1].expand(4)
        x_next, _, _ = sde_step(x, v, s, s_next, 0.0, torch.randn(4, *LATENT, generator=g))
        assert torch.equal(x_next, euler_step(x, v, s, s_next))
    fn = dual_reference_fn(flux, 2, guidance=3.0)
    deterministic = rollout(fn, LATENT, [7, 8], SamplerConfig(num_steps=6, noise_level=0.0, sde_fraction=1.0))
    assert deterministic.stochastic_steps == 0
    assert torch.equal(deterministic.final, ode_sample(fn, LATENT, [7, 8], SamplerConfig(num_steps=6)))
    noisy = rollout(fn, LATENT, [7, 8], SamplerConfig(num_steps=6, noise_level=0.5, sde_fraction=0.5))
    assert noisy.stochastic_steps == 3 and torch.equal(noisy.latents[:, 0], deterministic.latents[:, 0])
    assert not torch.allclose(noisy.final, deterministic.final, atol=1e-3)


def test_on_policy_rescoring_gives_ratio_one(flux):
    batch, config = 3, SamplerConfig(num_steps=6, noise_level=0.7, sde_fraction=1.0)
    guidance = torch.tensor([1.5, 2.5, 4.0])
    fn = dual_reference_fn(flux, batch, guidance)
    traj = rollout(fn, LATENT, [11, 12, 13], config, guidance=guidance)
    assert traj.stochastic_steps == 5 and torch.isfinite(traj.log_probs).all()
    assert torch.equal(traj.guidance, guidance) and traj.latents.shape == (batch, 7, *LATENT)
    with torch.no_grad():
        for i in range(traj.stochastic_steps):  # the whole batch at one step, as in the rollout
            x_t, x_next, s, s_next, old = traj.transition(torch.full((batch,), i))
            new = logprob_of_transition(fn, x_t, x_next, s, s_next, traj.noise_level).logprob
            assert (torch.exp(new - old) - 1).abs().max().item() <= 1e-6
    # As DDPO trains: each sample at its own random step (sigmas differ within the batch), with grads.
    steps = train_step_indices(batch, traj.stochastic_steps, 1.0, torch.Generator().manual_seed(0))
    for column in steps.T:
        x_t, x_next, s, s_next, old = traj.transition(column)
        new = logprob_of_transition(fn, x_t, x_next, s, s_next, traj.noise_level).logprob
        assert (torch.exp(new - old) - 1).abs().max().item() <= 1e-6
        new.sum().backward()
    assert flux.proj_out.weight.grad.abs().sum() > 0
    flux.zero_grad(set_to_none=True)
    # The check can fail: a slightly different policy moves the ratio well beyond 1e-6.
    other = dual_reference_fn(tiny_flux(seed=5), batch, guidance)
    x_t, x_next, s, s_next, old = traj.transition(torch.zeros(batch, dtype=torch.long))
    with torch.no_grad():
        moved = logprob_of_transition(other, x_t, x_next, s, s_next, traj.noise_level).logprob
    assert (torch.exp(moved - old) - 1).abs().max().item() > 1e-4


def gaussian_data_velocity(mu, s):
    """Exact velocity E[noise - x0 | x_sigma] when x0 ~ N(mu, s^2) per dimension."""
    def model_fn(x, sigma):
        sig = sigma.view(-1, 1, 1, 1)
        var = (1 - sig) ** 2 * s**2 + sig**2
        centred = x - (1 - sig) * mu
        return (sig - (1 - sig) * s**2) / var * centred - mu
    return model_fn


def test_sde_keeps_the_data_marginal_of_a_gaussian():
    mu, s, seeds = 0.7, 0.4, range(4)
    fn, shape = gaussian_data_velocity(mu, s), (1, 64, 64)  # 16k draws
    config = SamplerConfig(num_steps=100, noise_level=0.7, sde_fraction=1.0, shift=1.0)
    traj = rollout(fn, shape, seeds, config)
    for i in (25, 50, 99):  # every marginal is N((1-sigma) mu, (1-sigma)^2 s^2 + sigma^2)
        sigma, x = traj.sigmas[0, i].item(), traj.latents[:, i]
        assert x.mean().item() == pytest.approx((1 - sigma) * mu, abs=0.03)
        assert x.std().item() == pytest.approx(math.sqrt((1 - sigma) ** 2 * s**2 + sigma**2), rel=0.05)
    assert traj.final.mean().item() == pytest.approx(mu, abs=0.02)
    assert traj.final.std().item() == pytest.approx(s, rel=0.05)
    # Guard that this check bites: noise added without the SDE's drift correction inflates the spread.
    x = traj.latents[:, 0]
    for i in range(99):
        a, b = traj.sigmas[:, i], traj.sigmas[:, i + 1]
        _, std = sde_mean(x, fn(x, a), a, b, 0.7)
        x = euler_step(x, fn(x, a), a, b) + std.view(-1, 1, 1, 1) * torch.randn_like(x)
    assert x.std().item() > 1.5 * s


def test_sde_samples_land_on_point_masses():
    atoms = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(3))

    def model_fn(x, sigma):  # exact velocity (x - E[x0 | x]) / sigma for a uniform mixture of atoms
        sig = sigma.view(-1, 1, 1, 1)
        dist = ((x[:, None] - (1 - sig[:, None]) * atoms[None]) ** 2).flatten(2).sum(-1)
        weights = torch.softmax(-dist / (2 * sig.view(-1, 1) ** 2), dim=1)
        return (x - torch.einsum("bk,kchw->bchw", weights, atoms)) / sig

    config = SamplerConfig(num_steps=24, noise_level=0.7, sde_fraction=0.5)
    final = rollout(model_fn, (2, 8, 8), range(32), config).final
    nearest = (final[:, None] - atoms[None]).flatten(2).norm(dim=-1).min(dim=1)
    assert nearest.values.max().item() < 1e-3 * atoms[0].norm().item()
    assert len(set(nearest.indices.tolist())) > 1  # the noise explores several modes


def test_config_and_step_selection():
    assert SamplerConfig(num_steps=8, sde_fraction=1.0).stochastic_steps == 7  # never the last step
    assert SamplerConfig(num_steps=10, sde_fraction=0.3).stochastic_steps == 3
    assert SamplerConfig(num_steps=8, noise_level=0.0).stochastic_steps == 0
    for bad in (dict(noise_level=-1), dict(sde_fraction=1.5), dict(guidance=(3, 2)), dict(logprob_reduction="max")):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            SamplerConfig(**bad)
    steps = train_step_indices(5, 6, 0.5, torch.Generator().manual_seed(0))
    assert steps.shape == (5, 3) and steps.max() < 6
    assert all(len(set(row.tolist())) == 3 for row in steps)
    assert train_step_indices(2, 6, 0.0).shape == (2, 1)
    with pytest.raises(ValueError, match="noise_level"):
        train_step_indices(2, 0, 1.0)


def test_trajectories_concatenate_and_guidance_is_checked(flux):
    config = SamplerConfig(num_steps=3, noise_level=0.5, sde_fraction=0.5)
    fn = dual_reference_fn(flux, 1, guidance=2.0)
    a = rollout(fn, LATENT, [1], config, guidance=2.0)
    b = rollout(fn, LATENT, [2], config, guidance=2.0)
    both = Trajectory.cat([a, b])
    assert both.latents.shape[0] == 2 and both.seeds.tolist() == [1, 2]
    assert torch.equal(both.log_probs[1], b.log_probs[0])
    with pytest.raises(ValueError, match="same steps"):
        Trajectory.cat([a, rollout(fn, LATENT, [3], SamplerConfig(num_steps=4, noise_level=0.5))])
    sequence = prepare_references(LATENT[1:], [torch.randn(1, *LATENT)])
    with pytest.raises(ValueError, match="guidance"):
        flux_model_fn(flux, sequence, torch.randn(1, 5, 32), torch.randn(1, 16))
