"""Shared builders for the model/data/SFT tests: a micro Kontext folder and a small toy world.

The micro model is the toy factory's architecture with random weights (its VAE untrained), built
in a few seconds; tests that need the *pretrained* toy base say so. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from training.config import SFTConfig
from training.toy.templates import vocabulary
from training.toy.world import generate_world
from training.toy.models import TOY_MAX_SEQUENCE_LENGTH, build_components, save_folder


def micro_model(folder: Path, seed: int = 0) -> Path:
    if (folder / "dualref.json").is_file():
        return folder
    parts = build_components(vocabulary(), seed)
    settings = {"name": "micro test model", "max_sequence_length": TOY_MAX_SEQUENCE_LENGTH,
                "sampling": {"guidance": 1.0, "shift": None, "num_steps": 3}, "train": {"guidance": 1.0}}
    return save_folder(folder, parts, settings)


def micro_world(folder: Path, tasks=("animal_scene",), train: int = 16, test: int = 4, seed: int = 0) -> Path:
    generate_world(folder, seed, train=train, test=test, tasks=tuple(tasks), progress=False)
    return folder / "manifest.jsonl"


def sft_config(model: Path, manifest: Path, out: Path, **sections) -> SFTConfig:
    """A seconds-long LoRA run: rank 4, batch 4, no progress bar, 3-step validation sampling."""
    cfg = SFTConfig()
    cfg.model.path = str(model)
    cfg.data.manifest = str(manifest)
    cfg.data.batch_size = 4
    cfg.data.val_split = "test"  # these tests' held-out loss: the micro world's whole test split
    cfg.lora.rank = 4
    cfg.optim.lr = 2e-3
    cfg.train.max_steps = 6
    cfg.run.out_dir = str(out)
    cfg.run.progress = False
    cfg.run.checkpoint_every = 0
    cfg.run.val_every = 0
    cfg.run.val_samples = 2
    cfg.run.val_loss_samples = 4
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def largest_relative_difference(one: dict, two: dict, tolerance: float) -> float:
    """Asserts every tensor of ``two`` is within ``tolerance`` of ``one``, relative to that tensor's
    largest entry (gloo's reduction order differs from one process's sum); returns the worst ratio."""
    assert one.keys() == two.keys()
    worst = 0.0
    for key in one:
        scale = max(float(one[key].abs().max()), 1e-12)
        ratio = float((two[key] - one[key]).abs().max()) / scale
        assert ratio <= tolerance, (key, ratio)
        worst = max(worst, ratio)
    return worst


def torchrun_command(module: str, config: Path, out: Path, processes: int, *extra: str) -> list[str]:
    """``python -m <module> --config ... --out ... --quiet`` on ``processes`` gloo processes via torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", module, "--config", str(config), "--out", str(out), "--quiet", *extra]


def one_thread_env(repo: Path) -> dict:
    """Each process on one thread (two share the 2 cores), importing this checkout."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))


def run_to_completion(cmd: list[str], repo: Path) -> None:
    done = subprocess.run(cmd, cwd=repo, env=one_thread_env(repo), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def ctrl_c_when(cmd: list[str], metrics_path: Path, min_step: int, log_path: Path, cwd: Path) -> int:
    """Run ``cmd`` in its own process group, send that group SIGINT (a terminal's Ctrl-C) once
    ``metrics_path`` has a row with ``step >= min_step``, and return the exit status."""
    import signal
    import time

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=one_thread_env(cwd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
            if any(json.loads(line).get("step", 0) >= min_step for line in lines if line.strip()):
                break
            time.sleep(0.1)
        if proc.poll() is not None:
            sys.stderr.write(log_path.read_text()[-3000:])
            raise AssertionError("the run ended before it could be interrupted")
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=120)
