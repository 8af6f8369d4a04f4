"""Weight interchange with HuggingFace `ViTMAEForPreTraining`: names and tensors only.

Our state dict uses the reference MAE names (facebookresearch/mae, timm blocks); HF
splits each block's fused qkv projection into three linears and renames everything
else. This module maps one onto the other without importing transformers, so
checkpoints can move both ways on a machine without it.

HF has used two layouts for the same weights ("hf layouts"):

- "v4": transformers 4.x modules, and the format of the published checkpoint files
  (e.g. facebook/vit-mae-base): `vit.encoder.layer.{i}.attention.attention.query`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`.
- "v5": transformers 5.x modules (checked against 5.24): `vit.layers.{i}.attention.q_proj`,
  `attention.o_proj`, `mlp.fc1`, `mlp.fc2`. `from_pretrained` renames v4 files to this.

`to_hf_state_dict` writes either; `from_hf_state_dict` reads both (or a mix), and also
the encoder-only `ViTMAEModel` state dict, whose keys lack the `vit.` prefix.

Numerics are the same in both directions: HF's blocks, masking (argsort of `noise`,
ascending, lowest kept), patch order and loss match the reference, given the config
from `hf_config_kwargs`. Differences to know about:

- HF reads `mask_ratio` from its config; ours takes it per call.
- HF's default `layer_norm_eps` is 1e-12 (also in the hub's vit-mae configs); the
  reference, and we, use 1e-6.
- HF's `interpolate_pos_encoding` resizes the decoder's positions as a 1-D sequence,
  not a 2-D grid as `mae.models.pos_embed.interpolate_pos_embed` does.

Symbols: D width of the block (encoder D or decoder Dd), p patch size, C channels.
"""

import inspect
import re
from typing import Any

import torch

HF_LAYOUTS = ("v5", "v4")

# Parameters and modules outside the transformer blocks: ours -> HF (same in both layouts).
_OUTER = {
    "cls_token": "vit.embeddings.cls_token",  # (1, 1, D)
    "pos_embed": "vit.embeddings.position_embeddings",  # (1, 1 + L, D), fixed sin-cos
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",  # conv (D, C, p, p)
    "norm": "vit.layernorm",
    "decoder_embed": "decoder.decoder_embed",
    "mask_token": "decoder.mask_token",  # (1, 1, Dd)
    "decoder_pos_embed": "decoder.decoder_pos_embed",  # (1, 1 + L, Dd), fixed sin-cos
    "decoder_norm": "decoder.decoder_norm",
    "decoder_pred": "decoder.decoder_pred",  # (p*p*C, Dd)
}

# Stacks of blocks: ours -> HF, per layout.
_STACKS = {
    "v5": {"blocks": "vit.layers", "decoder_blocks": "decoder.decoder_layers"},
    "v4": {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"},
}

# Inside one block, everything but qkv: ours -> HF, per layout.
_BLOCK_PARTS = {
    "v5": {
        "norm1": "layernorm_before",
        "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    "v4": {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
}

# Our fused `attn.qkv` (3D, D) stacks query, key, value rows in this order (timm reshapes
# its output to (N, T, 3, heads, D / heads)); HF keeps three (D, D) linears.
_QKV_PARTS = {
    "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "v4": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
}

_OURS_BLOCK_KEY = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_KEY = re.compile(
    r"^(vit\.layers|vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$"
)
# Encoder-only ViTMAEModel state dicts carry no `vit.` prefix.
_HF_ENCODER_ROOTS = ("embeddings.", "layers.", "encoder.layer.", "layernorm.")


def hf_layout_of(keys: Any) -> str:
    """'v5' or 'v4': which HF layout an iterable of state-dict keys is in.

    Pass `hf_model.state_dict()` to learn what the installed transformers expects.
    """
    keys = list(keys)
    for layout in HF_LAYOUTS:
        if any(part in key for key in keys for part in _QKV_PARTS[layout]):
            return layout
    raise ValueError("no HF attention weights among these keys; cannot tell the HF layout")


def to_hf_state_dict(state: dict[str, torch.Tensor], layout: str = "v5") -> dict[str, torch.Tensor]:
    """Our (reference-named) state dict -> HF `ViTMAEForPreTraining` names.

    `layout` is "v5" (transformers 5.x modules) or "v4" (transformers 4.x modules and hub
    checkpoint files); see `hf_layout_of`. An encoder-only state dict maps to the
    encoder part. The qkv pieces are new tensors; every other tensor is passed through.
    """
    _check_layout(layout)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        block = _OURS_BLOCK_KEY.match(key)
        if block:
            stack, index, part, leaf = block.groups()
            prefix = f"{_STACKS[layout][stack]}.{index}"
            if part == "attn.qkv":
                # (3D, D) weight or (3D,) bias -> three (D, D) / (D,): query, key, value
                for hf_part, piece in zip(_QKV_PARTS[layout], _split_qkv(key, value)):
                    out[f"{prefix}.{hf_part}.{leaf}"] = piece
            elif part in _BLOCK_PARTS[layout]:
                out[f"{prefix}.{_BLOCK_PARTS[layout][part]}.{leaf}"] = value
            else:
                unknown.append(key)
            continue
        hf_key = _rename_outer(key, _OUTER)
        if hf_key is None:
            unknown.append(key)
        else:
            out[hf_key] = value
    _raise_unknown(unknown, "our MAE (reference names)")
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `ViTMAEForPreTraining` (or encoder-only `ViTMAEModel`) state dict -> our names.

    Reads the "v4" and "v5" layouts alike. Query, key and value of a block are
    concatenated into our fused qkv (new tensors); every other tensor is passed through.
    """
    outer_inverse = {hf: ours for ours, hf in _OUTER.items()}
    stack_inverse = {hf: ours for layout in HF_LAYOUTS for ours, hf in _STACKS[layout].items()}
    part_inverse = {hf: ours for layout in HF_LAYOUTS for ours, hf in _BLOCK_PARTS[layout].items()}
    qkv_index = {hf: i for layout in HF_LAYOUTS for i, hf in enumerate(_QKV_PARTS[layout])}

    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list[torch.Tensor | None]] = {}  # our qkv key -> [query, key, value]
    unknown = []
    for key, value in state.items():
        name = f"vit.{key}" if key.startswith(_HF_ENCODER_ROOTS) else key
        block = _HF_BLOCK_KEY.match(name)
        if block:
            stack, index, part, leaf = block.groups()
            prefix = f"{stack_inverse[stack]}.{index}"
            if part in qkv_index:
                qkv.setdefault(f"{prefix}.attn.qkv.{leaf}", [None, None, None])[qkv_index[part]] = value
            elif part in part_inverse:
                out[f"{prefix}.{part_inverse[part]}.{leaf}"] = value
            else:
                unknown.append(key)
            continue
        ours = _rename_outer(name, outer_inverse)
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = value
    _raise_unknown(unknown, "HF ViTMAEForPreTraining")

    for key, pieces in qkv.items():
        if any(piece is None for piece in pieces):
            missing = [n for n, piece in zip(("query", "key", "value"), pieces) if piece is None]
            raise ValueError(f"HF state dict lacks the {missing} part of {key}; it needs all three")
        out[key] = torch.cat(pieces, dim=0)  # (3D, D) weight or (3D,) bias, rows q | k | v
    return out


def hf_config_kwargs(model_args: dict[str, Any], mask_ratio: float = 0.75) -> dict[str, Any]:
    """`ViTMAEConfig` keyword arguments for the model our constructor builds from `model_args`.

    `model_args` is `mae.models.model_args(name, **overrides)` (or any subset of
    `MaskedAutoencoderViT`'s arguments; the rest take its defaults). HF fixes the mask
    ratio in its config, so it is passed here. Our non-random mask strategies have no HF
    counterpart beyond passing their noise to HF's forward.
    """
    from mae.models.mae import MaskedAutoencoderViT  # local: keep this module light

    signature = inspect.signature(MaskedAutoencoderViT.__init__)
    defaults = {n: p.default for n, p in signature.parameters.items() if n != "self"}
    unknown = set(model_args) - set(defaults)
    if unknown:
        raise ValueError(f"unknown model arguments {sorted(unknown)}; expected some of {sorted(defaults)}")
    args = {**defaults, **model_args}
    # timm's Block sizes its MLP as int(width * mlp_ratio), for encoder and decoder alike.
    return dict(
        hidden_size=args["embed_dim"],
        num_hidden_layers=args["depth"],
        num_attention_heads=args["num_heads"],
        intermediate_size=int(args["embed_dim"] * args["mlp_ratio"]),
        decoder_hidden_size=args["decoder_embed_dim"],
        decoder_num_hidden_layers=args["decoder_depth"],
        decoder_num_attention_heads=args["decoder_num_heads"],
        decoder_intermediate_size=int(args["decoder_embed_dim"] * args["mlp_ratio"]),
        image_size=args["img_size"],
        patch_size=args["patch_size"],
        num_channels=args["in_chans"],
        norm_pix_loss=bool(args["norm_pix_loss"]),
        mask_ratio=mask_ratio,
        qkv_bias=True,
        layer_norm_eps=1e-6,  # the reference's; HF's default 1e-12 differs
        hidden_act="gelu",  # exact (erf) GELU, as timm's nn.GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def _check_layout(layout: str) -> None:
    if layout not in HF_LAYOUTS:
        raise ValueError(f"unknown HF layout {layout!r}; choose one of {HF_LAYOUTS} (see hf_layout_of)")


def _split_qkv(key: str, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(3D, ...) -> three (D, ...) copies: query, key, value."""
    if value.shape[0] % 3:
        raise ValueError(f"{key} has {value.shape[0]} rows, not a multiple of 3: not a fused qkv")
    return tuple(piece.clone() for piece in value.chunk(3, dim=0))


def _rename_outer(key: str, table: dict[str, str]) -> str | None:
    """Rename a key outside the blocks: an exact parameter name, or `module.weight|bias`."""
    if key in table:
        return table[key]
    module, _, leaf = key.rpartition(".")
    if module in table and leaf in ("weight", "bias"):
        return f"{table[module]}.{leaf}"
    return None


def _raise_unknown(unknown: list[str], source: str) -> None:
    if unknown:
        shown = ", ".join(unknown[:8]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 8 else "")
        raise ValueError(f"keys not in the {source} layout: {shown}; is this the right kind of state dict?")
