"""Pretraining input that is decoded and augmented on the training device (`data.pipeline: device`).

The CPU pipeline (mae.data) decodes each JPEG with PIL and augments it in DataLoader
workers; on a fast GPU that caps the rate at what the host's cores decode. Here the
workers only read files; the main process hands the batch to the device, where
`torchvision.io.decode_jpeg` decodes the whole list in one nvJPEG call and
RandomResizedCrop, the flip and Normalize run as batched tensor ops. With device='cpu'
the same code runs on the CPU (in the main process, so slower than PIL workers there):
that is how it is tested. `Prefetcher` runs that decoding and augmenting in a background
thread, on its own CUDA stream, a few batches ahead of the training step
(`data.prefetch`), so the two overlap.

Why GPU decode rather than a pre-decoded format: it reads the ImageFolder as it is (no
conversion pass, no second copy of the data set several times the JPEGs' size, no
resolution fixed at conversion time) and leaves the host almost idle, so it scales with
GPUs per host. Its cost is GPU time spent decoding; `benchmarks/input_pipeline.py`
measures whether that stays within 10% of the synthetic-input step. `DeviceAugment`
does not care where its uint8 images come from: `data.pipeline: predecoded`
(mae.predecoded) feeds it from a store decoded once ahead of training, for when the
measurement says GPU decoding holds the step back.

Interpolation: bicubic with antialiasing, the CPU path's filter (torchvision v2
RandomResizedCrop(BICUBIC, antialias=True)), so switching pipelines does not change what
the model sees. The differences: no rounding to uint8 after the resize, and float rather
than torchvision's fixed-point uint8 kernel on the CPU, which also clamps to 0..255 between
its horizontal and vertical passes where bicubic overshoots. Measured on one random crop
resize (2026-11-29, torch 2.14.1): about 1/255 apart on smooth images, up to 19/255 at
single pixels of uniform noise, where the overshoot is largest.

Symbols: N images, C channels, H, W source height and width, S output side.
"""

import contextlib
import io
import logging
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from mae.config import ExperimentConfig, resolved_model_args
from mae.data import (
    PIL_ERRORS, DatasetNotFoundError, FashionMNIST, ImageFolder, build_dataset, collate_skip_none, decode_pil,
    fashion_mnist_root, imagefolder_root, normalization, pretrain_transform, spread_subset,
)
from mae.predecoded import PackedBatch, PredecodedImages, collate_packed

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker + the first byte of the next marker
CUBIC_A = -0.5  # Keys' cubic, as PIL and torch's antialiased bicubic (the unantialiased one uses -0.75)


# -- crop boxes ------------------------------------------------------------------------


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's boxes (torchvision's algorithm) for a whole batch at once.

    Per image, `attempts` candidates: area fraction uniform in `scale`, aspect ratio w/h
    log-uniform in `ratio`, sides rounded to integers. The first candidate that fits
    wins, its top-left corner uniform over the places where it fits. torchvision draws
    candidates until one fits; drawing all of them and taking the first that fits gives
    the same distribution without a Python loop. An image where none fits (a very
    elongated one) gets torchvision's fallback: the centred crop of the whole image,
    narrowed to the nearest allowed aspect ratio.

    heights, widths: (N,) integer sizes, on the CPU. Returns (top, left, h, w), each (N,)
    int64 on the CPU: a few numbers per image, which the per-image resize needs as
    Python ints, and a CPU generator gives the same boxes for a seed on every device.
    """
    H = torch.as_tensor(heights, dtype=torch.float64, device="cpu")  # (N,)
    W = torch.as_tensor(widths, dtype=torch.float64, device="cpu")
    N = H.shape[0]
    frac = torch.empty(N, attempts, dtype=torch.float64).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(N, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    corner = torch.rand(2, N, dtype=torch.float64, generator=generator)  # where the box sits, per axis

    target = (H * W)[:, None] * frac  # (N, attempts) areas in pixels
    aspect = log_r.exp()
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])  # (N, attempts)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)  # (N,)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)  # (N,)

    in_ratio = W / H
    r_min, r_max = min(ratio), max(ratio)
    w = torch.where(found, w, torch.where(in_ratio > r_max, torch.round(H * r_max), W))
    h = torch.where(found, h, torch.where(in_ratio < r_min, torch.round(W / r_min), H))
    # corner * (free + 1) < free + 1 in exact arithmetic; the clamp guards the float rounding
    top = torch.where(found, torch.minimum(torch.floor(corner[0] * (H - h + 1)), H - h), torch.floor((H - h) / 2))
    left = torch.where(found, torch.minimum(torch.floor(corner[1] * (W - w + 1)), W - w), torch.floor((W - w) / 2))
    return top.long(), left.long(), h.long(), w.long()


# -- resampling ------------------------------------------------------------------------


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = CUBIC_A); zero beyond |x| = 2."""
    a = CUBIC_A
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start: torch.Tensor, length: torch.Tensor, size: int, out_size: int) -> torch.Tensor:
    """(N, out_size, size): row i of image n resamples pixels [start, start + length) of an
    axis of `size` pixels to output pixel i, with antialiased bicubic weights.

    The same weights as torch's `interpolate(mode="bicubic", antialias=True,
    align_corners=False)` of the cropped axis: the kernel is stretched by the
    downscaling factor (that is the antialiasing), taps outside the crop are dropped
    and each row renormalised to sum to 1. start, length: (N,) on the output's device.
    """
    device = start.device
    scale = (length.float() / out_size)[:, None, None]  # (N, 1, 1) input pixels per output pixel
    stretch = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))  # downscaling widens the kernel
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5)[None, :, None]  # (N, S, 1)
    j = torch.arange(size, device=device, dtype=torch.float32)[None, None, :] - start.float()[:, None, None]
    inside = (j >= 0) & (j < length.float()[:, None, None])  # (N, 1, size): pixels of the crop
    w = _cubic((j + 0.5 - center) * stretch) * inside  # (N, S, size)
    return w / w.sum(dim=-1, keepdim=True)


def resized_crops_batched(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor,
                          w: torch.Tensor, out_size: int) -> torch.Tensor:
    """Crop box n of image n and resize it to out_size x out_size, for the whole batch.

    Resampling is linear and separable, so each output is Wy @ image @ Wx^T with the
    crop folded into the weight matrices: two batched matrix products, no per-image work.
    (With TF32 matmuls allowed the products carry ~1e-3 relative error: a tenth of a
    uint8 level.) images: (N, C, H, W) float; boxes (N,). Returns (N, C, S, S).
    """
    N, C, H, W = images.shape
    box = torch.stack([top, left, h, w]).to(images.device, non_blocking=True)  # (4, N)
    wy = resize_weights(box[0], box[2], H, out_size)  # (N, S, H)
    wx = resize_weights(box[1], box[3], W, out_size)  # (N, S, W)
    rows = torch.matmul(images, wx.transpose(1, 2)[:, None])  # (N, C, H, S)
    return torch.matmul(wy[:, None], rows)  # (N, C, S, S)


def resized_crops_each(images: list[torch.Tensor], top: torch.Tensor, left: torch.Tensor, h: torch.Tensor,
                       w: torch.Tensor, out_size: int) -> torch.Tensor:
    """Like `resized_crops_batched` for images of different sizes: one interpolate per image.

    Batching these would mean padding to the largest image in the batch (memory grows
    with its size: one 4000x3000 photo among 256 needs 37 GB in float) or a custom gather
    kernel; one antialiased-bicubic `interpolate` kernel per image on a view of its crop
    costs a few microseconds of launch each, which overlaps the previous step's GPU work.
    images: (C, H_i, W_i) uint8. Returns (N, C, S, S) float.
    """
    out = [
        F.interpolate(img[None, :, t:t + hh, l:l + ww].float(), size=(out_size, out_size), mode="bicubic",
                      align_corners=False, antialias=True)  # (1, C, S, S)
        for img, t, l, hh, ww in zip(images, top.tolist(), left.tolist(), h.tolist(), w.tolist())
    ]
    return torch.cat(out)


class DeviceAugment:
    """The paper's pretraining augmentation on a uint8 batch already on (or moved to) the device.

    RandomResizedCrop(img_size, scale, ratio 3/4-4/3, bicubic, antialias), a horizontal
    flip with p=0.5 (if hflip), /255 and Normalize(mean, std): what
    `mae.data.pretrain_transform` does per image in workers, done for a batch at once.

    A plain class, not an nn.Module: it has no parameters or buffers to register, is
    never part of the model, and its state is a CPU torch.Generator (seeded, so a run is
    reproducible; `state_dict` saves it for resuming).
    """

    def __init__(self, img_size: int, mean, std, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 device: torch.device | str = "cpu", seed: int = 0):
        self.img_size, self.scale, self.ratio, self.hflip = img_size, scale, ratio, hflip
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device)[None, :, None, None]  # (1, C, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device)[None, :, None, None]
        self._mul, self._sub = 1 / (255 * std_t), mean_t / std_t  # (x / 255 - mean) / std

    def __call__(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """images: uint8 (N, C, H, W), or a list of (C, H_i, W_i). Returns float (N, C, S, S) on the device."""
        if isinstance(images, list) and images and all(i.shape == images[0].shape for i in images):
            images = torch.stack(images)  # all one size (a pre-resized data set): the batched path
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):  # float32 weights and sums
            if isinstance(images, torch.Tensor):
                images = images.to(self.device, non_blocking=True)
                heights = torch.full((images.shape[0],), images.shape[-2])
                widths = torch.full((images.shape[0],), images.shape[-1])
            else:
                images = [img.to(self.device, non_blocking=True) for img in images]
                heights = torch.tensor([img.shape[-2] for img in images])
                widths = torch.tensor([img.shape[-1] for img in images])
            top, left, h, w = sample_crop_boxes(heights, widths, self.scale, self.ratio, self.generator)
            flip = torch.rand(len(heights), generator=self.generator) < 0.5  # drawn even without hflip: same crops
            if isinstance(images, torch.Tensor):
                out = resized_crops_batched(images.float(), top, left, h, w, self.img_size)
            else:
                out = resized_crops_each(images, top, left, h, w, self.img_size)
            if self.hflip:
                flip = flip.to(self.device, non_blocking=True)[:, None, None, None]
                out = torch.where(flip, out.flip(-1), out)
            # bicubic overshoots; the CPU path clamps by storing uint8
            return out.clamp_(0, 255).mul_(self._mul).sub_(self._sub)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


# -- decoding --------------------------------------------------------------------------


def _read_mode(mode: ImageReadMode | str) -> ImageReadMode:
    mode = ImageReadMode[mode.upper()] if isinstance(mode, str) else mode
    if mode not in (ImageReadMode.RGB, ImageReadMode.GRAY):
        raise ValueError(f"mode must be ImageReadMode.RGB or GRAY (the model's channels), got {mode}")
    return mode


def decode_jpegs(
    encoded: list[torch.Tensor],
    device: torch.device | str,
    mode: ImageReadMode | str = ImageReadMode.RGB,
    paths: list[str] | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Decode a batch of encoded images onto `device`; unreadable ones are dropped and logged.

    encoded: (B_i,) uint8 CPU tensors, the files' bytes. mode: RGB or GRAY, so grey and
    CMYK JPEGs come out with the model's channel count. Returns (images, kept): the
    (C, H_i, W_i) uint8 images on `device` and the indices into `encoded` they came from.

    JPEGs (told by their first bytes) go to `torchvision.io.decode_jpeg`: on CUDA all in
    one call (nvJPEG's batched decode); on the CPU one at a time, since torchvision 0.29
    decodes a CPU list in a Python loop anyway and one bad file would fail the whole
    list. If the CUDA call fails, each JPEG is retried alone. An image decode_jpeg cannot
    read, and any other format, is decoded with PIL on the CPU exactly as
    mae.data.ImageFolder does (not torchvision's decode_image, which reads neither BMP
    nor TIFF and returns 16-bit PNGs as uint16): so this pipeline skips exactly the
    images the CPU pipeline skips, with the same warning naming the path.
    """
    device = torch.device(device)
    mode = _read_mode(mode)
    pil_mode = "L" if mode == ImageReadMode.GRAY else "RGB"
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if bytes(data[:3].tolist()) == JPEG_MAGIC]
    if device.type == "cuda" and jpegs:
        # torchvision's CUDA decode allocates its outputs on this stream but writes them from
        # its own stream without waiting for this one, so it can overwrite memory just freed
        # here that queued kernels are still to read (pytorch/vision PR #9606). Drain the stream
        # first: in the prefetch thread it holds only input work, so the step runs on meanwhile
        # (inline, data.prefetch 0, the decode waits for the previous step to finish).
        torch.cuda.current_stream(device).synchronize()
        try:
            for i, img in zip(jpegs, decode_jpeg([encoded[i] for i in jpegs], mode=mode, device=device)):
                images[i] = img
        except RuntimeError as e:
            log.info("batched JPEG decode failed (%s); decoding one by one to find the bad file", e)
    retry = set(jpegs)
    for i, data in enumerate(encoded):
        if images[i] is not None:
            continue
        if i in retry:
            try:
                images[i] = decode_jpeg(data, mode=mode, device=device)
                continue
            except RuntimeError:
                pass  # PIL below tells corrupt from merely unsupported (e.g. CMYK on nvJPEG)
        try:
            images[i] = decode_pil(io.BytesIO(data.numpy().tobytes()), pil_mode).to(device)
        except PIL_ERRORS as e:
            where = paths[i] if paths is not None else f"#{i} of the batch"
            log.warning("skipping unreadable image %s (%s)", where, e)
    kept = [i for i, img in enumerate(images) if img is not None]
    return [images[i] for i in kept], kept


# -- data sets and collation ------------------------------------------------------------


class EncodedImageFolder(ImageFolder):
    """mae.data.ImageFolder's samples (same discovery), yielded undecoded: (bytes, label, path).

    bytes: the file's contents as a (B,) uint8 tensor. A file that cannot be read yields
    None (dropped by `collate_encoded`); one that cannot be decoded is dropped later, by
    `decode_jpegs`, in the main process.
    """

    def __init__(self, root, in_chans: int = 3):
        super().__init__(root, transform=None, in_chans=in_chans)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str] | None:
        path, label = self.samples[i]
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as e:
            self.skipped += 1
            log.warning("skipping unreadable image %s (%s); %d skipped so far", path, e, self.skipped)
            return None
        return torch.from_numpy(data), label, str(path)


class EncodedBatch(NamedTuple):
    """A batch of encoded files, stored back to back in one tensor.

    One tensor rather than a list of N: a DataLoader worker sends each tensor through its
    own shared-memory segment, so one per batch is cheaper than one per image.
    """

    data: torch.Tensor  # (sum of B_i,) uint8, the files' bytes back to back
    sizes: torch.Tensor  # (N,) int64, bytes per file
    labels: torch.Tensor  # (N,) int64
    paths: list[str]

    def encoded(self) -> list[torch.Tensor]:
        """The N files as (B_i,) uint8 views of `data`."""
        return list(torch.split(self.data, self.sizes.tolist()))


def collate_encoded(batch: list[tuple[torch.Tensor, int, str] | None]) -> EncodedBatch:
    """Pack (bytes, label, path) samples into an EncodedBatch, dropping those that failed to read."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return EncodedBatch(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                            torch.empty(0, dtype=torch.long), [])
    data, labels, paths = zip(*batch)
    return EncodedBatch(torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(labels), list(paths))


class RawFashionMNIST(FashionMNIST):
    """Fashion-MNIST yielding raw uint8 (1, 28, 28) images: no per-sample work in the workers."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


# -- from a loader's batch to the model's input ------------------------------------------


class ToDevice:
    """to_batch of an already augmented batch: move the images to the device."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labels = batch
        return imgs.to(self.device, non_blocking=True), labels


class AugmentOnDevice:
    """to_batch of a raw uint8 (N, C, H, W) batch: augment it on the device."""

    def __init__(self, augment: DeviceAugment):
        self.augment = augment

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labels = batch
        return self.augment(imgs), labels


class DecodeAndAugment:
    """to_batch of an EncodedBatch: decode on the device, drop unreadable files, augment.

    `skipped` counts the images dropped here (the workers count files they could not read).
    """

    def __init__(self, augment: DeviceAugment, mode: ImageReadMode):
        self.augment, self.mode = augment, mode
        self.skipped = 0

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        images, kept = decode_jpegs(batch.encoded(), self.augment.device, self.mode, batch.paths)
        self.skipped += len(batch.paths) - len(kept)
        labels = batch.labels[kept]
        if not images:
            channels = 1 if self.mode == ImageReadMode.GRAY else 3
            S = self.augment.img_size
            return torch.empty(0, channels, S, S, device=self.augment.device), labels
        return self.augment(images), labels


class UnpackAndAugment:
    """to_batch of a PackedBatch from a pre-decoded store: one copy to the device, then augment."""

    def __init__(self, augment: DeviceAugment):
        self.augment = augment

    def __call__(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(batch.images(self.augment.device)), batch.labels


class Prefetcher:
    """Runs `to_batch` on the coming batches in a background thread, `depth` batches ahead.

    Inline, fetching, decoding and augmenting the next batch and the training step take
    turns, so each waits for the other. Here one thread prepares batches while the main
    thread trains. On CUDA it issues its work on its own stream,
    so copies, decoding and resizing overlap the training kernels; before a batch is
    handed over, the consumer's stream waits on an event recorded after that batch's
    work, and its tensors are marked as used on the consumer's stream (record_stream) so
    the caching allocator does not hand their memory back to the side stream too early.
    torch.compile's CUDA graphs capture in thread-local mode, so this thread's work on
    another stream does not break a capture.

    One thread calls to_batch on the batches in their order, so a seeded augmentation
    draws exactly what inline calls draw: results do not depend on `depth`. It runs
    with the main thread's number of intra-op threads (a new thread's OpenMP default is
    every core, which would oversubscribe them). An exception in the loader or in
    to_batch is raised to the consumer at that batch. `close()` (or leaving the `with`
    block) stops the thread and drops prepared batches. depth=0 prepares each batch
    inline, on demand: no thread, no stream.
    """

    _DONE = object()

    def __init__(self, batches: Iterable, to_batch: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device | str, depth: int = 2):
        if depth < 0:
            raise ValueError(f"depth must be >= 0 (0: inline), got {depth}")
        self.device, self.depth = torch.device(device), depth
        self._batches, self._to_batch = iter(batches), to_batch
        if depth == 0:
            return
        self._stream = None
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            self._stream = torch.cuda.Stream(self.device)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(torch.get_num_threads(),), daemon=True,
                                        name="mae-prefetch")
        self._thread.start()

    def _work(self, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                while not self._stop.is_set():  # checked before each read: close() reads no more
                    try:
                        batch = next(self._batches)
                    except StopIteration:
                        break
                    out = self._to_batch(batch)
                    event = None
                    if self._stream is not None:
                        event = torch.cuda.Event()
                        event.record(self._stream)
                    if not self._put((out, event)):
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._put(e)
            return
        self._put(self._DONE)

    def _put(self, item: Any) -> bool:
        """Queue item, waiting for room; False once close() was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.depth == 0:
            return self._to_batch(next(self._batches))
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(item)  # a later next() stops too
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(self._DONE)
            raise item
        out, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in out:
                if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                    t.record_stream(stream)
        return out

    def close(self, timeout: float = 60.0) -> None:
        """Stop the thread (after the batch it is preparing) and drop what it prepared.

        Waits at most `timeout` seconds for that batch: a thread stuck in a hung loader
        is left behind with a warning (it is a daemon, and reads no further batch)
        rather than hanging the caller, which is usually on its way out with an error.
        """
        if self.depth == 0 or self._stop.is_set():
            return
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive():
            if time.monotonic() > deadline:
                log.warning("the prefetch thread is still preparing a batch after %.0f s (a hung DataLoader "
                            "worker?); leaving it behind", timeout)
                return
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetch_depth(cfg: ExperimentConfig, device: torch.device | str, to_batch: Callable | None = None) -> int:
    """data.prefetch, or its default: 2 batches ahead on CUDA, inline (0) elsewhere.

    On a CPU the thread's kernels would share the cores with the step's, which costs
    more than the overlap gains (BENCHMARKS.md has the oversubscription figures).

    to_batch: pass the run's when its step draws from torch's, Python's or numpy's global
    RNGs (pretraining's masks, fine-tuning's random erasing and mixup). If the loader then
    augments in this process (data.num_workers 0, to_batch a ToDevice; synthetic images draw
    from their own generators, so they are not augmented there), the depth is 0: a
    thread would run the crops, drawing from the same RNGs as the step, interleaved by
    timing, so no run (nor resume) would draw the same twice.
    """
    depth = cfg.data.prefetch if cfg.data.prefetch is not None else 2 if torch.device(device).type == "cuda" else 0
    if depth and cfg.data.num_workers == 0 and isinstance(to_batch, ToDevice) and cfg.data.dataset != "synthetic":
        (log.warning if cfg.data.prefetch else log.info)(
            "data.num_workers 0 with data.pipeline %s: the training images are augmented inline, without "
            "prefetching (a prefetch thread would draw from the RNGs the step draws from); set data.num_workers "
            "to prepare batches ahead", cfg.data.pipeline)
        return 0
    return depth


def warn_store_mismatch(store: PredecodedImages, cfg: ExperimentConfig, img_size: int) -> None:
    """Warn when a store does not fit the run: made from another folder than data.data_dir's
    training images (the test split is read from that folder), or shrunk below the model's input."""
    try:
        train = imagefolder_root(cfg, "train").resolve()
    except DatasetNotFoundError:
        train = None  # no data.data_dir: nothing to compare with (the test split will say so)
    source = store.meta.get("source")
    if train is not None and source and Path(source) != train:
        log.warning("pre-decoded store %s was made from %s, but data.data_dir's training images are %s, whose test "
                    "split the run is scored on; convert that folder, or point data.data_dir at the store's source",
                    store.root, source, train)
    short_side = store.meta.get("short_side")
    if short_side and short_side < img_size:
        log.warning("pre-decoded store %s was shrunk to a shorter side of %d px, below the model's img_size %d: "
                    "every crop is enlarged; convert again with --short-side %d or more", store.root, short_side,
                    img_size, img_size)


class Transformed(torch.utils.data.Dataset):
    """(transform(image), label) for each (image, label) of `base`, in the DataLoader workers."""

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable):
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[i]
        return self.transform(img), label


def build_pretrain_input(
    cfg: ExperimentConfig, device: torch.device | str, seed: int | None = None,
) -> tuple[torch.utils.data.Dataset, Callable, Callable]:
    """(dataset, collate_fn, to_batch) for the pretraining DataLoader, per `data.pipeline`.

    to_batch(batch from the loader) -> (imgs (N, C, S, S) float on `device`, labels (N,)
    int64 on the CPU). `data.pipeline: cpu`: mae.data's dataset, augmented in the
    workers; to_batch moves it. `device`: Fashion-MNIST comes as raw uint8 and an
    ImageFolder as encoded bytes, decoded and augmented by to_batch on `device`.
    `predecoded`: uint8 pixels from data.predecoded_dir (mae.predecoded), augmented by
    to_batch on `device`. Synthetic data is moved as it is. seed: the augmentation
    generator's (default train.seed; give each DDP rank its own, e.g. train.seed + rank).
    """
    return build_train_input(cfg, device, cfg.data.train_subset, cfg.data.crop_scale_min, seed)


def build_train_input(
    cfg: ExperimentConfig, device: torch.device | str, subset: int | None, scale_min: float,
    seed: int | None = None, randaug: str | None = None,
) -> tuple[torch.utils.data.Dataset, Callable, Callable]:
    """`build_pretrain_input` for any job that trains on the augmented training split:
    `subset` images (None: all; which ones: `mae.data.spread_subset`), crops of at least
    `scale_min` of the area.
    The full linear probe and fine-tuning read their training images through it too.

    randaug: a timm RandAugment spec (fine-tuning's). Its ops are PIL's, so with it the
    images are augmented in the DataLoader workers whatever data.pipeline says: read from
    the dataset itself, or for `predecoded` from the store (still no JPEG decoding).
    """
    device = torch.device(device)
    d = cfg.data
    in_workers = d.pipeline == "cpu" or d.dataset == "synthetic"
    if in_workers or (randaug is not None and d.pipeline == "device"):
        if not in_workers:
            log.info("RandAugment (%s) runs in the CPU workers: data.pipeline 'device' is not used here", randaug)
        dataset = build_dataset(cfg, "train", augment=True, subset=subset, scale_min=scale_min, randaug=randaug)
        return dataset, collate_skip_none, ToDevice(device)
    args = resolved_model_args(cfg)
    mean, std = normalization(cfg)
    augment = DeviceAugment(args["img_size"], mean, std, scale=(scale_min, 1.0), hflip=d.hflip,
                            device=device, seed=cfg.train.seed if seed is None else seed)
    if d.dataset == "fashion_mnist":
        dataset = RawFashionMNIST(fashion_mnist_root(cfg), train=True, subset=subset)
        return dataset, default_collate, AugmentOnDevice(augment)
    if d.pipeline == "predecoded":
        dataset = PredecodedImages(Path(d.predecoded_dir).expanduser(), in_chans=args["in_chans"])
        warn_store_mismatch(dataset, cfg, args["img_size"])
        if randaug is None:
            collate_fn, to_batch = collate_packed, UnpackAndAugment(augment)
        else:  # the store's pixels, cropped and augmented in the workers
            log.info("RandAugment (%s) runs in the CPU workers, on the store's pixels", randaug)
            dataset = Transformed(dataset, pretrain_transform(args["img_size"], mean, std, scale_min, d.hflip, randaug))
            collate_fn, to_batch = default_collate, ToDevice(device)
    else:
        dataset = EncodedImageFolder(imagefolder_root(cfg, "train"), in_chans=args["in_chans"])
        mode = ImageReadMode.GRAY if args["in_chans"] == 1 else ImageReadMode.RGB
        collate_fn, to_batch = collate_encoded, DecodeAndAugment(augment, mode)
    return spread_subset(dataset, subset), collate_fn, to_batch
