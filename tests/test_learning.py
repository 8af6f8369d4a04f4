"""On real Fashion-MNIST: short pretraining lowers the masked-patch loss and gives an encoder
whose frozen features probe better than a randomly initialised encoder's."""

import pytest
import torch

from mae.config import load_config
from mae.data import build_dataset
from mae.engine import build_model, load_model, pretrain
from mae.probe import linear_probe, quick_probe
from tests.conftest import REPO


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_mnist_dir):
    cfg = load_config(REPO / "experiments" / "smoke.yaml", [
        f"data.data_dir={fashion_mnist_dir}",
        "data.train_subset=10000", "train.epochs=2", "train.batch_size=64",
        "optim.base_lr=4e-3", "optim.warmup_epochs=0.3", "train.log_every=16",
        "probe.quick_train_size=5000", "probe.quick_test_size=2000", "probe.quick_epochs=100",
        "probe.epochs=3", "probe.train_subset=2048", "probe.test_subset=2000", "probe.base_lr=1.0",
        "probe.warmup_epochs=0.5",
        "probe.augment=false",
    ])
    run = tmp_path_factory.mktemp("learn")
    result = pretrain(cfg, run)
    model, _ = load_model(result.checkpoint_dir)
    return cfg, result, model


@pytest.mark.slow
def test_masked_patch_loss_falls_below_its_value_at_init(trained, fashion_mnist_dir):
    cfg, result, model = trained
    # the loss of the untrained model on the same test images and masks, vs the trained one
    data = build_dataset(cfg, "test", augment=False, subset=512)
    imgs = torch.stack([data[i][0] for i in range(len(data))])
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(cfg.train.seed)
    fresh = build_model(cfg).eval()
    with torch.no_grad():
        init_loss = fresh(imgs, cfg.mask.ratio, noise)[0].item()
        trained_loss = model.eval()(imgs, cfg.mask.ratio, noise)[0].item()
    assert trained_loss < 0.75 * init_loss, (init_loss, trained_loss)
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


@pytest.mark.slow
def test_pretrained_encoder_probes_better_than_random_init(trained):
    cfg, _, model = trained
    torch.manual_seed(cfg.train.seed)
    random_init = build_model(cfg)
    pretrained_top1 = quick_probe(model, cfg)["probe_top1"]
    random_top1 = quick_probe(random_init, cfg)["probe_top1"]
    # 2,000 held-out images: one standard error is under 1 point
    assert pretrained_top1 > random_top1 + 0.02, (pretrained_top1, random_top1)
    assert pretrained_top1 > 0.70  # far above chance (0.10)


@pytest.mark.slow
def test_linear_probe_learns(trained):
    cfg, _, model = trained
    result = linear_probe(model, cfg, progress=False)
    assert len(result.epochs) == cfg.probe.epochs
    assert result.top1 > 0.6, result.epochs  # chance is 0.10
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
