"""bench/gpu_check.py, the GPU check of full-size Kontext: its --dry-run runs every stage's code on the
CPU at toy size (the GPU numbers themselves come from a run on a GPU, recorded in docs/gpu_check.md)."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_dry_run_measures_every_model_stage(tmp_path, capsys):
    import gpu_check

    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--only", "sft", "ddpo", "sampling", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu (dry run)"
    assert report["sft"]["step_s"] > 0 and report["sft"]["trainable_params"] > 0
    # the prediction it is held against is the planner's for full-size Kontext at rank 512
    assert 20 < report["sft"]["predicted_allocated_gib"] < report["sft"]["predicted_peak_gib"]
    assert report["ddpo"]["iteration_s"] == report["ddpo"]["rollout_s"] + report["ddpo"]["update_s"]
    assert report["sampling"]["steps"] == 2 and report["sampling"]["image_tokens"] == 3 * (64 // 16) ** 2
    assert "done in" in capsys.readouterr().out


def test_without_a_gpu_the_real_check_refuses(tmp_path, capsys):
    import gpu_check
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the real check is what runs
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--dry-run" in capsys.readouterr().err
