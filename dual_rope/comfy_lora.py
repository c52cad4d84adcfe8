"""DualRef LoRAs on ComfyUI's Flux: checks against the model, then ComfyUI's own LoRA machinery.

Used by the ``DualLoRAApply`` node. The LoRA is applied by ``comfy.sd.load_lora_for_models`` (the
code behind core ``LoraLoaderModelOnly``) on a clone. Before that, each file is checked:

- the file itself (truncated/corrupt, not a FLUX.1 Kontext LoRA) -> always an error naming it;
- every module maps onto this model with the right shape -> else an error (another model);
- architecture in the base fingerprint differs -> always an error;
- base weights' fingerprint differs, or the layout the LoRA was trained with is not the layout
  of the model's ``DiagonalPositionPatch`` (or there is none) -> a *mismatch*: an error by default
  (a wrong layout gives plausible but wrong images, the worst kind of failure), or a logged
  warning with ``on_mismatch="warn"`` for deliberate experiments;
- a DDPO LoRA trained on another SFT LoRA, or a file in the other stage's slot -> a warning.

Learned gates scale the patch's per-reference strengths: ``strength_k * gate_k ** lora_strength``,
so LoRA strength 0 leaves the model exactly as it was and strength 1 uses the learned gates.
ComfyUI is imported lazily, so this module imports without a host.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .comfy_adapter import WRAPPER_KEY, apply_position_patch, flux_model_problem
from .lora_meta import (
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

log = logging.getLogger(__name__)
POLICIES = ("error", "warn")


@dataclass
class LoraCheck:
    """What was found about one LoRA file."""

    name: str
    path: str
    meta: LoraMetadata | None
    modules: list[str]
    shapes: dict[str, tuple[int, int]]  # module -> (out, in) of B @ A
    mismatches: list[str] = field(default_factory=list)  # policy decides: error or warning
    warnings: list[str] = field(default_factory=list)


def inspect_lora(name: str, path: str) -> LoraCheck:
    """Read one file's header: corrupt/foreign files raise :class:`LoraFileError` naming it."""
    entries, header, _ = read_safetensors_header(path)
    modules = lora_modules(entries, path)
    try:
        meta = read_dualref_metadata(header)
    except ValueError as e:
        raise LoraFileError(path, f"bad DualRef metadata ({e})", "export it again with training.lora_io.save_lora") from e
    shapes = {}
    for module in modules:
        a = entries[f"transformer.{module}.lora_A.weight"]["shape"]
        b = entries[f"transformer.{module}.lora_B.weight"]["shape"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise LoraFileError(path, f"module {module!r} has lora_A {a} and lora_B {b}, which do not multiply",
                                "export it again")
        shapes[module] = (b[0], a[1])
    return LoraCheck(name, str(path), meta, modules, shapes)


def model_layout(model_patcher):
    """The ``PositionSettings`` of the model's DiagonalPositionPatch, or ``None`` when unpatched."""
    import comfy.patcher_extension

    wrappers = model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    return wrappers[-1].settings if wrappers else None


def model_fingerprint(model_patcher) -> tuple[str | None, str]:
    """``(fingerprint, "")`` of the model's unpatched base weights, or ``(None, why not)``."""
    import comfy.utils

    diffusion = model_patcher.model.diffusion_model
    depth, single = len(diffusion.double_blocks), len(diffusion.single_blocks)

    def weight(bfl_name: str):
        key = f"diffusion_model.{bfl_name}"
        backup = model_patcher.backup.get(key)  # a loaded, LoRA-patched model keeps its originals here
        return backup.weight if backup is not None else comfy.utils.get_attr(model_patcher.model, key)

    try:
        return base_fingerprint(weight, depth, single, naming="bfl"), ""
    except (TypeError, AttributeError, RuntimeError) as e:
        return None, f"the model's weights cannot be fingerprinted ({e})"


def _check_modules(check: LoraCheck, model_patcher, key_map: dict):
    """Every module must land on a weight of this model with the LoRA's shape."""
    sd_shapes = {k: tuple(v.shape) for k, v in model_patcher.model.state_dict().items()}
    missing, wrong = [], []
    for module, (out_dim, in_dim) in check.shapes.items():
        target = key_map.get(f"transformer.{module}")
        if target is None:
            missing.append(module)
            continue
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        shape = sd_shapes.get(key)
        expected_out = offset[2] if offset else (shape[0] if shape else None)
        if shape is None or len(shape) != 2 or (expected_out, shape[1]) != (out_dim, in_dim):
            wrong.append(f"{module} ({out_dim}x{in_dim} vs {expected_out}x{shape[1] if shape else '?'})")
    if missing or wrong:
        what = (f"{len(missing)} modules this model lacks (e.g. {', '.join(missing[:3])})" if missing
                else f"{len(wrong)} modules of another shape (e.g. {', '.join(wrong[:3])})")
        raise LoraFileError(check.path, f"has {what}: it was made for another model",
                            "use a LoRA trained on FLUX.1 Kontext-dev (the model connected to DualLoRAApply)")


def check_against_model(check: LoraCheck, model_patcher, key_map: dict, fingerprint, fingerprint_note: str):
    """Fill ``check.mismatches``/``warnings``; raise for what can never work."""
    _check_modules(check, model_patcher, key_map)
    meta = check.meta
    if meta is None:
        check.warnings.append(f"{check.name} has no DualRef metadata: its layout and base model cannot be checked")
        return
    mismatch = base_mismatch(meta, check.name, check.path, fingerprint)
    if mismatch:
        check.mismatches.append(mismatch)
    elif meta.base_fingerprint and not fingerprint:
        check.warnings.append(f"base model of {check.name} not checked: {fingerprint_note}")
    settings = model_layout(model_patcher)
    if settings is None:
        check.mismatches.append(
            f"{check.name} was trained with the '{meta.layout}' layout but the model has no DiagonalPositionPatch; "
            f"add DiagonalPositionPatch with method '{meta.layout}' before DualLoRAApply")
    elif settings.method != meta.layout:
        check.mismatches.append(
            f"{check.name} was trained with the '{meta.layout}' layout but the model is patched with "
            f"'{settings.method}'; set DiagonalPositionPatch's method to '{meta.layout}'")


_HASHES: dict[tuple, str] = {}


def _content_hash(path: str) -> str:
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES.clear()
        _HASHES[key] = lora_content_hash(path)
    return _HASHES[key]


def check_stages(sft: LoraCheck | None, ddpo: LoraCheck | None):
    if sft is not None and sft.meta is not None and sft.meta.stage != "sft":
        sft.warnings.append(f"{sft.name} is a {sft.meta.stage} LoRA in the SFT slot")
    if ddpo is None or ddpo.meta is None:
        return
    if ddpo.meta.stage != "ddpo":
        ddpo.warnings.append(f"{ddpo.name} is a {ddpo.meta.stage} LoRA in the DDPO slot")
    if ddpo.meta.sft_lora:
        if sft is None:
            ddpo.warnings.append(f"{ddpo.name} was trained on top of an SFT LoRA ({ddpo.meta.sft_lora[:19]}…); "
                                 "select that SFT LoRA too")
        elif _content_hash(sft.path) != ddpo.meta.sft_lora:
            ddpo.warnings.append(f"{ddpo.name} was trained on top of another SFT LoRA than {sft.name}; "
                                 "its alignment may not transfer (select the SFT LoRA it was trained with)")
    if sft is not None and sft.meta is not None and sft.meta.layout != ddpo.meta.layout:
        ddpo.mismatches.append(f"{sft.name} uses the '{sft.meta.layout}' layout, {ddpo.name} '{ddpo.meta.layout}'")


def gated_strengths(current, gates, lora_strength: float) -> list[float]:
    """Patch strengths times learned gates raised to the LoRA strength (1 at strength 0)."""
    n = max(len(current), len(gates))
    current = list(current) + [1.0] * (n - len(current))
    out = []
    for k in range(n):
        g = gates[k] if k < len(gates) else 1.0
        factor = g ** lora_strength if g > 0 else (0.0 if lora_strength > 0 else 1.0)
        out.append(current[k] * factor)
    return out


def apply_dual_loras(model_patcher, loras, on_mismatch: str = "error"):
    """``loras``: ``[(slot, file name, path or None, strength)]`` with slot "sft"/"ddpo".

    Returns ``(patched clone, report lines)``. Raises :class:`LoraFileError` (bad file / other
    model) or :class:`LoraMismatchError` (layout/base mismatch under ``on_mismatch="error"``).
    """
    import comfy.lora
    import comfy.sd
    import comfy.utils

    if on_mismatch not in POLICIES:
        raise ValueError(f"on_mismatch must be one of {POLICIES}, got {on_mismatch!r}")
    problem = flux_model_problem(model_patcher)
    if problem:
        raise ValueError(problem.replace("DiagonalPositionPatch", "DualLoRAApply"))
    checks = {slot: inspect_lora(name, path) for slot, name, path, _ in loras if path}
    strengths = {slot: s for slot, _, path, s in loras if path}
    active = {slot: c for slot, c in checks.items() if strengths[slot] != 0}
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    fingerprint, note = model_fingerprint(model_patcher) if active else (None, "")
    for check in active.values():
        check_against_model(check, model_patcher, key_map, fingerprint, note)
    check_stages(checks.get("sft"), active.get("ddpo"))  # the selected SFT file, even at strength 0

    mismatches = [m for c in active.values() for m in c.mismatches]
    if mismatches and on_mismatch == "error":
        raise LoraMismatchError("DualLoRAApply: " + " | ".join(mismatches)
                                + " (or set on_mismatch to 'warn' to apply anyway)")
    report = [f"warning: {m}" for m in mismatches] + [f"warning: {w}" for c in checks.values() for w in c.warnings]
    for line in report:
        log.warning("DualLoRAApply: %s", line.removeprefix("warning: "))

    patched = model_patcher
    for slot, check in active.items():
        lora = comfy.utils.load_torch_file(check.path, safe_load=True)
        patched = comfy.sd.load_lora_for_models(patched, None, lora, strengths[slot], 0)[0]
        del lora
        meta = check.meta
        report.append(f"{slot}: {check.name} at strength {strengths[slot]:g}, {len(check.modules)} modules"
                      + (f", rank {meta.rank}, layout {meta.layout}" if meta else ""))
        if meta is not None and meta.gates:
            settings = model_layout(patched)
            if settings is None:
                report.append(f"learned gates {list(meta.gates)} of {check.name} not applied: no DiagonalPositionPatch")
            else:
                new = gated_strengths(settings.strengths, meta.gates, strengths[slot])
                patched = apply_position_patch(patched, settings.method, new)
                report.append(f"learned gates {list(meta.gates)} applied: reference strengths now "
                              + ", ".join(f"{s:.3g}" for s in new))
    if not checks:
        report.append("no LoRA selected: the patched base model passes through unchanged (zero-shot); "
                      "put a DualRef LoRA in models/loras and select it in sft_lora to use one")
    elif not active:
        report.append("no LoRA applied (all strengths 0)")
    return (patched if patched is not model_patcher else model_patcher.clone()), report
