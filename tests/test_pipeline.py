"""The main job (``python -m training.ddpo``) end to end with tiny overrides: toy world -> toy base
(a seconds-long recipe, in a private cache) -> SFT -> DDPO -> base / SFT / SFT+DDPO on the test split.

The default toy base (minutes to build) is never touched: ``toy_recipe`` shrinks it and
``model.toy_cache_dir`` keeps it in the test's folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ddpo_helpers import TASKS, ddpo_values, metrics, micro_setup
from sft_helpers import micro_model
from training.ddpo import loop as ddpo_module
from training.ddpo.pipeline import main, parse_args, resolve_config

TINY_RECIPE = {"single_train": 16, "single_test": 4, "vae_images": 16, "vae_steps": 10, "base_steps": 4,
               "base_batch": 4, "sample_steps": 3}


def _config(tmp: Path) -> Path:
    sft = tmp / "sft.json"
    sft.write_text(json.dumps({
        "model": {"path": "toy"}, "data": {"manifest": "set by the job", "batch_size": 4}, "lora": {"rank": 4},
        "optim": {"lr": 2e-3}, "train": {"max_steps": 3},
        "run": {"checkpoint_every": 0, "val_every": 0, "val_samples": 2, "val_loss_samples": 4}}))
    values = ddpo_values("toy", "", None, tmp / "unused", eval={"grid_per_task": 1},
                         data={"manifest": "", "max_pixels": 4096, "tasks": list(TASKS)})
    values["model"]["toy_cache_dir"] = str(tmp / "cache")
    values.update(world={"seed": 0, "train": 6, "test": 2, "tasks": list(TASKS)}, sft_config=str(sft),
                  toy_recipe=TINY_RECIPE)
    values["run"].pop("out_dir")
    path = tmp / "job.json"
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    config, out = _config(tmp), tmp / "run"
    assert main(["--config", str(config), "--out", str(out), "--quiet"]) == 0
    return config, out


def test_main_job_writes_the_run_folder(job):
    _, out = job
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["base", "sft", "sft_ddpo"]
    for row in summary.values():
        assert list(row) == [*TASKS, "mean"]
        assert all(0 <= v <= 1 for v in row.values())
    for name in ("dualref_sft.safetensors", "dualref_ddpo.safetensors", "metrics.jsonl", "summary.md",
                 "report.html", "stages.json", "config.json"):
        assert (out / name).is_file(), name
    for name in ("reward_curve.png", "grid.png"):
        with Image.open(out / name) as im:
            assert im.width > 100 and im.height > 50, name
    with Image.open(out / "grid.png") as im:  # header + one row per task; columns refs, 3 models, target
        assert im.height > 2 * 64 and im.width >= 6 * 64
    assert [r["step"] for r in metrics(out)] == [1, 2]
    stages = json.loads((out / "stages.json").read_text())
    assert {"world", "base", "sft", "ddpo", "eval"} <= set(stages)
    assert "base" in (out / "summary.md").read_text().lower()


def test_rerun_with_the_same_out_reuses_every_stage(job):
    config, out = job
    before = (out / "dualref_ddpo.safetensors").read_bytes()
    summary = (out / "summary.json").read_text()
    base = json.loads((out / "base.json").read_text())["path"]
    assert Path(base).parent == Path(json.loads((out / "config.json").read_text())["model"]["toy_cache_dir"])
    # no --config: the run's own config.json; a changed toy recipe must not swap the base under the LoRAs
    assert main(["--out", str(out), "--quiet", "--set", "toy_recipe.base_steps=5"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert stages["base"]["status"] == "reused" and json.loads((out / "base.json").read_text())["path"] == base
    assert stages["sft"]["status"] == "reused" and stages["ddpo"]["status"] == "reused"
    assert (out / "dualref_ddpo.safetensors").read_bytes() == before
    assert json.loads((out / "summary.json").read_text()) == json.loads(summary)  # outputs reused, same verdicts


def test_ctrl_c_in_ddpo_exits_130_and_a_rerun_finishes(job, tmp_path, monkeypatch, capsys):
    config, _ = job
    out = tmp_path / "run"
    real = ddpo_module.policy_update

    def interrupt_second_iteration(cfg, transformer, params, optimizer, *args):
        if args[-1] == 1:
            raise KeyboardInterrupt
        return real(cfg, transformer, params, optimizer, *args)

    monkeypatch.setattr(ddpo_module, "policy_update", interrupt_second_iteration)
    assert main(["--config", str(config), "--out", str(out), "--quiet"]) == 130
    assert f"python -m training.ddpo --out {out}" in capsys.readouterr().err
    assert (out / "dualref_sft.safetensors").is_file() and (out / "checkpoints" / "step_0000001").is_dir()
    monkeypatch.setattr(ddpo_module, "policy_update", real)
    assert main(["--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "stages.json").read_text())["sft"]["status"] == "reused"
    assert [r["step"] for r in metrics(out)] == [1, 2] and (out / "summary.json").is_file()


def test_a_missing_manifest_is_named_with_the_fix(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"data": {"manifest": str(tmp_path / "nope.jsonl")}, "model": {"path": "toy"},
                                  "lora": {"sft": str(tmp_path / "sft.safetensors")}}))
    assert main(["--config", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err


def test_an_unknown_judge_profile_fails_before_any_stage(tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("")
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"data": {"manifest": str(manifest)}, "model": {"path": "toy"},
                                  "sft_config": "training/configs/toy_sft.json", "judge": {"profile": "nope"}}))
    out = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(out), "--quiet"]) == 2
    assert "unknown judge profile 'nope'" in capsys.readouterr().err
    assert not (out / "stages.json").exists()  # no stage ran: not the base, not SFT


def test_final_evaluation_runs_on_the_runs_device_in_its_precision(job, tmp_path, monkeypatch):
    """The main job's Table 2 is sampled with the bundle load_model gives for the run's device and
    precision (not a CPU fp32 default): here bf16, with the transformer materialised in bf16."""
    import torch

    from training.ddpo import report
    from training.ddpo.config import load_ddpo_config

    config, out = job
    cfg = load_ddpo_config(out / "config.json", ["run.precision=bf16", "eval.limit_per_task=1", "run.progress=false"])
    cfg.model.path = json.loads((out / "base.json").read_text())["path"]
    cfg.data.manifest = str(out / "world" / "manifest.jsonl")
    loaded = []

    def recording_load_model(*args, **kwargs):
        loaded.append(report_load_model(*args, **kwargs))
        return loaded[-1]

    report_load_model = report.load_model
    monkeypatch.setattr(report, "load_model", recording_load_model)
    summary = report.evaluate_and_report(cfg, tmp_path, out / "dualref_sft.safetensors",
                                         out / "dualref_ddpo.safetensors", device="cpu")
    assert list(summary) == ["base", "sft", "sft_ddpo"]
    (bundle,) = loaded
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.bfloat16
    assert bundle.transformer.dtype == torch.bfloat16


def test_a_config_that_fails_validation_leaves_a_finished_run_as_it_was(job, tmp_path, capsys):
    config, out = job
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["--config", str(config), "--out", str(out), "--quiet", "--set", "ddpo.iterations=0"]) == 2
    assert "ddpo.iterations must be > 0" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    assert main(["--config", str(config), "--out", str(out), "--quiet", "--set", f"data.manifest={broken}"]) == 2
    assert "line 1: not valid JSON" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_an_sft_lora_of_another_base_is_named_before_the_run_folder_is_touched(tmp_path, capsys):
    model, manifest, lora = micro_setup(tmp_path / "setup")
    other = micro_model(tmp_path / "other", seed=1)  # the same architecture, other weights
    config = tmp_path / "job.json"
    config.write_text(json.dumps(ddpo_values(other, manifest, lora, tmp_path / "unused")))
    out = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{lora} was trained on another base model" in err and "dualref_sft" not in err  # the user's file
    assert not out.exists()


def test_the_run_folder_is_the_configs_out_dir_unless_out_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"run": {"out_dir": str(tmp_path / "mine")}}))
    assert resolve_config(parse_args(["--config", str(config)]))[1] == tmp_path / "mine"
    assert resolve_config(parse_args(["--config", str(config), "--out", "x"]))[1] == Path("x")
    cfg, out = resolve_config(parse_args([]))  # the toy job sets no folder: a new one per run
    assert out.parent == Path("runs") and out.name.startswith("ddpo-") and cfg.world and cfg.run.out_dir == str(out)
