"""``run.trackers``: the numbers of metrics.jsonl, and the validation grids / reward curve, also in
TensorBoard (through accelerate's tracker API), read back from the event files."""
import math

import pytest

from ddpo_helpers import ddpo_config, metrics, micro_setup
from sft_helpers import sft_config
from training.config import ConfigError
from training.ddpo.loop import train_ddpo
from training.runtime import make_accelerator
from training.sft.trainer import train


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def assert_scalars_match(acc, rows):
    """Every finite number of every JSONL line is the TensorBoard scalar of that name at that step."""
    checked = 0
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                continue
            points = {e.step: e.value for e in acc.Scalars(key)}
            assert points[row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, row["step"])
            checked += 1
    logged = sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
    assert logged == checked  # nothing in TensorBoard that the JSONL lacks
    return checked


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return micro_setup(tmp_path_factory.mktemp("tracking"))


def test_sft_tensorboard_scalars_match_the_jsonl_and_grids_are_images(setup, tmp_path):
    model, manifest, _ = setup
    cfg = sft_config(model, manifest, tmp_path / "run", train={"max_steps": 3}, run={"trackers": ["tensorboard"]})
    train(cfg, accelerator=make_accelerator())  # one made without trackers, as the main job's pipeline passes
    rows = metrics(tmp_path / "run")
    acc = events(tmp_path / "run" / "tracking" / "dualref-sft")
    assert {"loss", "lr", "grad_norm", "val_loss"} <= set(acc.Tags()["scalars"])
    assert assert_scalars_match(acc, rows) >= 3 * 8 + 2
    grids = acc.Images("validation grid")
    assert [g.step for g in grids] == [0, 3]
    assert grids[0].width > 0 and grids[0].height > 0


def test_ddpo_tensorboard_scalars_match_the_jsonl_and_the_reward_curve(setup, tmp_path):
    model, manifest, lora = setup
    cfg = ddpo_config(model, manifest, lora, tmp_path / "ddpo", run={
        "out_dir": str(tmp_path / "ddpo"), "checkpoint_every": 0, "eval_every": 0, "progress": False,
        "trackers": ["tensorboard"]})
    train_ddpo(cfg)
    rows = metrics(tmp_path / "ddpo")
    acc = events(tmp_path / "ddpo" / "tracking" / "dualref-ddpo")
    tags = set(acc.Tags()["scalars"])
    assert {"reward", "approx_kl", "clip_fraction", "onpolicy_ratio_error", "time_judge_wait"} <= tags
    assert any(t.startswith("reward_") for t in tags)
    assert assert_scalars_match(acc, rows) > 20
    assert [i.step for i in acc.Images("reward curve")] == [2]


def test_resuming_from_an_earlier_checkpoint_drops_the_later_events_as_the_jsonl_lines(setup, tmp_path):
    """As after a crash: the run got to step 3, a rerun resumes from step 2 and writes step 3 again."""
    model, manifest, _ = setup
    cfg = sft_config(model, manifest, tmp_path / "run", train={"max_steps": 3}, run={
        "trackers": ["tensorboard"], "checkpoint_every": 2, "val_at_start": False, "val_samples": 0})
    train(cfg)
    train(cfg, resume=tmp_path / "run" / "checkpoints" / "step_0000002")
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    acc = events(tmp_path / "run" / "tracking" / "dualref-sft")
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert_scalars_match(acc, rows)


def test_without_trackers_nothing_but_the_jsonl(setup, tmp_path):
    model, manifest, _ = setup
    train(sft_config(model, manifest, tmp_path / "run", train={"max_steps": 1}, run={"val_at_start": False}))
    assert not (tmp_path / "run" / "tracking").exists()
    assert metrics(tmp_path / "run")


@pytest.mark.parametrize("which", ["sft", "ddpo"])
def test_a_bad_tracker_name_is_a_config_error_naming_run_trackers(which, tmp_path):
    if which == "sft":
        cfg = sft_config(tmp_path, tmp_path / "m.jsonl", tmp_path / "run", run={"trackers": ["tensorbord"]})
    else:
        cfg = ddpo_config(tmp_path, tmp_path / "m.jsonl", tmp_path / "sft.safetensors", tmp_path / "run",
                          run={"trackers": ["tensorbord"]})
    with pytest.raises(ConfigError, match=r"run\.trackers: 'tensorbord' is not a tracker"):
        cfg.validate()
    assert not (tmp_path / "run").exists()
