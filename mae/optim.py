"""Optimizer parameter groups and the per-step cosine schedule with linear warm-up."""

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, [decayed, not decayed], by the reference pretraining's rule (facebookresearch/mae
    main_pretrain.py: timm's add_weight_decay, no skip list): 1-D parameters (norms) and biases
    are not decayed, everything else is, the (1, 1, D) cls and mask tokens included.

    timm's param_groups_weight_decay applies the same rule but leaves out an empty group,
    so its group count would follow optim.weight_decay; a checkpoint's optimizer state
    needs the same groups to resume, hence two, always.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # fixed sin-cos position embeddings
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_kwargs(model: nn.Module) -> dict:
    """AdamW's `fused=True` where torch has the fused kernel for the model's device (CUDA,
    CPU): one kernel over all parameters instead of a Python loop over them."""
    return {"fused": True} if next(model.parameters()).device.type in ("cuda", "cpu") else {}


def cosine_lr(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to lr over warmup_steps, then half a cosine down to min_lr."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
