"""Memory savers for one GPU (issue 19): ``optim.eightbit`` (bitsandbytes AdamW8bit) and ``train.base_quant``
(torchao int8/fp8 weight-only base under a LoRA). Both libraries run on CPU, so everything here runs on CPU
on the micro model; fp8 on GPUs without fp8 (compute capability < 8.9) is refused in training.quantize."""
import pytest
import torch
from safetensors.torch import load_file

from sft_helpers import micro_model, micro_world, sft_config
from test_plan import formula, forward, small_flux
from training.checkpoint import list_checkpoints
from training.config import ConfigError
from training.memory.cli import OPTIMIZER_BYTES
from training.models import load_model
from training.quantize import FrozenQuantLinear, quantize_base
from training.runtime import make_accelerator
from training.sft.trainer import build_model, build_optimizer, train


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return micro_model(tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return micro_world(tmp_path_factory.mktemp("world"), train=8, test=2)


def savers(micro, world, out, quant="fp8", **sections):
    return sft_config(micro, world, out, lora={"rank": 32}, optim={"eightbit": True},
                      train={"max_steps": 3, "precision": "bf16", "base_quant": quant, **sections.pop("train", {})},
                      run={"val_at_start": False, "val_samples": 1, **sections.pop("run", {})})


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_sft_with_eightbit_adamw_over_a_quantised_base(micro, world, tmp_path, quant):
    cfg = savers(micro, world, tmp_path / "run", quant)
    bundle = load_model(cfg.model, device=make_accelerator().device, precision="bf16")
    result = train(cfg, bundle=bundle)
    assert result.loss is not None and torch.isfinite(torch.tensor([result.loss, result.val_loss])).all()
    # the base stayed quantised through training, validation sampling and export
    layers = [m for m in bundle.transformer.modules() if isinstance(m, FrozenQuantLinear)]
    assert len(layers) > 20 and all(m.weight.qdata.dtype == (torch.int8 if quant == "int8" else torch.float8_e4m3fn)
                                    for m in layers)
    lora = load_file(result.lora_path)
    assert lora and all("lora_" in k or k.endswith(".alpha") for k in lora)  # no base weight in the file
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained


def test_eightbit_states_are_one_byte_and_resume_is_exact(micro, world, tmp_path):
    sections = {"train": {"max_steps": 3}, "run": {"checkpoint_every": 2, "val_every": 0}}
    straight = train(savers(micro, world, tmp_path / "a", **sections))
    cfg = savers(micro, world, tmp_path / "b", **sections)

    def stop(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step=stop)
    state = torch.load(list_checkpoints(tmp_path / "b")[-1] / "optimizer.pt", weights_only=True)["state"]
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state.values()]  # bnb nests its tensors
    dtypes = {v.numel() >= 4096: v.dtype for m in moments for k, v in m.items() if k in ("state1", "state2")}
    assert dtypes == {True: torch.uint8, False: torch.float32}  # bnb keeps tensors under 4096 weights in fp32
    resumed = train(cfg, resume=True)
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eightbit_optimizer_keeps_two_bytes_per_weight(micro, world):
    cfg = savers(micro, world, "unused")
    model = build_model(cfg, load_model(cfg.model, device=make_accelerator().device, precision="bf16"))
    optimizer, _ = build_optimizer(cfg, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    large = [p for p in trainable if p.numel() >= 4096]  # bnb's min_8bit_size; at Kontext's width nearly all
    assert sum(p.numel() for p in large) > 0.9 * sum(p.numel() for p in trainable)

    def state_bytes(names):
        return sum(v.numel() * v.element_size() for p in large for k, v in optimizer.state[p].items() if k in names)

    n = sum(p.numel() for p in large)
    assert state_bytes(("state1", "state2")) == 2 * n  # AdamW: 8 (two fp32 moments)
    assert state_bytes(("absmax1", "absmax2")) == 2 * 4 * n // 256  # a scale per 256-weight block
    assert OPTIMIZER_BYTES["adamw8bit"] == 2 + 8 / 256 and OPTIMIZER_BYTES["adamw"] == 8  # the planner's


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quantised_base_saves_exactly_the_bf16_activations(quant):
    """autograd keeps no dequantised weight copies (torchao's own layers keep one per LoRA'd layer), and the
    gradients are those of torchao's layers."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    model, plain = small_flux("autocast"), small_flux("autocast")
    frozen = [n for n, m in plain.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n]
    assert quantize_base(model, quant) == len(frozen)
    quantize_(plain, Float8WeightOnlyConfig() if quant == "fp8" else Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: fqn in frozen)
    weights = {t.untyped_storage().data_ptr() for p in model.parameters()
               for t in ([getattr(p, a) for a in p.__tensor_flatten__()[0]] if hasattr(p, "qdata") else [p])}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(model, "autocast", 2)
    assert sum(saved.values()) == formula(model, "autocast", 2)
    out.float().pow(2).mean().backward()
    forward(plain, "autocast", 2).float().pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.requires_grad:  # the same gradients up to bf16 kernel rounding
            assert float((p.grad - q.grad).norm()) <= 0.02 * float(q.grad.norm()), name


@pytest.mark.parametrize("change,key", [({"precision": "fp32"}, "train.precision"), ({"mode": "full"}, "train.mode"),
                                        ({"base_quant": "int4"}, "train.base_quant")])
def test_base_quant_needs_a_bf16_lora(micro, world, tmp_path, change, key):
    cfg = savers(micro, world, tmp_path / "run", train=change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_missing_library_is_a_config_error_with_the_install_line():
    from training.config import require_module

    with pytest.raises(ConfigError, match=r"optim\.eightbit needs no_such_optimiser_lib, which is not installed: "
                                          r"pip install no_such_optimiser_lib \(or the package's `memory` extra\)"):
        require_module("no_such_optimiser_lib", "optim.eightbit", "memory")
