"""The benchmark's two generators: headless diffusers (+ dual_rope, LoRAs) and ComfyUI over its API.

Both take the samples still lacking an output and yield one :class:`GenResult` per sample; a
sample that cannot be generated (missing reference, failed job) comes back with its reason and is
reported as such, never scored. ``identity()`` says what makes their outputs what they are: a
run folder refuses to mix outputs of two identities.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from comfy_queue.comfy_errors import WorkflowError
from comfy_queue.fill import load_workflow
from comfy_queue.queue import Job, run_batch
from comfy_queue.task_graphs import TASKS

from .run_folder import BenchError, RunDir, Selected

log = logging.getLogger(__name__)

NO_LORA = "none"


@dataclass
class GenResult:
    selected: Selected
    image: object | None  # HxWx3 uint8 array or the path of a downloaded image; None on error
    error: str | None
    seconds: float


def generate_missing(run: RunDir, selected: list[Selected], generator, accelerator=None) -> dict:
    """Generate the outputs ``run`` lacks; existing ones are kept as they are. Returns counts.

    ``accelerator`` with several processes (the headless generator): each process generates its share
    of the batches and saves those outputs; the main process writes every generation line (each with
    its ``rank``) and the counts are of all processes, ``per_rank`` how many each one did."""
    sharded = accelerator is not None and accelerator.num_processes > 1
    have = run.output_ids()
    todo = [s for s in selected if s.id not in have]
    counts = {"reused": len(selected) - len(todo), "generated": 0, "errors": 0}
    start = time.perf_counter()
    if sharded:
        accelerator.wait_for_everyone()  # every process read the same outputs before any is written
    rank = accelerator.process_index if sharded else None
    lines = []
    for result in generator.generate(todo, run, **({"accelerator": accelerator} if sharded else {})) if todo else ():
        error = result.error
        if error is None:
            try:
                run.save_output(result.selected.id, result.image)
            except (OSError, ValueError) as e:
                error = f"could not save the output ({e})"
        lines.append(run.log_generation(result.selected, generator.kind, error, result.seconds, rank))
        counts["generated" if error is None else "errors"] += 1
        if error is not None:
            log.warning("no output for %s: %s", result.selected.id, error)
    if sharded:
        from ..runtime import gather_objects  # torch-heavy: see HeadlessGenerator.__init__

        lines = gather_objects(accelerator, lines)
        if accelerator.is_main_process:
            for line in lines:
                run.append_generation(line)
        counts["per_rank"] = gather_objects(accelerator, [counts["generated"] + counts["errors"]])
        counts["generated"] = sum(line["status"] == "ok" for line in lines)
        counts["errors"] = len(lines) - counts["generated"]
    counts["seconds"] = round(time.perf_counter() - start, 2)
    return counts


# -- headless -----------------------------------------------------------------------------------------
class HeadlessGenerator:
    """Deterministic Euler sampling of a Kontext model (diffusers folder or the toy base) with the
    dual_rope layout and optional LoRAs, as ``training.evaluation.sample_split`` samples: same cache,
    same batches by shape, same per-sample seeds, so a full run reproduces its outputs exactly."""

    kind = "headless"

    def __init__(self, model="toy", loras=(), layout: str = "diagonal", steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, batch_size: int = 16, cache_dir=None,
                 max_pixels: int = 512 * 512, bundle=None, progress: bool = True):
        # torch-heavy modules load when a headless generator is made: --help and --compare stay light
        from dual_rope import METHODS

        # torch-heavy modules load when a headless generator is made: --help and --compare stay light
        from ..evaluation import sampler_config
        from ..lora_io import load_lora

        if layout not in METHODS:
            raise BenchError(f"unknown --layout {layout!r}; use one of {', '.join(METHODS)}")
        if bundle is None:
            raise BenchError("HeadlessGenerator needs a loaded model (training.models.load_model)")
        self.bundle, self.model_arg = bundle, str(model)  # model: the name in labels ("toy", or what the user gave)
        self.loras = []
        for path, scale in loras:
            path = Path(path)
            if not path.is_file():
                raise BenchError(f"LoRA file not found: {path}; pass the .safetensors written by "
                                 "python -m training.sft / training.ddpo")
            self.loras.append((path, float(scale), load_lora(path)[1]))
        self.layout, self.seed, self.batch_size = layout, int(seed), int(batch_size)
        self.cache_dir, self.max_pixels, self.progress = cache_dir, int(max_pixels), progress
        self.config = sampler_config(self.bundle.settings, steps, guidance)
        self.warnings: list[str] = []
        self.gates = self._check_loras() if self.loras else None

    @property
    def label(self) -> str:
        name = "toy" if self.model_arg == "toy" else self.bundle.source.name
        layout = "" if self.layout == "diagonal" else f" ({self.layout})"
        return "+".join([name] + [p.stem for p, _, _ in self.loras]) + layout

    def identity(self) -> dict:
        from ..lora_io import lora_content_hash  # torch-heavy: see __init__

        return {"generator": self.kind, "transformer": self.bundle.fingerprint("transformer"),
                "vae": self.bundle.fingerprint("vae"), "layout": self.layout, "seed": self.seed,
                "steps": self.config.num_steps, "guidance": list(self.config.guidance), "shift": self.config.shift,
                "loras": [[lora_content_hash(p), scale] for p, scale, _ in self.loras]}

    def describe(self) -> dict:
        return {"generator": self.kind, "model": self.model_arg, "model_path": str(self.bundle.source.root or ""),
                "loras": [{"path": str(p.resolve()), "scale": s, "stage": m.stage if m else None}
                          for p, s, m in self.loras],
                "layout": self.layout, "steps": self.config.num_steps, "guidance": self.config.guidance[0],
                "seed": self.seed, "warnings": self.warnings}

    def _check_loras(self) -> list[float] | None:
        """Fail on a LoRA for another base model; warn on a layout mismatch. Returns the learned gates."""
        # torch-heavy modules load when a headless generator is made: --help and --compare stay light
        from dual_rope.lora_meta import base_mismatch

        gates = None
        base = self.bundle.base_fingerprint()
        for path, _, meta in self.loras:
            if meta is None:
                continue
            mismatch = base_mismatch(meta, f"LoRA {path}", path, base)  # DualLoRAApply's check
            if mismatch:
                raise BenchError(f"{mismatch} (pass the --model it was trained on, or a LoRA trained on this one)")
            if meta.layout != self.layout:
                self.warnings.append(f"LoRA {path.name} was trained with layout {meta.layout!r} but is sampled "
                                     f"with {self.layout!r}")
                log.warning(self.warnings[-1])
            if meta.gates:  # learned gates compound across the stacked LoRAs, as in DualLoRAApply
                prev, new = list(gates or []), list(meta.gates)
                gates = [(prev[k] if k < len(prev) else 1.0) * (new[k] if k < len(new) else 1.0)
                         for k in range(max(len(prev), len(new)))]
        return gates

    def generate(self, todo: list[Selected], run: RunDir, accelerator=None) -> Iterator[GenResult]:
        """``accelerator`` with several processes: every process is given the same ``todo``, encodes
        its share of what the cache lacks and samples every ``processes``-th batch (the batches one
        process would make, so the outputs are the same)."""
        import torch
        from tqdm import tqdm

        from ..cache import CachedDataset, EmbeddingCache, encode_shared, prepare_cache  # torch-heavy: see __init__
        from ..data import Record, check_image, to_uint8
        from ..evaluation import applied_loras, by_bucket, sample_batch

        records, by_index = [], {s.index: s for s in todo}
        for s in todo:
            refs = [run.root / p for p in s.sample.images]
            problems = [f"reference {k + 1} {p}: {why}" for k, p in enumerate(refs) if (why := check_image(p))]
            if problems:
                yield GenResult(s, None, "; ".join(problems), 0.0)
                continue
            target = run.root / s.sample.target if s.sample.target else None
            if target is not None and check_image(target):
                target = None  # the output then takes reference 1's size; the report shows no target
            records.append(Record(s.index, s.sample, refs, target))  # line_no carries the seed index
        if not records:
            return
        cache_root = Path(self.cache_dir) if self.cache_dir else run.root / ".cache"
        cache = EmbeddingCache.for_bundle(cache_root, self.bundle)
        part = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
        if part[1] > 1:
            [(entries, stats)] = encode_shared([(records, None)], self.bundle, cache, accelerator,
                                               max_pixels=self.max_pixels, skip_bad=True, progress=self.progress,
                                               manifest=run.manifest)
        else:
            entries, stats = prepare_cache(records, self.bundle, cache, max_pixels=self.max_pixels, skip_bad=True,
                                           progress=self.progress, manifest=run.manifest)
        for index, reason in stats.failed if part[0] == 0 and stats.failed else []:  # reported once
            yield GenResult(by_index[index], None, reason, 0.0)
        dataset = CachedDataset(entries, cache)
        chunks = by_bucket(dataset, range(len(dataset)), self.batch_size)[part[0]::part[1]]
        with applied_loras(self.bundle, [(p, s) for p, s, _ in self.loras]):
            transformer = self.bundle.transformer
            for chunk in tqdm(chunks, desc=f"generating ({self.layout})", unit="batch", disable=not self.progress):
                picked = [by_index[entries[i].record.line_no] for i in chunk]
                start = time.perf_counter()
                try:
                    with torch.no_grad():
                        latents = sample_batch(transformer, dataset.batch(chunk), self.layout, self.config,
                                               [s.seed for s in picked], self.gates, self.bundle.device)
                        pixels = self.bundle.decode_latents(latents)
                except (RuntimeError, ValueError) as e:  # reported per sample; the rest of the run goes on
                    log.exception("sampling failed for %s", [s.id for s in picked])
                    for s in picked:
                        yield GenResult(s, None, f"sampling failed ({type(e).__name__}: {e})", 0.0)
                    continue
                each = (time.perf_counter() - start) / len(chunk)
                for s, p in zip(picked, pixels):
                    yield GenResult(s, to_uint8(p), None, each)


# -- ComfyUI --------------------------------------------------------------------------------------------
def _nodes(graph: dict, class_type: str) -> list[str]:
    return [nid for nid, node in graph.items() if node.get("class_type") == class_type]


def apply_overrides(graph: dict, where: str, *, model=None, sft_lora=None, ddpo_lora=None, layout=None,
                    steps=None, guidance=None) -> dict:
    """A copy of an API graph with the benchmark's settings set on the standard nodes.

    ``sft_lora="none"`` takes DualLoRAApply out (its consumers read the model it was given): the base.
    """

    graph = copy.deepcopy(graph)

    def put(class_type: str, name: str, value, flag: str):
        ids = _nodes(graph, class_type)
        if not ids:
            raise WorkflowError(f"{where}: no {class_type} node to apply {flag} to; use a workflow that has one")
        for nid in ids:
            graph[nid].setdefault("inputs", {})[name] = value

    if model is not None:
        put("UNETLoader", "unet_name", model, "--model")
    if layout is not None:
        put("DiagonalPositionPatch", "method", layout, "--layout")
    if steps is not None:
        put("KSampler", "steps", int(steps), "--steps")
    if guidance is not None:
        put("FluxGuidance", "guidance", float(guidance), "--guidance")
    if sft_lora == NO_LORA:
        if ddpo_lora not in (None, NO_LORA):
            raise WorkflowError(f"{where}: --lora2 needs an SFT --lora under it (DualLoRAApply stacks DDPO on SFT)")
        for nid in _nodes(graph, "DualLoRAApply"):
            source = graph.pop(nid)["inputs"]["model"]
            for node in graph.values():
                for key, value in node.get("inputs", {}).items():
                    if isinstance(value, list) and len(value) == 2 and str(value[0]) == nid:
                        if value[1] != 0:
                            raise WorkflowError(f"{where}: node uses DualLoRAApply's report output; cannot bypass it")
                        node["inputs"][key] = source
        return graph
    if sft_lora is not None:
        put("DualLoRAApply", "sft_lora", sft_lora, "--lora")
    if ddpo_lora is not None:
        put("DualLoRAApply", "ddpo_lora", "None" if ddpo_lora == NO_LORA else ddpo_lora, "--lora2")
    return graph


# Loader inputs that name a file in a ComfyUI models folder, and that folder.
MODEL_INPUTS = {"unet_name": "diffusion_models", "ckpt_name": "checkpoints", "lora_name": "loras",
                "sft_lora": "loras", "ddpo_lora": "loras", "vae_name": "vae", "clip_name": "text_encoders",
                "clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name3": "text_encoders"}


def named_model_files(graphs: dict) -> list[tuple[str, str]]:
    """``(models folder, file name)`` of every model and LoRA file the graphs load."""
    named = set()
    for graph in graphs.values():
        for node in graph.values():
            for key, value in node.get("inputs", {}).items():
                if key in MODEL_INPUTS and isinstance(value, str) and value not in ("", "None", NO_LORA):
                    named.add((MODEL_INPUTS[key], value))
    return sorted(named)


def server_model_files(servers, files, timeout: float = 30.0) -> dict:
    """What the servers say about each named file, for the outputs' identity: its size and
    modification time (``/experiment/models/<folder>``, ComfyUI >= 0.3) and a digest of its
    safetensors header (``/view_metadata/<folder>``; DualRef LoRAs carry their training facts
    there). ComfyUI serves no content hashes and no model bytes, so size + time + header are what
    can be known; a file replaced under the same name changes its time. A file no server can
    describe is marked ``unverified`` and the run folder then refuses to reuse outputs."""
    import requests

    facts: dict[str, dict] = {}
    with requests.Session() as session:
        session.trust_env = False
        listings = {}
        for server in servers:
            for folder in sorted({f for f, _ in files}):
                try:
                    r = session.get(f"{server.rstrip('/')}/experiment/models/{folder}", timeout=timeout)
                    listings[server, folder] = {e["name"]: e for e in r.json()} if r.ok else None
                except (requests.RequestException, ValueError, KeyError, TypeError):
                    listings[server, folder] = None
        for folder, name in files:
            seen = []
            for server in servers:
                listing = listings[server, folder]
                if listing is None:
                    seen.append(None)
                    continue
                entry = listing.get(name)
                if entry is None:
                    seen.append({"absent": True})
                    continue
                header = None
                if name.endswith(".safetensors"):
                    try:
                        r = session.get(f"{server.rstrip('/')}/view_metadata/{folder}", params={"filename": name},
                                        timeout=timeout)
                        if r.ok:
                            blob = json.dumps(r.json(), sort_keys=True).encode()
                            header = hashlib.sha256(blob).hexdigest()[:16]
                    except (requests.RequestException, ValueError):
                        pass
                seen.append({"size": entry.get("size"), "modified": entry.get("modified"), "header": header})
            key = f"{folder}/{name}"
            if any(v is None or v.get("size") is None for v in seen if not (v or {}).get("absent")):
                facts[key] = {"unverified": True}
            elif any(v.get("absent") for v in seen):
                facts[key] = {"absent_on": [s for s, v in zip(servers, seen) if v.get("absent")]}
            else:
                sizes, headers = {v["size"] for v in seen}, {v["header"] for v in seen}
                if len(sizes) > 1 or len(headers) > 1:
                    raise BenchError(f"the servers hold different files named {name} in models/{folder} "
                                     f"({', '.join(servers)}); copy the same file to each")
                facts[key] = {"size": sizes.pop(), "header": headers.pop(),
                              "modified": max(v["modified"] or 0 for v in seen)}
    return facts


class ComfyGenerator:
    """Queues each sample's task workflow (``comfy_queue/api/<task>.json``, or ``<workflow_dir>/<task>.json``)
    on one or more ComfyUI servers with ``comfy_queue.queue.run_batch``. Model and LoRA names are file
    names in the servers' models folders."""

    kind = "comfyui"

    def __init__(self, servers, workflow_dir=None, model=None, sft_lora=None, ddpo_lora=None, layout=None,
                 steps=None, guidance=None, seed: int = 0, timeout: float | None = None, progress: bool = True):

        if not servers:
            raise BenchError("--generator comfyui needs at least one --server URL (e.g. http://127.0.0.1:8188)")
        self.servers, self.seed, self.timeout, self.progress = list(servers), int(seed), timeout, progress
        self.settings = dict(model=model, sft_lora=sft_lora, ddpo_lora=ddpo_lora, layout=layout, steps=steps,
                             guidance=guidance)
        self.graphs = {}
        for task in TASKS:
            path = Path(workflow_dir) / f"{task}.json" if workflow_dir else None
            if path is not None and not path.is_file():
                continue
            self.graphs[task] = apply_overrides(load_workflow(task, path), str(path or task), **self.settings)
        if not self.graphs:
            raise BenchError(f"no <task>.json API workflows in {workflow_dir}")
        self.paths: dict[str, Path] = {}
        self._files: dict | None = None

    @property
    def label(self) -> str:
        lora = self.settings["sft_lora"]
        parts = ["comfyui", self.settings["model"] or "workflow model"]
        if lora != NO_LORA:
            parts.append(Path(lora).stem if lora else "workflow LoRA")
        if self.settings["ddpo_lora"] not in (None, NO_LORA):
            parts.append(Path(self.settings["ddpo_lora"]).stem)
        layout = self.settings["layout"]
        return "+".join(parts) + (f" ({layout})" if layout not in (None, "diagonal") else "")

    def identity(self) -> dict:
        """The workflows, the seed, and what the servers say about the model and LoRA files the
        workflows name (see :func:`server_model_files`), so a LoRA replaced under the same name on
        a server does not pass for the one that made the outputs."""
        blob = json.dumps(self.graphs, sort_keys=True).encode()
        if self._files is None:
            self._files = server_model_files(self.servers, named_model_files(self.graphs))
        return {"generator": self.kind, "workflows": hashlib.sha256(blob).hexdigest()[:16], "seed": self.seed,
                "files": self._files}

    def describe(self) -> dict:
        return {"generator": self.kind, "servers": self.servers, "seed": self.seed,
                **{k: v for k, v in self.settings.items() if v is not None}}

    def _workflow_path(self, run: RunDir, task: str) -> Path:
        """The exact graph queued for ``task``, kept in the run folder (what ran, and how to rerun it)."""
        if task not in self.paths:
            path = run.root / "workflows" / f"{task}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.graphs[task], indent=2, sort_keys=True) + "\n")
            self.paths[task] = path
        return self.paths[task]

    def generate(self, todo: list[Selected], run: RunDir) -> Iterator[GenResult]:

        jobs, by_id = [], {}
        for s in todo:
            if len(s.sample.images) != 2:
                yield GenResult(s, None, "the ComfyUI task workflows take two references; use --generator headless "
                                "for single-reference samples", 0.0)
            elif s.sample.task not in self.graphs:
                yield GenResult(s, None, f"no API workflow for task {s.sample.task}", 0.0)
            else:
                image1, image2 = (str(run.root / p) for p in s.sample.images)
                jobs.append(Job(image1, image2, s.sample.instruction, s.sample.task,
                                str(self._workflow_path(run, s.sample.task)), s.seed, s.id))
                by_id[s.id] = s
        if not jobs:
            return
        downloads = run.root / "comfy"
        for result in run_batch(self.servers, jobs, downloads, resume=False, timeout=self.timeout,
                                progress=self.progress):
            s = by_id[result.job.id]
            if result.ok and result.outputs:
                yield GenResult(s, downloads / result.outputs[0], None, result.seconds)
            else:
                yield GenResult(s, None, result.error or "the job saved no image", result.seconds)
