import math

import pytest
import torch

from mae.masking import grid_lattice_fits, grid_stride, num_visible, random_masking, sample_noise

STRATEGIES = ["random", "block", "grid"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_exactly_l_keep_visible_and_mask_marks_removed(strategy, ratio):
    N, g, D = 6, 7, 5
    L = g * g
    x = torch.randn(N, L, D)
    noise = sample_noise(strategy, N, g, ratio, generator=torch.Generator().manual_seed(1))
    visible, mask, ids_restore = random_masking(x, ratio, noise)
    keep = num_visible(L, ratio)
    assert visible.shape == (N, keep, D)
    assert torch.all(mask.sum(1) == L - keep)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for n in range(N):
        # the visible tokens are exactly the tokens at unmasked positions, in noise order
        kept_positions = torch.nonzero(mask[n] == 0).flatten()
        assert torch.equal(
            visible[n].sort(dim=0).values, x[n, kept_positions].sort(dim=0).values
        )
        order = torch.argsort(noise[n])[:keep]
        assert torch.equal(visible[n], x[n, order])


def test_ids_restore_inverts_the_shuffle():
    N, L = 4, 16
    noise = torch.rand(N, L)
    ids_shuffle = torch.argsort(noise, dim=1)
    _, _, ids_restore = random_masking(torch.randn(N, L, 3), 0.75, noise)
    arange = torch.arange(L).expand(N, L)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), arange)
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), arange)


def test_same_noise_gives_same_mask_and_different_noise_differs():
    x = torch.randn(3, 49, 8)
    noise = torch.rand(3, 49)
    _, m1, r1 = random_masking(x, 0.75, noise)
    _, m2, r2 = random_masking(x, 0.75, noise.clone())
    assert torch.equal(m1, m2) and torch.equal(r1, r2)
    _, m3, _ = random_masking(x, 0.75, torch.rand(3, 49))
    assert not torch.equal(m1, m3)


def test_grid_keeps_one_in_four_at_075_on_even_grid():
    noise = sample_noise("grid", 5, 8, 0.75, generator=torch.Generator().manual_seed(0))
    _, mask, _ = random_masking(torch.zeros(5, 64, 1), 0.75, noise)
    mask = mask.reshape(5, 8, 8)
    for n in range(5):
        kept = torch.nonzero(mask[n] == 0)
        # one patch per 2x2 cell, all at the same offset inside their cells
        assert len(kept) == 16
        assert len({(int(r) % 2, int(c) % 2) for r, c in kept}) == 1


@pytest.mark.parametrize("grid, ratio, fits", [
    (14, 0.75, True), (8, 0.75, True), (12, 0.8889, True), (16, 0.9375, True),
    (7, 0.75, False),  # 7 is odd: 9 to 16 lattice points for 12 kept patches
    (14, 0.5, False),  # s = 1: plain random masking
    (14, 0.6, False), (14, 0.8, False),  # s = 2, but 78 or 39 kept patches against 49 lattice points
])
def test_grid_masking_is_a_lattice_only_where_it_fits(grid, ratio, fits):
    noise = sample_noise("grid", 50, grid, ratio, generator=torch.Generator().manual_seed(0))
    _, mask, _ = random_masking(torch.zeros(50, grid * grid, 1), ratio, noise)
    s = grid_stride(ratio)
    lattice = math.ceil(grid / s) ** 2  # points of an s x s lattice at offset 0 (the most any offset has)
    kept = [torch.nonzero(m.reshape(grid, grid) == 0) for m in mask]
    offsets = [{(int(r) % s, int(c) % s) for r, c in k} for k in kept]
    # each mask keeps one whole lattice (at most the one point the ratio's rounding drops), nothing else
    whole_lattice = all(len(o) == 1 and len(k) >= lattice - 1 for o, k in zip(offsets, kept))
    assert grid_lattice_fits(grid, ratio) == fits == whole_lattice


def test_block_masks_contiguous_regions():
    # block masking should remove far more 4-neighbour pairs together than random does
    g, ratio = 14, 0.5
    def masked_neighbour_pairs(strategy):
        noise = sample_noise(strategy, 32, g, ratio, generator=torch.Generator().manual_seed(0))
        _, mask, _ = random_masking(torch.zeros(32, g * g, 1), ratio, noise)
        m = mask.reshape(32, g, g)
        return ((m[:, 1:] * m[:, :-1]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()).item()
    assert masked_neighbour_pairs("block") > 1.3 * masked_neighbour_pairs("random")


def test_bad_noise_shape_and_strategy():
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(torch.randn(2, 9, 4), 0.5, torch.rand(2, 8))
    with pytest.raises(ValueError, match="unknown mask strategy"):
        sample_noise("checkerboard", 2, 3, 0.5)
