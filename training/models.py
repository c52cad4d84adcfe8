"""Loading FLUX.1 Kontext-dev (or the toy base) with no network: one bundle, one loading path.

Every job loads its model with :func:`load_model` (its ``model`` config, the device, the precision);
``"toy"`` as ``model.path`` is resolved to the toy base's folder by the entry points
(:func:`training.toy.base.resolve_model_path`), never here.

``load_kontext(path)`` reads a local diffusers folder (``model_index.json``, ``transformer/``,
``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``,
``scheduler/``); ``load_kontext(transformer=..., vae=..., clip_l=..., t5=...)`` reads ComfyUI-style
single files with the config folders in ``training/model_configs/kontext``. The toy base is such a
folder, so tiny and real models load through the same code.

Components load lazily on first use and can be released (e.g. the 9 GB T5 once the text
embeddings are cached). An optional ``dualref.json`` in the folder holds what diffusers' files do
not: the T5 length, the sampling defaults and the training guidance.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lora_io import transformer_fingerprint
from .model_files import (
    ModelFileError,
    check_files,
    check_kind,
    file_fingerprint,
    load_text_encoder_file,
    load_transformer_file,
    load_vae_file,
    shard_files,
)

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).parent / "model_configs"
KONTEXT_CONFIGS = CONFIG_ROOT / "kontext"
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
_EXPECTED = {"transformer": ("flux_diffusers",), "vae": ("vae_diffusers",), "text_encoder": ("clip",),
             "text_encoder_2": ("t5",)}

__all__ = ["KontextBundle", "KontextSource", "ModelFileError", "load_kontext", "load_model", "resolve_kontext"]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class KontextSource:
    """Where every component of a Kontext model lives; nothing is loaded yet."""

    name: str
    kind: str  # "diffusers" (a folder) or "single_file"
    weights: dict[str, list[Path]]  # component -> its safetensors files
    configs: dict[str, Path]  # component -> folder with its config.json
    tokenizers: dict[str, Path]  # "tokenizer" (CLIP), "tokenizer_2" (T5) -> folder
    settings: dict = field(default_factory=dict)  # dualref.json
    root: Path | None = None


def _settings(folder: Path | None) -> dict:
    defaults = json.loads((KONTEXT_CONFIGS / "dualref.json").read_text())
    if folder is not None and (folder / "dualref.json").is_file():
        return {**defaults, **json.loads((folder / "dualref.json").read_text())}
    return defaults


def _folder_weights(root: Path, component: str) -> list[Path]:
    folder = root / component
    if not (folder / "config.json").is_file():
        raise ModelFileError(root, f"no {component}/config.json in this diffusers folder",
                             "pass the folder of a complete FLUX.1 Kontext-dev download")
    shards = shard_files(folder, component)  # the release shards its transformer and T5
    if shards is not None:
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".ckpt"))
        reason = f"only pickle weights ({', '.join(pickles)})" if pickles else "no .safetensors weights"
        raise ModelFileError(folder, reason, "download the safetensors weights of this component")
    return files


def comfyui_path() -> Path | None:
    """``COMFYUI_PATH``, else ``~/comfy/ComfyUI`` when it exists (DESIGN: real components)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser()
    default = Path("~/comfy/ComfyUI").expanduser()
    return default if default.is_dir() else None


def find_tokenizers(folder=None) -> dict[str, Path]:
    """CLIP and T5 tokenizer folders: from ``folder`` (diffusers ``tokenizer/``+``tokenizer_2/``, or a
    ComfyUI checkout / its ``comfy`` folder), else from the ComfyUI checkout at ``COMFYUI_PATH``."""
    layouts = (("tokenizer", "tokenizer_2"), ("sd1_tokenizer", "text_encoders/t5_tokenizer"),
               ("comfy/sd1_tokenizer", "comfy/text_encoders/t5_tokenizer"))
    places = [Path(folder).expanduser()] if folder else []
    if not places and comfyui_path() is not None:
        places.append(comfyui_path())
    for place in places:
        for clip, t5 in layouts:
            if (place / clip).is_dir() and (place / t5).is_dir():
                return {"tokenizer": place / clip, "tokenizer_2": place / t5}
    where = f"in {places[0]}" if places else "(no model.tokenizers folder given and no COMFYUI_PATH set)"
    raise ModelFileError(
        places[0] if places else "tokenizers", f"no CLIP + T5 tokenizer folders found {where}",
        "pass model.tokenizers=<folder with tokenizer/ (CLIP) and tokenizer_2/ (T5)> from a diffusers "
        "FLUX.1-Kontext-dev download, or set COMFYUI_PATH to a ComfyUI checkout (comfy/sd1_tokenizer, "
        "comfy/text_encoders/t5_tokenizer); nothing is downloaded")


def resolve_kontext(path=None, *, transformer=None, vae=None, clip_l=None, t5=None, tokenizers=None,
                    configs=KONTEXT_CONFIGS) -> KontextSource:
    """Locate and check every component (files exist, are whole safetensors of the right kind)."""
    if path is not None:
        root = Path(path).expanduser()
        if str(path) == "toy":
            raise ModelFileError("model.path", "'toy' names the toy base, which the entry points resolve to its folder",
                                 "run it through python -m training.sft / .ddpo / .bench, or pass "
                                 "training.toy.base.resolve_model_path('toy')")
        if root.is_file():  # a single transformer file given as the model
            transformer = root
        elif not (root / "model_index.json").is_file():
            raise ModelFileError(root, "not a diffusers model folder (no model_index.json)",
                                 "pass a FLUX.1 Kontext-dev diffusers folder, or single files as "
                                 "model.transformer / vae / clip_l / t5")
        else:
            weights = {c: _folder_weights(root, c) for c in COMPONENTS}
            for component, files in weights.items():  # a component is judged by all its shards together
                check_files(files, _EXPECTED[component], f"{component} (diffusers folder)",
                            files[0] if len(files) == 1 else root / component)
            tokenizers_found = {t: root / t for t in ("tokenizer", "tokenizer_2")}
            for name, folder in tokenizers_found.items():
                if not folder.is_dir():
                    raise ModelFileError(root, f"no {name}/ folder", "copy the tokenizer folders of the model too")
            return KontextSource(root.name, "diffusers", weights, {c: root / c for c in COMPONENTS},
                                 tokenizers_found, _settings(root), root)
    files = {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "text_encoder_2": t5}
    missing = [k for k, v in files.items() if v is None]
    if missing:
        names = {"transformer": "model.transformer (flux1-kontext-dev.safetensors)", "vae": "model.vae (ae.safetensors)",
                 "text_encoder": "model.clip_l (clip_l.safetensors)", "text_encoder_2": "model.t5 (t5xxl_fp16.safetensors)"}
        raise ModelFileError("model", f"single-file loading needs every component; missing {', '.join(missing)}",
                             "pass " + ", ".join(names[m] for m in missing) + ", or a diffusers folder as model.path")
    configs = Path(configs)
    weights = {c: [Path(p).expanduser()] for c, p in files.items()}
    kinds = {"transformer": ("flux_bfl", "flux_diffusers"), "vae": ("vae_ldm", "vae_diffusers"),
             "text_encoder": ("clip",), "text_encoder_2": ("t5",)}
    roles = {"transformer": "transformer", "vae": "VAE", "text_encoder": "CLIP-L text encoder",
             "text_encoder_2": "T5-XXL text encoder"}
    for component, (f,) in weights.items():
        check_kind(f, kinds[component], roles[component])
    return KontextSource(Path(transformer).stem, "single_file", weights, {c: configs / c for c in COMPONENTS},
                         find_tokenizers(tokenizers), _settings(configs), None)


class KontextBundle:
    """The Kontext components, loaded on first use; encode/decode helpers shared by SFT, DDPO, bench."""

    def __init__(self, source: KontextSource, dtype=torch.float32, vae_dtype=torch.float32, device="cpu",
                 text_dtype=torch.float32):
        self.source, self.dtype, self.vae_dtype, self.device = source, dtype, vae_dtype, torch.device(device)
        self.text_dtype = text_dtype
        self._loaded: dict[str, object] = {}
        self._fingerprints: dict[str, str] = {}

    # -- components -------------------------------------------------------------------------------
    def _load(self, name: str):
        if name in self._loaded:
            return self._loaded[name]
        src = self.source
        log.info("loading %s of %s", name, src.name)
        if name in ("tokenizer", "tokenizer_2"):
            from transformers import AutoTokenizer

            obj = AutoTokenizer.from_pretrained(str(src.tokenizers[name]), local_files_only=True)
        elif src.kind == "diffusers":
            obj = self._load_from_folder(name)
        elif name == "transformer":
            obj = load_transformer_file(src.weights[name][0], src.configs[name].parent, self.dtype, self.device)
        elif name == "vae":
            obj = load_vae_file(src.weights[name][0], src.configs[name].parent, self.vae_dtype, self.device)
        else:
            kind = "clip" if name == "text_encoder" else "t5"
            obj = load_text_encoder_file(src.weights[name][0], src.configs[name], kind, self.text_dtype, self.device)
        if isinstance(obj, torch.nn.Module):
            obj = obj.to(self.device).eval()  # already there (loaded onto it); moves nothing, casts nothing
            if name != "transformer":
                obj.requires_grad_(False)  # the VAE and text encoders stay frozen (as Kontext's)
            # as loaded, before any job casts it: what the rehearsal (tests/test_rehearsal.py) checks
            log.info("loaded %s: %d parameters in %s on %s", name, sum(p.numel() for p in obj.parameters()),
                     ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in obj.parameters()})), self.device)
        self._loaded[name] = obj
        return obj

    def _load_from_folder(self, name: str):
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        cls = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": T5EncoderModel}[name]
        dtype = {"transformer": self.dtype, "vae": self.vae_dtype}.get(name, self.text_dtype)
        # Meta init + shards read straight into ``dtype`` (both libraries' low-memory path), onto the device.
        placement = {} if self.device.type == "cpu" else {"device_map": {"": str(self.device)}}
        kwargs = {"torch_dtype": dtype, "low_cpu_mem_usage": True} if name in ("transformer", "vae") else {"dtype": dtype}
        try:
            return cls.from_pretrained(str(self.source.configs[name]), local_files_only=True, use_safetensors=True,
                                       **kwargs, **placement)
        except (OSError, RuntimeError, ValueError) as e:
            raise ModelFileError(self.source.configs[name], f"could not load the {name} ({e})",
                                 "check that the folder holds a complete, matching download") from e

    transformer = property(lambda self: self._load("transformer"))
    vae = property(lambda self: self._load("vae"))
    text_encoder = property(lambda self: self._load("text_encoder"))
    text_encoder_2 = property(lambda self: self._load("text_encoder_2"))
    tokenizer = property(lambda self: self._load("tokenizer"))
    tokenizer_2 = property(lambda self: self._load("tokenizer_2"))

    def release(self, *names: str) -> None:
        """Drop loaded components (default: the text encoders) to free memory; they reload on use."""
        for name in names or ("text_encoder", "text_encoder_2"):
            self._loaded.pop(name, None)

    # -- facts --------------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return self.source.settings

    @property
    def max_sequence_length(self) -> int:
        return int(self.settings.get("max_sequence_length", 512))

    @property
    def vae_scale_factor(self) -> int:
        config = json.loads((self.source.configs["vae"] / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides are multiples of this: VAE downsampling x the 2x2 token patch."""
        return self.vae_scale_factor * 2

    def fingerprint(self, part: str) -> str:
        """Content hash of ``transformer``, ``vae`` or ``text`` (both encoders + tokenizers + length + the
        dtype they run in: bf16 and fp32 embeddings differ, and the text cache is keyed by this)."""
        if part not in self._fingerprints:
            src = self.source
            if part == "text":
                files = src.weights["text_encoder"] + src.weights["text_encoder_2"]
                files += sorted(p for t in src.tokenizers.values() for p in t.iterdir() if p.is_file())
                dtype = str(self.text_dtype).removeprefix("torch.")
                value = hashlib.sha256(
                    f"{file_fingerprint(files)}:{self.max_sequence_length}:{dtype}".encode()).hexdigest()[:20]
            else:
                value = file_fingerprint(src.weights[part])
            self._fingerprints[part] = value
        return self._fingerprints[part]

    def base_fingerprint(self) -> str:
        """The LoRA metadata's base-model fingerprint (training.lora_io.transformer_fingerprint)."""
        if "base" not in self._fingerprints:

            self._fingerprints["base"] = transformer_fingerprint(self.transformer)
        return self._fingerprints["base"]

    # -- encode / decode ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/f, W/f): (mean - shift) * scale."""
        vae = self.vae
        latent = vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist.mode()
        shift = vae.config.shift_factor or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1] (not clamped)."""
        vae = self.vae
        z = latents.to(self.device, self.vae_dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(z).sample.float()

    @torch.no_grad()
    def encode_prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 embeddings (B, L, D), CLIP pooled (B, D')), as FluxKontextPipeline encodes a prompt."""
        clip, t5 = self.text_encoder, self.text_encoder_2
        clip_len = clip.config.max_position_embeddings
        ids = self.tokenizer(list(texts), padding="max_length", max_length=clip_len, truncation=True,
                             return_tensors="pt").input_ids
        pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output
        ids2 = self.tokenizer_2(list(texts), padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt").input_ids
        embeds = t5(ids2.to(self.device), output_hidden_states=False)[0]
        return embeds.float(), pooled.float()


def load_kontext(path=None, *, transformer=None, vae=None, clip_l=None, t5=None, tokenizers=None,
                 dtype=torch.float32, vae_dtype=torch.float32, text_dtype=torch.float32, device="cpu",
                 configs=KONTEXT_CONFIGS) -> KontextBundle:
    """Kontext from a diffusers folder (``path``) or from single files. Nothing is downloaded.

    Components load on first use (``bundle.transformer`` etc.). Jobs call :func:`load_model`.
    """
    source = resolve_kontext(path, transformer=transformer, vae=vae, clip_l=clip_l, t5=t5,
                             tokenizers=tokenizers, configs=configs)
    return KontextBundle(source, dtype=dtype, vae_dtype=vae_dtype, device=device, text_dtype=text_dtype)


def load_model(model, *, device, precision: str) -> KontextBundle:
    """The one way a job loads its model: the ``model`` config section, on ``device``, the transformer
    and both text encoders in ``precision`` (``fp32`` | ``bf16``: T5-XXL is 9 GiB in bf16, 18 in fp32);
    the VAE stays fp32 (168 MiB; latents keyed by its weights). Text embeddings are keyed by the
    encoders' dtype too (:meth:`KontextBundle.fingerprint`), so fp32 and bf16 caches never mix."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return load_kontext(model.path, transformer=model.transformer, vae=model.vae, clip_l=model.clip_l, t5=model.t5,
                        tokenizers=model.tokenizers, device=device, dtype=PRECISIONS[precision],
                        text_dtype=PRECISIONS[precision])
