import gzip
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mae.config import load_config
from mae.data import (
    CorruptDatasetError, DatasetNotFoundError, FashionMNIST, ImageFolder, build_dataset,
    collate_skip_none, read_idx,
)


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
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
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
    # normalised with the training-split statistics
    assert abs(test.images.float().div(255).sub(0.2860).div(0.3530).mean().item()) < 0.05


def test_pretrain_augmentation_is_random_but_seedable(fashion_mnist_dir):
    cfg = load_config(None, [f"data.data_dir={fashion_mnist_dir}"])
    train = build_dataset(cfg, "train", subset=10)
    torch.manual_seed(0)
    a = train[3][0]
    b = train[3][0]
    torch.manual_seed(0)
    assert torch.equal(train[3][0], a)
    assert not torch.equal(a, b)


def test_imagefolder_skips_and_logs_corrupt_images(tmp_path, caplog):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(tmp_path / cls / f"{i}.jpg")
    good = (tmp_path / "dog" / "0.jpg").read_bytes()
    (tmp_path / "dog" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.data_dir={tmp_path}",
                             "model.name=mae_vit_tiny_patch4", "model.img_size=32", "model.in_chans=3"])
    ds = build_dataset(cfg, "train")
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    with caplog.at_level(logging.WARNING):
        batch = collate_skip_none([ds[i] for i in range(len(ds))])
    imgs, labels = batch
    assert imgs.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    assert ds.skipped == 2
    assert "broken.jpg" in caplog.text and "empty.png" in caplog.text


def test_imagefolder_without_classes(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="class sub-folders"):
        ImageFolder(tmp_path)
