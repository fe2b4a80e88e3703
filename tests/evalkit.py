"""A tiny but real dataset for evaluation/search tests: prepared tables, JPEG frame shards, a
scratch backbone and HDF5 features built by the real stages, and untrained stage-1 / stage-2
checkpoints (random weights are enough to test plumbing, determinism and agreement)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import Params, from_dict
from pipeline.io import write_json
from pipeline.training import checkpoint

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
MOTIONS = ["left", "right", "up", "down"]


def tiny_params(root: Path) -> Params:
    """Params for a ~1 s fixture: 32 px frames, 1-layer 32-dim CLIP, 4 frames, cache layer 0."""
    paths = {k: str(root / k) for k in (
        "prepared", "frames", "backbone", "features", "contrastive", "diffusion", "evaluate")}
    return from_dict(Params, {
        "seed": 0,
        "paths": paths,
        "frames": {"fps": 1.0, "max_frames": 4, "size": 32, "format": "jpeg", "shard_size": 16},
        "features": {
            "backbone": "scratch", "cache_layer": 0, "max_words": 16, "batch_size": 16,
            "dtype": "float16",
            "scratch": {"image_size": 32, "patch_size": 16, "vision_hidden": 32,
                        "vision_layers": 1, "vision_heads": 2, "text_hidden": 32,
                        "text_layers": 1, "text_heads": 2, "projection_dim": 32,
                        "vocab_size": 300, "max_position": 16},
        },
        "contrastive": {"temporal_layers": 1, "temporal_heads": 2},
        "diffusion": {"hidden": 32, "heads": 2, "top_k": 5, "sampling_steps": 5,
                      "timesteps": 10, "chunk_queries": 7},
        "evaluate": {"chunk": 5, "bootstrap": 50, "recall_ks": [1, 5, 10]},
        "tracking": {"enabled": False},
    })


def _caption(rng: np.random.Generator) -> str:
    return (f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} moves {rng.choice(MOTIONS)}")


def write_dataset(params: Params, seed: int, n: dict[str, int], missing: int = 1,
                  caps_per_video: int = 2) -> None:
    """Prepared tables + frame shards (the last `missing` test videos have no frames)."""
    from pipeline.video.shards import ShardWriter, encode_frames, shard_name, write_failures

    rng = np.random.default_rng(seed)
    prep, frames_dir = Path(params.paths.prepared), Path(params.paths.frames)
    prep.mkdir(parents=True, exist_ok=True)
    vids, caps = [], []
    for split, count in n.items():
        for i in range(count):
            vid = f"{split}{seed}_{i:03d}"
            vids.append({"video_id": vid, "path": f"{vid}.mp4", "exists": True,
                         "duration": 4.0, "split": split})
            for j in range(caps_per_video):
                caps.append({"caption_id": f"{vid}#{j}", "video_id": vid,
                             "text": _caption(rng), "split": split})
    videos = pd.DataFrame(vids).sort_values("video_id").reset_index(drop=True)
    videos.to_parquet(prep / "videos.parquet")
    pd.DataFrame(caps).to_parquet(prep / "captions.parquet")
    write_json(prep / "summary.json", {"dataset": "fixture", "video_root": str(prep / "videos")})
    ood = [{"caption_id": f"ood{k}_{i}", "text": t, "kind": k}
           for i in range(6) for k, t in (
               ("novel_word", f"a {rng.choice(COLOURS)} zebra dances {rng.choice(MOTIONS)}"),
               ("novel_composition", f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} spins"))]
    pd.DataFrame(ood).to_parquet(prep / "ood_captions.parquet")
    test_ids = videos.loc[videos["split"] == "test", "video_id"].tolist()
    gone = set(test_ids[len(test_ids) - missing:]) if missing else set()
    size = params.frames.shard_size
    ids = videos["video_id"].tolist()
    frames_dir.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(ids), size):
        with ShardWriter(frames_dir / shard_name(s // size), "jpeg", {}) as w:
            for vid in ids[s : s + size]:
                if vid in gone:
                    continue
                px = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
                w.add(vid, [0.5, 1.5, 2.5, 3.5], encode_frames(px, "jpeg"), 32, 32)
    write_failures(frames_dir / "failures.parquet",
                   [(v, f"{v}.mp4", "decode error: fixture") for v in sorted(gone)])


def build_features(params: Params) -> None:
    from pipeline.features.backbone import run_backbone
    from pipeline.features.extract import run_features

    run_backbone(params)
    run_features(params)


def write_checkpoints(params: Params) -> None:
    """Random-init stage-1 and stage-2 checkpoints in the formats `pipeline.inference` loads."""
    from pipeline.features.backbone import load_backbone
    from pipeline.models.denoiser import DenoiserPair
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel

    torch.manual_seed(0)
    bb = load_backbone(Path(params.paths.backbone) / "backbone.json")
    cfg = RetrievalConfig(clip_config=bb.model.config.to_dict(), cache_layer=0,
                          max_frames=params.frames.max_frames, temporal_layers=1,
                          temporal_heads=2)
    model = RetrievalModel(cfg, bb.model)
    with torch.no_grad():  # non-uniform WTI weights, so that the token weighting is exercised
        for m in (model.text_weights, model.frame_weights):
            m.mlp[2].weight.normal_(0, 0.5)
    checkpoint.save(Path(params.paths.contrastive) / "best", model, {"step": 0},
                    config=cfg.to_dict())
    pair = DenoiserPair(cfg.dim, params.diffusion.hidden, params.diffusion.heads)
    checkpoint.save(Path(params.paths.diffusion) / "best", pair, {"step": 0},
                    config={**pair.config_dict(), "timesteps": params.diffusion.timesteps,
                            "schedule": params.diffusion.schedule})


def make(root: Path, seed: int = 0, n: dict[str, int] | None = None, missing: int = 1) -> Params:
    """A complete fixture under `root` (everything evaluate needs); returns its params."""
    params = tiny_params(root)
    write_dataset(params, seed, n or {"train": 6, "val": 2, "test": 12}, missing)
    build_features(params)
    write_checkpoints(params)
    return params


_BUILT: dict[tuple, Params] = {}


def evaluated(seed: int = 0) -> Params:
    """A fixture under a temp dir, evaluated once per test session (shared by test modules)."""
    import atexit
    import shutil
    import tempfile

    from pipeline.evaluation import run_evaluate

    key = ("evaluated", seed)
    if key not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix="dret-eval-"))
        atexit.register(shutil.rmtree, root, True)
        params = make(root, seed)
        run_evaluate(params)
        _BUILT[key] = params
    return _BUILT[key]


def params_file(params: Params, path: Path) -> Path:
    """Write `params` as a params.yaml the CLI reads."""
    import yaml

    from pipeline.config import to_dict

    data = to_dict(params)
    data.pop("source", None)
    path.write_text(yaml.safe_dump(data))
    return path
