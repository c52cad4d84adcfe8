"""``python -m training.bench`` (issue 7, item 3): Table 2 and Table 1 runs on a small toy world.

The model is the toy architecture with random weights (tests/sft_helpers.micro_model): the real
loading, caching, layout, LoRA and sampling code, without the minutes of pretraining the real toy
base needs. Its outputs are noise, so judged scores are 0 except where a test puts known outputs
(exact targets) in place; that is also how resuming is checked (a present output is never redone).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from judge.loopback import Reply, ScriptedChatServer
from judge.toy import ToyJudge
from judge.verdict import JudgeRequest
from sft_helpers import micro_model
from training.bench.cli import main
from training.seeds import SEED_STRIDE
from training.lora_io import save_lora, transformer_fingerprint
from judge.manifest import TASKS
from training.toy.world import generate_world, make_sample

REPO = Path(__file__).resolve().parents[1]
PER_TASK = 2
FAST = ["--steps", "2", "-q"]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return micro_model(tmp_path_factory.mktemp("bench-model") / "micro")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Every task, PER_TASK test samples each (single_edit included); no training samples."""
    folder = tmp_path_factory.mktemp("bench-world")
    generate_world(folder, seed=0, train=0, test=PER_TASK, progress=False)
    return folder / "manifest.jsonl"


def copy_world(world: Path, dest: Path) -> Path:
    shutil.copytree(world.parent, dest, ignore=shutil.ignore_patterns(".cache"))
    return dest / "manifest.jsonl"


def lines(path: Path) -> list[dict]:
    return [json.loads(t) for t in path.read_text().splitlines() if t.strip()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def random_lora(path: Path, model: Path, seed: int, other_base: bool = False, layout="diagonal") -> Path:
    """A DualRef LoRA file for the micro transformer with random, clearly non-zero weights
    (``other_base``: its metadata names another base model of the same shape)."""
    from training.models import load_kontext

    gen = torch.Generator().manual_seed(seed)
    width = 128  # 4 heads x 32
    state = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v",
                   "single_transformer_blocks.0.attn.to_k"):
        state[f"{module}.lora_A.weight"] = torch.randn(4, width, generator=gen) / width ** 0.5
        state[f"{module}.lora_B.weight"] = torch.randn(width, 4, generator=gen) * 0.5
    fingerprint = transformer_fingerprint(load_kontext(model).transformer)
    if other_base:
        fingerprint = fingerprint[:-16] + "0123456789abcdef"
    save_lora(path, state, dict(layout=layout, stage="sft", rank=4, alpha=4.0, base_fingerprint=fingerprint))
    return path


# -- the toy judge's 0-10 score mode --------------------------------------------------------------
def test_toy_score_mode_ranks_exact_unchanged_and_noisy_outputs():
    judge = ToyJudge()
    sample = make_sample("single_edit", 0, 3, "test")
    noise = np.random.default_rng(0).integers(0, 256, sample.target.shape, dtype=np.uint8)

    def request(output):
        return JudgeRequest(sample.instruction, sample.refs[0], None, output, sample.id, sample.task, sample.plan)

    exact, unchanged, noisy = (judge.score(request(x)) for x in (sample.target, sample.refs[0], noise))
    assert exact.semantic_consistency > 9.5 and exact.perceptual_quality > 9.5 and exact.overall > 9.5
    assert unchanged.semantic_consistency < 1.0 < 9.0 < unchanged.perceptual_quality  # clean, but no edit made
    assert noisy.perceptual_quality < 1.0 and noisy.overall < 1.0
    assert exact.overall == pytest.approx(math.sqrt(exact.semantic_consistency * exact.perceptual_quality))
    assert exact.semantic_consistency == min(exact.sub_scores["semantic_consistency"])
    assert judge.submit_score(request(sample.target)).result().to_dict() == {
        **exact.to_dict(), "latency_s": pytest.approx(exact.latency_s, abs=1.0)}
    assert judge.judge(request(sample.target)).reward == 1.0  # the three-question mode is unchanged
    with pytest.raises(ValueError, match="has no plan"):
        judge.submit_score(JudgeRequest("x", sample.refs[0], None, sample.target)).result()


# -- the no-argument path -------------------------------------------------------------------------
def test_default_run_generates_judges_summarises_and_reports(tmp_path, monkeypatch, micro, capsys):
    """No manifest, model or judge given: the toy world is generated in runs/toy/world, the cached toy
    base is loaded (here: the micro model cached under the toy base's recipe key), the toy judge
    scores, and Table 2 + report.html come out. Outputs already present are reused, not redone."""
    from training.toy.base import DEFAULT_RECIPE, recipe_key

    cache = tmp_path / "cache"
    base = cache / f"toy-base-{recipe_key(DEFAULT_RECIPE)}"
    shutil.copytree(micro, base)
    settings = json.loads((base / "dualref.json").read_text())
    (base / "dualref.json").write_text(json.dumps({**settings, "complete": True}))
    monkeypatch.setenv("DUALREF_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)

    world = tmp_path / "runs" / "toy" / "world"
    run = tmp_path / "runs" / "bench" / "toy"
    exact = [f"animal_scene-test-{i:05d}" for i in range(PER_TASK)]
    (run / "outputs").mkdir(parents=True)
    for i, sample_id in enumerate(exact):  # an earlier run's outputs: here, the exact targets
        Image.fromarray(make_sample("animal_scene", 0, i, "test").target).save(run / "outputs" / f"{sample_id}.png")
    before = {p.name: p.stat().st_mtime_ns for p in (run / "outputs").iterdir()}

    assert main(["--limit-per-task", str(PER_TASK), "-q"]) == 0
    printed = capsys.readouterr().out

    assert (world / "manifest.jsonl").is_file() and json.loads((world / "world.json").read_text())["seed"] == 0
    ids = [s["id"] for s in lines(run / "manifest.jsonl")]
    assert len(ids) == 5 * PER_TASK and {i.split("-")[0] for i in ids} == set(TASKS)
    assert sorted(p.stem for p in (run / "outputs").glob("*.png")) == sorted(ids)
    assert {p: (run / "outputs" / p).stat().st_mtime_ns for p in before} == before  # reused as they were
    generated = {r["id"] for r in lines(run / "generated.jsonl")}
    assert generated == set(ids) - set(exact)

    verdicts = {r["id"]: r for r in lines(run / "judge" / "toy-binary" / "verdicts.jsonl")}
    assert set(verdicts) == set(ids) and all(r["status"] == "judged" for r in verdicts.values())
    assert all(verdicts[i]["verdict"]["reward"] == 1.0 for i in exact)
    summary = json.loads((run / "judge" / "toy-binary" / "summary.json").read_text())
    for task in TASKS:
        rewards = [r["verdict"]["reward"] for r in verdicts.values() if r["task"] == task]
        assert summary["tasks"][task]["reward"] == pytest.approx(sum(rewards) / len(rewards))
        assert summary["tasks"][task]["n_judged"] == PER_TASK
    assert summary["tasks"]["animal_scene"]["reward"] == 1.0

    table = json.loads((run / "table2.json").read_text())["tables"][0]
    assert table["header"] == ["Model", "Animal", "Person", "Group", "Style", "Clothing", "All"]
    assert table["rows"][0][:2] == ["toy", 1.0]
    assert table["rows"][0][-1] == pytest.approx(summary["overall"]["reward"])
    assert "| Model | Animal | Person | Group | Style | Clothing | All |" in printed
    assert "| toy | 1.000 |" in printed and "outputs: 8 generated, 2 reused, 0 generator errors" in printed
    report = (run / "report.html").read_text()
    for sample_id in ids:
        assert f'src="outputs/{sample_id}.png"' in report
    assert report.count("toy-binary: F 1 C 1 R 1 = 1.00") == PER_TASK
    assert (run / "table2.md").read_text().startswith("**Table 2 - mean reward, judge toy")


# -- resume after a kill ------------------------------------------------------------------------------
def test_a_killed_run_resumes_without_redoing_outputs_or_verdicts(tmp_path, micro, world):
    out = tmp_path / "run"
    argv = ["--manifest", str(world), "--model", str(micro), "--limit-per-task", "3", "--batch-size", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")] + FAST
    total = 5 * min(3, PER_TASK)
    # The run starts in tmp_path; PYTHONPATH finds this checkout whatever the installed copy points at.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "training.bench", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while len(list((out / "outputs").glob("*.png"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run made no outputs in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "outputs").glob("*.png")}
    assert 3 <= len(first) < total, "killed after the run had finished; nothing was left to resume"

    assert main(argv) == 0
    outputs = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "outputs").glob("*.png")}
    assert len(outputs) == total and {k: outputs[k] for k in first} == first  # nothing redone
    attempts = [r["id"] for r in lines(out / "generated.jsonl") if r["status"] == "ok"]
    assert sorted(attempts) == sorted(o.removesuffix(".png") for o in outputs)  # each generated exactly once

    # A kill while judging: 4 verdicts written, the 5th torn mid-line.
    verdict_path = out / "judge" / "toy-binary" / "verdicts.jsonl"
    kept = verdict_path.read_text().splitlines()[:4]
    verdict_path.write_text("\n".join(kept) + "\n" + kept[0][:25])
    assert main(argv) == 0
    records = [json.loads(t) for t in verdict_path.read_text().splitlines()[:4]] + \
        [json.loads(t) for t in verdict_path.read_text().splitlines()[5:]]
    assert sorted(r["id"] for r in records) == sorted(o.removesuffix(".png") for o in outputs)  # once each
    assert main(argv) == 0  # a finished run: nothing generated, nothing judged again
    assert len(verdict_path.read_text().splitlines()) == 1 + total
    assert len(lines(out / "generated.jsonl")) == total
    assert json.loads((out / "judge" / "toy-binary" / "summary.json").read_text())["overall"]["n_judged"] == total


# -- several judges; failures are counted, not scored ---------------------------------------------------
class HttpJudge:
    """A loopback VLM: 'yes' to fidelity and consistency, 'no' to realism (reward 2/3), except an
    HTTP 500 for every question about one instruction while ``failing`` is set."""

    def __init__(self, failing_instruction: str):
        self.failing = failing_instruction
        self.server = ScriptedChatServer(self.script)

    def script(self, call):
        if self.failing and call.instruction == self.failing:
            return Reply.error(500, "overloaded")
        if call.question == "semantic_consistency":
            return Reply.answer('{"score": [9, 7], "reasoning": "done, a little more changed"}')
        if call.question == "perceptual_quality":
            return Reply.answer('{"score": [10, 9], "reasoning": "natural, faint blur"}')
        return Reply.answer("No." if call.question == "realism" else "Yes.")

    def config(self, folder: Path) -> Path:
        profile = {"base_url": self.server.base_url, "model": "loop-vlm", "max_retries": 1, "backoff_base_s": 0.01,
                   "parse_retries": 0, "cache": False}
        path = folder / "judges.json"
        path.write_text(json.dumps({"profiles": {"loop": profile}}))
        return path


def test_two_judges_side_by_side_with_an_unjudged_sample_and_a_generator_error(tmp_path, micro, world, capsys):
    manifest = copy_world(world, tmp_path / "world")
    samples = lines(manifest)
    broken = next(s for s in samples if s["task"] == "person_scene" and s["split"] == "test")
    (manifest.parent / broken["images"][0]).unlink()  # its generation must fail, named
    flaky = next(s for s in samples if s["task"] == "group_portrait")
    judge = HttpJudge(flaky["instruction"])
    out = tmp_path / "run"
    with judge.server:
        argv = ["--manifest", str(manifest), "--model", str(micro), "--judge", "toy", "--judge", "loop",
                "--judge-config", str(judge.config(tmp_path)), "--out", str(out)] + FAST
        assert main(argv) == 1  # samples without a verdict: not a full result (issue 20)
        captured = capsys.readouterr()
        printed = captured.out
        assert "judge toy-binary: 1 of 10 samples have no verdict (1 without output, 0 unjudged" in captured.err
        assert "judge loop-binary: 2 of 10 samples have no verdict (1 without output, 1 unjudged" in captured.err
        assert f"{broken['id']}: missing: " in captured.err and "not found" in captured.err
        assert f"{flaky['id']}: unjudged: " in captured.err and "500" in captured.err
        n = 5 * PER_TASK
        toy = json.loads((out / "judge" / "toy-binary" / "summary.json").read_text())
        loop = json.loads((out / "judge" / "loop-binary" / "summary.json").read_text())
        assert toy["overall"]["n_judged"] == n - 1 and toy["overall"]["n_missing"] == 1
        assert loop["overall"]["n_judged"] == n - 2 and loop["overall"]["n_unjudged"] == 1
        assert loop["overall"]["n_missing"] == 1
        assert loop["overall"]["reward"] == pytest.approx(2 / 3)  # failures are not averaged in as 0
        assert loop["tasks"]["group_portrait"]["reward"] == pytest.approx(2 / 3)
        assert loop["tasks"]["person_scene"]["n_judged"] == PER_TASK - 1
        for summary in (toy, loop):
            assert list(summary["generator_errors"]) == [broken["id"]]
            assert "not found" in summary["generator_errors"][broken["id"]]
        assert "judge toy-binary: 9 judged, 0 unjudged, 1 without output" in printed
        assert "judge loop-binary: 8 judged, 1 unjudged, 1 without output" in printed
        tables = json.loads((out / "table2.json").read_text())["tables"]
        assert [t["title"] for t in tables] == ["Table 2 - mean reward, judge toy (toy, binary)",
                                                 "Per task, judge toy (toy, binary)",
                                                 "Table 2 - mean reward, judge loop (loop-vlm@127.0.0.1, binary)",
                                                 "Per task, judge loop (loop-vlm@127.0.0.1, binary)"]
        per_task = {row[0]: row for row in tables[3]["rows"]}
        assert per_task["group_portrait"][-1] == "1 unjudged" and per_task["person_scene"][-1] == "1 missing"
        report = (out / "report.html").read_text()
        assert report.count("unjudged:") == 1 and "no output: reference 1 " in report

        judge.failing = None  # the judge recovers; the reference is still missing
        assert main(argv) == 1 and "1 of 10 samples have no verdict" in capsys.readouterr().err
        assert main(argv + ["--allow-missing", "0.1"]) == 0  # a stated tolerance: 1 of 10 is accepted
    loop = json.loads((out / "judge" / "loop-binary" / "summary.json").read_text())
    assert loop["overall"]["n_judged"] == n - 1 and loop["overall"]["n_unjudged"] == 0
    errors = [r for r in lines(out / "generated.jsonl") if r["status"] == "error"]
    assert [r["id"] for r in errors] == [broken["id"]] * 3  # retried on each rerun, still reported


def test_no_judge_given_never_picks_the_toy_judge_for_other_data_and_failures_exit_1(tmp_path, micro, world,
                                                                                        capsys, monkeypatch):
    """A manifest whose plans are not toy-world plans (a synthesized one) and no --judge: the configured
    default profile judges, and says so. A judge that is down or a generation that fails everywhere
    makes the run exit 1 with the reasons on the console, not 0."""
    monkeypatch.delenv("DUALREF_JUDGE_PROFILE", raising=False)
    manifest = copy_world(world, tmp_path / "world")
    rows = [json.loads(t) for t in manifest.read_text().splitlines()]
    for row in rows:
        row["plan"] = {"task": row["task"], "instruction": row["instruction"]}  # an LLM plan: no toy version
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "judges.json"
    profile = {"model": "loop-vlm", "max_retries": 1, "backoff_base_s": 0.01, "parse_retries": 0, "cache": False}
    # nothing listens on port 9: every question is refused
    config.write_text(json.dumps({"profiles": {"loop": {**profile, "base_url": "http://127.0.0.1:9/v1"}}}))
    argv = ["--manifest", str(manifest), "--model", str(micro), "--tasks", "animal_scene", "--judge-config",
            str(config), "--out", str(tmp_path / "run")] + FAST
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "judge: loop (the configured default profile)" in captured.out
    assert "judge loop-binary: 2 of 2 samples have no verdict (0 without output, 2 unjudged" in captured.err
    assert "animal_scene-test-00000: unjudged: " in captured.err and "onnect" in captured.err

    judge = HttpJudge("")
    config.write_text(json.dumps({"profiles": {"loop": {**profile, "base_url": judge.server.base_url}}}))
    with judge.server:
        assert main(argv) == 0
    assert "judge loop-binary: 2 judged, 0 unjudged" in capsys.readouterr().out

    only_toy = tmp_path / "toy.json"  # no VLM profile configured: refuse, do not fall back to the toy judge
    only_toy.write_text(json.dumps({"profiles": {}}))
    assert main(argv[:-len(FAST) - 2] + ["--judge-config", str(only_toy), "--out", str(tmp_path / "r2")] + FAST) == 2
    assert "not toy-world samples" in capsys.readouterr().err

    for image in (manifest.parent).rglob("*.png"):  # every reference gone: every generation fails
        image.unlink()
    judge = HttpJudge("")
    config.write_text(json.dumps({"profiles": {"loop": {**profile, "base_url": judge.server.base_url}}}))
    with judge.server:
        assert main(argv[:-len(FAST) - 2] + ["--out", str(tmp_path / "r3")] + FAST) == 1
    err = capsys.readouterr().err
    assert "2 of 2 samples have no verdict (2 without output" in err and "not found" in err


def test_judging_again_with_another_judge_writes_its_tables_beside_the_first(tmp_path, micro, world, capsys):
    """Issue 20 item 7: each judge's tables in their own files, table2.md/json hold every judge with
    results, and report.html shows the same judges' tables and verdicts as the tables."""
    out = tmp_path / "run"
    common = ["--manifest", str(world), "--model", str(micro), "--tasks", "animal_scene", "--out", str(out)] + FAST
    assert main(common + ["--judge", "toy"]) == 0
    judge = HttpJudge("")
    with judge.server:
        assert main(common + ["--judge", "loop", "--judge-config", str(judge.config(tmp_path))]) == 0
    printed = capsys.readouterr().out
    assert "judge loop" in printed and "outputs: 0 generated, 2 reused" in printed
    toy = json.loads((out / "table2.toy-binary.json").read_text())["tables"]
    loop = json.loads((out / "table2.loop-binary.json").read_text())["tables"]
    assert [t["title"] for t in toy] == ["Table 2 - mean reward, judge toy (toy, binary)", "Per task, judge toy (toy, binary)"]
    assert all("loop" in t["title"] for t in loop) and len(loop) == 2
    both = json.loads((out / "table2.json").read_text())
    assert both["tables"] == loop + toy and set(both["judges"]) == {"toy-binary", "loop-binary"}
    assert (out / "table2.md").read_text() == "\n\n".join(
        [(out / "table2.loop-binary.md").read_text().rstrip("\n"), (out / "table2.toy-binary.md").read_text()])
    report = (out / "report.html").read_text()
    for table in both["tables"]:
        assert f"<h3>{table['title']}</h3>" in report
    assert report.count("toy-binary: ") == 2 and report.count("loop-binary: ") == 2


def test_a_flat_colour_output_is_flagged_in_the_report(tmp_path, micro, world, capsys):
    """Issue 20 item 8: an all-black output (or any single colour) is named at the top of the report
    and under the image, so a broken model is not read off a table of mean rewards."""
    out = tmp_path / "run"
    (out / "outputs").mkdir(parents=True)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(out / "outputs" / "animal_scene-test-00000.png")
    Image.new("RGB", (32, 32), (7, 7, 7)).save(out / "outputs" / "animal_scene-test-00001.png")
    noisy = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(out / "outputs" / "style_transfer-test-00000.png")
    argv = ["--manifest", str(world), "--model", str(micro), "--tasks", "animal_scene", "style_transfer",
            "--limit-per-task", "1", "--out", str(out)] + FAST
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "judge toy" not in err and "it/s" not in err and "sample/s" not in err  # -q: no progress bars at all
    report = (out / "report.html").read_text()
    assert "1 output(s) are one flat colour" in report and "animal_scene-test-00000 (0, 0, 0)" in report
    assert report.count("<div class=bad>flat colour (0, 0, 0)</div>") == 1
    assert "style_transfer-test-00000 (" not in report


# -- synthesis -> benchmark, end to end ----------------------------------------------------------------
def test_synthesized_manifest_benchmarks_with_the_configured_profile_and_the_exit_code_follows(
        tmp_path, micro, monkeypatch, capsys):
    """Issue 20: synthesize with the local LLM/image fakes (real HTTP), then benchmark that manifest
    headless with no --judge: the configured VLM profile (a loopback judge server) is chosen and
    printed - never the toy judge - every test sample is judged and the run exits 0; with the judge
    server gone the same command exits 1 and prints why."""
    from synth_fakes import KEY_ENV, SECRET, FakeAPI, make_pools, valid_plan
    from training.bench.run_folder import RunDir
    from training.synth.loop import main as synth_main

    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.delenv("DUALREF_JUDGE_PROFILE", raising=False)
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        pools = make_pools(tmp_path, ["s_ok", "s_flaky", "a_ok", "a_bad"])
        config = {"out": "synth", "pools": pools, "tasks": {"animal_scene": 3}, "seed": 1, "test_fraction": 0.3,
                  "llm": {"base_url": api.url, "model": "planner", "api_key_env": KEY_ENV},
                  "image": {"base_url": api.url, "model": "painter", "api_key_env": KEY_ENV, "size": "32x32",
                            "price_per_image": 0.01},
                  "budget": {"max_cost_usd": 1.0}}
        (tmp_path / "synth.json").write_text(json.dumps(config))
        assert synth_main(["--config", str(tmp_path / "synth.json"), "-q"]) == 0
    finally:
        api.close()
    manifest = tmp_path / "synth" / "manifest.jsonl"
    samples = lines(manifest)
    tests = [s["id"] for s in samples if s["split"] == "test"]
    assert len(samples) == 3 and tests and all(s["target"] for s in samples)
    capsys.readouterr()

    judge = HttpJudge("")
    judges = judge.config(tmp_path)
    argv = ["--manifest", str(manifest), "--model", str(micro), "--tasks", "animal_scene",
            "--judge-config", str(judges), "--out", str(tmp_path / "bench")] + FAST
    with judge.server:
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "judge: loop (the configured default profile)" in printed
    assert f"judge loop-binary: {len(tests)} judged, 0 unjudged, 0 without output, 0 bad input" in printed
    verdicts = RunDir(tmp_path / "bench").verdicts("loop-binary")
    assert sorted(verdicts) == sorted(tests) and all(v["status"] == "judged" for v in verdicts.values())
    assert json.loads((tmp_path / "bench" / "table2.json").read_text())["tables"][0]["rows"][0][1] == \
        pytest.approx(2 / 3)

    shutil.rmtree(tmp_path / "bench" / "judge")  # judge again, with the judge server gone
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"judge loop-binary: {len(tests)} of {len(tests)} samples have no verdict" in err and "unjudged" in err


# -- headless: same pixels as training.evaluate, LoRAs, identities, comparison ---------------------------
def test_headless_outputs_match_sample_split_and_loras_change_them(tmp_path, micro, world, capsys):
    from training.evaluation import sample_split
    from training.models import load_kontext

    tasks = ["animal_scene", "style_transfer"]
    common = ["--manifest", str(world), "--model", str(micro), "--tasks", *tasks, "--seed", "3",
              "--cache-dir", str(tmp_path / "cache")] + FAST
    base, tuned, stacked = tmp_path / "base", tmp_path / "tuned", tmp_path / "stacked"
    lora = random_lora(tmp_path / "sft.safetensors", micro, seed=1)
    lora2 = random_lora(tmp_path / "ddpo.safetensors", micro, seed=2)
    assert main(common + ["--out", str(base)]) == 0
    assert main(common + ["--out", str(tuned), "--lora", str(lora)]) == 0
    assert main(common + ["--out", str(stacked), "--lora", str(lora), "--lora2", str(lora2)]) == 0
    assert main(common + ["--out", str(tmp_path / "only2"), "--lora", str(lora2)]) == 0

    # One bundle: the LoRA merged for one split, then the base again, exactly as it was loaded.
    bundle = load_kontext(micro)
    split = dict(split="test", tasks=tasks, steps=2, seed=3, progress=False, cache_dir=tmp_path / "cache")
    with_lora = sample_split(bundle, world, lora=lora, **split)
    expected = sample_split(bundle, world, **split)
    assert len(expected) == 2 * PER_TASK
    for out, tuned_out in zip(expected, with_lora):
        assert np.array_equal(pixels(base / "outputs" / f"{out.sample.id}.png"), out.image), out.sample.id
        assert np.array_equal(pixels(tuned / "outputs" / f"{out.sample.id}.png"), tuned_out.image), out.sample.id
    seeds = {r["id"]: r["seed"] for r in lines(base / "generated.jsonl")}
    assert seeds == {o.sample.id: 3 * SEED_STRIDE + i for i, o in enumerate(expected)}
    ids = list(seeds)
    for a, b in ((base, tuned), (tuned, stacked), (tmp_path / "only2", stacked)):  # both LoRAs act
        assert all(not np.array_equal(pixels(a / "outputs" / f"{i}.png"), pixels(b / "outputs" / f"{i}.png"))
                   for i in ids)
    info = json.loads((stacked / "run.json").read_text())
    assert info["label"] == "micro+sft+ddpo" and len(info["identity"]["loras"]) == 2

    # Another LoRA in a folder that holds this run's outputs: refused, nothing overwritten.
    capsys.readouterr()
    assert main(common + ["--out", str(tuned), "--lora", str(lora2)]) == 2
    assert "holds outputs made with other settings (loras differ)" in capsys.readouterr().err
    # A LoRA trained on another base model: a clear error naming the file.
    alien = random_lora(tmp_path / "alien.safetensors", micro, seed=4, other_base=True)
    assert main(common + ["--out", str(tmp_path / "alien"), "--lora", str(alien)]) == 2
    err = capsys.readouterr().err
    assert "alien.safetensors was trained on another base model" in err and "pass the --model" in err
    assert "0123456789abcdef" in err  # the fingerprints in full, not cut to their (shared) architecture part
    assert main(common + ["--out", str(tmp_path / "x"), "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "LoRA file not found" in capsys.readouterr().err

    compare = tmp_path / "compare"
    assert main(["--compare", str(base), str(tuned), str(stacked), "--out", str(compare)]) == 0
    printed = capsys.readouterr().out
    table = json.loads((compare / "compare.json").read_text())["tables"][0]
    assert [row[0] for row in table["rows"]] == ["micro", "micro+sft", "micro+sft+ddpo"]
    assert "| micro+sft+ddpo |" in printed
    report = (compare / "report.html").read_text()
    for run in (base, tuned, stacked):
        assert f'src="../{run.name}/outputs/{ids[0]}.png"' in report


# -- Table 1 ---------------------------------------------------------------------------------------------
def test_single_reference_table_scores_base_and_finetuned(tmp_path, micro, world, capsys):
    lora = random_lora(tmp_path / "sft.safetensors", micro, seed=1)
    judge = HttpJudge(None)
    out = tmp_path / "table1"
    with judge.server:
        argv = ["--single", "--manifest", str(world), "--model", str(micro), "--lora", str(lora), "--judge", "toy",
                "--judge", "loop", "--judge-config", str(judge.config(tmp_path)), "--out", str(out)] + FAST
        assert main(argv) == 0
    printed = capsys.readouterr().out
    tables = json.loads((out / "table1.json").read_text())["tables"]
    title = "Table 1 - single-reference edits, 0-10 judge"
    assert [t["title"] for t in tables] == [f"{title} toy (toy, score)", f"{title} loop (loop-vlm@127.0.0.1, score)"]
    assert tables[0]["header"][:4] == ["Model", "SC", "PQ", "Overall"]
    assert [r[0] for r in tables[0]["rows"]] == ["Native micro", "Dual-image fine-tuned (sft)"]
    for row, name in zip(tables[0]["rows"], ("base", "finetuned")):
        scores = [r["score"] for r in lines(out / name / "judge" / "toy-score" / "verdicts.jsonl")]
        assert len(scores) == PER_TASK and all(r["semantic_consistency"] <= 10 for r in scores)
        assert row[1:4] == pytest.approx([np.mean([s["semantic_consistency"] for s in scores]),
                                          np.mean([s["perceptual_quality"] for s in scores]),
                                          np.mean([math.sqrt(s["semantic_consistency"] * s["perceptual_quality"])
                                                   for s in scores])])
    assert [r[1:4] for r in tables[1]["rows"]] == [[7.0, 9.0, pytest.approx(math.sqrt(63))]] * 2
    ids = [s["id"] for s in lines(out / "base" / "manifest.jsonl")]
    assert ids == [f"single_edit-test-{i:05d}" for i in range(PER_TASK)]
    assert not np.array_equal(pixels(out / "base" / "outputs" / f"{ids[0]}.png"),
                              pixels(out / "finetuned" / "outputs" / f"{ids[0]}.png"))
    assert "| Model | SC | PQ | Overall | judged | not scored |" in printed
    assert "| Native micro |" in printed and "| Dual-image fine-tuned (sft) |" in printed
    assert 'src="finetuned/outputs/' in (out / "report.html").read_text()


def test_bad_requests_get_clear_errors(tmp_path, micro, world, capsys):
    assert main(["--manifest", str(tmp_path / "none.jsonl"), "--model", str(micro)]) == 2
    assert "cannot read the manifest" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(world.read_text().splitlines()[0] + "\n{not json\n")
    assert main(["--manifest", str(bad), "--model", str(micro)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["--manifest", str(world), "--model", str(micro), "--split", "train"]) == 2
    assert "has no train-split samples" in capsys.readouterr().err
    assert main(["--manifest", str(world), "--model", str(micro), "--judge", "nobody"]) == 2
    assert "unknown judge profile 'nobody'" in capsys.readouterr().err
    assert main(["--single", "--generator", "comfyui", "--server", "http://127.0.0.1:9"]) == 2
    assert "--single runs headless" in capsys.readouterr().err
    assert main(["--manifest", str(world), "--model", str(micro), "--lora2", "x.safetensors"]) == 2
    assert "pass --lora too" in capsys.readouterr().err
    assert main(["--compare", str(tmp_path)]) == 2
    assert "has no judged results" in capsys.readouterr().err
    for flag, value in (("--concurrency", "0"), ("--limit-per-task", "-1"), ("--batch-size", "x"),
                        ("--allow-missing", "2")):  # argument errors name the flag (issue 20 item 8)
        with pytest.raises(SystemExit) as stop:
            main(["--manifest", str(world), flag, value])
        assert stop.value.code == 2 and f"argument {flag}: '{value}' is not" in capsys.readouterr().err
