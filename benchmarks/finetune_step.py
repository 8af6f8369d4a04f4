"""Fine-tuning throughput: `mae.finetune.FinetuneStep`, eager against compiled, in one process.

A step is what `mae.finetune.finetune` runs per batch: random erasing, mixup/cutmix,
forward and loss (bf16 autocast on CUDA), backward and the fused AdamW update over the
layer-decayed groups, with the config's fine-tuning recipe (the paper's defaults), on a
batch already on the device (fine-tuning's input is benchmarks/input_pipeline.py's
`cpu+randaug` arm). Unlike pretraining, every patch goes through the encoder, so a
fine-tuning step costs about twice a pretraining step's FLOPs per image.

    # one GPU: ViT-B/16 and ViT-L/16 at 224, batch 128
    python benchmarks/finetune_step.py --preset gpu --json results/bench/finetune_gpu.json
    # this CPU: the Fashion-MNIST model at experiments/reuse_fashion_mnist.yaml's batch
    python benchmarks/finetune_step.py --preset cpu --json results/bench/finetune_cpu.json

After warm-up (which compiles) the variants take turns, one step each, and the order
rotates, so drift in a shared machine's load falls on both alike. Also printed: FLOPs
per image of one step (torch.utils.flop_counter, eager), MFU against the device's
matmul ceiling as benchmarks/throughput.py measures it, and peak memory (CUDA). The last
thing printed is the table; --json writes everything, after each config.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from mae.config import COMPILE_MODES, PRECISIONS, load_config
from mae.engine import autocast_dtype, device_name, select_device
from mae.files import write_text_atomic
from mae.finetune import FinetuneStep, build_classifier, optimizer_for
from mae.models import model_names

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402  (shared with the pretraining benchmark)
    counted_flops, matmul_ceiling, rated_bf16_flops, time_in_turns, timing_results,
)

VARIANTS = ("eager", "compiled")
PRESETS = {
    # (model, img_size, in_chans, batch, classes)
    "gpu": [("mae_vit_base_patch16", 224, 3, 128, 1000), ("mae_vit_large_patch16", 224, 3, 128, 1000)],
    "cpu": [("mae_vit_micro_patch4", 28, 1, 128, 10)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="configs to run; overrides --model and the sizes")
    p.add_argument("--model", default="mae_vit_micro_patch4", choices=model_names())
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="for the compiled variant")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="train.precision: auto is bf16 autocast on CUDA, float32 on CPU")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config value, e.g. finetune.reprob=0 (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compiles)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    return args


def bench_config(model_name: str, img_size: int, in_chans: int, batch: int, classes: int, args,
                 device: torch.device, ceiling: float) -> dict:
    def cfg_for(compiled: bool):
        return load_config(None, [f"model.name={model_name}", f"model.img_size={img_size}", f"model.in_chans={in_chans}",
                                  f"finetune.batch_size={batch}", f"train.precision={args.precision}",
                                  f"train.compile={compiled}", f"train.compile_mode={args.compile_mode}",
                                  *args.overrides])

    eager_cfg = cfg_for(False)
    torch.manual_seed(args.seed)
    base = build_classifier(eager_cfg, classes)
    g = torch.Generator().manual_seed(args.seed)
    imgs = torch.randn(batch, in_chans, img_size, img_size, generator=g).to(device)  # (N, C, H, W)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)  # (N,)

    steps, models = {}, {}
    for name in args.variants.split(","):
        cfg = cfg_for(True) if name == "compiled" else eager_cfg
        model = build_classifier(cfg, classes)
        model.load_state_dict(base.state_dict())
        model.to(device).train()
        steps[name] = FinetuneStep(model, optimizer_for(model, cfg, 1e-4), cfg, device, classes)
        models[name] = model

    probe = build_classifier(eager_cfg, classes).to(device).train()  # FLOPs of one eager step, 2 images
    probe_step = FinetuneStep(probe, optimizer_for(probe, eager_cfg, 1e-4), eager_cfg, device, classes)
    flops = counted_flops(lambda: probe_step(imgs[:2], labels[:2])) / 2
    del probe, probe_step  # its weights, gradients and optimizer state leave the device before timing

    times, warmup_s, peak_mem = time_in_turns({name: (lambda s=step: s(imgs, labels)) for name, step in steps.items()},
                                              args.warmup, args.steps, device, model_name, models)
    rated = rated_bf16_flops(device_name(device)) if device.type == "cuda" else None
    results = timing_results(times, warmup_s, peak_mem, batch, flops, ceiling, rated)
    speedup = (results["compiled"]["img_per_s"] / results["eager"]["img_per_s"]
               if {"compiled", "eager"} <= results.keys() else None)
    return {"model": model_name, "img_size": img_size, "in_chans": in_chans, "batch_size": batch, "classes": classes,
            "precision": str(autocast_dtype(eager_cfg, device) or torch.float32).removeprefix("torch."),
            "train_flops_per_image": flops, "results": results, "speedup_compiled_over_eager": speedup}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import timm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    configs = (PRESETS[args.preset] if args.preset
               else [(args.model, args.img_size, args.in_chans, args.batch_size, args.classes)])
    ceiling = matmul_ceiling(device)
    report = {
        "date": datetime.date.today().isoformat(), "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads(), "argv": sys.argv[1:], "ceiling": ceiling,
        "versions": {"torch": torch.__version__, "timm": timm.__version__}, "configs": [],
    }
    for model_name, img_size, in_chans, batch, classes in configs:
        result = bench_config(model_name, img_size, in_chans, batch, classes, args, device, ceiling["flops_per_s"])
        report["configs"].append(result)
        if args.json:
            write_text_atomic(json.dumps(report, indent=2), args.json)  # a kill mid-write keeps the last one
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"fine-tuning step on {report['device']} ({report['device_name']}), {report['threads']} threads, "
          f"torch {report['versions']['torch']}")
    print(f"{'model':<24} {'px':>4} {'batch':>5} {'variant':<9} {'ms/step':>9} {'img/s':>9} {'MFU':>6} "
          f"{'peak GiB':>9} {'GFLOP/img':>10}")
    for c in report["configs"]:
        for name, r in c["results"].items():
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
            print(f"{c['model']:<24} {c['img_size']:>4} {c['batch_size']:>5} {name:<9} {r['median_ms']:>9.1f} "
                  f"{r['img_per_s']:>9.1f} {100 * r['mfu']:>5.1f}% {mem:>9} {c['train_flops_per_image'] / 1e9:>10.2f}")
        if c["speedup_compiled_over_eager"] is not None:
            print(f"{'':<24} compiled / eager: {c['speedup_compiled_over_eager']:.2f}x ({c['precision']})")


if __name__ == "__main__":
    main()
