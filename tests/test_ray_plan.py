"""Sweep planning and the Parquet tables, without starting Ray (fast).

The end-to-end Ray runs are in test_ray_sweep.py.
"""

import json
import logging
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ray_jobs is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from mae.config import ConfigError, load_config, replace  # noqa: E402
from ray_jobs import results  # noqa: E402
from ray_jobs.space import Choice, Range, grid_points, parse_space, validate_experiment  # noqa: E402

SMOKE_SWEEP = REPO / "experiments" / "smoke_sweep.yaml"


def test_ray_jobs_planning_modules_do_not_import_ray():
    import subprocess

    code = "import sys; import ray_jobs.space, ray_jobs.results, ray_jobs.scratch; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


@pytest.mark.parametrize("name", ["sweep_mask_ratio", "sweep_decoder", "smoke_sweep"])
def test_shipped_sweep_experiments_are_valid(name):
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    dims = validate_experiment(cfg)
    assert dims and all(isinstance(d, Choice) for d in dims)
    assert len(grid_points(dims)) >= 2


def test_mask_ratio_preset_is_the_laptop_default():
    cfg = load_config(REPO / "experiments" / "sweep_mask_ratio.yaml")
    assert cfg.data.dataset == "fashion_mnist" and cfg.model.name == "mae_vit_micro_patch4"
    (dim,) = parse_space(cfg.sweep.space)
    assert dim.key == "mask.ratio" and 4 <= len(dim.values) <= 6


def test_space_syntax_lists_ranges_and_nested_overrides():
    dims = parse_space({
        "mask.ratio": [0.5, 0.75],
        "optim.base_lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "model": {"decoder_depth": {"low": 1, "high": 8}},
    })
    assert dims[0] == Choice("mask.ratio", (0.5, 0.75))
    assert dims[1] == Range("optim.base_lr", 1e-4, 1e-2, True) and not dims[1].is_int
    assert dims[2] == Range("model.decoder_depth", 1, 8) and dims[2].is_int
    # --set sweep.space.mask.ratio=[...] arrives nested; it replaces the YAML's dotted entry
    cfg = load_config(SMOKE_SWEEP, ["sweep.space.mask.ratio=[0.25, 0.9]"])
    assert validate_experiment(cfg) == [Choice("mask.ratio", (0.25, 0.9))]


def test_grid_points_are_the_cross_product_in_order():
    dims = [Choice("a", (1, 2)), Choice("b", ("x", "y"))]
    assert grid_points(dims) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


@pytest.mark.parametrize("overrides, message", [
    (["sweep.space={mask.ratioo: [0.5]}"], "unknown config key mask.ratioo"),
    (["sweep.space={trainn.epochs: [1]}"], "unknown config key trainn"),
    (["sweep.space={}"], "sweep.space is empty"),
    (["sweep.space={mask.ratio: []}"], "sweep.space.mask.ratio is an empty list"),
    (["sweep.space={mask.ratio: [0.5, 1.0]}"], "mask.ratio: must be in (0, 1), got 1.0"),
    (["sweep.space={mask.ratio: 0.5}"], "must be a list of values"),
    (["sweep.space={mask.ratio: {low: 0.1, high: 0.9}}"], "needs sweep.search: optuna"),
    (["sweep.search=optuna", "sweep.space={mask.ratio: {low: 0.1, high: 1.0}}"], "got 1.0"),
    (["sweep.search=optuna", "sweep.space={optim.base_lr: {low: 0, high: 1, log: true}}"], "log range needs low > 0"),
    (["sweep.space={model.decoder_embed_dim: [64, 66]}"], "divisible by 4, got 66"),
    (["sweep.space={sweep.max_concurrent: [1, 2]}"], "cannot be searched"),
    (["sweep.scheduler=asha"], "asha stops trials on their reconstruction loss"),
    (["sweep.gpus_per_worker=0.5", "sweep.workers_per_trial=2"], "NCCL"),
    (["sweep.gpus_per_worker=2"], "a Train worker (one DDP process) drives one GPU"),
    (["sweep.metric=probe_top5"], "sweep.metric must be one of"),
    (["sweep.mode=min"], "would search for the worst probe_top1: set sweep.mode: max"),
    (["sweep.metric=final_train_loss", "sweep.mode=min"], "rank by probe_top1"),  # the space holds mask.ratio
    (["sweep.scheduler=asha", "sweep.space={model.norm_pix_loss: [true, false]}"], "asha stops trials"),
])
def test_bad_sweeps_fail_validation_naming_the_problem(overrides, message):
    cfg = load_config(SMOKE_SWEEP, overrides)
    with pytest.raises(ConfigError) as info:
        validate_experiment(cfg)
    assert message in str(info.value)


def test_unknown_key_in_the_experiment_file_fails_at_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE_SWEEP.read_text().replace("  max_failures: 2", "  max_failure: 2"))
    with pytest.raises(ConfigError, match="unknown config key sweep.max_failure"):
        load_config(bad)


# -- the tables ------------------------------------------------------------------------


def _recorder(folder, **kw):
    return results.SweepRecorder(str(folder), "s", "probe_top1", "git:abc", **kw)


def test_tables_have_the_documented_columns_and_config_types(tmp_path):
    cfg = load_config(SMOKE_SWEEP)
    rec = _recorder(tmp_path)
    rec.trial("t0", replace(cfg, {"mask.ratio": 0.5}), {"mask.ratio": 0.5}, "RUNNING")
    rec.write()
    trials = pq.read_table(tmp_path / results.TRIALS_FILE)
    documented = [c.name for c in results.TRIAL_COLUMNS] + [n for n, _ in results.config_columns()]
    assert trials.column_names == documented
    assert trials.schema.field("mask.ratio").type == pa.float64()
    assert trials.schema.field("data.train_subset").type == pa.int64()
    assert trials.schema.field("optim.clip_grad").type == pa.float64()  # None in this config, still typed
    assert trials.schema.field("sweep.space").type == pa.string()
    row = trials.to_pylist()[0]
    assert row["mask.ratio"] == 0.5 and row["params"] == '{"mask.ratio": 0.5}' and row["seed"] == cfg.train.seed
    epochs = pq.read_table(tmp_path / results.EPOCHS_FILE)
    assert epochs.column_names == [c.name for c in results.EPOCH_COLUMNS] and epochs.num_rows == 0


def test_repeated_epochs_keep_the_last_and_history_replaces_live_rows(tmp_path):
    cfg = load_config(SMOKE_SWEEP)
    rec = _recorder(tmp_path)
    rec.trial("t0", cfg, {}, "RUNNING")
    for epoch, loss in [(1, 1.0), (2, 0.9), (2, 0.8)]:  # epoch 2 retried after a crash
        rec.epoch("t0", {"epoch": epoch, "step": 4 * epoch, "train_loss": loss})
    rec.write()
    rows = pq.read_table(tmp_path / results.EPOCHS_FILE).to_pylist()
    assert [(r["epoch"], r["train_loss"]) for r in rows] == [(1, 1.0), (2, 0.8)]
    history = [{"epoch": e, "step": 4 * e, "train_loss": 1.0 / e, "lr": 1e-3, "epoch_time_s": 1.0,
                "images_per_sec": 100.0} for e in (1, 2, 3)]
    rec.trial("t0", cfg, {}, "TERMINATED")
    rec.finish("t0", {"probe_top1": 0.7, "checkpoint_path": "/x/checkpoint-0003"}, history)
    rec.write()
    rows = pq.read_table(tmp_path / results.EPOCHS_FILE).to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["train_loss"] == pytest.approx(1 / 3)
    (trial,) = pq.read_table(tmp_path / results.TRIALS_FILE).to_pylist()
    assert trial["status"] == "TERMINATED" and trial["probe_top1"] == 0.7


def test_a_new_recorder_keeps_the_rows_already_written(tmp_path):
    cfg = load_config(SMOKE_SWEEP)
    first = _recorder(tmp_path)
    first.trial("t0", cfg, {}, "TERMINATED")
    first.epoch("t0", {"epoch": 1, "train_loss": 1.0})
    first.write()
    second = _recorder(tmp_path)  # a resumed sweep
    second.trial("t1", cfg, {}, "RUNNING")
    second.write()
    assert sorted(pq.read_table(tmp_path / results.TRIALS_FILE).column("trial_id").to_pylist()) == ["t0", "t1"]
    assert pq.read_table(tmp_path / results.EPOCHS_FILE).num_rows == 1


def test_the_error_column_holds_only_an_error_trials_error(tmp_path):
    cfg = load_config(SMOKE_SWEEP)
    rec = _recorder(tmp_path)
    rec.trial("t0", cfg, {}, "ERROR", error="Traceback ...\nRuntimeError: worker died")
    assert rec.trials["t0"]["error"] == "RuntimeError: worker died"
    rec.write()
    resumed = _recorder(tmp_path)  # --resume retries it, and this time it finishes
    resumed.trial("t0", cfg, {}, "RUNNING")
    assert resumed.trials["t0"]["error"] is None
    resumed.trial("t0", cfg, {}, "TERMINATED")
    resumed.finish("t0", {"probe_top1": 0.7, "error": "stale"}, [])
    resumed.write()
    (row,) = pq.read_table(tmp_path / results.TRIALS_FILE).to_pylist()
    assert (row["status"], row["error"], row["probe_top1"]) == ("TERMINATED", None, 0.7)


GARBAGE = b"PAR1 this is not a parquet file PAR1"


@pytest.mark.parametrize("name", [results.TRIALS_FILE, results.EPOCHS_FILE])
def test_an_unreadable_table_stops_the_recorder_and_is_left_as_it_is(tmp_path, name):
    cfg = load_config(SMOKE_SWEEP)
    first = _recorder(tmp_path)
    first.trial("t0", cfg, {}, "TERMINATED")
    first.write()
    (tmp_path / name).write_bytes(GARBAGE)
    with pytest.raises(results.UnreadableTableError, match="move it aside") as info:
        _recorder(tmp_path)  # a resumed sweep must not rebuild the table from its own rows
    assert isinstance(info.value, ValueError) and str(tmp_path / name) in str(info.value)
    assert (tmp_path / name).read_bytes() == GARBAGE


def test_resume_with_an_unreadable_table_exits_2_before_ray_starts(tmp_path, capsys):
    import yaml

    from mae.config import to_dict
    from ray_jobs import sweep

    folder = tmp_path / "s"
    folder.mkdir()
    (folder / sweep.EXPERIMENT_FILE).write_text(yaml.safe_dump(to_dict(load_config(SMOKE_SWEEP))))
    (folder / "experiment_state-2026-11-29_00-00-00.json").write_text("{}")  # Tune had saved its state
    (folder / results.TRIALS_FILE).write_bytes(GARBAGE)
    argv = ["--experiment", str(SMOKE_SWEEP), "--storage", str(tmp_path), "--name", "s", "--resume"]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read") and str(folder / results.TRIALS_FILE) in err
    assert "Traceback" not in err
    assert (folder / results.TRIALS_FILE).read_bytes() == GARBAGE
    assert not sweep.ray.is_initialized()


def _no_trial(config):
    """A trainable for Tuners that are built and restored but never fitted."""


@pytest.mark.parametrize("search, overrides", [
    ("grid", []),
    ("optuna", ["sweep.num_samples=4", "sweep.space={mask.ratio: {low: 0.5, high: 0.9}}"]),
])
def test_resume_takes_the_new_max_concurrent_over_the_restored_one(tmp_path, search, overrides):
    import ray
    from ray import tune
    from ray.tune.execution.tune_controller import _get_max_pending_trials
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

    from ray_jobs import sweep

    cfg = load_config(SMOKE_SWEEP, ["sweep.max_concurrent=1", f"sweep.search={search}", *overrides])
    space = sweep.tune_space(validate_experiment(cfg), search)

    def built(limit):  # the search algorithm tune.run builds from TuneConfig(max_concurrent_trials=limit)
        if search == "grid":
            return BasicVariantGenerator(max_concurrent=limit)
        alg = SearchGenerator(ConcurrencyLimiter(sweep.tune_config(cfg).search_alg, max_concurrent=limit))
        alg.set_search_properties(cfg.sweep.metric, cfg.sweep.mode, space)
        return alg

    def limit_of(alg):
        return alg.max_concurrent if search == "grid" else alg.searcher.max_concurrent

    tune.Tuner(_no_trial, param_space=space, tune_config=sweep.tune_config(cfg),  # writes tuner.pkl
               run_config=tune.RunConfig(name="s", storage_path=str(tmp_path)))
    folder = str(tmp_path / "s")
    built(1).save_to_dir(folder, "first")  # the search state the first run (--max-concurrent 1) left

    tuner = sweep.restore_tuner(folder, _no_trial, sweep.ParquetCallback(folder, cfg, "git:abc"), max_concurrent=3)
    resumed = tuner._local_tuner._tune_config
    assert resumed.max_concurrent_trials is None  # else tune.run would build its own search algorithm
    assert resumed.num_samples == 4 if search == "optuna" else resumed.num_samples == 1
    if search == "optuna":
        assert isinstance(resumed.search_alg.searcher.searcher, sweep.FinalMetricOptunaSearch)
    resumed.search_alg.restore_from_dir(folder)  # what Tune's controller does on resume
    assert limit_of(resumed.search_alg) == 3
    if search == "optuna":
        assert _get_max_pending_trials(resumed.search_alg) == 3
    plain = built(3)
    plain.restore_from_dir(folder)
    assert limit_of(plain) == 1, "Tune's own classes take the saved limit back: the reason for the fix"
    assert not ray.is_initialized()


def test_writes_are_atomic_and_throttled(tmp_path, monkeypatch):
    cfg = load_config(SMOKE_SWEEP)
    rec = _recorder(tmp_path, min_interval_s=3600)
    rec.trial("t0", cfg, {}, "RUNNING")
    assert rec.write(force=False)  # first write
    rec.epoch("t0", {"epoch": 1, "train_loss": 1.0})
    assert not rec.write(force=False)  # within the interval
    assert pq.read_table(tmp_path / results.EPOCHS_FILE).num_rows == 0

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(results.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        rec.write()
    monkeypatch.undo()
    assert pq.read_table(tmp_path / results.TRIALS_FILE).num_rows == 1  # the old file is intact
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_stopped_trial_gets_its_losses_from_the_live_epochs(tmp_path):
    cfg = load_config(SMOKE_SWEEP)
    rec = _recorder(tmp_path)
    rec.trial("t0", cfg, {}, "RUNNING")
    for epoch, loss in [(1, 1.0), (2, 0.7), (3, 0.8)]:
        rec.epoch("t0", {"epoch": epoch, "train_loss": loss})
    rec.trial("t0", cfg, {}, "STOPPED")
    rec.stopped("t0")
    row = rec.trials["t0"]
    assert (row["final_train_loss"], row["best_train_loss"], row["best_epoch"], row["epochs_completed"]) == (0.8, 0.7, 2, 3)
    assert row["probe_top1"] is None


def test_summary_sorts_by_the_objective():
    table = pa.Table.from_pylist([
        {"trial_id": "a", "status": "TERMINATED", "mask.ratio": 0.5, "probe_top1": 0.6},
        {"trial_id": "b", "status": "ERROR", "mask.ratio": 0.9, "probe_top1": None},
        {"trial_id": "c", "status": "TERMINATED", "mask.ratio": 0.75, "probe_top1": 0.8},
    ])
    text = results.summarize(table, "probe_top1", "max", ["mask.ratio"])
    order = [line.split()[0] for line in text.splitlines()[1:]]
    assert order == ["c", "a", "b"]


def test_readme_documents_every_column():
    readme = (REPO / "ray_jobs" / "README.md").read_text()
    for column in results.TRIAL_COLUMNS + results.EPOCH_COLUMNS:
        assert f"`{column.name}`" in readme, f"ray_jobs/README.md does not document {column.name}"


def test_workers_that_cannot_fit_beside_their_trial_driver_are_refused(monkeypatch):
    # Without a trial_driver resource the trial holds 0.01 CPU while its workers wait: two
    # 1-CPU workers can never start on 2 CPUs, and Ray would retry them for ever.
    import ray

    from ray_jobs import cluster

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(RuntimeError, match=r"2 CPU \(2 workers x 1\) beside the trial driver's 0.01 CPU"):
        cluster.check_fits(2, {"CPU": 1.0})
    cluster.check_fits(2, {"CPU": 0.99})  # they fit beside it
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, cluster.TRIAL_DRIVER: 2.0})
    cluster.check_fits(2, {"CPU": 1.0})  # the driver takes its own resource


def test_folders_are_made_absolute_before_ray_workers_see_them(tmp_path, monkeypatch):
    # Train workers run in Ray's session folder: a relative folder or a ~ there names nothing
    from ray_jobs import cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAE_DATA_DIR", "fmnist")
    cfg = cluster.absolute_data_dir(load_config(None, ["data.dataset=imagefolder", "data.data_dir=~/in",
                                                       "data.pipeline=predecoded", "data.predecoded_dir=stores/in"]))
    assert (cfg.data.data_dir, cfg.data.predecoded_dir) == (str(tmp_path / "home/in"), str(tmp_path / "stores/in"))
    assert os.environ["MAE_DATA_DIR"] == "fmnist"  # data_dir is set, so the variable is not read
    assert cluster.absolute_data_dir(load_config(None)).data.data_dir is None
    assert os.environ["MAE_DATA_DIR"] == str(tmp_path / "fmnist")  # inherited by an embedded Ray's workers
    cfg = load_config(None, ["data.data_dir=/abs/x/", "data.predecoded_dir=s3://bucket/store"])
    assert cluster.absolute_data_dir(cfg) == cfg  # absolute folders and URIs are left as given


def test_asha_counts_epochs_so_a_retried_trial_still_reaches_its_probe():
    # A retry reports the epochs since its last checkpoint again (here epoch 2): counted in
    # reports, the last epoch's would be the 4th and hit max_t (epochs + 1), stopping the trial.
    import types

    from ray.tune.schedulers import TrialScheduler

    from ray_jobs import sweep

    cfg = load_config(SMOKE_SWEEP, ["sweep.scheduler=asha", "train.epochs=3",
                                    "sweep.space={model.decoder_depth: [1, 2]}"])
    scheduler = sweep.tune_config(cfg).scheduler
    trial = types.SimpleNamespace(trial_id="t0")
    scheduler.on_trial_add(None, trial)
    actions = [scheduler.on_trial_result(None, trial, {"epoch": e, "train_loss": 1.0, "training_iteration": i + 1})
               for i, e in enumerate([1, 2, 2, 3])]
    assert actions == [TrialScheduler.CONTINUE] * 4
    final = {"train_loss": 1.0, "probe_top1": 0.5, "training_iteration": 5}  # the probe's report: no epoch
    assert scheduler.on_trial_result(None, trial, final) == TrialScheduler.CONTINUE


def test_checkpoint_paths_on_uri_storage_keep_their_scheme():
    # Ray keeps a checkpoint's path inside its file system: s3://bucket/results/... -> bucket/results/...
    import types

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from ray_jobs.pretrain import checkpoint_location

    s3 = types.SimpleNamespace(path="bucket/results/train-t0/checkpoint-0005")
    assert checkpoint_location(s3, "s3://bucket/results") == "s3://bucket/results/train-t0/checkpoint-0005"
    local = Checkpoint("file:///tmp/results/train-t0/checkpoint-0005")
    location = checkpoint_location(local, "file:///tmp/results")
    assert location.startswith("file://") and pafs.FileSystem.from_uri(location)[1] == local.path
    assert checkpoint_location(Checkpoint("/abs/results/x"), "/abs/results") == "/abs/results/x"


def test_a_pretraining_rerun_its_checkpoint_would_refuse_stops_before_ray(tmp_path, fashion_mnist_dir, capsys):
    import ray

    from mae.engine import pretrain
    from ray_jobs import pretrain as pretrain_job

    smoke = str(REPO / "experiments" / "smoke.yaml")
    argv = ["--experiment", smoke, "--storage", str(tmp_path), "--name", "run", "--set", "train.epochs=1",
            "--set", f"data.data_dir={fashion_mnist_dir}", "--set", "data.train_subset=64",
            "--set", "train.batch_size=32"]
    pretrain(load_config(smoke, argv[7::2]), tmp_path / "run")  # the run's first attempt
    assert pretrain_job.main([*argv, "--set", "mask.ratio=0.5"]) == 2
    assert "--name run resumes that run" in capsys.readouterr().err and not ray.is_initialized()
    assert pretrain_job.main([*argv, "--workers", "2"]) == 2
    assert "written by 1 process(es), and this run has 2" in capsys.readouterr().err
    pretrain_job.check_rerun(load_config(smoke, [*argv[7::2], "data.num_workers=1"]), str(tmp_path), "run")  # fine


def test_an_int_range_is_checked_at_every_value_optuna_may_draw():
    cfg = load_config(SMOKE_SWEEP, ["sweep.search=optuna",
                                    "sweep.space={model.decoder_embed_dim: {low: 32, high: 128}}"])
    with pytest.raises(ConfigError, match=r"\{low: 32, high: 128\} holds 33, which Optuna may draw: .*divisible by"):
        validate_experiment(cfg)
    validate_experiment(replace(cfg, {"sweep.space": {"model.decoder_depth": {"low": 1, "high": 4}}}))


def test_a_point_that_is_not_a_valid_experiment_becomes_an_error_row_not_a_crash(tmp_path):
    # Tune calls its callbacks without a try: an exception in one ends the whole sweep
    import types

    from ray_jobs import sweep

    callback = sweep.ParquetCallback(str(tmp_path), load_config(SMOKE_SWEEP), "git:abc")
    trial = types.SimpleNamespace(trial_id="t0", config={"model.decoder_embed_dim": 34})
    callback.on_trial_start(0, [], trial)
    row = pq.read_table(tmp_path / results.TRIALS_FILE).to_pylist()[0]
    assert row["status"] == "ERROR" and "divisible by 4, got 34" in row["error"]


def test_a_grids_repeats_each_get_their_own_seed():
    from ray_jobs.space import seeded_repeats

    cfg = load_config(SMOKE_SWEEP, ["sweep.num_samples=3", "train.seed=7"])
    repeated = seeded_repeats(cfg)
    assert repeated.sweep.num_samples == 1 and repeated.sweep.space["train.seed"] == [7, 8, 9]
    points = grid_points(validate_experiment(repeated))
    assert len(points) == 3 * len(grid_points(validate_experiment(cfg)))
    assert {p["train.seed"] for p in points} == {7, 8, 9}
    assert seeded_repeats(load_config(SMOKE_SWEEP)) == load_config(SMOKE_SWEEP)  # one repeat: as it was
    optuna = load_config(SMOKE_SWEEP, ["sweep.num_samples=3", "sweep.search=optuna"])
    assert seeded_repeats(optuna) == optuna  # Optuna's samples are trials, not repeats
    with pytest.raises(ConfigError, match="every repeat would be a copy"):
        seeded_repeats(replace(cfg, {"sweep.space": {"train.seed": [0, 1]}}))


@pytest.mark.parametrize("snapshot", [None, b'{"ray_version": "2.60.0", "checkpoint_res'])
def test_a_stopped_trial_records_no_checkpoint_when_ray_registered_none(tmp_path, snapshot):
    """Checkpoint folders that Ray never registered (copies cut short by the stop) are not
    checkpoints: the row's checkpoint_path stays null, and so it does when Ray's record of them is
    cut short too; the row is still STOPPED. A registered one: test_ray_sweep.py."""
    from mae.checkpoint import CHECKPOINT_FILE
    from ray_jobs import sweep
    from tests.conftest import stopped_trial_row

    run = tmp_path / sweep.train_run_name("t0")
    for name in ("checkpoint-0001", "checkpoint-0002"):
        (run / name).mkdir(parents=True)
        (run / name / CHECKPOINT_FILE).write_bytes(b"")
    if snapshot is not None:
        (run / "checkpoint_manager_snapshot.json").write_bytes(snapshot)
    row = stopped_trial_row(tmp_path, epoch=2, train_loss=0.9)
    assert row["status"] == "STOPPED" and row["checkpoint_path"] is None
    assert row["final_train_loss"] == 0.9


def test_a_trial_finished_before_a_killed_session_keeps_its_row_when_resume_runs_it_again(tmp_path, caplog):
    """Tune saves its state at most every 10 s: a session killed just after a trial finished leaves it
    RUNNING there, and --resume runs it again (a probe, nothing to train). Its finished row stays."""
    import types

    from ray_jobs import sweep

    def session():
        return sweep.ParquetCallback(str(tmp_path), load_config(SMOKE_SWEEP), "git:abc")

    def final(seconds: float) -> dict:
        return {"epoch": 2, sweep.FINAL_MARK: 0.7, "wall_time_s": seconds, "history_json": "[]"}

    trial = types.SimpleNamespace(trial_id="t0", config={"mask.ratio": 0.5}, last_result=final(30.0),
                                  get_error=lambda: RuntimeError("the data folder moved"))
    first = session()
    first.on_trial_start(0, [], trial)
    first.on_trial_complete(0, [], trial)
    (written,) = pq.read_table(tmp_path / results.TRIALS_FILE).to_pylist()
    assert (written["status"], written["wall_time_s"]) == ("TERMINATED", 30.0)
    again = session()  # the resumed session, which runs t0 again
    trial.last_result = final(2.0)
    again.on_trial_start(0, [], trial)
    assert pq.read_table(tmp_path / results.TRIALS_FILE).to_pylist() == [written]
    again.on_trial_result(0, [], trial, final(2.0))
    again.on_trial_complete(0, [], trial)
    with caplog.at_level(logging.WARNING, logger="ray_jobs.sweep"):
        again.on_trial_error(0, [], trial)  # run again, it failed: said, and the finished row kept
    assert "trial t0, finished in an earlier session, failed when run again (the data folder moved)" in caplog.text
    again.on_experiment_end([])
    assert pq.read_table(tmp_path / results.TRIALS_FILE).to_pylist() == [written]
    assert again.completed == 1  # it still counts as done (--interrupt-after)


def test_a_point_that_is_not_a_valid_experiment_is_an_error_row_showing_that_point(tmp_path):
    import types

    from ray_jobs import sweep

    callback = sweep.ParquetCallback(str(tmp_path), load_config(SMOKE_SWEEP), "git:abc")
    callback.on_trial_start(0, [], types.SimpleNamespace(trial_id="t0", config={"mask.ratio": 1.0}))
    (row,) = pq.read_table(tmp_path / results.TRIALS_FILE).to_pylist()
    assert row["status"] == "ERROR" and row["error"].startswith("not a valid experiment: mask.ratio")
    assert row["mask.ratio"] == 1.0 and json.loads(row["params"]) == {"mask.ratio": 1.0}  # not the base's 0.75


@pytest.mark.parametrize("epochs", [4, 8])
def test_asha_does_not_stop_a_trial_on_its_last_epoch(epochs):
    # rungs at grace_period x 4^k: with epochs a multiple of 4, one lies on the last epoch
    import types

    from ray.tune.schedulers import TrialScheduler

    from ray_jobs import sweep

    cfg = load_config(SMOKE_SWEEP, ["sweep.scheduler=asha", f"train.epochs={epochs}",
                                    "sweep.space={model.decoder_depth: [1, 2]}"])
    scheduler = sweep.tune_config(cfg).scheduler
    good, bad = types.SimpleNamespace(trial_id="good"), types.SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)
    actions = {}
    for epoch in range(1, epochs + 1):
        for trial, loss in ((good, 1.0 - 0.05 * epoch), (bad, 1.0 - 0.04 * epoch)):  # bad trails good by a little
            report = {"epoch": epoch, "train_loss": loss, "training_iteration": epoch}
            actions[trial.trial_id, epoch] = scheduler.on_trial_result(None, trial, report)
    assert actions["bad", epochs] == TrialScheduler.CONTINUE  # trained to the end: its probe comes next


def test_the_quick_probe_uses_a_gpu_only_when_the_trial_asked_for_one(tmp_path, monkeypatch):
    from ray.train import Checkpoint

    from mae.checkpoint import save_checkpoint
    from mae.config import to_dict
    from mae.engine import build_model
    from ray_jobs import pretrain as pretrain_job

    cfg = load_config(SMOKE_SWEEP)
    save_checkpoint(tmp_path / "checkpoint-0001", {"model": build_model(cfg).state_dict(), "config": to_dict(cfg)})
    devices = []
    monkeypatch.setattr(pretrain_job.torch.cuda, "is_available", lambda: True)  # a GPU node
    monkeypatch.setattr(pretrain_job, "quick_probe", lambda model, cfg, device: devices.append(device) or {})
    for use_gpu in (False, True):
        pretrain_job._probe(Checkpoint.from_directory(str(tmp_path / "checkpoint-0001")), 1, use_gpu)
    assert devices == ["cpu", "cuda"]


def test_the_embedded_ray_counts_the_cpus_a_container_allows(tmp_path, monkeypatch):
    from ray_jobs import cluster

    monkeypatch.setattr(cluster.os, "sched_getaffinity", lambda pid: set(range(8)))  # an 8-CPU cpuset
    mine = 8
    assert cluster.available_cpus(tmp_path) == mine  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2, no limit
    assert cluster.available_cpus(tmp_path) == mine
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus=2.5: 2 whole CPUs
    assert cluster.available_cpus(tmp_path) == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # v1: one CPU's worth
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cluster.available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cluster.available_cpus(tmp_path) == mine


def test_resuming_a_sweep_saved_before_the_held_out_split_and_the_gpu_limit(tmp_path):
    # its trials were scored on the test split, with gpus_per_worker 2 allowed: the rest are scored
    # as they were, and reserve the one GPU a worker uses (a resume ignores --set, so it cannot be asked)
    import yaml

    from mae.config import to_dict
    from ray_jobs import sweep

    saved = to_dict(load_config(SMOKE_SWEEP))
    del saved["probe"]["quick_split"]
    saved["sweep"]["gpus_per_worker"] = 2.0
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / sweep.EXPERIMENT_FILE).write_text(yaml.safe_dump(saved))
    (tmp_path / "s" / "experiment_state-2026-11-29_00-00-00.json").write_text("{}")  # Tune had saved its state
    argv = ["--experiment", str(SMOKE_SWEEP), "--storage", str(tmp_path), "--name", "s", "--resume"]
    plan = sweep.plan_sweep(sweep.build_parser(str(SMOKE_SWEEP), "").parse_args(argv))
    assert plan.cfg.probe.quick_split == "test" and plan.cfg.sweep.gpus_per_worker == 1.0
    assert load_config(SMOKE_SWEEP).probe.quick_split == "val"  # a new sweep's default


def test_a_worker_reserves_at_most_one_gpu_and_ddp_ranks_never_share_one(monkeypatch):
    from ray_jobs import cluster

    monkeypatch.setattr(cluster, "cluster_gpus", lambda: 8)
    assert cluster.worker_resources(1.0, 0.25, workers=1) == ({"CPU": 1.0, "GPU": 0.25}, True)  # trials share
    # fine-tuning with --workers 4 an encoder its sweep trained at 0.25: NCCL refuses ranks on one GPU
    assert cluster.worker_resources(1.0, 0.25, workers=4) == ({"CPU": 1.0, "GPU": 1.0}, True)
    assert cluster.worker_resources(1.0, 2.0, workers=1) == ({"CPU": 1.0, "GPU": 1.0}, True)  # one GPU a worker
    monkeypatch.setattr(cluster, "cluster_gpus", lambda: 0)
    assert cluster.worker_resources(1.0, 0.25, workers=4) == ({"CPU": 1.0}, False)


def test_the_pre_flight_check_leaves_an_unreadable_newest_checkpoint_to_ray(tmp_path):
    # a copy into storage cut short: Ray resumes from the newest checkpoint it registered, not this one
    from mae.checkpoint import save_checkpoint
    from ray_jobs import pretrain as pretrain_job

    folder = save_checkpoint(tmp_path / "run" / "checkpoint-0002", {"model": {}, "epoch": 2})
    data = (folder / "checkpoint.pt").read_bytes()
    (folder / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    pretrain_job.check_rerun(load_config(SMOKE_SWEEP, ["mask.ratio=0.5"]), str(tmp_path), "run")  # no error


def test_a_missing_dataset_is_refused_before_ray_starts(tmp_path, capsys):
    from ray_jobs import pretrain, sweep

    nowhere = tmp_path / "nowhere"
    argv = ["--experiment", str(SMOKE_SWEEP), "--storage", str(tmp_path), "--name", "s",
            "--set", f"data.data_dir={nowhere}"]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Fashion-MNIST folder") and str(nowhere) in err and "Traceback" not in err
    assert not (tmp_path / "s").exists() and not sweep.ray.is_initialized()
    (tmp_path / "half").mkdir()  # the folder, without its IDX files
    assert pretrain.main(["--experiment", str(SMOKE_SWEEP), "--storage", str(tmp_path),
                          "--set", f"data.data_dir={tmp_path / 'half'}"]) == 2
    assert "train-images-idx3-ubyte[.gz] not found" in capsys.readouterr().err
    assert not sweep.ray.is_initialized()


def test_the_reuse_jobs_leave_the_worker_count_to_their_own_flag():
    from ray_jobs.space import check_worker_resources

    cfg = load_config(SMOKE_SWEEP, ["sweep.workers_per_trial=0"])  # mae.config accepts it; a sweep does not
    check_worker_resources(cfg, worker_count=False)
    with pytest.raises(ConfigError, match="sweep.workers_per_trial must be >= 1"):
        check_worker_resources(cfg)
    with pytest.raises(ConfigError, match="sweep.cpus_per_worker"):
        check_worker_resources(replace(cfg, {"sweep.cpus_per_worker": 0}), worker_count=False)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 1, got -1"),
    (["--set", "sweep.workers_per_trial=-1"], "sweep.workers_per_trial must be >= 1"),
    (["--set", "sweep.cpus_per_worker=0"], "sweep.cpus_per_worker must be positive"),
    (["--set", "sweep.gpus_per_worker=-0.5"], "sweep.gpus_per_worker must be >= 0"),
    (["--set", "sweep.max_failures=-2"], "sweep.max_failures must be >= 0"),
])
def test_pretrain_job_refuses_bad_worker_sizing_before_ray_starts(tmp_path, capsys, argv, message):
    from ray_jobs import pretrain

    assert pretrain.main(["--experiment", str(SMOKE_SWEEP), "--storage", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not pretrain.ray.is_initialized()


def test_a_resume_may_point_the_remaining_trials_at_a_moved_dataset(tmp_path, fashion_mnist_dir):
    import yaml

    from mae.config import to_dict
    from mae.data import DatasetNotFoundError
    from ray_jobs import sweep

    saved = to_dict(load_config(SMOKE_SWEEP, [f"data.data_dir={tmp_path / 'moved-away'}"]))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / sweep.EXPERIMENT_FILE).write_text(yaml.safe_dump(saved))
    (tmp_path / "s" / "experiment_state-2026-11-29_00-00-00.json").write_text("{}")  # Tune had saved its state
    argv = ["--experiment", str(SMOKE_SWEEP), "--storage", str(tmp_path), "--name", "s", "--resume"]

    def plan(*extra):
        return sweep.plan_sweep(sweep.build_parser(str(SMOKE_SWEEP), "").parse_args([*argv, *extra]))

    with pytest.raises(DatasetNotFoundError, match="moved-away"):
        plan()
    resumed = plan("--set", f"data.data_dir={fashion_mnist_dir}", "--set", "train.epochs=7")
    assert resumed.cfg.data.data_dir == str(fashion_mnist_dir)  # where and how it runs: taken
    assert resumed.cfg.train.epochs == saved["train"]["epochs"]  # what it computes: the saved sweep's
    assert plan().cfg.data.data_dir == str(fashion_mnist_dir)  # saved: the next --resume runs there too


def test_a_resume_refuses_a_damaged_experiment_file_or_a_sweep_tune_never_saved(tmp_path):
    from ray_jobs import sweep

    folder = tmp_path / "s"
    folder.mkdir()
    argv = ["--experiment", str(SMOKE_SWEEP), "--storage", str(tmp_path), "--name", "s", "--resume"]
    for damaged in ("", "model: [unclosed"):  # empty (cut at creation), and not YAML
        (folder / sweep.EXPERIMENT_FILE).write_text(damaged)
        with pytest.raises(ConfigError, match="damaged .* write it back"):
            sweep.plan_sweep(sweep.build_parser(str(SMOKE_SWEEP), "").parse_args(argv))
    import yaml

    from mae.config import to_dict

    (folder / sweep.EXPERIMENT_FILE).write_text(yaml.safe_dump(to_dict(load_config(SMOKE_SWEEP))))
    (folder / "tuner.pkl").write_bytes(b"")  # killed between Tuner() and Tune's first saved state
    with pytest.raises(ConfigError, match="stopped before Tune saved any state"):
        sweep.plan_sweep(sweep.build_parser(str(SMOKE_SWEEP), "").parse_args(argv))


def test_on_a_cluster_a_dataset_missing_on_this_node_is_only_a_warning(tmp_path, caplog, monkeypatch):
    from mae.data import DatasetNotFoundError
    from ray_jobs import cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(SMOKE_SWEEP, [f"data.data_dir={tmp_path / 'elsewhere'}"])
    with pytest.raises(DatasetNotFoundError):
        cluster.check_dataset_here([cfg], None, ("train",))  # an embedded Ray: its workers run here
    with caplog.at_level("WARNING"):
        cluster.check_dataset_here([cfg], "10.0.0.1:6379", ("train",))  # the head may lack the workers' data mount
    assert "elsewhere" in caplog.text and "may have it" in caplog.text


def test_a_remote_checkpoint_is_downloaded_into_the_workers_scratch_folder(tmp_path):
    """Ray's own download folder (Checkpoint.as_directory) stays in /tmp when Ray kills the worker;
    the scratch folder is removed by the next worker (ray_jobs.scratch)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from ray_jobs.pretrain import local_folder

    (tmp_path / "bucket" / "checkpoint-0003").mkdir(parents=True)
    (tmp_path / "bucket" / "checkpoint-0003" / "checkpoint.pt").write_bytes(b"weights")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    local = Checkpoint(str(tmp_path / "bucket" / "checkpoint-0003"))
    assert local_folder(local, scratch) == local.path  # read in place, no copy
    remote = Checkpoint("checkpoint-0003", pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"),
                                                                         pyarrow.fs.LocalFileSystem()))
    folder = Path(local_folder(remote, scratch))
    assert folder.parent == scratch and (folder / "checkpoint.pt").read_bytes() == b"weights"


def test_the_probe_task_reads_a_remote_checkpoint_from_a_scratch_folder_and_removes_it(tmp_path, monkeypatch):
    """Like a Train worker's, the probe task's download is in a scratch folder (ray_jobs.scratch),
    which the next worker on the node removes if Ray kills the task."""
    import tempfile

    import pyarrow.fs
    from ray.train import Checkpoint

    from mae.checkpoint import save_checkpoint
    from mae.config import to_dict
    from mae.engine import build_model
    from ray_jobs import pretrain

    cfg = load_config(SMOKE_SWEEP)
    save_checkpoint(tmp_path / "bucket" / "checkpoint-0002",
                    {"model": build_model(cfg).state_dict(), "config": to_dict(cfg), "history": [{"epoch": 2}]})
    remote = Checkpoint("checkpoint-0002", pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"),
                                                                         pyarrow.fs.LocalFileSystem()))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    read_from, load_model = [], pretrain.load_model

    def loading(folder):
        read_from.append(Path(folder).relative_to(tmp))  # ValueError if not in the temporary folder
        return load_model(folder)

    monkeypatch.setattr(pretrain, "load_model", loading)
    monkeypatch.setattr(pretrain, "quick_probe", lambda model, probe_cfg, device: {"probe_top1": 0.5})
    assert pretrain._probe(remote, threads=1, use_gpu=False) == {"probe_top1": 0.5, "history": [{"epoch": 2}]}
    assert len(read_from) == 1 and read_from[0].parts[0].startswith("mae-worker-probe-")
    assert list(tmp.iterdir()) == []  # removed once loaded


def test_a_write_to_uri_storage_that_fails_half_way_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from ray_jobs import sweep

    uri = f"file://{tmp_path}/experiment.yaml"
    cfg = load_config(SMOKE_SWEEP)
    atomic_writes = []
    monkeypatch.setattr(results, "write_uri_atomic",
                        lambda *a, write=results.write_uri_atomic: atomic_writes.append(a[0]) or write(*a))
    sweep.write_experiment(uri, cfg)
    assert atomic_writes == [uri]
    before = (tmp_path / "experiment.yaml").read_bytes()
    assert load_config(tmp_path / "experiment.yaml") == cfg

    def half_then_killed(out):
        out.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        results.write_uri_atomic(uri, half_then_killed)
    assert (tmp_path / "experiment.yaml").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["experiment.yaml"]  # its temporary object removed
    sweep.write_experiment(uri, replace(cfg, {"mask.ratio": 0.5}))
    assert load_config(tmp_path / "experiment.yaml").mask.ratio == 0.5
