"""Latency of one text query against an index of N videos, stage 1 alone and with the re-rank.

    .venv/bin/python benchmarks/bench_search.py                      # 1k, 10k, 100k on CPU
    .venv/bin/python benchmarks/bench_search.py --sizes 1000 10000 --threads 2

Synthetic ViT-B/32-sized features (D = 512, 12 frames, 32 tokens), random stage-1 (WTI, cache
layer "final") and stage-2 weights at the paper's sizes (hidden 512, 8 heads), top K = 32, 50
DDIM steps. Times `Searcher.text_scores` + the top-k ordering for one query per call (what
`search` does after the backbone's text tower, which is excluded: it does not depend on N), as
the median of --repeat calls after one warm-up. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Params  # noqa: E402
from pipeline.diffusion.schedule import GaussianDiffusion  # noqa: E402
from pipeline.index import SearchIndex  # noqa: E402
from pipeline.inference import Models  # noqa: E402
from pipeline.models.denoiser import DenoiserPair  # noqa: E402
from pipeline.models.retrieval import RetrievalConfig, RetrievalModel, TextOut, VideoOut  # noqa: E402
from pipeline.scoring import frame_weights  # noqa: E402
from pipeline.search import Searcher, stable_topk  # noqa: E402

D, F, L = 512, 12, 32


def build(n: int, params: Params) -> Searcher:
    """A Searcher over n random videos (index built in memory, float16 round trip as on disk)."""
    g = torch.Generator().manual_seed(n)
    cfg = RetrievalConfig(clip_config={"projection_dim": D}, cache_layer="final", max_frames=F,
                          temporal_layers=4, temporal_heads=8)
    stage1 = RetrievalModel(cfg).eval()
    pair = DenoiserPair(D, params.diffusion.hidden, params.diffusion.heads).eval()
    diffusion = GaussianDiffusion(params.diffusion.timesteps, params.diffusion.schedule)
    frames = torch.randn(n, F, D, generator=g).half().float()
    mask = torch.ones(n, F, dtype=torch.bool)
    mask[: n // 3, F // 2 :] = False  # some short clips
    video = VideoOut(frames, mask, frames.mean(1))
    videos = pd.DataFrame({"video_id": [f"v{i}" for i in range(n)], "path": "",
                           "split": "test", "timestamps": [[0.0]] * n})
    text = TextOut(torch.zeros(1, 1, D), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, D))
    caps = pd.DataFrame({"caption_id": ["c"], "video_id": ["v0"], "text": [""], "split": "test"})
    models = Models(params, stage1, pair, diffusion, torch.device("cpu"))
    video_w = frame_weights(models, video, 4096)
    return Searcher(models, SearchIndex(videos, video, video_w, caps, text, {"dtype": "float16"}))


def query(g: torch.Generator) -> TextOut:
    tokens = torch.randn(1, L, D, generator=g)
    m = torch.zeros(1, L, dtype=torch.bool)
    m[:, :12] = True  # a 12-token query
    return TextOut(tokens, m, tokens[:, 11])


def time_one(s: Searcher, rerank: bool, repeat: int, k: int = 10) -> float:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(repeat + 1):
        q = query(g)
        t0 = time.perf_counter()
        final, _, _ = s.text_scores(q, [f"q{i}"], rerank=rerank)
        stable_topk(final, k)
        if i:  # first call is the warm-up
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    params = Params()
    rows = []
    with torch.inference_mode():
        for n in a.sizes:
            s = build(n, params)
            t1 = time_one(s, False, a.repeat)
            t2 = time_one(s, True, a.repeat)
            rows.append({"videos": n, "stage1_s": round(t1, 4), "rerank_s": round(t2, 4)})
            print(f"{n:>7} videos  stage 1 {t1 * 1000:8.1f} ms ({t1 / n * 1e6:5.1f} us/video)  "
                  f"+ re-rank {t2 * 1000:8.1f} ms ({t2 / n * 1e6:5.1f} us/video)", flush=True)
            del s
        for lo, hi in zip(rows, rows[1:], strict=False):  # linear: time ratio <= size ratio
            print(f"{lo['videos']} -> {hi['videos']} videos ({hi['videos'] / lo['videos']:.0f}x): "
                  f"stage 1 {hi['stage1_s'] / lo['stage1_s']:.2f}x, "
                  f"with re-rank {hi['rerank_s'] / lo['rerank_s']:.2f}x")
    print(json.dumps({"threads": a.threads, "top_k": params.diffusion.top_k,
                      "steps": params.diffusion.sampling_steps, "rows": rows}))


if __name__ == "__main__":
    main()
