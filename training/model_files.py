"""Checking and loading model weight files: what a safetensors file holds, and ComfyUI single files.

Every failure names the file, says what is wrong and how to fix it: a truncated download, a
missing shard, a pickle checkpoint, a VAE given where the transformer belongs.
A component is judged by all its files together: a diffusers folder's sharded weights through their
``*.safetensors.index.json`` (the release ships its transformer and T5 that way, and later shards
hold only blocks). ComfyUI's scaled-fp8 files (float8 weights + a ``scale_weight`` per layer + a
``scaled_fp8`` marker) are dequantised on load (``weight.float() * scale_weight``).
Every component is materialised directly in its compute dtype on its device (meta init + state
assigned, or the libraries' own low-memory ``from_pretrained``), never as an fp32 copy first.
Loading uses diffusers' own BFL -> diffusers key conversion with the config folders the pack ships,
and transformers' own ``from_pretrained``; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path

import torch

from dual_rope.lora_meta import parse_safetensors_header

log = logging.getLogger(__name__)

_REFETCH = "download or copy the file again (compare its size with the source)"
# Prefixes that checkpoints bundle components under (ComfyUI / LDM full checkpoints).
_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "vae.", "text_encoders.clip_l.transformer.",
             "text_encoders.t5xxl.transformer.", "cond_stage_model.transformer.")
KINDS = {
    "flux_bfl": "a FLUX.1 transformer in BFL format (like flux1-kontext-dev.safetensors)",
    "flux_diffusers": "a FLUX.1 transformer in diffusers format",
    "vae_ldm": "a VAE in BFL/LDM format (like ae.safetensors)",
    "vae_diffusers": "a VAE in diffusers format",
    "clip": "a CLIP text encoder (like clip_l.safetensors)",
    "t5": "a T5 text encoder (like t5xxl_fp16.safetensors)",
    "lora": "a LoRA",
    "unknown": "not a model this loader knows",
}
# What to pass a file of each kind as.
_WHERE = {"flux_bfl": "model.transformer", "flux_diffusers": "model.transformer", "vae_ldm": "model.vae",
          "vae_diffusers": "model.vae", "clip": "model.clip_l", "t5": "model.t5",
          "lora": "a LoRA loader (not the model)", "unknown": "nothing here"}


class ModelFileError(ValueError):
    """A model file that cannot be used: names the file, the reason and the fix."""

    def __init__(self, path, reason: str, fix: str):
        super().__init__(f"{path}: {reason}. Fix: {fix}")
        self.path, self.reason, self.fix = str(path), reason, fix


def read_header(path) -> dict[str, dict]:
    """The tensor entries of a safetensors file, checked for truncation and corruption."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such file", "check the path")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelFileError(path, "pickle checkpoints are not loaded (they can run code)",
                             "use the .safetensors release of this model")
    header, _, _ = parse_safetensors_header(path, lambda reason: ModelFileError(path, reason, _REFETCH))
    return header


def strip_prefix(keys) -> tuple[str, list[str]]:
    keys = list(keys)
    for prefix in _PREFIXES:
        if keys and sum(k.startswith(prefix) for k in keys) > len(keys) // 2:
            return prefix, [k[len(prefix):] if k.startswith(prefix) else k for k in keys]
    return "", keys


def classify_keys(keys) -> str:
    """One of :data:`KINDS` from the tensor names alone."""
    _, keys = strip_prefix(keys)
    names = set(keys)
    if any(".lora_A." in k or ".lora_down." in k or k.endswith(".lora_A.weight") for k in keys):
        return "lora"
    if any(k.startswith("double_blocks.") for k in keys):
        return "flux_bfl"
    if "x_embedder.weight" in names and any(k.startswith("transformer_blocks.") for k in keys):
        return "flux_diffusers"
    if "encoder.conv_in.weight" in names and "decoder.conv_in.weight" in names:
        return "vae_diffusers" if any(k.startswith("encoder.down_blocks.") for k in keys) else "vae_ldm"
    if any(k.startswith("text_model.") for k in keys) or (  # transformers >= 5 saves CLIP unprefixed
            "embeddings.token_embedding.weight" in names and any(k.startswith("encoder.layers.") for k in keys)):
        return "clip"
    if "shared.weight" in names or any(k.startswith("encoder.block.") for k in keys):
        return "t5"
    return "unknown"


def check_kind(path, expected: tuple[str, ...], role: str) -> tuple[str, dict]:
    """Classify the file at ``path``; a wrong kind raises naming what it is and where it goes."""
    return check_files([path], expected, role, path)


def check_files(paths, expected: tuple[str, ...], role: str, where) -> tuple[str, dict]:
    """Classify the tensors of all ``paths`` together (the shards of one component); ``where`` is
    what an error names (the file, or the component's folder)."""
    header = {}
    for path in paths:
        header.update(read_header(path))
    kind = classify_keys(header)
    if kind not in expected:
        raise ModelFileError(
            where, f"given as the {role}, but it is {KINDS[kind]}",
            f"pass the {role} file here" + ("" if kind == "unknown" else f", and this file as {_WHERE[kind]}"))
    return kind, header


def shard_files(folder, component: str) -> list[Path] | None:
    """The shard files a component folder's ``*.safetensors.index.json`` names (checked present and
    holding what the index says they hold), or None when the folder has no index."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return None
    if len(indexes) > 1:
        raise ModelFileError(folder, f"several weight indexes ({', '.join(i.name for i in indexes)})",
                             "keep the one index that belongs to the shards in this folder")
    index = indexes[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(index, f"not a readable safetensors index ({e})", _REFETCH) from e
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ModelFileError(
            folder / missing[0], f"missing shard: {index.name} names {len(names)} shard(s) of the {component} "
            f"and {len(missing)} are absent ({', '.join(missing)})",
            f"download the missing shard(s) into {folder} (e.g. `huggingface-cli download "
            f"black-forest-labs/FLUX.1-Kontext-dev {component}/{missing[0]} --local-dir <model folder>`), "
            "or pass a complete copy of the folder")
    for name in names:
        want = {k for k, v in weight_map.items() if v == name}
        lacking = want - set(read_header(folder / name))
        if lacking:
            raise ModelFileError(folder / name, f"lacks {len(lacking)} tensor(s) its index places there "
                                 f"(e.g. {sorted(lacking)[0]})", _REFETCH)
    return [folder / n for n in names]


def is_scaled_fp8(keys) -> bool:
    """ComfyUI's scaled-fp8 format: a ``scaled_fp8`` marker key and ``<layer>.scale_weight`` tensors."""
    return any(k == "scaled_fp8" or k.endswith(".scaled_fp8") or k.endswith(".scale_weight") for k in keys)


def read_state(paths, dtype, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of ``paths``, each read straight onto ``device`` and cast to ``dtype`` one at a time.

    Scaled-fp8 layers are dequantised (``weight.float() * scale_weight``, then ``dtype``); the marker
    and scale tensors are dropped. Peak memory is the state in ``dtype`` plus one fp32 tensor.
    """
    from safetensors import safe_open

    state = {}
    for path in paths:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if key == "scaled_fp8" or key.endswith((".scaled_fp8", ".scale_weight", ".scale_input")):
                    continue
                tensor = f.get_tensor(key)
                scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
                if scale_key in keys:
                    scale = f.get_tensor(scale_key).float()
                    if scale.numel() > 1:  # per output channel
                        scale = scale.reshape(-1, *[1] * (tensor.ndim - 1))
                    tensor = tensor.float() * scale
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[key] = tensor
    return state


def _assign_state(cls, config, state, path, device="cpu"):
    """``cls`` built on the meta device, then given ``state``'s tensors as they are (dtype, device).

    ``torch.device("meta")`` rather than accelerate's ``init_empty_weights``: the latter lets each
    layer allocate and random-initialise its fp32 weights before moving them to meta (minutes of CPU
    for 12B parameters). FLUX's transformer and VAE have no buffers outside their state dict.
    """
    with torch.device("meta"):
        model = cls.from_config(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # mis-sized tensors
        raise ModelFileError(path, f"its tensors do not fit the config ({str(e)[:300]})",
                             "pass the file that belongs to this config") from e
    if missing or unexpected:
        raise ModelFileError(path, f"its tensors do not fit the config (missing {sorted(missing)[:3]}, unexpected "
                             f"{sorted(unexpected)[:3]})", "pass the file that belongs to this config")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelFileError(path, f"the file leaves {len(left)} tensors unset (e.g. {left[0]})",
                             "pass the complete file that belongs to this config")
    return model


def file_fingerprint(paths, full_below: int = 256 << 20) -> str:
    """Content hash of weight files: all bytes of small files; header + 64 spread 1 MiB chunks of large ones.

    The same weights in the same files give the same value on every machine; it keys the latent and
    text-embedding cache, so a changed VAE or text encoder never reuses stale entries.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}\n".encode())
        with open(path, "rb") as fh:
            if size <= full_below:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
                continue
            (length,) = struct.unpack("<Q", fh.read(8))
            digest.update(fh.read(length))
            for k in range(64):
                fh.seek(8 + length + (size - 8 - length - (1 << 20)) * k // 63)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:20]


def load_transformer_file(path, config_root, dtype=torch.float32, device="cpu"):
    """A ``FluxTransformer2DModel`` from one BFL- or diffusers-format file (scaled fp8 included), with
    ``config_root/transformer``; built on the meta device and given the file's tensors in ``dtype``."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    kind, header = check_kind(path, ("flux_bfl", "flux_diffusers"), "transformer")
    config = FluxTransformer2DModel.load_config(str(Path(config_root) / "transformer"))
    if kind == "flux_bfl":
        width = header[[k for k in header if k.endswith("img_in.weight")][0]]["shape"][0]
        want = config["num_attention_heads"] * config["attention_head_dim"]
        if width != want or width != 3072:  # diffusers' BFL converter assumes FLUX.1's width 3072
            raise ModelFileError(path, f"a FLUX transformer of width {width}, the config expects {want} "
                                 "(diffusers converts only FLUX.1's width 3072)",
                                 "pass a FLUX.1 Kontext-dev transformer, or its diffusers folder as model.path")
    state = _unprefixed(read_state([path], dtype, device))
    if kind == "flux_bfl":
        try:
            state = convert_flux_transformer_checkpoint_to_diffusers(state)
        except (KeyError, IndexError, RuntimeError, ValueError) as e:
            raise ModelFileError(path, f"its tensors do not fit the FLUX.1 Kontext config ({e!r})",
                                 "pass flux1-kontext-dev.safetensors (or the matching config folder)") from e
    return _assign_state(FluxTransformer2DModel, config, state, path, device)


def _unprefixed(state: dict) -> dict:
    prefix, keys = strip_prefix(state)
    return {k: state[(prefix + k) if prefix and (prefix + k) in state else k] for k in keys}


def load_vae_file(path, config_root, dtype=torch.float32, device="cpu"):
    """An ``AutoencoderKL`` from ``ae.safetensors`` (BFL/LDM keys) or a diffusers-format file."""
    from diffusers import AutoencoderKL

    kind, _ = check_kind(path, ("vae_ldm", "vae_diffusers"), "VAE")
    if kind == "vae_ldm":
        try:  # diffusers' single-file loader initialises on the meta device and loads in ``dtype``
            return AutoencoderKL.from_single_file(str(path), config=str(config_root), subfolder="vae",
                                                  local_files_only=True, torch_dtype=dtype).to(device)
        except (KeyError, RuntimeError, ValueError) as e:
            raise ModelFileError(path, f"its tensors do not fit the FLUX VAE config ({e})",
                                 "pass FLUX's ae.safetensors") from e
    config = AutoencoderKL.load_config(str(Path(config_root) / "vae"))
    return _assign_state(AutoencoderKL, config, _unprefixed(read_state([path], dtype, device)), path, device)


def load_text_encoder_file(path, config_dir, kind: str, dtype=torch.float32, device="cpu"):
    """``CLIPTextModel`` (kind "clip") or ``T5EncoderModel`` (kind "t5") from a ComfyUI single file.

    A plain file is linked into a temporary folder beside ``config.json`` and read by transformers'
    ``from_pretrained`` (meta init, tensors loaded in ``dtype``), so tied weights, buffers and dtype
    rules follow its code; a scaled-fp8 file is dequantised tensor by tensor first and handed over as
    a state dict.
    """
    from transformers import CLIPTextModel, T5EncoderModel

    role = {"clip": "CLIP-L text encoder", "t5": "T5-XXL text encoder"}[kind]
    _, header = check_kind(path, (kind,), role)
    prefix, _ = strip_prefix(header)
    if prefix:
        raise ModelFileError(path, f"its tensors sit under {prefix!r} (a bundled checkpoint)",
                             "pass the stand-alone text encoder file")
    cls = CLIPTextModel if kind == "clip" else T5EncoderModel
    placement = {} if torch.device(device).type == "cpu" else {"device_map": {"": str(device)}}
    try:
        if is_scaled_fp8(header):
            config = cls.config_class.from_pretrained(str(config_dir))
            model, info = cls.from_pretrained(None, config=config, state_dict=read_state([path], dtype, device),
                                              dtype=dtype, output_loading_info=True)
        else:
            with tempfile.TemporaryDirectory(prefix="dualref-te-") as tmp:
                (Path(tmp) / "config.json").write_bytes((Path(config_dir) / "config.json").read_bytes())
                os.symlink(Path(path).resolve(), Path(tmp) / "model.safetensors")
                model, info = cls.from_pretrained(tmp, local_files_only=True, dtype=dtype, use_safetensors=True,
                                                  output_loading_info=True, **placement)
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelFileError(path, f"transformers could not load it as the {role} ({e})",
                             f"pass the {role} file that matches {config_dir}") from e
    allowed = {"encoder.embed_tokens.weight", "text_model.embeddings.position_ids"}
    missing = [k for k in info.get("missing_keys", []) if k not in allowed]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelFileError(path, f"it lacks or mis-sizes tensors of the {role} (missing {missing[:3]}, "
                             f"mismatched {[m[0] if isinstance(m, tuple) else m for m in mismatched][:3]})",
                             f"pass the {role} file that matches {config_dir}")
    return model.to(device)
