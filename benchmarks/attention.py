"""Attention alone: the scaled-dot-product calls of one MAE training step, per kernel.

The H200 profile of the compiled ViT-B step (BENCHMARKS.md) put attention at 8.2 ms of a
55 ms step for 3.7% of its FLOPs: about 70 TFLOP/s, a tenth of what its matrix products
ran at. Its shapes are small for a flash kernel: the encoder attends over 50 tokens (49
visible + cls) with 64-dim heads, the paper's decoder over 197 with 32-dim heads (512
wide, 16 heads), and the decoder's last block asks only the masked tokens' queries (the
loss-only tail, `_block_for_rows`). This times exactly those calls, forward and backward,
at the step's batch and precision, for each kernel:

- cudnn, flash, efficient, math: scaled_dot_product_attention with that one backend on
  (auto: torch's own choice, what the engine runs today; cuDNN's on Hopper);
- flex: torch's flex_attention compiled (Inductor's Triton flash kernel, no mask);
- any of those with `+pad64`: heads zero-padded to a multiple of 64 dims before the call
  and the padding dropped after. The same result: zeros add nothing to q.k, and the
  padded output columns are cut off; the scale stays 1/sqrt(the real head dim).

and prints per stage (encoder, decoder, decoder's last block) and kernel: ms per call,
ms per training step (calls x depth), TFLOP/s (useful work: QK^T and AV forward, four
products back, at the real head dim), and the error of output and gradients against
float32 math on the same inputs, relative to their largest magnitude. The last lines:
each stage's fastest kernel and what the step's attention would cost with those, against
auto. A kernel that cannot run a shape on this device is listed with torch's reason.

    # one H100 / H200: ViT-B/16's step at batch 256 in bf16 (not run on a GPU yet; only flex compiles)
    python benchmarks/attention.py --model mae_vit_base_patch16 --img-size 224 --batch-size 256 \\
        --json results/bench/attention_vit_b.json
    # this CPU (float32), to check the code paths
    python benchmarks/attention.py --batch-size 16 --kernels auto,math,flash,flex,math+pad64
"""

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mae.config import config_from_dict, resolved_model_args
from mae.engine import device_name, select_device, synchronize
from mae.files import write_text_atomic
from mae.masking import num_visible
from mae.models import model_names

SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
BASE_KERNELS = ("auto", *SDPA, "flex")
KERNELS = (*BASE_KERNELS, *(f"{k}+pad64" for k in BASE_KERNELS))
DEFAULT_KERNELS = ("auto", "cudnn", "flash", "efficient", "flex", "cudnn+pad64", "flash+pad64", "efficient+pad64")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_micro_patch4", choices=model_names())
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--kernels", default=",".join(DEFAULT_KERNELS), help=f"comma-separated, of {KERNELS}")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="auto: bfloat16 on CUDA (the engine's autocast), float32 elsewhere")
    p.add_argument("--steps", type=int, default=10,
                   help="timed rounds per stage and kernel, each of max(depth, 4) calls back to back")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (flex compiles)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    unknown = set(args.kernels.split(",")) - set(KERNELS)
    if unknown:
        p.error(f"--kernels: unknown {sorted(unknown)}; choose from {KERNELS}")
    return args


def stages(model: str, img_size: int | None, mask_ratio: float) -> list[dict]:
    """The attention calls of one training step of `model`: per stage its query and key
    lengths, heads, head dim and how many such calls a step makes (the depth)."""
    overrides = {"name": model} if img_size is None else {"name": model, "img_size": img_size}
    m = resolved_model_args(config_from_dict({"model": overrides}))
    patches = (m["img_size"] // m["patch_size"]) ** 2
    tokens = 1 + patches  # cls + every patch: the decoder's length
    masked = patches - num_visible(patches, mask_ratio)
    enc_dim, dec_dim = m["embed_dim"], m["decoder_embed_dim"]
    out = [dict(stage="encoder", queries=1 + num_visible(patches, mask_ratio), keys=1 + num_visible(patches, mask_ratio),
                heads=m["num_heads"], head_dim=enc_dim // m["num_heads"], calls=m["depth"])]
    dec = dict(keys=tokens, heads=m["decoder_num_heads"], head_dim=dec_dim // m["decoder_num_heads"])
    if m["decoder_depth"] > 1:
        out.append(dict(stage="decoder", queries=tokens, calls=m["decoder_depth"] - 1, **dec))
    # the last block: the masked tokens' queries only (mae.models.mae._block_for_rows)
    out.append(dict(stage="decoder-last", queries=masked, calls=1, **dec))
    return out


def useful_flops(batch: int, s: dict) -> float:
    """FLOPs of one call forward and backward, as torch.utils.flop_counter counts the math
    kernel: QK^T and AV forward (2 x 2BHQKD), four products of the same size back."""
    return 6 * 2 * batch * s["heads"] * s["queries"] * s["keys"] * s["head_dim"]


def attention_fn(kernel: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """q, k, v (B, H, Q or K, D) -> (B, H, Q, D) with that kernel (see the module's docstring)."""
    base, pad = kernel.removesuffix("+pad64"), kernel.endswith("+pad64")
    if base == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v, scale):
            return compiled(q, k, v, scale=scale)
    elif base == "auto":
        def run(q, k, v, scale):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        def run(q, k, v, scale):
            with sdpa_kernel(SDPA[base]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def attend(q, k, v):
        d = q.shape[-1]
        scale = 1 / math.sqrt(d)
        if not pad or d % 64 == 0:
            return run(q, k, v, scale)
        extra = -d % 64
        out = run(*(F.pad(t, (0, extra)) for t in (q, k, v)), scale)
        return out[..., :d]
    return attend


def inputs(batch: int, s: dict, dtype: torch.dtype, device: torch.device, g: torch.Generator) -> tuple:
    """q, k, v with gradients on, and the gradient of the output to send back."""
    def randn(n):
        return torch.randn(batch, s["heads"], n, s["head_dim"], generator=g).to(device=device, dtype=dtype)
    q, k, v = randn(s["queries"]), randn(s["keys"]), randn(s["keys"])
    return (q.requires_grad_(), k.requires_grad_(), v.requires_grad_()), randn(s["queries"])


def forward_backward(attend: Callable, qkv: tuple, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The output and the gradients of q, k and v."""
    out = attend(*qkv)
    return (out.detach(), *torch.autograd.grad(out, qkv, grad))


def relative_error(got: tuple, ref: tuple) -> float:
    """The largest |got - ref| over output and gradients, each over its reference's largest |value|."""
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item() for a, b in zip(got, ref))


def time_calls(run: Callable[[], object], warmup: int, rounds: int, per_round: int,
               device: torch.device) -> list[float]:
    """Seconds per call: `rounds` rounds of `per_round` calls queued back to back (as a step
    queues its blocks), the device synchronised only around each round."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(per_round):
            run()
        synchronize(device)
        times.append((time.perf_counter() - start) / per_round)
    return times


def bench_stage(s: dict, kernels: list[str], args, device: torch.device, dtype: torch.dtype) -> dict:
    """Each kernel's time and error at one stage's shapes; a kernel that cannot run gets its reason."""
    g = torch.Generator().manual_seed(args.seed)
    qkv, grad = inputs(args.batch_size, s, dtype, device, g)
    ref_qkv = tuple(t.detach().float().requires_grad_() for t in qkv)
    with sdpa_kernel(SDPBackend.MATH):
        ref = forward_backward(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ref_qkv, grad.float())
    flops = useful_flops(args.batch_size, s)
    results = {}
    for kernel in kernels:
        if kernel.endswith("+pad64") and s["head_dim"] % 64 == 0:
            continue  # nothing to pad: the same call as without
        attend = attention_fn(kernel)
        try:
            got = forward_backward(attend, qkv, grad)
            times = time_calls(lambda: forward_backward(attend, qkv, grad), args.warmup, args.steps,
                               max(s["calls"], 4), device)
        except Exception as e:  # noqa: BLE001 -- a backend refusing these shapes is a result
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            results[kernel] = {"error": f"{type(e).__name__}: {reason}"[:300]}
            continue
        ms = 1e3 * statistics.median(times)
        results[kernel] = {"ms_per_call": ms, "ms_per_step": ms * s["calls"], "tflops": flops / ms / 1e9,
                           "rel_error": relative_error(got, ref), "times_ms": [1e3 * t for t in times]}
    return results


def summary(report: dict) -> dict:
    """Per stage the fastest kernel; the step's attention in ms with those and with auto."""
    best, total_best, total_auto = {}, 0.0, 0.0
    for st in report["stages"]:
        ran = {k: r for k, r in st["results"].items() if "ms_per_step" in r}
        if not ran:
            return {}
        kernel = min(ran, key=lambda k: ran[k]["ms_per_step"])
        best[st["stage"]] = kernel
        total_best += ran[kernel]["ms_per_step"]
        total_auto += ran["auto"]["ms_per_step"] if "auto" in ran else math.nan
    return {"best": best, "ms_per_step_best": total_best, "ms_per_step_auto": total_auto}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    kernels = args.kernels.split(",")
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__}, "model": args.model, "batch_size": args.batch_size,
        "mask_ratio": args.mask_ratio, "dtype": str(dtype).removeprefix("torch."), "stages": [],
    }
    for s in stages(args.model, args.img_size, args.mask_ratio):
        print(f"  {s['stage']}: {s['calls']} x ({args.batch_size}, {s['heads']}, {s['queries']}/{s['keys']}, "
              f"{s['head_dim']})", flush=True)
        report["stages"].append({**s, "results": bench_stage(s, kernels, args, device, dtype)})
        if args.json:
            write_text_atomic(json.dumps(report, indent=2), args.json)
    report["summary"] = summary(report)
    if args.json:
        write_text_atomic(json.dumps(report, indent=2), args.json)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"\n{report['device_name']}, torch {report['versions']['torch']}, {report['model']} batch "
          f"{report['batch_size']}, {report['dtype']}, forward + backward")
    print(f"{'stage':<13} {'Q/K':>9} {'HxD':>6} {'kernel':<16} {'ms/call':>8} {'ms/step':>8} {'TFLOP/s':>8} "
          f"{'rel err':>8}")
    for st in report["stages"]:
        for kernel, r in st["results"].items():
            head = (f"{st['stage']:<13} {st['queries']:>5}/{st['keys']:<3} {st['heads']:>3}x{st['head_dim']:<3} "
                    f"{kernel:<16}")
            if "error" in r:
                print(f"{head} {r['error'][:60]}")
            else:
                print(f"{head} {r['ms_per_call']:>8.3f} {r['ms_per_step']:>8.3f} {r['tflops']:>8.2f} "
                      f"{r['rel_error']:>8.1e}")
    s = report.get("summary")
    if s:
        print("fastest: " + ", ".join(f"{k} {v}" for k, v in s["best"].items())
              + f"; the step's attention {s['ms_per_step_best']:.2f} ms with those, {s['ms_per_step_auto']:.2f} ms auto")


if __name__ == "__main__":
    main()
