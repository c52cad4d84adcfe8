"""Model files that ComfyUI's own loaders accept, with seeded random weights, for running the task
workflows end to end on the CPU (host imported first: ``comfy_host.import_host()``).

What ComfyUI's detection leaves free, and so what "tiny" can mean:

- **FLUX.1 transformer** (``UNETLoader``): detection fixes 24 heads and RoPE axes (16, 56, 56), so the
  width is 3072; depth is counted from the keys (1 double + 1 single block here) and the text and
  pooled widths are read from ``txt_in``/``vector_in``. About 0.5B parameters: written in bf16 (1 GB).
- **FLUX VAE** (``VAELoader``): the loader builds ch=128, ch_mult (1, 2, 4, 4), 2 res blocks for any
  file with ``decoder.conv_in``; only z_channels (16, as FLUX) comes from the weights. Full size, 84M.
- **Text encoder**: ``DualCLIPLoader`` type flux always builds the full T5-XXL (4.7B parameters), too
  big here; a full-size random CLIP-L (123M) through ``CLIPLoader`` is the substitute. Its 768-wide
  hidden states and pooled output set the transformer's ``context_in_dim`` and ``vec_in_dim``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from comfy_models import flux_shapes, flux_unet_config, random_state_dict

CLIP_WIDTH = 768  # CLIP-L's hidden and pooled width
LORA_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
                "single_transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_out.0")


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def kontext_unet_config() -> dict:
    return flux_unet_config(hidden=3072, heads=24, axes=(16, 56, 56), depth=1, single=1, context=CLIP_WIDTH,
                            vec=CLIP_WIDTH)


def clip_l_shapes() -> dict[str, torch.Size]:
    """ComfyUI's CLIP-L text model (the config ``CLIPLoader`` builds for a CLIP-L file), on the meta device."""
    import json
    import os

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        config = json.load(f)
    module = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return _shapes(module)


def flux_vae_shapes() -> dict[str, torch.Size]:
    """The autoencoder ``VAELoader`` builds for a FLUX ``ae.safetensors`` (no quant convs), on the meta device."""
    import comfy.ldm.models.autoencoder

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        module = comfy.ldm.models.autoencoder.AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    return _shapes(module)


def _save(state: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def fp8_scaled(state: dict) -> dict:
    """The transformer as ComfyUI's ``*_fp8_scaled.safetensors`` files store it (e.g.
    flux1-dev-kontext_fp8_scaled): every block's linear weight in float8_e4m3fn with a per-tensor
    float32 ``scale_weight`` (weight = fp8 * scale), the embedders and norms as they were, and the
    ``scaled_fp8`` marker key ComfyUI detects the format by."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and value.ndim == 2:
            scale = value.float().abs().max().clamp(min=1e-12) / FP8_MAX
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = value
    return out


def write_kontext_models(models_dir: Path, unet: str, clip_l: str, vae: str, seed: int = 0,
                         fp8: bool = False) -> str:
    """Write the three files under ``models_dir`` (diffusion_models/, text_encoders/, vae/), one model
    alive at a time; returns the transformer's base fingerprint (what a DualRef LoRA records).
    ``fp8``: the transformer in ComfyUI's fp8-scaled format (:func:`fp8_scaled`)."""
    from dual_rope.lora_meta import base_fingerprint

    state = random_state_dict(flux_shapes(kontext_unet_config()), seed, dtype=torch.bfloat16)
    fingerprint = base_fingerprint(state.__getitem__, 1, 1, naming="bfl")
    _save(fp8_scaled(state) if fp8 else state, models_dir / "diffusion_models" / unet)
    del state
    _save(random_state_dict(clip_l_shapes(), seed + 1, dtype=torch.bfloat16), models_dir / "text_encoders" / clip_l)
    _save(random_state_dict(flux_vae_shapes(), seed + 2, dtype=torch.bfloat16), models_dir / "vae" / vae)
    return fingerprint


def write_dualref_lora(path: Path, fingerprint: str, layout: str = "diagonal", rank: int = 4, seed: int = 3):
    """A small DualRef SFT LoRA for the tiny transformer, with the metadata DualLoRAApply checks."""
    from training.lora_io import save_lora

    gen = torch.Generator().manual_seed(seed)
    width = kontext_unet_config()["hidden_size"]
    lora = {}
    for module in LORA_TARGETS:
        lora[f"{module}.lora_A.weight"] = torch.randn(rank, width, generator=gen) / width ** 0.5
        lora[f"{module}.lora_B.weight"] = torch.randn(width, rank, generator=gen) * 0.01
    return save_lora(path, lora, dict(layout=layout, stage="sft", rank=rank, alpha=float(rank),
                                      base_fingerprint=fingerprint, train={"steps": 1, "precision": "bf16"}))


def shrink_for_cpu(graph: dict, steps: int | None = 4, text_encoder: dict | None = None) -> dict:
    """An API workflow as shipped, changed for size only (in place, returned): ``DualCLIPLoader`` (which
    always builds the 4.7B T5-XXL) becomes ``text_encoder`` (``{"class_type", "inputs"}``; default
    ``CLIPLoader`` on the tiny CLIP-L), same node id and title; ``megapixels`` 0 (64 px pictures keep
    their size instead of growing to 1 MP), a custom canvas 64x48; ``steps`` fewer."""
    (clip,) = [i for i, n in graph.items() if n["class_type"] == "DualCLIPLoader"]
    text_encoder = text_encoder or {"inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion", "device": "default"},
                                    "class_type": "CLIPLoader"}
    graph[clip] = {**text_encoder, "_meta": graph[clip]["_meta"]}
    loader = next(n for n in graph.values() if n["class_type"] == "DualReferenceLoader")["inputs"]
    loader.update(megapixels=0.0, width=64, height=48)  # width/height: the canvas when it is "custom"
    if steps is not None:
        next(n for n in graph.values() if n["class_type"] == "KSampler")["inputs"]["steps"] = steps
    return graph


CLIP_FILE = "clip_l.safetensors"  # the templates' CLIP-L file name (comfy_queue.task_graphs.CLIP_L)


@contextlib.contextmanager
def tiny_kontext_server(base: Path, lora: bool = True, fp8: bool = False):
    """A ComfyUI server whose ``base/models`` holds tiny files under the task workflows' own file
    names (Kontext transformer, CLIP-L, VAE and, with ``lora``, the SFT LoRA; ``models/loras`` is
    empty without it); ``fp8``: the transformer in ComfyUI's fp8-scaled format, as the file the
    templates name is. The ~1.4 GB of models is removed afterwards rather than left in pytest's kept
    tmp dirs."""
    import shutil

    from comfy_host import start_server
    from comfy_queue.task_graphs import CLIP_L, SFT_LORA, UNET, VAE

    assert CLIP_L == CLIP_FILE
    models = base / "models"
    fingerprint = write_kontext_models(models, UNET, CLIP_L, VAE, fp8=fp8)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    if lora:
        write_dualref_lora(models / "loras" / SFT_LORA, fingerprint)
    try:
        with start_server(base=base) as server:
            server.fingerprint = fingerprint
            yield server
    finally:
        shutil.rmtree(models, ignore_errors=True)
