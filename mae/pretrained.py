"""Encoder weights from checkpoints written here or by other tools, for probing and fine-tuning.

`encoder_state(path_or_state)` returns the encoder's weights in our (reference MAE) names
from any of:

- a checkpoint of ours (`checkpoint-EEEE/` folder or its `checkpoint.pt`);
- a published reference MAE checkpoint (facebookresearch/mae): the full pretraining
  model or the encoder-only release (`mae_pretrain_vit_base.pth`: {"model": encoder
  keys, no decoder}); a reference fine-tuned checkpoint's `fc_norm` stands in for `norm`;
- a HuggingFace ViTMAE state dict (`ViTMAEForPreTraining` or the encoder-only
  `ViTMAEModel`, transformers 4.x or 5.x names, `pytorch_model.bin` or
  `model.safetensors`), converted with `mae.interop.from_hf_state_dict`.

`load_encoder(model, state)` loads those weights into one of our MAEs (the decoder is
left as built) and interpolates the position embeddings when the checkpoint was
pretrained at another image size. Files are read without running code
(`torch.load(weights_only=True)`, safetensors).

Symbols: D encoder width, C channels, p patch size, g patch-grid side, L = g * g.
"""

import logging
import os
from pathlib import Path

import torch
from torch import nn

from mae.checkpoint import CheckpointError, checkpoint_file, load_checkpoint, model_state
from mae.interop import from_hf_state_dict
from mae.models.pos_embed import interpolate_pos_embed

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
DECODER_PREFIXES = ("decoder_", "mask_token")
# Keys of a classifier built on the encoder (reference fine-tuned releases, timm ViTs).
HEAD_PREFIXES = ("head.", "fc_norm.")
_HF_MARKERS = ("vit.", "embeddings.", "encoder.layer.", "layers.", "layernorm.", "decoder.decoder_")


def is_encoder_key(name: str) -> bool:
    return name.startswith(ENCODER_PREFIXES) and not name.startswith(DECODER_PREFIXES)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file or folder (ours, the reference's, HF's), as stored."""
    path = Path(path)
    if path.is_dir() and not (path / "checkpoint.pt").is_file():
        for name in ("model.safetensors", "pytorch_model.bin"):  # an HF model folder
            if (path / name).is_file():
                path = path / name
                break
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(f"reading {path} needs the safetensors package (pip install safetensors)") from e
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors' own error type: a truncated or empty file, not safetensors at all
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}. It may be truncated (an "
                                  "interrupted copy) or not a safetensors file; re-download it") from e
    return model_state(load_checkpoint(checkpoint_file(path)))


def encoder_state(source: str | os.PathLike | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights in our names: {patch_embed.*, cls_token, pos_embed, blocks.*, norm.*}.

    `source` is a path (see `read_state_dict`) or a state dict in any supported naming.
    Decoder and classifier-head tensors are dropped. Raises CheckpointError when no
    encoder weights are found.
    """
    state = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else model_state(source)
    if any(k.startswith(_HF_MARKERS) for k in state):
        # HF heads (a ViTMAE classifier's `classifier.*`) are not ours to convert.
        state = from_hf_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    if "norm.weight" not in state and "fc_norm.weight" in state:
        # A reference fine-tuned model pools and normalises after the blocks (fc_norm),
        # which takes the place of the pretrained final norm.
        state = {**state, "norm.weight": state["fc_norm.weight"], "norm.bias": state["fc_norm.bias"]}
    encoder = {k: v for k, v in state.items() if is_encoder_key(k)}
    if "patch_embed.proj.weight" not in encoder or not any(k.startswith("blocks.") for k in encoder):
        raise CheckpointError(
            "no MAE encoder weights found (expected patch_embed.proj.weight and blocks.*, in the reference "
            f"MAE or HuggingFace ViTMAE names); first keys: {sorted(state)[:5]}"
        )
    return encoder


def describe(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """What an encoder state dict holds: embed_dim, depth, patch_size, in_chans, grid (side)."""
    D, C, p, _ = state["patch_embed.proj.weight"].shape  # (D, C, p, p)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    info = {"embed_dim": D, "depth": depth, "patch_size": p, "in_chans": C}
    if "pos_embed" in state:
        info["grid"] = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))  # (1, 1 + L, D)
    return info


def fit_pos_embed(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """A copy of `state` whose pos_embed covers a grid x grid patch grid (bicubic, cls row kept)."""
    if "pos_embed" not in state:
        return state
    old = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    if old == grid:
        return state
    log.info("interpolating position embeddings from a %dx%d to a %dx%d patch grid", old, old, grid, grid)
    return {**state, "pos_embed": interpolate_pos_embed(state["pos_embed"], grid)}


def check_compatible(state: dict[str, torch.Tensor], embed_dim: int, depth: int, patch_size: int,
                     in_chans: int) -> None:
    """Raise CheckpointError naming what differs between checkpoint and model."""
    have = describe(state)
    want = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch_size, "in_chans": in_chans}
    differ = [f"{k} {have[k]} (model: {v})" for k, v in want.items() if have[k] != v]
    if differ:
        raise CheckpointError(
            f"the checkpoint's encoder does not fit the model: checkpoint has {', '.join(differ)}; set "
            "model.name (and model.patch_size / model.in_chans) to the variant the checkpoint was pretrained as"
        )


def load_encoder(model: nn.Module, source: str | os.PathLike | dict[str, torch.Tensor]) -> nn.Module:
    """Load encoder weights into our MAE (or any module with our encoder names); returns it.

    Every encoder parameter of `model` must be in the checkpoint; the decoder keeps its
    weights. Position embeddings are interpolated to the model's patch grid.
    """
    state = encoder_state(source)
    pos = model.pos_embed  # (1, 1 + L, D)
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    check_compatible(state, pos.shape[-1], len(model.blocks), model.patch_embed.proj.kernel_size[0],
                     model.patch_embed.proj.in_channels)
    state = fit_pos_embed(state, grid)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if is_encoder_key(k)]
    if missing or unexpected:
        raise CheckpointError(f"encoder weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model

