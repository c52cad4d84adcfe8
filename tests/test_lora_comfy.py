"""DualRef LoRA files in the real ComfyUI host vs diffusers + peft (issue 4, items 4-6).

One width-3072 FLUX.1 (ComfyUI's Flux detection fixes 24 heads and RoPE axes (16, 56, 56)) with
one double and one single block and small text/pooled widths: ~0.5B float32 parameters, seeded
random weights in BFL names. diffusers gets it through its own single-file converter; ComfyUI
through its own detection (``comfy.sd.load_diffusion_model_state_dict``). The LoRA file is written
by ``save_lora``; ComfyUI applies it with its core loader, diffusers with its Flux LoRA loader.
At most about two copies of the model are alive at once (the diffusers stage is freed first).
"""
import gc
import importlib
import logging

import pytest
import torch

from comfy_models import build_flux, conditioning, flux_shapes, flux_unet_config, random_state_dict
from dual_rope.lora_meta import LoraMetadata, base_fingerprint, lora_content_hash
from hostile_headers import hostile_headers
from training.lora_io import save_lora

pytestmark = pytest.mark.host
log = logging.getLogger(__name__)

SEED, RANK, ALPHA = 11, 4, 2.0  # alpha != rank: a side that ignored alpha would be off by 2x
CONTEXT, VEC, GUIDANCE = 64, 32, 2.5
TARGET_HW, REF_HWS = (8, 8), [(8, 8), (6, 10)]  # latent sizes; reference 2 has its own aspect ratio
BLOCK_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2", "norm1.linear", "norm1_context.linear",
]
SINGLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
TOP_TARGETS = ["x_embedder", "context_embedder", "proj_out", "norm_out.linear"]  # norm_out: ComfyUI swaps halves


def comfy_config():
    return flux_unet_config(hidden=3072, heads=24, axes=(16, 56, 56), depth=1, single=1, context=CONTEXT, vec=VEC)


def diffusers_config():
    return dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=CONTEXT, pooled_projection_dim=VEC,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def random_lora(shapes: dict, seed: int) -> dict:
    """peft-style LoRA state dict: A ~ N(0, 1/in), B ~ N(0, 0.05/r) so B@A@x is ~20% of W@x."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, (out_dim, in_dim) in sorted(shapes.items()):
        out[f"{module}.lora_A.weight"] = torch.randn(RANK, in_dim, generator=gen) / in_dim ** 0.5
        out[f"{module}.lora_B.weight"] = torch.randn(out_dim, RANK, generator=gen) * (0.05 / RANK) ** 0.5
    return out


def target_shapes(model) -> dict:
    names = [f"transformer_blocks.0.{t}" for t in BLOCK_TARGETS]
    names += [f"single_transformer_blocks.0.{t}" for t in SINGLE_TARGETS] + TOP_TARGETS
    modules = dict(model.named_modules())
    return {n: tuple(modules[n].weight.shape) for n in names}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(5)
    return dict(
        noise=torch.randn(1, 16, *TARGET_HW, generator=gen),
        refs=[torch.randn(1, 16, h, w, generator=gen) for h, w in REF_HWS],  # VAE space, as ReferenceLatent gets them
        context=torch.randn(1, 6, CONTEXT, generator=gen),
        pooled=torch.randn(1, VEC, generator=gen),
    )


@pytest.fixture(scope="module")
def reference(comfy_host, inputs, tmp_path_factory):
    """diffusers + peft stage: LoRA files written, velocities computed, model freed."""
    import comfy.latent_formats
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from dual_rope.diffusers_adapter import dual_reference_forward, prepare_references
    from training.lora_io import apply_lora_diffusers, transformer_fingerprint

    loras = tmp_path_factory.mktemp("loras")
    bfl = random_state_dict(flux_shapes(comfy_config()), SEED)
    fp_bfl = base_fingerprint(bfl.__getitem__, 1, 1, naming="bfl")
    converted = convert_flux_transformer_checkpoint_to_diffusers(bfl)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**diffusers_config())
    model.load_state_dict(converted, strict=True, assign=True)  # shares the tensors: one copy
    del bfl, converted
    model.eval()
    fingerprint = transformer_fingerprint(model)
    shapes = target_shapes(model)
    lora = random_lora(shapes, seed=3)
    common = dict(rank=RANK, alpha=ALPHA, base_fingerprint=fingerprint, train={"steps": 1, "precision": "fp32"})
    save_lora(loras / "dual_sft.safetensors", lora, dict(layout="diagonal", stage="sft", gates=[1.0, 0.5], **common))
    save_lora(loras / "dual_offset.safetensors", lora, dict(layout="offset", stage="sft", **common))
    other_base = dict(common, base_fingerprint=fingerprint[:-16] + "0" * 16)
    save_lora(loras / "other_base.safetensors", lora, dict(layout="diagonal", stage="sft", **other_base))
    sft_hash = lora_content_hash(loras / "dual_sft.safetensors")
    ddpo = random_lora({k: v for k, v in shapes.items() if ".attn." in k}, seed=4)
    save_lora(loras / "dual_ddpo.safetensors", ddpo, dict(layout="diagonal", stage="ddpo", sft_lora=sft_hash, **common))
    save_lora(loras / "ddpo_elsewhere.safetensors", ddpo,
              dict(layout="diagonal", stage="ddpo", sft_lora="0" * 64, **common))

    latent_in = comfy.latent_formats.Flux().process_in  # what ComfyUI's Flux does to reference latents
    refs = [latent_in(r) for r in inputs["refs"]]

    def velocity(gates=None):
        sequence = prepare_references(TARGET_HW, refs, "diagonal", gates)
        with torch.no_grad():
            return dual_reference_forward(model, inputs["noise"], sequence, inputs["context"], inputs["pooled"],
                                          torch.tensor([1.0]), torch.tensor([GUIDANCE]))

    base = velocity()
    apply_lora_diffusers(model, loras / "dual_sft.safetensors")
    with_lora, with_gates = velocity(), velocity(gates=[1.0, 0.5])
    del model
    gc.collect()
    return dict(loras=loras, fingerprint=fingerprint, fp_bfl=fp_bfl, base=base, lora=with_lora, gated=with_gates)


@pytest.fixture(scope="module")
def comfy_model(reference):
    """The same weights loaded by ComfyUI's own detection (after the diffusers stage is freed)."""
    import comfy.model_management
    import comfy.sd
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(reference["loras"]))
    sd = random_state_dict(flux_shapes(comfy_config()), SEED)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    del sd
    gc.collect()
    assert type(model.model).__name__ == "Flux" and model.model.diffusion_model.hidden_size == 3072
    yield model
    comfy.model_management.unload_all_models()
    del model
    gc.collect()


@pytest.fixture(scope="module")
def nodes_(pack):
    load = lambda name: importlib.import_module(f"{pack.__name__}.nodes.{name}")  # noqa: E731
    return load("position_patch").DiagonalPositionPatch, load("lora_apply").DualLoRAApply


def patched(nodes_, model, method="diagonal"):
    return nodes_[0].execute(model, method, 1.0, 1.0).result[0]


def apply(nodes_, model, sft="dual_sft.safetensors", s=1.0, ddpo="None", d=1.0, on_mismatch="error"):
    return nodes_[1].execute(model, sft, s, ddpo, d, on_mismatch).result


def velocity(model, inputs):
    """One real ComfyUI Euler step from sigma 1 to 0 (KSampler's path), read back as the velocity."""
    import comfy.sample

    positive = conditioning(inputs["context"], inputs["pooled"], inputs["refs"], guidance=GUIDANCE)
    latent = torch.zeros_like(inputs["noise"])
    out = comfy.sample.sample(model, inputs["noise"], 1, 1.0, "euler", "simple", positive, positive, latent,
                              disable_pbar=True, seed=0)
    return inputs["noise"] - model.model.latent_format.process_in(out)  # x0 = noise - v at sigma 1


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fingerprint_is_the_same_in_bfl_diffusers_and_comfyui(reference, comfy_model, pack):
    comfy_lora = importlib.import_module(f"{pack.__name__}.dual_rope.comfy_lora")
    assert reference["fingerprint"] == reference["fp_bfl"]
    assert reference["fingerprint"].startswith("flux1:d1s1w3072c64:")
    assert comfy_lora.model_fingerprint(comfy_model) == (reference["fingerprint"], "")


def test_comfyui_equals_diffusers_and_core_loader_loads_cleanly(reference, comfy_model, nodes_, inputs, caplog):
    import nodes as comfy_nodes  # ComfyUI's own node module (LoraLoaderModelOnly)

    base_model = patched(nodes_, comfy_model)
    base = velocity(base_model, inputs)
    err = rel_err(base, reference["base"])
    log.info("patched base, ComfyUI vs diffusers: relative error %.2e", err)
    assert err <= 1e-5  # same model, same layout, both hosts

    with caplog.at_level(logging.WARNING):
        core = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, "dual_sft.safetensors", 1.0)[0]
    noisy = [r.getMessage() for r in caplog.records if "lora" in r.getMessage().lower()]
    assert not noisy, noisy  # no "lora key not loaded" / "NOT LOADED"
    # 24 modules on 17 ComfyUI weights (q/k/v and proj_mlp are slices of fused weights)
    assert len(core.patches) == 17 and sum(map(len, core.patches.values())) == 24
    err = rel_err(velocity(core, inputs), reference["lora"])
    log.info("LoraLoaderModelOnly vs diffusers+peft: relative error %.2e (LoRA effect %.2e)", err,
             rel_err(reference["lora"], reference["base"]))
    assert err <= 1e-5, f"core LoraLoaderModelOnly vs diffusers+peft: relative error {err:.2e}"
    assert rel_err(reference["lora"], reference["base"]) > 1e-2  # the LoRA changes the output

    ours, report = apply(nodes_, base_model)  # + learned gates [1, 0.5] on the references
    assert "learned gates [1.0, 0.5] applied" in report
    err = rel_err(velocity(ours, inputs), reference["gated"])
    log.info("DualLoRAApply (learned gates) vs diffusers+peft: relative error %.2e", err)
    assert err <= 1e-5, f"DualLoRAApply vs diffusers+peft with the same gates: relative error {err:.2e}"
    assert rel_err(reference["gated"], reference["lora"]) > 1e-3  # the gates matter


def test_strength_zero_is_the_patched_base_exactly(reference, comfy_model, nodes_, inputs):
    base_model = patched(nodes_, comfy_model)
    zero, report = apply(nodes_, base_model, s=0.0)
    assert "no LoRA applied" in report
    assert torch.equal(velocity(zero, inputs), velocity(base_model, inputs))


def test_no_lora_is_the_zero_shot_path_and_the_report_says_so(reference, comfy_model, nodes_, inputs):
    """sft_lora None (the templates' default, no LoRA released yet): the patched base passes through."""
    base_model = patched(nodes_, comfy_model, method="offset")
    model, report = apply(nodes_, base_model, sft="None")
    assert "no LoRA selected: the patched base model passes through unchanged (zero-shot)" in report
    assert model is not base_model and not model.patches
    assert torch.equal(velocity(model, inputs), velocity(base_model, inputs))
    # A DDPO LoRA without its SFT LoRA is still applied, with a warning to select the SFT one.
    _, report = apply(nodes_, patched(nodes_, comfy_model), sft="None", ddpo="dual_ddpo.safetensors")
    assert "ddpo: dual_ddpo.safetensors" in report and "select that SFT LoRA too" in report


def test_layout_and_base_mismatches_say_how_to_fix(reference, comfy_model, nodes_, pack):
    comfy_lora = importlib.import_module(f"{pack.__name__}.dual_rope.comfy_lora")
    diagonal = patched(nodes_, comfy_model)
    with pytest.raises(comfy_lora.LoraMismatchError, match="add DiagonalPositionPatch with method 'diagonal'"):
        apply(nodes_, comfy_model)
    with pytest.raises(comfy_lora.LoraMismatchError, match="set DiagonalPositionPatch's method to 'offset'"):
        apply(nodes_, diagonal, sft="dual_offset.safetensors")
    with pytest.raises(comfy_lora.LoraMismatchError, match="other_base.safetensors was trained on another base"):
        apply(nodes_, diagonal, sft="other_base.safetensors")
    model, report = apply(nodes_, diagonal, sft="other_base.safetensors", on_mismatch="warn")
    assert "warning: other_base.safetensors was trained on another base" in report and model.patches
    # DDPO on its own SFT LoRA: quiet; on another one: a warning
    both, report = apply(nodes_, diagonal, ddpo="dual_ddpo.safetensors")
    assert "warning" not in report and "ddpo: dual_ddpo.safetensors" in report
    assert len(both.patches["diffusion_model.double_blocks.0.img_attn.qkv.weight"]) == 2 * 3  # q/k/v of each LoRA
    _, report = apply(nodes_, diagonal, ddpo="ddpo_elsewhere.safetensors")
    assert "trained on top of another SFT LoRA than dual_sft.safetensors" in report


def test_bad_files_and_other_models_are_named(reference, comfy_model, nodes_, pack):
    from safetensors.torch import save_file

    meta = importlib.import_module(f"{pack.__name__}.dual_rope.lora_meta")
    loras, diagonal = reference["loras"], patched(nodes_, comfy_model)
    data = (loras / "dual_sft.safetensors").read_bytes()
    (loras / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(meta.LoraFileError, match=r"cut\.safetensors.*truncated"):
        apply(nodes_, diagonal, sft="cut.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              loras / "sd15_style.safetensors")
    with pytest.raises(meta.LoraFileError, match=r"sd15_style\.safetensors.*Stable Diffusion"):
        apply(nodes_, diagonal, sft="sd15_style.safetensors")
    wrong = {"context_embedder.lora_A.weight": torch.zeros(RANK, 4096),  # a T5-width text input: another model
             "context_embedder.lora_B.weight": torch.zeros(3072, RANK)}
    save_lora(loras / "wide_text.safetensors", wrong, LoraMetadata("diagonal", "sft", RANK, ALPHA))
    with pytest.raises(meta.LoraFileError, match=r"wide_text\.safetensors.*another shape.*made for another model"):
        apply(nodes_, diagonal, sft="wide_text.safetensors")


def test_hostile_headers_get_a_refusal_naming_the_file(nodes_, pack, tmp_path):
    """Issue 18 item 4 through the node: a RecursionError and an empty "keys like " message before."""
    import folder_paths

    meta = importlib.import_module(f"{pack.__name__}.dual_rope.lora_meta")
    folder = tmp_path / "hostile_loras"
    folder.mkdir()
    files = hostile_headers(folder)
    folder_paths.add_model_folder_path("loras", str(folder))
    model = patched(nodes_, build_flux(seed=3))  # a tiny Flux: the header is refused before the weights matter
    for name, (path, reason) in files.items():
        with pytest.raises(meta.LoraFileError, match=rf"{path.name}'?: .*{reason}") as err:
            apply(nodes_, model, sft=path.name)
        assert "keys like )" not in str(err.value)
        with pytest.raises(meta.LoraFileError, match=rf"{path.name}'?: .*{reason}"):
            apply(nodes_, model, sft=path.name, s=0.0)  # even unused, a selected file is read and refused
    files["big"][0].unlink()  # 136 MB: pytest keeps the last runs' folders


def test_node_schema_lists_loras_and_documents_every_socket(comfy_model, nodes_):
    info = nodes_[1].GET_NODE_INFO_V1()  # what /object_info serves
    assert info["category"] == "DualRef/LoRA" and info["description"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert "dual_sft.safetensors" in inputs["sft_lora"][1]["options"]  # the models/loras folder
    assert inputs["sft_lora"][1]["options"][0] == "None" and inputs["sft_lora"][1]["default"] == "None"
    assert "'offset'" in inputs["sft_lora"][1]["tooltip"] and "zero-shot" in inputs["sft_lora"][1]["tooltip"]
    assert info["output_name"] == ["MODEL", "report"]
    patch = nodes_[0].GET_NODE_INFO_V1()["input"]["required"]["method"][1]["tooltip"]
    assert "Without a DualRef LoRA (zero-shot) use offset" in patch
    assert inputs["ddpo_lora"][1]["options"][0] == "None" and inputs["ddpo_lora"][1]["default"] == "None"
    assert all(spec[1].get("tooltip") for name, spec in inputs.items() if name != "model") and inputs["model"][1]["tooltip"]
    assert all(info["output_tooltips"]) and len(info["output_tooltips"]) == 2
