"""Cost of DiagonalPositionPatch in real ComfyUI sampling, measured side by side in one run.

Three runs of the same model, same inputs, interleaved (the order rotates every repeat):
  native  ComfyUI's own ``offset`` method (unpatched model, two reference latents)
  g=1     DiagonalPositionPatch, strengths (1, 1): targets <= 1.01x time, no extra memory
  g!=1    DiagonalPositionPatch, strengths (1, 0.5): target <= 1.10x time
Time: median wall time of a full ``comfy.sample.sample`` call. Peak memory: CUDA peak allocated
bytes above the start of the run; on CPU, the peak of glibc's in-use heap (mallinfo2) above the
start, sampled by a thread.

    python bench/patch_overhead.py                   # small random FLUX on this machine (CPU ok)
    python bench/patch_overhead.py --full            # full-size Kontext, random bf16, GPU: 512^2 and 1024^2

Needs the ComfyUI host (COMFYUI_PATH or ~/comfy/ComfyUI); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # host discovery and model builders shared with the tests

import torch  # noqa: E402
from comfy_host import import_host, load_pack  # noqa: E402
from comfy_models import build_flux, conditioning, flux_unet_config  # noqa: E402

SMALL = dict(hidden=128, heads=2, axes=(8, 28, 28), depth=1, single=1, context=64, vec=64)
FULL = dict(hidden=3072, heads=24, axes=(16, 56, 56), depth=19, single=38, context=4096, vec=768)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())


def measure_peak(fn, device: torch.device) -> float | None:
    """Peak bytes allocated above the start while ``fn`` runs (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    in_use = _heap_in_use()
    if in_use is None:
        fn()
        return None
    start = in_use()
    peak, stop = [start], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], in_use())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        fn()
    finally:
        stop.set()
        poller.join()
    return max(peak[0], in_use()) - start


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def make_runs(adapter, model, image_px: int, ref_px: tuple[tuple[int, int], ...], text_tokens: int, steps: int):
    """name -> zero-argument sampling call, all on the same model, noise and references."""
    import comfy.sample

    config = model.model.diffusion_model.params
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, text_tokens, config.context_in_dim, generator=gen)
    pooled = torch.randn(1, config.vec_in_dim, generator=gen)
    refs = [torch.randn(1, 16, h // 8, w // 8, generator=gen) for h, w in ref_px]
    latent = torch.zeros(1, 16, image_px // 8, image_px // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    native_cond = conditioning(context, pooled, refs, reference_latents_method="offset")
    patched_cond = conditioning(context, pooled, refs)
    models = {
        "native offset": (model, native_cond),
        "diagonal g=1": (adapter.apply_position_patch(model, "diagonal", (1.0, 1.0)), patched_cond),
        "diagonal g=(1,0.5)": (adapter.apply_position_patch(model, "diagonal", (1.0, 0.5)), patched_cond),
    }

    def sampler(m, cond):
        return lambda: comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", cond, cond, latent,
                                           disable_pbar=True, seed=0)

    return {name: sampler(m, cond) for name, (m, cond) in models.items()}


def bench(runs: dict, device: torch.device, repeats: int, memory_repeats: int = 6) -> dict:
    """name -> (median s, min s, median of per-repeat time ratios to native, median peak bytes)."""
    names = list(runs)
    for name in names:  # warm-up: model load, kernels, allocator
        runs[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(runs[name], device))
    peaks = {name: [] for name in names}
    for r in range(memory_repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            peaks[name].append(measure_peak(runs[name], device))
    base = times[names[0]]
    return {
        name: (statistics.median(t), min(t), statistics.median(a / b for a, b in zip(t, base)),
               None if None in peaks[name] else statistics.median(peaks[name]))
        for name, t in times.items()
    }


def report(title: str, results: dict) -> None:
    base_peak = results["native offset"][3]
    print(f"\n{title}")
    base_min = results["native offset"][1]
    print(f"{'run':<20}{'median s':>10}{'min s':>9}{'time ratio':>12}{'min ratio':>11}"
          f"{'peak MiB':>10}{'mem ratio':>11}")
    for name, (median, fastest, ratio, peak) in results.items():
        peak_txt = f"{peak / 2**20:10.2f}" if peak is not None else f"{'n/a':>10}"
        mem_ratio = f"{peak / base_peak:11.3f}" if peak is not None and base_peak else f"{'n/a':>11}"
        print(f"{name:<20}{median:10.4f}{fastest:9.4f}{ratio:11.3f}x{fastest / base_min:10.3f}x{peak_txt}{mem_ratio}")
    print("time ratio: median over repeats of (this run / native run of the same repeat); "
          "min ratio: fastest / fastest native")


def run_full(adapter, device, config: dict, sizes=(512, 1024), repeats=3, steps=4, text_tokens=512) -> None:
    model = build_flux(flux_unet_config(**config), seed=0, dtype=torch.bfloat16, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"Kontext-shaped transformer {config}, random bf16 weights, {name}")
    for px in sizes:
        runs = make_runs(adapter, model, px, ((px, px), (px * 3 // 4, px)), text_tokens=text_tokens, steps=steps)
        report(f"{px}x{px} output, references {px}x{px} and {px}x{px * 3 // 4}, {steps} steps, "
               f"{repeats} repeats", bench(runs, device, repeats))
        del runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size Kontext transformer, random bf16 weights, GPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per run (default 40 small, 3 full)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 2 small, 4 full)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for the small run (default 1: steadier on a shared machine)")
    args = parser.parse_args(argv)

    import_host()
    import comfy.model_management

    pack = load_pack()
    adapter = importlib.import_module(pack.__name__ + ".dual_rope.comfy_adapter")
    device = comfy.model_management.get_torch_device()
    if args.full:
        if device.type != "cuda":
            sys.exit("--full builds a 12B-parameter transformer in bf16: it needs a CUDA GPU (about 30 GB)")
        run_full(adapter, device, FULL, repeats=args.repeats or 3, steps=args.steps or 4)
        return
    repeats, steps = args.repeats or 40, args.steps or 2
    torch.set_num_threads(args.threads)
    model = build_flux(flux_unet_config(**SMALL), seed=0, dtype=torch.float32)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"small random FLUX ({params / 1e6:.1f}M parameters, float32) on {device}, {torch.get_num_threads()} threads")
    runs = make_runs(adapter, model, 512, ((512, 384), (384, 512)), text_tokens=64, steps=steps)
    report(f"512x512 output, references 384x512 and 512x384, {steps} steps, {repeats} repeats",
           bench(runs, device, repeats))


if __name__ == "__main__":
    main()
