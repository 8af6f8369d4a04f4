"""Named MAE variants: `build_mae(name, **overrides)`.

Names carry their hyper-parameters where the paper's do (`mae_vit_base_patch16`, decoder
512 x 8 by default). The small variants are for 28-32 px images (Fashion-MNIST, CIFAR).
"""

import numbers
from typing import Any

from mae.models.mae import MaskedAutoencoderViT

# name -> constructor arguments. Paper sizes from He et al. (2021) and ViT (Dosovitskiy
# et al., 2021); decoder 512 wide, 8 deep, 16 heads is the paper's default.
_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "mae_vit_base_patch16": dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, **_PAPER_DECODER
    ),
    "mae_vit_large_patch16": dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16, **_PAPER_DECODER
    ),
    "mae_vit_huge_patch14": dict(
        img_size=224, patch_size=14, in_chans=3, embed_dim=1280, depth=32, num_heads=16, **_PAPER_DECODER
    ),
    # Small images (28 px Fashion-MNIST by default; set img_size=32, in_chans=3 for CIFAR).
    "mae_vit_small_patch4": dict(
        img_size=28, patch_size=4, in_chans=1, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
    ),
    "mae_vit_tiny_patch4": dict(
        img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
    ),
    "mae_vit_tiny_patch2": dict(
        img_size=28, patch_size=2, in_chans=1, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4,
    ),
    # A laptop-CPU size: a sweep trial of a few epochs on Fashion-MNIST takes a minute or two.
    "mae_vit_micro_patch4": dict(
        img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2,
    ),
}

OVERRIDABLE = (
    "img_size", "patch_size", "in_chans", "decoder_embed_dim", "decoder_depth",
    "decoder_num_heads", "norm_pix_loss", "mask_strategy",
)


def model_names() -> list[str]:
    return sorted(MODEL_ARGS)


def model_args(name: str, **overrides: Any) -> dict[str, Any]:
    """The resolved constructor arguments of a named variant, after overrides."""
    if name not in MODEL_ARGS:
        raise ValueError(f"unknown model name {name!r}; choose one of {model_names()}")
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"cannot override {sorted(unknown)} of {name}; overridable: {list(OVERRIDABLE)}")
    args = dict(MODEL_ARGS[name])
    args.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("img_size", "patch_size", "in_chans", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        value = args[key]  # an integral float is fine: table columns with gaps read back as floats
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value // 1 or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
        args[key] = int(value)
    if args["in_chans"] not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {args['in_chans']!r}")
    if args["img_size"] % args["patch_size"]:
        raise ValueError(
            f"img_size {args['img_size']} is not divisible by patch_size {args['patch_size']}"
        )
    if args["decoder_embed_dim"] % args["decoder_num_heads"]:
        raise ValueError(
            f"decoder_embed_dim {args['decoder_embed_dim']} is not divisible by "
            f"decoder_num_heads {args['decoder_num_heads']}"
        )
    if args["decoder_embed_dim"] % 4:
        raise ValueError(f"decoder_embed_dim must be divisible by 4, got {args['decoder_embed_dim']}")
    return args


def build_mae(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """Build a named MAE; overrides cover the keys in `OVERRIDABLE`."""
    return MaskedAutoencoderViT(**model_args(name, **overrides))


__all__ = ["MaskedAutoencoderViT", "build_mae", "model_args", "model_names", "MODEL_ARGS"]
