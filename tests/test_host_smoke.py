"""The pack in a real headless ComfyUI: loads without import errors, lists its nodes with tooltips,
and keeps ComfyUI's start-up free of diffusers, peft and training/."""
import json
import subprocess
import sys
import textwrap

import pytest

from comfy_host import PACK_NAME, REPO, comfy_path

pytestmark = pytest.mark.host

NODES = ("DualReferenceLoader", "DiagonalPositionPatch")


def test_server_lists_nodes_with_tooltips_and_descriptions(comfy_server):
    log = comfy_server.log_text()
    failed = [line for line in log.splitlines()
              if PACK_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failed, log[-3000:]
    assert any(PACK_NAME in line for line in log.splitlines()), "the pack was not even tried:\n" + log[-3000:]
    info = comfy_server.get_json("/object_info")
    for name in NODES:
        assert name in info, f"{name} missing from /object_info; host log:\n{log[-3000:]}"
        node = info[name]
        assert node["category"].startswith("DualRef/")
        assert len(node["description"]) > 40
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs
        for input_name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(node["output_tooltips"]) == len(node["output"])
        assert all(node["output_tooltips"]), f"{name} has an output without a tooltip"
    assert info["DualReferenceLoader"]["output"] == ["CONDITIONING", "LATENT", "STRING"]
    assert info["DualReferenceLoader"]["output_name"] == ["conditioning", "latent", "report"]
    assert info["DualLoRAApply"]["output_name"] == ["MODEL", "report"]
    assert info["DiagonalPositionPatch"]["output"] == ["MODEL"]
    assert info["DiagonalPositionPatch"]["input"]["required"]["method"][1]["default"] == "diagonal"


PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, {tests!r})
    from comfy_host import import_host, load_pack
    import_host()
    import nodes  # ComfyUI's own, as at start-up
    before = set(sys.modules)
    pack = load_pack()
    extension = asyncio.run(pack.comfy_entrypoint())
    listed = [n.GET_SCHEMA().node_id for n in asyncio.run(extension.get_node_list())]
    new = sorted(set(sys.modules) - before)
    print(json.dumps({{"nodes": listed, "new_modules": new}}))
    """
)


def test_loading_the_pack_imports_no_training_stack(comfy_host):
    """In a fresh interpreter: what does loading the pack (as ComfyUI does) add to sys.modules?"""
    code = PROBE.format(tests=str(REPO / "tests"))
    done = subprocess.run([sys.executable, "-c", code], cwd=str(comfy_path()), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(NODES) <= set(result["nodes"])
    heavy = [m for m in result["new_modules"]
             if m.split(".")[0] in {"diffusers", "peft", "accelerate", "training"} or ".training" in m]
    assert not heavy, f"loading the pack imported {heavy}"
