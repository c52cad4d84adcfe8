"""Model loading with no network (issue 4 part 2) and the tiny model factory (issue 3 part 3)."""
import gc
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sft_helpers import micro_model
from training.model_files import ModelFileError, classify_keys, load_transformer_file, read_header
from training.models import KONTEXT_CONFIGS, find_tokenizers, load_kontext


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def bundle(micro):
    return load_kontext(micro)


def test_toy_folder_loads_through_the_kontext_loader(bundle):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    t = bundle.transformer
    assert isinstance(t, FluxTransformer2DModel) and t.config.guidance_embeds
    assert (t.config.num_layers, t.config.num_single_layers, t.config.num_attention_heads) == (2, 2, 4)
    assert 1.5e6 < sum(p.numel() for p in t.parameters()) < 3e6
    assert isinstance(bundle.vae, AutoencoderKL) and bundle.vae.config.latent_channels == 16
    assert bundle.vae_scale_factor == 4 and bundle.pixel_multiple == 8
    assert isinstance(bundle.text_encoder, CLIPTextModel) and isinstance(bundle.text_encoder_2, T5EncoderModel)
    assert not any(p.requires_grad for p in bundle.text_encoder_2.parameters())
    latents = bundle.encode_images(torch.zeros(2, 3, 64, 64))
    assert latents.shape == (2, 16, 16, 16)  # 64 px -> 16x16 latents -> 64 tokens
    assert bundle.decode_latents(latents).shape == (2, 3, 64, 64)
    embeds, pooled = bundle.encode_prompts(["put the red circle at the top left", "remove the square"])
    assert embeds.shape == (2, 48, 64) and pooled.shape == (2, 64)
    assert not torch.equal(embeds[0], embeds[1]) and not torch.equal(pooled[0], pooled[1])
    ids = bundle.tokenizer_2("put the zebra at the top").input_ids
    assert bundle.tokenizer_2.unk_token_id in ids and ids[-1] == bundle.tokenizer_2.eos_token_id


def test_diffusers_reads_the_toy_folder_as_a_kontext_pipeline(micro):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(str(micro), local_files_only=True)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16


def test_fingerprints_are_content_hashes(micro, tmp_path):
    a, b = load_kontext(micro), load_kontext(micro)
    for part in ("transformer", "vae", "text"):
        assert a.fingerprint(part) == b.fingerprint(part)
    assert a.base_fingerprint().startswith("flux1:d2s2w128c64:")
    copy = shutil.copytree(micro, tmp_path / "copy")
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1e-3
    save_file(state, weights)
    c = load_kontext(copy)
    assert c.fingerprint("vae") != a.fingerprint("vae")
    assert c.fingerprint("transformer") == a.fingerprint("transformer") and c.fingerprint("text") == a.fingerprint("text")


def _bfl_flux_shapes(width=3072, depth=1, single=1, context=4096, pooled=768, channels=64, mlp=4):
    """Tensor shapes of a BFL-format FLUX.1 checkpoint (as flux1-kontext-dev.safetensors names them)."""
    head, hidden = 128, width * mlp
    shapes = {"img_in.weight": (width, channels), "img_in.bias": (width,), "txt_in.weight": (width, context),
              "txt_in.bias": (width,), "final_layer.linear.weight": (channels, width), "final_layer.linear.bias": (channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * width, width), "final_layer.adaLN_modulation.1.bias": (2 * width,)}
    for name, n_in in (("time_in", 256), ("vector_in", pooled), ("guidance_in", 256)):
        shapes.update({f"{name}.in_layer.weight": (width, n_in), f"{name}.in_layer.bias": (width,),
                       f"{name}.out_layer.weight": (width, width), f"{name}.out_layer.bias": (width,)})
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            shapes.update({f"{p}_mod.lin.weight": (6 * width, width), f"{p}_mod.lin.bias": (6 * width,),
                           f"{p}_attn.qkv.weight": (3 * width, width), f"{p}_attn.qkv.bias": (3 * width,),
                           f"{p}_attn.norm.query_norm.scale": (head,), f"{p}_attn.norm.key_norm.scale": (head,),
                           f"{p}_attn.proj.weight": (width, width), f"{p}_attn.proj.bias": (width,),
                           f"{p}_mlp.0.weight": (hidden, width), f"{p}_mlp.0.bias": (hidden,),
                           f"{p}_mlp.2.weight": (width, hidden), f"{p}_mlp.2.bias": (width,)})
    for i in range(single):
        p = f"single_blocks.{i}"
        shapes.update({f"{p}.linear1.weight": (3 * width + hidden, width), f"{p}.linear1.bias": (3 * width + hidden,),
                       f"{p}.linear2.weight": (width, width + hidden), f"{p}.linear2.bias": (width,),
                       f"{p}.norm.query_norm.scale": (head,), f"{p}.norm.key_norm.scale": (head,),
                       f"{p}.modulation.lin.weight": (3 * width, width), f"{p}.modulation.lin.bias": (3 * width,)})
    return shapes


def test_bfl_single_file_transformer_converts_through_diffusers(tmp_path):
    """Width 3072 (diffusers' converter assumes FLUX.1's width), depth 1/1: ~0.5B params in bf16."""
    config_root = tmp_path / "configs"
    (config_root / "transformer").mkdir(parents=True)
    kontext = json.loads((KONTEXT_CONFIGS / "transformer" / "config.json").read_text())
    (config_root / "transformer" / "config.json").write_text(json.dumps(dict(kontext, num_layers=1, num_single_layers=1)))
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g, dtype=torch.bfloat16) * 0.02 for k, s in _bfl_flux_shapes().items()}
    path = tmp_path / "flux1-kontext-dev.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, path)  # ComfyUI checkpoints nest it
    model = load_transformer_file(path, config_root, torch.bfloat16)
    try:
        assert not any(p.is_meta for p in model.parameters())
        block = model.transformer_blocks[0]
        qkv = state["double_blocks.0.img_attn.qkv.weight"]
        assert torch.equal(block.attn.to_q.weight, qkv[:3072]) and torch.equal(block.attn.to_v.weight, qkv[6144:])
        assert torch.equal(block.attn.add_k_proj.weight, state["double_blocks.0.txt_attn.qkv.weight"][3072:6144])
        linear1 = state["single_blocks.0.linear1.weight"]
        single = model.single_transformer_blocks[0]
        assert torch.equal(single.attn.to_k.weight, linear1[3072:6144]) and torch.equal(single.proj_mlp.weight, linear1[9216:])
        shift, scale = state["final_layer.adaLN_modulation.1.weight"].chunk(2)
        assert torch.equal(model.norm_out.linear.weight, torch.cat([scale, shift]))  # BFL (shift, scale) swapped
        assert torch.equal(model.time_text_embed.guidance_embedder.linear_1.weight, state["guidance_in.in_layer.weight"])
    finally:
        del model, state
        gc.collect()


def test_wrong_truncated_and_pickle_files_get_clear_errors(micro, tmp_path):
    vae_file = micro / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelFileError, match=r"given as the transformer, but it is a VAE .* Fix: .*model\.vae") as err:
        load_transformer_file(vae_file, micro)
    assert str(vae_file) in str(err.value)
    cut = tmp_path / "flux1-kontext-dev.safetensors"
    data = (micro / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"flux1-kontext-dev\.safetensors: truncated: .* Fix: download or copy"):
        load_kontext(transformer=cut, vae=vae_file, clip_l=cut, t5=cut, tokenizers=micro)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(ModelFileError, match="pickle checkpoints are not loaded"):
        read_header(pickle)
    with pytest.raises(ModelFileError, match="not a diffusers model folder"):
        load_kontext(tmp_path)
    clip_file = micro / "text_encoder" / "model.safetensors"
    with pytest.raises(ModelFileError, match=r"given as the T5-XXL text encoder, but it is a CLIP text encoder"):
        load_kontext(transformer=micro / "transformer" / "diffusion_pytorch_model.safetensors", vae=vae_file,
                     clip_l=clip_file, t5=clip_file, tokenizers=micro)


def test_classify_keys():
    assert classify_keys(["double_blocks.0.img_attn.qkv.weight"]) == "flux_bfl"
    assert classify_keys(["encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight"]) == "vae_ldm"
    assert classify_keys(["text_model.embeddings.token_embedding.weight"]) == "clip"
    assert classify_keys(["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"]) == "t5"
    assert classify_keys(["transformer.x.lora_A.weight"]) == "lora"


def _ldm_vae_state(vae) -> dict:
    """diffusers AutoencoderKL -> BFL/LDM key names (the layout of FLUX's ae.safetensors)."""
    out, n = {}, len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
        if k.startswith("encoder.down_blocks."):
            i = k.split(".")[2]
            k = k.replace(f"encoder.down_blocks.{i}.", f"encoder.down.{i}.").replace(".resnets.", ".block.")
        if k.startswith("decoder.up_blocks."):
            i = int(k.split(".")[2])
            k = k.replace(f"decoder.up_blocks.{i}.", f"decoder.up.{n - 1 - i}.").replace(".resnets.", ".block.")
        out[k] = value.contiguous()
    return out


def test_comfyui_single_files_load_like_the_folder(micro, bundle, tmp_path):
    folder = bundle
    files = {"transformer": tmp_path / "flux1-kontext-toy.safetensors", "vae": tmp_path / "ae.safetensors",
             "clip_l": tmp_path / "clip_l.safetensors", "t5": tmp_path / "t5xxl_fp16.safetensors"}
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in folder.transformer.state_dict().items()},
              files["transformer"])
    save_file(_ldm_vae_state(folder.vae), files["vae"])
    save_file({f"text_model.{k}": v.contiguous() for k, v in folder.text_encoder.state_dict().items()}, files["clip_l"])
    t5 = {k: v.half().contiguous() for k, v in folder.text_encoder_2.state_dict().items()
          if k != "encoder.embed_tokens.weight"}  # ComfyUI's T5 files keep only the shared embedding
    save_file(t5, files["t5"])
    single = load_kontext(**files, tokenizers=micro, configs=micro)
    assert single.source.kind == "single_file"
    for (name, a), b in zip(folder.transformer.state_dict().items(), single.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(single.encode_images(x), folder.encode_images(x))
    texts = ["move the blue square to the right", "add a small circle"]
    (e1, p1), (e2, p2) = folder.encode_prompts(texts), single.encode_prompts(texts)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(e1, e2, rtol=2e-3, atol=2e-3)  # T5 stored in fp16: rounding only
    assert single.text_encoder_2.dtype == torch.float32


def test_real_tokenizers_come_from_a_folder_or_comfyui(tmp_path, monkeypatch):
    from comfy_host import comfy_path

    host = comfy_path()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "no-comfy"))
    with pytest.raises(ModelFileError, match=r"model\.tokenizers=.*COMFYUI_PATH"):
        find_tokenizers()
    if host is None:
        pytest.skip("no ComfyUI checkout to take the real tokenizers from")
    monkeypatch.setenv("COMFYUI_PATH", str(host))
    found = find_tokenizers()
    assert found["tokenizer"].name == "sd1_tokenizer" and found["tokenizer_2"].name == "t5_tokenizer"
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(str(found["tokenizer"]), local_files_only=True)
    assert clip("a red cat").input_ids[0] == 49406


def test_toy_base_builds_once_then_comes_from_cache(tmp_path):
    """A seconds-sized recipe through the whole build (world, VAE, full-parameter pretraining)."""
    import time

    from training.toy.base import toy_base

    quick = dict(single_train=16, single_test=4, vae_images=32, vae_steps=3, base_steps=2, base_batch=4,
                 progress=False)
    path = toy_base(tmp_path, **quick)
    info = json.loads((path / "dualref.json").read_text())
    assert info["complete"] and info["pretrain"]["steps"] == 2 and info["vae"]["psnr"] > 0
    bundle = load_kontext(path)
    assert bundle.fingerprint("transformer") == info["fingerprint"]
    assert bundle.base_fingerprint() == info["base_fingerprint"]
    assert bundle.vae.config.scaling_factor == pytest.approx(info["vae"]["scaling_factor"], rel=1e-5)
    start = time.perf_counter()
    assert toy_base(tmp_path, **quick) == path
    assert time.perf_counter() - start < 2.0
    from training.toy.base import DEFAULT_RECIPE, recipe_key
    assert recipe_key(dict(DEFAULT_RECIPE, base_steps=3)) != recipe_key(DEFAULT_RECIPE)  # another recipe, another folder
