"""Checkpoints: written atomically, read with torch.load(weights_only=True).

A checkpoint is a folder `checkpoint-EEEE/` holding `checkpoint.pt` (model in the
reference MAE parameter names, optimizer, epoch, step, RNG states, resolved config) and
`config.yaml` (the same config, for humans). Folders are built under a temporary name and
renamed into place, so a crash never leaves a half-written checkpoint behind.
"""

import argparse
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mae.config import ExperimentConfig, recipe_changes
from mae.files import fsync_path

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or not an MAE checkpoint."""


class ResumeRefusedError(CheckpointError):
    """A checkpoint, readable, that this run may not continue: it was written by a run with other
    settings, another number of processes or another epoch length."""


def rng_state() -> dict[str, Any]:
    """Every RNG the engine draws from, in types that weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(folder: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write payload to folder/checkpoint.pt (+ config.yaml) atomically; return the folder.

    The files are written into a temporary folder, flushed to disk, and the folder renamed
    into place: a crash leaves the old checkpoint or the new one, never a partial one (nor,
    after a power cut, an empty one). The folder gets the permissions of any new folder
    (the umask's), not mkdtemp's owner-only 0700, so a team's shared storage can read it.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        torch.save(payload, tmp / CHECKPOINT_FILE)
        if "config" in payload:
            (tmp / "config.yaml").write_text(yaml.safe_dump(payload["config"], sort_keys=False))
        for written in tmp.iterdir():
            fsync_path(written)
        fsync_path(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
        fsync_path(folder.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoint_file(path: str | os.PathLike) -> Path:
    """Accept a checkpoint folder or a .pt/.pth file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a checkpoint folder or a .pt/.pth file")
    return path


DAMAGED_ADVICE = "delete it to resume from the previous checkpoint, or re-download it."


def _check_crcs(file: Path) -> None:
    """torch.save's zip format stores a CRC-32 per record, which torch.load never checks: a
    checkpoint with damaged bytes (a bad copy, a failing disk) would load wrong weights
    silently. Reads the file once more (about 0.6 s per GiB here). Legacy (non-zip) files have
    no checksums; a record stored with CRC 0 is not checked (torch.serialization's
    set_crc32_options(False) writes 0 for every record, and an empty record's CRC is 0)."""
    if not zipfile.is_zipfile(file):
        return
    try:
        with zipfile.ZipFile(file) as archive:
            for record in archive.infolist():
                if record.CRC == 0:
                    continue
                try:
                    with archive.open(record) as data:  # zipfile compares the CRC-32 at the record's end
                        while data.read(1 << 24):
                            pass
                except zipfile.BadZipFile as e:
                    if "CRC" not in str(e):
                        raise
                    raise CheckpointError(f"checkpoint {file} is damaged: its record {record.filename} fails its "
                                          f"CRC-32 checksum; {DAMAGED_ADVICE}") from e
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"cannot read checkpoint {file}: {type(e).__name__}: {e}; {DAMAGED_ADVICE}") from e


def _reason(e: Exception) -> str:
    """The line of torch.load's error that says what is wrong: its weights-only loader puts
    the cause after advice to load unsafely, which is not what a damaged file needs."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else "(no message; an empty file?)"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load safely (no code runs): tensors, numbers, strings and containers only, and the
    argparse.Namespace of its arguments that the reference MAE training saves with its
    checkpoints (facebookresearch/mae util/misc.py save_model: 'args'), a plain record."""
    file = checkpoint_file(path)
    _check_crcs(file)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, wrong format
        refused = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if refused:
            raise CheckpointError(
                f"{file} holds a Python object ({refused.group(1)}) that safe loading (torch.load with "
                "weights_only=True) does not build, since building it could run code; it was not loaded. The file "
                "is not damaged. If you trust its source, keep its weights alone and load those: "
                f"torch.save({{'model': torch.load(path, weights_only=False)['model']}}, new_path)"
            ) from e
        raise CheckpointError(
            f"cannot read checkpoint {file}: {type(e).__name__}: {_reason(e)}. "
            "It may be truncated (an interrupted copy) or not a PyTorch weights file; "
            f"{DAMAGED_ADVICE}"
        ) from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"{file} holds a {type(payload).__name__}, not a checkpoint dictionary")
    return payload


def model_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside ours ({'model': ...}), the reference's ({'model': ...}) or a bare one."""
    state = payload.get("model", payload)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint has no model state dict under 'model'")
    prefixes = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
    clean = {}
    for k, v in state.items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        clean[k] = v
    return clean


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first.

    An overwrite (save_checkpoint to an existing folder) sets the old folder aside as
    .NAME.old before the new one takes its place; if it was cut short between the two
    renames, the old folder is put back here.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    for old in run_dir.glob(".checkpoint-[0-9]*.old"):
        folder = old.with_name(old.name[1:].removesuffix(".old"))
        if not folder.exists() and (old / CHECKPOINT_FILE).is_file():
            log.warning("%s: an overwrite was cut short; putting back the checkpoint it had set aside", folder)
            try:
                old.rename(folder)
            except OSError:  # another DDP rank listing the same run folder put it back first
                if not (folder / CHECKPOINT_FILE).is_file():
                    raise
    epochs = {p: int(m[1]) for p in run_dir.glob("checkpoint-[0-9]*")
              if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / CHECKPOINT_FILE).is_file()}
    return sorted(epochs, key=epochs.get)  # by epoch, not by name: checkpoint-10000 comes after checkpoint-9999


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    folders = checkpoint_folders(run_dir)
    return folders[-1] if folders else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` checkpoints, and remove what interrupted saves left behind: a
    temporary .checkpoint-EEEE.XXXXXXXX folder (a save killed while writing, as large as a
    checkpoint) and a .checkpoint-EEEE.old beside the checkpoint that replaced it. Called by
    the one process that saves, right after its save, so no other save is under way."""
    for old in checkpoint_folders(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for left in Path(run_dir).glob(".checkpoint-[0-9]*.*"):
        if left.suffix != ".old" or (left.with_name(left.name[1:].removesuffix(".old")) / CHECKPOINT_FILE).is_file():
            log.info("removing %s, left by an interrupted checkpoint save", left)
            shutil.rmtree(left, ignore_errors=True)


def resume_source(run_dir: str | os.PathLike | None, resume_from: str | os.PathLike | None) -> Path | None:
    """The checkpoint a run resumes from: resume_from if given, else the newest in run_dir
    (None: no run folder, or nothing in it; the run starts fresh)."""
    if resume_from:
        return Path(resume_from)
    return latest_checkpoint(run_dir) if run_dir is not None else None


def checkpoint_due(epochs_done: int, every: int, total: int) -> bool:
    """Whether a run checkpoints after `epochs_done` epochs: every `every`, and after the last."""
    return epochs_done % every == 0 or epochs_done == total


def save_epoch_checkpoint(run_dir: str | os.PathLike, epochs_done: int, payload: dict[str, Any],
                          keep: int) -> Path:
    """save_checkpoint to run_dir/checkpoint-EEEE, then remove all but the newest `keep`; the folder."""
    folder = save_checkpoint(Path(run_dir) / f"checkpoint-{epochs_done:04d}", payload)
    prune_checkpoints(run_dir, keep)
    return folder


def check_kind(payload: dict[str, Any], source: Path, kind: str, what: str, writer: str) -> dict[str, Any]:
    """payload, if its "kind" is `kind` (a `what` checkpoint, written by `writer`); else CheckpointError."""
    if payload.get("kind") != kind:
        raise ResumeRefusedError(f"{source} is not a {what} checkpoint (its kind: {payload.get('kind')}); resume "
                                 f"from a checkpoint folder that {writer} wrote, or start in another run folder")
    return payload


def check_recipe(payload: dict[str, Any], source: Path, cfg: ExperimentConfig, recipe: tuple[str, ...]) -> None:
    """CheckpointError if the run that wrote payload had another recipe than cfg (mae.config.recipe_changes):
    a resume continues that run, so a changed mask ratio or epoch count would mix two runs into one."""
    changes = recipe_changes(payload.get("config") or {}, cfg, recipe)
    if changes:
        raise ResumeRefusedError(
            f"{source} was written by a run with other settings ({'; '.join(changes)}); a resume continues that "
            "run: set those values back to its own, or start in another run folder")


def check_world_size(payload: dict[str, Any], source: Path, world_size: int) -> None:
    """CheckpointError unless payload was written by `world_size` processes (one RNG state each): the
    data shards, the effective batch and so the lr follow the count, so another one is another run."""
    written = len(payload["rng"]) if isinstance(payload.get("rng"), list) else 1  # a dict: before per-rank states
    if written != world_size:
        raise ResumeRefusedError(
            f"{source} was written by {written} process(es), and this run has {world_size}; resume it with as many "
            "(--workers, sweep.workers_per_trial), or start in another run folder")


def check_epoch_length(payload: dict[str, Any], source: Path, steps_per_epoch: int) -> None:
    """CheckpointError unless payload's run took `steps_per_epoch` optimizer steps per epoch, as this one
    would: the lr schedule is laid out in steps, so another count would make it jump."""
    epoch, step = int(payload["epoch"]), int(payload["step"])
    if step != epoch * steps_per_epoch:
        raise ResumeRefusedError(
            f"{source}: its run took {step // max(1, epoch)} optimizer steps per epoch and this one takes "
            f"{steps_per_epoch}, so the training set or the batch differs (a data folder or store with another "
            "number of images?); resume over the same data, or start in another run folder")
