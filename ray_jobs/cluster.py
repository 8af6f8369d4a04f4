"""Connecting to Ray, and sizing trials and workers so that small machines never deadlock.

Two ways to run:

- embedded (no address given and RAY_ADDRESS unset): start a private local Ray with the
  CPUs this process may use (`available_cpus`: in a container, its limit), a
  `trial_driver` resource (one unit per concurrent trial) and the dashboard bound to
  127.0.0.1. Token authentication stays on (Ray's default for a new local cluster:
  the token lives in ~/.ray/auth_token unless RAY_AUTH_TOKEN(_PATH) says otherwise).
- cluster (`ray job submit`, which sets RAY_ADDRESS, or `--address`): connect with no
  resource arguments. Start the head with a trial_driver resource:

      RAY_AUTH_MODE=token ray start --head --dashboard-host 127.0.0.1 --disable-usage-stats \
          --resources='{"trial_driver": 4}'

  (after `ray get-auth-token --generate`: `ray start`, unlike ray.init, leaves token
  authentication off unless asked or a token exists; ray_jobs/README.md). Without the
  trial_driver resource, trial drivers fall back to a small CPU fraction (see `trial_resources`).

Why a custom resource: a Tune trial here is a driver that does no heavy work; it starts a
TorchTrainer whose workers hold the CPUs/GPUs. If each driver took a whole CPU, two
drivers on a 2-CPU machine would hold both CPUs while their workers wait forever.
"""

import logging
import os
import socket
from pathlib import Path

import ray

from mae.config import ExperimentConfig, replace
from mae.data import DATA_DIR_ENV, DatasetNotFoundError, check_dataset

log = logging.getLogger(__name__)

TRIAL_DRIVER = "trial_driver"
FALLBACK_DRIVER_CPU = 0.01  # when the cluster has no trial_driver resource
REPO_ROOT = Path(__file__).resolve().parents[1]
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"  # read by ray.init when it starts a cluster


def cluster_address(address: str | None) -> str | None:
    """The address to connect to, or None to start an embedded Ray."""
    if address in (None, ""):
        address = os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def absolute_data_dir(cfg: ExperimentConfig) -> ExperimentConfig:
    """Ray's workers run in other working directories: anchor a relative data.data_dir, data.predecoded_dir
    or $MAE_DATA_DIR at ours, and expand a ~ in them, as `python -m mae` does, before the workers see them."""
    env = os.environ.get(DATA_DIR_ENV)
    if not cfg.data.data_dir and env:  # an embedded Ray's workers inherit it
        os.environ[DATA_DIR_ENV] = _local_path(env)
    given = {"data.data_dir": cfg.data.data_dir, "data.predecoded_dir": cfg.data.predecoded_dir}
    local = {key: _local_path(d) for key, d in given.items() if d}
    changed = {key: d for key, d in local.items() if d != given[key]}
    return replace(cfg, changed) if changed else cfg


def _local_path(d: str) -> str:
    """A local folder's absolute path, ~ expanded (a URI as it is)."""
    if "://" in d or os.path.isabs(d):
        return d
    p = Path(d).expanduser()
    return str(p if p.is_absolute() else p.resolve())


def check_dataset_here(cfgs: list[ExperimentConfig], address: str | None, splits: tuple[str, ...]) -> None:
    """Look for each config's dataset before Ray starts (`mae.data.check_dataset`): the workers would
    find it missing only after, and Ray would retry them. With an embedded Ray the workers run on this
    machine, so a missing dataset raises here. On a cluster they may run on nodes that hold data this
    one lacks (a head node without the data mount): there a missing dataset is only a warning."""
    for cfg in cfgs:
        try:
            check_dataset(cfg, splits)
        except DatasetNotFoundError as e:
            if cluster_address(address) is None:
                raise
            log.warning("%s (on this node; the job continues, since the cluster's workers may have it)", e)


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask (a container's cpuset), capped by a cgroup
    CPU quota (`docker --cpus`, a Kubernetes CPU limit). os.cpu_count() is the host's, which in a
    container would start more workers than it has CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            if period_file is None:  # cgroup v2: "max 100000" or "<quota> <period>"
                quota, period = (cgroup / quota_file).read_text().split()[:2]
            else:  # cgroup v1: -1 when unlimited
                quota, period = (cgroup / quota_file).read_text().strip(), (cgroup / period_file).read_text().strip()
            if quota not in ("max", "-1") and int(period) > 0:
                return max(1, min(cpus, int(quota) // int(period)))  # whole CPUs: a fraction would be throttled
        except (OSError, ValueError):
            continue
    return max(1, cpus)


def init_ray(address: str | None = None, trial_drivers: int = 1, num_cpus: int | None = None,
             dashboard: bool = True) -> str:
    """Start an embedded Ray or connect to a cluster; returns 'embedded' or 'cluster'."""
    if ray.is_initialized():
        return "cluster" if cluster_address(address) else "embedded"
    target = cluster_address(address)
    if target is not None:
        # A running cluster fixes its own resources; passing num_cpus here would fail.
        ray.init(address=target, log_to_driver=True)
        log.info("connected to the Ray cluster at %s: %s", target, _resources_text())
        return "cluster"
    # Workers must import ray_jobs wherever the script was started from.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    # Ray Train's placement-group cleaner finds "its" cluster by auto-detection, which picks
    # another Ray when several run on one machine (and then leaks the placement groups of
    # stopped trials). Fix the GCS port up front and tell every worker the address.
    port = _free_port()
    env_vars = {"PYTHONPATH": pythonpath, "RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or available_cpus(),
            resources={TRIAL_DRIVER: max(1, trial_drivers)},
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": env_vars},
        )
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = previous
    log.info("started an embedded Ray: %s", _resources_text())
    return "embedded"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _resources_text() -> str:
    r = ray.cluster_resources()
    return ", ".join(f"{k} {v:g}" for k, v in sorted(r.items()) if not k.startswith(("node:", "memory",
                                                                                        "object_store")))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def trial_resources(warn: bool = True) -> dict[str, float]:
    """What one Tune trial driver reserves: a trial_driver unit, else a sliver of a CPU."""
    if ray.cluster_resources().get(TRIAL_DRIVER, 0) >= 1:
        return {TRIAL_DRIVER: 1}
    if not warn:
        return {"CPU": FALLBACK_DRIVER_CPU}
    log.warning(
        "the cluster has no %r resource; trial drivers take %g CPU each instead. Start the head "
        "with --resources='{\"%s\": N}' to run N trials at once without sharing CPUs",
        TRIAL_DRIVER, FALLBACK_DRIVER_CPU, TRIAL_DRIVER,
    )
    return {"CPU": FALLBACK_DRIVER_CPU}


def worker_resources(cpus_per_worker: float, gpus_per_worker: float,
                     workers: int = 1) -> tuple[dict[str, float], bool]:
    """(resources per Train worker, use_gpu): GPU fractions only when the cluster has GPUs.

    A worker drives one GPU, and NCCL will not put two DDP ranks on one, so a share above 1,
    or a fraction for a run of several workers, is reserved as 1 per worker, with a warning
    (the sweeps refuse both up front; the pretraining and reuse jobs meet them in a trial's
    config, e.g. fine-tuning with --workers 4 an encoder its sweep trained at 0.25)."""
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if gpus_per_worker > 1 or (0 < gpus_per_worker < 1 and workers > 1):
        log.warning("sweep.gpus_per_worker is %g for %d worker(s), but a Train worker drives one GPU and DDP "
                    "ranks cannot share one: reserving 1 per worker", gpus_per_worker, workers)
        gpus_per_worker = 1.0
    use_gpu = gpus_per_worker > 0 and cluster_gpus() > 0
    if gpus_per_worker > 0 and not use_gpu:
        log.warning("sweep.gpus_per_worker is %g but the cluster has no GPU; training on CPUs", gpus_per_worker)
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return resources, use_gpu


def check_fits(workers: int, per_worker: dict[str, float]) -> None:
    """Fail early when one trial's workers can never be placed (instead of waiting forever).

    Without a trial_driver resource the trial's own driver holds a sliver of a CPU while
    its workers wait, so they must fit beside it.
    """
    total = ray.cluster_resources()
    driver = trial_resources(warn=False).get("CPU", 0.0)
    for name, amount in per_worker.items():
        need = workers * amount + (driver if name == "CPU" else 0.0)
        if need > total.get(name, 0.0) + 1e-9:
            beside = f" beside the trial driver's {driver:g} CPU" if name == "CPU" and driver else ""
            raise RuntimeError(
                f"one trial needs {workers * amount:g} {name} ({workers} workers x {amount:g}){beside} but the "
                f"cluster has {total.get(name, 0.0):g}; lower sweep.workers_per_trial or sweep.cpus_per_worker/"
                f"gpus_per_worker, or start the head with --resources='{{\"{TRIAL_DRIVER}\": N}}'"
            )

