"""The README's set-up (`make setup`): what it says when the disk cannot hold a new venv."""

import os
import platform
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif((platform.system(), platform.machine()) != ("Linux", "x86_64"),
                    reason="the check is for Linux x86_64, where pip takes torch's CUDA build")
def test_setup_says_how_much_disk_a_new_venv_needs(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "df").write_text(  # a disk with 2 GB free
        "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        "echo '/dev/vda 264000000 261000000 2097152 99% /'\n")
    (fake_bin / "df").chmod(0o755)
    venv = tmp_path / "venv"
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    # PYTHON=false: were the check to let set-up go on, it would stop at once, not build a venv
    proc = subprocess.run(["make", "-C", str(REPO), f"VENV={venv}", "PYTHON=false", f"{venv}/.installed"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "needs about 7 GB free" in proc.stdout and "only 2 GB" in proc.stdout, proc.stdout + proc.stderr
    assert not venv.exists()  # stopped before creating anything
