"""The shared driver of `linear_probe.py` and `finetune.py`: reuse the best encoders of a sweep.

1. Choose: the best K finished trials of a sweep folder's `trials.parquet` by a metric
   (default: the sweep's objective), or checkpoints named with `--checkpoint` (ours, a
   published reference MAE checkpoint, or HF ViTMAE weights; see `mae.pretrained`).
2. Configure: each trial's checkpoint carries the config it was pretrained with; the
   `data`, `probe` and `finetune` sections of `--experiment` (when given) replace its own,
   then `--set section.key=value` overrides apply. A foreign checkpoint takes the whole
   config from `--experiment`.
3. Run: one Ray Train `TorchTrainer` per chosen encoder, up to `--max-concurrent` at once
   (each driven from a light Ray task, as a sweep's trials are). Its worker calls the library
   (`mae.probe.linear_probe` or `mae.finetune.finetune`) and reports the result with a
   small checkpoint (`result.json`, plus the fine-tuned classifier), since Ray Train V2
   keeps only metrics that come with a checkpoint. The probe's trained head is written
   beside it, `<run>/probe_head/` (`mae.probe.save_probe_head`, atomic). Both also report
   each epoch, with a checkpoint every `probe.checkpoint_every` / `finetune.checkpoint_every`
   epochs, as pretraining does: a failed worker group (`sweep.max_failures`) resumes from
   the last one.
4. Record: one row per (trial, run) in `probe.parquet` / `finetune.parquet` in the sweep
   folder, schema in `mae.results`, rewritten atomically after every run (temporary
   file + rename), so rows of earlier runs are kept and a crash loses no finished run.
   `--resume RUN_ID` continues a run: its finished encoders are skipped, the others run
   again under their Train run names (Ray continues each from its last checkpoint). What a
   run set out to do (its arguments, encoders and their configs) is recorded before it
   starts, `<folder>/<kind>-runs/RUN_ID.json`, and a resume that would choose other
   encoders or run them with other settings is refused before Ray starts.
"""

import argparse
import datetime
import hashlib
import json
import logging
import shlex
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import yaml
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mae import results as mae_results
from mae.checkpoint import CheckpointError, load_checkpoint
from mae.config import (
    FINETUNE_RECIPE, PROBE_RECIPE, ConfigError, ExperimentConfig, apply_overrides, config_from_dict, flatten,
    load_config, recipe_changes, to_dict,
)
from mae.data import CorruptDatasetError, DatasetNotFoundError
from mae.files import write_text_atomic
from ray_jobs import cluster
from ray_jobs.pretrain import FaultInjection, RayReportCallback, checkpoint_epoch, local_folder
from ray_jobs.results import UnreadableTableError, locked, read_table, write_table_atomic
from ray_jobs.scratch import worker_scratch
from ray_jobs.space import check_worker_resources

log = logging.getLogger(__name__)

REPLACED_SECTIONS = ("data", "probe", "finetune")  # what --experiment replaces in a trial's own config
RESULT_FILE = "result.json"
RESULT_DIR = "result"  # the finished run's checkpoint folder (result.json, classifier.pt)
CLASSIFIER_FILE = "classifier.pt"
PROBE_HEAD_DIR = "probe_head"  # in the probe's Train run folder
FINISHED, ERROR = "FINISHED", "ERROR"


@dataclass(frozen=True)
class Target:
    """One encoder to reuse, with the config to run it under."""

    checkpoint: str
    cfg: ExperimentConfig
    trial_id: str | None = None
    selected_by: str | None = None
    selected_value: float | None = None
    selected_rank: int | None = None
    sweep: str | None = None  # the sweep folder's name, for a trial of a sweep

    @property
    def label(self) -> str:
        """The trial id, else the checkpoint's name and a hash of its path: two checkpoints of one
        name (runs/a/checkpoint-0008, runs/b/checkpoint-0008) must not share a Train run, which
        Ray would resume one from the other's checkpoints."""
        if self.trial_id:
            return self.trial_id
        return f"{Path(self.checkpoint).stem}-{hashlib.sha1(self.checkpoint.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class Job:
    """What differs between the probe and the fine-tune job."""

    kind: str  # "probe" | "finetune"
    table: str  # file name in the sweep folder
    schema: pa.Schema
    section: str  # the config section holding the recipe
    recipe: tuple[str, ...]  # the config values a run computes from (mae.config.recipe_changes)


PROBE = Job("probe", mae_results.PROBE_FILE, mae_results.probe_schema(), "probe", PROBE_RECIPE)
FINETUNE = Job("finetune", mae_results.FINETUNE_FILE, mae_results.finetune_schema(), "finetune", FINETUNE_RECIPE)


# -- choosing encoders and their configs ---------------------------------------------------


def config_for(checkpoint: str, experiment: str | None, overrides: list[str], warn: bool = True) -> ExperimentConfig:
    """The checkpoint's own config with --experiment's data/probe/finetune sections and --set applied.

    A checkpoint without a config (another tool's) takes the whole --experiment.
    warn: log the --experiment sections a checkpoint's own config keeps (once per job: the
    first target). Raises ConfigError (bad values, or a foreign checkpoint without --experiment).
    """
    payload = load_checkpoint(checkpoint)
    if "config" in payload:
        values = payload["config"]
        if experiment:
            file_values = to_dict(load_config(experiment))
            values = {**values, **{s: file_values[s] for s in REPLACED_SECTIONS}}
            unused = sorted(set(yaml.safe_load(Path(experiment).read_text()) or {}) - {*REPLACED_SECTIONS, "name"})
            if unused and warn:  # the sweep section too: workers are sized as the trial's own pretraining was
                log.warning("%s: its %s section(s) are not used for a sweep's trials, which keep their own; "
                            "change one with --set, e.g. --set sweep.gpus_per_worker=1", experiment,
                            ", ".join(unused))
    elif experiment:
        values = to_dict(load_config(experiment))
    else:
        raise ConfigError(f"{checkpoint} carries no config (not written by mae): pass --experiment with the "
                          "model (model.name), data and recipe to use")
    return cluster.absolute_data_dir(config_from_dict(apply_overrides(values, overrides)))


def choose(args: argparse.Namespace, pin: Callable[[Path, list[str]], list[str] | None] | None = None,
           ) -> tuple[Path, list[Target]]:
    """(output folder, targets) from --sweep/--top-k/--metric or --checkpoint. Raises ConfigError.
    pin(output folder, the best --top-k trial ids now): the sweep's trials to take instead (trial ids,
    best first), or None to take those."""
    if args.checkpoint:
        if not args.experiment:
            raise ConfigError("--checkpoint needs --experiment: the model, data and recipe to run it with")
        out = Path(args.out or Path(mae_results.DEFAULT_ROOT) / f"reuse-{load_config(args.experiment).name}")
        return out.resolve(), [Target(str(Path(c).resolve()), config_for(c, args.experiment, args.overrides,
                                                                         warn=i == 0))
                               for i, c in enumerate(args.checkpoint)]
    try:
        folder = mae_results.results_dir(args.sweep)
    except mae_results.ResultsNotFoundError as e:
        raise ConfigError(str(e)) from e
    sweep = mae_results.load_sweep(folder)
    metric = args.metric or sweep.objective
    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    try:
        best = sweep.best(args.top_k, metric)
    except KeyError as e:
        raise ConfigError(f"--metric {metric}: {e.args[0]}; choose a numeric column of trials.parquet") from e
    if best.empty:
        raise ConfigError(f"no finished trial with a {metric} value in {folder / mae_results.TRIALS_FILE}")
    out = Path(args.out).resolve() if args.out else folder.resolve()
    pinned = pin(out, list(best["trial_id"])) if pin else None
    if pinned:
        rows = sweep.trials.set_index("trial_id", drop=False)
        missing = [t for t in pinned if t not in rows.index]
        if missing:
            raise ConfigError(f"the run's trial(s) {', '.join(missing)} are not in {folder / mae_results.TRIALS_FILE}")
        best = rows.loc[pinned]
    targets = []
    for rank, row in enumerate(best.to_dict("records"), start=1):
        checkpoint = row["checkpoint_path"]
        if not checkpoint:
            raise ConfigError(f"trial {row['trial_id']} has no checkpoint_path in trials.parquet")
        targets.append(Target(checkpoint, config_for(checkpoint, args.experiment, args.overrides, warn=rank == 1),
                              trial_id=row["trial_id"], selected_by=metric, selected_value=float(row[metric]),
                              selected_rank=rank, sweep=folder.name))
    return out, targets


# -- the Train worker -----------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """On every worker: load the encoder, run the job through `mae`, report the result with a checkpoint.

    Each epoch is reported too, with the checkpoint the library wrote after it (rank 0);
    a worker group Ray restarts resumes from the last one.
    """
    from mae.engine import build_model
    from mae.finetune import finetune
    from mae.pretrained import load_encoder
    from mae.probe import linear_probe, save_probe_head

    cfg = config_from_dict(loop_config["config"])
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint = loop_config["checkpoint"]
    fault = FaultInjection(**loop_config["fault"]) if loop_config.get("fault") else None
    resume = ray.train.get_checkpoint()  # set when Ray restarts a failed worker group, or on --resume
    if resume is not None and Path(resume.path).name == RESULT_DIR:
        return  # the run had finished (its row was not written): Ray hands back that result as it is
    start_epoch = checkpoint_epoch(resume)  # 0 for none
    t0 = time.perf_counter()
    extra: dict[str, Any] = {"start_epoch": start_epoch}
    classifier = None
    with worker_scratch(f"{loop_config['kind']}-rank{rank}") as run_dir:
        resume_from = local_folder(resume, run_dir) if start_epoch else None
        report = RayReportCallback(rank, world_size, start_epoch, fault)
        if loop_config["kind"] == "probe":
            encoder = load_encoder(build_model(cfg), checkpoint)
            result = linear_probe(encoder, cfg, device=device, progress=False, on_epoch_end=report.on_epoch_end,
                                  run_dir=run_dir, resume_from=resume_from)
            if rank == 0:
                save_probe_head(loop_config["head_dir"], result.head, cfg, checkpoint)
        else:
            scratch = bool(loop_config["from_scratch"])
            result = finetune(cfg, weights=None if scratch else checkpoint, from_scratch=scratch, device=device,
                              progress=False, on_epoch_end=report.on_epoch_end, run_dir=run_dir,
                              resume_from=resume_from)
            classifier = result.model
            extra |= {"init": result.init, "images_per_sec": result.images_per_sec}
        history = result.epochs
        metrics = {
            "top1": result.top1, "best_top1": max(h["test_top1"] for h in history), "test_images": result.test_images,
            "final_train_loss": history[-1]["train_loss"], "epochs_completed": len(history),
            "seconds": time.perf_counter() - t0, "world_size": world_size, "history": json.dumps(history), **extra,
        }
        report_checkpoint = None
        if rank == 0:
            result_dir = run_dir / RESULT_DIR  # a folder of its own: the scratch folder holds its lock file
            result_dir.mkdir()
            (result_dir / RESULT_FILE).write_text(json.dumps(metrics, indent=2))
            if classifier is not None:
                torch.save({"model": classifier.state_dict(), "config": to_dict(cfg), "source": checkpoint},
                           result_dir / CLASSIFIER_FILE)
            report_checkpoint = Checkpoint.from_directory(str(result_dir))
        ray.train.report(metrics, checkpoint=report_checkpoint, checkpoint_dir_name=RESULT_DIR,
                         delete_local_checkpoint_after_upload=report_checkpoint is not None)


def run_target(job: Job, target: Target, storage: Path, run_id: str, workers: int,
               from_scratch: bool = False, fail_at_epoch: int = 0) -> dict[str, Any]:
    """One TorchTrainer on one encoder; returns the metrics and the saved result folder.

    fail_at_epoch: fault injection for tests: rank 0 is killed once after that epoch.
    """
    s = target.cfg.sweep
    resources, use_gpu = cluster.worker_resources(s.cpus_per_worker, s.gpus_per_worker, workers)
    cluster.check_fits(workers, resources)
    name = f"{job.kind}{'-scratch' if from_scratch else ''}-{target.label}-{run_id}"
    head_dir = storage / name / PROBE_HEAD_DIR  # written by the probe's worker, so storage must be shared
    fault = {"at_epoch": fail_at_epoch, "marker": str(storage / name / "fault-injected")} if fail_at_epoch else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"kind": job.kind, "config": to_dict(target.cfg), "checkpoint": target.checkpoint,
                           "from_scratch": from_scratch, "threads": max(1, int(s.cpus_per_worker)),
                           "head_dir": str(head_dir), "fault": fault},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        # the newest checkpoint alone: the epoch to resume from, then the finished run's result
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.checkpoint is None or not result.metrics:
        raise RuntimeError(f"Train run {name} reported no result; see its logs under {storage / name}")
    metrics = dict(result.metrics)
    metrics["checkpoint_path"] = result.checkpoint.path if job.kind == "finetune" else str(head_dir)
    return metrics


# -- the table -------------------------------------------------------------------------------


class RunTable:
    """The rows of probe.parquet / finetune.parquet: earlier runs' rows, plus this run's.

    An existing table that cannot be read raises UnreadableTableError and is left as it is.
    Jobs may add rows to one table at the same time (a fine-tune and its --from-scratch
    baseline, two probe recipes): each add re-reads the table under a lock.
    """

    def __init__(self, job: Job, folder: Path) -> None:
        self.job = job
        self.path = folder / job.table
        self.rows = self._read()

    def _read(self) -> list[dict[str, Any]]:
        existing = read_table(str(self.path))
        return existing.to_pylist() if existing is not None else []

    def add(self, row: dict[str, Any]) -> None:
        """Append row, replacing an earlier row of the same run and encoder (a resumed run's ERROR)."""
        with locked(self.path):
            self.rows = [r for r in self._read() if row_key(r) != row_key(row)] + [row]
            schema = self.job.schema
            table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in self.rows], schema=schema)
            write_table_atomic(table, str(self.path))


def row_key(row: dict[str, Any]) -> tuple:
    """What one row stands for: a run of the job on one encoder (and init, for fine-tuning)."""
    return row["run_id"], row["trial_id"], row["source_checkpoint"], row.get("init")


def finished_in(table: RunTable, job: Job, run_id: str, targets: list[Target], from_scratch: bool) -> list[Target]:
    """The targets that run `run_id` already finished (a FINISHED row in the table)."""
    init = ("scratch" if from_scratch else "pretrained") if job.kind == "finetune" else None
    done = {row_key(r) for r in table.rows if r["run_id"] == run_id and r["status"] == FINISHED}
    return [t for t in targets if (run_id, t.trial_id, t.checkpoint, init) in done]


# -- the run's record ---------------------------------------------------------------------


def record_path(job: Job, folder: Path, run_id: str) -> Path:
    return folder / f"{job.kind}-runs" / f"{run_id}.json"


def write_record(path: Path, job: Job, run_id: str, argv: list[str], targets: list[Target], workers: int,
                 from_scratch: bool) -> None:
    """What run `run_id` sets out to do, written (atomically) before it starts; --resume checks against it."""
    record = {"kind": job.kind, "run_id": run_id, "argv": argv, "workers": workers, "from_scratch": from_scratch,
              "targets": [{"label": t.label, "trial_id": t.trial_id, "checkpoint": t.checkpoint,
                           "config": to_dict(t.cfg)} for t in targets]}
    write_text_atomic(json.dumps(record, indent=2), path)


def resume_mismatch(record: dict[str, Any], job: Job, targets: list[Target], workers: int,
                    from_scratch: bool) -> str | None:
    """Why this command would not continue the recorded run (None: it would)."""
    saved_configs = {(t["trial_id"], t["checkpoint"]): t["config"] for t in record["targets"]}
    if set(saved_configs) != {(t.trial_id, t.checkpoint) for t in targets}:  # in any order: ties may swap
        return (f"it chooses other encoders (the run's: {', '.join(t['label'] for t in record['targets'])}; "
                f"now: {', '.join(t.label for t in targets)})")
    if record["from_scratch"] != from_scratch:
        return f"--from-scratch was {'given' if record['from_scratch'] else 'not given'} in the run"
    if record["workers"] != workers:
        return f"it runs {workers} worker(s) per encoder, the run {record['workers']}"
    for target in targets:
        changes = recipe_changes(saved_configs[target.trial_id, target.checkpoint], target.cfg, job.recipe)
        if changes:
            return f"{target.label} would run with other settings ({'; '.join(changes)})"
    return None


def ranked_then(job: Job, folder: Path, run_id: str, args: argparse.Namespace, now: list[str],
                description: str) -> list[str] | None:
    """The trial ids a sweep run `run_id` chose, when this command asks for the same choice (--top-k,
    --metric) but the sweep's ranking has moved since (trials finished after the run started): a
    --resume continues the run's own encoders. None otherwise (no record, another choice asked for,
    or the same encoders)."""
    path = record_path(job, folder, run_id)
    try:
        record = json.loads(path.read_text())
        # known flags only: finetune.py records its own --from-scratch and --workers in argv too
        then = build_parser(job, description).parse_known_args(record["argv"])[0]
        ids = [t["trial_id"] for t in record["targets"]]
    except (OSError, ValueError, KeyError, TypeError, SystemExit):  # left_to_run says what is wrong with it
        return None
    if then.checkpoint or (then.top_k, then.metric) != (args.top_k, args.metric) or None in ids \
            or sorted(ids) == sorted(now):
        return None
    log.warning("--resume %s: the sweep's best trials are now %s; the run chose %s, which it continues", run_id,
                ", ".join(now), ", ".join(ids))
    return ids


def left_to_run(job: Job, folder: Path, table: RunTable, record: Path, run_id: str, targets: list[Target],
                workers: int, from_scratch: bool) -> list[Target]:
    """The targets a --resume of run `run_id` still runs: those it did not finish. ConfigError when there is
    no such run, or its record cannot be read or says this command would not continue it."""
    if not record.is_file() and not any(r["run_id"] == run_id for r in table.rows) \
            and not any(folder.glob(f"{job.kind}*-{run_id}")):
        raise ConfigError(f"no {job.kind} run of that id in {folder} (no record in {record.parent}, no row in "
                          f"{job.table}, no Train run folder); the id is the run_id column's value, printed when the "
                          "run started")
    if record.is_file():
        try:
            saved = json.loads(record.read_text())
            why = resume_mismatch(saved, job, targets, workers, from_scratch)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read the run's record {record} ({type(e).__name__}: {e}); delete it to "
                              "resume without checking that this command continues that run") from e
        if why:
            raise ConfigError(f"this command does not continue that run: {why}. The run's arguments were: "
                              f"{shlex.join(saved['argv'])} (from {record}); resume with those, or start a new run "
                              "without --resume")
    else:  # a run from before records were written (2026-11-29)
        log.warning("run %s has no record (%s); resuming with this command's encoders and settings unchecked",
                    run_id, record)
    done = finished_in(table, job, run_id, targets, from_scratch)
    log.info("resuming %s run %s: %d encoder(s) finished before, %d to run", job.kind, run_id, len(done),
             len(targets) - len(done))
    return [t for t in targets if t not in done]


def make_row(job: Job, target: Target, run_id: str, version: str, metrics: dict[str, Any] | None,
             error: str | None, from_scratch: bool) -> dict[str, Any]:
    flat = flatten(target.cfg)
    row: dict[str, Any] = {
        "trial_id": target.trial_id, "run_id": run_id, "sweep": target.sweep, "source_checkpoint": target.checkpoint,
        "selected_by": target.selected_by, "selected_value": target.selected_value,
        "selected_rank": target.selected_rank, "status": ERROR if error else FINISHED, "error": error,
        "code_version": version, "created_at": datetime.datetime.now(datetime.timezone.utc),
        **{k: v for k, v in flat.items() if k.startswith(f"{job.section}.") or k in mae_results.CONTEXT_KEYS},
    }
    if job.kind == "finetune":
        row["init"] = "scratch" if from_scratch else "pretrained"
    if metrics:
        row.update({k: v for k, v in metrics.items() if k in job.schema.names and k not in row})
    return row


# -- the command line --------------------------------------------------------------------------


def build_parser(job: Job, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--sweep", help=f"sweep folder (default ${mae_results.RESULTS_DIR_ENV}, else the newest "
                                        f"sweep under ./{mae_results.DEFAULT_ROOT})")
    source.add_argument("--checkpoint", action="append", metavar="PATH",
                        help="a pretrained checkpoint instead (ours, a reference MAE .pth, an HF ViTMAE folder "
                             "or file); repeatable; needs --experiment")
    p.add_argument("--top-k", type=int, default=1, help="how many of the best trials (default 1)")
    p.add_argument("--metric", help="trials.parquet column to choose by (default: the sweep's objective)")
    p.add_argument("--experiment", help=f"YAML whose {'/'.join(REPLACED_SECTIONS)} sections replace the trials' "
                                        "own (the whole config for --checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override one config value (repeatable), e.g. --set {job.section}.epochs=5")
    p.add_argument("--out", help=f"folder for {job.table} and the Train runs (default: the sweep folder; with "
                                 "--checkpoint, results/reuse-<experiment name>)")
    p.add_argument("--max-concurrent", type=int,
                   help="encoders run at once (default: the first chosen trial's sweep.max_concurrent)")
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS); none: an embedded Ray")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue an interrupted or failed run (its run_id, printed when it starts and in the "
                        "table) with the same arguments: the encoders it finished are kept, the others continue "
                        "from their last checkpoints; other encoders or settings than the run's are refused")
    testing = p.add_argument_group("fault injection (tests)")
    testing.add_argument("--fail-at-epoch", type=int, default=0, metavar="K",
                         help="kill each run's rank-0 worker once, right after epoch K is reported; it resumes "
                              f"from its last checkpoint (every {job.section}.checkpoint_every epochs)")
    return p


def main(job: Job, argv: list[str] | None, description: str, workers: int = 1, from_scratch: bool = False,
         args: argparse.Namespace | None = None) -> int:
    """Choose, run, record; exit status 0 (all finished), 1 (some failed), 2 (bad arguments) or 130
    (interrupted: --resume continues)."""
    from ray_jobs.sweep import code_version

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if args is None:
        args = build_parser(job, description).parse_args(argv)
    try:
        # a --resume of a sweep run takes the run's own trials if the sweep's ranking has moved since
        folder, targets = choose(args, (lambda out, now: ranked_then(job, out, args.resume, args, now, description))
                                 if args.resume else None)
        for target in targets:
            check_worker_resources(target.cfg, worker_count=False)  # --workers counts them
        cluster.check_dataset_here([t.cfg for t in targets], args.address, ("train", "test"))
        table = RunTable(job, folder)  # the earlier runs' rows; a table it cannot read stops us here
    except (ConfigError, CheckpointError, DatasetNotFoundError, CorruptDatasetError, UnreadableTableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for flag, value in (("--max-concurrent", args.max_concurrent), ("--workers", workers)):
        if value is not None and value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    fail_at_epoch = args.fail_at_epoch
    too_late = [t.label for t in targets if fail_at_epoch >= getattr(t.cfg, job.section).epochs]
    if fail_at_epoch and too_late:
        print(f"error: --fail-at-epoch {fail_at_epoch} must be below {job.section}.epochs ({', '.join(too_late)})",
              file=sys.stderr)
        return 2
    concurrent = args.max_concurrent or targets[0].cfg.sweep.max_concurrent
    run_id = args.resume or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + \
        uuid.uuid4().hex[:6]
    record = record_path(job, folder, run_id)
    if args.resume:
        try:
            targets = left_to_run(job, folder, table, record, run_id, targets, workers, from_scratch)
        except ConfigError as e:
            print(f"error: --resume {run_id}: {e}", file=sys.stderr)
            return 2
    else:
        try:
            write_record(record, job, run_id, argv, targets, workers, from_scratch)
        except OSError as e:
            print(f"error: cannot write the run's record {record} ({e}); choose a writable --out", file=sys.stderr)
            return 2
        log.info("%s run %s (record: %s); if it is interrupted, add --resume %s to the same command", job.kind,
                 run_id, record, run_id)
    version = code_version()
    failed = 0
    if targets:
        try:
            failed = run_all(job, targets, table, folder, run_id, version, args.address, concurrent, workers,
                             from_scratch, fail_at_epoch)
        except KeyboardInterrupt:  # Ctrl-C: the finished encoders' rows are written; say how to go on
            print(f"\ninterrupted: {job.table} keeps the encoders that finished; continue with the same command "
                  f"plus --resume {run_id}", file=sys.stderr)
            return 130
    shown = ["trial_id", "selected_rank", "selected_value", *(["init"] if job.kind == "finetune" else []),
             "status", "top1", "best_top1", "epochs_completed", "seconds"]
    rows = sorted((r for r in table.rows if r["run_id"] == run_id), key=lambda r: r["selected_rank"] or 0)
    print()
    print(f"{job.kind} run {run_id}: {len(rows)} encoder(s), {failed} failed")
    for r in rows:
        print("  " + "  ".join(f"{k}={_short(r.get(k))}" for k in shown))
    print(f"table: {table.path}")
    return 1 if failed else 0


def run_all(job: Job, targets: list[Target], table: RunTable, folder: Path, run_id: str, version: str,
            address: str | None, concurrent: int, workers: int, from_scratch: bool, fail_at_epoch: int) -> int:
    """Run every target on Ray, `concurrent` at once, adding each one's row as it ends; the failures' count."""
    cluster.init_ray(address, trial_drivers=concurrent)
    # Each encoder's TorchTrainer is driven from a light Ray task holding a trial_driver
    # unit (as a sweep's trials are), so `concurrent` of them train at once.
    drive = ray.remote(run_target).options(max_retries=0, **_driver_options())
    queue, pending, failed = list(targets), {}, 0
    try:
        while queue or pending:
            while queue and len(pending) < concurrent:
                target = queue.pop(0)
                log.info("%s %s (%s) from %s", job.kind, target.label,
                         f"rank {target.selected_rank} by {target.selected_by}" if target.trial_id else "checkpoint",
                         target.checkpoint)
                pending[drive.remote(job, target, folder, run_id, workers, from_scratch, fail_at_epoch)] = target
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            target = pending.pop(ref)
            metrics, error = None, None
            try:
                metrics = ray.get(ref)
            except Exception as e:  # one failed encoder must not lose the others' rows
                failed += 1
                error = _last_line(getattr(e, "cause", None) or e)
                log.error("%s of %s failed: %s", job.kind, target.label, error)
            table.add(make_row(job, target, run_id, version, metrics, error, from_scratch))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return failed


def _driver_options() -> dict[str, Any]:
    resources = cluster.trial_resources()
    if cluster.TRIAL_DRIVER in resources:
        return {"num_cpus": 0, "resources": resources}
    return {"num_cpus": resources["CPU"]}


def _last_line(error: BaseException) -> str:
    lines = [line for line in traceback.format_exception_only(error)[-1].splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def _short(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
