"""End-to-end fine-tuning of an MAE encoder as a classifier (He et al. 2021, Appendix A.3).

The classifier is timm's `VisionTransformer` built to the encoder's shape (width, depth,
heads, patch, image size, channels), so our encoder's parameter names load as they are
(`patch_embed`, `cls_token`, `pos_embed`, `blocks.*`). As in the reference fine-tuning
code: average pooling over the patch tokens followed by a fresh LayerNorm (`fc_norm`; the
pretrained final `norm` is not used then), a linear head initialised near zero
(std 2e-5), position embeddings that start from the pretrained (sin-cos) ones and are
trained, and the recipe of the paper's Table 9: AdamW, layer-wise lr decay (the reference's
layer ids, `layer_decay_groups`; none from scratch), cosine schedule with warm-up, drop path, label smoothing,
mixup/cutmix (timm's `Mixup` with `SoftTargetCrossEntropy`), RandAugment and random
erasing. The training images get RandomResizedCrop (smallest area `finetune.crop_scale_min`,
the reference's 0.08), a flip and timm's RandAugment (`finetune.randaug`) in the CPU
DataLoader workers, as in the reference; with `finetune.randaug: null` they are read through
`data.pipeline` as pretraining's are (CPU workers, GPU decode or a pre-decoded store).
Random erasing (timm's `RandomErasing`, `finetune.reprob`) is applied to each batch on the
device, before mixup: per image the same draw as the reference's per-image transform.
Top-1 is measured on the test split after every epoch. As in pretraining, AdamW is fused,
`train.compile` compiles the forward pass and loss, and `train.precision` sets the autocast;
`FinetuneStep` is the per-batch hot path (benchmarks/finetune_step.py times it).

`finetune(cfg, weights)` starts from pretrained weights (a model, a state dict or a
checkpoint path of ours or another tool's: see `mae.pretrained`);
`finetune(cfg, from_scratch=True)` runs the same schedule from a random initialisation,
the baseline that says whether pretraining helped. Runs under DDP when torch.distributed
is initialised (Ray Train does that), like the pretraining engine. Given a `run_dir`, it
checkpoints every `finetune.checkpoint_every` epochs (classifier, optimizer, RNG states,
the epochs so far) and resumes from the newest checkpoint there, drawing what an
uninterrupted run would have drawn.

Symbols: N batch, K classes, D encoder width.
"""

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import mae
from mae.checkpoint import (
    CheckpointError, ResumeRefusedError, check_epoch_length, check_kind, check_recipe, check_world_size,
    checkpoint_due, load_checkpoint, model_state, resume_source, rng_state, save_epoch_checkpoint, set_rng_state,
)
from mae.config import FINETUNE_RECIPE, ConfigError, ExperimentConfig, resolved_model_args, to_dict, uses_cuda_graphs
from mae.data import build_dataset, eval_loader
from mae.device_input import Prefetcher, build_train_input, prefetch_depth
from mae.engine import (
    autocast, autocast_dtype, gather_per_rank, seed_everything, select_device, stand_in, worker_seed,
)
from mae.models import MaskedAutoencoderViT
from mae.models.pos_embed import sincos_2d
from mae.optim import cosine_lr, fused_kwargs, set_lr
from mae.pretrained import check_compatible, encoder_state, fit_pos_embed
from mae.probe import encoder_fingerprint, num_classes

log = logging.getLogger(__name__)

Weights = MaskedAutoencoderViT | dict[str, torch.Tensor] | str | os.PathLike
CHECKPOINT_KIND = "finetune"  # a fine-tuning checkpoint's "kind", which resuming checks


def build_classifier(cfg: ExperimentConfig, classes: int) -> VisionTransformer:
    """timm's ViT with the configured MAE encoder's shape and a `classes`-way head, randomly initialised.

    Position embeddings start as the fixed 2-D sin-cos ones of pretraining (they are
    learned from there), so a from-scratch model differs from a pretrained one only in
    what pretraining learns.
    """
    args = resolved_model_args(cfg)
    f = cfg.finetune
    model = VisionTransformer(
        img_size=args["img_size"], patch_size=args["patch_size"], in_chans=args["in_chans"],
        num_classes=classes, global_pool=f.global_pool, embed_dim=args["embed_dim"], depth=args["depth"],
        num_heads=args["num_heads"], mlp_ratio=args.get("mlp_ratio", 4.0), qkv_bias=True,
        drop_path_rate=f.drop_path, norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    grid = args["img_size"] // args["patch_size"]
    with torch.no_grad():
        model.pos_embed.copy_(sincos_2d(args["embed_dim"], grid).unsqueeze(0))  # (1, 1 + L, D)
        nn.init.trunc_normal_(model.head.weight, std=2e-5)  # as the reference: start near zero
        nn.init.zeros_(model.head.bias)
    return model


def load_pretrained(model: VisionTransformer, weights: Weights) -> VisionTransformer:
    """Load MAE encoder weights into the classifier; head (and fc_norm when avg-pooling) stay fresh.

    Position embeddings are interpolated when the weights were pretrained at another
    image size. Raises CheckpointError when the encoder's shape differs from the model's.
    """
    if isinstance(weights, MaskedAutoencoderViT):
        weights = weights.encoder_state_dict()
    state = encoder_state(weights)
    grid = model.patch_embed.grid_size[0]
    check_compatible(state, model.embed_dim, len(model.blocks), model.patch_embed.patch_size[0], model.in_chans)
    state = fit_pos_embed(state, grid)
    fresh = {"head.weight", "head.bias"}
    if isinstance(model.norm, nn.Identity):  # avg pooling: fc_norm replaces the pretrained norm
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        fresh |= {"fc_norm.weight", "fc_norm.bias"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != fresh or unexpected:
        raise CheckpointError(
            f"encoder weights do not fit the classifier: missing {sorted(set(missing) - fresh)[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model


def optimizer_for(model: VisionTransformer, cfg: ExperimentConfig, lr: float,
                  from_scratch: bool = False) -> torch.optim.Optimizer:
    """AdamW over layer-wise lr-decayed groups (`layer_decay_groups`); from random weights
    without the decay (finetune.layer_decay 1), as the paper trains ViTs from scratch
    (Appendix A.2): decay shields pretrained early layers, and would only slow fresh ones.

    Fused (one kernel per group rather than a loop over tensors) where torch has it, as
    pretraining's optimizer is.
    """
    f = cfg.finetune
    groups = layer_decay_groups(model, f.weight_decay, 1.0 if from_scratch else f.layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(f.beta1, f.beta2), **fused_kwargs(model))


def layer_decay_groups(model: VisionTransformer, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with an "lr_scale" of layer_decay ** (depth + 1 - layer), the reference's
    layer ids (facebookresearch/mae util/lr_decay.py): 0 for the patch embedding, cls token and
    position embedding, i + 1 for block i, depth + 1 (scale 1) for what follows the blocks: the
    final norm or fc_norm, and the head. No weight decay on 1-D tensors, the cls token and the
    position embedding. Ours rather than timm's param_groups_layer_decay, which puts the final
    norm (global_pool token) with the last block, at scale layer_decay."""
    depth = len(model.blocks)
    no_decay = set(model.no_weight_decay())
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = depth + 1
        decays = param.ndim > 1 and name not in no_decay
        group = groups.setdefault((layer, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer),
        })
        group["params"].append(param)
    return list(groups.values())


def peak_lr(cfg: ExperimentConfig, world_size: int = 1) -> float:
    """lr = base_lr * effective batch / 256, the paper's scaling rule."""
    return cfg.finetune.base_lr * cfg.finetune.batch_size * world_size / 256


@dataclass
class FinetuneResult:
    top1: float  # test top-1 after the last epoch
    best_top1: float  # highest test top-1 over the epochs
    init: str  # "pretrained" | "scratch"
    test_images: int = 0  # how many test images top-1 is measured on (finetune.test_subset, else all)
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_sec: float = 0.0
    model: VisionTransformer | None = None  # the fine-tuned classifier (unwrapped)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def eval_shard(n: int, rank: int, world_size: int) -> range:
    """The test images rank scores: every world_size-th, so each of the n is scored once.

    Not DistributedSampler, which pads the split to a multiple of world_size by repeating
    images, so top-1 would count up to world_size - 1 of them twice.
    """
    return range(rank, n, world_size)


class FinetuneStep:
    """Random erasing, mixup, forward, loss, backward and the AdamW update of one batch.

    Fine-tuning's hot path, used by `finetune` and timed as is by
    benchmarks/finetune_step.py. It never reads a value back to the host: the loss comes
    back as a detached device tensor. With train.compile the forward pass and loss (under
    autocast) are one compiled graph and AOTAutograd compiles the backward; evaluation
    stays eager.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: ExperimentConfig,
                 device: torch.device | str, classes: int):
        """model: the classifier, or its DDP wrapper; classes: the head's outputs (mixup's targets)."""
        f = cfg.finetune
        device = torch.device(device)
        self.optimizer, self.clip_grad = optimizer, f.clip_grad
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # the reference's random erasing: pixel-wise normal noise, one box, on normalised images
        self.erase = RandomErasing(f.reprob, mode="pixel", max_count=1, device=str(device)) if f.reprob > 0 else None
        self.mixup = None
        if (f.mixup > 0 or f.cutmix > 0) and f.mixup_prob > 0:
            self.mixup = Mixup(mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                               switch_prob=f.mixup_switch_prob, mode="batch", label_smoothing=f.label_smoothing,
                               num_classes=classes)
            criterion: nn.Module = SoftTargetCrossEntropy()  # mixup makes soft (already smoothed) targets
        elif f.label_smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=f.label_smoothing)
        else:
            criterion = nn.CrossEntropyLoss()
        dtype = autocast_dtype(cfg, device)

        def loss_of(imgs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with autocast(device, dtype):
                return criterion(model(imgs), y)

        # dynamic=False: one batch shape, so static shapes; another shape gets its own static graph
        # (left to torch, a second shape makes the graph dynamic: slower, and no longer what was timed)
        self.loss_of = (torch.compile(loss_of, mode=cfg.train.compile_mode, dynamic=False)
                        if cfg.train.compile else loss_of)
        self.cudagraphs = uses_cuda_graphs(cfg.train) and device.type == "cuda"

    def __call__(self, imgs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W) and labels (N,) on the device, N even with mixup -> the loss (detached)."""
        if self.erase is not None:
            imgs = self.erase(imgs.clone())  # in place, per image: the caller's batch stays as it was
        if self.mixup is not None:
            imgs, y = self.mixup(imgs, y)  # y: (N, K) soft targets
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = self.loss_of(imgs, y)
        loss.backward()
        if self.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.optimizer.step()
        # freed here, not before the next backward: the gradients would otherwise sit through
        # the next forward pass (and evaluation), at its activations' peak
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone() if self.cudagraphs else loss.detach()  # see mae.engine.TrainStep


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             dtype: torch.dtype | None = None) -> float:
    """Top-1 over the loader (summed over ranks under DDP), under autocast to dtype."""
    model.eval()
    counts = torch.zeros(2, device=device)  # correct, total
    for imgs, y in loader:
        with autocast(device, dtype):
            logits = model(imgs.to(device))  # (N, K)
        counts[0] += (logits.argmax(1) == y.to(device)).sum()
        counts[1] += len(y)
    _, world_size = _world()
    if world_size > 1:
        dist.all_reduce(counts)
    return (counts[0] / counts[1].clamp_min(1)).item()


def finetune(
    cfg: ExperimentConfig, weights: Weights | None = None, from_scratch: bool = False,
    device: torch.device | str | None = None, progress: bool = True,
    on_epoch_end: Callable[[dict[str, float], Path | None], None] | None = None,
    run_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
    keep_checkpoints: int = 2,
) -> FinetuneResult:
    """Fine-tune end to end as `cfg.finetune` says; top-1 on the test split after each epoch.

    weights: the pretrained encoder (our MAE, a state dict or a checkpoint path, ours or
    another tool's); from_scratch=True instead trains the same classifier from random
    weights. on_epoch_end(metrics, checkpoint_dir) is called after each epoch on every
    rank; checkpoint_dir is the folder written after that epoch (rank 0), else None.
    run_dir: where to write run_dir/checkpoint-EEEE/ every `finetune.checkpoint_every`
    epochs and after the last (the newest `keep_checkpoints` are kept); a fine-tuning
    checkpoint already there is resumed. resume_from: a checkpoint folder to resume from
    instead (Ray hands one over). Without either, nothing is written. Under DDP every rank
    passes a run_dir (gathering the ranks' RNG states is collective); rank 0 writes.
    Raises CheckpointError for a checkpoint that is not this run's kind.
    """
    if (weights is None) != from_scratch:
        raise ValueError("pass pretrained weights, or from_scratch=True for the random-init baseline (not both)")
    t0 = time.perf_counter()
    f = cfg.finetune
    rank, world_size = _world()
    device = torch.device(device) if device is not None else select_device(cfg.train.device)
    seed_everything(cfg.train.seed + rank)

    # crops and flips where data.pipeline says (CPU workers, or the device), each rank its own
    # draws; RandAugment, when on, in the CPU workers
    train, collate_fn, to_batch = build_train_input(cfg, device, f.train_subset, f.crop_scale_min,
                                                    seed=cfg.train.seed + rank, randaug=f.randaug)
    test = build_dataset(cfg, "test", augment=False, subset=f.test_subset)
    classes = num_classes(train, test)
    if len(train) // world_size < f.batch_size:
        raise ConfigError(f"finetune.batch_size {f.batch_size} exceeds the {len(train) // world_size} training "
                         "images per process; lower it or raise finetune.train_subset")
    augment = getattr(to_batch, "augment", None)  # the device pipeline's own generator
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed,
                                 drop_last=True)
    # the workers' RNGs are seeded per epoch and the workers started afresh, as pretraining's
    # are (mae.engine.worker_seed): a resumed run draws the crops an uninterrupted one draws
    worker_rng = torch.Generator()
    train_loader = DataLoader(train, batch_size=f.batch_size, sampler=sampler, drop_last=True,
                              num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                              persistent_workers=False, collate_fn=collate_fn, generator=worker_rng)
    steps_per_epoch = len(train_loader)
    test_shard = Subset(test, eval_shard(len(test), rank, world_size))
    test_loader = eval_loader(test_shard, max(f.batch_size, 256), cfg.data.num_workers, device, persistent=True)

    init = "scratch" if from_scratch else "pretrained"
    source = resume_source(run_dir, resume_from)
    payload = None
    if source is not None:
        payload = _resumable(load_checkpoint(source), source, init, cfg, world_size, steps_per_epoch)
    model = build_classifier(cfg, classes)
    start_weights = None
    if not from_scratch:  # also when resuming: the checkpoint must be of a run from these weights
        start_weights = encoder_fingerprint(load_pretrained(model, weights))
        if payload is not None and not torch.equal(payload["start_weights"], start_weights):
            raise CheckpointError(f"{source} was written by a fine-tuning run from other pretrained weights; resume "
                                  "it with the weights it started from, or start in another run folder")
    model.to(device)
    lr_peak = peak_lr(cfg, world_size)
    optimizer = optimizer_for(model, cfg, lr_peak, from_scratch)
    result = FinetuneResult(top1=0.0, best_top1=0.0, init=init, test_images=len(test))
    start_epoch, step, images, train_time = 0, 0, 0, 0.0
    if payload is not None:
        try:
            model.load_state_dict(model_state(payload), strict=True)
            scales = [group["lr_scale"] for group in optimizer.param_groups]
            optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError) as e:  # another model shape, or other parameter groups
            raise ResumeRefusedError(
                f"{source} does not fit this fine-tuning run's model or optimizer ({e}); resume with the config "
                "that wrote it, or start in another run folder. With finetune.global_pool token, a checkpoint "
                "written before 2026-11-29 (f8c8e8f) has other layer-decay groups: resume it with that code") from e
        for group, scale in zip(optimizer.param_groups, scales):  # this code's scales, not the checkpoint's
            group["lr_scale"] = scale  # (a from-scratch run of older code had layer decay)
        start_epoch, step = int(payload["epoch"]), int(payload["step"])
        images, train_time = int(payload["images"]), float(payload["train_time_s"])
        result.epochs = list(payload["history"])
        set_rng_state(payload["rng"][rank])
        if augment is not None and payload.get("augment_rng") is not None:
            augment.load_state_dict(payload["augment_rng"][rank])
        log.info("fine-tuning resumed from %s at epoch %d (step %d)", source, start_epoch, step)
    train_model: nn.Module = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    train_step = FinetuneStep(train_model, optimizer, cfg, device, classes)
    dtype = autocast_dtype(cfg, device)

    depth = prefetch_depth(cfg, device, to_batch)  # 0 when the crops and RandAugment would run on its thread
    total, warmup = f.epochs * steps_per_epoch, int(round(f.warmup_epochs * steps_per_epoch))
    for epoch in range(start_epoch, f.epochs):
        sampler.set_epoch(epoch)
        worker_rng.manual_seed(worker_seed(cfg.train.seed, rank, epoch))
        train_model.train()
        t_epoch = time.perf_counter()
        loss_sum, n_batches, n_images = torch.zeros((), device=device), 0, 0
        last = None
        with Prefetcher(train_loader, to_batch, device, depth) as batches:
            bar = tqdm(batches, total=steps_per_epoch, desc=f"finetune {epoch + 1}/{f.epochs}", leave=False,
                       disable=not (progress and rank == 0))
            for it, (imgs, y) in enumerate(bar):
                lr = cosine_lr(step, total, warmup, lr_peak, f.min_lr)
                set_lr(optimizer, lr)  # each group's lr_scale carries its layer decay
                y = y.to(device, non_blocking=True)  # imgs are on the device already
                if len(y) % 2:  # a skipped (unreadable) image left an odd batch; mixup pairs images
                    imgs, y = imgs[:-1], y[:-1]
                if len(y) == 0:  # nothing readable left: train on the previous batch (DDP ranks step together)
                    imgs, y = stand_in(last, epoch, it)
                last = imgs, y
                loss_sum += train_step(imgs, y)
                n_batches += 1
                n_images += len(y)
                step += 1
        epoch_time = time.perf_counter() - t_epoch
        train_time += epoch_time
        train_loss = loss_sum.item() / max(1, n_batches)  # one host sync per epoch
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"fine-tuning loss became {train_loss} in epoch {epoch + 1}; lower "
                                     "finetune.base_lr, set finetune.clip_grad or lengthen finetune.warmup_epochs")
        images += n_images * world_size
        top1 = evaluate(model, test_loader, device, dtype)
        metrics = {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "lr": lr,
                   "test_top1": top1, "epoch_time_s": epoch_time,
                   "images_per_sec": n_images * world_size / epoch_time}
        result.epochs.append(metrics)
        log.info("finetune epoch %d/%d loss %.4f test top-1 %.4f", epoch + 1, f.epochs, metrics["train_loss"], top1)
        ckpt = None
        if run_dir is not None and checkpoint_due(epoch + 1, f.checkpoint_every, f.epochs):
            rngs = gather_per_rank(rng_state(), world_size, always_list=True)
            augment_rngs = gather_per_rank(augment.state_dict(), world_size, always_list=True) if augment else None
            if rank == 0:
                ckpt = save_epoch_checkpoint(run_dir, epoch + 1, {
                    "kind": CHECKPOINT_KIND, "init": init, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step, "rng": rngs,
                    "augment_rng": augment_rngs, "history": result.epochs, "images": images,
                    "train_time_s": train_time, "start_weights": start_weights, "config": to_dict(cfg),
                    "mae_version": mae.__version__,
                }, keep_checkpoints)
        if on_epoch_end is not None:
            on_epoch_end(dict(metrics), ckpt)

    result.top1 = result.epochs[-1]["test_top1"]
    result.best_top1 = max(e["test_top1"] for e in result.epochs)
    result.seconds = time.perf_counter() - t0
    result.images_per_sec = images / train_time if train_time > 0 else 0.0
    result.model = model
    return result


def _resumable(payload: dict, source: Path, init: str, cfg: ExperimentConfig, world_size: int,
               steps_per_epoch: int) -> dict:
    """payload, if it is a fine-tuning checkpoint of a run with this init, recipe, number of
    processes and epoch length; else CheckpointError. The weights it started from are checked
    once they are loaded."""
    check_kind(payload, source, CHECKPOINT_KIND, "fine-tuning", "mae.finetune.finetune")
    check_recipe(payload, source, cfg, FINETUNE_RECIPE)
    check_world_size(payload, source, world_size)
    check_epoch_length(payload, source, steps_per_epoch)
    if payload.get("init") != init:
        raise CheckpointError(f"{source} was written by a fine-tuning run from {payload.get('init')} weights, not "
                              f"{init} ones; resume it with the same weights setting, or start in another run folder")
    return payload

