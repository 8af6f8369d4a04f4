"""The sweep's product: `trials.parquet` and `epochs.parquet` in the sweep folder.

Plain Python and pyarrow (no Ray), so notebooks and tests can use the schema directly.

- trials.parquet: one row per trial. The fixed columns in `TRIAL_COLUMNS`, then every
  config value as its own column, named as `mae.config.flatten` names it ("mask.ratio",
  "model.decoder_depth", ...), typed from the config dataclasses.
- epochs.parquet: one row per (trial_id, epoch), columns in `EPOCH_COLUMNS`.

Both are rewritten whole, atomically (a temporary file renamed into place), each time a
trial finishes and at most every `min_interval_s` while trials run, so a crash or Ctrl-C
never leaves a half-written table and loses no finished trial. After a retry an epoch can
be reported twice; rows are keyed by (trial_id, epoch) and the last report wins.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import time
import types
import typing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mae.config import ExperimentConfig, flatten
from mae.files import replaced_atomically
# Column: one column type for every table (name, Arrow type, meaning)
from mae.results import Column, UnreadableTableError, unreadable_table_message

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"


TRIAL_COLUMNS: list[Column] = [
    Column("trial_id", pa.string(), "Ray Tune trial id; the trial's Train run is `train-<trial_id>`"),
    Column("sweep", pa.string(), "sweep name (the sweep folder's name)"),
    Column("status", pa.string(), "RUNNING, TERMINATED (finished and probed), STOPPED "
                                   "(ended early by the scheduler, not probed) or ERROR"),
    Column("params", pa.string(), "the searched values of this trial, as JSON {key: value}"),
    Column("objective", pa.string(), "name of the metric the sweep optimises (sweep.metric)"),
    Column("probe_top1", pa.float64(), "quick-probe top-1 (the default objective) on training images held out "
                                       "from its fit (probe.quick_split val, the default) or on the test split"),
    Column("probe_train_top1", pa.float64(), "quick-probe top-1 on its own training features"),
    Column("probe_n_train", pa.int64(), "images the quick probe was fitted on"),
    Column("probe_n_test", pa.int64(), "images the quick probe was scored on (held-out or test, as probe_top1)"),
    Column("probe_seconds", pa.float64(), "seconds the quick probe took"),
    Column("final_train_loss", pa.float64(), "reconstruction loss of the last epoch"),
    Column("best_train_loss", pa.float64(), "lowest epoch reconstruction loss"),
    Column("best_epoch", pa.int64(), "epoch (1-based) of best_train_loss"),
    Column("epochs_completed", pa.int64(), "epochs trained, over all attempts"),
    Column("resumed_from_epoch", pa.int64(), "epoch the attempt that wrote the final checkpoint resumed from (0: it started fresh)"),
    Column("checkpoint_path", pa.string(), "final checkpoint folder, or a STOPPED trial's last one that Ray "
                                           "registered (null if none); with URI --storage a URI (fetch it first, "
                                           "e.g. ray.train.Checkpoint(uri).to_directory()); load with "
                                           "mae.engine.load_model"),
    Column("train_time_s", pa.float64(), "sum of epoch times over all attempts"),
    Column("wall_time_s", pa.float64(), "seconds of the trial's last attempt, start to end (training + probe)"),
    Column("images_per_sec", pa.float64(), "training throughput over all epochs, all workers together"),
    Column("world_size", pa.int64(), "Train workers (DDP processes) of the trial"),
    Column("seed", pa.int64(), "train.seed of the trial"),
    Column("code_version", pa.string(), "`git:<commit>` (`+dirty` when tracked files were modified), else `mae-<version>`"),
    Column("error", pa.string(), "last line of an ERROR trial's error (the exception and its message)"),
    Column("updated_at", pa.timestamp("us", tz="UTC"), "when this row was last written"),
]

# Set by the recorder from Tune's events, never copied from a trial's reported metrics.
RECORDER_COLUMNS = ("trial_id", "sweep", "status", "params", "error", "updated_at")

EPOCH_COLUMNS: list[Column] = [
    Column("trial_id", pa.string(), "Ray Tune trial id (joins trials.parquet)"),
    Column("epoch", pa.int64(), "epoch number, 1-based"),
    Column("step", pa.int64(), "optimizer steps done at the end of the epoch"),
    Column("train_loss", pa.float64(), "mean reconstruction loss of the epoch (all workers)"),
    Column("lr", pa.float64(), "learning rate at the last step of the epoch"),
    Column("epoch_time_s", pa.float64(), "seconds the epoch took"),
    Column("images_per_sec", pa.float64(), "training throughput of the epoch, all workers together"),
    Column("input_wait_frac", pa.float64(), "fraction of the epoch rank 0 spent waiting for its next batch: near 0, "
           "the step sets the pace; well above 0, the input pipeline does"),
]


def _arrow_type(hint: Any) -> pa.DataType:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _arrow_type(options[0]) if len(options) == 1 else pa.string()
    if hint is bool:
        return pa.bool_()
    if hint is int:
        return pa.int64()
    if hint is float:
        return pa.float64()
    return pa.string()  # str, and mappings (stored as JSON)


def config_columns(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, pa.DataType]]:
    """(column, type) for every config value, in `mae.config.flatten` order and naming."""
    out: list[tuple[str, pa.DataType]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(config_columns(hint, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", _arrow_type(hint)))
    return out


def trials_schema() -> pa.Schema:
    fixed = [pa.field(c.name, c.type) for c in TRIAL_COLUMNS]
    return pa.schema(fixed + [pa.field(name, t) for name, t in config_columns()])


def epochs_schema() -> pa.Schema:
    return pa.schema([pa.field(c.name, c.type) for c in EPOCH_COLUMNS])


def config_row(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as column values: mappings (sweep.space) as JSON text."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in flatten(cfg).items()}


# -- storage ---------------------------------------------------------------------------


def is_uri(path: str) -> bool:
    return "://" in path


def join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def write_uri_atomic(uri: str, write: Callable[[Any], None]) -> None:
    """`write(stream)` into a temporary object beside `uri`, then move it into place: a kill or an
    error mid-write leaves the old object whole."""
    fs, fs_path = pafs.FileSystem.from_uri(uri)
    tmp = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
    fs.move(tmp, fs_path)  # object stores: copy + delete, readers still never see a partial file


def write_table_atomic(table: pa.Table, path: str) -> None:
    """Write Parquet to a temporary name beside `path`, then rename it into place."""
    if is_uri(path):
        write_uri_atomic(path, lambda out: pq.write_table(table, out))
        return
    with replaced_atomically(Path(path)) as tmp:
        pq.write_table(table, tmp)


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock beside a local file (path's folder, .NAME.lock) for a read-modify-write
    of it: two jobs adding rows to one table at once would otherwise each write back only their own.

    flock(2): between processes of one host, and across hosts where the file system supports it
    (NFS v4, Lustre mounted with flock). Where it does not, the block runs unlocked, with a warning,
    rather than fail after the work whose row it writes."""
    import fcntl  # POSIX only: imported here, so that the module still imports elsewhere

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        held = True
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("cannot lock %s (%s): writing it unlocked; two jobs writing it at once may lose rows",
                        path, e)
            held = False
        try:
            yield
        finally:
            if held:
                fcntl.flock(lock, fcntl.LOCK_UN)


def read_table(path: str) -> pa.Table | None:
    """The table at `path` (local or URI), or None when there is no file there yet.

    Raises UnreadableTableError when it exists but cannot be read (corrupt, or storage
    that fails): the caller would rewrite it with only its own rows, losing every earlier one.
    """
    try:
        if is_uri(path):
            fs, fs_path = pafs.FileSystem.from_uri(path)
            if fs.get_file_info(fs_path).type == pafs.FileType.NotFound:
                return None
            return pq.read_table(fs_path, filesystem=fs)
        return pq.read_table(path) if Path(path).exists() else None
    except (OSError, pa.ArrowException) as e:
        raise UnreadableTableError(unreadable_table_message(path, e)) from e


def _clean(value: Any) -> Any:
    """Values Arrow accepts: NaN stays NaN, numpy scalars become Python ones."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return value.item()
    return value


# -- the recorder ----------------------------------------------------------------------


class SweepRecorder:
    """Keeps the rows of both tables and rewrites them; Ray's callback feeds it.

    Rows already in the folder's tables are loaded first, so a resumed sweep keeps them;
    a table that exists but cannot be read raises UnreadableTableError (and stays as it is).
    """

    def __init__(self, folder: str, sweep: str, objective: str, code_version: str,
                 min_interval_s: float = 10.0) -> None:
        self.folder = folder
        self.sweep = sweep
        self.objective = objective
        self.code_version = code_version
        self.min_interval_s = min_interval_s
        self.trials: dict[str, dict[str, Any]] = {}
        self.epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self.finished_before: set[str] = set()
        self._last_write: float | None = None
        self._dirty = False
        self.load_existing()

    @property
    def trials_path(self) -> str:
        return join(self.folder, TRIALS_FILE)

    @property
    def epochs_path(self) -> str:
        return join(self.folder, EPOCHS_FILE)

    def load_existing(self) -> None:
        trials = read_table(self.trials_path)
        if trials is not None:
            for row in trials.to_pylist():
                self.trials[row["trial_id"]] = row
        # finished in an earlier session: the callback keeps these rows as they are
        self.finished_before = {t for t, row in self.trials.items() if row["status"] == "TERMINATED"}
        epochs = read_table(self.epochs_path)
        if epochs is not None:
            for row in epochs.to_pylist():
                self.epochs[(row["trial_id"], int(row["epoch"]))] = row

    # -- updates ---------------------------------------------------------------------

    def trial(self, trial_id: str, cfg: ExperimentConfig, params: dict[str, Any], status: str,
              error: str | None = None) -> dict[str, Any]:
        """Create or update a trial's row (config columns, status); returns the row."""
        row = self.trials.get(trial_id)
        if row is None:
            row = {c.name: None for c in TRIAL_COLUMNS}
            row.update(trial_id=trial_id, sweep=self.sweep, objective=self.objective,
                       code_version=self.code_version)
        row.update(config_row(cfg))
        row.update(params=json.dumps(params, sort_keys=True), status=status, seed=cfg.train.seed)
        if status != "ERROR":
            row["error"] = None  # a failed trial retried by --resume carries its old error no further
        elif error is not None:
            lines = [line.strip() for line in error.splitlines() if line.strip()]
            row["error"] = lines[-1][:500] if lines else error
        row["updated_at"] = _now()
        self.trials[trial_id] = row
        self._dirty = True
        return row

    def epoch(self, trial_id: str, metrics: dict[str, Any]) -> None:
        """One epoch's metrics as reported live; a repeat of (trial_id, epoch) replaces it."""
        if "epoch" not in metrics:
            return
        row = {c.name: _clean(metrics.get(c.name)) for c in EPOCH_COLUMNS}
        row["trial_id"] = trial_id
        row["epoch"] = int(metrics["epoch"])
        self.epochs[(trial_id, row["epoch"])] = row
        self._dirty = True

    def finish(self, trial_id: str, final: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """A trial's last report: the probe and summary columns, and its whole epoch history.

        The history comes from the final checkpoint, which carries every epoch over all
        attempts: it replaces the live rows, so retries leave neither gaps nor repeats.
        A finished trial has no error.
        """
        row = self.trials[trial_id]
        for c in TRIAL_COLUMNS:
            if c.name in final and c.name not in RECORDER_COLUMNS:
                row[c.name] = _clean(final[c.name])
        row["error"] = None
        row["updated_at"] = _now()
        if history:
            for key in [k for k in self.epochs if k[0] == trial_id]:
                del self.epochs[key]
            for metrics in history:
                self.epoch(trial_id, metrics)
        self._dirty = True

    def stopped(self, trial_id: str, checkpoint_path: str | None = None) -> None:
        """A trial ended early (a scheduler stopped it): its loss columns from the live epochs,
        and the last checkpoint its Train run wrote."""
        losses = sorted((e, r["train_loss"]) for (t, e), r in self.epochs.items()
                        if t == trial_id and r.get("train_loss") is not None)
        if losses:
            best_epoch, best = min(losses, key=lambda item: item[1])
            self.trials[trial_id].update(final_train_loss=losses[-1][1], best_train_loss=best,
                                         best_epoch=best_epoch, epochs_completed=len(losses))
        self.trials[trial_id]["checkpoint_path"] = checkpoint_path
        self._dirty = True

    # -- writing ---------------------------------------------------------------------

    def write(self, force: bool = True) -> bool:
        """Rewrite both tables (unless not forced and written less than min_interval_s ago)."""
        now = time.monotonic()
        recent = self._last_write is not None and now - self._last_write < self.min_interval_s
        if not self._dirty or (not force and recent):
            return False
        write_table_atomic(self.trials_table(), self.trials_path)
        write_table_atomic(self.epochs_table(), self.epochs_path)
        self._last_write, self._dirty = now, False
        return True

    def trials_table(self) -> pa.Table:
        schema = trials_schema()
        rows = [{f.name: row.get(f.name) for f in schema} for row in self.trials.values()]
        return pa.Table.from_pylist(rows, schema=schema)

    def epochs_table(self) -> pa.Table:
        rows = [self.epochs[k] for k in sorted(self.epochs)]
        return pa.Table.from_pylist(rows, schema=epochs_schema())


def _now() -> Any:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc)


def summarize(trials: pa.Table, objective: str, mode: str, searched: list[str]) -> str:
    """A text table of the trials, best first by the objective (missing values last)."""
    df = trials.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)  # ints stay ints beside nulls
    if df.empty:
        return "(no trials)"
    columns = ["trial_id", "status", *[k for k in searched if k in df.columns], objective,
               "final_train_loss", "epochs_completed", "wall_time_s"]
    columns = list(dict.fromkeys(c for c in columns if c in df.columns))
    if objective in df.columns:
        df = df.sort_values(objective, ascending=mode == "min", na_position="last")
    return df[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def schema_markdown() -> str:
    """The documented columns of both tables, as Markdown (the README's tables come from this)."""
    lines = ["trials.parquet:", "", "| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{c.name}` | {c.type} | {c.meaning} |" for c in TRIAL_COLUMNS]
    lines += ["| `<section>.<key>` | per config field | every config value, e.g. `mask.ratio`, "
              "`model.decoder_depth` (`sweep.space` as JSON) |", "", "epochs.parquet:", "",
              "| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{c.name}` | {c.type} | {c.meaning} |" for c in EPOCH_COLUMNS]
    return "\n".join(lines)
