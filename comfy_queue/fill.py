"""Filling an API-format workflow with one job's images, instruction and seed.

The convention (the task workflows in ``comfy_queue/api/`` follow it). A node is found by its title,
``_meta.title`` in ComfyUI's "Export (API)" format, compared case-insensitively with surrounding
whitespace ignored:

============  ==========================================  ==========================================
title         node                                        input that is set
============  ==========================================  ==========================================
``image 1``   ``LoadImage`` (any node with an ``image``)  ``image`` <- the uploaded file of image 1
``image 2``   ``LoadImage``                               ``image`` <- the uploaded file of image 2
``image 3``   ``LoadImage`` (three-reference workflows)   ``image`` <- the uploaded file of image 3
``instruction`` a text node (``PrimitiveString``,          the first of ``text``, ``value``,
              ``CLIPTextEncode``, ...)                    ``prompt``, ``string`` that it has
``seed``      ``PrimitiveInt``, a sampler, ``RandomNoise`` the first of ``seed``, ``noise_seed``,
                                                          ``value`` that it has
============  ==========================================  ==========================================

``image 1``, ``image 2`` and ``instruction`` are required, and ``image 3`` when the job has three
images (a workflow with an ``image 3`` node takes three; several nodes may share a title; each is
filled). ``seed`` is optional: with a seed and no node titled ``seed``, every literal ``seed`` /
``noise_seed`` input in the graph is set instead. The input that is set must hold a literal value;
an input wired to another node is an error that names the node (put the title on the node that
holds the value). Outputs: when nodes are titled ``output``, only their images are downloaded,
otherwise every image the prompt saved (``type: output``).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from .comfy_errors import MissingNodes, WorkflowError

API_DIR = Path(__file__).resolve().parent / "api"
PACK_DIR = Path(__file__).resolve().parents[1]

IMAGE_TITLES = ("image 1", "image 2", "image 3")  # a job fills the first two, or all three
INSTRUCTION_TITLE = "instruction"
SEED_TITLE = "seed"
OUTPUT_TITLE = "output"
IMAGE_INPUTS = ("image",)
TEXT_INPUTS = ("text", "value", "prompt", "string")
SEED_INPUTS = ("seed", "noise_seed", "value")
GLOBAL_SEED_INPUTS = ("seed", "noise_seed")


def _norm(title) -> str:
    return " ".join(str(title).split()).lower()


def node_title(node: dict) -> str:
    return _norm((node.get("_meta") or {}).get("title", ""))


def nodes_titled(workflow: dict, title: str) -> list[str]:
    """Node ids whose ``_meta.title`` is ``title``, in numeric-then-text id order."""
    want = _norm(title)
    ids = [nid for nid, node in workflow.items() if isinstance(node, dict) and node_title(node) == want]
    return sorted(ids, key=lambda i: (0, int(i)) if str(i).isdigit() else (1, str(i)))


def task_workflow_path(task: str) -> Path:
    return API_DIR / f"{task}.json"


def load_workflow(task: str | None = None, path=None) -> dict:
    """The API-format graph of ``path``, else of ``comfy_queue/api/<task>.json``."""
    if path is None:
        if task is None:
            raise WorkflowError("give a task or a workflow path")
        path = task_workflow_path(task)
        if not path.is_file():
            have = sorted(p.stem for p in API_DIR.glob("*.json")) if API_DIR.is_dir() else []
            raise WorkflowError(
                f"no API workflow for task {task!r} at {path}; "
                f"tasks with one: {', '.join(have) or 'none yet'} (or pass --workflow PATH)"
            )
    path = Path(path)
    try:
        graph = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkflowError(f"workflow file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise WorkflowError(
            f"{path} is a UI-format workflow; queueing needs the API format "
            "(in ComfyUI: Workflow > Export (API)), e.g. the twin in comfy_queue/api/"
        )
    if isinstance(graph, dict) and isinstance(graph.get("prompt"), dict):
        graph = graph["prompt"]  # a saved /prompt payload
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (an object of nodes with 'class_type')")
    return graph


def _set_literal(workflow: dict, node_id: str, candidates, value, title: str) -> str:
    node = workflow[node_id]
    inputs = node.setdefault("inputs", {})
    for name in candidates:
        if name in inputs:
            if isinstance(inputs[name], list):
                raise WorkflowError(
                    f"node {node_id} ({node['class_type']}) titled {title!r} has its {name!r} input wired "
                    "to another node; put the title on the node that holds the value"
                )
            inputs[name] = value
            return name
    raise WorkflowError(
        f"node {node_id} ({node['class_type']}) is titled {title!r} but has none of the inputs "
        f"{', '.join(candidates)}; title the node that holds the value"
    )


def fill_workflow(workflow: dict, image_names, instruction: str, seed: int | None = None) -> dict:
    """A copy of ``workflow`` with the uploaded image names, the instruction and the seed set."""
    graph = copy.deepcopy(workflow)
    wants = 3 if nodes_titled(graph, IMAGE_TITLES[2]) else 2
    if len(image_names) != wants:
        raise WorkflowError(
            f"this workflow takes {wants} images (nodes titled " + ", ".join(repr(t) for t in IMAGE_TITLES[:wants])
            + f"), got {len(image_names)}; give one image per reference or use a "
            + ("two" if wants == 3 else "three") + "-reference workflow")
    titles = IMAGE_TITLES[:wants]
    missing = [t for t in (*titles, INSTRUCTION_TITLE) if not nodes_titled(graph, t)]
    if missing:
        raise WorkflowError(
            "the workflow has no node titled " + ", ".join(repr(t) for t in missing)
            + " (titles are _meta.title in the API format; see comfy_queue/fill.py for the convention)"
        )
    for title, name in zip(titles, image_names):
        for nid in nodes_titled(graph, title):
            _set_literal(graph, nid, IMAGE_INPUTS, name, title)
    for nid in nodes_titled(graph, INSTRUCTION_TITLE):
        _set_literal(graph, nid, TEXT_INPUTS, instruction, INSTRUCTION_TITLE)
    if seed is not None:
        seed_nodes = nodes_titled(graph, SEED_TITLE)
        for nid in seed_nodes:
            _set_literal(graph, nid, SEED_INPUTS, int(seed), SEED_TITLE)
        if not seed_nodes:
            for node in graph.values():
                for name in GLOBAL_SEED_INPUTS:
                    if name in node.get("inputs", {}) and not isinstance(node["inputs"][name], list):
                        node["inputs"][name] = int(seed)
    return graph


def output_node_ids(workflow: dict) -> set[str] | None:
    """Ids of the nodes titled ``output``; None means: download every saved image."""
    ids = nodes_titled(workflow, OUTPUT_TITLE)
    return set(ids) or None


def pack_node_ids(nodes_dir=None) -> set[str]:
    """Node ids this pack defines, read from its sources (ComfyUI need not be importable here)."""
    nodes_dir = Path(nodes_dir or PACK_DIR / "nodes")
    pattern = re.compile(r"node_id\s*=\s*[\"']([A-Za-z0-9_]+)[\"']")
    ids: set[str] = set()
    for src in sorted(nodes_dir.glob("*.py")) if nodes_dir.is_dir() else []:
        ids.update(pattern.findall(src.read_text(errors="replace")))
    return ids


def check_node_types(workflow: dict, object_info: dict, server: str, pack_nodes: set[str] | None = None) -> None:
    """Raise :class:`MissingNodes` naming each node class the server does not know, and its pack."""
    missing: dict[str, list[str]] = {}
    for nid, node in workflow.items():
        if node["class_type"] not in object_info:
            missing.setdefault(node["class_type"], []).append(nid)
    if missing:
        raise MissingNodes(server, missing, pack_node_ids() if pack_nodes is None else pack_nodes)
