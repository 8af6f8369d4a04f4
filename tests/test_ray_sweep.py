"""Ray Train + Tune end to end, on CPUs: the smoke sweep, fault tolerance, resume, cluster jobs.

To keep the file at a few minutes on 2 cores, one interrupted-then-resumed sweep with an
injected worker kill serves several tests (each asserts its own property), and the job
test runs a one-point sweep (failed, then resumed). All runs use experiments/smoke_sweep.yaml shrunk by --set.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ray_jobs is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from ray_jobs import results  # noqa: E402

pytestmark = pytest.mark.slow

SWEEP = [sys.executable, str(REPO / "ray_jobs" / "sweep_mask_ratio.py")]
TINY = [
    "--experiment", str(REPO / "experiments" / "smoke_sweep.yaml"),
    "--set", "data.train_subset=256",
    "--set", "probe.quick_train_size=200", "--set", "probe.quick_test_size=200", "--set", "probe.quick_epochs=10",
]
EPOCHS = 2  # smoke_sweep.yaml's train.epochs
RUN_TIMEOUT_S = 600


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray unless asked
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    sys.stdout.write(proc.stdout[-4000:])  # shown by pytest when a test fails
    sys.stderr.write(proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    """A sweep whose workers are each killed once after epoch 1, interrupted after its first
    trial (one trial at a time), then resumed with --resume at two trials at a time:
    {"folder", "first": (proc, trials rows), "second": proc, "workers_tmp": what the workers left in TMPDIR}."""
    storage = tmp_path_factory.mktemp("results")
    # The workers' temporary folders (and embedded Ray's) in a TMPDIR of their own, to see what a
    # killed worker leaves behind; in the suite's (conftest), which keeps it after a failure.
    tmp = Path(tempfile.mkdtemp(prefix="mt"))
    env = _env(TMPDIR=str(tmp))
    common = [*SWEEP, *TINY, "--storage", str(storage), "--name", "faulty", "--fail-at-epoch", "1"]
    first = _run([*common, "--max-concurrent", "1", "--interrupt-after", "1"], cwd=storage, env=env)
    folder = storage / "faulty"
    first_rows = pq.read_table(folder / results.TRIALS_FILE).to_pylist() if (folder / results.TRIALS_FILE).exists() else []
    second = _run([*common, "--resume", "--max-concurrent", "2"], cwd=storage, env=env)
    workers_tmp = {"folders": sorted(p.name for p in tmp.glob("mae-*")),
                   "checkpoints": sorted(str(p.relative_to(tmp)) for p in tmp.glob("mae-*/**/*.pt"))}
    return {"folder": folder, "first": (first, first_rows), "second": second, "workers_tmp": workers_tmp}


def _tables(folder: Path):
    return pq.read_table(folder / results.TRIALS_FILE), pq.read_table(folder / results.EPOCHS_FILE)


def test_smoke_sweep_writes_both_tables_with_loadable_checkpoints(resumed_sweep):
    from mae.engine import load_model

    assert resumed_sweep["second"].returncode == 0
    trials, epochs = _tables(resumed_sweep["folder"])
    assert trials.column_names == list(results.trials_schema().names)
    assert trials.schema.equals(results.trials_schema())
    assert epochs.schema.equals(results.epochs_schema())
    assert all(0 <= e["input_wait_frac"] <= 1 for e in epochs.to_pylist())
    rows = trials.to_pylist()
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2
    assert sorted(r["mask.ratio"] for r in rows) == [0.5, 0.75]
    for row in rows:
        assert row["status"] == "TERMINATED", row["error"]
        assert 0.0 < row["probe_top1"] <= 1.0 and row["probe_n_test"] == 200
        assert row["final_train_loss"] > 0 and row["epochs_completed"] == EPOCHS
        assert row["images_per_sec"] > 0 and row["wall_time_s"] > 0 and row["code_version"]
        model, cfg = load_model(row["checkpoint_path"])
        assert cfg.mask.ratio == row["mask.ratio"] and cfg.train.epochs == EPOCHS
        assert Path(row["checkpoint_path"]).name == f"checkpoint-{EPOCHS:04d}"
    out = resumed_sweep["second"].stdout
    assert "trials table:" in out and str(resumed_sweep["folder"] / results.TRIALS_FILE) in out


def test_killed_worker_is_retried_from_its_last_checkpoint(resumed_sweep):
    folder = resumed_sweep["folder"]
    trials, epochs = _tables(folder)
    for row in trials.to_pylist():
        assert (folder / f"fault-{row['trial_id']}").exists(), "the fault was not injected"
        assert row["resumed_from_epoch"] == 1, "the retried workers did not start from epoch 1's checkpoint"
    keys = [(r["trial_id"], r["epoch"]) for r in epochs.to_pylist()]
    assert len(keys) == len(set(keys)), "duplicate epochs"
    assert sorted(keys) == sorted((t, e) for t in trials.column("trial_id").to_pylist() for e in range(1, EPOCHS + 1))
    steps = {(r["trial_id"], r["epoch"]): r["step"] for r in epochs.to_pylist()}
    for t in trials.column("trial_id").to_pylist():
        assert steps[(t, 2)] == 2 * steps[(t, 1)]  # the step count carried over the restart


def test_killed_workers_leave_nothing_in_the_temporary_folder(resumed_sweep):
    """Ray kills a worker without running its cleanup (here the injected kill and the interrupt;
    in a sweep, every early-stopped trial): the workers started after it remove its scratch
    folder, and Ray's stored checkpoints are the only copies."""
    first, _ = resumed_sweep["first"]
    logs = first.stdout + first.stderr + resumed_sweep["second"].stdout + resumed_sweep["second"].stderr
    assert "left in" in logs and "by killed Train workers" in logs  # found, and removed
    assert resumed_sweep["workers_tmp"] == {"folders": [], "checkpoints": []}


def test_a_stopped_trial_records_the_last_checkpoint_ray_registered(resumed_sweep, tmp_path):
    """Stopping a trial can cut Ray's copy of a checkpoint into storage short: the folder is
    there with a truncated checkpoint.pt, but Ray never registered it. A STOPPED row names the
    last checkpoint Ray registered (here in a copy of a real Train run of the sweep above)."""
    import shutil

    from mae.checkpoint import CHECKPOINT_FILE
    from ray_jobs import sweep
    from tests.conftest import stopped_trial_row

    trial_id = _tables(resumed_sweep["folder"])[0].column("trial_id")[0].as_py()
    run = tmp_path / sweep.train_run_name("t0")
    shutil.copytree(resumed_sweep["folder"] / sweep.train_run_name(trial_id), run)
    registered = run / f"checkpoint-{EPOCHS:04d}"
    cut_short = run / f"checkpoint-{EPOCHS + 1:04d}"
    cut_short.mkdir()
    (cut_short / CHECKPOINT_FILE).write_bytes((registered / CHECKPOINT_FILE).read_bytes()[:4096])
    row = stopped_trial_row(tmp_path, epoch=EPOCHS + 1)
    assert row["status"] == "STOPPED" and row["checkpoint_path"] == str(registered)


def test_interrupted_sweep_resumes_to_complete_tables(resumed_sweep):
    first, first_rows = resumed_sweep["first"]
    assert first.returncode == 130, "the interrupted run should say so"
    assert "--resume" in first.stdout
    finished = [r for r in first_rows if r["status"] == "TERMINATED"]
    assert len(finished) == 1, "the first run should have finished exactly one trial before the interrupt"
    assert resumed_sweep["second"].returncode == 0
    trials, _ = _tables(resumed_sweep["folder"])
    by_id = {r["trial_id"]: r for r in trials.to_pylist()}
    assert [r["status"] for r in by_id.values()] == ["TERMINATED", "TERMINATED"]
    kept = by_id[finished[0]["trial_id"]]
    assert kept["updated_at"] == finished[0]["updated_at"], "a finished trial was run again"
    assert kept["probe_top1"] == finished[0]["probe_top1"]


def test_resume_runs_at_its_own_max_concurrent(resumed_sweep):
    import pickle

    # Tune saves its grid generator's state, limit included, into the sweep folder in each
    # session (the file is named by the session's start time), and restores it on --resume.
    states = sorted(resumed_sweep["folder"].glob("basic-variant-state-*.json"))
    assert len(states) == 2, "expected one search state per session"
    limits = [pickle.loads(path.read_bytes())["max_concurrent"] for path in states]
    assert limits == [1, 2], "the resumed session did not run at its --max-concurrent"


@pytest.mark.parametrize("script, old, new", [
    ("sweep_mask_ratio.py", "mask.ratio: [0.5, 0.75]", "mask.ratio: [0.5, 1.0]"),  # a bad grid point
    ("pretrain.py", "ratio: 0.75", "ratio: 1.0"),
])
def test_bad_experiment_fails_before_ray_starts(tmp_path, script, old, new):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "experiments" / "smoke_sweep.yaml").read_text().replace(old, new, 1))
    proc = _run([sys.executable, str(REPO / "ray_jobs" / script), "--experiment", str(bad),
                 "--storage", str(tmp_path / "results")])
    assert proc.returncode == 2
    assert "mask.ratio" in proc.stderr and "1.0" in proc.stderr
    assert not (tmp_path / "results").exists(), "nothing may be written for a bad experiment"
    assert "Started a local Ray" not in proc.stderr + proc.stdout


# -- a real cluster: `ray start` + `ray job submit` ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # it answered (401 without the token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block` on free loopback ports, token auth on, in a private temp dir.

    Stopped by signalling the process this fixture started (SIGTERM, then SIGKILL to its
    process group): `ray stop` would stop every Ray on this shared machine.
    """
    token = uuid.uuid4().hex
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain: stop at once
                # with --disable-usage-stats Ray still reports "disabled" once to this URL (https://usage-stats.ray.io/)
                "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/"}
    temp_dir = tempfile.mkdtemp(prefix="ray")  # in the suite's TMPDIR (conftest), short for Ray's socket paths
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    # The job agent's HTTP port too: its default, 52365, is taken by any other Ray on the machine
    # (another test run's, an embedded one), and a node whose agent cannot bind it takes no jobs
    # ("No available agent to submit job", for as long as the other Ray runs).
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         "--disable-usage-stats", "--num-cpus=2",
         "--resources=" + json.dumps({"trial_driver": 2}), f"--temp-dir={temp_dir}"],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dashboard}/api/version", timeout_s=120)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        head.send_signal(signal.SIGTERM)  # ray start drains, then stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)  # temp_dir, with Ray's logs, goes with the suite's (kept after a failure)


def test_ray_job_submit_runs_the_sweep_on_a_cluster_and_resume_continues_a_failed_trial(ray_cluster, tmp_path):
    """`ray job submit` of a one-point sweep, one trial of two DDP workers, on a token-guarded cluster.
    Rank 0 is killed after epoch 1 and the Train run may not retry (sweep.max_failures 0): the trial is
    an ERROR row and the job fails. A second job with --resume continues that trial, under its own
    trial_id, from epoch 1's checkpoint (Tune's restart would give it a new id, a new run from epoch 0
    and a second row)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    denied = _run([ray_bin, "job", "list", "--address", ray_cluster["address"]],
                  env={**ray_cluster["env"], "RAY_AUTH_TOKEN": "not-the-token"})
    assert denied.returncode != 0, "the cluster accepted a wrong token"
    storage = tmp_path / "results"
    sweep = ["python", "ray_jobs/sweep_mask_ratio.py", *TINY, "--storage", str(storage), "--name", "job"]

    def submit(*args: str) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + 300
        while True:
            proc = _run([ray_bin, "job", "submit", "--address", ray_cluster["address"], "--working-dir", ".",
                         "--", *sweep, *args], env=ray_cluster["env"])
            # The dashboard answers before the node's job agent has registered (seen on a loaded
            # machine): the submission is refused, nothing ran, and it is safe to ask again.
            if "No available agent to submit job" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
                return proc
            time.sleep(5)

    # the trial driver holds no CPU, so both workers fit on 2 CPUs
    failed = submit("--set", "sweep.workers_per_trial=2", "--set", "sweep.space={mask.ratio: [0.75]}",
                    "--set", "sweep.max_failures=0", "--fail-at-epoch", "1")
    assert failed.returncode != 0 and "--resume retries them" in failed.stdout + failed.stderr
    (error_row,) = _tables(storage / "job")[0].to_pylist()
    assert error_row["status"] == "ERROR" and error_row["error"]
    proc = submit("--resume")
    assert proc.returncode == 0
    output = proc.stdout + proc.stderr
    assert "succeeded" in output
    assert "connected to the Ray cluster" in output  # not an embedded Ray
    assert "world_size=2" in output  # the process group really had two ranks
    trials, epochs = _tables(storage / "job")
    (row,) = trials.to_pylist()
    assert row["trial_id"] == error_row["trial_id"] and row["status"] == "TERMINATED" and row["error"] is None
    assert row["mask.ratio"] == 0.75 and row["probe_top1"] > 0
    assert row["world_size"] == 2 and row["sweep.workers_per_trial"] == 2
    assert row["resumed_from_epoch"] == 1 and row["epochs_completed"] == EPOCHS
    assert sorted(epochs.column("epoch").to_pylist()) == list(range(1, EPOCHS + 1))
    assert [p.name for p in (storage / "job").glob("train-*")] == [f"train-{row['trial_id']}"]
