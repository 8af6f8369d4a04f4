"""mae.results: sweep folders into pandas, on small tables written here with the real schemas."""

import datetime
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mae import results

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ray_jobs is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from ray_jobs import results as sweep_tables  # noqa: E402  (pyarrow only, no Ray)

T0 = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.timezone.utc)


def _trial(trial_id: str, ratio: float, top1: float | None, status: str = "TERMINATED", loss: float = 0.5) -> dict:
    row = {f.name: None for f in sweep_tables.trials_schema()}
    row.update({"trial_id": trial_id, "sweep": "s", "status": status, "objective": "probe_top1",
                "params": json.dumps({"mask.ratio": ratio}), "probe_top1": top1, "mask.ratio": ratio,
                "sweep.mode": "max", "final_train_loss": loss, "epochs_completed": 2, "updated_at": T0})
    return row


def _run(schema: pa.Schema, trial_id: str | None, top1: float, minutes: int, status: str = "FINISHED",
         **extra) -> dict:
    row = {f.name: None for f in schema}
    row.update({"trial_id": trial_id, "run_id": f"run{minutes}", "status": status, "top1": top1,
                "best_top1": top1 + 0.01, "created_at": T0 + datetime.timedelta(minutes=minutes), **extra})
    return row


def _write(folder: Path, name: str, rows: list[dict], schema: pa.Schema) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)


@pytest.fixture
def sweep_folder(tmp_path) -> Path:
    folder = tmp_path / "results" / "ratios"
    _write(folder, results.TRIALS_FILE, [
        _trial("a", 0.5, 0.70, loss=0.3), _trial("b", 0.75, 0.80, loss=0.6), _trial("c", 0.9, 0.75, loss=0.8),
        _trial("d", 0.25, None, status="ERROR"),
    ], sweep_tables.trials_schema())
    epochs = [{"trial_id": t, "epoch": e, "step": 4 * e, "train_loss": 1.0 / e, "lr": 1e-3, "epoch_time_s": 1.0,
               "images_per_sec": 100.0} for t in "abc" for e in (1, 2)]
    _write(folder, results.EPOCHS_FILE, epochs, sweep_tables.epochs_schema())
    probe = results.probe_schema()
    _write(folder, results.PROBE_FILE, [
        _run(probe, "b", 0.81, 1), _run(probe, "b", 0.83, 2), _run(probe, "c", 0.77, 1),
        _run(probe, "c", 0.99, 3, status="ERROR"), _run(probe, None, 0.5, 4),  # an external checkpoint
    ], probe)
    ft = results.finetune_schema()
    _write(folder, results.FINETUNE_FILE, [
        _run(ft, "b", 0.88, 1, init="pretrained"), _run(ft, "b", 0.84, 2, init="scratch"),
    ], ft)
    (folder / results.EXPERIMENT_FILE).write_text("name: ratios\nsweep:\n  metric: probe_top1\n  mode: max\n")
    return folder


def test_load_sweep_reads_every_table(sweep_folder):
    sweep = results.load_sweep(sweep_folder)
    assert sweep.name == "ratios" and sweep.objective == "probe_top1" and sweep.mode == "max"
    assert len(sweep.trials) == 4 and len(sweep.epochs) == 6 and len(sweep.probe) == 5 and len(sweep.finetune) == 2
    assert sweep.searched == ["mask.ratio"]
    assert sweep.experiment["name"] == "ratios"
    assert list(sweep.finished["trial_id"]) == ["a", "b", "c"]
    assert sweep.labels()["b"] == "mask.ratio=0.75"


def test_joined_has_one_row_per_trial_with_the_latest_finished_runs(sweep_folder):
    joined = results.load_sweep(sweep_folder).joined.set_index("trial_id")
    assert list(joined.index) == ["a", "b", "c", "d"]
    assert joined.loc["b", "linear_top1"] == 0.83 and joined.loc["b", "linear_runs"] == 2  # newest run wins
    assert joined.loc["c", "linear_top1"] == 0.77  # the ERROR run is not taken
    assert pd.isna(joined.loc["a", "linear_top1"])
    assert joined.loc["b", "finetune_top1"] == 0.88 and joined.loc["b", "scratch_top1"] == 0.84
    assert pd.isna(joined.loc["c", "finetune_top1"])
    assert joined.loc["b", "mask.ratio"] == 0.75 and joined.loc["b", "probe_top1"] == 0.80


def test_summary_is_sorted_by_the_objective_and_best_picks_the_top(sweep_folder):
    sweep = results.load_sweep(sweep_folder)
    summary = results.summarize(sweep)
    assert list(summary["trial_id"]) == ["b", "c", "a", "d"]  # missing objective last
    assert {"mask.ratio", "probe_top1", "linear_top1", "finetune_top1", "scratch_top1"} <= set(summary.columns)
    assert list(sweep.best(2)["trial_id"]) == ["b", "c"]
    assert list(sweep.best(1, metric="final_train_loss")["trial_id"]) == ["a"]  # losses: lower is better
    with pytest.raises(KeyError, match="no_such_metric"):
        sweep.best(1, metric="no_such_metric")


def test_trials_at_the_same_point_get_labels_of_their_own(sweep_folder):
    # Optuna may draw a point twice: a plot grouped by label must not join two trials into one line
    trials = pq.read_table(sweep_folder / results.TRIALS_FILE).to_pylist() + [_trial("e", 0.75, 0.79)]
    _write(sweep_folder, results.TRIALS_FILE, trials, sweep_tables.trials_schema())
    labels = results.load_sweep(sweep_folder).labels()
    assert labels["a"] == "mask.ratio=0.5" and labels.is_unique
    assert (labels["b"], labels["e"]) == ("mask.ratio=0.75 [b]", "mask.ratio=0.75 [e]")


def test_epochs_carry_the_trial_label(sweep_folder):
    epochs = results.load_sweep(sweep_folder).epochs_labelled()
    assert len(epochs) == 6 and set(epochs["label"]) == {"mask.ratio=0.5", "mask.ratio=0.75", "mask.ratio=0.9"}
    assert (epochs.loc[epochs["trial_id"] == "a", "mask.ratio"] == 0.5).all()


def test_missing_reuse_tables_are_empty_frames_with_their_columns(sweep_folder):
    (sweep_folder / results.PROBE_FILE).unlink()
    (sweep_folder / results.FINETUNE_FILE).unlink()
    sweep = results.load_sweep(sweep_folder)
    assert sweep.probe.empty and "top1" in sweep.probe.columns and "probe.epochs" in sweep.probe.columns
    assert sweep.finetune.empty and "init" in sweep.finetune.columns
    assert sweep.joined["linear_top1"].isna().all()
    assert "linear_top1" not in results.summarize(sweep).columns


def test_list_sweeps_newest_first_and_results_dir_resolution(sweep_folder, monkeypatch):
    root = sweep_folder.parent
    older = root / "older"
    _write(older, results.TRIALS_FILE, [_trial("x", 0.5, 0.6)], sweep_tables.trials_schema())
    past = time.time() - 3600
    os.utime(older / results.TRIALS_FILE, (past, past))
    (root / "not_a_sweep").mkdir()
    listed = results.list_sweeps(root)
    assert list(listed["name"]) == ["ratios", "older"]
    assert listed.loc[0, "best"] == 0.80 and listed.loc[0, "finished"] == 3 and bool(listed.loc[0, "probed"])

    monkeypatch.delenv(results.RESULTS_DIR_ENV, raising=False)
    assert results.results_dir(root=root) == sweep_folder  # the newest
    assert results.results_dir(older) == older
    monkeypatch.setenv(results.RESULTS_DIR_ENV, str(older))
    assert results.results_dir(root=root) == older  # the variable beats the default
    monkeypatch.setenv(results.RESULTS_DIR_ENV, str(root))
    assert results.results_dir() == sweep_folder  # a folder of sweeps: its newest
    with pytest.raises(results.ResultsNotFoundError, match="no sweep folder"):
        results.results_dir(root / "not_a_sweep")
    with pytest.raises(results.ResultsNotFoundError, match="neither"):
        results.results_dir(root / "missing")

    (older / results.PROBE_FILE).write_bytes(b"not parquet")  # a damaged table in an old sweep
    listed = results.list_sweeps(root)
    assert list(listed["name"]) == ["ratios", "older"] and pd.isna(listed.loc[0, "error"])
    assert "probe.parquet" in listed.loc[1, "error"] and pd.isna(listed.loc[1, "trials"])
    monkeypatch.delenv(results.RESULTS_DIR_ENV)
    assert results.results_dir(root=root) == sweep_folder  # the newest is still found
    (older / results.PROBE_FILE).unlink()
    (older / "experiment.yaml").write_text("sweep: [unclosed")
    assert "not valid YAML" in results.list_sweeps(root).loc[1, "error"]


def test_reuse_schemas_carry_their_recipe_and_context_columns():
    probe, ft = results.probe_schema(), results.finetune_schema()
    assert probe.field("probe.epochs").type == pa.int64() and probe.field("probe.optimizer").type == pa.string()
    assert ft.field("finetune.layer_decay").type == pa.float64() and ft.field("finetune.clip_grad").type == pa.float64()
    for schema in (probe, ft):
        assert schema.names[:2] == ["trial_id", "run_id"]
        assert {"model.name", "data.dataset", "train.seed", "top1", "history", "created_at"} <= set(schema.names)
    assert "init" in ft.names and "init" not in probe.names


def test_model_shape_resolves_the_variant_defaults(sweep_folder):
    trials = results.load_sweep(sweep_folder).trials
    trials.loc[:, "model.name"] = "mae_vit_micro_patch4"
    trials.loc[trials["trial_id"] == "b", "model.decoder_depth"] = 8
    shaped = results.with_model_args(trials).set_index("trial_id")
    assert shaped.loc["a", "decoder_depth"] == 2 and shaped.loc["b", "decoder_depth"] == 8  # micro's default: 2
    assert shaped.loc["a", "decoder_embed_dim"] == 64 and shaped.loc["a", "embed_dim"] == 96
    assert "decoder_depth" in results.with_model_args(trials.iloc[:0]).columns


def test_default_root_is_found_from_a_sub_folder(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "analysis").mkdir()
    monkeypatch.chdir(tmp_path / "analysis")  # where Jupyter starts a notebook's kernel
    assert results.default_root() == Path("..") / "results"
    monkeypatch.chdir(tmp_path)
    assert results.default_root() == Path("results")


def test_analysis_readme_documents_every_column_of_the_reuse_tables():
    text = (REPO / "analysis" / "README.md").read_text()
    for column in {c.name for c in results.PROBE_COLUMNS + results.FINETUNE_COLUMNS}:
        assert f"| `{column}` |" in text, f"analysis/README.md does not document {column}"
    for column in results.FINETUNE_COLUMNS:
        assert column.meaning in text, f"the meaning of {column.name} changed; update analysis/README.md"
