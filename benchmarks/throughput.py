"""Training throughput: our MAE step against HuggingFace's ViTMAEForPreTraining, in one process.

A step is forward, backward and an AdamW update on one batch that already sits on the
device (the input pipeline is benchmarks/input_pipeline.py's business). "ours" is the
engine's own `mae.engine.TrainStep` (loss-only decoder tail, fused AdamW, bf16 autocast
on CUDA), eager and under torch.compile (ours-graphs: replayed as CUDA graphs;
ours-autotune: Inductor's max-autotune without them); "hf" is `ViTMAEForPreTraining` with SDPA
attention and the same fused AdamW (what transformers' Trainer uses by default with
torch >= 2.8: `adamw_torch_fused`), loaded with our weights and fed our batch and mask
noise, so both compute the same loss (checked, and printed).

    # the issue's H100 configs: ViT-B/16 at batch 256, ViT-L/16 at batch 128, 224 px
    python benchmarks/throughput.py --preset h100 --json results/bench/h100.json
    # the small CPU config: the default Fashion-MNIST model and batch, all cores
    python benchmarks/throughput.py --preset cpu --json results/bench/cpu.json
    # one config of your own
    python benchmarks/throughput.py --model mae_vit_base_patch16 --batch-size 512 --variants ours-compiled
    # what might make ours faster on a GPU: CUDA graphs, autotuning, another attention kernel
    python benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 --batch-size 256 \
        --variants ours-compiled,ours-graphs,ours-autotune --sdpa flash

Also measured: the device's matrix-product ceiling (bf16 on CUDA, float32 on CPU), the
FLOPs of one training step per image (torch.utils.flop_counter, our eager model) and so
the MFU (achieved FLOP/s over the measured ceiling; over the card's rated bf16 peak too,
where RATED_BF16_TFLOPS knows the card), and peak device memory per variant (CUDA only:
its weights plus what its warm-up allocated; see time_in_turns). With --check-steps K it
also trains ours compiled (at the engine's precision), ours eager at that precision and
ours eager in float32 from the same weights on the same batches and masks for K steps,
and reports whether the engine's loss curve is as close to float32's as the eager run at
its precision is: that run's distance is the precision's own noise (see loss_curve_check).

After warm-up the variants of a config take turns, one step each, and the order rotates,
so drift in a shared machine's load falls on all alike. The last thing printed is the
table; --json writes everything so far after every timed round (a timeout keeps what was done).
"""

import argparse
import datetime
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mae.config import COMPILE_MODES, PRECISIONS, config_from_dict, resolved_model_args
from mae.engine import (
    TrainStep, autocast, autocast_dtype, build_optimizer, device_name, select_device, synchronize,
)
from mae.files import write_text_atomic
from mae.interop import hf_config_kwargs, hf_layout_of, to_hf_state_dict
from mae.masking import num_visible
from mae.models import build_mae, model_names
from mae.optim import fused_kwargs, param_groups

LR = 1.5e-4  # the paper's base lr; the value does not change the cost of a step
VARIANTS = ("ours-eager", "ours-compiled", "ours-graphs", "ours-autotune", "hf-eager", "hf-compiled")
# ours compiled in a fixed mode, whatever --compile-mode says: CUDA graphs (a compiled step's
# launches replayed, not issued one by one) and Inductor's autotuned matmul and fused templates
OURS_MODES = {"ours-graphs": "reduce-overhead", "ours-autotune": "max-autotune-no-cudagraphs"}
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")
PRESETS = {
    # (model, img_size, in_chans, batch): the issue's anchors were measured at these
    "h100": [("mae_vit_base_patch16", 224, 3, 256), ("mae_vit_large_patch16", 224, 3, 128)],
    # the model and batch of experiments/fashion_mnist.yaml and the default sweep
    "cpu": [("mae_vit_micro_patch4", 28, 1, 128)],
}
# NVIDIA's rated dense bf16 tensor-core peaks (TFLOP/s; the datasheets give twice these "with
# sparsity"): H100 SXM and H200 989, H100 NVL and H200 NVL 835, H100 PCIe 756. The MFU column
# uses the measured matmul ceiling, which a real step can reach; the rated one is printed beside
# it. The most specific name first: "NVIDIA H200 NVL" also contains "H200".
RATED_BF16_TFLOPS = {"H200 NVL": 835.0, "H200": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
                     "H100 PCIe": 756.0}


def rated_bf16_flops(name: str) -> float | None:
    """The card's rated dense bf16 FLOP/s by its CUDA name, if RATED_BF16_TFLOPS knows it."""
    return next((1e12 * t for key, t in RATED_BF16_TFLOPS.items() if key in name), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a set of configs (see PRESETS)")
    p.add_argument("--model", default="mae_vit_micro_patch4", choices=model_names(), help="without --preset")
    p.add_argument("--img-size", type=int, default=None, help="default: the variant's")
    p.add_argument("--in-chans", type=int, default=None, help="default: the variant's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--no-norm-pix-loss", action="store_true", help="plain pixel targets (default: norm-pix)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help=f"for ours-compiled, hf-compiled and the loss-curve check (the others: {OURS_MODES})")
    p.add_argument("--sdpa", default="auto", choices=SDPA_BACKENDS,
                   help="the CUDA attention kernels every variant may use (auto: torch's choice)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="train.precision of every variant: auto is bf16 autocast on CUDA, float32 on CPU")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (compiles)")
    p.add_argument("--check-steps", type=int, default=0, help="loss-curve check length (0: skip)")
    p.add_argument("--check-batch", type=int, default=None, help="the loss-curve check's batch (default: the config's)")
    p.add_argument("--check-lr", type=float, default=LR,
                   help="the loss-curve check's fixed lr (the paper's base lr; ViT-B sat at the trivial answer at 10x)")
    p.add_argument("--device", default="auto", help="auto (as train.device: cuda, else mps, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    return args


def time_in_turns(steps: dict[str, Callable[[], object]], warmup: int, n: int, device: torch.device,
                  label: str, models: dict[str, torch.nn.Module] | None = None,
                  on_round: Callable[[dict[str, list[float]], dict[str, float], dict[str, float | None]], None]
                  | None = None,
                  ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, float | None]]:
    """Warm each step up (compiling it), then time n rounds in which the steps take turns,
    the order rotating, so a shared machine's drift falls on all alike.

    Returns seconds per call of each step, its warm-up seconds and its peak memory in GiB
    (CUDA; None elsewhere): its model's weights (`models`, by step name) plus the most
    its warm-up allocated above what the device held before it. Every variant's model
    sits on the device at once, and the optimizer states of those warmed up before; the
    device's own peak would charge them to the later variants. on_round(times, warmup_s,
    peak_mem) runs after each round (a run cut short keeps the rounds it timed).
    finetune_step.py uses it too.
    """
    peak_mem, warmup_s = {}, {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            held = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        synchronize(device)
        warmup_s[name] = time.perf_counter() - start
        own = weight_bytes(models[name]) if models and name in models else 0
        peak_mem[name] = ((torch.cuda.max_memory_allocated(device) - held + own) / 2**30
                          if device.type == "cuda" else None)
        print(f"  {label} {name}: warm-up {warmup_s[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for _ in range(n):
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        order = order[1:] + order[:1]
        if on_round is not None:
            on_round(times, warmup_s, peak_mem)
    return times, warmup_s, peak_mem


def timing_results(times: dict[str, list[float]], warmup_s: dict[str, float], peak_mem: dict[str, float | None],
                   batch: int, flops_per_image: float, ceiling: float, rated: float | None = None) -> dict[str, dict]:
    """Per step timed by time_in_turns: median and fastest ms, img/s (batch / median), MFU against
    the matmul ceiling (FLOP/s) and against the card's rated peak (`rated`, FLOP/s; None where
    unknown), peak GiB, warm-up seconds and every timed step's ms."""
    results = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        img_s = batch / median
        results[name] = {
            "median_ms": 1e3 * median, "min_ms": 1e3 * min(ts), "img_per_s": img_s,
            "mfu": img_s * flops_per_image / ceiling,
            "mfu_rated": img_s * flops_per_image / rated if rated else None,
            "peak_mem_gib": peak_mem[name], "warmup_s": warmup_s[name],
            "times_ms": [1e3 * t for t in ts],
        }
    return results


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def counted_flops(run: Callable[[], object]) -> int:
    """The FLOPs torch.utils.flop_counter counts while run() runs, with attention on its
    plain matrix-product kernel. The counter has formulas for CUDA's fused attention
    kernels but none for the CPU's (it counted attention as 0 there: 56.3 GFLOP per ViT-B
    image, not 58.5), and its flash-attention formula adds the backward's recomputation.
    This way every device counts the same: QK^T and AV once forward, four products back."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def matmul_ceiling(device: torch.device) -> dict:
    """FLOP/s of a large square matrix product: bf16 on CUDA, float32 on CPU."""
    n, dtype, reps = (8192, torch.bfloat16, 50) if device.type == "cuda" else (1024, torch.float32, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - start) / reps
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / seconds}


def experiment_config(model: str, img_size: int, in_chans: int, args: argparse.Namespace, *,
                      compile: bool = False, precision: str | None = None, compile_mode: str | None = None):
    return config_from_dict({
        "model": {"name": model, "img_size": img_size, "in_chans": in_chans,
                  "norm_pix_loss": not args.no_norm_pix_loss},
        "mask": {"ratio": args.mask_ratio},
        "train": {"compile": compile, "compile_mode": compile_mode or args.compile_mode,
                  "precision": precision or args.precision},
    })


def use_sdpa_backend(name: str) -> None:
    """Let scaled_dot_product_attention use this one CUDA kernel family only ('auto': torch's
    choice, cuDNN's on Hopper), for every variant of the process. No fallback: a backend
    that cannot run the shapes fails the run instead of timing another kernel."""
    if name == "auto":
        return
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(name == "math")


def ours_step(model: torch.nn.Module, cfg, device: torch.device) -> Callable:
    """The engine's step on `model`: (imgs, noise) -> loss."""
    step = TrainStep(model, build_optimizer(model, cfg, LR), cfg, device)
    return lambda imgs, noise: step(imgs, noise)


def hf_step(hf: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, compile: bool,
            mode: str) -> Callable:
    """HF's model with the same fused AdamW and precision as ours."""
    optimizer = torch.optim.AdamW(param_groups(hf, 0.05), lr=LR, betas=(0.9, 0.95), **fused_kwargs(hf))

    def loss_of(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            return hf(pixel_values=imgs, noise=noise).loss

    loss_fn = torch.compile(loss_of, mode=mode) if compile else loss_of

    def step(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(imgs, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def hf_twin(ours: torch.nn.Module, margs: dict, mask_ratio: float) -> torch.nn.Module:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining  # benchmark-only dependency

    config = ViTMAEConfig(**hf_config_kwargs(margs, mask_ratio=mask_ratio))
    config._attn_implementation = "sdpa"
    hf = ViTMAEForPreTraining(config)
    # HF's own init is not used (transformers 5.x leaves the sin-cos tables at zero): ours is copied.
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), hf_layout_of(hf.state_dict())), strict=True)
    return hf


def flops_per_image(model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> float:
    """FLOPs of forward + backward of the reference's computation, per image: our eager
    full forward (the full decoder, as the reference and HF compute it), plus the embedding
    of the patches that masking drops, which ours skips (it embeds visible patches only)
    and the reference computes: a multiply-add per weight per dropped patch, forward and
    for the weight's gradient (0.35 GFLOP per ViT-B image). The loss-only path does less
    work still; MFU is quoted against this count so that all variants share one yardstick."""
    flops = counted_flops(lambda: model(imgs, mask_ratio, noise)[0].backward())
    model.zero_grad(set_to_none=True)
    L = model.patch_embed.num_patches
    dropped_embedding = (L - num_visible(L, mask_ratio)) * model.patch_embed.proj.weight.numel() * 2 * 2
    return flops / imgs.shape[0] + dropped_embedding


def check_images(g: torch.Generator, pool: int, batch: int, in_chans: int, img_size: int, patch_size: int,
                 device: torch.device, discs: int = 48) -> torch.Tensor:
    """(pool, batch, C, H, W) images in [-1, 1] for the loss-curve check: "dead leaves", a
    random background overlaid with `discs` opaque discs of uniform random colour, centre
    and a radius of density proportional to r^-3 between half a patch and half the image
    (scale-invariant, as natural images roughly are: Lee, Mumford and Huang, 2001). A masked
    patch's edges continue its visible neighbours', so the model has something to learn
    from context; the check cycles through this pool of batches.

    Chosen on this CPU (2026-11-30, ViT-B/16 at 224 px, batch 8, float32, 80 steps; the
    run is in BENCHMARKS.md): at lr 1.5e-4 the mean loss of steps 71-80 was 0.851 on these
    images and still falling (0.927 at steps 31-40), against 1.000 on the random grids used
    before, which is the trivial norm-pix answer (each patch's mean) that ViT-B also sat at
    on the H200; at lr 1.5e-3 both sat at 1.01."""
    n, side = pool * batch, torch.arange(img_size, device=device) + 0.5
    yy, xx = side.view(-1, 1), side.view(1, -1)  # pixel centres, broadcast to (H, W)
    img = (torch.rand(n, in_chans, 1, 1, generator=g, device=device) * 2 - 1).expand(-1, -1, img_size, img_size)
    r_min, r_max = patch_size / 2, img_size / 2
    for _ in range(discs):  # later discs cover earlier ones
        u = torch.rand(n, 1, 1, 1, generator=g, device=device)
        radius = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5  # inverse CDF of r^-3 on [r_min, r_max]
        cy, cx = (img_size * torch.rand(2, n, 1, 1, 1, generator=g, device=device)).unbind(0)
        colour = torch.rand(n, in_chans, 1, 1, generator=g, device=device) * 2 - 1
        img = torch.where((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2, colour, img)
    return img.reshape(pool, batch, in_chans, img_size, img_size)


def loss_curve_check(model_name: str, img_size: int, in_chans: int, args, device: torch.device,
                     on_curve: Callable[[dict], None] | None = None, *, engine_lr_scale: float = 1.0,
                     pool: int = 8) -> dict:
    """Ours as the engine runs it (compiled, engine precision) vs ours eager float32.

    Same initial weights, same batches (a pool of `pool` batches of check_images, cycled),
    same masks, `--check-steps` steps at a fixed lr (`--check-lr`). A third run is the yardstick: ours
    eager at the engine's precision ("engine-eager"), whose distance from float32 is by
    definition the precision's own noise (bf16 rounding, compounded by training's chaos);
    the compiled engine must stay within it (see compare_curves). `engine_lr_scale`
    (1 in every real check) makes the engine faulty on purpose: the tests check that the
    check catches a 20% learning-rate error.

    The three runs take turns, one step each, and every 10 steps `on_curve` gets the report
    with the comparison so far, so a run cut short by a time limit keeps a verdict."""
    batch = args.check_batch or args.batch_size
    torch.manual_seed(args.seed)
    base = build_mae(model_name, img_size=img_size, in_chans=in_chans,
                     norm_pix_loss=not args.no_norm_pix_loss).to(device)
    fp32 = experiment_config(model_name, img_size, in_chans, args, compile=False, precision="fp32")
    eager = experiment_config(model_name, img_size, in_chans, args, compile=False)
    engine = experiment_config(model_name, img_size, in_chans, args, compile=True)
    runs = {"fp32-eager": (fp32, 1.0), "engine-eager": (eager, 1.0), "engine": (engine, engine_lr_scale)}
    steps, masks = {}, {}
    for name, (cfg, lr_scale) in runs.items():
        model = build_mae(model_name, img_size=img_size, in_chans=in_chans,
                          norm_pix_loss=not args.no_norm_pix_loss).to(device)
        model.load_state_dict(base.state_dict())
        steps[name] = TrainStep(model, build_optimizer(model, cfg, args.check_lr * lr_scale), cfg, device)
        masks[name] = torch.Generator(device=device).manual_seed(args.seed + 2)  # the same masks for every run
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    images = check_images(g, pool, batch, in_chans, img_size, base.patch_size, device)
    report = {"steps": args.check_steps, "steps_done": 0, "batch_size": batch, "lr": args.check_lr,
              "pool_batches": pool, "complete": False, "engine_lr_scale": engine_lr_scale,
              "engine_precision": str(autocast_dtype(engine, device) or "float32").removeprefix("torch.")}
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in runs}

    def keep() -> None:
        curves = {k: torch.stack(v).float().cpu() for k, v in losses.items()}
        report["losses"] = {k: v.tolist() for k, v in curves.items()}
        report["steps_done"] = len(losses["engine"])
        report.update(compare_curves(curves["engine"], curves["fp32-eager"], curves["engine-eager"]))
        if on_curve is not None:
            on_curve(report)

    for i in range(args.check_steps):
        imgs = images[i % pool]
        for name, step in steps.items():
            noise = torch.rand(batch, base.num_patches, generator=masks[name], device=device)
            losses[name].append(step(imgs, noise))
        if (i + 1) % 10 == 0 and i + 1 < args.check_steps:
            keep()
    report["complete"] = True
    keep()
    return report


def block_standard_error(x: torch.Tensor, blocks: int = 10) -> float:
    """Standard error of x's mean when neighbouring values are correlated (as a training
    curve's are): the spread of the means of `blocks` consecutive runs of it."""
    n = len(x)
    k = max(2, min(blocks, n // 10))
    if n < 2 * k:
        return float("inf")
    means = x[: n - n % k].view(k, -1).mean(dim=1)
    return float(means.std() / k**0.5)


def compare_curves(engine: torch.Tensor, fp32: torch.Tensor, eager: torch.Tensor,
                   drift_factor: float = 1.5, float32_noise: float = 1e-5) -> dict:
    """Is the engine's loss curve as close to float32's as ours eager at the engine's
    precision is (`eager`: the same batches and masks, so its distance is that precision's
    own noise)? Three tests, all per-step relative differences to float32:

    - drift: the engine's mean absolute difference is at most `drift_factor` times the
      eager run's;
    - bias: the engine's mean signed difference is no larger in size than the eager run's
      plus 3 standard errors of the paired differences between the two (block standard
      error: neighbouring steps are correlated). A wrong learning rate, a scaled loss or a
      steady offset fails this even when it is smaller than the per-step noise;
    - resolution: no bias beyond bf16's relative rounding step, 2^-8 (catches a bias that
      the eager run would share with the engine, such as a loss computed in bf16).

    Both limits also allow `float32_noise`, float32's own rounding: where the engine computes
    in float32 (on CPU) the eager run is float32's curve exactly, and compiled kernels round
    differently (about 1e-7 here).
    """
    def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b) / b.abs()

    drift, twin = rel(engine, fp32), rel(eager, fp32)
    n = len(engine)
    tail = max(1, n // 5)
    out = {
        "mean_rel_diff": float(drift.abs().mean()),
        "max_rel_diff": float(drift.abs().max()),
        "mean_signed_rel_diff": float(drift.mean()),  # a bias shows here
        "eager_mean_rel_diff": float(twin.abs().mean()),
        "eager_mean_signed_rel_diff": float(twin.mean()),
        "paired_bias_se": block_standard_error(drift - twin),
        "last_fifth_mean_engine": float(engine[-tail:].mean()),
        "last_fifth_mean_fp32_eager": float(fp32[-tail:].mean()),
        "last_fifth_mean_engine_eager": float(eager[-tail:].mean()),
        "first_loss": float(fp32[0]),
    }
    out["drift_limit"] = drift_factor * out["eager_mean_rel_diff"] + float32_noise
    out["bias_limit"] = min(abs(out["eager_mean_signed_rel_diff"]) + 3 * out["paired_bias_se"] + float32_noise,
                            2.0**-8)
    out["within_noise"] = (out["mean_rel_diff"] <= out["drift_limit"]
                           and abs(out["mean_signed_rel_diff"]) <= out["bias_limit"])
    return out


def bench_config(model_name: str, img_size: int, in_chans: int, batch: int, args, device: torch.device,
                 ceiling: float, entry: dict | None = None, save: Callable[[], None] | None = None) -> dict:
    """Time the variants of one config; fills `entry` (returned) as it goes and calls save() after
    the loss agreement and after every timed round, so a run cut short keeps what it measured."""
    entry = {} if entry is None else entry
    wanted = args.variants.split(",")
    torch.manual_seed(args.seed)
    norm_pix = not args.no_norm_pix_loss
    cfg = experiment_config(model_name, img_size, in_chans, args)
    margs = resolved_model_args(cfg)
    base = build_mae(model_name, img_size=img_size, in_chans=in_chans, norm_pix_loss=norm_pix)
    g = torch.Generator().manual_seed(args.seed)
    imgs = torch.randn(batch, in_chans, img_size, img_size, generator=g).to(device)  # (N, C, H, W)
    noise = torch.rand(batch, base.num_patches, generator=g).to(device)  # (N, L)
    dtype = autocast_dtype(cfg, device)
    rated = rated_bf16_flops(device_name(device)) if device.type == "cuda" else None

    models, steps = {}, {}
    for name in wanted:
        if name.startswith("ours"):
            model = build_mae(model_name, img_size=img_size, in_chans=in_chans, norm_pix_loss=norm_pix)
            model.load_state_dict(base.state_dict())
            model.to(device).train()
            steps[name] = ours_step(model, experiment_config(
                model_name, img_size, in_chans, args, compile=name != "ours-eager",
                compile_mode=OURS_MODES.get(name)), device)
        else:
            model = hf_twin(base, margs, args.mask_ratio).to(device).train()
            steps[name] = hf_step(model, device, dtype, name == "hf-compiled", args.compile_mode)
        models[name] = model

    # Same computation or no comparison: first loss of every variant, before any update.
    first_loss = {}
    with torch.no_grad(), autocast(device, dtype):
        for name, model in models.items():
            if name.startswith("ours"):
                first_loss[name] = float(model(imgs, args.mask_ratio, noise, loss_only=True)[0])
            else:
                first_loss[name] = float(model(pixel_values=imgs, noise=noise).loss)
    ref = next(iter(first_loss.values()))
    tol = 2e-2 if dtype is not None else 1e-4
    losses_match = all(abs(v - ref) <= tol * abs(ref) for v in first_loss.values())

    flops = flops_per_image(build_mae(model_name, img_size=img_size, in_chans=in_chans,
                                      norm_pix_loss=norm_pix).to(device), imgs[:2], noise[:2], args.mask_ratio)
    entry.update({
        "model": model_name, "img_size": img_size, "in_chans": in_chans, "batch_size": batch,
        "mask_ratio": args.mask_ratio, "norm_pix_loss": norm_pix,
        "precision": str(dtype or torch.float32).removeprefix("torch."),
        "train_flops_per_image": flops, "first_loss": first_loss, "losses_match": losses_match,
        "timed_rounds": 0, "results": {}, "speedup": {},
    })
    if save is not None:
        save()

    def record(times: dict[str, list[float]], warmup_s: dict[str, float], peak_mem: dict[str, float | None]) -> None:
        results = timing_results(times, warmup_s, peak_mem, batch, flops, ceiling, rated)
        ratios = {}
        for ours in ("ours-eager", "ours-compiled", *OURS_MODES):
            for hf in ("hf-eager", "hf-compiled"):
                if ours in results and hf in results:
                    ratios[f"{ours}/{hf}"] = results[ours]["img_per_s"] / results[hf]["img_per_s"]
        entry.update(timed_rounds=len(next(iter(times.values()))), results=results, speedup=ratios)
        if save is not None:
            save()

    time_in_turns({name: (lambda s=step: s(imgs, noise)) for name, step in steps.items()},
                  args.warmup, args.steps, device, model_name, models, on_round=record)
    return entry


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import timm
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    use_sdpa_backend(args.sdpa)
    if args.preset:
        configs = PRESETS[args.preset]
    else:
        defaults = resolved_model_args(config_from_dict({"model": {"name": args.model}}))
        configs = [(args.model, args.img_size or defaults["img_size"], args.in_chans or defaults["in_chans"],
                    args.batch_size)]
    ceiling = matmul_ceiling(device)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "sdpa": args.sdpa,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "matmul_ceiling": ceiling, "rated_bf16_flops_per_s": rated_bf16_flops(device_name(device)), "configs": [],
    }

    def save() -> None:
        if args.json:
            write_text_atomic(json.dumps(report, indent=2), args.json)  # a kill mid-write keeps the last one

    print(f"{report['device_name']} ({device}), {report['threads']} threads, torch {torch.__version__}; "
          f"{ceiling['dtype']} matmul ceiling {ceiling['flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    for model_name, img_size, in_chans, batch in configs:
        entry: dict = {}
        report["configs"].append(entry)
        bench_config(model_name, img_size, in_chans, batch, args, device, ceiling["flops_per_s"], entry, save)
        if args.check_steps:
            print_table(report)

            def keep(curve: dict) -> None:
                entry["loss_curve"] = curve
                save()

            entry["loss_curve"] = loss_curve_check(model_name, img_size, in_chans, _with_batch(args, batch), device,
                                                   on_curve=keep)
            save()
    print_table(report)
    return report


def _with_batch(args: argparse.Namespace, batch: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "batch_size": batch})


def print_table(report: dict) -> None:
    print(f"\n{report['device_name']}, {report['threads']} threads, torch {report['versions']['torch']}, "
          f"timm {report['versions']['timm']}, transformers {report['versions']['transformers']}")
    print(f"{'model':<24} {'batch':>5} {'variant':<14} {'ms/step':>9} {'img/s':>9} {'MFU':>6} {'rated':>6} "
          f"{'peak GiB':>9}")
    for c in report["configs"]:
        for name, r in c["results"].items():
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            of_rated = f"{100 * r['mfu_rated']:>5.1f}%" if r.get("mfu_rated") else f"{'-':>6}"
            print(f"{c['model']:<24} {c['batch_size']:>5} {name:<14} {r['median_ms']:>9.2f} "
                  f"{r['img_per_s']:>9.1f} {100 * r['mfu']:>5.1f}% {of_rated} {mem:>9}")
        print(f"  {c['precision']}, {c['train_flops_per_image'] / 1e9:.2f} GFLOP/image/step, "
              f"first losses agree: {c['losses_match']}; "
              + ", ".join(f"{k} {v:.2f}x" for k, v in c["speedup"].items()))
        lc = c.get("loss_curve", {})
        if lc.get("complete"):
            print(f"  loss curve over {lc['steps']} steps at batch {lc['batch_size']}, vs fp32 eager: engine "
                  f"({lc['engine_precision']}, compiled) mean rel diff {lc['mean_rel_diff']:.2e} (limit "
                  f"{lc['drift_limit']:.2e}), bias {lc['mean_signed_rel_diff']:+.2e} (limit {lc['bias_limit']:.1e}); "
                  f"{lc['engine_precision']} eager {lc['eager_mean_rel_diff']:.2e}, bias "
                  f"{lc['eager_mean_signed_rel_diff']:+.2e}: {'within' if lc['within_noise'] else 'NOT within'} "
                  f"noise; last fifth {lc['last_fifth_mean_engine']:.4f} vs {lc['last_fifth_mean_fp32_eager']:.4f} "
                  f"(first {lc['first_loss']:.4f})")

if __name__ == "__main__":
    main()
