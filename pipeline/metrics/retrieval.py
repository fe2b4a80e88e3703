"""Retrieval ranks and recall metrics.

Tie rule: rank = 1 + number of candidates scored strictly higher than the ground truth, so a tie
with the ground truth never costs it a place (optimistic, as most field code that sorts with a
stable argsort against the diagonal is not; ours does not depend on candidate order).
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


def recall_summary(r: np.ndarray, ks: tuple[int, ...] = (1, 5, 10, 50)) -> dict[str, float]:
    """R@K (percent), MdR, MnR from 1-based ranks [Q]."""
    r = np.asarray(r, dtype=np.float64)
    out = {f"R{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out
