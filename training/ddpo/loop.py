"""DDPO alignment with the judge (paper Sec. 3.3), and the project's main job.

    python -m training.ddpo                                   # main job: toy world -> base -> SFT -> DDPO -> eval
    python -m training.ddpo --out runs/toy/mine               # rerun the same command to resume it
    python -m training.ddpo --config my_ddpo.json --set ddpo.iterations=200
    accelerate launch --num_processes 8 -m training.ddpo --config training/configs/kontext_ddpo.json

(The command line and the stages are in training/ddpo/pipeline.py.) Read top to bottom, :func:`train_ddpo`
does: data (the training tuples from the shared latent/text cache), model (base + frozen SFT LoRA
merged + a fresh DDPO LoRA), judge, resume, then per iteration:

1. plan: ``prompts_per_iteration`` tuples x ``group_size`` rollouts, each with its own seed and guidance;
2. sample: SDE rollouts with per-step log-probs; every decoded batch goes to the judge at once while
   the next batch is sampled; unjudged samples are retried, then dropped (never scored 0);
3. advantages: rewards gathered from every process, then the paper's ``A = r - b`` (moving-average
   baseline) or per-tuple group normalisation, identically on every process;
4. update: PPO-clipped policy gradient on the stochastic (high-noise) steps, optional KL to the
   adapter-disabled (SFT) model, gradients summed across processes, one optimizer step per minibatch;
5. log, checkpoint, and every ``eval_every`` iterations an ODE check on held-out training tuples.

At the end the DDPO LoRA is written as ``dualref_ddpo.safetensors`` (DESIGN contract 4, stage ddpo).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from judge.config import load_profiles
from judge.pool import JudgePool, collect
from judge.registry import load_judge
from judge.verdict import QUESTIONS, Unjudged

from .. import interrupts
from ..cache import CachedDataset, EmbeddingCache, encode_shared
from ..config import ConfigError
from ..data import load_manifest, write_skipped
from ..ema import TrainableEMA
from ..evaluation import by_bucket, sample_images, sampler_config
from ..files import cache_dir_for
from ..lora_io import merge_lora
from ..models import PRECISIONS, load_model
from ..runtime import MetricsLog, gather_objects, make_accelerator, spread, tracking_dir
from . import state as ddpo_state
from .config import DDPOConfig
from .objective import PerPromptStatTracker, RewardBaseline
from .policy import Policy
from .report import reward_curve
from .rollout import JUDGED, REWARD, REWARD_COLUMNS, RequestMaker, iteration_slots, reward_table, sample_and_judge
from .update import compute_advantages, policy_update

log = logging.getLogger(__name__)

DDPO_LORA = "dualref_ddpo.safetensors"


@dataclass
class DDPOResult:
    run_dir: Path
    iterations: int
    lora_path: Path | None
    metrics_path: Path
    eval_reward: float | None  # last ODE check on the held-out training tuples


def read_records(cfg: DDPOConfig) -> tuple[list, list]:
    """The checked manifest records and the skipped lines: read before anything is written."""
    d, skipped = cfg.data, []
    records = load_manifest(d.manifest, split=d.split, tasks=d.tasks, skip_bad=d.skip_bad, skipped=skipped,
                            require_target=False)  # DDPO needs references and instructions, not targets
    return records, skipped


def prepare_data(cfg: DDPOConfig, bundle, accelerator, run_dir: Path, records, skipped):
    """The training tuples as a cached dataset; ``(dataset, rollout indices, held-out check indices)``."""
    d = cfg.data
    root = cache_dir_for(d.manifest, d.cache_dir)
    cache = EmbeddingCache.for_bundle(root, bundle)
    # every process encodes its share of what the cache lacks, then all read it (no rank waits on one)
    ((entries, stats),) = encode_shared([(records, None)], bundle, cache, accelerator, progress=cfg.run.progress,
                                        max_pixels=d.max_pixels, skip_bad=d.skip_bad, manifest=d.manifest)
    if accelerator.is_main_process:
        write_skipped(run_dir, d.manifest, skipped + list(stats.failed or []))
    bundle.release("text_encoder", "text_encoder_2")
    dataset = CachedDataset(entries, cache)
    held_out = spread(len(dataset), d.val_count) if d.val_count else []
    pool = [i for i in range(len(dataset)) if i not in set(held_out)]
    if cfg.ddpo.prompts_per_iteration > len(pool):
        raise ConfigError(f"ddpo.prompts_per_iteration={cfg.ddpo.prompts_per_iteration} exceeds the {len(pool)} "
                          f"training tuples of {d.manifest} left for rollouts")
    return dataset, pool, held_out


def rank_share(profile, world: int) -> dict:
    """This process's share of a judge profile's limits, so that ``world`` processes together keep to
    the profile's ``rpm`` and ``concurrency`` instead of each sending that much."""
    if profile is None or world == 1 or profile.kind not in ("openai",):
        return {}
    share = {"concurrency": max(1, int(profile.concurrency) // world)}
    if profile.rpm is not None:
        share["rpm"] = float(profile.rpm) / world
    return share


def build_policy(cfg: DDPOConfig, bundle):
    """Base + merged SFT LoRA + trainable DDPO LoRA: ``(policy, trainable params, base fingerprint)``."""
    transformer = bundle.transformer
    base_fingerprint = bundle.base_fingerprint()  # of the base itself, before the SFT LoRA is merged in
    sft = merge_lora(transformer, cfg.lora.sft)
    layout = cfg.run.layout or (sft.layout if sft is not None else "diagonal")  # checked by check_sft_lora
    gates = list(sft.gates) if sft is not None and sft.gates else None
    if cfg.run.precision == "bf16":
        transformer.to(torch.bfloat16)
    params = ddpo_state.add_ddpo_adapter(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules,
                                         cfg.run.seed)
    if cfg.run.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    autocast = torch.bfloat16 if cfg.run.precision == "bf16" else None
    return Policy(transformer, layout, gates, bundle.device, autocast), params, base_fingerprint


@torch.no_grad()
def evaluate_held_out(policy: Policy, bundle, dataset, indices, judge_pool, make_request, config, seed: int,
                      accelerator=None, batch_size: int = 16) -> dict:
    """ODE samples of the held-out training tuples, judged: the collapse / reward-hacking check.

    Each process samples and judges its share of the batches (:func:`sample_images`'s ``part``); the
    answers are gathered in the order one process would have them, so the means are the same; with
    several processes ``eval_per_rank`` says how many samples each one did."""
    policy.transformer.eval()
    part = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine, futures = [], []
    for chunk, images in sample_images(bundle, policy.transformer, dataset, indices, policy.layout, config, seed,
                                       policy.gates, batch_size=batch_size, part=part):
        mine.extend(chunk)
        futures.extend(judge_pool.submit(make_request(i, image, f"eval-{i}")) for i, image in zip(chunk, images))
    # unjudged: None (left out of the means, counted)
    answers = [(i, None if isinstance(v, Unjudged) else {q: getattr(v, q) for q in ("reward", *QUESTIONS)})
               for i, v in zip(mine, collect(futures))]
    extra = {}
    if part[1] > 1:
        every = dict(gather_objects(accelerator, answers))
        answers = [(i, every[i]) for chunk in by_bucket(dataset, indices, batch_size) for i in chunk]
        extra["eval_per_rank"] = gather_objects(accelerator, [len(mine)])
    verdicts = [v for _, v in answers if v is not None]
    if not verdicts:
        return {"eval_unjudged": len(answers), **extra}
    out = {"eval_reward": sum(v["reward"] for v in verdicts) / len(verdicts), "eval_n": len(verdicts),
           "eval_unjudged": len(answers) - len(verdicts), **extra}
    out.update({f"eval_{q}": sum(v[q] for v in verdicts) / len(verdicts) for q in QUESTIONS})
    return out


def train_ddpo(cfg: DDPOConfig, *, bundle=None, accelerator=None, judge=None, on_iteration=None,
               overlap: bool = True, sft_shown=None) -> DDPOResult:
    """Run DDPO as ``cfg`` says, resuming from the run folder's newest checkpoint when there is one.
    ``on_iteration(i)`` runs after iteration i (tests interrupt from it); ``judge`` replaces the profile's;
    ``sft_shown`` is the SFT LoRA's name in errors (the user's file when ``lora.sft`` is a run folder's copy)."""
    from tqdm import tqdm

    cfg.validate()
    run_dir = Path(cfg.run.out_dir)
    accelerator = accelerator or make_accelerator(trackers=cfg.run.trackers, run_dir=run_dir,
                                                  timeout_min=cfg.run.process_group_timeout_min)
    main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    if bundle is None:
        bundle = load_model(cfg.model, device=device, precision=cfg.run.precision)
    # Before anything is written or spent: an SFT LoRA of another base fails here, not after the budget.
    ddpo_state.check_sft_lora(cfg.lora.sft, bundle.base_fingerprint(), cfg.run.layout, sft_shown)
    records, skipped = read_records(cfg)
    owns_judge = judge is None  # a judge we load we close (HTTP sessions); a given one stays open
    if judge is None:  # an unknown profile or an unset key fails here too
        overrides = {"mode": cfg.judge.mode} if cfg.judge.mode else {}
        overrides.update(rank_share(load_profiles(cfg.judge.config).get(cfg.judge.profile), world))
        judge = load_judge(cfg.judge.profile, config=cfg.judge.config, **overrides)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ddpo_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    accelerator.wait_for_everyone()

    # -- data, policy ---------------------------------------------------------------------------
    dataset, pool, held_out = prepare_data(cfg, bundle, accelerator, run_dir, records, skipped)
    keys = [e.record.sample.id for e in dataset.entries]
    policy, params, base_fingerprint = build_policy(cfg, bundle)
    transformer = policy.transformer
    ema = TrainableEMA([(n, p) for n, p in transformer.named_parameters() if p.requires_grad],
                       cfg.ddpo.ema_decay) if cfg.ddpo.ema_decay else None
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = ddpo_state.constant_schedule(optimizer)
    baseline = RewardBaseline(cfg.ddpo.baseline_decay)
    tracker = PerPromptStatTracker(cfg.ddpo.stat_buffer, cfg.ddpo.stat_min_count, global_std=cfg.ddpo.global_std)
    judge_pool = JudgePool(judge, workers=cfg.judge.workers)
    make_request = RequestMaker(dataset)
    eval_config = sampler_config(bundle.settings, cfg.rollout.eval_steps)

    # -- resume -----------------------------------------------------------------------------------
    checkpoint, done = ddpo_state.latest(run_dir), 0
    if checkpoint is not None:
        done, algo = ddpo_state.restore(checkpoint, transformer, optimizer, scheduler, ema)
        baseline.load_state_dict(algo["baseline"])
        tracker.load_state_dict(algo["tracker"])
        log.info("resumed DDPO from %s (%d iterations done)", checkpoint, done)
    metrics = MetricsLog(run_dir / "metrics.jsonl", main, done if checkpoint is not None else None, accelerator,
                         cfg.run.trackers, project="dualref-ddpo", config=cfg.to_dict())

    def held_out_check() -> dict:
        values = {}
        if held_out:  # every process samples and judges its share
            with ema.swapped() if ema else contextlib.nullcontext():  # the weights that will be exported
                values = evaluate_held_out(policy, bundle, dataset, held_out, judge_pool, make_request,
                                           eval_config, cfg.run.seed, accelerator, cfg.eval.batch_size)
        accelerator.wait_for_everyone()
        return values

    def checkpoint_now(iteration: int, barrier: bool = True) -> None:
        if main:
            ddpo_state.save(run_dir, iteration, transformer, optimizer, scheduler,
                            {"baseline": baseline.state_dict(), "tracker": tracker.state_dict()}, cfg.to_dict(),
                            cfg.run.keep_checkpoints, ema)
        if barrier:
            accelerator.wait_for_everyone()

    # -- the loop ---------------------------------------------------------------------------------
    last_eval = None
    if checkpoint is None:
        start_check = held_out_check()
        if start_check:
            metrics.write(step=0, **start_check)
            last_eval = start_check.get("eval_reward")
    bar = tqdm(total=cfg.ddpo.iterations, initial=done, desc="DDPO", unit="it", mininterval=1.0,
               disable=not (main and cfg.run.progress))
    # Interrupt safety: ``before`` holds the weights, optimizer and advantage statistics as they were
    # after iteration ``completed``; it is taken right before the first of them changes (the baseline,
    # then the update). A Ctrl-C in the middle of an iteration puts it back and checkpoints iteration
    # ``completed``, so a rerun repeats the interrupted iteration exactly (its draws are keyed, not stateful).
    completed, saved, before = done, done, None
    try:
        for iteration in range(done, cfg.ddpo.iterations):
            begin = time.perf_counter()
            sampler = cfg.sampler(iteration, bundle.settings)
            slots = iteration_slots(pool, cfg.ddpo.prompts_per_iteration, cfg.ddpo.group_size, sampler.guidance,
                                   cfg.run.seed, iteration)
            mine = [s for s in slots if s.index % world == accelerator.process_index]
            transformer.eval()
            rollouts = sample_and_judge(policy, bundle, dataset, mine, sampler, judge_pool, make_request,
                                        batch_size=cfg.ddpo.rollout_batch, retries=cfg.judge.retries,
                                        iteration=iteration, overlap=overlap)
            table = accelerator.reduce(reward_table(rollouts, len(slots)), "sum")  # each row from its owner
            retries = int(accelerator.reduce(torch.tensor([rollouts.retries]), "sum"))
            if main:  # the only process that saves on Ctrl-C
                before = ddpo_state.snapshot(params, optimizer, baseline, tracker, ema)
            advantages, adv_stats = compute_advantages(table, slots, keys, baseline, tracker, cfg)
            if world > 1:  # every process computed these from the same gathered table: they must agree
                mine_state = torch.tensor([[baseline.value or 0.0, float(advantages.nan_to_num().sum())]],
                                          dtype=torch.float64, device=device)
                every = accelerator.gather(mine_state)
                adv_stats["sync_error"] = float((every - every[0]).abs().max())
            trained = time.perf_counter()
            update = policy_update(cfg, policy, params, optimizer, accelerator, dataset, rollouts, slots,
                                   advantages, iteration)
            if ema is not None:
                ema.step()
            row = _iteration_row(iteration, table, slots, keys, dataset, sampler, retries, rollouts, adv_stats,
                                 update, trained - begin, time.perf_counter() - trained)
            if rollouts.unjudged_reasons:
                log.warning("iteration %d: %d sample(s) unjudged after %d retries, dropped (e.g. %s)", iteration + 1,
                            len(rollouts.unjudged_reasons), cfg.judge.retries, rollouts.unjudged_reasons[0])
            completed, before = iteration + 1, None  # the state is now iteration ``completed``'s
            last = completed == cfg.ddpo.iterations
            if cfg.run.checkpoint_every and (completed % cfg.run.checkpoint_every == 0 or last):
                checkpoint_now(completed)
                saved = completed
            if held_out and (last or (cfg.run.eval_every and completed % cfg.run.eval_every == 0)):
                row.update(held_out_check())
                last_eval = row.get("eval_reward", last_eval)
            metrics.write(**row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}" if row["reward"] is not None else "-",
                            kl=f"{update['approx_kl']:.1e}", clip=f"{update['clip_fraction']:.2f}", refresh=False)
            if on_iteration is not None:
                on_iteration(completed)
    except interrupts.STOPPED as stop:
        if not interrupts.counts_as_interrupt(stop):
            raise
        bar.close()
        try:
            with interrupts.deferred():  # torchrun forwards a second SIGINT: put back and save first
                if before is not None:
                    ddpo_state.restore_snapshot(before, params, optimizer, baseline, tracker, ema)
                if completed != saved and main:
                    # Every process holds the same weights, optimizer and baseline after each completed
                    # iteration (DDP), so the main process saves alone, without a barrier: the others
                    # may already be gone.
                    log.warning("interrupted after iteration %d (%s): saving a checkpoint to resume from", completed,
                                type(stop).__name__)
                    checkpoint_now(completed, barrier=False)
        finally:
            judge_pool.close(close_judge=owns_judge)
            metrics.close()
        raise
    bar.close()
    if saved != cfg.ddpo.iterations:
        checkpoint_now(cfg.ddpo.iterations)
    lora_path = None
    if main:
        lora_path = run_dir / DDPO_LORA
        with ema.swapped() if ema else contextlib.nullcontext():
            ddpo_state.export_ddpo_lora(
                lora_path, transformer, layout=policy.layout, base_fingerprint=base_fingerprint, sft_path=cfg.lora.sft,
                rank=cfg.lora.rank, alpha=cfg.lora.alpha, iterations=cfg.ddpo.iterations,
                samples_per_iteration=cfg.ddpo.prompts_per_iteration * cfg.ddpo.group_size, world_size=world,
                seed=cfg.run.seed, lr=cfg.optim.lr, max_pixels=cfg.data.max_pixels, precision=cfg.run.precision,
                manifest=cfg.data.manifest, dtype=PRECISIONS[cfg.lora.save_dtype])
    judge_pool.close(close_judge=owns_judge)
    if cfg.run.trackers and main:  # the reward curve so far, as the report stage draws it
        curve = reward_curve(run_dir / "metrics.jsonl", tracking_dir(run_dir) / "reward_curve.png")
        if curve is not None:
            metrics.image("reward curve", curve, cfg.ddpo.iterations)
    metrics.close()
    accelerator.wait_for_everyone()
    return DDPOResult(run_dir, cfg.ddpo.iterations, lora_path, run_dir / "metrics.jsonl", last_eval)


def _iteration_row(iteration, table, slots, keys, dataset, sampler, retries, rollouts, adv_stats, update,
                   sample_time, train_time) -> dict:
    """One metrics line: rewards (overall, per question, per task), the drop count, the update's diagnostics."""
    judged = table[:, JUDGED] > 0
    n = int(judged.sum())
    row = {"step": iteration + 1, "n_judged": n, "n_unjudged": len(slots) - n, "judge_retries": retries,
           "noise_level": sampler.noise_level, "reward": None}
    if n:
        rewards = table[judged, REWARD]
        row.update(reward=float(rewards.mean()), reward_std=float(rewards.std(unbiased=False)))
        row.update({q: float(table[judged, REWARD_COLUMNS.index(q)].mean()) for q in QUESTIONS})
        tasks: dict[str, list[float]] = {}
        for s, j, r in zip(slots, judged.tolist(), table[:, REWARD].tolist()):
            if j:
                tasks.setdefault(dataset.entries[s.prompt].record.sample.task, []).append(r)
        row.update({f"reward_{t}": sum(v) / len(v) for t, v in sorted(tasks.items())})
    row.update(adv_stats)
    row.update(update)
    row.update(time_sampling=rollouts.sampling_s, time_judge_wait=rollouts.judge_wait_s,
               time_judge_span=rollouts.judge_span_s, time_rollout=sample_time, time_training=train_time,
               time_iteration=sample_time + train_time)
    return row
