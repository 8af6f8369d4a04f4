"""A pre-decoded image store (`data.pipeline: predecoded`): decode the JPEGs once, read pixels after.

`python -m mae predecode` decodes an ImageFolder's training images once with PIL (the
CPU pipeline's decoder, so the same files are skipped as unreadable), shrinks each so
its shorter side is at most `short_side` (antialiased bicubic; smaller images are kept
as they are; the aspect ratio is kept, so RandomResizedCrop later sees the whole
picture), and writes them as raw uint8 into one file. Pretraining then reads each
image's bytes with a memory map in the DataLoader workers and augments the batch on the
training device with `mae.device_input.DeviceAugment`: no decoding at all while training.

Why it exists beside GPU decoding (`data.pipeline: device`): it costs no GPU time and no
host decode time per epoch; the price is a conversion pass and disk space, about
3 x short_side^2 x 4/3 bytes per 4:3 photo (262 KB at 256, about 335 GB for ImageNet-1k's
1.28M training images), and a resolution fixed at conversion time. Choose it when the
measurement in BENCHMARKS.md shows GPU decoding holding back the step.

Layout of a store folder:
    images.u8   every image's (C, H, W) uint8 pixels, back to back
    index.npz   offsets (N + 1,) int64 into images.u8, shapes (N, 3) int64, labels (N,) int64
    meta.json   format, count, bytes, channels, short_side, classes, source, skipped
The store is written into `<out>.partial` and renamed to `<out>` only when complete, so
an interrupted conversion never leaves something that looks like a store; meta.json's
byte count catches a store truncated later (a copy cut short).
"""

import datetime
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mae.config import ConfigError
from mae.data import PIL_ERRORS, CorruptDatasetError, DatasetNotFoundError, ImageFolder, read_pil

log = logging.getLogger(__name__)

FORMAT = "mae-predecoded-1"
# images per hand-over from a conversion worker; one by one, 2 workers converted 1,600-2,200
# small (64x48) JPEGs/s on this project's 2-core machine, the main process alone 4,900-8,000
CONVERT_BATCH = 64
IMAGES, INDEX, META = "images.u8", "index.npz", "meta.json"


def partial_path(out: Path) -> Path:
    """Where a conversion into `out` writes until it is complete."""
    return out.with_name(out.name + ".partial")


def shrink(img: Image.Image, short_side: int | None) -> Image.Image:
    """img with its shorter side reduced to short_side (bicubic, antialiased by PIL); never enlarged."""
    w, h = img.size
    if short_side is None or min(w, h) <= short_side:
        return img
    scale = short_side / min(w, h)
    size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
    return img.resize(size, Image.Resampling.BICUBIC)


class _Shrunk(Dataset):
    """An ImageFolder's images decoded and shrunk, in the conversion's DataLoader workers."""

    def __init__(self, folder: ImageFolder, short_side: int | None):
        self.folder, self.short_side = folder, short_side

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        path, label = self.folder.samples[i]
        try:
            img = shrink(read_pil(path, self.folder.mode), self.short_side)
        except PIL_ERRORS as e:
            return None, label, f"{path} ({e})"
        arr = np.asarray(img)  # (H, W) or (H, W, C)
        chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
        return torch.from_numpy(np.array(chw, order="C")), label, str(path)  # a contiguous, writable copy


def _collate_conversion(batch: list) -> tuple["PackedBatch | None", list[str]]:
    """In the conversion worker: the readable images packed as the training loaders pack them (one
    uint8 tensor, handed over through shared memory, leaving a short message in the pipe), and
    the unreadable ones' paths with the reason. As numpy arrays the pixels went through the
    pipe itself; a worker whose parent was killed then stayed blocked writing into the full
    pipe, forever, instead of noticing and exiting."""
    readable = [(img, label) for img, label, _ in batch if img is not None]
    return collate_packed(readable) if readable else None, [where for img, _, where in batch if img is None]


def write_store(source: str | Path, out: str | Path, short_side: int | None = 256, in_chans: int = 3,
                workers: int = 0) -> dict:
    """Convert the ImageFolder at `source` into a store at `out`; returns its meta.json values.

    workers: DataLoader processes that decode and shrink (0: in this process). Raises
    FileExistsError if `out` exists (nothing there is touched). On any error or an
    interrupt, the partial store is removed and `out` is not created.
    """
    source, out = Path(source), Path(out)
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be >= 1 or None (keep full size), got {short_side}")
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    folder = ImageFolder(source, in_chans=in_chans)  # DatasetNotFoundError names what to fix
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)  # left by an earlier interrupted run
    partial.mkdir(parents=True)
    try:
        offsets, shapes, labels, skipped = [0], [], [], 0
        # Workers hand over CONVERT_BATCH images at a time, packed into one tensor: one at a
        # time, the hand-over cost more than decoding a small image (see CONVERT_BATCH)
        loader = DataLoader(_Shrunk(folder, short_side), batch_size=CONVERT_BATCH, num_workers=workers,
                            collate_fn=_collate_conversion)
        with open(partial / IMAGES, "wb") as f:
            for packed, unreadable in loader:
                for where in unreadable:
                    skipped += 1
                    log.warning("skipping unreadable image %s; %d skipped so far", where, skipped)
                if packed is None:
                    continue
                for img in packed.images("cpu"):  # (C, H, W) views of the batch's one tensor
                    f.write(img.numpy())  # one image at a time: a batch's 16 MB in one write took 7x as long here
                    offsets.append(offsets[-1] + img.numel())
                    shapes.append(img.shape)
                labels.extend(packed.labels.tolist())
        if not labels:
            raise CorruptDatasetError(f"none of the {len(folder)} images in {source} could be read")
        np.savez(partial / INDEX, offsets=np.array(offsets, np.int64),
                 shapes=np.array(shapes, np.int64).reshape(-1, 3), labels=np.array(labels, np.int64))
        meta = {
            "format": FORMAT, "count": len(labels), "bytes": offsets[-1], "channels": in_chans,
            "short_side": short_side, "classes": folder.classes, "source": str(source.resolve()),
            "skipped": skipped, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (partial / META).write_text(json.dumps(meta, indent=1))
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return meta


class PredecodedImages(Dataset):
    """A store's images as (C, H, W) uint8 tensors with their labels, read through a memory map.

    The map is opened on first use in each process, so handing the dataset to DataLoader
    workers copies only the index. in_chans, when given, must match the store's channels.
    """

    def __init__(self, root: str | Path, in_chans: int | None = None):
        self.root = Path(root)
        redo = f"write it with `python -m mae predecode --data-dir <ImageFolder> --out {self.root}`"
        if not (self.root / META).is_file():
            interrupted = partial_path(self.root).exists()
            raise DatasetNotFoundError(
                f"no pre-decoded store at {self.root}"
                + (" (a conversion was interrupted: its .partial folder is beside it)" if interrupted else "")
                + f"; {redo}, or set data.predecoded_dir to an existing store")
        try:
            self.meta = json.loads((self.root / META).read_text())
            with np.load(self.root / INDEX, allow_pickle=False) as index:
                self.offsets, self.shapes, self.labels = index["offsets"], index["shapes"], index["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a cut-short index: BadZipFile
            raise CorruptDatasetError(f"pre-decoded store {self.root} is damaged ({e}); delete it and {redo}") from e
        if self.meta.get("format") != FORMAT:
            raise CorruptDatasetError(f"{self.root} is not a {FORMAT} store (format {self.meta.get('format')!r}); "
                                      f"{redo}")
        size = (self.root / IMAGES).stat().st_size if (self.root / IMAGES).is_file() else 0
        if size != self.meta["bytes"] or len(self.labels) != self.meta["count"] or self.offsets[-1] != size:
            raise CorruptDatasetError(
                f"pre-decoded store {self.root} is truncated or damaged: {IMAGES} holds {size} bytes, meta.json "
                f"says {self.meta['bytes']}; delete it and {redo}")
        if in_chans is not None and in_chans != self.meta["channels"]:
            raise ConfigError(f"{self.root} holds {self.meta['channels']}-channel images but model.in_chans is "
                             f"{in_chans}; convert again with `python -m mae predecode --channels {in_chans}`")
        self.classes = self.meta["classes"]
        self._pixels: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._pixels is None:
            self._pixels = np.memmap(self.root / IMAGES, dtype=np.uint8, mode="r")
        start, end = self.offsets[i], self.offsets[i + 1]
        pixels = np.array(self._pixels[start:end])  # a copy: the map is read-only
        return torch.from_numpy(pixels).view(*self.shapes[i].tolist()), int(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}  # a worker maps the file itself


class PackedBatch(NamedTuple):
    """A batch of images of different sizes in one flat tensor (one shared-memory segment per batch)."""

    data: torch.Tensor  # (sum of C * H_i * W_i,) uint8
    shapes: torch.Tensor  # (N, 3) int64: C, H_i, W_i
    labels: torch.Tensor  # (N,) int64

    def images(self, device: torch.device | str) -> list[torch.Tensor]:
        """The N images as (C, H_i, W_i) uint8 views of one copy of `data` on `device`."""
        shapes = self.shapes.tolist()
        flat = self.data.to(device, non_blocking=True)
        sizes = [c * h * w for c, h, w in shapes]
        return [part.view(*shape) for part, shape in zip(torch.split(flat, sizes), shapes)]


def collate_packed(batch: list[tuple[torch.Tensor, int]]) -> PackedBatch:
    images, labels = zip(*batch)
    return PackedBatch(torch.cat([img.reshape(-1) for img in images]),
                       torch.tensor([img.shape for img in images]), torch.tensor(labels))
