"""Reconstruction figures as in the paper's Figure 2: one row per image, four columns:
original | masked input | reconstruction | reconstruction with the visible patches pasted in.

With norm_pix_loss the model predicts per-patch normalised pixels; to show them we undo
the normalisation with each target patch's own mean and variance (the same display
convention the MAE authors' demo and HuggingFace's use), so only the masked patches'
*structure* is predicted, not their brightness.
"""

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from mae.models import MaskedAutoencoderViT


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """imgs (N, C, H, W), normalised as in training. Returns the four panels, each (N, C, H, W)."""
    model.eval()
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # (N, L, p*p*C), (N, L)
    if model.norm_pix_loss:
        target = model.patchify(imgs)  # (N, L, p*p*C)
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        pred = pred * std + mean
    p2c = pred.shape[-1]
    mask_img = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p2c))  # (N, C, H, W), 1 = removed
    recon = model.unpatchify(pred)
    return {
        "original": imgs,
        "masked": imgs * (1 - mask_img),
        "reconstruction": recon,
        "reconstruction_plus_visible": imgs * (1 - mask_img) + recon * mask_img,
        "mask": mask_img,
    }


def save_reconstruction_grid(panels: dict[str, torch.Tensor], path: str | Path,
                             mean: tuple[float, ...], std: tuple[float, ...]) -> Path:
    """Write a PNG grid: rows are images, columns the four panels; returns the path."""
    columns = ["original", "masked", "reconstruction", "reconstruction_plus_visible"]
    m = torch.tensor(mean).reshape(1, -1, 1, 1)
    s = torch.tensor(std).reshape(1, -1, 1, 1)
    n = panels["original"].shape[0]
    tiles = []
    for i in range(n):
        for col in columns:
            img = panels[col][i : i + 1].float().cpu() * s + m  # back to [0, 1] pixels
            if col == "masked":
                # removed patches drawn mid-grey so they read as "missing", not black
                img = torch.where(panels["mask"][i : i + 1].cpu().bool(), torch.full_like(img, 0.5), img)
            tiles.append(img.clamp(0, 1))
    grid = make_grid(torch.cat(tiles), nrow=len(columns), padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
