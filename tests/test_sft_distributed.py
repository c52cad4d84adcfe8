"""Two gloo processes train the same LoRA as one process at the same global batch (issue 4 part 6).

Real torch.distributed: ``torchrun`` starts the processes, accelerate's ``Accelerator`` joins them
on gloo (CPU) and wraps the model in DDP. Each process takes its half of every global batch; noise
and sigmas are keyed by the sample's slot in the global batch, so the only differences left are
float rounding: DDP averages gradients in another order, and convolution/matmul kernels round
differently for a batch of 2 than of 4, and Adam magnifies rounding where a gradient is tiny.
Tolerance, per LoRA tensor after 4 Adam steps at lr 2e-3: max |difference| <= 2e-3 x max |weight|
(measured here: 4.3e-4 at worst, on one lora_B); a mis-split batch or a missing gradient sync gives
differences of the order of the weights themselves. The logged losses agree to 1e-5.
"""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sft_helpers import ctrl_c_when, largest_relative_difference, micro_model, micro_world, run_to_completion, \
    torchrun_command

REPO = Path(__file__).resolve().parents[1]


def _command(config: Path, out: Path, processes: int) -> list[str]:
    return torchrun_command("training.sft", config, out, processes)


def _run(config: Path, out: Path, processes: int, *extra: str):
    run_to_completion(_command(config, out, processes) + list(extra), REPO)
    return load_file(out / "lora.safetensors"), [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_two_gloo_processes_match_one(tmp_path):
    model = micro_model(tmp_path / "micro")
    manifest = micro_world(tmp_path / "world", tasks=("person_scene",), train=8, test=2)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({
        "model": {"path": str(model)}, "data": {"manifest": str(manifest), "batch_size": 4},
        "lora": {"rank": 4, "save_dtype": "fp32"}, "optim": {"lr": 2e-3}, "train": {"max_steps": 4},
        "run": {"checkpoint_every": 0, "val_at_start": False, "val_samples": 0, "val_loss_samples": 2}}))
    one, metrics_one = _run(config, tmp_path / "one", 1)
    two, metrics_two = _run(config, tmp_path / "two", 2)
    worst = largest_relative_difference(one, two, 2e-3)  # fp32 files: bf16 rounding alone is 4e-3
    moved = max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k)
    assert moved > 1e-3  # the LoRA did train, so the comparison means something
    loss_one = [r["loss"] for r in metrics_one if "loss" in r]
    loss_two = [r["loss"] for r in metrics_two if "loss" in r]  # mean over both processes' halves
    assert loss_one == pytest.approx(loss_two, rel=1e-5)
    print(f"largest LoRA difference between 1 and 2 processes: {worst:.3g} of the tensor's scale")


@pytest.mark.timeout(900)
def test_ctrl_c_on_two_processes_saves_the_last_step_and_resume_matches(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group): the main process saves the last
    finished step alone (no barrier: its peer may be gone), and ``--resume`` ends with the LoRA of
    an uninterrupted two-process run."""
    model = micro_model(tmp_path / "micro")
    manifest = micro_world(tmp_path / "world", tasks=("person_scene",), train=8, test=2)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({  # checkpoint_every 0: only the interrupt can write a checkpoint early
        "model": {"path": str(model)}, "data": {"manifest": str(manifest), "batch_size": 4},
        "lora": {"rank": 4, "save_dtype": "fp32"}, "optim": {"lr": 2e-3}, "train": {"max_steps": 40},
        "run": {"checkpoint_every": 0, "val_at_start": False, "val_samples": 0, "val_loss_samples": 2}}))
    straight, _ = _run(config, tmp_path / "straight", 2)

    out = tmp_path / "cut"
    assert ctrl_c_when(_command(config, out, 2), out / "metrics.jsonl", 3, tmp_path / "cut.log", REPO) != 0
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    assert steps and 3 <= steps[-1] < 40, ((tmp_path / "cut.log").read_text()[-3000:], steps)

    resumed, _ = _run(config, out, 2, "--resume")
    worst = largest_relative_difference(straight, resumed, 2e-3)
    print(f"interrupted at step {steps[-1]}; largest LoRA difference after --resume: {worst:.3g}")


def _fsdp_config(tmp_path, distributed: str, steps: int) -> Path:
    """bf16 base + fp32 LoRA with gradient checkpointing, as kontext_sft.json trains."""
    model = micro_model(tmp_path / "micro")
    manifest = micro_world(tmp_path / "world", tasks=("person_scene",), train=8, test=2)
    config = tmp_path / f"{distributed}-{steps}.json"
    config.write_text(json.dumps({
        "model": {"path": str(model)}, "data": {"manifest": str(manifest), "batch_size": 4, "val_split": "test"},
        "lora": {"rank": 4, "save_dtype": "fp32"}, "optim": {"lr": 2e-3},
        "train": {"max_steps": steps, "precision": "bf16", "gradient_checkpointing": True, "distributed": distributed},
        "run": {"checkpoint_every": 2, "val_at_start": False, "val_samples": 1, "val_loss_samples": 2}}))
    return config


@pytest.mark.timeout(900)
def test_fsdp_matches_ddp_and_an_interrupted_fsdp_run_resumes_to_the_same_lora(tmp_path):
    """train.distributed=fsdp: FSDP2 shards each Flux block over two gloo processes (accelerate's own
    FSDP2 path, which runtime.make_accelerator also gives CPU processes), with the policy
    of runtime.fsdp_mixed_precision (each parameter all-gathered in its own dtype: bf16 frozen base,
    fp32 LoRA; fp32 gradient reduction; the bf16 compute is the model's autocast, as under DDP).

    Against DDP on the same seed: both see the same two fp32 gradient summands per element (DDP's
    all-reduce, FSDP's reduce-scatter; a + b rounds alike in either order) and compute in the same
    dtypes, so the runs agree exactly here (measured: every loss and LoRA tensor bit-equal). Asserted
    with a margin: losses to 1e-6 relative, LoRA tensors to 1e-5 of their scale, because gradient
    clipping's norm is summed from shards under FSDP, from whole tensors under DDP (another order).
    A missing gradient sync or a wrong dtype moves them by 1e-3 or more.

    Resume: on Ctrl-C an FSDP run saves nothing (its shards need every process); the rerun continues
    from the last periodic checkpoint (accelerate's sharded state + our data position) and ends with
    exactly the uninterrupted FSDP run's LoRA (torch.equal)."""
    import torch

    ddp, metrics_ddp = _run(_fsdp_config(tmp_path, "ddp", 6), tmp_path / "ddp", 2)
    config = _fsdp_config(tmp_path, "fsdp", 6)
    fsdp, metrics_fsdp = _run(config, tmp_path / "fsdp", 2)
    saved = tmp_path / "fsdp" / "checkpoints" / "step_0000006"
    assert json.loads((saved / "state.json").read_text())["sharded"]
    assert (saved / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP save: the model was FSDP, not DDP
    assert (tmp_path / "fsdp" / "val" / "step_0000006.png").is_file()  # sampling with sharded weights
    assert max(float(v.abs().max()) for k, v in ddp.items() if "lora_B" in k) > 1e-3  # it trained
    largest_relative_difference(ddp, fsdp, 1e-5)
    for key in ("loss", "val_loss"):
        one = [r[key] for r in metrics_ddp if key in r]
        assert one and [r[key] for r in metrics_fsdp if key in r] == pytest.approx(one, rel=1e-6), key

    out = tmp_path / "cut"
    assert ctrl_c_when(_command(config, out, 2), out / "metrics.jsonl", 3, tmp_path / "cut.log", REPO) != 0
    steps = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*") if p.is_dir())
    assert steps and steps[-1] < 6, ((tmp_path / "cut.log").read_text()[-3000:], steps)
    resumed, _ = _run(config, out, 2, "--resume")
    assert all(torch.equal(fsdp[k], resumed[k]) for k in fsdp)
