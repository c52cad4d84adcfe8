"""DDPO loop (issue 5): on-policy ratio, a two-iteration run, resume, failed judgements, advantages.

A micro Kontext (toy architecture, random weights) on a two-task DualShapes world, the toy judge in
probability mode, 8 rollouts per iteration; each run takes a few seconds on one core. The
distributed check is in test_ddpo_distributed.py, the main job in test_pipeline.py.
"""
from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from ddpo_helpers import ddpo_config, metrics, micro_setup
from judge.toy import ToyJudge
from judge.verdict import QUESTIONS, Unjudged
from training.ddpo import loop as ddpo_module
from training.ddpo.loop import DDPO_LORA, train_ddpo
from training.ddpo.config import DDPOConfig
from training.ddpo.objective import PerPromptStatTracker, RewardBaseline
from training.ddpo.rollout import Slot
from training.ddpo.update import compute_advantages, policy_loss
from training.lora_io import load_lora


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return micro_setup(tmp_path_factory.mktemp("ddpo"))


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """Two uninterrupted iterations: the reference run of several tests."""
    out = tmp_path_factory.mktemp("straight")
    result = train_ddpo(ddpo_config(*setup, out))
    return out, result


def _lora(out):
    return load_file(out / DDPO_LORA)


def test_two_iterations_write_metrics_and_a_ddpo_lora(setup, straight):
    out, result = straight
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["n_judged"] == 8 and row["n_unjudged"] == 0
        for key in ("reward", *QUESTIONS, "approx_kl", "clip_fraction", "zero_adv_groups", "baseline",
                    "policy_loss", "time_sampling", "time_training"):
            assert row[key] is not None and row[key] == row[key], key  # present and not NaN
        assert 0 <= row["reward"] <= 1 and 0 <= row["clip_fraction"] <= 1 and row["approx_kl"] >= 0
        assert row["reward"] == pytest.approx(sum(row[q] for q in QUESTIONS) / 3, abs=1e-9)
        assert row["optimizer_steps"] == 2  # 8 samples, minibatches of 4
    # the second minibatch of an iteration is scored after the first's step: the policy has moved
    assert rows[1]["approx_kl"] > 0
    meta = load_lora(out / DDPO_LORA)[1]
    assert meta.stage == "ddpo" and meta.rank == 4 and meta.train["steps"] == 2
    weights = _lora(out)
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 0  # B starts at 0
    assert {v.dtype for k, v in weights.items() if "lora_" in k} == {torch.bfloat16}  # lora.save_dtype default
    assert result.lora_path == out / DDPO_LORA


def test_an_sft_lora_of_another_base_fails_before_anything_is_spent(setup, tmp_path, monkeypatch):
    from sft_helpers import micro_model
    from training.lora_io import LoraMismatchError
    from training.models import load_kontext

    model, manifest, lora = setup
    other = micro_model(tmp_path / "other", seed=1)  # the same architecture, other weights
    monkeypatch.setattr(ddpo_module, "prepare_data", lambda *a, **k: pytest.fail("data encoded before the check"))
    with pytest.raises(LoraMismatchError) as err:
        train_ddpo(ddpo_config(other, manifest, lora, tmp_path / "run"))
    trained_on, this = load_lora(lora)[1].base_fingerprint, load_kontext(other).base_fingerprint()
    assert trained_on[:16] == this[:16] and trained_on != this  # cut to 16 characters they read the same
    assert str(err.value) == (f"{lora} was trained on another base model (fingerprint {trained_on}, this model "
                              f"{this}); load the FLUX.1 Kontext-dev weights it was trained on")  # DualLoRAApply's
    assert not (tmp_path / "run").exists()


def test_on_policy_ratio_is_one_in_the_loops_recompute(straight):
    """Before any step of an iteration, re-scoring the stored transitions with the sampling policy
    gives back the sampler's log-probs: |ratio - 1| <= 1e-6, although the rollouts were sampled in
    batches of 3 and are re-scored in chunks of 2 (train_transition vs rollout)."""
    out, _ = straight
    for row in metrics(out):
        assert row["onpolicy_ratio_error"] <= 1e-6


def test_interrupt_after_an_iteration_then_resume_equals_uninterrupted(setup, straight, tmp_path):
    out = tmp_path / "run"

    def stop(iteration):
        if iteration == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ddpo(ddpo_config(*setup, out, run={"checkpoint_every": 0}), on_iteration=stop)
    assert (out / "checkpoints" / "step_0000001").is_dir()  # saved on Ctrl-C though checkpoint_every is 0
    assert not (out / DDPO_LORA).exists()
    train_ddpo(ddpo_config(*setup, out, run={"checkpoint_every": 0}))
    reference, resumed = _lora(straight[0]), _lora(out)
    assert reference.keys() == resumed.keys()
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key
    assert [r["reward"] for r in metrics(out)] == [r["reward"] for r in metrics(straight[0])]


def test_interrupt_in_the_middle_of_an_update_rolls_back_and_resumes_exactly(setup, straight, tmp_path,
                                                                           monkeypatch):
    """Ctrl-C after iteration 2's first optimizer step (weights, Adam state and baseline already moved):
    the iteration is rolled back, iteration 1 is checkpointed, and the rerun repeats iteration 2."""
    out = tmp_path / "run"
    real_update = ddpo_module.policy_update

    def update_then_interrupt(cfg, transformer, params, optimizer, *args):
        result = real_update(cfg, transformer, params, optimizer, *args)
        if args[-1] == 1:  # the iteration index: the second iteration, after both of its optimizer steps
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(ddpo_module, "policy_update", update_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_ddpo(ddpo_config(*setup, out, run={"checkpoint_every": 0}))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_0000001"]
    monkeypatch.setattr(ddpo_module, "policy_update", real_update)
    train_ddpo(ddpo_config(*setup, out, run={"checkpoint_every": 0}))
    reference, resumed = _lora(straight[0]), _lora(out)
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


class FlakyJudge(ToyJudge):
    """The toy judge, except: some samples always fail (unjudged), one fails once, then succeeds."""

    def __init__(self, always: set[str], once: set[str]):
        super().__init__(mode="probability")
        self.always, self.once, self.rewards, self.calls = always, set(once), {}, {}
        self._lock = threading.Lock()

    def judge(self, request):
        with self._lock:
            self.calls[request.sample_id] = self.calls.get(request.sample_id, 0) + 1
            if request.sample_id in self.always:
                raise Unjudged("HTTP 503 from the judge (scripted)", request.sample_id)
            if request.sample_id in self.once:
                self.once.discard(request.sample_id)
                raise Unjudged("timeout (scripted)", request.sample_id)
        verdict = super().judge(request)
        with self._lock:
            self.rewards[request.sample_id] = verdict.reward
        return verdict


def test_failed_judgements_are_retried_then_dropped_never_scored_zero(setup, tmp_path):
    out = tmp_path / "run"
    judge = FlakyJudge(always={"it0-slot1", "it0-slot6"}, once={"it0-slot3"})
    train_ddpo(ddpo_config(*setup, out, ddpo={"iterations": 1}, judge={"retries": 2}), judge=judge)
    row = metrics(out)[0]
    assert row["n_unjudged"] == 2 and row["n_judged"] == 6
    assert judge.calls["it0-slot1"] == 3 and judge.calls["it0-slot3"] == 2  # 1 + retries; retried once
    assert row["judge_retries"] == 2 * 2 + 1
    judged = [judge.rewards[f"it0-slot{i}"] for i in (0, 2, 3, 4, 5, 7)]
    assert row["reward"] == pytest.approx(sum(judged) / len(judged), abs=1e-12)  # a 0 would lower it
    assert row["baseline"] == pytest.approx(sum(judged) / len(judged), abs=1e-12)  # first batch: its own mean


def test_a_judge_that_fails_everything_drops_the_iteration_without_training(setup, tmp_path):
    out = tmp_path / "run"
    judge = FlakyJudge(always={f"it0-slot{i}" for i in range(8)}, once=set())
    train_ddpo(ddpo_config(*setup, out, ddpo={"iterations": 1}, judge={"retries": 0}), judge=judge)
    row = metrics(out)[0]
    assert row["n_judged"] == 0 and row["reward"] is None and row["optimizer_steps"] == 0
    assert all(float(v.abs().max()) == 0 for k, v in _lora(out).items() if "lora_B" in k)


def _slots(groups):
    slots, index = [], 0
    for g, size in enumerate(groups):
        for _ in range(size):
            slots.append(Slot(index, prompt=g, group=g, seed=index, guidance=1.0))
            index += 1
    return slots


def test_advantages_by_hand_with_a_dropped_sample():
    # two tuples x 3 rollouts; slot 4 unjudged (its reward column holds garbage that must not be read)
    rewards = [0.2, 0.5, 0.8, 1.0, 123.0, 0.0]
    table = torch.zeros(6, 5, dtype=torch.float64)
    table[:, 1] = torch.tensor(rewards, dtype=torch.float64)
    table[:, 0] = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.float64)
    cfg = DDPOConfig()
    cfg.ddpo.advantage, cfg.ddpo.adv_clip = "baseline", None
    baseline, tracker = RewardBaseline(0.9), PerPromptStatTracker(16, 4)
    advantages, stats = compute_advantages(table, _slots([3, 3]), ["a", "b"], baseline, tracker, cfg)
    mean = (0.2 + 0.5 + 0.8 + 1.0 + 0.0) / 5  # first batch: scored against its own mean
    expected = torch.tensor([0.2 - mean, 0.5 - mean, 0.8 - mean, 1.0 - mean, float("nan"), 0.0 - mean])
    assert torch.allclose(advantages, expected.float(), equal_nan=True, atol=1e-7)
    assert stats["baseline"] == pytest.approx(mean)
    # second batch: b = the first batch's mean; then b <- 0.9 b + 0.1 * new mean
    table[:, 0] = 1
    table[:, 1] = 0.6
    advantages, stats = compute_advantages(table, _slots([3, 3]), ["a", "b"], baseline, tracker, cfg)
    assert torch.allclose(advantages, torch.full((6,), 0.6 - mean), atol=1e-7)
    assert stats["baseline"] == pytest.approx(0.9 * mean + 0.1 * 0.6)
    assert stats["zero_adv_groups"] == 0.0


def test_per_prompt_advantages_by_hand_and_zero_advantage_groups():
    table = torch.zeros(6, 5, dtype=torch.float64)
    table[:, 0] = 1
    table[:, 1] = torch.tensor([0.0, 1.0, 0.5, 0.7, 0.7, 0.7], dtype=torch.float64)
    cfg = DDPOConfig()
    cfg.ddpo.adv_clip = 1.0
    advantages, stats = compute_advantages(table, _slots([3, 3]), ["a", "b"], RewardBaseline(), PerPromptStatTracker(16, 1),
                                           cfg)
    std = torch.tensor([0.0, 1.0, 0.5]).std(unbiased=False).item()
    # group a: (r - 0.5) / std = -1.22, 1.22, 0 -> clipped to [-1, 1]; group b: all equal -> 0
    assert advantages.tolist() == pytest.approx([max(-1.0, -0.5 / std), min(1.0, 0.5 / std), 0, 0, 0, 0], abs=1e-5)
    assert stats["zero_adv_groups"] == 0.5


def test_policy_loss_weights_chunks_into_the_minibatch_mean():
    """Chunks of 1 and 3 entries, each scaled by its share, add up to the loss of the 4 together."""
    new = torch.tensor([-1.0, -1.2, -0.9, -1.05])
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0])
    whole, _ = policy_loss(new, old, adv, 0.1, 1.0)
    parts = policy_loss(new[:1], old[:1], adv[:1], 0.1, 0.25)[0] + policy_loss(new[1:], old[1:], adv[1:], 0.1, 0.75)[0]
    assert float(parts) == pytest.approx(float(whole), abs=1e-7)
    # by hand: ratios 1, e^-0.2, e^0.1, e^-0.05; clip at [0.9, 1.1]
    r = torch.exp(new - old)
    by_hand = [max(-a * x, -a * min(max(x, 0.9), 1.1)) for a, x in zip(adv.tolist(), r.tolist())]
    assert float(whole) == pytest.approx(sum(by_hand) / 4, abs=1e-7)


def test_kl_to_the_sft_model_is_logged_and_the_adapter_still_trains(setup, tmp_path):
    """kl_weight > 0 scores each transition with the adapter disabled (the SFT model) first; the DDPO
    LoRA must come back enabled and trainable. Iteration 1's first minibatch is on-policy with B = 0,
    so its KL is exactly 0; after a step it is not."""
    out = tmp_path / "run"
    train_ddpo(ddpo_config(*setup, out, ddpo={"iterations": 2, "kl_weight": 0.5}))
    rows = metrics(out)
    assert all(r["kl_ref"] >= 0 for r in rows) and rows[1]["kl_ref"] > 0
    assert max(float(v.abs().max()) for k, v in _lora(out).items() if "lora_B" in k) > 0


def test_global_std_reaches_the_loop_and_changes_the_update(setup, straight, tmp_path):
    """ddpo.global_std divides by the batch's std: the run records it in its checkpoint, and the same
    rollouts then give another update than per-prompt stds do."""
    out = tmp_path / "global"
    train_ddpo(ddpo_config(*setup, out, ddpo={"global_std": True}))
    state = json.loads((out / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["config"]["algo_state"]["tracker"]["global_std"] is True
    assert [r["reward"] for r in metrics(out)][:1] == [r["reward"] for r in metrics(straight[0])][:1]
    reference, shared = _lora(straight[0]), _lora(out)
    assert any(not torch.equal(reference[k], shared[k]) for k in reference)


def test_tied_groups_are_dropped_from_the_update_by_hand():
    """ddpo.drop_tied_groups: group b's rewards all tie, so its slots leave the update (NaN, as an
    unjudged sample); group a is kept with the same advantages as without the option."""
    table = torch.zeros(6, 5, dtype=torch.float64)
    table[:, 0] = 1
    table[:, 1] = torch.tensor([0.0, 1.0, 0.5, 0.7, 0.7, 0.7], dtype=torch.float64)
    cfg = DDPOConfig()
    kept, _ = compute_advantages(table, _slots([3, 3]), ["a", "b"], RewardBaseline(), PerPromptStatTracker(16, 1), cfg)
    cfg.ddpo.drop_tied_groups = True
    dropped, stats = compute_advantages(table, _slots([3, 3]), ["a", "b"], RewardBaseline(),
                                        PerPromptStatTracker(16, 1), cfg)
    assert torch.equal(dropped[:3], kept[:3]) and torch.isnan(dropped[3:]).all()
    assert stats["dropped_tied"] == 0.5 and stats["zero_adv_groups"] == 0.5


def test_dropping_tied_groups_reaches_the_loop(setup, straight, tmp_path, monkeypatch):
    """With every reward tied, nothing is left to train on: the LoRA stays at its start (B = 0) and
    the metrics say all was dropped."""
    out = tmp_path / "tied"

    class TiedJudge(ToyJudge):
        def judge(self, request):
            return dataclasses.replace(super().judge(request), fidelity=0.5, consistency=0.5, realism=0.5)

    train_ddpo(ddpo_config(*setup, out, ddpo={"drop_tied_groups": True}), judge=TiedJudge(mode="probability"))
    rows = metrics(out)
    assert [r["dropped_tied"] for r in rows] == [1.0, 1.0]
    assert all(float(v.abs().max()) == 0 for k, v in _lora(out).items() if "lora_B" in k)


def test_ema_is_exported_and_resumes_exactly(setup, straight, tmp_path):
    """ddpo.ema_decay: the exported LoRA is the average, not the last weights; an interrupted run
    resumes to the same average (the EMA rides in the checkpoint)."""
    ema = {"ema_decay": 0.5}
    whole = tmp_path / "whole"
    train_ddpo(ddpo_config(*setup, whole, ddpo=ema))
    reference = _lora(straight[0])
    averaged = _lora(whole)
    assert any(not torch.equal(reference[k], averaged[k]) for k in reference if "lora_B" in k)
    assert (whole / "checkpoints" / "step_0000002" / "ema.safetensors").is_file()
    out = tmp_path / "run"

    def stop(iteration):
        if iteration == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ddpo(ddpo_config(*setup, out, ddpo=ema, run={"checkpoint_every": 0}), on_iteration=stop)
    train_ddpo(ddpo_config(*setup, out, ddpo=ema, run={"checkpoint_every": 0}))
    resumed = _lora(out)
    for key in averaged:
        assert torch.equal(averaged[key], resumed[key]), key
