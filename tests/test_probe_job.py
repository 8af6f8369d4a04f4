"""The reuse jobs' driver (ray_jobs/reuse.py) without starting Ray: choosing trials, configs, rows,
and the probe head its worker saves.

The jobs themselves run end to end on a real smoke sweep in tests/test_analysis.py.
"""

import json
import logging
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ray_jobs is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from mae import results as mae_results  # noqa: E402
from mae.checkpoint import save_checkpoint  # noqa: E402
from mae.config import ConfigError, load_config, to_dict  # noqa: E402
from mae.data import build_dataset  # noqa: E402
from mae.engine import build_model  # noqa: E402
from mae.probe import linear_probe, load_probe_head, save_probe_head  # noqa: E402
from ray_jobs import reuse  # noqa: E402
from ray_jobs import results as sweep_tables  # noqa: E402

SMOKE = str(REPO / "experiments" / "smoke.yaml")


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory) -> Path:
    """Three finished trials (and a failed one) with real checkpoints of ours."""
    folder = tmp_path_factory.mktemp("results") / "ratios"
    rows = []
    for i, (ratio, top1, loss) in enumerate([(0.5, 0.70, 0.3), (0.75, 0.80, 0.6), (0.9, 0.75, 0.8)]):
        cfg = load_config(SMOKE, [f"mask.ratio={ratio}"])
        ckpt = save_checkpoint(folder / f"train-t{i}" / "checkpoint-0002",
                               {"model": build_model(cfg).state_dict(), "config": to_dict(cfg), "epoch": 2})
        row = {f.name: None for f in sweep_tables.trials_schema()}
        row.update({"trial_id": f"t{i}", "status": "TERMINATED", "objective": "probe_top1", "probe_top1": top1,
                    "final_train_loss": loss, "checkpoint_path": str(ckpt), "mask.ratio": ratio,
                    "sweep.mode": "max", "params": json.dumps({"mask.ratio": ratio})})
        rows.append(row)
    rows.append({**rows[0], "trial_id": "t9", "status": "ERROR", "probe_top1": None})
    pq.write_table(pa.Table.from_pylist(rows, schema=sweep_tables.trials_schema()), folder / "trials.parquet")
    return folder


def _args(*argv: str):
    return reuse.build_parser(reuse.PROBE, "").parse_args(list(argv))


def test_the_best_k_trials_are_chosen_by_the_objective(sweep_folder):
    out, targets = reuse.choose(_args("--sweep", str(sweep_folder), "--top-k", "2"))
    assert out == sweep_folder.resolve()
    assert [(t.trial_id, t.selected_rank, t.selected_value) for t in targets] == [("t1", 1, 0.80), ("t2", 2, 0.75)]
    assert all(t.selected_by == "probe_top1" for t in targets)
    assert targets[0].cfg.mask.ratio == 0.75  # each trial runs under its own config
    _, (lowest,) = reuse.choose(_args("--sweep", str(sweep_folder), "--metric", "final_train_loss"))
    assert lowest.trial_id == "t0"  # a loss is chosen lowest first


@pytest.mark.parametrize("argv, message", [
    (["--metric", "no_such_column"], "no_such_column"),
    (["--top-k", "0"], "--top-k"),
    (["--set", "sweep.cpus_per_worker=0"], "sweep.cpus_per_worker must be positive"),
])
def test_bad_selection_is_refused_with_exit_status_2(sweep_folder, capsys, argv, message):
    assert reuse.main(reuse.PROBE, ["--sweep", str(sweep_folder), *argv], "") == 2  # before Ray starts
    assert message in capsys.readouterr().err


def test_experiment_sections_and_overrides_replace_the_trials_own(sweep_folder, tmp_path, caplog):
    experiment = tmp_path / "reuse.yaml"
    experiment.write_text("model: {name: mae_vit_tiny_patch4}\nmask: {ratio: 0.1}\nsweep: {gpus_per_worker: 1}\n"
                          "probe: {epochs: 7, optimizer: sgd}\nfinetune: {epochs: 3, layer_decay: 0.65}\n")
    with caplog.at_level("WARNING", logger="ray_jobs.reuse"):
        _, targets = reuse.choose(_args("--sweep", str(sweep_folder), "--experiment", str(experiment),
                                        "--set", "finetune.epochs=4", "--top-k", "3"))
    assert len(targets) == 3
    # said (not silently dropped), and once, not once per chosen trial
    assert caplog.text.count("its mask, model, sweep section(s) are not used") == 1
    assert targets[0].cfg.sweep.gpus_per_worker == 0.0  # workers sized as the trial's pretraining was
    cfg = targets[0].cfg
    assert cfg.probe.epochs == 7 and cfg.probe.optimizer == "sgd" and cfg.finetune.layer_decay == 0.65
    assert cfg.finetune.epochs == 4  # --set wins over the file
    assert cfg.model.name == "mae_vit_micro_patch4" and cfg.mask.ratio == 0.75  # the trial's model stays
    assert cfg.data.train_subset is None  # data comes from the file (which leaves it at the default)


def test_a_foreign_checkpoint_takes_the_whole_experiment(tmp_path):
    ref = tmp_path / "mae_pretrain_vit_micro.pth"
    torch.save({"model": build_model(load_config(SMOKE)).encoder_state_dict()}, ref)
    with pytest.raises(ConfigError, match="--experiment"):
        reuse.choose(_args("--checkpoint", str(ref)))
    out, (target,) = reuse.choose(_args("--checkpoint", str(ref), "--experiment", SMOKE, "--out", str(tmp_path / "o")))
    assert target.trial_id is None and target.label.startswith("mae_pretrain_vit_micro-")
    namesake = tmp_path / "elsewhere" / ref.name  # another folder, the same file name: another Train run
    assert reuse.Target(str(namesake), target.cfg).label != target.label
    assert target.cfg.name == "smoke" and out == (tmp_path / "o").resolve()


def test_rows_append_to_the_table_with_its_schema(sweep_folder, tmp_path):
    _, (target,) = reuse.choose(_args("--sweep", str(sweep_folder)))
    metrics = {"top1": 0.5, "best_top1": 0.6, "final_train_loss": 1.2, "epochs_completed": 2, "seconds": 3.0,
               "world_size": 1, "history": "[]", "images_per_sec": 99.0, "checkpoint_path": "/x"}
    table = reuse.RunTable(reuse.FINETUNE, tmp_path)
    table.add(reuse.make_row(reuse.FINETUNE, target, "run1", "git:abc", metrics, None, False))
    again = reuse.RunTable(reuse.FINETUNE, tmp_path)  # a later run keeps the earlier rows
    again.add(reuse.make_row(reuse.FINETUNE, target, "run2", "git:abc", None, "boom", True))
    written = pq.read_table(tmp_path / mae_results.FINETUNE_FILE)
    assert written.schema.equals(mae_results.finetune_schema())
    first, second = written.to_pylist()
    assert (first["run_id"], first["status"], first["init"], first["top1"]) == ("run1", "FINISHED", "pretrained", 0.5)
    assert first["finetune.epochs"] == target.cfg.finetune.epochs and first["model.name"] == "mae_vit_micro_patch4"
    assert first["images_per_sec"] == 99.0 and first["checkpoint_path"] == "/x" and first["trial_id"] == "t1"
    assert (second["status"], second["error"], second["init"], second["top1"]) == ("ERROR", "boom", "scratch", None)
    assert not list(tmp_path.glob(".*tmp*")), "a temporary file was left behind"


def test_an_unreadable_table_is_refused_and_left_as_it_is(sweep_folder, tmp_path, capsys):
    garbage = b"PAR1 this is not a parquet file PAR1"
    (tmp_path / mae_results.FINETUNE_FILE).write_bytes(garbage)
    with pytest.raises(sweep_tables.UnreadableTableError, match="move it aside"):
        reuse.RunTable(reuse.FINETUNE, tmp_path)  # this run's rows alone would replace every earlier one
    (tmp_path / mae_results.PROBE_FILE).write_bytes(garbage)
    assert reuse.main(reuse.PROBE, ["--sweep", str(sweep_folder), "--out", str(tmp_path)], "") == 2  # before Ray
    assert str(tmp_path / mae_results.PROBE_FILE) in capsys.readouterr().err
    assert (tmp_path / mae_results.FINETUNE_FILE).read_bytes() == garbage
    assert (tmp_path / mae_results.PROBE_FILE).read_bytes() == garbage


def test_a_sweep_whose_trials_table_is_unreadable_is_named(tmp_path, capsys):
    # the analysis API and the jobs' trial selection read trials.parquet through mae.results
    (tmp_path / mae_results.TRIALS_FILE).write_bytes(b"PAR1 not parquet PAR1")
    with pytest.raises(mae_results.UnreadableTableError, match="trials.parquet .*move it aside"):
        mae_results.load_sweep(tmp_path)
    assert reuse.main(reuse.PROBE, ["--sweep", str(tmp_path)], "") == 2  # one line, before Ray starts
    assert "trials.parquet" in capsys.readouterr().err


@pytest.mark.slow
def test_the_saved_probe_head_predicts_as_the_trained_one(tmp_path, fashion_mnist_dir):
    cfg = load_config(SMOKE, ["probe.train_subset=128", "probe.test_subset=100"])
    encoder = build_model(cfg)
    result = linear_probe(encoder, cfg, device="cpu", progress=False)
    assert result.test_images == 100
    folder = save_probe_head(tmp_path / "probe_head", result.head, cfg, "encoder.pt")  # what the job's worker does
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert saved["source"] == "encoder.pt" and saved["config"]["probe"] == to_dict(cfg)["probe"]
    head, _ = load_probe_head(folder)
    test = build_dataset(cfg, "test", augment=False)
    imgs = torch.stack([test[i][0] for i in range(32)])  # (32, C, H, W)
    with torch.no_grad():
        feats = encoder.forward_features(imgs, pool=cfg.probe.pool)  # (32, D)
        assert torch.equal(head(feats), result.head(feats))
    assert result.head.bn.running_var.ne(1).any()  # the statistics of training features, not BatchNorm's init


def test_a_resumed_run_keeps_what_it_finished_and_replaces_its_error_rows(sweep_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--sweep", str(sweep_folder), "--top-k", "2", "--out", str(out)]
    assert reuse.main(reuse.PROBE, [*argv, "--resume", "20261129T000000Z-abcdef"], "") == 2  # before Ray
    assert "no probe run of that id" in capsys.readouterr().err
    _, (first, second) = reuse.choose(_args(*argv))
    table = reuse.RunTable(reuse.PROBE, out)
    table.add(reuse.make_row(reuse.PROBE, first, "r1", "git:abc", {"top1": 0.5}, None, False))
    table.add(reuse.make_row(reuse.PROBE, second, "r1", "git:abc", None, "killed", False))
    table.add(reuse.make_row(reuse.PROBE, second, "r0", "git:abc", {"top1": 0.4}, None, False))
    assert reuse.finished_in(table, reuse.PROBE, "r1", [first, second], False) == [first]
    assert reuse.finished_in(table, reuse.PROBE, "r0", [first, second], False) == [second]
    assert reuse.finished_in(table, reuse.FINETUNE, "r1", [first, second], False) == []  # rows without init

    table.add(reuse.make_row(reuse.PROBE, second, "r1", "git:abc", {"top1": 0.6}, None, False))
    rows = reuse.RunTable(reuse.PROBE, out).rows  # as written
    assert [(r["run_id"], r["trial_id"], r["status"]) for r in rows] == [
        ("r1", first.trial_id, "FINISHED"), ("r0", second.trial_id, "FINISHED"), ("r1", second.trial_id, "FINISHED")]
    assert rows[-1]["error"] is None and rows[-1]["top1"] == 0.6  # the retried encoder's ERROR row is replaced

    import ray

    assert reuse.main(reuse.PROBE, [*argv, "--resume", "r1"], "") == 0  # nothing left to run: no Ray started
    assert not ray.is_initialized()
    printed = capsys.readouterr().out
    assert "probe run r1: 2 encoder(s), 0 failed" in printed


def test_an_interrupted_job_says_how_to_continue(sweep_folder, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(reuse, "run_all", interrupted)
    assert reuse.main(reuse.PROBE, ["--sweep", str(sweep_folder), "--out", str(tmp_path)], "") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume 20" in err  # the run id: UTC time + suffix


def test_a_resume_that_would_choose_or_run_otherwise_is_refused_before_ray(sweep_folder, tmp_path, capsys,
                                                                         monkeypatch):
    started = []

    def run_all(job, targets, table, folder, run_id, *rest):
        started.append((run_id, [t.label for t in targets], targets[0].cfg))
        return 0

    monkeypatch.setattr(reuse, "run_all", run_all)
    argv = ["--sweep", str(sweep_folder), "--top-k", "2", "--out", str(tmp_path), "--set", "probe.epochs=3"]
    assert reuse.main(reuse.PROBE, argv, "") == 0
    (run_id, labels, _), = started
    record = json.loads(reuse.record_path(reuse.PROBE, tmp_path, run_id).read_text())
    assert record["argv"] == argv and [t["label"] for t in record["targets"]] == labels == ["t1", "t2"]
    capsys.readouterr()

    for changed, why in [(["--top-k", "1"], "other encoders (the run's: t1, t2; now: t1)"),
                         (["--metric", "final_train_loss"], "other encoders (the run's: t1, t2; now: t0, t1)"),
                         (["--set", "probe.epochs=4"], "t1 would run with other settings (probe.epochs: 3 -> 4)")]:
        assert reuse.main(reuse.PROBE, [*argv, *changed, "--resume", run_id], "") == 2
        err = capsys.readouterr().err
        assert why in err and "--top-k 2" in err and "probe.epochs=3" in err  # the run's own arguments
    assert len(started) == 1  # none of them ran
    _, targets = reuse.choose(_args(*argv))
    assert reuse.resume_mismatch(record, reuse.PROBE, targets[::-1], 1, False) is None  # tied trials may swap
    assert reuse.resume_mismatch(record, reuse.PROBE, targets, 1, True) == "--from-scratch was not given in the run"

    # how it runs may change: more loader workers
    assert reuse.main(reuse.PROBE, [*argv, "--set", "data.num_workers=1", "--resume", run_id], "") == 0
    assert started[-1][:2] == (run_id, ["t1", "t2"]) and started[-1][2].data.num_workers == 1


@pytest.mark.parametrize("job, extra", [(reuse.PROBE, []), (reuse.FINETUNE, ["--from-scratch"])])
def test_a_resume_continues_its_own_encoders_when_the_sweeps_ranking_moved(sweep_folder, tmp_path, capsys,
                                                                          monkeypatch, caplog, job, extra):
    # a job on a sweep still under way: a trial that finishes later may rank above the run's own
    started = []
    monkeypatch.setattr(reuse, "run_all", lambda job, targets, *rest: started.append(targets) or 0)

    def run(*argv: str) -> int:  # as finetune.py calls main: with its own flags parsed (and recorded)
        parser = reuse.build_parser(job, "")
        parser.add_argument("--from-scratch", action="store_true")
        args = parser.parse_args(list(argv))
        return reuse.main(job, list(argv), "", from_scratch=args.from_scratch, args=args)

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    trials = pq.read_table(sweep_folder / "trials.parquet")
    pq.write_table(trials, sweep / "trials.parquet")
    argv = ["--sweep", str(sweep), "--top-k", "2", "--out", str(tmp_path / "out"), *extra]
    assert run(*argv) == 0
    run_id = json.loads(next((tmp_path / "out" / f"{job.kind}-runs").glob("*.json")).read_text())["run_id"]
    rows = trials.to_pylist()
    rows[0]["probe_top1"] = 0.9  # t0 is now the best
    pq.write_table(pa.Table.from_pylist(rows, schema=trials.schema), sweep / "trials.parquet")
    with caplog.at_level(logging.WARNING, logger="ray_jobs.reuse"):
        assert run(*argv, "--resume", run_id) == 0
    assert [(t.trial_id, t.selected_rank, t.selected_value) for t in started[-1]] == [("t1", 1, 0.80), ("t2", 2, 0.75)]
    assert "now t0, t1; the run chose t1, t2" in caplog.text
    # another choice asked for is still refused, naming the run's arguments
    assert run(*argv, "--top-k", "3", "--resume", run_id) == 2
    assert "other encoders" in capsys.readouterr().err and len(started) == 2


def test_two_jobs_adding_rows_to_one_table_keep_each_others(tmp_path):
    # a fine-tune and its --from-scratch baseline, or two probe recipes, submitted at once:
    # each job's table was read at its start and written back whole, losing the other's rows
    first, second = reuse.RunTable(reuse.PROBE, tmp_path), reuse.RunTable(reuse.PROBE, tmp_path)
    for table, run_id in ((first, "run-a"), (second, "run-b"), (first, "run-a2")):
        table.add({"run_id": run_id, "trial_id": "t0", "source_checkpoint": "/ckpt", "status": "FINISHED"})
    rows = pq.read_table(tmp_path / mae_results.PROBE_FILE).to_pylist()
    assert sorted(r["run_id"] for r in rows) == ["run-a", "run-a2", "run-b"]
    first.add({"run_id": "run-b", "trial_id": "t0", "source_checkpoint": "/ckpt", "status": "ERROR"})  # replaces
    rows = pq.read_table(tmp_path / mae_results.PROBE_FILE).to_pylist()
    assert sorted((r["run_id"], r["status"]) for r in rows) == [
        ("run-a", "FINISHED"), ("run-a2", "FINISHED"), ("run-b", "ERROR")]


def test_a_text_metric_is_refused_and_rows_name_their_sweep_wherever_they_go(sweep_folder, tmp_path):
    with pytest.raises(ConfigError, match="--metric status: .*is not numeric"):
        reuse.choose(_args("--sweep", str(sweep_folder), "--metric", "status"))
    out, targets = reuse.choose(_args("--sweep", str(sweep_folder), "--out", str(tmp_path / "elsewhere")))
    row = reuse.make_row(reuse.PROBE, targets[0], "r1", "git:abc", {"top1": 0.5}, None, False)
    assert out == (tmp_path / "elsewhere").resolve() and row["sweep"] == sweep_folder.name


def test_a_row_waits_while_another_job_holds_the_table(tmp_path):
    import threading
    import time

    table = reuse.RunTable(reuse.PROBE, tmp_path)
    row = {"run_id": "run-b", "trial_id": "t0", "source_checkpoint": "/ckpt", "status": "FINISHED"}
    with sweep_tables.locked(table.path):  # another job is between its read and its write
        adding = threading.Thread(target=table.add, args=(row,))
        adding.start()
        time.sleep(0.5)
        assert adding.is_alive() and not table.path.exists()  # it waits for the lock
    adding.join(timeout=30)
    assert [r["run_id"] for r in pq.read_table(table.path).to_pylist()] == ["run-b"]
