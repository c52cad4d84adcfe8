"""Build the task workflows from ``comfy_queue/task_graphs.py``: UI format, API format, thumbnails.

    python -m comfy_queue.build                # write example_workflows/<title>.json and comfy_queue/api/<task>.json
                                               # (every task of task_graphs.TEMPLATES)
    python -m comfy_queue.build --thumbnails   # also example_workflows/<title>.jpg (template browser pictures)
    python -m comfy_queue.build --check        # exit 1, naming the files, when the committed JSON differs

The UI format is what the ComfyUI frontend saves (schema version 0.4: nodes with id/type/pos/size/
widgets_values/inputs/outputs, a links array, groups, extra.ds); ComfyUI lists ``example_workflows/*.json``
of a custom-node pack in its template browser. The API format is what the frontend's
"Export (API)" writes: ``{id: {"inputs", "class_type", "_meta": {"title"}}}`` with links as
``[origin id, output index]``; frontend-only notes and bypassed nodes are left out, as the frontend
leaves them out of a queued prompt.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

from .task_graphs import (BYPASS, FRONTEND_EXPORTS, FRONTEND_ONLY, FRONTEND_WIDGETS, MODEL_FILES, MODEL_URLS, NODE_TYPES, PACK_NODES,
                          PACK_REGISTRY_ID, TEMPLATES, UPLOAD_LABEL, Graph, Slot, task_graph, template_title)

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
WORKFLOWS_DIR = REPO_DIR / "example_workflows"  # what ComfyUI serves: UI templates and thumbnails only
API_DIR = PACKAGE_DIR / "api"  # the queue client's inputs, installed with this package
SCHEMA_VERSION = 0.4


def ui_path(task: str) -> Path:
    return WORKFLOWS_DIR / f"{template_title(task)}.json"  # the file name is the template browser's title


def api_path(task: str) -> Path:
    return API_DIR / f"{task}.json"


def thumbnail_path(task: str) -> Path:
    return WORKFLOWS_DIR / f"{template_title(task)}.jpg"  # the frontend asks for <template>.jpg next to the .json


def _numbered_links(graph: Graph) -> list[tuple[int, int, int, int, str, str]]:
    """``(link id, origin, origin slot, target, target input name, type)``, ids from 1 in listed order."""
    by_id = {n.id: n for n in graph.nodes}
    return [(link_id, origin, slot, target, name, NODE_TYPES[by_id[origin].type].outputs[slot].type)
            for link_id, (origin, slot, target, name) in enumerate(graph.links, start=1)]


def _execution_order(graph: Graph) -> dict[int, int]:
    """Topological order (ties by id), as the frontend stores it in ``order``."""
    deps = {n.id: {o for o, _, t, _ in graph.links if t == n.id} for n in graph.nodes}
    order, done = {}, set()
    while len(done) < len(deps):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise ValueError(f"{graph.name}: the graph has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def _properties(node) -> dict:
    props = {"Node name for S&R": node.type}
    if node.type in PACK_NODES:
        props["cnr_id"] = PACK_REGISTRY_ID
    elif node.type not in FRONTEND_ONLY:
        props["cnr_id"] = "comfy-core"
    models = [{"name": f, "url": MODEL_URLS[f], "directory": MODEL_FILES[f]} for f in node.models if f in MODEL_URLS]
    if models:
        props["models"] = models
    return props


def _check_widgets(graph: Graph, node) -> None:
    expected = [w.name for w in NODE_TYPES[node.type].widgets]
    if list(node.widgets) != expected:
        raise ValueError(f"{graph.name}: node {node.id} ({node.type}) widgets {list(node.widgets)} "
                         f"must be, in order, {expected}")


def _input(slot: Slot, link: int | None, widget: bool) -> dict:
    """One entry of a node's ``inputs`` as the frontend saves it: sockets, then widget inputs."""
    entry = {"localized_name": UPLOAD_LABEL if slot.type == "IMAGEUPLOAD" else slot.name, "name": slot.name}
    if slot.optional:
        entry["shape"] = 7  # LiteGraph's hollow socket for optional inputs
    entry["type"] = slot.type
    if widget:
        entry["widget"] = {"name": slot.name}
    entry["link"] = link
    return entry


def _output(slot: Slot, index: int, links: list[int]) -> dict:
    entry = {"localized_name": slot.name, "name": slot.name}
    if slot.is_list:
        entry["shape"] = 6  # LiteGraph's grid socket for list outputs
    entry["type"] = slot.type
    if links:
        entry["slot_index"] = index
    entry["links"] = links or None
    return entry


def to_ui(graph: Graph) -> dict:
    """The graph as the ComfyUI frontend (1.3x) saves it."""
    links = _numbered_links(graph)
    order = _execution_order(graph)
    nodes = []
    for node in graph.nodes:
        _check_widgets(graph, node)
        kind = NODE_TYPES[node.type]
        incoming = {name: lid for lid, _, _, t, name, _ in links if t == node.id}
        unknown = set(incoming) - {s.name for s in kind.sockets + kind.widgets if s.type}
        if unknown:
            raise ValueError(f"{graph.name}: node {node.id} ({node.type}) has no input {sorted(unknown)}")
        inputs = [_input(s, incoming.get(s.name), False) for s in kind.sockets]
        inputs += [_input(s, incoming.get(s.name), True) for s in kind.widgets
                   if s.type and node.type not in FRONTEND_ONLY]
        outputs = [_output(s, i, [lid for lid, o, slot, *_ in links if o == node.id and slot == i])
                   for i, s in enumerate(kind.outputs)]
        entry = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
                 "order": order[node.id], "mode": node.mode, "inputs": inputs, "outputs": outputs}
        if node.title is not None:
            entry["title"] = node.title
        entry["properties"] = _properties(node)
        entry["widgets_values"] = list(node.widgets.values())
        if node.color:
            entry["color"], entry["bgcolor"] = node.color
        nodes.append(entry)
    scale, dx, dy = graph.view
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"dualref/workflows/{graph.name}")),
        "revision": 0,
        "last_node_id": max(n.id for n in graph.nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": [[lid, o, s, t, _target_slot(nodes, t, name), typ] for lid, o, s, t, name, typ in links],
        "groups": [{"id": i, "title": title, "bounding": list(box), "color": color, "font_size": 24, "flags": {}}
                   for i, (title, box, color) in enumerate(graph.groups, start=1)],
        "config": {},
        "extra": {"ds": {"scale": scale, "offset": [dx, dy]}},
        "version": SCHEMA_VERSION,
    }


def _target_slot(ui_nodes: list[dict], target: int, name: str) -> int:
    node = next(n for n in ui_nodes if n["id"] == target)
    return [i["name"] for i in node["inputs"]].index(name)


def to_api(graph: Graph) -> dict:
    """The graph as "Export (API)" writes it: what ``POST /prompt`` and ``comfy_queue`` take."""
    active = {n.id: n for n in graph.nodes if n.type not in FRONTEND_ONLY and n.mode != BYPASS}
    out = {}
    for node in sorted(active.values(), key=lambda n: n.id):
        _check_widgets(graph, node)
        incoming = {name: [str(o), s] for o, s, t, name in graph.links if t == node.id}
        skipped = [o for o, _, t, _ in graph.links if t == node.id and o not in active]
        if skipped:
            raise ValueError(f"{graph.name}: active node {node.id} is fed by bypassed or note nodes {skipped}")
        inputs = {k: v for k, v in node.widgets.items() if k not in FRONTEND_WIDGETS and k not in incoming}
        inputs.update(FRONTEND_EXPORTS.get(node.type, {}))
        inputs.update(incoming)
        out[str(node.id)] = {"inputs": inputs, "class_type": node.type,
                             "_meta": {"title": node.title or NODE_TYPES[node.type].display}}
    return out


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def built_files() -> dict[Path, str]:
    """Every JSON file this module writes, with its text."""
    files = {}
    for task in TEMPLATES:
        graph = task_graph(task)
        files[ui_path(task)] = dumps(to_ui(graph))
        files[api_path(task)] = dumps(to_api(graph))
    return files


def write_thumbnails(tile: int = 96, pad: int = 12) -> list[Path]:
    """``<task>.jpg``, square (template cards are): a toy-world example, image 1 and image 2 (and
    image 3) above, the result below them."""
    import numpy as np
    from PIL import Image

    # the builder draws thumbnails with the toy world (headless only; ComfyUI never imports this)
    from training.toy.world import make_sample

    side = 2 * tile + 3 * pad
    paths = []
    for task in TEMPLATES:
        sample = make_sample(task, seed=0, index=0, split="test", size=64)
        n = len(sample.refs)
        small = (side - (n + 1) * pad) // n  # two references: tile; three share the same width
        refs = [np.asarray(Image.fromarray(a).resize((small, small), Image.NEAREST)) for a in sample.refs]
        target = np.asarray(Image.fromarray(sample.target).resize((tile, tile), Image.NEAREST))
        canvas = np.full((side, side, 3), 255, np.uint8)
        top = pad + tile - small  # bottom-aligned above the result
        for k, ref in enumerate(refs):
            canvas[top:top + small, pad + k * (small + pad):pad + k * (small + pad) + small] = ref
        left = (side - tile) // 2
        canvas[2 * pad + tile:side - pad, left:left + tile] = target
        for x0 in (pad + k * (small + pad) + small // 2 for k in range(n)):  # grey wedges from each input to the result
            for y in range(pad // 2):
                canvas[tile + pad + 2 + y, x0 - (pad // 2 - y):x0 + (pad // 2 - y) + 1] = 120
        path = thumbnail_path(task)
        Image.fromarray(canvas).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_queue.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--thumbnails", action="store_true", help="also write <task>.jpg from the toy world")
    args = parser.parse_args(argv)
    files = built_files()
    if args.check:
        stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
        for p in stale:
            print(f"out of date: {p.relative_to(REPO_DIR)}", file=sys.stderr)
        if stale:
            print("run: python -m comfy_queue.build", file=sys.stderr)
        return 1 if stale else 0
    API_DIR.mkdir(exist_ok=True)
    stale = [p for p in WORKFLOWS_DIR.glob("*.json") if p not in files]  # a renamed template's old file
    for path in stale + [p.with_suffix(".jpg") for p in stale]:
        path.unlink(missing_ok=True)
    for path, text in files.items():
        path.write_text(text)
        print(path.relative_to(REPO_DIR))
    if args.thumbnails:
        for path in write_thumbnails():
            print(path.relative_to(REPO_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
