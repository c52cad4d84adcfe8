"""What users have (issue 17 items 1-2): the release's sharded diffusers folder, ComfyUI's scaled-fp8
single files, and every component materialised in its compute dtype (never an fp32 copy first).

The micro model (toy architecture, random weights) is re-saved the way the release is laid out:
transformer and T5 as shards with a ``*.safetensors.index.json`` (diffusers' / transformers'
``save_pretrained`` with a small ``max_shard_size`` write the release's index format).
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from sft_helpers import micro_model, micro_world
from training.config import ModelConfig
from training.model_files import ModelFileError, classify_keys, load_text_encoder_file, load_transformer_file, read_header
from training.models import PRECISIONS, load_kontext, load_model

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def sharded(micro, tmp_path_factory):
    """The micro folder with its transformer and T5 written as shards + index, as the release ships them."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    folder = tmp_path_factory.mktemp("release") / "FLUX.1-Kontext-dev"
    shutil.copytree(micro, folder)
    for name, cls, size in (("transformer", FluxTransformer2DModel, "2MB"), ("text_encoder_2", T5EncoderModel, "200KB")):
        model = cls.from_pretrained(str(micro / name))
        shutil.rmtree(folder / name)
        model.save_pretrained(str(folder / name), max_shard_size=size)
    return folder


def _forward(transformer, seed=0):
    """One transformer call on fixed random inputs (64 image tokens, 48 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    tokens, text = 64, 48
    ids = torch.zeros(tokens, 3)
    ids[:, 1], ids[:, 2] = torch.arange(tokens) // 8, torch.arange(tokens) % 8
    dtype = transformer.dtype
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, tokens, cfg.in_channels, generator=g).to(dtype),
                            encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g).to(dtype),
                            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dtype),
                            timestep=torch.tensor([0.5], dtype=dtype), guidance=torch.tensor([2.5], dtype=dtype),
                            img_ids=ids, txt_ids=torch.zeros(text, 3)).sample


def test_sharded_release_folder_loads_like_the_unsharded_one(micro, sharded):
    shards = sorted((sharded / "transformer").glob("*.safetensors"))
    assert len(shards) >= 3 and (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((sharded / "text_encoder_2").glob("model-*.safetensors"))) >= 2
    # The bug this covers: a later shard alone holds only blocks and is "not a model this loader knows".
    assert classify_keys(read_header(shards[-1])) == "unknown"
    plain, release = load_kontext(micro), load_kontext(sharded)
    assert release.source.weights["transformer"] == shards
    assert torch.equal(_forward(release.transformer), _forward(plain.transformer))
    texts = ["put the red circle at the top left", "remove the square"]
    (e1, p1), (e2, p2) = plain.encode_prompts(texts), release.encode_prompts(texts)
    assert torch.equal(e1, e2) and torch.equal(p1, p2)
    assert release.fingerprint("transformer") != plain.fingerprint("transformer")  # files differ, hashed all


def test_a_missing_shard_is_named_with_the_fix(sharded, tmp_path, capsys):
    broken = shutil.copytree(sharded, tmp_path / "FLUX.1-Kontext-dev")
    gone = sorted((broken / "text_encoder_2").glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(ModelFileError, match=rf"{gone.name}: missing shard: model\.safetensors\.index\.json names "
                                             rf".* Fix: download the missing shard"):
        load_kontext(broken)
    from training.sft.cli import main

    world = micro_world(tmp_path / "world", train=4, test=1)
    code = main(["--config", "training/configs/kontext_sft.json", "--quiet", "--set", f"model.path={broken}",
                 "--set", f"data.manifest={world}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"text_encoder_2/{gone.name}: missing shard" in err and "huggingface-cli download" in err
    assert not (tmp_path / "run" / "lora.safetensors").exists()


def _scaled_fp8(state: dict, skip=()) -> tuple[dict, dict]:
    """ComfyUI's scaled-fp8 layout of ``state`` (2-D weights as float8_e4m3fn + ``scale_weight``, a
    ``scaled_fp8`` marker) and its dequantised reference ``weight.float() * scale_weight``."""
    out, reference = {"scaled_fp8": torch.empty(0, dtype=FP8)}, {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2 and key not in skip:
            scale = value.abs().amax().float() / 448.0
            out[key] = (value.float() / scale).to(FP8)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
            reference[key] = out[key].float() * scale
        else:
            out[key] = value.contiguous()
            reference[key] = value.float()
    return out, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_comfyui_scaled_fp8_files_are_dequantised_on_load(micro, tmp_path, dtype):
    plain = load_kontext(micro)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in plain.transformer.state_dict().items()}
    scaled, reference = _scaled_fp8(prefixed)
    path = tmp_path / "flux1-dev-kontext_fp8_scaled.safetensors"
    save_file(scaled, path)
    model = load_transformer_file(path, micro, dtype)
    state = model.state_dict()
    assert len(state) == len(reference) and {v.dtype for v in state.values()} == {dtype}
    for key, want in reference.items():
        assert torch.equal(state[key.removeprefix("model.diffusion_model.")], want.to(dtype)), key
    t5 = {k: v for k, v in plain.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    scaled, reference = _scaled_fp8(t5, skip=("shared.weight",))
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(scaled, path)
    encoder = load_text_encoder_file(path, micro / "text_encoder_2", "t5", dtype)
    state = encoder.state_dict()
    assert {p.dtype for p in encoder.parameters()} == {dtype}
    for key, want in reference.items():
        assert torch.equal(state[key], want.to(dtype)), key
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight  # tied as transformers ties it


class _Registrations:
    """Records every parameter a module registers while active (dtype, device): an fp32 copy made
    before a cast shows up here even when the finished model is bf16."""

    def __enter__(self):
        self.seen = []
        hook = lambda module, name, param: self.seen.append((type(module).__name__, name, param.dtype, param.device.type))  # noqa: E731
        self.handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def materialised(self):
        return [s for s in self.seen if s[3] != "meta"]


def _single_files(bundle, folder):
    files = {"transformer": folder / "flux1-kontext-toy.safetensors", "vae": folder / "ae.safetensors",
             "clip_l": folder / "clip_l.safetensors", "t5": folder / "t5xxl_fp16.safetensors"}
    folder.mkdir(exist_ok=True)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bundle.transformer.state_dict().items()},
              files["transformer"])
    save_file({k: v.contiguous() for k, v in bundle.vae.state_dict().items()}, files["vae"])
    save_file({f"text_model.{k}": v.contiguous() for k, v in bundle.text_encoder.state_dict().items()}, files["clip_l"])
    save_file({k: v.half().contiguous() for k, v in bundle.text_encoder_2.state_dict().items()
               if k != "encoder.embed_tokens.weight"}, files["t5"])
    return files


@pytest.mark.parametrize("layout", ["release folder", "single files"])
def test_components_are_created_in_the_configured_dtype(micro, sharded, tmp_path, layout):
    if layout == "release folder":
        model = ModelConfig(path=str(sharded))
        load = lambda precision: load_model(model, device="cpu", precision=precision)  # noqa: E731
    else:  # the micro model's own config folders stand in for training/model_configs/kontext
        files = _single_files(load_kontext(micro), tmp_path / "comfy")
        load = lambda precision: load_kontext(**files, tokenizers=micro, configs=micro, dtype=PRECISIONS[precision],  # noqa: E731
                                              text_dtype=PRECISIONS[precision])
    bundle = load("bf16")
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        with _Registrations() as reg:
            module = getattr(bundle, name)
        fp32 = [s for s in reg.materialised() if s[2] != torch.bfloat16]
        assert not fp32, f"{name}: {len(fp32)} parameters materialised in another dtype first, e.g. {fp32[:2]}"
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}  # the VAE stays fp32 (small; latents)
    embeds, pooled = bundle.encode_prompts(["add a small circle"])
    assert embeds.dtype == torch.float32  # cached as fp32 tensors of bf16-computed values
    fp32_bundle = load("fp32")
    assert fp32_bundle.fingerprint("text") != bundle.fingerprint("text")  # fp32 and bf16 caches never mix
    assert fp32_bundle.fingerprint("vae") == bundle.fingerprint("vae")
    assert json.loads((micro / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
