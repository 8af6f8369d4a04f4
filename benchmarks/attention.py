"""Attention alone: the scaled-dot-product calls of one MAE training step, per kernel.

The H200 profile of the compiled ViT-B step (BENCHMARKS.md) put attention at 8.2 ms of a
55 ms step for 3.7% of its FLOPs: about 70 TFLOP/s, a tenth of what its matrix products
ran at. Its shapes are small for a flash kernel: the encoder attends over 50 tokens (49
visible + cls) with 64-dim heads, the paper's decoder over 197 with 32-dim heads (512
wide, 16 heads), and the decoder's last block asks only the masked tokens' queries (the
loss-only tail, `_block_for_rows`). This times those calls, forward and backward,
at the step's batch and precision, for each kernel:

- cudnn, flash, efficient, math: scaled_dot_product_attention with that one backend on
  (auto: torch's own choice, what the engine runs today; cuDNN's on Hopper);
- flex: torch's flex_attention compiled (Inductor's Triton flash kernel, no mask);
- any of those with `+pad64`: heads zero-padded to a multiple of 64 dims before the call
  and the padding dropped after. The same result: zeros add nothing to q.k, and the
  padded output columns are cut off; the scale stays 1/sqrt(the real head dim).

q, k and v are laid out as the model's are: views of one qkv projection, (B, N, 3, H, D)
permuted, and the output's gradient arrives as (B, N, H, D) transposed, as it does from
the projection after attention. Per stage (encoder, decoder, decoder's last block) and
kernel it prints: the wall time of a call (calls queued back to back, as a step queues
its blocks; eager launch overhead included, which a compiled step hides), the GPU time
per call and per training step (calls x depth) with that overhead hidden (a sleep kernel
holds the GPU while the host queues a round; CUDA events time the round: see
device_seconds), TFLOP/s on that time (useful work: QK^T and AV forward, four products
back, at the real head dim), and the error of output and gradients against float32 math
on the same inputs, relative to their largest magnitude. The GPU time is every kernel of
the call: the attention kernels and the layout copies around them (the backward of
splitting q, k, v out of one projection stacks their gradients; padding pads and slices),
which a compiled step may fuse differently; the profile's 8.2 ms is attention kernels only.
Rows print (and --json is saved) as each kernel finishes. The last line: each stage's
fastest kernel by that time and what the step's attention would cost with those, against
auto. A kernel that cannot run a shape on this device is listed with torch's error and
warnings. Exits non-zero if no kernel ran at some stage.

    # one H100 / H200: ViT-B/16's step at batch 256 in bf16 (not run on a GPU yet; only flex compiles)
    python benchmarks/attention.py --model mae_vit_base_patch16 --img-size 224 --batch-size 256 \\
        --json results/bench/attention_vit_b.json
    # this CPU (float32), to check the code paths (flex_attention has no CPU backward)
    python benchmarks/attention.py --batch-size 16 --kernels auto,math,flash,math+pad64
"""

import argparse
import datetime
import functools
import json
import math
import statistics
import sys
import time
import warnings
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
# flex_attention last: it compiles for each stage's shapes, the slowest part of a run
DEFAULT_KERNELS = ("auto", "cudnn", "flash", "efficient", "cudnn+pad64", "flash+pad64", "efficient+pad64", "flex")


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
    visible = num_visible(patches, mask_ratio)
    enc_dim, dec_dim = m["embed_dim"], m["decoder_embed_dim"]
    out = [dict(stage="encoder", queries=1 + visible, keys=1 + visible,  # cls + the visible patches
                heads=m["num_heads"], head_dim=enc_dim // m["num_heads"], calls=m["depth"])]
    dec = dict(keys=tokens, heads=m["decoder_num_heads"], head_dim=dec_dim // m["decoder_num_heads"])
    if m["decoder_depth"] > 1:
        out.append(dict(stage="decoder", queries=tokens, calls=m["decoder_depth"] - 1, **dec))
    # the last block: the masked tokens' queries only (mae.models.mae._block_for_rows)
    out.append(dict(stage="decoder-last", queries=patches - visible, calls=1, **dec))
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
    """The stage's leaf tensors (gradients on), the function that makes q, k, v (B, H, Q or K, D)
    from them in the model's layout, and the gradient of the output to send back.

    As in timm's Attention: one (B, N, 3, H, D) projection, permuted; in the last decoder
    block (`_block_for_rows`) queries from their own (B, R, H, D) projection and keys and
    values from a (B, T, 2, H, D) one. The output's gradient comes from the projection
    after attention, (B, Q, H, D) transposed."""
    B, H, D, Q, K = batch, s["heads"], s["head_dim"], s["queries"], s["keys"]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    if Q == K:
        leaves = (randn(B, K, 3, H, D).requires_grad_(),)

        def views(qkv):
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        leaves = (randn(B, Q, H, D).requires_grad_(), randn(B, K, 2, H, D).requires_grad_())

        def views(q, kv):
            return (q.transpose(1, 2), *kv.permute(2, 0, 3, 1, 4).unbind(0))
    return leaves, views, randn(B, Q, H, D).transpose(1, 2)


def forward_backward(attend: Callable, leaves: tuple, views: Callable, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The output and the gradients of the leaves q, k and v come from."""
    out = attend(*views(*leaves))
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def relative_error(got: tuple, ref: tuple) -> float:
    """The largest |got - ref| over output and gradients, each over its reference's largest |value|."""
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item() for a, b in zip(got, ref))


def time_calls(run: Callable[[], object], warmup: int, rounds: int, per_round: int,
               device: torch.device) -> list[float]:
    """Wall seconds per call: `rounds` rounds of `per_round` calls queued back to back (as a
    step queues its blocks), the device synchronised only around each round."""
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


def device_seconds(run: Callable[[], object], per_round: int, round_s: float, device: torch.device,
                   rounds: int = 5) -> float | None:
    """GPU seconds per call with the host's launch overhead hidden, as a compiled step hides it:
    a sleep kernel holds the GPU while the host queues a round of calls, and CUDA events time
    the round on the GPU alone. The sleep lasts twice a round's wall time (`round_s`), which
    is at least the host's queueing time. The median of `rounds` rounds; None off CUDA (on a
    CPU every call runs as it is issued: its wall time is its cost)."""
    if device.type != "cuda":
        return None
    cycles_per_s = _sleep_cycles_per_second(device)

    def round_of_calls() -> None:
        for _ in range(per_round):
            run()
    times = []
    for _ in range(rounds):
        synchronize(device)
        torch.cuda._sleep(int(2 * round_s * cycles_per_s))
        times.append(_event_seconds(round_of_calls) / per_round)
    return statistics.median(times)


def _event_seconds(work: Callable[[], object]) -> float:
    """GPU seconds from work()'s first queued kernel to its last, by CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@functools.cache
def _sleep_cycles_per_second(device: torch.device) -> float:
    """How many torch.cuda._sleep cycles make a second on this GPU (measured once)."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm
    return cycles / _event_seconds(lambda: torch.cuda._sleep(cycles))


def bench_stage(s: dict, kernels: list[str], args, device: torch.device, dtype: torch.dtype,
                on_result: Callable[[str, dict], None] | None = None) -> dict:
    """Each kernel's times and error at one stage's shapes; a kernel that cannot run gets torch's
    error and the warnings it gave (on CUDA the reasons a backend declines come as warnings)."""
    g = torch.Generator().manual_seed(args.seed)
    leaves, views, grad = inputs(args.batch_size, s, dtype, device, g)
    ref_leaves = tuple(t.detach().float().requires_grad_() for t in leaves)
    with sdpa_kernel(SDPBackend.MATH):
        ref = forward_backward(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), ref_leaves, views,
                               grad.float())
    flops = useful_flops(args.batch_size, s)
    per_round = max(s["calls"], 4)
    results = {}
    for kernel in kernels:
        if kernel.endswith("+pad64") and s["head_dim"] % 64 == 0:
            continue  # nothing to pad: the same call as without
        attend = attention_fn(kernel)

        def run(attend=attend):
            return forward_backward(attend, leaves, views, grad)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = run()
        except Exception as e:  # noqa: BLE001 -- a backend refusing these shapes is a result
            said = [str(e).strip() or type(e).__name__, *(str(w.message).strip() for w in caught)]
            results[kernel] = {"error": f"{type(e).__name__}: " + " | ".join(said)}
            if on_result is not None:
                on_result(kernel, results[kernel])
            continue
        wall = time_calls(run, args.warmup, args.steps, per_round, device)
        wall_s = statistics.median(wall)
        gpu_s = device_seconds(run, per_round, wall_s * per_round, device)
        ms = 1e3 * (gpu_s if gpu_s is not None else wall_s)
        results[kernel] = {"wall_ms_per_call": 1e3 * wall_s, "ms_per_call": ms, "ms_per_step": ms * s["calls"],
                           "tflops": flops / ms / 1e9, "rel_error": relative_error(got, ref),
                           "wall_times_ms": [1e3 * t for t in wall]}
        if on_result is not None:
            on_result(kernel, results[kernel])
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
    print_header(report)

    def save() -> None:
        if args.json:
            write_text_atomic(json.dumps(report, indent=2), args.json)

    for s in stages(args.model, args.img_size, args.mask_ratio):
        stage = {**s, "results": {}}
        report["stages"].append(stage)

        def keep(kernel: str, result: dict, stage=stage) -> None:  # as it goes: a cut run keeps what it timed
            stage["results"][kernel] = result
            print_row(stage, kernel, result)
            save()
        bench_stage(s, kernels, args, device, dtype, on_result=keep)
    report["summary"] = summary(report)
    if args.json:
        write_text_atomic(json.dumps(report, indent=2), args.json)
    print_summary(report["summary"])
    return report


def print_header(report: dict) -> None:
    print(f"{report['device_name']}, torch {report['versions']['torch']}, {report['model']} batch "
          f"{report['batch_size']}, {report['dtype']}, forward + backward; ms: GPU time with launches hidden "
          f"(on a CPU: wall); wall: per call queued back to back")
    print(f"{'stage':<13} {'Q/K':>9} {'HxD':>6} {'kernel':<16} {'wall ms':>8} {'ms/call':>8} {'ms/step':>8} "
          f"{'TFLOP/s':>8} {'rel err':>8}", flush=True)


def print_row(st: dict, kernel: str, r: dict) -> None:
    head = (f"{st['stage']:<13} {st['queries']:>5}/{st['keys']:<3} {st['heads']:>3}x{st['head_dim']:<3} "
            f"{kernel:<16}")
    if "error" in r:
        print(f"{head} {r['error'][:70]}", flush=True)
    else:
        print(f"{head} {r['wall_ms_per_call']:>8.3f} {r['ms_per_call']:>8.3f} {r['ms_per_step']:>8.3f} "
              f"{r['tflops']:>8.2f} {r['rel_error']:>8.1e}", flush=True)


def print_summary(s: dict) -> None:
    if not s:
        print("no kernel ran at some stage: no summary")
        return
    print("fastest: " + ", ".join(f"{k} {v}" for k, v in s["best"].items())
          + f"; the step's attention {s['ms_per_step_best']:.2f} ms with those, {s['ms_per_step_auto']:.2f} ms auto")


if __name__ == "__main__":
    if not main()["summary"]:
        sys.exit(1)
