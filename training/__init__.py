"""Headless training, data, sampling, benchmark and synthesis (never imported by ComfyUI start-up)."""
