"""DualRef's ComfyUI nodes (V3). One node per module; list each node class in ``NODES``.

Imported only by ComfyUI (as ``<pack folder>.nodes``), never as a top-level ``nodes``.
"""
from comfy_api.latest import ComfyExtension, io

from .lora_apply import DualLoRAApply
from .position_patch import DiagonalPositionPatch
from .reference_loader import DualReferenceLoader
from .vlm_judge import VLMJudge

NODES: list[type[io.ComfyNode]] = [
    DualReferenceLoader,
    DiagonalPositionPatch,
    DualLoRAApply,
    VLMJudge,
]


class DualRefExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
