import argparse
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from mae.checkpoint import (
    CheckpointError, checkpoint_folders, latest_checkpoint, load_checkpoint, prune_checkpoints,
    save_checkpoint, save_epoch_checkpoint,
)
from mae.config import load_config
from mae.engine import (
    NonFiniteLossError, PretrainCallback, TrainStep, build_model, build_optimizer, load_model, pretrain,
    summarize_history,
)
from mae.optim import cosine_lr, param_groups
from tests.conftest import REPO

SMOKE = REPO / "experiments" / "smoke.yaml"


def smoke_cfg(fashion_mnist_dir, *extra):
    return load_config(SMOKE, [f"data.data_dir={fashion_mnist_dir}", "data.train_subset=256",
                               "train.batch_size=32", "train.max_steps_per_epoch=4", *extra])


def test_history_summary_weights_throughput_by_epoch_time_and_finds_the_best_epoch():
    history = [  # a run stopped after epoch 2 and resumed on a faster machine for epoch 3
        {"epoch": 1, "train_loss": 0.9, "epoch_time_s": 10.0, "images_per_sec": 100.0},
        {"epoch": 2, "train_loss": 0.5, "epoch_time_s": 10.0, "images_per_sec": 100.0},
        {"epoch": 3, "train_loss": 0.6, "epoch_time_s": 5.0, "images_per_sec": 400.0},
    ]
    summary = summarize_history(history)
    assert summary["images_per_sec"] == pytest.approx(4000 / 25)  # images over time, not the mean of the rates (200)
    assert summary["train_time_s"] == 25.0 and summary["epochs_completed"] == 3
    assert (summary["best_epoch"], summary["best_train_loss"], summary["final_train_loss"]) == (2, 0.5, 0.6)
    assert summarize_history([]) == {}


def test_cosine_schedule_shape():
    lrs = [cosine_lr(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[100] == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_weight_decay_spares_norms_and_biases_as_the_reference_does():
    # facebookresearch/mae main_pretrain.py: timm's add_weight_decay, no skip list; the
    # (1, 1, D) tokens are decayed there. The two groups exist even with no weight decay.
    m = build_model(load_config())
    decay, no_decay = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"norm.weight", "decoder_norm.bias", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"blocks.0.attn.qkv.weight", "decoder_pred.weight", "cls_token", "mask_token"} <= decay_names
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert "pos_embed" not in no_decay_names | decay_names
    assert [len(g["params"]) for g in param_groups(m, 0.0)] == [len(decay["params"]), len(no_decay["params"])]


def test_a_checkpoint_with_other_optimizer_groups_is_refused_clearly(tmp_path, fashion_mnist_dir, monkeypatch):
    pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=1"), tmp_path)
    saved = (tmp_path / "checkpoint-0001" / "checkpoint.pt").read_bytes()

    def tokens_not_decayed(model, weight_decay):  # mae 0.1.0's groups before the tokens were decayed
        decay, no_decay = param_groups(model, weight_decay)
        tokens = [p for n, p in model.named_parameters() if n.endswith("_token")]
        decay["params"] = [p for p in decay["params"] if all(p is not t for t in tokens)]
        no_decay["params"] = no_decay["params"] + tokens
        return [decay, no_decay]

    monkeypatch.setattr("mae.engine.param_groups", tokens_not_decayed)
    with pytest.raises(CheckpointError, match="optimizer state does not fit .* start in another run folder"):
        pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=1"), tmp_path)
    assert (tmp_path / "checkpoint-0001" / "checkpoint.pt").read_bytes() == saved


def test_a_resume_with_other_settings_is_refused_and_keeps_the_runs_config(tmp_path, fashion_mnist_dir):
    """A resume continues the run in the folder: another mask ratio or epoch count would
    mix two runs into one; where the data lives and how it is loaded may change."""
    pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=1"), tmp_path)
    saved = {f: (tmp_path / f).read_bytes() for f in ("config.yaml", "checkpoint-0001/checkpoint.pt")}
    with pytest.raises(CheckpointError, match=r"mask.ratio: 0.75 -> 0.5; train.epochs: 1 -> 2\). .*set those "
                                              "values back"):
        pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=2", "mask.ratio=0.5"), tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in saved} == saved
    moved = tmp_path / "moved-data"
    moved.symlink_to(fashion_mnist_dir)
    resumed = pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=1", f"data.data_dir={moved}", "train.log_every=1",
                                 "data.num_workers=1", "train.progress=false", "name=renamed"), tmp_path)
    assert resumed.epochs == [] and load_config(tmp_path / "config.yaml").data.data_dir == str(moved)

    written = load_checkpoint(tmp_path / "checkpoint-0001")  # as 2 DDP processes would: 2 RNG states
    save_checkpoint(tmp_path / "ddp" / "checkpoint-0001", {**written, "rng": [written["rng"]] * 2})
    with pytest.raises(CheckpointError, match="written by 2 process.*this run has 1"):
        pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=1"), tmp_path / "ddp")
    # a data folder holding another number of images: epochs of another length, the schedule would jump
    save_checkpoint(tmp_path / "other-data" / "checkpoint-0001", {**written, "step": written["step"] + 1})
    with pytest.raises(CheckpointError, match="took 5 optimizer steps per epoch and this one takes 4"):
        pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=1"), tmp_path / "other-data")


@pytest.mark.parametrize("pipeline,prefetch,workers", [("cpu", 0, 0), ("cpu", 0, 1), ("device", 2, 0)])
def test_resume_gives_the_same_result(tmp_path, fashion_mnist_dir, pipeline, prefetch, workers):
    # device: the crops come from the pipeline's own generator, which the checkpoint carries.
    # cpu with a worker: from the worker's RNG, seeded per epoch (a resume cannot restore a
    # worker's state). The straight run prepares batches inline; the interrupted and resumed
    # ones with `prefetch` batches readied ahead by a thread, which must not change what is drawn.
    common = ("train.epochs=3", f"data.pipeline={pipeline}", f"data.num_workers={workers}")
    straight = pretrain(smoke_cfg(fashion_mnist_dir, *common, "data.prefetch=0"), tmp_path / "straight")

    # 1 epoch, stop, then resume the same run for the remaining 2
    cfg = smoke_cfg(fashion_mnist_dir, *common, f"data.prefetch={prefetch}")
    with pytest.raises(Interrupted):
        pretrain(cfg, tmp_path / "resumed", callback=StopAfter(1))
    assert [p.name for p in checkpoint_folders(tmp_path / "resumed")] == ["checkpoint-0001"]
    rest = pretrain(cfg, tmp_path / "resumed")
    assert [e["epoch"] for e in rest.epochs] == [2, 3]

    a = load_checkpoint(straight.checkpoint_dir)
    b = load_checkpoint(rest.checkpoint_dir)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]],
                                                                     rel=1e-6)
    # the peak lr is derived (base_lr x effective batch / 256) and saved beside the config
    assert b["derived"] == {"world_size": 1, "effective_batch_size": 32,
                            "absolute_lr": pytest.approx(cfg.optim.base_lr * 32 / 256)}
    assert rest.derived == b["derived"]


def test_logged_loss_is_the_mean_of_the_steps_since_the_last_log(tmp_path, fashion_mnist_dir, monkeypatch):
    # 4 steps an epoch, a log every 3. The step's loss is replaced by its number (1, 2, ...):
    # the log at step 3 is mean(1, 2, 3); the one at step 6 covers epoch 2's steps 5 and 6.
    real_step, calls = TrainStep.__call__, []

    def numbered(self, imgs, noise=None, update=True):
        real_step(self, imgs, noise, update)
        calls.append(1)
        return torch.tensor(float(len(calls)))

    monkeypatch.setattr(TrainStep, "__call__", numbered)
    logs = []

    class Logs(PretrainCallback):
        def on_log(self, metrics):
            logs.append(metrics)

    pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=2", "train.log_every=3"), tmp_path, callback=Logs())
    assert [(m["epoch"], m["step"], m["loss"]) for m in logs] == [(0, 3, 2.0), (1, 6, 5.5)]


class Interrupted(Exception):
    pass


class StopAfter(PretrainCallback):
    """Simulates an interruption: raises after the given epoch's checkpoint is written."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, metrics, checkpoint_dir):
        if metrics["epoch"] == self.epochs:
            raise Interrupted(metrics["epoch"])


def test_interrupted_run_keeps_its_checkpoint(tmp_path, fashion_mnist_dir):
    cfg = smoke_cfg(fashion_mnist_dir, "train.epochs=3")
    with pytest.raises(Interrupted):
        pretrain(cfg, tmp_path / "run", callback=StopAfter(2))
    assert [p.name for p in checkpoint_folders(tmp_path / "run")] == ["checkpoint-0001", "checkpoint-0002"]
    model, loaded_cfg = load_model(tmp_path / "run" / "checkpoint-0002")
    assert loaded_cfg == cfg


def test_callback_sees_every_epoch_and_loss_falls(tmp_path, fashion_mnist_dir):
    seen = []

    class Record(PretrainCallback):
        def on_epoch_end(self, metrics, checkpoint_dir):
            seen.append((metrics["epoch"], checkpoint_dir is not None, metrics["train_loss"]))

    pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=3", "train.checkpoint_every=2"), tmp_path, Record())
    assert [(e, c) for e, c, _ in seen] == [(1, False), (2, True), (3, True)]
    assert all(math.isfinite(loss) for *_, loss in seen)
    assert seen[-1][2] < 0.75 * seen[0][2], seen  # it learns: without optimizer steps the losses stay within 2%


def test_non_finite_loss_raises_clear_error(tmp_path, monkeypatch, fashion_mnist_dir):
    import mae.device_input

    real = mae.device_input.build_dataset

    def poisoned(*args, **kwargs):
        ds = real(*args, **kwargs)
        ds.transform = lambda img: torch.full(img.shape, float("nan"))
        return ds

    monkeypatch.setattr(mae.device_input, "build_dataset", poisoned)
    with pytest.raises(NonFiniteLossError, match="optim.base_lr"):
        pretrain(smoke_cfg(fashion_mnist_dir, "train.log_every=1"), tmp_path)


def test_truncated_checkpoint_fails_clearly_and_keeps_older_ones(tmp_path, fashion_mnist_dir):
    cfg = smoke_cfg(fashion_mnist_dir, "train.epochs=2")
    pretrain(cfg, tmp_path)
    newest = tmp_path / "checkpoint-0002" / "checkpoint.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(newest.parent)
    with pytest.raises(CheckpointError, match="delete it"):
        pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=3"), tmp_path)
    assert (tmp_path / "checkpoint-0001" / "checkpoint.pt").is_file()


def test_an_empty_or_damaged_checkpoint_fails_clearly(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")  # a failed download, a copy onto a full disk
    with pytest.raises(CheckpointError, match="EOFError.*delete it"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "page.pt").write_text("<!DOCTYPE html><html>Not Found</html>")  # a saved error page
    with pytest.raises(CheckpointError, match="Unsupported operand 60") as info:
        load_checkpoint(tmp_path / "page.pt")
    assert "weights_only` set to `False`" not in str(info.value)  # torch's advice to load unsafely
    folder = save_checkpoint(tmp_path / "checkpoint-0001", {"model": {"w": torch.arange(4096.0)}})
    data = bytearray((folder / "checkpoint.pt").read_bytes())
    start = data.find(torch.arange(4096.0).numpy().tobytes()[:64])  # inside the tensor's bytes
    data[start + 100 : start + 150] = bytes(50)  # bit rot: torch.load itself reads this without a word
    (folder / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its CRC-32 checksum"):
        load_checkpoint(folder)
    torch.serialization.set_crc32_options(False)  # a documented torch option: every record's CRC is 0
    try:
        torch.save({"model": {"w": torch.arange(4.0)}}, tmp_path / "no_crc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_checkpoint(tmp_path / "no_crc.pt")["model"]["w"], torch.arange(4.0))


def test_pruning_removes_what_interrupted_saves_left(tmp_path, monkeypatch):
    for epoch in (1, 2):
        save_checkpoint(tmp_path / f"checkpoint-000{epoch}", {"model": {}, "epoch": epoch})
    (tmp_path / ".checkpoint-0003.k2x9ab1c").mkdir()  # a save killed while writing
    save_checkpoint(tmp_path / ".checkpoint-0002.old", {"model": {}})  # killed before removing what it replaced
    prune_checkpoints(tmp_path, keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0001", "checkpoint-0002"]
    # two DDP ranks putting back one set-aside checkpoint: the one that comes second finds it done
    (tmp_path / "checkpoint-0002").rename(tmp_path / ".checkpoint-0002.old")
    rename = Path.rename

    def other_rank_first(self, target):
        rename(self, target)
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "rename", other_rank_first)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-0001", "checkpoint-0002"]


def test_checkpoints_past_epoch_9999_are_ordered_by_epoch(tmp_path):
    for epoch in (9998, 9999, 10000):
        save_epoch_checkpoint(tmp_path, epoch, {"model": {}, "epoch": epoch}, keep=2)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-9999", "checkpoint-10000"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["epoch"] == 10000


def test_checkpoint_with_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"holds a Python object \(.*print\) that safe loading .* not damaged"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "this must not run" not in capsys.readouterr().out


def test_a_checkpoint_set_aside_by_a_cut_short_overwrite_is_put_back(tmp_path):
    folder = save_checkpoint(tmp_path / "checkpoint-0002", {"model": {}, "epoch": 2})
    folder.rename(tmp_path / ".checkpoint-0002.old")  # as if the overwrite stopped between its renames
    assert latest_checkpoint(tmp_path) == folder and load_checkpoint(folder)["epoch"] == 2
    assert not (tmp_path / ".checkpoint-0002.old").exists()
    save_checkpoint(folder, {"model": {}, "epoch": 3})  # a whole overwrite leaves nothing aside
    assert load_checkpoint(folder)["epoch"] == 3 and [p.name for p in tmp_path.iterdir()] == ["checkpoint-0002"]


def test_a_reference_training_checkpoint_loads_with_its_arguments(tmp_path):
    # facebookresearch/mae's save_model stores its argparse.Namespace under 'args'
    args = argparse.Namespace(model="mae_vit_base_patch16", blr=1.5e-4, input_size=224)
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "args": args, "epoch": 799}, tmp_path / "ref.pth")
    payload = load_checkpoint(tmp_path / "ref.pth")
    assert payload["args"] == args and payload["epoch"] == 799


def test_checkpoint_folder_has_the_umasks_permissions_and_is_flushed(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    umask = os.umask(0o022)
    try:
        folder = save_checkpoint(tmp_path / "checkpoint-0001", {"model": {}, "config": {"name": "x"}})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # mkdtemp's 0700 would shut a team out
    assert {Path(s).name for s in synced if Path(s).parent.name.startswith(".checkpoint-0001.")} == {
        "checkpoint.pt", "config.yaml"}
    assert os.path.realpath(tmp_path) in synced  # the rename


def test_batch_larger_than_dataset_is_a_clear_error(tmp_path, fashion_mnist_dir):
    with pytest.raises(ValueError, match="train.batch_size"):
        pretrain(smoke_cfg(fashion_mnist_dir, "train.batch_size=512"), tmp_path)


def test_gradient_accumulation_matches_the_large_batch(tmp_path, fashion_mnist_dir):
    # two micro-batches of 32 accumulated == one batch of 64: same images (synthetic data has
    # no random augmentation), same masks (the noise stream is drawn in the same order), and
    # every sample masks the same number of patches, so the mean of the means is the mean
    synthetic = ["data.dataset=synthetic", "data.synthetic_size=256", "train.epochs=1",
                 "train.max_steps_per_epoch=2"]
    big = smoke_cfg(fashion_mnist_dir, *synthetic, "train.batch_size=64")
    small = smoke_cfg(fashion_mnist_dir, *synthetic, "train.batch_size=32", "train.accum_iter=2")
    a = load_checkpoint(pretrain(big, tmp_path / "big").checkpoint_dir)
    b = load_checkpoint(pretrain(small, tmp_path / "small").checkpoint_dir)
    assert a["step"] == b["step"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_compiled_step_follows_the_eager_loss_curve(fashion_mnist_dir):
    """train.compile is the engine's fast path: the same weights, batches and masks must give
    the eager loss curve (float32 on CPU, so to rounding), updates included."""
    torch.manual_seed(0)
    curves = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = smoke_cfg(fashion_mnist_dir, f"train.compile={str(compiled).lower()}")
        torch.manual_seed(0)
        model = build_model(cfg)
        step = TrainStep(model, build_optimizer(model, cfg, 1e-3), cfg, torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        curves[compiled] = torch.stack([
            step(torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, model.num_patches, generator=g))
            for _ in range(4)
        ])
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # the flag reaches torch.compile
    assert curves[False][-1] < curves[False][0]  # it trains
    torch.testing.assert_close(curves[True], curves[False], rtol=1e-4, atol=0)


def test_epochs_report_the_time_spent_waiting_for_input(tmp_path, monkeypatch, fashion_mnist_dir):
    """A to_batch slowed by 0.1 s a batch adds 4 x 0.1 s of waiting to each 4-step epoch."""
    import time

    import mae.engine

    real = mae.engine.build_pretrain_input

    def slowed(*args, **kwargs):
        dataset, collate, to_batch = real(*args, **kwargs)

        def slow_to_batch(batch):
            time.sleep(0.1)
            return to_batch(batch)

        return dataset, collate, slow_to_batch

    cfg = smoke_cfg(fashion_mnist_dir, "train.epochs=1", "train.progress=false")
    fast = pretrain(cfg, tmp_path / "fast").epochs[0]
    monkeypatch.setattr(mae.engine, "build_pretrain_input", slowed)
    slow = pretrain(cfg, tmp_path / "slow").epochs[0]
    waited = {name: e["input_wait_frac"] * e["epoch_time_s"] for name, e in (("fast", fast), ("slow", slow))}
    assert 0 <= fast["input_wait_frac"] < slow["input_wait_frac"] <= 1
    # sleeping guarantees the 0.4 s (less the fast run's own wait); how much more depends on this machine's load
    # and is not asserted here: the clock arithmetic is checked exactly below
    assert 0.35 <= waited["slow"] - waited["fast"] <= slow["epoch_time_s"]


def test_input_wait_counts_time_blocked_in_next_and_not_the_callers_own(monkeypatch):
    import mae.engine
    from mae.engine import InputWait

    clock = [0.0]
    monkeypatch.setattr(mae.engine.time, "perf_counter", lambda: clock[0])

    def batches():
        for i in range(3):
            clock[0] += 0.25  # the loader takes 0.25 s for each batch
            yield i

    wait = InputWait(batches())
    for _ in wait:
        clock[0] += 1.0  # the step: time between next() calls is not waiting
    assert wait.seconds == 0.75


@pytest.mark.parametrize("pipeline,workers,expected", [("cpu", 0, 0), ("cpu", 1, 2), ("device", 0, 2)])
def test_crops_drawn_in_this_process_are_not_prefetched_on_a_thread(tmp_path, fashion_mnist_dir, monkeypatch,
                                                                    pipeline, workers, expected):
    """The cpu pipeline without workers crops in the loader, from torch's global RNG: on a prefetch
    thread it would interleave with the masks the step draws from it. The device pipeline draws
    from its own generator, in batch order, so it keeps the thread."""
    import mae.engine

    depths = []
    real = mae.engine.Prefetcher
    monkeypatch.setattr(mae.engine, "Prefetcher", lambda batches, to_batch, device, depth:
                        depths.append(depth) or real(batches, to_batch, device, depth))
    pretrain(smoke_cfg(fashion_mnist_dir, "train.epochs=1", "data.prefetch=2", f"data.pipeline={pipeline}",
                       f"data.num_workers={workers}", "mask.strategy=block"), tmp_path)
    assert depths == [expected]
