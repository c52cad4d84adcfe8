"""Peak GPU memory of DualRef training: exact parameter counts plus a per-block activation formula.

Parameters, gradients and optimizer states are *counted*: the transformer (and the frozen text
encoders/VAE) are built on the meta device from their configs and the LoRA is added by peft on
that meta model, so every number is an exact ``numel`` — no weights are allocated.

Activations are a *formula*: the bytes autograd keeps for backward in diffusers'
``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` (diffusers 0.3x-0.4x, SDPA attention that
stores q, k, v, out and the log-sum-exp, no N^2 matrix), LoRA (peft) on :data:`DEFAULT_TARGETS`,
frozen base. Per sample, with ``N = N_txt + N_img`` tokens (``N_img`` = target + references,
16x16 pixels per token), width ``D``, ``H`` heads of ``d = D/H``, rank ``r``, ``b`` bytes per
activation element (2 bf16, 4 fp32) and 4 bytes for what diffusers keeps in fp32 (RMSNorm inputs,
rotary cos/sin, log-sum-exp):

- double block, per stream (image / text, ``N_s`` tokens): LayerNorm 1 and 2 inputs ``2 N_s D b``
  and their mean/rstd ``4 N_s b``; LoRA inputs ``L_d N_s D b``; the GELU input ``4 N_s D b``;
  q/k RMSNorm inputs and rstd ``(2 N_s D + 2 N_s H) 4``; LoRA ``A x`` outputs ``6 N_s r b``.
  Shared by both streams: attention q, k, v, out ``4 N D b`` and log-sum-exp ``N H 4``.
  Plus per-sample modulation chunks ``16 D b``.
- single block: LayerNorm input and stats ``N D b + 2 N b``; LoRA inputs ``L_s N D b``; GELU input
  ``4 N D b``; RMSNorm ``(2 N D + 2 N H) 4``; attention ``4 N D b + N H 4``; ``A x`` outputs
  ``5 N r b``; modulation ``4 D b``.
- once per model: rotary cos/sin ``2 N d 4``; output LayerNorm and LoRA'd ``proj_out``
  ``N D b + N_img D b + 2 N_img b + N_img r b + D b``. With a batch of more than one, to_out's
  input is a non-contiguous slice and gets copied: ``L_d`` one larger. Everything scales with the
  batch except the rotary cos/sin. The first double block keeps no
  LayerNorm-1 input (nothing before it trains): minus ``N D b + 2 N b + 2 D b``.
- full fine-tuning (``r = 0``, every weight trains): the modulation, gate and RMSNorm-weight
  products also keep their other operand: ``+ 4 N D b + 2 N D 4 + 2 D b`` per double block,
  ``+ 2 N D b + 2 N D 4 + D b`` per single block, and block 0 keeps its input.

``L_d``/``L_s`` count the saved LoRA inputs in units of ``N_s D``. When the LoRA weights have the
activations' dtype (fp32 runs, FSDP mixed precision, pure bf16) one tensor serves every module
reading it: ``L_d = 6`` (q/k/v input 1, feed-forward in 1, feed-forward out 4 wide; to_out reads
the attention output, already kept) and ``L_s = 6`` (norm output shared by proj_mlp/q/k/v 1,
proj_out's concatenated input 5). Under bf16 autocast with fp32 LoRA weights, peft casts each
module's input and autocast casts it back, so every module keeps its own copy: ``L_d = 9``
(3 + 1 + 1 + 4), ``L_s = 9`` (4 + 5); autocast also keeps bf16 copies of the trainable weights
(2 bytes per trainable parameter) until backward. Full fine-tuning keeps the shared inputs
(``L = 6``) and no ``A x``.

Gradient checkpointing (one checkpoint per block, diffusers' default) keeps only each block's
inputs, ``N D b`` per block, and recomputes one block at a time in backward.

Backward working memory (gradients of a block's intermediates while it is differentiated, peft's
fp32 input casts) is not saved state; it is taken as ``WORKING_BLOCKS`` (0.75) of the largest
block's saved activations -- a calibration on small CPU runs (torch profiler, CPU allocator), where
the measured forward+backward peak sat between 0.5 and 1 block above the saved tensors.
tests/test_plan.py checks the saved-tensor formula exactly (every regime) and the whole
forward+backward peak within 15 % on a config other than the calibration one.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)
# diffusers config of black-forest-labs/FLUX.1-Kontext-dev transformer/config.json
KONTEXT_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
PIXELS_PER_TOKEN = 16  # VAE /8, then 2x2 patches
WORKING_BLOCKS = 0.75  # backward working memory, in blocks of saved activations (calibrated, see above)


@dataclass(frozen=True)
class Dims:
    width: int
    heads: int
    double: int
    single: int
    rank: int  # 0 for full fine-tuning (no A x outputs)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class Tokens:
    text: int
    image: int  # target + references

    @property
    def total(self) -> int:
        return self.text + self.image


def image_tokens(height: int, width: int) -> int:
    return -(-height // PIXELS_PER_TOKEN) * -(-width // PIXELS_PER_TOKEN)


def _double(n_txt, n_img, dims: Dims, b, lora_inputs):
    d_, h, r = dims.width, dims.heads, dims.rank
    total = 0
    for n in (n_txt, n_img):
        total += 2 * n * d_ * b + 4 * n * b + lora_inputs * n * d_ * b + 4 * n * d_ * b
        total += (2 * n * d_ + 2 * n * h) * 4 + 6 * n * r * b
    n = n_txt + n_img
    return total + 4 * n * d_ * b + n * h * 4 + 16 * d_ * b


def _single(n, dims: Dims, b, lora_inputs):
    d_, h, r = dims.width, dims.heads, dims.rank
    return (n * d_ * b + 2 * n * b + lora_inputs * n * d_ * b + 4 * n * d_ * b + (2 * n * d_ + 2 * n * h) * 4
            + 4 * n * d_ * b + n * h * 4 + 5 * n * r * b + 4 * d_ * b)


def saved_activations(tokens: Tokens, dims: Dims, act_bytes: int, copies: bool, batch: int = 1,
                      trainable: int = 0) -> dict:
    """Bytes autograd keeps after a forward without checkpointing, by part (see module docstring).

    ``copies``: bf16 autocast over fp32 LoRA weights (each module keeps its own input copy, and
    autocast's bf16 copies of the ``trainable`` weights stay alive until backward).
    """
    b, n, n_img, r, w = act_bytes, tokens.total, tokens.image, dims.rank, dims.width
    full = r == 0
    lora_s = 9 if copies and not full else 6
    # batch > 1: to_out's input (an image/text slice of the attention output) is no longer contiguous,
    # so its 2-D view for the matmul becomes a copy
    lora_d = 9 if copies and not full else 6 + (batch > 1)
    double = _double(tokens.text, n_img, dims, b, lora_d)
    single = _single(n, dims, b, lora_s)
    if full:  # trainable modulation, gates and norm weights keep their other operands too
        double += 4 * n * w * b + 2 * n * w * 4 + 2 * w * b
        single += 2 * n * w * b + 2 * n * w * 4 + w * b
    once = n * w * b + n_img * w * b + 2 * n_img * b + n_img * r * b + w * b
    first = 0 if full else -(n * w * b + 2 * n * b + 2 * w * b)  # block 0's input needs no gradient
    parts = {"double blocks": dims.double * double + first, "single blocks": dims.single * single, "model": once}
    parts = {k: v * batch for k, v in parts.items()}
    parts["rotary cos/sin"] = 2 * n * dims.head_dim * 4  # one per sequence layout, shared by the batch
    if copies:  # block 0's q/k/v A weights are never needed for an input gradient
        parts["autocast weight copies"] = 2 * trainable - 6 * r * w * 2
    parts["largest block"] = max(double, single) * batch
    return parts


def checkpointed_activations(tokens: Tokens, dims: Dims, act_bytes: int, batch: int = 1) -> int:
    """Block inputs kept by per-block checkpointing, plus rotary cos/sin."""
    per_block = tokens.total * dims.width * act_bytes
    return batch * (dims.double + dims.single) * per_block + 2 * tokens.total * dims.head_dim * 4


def activation_peak(tokens: Tokens, dims: Dims, act_bytes: int, copies: bool, checkpointing: bool,
                    batch: int = 1, trainable: int = 0) -> dict:
    """Bytes at the backward peak: ``saved`` activations, autocast ``weight copies``, ``working``."""
    parts = saved_activations(tokens, dims, act_bytes, copies, batch, trainable)
    block = parts.pop("largest block")
    copies_bytes = parts.pop("autocast weight copies", 0)
    if checkpointing:  # inputs of every block + one block recomputed
        saved = checkpointed_activations(tokens, dims, act_bytes, batch) + block
    else:
        saved = sum(parts.values())
    return {"saved": saved, "weight copies": copies_bytes, "working": int(WORKING_BLOCKS * block)}


# -- exact counts from meta-device models ------------------------------------------------------

@functools.lru_cache(maxsize=16)
def transformer_counts(rank: int, targets: tuple[str, ...] = DEFAULT_TARGETS, config: tuple = ()) -> dict:
    """Parameter counts of the (meta) transformer and of a peft LoRA of ``rank`` on it."""
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    cfg = dict(config) if config else KONTEXT_DEV
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
        base = sum(p.numel() for p in model.parameters())
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]  # what train.base_quant quantises
        blocks = [sum(p.numel() for p in b.parameters())
                  for b in (*model.transformer_blocks, *model.single_transformer_blocks)]
        per_token = token_weights(model)
        lora = lora_blocks = 0
        lora_per_token = {"image": 0, "text": 0}
        if rank:
            model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
            named = dict(model.named_parameters())
            lora = sum(p.numel() for n, p in named.items() if "lora_" in n)
            with_lora = token_weights(model)  # peft's A and B are Linear modules too
            lora_per_token = {k: with_lora[k] - per_token[k] for k in per_token}
            lora_blocks = max(sum(p.numel() for n, p in b.named_parameters() if "lora_" in n)
                              for b in (*model.transformer_blocks, *model.single_transformer_blocks))
    return dict(base=base, largest_block=max(blocks), lora=lora, lora_largest_block=lora_blocks,
                per_token=per_token, lora_per_token=lora_per_token,
                linear_weights=sum(m.weight.numel() for m in linears), linear_rows=sum(m.out_features for m in linears),
                largest_linear=max(m.weight.numel() for m in linears),
                width=cfg["num_attention_heads"] * cfg["attention_head_dim"], heads=cfg["num_attention_heads"],
                double=cfg["num_layers"], single=cfg["num_single_layers"])


def token_weights(model) -> dict:
    """Linear weights each image token and each text token goes through once per forward (a double
    block has one set per stream; the AdaLN modulation linears act once per sample, not per token)."""
    import torch

    image = text = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or "norm" in name or name.split(".")[0] not in (
                "transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder", "proj_out"):
            continue
        n = module.weight.numel()
        if name.startswith("single_transformer_blocks"):
            image, text = image + n, text + n
        elif "context" in name or "add_" in name:  # context_embedder, add_{q,k,v}_proj, to_add_out, ff_context
            text += n
        else:
            image += n
    return {"image": image, "text": text}


# bf16 dense peak of one H100 SXM (NVIDIA's datasheet: 989 TFLOP/s without sparsity) and the share of it
# a FLUX LoRA step is assumed to reach: an assumption until bench/gpu_check.py has run on one.
H100_BF16_FLOPS = 989e12
ASSUMED_UTILISATION = 0.4


def step_flops(tokens: Tokens, counts: dict, checkpointing: bool, batch: int = 1) -> dict:
    """Matmul FLOPs of one training step per GPU (2 per multiply-add). Forward: every token through its
    linear weights (base and LoRA), plus attention's QK^T and PV (4 N^2 D per block). The frozen base
    gets input gradients only (one more pass of its linears), the LoRA input and weight gradients (two),
    attention's backward 2.5x its forward (torch.utils.flop_counter's count: dQ, dK, dV and the recomputed
    scores), and gradient checkpointing recomputes the forward once."""
    def through(weights: dict) -> int:
        return 2 * (tokens.image * weights["image"] + tokens.text * weights["text"])

    base, lora = through(counts["per_token"]), through(counts["lora_per_token"])
    attention = 4 * tokens.total ** 2 * counts["width"] * (counts["double"] + counts["single"])
    forward = base + lora + attention
    step = (2 + checkpointing) * base + (3 + checkpointing) * lora + (7 + 2 * checkpointing) * attention // 2
    return {"forward": forward * batch, "step": step * batch}


# train.base_quant (training.quantize, torchao weight-only, per output row): bytes per weight and per row
# (an fp32 scale; int8 also an int8 zero point). Biases, norms and embeddings stay in the base precision.
QUANT_BYTES = {"int8": (1, 5), "fp8": (1, 4)}


def frozen_base_bytes(counts: dict, base_bytes: int, quant: str = "none") -> int:
    """Bytes of the frozen transformer: every weight at ``base_bytes``, or its linear weights quantised."""
    if quant == "none":
        return counts["base"] * base_bytes
    per_weight, per_row = QUANT_BYTES[quant]
    rest = counts["base"] - counts["linear_weights"]
    return rest * base_bytes + counts["linear_weights"] * per_weight + counts["linear_rows"] * per_row


@functools.lru_cache(maxsize=1)
def frozen_model_counts() -> dict:
    """T5-XXL encoder, CLIP-L text model and the FLUX VAE, from their published configs (meta)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     vocab_size=32128, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                            projection_dim=768))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in (("t5", t5), ("clip", clip), ("vae", vae))}
