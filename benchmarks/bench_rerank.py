"""Cost of the diffusion re-rank: Q queries x G gallery, both directions, random features.

    .venv/bin/python benchmarks/bench_rerank.py                    # CPU, fp32, 1000 x 1000
    .venv/bin/python benchmarks/bench_rerank.py --device cuda --dtype bf16  # GPU, target <= 0.1 s

Imports only torch and the stage-2 modules (no MLflow, no DVC), so it runs on a bare machine
with the repository checked out. Times the whole `rerank` call (noise, top-K, prepare, the full
DDIM loop, scatter), after one warm-up call, as the median of --repeat runs. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.rerank import RerankSettings, rerank  # noqa: E402
from pipeline.diffusion.schedule import GaussianDiffusion  # noqa: E402
from pipeline.models.denoiser import Denoiser, DenoiserConfig, VideoFeats  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=1000, help="captions (= videos) in the test set")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--chunk", type=int, default=1024, help="queries per chunk")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    a = parse()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    n = a.queries
    texts = torch.randn(n, a.dim, device=device)
    frames = torch.randn(n, a.frames, a.dim, device=device)
    mask = torch.ones(n, a.frames, dtype=torch.bool, device=device)
    videos = VideoFeats(frames, mask, frames.mean(1))
    sim = torch.rand(n, n, device=device) * 2 - 1
    ids = [f"q{i}" for i in range(n)]
    diffusion = GaussianDiffusion(50, "cosine").to(device)
    models = {
        q: Denoiser(DenoiserConfig(a.dim, a.hidden, a.heads, q)).to(device).eval()
        for q in ("text", "video")
    }
    settings = RerankSettings(top_k=a.top_k, steps=a.steps, chunk=a.chunk)
    amp = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if a.dtype == "bf16" else contextlib.nullcontext()
    )

    def both() -> dict[str, float]:
        out = {}
        for name, q, s in (("t2v", "text", sim), ("v2t", "video", sim.t())):
            sync(device)
            t0 = time.perf_counter()
            with amp, torch.inference_mode():
                rerank(s, models[q], diffusion, texts, videos, ids, settings)
            sync(device)
            out[name] = time.perf_counter() - t0
        out["both"] = out["t2v"] + out["v2t"]
        return out

    both()  # warm-up (allocator, kernels, lazy init)
    runs = [both() for _ in range(a.repeat)]
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    params = sum(p.numel() for p in models["text"].parameters())
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": a.dtype, "queries": n, "gallery": n,
        "dim": a.dim, "frames": a.frames, "top_k": a.top_k, "steps": a.steps, "chunk": a.chunk,
        "denoiser_params": params, "seconds": {k: round(v, 4) for k, v in result.items()},
    }))


if __name__ == "__main__":
    main()
