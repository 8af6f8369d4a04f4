"""Fine-tuning (mae.finetune) and encoder weights from other tools (mae.pretrained).

Synthetic state dicts stand in for published checkpoints: the reference's encoder-only
and full releases are our state dicts under {"model": ...}; HF's are ours through
mae.interop.to_hf_state_dict, in both HF layouts.
"""

import math
import shutil

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from PIL import Image
from timm.data.random_erasing import RandomErasing

import mae.finetune

from mae.checkpoint import CheckpointError, checkpoint_folders, load_checkpoint, save_checkpoint
from mae.config import ConfigError, load_config
from mae.data import rand_augment
from mae.device_input import build_train_input
from mae.engine import build_model, seed_everything
from mae.finetune import build_classifier, eval_shard, finetune, load_pretrained, optimizer_for, peak_lr
from mae.interop import to_hf_state_dict
from mae.models import build_mae
from mae.models.pos_embed import interpolate_pos_embed
from mae.optim import set_lr
from mae.pretrained import encoder_state, load_encoder

from conftest import REPO

SMOKE = str(REPO / "experiments" / "smoke.yaml")
TINY_FINETUNE = [
    "finetune.epochs=1", "finetune.batch_size=32", "finetune.train_subset=128", "finetune.test_subset=100",
    "finetune.warmup_epochs=0.25",
]


def _cfg(*overrides: str):
    return load_config(SMOKE, [*TINY_FINETUNE, *overrides])


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    model = build_mae("mae_vit_micro_patch4")
    with torch.no_grad():  # make the weights distinctive: a loader that drops one shows up
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _same_encoder(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# -- loading weights from other tools --------------------------------------------------


def test_reference_checkpoints_encoder_only_and_full_load(pretrained, tmp_path):
    ours = pretrained.encoder_state_dict()
    assert not any(k.startswith(("decoder", "mask_token")) for k in ours)
    encoder_only, full = tmp_path / "mae_pretrain_vit_micro.pth", tmp_path / "mae_visualize_vit_micro.pth"
    torch.save({"model": ours}, encoder_only)  # the reference's encoder-only release layout
    torch.save({"model": pretrained.state_dict(), "epoch": 799}, full)
    for path in (encoder_only, full):
        _same_encoder(encoder_state(path), ours)
        fresh = load_encoder(build_mae("mae_vit_micro_patch4"), path)
        _same_encoder(fresh.encoder_state_dict(), ours)


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_hf_state_dicts_load_full_and_encoder_only(pretrained, layout):
    hf = to_hf_state_dict(pretrained.state_dict(), layout=layout)
    _same_encoder(encoder_state(hf), pretrained.encoder_state_dict())
    encoder_only = {k.removeprefix("vit."): v for k, v in hf.items() if k.startswith("vit.")}  # ViTMAEModel
    _same_encoder(encoder_state(encoder_only), pretrained.encoder_state_dict())


def test_hf_safetensors_folder_loads(pretrained, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    hf = {k: v.contiguous() for k, v in to_hf_state_dict(pretrained.state_dict(), layout="v4").items()}
    safetensors.save_file(hf, str(tmp_path / "model.safetensors"))
    _same_encoder(encoder_state(tmp_path), pretrained.encoder_state_dict())
    data = (tmp_path / "model.safetensors").read_bytes()
    for cut in (data[: len(data) // 2], b""):  # an interrupted copy, a failed download
        (tmp_path / "model.safetensors").write_bytes(cut)
        with pytest.raises(CheckpointError, match="truncated.*re-download"):
            encoder_state(tmp_path)


def test_reference_finetuned_checkpoint_fc_norm_stands_in_for_norm(pretrained):
    state = {k: v for k, v in pretrained.encoder_state_dict().items() if not k.startswith("norm.")}
    state["fc_norm.weight"] = torch.full((96,), 2.0)
    state["fc_norm.bias"] = torch.full((96,), 0.5)
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 96), torch.zeros(1000)
    enc = encoder_state({"model": state})
    assert "head.weight" not in enc and "fc_norm.weight" not in enc
    assert torch.equal(enc["norm.weight"], state["fc_norm.weight"])


def test_position_embeddings_are_interpolated_to_another_image_size(pretrained):
    model = build_mae("mae_vit_micro_patch4", img_size=32, in_chans=1)  # 8x8 grid, the checkpoint 7x7
    load_encoder(model, pretrained.encoder_state_dict())
    assert model.pos_embed.shape == (1, 1 + 64, 96)
    torch.testing.assert_close(model.pos_embed.data, interpolate_pos_embed(pretrained.pos_embed.data, 8))
    torch.testing.assert_close(model.blocks[2].attn.qkv.weight, pretrained.blocks[2].attn.qkv.weight)
    cfg = _cfg("model.img_size=32")
    clf = load_pretrained(build_classifier(cfg, 10), pretrained)
    torch.testing.assert_close(clf.pos_embed.data, model.pos_embed.data)


def test_an_encoder_of_another_shape_is_refused_with_the_reason(pretrained):
    with pytest.raises(CheckpointError, match="embed_dim 96 .model: 192"):
        load_encoder(build_mae("mae_vit_tiny_patch4"), pretrained.encoder_state_dict())
    with pytest.raises(CheckpointError, match="no MAE encoder weights"):
        encoder_state({"model": {"foo.weight": torch.zeros(2)}})


# -- the classifier ---------------------------------------------------------------------


def test_classifier_with_token_pool_computes_our_encoder_features(pretrained):
    """Same names, same blocks: timm's ViT (cls pooling) gives our encoder's cls feature."""
    clf = load_pretrained(build_classifier(_cfg("finetune.global_pool=token"), 10), pretrained).eval()
    imgs = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ours = pretrained.forward_features(imgs, pool="cls")  # (N, D)
        theirs = clf.forward_head(clf.forward_features(imgs), pre_logits=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_average_pooled_features_are_the_mean_of_timms_normed_patch_tokens(pretrained):
    """probe.pool=avg (the probe's default): the final norm, then the mean over patch tokens, cls left out."""
    clf = load_pretrained(build_classifier(_cfg("finetune.global_pool=token"), 10), pretrained).eval()
    imgs = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ours = pretrained.forward_features(imgs, pool="avg")
        tokens = clf.forward_features(imgs)  # (N, 1 + L, D), after the final norm
    torch.testing.assert_close(ours, tokens[:, 1:].mean(dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, tokens.mean(dim=1), atol=1e-3)  # the cls token is not in the average


def test_classifier_with_avg_pool_starts_fc_norm_and_head_fresh(pretrained):
    clf = load_pretrained(build_classifier(_cfg(), 10), pretrained)
    assert isinstance(clf.norm, torch.nn.Identity)
    assert torch.equal(clf.fc_norm.weight, torch.ones(96)) and torch.equal(clf.fc_norm.bias, torch.zeros(96))
    assert clf.head.weight.abs().max() < 1e-3  # trunc-normal std 2e-5, as the reference
    torch.testing.assert_close(clf.blocks[3].mlp.fc2.weight, pretrained.blocks[3].mlp.fc2.weight)


def test_layer_wise_lr_decay_scales_each_block(pretrained):
    cfg = _cfg("finetune.layer_decay=0.5")
    clf = build_classifier(cfg, 10)
    optimizer = optimizer_for(clf, cfg, lr=1.0)
    set_lr(optimizer, 1.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    depth = len(clf.blocks)  # 4
    assert lr_of[id(clf.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    for i, block in enumerate(clf.blocks):
        assert lr_of[id(block.attn.qkv.weight)] == 0.5 ** (depth - i)
    assert lr_of[id(clf.head.weight)] == 1.0
    assert decay_of[id(clf.head.weight)] == cfg.finetune.weight_decay
    assert decay_of[id(clf.pos_embed)] == 0.0 and decay_of[id(clf.blocks[0].norm1.weight)] == 0.0
    assert peak_lr(cfg, world_size=2) == cfg.finetune.base_lr * 32 * 2 / 256


def test_layer_decay_follows_the_reference_with_the_cls_token_and_none_from_scratch():
    from timm.optim import param_groups_layer_decay

    cfg = _cfg("finetune.layer_decay=0.5", "finetune.global_pool=token")
    clf = build_classifier(cfg, 10)
    depth = len(clf.blocks)

    def scales(groups):
        return {id(p): g["lr_scale"] for g in groups for p in g["params"]}

    ours = scales(optimizer_for(clf, cfg, lr=1.0).param_groups)
    assert ours[id(clf.norm.weight)] == ours[id(clf.head.weight)] == 1.0  # after the blocks: the head's scale
    timms = scales(param_groups_layer_decay(clf, 0.05, clf.no_weight_decay(), layer_decay=0.5))
    assert timms[id(clf.norm.weight)] == 0.5  # timm groups it with the last block
    others = [p for n, p in clf.named_parameters() if not n.startswith("norm.")]
    assert all(ours[id(p)] == timms[id(p)] for p in others)  # the same elsewhere
    assert ours[id(clf.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    scratch = scales(optimizer_for(clf, cfg, lr=1.0, from_scratch=True).param_groups)
    assert set(scratch.values()) == {1.0}  # random weights: nothing to shield from large updates


def test_finetune_config_is_checked():
    with pytest.raises(ConfigError, match="finetune.batch_size"):
        load_config(SMOKE, ["finetune.batch_size=33"])
    with pytest.raises(ConfigError, match="finetune.global_pool"):
        load_config(SMOKE, ["finetune.global_pool=max"])
    with pytest.raises(ConfigError, match="finetune.layer_decay"):
        load_config(SMOKE, ["finetune.layer_decay=0"])


# -- fine-tuning on real data ------------------------------------------------------------


@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_encoder_and_reports_each_epoch(fashion_mnist_dir, pretrained):
    cfg = _cfg("finetune.base_lr=1.0e-9", "finetune.drop_path=0.0")  # weights barely move
    seen = []
    result = finetune(cfg, pretrained.state_dict(), progress=False, on_epoch_end=lambda m, c: seen.append((m, c)))
    assert result.init == "pretrained" and len(result.epochs) == 1 and seen == [(result.epochs[0], None)]
    assert 0.0 <= result.top1 <= 1.0 and result.best_top1 == result.top1
    assert math.isfinite(result.epochs[0]["train_loss"]) and result.images_per_sec > 0
    torch.testing.assert_close(result.model.blocks[1].attn.qkv.weight, pretrained.blocks[1].attn.qkv.weight,
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_finetune_from_scratch_and_argument_errors(fashion_mnist_dir, pretrained):
    cfg = _cfg("finetune.mixup=0", "finetune.cutmix=0")  # label smoothing alone
    result = finetune(cfg, from_scratch=True, progress=False)
    assert result.init == "scratch" and 0.0 <= result.top1 <= 1.0
    with pytest.raises(ValueError, match="from_scratch"):
        finetune(cfg, progress=False)
    with pytest.raises(ValueError, match="from_scratch"):
        finetune(cfg, pretrained, from_scratch=True, progress=False)
    model = build_model(cfg)
    with pytest.raises(ValueError, match="finetune.batch_size"):
        finetune(load_config(SMOKE, [*TINY_FINETUNE, "finetune.train_subset=16"]), model, progress=False)


def _training_images(cfg, seed: int = 0) -> torch.Tensor:
    dataset, _, _ = build_train_input(cfg, "cpu", subset=16, scale_min=cfg.finetune.crop_scale_min,
                                      randaug=cfg.finetune.randaug)
    seed_everything(seed)  # torch for the crops, Python's random for timm's RandAugment
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def test_randaugment_is_in_the_finetuning_crops_only_when_configured(fashion_mnist_dir):
    off = _cfg("finetune.randaug=null")
    torch.testing.assert_close(_training_images(off), _training_images(off), rtol=0, atol=0)  # draws are seeded
    on = _cfg("data.pipeline=device")  # the default spec; PIL ops, so CPU workers whatever the pipeline
    dataset, _, to_batch = build_train_input(on, "cpu", subset=16, scale_min=0.08, randaug=on.finetune.randaug)
    assert [type(t).__name__ for t in dataset.transform.transforms].count("RandAugment") == 1
    assert type(to_batch).__name__ == "ToDevice"
    with_ra, without = _training_images(on), _training_images(_cfg("data.pipeline=device", "finetune.randaug=null"))
    assert with_ra.shape == without.shape == (16, 1, 28, 28)
    changed = (with_ra - _training_images(off)).flatten(1).abs().amax(1) > 1e-6
    assert changed.sum() >= 8  # timm applies each of the 2 ops with probability 0.5: about 3 crops in 4 change


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_randaugments_strongest_posterize_blackens_the_image_instead_of_raising(mode):
    transform = rand_augment("rand-m9-mstd0.5-inc1", 28, (0.5,) * len(mode))
    (op,) = [op for op in transform.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # magnitude 10: keep 0 bits (Pillow 13 raises)
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (28, 28, len(mode)), np.uint8).squeeze(-1)
                          if mode == "L" else np.random.default_rng(0).integers(1, 256, (28, 28, 3), np.uint8))
    out = op(img)
    assert out.mode == mode and out.size == img.size and np.asarray(out).max() == 0
    op.magnitude = 5  # keeps 2 bits: Pillow's own posterize
    assert np.array_equal(np.asarray(op(img)), np.asarray(img) & 0b11000000)


class _RecordingErasing(RandomErasing):
    calls: list = []

    def __call__(self, imgs):
        before = imgs.clone()
        after = super().__call__(imgs)
        self.calls.append((self.probability, before, after.clone()))
        return after


@pytest.mark.parametrize("reprob", [0.0, 1.0])
def test_random_erasing_erases_one_box_per_image_of_every_batch_before_the_model(reprob, monkeypatch):
    monkeypatch.setattr(mae.finetune, "RandomErasing", _RecordingErasing)
    _RecordingErasing.calls = []
    seen = []
    cfg = load_config(SMOKE, ["data.dataset=synthetic", "data.synthetic_size=64", *TINY_FINETUNE,
                              "finetune.train_subset=64", "finetune.batch_size=16", "finetune.test_subset=16",
                              "finetune.mixup=0", "finetune.cutmix=0", f"finetune.reprob={reprob}"])
    model = build_classifier(cfg, 10)
    monkeypatch.setattr(mae.finetune, "build_classifier", lambda c, k: model)
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    finetune(cfg, from_scratch=True, device="cpu", progress=False)
    if reprob == 0:
        assert _RecordingErasing.calls == []  # off: not even constructed
        return
    assert len(_RecordingErasing.calls) == len(seen) == 4  # every training batch, then the model sees it
    for (probability, before, after), given in zip(_RecordingErasing.calls, seen):
        assert probability == 1.0
        torch.testing.assert_close(given, after, rtol=0, atol=0)
        changed = (before != after).any(1)  # (N, H, W): the erased pixels of each image
        for box in changed:
            rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
            assert len(rows) and len(cols)  # every image got its box (probability 1)
            r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            assert box[r0:r1, c0:c1].float().mean() > 0.9  # one rectangle of noise, nothing outside it
            assert (r1 - r0) * (c1 - c0) <= box.numel() / 3 + 1  # timm's area range: up to a third


def test_compiled_finetuning_follows_the_eager_run():
    """train.compile compiles fine-tuning's forward and loss too; same run, same numbers.

    drop_path 0: the compiled graph draws its own random numbers. Mixup (numpy, outside
    the graph) stays on, so the soft-target loss is compiled too.
    """
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        cfg = load_config(SMOKE, ["data.dataset=synthetic", "data.synthetic_size=64", *TINY_FINETUNE,
                                  "finetune.train_subset=64", "finetune.batch_size=16", "finetune.test_subset=16",
                                  "finetune.epochs=2", "finetune.drop_path=0", "finetune.reprob=0",
                                  "finetune.base_lr=0.05", "finetune.warmup_epochs=0", f"train.compile={compiled}"])
        counters.clear()
        torch.manual_seed(0)
        weights = build_mae("mae_vit_micro_patch4").state_dict()
        runs[compiled] = finetune(cfg, weights, device="cpu", progress=False)
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # the flag reaches torch.compile
    start = load_pretrained(build_classifier(cfg, 10), weights)
    eager, compiled = runs[False], runs[True]
    for a, b in zip(eager.epochs, compiled.epochs):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    moved = 0.0
    for (name, a), b, p0 in zip(eager.model.named_parameters(), compiled.model.parameters(), start.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)
        moved = max(moved, (a - p0).abs().max().item())
    assert moved > 1e-3  # it trained: the comparison is not of two untouched copies


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_finetuning_run_resumes_to_the_uninterrupted_result(fashion_mnist_dir, pretrained, tmp_path):
    """Every random draw is restored: crops and RandAugment in a DataLoader worker, random
    erasing, mixup/cutmix (numpy), drop path; so is the cosine schedule's step. Two epochs
    follow the resume: an evaluation's draw from the global RNG would show in the second."""
    cfg = load_config(SMOKE, [*TINY_FINETUNE, "finetune.train_subset=64", "finetune.test_subset=32",
                              "finetune.epochs=4", "finetune.reprob=0.5", "finetune.base_lr=0.05",
                              "data.num_workers=1"])
    weights = pretrained.state_dict()
    whole = finetune(cfg, weights, device="cpu", progress=False, run_dir=tmp_path / "whole")

    def stop_after_epoch_2(metrics, checkpoint_dir):
        if metrics["epoch"] == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        finetune(cfg, weights, device="cpu", progress=False, run_dir=tmp_path / "cut", on_epoch_end=stop_after_epoch_2)
    assert [p.name for p in checkpoint_folders(tmp_path / "cut")] == ["checkpoint-0001", "checkpoint-0002"]
    seen = []
    resumed = finetune(cfg, weights, device="cpu", progress=False, run_dir=tmp_path / "cut",
                       on_epoch_end=lambda m, c: seen.append((m["epoch"], c.name)))
    assert seen == [(3, "checkpoint-0003"), (4, "checkpoint-0004")]  # only the epochs that were left
    assert [e["epoch"] for e in resumed.epochs] == [1, 2, 3, 4]  # the history comes back with the checkpoint
    keys = ("step", "train_loss", "test_top1", "lr")
    for a, b in zip(whole.epochs, resumed.epochs):
        assert [b[k] for k in keys] == [a[k] for k in keys]
    start = load_pretrained(build_classifier(cfg, 10), weights).state_dict()
    final = whole.model.state_dict()
    assert max((final[k] - start[k]).abs().max().item() for k in final) > 1e-3  # it trained
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6, msg=k)
    assert [p.name for p in checkpoint_folders(tmp_path / "cut")] == ["checkpoint-0003", "checkpoint-0004"]


@pytest.mark.parametrize("workers,expected", [(0, 0), (1, 2)])
def test_images_augmented_in_this_process_are_not_prefetched_on_a_thread(pretrained, monkeypatch, fashion_mnist_dir,
                                                                        workers, expected):
    """With no DataLoader workers the crops and RandAugment would draw from the global RNGs on
    the prefetch thread while the step draws random erasing and mixup on this one."""
    depths = []
    real = mae.finetune.Prefetcher
    monkeypatch.setattr(mae.finetune, "Prefetcher", lambda loader, to_batch, device, depth:
                        depths.append(depth) or real(loader, to_batch, device, depth))
    cfg = load_config(SMOKE, [f"data.data_dir={fashion_mnist_dir}", *TINY_FINETUNE, "finetune.train_subset=64",
                              "finetune.test_subset=16", "data.prefetch=2", f"data.num_workers={workers}"])
    finetune(cfg, pretrained.state_dict(), device="cpu", progress=False)
    assert depths == [expected]


def test_resuming_refuses_a_checkpoint_of_another_kind_or_init(pretrained, tmp_path):
    overrides = ["data.dataset=synthetic", "data.synthetic_size=64", *TINY_FINETUNE, "finetune.train_subset=64",
                 "finetune.test_subset=32", "finetune.epochs=2", "finetune.checkpoint_every=2"]
    cfg = load_config(SMOKE, overrides)
    finetune(cfg, from_scratch=True, device="cpu", progress=False, run_dir=tmp_path / "scratch")
    assert [p.name for p in checkpoint_folders(tmp_path / "scratch")] == ["checkpoint-0002"]  # every 2nd epoch
    with pytest.raises(CheckpointError, match="from scratch weights, not pretrained"):
        finetune(cfg, pretrained.state_dict(), device="cpu", progress=False, run_dir=tmp_path / "scratch")
    finetune(cfg, pretrained.state_dict(), device="cpu", progress=False, run_dir=tmp_path / "pretrained")
    other = build_mae("mae_vit_micro_patch4").state_dict()  # another encoder: a resume would mix the two
    with pytest.raises(CheckpointError, match="from other pretrained weights"):
        finetune(cfg, other, device="cpu", progress=False, run_dir=tmp_path / "pretrained")
    with pytest.raises(CheckpointError, match=r"other settings \(finetune.base_lr: 0.001 -> 0.002\)"):
        finetune(load_config(SMOKE, [*overrides, "finetune.base_lr=2e-3"]), pretrained.state_dict(), device="cpu",
                 progress=False, run_dir=tmp_path / "pretrained")
    finetune(load_config(SMOKE, [*overrides, "finetune.checkpoint_every=1", "train.log_every=1"]),
             pretrained.state_dict(), device="cpu", progress=False, run_dir=tmp_path / "pretrained")  # how, not what
    written = load_checkpoint(tmp_path / "scratch" / "checkpoint-0002")
    save_checkpoint(tmp_path / "ddp" / "checkpoint-0002", {**written, "rng": written["rng"] * 2})  # 2 ranks' states
    with pytest.raises(CheckpointError, match="written by 2 process"):
        finetune(cfg, from_scratch=True, device="cpu", progress=False, run_dir=tmp_path / "ddp")
    save_checkpoint(tmp_path / "pretraining" / "checkpoint-0001", {"model": pretrained.state_dict(), "epoch": 1})
    with pytest.raises(CheckpointError, match="not a fine-tuning checkpoint"):
        finetune(cfg, pretrained.state_dict(), device="cpu", progress=False, run_dir=tmp_path / "pretraining")
    with pytest.raises(ConfigError, match="finetune.checkpoint_every"):
        load_config(SMOKE, ["finetune.checkpoint_every=0"])


def test_a_finetuning_step_updates_the_weights_and_leaves_no_gradients_behind():
    # held until the next backward, they would sit through the next forward's activation peak
    cfg = load_config(SMOKE, ["data.dataset=synthetic", *TINY_FINETUNE])
    model = build_classifier(cfg, 10)
    before = [p.detach().clone() for p in model.parameters()]
    step = mae.finetune.FinetuneStep(model, optimizer_for(model, cfg, 1e-3), cfg, "cpu", 10)
    step(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_finetune_step_benchmark_smoke(tmp_path):
    """benchmarks/finetune_step.py times FinetuneStep eager and compiled and writes its JSON."""
    import json

    from conftest import load_benchmark

    bench = load_benchmark("finetune_step")
    out = tmp_path / "bench.json"
    bench.main(["--batch-size", "8", "--steps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1",
                "--set", "finetune.drop_path=0", "--json", str(out)])
    (config,) = json.loads(out.read_text())["configs"]
    assert set(config["results"]) == {"eager", "compiled"} and config["speedup_compiled_over_eager"] > 0
    assert config["train_flops_per_image"] > 0 and all(r["img_per_s"] > 0 for r in config["results"].values())


def _ddp_finetune(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One DDP rank (gloo, CPU) of a tiny fine-tuning run; writes what the test compares."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        weights = build_mae("mae_vit_micro_patch4").state_dict()  # the same on every rank
        cfg = _cfg("finetune.batch_size=16", "finetune.train_subset=64", "finetune.test_subset=40")
        result = finetune(cfg, weights, device="cpu", progress=False, run_dir=f"{out}/run")
        torch.save({"top1": result.top1, "steps": result.epochs[-1]["step"],
                    "qkv": result.model.blocks[0].attn.qkv.weight.detach().clone()}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_finetune_under_ddp_shards_the_data_and_keeps_ranks_in_step(fashion_mnist_dir, tmp_path):
    torch.multiprocessing.spawn(_ddp_finetune, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 64 // 2 // 16  # each rank saw its half of the images
    assert r0["top1"] == r1["top1"]  # evaluated on both ranks' shards together
    torch.testing.assert_close(r0["qkv"], r1["qkv"], rtol=0, atol=0)  # gradients were averaged
    payload = load_checkpoint(tmp_path / "run" / "checkpoint-0001")  # written by rank 0, for both ranks
    assert len(payload["rng"]) == 2 and not torch.equal(payload["rng"][0]["torch"], payload["rng"][1]["torch"])


@pytest.mark.parametrize("n,world_size", [(10, 1), (10, 3), (10000, 3), (5, 8)])
def test_every_test_image_is_scored_once_across_ranks(n, world_size):
    scored = [i for rank in range(world_size) for i in eval_shard(n, rank, world_size)]
    assert sorted(scored) == list(range(n))  # none twice (DistributedSampler pads), none left out


def test_a_resumed_run_keeps_this_codes_layer_decay_scales(tmp_path, monkeypatch):
    # a from-scratch run written by code that still decayed its layers resumes without the decay
    overrides = ["data.dataset=synthetic", "data.synthetic_size=64", *TINY_FINETUNE, "finetune.train_subset=64",
                 "finetune.test_subset=32", "finetune.epochs=2"]
    cfg = load_config(SMOKE, overrides)
    finetune(cfg, from_scratch=True, device="cpu", progress=False, run_dir=tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-0002")  # as if stopped during epoch 2
    payload = load_checkpoint(tmp_path / "checkpoint-0001")
    for group in payload["optimizer"]["param_groups"]:
        group["lr_scale"] = 0.5  # as the older code saved them
    save_checkpoint(tmp_path / "checkpoint-0001", payload)
    seen = []
    real = mae.finetune.FinetuneStep
    monkeypatch.setattr(mae.finetune, "FinetuneStep", lambda model, optimizer, *a, **k:
                        seen.append([g["lr_scale"] for g in optimizer.param_groups]) or real(model, optimizer, *a, **k))
    finetune(cfg, from_scratch=True, device="cpu", progress=False, run_dir=tmp_path)
    assert seen and set(seen[0]) == {1.0}
