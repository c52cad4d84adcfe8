"""An exponential moving average of the trainable (LoRA) weights, for SFT and DDPO.

diffusers' ``EMAModel`` does the averaging (its decay warms up as ``(1 + n) / (10 + n)`` up to the
configured decay, so the first steps do not drag the average towards the random start); this module
adds what the trainers need around it: the averaged weights swapped in for sampling and export, and
a state that rides in the run's checkpoints (safetensors by parameter name + the step count), so a
resumed run ends with the same average as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

EMA_FILE = "ema.safetensors"


class TrainableEMA:
    """EMA of ``named`` (name, parameter) pairs, the trainable ones of a run."""

    def __init__(self, named, decay: float):
        from diffusers.training_utils import EMAModel

        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.decay = float(decay)
        self.model = EMAModel(self.params, decay=self.decay)

    @torch.no_grad()
    def step(self) -> None:
        self.model.step(self.params)

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in the model for the block (sampling, export); the live ones after."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.model.shadow_params)}
        save_file(tensors, str(folder / EMA_FILE),
                  {"optimization_step": str(self.model.optimization_step), "decay": json.dumps(self.decay)})

    @torch.no_grad()
    def load(self, folder) -> None:
        from safetensors import safe_open

        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise ValueError(f"{folder} holds no EMA state ({EMA_FILE}): it was written with the EMA off; "
                             "resume with the same EMA setting")
        with safe_open(str(path), "pt") as f:
            if sorted(f.keys()) != sorted(self.names):
                raise ValueError(f"{path} does not match this run's trainable weights; resume with the same config")
            for name, shadow in zip(self.names, self.model.shadow_params):
                shadow.copy_(f.get_tensor(name))
            self.model.optimization_step = int(f.metadata()["optimization_step"])
