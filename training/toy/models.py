"""The tiny model factory: Kontext-architecture components from the small configs in
``training/model_configs/toy``, saved as a diffusers folder that ``load_kontext`` reads like the
real one. Nothing is downloaded.

- transformer: diffusers ``FluxTransformer2DModel`` with Kontext's guidance embedding (~1.9M params).
- VAE: diffusers ``AutoencoderKL``, 16 latent channels, 4x downsampling (64 px -> 16x16 -> 64 tokens),
  channels [16, 32, 32] (~0.24M params: the world's 2x2-block pictures need no more, and it trains
  ~2x faster per step than [32, 64, 64]),
  trained here on toy images (:func:`train_vae`), then given Flux-style ``shift_factor`` /
  ``scaling_factor`` measured on its latents (unit variance, zero mean), as FLUX's VAE has.
  Its GroupNorms have one group: per-sample normalisation over all channels keeps absolute colour
  (flat toy backgrounds) best; measured here, it reconstructs better at equal steps than 4 or 16.
- text encoders: transformers ``CLIPTextModel`` and ``T5EncoderModel`` with random frozen weights
  (Kontext's are frozen too), over word-level tokenizers built from the toy grammar.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from .. import interrupts
from ..files import atomic_path
from ..models import CONFIG_ROOT
from .tokenizer import build_word_tokenizer

log = logging.getLogger(__name__)

TOY_CONFIGS = CONFIG_ROOT / "toy"
TOY_MAX_SEQUENCE_LENGTH = 48  # T5 tokens; the longest toy instruction is ~35


def toy_config(component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((TOY_CONFIGS / component / name).read_text())


def build_components(vocabulary, seed: int = 0, qk_norm_init: float = 1.0) -> dict:
    """Fresh random toy components (deterministic for ``seed``). ``qk_norm_init`` starts the
    transformer's query/key RMSNorm weights there instead of at 1: with unit weights a 32-wide head's
    attention logits are capped near sqrt(32), too flat to pick one token out of a reference, and a
    from-scratch model takes thousands of steps to grow them."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = build_word_tokenizer(vocabulary, "clip", toy_config("text_encoder")["max_position_embeddings"])
    tokenizer_2 = build_word_tokenizer(vocabulary, "t5", TOY_MAX_SEQUENCE_LENGTH)
    torch.manual_seed(seed)
    clip_cfg = {k: v for k, v in toy_config("text_encoder").items() if k != "architectures"}
    t5_cfg = {k: v for k, v in toy_config("text_encoder_2").items() if k != "architectures"}
    clip_cfg["vocab_size"], t5_cfg["vocab_size"] = len(tokenizer), len(tokenizer_2)
    parts = {
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval(),
        "text_encoder_2": T5EncoderModel(T5Config(**t5_cfg)).eval(),
        "vae": AutoencoderKL.from_config(toy_config("vae")),
        "transformer": FluxTransformer2DModel.from_config(toy_config("transformer")),
    }
    if qk_norm_init != 1.0:
        with torch.no_grad():
            for param in qk_norm_parameters(parts["transformer"]).values():
                param.fill_(qk_norm_init)
    return parts


def qk_norm_parameters(transformer) -> dict:
    """The query/key RMSNorm weights of every attention (both streams of the double blocks)."""
    return {n: p for n, p in transformer.named_parameters()
            if any(f"attn.norm_{k}" in n for k in ("q.", "k.", "added_q.", "added_k."))}


def save_folder(path, parts: dict, settings: dict) -> Path:
    """Write a diffusers-style Kontext folder (model_index.json, one subfolder per component)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text((TOY_CONFIGS / "model_index.json").read_text())
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text((TOY_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if name in parts:
            parts[name].save_pretrained(str(path / name), **({} if name.startswith("tokenizer") else
                                                              {"safe_serialization": True}))
    (path / "dualref.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
    return path


# -- VAE ------------------------------------------------------------------------------------------
def vae_loss(vae, pixels: torch.Tensor, kl_weight: float) -> torch.Tensor:
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.mode()).sample
    err = recon - pixels
    return err.abs().mean() + err.pow(2).mean() + kl_weight * posterior.kl().mean()


@torch.no_grad()
def reconstruction_error(vae, pixels: torch.Tensor, batch: int = 64) -> dict:
    """PSNR (dB, on [0, 255]), mean and max absolute error in 8-bit levels, through encode->decode."""
    sq, worst, absum, count = 0.0, 0.0, 0.0, 0
    for i in range(0, len(pixels), batch):
        x = pixels[i:i + batch]
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        err = ((recon - x) * 127.5).round()  # in 8-bit levels
        sq += float(err.pow(2).sum())
        absum += float(err.abs().sum())
        worst = max(worst, float(err.abs().max()))
        count += err.numel()
    mse = sq / count
    return {"psnr": 10 * math.log10(255 ** 2 / max(mse, 1e-12)), "mean_abs": absum / count, "max_abs": worst}


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 1e-3, crop: int = 32,
              kl_weight: float = 1e-6, seed: int = 0, progress: bool = True, checkpoint=None,
              checkpoint_every: int = 500, on_step=None) -> dict:
    """Train ``vae`` on ``images`` (N, 3, H, W) in [-1, 1]: L1 + L2 on the posterior mean's decoding,
    a tiny KL so latents stay bounded, cosine-decayed AdamW. Returns timing and loss.

    It trains on random ``crop`` px crops on the latent grid (the VAE is convolutional, without
    attention): a quarter of the compute per 64 px image, and measured here to reach a given
    reconstruction error in about a third of the time of full images.

    ``checkpoint``: a file that holds the run's state every ``checkpoint_every`` steps and when the
    run is interrupted (Ctrl-C, SIGTERM); a later call with the same file resumes from it and ends
    with the weights an uninterrupted run would have. ``on_step(step)`` is called after each step."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    checkpoint = Path(checkpoint) if checkpoint else None
    done = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)  # tensors and plain containers only: no pickle code runs
        if state["steps"] != steps:
            raise ValueError(f"{checkpoint} holds a VAE run of {state['steps']} steps, not {steps}; delete it to start over")
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        g.set_state(state["generator"])
        done = state["step"]
        log.info("toy VAE: resuming at step %d of %d from %s", done, steps, checkpoint)

    def save(step: int) -> None:
        if checkpoint is None:
            return
        with atomic_path(checkpoint) as tmp:
            torch.save({"steps": steps, "step": step, "vae": vae.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "generator": g.get_state()}, tmp)

    vae.train()
    start, loss, finished = time.perf_counter(), None, done
    try:
        with interrupts.sigterm_interrupts():
            for step in tqdm(range(done + 1, steps + 1), desc="toy VAE", unit="step", disable=not progress,
                             mininterval=1.0, initial=done, total=steps):
                with interrupts.deferred():  # the weights and the step counter move together
                    x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
                    if torch.rand((), generator=g) < 0.5:  # flips: cheap augmentation, the world is mirror-symmetric
                        x = x.flip(-1)
                    if crop < x.shape[-1] or crop < x.shape[-2]:
                        f = 2 ** (len(vae.config.block_out_channels) - 1)
                        top, left = (int(torch.randint(0, (n - crop) // f + 1, (), generator=g)) * f for n in x.shape[-2:])
                        x = x[..., top:top + crop, left:left + crop]
                    loss = vae_loss(vae, x, kl_weight)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    finished = step
                if step % checkpoint_every == 0 and step < steps:
                    save(step)
                if on_step is not None:
                    on_step(step)
    except KeyboardInterrupt:
        save(finished)
        log.warning("toy VAE interrupted after step %d of %d%s", finished, steps,
                    f"; run again to resume from {checkpoint}" if checkpoint else "")
        raise
    vae.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start, "final_loss": float(loss.detach()) if loss is not None else None}


@torch.no_grad()
def set_latent_normalisation(vae, images: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """Flux-style ``shift_factor`` (latent mean) and ``scaling_factor`` (1 / latent std) from ``images``."""
    latents = torch.cat([vae.encode(images[i:i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])
    shift, scale = float(latents.mean()), float(1.0 / latents.std())
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    return shift, scale
