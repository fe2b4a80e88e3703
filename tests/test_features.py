"""Features stage: cache-layer continuation, shard schema, staleness, ranks, store and dataset."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from transformers import CLIPConfig, CLIPModel  # imported at collection: slow the first time

from pipeline.config import Params, from_dict, to_dict
from pipeline.dist import DistEnv
from pipeline.errors import PipelineError
from pipeline.features.backbone import load_backbone, run_backbone
from pipeline.features.dataset import CaptionVideoDataset, reverse_frames
from pipeline.features.extract import run_features
from pipeline.features.store import FeatureStore, check_shard
from pipeline.models import clip_split

REPO = Path(__file__).resolve().parents[1]
SCRATCH = dict(image_size=32, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
               text_hidden=32, text_layers=2, text_heads=2, intermediate_factor=2,
               projection_dim=16, vocab_size=300, max_position=16)
WORDS = ["red", "blue", "circle", "square", "moves", "left", "right", "grows", "shrinks", "a"]


# ----------------------------------------------------------------------------------------------
# A tiny prepared dataset with frame shards (written with the frames stage's own writer)
# ----------------------------------------------------------------------------------------------


def raw_params(tmp: Path, n_videos: int = 5, **features: object) -> dict:
    return {
        "seed": 0,
        "paths": {k: str(tmp / k) for k in ("prepared", "frames", "backbone", "features")},
        "frames": {"fps": 1.0, "max_frames": 4, "size": 32, "format": "jpeg", "shard_size": 2},
        "features": {"backbone": "scratch", "scratch": SCRATCH, "cache_layer": 1,
                     "max_words": 12, "batch_size": 3, "workers": 1, "threads": 1, **features},
        "tracking": {"enabled": False},
        "_n_videos": n_videos,
    }


def make_project(tmp: Path, n_videos: int = 5, failed: tuple[str, ...] = ("v003",),
                 fmt: str = "jpeg", **features: object) -> Params:
    """Prepared tables, frame shards (video v003 failed), scratch backbone; returns params."""
    from pipeline.video.shards import ShardWriter, encode_frames

    raw = raw_params(tmp, n_videos, **features)
    raw.pop("_n_videos")
    raw["frames"]["format"] = fmt
    p = from_dict(Params, raw)
    rng = np.random.default_rng(0)
    vids = [f"v{i:03d}" for i in range(n_videos)]
    prepared = tmp / "prepared"
    prepared.mkdir(parents=True)
    pd.DataFrame({"video_id": vids[::-1], "path": [f"{v}.mp4" for v in vids[::-1]],
                  "exists": True, "duration": 4.0, "split": "train"}).to_parquet(
        prepared / "videos.parquet")
    caps = []
    for v in vids:
        for j in range(2):
            text = " ".join(rng.choice(WORDS, size=rng.integers(3, 20)))  # some get truncated
            rev = text.replace("left", "right") if j == 0 else ""
            caps.append((f"{v}#{j}", v, text, "train", rev))
    pd.DataFrame(caps, columns=["caption_id", "video_id", "text", "split", "reversed_text"]
                 ).to_parquet(prepared / "captions.parquet")
    for s in range(0, n_videos, 2):
        with ShardWriter(tmp / "frames" / f"shard-{s // 2:05d}.parquet", fmt, {}) as w:
            for v in vids[s : s + 2]:
                if v in failed:
                    continue
                n = int(rng.integers(1, 5))
                frames = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
                w.add(v, [float(t) for t in range(n)], encode_frames(frames, fmt), 32, 32)
    run_backbone(p)
    return p


def with_features(p: Params, **changes: object) -> Params:
    d = to_dict(p)
    d.pop("source")
    d["features"].update(changes)
    return from_dict(Params, d)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def project(tmp_path: Path) -> Params:
    return make_project(tmp_path)


# ----------------------------------------------------------------------------------------------
# clip_split: head + tail == the full tower
# ----------------------------------------------------------------------------------------------


def _tiny_clip(impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=10, vocab_size=50,
                         bos_token_id=0, eos_token_id=1, pad_token_id=3),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=16),
        projection_dim=16,
    )
    cfg._attn_implementation = impl
    return CLIPModel(cfg).eval()


def _text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 5, 6, 1, 3, 3, 3, 3, 3, 3], [0, 7, 8, 9, 10, 11, 12, 13, 14, 1]])
    return ids, ids != 3


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_text_mask_matches_transformers(impl: str) -> None:
    from transformers.masking_utils import create_causal_mask

    model = _tiny_clip(impl)
    ids, mask = _text_batch()
    x = torch.zeros(2, ids.shape[1], 32)
    ref = create_causal_mask(config=model.text_model.config, inputs_embeds=x,
                             attention_mask=mask.long(), cache=None)
    ours = clip_split.text_attention_mask(mask, impl, torch.float32)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.equal(ours, ref)
    # query 4 (a pad) sees tokens 0..3 only; query 2 sees 0..2 (causal)
    allowed = clip_split.text_attention_mask(mask, "sdpa", torch.float32)[0, 0]
    assert allowed[4].tolist()[:5] == [True] * 4 + [False]
    assert allowed[2].tolist()[:4] == [True, True, True, False]


def test_eos_index_follows_clip_pooling() -> None:
    ids = torch.tensor([[0, 5, 1, 1, 1], [0, 5, 6, 7, 1]])
    assert clip_split.eos_index(ids, 1).tolist() == [2, 4]
    openai = torch.tensor([[49406, 320, 49407, 49407], [49406, 320, 321, 49407]])
    assert clip_split.eos_index(openai, 2).tolist() == [2, 3]  # legacy: first argmax


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_tail_of_head_equals_full_tower(impl: str, k: int) -> None:
    model = _tiny_clip(impl)
    px = torch.randn(3, 3, 32, 32)
    ids, mask = _text_batch()
    eos = clip_split.eos_index(ids, 1)
    vtail, ttail = clip_split.VisionTail(model, k), clip_split.TextTail(model, k)
    with torch.no_grad():
        ref_v = clip_split.vision_final(model, px)
        ref_tok, ref_sent = clip_split.text_final(model, ids, mask, eos)
        hv, ht = clip_split.vision_head(model, px, k), clip_split.text_head(model, ids, mask, k)
        torch.testing.assert_close(vtail(hv), ref_v, rtol=0, atol=1e-5)
        tok, sent = ttail(ht, mask, eos)
        torch.testing.assert_close(tok, ref_tok, rtol=0, atol=1e-5)
        torch.testing.assert_close(sent, ref_sent, rtol=0, atol=1e-5)
        ref_feats = model.get_text_features(input_ids=ids, attention_mask=mask.long())
        torch.testing.assert_close(sent, ref_feats.pooler_output, rtol=0, atol=1e-5)
        # from an fp16 cache: within fp16 rounding of the input
        v16 = vtail(hv.half())
        tok16, sent16 = ttail(ht.half(), mask, eos)
    scale = ref_v.abs().max()
    assert (v16 - ref_v).abs().max() < 2e-2 * scale
    assert (sent16 - ref_sent).abs().max() < 2e-2 * ref_sent.abs().max()
    assert all(p.requires_grad for p in ttail.parameters())


def test_tails_are_trainable_copies() -> None:
    model = _tiny_clip("sdpa")
    tail = clip_split.VisionTail(model, 1)
    before = model.vision_model.encoder.layers[1].mlp.fc1.weight.clone()
    with torch.no_grad():
        tail.layers[0].mlp.fc1.weight.add_(1.0)
    assert torch.equal(model.vision_model.encoder.layers[1].mlp.fc1.weight, before)
    with pytest.raises(ValueError):
        clip_split.VisionTail(model, 3)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def test_shards_schema_attrs_and_values(project: Params) -> None:
    manifest = run_features(project)
    out = Path(project.paths.features)
    assert sorted(f.name for f in out.glob("shard-*.h5")) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert manifest["n_shards"] == 3 and manifest["videos"] == 4 and manifest["captions"] == 10
    assert manifest["captions_rev"] == 5 and (out / "manifest.json").is_file()
    with h5py.File(out / "shard-00001.h5", "r") as f:
        a = dict(f.attrs)
        assert a["schema_version"] == 1 and a["cache_layer"] == "1" and a["dtype"] == "float16"
        assert json.loads(a["frames_params"])["max_frames"] == 4 and a["backbone_id"] == "scratch"
        assert len(a["backbone_fingerprint"]) == 64
        assert [s.decode() for s in f["video/ids"][()]] == ["v002"]  # v003 failed
        assert f["video/feats"].shape == (1, 4, 5, 32) and f["video/feats"].dtype == np.float16
        assert f["video/feats"].chunks == (1, 4, 5, 32)
        # captions of the failed video are kept
        assert sorted(s.decode() for s in f["text/video_ids"][()]) == ["v002", "v002",
                                                                         "v003", "v003"]
        assert f["text/feats"].shape == (4, 12, 32) and f["text/mask"].dtype == bool
        assert "pooled" not in f["text"]
        assert f["text_rev/ids"].shape == (2,)
        eos, mask = f["text/eos"][()], f["text/mask"][()]
        assert (mask.sum(1) == eos + 1).all()  # EOS is the last real token, also when truncated
    # the stored frame features are the vision head's output for the stored frames
    from pipeline.video.shards import iter_shard

    bb = load_backbone(Path(project.paths.backbone))
    vid, frames, _ = next(iter_shard(Path(project.paths.frames) / "shard-00000.parquet"))
    store = FeatureStore(out)
    feats, vmask = store.load_videos([vid])
    x = torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(bb.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = clip_split.vision_head(bb.model, (x - mean) / std, 1)
    n = len(frames)
    assert vmask[0].tolist() == [True] * n + [False] * (4 - n)
    torch.testing.assert_close(feats[0, :n].float(), ref, rtol=1e-2, atol=1e-2)
    assert feats[0, n:].abs().sum() == 0


def test_final_layer_layout(tmp_path: Path) -> None:
    p = make_project(tmp_path, cache_layer="final", fmt="raw")
    run_features(p)
    store = FeatureStore(p.paths.features)
    assert store.cache_layer == "final"
    ids = store.caption_ids[:3]
    feats, mask, eos = store.load_texts(ids)
    assert feats.shape == (3, 12, 16)
    pooled = store.load_pooled(ids)
    torch.testing.assert_close(feats[torch.arange(3), eos], pooled)
    v, m = store.load_videos(store.video_ids)
    assert v.shape == (4, 4, 16) and m.shape == (4, 4)


def test_rerun_reuses_and_stale_or_corrupt_shards_are_rebuilt(
    project: Params, caplog: pytest.LogCaptureFixture
) -> None:
    run_features(project)
    out = Path(project.paths.features)
    before = {f.name: (f.stat().st_mtime_ns, digest(f)) for f in out.glob("shard-*.h5")}
    again = run_features(project)
    assert again["rank0"]["shards_built"] == 0 and again["rank0"]["shards_reused"] == 3
    assert before == {f.name: (f.stat().st_mtime_ns, digest(f)) for f in out.glob("shard-*.h5")}
    # truncated shard -> detected and rebuilt, bitwise equal to the first build
    victim = out / "shard-00001.h5"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert check_shard(victim, {}) is not None
    caplog.set_level(logging.WARNING)
    res = run_features(project)
    assert res["rank0"]["shards_built"] == 1 and "rebuilding shard-00001.h5" in caplog.text
    assert digest(victim) == before["shard-00001.h5"][1]
    # a changed cache layer -> every shard rebuilt with the new layout
    caplog.clear()
    res = run_features(with_features(project, cache_layer=0))
    assert res["rank0"]["shards_built"] == 3 and "cache_layer" in caplog.text
    with h5py.File(victim, "r") as f:
        assert f.attrs["cache_layer"] == "0"


def test_other_backbone_invalidates_shards(project: Params) -> None:
    run_features(project)
    d = to_dict(project)
    d.pop("source")
    d["seed"] = 1  # another random init -> another fingerprint
    p2 = from_dict(Params, d)
    run_backbone(p2)
    res = run_features(p2)
    assert res["rank0"]["shards_built"] == 3
    # and a params/record mismatch is refused with a hint
    with pytest.raises(PipelineError, match="dret backbone"):
        run_features(with_features(project, backbone="some/other-clip"))


def test_two_ranks_give_the_same_bytes_as_one(tmp_path: Path) -> None:
    one = make_project(tmp_path / "one")
    two = make_project(tmp_path / "two")
    run_features(one)
    # rank 0 first: without torchrun there is no barrier, so it finds rank 1's shard missing
    with pytest.raises(PipelineError, match="not complete"):
        run_features(two, env=DistEnv(rank=0, world_size=2))
    assert run_features(two, env=DistEnv(rank=1, world_size=2))["shards_built"] == 1
    manifest = run_features(two, env=DistEnv(rank=0, world_size=2))
    assert manifest["rank0"]["shards_reused"] == 2 and manifest["n_shards"] == 3
    for f in sorted(Path(one.paths.features).glob("shard-*.h5")):
        assert digest(f) == digest(Path(two.paths.features) / f.name), f.name


# ----------------------------------------------------------------------------------------------
# Reader and dataset
# ----------------------------------------------------------------------------------------------


def test_store_and_dataset(project: Params) -> None:
    run_features(project)
    store = FeatureStore(project.paths.features)
    assert store.video_ids == ["v000", "v001", "v002", "v004"]
    assert len(store.caption_ids) == 10 and len(store.reversed_ids) == 5
    ids = ["v004", "v000", "v004"]
    feats, mask = store.load_videos(ids)
    single = torch.cat([store.load_videos([i])[0] for i in ids])
    assert torch.equal(feats, single) and feats.dtype == torch.float16
    with pytest.raises(KeyError, match="nope"):
        store.load_videos(["nope"])
    # dataset: captions of the failed video are dropped; in-memory equals lazy
    lazy = CaptionVideoDataset(store, store.caption_ids, reversed=True)
    mem = CaptionVideoDataset(store, store.caption_ids, reversed=True, in_memory=True)
    assert len(lazy) == 8 and lazy.video_ids == store.video_ids
    for i in range(len(lazy)):
        a, b = lazy[i], mem[i]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert int(lazy.has_rev.sum()) == 4
    item = lazy[0]
    assert item["video_feats"].shape == (4, 5, 32) and item["text_feats"].shape == (12, 32)
    # DataLoader workers (fork) + DistributedSampler
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(lazy, num_replicas=2, rank=1, shuffle=False)
    _ = store.load_videos(["v000"])  # open handles before the fork
    loader = DataLoader(lazy, batch_size=2, sampler=sampler, num_workers=2)
    got = torch.cat([b["index"] for b in loader])
    assert got.tolist() == list(range(1, 8, 2))


def test_reverse_frames() -> None:
    feats = torch.arange(8.0).view(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert reverse_frames(feats, mask).view(2, 4).tolist() == [[2, 1, 0, 3], [7, 6, 5, 4]]


# ----------------------------------------------------------------------------------------------
# Resume after a kill (slow: real CLI in a subprocess)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_kill(tmp_path: Path) -> None:
    p = make_project(tmp_path, n_videos=40, failed=(), batch_size=2)
    d = to_dict(p)
    d.pop("source")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(d))
    env = {**os.environ, "DRET_TRACKING": "off", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "stages", "features", "--params", str(params_file)]
    out = Path(p.paths.features)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.h5"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.h5")}
    assert 2 <= len(done) < 20 and not (out / "manifest.json").exists()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not list(out.glob(".*.tmp"))
    for name, mtime in done.items():
        assert (out / name).stat().st_mtime_ns == mtime  # completed shards were kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_shards"] == 20 and manifest["videos"] == 40
    # and the result equals a clean run's
    clean = with_features(p)
    d2 = to_dict(clean)
    d2.pop("source")
    d2["paths"]["features"] = str(tmp_path / "clean")
    run_features(from_dict(Params, d2))
    for f in sorted(out.glob("shard-*.h5")):
        assert digest(f) == digest(tmp_path / "clean" / f.name), f.name


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    p = make_project(tmp_path / "dist")
    d = to_dict(p)
    d.pop("source")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(d))
    env = {**os.environ, "DRET_TRACKING": "off", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29561", "-m", "stages", "features", "--params", str(params_file)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((Path(p.paths.features) / "manifest.json").read_text())
    assert manifest["n_shards"] == 3 and manifest["videos"] == 4
    single = make_project(tmp_path / "single")
    run_features(single)
    for f in sorted(Path(single.paths.features).glob("shard-*.h5")):
        assert digest(f) == digest(Path(p.paths.features) / f.name), f.name
