"""The search index: precomputed stage-1 representations of a collection (written by evaluate).

`index/` holds everything a query needs besides the two small model checkpoints, so searching
never runs the backbone's vision tower nor reads frame shards:

- `videos.parquet`: video_id, path (absolute or as resolvable from the working directory),
  split, timestamps list<float64> (seconds of the sampled frames); row i = tensor row i.
- `video.safetensors`: `frames` [N, F, D], `mask` [N, F] bool, `pooled` [N, D] (stage-1 video
  tower outputs, in `evaluate.index_dtype`), `weights` [N, F] float32 (WTI frame weights of the
  stored frames: query-independent, so a query never recomputes them).
- `captions.parquet` + `text.safetensors` (`tokens` [M, L', D], `mask` [M, L'], `sentence`
  [M, D]): the collection's captions for video-to-text search; L' = the longest caption.
- `manifest.json`: format version, the params that built it (paths to checkpoints and backbone,
  rerank settings, seed, feature dtype), the backbone fingerprint, the repo root at build time.

The evaluate stage scores its test split with exactly these tensors, so a search against
`split="test"` reproduces the evaluation's rankings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, write_json, write_parquet
from pipeline.models.retrieval import TextOut, VideoOut

INDEX_VERSION = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def round_video(v: VideoOut, dtype: str) -> VideoOut:
    """The video outputs as the index stores them (dtype round trip), back in float32."""
    dt = DTYPES[dtype]
    return VideoOut(v.frames.to(dt).float(), v.mask.bool(), v.pooled.to(dt).float())


def trim_text(t: TextOut) -> TextOut:
    """Drop trailing token positions that no caption uses (WTI ignores masked positions)."""
    used = int(t.mask.any(0).nonzero().max()) + 1 if t.mask.any() else 1
    return TextOut(t.tokens[:, :used], t.mask[:, :used], t.sentence)


@dataclass
class SearchIndex:
    """Tables + tensors of an index; rows of `videos`/`captions` are rows of `video`/`text`."""

    videos: pd.DataFrame
    video: VideoOut
    video_w: Tensor  # [N, F] WTI frame weights (query-independent)
    captions: pd.DataFrame
    text: TextOut
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        if len(self.videos) != self.video.frames.shape[0]:
            raise ValueError("videos table and video tensors disagree in length")
        if len(self.captions) != self.text.tokens.shape[0]:
            raise ValueError("captions table and text tensors disagree in length")

    # -- selection -----------------------------------------------------------------------------
    def video_rows(self, split: str | None = None) -> Tensor:
        """Row indices [n] of the videos of `split` (all when None), in index order."""
        if split is None:
            return torch.arange(len(self.videos))
        return torch.from_numpy(np.flatnonzero(self.videos["split"].to_numpy() == split))

    def caption_rows(self, split: str | None = None) -> Tensor:
        """Row indices [m] of the captions of `split` (all when None)."""
        if split is None:
            return torch.arange(len(self.captions))
        return torch.from_numpy(np.flatnonzero(self.captions["split"].to_numpy() == split))

    def video_subset(self, rows: Tensor) -> tuple[VideoOut, Tensor]:
        """(video outputs, frame weights) of the given rows."""
        return VideoOut(*(x[rows] for x in self.video)), self.video_w[rows]

    def text_subset(self, rows: Tensor) -> TextOut:
        return TextOut(*(x[rows] for x in self.text))

    # -- I/O ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the index directory atomically (tensors in manifest['dtype'])."""
        dt = DTYPES[self.manifest["dtype"]]
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            write_parquet(tmp / "videos.parquet",
                          pa.Table.from_pandas(self.videos, preserve_index=False))
            write_parquet(tmp / "captions.parquet",
                          pa.Table.from_pandas(self.captions, preserve_index=False))
            save_file({"frames": self.video.frames.to(dt).contiguous().cpu(),
                       "mask": self.video.mask.bool().contiguous().cpu(),
                       "pooled": self.video.pooled.to(dt).contiguous().cpu(),
                       "weights": self.video_w.float().contiguous().cpu()},
                      str(tmp / "video.safetensors"))
            save_file({"tokens": self.text.tokens.to(dt).contiguous().cpu(),
                       "mask": self.text.mask.bool().contiguous().cpu(),
                       "sentence": self.text.sentence.to(dt).contiguous().cpu()},
                      str(tmp / "text.safetensors"))
            write_json(tmp / "manifest.json", {**self.manifest, "version": INDEX_VERSION})
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> SearchIndex:
        """Read an index directory; tensors come back as float32 on `device`."""
        folder = Path(folder)
        needed = ("manifest.json", "videos.parquet", "video.safetensors", "captions.parquet",
                  "text.safetensors")
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise PipelineError(f"{folder}: not a search index ({', '.join(missing)} missing); "
                                "run `dret evaluate` first")
        manifest = read_json(folder / "manifest.json")
        if manifest.get("version") != INDEX_VERSION:
            raise PipelineError(f"{folder}: index version {manifest.get('version')} is not "
                                f"{INDEX_VERSION}; re-run `dret evaluate`")
        dev = str(device)
        v = load_file(str(folder / "video.safetensors"), device=dev)
        t = load_file(str(folder / "text.safetensors"), device=dev)
        return cls(
            videos=pd.read_parquet(folder / "videos.parquet"),
            video=VideoOut(v["frames"].float(), v["mask"].bool(), v["pooled"].float()),
            video_w=v["weights"].float(),
            captions=pd.read_parquet(folder / "captions.parquet"),
            text=TextOut(t["tokens"].float(), t["mask"].bool(), t["sentence"].float()),
            manifest=manifest,
        )
