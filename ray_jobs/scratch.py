"""A Train worker's scratch folder on its node, removed even when Ray kills the worker.

The engine writes its checkpoints into the worker's run folder before Ray stores them.
Ray stops a worker by killing its process (an early-stopped trial, a failure, an
interrupted sweep), so no `finally` runs and a `tempfile.TemporaryDirectory` stays in
/tmp, with whatever was being saved at that moment (1.3 GB at ViT-B). Each folder here
holds a lock file that its worker keeps locked while it lives; the kernel drops the lock
when the process dies, however it dies. Every worker that starts on the node first removes
the folders whose lock it can take: their workers are gone.
"""

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "mae-worker-"
LOCK = ".owner.lock"
SETUP_S = 60.0  # a folder without its lock this long after its last change was abandoned being set up


@contextlib.contextmanager
def worker_scratch(name: str, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A new folder `<root>/mae-worker-<name>-XXXXXXXX` (root: the temporary folder), locked for as
    long as this process is in the block, and removed when it leaves it. Removes first the
    folders that killed workers left in root."""
    import fcntl  # POSIX only, as Ray Train's workers are: imported here, so the module imports anywhere

    root = Path(root or tempfile.gettempdir())
    remove_abandoned(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{name}-", dir=root))
    fd = os.open(folder / f"{LOCK}.new", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(folder / f"{LOCK}.new", folder / LOCK)  # under its final name only once locked
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # before the lock goes, so no one else removes it meanwhile
        os.close(fd)


def remove_abandoned(root: Path, setup_s: float = SETUP_S) -> list[Path]:
    """Remove root's worker folders whose owner is dead (their lock can be taken); the removed ones.

    A folder with no lock file under its final name is being set up, or was abandoned while
    being set up (or while being removed): it goes once it is `setup_s` old and no process
    holds its lock. A folder whose owner removed it meanwhile (a normal end) is not counted."""
    import fcntl

    removed = []
    for folder in sorted(root.glob(f"{PREFIX}*")):
        lock, set_up = folder / LOCK, (folder / LOCK).exists()
        if not set_up:
            try:
                if time.time() - folder.stat().st_mtime < setup_s:
                    continue
            except OSError:  # just removed
                continue
            lock = folder / f"{LOCK}.new"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            if set_up:  # its owner removed it as it ended
                continue
            fd = None  # abandoned before its lock file was made: nothing to wait for
        except OSError:  # not ours to open (another user's)
            continue
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not lock.exists():  # its owner removed the folder as it ended, then let go
                    continue
        except OSError:  # its worker is alive
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            if fd is not None:
                os.close(fd)
    if removed:
        log.warning("removed %d scratch folder(s) left in %s by killed Train workers: %s", len(removed), root,
                    ", ".join(p.name for p in removed))
    return removed
