"""The ComfyUI queue client against the real host (``main.py --cpu``), plus the filling rules.

Until the task workflows exist, the host tests use a graph of core nodes that runs on the CPU
without model files: image 2 is pasted into image 1 at x = seed, y = 8 (ImageCompositeMasked), and
the instruction becomes SaveImage's filename prefix, so every filled value shows in the result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_host import REPO, free_port
from comfy_queue.comfy_errors import ComfyError, ExecutionFailed, MissingNodes, ServerUnavailable, ValidationFailed, WorkflowError
from comfy_queue.fill import check_node_types, fill_workflow, load_workflow, pack_node_ids
from comfy_queue.queue import Job, queue_job, read_jobs, run_batch

PASTE_GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "unset.png"}, "_meta": {"title": "image 1"}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "unset.png"}, "_meta": {"title": " Image  2"}},
    "3": {"class_type": "PrimitiveInt", "inputs": {"value": 0}, "_meta": {"title": "seed"}},
    "4": {"class_type": "PrimitiveString", "inputs": {"value": ""}, "_meta": {"title": "instruction"}},
    "5": {"class_type": "ImageCompositeMasked",
          "inputs": {"destination": ["1", 0], "source": ["2", 0], "x": ["3", 0], "y": 8, "resize_source": False}},
    "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": ["4", 0]},
          "_meta": {"title": "output"}},
    "7": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},  # not titled output: not downloaded
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    subject = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(scene).save(d / "scene.png")
    Image.fromarray(subject).save(d / "subject.png")
    return d / "scene.png", d / "subject.png", scene, subject


def pasted(scene, subject, x, y=8):
    out = scene.copy()
    out[y:y + subject.shape[0], x:x + subject.shape[1]] = subject
    return out


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: the port was just released


# -- filling rules (no host needed) -----------------------------------------------------------
def test_fill_sets_titled_inputs_and_leaves_the_original_alone():
    graph = fill_workflow(PASTE_GRAPH, ["a.png", "b.png"], "put b into a", seed=12)
    assert graph["1"]["inputs"]["image"] == "a.png" and graph["2"]["inputs"]["image"] == "b.png"
    assert graph["4"]["inputs"]["value"] == "put b into a" and graph["3"]["inputs"]["value"] == 12
    assert PASTE_GRAPH["1"]["inputs"]["image"] == "unset.png"


def test_fill_without_seed_title_sets_every_sampler_seed():
    graph = {k: v for k, v in PASTE_GRAPH.items() if k != "3"}
    graph["8"] = {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["9", 0]}}
    graph["9"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    filled = fill_workflow(graph, ["a", "b"], "i", seed=77)
    assert filled["8"]["inputs"]["seed"] == 77 and filled["9"]["inputs"]["noise_seed"] == 77
    assert fill_workflow(graph, ["a", "b"], "i")["8"]["inputs"]["seed"] == 1  # no seed: left as saved


def test_fill_errors_name_the_problem():
    no_instruction = {k: v for k, v in PASTE_GRAPH.items() if k != "4"}
    with pytest.raises(WorkflowError, match="no node titled 'instruction'"):
        fill_workflow(no_instruction, ["a", "b"], "i")
    wired = json.loads(json.dumps(PASTE_GRAPH))
    wired["4"]["inputs"]["value"] = ["3", 0]
    with pytest.raises(WorkflowError, match=r"node 4 \(PrimitiveString\).*'value' input wired"):
        fill_workflow(wired, ["a", "b"], "i")


def test_load_workflow_rejects_ui_format_and_unknown_task(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(WorkflowError, match="UI-format.*Export \\(API\\)"):
        load_workflow(path=ui)
    with pytest.raises(WorkflowError, match="no API workflow for task 'no_such_task'"):
        load_workflow("no_such_task")


def test_missing_pack_node_names_this_pack(tmp_path):
    graph = {"1": {"class_type": "DiagonalPositionPatch", "inputs": {}},
             "2": {"class_type": "SomebodyElsesNode", "inputs": {}}, "3": {"class_type": "LoadImage", "inputs": {}}}
    with pytest.raises(MissingNodes) as err:
        check_node_types(graph, {"LoadImage": {}}, "http://h:1", pack_nodes={"DiagonalPositionPatch"})
    text = str(err.value)
    assert "DiagonalPositionPatch (node 1): provided by ComfyUI-DualRef" in text
    assert "SomebodyElsesNode (node 2): install the custom node pack" in text
    assert "custom_nodes" in text and "LoadImage" not in text
    # The pack's node ids are read from the V3 schemas in nodes/*.py.
    (tmp_path / "patch.py").write_text('io.Schema(\n    node_id="DiagonalPositionPatch", display_name="x")')
    assert pack_node_ids(tmp_path) == {"DiagonalPositionPatch"}


def test_read_jobs_accepts_job_and_manifest_lines(tmp_path):
    f = tmp_path / "jobs.jsonl"
    f.write_text(
        json.dumps({"image1": "a.png", "image2": "/abs/b.png", "instruction": "x", "seed": 3}) + "\n"
        + json.dumps({"id": "s1", "task": "animal_scene", "images": ["c.png", "d.png"], "instruction": "y",
                      "split": "test"}) + "\n"
    )
    jobs = read_jobs(f)
    assert jobs[0].image1 == str(tmp_path / "a.png") and jobs[0].image2 == "/abs/b.png" and jobs[0].seed == 3
    assert [j.id for j in read_jobs(f, split="test")] == ["s1"]


def test_missing_input_image_is_named_before_any_server_is_asked(tmp_path):
    with pytest.raises(ComfyError, match="input image not found: .*nope.png"):
        queue_job(dead_url(), PASTE_GRAPH, [tmp_path / "nope.png", tmp_path / "nope2.png"], "x", out_dir=tmp_path)


def test_server_down_names_url_and_says_to_start_comfyui(pair, tmp_path):
    url = dead_url()
    with pytest.raises(ServerUnavailable) as err:
        queue_job(url, PASTE_GRAPH, pair[:2], "x", out_dir=tmp_path)
    assert url in str(err.value) and "Start ComfyUI" in str(err.value)


def test_batch_with_every_server_down_fails_each_job_by_name(pair, tmp_path):
    wf = tmp_path / "paste.json"
    wf.write_text(json.dumps(PASTE_GRAPH))
    jobs = [Job(str(pair[0]), str(pair[1]), f"job {x}", workflow=str(wf)) for x in range(3)]
    results = list(run_batch([dead_url(), dead_url()], jobs, tmp_path / "out", progress=False))
    assert sorted(r.job.id for r in results) == sorted(j.id for j in jobs)
    assert all(r.error == "no server left to run it (all of them went down)" for r in results)
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 3


def test_cli_server_down_exits_2_with_the_reason(pair, tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(PASTE_GRAPH))
    url = dead_url()
    run = subprocess.run(
        [sys.executable, "-m", "comfy_queue", "--server", url, "--workflow", str(wf), "--image1", str(pair[0]),
         "--image2", str(pair[1]), "--instruction", "x", "--out", str(tmp_path / "o"), "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 2 and f"ComfyUI is not reachable at {url}" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_batch_names_every_bad_job_before_the_first_is_queued(pair, tmp_path, capsys):
    from comfy_queue.queue import main

    wf = tmp_path / "paste.json"
    wf.write_text(json.dumps(PASTE_GRAPH))
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps(j) for j in (
        {"id": "good", "image1": str(pair[0]), "image2": str(pair[1]), "instruction": "x", "workflow": str(wf)},
        {"id": "no-image", "image1": "gone.png", "image2": str(pair[1]), "instruction": "x", "workflow": str(wf)},
        {"id": "no-task", "image1": str(pair[0]), "image2": str(pair[1]), "instruction": "x", "task": "dance"},
        {"id": "no-workflow", "image1": str(pair[0]), "image2": str(pair[1]), "instruction": "x",
         "workflow": "missing.json"})) + "\n")
    # the server is down: had any job been started, the error would be about the server
    assert main(["--server", dead_url(), "--batch", str(batch), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "job no-image: image1 not found" in err and "job no-task: task 'dance'" in err
    assert "job no-workflow: workflow not found" in err and "job good" not in err and "not reachable" not in err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_progress_names_nodes_by_title_not_by_id():
    from comfy_queue.queue import _step_progress, node_names

    on_event, bar = _step_progress(True, node_names(PASTE_GRAPH))
    try:
        on_event("executing", {"node": "2", "prompt_id": "p"})
        assert bar.desc.rstrip(": ") == " Image  2"  # tqdm adds ": " to a description
        on_event("executing", {"node": "6", "prompt_id": "p"})
        assert bar.desc.rstrip(": ") == (PASTE_GRAPH["6"].get("_meta") or {}).get("title", "SaveImage")
    finally:
        bar.close()


def test_a_frozen_server_is_named_with_what_happened_and_the_fix(pair, tmp_path):
    """A server that takes the prompt and never finishes it (frozen): the job stops at --timeout with a
    message that says so and what to do, instead of waiting for ever or a bare 'timed out'."""
    import http.server
    import threading

    class Frozen(http.server.BaseHTTPRequestHandler):
        def _json(self, value):
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # /object_info knows every node; /history never has the prompt
            nodes = {n["class_type"]: {} for n in PASTE_GRAPH.values()}
            self._json(nodes if self.path.startswith("/object_info") else {})

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._json({"name": "x.png"} if self.path.startswith("/upload") else {"prompt_id": "p1", "number": 1})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Frozen)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ComfyError, match="frozen, or busy with other work.*raise --timeout"):
            queue_job(f"http://127.0.0.1:{server.server_address[1]}", PASTE_GRAPH, pair[:2], "x", out_dir=tmp_path,
                      timeout=1.0, use_websocket=False)
    finally:
        server.shutdown()


# -- against the real host ----------------------------------------------------------------------
@pytest.mark.host
def test_queue_job_uploads_runs_follows_ws_and_downloads(comfy_server, pair, tmp_path):
    scene_path, subject_path, scene, subject = pair
    events = []
    paths = queue_job(comfy_server.url, PASTE_GRAPH, [scene_path, subject_path], "dualref paste", seed=16,
                      out_dir=tmp_path, on_event=lambda kind, data: events.append((kind, data.get("node"))))
    assert len(paths) == 1 and paths[0].name.startswith("dualref paste_")  # instruction -> prefix
    assert np.array_equal(np.array(Image.open(paths[0])), pasted(scene, subject, x=16))  # seed -> x
    kinds = [k for k, _ in events]
    assert kinds[0] == "execution_start" and kinds[-1] == "execution_success"
    assert {("executing", "5"), ("executing", "6"), ("executed", "6")} <= set(events)

    # The same job again is served from ComfyUI's cache; polling /history instead of /ws still
    # finds the saved image.
    again = queue_job(comfy_server.url, PASTE_GRAPH, [scene_path, subject_path], "dualref paste", seed=16,
                      out_dir=tmp_path / "again", use_websocket=False)
    assert np.array_equal(np.array(Image.open(again[0])), pasted(scene, subject, x=16))


@pytest.mark.host
def test_missing_node_type_is_named_before_anything_is_queued(comfy_server, pair, tmp_path):
    graph = {**PASTE_GRAPH, "9": {"class_type": "NoSuchNodeAnywhere", "inputs": {}}}
    before = set(comfy_server.get_json("/history"))
    with pytest.raises(MissingNodes, match=r"NoSuchNodeAnywhere \(node 9\)"):
        queue_job(comfy_server.url, graph, pair[:2], "x", out_dir=tmp_path)
    assert set(comfy_server.get_json("/history")) == before


@pytest.mark.host
def test_validation_failure_lists_node_errors(comfy_server, pair, tmp_path):
    graph = json.loads(json.dumps(PASTE_GRAPH))
    graph["5"]["inputs"]["y"] = -3
    with pytest.raises(ValidationFailed) as err:
        queue_job(comfy_server.url, graph, pair[:2], "x", out_dir=tmp_path)
    text = str(err.value)
    assert "node 5 (ImageCompositeMasked) input 'y': Value -3 smaller than min of 0" in text
    assert comfy_server.url in text


@pytest.mark.host
def test_execution_error_names_node_and_exception(comfy_server, pair, tmp_path):
    # SaveImage refuses a prefix that leaves the output folder: a failure at run time, not validation.
    with pytest.raises(ExecutionFailed, match=r"node 6 \(SaveImage\).*outside the output folder"):
        queue_job(comfy_server.url, PASTE_GRAPH, pair[:2], "../escape", out_dir=tmp_path)


@pytest.mark.host
def test_batch_shared_by_servers_with_one_down_then_resume(comfy_server, pair, tmp_path):
    # One real server under two URLs (127.0.0.1 and localhost) stands in for two machines (a second
    # ComfyUI would cost 2 cores); a third URL has nothing behind it and must hand its job back.
    scene_path, subject_path, scene, subject = pair
    servers = [comfy_server.url, f"http://localhost:{comfy_server.port}", dead_url()]
    wf = tmp_path / "paste.json"
    wf.write_text(json.dumps(PASTE_GRAPH))
    jobs = [Job(str(scene_path), str(subject_path), f"batch job {x}", workflow=str(wf), seed=x) for x in (0, 8, 24, 32)]
    out = tmp_path / "out"
    results = list(run_batch(servers, jobs, out, progress=False))
    assert sorted(r.job.id for r in results) == sorted(j.id for j in jobs)
    assert all(r.ok for r in results), [r.error for r in results]
    assert {r.server for r in results} <= set(servers[:2])
    for r in results:
        assert r.outputs == [f"{r.job.id}.png"]  # named by the job, not by the server's file counter
        assert np.array_equal(np.array(Image.open(out / r.outputs[0])), pasted(scene, subject, x=r.job.seed))
    lines = [json.loads(t) for t in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert list(run_batch(servers, jobs, out, progress=False)) == []  # resumed: nothing left to do


@pytest.mark.host
def test_cli_single_job_and_batch(comfy_server, pair, tmp_path):
    scene_path, subject_path, scene, subject = pair
    wf = tmp_path / "paste.json"
    wf.write_text(json.dumps(PASTE_GRAPH))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "comfy_queue", "--server", comfy_server.url, "--workflow", str(wf),
         "--image1", str(scene_path), "--image2", str(subject_path), "--instruction", "cli job", "--seed", "4",
         "--out", str(tmp_path / "single"), "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert run.returncode == 0, run.stderr
    (path,) = [Path(line) for line in run.stdout.split("\n") if line.strip()]
    assert np.array_equal(np.array(Image.open(path)), pasted(scene, subject, x=4))

    batch = tmp_path / "jobs.jsonl"
    batch.write_text("".join(json.dumps({"id": f"j{x}", "images": [str(scene_path), str(subject_path)],
                                         "instruction": f"cli batch {x}", "seed": x}) + "\n" for x in (2, 6)))
    run = subprocess.run(
        [sys.executable, "-m", "comfy_queue", "--server", comfy_server.url, "--server",
         f"http://localhost:{comfy_server.port}", "--workflow", str(wf), "--batch", str(batch),
         "--out", str(tmp_path / "batch"), "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert run.returncode == 0, run.stderr
    ids = sorted(line.split("\t")[0] for line in run.stdout.splitlines())
    assert ids == ["j2", "j6"]
