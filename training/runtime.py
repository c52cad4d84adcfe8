"""What every job's loop needs around the model: the accelerator, the metrics log, even picks."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError

FSDP_BLOCKS = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]


def make_accelerator(distributed: str = "ddp"):
    """The one accelerator construction: the GPU where there is one, DDP across processes, or FSDP2
    (``distributed="fsdp"``) wrapping each Flux block.

    bf16 autocast is the jobs' own (FlowMatchingModel.autocast, the DDPO policy), not accelerate's:
    its mixed_precision is process-global state, which would forbid a second in-process run with
    another precision."""
    from accelerate import Accelerator

    kwargs = {"cpu": not torch.cuda.is_available()}
    if distributed == "fsdp":
        if not torch.cuda.is_available():
            raise ConfigError("train.distributed=fsdp needs GPUs; use ddp on CPU")
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            transformer_cls_names_to_wrap=FSDP_BLOCKS)
    return Accelerator(**kwargs)


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices evenly spread over ``range(count)`` (manifests are often sorted by task)."""
    n = min(count, wanted)
    return [i * count // n for i in range(n)] if n else []


class MetricsLog:
    """``metrics.jsonl`` on the main process; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(k + "\n" for k in kept))
        elif enabled and resume_step is None:
            path.write_text("")

    def write(self, **values) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(values, sort_keys=True) + "\n")
