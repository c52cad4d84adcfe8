"""The one training loop of the project: LoRA SFT (``python -m training.sft``) and full-parameter
training (the toy base's pretraining), on one process or many (``accelerate launch``).

Read top to bottom, :func:`train` does: data (checked manifest -> latent/text cache -> shape
buckets), model (Kontext transformer, LoRA or all weights, optional learnable gates), optimizer,
resume, then the loop (batch -> flow-matching loss on target tokens -> step), with metrics JSONL,
tqdm, atomic checkpoints, validation loss and image grids, and finally the LoRA file (or the full
transformer) in the run folder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import interrupts
from ..cache import CachedDataset, EmbeddingCache, encode_shared
from ..checkpoint import (
    TrainState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from ..config import ConfigError, SFTConfig
from ..data import BucketBatches, hold_out, load_manifest, write_skipped
from ..ema import TrainableEMA
from ..evaluation import sampler_config, validation_grid, validation_loss
from ..files import cache_dir_for, file_digest
from ..flow import FlowMatchingModel, draw_sigmas_and_noise, edit_weights
from ..lora_io import save_lora
from ..models import PRECISIONS, load_model
from ..quantize import quantize_base
from ..runtime import MetricsLog, make_accelerator, spread

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None  # mean training loss of the last logged window
    val_loss: float | None
    lora_path: Path | None  # mode "lora"
    transformer_dir: Path | None  # mode "full"
    metrics_path: Path


def _cache_dir(cfg: SFTConfig) -> Path:
    return cache_dir_for(cfg.data.manifest, cfg.data.cache_dir)


def read_data(cfg: SFTConfig) -> tuple[list, list, list]:
    """The checked manifest records ``(training, held-out, skipped lines)``: read before anything is written."""
    skipped: list = []
    common = dict(skip_bad=cfg.data.skip_bad, skipped=skipped, tasks=cfg.data.tasks)
    records = load_manifest(cfg.data.manifest, split=cfg.data.split, **common)
    if cfg.data.val_split == cfg.data.split:  # the default: a held-out slice of the training split
        records, val_records = hold_out(records, cfg.data.val_count)
        log.info("validation: %d of the %d %r samples held out of training (data.val_count)",
                 len(val_records), len(records) + len(val_records), cfg.data.split)
    else:
        try:
            val_records = load_manifest(cfg.data.manifest, split=cfg.data.val_split, **common) if cfg.data.val_split else []
        except ValueError as e:  # no held-out samples: train without validation rather than fail
            log.warning("no validation samples (%s)", str(e).splitlines()[0])
            val_records = []
    task_repeats(cfg, [r.sample.task for r in records])  # a task_repeats typo fails now, not after the cache
    return records, val_records, skipped


def prepare_data(cfg: SFTConfig, bundle, accelerator, run_dir: Path, records, val_records, skipped):
    """Checked records -> cache -> (train dataset, val dataset or None); every skipped line -> skipped.jsonl."""
    cache = EmbeddingCache.for_bundle(_cache_dir(cfg), bundle)
    args = dict(max_pixels=cfg.data.max_pixels, skip_bad=cfg.data.skip_bad, manifest=cfg.data.manifest)
    datasets = []
    # every process encodes its share of what the cache lacks, then all read it (no rank waits on one)
    sets = ((records, cfg.data.batch_size // accelerator.num_processes), (val_records, None))
    for entries, stats in encode_shared(sets, bundle, cache, accelerator, progress=cfg.run.progress, **args):
        datasets.append(CachedDataset(entries, cache, preload=cfg.data.preload) if entries else None)
        skipped = skipped + list(stats.failed or [])
        if accelerator.is_main_process:
            log.info("cache %s: images %d cached + %d encoded, texts %d cached + %d encoded", cache.root,
                     stats.images_cached, stats.images_computed, stats.texts_cached, stats.texts_computed)
    if accelerator.is_main_process:
        write_skipped(run_dir, cfg.data.manifest, skipped)
    bundle.release("text_encoder", "text_encoder_2")
    return datasets[0], datasets[1]


def task_repeats(cfg: SFTConfig, tasks: list[str]) -> list[int]:
    """Each training sample's count per epoch (``data.task_repeats``; 1 for tasks it does not name)."""
    unknown = sorted(set(cfg.data.task_repeats) - set(tasks))
    if unknown:
        raise ConfigError(f"data.task_repeats names {', '.join(unknown)}, which no training sample has; "
                          f"the tasks here are {', '.join(sorted(set(tasks)))}")
    return [cfg.data.task_repeats.get(task, 1) for task in tasks]


def build_model(cfg: SFTConfig, bundle, references: int = 2) -> FlowMatchingModel:
    transformer = bundle.transformer
    guidance = cfg.train.guidance if cfg.train.guidance is not None else bundle.settings.get("train", {}).get("guidance", 1.0)
    if cfg.train.mode == "full":
        transformer.float().requires_grad_(True)
    else:
        from peft import LoraConfig

        transformer.requires_grad_(False)
        if cfg.train.precision == "bf16":
            transformer.to(torch.bfloat16)
        lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha or cfg.lora.rank, lora_dropout=cfg.lora.dropout,
                          init_lora_weights=True, target_modules=list(cfg.lora.target_modules))
        transformer.add_adapter(lora)
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights in fp32 even over a bf16 base
        if cfg.train.base_quant != "none":
            count = quantize_base(transformer, cfg.train.base_quant)
            log.info("frozen base: %d linear layers quantised to %s", count, cfg.train.base_quant)
    if cfg.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
    return FlowMatchingModel(transformer, cfg.train.layout, guidance, cfg.lora.learn_gates, references=references,
                             autocast=autocast)


def build_optimizer(cfg: SFTConfig, model: FlowMatchingModel):
    main = [p for n, p in model.named_parameters() if p.requires_grad and n != "log_gates"]
    groups = [{"params": main}]
    if model.log_gates is not None:
        groups.append({"params": [model.log_gates], "lr": cfg.lora.gate_lr or cfg.optim.lr, "weight_decay": 0.0})
    if cfg.optim.eightbit:  # block-wise 8-bit states; tensors under 4096 weights (the gates) keep 32-bit ones
        from bitsandbytes.optim import AdamW8bit as adamw
    else:
        adamw = torch.optim.AdamW
    optimizer = adamw(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                      weight_decay=cfg.optim.weight_decay)
    warmup, total, cosine = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.schedule == "cosine"

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cosine:
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(cfg: SFTConfig, *, bundle=None, accelerator=None, resume=None, on_step=None) -> TrainResult:
    """Train as ``cfg`` says; ``resume`` = True/"latest"/a checkpoint folder; ``on_step(step)`` runs after
    every step (tests interrupt a run from it with ``KeyboardInterrupt``, which saves a checkpoint)."""
    from tqdm import tqdm

    cfg.validate()
    run_dir = Path(cfg.run.out_dir)
    accelerator = accelerator or make_accelerator(cfg.train.distributed, cfg.run.trackers, run_dir,
                                                  cfg.run.process_group_timeout_min)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.train.base_quant != "none" and world > 1:
        raise ConfigError(f"train.base_quant is a memory saver for one GPU; with {world} "
                          "processes use train.base_quant=none (or train.distributed=fsdp to shard a bf16 base)")
    if cfg.data.batch_size % world:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the {world} processes")
    local = cfg.data.batch_size // world
    checkpoint = find_checkpoint(resume, run_dir)
    torch.manual_seed(cfg.train.seed)
    if bundle is None:
        # full mode trains every weight in fp32 (FlowMatchingModel's autocast does the bf16 compute)
        precision = "fp32" if cfg.train.mode == "full" else cfg.train.precision
        bundle = load_model(cfg.model, device=accelerator.device, precision=precision)

    # -- data -----------------------------------------------------------------------------------
    records, val_records, skipped = read_data(cfg)
    # Everything above only reads: a run that fails its checks leaves an existing run folder as it was.
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    dataset, val_dataset = prepare_data(cfg, bundle, accelerator, run_dir, records, val_records, skipped)
    tasks = [e.record.sample.task for e in dataset.entries]
    batches = BucketBatches(dataset.bucket_keys(), cfg.data.batch_size, cfg.train.seed, task_repeats(cfg, tasks),
                            processes=world)
    log.info("data: %s", batches.describe())

    # -- model, optimizer, resume ---------------------------------------------------------------
    base_fingerprint = bundle.base_fingerprint()
    # one learnable gate per reference: two, or three when the data has three-reference samples
    model = build_model(cfg, bundle, max([2] + [len(e.ref_keys) for e in dataset.entries]))
    optimizer, scheduler = build_optimizer(cfg, model)
    state = TrainState()
    fsdp = cfg.train.distributed == "fsdp"  # sharded weights: accelerate saves/loads the state
    ema = TrainableEMA([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                       cfg.train.ema_decay) if cfg.train.ema_decay else None
    if checkpoint is not None and not fsdp:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        if ema is not None:
            ema.load(checkpoint)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if checkpoint is not None and fsdp:
        state = load_sharded_checkpoint(accelerator, checkpoint, scheduler)
    if checkpoint is not None:
        log.info("resumed from %s (step %d, epoch %d, batch %d)", checkpoint, state.step, state.epoch, state.position)
    device = accelerator.device
    metrics = MetricsLog(run_dir / "metrics.jsonl", main, state.step if checkpoint else None, accelerator,
                         cfg.run.trackers, project="dualref-sft", config=cfg.to_dict())
    val_indices = spread(len(val_dataset), cfg.run.val_loss_samples) if val_dataset else []
    sampling = sampler_config(bundle.settings, cfg.run.val_steps, model.guidance)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def validate(step: int) -> float | None:
        if not val_indices:
            return None
        with ema.swapped() if ema else contextlib.nullcontext():  # the weights that will be exported
            return _validate(step)

    def _validate(step: int) -> float:
        value = validation_loss(model, val_dataset, val_indices, cfg.train.seed, device=device)
        if main:
            metrics.write(step=step, val_loss=value)
        if cfg.run.val_samples and (main or fsdp):  # FSDP: every rank's shards take part in the sampling
            grid = [val_indices[i] for i in spread(len(val_indices), cfg.run.val_samples)]
            png = run_dir / "val" / f"step_{step:07d}.png"
            validation_grid(bundle, model, val_dataset, grid, sampling, png if main else None, cfg.train.seed)
            if main:
                metrics.image("validation grid", png, step)
        return value

    def checkpoint_now(barrier: bool = True) -> None:
        if fsdp:
            save_sharded_checkpoint(accelerator, run_dir, state, scheduler, cfg.to_dict())
        elif main:
            save_checkpoint(run_dir, state, model, optimizer, scheduler, cfg.to_dict(), cfg.run.keep_checkpoints,
                            extra=ema.save if ema else None)
        if barrier:
            accelerator.wait_for_everyone()

    # -- the loop -------------------------------------------------------------------------------
    if checkpoint is None and cfg.run.val_at_start:
        validate(0)
    stream = batches.iterate(state.epoch, state.position)
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, desc=f"{cfg.train.mode} training", unit="step",
               disable=not (main and cfg.run.progress), mininterval=1.0)
    window, last_loss, val_loss, saved_step = [], None, None, state.step
    try:
        while state.step < cfg.train.max_steps:
            start = time.perf_counter()
            epoch, index, global_batch = next(stream)
            mine = global_batch[rank * local:(rank + 1) * local]
            batch = dataset.batch(mine)
            target = batch.target.to(device)
            slots = range(rank * local, (rank + 1) * local)
            sigma, noise = draw_sigmas_and_noise(target.shape[1:], cfg.train.seed, state.step, slots,
                                                 cfg.train.sigma_sampling, cfg.train.logit_mean,
                                                 cfg.train.logit_std, cfg.train.sigma_shift)
            refs = [r.to(device) for r in batch.refs]
            data_time = time.perf_counter() - start
            weights = edit_weights(target, refs[0], cfg.train.edit_weight, cfg.train.edit_threshold)
            losses = wrapped(target, refs, batch.prompt_embeds.to(device), batch.pooled.to(device),
                             sigma.to(device), noise.to(device), weights)
            loss = losses.mean()
            accelerator.backward(loss)
            if cfg.optim.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(trainable, cfg.optim.grad_clip))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in trainable if p.grad is not None])))
            backward_time = time.perf_counter() - start - data_time
            lr = scheduler.get_last_lr()[0]
            with interrupts.deferred():  # the weights and the step counter move together
                optimizer.step()
                if ema is not None:
                    ema.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step, state.epoch, state.position = state.step + 1, epoch, index + 1
                state.samples += cfg.data.batch_size
            step_time = time.perf_counter() - start
            mean_loss = float(accelerator.reduce(loss.detach(), "mean"))
            window.append(mean_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if state.step % cfg.run.log_every == 0 or state.step == cfg.train.max_steps:
                last_loss = sum(window) / len(window)  # mean over the steps since the last line
                metrics.write(step=state.step, epoch=epoch, loss=last_loss, lr=lr, grad_norm=grad_norm,
                              step_time=step_time, data_time=data_time, forward_backward_time=backward_time,
                              samples_per_s=cfg.data.batch_size / step_time)
                window = []
            if cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0:
                checkpoint_now()
                saved_step = state.step
            if cfg.run.val_every and state.step % cfg.run.val_every == 0 and state.step != cfg.train.max_steps:
                val_loss = validate(state.step)
            if on_step is not None:
                on_step(state.step)
    except interrupts.STOPPED as stop:
        if not interrupts.counts_as_interrupt(stop):
            raise
        if state.step != saved_step and not (fsdp and world > 1):
            # DDP keeps every process's weights and optimizer identical after each step, so the main
            # process saves alone, without a barrier: the others may already be gone. (FSDP shards
            # need every process: there a rerun resumes from the last periodic checkpoint.)
            if main:
                log.warning("interrupted at step %d (%s): saving a checkpoint to resume from", state.step,
                            type(stop).__name__)
            with interrupts.deferred():  # torchrun forwards a second SIGINT: let the save finish first
                checkpoint_now(barrier=False)
        bar.close()
        metrics.close()
        raise
    bar.close()
    if state.step != saved_step or not list_checkpoints(run_dir):
        checkpoint_now()
    val_loss = validate(state.step)
    full_state = accelerator.get_state_dict(wrapped) if fsdp else None  # a collective: every rank calls it
    with ema.swapped() if ema else contextlib.nullcontext():
        lora_path, transformer_dir = export(cfg, model, run_dir, base_fingerprint, main, state, world, len(dataset),
                                            full_state)
    metrics.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, state.step, last_loss, val_loss, lora_path, transformer_dir,
                       run_dir / "metrics.jsonl")


def export(cfg: SFTConfig, model: FlowMatchingModel, run_dir: Path, base_fingerprint: str, main: bool,
           state: TrainState, world_size: int, dataset_size: int, full_state: dict | None = None):
    """The run's product: ``lora.safetensors`` (DESIGN contract 4) or a full ``transformer/`` folder."""
    if not main:
        return None, None
    weights = None if full_state is None else {k.removeprefix("transformer."): v for k, v in full_state.items()
                                               if k.startswith("transformer.")}
    if cfg.train.mode == "full":
        out = run_dir / "transformer"
        model.transformer.save_pretrained(str(out), safe_serialization=True, state_dict=weights)
        return None, out

    path = run_dir / "lora.safetensors"
    train_info = {  # typed facts only (lora_meta.TRAIN_FIELDS): no paths or free text in a shared file
        "steps": state.step, "epochs": round(state.samples / max(1, dataset_size), 3),
        "batch_size": cfg.data.batch_size, "world_size": world_size, "seed": cfg.train.seed,
        "learning_rate": float(cfg.optim.lr), "resolution": int(math.isqrt(cfg.data.max_pixels)),
        "references": 2, "precision": cfg.train.precision,
        "dataset_hash": file_digest(cfg.data.manifest)}
    gates = model.gates() if full_state is None or "log_gates" not in full_state else \
        [float(g) for g in full_state["log_gates"].exp()]
    lora = model.transformer if weights is None else {k: v for k, v in weights.items() if "lora_" in k}
    save_lora(path, lora, {"layout": cfg.train.layout, "stage": "sft", "base_fingerprint": base_fingerprint,
                           "gates": tuple(gates) if gates else None, "train": train_info,
                           "rank": cfg.lora.rank, "alpha": float(cfg.lora.alpha or cfg.lora.rank)},
              dtype=PRECISIONS[cfg.lora.save_dtype])
    return path, None
