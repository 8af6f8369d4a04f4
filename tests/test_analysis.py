"""From a finished sweep to probed encoders and plots, end to end on CPUs.

One tiny smoke sweep (two mask ratios, one epoch) serves the whole module: the linear
probe job on its two trials, the fine-tune job on its best one, then every notebook in
analysis/ executed headless (nbclient) on that folder. A notebook fails its test if a
cell raises or it writes no figure.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {  # notebook -> the figure it writes beside the tables
    "mask_ratio": "mask_ratio.png",
    "decoder": "decoder.png",
    "training": "training.png",
    "reconstructions": "reconstructions.png",
}
SWEEP = [
    str(REPO / "ray_jobs" / "sweep_mask_ratio.py"), "--experiment", str(REPO / "experiments" / "smoke_sweep.yaml"),
    "--set", "data.train_subset=256", "--set", "train.epochs=1", "--set", "probe.quick_train_size=200",
    "--set", "probe.quick_test_size=200", "--set", "probe.quick_epochs=10", "--name", "smoke",
]
PROBE = [
    str(REPO / "ray_jobs" / "linear_probe.py"), "--top-k", "2", "--set", "probe.epochs=1",
    "--set", "probe.batch_size=64", "--set", "probe.train_subset=128", "--set", "probe.optimizer=sgd",
    "--set", "probe.warmup_epochs=0.5", "--set", "probe.test_subset=200",
]
FINETUNE = [  # its worker is killed after epoch 1 and resumes from that epoch's checkpoint
    str(REPO / "ray_jobs" / "finetune.py"), "--fail-at-epoch", "1", "--set", "finetune.epochs=2",
    "--set", "finetune.batch_size=32",
    "--set", "finetune.train_subset=128", "--set", "finetune.test_subset=200", "--set", "finetune.warmup_epochs=0.5",
]
TIMEOUT_S = 600

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # an embedded Ray
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    sys.stdout.write(proc.stdout[-3000:])  # shown by pytest when a test fails
    sys.stderr.write(proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def reused_sweep(tmp_path_factory, fashion_mnist_dir):
    """The smoke sweep, then the probe job (top 2) and the fine-tune job (top 1) on its folder."""
    storage = tmp_path_factory.mktemp("results")
    sweep = _run([*SWEEP, "--storage", str(storage)], cwd=storage)
    folder = storage / "smoke"
    probe = _run([*PROBE, "--sweep", str(folder)], cwd=storage) if sweep.returncode == 0 else None
    finetune = _run([*FINETUNE, "--sweep", str(folder)], cwd=storage) if sweep.returncode == 0 else None
    return {"folder": folder, "sweep": sweep, "probe": probe, "finetune": finetune}


def test_probe_job_writes_one_row_per_chosen_trial(reused_sweep):
    assert reused_sweep["sweep"].returncode == 0, "the smoke sweep failed"
    assert reused_sweep["probe"].returncode == 0
    from mae import results

    folder = reused_sweep["folder"]
    table = pq.read_table(folder / results.PROBE_FILE)
    assert table.schema.equals(results.probe_schema())
    trials = pq.read_table(folder / results.TRIALS_FILE).to_pandas().sort_values("probe_top1", ascending=False)
    rows = sorted(table.to_pylist(), key=lambda r: r["selected_rank"])  # written as they finish
    assert [r["trial_id"] for r in rows] == list(trials["trial_id"])  # both trials, best first
    assert [r["selected_rank"] for r in rows] == [1, 2] and len({r["run_id"] for r in rows}) == 1
    for row in rows:
        assert row["status"] == "FINISHED", row["error"]
        assert 0.0 < row["top1"] <= 1.0 and row["epochs_completed"] == 1 and row["start_epoch"] == 0
        assert row["probe.epochs"] == 1 and row["probe.optimizer"] == "sgd"  # --set reached the recipe
        assert row["test_images"] == row["probe.test_subset"] == 200
        assert row["selected_by"] == "probe_top1" and row["source_checkpoint"].endswith("checkpoint-0001")
    joined = results.load_sweep(folder).joined
    assert joined["linear_top1"].notna().all()
    assert str(folder / results.PROBE_FILE) in reused_sweep["probe"].stdout


def test_probe_job_saves_each_trained_head_with_the_accuracy_of_its_row(reused_sweep):
    assert reused_sweep["probe"] is not None and reused_sweep["probe"].returncode == 0
    import torch
    from torch.utils.data import DataLoader

    from mae import results
    from mae.config import config_from_dict
    from mae.data import build_dataset, collate_skip_none
    from mae.engine import build_model
    from mae.pretrained import load_encoder
    from mae.probe import LinearProbeHead, evaluate

    rows = pq.read_table(reused_sweep["folder"] / results.PROBE_FILE).to_pylist()
    assert len({r["checkpoint_path"] for r in rows}) == len(rows) == 2  # one head per encoder
    for row in rows:
        saved = torch.load(Path(row["checkpoint_path"]) / "checkpoint.pt", weights_only=True)
        assert saved["source"] == row["source_checkpoint"]
        cfg = config_from_dict(saved["config"])
        assert cfg.probe.epochs == row["probe.epochs"] and cfg.probe.train_subset == row["probe.train_subset"]
        classes, dim = saved["head"]["fc.weight"].shape  # (K, D)
        head = LinearProbeHead(dim, classes)
        head.load_state_dict(saved["head"])
        encoder = load_encoder(build_model(cfg), row["source_checkpoint"])
        test = build_dataset(cfg, "test", augment=False, subset=cfg.probe.test_subset)
        loader = DataLoader(test, batch_size=512, collate_fn=collate_skip_none)
        assert evaluate(encoder, head, loader, torch.device("cpu"), cfg.probe.pool) == row["top1"]


def test_finetune_job_writes_its_row_and_saves_the_classifier(reused_sweep):
    assert reused_sweep["finetune"] is not None and reused_sweep["finetune"].returncode == 0
    import torch

    from mae import results

    (row,) = pq.read_table(reused_sweep["folder"] / results.FINETUNE_FILE).to_pylist()
    assert row["status"] == "FINISHED" and row["init"] == "pretrained" and row["selected_rank"] == 1
    assert 0.0 <= row["top1"] <= 1.0 and row["finetune.epochs"] == 2 and row["images_per_sec"] > 0
    # the retry began at epoch 1's checkpoint, and the run's history came back with it
    assert row["start_epoch"] == 1 and row["epochs_completed"] == 2
    assert [e["epoch"] for e in json.loads(row["history"])] == [1, 2]
    assert row["test_images"] == row["finetune.test_subset"] == 200
    saved = torch.load(Path(row["checkpoint_path"]) / "classifier.pt", weights_only=True)
    assert saved["model"]["head.weight"].shape == (10, 96)


def test_a_failed_probe_run_resumes_from_its_checkpoint(reused_sweep, tmp_path):
    """No retries (sweep.max_failures 0): the run fails after epoch 1's checkpoint, with an
    ERROR row; --resume with its run_id continues that Train run from the checkpoint."""
    assert reused_sweep["sweep"].returncode == 0, "the smoke sweep failed"
    from mae import results

    args = [*PROBE, "--sweep", str(reused_sweep["folder"]), "--top-k", "1", "--out", str(tmp_path),
            "--set", "probe.epochs=2", "--set", "sweep.max_failures=0"]
    assert _run([*args, "--fail-at-epoch", "1"], cwd=tmp_path).returncode == 1
    (failed,) = pq.read_table(tmp_path / results.PROBE_FILE).to_pylist()
    assert failed["status"] == "ERROR" and failed["error"]
    assert _run([*args, "--resume", failed["run_id"]], cwd=tmp_path).returncode == 0
    (row,) = pq.read_table(tmp_path / results.PROBE_FILE).to_pylist()  # the ERROR row is replaced
    assert (row["run_id"], row["trial_id"], row["status"]) == (failed["run_id"], failed["trial_id"], "FINISHED")
    assert row["start_epoch"] == 1 and row["epochs_completed"] == 2
    # a driver that died after the run finished but before writing its row: --resume takes
    # the finished Train run's result as it is (the same seconds: it did not train again)
    pq.write_table(pq.read_table(tmp_path / results.PROBE_FILE).slice(0, 0), tmp_path / results.PROBE_FILE)
    assert _run([*args, "--resume", failed["run_id"]], cwd=tmp_path).returncode == 0
    (again,) = pq.read_table(tmp_path / results.PROBE_FILE).to_pylist()
    assert again["status"] == "FINISHED" and (again["top1"], again["seconds"]) == (row["top1"], row["seconds"])


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec for this interpreter, found first via JUPYTER_PATH: a machine-wide `python3`
    kernel (another Python, without mae) must not be the one that runs the notebooks."""
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / "mae-tests"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mae tests", "language": "python",
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", f"{folder}{os.pathsep}{os.environ.get('JUPYTER_PATH', '')}")
        yield "mae-tests"


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_headless_and_saves_its_figure(reused_sweep, kernel, name, monkeypatch):
    import nbclient  # matplotlib, nbclient, nbformat, ipykernel: the dev extra
    import nbformat

    assert reused_sweep["sweep"].returncode == 0, "the smoke sweep failed"
    folder = reused_sweep["folder"]
    figure = folder / NOTEBOOKS[name]
    figure.unlink(missing_ok=True)
    notebook = nbformat.read(REPO / "analysis" / f"{name}.ipynb", as_version=4)
    if name == "mask_ratio":  # papermill-style: a cell after the one tagged "parameters"
        index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
        notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(f"results_dir = {str(folder)!r}"))
        monkeypatch.delenv("MAE_RESULTS_DIR", raising=False)
    else:  # the environment variable (the kernel inherits it)
        monkeypatch.setenv("MAE_RESULTS_DIR", str(folder))
    started = time.time()
    nbclient.NotebookClient(notebook, timeout=300, kernel_name=kernel,
                            resources={"metadata": {"path": str(REPO / "analysis")}}).execute()
    assert figure.is_file() and figure.stat().st_mtime >= started - 1, f"{name}.ipynb wrote no {figure.name}"
    assert figure.stat().st_size > 10_000  # a drawn figure, not an empty canvas


def test_reconstructions_of_a_sweep_with_no_finished_trial_say_so(reused_sweep, kernel, tmp_path, monkeypatch):
    import shutil

    import nbclient
    import nbformat
    import pyarrow as pa

    from mae import results

    trials = pq.read_table(reused_sweep["folder"] / results.TRIALS_FILE)
    shutil.copy(reused_sweep["folder"] / "experiment.yaml", tmp_path)
    running = trials.set_column(trials.schema.get_field_index("status"), "status",
                                pa.array(["RUNNING"] * trials.num_rows))  # the sweep is still under way
    pq.write_table(running, tmp_path / results.TRIALS_FILE)
    monkeypatch.setenv("MAE_RESULTS_DIR", str(tmp_path))
    notebook = nbformat.read(REPO / "analysis" / "reconstructions.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name=kernel,
                                     resources={"metadata": {"path": str(REPO / "analysis")}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="has no finished trial yet"):
        client.execute()
