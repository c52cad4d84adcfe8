"""DualRef LoRA files (DESIGN contract 4), host-free: keys, alphas, metadata, diffusers round trip."""
import json
import logging
import math
import struct
import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

from dual_rope.lora_meta import (
    HEADER_KEYS,
    LoraFileError,
    LoraMetadata,
    LoraMetadataError,
    base_fingerprint,
    lora_content_hash,
    parse_header,
    read_safetensors_header,
)
from hostile_headers import hostile_headers
from training.lora_io import apply_lora_diffusers, load_lora, merge_lora, save_lora, transformer_fingerprint

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out", "ff.net.2"]


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=8, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def with_lora(model, rank=4, alpha=8.0, rslora=False, seed=1):
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora,
                                 init_lora_weights=False), adapter_name="default")
    torch.manual_seed(seed)
    with torch.no_grad():  # B is zero at init; make the LoRA do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def inputs(seed=2):
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt = 12, 5
    return dict(
        hidden_states=torch.randn(1, n_img, 16, generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, 12, generator=g),
        pooled_projections=torch.randn(1, 8, generator=g),
        timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
        img_ids=torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], -1),
        txt_ids=torch.zeros(n_txt, 3), return_dict=False,
    )


META = dict(layout="diagonal", stage="sft", gates=(1.0, 0.75),
            train={"steps": 10, "learning_rate": 5e-5, "dataset_hash": "ab" * 32, "precision": "fp32"})


@pytest.mark.parametrize("rank,alpha,rslora", [(4, 8.0, False), (3, 5.0, True)])
def test_saved_lora_loads_in_diffusers_with_the_same_scale(tmp_path, rank, alpha, rslora, caplog):
    trained = with_lora(tiny_flux(), rank, alpha, rslora)
    with torch.no_grad():
        expected = trained(**inputs())[0]
        base_model = tiny_flux()
        base = base_model(**inputs())[0]
    meta = save_lora(tmp_path / "a.safetensors", trained,
                     {**META, "base_fingerprint": transformer_fingerprint(base_model)})
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    assert meta.rank == rank and meta.scale == pytest.approx(scale)

    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        keys = set(f.keys())
        assert all(k.startswith("transformer.") for k in keys)
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
        assert "transformer.single_transformer_blocks.1.proj_out.lora_B.weight" in keys
        assert f.get_tensor("transformer.proj_out.alpha").item() == pytest.approx(scale * rank)

    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = tiny_flux()
        apply_lora_diffusers(loaded, tmp_path / "a.safetensors")
    noisy = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not noisy and not [r for r in caplog.records if "key" in r.getMessage().lower()]
    with torch.no_grad():
        got = loaded(**inputs())[0]
    assert (expected - base).abs().max() > 1e-2  # the LoRA matters
    if rslora:  # alpha*sqrt(r)/r back to a scale: one rounding
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected)


def test_a_merged_lora_computes_what_the_adapter_does(tmp_path):
    """Evaluation and DDPO merge LoRAs into the weights, as ComfyUI applies them: W + scale (alpha/r) B A."""
    trained = with_lora(tiny_flux(), rank=4, alpha=8.0)
    path = tmp_path / "a.safetensors"
    save_lora(path, trained, {**META, "base_fingerprint": transformer_fingerprint(tiny_flux())})
    merged, half = tiny_flux(), tiny_flux()
    meta = merge_lora(merged, path)
    merge_lora(half, path, scale=0.5)
    with torch.no_grad():
        expected, got, base = trained(**inputs())[0], merged(**inputs())[0], tiny_flux()(**inputs())[0]
    assert meta.stage == "sft" and meta.gates == (1.0, 0.75)
    assert (expected - base).abs().max() > 1e-2  # the LoRA matters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # one product instead of two: roundings only
    state = load_lora(path)[0]
    key = "transformer.transformer_blocks.0.attn.to_q"
    w = tiny_flux().transformer_blocks[0].attn.to_q.weight
    want = w + 0.5 * 2.0 * (state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"])
    assert torch.equal(half.transformer_blocks[0].attn.to_q.weight, want)
    untouched = tiny_flux().transformer_blocks[0].ff.net[0].proj.weight  # not a LoRA target
    assert torch.equal(merged.transformer_blocks[0].ff.net[0].proj.weight, untouched)

    wider = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    with pytest.raises(LoraFileError, match=r"a\.safetensors.*does not fit the weight"):
        merge_lora(wider, path)


def test_round_trip_metadata_and_tensors(tmp_path):
    trained = with_lora(tiny_flux())
    fp = transformer_fingerprint(trained)
    meta = save_lora(tmp_path / "b.safetensors", trained, {**META, "base_fingerprint": fp}, dtype=torch.bfloat16)
    state, read = load_lora(tmp_path / "b.safetensors")
    assert read == meta and read.gates == (1.0, 0.75) and read.train["steps"] == 10
    assert read.base_fingerprint == fp == transformer_fingerprint(tiny_flux())  # LoRA layers don't change it
    a = dict(trained.named_parameters())["transformer_blocks.0.attn.to_q.lora_A.default.weight"]
    assert torch.equal(state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], a.detach().bfloat16())
    assert state["transformer.proj_out.alpha"].dtype == torch.float32
    # the same tensors saved from a state dict, other metadata: same content hash
    save_lora(tmp_path / "c.safetensors", state, {"layout": "offset", "stage": "ddpo", "sft_lora": "cd" * 32})
    assert lora_content_hash(tmp_path / "b.safetensors") == lora_content_hash(tmp_path / "c.safetensors")
    assert load_lora(tmp_path / "c.safetensors")[1].sft_lora == "cd" * 32


def test_metadata_holds_only_whitelisted_keys_and_no_secret(tmp_path):
    save_lora(tmp_path / "d.safetensors", with_lora(tiny_flux()), META)
    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        header = f.metadata()
    assert set(header) <= set(HEADER_KEYS) and {"dualref.layout", "dualref.stage", "dualref.rank"} <= set(header)
    good = LoraMetadata("diagonal", "sft", 4, 4.0).to_header()
    for bad, match in [
        ({**good, "dualref.api_key": "x"}, "not an allowed key"),
        ({**good, "dualref.train": json.dumps({"endpoint": "http://x"})}, "not allowed"),
        ({**good, "dualref.train": json.dumps({"dataset_hash": "sk-abcdefghijklmnopqrstu"})}, "credential"),
        ({**good, "dualref.layout": "spiral"}, "dualref.layout"),
        ({**good, "dualref.gates": "[1, -2]"}, "dualref.gates"),
    ]:
        with pytest.raises(LoraMetadataError, match=match):
            parse_header(bad)
    with pytest.raises(LoraMetadataError, match="credential"):
        save_lora(tmp_path / "e.safetensors", with_lora(tiny_flux()), {**META, "train": {"token": "hf_" + "a" * 30}})
    with pytest.raises(LoraMetadataError, match="'run_name' is not allowed"):
        save_lora(tmp_path / "e.safetensors", with_lora(tiny_flux()), {**META, "train": {"run_name": "mine"}})
    assert not (tmp_path / "e.safetensors").exists()


def test_bad_files_are_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_lora(good, with_lora(tiny_flux()), META)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match=r"cut\.safetensors.*truncated"):
        load_lora(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json" + b"\0" * 40)
    with pytest.raises(LoraFileError, match=r"junk\.safetensors.*not valid JSON"):
        load_lora(tmp_path / "junk.safetensors")
    sd1 = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    save_file(sd1, tmp_path / "sd1.safetensors")
    with pytest.raises(LoraFileError, match=r"sd1\.safetensors.*Stable Diffusion"):
        load_lora(tmp_path / "sd1.safetensors")
    with pytest.raises(LoraFileError, match="no such file"):
        load_lora(tmp_path / "missing.safetensors")


def test_hostile_headers_are_refused_naming_the_file(tmp_path):
    """Issue 18 item 4: bounded size and nesting, one clear refusal naming the file (was a RecursionError,
    and an empty "keys like " for a 130 MB metadata header)."""
    from training.model_files import ModelFileError, read_header

    files = hostile_headers(tmp_path)
    for name, (path, reason) in files.items():
        readers = [load_lora] + ([lora_content_hash] if name != "empty" else [])  # the trainer's and DDPO's
        for read in readers:
            with pytest.raises(LoraFileError, match=rf"{path.name}'?: .*{reason}") as err:
                read(path)
            assert "keys like )" not in str(err.value), name
        if name not in ("empty", "meta"):  # model files: the same parser, their own error type
            with pytest.raises(ModelFileError, match=rf"{path.name}: .*{reason}"):
                read_header(path)
    # a normal header still reads, brackets inside strings and escaped quotes included
    ok = tmp_path / "ok.safetensors"
    save_file({"a.lora_A.weight": torch.zeros(2, 2)}, ok, metadata={"note": '[[[[[[[[[[ \\" {{{{{{{{{{'})
    entries, meta, _ = read_safetensors_header(ok)
    assert list(entries) == ["a.lora_A.weight"] and meta["note"].startswith("[[[[")
    files["big"][0].unlink()  # 136 MB: pytest keeps the last runs' folders


def test_fingerprint_survives_precision_and_sees_other_weights():
    model = tiny_flux()
    params = dict(model.named_parameters())
    fp = transformer_fingerprint(model)
    assert fp.startswith("flux1:d1s2w16c16:")
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        cast = {k: v.detach().to(torch.bfloat16).to(dtype) for k, v in params.items()}
        assert base_fingerprint(cast.__getitem__, 1, 2) == fp, dtype
    other = {k: v.detach().clone() for k, v in params.items()}
    other["single_transformer_blocks.1.attn.norm_k.weight"][0] += 0.5
    assert base_fingerprint(other.__getitem__, 1, 2) != fp
    assert transformer_fingerprint(tiny_flux(seed=5)) != fp
