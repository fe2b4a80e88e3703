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
    """The repo's params.yaml shrunk to seconds: same keys, tiny sizes and step counts."""
    p = yaml.safe_load(src.read_text())
    p["prepare"]["synthetic"].update(
        n_train=24, n_val=6, n_test=8, n_ood=4, workers=1, size=32, seconds=2.0, fps=4,
        captions_per_clip=2,
    )
    p["frames"].update(size=32, fps=2.0, max_frames=4, shard_size=16, workers=1)
    p["features"]["scratch"].update(
        image_size=32, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
        text_layers=1, text_heads=2, projection_dim=32, vocab_size=300, max_position=16,
    )
    p["features"].update(max_words=16, batch_size=16, threads=1)
    p["contrastive"].update(batch_size=8, max_steps=4, temporal_layers=1, temporal_heads=2,
                            checkpoint_every=2, threads=1)
    p["diffusion"].update(batch_size=8, max_steps=3, negatives=7, hidden=32, heads=2, top_k=4,
                          sampling_steps=5, checkpoint_every=2, threads=1, chunk_queries=8)
    p["evaluate"].update(bootstrap=50)
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


def test_dvc_yaml_lists_every_imported_module(repo_root: Path) -> None:
    sys.path.insert(0, str(repo_root / "scripts"))
    from stage_deps import stage_deps

    spec = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        module = f"stages/{name}.py"
        deps = set(stage["deps"])
        missing = [d for d in [module, *stage_deps(module)] if d not in deps]
        assert not missing, f"dvc.yaml stage {name} lacks deps {missing}"


@pytest.mark.slow
def test_full_dag_repro_noop_and_partial_rerun(repo_root: Path, tmp_path: Path) -> None:
    """Every stage through dvc.yaml's own commands; a second repro does nothing; a diffusion
    param change re-runs only train_diffusion and evaluate."""
    work = clone(repo_root, tmp_path / "clone")
    params = tiny_params(work / "params.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = str(BIN / "dvc")
    res = run([dvc, "repro"], work)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = yaml.safe_load((work / "data/evaluate/metrics.json").read_text())
    assert metrics  # evaluation wrote its metrics
    for f in ("ranks.parquet", "similarity.npz", "report.md"):
        assert (work / "data/evaluate" / f).is_file()
    again = run([dvc, "repro"], work)
    assert again.returncode == 0
    assert "Running stage" not in again.stdout
    params["diffusion"]["lr"] = params["diffusion"]["lr"] * 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    third = run([dvc, "repro"], work)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    ran = {line.split("'")[1] for line in third.stdout.splitlines() if "Running stage" in line}
    assert ran == {"train_diffusion", "evaluate"}
    shown = run([dvc, "metrics", "show", "--json"], work)
    assert shown.returncode == 0 and "metrics.json" in shown.stdout
