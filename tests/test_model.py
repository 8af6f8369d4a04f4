import math

import pytest
import torch

from mae.checkpoint import load_checkpoint, model_state
from mae.masking import random_masking
from mae.models import MODEL_ARGS, build_mae, model_names
from mae.models.pos_embed import sincos_2d


@pytest.mark.parametrize("in_chans,p", [(1, 4), (3, 2), (3, 16)])
def test_unpatchify_inverts_patchify(in_chans, p):
    size = 4 * p
    m = build_mae("mae_vit_micro_patch4", img_size=size, patch_size=p, in_chans=in_chans)
    x = torch.randn(3, in_chans, size, size)
    patches = m.patchify(x)
    assert patches.shape == (3, 16, p * p * in_chans)
    assert torch.equal(m.unpatchify(patches), x)
    # patch 0 is the top-left p x p window, channel-last inside the patch
    assert torch.equal(patches[0, 0], x[0, :, :p, :p].permute(1, 2, 0).reshape(-1))


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    m = build_mae("mae_vit_micro_patch4")
    imgs = torch.randn(2, 1, 28, 28)
    loss, pred, mask = m(imgs, mask_ratio=0.75)
    visible = (mask == 0).unsqueeze(-1)
    # changing predictions on visible patches leaves the loss unchanged...
    pred_vis = pred + 10.0 * visible
    assert torch.allclose(m.forward_loss(imgs, pred_vis, mask), loss)
    # ...changing them on removed patches does not
    pred_rem = pred + 10.0 * (~visible)
    assert not torch.allclose(m.forward_loss(imgs, pred_rem, mask), loss)
    # and the loss is the mean per-patch MSE over removed patches
    per_patch = ((pred - m.target(imgs)) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean())


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.9])
def test_loss_only_path_has_the_same_loss_and_gradients(norm_pix_loss, mask_ratio):
    """The engine trains through loss_only=True; in float64 it must equal the reference path."""
    torch.manual_seed(0)
    m = build_mae("mae_vit_micro_patch4", norm_pix_loss=norm_pix_loss).double()
    imgs = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    noise = torch.rand(3, m.num_patches)
    params = [p for p in m.parameters() if p.requires_grad]
    full = m(imgs, mask_ratio, noise)[0]
    fast, pred, _ = m(imgs, mask_ratio, noise, loss_only=True)
    assert pred is None
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=0)
    for g_full, g_fast in zip(torch.autograd.grad(full, params), torch.autograd.grad(fast, params)):
        torch.testing.assert_close(g_fast, g_full, rtol=1e-10, atol=1e-14)


def test_block_for_rows_is_the_block_at_those_rows():
    from mae.models.mae import _block_for_rows

    torch.manual_seed(0)
    block = build_mae("mae_vit_micro_patch4").decoder_blocks[-1].double()
    x = torch.randn(2, 9, block.norm1.normalized_shape[0], dtype=torch.float64)
    rows = torch.tensor([[0, 3, 8], [7, 1, 2]])
    expected = torch.gather(block(x), 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    torch.testing.assert_close(_block_for_rows(block, x, rows), expected)
    other = torch.tensor([[1, 3, 8], [7, 1, 2]])  # one row different: a different answer
    assert not torch.allclose(_block_for_rows(block, x, other), expected)


def test_norm_pix_targets_are_per_patch_standardised():
    m = build_mae("mae_vit_micro_patch4", norm_pix_loss=True)
    imgs = torch.rand(2, 1, 28, 28) * 5 + 3
    t = m.target(imgs)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 49), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 49), atol=1e-3)
    raw = build_mae("mae_vit_micro_patch4", norm_pix_loss=False).target(imgs)
    assert torch.equal(raw, m.patchify(imgs))


def test_noise_fixes_the_mask_and_output():
    torch.manual_seed(0)
    m = build_mae("mae_vit_micro_patch4").eval()
    imgs = torch.randn(2, 1, 28, 28)
    noise = torch.rand(2, 49)
    l1, p1, m1 = m(imgs, 0.75, noise)
    l2, p2, m2 = m(imgs, 0.75, noise)
    assert torch.equal(m1, m2) and torch.equal(p1, p2) and l1 == l2


# Small inputs keep every variant cheap on a CPU; the architecture is unchanged.
SMALL_IMG = {"mae_vit_base_patch16": 32, "mae_vit_large_patch16": 32, "mae_vit_huge_patch14": 28}


@pytest.mark.parametrize("name", model_names())
def test_every_variant_forward_backward(name):
    torch.manual_seed(0)
    img = SMALL_IMG.get(name, MODEL_ARGS[name]["img_size"])
    m = build_mae(name, img_size=img)
    chans = MODEL_ARGS[name]["in_chans"]
    loss, pred, mask = m(torch.randn(2, chans, img, img), mask_ratio=0.75)
    L = (img // MODEL_ARGS[name]["patch_size"]) ** 2
    assert pred.shape == (2, L, MODEL_ARGS[name]["patch_size"] ** 2 * chans)
    assert mask.shape == (2, L)
    assert math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.pos_embed.grad is None  # fixed sin-cos positions are not trained


def test_paper_variants_have_paper_sizes():
    # He et al. 2021, Table 1 / Appendix: decoder 512 wide, 8 blocks by default
    for name, width, depth in [("mae_vit_base_patch16", 768, 12), ("mae_vit_large_patch16", 1024, 24),
                               ("mae_vit_huge_patch14", 1280, 32)]:
        a = MODEL_ARGS[name]
        assert (a["embed_dim"], a["depth"], a["decoder_embed_dim"], a["decoder_depth"]) == (width, depth, 512, 8)


def test_sincos_matches_closed_form():
    D, g = 8, 3
    emb = sincos_2d(D, g)  # (1 + 9, 8)
    assert torch.equal(emb[0], torch.zeros(D))
    row, col = 1, 2
    e = emb[1 + row * g + col]
    # first half: column; second half: row; [sin(pos * w_k), cos(pos * w_k)], w_k = 1/10000^(k/2)
    w = torch.tensor([1.0, 1.0 / 100.0])
    expected = torch.cat([torch.sin(col * w), torch.cos(col * w), torch.sin(row * w), torch.cos(row * w)])
    assert torch.allclose(e, expected, atol=1e-6)


def reference_state_shapes(D, depth, Dd, dec_depth, p, C, L, mlp=4):
    """The parameter names and shapes of facebookresearch/mae's MaskedAutoencoderViT,
    written out from its model definition (not from our code)."""
    shapes = {
        "cls_token": (1, 1, D), "pos_embed": (1, L + 1, D), "mask_token": (1, 1, Dd),
        "decoder_pos_embed": (1, L + 1, Dd),
        "patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,),
        "norm.weight": (D,), "norm.bias": (D,),
        "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
        "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
        "decoder_pred.weight": (p * p * C, Dd), "decoder_pred.bias": (p * p * C,),
    }
    for prefix, n, w in [("blocks", depth, D), ("decoder_blocks", dec_depth, Dd)]:
        for i in range(n):
            b = f"{prefix}.{i}."
            shapes.update({
                b + "norm1.weight": (w,), b + "norm1.bias": (w,),
                b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,),
                b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                b + "mlp.fc1.weight": (mlp * w, w), b + "mlp.fc1.bias": (mlp * w,),
                b + "mlp.fc2.weight": (w, mlp * w), b + "mlp.fc2.bias": (w,),
            })
    return shapes


def test_reference_named_checkpoint_loads_strictly(tmp_path):
    # a file laid out as the reference's released checkpoints: {"model": state_dict}
    shapes = reference_state_shapes(D=768, depth=12, Dd=512, dec_depth=8, p=16, C=3, L=196)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_base_full.pth")
    m = build_mae("mae_vit_base_patch16")
    m.load_state_dict(model_state(load_checkpoint(tmp_path / "mae_pretrain_vit_base_full.pth")), strict=True)
    assert torch.equal(m.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    # and ours is exactly the reference's set of names and shapes
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes


def test_forward_features_pools():
    m = build_mae("mae_vit_micro_patch4").eval()
    x = torch.randn(3, 1, 28, 28)
    assert m.forward_features(x, "cls").shape == (3, 96)
    assert m.forward_features(x, "avg").shape == (3, 96)
    assert not torch.allclose(m.forward_features(x, "cls"), m.forward_features(x, "avg"))


def test_encoder_embeds_only_the_visible_patches_as_the_reference_does():
    """forward_encoder picks patches of pixels first and embeds those alone; the reference
    embeds every patch with the convolution, adds positions, then drops three quarters.
    Same tokens into the first block, same mask and ids_restore (float64: to 1e-12)."""
    torch.manual_seed(0)
    m = build_mae("mae_vit_micro_patch4", norm_pix_loss=True).double()
    imgs = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    noise = torch.rand(3, m.patch_embed.num_patches, dtype=torch.float64)
    everything = m.patch_embed(imgs) + m.pos_embed[:, 1:, :]  # (N, L, D): the convolution over the image
    expected, expected_mask, expected_restore = random_masking(everything, 0.75, noise)
    seen = {}
    hook = m.blocks[0].register_forward_pre_hook(lambda _, args: seen.update(x=args[0]))
    _, mask, ids_restore = m.forward_encoder(imgs, 0.75, noise)
    hook.remove()
    torch.testing.assert_close(seen["x"][:, 1:], expected, rtol=0, atol=1e-12)
    assert torch.equal(mask, expected_mask) and torch.equal(ids_restore, expected_restore)
    with pytest.raises(ValueError, match=r"takes \(1, 28, 28\) images, got \(1, 32, 32\)"):
        m.forward_encoder(torch.zeros(1, 1, 32, 32, dtype=torch.float64), 0.75)
