"""A stand-in FLUX.1 Kontext-dev for the full-shape rehearsal (issue 17 item 7): the project's own
configs (training/model_configs/kontext) at their real widths (transformer 3072, T5-XXL 4096, CLIP-L
768, the real VAE), only the depth reduced (1 double + 1 single block, 1 T5 layer, 2 CLIP layers),
seeded random weights, the real CLIP-L and T5 tokenizers of the ComfyUI host, written twice:

- ``release/FLUX.1-Kontext-dev``: the release's folder layout, transformer and T5 as several
  ``*.safetensors`` shards with their ``*.safetensors.index.json`` (diffusers' / transformers'
  ``save_pretrained``, which write the release's index format), tokenizer/ and tokenizer_2/;
- ``comfy/``: ComfyUI's single files (BFL-format transformer, LDM-format ``ae.safetensors``,
  ``clip_l.safetensors``, ``t5xxl_fp16.safetensors``) and ``configs/``, the config folders at the
  stand-in's depth (what ``load_kontext(configs=...)`` takes for single files).

About 1.0B parameters; the transformer is written in bf16 (1.1 GB). Needs the host imported
(``comfy_host.import_host()``): the transformer's tensor names and shapes are ComfyUI's own.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfy_models import flux_shapes, flux_unet_config, random_state_dict
from training.models import KONTEXT_CONFIGS

# CLIP-L keeps 2 layers: ComfyUI's load_clip tells a CLIP-L file by its second layer (a 1-layer file fails there).
DEPTH = {"transformer": {"num_layers": 1, "num_single_layers": 1}, "text_encoder": {"num_hidden_layers": 2},
         "text_encoder_2": {"num_layers": 1, "num_decoder_layers": 1}}
# T5 at its 512 tokens x 4096 is most of a CPU step; the folder's dualref.json (the documented place for
# what diffusers' files do not hold) shortens it. ComfyUI pads its own T5 prompt to 256 tokens regardless.
MAX_SEQUENCE_LENGTH = 32
SHARD = {"transformer": "400MB", "text_encoder_2": "200MB"}  # -> 3 and 4 shards, as the release has several
FILES = {"transformer": "flux1-kontext-dev.safetensors", "vae": "ae.safetensors", "clip_l": "clip_l.safetensors",
         "t5": "t5xxl_fp16.safetensors"}


def write_configs(folder: Path) -> Path:
    """training/model_configs/kontext with only the depth reduced (and the T5 length, dualref.json)."""
    shutil.copytree(KONTEXT_CONFIGS, folder)
    for component, changes in DEPTH.items():
        path = folder / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=1))
    settings = json.loads((folder / "dualref.json").read_text())
    (folder / "dualref.json").write_text(json.dumps({**settings, "name": "FLUX.1 Kontext-dev stand-in (depth 1)",
                                                      "max_sequence_length": MAX_SEQUENCE_LENGTH}))
    return folder


def unet_config(configs: Path) -> dict:
    """ComfyUI's unet_config for the transformer config in ``configs``: its width, RoPE axes, text and
    pooled widths, and depth."""
    c = json.loads((configs / "transformer" / "config.json").read_text())
    return flux_unet_config(hidden=c["num_attention_heads"] * c["attention_head_dim"], heads=c["num_attention_heads"],
                            axes=tuple(c["axes_dims_rope"]), depth=c["num_layers"], single=c["num_single_layers"],
                            context=c["joint_attention_dim"], vec=c["pooled_projection_dim"])


def _text_encoders(configs: Path, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)  # transformers' own initialisation, seeded
    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))
    t5 = T5EncoderModel(T5Config.from_pretrained(str(configs / "text_encoder_2")))
    return clip.to(torch.bfloat16).eval(), t5.to(torch.bfloat16).eval()


def build_standin(root: Path, tokenizers: dict[str, Path], seed: int = 0) -> dict:
    """Write the stand-in under ``root`` (see the module docstring); returns its paths:
    ``release`` (the folder), ``configs``, ``tokenizers`` (a folder with tokenizer/ + tokenizer_2/) and
    the single files by component (``transformer``, ``vae``, ``clip_l``, ``t5``)."""
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL

    from training.model_files import load_transformer_file

    configs = write_configs(root / "configs")
    release, single = root / "release" / "FLUX.1-Kontext-dev", root / "comfy"
    shutil.copytree(configs, release)
    single.mkdir(parents=True)
    for name, source in (("tokenizer", tokenizers["tokenizer"]), ("tokenizer_2", tokenizers["tokenizer_2"])):
        shutil.copytree(source, release / name)
    files = {k: single / v for k, v in FILES.items()}

    # transformer: ComfyUI's names and shapes, random in bf16; the folder's shards through our BFL loader
    state = random_state_dict(flux_shapes(unet_config(configs)), seed, dtype=torch.bfloat16)
    save_file(state, files["transformer"])
    del state
    model = load_transformer_file(files["transformer"], configs, torch.bfloat16)
    model.save_pretrained(str(release / "transformer"), max_shard_size=SHARD["transformer"])
    del model

    clip, t5 = _text_encoders(configs, seed + 1)
    clip.save_pretrained(str(release / "text_encoder"))
    t5.save_pretrained(str(release / "text_encoder_2"), max_shard_size=SHARD["text_encoder_2"])
    save_file({("" if k.startswith("text_model.") else "text_model.") + k: v.contiguous()
               for k, v in clip.state_dict().items()}, files["clip_l"])
    save_file({k: v.half().contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              files["t5"])
    del clip, t5

    torch.manual_seed(seed + 2)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(configs / "vae"))).eval()
    vae.save_pretrained(str(release / "vae"))
    ldm = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())  # ae.safetensors' LDM names
    save_file({k: v.contiguous() for k, v in ldm.items()}, files["vae"])
    return {"release": release, "configs": configs, "tokenizers": release, **files}
