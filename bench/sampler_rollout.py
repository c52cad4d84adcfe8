"""How costly and how far from the ODE sample are SDE rollouts? Informs the DDPO sampler defaults.

    python bench/sampler_rollout.py [--batch 8] [--repeats 2] [--train-steps 0] [--samples 64]

All on 64-token images (16-channel 16x16 latents) with the DESIGN's tiny Flux (1.9M params) and two
64-token references through dual_rope:
1. seconds per step: ODE step, SDE step with its log-prob, one re-scored step with backward;
2. for 8/12/16 steps, noise levels 0.3/0.5/0.7 and stochastic first-quarter, early-half or all-but-last steps:
   mean |rollout - ODE sample| of the final latents (same seeds), with random weights, or after
   ``--train-steps`` of flow matching on a "placement" toy (one background, an object token at one
   of 8 places: a mixture of 8 point masses);
3. the same with the exact velocity of that mixture (a perfect model), plus the leftover error (RMS
   distance to the nearest true sample, relative to a sample's RMS) of rollouts and ODE samples and
   the share of rollouts that end on another place than their ODE sample (exploration).
Random or briefly trained weights say little about image quality: rerun `measure` with the SFT'd
toy model's model_fn before choosing DDPO defaults.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel

from dual_rope.diffusers_adapter import prepare_references

from training.sampler import SamplerConfig, flux_model_fn, logprob_of_transition, ode_sample, rollout

LATENT = (16, 16, 16)
STEPS = (8, 12, 16)
NOISE_LEVELS = (0.3, 0.5, 0.7)
SDE_FRACTIONS = {"first quarter": 0.25, "early half": 0.5, "all but last": 1.0}


def tiny_flux() -> FluxTransformer2DModel:
    """The DESIGN's tiny Flux (random weights)."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    )


def bind(model, batch: int):
    """A model_fn with two fixed 64-token references and a fixed text, shared by ``batch`` samples."""
    g = torch.Generator().manual_seed(1)
    refs = [torch.randn(1, *LATENT, generator=g).expand(batch, -1, -1, -1) for _ in range(2)]
    text = torch.randn(1, 16, 64, generator=g).expand(batch, -1, -1)
    pooled = torch.randn(1, 64, generator=g).expand(batch, -1)
    return flux_model_fn(model, prepare_references(LATENT[1:], refs), text, pooled, guidance=2.5)


def placement_atoms(count: int = 8) -> torch.Tensor:
    """One background with a bright object token (2x2 latent pixels) at one of ``count`` places."""
    g = torch.Generator().manual_seed(0)
    background = 0.8 * torch.randn(LATENT, generator=g)
    atoms = background.expand(count, -1, -1, -1).clone()
    for k in range(count):
        row, col = 4 + 4 * (k // 4), 2 + 3 * (k % 4)
        atoms[k, :, row:row + 2, col:col + 2] += 1.5
    return atoms


def point_mass_fn(atoms: torch.Tensor):
    def model_fn(x, sigma):  # exact velocity (x - E[x0 | x]) / sigma for a uniform mixture of atoms
        sig = sigma.view(-1, 1, 1, 1)
        dist = ((x[:, None] - (1 - sig[:, None]) * atoms[None]) ** 2).flatten(2).sum(-1)
        weights = torch.softmax(-dist / (2 * sig.view(-1, 1) ** 2), dim=1)
        return (x - torch.einsum("bk,kchw->bchw", weights, atoms)) / sig
    return model_fn


def train(model, model_fn, atoms: torch.Tensor, batch: int, steps: int) -> None:
    """Plain flow matching on the mixture: x = (1-s) x0 + s eps, target eps - x0."""
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x0 = atoms[torch.randint(len(atoms), (batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch, generator=g))
        s = sigma.view(-1, 1, 1, 1)
        loss = ((model_fn((1 - s) * x0 + s * noise, sigma) - (noise - x0)) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step:4d}  loss {loss.item():.4f}")
    model.eval()


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(model, model_fn, batch: int, repeats: int) -> None:
    seeds = list(range(batch))
    print(f"\nTiny Flux, batch {batch}, 64-token target + 2x64-token references (median of {repeats}):")
    print(f"{'steps':>5} {'ODE s/step':>11} {'SDE s/step':>11} {'SDE/ODE':>8} {'rescore+bwd s':>14}")
    for steps in STEPS:
        ode_config = SamplerConfig(num_steps=steps, noise_level=0.0)
        sde_config = SamplerConfig(num_steps=steps, noise_level=0.7, sde_fraction=1.0)
        ode_s = seconds(lambda: ode_sample(model_fn, LATENT, seeds, ode_config), repeats) / steps
        sde_s = seconds(lambda: rollout(model_fn, LATENT, seeds, sde_config), repeats) / steps
        traj = rollout(model_fn, LATENT, seeds, sde_config)
        x_t, x_next, s, s_next, _ = traj.transition(torch.zeros(batch, dtype=torch.long))

        def rescore():
            logprob_of_transition(model_fn, x_t, x_next, s, s_next, traj.noise_level).logprob.sum().backward()
            model.zero_grad(set_to_none=True)
        train_s = seconds(rescore, repeats)
        print(f"{steps:>5} {ode_s:>11.4f} {sde_s:>11.4f} {sde_s / ode_s:>8.2f} {train_s:>14.4f}")


def nearest(final: torch.Tensor, atoms: torch.Tensor):
    """(relative RMS distance to the nearest atom, its index) per sample."""
    dist = (final[:, None] - atoms[None]).flatten(2).norm(dim=-1)
    values, index = dist.min(1)
    return values / atoms.flatten(1).norm(dim=-1).mean(), index


def measure(model_fn, batch: int, atoms: torch.Tensor | None = None) -> None:
    """Rollout vs ODE sample from the same seeds, for each steps / noise level / stochastic share.

    With ``atoms`` (the true samples) it also prints the leftover error of rollouts and ODE samples
    and the share of rollouts that end on another atom than their ODE sample.
    """
    seeds = list(range(batch))
    extra = f" {'err SDE':>8} {'err ODE':>8} {'moved':>6}" if atoms is not None else ""
    print(f"{'steps':>5} {'noise':>5} {'stochastic':>13} {'K':>2} {'|SDE-ODE|':>10}" + extra)
    with torch.no_grad():
        for steps in STEPS:
            ode = ode_sample(model_fn, LATENT, seeds, SamplerConfig(num_steps=steps))
            for level in NOISE_LEVELS:
                for name, fraction in SDE_FRACTIONS.items():
                    config = SamplerConfig(num_steps=steps, noise_level=level, sde_fraction=fraction)
                    final = rollout(model_fn, LATENT, seeds, config).final
                    line = (f"{steps:>5} {level:>5} {name:>13} {config.stochastic_steps:>2} "
                            f"{(final - ode).abs().mean().item():>10.4f}")
                    if atoms is not None:
                        (err, place), (ode_err, ode_place) = nearest(final, atoms), nearest(ode, atoms)
                        line += (f" {err.mean().item():>8.4f} {ode_err.mean().item():>8.4f}"
                                 f" {(place != ode_place).float().mean().item():>6.2f}")
                    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="samples per rollout batch (timing, tiny Flux)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="first train the tiny Flux on the placement toy (about 4 s/step on 2 busy cores)")
    parser.add_argument("--samples", type=int, default=64, help="samples per setting with the exact model")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, atoms = tiny_flux().eval(), placement_atoms()
    timing(model, bind(model, args.batch), args.batch, args.repeats)
    if args.train_steps:
        print(f"\nTraining the tiny Flux on the placement toy for {args.train_steps} steps (batch 16):")
        train(model, bind(model, 16), atoms, 16, args.train_steps)
    state = f"trained {args.train_steps} steps" if args.train_steps else "random weights"
    print(f"\nTiny Flux ({state}), {args.batch} samples per setting:")
    measure(bind(model, args.batch), args.batch, atoms if args.train_steps else None)
    print(f"\nExact velocity of the placement mixture (a perfect model), {args.samples} samples per setting:")
    measure(point_mass_fn(atoms), args.samples, atoms)


if __name__ == "__main__":
    main()
