"""One MAE pretraining run as a Ray Train TorchTrainer (DDP workers), then a quick probe.

    python ray_jobs/pretrain.py --experiment experiments/smoke.yaml --workers 2
    ray job submit --working-dir . -- python ray_jobs/pretrain.py --storage /shared/results ...

There is no training loop here: each worker calls `mae.engine.pretrain`, and the engine's
callback is the only bridge to Ray. Every rank reports each epoch's metrics through
`ray.train.report` (it is a barrier); rank 0 attaches the checkpoint folder the engine
just wrote. A crashed worker restarts the group from the last reported checkpoint
(`FailureConfig(max_failures)`), and a rerun with the same storage and name resumes too.
The sweep driver (`sweep.py`) builds one of these trainers per trial.
"""

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `ray_jobs` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mae.checkpoint import CheckpointError, check_recipe, check_world_size, latest_checkpoint, load_checkpoint
from mae.config import PRETRAIN_RECIPE, ConfigError, ExperimentConfig, config_from_dict, load_config, to_dict
from mae.data import CorruptDatasetError, DatasetNotFoundError
from mae.engine import PretrainCallback, load_model, pretrain, summarize_history
from mae.probe import quick_probe, quick_probe_splits
from ray_jobs import cluster
from ray_jobs.scratch import worker_scratch
from ray_jobs.space import check_worker_resources

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass(frozen=True)
class FaultInjection:
    """Testing aid: rank 0 kills its own process once, right after epoch `at_epoch` is reported.

    `marker` is a file on the driver's filesystem; it is written before the kill, so the
    restarted worker group sees it and trains on.
    """

    at_epoch: int
    marker: str


class RayReportCallback(PretrainCallback):
    """The engine -> Ray Train bridge: report every epoch from every rank, checkpoint from rank 0."""

    def __init__(self, rank: int, world_size: int, start_epoch: int, fault: FaultInjection | None = None):
        self.rank = rank
        self.world_size = world_size
        self.start_epoch = start_epoch
        self.fault = fault

    def on_epoch_end(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        epoch = int(metrics["epoch"])
        metrics = {**metrics, "start_epoch": self.start_epoch, "world_size": self.world_size}
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        # Ray names the stored folder like ours, so `mae` tools read it as is. Once Ray has
        # stored it, the worker's copy goes at once, not when its scratch folder does: a ViT-B
        # checkpoint is 1.3 GB (112 M parameters, their two AdamW moments, float32).
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:04d}" if checkpoint else None,
                         delete_local_checkpoint_after_upload=checkpoint is not None)
        if self.fault and self.rank == 0 and epoch == self.fault.at_epoch and not os.path.exists(self.fault.marker):
            # Wait until the controller has registered this report's checkpoint: a worker
            # that dies first takes its last report with it, and the retry starts earlier.
            ray.train.get_all_reported_checkpoints(timeout_s=120)
            Path(self.fault.marker).parent.mkdir(parents=True, exist_ok=True)
            Path(self.fault.marker).write_text(f"killed rank 0 after epoch {epoch}\n")
            log.warning("fault injection: killing this worker after epoch %d", epoch)
            os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_epoch(checkpoint: Checkpoint | None) -> int:
    """The epoch a reported checkpoint ends, from its folder name (0 for none)."""
    if checkpoint is None:
        return 0
    name = Path(checkpoint.path).name
    return int(name[len(CHECKPOINT_PREFIX):]) if name.startswith(CHECKPOINT_PREFIX) else 0


def local_folder(checkpoint: Checkpoint, scratch: Path) -> str:
    """A local folder holding `checkpoint`: its own on a local file system; else a download into the
    worker's scratch folder, which goes however the worker ends (`Checkpoint.as_directory`'s
    download stays in /tmp when Ray kills the worker)."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(str(scratch / "resume"))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Train worker: resume from Ray's checkpoint if any, then `mae.engine.pretrain`."""
    cfg = config_from_dict(loop_config["config"])
    fault = FaultInjection(**loop_config["fault"]) if loop_config.get("fault") else None
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads", 1))))
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    with worker_scratch(f"pretrain-rank{rank}") as run_dir:
        resume_from = local_folder(checkpoint, run_dir) if checkpoint else None
        callback = RayReportCallback(rank, world_size, checkpoint_epoch(checkpoint), fault)
        pretrain(cfg, run_dir, callback=callback, resume_from=resume_from, device=device)


def scaling_for(cfg: ExperimentConfig) -> ScalingConfig:
    """Workers per trial from `sweep.workers_per_trial`, `cpus_per_worker`, `gpus_per_worker`."""
    s = cfg.sweep
    resources, use_gpu = cluster.worker_resources(s.cpus_per_worker, s.gpus_per_worker, s.workers_per_trial)
    cluster.check_fits(s.workers_per_trial, resources)
    return ScalingConfig(num_workers=s.workers_per_trial, use_gpu=use_gpu, resources_per_worker=resources)


def build_trainer(cfg: ExperimentConfig, name: str, storage_path: str, scaling: ScalingConfig,
                  callbacks: list | None = None, fault: FaultInjection | None = None,
                  keep_checkpoints: int = 2) -> TorchTrainer:
    """A TorchTrainer over `train_loop_per_worker`; same storage_path + name resumes the run."""
    if "://" not in storage_path and not os.path.isabs(storage_path):
        raise ValueError(f"storage_path must be absolute or a URI, got {storage_path!r}")
    cpus = (scaling.resources_per_worker or {}).get("CPU", 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "fault": None if fault is None else {"at_epoch": fault.at_epoch, "marker": fault.marker},
            "threads": max(1, int(cpus)),
        },
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.sweep.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def _probe(checkpoint: Checkpoint, threads: int, use_gpu: bool) -> dict[str, Any]:
    """Load the final checkpoint with mae and quick-probe its frozen encoder, on the GPU Ray gave
    the task if it asked for one: Ray 2.60 shows every GPU to a task that asked for none. A remote
    checkpoint is downloaded into a scratch folder, as a Train worker's is (`local_folder`)."""
    torch.set_num_threads(max(1, threads))
    with worker_scratch("probe") as scratch:
        folder = local_folder(checkpoint, scratch)
        model, cfg = load_model(folder)
        history = list(load_checkpoint(folder).get("history", []))
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    return {**quick_probe(model, cfg, device), "history": history}


def probe_checkpoint(checkpoint: Checkpoint, cfg: ExperimentConfig, use_gpu: bool) -> dict[str, Any]:
    """Run `_probe` as a Ray task holding one worker's CPUs (and GPU share, if training had one).

    scheduling_strategy="DEFAULT" takes the task out of the calling trial's placement
    group, whose only bundle is the trial_driver resource.
    """
    s = cfg.sweep
    task = ray.remote(_probe).options(
        num_cpus=s.cpus_per_worker, num_gpus=min(1.0, s.gpus_per_worker) if use_gpu else 0,
        scheduling_strategy="DEFAULT", max_retries=1,
    )
    return ray.get(task.remote(checkpoint, max(1, int(s.cpus_per_worker)), use_gpu))


def fit_and_probe(cfg: ExperimentConfig, name: str, storage_path: str, callbacks: list | None = None,
                  fault: FaultInjection | None = None, probe: bool = True) -> dict[str, Any]:
    """Pretrain with a TorchTrainer, then probe its final checkpoint; one flat dict of results."""
    t0 = time.perf_counter()
    scaling = scaling_for(cfg)
    result = build_trainer(cfg, name, storage_path, scaling, callbacks=callbacks, fault=fault).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Train run {name} ended without a checkpoint; see its logs under {storage_path}")
    out: dict[str, Any] = {
        "checkpoint_path": checkpoint_location(result.checkpoint, storage_path),
        "resumed_from_epoch": int(result.metrics.get("start_epoch", 0)) if result.metrics else 0,
        "world_size": scaling.num_workers,
    }
    if probe:
        probed = probe_checkpoint(result.checkpoint, cfg, scaling.use_gpu)
        history = probed.pop("history")
        out.update(probed)
        out.update(summarize_history(history))
        out["history"] = history
    out["wall_time_s"] = time.perf_counter() - t0
    return out


def resolve_storage(storage: str) -> str:
    """A URI as is; a local path made absolute (Ray Train needs that)."""
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def checkpoint_location(checkpoint: Checkpoint, storage: str) -> str:
    """Where a Train checkpoint lies, as the tables record it: a local path, or for URI
    storage the full URI. Ray keeps the path inside its file system, without the scheme
    (s3://bucket/results/... becomes bucket/results/...), which names nothing on its own."""
    if "://" not in storage:
        return checkpoint.path
    return f"{storage.split('://', 1)[0]}://{checkpoint.path}"  # s3://bucket/..., file:///abs/...


def check_rerun(cfg: ExperimentConfig, storage: str, name: str) -> None:
    """Before Ray starts: CheckpointError if run `name` has a checkpoint that resuming it with cfg would refuse
    (other settings, another worker count). Inside Ray every worker would raise it, and Ray retry the group
    sweep.max_failures times. Local storage only; a URI's run is checked by its workers."""
    if "://" in storage:
        return
    last = latest_checkpoint(Path(storage) / name)
    if last is not None:
        try:
            payload = load_checkpoint(last)
        except CheckpointError as e:  # e.g. a copy into storage cut short: Ray resumes from the newest it registered
            log.warning("%s cannot be read (%s); the run's workers check the checkpoint Ray resumes from", last, e)
            return
        check_recipe(payload, last, cfg, PRETRAIN_RECIPE)
        check_world_size(payload, last, cfg.sweep.workers_per_trial)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="experiments/smoke.yaml", help="experiment YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--storage", default="results", help="local folder (made absolute) or URI")
    parser.add_argument("--name", help="run name (default: pretrain-<experiment name>); reusing it resumes")
    parser.add_argument("--workers", type=int, help="Train workers (default sweep.workers_per_trial)")
    parser.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--no-probe", action="store_true", help="skip the quick probe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ([f"sweep.workers_per_trial={args.workers}"] if args.workers else [])
    try:
        cfg = cluster.absolute_data_dir(load_config(args.experiment, overrides))
        check_worker_resources(cfg)
        cluster.check_dataset_here([cfg], args.address, ("train",) if args.no_probe else quick_probe_splits(cfg))
    except (ConfigError, DatasetNotFoundError, CorruptDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    storage = resolve_storage(args.storage)
    name = args.name or f"pretrain-{cfg.name}"
    try:
        check_rerun(cfg, storage, name)
    except CheckpointError as e:
        print(f"error: --name {name} resumes that run, and its last checkpoint refuses this command: {e} (here: "
              "another --name)", file=sys.stderr)
        return 2
    cluster.init_ray(args.address)
    out = fit_and_probe(cfg, name, storage, probe=not args.no_probe)
    out.pop("history", None)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
