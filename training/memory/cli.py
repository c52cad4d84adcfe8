"""``python -m training.memory``: peak GPU memory of DualRef training on full-size FLUX.1 Kontext-dev.

Prints, per GPU, what one training step keeps: frozen base weights, LoRA (or all) parameters,
gradients and optimizer states -- counted exactly from meta-device models -- and activations
from the per-block formula in :mod:`training.memory.model` (tokens = target + references + text).
Without arguments it prints the paper's setting (rank 512, 512x512 output, two 512x512
references, 8 x H100 80 GiB) and a table of variants that do and do not fit. ``--json`` for
machines.

Assumptions:

- ``bf16``: frozen base in bf16. Without FSDP, LoRA master weights, gradients and AdamW states in
  fp32 under bf16 autocast (diffusers' training scripts). With FSDP (FSDP2-style per-parameter
  sharding, ``MixedPrecisionPolicy(param_dtype=bf16)``): every shard divided by the world size, plus
  two unsharded bf16 blocks (the one computing and the one prefetched), no autocast copies.
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
    DEFAULT_TARGETS,
    Dims,
    Tokens,
    activation_peak,
    QUANT_BYTES,
    frozen_base_bytes,
    frozen_model_counts,
    image_tokens,
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
    if s.fsdp and s.world_size > 1:
        unit = counts["largest_block"] + counts["lora_largest_block"]
        parts["FSDP unsharded blocks (2, bf16) + grad buffer"] = 2 * unit * base_b + (
            counts["largest_block"] if s.full_finetune else counts["lora_largest_block"]) * 4
    elif s.world_size > 1:
        parts["DDP gradient buckets"] = trainable * 4
    dims = Dims(counts["width"], counts["heads"], counts["double"], counts["single"], rank)
    copies = s.precision == "bf16" and not (s.fsdp and s.world_size > 1)  # autocast over fp32 weights
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
    activations = act["saved"] + act["weight copies"] + act["working"]
    parts["CUDA context, workspaces, fragmentation"] = OVERHEAD_GIB * GIB + 0.1 * activations
    total = sum(parts.values())
    return dict(setting=dataclasses.asdict(s), description=s.describe(), parts=parts, total=total,
                fits=total <= s.gpu_gib * GIB, trainable_params=trainable, base_params=counts["base"],
                tokens=dataclasses.asdict(s.tokens()))


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
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--fit-table", action="store_true",
                   help="Markdown: one GPU, ranks 16/128/512 at 512² and 1024² (two references of the same size), "
                        "bf16/fp8 base x AdamW/8-bit AdamW x checkpointing: which fit 24, 48, 80 GiB")
    args = p.parse_args(argv)
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


def breakdown_table(result: dict) -> str:
    width = max(len(k) for k in result["parts"]) + 2
    lines = [*textwrap.wrap(result["description"], 100), "", f"{'component':<{width}}{'GiB/GPU':>9}"]
    lines += [f"{k:<{width}}{v / GIB:9.2f}" for k, v in result["parts"].items()]
    verdict = "fits" if result["fits"] else "does NOT fit"
    gpu = result["setting"]["gpu_gib"]
    lines.append(f"{'total':<{width}}{result['total'] / GIB:9.2f}  of {gpu:g} GiB: {verdict}")
    lines.append(f"(transformer {result['base_params'] / 1e9:.2f} B params, trainable {result['trainable_params'] / 1e9:.3f} B)")
    return "\n".join(lines)


def scenario_table(results: list[tuple[str, dict]]) -> str:
    width = max(len(n) for n, _ in results) + 2
    lines = [f"{'setting':<{width}}{'GiB/GPU':>9}  {'activations':>11}  verdict"]
    for name, r in results:
        act = sum(v for k, v in r["parts"].items() if "activation" in k or "working" in k or "copies" in k)
        lines.append(f"{name:<{width}}{r['total'] / GIB:9.1f}  {act / GIB:11.1f}  "
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
    if args.json:
        print(json.dumps({"scenarios": [dict(name=n, **r) for n, r in results]}, indent=2))
        return 0
    print("DualRef training memory plan: FLUX.1 Kontext-dev transformer, peak per GPU\n")
    print(breakdown_table(results[0][1]))
    print("\nVariants:\n" + scenario_table(results))
    return 0
