import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Attention

from mae.data import DATA_DIR_ENV, FASHION_MNIST_DEFAULT

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Everything the suite writes to the temporary folder goes into one of its own: pytest's tmp_path,
# the Inductor cache, and the Ray jobs the tests start (their session logs, which Ray never
# removes, and their workers' run folders) inherit TMPDIR. Removed at the end of a passing run;
# kept after a failure, for its logs. In /tmp, not under a TMPDIR given: Ray's socket paths below it
# must stay within 107 characters. Made in a hook, not on import: this module is imported again
# as `tests.conftest` by test modules, and by the Ray workers that run their functions.
_suite_tmp: str | None = None


def pytest_configure(config):
    global _suite_tmp
    _suite_tmp = tempfile.mkdtemp(prefix="mt", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ["TMPDIR"] = _suite_tmp
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_sessionfinish(session, exitstatus):
    if _suite_tmp is None:
        return
    if exitstatus == 0:
        shutil.rmtree(_suite_tmp, ignore_errors=True)
    else:
        sys.stderr.write(f"\nthe tests' temporary files (Ray's logs among them) are kept in {_suite_tmp}\n")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The real dataset; CI installs it (`apt-get install dataset-fashion-mnist`)."""
    path = Path(os.environ.get(DATA_DIR_ENV, FASHION_MNIST_DEFAULT))
    if not (path / "train-images-idx3-ubyte.gz").exists() and not (path / "train-images-idx3-ubyte").exists():
        pytest.fail(f"Fashion-MNIST not found in {path}: run `make test` (installs it) or set ${DATA_DIR_ENV}")
    return path


REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stopped_trial_row(folder: Path, epoch: int, train_loss: float = 0.9) -> dict:
    """Drive the sweep's ParquetCallback, with `folder` as the sweep folder, through a trial "t0"
    that a scheduler stops after `epoch` (its last report has no probe); its trials.parquet row."""
    import types

    import pyarrow.parquet as pq

    from mae.config import load_config
    from ray_jobs import results, sweep

    callback = sweep.ParquetCallback(str(folder), load_config(REPO / "experiments" / "smoke_sweep.yaml"), "git:abc")
    trial = types.SimpleNamespace(trial_id="t0", config={"mask.ratio": 0.5}, last_result={"epoch": epoch})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"epoch": epoch, "train_loss": train_loss})
    callback.on_trial_complete(0, [], trial)
    return pq.read_table(folder / results.TRIALS_FILE).to_pylist()[0]


@contextlib.contextmanager
def attention_dtypes():
    """The set of dtypes every timm Attention module returned while the block ran."""
    seen: set[torch.dtype] = set()

    def hook(module, args, output):
        if isinstance(module, Attention):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
