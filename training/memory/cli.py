"""``python -m training.memory``: peak GPU memory of DualRef training on full-size FLUX.1 Kontext-dev.

Prints, per GPU, what one training step keeps: frozen base weights, LoRA (or all) parameters,
gradients and optimizer states -- counted exactly from meta-device models -- and activations
from the per-block formula in :mod:`training.memory.model` (tokens = target + references + text).
Without arguments it prints the paper's setting (rank 512, 512x512 output, two 512x512
references, 8 x H100 80 GiB) and a table of variants that do and do not fit. ``--json`` for
machines.

Assumptions:

- ``bf16``: frozen base in bf16; LoRA master weights, gradients and AdamW states in fp32 under bf16
  autocast (diffusers' training scripts, and ours with DDP and FSDP alike). With FSDP (the trainer's
  FSDP2, ``training.runtime.fsdp_mixed_precision``: each parameter all-gathered in its own dtype):
  every shard divided by the world size, plus two unsharded blocks, bf16 base + fp32 LoRA (the one
  computing and the one prefetched), and a block's fp32 gradients; autocast's bf16 copies of the
  LoRA weights are kept until backward as without FSDP.
- Loading (``load``): every process builds the whole model on its GPU before anything is sharded, as
  ``training.sft.trainer.train`` does: the cache is encoded first (T5-XXL + CLIP-L in the base
  precision and the fp32 VAE; the encoders are released after, the VAE stays for validation samples;
  nothing is loaded when the cache is complete), then the transformer is read whole in the base
  precision and the LoRA added in fp32; ``accelerator.prepare`` shards it only then (FSDP), while
  the optimizer still holds the whole fp32 LoRA beside its new shards. The plan's ``peak`` is the
  larger of the loading and training peaks.
- ``fp32``: everything fp32.
- DDP (no FSDP, world size > 1) keeps a bucket copy of the gradients (PyTorch's default).
- ``--base-quant int8|fp8`` (``train.base_quant``, one GPU, bf16): the frozen linear weights at one byte
  plus a per-row scale, dequantised one layer at a time (training.quantize keeps no bf16 copies for
  backward); ``--optimizer adamw8bit`` (``optim.eightbit``): two uint8 moments plus block scales.
  ``--fit-table`` prints which of these fit a 24, 48 or 80 GiB GPU (Markdown, for the README).
- Text encoders (T5-XXL + CLIP-L) and the VAE: ``resident`` on every GPU in the base precision,
  ``offloaded`` to CPU after encoding, or ``cached`` (embeddings and latents precomputed, as
  DualRef's data cache does) -- the last two cost no GPU memory during the step.
- CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation: a flat ``OVERHEAD_GIB`` plus
  10 % of the activations (not measured here; a usual figure on H100s).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from dataclasses import dataclass, field

from .model import (
    ASSUMED_UTILISATION,
    DEFAULT_TARGETS,
    H100_BF16_FLOPS,
    Dims,
    Tokens,
    activation_peak,
    QUANT_BYTES,
    frozen_base_bytes,
    frozen_model_counts,
    image_tokens,
    step_flops,
    transformer_counts,
)

GIB = 1024 ** 3
OVERHEAD_GIB = 2.0
# state bytes per trainable parameter; adamw8bit (optim.eightbit, bitsandbytes): two uint8 moments and an fp32
# scale per 256-weight block each (tensors under 4096 weights keep fp32 moments: at Kontext's width only the
# final proj_out's 64-row B at low rank, counted as 8-bit here)
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2 + 8 / 256, "sgd": 0}


@dataclass(frozen=True)
class Setting:
    """One training configuration (per-GPU batch)."""

    rank: int = 512
    output: tuple[int, int] = (512, 512)
    references: tuple[tuple[int, int], ...] = ((512, 512), (512, 512))
    batch: int = 1
    text_tokens: int = 512
    checkpointing: bool = True
    precision: str = "bf16"
    optimizer: str = "adamw"
    world_size: int = 8
    fsdp: bool = True
    encoders: str = "cached"
    full_finetune: bool = False
    base_quant: str = "none"  # none | int8 | fp8 (train.base_quant)
    gpu_gib: float = 80.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)
    vae: bool = False  # the fp32 VAE stays on the GPU during training (the trainer keeps it for validation samples)

    def tokens(self) -> Tokens:
        image = image_tokens(*self.output) + sum(image_tokens(h, w) for h, w in self.references)
        return Tokens(self.text_tokens, image)

    def describe(self) -> str:
        refs = " + ".join(f"{h}x{w}" for h, w in self.references) or "none"
        tok = self.tokens()
        what = "full fine-tuning" if self.full_finetune else f"LoRA rank {self.rank}"
        shard = f"FSDP over {self.world_size} GPUs" if self.fsdp else (
            f"DDP over {self.world_size} GPUs" if self.world_size > 1 else "1 GPU")
        base = "" if self.base_quant == "none" else f"{self.base_quant} base; "
        return (f"{what}; {base}output {self.output[0]}x{self.output[1]}, references {refs}; batch {self.batch}/GPU; "
                f"tokens {tok.image} image + {tok.text} text = {tok.total}; {self.precision}; {self.optimizer}; "
                f"checkpointing {'on' if self.checkpointing else 'off'}; {shard}; encoders {self.encoders}")


def estimate(s: Setting) -> dict:
    """Bytes per GPU by component, the total and whether it fits in ``s.gpu_gib``."""
    if s.precision not in ("bf16", "fp32") or s.optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"precision must be bf16|fp32 and optimizer one of {list(OPTIMIZER_BYTES)}")
    if s.encoders not in ("resident", "offloaded", "cached"):
        raise ValueError("encoders must be resident, offloaded or cached")
    if s.base_quant != "none" and (s.base_quant not in QUANT_BYTES or s.precision != "bf16" or s.full_finetune
                                   or s.world_size > 1):
        raise ValueError("base_quant is int8 or fp8, for a bf16 LoRA on one GPU (as train.base_quant)")
    rank = 0 if s.full_finetune else s.rank
    counts = transformer_counts(rank, tuple(s.targets))
    base_b = 2 if s.precision == "bf16" else 4
    shards = s.world_size if s.fsdp else 1
    trainable = counts["base"] if s.full_finetune else counts["lora"]
    parts: dict[str, float] = {}
    parts["frozen base weights" + ("" if s.base_quant == "none" else f" ({s.base_quant})")] = (
        0 if s.full_finetune else frozen_base_bytes(counts, base_b, s.base_quant) / shards)
    parts["trainable weights (fp32 master)"] = trainable * 4 / shards
    parts["gradients (fp32)"] = trainable * 4 / shards
    parts[f"optimizer states ({s.optimizer})"] = trainable * OPTIMIZER_BYTES[s.optimizer] / shards
    if s.fsdp and s.world_size > 1:  # each parameter all-gathered in its own dtype (fsdp_mixed_precision)
        unit = (counts["largest_block"] * (4 if s.full_finetune else base_b) + counts["lora_largest_block"] * 4)
        parts["FSDP unsharded blocks (2: base + fp32 LoRA) + grad buffer"] = 2 * unit + (
            counts["largest_block"] if s.full_finetune else counts["lora_largest_block"]) * 4
    elif s.world_size > 1:
        parts["DDP gradient buckets"] = trainable * 4
    dims = Dims(counts["width"], counts["heads"], counts["double"], counts["single"], rank)
    copies = s.precision == "bf16"  # autocast over fp32 trainable weights, with and without FSDP
    act = activation_peak(s.tokens(), dims, base_b, copies, s.checkpointing, s.batch, trainable)
    parts["activations (saved for backward)"] = act["saved"]
    if act["weight copies"]:
        parts["autocast bf16 weight copies"] = act["weight copies"]
    parts["backward working memory"] = act["working"]
    if s.base_quant != "none":
        parts["dequantised layer (transient)"] = counts["largest_linear"] * base_b
    if s.encoders == "resident":
        frozen_models = frozen_model_counts()
        parts["T5-XXL + CLIP-L + VAE (resident)"] = sum(frozen_models.values()) * base_b
    if s.vae:
        parts["VAE (fp32, kept for validation samples)"] = frozen_model_counts()["vae"] * 4
    activations = act["saved"] + act["weight copies"] + act["working"]
    parts["CUDA context, workspaces, fragmentation"] = OVERHEAD_GIB * GIB + 0.1 * activations
    total = sum(parts.values())
    load = load_phases(s, counts)
    peak = max(total, *load.values())
    flops = step_flops(s.tokens(), counts, s.checkpointing, s.batch)
    expected = flops["step"] / (H100_BF16_FLOPS * ASSUMED_UTILISATION)
    return dict(setting=dataclasses.asdict(s), description=s.describe(), parts=parts, total=total, load=load,
                peak=peak, headroom=1 - peak / (s.gpu_gib * GIB), fits=peak <= s.gpu_gib * GIB,
                step_tflop=flops["step"] / 1e12, forward_tflop=flops["forward"] / 1e12, expected_h100_step_s=expected,
                trainable_params=trainable, base_params=counts["base"], tokens=dataclasses.asdict(s.tokens()))


def load_phases(s: Setting, counts: dict) -> dict:
    """Bytes per GPU while the trainer builds its model (module docstring, "Loading"), by phase."""
    frozen = frozen_model_counts()
    base_b = 2 if s.precision == "bf16" else 4
    overhead = OVERHEAD_GIB * GIB
    vae = frozen["vae"] * 4
    # full fine-tuning loads the transformer in fp32 (its master weights); a LoRA run in the base precision
    whole = counts["base"] * 4 if s.full_finetune else counts["base"] * base_b + counts["lora"] * 4
    trainable = counts["base"] if s.full_finetune else counts["lora"]
    text_b = 4 if s.full_finetune else base_b  # full fine-tuning loads every component in fp32
    phases = {"encoding the cache (text encoders + VAE)": (frozen["t5"] + frozen["clip"]) * text_b + vae + overhead}
    if s.base_quant != "none":  # quantised after the bf16 base is whole on the GPU
        whole = counts["base"] * base_b + counts["lora"] * 4
    sharding = trainable * 4 / s.world_size if s.fsdp and s.world_size > 1 else 0
    phases["whole model on every GPU" + (", being sharded" if sharding else "")] = whole + sharding + vae + overhead
    return phases


PAPER = Setting()
SCENARIOS = [
    ("paper: rank 512, 512², 2 refs, FSDP x8, ckpt", PAPER),
    ("paper without checkpointing", dataclasses.replace(PAPER, checkpointing=False)),
    ("paper on DDP x8 (no sharding)", dataclasses.replace(PAPER, fsdp=False)),
    ("paper, DDP x8, no checkpointing", dataclasses.replace(PAPER, fsdp=False, checkpointing=False)),
    ("paper, encoders resident, DDP x8", dataclasses.replace(PAPER, fsdp=False, encoders="resident")),
    ("1024² + 2 refs 1024², FSDP x8, ckpt", dataclasses.replace(PAPER, output=(1024, 1024),
                                                               references=((1024, 1024),) * 2)),
    ("1024² + 2 refs 1024², no checkpointing", dataclasses.replace(PAPER, output=(1024, 1024),
                                                                  references=((1024, 1024),) * 2,
                                                                  checkpointing=False)),
    ("DDPO stage: rank 32, DDP x8, ckpt", dataclasses.replace(PAPER, rank=32, fsdp=False)),
    ("full fine-tuning, DDP x8 (no FSDP)", dataclasses.replace(PAPER, full_finetune=True, fsdp=False)),
    ("full fine-tuning, FSDP x8, ckpt", dataclasses.replace(PAPER, full_finetune=True)),
    ("full fine-tuning, FSDP x8, no ckpt", dataclasses.replace(PAPER, full_finetune=True, checkpointing=False)),
]


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes look like 512 or 512x768, got {text!r}") from None


def parse_args(argv=None) -> tuple[argparse.Namespace, Setting | None]:
    p = argparse.ArgumentParser(prog="python -m training.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, help="LoRA rank (paper: 512 for SFT, 32 for DDPO)")
    p.add_argument("--resolution", type=_size, help="output size, e.g. 512 or 1024x768")
    p.add_argument("--refs", help="reference sizes, comma separated, e.g. 512,512 or 512x768,1024 ('' for none)")
    p.add_argument("--batch", type=int, help="samples per GPU")
    p.add_argument("--text-tokens", type=int, help="T5 tokens (Kontext: 512)")
    p.add_argument("--checkpointing", choices=("on", "off"))
    p.add_argument("--precision", choices=("bf16", "fp32"))
    p.add_argument("--optimizer", choices=tuple(OPTIMIZER_BYTES))
    p.add_argument("--world-size", type=int, help="GPUs")
    p.add_argument("--fsdp", choices=("on", "off"), help="shard base, LoRA, gradients and optimizer (on)")
    p.add_argument("--encoders", choices=("resident", "offloaded", "cached"))
    p.add_argument("--full-finetune", action="store_true", help="train every weight instead of a LoRA")
    p.add_argument("--gpu-gib", type=float, help="memory per GPU (H100: 80)")
    p.add_argument("--base-quant", choices=("none", *QUANT_BYTES), help="frozen base quantised (one GPU, bf16)")
    p.add_argument("--config", help="an SFT config (e.g. training/configs/kontext_sft.json): the setting its trainer "
                   "runs, on --world-size GPUs (default 8) of --gpu-gib; the default without other options is "
                   f"{SHIPPED}")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--fit-table", action="store_true",
                   help="Markdown: one GPU, ranks 16/128/512 at 512² and 1024² (two references of the same size), "
                        "bf16/fp8 base x AdamW/8-bit AdamW x checkpointing: which fit 24, 48, 80 GiB")
    args = p.parse_args(argv)
    if args.config:
        return args, config_setting(args.config, args.world_size or 8, args.gpu_gib or 80.0)
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("json", "fit_table") and v is not False}
    if not given:
        return args, None
    changes = dict(rank=args.rank, output=args.resolution, batch=args.batch, text_tokens=args.text_tokens,
                   precision=args.precision, optimizer=args.optimizer, world_size=args.world_size,
                   encoders=args.encoders, gpu_gib=args.gpu_gib, base_quant=args.base_quant)
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.refs is not None:
        changes["references"] = tuple(_size(r) for r in args.refs.split(",") if r.strip())
    if args.checkpointing:
        changes["checkpointing"] = args.checkpointing == "on"
    if args.fsdp:
        changes["fsdp"] = args.fsdp == "on"
    if args.full_finetune:
        changes["full_finetune"] = True
    setting = dataclasses.replace(PAPER, **changes)
    if setting.base_quant != "none" and (setting.world_size > 1 or setting.precision != "bf16"
                                         or setting.full_finetune):
        p.error("--base-quant is a one-GPU saver under a bf16 LoRA: add --world-size 1 --fsdp off "
                "(and no --precision fp32 / --full-finetune)")
    return args, setting


SHIPPED = "training/configs/kontext_sft.json"


def config_setting(path, world_size: int = 8, gpu_gib: float = 80.0) -> Setting:
    """What ``training.sft`` runs for the SFT config at ``path`` on ``world_size`` GPUs: its rank, targets,
    pixel budget (the output and both references at the budget's square), batch per GPU, precision,
    checkpointing, DDP or FSDP, optimizer and base quantisation; the cache encoded, the VAE kept."""
    import math
    from pathlib import Path

    from ..config import load_config

    cfg = load_config(Path(__file__).parents[2] / path if not Path(path).is_file() else path)
    side = math.isqrt(cfg.data.max_pixels)
    return Setting(rank=cfg.lora.rank, output=(side, side), references=((side, side),) * 2,
                   batch=max(1, cfg.data.batch_size // world_size), checkpointing=cfg.train.gradient_checkpointing,
                   precision=cfg.train.precision, optimizer="adamw8bit" if cfg.optim.eightbit else "adamw",
                   world_size=world_size, fsdp=cfg.train.distributed == "fsdp" and world_size > 1,
                   full_finetune=cfg.train.mode == "full", base_quant=cfg.train.base_quant, gpu_gib=gpu_gib,
                   targets=tuple(cfg.lora.target_modules), vae=True)


def breakdown_table(result: dict) -> str:
    width = max(len(k) for k in result["parts"]) + 2
    lines = [*textwrap.wrap(result["description"], 100), "", f"{'component':<{width}}{'GiB/GPU':>9}"]
    lines += [f"{k:<{width}}{v / GIB:9.2f}" for k, v in result["parts"].items()]
    verdict = "fits" if result["fits"] else "does NOT fit"
    gpu = result["setting"]["gpu_gib"]
    lines.append(f"{'training step, total':<{width}}{result['total'] / GIB:9.2f}")
    lines += [f"{'while loading: ' + k:<{width}}{v / GIB:9.2f}" for k, v in result["load"].items()]
    lines.append(f"{'peak':<{width}}{result['peak'] / GIB:9.2f}  of {gpu:g} GiB: {verdict}, "
                 f"headroom {100 * result['headroom']:.0f} %")
    lines.append(f"(transformer {result['base_params'] / 1e9:.2f} B params, trainable {result['trainable_params'] / 1e9:.3f} B)")
    lines.append(f"compute per GPU and step: {result['step_tflop']:.0f} TFLOP (forward {result['forward_tflop']:.0f}); "
                 f"at {100 * ASSUMED_UTILISATION:.0f} % of an H100's {H100_BF16_FLOPS / 1e12:.0f} bf16 TFLOP/s "
                 f"~{result['expected_h100_step_s']:.2f} s per step before communication (an assumed utilisation: "
                 "bench/gpu_check.py measures it)")
    return "\n".join(lines)


def scenario_table(results: list[tuple[str, dict]]) -> str:
    width = max(len(n) for n, _ in results) + 2
    lines = [f"{'setting':<{width}}{'peak GiB':>9}  {'activations':>11}  verdict"]
    for name, r in results:
        act = sum(v for k, v in r["parts"].items() if "activation" in k or "working" in k or "copies" in k)
        lines.append(f"{name:<{width}}{r['peak'] / GIB:9.1f}  {act / GIB:11.1f}  "
                     f"{'fits' if r['fits'] else 'does NOT fit'} in {r['setting']['gpu_gib']:g} GiB")
    return "\n".join(lines)


FIT_GPUS = (24, 48, 80)


def fit_rows() -> list[dict]:
    """The one-GPU savers grid: rank x size x base x optimizer x checkpointing, each with its total."""
    one_gpu = dataclasses.replace(PAPER, world_size=1, fsdp=False)
    rows = []
    for rank in (16, 128, 512):
        for size in (512, 1024):
            for base in ("none", "fp8"):
                for optimizer in ("adamw", "adamw8bit"):
                    for ckpt in (False, True):
                        s = dataclasses.replace(one_gpu, rank=rank, output=(size, size), references=((size, size),) * 2,
                                                base_quant=base, optimizer=optimizer, checkpointing=ckpt)
                        rows.append(dict(setting=s, total=estimate(s)["total"]))
    return rows


def fit_table(rows: list[dict]) -> str:
    """One line per rank x size x base x optimizer; per checkpointing setting the GiB and the GPUs it fits."""
    def cell(total: float) -> str:
        fits = [str(g) for g in FIT_GPUS if total <= g * GIB]
        return f"{total / GIB:.1f} ({', '.join(fits) if fits else 'none'})"

    head = ["rank", "output + 2 refs", "base", "optimizer", "no checkpointing", "checkpointing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    by_key = {}
    for row in rows:
        s = row["setting"]
        by_key.setdefault((s.rank, s.output, s.base_quant, s.optimizer), {})[s.checkpointing] = row["total"]
    for (rank, output, base, optimizer), totals in by_key.items():
        cells = [str(rank), f"{output[0]}²", "bf16" if base == "none" else base,
                 "8-bit AdamW" if optimizer == "adamw8bit" else "AdamW", cell(totals[False]), cell(totals[True])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, setting = parse_args(argv)
    if args.fit_table:
        rows = fit_rows()
        if args.json:
            print(json.dumps([dict(setting=dataclasses.asdict(r["setting"]), total=r["total"],
                                   fits={g: r["total"] <= g * GIB for g in FIT_GPUS}) for r in rows], indent=2))
        else:
            print("Peak GiB on one GPU (in brackets: which of 24, 48, 80 GiB it fits); encoders cached, batch 1, "
                  f"512 text tokens, bf16 compute; {OVERHEAD_GIB:g} GiB + 10 % of activations for CUDA context "
                  "and fragmentation included.\n")
            print(fit_table(rows))
        return 0
    if setting is not None:
        result = estimate(setting)
        print(json.dumps(result, indent=2) if args.json else breakdown_table(result))
        return 0
    results = [(name, estimate(s)) for name, s in SCENARIOS]
    shipped = estimate(config_setting(SHIPPED))
    if args.json:
        print(json.dumps({"shipped": dict(config=SHIPPED, **shipped),
                          "scenarios": [dict(name=n, **r) for n, r in results]}, indent=2))
        return 0
    print("DualRef training memory plan: FLUX.1 Kontext-dev transformer, peak per GPU\n")
    print(f"{SHIPPED} as training.sft runs it (accelerate launch --num_processes 8):\n")
    print(breakdown_table(shipped))
    print("\nVariants:\n" + scenario_table(results))
    return 0
