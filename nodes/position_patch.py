"""DiagonalPositionPatch: place two (or three) reference latents on Kontext's RoPE grid (MODEL -> MODEL)."""
from comfy_api.latest import io

from ..dual_rope.comfy_adapter import apply_position_patch
from ..dual_rope.layout import DEFAULT_METHOD, METHODS

METHOD_HELP = (
    "diagonal (default, the paper's): reference 1 exactly as native Kontext, reference 2 starts past "
    "reference 1's bottom-right corner (reference 3 past reference 2's), so no two references share a row or "
    "a column; "
    "offset: ComfyUI's default mosaic at index 1; index: reference k at RoPE index k; "
    "uxo: UNO's diagonal at index 0 past the output canvas. "
    "Without a DualRef LoRA (zero-shot) use offset: it places the two references side by side like the "
    "stitched picture stock Kontext already reads (ComfyUI PR #9356). With a LoRA use the layout it was "
    "trained with (diagonal for the paper's); Dual LoRA Apply checks it."
)


def strength_input(k: int, optional: bool = False) -> io.Float.Input:
    return io.Float.Input(
        f"strength_{k}", default=1.0, min=0.0, max=5.0, step=0.01, optional=optional,
        tooltip=(
            f"How much the output attends to reference {k}: multiplies every query's attention on its "
            "tokens. 1 = unchanged (no extra cost), 0 = reference left out entirely, >1 = stronger."
            + (" Used only when a third reference is given (DualReferenceLoader's image_3)." if optional else "")
        ),
    )


class DiagonalPositionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DiagonalPositionPatch",
            display_name="Diagonal Position Patch (DualRef)",
            category="DualRef/model",
            description=(
                "Patches a FLUX.1 Kontext model so reference latents in the conditioning (from "
                "DualReferenceLoader or chained ReferenceLatent nodes) are placed with the chosen RoPE "
                "layout, with one strength per reference. With one reference, 'diagonal' and strength 1 "
                "the output is identical to unpatched Kontext. Overrides the conditioning's reference method."
            ),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "A FLUX.1 Kontext-dev diffusion model (e.g. from Load Diffusion Model).")),
                io.Combo.Input("method", options=list(METHODS), default=DEFAULT_METHOD, tooltip=METHOD_HELP),
                strength_input(1),
                strength_input(2),
                strength_input(3, optional=True),  # optional: workflows saved before it load unchanged
            ],
            outputs=[
                io.Model.Output(tooltip="A patched copy of the model; the input model is left unchanged."),
            ],
        )

    @classmethod
    def execute(cls, model, method, strength_1, strength_2, strength_3=1.0) -> io.NodeOutput:
        # a missing strength means 1, so strength_3 = 1 leaves the settings exactly as two strengths give them
        strengths = (strength_1, strength_2) + ((strength_3,) if strength_3 != 1.0 else ())
        return io.NodeOutput(apply_position_patch(model, method, strengths))
