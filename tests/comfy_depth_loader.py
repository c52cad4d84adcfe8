"""A test-only ComfyUI custom node (copied into a test host's custom_nodes/, never shipped):
``DualCLIPLoader`` for depth-reduced CLIP-L + T5-XXL files.

ComfyUI's own ``DualCLIPLoader`` always builds the 12-layer CLIP-L and 24-layer T5-XXL of its
configs and leaves the layers a file lacks uninitialised; this one counts the layers in the files and
passes ComfyUI's own ``<name>_model_config`` model option to ``comfy.sd.load_clip``, so ComfyUI's
own text-encoder classes, tokenizers and Flux conditioning run, only shallower.
"""
import re

import comfy.sd
import folder_paths
import nodes
from safetensors import safe_open


def _layers(path: str, pattern: str) -> int:
    with safe_open(path, framework="pt") as f:  # the names only
        keys = list(f.keys())
    return 1 + max(int(m.group(1)) for m in map(re.compile(pattern).match, keys) if m)


class DepthDualCLIPLoader(nodes.DualCLIPLoader):
    def load_clip(self, clip_name1, clip_name2, type, device="default"):
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        # CLIP-L's goes in as "model_config": load_clip's long-CLIP step (comfy/text_encoders/long_clipl.py)
        # sets clip_l_model_config to that plus the file's position count, replacing any other.
        options = {"model_config": {"num_hidden_layers": _layers(paths[0], r"text_model\.encoder\.layers\.(\d+)\.")},
                   "t5xxl_model_config": {"num_layers": _layers(paths[1], r"encoder\.block\.(\d+)\.")}}
        clip_type = getattr(comfy.sd.CLIPType, type.upper())
        return (comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                   clip_type=clip_type, model_options=options),)


NODE_CLASS_MAPPINGS = {"DepthDualCLIPLoader": DepthDualCLIPLoader}
