"""The full-shape rehearsal (issue 17 item 7): the real path, from the release's files to Table 2,
through the real command lines, on a stand-in Kontext (tests/standin_kontext.py: the project's own
configs at their real widths, depth 1, the ComfyUI host's real tokenizers) written both as the
release's sharded folder and as ComfyUI single files. At 64 px on a 4-sample toy manifest:

1. ``python -m training.sft --config training/configs/kontext_sft.json --set ...`` on the release folder
   -> LoRA (rank, metadata, base fingerprint; the transformer loaded in bf16 as configured);
2. ``python -m training.ddpo --config training/configs/kontext_ddpo.json --set lora.sft=...`` against an
   OpenAI-compatible judge on 127.0.0.1 -> verdict counts, DDPO LoRA, Table 2;
3. ``python -m training.bench`` headless (release folder) and ``--generator comfyui`` on the real host
   (single files, both LoRAs through the task workflow's DualLoRAApply) -> the Table 2 file;
4. the LoRAs in ``DualLoRAApply`` on ComfyUI's own load of the single-file transformer: every module
   patched, none dropped;
5. SFT (DDP, then FSDP2: the same LoRA) and DDPO again on 2 processes (torch.distributed gloo, as
   ``accelerate launch`` starts them).

Only size is changed, by ``--set`` overrides (rank 4, batch 1-2, 2 steps, 2 sampling steps) and the
stand-in folder's ``dualref.json`` (T5 length 32: the release's 512 tokens x 4096 wide dominate a CPU
step). ComfyUI always builds the full 24-layer T5-XXL in ``DualCLIPLoader``, so the host run loads the
text encoders through tests/comfy_depth_loader.py (ComfyUI's loader with its own depth option).
"""
from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from comfy_host import comfy_path, import_host, skip_reason, start_server
from judge.loopback import Reply
from sft_helpers import micro_world, one_thread_env, torchrun_command
from test_bench import HttpJudge

pytestmark = [pytest.mark.host, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PROFILE = "loop"


def sft_settings(model: Path, manifest: Path, batch: int = 1) -> list[str]:
    """kontext_sft.json's values, changed for size only (bf16, gradient checkpointing, the layout and
    the timestep shift stay as shipped)."""
    return [f"model.path={model}", f"data.manifest={manifest}", f"data.batch_size={batch}", "data.max_pixels=4096",
            "lora.rank=4", "train.max_steps=2", "optim.warmup_steps=0", "run.checkpoint_every=0",
            "run.val_every=0", "run.val_at_start=false", "run.val_samples=0"]


def ddpo_settings(model: Path, manifest: Path, sft_lora: Path, judges: Path) -> list[str]:
    """kontext_ddpo.json's values, changed for size only: 1 iteration of 2 tuples x 2 rollouts of 2 steps."""
    return [f"model.path={model}", f"data.manifest={manifest}", f"lora.sft={sft_lora}", "data.max_pixels=4096",
            "data.val_count=1", "lora.rank=4", "rollout.num_steps=2", "rollout.eval_steps=2", "ddpo.iterations=1",
            "ddpo.prompts_per_iteration=2", "ddpo.group_size=2", "ddpo.rollout_batch=2", "ddpo.train_batch=4",
            f"judge.profile={PROFILE}", f"judge.config={judges}", "eval.limit_per_task=1", "eval.grid_per_task=1",
            "eval.batch_size=1", "run.checkpoint_every=0"]


def as_argv(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def run_cli(module: str, *argv: str, env: dict | None = None) -> list[str]:
    """``python -m <module> ...`` as its own process (its memory gone when it ends), importing this
    checkout; asserts it exits 0 and returns the messages it logged."""
    env = env or dict(os.environ, PYTHONPATH=str(REPO))
    cmd = argv if module == "torchrun" else [sys.executable, "-m", module, *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [m[1] for m in map(LOGGED.match, done.stderr.splitlines()) if m]


# the CLIs' log lines: "[%(asctime)s ]%(levelname)s %(name)s: %(message)s"
LOGGED = re.compile(r"^(?:\S+ \S+ )?[A-Z]+ [\w.]+: (.*)$")


def loaded(lines, component: str) -> list[str]:
    """The dtypes each "loaded <component>: ..." line (training.models) names."""
    return [line.split(" in ")[1].split(" on ")[0] for line in lines if line.startswith(f"loaded {component}:")]


class VaryingJudge(HttpJudge):
    """The loopback VLM of test_bench (yes to fidelity and consistency), answering every second realism
    question yes: rewards 1 and 2/3 alternate, so DDPO's advantages and gradient are not zero."""

    def __init__(self):
        super().__init__("")
        self.realism, self.lock = 0, threading.Lock()

    def script(self, call):
        if call.question != "realism":
            return super().script(call)
        with self.lock:
            self.realism += 1
            return Reply.answer("Yes." if self.realism % 2 == 0 else "No.")


# -- the stand-in, the data, the judge: once per session -----------------------------------------------
@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    if comfy_path() is None:
        pytest.skip(skip_reason())
    import_host()
    from standin_kontext import build_standin
    from training.models import find_tokenizers

    root = tmp_path_factory.mktemp("standin")
    yield build_standin(root, find_tokenizers(comfy_path()))
    shutil.rmtree(root, ignore_errors=True)  # 4 GB: not left in pytest's kept tmp dirs


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """3 training tuples (1 held out by DDPO, 2 rolled out) and 1 test sample, 64 px."""
    return micro_world(tmp_path_factory.mktemp("rehearsal-world"), tasks=("animal_scene",), train=3, test=1)


@pytest.fixture(scope="session")
def judge(tmp_path_factory):
    server = VaryingJudge()
    server.server.start()
    server.path = server.config(tmp_path_factory.mktemp("judges"))
    yield server
    server.server.stop()


@pytest.fixture(scope="session")
def sft_run(standin, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    lines = run_cli("training.sft", "--config", "training/configs/kontext_sft.json", "--out", str(out), "-q",
                    *as_argv(sft_settings(standin["release"], world)))
    return out, lines


@pytest.fixture(scope="session")
def ddpo_run(standin, world, judge, sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpo")
    before = judge.server.count
    lines = run_cli("training.ddpo", "--config", "training/configs/kontext_ddpo.json", "--out", str(out), "-q", "-v",
                    *as_argv(ddpo_settings(standin["release"], world, sft_run[0] / "lora.safetensors", judge.path)))
    return out, lines, judge.server.count - before


def check_sft_lora(path: Path, standin: dict, world_size: int):
    from dual_rope.lora_meta import base_fingerprint
    from training.lora_io import load_lora

    state, meta = load_lora(path)
    assert (meta.stage, meta.layout, meta.rank, meta.alpha) == ("sft", "diagonal", 4, 4.0)
    assert meta.train["precision"] == "bf16" and meta.train["world_size"] == world_size and meta.train["steps"] == 2
    assert {v.dtype for v in state.values() if v.ndim == 2} == {torch.bfloat16}  # lora.save_dtype
    assert {v.shape[0] for k, v in state.items() if ".lora_A." in k} == {4}
    assert len([k for k in state if ".lora_A." in k]) == 18  # 12 double-block + 5 single-block modules + proj_out
    # Trained on the release folder's shards, it names the base the ComfyUI single file is (BFL names).
    with safe_open(str(standin["transformer"]), framework="pt") as f:
        assert meta.base_fingerprint == base_fingerprint(f.get_tensor, 1, 1, naming="bfl")
    assert meta.base_fingerprint.startswith("flux1:d1s1w3072c64:")


# -- one process --------------------------------------------------------------------------------------
def test_sft_on_the_release_folder(sft_run, standin):
    out, lines = sft_run
    check_sft_lora(out / "lora.safetensors", standin, world_size=1)
    assert loaded(lines, "transformer") == ["bfloat16"]  # as loaded, before the trainer adds fp32 LoRA weights
    assert loaded(lines, "text_encoder_2") == ["bfloat16"] and loaded(lines, "text_encoder") == ["bfloat16"]
    assert loaded(lines, "vae") == ["float32"]
    assert any("each epoch uses 3 of 3 samples" in line for line in lines)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and all(s["loss"] > 0 for s in steps if "loss" in s)


def test_ddpo_against_a_judge_on_loopback(ddpo_run, sft_run):
    from dual_rope.lora_meta import lora_content_hash
    from training.lora_io import load_lora

    out, lines, questions = ddpo_run
    # DDPO's, then the final evaluation's (the base, which SFT's LoRA is then merged into) and a fresh
    # base for SFT+DDPO's merge
    assert loaded(lines, "transformer") == ["bfloat16"] * 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (iteration,) = [r for r in rows if "n_judged" in r]
    # 2 tuples x 2 rollouts judged; realism alternates, so the rewards differ and the update moves
    assert (iteration["n_judged"], iteration["n_unjudged"]) == (4, 0) and iteration["reward"] == pytest.approx(5 / 6)
    assert iteration["grad_norm"] > 0
    held_out = [r for r in rows if "eval_n" in r]
    assert [(r["step"], r["eval_n"], r["eval_unjudged"]) for r in held_out] == [(0, 1, 0), (1, 1, 0)]
    table = json.loads((out / "table2.json").read_text())
    assert table["judge"] == f"{PROFILE}-binary" and set(table["summary"]) == {"base", "sft", "sft_ddpo"}
    judged = {}
    for variant in ("base", "sft", "sft_ddpo"):
        summary = json.loads((out / "eval" / variant / "judge" / f"{PROFILE}-binary" / "summary.json").read_text())
        judged[variant] = summary["overall"]["n_judged"]
    assert judged == {"base": 1, "sft": 1, "sft_ddpo": 1}  # the one test sample, by each model
    assert questions == 3 * (4 + 2 + 3)  # three binary questions per judged sample, none asked twice
    state, meta = load_lora(out / "dualref_ddpo.safetensors")
    assert (meta.stage, meta.rank, meta.layout) == ("ddpo", 4, "diagonal")
    assert meta.sft_lora == lora_content_hash(sft_run[0] / "lora.safetensors")


def test_bench_headless_on_the_release_folder(standin, world, judge, ddpo_run, tmp_path):
    out, loras = tmp_path / "bench", ddpo_run[0]  # the DDPO run folder keeps both LoRAs
    lines = run_cli("training.bench", "--model", str(standin["release"]), "--manifest", str(world), "--tasks",
                    "animal_scene", "--steps", "2", "--lora", str(loras / "dualref_sft.safetensors"), "--lora2",
                    str(loras / "dualref_ddpo.safetensors"), "--precision", "bf16", "--judge", PROFILE,
                    "--judge-config", str(judge.path), "--out", str(out), "-q", "-v")
    assert loaded(lines, "transformer") == ["bfloat16"]
    check_table2(out)


def check_table2(out: Path):
    table = json.loads((out / "table2.json").read_text())
    summary = table["judges"][f"{PROFILE}-binary"]
    assert summary["overall"]["n_judged"] == 1 and summary["tasks"]["animal_scene"]["n_judged"] == 1
    assert (out / "table2.md").read_text().count("| ") > 5
    (png,) = (out / "outputs").glob("*.png")
    with Image.open(png) as im:
        assert im.size == (64, 64)
    return png


@pytest.fixture
def host(standin, ddpo_run, tmp_path_factory):
    """ComfyUI with the stand-in's single files, both LoRAs and the depth-counting text-encoder loader
    (stopped after its test: its ~4 GB are not held while the two-process run goes)."""
    base = tmp_path_factory.mktemp("rehearsal-host")
    models = base / "models"
    for folder, key in (("diffusion_models", "transformer"), ("vae", "vae"), ("text_encoders", "clip_l"),
                        ("text_encoders", "t5")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        (models / folder / standin[key].name).symlink_to(standin[key])
    (models / "loras").mkdir()
    for name in ("dualref_sft.safetensors", "dualref_ddpo.safetensors"):
        shutil.copyfile(ddpo_run[0] / name, models / "loras" / name)
    (base / "custom_nodes").mkdir()
    shutil.copyfile(Path(__file__).parent / "comfy_depth_loader.py", base / "custom_nodes" / "comfy_depth_loader.py")
    with start_server(base=base) as server:
        yield server


def test_bench_comfyui_on_the_real_host_with_both_loras(standin, world, judge, host, tmp_path):
    from comfy_queue.fill import load_workflow
    from tiny_comfy_models import shrink_for_cpu
    from training.bench.cli import main

    loader = {"class_type": "DepthDualCLIPLoader", "inputs": {
        "clip_name1": standin["clip_l"].name, "clip_name2": standin["t5"].name, "type": "flux", "device": "default"}}
    (tmp_path / "workflows").mkdir()
    graph = shrink_for_cpu(load_workflow("animal_scene"), steps=None, text_encoder=loader)
    (tmp_path / "workflows" / "animal_scene.json").write_text(json.dumps(graph))
    out = tmp_path / "bench"
    argv = ["--generator", "comfyui", "--server", host.url, "--workflow-dir", str(tmp_path / "workflows"),
            "--manifest", str(world), "--tasks", "animal_scene", "--steps", "2", "--model", standin["transformer"].name,
            "--lora", "dualref_sft.safetensors", "--lora2", "dualref_ddpo.safetensors", "--layout", "diagonal",
            "--judge", PROFILE, "--judge-config", str(judge.path), "--timeout", "600", "--out", str(out), "-q"]
    assert main(argv) == 0, host.log_text()[-3000:]
    png = check_table2(out)
    with Image.open(png) as im:
        queued = {n["class_type"]: n["inputs"] for n in json.loads(im.info["prompt"]).values()}  # what ComfyUI ran
    assert (queued["DualLoRAApply"]["sft_lora"], queued["DualLoRAApply"]["ddpo_lora"]) == \
        ("dualref_sft.safetensors", "dualref_ddpo.safetensors")
    assert queued["UNETLoader"]["unet_name"] == standin["transformer"].name
    assert queued["DiagonalPositionPatch"]["method"] == "diagonal"
    assert "lora key not loaded" not in host.log_text()


def test_dual_lora_apply_patches_every_module_of_the_single_file(standin, ddpo_run, pack, caplog):
    """ComfyUI's own load of the single-file transformer (UNETLoader's code) under both LoRAs."""
    import comfy.model_management
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(ddpo_run[0]))
    model = comfy.sd.load_diffusion_model(str(standin["transformer"]), model_options={"dtype": torch.bfloat16})
    try:
        assert model.model.diffusion_model.hidden_size == 3072
        load = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
        layout = load("position_patch").DiagonalPositionPatch.execute(model, "diagonal", 1.0, 1.0).result[0]
        with caplog.at_level(logging.WARNING):
            patched, report = load("lora_apply").DualLoRAApply.execute(
                layout, "dualref_sft.safetensors", 1.0, "dualref_ddpo.safetensors", 1.0, "error").result
        assert not [r.getMessage() for r in caplog.records if "lora" in r.getMessage().lower()]
        assert "sft: dualref_sft.safetensors at strength 1, 18 modules, rank 4, layout diagonal" in report
        assert "ddpo: dualref_ddpo.safetensors at strength 1, 18 modules, rank 4, layout diagonal" in report
        # 18 modules per LoRA on 11 ComfyUI weights (q/k/v and the single block's MLP are slices of fused ones)
        assert len(patched.patches) == 11 and sum(map(len, patched.patches.values())) == 2 * 18
    finally:
        comfy.model_management.unload_all_models()
        del model
        gc.collect()


# -- two processes ------------------------------------------------------------------------------------
def test_sft_ddp_and_fsdp_then_ddpo_on_two_processes(standin, world, judge, tmp_path):
    """torchrun + gloo, as accelerate launch runs them: both ranks encode their share of a cold cache
    before either reads it, each trains its half of every batch (SFT with DDP, then again with FSDP2:
    the same LoRA) and rolls out its half of the tuples."""
    from training.lora_io import load_lora

    cache = tmp_path / "cache"  # cold: the single-process runs' cache is not reused
    common = [f"data.cache_dir={cache}"]
    loras = {}
    for mode in ("ddp", "fsdp"):  # kontext_sft.json ships fsdp
        sft = torchrun_command("training.sft", REPO / "training/configs/kontext_sft.json", tmp_path / mode, 2,
                               *as_argv(sft_settings(standin["release"], world, batch=2) + common +
                                        [f"train.distributed={mode}"]))
        lines = run_cli("torchrun", *sft, env=one_thread_env(REPO))
        check_sft_lora(tmp_path / mode / "lora.safetensors", standin, world_size=2)
        assert loaded(lines, "transformer") == ["bfloat16"] * 2  # each rank loads it in bf16
        loras[mode] = load_lora(tmp_path / mode / "lora.safetensors")[0]
        (saved,) = (tmp_path / mode / "checkpoints").glob("step_*/state.json")
        assert json.loads(saved.read_text()).get("sharded", False) == (mode == "fsdp")  # FSDP really ran
        if mode == "ddp":  # the main process's reading pass finds all 9 images and 3 texts already encoded by the shared pass
            assert any(re.match(rf"cache {re.escape(str(cache))}\S*: images 9 cached \+ 0 encoded, texts 3 cached \+ 0 encoded",
                                line) for line in lines), lines
    assert loras["ddp"].keys() == loras["fsdp"].keys()
    for name, value in loras["ddp"].items():  # 2 steps at the bf16 base: FSDP2 (each block all-gathered in its
        assert torch.equal(loras["fsdp"][name], value), name  # own dtype, fp32 reduce) trains DDP's LoRA bit for bit

    before = judge.server.count
    ddpo = torchrun_command("training.ddpo", REPO / "training/configs/kontext_ddpo.json", tmp_path / "ddpo", 2,
                            *as_argv(ddpo_settings(standin["release"], world, tmp_path / "fsdp" / "lora.safetensors",
                                                   judge.path) + common), "-v")
    lines = run_cli("torchrun", *ddpo, env=one_thread_env(REPO))
    assert loaded(lines, "transformer") == ["bfloat16"] * 6  # both ranks for DDPO, twice each for the shared evaluation
    rows = [json.loads(x) for x in (tmp_path / "ddpo" / "metrics.jsonl").read_text().splitlines()]
    (iteration,) = [r for r in rows if "n_judged" in r]
    assert (iteration["n_judged"], iteration["n_unjudged"]) == (4, 0) and iteration["grad_norm"] > 0
    assert json.loads((tmp_path / "ddpo" / "table2.json").read_text())["judge"] == f"{PROFILE}-binary"
    assert judge.server.count - before == 3 * (4 + 2 + 3)
