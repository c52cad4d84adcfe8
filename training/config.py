"""The project's one config system: dataclasses loaded from JSON, YAML or TOML, with ``--set a.b=value``
overrides, and the SFT config (``python -m training.sft``, and the toy base's pretraining, which is
the same trainer in ``full`` mode).

DDPO's config (:mod:`training.ddpo.config`) is built the same way; synthesis reads its file with
:func:`read_config_file` and raises the same :class:`ConfigError`. Unknown keys are errors that name
the key, so a typo never trains silently with a default, and every value is checked against its
field's type when the config is built: ``optim.lr: expected a number, got 'abc'`` (a number written
``5e-5``, which YAML reads as a string, is a number).
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Diffusers/peft module names of a Flux block that ComfyUI's LoRA loader maps too: attention
# projections of both streams, the MLPs, and the single blocks' fused MLP/out projections.
DEFAULT_TARGET_MODULES = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
]


class ConfigError(ValueError):
    """A bad configuration value, naming the key and what is allowed."""


BASE_QUANT = ("none", "int8", "fp8")  # train.base_quant (training.quantize)

# run.trackers: accelerate's tracker name -> the module it needs (the `track` extra installs TensorBoard)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def require_module(module: str, key: str, extra: str) -> None:
    """A ConfigError naming ``key`` when the package ``module`` that ``key`` asks for is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key} needs {module}, which is not installed: pip install {module} (or the "
                          f"package's `{extra}` extra), or change {key}")


def check_trackers(names, key: str = "run.trackers") -> None:
    """Each of ``names`` is a tracker this project logs to and is installed, else a ConfigError naming ``key``."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{key}: {name!r} is not a tracker; use {' and/or '.join(TRACKERS)} (or [] for none)")
        require_module(TRACKERS[name], key, "track")


@dataclass
class ModelConfig:
    # A diffusers folder (model_index.json), or "toy" for the cached tiny base (resolved by the entry points: training.toy.base.resolve_model_path).
    path: str | None = None
    # ComfyUI-style single files, used when ``path`` is not given.
    transformer: str | None = None
    vae: str | None = None
    clip_l: str | None = None
    t5: str | None = None
    tokenizers: str | None = None  # folder with the CLIP and T5 tokenizers (see training.models)
    toy_cache_dir: str | None = None  # where "toy" builds/keeps the tiny base


@dataclass
class DataConfig:
    manifest: str = ""
    cache_dir: str | None = None  # default: <manifest folder>/.cache
    tasks: list[str] | None = None  # None: every task in the manifest
    split: str = "train"
    # Held-out data for the validation loss and grid: by default ``val_count`` samples spread over the
    # training split (at most a tenth of it), left out of training; another split name uses that split
    # whole. Never the benchmark's test split by default: Table 2 is measured there.
    val_split: str = "train"
    val_count: int = 32
    skip_bad: bool = False
    max_pixels: int = 512 * 512  # images larger than this area are scaled down, aspect ratio kept
    batch_size: int = 1  # global: split evenly over the processes
    task_repeats: dict[str, int] = field(default_factory=dict)  # {"person_scene": 2}: twice per epoch
    preload: bool = True  # keep cached latents in memory (small data); False reads them per batch


@dataclass
class LoRAConfig:
    rank: int = 512  # the paper's setting (Sec. 4.1)
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    learn_gates: bool = False  # learn one strength per reference (saved in the LoRA metadata)
    gate_lr: float | None = None  # None: the optimizer's lr
    # dtype of the exported LoRA file (lora.safetensors): bf16 halves it (4.2 GB at rank 512) and is what
    # ComfyUI applies to a bf16 base anyway; resumable checkpoints keep the trainable weights in fp32.
    save_dtype: str = "bf16"  # bf16 | fp32


@dataclass
class OptimConfig:
    lr: float = 5e-5  # the paper's setting
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0  # 0 disables clipping
    # AdamW with 8-bit states (bitsandbytes AdamW8bit, block-wise): 2 bytes per trainable weight instead of 8
    eightbit: bool = False


@dataclass
class TrainConfig:
    mode: str = "lora"  # lora | full (full: every transformer weight, e.g. the toy base's pretraining)
    max_steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16 (bf16: frozen base in bf16, trainable weights fp32, autocast)
    gradient_checkpointing: bool = False
    # none | int8 | fp8: the frozen base's linear weights quantised (torchao, per row) under the LoRA; one
    # process, train.mode=lora, train.precision=bf16. fp8 needs compute capability 8.9+ on a GPU.
    base_quant: str = "none"
    distributed: str = "ddp"  # ddp | fsdp (FSDP2, each Flux block sharded: runtime.fsdp_mixed_precision)
    seed: int = 0
    layout: str = "diagonal"  # dual_rope method: diagonal | offset | index | uxo
    guidance: float | None = None  # None: the model's default (dualref.json train.guidance)
    sigma_sampling: str = "logit_normal"  # logit_normal | uniform
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_shift: float = 1.0  # SD3-style shift applied to sampled sigmas (1: none)
    # Optional: tokens that differ from reference 1 count 1 + edit_weight times in the loss (0: off, the
    # plain flow-matching loss, as for real Kontext). Helps a small model learn sparse edits sooner.
    edit_weight: float = 0.0
    edit_threshold: float = 0.5  # latent difference (normalised units) above which a token counts as edited
    ema_decay: float = 0.0  # EMA of the trainable weights, used for validation and export; 0: off


@dataclass
class RunConfig:
    out_dir: str = "runs/sft"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 1
    val_every: int = 200  # 0: only at the end
    val_at_start: bool = True  # validate the untrained model first (the baseline), unless resuming
    val_samples: int = 4  # held-out samples drawn in the PNG grid
    val_loss_samples: int = 32  # held-out samples in the (deterministic) validation loss
    val_steps: int | None = None  # Euler steps; None: the model's default
    progress: bool = True
    # also log metrics (and validation grids) to these, in <out_dir>/tracking: tensorboard, wandb (offline:
    # WANDB_MODE=offline). [] (default): metrics.jsonl only.
    trackers: list[str] = field(default_factory=list)
    # how long a process waits for the others at a collective (torch.distributed's own default is 10)
    process_group_timeout_min: float = 120.0


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "SFTConfig":
        from dual_rope import METHODS  # dual_rope loads torch: config files and --help stay light without it

        t = self.train
        check_choices({"train.mode": (t.mode, ("lora", "full")), "train.precision": (t.precision, ("fp32", "bf16")),
                       "lora.save_dtype": (self.lora.save_dtype, ("bf16", "fp32")),
                       "train.distributed": (t.distributed, ("ddp", "fsdp")), "train.layout": (t.layout, METHODS),
                       "train.sigma_sampling": (t.sigma_sampling, ("logit_normal", "uniform")),
                       "optim.schedule": (self.optim.schedule, ("constant", "cosine")),
                       "train.base_quant": (t.base_quant, BASE_QUANT)})
        check_positive({"train.max_steps": t.max_steps, "data.batch_size": self.data.batch_size,
                        "lora.rank": self.lora.rank, "optim.lr": self.optim.lr, "data.max_pixels": self.data.max_pixels})
        if not isinstance(self.data.task_repeats, dict):
            raise ConfigError(f"data.task_repeats must map task names to counts, got {self.data.task_repeats!r}")
        for task, times in self.data.task_repeats.items():
            if isinstance(times, bool) or not (isinstance(times, int) and times >= 1):
                raise ConfigError(f"data.task_repeats.{task} must be a whole number >= 1, got {times!r}")
        check_trackers(self.run.trackers)
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={t.ema_decay}: use 0 (off) or a decay in (0, 1), e.g. 0.99")
        if t.ema_decay and t.distributed == "fsdp":
            raise ConfigError("train.ema_decay needs the whole trainable weights on every process: use "
                              "train.distributed=ddp with it, or train.ema_decay=0 under fsdp")
        if self.train.base_quant != "none":
            need = {"train.mode": (self.train.mode, "lora"), "train.precision": (self.train.precision, "bf16"),
                    "train.distributed": (self.train.distributed, "ddp")}
            for key, (value, wanted) in need.items():
                if value != wanted:
                    raise ConfigError(f"train.base_quant={self.train.base_quant} quantises the frozen base under a "
                                      f"bf16 LoRA on one GPU: it needs {key}={wanted}, not {value}")
            require_module("torchao", "train.base_quant", "memory")
        if self.optim.eightbit:
            require_module("bitsandbytes", "optim.eightbit", "memory")
        if not self.data.manifest:
            raise ConfigError("data.manifest is required: the JSONL manifest to train on")
        if not (self.model.path or self.model.transformer):
            raise ConfigError("model.path (a diffusers folder, or 'toy') or model.transformer (a single "
                              "file, with model.vae / clip_l / t5) is required")
        return self


def check_choices(choices: dict) -> None:
    """``{"section.key": (value, allowed values)}``: a ConfigError naming the first key whose value is not allowed."""
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def check_positive(values: dict) -> None:
    """``{"section.key": value}``: a ConfigError naming the first value that is not > 0."""
    for key, value in values.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")


def _expected(hint) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a mapping"}
    return names.get(typing.get_origin(hint) or hint, str(hint))


def check_value(value, hint, name: str):
    """``value`` as the field's type ``hint`` says, or a ConfigError naming ``name`` (e.g. ``optim.lr``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(value, inner[0], name) if len(inner) == 1 else value
    if hint is typing.Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 5e-5 (no dot) as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a path or name that happens to look like a number
    elif (origin or hint) is list:
        if isinstance(value, (list, tuple)):
            item = args[0] if args else typing.Any
            return [check_value(v, item, f"{name}[{k}]") for k, v in enumerate(value)]
    elif (origin or hint) is dict:
        if isinstance(value, dict):
            item = args[1] if len(args) == 2 else typing.Any
            return {k: check_value(v, item, f"{name}.{k}") for k, v in value.items()}
    else:
        return value
    raise ConfigError(f"{name}: expected {_expected(hint)}, got {value!r}")


def at_least(minimum, kind=int):
    """An argparse ``type`` for a number >= ``minimum``: a bad value is an argparse error, which
    names the flag (``argument --concurrency: 0 is not a whole number >= 1``), exit status 2."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_expected(kind)} >= {minimum:g}")
        return value

    parse.__name__ = kind.__name__  # argparse's own messages name the type
    return parse


def build_config(cls, values: dict, prefix: str = ""):
    """A ``cls`` dataclass from plain data: unknown keys and wrongly typed values are ConfigErrors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key.startswith("_"):  # "_comment" and the like: notes for people
            continue
        if key not in known:
            raise ConfigError(f"unknown config key {name!r}; known here: {', '.join(sorted(known))}")
        default = known[key].default_factory() if known[key].default_factory is not dataclasses.MISSING \
            else known[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = build_config(type(default), value, f"{name}.")
        else:
            kwargs[key] = check_value(value, hints[key], name)
    return cls(**kwargs)


def config_from_dict(values: dict) -> SFTConfig:
    return build_config(SFTConfig, values)


def read_config_file(path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            values = tomllib.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); values are JSON, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides) -> dict:
    values = json.loads(json.dumps(values))  # deep copy of plain data
    for text in overrides or ():
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return values


def load_into(cls, path=None, overrides=(), base: dict | None = None):
    """A ``cls`` config: defaults <- ``base`` <- the file at ``path`` <- ``overrides`` (``section.key=value``)."""
    values = json.loads(json.dumps(base or {}))
    if path is not None:
        merge_into(values, read_config_file(path))
    return build_config(cls, apply_overrides(values, overrides))


def load_config(path=None, overrides=(), base: dict | None = None) -> SFTConfig:
    """The SFT config: defaults <- ``base`` <- the file at ``path`` <- ``overrides``."""
    return load_into(SFTConfig, path, overrides, base)


def merge_into(into: dict, other: dict) -> None:
    """Merge ``other`` into ``into``, section by section (a file's values over the defaults)."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_into(into[key], value)
        else:
            into[key] = value
