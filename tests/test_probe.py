"""The full linear probe's gradient accumulation (probe.accum_iter): how the reference makes
the paper's batch of 16384 (512 per GPU, BatchNorm per GPU), in one process."""

import pytest
import torch
from torch import nn

import mae.probe
from mae.config import ConfigError, load_config
from mae.models import build_mae
from mae.probe import LinearProbeHead, linear_probe

SYNTHETIC = ["data.dataset=synthetic", "data.synthetic_size=48", "model.name=mae_vit_micro_patch4",
             "probe.augment=false", "probe.epochs=2", "probe.warmup_epochs=0", "probe.base_lr=0.5",
             "probe.test_subset=8", "train.precision=fp32"]


def test_accumulated_batches_make_one_step_with_their_mean_gradient_and_the_scaled_lr(monkeypatch):
    # 48 images in batches of 8, 3 per step: 2 steps an epoch. Each step's gradient must be the
    # mean of its 3 batches' own gradients (BatchNorm over each batch of 8, not over 24),
    # at the head's weights before the step, and its lr base_lr * 8 * 3 / 256.
    cfg = load_config(None, [*SYNTHETIC, "probe.batch_size=8", "probe.accum_iter=3", "probe.optimizer=sgd"])
    batches, steps = [], []

    def record_inputs(head, inputs, output):
        if head.training:
            batches.append(inputs[0].detach().clone())

    real_head = mae.probe.LinearProbeHead

    def recorded_head(dim, classes):
        head = real_head(dim, classes)
        head.register_forward_hook(record_inputs)
        return head

    real_optimizer = mae.probe.probe_optimizer

    def recorded_optimizer(head, kind, lr, weight_decay):
        optimizer = real_optimizer(head, kind, lr, weight_decay)
        step = optimizer.step

        def recording_step(*args, **kwargs):
            steps.append({"lr": optimizer.param_groups[0]["lr"], "n_batches": len(batches),
                          "state": {k: v.clone() for k, v in head.state_dict().items()},
                          "grad": head.fc.weight.grad.clone()})
            return step(*args, **kwargs)

        optimizer.step = recording_step
        return optimizer

    labels = []
    real_ce = nn.functional.cross_entropy
    monkeypatch.setattr(mae.probe.nn.functional, "cross_entropy",
                        lambda logits, y, **kw: labels.append(y.clone()) or real_ce(logits, y, **kw))
    monkeypatch.setattr(mae.probe, "LinearProbeHead", recorded_head)
    monkeypatch.setattr(mae.probe, "probe_optimizer", recorded_optimizer)
    torch.manual_seed(0)
    linear_probe(build_mae("mae_vit_micro_patch4"), cfg, device="cpu", progress=False)

    assert [s["n_batches"] for s in steps] == [3, 6, 9, 12]  # 2 epochs x 2 steps, 3 batches each
    assert steps[0]["lr"] == pytest.approx(0.5 * 8 * 3 / 256)  # no warm-up: the peak, then the cosine
    assert steps[0]["lr"] > steps[1]["lr"] > steps[2]["lr"] > steps[3]["lr"]
    for s in steps:
        head = LinearProbeHead(*reversed(s["grad"].shape))
        head.load_state_dict(s["state"])
        head.train()
        group = range(s["n_batches"] - 3, s["n_batches"])
        expected = sum(torch.autograd.grad(real_ce(head(batches[i]), labels[i]), head.fc.weight)[0] for i in group) / 3
        torch.testing.assert_close(s["grad"], expected, rtol=1e-5, atol=1e-7)


def test_accumulation_needs_whole_steps():
    cfg = load_config(None, [*SYNTHETIC, "probe.batch_size=8", "probe.accum_iter=7"])
    with pytest.raises(ValueError, match="probe.accum_iter 7 exceeds the 48 training images"):
        linear_probe(build_mae("mae_vit_micro_patch4"), cfg, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="probe.accum_iter"):
        load_config(None, ["probe.accum_iter=0"])


# -- resuming ------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _encoder(seed: int):
    torch.manual_seed(seed)
    return build_mae("mae_vit_micro_patch4")


@pytest.mark.slow
def test_an_interrupted_probe_resumes_to_the_uninterrupted_result(fashion_mnist_dir, tmp_path):
    """The shuffle and the crops (in a DataLoader worker) of every epoch are drawn again as
    they were; the head, its optimizer and the schedule's step come back with the checkpoint."""
    cfg = load_config(None, ["model.name=mae_vit_micro_patch4", "probe.epochs=3", "probe.batch_size=32",
                             "probe.train_subset=96", "probe.test_subset=64", "probe.optimizer=sgd",
                             "probe.base_lr=1.0", "probe.warmup_epochs=0", "data.num_workers=1"])
    whole = linear_probe(_encoder(0), cfg, device="cpu", progress=False, run_dir=tmp_path / "whole")

    def stop_after_epoch_2(metrics, checkpoint_dir):
        if metrics["epoch"] == 2:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        linear_probe(_encoder(0), cfg, device="cpu", progress=False, run_dir=tmp_path / "cut",
                     on_epoch_end=stop_after_epoch_2)
    seen = []
    resumed = linear_probe(_encoder(0), cfg, device="cpu", progress=False, run_dir=tmp_path / "cut",
                           on_epoch_end=lambda m, c: seen.append((m["epoch"], c.name)))
    assert seen == [(3, "checkpoint-0003")]  # only the epoch that was left
    assert resumed.epochs == whole.epochs and len(whole.epochs) == 3  # losses and top-1, every epoch
    from mae.checkpoint import load_checkpoint

    after_2 = load_checkpoint(tmp_path / "whole" / "checkpoint-0002")["head"]["fc.weight"]
    assert (whole.head.fc.weight - after_2).abs().max() > 1e-3  # epoch 3 trained: not two untouched heads
    for k, v in resumed.head.state_dict().items():
        torch.testing.assert_close(v, whole.head.state_dict()[k], rtol=0, atol=1e-6, msg=k)

    with pytest.raises(mae.probe.CheckpointError, match="another encoder"):
        linear_probe(_encoder(1), cfg, device="cpu", progress=False, run_dir=tmp_path / "cut")


def test_a_probe_does_not_resume_from_another_kind_of_checkpoint(tmp_path):
    from mae.checkpoint import save_checkpoint

    cfg = load_config(None, [*SYNTHETIC, "probe.batch_size=8"])
    save_checkpoint(tmp_path / "checkpoint-0001", {"kind": "finetune", "epoch": 1})
    with pytest.raises(mae.probe.CheckpointError, match="not a linear-probe checkpoint"):
        linear_probe(_encoder(0), cfg, device="cpu", progress=False, run_dir=tmp_path)
    from mae.config import to_dict

    other = load_config(None, [*SYNTHETIC, "probe.batch_size=8", "probe.optimizer=sgd", "probe.checkpoint_every=2"])
    save_checkpoint(tmp_path / "checkpoint-0001", {"kind": "probe", "epoch": 1, "config": to_dict(other)})
    with pytest.raises(mae.probe.CheckpointError, match=r"other settings \(probe.optimizer: 'sgd' -> 'lars'\)"):
        linear_probe(_encoder(0), cfg, device="cpu", progress=False, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="probe.checkpoint_every"):
        load_config(None, ["probe.checkpoint_every=0"])


def test_held_out_images_are_disjoint_from_the_fit_and_spread_over_the_split():
    from mae.data import held_out_split

    classes = torch.arange(1000) // 100  # an ImageFolder lists its 10 classes one after another
    fit, held = held_out_split(classes, 300, 200)
    assert len(fit) == 300 and len(held) == 200 and not set(fit.indices) & set(held.indices)
    for part in (fit, held):  # every class keeps its share in both
        assert torch.bincount(classes[part.indices], minlength=10).tolist() == [len(part) // 10] * 10
    assert len(held_out_split(classes, 300, None)[1]) == 300  # None: as many as it fits on
    fit, held = held_out_split(classes, 10000, None)  # more than there are: half and half, with a warning
    assert (len(fit), len(held)) == (500, 500) and not set(fit.indices) & set(held.indices)
    assert [len(part) for part in held_out_split(classes, 700, 1300)] == [350, 650]
    with pytest.raises(ConfigError, match="probe.quick_split=test"):
        held_out_split(classes[:1], 10, None)


def test_the_quick_probe_scores_held_out_training_images_unless_asked_for_the_test_split(monkeypatch):
    built = []
    build = mae.probe.build_dataset
    monkeypatch.setattr(mae.probe, "build_dataset", lambda cfg, split, **kw: built.append(split) or build(cfg, split, **kw))
    model = build_mae("mae_vit_micro_patch4", img_size=16, in_chans=3)
    base = ["data.dataset=synthetic", "data.synthetic_size=200", "model.img_size=16", "model.in_chans=3",
            "probe.quick_train_size=60", "probe.quick_test_size=40", "probe.quick_epochs=5", "train.device=cpu"]
    out = mae.probe.quick_probe(model, load_config(None, base))
    assert built == ["train"] and (out["probe_n_train"], out["probe_n_test"]) == (60, 40)
    built.clear()
    out = mae.probe.quick_probe(model, load_config(None, [*base, "probe.quick_split=test"]))
    assert built == ["train", "test"] and out["probe_n_test"] == 40
