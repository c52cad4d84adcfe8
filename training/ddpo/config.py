"""DDPO configuration (``python -m training.ddpo``): dataclasses built by the project's one config system
(:mod:`training.config`: JSON/YAML/TOML, ``--set`` overrides, unknown keys and wrong types are errors naming the key).

One file holds the whole job: the model, the data, the frozen SFT LoRA (or the SFT config that makes
it), the DDPO LoRA and optimizer, the rollout sampler, the DDPO algorithm, the judge, the final
evaluation and the run. ``training/configs/toy_ddpo.json`` is the main job's; ``kontext_ddpo.json``
the paper's setting.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


from ..config import (
    DEFAULT_TARGET_MODULES,
    ConfigError,
    ModelConfig,
    build_config,
    check_choices,
    check_positive,
    check_trackers,
    load_into,
)
from ..sampler import SamplerConfig

ADVANTAGES = ("baseline", "per_prompt")
SAMPLER_KEYS = ("num_steps", "noise_level", "sde_fraction", "train_fraction", "shift", "guidance")


@dataclass
class DDPODataConfig:
    manifest: str = ""  # the supervised tuples (DESIGN contract 5); the main job fills in the toy world's
    cache_dir: str | None = None  # latent/text cache, shared with SFT and the benchmark (default <manifest>/.cache)
    tasks: list[str] | None = None
    split: str = "train"  # rollouts are on the supervised (training) tuples, as the paper's
    val_count: int = 0  # training tuples held out of the rollouts for the periodic ODE check (never the test split)
    skip_bad: bool = False
    max_pixels: int = 512 * 512


@dataclass
class DDPOLoRAConfig:
    sft: str | None = None  # the frozen SFT LoRA file; merged into the base weights before the DDPO LoRA is added
    rank: int = 32  # the paper's DDPO rank (Sec. 4.1)
    alpha: float | None = None  # None: alpha = rank
    save_dtype: str = "bf16"  # bf16 | fp32: dtype of dualref_ddpo.safetensors (checkpoints stay fp32)
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))


@dataclass
class DDPOOptimConfig:
    lr: float = 5e-5  # the paper's
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables


@dataclass
class RolloutConfig:
    """The SDE rollout sampler (training.sampler.SamplerConfig) and its ensemble (paper 3.3)."""

    num_steps: int = 16
    noise_level: float = 0.7
    sde_fraction: float = 0.5  # the noisiest share of the steps is stochastic; the rest are Euler steps
    train_fraction: float = 1.0  # share of the stochastic steps each sample trains on
    shift: float | None = None  # None: the model's (dualref.json sampling.shift)
    guidance: list[float] = field(default_factory=lambda: [2.0, 3.0])  # per-sample scale drawn in [low, high]
    # Small ensemble of sampling parameters: iteration i uses member i % len (each a dict of the keys
    # above that it changes, e.g. {"noise_level": 0.5}). Empty: the settings above every iteration.
    ensemble: list[dict] = field(default_factory=list)
    eval_steps: int | None = None  # deterministic (ODE) evaluation steps; None: the model's default


@dataclass
class DDPOAlgoConfig:
    iterations: int = 100
    prompts_per_iteration: int = 8  # distinct training tuples per iteration
    group_size: int = 4  # rollouts per tuple (a group shares the tuple, not the seed or guidance)
    rollout_batch: int = 8  # rollouts per forward pass, per process
    train_batch: int = 16  # samples (global) per optimizer step
    train_chunk: int = 8  # samples per forward/backward pass (memory), per process
    inner_epochs: int = 1
    clip_range: float = 1e-4  # PPO ratio clip
    advantage: str = "per_prompt"  # baseline: the paper's A = r - b; per_prompt: group-normalised
    baseline_decay: float = 0.9  # moving-average baseline b (also reported in per_prompt mode)
    stat_buffer: int = 16  # per_prompt: rewards kept per tuple
    stat_min_count: int = 4  # per_prompt: below this many, the batch's mean/std are used
    global_std: bool = False  # per_prompt: divide by the batch's reward std, not each prompt's (Flow-GRPO)
    adv_clip: float | None = 5.0
    drop_tied_groups: bool = False  # leave groups whose rewards all tie out of the update (Flow-GRPO)
    ema_decay: float = 0.0  # EMA of the DDPO LoRA (used for the held-out check and export); 0: off
    kl_weight: float = 0.0  # KL to the adapter-disabled model (= the SFT model); 0 skips its forward pass


@dataclass
class DDPOJudgeConfig:
    profile: str = "toy"  # a judges.json profile name (judge/judges.example.json), or the built-in "toy"
    mode: str | None = None  # binary | probability; None: the profile's
    config: str | None = None  # judges.json file (default: see judge/config.py)
    retries: int = 2  # resubmissions of an unjudged sample before it is dropped (never scored 0)
    workers: int | None = None  # threads for judges without their own concurrency (the toy judge)


@dataclass
class EvalConfig:
    """The final Table-2 evaluation of base / SFT / SFT+DDPO (ODE sampling, the benchmark's code)."""

    split: str = "test"
    judges: list[str] | None = None  # None: [judge.profile]
    mode: str | None = "binary"  # the paper's table; None: the profile's
    limit_per_task: int | None = None
    grid_per_task: int = 2  # test samples per task in grid.png
    batch_size: int = 16  # ODE sampling batch here and in the held-out checks (data.val_count)


@dataclass
class DDPORunConfig:
    out_dir: str = ""  # the run folder; python -m training.ddpo without it (and --out): a new runs/ddpo-<date>-s<seed>
    seed: int = 0
    layout: str | None = None  # None: the SFT LoRA's layout (a DDPO LoRA must use the layout its SFT LoRA has)
    precision: str = "fp32"  # fp32 | bf16 (frozen base in bf16, DDPO LoRA and log-probs in fp32)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    eval_every: int = 10  # ODE check on the held-out training tuples (data.val_count); 0: start and end only
    progress: bool = True
    trackers: list[str] = field(default_factory=list)  # as SFT's run.trackers: tensorboard, wandb; []: JSONL only
    process_group_timeout_min: float = 120.0  # as SFT's: the wait for the other processes at a collective


@dataclass
class DDPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DDPODataConfig = field(default_factory=DDPODataConfig)
    # With data.manifest empty: the toy world to generate into <out>/world (training.toy.world.generate_world's
    # keyword arguments, e.g. {"seed": 0, "train": 256, "test": 64, "tasks": [...]}).
    world: dict | None = None
    sft_config: str | None = None  # no lora.sft: run this SFT config first (main job), into <out>/sft
    # model.path "toy": overrides of training.toy.base's recipe (e.g. a seconds-long base for tests)
    toy_recipe: dict | None = None
    lora: DDPOLoRAConfig = field(default_factory=DDPOLoRAConfig)
    optim: DDPOOptimConfig = field(default_factory=DDPOOptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ddpo: DDPOAlgoConfig = field(default_factory=DDPOAlgoConfig)
    judge: DDPOJudgeConfig = field(default_factory=DDPOJudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: DDPORunConfig = field(default_factory=DDPORunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sampler(self, iteration: int, settings: dict | None = None):
        """The rollout SamplerConfig of ``iteration`` (its ensemble member), model defaults filled in."""
        values = {k: getattr(self.rollout, k) for k in SAMPLER_KEYS}
        if self.rollout.ensemble:
            values.update(self.rollout.ensemble[iteration % len(self.rollout.ensemble)])
        if values["shift"] is None and settings:
            values["shift"] = settings.get("sampling", {}).get("shift")
        return SamplerConfig(**values)

    def validate(self, need_sft: bool = True) -> "DDPOConfig":
        from dual_rope import METHODS  # dual_rope loads torch: config files and --help stay light without it

        d, r = self.ddpo, self.run
        check_choices({"ddpo.advantage": (d.advantage, ADVANTAGES), "run.precision": (r.precision, ("fp32", "bf16")),
                       "lora.save_dtype": (self.lora.save_dtype, ("bf16", "fp32")),
                       "run.layout": (r.layout, (None,) + tuple(METHODS)),
                       "judge.mode": (self.judge.mode, (None, "binary", "probability")),
                       "eval.mode": (self.eval.mode, (None, "binary", "probability"))})
        check_positive({"ddpo.iterations": d.iterations, "ddpo.prompts_per_iteration": d.prompts_per_iteration,
                        "ddpo.group_size": d.group_size, "ddpo.rollout_batch": d.rollout_batch,
                        "ddpo.train_batch": d.train_batch, "ddpo.train_chunk": d.train_chunk,
                        "ddpo.inner_epochs": d.inner_epochs, "ddpo.clip_range": d.clip_range,
                        "lora.rank": self.lora.rank, "optim.lr": self.optim.lr, "data.max_pixels": self.data.max_pixels})
        if d.advantage == "per_prompt" and d.group_size < 2:
            raise ConfigError("ddpo.advantage=per_prompt needs ddpo.group_size >= 2 (a group to normalise over)")
        if not 0.0 <= d.ema_decay < 1.0:
            raise ConfigError(f"ddpo.ema_decay={d.ema_decay}: use 0 (off) or a decay in (0, 1), e.g. 0.9")
        if d.kl_weight < 0 or self.judge.retries < 0 or self.data.val_count < 0:
            raise ConfigError("ddpo.kl_weight, judge.retries and data.val_count must be >= 0")
        for k, member in enumerate(self.rollout.ensemble):
            bad = set(member) - set(SAMPLER_KEYS) if isinstance(member, dict) else {"(not a mapping)"}
            if bad:
                raise ConfigError(f"rollout.ensemble[{k}] has unknown key(s) {sorted(bad)}; use {', '.join(SAMPLER_KEYS)}")
        for i in range(max(1, len(self.rollout.ensemble))):
            try:
                sampler = self.sampler(i)
            except ValueError as e:
                raise ConfigError(f"rollout (ensemble member {i}): {e}") from None
            if sampler.stochastic_steps < 1:
                raise ConfigError(f"rollout (ensemble member {i}) has no stochastic step to train on: raise "
                                  "rollout.noise_level or rollout.sde_fraction")
        check_trackers(self.run.trackers)
        if not self.data.manifest:
            raise ConfigError("data.manifest is required: the JSONL manifest whose training tuples are rolled out")
        if not (self.model.path or self.model.transformer):
            raise ConfigError("model.path (a diffusers folder, or 'toy') or model.transformer (a single file, with "
                              "model.vae / clip_l / t5) is required")
        if not self.run.out_dir:
            raise ConfigError("run.out_dir is required: the run folder (python -m training.ddpo picks one)")
        if need_sft and not self.lora.sft:
            raise ConfigError("lora.sft is required: the SFT LoRA file (python -m training.sft) that DDPO trains "
                              "on top of; or give sft_config to run SFT first")
        return self


def ddpo_config_from_dict(values: dict) -> DDPOConfig:
    return build_config(DDPOConfig, values)


def load_ddpo_config(path=None, overrides=(), base: dict | None = None) -> DDPOConfig:
    """Defaults <- ``base`` <- the file at ``path`` <- ``overrides`` (``section.key=value`` strings)."""
    return load_into(DDPOConfig, path, overrides, base)
