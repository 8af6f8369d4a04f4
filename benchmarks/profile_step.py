"""Where one training step's time goes: torch.profiler over the engine's `mae.engine.TrainStep`.

throughput.py says how fast the step is; this says why. It runs the step on a synthetic
batch already on the device (warm-up first, which compiles), profiles a few steps and
prints:

- the step's wall time and, on CUDA, how busy the GPU was: kernel time over wall time.
  Well under 1 means the host cannot launch kernels fast enough (CUDA graphs,
  `train.compile_mode: reduce-overhead`, are the cure); near 1 means the kernels
  themselves are the cost.
- device time per step by category: matmul (cuBLAS/CUTLASS GEMMs), attention (SDPA's
  flash, cuDNN or memory-efficient kernels), pointwise (norms, GELU, residuals, masking
  gathers, reductions: Inductor's generated kernels when compiled), optimizer (fused
  AdamW), copy (memcpy, memset, cat, contiguous), other. On a CPU the same split over the self CPU time of aten operators.
- the top kernels (or operators) by time.

    # one H100: ViT-B/16 at 224, batch 256, the engine's compiled bf16 step
    python benchmarks/profile_step.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \\
        --batch-size 256 --compile --json results/bench/profile_vit_b.json
    # this CPU, the Fashion-MNIST model
    python benchmarks/profile_step.py --batch-size 128 --steps 3

The categories are read off kernel and operator names (`category`), so a kernel of a
new name lands in "other"; the top list shows which.
"""

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

from mae.config import COMPILE_MODES, PRECISIONS, config_from_dict, resolved_model_args
from mae.engine import (
    TrainStep, autocast_dtype, build_model, build_optimizer, device_name, select_device, synchronize,
)
from mae.files import write_text_atomic
from mae.models import model_names

CATEGORIES = ("matmul", "attention", "pointwise", "optimizer", "copy", "other")
# substrings of lower-cased kernel / operator names, checked in this order (first match wins).
# Order matters: flash kernels are CUTLASS templates (attention before matmul), and
# Inductor names its generated pointwise and reduction kernels after what they fuse
# ("triton_red_fused__to_copy_...", "triton_poi_fused__scaled_dot_product_flash_attention_
# transpose_..." for the layout work around an attention call), so they are claimed first,
# before the attention and copy patterns see them; its matmul templates are triton_tem_.
PATTERNS = (
    ("optimizer", ("adam", "_foreach_")),
    ("pointwise", ("triton_poi_", "triton_red_", "triton_per_", "cpp_fused")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "triton_tem", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::matmul", "conv")),
    ("pointwise", ("triton_",)),
    ("copy", ("memcpy", "memset", "copy", "aten::cat", "aten::fill_", "contiguous", "aten::clone")),
    ("pointwise", ("elementwise", "layer_norm", "gelu", "softmax", "reduce", "aten::add", "aten::mul",
                   "aten::sum", "aten::sub", "aten::div", "aten::where", "aten::gather", "aten::scatter", "index")),
)


def category(name: str) -> str:
    """The category of a CUDA kernel or aten operator, by its name."""
    low = name.lower()
    for cat, needles in PATTERNS:
        if any(n in low for n in needles):
            return cat
    return "other"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_micro_patch4", choices=model_names())
    p.add_argument("--img-size", type=int, default=None, help="default: the variant's")
    p.add_argument("--in-chans", type=int, default=None, help="default: the variant's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--compile", action="store_true", help="train.compile")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="train.compile_mode")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="train.precision")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (these compile)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--top", type=int, default=15, help="kernels (operators on CPU) listed")
    p.add_argument("--device", default="auto", help="auto (as train.device: cuda, else mps, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def _device_time(row) -> float:
    """Self device time of a profiler row in microseconds (the attribute was renamed in torch 2.4)."""
    return float(getattr(row, "self_device_time_total", None) or getattr(row, "self_cuda_time_total", 0.0))


def breakdown(prof: torch.profiler.profile, device: torch.device, steps: int) -> tuple[dict, list]:
    """({category: ms per step}, [(name, category, ms per step, calls per step)], largest first)."""
    rows = []
    for row in prof.key_averages():
        if device.type == "cuda":
            if row.device_type != DeviceType.CUDA or getattr(row, "is_user_annotation", False):
                # kernels only: a CPU operator's device time repeats its kernels', and so does a
                # user annotation's on the GPU (the optimizer's step: 0.9 ms counted twice)
                continue
            us = _device_time(row)
        else:
            if not row.key.startswith("aten::"):
                continue
            us = float(row.self_cpu_time_total)
        if us > 0:
            rows.append((row.key, category(row.key), us / 1e3 / steps, row.count / steps))
    rows.sort(key=lambda r: -r[2])
    per_category = {c: 0.0 for c in CATEGORIES}
    for _, cat, ms, _ in rows:
        per_category[cat] += ms
    return per_category, rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cfg = config_from_dict({
        "model": {"name": args.model, "img_size": args.img_size, "in_chans": args.in_chans},
        "mask": {"ratio": args.mask_ratio},
        "train": {"compile": args.compile, "compile_mode": args.compile_mode, "precision": args.precision},
    })
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    step = TrainStep(model, build_optimizer(model, cfg, 1.5e-4), cfg, device)
    S, C = resolved_model_args(cfg)["img_size"], model.in_chans
    imgs = torch.randn(args.batch_size, C, S, S, device=device)
    noise = torch.rand(args.batch_size, model.num_patches, device=device)  # as throughput.py: its compiled graph

    report: dict = {
        "date": datetime.date.today().isoformat(), "device": str(device), "device_name": device_name(device),
        "versions": {"torch": torch.__version__},
        "config": {"model": args.model, "img_size": S, "batch": args.batch_size,
                   "compile": args.compile, "compile_mode": args.compile_mode,
                   "precision": str(autocast_dtype(cfg, device) or "float32").removeprefix("torch.")},
    }

    def save() -> None:  # once warmed up, and at the end: a run cut short keeps its warm-up (compile) time
        if args.json:
            write_text_atomic(json.dumps(report, indent=2), args.json)  # a kill mid-write keeps the last one

    start = time.perf_counter()
    for _ in range(args.warmup):
        step(imgs, noise)
    synchronize(device)
    report["warmup_s"] = time.perf_counter() - start
    save()
    print(f"{args.warmup} warm-up steps (compiling, if compiled) took {report['warmup_s']:.1f} s", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step(imgs, noise)
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    per_category, rows = breakdown(prof, device, args.steps)
    busy_ms = sum(per_category.values())

    report.update({
        "wall_ms_per_step": wall_ms,
        # profiling adds host work, so this wall time runs a little above throughput.py's
        "images_per_s_under_profiler": args.batch_size / wall_ms * 1e3,
        "busy_ms_per_step": busy_ms,
        "gpu_busy_fraction": busy_ms / wall_ms if device.type == "cuda" else None,
        "ms_per_step_by_category": per_category,
        "top": [{"name": n, "category": c, "ms_per_step": ms, "calls_per_step": k} for n, c, ms, k in rows[:args.top]],
    })
    save()

    what = "kernel" if device.type == "cuda" else "aten operator (self CPU time)"
    print(f"{args.model} at {S}px, batch {args.batch_size}, {report['config']['precision']}, "
          f"{'compiled (' + args.compile_mode + ')' if args.compile else 'eager'} on {report['device_name']}")
    print(f"top {args.top} by {what}, ms per step:")
    for name, cat, ms, calls in rows[:args.top]:
        print(f"  {ms:8.3f}  {calls:6.1f}x  {cat:<9} {name[:90]}")
    print(f"wall {wall_ms:.2f} ms per step ({report['images_per_s_under_profiler']:.0f} img/s under the profiler)"
          + (f", GPU busy {report['gpu_busy_fraction']:.0%}" if device.type == "cuda" else ""))
    print(f"{'category':<10} {'ms/step':>9} {'share':>6}")
    for cat, ms in per_category.items():
        print(f"{cat:<10} {ms:>9.3f} {ms / max(busy_ms, 1e-9):>6.1%}")
    return report


if __name__ == "__main__":
    main()
