"""DiffusionRet stage 1 ("discrimination"): the text-video retrieval model.

Cached backbone features go through what was not cached of the backbone (the CLIP blocks after
`features.cache_layer`, final norms and projections: `clip_split`), frames through a temporal
transformer, and text x video pairs are scored with WTI or, as a baseline, with the cosine of
the EOS sentence feature and the mean-pooled frames. The model only computes features and
scores; the loss, gathering across ranks and the training loop live elsewhere.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Union

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel

from pipeline.features.dataset import reverse_frames
from pipeline.models.clip_split import TextTail, VisionTail
from pipeline.models.temporal import TemporalTransformer
from pipeline.models.wti import TokenWeights, cosine_scores, masked_mean, wti_scores

MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class RetrievalConfig:
    """Everything needed to rebuild the model (the backbone's architecture included)."""

    clip_config: dict[str, Any] = field(repr=False)  # CLIPConfig.to_dict() of the backbone
    cache_layer: Union[int, Literal["final"]]  # blocks that ran before caching ("final": all)
    max_frames: int  # rows of the frame position table
    similarity: Literal["wti", "mean"] = "wti"
    temporal_layers: int = 4
    temporal_heads: int = 8
    logit_scale: float = 100.0  # initial (or fixed) multiplier of the scores in the loss
    learn_logit_scale: bool = False
    layout_dim: int = 0  # per-patch channels of the temporal transformer's layout input (0: off)
    chunk_elems: int = 1 << 24  # largest [m, n, L, F] block of the WTI cosine tensor

    @property
    def dim(self) -> int:
        """Joint embedding size D (the backbone's projection dim)."""
        return int(self.clip_config["projection_dim"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown RetrievalConfig keys: {unknown}")
        return cls(**data)


class FrameLayout(nn.Module):
    """Where what is in a frame: each cached patch token [P, H] -> `channels` numbers, the P x
    channels map (patch order = position) -> one D vector for the temporal transformer's input.

    Only the temporal transformer reads it, so order and motion can be learnt from positions
    without the frame embeddings (which WTI matches against words) having to encode them.
    """

    def __init__(self, hidden: int, patches: int, channels: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.reduce = nn.Linear(hidden, channels)
        self.out = nn.Linear(patches * channels, dim)

    def forward(self, patches: Tensor) -> Tensor:
        """[V, P, H] patch tokens -> [V, D]."""
        z = self.reduce(self.norm(patches.to(self.reduce.weight.dtype)))  # (V, P, channels)
        return self.out(z.flatten(1))


class TextOut(NamedTuple):
    """Encoded captions: tokens [M, L, D], mask [M, L] bool, sentence [M, D] (EOS token)."""

    tokens: Tensor
    mask: Tensor
    sentence: Tensor


class VideoOut(NamedTuple):
    """Encoded clips: frames [N, F, D] (after the temporal transformer), mask [N, F] bool,
    pooled [N, D] (mean of the valid frames)."""

    frames: Tensor
    mask: Tensor
    pooled: Tensor


class PairBatch(NamedTuple):
    """A training batch of P = B + R caption-clip pairs as cached features.

    text_feats [P, L, H|D], text_mask [P, L] bool, text_eos [P] int64;
    video_feats [B, F, T, H] (cache layer k) or [B, F, D] (final), video_mask [B, F] bool;
    backwards [R] int64: rows of video_feats whose clip, played backwards, is the video of pairs
    B..P-1 (in this order); groups [P] int64: identity of each pair's clip (equal = same clip).
    """

    text_feats: Tensor
    text_mask: Tensor
    text_eos: Tensor
    video_feats: Tensor
    video_mask: Tensor
    backwards: Tensor
    groups: Tensor


class RetrievalModel(nn.Module):
    """Text and video towers over cached features, plus the WTI / mean-pooling similarity.

    `clip`: the backbone whose blocks after the cache layer initialise the towers; None builds a
    randomly initialised one from `cfg.clip_config` (for loading trained weights).
    """

    def __init__(self, cfg: RetrievalConfig, clip: CLIPModel | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if clip is None and cfg.cache_layer != "final":
            clip = CLIPModel(CLIPConfig.from_dict(cfg.clip_config))
        D = cfg.dim
        # "final": the cache holds projected outputs already; nothing of the backbone is left
        self.text_tail: TextTail | None = None
        self.vision_tail: VisionTail | None = None
        if cfg.cache_layer != "final":
            self.text_tail = TextTail(clip, cfg.cache_layer)
            self.vision_tail = VisionTail(clip, cfg.cache_layer)
        self.temporal = TemporalTransformer(D, cfg.temporal_layers, cfg.temporal_heads,
                                            cfg.max_frames)
        self.layout: FrameLayout | None = None
        if cfg.layout_dim > 0:
            if self.vision_tail is None or not cfg.temporal_layers:
                raise ValueError("layout_dim needs cached patch tokens (cache_layer < final) and "
                                 "a temporal transformer (temporal_layers > 0)")
            vc = clip.config.vision_config
            patches = (vc.image_size // vc.patch_size) ** 2
            self.layout = FrameLayout(vc.hidden_size, patches, cfg.layout_dim, D)
        if cfg.similarity == "wti":
            self.text_weights = TokenWeights(D)
            self.frame_weights = TokenWeights(D)
        # log of the multiplier, as in CLIP; a fixed scale is a parameter without gradient
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale)),
                                        requires_grad=cfg.learn_logit_scale)

    # -- towers ---------------------------------------------------------------------------------

    def encode_text(self, feats: Tensor, mask: Tensor, eos: Tensor) -> TextOut:
        """feats [M, L, H|D] cached tokens, mask [M, L] bool, eos [M] -> TextOut."""
        if self.text_tail is None:
            tokens = feats.float()  # (M, L, D) already normed and projected
            sentence = tokens[torch.arange(tokens.shape[0], device=tokens.device), eos]
        else:
            tokens, sentence = self.text_tail(feats, mask, eos)  # (M, L, D), (M, D)
        return TextOut(tokens, mask, sentence)

    def encode_video(self, feats: Tensor, mask: Tensor,
                     backwards: Tensor | None = None) -> VideoOut:
        """feats [N, F, T, H] (cache layer k) or [N, F, D] (final), mask [N, F] bool -> VideoOut.

        Only valid frames go through the vision blocks; padding frames are zeros. `backwards`
        [R] appends clips feats[backwards] played backwards (N + R outputs): the per-frame blocks
        see frames independently, so their outputs are reordered instead of recomputed (exact).
        """
        N, F = mask.shape
        cached = feats[mask]  # (V, T, H) or (V, D), V = valid frames
        rows = cached.float() if self.vision_tail is None else self.vision_tail(cached)  # (V, D)
        if self.layout is not None:  # + the layout of the patch tokens (CLS dropped): (V, 2D)
            rows = torch.cat([rows, self.layout(cached[:, 1:]).to(rows.dtype)], dim=-1)
        grid = rows.new_zeros(N, F, rows.shape[-1]).index_put((mask,), rows)
        if backwards is not None and backwards.numel():
            grid = torch.cat([grid, reverse_frames(grid[backwards], mask[backwards])])
            mask = torch.cat([mask, mask[backwards]])
        frames, layout = grid, None
        if self.layout is not None:
            frames, layout = grid.chunk(2, dim=-1)
        frames = self.temporal(frames, mask, layout)  # (N + R, F, D)
        return VideoOut(frames, mask, masked_mean(frames, mask))

    def forward(self, batch: PairBatch) -> tuple[TextOut, VideoOut]:
        """Both towers on one batch (the entry point DDP wraps)."""
        text = self.encode_text(batch.text_feats, batch.text_mask, batch.text_eos)
        video = self.encode_video(batch.video_feats, batch.video_mask, batch.backwards)
        return text, video

    # -- scores ---------------------------------------------------------------------------------

    def similarity(self, text: TextOut, video: VideoOut) -> Tensor:
        """Unscaled scores [M, N] in [-1, 1] of every caption with every clip."""
        if self.cfg.similarity == "mean":
            return cosine_scores(text.sentence, video.pooled)
        tw = self.text_weights(text.tokens, text.mask)  # (M, L)
        vw = self.frame_weights(video.frames, video.mask)  # (N, F)
        return wti_scores(text.tokens, text.mask, tw, video.frames, video.mask, vw,
                          chunk_elems=self.cfg.chunk_elems)

    def scale(self) -> Tensor:
        """The loss's logit multiplier exp(logit_scale), capped at 100 (scalar)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
