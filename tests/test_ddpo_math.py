"""DDPO arithmetic on hand-made numbers (expected values worked out in the comments)."""
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.ddpo.objective import (
    PerPromptStatTracker,
    RewardBaseline,
    approx_kl,
    clip_advantages,
    clip_fraction,
    clipped_policy_loss,
    ddpo_loss,
    gaussian_kl,
    zero_advantage_group_share,
)

REWARDS_PER_RANK = [  # iteration -> rank -> local rewards
    [[1.0, 0.0], [1.0, 0.0]],
    [[1.0, 1.0], [1.0, 1.0]],
    [[0.0], [1 / 3]],
]


def test_moving_average_baseline_by_hand():
    baseline = RewardBaseline(decay=0.9)
    # First batch: no history, scored against its own mean 0.5, which becomes b.
    assert baseline.advantages([1, 0, 1, 0]).tolist() == [0.5, -0.5, 0.5, -0.5]
    assert baseline.value == 0.5
    # Second batch is scored against b = 0.5, then b = 0.9*0.5 + 0.1*1 = 0.55.
    assert baseline.advantages([1, 1, 1, 1]).tolist() == [0.5] * 4
    assert baseline.value == pytest.approx(0.55)
    saved = json.loads(json.dumps(baseline.state_dict()))
    # Third: mean 1/6; A = [0 - 0.55, 1/3 - 0.55]; b = 0.9*0.55 + 0.1/6.
    third = baseline.advantages([0, 1 / 3])
    assert third.tolist() == pytest.approx([-0.55, 1 / 3 - 0.55])
    assert baseline.value == pytest.approx(0.495 + 1 / 60) and baseline.updates == 3
    resumed = RewardBaseline(decay=0.5)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.advantages([0, 1 / 3]), third) and resumed.state_dict() == baseline.state_dict()


def test_rewards_must_be_judged():
    for bad in ([1.0, float("nan")], [], [float("inf")]):
        with pytest.raises(ValueError, match="reward"):
            RewardBaseline().advantages(bad)
    with pytest.raises(ValueError, match="unjudged"):
        PerPromptStatTracker().advantages(["a"], [float("nan")])
    with pytest.raises(ValueError, match="decay"):
        RewardBaseline(decay=1.0)


def _baseline_worker(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    baseline, advantages = RewardBaseline(decay=0.8), []
    for iteration in REWARDS_PER_RANK:
        local = torch.tensor(iteration[rank])
        gathered = [torch.zeros_like(local) for _ in range(2)]  # the data keeps equal sizes per rank
        dist.all_gather(gathered, local)
        advantages.append(baseline.advantages(local, all_rewards=torch.cat(gathered)).tolist())
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"advantages": advantages, "state": baseline.state_dict()}, f)
    dist.destroy_process_group()


def test_two_gloo_processes_keep_the_baseline_of_one(tmp_path):
    mp.spawn(_baseline_worker, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    single, expected = RewardBaseline(decay=0.8), []
    for iteration in REWARDS_PER_RANK:
        expected.append(single.advantages(torch.tensor(iteration[0] + iteration[1])).tolist())
    for rank in range(2):
        result = json.loads((tmp_path / f"rank.{rank}.json").read_text())
        assert result["state"] == single.state_dict()
        for got, want, local in zip(result["advantages"], expected, REWARDS_PER_RANK):
            offset = rank * len(local[0])
            assert got == want[offset:offset + len(local[rank])]


def test_per_prompt_normalisation_by_hand():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3, eps=1e-6)
    # Every prompt below min_count: batch stats, mean 2/3, population std sqrt(2/9).
    std = math.sqrt(2 / 9)
    first = tracker.advantages(["a", "a", "b"], [1, 0, 1])
    assert first.tolist() == pytest.approx([(1 / 3) / std, (-2 / 3) / std, (1 / 3) / std], rel=1e-5)
    # "a" now holds [1, 0] + [1] = 3 rewards: its own stats, mean 2/3, std sqrt(2/9).
    # "b" holds [1, 0], 2 < 3: batch stats of [1, 0] -> mean 0.5, std 0.5, so (0 - 0.5)/0.5 = -1.
    second = tracker.advantages(["a", "b"], [1, 0])
    assert second.tolist() == pytest.approx([(1 / 3) / std, -1.0], rel=1e-5)
    # "a" keeps its last 4: [1, 0, 1] + [0, 0] -> [0, 1, 0, 0], mean 1/4, std sqrt(3)/4.
    state = json.loads(json.dumps(tracker.state_dict()))
    third = tracker.advantages(["a", "a"], [0, 0])
    assert third.tolist() == pytest.approx([-1 / math.sqrt(3)] * 2, rel=1e-5)
    restored = PerPromptStatTracker()
    restored.load_state_dict(state)
    assert torch.equal(restored.advantages(["a", "a"], [0, 0]), third)
    with pytest.raises(ValueError, match="prompts"):
        tracker.advantages(["a"], [1, 0])


def test_per_prompt_tracker_with_the_batch_std():
    """global_std: each prompt's own mean, the whole batch's std, so a group whose rollouts score
    almost alike gets advantages near 0 instead of +-1."""
    rewards = [0.50, 0.51, 0.0, 1.0]  # "a" nearly ties; "b" differs widely
    own = PerPromptStatTracker(min_count=2).advantages(["a", "a", "b", "b"], rewards)
    assert own.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], rel=1e-3)
    tracker = PerPromptStatTracker(min_count=2, global_std=True)
    batch_std = float(torch.tensor(rewards, dtype=torch.float64).std(unbiased=False))
    shared = tracker.advantages(["a", "a", "b", "b"], rewards)
    assert shared.tolist() == pytest.approx([-0.005 / batch_std, 0.005 / batch_std, -0.5 / batch_std, 0.5 / batch_std],
                                            rel=1e-4)
    restored = PerPromptStatTracker()
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.global_std and torch.equal(restored.advantages(["c", "c"], [0, 1]),
                                               tracker.advantages(["c", "c"], [0, 1]))


def test_zero_advantage_groups_and_clipping():
    groups = ["a", "a", "b", "b", "c"]
    assert zero_advantage_group_share(groups, torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0])) == pytest.approx(2 / 3)
    tracker = PerPromptStatTracker(min_count=2)
    flat = tracker.advantages(["p", "p", "q", "q"], [1, 1, 1, 0])  # p's rewards are equal: no signal
    assert flat[:2].tolist() == [0.0, 0.0] and zero_advantage_group_share(["p", "p", "q", "q"], flat) == 0.5
    a = torch.tensor([-7.0, -1.0, 0.0, 2.0, 9.0])
    assert clip_advantages(a, 5.0).tolist() == [-5.0, -1.0, 0.0, 2.0, 5.0]
    assert clip_advantages(a, None) is a


def test_clipped_policy_loss_by_hand():
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5])
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0])).requires_grad_()
    # eps 0.2: clipped ratios [1.2, 1.2, 0.8, 1.0].
    # -A*r = [-1.5, 1.5, -1.0, -0.5]; -A*clip(r) = [-1.2, 1.2, -1.6, -0.5]; max = [-1.2, 1.5, -1.0, -0.5].
    loss = clipped_policy_loss(new, old, advantages, 0.2)
    assert loss.item() == pytest.approx(-1.2 / 4)
    loss.backward()
    # d/dlogp of -A*r is -A*r (r = exp(logp)); the clipped branch gives 0: [0, 1.5, -1.0, -0.5] / 4.
    assert new.grad.tolist() == pytest.approx([0.0, 0.375, -0.25, -0.125], abs=1e-6)
    assert clip_fraction(new, old, 0.2).item() == 0.75
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4
    assert approx_kl(new, old).item() == pytest.approx(expected_kl, rel=1e-6)
    # On policy (ratio 1) the loss is -mean(A), nothing is clipped, and the KL is 0.
    same = clipped_policy_loss(old, old, advantages, 1e-4)
    assert same.item() == pytest.approx(-advantages.mean().item())
    assert clip_fraction(old, old, 1e-4).item() == 0 and approx_kl(old, old).item() == 0


def test_kl_to_reference_and_full_loss():
    mean, ref = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    # ((1-0)^2 + (3-1)^2)/2 = 2.5, over 2*0.5^2 = 0.5 -> 5.
    assert gaussian_kl(mean, ref, torch.tensor([0.5])).item() == pytest.approx(5.0)
    g = torch.Generator().manual_seed(0)
    m, r, std = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.tensor([0.2, 1, 3])
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(m, std.view(-1, 1, 1, 1)),
                                              torch.distributions.Normal(r, std.view(-1, 1, 1, 1)))
    assert torch.allclose(gaussian_kl(m, r, std), exact.mean(dim=(1, 2, 3)), atol=1e-6)
    new = torch.tensor([0.1, -0.1], requires_grad=True)
    old, adv, kl = torch.zeros(2), torch.tensor([1.0, -1.0]), torch.tensor([2.0, 4.0])
    loss, stats = ddpo_loss(new, old, adv, clip_range=0.5, kl=kl, kl_weight=0.1)
    policy = clipped_policy_loss(new, old, adv, 0.5).item()
    assert loss.item() == pytest.approx(policy + 0.1 * 3.0)
    assert stats["kl_ref"] == 3.0 and stats["clip_fraction"] == 0.0
    assert stats["approx_kl"] == pytest.approx(0.5 * 0.01)
    loss.backward()
    assert new.grad is not None
    _, plain = ddpo_loss(new, old, adv, clip_range=0.5)
    assert "kl_ref" not in plain and plain["loss"] == pytest.approx(policy)


def test_ranks_share_one_judge_profiles_limits(tmp_path):
    """8 processes together keep one profile's rpm and concurrency (each takes its share)."""
    import json

    from judge.config import load_profiles
    from training.ddpo.loop import rank_share

    config = tmp_path / "judges.json"
    config.write_text(json.dumps({"profiles": {"vlm": {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                       "concurrency": 8, "rpm": 500}}}))
    profile = load_profiles(config)["vlm"]
    assert rank_share(profile, 8) == {"concurrency": 1, "rpm": 62.5}
    assert rank_share(profile, 1) == {}  # one process: the profile as written
    assert rank_share(load_profiles(config)["toy"], 8) == {}  # a programmatic judge has no rate to share


def test_the_process_group_timeout_is_the_configs():
    from datetime import timedelta

    from training.config import load_config
    from training.ddpo.config import load_ddpo_config
    from training.runtime import make_accelerator

    assert load_config(None).run.process_group_timeout_min == load_ddpo_config(None).run.process_group_timeout_min == 120
    accelerator = make_accelerator(timeout_min=load_config(None, ["run.process_group_timeout_min=7"]).run.process_group_timeout_min)
    assert accelerator.init_handler.timeout == timedelta(minutes=7)
