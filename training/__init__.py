"""Headless training, data, sampling, benchmark and synthesis (never imported by ComfyUI start-up)."""
import os

# Nothing is downloaded at run time: models, tokenizers and configs are local files. Some libraries
# reach for the Hugging Face Hub on import (bitsandbytes, when installed, fetches a CPU kernel through
# `kernels`); offline they fall back at once instead of waiting on the network. Set HF_HUB_OFFLINE=0
# to allow it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
