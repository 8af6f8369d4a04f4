"""mae.device_input on the CPU: crop boxes, the batched resize against torchvision, decoding,
unreadable files, seeding, and the `data.pipeline` switch. The CUDA paths (nvJPEG batch
decode, the kernels on the GPU) are checked by the gpu-marked test at the end."""

import io
import logging
import math
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

import mae.device_input
from mae.config import ConfigError, load_config
from mae.data import SyntheticImages, build_dataset, collate_skip_none
from mae.device_input import (
    AugmentOnDevice, DecodeAndAugment, DeviceAugment, EncodedBatch, Prefetcher, RawFashionMNIST,
    ToDevice, build_pretrain_input, collate_encoded, decode_jpegs, prefetch_depth, sample_crop_boxes,
)

RATIO = (3 / 4, 4 / 3)


def crop_boxes(H: int, W: int, n: int, seed: int = 0, scale=(0.2, 1.0)):
    g = torch.Generator().manual_seed(seed)
    return sample_crop_boxes(torch.full((n,), H), torch.full((n,), W), scale, RATIO, g)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with edges and mild noise: JPEG-like content, not white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([128 + 100 * np.sin(6 * x + seed), 128 + 100 * np.cos(5 * y), 255 * (x + y) / 2], -1)
    img[(x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05] = (230, 40, 60)  # a disc: a sharp edge
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, mode: str = "RGB", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# -- crop boxes ------------------------------------------------------------------------


def test_crop_boxes_lie_inside_the_image():
    sizes = [(1, 1), (2, 7), (7, 2), (3, 3), (28, 28), (375, 500), (500, 100), (10, 1000)]
    H = torch.tensor([s[0] for s in sizes]).repeat(300)
    W = torch.tensor([s[1] for s in sizes]).repeat(300)
    top, left, h, w = sample_crop_boxes(H, W, (0.2, 1.0), RATIO, torch.Generator().manual_seed(0))
    assert all(t.dtype == torch.int64 and t.shape == H.shape for t in (top, left, h, w))
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= H).all() and (left + w <= W).all()


def test_crop_area_and_aspect_ratio_within_ranges():
    # 300x400 has an allowed aspect ratio, so even the fallback (the whole image) is in range.
    # Sides are rounded to whole pixels: with sides >= sqrt(0.2 * 300 * 400 * 3/4) = 134 px,
    # rounding moves area and aspect ratio by under 0.75%; we allow 1%.
    H, W = 300, 400
    top, left, h, w = crop_boxes(H, W, 4000, scale=(0.2, 1.0))
    area, aspect = (h * w).double() / (H * W), w.double() / h
    assert area.min() >= 0.2 * 0.99 and area.max() <= 1.0
    assert aspect.min() >= RATIO[0] * 0.99 and aspect.max() <= RATIO[1] * 1.01
    # not degenerate: areas spread over the range, both orientations, corners anywhere
    assert area.min() < 0.25 and area.max() > 0.9 and area.std() > 0.15
    assert (aspect < 0.9).sum() > 400 and (aspect > 1.1).sum() > 400
    assert (top == 0).sum() < 400 and (left == 0).sum() < 400


def test_crop_boxes_follow_torchvisions_distribution():
    # Same algorithm, so the same distribution: means of 3,000 draws each agree within
    # about 4 standard errors (area fraction's std is ~0.22, log-aspect's ~0.17).
    H, W, n = 375, 500, 3000
    top, left, h, w = crop_boxes(H, W, n, seed=1)
    torch.manual_seed(1)
    img = torch.zeros(3, H, W)
    ref = torch.tensor([RandomResizedCrop.get_params(img, [0.2, 1.0], list(RATIO)) for _ in range(n)]).double()
    ours = torch.stack([top, left, h, w], 1).double()
    for name, f, tol in [
        ("area", lambda b: b[:, 2] * b[:, 3] / (H * W), 0.025),
        ("log aspect", lambda b: torch.log(b[:, 3] / b[:, 2]), 0.02),
        ("centre row", lambda b: (b[:, 0] + b[:, 2] / 2) / H, 0.015),
        ("centre column", lambda b: (b[:, 1] + b[:, 3] / 2) / W, 0.015),
    ]:
        assert abs(f(ours).mean() - f(ref).mean()) < tol, name


def test_elongated_images_fall_back_to_the_centre_crop():
    # No candidate of area >= 20% with aspect in [3/4, 4/3] fits 10 px of height (or width).
    top, left, h, w = sample_crop_boxes(torch.tensor([10, 1000]), torch.tensor([1000, 10]), (0.2, 1.0), RATIO,
                                        torch.Generator().manual_seed(0))
    # torchvision: h = H, w = round(H * 4/3) when too wide; w = W, h = round(W / (3/4)) when too tall
    assert (h.tolist(), w.tolist()) == ([10, 13], [13, 10])
    assert (top.tolist(), left.tolist()) == ([0, (1000 - 13) // 2], [(1000 - 13) // 2, 0])


# -- resampling and flip ---------------------------------------------------------------


def reference_crops(images, boxes, S):
    """torchvision's resized_crop of each box, bicubic + antialias, on float images, clamped as uint8 would be."""
    return torch.stack([
        TF.resized_crop(img.float(), t, l, hh, ww, [S, S], interpolation=TF.InterpolationMode.BICUBIC,
                        antialias=True).clamp(0, 255)
        for img, t, l, hh, ww in zip(images, *(b.tolist() for b in boxes))
    ])


def unnormalised(S: int, channels: int, seed: int, hflip: bool = False) -> DeviceAugment:
    """An augment whose Normalize is x -> x (std 1/255 undoes the /255), to compare pixel values."""
    return DeviceAugment(S, mean=(0.0,) * channels, std=(1 / 255,) * channels, hflip=hflip, seed=seed)


# Tolerance 1e-2 on the 0-255 scale: both sides compute the same separable weights in
# float32 and differ only in summation order (measured <= 2.3e-4); 1e-2 is 100x below one
# uint8 level, while a half-pixel shift or the unantialiased cubic (a=-0.75) moves these
# noise images by more than 10 levels.
ATOL = 1e-2


@pytest.mark.parametrize("S", [16, 28, 64])  # crops down-, same- and up-scaled
def test_batched_crop_equals_torchvision_resized_crop(S):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(24, 3, 40, 50, generator=g) * 255).round().to(torch.uint8)  # (N, C, H, W)
    out = unnormalised(S, 3, seed=7)(images)
    boxes = crop_boxes(40, 50, 24, seed=7)  # the augment's first draws from the same seed
    assert out.shape == (24, 3, S, S) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_crops(images, boxes, S), atol=ATOL, rtol=0)


def test_list_of_sizes_equals_torchvision_resized_crop():
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 50), (64, 48), (37, 91), (20, 20), (33, 34)]
    images = [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8) for h, w in sizes]
    out = unnormalised(32, 3, seed=3)(images)
    gen = torch.Generator().manual_seed(3)
    boxes = sample_crop_boxes(torch.tensor([h for h, _ in sizes]), torch.tensor([w for _, w in sizes]),
                              (0.2, 1.0), RATIO, gen)
    torch.testing.assert_close(out, reference_crops(images, boxes, 32), atol=ATOL, rtol=0)


def test_same_size_list_takes_the_batched_path_with_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(8, 3, 40, 50, generator=g) * 255).to(torch.uint8)
    expected = unnormalised(24, 3, seed=1)(images)

    def per_image(*args):
        raise AssertionError("a list of same-size images went through the per-image path")

    monkeypatch.setattr(mae.device_input, "resized_crops_each", per_image)
    as_list = unnormalised(24, 3, seed=1)(list(images))
    torch.testing.assert_close(as_list, expected, atol=ATOL, rtol=0)


def test_flip_mirrors_exactly_and_half_the_time():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(400, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    flipped = unnormalised(28, 1, seed=5, hflip=True)(images)
    plain = unnormalised(28, 1, seed=5, hflip=False)(images)  # same seed: same crops
    mirrored = torch.tensor([torch.equal(f, p.flip(-1)) for f, p in zip(flipped, plain)])
    same = torch.tensor([torch.equal(f, p) for f, p in zip(flipped, plain)])
    assert (mirrored | same).all()
    assert 160 < mirrored.sum() < 240  # p = 0.5; 400 draws: +-4 standard deviations


def test_normalisation_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 3, 40, 50, generator=g) * 255).to(torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = DeviceAugment(32, mean, std, seed=2)(images)
    pixels = DeviceAugment(32, (0.0,) * 3, (1 / 255,) * 3, seed=2)(images)
    torch.testing.assert_close(out, TF.normalize(pixels / 255, list(mean), list(std)), atol=1e-5, rtol=1e-5)


def test_same_seed_same_batch_and_resume_from_state():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(8, 3, 40, 50, generator=g) * 255).to(torch.uint8)
    a, b = DeviceAugment(32, (0.5,) * 3, (0.5,) * 3, seed=4), DeviceAugment(32, (0.5,) * 3, (0.5,) * 3, seed=4)
    assert torch.equal(a(images), b(images))
    assert not torch.equal(a(images), DeviceAugment(32, (0.5,) * 3, (0.5,) * 3, seed=5)(images))
    state = a.state_dict()
    nxt = a(images)
    c = DeviceAugment(32, (0.5,) * 3, (0.5,) * 3, seed=99)
    c.load_state_dict(state)
    assert torch.equal(c(images), nxt)


# -- decoding --------------------------------------------------------------------------


def pil_decode(data: bytes, mode: str) -> torch.Tensor:
    arr = np.array(Image.open(io.BytesIO(data)).convert(mode))
    return torch.from_numpy(arr).permute(2, 0, 1) if arr.ndim == 3 else torch.from_numpy(arr)[None]


# PIL and torchvision each bundle libjpeg-turbo: the same build decodes bit-identically
# (measured max 0 here); other builds' SIMD IDCT and chroma upsampling may differ by a
# level or two. GRAY from a colour JPEG is libjpeg's stored luma, where PIL recomputes L
# from clipped RGB: up to 9 levels apart on a few clipped pixels, mean 0.04. A swapped or
# misread channel is ~50 levels off on average.
@pytest.mark.parametrize("source, mode, max_diff, mean_diff", [
    ("RGB", "RGB", 2, 0.5), ("L", "RGB", 2, 0.5), ("CMYK", "RGB", 2, 0.5), ("RGB", "L", 12, 0.5), ("L", "L", 2, 0.5),
])
def test_decode_equals_pil(source, mode, max_diff, mean_diff):
    files = [jpeg_bytes(photo(75 + 10 * i, 100 - 7 * i, seed=i), source) for i in range(3)]
    images, kept = decode_jpegs([as_tensor(f) for f in files], "cpu", ImageReadMode.GRAY if mode == "L" else "RGB")
    assert kept == [0, 1, 2]
    for img, data in zip(images, files):
        ref = pil_decode(data, mode)
        assert img.dtype == torch.uint8 and img.shape == ref.shape  # channels: 3 for RGB, 1 for L
        diff = (img.int() - ref.int()).abs()
        assert diff.max() <= max_diff and diff.float().mean() <= mean_diff


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_other_formats_are_decoded_by_pil_in_the_models_channels(mode):
    files = []
    for fmt in ("PNG", "BMP", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(photo(30, 40)).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        files.append(buf.getvalue())
    images, kept = decode_jpegs([as_tensor(f) for f in files], "cpu", ImageReadMode.GRAY if mode == "L" else "RGB")
    assert kept == [0, 1, 2]
    for img, data in zip(images, files):
        assert torch.equal(img, pil_decode(data, mode))


def make_folder(root):
    """class a: two JPEGs, a PNG, a BMP; class b: one JPEG, a corrupt and a truncated one."""
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i in range(2):
        (root / "a" / f"{i}.jpg").write_bytes(jpeg_bytes(photo(60, 80, seed=i)))
    Image.fromarray(photo(50, 70, seed=5)).save(root / "a" / "photo.png")
    Image.fromarray(photo(40, 30, seed=6)).save(root / "a" / "photo.bmp")
    good = jpeg_bytes(photo(60, 80, seed=9))
    (root / "b" / "0.jpg").write_bytes(good)
    (root / "b" / "corrupt.jpg").write_bytes(good[:3] + bytes(np.random.default_rng(0).integers(0, 256, 4000,
                                                                                              dtype=np.uint8)))
    (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])


def folder_cfg(root, pipeline="device", *extra):
    return load_config(None, ["data.dataset=imagefolder", f"data.data_dir={root}", f"data.pipeline={pipeline}",
                              "model.name=mae_vit_micro_patch4", "model.img_size=32", "model.in_chans=3",
                              *extra])


def test_unreadable_files_skipped_with_their_path_png_and_bmp_decoded(tmp_path, caplog):
    make_folder(tmp_path)
    dataset, collate, to_batch = build_pretrain_input(folder_cfg(tmp_path), "cpu")
    assert len(dataset) == 7
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert isinstance(batch, EncodedBatch) and len(batch.paths) == 7
    with caplog.at_level(logging.WARNING, logger="mae.device_input"):
        imgs, labels = to_batch(batch)
    assert imgs.shape == (5, 3, 32, 32) and torch.isfinite(imgs).all()
    assert labels.tolist() == [0, 0, 0, 0, 1]  # a: 0.jpg 1.jpg photo.bmp photo.png; b: 0.jpg
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "mae.device_input"]
    assert len(skipped) == 2 and to_batch.skipped == 2
    assert any(str(tmp_path / "b" / "corrupt.jpg") in m for m in skipped)
    assert any(str(tmp_path / "b" / "truncated.jpg") in m for m in skipped)
    # the CPU pipeline keeps the same images
    cpu = build_dataset(folder_cfg(tmp_path, "cpu"), "train")
    assert collate_skip_none([cpu[i] for i in range(len(cpu))])[1].tolist() == labels.tolist()


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_pretraining_fills_batches_that_lost_unreadable_images(tmp_path, monkeypatch, pipeline):
    """7 files, 2 unreadable: the step still gets 7 images (the 5 good ones, repeated), so
    compiled steps and CUDA graphs see one shape; the epoch counts the 5 it read."""
    import mae.engine

    (tmp_path / "data").mkdir()
    make_folder(tmp_path / "data")
    shapes = []

    class Recording(mae.engine.TrainStep):
        def __call__(self, imgs, noise=None, update=True):
            shapes.append(tuple(imgs.shape))
            return super().__call__(imgs, noise, update)

    monkeypatch.setattr(mae.engine, "TrainStep", Recording)
    cfg = folder_cfg(tmp_path / "data", pipeline, "train.batch_size=7", "train.epochs=2", "train.progress=false",
                     "data.prefetch=1")
    result = mae.engine.pretrain(cfg, tmp_path / "run", device="cpu")
    assert shapes == [(7, 3, 32, 32)] * 2
    assert all(math.isfinite(e["train_loss"]) for e in result.epochs)
    assert result.images_per_sec == pytest.approx(2 * 5 / result.wall_time_s, rel=0.2)


@pytest.mark.parametrize("empty_at", [1, 0])
def test_a_wholly_unreadable_batch_is_stood_in_for_not_skipped(tmp_path, monkeypatch, caplog, empty_at):
    """Batch `empty_at` of every epoch lost all its images. Later in an epoch the previous
    batch stands in, so every rank keeps the same step count (DDP would hang otherwise);
    as an epoch's first batch it is a clear error."""
    import mae.engine

    build = mae.engine.build_pretrain_input

    def with_an_empty_batch(cfg, device, seed=None):
        dataset, collate, to_batch = build(cfg, device, seed)
        calls = []

        def emptied(batch):
            imgs, labels = to_batch(batch)
            calls.append(1)
            return (imgs[:0], labels[:0]) if (len(calls) - 1) % 3 == empty_at else (imgs, labels)

        return dataset, collate, emptied

    monkeypatch.setattr(mae.engine, "build_pretrain_input", with_an_empty_batch)
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=48", "train.batch_size=16",
                             "train.epochs=2", "train.progress=false", "model.name=mae_vit_micro_patch4"])
    if empty_at == 0:
        with pytest.raises(ValueError, match="no image of the first batch of epoch 1 could be read"):
            mae.engine.pretrain(cfg, tmp_path / "run", device="cpu")
        return
    with caplog.at_level(logging.WARNING, logger="mae.engine"):
        result = mae.engine.pretrain(cfg, tmp_path / "run", device="cpu")
    assert [e["step"] for e in result.epochs] == [3, 6]  # no step lost
    assert sum("training on the previous batch again" in r.getMessage() for r in caplog.records) == 2


def test_fill_batch_repeats_the_images_in_order():
    from mae.engine import fill_batch

    imgs = torch.arange(3.0)[:, None]
    assert fill_batch(imgs, 7)[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_device_pipeline_loader_is_reproducible(tmp_path):
    make_folder(tmp_path)

    def first_batch(seed):
        dataset, collate, to_batch = build_pretrain_input(folder_cfg(tmp_path, "device", f"train.seed={seed}"), "cpu")
        loader = DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collate, num_workers=1)
        return [to_batch(b)[0] for b in loader]

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_collate_keeps_each_file_intact():
    files = [b"\xff\xd8\xff\x00abc", b"", b"0123456789"]
    batch = collate_encoded([(as_tensor(f) if f else torch.empty(0, dtype=torch.uint8), i, f"p{i}")
                             for i, f in enumerate(files)] + [None])
    assert [bytes(t.tolist()) for t in batch.encoded()] == files
    assert batch.labels.tolist() == [0, 1, 2] and batch.paths == ["p0", "p1", "p2"]


def test_decode_mode_must_be_rgb_or_gray():
    with pytest.raises(ValueError, match="RGB or GRAY"):
        decode_jpegs([as_tensor(jpeg_bytes(photo(8, 8)))], "cpu", ImageReadMode.RGB_ALPHA)


# -- the data.pipeline switch ----------------------------------------------------------


def test_bogus_pipeline_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"data\.pipeline: must be one of \['cpu', 'device', 'predecoded'\], got 'bogus'"):
        load_config(None, ["data.pipeline=bogus"])


def test_fashion_mnist_device_pipeline_hands_raw_uint8_to_the_device(fashion_mnist_dir):
    extra = [f"data.data_dir={fashion_mnist_dir}", "data.train_subset=256"]
    dataset, collate, to_batch = build_pretrain_input(load_config(None, extra + ["data.pipeline=device"]), "cpu")
    assert isinstance(dataset, RawFashionMNIST) and len(dataset) == 256
    raw, labels = collate([dataset[i] for i in range(256)])
    assert raw.dtype == torch.uint8 and raw.shape == (256, 1, 28, 28)
    imgs, labels = to_batch((raw, labels))
    assert imgs.shape == (256, 1, 28, 28) and imgs.dtype == torch.float32
    # same normalisation as the CPU pipeline: batch statistics agree (crops differ)
    cpu_set, cpu_collate, cpu_to_batch = build_pretrain_input(load_config(None, extra), "cpu")
    torch.manual_seed(0)
    cpu_imgs, cpu_labels = cpu_to_batch(cpu_collate([cpu_set[i] for i in range(256)]))
    assert torch.equal(labels, cpu_labels)
    assert abs(imgs.mean() - cpu_imgs.mean()) < 0.1 and abs(imgs.std() - cpu_imgs.std()) < 0.1


def test_cpu_pipeline_and_synthetic_data_are_only_moved():
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=8", "data.pipeline=device"])
    dataset, collate, to_batch = build_pretrain_input(cfg, "cpu")
    assert isinstance(dataset, SyntheticImages)
    batch = collate([dataset[i] for i in range(8)])
    imgs, labels = to_batch(batch)
    assert torch.equal(imgs, batch[0]) and torch.equal(labels, batch[1])


# -- prefetching ------------------------------------------------------------------------


def raw_batches(n: int, size: int = 40):
    """n uint8 batches (4, 3, size, size) of different images, with labels."""
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(4) + i)
            for i in range(n)]


def augment_on_cpu(seed: int = 0):
    return AugmentOnDevice(DeviceAugment(16, (0.5,) * 3, (0.25,) * 3, device="cpu", seed=seed))


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetched_batches_equal_inline_ones_in_order(depth):
    batches = raw_batches(7)
    augment = augment_on_cpu()
    inline = [augment(b) for b in batches]  # one generator, drawn batch after batch
    with Prefetcher(batches, augment_on_cpu(), "cpu", depth) as prepared:
        ahead = list(prepared)
    assert len(ahead) == 7
    for (x, y), (a, b) in zip(inline, ahead):
        assert torch.equal(x, a) and torch.equal(y, b)
    assert list(Prefetcher(batches, augment_on_cpu(), "cpu", 0))[3][0].equal(inline[3][0])  # depth 0: inline


def test_prefetch_error_reaches_the_consumer_at_its_batch():
    def to_batch(batch):
        if batch[1][0] == 3:
            raise ValueError("bad batch 3")
        return batch

    seen = []
    prepared = Prefetcher(raw_batches(6), to_batch, "cpu", 2)
    with pytest.raises(ValueError, match="bad batch 3"):
        for _, labels in prepared:
            seen.append(int(labels[0]))
    assert seen == [0, 1, 2]
    with pytest.raises(StopIteration):
        next(prepared)
    prepared._thread.join(timeout=5)
    assert not prepared._thread.is_alive()


def test_closing_early_stops_the_thread_and_reads_only_depth_ahead():
    read = []

    def source():
        for i, batch in enumerate(raw_batches(50, size=8)):
            read.append(i)
            yield batch

    with Prefetcher(source(), lambda b: b, "cpu", depth=2) as prepared:
        first = next(prepared)
        time.sleep(0.3)  # let the thread run ahead as far as it may
    assert int(first[1][0]) == 0
    assert not prepared._thread.is_alive()
    assert len(read) <= 1 + 2 + 1  # the one consumed, `depth` queued, one in the thread's hands
    with pytest.raises(StopIteration):
        next(prepared)


def test_closing_does_not_hang_on_a_loader_that_hangs(caplog):
    release = threading.Event()

    def hung():
        yield from raw_batches(1, size=8)
        release.wait()  # a DataLoader worker that never answers
        yield from raw_batches(1, size=8)

    prepared = Prefetcher(hung(), lambda b: b, "cpu", depth=2)
    next(prepared)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="mae.device_input"):
        prepared.close(timeout=0.3)
    assert time.perf_counter() - start < 5
    assert prepared._thread.is_alive() and "still preparing a batch" in caplog.text
    release.set()  # the thread then finds close() was called and ends without queueing
    prepared._thread.join(timeout=5)
    assert not prepared._thread.is_alive()


def test_prefetch_setting_and_its_default():
    with pytest.raises(ConfigError, match=r"data\.prefetch: must be >= 0"):
        load_config(None, ["data.prefetch=-1"])
    assert prefetch_depth(load_config(), "cpu") == 0 and prefetch_depth(load_config(), "cuda") == 2
    assert prefetch_depth(load_config(None, ["data.prefetch=3"]), "cpu") == 3
    crops_here = ToDevice("cpu")  # the cpu pipeline's: the loader augmented the batch
    assert prefetch_depth(load_config(None, ["data.prefetch=3"]), "cpu", crops_here) == 0
    assert prefetch_depth(load_config(None, ["data.prefetch=3", "data.num_workers=1"]), "cpu", crops_here) == 3
    assert prefetch_depth(load_config(None, ["data.prefetch=3", "data.dataset=synthetic"]), "cpu", crops_here) == 3


# -- on a GPU --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_and_augment_match_the_cpu(tmp_path):
    files = [jpeg_bytes(photo(75 + 10 * i, 100 - 7 * i, seed=i)) for i in range(4)]
    corrupt = files[0][:3] + bytes(4000)
    encoded = [as_tensor(f) for f in files[:2]] + [as_tensor(corrupt)] + [as_tensor(f) for f in files[2:]]
    on_gpu, kept = decode_jpegs(encoded, "cuda", "RGB", [f"f{i}" for i in range(5)])
    on_cpu, kept_cpu = decode_jpegs(encoded, "cpu", "RGB")
    assert kept == kept_cpu == [0, 1, 3, 4] and all(i.device.type == "cuda" for i in on_gpu)
    for g, c in zip(on_gpu, on_cpu):  # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's
        # torchvision's own test allows a mean of 2 on its images; on an H200 (torch 2.11, CUDA 13)
        # one of these gave 2.1. A wrong colour conversion or channel order differs by tens.
        assert (g.cpu().int() - c.int()).abs().float().mean() < 3.0
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out_gpu = DeviceAugment(32, mean, std, device="cuda", seed=0)(on_cpu)
    out_cpu = DeviceAugment(32, mean, std, device="cpu", seed=0)(on_cpu)
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-3, rtol=0)
    batch = torch.stack([img[:, :60, :60] for img in on_cpu])
    torch.testing.assert_close(DeviceAugment(24, mean, std, device="cuda", seed=1)(batch).cpu(),
                               DeviceAugment(24, mean, std, device="cpu", seed=1)(batch), atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetch_matches_inline_and_trains_under_cuda_graphs(tmp_path):
    """The side-stream thread hands over the batches inline decoding gives, and pretraining
    fed by it runs with CUDA graphs (torch.compile captures while the thread decodes)."""
    import mae.engine

    files = [jpeg_bytes(photo(60 + 5 * i, 80 - 3 * i, seed=i)) for i in range(16)]
    batches = [collate_encoded([(as_tensor(f), 0, f"f{i}") for i, f in enumerate(files[k:k + 4])])
               for k in range(0, 16, 4)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    inline_fn = DecodeAndAugment(DeviceAugment(32, mean, std, device="cuda", seed=0), ImageReadMode.RGB)
    inline = [inline_fn(b)[0] for b in batches]
    with Prefetcher(batches, DecodeAndAugment(DeviceAugment(32, mean, std, device="cuda", seed=0),
                                              ImageReadMode.RGB), "cuda", 2) as prepared:
        ahead = [imgs.clone() for imgs, _ in prepared]
    for x, y in zip(inline, ahead):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)

    (tmp_path / "data").mkdir()
    for k in range(64):
        folder = tmp_path / "data" / f"c{k % 2}"
        folder.mkdir(exist_ok=True)
        (folder / f"{k}.jpg").write_bytes(files[k % 16])
    cfg = folder_cfg(tmp_path / "data", "device", "train.batch_size=16", "train.epochs=2", "train.device=cuda",
                     "train.compile=true", "train.compile_mode=reduce-overhead", "data.prefetch=2",
                     "data.num_workers=2", "train.progress=false")
    result = mae.engine.pretrain(cfg, tmp_path / "run")
    assert all(math.isfinite(e["train_loss"]) for e in result.epochs) and len(result.epochs) == 2


# -- the benchmark ---------------------------------------------------------------------


def test_input_pipeline_benchmark_smoke(tmp_path):
    """benchmarks/input_pipeline.py runs each arm end to end at toy size and writes its JSON (in a folder
    whose name holds " #", which YAML would read as a comment)."""
    import json

    from tests.conftest import load_benchmark

    bench = load_benchmark("input_pipeline")
    out = tmp_path / "bench.json"
    bench.main(["--num-images", "12", "--image-size", "64", "48", "--data-dir", str(tmp_path / "jpegs #1"),
                "--batch-size", "4", "--img-size", "16", "--workers", "0", "--steps", "2", "--input-batches", "2",
                "--warmup", "1", "--device", "cpu", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert len(list((tmp_path / "jpegs #1").rglob("*.jpg"))) == 12 and report["jpegs"]["mean_kb"] > 0
    assert report["results"]["device+prefetch"]["prefetch"] == 2 and report["results"]["device"]["prefetch"] == 0
    assert (tmp_path / "jpegs #1-predecoded-256" / "meta.json").is_file() and report["store"]["mb"] > 0
    sizes = {Image.open(p).size for p in (tmp_path / "jpegs #1").rglob("*.jpg")}
    assert sizes == {(64, 48), (48, 64)}  # batches mix sizes, as real folders' do
    assert report["results"]["cpu+prefetch"]["prefetch"] == 2 and report["results"]["cpu"]["prefetch"] == 0
    for name in ("cpu", "cpu+prefetch", "device", "device+prefetch", "predecoded", "predecoded+prefetch", "cpu+randaug"):
        arm = report["results"][name]
        assert arm["input"]["images"] == 2 * 4 and arm["end_to_end"]["images"] == 2 * 4
        assert arm["input"]["img_per_s"] > 0 and arm["ratio_end_to_end_over_synthetic"] > 0
