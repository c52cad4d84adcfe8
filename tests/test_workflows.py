"""The five task workflows (issue 7, item 1): generated files, validity against the real host's
/object_info, UI/API twins, the template browser's routes, and every API workflow end to end.

The end-to-end runs queue the committed ``comfy_queue/api/<task>.json`` through the real queue client
on a real ``main.py --cpu`` with tiny model files of the real formats under the real file names
(tests/tiny_comfy_models.py; the transformer fp8-scaled like flux1-dev-kontext_fp8_scaled) and an
empty ``models/loras``. What they change, all for size only (``tiny_comfy_models.shrink_for_cpu``):

- ``DualCLIPLoader`` (CLIP-L + T5-XXL; ComfyUI always builds the full 4.7B T5-XXL for type flux)
  becomes ``CLIPLoader`` on a random full-size CLIP-L, same node id and title; the transformer's
  text width is CLIP-L's 768 to match;
- ``megapixels`` 1.0 -> 0 (the 64 px pictures keep their size instead of growing to 1024 px), and a
  custom canvas 64x48;
- ``steps`` 28 -> 4 (a 0.5B transformer step takes ~3 s on two cores).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfy_host import PACK_NAME, REPO
from workflow_checks import BYPASS, SECRET, check_api, check_ui, frontend_widgets, sockets, ui_to_api
from comfy_queue import build
from comfy_queue.fill import fill_workflow, load_workflow, nodes_titled
from comfy_queue.task_graphs import (FRONTEND_ONLY, NODE_TYPES, TASK_SPECS, TASKS, TEMPLATES, THREE_REFERENCE_TASKS,
                                     task_graph, template_title)

try:
    from judge.manifest import MULTI_TASKS
    from judge.manifest import TASKS as MANIFEST_TASKS
except ImportError:  # pragma: no cover - the trainer's packages are part of the dev install
    MANIFEST_TASKS, MULTI_TASKS = TASKS, THREE_REFERENCE_TASKS


def ui(task: str) -> dict:
    return json.loads(build.ui_path(task).read_text())


def api(task: str) -> dict:
    return json.loads(build.api_path(task).read_text())


# -- the files (no host needed) -----------------------------------------------------------------
def test_committed_workflows_are_what_the_builder_writes():
    stale = [str(p.relative_to(REPO)) for p, text in build.built_files().items()
             if not p.is_file() or p.read_text() != text]
    assert not stale, f"out of date (run python -m comfy_queue.build): {stale}"
    assert build.main(["--check"]) == 0


def test_one_ui_workflow_and_one_api_twin_per_task_and_nothing_else():
    assert set(TASKS) == set(MANIFEST_TASKS) and set(THREE_REFERENCE_TASKS) <= set(MULTI_TASKS)
    assert sorted(p.stem for p in build.WORKFLOWS_DIR.glob("*.json")) == sorted(map(template_title, TEMPLATES))
    assert sorted(p.stem for p in build.API_DIR.glob("*.json")) == sorted(TEMPLATES)
    for task in TEMPLATES:
        thumb = build.thumbnail_path(task)
        assert thumb.is_file(), f"no thumbnail {thumb.name} (python -m comfy_queue.build --thumbnails)"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size[0] == im.size[1] >= 128


def test_the_served_template_folder_holds_only_workflows_and_thumbnails():
    """ComfyUI serves example_workflows/ as static files: no code, no package, nothing but templates."""
    served = sorted(p.name for p in build.WORKFLOWS_DIR.iterdir())
    assert served == sorted(f"{template_title(t)}.{ext}" for t in TEMPLATES for ext in ("json", "jpg")), served
    assert build.WORKFLOWS_DIR.name == "example_workflows"
    assert not (REPO / "workflows").exists(), "a second folder ComfyUI would serve as templates"


def test_templates_have_readable_titles():
    """The template browser shows an extension template's file name as its title."""
    titles = [template_title(t) for t in TEMPLATES]
    assert titles == ["Animal into a scene", "Person into a scene", "Group portrait of two people",
                      "Style transfer", "Clothing replacement", "Two people into a scene (three references)"]
    assert all(build.ui_path(t).stem == template_title(t) == build.thumbnail_path(t).stem for t in TEMPLATES)


def test_api_twins_follow_the_queue_convention():
    from comfy_queue.comfy_errors import WorkflowError

    for task in TEMPLATES:
        graph = load_workflow(task)  # what python -m comfy_queue loads for --task
        count = 3 if task in THREE_REFERENCE_TASKS else 2
        titles = [f"image {k}" for k in range(1, count + 1)]
        assert [graph[n]["class_type"] for t in titles for n in nodes_titled(graph, t)] == ["LoadImage"] * count
        assert not nodes_titled(graph, f"image {count + 1}")
        assert [graph[n]["class_type"] for n in nodes_titled(graph, "output")] == ["SaveImage"]
        names = ["a.png", "b.png", "c.png"][:count]
        with pytest.raises(WorkflowError, match=f"takes {count} images"):
            fill_workflow(graph, ["a.png", "b.png", "c.png"][:5 - count], "x")  # 3 for a two-image one, 2 for three
        filled = fill_workflow(graph, names, "put the cat from image 2 into image 1", seed=5)
        assert [filled[n]["inputs"]["image"] for t in titles for n in nodes_titled(filled, t)] == names
        (text_node,) = nodes_titled(filled, "instruction")
        assert filled[text_node]["inputs"]["value"] == "put the cat from image 2 into image 1"
        sampler = next(n for n in filled.values() if n["class_type"] == "KSampler")["inputs"]
        assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) \
            == (5, 28, 1.0, "euler", "simple")


def test_workflows_carry_no_key_and_the_judge_only_a_profile_name():
    for task in TEMPLATES:
        for text in (build.ui_path(task).read_text(), build.api_path(task).read_text()):
            assert not SECRET.search(text), f"{task}: something that looks like a credential"
        judge = next(n for n in ui(task)["nodes"] if n["type"] == "VLMJudge")
        assert not any("://" in str(v) for v in judge["widgets_values"]), judge["widgets_values"]
        assert judge["mode"] == BYPASS  # off until the user has configured a judge profile


def test_layout_is_tidy():
    """No two nodes overlap; every node that is not a note lies inside exactly one group."""
    for task in TEMPLATES:
        graph = task_graph(task)
        boxes = {n.id: (*n.pos, n.pos[0] + n.size[0], n.pos[1] + n.size[1]) for n in graph.nodes}
        title = 30  # LiteGraph draws the title bar above pos
        for a in graph.nodes:
            for b in graph.nodes:
                if a.id < b.id:
                    ax0, ay0, ax1, ay1 = boxes[a.id]
                    bx0, by0, bx1, by1 = boxes[b.id]
                    assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 - title or by1 <= ay0 - title, \
                        f"{task}: nodes {a.id} and {b.id} overlap"
        for node in graph.nodes:
            x0, y0, x1, y1 = boxes[node.id]
            inside = [g for g, (gx, gy, gw, gh), _ in graph.groups
                      if gx <= x0 and gy <= y0 - title and x1 <= gx + gw and y1 <= gy + gh]
            allowed = (0, 1) if node.type in FRONTEND_ONLY else (1,)  # notes may sit outside the groups
            assert len(inside) in allowed, f"{task}: node {node.id} ({node.type}) is in groups {inside}"


# -- against the real host ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info")



@pytest.mark.host
def test_node_type_table_matches_the_host(object_info):
    """comfy_queue/task_graphs.NODE_TYPES (what the builder writes) agrees with every node's /object_info."""
    for type_name, kind in NODE_TYPES.items():
        if type_name in FRONTEND_ONLY:
            continue
        assert type_name in object_info, f"{type_name} is not a node of this host (pack loaded?)"
        spec = object_info[type_name]
        assert [(s.name, s.type, s.optional) for s in kind.sockets] == sockets(spec), type_name
        assert [(w.name, w.type, w.optional) for w in kind.widgets] == \
            [(n, t, o) for n, t, _, o in frontend_widgets(spec)], type_name
        assert [s.name for s in kind.outputs] == spec["output_name"], type_name
        assert [s.type for s in kind.outputs] == spec["output"], type_name
        assert [s.is_list for s in kind.outputs] == spec["output_is_list"], type_name
        assert kind.display == (spec.get("display_name") or type_name), type_name


def _loaders(nodes) -> dict:
    """loader type -> (widget values, properties.models) of a UI workflow's (or subgraph's) nodes."""
    kinds = ("UNETLoader", "DualCLIPLoader", "VAELoader")
    return {n["type"]: (n["widgets_values"], n["properties"].get("models")) for n in nodes if n["type"] in kinds}


@pytest.mark.host
def test_templates_name_the_files_of_comfyuis_own_kontext_template(comfy_host):
    """Users who followed ComfyUI's Kontext tutorial have its files: same names, same download URLs
    in each loader's properties.models (read from the installed comfyui-workflow-templates)."""
    import importlib.resources

    media = pytest.importorskip("comfyui_workflow_templates_media_image",
                                reason="ComfyUI's templates package (a requirement of ComfyUI) is not installed")
    core = json.loads((importlib.resources.files(media) / "templates" / "flux_kontext_dev_basic.json").read_text())
    theirs = _loaders([n for g in core.get("definitions", {}).get("subgraphs", []) for n in g["nodes"]] + core["nodes"])
    assert set(theirs) == {"UNETLoader", "DualCLIPLoader", "VAELoader"}, theirs
    for task in TASKS:
        ours = _loaders(ui(task)["nodes"])
        assert ours == theirs, f"{task}: loaders differ from ComfyUI's own Kontext template"


@pytest.mark.host
@pytest.mark.parametrize("task", TEMPLATES)
def test_every_node_input_widget_and_link_is_valid_on_the_host(object_info, task):
    problems = check_ui(task, ui(task), object_info) + check_api(task, api(task), object_info)
    assert not problems, "\n".join(problems)


@pytest.mark.host
def test_the_checks_catch_broken_workflows(object_info):
    """The validity checks above can fail: a wrong link type, a bad combo value, an unknown input."""
    broken = ui("animal_scene")
    broken["links"][0][5] = "IMAGE"  # the MODEL link now claims IMAGE
    next(n for n in broken["nodes"] if n["type"] == "KSampler")["widgets_values"][4] = "no_such_sampler"
    problems = "\n".join(check_ui("broken", broken, object_info))
    assert "no_such_sampler" in problems and "ends disagree" in problems
    graph = api("animal_scene")
    graph["10"]["inputs"]["megapixel"] = graph["10"]["inputs"].pop("megapixels")
    graph["4"]["inputs"]["model"] = ["3", 0]  # a VAE into a MODEL input
    problems = "\n".join(check_api("broken", graph, object_info))
    assert "no input named megapixel" in problems and "required input megapixels missing" in problems
    assert "model (MODEL) fed by output 0 of node 3" in problems


@pytest.mark.host
@pytest.mark.parametrize("task", TEMPLATES)
def test_ui_workflow_and_api_twin_describe_the_same_graph(object_info, task):
    assert ui_to_api(ui(task), object_info) == api(task)


@pytest.mark.host
def test_template_browser_routes_list_and_serve_the_five_ui_workflows(comfy_server):
    listed = comfy_server.get_json("/api/workflow_templates")
    titles = sorted(map(template_title, TEMPLATES))
    assert sorted(listed.get(PACK_NAME, [])) == titles, listed  # the API twins are not templates
    for task in TEMPLATES:
        stem = urllib.parse.quote(template_title(task))  # as the browser requests it
        assert comfy_server.get_json(f"/api/workflow_templates/{PACK_NAME}/{stem}.json") == ui(task)
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{stem}.jpg") as r:
            assert r.read() == build.thumbnail_path(task).read_bytes()


@pytest.mark.host
@pytest.mark.parametrize("path", ["queue.py", "build.py", "__init__.py", "comfy_queue/queue.py",
                                  "../comfy_queue/queue.py", "../nodes/lora_apply.py"])
def test_no_python_is_served_under_the_template_route(comfy_server, path):
    """The pack's template folder is served as static files: no source of ours may come back."""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{path}", timeout=10).close()
    assert e.value.code in (403, 404), e.value.code


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_host(comfy_host, tmp_path_factory):
    """A host whose models/ holds tiny files under the workflows' own file names, the transformer in
    ComfyUI's fp8-scaled format (as flux1-dev-kontext_fp8_scaled is), and an empty models/loras."""
    import tiny_comfy_models

    with tiny_comfy_models.tiny_kontext_server(tmp_path_factory.mktemp("tiny-host"), lora=False, fp8=True) as server:
        yield server


def pictures(tmp_path, task: str):
    """Two (three for a three-reference task) small RGB pictures with some structure (the output takes
    image 1's 64x48)."""
    rng = np.random.default_rng(sum(map(ord, task)))
    paths = []
    sizes = [(48, 64), (64, 64)] + ([(32, 48)] if task in THREE_REFERENCE_TASKS else [])
    for k, (h, w) in enumerate(sizes, start=1):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) % 256
        base[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)
        paths.append(tmp_path / f"{task}-{k}.png")
        Image.fromarray(base.astype(np.uint8)).save(paths[-1])
    return paths


def show_lora_report(workflow: dict) -> str:
    """Add a Preview as Text on DualLoRAApply's report output, as a user would; returns its node id."""
    (lora,) = [i for i, n in workflow.items() if n["class_type"] == "DualLoRAApply"]
    workflow["99"] = {"inputs": {"source": [lora, 1]}, "class_type": "PreviewAny", "_meta": {"title": "LoRA report"}}
    return "99"


def run_tiny(tiny_host, tmp_path, workflow: dict, task: str, seed: int = 7, images=None):
    """Queue a workflow (shrunk for the CPU) through the real queue client; returns the image's pixels,
    the prompt ComfyUI ran (embedded by SaveImage) and the text outputs of the run by node id."""
    from comfy_queue.queue import queue_job
    from tiny_comfy_models import shrink_for_cpu

    workflow = shrink_for_cpu(workflow)
    assert check_api("tiny", workflow, tiny_host.get_json("/object_info"), files=set()) == []  # files listed now
    tmp_path.mkdir(parents=True, exist_ok=True)
    images = pictures(tmp_path, task) if images is None else images
    paths = queue_job(tiny_host.url, workflow, images, TASK_SPECS[task].instruction, seed=seed,
                      out_dir=tmp_path / "out", timeout=600)
    assert len(paths) == 1 and paths[0].suffix == ".png", paths
    with Image.open(paths[0]) as im:
        assert im.size == (64, 48)
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        queued = json.loads(im.info["prompt"])
    (entry,) = tiny_host.get_json("/history?max_items=1").values()
    texts = {node: out["text"][0] for node, out in entry["outputs"].items() if "text" in out}
    return pixels, queued, texts


@pytest.mark.host
@pytest.mark.parametrize("task", TEMPLATES)
def test_every_api_workflow_runs_as_shipped_with_no_lora_file(tiny_host, tmp_path, task):
    """The zero-shot path: the bundled API workflow, with no LoRA anywhere, makes an image."""
    assert list((tiny_host.base / "models" / "loras").iterdir()) == []
    workflow = load_workflow(task)
    report = show_lora_report(workflow)
    by_title = {n["_meta"]["title"]: i for i, n in workflow.items()}
    pixels, queued, texts = run_tiny(tiny_host, tmp_path, workflow, task)
    assert pixels.std() > 1.0, "the decoded image is flat"
    sampler = next(n for n in queued.values() if n["class_type"] == "KSampler")["inputs"]
    assert sampler["seed"] == 7 and sampler["steps"] == 4
    assert next(n for n in queued.values() if n["_meta"]["title"] == "instruction")["inputs"]["value"] == \
        TASK_SPECS[task].instruction
    by_type = {n["class_type"]: n["inputs"] for n in queued.values()}
    assert by_type["DualLoRAApply"]["sft_lora"] == "None" and by_type["DiagonalPositionPatch"]["method"] == "offset"
    assert by_type["UNETLoader"]["unet_name"] == "flux1-dev-kontext_fp8_scaled.safetensors"
    # 12 canvas + 12 + 16 reference tokens; a third 48x32 px picture adds 6 (issue 19: three references)
    tokens = "46 (3.8x" if task in THREE_REFERENCE_TASKS else "40 (3.3x"
    assert f"image tokens per step: {tokens} a plain Flux image" in texts[by_title["sizes and tokens"]]
    assert "passes through unchanged (zero-shot)" in texts[report]


@pytest.mark.host
def test_a_dualref_lora_on_the_fp8_scaled_kontext(tiny_host, tmp_path):
    """DiagonalPositionPatch and DualLoRAApply on the fp8-scaled transformer, with a LoRA selected."""
    import tiny_comfy_models
    from comfy_queue.task_graphs import SFT_LORA

    lora = tiny_host.base / "models" / "loras" / SFT_LORA
    tiny_comfy_models.write_dualref_lora(lora, tiny_host.fingerprint)
    try:
        workflow = load_workflow("animal_scene")
        report_id = show_lora_report(workflow)
        next(n for n in workflow.values() if n["class_type"] == "DualLoRAApply")["inputs"]["sft_lora"] = SFT_LORA
        next(n for n in workflow.values() if n["class_type"] == "DiagonalPositionPatch")["inputs"]["method"] = \
            "diagonal"
        pixels, _, texts = run_tiny(tiny_host, tmp_path, workflow, "animal_scene")
    finally:
        lora.unlink()
    assert pixels.std() > 1.0, "the decoded image is flat"
    report = texts[report_id]
    assert f"sft: {SFT_LORA} at strength 1, 4 modules" in report, report
    # The fingerprint hashes embedders and norms, which fp8-scaled files keep in bf16: checked and matched.
    assert "warning" not in report, report
    log = tiny_host.log_text()
    assert "lora key not loaded" not in log, log[-3000:]  # every LoRA module landed on the transformer


@pytest.mark.host
def test_workflows_saved_before_three_references_still_run(tiny_host, tmp_path):
    """The API twins as committed before issue 19 (no strength_3, no image_3: both optional inputs) still
    validate and run, and give the same image as today's twin with strength_3 at 1."""
    workflow = load_workflow("animal_scene")
    old = json.loads(json.dumps(workflow))
    patch = next(n for n in old.values() if n["class_type"] == "DiagonalPositionPatch")
    assert patch["inputs"].pop("strength_3") == 1.0
    assert not any("image_3" in n["inputs"] for n in old.values())
    before, queued, _ = run_tiny(tiny_host, tmp_path / "old", old, "animal_scene")
    assert "strength_3" not in next(n for n in queued.values() if n["class_type"] == "DiagonalPositionPatch")["inputs"]
    now, _, _ = run_tiny(tiny_host, tmp_path / "new", workflow, "animal_scene")
    assert np.array_equal(before, now)


@pytest.mark.host
def test_three_reference_workflow_reads_image_3(tiny_host, tmp_path):
    """The three-reference template: image 3 changes the output, and strength_3 = 0 gives exactly the
    two-reference run of the same graph (reference 3 unplugged), in the real host."""
    task = THREE_REFERENCE_TASKS[0]
    workflow = load_workflow(task)
    for node in workflow.values():  # the diagonal layout: the one DualRef trains, three references on it
        if node["class_type"] == "DiagonalPositionPatch":
            node["inputs"]["method"] = "diagonal"
    three, _, _ = run_tiny(tiny_host, tmp_path / "three", json.loads(json.dumps(workflow)), task)  # shrinks a copy
    unplugged = json.loads(json.dumps(workflow))
    next(n for n in unplugged.values() if n["class_type"] == "DiagonalPositionPatch")["inputs"]["strength_3"] = 0.0
    off, _, _ = run_tiny(tiny_host, tmp_path / "off", unplugged, task)
    two = json.loads(json.dumps(workflow))
    (loader,) = [n for n in two.values() if n["class_type"] == "DualReferenceLoader"]
    del loader["inputs"]["image_3"]
    for node_id in nodes_titled(two, "image 3"):
        del two[node_id]
    first_two = pictures(tmp_path, task)[:2]
    two_pixels, _, _ = run_tiny(tiny_host, tmp_path / "two", two, task, images=first_two)
    assert np.array_equal(off, two_pixels)
    assert not np.array_equal(three, two_pixels)
