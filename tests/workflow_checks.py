"""Checking workflows against a host's ``/object_info``, as the ComfyUI frontend and server read them.

- ``frontend_widgets``/``sockets``: a node definition's widget and socket inputs in the frontend's order
  (widget values are matched to names by position, so the order is the contract);
- ``check_ui``/``check_api``: every node type, input name, widget value and link type of a workflow
  in the UI / API format, as a list of problems (empty = valid);
- ``ui_to_api``: what the frontend queues for a UI workflow.
"""
from __future__ import annotations

import re

import numpy as np

from comfy_queue.task_graphs import BYPASS, DDPO_LORA, FRONTEND_EXPORTS, FRONTEND_ONLY, MODEL_FILES

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# Combo values that name files the user supplies: absent from the test host, checked by name instead.
FILE_INPUTS = {("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
               ("VAELoader", "vae_name"), ("LoadImage", "image"), ("DualLoRAApply", "sft_lora"),
               ("DualLoRAApply", "ddpo_lora")}
KNOWN_FILES = set(MODEL_FILES) | {DDPO_LORA, "None"}
SECRET = re.compile(
    r"(sk-[A-Za-z0-9_-]{12,}|bearer\s|api[_-]?key\s*[:=]|AIza[0-9A-Za-z_-]{20,}|hf_[A-Za-z0-9]{20,})", re.I)


def frontend_widgets(spec: dict) -> list[tuple[str, str | None, dict, bool]]:
    """Widget inputs of an /object_info entry in the frontend's order: ``(name, type, options, optional)``,
    with the frontend's extra values (``control_after_generate``, ``upload``) where it adds them."""
    out = []
    for group in ("required", "optional"):
        inputs = spec["input"].get(group, {})
        for name in spec.get("input_order", {}).get(group, list(inputs)):
            kind, options = inputs[name][0], (inputs[name][1] if len(inputs[name]) > 1 else {})
            kind = "COMBO" if isinstance(kind, list) else kind
            if kind not in WIDGET_TYPES or options.get("forceInput"):
                continue
            out.append((name, kind, options, group == "optional"))
            if options.get("control_after_generate"):
                out.append(("control_after_generate", None, {}, False))
            if options.get("image_upload"):
                out.append(("upload", "IMAGEUPLOAD", {}, False))
    return out


def sockets(spec: dict) -> list[tuple[str, str, bool]]:
    out = []
    for group in ("required", "optional"):
        inputs = spec["input"].get(group, {})
        for name in spec.get("input_order", {}).get(group, list(inputs)):
            kind = inputs[name][0]
            options = inputs[name][1] if len(inputs[name]) > 1 else {}
            if isinstance(kind, str) and (kind not in WIDGET_TYPES or options.get("forceInput")) and kind != "COMBO":
                out.append((name, kind, group == "optional"))
    return out


def combo_options(kind_spec) -> list:
    kind, options = kind_spec[0], (kind_spec[1] if len(kind_spec) > 1 else {})
    return kind if isinstance(kind, list) else options.get("options", [])


def value_problem(node_type: str, name: str, kind: str | None, options: dict, value, files=KNOWN_FILES):
    """Why ``value`` would not pass the host's validation for this widget, or None."""
    if name == "control_after_generate":
        return None if value in CONTROL_VALUES else f"{value!r} is not one of {CONTROL_VALUES}"
    if name == "upload":
        return None if value == "image" else f"{value!r} is not the upload widget's value"
    if kind == "INT" or kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return f"{value!r} is not a {kind}"
        if not options.get("min", -np.inf) <= value <= options.get("max", np.inf):
            return f"{value} is outside [{options.get('min')}, {options.get('max')}]"
        return None
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    if kind == "COMBO":
        allowed = options["__options__"]
        if (node_type, name) in FILE_INPUTS and value not in allowed:
            return None if value in files or node_type == "LoadImage" else f"{value!r} is not a known file name"
        return None if value in allowed else f"{value!r} is not one of {allowed[:12]}"
    return f"unexpected widget type {kind}"


def widget_specs(spec: dict) -> list[tuple[str, str | None, dict, bool]]:
    out = []
    for name, kind, options, optional in frontend_widgets(spec):
        if kind == "COMBO":
            group = "optional" if optional else "required"
            options = {**options, "__options__": combo_options(spec["input"][group][name])}
        out.append((name, kind, options, optional))
    return out


def accepts(input_type: str, link_type: str) -> bool:
    return input_type == "*" or link_type in input_type.split(",")


def check_ui(task: str, workflow: dict, object_info: dict) -> list[str]:
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        where = f"{task} node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            continue
        spec = object_info.get(node["type"])
        if spec is None:
            problems.append(f"{where}: unknown node type")
            continue
        widgets = widget_specs(spec)
        if len(node["widgets_values"]) != len(widgets):
            problems.append(f"{where}: {len(node['widgets_values'])} widget values for {[w[0] for w in widgets]}")
        linked = {i["name"] for i in node["inputs"] if i.get("link") is not None}
        for (name, kind, options, _), value in zip(widgets, node["widgets_values"]):
            problem = None if name in linked else value_problem(node["type"], name, kind, options, value)
            if problem:
                problems.append(f"{where}: widget {name}: {problem}")
        known = {n: t for n, t, _ in sockets(spec)} | {n: t for n, t, _, _ in widgets if t}
        for slot in node["inputs"]:
            if known.get(slot["name"]) != slot["type"]:
                host_type = known.get(slot["name"])
                problems.append(f"{where}: input {slot['name']} of type {slot['type']} (host: {host_type})")
        required = [n for n, _, optional in sockets(spec) if not optional]
        unlinked = [n for n in required if n not in linked]
        if unlinked and node["mode"] != BYPASS:
            problems.append(f"{where}: required inputs not connected: {unlinked}")
        if [o["type"] for o in node["outputs"]] != spec["output"]:
            problems.append(f"{where}: outputs {[o['type'] for o in node['outputs']]} (host: {spec['output']})")
    for link_id, origin, out_slot, target, in_slot, link_type in workflow["links"]:
        src, dst = nodes.get(origin), nodes.get(target)
        if src is None or dst is None:
            problems.append(f"{task} link {link_id}: missing node")
            continue
        out, inp = src["outputs"][out_slot], dst["inputs"][in_slot]
        if out["type"] != link_type or link_id not in (out["links"] or []) or inp["link"] != link_id:
            problems.append(f"{task} link {link_id}: ends disagree ({out}, {inp})")
        if not accepts(inp["type"], link_type):
            problems.append(f"{task} link {link_id}: {link_type} into {dst['type']}.{inp['name']} ({inp['type']})")
    dangling = [i["link"] for n in workflow["nodes"] for i in n["inputs"]
                if i["link"] is not None and i["link"] not in links]
    if dangling:
        problems.append(f"{task}: inputs refer to links that do not exist: {dangling}")
    return problems


def check_api(task: str, graph: dict, object_info: dict, files=KNOWN_FILES) -> list[str]:
    problems = []
    for node_id, node in graph.items():
        where = f"{task} api node {node_id} ({node['class_type']})"
        spec = object_info.get(node["class_type"])
        if spec is None:
            problems.append(f"{where}: unknown node type")
            continue
        inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        widgets = {name: (kind, options) for name, kind, options, _ in widget_specs(spec) if kind}
        for name in spec["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{where}: required input {name} missing")
        for name, value in node["inputs"].items():
            if FRONTEND_EXPORTS.get(node["class_type"], {}).get(name, object()) == value:
                continue  # what the frontend itself adds to this node's prompt
            if name not in inputs:
                problems.append(f"{where}: no input named {name}")
            elif isinstance(value, list):
                source = graph.get(value[0])
                if source is None:
                    problems.append(f"{where}: {name} comes from missing node {value[0]}")
                    continue
                outputs = object_info[source["class_type"]]["output"]
                want = "COMBO" if isinstance(inputs[name][0], list) else inputs[name][0]
                if value[1] >= len(outputs) or not accepts(want, outputs[value[1]]):
                    problems.append(f"{where}: {name} ({want}) fed by output {value[1]} of node {value[0]}")
            else:
                kind, options = widgets.get(name, (None, {}))
                problem = value_problem(node["class_type"], name, kind, options, value, files)
                if problem:
                    problems.append(f"{where}: {name}: {problem}")
    return problems


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the frontend queues for a UI workflow, derived from the host's node definitions:
    widget values by the host's widget order, links as [origin id, slot], notes and bypassed nodes out."""
    links = {link[0]: link for link in workflow["links"]}
    out = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        if node["type"] in FRONTEND_ONLY or node["mode"] == BYPASS:
            continue
        spec = object_info[node["type"]]
        inputs = {name: value for (name, kind, _, _), value in zip(frontend_widgets(spec), node["widgets_values"])
                  if kind and kind != "IMAGEUPLOAD"}
        inputs.update(FRONTEND_EXPORTS.get(node["type"], {}))
        for slot in node["inputs"]:
            if slot["link"] is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        title = node.get("title") or spec.get("display_name") or node["type"]
        out[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return out
