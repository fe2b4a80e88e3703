"""Candidate mining for stage-2 training: per query, its positive + the hardest in-batch negatives.

A batch holds B captions and, column for column, the video of each caption, so the same video
can occur several times (several captions of one video). Rules, for both directions:
- a column that is a positive of the row (same video) is never a negative;
- a video occurring several times in the batch is offered once as a t2v negative;
- when fewer eligible negatives exist than asked for, the list is padded and masked.
The positive always sits at index 0, so the diffusion target x0 is one-hot at index 0 (the
denoiser is permutation-equivariant: the position carries no information).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Mined(NamedTuple):
    """candidates [B, 1 + n] column indices (positive first), mask [B, 1 + n] bool (valid)."""

    candidates: Tensor
    mask: Tensor


def hardest(scores: Tensor, positive: Tensor, eligible: Tensor, n_neg: int) -> Mined:
    """Positive + the n_neg highest-scoring eligible columns per row.

    scores [B, C] stage-1 scores; positive [B] column of each row's positive; eligible [B, C] bool
    (columns allowed as negatives). -> Mined with width 1 + min(n_neg, C).
    """
    k = min(n_neg, scores.shape[1])
    masked = scores.float().masked_fill(~eligible, float("-inf"))
    vals, idx = masked.topk(k, dim=1)  # (B, k), hardest first
    ok = torch.isfinite(vals)
    idx = torch.where(ok, idx, positive[:, None])  # padding points somewhere valid, but masked
    cands = torch.cat([positive[:, None], idx], dim=1)
    mask = torch.cat([torch.ones_like(ok[:, :1]), ok], dim=1)
    return Mined(cands, mask)


def mine_batch(sim: Tensor, video_of: Tensor, n_neg: int) -> tuple[Mined, Mined]:
    """Mine both directions of one batch.

    sim [B, B]: stage-1 score of caption i with the video of caption j; video_of [B] int codes of
    each caption's video. t2v rows = captions, columns = batch videos (column j = video of
    caption j, positive column i); v2t rows = the video of caption i, columns = captions
    (positive column i). Returns (t2v, v2t).
    """
    B = sim.shape[0]
    same = video_of[:, None] == video_of[None, :]  # (B, B) shares the video
    earlier = torch.ones(B, B, dtype=torch.bool, device=sim.device).tril(-1)  # row j' < col j
    first = ~(same & earlier).any(dim=1)  # (B,) column j is its video's first occurrence
    pos = torch.arange(B, device=sim.device)
    t2v = hardest(sim, pos, ~same & first[None, :], n_neg)
    v2t = hardest(sim.t(), pos, ~same, n_neg)
    return t2v, v2t


def one_hot_target(mask: Tensor) -> Tensor:
    """x0 = one-hot at index 0 (the positive). mask [B, K] -> [B, K] float."""
    x0 = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    x0[:, 0] = 1.0
    return x0
