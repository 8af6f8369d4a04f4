"""mae.predecoded and `data.pipeline: predecoded`: the conversion keeps what the CPU pipeline
keeps, shrunk as documented; interrupted, refused or damaged stores give clear errors and
lose nothing; the pipeline augments exactly the stored pixels and pretrains."""

import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data.auto_augment import RandAugment
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import mae.engine
import mae.predecoded
from mae.cli import main
from mae.config import ConfigError, load_config
from mae.data import CorruptDatasetError, DatasetNotFoundError, decode_pil, normalization
from mae.device_input import DeviceAugment, UnpackAndAugment, build_pretrain_input, build_train_input
from mae.models import build_mae
from mae.predecoded import PackedBatch, PredecodedImages, collate_packed, write_store
from mae.finetune import finetune
from mae.probe import linear_probe, quick_probe
from tests.conftest import REPO
from tests.test_device_input import folder_cfg, make_folder

# make_folder's files in ImageFolder order: (class, name, (H, W)); None: unreadable
FILES = [(0, "a/0.jpg", (60, 80)), (0, "a/1.jpg", (60, 80)), (0, "a/photo.bmp", (40, 30)),
         (0, "a/photo.png", (50, 70)), (1, "b/0.jpg", (60, 80)), (1, "b/corrupt.jpg", None),
         (1, "b/truncated.jpg", None)]
READABLE = [f for f in FILES if f[2] is not None]


@pytest.fixture
def store(tmp_path):
    """make_folder's 7 files converted with shorter side <= 40: returns (source, store folder)."""
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    write_store(src, tmp_path / "store", short_side=40)
    return src, tmp_path / "store"


def test_store_holds_the_readable_images_shrunk_with_their_labels(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    with caplog.at_level(logging.WARNING, logger="mae.predecoded"):
        meta = write_store(src, tmp_path / "store", short_side=40, workers=2)
    assert meta["count"] == 5 and meta["skipped"] == 2 and meta["classes"] == ["a", "b"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert str(src / "b" / "corrupt.jpg") in warned and str(src / "b" / "truncated.jpg") in warned
    ds = PredecodedImages(tmp_path / "store", in_chans=3)
    assert len(ds) == 5
    for i, (label, name, (H, W)) in enumerate(READABLE):
        img, got_label = ds[i]
        original = decode_pil(src / name, "RGB")
        assert got_label == label and img.dtype == torch.uint8
        if min(H, W) <= 40:  # small enough: stored exactly as decoded
            assert torch.equal(img, original)
            continue
        h, w = (40, round(W * 40 / H)) if H <= W else (round(H * 40 / W), 40)
        assert img.shape == (3, h, w)  # shorter side 40, aspect ratio kept
        resized = TF.resize(original, [h, w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        assert (img.float() - resized.float()).abs().mean() < 2.0  # PIL's filter against torch's


def test_workers_handing_over_batches_write_the_same_store_as_one_process(tmp_path, store, monkeypatch):
    src, one_process = store
    monkeypatch.setattr(mae.predecoded, "CONVERT_BATCH", 2)  # 7 files: 4 batches over 2 workers, 2 unreadable
    meta = write_store(src, tmp_path / "batched", short_side=40, workers=2)
    assert meta["count"] == 5 and meta["skipped"] == 2
    assert (tmp_path / "batched" / "images.u8").read_bytes() == (one_process / "images.u8").read_bytes()
    with np.load(tmp_path / "batched" / "index.npz") as a, np.load(one_process / "index.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("offsets", "shapes", "labels"))


def test_greyscale_store_and_channel_mismatch(tmp_path, store):
    src, _ = store
    write_store(src, tmp_path / "grey", short_side=None, in_chans=1)
    grey = PredecodedImages(tmp_path / "grey", in_chans=1)
    assert torch.equal(grey[0][0], decode_pil(src / "a" / "0.jpg", "L"))  # full size, one channel
    with pytest.raises(ConfigError, match=r"1-channel images but model.in_chans is 3.*--channels 3"):
        PredecodedImages(tmp_path / "grey", in_chans=3)


def test_interrupted_conversion_leaves_no_store_and_is_named(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    real = mae.predecoded._Shrunk.__getitem__

    def interrupted(self, i):
        if i == 3:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(mae.predecoded._Shrunk, "__getitem__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_store(src, tmp_path / "store")
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.partial").exists()
    with pytest.raises(DatasetNotFoundError, match=r"no pre-decoded store at .*python -m mae predecode"):
        PredecodedImages(tmp_path / "store")
    (tmp_path / "store.partial").mkdir()  # what a killed conversion leaves
    with pytest.raises(DatasetNotFoundError, match="interrupted"):
        PredecodedImages(tmp_path / "store")


# Runs `python -m mae predecode` with 2 workers that each take 0.5 s an image and hand over
# 300 x 300 images (more than a pipe holds); the parent stops itself by SIGNAL as soon as both
# workers are busy with their first image.
_STOPPED_CONVERSION = """
import os, signal, sys, threading, time
from pathlib import Path
import mae.predecoded as pd
from mae.cli import main
src, out, sig, pids = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3]), Path(sys.argv[4])
pd.CONVERT_BATCH = 1
pd.shrink = lambda img, short_side: img.resize((300, 300))
getitem = pd._Shrunk.__getitem__
def slow_getitem_noting_the_worker(self, i):
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)
    return getitem(self, i)
pd._Shrunk.__getitem__ = slow_getitem_noting_the_worker
def stop_when_both_workers_are_busy():
    while not pids.exists() or len(set(pids.read_text().split())) < 2:
        time.sleep(0.02)
    os.kill(os.getpid(), sig)
threading.Thread(target=stop_when_both_workers_are_busy, daemon=True).start()
sys.exit(main(["predecode", "--data-dir", src, "--out", out, "--workers", "2", "--channels", "3"]))
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_conversion_leaves_no_workers_and_on_sigterm_no_partial_store(tmp_path, sig):
    """SIGTERM (a time limit, `kill`) cleans up as Ctrl-C does. Neither signal leaves the conversion
    workers behind: they handed over pixels through the pipe, and with the parent gone they
    stayed blocked on the full pipe forever."""
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    out, pids, log = tmp_path / "store", tmp_path / "pids", tmp_path / "log"
    with open(log, "w") as f:  # not a pipe: stuck workers would hold it open, and the wait would never end
        proc = subprocess.run([sys.executable, "-c", _STOPPED_CONVERSION, str(src), str(out), sig, str(pids)],
                              cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=120)
    stderr = log.read_text()
    assert proc.returncode in (128 + getattr(signal, sig), -getattr(signal, sig)), stderr[-2000:]
    workers = {int(line) for line in pids.read_text().split()}
    assert len(workers) == 2
    deadline = time.monotonic() + 30  # a worker notices its parent is gone within seconds
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.5)
    stuck = [w for w in workers if _alive(w)]
    for w in stuck:
        os.kill(w, signal.SIGKILL)
    assert not stuck, "conversion workers outlived their parent"
    assert not out.exists()
    if sig == "SIGTERM":
        assert "stopped by SIGTERM" in stderr
        assert not (tmp_path / "store.partial").exists()


def test_an_existing_folder_is_never_overwritten(tmp_path, store):
    src, out = store
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="already exists"):
        write_store(src, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_folder_with_no_readable_image_is_refused(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(CorruptDatasetError, match="none of the 1 images"):
        write_store(tmp_path / "src", tmp_path / "store")
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.partial").exists()


def test_truncated_or_damaged_store_is_a_clear_error(store):
    _, out = store
    pixels = (out / "images.u8").read_bytes()
    (out / "images.u8").write_bytes(pixels[:-100])
    with pytest.raises(CorruptDatasetError, match=r"truncated or damaged.*delete it and write it with"):
        PredecodedImages(out)
    (out / "images.u8").write_bytes(pixels)
    assert len(PredecodedImages(out)) == 5
    index = (out / "index.npz").read_bytes()
    for damaged in (b"garbage", index[: len(index) // 2]):  # the second, cut short, raised BadZipFile
        (out / "index.npz").write_bytes(damaged)
        with pytest.raises(CorruptDatasetError, match="is damaged"):
            PredecodedImages(out)


def test_workers_get_the_index_not_the_pixels(store):
    _, out = store
    ds = PredecodedImages(out)
    first = ds[0][0]  # opens the memory map in this process
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < (out / "images.u8").stat().st_size / 4
    assert torch.equal(copy[0][0], first)


def test_packed_batch_round_trips_images_of_different_sizes(store):
    _, out = store
    ds = PredecodedImages(out)
    batch = collate_packed([ds[i] for i in range(len(ds))])
    assert isinstance(batch, PackedBatch) and batch.data.dim() == 1
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(batch.images("cpu")))
    assert batch.labels.tolist() == [f[0] for f in READABLE]


def test_pipeline_augments_exactly_the_stored_pixels(store):
    src, out = store
    cfg = folder_cfg(src, "predecoded", f"data.predecoded_dir={out}", "train.seed=3")
    dataset, collate, to_batch = build_pretrain_input(cfg, "cpu")
    assert isinstance(to_batch, UnpackAndAugment) and len(dataset) == 5
    loader = DataLoader(dataset, batch_size=5, shuffle=False, collate_fn=collate, num_workers=1)
    imgs, labels = to_batch(next(iter(loader)))
    assert imgs.shape == (5, 3, 32, 32) and labels.tolist() == [f[0] for f in READABLE]
    same = DeviceAugment(32, *normalization(cfg), device="cpu", seed=3)
    stored = [dataset[i][0] for i in range(5)]
    assert torch.equal(imgs, same(stored))
    subset = build_pretrain_input(folder_cfg(src, "predecoded", f"data.predecoded_dir={out}",
                                             "data.train_subset=2"), "cpu")[0]
    assert len(subset) == 2


def test_pretraining_from_a_store(store):
    src, out = store
    cfg = folder_cfg(src, "predecoded", f"data.predecoded_dir={out}", "train.batch_size=4", "train.epochs=2",
                     "train.progress=false", "data.num_workers=1")
    result = mae.engine.pretrain(cfg, out.parent / "run", device="cpu")
    assert len(result.epochs) == 2 and all(math.isfinite(e["train_loss"]) for e in result.epochs)


def test_linear_probe_trains_on_the_store_with_the_probes_crop_scale(tmp_path, store, monkeypatch):
    src, out = store
    probe = ["probe.batch_size=2", "probe.epochs=1", "probe.optimizer=sgd", "probe.warmup_epochs=0",
             "probe.crop_scale_min=0.5"]
    cfg = folder_cfg(src, "predecoded", f"data.predecoded_dir={out}", *probe)
    scales = []
    augment = DeviceAugment.__call__
    monkeypatch.setattr(DeviceAugment, "__call__", lambda self, images: scales.append(self.scale) or augment(self, images))
    result = linear_probe(build_mae("mae_vit_micro_patch4", img_size=32, in_chans=3), cfg, device="cpu", progress=False)
    assert scales == [(0.5, 1.0)] * 2  # the store's 5 images in batches of 2, the last one dropped
    assert 0.0 <= result.top1 <= 1.0 and result.test_images == 7  # the test split is the JPEGs
    gone = folder_cfg(src, "predecoded", f"data.predecoded_dir={tmp_path / 'nowhere'}", *probe)
    with pytest.raises(DatasetNotFoundError, match="python -m mae predecode"):
        linear_probe(build_mae("mae_vit_micro_patch4", img_size=32, in_chans=3), gone, device="cpu", progress=False)
    # with CPU workers the crops come from the dataset's transform, at the same scale
    dataset = build_train_input(folder_cfg(src, "cpu"), "cpu", subset=3, scale_min=0.5)[0]
    crops = [t for t in dataset.dataset.transform.transforms if isinstance(t, v2.RandomResizedCrop)]
    assert len(dataset) == 3 and [c.scale for c in crops] == [(0.5, 1.0)]


@pytest.fixture
def mostly_unreadable(tmp_path):
    """make_folder's class b alone: one readable JPEG, two unreadable, so no batch of 2 has two images."""
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    (tmp_path / "b_only").mkdir()
    (src / "b").rename(tmp_path / "b_only" / "b")
    return tmp_path / "b_only"


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_linear_probe_skips_batches_unreadable_images_leave_too_small_for_batchnorm(mostly_unreadable, pipeline):
    cfg = folder_cfg(mostly_unreadable, pipeline, "probe.batch_size=2", "probe.epochs=1", "probe.optimizer=sgd",
                     "probe.warmup_epochs=0")
    result = linear_probe(build_mae("mae_vit_micro_patch4", img_size=32, in_chans=3), cfg, device="cpu",
                          progress=False)
    assert result.test_images == 3 and result.top1 == 1.0  # one class: the one readable test image is right


@pytest.mark.parametrize("pipeline,randaug", [("cpu", "rand-m9-mstd0.5-inc1"), ("device", "null")])
def test_finetuning_with_no_pair_of_readable_images_says_the_data_is_damaged(mostly_unreadable, pipeline, randaug):
    cfg = folder_cfg(mostly_unreadable, pipeline, "finetune.batch_size=2", "finetune.epochs=1",
                     f"finetune.randaug={randaug}")
    weights = build_mae("mae_vit_micro_patch4", img_size=32, in_chans=3).state_dict()
    with pytest.raises(ValueError, match="no image of the first batch of epoch 1 could be read"):
        finetune(cfg, weights, device="cpu", progress=False)


def test_finetuning_trains_on_the_store_with_its_crop_scale(store, monkeypatch):
    src, out = store
    finetuning = [f"data.predecoded_dir={out}", "finetune.batch_size=2", "finetune.epochs=1",
                  "finetune.warmup_epochs=0", "finetune.crop_scale_min=0.5"]
    scales, randaugs = [], []
    augment, randaug = DeviceAugment.__call__, RandAugment.__call__
    monkeypatch.setattr(DeviceAugment, "__call__", lambda self, images: scales.append(self.scale) or augment(self, images))
    monkeypatch.setattr(RandAugment, "__call__", lambda self, img: randaugs.append(img.size) or randaug(self, img))
    weights = build_mae("mae_vit_micro_patch4", img_size=32, in_chans=3).state_dict()
    result = finetune(folder_cfg(src, "predecoded", *finetuning, "finetune.randaug=null"), weights, device="cpu",
                      progress=False)
    assert scales == [(0.5, 1.0)] * 2 and randaugs == []  # the store's 5 images in batches of 2, the last dropped
    assert result.test_images == 7 and math.isfinite(result.epochs[0]["train_loss"])
    # RandAugment (on by default) is PIL's: the store's pixels are cropped and augmented in the workers
    scales.clear()
    result = finetune(folder_cfg(src, "predecoded", *finetuning), weights, device="cpu", progress=False)
    assert scales == [] and randaugs == [(32, 32)] * 4  # after the crop; 4 images read, as above
    assert math.isfinite(result.epochs[0]["train_loss"])
    dataset = build_train_input(folder_cfg(src, "predecoded", *finetuning), "cpu", subset=None, scale_min=0.5,
                                randaug="rand-m9-mstd0.5-inc1")[0]
    crops = [t for t in dataset.transform.transforms if isinstance(t, v2.RandomResizedCrop)]
    assert [c.scale for c in crops] == [(0.5, 1.0)] and len(dataset) == 5


def test_splits_or_a_store_naming_other_classes_are_refused(tmp_path, store):
    src, out = store
    tree = tmp_path / "tree"  # train/ holds a and b, val/ only a: b's labels would mean nothing
    (tree / "val").mkdir(parents=True)
    src.rename(tree / "train")
    (tree / "train" / "a").rename(tree / "val" / "a")
    (tree / "train" / "a").mkdir()
    (tree / "val" / "a" / "0.jpg").rename(tree / "train" / "a" / "0.jpg")
    model = build_mae("mae_vit_micro_patch4", img_size=32, in_chans=3)
    with pytest.raises(ValueError, match=r"only in training: \['b'\]; only in test: \[\]"):
        quick_probe(model, folder_cfg(tree, "cpu", "probe.quick_split=test"), device="cpu")
    other = tmp_path / "other" / "x"  # a store made from another tree than the one the test split reads
    other.mkdir(parents=True)
    (tree / "train" / "a" / "0.jpg").rename(other / "0.jpg")
    cfg = folder_cfg(other.parent, "predecoded", f"data.predecoded_dir={out}", "probe.batch_size=2")
    with pytest.raises(ValueError, match=r"only in training: \['a', 'b'\]; only in test: \['x'\]"):
        linear_probe(model, cfg, device="cpu", progress=False)


def test_config_names_what_the_predecoded_pipeline_needs():
    with pytest.raises(ConfigError, match=r"data\.predecoded_dir: .*python -m mae predecode"):
        load_config(None, ["data.dataset=imagefolder", "data.pipeline=predecoded"])
    with pytest.raises(ConfigError, match=r"data\.pipeline: 'predecoded' stores an ImageFolder"):
        load_config(None, ["data.pipeline=predecoded", "data.predecoded_dir=/x"])


def test_missing_store_at_pretraining_says_how_to_make_one(tmp_path, store):
    src, _ = store
    cfg = folder_cfg(src, "predecoded", f"data.predecoded_dir={tmp_path / 'nowhere'}")
    with pytest.raises(DatasetNotFoundError, match="python -m mae predecode"):
        build_pretrain_input(cfg, "cpu")


def test_cli_converts_and_refuses_to_overwrite(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    make_folder(src)
    out = tmp_path / "store"
    assert main(["predecode", "--data-dir", str(src), "--out", str(out), "--short-side", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["count"] == 5 and printed["short_side"] is None and printed["classes"] == 2
    assert PredecodedImages(out)[0][0].shape == (1, 60, 80)  # 0: full size; the default model's 1 channel
    assert main(["predecode", "--data-dir", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["predecode", "--data-dir", str(src)]) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(["predecode", "--data-dir", str(src), "--out", str(tmp_path / "other"), "--workers", "-1"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err and not list(tmp_path.glob("other*"))
    # a config switched to the pipeline before its store exists (the order the ImageNet config's comment gives):
    # --out is the store to make, and the folder named "in #2" is that folder, not "in"
    spec = tmp_path / "exp.yaml"
    spec.write_text("data:\n  dataset: imagefolder\n  pipeline: predecoded\n")
    assert main(["predecode", "--config", str(spec), "--data-dir", str(src), "--out", str(tmp_path / "in #2")]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 5 and (tmp_path / "in #2").is_dir()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pipeline_from_pinned_batches_matches_the_cpu(store):
    src, out = store
    cfg = folder_cfg(src, "predecoded", f"data.predecoded_dir={out}")
    results = {}
    for device in ("cpu", "cuda"):
        dataset, collate, to_batch = build_pretrain_input(cfg, device)
        loader = DataLoader(dataset, batch_size=5, collate_fn=collate, num_workers=1, pin_memory=device == "cuda")
        batch = next(iter(loader))
        assert batch.data.is_pinned() == (device == "cuda")
        results[device] = to_batch(batch)
    assert results["cuda"][0].device.type == "cuda"
    torch.testing.assert_close(results["cuda"][0].cpu(), results["cpu"][0], atol=1e-3, rtol=0)
    assert torch.equal(results["cuda"][1], results["cpu"][1])


def test_a_store_that_does_not_fit_the_run_is_named_in_a_warning(store, tmp_path, caplog):
    src, folder = store  # made from src at shorter side <= 40; folder_cfg's model takes 32 px
    with caplog.at_level(logging.WARNING, logger="mae.device_input"):
        build_pretrain_input(folder_cfg(src, "predecoded", f"data.predecoded_dir={folder}"), "cpu")
    assert "pre-decoded store" not in caplog.text  # its own folder, big enough
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="mae.device_input"):
        build_pretrain_input(folder_cfg(other, "predecoded", f"data.predecoded_dir={folder}", "model.img_size=64"),
                             "cpu")
    assert f"was made from {src.resolve()}, but data.data_dir's training images are {other.resolve()}" in caplog.text
    assert "shorter side of 40 px, below the model's img_size 64" in caplog.text
