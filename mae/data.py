"""Datasets: Fashion-MNIST (IDX files), ImageNet-style folders, synthetic tensors.

Every dataset yields (image (C, H, W) float, label int). Pretraining transforms are the
paper's: RandomResizedCrop(scale=(0.2, 1)) and a horizontal flip, nothing else.
"""

import functools
import gzip
import logging
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mae.config import ConfigError, ExperimentConfig, resolved_model_args

log = logging.getLogger(__name__)

DATA_DIR_ENV = "MAE_DATA_DIR"
FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # over the training split
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not where we looked; the message says how to install or point to it."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be read."""


# -- Fashion-MNIST -------------------------------------------------------------------


def _idx_stems(prefix: str) -> tuple[str, str]:
    """The names (without .gz) of a Fashion-MNIST split's image and label files; prefix train or t10k."""
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _fashion_mnist_folder(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Fashion-MNIST folder {root} does not exist. Install it with `sudo apt-get install "
            f"dataset-fashion-mnist` (into {FASHION_MNIST_DEFAULT}) or point --data-dir / "
            f"${DATA_DIR_ENV} (the Ray jobs: --set data.data_dir=...) at a folder holding the IDX files."
        )
    return root


def _idx_path(folder: Path, stem: str) -> Path:
    """The IDX file `stem`, plain or gzipped, in folder."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {folder}. Install the dataset with "
        f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, puts it in "
        f"{FASHION_MNIST_DEFAULT}), or point --data-dir / ${DATA_DIR_ENV} (config key "
        f"data.data_dir; the Ray jobs: --set data.data_dir=...) at a folder holding the four IDX files."
    )


def _open_idx(folder: Path, stem: str) -> bytes:
    path = _idx_path(folder, stem)
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream inside the .gz
        raise CorruptDatasetError(f"{path} is unreadable ({e}); reinstall or re-download it") from e


def read_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (the MNIST format): big-endian magic, dims, then uint8 values."""
    if len(data) < 4:
        raise CorruptDatasetError(f"{source} is truncated ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise CorruptDatasetError(f"{source} is not a uint8 IDX file (bad magic)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(f"{source} is truncated ({len(data)} bytes, inside its {header}-byte header); "
                                  "reinstall or re-download it")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise CorruptDatasetError(
            f"{source} should hold {expected} values of shape {shape}, has {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def resolve_data_dir(data_dir: str | None, default: str | None) -> Path:
    """Config value, then $MAE_DATA_DIR, then the dataset's default place."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or default
    if chosen is None:
        raise DatasetNotFoundError(f"no data directory: set data.data_dir, --data-dir or ${DATA_DIR_ENV}")
    return Path(chosen).expanduser()


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist by default)."""

    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(self, root: str | Path, train: bool = True, transform=None, subset: int | None = None):
        root = _fashion_mnist_folder(Path(root))
        prefix = "train" if train else "t10k"
        image_file, label_file = _idx_stems(prefix)
        images = read_idx(_open_idx(root, image_file), f"{prefix} images in {root}")
        labels = read_idx(_open_idx(root, label_file), f"{prefix} labels in {root}")
        if len(images) != len(labels):
            raise CorruptDatasetError(f"{root}: {len(images)} {prefix} images but {len(labels)} labels")
        if subset is not None:
            images, labels = images[:subset], labels[:subset]
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        img = self.transform(img) if self.transform else img.float() / 255
        return img, int(self.labels[i])


# -- ImageFolder ---------------------------------------------------------------------

# what an unreadable image raises; DecompressionBombError (an image of more than 2 x PIL's MAX_IMAGE_PIXELS,
# about 358 M pixels, as a crafted header can claim) derives from Exception, not OSError
PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_pil(source: str | Path | BinaryIO, mode: str) -> Image.Image:
    """Decode an image file (a path or a file object) with PIL, fully, in mode "RGB" or "L".

    Raises one of PIL_ERRORS when the file is not a readable image.
    """
    with Image.open(source) as im:
        if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
            # 16-bit greyscale: PIL's convert clips at 255 rather than scaling, which whitens
            # nearly every pixel; scale 0..65535 to 0..255 first
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8), "L")
        return im.convert(mode)  # forces a full decode: truncation shows here


def decode_pil(source: str | Path | BinaryIO, mode: str) -> torch.Tensor:
    """`read_pil` as a (C, H, W) uint8 tensor."""
    return v2.functional.pil_to_tensor(read_pil(source, mode))


class ImageFolder(Dataset):
    """root/<class>/<image>, ImageNet layout. Unreadable images are skipped and logged.

    A corrupt file yields None from __getitem__; `collate_skip_none` drops it from the
    batch. `skipped` counts them in this process (workers keep their own counts; every
    skip is logged with its path either way).
    """

    def __init__(self, root: str | Path, transform=None, in_chans: int = 3):
        root = Path(root)
        self.classes = class_folders(root)
        self.samples = [
            (path, label)
            for label, cls in enumerate(self.classes)
            for path in sorted((root / cls).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not self.samples:
            raise DatasetNotFoundError(f"image folder {root} holds no images with suffixes {IMAGE_SUFFIXES}")
        self.transform = transform
        self.mode = "L" if in_chans == 1 else "RGB"
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[i]
        try:
            img = decode_pil(path, self.mode)  # (C, H, W) uint8
        except PIL_ERRORS as e:
            self.skipped += 1
            log.warning("skipping unreadable image %s (%s); %d skipped so far", path, e, self.skipped)
            return None
        img = self.transform(img) if self.transform else img.float() / 255
        return img, label


def class_folders(root: Path) -> list[str]:
    """The class sub-folders of an ImageFolder root, sorted; raises DatasetNotFoundError without any."""
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist; set data.data_dir (--set data.data_dir=..., or --data-dir / "
            f"${DATA_DIR_ENV}) to an ImageNet-style tree root/<class>/<image>"
        )
    try:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    except OSError as e:  # e.g. no permission to list it
        raise DatasetNotFoundError(f"image folder {root} cannot be listed ({e}); check its permissions") from e
    if not classes:
        raise DatasetNotFoundError(f"image folder {root} has no class sub-folders (root/<class>/<image>)")
    return classes


def collate_skip_none(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Default collation after dropping samples that failed to load."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device | str,
                persistent: bool = False) -> torch.utils.data.DataLoader:
    """An evaluation split in order, unreadable images dropped, decoded in `num_workers`
    worker processes (data.num_workers, as for training) rather than in the training
    process, which the probe and fine-tuning hold up after every epoch otherwise: one
    process of this project's CPU machine read 420-500 500x375 JPEGs/s through the eval
    transform (2 workers: 800), so about 2 minutes for ImageNet's 50,000. persistent: keep
    the workers between passes (per-epoch evaluation) instead of starting them each time.
    Its own generator: the seed a DataLoader draws for its workers on each new pass (once,
    with persistent workers) does not come from the global RNG, so evaluating leaves the
    training's random draws, and a resumed run's, as they were.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda", persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator(),
    )


# -- synthetic -----------------------------------------------------------------------


class SyntheticImages(Dataset):
    """Deterministic random images (same index, same image); labels cycle over 10 classes."""

    def __init__(self, size: int, img_size: int, in_chans: int, seed: int = 0):
        self.size, self.shape, self.seed = size, (in_chans, img_size, img_size), seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.shape, generator=g), i % 10


# -- transforms and the builder --------------------------------------------------------


def pretrain_transform(img_size: int, mean, std, scale_min: float = 0.2, hflip: bool = True,
                       randaug: str | None = None) -> v2.Compose:
    """The paper's pretraining augmentation, on uint8 (C, H, W) tensors.

    randaug: a timm RandAugment spec applied after the flip, as fine-tuning's recipe does
    (pretraining and the probe leave it None).
    """
    steps = [
        v2.RandomResizedCrop(img_size, scale=(scale_min, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if randaug is not None:
        steps += [v2.ToPILImage(), rand_augment(randaug, img_size, mean), v2.PILToTensor()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def rand_augment(spec: str, img_size: int, mean) -> Callable[[Image.Image], Image.Image]:
    """timm's RandAugment (PIL ops), set up as timm's `create_transform` sets it up for
    training, which the reference fine-tuning calls: translations up to 45% of the image,
    the dataset mean as fill colour, bicubic resampling. timm's rather than torchvision's
    because its spec ('rand-m9-mstd0.5-inc1': magnitude 9 with noise 0.5, the
    increasing-severity ops) is what the paper's Table 9 ran.
    """
    from timm.data import auto_augment

    hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean),
               "interpolation": Image.Resampling.BICUBIC}
    transform = auto_augment.rand_augment_transform(spec, hparams)
    for op in transform.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize as it ran on the Pillow of the reference's time: keeping 0 bits gives
    a black image. Pillow 13 raises instead, and timm's PosterizeIncreasing asks for 0 bits
    at magnitude 10, which 'm9-mstd0.5' draws for about 2% of its posterizes.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every channel 0
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(img_size: int, mean, std, crop_pct: float | None = None) -> v2.Compose:
    """Resize (short side int(img_size / crop_pct)) + centre crop, as the reference evaluates
    (facebookresearch/mae util/datasets.py): crop_pct 224/256 up to 224 px, 1.0 above."""
    if crop_pct is None:
        crop_pct = 224 / 256 if img_size <= 224 else 1.0
    return v2.Compose([
        v2.Resize(int(img_size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def normalization(cfg: ExperimentConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that the configured dataset's images are normalised with."""
    if cfg.data.dataset == "fashion_mnist":
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if cfg.data.dataset == "imagefolder":
        in_chans = resolved_model_args(cfg)["in_chans"]
        return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
    return (0.0,), (1.0,)  # synthetic: already standard normal


def fashion_mnist_root(cfg: ExperimentConfig) -> Path:
    """The folder of the Fashion-MNIST IDX files; checks that the model takes one channel."""
    in_chans = resolved_model_args(cfg)["in_chans"]
    if in_chans != 1:
        raise ConfigError(f"model.in_chans: Fashion-MNIST is greyscale: set model.in_chans=1 (got {in_chans})")
    return resolve_data_dir(cfg.data.data_dir, FASHION_MNIST_DEFAULT)


def imagefolder_root(cfg: ExperimentConfig, split: str) -> Path:
    """root/train or root/val of an ImageFolder tree, or root for both splits when it has
    neither (a warning says that the test split is then the training images)."""
    root = resolve_data_dir(cfg.data.data_dir, None)
    train, val = root / "train", root / "val"
    if train.is_dir() != val.is_dir():
        has, lacks = (train, val) if train.is_dir() else (val, train)
        raise DatasetNotFoundError(f"{root} has {has.name}/ but no {lacks.name}/: put the "
                                   f"{'held-out' if lacks is val else 'training'} images in {lacks}, one folder per "
                                   "class, or point data.data_dir at a folder of class folders")
    if not train.is_dir():
        if root.is_dir():  # a missing folder is ImageFolder's error to raise, without this warning first
            _warn_one_split(root)
        return root
    return train if split == "train" else val


@functools.cache
def _warn_one_split(root: Path) -> None:
    log.warning("%s has no train/ and val/ folders: both splits read its images, so test top-1 is measured on "
                "training images; put held-out images in %s/val (and the others in %s/train) for a held-out score",
                root, root, root)


def spread_subset(dataset: Dataset, k: int | None) -> Dataset:
    """k of the dataset's items, evenly spaced over it (the middle one of each n/k), in order;
    None: all.

    An ImageFolder (and a pre-decoded store, which keeps its order) lists its images class
    by class: its first k images would be the first few classes, and a quick probe on
    10,000 ImageNet images would see 8 of the 1,000 classes it is scored on. Evenly spaced,
    every class keeps its share. Fixed, not random: every run picks the same images, and every
    pipeline does while no image is unreadable (a store drops those, so its later picks shift).
    (Fashion-MNIST's files are in no class order; it keeps its first k.)
    """
    n = len(dataset)
    if k is None or k >= n:
        return dataset
    return torch.utils.data.Subset(dataset, spread_indices(n, k))


def spread_indices(n: int, k: int) -> list[int]:
    """k of range(n), evenly spaced: the middle one of each n/k (k <= n), in order."""
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def held_out_split(dataset: Dataset, n_fit: int, n_held_out: int | None) -> tuple[Dataset, Dataset]:
    """Two disjoint subsets of a training split: n_fit images to fit on and n_held_out to score
    on (None: as many as n_fit), both spread over the split as `spread_subset`'s, so an
    ImageFolder's classes keep their shares in each. Fixed: every run holds out the same
    images. A split with fewer than n_fit + n_held_out images gives both their share of it
    (as a subset larger than its data set takes all of it), with a warning."""
    n = len(dataset)
    n_held_out = n_fit if n_held_out is None else n_held_out
    if n < 2:
        raise ConfigError(f"the training split has {n} image(s); the quick probe (probe.quick_split val) fits on "
                          "some and scores the others: give it more, or set probe.quick_split=test")
    if n_fit + n_held_out > n:
        wanted = (n_fit, n_held_out)
        n_fit = min(n - 1, max(1, n * n_fit // (n_fit + n_held_out)))
        n_held_out = n - n_fit
        log.warning("the quick probe asks for %d + %d images (probe.quick_train_size + quick_test_size) of a "
                    "training split of %d: it fits on %d and scores %d", *wanted, n, n_fit, n_held_out)
    m = n_fit + n_held_out
    picks = spread_indices(n, m)
    held = set(spread_indices(m, n_held_out))  # spread over the picks
    return (torch.utils.data.Subset(dataset, [picks[i] for i in range(m) if i not in held]),
            torch.utils.data.Subset(dataset, [picks[i] for i in sorted(held)]))


def check_dataset(cfg: ExperimentConfig, splits: tuple[str, ...] = ("train",)) -> None:
    """A cheap look, before any work starts (the Ray jobs call it before starting Ray), that the
    configured dataset is where the config says, for the splits the job reads: Fashion-MNIST's IDX
    files, an ImageFolder's class folders, or (data.pipeline predecoded) the store for the
    training images. Raises DatasetNotFoundError (or ConfigError) with what to change; the files'
    contents are read, and checked, when the datasets are built."""
    if cfg.data.dataset == "fashion_mnist":
        root = _fashion_mnist_folder(fashion_mnist_root(cfg))
        for split in splits:
            for stem in _idx_stems("train" if split == "train" else "t10k"):
                _idx_path(root, stem)
    elif cfg.data.dataset == "imagefolder":
        for split in splits:
            if split == "train" and cfg.data.pipeline == "predecoded" and cfg.data.predecoded_dir:
                store = Path(cfg.data.predecoded_dir).expanduser()
                if not store.is_dir():
                    raise DatasetNotFoundError(f"data.predecoded_dir {store} does not exist; write the store with "
                                               "`python -m mae predecode`, or set data.predecoded_dir to it")
            else:
                class_folders(imagefolder_root(cfg, split))


def build_dataset(cfg: ExperimentConfig, split: str = "train", augment: bool = True,
                  subset: int | None = None, scale_min: float | None = None, randaug: str | None = None) -> Dataset:
    """The configured dataset's 'train' or 'test' split, with pretraining or eval transforms.

    subset: how many images (None: all); Fashion-MNIST's first ones, an ImageFolder's
    spread over its classes (`spread_subset`).
    scale_min: the training crops' smallest area fraction (default data.crop_scale_min).
    randaug: a timm RandAugment spec for the training crops (fine-tuning's); None: none.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    args = resolved_model_args(cfg)
    img_size, in_chans = args["img_size"], args["in_chans"]
    d = cfg.data
    scale_min = d.crop_scale_min if scale_min is None else scale_min
    if d.dataset == "synthetic":
        size = d.synthetic_size if split == "train" else max(1, d.synthetic_size // 4)
        return SyntheticImages(subset or size, img_size, in_chans, seed=0 if split == "train" else 1)
    if d.dataset == "fashion_mnist":
        root = fashion_mnist_root(cfg)
        mean, std = normalization(cfg)
        if split == "train" and augment:
            tf = pretrain_transform(img_size, mean, std, scale_min, d.hflip, randaug)
        else:
            # bicubic, as the training crops and the reference's evaluation (a no-op at the native 28 px)
            tf = v2.Compose([v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                             v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        return FashionMNIST(root, train=split == "train", transform=tf, subset=subset)
    folder = imagefolder_root(cfg, split)
    mean, std = normalization(cfg)
    if split == "train" and augment:
        tf = pretrain_transform(img_size, mean, std, scale_min, d.hflip, randaug)
    else:
        tf = eval_transform(img_size, mean, std)
    return spread_subset(ImageFolder(folder, transform=tf, in_chans=in_chans), subset)
