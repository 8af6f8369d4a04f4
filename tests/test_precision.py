"""train.precision sets the autocast of every forward, not only pretraining's.

On this CPU 'auto' means float32, so the test asks for bf16 and fp32 explicitly and looks
at the dtype the encoder's attention blocks produced: under bf16 autocast their output
projection returns bfloat16, in float32 it returns float32.
"""

import pytest
import torch

from mae.config import load_config
from mae.engine import pretrain
from mae.finetune import finetune
from mae.models import build_mae
from mae.probe import linear_probe, quick_probe

from conftest import REPO, attention_dtypes

SMOKE = str(REPO / "experiments" / "smoke.yaml")
SMALL = [
    "probe.quick_train_size=64", "probe.quick_test_size=64", "probe.quick_epochs=2",
    "probe.train_subset=64", "probe.test_subset=64", "probe.batch_size=32",
    "finetune.epochs=1", "finetune.batch_size=32", "finetune.train_subset=64", "finetune.test_subset=64",
]


@pytest.mark.slow
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_pretraining_probes_and_finetuning_follow_train_precision(fashion_mnist_dir, tmp_path, precision, dtype):
    cfg = load_config(SMOKE, [*SMALL, f"train.precision={precision}", "train.epochs=1", "train.batch_size=32",
                              "data.train_subset=64", "train.progress=false"])
    with attention_dtypes() as pretrained:  # the encoder's and the decoder's blocks
        pretrain(cfg, tmp_path)
    assert pretrained == {dtype}
    torch.manual_seed(0)
    model = build_mae("mae_vit_micro_patch4")
    with attention_dtypes() as quick:
        quick_probe(model, cfg, device="cpu")
    with attention_dtypes() as full:
        result = linear_probe(model, cfg, device="cpu", progress=False)
    with attention_dtypes() as tuned:
        finetune(cfg, model.state_dict(), device="cpu", progress=False)
    assert (quick, full, tuned) == ({dtype}, {dtype}, {dtype})
    assert 0.0 <= result.top1 <= 1.0
