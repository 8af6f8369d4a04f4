"""The `python -m mae` commands end to end on the smoke experiment."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mae.config import load_config
from tests.conftest import REPO


def run_mae(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "mae", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, fashion_mnist_dir):
    out = tmp_path_factory.mktemp("cli") / "run"
    run_mae("pretrain", "--config", "experiments/smoke.yaml", "--data-dir", str(fashion_mnist_dir),
            "--set", "train.epochs=1", "--out", str(out))
    return out


@pytest.mark.slow
def test_pretrain_writes_checkpoint_config_and_summary(smoke_run):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert 0.0 <= summary["probe_top1"] <= 1.0 and summary["probe_n_test"] == 500
    cfg = load_config(REPO / "experiments" / "smoke.yaml")  # batch 64, one process: lr = base_lr * 64 / 256
    assert summary["effective_batch_size"] == 64 and summary["world_size"] == 1
    assert summary["absolute_lr"] == pytest.approx(cfg.optim.base_lr * 64 / 256)
    assert (smoke_run / "checkpoint-0001" / "checkpoint.pt").is_file()
    assert "mask:" in (smoke_run / "checkpoint-0001" / "config.yaml").read_text()
    assert torch.load(smoke_run / "checkpoint-0001" / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_pretrain_into_a_run_of_other_settings_is_refused_naming_the_flag(smoke_run, fashion_mnist_dir):
    before = (smoke_run / "config.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "mae", "pretrain", "--config", "experiments/smoke.yaml",
                           "--data-dir", str(fashion_mnist_dir), "--set", "train.epochs=1", "--set", "mask.ratio=0.5",
                           "--out", str(smoke_run)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "(mask.ratio: 0.75 -> 0.5)" in proc.stderr and "another run folder: --out DIR" in proc.stderr
    assert (smoke_run / "config.yaml").read_text() == before


@pytest.mark.slow
def test_probe_command(smoke_run, tmp_path):
    out = tmp_path / "probe.json"
    run_mae("probe", "--checkpoint", str(smoke_run / "checkpoint-0001"), "--quick", "--json", str(out))
    assert json.loads(out.read_text())["probe_n_train"] == 500
    run_mae("probe", "--checkpoint", str(smoke_run / "checkpoint-0001"), "--json", str(out),
            "--set", "probe.epochs=1", "--set", "probe.test_subset=500")
    result = json.loads(out.read_text())
    assert len(result["epochs"]) == 1 and 0.0 <= result["probe_top1"] <= 1.0 and result["probe_n_test"] == 500


def test_reconstruct_reads_the_checkpoint_once_and_uses_its_weights(smoke_run, tmp_path, monkeypatch):
    import mae.cli
    from mae.checkpoint import load_checkpoint, model_state

    reads, seen = [], {}
    monkeypatch.setattr(mae.cli, "load_checkpoint", lambda path: reads.append(path) or load_checkpoint(path))
    monkeypatch.setattr("mae.reconstruct.reconstruct", lambda model, imgs, ratio: seen.update(model=model) or
                        {"original": imgs})
    monkeypatch.setattr("mae.reconstruct.save_reconstruction_grid", lambda panels, out, mean, std: out)
    checkpoint = smoke_run / "checkpoint-0001"
    assert mae.cli.main(["reconstruct", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.png"),
                         "--num", "2"]) == 0
    assert reads == [str(checkpoint)]  # config and weights from one read (a ViT-L one holds GBs)
    for name, value in model_state(load_checkpoint(checkpoint)).items():
        torch.testing.assert_close(seen["model"].state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_reconstruct_writes_a_four_column_grid(smoke_run, tmp_path):
    png = tmp_path / "recon.png"
    run_mae("reconstruct", "--checkpoint", str(smoke_run / "checkpoint-0001"), "--out", str(png),
            "--num", "3", "--mask-ratio", "0.5")
    with Image.open(png) as im:
        # make_grid: 2 px padding around 28 px tiles; 4 columns, 3 rows
        assert im.size == (4 * 30 + 2, 3 * 30 + 2)


@pytest.mark.parametrize("argv, message", [
    (["--mask-ratio", "1.5"], "mask.ratio: must be in"),
    (["--mask-ratio", "0.999"], "leaves no visible patch"),
    (["--num", "0"], "--num must be >= 1"),
    (["--out", "recon"], "give a file name with an image suffix PIL can write"),
    (["--out", "recon.txt"], "give a file name with an image suffix PIL can write"),
    (["--set", "model.decoder_depth=3"], "decoder_depth 3 (the checkpoint's: 2): drop the model.* values"),
])
def test_reconstruct_refuses_bad_arguments(smoke_run, tmp_path, capsys, argv, message):
    import mae.cli

    out = tmp_path / "r.png"
    assert mae.cli.main(["reconstruct", "--checkpoint", str(smoke_run / "checkpoint-0001"), "--out", str(out),
                         *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_any_suffix_pil_writes_is_a_valid_reconstruct_out():
    from mae.cli import _writable_image

    assert all(_writable_image(f"r{suffix}") for suffix in (".png", ".PNG", ".jpg", ".gif", ".pdf", ".ppm", ".tiff"))
    assert not any(_writable_image(name) for name in ("recon", "r.txt", "r.yaml", "r."))


def test_a_model_that_does_not_fit_the_weights_is_a_checkpoint_error(smoke_run):
    from mae.checkpoint import CheckpointError, load_checkpoint
    from mae.config import config_from_dict, replace
    from mae.engine import model_with_weights

    payload = load_checkpoint(smoke_run / "checkpoint-0001")
    cfg = config_from_dict(payload["config"])
    extra = {**payload, "model": {**payload["model"], "extra.weight": torch.zeros(1)}}
    other_loss = replace(cfg, {"model.norm_pix_loss": not cfg.model.norm_pix_loss})  # sets no weight's shape
    with pytest.raises(CheckpointError, match='its config builds: Unexpected key.*"extra.weight"'):
        model_with_weights(other_loss, extra)
    deeper = replace(cfg, {"model.decoder_depth": 3})
    with pytest.raises(CheckpointError, match="decoder_depth 3 .*: drop .*Missing key.*decoder_blocks.2"):
        model_with_weights(deeper, payload)


def test_reconstruct_skips_unreadable_images_and_runs_on_the_configured_device(tmp_path, monkeypatch):
    import mae.cli
    from mae.checkpoint import save_checkpoint
    from mae.config import load_config, to_dict
    from mae.engine import build_model

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "data" / cls / "0.png")
    (tmp_path / "data" / "a" / "1.png").write_bytes(b"not an image")  # ImageFolder order: a/0, a/1, b/0
    cfg = load_config(None, ["data.dataset=imagefolder", "model.name=mae_vit_micro_patch4", "model.img_size=32",
                             "model.in_chans=3"])
    save_checkpoint(tmp_path / "ckpt", {"model": build_model(cfg).state_dict(), "config": to_dict(cfg)})
    seen, devices = {}, []
    monkeypatch.setattr("mae.engine.select_device", lambda name: devices.append(name) or torch.device("cpu"))
    monkeypatch.setattr("mae.reconstruct.save_reconstruction_grid",
                        lambda panels, out, mean, std: seen.update(panels) or out)
    argv = ["reconstruct", "--checkpoint", str(tmp_path / "ckpt"), "--data-dir", str(tmp_path / "data"),
            "--out", str(tmp_path / "r.png"), "--num", "3", "--device", "cuda:3"]
    assert mae.cli.main(argv) == 0
    assert seen["original"].shape == (2, 3, 32, 32) and devices == ["cuda:3"]  # the two readable of the three


def test_reconstruction_keeps_visible_patches(fashion_mnist_dir):
    from mae.models import build_mae
    from mae.reconstruct import reconstruct

    torch.manual_seed(0)
    model = build_mae("mae_vit_micro_patch4", norm_pix_loss=True).eval()
    imgs = torch.randn(2, 1, 28, 28)
    noise = torch.rand(2, model.num_patches)
    panels = reconstruct(model, imgs, mask_ratio=0.75, noise=noise)
    visible = panels["mask"] == 0
    assert torch.equal(panels["reconstruction_plus_visible"][visible], imgs[visible])
    assert torch.equal(panels["masked"][~visible], torch.zeros_like(imgs[~visible]))
    assert panels["mask"].mean().item() == pytest.approx(37 / 49)
    # a perfect prediction (the model's own norm-pix targets) must come back as the image itself:
    # removed patches show the prediction, taken back from per-patch normalised values to pixels
    forward = model.forward

    def perfect(imgs, mask_ratio=0.75, noise=None, **kwargs):
        loss, _, mask = forward(imgs, mask_ratio=mask_ratio, noise=noise, **kwargs)
        return loss, model.target(imgs), mask

    model.forward = perfect
    panels = reconstruct(model, imgs, mask_ratio=0.75, noise=noise)
    torch.testing.assert_close(panels["reconstruction"], imgs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(panels["reconstruction_plus_visible"], imgs, rtol=1e-4, atol=1e-4)


def test_probe_of_missing_checkpoint_fails_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mae", "probe", "--checkpoint", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr


def test_the_summary_covers_the_whole_run_and_a_finished_run_keeps_its_own(tmp_path, fashion_mnist_dir):
    import shutil

    out = tmp_path / "run"
    command = ["pretrain", "--config", "experiments/smoke.yaml", "--data-dir", str(fashion_mnist_dir), "--no-probe",
               "--set", "train.epochs=2", "--set", "data.train_subset=128", "--set", "train.batch_size=32",
               "--out", str(out)]
    run_mae(*command)
    whole = json.loads((out / "summary.json").read_text())
    assert whole["epochs_completed"] == 2 and whole["images_per_sec"] > 0
    shutil.rmtree(out / "checkpoint-0002")  # as if stopped during epoch 2: the rerun resumes after epoch 1
    (out / "summary.json").unlink()
    run_mae(*command)
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["epochs_completed"] == 2 and resumed["first_train_loss"] == whole["first_train_loss"]  # epoch 1's, not 2's
    before = (out / "summary.json").read_text()
    assert json.loads(run_mae(*command).stdout) == resumed  # nothing left to train: the summary stays
    assert (out / "summary.json").read_text() == before
    (out / "summary.json").write_text(json.dumps({"epochs": 2, "final_loss": 0.5}))  # before the table's names
    run_mae(*command)
    assert json.loads((out / "summary.json").read_text()) | {"wall_time_s": 0} == resumed | {"wall_time_s": 0}


def test_a_bad_value_found_at_run_time_is_a_clear_error_not_a_traceback(fashion_mnist_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mae", "pretrain", "--config", "experiments/smoke.yaml",
                           "--data-dir", str(fashion_mnist_dir), "--set", "data.train_subset=32", "--no-probe",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.batch_size 64 is larger than the 32 training images" in proc.stderr
    assert "another run folder" not in proc.stderr
