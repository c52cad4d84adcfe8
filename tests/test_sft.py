"""The trainer (issue 4 parts 3 and 6): learning, exact mid-epoch resume, gates, full mode, CLI, sampling.

Runs a micro Kontext (toy architecture, random weights) on a small DualShapes world for seconds.
"""
import json
import logging
import math
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sft_helpers import micro_model, micro_world, sft_config, write_lines
from training.checkpoint import list_checkpoints
from training.sft.trainer import train


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 16 training samples = 4 batches of 4 per epoch; 4 held out
    return micro_world(tmp_path_factory.mktemp("world"), tasks=("animal_scene",), train=16, test=4)


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_sft_lowers_held_out_loss_and_writes_a_dualref_lora(micro, world, tmp_path):
    from training.lora_io import load_lora
    from training.models import load_kontext

    cfg = sft_config(micro, world, tmp_path / "run", train={"max_steps": 16}, run={"val_every": 8})
    result = train(cfg)
    rows = _metrics(tmp_path / "run")
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [0, 8, 16]
    assert val[16] < 0.97 * val[0], val  # held-out loss falls by more than 3 %
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert all({"lr", "grad_norm", "step_time", "data_time", "samples_per_s"} <= set(r) for r in steps)
    assert all(math.isfinite(r["loss"]) for r in steps)
    state, meta = load_lora(result.lora_path)
    assert meta.layout == "diagonal" and meta.stage == "sft" and meta.rank == 4 and meta.gates is None
    assert meta.base_fingerprint == load_kontext(micro).base_fingerprint()
    assert meta.train["steps"] == 16 and meta.train["batch_size"] == 4
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_q.lora_A") for k in state)
    assert {v.dtype for k, v in state.items() if "lora_" in k} == {torch.bfloat16}  # lora.save_dtype default
    assert {v.dtype for k, v in state.items() if k.endswith(".alpha")} == {torch.float32}
    assert (tmp_path / "run" / "val" / "step_0000016.png").is_file()
    assert (tmp_path / "run" / "val" / "step_0000000.png").is_file()


def test_resume_mid_epoch_gives_the_same_weights(micro, world, tmp_path):
    sections = {"train": {"max_steps": 7}, "run": {"checkpoint_every": 3, "val_at_start": False}}
    straight = train(sft_config(micro, world, tmp_path / "a", **sections))

    def interrupt(step):
        if step == 5:  # epoch 1, after its first batch: mid-epoch
            raise KeyboardInterrupt

    cfg = sft_config(micro, world, tmp_path / "b", **sections)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    saved = [p.name for p in list_checkpoints(tmp_path / "b")]
    assert saved == ["step_0000003", "step_0000005"]  # the interrupt saved where it stopped
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_0000005" / "state.json").read_text())
    assert (state["epoch"], state["position"]) == (1, 1)
    trainable = load_file(tmp_path / "b" / "checkpoints" / "step_0000005" / "trainable.safetensors")
    assert {v.dtype for v in trainable.values()} == {torch.float32}  # resumable: fp32, the export bf16
    resumed = train(cfg, resume=True)
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda run: [(r["step"], r["loss"]) for r in _metrics(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_ema_exports_the_average_and_resumes_exactly(micro, world, tmp_path):
    """train.ema_decay: the LoRA is the average of the weights, not the last ones (the checkpoint keeps
    the live weights), and an interrupted run resumes to the same average (issue 21)."""
    sections = {"train": {"max_steps": 6, "ema_decay": 0.8}, "lora": {"save_dtype": "fp32"},
                "run": {"checkpoint_every": 3, "val_at_start": False, "val_samples": 0}}
    straight = train(sft_config(micro, world, tmp_path / "a", **sections))
    live = load_file(tmp_path / "a" / "checkpoints" / "step_0000006" / "trainable.safetensors")
    exported = load_file(straight.lora_path)
    key = "transformer.proj_out.lora_B"
    assert not torch.equal(live[f"{key}.default.weight"], exported[f"{key}.weight"])  # the average, not the last
    assert (tmp_path / "a" / "checkpoints" / "step_0000006" / "ema.safetensors").is_file()

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt

    cfg = sft_config(micro, world, tmp_path / "b", **sections)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=interrupt)
    resumed = train(cfg, resume=True)
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_ctrl_c_inside_the_optimizer_step_waits_for_the_step_counter(micro, world, tmp_path):
    """A real SIGINT sent from inside Adam's step: it lands once the step counter has moved, so the
    checkpoint it triggers names the weights it holds and ``resume`` matches an uninterrupted run."""
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    sections = {"train": {"max_steps": 7}, "run": {"checkpoint_every": 0, "val_at_start": False}}
    straight = train(sft_config(micro, world, tmp_path / "a", **sections))
    steps = []

    def ctrl_c_at_step_5(optimizer, args, kwargs):
        steps.append(1)
        if len(steps) == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = sft_config(micro, world, tmp_path / "b", **sections)
    hook = register_optimizer_step_post_hook(ctrl_c_at_step_5)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    finally:
        hook.remove()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_0000005"]
    resumed = train(cfg, resume=True)
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_learned_gates_match_dual_rope_strengths_and_are_saved(micro, world, tmp_path):
    from dual_rope.diffusers_adapter import dual_reference_forward, prepare_references
    from training.flow import FlowMatchingModel
    from training.lora_io import load_lora
    from training.models import load_kontext

    transformer = load_kontext(micro).transformer
    model = FlowMatchingModel(transformer, "diagonal", 1.0, learn_gates=True)
    gates = [0.5, 2.0]
    with torch.no_grad():
        model.log_gates.copy_(torch.tensor([math.log(g) for g in gates]))
    g = torch.Generator().manual_seed(0)
    x, r1, r2 = (torch.randn(2, 16, 8, 8, generator=g) for _ in range(3))
    text, pooled, sigma = torch.randn(2, 48, 64, generator=g), torch.randn(2, 64, generator=g), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        ours = model.velocity(x, [r1, r2], text, pooled, sigma)
        theirs = dual_reference_forward(transformer, x, prepare_references((8, 8), [r1, r2], "diagonal", gates),
                                        text, pooled, sigma, torch.ones(2))
    assert torch.equal(ours, theirs)  # the learnable bias is DESIGN contract 3's, bit for bit

    cfg = sft_config(micro, world, tmp_path / "run", train={"max_steps": 3},
                     lora={"learn_gates": True, "gate_lr": 0.05}, run={"val_at_start": False})
    result = train(cfg)
    _, meta = load_lora(result.lora_path)
    assert meta.gates is not None and len(meta.gates) == 2
    assert all(g > 0 for g in meta.gates) and meta.gates != (1.0, 1.0)


def test_full_mode_trains_every_weight(micro, world, tmp_path):
    from diffusers import FluxTransformer2DModel

    cfg = sft_config(micro, world, tmp_path / "run", train={"max_steps": 2, "mode": "full"},
                     optim={"lr": 1e-3}, run={"val_at_start": False, "val_samples": 0})
    result = train(cfg)
    assert result.lora_path is None
    before = FluxTransformer2DModel.from_pretrained(str(micro / "transformer"))
    after = FluxTransformer2DModel.from_pretrained(str(result.transformer_dir))
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert sum(changed) / len(changed) > 0.9


def test_cli_trains_and_names_bad_input(micro, world, tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"model": {"path": str(micro)}, "data": {"manifest": str(world), "batch_size": 4},
                                  "lora": {"rank": 4}, "run": {"out_dir": str(tmp_path / "run"), "val_samples": 0}}))
    run = lambda *args: subprocess.run([sys.executable, "-m", "training.sft", "--config", str(config), "--quiet", *args],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    done = run("--max-steps", "2", "--set", "run.val_at_start=false")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lora.safetensors" in done.stdout and (tmp_path / "run" / "lora.safetensors").is_file()
    bad_key = run("--set", "optim.learning_rate=1")
    assert bad_key.returncode == 2 and "unknown config key 'optim.learning_rate'" in bad_key.stderr
    lines = world.read_text().splitlines()
    broken = write_lines(tmp_path / "broken.jsonl", [lines[0].replace('"images/', f'"{world.parent}/images/'),
                                                     "{not json"])
    finished = (tmp_path / "run" / "config.json").read_bytes()
    bad_data = run("--set", f"data.manifest={broken}")
    assert bad_data.returncode == 2 and "line 2: not valid JSON" in bad_data.stderr
    no_checkpoint = run("--resume", str(tmp_path / "nope"))
    assert no_checkpoint.returncode == 2 and "not a checkpoint folder" in no_checkpoint.stderr
    assert (tmp_path / "run" / "config.json").read_bytes() == finished  # a failed start changes nothing


def test_skip_bad_lists_the_bad_lines_of_every_split(micro, world, tmp_path):
    rows = [json.loads(x) for x in world.read_text().splitlines()]
    rows = [dict(r, images=[str(world.parent / p) for p in r["images"]], target=str(world.parent / r["target"]))
            for r in rows]
    train_rows = [i for i, r in enumerate(rows) if r["split"] == "train"]
    test_rows = [i for i, r in enumerate(rows) if r["split"] == "test"]
    for i in train_rows[:2] + test_rows[:1]:
        rows[i]["images"] = [rows[i]["images"][0], str(tmp_path / f"missing{i}.png")]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")  # bad in every split's pass: listed once
    manifest = write_lines(tmp_path / "m.jsonl", lines)
    bad = sorted([i + 1 + (i >= 3) for i in train_rows[:2] + test_rows[:1]] + [4])
    train(sft_config(micro, manifest, tmp_path / "run", data={"skip_bad": True}, train={"max_steps": 1},
                     run={"val_at_start": False, "val_samples": 0}))
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [s["line"] for s in skipped] == bad
    assert all(("missing" in s["reason"] and "not found" in s["reason"]) or "not valid JSON" in s["reason"]
               for s in skipped)
    assert [s["text"] for s in skipped] == [lines[n - 1][:2000] for n in bad]  # as BadLine.to_json cuts them


def test_sample_split_returns_outputs_in_manifest_order(micro, world, tmp_path):
    from training.evaluation import sample_split
    from training.models import load_kontext

    cfg = sft_config(micro, world, tmp_path / "run", train={"max_steps": 2}, optim={"lr": 0.05},
                     run={"val_at_start": False, "val_samples": 0})
    lora = train(cfg).lora_path
    bundle = load_kontext(micro)
    base = sample_split(bundle, world, split="test", steps=2, progress=False)
    tuned = sample_split(bundle, world, split="test", lora=lora, steps=2, progress=False)
    again = sample_split(bundle, world, split="test", steps=2, progress=False)  # the LoRA is unloaded again
    assert [o.sample.id for o in base] == [f"animal_scene-test-{i:05d}" for i in range(4)]
    assert base[0].image.shape == (64, 64, 3) and base[0].image.dtype.name == "uint8"
    assert all((a.image == c.image).all() for a, c in zip(base, again))
    assert any((a.image != b.image).any() for a, b in zip(base, tuned))
    request = tuned[0].judge_request()
    assert request.task == "animal_scene" and request.plan is not None and request.reference2 is not None


def test_config_files_overrides_and_errors(tmp_path):
    from training.config import ConfigError, load_config

    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model:\n  path: toy\ndata:\n  manifest: m.jsonl\n  batch_size: 8\nlora:\n  rank: 16\n")
    cfg = load_config(yaml_file, ["optim.lr=1e-4", "train.layout=offset", "lora.target_modules=[\"attn.to_q\"]"])
    assert (cfg.data.batch_size, cfg.lora.rank, cfg.optim.lr, cfg.train.layout) == (8, 16, 1e-4, "offset")
    assert cfg.lora.target_modules == ["attn.to_q"] and cfg.validate() is cfg
    defaults = load_config(None, ["data.manifest=m.jsonl", "model.path=x"])
    assert (defaults.lora.rank, defaults.optim.lr) == (512, 5e-5)  # the paper's LoRA setting
    with pytest.raises(ConfigError, match="unknown config key 'lora.ranks'"):
        load_config(yaml_file, ["lora.ranks=4"])
    with pytest.raises(ConfigError, match="train.layout='diag' is not allowed"):
        load_config(yaml_file, ["train.layout=diag"]).validate()
    with pytest.raises(ConfigError, match="data.manifest is required"):
        load_config(None, ["model.path=x"]).validate()
    with pytest.raises(ConfigError, match="data.task_repeats.person_scene.* whole number"):
        load_config(yaml_file, ["data.task_repeats.person_scene=0.5"]).validate()


def test_wrong_types_are_exit_2_errors_naming_the_key(tmp_path, capsys):
    """Every value is checked against its field's type when the config loads (no TypeError later)."""
    from training.config import load_config
    from training.ddpo.pipeline import main as ddpo_main
    from training.sft.cli import main as sft_main

    yaml_file = tmp_path / "paper.yaml"  # YAML 1.1 reads 5e-5 (no dot) as a string: the paper's own value
    yaml_file.write_text("optim:\n  lr: 5e-5\ntrain:\n  max_steps: 10\n")
    cfg = load_config(yaml_file)
    assert cfg.optim.lr == 5e-5 and isinstance(cfg.optim.lr, float) and cfg.train.max_steps == 10
    cases = [(sft_main, "optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
             (sft_main, "train.max_steps=ten", "train.max_steps: expected a whole number, got 'ten'"),
             (sft_main, "data.skip_bad=\"yes\"", "data.skip_bad: expected true or false, got 'yes'"),
             (ddpo_main, "ddpo.iterations=abc", "ddpo.iterations: expected a whole number, got 'abc'")]
    ddpo_file = Path(__file__).resolve().parents[1] / "training" / "configs" / "toy_ddpo.json"
    for main, override, message in cases:
        config = yaml_file if main is sft_main else ddpo_file
        assert main(["--config", str(config), "--set", override, "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a run that fails validation writes nothing


def test_task_repeats_naming_a_task_the_data_lacks_is_refused(micro, world, tmp_path):
    from training.config import ConfigError

    cfg = sft_config(micro, world, tmp_path / "run", data={"task_repeats": {"person_scen": 2}})
    with pytest.raises(ConfigError, match="person_scen, which no training sample has; the tasks here are animal_scene"):
        train(cfg)


def test_bf16_with_gradient_checkpointing_trains(micro, world, tmp_path, caplog):
    from training.lora_io import load_lora

    cfg = sft_config(micro, world, tmp_path / "run", train={"max_steps": 2, "precision": "bf16",
                                                             "gradient_checkpointing": True},
                     run={"val_at_start": False, "val_samples": 0})
    caplog.set_level(logging.INFO, logger="training.sft.trainer")
    result = train(cfg)
    assert "data: each epoch uses 16 of 16 samples (100.0 %)" in caplog.text  # reported at start
    assert math.isfinite(result.loss)
    state, meta = load_lora(result.lora_path)
    assert meta.train["precision"] == "bf16"
    # trained in fp32 over the bf16 base; exported in lora.save_dtype (default bf16)
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if "lora_" in k)
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)
