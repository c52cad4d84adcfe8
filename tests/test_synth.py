"""Dataset synthesis against a loopback OpenAI-compatible server (real HTTP on 127.0.0.1).

The server and the colour-coded pools are in tests/synth_fakes.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from judge.base import Judge
from judge.verdict import Unjudged, Verdict
from synth_fakes import KEY_ENV, LICENCES, SECRET, FakeAPI, color_name, make_pools, mean_color, pool_entry, valid_plan
from judge.manifest import ManifestError, Sample, parse_line, write_manifest
from training.synth.loop import run_synthesis
from training.synth.config import ConfigError, load_config, parse_config
from training.synth.pairs import assign_splits, iter_pairs, pair_key, scan_pools, split_of
from training.synth.instructions import parse_reply, schema_errors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def base_config(root: Path, api: FakeAPI, pools: dict, tasks: dict, **extra) -> dict:
    cfg = {
        "out": "out", "pools": pools, "tasks": tasks, "seed": 3, "test_fraction": 0.5,
        "llm": {"base_url": api.url, "model": "planner", "api_key_env": KEY_ENV, "backoff_base_s": 0.01,
                "backoff_max_s": 0.02, "price_input_per_mtok": 1.0, "price_output_per_mtok": 5.0},
    }
    cfg.update(extra)
    (root / "synth.json").write_text(json.dumps(cfg))
    return cfg


def read_manifest(out: Path):
    lines = (out / "manifest.jsonl").read_text().splitlines()
    return [parse_line(t, out / "manifest.jsonl", i) for i, t in enumerate(lines, 1)]


def assert_no_duplicates(samples):
    assert len({s.id for s in samples}) == len(samples)
    assert len({(s.task, tuple(sorted(s.images)) if s.task == "group_portrait" else tuple(s.images))
                for s in samples}) == len(samples)
    assert len({(s.task, s.instruction.lower()) for s in samples}) == len(samples)


class ColorJudge(Judge):
    """Deterministic judge: 'no' when image 2 is st_ugly or the target is not the pair's mean colour;
    Unjudged (once) for pairs whose image 1 is in ``flaky``."""

    name = "color-test"

    def __init__(self, flaky=()):
        self.flaky, self.calls = set(flaky), []

    def judge(self, request):
        n1, n2 = color_name(request.reference1), color_name(request.reference2)
        self.calls.append((request.task, n1, n2))
        if n1 in self.flaky and request.task == "animal_scene":
            raise Unjudged("judge endpoint unavailable", request.sample_id)
        right_target = request.output.getpixel((0, 0)) == mean_color(n1, n2)
        good = 0.0 if n2 == "st_ugly" else 1.0
        return Verdict(good, float(right_target), 1.0, judge=self.name, sample_id=request.sample_id)


# -- the main flow: faults, invalid plans, image edits, judge filter, unjudged retried next run ---
def test_synthesis_with_edits_judge_faults_and_resume(tmp_path, api_key, caplog):
    caplog.set_level("INFO", logger="judge.transport")
    def rule(task, names, followups):
        if task == "animal_scene" and "a_bad" in names:
            return {"task": task, "instruction": "missing the rest of the plan"}  # never valid
        if names == ("s_ok", "a_ok") and not followups:
            return "Sure! Here is the plan: {not json"  # valid after the correction
        return valid_plan(task, names)

    api = FakeAPI(rule)
    api.chat_faults = [429, 500]
    api.image_faults = [503]
    try:
        pools = make_pools(tmp_path, ["s_ok", "s_flaky", "a_ok", "a_bad", "st_ok", "st_ugly"])
        base_config(tmp_path, api, pools, {"animal_scene": 4, "style_transfer": 3},
                    image={"base_url": api.url, "model": "painter", "api_key_env": KEY_ENV, "endpoint": "edits",
                           "size": "256x256", "backoff_base_s": 0.01, "backoff_max_s": 0.02, "price_per_image": 0.01},
                    judge={"min_yes": 3})
        cfg = tmp_path / "synth.json"
        out = tmp_path / "out"

        first = run_synthesis(cfg, judge=ColorJudge(flaky={"s_flaky"}), progress=False)
        assert first["tasks"]["animal_scene"] == {"kept": 1, "rejected": 0, "failed": 2, "pending": 1, "wanted": 4}
        assert first["tasks"]["style_transfer"]["kept"] == 3 and first["stopped"] is None
        assert not first["complete"]  # animal_scene: the pools hold only one more acceptable pair
        assert sorted(api.faults_served) == [("chat", 429), ("chat", 500), ("image", 503)]  # all retried
        assert len(read_manifest(out)) == 4

        chats = len(api.chat_log)
        images = len(api.image_log)
        judge = ColorJudge()
        second = run_synthesis(cfg, judge=judge, progress=False)
        assert second["tasks"]["animal_scene"]["kept"] == 2 and second["tasks"]["animal_scene"]["pending"] == 0
        assert len(api.chat_log) == chats and len(api.image_log) == images  # nothing paid for is asked again
        assert judge.calls == [("animal_scene", "s_flaky", "a_ok")]
    finally:
        api.close()

    plan_requests = {}
    for entry in api.chat_log:
        plan_requests.setdefault((entry["task"], entry["names"]), []).append(entry)
        assert entry["response_format"] == {"type": "json_object"}
    corrected = plan_requests[("animal_scene", ("s_ok", "a_ok"))]
    assert len(corrected) == 2 and "not valid JSON" in corrected[1]["followups"][0]
    for names in (("s_ok", "a_bad"), ("s_flaky", "a_bad")):  # given up after max_plan_attempts, not retried
        attempts = plan_requests[("animal_scene", names)]
        assert len(attempts) == 3 and "'image1' is a required property" in attempts[-1]["followups"][-1]

    samples = read_manifest(out)
    assert sorted(s.task for s in samples) == ["animal_scene"] * 2 + ["style_transfer"] * 3
    assert_no_duplicates(samples)
    for s in samples:
        refs = [Image.open(out / p) for p in s.images]
        names = [color_name(r) for r in refs]
        assert names[1] != "st_ugly" and "a_bad" not in names[1:]  # the judge's 'no' and failed plans are out
        assert Image.open(out / s.target).getpixel((0, 0)) == mean_color(*names)
        assert s.plan["target_description"] and "instruction" not in s.plan and s.split in ("train", "test")
    edits = [e for e in api.image_log if "names" in e]
    assert all(e["model"] == "painter" and e["size"] == "256x256" and len(e["names"]) == 2 for e in edits)

    state_lines = [json.loads(t) for t in (out / "state.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "unjudged" for r in state_lines)
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text
    # the LLM's 429/500 retries are the synthesis's, not a judge's
    assert "synthesis synth-llm: " in caplog.text and "retry 1/4" in caplog.text and "judge synth-llm" not in caplog.text


# -- the budget: stop cleanly, keep what is done, resume without duplicates ---------------------
def test_budget_stop_then_resume_with_concurrency_no_duplicates(tmp_path, api_key):
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "p3", "c1", "c2"])
        base_config(tmp_path, api, pools, {"group_portrait": 3, "clothing_replace": 2},
                    budget={"max_requests": 2})
        first = run_synthesis(tmp_path / "synth.json", progress=False)
        assert first["stopped"].startswith("request budget reached")
        assert first["budget"]["requests"] == 2 and len(api.chat_log) == 2
        assert first["budget"]["cost_usd"] == pytest.approx(2 * (1000 * 1.0 + 200 * 5.0) / 1e6)
        assert len(read_manifest(tmp_path / "out")) == 2  # what was done is kept

        cfg = load_config(tmp_path / "synth.json")
        cfg.max_requests, cfg.concurrency = None, 3
        second = run_synthesis(cfg, progress=False)
        assert second["complete"] and second["stopped"] is None
        assert len(api.chat_log) == 5  # one plan per kept pair, none asked twice
        third = run_synthesis(cfg, progress=False)
        assert third["budget"]["requests"] == 0 and len(api.chat_log) == 5
    finally:
        api.close()
    samples = read_manifest(tmp_path / "out")
    assert sorted(s.task for s in samples) == ["clothing_replace"] * 2 + ["group_portrait"] * 3
    assert_no_duplicates(samples)
    # group portraits are unordered: the three pairs of three people, each once
    groups = {frozenset(color_name(Image.open(tmp_path / "out" / p)) for p in s.images)
              for s in samples if s.task == "group_portrait"}
    assert groups == {frozenset(p) for p in (("p1", "p2"), ("p1", "p3"), ("p2", "p3"))}


def test_the_progress_bar_shows_attempts_and_spend(tmp_path, api_key, capsys):
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "c1"])
        base_config(tmp_path, api, pools, {"clothing_replace": 2})
        run_synthesis(tmp_path / "synth.json", progress=True)
    finally:
        api.close()
    err = capsys.readouterr().err
    assert "samples kept: 100%" in err and "2 pairs tried, 2 requests, $0.0040 spent" in err


def test_repeated_instruction_is_sent_back(tmp_path, api_key):
    def rule(task, names, followups):
        if not followups:
            return valid_plan(task, names, instruction="Put the two people of image 1 and image 2 together.")
        return valid_plan(task, names)

    api = FakeAPI(rule)
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "p3"])
        base_config(tmp_path, api, pools, {"group_portrait": 2})
        summary = run_synthesis(tmp_path / "synth.json", progress=False)
    finally:
        api.close()
    assert summary["complete"]
    samples = read_manifest(tmp_path / "out")
    assert len(samples) == 2 and len({s.instruction for s in samples}) == 2
    assert sum("already used" in f for e in api.chat_log for f in e["followups"]) == 1


def test_failing_endpoint_stops_the_run_and_the_rerun_resumes_from_the_last_step(tmp_path, api_key):
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    api.image_faults = [500] * 4  # two pairs x (1 try + 1 retry)
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "c1"])
        base_config(tmp_path, api, pools, {"clothing_replace": 2}, max_consecutive_errors=2,
                    image={"base_url": api.url, "model": "painter", "api_key_env": KEY_ENV, "max_retries": 1,
                           "backoff_base_s": 0.01, "backoff_max_s": 0.02})
        first = run_synthesis(tmp_path / "synth.json", progress=False)
        assert first["stopped"].startswith("2 failures in a row") and "gave up after 2 attempts" in first["stopped"]
        assert first["tasks"]["clothing_replace"] == {"kept": 0, "rejected": 0, "failed": 0, "pending": 2, "wanted": 2}
        assert len(api.chat_log) == 2 and read_manifest(tmp_path / "out") == []
        second = run_synthesis(tmp_path / "synth.json", progress=False)
        assert second["complete"] and len(api.chat_log) == 2  # the plans were kept, not asked again
        assert len(api.image_log) == 2
    finally:
        api.close()
    notes = [json.loads(t) for t in (tmp_path / "out" / "state.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in notes].count("error") == 2


def test_corrupt_pool_image_is_skipped_by_name(tmp_path, api_key, caplog):
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        pools = make_pools(tmp_path, ["p1", "c1", "c2"])
        (tmp_path / "pools" / "clothing" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        base_config(tmp_path, api, pools, {"clothing_replace": 3})
        summary = run_synthesis(tmp_path / "synth.json", progress=False)
    finally:
        api.close()
    assert summary["tasks"]["clothing_replace"] == {"kept": 2, "rejected": 0, "failed": 1, "pending": 0, "wanted": 3}
    assert "broken.png" in caplog.text and "fix or remove the file" in caplog.text
    assert len(api.chat_log) == 2 and len(read_manifest(tmp_path / "out")) == 2


# -- the CLI: generations endpoint, cost budget, exit codes, config errors ----------------------
def run_cli(*args, env_key=True):
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    if env_key:
        env[KEY_ENV] = SECRET
    return subprocess.run([sys.executable, "-m", "training.synth", *map(str, args), "-q"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def test_cli_generations_cost_budget_and_rerun(tmp_path):
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        pools = make_pools(tmp_path, ["s_ok", "s_flaky", "p1", "p2"])
        base_config(tmp_path, api, pools, {"person_scene": 3},
                    image={"base_url": api.url, "model": "painter", "api_key_env": KEY_ENV,
                           "endpoint": "generations", "response_format": "b64_json", "price_per_image": 0.5},
                    budget={"max_cost_usd": 1.0})
        run = run_cli("--config", tmp_path / "synth.json")
        assert run.returncode == 3, run.stderr
        assert "stopped early: cost budget reached" in run.stderr and SECRET not in run.stderr + run.stdout
        # plan $0.002 + image $0.50, twice, is $1.004: the second image does not fit under $1 and is not asked
        assert len(read_manifest(tmp_path / "out")) == 1 and len(api.image_log) == 1
        spent = json.loads(run.stdout)["budget"]
        assert spent["total_cost_usd"] == pytest.approx(0.504) and spent["total_cost_usd"] <= 1.0
        assert "spent $0.5040 of the $1 cap over all runs of this folder" in run.stderr
        run = run_cli("--config", tmp_path / "synth.json", "--max-cost", 10)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["tasks"]["person_scene"]["kept"] == 3
        assert json.loads(run.stdout)["budget"]["total_cost_usd"] == pytest.approx(3 * 0.502)
    finally:
        api.close()
    samples = read_manifest(tmp_path / "out")
    assert len(samples) == 3 and len(api.image_log) == 3
    for s, call in zip(samples, api.image_log):
        assert call["response_format"] == "b64_json" and call["prompt"].startswith(s.instruction)
        assert Image.open(tmp_path / "out" / s.target).getpixel((0, 0)) == (len(call["prompt"]) % 256, 7, 7)


def test_cost_cap_holds_at_concurrency_8_and_a_rerun_continues_the_budget(tmp_path, api_key):
    """Images take 0.2 s, eight pairs in flight: each image's price is reserved before it is sent, so
    $0.25 buys two $0.10 images, not eight. A rerun (scope total) counts that spend and buys nothing
    more; --budget-scope run gives the rerun a cap of its own."""
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    api.image_delay_s = 0.2
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "p3", "c1", "c2"])
        base_config(tmp_path, api, pools, {"group_portrait": 3, "clothing_replace": 6}, concurrency=8,
                    image={"base_url": api.url, "model": "painter", "api_key_env": KEY_ENV, "price_per_image": 0.1},
                    budget={"max_cost_usd": 0.25})
        cfg = load_config(tmp_path / "synth.json")
        cfg.llm.profile = cfg.llm.profile.with_overrides(price_input_per_mtok=0.0, price_output_per_mtok=0.0)
        first = run_synthesis(cfg, progress=False)
        assert first["stopped"] == "cost budget reached"
        assert len(api.image_log) == 2 and first["budget"]["cost_usd"] == pytest.approx(0.2)
        ledger = json.loads((tmp_path / "out" / "spend.json").read_text())
        assert ledger["total_usd"] == pytest.approx(0.2)

        second = run_synthesis(cfg, progress=False)  # scope total: $0.05 left, an image costs $0.10
        assert second["stopped"] == "cost budget reached" and len(api.image_log) == 2
        assert second["budget"]["total_cost_usd"] == pytest.approx(0.2)

        cfg.budget_scope = "run"
        third = run_synthesis(cfg, progress=False)
        assert len(api.image_log) == 4 and third["budget"]["cost_usd"] == pytest.approx(0.2)
        assert third["budget"]["total_cost_usd"] == pytest.approx(0.4)
    finally:
        api.close()
    assert len(read_manifest(tmp_path / "out")) == 4


def test_ctrl_c_stops_paid_calls_exits_130_at_once_and_the_rerun_finishes(tmp_path):
    """Issue 20 item 6: images take 8 s; Ctrl-C while two are in flight exits 130 within ~2 s with
    a one-line summary and the rerun hint (no traceback), sends no request after the signal, and a
    rerun finishes the set without duplicates."""
    import signal
    import time

    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    api.image_delay_s = 8.0
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "p3", "c1", "c2"])
        base_config(tmp_path, api, pools, {"clothing_replace": 4}, concurrency=2,
                    image={"base_url": api.url, "model": "painter", "api_key_env": KEY_ENV, "price_per_image": 0.1})
        env = {**os.environ, KEY_ENV: SECRET}
        proc = subprocess.Popen([sys.executable, "-m", "training.synth", "--config", str(tmp_path / "synth.json"), "-q"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while sum(kind == "image" for kind, _ in api.started) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
        assert proc.returncode == 130, err
        assert took < 3.0, f"took {took:.1f} s to exit after Ctrl-C"
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("interrupted: 0 of 4 samples kept, 2 pairs half done") and \
            "rerun the same command to continue" in last and "spent $0.0" in last
        assert not [t for _, t in api.started if t > signalled]  # no request after Ctrl-C
        assert json.loads((tmp_path / "out" / "spend.json").read_text())["total_usd"] == pytest.approx(
            0.2 + 2 * 0.0, abs=0.05)  # the two images in flight count as spent (they may be billed)

        api.image_delay_s = 0.0
        run = run_cli("--config", tmp_path / "synth.json")
        assert run.returncode == 0, run.stderr
    finally:
        api.close()
    samples = read_manifest(tmp_path / "out")
    assert len(samples) == 4
    assert_no_duplicates(samples)
    assert sum(kind == "chat" for kind, _ in api.started) == 4  # the two plans made before Ctrl-C were kept


def test_an_llm_call_whose_maximum_price_does_not_fit_is_not_sent(tmp_path, api_key):
    """max_tokens 2000 x $5/M output = $0.01 is what one plan may cost (input free here): under a
    $0.0105 cap the first plan fits, the second does not, though the first cost only $0.001."""
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "p3"])
        cfg = base_config(tmp_path, api, pools, {"group_portrait": 3}, budget={"max_cost_usd": 0.0105})
        cfg["llm"]["price_input_per_mtok"] = 0.0
        (tmp_path / "synth.json").write_text(json.dumps(cfg))
        summary = run_synthesis(tmp_path / "synth.json", progress=False)
    finally:
        api.close()
    assert summary["stopped"] == "cost budget reached" and len(api.chat_log) == 1
    assert summary["budget"]["cost_usd"] == pytest.approx(0.001)


def test_cli_config_errors_name_the_fix(tmp_path):
    pools = make_pools(tmp_path, ["p1", "p2"])
    cfg = {"out": "out", "pools": pools, "tasks": {"group_portrait": 1},
           "llm": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": SECRET}}
    (tmp_path / "a.json").write_text(json.dumps(cfg))
    run = run_cli("--config", tmp_path / "a.json")
    assert run.returncode == 2 and "keys never go in config files" in run.stderr and SECRET not in run.stderr

    cfg["llm"] = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV}
    (tmp_path / "b.json").write_text(json.dumps(cfg))
    run = run_cli("--config", tmp_path / "b.json", env_key=False)
    assert run.returncode == 2 and f"${KEY_ENV}" in run.stderr and "not set" in run.stderr

    cfg["tasks"] = {"clothing_replace": 1}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    run = run_cli("--config", tmp_path / "c.json")
    assert run.returncode == 2 and "theme clothing" in run.stderr and "pools.clothing" in run.stderr

    for flag, value in (("--concurrency", "0"), ("--max-cost", "-1")):  # the flag is named (issue 20 item 8)
        run = run_cli("--config", tmp_path / "b.json", flag, value)
        assert run.returncode == 2 and f"argument {flag}: '{value}' is not" in run.stderr


# -- self-contained datasets (issue 20 item 5) -------------------------------------------------
def test_the_output_folder_is_self_contained_with_each_images_source_and_licence(tmp_path, api_key, caplog):
    """Every reference image lands in <out>/images/<sha256>.<ext>, hard-linked from its pool and
    stored once however many pairs use it; the manifest points only inside the folder and carries,
    per image, its pool's source and licence (the target's: the image endpoint's model). Renaming
    the pool folder afterwards breaks nothing, not even a --manifest-only rewrite."""
    from training.data import load_manifest
    from training.synth.loop import main as synth_main
    from training.synth.pairs import file_sha

    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        pools = make_pools(tmp_path, ["p1", "p2", "p3", "c1"])
        base_config(tmp_path, api, pools, {"group_portrait": 3, "clothing_replace": 2},
                    image={"base_url": api.url, "model": "painter", "api_key_env": KEY_ENV, "licence": "painter terms"})
        summary = run_synthesis(tmp_path / "synth.json", progress=False)
    finally:
        api.close()
    assert summary["complete"]
    out = tmp_path / "out"
    pool_files = {file_sha(f): f for f in (tmp_path / "pools").rglob("*.png")}
    stored = sorted((out / "images").iterdir())
    assert sorted(f.name for f in stored) == sorted(f"{sha}.png" for sha in pool_files)  # each image once
    for f in stored:
        assert f.stat().st_nlink == 2 and f.samefile(pool_files[f.stem])  # a hard link, not a copy
    lines = [json.loads(t) for t in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 5
    for line in lines:
        assert all(p.startswith("images/") and (out / p).is_file() for p in line["images"]), line["images"]
        themes = [pool_files[Path(p).stem].parent.name for p in line["images"]]
        assert line["sources"] == {
            "images": [{"source": f"https://pools.test/{t}", "licence": LICENCES[t]} for t in themes],
            "target": {"source": "painter", "licence": "painter terms"}}

    (tmp_path / "pools").rename(tmp_path / "pools-moved")  # the pools go away: the dataset stays whole
    assert synth_main(["--config", str(tmp_path / "synth.json"), "--manifest-only", "-q"]) == 0
    assert [json.loads(t) for t in (out / "manifest.jsonl").read_text().splitlines()] == lines
    records = load_manifest(out / "manifest.jsonl")
    assert len(records) == 5
    for record in records:
        assert record.sample.sources["images"][0]["licence"] in LICENCES.values()
        for path in [*record.refs, record.target]:
            with Image.open(path) as im:
                im.load()
    samples = read_manifest(out)
    colours = {frozenset(color_name(Image.open(out / p)) for p in s.images) for s in samples if s.task == "group_portrait"}
    assert colours == {frozenset(p) for p in (("p1", "p2"), ("p1", "p3"), ("p2", "p3"))}

    # A stored image lost while its pool is away: its samples are left out, by name, not written
    # pointing nowhere; with the pool back the rewrite stores it again and nothing paid for is lost.
    p1 = next(f for f in stored if color_name(Image.open(f)) == "p1")
    p1.unlink()
    assert synth_main(["--config", str(tmp_path / "synth.json"), "--manifest-only", "-q"]) == 0
    assert len(read_manifest(out)) == 2 and "p1.png is gone; put the pool image back" in caplog.text  # 3 use p1
    (tmp_path / "pools-moved").rename(tmp_path / "pools")
    assert synth_main(["--config", str(tmp_path / "synth.json"), "--manifest-only", "-q"]) == 0
    assert [json.loads(t) for t in (out / "manifest.jsonl").read_text().splitlines()] == lines and p1.is_file()


def test_a_pool_on_another_file_system_is_copied(tmp_path, api_key, monkeypatch):
    """Where a hard link is impossible (the pools on another file system: /dev/shm here when it is
    one; else os.link fails as it would across devices) the image is copied, whole and once."""
    import errno
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    other_fs = shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev
    pool_root = Path(tempfile.mkdtemp(dir=shm)) if other_fs else tmp_path
    if not other_fs:
        def no_link(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "link", no_link)
    api = FakeAPI(lambda task, names, followups: valid_plan(task, names))
    try:
        make_pools(pool_root, ["p1", "p2", "c1"])
        pools = {t: pool_entry(t, str(pool_root / "pools" / t)) for t in ("people", "clothing")}
        base_config(tmp_path, api, pools, {"clothing_replace": 2})
        assert run_synthesis(tmp_path / "synth.json", progress=False)["complete"]
        stored = sorted((tmp_path / "out" / "images").iterdir())
        assert len(stored) == 3 and all(f.stat().st_nlink == 1 for f in stored)
        for f in stored:
            original = next((pool_root / "pools").rglob(f"{color_name(Image.open(f))}.png"))
            assert f.read_bytes() == original.read_bytes()
    finally:
        api.close()
        if other_fs:
            shutil.rmtree(pool_root)
    assert [s.images[0].startswith("images/") for s in read_manifest(tmp_path / "out")] == [True, True]


def test_a_pool_without_source_and_licence_is_refused_with_the_new_form(tmp_path):
    base = {"tasks": {}, "llm": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    with pytest.raises(ConfigError, match=r"pool 'animals' must give its folder with the source and licence.*"
                                          r'"animals": \{"path": "pools/animals", "source": "https://\.\.\.", '
                                          r'"licence": "CC-BY-4\.0"\}'):
        parse_config({**base, "pools": {"animals": "pools/animals"}}, tmp_path)
    for missing in ("source", "licence", "path"):
        entry = {k: v for k, v in pool_entry("scenes").items() if k != missing}
        with pytest.raises(ConfigError, match=f"pool 'scenes' needs '{missing}'"):
            parse_config({**base, "pools": {"scenes": entry}}, tmp_path)
    with pytest.raises(ConfigError, match="pool 'scenes' needs 'licence'"):
        parse_config({**base, "pools": {"scenes": {**pool_entry("scenes"), "licence": " "}}}, tmp_path)
    with pytest.raises(ConfigError, match="pool 'scenes': unknown field"):
        parse_config({**base, "pools": {"scenes": {**pool_entry("scenes"), "license": "MIT"}}}, tmp_path)
    cfg = parse_config({**base, "pools": {"scenes": pool_entry("scenes", "s")}}, tmp_path)
    assert cfg.pools["scenes"].path == (tmp_path / "s").resolve()
    assert cfg.pools["scenes"].provenance() == {"source": "https://pools.test/scenes", "licence": "CC0-1.0"}


def test_the_manifest_sources_field_is_checked_and_round_trips(tmp_path):
    line = {"id": "a", "task": "animal_scene", "images": ["x.png", "y.png"], "instruction": "Do it", "target": "t.png"}
    good = {"images": [{"source": "https://a", "licence": "CC0-1.0"}, {"source": "own", "licence": "proprietary"}],
            "target": {"source": "painter", "licence": "unknown"}}
    old = parse_line(json.dumps(line))  # a line without the field stays valid and is written as before
    assert old.sources is None and "sources" not in json.loads(old.to_json())
    sample = parse_line(json.dumps({**line, "sources": good}))
    assert sample.sources == good
    write_manifest(tmp_path / "m.jsonl", [sample, old])
    back = [parse_line(t) for t in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert back == [sample, old]
    bad = {
        "one entry per image (2)": {"images": good["images"][:1]},
        "exactly 'source' and 'licence'": {"images": [good["images"][0], {"source": "x"}]},
        "non-empty strings": {"images": [good["images"][0], {"source": "x", "licence": ""}]},
        "'sources' must be an object": [good["images"]],
        "given but the line has no 'target'": {**good, "target": good["target"]},
    }
    for reason, sources in bad.items():
        text = {**line, "sources": sources}
        if "no 'target'" in reason:
            text = {k: v for k, v in text.items() if k != "target"}
        with pytest.raises(ManifestError, match=re.escape(reason)):
            parse_line(json.dumps(text), "m.jsonl", 3)
    assert Sample("b", "single_edit", ["x.png"], "Do it").sources is None


# -- pieces ----------------------------------------------------------------------------------
def test_schema_and_reply_parsing():
    plan = valid_plan("style_transfer", ("s_ok", "st_ok"))
    assert schema_errors(plan, "style_transfer") == []
    assert schema_errors(plan, "animal_scene") == ["task: must be 'animal_scene' (the task asked for), got 'style_transfer'"]
    bad = dict(plan, placement={"region": "somewhere", "scale": "medium"}, extra=1)
    errors = " ".join(schema_errors(bad, "style_transfer"))
    assert "Additional properties are not allowed ('extra'" in errors and "placement/region" in errors
    assert parse_reply("```json\n" + json.dumps(plan) + "\n```") == plan
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_reply("{'single': 'quotes'}")


def test_pairs_are_distinct_seeded_and_keyed_by_content(tmp_path):
    make_pools(tmp_path, ["p1", "p2", "p3", "c1", "c2"])
    (tmp_path / "pools" / "people" / "copy_of_p1.png").write_bytes((tmp_path / "pools" / "people" / "p1.png").read_bytes())
    pools = scan_pools({"people": tmp_path / "pools" / "people", "clothing": tmp_path / "pools" / "clothing"})
    assert len(pools["people"]) == 3  # the copy is the same image
    people = pools["people"]
    groups = list(iter_pairs("group_portrait", people, people, seed=1))
    assert len(groups) == 3 and len({k for *_, k in groups}) == 3
    assert [k for *_, k in iter_pairs("group_portrait", people, people, seed=1)] == [k for *_, k in groups]
    assert pair_key("group_portrait", "a", "b") == pair_key("group_portrait", "b", "a")
    assert pair_key("clothing_replace", "a", "b") != pair_key("clothing_replace", "b", "a")
    splits = [split_of(f"{i:020x}", 0.25) for i in range(400)]
    assert 60 < splits.count("test") < 140 and splits == [split_of(f"{i:020x}", 0.25) for i in range(400)]
    # issue 20 item 8: a task of >= 2 samples always has a test sample; the hash split is kept otherwise
    keys = {f"t{t}": [f"{t}-{i:020x}" for i in range(n)] for t, n in enumerate([1, 2, 3, 5, 40])}
    for fraction in (0.01, 0.1, 0.25):
        assigned = assign_splits(keys, fraction)
        for task, own in keys.items():
            tests = [k for k in own if assigned[k] == "test"]
            assert len(own) < 2 or tests, (task, fraction)
            by_hash = [k for k in own if split_of(k, fraction) == "test"]
            assert tests == by_hash or (not by_hash and len(tests) == 1)
    assert set(assign_splits(keys, 0.0).values()) == {"train"}


def test_config_rejects_unknown_fields_and_insecure_key_use(tmp_path):
    base = {"pools": {}, "tasks": {}, "llm": {"base_url": "http://example.com/v1", "model": "m", "api_key_env": KEY_ENV}}
    with pytest.raises(ConfigError, match="plain http"):
        parse_config(base, tmp_path)
    with pytest.raises(ConfigError, match="unknown field"):
        parse_config({**base, "llm": {"base_url": "https://x/v1", "model": "m", "colour": 1}}, tmp_path)
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        parse_config({**base, "llm": {"base_url": "https://x/v1", "model": "m", "api_key_env": "sk-abc123"}}, tmp_path)


def test_unknown_judge_profile_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("DUALREF_JUDGE_CONFIG", raising=False)
    from training.synth.loop import Synthesizer

    endpoint = {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
    cfg = parse_config({"pools": {}, "tasks": {}, "llm": endpoint, "image": endpoint, "judge": {"profile": "nope"}}, tmp_path)
    with pytest.raises(ConfigError, match="judge filter: unknown judge profile 'nope'"):
        Synthesizer(cfg, progress=False)
    cfg.image = None
    with pytest.raises(ConfigError, match="the judge filter scores target images; configure 'image'"):
        Synthesizer(cfg, judge=ColorJudge(), progress=False)
