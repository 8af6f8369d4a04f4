"""Files written so that a reader, or a crash, never sees half of one: write beside, flush, rename.

Checkpoints (mae.checkpoint), summary.json, the Ray jobs' tables and records, and the
benchmarks' JSON are all written this way. What is written in several steps (a checkpoint
folder, a pre-decoded store) is removed by its writer's cleanup when interrupted, and
`cleanup_on_termination` makes SIGTERM and SIGHUP interrupt as Ctrl-C does.
"""

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (best effort: some file systems refuse folders)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(text: str, path: Path) -> None:
    """Write a local text file to a temporary name beside `path`, then rename it into place."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def replaced_atomically(target: Path) -> Iterator[Path]:
    """A temporary path beside target to write; renamed onto target when the block ends without error.

    The new file is flushed to disk before the rename, and the rename after it, so a power
    cut leaves the old file or the new one, not an empty file in the old one's place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a scheduler's time limit) and SIGHUP (a closed terminal) end the
    block as Ctrl-C does, by an exception (SystemExit, status 128 + the signal's number) that
    runs the cleanup of half-written files. Python's default is to die at once, leaving a
    partial checkpoint folder or store behind. A signal the process ignores (`nohup`) stays
    ignored; the old handlers come back when the block ends. Only the main thread can set them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for sig in old:  # once: a second signal (a closed terminal often sends two) must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        try:  # not print(): the handler may run inside a print, and a closed terminal fails writes
            os.write(2, f"stopped by {signal.Signals(signum).name}\n".encode())
        except OSError:
            pass
        raise SystemExit(128 + signum)

    old = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
