"""One typed config tree: YAML gives values, `--set section.key=value` overrides them.

Every section is a frozen dataclass; an unknown key, a wrong type or a bad value fails at
load time with a message naming the key. Derived values (the absolute learning rate) are
computed by named functions here and saved beside every checkpoint.
"""

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mae.masking import MASK_STRATEGIES, grid_lattice_fits, grid_stride, num_visible


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mae_vit_micro_patch4"
    img_size: int | None = None  # None: the variant's default
    patch_size: int | None = None
    in_chans: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    norm_pix_loss: bool = True


@dataclass(frozen=True)
class MaskConfig:
    ratio: float = 0.75
    strategy: str = "random"  # random | block | grid (the paper's Table 1(f))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | imagefolder | synthetic
    data_dir: str | None = None  # None: $MAE_DATA_DIR, then the dataset's default place
    train_subset: int | None = None  # K training images, for quick runs (an ImageFolder's spread over its classes)
    num_workers: int = 0
    synthetic_size: int = 1024
    crop_scale_min: float = 0.2  # RandomResizedCrop(scale=(crop_scale_min, 1))
    hflip: bool = True
    pipeline: str = "cpu"  # cpu (PIL + augment in DataLoader workers) | device (decode + augment on train.device)
    #   | predecoded (uint8 pixels from predecoded_dir, augment on train.device)
    predecoded_dir: str | None = None  # a store written by `python -m mae predecode` (pipeline: predecoded)
    prefetch: int | None = None  # batches readied ahead by a background thread; None: 2 on CUDA, 0 (inline) elsewhere


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 1.5e-4  # per 256 images; lr = base_lr * effective_batch / 256
    lr: float | None = None  # absolute lr; overrides base_lr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_epochs: float = 1.0
    clip_grad: float | None = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256  # per process
    accum_iter: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False  # torch.compile pretraining's and fine-tuning's forward pass and loss (and so their backward)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    # auto (bf16 autocast on CUDA, float32 elsewhere) | bf16 | fp32; also the probes' and fine-tuning's forwards
    precision: str = "auto"
    log_every: int = 20  # optimizer steps between host syncs for logging
    checkpoint_every: int = 1  # epochs
    max_steps_per_epoch: int | None = None  # cap, for smoke runs
    progress: bool = True


@dataclass(frozen=True)
class ProbeConfig:
    pool: str = "avg"  # avg (patch-token mean) | cls; avg separates short FMNIST runs better
    # quick probe: logistic regression on cached frozen features
    # what the quick probe is scored on. val: training images held out from its fit (both sets spread
    # over the training split, disjoint), so that a sweep choosing encoders by it leaves the test
    # split to the reuse jobs' final scores; test: the test split
    quick_split: str = "val"
    quick_train_size: int = 10000  # training images the quick probe fits on (spread over the split)
    # images it is scored on; None: with quick_split val as many as it fits on, with test all (a split too small
    # for both sizes is shared between fit and score in their proportion)
    quick_test_size: int | None = None
    quick_epochs: int = 100
    quick_lr: float = 0.1
    quick_weight_decay: float = 1e-4
    # full linear probe, the paper's recipe (Appendix A.2)
    epochs: int = 90
    batch_size: int = 256  # images per forward pass, and per BatchNorm normalisation
    # loaded batches whose gradients make one LARS step: lr = base_lr * batch_size * accum_iter / 256.
    # The reference's 16384 is 512 per GPU x 32 GPUs, BatchNorm per GPU: batch_size 512, accum_iter 32
    accum_iter: int = 1
    base_lr: float = 0.1
    weight_decay: float = 0.0
    warmup_epochs: float = 10.0
    optimizer: str = "lars"  # lars | sgd
    augment: bool = True  # RandomResizedCrop + flip on the probe's training images, as the paper
    # the crops' smallest area fraction: 0.08, torchvision's default, which the reference
    # linear probe keeps (facebookresearch/mae main_linprobe.py); pretraining uses data.crop_scale_min
    crop_scale_min: float = 0.08
    train_subset: int | None = None
    test_subset: int | None = None  # K test images (spread as train_subset's), scored after every epoch; None: all
    checkpoint_every: int = 1  # epochs between checkpoints a run can resume from (with a run folder: Ray jobs)


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end fine-tuning, the paper's recipe (He et al. 2021, Appendix A.3, Table 9).

    Defaults are the paper's ViT-B/L values except the batch (1024 there): RandAugment
    (9, 0.5), random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1, drop path 0.1.
    """

    epochs: int = 100  # the paper: 100 for ViT-B, 50 for ViT-L/H
    batch_size: int = 256  # per process
    base_lr: float = 1.0e-3  # per 256 images; lr = base_lr * effective_batch / 256
    min_lr: float = 1.0e-6
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    layer_decay: float = 0.75  # lr scale layer_decay ** (depth + 1 - layer_id)
    warmup_epochs: float = 5.0
    drop_path: float = 0.1  # stochastic depth rate of the last block
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha) of mixup; 0 turns it off
    cutmix: float = 1.0  # Beta(alpha, alpha) of cutmix; 0 turns it off
    mixup_prob: float = 1.0  # chance that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # chance of cutmix rather than mixup when both are on
    clip_grad: float | None = None
    global_pool: str = "avg"  # avg (patch-token mean + fc_norm, the paper's) | token (cls)
    # the crops' smallest area fraction: 0.08, timm's create_transform default, which the
    # reference fine-tuning keeps (facebookresearch/mae util/datasets.py)
    crop_scale_min: float = 0.08
    # timm RandAugment spec, the paper's (9, 0.5) as the reference writes it; null: off. PIL ops,
    # so the training images are augmented in CPU workers when it is on, whatever data.pipeline says
    randaug: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25  # random erasing: chance per image of one erased rectangle (normal noise); 0: off
    train_subset: int | None = None  # K training images, for quick runs (an ImageFolder's spread over its classes)
    test_subset: int | None = None  # K test images (spread as train_subset's); None: the whole test split
    checkpoint_every: int = 1  # epochs between checkpoints a run can resume from (with a run folder: Ray jobs)


@dataclass(frozen=True)
class SweepConfig:
    """Search over the paper's choices; read by ray_jobs/, kept here so YAML is checked once."""

    search: str = "grid"  # grid | optuna
    metric: str = "probe_top1"
    mode: str = "max"
    num_samples: int = 1  # optuna: trials; grid: repeats of the whole grid, each with its own train.seed
    max_concurrent: int = 1
    scheduler: str = "none"  # none | asha
    space: dict[str, Any] = field(default_factory=dict)  # "mask.ratio": [0.5, 0.75] or {low, high}
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


# -- building from dicts ---------------------------------------------------------------


def from_dict(cls: type, values: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(key, hint, value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, option, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}")
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '1e-3' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.name": ..., "mask.ratio": ...}: one column per value, for Parquet."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg).items():
        if isinstance(value, dict) and key != "space":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- overrides and files ---------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.epochs=5' -> (['train', 'epochs'], 5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key")
    if not raw.strip():
        return path, None
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); close brackets and "
                          "quotes, or quote a string that starts with @, `, [ or {") from e


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    values = _deep_copy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or a section whose entries are all commented out
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return values


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults), apply overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"experiment file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"experiment file {path} is not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"experiment file {path} must hold a mapping of sections")
        values.setdefault("name", path.stem)
    values = apply_overrides(values, overrides or [])
    cfg = from_dict(ExperimentConfig, values)
    validate(cfg)
    check_grid_mask(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuild (and re-validate) a config saved with `to_dict`."""
    cfg = from_dict(ExperimentConfig, values)
    validate(cfg)
    return cfg


def override_text(key: str, value: Any) -> str:
    """The override that sets `key` to exactly `value`: "data.data_dir='/d/a #2'" for "/d/a #2"
    (written as YAML, so that `parse_override` reads back the value itself, not a comment or a number)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def replace(cfg: ExperimentConfig, overrides: dict[str, Any], check: bool = True) -> ExperimentConfig:
    """A copy with {"mask.ratio": 0.5, ...} applied and validated (sweeps use this). check=False: not
    validated (types still are), for a record of a sweep point that is not a valid experiment."""
    values = apply_overrides(to_dict(cfg), [override_text(k, v) for k, v in overrides.items()])
    if not check:
        return from_dict(ExperimentConfig, values)
    new = config_from_dict(values)
    if any(k.startswith(("mask.", "model.")) for k in overrides):  # a sweep point's own masking
        check_grid_mask(new)
    return new


def check_grid_mask(cfg: ExperimentConfig) -> None:
    """ConfigError if mask.strategy grid would not keep a lattice (`mae.masking.grid_lattice_fits`).
    Checked for configs a run is started from (load_config, a sweep's points), not in `validate`:
    a checkpoint of a grid run from before this check (2026-11-29) must still load."""
    if cfg.mask.strategy != "grid":
        return
    args = resolved_model_args(cfg)
    side = args["img_size"] // args["patch_size"]
    if not grid_lattice_fits(side, cfg.mask.ratio):
        s = grid_stride(cfg.mask.ratio)
        raise ConfigError(
            f"mask.strategy: 'grid' keeps one patch in every s x s cell (here s = {s}), which needs mask.ratio "
            f"1 - 1/s^2 (0.75 for s = 2, 0.8889 for s = 3) and a patch grid side divisible by s; with mask.ratio "
            f"{cfg.mask.ratio} and a {side} x {side} patch grid part of each mask would be random, not a grid. "
            "Use mask.strategy random, or such a ratio with model.img_size / model.patch_size a multiple of s")


# -- validation ------------------------------------------------------------------------


def validate(cfg: ExperimentConfig) -> None:
    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    require(0.0 < cfg.mask.ratio < 1.0, "mask.ratio", f"must be in (0, 1), got {cfg.mask.ratio}")
    require(cfg.mask.strategy in MASK_STRATEGIES, "mask.strategy",
            f"must be one of {list(MASK_STRATEGIES)}, got {cfg.mask.strategy!r}")
    try:
        args = resolved_model_args(cfg)
    except ValueError as e:
        key = "model.name" if "unknown model" in str(e) else "model"
        first = str(e).split(" ", 1)[0]  # model_args' messages start with the argument they are about
        if first in {f.name for f in dataclasses.fields(ModelConfig)}:
            key = f"model.{first}"
        raise ConfigError(f"{key}: {e}") from e
    num_patches = (args["img_size"] // args["patch_size"]) ** 2
    require(num_visible(num_patches, cfg.mask.ratio) >= 1, "mask.ratio",
            f"{cfg.mask.ratio} leaves no visible patch out of {num_patches}")
    require(cfg.data.dataset in DATASETS, "data.dataset",
            f"must be one of {list(DATASETS)}, got {cfg.data.dataset!r}")
    require(cfg.data.train_subset is None or cfg.data.train_subset > 0, "data.train_subset", "must be positive")
    require(0.0 < cfg.data.crop_scale_min <= 1.0, "data.crop_scale_min", "must be in (0, 1]")
    require(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    require(cfg.data.synthetic_size >= 1, "data.synthetic_size", f"must be >= 1, got {cfg.data.synthetic_size}")
    require(cfg.data.pipeline in PIPELINES, "data.pipeline",
            f"must be one of {list(PIPELINES)}, got {cfg.data.pipeline!r}")
    if cfg.data.pipeline == "predecoded":
        require(cfg.data.dataset == "imagefolder", "data.pipeline",
                f"'predecoded' stores an ImageFolder's images; data.dataset is {cfg.data.dataset!r} "
                "(use pipeline 'device' for Fashion-MNIST, whose images are raw uint8 already)")
        require(bool(cfg.data.predecoded_dir), "data.predecoded_dir",
                "pipeline 'predecoded' reads its images from here: set it to a folder written by "
                "`python -m mae predecode --data-dir <ImageFolder> --out <folder>`")
    require(cfg.data.prefetch is None or cfg.data.prefetch >= 0, "data.prefetch",
            f"must be >= 0 (0: prepare each batch inline) or null (2 on CUDA, 0 elsewhere), got {cfg.data.prefetch}")
    require(cfg.optim.base_lr > 0, "optim.base_lr", "must be positive")
    require(cfg.optim.lr is None or cfg.optim.lr > 0, "optim.lr", "must be positive")
    require(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(cfg.optim.min_lr >= 0, "optim.min_lr", f"must be >= 0, got {cfg.optim.min_lr}")
    require(cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0, "optim.clip_grad",
            f"must be positive (or null: no clipping), got {cfg.optim.clip_grad}")
    require(0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
    require(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    require(cfg.train.epochs >= 1, "train.epochs", f"must be >= 1, got {cfg.train.epochs}")
    require(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    require(cfg.train.accum_iter >= 1, "train.accum_iter", "must be >= 1")
    require(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    require(cfg.train.max_steps_per_epoch is None or cfg.train.max_steps_per_epoch >= 1, "train.max_steps_per_epoch",
            f"must be >= 1 (or null: whole epochs), got {cfg.train.max_steps_per_epoch}")
    require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.train.device) is not None, "train.device",
            f"must be auto, cpu, cuda, cuda:N or mps, got {cfg.train.device!r}")
    require(cfg.train.compile_mode in COMPILE_MODES, "train.compile_mode",
            f"must be one of {list(COMPILE_MODES)}, got {cfg.train.compile_mode!r}")
    require(not (uses_cuda_graphs(cfg.train) and cfg.train.accum_iter > 1), "train.compile_mode",
            f"{cfg.train.compile_mode!r} replays CUDA graphs into the same gradient buffers, so it cannot "
            "accumulate gradients: use train.accum_iter=1 or compile_mode 'default'")
    require(cfg.train.precision in PRECISIONS, "train.precision",
            f"must be one of {list(PRECISIONS)}, got {cfg.train.precision!r}")
    require(cfg.train.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    require(cfg.probe.pool in ("cls", "avg"), "probe.pool", f"must be 'cls' or 'avg', got {cfg.probe.pool!r}")
    require(cfg.probe.optimizer in ("lars", "sgd"), "probe.optimizer", "must be 'lars' or 'sgd'")
    require(0.0 < cfg.probe.crop_scale_min <= 1.0, "probe.crop_scale_min",
            f"must be in (0, 1], got {cfg.probe.crop_scale_min}")
    require(cfg.probe.accum_iter >= 1, "probe.accum_iter", f"must be >= 1, got {cfg.probe.accum_iter}")
    require(cfg.probe.epochs >= 1, "probe.epochs", f"must be >= 1, got {cfg.probe.epochs}")
    require(cfg.probe.batch_size >= 1, "probe.batch_size", f"must be >= 1, got {cfg.probe.batch_size}")
    require(cfg.probe.base_lr > 0, "probe.base_lr", f"must be positive, got {cfg.probe.base_lr}")
    require(cfg.probe.weight_decay >= 0, "probe.weight_decay", f"must be >= 0, got {cfg.probe.weight_decay}")
    require(cfg.probe.warmup_epochs >= 0, "probe.warmup_epochs", f"must be >= 0, got {cfg.probe.warmup_epochs}")
    require(cfg.probe.quick_epochs >= 1, "probe.quick_epochs", f"must be >= 1, got {cfg.probe.quick_epochs}")
    require(cfg.probe.quick_lr > 0, "probe.quick_lr", f"must be positive, got {cfg.probe.quick_lr}")
    require(cfg.probe.quick_weight_decay >= 0, "probe.quick_weight_decay",
            f"must be >= 0, got {cfg.probe.quick_weight_decay}")
    require(cfg.probe.quick_train_size >= 10, "probe.quick_train_size", "must be >= 10")
    require(cfg.probe.quick_split in ("val", "test"), "probe.quick_split",
            f"must be 'val' (held-out training images) or 'test', got {cfg.probe.quick_split!r}")
    require(cfg.probe.quick_test_size is None or cfg.probe.quick_test_size > 0, "probe.quick_test_size",
            f"must be positive (or null: see probe.quick_split), got {cfg.probe.quick_test_size}")
    require(cfg.probe.train_subset is None or cfg.probe.train_subset > 0, "probe.train_subset",
            f"must be positive (or null: the whole training split), got {cfg.probe.train_subset}")
    require(cfg.probe.test_subset is None or cfg.probe.test_subset > 0, "probe.test_subset",
            f"must be positive (or null: the whole test split), got {cfg.probe.test_subset}")
    require(cfg.probe.checkpoint_every >= 1, "probe.checkpoint_every",
            f"must be >= 1, got {cfg.probe.checkpoint_every}")
    f = cfg.finetune
    require(f.epochs >= 1, "finetune.epochs", f"must be >= 1, got {f.epochs}")
    require(f.checkpoint_every >= 1, "finetune.checkpoint_every", f"must be >= 1, got {f.checkpoint_every}")
    require(f.batch_size >= 2 and f.batch_size % 2 == 0, "finetune.batch_size",
            f"must be even and >= 2 (mixup pairs images), got {f.batch_size}")
    require(f.base_lr > 0, "finetune.base_lr", "must be positive")
    require(f.min_lr >= 0, "finetune.min_lr", "must be >= 0")
    require(f.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")
    require(0 <= f.beta1 < 1 and 0 <= f.beta2 < 1, "finetune.beta1/beta2", "must be in [0, 1)")
    require(0 < f.layer_decay <= 1, "finetune.layer_decay", f"must be in (0, 1], got {f.layer_decay}")
    require(f.warmup_epochs >= 0, "finetune.warmup_epochs", "must be >= 0")
    require(0 <= f.drop_path < 1, "finetune.drop_path", f"must be in [0, 1), got {f.drop_path}")
    require(0 <= f.label_smoothing < 1, "finetune.label_smoothing", "must be in [0, 1)")
    require(f.mixup >= 0 and f.cutmix >= 0, "finetune.mixup/cutmix", "must be >= 0 (0 turns it off)")
    require(0 <= f.mixup_prob <= 1 and 0 <= f.mixup_switch_prob <= 1, "finetune.mixup_prob/mixup_switch_prob",
            "must be in [0, 1]")
    require(f.clip_grad is None or f.clip_grad > 0, "finetune.clip_grad", "must be positive")
    require(f.global_pool in ("avg", "token"), "finetune.global_pool",
            f"must be 'avg' or 'token', got {f.global_pool!r}")
    require(f.train_subset is None or f.train_subset > 0, "finetune.train_subset", "must be positive")
    require(0.0 < f.crop_scale_min <= 1.0, "finetune.crop_scale_min", f"must be in (0, 1], got {f.crop_scale_min}")
    require(f.test_subset is None or f.test_subset > 0, "finetune.test_subset", "must be positive")
    require(f.randaug is None or _is_randaug_spec(f.randaug), "finetune.randaug",
            f"must be a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1' (the paper's), or null for none; "
            f"got {f.randaug!r}")
    require(0.0 <= f.reprob <= 1.0, "finetune.reprob", f"must be in [0, 1] (0 turns random erasing off), got {f.reprob}")
    require(cfg.sweep.search in ("grid", "optuna"), "sweep.search", "must be 'grid' or 'optuna'")
    require(cfg.sweep.mode in ("max", "min"), "sweep.mode", "must be 'max' or 'min'")
    require(cfg.sweep.scheduler in ("none", "asha"), "sweep.scheduler", "must be 'none' or 'asha'")
    require(cfg.sweep.num_samples >= 1, "sweep.num_samples", "must be >= 1")
    require(cfg.sweep.max_concurrent >= 1, "sweep.max_concurrent", "must be >= 1")


DATASETS = ("fashion_mnist", "imagefolder", "synthetic")
PIPELINES = ("cpu", "device", "predecoded")  # where images are decoded and augmented: mae.data, mae.device_input
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes torch.compile replays as CUDA graphs
PRECISIONS = ("auto", "bf16", "fp32")


# Keys that say where and how a run executes, not what it computes: a resumed run may
# change them (another machine or GPU, a moved dataset, more loader workers, a new log rate).
EXECUTION_KEYS = frozenset({
    "name", "data.data_dir", "data.num_workers", "data.pipeline", "data.predecoded_dir", "data.prefetch",
    "train.device", "train.compile", "train.compile_mode", "train.precision", "train.log_every",
    "train.checkpoint_every", "train.progress", "probe.checkpoint_every", "finetune.checkpoint_every",
})
# What each kind of run computes from, as keys or sections ("optim."), for recipe_changes
PRETRAIN_RECIPE = ("model.", "mask.", "data.", "optim.", "train.")
_ENCODER_AND_DATA = ("model.name", "model.img_size", "model.patch_size", "model.in_chans", "train.seed",
                     "data.dataset", "data.hflip", "data.synthetic_size")
FINETUNE_RECIPE = ("finetune.", *_ENCODER_AND_DATA)
PROBE_RECIPE = (*(f"probe.{f.name}" for f in dataclasses.fields(ProbeConfig) if not f.name.startswith("quick_")),
                *_ENCODER_AND_DATA)  # the full probe's: the quick probe's keys are not read


def recipe_changes(saved: dict[str, Any], cfg: ExperimentConfig, recipe: tuple[str, ...]) -> list[str]:
    """The recipe values that differ between a saved config (a checkpoint's) and cfg, as
    "key: saved -> now", execution keys aside. recipe: keys, and sections ending in ".".
    A key the saved config lacks (written before the key existed) is not compared."""
    old, new = flatten(saved), flatten(cfg)

    def in_recipe(key: str) -> bool:
        return key not in EXECUTION_KEYS and any(key == r or (r.endswith(".") and key.startswith(r)) for r in recipe)

    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if in_recipe(k) and k in old and old[k] != new[k]]


def _is_randaug_spec(spec: object) -> bool:
    """Whether timm can build a RandAugment from `spec` (it asserts on a malformed one)."""
    from timm.data.auto_augment import rand_augment_transform

    if not isinstance(spec, str) or not spec.startswith("rand"):
        return False
    try:
        rand_augment_transform(spec, {})
    except (AssertionError, ValueError, KeyError, IndexError):
        return False
    return True


def uses_cuda_graphs(train: TrainConfig) -> bool:
    """Whether train.compile's mode records the step as CUDA graphs (on a CUDA device)."""
    return train.compile and train.compile_mode in CUDA_GRAPH_MODES


def resolved_model_args(cfg: ExperimentConfig) -> dict[str, Any]:
    from mae.models import model_args  # local: keeps `import mae.config` free of timm

    m = cfg.model
    return model_args(
        m.name, img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
        decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads, norm_pix_loss=m.norm_pix_loss,
        mask_strategy=cfg.mask.strategy,
    )


def effective_batch_size(cfg: ExperimentConfig, world_size: int = 1) -> int:
    return cfg.train.batch_size * cfg.train.accum_iter * world_size


def absolute_lr(cfg: ExperimentConfig, world_size: int = 1) -> float:
    """lr = base_lr * effective_batch / 256 (the paper's linear scaling), unless optim.lr is set."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * effective_batch_size(cfg, world_size) / 256


def derived_values(cfg: ExperimentConfig, world_size: int = 1) -> dict[str, Any]:
    """What a run derives from its config and its number of processes, as saved in every
    checkpoint ("derived") and in summary.json: the peak lr is not in the config."""
    return {"world_size": world_size, "effective_batch_size": effective_batch_size(cfg, world_size),
            "absolute_lr": absolute_lr(cfg, world_size)}
