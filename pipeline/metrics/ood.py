"""Out-of-distribution detection metrics. Convention: a higher score means "more OOD", and the
OOD queries are the positive class.

- AUROC = P(s_ood > s_id) + 0.5 * P(s_ood == s_id): the Mann-Whitney U statistic divided by
  n_ood * n_id, computed from average ranks of the pooled scores (ties get their mean rank).
- FPR@95TPR: a query is flagged OOD when its score >= a threshold; among all thresholds whose
  true-positive rate (share of OOD queries flagged) is at least 95%, take the largest one; report
  the share of in-distribution queries it flags. Tied scores are flagged together, so ties can
  only make it worse, never better.
"""
from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` [N] in ascending order, ties sharing their mean rank -> [N] float64."""
    x = np.asarray(x, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # last 1-based position of each distinct value
    starts = ends - counts + 1
    return ((starts + ends) / 2.0)[inverse]


def auroc(ood: np.ndarray, ind: np.ndarray) -> float:
    """Area under the ROC curve for separating OOD scores [P] from in-distribution scores [N]."""
    ood = np.asarray(ood, dtype=np.float64).ravel()
    ind = np.asarray(ind, dtype=np.float64).ravel()
    p, n = len(ood), len(ind)
    if p == 0 or n == 0:
        return float("nan")
    r = average_ranks(np.concatenate([ood, ind]))
    u = r[:p].sum() - p * (p + 1) / 2.0
    return float(u / (p * n))


def fpr_at_tpr(ood: np.ndarray, ind: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the largest threshold reaching `tpr` (flagged: score >= threshold)."""
    ood = np.sort(np.asarray(ood, dtype=np.float64).ravel())
    ind = np.sort(np.asarray(ind, dtype=np.float64).ravel())
    if len(ood) == 0 or len(ind) == 0:
        return float("nan")
    # Flagging the m highest OOD scores needs threshold ood[-m]; m = ceil(tpr * P) (with a tiny
    # tolerance so that e.g. 0.95 * 20 is 19, not 20 by float rounding).
    m = max(1, int(np.ceil(tpr * len(ood) - 1e-9)))
    thr = ood[len(ood) - m]
    flagged = len(ind) - np.searchsorted(ind, thr, side="left")  # ind >= thr
    return float(flagged / len(ind))


def ood_summary(ood: np.ndarray, ind: np.ndarray) -> dict[str, float]:
    """{'AUROC': ..., 'FPR95': ...} in percent, plus the two sample sizes."""
    return {
        "AUROC": 100.0 * auroc(ood, ind),
        "FPR95": 100.0 * fpr_at_tpr(ood, ind),
        "n_ood": float(len(np.ravel(ood))),
        "n_id": float(len(np.ravel(ind))),
    }
