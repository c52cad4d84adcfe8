"""DDPO rollouts: which tuples, seeds and guidance an iteration samples, the SDE sampling itself, and
judging the decoded images while the next batch is sampled.

Every random choice is drawn from a generator keyed by ``(run seed, what, iteration, slot)``, where
a *slot* is a rollout's place in the iteration's global batch (``prompts_per_iteration x
group_size`` slots; a group is the ``group_size`` consecutive slots of one tuple). So the draws do
not depend on how many processes share the work (slot ``s`` belongs to process ``s % world``) nor
on where a run was resumed.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from judge.pool import JudgePool
from judge.verdict import QUESTIONS, JudgeRequest, Unjudged, Verdict

from ..cache import CachedDataset
from ..data import to_uint8
from ..evaluation import by_bucket
from ..sampler import SamplerConfig, Trajectory, random_guidance, rollout
from ..seeds import keyed_generator
from .policy import Policy

log = logging.getLogger(__name__)


DRAWS = "dualref-ddpo"  # the keyed_generator namespace of DDPO's draws


@dataclass
class Slot:
    index: int  # place in the iteration's global batch
    prompt: int  # dataset index of the training tuple
    group: int  # which of the iteration's tuples (slots of one group share the tuple)
    seed: int  # initial and SDE noise
    guidance: float


def iteration_slots(pool: list[int], prompts: int, group_size: int, guidance, seed: int, iteration: int) -> list[Slot]:
    """The iteration's slots: ``prompts`` distinct tuples from ``pool``, ``group_size`` rollouts each,
    every rollout with its own seed and guidance scale (paper 3.3: randomised seeds and guidance)."""
    if prompts > len(pool):
        raise ValueError(f"ddpo.prompts_per_iteration={prompts} exceeds the {len(pool)} training tuples available")
    order = torch.randperm(len(pool), generator=keyed_generator(DRAWS, seed, "prompts", iteration))[:prompts]
    slots = []
    for group, position in enumerate(order.tolist()):
        for k in range(group_size):
            index = group * group_size + k
            noise_seed = int(torch.randint(0, 2**62, (), generator=keyed_generator(DRAWS, seed, "noise", iteration, index)))
            scale = float(random_guidance(1, *guidance, generator=keyed_generator(DRAWS, seed, "guidance", iteration, index)))
            slots.append(Slot(index, pool[position], group, noise_seed, scale))
    return slots


@dataclass
class Rollouts:
    """One process's rollouts of an iteration: trajectories (stochastic prefix only) and verdicts."""

    slots: list[Slot]
    trajectory: Trajectory  # rows in the order of ``slots``
    verdicts: list[Verdict | None] = field(default_factory=list)  # None: unjudged after every retry
    images: list[np.ndarray] = field(default_factory=list)
    unjudged_reasons: list[str] = field(default_factory=list)
    retries: int = 0
    sampling_s: float = 0.0
    judge_wait_s: float = 0.0  # time spent waiting for verdicts once sampling was done
    judge_span_s: float = 0.0  # first request sent -> last verdict in


class RequestMaker:
    """JudgeRequests for outputs of the dataset's tuples (reference pictures read once per tuple)."""

    def __init__(self, dataset: CachedDataset):
        self.dataset, self._refs = dataset, {}

    def __call__(self, prompt: int, image: np.ndarray, sample_id: str) -> JudgeRequest:
        from PIL import Image

        record = self.dataset.entries[prompt].record
        if prompt not in self._refs:
            self._refs[prompt] = [Image.open(p).convert("RGB") for p in record.refs]
        refs = self._refs[prompt]
        s = record.sample
        return JudgeRequest.of(s.instruction, refs, image, sample_id=sample_id, task=s.task, plan=s.plan)


def collect_verdicts(pool: JudgePool, requests: list[JudgeRequest], futures: list[Future], retries: int):
    """Verdicts in order; an Unjudged one is resubmitted up to ``retries`` times, then left as None.

    Returns ``(verdicts, reasons of the dropped, resubmissions made)``. Anything but Unjudged (a bad
    request, a bug) is raised: it is not a judgement to drop.
    """
    verdicts: list[Verdict | None] = [None] * len(requests)
    reasons: dict[int, str] = {}
    pending, resubmitted = dict(enumerate(futures)), 0
    for attempt in range(retries + 1):
        failed = []
        for i, future in pending.items():
            try:
                verdicts[i] = future.result()
            except Unjudged as e:
                failed.append(i)
                reasons[i] = e.reason
        if not failed or attempt == retries:
            break
        pending = {i: pool.submit(requests[i]) for i in failed}
        resubmitted += len(failed)
    dropped = [reasons[i] for i, v in enumerate(verdicts) if v is None]
    return verdicts, dropped, resubmitted


@torch.no_grad()
def sample_and_judge(policy: Policy, bundle, dataset: CachedDataset, slots: list[Slot], sampler: SamplerConfig,
                     judge_pool: JudgePool, make_request: RequestMaker, *, batch_size: int, retries: int,
                     iteration: int, overlap: bool = True) -> Rollouts:
    """Sample ``slots`` (SDE, with log-probs), submit each decoded batch to the judge at once and
    sample the next batch meanwhile; then wait for the verdicts. ``overlap=False`` waits for each
    batch's verdicts before sampling the next (the benchmark's sequential baseline)."""
    start = time.perf_counter()
    parts, ordered, requests, futures, images = [], [], [], [], []
    first_submit, wait = None, 0.0
    for chunk in by_bucket(dataset, slots, batch_size, key=lambda s: s.prompt):
        fn, shape = policy.model_fn(dataset, chunk)
        with policy.precision():
            traj = rollout(fn, shape, [s.seed for s in chunk], sampler,
                           guidance=torch.tensor([s.guidance for s in chunk]), device=policy.device)
        pixels = bundle.decode_latents(traj.final)
        k = traj.stochastic_steps  # keep only what training re-scores: states 0..k
        parts.append(Trajectory(traj.latents[:, :k + 1].cpu(), traj.log_probs.cpu(), traj.sigmas[:, :k + 1].cpu(),
                                traj.guidance.cpu(), traj.seeds.cpu(), traj.noise_level, traj.reduction))
        for slot, p in zip(chunk, pixels):
            image = to_uint8(p)
            request = make_request(slot.prompt, image, f"it{iteration}-slot{slot.index}")
            first_submit = first_submit or time.perf_counter()
            ordered.append(slot)
            images.append(image)
            requests.append(request)
            futures.append(judge_pool.submit(request))
        if not overlap:
            t = time.perf_counter()
            for f in futures[-len(chunk):]:
                f.exception()  # wait for it, whatever the outcome
            wait += time.perf_counter() - t
    sampled = time.perf_counter()
    verdicts, dropped, resubmitted = collect_verdicts(judge_pool, requests, futures, retries)
    done = time.perf_counter()
    position = {s.index: i for i, s in enumerate(ordered)}
    order = [position[s.index] for s in slots]  # back to the caller's slot order
    trajectory = Trajectory.cat(parts)
    rows = torch.tensor(order)
    trajectory = Trajectory(trajectory.latents[rows], trajectory.log_probs[rows], trajectory.sigmas[rows],
                            trajectory.guidance[rows], trajectory.seeds[rows], trajectory.noise_level,
                            trajectory.reduction)
    return Rollouts(slots, trajectory, [verdicts[i] for i in order], [images[i] for i in order], dropped,
                    resubmitted, sampled - start - wait, done - sampled + wait,
                    done - (first_submit or done))


REWARD_COLUMNS = ("judged", "reward") + QUESTIONS  # the reward table's columns
JUDGED, REWARD = 0, 1


def reward_table(rollouts: Rollouts, slots_total: int) -> torch.Tensor:
    """(slots_total, len(REWARD_COLUMNS)) float64 in this process's rows (zeros elsewhere), to be
    summed across processes. An unjudged row says judged = 0; its reward column is never read (the
    sample is dropped, not scored)."""
    table = torch.zeros(slots_total, len(REWARD_COLUMNS), dtype=torch.float64)
    for slot, verdict in zip(rollouts.slots, rollouts.verdicts):
        if verdict is not None:
            table[slot.index] = torch.tensor([1.0, verdict.reward] + [getattr(verdict, q) for q in QUESTIONS],
                                             dtype=torch.float64)
    return table
