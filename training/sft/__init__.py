"""Supervised dual-reference LoRA fine-tuning (paper Sec. 3.2): ``python -m training.sft``.

- ``cli``: the command line.
- ``trainer``: the one training loop (LoRA SFT, and full-parameter pretraining of the toy base).
"""
