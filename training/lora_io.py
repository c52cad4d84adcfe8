"""Write and read DualRef LoRA files (DESIGN contract 4) from peft / diffusers.

``save_lora(path, model_or_state_dict, metadata)`` writes diffusers/peft key names
(``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``) plus a per-module ``.alpha`` equal
to ``peft scaling * rank``, so ComfyUI (``alpha / rank``), diffusers (``network_alphas`` ->
``lora_alpha``) and peft all apply the same effective scale, rsLoRA and rank/alpha patterns
included. The schema, the file checks and the base fingerprint live in
:mod:`dual_rope.lora_meta` (light enough for the ComfyUI node).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import re
from pathlib import Path
from typing import Mapping

import torch

from dual_rope.lora_meta import (
    KEY_PREFIX,
    LoraFileError,
    LoraMetadata,
    LoraMismatchError,
    base_fingerprint,
    base_mismatch,
    lora_content_hash,
    lora_modules,
    read_dualref_metadata,
    read_safetensors_header,
)

from .files import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "LoraFileError", "LoraMetadata", "LoraMismatchError", "apply_lora_diffusers", "check_lora_base", "merge_lora",
    "lora_content_hash", "load_lora",
    "peft_lora_tensors", "save_lora", "transformer_fingerprint",
]


def _module_name(name: str) -> str:
    """peft/diffusers module path without wrapper prefixes or adapter names."""
    name = name.removeprefix("base_model.model.").removeprefix(KEY_PREFIX)
    return name.replace(".base_layer", "")


def peft_lora_tensors(model: torch.nn.Module, adapter_name: str | None = None):
    """``{module: (A, B, alpha_for_file)}`` and the peft target modules, from a model with LoRA layers."""
    from peft.tuners.lora import LoraLayer

    out, targets = {}, ()
    config = getattr(model, "peft_config", {}) or {}
    adapter = adapter_name or (next(iter(config)) if config else "default")
    if adapter in config:
        targets = config[adapter].target_modules or ()
        targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False) or getattr(module, "lora_bias", {}).get(adapter, False):
            raise ValueError(f"module {name}: DoRA / LoRA bias cannot be exported to the DualRef format")
        a = module.lora_A[adapter].weight.detach()
        b = module.lora_B[adapter].weight.detach()
        if a.ndim != 2:
            raise ValueError(f"module {name}: only Linear LoRA layers can be exported, got weight {tuple(a.shape)}")
        rank = a.shape[0]
        out[_module_name(name)] = (a, b, float(module.scaling[adapter]) * rank)
    if not out:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter!r}")
    return out, targets


def _tensors_from_state_dict(state_dict: Mapping[str, torch.Tensor], alpha: float | None):
    """Same as :func:`peft_lora_tensors` for a plain state dict (peft or diffusers key names)."""
    parts: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    pattern = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(\.[^.]+)?\.weight$|^(?P<amod>.+)\.alpha$")
    for key, value in state_dict.items():
        m = pattern.match(key)
        if m is None:
            raise ValueError(f"state dict key {key!r} is not a LoRA A/B weight or an alpha")
        if m["amod"]:
            parts[_module_name(m["amod"])]["alpha"] = value
        else:
            parts[_module_name(m["module"])][m["part"]] = value
    out = {}
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"module {module!r} lacks lora_A or lora_B in the state dict")
        rank = p["lora_A"].shape[0]
        a = float(p["alpha"]) if "alpha" in p else (alpha if alpha is not None else rank)  # diffusers: scale 1
        out[module] = (p["lora_A"], p["lora_B"], a)
    return out, ()


def _fill_metadata(metadata, tensors, targets) -> LoraMetadata:
    ranks = collections.Counter(a.shape[0] for a, _, _ in tensors.values())
    alphas = collections.Counter(alpha for _, _, alpha in tensors.values())
    found = {"rank": ranks.most_common(1)[0][0], "alpha": alphas.most_common(1)[0][0],
             "target_modules": tuple(targets) or tuple(sorted({m.split(".")[-1] for m in tensors}))}
    if isinstance(metadata, LoraMetadata):
        given = dataclasses.asdict(metadata)
    else:
        given = dict(metadata or {})
    for key in ("rank", "alpha"):
        if given.get(key) is not None and float(given[key]) != float(found[key]):
            raise ValueError(f"metadata {key}={given[key]} disagrees with the LoRA tensors ({found[key]})")
    merged = {**found, **{k: v for k, v in given.items() if v is not None}}
    merged.setdefault("layout", "diagonal")
    merged.setdefault("stage", "sft")
    for key in ("target_modules", "gates"):
        if merged.get(key) is not None:
            merged[key] = tuple(merged[key])
    return LoraMetadata(**merged)


def save_lora(path, lora, metadata: LoraMetadata | Mapping | None = None, adapter_name: str | None = None,
              dtype: torch.dtype | None = None) -> LoraMetadata:
    """Write ``lora`` (a model with peft LoRA layers, or a LoRA state dict) to ``path`` atomically.

    ``metadata``: a :class:`LoraMetadata` or a dict of its fields; ``rank``, ``alpha`` and
    ``target_modules`` are taken from the LoRA when missing (and checked when given). Returns what
    was written. ``dtype`` casts A/B (e.g. ``torch.bfloat16``); alphas stay float32.
    """
    from safetensors.torch import save_file

    if isinstance(lora, torch.nn.Module):
        tensors, targets = peft_lora_tensors(lora, adapter_name)
    else:
        alpha = (metadata.alpha if isinstance(metadata, LoraMetadata) else (metadata or {}).get("alpha"))
        tensors, targets = _tensors_from_state_dict(lora, alpha)
    meta = _fill_metadata(metadata, tensors, targets)
    header = meta.to_header()
    state = {}
    for module, (a, b, alpha) in sorted(tensors.items()):
        key = f"{KEY_PREFIX}{module}"
        state[f"{key}.lora_A.weight"] = a.detach().to("cpu", dtype or a.dtype).contiguous()
        state[f"{key}.lora_B.weight"] = b.detach().to("cpu", dtype or b.dtype).contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    lora_modules(state, path)  # the file we write passes our own reader's checks
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=header)
    log.info("wrote LoRA %s: %d modules, rank %d, alpha %g, layout %s, stage %s",
             path, len(tensors), meta.rank, meta.alpha, meta.layout, meta.stage)
    return meta


def _metadata(path, header) -> LoraMetadata | None:
    try:
        return read_dualref_metadata(header)
    except ValueError as e:
        raise LoraFileError(path, f"bad DualRef metadata ({e})", "export it again with training.lora_io.save_lora") from e


def load_lora(path) -> tuple[dict[str, torch.Tensor], LoraMetadata | None]:
    """``(state dict with file key names, parsed metadata or None)``; clear errors naming the file."""
    from safetensors.torch import load_file

    _, header, _ = read_safetensors_header(path)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own message, plus which file and what to do
        raise LoraFileError(path, f"safetensors could not read it ({e})", "export or copy the file again") from e
    lora_modules(state, path)
    return state, _metadata(path, header)


def check_lora_base(path, fingerprint: str, shown=None) -> LoraMetadata | None:
    """DualLoRAApply's base check on a LoRA file before anything is spent on it: its header only.

    Raises :class:`LoraFileError` (a bad file, another architecture) or :class:`LoraMismatchError`
    (another base of the same shape), naming ``shown`` (the user's file, when ``path`` is a copy).
    Returns the metadata (``None``: no DualRef metadata, nothing to check).
    """
    shown = shown or path
    entries, header, _ = read_safetensors_header(path)
    lora_modules(entries, shown)
    meta = _metadata(shown, header)
    mismatch = base_mismatch(meta, str(shown), shown, fingerprint)
    if mismatch:
        raise LoraMismatchError(mismatch)
    return meta


def transformer_fingerprint(transformer) -> str:
    """:func:`dual_rope.lora_meta.base_fingerprint` of a diffusers ``FluxTransformer2DModel``.

    Accepts the model (peft-wrapped or not) or its state dict; call it before FSDP shards it.
    """
    if isinstance(transformer, torch.nn.Module):
        items = transformer.named_parameters()
    else:
        items = transformer.items()
    params = {_module_name(k): v for k, v in items if "lora_" not in k}
    depth = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("transformer_blocks."))
    single = 1 + max(int(k.split(".")[1]) for k in params if k.startswith("single_transformer_blocks."))
    return base_fingerprint(params.__getitem__, depth, single, "diffusers")


def apply_lora_diffusers(transformer, path, adapter_name: str = "dualref", scale: float = 1.0) -> LoraMetadata | None:
    """Load a DualRef LoRA file into a diffusers Flux transformer through diffusers' own loader."""
    from diffusers import FluxKontextPipeline

    _, meta = load_lora(path)  # our checks first: clear errors naming the file
    state, alphas = FluxKontextPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxKontextPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=transformer,
                                                   adapter_name=adapter_name)
    if scale != 1.0:
        transformer.set_adapters([adapter_name], weights=[scale])
    return meta


@torch.no_grad()
def merge_lora(transformer, path, scale: float = 1.0) -> LoraMetadata | None:
    """Add a DualRef LoRA file's ``scale * (alpha/rank) B @ A`` to a diffusers transformer's weights, in
    float32 and then the weight's dtype: what ComfyUI does when it applies a LoRA (and DDPO to its SFT
    LoRA). Returns the file's metadata. The weights change in place; nothing undoes it."""
    state, meta = load_lora(path)
    tensors, _ = _tensors_from_state_dict(state, None)  # load_lora has checked the keys
    for module, (a, b, alpha) in sorted(tensors.items()):
        a, b = a.float(), b.float()
        try:
            layer = transformer.get_submodule(module)
        except AttributeError:
            raise LoraFileError(path, f"module {module!r} is not in this transformer",
                                "pass a LoRA trained on this base model") from None
        if tuple(layer.weight.shape) != (b.shape[0], a.shape[1]):
            raise LoraFileError(path, f"module {module!r}: LoRA shape {(b.shape[0], a.shape[1])} does not fit the "
                                f"weight {tuple(layer.weight.shape)}", "pass a LoRA trained on this base model")
        delta = (scale * alpha / a.shape[0]) * (b @ a)
        layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    log.info("merged %s (scale %g) into the transformer's weights (%d modules)", path, scale, len(tensors))
    return meta
