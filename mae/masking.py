"""Which patches the encoder sees.

Every strategy of the paper's Table 1(f) is expressed as *noise* (N, L): the patches with
the smallest noise are kept. `random_masking` turns any noise into exactly
L_keep = int(L * (1 - mask_ratio)) visible patches per sample, so block-wise and grid
sampling inherit its invariants (and its `ids_restore`) for free.

Symbols: N batch, L patches, D width, g patch-grid side (L = g * g).
"""

import math

import torch

MASK_STRATEGIES = ("random", "block", "grid")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """L_keep as in the reference code: int(L * (1 - mask_ratio))."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the L_keep tokens with the lowest noise.

    x: (N, L, D). noise: (N, L) in any range; uniform [0, 1) when None.
    Returns x_visible (N, L_keep, D), mask (N, L) with 1 = removed, ids_restore (N, L).
    """
    N, L, _ = x.shape
    ids_keep, mask, ids_restore = masking_plan(N, L, mask_ratio, noise, x.device, x.dtype)
    return gather_tokens(x, ids_keep), mask, ids_restore  # (N, L_keep, D)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D) at token positions ids (N, K), per sample: (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def masking_plan(
    N: int, L: int, mask_ratio: float, noise: torch.Tensor | None, device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens `random_masking` keeps: ids_keep (N, L_keep), mask (N, L) with 1 =
    removed (in `dtype`) and ids_restore (N, L), without touching the tokens themselves."""
    len_keep = num_visible(L, mask_ratio)
    if noise is None:
        noise = torch.rand(N, L, device=device)
    elif noise.shape != (N, L):
        raise ValueError(f"noise must have shape (N, L) = {(N, L)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # (N, L), ascending: kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L), inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]  # (N, L_keep)
    mask = torch.ones(N, L, device=device, dtype=dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (N, L), back in patch order
    return ids_keep, mask, ids_restore


def block_noise(
    batch: int, grid: int, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Block-wise masking (BEiT-style, the paper's Table 1(f) 'block').

    Random rectangles (area >= L/16 patches, aspect ratio in [0.3, 1/0.3]) are
    painted until at least L - L_keep patches are covered. Painted patches get noise in
    [1, 2), others in [0, 1): argsort then keeps every unpainted patch and, when the
    blocks overshoot, a random few painted ones, so exactly L_keep stay visible.
    Returns (N, L) on the CPU.
    """
    L = grid * grid
    num_masked = L - num_visible(L, mask_ratio)
    painted = torch.zeros(batch, grid, grid)
    min_area = max(1, L // 16)
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for n in range(batch):
        count = 0
        for _ in range(10 * L):  # bounded: always terminates even for odd grids
            if count >= num_masked:
                break
            area = _uniform(min_area, max(min_area, num_masked - count), generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            h = min(grid, max(1, int(round(math.sqrt(area * aspect)))))
            w = min(grid, max(1, int(round(math.sqrt(area / aspect)))))
            top = int(torch.randint(0, grid - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, grid - w + 1, (1,), generator=generator))
            painted[n, top : top + h, left : left + w] = 1
            count = int(painted[n].sum())
    noise = torch.rand(batch, L, generator=generator) + painted.reshape(batch, L)  # (N, L)
    return noise


def grid_stride(mask_ratio: float) -> int:
    """The cell side s of grid masking: round(sqrt(1 / (1 - mask_ratio))), at least 1."""
    return max(1, round(math.sqrt(1.0 / (1.0 - mask_ratio))))


def grid_lattice_fits(grid: int, mask_ratio: float) -> bool:
    """Whether grid masking at this ratio keeps a true lattice: s >= 2 divides the grid side and
    the lattice has L * (1 - mask_ratio) points (to rounding: a ratio written 0.8889 for 8/9 keeps
    one lattice point fewer), so no kept patch is chosen at random (s = 1 is random masking)."""
    stride = grid_stride(mask_ratio)
    lattice = (grid // stride) ** 2
    kept = num_visible(grid * grid, mask_ratio)
    return stride >= 2 and grid % stride == 0 and lattice == round(grid * grid * (1 - mask_ratio)) and kept <= lattice


def grid_noise(
    batch: int, grid: int, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Grid-wise sampling (Table 1(f) 'grid'): keep one patch in every s x s cell.

    s = round(sqrt(1 / (1 - mask_ratio))), so mask_ratio 0.75 keeps one of every four
    patches. The cell offset is random per sample. Kept-grid patches get noise in [0, 1),
    others [1, 2); if the grid has more or fewer points than L_keep, random tie-breaking
    inside each group makes the count exact, and part of the mask is then random (at
    s = 1 all of it). `grid_lattice_fits` says when it is not; config validation refuses
    those settings. Returns (N, L) on the CPU.
    """
    stride = grid_stride(mask_ratio)
    rows = torch.arange(grid).reshape(grid, 1)
    cols = torch.arange(grid).reshape(1, grid)
    offsets = torch.randint(0, stride, (batch, 2), generator=generator)
    on_grid = ((rows.unsqueeze(0) - offsets[:, 0, None, None]) % stride == 0) & (
        (cols.unsqueeze(0) - offsets[:, 1, None, None]) % stride == 0
    )  # (N, g, g)
    off_grid = (~on_grid).float().reshape(batch, grid * grid)
    return torch.rand(batch, grid * grid, generator=generator) + off_grid  # (N, L)


def sample_noise(
    strategy: str,
    batch: int,
    grid: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise (N, L) for the named strategy; feed it to `random_masking`."""
    if strategy == "random":
        return torch.rand(batch, grid * grid, device=device, generator=generator)
    if strategy == "block":
        return block_noise(batch, grid, mask_ratio, generator).to(device)
    if strategy == "grid":
        return grid_noise(batch, grid, mask_ratio, generator).to(device)
    raise ValueError(f"unknown mask strategy {strategy!r}; choose one of {MASK_STRATEGIES}")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))
