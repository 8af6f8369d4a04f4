"""Linear probing of a frozen MAE encoder.

- `quick_probe`: logistic regression (L-BFGS, full batch) on cached frozen features of a
  training subset, scored on other training images held out from its fit
  (`probe.quick_split: val`, the default) or on the test split (`test`). Seconds on a CPU;
  every sweep trial ends with it, and its top-1 is the sweep objective, so by default
  choosing encoders never looks at the test split.
- `linear_probe`: the paper's recipe (He et al. 2021, Appendix A.2): frozen encoder,
  BatchNorm without affine before a linear head, LARS (timm's) or SGD, lr = base_lr *
  batch / 256, cosine schedule with warm-up, augmented training images, read through
  `data.pipeline` as pretraining reads them (CPU workers, GPU decode or a pre-decoded
  store). Its trained head is kept: `save_probe_head` writes it as a checkpoint folder,
  `load_probe_head` reads it back (the frozen encoder it was trained on is not in it).
  Given a `run_dir`, it checkpoints every `probe.checkpoint_every` epochs (head, optimizer,
  RNG states, the epochs so far: small, the encoder is not in them) and resumes from the
  newest one, drawing what an uninterrupted run would have drawn.
`linear_probe` reports top-1 on the test split.
"""

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import mae
from mae.checkpoint import (
    CheckpointError, check_epoch_length, check_kind, check_recipe, checkpoint_due, load_checkpoint, resume_source,
    rng_state, save_checkpoint, save_epoch_checkpoint, set_rng_state,
)
from mae.config import PROBE_RECIPE, ConfigError, ExperimentConfig, to_dict
from mae.data import CorruptDatasetError, build_dataset, collate_skip_none, eval_loader, held_out_split
from mae.device_input import Prefetcher, ToDevice, build_train_input, prefetch_depth
from mae.engine import autocast, autocast_dtype, select_device, worker_seed
from mae.models import MaskedAutoencoderViT
from mae.optim import cosine_lr, set_lr

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "probe"  # a linear-probe checkpoint's "kind", which resuming checks


def num_classes(train: Dataset, test: Dataset) -> int:
    """The training split's class count (10 for data with no class names: synthetic).

    Labels are indices into each split's class list, so both splits must name the same
    classes in the same order: an ImageFolder whose val/ lacks a class folder, or a
    pre-decoded store made from another tree, would shift every label after it. Raises
    CorruptDatasetError (a ValueError) naming the difference.
    """
    names = [list(getattr(getattr(d, "dataset", d), "classes", None) or []) for d in (train, test)]  # through a Subset
    if all(names) and names[0] != names[1]:
        only_train = sorted(set(names[0]) - set(names[1]))[:5]
        only_test = sorted(set(names[1]) - set(names[0]))[:5]
        raise CorruptDatasetError(
            f"the training split has {len(names[0])} classes and the test split {len(names[1])}, not the same "
            f"ones in the same order (only in training: {only_train}; only in test: {only_test}); labels are "
            "class indices, so give both splits the same class folders (and a pre-decoded store the same tree)")
    return len(names[0]) or 10


@torch.no_grad()
def extract_features(
    model: MaskedAutoencoderViT, dataset: Dataset, device: torch.device, pool: str = "cls",
    batch_size: int = 512, dtype: torch.dtype | None = None, num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (M, D) float32 on the CPU and labels (M,); the encoder runs under
    autocast to `dtype` (None: float32), the images are read by `num_workers` workers."""
    model.eval()
    loader = eval_loader(dataset, batch_size, num_workers, device)
    feats, labels = [], []
    for imgs, y in loader:
        with autocast(device, dtype):
            feats.append(model.forward_features(imgs.to(device), pool=pool).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def fit_logistic(
    x_train: torch.Tensor, y_train: torch.Tensor, classes: int, iters: int = 100,
    lr: float = 0.1, weight_decay: float = 1e-4,
) -> nn.Linear:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS."""
    head = nn.Linear(x_train.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=lr * 10, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x_train), y_train)
        loss = loss + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def quick_probe_splits(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The dataset splits `quick_probe` reads: the training split, and the test split with quick_split test."""
    return ("train", "test") if cfg.probe.quick_split == "test" else ("train",)


def quick_probe(
    model: MaskedAutoencoderViT, cfg: ExperimentConfig, device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Top-1 of a logistic regression on frozen features (the sweep objective), scored on
    training images held out from its fit (probe.quick_split val) or on the test split.

    Returns {"probe_top1", "probe_train_top1", "probe_n_train", "probe_n_test", "probe_seconds"}
    (probe_n_test: the images it was scored on, from either split).
    """
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else select_device(cfg.train.device)
    model = model.to(device)
    p = cfg.probe
    if p.quick_split == "val":
        train, test = held_out_split(build_dataset(cfg, "train", augment=False), p.quick_train_size,
                                     p.quick_test_size)
    else:
        train = build_dataset(cfg, "train", augment=False, subset=p.quick_train_size)
        test = build_dataset(cfg, "test", augment=False, subset=p.quick_test_size)
    classes = num_classes(train, test)
    dtype = autocast_dtype(cfg, device)
    x_train, y_train = extract_features(model, train, device, p.pool, dtype=dtype, num_workers=cfg.data.num_workers)
    x_test, y_test = extract_features(model, test, device, p.pool, dtype=dtype, num_workers=cfg.data.num_workers)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = fit_logistic(x_train, y_train, classes, p.quick_epochs, p.quick_lr, p.quick_weight_decay)
    with torch.no_grad():
        train_top1 = (head(x_train).argmax(1) == y_train).float().mean().item()
        top1 = (head(x_test).argmax(1) == y_test).float().mean().item()
    return {
        "probe_top1": top1, "probe_train_top1": train_top1, "probe_n_train": len(y_train),
        "probe_n_test": len(y_test), "probe_seconds": time.perf_counter() - t0,
    }


class LinearProbeHead(nn.Module):
    """BatchNorm without affine (a per-feature whitening the paper found helps) + linear."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(feats))


def probe_optimizer(head: nn.Module, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    from timm.optim import Lars

    # LARS trust ratio on weight matrices only; biases take plain momentum SGD (as the paper).
    weights = [p for p in head.parameters() if p.ndim > 1]
    others = [p for p in head.parameters() if p.ndim <= 1]
    return Lars(
        [{"params": weights, "always_adapt": True, "weight_decay": weight_decay},
         {"params": others, "always_adapt": False, "weight_decay": 0.0}],
        lr=lr, momentum=0.9,
    )


@dataclass
class ProbeResult:
    top1: float
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    test_images: int = 0  # how many test images top1 is measured on (probe.test_subset, else all)
    head: LinearProbeHead | None = None  # the trained head, in eval mode


def save_probe_head(folder: str | os.PathLike, head: LinearProbeHead, cfg: ExperimentConfig,
                    source: str | os.PathLike) -> Path:
    """Write a trained probe head to folder/checkpoint.pt (+ config.yaml), atomically; return the folder.

    The payload: `head` (the state dict: BatchNorm running statistics, linear weight and
    bias), `config` (the resolved config; `probe.pool` says which features it reads) and
    `source` (the encoder checkpoint whose frozen features it was trained on). It loads
    with torch.load(weights_only=True).
    """
    return save_checkpoint(folder, {"head": head.state_dict(), "config": to_dict(cfg), "source": str(source)})


def load_probe_head(path: str | os.PathLike) -> tuple[LinearProbeHead, dict[str, Any]]:
    """(head in eval mode, the whole payload) from a folder or file written by `save_probe_head`."""
    payload = load_checkpoint(path)
    state = payload.get("head")
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise CheckpointError(f"{path} holds no linear-probe head (no 'head' with fc.weight); "
                              "pass a probe.parquet checkpoint_path")
    classes, dim = state["fc.weight"].shape  # (K, D)
    head = LinearProbeHead(dim, classes)
    head.load_state_dict(state)
    return head.eval(), payload


@torch.no_grad()
def evaluate(model: MaskedAutoencoderViT, head: nn.Module, loader: DataLoader, device: torch.device,
             pool: str, dtype: torch.dtype | None = None) -> float:
    """Top-1 of the head on the frozen encoder's features (encoder under autocast to dtype)."""
    head.eval()
    correct = total = 0
    for imgs, y in loader:
        with autocast(device, dtype):
            feats = model.forward_features(imgs.to(device), pool=pool)
        logits = head(feats.float())
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / max(1, total)


def linear_probe(
    model: MaskedAutoencoderViT, cfg: ExperimentConfig, device: torch.device | str | None = None,
    progress: bool = True, on_epoch_end: Callable[[dict[str, float], Path | None], None] | None = None,
    run_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
    keep_checkpoints: int = 2,
) -> ProbeResult:
    """The paper's linear probe: frozen encoder, BN + linear head, LARS, cosine with warm-up.

    on_epoch_end(metrics, checkpoint_dir) is called after each epoch; checkpoint_dir is the
    folder written after it, else None. run_dir: where to write run_dir/checkpoint-EEEE/
    every `probe.checkpoint_every` epochs and after the last (the newest `keep_checkpoints`
    are kept); a probe checkpoint already there is resumed, with the same frozen encoder
    (checked). resume_from: a checkpoint folder to resume from instead (Ray hands one over).
    """
    t0 = time.perf_counter()
    p = cfg.probe
    device = torch.device(device) if device is not None else select_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    augment = None
    if p.augment:  # crops and flips where data.pipeline says: CPU workers or the device
        train, collate_fn, to_batch = build_train_input(cfg, device, p.train_subset, p.crop_scale_min)
        augment = getattr(to_batch, "augment", None)  # the device pipeline's own generator
    else:
        train = build_dataset(cfg, "train", augment=False, subset=p.train_subset)
        collate_fn, to_batch = collate_skip_none, ToDevice(device)
    test = build_dataset(cfg, "test", augment=False, subset=p.test_subset)
    classes = num_classes(train, test)
    accum = p.accum_iter
    if len(train) < p.batch_size * accum:
        raise ConfigError(f"probe.batch_size {p.batch_size} x probe.accum_iter {accum} exceeds the {len(train)} "
                         "training images: lower either")
    # shuffled and augmented from a generator reseeded per epoch, with workers started afresh
    # each epoch (as pretraining's): a resumed probe draws what an uninterrupted one draws
    epoch_rng = torch.Generator()
    train_loader = DataLoader(train, batch_size=p.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.data.num_workers, collate_fn=collate_fn,
                              pin_memory=device.type == "cuda", persistent_workers=False, generator=epoch_rng)
    test_loader = eval_loader(test, 512, cfg.data.num_workers, device, persistent=True)
    dim = model.cls_token.shape[-1]
    head = LinearProbeHead(dim, classes).to(device)
    peak_lr = p.base_lr * p.batch_size * accum / 256  # per optimizer step's images
    optimizer = probe_optimizer(head, p.optimizer, peak_lr, p.weight_decay)
    steps_per_epoch = len(train_loader) // accum  # optimizer steps
    total, warmup = p.epochs * steps_per_epoch, int(round(p.warmup_epochs * steps_per_epoch))
    dtype = autocast_dtype(cfg, device)  # the frozen encoder's; the head trains in float32
    result, step, start_epoch = ProbeResult(top1=0.0, test_images=len(test)), 0, 0
    fingerprint = encoder_fingerprint(model)
    source = resume_source(run_dir, resume_from)
    if source is not None:
        payload = check_kind(load_checkpoint(source), source, CHECKPOINT_KIND, "linear-probe",
                             "mae.probe.linear_probe")
        check_recipe(payload, source, cfg, PROBE_RECIPE)
        check_epoch_length(payload, source, steps_per_epoch)
        if not torch.equal(payload["encoder_fingerprint"], fingerprint):
            raise CheckpointError(f"{source} was written while probing another encoder; resume with the encoder "
                                  "it probed, or start in another run folder")
        try:
            head.load_state_dict(payload["head"])
            optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{source} does not fit this probe's head or optimizer ({e}); resume with the "
                                  "config that wrote it, or start in another run folder") from e
        start_epoch, step = int(payload["epoch"]), int(payload["step"])
        result.epochs = list(payload["history"])
        set_rng_state(payload["rng"])
        if augment is not None and payload.get("augment_rng") is not None:
            augment.load_state_dict(payload["augment_rng"])
        log.info("linear probe resumed from %s at epoch %d (step %d)", source, start_epoch, step)
    for epoch in range(start_epoch, p.epochs):
        epoch_rng.manual_seed(worker_seed(cfg.train.seed, 0, epoch))
        head.train()
        loss_sum = torch.zeros((), device=device)
        n_steps = 0
        batches = itertools.islice(train_loader, steps_per_epoch * accum)  # whole optimizer steps only
        with Prefetcher(batches, to_batch, device, prefetch_depth(cfg, device)) as prepared:
            for it, (imgs, y) in enumerate(tqdm(prepared, total=steps_per_epoch * accum, leave=False,
                                                desc=f"probe {epoch + 1}/{p.epochs}", disable=not progress)):
                if it % accum == 0:
                    set_lr(optimizer, cosine_lr(step, total, warmup, peak_lr))
                    step += 1
                # BatchNorm normalises each loaded batch; gradients add up over accum of them
                if imgs.shape[0] >= 2:  # unreadable images (each one logged) may leave too few for BatchNorm
                    with torch.no_grad(), autocast(device, dtype):
                        feats = model.forward_features(imgs, pool=p.pool)
                    loss = nn.functional.cross_entropy(head(feats.float()), y.to(device))
                    (loss / accum if accum > 1 else loss).backward()
                    loss_sum += loss.detach()
                    n_steps += 1
                if (it + 1) % accum == 0:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        top1 = evaluate(model, head, test_loader, device, p.pool, dtype)
        result.epochs.append({"epoch": epoch + 1, "train_loss": loss_sum.item() / max(1, n_steps),
                              "test_top1": top1})
        log.info("probe epoch %d/%d loss %.4f test top-1 %.4f", epoch + 1, p.epochs,
                 result.epochs[-1]["train_loss"], top1)
        ckpt = None
        if run_dir is not None and checkpoint_due(epoch + 1, p.checkpoint_every, p.epochs):
            ckpt = save_epoch_checkpoint(run_dir, epoch + 1, {
                "kind": CHECKPOINT_KIND, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1, "step": step, "rng": rng_state(),
                "augment_rng": augment.state_dict() if augment is not None else None, "history": result.epochs,
                "encoder_fingerprint": fingerprint, "config": to_dict(cfg), "mae_version": mae.__version__,
            }, keep_checkpoints)
        if on_epoch_end is not None:
            on_epoch_end(dict(result.epochs[-1]), ckpt)
    result.top1 = result.epochs[-1]["test_top1"]
    result.seconds = time.perf_counter() - t0
    result.head = head.eval()
    return result


@torch.no_grad()
def encoder_fingerprint(model: nn.Module) -> torch.Tensor:
    """Float64 sums of the encoder's patch embedding, position table and last block (our MAE or
    timm's ViT): probe and fine-tuning checkpoints record them, so that a run is not resumed
    on top of other weights than those it started from."""
    parts = [model.patch_embed.proj.weight, model.pos_embed, *model.blocks[-1].parameters()]
    return torch.stack([t.detach().cpu().double().sum() for t in parts])  # on the CPU: the same on any device
