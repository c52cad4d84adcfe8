"""Does DDPO hide the judge behind sampling? One iteration's rollouts, judged over real HTTP, overlapped vs sequential.

    python bench/ddpo_iter.py [--samples 64] [--batch 4] [--latency auto] [--concurrency 8] [--model DIR]

A real OpenAIJudge (cache off) judges every decoded rollout through judge.loopback.ScriptedChatServer
on 127.0.0.1, which answers each call (one per question, three per sample) after exactly
``--latency`` seconds. ``training.ddpo.rollout.sample_and_judge`` — the loop's own code — samples
``--samples`` SDE rollouts in batches of ``--batch`` on a micro toy-architecture model (random
weights; the toy base's size) with a DDPO LoRA attached, and submits each decoded batch to the
judge at once:

* sampling: the rollouts alone (no judge), measured first;
* judging: the same images judged alone, all submitted at once;
* overlapped: sample_and_judge as DDPO runs it (the judge works while the next batch is sampled);
* sequential: each batch's verdicts awaited before the next batch is sampled.

It prints overlapped / max(sampling, judging), target <= 1.1 (the floor is about 1 + 1/batches when
the two are balanced: the last batch's verdicts cannot overlap anything), and sequential / max for
comparison. ``--latency auto`` picks the latency that makes judging take as long as sampling (the
hardest case for overlap). All four are measured in this one run, side by side.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from judge.config import Profile  # noqa: E402
from judge.loopback import Reply, ScriptedChatServer  # noqa: E402
from judge.openai_compat import OpenAIJudge  # noqa: E402
from judge.pool import JudgePool, collect  # noqa: E402


def build(root: Path, model: str | None, samples: int):
    """A model folder, a one-task toy world and its cached dataset, the policy with a DDPO LoRA."""
    from training.cache import CachedDataset, EmbeddingCache, prepare_cache
    from training.data import load_manifest
    from training.ddpo.state import add_ddpo_adapter
    from training.models import load_kontext
    from training.toy.models import TOY_MAX_SEQUENCE_LENGTH, build_components, save_folder
    from training.toy.templates import vocabulary
    from training.toy.world import generate_world

    if model is None:
        settings = {"name": "bench micro model", "max_sequence_length": TOY_MAX_SEQUENCE_LENGTH,
                    "sampling": {"guidance": 1.0, "shift": None, "num_steps": 12}, "train": {"guidance": 1.0}}
        model = str(save_folder(root / "model", build_components(vocabulary(), 0), settings))
    generate_world(root / "world", 0, train=max(4, samples // 4), test=0, tasks=("animal_scene",), progress=False)
    manifest = root / "world" / "manifest.jsonl"
    bundle = load_kontext(model)
    records = load_manifest(manifest, split="train", require_target=False)
    cache = EmbeddingCache.for_bundle(root / "cache", bundle)
    entries, _ = prepare_cache(records, bundle, cache, max_pixels=4096, progress=False, manifest=manifest)
    add_ddpo_adapter(bundle.transformer, 8, 8, ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"])
    bundle.transformer.eval()
    return bundle, CachedDataset(entries, cache)


class InstantPool:
    """A judge pool that judges nothing (every sample comes back unjudged at once): sampling alone."""

    def submit(self, request):
        from concurrent.futures import Future

        from judge.verdict import Unjudged

        future = Future()
        future.set_exception(Unjudged("not judged: timing the sampling alone", request.sample_id))
        return future


def run(bundle, dataset, slots, sampler, pool, batch, overlap):
    from training.ddpo.policy import Policy
    from training.ddpo.rollout import RequestMaker, sample_and_judge

    begin = time.perf_counter()
    policy = Policy(bundle.transformer, "diagonal", None, bundle.device)
    rollouts = sample_and_judge(policy, bundle, dataset, slots, sampler, pool, RequestMaker(dataset),
                                batch_size=batch, retries=0, iteration=0, overlap=overlap)
    return time.perf_counter() - begin, rollouts


def main(argv=None) -> int:
    from training.ddpo.rollout import iteration_slots
    from training.sampler import SamplerConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64, help="rollouts in the iteration")
    p.add_argument("--batch", type=int, default=4, help="rollouts per sampling batch")
    p.add_argument("--steps", type=int, default=12, help="sampling steps")
    p.add_argument("--latency", default="auto", help="seconds per HTTP call, or auto (judging ~ sampling)")
    p.add_argument("--concurrency", type=int, default=8, help="the judge profile's requests in flight")
    p.add_argument("--model", help="a model folder (default: a micro toy-architecture model, random weights)")
    p.add_argument("--target", type=float, default=1.1)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bundle, dataset = build(Path(tmp), args.model, args.samples)
        group = 4
        slots = iteration_slots(list(range(len(dataset))), args.samples // group, group, (0.9, 1.1), 0, 0)
        sampler = SamplerConfig(num_steps=args.steps, noise_level=0.7, sde_fraction=0.5, guidance=(0.9, 1.1))
        run(bundle, dataset, slots[:args.batch], sampler, InstantPool(), args.batch, True)  # warm-up
        sampling, rollouts = run(bundle, dataset, slots, sampler, InstantPool(), args.batch, True)
        per_sample = sampling / len(slots)
        # auto: 3 calls per sample, `concurrency` samples at a time -> judging all takes ~ sampling
        latency = (sampling * args.concurrency / (3 * len(slots)) if args.latency == "auto" else float(args.latency))
        print(f"{len(slots)} rollouts in batches of {args.batch}, {args.steps} steps, {per_sample * 1e3:.0f} ms/sample; "
              f"judge: loopback HTTP, {latency * 1e3:.0f} ms per call, 3 calls per sample, concurrency "
              f"{args.concurrency}; torch threads {torch.get_num_threads()}")
        with ScriptedChatServer(lambda call: Reply.answer("Yes."), latency_s=latency, keep_calls=False) as server:
            profile = Profile(name="bench-ddpo", base_url=server.base_url, model="bench", concurrency=args.concurrency,
                              cache=False, timeout_s=60)
            judge = OpenAIJudge(profile)
            pool = JudgePool(judge)
            from training.ddpo.rollout import RequestMaker

            make = RequestMaker(dataset)
            requests = [make(s.prompt, image, f"judge-only-{s.index}") for s, image in zip(rollouts.slots,
                                                                                        rollouts.images)]
            begin = time.perf_counter()
            verdicts = collect([pool.submit(r) for r in requests])
            judging = time.perf_counter() - begin
            assert all(getattr(v, "reward", None) == 1.0 for v in verdicts), "the loopback judge always answers yes"
            overlapped, out = run(bundle, dataset, slots, sampler, pool, args.batch, True)
            sequential, _ = run(bundle, dataset, slots, sampler, pool, args.batch, False)
            assert all(v is not None for v in out.verdicts), "every rollout judged"
            pool.close(close_judge=True)
    bound = max(sampling, judging)
    ratio = overlapped / bound
    print(f"{'':>12} {'wall_s':>7} {'/ max(sampling, judging)':>24}")
    for name, value in (("sampling", sampling), ("judging", judging), ("overlapped", overlapped),
                        ("sequential", sequential)):
        print(f"{name:>12} {value:>7.2f} {value / bound:>24.3f}")
    verdict = "meets" if ratio <= args.target else "MISSES"
    print(f"overlapped / max(sampling, judging) = {ratio:.3f}: {verdict} the target {args.target} "
          f"(sequential: {sequential / bound:.3f}; floor ~ {1 + 1 / max(1, len(slots) // args.batch):.2f} when balanced)")
    return 0 if ratio <= args.target else 1


if __name__ == "__main__":
    raise SystemExit(main())
