"""ray_jobs.scratch: a Train worker's scratch folder goes when the worker does, however it ends."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ray_jobs is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from ray_jobs.scratch import LOCK, SETUP_S, remove_abandoned, worker_scratch  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock: POSIX, as Ray Train workers are")

# A worker process: takes a scratch folder, writes a "checkpoint" into it, says so, then waits to be killed.
_WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from ray_jobs.scratch import worker_scratch
    with worker_scratch("pretrain-rank0", sys.argv[1]) as folder:
        (folder / "checkpoint-0001").mkdir()
        (folder / "checkpoint-0001" / "checkpoint.pt").write_bytes(b"x" * 1000)
        print(folder, flush=True)
        time.sleep(600)
""")


def _start_worker(root: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(REPO)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_a_folder_is_removed_when_its_block_ends_even_by_an_error(tmp_path):
    with pytest.raises(RuntimeError):
        with worker_scratch("probe-rank1", tmp_path) as folder:
            assert folder.parent == tmp_path and folder.name.startswith("mae-worker-probe-rank1-")
            assert (folder / LOCK).is_file()
            (folder / "x").write_text("x")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_a_killed_workers_folder_is_removed_by_the_next_worker_and_a_live_ones_is_kept(tmp_path):
    killed, killed_folder = _start_worker(tmp_path)
    alive, alive_folder = _start_worker(tmp_path)
    try:
        killed.kill()  # SIGKILL: no cleanup runs, as when Ray stops a worker
        killed.wait(timeout=30)
        assert (killed_folder / "checkpoint-0001" / "checkpoint.pt").exists()
        setting_up = tmp_path / "mae-worker-finetune-rank0-abcdefgh"  # mkdtemp'd, its lock not yet in place
        setting_up.mkdir()
        with worker_scratch("pretrain-rank0", tmp_path) as mine:
            assert not killed_folder.exists()
            assert (alive_folder / "checkpoint-0001" / "checkpoint.pt").exists()
            assert setting_up.exists() and mine.exists()
        assert remove_abandoned(tmp_path) == []  # nothing else is abandoned
    finally:
        alive.kill()
        alive.wait(timeout=30)
    assert remove_abandoned(tmp_path) == [alive_folder]


def test_a_folder_abandoned_while_being_set_up_goes_once_old(tmp_path):
    """Killed between mkdtemp and its lock's rename (or while removing its folder): no final lock
    file. Such a folder is left alone while it could still be setting up, then removed."""
    fresh, stale, stale_bare = (tmp_path / f"mae-worker-pretrain-rank0-{x}" for x in ("fresh", "stale", "bare"))
    for folder in (fresh, stale, stale_bare):
        folder.mkdir()
    for folder in (fresh, stale):
        (folder / f"{LOCK}.new").write_text("")
    old = time.time() - SETUP_S - 5
    for folder in (stale, stale_bare):
        os.utime(folder, (old, old))
    assert sorted(remove_abandoned(tmp_path)) == sorted([stale, stale_bare])
    assert fresh.exists()
