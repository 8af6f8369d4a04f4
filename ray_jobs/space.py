"""A sweep's search space, read from `sweep.space` and checked before any trial starts.

YAML syntax, one entry per config value to search (keys are `section.key` paths):

    sweep:
      space:
        mask.ratio: [0.5, 0.75]                      # grid values / Optuna categorical
        optim.base_lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # Optuna float range
        model.decoder_depth: {low: 1, high: 8}       # Optuna int range (both ends ints)

`--set sweep.space.mask.ratio=[0.25,0.5]` also works: nested mappings are flattened to
dotted keys (a later, nested entry wins over an earlier dotted one). Plain Python, no Ray:
`validate_experiment` is cheap enough to run before Ray starts.
"""

import itertools
import math
from dataclasses import dataclass
from typing import Any

from mae.config import ConfigError, ExperimentConfig, replace
from mae.results import lower_is_better

RANGE_KEYS = frozenset({"low", "high", "log"})
# What a trial's last report carries (ray_jobs.sweep.run_trial), so what sweep.metric may name.
OBJECTIVES = ("probe_top1", "probe_train_top1", "final_train_loss", "best_train_loss", "images_per_sec",
              "wall_time_s")
# Searched keys that change what the reconstruction loss measures (how many patches it is over,
# their normalisation, their size): trials searching them cannot be ranked by that loss.
LOSS_SCALE_KEYS = ("mask.ratio", "mask.strategy", "model.norm_pix_loss", "model.patch_size")
MAX_GRID_CHECKS = 1000  # beyond this many grid points, values are checked one key at a time
MAX_RANGE_CHECKS = 10000  # int ranges up to this many values are checked value by value


@dataclass(frozen=True)
class Choice:
    """A list of values: the points of a grid, or an Optuna categorical."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """{low, high[, log]}: an Optuna float range, or an int range when both ends are ints."""

    key: str
    low: float
    high: float
    log: bool = False

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high))


Dimension = Choice | Range


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and {"low", "high"} <= set(value) and set(value) <= RANGE_KEYS


def _flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in space.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_range(value):
            if not value:
                raise ConfigError(f"sweep.space.{path} is an empty mapping; give a list of values or {{low, high}}")
            out.update(_flatten_space(value, f"{path}."))
        else:
            out[path] = value
    return out


def parse_space(space: dict[str, Any]) -> list[Dimension]:
    """`sweep.space` -> one Choice or Range per searched key; ConfigError names a bad entry."""
    if not space:
        raise ConfigError(
            "sweep.space is empty: a sweep needs at least one value to search, e.g. "
            "sweep.space: {mask.ratio: [0.5, 0.75]}"
        )
    dims: list[Dimension] = []
    for key, value in _flatten_space(space).items():
        where = f"sweep.space.{key}"
        if key.startswith("sweep.") or key == "name":
            raise ConfigError(f"{where}: the sweep settings and the experiment name cannot be searched")
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{where} is an empty list; give at least one value")
            if any(isinstance(v, (list, dict)) for v in value):
                raise ConfigError(f"{where} must list plain values (numbers, strings, booleans), got {value!r}")
            dims.append(Choice(key, tuple(value)))
        elif _is_range(value):
            low, high, log = value["low"], value["high"], value.get("log", False)
            for name, v in (("low", low), ("high", high)):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"{where}.{name} must be a finite number, got {v!r}")
            if not isinstance(log, bool):
                raise ConfigError(f"{where}.log must be true or false, got {log!r}")
            if not low < high:
                raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
            if log and low <= 0:
                raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
            dims.append(Range(key, low, high, log))
        else:
            raise ConfigError(
                f"{where} must be a list of values ([0.5, 0.75]) or a range ({{low: 0.1, high: 0.9}} "
                f"with optional log: true), got {value!r}"
            )
    return dims


def grid_points(dims: list[Dimension]) -> list[dict[str, Any]]:
    """Every combination of the Choice values ({key: value}), in YAML order."""
    choices = [d for d in dims if isinstance(d, Choice)]
    return [dict(zip([d.key for d in choices], combo)) for combo in itertools.product(*(d.values for d in choices))]


def _check_point(cfg: ExperimentConfig, point: dict[str, Any]) -> None:
    try:
        replace(cfg, point)
    except ConfigError as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
        raise ConfigError(f"sweep.space point {{{shown}}} is not a valid experiment: {e}") from e


def validate_experiment(cfg: ExperimentConfig) -> list[Dimension]:
    """Check the search space and every point of it against the config; return its dimensions.

    Grid: each combination goes through `mae.config.replace` (so mask.ratio 1.0, an unknown
    key or a decoder width the heads do not divide fails here). Optuna ranges: both ends
    are checked. Raises ConfigError with a message naming the problem.
    """
    check_sizing(cfg)
    dims = parse_space(cfg.sweep.space)
    ranges = [d for d in dims if isinstance(d, Range)]
    if cfg.sweep.search == "grid" and ranges:
        raise ConfigError(
            f"sweep.space.{ranges[0].key}: a {{low, high}} range needs sweep.search: optuna; "
            "grid search takes a list of values"
        )
    scale = [d.key for d in dims if d.key in LOSS_SCALE_KEYS]
    if cfg.sweep.scheduler == "asha" and scale:
        raise ConfigError(
            f"sweep.scheduler: asha stops trials on their reconstruction loss, which {scale[0]} changes the "
            "meaning of (it falls as mask.ratio falls); it would stop trials that are not worse. Use "
            f"scheduler: none for sweeps of {', '.join(LOSS_SCALE_KEYS)}"
        )
    if scale and cfg.sweep.metric.endswith("_loss"):
        raise ConfigError(
            f"sweep.metric {cfg.sweep.metric}: the reconstruction loss of trials with other {scale[0]} values "
            "measures other things (it falls as mask.ratio falls), so it would steer the search the wrong way; "
            "rank by probe_top1, the frozen features' quality"
        )
    choices = [d for d in dims if isinstance(d, Choice)]
    n_points = math.prod(len(d.values) for d in choices)
    if n_points <= MAX_GRID_CHECKS:
        midpoint = {r.key: r.low for r in ranges}
        for point in grid_points(dims):
            _check_point(cfg, {**midpoint, **point})
    else:
        for d in choices:
            for v in d.values:
                _check_point(cfg, {d.key: v})
    first = grid_points(dims)[0]
    for r in ranges:
        # An int range's every value (a decoder width the heads must divide fails inside it, not
        # at its ends); a float range's ends, between which the checks (bounds) cannot fail.
        whole = r.is_int and r.high - r.low < MAX_RANGE_CHECKS
        for value in range(int(r.low), int(r.high) + 1) if whole else (r.low, r.high):
            try:
                _check_point(cfg, {**first, r.key: value})
            except ConfigError as e:
                raise ConfigError(f"sweep.space.{r.key}: {{low: {r.low}, high: {r.high}}} holds {value}, which Optuna "
                                  f"may draw: {e}. List the valid values instead ([a, b, ...]) or narrow the range") \
                    from e
    return dims


def check_worker_resources(cfg: ExperimentConfig, worker_count: bool = True) -> None:
    """What every Ray job needs of the sweep section's worker sizing (pretrain.py and the reuse
    jobs too, which round a GPU share up to a whole GPU where a sweep refuses it). worker_count=False:
    the job counts its workers otherwise (the reuse jobs' --workers)."""
    s = cfg.sweep
    if worker_count and s.workers_per_trial < 1:
        raise ConfigError(f"sweep.workers_per_trial must be >= 1, got {s.workers_per_trial}")
    if s.cpus_per_worker <= 0:
        raise ConfigError(f"sweep.cpus_per_worker must be positive, got {s.cpus_per_worker}")
    if s.gpus_per_worker < 0:
        raise ConfigError(f"sweep.gpus_per_worker must be >= 0, got {s.gpus_per_worker}")
    if s.max_failures < -1:
        raise ConfigError(f"sweep.max_failures must be >= 0 (or -1: retry forever), got {s.max_failures}")


def check_sizing(cfg: ExperimentConfig) -> None:
    """A known objective, and per-worker resources Ray can place (GPU fractions: one-worker trials)."""
    s = cfg.sweep
    if s.metric not in OBJECTIVES:
        raise ConfigError(f"sweep.metric must be one of {list(OBJECTIVES)}, got {s.metric!r}")
    best = "min" if lower_is_better(s.metric) else "max"
    if s.mode != best:
        raise ConfigError(f"sweep.mode {s.mode!r} would search for the worst {s.metric}: set sweep.mode: {best}")
    check_worker_resources(cfg)
    g = s.gpus_per_worker
    if g > 1:
        raise ConfigError(
            f"sweep.gpus_per_worker must be between 0 and 1, got {g}: a Train worker (one DDP process) drives "
            "one GPU, and the rest of its share would sit idle; for more GPUs per trial raise "
            "sweep.workers_per_trial")
    if 0 < g < 1 and s.workers_per_trial > 1:
        raise ConfigError(
            f"sweep.gpus_per_worker {g} shares a GPU, but a trial with workers_per_trial "
            f"{s.workers_per_trial} would put several DDP ranks on one GPU (NCCL refuses that); "
            "use whole GPUs for multi-worker trials, fractions for one-worker trials"
        )


def seeded_repeats(cfg: ExperimentConfig) -> ExperimentConfig:
    """A grid's sweep.num_samples repeats as a train.seed dimension (train.seed, +1, ...) and
    num_samples 1: Tune would run each repeat of a point with the same config, seed included,
    so with the same result, and the repeats would say nothing about run-to-run spread."""
    s = cfg.sweep
    if s.search != "grid" or s.num_samples == 1:
        return cfg
    if any(d.key == "train.seed" for d in parse_space(s.space)):
        raise ConfigError(f"sweep.num_samples {s.num_samples} repeats a grid that searches train.seed, so every "
                          "repeat would be a copy: set sweep.num_samples to 1, or stop searching train.seed")
    seeds = [cfg.train.seed + i for i in range(s.num_samples)]
    return replace(cfg, {"sweep.space": {**s.space, "train.seed": seeds}, "sweep.num_samples": 1})


def searched_keys(cfg: ExperimentConfig) -> list[str]:
    """The dotted keys a validated experiment searches, in YAML order."""
    return [d.key for d in parse_space(cfg.sweep.space)]
