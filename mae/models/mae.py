"""The Masked Autoencoder: an asymmetric ViT encoder-decoder (He et al., 2021).

forward = forward_encoder -> forward_decoder -> forward_loss, as in the reference code
(facebookresearch/mae, models_mae.py), whose parameter names we keep so that published
checkpoints load with strict=True. Written here, not copied (that code is CC BY-NC).

Symbols: N batch, C channels, H W image size, p patch size, g = H / p patch-grid side,
L = g * g patches, L_keep visible patches, D encoder width, Dd decoder width.
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mae.masking import gather_tokens, masking_plan, sample_noise
from mae.models.pos_embed import sincos_2d


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_strategy: str = "random",
    ):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_strategy = mask_strategy
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        # Encoder: sees visible patches (plus cls) only.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.grid_size = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos: a Parameter (as in the reference) so state_dict names match,
        # but never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)

        # Decoder: all L positions, mask tokens where patches were removed.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.initialize_weights()

    @property
    def num_patches(self) -> int:
        return self.pos_embed.shape[1] - 1

    def initialize_weights(self) -> None:
        """The reference initialisation: sin-cos positions, xavier-uniform linears."""
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size).unsqueeze(0)
        )
        # Patch projection initialised like a linear layer over the flattened patch.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    # -- patches ---------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), channel-last inside each patch (reference order)."""
        p, C = self.patch_size, self.in_chans
        N, _, H, W = imgs.shape
        h, w = H // p, W // p
        x = imgs.reshape(N, C, h, p, w, p)  # (N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
        return x.reshape(N, h * w, p * p * C)  # (N, L, p*p*C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); the exact inverse of `patchify`."""
        p, C = self.patch_size, self.in_chans
        N, L, _ = x.shape
        h = w = int(round(L**0.5))
        if h * w != L:
            raise ValueError(f"unpatchify needs a square patch grid, got L={L}")
        x = x.reshape(N, h, w, p, p, C)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(N, C, h * p, w * p)  # (N, C, H, W)

    # -- encoder / decoder / loss ----------------------------------------------------
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns latent (N, 1 + L_keep, D), mask (N, L), ids_restore (N, L).

        Only the visible patches are embedded. The reference embeds all L patches (a
        convolution with stride = kernel), adds positions and then drops three quarters of
        the tokens. The embedding is one linear map per patch, so picking the patches
        first and embedding those alone gives the same tokens (`tests/test_model.py`) for a
        quarter of the work, and no full-image convolution (on an H200 cuDNN spent 2.6 ms
        of a 55 ms ViT-B step converting the image to NHWC and convolving it, BENCHMARKS.md).
        """
        size = (self.in_chans, *self.patch_embed.img_size)
        if tuple(imgs.shape[1:]) != size:
            raise ValueError(f"the model takes {size} images, got {tuple(imgs.shape[1:])}")
        N = imgs.shape[0]
        L = self.patch_embed.num_patches
        if noise is None and self.mask_strategy != "random":
            noise = sample_noise(self.mask_strategy, N, self.grid_size, mask_ratio, imgs.device)
        ids_keep, mask, ids_restore = masking_plan(N, L, mask_ratio, noise, imgs.device, imgs.dtype)
        pixels = gather_tokens(self.patchify(imgs), ids_keep)  # (N, L_keep, p*p*C)
        proj = self.patch_embed.proj
        weight = proj.weight.permute(0, 2, 3, 1).flatten(1)  # (D, p*p*C): the conv's, in patchify's order
        x = self.patch_embed.norm(F.linear(pixels, weight, proj.bias))  # (N, L_keep, D), as the conv gives
        x = x + gather_tokens(self.pos_embed[:, 1:, :].expand(N, -1, -1), ids_keep)  # the kept patches' positions
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(N, -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L_keep, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + L_keep, D) -> pred (N, L, p*p*C)."""
        x = self._decoder_input(latent, ids_restore)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (N, 1 + L, p*p*C)
        return x[:, 1:, :]  # drop cls

    def _decoder_input(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Embedded visible tokens and mask tokens back in patch order, plus positions: (N, 1 + L, Dd)."""
        x = self.decoder_embed(latent)  # (N, 1 + L_keep, Dd)
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)  # (N, L - L_keep, Dd)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = gather_tokens(x_, ids_restore)  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # (N, 1 + L, Dd)
        return x + self.decoder_pos_embed

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pixel targets (N, L, p*p*C); per-patch normalised when norm_pix_loss."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in the reference
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over removed patches only."""
        loss = (pred - self.target(imgs)) ** 2
        loss = loss.mean(dim=-1)  # (N, L), mean loss per patch
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None,
        loss_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns (loss, pred (N, L, p*p*C), mask (N, L)); `noise` (N, L) fixes the mask.

        loss_only: the training path. Same loss and gradients, but the last decoder block
        and the prediction head run for the removed patches only (see `_loss_on_masked`),
        and pred comes back as None.
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if loss_only:
            return self._loss_on_masked(imgs, latent, ids_restore), None, mask
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # -- the training path: skip work whose result the loss never reads ------------------
    def _loss_on_masked(self, imgs: torch.Tensor, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """`forward_loss(imgs, forward_decoder(latent, ids_restore), mask)`, computed cheaper.

        The loss reads the decoder's output at removed patches only. Every block but the
        last needs all tokens (they are the next block's keys and values), but the last
        one needs queries, MLP and prediction head only for the L - L_keep removed
        patches: 25% fewer rows there at mask ratio 0.75. The reference code (and
        HuggingFace) computes them all and multiplies the visible ones' loss by zero.
        """
        N, L = ids_restore.shape
        num_masked = L + 1 - latent.shape[1]  # latent holds cls + L_keep visible tokens
        x = self._decoder_input(latent, ids_restore)  # (N, 1 + L, Dd)
        for block in self.decoder_blocks[:-1]:
            x = block(x)
        # Removed patches are the last num_masked of the shuffle order; +1 skips cls.
        ids_masked = torch.argsort(ids_restore, dim=1)[:, L - num_masked:]  # (N, L - L_keep)
        x = _block_for_rows(self.decoder_blocks[-1], x, ids_masked + 1)  # (N, L - L_keep, Dd)
        pred = self.decoder_pred(self.decoder_norm(x))  # (N, L - L_keep, p*p*C)
        target = gather_tokens(self.target(imgs), ids_masked)  # (N, L - L_keep, p*p*C)
        return ((pred - target) ** 2).mean()  # mean over removed patches and their pixels

    # -- features for probing ----------------------------------------------------------
    def forward_features(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """Encode every patch (no masking) and pool: 'cls' token or 'avg' of patch tokens.

        Returns (N, D). With 'cls' the final norm is applied, as in the reference linear
        probe; with 'avg' the patch tokens are averaged after it.
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (N, L, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + L, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if pool == "cls":
            return x[:, 0]
        if pool == "avg":
            return x[:, 1:].mean(dim=1)
        raise ValueError(f"unknown pool {pool!r}; use 'cls' or 'avg'")

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights only (what probing and fine-tuning keep)."""
        return {k: v for k, v in self.state_dict().items() if not _is_decoder_key(k)}


def _block_for_rows(block: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """timm `Block(x)` at the token positions `rows` (N, R) only: (N, T, D) -> (N, R, D).

    Keys and values still come from every token; queries, the residual stream and the
    MLP only from the selected ones. Assumes the plain pre-norm block this model builds
    (no layer scale, drop path, q/k norm or attention dropout), which it checks.
    """
    attn = block.attn
    extras = (block.ls1, block.ls2, block.drop_path1, block.drop_path2, attn.q_norm, attn.k_norm, attn.norm)
    if not all(isinstance(m, nn.Identity) for m in extras) or attn.attn_drop.p > 0:
        raise ValueError("_block_for_rows supports plain pre-norm blocks only")
    N, T, D = x.shape
    H = attn.num_heads
    picked = gather_tokens(x, rows)  # (N, R, D)
    h = block.norm1(x)  # (N, T, D)
    w, b = attn.qkv.weight, attn.qkv.bias  # rows ordered q, k, v
    q = F.linear(gather_tokens(h, rows), w[:D], b[:D])  # (N, R, D)
    kv = F.linear(h, w[D:], b[D:]).reshape(N, T, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (2, N, H, T, D/H)
    q = q.reshape(N, -1, H, D // H).transpose(1, 2)  # (N, H, R, D/H)
    out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (N, H, R, D/H)
    picked = picked + attn.proj(out.transpose(1, 2).reshape(N, -1, D))  # (N, R, D)
    return picked + block.mlp(block.norm2(picked))


def _is_decoder_key(name: str) -> bool:
    return name.startswith(("decoder_", "mask_token"))


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
