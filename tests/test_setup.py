"""The README's set-up (`make setup`): what it says when the disk cannot hold a new venv."""

import os
import platform
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif((platform.system(), platform.machine()) != ("Linux", "x86_64"),
                                reason="the check is for Linux x86_64, where pip takes torch's CUDA build")

# A df that knows a disk with 2 GB free, and fails as df does on a folder that does not exist.
FAKE_DF = """#!/bin/sh
[ -d "$2" ] || { echo "df: $2: No such file or directory" >&2; exit 1; }
echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'
echo '/dev/vda 264000000 261000000 2097152 99% /'
"""


def _setup(tmp_path: Path, venv: Path, df: str) -> subprocess.CompletedProcess:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "df").write_text(df)
    (fake_bin / "df").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    # PYTHON=false: were the check to let set-up go on, it stops at once instead of building a venv
    return subprocess.run(["make", "-C", str(REPO), f"VENV={venv}", "PYTHON=false", f"{venv}/.installed"],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("where", ["venv", "new/folders/venv"])
def test_setup_says_how_much_disk_a_new_venv_needs(tmp_path, where):
    """Also for a venv in folders still to be made: the free space is that of the nearest existing one."""
    venv = tmp_path / where
    proc = _setup(tmp_path, venv, FAKE_DF)
    assert proc.returncode != 0
    assert "needs about 7 GB free" in proc.stdout and "only 2 GB" in proc.stdout, proc.stdout + proc.stderr
    assert not venv.exists()  # stopped before creating anything


def test_setup_goes_on_when_the_free_space_is_unknown(tmp_path):
    proc = _setup(tmp_path, tmp_path / "venv", "#!/bin/sh\nexit 1\n")
    assert "7 GB" not in proc.stdout
    assert "false -m venv" in proc.stdout  # it went on to create the venv
