"""Retrieval and OOD metrics against brute-force references, ties included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics.ood import auroc, average_ranks, fpr_at_tpr, ood_summary
from pipeline.metrics.retrieval import (
    bootstrap_ci,
    group_max,
    grouped_ranks,
    ranks,
    recall_curve,
    recall_summary,
)


def _brute_ranks(sim: np.ndarray, gt: np.ndarray) -> np.ndarray:
    out = []
    for q in range(sim.shape[0]):
        target = sim[q, gt[q]]
        out.append(1 + sum(1 for c in range(sim.shape[1]) if sim[q, c] > target))
    return np.array(out)


def _brute_grouped(sim: np.ndarray, group: np.ndarray, gt: np.ndarray, n: int) -> np.ndarray:
    out = []
    for q in range(sim.shape[0]):
        best = [max((sim[q, c] for c in range(sim.shape[1]) if group[c] == u), default=-np.inf)
                for u in range(n)]
        out.append(1 + sum(1 for u in range(n) if u != gt[q] and best[u] > best[gt[q]]))
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, 4, size=(40, 25)).astype(np.float32)  # many exact ties
    gt = rng.integers(0, 25, size=40)
    assert np.array_equal(ranks(sim, gt), _brute_ranks(sim, gt))
    assert np.array_equal(ranks(torch.from_numpy(sim), torch.from_numpy(gt)), _brute_ranks(sim, gt))


def test_tie_with_ground_truth_is_optimistic_and_order_free() -> None:
    sim = np.array([[0.5, 0.5, 0.5], [0.9, 0.5, 0.5]])
    assert ranks(sim, np.array([2, 2])).tolist() == [1, 2]
    perm = [2, 0, 1]
    assert ranks(sim[:, perm], np.array([0, 0])).tolist() == [1, 2]


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_ranks_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_videos, n_caps = 12, 40
    group = rng.integers(0, n_videos, size=n_caps)
    group[-1] = n_videos - 2  # keep video n-1 caption-less: it scores -inf
    group[group == n_videos - 1] = 0
    sim = rng.integers(0, 5, size=(n_videos, n_caps)).astype(np.float64)
    gt = np.arange(n_videos)
    got = grouped_ranks(sim, group, gt, n_videos)
    assert np.array_equal(got, _brute_grouped(sim, group, gt, n_videos))
    best = group_max(sim, group, n_videos)
    assert torch.isinf(best[:, -1]).all()  # caption-less video: last behind every finite score
    assert got[-1] == 1 + torch.isfinite(best[-1]).sum().item()


def test_grouped_ranks_single_caption_equals_plain_ranks() -> None:
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(9, 9))
    perm = rng.permutation(9)  # caption c belongs to video perm[c]
    gt = np.arange(9)
    plain = ranks(sim[:, np.argsort(perm)], gt)
    assert np.array_equal(grouped_ranks(sim, perm, gt, 9), plain)


def test_multi_caption_example() -> None:
    # video 0 has captions 0, 1; video 1 has caption 2; video 2 has captions 3, 4
    group = np.array([0, 0, 1, 2, 2])
    sim = np.array([
        [0.1, 0.7, 0.8, 0.2, 0.3],  # best own 0.7 < video 1's 0.8 -> rank 2
        [0.9, 0.1, 0.5, 0.2, 0.2],  # own 0.5 < video 0's 0.9 -> rank 2
        [0.1, 0.2, 0.3, 0.1, 0.6],  # own 0.6 is best -> rank 1
    ])
    assert grouped_ranks(sim, group, np.arange(3)).tolist() == [2, 2, 1]


def test_recall_summary_and_curve() -> None:
    r = np.array([1, 1, 2, 5, 11, 60])
    s = recall_summary(r, (1, 5, 10, 50))
    assert s["R1"] == pytest.approx(100 * 2 / 6)
    assert s["R5"] == pytest.approx(100 * 4 / 6)
    assert s["R50"] == pytest.approx(100 * 5 / 6)
    assert s["MdR"] == 3.5 and s["MnR"] == pytest.approx(80 / 6)
    curve = recall_curve(r, np.array([1, 5, 10, 50]))
    assert np.allclose(curve, [s["R1"], s["R5"], s["R10"], s["R50"]])


def test_bootstrap_ci_sane_and_seeded() -> None:
    rng = np.random.default_rng(0)
    hits = 100.0 * (rng.random(400) < 0.3)
    lo, hi = bootstrap_ci(hits, n_boot=500, seed=7)
    assert lo < hits.mean() < hi
    se = hits.std() / np.sqrt(len(hits))  # normal approximation: half-width ~ 1.96 se
    assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.25)
    assert bootstrap_ci(hits, n_boot=500, seed=7) == (lo, hi)
    # block size must not change the draws' distribution enough to matter, and stays bounded
    lo2, hi2 = bootstrap_ci(hits, n_boot=500, seed=7, max_elements=1000)
    assert abs(lo2 - lo) < 3 and abs(hi2 - hi) < 3
    assert bootstrap_ci(np.full(50, 100.0), n_boot=100) == (100.0, 100.0)


def _brute_auroc(ood: np.ndarray, ind: np.ndarray) -> float:
    wins = sum(1.0 if o > i else 0.5 if o == i else 0.0 for o in ood for i in ind)
    return wins / (len(ood) * len(ind))


def _brute_fpr(ood: np.ndarray, ind: np.ndarray, tpr: float = 0.95) -> float:
    best = 1.0
    for t in sorted(set(ood) | set(ind)):
        if np.mean(ood >= t) >= tpr - 1e-12:
            best = min(best, float(np.mean(ind >= t)))
    return best


def test_auroc_known_values() -> None:
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    # pairs (2,2) tie 0.5, (2,2.5) 0, (3,2) 1, (3,2.5) 1 -> 2.5 / 4
    assert auroc(np.array([2.0, 3.0]), np.array([2.0, 2.5])) == pytest.approx(0.625)
    assert average_ranks(np.array([5.0, 1.0, 5.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_and_fpr_match_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ood = rng.integers(0, 6, size=37).astype(float) + 1.0
    ind = rng.integers(0, 6, size=29).astype(float)
    assert auroc(ood, ind) == pytest.approx(_brute_auroc(ood, ind))
    assert fpr_at_tpr(ood, ind) == pytest.approx(_brute_fpr(ood, ind))
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(ood)), np.zeros(len(ind))]
    assert auroc(ood, ind) == pytest.approx(roc_auc_score(y, np.r_[ood, ind]))


def test_fpr_at_tpr_known_values() -> None:
    ood = np.arange(20, dtype=float) + 10  # 10..29; 95% of 20 = 19 flagged -> threshold 11
    ind = np.arange(20, dtype=float)  # 0..19: >= 11 are 9 of 20
    assert fpr_at_tpr(ood, ind) == pytest.approx(9 / 20)
    assert fpr_at_tpr(ood + 100, ind) == 0.0
    s = ood_summary(ood + 100, ind)
    assert s["AUROC"] == 100.0 and s["FPR95"] == 0.0 and s["n_ood"] == 20
