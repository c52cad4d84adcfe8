"""Two gloo processes run the same DDPO as one process at the same global batch (issue 5 part 5).

Real torch.distributed: ``torchrun`` starts ``python -m training.ddpo`` (the main job's CLI, with a
given SFT LoRA so it goes straight to DDPO), accelerate joins the processes on gloo. Slot s of an
iteration is sampled by process s % 2 with the noise and guidance keyed by s, the reward table is
summed across processes, every process computes the baseline and advantages from the whole table
(the loop gathers them and logs their largest disagreement as ``sync_error``), and the gradients
of each minibatch are summed. What is left is float rounding: the rollouts are sampled in batches
of another size (kernels round differently), which moves rewards by ~1e-7 and, through Adam's
normalised steps, the LoRA weights by a little. Tolerances: rewards 1e-5 absolute, LoRA tensors
2e-3 of the tensor's scale; a missing gather or a baseline out of sync changes the rewards'
advantages' signs and the weights by their own size.
"""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ddpo_helpers import ddpo_values, metrics, micro_setup
from sft_helpers import ctrl_c_when, largest_relative_difference, run_to_completion, torchrun_command

REPO = Path(__file__).resolve().parents[1]


def _command(config: Path, out: Path, processes: int) -> list[str]:
    return torchrun_command("training.ddpo", config, out, processes)


def _run(config: Path, out: Path, processes: int):
    run_to_completion(_command(config, out, processes), REPO)
    return load_file(out / "dualref_ddpo.safetensors"), metrics(out)


@pytest.mark.timeout(600)
def test_two_gloo_processes_match_one(tmp_path):
    model, manifest, sft = micro_setup(tmp_path)
    values = ddpo_values(model, manifest, sft, tmp_path / "unused", eval={"limit_per_task": 1, "grid_per_task": 1},
                         lora={"save_dtype": "fp32"})  # compared at 2e-3: bf16 files alone round by 4e-3
    config = tmp_path / "ddpo.json"
    config.write_text(json.dumps(values))
    one, rows_one = _run(config, tmp_path / "one", 1)
    two, rows_two = _run(config, tmp_path / "two", 2)
    assert [r["step"] for r in rows_two] == [1, 2]
    for a, b in zip(rows_one, rows_two):
        assert b["n_judged"] == a["n_judged"] == 8  # every slot sampled once, by one of the processes
        for key in ("reward", "fidelity", "consistency", "realism", "baseline", "reward_std"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        assert b["sync_error"] <= 1e-12  # both processes hold the same baseline and advantages
        assert b["optimizer_steps"] == a["optimizer_steps"]
        assert b["onpolicy_ratio_error"] <= 1e-6
    worst = largest_relative_difference(one, two, 2e-3)
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-4  # it did train
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert set(summary) == {"base", "sft", "sft_ddpo"}
    print(f"largest DDPO LoRA difference between 1 and 2 processes: {worst:.3g} of the tensor's scale")


@pytest.mark.timeout(900)
def test_ctrl_c_on_two_processes_saves_the_last_iteration_and_the_rerun_finishes_it(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group) mid-run: the main process saves the
    last completed iteration alone (no barrier: its peer may be gone) and a rerun on the same folder
    ends with the same DDPO LoRA as an uninterrupted two-process run."""
    model, manifest, sft = micro_setup(tmp_path)
    # checkpoint_every 100: only the interrupt itself can write a checkpoint before the end.
    values = ddpo_values(model, manifest, sft, tmp_path / "unused", ddpo={"iterations": 6}, lora={"save_dtype": "fp32"},
                         run={"checkpoint_every": 100, "eval_every": 0, "progress": False},
                         eval={"limit_per_task": 1, "grid_per_task": 1})
    config = tmp_path / "ddpo.json"
    config.write_text(json.dumps(values))
    straight, _ = _run(config, tmp_path / "straight", 2)

    out = tmp_path / "cut"
    assert ctrl_c_when(_command(config, out, 2), out / "metrics.jsonl", 2, tmp_path / "cut.log", REPO) != 0
    steps = sorted(int(p.name.split("_")[1]) for p in out.rglob("step_*") if p.is_dir())
    assert steps and 2 <= steps[-1] < 6, ((tmp_path / "cut.log").read_text()[-3000:], steps)

    resumed, rows = _run(config, out, 2)
    assert rows[-1]["step"] == 6
    worst = largest_relative_difference(straight, resumed, 2e-3)
    print(f"interrupted at iteration {steps[-1]}; largest LoRA difference after the rerun: {worst:.3g}")


def _verdicts(run: Path) -> dict:
    """id -> (status, verdict without its latency) of an eval run folder (the latest line per id)."""
    (folder,) = (run / "judge").iterdir()
    lines = [json.loads(x) for x in (folder / "verdicts.jsonl").read_text().splitlines() if x.strip()]
    return {r["id"]: (r["status"], {k: v for k, v in r["verdict"].items() if k != "latency_s"}) for r in lines}


@pytest.mark.timeout(600)
def test_two_processes_share_the_final_evaluation_and_the_held_out_check(tmp_path):
    """Each process samples (and, in the held-out check, judges) its share of the batches; the results
    are gathered and the main process writes them. Batches are split whole (every other batch), so each
    sample is computed in the batch one process would use, with its own sample_seed: the numbers are
    equal, not close. Final table: the two-process run's own LoRAs, evaluated again by one process
    (the run folder copied without eval/), give the same verdict for every sample and the same
    summary.json. Held-out check: at step 0 both runs hold the same weights (the SFT LoRA merged, a
    zero DDPO LoRA), so the 1- and 2-process checks are equal. After DDPO's update they are not
    compared: 1- and 2-process rollouts differ by float rounding (test_two_gloo_processes_match_one)."""
    import shutil

    model, manifest, sft = micro_setup(tmp_path)
    # eval.batch_size 1: four held-out tuples and four test samples make four batches, two per process
    values = ddpo_values(model, manifest, sft, tmp_path / "unused", ddpo={"iterations": 1},
                         data={"manifest": str(manifest), "max_pixels": 4096, "val_count": 4},
                         eval={"grid_per_task": 1, "batch_size": 1})
    config = tmp_path / "ddpo.json"
    config.write_text(json.dumps(values))
    _, rows_one = _run(config, tmp_path / "one", 1)
    _, rows_two = _run(config, tmp_path / "two", 2)

    start_one, start_two = rows_one[0], rows_two[0]
    assert start_one["step"] == start_two["step"] == 0
    assert start_two.pop("eval_per_rank") == [2, 2] and "eval_per_rank" not in start_one  # both did work
    assert start_two == start_one and start_one["eval_n"] == 4
    assert rows_two[-1]["eval_per_rank"] == [2, 2]  # the check after the last iteration too

    again = tmp_path / "again"  # the two-process run's LoRAs, evaluated by one process
    shutil.copytree(tmp_path / "two", again, ignore=shutil.ignore_patterns("eval", "summary.*", "table2.*"))
    run_to_completion(_command(config, again, 1), REPO)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary == json.loads((again / "summary.json").read_text())
    for name in ("base", "sft", "sft_ddpo"):
        shared, single = tmp_path / "two" / "eval" / name, again / "eval" / name
        assert _verdicts(shared) == _verdicts(single) and len(_verdicts(shared)) == 4, name
        for png in (single / "outputs").iterdir():
            assert (shared / "outputs" / png.name).read_bytes() == png.read_bytes(), (name, png.name)
        lines = [json.loads(x) for x in (shared / "generated.jsonl").read_text().splitlines()]
        assert sorted(r["rank"] for r in lines) == [0, 0, 1, 1], name  # each process made two outputs
        assert all("rank" not in json.loads(x) for x in (single / "generated.jsonl").read_text().splitlines())
