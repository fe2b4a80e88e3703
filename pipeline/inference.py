"""Trained models for inference (evaluate, search, ood): loaded once, used many times.

- stage 1: `<paths.contrastive>/best` (`state.json["config"]` = RetrievalConfig.to_dict()),
- stage 2: `<paths.diffusion>/best` (DenoiserPair; `config` holds dim/hidden/heads), optional,
- the backbone (lazily, only for raw text or a new video file): its text tower turns a query into
  the same cache-format features the features stage wrote, rounded to the cache dtype, so a typed
  query and the same cached caption give the same stage-1 input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.config import Params
from pipeline.diffusion.schedule import GaussianDiffusion
from pipeline.errors import PipelineError
from pipeline.log import get_logger
from pipeline.models.denoiser import DenoiserPair
from pipeline.models.retrieval import RetrievalModel
from pipeline.training import checkpoint

log = get_logger(__name__)

CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def load_stage1(directory: str | Path, device: torch.device) -> RetrievalModel:
    """The stage-1 model of a checkpoint directory, in eval mode on `device`."""
    from pipeline.contrastive import load_model

    if not (Path(directory) / checkpoint.STATE_FILE).is_file():
        raise PipelineError(f"{directory}: no stage-1 checkpoint; run `dret train-contrastive`")
    return load_model(directory, device)


def load_denoisers(
    directory: str | Path, params: Params, device: torch.device
) -> tuple[DenoiserPair, GaussianDiffusion]:
    """The two stage-2 denoisers and their noise schedule, in eval mode on `device`."""
    state = checkpoint.load(directory).state
    cfg = state.get("config") or {}
    cfg = cfg.get("model", cfg)
    try:
        pair = DenoiserPair(int(cfg["dim"]), int(cfg["hidden"]), int(cfg["heads"]))
    except KeyError as exc:
        raise PipelineError(f"{directory}: denoiser config lacks {exc.args[0]!r}") from None
    checkpoint.load_weights(directory, pair)
    diffusion = GaussianDiffusion(int(cfg.get("timesteps", params.diffusion.timesteps)),
                                  str(cfg.get("schedule", params.diffusion.schedule)))
    return pair.to(device).eval(), diffusion.to(device)


@dataclass
class Models:
    """Stage-1 model, optional denoisers + schedule, and the lazily loaded backbone."""

    params: Params
    stage1: RetrievalModel
    denoisers: DenoiserPair | None
    diffusion: GaussianDiffusion | None
    device: torch.device
    root: Path = field(default_factory=Path.cwd)  # relative params paths resolve against it
    _encoder: Any = None

    @classmethod
    def load(cls, params: Params, device: torch.device | None = None, rerank: bool = True,
             root: str | Path | None = None) -> Models:
        """Load from `<contrastive>/best` (+ `<diffusion>/best` when `rerank`)."""
        device = device or torch.device("cpu")
        base = Path(root) if root is not None else Path.cwd()
        stage1 = load_stage1(resolve(base, params.paths.contrastive) / "best", device)
        denoisers = diffusion = None
        if rerank:
            ddir = resolve(base, params.paths.diffusion) / "best"
            if not (ddir / checkpoint.MODEL_FILE).is_file():
                raise PipelineError(f"{ddir}: no stage-2 checkpoint; run `dret train-diffusion` "
                                    "or use --no-rerank / evaluate.rerank: false")
            denoisers, diffusion = load_denoisers(ddir, params, device)
        return cls(params, stage1, denoisers, diffusion, device, base)

    @property
    def encoder(self) -> Any:
        """The features stage's `Encoder` over the recorded backbone, built on first use."""
        if self._encoder is None:
            from pipeline.features.backbone import load_backbone
            from pipeline.features.extract import Encoder

            record = resolve(self.root, self.params.paths.backbone) / "backbone.json"
            f = self.params.features
            self._encoder = Encoder(load_backbone(record), f.cache_layer, f.max_words,
                                    self.device)
        return self._encoder


def resolve(root: Path, path: str | Path) -> Path:
    """`path` as given when it exists or is absolute, else relative to `root`."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else root / p


@torch.no_grad()
def encode_texts(models: Models, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Raw texts -> cache-format text features (feats [M, L, H|D] float32, mask [M, L], eos [M])
    exactly as the features stage computes them, rounded through the cache dtype."""
    out = models.encoder.texts(texts)
    feats = torch.from_numpy(out["feats"]).to(CACHE_DTYPES[models.params.features.dtype]).float()
    return feats, torch.from_numpy(out["mask"]).bool(), torch.from_numpy(out["eos"]).long()


@torch.no_grad()
def encode_video_file(models: Models, path: str | Path) -> tuple[Tensor, Tensor, np.ndarray]:
    """A new video file -> cache-format features [1, F, ...] float32, mask [1, F], timestamps [F].

    Frames are sampled as the frames stage samples them (`frames.*` params), pass through the
    stored frame format (JPEG round trip when `frames.format: jpeg`) and the cache dtype.
    """
    from pipeline.video.sample import DecodeError, decode
    from pipeline.video.shards import decode_jpeg, encode_frames

    cfg = models.params.frames
    try:
        frames, ts, _ = decode(str(path), float("nan"), cfg)
    except DecodeError as exc:
        raise PipelineError(f"{path}: cannot sample frames ({exc})") from None
    if cfg.format == "jpeg":
        frames = np.stack([decode_jpeg(b) for b in encode_frames(frames, "jpeg", cfg.jpeg_quality)])
    feats = torch.from_numpy(models.encoder.frames(frames))  # (F, D) or (F, T, H)
    feats = feats.to(CACHE_DTYPES[models.params.features.dtype]).float()
    return feats[None], torch.ones(1, feats.shape[0], dtype=torch.bool), np.asarray(ts, float)
