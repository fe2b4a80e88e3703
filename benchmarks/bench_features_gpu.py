"""Feature extraction at ViT-B/32 shapes: bare forward vs raw uint8 vs JPEG input, to HDF5.

Random-init CLIPConfig() defaults (ViT-B/32: 224 px, patch 32, 12 x 768 vision blocks, D = 512),
bf16 + SDPA on CUDA. Measures, in frames/s:
- bare: vision tower on batches already on the device (final = projected CLS; layer0 = the
  hidden state entering block 0, i.e. embeddings + pre_layrnorm);
- raw: pinned uint8 host frames -> device -> normalise -> forward -> fp16 host -> HDF5 write;
- jpeg: the same from JPEG bytes (quality 90) decoded with PIL in a thread pool, decode
  overlapped with the GPU through a bounded queue; and decode alone.
Without CUDA it runs on CPU with tiny sizes (--tiny is implied) so it can be smoke-tested.
Standalone on purpose: imports only torch, transformers, h5py, numpy and PIL.

Usage: python benchmarks/bench_features_gpu.py [--frames 8192] [--batch 256] [--workers 16]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def build(tiny: bool, device: torch.device, dtype: torch.dtype) -> CLIPModel:
    torch.manual_seed(0)
    if tiny:
        cfg = CLIPConfig(
            vision_config=dict(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=128),
            text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64),
            projection_dim=32,
        )
    else:
        cfg = CLIPConfig()  # ViT-B/32 shapes
    cfg._attn_implementation = "sdpa"
    return CLIPModel(cfg).to(device=device, dtype=dtype).eval()


def synth_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """[n, size, size, 3] uint8 smooth noise (compresses like natural frames, not like static)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float32)
    up = np.kron(base, np.ones((1, size // 8 + 1, size // 8 + 1, 1)))[:, :size, :size]
    return np.clip(up + rng.normal(0, 6, size=up.shape), 0, 255).astype(np.uint8)


def jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def unjpeg(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class Runner:
    """uint8 frames on the host -> features on the host (final [B, D] or layer0 [B, T, H])."""

    def __init__(self, model: CLIPModel, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
        return ((x - self.mean) / self.std).to(self.dtype)

    @torch.inference_mode()
    def forward(self, px: torch.Tensor, layer0: bool = False) -> torch.Tensor:
        vm = self.model.vision_model
        if layer0:
            return vm.pre_layrnorm(vm.embeddings(px))
        return self.model.visual_projection(vm(pixel_values=px).pooler_output)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def bare(run: Runner, frames: np.ndarray, batch: int, layer0: bool) -> float:
    batches = [run.pixels(torch.from_numpy(frames[i : i + batch]))
               for i in range(0, len(frames), batch)]
    run.forward(batches[0], layer0)  # warm-up
    run.sync()
    t0 = time.perf_counter()
    for px in batches:
        run.forward(px, layer0)
    run.sync()
    return len(frames) / (time.perf_counter() - t0)


def to_h5(run: Runner, source: queue.Queue | list, n: int, batch: int, path: Path,
          layer0: bool) -> float:
    """Pipeline from host uint8 batches (a list, or a queue fed by decoders) to an fp16 HDF5."""
    probe = run.forward(run.pixels(torch.zeros(1, *source_shape(run), 3, dtype=torch.uint8)),
                        layer0)
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("feats", shape=(n, *probe.shape[1:]), dtype=np.float16,
                              chunks=(1, *probe.shape[1:]))
        done = 0
        while done < n:
            host = source.get() if isinstance(source, queue.Queue) else source[done // batch]
            out = run.forward(run.pixels(host), layer0)
            ds[done : done + len(host)] = out.to(torch.float16).cpu().numpy()
            done += len(host)
    return n / (time.perf_counter() - t0)


def source_shape(run: Runner) -> tuple[int, int]:
    s = run.model.config.vision_config.image_size
    return (s, s)


def pinned(frames: np.ndarray, batch: int, cuda: bool) -> list[torch.Tensor]:
    out = [torch.from_numpy(frames[i : i + batch]) for i in range(0, len(frames), batch)]
    return [t.pin_memory() for t in out] if cuda else out


def decode_feed(blobs: list[bytes], batch: int, workers: int, cuda: bool) -> queue.Queue:
    """Decode JPEG batches in a thread pool in the background; a bounded queue of uint8 batches."""
    q: queue.Queue = queue.Queue(maxsize=4)

    def work() -> None:
        with ThreadPoolExecutor(workers) as pool:
            for i in range(0, len(blobs), batch):
                t = torch.from_numpy(np.stack(list(pool.map(unjpeg, blobs[i : i + batch]))))
                q.put(t.pin_memory() if cuda else t)

    threading.Thread(target=work, daemon=True).start()
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=0, help="default 8192 on GPU, 64 on CPU")
    ap.add_argument("--batch", type=int, default=0, help="default 256 on GPU, 16 on CPU")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tiny", action="store_true", help="tiny model (implied without CUDA)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tiny = args.tiny or not cuda
    n = args.frames or (8192 if cuda else 64)
    batch = args.batch or (256 if cuda else 16)
    model = build(tiny, device, dtype)
    run = Runner(model, device, dtype)
    size = model.config.vision_config.image_size
    frames = synth_frames(n, size)
    t0 = time.perf_counter()
    blobs = [jpeg(f) for f in frames]
    encode_s = time.perf_counter() - t0
    res: dict[str, float | str | int] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
        "model": "tiny" if tiny else "ViT-B/32 (CLIPConfig defaults, random init)",
        "frames": n, "batch": batch, "workers": args.workers, "image_size": size,
        "raw_bytes_per_frame": size * size * 3,
        "jpeg_bytes_per_frame": round(sum(map(len, blobs)) / n),
        "jpeg_encode_fps_1core": round(n / encode_s),
    }
    res["bare_final_fps"] = bare(run, frames, batch, layer0=False)
    res["bare_layer0_fps"] = bare(run, frames, batch, layer0=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(unjpeg, blobs))
    res["jpeg_decode_fps"] = n / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        for layer0 in (False, True):
            tag = "layer0" if layer0 else "final"
            res[f"raw_to_h5_{tag}_fps"] = to_h5(run, pinned(frames, batch, cuda), n, batch,
                                                Path(tmp) / f"raw-{tag}.h5", layer0)
            res[f"jpeg_to_h5_{tag}_fps"] = to_h5(run, decode_feed(blobs, batch, args.workers, cuda),
                                                 n, batch, Path(tmp) / f"jpeg-{tag}.h5", layer0)
            size_b = (Path(tmp) / f"raw-{tag}.h5").stat().st_size
            res[f"h5_bytes_per_frame_{tag}"] = round(size_b / n)
    for k, v in res.items():
        print(f"{k:<28} {v:,.0f}" if isinstance(v, float) else f"{k:<28} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
