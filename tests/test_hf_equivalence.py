"""Our MAE against HuggingFace's ViTMAEForPreTraining: same weights, same numbers.

Equality with an independent implementation checks our blocks, masking, patch order,
positions and loss at once; the round-trip and strict-load tests check `mae.interop`.
Weights are randomised (biases, norms, tokens included) so a swapped mapping shows.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoder, ViTMAEEmbeddings  # noqa: E402

from mae.interop import (  # noqa: E402
    from_hf_state_dict,
    hf_config_kwargs,
    hf_layout_of,
    to_hf_state_dict,
)
from mae.models import build_mae, model_args  # noqa: E402
from tests.conftest import load_benchmark  # noqa: E402

MASK_RATIO = 0.75
# (name, overrides): the 1-channel 28 px default and a 3-channel 32 px variant.
CONFIGS = [
    ("mae_vit_micro_patch4", {}),
    ("mae_vit_micro_patch4", {"img_size": 32, "in_chans": 3}),
]
CONFIG_IDS = ["1ch28px", "3ch32px"]
# float32: our encoder embeds the visible patches with a matrix product, HuggingFace's every
# patch with a convolution; the two round differently, by about 1e-6 here (equal to 1e-12 in float64:
# tests/test_model.py)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a shared, busy CPU OpenMP's
    thread hand-offs made these tests 50x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every trainable tensor, so no bias is 0, no norm weight 1, no two alike."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # fixed sin-cos positions stay as they are
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _hf_model(args: dict) -> ViTMAEForPreTraining:
    return ViTMAEForPreTraining(ViTMAEConfig(**hf_config_kwargs(args, mask_ratio=MASK_RATIO))).eval()


def _pair(name: str, overrides: dict, norm_pix_loss: bool, seed: int = 0):
    """Our model with random weights, and HF's with the same weights; both eval, float32."""
    torch.manual_seed(seed)
    args = model_args(name, norm_pix_loss=norm_pix_loss, **overrides)
    ours = build_mae(name, norm_pix_loss=norm_pix_loss, **overrides).eval()
    _perturb_(ours, seed)
    hf = _hf_model(args)
    layout = hf_layout_of(hf.state_dict())
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), layout), strict=True)
    return ours, hf, layout


def _batch(model, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) and masking noise (N, L)."""
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size[0]
    imgs = torch.randn(batch, model.in_chans, size, size, generator=g)
    noise = torch.rand(batch, model.num_patches, generator=g)
    return imgs, noise


def _reference_keys(depth: int, decoder_depth: int) -> set[str]:
    """The parameter names of facebookresearch/mae's MaskedAutoencoderViT, written out."""
    block = [
        f"{m}.{leaf}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for leaf in ("weight", "bias")
    ]
    keys = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    keys |= {
        f"{m}.{leaf}"
        for m in ("patch_embed.proj", "norm", "decoder_embed", "decoder_norm", "decoder_pred")
        for leaf in ("weight", "bias")
    }
    keys |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
    keys |= {f"decoder_blocks.{i}.{b}" for i in range(decoder_depth) for b in block}
    return keys


@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("name,overrides", CONFIGS, ids=CONFIG_IDS)
def test_forward_matches_hf(name, overrides, norm_pix_loss):
    ours, hf, _ = _pair(name, overrides, norm_pix_loss)
    imgs, noise = _batch(ours)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, MASK_RATIO, noise)
        latent, _, ids_restore = ours.forward_encoder(imgs, MASK_RATIO, noise)
        out = hf(pixel_values=imgs, noise=noise)
        hf_latent = hf.vit(pixel_values=imgs, noise=noise).last_hidden_state

    # Same visible set and unshuffle order, hence the same mask.
    torch.testing.assert_close(ids_restore, out.ids_restore, rtol=0, atol=0)
    torch.testing.assert_close(mask, out.mask.to(mask.dtype), rtol=0, atol=0)
    assert int(mask.sum()) == imgs.shape[0] * (ours.num_patches - int(ours.num_patches * (1 - MASK_RATIO)))
    torch.testing.assert_close(latent, hf_latent, **TOL)  # (N, 1 + L_keep, D)
    torch.testing.assert_close(pred, out.logits, **TOL)  # (N, L, p*p*C)
    torch.testing.assert_close(loss, out.loss, **TOL)
    with torch.no_grad():  # the engine's training path: same loss, less work
        torch.testing.assert_close(ours(imgs, MASK_RATIO, noise, loss_only=True)[0], out.loss, **TOL)


def test_comparison_detects_swapped_qkv_and_masking_order():
    """The equality above is not vacuous: a q/k swap or reversed noise order shows up."""
    ours, hf, layout = _pair(*CONFIGS[0], norm_pix_loss=False)
    imgs, noise = _batch(ours)
    with torch.no_grad():
        _, pred, mask = ours(imgs, MASK_RATIO, noise)

        hf_state = to_hf_state_dict(ours.state_dict(), layout)
        q, k = ("q_proj", "k_proj") if layout == "v5" else ("attention.query", "attention.key")
        swapped = {}
        for key, value in hf_state.items():
            if q in key:
                key = key.replace(q, k)
            elif k in key:
                key = key.replace(k, q)
            swapped[key] = value
        hf.load_state_dict(swapped, strict=True)
        assert not torch.allclose(hf(pixel_values=imgs, noise=noise).logits, pred, **TOL)

        hf.load_state_dict(hf_state, strict=True)
        flipped_mask = hf(pixel_values=imgs, noise=1.0 - noise).mask  # keep the highest instead
        assert not torch.equal(flipped_mask.to(mask.dtype), mask)


@pytest.mark.parametrize("name,overrides", CONFIGS, ids=CONFIG_IDS)
def test_hf_sincos_positions_equal_ours(name, overrides):
    """HF's own sin-cos initialisation gives our pos_embed and decoder_pos_embed exactly.

    The modules are initialised directly: in transformers 5.24 a freshly built
    ViTMAEForPreTraining leaves both tables zero (its model-level init skips them).
    """
    ours = build_mae(name, **overrides)
    config = ViTMAEConfig(**hf_config_kwargs(model_args(name, **overrides)))
    embeddings = ViTMAEEmbeddings(config)
    embeddings.initialize_weights()
    decoder = ViTMAEDecoder(config, num_patches=ours.num_patches)  # initialises itself

    torch.testing.assert_close(embeddings.position_embeddings, ours.pos_embed, rtol=0, atol=1e-7)
    torch.testing.assert_close(decoder.decoder_pos_embed, ours.decoder_pos_embed, rtol=0, atol=1e-7)
    # A layout with rows and columns exchanged (halves swapped) would not pass.
    half = ours.pos_embed.shape[-1] // 2
    swapped = torch.cat([ours.pos_embed[..., half:], ours.pos_embed[..., :half]], dim=-1)
    assert not torch.allclose(embeddings.position_embeddings, swapped, atol=1e-3)


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_round_trips_are_exact(layout):
    name, overrides = CONFIGS[1]
    ours = build_mae(name, **overrides)
    _perturb_(ours, seed=2)
    state = ours.state_dict()

    hf_state = to_hf_state_dict(state, layout)
    assert hf_layout_of(hf_state) == layout
    back = from_hf_state_dict(hf_state)
    assert list(back) != [] and set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key

    again = to_hf_state_dict(back, layout)
    assert set(again) == set(hf_state)
    for key in hf_state:
        assert torch.equal(again[key], hf_state[key]), key


def test_hf_weights_load_strictly_into_ours_and_back():
    """HF -> ours gives exactly the reference names (strict load); ours -> HF loads strictly."""
    name, overrides = CONFIGS[1]
    args = model_args(name, **overrides)
    hf = _hf_model(args)
    _perturb_(hf, seed=3)
    hf_state = hf.state_dict()

    state = from_hf_state_dict(hf_state)
    assert set(state) == _reference_keys(args["depth"], args["decoder_depth"])
    ours = build_mae(name, **overrides).eval()
    ours.load_state_dict(state, strict=True)

    hf_again = _hf_model(args)
    hf_again.load_state_dict(to_hf_state_dict(ours.state_dict(), hf_layout_of(hf_state)), strict=True)
    for key, value in hf_state.items():
        assert torch.equal(hf_again.state_dict()[key], value), key

    imgs, noise = _batch(ours)
    with torch.no_grad():
        pred = ours(imgs, MASK_RATIO, noise)[1]
        torch.testing.assert_close(pred, hf(pixel_values=imgs, noise=noise).logits, **TOL)


def test_v4_layout_is_what_hf_reads_from_checkpoint_files(tmp_path):
    """A checkpoint file in the "v4" names loads through HF's from_pretrained, nothing missing."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    name, overrides = CONFIGS[1]
    ours, hf, _ = _pair(name, overrides, norm_pix_loss=True, seed=4)
    hf.config.save_pretrained(tmp_path)
    v4 = {k: v.contiguous() for k, v in to_hf_state_dict(ours.state_dict(), "v4").items()}
    safetensors_torch.save_file(v4, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    loaded, info = ViTMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    imgs, noise = _batch(ours)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(pixel_values=imgs, noise=noise).logits, ours(imgs, MASK_RATIO, noise)[1], **TOL
        )
    assert set(from_hf_state_dict(v4)) == set(ours.state_dict())


def test_encoder_only_states_map_both_ways():
    ours = build_mae(CONFIGS[0][0])
    encoder = ours.encoder_state_dict()
    hf_encoder = to_hf_state_dict(encoder)
    assert all(k.startswith("vit.") for k in hf_encoder)
    # ViTMAEModel (no pretraining head) saves its keys without the `vit.` prefix.
    bare = {k.removeprefix("vit."): v for k, v in hf_encoder.items()}
    assert set(from_hf_state_dict(bare)) == set(encoder)


def test_bad_inputs_raise_with_a_message():
    ours = build_mae(CONFIGS[0][0])
    with pytest.raises(ValueError, match="head.weight"):
        to_hf_state_dict({**ours.state_dict(), "head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="layout"):
        to_hf_state_dict(ours.state_dict(), layout="v3")
    hf_state = to_hf_state_dict(ours.state_dict())
    del hf_state["vit.layers.0.attention.k_proj.weight"]
    with pytest.raises(ValueError, match="key"):
        from_hf_state_dict(hf_state)
    with pytest.raises(ValueError, match="unknown model arguments"):
        hf_config_kwargs({"embed_dims": 8})


def test_hf_config_carries_the_reference_choices():
    kwargs = hf_config_kwargs(model_args("mae_vit_base_patch16", norm_pix_loss=True), mask_ratio=0.6)
    assert kwargs["layer_norm_eps"] == 1e-6  # HF's default 1e-12 is not the reference's
    assert kwargs["intermediate_size"] == 3072 and kwargs["decoder_intermediate_size"] == 2048
    assert kwargs["norm_pix_loss"] is True and kwargs["mask_ratio"] == 0.6
    assert kwargs["hidden_act"] == "gelu" and kwargs["qkv_bias"] is True
    ViTMAEConfig(**kwargs)  # every key is one HF accepts
    narrow = hf_config_kwargs({"embed_dim": 64, "decoder_embed_dim": 32, "mlp_ratio": 2.0})
    assert narrow["intermediate_size"] == 128 and narrow["decoder_intermediate_size"] == 64


def throughput_benchmark():
    return load_benchmark("throughput")


def test_flop_count_includes_attention_on_every_device():
    # torch's counter has no formula for the CPU's fused attention kernel (it counted 0);
    # counted_flops runs attention as its two matrix products: 2 x (2 * B * H * S * S * d)
    q = torch.randn(2, 3, 5, 4)  # (B, H, S, d)
    flops = throughput_benchmark().counted_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 3 * 5 * 5 * 4)


def test_throughput_benchmark_smoke(tmp_path):
    """The benchmark script runs end to end, its variants agree on the loss, JSON is written."""
    bench = throughput_benchmark()
    out = tmp_path / "bench.json"
    bench.main(["--model", "mae_vit_micro_patch4", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                "--variants", "ours-eager,hf-eager", "--device", "cpu", "--threads", "1", "--json", str(out),
                "--check-steps", "20", "--check-batch", "16"])
    result = json.loads(out.read_text())
    (config,) = result["configs"]
    assert set(config["results"]) == {"ours-eager", "hf-eager"} and config["timed_rounds"] == 2
    curve = config["loss_curve"]
    assert curve["lr"] == 1.5e-4  # the paper's base lr unless --check-lr says otherwise
    assert curve["complete"] and {k: len(v) for k, v in curve["losses"].items()} == {
        "fp32-eager": 20, "engine-eager": 20, "engine": 20}
    # on CPU the engine computes in float32 too: its eager twin is float32's curve exactly, and
    # compiled it stays within float32's rounding of it
    assert curve["within_noise"] and curve["eager_mean_rel_diff"] == 0 and curve["mean_rel_diff"] < 1e-5
    assert config["results"]["ours-eager"]["img_per_s"] > 0 and config["speedup"]["ours-eager/hf-eager"] > 0
    assert config["losses_match"] is True
    # forward + backward is about 3x the forward's 2 * multiply-adds; the micro model's
    # forward alone is ~10.7 M multiply-adds per 28 px image, attention's share about 7%
    assert 3 * 2 * 9e6 < config["train_flops_per_image"] < 3 * 2 * 13e6


def test_the_loss_curve_yardstick_passes_rounding_and_fails_a_bias():
    """within_noise: the engine's curve is no further from float32's than ours eager at the
    engine's precision is, with no steady offset beyond that run's plus 3 block standard
    errors of the paired differences, and none beyond bf16's rounding step."""
    bench = throughput_benchmark()
    g = torch.Generator().manual_seed(0)
    fp32 = torch.linspace(2.0, 1.0, 400)

    def noisy(curve: torch.Tensor, spread: float) -> torch.Tensor:
        return curve * (1 + spread * torch.randn(len(curve), generator=g))

    eager = noisy(fp32, 1e-3)  # bf16's own noise, about 0.1% a step
    rounding = bench.compare_curves(noisy(fp32, 1e-3), fp32, eager)
    assert rounding["within_noise"] and rounding["mean_rel_diff"] < rounding["drift_limit"]
    big = bench.compare_curves(fp32 * 1.02, fp32, eager)  # further than bf16's noise takes it
    assert not big["within_noise"] and big["mean_signed_rel_diff"] == pytest.approx(0.02, rel=1e-4)
    # closer to float32 than the eager twin (say, Inductor keeping float32 where eager rounds): fine
    assert bench.compare_curves(noisy(fp32, 1e-5), fp32, noisy(fp32 * 1.002, 1e-3))["within_noise"]
    # a steady 0.5% offset under a noisier precision (1% a step): the drift test alone passes it
    eager = noisy(fp32, 1e-2)
    steady = bench.compare_curves(noisy(fp32 * 1.005, 1e-2), fp32, eager)
    assert steady["mean_rel_diff"] <= steady["drift_limit"]
    assert not steady["within_noise"] and steady["bias_limit"] < 0.004
    # an offset the eager twin shares (a loss computed in bf16, say) is held to bf16's rounding step
    shared = bench.compare_curves(noisy(fp32 * 1.005, 1e-4), fp32, noisy(fp32 * 1.005, 1e-4))
    assert shared["mean_rel_diff"] <= shared["drift_limit"] and not shared["within_noise"]
    assert shared["bias_limit"] == 2.0**-8
    assert bench.compare_curves(noisy(fp32 * 1.003, 1e-4), fp32, noisy(fp32 * 1.003, 1e-4))["within_noise"]


def test_the_loss_curve_check_passes_bf16_and_catches_a_wrong_learning_rate():
    """The whole check, run as the benchmark runs it, in bf16 autocast (on this CPU too): the
    engine passes against its eager bf16 twin, and fails when its learning rate is 20% off."""
    bench = throughput_benchmark()
    args = bench.parse_args(["--device", "cpu", "--precision", "bf16", "--check-steps", "60", "--check-batch", "16"])
    right = bench.loss_curve_check("mae_vit_micro_patch4", 28, 1, args, torch.device("cpu"))
    assert right["complete"] and right["engine_precision"] == "bfloat16" and right["eager_mean_rel_diff"] > 0
    assert right["within_noise"], {k: v for k, v in right.items() if "diff" in k or "limit" in k}
    wrong = bench.loss_curve_check("mae_vit_micro_patch4", 28, 1, args, torch.device("cpu"), engine_lr_scale=1.2)
    assert not wrong["within_noise"] and wrong["mean_rel_diff"] > 3 * wrong["drift_limit"]


def test_throughput_sdpa_choice_leaves_one_attention_kernel_family():
    bench = throughput_benchmark()
    flags = ("cudnn", "flash", "mem_efficient", "math")

    def enabled() -> dict[str, bool]:
        return {f: getattr(torch.backends.cuda, f"{f}_sdp_enabled")() for f in flags}

    saved = enabled()
    try:
        bench.use_sdpa_backend("flash")
        assert enabled() == {"cudnn": False, "flash": True, "mem_efficient": False, "math": False}
        bench.use_sdpa_backend("efficient")
        assert [f for f, on in enabled().items() if on] == ["mem_efficient"]
    finally:
        for f, on in saved.items():
            getattr(torch.backends.cuda, f"enable_{f}_sdp")(on)
    args = bench.parse_args(["--variants", "ours-graphs,ours-autotune,hf-eager", "--sdpa", "cudnn"])
    assert args.sdpa == "cudnn"
    with pytest.raises(SystemExit):
        bench.parse_args(["--sdpa", "fast"])


def test_timing_results_give_mfu_against_the_ceiling_and_the_rated_peak():
    bench = throughput_benchmark()
    times = {"ours": [0.5, 0.25, 1.0]}  # median 0.5 s for 100 images: 200 img/s
    r = bench.timing_results(times, {"ours": 1.0}, {"ours": None}, batch=100, flops_per_image=1e9,
                             ceiling=4e11, rated=1e12)["ours"]
    assert r["img_per_s"] == 200 and r["mfu"] == pytest.approx(0.5) and r["mfu_rated"] == pytest.approx(0.2)
    assert bench.timing_results(times, {"ours": 1.0}, {"ours": None}, 100, 1e9, 4e11)["ours"]["mfu_rated"] is None
    assert bench.rated_bf16_flops("NVIDIA H200 NVL") == 835e12 and bench.rated_bf16_flops("NVIDIA H200") == 989e12
    assert bench.rated_bf16_flops("NVIDIA A10") is None


def test_check_images_are_dead_leaves():
    """Opaque discs over a background: each image is made of at most discs + 1 colours, in [-1, 1]."""
    bench = throughput_benchmark()
    imgs = bench.check_images(torch.Generator().manual_seed(0), 2, 3, 3, 32, 4, torch.device("cpu"), discs=5)
    assert imgs.shape == (2, 3, 3, 32, 32) and -1 <= imgs.min() and imgs.max() <= 1
    for img in imgs.flatten(0, 1):  # (C, H, W)
        colours = img.flatten(1).T.unique(dim=0)
        assert 2 <= len(colours) <= 6  # the last disc drawn shows: nothing covers it
    assert not torch.equal(imgs[0], imgs[1])
