"""The GPU check of full-size FLUX.1 Kontext-dev, every figure measured side by side in one run.

On one CUDA GPU it builds the Kontext transformer from ``training/model_configs/kontext`` with random
bf16 weights (nothing is downloaded; the weights' values do not change time or memory) and measures:

  sft       one LoRA SFT step as the trainer takes it (rank 512, 512^2 target + two 512^2 references,
            512 text tokens, bf16 base under fp32 LoRA with bf16 autocast, gradient checkpointing,
            AdamW): median step time and peak memory, against ``python -m training.memory``'s
            prediction for the same setting (ratio measured / predicted), and the step time against the
            planner's compute estimate (its TFLOP at 40 % of an H100's bf16 peak; achieved TFLOP/s)
  ddpo      one DDPO iteration (rank-32 LoRA): a group of 4 SDE rollouts of 12 steps at 512^2 with
            log-probs, then the clipped policy-gradient update on their stochastic steps: time, peak
  sampling  28 Euler steps at 1024^2 with two 1024^2 references (the ComfyUI template's setting):
            time and peak
  patch     ``bench/patch_overhead.py --full`` (DiagonalPositionPatch vs native offset in ComfyUI),
            run as its own process where a ComfyUI host is found; skipped, saying so, elsewhere

    python bench/gpu_check.py                   # one CUDA GPU (about 4-6 minutes on an H100)
    python bench/gpu_check.py --dry-run         # the same code on the CPU at toy size (CI runs this)
    python bench/gpu_check.py --only sft ddpo   # a subset

Prints a table and writes every number to ``--out`` (default ``gpu_check.json``); the numbers of a GPU
run go into ``docs/gpu_check.md`` with the card named.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script; appended, so ComfyUI's `nodes` is never shadowed by ours
    sys.path.append(str(REPO))

import torch  # noqa: E402

from dual_rope.diffusers_adapter import prepare_references  # noqa: E402
from training.config import DEFAULT_TARGET_MODULES  # noqa: E402
from training.ddpo.objective import ddpo_loss  # noqa: E402
from training.flow import FlowMatchingModel  # noqa: E402
from training.memory.cli import Setting, estimate  # noqa: E402
from training.models import KONTEXT_CONFIGS  # noqa: E402
from training.sampler import SamplerConfig, flux_model_fn, logprob_of_transition, ode_sample, rollout  # noqa: E402

GIB = 1024 ** 3
STAGES = ("sft", "ddpo", "sampling", "patch")
# --dry-run: the real config's structure at toy width and depth, small images and text
DRY = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, joint_attention_dim=64,
           pooled_projection_dim=32)


def build_transformer(device: torch.device, dry: bool):
    """Kontext's transformer from the shipped config, created directly in bf16 on ``device``."""
    from diffusers import FluxTransformer2DModel

    config = json.loads((KONTEXT_CONFIGS / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if dry:
        config.update(DRY)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # materialised in bf16: never a 48 GB fp32 copy first
    try:
        with torch.device(device):
            model = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False), config


class Shapes:
    def __init__(self, config: dict, dry: bool):
        self.text_tokens = 16 if dry else 512
        self.text_dim, self.pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]
        self.train_px, self.sample_px = (64, 64) if dry else (512, 1024)
        self.sample_steps, self.rollout_steps, self.group = (2, 4, 2) if dry else (28, 12, 4)

    def latent(self, px: int, batch: int, device) -> torch.Tensor:
        return torch.randn(batch, 16, px // 8, px // 8, device=device)

    def text(self, batch: int, device):
        return (torch.randn(batch, self.text_tokens, self.text_dim, device=device),
                torch.randn(batch, self.pooled_dim, device=device))


def add_lora(transformer, rank: int, name: str) -> list[torch.nn.Parameter]:
    """A peft LoRA on the trainer's target modules, trainable weights in fp32 over the bf16 base."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                       target_modules=list(DEFAULT_TARGET_MODULES)), adapter_name=name)
    params = [p for n, p in transformer.named_parameters() if f".{name}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_of(fn, device: torch.device):
    """``(seconds, peak bytes allocated during fn, or None on the CPU)``."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def sft_stage(transformer, shapes: Shapes, device, repeats: int) -> dict:
    params = add_lora(transformer, 512, "sft")
    transformer.enable_gradient_checkpointing()
    model = FlowMatchingModel(transformer, "diagonal", guidance=1.0, autocast=torch.bfloat16)
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    target = shapes.latent(shapes.train_px, 1, device)
    refs = [shapes.latent(shapes.train_px, 1, device) for _ in range(2)]
    prompt, pooled = shapes.text(1, device)

    def step():
        sigma, noise = torch.rand(1, device=device), torch.randn_like(target)
        model(target, refs, prompt, pooled, sigma, noise).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, Adam states
    runs = [peak_of(step, device) for _ in range(repeats)]
    transformer.disable_gradient_checkpointing()
    transformer.delete_adapters(["sft"])
    del optimizer
    setting = Setting(rank=512, output=(shapes.train_px,) * 2, references=((shapes.train_px,) * 2,) * 2, batch=1,
                      text_tokens=shapes.text_tokens, checkpointing=True, precision="bf16", optimizer="adamw",
                      world_size=1, fsdp=False, encoders="cached")
    predicted = estimate(setting)
    overhead = next(v for k, v in predicted["parts"].items() if k.startswith("CUDA context"))
    result = {"step_s": statistics.median(s for s, _ in runs), "trainable_params": sum(p.numel() for p in params),
              "predicted_peak_gib": predicted["total"] / GIB, "step_tflop": predicted["step_tflop"],
              "expected_h100_step_s": predicted["expected_h100_step_s"],
              "predicted_allocated_gib": (predicted["total"] - overhead) / GIB}
    result["step_vs_expected"] = result["step_s"] / result["expected_h100_step_s"]  # 1 = 40 % of an H100's peak
    result["achieved_tflops"] = result["step_tflop"] / result["step_s"]
    peaks = [p for _, p in runs if p is not None]
    if peaks:
        result["peak_gib"] = max(peaks) / GIB
        result["peak_vs_prediction"] = result["peak_gib"] / result["predicted_allocated_gib"]
    return result


def ddpo_stage(transformer, shapes: Shapes, device) -> dict:
    params = add_lora(transformer, 32, "ddpo")
    transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=5e-5)
    shape = (16, shapes.train_px // 8, shapes.train_px // 8)
    refs = [shapes.latent(shapes.train_px, shapes.group, device) for _ in range(2)]
    prompt, pooled = shapes.text(shapes.group, device)
    guidance = torch.full((shapes.group,), 2.5, device=device)
    fn = flux_model_fn(transformer, prepare_references(shape[-2:], refs, "diagonal"), prompt, pooled, guidance=guidance)
    config = SamplerConfig(num_steps=shapes.rollout_steps, noise_level=0.7, sde_fraction=0.5)
    out = {}

    def sample():
        with torch.autocast(device.type, torch.bfloat16):
            out["trajectory"] = rollout(fn, shape, list(range(shapes.group)), config, guidance=guidance, device=device)

    def update():
        traj, advantages = out["trajectory"], torch.randn(shapes.group, device=device)
        for step in range(traj.stochastic_steps):
            x_t, x_next, sigma, sigma_next, old = traj.transition(torch.full((shapes.group,), step, device=device))
            with torch.autocast(device.type, torch.bfloat16):
                score = logprob_of_transition(fn, x_t, x_next, sigma, sigma_next, traj.noise_level)
            loss, _ = ddpo_loss(score.logprob, old, advantages, 1e-4)
            (loss / traj.stochastic_steps).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    transformer.eval()
    rollout_s, rollout_peak = peak_of(sample, device)
    transformer.train()
    update_s, update_peak = peak_of(update, device)
    transformer.disable_gradient_checkpointing()
    transformer.delete_adapters(["ddpo"])
    transformer.eval()
    result = {"rollouts": shapes.group, "steps": shapes.rollout_steps, "rollout_s": rollout_s, "update_s": update_s,
              "iteration_s": rollout_s + update_s}
    if rollout_peak is not None:
        result["peak_gib"] = max(rollout_peak, update_peak) / GIB
    return result


def sampling_stage(transformer, shapes: Shapes, device) -> dict:
    px = shapes.sample_px
    shape = (16, px // 8, px // 8)
    refs = [shapes.latent(px, 1, device) for _ in range(2)]
    prompt, pooled = shapes.text(1, device)
    fn = flux_model_fn(transformer, prepare_references(shape[-2:], refs, "diagonal"), prompt, pooled, guidance=2.5)
    config = SamplerConfig(num_steps=shapes.sample_steps, noise_level=0.0)
    seconds, peak = peak_of(lambda: ode_sample(fn, shape, [0], config, device=device), device)
    tokens = 3 * (px // 16) ** 2
    result = {"resolution": px, "steps": shapes.sample_steps, "image_tokens": tokens, "seconds": seconds,
              "seconds_per_step": seconds / shapes.sample_steps}
    if peak is not None:
        result["peak_gib"] = peak / GIB
    return result


def patch_stage(dry: bool, timeout: int) -> dict:
    """``bench/patch_overhead.py`` as its own process (it needs the ComfyUI host)."""
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_host import comfy_path, skip_reason

    if comfy_path() is None:
        return {"skipped": skip_reason()}
    command = [sys.executable, str(REPO / "bench" / "patch_overhead.py")] + ([] if dry else ["--full"])
    if dry:
        command += ["--repeats", "2"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"patch_overhead.py ran past {timeout} s"}
    return {"returncode": done.returncode, "output": done.stdout[-3000:] + done.stderr[-1000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--dry-run", action="store_true", help="the CPU at toy size: checks the script, measures nothing real")
    p.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--repeats", type=int, default=3, help="timed SFT steps after one warm-up")
    p.add_argument("--patch-timeout", type=int, default=240)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__}
    start = time.perf_counter()
    if {"sft", "ddpo", "sampling"} & set(args.only):
        transformer, config = build_transformer(device, args.dry_run)
        shapes = Shapes(config, args.dry_run)
        report["base_params"] = sum(p.numel() for p in transformer.parameters())
        if "sft" in args.only:
            report["sft"] = sft_stage(transformer, shapes, device, args.repeats)
            print("sft", json.dumps(report["sft"]), flush=True)
        if "ddpo" in args.only:
            report["ddpo"] = ddpo_stage(transformer, shapes, device)
            print("ddpo", json.dumps(report["ddpo"]), flush=True)
        if "sampling" in args.only:
            report["sampling"] = sampling_stage(transformer, shapes, device)
            print("sampling", json.dumps(report["sampling"]), flush=True)
        del transformer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "patch" in args.only:
        report["patch"] = patch_stage(args.dry_run, args.patch_timeout)
        print("patch", report["patch"].get("skipped") or report["patch"]["output"], flush=True)
    report["wall_s"] = time.perf_counter() - start
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['device']}: done in {report['wall_s']:.0f} s; numbers in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
