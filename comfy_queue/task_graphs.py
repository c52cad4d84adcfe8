"""The task workflows (the five dual-reference tasks and one three-reference one) as one graph each:
nodes, widget values, links, groups and notes.

``comfy_queue/build.py`` turns each graph into the UI format (``example_workflows/<task>.json``, what
the ComfyUI frontend saves; listed in its template browser) and the API format
(``comfy_queue/api/<task>.json``, what ``python -m comfy_queue`` fills by node title). Edit the graphs
here and run ``python -m comfy_queue.build``; a test checks the committed JSON equals what it builds.

Every graph is the same pipeline on the standard FLUX.1 Kontext-dev loaders::

    LoadImage x2 -> DualReferenceLoader (+VAE, +CLIPTextEncode of the instruction) -> FluxGuidance 2.5
    UNETLoader -> DiagonalPositionPatch (offset) -> DualLoRAApply (None) -> KSampler (euler/simple,
    28 steps, cfg 1) -> VAEDecode -> SaveImage   (+ VLMJudge -> Preview as Text, bypassed until configured)

The templates run zero-shot as shipped: no DualRef LoRA has been released, so ``sft_lora`` is None and
the layout is ``offset``, the one stock Kontext reads (see ``zero_shot_note``). The model files are the
ones ComfyUI's own Kontext template names, with the same download URLs. The two Load Image nodes name
``example.png``, the picture ComfyUI's own install puts in its ``input/`` folder (its default workflow
loads it), so a template opens with no missing picture and queues as it is; nothing of ours is copied
into the user's folders, and the notes ask the user to upload their own pictures. Only the
instruction, the output canvas and the notes differ per task; the three-reference template
(``two_figures_scene``) adds a third Load Image, wired to the loader's and the judge's ``image_3``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("animal_scene", "person_scene", "group_portrait", "style_transfer", "clothing_replace")
THREE_REFERENCE_TASKS = ("two_figures_scene",)  # judge.manifest.MULTI_TASKS
TEMPLATES = TASKS + THREE_REFERENCE_TASKS  # every workflow the builder writes

UNET = "flux1-dev-kontext_fp8_scaled.safetensors"  # ComfyUI's own Kontext template and tutorial
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "ae.safetensors"
SFT_LORA = "dualref_sft.safetensors"
DDPO_LORA = "dualref_ddpo.safetensors"
MODEL_FILES = {  # file -> ComfyUI models/ subfolder (also the loaders' "models" download hints)
    UNET: "diffusion_models", CLIP_L: "text_encoders", T5XXL: "text_encoders", VAE: "vae",
}
ZERO_SHOT_METHOD = "offset"  # the layout stock Kontext reads without a DualRef LoRA (ComfyUI PR #9356)
NO_LORA = "None"  # DualLoRAApply's choice for no LoRA file
NO_JUDGE_PROFILE = "none configured (see tooltip)"  # VLMJudge's only choice until judges.json has a profile
# Public download URLs the frontend offers when a file is missing: the ones ComfyUI's own Kontext template
# (comfyui-workflow-templates, flux_kontext_dev_basic) carries in its loaders' properties.models.
MODEL_URLS = {
    UNET: "https://huggingface.co/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/"
          "flux1-dev-kontext_fp8_scaled.safetensors",
    CLIP_L: "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    T5XXL: "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors",
    VAE: "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
}

@dataclass(frozen=True)
class Slot:
    name: str
    type: str | None  # None: a value only the frontend keeps (control_after_generate)
    optional: bool = False
    is_list: bool = False


def _slots(spec: str) -> tuple[Slot, ...]:
    """``"name:TYPE name:TYPE? name:TYPE[] name"``: ``?`` optional input, ``[]`` list output,
    no type: a frontend-only widget value."""
    out = []
    for token in spec.split():
        name, _, typ = token.partition(":")
        out.append(Slot(name, typ.rstrip("?[]") or None, typ.endswith("?"), typ.endswith("[]")))
    return tuple(out)


@dataclass(frozen=True)
class NodeType:
    sockets: tuple[Slot, ...]  # inputs drawn as sockets, in the node's input order
    outputs: tuple[Slot, ...]
    widgets: tuple[Slot, ...]  # widget inputs in the frontend's widget (= widgets_values) order
    display: str  # the title the frontend gives the node (the API format's _meta.title)


def _type(sockets: str, outputs: str, widgets: str, display: str) -> NodeType:
    return NodeType(_slots(sockets), _slots(outputs), _slots(widgets), display)


# The node types used; the host tests check every entry against /object_info.
NODE_TYPES = {
    "UNETLoader": _type("", "MODEL:MODEL", "unet_name:COMBO weight_dtype:COMBO", "Load Diffusion Model"),
    "DualCLIPLoader": _type("", "CLIP:CLIP", "clip_name1:COMBO clip_name2:COMBO type:COMBO device:COMBO?",
                            "DualCLIPLoader"),
    "VAELoader": _type("", "VAE:VAE", "vae_name:COMBO", "Load VAE"),
    "LoadImage": _type("", "IMAGE:IMAGE MASK:MASK", "image:COMBO upload:IMAGEUPLOAD", "Load Image"),
    "PrimitiveStringMultiline": _type("", "STRING:STRING", "value:STRING", "String (Multiline)"),
    "CLIPTextEncode": _type("clip:CLIP", "CONDITIONING:CONDITIONING", "text:STRING", "CLIP Text Encode (Prompt)"),
    "FluxGuidance": _type("conditioning:CONDITIONING", "CONDITIONING:CONDITIONING", "guidance:FLOAT", "FluxGuidance"),
    "ConditioningZeroOut": _type("conditioning:CONDITIONING", "CONDITIONING:CONDITIONING", "", "ConditioningZeroOut"),
    "DualReferenceLoader": _type(
        "conditioning:CONDITIONING vae:VAE image_1:IMAGE image_2:IMAGE image_3:IMAGE?",
        "conditioning:CONDITIONING latent:LATENT report:STRING",
        "megapixels:FLOAT crop:BOOLEAN canvas:COMBO width:INT height:INT", "Dual Reference Loader (DualRef)"),
    "DiagonalPositionPatch": _type("model:MODEL", "MODEL:MODEL",
                                   "method:COMBO strength_1:FLOAT strength_2:FLOAT strength_3:FLOAT?",
                                   "Diagonal Position Patch (DualRef)"),
    "DualLoRAApply": _type(
        "model:MODEL", "MODEL:MODEL report:STRING",
        "sft_lora:COMBO sft_strength:FLOAT ddpo_lora:COMBO ddpo_strength:FLOAT on_mismatch:COMBO",
        "Dual LoRA Apply (DualRef)"),
    "KSampler": _type(
        "model:MODEL positive:CONDITIONING negative:CONDITIONING latent_image:LATENT", "LATENT:LATENT",
        "seed:INT control_after_generate steps:INT cfg:FLOAT sampler_name:COMBO scheduler:COMBO denoise:FLOAT",
        "KSampler"),
    "VAEDecode": _type("samples:LATENT vae:VAE", "IMAGE:IMAGE", "", "VAE Decode"),
    "SaveImage": _type("images:IMAGE", "", "filename_prefix:STRING", "Save Image"),
    "VLMJudge": _type(
        "images:IMAGE image_1:IMAGE image_2:IMAGE image_3:IMAGE?",
        "scores:FLOAT[] scores_text:STRING verdict:STRING best_image:IMAGE best_index:INT",
        "instruction:STRING profile:COMBO plan:STRING?", "VLM Judge (DualRef)"),
    "PreviewAny": _type("source:*", "", "", "Preview as Text"),
    "MarkdownNote": _type("", "", "text", "Markdown Note"),
}
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # drawn by the frontend, never sent to the server
FRONTEND_WIDGETS = {"control_after_generate", "upload"}  # widget values the API format leaves out
# Inputs the frontend adds to a node's queued prompt beyond its /object_info inputs (its PreviewAny
# extension draws a text box and a mode toggle and sends both); the server ignores them.
FRONTEND_EXPORTS = {"PreviewAny": {"preview": "", "previewMode": False}}
EXAMPLE_IMAGE = "example.png"  # the picture every ComfyUI install has in input/ (its default workflow loads it)
UPLOAD_LABEL = "choose file to upload"  # how the frontend names LoadImage's upload button
PACK_NODES = {"DualReferenceLoader", "DiagonalPositionPatch", "DualLoRAApply", "VLMJudge"}
PACK_REGISTRY_ID = "dualref"  # pyproject [project].name: how the frontend/Manager name the pack
BYPASS = 4  # LiteGraph node mode: skipped, inputs passed through (Ctrl+B toggles it)


@dataclass(frozen=True)
class Task:
    name: str
    label: str
    role_1: str
    role_2: str
    instruction: str
    tips: str
    canvas: tuple[str, int, int] = ("reference 1", 1024, 1024)
    role_3: str | None = None  # three-reference templates: what image 3 is


TASK_SPECS = {
    "animal_scene": Task(
        "animal_scene", "Animal into a scene", "the scene to edit (a room)",
        "the animal to bring in",
        "Put the dog from image 2 onto the sofa in image 1, sitting on the left cushion and looking at the "
        "camera, matching the room's warm lighting and keeping everything else in the room unchanged.",
        "Say where the animal goes (which piece of furniture, left/right, in front of what) and that the "
        "rest of the scene stays as it is. The output takes image 1's aspect ratio (canvas: reference 1)."),
    "person_scene": Task(
        "person_scene", "Person into a scene", "the scene (a beach at sunset)",
        "the person to place",
        "Place the woman from image 2 on the beach in image 1, standing at the water's edge on the right, "
        "keeping her face, hair and clothes exactly as in image 2 and lighting her with the evening sun of "
        "image 1.",
        "Name what must stay identical (face, hair, clothes) and how the person should fit in: position, "
        "pose, scale, light."),
    "group_portrait": Task(
        "group_portrait", "Group portrait of two people", "the first person",
        "the second person",
        "Make a photo of the man from image 1 and the woman from image 2 standing side by side in a sunny "
        "park, him on the left and her on the right, both smiling at the camera, keeping both faces and "
        "outfits unchanged.",
        "Give each person a side and describe the shared setting. The output canvas is a custom 1024x768 "
        "(landscape) here: set it in Dual Reference Loader.",
        canvas=("custom", 1024, 768)),
    "style_transfer": Task(
        "style_transfer", "Style transfer", "the content (a street photo)",
        "the style (a painting)",
        "Repaint the photo in image 1 in the style of the painting in image 2: its colour palette, thick "
        "brush strokes and canvas texture, keeping the composition and every object of image 1 in place.",
        "Describe the style's traits (palette, strokes, texture) and say that the content and layout of "
        "image 1 stay."),
    "clothing_replace": Task(
        "clothing_replace", "Clothing replacement", "the person to dress",
        "the garment",
        "Dress the person in image 1 in the jacket from image 2, with the jacket's colour, pattern and fit as "
        "in image 2, keeping their face, hair, pose and the background unchanged.",
        "Name the garment and what must not change (face, pose, background). Works best when the garment "
        "in image 2 is fully visible."),
    "two_figures_scene": Task(
        "two_figures_scene", "Two people into a scene (three references)", "the scene (a cafe terrace)",
        "the first person",
        "Seat the woman from image 2 on the left and the man from image 3 on the right at the front table of "
        "the cafe terrace in image 1, keeping both faces, hair and clothes exactly as in images 2 and 3 and "
        "lighting them with the afternoon sun of image 1.",
        "Give each person a side and say what must stay identical. Three 1 MP references and a 1 MP canvas "
        "are ~16k image tokens, 4x plain Flux: lower megapixels in Dual Reference Loader to go faster.",
        role_3="the second person"),
}


def template_title(task: str) -> str:
    """The UI template's file stem, which is also its title in ComfyUI's template browser (the frontend
    shows an extension template's file name as its title): readable words, e.g. "Animal into a scene"."""
    return TASK_SPECS[task].label


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets: dict = field(default_factory=dict)  # widget name -> value, every widget of the type
    title: str | None = None  # None: the type's display name
    mode: int = 0
    color: tuple[str, str] | None = None  # (title colour, body colour)
    models: tuple[str, ...] = ()  # model files it loads (download hints for the frontend)


@dataclass
class Graph:
    name: str
    nodes: list[Node]
    links: list[tuple[int, int, int, str]]  # (origin node, origin output, target node, target input name)
    groups: list[tuple[str, tuple[float, float, float, float], str]]  # (title, x y w h, colour)
    view: tuple[float, float, float]  # (scale, offset x, offset y) the canvas opens at


NOTE_COLOR = ("#432", "#653")  # ComfyUI's yellow note colours
INPUT_COLOR = ("#223", "#335")  # blue: what the user sets
INSTRUCTION_COLOR = ("#232", "#353")  # green: the prompt, as in ComfyUI's templates


def models_note() -> str:
    return (
        "## Model files\n\n"
        "The files ComfyUI's own Kontext template uses (the loaders offer to download a missing one):\n\n"
        "| file | folder |\n|---|---|\n"
        f"| [`{UNET}`]({MODEL_URLS[UNET]}) | `models/diffusion_models/` |\n"
        f"| [`{CLIP_L}`]({MODEL_URLS[CLIP_L]}) | `models/text_encoders/` |\n"
        f"| [`{T5XXL}`]({MODEL_URLS[T5XXL]}) (or `t5xxl_fp16`, then select it) | `models/text_encoders/` |\n"
        f"| [`{VAE}`]({MODEL_URLS[VAE]}) (the FLUX VAE) | `models/vae/` |\n\n"
        "The full-precision `flux1-kontext-dev.safetensors` "
        "([FLUX.1 Kontext-dev](https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev), accept its "
        "licence first) works too: select it in **Load Diffusion Model**.\n\n"
        + zero_shot_note()
    )


def zero_shot_note() -> str:
    return (
        "## Without a LoRA (as shipped) and with one\n\n"
        f"No DualRef LoRA is needed to run this template: **Dual LoRA Apply** starts at `sft_lora: {NO_LORA}` "
        "(stock Kontext-dev, zero-shot) and **Diagonal Position Patch** at `method: "
        f"{ZERO_SHOT_METHOD}`, which puts both references side by side at one RoPE index, like the stitched "
        "picture stock Kontext already reads (ComfyUI PR #9356). Expect image 1 to be edited as asked and image "
        "2 to be followed less reliably than with a trained LoRA; raise `strength_2` when image 2 is ignored.\n\n"
        f"**With a LoRA** (e.g. `{SFT_LORA}` from `python -m training.sft`, optionally `{DDPO_LORA}` from "
        "`python -m training.ddpo`): put it in `models/loras/`, refresh the page, select it in `sft_lora` "
        "(and `ddpo_lora`), and set the patch's method to the layout it was trained with (`diagonal` for the "
        "paper's); Dual LoRA Apply stops with the fix when they differ."
    )


def task_note(task: Task) -> str:
    if task.role_3:  # three references: image 3 goes to the loader's and the judge's image_3
        return (
            f"## DualRef: {task.label.lower()}\n\n"
            f"1. **image 1**: {task.role_1}; **image 2**: {task.role_2}; **image 3**: {task.role_3}. The three "
            f"Load Image nodes start on ComfyUI's own `{EXAMPLE_IMAGE}`: upload your pictures there (choose file "
            "to upload, or drop a file on the node).\n"
            "2. Write the edit in **instruction**; refer to the pictures as *image 1*, *image 2* and *image 3*.\n"
            f"3. Queue. {task.tips}\n\n"
            "Dual Reference Loader takes image 3 on its optional **image_3** input and places it past reference "
            "2 on the diagonal; Diagonal Position Patch's **strength_3** weighs it like the other two. Without "
            "a LoRA trained on three references, expect image 3 to be followed less reliably than images 1 and 2."
        )
    return (
        f"## DualRef: {task.label.lower()}\n\n"
        f"1. **image 1**: {task.role_1}; **image 2**: {task.role_2}. Both Load Image nodes start on "
        f"ComfyUI's own `{EXAMPLE_IMAGE}`: upload your pictures there (choose file to upload, or drop a file "
        "on the node).\n"
        "2. Write the edit in **instruction**; refer to the pictures as *image 1* and *image 2*.\n"
        f"3. Queue. {task.tips}\n\n"
        "Dual Reference Loader scales each picture to about 1 megapixel, keeping its own aspect ratio; its "
        "**report** shows the sizes and image tokens (two 1 MP references and a 1 MP canvas are ~12k tokens, "
        "3x plain Flux, so a run takes about three times as long). Diagonal Position Patch gives the two "
        "references their RoPE positions; its strengths weigh how much the output follows each reference."
    )


def judge_note() -> str:
    return (
        "## Optional: VLM judge (bypassed)\n\n"
        "Scores the output with the paper's three yes/no questions. Configure a profile in "
        "`ComfyUI/user/__dualref/judges.json` (endpoint URL, model, and the *name* of the environment "
        "variable that holds the key; never the key itself), pick it in **profile**, then select both "
        "nodes in this group and press Ctrl+B."
    )


def task_graph(name: str) -> Graph:
    """The graph of one task, laid out in five columns left to right."""
    task = TASK_SPECS[name]
    canvas, width, height = task.canvas
    nodes = [
        Node(1, "UNETLoader", (20, 80), (320, 82), {"unet_name": UNET, "weight_dtype": "default"}, models=(UNET,)),
        Node(2, "DualCLIPLoader", (20, 200), (320, 130),
             {"clip_name1": CLIP_L, "clip_name2": T5XXL, "type": "flux", "device": "default"}, models=(CLIP_L, T5XXL)),
        Node(3, "VAELoader", (20, 370), (320, 58), {"vae_name": VAE}, models=(VAE,)),
        Node(4, "DiagonalPositionPatch", (20, 540), (320, 130),
             {"method": ZERO_SHOT_METHOD, "strength_1": 1.0, "strength_2": 1.0, "strength_3": 1.0}),
        Node(5, "DualLoRAApply", (20, 710), (320, 178),
             {"sft_lora": NO_LORA, "sft_strength": 1.0, "ddpo_lora": NO_LORA, "ddpo_strength": 1.0,
              "on_mismatch": "error"}),
        Node(6, "LoadImage", (400, 80), (300, 340), {"image": EXAMPLE_IMAGE, "upload": "image"}, title="image 1",
             color=INPUT_COLOR),
        Node(7, "LoadImage", (720, 80), (300, 340), {"image": EXAMPLE_IMAGE, "upload": "image"}, title="image 2",
             color=INPUT_COLOR),
        Node(8, "PrimitiveStringMultiline", (400, 460), (620, 150), {"value": task.instruction},
             title="instruction", color=INSTRUCTION_COLOR),
        Node(9, "CLIPTextEncode", (1080, 80), (330, 88), {"text": ""}),  # the text comes from "instruction"
        Node(10, "DualReferenceLoader", (1080, 210), (330, 250),
             {"megapixels": 1.0, "crop": False, "canvas": canvas, "width": width, "height": height}),
        Node(11, "FluxGuidance", (1080, 500), (330, 58), {"guidance": 2.5}),
        Node(12, "ConditioningZeroOut", (1080, 598), (330, 26)),
        Node(13, "KSampler", (1470, 80), (320, 262),
             {"seed": 42, "control_after_generate": "randomize", "steps": 28, "cfg": 1.0, "sampler_name": "euler",
              "scheduler": "simple", "denoise": 1.0}),
        Node(14, "VAEDecode", (1470, 380), (320, 46)),
        Node(15, "SaveImage", (1810, 80), (440, 520), {"filename_prefix": f"DualRef/{name}"}, title="output"),
        Node(16, "VLMJudge", (1470, 730), (320, 246),
             {"instruction": "", "profile": NO_JUDGE_PROFILE, "plan": ""}, mode=BYPASS),
        Node(17, "PreviewAny", (1810, 730), (440, 246), mode=BYPASS),
        Node(18, "MarkdownNote", (-560, 30), (540, 560), {"text": models_note()}, title="Model files",
             color=NOTE_COLOR),
        Node(19, "MarkdownNote", (-560, 640), (540, 380), {"text": task_note(task)}, title="How to use",
             color=NOTE_COLOR),
        Node(20, "MarkdownNote", (1080, 730), (330, 246), {"text": judge_note()}, title="About the judge",
             color=NOTE_COLOR),
        Node(21, "PreviewAny", (1470, 470), (320, 150), title="sizes and tokens"),
    ]
    links = [
        (1, 0, 4, "model"), (4, 0, 5, "model"), (5, 0, 13, "model"),
        (2, 0, 9, "clip"), (8, 0, 9, "text"),
        (9, 0, 10, "conditioning"), (3, 0, 10, "vae"), (6, 0, 10, "image_1"), (7, 0, 10, "image_2"),
        (10, 0, 11, "conditioning"), (11, 0, 13, "positive"), (9, 0, 12, "conditioning"), (12, 0, 13, "negative"),
        (10, 1, 13, "latent_image"), (13, 0, 14, "samples"), (3, 0, 14, "vae"), (14, 0, 15, "images"),
        (14, 0, 16, "images"), (6, 0, 16, "image_1"), (7, 0, 16, "image_2"), (8, 0, 16, "instruction"),
        (16, 1, 17, "source"), (10, 2, 21, "source"),
    ]
    groups = [
        ("1  Models", (0, 0, 360, 450), "#88A"),
        ("2  Dual-reference model", (0, 470, 360, 450), "#8A8"),
        ("3  References and instruction", (380, 0, 660, 640), "#b58b2a"),
        ("4  Conditioning", (1060, 0, 370, 640), "#8AA"),
        ("5  Sample and save", (1450, 0, 820, 640), "#3f789e"),
        ("Optional: VLM judge (bypassed)", (1060, 660, 1210, 340), "#444"),
    ]
    if task.role_3:  # three pictures side by side where two were, the third feeding both image_3 inputs
        for node, x in zip(nodes[5:7], (400, 613)):
            node.pos, node.size = (x, 80), (200, 340)
        nodes.append(Node(22, "LoadImage", (826, 80), (200, 340), {"image": EXAMPLE_IMAGE, "upload": "image"},
                          title="image 3", color=INPUT_COLOR))
        links += [(22, 0, 10, "image_3"), (22, 0, 16, "image_3")]
    # Opens at 65% zoom (LiteGraph hides widgets below 60%) with everything in a 1920x1080 window.
    return Graph(name, nodes, links, groups, view=(0.65, 640, 154))
