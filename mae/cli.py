"""`python -m mae pretrain|probe|reconstruct|predecode ...`: the library from the command line.

    python -m mae pretrain --config experiments/fashion_mnist.yaml [--set train.epochs=5]
    python -m mae probe --checkpoint runs/fashion_mnist/checkpoint-0008 [--quick]
    python -m mae reconstruct --checkpoint runs/fashion_mnist/checkpoint-0008 --out recon.png
    python -m mae predecode --config experiments/imagenet_vit_base.yaml --data-dir /data/imagenet \
        --out /fast/imagenet-256 --workers 16
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from mae.checkpoint import CheckpointError, ResumeRefusedError, load_checkpoint
from mae.config import (
    ConfigError, ExperimentConfig, apply_overrides, config_from_dict, load_config, override_text, resolved_model_args,
    to_dict,
)
from mae.data import DATA_DIR_ENV, CorruptDatasetError, DatasetNotFoundError
from mae.files import cleanup_on_termination, write_text_atomic

log = logging.getLogger("mae")

USER_ERRORS = (ConfigError, DatasetNotFoundError, CorruptDatasetError, CheckpointError, FloatingPointError)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set mask.ratio=0.5")
    p.add_argument("--data-dir", help=f"dataset folder (else data.data_dir, ${DATA_DIR_ENV}, the default)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (overrides train.device)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mae", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an MAE, then quick-probe its encoder")
    p.add_argument("--config", help="experiment YAML (default: built-in defaults)")
    p.add_argument("--out", help="run folder (default runs/<experiment name>); resumes if it holds a checkpoint")
    p.add_argument("--no-probe", action="store_true", help="skip the quick probe at the end")
    _common(p)

    p = sub.add_parser("probe", help="linear-probe a checkpoint's frozen encoder")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or .pt file written by pretrain")
    p.add_argument("--config", help="YAML whose data/probe sections replace the checkpoint's")
    p.add_argument("--quick", action="store_true", help="the quick probe (logistic regression on cached features)")
    p.add_argument("--json", help="also write the result to this JSON file")
    _common(p)

    p = sub.add_parser("reconstruct", help="PNG grid: original | masked | reconstruction | + visible")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="reconstructions.png")
    p.add_argument("--num", type=int, default=8, help="number of test images")
    p.add_argument("--mask-ratio", type=float, help="default: the ratio the model was trained with")
    p.add_argument("--seed", type=int, default=0)
    _common(p)

    p = sub.add_parser("predecode", help="decode an ImageFolder's training images once, for data.pipeline: predecoded")
    p.add_argument("--config", help="experiment YAML: its data.data_dir, data.predecoded_dir, model.in_chans")
    p.add_argument("--out", help="store folder to create (default: data.predecoded_dir)")
    p.add_argument("--short-side", type=int, default=256,
                   help="shrink each image so its shorter side is at most this (0: keep full size; default 256)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="default: the model's input channels (model.in_chans, else its variant's)")
    p.add_argument("--workers", type=int, help="decoding processes (default: data.num_workers)")
    _common(p)
    return parser


def _cli_overrides(args: argparse.Namespace, **flags: str | None) -> list[str]:
    """--set's overrides, then the flags' values (--data-dir, --device and `flags`: {"data.key": value}),
    each taken as the string given (a folder named "a #2" or "2024" stays that folder)."""
    flags = {"data.data_dir": args.data_dir, "train.device": args.device, **flags}
    return list(args.overrides) + [override_text(k, v) for k, v in flags.items() if v]


def _with_cli_values(values: dict, args: argparse.Namespace) -> ExperimentConfig:
    return config_from_dict(apply_overrides(values, _cli_overrides(args)))


def _checkpoint_config(args: argparse.Namespace) -> tuple[ExperimentConfig, dict]:
    """The checkpoint's config with the command line's values, and the loaded checkpoint."""
    payload = load_checkpoint(args.checkpoint)
    if "config" not in payload:
        raise CheckpointError(f"{args.checkpoint} carries no config: it was not written by `mae pretrain`")
    values = payload["config"]
    if getattr(args, "config", None):
        file_values = to_dict(load_config(args.config))
        values = {**values, "data": file_values["data"], "probe": file_values["probe"]}
    return _with_cli_values(values, args), payload


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mae.engine import model_with_weights, pretrain, summarize_history
    from mae.probe import quick_probe

    cfg = load_config(args.config, _cli_overrides(args))  # checked as a whole, as the Ray jobs check theirs
    run_dir = Path(args.out or Path("runs") / cfg.name)
    log.info("pretraining %s into %s", cfg.model.name, run_dir)
    try:
        result = pretrain(cfg, run_dir)
    except ResumeRefusedError as e:  # say which flag names another folder
        raise ResumeRefusedError(f"{e} (another run folder: --out DIR; the default is runs/<experiment name>)") from e
    summary_file = run_dir / "summary.json"
    try:
        old = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    except ValueError:  # damaged: written anew below
        old = None
    if (not result.epochs and old is not None and "epochs_completed" in old
            and (args.no_probe or "probe_top1" in old)):
        # the run had finished: nothing trained, nothing to redo (a summary without the probe asked for gets
        # it, and one written before summary.json took the sweep table's names is written anew)
        log.info("%s had trained all its %d epochs already; its summary.json is as it was", run_dir, cfg.train.epochs)
        print(json.dumps(old, indent=2))
        return 0
    history = result.history  # every epoch of the run, over all its attempts
    summary = {"run_dir": str(run_dir), "checkpoint": str(result.checkpoint_dir), **summarize_history(history),
               "wall_time_s": result.wall_time_s,  # this attempt's: the one number not over the whole run
               **result.derived}
    if history:
        summary["first_train_loss"] = history[0]["train_loss"]
    if not args.no_probe and result.checkpoint_dir is not None:
        summary.update(quick_probe(model_with_weights(cfg, load_checkpoint(result.checkpoint_dir)), cfg))
    write_text_atomic(json.dumps(summary, indent=2), summary_file)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from mae.engine import model_with_weights
    from mae.probe import linear_probe, quick_probe

    cfg, payload = _checkpoint_config(args)
    model = model_with_weights(cfg, payload)
    if args.quick:
        out = quick_probe(model, cfg)
    else:
        r = linear_probe(model, cfg, progress=cfg.train.progress)
        out = {"probe_top1": r.top1, "probe_n_test": r.test_images, "probe_seconds": r.seconds, "epochs": r.epochs}
    out["checkpoint"] = str(args.checkpoint)
    text = json.dumps(out, indent=2)
    print(text)  # first: a --json path that cannot be written must not lose a finished probe's result
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0


def _writable_image(path: str) -> bool:
    """Whether PIL (which torchvision's save_image hands the grid to) can write a file of this name's suffix."""
    from PIL import Image

    Image.init()
    return Image.registered_extensions().get(Path(path).suffix.lower()) in Image.SAVE


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from mae.data import build_dataset, normalization
    from mae.engine import model_with_weights, select_device
    from mae.reconstruct import reconstruct, save_reconstruction_grid

    if args.num < 1:
        raise ConfigError(f"--num must be >= 1 (test images to show), got {args.num}")
    if not _writable_image(args.out):
        raise ConfigError(f"--out {args.out}: give a file name with an image suffix PIL can write, e.g. "
                          "reconstructions.png")
    if args.mask_ratio is not None:  # checked as mask.ratio is: in (0, 1), at least one patch visible
        args.overrides = [*args.overrides, f"mask.ratio={args.mask_ratio}"]
    cfg, payload = _checkpoint_config(args)
    device = select_device(cfg.train.device)
    model = model_with_weights(cfg, payload).to(device)
    test = build_dataset(cfg, "test", augment=False, subset=args.num)
    items = [test[i] for i in range(len(test))]
    readable = [item[0] for item in items if item is not None]  # unreadable images are logged by the dataset
    if not readable:
        raise CorruptDatasetError(f"none of the {len(items)} test images chosen could be read (each is named in "
                                  "the warnings above)")
    torch.manual_seed(args.seed)
    panels = reconstruct(model, torch.stack(readable).to(device), cfg.mask.ratio)
    path = save_reconstruction_grid({k: v.cpu() for k, v in panels.items()}, args.out, *normalization(cfg))
    print(path)
    return 0


def cmd_predecode(args: argparse.Namespace) -> int:
    from mae.data import imagefolder_root
    from mae.predecoded import write_store

    cfg = load_config(args.config, _cli_overrides(args, **{"data.dataset": "imagefolder",
                                                           "data.predecoded_dir": args.out}))
    if not cfg.data.predecoded_dir:
        raise ConfigError("predecode: give --out (or data.predecoded_dir in the config): the store folder to create")
    if args.short_side < 0:
        raise ConfigError(f"--short-side must be >= 0 (0: keep full size), got {args.short_side}")
    source = imagefolder_root(cfg, "train")
    workers = args.workers if args.workers is not None else cfg.data.num_workers
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0 (0: decode in this process), got {workers}")
    log.info("decoding %s into %s (shorter side <= %s, %d workers)", source, cfg.data.predecoded_dir,
             args.short_side or "full size", workers)
    try:
        meta = write_store(source, Path(cfg.data.predecoded_dir).expanduser(), args.short_side or None,
                           in_chans=args.channels or resolved_model_args(cfg)["in_chans"], workers=workers)
    except FileExistsError as e:
        raise ConfigError(str(e)) from e
    print(json.dumps({k: v for k, v in meta.items() if k != "classes"} | {"classes": len(meta["classes"])}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    commands = {"pretrain": cmd_pretrain, "probe": cmd_probe, "reconstruct": cmd_reconstruct,
                "predecode": cmd_predecode}
    try:
        with cleanup_on_termination():  # a killed predecode or pretrain removes what it half wrote
            return commands[args.command](args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
