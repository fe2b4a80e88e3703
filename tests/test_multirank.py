"""Two CPU ranks under torchrun (gloo) give the outputs of one rank (slow tier).

`python -m torch.distributed.run --standalone --nproc_per_node 2 -m stages <cmd> --params P` runs
frames, features and train-contrastive on a tiny prepared synthetic dataset (one module fixture:
prepare + scratch backbone, shared by all tests here); the 1-rank references run in-process.

- frames, features: shards are byte-identical (each shard's bytes depend only on its videos and
  params; ranks only decide who writes which shard).
- train-contrastive: 2 ranks x batch 4 against 1 rank x batch 8. The global batches are the same
  items (`epoch_batches` deals one permutation round robin), the InfoNCE loss is computed on the
  gathered batch and DDP averages the gradients, so the two runs differ only by float summation
  order (all-reduce, per-rank text trimming, the split matmuls). Tolerance: weights within
  2e-5 after 6 Adam steps (measured: < 1e-5), losses within rel 1e-6, validation metrics equal;
  except the few elements whose true gradient is exactly zero (`free_directions`): there Adam
  normalises fp noise (~1e-9) into lr-sized steps, so they may differ by up to lr x steps (seen:
  5e-4) without changing any output. Bitwise equality is not expected: summation order differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPModel  # noqa: F401  (imported at collection: slow the first time)

from pipeline.config import Params, from_dict

REPO = Path(__file__).resolve().parents[1]
STAGE_DIRS = ("frames", "features", "contrastive", "diffusion", "evaluate")
SCRATCH = dict(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
               text_hidden=32, text_layers=1, text_heads=2, intermediate_factor=2,
               projection_dim=16, vocab_size=300, max_position=16)


def tiny_doc(base: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny synthetic params document: prepared/backbone under `base`, stage outputs under
    `out`; `sections` update the named sections key by key."""
    doc: dict[str, Any] = {
        "seed": 0,
        "paths": {"prepared": str(base / "prepared"), "backbone": str(base / "backbone"),
                  **{k: str(out / k) for k in STAGE_DIRS}},
        "prepare": {"dataset": "synthetic", "synthetic": {
            "n_train": 12, "n_val": 4, "n_test": 6, "size": 32, "seconds": 2.0, "fps": 4,
            "captions_per_clip": 2, "n_ood": 4, "holdout_pairs": 1, "workers": 1}},
        "frames": {"fps": 2.0, "max_frames": 4, "size": 32, "format": "raw", "shard_size": 8,
                   "workers": 1},
        "features": {"backbone": "scratch", "scratch": dict(SCRATCH), "cache_layer": 0,
                     "max_words": 16, "batch_size": 8, "workers": 0, "threads": 1},
        "contrastive": {"temporal_layers": 1, "temporal_heads": 2, "batch_size": 8,
                        "max_steps": 6, "eval_every": 2, "checkpoint_every": 2,
                        "loader_workers": 0, "threads": 1, "lr": 1e-3},
        "diffusion": {"hidden": 16, "heads": 2, "negatives": 7, "batch_size": 8, "max_steps": 6,
                      "timesteps": 10, "sampling_steps": 5, "top_k": 4, "eval_every": 2,
                      "checkpoint_every": 2, "threads": 1},
        "evaluate": {"bootstrap": 10},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return doc


def write_params(path: Path, doc: dict[str, Any]) -> Params:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return from_dict(Params, doc, str(path))


def build_base(base: Path) -> Params:
    """prepare (synthetic) + scratch backbone, in-process (about 8 s)."""
    from pipeline.data.prepare import run_prepare
    from pipeline.features.backbone import run_backbone

    p = write_params(base / "params.yaml", tiny_doc(base, base))
    run_prepare(p)
    run_backbone(p)
    return p


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DRET_TRACKING": "off", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def digests(folder: Path, pattern: str) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.glob(pattern))}


def torchrun(cmd: str, params: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "stages", cmd, "--params", str(params)]
    res = subprocess.run(args, cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd}: {res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One rank in-process and two ranks under torchrun, for frames, features, stage 1."""
    from pipeline.contrastive import run_contrastive
    from pipeline.dist import DistEnv
    from pipeline.features.extract import run_features
    from pipeline.frames import run_frames
    from pipeline.tracking import Tracker

    root = tmp_path_factory.mktemp("multirank")
    build_base(root / "base")
    one = write_params(root / "one.yaml", tiny_doc(root / "base", root / "one"))
    run_frames(one, progress=False)
    run_features(one)
    metrics_one = run_contrastive(one, Tracker(), DistEnv())
    torch.set_num_threads(1)
    two_doc = tiny_doc(root / "base", root / "two", contrastive={"batch_size": 4})
    write_params(root / "two.yaml", two_doc)
    out = {}
    for cmd in ("frames", "features", "train-contrastive"):
        out[cmd] = torchrun(cmd, root / "two.yaml")
    return dict(root=root, one=root / "one", two=root / "two", metrics_one=metrics_one, out=out)


@pytest.mark.slow
def test_frames_two_ranks_byte_identical(runs: dict[str, Any]) -> None:
    one, two = digests(runs["one"] / "frames", "*.parquet"), digests(runs["two"] / "frames",
                                                                     "*.parquet")
    assert len(one) == 7 and one == two  # 3 shards + 3 failures + failures.parquet
    m1 = json.loads((runs["one"] / "frames" / "manifest.json").read_text())
    m2 = json.loads((runs["two"] / "frames" / "manifest.json").read_text())
    for key in ("videos", "videos_sampled", "frames", "failures_by_kind", "shards"):
        assert m1[key] == m2[key], key
    assert m2["videos"] == 22 and m2["shards_written"] == 2  # rank 0 wrote shards 0 and 2


@pytest.mark.slow
def test_features_two_ranks_byte_identical(runs: dict[str, Any]) -> None:
    one, two = digests(runs["one"] / "features", "shard-*.h5"), digests(runs["two"] / "features",
                                                                        "shard-*.h5")
    assert len(one) == 3 and one == two
    m2 = json.loads((runs["two"] / "features" / "manifest.json").read_text())
    assert m2["n_shards"] == 3 and m2["videos"] == 22
    assert m2["rank0"]["shards_built"] == 2  # rank 1 built the other one


def free_directions(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Elements whose gradient is exactly zero in exact arithmetic: the last bias of the WTI
    token-weight MLPs (a softmax is shift-invariant) and the key part of every attention
    in_proj_bias (it adds the same logit to every key of a query)."""
    out = {}
    for k, w in weights.items():
        mask = torch.zeros_like(w, dtype=torch.bool)
        if k.endswith("_weights.mlp.2.bias"):
            mask[:] = True
        elif k.endswith("self_attn.in_proj_bias"):
            d = w.shape[0] // 3
            mask[d:2 * d] = True
        out[k] = mask
    return out


@pytest.mark.slow
def test_train_contrastive_two_ranks_match_one_rank_full_batch(runs: dict[str, Any]) -> None:
    one, two = runs["one"] / "contrastive", runs["two"] / "contrastive"
    m1, m2 = runs["metrics_one"], json.loads((two / "metrics.json").read_text())
    assert m1["steps"] == m2["steps"] == 6
    w1, w2 = load_file(str(one / "last" / "model.safetensors")), load_file(
        str(two / "last" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    free = free_directions(w1)
    for k in w1:
        diff = (w1[k] - w2[k]).abs()
        # parameters with an exactly zero true gradient: Adam turns fp noise into lr-sized steps
        assert float(torch.where(free[k], diff, 0.0).max()) <= 1e-3 * 6, k
        assert float(torch.where(free[k], 0.0, diff).max()) < 2e-5, k
    assert m2["final_loss"] == pytest.approx(m1["final_loss"], rel=1e-6)
    assert m2["val"] == pytest.approx(m1["val"], abs=1e-6)
    assert m2["best_step"] == m1["best_step"]
    s2 = json.loads((two / "last" / "state.json").read_text())
    assert s2["world_size"] == 2 and s2["settings"]["batch_size"] == 4
    assert "best checkpoint" in runs["out"]["train-contrastive"].stdout  # rank 0 printed once
    assert runs["out"]["train-contrastive"].stdout.count("best checkpoint") == 1
