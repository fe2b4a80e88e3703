"""Retrieval ranks and recall metrics.

Tie rule: rank = 1 + number of candidates scored strictly higher than the ground truth, so a tie
with the ground truth never costs it a place (optimistic, as most field code that sorts with a
stable argsort against the diagonal is not; ours does not depend on candidate order).

Multi-caption protocol (MSVD and every dataset with several captions per video):

- text-to-video: every caption is a query; its ground truth is its video (`ranks`).
- video-to-text: the gallery is captions grouped by video. A video's score for video query `v`
  is the best score any of that video's captions gets, `b(v, u) = max_{c in C(u)} s(v, c)`, and

      rank(v) = 1 + #{u != v : b(v, u) > b(v, v)}

  i.e. the query counts as correct at rank r when its own best caption is outranked by the best
  captions of fewer than r other videos (`grouped_ranks`). With one caption per video this is the
  ordinary rank. A video with no caption in the gallery scores -inf.
"""
from __future__ import annotations

import numpy as np
import torch


def ranks(sim: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> np.ndarray:
    """1-based rank of the ground-truth column per row. sim [Q, G], gt [Q] int -> [Q] int64."""
    s = torch.as_tensor(sim)
    g = torch.as_tensor(gt, dtype=torch.long, device=s.device)
    target = s.gather(1, g[:, None])  # (Q, 1)
    return ((s > target).sum(1) + 1).cpu().numpy().astype(np.int64)


def group_max(
    sim: torch.Tensor | np.ndarray, group: torch.Tensor | np.ndarray, n_groups: int
) -> torch.Tensor:
    """Best score per group. sim [Q, C], group [C] in [0, G) -> [Q, G] (-inf for an empty group)."""
    s = torch.as_tensor(sim)
    g = torch.as_tensor(group, dtype=torch.long, device=s.device)
    out = torch.full((s.shape[0], n_groups), float("-inf"), dtype=s.dtype, device=s.device)
    return out.scatter_reduce(1, g[None].expand_as(s), s, reduce="amax", include_self=True)


def grouped_ranks(
    sim: torch.Tensor | np.ndarray,
    group: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    n_groups: int | None = None,
) -> np.ndarray:
    """Multi-caption video-to-text ranks (see module docstring).

    sim [Q, C] scores of Q video queries against C captions; group [C] the video index of each
    caption; gt [Q] the video index of each query -> [Q] int64 ranks in [1, n_groups].
    """
    g = torch.as_tensor(group, dtype=torch.long)
    n = int(n_groups if n_groups is not None else (int(g.max()) + 1 if g.numel() else 0))
    return ranks(group_max(sim, g, n), gt)


def recall_summary(r: np.ndarray, ks: tuple[int, ...] = (1, 5, 10, 50)) -> dict[str, float]:
    """R@K (percent), MdR, MnR from 1-based ranks [Q]."""
    r = np.asarray(r, dtype=np.float64)
    out = {f"R{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def recall_curve(r: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """R@K in percent for each K in `ks` from 1-based ranks [Q] -> [len(ks)] float64."""
    r = np.sort(np.asarray(r, dtype=np.int64))
    return 100.0 * np.searchsorted(r, np.asarray(ks), side="right") / max(len(r), 1)


def bootstrap_ci(
    values: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    max_elements: int = 1 << 22,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of per-query `values` [Q] (resampling queries).

    For R@K pass `100 * (ranks <= K)`. Resamples are drawn in blocks of at most `max_elements`
    indices, so memory stays bounded for any Q; the result depends only on (values, n_boot, seed).
    """
    v = np.asarray(values, dtype=np.float64)
    q = len(v)
    if q == 0 or n_boot <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    block = max(1, max_elements // q)
    means = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, block):  # blocks of resamples, not queries
        stop = min(n_boot, start + block)
        idx = rng.integers(0, q, size=(stop - start, q))
        means[start:stop] = v[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))
