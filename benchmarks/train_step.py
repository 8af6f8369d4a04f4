"""Time one training step of our MAE against HuggingFace's ViTMAEForPreTraining.

A step is forward, backward and an AdamW update (the engine's betas, weight decay and
parameter groups). Both models get the same config, the same weights (ours copied into
HF through `mae.interop`), the same batch and the same masking noise, in one process.
After warm-up they alternate, and who goes first swaps every round, so drift in the
machine's load falls on both alike. bf16 autocast on CUDA, float32 elsewhere.

    python benchmarks/train_step.py --model mae_vit_tiny_patch4 --batch-size 64 --steps 20

The last thing printed is a table: median ms/step, images/s, and ours/HF time ratio
(above 1: ours is slower).
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from mae.interop import hf_config_kwargs, hf_layout_of, to_hf_state_dict
from mae.models import build_mae, model_args, model_names
from mae.optim import param_groups

LR, BETAS, WEIGHT_DECAY = 1.5e-4, (0.9, 0.95), 0.05  # the paper's AdamW settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_micro_patch4", choices=model_names())
    p.add_argument("--img-size", type=int, default=None, help="default: the variant's")
    p.add_argument("--in-chans", type=int, default=None, help="default: the variant's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--norm-pix-loss", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention implementation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One training step: zero grads, forward (autocast bf16 on CUDA), backward, AdamW."""
    use_bf16 = device.type == "cuda"

    def step(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(imgs, noise)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _timed(step: Callable, imgs: torch.Tensor, noise: torch.Tensor, device: torch.device) -> float:
    """Wall time of one step in ms, the device drained before and after."""
    _sync(device)
    start = time.perf_counter()
    step(imgs, noise)
    _sync(device)
    return 1e3 * (time.perf_counter() - start)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() is often empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import ViTMAEConfig, ViTMAEForPreTraining  # benchmark-only dependency
    import transformers
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.manual_seed(args.seed)

    # Same architecture, same weights: HF's own init is not used (in transformers 5.24
    # it leaves the fixed position tables at zero), ours is copied over.
    overrides = dict(img_size=args.img_size, in_chans=args.in_chans, norm_pix_loss=args.norm_pix_loss)
    margs = model_args(args.model, **overrides)
    ours = build_mae(args.model, **overrides)
    config = ViTMAEConfig(**hf_config_kwargs(margs, mask_ratio=args.mask_ratio))
    config._attn_implementation = args.hf_attn
    hf = ViTMAEForPreTraining(config)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), hf_layout_of(hf.state_dict())), strict=True)
    ours.to(device).train()
    hf.to(device).train()

    # One fixed batch and mask noise, shared: the timing is of the model, not the data.
    g = torch.Generator().manual_seed(args.seed)
    N, C, S = args.batch_size, margs["in_chans"], margs["img_size"]
    imgs = torch.randn(N, C, S, S, generator=g).to(device)  # (N, C, H, W)
    noise = torch.rand(N, ours.num_patches, generator=g).to(device)  # (N, L)

    loss_fns = {
        "ours": lambda x, z: ours(x, args.mask_ratio, z)[0],
        "hf": lambda x, z: hf(pixel_values=x, noise=z).loss,
    }
    models = {"ours": ours, "hf": hf}
    steps = {
        name: _make_step(
            loss_fns[name],
            torch.optim.AdamW(param_groups(models[name], WEIGHT_DECAY), lr=LR, betas=BETAS),
            device,
        )
        for name in models
    }

    # Both must compute the same thing, or the comparison means nothing.
    use_bf16 = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        first_loss = {name: float(loss_fns[name](imgs, noise)) for name in models}
    tol = 2e-2 if device.type == "cuda" else 1e-4
    losses_match = abs(first_loss["ours"] - first_loss["hf"]) <= tol * abs(first_loss["hf"])

    for _ in range(args.warmup):
        for name in models:
            steps[name](imgs, noise)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for _ in range(args.steps):
        for name in order:
            times[name].append(_timed(steps[name], imgs, noise, device))
        order.reverse()

    results = {}
    for name, ms in times.items():
        median = statistics.median(ms)
        results[name] = {
            "median_ms": median,
            "min_ms": min(ms),
            "max_ms": max(ms),
            "img_per_s": N / (median / 1e3),
            "times_ms": ms,
        }
    ratio = results["ours"]["median_ms"] / results["hf"]["median_ms"]
    report = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_args": margs,
        "device": str(device),
        "device_name": _device_name(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "float32",
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__
        },
        "first_loss": first_loss,
        "losses_match": losses_match,
        "results": results,
        "ratio_ours_over_hf": ratio,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))

    print(
        f"{args.model} img {S}px x{C}ch, batch {N}, mask {args.mask_ratio}, {report['precision']} on "
        f"{device} ({report['device_name']}), {report['threads']} threads, "
        f"{args.steps} steps after {args.warmup} warm-up"
    )
    print(f"first loss: ours {first_loss['ours']:.6f}  hf {first_loss['hf']:.6f}  match={losses_match}")
    print(f"{'model':<6} {'median ms/step':>15} {'min ms':>9} {'img/s':>10}")
    for name, r in results.items():
        print(f"{name:<6} {r['median_ms']:>15.2f} {r['min_ms']:>9.2f} {r['img_per_s']:>10.1f}")
    print(f"ratio ours/hf (time per step): {ratio:.3f}")
    return report


if __name__ == "__main__":
    main()
