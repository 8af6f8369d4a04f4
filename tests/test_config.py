import subprocess
import sys

import pytest
import torch

from mae.config import ConfigError, absolute_lr, flatten, load_config, replace, to_dict
from tests.conftest import REPO


@pytest.mark.parametrize("override,key", [
    ("mask.ratio=1.0", "mask.ratio"),
    ("mask.ratio=0", "mask.ratio"),
    ("mask.ratio=-0.2", "mask.ratio"),
    ("model.img_size=30", "model.img_size"),
    ("model.name=mae_vit_gigantic", "model.name"),
    ("model.decoder_dpeth=2", "model.decoder_dpeth"),
    ("trian.epochs=2", "trian"),
    ("train.epochs=two", "train.epochs"),
    ("mask.strategy=checkerboard", "mask.strategy"),
    ("mask.strategy=grid", "mask.strategy"),  # the default 7 x 7 patch grid has no 2 x 2 lattice
    ("mask.strategy=grid model.img_size=32 mask.ratio=0.6", "mask.strategy"),  # s = 2 needs ratio 0.75
    ("data.dataset=cifar", "data.dataset"),
    ("train.compile_mode=fastest", "train.compile_mode"),
    ("train.precision=fp16", "train.precision"),
    ("probe.quick_test_size=0", "probe.quick_test_size"),
    ("probe.train_subset=-5", "probe.train_subset"),
    ("probe.crop_scale_min=0", "probe.crop_scale_min"),
    ("finetune.crop_scale_min=1.5", "finetune.crop_scale_min"),
    ("finetune.randaug=augmix-m5", "finetune.randaug"),  # not RandAugment
    ("finetune.randaug=rand-x9", "finetune.randaug"),  # timm asserts on an unknown section
    ("finetune.randaug=9", "finetune.randaug"),
    ("finetune.reprob=1.5", "finetune.reprob"),
    ("data.prefetch=-1", "data.prefetch"),
    ("train.compile=true train.compile_mode=reduce-overhead train.accum_iter=2", "train.compile_mode"),
    ("train.compile=true train.compile_mode=max-autotune train.accum_iter=2", "train.compile_mode"),
    ("probe.test_subset=0", "probe.test_subset"),
    ("probe.test_subset=-100", "probe.test_subset"),
    ("probe.test_subset=half", "probe.test_subset"),
    ("probe.epochs=0", "probe.epochs"),  # was an IndexError after the probe
    ("probe.batch_size=0", "probe.batch_size"),
    ("probe.base_lr=-1", "probe.base_lr"),
    ("probe.warmup_epochs=-1", "probe.warmup_epochs"),
    ("probe.quick_epochs=0", "probe.quick_epochs"),
    ("probe.quick_lr=-1", "probe.quick_lr"),
    ("data.synthetic_size=0", "data.synthetic_size"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch"),
    ("train.device=gpu", "train.device"),
    ("optim.min_lr=-1", "optim.min_lr"),
    ("optim.clip_grad=-1", "optim.clip_grad"),
    ("model.patch_size=0", "model.patch_size"),  # was a ZeroDivisionError
    ("model.decoder_num_heads=0", "model.decoder_num_heads"),  # was a ZeroDivisionError
    ("model.decoder_depth=0", "model.decoder_depth"),  # was an IndexError in the first step
    ("model.decoder_embed_dim=-8", "model.decoder_embed_dim"),
    ("model.in_chans=2", "model.in_chans"),
    ("mask.ratio=[0.5", "mask.ratio=\\[0.5"),  # not YAML: was a ParserError traceback
    ("model.name=@x", "model.name=@x"),  # was a ScannerError traceback
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override.split())


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  decoder_depth: 2\nmask:\n  ratio: 0.6\noptim:\n  base_lr: 1e-3\n")
    cfg = load_config(path, ["mask.ratio=0.5", "train.batch_size=64"])
    assert cfg.name == "exp"
    assert (cfg.model.decoder_depth, cfg.mask.ratio, cfg.optim.base_lr) == (2, 0.5, 1e-3)
    flat = flatten(cfg)
    assert flat["mask.ratio"] == 0.5 and flat["model.decoder_depth"] == 2
    assert replace(cfg, {"mask.ratio": 0.9}).mask.ratio == 0.9
    with pytest.raises(ConfigError, match="mask.ratio"):
        replace(cfg, {"mask.ratio": 1.0})


def test_a_section_with_every_entry_commented_out_takes_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  # epochs: 3\nsweep:\n  space:\n")  # both sections are null in YAML
    cfg = load_config(path, ["train.epochs=5", "sweep.space.mask.ratio=[0.5, 0.75]"])
    assert cfg.train.epochs == 5 and cfg.sweep.space == {"mask": {"ratio": [0.5, 0.75]}}


def test_command_line_values_are_checked_with_the_file_and_taken_as_given(tmp_path, capsys):
    from mae.cli import _cli_overrides, build_parser, main

    # --set is checked as the file is: a grid mask on the default 7 x 7 patches is refused, not half random
    assert main(["pretrain", "--set", "mask.strategy=grid", "--out", str(tmp_path / "run")]) == 2
    assert "mask.strategy: 'grid'" in capsys.readouterr().err and not (tmp_path / "run").exists()
    for folder in ("/data/fmnist #2", "2024", "/data/x: y", "~/data"):  # not read as a comment, number or mapping
        args = build_parser().parse_args(["pretrain", "--data-dir", folder])
        assert load_config(None, _cli_overrides(args)).data.data_dir == folder


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  nmae: mae_vit_micro_patch4\n")
    with pytest.raises(ConfigError, match=r"model\.nmae"):
        load_config(path)


def test_probe_test_subset_defaults_to_the_whole_test_split():
    assert load_config(None).probe.test_subset is None
    assert load_config(None, ["probe.test_subset=500"]).probe.test_subset == 500
    assert load_config(None, ["probe.test_subset=500", "probe.test_subset=null"]).probe.test_subset is None


def test_lr_scales_with_effective_batch():
    cfg = load_config(None, ["optim.base_lr=1.5e-4", "train.batch_size=512", "train.accum_iter=2"])
    assert absolute_lr(cfg, world_size=4) == pytest.approx(1.5e-4 * 512 * 2 * 4 / 256)
    assert absolute_lr(load_config(None, ["optim.lr=0.01"])) == 0.01


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_loads(path):
    load_config(path)


def test_cli_rejects_bad_value_before_doing_anything(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mae", "pretrain", "--config", str(REPO / "experiments/smoke.yaml"),
         "--set", "mask.ratio=1.0", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "mask.ratio" in proc.stderr and "(0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_recipe_changes_name_what_a_run_computes_from_and_skip_how_it_runs():
    from mae.config import PRETRAIN_RECIPE, PROBE_RECIPE, recipe_changes

    saved = to_dict(load_config(None, ["mask.ratio=0.75", "data.num_workers=0", "probe.base_lr=0.1"]))
    cfg = load_config(None, ["mask.ratio=0.6", "data.num_workers=4", "train.device=cpu", "probe.base_lr=0.2"])
    assert recipe_changes(saved, cfg, PRETRAIN_RECIPE) == ["mask.ratio: 0.75 -> 0.6"]
    assert recipe_changes(saved, cfg, PROBE_RECIPE) == ["probe.base_lr: 0.1 -> 0.2"]
    del saved["probe"]["base_lr"]  # a checkpoint written before the key existed
    assert recipe_changes(saved, cfg, PROBE_RECIPE) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA device")
def test_asking_for_cuda_without_one_names_the_key():
    from mae.engine import select_device

    with pytest.raises(ConfigError, match="train.device: cuda:1 was asked for.*train.device=cpu"):
        select_device("cuda:1")
    assert select_device("auto").type == "cpu"


def test_a_grid_run_saved_before_the_lattice_check_still_loads():
    from mae.config import config_from_dict

    saved = to_dict(load_config(None))
    saved["mask"]["strategy"] = "grid"  # 7 x 7 patches: no 2 x 2 lattice, refused for new runs since 2026-11-29
    assert config_from_dict(saved).mask.strategy == "grid"  # its checkpoints load
    with pytest.raises(ConfigError, match="mask.strategy: 'grid'"):
        replace(config_from_dict(saved), {"mask.ratio": 0.75})  # a new sweep point is checked
