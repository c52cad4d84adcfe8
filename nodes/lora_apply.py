"""DualLoRAApply: a DualRef SFT LoRA and an optional DDPO LoRA on a Kontext model (MODEL -> MODEL)."""
import os

import folder_paths
from comfy_api.latest import io

from ..dual_rope.comfy_lora import POLICIES, apply_dual_loras

NONE = "None"
ZERO_SHOT = (
    "Without a LoRA (sft_lora None, the zero-shot path) stock Kontext reads two references best with "
    "DiagonalPositionPatch's 'offset' layout: it packs both references side by side at one RoPE index, "
    "like the stitched image stock Kontext already understands (ComfyUI PR #9356). With a DualRef LoRA use "
    "the layout it was trained with ('diagonal' for the paper's); this node checks it."
)


def lora_path(name: str) -> str | None:
    return None if name in (None, "", NONE) else folder_paths.get_full_path_or_raise("loras", name)


def file_stamp(name: str):
    """(size, mtime) of a LoRA file, so a file replaced under the same name runs the node again."""
    path = folder_paths.get_full_path("loras", name) if name not in (None, "", NONE) else None
    if not path:
        return None
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def strength_input(name: str, what: str) -> io.Float.Input:
    return io.Float.Input(
        name, default=1.0, min=-10.0, max=10.0, step=0.01,
        tooltip=f"How strongly the {what} LoRA changes the model: 1 = as trained, 0 = off (the model is returned "
                "exactly as it came in, learned gates included).",
    )


class DualLoRAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="DualLoRAApply",
            display_name="Dual LoRA Apply (DualRef)",
            category="DualRef/LoRA",
            description=(
                "Applies a DualRef SFT LoRA and, optionally, a DDPO LoRA trained on top of it, with ComfyUI's own "
                "LoRA loader. Each file's metadata is checked against the model: the layout it was trained with "
                "must be the DiagonalPositionPatch method on the model, and its base-model fingerprint must match. "
                "Learned per-reference gates stored in the LoRA scale the patch's reference strengths. "
                + ZERO_SHOT
            ),
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 Kontext-dev model, after DiagonalPositionPatch."),
                io.Combo.Input("sft_lora", options=[NONE] + loras, default=NONE, tooltip=(
                    "The dual-reference LoRA from `python -m training.sft` (a .safetensors file in models/loras), "
                    "or None: the patched base model passes through unchanged. " + ZERO_SHOT)),
                strength_input("sft_strength", "SFT"),
                io.Combo.Input("ddpo_lora", options=[NONE] + loras, default=NONE, tooltip=(
                    "Optional judge-aligned LoRA from `python -m training.ddpo`, trained on top of the SFT LoRA; "
                    "None to skip.")),
                strength_input("ddpo_strength", "DDPO"),
                io.Combo.Input("on_mismatch", options=list(POLICIES), default="error", tooltip=(
                    "What to do when a LoRA was trained with another layout or base model than this one: "
                    "'error' stops with the fix (default); 'warn' applies it anyway and logs a warning.")),
            ],
            outputs=[
                io.Model.Output(tooltip="A copy of the model with the LoRAs applied; the input model is unchanged."),
                io.String.Output("report", display_name="report", tooltip=(
                    "What was applied and checked: files, strengths, learned gates, warnings; with no LoRA "
                    "selected, that the model passed through unchanged (zero-shot).")),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, sft_lora, ddpo_lora=NONE, **_):
        return file_stamp(sft_lora), file_stamp(ddpo_lora)

    @classmethod
    def execute(cls, model, sft_lora=NONE, sft_strength=1.0, ddpo_lora=NONE, ddpo_strength=1.0,
                on_mismatch="error") -> io.NodeOutput:
        loras = [("sft", sft_lora, lora_path(sft_lora), sft_strength),
                 ("ddpo", ddpo_lora, lora_path(ddpo_lora), ddpo_strength)]
        patched, report = apply_dual_loras(model, loras, on_mismatch)
        return io.NodeOutput(patched, "\n".join(report))
