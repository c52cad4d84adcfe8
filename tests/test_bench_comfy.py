"""``python -m training.bench --generator comfyui`` against the real ComfyUI host (issue 7, item 3).

The host runs the committed task workflow on tiny model files of the real formats (the same
substitutions as tests/test_workflows.py: CLIP-L for the 4.7B T5-XXL, images kept at 64 px), so
this checks the plumbing end to end: overrides, upload, queueing, download, per-sample seeds,
errors reported per sample, and resuming without queueing finished samples again.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from training.bench.cli import main
from training.bench.generators import apply_overrides
from training.bench.run_folder import RunDir
from training.seeds import SEED_STRIDE
from training.toy.world import generate_world


def lines(path: Path) -> list[dict]:
    return [json.loads(t) for t in path.read_text().splitlines() if t.strip()]


@pytest.fixture
def manifest(tmp_path) -> Path:
    generate_world(tmp_path / "world", seed=0, train=0, test=2, tasks=("animal_scene",), progress=False)
    return tmp_path / "world" / "manifest.jsonl"


def test_comfy_overrides_set_the_standard_nodes_and_bypass_the_lora():
    from comfy_queue.comfy_errors import WorkflowError
    from comfy_queue.fill import load_workflow

    graph = load_workflow("animal_scene")
    done = apply_overrides(graph, "animal_scene", model="other.safetensors", layout="offset", steps=3,
                           sft_lora="mine.safetensors", ddpo_lora="aligned.safetensors")
    by_type = {n["class_type"]: n["inputs"] for n in done.values()}
    assert by_type["UNETLoader"]["unet_name"] == "other.safetensors"
    assert by_type["DiagonalPositionPatch"]["method"] == "offset" and by_type["KSampler"]["steps"] == 3
    assert (by_type["DualLoRAApply"]["sft_lora"], by_type["DualLoRAApply"]["ddpo_lora"]) == \
        ("mine.safetensors", "aligned.safetensors")
    assert graph == load_workflow("animal_scene")  # the input graph is left alone
    bare = apply_overrides(graph, "animal_scene", sft_lora="none")
    (lora_id,) = [i for i, n in graph.items() if n["class_type"] == "DualLoRAApply"]
    (patch_id,) = [i for i, n in graph.items() if n["class_type"] == "DiagonalPositionPatch"]
    assert lora_id not in bare
    assert next(n for n in bare.values() if n["class_type"] == "KSampler")["inputs"]["model"] == [patch_id, 0]
    with pytest.raises(WorkflowError, match="no FluxGuidance node"):
        apply_overrides({"1": {"class_type": "KSampler", "inputs": {}}}, "mine.json", guidance=2.0)


def tiny_workflows(folder: Path) -> Path:
    """The animal_scene workflow as shipped with the tiny-model substitutions (tiny_comfy_models.shrink_for_cpu),
    in ``folder``."""
    from comfy_queue.fill import load_workflow
    from tiny_comfy_models import shrink_for_cpu

    folder.mkdir()
    (folder / "animal_scene.json").write_text(json.dumps(shrink_for_cpu(load_workflow("animal_scene"), steps=None)))
    return folder


@pytest.fixture(scope="module")
def tiny_host(comfy_host, tmp_path_factory):
    """ComfyUI with tiny model files under the task workflows' names (as in test_workflows.py)."""
    import tiny_comfy_models

    with tiny_comfy_models.tiny_kontext_server(tmp_path_factory.mktemp("bench-tiny-host")) as server:
        yield server


@pytest.mark.host
def test_comfyui_generator_runs_the_task_workflow_on_the_real_host(tmp_path, tiny_host, manifest, capsys):
    from comfy_queue.task_graphs import SFT_LORA

    samples = [s for s in lines(manifest) if s["task"] == "animal_scene"]
    (manifest.parent / samples[1]["images"][1]).unlink()  # this job fails before any upload
    workflows = tiny_workflows(tmp_path / "workflows")
    out = tmp_path / "run"
    argv = ["--generator", "comfyui", "--server", tiny_host.url, "--workflow-dir", str(workflows), "--manifest",
            str(manifest), "--tasks", "animal_scene", "--steps", "2", "--layout", "offset", "--seed", "5",
            "--out", str(out), "--timeout", "600", "-q"]
    # The host's SFT LoRA was trained with the diagonal layout: its DualLoRAApply refuses it under offset;
    # samples without an output make the run exit 1 (issue 20).
    assert main(argv + ["--lora", SFT_LORA]) == 1
    assert "outputs: 0 generated, 0 reused, 2 generator errors" in capsys.readouterr().out
    errors = json.loads((out / "judge" / "toy-binary" / "summary.json").read_text())["generator_errors"]
    assert "trained with the 'diagonal' layout but the model is patched with 'offset'" in errors[samples[0]["id"]]
    assert json.loads((out / "judge" / "toy-binary" / "summary.json").read_text())["overall"]["n_judged"] == 0

    argv += ["--lora", "none"]  # the base model with the offset layout: DualLoRAApply taken out
    assert main(argv) == 1  # one reference is missing
    printed = capsys.readouterr().out
    assert "outputs: 1 generated, 0 reused, 1 generator errors" in printed
    good = out / "outputs" / f"{samples[0]['id']}.png"
    with Image.open(good) as im:
        assert im.size == (64, 64)
        queued = json.loads(im.info["prompt"])  # what ComfyUI ran, embedded by SaveImage
    by_type = {n["class_type"]: n["inputs"] for n in queued.values()}
    assert by_type["KSampler"]["seed"] == 5 * SEED_STRIDE and by_type["KSampler"]["steps"] == 2
    assert by_type["DiagonalPositionPatch"]["method"] == "offset" and "DualLoRAApply" not in by_type
    assert next(n for n in queued.values() if n["_meta"]["title"] == "instruction")["inputs"]["value"] == \
        samples[0]["instruction"]
    errors = json.loads((out / "judge" / "toy-binary" / "summary.json").read_text())["generator_errors"]
    assert list(errors) == [samples[1]["id"]] and "input image not found" in errors[samples[1]["id"]]
    verdicts = RunDir(out).verdicts("toy-binary")  # the latest record per sample
    assert {i: v["status"] for i, v in verdicts.items()} == {samples[0]["id"]: "judged", samples[1]["id"]: "missing"}
    assert list((out).glob("judge.stale-*")), "the verdicts of the first settings were not moved aside"

    stamp = good.stat().st_mtime_ns
    jobs = len(lines(out / "comfy" / "results.jsonl"))
    assert main(argv) == 1  # resumed: the finished sample is not queued again, the failed one is retried
    assert good.stat().st_mtime_ns == stamp
    assert [r["id"] for r in lines(out / "comfy" / "results.jsonl")[jobs:]] == [samples[1]["id"]]
    assert "outputs: 0 generated, 1 reused, 1 generator errors" in capsys.readouterr().out


@pytest.mark.host
def test_a_lora_replaced_under_the_same_name_on_the_server_is_not_reused(tmp_path, tiny_host, manifest, capsys):
    """Issue 20 item 3: the outputs' identity holds what the server says about the model and LoRA files
    the workflow names (size, modification time, safetensors header), so a retrained LoRA copied over
    dualref_sft.safetensors (same size, same metadata) does not pass for the one that made them."""
    import tiny_comfy_models
    from dual_rope.lora_meta import read_dualref_metadata, read_safetensors_header
    from comfy_queue.task_graphs import SFT_LORA, UNET, VAE

    workflows = tiny_workflows(tmp_path / "workflows")
    out = tmp_path / "run"
    argv = ["--generator", "comfyui", "--server", tiny_host.url, "--workflow-dir", str(workflows), "--manifest",
            str(manifest), "--tasks", "animal_scene", "--limit-per-task", "1", "--steps", "1", "--lora", SFT_LORA,
            "--layout", "diagonal", "--out", str(out), "--timeout", "600", "-q"]
    assert main(argv) == 0
    assert "outputs: 1 generated, 0 reused, 0 generator errors" in capsys.readouterr().out
    files = json.loads((out / "run.json").read_text())["identity"]["files"]
    assert set(files) == {f"diffusion_models/{UNET}", f"loras/{SFT_LORA}", f"vae/{VAE}",
                          "text_encoders/clip_l.safetensors"}
    lora = tiny_host.base / "models" / "loras" / SFT_LORA
    assert files[f"loras/{SFT_LORA}"]["size"] == lora.stat().st_size and files[f"loras/{SFT_LORA}"]["header"]
    assert main(argv) == 0 and "outputs: 0 generated, 1 reused" in capsys.readouterr().out

    before = read_safetensors_header(lora)[1]
    fingerprint = read_dualref_metadata(before).base_fingerprint
    time.sleep(0.01)
    tiny_comfy_models.write_dualref_lora(lora, fingerprint, seed=11)  # retrained: same name, size, metadata
    assert read_safetensors_header(lora)[1] == before
    assert main(argv) == 2
    assert f"loras/{SFT_LORA}" in capsys.readouterr().err
    assert main(argv[:-5] + ["--out", str(tmp_path / "again"), "--timeout", "600", "-q"]) == 0


@pytest.mark.host
def test_ctrl_c_cancels_our_prompt_on_the_server(tmp_path, tiny_host, manifest):
    """Issue 20 item 6: Ctrl-C during a ComfyUI benchmark exits 130 at once and takes the prompt it
    had running off the server (/interrupt with its id), so the server is free again."""
    import os
    import signal
    import subprocess
    import sys

    workflows = tiny_workflows(tmp_path / "workflows")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    argv = ["--generator", "comfyui", "--server", tiny_host.url, "--workflow-dir", str(workflows), "--manifest",
            str(manifest), "--tasks", "animal_scene", "--steps", "10000", "--out", str(tmp_path / "run"), "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "training.bench", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not tiny_host.get_json("/queue")["queue_running"]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # sampling under way
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.monotonic() - signalled < 5.0 and "Traceback" not in err
    assert "rerun the same command to resume" in err
    while True:  # the 10000-step prompt stops at the next step instead of running for hours
        state = tiny_host.get_json("/queue")
        if not state["queue_running"] and not state["queue_pending"]:
            break
        assert time.monotonic() - signalled < 20, state
        time.sleep(0.2)
