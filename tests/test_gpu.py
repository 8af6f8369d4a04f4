"""GPU checks: skipped on machines without CUDA (CI has none); run them on a GPU box."""

import math

import pytest
import torch

from mae.config import load_config
from mae.engine import pretrain
from mae.models import build_mae
from tests.conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("compile_model", [False, True])
def test_pretrain_on_gpu_bf16(tmp_path, fashion_mnist_dir, compile_model):
    cfg = load_config(REPO / "experiments" / "smoke.yaml", [
        f"data.data_dir={fashion_mnist_dir}", "train.device=cuda", f"train.compile={compile_model}",
    ])
    result = pretrain(cfg, tmp_path)
    assert all(math.isfinite(e["train_loss"]) for e in result.epochs)
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


def test_bf16_loss_close_to_float32():
    torch.manual_seed(0)
    model = build_mae("mae_vit_base_patch16").cuda()
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    noise = torch.rand(8, 196, device="cuda")
    with torch.no_grad():
        fp32 = model(imgs, 0.75, noise)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(imgs, 0.75, noise)[0]
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 2e-2
