"""`dvc repro` in a temporary clone of the repository, on a tiny synthetic config."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def tiny_params(src: Path) -> dict:
    p = yaml.safe_load(src.read_text())
    p["prepare"]["synthetic"].update(n_train=12, n_val=4, n_test=6, n_ood=4, workers=1)
    p["tracking"]["enabled"] = False
    return p


def clone(repo_root: Path, dest: Path) -> Path:
    """A clean clone that also carries the working tree's uncommitted files (for local runs)."""
    subprocess.run(["git", "clone", "-q", str(repo_root), str(dest)], check=True)
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=repo_root, capture_output=True,
        text=True, check=True,
    ).stdout.split()
    for rel in tracked:
        if (repo_root / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / rel, dest / rel)
    return dest


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_dvc_repro_prepare_in_fresh_clone(repo_root: Path, tmp_path: Path) -> None:
    work = clone(repo_root, tmp_path / "clone")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(work / "params.yaml")))
    res = run([str(BIN / "dvc"), "repro", "prepare"], work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (work / "data/prepared/videos.parquet").is_file()
    assert (work / "data/prepared/captions.parquet").is_file()
    again = run([str(BIN / "dvc"), "repro", "prepare"], work)
    assert again.returncode == 0
    assert "didn't change" in again.stdout or "up to date" in again.stdout
