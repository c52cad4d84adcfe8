"""What every job's loop needs around the model: the accelerator, the metrics log, even picks."""
from __future__ import annotations

import json
from datetime import timedelta
import logging
import math
from pathlib import Path

import numpy as np
import torch


log = logging.getLogger(__name__)

FSDP_BLOCKS = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]


def make_accelerator(distributed: str = "ddp", trackers=(), run_dir=None, timeout_min: float = 120.0):
    """The one accelerator construction: the GPU where there is one, DDP across processes, or FSDP2
    (``distributed="fsdp"``) wrapping each Flux block; ``trackers`` (``run.trackers``, checked by
    :func:`training.config.check_trackers`) log into ``<run_dir>/tracking`` (see :class:`MetricsLog`).

    bf16 autocast is the jobs' own (FlowMatchingModel.autocast, the DDPO policy), not accelerate's:
    its mixed_precision is process-global state, which would forbid a second in-process run with
    another precision. ``timeout_min`` (``run.process_group_timeout_min``) is how long a process waits
    for the others at a collective: NCCL's 10-minute default is shorter than one rank's share of a
    large cache or evaluation."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs = {"cpu": not torch.cuda.is_available(),
              "kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(minutes=float(timeout_min)))]}
    if trackers:
        kwargs.update(log_with=list(trackers), project_dir=str(tracking_dir(run_dir)))
    if distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            transformer_cls_names_to_wrap=FSDP_BLOCKS, mixed_precision_policy=fsdp_mixed_precision())
    accelerator = Accelerator(**kwargs)
    if distributed == "fsdp" and accelerator.num_processes > 1 and not accelerator.is_fsdp2:
        # accelerate turns a plugin into FSDP only while it first sets up its process-global state, and only for
        # accelerator backends (state.py: MULTI_GPU, MULTI_XPU, ..., never MULTI_CPU): CPU processes, and a process
        # whose state an earlier accelerator set up (the main job's, before its SFT stage), would get DDP. FSDP2
        # itself runs on CPU/gloo too, so they take the same FSDP2 path (prepare, save_state, get_state_dict).
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = kwargs["fsdp_plugin"]
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does on GPUs
    return accelerator


def fsdp_mixed_precision():
    """FSDP2's policy for a frozen bf16 base with trainable fp32 LoRA (or an all-fp32 full model): each
    parameter is all-gathered in the dtype it is stored in (``param_dtype=None``), so the base moves as
    bf16 and the LoRA keeps its fp32 master values; gradients (the LoRA's, all fp32) are reduced in fp32.
    The bf16 compute is the model's own autocast, as under DDP, so both run the same arithmetic.
    ``param_dtype=bf16`` would also cast every block's floating inputs (``cast_forward_inputs``) and
    the learned gates, which DDP does not. FSDP2 needs one dtype among a block's *trainable*
    parameters only (``FSDPParamGroup._init_mp_dtypes``): fp32 LoRA beside a bf16 base is allowed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)


def gather_objects(accelerator, items: list) -> list:
    """Every process's ``items`` (picklable), concatenated in rank order, on every process; with one
    process (or no accelerator) ``items`` itself."""
    if accelerator is None or accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices evenly spread over ``range(count)`` (manifests are often sorted by task)."""
    n = min(count, wanted)
    return [i * count // n for i in range(n)] if n else []


def tracking_dir(run_dir) -> Path:
    """Where ``run.trackers`` write: TensorBoard events in ``<run>/tracking/<project>``, W&B's offline runs."""
    return Path(run_dir) / "tracking"


def flat_config(values: dict, prefix: str = "") -> dict:
    """A nested config as ``{"optim.lr": 5e-05, ...}`` of numbers, strings and booleans (what TensorBoard's
    hyperparameters and W&B's config take); lists and None as text."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


class MetricsLog:
    """The one metrics writer: ``metrics.jsonl`` on the main process (on resume, lines past the resumed step
    are dropped) and, with ``trackers`` (``run.trackers``), the same numbers through accelerate's trackers
    into ``<run>/tracking``: every numeric value of a line is a scalar at the line's ``step``; :meth:`image`
    logs a picture (validation grids, reward curves). TensorBoard drops a resumed run's events past the
    resumed step too (``purge_step``). Call :meth:`close` when the job ends."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, accelerator=None, trackers=(),
                 project: str = "dualref", config: dict | None = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(k + "\n" for k in kept))
        elif enabled and resume_step is None:
            path.write_text("")
        self.accelerator = accelerator if trackers else None
        if self.accelerator is not None:
            self._start(list(trackers), path.parent, project, config or {}, resume_step)

    def _start(self, names: list[str], run_dir: Path, project: str, config: dict, resume_step: int | None):
        from accelerate.tracking import filter_trackers

        acc, where = self.accelerator, tracking_dir(run_dir)
        if acc.logging_dir is None or Path(acc.logging_dir) != where or [str(t) for t in acc.log_with] != names:
            # an accelerator made for another job (the main job's pipeline runs SFT then DDPO on one)
            acc.project_configuration.logging_dir = str(where)
            acc.log_with = filter_trackers(names, str(where))
        acc.trackers = []  # a previous job's trackers were finished by its close()
        if acc.is_main_process:
            where.mkdir(parents=True, exist_ok=True)
        kwargs = {"wandb": {"dir": str(where)}}
        if resume_step is not None:
            kwargs["tensorboard"] = {"purge_step": resume_step + 1}
        acc.init_trackers(project, config=flat_config(config), init_kwargs=kwargs)

    def write(self, **values) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(values, sort_keys=True) + "\n")
        if self.accelerator is not None:
            scalars = {k: v for k, v in values.items() if k != "step" and isinstance(v, (int, float))
                       and not isinstance(v, bool) and math.isfinite(v)}
            if scalars:
                self.accelerator.log(scalars, step=values.get("step"))

    def image(self, name: str, path: Path, step: int) -> None:
        """The PNG at ``path`` as image ``name`` at ``step`` in every tracker (nothing without trackers)."""
        if self.accelerator is None or not self.accelerator.is_main_process or not Path(path).is_file():
            return
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))[None]  # one image, NHWC
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: pixels}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({name: pixels}, step=step)

    def close(self) -> None:
        """Finish the trackers: what ``accelerator.end_training()`` does for them, without its teardown of the
        process group (the main job runs SFT and DDPO on one accelerator, tests many runs in one process)."""
        if self.accelerator is not None:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
