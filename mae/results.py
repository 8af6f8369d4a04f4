"""Sweep results for humans: a sweep folder's Parquet tables as pandas frames.

One folder per sweep (written by ray_jobs/; see ray_jobs/README.md for the columns):

- `trials.parquet`: one row per trial (config values as `section.key` columns, the quick
  probe's top-1, losses, throughput, the final checkpoint);
- `epochs.parquet`: one row per (trial, epoch);
- `probe.parquet` (`ray_jobs/linear_probe.py`): one row per (trial, linear-probe run);
- `finetune.parquet` (`ray_jobs/finetune.py`): one row per (trial, fine-tuning run);
  `init` says whether it started from the trial's encoder or from scratch;
- `experiment.yaml`: the resolved experiment the sweep ran.

`load_sweep(folder)` reads them all into a `Sweep`; `Sweep.joined` is one row per trial
with the latest linear-probe and fine-tuning results beside the trial's columns;
`list_sweeps(root)` lists sweep folders, newest first; `results_dir()` picks the folder a
notebook reads (argument, then `$MAE_RESULTS_DIR`, then the newest sweep under
./results). The schemas of probe.parquet and finetune.parquet live here too, so the jobs
that write them and the readers agree. Plain pandas and pyarrow: no Ray, no torch.
"""

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mae.config import ExperimentConfig, FinetuneConfig, ProbeConfig

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
PROBE_FILE = "probe.parquet"
FINETUNE_FILE = "finetune.parquet"
EXPERIMENT_FILE = "experiment.yaml"
RESULTS_DIR_ENV = "MAE_RESULTS_DIR"
DEFAULT_ROOT = "results"


class ResultsNotFoundError(FileNotFoundError):
    """No sweep folder where we looked; the message says where to point."""


# -- the tables the reuse jobs write ------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    meaning: str


_RUN_COLUMNS = [
    Column("trial_id", pa.string(), "the sweep trial whose encoder was used (joins trials.parquet); "
                                    "null for a checkpoint given with --checkpoint"),
    Column("run_id", pa.string(), "one run of the job (UTC time + random suffix; --resume RUN_ID continues "
                                  "it); with trial_id, the key"),
    Column("sweep", pa.string(), "sweep name (the sweep folder's name); null for a --checkpoint run"),
    Column("source_checkpoint", pa.string(), "the pretrained checkpoint the encoder was loaded from"),
    Column("selected_by", pa.string(), "trials.parquet column the trial was chosen by (the sweep's objective)"),
    Column("selected_value", pa.float64(), "the trial's value of selected_by"),
    Column("selected_rank", pa.int64(), "1 for the best trial by selected_by, 2 for the next, ..."),
    Column("status", pa.string(), "FINISHED or ERROR"),
    Column("top1", pa.float64(), "test top-1 after the last epoch"),
    Column("best_top1", pa.float64(), "highest test top-1 over the epochs"),
    Column("test_images", pa.int64(), "test images top1 and best_top1 are measured on (probe.test_subset / "
                                      "finetune.test_subset of them, spread over the split, else all; an "
                                      "unreadable one is counted here but left out of top1)"),
    Column("final_train_loss", pa.float64(), "training loss of the last epoch"),
    Column("epochs_completed", pa.int64(), "epochs run"),
    Column("seconds", pa.float64(), "seconds the run took on its worker (data, training, evaluation)"),
    Column("world_size", pa.int64(), "Train workers of the run"),
    Column("start_epoch", pa.int64(), "the epoch the run's last attempt began at: 0, or that of the checkpoint "
                                      "it resumed from (a worker failed, or --resume; seconds counts that attempt "
                                      "alone)"),
    Column("history", pa.string(), "per-epoch metrics as JSON [{epoch, train_loss, test_top1, ...}]"),
    Column("checkpoint_path", pa.string(), "fine-tune: the saved run (classifier.pt, result.json); probe: the "
                                           "trained head (BatchNorm statistics + linear), a checkpoint folder "
                                           "that mae.probe.load_probe_head reads"),
    Column("code_version", pa.string(), "`git:<commit>[+dirty]`, else `mae-<version>`"),
    Column("error", pa.string(), "last line of the error of an ERROR run"),
    Column("created_at", pa.timestamp("us", tz="UTC"), "when the row was written"),
]

PROBE_COLUMNS: list[Column] = _RUN_COLUMNS
FINETUNE_COLUMNS: list[Column] = _RUN_COLUMNS[:8] + [
    Column("init", pa.string(), "pretrained (the trial's encoder) or scratch (same schedule, random weights)"),
    Column("images_per_sec", pa.float64(), "training throughput, all workers together"),
] + _RUN_COLUMNS[8:]
# Besides these: the recipe, one column per value of the config section (`probe.*` or
# `finetune.*`), and `model.name`, `data.dataset`, `train.seed`.
CONTEXT_KEYS = ("model.name", "data.dataset", "train.seed")


def _arrow_type(hint: Any) -> pa.DataType:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _arrow_type(options[0]) if len(options) == 1 else pa.string()
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64()}.get(hint, pa.string())


def _section_fields(section: str, cls: type) -> list[pa.Field]:
    hints = typing.get_type_hints(cls)
    return [pa.field(f"{section}.{f.name}", _arrow_type(hints[f.name])) for f in dataclasses.fields(cls)]


def _context_fields() -> list[pa.Field]:
    out = []
    for key in CONTEXT_KEYS:
        section, name = key.split(".")
        cls = typing.get_type_hints(ExperimentConfig)[section]
        out.append(pa.field(key, _arrow_type(typing.get_type_hints(cls)[name])))
    return out


def probe_schema() -> pa.Schema:
    """probe.parquet: the run columns, then `probe.*` and the context columns."""
    return pa.schema([pa.field(c.name, c.type) for c in PROBE_COLUMNS] + _section_fields("probe", ProbeConfig)
                     + _context_fields())


def finetune_schema() -> pa.Schema:
    """finetune.parquet: the run columns, then `finetune.*` and the context columns."""
    return pa.schema([pa.field(c.name, c.type) for c in FINETUNE_COLUMNS]
                     + _section_fields("finetune", FinetuneConfig) + _context_fields())


# -- reading ------------------------------------------------------------------------------


class UnreadableTableError(ValueError):
    """A results table exists but cannot be read; it has been left as it is."""


def unreadable_table_message(path: str | os.PathLike, error: Exception) -> str:
    return (f"cannot read {path} ({error}); it holds the rows of earlier runs and was left as it is. "
            "Restore it from a copy (or wait out a storage failure), or move it aside to start a new table; "
            "then run the command again")


def _read(path: Path, schema: pa.Schema | None = None) -> pd.DataFrame:
    """A table as a DataFrame; a missing file gives an empty frame (with the schema's columns).
    Raises UnreadableTableError when it exists but cannot be read."""
    if path.is_file():
        try:
            return pq.read_table(path).to_pandas()
        except (OSError, pa.ArrowException) as e:
            raise UnreadableTableError(unreadable_table_message(path, e)) from e
    if schema is not None:
        return schema.empty_table().to_pandas()
    return pd.DataFrame()


def _read_experiment(folder: Path) -> dict[str, Any]:
    path = folder / EXPERIMENT_FILE
    if not path.is_file():
        return {}
    import yaml

    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UnreadableTableError(f"{path} is not valid YAML ({e}); the sweep wrote it when it began: restore it "
                                   "from a copy, or read the tables with pyarrow") from e
    if not isinstance(values, dict):
        raise UnreadableTableError(f"{path} holds a {type(values).__name__}, not the sweep's experiment")
    return values


@dataclass
class Sweep:
    """The tables of one sweep folder. Missing tables are empty frames."""

    folder: Path
    trials: pd.DataFrame
    epochs: pd.DataFrame
    probe: pd.DataFrame
    finetune: pd.DataFrame
    experiment: dict[str, Any]  # experiment.yaml, {} when absent

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def objective(self) -> str:
        """The metric the sweep optimised (sweep.metric)."""
        if "objective" in self.trials and self.trials["objective"].notna().any():
            return str(self.trials["objective"].dropna().iloc[0])
        return self.experiment.get("sweep", {}).get("metric", "probe_top1")

    @property
    def mode(self) -> str:
        """'max' or 'min': which way the objective improves."""
        if "sweep.mode" in self.trials and self.trials["sweep.mode"].notna().any():
            return str(self.trials["sweep.mode"].dropna().iloc[0])
        return self.experiment.get("sweep", {}).get("mode", "max")

    @property
    def searched(self) -> list[str]:
        """The config keys the sweep varied, in the order the trials list them."""
        keys: dict[str, None] = {}
        for text in self.trials.get("params", pd.Series(dtype=str)).dropna():
            keys.update(dict.fromkeys(json.loads(text)))
        return list(keys)

    def labels(self) -> pd.Series:
        """A short label per trial ('mask.ratio=0.75'), indexed by trial_id. Labels are unique: trials
        at the same point (Optuna may draw a point twice) get their trial_id added,
        so a plot grouped by label draws each trial on its own."""
        searched = self.searched

        def label(row: pd.Series) -> str:
            return ", ".join(f"{k}={_fmt(row[k])}" for k in searched if k in row) or str(row["trial_id"])

        if self.trials.empty:
            return pd.Series(dtype=str)
        labels = self.trials.set_index("trial_id", drop=False).apply(label, axis=1)
        shared = labels.duplicated(keep=False)
        return labels.where(~shared, labels + " [" + labels.index.astype(str) + "]")

    @property
    def finished(self) -> pd.DataFrame:
        """Trials that ran to the end (status TERMINATED)."""
        return self.trials[self.trials["status"] == "TERMINATED"] if "status" in self.trials else self.trials

    @property
    def joined(self) -> pd.DataFrame:
        """One row per trial: the trial's columns, then the latest finished runs of the reuse jobs.

        Added columns: `linear_top1`, `linear_best_top1`, `linear_runs` (probe.parquet);
        `finetune_top1`, `finetune_best_top1`, `finetune_runs` (init pretrained) and
        `scratch_top1`, `scratch_best_top1`, `scratch_runs` (init scratch), from finetune.parquet.
        NaN where a trial has no such run.
        """
        out = self.trials.copy()
        parts = [("linear", self.probe, None), ("finetune", self.finetune, "pretrained"),
                 ("scratch", self.finetune, "scratch")]
        for prefix, table, init in parts:
            latest = _latest_runs(table, init)
            out = out.merge(latest.rename(columns={"top1": f"{prefix}_top1", "best_top1": f"{prefix}_best_top1",
                                                   "runs": f"{prefix}_runs"}),
                            on="trial_id", how="left")
        return out

    def epochs_labelled(self) -> pd.DataFrame:
        """epochs.parquet with each trial's searched values and `label` beside every row."""
        if self.epochs.empty:
            return self.epochs.assign(label=pd.Series(dtype=str))
        keep = ["trial_id", *[k for k in self.searched if k in self.trials]]
        frame = self.epochs.merge(self.trials[keep], on="trial_id", how="left")
        return frame.assign(label=frame["trial_id"].map(self.labels()))

    def best(self, k: int = 1, metric: str | None = None) -> pd.DataFrame:
        """The best k finished trials by `metric` (default: the objective), best first."""
        metric = metric or self.objective
        finished = self.finished
        if metric not in finished:
            raise KeyError(f"trials.parquet of {self.folder} has no column {metric!r}")
        valued = finished.dropna(subset=[metric])
        if not valued.empty and not pd.api.types.is_numeric_dtype(valued[metric].infer_objects()):
            raise KeyError(f"column {metric!r} of trials.parquet of {self.folder} is not numeric")
        ascending = self.mode == "min" if metric == self.objective else lower_is_better(metric)
        # ties in trial id order, so that which of two equal trials makes the top k does not vary
        return valued.sort_values([metric, "trial_id"], ascending=[ascending, True], kind="stable").head(k)


def _latest_runs(table: pd.DataFrame, init: str | None) -> pd.DataFrame:
    """Per trial: top1 and best_top1 of the newest FINISHED run (and how many there were)."""
    columns = ["trial_id", "top1", "best_top1", "runs"]
    if table.empty or "trial_id" not in table:
        return pd.DataFrame(columns=columns).astype({"top1": float, "best_top1": float, "runs": "Int64"})
    runs = table[table["status"] == "FINISHED"].dropna(subset=["trial_id"])
    if init is not None:
        runs = runs[runs["init"] == init]
    runs = runs.sort_values("created_at")
    counts = runs.groupby("trial_id").size().rename("runs")
    latest = runs.groupby("trial_id").tail(1).set_index("trial_id")[["top1", "best_top1"]]
    return latest.join(counts).reset_index()[columns]


def lower_is_better(metric: str) -> bool:
    """Losses and times improve downwards; accuracies (and throughput) upwards."""
    return any(word in metric for word in ("loss", "time", "seconds", "error"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_root() -> Path:
    """./results, or ../results from a sub-folder such as analysis/ (where Jupyter starts a notebook's kernel)."""
    here, parent = Path(DEFAULT_ROOT), Path("..") / DEFAULT_ROOT
    return parent if not here.is_dir() and parent.is_dir() else here


def with_model_args(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (trials or joined) plus the resolved model shape of each row.

    Adds `embed_dim`, `depth`, `patch_size`, `img_size`, `decoder_embed_dim`,
    `decoder_depth`: the variant's values (`model.name`) where the trial left the
    `model.*` override unset, so an unset decoder depth reads as the depth it trained with.
    """
    from mae.models import OVERRIDABLE, model_args  # local: the rest of this module needs no torch

    keys = ["embed_dim", "depth", "patch_size", "img_size", "decoder_embed_dim", "decoder_depth"]

    def resolve(row: pd.Series) -> pd.Series:
        overrides = {k: _plain(row[f"model.{k}"]) for k in OVERRIDABLE
                     if f"model.{k}" in row and not _missing(row[f"model.{k}"])}
        args = model_args(row["model.name"], **overrides)
        return pd.Series({k: args[k] for k in keys})

    if frame.empty:
        return frame.assign(**{k: pd.Series(dtype="Int64") for k in keys})
    return pd.concat([frame, frame.apply(resolve, axis=1).astype("Int64")], axis=1)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _plain(value: Any) -> Any:
    """numpy scalars (what pandas hands out) as Python ones."""
    return value.item() if hasattr(value, "item") else value


def is_sweep_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / TRIALS_FILE).is_file()


def load_sweep(folder: str | os.PathLike | None = None) -> Sweep:
    """Read a sweep folder (default: `results_dir()`) into a `Sweep`."""
    folder = results_dir(folder)
    return Sweep(
        folder=folder,
        trials=_read(folder / TRIALS_FILE),
        epochs=_read(folder / EPOCHS_FILE),
        probe=_read(folder / PROBE_FILE, probe_schema()),
        finetune=_read(folder / FINETUNE_FILE, finetune_schema()),
        experiment=_read_experiment(folder),
    )


def list_sweeps(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """The sweep folders under `root` (default `default_root()`) holding a trials.parquet, newest first.

    Columns: name, folder, trials, finished, objective, best (the best objective value),
    probed / finetuned (whether probe.parquet / finetune.parquet exist), updated (UTC),
    error (why a sweep's tables cannot be read; it is listed with its counts empty, and
    does not keep the others from being listed).
    """
    root = Path(root) if root is not None else default_root()
    rows = []
    for folder in sorted(p for p in root.iterdir() if is_sweep_folder(p)) if root.is_dir() else []:
        updated = pd.Timestamp((folder / TRIALS_FILE).stat().st_mtime, unit="s", tz="UTC")
        try:
            sweep = load_sweep(folder)
        except (UnreadableTableError, OSError) as e:  # a damaged table or experiment.yaml
            rows.append({"name": folder.name, "folder": str(folder), "updated": updated,
                         "error": f"{type(e).__name__}: {e}"})
            continue
        finished = sweep.finished
        objective = sweep.objective
        best = math.nan
        if objective in finished and finished[objective].notna().any():
            best = finished[objective].min() if sweep.mode == "min" else finished[objective].max()
        rows.append({
            "name": sweep.name, "folder": str(folder), "trials": len(sweep.trials), "finished": len(finished),
            "objective": objective, "best": best, "probed": (folder / PROBE_FILE).is_file(),
            "finetuned": (folder / FINETUNE_FILE).is_file(), "updated": updated, "error": None,
        })
    columns = ["name", "folder", "trials", "finished", "objective", "best", "probed", "finetuned", "updated",
               "error"]
    frame = pd.DataFrame(rows, columns=columns).astype({"trials": "Int64", "finished": "Int64"})
    return frame.sort_values("updated", ascending=False, kind="stable").reset_index(drop=True)


def newest_sweep(root: str | os.PathLike | None = None) -> Path:
    """The sweep folder under `root` (default `default_root()`) whose trials table was written last."""
    root = Path(root) if root is not None else default_root()
    sweeps = list_sweeps(root)
    if sweeps.empty:
        raise ResultsNotFoundError(
            f"no sweep folder (one holding {TRIALS_FILE}) under {Path(root).resolve()}; run a sweep "
            f"(python ray_jobs/sweep_mask_ratio.py) or set ${RESULTS_DIR_ENV} to a sweep folder"
        )
    return Path(sweeps.loc[0, "folder"])


def results_dir(path: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> Path:
    """The sweep folder to read: `path`, else $MAE_RESULTS_DIR, else the newest sweep under `root`
    (default: ./results, or ../results from analysis/).

    `path` (or the variable) may also name a folder of sweeps; its newest sweep is taken.
    """
    chosen = path if path not in (None, "") else os.environ.get(RESULTS_DIR_ENV) or None
    if chosen is None:
        return newest_sweep(root)
    chosen = Path(chosen).expanduser()
    if is_sweep_folder(chosen):
        return chosen
    if chosen.is_dir():
        return newest_sweep(chosen)
    raise ResultsNotFoundError(f"{chosen} is neither a sweep folder (holding {TRIALS_FILE}) nor a folder of them")


def summarize(sweep: Sweep, columns: list[str] | None = None) -> pd.DataFrame:
    """One row per trial, best first by the objective: searched values, objective, reuse results.

    Default columns: trial_id, status, the searched keys, the objective, linear_top1,
    finetune_top1, scratch_top1 (those that have any value), final_train_loss,
    epochs_completed, images_per_sec, wall_time_s.
    """
    joined = sweep.joined
    if columns is None:
        reuse = [c for c in ("linear_top1", "finetune_top1", "scratch_top1") if joined[c].notna().any()]
        columns = ["trial_id", "status", *sweep.searched, sweep.objective, *reuse, "final_train_loss",
                   "epochs_completed", "images_per_sec", "wall_time_s"]
    columns = [c for c in dict.fromkeys(columns) if c in joined]
    if sweep.objective in joined:
        joined = joined.sort_values(sweep.objective, ascending=sweep.mode == "min", na_position="last")
    return joined[columns].reset_index(drop=True)
