"""DualRef for ComfyUI: dual-reference editing on FLUX.1 Kontext-dev.

ComfyUI calls ``comfy_entrypoint``. Keep this file light: ComfyUI's start-up must not import
diffusers, peft or ``training/``; the node modules import only torch, ComfyUI and our
plain-torch ``dual_rope``/``judge`` packages.
"""


async def comfy_entrypoint():
    from .nodes import DualRefExtension

    return DualRefExtension()
