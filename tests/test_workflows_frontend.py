"""The UI workflows (five dual-reference tasks, one three-reference) in the real ComfyUI frontend, in
headless Chromium.

The host (tiny models under the templates' file names, no LoRA) serves its installed frontend
(comfyui-frontend-package); Chromium is driven over the Chrome DevTools Protocol with
websocket-client (no browser download, no Playwright). Each workflow is loaded with the frontend's
own ``app.loadGraphData``; the test asserts that every node type is registered, that no missing-node
dialog opens (a planted unknown node shows that the check can fail) and no node is drawn red, that
the frontend's own API export (``app.graphToPrompt``) equals the committed API twin, that no node is
drawn smaller than the frontend's minimum size, and that the template browser shows the five
templates under the pack. One template is then run end to end the way a user does it: pictures
uploaded, picked in the Load Image nodes, queued with the frontend's own ``app.queuePrompt``, and the
edit appears in the Save Image node. Screenshots land in the pytest tmp dir and in
``$DUALREF_ARTIFACTS`` when set. Needs Debian's ``chromium`` (``apt-get update && apt-get install -y
chromium``) or ``$DUALREF_CHROMIUM``; skips, saying so, without it.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_host import PACK_NAME
from comfy_queue import build
from comfy_queue.task_graphs import TEMPLATES, THREE_REFERENCE_TASKS, template_title

websocket = pytest.importorskip("websocket", reason="websocket-client is needed to drive Chromium")

# $DUALREF_CHROMIUM picks another Chromium/Chrome binary (or, pointing nowhere, skips this module).
_CANDIDATES = ([os.environ["DUALREF_CHROMIUM"]] if os.environ.get("DUALREF_CHROMIUM")
               else [shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"])
CHROMIUM = next((p for p in _CANDIDATES if p and Path(p).is_file()), None)
VIEWPORT = (1920, 1080)  # a common desktop screen: the workflows open framed for it
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "about:blank")

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install -y chromium) for the frontend check"),
]


class DevTools:
    """The few Chrome DevTools Protocol calls this test needs, on one page target."""

    def __init__(self, ws_url: str, timeout: float = 120):
        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; only our answer matters
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str):
        """Evaluate in the page, awaiting a promise; returns the JSON value or raises with the JS error."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self):
        self.ws.close()


@contextlib.contextmanager
def chromium(profile: Path):
    env = {**os.environ, "TMPDIR": str(profile)}  # its scratch dirs go with the profile
    proc = subprocess.Popen([CHROMIUM, f"--user-data-dir={profile}", *FLAGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    page = None
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.loads(r.read()) if t["type"] == "page")
        page = DevTools(target["webSocketDebuggerUrl"])
        width, height = VIEWPORT
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        yield page
    finally:
        if page is not None:
            page.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _post_setting(server, key: str, value) -> None:
    req = urllib.request.Request(f"{server.url}/api/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).close()


@pytest.fixture(scope="module")
def tiny_server(comfy_host, tmp_path_factory):
    """The host with tiny models under the templates' file names (fp8-scaled transformer, no LoRA),
    so a template queued in the browser really runs."""
    import tiny_comfy_models

    with tiny_comfy_models.tiny_kontext_server(tmp_path_factory.mktemp("tiny-host"), lora=False, fp8=True) as server:
        yield server


@pytest.fixture(scope="module")
def frontend(tiny_server, tmp_path_factory):
    """The frontend of the test host, loaded in Chromium and ready (our nodes registered)."""
    comfy_server = tiny_server
    _post_setting(comfy_server, "Comfy.TutorialCompleted", True)  # no first-run template dialog over the graph
    # The tiny host has no T5-XXL file; that dialog is not what this checks (missing nodes are).
    _post_setting(comfy_server, "Comfy.Workflow.ShowMissingModelsWarning", False)
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as page:
        page.call("Page.navigate", url=comfy_server.url)
        deadline = time.time() + 180
        ready = "!!(window.app && app.graph && window.LiteGraph && LiteGraph.registered_node_types.DualReferenceLoader)"
        while True:
            with contextlib.suppress(RuntimeError):
                if page.js(ready):
                    break
            if time.time() > deadline:
                raise AssertionError("the ComfyUI frontend did not come up with the DualRef nodes in 180 s; host log:\n"
                                     + comfy_server.log_text()[-3000:])
            time.sleep(0.5)
        yield page


@pytest.fixture
def artifacts(tmp_path):
    """Where screenshots go: the test's tmp dir, copied to $DUALREF_ARTIFACTS when set."""
    out = os.environ.get("DUALREF_ARTIFACTS")

    def keep(path: Path) -> Path:
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(out) / path.name)
        return path

    return tmp_path, keep


LOAD_JS = """
(async (workflow, name) => {
  document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());  // a previous load's dialogs
  await new Promise(r => setTimeout(r, 300));
  await app.loadGraphData(workflow, true, true, name, {showMissingModelsDialog: false});
  await new Promise(r => setTimeout(r, 800));  // dialogs and the first frames
  const registered = LiteGraph.registered_node_types;
  return {
    missing: workflow.nodes.map(n => n.type).filter(t => !(t in registered)),
    dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText),
    nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, size: [...n.size], min: [...n.computeSize()]})),
    flagged: app.graph.nodes.filter(n => n.has_errors).map(n => n.id),
    images: app.graph.nodes.filter(n => n.type === 'LoadImage').map(n => {
      const w = n.widgets.find(w => w.name === 'image');
      const values = typeof w.options.values === 'function' ? w.options.values() : w.options.values;
      return [w.value, values.includes(w.value)];
    }),
    prompt: (await app.graphToPrompt()).output,
  };
})
"""


def load(page: DevTools, workflow: dict, name: str) -> dict:
    return page.js(f"{LOAD_JS}({json.dumps(workflow)}, {json.dumps(name)})")


def ui_workflow(task: str) -> dict:
    return json.loads(build.ui_path(task).read_text())


@pytest.mark.parametrize("task", TEMPLATES)
def test_workflow_loads_with_every_node_and_exports_its_api_twin(frontend, artifacts, task):
    workflow = ui_workflow(task)
    report = load(frontend, workflow, task)
    assert report["missing"] == [], f"{task}: node types the frontend does not know: {report['missing']}"
    assert report["dialogs"] == [], f"{task}: the frontend opened a dialog on load: {report['dialogs']}"
    assert sorted(n["id"] for n in report["nodes"]) == sorted(n["id"] for n in workflow["nodes"])
    assert report["flagged"] == [], f"{task}: nodes drawn red on load: {report['flagged']}"
    # A fresh install has the picture the Load Image nodes name: nothing shows as missing.
    pictures = 3 if task in THREE_REFERENCE_TASKS else 2
    assert report["images"] == [["example.png", True]] * pictures, f"{task}: Load Image values: {report['images']}"
    cramped = [(n["type"], n["size"], [round(v) for v in n["min"]]) for n in report["nodes"]
               if n["size"][0] + 0.5 < n["min"][0] or n["size"][1] + 0.5 < n["min"][1]]
    assert not cramped, f"{task}: nodes drawn smaller than the frontend's minimum (type, size, min): {cramped}"
    twin = json.loads(build.api_path(task).read_text())
    assert report["prompt"] == twin, f"{task}: the frontend's own API export differs from comfy_queue/api/{task}.json"
    tmp, keep = artifacts
    time.sleep(0.5)
    keep(frontend.screenshot(tmp / f"frontend-{task}.png"))


def as_saved_before_three_references(workflow: dict) -> dict:
    """A UI workflow as the builder wrote it before issue 19: no image_3 sockets, no strength_3 widget
    (link target slots renumbered by input name, as that file had them)."""
    old = json.loads(json.dumps(workflow))
    for node in old["nodes"]:
        names = [i["name"] for i in node["inputs"]]
        if node["type"] == "DiagonalPositionPatch":
            node["widgets_values"] = node["widgets_values"][:names.index("strength_3") - names.index("method")]
        node["inputs"] = [i for i in node["inputs"] if i["name"] not in ("image_3", "strength_3")]
    slots = {i["link"]: k for node in old["nodes"] for k, i in enumerate(node["inputs"]) if i.get("link") is not None}
    for link in old["links"]:
        link[4] = slots[link[0]]
    return old


def test_a_workflow_saved_before_three_references_loads_and_exports_the_same_prompt(frontend):
    """Issue 19: image_3 and strength_3 are optional, so a template saved without them loads with no
    error and queues exactly today's API twin (strength_3 at its default 1)."""
    old = as_saved_before_three_references(ui_workflow("group_portrait"))
    patch = next(n for n in old["nodes"] if n["type"] == "DiagonalPositionPatch")
    assert patch["widgets_values"] == ["offset", 1.0, 1.0]
    report = load(frontend, old, "old group portrait")
    assert report["missing"] == [] and report["dialogs"] == [] and report["flagged"] == []
    assert report["prompt"] == json.loads(build.api_path("group_portrait").read_text())


def test_an_unknown_node_is_reported(frontend):
    """The check above can fail: a workflow with a node type nobody registered opens the missing-node dialog."""
    workflow = ui_workflow("animal_scene")
    workflow["nodes"][4]["type"] = "DualRefNoSuchNode"
    report = load(frontend, workflow, "planted-unknown-node")
    assert report["missing"] == ["DualRefNoSuchNode"]
    assert any("DualRefNoSuchNode" in text for text in report["dialogs"]), report["dialogs"]
    frontend.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")


BROWSER_JS = """
(async (pack, tasks) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const dialogText = () => [...document.querySelectorAll('.p-dialog')].map(d => d.innerText).join('\\n');
  await app.extensionManager.command.execute('Comfy.BrowseTemplates');
  let category = null;
  for (let i = 0; i < 60 && !category; i++) {
    await sleep(500);
    category = [...document.querySelectorAll('.p-dialog *')]
      .find(e => e.children.length === 0 && e.textContent.trim() === pack);
  }
  if (!category) return {error: 'no category ' + pack, text: dialogText().slice(0, 2000)};
  category.click();
  const cardOf = task => {  // the thumbnail whose card is titled with the template's name
    for (const img of document.querySelectorAll('.p-dialog img')) {
      for (let e = img.parentElement; e && !e.classList.contains('p-dialog'); e = e.parentElement) {
        const text = e.innerText || '';
        if (tasks.some(t => t !== task && text.includes(t))) break;  // climbed past the card
        if (text.includes(task)) return img;
      }
    }
    return null;
  };
  let thumbnails = {};
  for (let i = 0; i < 60; i++) {
    await sleep(500);
    thumbnails = Object.fromEntries(tasks.map(t => [t, cardOf(t)?.naturalWidth ?? null]));
    if (Object.values(thumbnails).every(w => w > 0)) break;
  }
  window.__dualrefCardOf = cardOf;
  return {text: dialogText(), thumbnails};
})
"""


def test_template_browser_shows_the_five_workflows_and_opens_one(frontend, artifacts):
    """The user's path: open the template browser, pick the pack's category, see five cards with
    thumbnails, click one, and get its graph."""
    titles = [template_title(task) for task in TEMPLATES]  # the file names, which the browser shows as titles
    result = frontend.js(f"{BROWSER_JS}({json.dumps(PACK_NAME)}, {json.dumps(titles)})")
    assert "error" not in result, result
    for title in titles:
        assert title in result["text"], f"template {title!r} is not shown:\n{result['text'][:2000]}"
    assert result["thumbnails"] == {title: 228 for title in titles}, f"thumbnails (pixel widths): {result['thumbnails']}"
    tmp, keep = artifacts
    keep(frontend.screenshot(tmp / "frontend-template-browser.png"))
    opened = frontend.js("""(async () => {
      window.__dualrefCardOf('Style transfer').click();
      for (let i = 0; i < 60 && document.querySelector('.p-dialog'); i++) await new Promise(r => setTimeout(r, 500));
      const dialog = document.querySelector('.p-dialog');
      return {open: dialog ? dialog.innerText.slice(0, 500) : null, types: app.graph.nodes.map(n => n.type),
              instruction: app.graph.nodes.find(n => n.title === 'instruction')?.widgets?.[0]?.value};
    })()""")
    expected = ui_workflow("style_transfer")
    assert opened["open"] is None, f"a dialog stayed open after clicking a template: {opened['open']}"
    assert sorted(opened["types"]) == sorted(n["type"] for n in expected["nodes"])
    assert opened["instruction"].startswith("Repaint the photo in image 1")


QUEUE_JS = """
(async (images, instruction) => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  const byTitle = t => app.graph.nodes.find(n => n.title === t);
  const widget = (node, name) => node.widgets.find(w => w.name === name);
  // For size only (as tests/tiny_comfy_models.shrink_for_cpu): CLIP-L alone instead of CLIP-L + T5-XXL,
  // pictures at their own size, 4 steps.
  const dual = app.graph.nodes.find(n => n.type === 'DualCLIPLoader');
  const encoder = app.graph.nodes.find(n => n.type === 'CLIPTextEncode');
  const clip = LiteGraph.createNode('CLIPLoader');
  clip.pos = [...dual.pos];
  app.graph.add(clip);
  widget(clip, 'clip_name').value = 'clip_l.safetensors';
  widget(clip, 'type').value = 'stable_diffusion';
  clip.connect(0, encoder, encoder.inputs.findIndex(i => i.name === 'clip'));
  app.graph.remove(dual);
  widget(app.graph.nodes.find(n => n.type === 'DualReferenceLoader'), 'megapixels').value = 0;
  const sampler = app.graph.nodes.find(n => n.type === 'KSampler');
  widget(sampler, 'steps').value = 4;
  // What a user does: pick the two uploaded pictures and write the instruction.
  widget(byTitle('image 1'), 'image').value = images[0];
  widget(byTitle('image 2'), 'image').value = images[1];
  widget(byTitle('instruction'), 'value').value = instruction;
  await app.queuePrompt(0, 1);
  const output = byTitle('output');
  const shown = () => (output.imgs || []).filter(img => img.complete && img.naturalWidth > 0);
  for (let i = 0; i < 1200 && shown().length === 0; i++) {
    if (app.graph.nodes.some(n => n.has_errors)) break;
    await sleep(500);
  }
  const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 1500));
  return {shown: shown().map(img => [img.naturalWidth, img.naturalHeight, img.src]),
          flagged: app.graph.nodes.filter(n => n.has_errors).map(n => n.title || n.type), dialogs};
})
"""


def _upload(server, path: Path) -> str:
    """POST /upload/image, what the Load Image node's upload button sends; returns the stored name."""
    boundary = "dualref-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{server.url}/upload/image", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["name"]


def test_a_template_queued_in_the_browser_shows_its_image(frontend, tiny_server, artifacts, tmp_path):
    """The artist's path end to end: open the template, upload two pictures, queue, and the edit
    appears in the Save Image node (no LoRA: the template as shipped, shrunk for the CPU only)."""
    import numpy as np
    from PIL import Image

    names = []
    for k, (h, w) in enumerate([(48, 64), (64, 64)], start=1):
        y, x = np.mgrid[0:h, 0:w]
        picture = tmp_path / f"browser-{k}.png"
        Image.fromarray((np.stack([x * 4, y * 5 + 40 * k, (x + y) * 2], -1) % 256).astype(np.uint8)).save(picture)
        names.append(_upload(tiny_server, picture))
    task = "animal_scene"
    report = load(frontend, ui_workflow(task), task)
    assert report["missing"] == [] and report["dialogs"] == [], report
    before = set(tiny_server.get_json("/history"))
    result = frontend.js(f"{QUEUE_JS}({json.dumps(names)}, {json.dumps('Put the square of image 2 into image 1')})")
    tmp, keep = artifacts
    keep(frontend.screenshot(tmp / "frontend-queued.png"))
    assert result["flagged"] == [] and result["dialogs"] == [], f"{result}\nhost log:\n{tiny_server.log_text()[-3000:]}"
    assert len(result["shown"]) == 1, f"no image appeared in the output node: {result}"
    width, height, src = result["shown"][0]
    assert (width, height) == (64, 48) and "type=output" in src  # image 1's size: canvas "reference 1"
    (prompt_id,) = set(tiny_server.get_json("/history")) - before
    ran = tiny_server.get_json(f"/history/{prompt_id}")[prompt_id]
    assert ran["status"]["status_str"] == "success"
    graph = ran["prompt"][2]
    assert {n["class_type"] for n in graph.values()} >= {"DualReferenceLoader", "DiagonalPositionPatch",
                                                         "DualLoRAApply", "KSampler", "SaveImage"}
