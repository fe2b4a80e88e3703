"""One-command GPU benchmark of the pipeline's hot paths (at most ~5 minutes on one H100).

Sections (each prints one row of the final table):
  frames   JPEG decode of 224 px frames with PIL in a process pool, vs raw uint8 frames
           (np.frombuffer + copy), frames/s; JPEGs are synthesised in memory (no ffmpeg needed).
  features ViT-B/32 shapes from `CLIPConfig()` defaults, random init, bf16 + SDPA on CUDA:
           the stage-like path (pinned raw uint8 host frames -> device -> normalise -> vision
           tower + projection -> fp16 host copy) vs the bare forward on device tensors, same run.
  stage1   `pipeline.models.retrieval.RetrievalModel` (cache layer final, WTI, 4 temporal layers,
           D 512, 12 frames, 32 words) + gathered symmetric InfoNCE + AdamW, batch 128, from
           cached features already on the device: samples/s.
  stage2   `pipeline.models.denoiser.DenoiserPair` (D 512, hidden 512) trained as the stage does
           (hard-negative mining of 127 per query, q_sample, x0 cross-entropy, both directions):
           steps/s at batch 128.
  rerank   `pipeline.diffusion.rerank` of a 1k x 1k similarity (top 32, 50 DDIM steps): seconds.
CUDA is optional: without it (or with --tiny) everything runs at tiny sizes on the CPU so the
script can be smoke-tested; the numbers then say nothing about a GPU.

Imports only torch, transformers, numpy, PIL and pipeline modules that avoid mlflow, dvc and
ffmpeg-python (pandas/pyarrow come in through pipeline.features.dataset); `--check-imports`
prints the forbidden ones loaded (tests/test_bad_inputs.py asserts the list is empty).

Usage: python benchmarks/bench_gpu.py [--tiny] [--seconds 4] [--workers N] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
FORBIDDEN = ("mlflow", "dvc", "ffmpeg")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, seconds: float, warmup: int = 2,
          min_iters: int = 3) -> tuple[float, int]:
    """(seconds per call, calls) of `fn` after `warmup` calls, for about `seconds` of work."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n, n


def synth_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """[n, size, size, 3] uint8 smooth noise (compresses like natural frames, not like static)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float32)
    up = np.kron(base, np.ones((1, size // 8 + 1, size // 8 + 1, 1)))[:, :size, :size]
    return np.clip(up + rng.normal(0, 6, size=up.shape), 0, 255).astype(np.uint8)


def _jpeg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _decode_chunk(blobs: list[bytes]) -> int:
    """Decode JPEGs like `pipeline.video.shards.decode_jpeg` (PIL -> RGB uint8)."""
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            np.asarray(im.convert("RGB"))
    return len(blobs)


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------


def bench_frames(size: int, n: int, workers: int) -> dict[str, float]:
    frames = synth_frames(n, size)
    blobs = [_jpeg(f) for f in frames]
    chunks = [blobs[i:i + 64] for i in range(0, n, 64)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_chunk, chunks[:workers]))  # start the workers
        t0 = time.perf_counter()
        done = sum(pool.map(_decode_chunk, chunks))
        jpeg_s = time.perf_counter() - t0
    raw = [f.tobytes() for f in frames]
    t0 = time.perf_counter()
    for b in raw:
        np.frombuffer(b, np.uint8).reshape(size, size, 3).copy()
    raw_s = time.perf_counter() - t0
    return {"jpeg_pool_fps": done / jpeg_s, "raw_fps": n / raw_s, "workers": workers,
            "jpeg_kb": sum(map(len, blobs)) / n / 1024, "raw_kb": size * size * 3 / 1024}


def clip_config(tiny: bool):  # noqa: ANN201 - transformers type
    from transformers import CLIPConfig

    if not tiny:
        return CLIPConfig()  # ViT-B/32: 224 px, patch 32, 12 x 768 vision blocks, D 512
    return CLIPConfig(
        vision_config=dict(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32),
        projection_dim=32,
    )


def bench_features(tiny: bool, device: torch.device, batch: int, seconds: float
                   ) -> dict[str, float]:
    from transformers import CLIPModel

    cfg = clip_config(tiny)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = CLIPModel(cfg).to(device=device, dtype=dtype).eval()
    size = cfg.vision_config.image_size
    host = torch.from_numpy(synth_frames(batch, size))
    if device.type == "cuda":
        host = host.pin_memory()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def vision(pixels: torch.Tensor) -> torch.Tensor:
        out = model.vision_model(pixel_values=pixels)
        return model.visual_projection(out.pooler_output)

    @torch.no_grad()
    def stage_path() -> np.ndarray:
        x = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x / 255.0 - mean) / std).to(dtype)
        return vision(x).to(torch.float16).cpu().numpy()

    pixels = ((host.to(device).permute(0, 3, 1, 2).float() / 255.0 - mean) / std).to(dtype)

    @torch.no_grad()
    def bare() -> torch.Tensor:
        return vision(pixels)

    t_stage, _ = timed(stage_path, device, seconds)
    t_bare, _ = timed(bare, device, seconds)
    return {"stage_fps": batch / t_stage, "bare_fps": batch / t_bare, "batch": batch,
            "dtype": str(dtype).replace("torch.", "")}


def _retrieval(tiny: bool, device: torch.device):  # noqa: ANN202
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel

    cfg = clip_config(tiny)
    rcfg = RetrievalConfig(clip_config=cfg.to_dict(), cache_layer="final",
                           max_frames=4 if tiny else 12, similarity="wti",
                           temporal_layers=1 if tiny else 4, temporal_heads=2 if tiny else 8)
    torch.manual_seed(0)
    return RetrievalModel(rcfg).to(device), rcfg


def _autocast(device: torch.device):  # noqa: ANN202
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def bench_stage1(tiny: bool, device: torch.device, batch: int, seconds: float
                 ) -> dict[str, float]:
    from pipeline.losses import symmetric_info_nce

    model, rcfg = _retrieval(tiny, device)
    D, F, L = rcfg.dim, rcfg.max_frames, 8 if tiny else 32
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(batch, L, D, generator=g).half().to(device)
    tmask = torch.ones(batch, L, dtype=torch.bool, device=device)
    tmask[:, L // 2:] = torch.rand(batch, L - L // 2, generator=g).to(device) < 0.5
    eos = tmask.sum(1) - 1
    video = torch.randn(batch, F, D, generator=g).half().to(device)
    vmask = torch.ones(batch, F, dtype=torch.bool, device=device)
    groups = torch.arange(batch, device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with _autocast(device):
            t = model.encode_text(text, tmask, eos)
            v = model.encode_video(video, vmask)
            loss, _ = symmetric_info_nce(t, v, groups, model.similarity, model.scale())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_step, _ = timed(step, device, seconds)
    return {"samples_per_s": batch / t_step, "steps_per_s": 1 / t_step, "batch": batch}


def _stage2_inputs(n: int, dim: int, n_frames: int, device: torch.device):  # noqa: ANN202
    from pipeline.models.denoiser import VideoFeats

    g = torch.Generator(device="cpu").manual_seed(1)
    texts = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1).to(device)
    frames = torch.randn(n, n_frames, dim, generator=g).to(device)
    mask = torch.ones(n, n_frames, dtype=torch.bool, device=device)
    videos = VideoFeats(frames, mask, frames.mean(1))
    return texts, videos


def bench_stage2(tiny: bool, device: torch.device, batch: int, seconds: float
                 ) -> dict[str, float]:
    from pipeline.diffusion import (
        GaussianDiffusion,
        mine_batch,
        one_hot_target,
        positive_cross_entropy,
    )
    from pipeline.models.denoiser import DenoiserPair, NoisyCandidates

    D, H, heads, F = (32, 32, 2, 4) if tiny else (512, 512, 8, 12)
    torch.manual_seed(0)
    pair = DenoiserPair(D, H, heads).to(device)
    diffusion = GaussianDiffusion(50, "cosine").to(device)
    texts, videos = _stage2_inputs(batch, D, F, device)
    sim = texts @ torch.nn.functional.normalize(videos.pooled, dim=-1).T
    vid = torch.arange(batch, device=device)
    opt = torch.optim.AdamW(pair.parameters(), lr=1e-4)
    negatives = min(127, batch - 1)

    def noisy(mined):  # noqa: ANN001, ANN202
        x0 = one_hot_target(mined.mask)
        t = torch.randint(0, 50, (x0.shape[0],), device=device)
        return NoisyCandidates(mined.candidates, mined.mask,
                               diffusion.q_sample(x0, t, torch.randn_like(x0)), t)

    def step() -> None:
        t2v, v2t = mine_batch(sim, vid, negatives)
        with _autocast(device):
            a, b = pair(texts, videos, vid, noisy(t2v), noisy(v2t))
            loss = positive_cross_entropy(a, t2v.mask) + positive_cross_entropy(b, v2t.mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_step, _ = timed(step, device, seconds)
    n_params = sum(p.numel() for p in pair.parameters())
    return {"steps_per_s": 1 / t_step, "batch": batch, "params_M": n_params / 1e6}


def bench_rerank(tiny: bool, device: torch.device, n: int, seconds: float) -> dict[str, float]:
    from pipeline.diffusion import GaussianDiffusion, RerankSettings, rerank
    from pipeline.models.denoiser import DenoiserPair

    D, H, heads, F = (32, 32, 2, 4) if tiny else (512, 512, 8, 12)
    torch.manual_seed(0)
    denoiser = DenoiserPair(D, H, heads).t2v.to(device).eval()
    diffusion = GaussianDiffusion(50, "cosine").to(device)
    texts, videos = _stage2_inputs(n, D, F, device)
    sim = texts @ torch.nn.functional.normalize(videos.pooled, dim=-1).T
    ids = [f"q{i}" for i in range(n)]
    settings = RerankSettings(top_k=min(32, n), steps=5 if tiny else 50, chunk=1024)

    def run() -> torch.Tensor:
        with _autocast(device):
            return rerank(sim, denoiser, diffusion, texts, videos, ids, settings)

    t_run, _ = timed(run, device, seconds, warmup=1, min_iters=2)
    return {"seconds": t_run, "queries": n, "steps": settings.steps, "top_k": settings.top_k}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def check_imports() -> list[str]:
    """Import every pipeline module this script uses; return forbidden modules that got loaded."""
    import pipeline.diffusion  # noqa: F401
    import pipeline.losses  # noqa: F401
    import pipeline.models.denoiser  # noqa: F401
    import pipeline.models.retrieval  # noqa: F401

    return sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (implied without CUDA)")
    ap.add_argument("--seconds", type=float, default=4.0, help="timed work per measurement")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--check-imports", action="store_true",
                    help="only print the forbidden modules (mlflow, dvc, ffmpeg) imported")
    args = ap.parse_args(argv)
    if args.check_imports:
        print(json.dumps(check_imports()))
        return {}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    secs = min(args.seconds, 0.3) if tiny else args.seconds
    results: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    results["frames"] = bench_frames(32 if tiny else 224, 128 if tiny else 8192,
                                     min(args.workers, 2) if tiny else args.workers)
    results["features"] = bench_features(tiny, device, 8 if tiny else 512, secs)
    results["stage1"] = bench_stage1(tiny, device, 16 if tiny else 128, secs)
    results["stage2"] = bench_stage2(tiny, device, 16 if tiny else 128, secs)
    results["rerank"] = bench_rerank(tiny, device, 64 if tiny else 1000, secs)
    total = time.perf_counter() - t0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}{' (tiny sizes: not representative)' if tiny else ''}; "
          f"torch {torch.__version__}; {total:.0f} s")
    f, fe, s1, s2, rr = (results[k] for k in ("frames", "features", "stage1", "stage2",
                                              "rerank"))
    rows = [
        ("frames", "JPEG decode, PIL pool", f"{f['jpeg_pool_fps']:,.0f} frames/s",
         f"{int(f['workers'])} procs, {f['jpeg_kb']:.1f} KB/frame"),
        ("frames", "raw uint8 frames", f"{f['raw_fps']:,.0f} frames/s",
         f"{f['raw_kb']:.1f} KB/frame"),
        ("features", "uint8 host -> norm -> tower -> fp16 host", f"{fe['stage_fps']:,.0f} frames/s",
         f"batch {int(fe['batch'])}, {fe['dtype']}"),
        ("features", "bare vision forward", f"{fe['bare_fps']:,.0f} frames/s",
         f"stage path = {fe['stage_fps'] / fe['bare_fps']:.0%} of bare"),
        ("stage1", "train step (WTI, InfoNCE, AdamW)", f"{s1['samples_per_s']:,.0f} samples/s",
         f"batch {int(s1['batch'])}, {s1['steps_per_s']:.1f} steps/s"),
        ("stage2", "train step (both denoisers)", f"{s2['steps_per_s']:,.1f} steps/s",
         f"batch {int(s2['batch'])}, {s2['params_M']:.2f} M params"),
        ("rerank", f"{int(rr['queries'])} x {int(rr['queries'])} re-rank",
         f"{rr['seconds']:.3f} s", f"top {int(rr['top_k'])}, {int(rr['steps'])} DDIM steps"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    header = ("section", "what", "throughput", "notes")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "tiny": tiny, **results}, indent=2))
    return results


if __name__ == "__main__":
    main()
