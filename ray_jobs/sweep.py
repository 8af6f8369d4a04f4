"""The shared sweep driver: Ray Tune over TorchTrainer runs, results into Parquet.

A trial is `run_trial`: it builds a TorchTrainer named `train-<trial_id>` (so a rerun of
the trial resumes its Train run from the last checkpoint), fits it, then quick-probes the
final checkpoint's frozen encoder; the probe's top-1 is the sweep objective
(reconstruction loss falls as the mask ratio falls, so it must not steer the search; it
is reported too). `ParquetCallback` turns Tune's events into the sweep folder's
`trials.parquet` and `epochs.parquet` (see `ray_jobs.results`).

The presets `sweep_mask_ratio.py` and `sweep_decoder.py` only choose a default
experiment file; everything else (flags, validation, resume) lives here.
"""

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import yaml
from ray import tune
from ray.train import Result
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

import mae
from mae.config import (
    EXECUTION_KEYS, ConfigError, ExperimentConfig, config_from_dict, flatten, load_config, parse_override, replace,
    to_dict,
)
from mae.data import CorruptDatasetError, DatasetNotFoundError
from mae.files import write_text_atomic
from mae.probe import quick_probe_splits
from ray_jobs import cluster, results
from ray_jobs.pretrain import FaultInjection, checkpoint_location, fit_and_probe, resolve_storage
from ray_jobs.space import Choice, Dimension, Range, seeded_repeats, validate_experiment

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.yaml"  # the resolved config a sweep ran with, read back by --resume
FINAL_MARK = "probe_top1"  # only a trial's last report (after the probe) carries it


# -- the trial -------------------------------------------------------------------------


def run_trial(params: dict[str, Any], base: dict[str, Any], options: dict[str, Any]) -> None:
    """One Tune trial: pretrain with a TorchTrainer, probe, report the objective."""
    t0 = time.perf_counter()
    cfg = replace(config_from_dict(base), params)
    trial_id = tune.get_context().get_trial_id()
    fault = None
    if options.get("fail_at_epoch"):
        fault = FaultInjection(options["fail_at_epoch"], os.path.join(options["marker_dir"], f"fault-{trial_id}"))
    out = fit_and_probe(cfg, train_run_name(trial_id), options["train_storage"],
                        callbacks=[TuneReportCallback()], fault=fault)
    history = out.pop("history")
    out["wall_time_s"] = time.perf_counter() - t0
    out["train_loss"] = out.get("final_train_loss")  # what a scheduler (ASHA) watches
    out["history_json"] = json.dumps(history)
    tune.report(out)


# Ray Train's logger that announces, at INFO, each run snapshot it reads
CHECKPOINT_MANAGER_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


def train_run_name(trial_id: str) -> str:
    """The Train run of a trial, a folder of the sweep folder (a rerun of the trial resumes it)."""
    return f"train-{trial_id}"


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


class FinalMetricOptunaSearch(OptunaSearch):
    """OptunaSearch that ignores the per-epoch reports, which do not carry the objective."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


# -- results ---------------------------------------------------------------------------


class ParquetCallback(tune.Callback):
    """Tune events -> `SweepRecorder` rows -> the two Parquet tables (see ray_jobs.results).

    Tables are rewritten when a trial starts, finishes or fails, and at most every
    `min_interval_s` while epochs come in. `interrupt_after` (testing) sends this process
    SIGINT, as Ctrl-C would, once that many trials have finished.
    """

    def __init__(self, folder: str, base: ExperimentConfig, code_version: str, interrupt_after: int = 0,
                 min_interval_s: float = 10.0) -> None:
        self.folder = folder
        self.base = base
        self.code_version = code_version
        self.interrupt_after = interrupt_after
        self.min_interval_s = min_interval_s
        self.completed = 0
        self.total_trials: int | None = None
        self._recorder: results.SweepRecorder | None = None

    @property
    def recorder(self) -> results.SweepRecorder:
        if self._recorder is None:  # lazily: picks up the tables a resumed sweep already wrote
            self._recorder = results.SweepRecorder(self.folder, Path(self.folder).name, self.base.sweep.metric,
                                                   self.code_version, self.min_interval_s)
        return self._recorder

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; the rows live in the tables.
        return {**self.__dict__, "_recorder": None}

    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        self.total_trials = total_num_samples

    def _row(self, trial: Any, status: str, error: str | None = None) -> None:
        params = dict(trial.config)
        try:
            cfg = replace(self.base, params)
        except ConfigError as e:  # a point validation could not rule out: the trial fails, the sweep goes on
            status, error = "ERROR", error or f"not a valid experiment: {e}"
            try:
                cfg = replace(self.base, params, check=False)  # its columns (and label) show the point drawn
            except ConfigError:  # a value of the wrong type: the base config's columns, the point in params
                cfg = self.base
        self.recorder.trial(trial.trial_id, cfg, params, status, error)

    def _finished_before(self, trial: Any) -> bool:
        """Whether the trial finished in an earlier session of this sweep. Tune saves its own state
        at most every 10 s, so a session killed (SIGKILL, or SIGTERM, which skips Tune's last save)
        right after a trial finished leaves that trial RUNNING in Tune's state, and --resume runs it
        again: it trains nothing (its Train run is complete) and probes again. Its row, written when
        it finished, stays as it was (times, probe, updated_at)."""
        return trial.trial_id in self.recorder.finished_before

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._finished_before(trial):
            log.info("trial %s finished in an earlier session; its row is kept as written then", trial.trial_id)
            return
        self._row(trial, "RUNNING")
        self.recorder.write()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self._finished_before(trial):
            return
        if FINAL_MARK not in result:
            self.recorder.epoch(trial.trial_id, result)
            self.recorder.write(force=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        final = trial.last_result or {}
        if not self._finished_before(trial):
            if FINAL_MARK in final:
                self._row(trial, "TERMINATED")
                self.recorder.finish(trial.trial_id, final, json.loads(final.get("history_json") or "[]"))
            else:  # a scheduler ended it before the probe
                self._row(trial, "STOPPED")
                self.recorder.stopped(trial.trial_id, self._last_checkpoint(trial.trial_id))
            self.recorder.write()
        self.completed += 1
        if self.interrupt_after and self.completed >= self.interrupt_after:
            log.warning("--interrupt-after %d: interrupting the sweep as Ctrl-C would", self.interrupt_after)
            signal.raise_signal(signal.SIGINT)

    def _last_checkpoint(self, trial_id: str) -> str | None:
        """The newest checkpoint Ray registered for a stopped trial's Train run, or None.

        Registered, not merely present: a checkpoint folder is registered once Ray has copied
        it whole into storage, and the stop may have cut a copy short, leaving a folder whose
        checkpoint.pt is truncated. Ray's run snapshot (Result.from_path) lists the registered ones."""
        run = f"{self.folder.rstrip('/')}/{train_run_name(trial_id)}"
        quiet = logging.getLogger(CHECKPOINT_MANAGER_LOGGER)  # it would suggest starting a new run
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            checkpoint = Result.from_path(run).checkpoint
        except RuntimeError as e:  # no snapshot: stopped before its first checkpoint
            log.info("trial %s: no registered checkpoint in %s (%s)", trial_id, run, e)
            return None
        except Exception as e:  # noqa: BLE001 - a snapshot Ray cannot read (cut short, another version): no row lost
            log.warning("trial %s: Ray's record of its checkpoints in %s is unreadable (%s: %s); its row gets no "
                        "checkpoint_path", trial_id, run, type(e).__name__, e)
            return None
        finally:
            quiet.setLevel(level)
        return checkpoint_location(checkpoint, self.folder) if checkpoint is not None else None

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self._finished_before(trial):  # its row stays TERMINATED, as it finished; the exit status says 1
            log.warning("trial %s, finished in an earlier session, failed when run again (%s); its row keeps the "
                        "finished run's results", trial.trial_id, trial.get_error())
            return
        error = trial.get_error()
        self._row(trial, "ERROR", error=str(error) if error else "unknown error")
        self.recorder.write()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.recorder.write()


# -- building the Tuner ----------------------------------------------------------------


def tune_space(dims: list[Dimension], search: str) -> dict[str, Any]:
    """Our dimensions as Tune's param_space: grid_search for grids, domains for Optuna."""
    space: dict[str, Any] = {}
    for d in dims:
        if isinstance(d, Choice):
            space[d.key] = tune.grid_search(list(d.values)) if search == "grid" else tune.choice(list(d.values))
        elif isinstance(d, Range) and d.is_int:
            space[d.key] = (tune.lograndint if d.log else tune.randint)(int(d.low), int(d.high) + 1)
        else:
            space[d.key] = (tune.loguniform if d.log else tune.uniform)(float(d.low), float(d.high))
    return space


class FinishingASHA(ASHAScheduler):
    """ASHA that does not stop a trial on its last epoch's report: it has trained to the end,
    and only its probe is left. ASHA puts rungs at grace_period x 4^k, so with train.epochs a
    multiple of 4 one lies on the last epoch, and a trial cut there would lose its objective."""

    def __init__(self, last_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._last_epoch = last_epoch

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def tune_config(cfg: ExperimentConfig) -> tune.TuneConfig:
    s = cfg.sweep
    search_alg = None
    if s.search == "optuna":
        search_alg = FinalMetricOptunaSearch(metric=s.metric, mode=s.mode, seed=cfg.train.seed)
    scheduler = None
    if s.scheduler == "asha":
        # Rungs on the per-epoch training loss: the probe only runs at the end. Time is the
        # reported epoch, not Tune's report count: a retried trial reports the epochs since
        # its last checkpoint again, which would push the count past max_t before its last
        # epoch. max_t one past the last epoch, so that epoch is never cut off before its
        # probe; the final report (the probe's) carries no epoch, and ASHA passes it by.
        scheduler = FinishingASHA(last_epoch=cfg.train.epochs, time_attr="epoch", metric="train_loss", mode="min",
                                  max_t=cfg.train.epochs + 1, grace_period=max(1, cfg.train.epochs // 4))
    return tune.TuneConfig(
        search_alg=search_alg, scheduler=scheduler, num_samples=s.num_samples,
        max_concurrent_trials=s.max_concurrent, trial_dirname_creator=_trial_dirname,
    )


# -- resuming at another --max-concurrent ---------------------------------------------
#
# Tuner.restore brings back the TuneConfig pickled when the sweep began, max_concurrent_trials
# included, and Ray 2.60 has no argument to change it. Setting it on the restored Tuner is not
# enough either: Tune builds the search algorithm from it (grid: BasicVariantGenerator; Optuna:
# SearchGenerator(ConcurrencyLimiter(searcher))), then restores that algorithm's saved state over
# it, and the saved state holds the first run's limit. So a resumed sweep builds the search
# algorithm itself, from classes that keep the limit they were built with over that restore.


class LimitedVariantGenerator(BasicVariantGenerator):
    """Tune's grid/random generator whose max_concurrent survives `restore_from_dir`."""

    def restore_from_dir(self, dirpath: str) -> None:
        limit = self.max_concurrent
        super().restore_from_dir(dirpath)
        self.max_concurrent = limit


class LimitedSearchGenerator(SearchGenerator):
    """SearchGenerator over a ConcurrencyLimiter whose limit survives `restore_from_dir`."""

    def restore_from_dir(self, dirpath: str) -> None:
        limit = self.searcher.max_concurrent
        super().restore_from_dir(dirpath)
        self.searcher.set_max_concurrency(limit)


def resumed_tune_config(restored: tune.TuneConfig, max_concurrent: int) -> tune.TuneConfig:
    """The restored TuneConfig, limited to `max_concurrent` trials at once (see above).

    The search algorithm is the one tune.run would build from max_concurrent_trials, which
    is therefore cleared (tune.run would otherwise warn that it ignores it).
    """
    searcher = restored.search_alg  # as `tune_config` made it: None (grid) or the Optuna searcher
    if searcher is None:
        search_alg: Any = LimitedVariantGenerator(max_concurrent=max_concurrent)
    else:
        search_alg = LimitedSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))
    return dataclasses.replace(restored, search_alg=search_alg, max_concurrent_trials=None)


def restore_tuner(folder: str, fn: Any, callback: ParquetCallback, max_concurrent: int) -> tune.Tuner:
    """The sweep's Tuner as Tune saved it, with this run's callback and concurrency limit."""
    # resume_errored, not restart_errored: Tune's restart gives a failed trial a new trial_id, so it
    # would start a new Train run from epoch 0 beside its checkpoints, add a second row for its point,
    # and (Optuna) report for an id the searcher never suggested (a KeyError in OptunaSearch). Resumed,
    # it keeps its id; Optuna's study keeps it as failed (its result reaches the tables, not the study).
    tuner = tune.Tuner.restore(folder, fn, resume_unfinished=True, resume_errored=True)
    # Ray restores the pickled configs with no public way to change them: set them on the
    # restored Tuner. The callback is this run's (fresh options, e.g. no interrupt).
    local = tuner._local_tuner
    local.get_run_config().callbacks = [callback]
    local._tune_config = resumed_tune_config(local._tune_config, max_concurrent)
    return tuner


def trainable(base: ExperimentConfig, options: dict[str, Any]) -> Any:
    fn = tune.with_parameters(run_trial, base=to_dict(base), options=options)
    return tune.with_resources(fn, cluster.trial_resources())


# -- the command line ------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Everything decided before Ray starts: a bad experiment fails here."""

    cfg: ExperimentConfig
    dims: list[Dimension]
    storage: str
    name: str
    folder: str
    resume: bool


def build_parser(default_experiment: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=default_experiment, help=f"experiment YAML (default {default_experiment})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set train.epochs=5 "
                        "or --set 'sweep.space={mask.ratio: [0.5, 0.75]}'")
    p.add_argument("--storage", default="results",
                   help="folder (made absolute) or URI that holds sweep folders (default ./results)")
    p.add_argument("--name", help="sweep name, the sweep folder under --storage (default: the experiment's name)")
    p.add_argument("--num-samples", type=int, help="Optuna trials, or repeats of the grid (sweep.num_samples)")
    p.add_argument("--max-concurrent", type=int,
                   help="trials at once (sweep.max_concurrent); with --resume it replaces the saved one, up or down")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep in the folder: finished trials are kept, "
                        "unfinished and failed ones continue from their last checkpoints")
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS; 'auto' = the one `ray start` "
                                     "began on this machine); without one, an embedded Ray is started")
    testing = p.add_argument_group("fault injection (tests)")
    testing.add_argument("--fail-at-epoch", type=int, default=0, metavar="K",
                         help="kill each trial's rank-0 worker once, right after epoch K is reported; it "
                              "resumes from its last checkpoint (every train.checkpoint_every epochs)")
    testing.add_argument("--interrupt-after", type=int, default=0, metavar="N",
                         help="interrupt the sweep (as Ctrl-C) once N trials have finished")
    return p


def _exists(path: str) -> bool:
    if results.is_uri(path):
        fs, fs_path = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(fs_path).type != pafs.FileType.NotFound
    return Path(path).exists()


def _write_text(path: str, text: str) -> None:
    # a kill mid-write leaves no half file for --resume to trip on
    if results.is_uri(path):
        results.write_uri_atomic(path, lambda out: out.write(text.encode()))
    else:
        write_text_atomic(text, Path(path))


def write_experiment(path: str, cfg: ExperimentConfig) -> None:
    """The sweep's resolved experiment (experiment.yaml), which --resume reads back."""
    _write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_text(path: str) -> str:
    if results.is_uri(path):
        fs, fs_path = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(fs_path) as f:
            return f.read().decode()
    return Path(path).read_text()


# Execution keys whose change alters what a trial draws or computes in floating point (README: the pipeline,
# the workers and the device draw other random crops; precision and compile round differently)
DRAW_CHANGING_KEYS = frozenset({"data.pipeline", "data.num_workers", "train.device", "train.precision",
                                "train.compile", "train.compile_mode"})


def plan_sweep(args: argparse.Namespace) -> Plan:
    """Load, override and validate the experiment; decide the sweep folder. Raises ConfigError."""
    extra = []
    if args.num_samples is not None:
        extra.append(f"sweep.num_samples={args.num_samples}")
    if args.max_concurrent is not None:
        extra.append(f"sweep.max_concurrent={args.max_concurrent}")
    cfg = seeded_repeats(cluster.absolute_data_dir(load_config(args.experiment, list(args.overrides) + extra)))
    storage = resolve_storage(args.storage)
    name = args.name or cfg.name
    folder = results.join(storage, name)
    saved = results.join(folder, EXPERIMENT_FILE)
    if args.resume:
        if not _exists(saved):
            raise ConfigError(f"--resume: no sweep to resume in {folder} (no {EXPERIMENT_FILE}); "
                              "check --storage and --name")
        try:
            saved_values = yaml.safe_load(_read_text(saved))
            problem = "empty" if saved_values is None else f"holds a {type(saved_values).__name__}, not a config"
        except yaml.YAMLError as e:
            saved_values, problem = None, f"not YAML: {str(e).splitlines()[0]}"
        if not isinstance(saved_values, dict):
            raise ConfigError(f"--resume: {saved} is damaged ({problem}): it is the resolved config "
                              "the sweep started with; write it back (your --experiment file with the same --set "
                              "values), or start the sweep anew under another --name")
        if not results.is_uri(folder) and not any(Path(folder).glob("experiment_state-*.json")):
            raise ConfigError(f"--resume: {folder} was stopped before Tune saved any state, so no trial ran to "
                              "a result there; start anew under another --name (or remove that folder)")
        if "quick_split" not in saved_values.get("probe", {}):  # saved before f8c8e8f: its trials were
            saved_values.setdefault("probe", {})["quick_split"] = "test"  # scored on the test split; so are the rest
            log.warning("--resume: %s predates probe.quick_split; its remaining trials are scored as its first were, "
                        "on the test split", saved)
        saved_cfg = config_from_dict(saved_values)
        if saved_cfg.sweep.gpus_per_worker > 1:  # allowed before 9c08f1c; each worker drives one GPU
            log.warning("--resume: sweep.gpus_per_worker %g reserved GPUs its workers left idle; the remaining "
                        "trials reserve 1 per worker", saved_cfg.sweep.gpus_per_worker)
            saved_cfg = replace(saved_cfg, {"sweep.gpus_per_worker": 1.0})
        if args.max_concurrent is not None:
            saved_cfg = replace(saved_cfg, {"sweep.max_concurrent": args.max_concurrent})
        # Besides --max-concurrent, a resume may change where and how the remaining trials run (the data folder
        # after a move, loader workers, device, compile...), when --set names the key: mae.config.EXECUTION_KEYS.
        # They are saved into experiment.yaml below, so a later --resume keeps them.
        asked = flatten(cfg)
        named = {".".join(parse_override(text)[0]) for text in args.overrides}
        execution = {k: asked[k] for k in sorted(named & EXECUTION_KEYS - {"name"}) if k in asked}
        if execution:
            saved_cfg = replace(saved_cfg, execution)
            log.info("--resume: the remaining trials run with %s",
                     ", ".join(f"{k}={v!r}" for k, v in execution.items()))
        drawn = sorted(set(execution) & DRAW_CHANGING_KEYS)
        if drawn:
            log.warning("--resume: %s change(s) the crops, masks or arithmetic of the remaining trials (and of the "
                        "rest of an interrupted one), so they are not comparable draw for draw with the trials "
                        "that finished before", ", ".join(drawn))
        saved_flat = flatten(saved_cfg)
        differ = sorted(k for k in saved_flat if saved_flat[k] != asked.get(k))
        if differ:
            log.warning("--resume: continuing with the experiment saved in %s; this command differs in %s, "
                        "which is ignored", saved, ", ".join(differ))
        cfg = saved_cfg
    elif _exists(folder) and any(_exists(results.join(folder, f)) for f in
                                 (EXPERIMENT_FILE, results.TRIALS_FILE, "tuner.pkl")):
        raise ConfigError(f"sweep folder {folder} already holds a sweep: add --resume to continue it, "
                          "or choose another --name")
    if args.fail_at_epoch and args.fail_at_epoch >= cfg.train.epochs:
        raise ConfigError(f"--fail-at-epoch {args.fail_at_epoch} must be below train.epochs ({cfg.train.epochs})")
    dims = validate_experiment(cfg)
    cluster.check_dataset_here([cfg], args.address, quick_probe_splits(cfg))  # pretraining reads "train" too
    if args.resume:  # what this resume runs with (execution values from --set, --max-concurrent): the next one too
        write_experiment(saved, cfg)
    return Plan(cfg, dims, storage, name, folder, args.resume)


def code_version() -> str:
    """git commit of this checkout (+dirty when tracked files changed), else mae's version."""
    try:
        root = str(cluster.REPO_ROOT)
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"git:{sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"mae-{mae.__version__}"


def run_sweep(plan: Plan, args: argparse.Namespace) -> int:
    """Start or restore the Tuner, keep the tables, print the summary; the exit status."""
    cfg = plan.cfg
    # The objective arrives only with a trial's last report; epoch reports lack it.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    callback = ParquetCallback(plan.folder, cfg, code_version(), interrupt_after=args.interrupt_after)
    recorder = callback.recorder  # loads a resumed sweep's tables: an unreadable one fails here, before Ray starts
    mode = cluster.init_ray(args.address, trial_drivers=cfg.sweep.max_concurrent)
    marker_dir = plan.folder if not results.is_uri(plan.folder) else os.path.join(os.getcwd(), ".faults")
    options = {"train_storage": plan.folder, "fail_at_epoch": args.fail_at_epoch, "marker_dir": marker_dir}
    fn = trainable(cfg, options)
    log.info("sweep %s (%s Ray): %d searched key(s) %s, results in %s", plan.name, mode, len(plan.dims),
             [d.key for d in plan.dims], plan.folder)
    if plan.resume:
        tuner = restore_tuner(plan.folder, fn, callback, cfg.sweep.max_concurrent)
    else:
        write_experiment(results.join(plan.folder, EXPERIMENT_FILE), cfg)
        tuner = tune.Tuner(
            fn,
            param_space=tune_space(plan.dims, cfg.sweep.search),
            tune_config=tune_config(cfg),
            run_config=tune.RunConfig(name=plan.name, storage_path=plan.storage, callbacks=[callback],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    recorder.write()
    trials = recorder.trials_table()
    print()
    print(f"sweep {plan.name}: {trials.num_rows} trial(s), objective {cfg.sweep.metric} ({cfg.sweep.mode})")
    print(results.summarize(trials, cfg.sweep.metric, cfg.sweep.mode, [d.key for d in plan.dims]))
    print(f"trials table: {recorder.trials_path}")
    print(f"epochs table: {recorder.epochs_path}")
    done = [s for s in trials.column("status").to_pylist() if s in ("TERMINATED", "STOPPED", "ERROR")]
    if len(done) < max(len(grid), callback.total_trials or 0):
        print(f"interrupted: resume with the same command plus --resume (sweep folder {plan.folder})")
        return 130
    if grid.num_errors:
        print(f"{grid.num_errors} trial(s) failed (see the error column); --resume retries them")
        return 1
    return 0


def main(argv: list[str] | None = None, default_experiment: str = "experiments/sweep_mask_ratio.yaml",
         description: str = __doc__) -> int:
    args = build_parser(default_experiment, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plan = plan_sweep(args)
    except (ConfigError, DatasetNotFoundError, CorruptDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run_sweep(plan, args)
    except results.UnreadableTableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
