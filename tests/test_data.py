import gzip
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mae.config import load_config, replace
from mae.data import (
    CorruptDatasetError, DatasetNotFoundError, FashionMNIST, ImageFolder, build_dataset,
    collate_skip_none, eval_loader, eval_transform, normalization, read_idx,
)
from mae.device_input import build_train_input


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    cfg = load_config(None, [f"data.data_dir={tmp_path / 'nowhere'}"])
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        build_dataset(cfg, "train")
    assert "MAE_DATA_DIR" in str(e.value) and "--data-dir" in str(e.value)


def test_missing_file_in_existing_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(tmp_path)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_idx_reader_and_truncation(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    ds = FashionMNIST(tmp_path, train=True)
    assert len(ds) == 3 and ds[1][1] == 2
    assert torch.allclose(ds[2][0][0] * 255, torch.from_numpy(imgs[2]).float())
    with pytest.raises(CorruptDatasetError, match="should hold"):
        read_idx(gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[:-10])
    with pytest.raises(CorruptDatasetError, match="inside its 16-byte header"):
        read_idx(gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[:7])
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorruptDatasetError, match="unreadable"):
        FashionMNIST(tmp_path, train=True)
    # a gzip header intact, the deflate stream damaged: zlib's own error, not OSError
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    damaged = bytearray((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    damaged[10:14] = b"\xff\xff\xff\xff"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bytes(damaged))
    with pytest.raises(CorruptDatasetError, match="unreadable"):
        FashionMNIST(tmp_path, train=True)


def test_real_fashion_mnist_splits(fashion_mnist_dir):
    cfg = load_config(None, [f"data.data_dir={fashion_mnist_dir}"])
    train = build_dataset(cfg, "train")
    test = build_dataset(cfg, "test", augment=False)
    assert (len(train), len(test)) == (60000, 10000)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    assert sorted(torch.unique(test.labels).tolist()) == list(range(10))
    # what the dataset returns is normalised with the training split's statistics (mean 0.2860,
    # std 0.3530 of pixels in [0, 1]): about mean 0 and std 1 on the test split too
    x = torch.stack([test[i][0] for i in range(0, len(test), 10)])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_fashion_mnist_evaluation_images_are_resized_bicubic_as_training_crops_are(fashion_mnist_dir):
    from torchvision.transforms import v2

    cfg = load_config(None, [f"data.data_dir={fashion_mnist_dir}", "model.img_size=32"])
    test = build_dataset(cfg, "test", augment=False, subset=4)
    raw = test.images[1]  # (1, 28, 28) uint8
    mean, std = normalization(cfg)
    for mode, same in ((v2.InterpolationMode.BICUBIC, True), (v2.InterpolationMode.BILINEAR, False)):
        expected = v2.functional.normalize(v2.functional.resize(raw, [32], interpolation=mode, antialias=True)
                                           .float() / 255, mean, std)
        assert torch.allclose(test[1][0], expected, atol=1e-5) == same, mode


def test_pretrain_augmentation_is_random_but_seedable(fashion_mnist_dir):
    cfg = load_config(None, [f"data.data_dir={fashion_mnist_dir}"])
    train = build_dataset(cfg, "train", subset=10)
    torch.manual_seed(0)
    a = train[3][0]
    b = train[3][0]
    torch.manual_seed(0)
    assert torch.equal(train[3][0], a)
    assert not torch.equal(a, b)


def test_imagefolder_skips_and_logs_corrupt_images(tmp_path, caplog, monkeypatch):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(tmp_path / cls / f"{i}.jpg")
    good = (tmp_path / "dog" / "0.jpg").read_bytes()
    (tmp_path / "dog" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    # PIL refuses an image of more than 2 x MAX_IMAGE_PIXELS as a decompression bomb (not an OSError); with
    # the limit lowered to 1,000 pixels, 100 x 100 is one, and the 40 x 30 images only warn
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (100, 100)).save(tmp_path / "cat" / "bomb.png")
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={tmp_path}",
                             "model.name=mae_vit_tiny_patch4", "model.img_size=32", "model.in_chans=3"])
    ds = build_dataset(cfg, "train")
    assert len(ds) == 7 and ds.classes == ["cat", "dog"]
    with caplog.at_level(logging.WARNING):
        batch = collate_skip_none([ds[i] for i in range(len(ds))])
    imgs, labels = batch
    assert imgs.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    assert ds.skipped == 3
    assert "broken.jpg" in caplog.text and "empty.png" in caplog.text and "bomb.png" in caplog.text


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_an_imagefolder_subset_spreads_over_its_classes(tmp_path, pipeline):
    # ImageFolder lists its files class by class: 3 classes x 4 images, 3 of them taken
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={tmp_path}", f"data.pipeline={pipeline}",
                             "model.name=mae_vit_tiny_patch4", "model.img_size=32", "model.in_chans=3"])
    test = build_dataset(cfg, "test", augment=False, subset=3)
    assert [test[i][1] for i in range(len(test))] == [0, 1, 2]
    train = build_train_input(cfg, "cpu", subset=3, scale_min=0.2)[0]  # pretraining's, the probe's, fine-tuning's
    assert [train[i][1] for i in range(len(train))] == [0, 1, 2]
    assert train.indices == test.indices == [2, 6, 10]  # the same images whatever reads them
    assert len(build_dataset(cfg, "test", augment=False, subset=12)) == 12


@pytest.mark.parametrize("img_size, resized", [(224, 256), (32, 36), (384, 384)])
def test_eval_resize_is_the_references(img_size, resized):
    # facebookresearch/mae util/datasets.py: short side int(size / crop_pct), crop_pct 224/256 up to 224 px, 1 above
    image = torch.zeros(3, 500, 600, dtype=torch.uint8)  # (C, H, W)
    tf = eval_transform(img_size, (0.5,) * 3, (0.5,) * 3)
    assert tf.transforms[0](image).shape == (3, resized, int(600 * resized / 500))
    assert tf(image).shape == (3, img_size, img_size)


def test_imagefolder_without_classes(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="class sub-folders"):
        ImageFolder(tmp_path)


def test_an_imagefolder_needs_both_splits_or_neither(tmp_path, caplog):
    from mae.data import imagefolder_root

    cfg = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={tmp_path}"])
    (tmp_path / "cat").mkdir()  # class folders at the top: both splits read them, with a warning
    with caplog.at_level(logging.WARNING, logger="mae.data"):
        assert imagefolder_root(cfg, "train") == imagefolder_root(cfg, "test") == tmp_path
    assert "test top-1 is measured on training images" in caplog.text
    (tmp_path / "train").mkdir()  # before: the test split was the root, with one class named "train"
    with pytest.raises(DatasetNotFoundError, match=f"has train/ but no val/: put the held-out images in {tmp_path}"):
        imagefolder_root(cfg, "test")
    (tmp_path / "val").mkdir()
    assert (imagefolder_root(cfg, "train"), imagefolder_root(cfg, "test")) == (tmp_path / "train", tmp_path / "val")


def test_16_bit_greyscale_pngs_are_scaled_not_clipped(tmp_path):
    from mae.data import decode_pil

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)  # a 16-bit gradient
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    for mode in ("L", "RGB"):
        pixels = decode_pil(tmp_path / "ramp.png", mode).float()
        assert pixels.mean() == pytest.approx(127.5, abs=1) and pixels.max() == 255  # clipped: mean 254.5
        assert torch.equal(pixels[0], torch.from_numpy(np.round(ramp / 257)).float())


class _Pids(torch.utils.data.Dataset):
    """Item i is (the reading process's pid, i), or None (an unreadable image) for i % 5 == 4."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return None if i % 5 == 4 else (torch.tensor(os.getpid()), i)


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_splits_are_read_in_order_by_the_configured_workers(workers):
    loader = eval_loader(_Pids(), batch_size=3, num_workers=workers, device="cpu", persistent=True)
    for _ in range(2):  # two passes, as two epochs' evaluations
        pids, order = map(torch.cat, zip(*loader))
        assert order.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]  # in order, the unreadable ones dropped
        assert (pids == os.getpid()).all() == (workers == 0)  # read in worker processes when asked
    assert loader.persistent_workers == (workers > 0)


def test_probes_and_finetuning_read_their_evaluation_images_with_data_num_workers(monkeypatch):
    import mae.finetune
    import mae.probe
    from mae.models import build_mae

    calls = []
    for module in (mae.probe, mae.finetune):
        monkeypatch.setattr(module, "eval_loader", lambda *a, **k: calls.append((a[2], k.get("persistent", False)))
                            or eval_loader(*a, **k))
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=64", "data.num_workers=1",
                             "model.name=mae_vit_micro_patch4", "model.img_size=28", "model.in_chans=1",
                             "probe.quick_train_size=32", "probe.quick_test_size=16", "probe.quick_epochs=2",
                             "finetune.epochs=1", "finetune.batch_size=16", "finetune.train_subset=32",
                             "finetune.test_subset=16"])
    model = build_mae("mae_vit_micro_patch4", img_size=28, in_chans=1)
    mae.probe.quick_probe(model, cfg, device="cpu")
    assert calls == [(1, False), (1, False)]  # features of the fitted and the held-out images, one pass each
    result = mae.finetune.finetune(cfg, model.state_dict(), device="cpu", progress=False)
    assert calls[2:] == [(1, True)] and 0.0 <= result.top1 <= 1.0  # kept across the epochs' evaluations


def test_the_dataset_check_finds_what_building_the_dataset_would_miss(tmp_path, fashion_mnist_dir):
    from mae.data import check_dataset

    check_dataset(load_config(None, [f"data.data_dir={fashion_mnist_dir}"]))  # all four IDX files there
    check_dataset(load_config(None, ["data.dataset=synthetic"]))  # nothing to find
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val").mkdir()  # no class folders: the test split would fail only when the probe builds it
    folder = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={tmp_path}", "model.in_chans=3"])
    check_dataset(folder)  # pretraining with the quick probe on held-out training images reads train/ only
    with pytest.raises(DatasetNotFoundError, match="val has no class sub-folders"):
        check_dataset(folder, ("train", "test"))
    (tmp_path / "val" / "cat").mkdir()
    check_dataset(folder, ("train", "test"))
    # the predecoded pipeline trains from its store, not from the raw images
    store = replace(folder, {"data.pipeline": "predecoded", "data.predecoded_dir": str(tmp_path / "store"),
                             "data.data_dir": str(tmp_path / "raw-moved-away")})
    with pytest.raises(DatasetNotFoundError, match="predecoded_dir .* does not exist"):
        check_dataset(store)
    (tmp_path / "store").mkdir()
    check_dataset(store)
