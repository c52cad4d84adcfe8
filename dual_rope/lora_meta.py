"""DualRef LoRA files (DESIGN contract 4): metadata schema, file checks, content hashes.

Plain python + torch, no diffusers/peft/safetensors import: the ComfyUI node and the trainer
both use it. A DualRef LoRA is a safetensors file whose tensors are

- ``transformer.<module>.lora_A.weight`` (rank, in) and ``transformer.<module>.lora_B.weight``
  (out, rank) -- the key names diffusers' ``FluxKontextPipeline.save_lora_weights`` writes;
- ``transformer.<module>.alpha`` (0-dim float32) -- read by ComfyUI's ``comfy.lora.load_lora`` and
  by diffusers' Flux loader (``network_alphas``); both scale ``B @ A`` by ``alpha / rank``, which
  is peft's scale (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA) by construction;

and whose safetensors ``__metadata__`` (string -> string) holds only the keys in
:data:`HEADER_KEYS`. Nothing free-form is stored, so no secret can end up in a LoRA file.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .layout import METHODS

FORMAT_VERSION = "1"
STAGES = ("sft", "ddpo")
KEY_PREFIX = "transformer."
_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|alpha)$")

# Every key a DualRef LoRA header may carry, and what it means (the schema).
HEADER_KEYS = {
    "format": "'pt' (safetensors convention, as diffusers writes it)",
    "dualref.format_version": f"version of this schema ({FORMAT_VERSION})",
    "dualref.layout": f"RoPE layout the LoRA was trained with: {', '.join(METHODS)}",
    "dualref.stage": "training stage: sft or ddpo",
    "dualref.rank": "LoRA rank r (int)",
    "dualref.alpha": "alpha written in every .alpha tensor; effective scale = alpha / rank",
    "dualref.target_modules": "JSON list of the module names (diffusers naming) the LoRA adapts",
    "dualref.gates": "JSON list of learned per-reference strengths (absent when not learned)",
    "dualref.base_fingerprint": "fingerprint of the base transformer (see base_fingerprint)",
    "dualref.sft_lora": "ddpo only: content hash (lora_content_hash) of the SFT LoRA it was trained on",
    "dualref.train": "JSON object of typed training facts (TRAIN_FIELDS)",
}
# Training facts: typed, no free text (a path or a URL could leak a user name or a token).
TRAIN_FIELDS: dict[str, type | tuple] = {
    "steps": int, "epochs": (int, float), "batch_size": int, "world_size": int, "seed": int,
    "learning_rate": float, "resolution": int, "references": int, "precision": str, "dataset_hash": str,
}
_PRECISIONS = ("fp32", "bf16", "fp16")
_HASH = re.compile(r"^(sha256:)?[0-9a-f]{8,64}$")
_FINGERPRINT = re.compile(r"^flux1:d(\d+)s(\d+)w(\d+)c(\d+):([0-9a-f]{16})$")
# Belt and braces on top of the whitelist: values that look like credentials are refused.
_SECRET = re.compile(r"(sk-[A-Za-z0-9_-]{12,}|bearer\s|api[_-]?key|AIza[0-9A-Za-z_-]{20,}|hf_[A-Za-z0-9]{20,})", re.I)


class LoraFileError(ValueError):
    """A LoRA file that cannot be used, naming the file, the reason and the fix."""

    def __init__(self, path, reason: str, fix: str):
        super().__init__(f"LoRA file {str(path)!r}: {reason}. Fix: {fix}")
        self.path, self.reason, self.fix = str(path), reason, fix


class LoraMetadataError(ValueError):
    """Metadata that breaks the schema, naming the key."""


class LoraMismatchError(ValueError):
    """The LoRA does not fit the model (another base, another layout); the message says how to fix it."""


@dataclass(frozen=True)
class LoraMetadata:
    """What a DualRef LoRA says about itself (the parsed ``__metadata__``)."""

    layout: str
    stage: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ()
    base_fingerprint: str | None = None
    gates: tuple[float, ...] | None = None
    sft_lora: str | None = None
    train: Mapping[str, Any] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_header(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (validated; raises :class:`LoraMetadataError`)."""
        header = {
            "format": "pt",
            "dualref.format_version": str(self.format_version),
            "dualref.layout": self.layout,
            "dualref.stage": self.stage,
            "dualref.rank": str(int(self.rank)),
            "dualref.alpha": repr(float(self.alpha)),
            "dualref.target_modules": json.dumps(sorted(self.target_modules)),
            "dualref.train": json.dumps(dict(self.train), sort_keys=True),
        }
        if self.base_fingerprint is not None:
            header["dualref.base_fingerprint"] = self.base_fingerprint
        if self.gates is not None:
            header["dualref.gates"] = json.dumps([float(g) for g in self.gates])
        if self.sft_lora is not None:
            header["dualref.sft_lora"] = self.sft_lora
        parse_header(header)  # one validator for both directions
        return header


def _require(cond: bool, key: str, why: str):
    if not cond:
        raise LoraMetadataError(f"LoRA metadata {key!r}: {why}")


def _json(header, key):
    try:
        return json.loads(header[key])
    except (TypeError, ValueError) as e:
        raise LoraMetadataError(f"LoRA metadata {key!r}: not valid JSON ({e})") from None


def _check_train(train) -> dict:
    _require(isinstance(train, dict), "dualref.train", "must be a JSON object")
    for name, value in train.items():
        _require(name in TRAIN_FIELDS, "dualref.train",
                 f"field {name!r} is not allowed (allowed: {', '.join(TRAIN_FIELDS)})")
        kind = TRAIN_FIELDS[name]
        _require(isinstance(value, kind) and not isinstance(value, bool), "dualref.train",
                 f"field {name!r} must be {kind}, got {value!r}")
        if isinstance(value, float):
            _require(math.isfinite(value), "dualref.train", f"field {name!r} must be finite")
    if "precision" in train:
        _require(train["precision"] in _PRECISIONS, "dualref.train", f"precision must be one of {_PRECISIONS}")
    if "dataset_hash" in train:
        _require(bool(_HASH.match(train["dataset_hash"])), "dualref.train", "dataset_hash must be a hex digest")
    return dict(train)


def parse_header(header: Mapping[str, str]) -> LoraMetadata:
    """Validate a DualRef header and return it parsed. Unknown keys are refused (whitelist)."""
    for key, value in header.items():
        _require(key in HEADER_KEYS, key, f"not an allowed key (allowed: {', '.join(HEADER_KEYS)})")
        _require(isinstance(value, str), key, "values must be strings")
        _require(not _SECRET.search(value), key, "value looks like a credential; never store one in a LoRA")
    for key in ("dualref.format_version", "dualref.layout", "dualref.stage", "dualref.rank", "dualref.alpha"):
        _require(key in header, key, "missing")
    _require(header["dualref.format_version"] == FORMAT_VERSION, "dualref.format_version",
             f"this DualRef reads version {FORMAT_VERSION}, the file has {header['dualref.format_version']!r}")
    _require(header["dualref.layout"] in METHODS, "dualref.layout", f"must be one of {', '.join(METHODS)}")
    _require(header["dualref.stage"] in STAGES, "dualref.stage", f"must be one of {', '.join(STAGES)}")
    try:
        rank, alpha = int(header["dualref.rank"]), float(header["dualref.alpha"])
    except ValueError:
        raise LoraMetadataError("LoRA metadata 'dualref.rank'/'dualref.alpha': not numbers") from None
    _require(rank > 0 and math.isfinite(alpha) and alpha > 0, "dualref.rank", "rank and alpha must be > 0")
    targets = _json(header, "dualref.target_modules") if "dualref.target_modules" in header else []
    _require(isinstance(targets, list) and all(isinstance(t, str) for t in targets),
             "dualref.target_modules", "must be a JSON list of strings")
    gates = None
    if "dualref.gates" in header:
        gates = _json(header, "dualref.gates")
        _require(isinstance(gates, list) and all(isinstance(g, (int, float)) and math.isfinite(g) and g >= 0
                                                 for g in gates), "dualref.gates", "must be a list of numbers >= 0")
        gates = tuple(float(g) for g in gates)
    fingerprint = header.get("dualref.base_fingerprint")
    if fingerprint is not None:
        _require(bool(_FINGERPRINT.match(fingerprint)), "dualref.base_fingerprint",
                 "must look like flux1:d<D>s<S>w<W>c<C>:<16 hex>")
    sft = header.get("dualref.sft_lora")
    if sft is not None:
        _require(bool(_HASH.match(sft)), "dualref.sft_lora", "must be a sha256 content hash")
    train = _check_train(_json(header, "dualref.train")) if "dualref.train" in header else {}
    return LoraMetadata(header["dualref.layout"], header["dualref.stage"], rank, alpha, tuple(targets),
                        fingerprint, gates, sft, train, header["dualref.format_version"])


def read_dualref_metadata(header: Mapping[str, str] | None) -> LoraMetadata | None:
    """The parsed metadata of a file header, or ``None`` when it has no DualRef keys."""
    ours = {k: v for k, v in (header or {}).items() if k.startswith("dualref.") or k == "format"}
    if not any(k.startswith("dualref.") for k in ours):
        return None
    return parse_header(ours)


# -- safetensors header, read without the safetensors package ------------------------------------

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_RESEND = "export it again (training.lora_io.save_lora) or copy the whole file again"
# Bounds on what a header may be before it is parsed (a hostile file must get a refusal, not a
# RecursionError or minutes of parsing). safetensors itself refuses headers over 100 MB (its
# MAX_HEADER_SIZE), so nothing it can load is refused here. A valid header nests 3 levels (the
# object, a tensor's entry, its shape list); 8 leaves room, and json.loads never sees deep input.
MAX_HEADER_BYTES = 100_000_000
MAX_HEADER_DEPTH = 8  # refused when deeper than this; a header that passes nests at most twice this


def _nesting_problem(raw: bytes) -> str | None:
    """Why ``raw`` must not reach ``json.loads`` (nested too deep, brackets that do not pair), or None.

    The brackets outside strings are kept, then innermost ``[]`` and ``{}`` pairs removed (C-speed
    ``bytes.replace``), which lowers the depth by one or two per pass: a header that nests at most
    ``MAX_HEADER_DEPTH`` levels is empty within that many passes, one left non-empty nests deeper.
    Linear in the header's size whatever it holds (about a second for 100 MB).
    """
    skeleton = _brackets_outside_strings(raw)
    for _ in range(MAX_HEADER_DEPTH):
        if not skeleton:
            return None
        reduced = skeleton.replace(b"[]", b"").replace(b"{}", b"")
        if reduced == skeleton:
            return "its safetensors header is not valid JSON (brackets do not pair up; corrupt file)"
        skeleton = reduced
    if skeleton:
        return (f"its safetensors header nests more than {MAX_HEADER_DEPTH} levels deep (a safetensors header "
                "has 3): a corrupt or hostile file, refused unread")
    return None


def _brackets_outside_strings(raw: bytes, chunk: int = 1 << 24) -> bytes:
    import numpy as np  # vectorised: a per-byte Python loop would take minutes on a 100 MB header

    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes hold no bracket or quote then
    bracket = np.zeros(256, bool)
    bracket[list(b"[]{}")] = True
    kept, quotes = [], 0
    for lo in range(0, len(unescaped), chunk):  # in chunks: a few times 16 MB of memory at most
        data = np.frombuffer(unescaped, np.uint8, count=min(chunk, len(unescaped) - lo), offset=lo)
        parity = (np.cumsum(data == ord('"'), dtype=np.uint8) + quotes) & 1  # uint8 wraps, parity survives
        kept.append(data[bracket[data] & (parity == 0)].tobytes())
        quotes = int(parity[-1])
    return b"".join(kept)


def _short(name, limit: int = 80) -> str:
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_safetensors_header(path: Path, fail: Callable[[str], Exception]) -> tuple[dict[str, dict], dict[str, str], int]:
    """``(tensor entries, __metadata__, data start)`` of an existing safetensors file, checked for
    truncation and corruption without reading the tensors. ``fail(reason)`` makes the caller's
    exception (its type and its fix), so LoRA files and model files share one check.

    Hostile headers are refused before they are parsed: more than :data:`MAX_HEADER_BYTES`, or
    nested deeper than :data:`MAX_HEADER_DEPTH`.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise fail(f"only {size} bytes, not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise fail(f"its safetensors header claims {length / 1e6:.0f} MB, over the {MAX_HEADER_BYTES // 1_000_000} MB "
                       "that safetensors allows: not a safetensors file, or a corrupt or hostile one")
        if length > size - 8:
            raise fail("not a safetensors file, or its header is cut off")
        raw = fh.read(length)
    problem = _nesting_problem(raw)
    if problem:
        raise fail(problem)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise fail("its safetensors header is not valid JSON (corrupt file)") from None
    except RecursionError:  # belt and braces: _nesting_problem refuses these first
        raise fail("its safetensors header nests too deeply (a corrupt or hostile file)") from None
    if not isinstance(header, dict):
        raise fail("its safetensors header is not a JSON object (corrupt file)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("its safetensors __metadata__ is not an object of strings (corrupt file)")
    start, end = 8 + length, 8 + length
    for name, entry in header.items():
        try:
            lo, hi = (int(x) for x in entry["data_offsets"])
            count = math.prod(int(x) for x in entry["shape"])
            item = _DTYPE_BYTES.get(entry["dtype"])  # unknown (exotic) dtypes: offsets only
        except (KeyError, TypeError, ValueError, OverflowError):
            raise fail(f"tensor {_short(name)} has a malformed header entry (corrupt file)") from None
        if lo < 0 or hi < lo or (item is not None and hi - lo != count * item):
            raise fail(f"tensor {_short(name)} has inconsistent offsets (corrupt file)")
        end = max(end, start + hi)
    if end > size:
        raise fail(f"truncated: its header needs {end} bytes, the file has {size}")
    return header, metadata, start


def read_safetensors_header(path) -> tuple[dict[str, dict], dict[str, str], int]:
    """``(tensor entries, __metadata__, data start)`` of a LoRA file, checked for truncation."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(path, "no such file", "check the name, or put the file in ComfyUI's models/loras folder")
    return parse_safetensors_header(path, lambda reason: LoraFileError(path, reason, _RESEND))


def lora_modules(keys, path="<state dict>") -> list[str]:
    """Module names (diffusers naming) of a DualRef/diffusers Flux LoRA; clear error for anything else."""
    keys = list(keys)
    if not keys:
        raise LoraFileError(path, "it holds no tensors (an empty or corrupt file)", _RESEND)
    modules, parts, foreign = {}, {}, []
    for key in keys:
        m = _LORA_KEY.match(key)
        if m is None:
            foreign.append(key)
            continue
        parts.setdefault(m["module"], set()).add(m["part"])
    if foreign or not parts:
        raise LoraFileError(path, f"not a FLUX.1 Kontext LoRA in diffusers format ({_describe_foreign(foreign or keys)})",
                            "choose a LoRA trained for FLUX.1 Kontext with DualRef; other LoRAs load with "
                            "ComfyUI's LoraLoaderModelOnly")
    for module, have in parts.items():
        if not {"lora_A.weight", "lora_B.weight"} <= have:
            raise LoraFileError(path, f"module {module!r} lacks lora_A or lora_B (incomplete file)", _RESEND)
        modules[module] = True
    return sorted(modules)


def _describe_foreign(keys) -> str:
    sample = ", ".join(_short(k) for k in list(keys)[:3])
    joined = " ".join(keys[:200])
    if re.search(r"lora_unet_(down|up|mid|input|output)_blocks|lora_te\d?_|model\.diffusion_model\.(input|output)_blocks"
                 r"|unet\.(down|up)_blocks", joined):
        kind = "it looks like a Stable Diffusion 1.x/SDXL LoRA"
    elif re.search(r"double_blocks|single_blocks", joined):
        kind = "it looks like a Flux LoRA in another trainer's (BFL/kohya) naming"
    else:
        kind = "unrecognised keys"
    return f"{kind}; keys like {sample}"


def lora_content_hash(path) -> str:
    """``sha256:<hex>`` of a LoRA file's tensors (name, dtype, shape, bytes; sorted by name).

    The header metadata is not hashed, so re-saving with other metadata keeps the hash.
    """
    entries, _, start = read_safetensors_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for name in sorted(entries):
            entry = entries[name]
            lo, hi = entry["data_offsets"]
            digest.update(f"{name}\0{entry['dtype']}\0{entry['shape']}\0".encode())
            fh.seek(start + lo)
            remaining = hi - lo
            while remaining:
                chunk = fh.read(min(remaining, 16 << 20))
                if not chunk:
                    raise LoraFileError(path, "truncated while hashing", _RESEND)
                digest.update(chunk)
                remaining -= len(chunk)
    return "sha256:" + digest.hexdigest()


# -- base-model fingerprint --------------------------------------------------------------------

def fingerprint_tensors(depth: int, depth_single: int) -> list[tuple[str, str]]:
    """``(diffusers name, BFL/ComfyUI name)`` of the tensors the fingerprint hashes, in order.

    Small tensors present with the same layout in both namings: the image/time input and output
    projections and the first/last blocks' q/k RMSNorm scales (fine-tunes change all of them).
    """
    d, s = depth - 1, depth_single - 1
    return [
        ("x_embedder.weight", "img_in.weight"),
        ("time_text_embed.timestep_embedder.linear_1.weight", "time_in.in_layer.weight"),
        ("proj_out.weight", "final_layer.linear.weight"),
        ("transformer_blocks.0.attn.norm_q.weight", "double_blocks.0.img_attn.norm.query_norm.scale"),
        (f"transformer_blocks.{d}.attn.norm_added_k.weight", f"double_blocks.{d}.txt_attn.norm.key_norm.scale"),
        (f"single_transformer_blocks.{s}.attn.norm_k.weight", f"single_blocks.{s}.norm.key_norm.scale"),
    ]


FINGERPRINT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn)


def base_fingerprint(get: Callable[[str], torch.Tensor], depth: int, depth_single: int,
                     naming: str = "diffusers") -> str:
    """``flux1:d<D>s<S>w<W>c<C>:<16 hex>`` for a FLUX.1 transformer.

    ``get(name)`` returns the tensor of that name in ``naming`` ("diffusers" or "bfl"). Each tensor
    is cast to bfloat16 and then to float8_e4m3fn before hashing, so a bf16/fp16/fp32 copy and
    ComfyUI's fp8_e4m3fn weights of the same base give the same fingerprint. Raises ``TypeError``
    for storage it cannot reproduce (other fp8 kinds, GGUF/quantized tensors).
    """
    column = 0 if naming == "diffusers" else 1
    digest = hashlib.sha256()
    width = channels = None
    for names in fingerprint_tensors(depth, depth_single):
        tensor = get(names[column])
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):  # quantized/GGUF subclasses
            raise TypeError(f"{names[column]} is a {type(tensor).__name__}, not a plain tensor")
        if tensor.dtype not in FINGERPRINT_DTYPES:
            raise TypeError(f"{names[column]} is stored as {tensor.dtype}")
        tensor = tensor.detach().to("cpu")
        if names[0] == "x_embedder.weight":
            width, channels = tensor.shape
        coarse = tensor.to(torch.bfloat16).to(torch.float8_e4m3fn).contiguous()
        digest.update(f"{names[0]}{list(tensor.shape)}".encode())
        digest.update(coarse.view(torch.uint8).numpy().tobytes())
    return f"flux1:d{depth}s{depth_single}w{width}c{channels}:{digest.hexdigest()[:16]}"


def fingerprint_architecture(fingerprint: str) -> str:
    """The ``d..s..w..c..`` part: same architecture <=> same string."""
    m = _FINGERPRINT.match(fingerprint or "")
    return f"d{m[1]}s{m[2]}w{m[3]}c{m[4]}" if m else "unknown"


def base_mismatch(meta: LoraMetadata | None, name: str, path, fingerprint: str | None) -> str | None:
    """A DualRef LoRA against the base it is applied to (the node and the trainers share this check).

    Raises :class:`LoraFileError` naming ``path`` when the architectures differ (it can never
    work); returns the mismatch message when the weights differ (another base of the same shape),
    ``None`` when they match or either fingerprint is unknown. Fingerprints are printed in full:
    their first characters are the architecture, which two bases of one shape share.
    """
    if meta is None or not meta.base_fingerprint or not fingerprint:
        return None
    trained, model = fingerprint_architecture(meta.base_fingerprint), fingerprint_architecture(fingerprint)
    if trained != model:
        raise LoraFileError(path, f"was trained on a {trained} transformer, this model is {model}",
                            "use the LoRA with the base model it was trained on")
    if meta.base_fingerprint != fingerprint:
        return (f"{name} was trained on another base model (fingerprint {meta.base_fingerprint}, this model "
                f"{fingerprint}); load the FLUX.1 Kontext-dev weights it was trained on")
    return None
