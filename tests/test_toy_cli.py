"""``python -m training.toy``: world -> toy base -> base Table (and base vs SFT), cached, on a smoke recipe.

The default recipe takes minutes; here the base, the world and the SFT runs are seconds-sized
(tiny counts, a few steps), which exercises every stage and the caches, not the numbers.
"""
from __future__ import annotations

import json

import pytest

from training.toy import __main__ as toy_cli
from training.toy.tables import gains_markdown, paired_gains, summarise, table2_markdown, wins

SMOKE = ["--train", "3", "--test", "1", "--layouts", "offset", "diagonal", "--quiet",
         "--recipe", "single_train=8", "--recipe", "single_test=2", "--recipe", "vae_images=16",
         "--recipe", "vae_steps=2", "--recipe", "base_steps=2", "--recipe", "base_batch=4"]
SFT = ["--sft-table", "--sft-set", "train.max_steps=2", "--sft-set", "data.batch_size=5",
       "--sft-set", "lora.rank=2", "--sft-set", "run.val_every=0", "--sft-set", "run.checkpoint_every=0"]


def test_summary_and_table_shape():
    rows = [("animal_scene", {"fidelity": 1, "consistency": 1, "realism": 1, "reward": 1.0}),
            ("animal_scene", {"fidelity": 0, "consistency": 1, "realism": 1, "reward": 2 / 3}),
            ("style_transfer", {"fidelity": 0, "consistency": 0, "realism": 0, "reward": 0.0})]
    s = summarise(rows)
    assert s["animal_scene"]["reward"] == pytest.approx(5 / 6) and s["animal_scene"]["n"] == 2
    assert s["mean"]["reward"] == pytest.approx(5 / 9) and s["mean"]["n"] == 3
    text = table2_markdown([("Base", s)])
    assert text.splitlines()[0] == "| Model | Animal | Person | Group | Style | Clothing | Mean |"
    assert text.splitlines()[2] == "| Base | 0.833 | - | - | 0.000 | - | 0.556 |"
    better = summarise([(t, dict(rows[0][1])) for t in ("animal_scene", "style_transfer")])
    assert wins(s, better) == ["style_transfer", "animal_scene"][::-1] or set(wins(s, better)) == {"animal_scene", "style_transfer"}
    assert wins(better, s) == []


def test_paired_gains_pair_samples_by_id():
    def rows(task, rewards):
        return [{"id": f"{task}-{i}", "task": task, "reward": r} for i, r in enumerate(rewards)]

    base = rows("animal_scene", [0.0, 1 / 3, 1.0, 2 / 3]) + rows("person_scene", [1.0, 1.0])
    # The same samples in another order; person gains nothing, animal +1/3 on three of four samples.
    other = rows("animal_scene", [1 / 3, 2 / 3, 1.0, 1.0])[::-1] + rows("person_scene", [1.0, 1.0])
    gains = paired_gains(base, other)
    mean, se, n = gains["animal_scene"]
    assert n == 4 and mean == pytest.approx(0.25) and se == pytest.approx((1 / 3) / 2 / 2)
    assert gains["person_scene"] == (0.0, 0.0, 2) and "style_transfer" not in gains
    assert paired_gains(base, rows("animal_scene", [1.0]) + rows("group_portrait", [1.0])) == \
        {"animal_scene": (1.0, pytest.approx(float("nan"), nan_ok=True), 1)}
    table = gains_markdown([("SFT - base", gains)])
    assert table.splitlines()[2] == "| SFT - base | +0.250 ± 0.083 | +0.000 ± 0.000 | - | - | - |"


def test_cli_builds_prints_and_reruns_from_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = SMOKE + ["--out", str(tmp_path / "toy"), "--cache-dir", str(tmp_path / "cache")] + SFT + \
        ["--markdown", str(tmp_path / "tables.md")]
    assert toy_cli.main(args) == 0
    first = capsys.readouterr().out
    assert "Base Table 2" in first and "| Base (offset) |" in first and "| Base (diagonal) |" in first
    assert "| SFT (offset) |" in first and "| SFT (diagonal) |" in first
    assert "| SFT - base (offset) |" in first and "| SFT - base (diagonal) |" in first
    assert "single_edit" in first or "Single" in first
    evals = sorted((tmp_path / "toy" / "evals").glob("eval-*.json"))
    assert len(evals) == 1 + 2 + 2  # single_edit, base x 2 layouts, SFT x 2 layouts
    for path in evals:  # per-sample verdicts beside the summary, one per judged sample
        saved = json.loads(path.read_text())
        assert len(saved["samples"]) == saved["summary"]["mean"]["n"]
        assert {"id", "task", "fidelity", "consistency", "realism", "reward"} <= set(saved["samples"][0])
    for layout in ("offset", "diagonal"):
        run = json.loads((tmp_path / "toy" / f"sft-{layout}" / "toy_run.json").read_text())
        assert run["steps"] == 2 and run["seconds"] > 0
    md = (tmp_path / "tables.md").read_text()
    assert md.startswith("Command: `python -m training.toy") and "| SFT (diagonal) |" in md

    # The rerun reads everything back: no model is loaded, nothing is trained or sampled.
    def forbidden(*a, **k):
        raise AssertionError("the rerun must come from the cache")

    monkeypatch.setattr("training.sft.trainer.train", forbidden)
    monkeypatch.setattr("training.models.load_kontext", forbidden)
    monkeypatch.setattr("training.evaluation.sample_split", forbidden)
    assert toy_cli.main(args) == 0
    second = capsys.readouterr().out
    strip = [line for line in second.splitlines() if not line.startswith("(total")]
    assert strip == [line for line in first.splitlines() if not line.startswith("(total")]
    assert sorted((tmp_path / "toy" / "evals").glob("eval-*.json")) == evals


def test_cli_names_a_bad_recipe_key(tmp_path, capsys):
    code = toy_cli.main(["--out", str(tmp_path / "toy"), "--cache-dir", str(tmp_path / "cache"), "--quiet",
                         "--train", "1", "--test", "1", "--recipe", "vae_stepz=3"])
    assert code == 2
    assert "vae_stepz" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        toy_cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--seed", "--train", "--test", "--layouts", "--judge-mode", "--recipe", "--sft-table",
                 "--sft-config", "--sft-set", "--markdown", "--cache-dir", "--threads"):
        assert flag in text
