"""Fixed 2-D sine-cosine position embeddings, as used by the MAE encoder and decoder.

Layout follows the reference MAE code (and HuggingFace ViTMAE, which copies it), so
published weights line up: the first half of the channels encodes the patch's column,
the second half its row; each half is [sin(pos * w_k), cos(pos * w_k)] with
w_k = 10000 ** (-k / (D/4)). A row of zeros is prepended for the cls token.
"""

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) embedding; dim must be even."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Return (1 + grid_size**2, dim) if cls_token else (grid_size**2, dim), float32."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size), torch.arange(grid_size), indexing="ij"
    )  # (g, g) each, row-major over patches
    emb = torch.cat(
        [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1
    )  # (g*g, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a (1, 1 + g*g, D) embedding to a new_grid x new_grid patch grid (bicubic)."""
    n_extra = 1
    cls_part, grid_part = pos_embed[:, :n_extra], pos_embed[:, n_extra:]
    old_grid = int(round(grid_part.shape[1] ** 0.5))
    if old_grid == new_grid:
        return pos_embed
    dim = grid_part.shape[-1]
    grid_part = grid_part.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid_part = torch.nn.functional.interpolate(
        grid_part.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False
    )
    grid_part = grid_part.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)
    return torch.cat([cls_part, grid_part.to(pos_embed.dtype)], dim=1)
