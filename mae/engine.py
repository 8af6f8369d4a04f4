"""The pretraining engine: one loop for a laptop CPU, one GPU, or a DDP worker.

`pretrain(cfg, run_dir)` trains, checkpoints every `train.checkpoint_every` epochs into
run_dir/checkpoint-EEEE/, resumes from the newest checkpoint there (or `resume_from`),
and reports through a `PretrainCallback`, which is where Ray hooks in. When
torch.distributed is initialised (Ray Train does that) the model is wrapped in DDP and
the data sharded; the loop itself does not change.
"""

import contextlib
import dataclasses
import itertools
import logging
import math
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import mae
from mae.checkpoint import (
    CheckpointError, ResumeRefusedError, check_epoch_length, check_recipe, check_world_size, checkpoint_due,
    latest_checkpoint, load_checkpoint, model_state, resume_source, rng_state, save_epoch_checkpoint, set_rng_state,
)
from mae.config import (
    PRETRAIN_RECIPE, ConfigError, ExperimentConfig, config_from_dict, derived_values, resolved_model_args, to_dict,
    uses_cuda_graphs,
)
from mae.data import CorruptDatasetError
from mae.device_input import Prefetcher, build_pretrain_input, prefetch_depth
from mae.models import MaskedAutoencoderViT
from mae.optim import cosine_lr, fused_kwargs, param_groups, set_lr

log = logging.getLogger(__name__)
T = TypeVar("T")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class PretrainCallback:
    """Hooks called on every rank; override what you need (ray_jobs/ reports from here)."""

    def on_log(self, metrics: dict[str, float]) -> None:
        """Every `train.log_every` optimizer steps: step, epoch, loss, lr."""

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """After each epoch; checkpoint_dir is set on the epochs that saved one (rank 0 only)."""


@dataclass
class PretrainResult:
    run_dir: Path
    epochs: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch run here
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch of the run, over all attempts
    checkpoint_dir: Path | None = None
    final_loss: float = math.nan
    best_loss: float = math.nan
    wall_time_s: float = 0.0
    images_per_sec: float = 0.0
    derived: dict[str, Any] = field(default_factory=dict)  # config.derived_values: world size, peak lr


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name} was asked for, but torch sees no CUDA device here; "
                          "use train.device=cpu, or auto (CUDA when there is one)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device: {name}, but there are {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a host clock measures it; no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What the device is, for logs and benchmark tables: the GPU's or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() is often empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast to `dtype` on the device, or no autocast (float32) when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_model(cfg: ExperimentConfig) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(**resolved_model_args(cfg))


def build_optimizer(model: torch.nn.Module, cfg: ExperimentConfig, lr: float) -> torch.optim.Optimizer:
    """The reference's AdamW (no decay on norms and biases: `param_groups`), fused: torch updates every
    parameter in one kernel (CUDA and CPU) instead of looping over them in Python."""
    return torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
        **fused_kwargs(model),
    )


def autocast_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA unless train.precision says fp32; float32 elsewhere by default.

    One knob for every forward: pretraining, the quick and full linear probes' frozen
    encoder, and fine-tuning (training and evaluation). 'auto' keeps CPUs in float32:
    bf16 autocast made our CPU steps slower (the casts cost more than the matrix products
    gain), see BENCHMARKS.md.
    """
    precision = cfg.train.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class TrainStep:
    """Forward, loss and backward of one micro-batch; the optimizer update on the last one.

    This is the whole hot path of pretraining, used by `pretrain` and timed as is by
    benchmarks/throughput.py. It never reads a value back to the host: the loss comes
    back as a detached device tensor. With train.compile the forward pass (masking,
    encoder, decoder, loss, under autocast) is one compiled graph and AOTAutograd
    compiles its backward; the optimizer is torch's fused AdamW, one kernel already.
    Shapes are static (fixed batch via drop_last, fixed number of visible patches), so
    `train.compile_mode: reduce-overhead` (or max-autotune) can replay the step as CUDA graphs.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: ExperimentConfig,
                 device: torch.device, accum: int = 1):
        self.model, self.optimizer, self.accum = model, optimizer, accum
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.clip_grad = cfg.optim.clip_grad
        self.ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.cudagraphs = uses_cuda_graphs(cfg.train)
        dtype = autocast_dtype(cfg, device)
        mask_ratio = cfg.mask.ratio

        def loss_of(imgs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
            with autocast(device, dtype):
                loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise, loss_only=True)
            return loss

        # dynamic=False: one batch shape, so static shapes; another shape gets its own static graph
        # (left to torch, a second shape makes the graph dynamic: slower, and no longer what was timed)
        self.loss_of = (torch.compile(loss_of, mode=cfg.train.compile_mode, dynamic=False)
                        if cfg.train.compile else loss_of)

    def __call__(self, imgs: torch.Tensor, noise: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        """imgs (N, C, H, W) on the device -> the micro-batch's loss (detached, on device).

        noise (N, L) fixes the mask (benchmarks and tests); None samples it on the device.
        """
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        no_sync = self.model.no_sync() if (self.ddp and not update) else contextlib.nullcontext()
        with no_sync:
            loss = self.loss_of(imgs, noise)
            (loss / self.accum if self.accum > 1 else loss).backward()
        if update:
            if self.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # A CUDA graph replay writes each step's loss into the same memory: a caller keeping
        # the returned losses (a loss curve) would see the last one everywhere without a copy.
        return loss.detach().clone() if self.cudagraphs else loss.detach()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pretrain(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    callback: PretrainCallback | None = None,
    resume_from: str | Path | None = None,
    device: torch.device | str | None = None,
    keep_checkpoints: int = 2,
) -> PretrainResult:
    """Pretrain an MAE as configured; resumable to the same result.

    run_dir: where checkpoints and config.yaml go; an existing checkpoint there is resumed.
    resume_from: a checkpoint folder to resume from instead (Ray hands one over).
    Raises NonFiniteLossError when the loss stops being finite.
    """
    callback = callback or PretrainCallback()
    run_dir = Path(run_dir)
    rank, world_size = _world()
    device = torch.device(device) if device is not None else select_device(cfg.train.device)
    seed_everything(cfg.train.seed + rank)

    # data.pipeline: augmented in the workers (cpu) or decoded + augmented by to_batch (device)
    dataset, collate_fn, to_batch = build_pretrain_input(cfg, device, seed=cfg.train.seed + rank)
    augment = getattr(to_batch, "augment", None)  # the device pipeline's own generator
    per_rank = len(dataset) // world_size
    if per_rank < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is larger than the {per_rank} training images "
            f"per process; lower train.batch_size or raise data.train_subset"
        )
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=cfg.train.seed, drop_last=True)
    # The workers' augmentation RNGs are seeded from this generator, reseeded per epoch
    # (worker_seed), and the workers are started afresh each epoch: a run resumed at
    # epoch e draws the same crops as one that never stopped. Persistent workers would
    # carry their RNG state over from the epochs before, which a resume cannot restore.
    worker_rng = torch.Generator()
    loader = DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False, collate_fn=collate_fn, generator=worker_rng,
    )
    accum = cfg.train.accum_iter
    steps_per_epoch = len(loader) // accum
    if cfg.train.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch has no optimizer step: lower train.accum_iter ({accum}) or train.batch_size")
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    derived = derived_values(cfg, world_size)  # saved in every checkpoint and the result
    peak_lr = derived["absolute_lr"]

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg, peak_lr)

    start_epoch, step, history = 0, 0, []
    source = resume_source(run_dir, resume_from)
    if source is not None:
        payload = load_checkpoint(source)
        check_recipe(payload, source, cfg, PRETRAIN_RECIPE)
        check_world_size(payload, source, world_size)
        check_epoch_length(payload, source, steps_per_epoch)
        model.load_state_dict(model_state(payload), strict=True)
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except ValueError as e:  # torch: a group of another size
            raise ResumeRefusedError(
                f"{source}: its optimizer state does not fit this model's parameter groups ({e}). It was "
                "written by another model or mae version (mae 0.1.0 before 2026-11-29 did not weight-decay "
                "the cls and mask tokens): resume with the code that wrote it, or start in another run folder"
            ) from e
        start_epoch, step = int(payload["epoch"]), int(payload["step"])
        history = list(payload.get("history", []))
        set_rng_state(payload["rng"][rank] if isinstance(payload["rng"], list) else payload["rng"])
        if augment is not None and payload.get("augment_rng") is not None:
            augment.load_state_dict(payload["augment_rng"][rank])
        log.info("resumed from %s at epoch %d (step %d)", source, start_epoch, step)
    if rank == 0:  # after the resume's checks: a refused resume keeps the run's own config.yaml
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    train_model: torch.nn.Module = model
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    train_step = TrainStep(train_model, optimizer, cfg, device, accum=accum)

    depth = prefetch_depth(cfg, device, to_batch)  # 0 when the crops would run on its thread
    result = PretrainResult(run_dir=run_dir, epochs=[], derived=derived)
    t_run = time.perf_counter()
    images_total = 0
    last_ckpt: Path | None = None
    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)
        worker_rng.manual_seed(worker_seed(cfg.train.seed, rank, epoch))
        train_model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)  # on device: no host sync per step
        window_sum = torch.zeros((), device=device)  # the micro-batch losses since the last log
        n_iters = n_images = n_window = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   disable=not (cfg.train.progress and rank == 0))
        batches = itertools.islice(loader, steps_per_epoch * accum)  # exactly the batches this epoch uses
        last_imgs = None
        with Prefetcher(batches, to_batch, device, depth) as prepared:
            waited = InputWait(prepared)
            for it, (imgs, _) in enumerate(waited):
                if it % accum == 0:
                    lr = cosine_lr(step, total_steps, warmup_steps, peak_lr, cfg.optim.min_lr)
                    set_lr(optimizer, lr)
                n_read = imgs.shape[0]
                if n_read == 0:  # every image of the batch was unreadable (each one logged)
                    imgs = stand_in(last_imgs, epoch, it)
                elif n_read < cfg.train.batch_size:  # some were: keep the shape static (no recompile)
                    imgs = fill_batch(imgs, cfg.train.batch_size)
                last_imgs = imgs
                update = (it + 1) % accum == 0
                loss = train_step(imgs, update=update)
                loss_sum += loss
                window_sum += loss
                n_iters += 1
                n_window += 1
                n_images += n_read
                if not update:
                    continue
                step += 1
                bar.update(1)
                if step % cfg.train.log_every == 0:
                    # the one host sync; since the last log or, in an epoch's first window, its start
                    window = window_sum.item() / n_window
                    _check_finite(window, epoch, step)
                    window_sum.zero_()
                    n_window = 0
                    bar.set_postfix(loss=f"{window:.4f}", lr=f"{lr:.2e}")
                    callback.on_log({"epoch": epoch, "step": step, "loss": window, "lr": lr})
        bar.close()
        if world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        epoch_loss = loss_sum.item() / max(1, n_iters)
        _check_finite(epoch_loss, epoch, step)
        epoch_time = time.perf_counter() - t0
        images_total += n_images * world_size
        metrics = {
            "epoch": epoch + 1, "step": step, "train_loss": epoch_loss, "lr": lr,
            "epoch_time_s": epoch_time, "images_per_sec": n_images * world_size / epoch_time,
            "input_wait_frac": waited.seconds / epoch_time,
        }
        history.append(metrics)
        log.info("epoch %d/%d loss %.4f lr %.2e %.0f img/s, %.0f%% waiting for input", epoch + 1, cfg.train.epochs,
                 epoch_loss, lr, metrics["images_per_sec"], 100 * metrics["input_wait_frac"])
        ckpt = None
        if checkpoint_due(epoch + 1, cfg.train.checkpoint_every, cfg.train.epochs):
            rngs = gather_per_rank(rng_state(), world_size)
            augment_rngs = gather_per_rank(augment.state_dict(), world_size, always_list=True) if augment else None
            if rank == 0:
                ckpt = save_epoch_checkpoint(run_dir, epoch + 1, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1, "step": step, "rng": rngs, "augment_rng": augment_rngs,
                    "config": to_dict(cfg), "derived": derived,
                    "history": history, "mae_version": mae.__version__,
                }, keep_checkpoints)
                last_ckpt = ckpt
        callback.on_epoch_end(dict(metrics), ckpt)
        result.epochs.append(metrics)

    result.wall_time_s = time.perf_counter() - t_run
    result.images_per_sec = images_total / result.wall_time_s if result.epochs else 0.0
    result.checkpoint_dir = last_ckpt or latest_checkpoint(run_dir)
    result.history = history
    if history:
        result.final_loss = history[-1]["train_loss"]
        result.best_loss = min(h["train_loss"] for h in history)
    return result


def summarize_history(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Losses, epochs and throughput over a run's whole history (every attempt, resumes included),
    under the sweep table's column names: summary.json and the Ray jobs both report these."""
    if not history:
        return {}
    losses = [h["train_loss"] for h in history]
    best = min(range(len(losses)), key=losses.__getitem__)
    train_time = sum(h["epoch_time_s"] for h in history)
    images = sum(h["images_per_sec"] * h["epoch_time_s"] for h in history)
    return {
        "final_train_loss": losses[-1], "best_train_loss": losses[best],
        "best_epoch": int(history[best]["epoch"]), "epochs_completed": len(history),
        "train_time_s": train_time, "images_per_sec": images / train_time if train_time > 0 else 0.0,
    }


class InputWait:
    """Iterates `batches`, adding up in `seconds` how long each next() kept the caller waiting.

    The engine's measure of an input-bound run. CUDA kernels run asynchronously, so a
    step's host side returns long before the GPU finishes; the training loop blocks on
    the GPU only at its periodic loss read-back. Time blocked in next(), though, is
    time the loader or the prefetch thread had no batch ready: near 0, the step sets the
    pace; well above 0, the input pipeline does.
    """

    def __init__(self, batches: Iterable):
        self._batches = iter(batches)
        self.seconds = 0.0

    def __iter__(self) -> "InputWait":
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.seconds += time.perf_counter() - start


def fill_batch(imgs: torch.Tensor, size: int) -> torch.Tensor:
    """imgs (n, ...) with 0 < n < size -> (size, ...): the n images repeated in order.

    A batch that lost unreadable images would otherwise be smaller than the rest, and a
    new shape makes torch.compile recompile and CUDA graphs record again. The repeats get
    their own masks (the noise is drawn per row), so they are not duplicate samples.
    """
    return imgs[torch.arange(size, device=imgs.device) % imgs.shape[0]]


def stand_in(last: T | None, epoch: int, it: int) -> T:
    """The batch to train on when none of a batch's images could be read: the previous one.

    Skipping the step instead would leave this rank one step behind the others under DDP
    (they would wait for it forever) and shift the optimizer schedule. In pretraining its
    masks are drawn afresh, so it is not the same sample twice. Fine-tuning uses it too.
    """
    if last is None:
        raise CorruptDatasetError(
            f"no image of the first batch of epoch {epoch + 1} could be read (each file is named in the "
            "warnings above): the data set is damaged or data.data_dir points at the wrong files"
        )
    log.warning("no image of batch %d of epoch %d could be read; training on the previous batch again",
                it, epoch + 1)
    return last


def worker_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s DataLoader workers on `rank`: a function of the three
    alone, so a resumed run's workers draw what the uninterrupted run's drew."""
    return ((seed * 1_000_003 + rank) * 100_003 + epoch) % 2**63


def _check_finite(value: float, epoch: int, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss became {value} at epoch {epoch + 1}, step {step}; lower optim.base_lr, "
            f"set optim.clip_grad (e.g. 1.0) or lengthen optim.warmup_epochs, and check the input data"
        )


def gather_per_rank(state: Any, world_size: int, always_list: bool = False) -> Any:
    """This rank's `state` (its RNG or augmentation-generator state), or every rank's (a list)
    under DDP, so each resumes its own; always_list makes it a list of one without DDP too."""
    if world_size == 1:
        return [state] if always_list else state
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def load_model(path: str | Path, **overrides: Any) -> tuple[MaskedAutoencoderViT, ExperimentConfig]:
    """Rebuild the model a checkpoint of ours was trained with and load its weights."""
    payload = load_checkpoint(path)
    if "config" not in payload:
        raise CheckpointError(
            f"{path} carries no config (not written by this package); build the model with "
            "mae.models.build_mae(name) and load_state_dict(mae.checkpoint.model_state(payload))"
        )
    cfg = config_from_dict(payload["config"])
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return model_with_weights(cfg, payload), cfg


# what sets the shapes of a model's weights (the heads' counts and the loss options do not)
WEIGHT_SHAPE_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "decoder_embed_dim", "decoder_depth")


def model_with_weights(cfg: ExperimentConfig, payload: dict[str, Any]) -> MaskedAutoencoderViT:
    """The model `cfg` describes, with the weights of a loaded checkpoint (strict).

    CheckpointError if they do not fit: a `--set model.*` (or an override) that changes the
    architecture the checkpoint was trained with."""
    model = build_model(cfg)
    try:
        model.load_state_dict(model_state(payload), strict=True)
    except RuntimeError as e:
        try:
            saved = resolved_model_args(config_from_dict(payload["config"]))
        except (KeyError, TypeError, ConfigError):  # no config of ours: nothing to compare with
            saved = {}
        wanted = resolved_model_args(cfg)
        changed = [f"{k} {wanted[k]} (the checkpoint's: {saved[k]})" for k in WEIGHT_SHAPE_KEYS
                   if k in saved and saved[k] != wanted[k]]
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:3])
        if changed:
            raise CheckpointError(f"the checkpoint's weights do not fit the model asked for, which has "
                                  f"{', '.join(changed)}: drop the model.* values that change it (a checkpoint "
                                  f"fixes its model's architecture). {detail}") from e
        raise CheckpointError(f"the checkpoint's weights do not fit the model its config builds: {detail}") from e
    return model
