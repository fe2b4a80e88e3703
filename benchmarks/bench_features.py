"""Features stage throughput vs the backbone's bare forward (demo backbone, CPU).

Builds a demo-sized dataset in a temp dir (64 px JPEG frame shards written with the frames
stage's writer, 5 captions per video, the scratch backbone of params.yaml), then in one run:

- stage: `run_features` from frame shards to written HDF5 shards (decode, preprocess, forward,
  fp16 cast, HDF5 write), at cache_layer final and 0;
- bare: the same batches (frames per features.batch_size within a shard, captions likewise)
  through the towers only, inputs decoded/tokenised beforehand (final only);
- storage: bytes and time per frame / per video for each cache layer; read time of a full pass
  over the store with compression none vs lzf.

Usage: .venv/bin/python benchmarks/bench_features.py [--videos 256] [--threads 2] [--json out]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DRET_TRACKING", "off")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline.config import Params, from_dict, load_params, to_dict  # noqa: E402
from pipeline.features.backbone import load_backbone, run_backbone  # noqa: E402
from pipeline.features.extract import run_features  # noqa: E402
from pipeline.features.store import FeatureStore  # noqa: E402
from pipeline.models import clip_split  # noqa: E402
from pipeline.video.shards import ShardWriter, encode_frames, iter_shard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = "a the red blue green yellow circle square triangle moves left right up down grows shrinks"


def make_data(root: Path, n_videos: int, p: Params, seed: int = 0) -> None:
    """Prepared tables + JPEG frame shards of smooth random clips (JPEG sizes like real frames)."""
    rng = np.random.default_rng(seed)
    words = WORDS.split()
    vids = [f"v{i:05d}" for i in range(n_videos)]
    prep = root / "prepared"
    prep.mkdir(parents=True)
    pd.DataFrame({"video_id": vids, "path": "", "exists": True, "duration": 4.0,
                  "split": "train"}).to_parquet(prep / "videos.parquet")
    caps = [(f"{v}#{j}", v, " ".join(rng.choice(words, 10)), "train")
            for v in vids for j in range(5)]
    pd.DataFrame(caps, columns=["caption_id", "video_id", "text", "split"]).to_parquet(
        prep / "captions.parquet")
    fr, size, n = p.frames, p.frames.size, p.frames.max_frames
    for s in range(0, n_videos, fr.shard_size):
        with ShardWriter(root / "frames" / f"shard-{s // fr.shard_size:05d}.parquet", fr.format,
                         {}) as w:
            for v in vids[s : s + fr.shard_size]:
                base = rng.integers(0, 256, size=(1, 8, 8, 3)).astype(np.float32)
                up = np.kron(base, np.ones((1, size // 8, size // 8, 1)))
                clip = np.clip(up + rng.normal(0, 6, size=(n, size, size, 3)), 0, 255)
                w.add(v, [float(t) for t in range(n)],
                      encode_frames(clip.astype(np.uint8), fr.format, fr.jpeg_quality), size, size)


def params_for(root: Path, base: Params, features_dir: str = "", **features: object) -> Params:
    d = to_dict(base)
    d.pop("source")
    d["paths"] = {k: str(root / k) for k in ("prepared", "frames", "backbone", "features")}
    d["paths"]["features"] = features_dir or d["paths"]["features"]
    d["features"].update(features)
    d["tracking"]["enabled"] = False
    return from_dict(Params, d)


class Timer:
    """Wall and process CPU seconds (all threads): CPU time stays meaningful on a shared machine."""

    def __enter__(self) -> Timer:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def bare_forward(p: Params) -> dict[str, float]:
    """Seconds of the towers alone on the stage's batches (inputs prepared beforehand)."""
    bb = load_backbone(Path(p.paths.backbone))
    model, bs = bb.model, p.features.batch_size
    mean = torch.tensor(bb.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.image_std).view(1, 3, 1, 1)
    frame_batches, text_batches, n_frames = [], [], 0
    caps = pd.read_parquet(Path(p.paths.prepared) / "captions.parquet").sort_values(
        "video_id", kind="stable")
    for shard in sorted(Path(p.paths.frames).glob("shard-*.parquet")):
        frames = np.concatenate([f for _, f, _ in iter_shard(shard)])
        n_frames += len(frames)
        for i in range(0, len(frames), bs):
            x = torch.from_numpy(frames[i : i + bs]).permute(0, 3, 1, 2).contiguous().float()
            frame_batches.append((x / 255 - mean) / std)
        vids = {v for v, _, _ in iter_shard(shard)}
        texts = caps[caps["video_id"].isin(vids)]["text"].tolist()
        for i in range(0, len(texts), bs):
            enc = bb.tokenizer(texts[i : i + bs], padding="max_length", truncation=True,
                               max_length=p.features.max_words, return_tensors="pt")
            mask = enc["attention_mask"].bool()
            text_batches.append((enc["input_ids"], mask,
                                 clip_split.eos_index(enc["input_ids"], bb.eos_token_id)))
    with torch.inference_mode(), Timer() as tv:
        for x in frame_batches:
            clip_split.vision_final(model, x)
    with torch.inference_mode(), Timer() as tt:
        for ids, mask, eos in text_batches:
            clip_split.text_final(model, ids, mask, eos)
    return {"frames": n_frames, "vision_s": tv.wall, "text_s": tt.wall, "vision_cpu": tv.cpu,
            "text_cpu": tt.cpu}


def read_pass(features_dir: Path) -> float:
    """Seconds to read every video and caption once through FeatureStore (batches of 256)."""
    t0 = time.perf_counter()
    store = FeatureStore(features_dir)
    for ids, load in ((store.video_ids, store.load_videos), (store.caption_ids, store.load_texts)):
        for i in range(0, len(ids), 256):
            load(ids[i : i + 256])
    store.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=0, help="features.batch_size (0: params)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_params(args.params)
    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:
        bs = {"batch_size": args.batch_size} if args.batch_size else {}
        p = params_for(root, base, cache_layer="final", threads=args.threads, **bs)
        make_data(root, args.videos, p)
        run_backbone(p)
        results: dict[str, dict] = {}
        bare: dict[str, float] = {}
        for _ in range(args.repeat):  # interleaved repeats, best of each: less load noise
            b = bare_forward(p)
            bare = {k: min(v, bare.get(k, v)) for k, v in b.items()}
            for layer in ("final", 0):
                for comp in ("none", "lzf"):
                    q = params_for(root, base, str(root / f"features-{layer}-{comp}"),
                                   cache_layer=layer, compression=comp, threads=args.threads,
                                   **bs)
                    shutil.rmtree(q.paths.features, ignore_errors=True)
                    with Timer() as t:
                        m = run_features(q)
                    r = {"stage_s": t.wall, "stage_cpu": t.cpu, "frames": m["frames"],
                         "videos": m["videos"], "captions": m["captions"], "bytes": m["bytes"],
                         "read_s": read_pass(Path(q.paths.features))}
                    old = results.setdefault(f"{layer}/{comp}", r)
                    for k in ("stage_s", "stage_cpu", "read_s"):
                        old[k] = min(old[k], r[k])
        report(results, bare, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(results: dict[str, dict], bare: dict[str, float], args: argparse.Namespace) -> None:
    fin = results["final/none"]
    bare_s = bare["vision_s"] + bare["text_s"]
    bare_cpu = bare["vision_cpu"] + bare["text_cpu"]
    ratio = bare_s / fin["stage_s"]
    ratio_cpu = bare_cpu / fin["stage_cpu"]
    print(f"demo backbone, CPU, {args.threads} threads, batch {args.batch_size or 'params'}, "
          f"{fin['videos']} videos, "
          f"{fin['frames']} frames, {fin['captions']} captions")
    print(f"bare forward (final, vision + text): {fin['frames'] / bare_s:8.0f} frames/s "
          f"(vision alone {bare['frames'] / bare['vision_s']:.0f} frames/s)")
    print(f"features stage (final):              {fin['frames'] / fin['stage_s']:8.0f} frames/s "
          f"-> {ratio:.2f}x the bare forward (by CPU time {ratio_cpu:.2f}x)")
    print(f"{'cache':<12}{'stage s':>9}{'cpu s':>8}{'frames/s':>10}{'ms/video':>10}{'B/frame':>10}"
          f"{'KB/video':>10}{'MB':>8}{'read s':>8}")
    for key, r in results.items():
        print(f"{key:<12}{r['stage_s']:9.2f}{r['stage_cpu']:8.2f}{r['frames'] / r['stage_s']:10.0f}"
              f"{1e3 * r['stage_s'] / r['videos']:10.2f}{r['bytes'] / r['frames']:10.0f}"
              f"{r['bytes'] / r['videos'] / 1e3:10.1f}{r['bytes'] / 1e6:8.1f}{r['read_s']:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"results": results, "bare": bare, "ratio_final": ratio,
             "ratio_final_cpu": ratio_cpu}, indent=2))


if __name__ == "__main__":
    main()
