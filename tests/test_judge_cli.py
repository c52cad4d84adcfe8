"""``python -m judge`` on a manifest against a loopback server: resumable results, summary, and no key anywhere."""
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from judge.cli import main
from judge.loopback import Reply, ScriptedChatServer
from judge.verdict import QUESTIONS

REPO = Path(__file__).resolve().parents[1]
SAMPLES = [("a0", "animal_scene"), ("a1", "animal_scene"), ("a2", "animal_scene"), ("a3", "animal_scene"),
           ("s0", "style_transfer"), ("s1", "style_transfer"), ("s2", "style_transfer")]
MISSING = "s2"  # no output image for this one


def index_of(sample_id: str) -> int:
    return [s for s, _ in SAMPLES].index(sample_id)


def truth(i: int, question: str) -> bool:
    return (i + QUESTIONS.index(question)) % 3 != 0


def png(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


@pytest.fixture
def dataset(tmp_path):
    data = tmp_path / "data"
    png(data / "refs" / "r1.png", 0)
    png(data / "refs" / "r2.png", 255)
    lines = [json.dumps({"id": sid, "task": task, "images": ["refs/r1.png", "refs/r2.png"],
                         "instruction": f"edit {sid}", "split": "test"}) for sid, task in SAMPLES]
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    outputs = tmp_path / "outputs"
    for sid, _ in SAMPLES:
        if sid != MISSING:
            png(outputs / f"{sid}.png", (index_of(sid), 7, 7))
    return data / "manifest.jsonl", outputs


class TruthServer:
    def __init__(self):
        self.failing: dict[tuple, Reply] = {}  # (sample index, question) -> reply to give instead
        self.lock = threading.Lock()
        self.server = ScriptedChatServer(self.script)

    def script(self, call):
        i = int(np.asarray(call.images()[2])[0, 0, 0])
        if (i, call.question) in self.failing:
            return self.failing[(i, call.question)]
        return Reply.answer("Yes, it does." if truth(i, call.question) else "No.", usage=(80, 3))


def config(tmp_path, server, key_env=None, **extra):
    profile = {"base_url": server.base_url, "model": "loop-vlm", "max_retries": 1, "backoff_base_s": 0.01,
               "cache_dir": str(tmp_path / "cache"), "price_input_per_mtok": 1.0, **extra}
    if key_env:
        profile["api_key_env"] = key_env
    path = tmp_path / "judges.json"
    path.write_text(json.dumps({"profiles": {"loop": profile}}))
    return path


def test_cli_scores_a_manifest_resumably(tmp_path, dataset):
    manifest, outputs = dataset
    truth_server = TruthServer()
    truth_server.failing[(index_of("a3"), "fidelity")] = Reply.error(500, "down")
    with truth_server.server as server:
        argv = ["--profile", "loop", "--config", str(config(tmp_path, server)), "--manifest", str(manifest),
                "--outputs", str(outputs), "--out", str(tmp_path / "res")]
        assert main(argv) == 0
        lines = [json.loads(x) for x in (tmp_path / "res" / "verdicts.jsonl").read_text().splitlines()]
        status = {r["id"]: r["status"] for r in lines}
        assert status == {"a0": "judged", "a1": "judged", "a2": "judged", "a3": "unjudged",
                          "s0": "judged", "s1": "judged", "s2": "missing"}
        for r in lines:
            if r["status"] == "judged":
                i = index_of(r["id"])
                assert {q: r["verdict"][q] for q in QUESTIONS} == {q: float(truth(i, q)) for q in QUESTIONS}
                assert r["verdict"]["prompt_version"] and r["profile"] == "loop"
        summary = json.loads((tmp_path / "res" / "summary.json").read_text())
        animal = summary["tasks"]["animal_scene"]
        assert (animal["n_judged"], animal["n_unjudged"]) == (3, 1)
        expected = np.mean([float(truth(i, "fidelity")) for i in range(3)])
        assert animal["fidelity"] == pytest.approx(expected)
        assert summary["tasks"]["style_transfer"]["n_missing"] == 1
        assert set(summary["table2"]) == {"Animal", "Style"}
        assert summary["usage_this_run"]["prompt_tokens"] > 0 and summary["usage_this_run"]["cost_usd"] > 0

        # Rerun after the server recovers: judged samples are skipped, the failed question is asked
        # again (the other two answers of a3 come from the cache), the missing output is looked for again.
        truth_server.failing.clear()
        before = server.count
        assert main(argv) == 0
        assert server.count - before == 1
        new = [json.loads(x) for x in (tmp_path / "res" / "verdicts.jsonl").read_text().splitlines()][len(lines):]
        assert sorted(r["id"] for r in new) == ["a3", "s2"]
        summary = json.loads((tmp_path / "res" / "summary.json").read_text())
        assert summary["overall"]["n_judged"] == 6 and summary["overall"]["n_unjudged"] == 0
        assert summary["overall"]["reward"] == pytest.approx(np.mean(
            [np.mean([truth(index_of(s), q) for q in QUESTIONS]) for s, _ in SAMPLES if s != MISSING]))


def test_cli_names_a_bad_manifest_line_and_a_bad_profile(tmp_path, dataset, capsys):
    manifest, outputs = dataset
    with manifest.open("a") as fh:
        fh.write('{"id": "x", "task": "dance", "images": ["a"], "instruction": "i"}\n')
    with ScriptedChatServer() as server:
        cfg = config(tmp_path, server)
        assert main(["--profile", "loop", "--config", str(cfg), "--manifest", str(manifest), "--outputs", str(outputs)]) == 2
        assert f"{manifest}:8: unknown task 'dance'" in capsys.readouterr().err
        assert main(["--profile", "nope", "--config", str(cfg), "--manifest", str(manifest), "--outputs", str(outputs)]) == 2
        assert "unknown judge profile 'nope'" in capsys.readouterr().err


def test_cli_runs_as_a_module_on_a_folder_with_its_manifest(tmp_path, dataset):
    manifest, outputs = dataset
    (outputs / "manifest.jsonl").write_text(manifest.read_text().replace("refs/", str(manifest.parent / "refs") + "/"))
    with TruthServer().server as server:
        cfg = config(tmp_path, server)
        proc = subprocess.run([sys.executable, "-m", "judge", "--profile", "loop", "--config", str(cfg), "--outputs", str(outputs)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((outputs / "judge" / "loop-binary" / "summary.json").read_text())
    assert summary["overall"]["n_judged"] == 6 and "Animal" in json.loads(proc.stdout)["table2"]


def test_the_key_is_sent_but_never_written_or_logged(tmp_path, dataset, caplog, capsys, monkeypatch):
    key = f"sk-dualref-canary-{uuid.uuid4().hex}"
    monkeypatch.setenv("DUALREF_CANARY_KEY", key)
    manifest, outputs = dataset
    caplog.set_level(logging.DEBUG)  # everything, urllib3 included
    truth_server = TruthServer()
    # a server that echoes the key in an error body, as OpenAI does for a bad key
    truth_server.failing[(index_of("a2"), "fidelity")] = Reply.error(400, f"bad request from {key}")
    with truth_server.server as server:
        cfg = config(tmp_path, server, key_env="DUALREF_CANARY_KEY")
        argv = ["--profile", "loop", "--config", str(cfg), "--manifest", str(manifest), "--outputs", str(outputs),
                "--out", str(tmp_path / "res"), "-v"]
        assert main(argv) == 0
        assert main(argv + ["--list-profiles"]) == 0
        # a bad key: the run stops (exit 2) with the server's reason, redacted
        truth_server.failing[(index_of("a1"), "realism")] = Reply.error(401, f"Incorrect API key provided: {key}.")
        cfg2 = config(tmp_path, server, key_env="DUALREF_CANARY_KEY", cache_dir=str(tmp_path / "cache2"))
        assert main(argv[:2] + ["--config", str(cfg2)] + argv[4:-3] + ["--out", str(tmp_path / "res2"), "-v"]) == 2
    assert server.auth_seen == {f"Bearer {key}"}  # the server did get it
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in written) and len(list((tmp_path / "cache").rglob("*.json"))) > 0
    fragments = [key, key[-16:]]
    for path in written:
        data = path.read_bytes()
        for fragment in fragments:
            assert fragment.encode() not in data, f"key found in {path}"
    captured = capsys.readouterr()
    logs = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert "judge" in caplog.text and "DUALREF_CANARY_KEY" in captured.out  # things were logged and printed
    assert "HTTP 401" in captured.err and "Incorrect API key provided" in captured.err
    for fragment in fragments:
        assert fragment not in logs and fragment not in captured.out and fragment not in captured.err
    records = [json.loads(x) for x in (tmp_path / "res" / "verdicts.jsonl").read_text().splitlines()]
    assert {r["id"] for r in records if r["status"] == "unjudged"} == {"a2"}


def test_answers_that_echo_the_key_are_scrubbed_everywhere(tmp_path, dataset, capsys, monkeypatch):
    """Issue 18 item 6: a server that echoes the key (and so the Authorization header) in its answer
    text: stored verbatim in verdicts and cache, and printed in an unparseable-reply reason, before."""
    key = f"sk-echo-{uuid.uuid4().hex}"
    monkeypatch.setenv("DUALREF_ECHO_KEY", key)
    manifest, outputs = dataset

    def script(call):
        i = int(np.asarray(call.images()[2])[0, 0, 0])
        if i == index_of("s1"):  # never a yes/no: unjudged, its reason quotes the reply
            return Reply.answer(f"I will not say. Your header was {call.auth}")
        word = "Yes" if truth(i, call.question) else "No"
        return Reply.answer(f"{word}. (request authorised with {call.auth}; key {key})")

    with ScriptedChatServer(script) as server:
        cfg = config(tmp_path, server, key_env="DUALREF_ECHO_KEY", parse_retries=0)
        argv = ["--profile", "loop", "--config", str(cfg), "--manifest", str(manifest), "--outputs", str(outputs),
                "--out", str(tmp_path / "res")]
        assert main(argv) == 0
        assert main(argv) == 0  # a rerun reads the cache and prints the summary
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "res" / "verdicts.jsonl").read_text().splitlines())}
    assert records["a0"]["status"] == "judged" and "[REDACTED]" in records["a0"]["verdict"]["answers"]["fidelity"]
    assert records["s1"]["status"] == "unjudged" and "[REDACTED]" in records["s1"]["reason"]
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    assert len(stored) > 10
    captured = capsys.readouterr()
    for fragment in (key, key[-12:]):
        assert fragment not in captured.out + captured.err
        for path in stored:
            assert fragment.encode() not in path.read_bytes(), f"key found in {path}"


def test_a_rejected_key_or_unknown_model_stops_the_run(tmp_path, dataset, capsys, monkeypatch):
    """Issue 18 item 7: 401/403/unknown model stop after the first such answer, exit 2 with the
    server's reason (100 samples sent 300 rejected requests and exited 0 before)."""
    monkeypatch.setenv("DUALREF_STOP_KEY", "sk-stop-0123456789abcdef")
    manifest, outputs = dataset
    lines = [json.dumps({"id": f"m{i}", "task": "animal_scene", "images": ["refs/r1.png", "refs/r2.png"],
                         "instruction": f"edit {i}", "split": "test"}) for i in range(100)]
    manifest.write_text("\n".join(lines) + "\n")
    for i in range(100):
        png(outputs / f"m{i}.png", (i, 9, 9))
    for status, message in [(401, "Incorrect API key provided: sk-stop-****cdef."), (403, "Project lacks access"),
                            (404, "The model `loop-vlm` does not exist or you do not have access to it."),
                            (400, "Invalid model name passed in model=loop-vlm: model not found")]:
        with ScriptedChatServer(lambda call: Reply.error(status, message)) as server:
            cfg = config(tmp_path, server, key_env="DUALREF_STOP_KEY", concurrency=4, cache_dir=str(tmp_path / f"c{status}"))
            code = main(["--profile", "loop", "--config", str(cfg), "--manifest", str(manifest), "--outputs",
                         str(outputs), "--out", str(tmp_path / f"res{status}")])
        err = capsys.readouterr().err
        assert code == 2, (status, err)
        assert server.count <= 4, (status, server.count)  # only what was already in flight
        assert f"HTTP {status}" in err and message.split(":")[0].split("`")[0] in err and "sk-stop-0123" not in err
        summary = json.loads((tmp_path / f"res{status}" / "summary.json").read_text())
        assert summary["overall"]["n_judged"] == 0 and summary["overall"]["n_unjudged"] == 0  # not recorded: rerun does them


def test_cli_lists_every_bad_manifest_line_and_warns_on_duplicate_ids(tmp_path, dataset, capsys, caplog):
    manifest, outputs = dataset
    good = manifest.read_text().splitlines()
    bad = ['{"id": "x", "task": "dance", "images": ["a"], "instruction": "i"}', "{not json",
           '{"id": "y", "task": "animal_scene", "images": [], "instruction": "i"}']
    manifest.write_text("\n".join(good[:2] + bad[:1] + good[2:] + bad[1:]) + "\n")
    with ScriptedChatServer() as server:
        argv = ["--profile", "loop", "--config", str(config(tmp_path, server)), "--manifest", str(manifest),
                "--outputs", str(outputs), "--out", str(tmp_path / "res")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "3 bad line(s)" in err
        assert f"{manifest}:3: unknown task 'dance'" in err and f"{manifest}:9: not valid JSON" in err
        assert f"{manifest}:10: 'images' must be" in err
        manifest.write_text("\n".join(good + good[:2]) + "\n")  # a0 and a1 twice
        with caplog.at_level(logging.WARNING):
            assert main(argv) == 0
        assert "2 sample id(s) appear more than once" in caplog.text and "'a0' on lines 1, 8" in caplog.text
        records = [json.loads(x) for x in (tmp_path / "res" / "verdicts.jsonl").read_text().splitlines()]
        assert len(records) == len(SAMPLES) and server.count == 3 * (len(SAMPLES) - 1)  # each id judged once


def test_ctrl_c_stops_in_flight_requests_and_writes_the_summary(tmp_path, dataset):
    """Issue 18 item 7: Ctrl-C ends a run within ~2 s although requests hang, and summary.json holds
    what was judged (the run waited for every in-flight request before)."""
    manifest, outputs = dataset
    hang = threading.Event()

    def script(call):
        i = int(np.asarray(call.images()[2])[0, 0, 0])
        if i >= index_of("a2"):
            hang.wait(60)  # a server that never answers these
        return Reply.answer("Yes, it does." if truth(i, call.question) else "No.")

    with ScriptedChatServer(script) as server:
        cfg = config(tmp_path, server, concurrency=4, timeout_s=60)
        proc = subprocess.Popen([sys.executable, "-m", "judge", "--profile", "loop", "--config", str(cfg), "--manifest",
                                 str(manifest), "--outputs", str(outputs), "--out", str(tmp_path / "res")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            verdicts = tmp_path / "res" / "verdicts.jsonl"
            deadline = time.monotonic() + 60
            def judged():
                lines = verdicts.read_text().splitlines() if verdicts.exists() else []
                return sum(json.loads(x)["status"] == "judged" for x in lines if x.endswith("}"))

            while time.monotonic() < deadline and judged() < 2:  # a0 and a1; s2 is "missing" at once
                time.sleep(0.05)
            time.sleep(0.3)  # the hanging requests are in flight
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            elapsed = time.monotonic() - sent
        finally:
            hang.set()
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert elapsed < 2.5, f"took {elapsed:.1f}s to stop"
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["overall"]["n_judged"] == 2 and "interrupted" in err


def test_cli_with_the_toy_profile_on_a_toy_world(tmp_path):
    """The toy world's programmatic judge, chosen by name, gets each sample's plan and task."""
    import shutil

    from training.toy.world import generate_world

    world = tmp_path / "world"
    generate_world(world, seed=3, train=0, test=1, single_train=0, single_test=0, size=32, progress=False)
    samples = [json.loads(x) for x in (world / "manifest.jsonl").read_text().splitlines()]
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    unedited = samples[0]["id"]
    for s in samples:  # the exact targets, except one output that is just reference 1 (no edit made)
        source = s["images"][0] if s["id"] == unedited else s["target"]
        shutil.copy(world / source, outputs / f"{s['id']}.png")
    assert main(["--profile", "toy", "--manifest", str(world / "manifest.jsonl"), "--outputs", str(outputs),
                 "--out", str(tmp_path / "res")]) == 0
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "res" / "verdicts.jsonl").read_text().splitlines())}
    assert set(records) == {s["id"] for s in samples} and all(r["status"] == "judged" for r in records.values())
    assert records[unedited]["verdict"]["fidelity"] == 0.0 and records[unedited]["judge"] == "toy"
    assert all(r["verdict"]["reward"] == 1.0 for i, r in records.items() if i != unedited)


def test_cli_score_mode_for_single_reference_edits(tmp_path):
    """GEdit-Bench-style 0-10 scores (paper Table 1): overall = sqrt(SC * PQ), averaged per task."""
    png(tmp_path / "src.png", 30)
    manifest = tmp_path / "single.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"g{i}", "task": "single_edit", "images": ["src.png"],
                                            "instruction": "make it red", "split": "test"}) + "\n" for i in range(3)))
    for i in range(3):
        png(tmp_path / "outs" / f"g{i}.png", 100 + i)

    def script(call):
        i = int(np.asarray(call.images()[1])[0, 0, 0]) - 100
        pair = [8, 4 + i] if call.question == "semantic_consistency" else [9, 9]
        return Reply.answer(json.dumps({"score": pair, "reasoning": "ok"}))

    with ScriptedChatServer(script) as server:
        cfg = config(tmp_path, server)
        assert main(["--profile", "loop", "--config", str(cfg), "--manifest", str(manifest), "--outputs",
                     str(tmp_path / "outs"), "--mode", "score", "--out", str(tmp_path / "res")]) == 0
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())["tasks"]["single_edit"]
    assert summary["semantic_consistency"] == pytest.approx(5.0) and summary["perceptual_quality"] == 9.0
    assert summary["overall"] == pytest.approx(np.mean([np.sqrt(sc * 9) for sc in (4, 5, 6)]))
