"""Input pipeline throughput: PIL in DataLoader workers against decoding on the device.

Generates an ImageFolder of photo-like JPEGs (default 500x375 at quality 90, about
60 KB each; every other one portrait, 375x500, so that batches mix sizes as ImageNet's do
and the device pipelines take the per-image resize they take on real data; smooth
shading, shapes and grain, not white noise) and measures, for each `data.pipeline` of
`mae.device_input.build_pretrain_input`:

- input alone: images/s the pipeline delivers to the device, augmented and normalised.
  cpu: --workers DataLoader workers decode with PIL and apply the v2 pretraining
  transform (mae.data's path); device: the workers read bytes, the main process decodes
  with torchvision.io.decode_jpeg on the device and augments with DeviceAugment;
  device+prefetch: the same, run --prefetch batches ahead by a background thread on its
  own CUDA stream (mae.device_input.Prefetcher, the engine's default on CUDA), so
  decoding overlaps the training step. predecoded(+prefetch): the JPEGs converted once
  (mae.predecoded, shorter side --short-side; the conversion's time is printed and
  saved), the workers read raw pixels from its memory map, the device augments.
  cpu+prefetch: the cpu pipeline with the engine's CUDA default of copying batches to the
  device on the side stream, ahead of the step (cpu alone copies each batch inline).
  cpu+randaug: fine-tuning's CPU input (crop of scale finetune.crop_scale_min, flip and
  timm's RandAugment finetune.randaug in the workers, `mae.device_input.build_train_input`);
  its end-to-end column still feeds the pretraining step, so read its input column.
- end to end: the engine's training step (`mae.engine.TrainStep`: forward, backward,
  fused AdamW; bf16 autocast on CUDA; --compile as train.compile) fed by the pipeline,
  against the same step on a batch already on the device (synthetic), measured just
  before each pipeline's run (its workers not yet started), so the ratio end-to-end /
  synthetic compares like with like on a shared machine. The issue's goal is a ratio of
  at least 0.9. Each step gets its mask noise as an argument, as benchmarks/throughput.py
  gives it, so under --compile both scripts compile the same graph and the later one
  finds it in Inductor's on-disk cache.

The input-only run starts after a warm-up of workers x 2 + 2 batches: the DataLoader's
prefetch queue fills while the workers start, and timing it would flatter the pipeline.
The end-to-end run follows it directly (the queue is then drained: input alone consumes
faster than the step does). One sampler pass covers a pipeline's whole run, so no epoch
boundary stalls the workers. The last thing printed is a table; --json writes everything.

    # this project's shared 2-core CPU (about 30 s); one intra-op thread, since torch's
    # threads spin against the workers and any other job on so few cores
    python benchmarks/input_pipeline.py --num-images 256 --model mae_vit_micro_patch4 --img-size 32 \
        --batch-size 32 --workers 2 --threads 1 --json results/bench/input_pipeline_cpu.json
    # one H100 with 16 cores: ViT-B/16 at 224, batch 256
    python benchmarks/input_pipeline.py --num-images 4096 --model mae_vit_base_patch16 --img-size 224 \
        --batch-size 256 --workers 16 --steps 50 --input-batches 50 --warmup 10 --compile \
        --json results/bench/input_pipeline_h100.json
"""

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, RandomSampler

from mae.config import COMPILE_MODES, absolute_lr, load_config, override_text, resolved_model_args
from mae.device_input import Prefetcher, build_pretrain_input, build_train_input
from mae.predecoded import PredecodedImages, write_store
from mae.engine import (
    TrainStep, autocast_dtype, build_model, build_optimizer, device_name, select_device, synchronize,
)
from mae.files import cleanup_on_termination, write_text_atomic
from mae.models import model_names

ARMS = {  # name: (data.pipeline, prefetch)
    "cpu": ("cpu", False), "cpu+prefetch": ("cpu", True), "device": ("device", False),
    "device+prefetch": ("device", True),
    "predecoded": ("predecoded", False), "predecoded+prefetch": ("predecoded", True),
    "cpu+randaug": ("cpu", False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=1024, help="JPEGs to generate (10 classes)")
    p.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                   help="size of the generated JPEGs")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated images")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the JPEGs go (kept, and reused when they are already there; the predecoded "
                        "arms' store goes beside it); default: a temp dir")
    p.add_argument("--model", default="mae_vit_micro_patch4", choices=model_names())
    p.add_argument("--img-size", type=int, default=32, help="the model's input side (crops are resized to it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per arm")
    p.add_argument("--input-batches", type=int, default=20, help="timed batches of the input-only measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps before each timed run")
    p.add_argument("--compile", action="store_true", help="torch.compile the step's forward (train.compile)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="train.compile_mode")
    p.add_argument("--device", default="auto", help="auto (as train.device: cuda, else mps, else cpu), cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the main process")
    p.add_argument("--short-side", type=int, default=256,
                   help="the predecoded arms' store: shorter side at most this (python -m mae predecode --short-side)")
    p.add_argument("--prefetch", type=int, default=2, help="batches readied ahead in the device+prefetch arm")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {list(ARMS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


# -- data ------------------------------------------------------------------------------


def photo_like(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8: smooth shading, a few flat shapes with soft edges, luminance grain.

    What makes a photo's JPEG 50-70 KB at quality 90 and 500x375 is its mix of smooth
    regions, edges and fine texture; white noise would be several times larger and
    decode differently.
    """
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / h, x / w
    img = np.empty((h, w, 3), np.float32)
    base = rng.uniform(40, 200, 3)
    for c in range(3):
        field = base[c] + 60 * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y)
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 2 * np.pi)
            field += rng.uniform(5, 25) * np.cos(2 * np.pi * (fx * x + fy * y) + phase)
        img[..., c] = field
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(6, 16)):
        x0, y0 = rng.uniform(-0.2, 1, 2) * (w, h)
        x1, y1 = (x0, y0) + rng.uniform(0.05, 0.5, 2) * (w, h)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    arr = np.asarray(pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))).astype(np.float32)
    grain = rng.normal(0, 1, (h, w, 1)).astype(np.float32) * rng.uniform(4, 9)
    return np.clip(arr + grain, 0, 255).astype(np.uint8)


def _write_jpeg(path: Path, size: tuple[int, int], quality: int, seed: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_like(*size, np.random.default_rng(seed))).save(path, "JPEG", quality=quality)


def make_jpegs(root: Path, n: int, size: tuple[int, int], quality: int, seed: int) -> list[Path]:
    """root/class_K/NNNNN.jpg, n images over 10 classes, landscape `size` and (odd i) portrait;
    existing files are kept.

    Image i is drawn from its own generator (seed, i), so the set does not depend on how
    many processes make it: one per core (about 45 ms an image on one core here; 4,096
    images on one core would eat most of a GPU check's time).
    """
    paths = [root / f"class_{i % 10}" / f"{i:05d}.jpg" for i in range(n)]
    todo = [(path, tuple(size) if i % 2 == 0 else tuple(size)[::-1], quality, [seed, i])
            for i, path in enumerate(paths) if not path.exists()]
    if len(todo) > 64:
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_write_jpeg, *zip(*todo), chunksize=16))
    else:
        for job in todo:
            _write_jpeg(*job)
    return paths


def endless_batches(dataset, collate_fn: Callable, batch_size: int, workers: int, device: torch.device,
                    num_batches: int, seed: int) -> Iterator:
    """num_batches shuffled batches in one DataLoader pass: no epoch boundary stalls the workers."""
    sampler = RandomSampler(dataset, num_samples=num_batches * batch_size,
                            generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_fn)
    return iter(loader)


# -- timing ----------------------------------------------------------------------------


def timed(run_one: Callable[[], int], n: int, warmup: int, device: torch.device) -> dict:
    """Images/s over n calls of run_one (each returns its batch's image count), after warm-up."""
    for _ in range(warmup):
        run_one()
    synchronize(device)
    images, start = 0, time.perf_counter()
    for _ in range(n):
        images += run_one()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds}


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    torch.manual_seed(args.seed)

    with contextlib.ExitStack() as stack:
        root = args.data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mae-jpegs-"))) / "jpegs"
        t0 = time.perf_counter()
        paths = make_jpegs(root, args.num_images, tuple(args.image_size), args.quality, args.seed)
        jpeg_kb = float(np.mean([p.stat().st_size for p in paths]) / 1e3)
        print(f"{len(paths)} JPEGs of {args.image_size[0]}x{args.image_size[1]} and (every other) "
              f"{args.image_size[1]}x{args.image_size[0]}, mean {jpeg_kb:.1f} KB, "
              f"in {root} ({time.perf_counter() - t0:.1f} s)")
        overrides = [
            "data.dataset=imagefolder", override_text("data.data_dir", str(root)), f"data.num_workers={args.workers}",
            f"model.name={args.model}", f"model.img_size={args.img_size}", "model.in_chans=3",
            f"mask.ratio={args.mask_ratio}", f"train.seed={args.seed}", f"train.batch_size={args.batch_size}",
            f"train.compile={args.compile}", f"train.compile_mode={args.compile_mode}",
        ]
        arms = args.arms.split(",")
        unknown = sorted(set(arms) - set(ARMS))
        if unknown:
            raise SystemExit(f"unknown arm {unknown[0]!r}; choose from {list(ARMS)}")
        store_info = None  # the predecoded arms' store: its conversion time and size
        if any(ARMS[a][0] == "predecoded" for a in arms):
            store = root.with_name(f"{root.name}-predecoded-{args.short_side}")  # beside the JPEGs, reused
            t0, predecode_s = time.perf_counter(), None  # None: an earlier run's store, reused
            if not store.exists():
                write_store(root, store, args.short_side, workers=args.workers)
                predecode_s = time.perf_counter() - t0
            print(f"store of {len(PredecodedImages(store))} images, shorter side <= {args.short_side}, in {store} "
                  + (f"({predecode_s:.1f} s, {args.workers} workers)" if predecode_s is not None else "(reused)"))
            overrides.append(override_text("data.predecoded_dir", str(store)))
            store_info = {"short_side": args.short_side, "seconds": predecode_s,
                          "mb": (store / "images.u8").stat().st_size / 1e6}
        cfgs = {a: load_config(None, overrides + [f"data.pipeline={ARMS[a][0]}"]) for a in arms}
        base = load_config(None, overrides)  # the model and step: the same for every arm
        margs = resolved_model_args(base)
        N, C, S = args.batch_size, margs["in_chans"], margs["img_size"]

        # one model and optimizer for every run: the weights' values do not change a step's cost
        model = build_model(base).to(device).train()
        step = TrainStep(model, build_optimizer(model, base, absolute_lr(base)), base, device)
        synthetic = torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(args.seed)).to(device)

        def masks() -> torch.Tensor:  # a fresh mask per step, drawn outside the compiled step (see above)
            return torch.rand(N, model.num_patches, device=device)

        def synthetic_step() -> int:
            step(synthetic, masks())
            return N

        results: dict[str, dict] = {}
        report = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "date": datetime.date.today().isoformat(),
            "device": str(device),
            "device_name": device_name(device),
            "precision": str(autocast_dtype(base, device) or "float32").removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "torchvision": __import__("torchvision").__version__},
            "jpegs": {"count": len(paths), "size": list(args.image_size), "quality": args.quality, "mean_kb": jpeg_kb},
            "store": store_info,
            "results": results,
        }

        def save() -> None:  # after every arm: a run cut short by a time limit keeps the arms it finished
            if args.json:
                write_text_atomic(json.dumps(report, indent=2), args.json)  # a kill mid-write keeps the last one

        # the prefetch queue (2 batches per worker) fills while the workers start: drain it untimed
        warmup_batches = 2 * args.workers + 2
        for name in arms:
            cfg, depth = cfgs[name], args.prefetch if ARMS[name][1] else 0
            # first, while no worker of this arm competes for the host's cores
            arm = {"synthetic": timed(synthetic_step, args.steps, args.warmup, device)}
            if name == "cpu+randaug":  # fine-tuning's training input
                dataset, collate_fn, to_batch = build_train_input(
                    cfg, device, None, cfg.finetune.crop_scale_min, seed=args.seed, randaug=cfg.finetune.randaug)
            else:
                dataset, collate_fn, to_batch = build_pretrain_input(cfg, device, seed=args.seed)
            total = warmup_batches + args.input_batches + args.warmup + args.steps
            batches = endless_batches(dataset, collate_fn, N, args.workers, device, total, args.seed)
            prepared = Prefetcher(batches, to_batch, device, depth)

            def input_only() -> int:
                return next(prepared)[0].shape[0]

            def fed_step() -> int:
                imgs, _ = next(prepared)
                step(imgs, masks())
                return imgs.shape[0]

            arm["prefetch"] = depth
            arm["input"] = timed(input_only, args.input_batches, warmup_batches, device)
            arm["end_to_end"] = timed(fed_step, args.steps, args.warmup, device)
            arm["ratio_end_to_end_over_synthetic"] = arm["end_to_end"]["img_per_s"] / arm["synthetic"]["img_per_s"]
            results[name] = arm
            save()
            print(f"{name}: input {arm['input']['img_per_s']:.1f} img/s, end to end "
                  f"{arm['end_to_end']['img_per_s']:.1f}, synthetic {arm['synthetic']['img_per_s']:.1f}")
            prepared.close()
            del prepared, batches  # shuts its workers down before the next arm's start

    print(f"{args.model} at {S}px, batch {N}, mask {args.mask_ratio}, {report['precision']} on {device} "
          f"({report['device_name']}), {report['threads']} threads, {args.workers} workers, "
          f"{args.steps} steps{f' compiled ({args.compile_mode})' if args.compile else ''}")
    print(f"{'pipeline':<20} {'input img/s':>12} {'end-to-end img/s':>17} {'synthetic img/s':>16} {'e2e/synth':>10}")
    for name, arm in results.items():
        print(f"{name:<20} {arm['input']['img_per_s']:>12.1f} {arm['end_to_end']['img_per_s']:>17.1f} "
              f"{arm['synthetic']['img_per_s']:>16.1f} {arm['ratio_end_to_end_over_synthetic']:>10.3f}")
    return report


if __name__ == "__main__":
    with cleanup_on_termination():  # `timeout` (gpu_check.sh) sends SIGTERM: remove the generated JPEGs too
        main()
