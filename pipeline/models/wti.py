"""Text-video similarity: weighted token interaction (WTI) and the mean-pooling baseline.

WTI (DiffusionRet, after DRL): every word is matched to its best frame and every frame to its
best word; the matches are averaged with learned, input-dependent weights (softmax over the valid
tokens of a small MLP). Both scores are cosines, so the result lies in [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn


class TokenWeights(nn.Module):
    """Importance of each token: softmax over valid positions of MLP(D -> 2D -> 1).

    x [B, L, D], mask [B, L] bool -> [B, L] (rows sum to 1 over valid positions, 0 elsewhere).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, 1))
        # zero last layer: uniform weights at initialisation (WTI starts as plain token averaging)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        logits = self.mlp(x).squeeze(-1).float()  # (B, L)
        logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(w, nan=0.0)  # rows without a valid position -> all zeros


# Score of a (word, frame) pair involving padding: below any cosine, so it never wins a max.
_PAD_SCORE = -3.0


def _augment(x: Tensor, mask: Tensor, text_side: bool) -> Tensor:
    """L2-normalised x [B, K, D] (zeros on padding) with two channels that fold the padding mask
    into the dot product: text rows get (1, p), frame rows (p, 1), p = _PAD_SCORE on padding and 0
    otherwise, so <word, frame> is the cosine for valid pairs and <= _PAD_SCORE with padding."""
    valid = mask[..., None].to(torch.float32)  # (B, K, 1)
    pad = _PAD_SCORE * (1.0 - valid)
    one = torch.ones_like(valid)
    extra = torch.cat([one, pad] if text_side else [pad, one], dim=-1)  # (B, K, 2)
    return torch.cat([Fn.normalize(x.float(), dim=-1) * valid, extra], dim=-1)  # (B, K, D + 2)


def wti_scores(
    text: Tensor, text_mask: Tensor, text_w: Tensor,
    video: Tensor, video_mask: Tensor, video_w: Tensor,
    chunk_elems: int = 1 << 24,
) -> Tensor:
    """WTI similarity [M, N] in [-1, 1] of every text with every video.

    text [M, L, D], text_mask [M, L] bool, text_w [M, L] (token weights);
    video [N, F, D], video_mask [N, F] bool, video_w [N, F] (frame weights).
    t2v = sum_l w_l max_f c_lf, v2t = sum_f w'_f max_l c_lf over valid tokens/frames,
    score = (t2v + v2t) / 2 with c the cosine of L2-normalised token and frame features.
    The cosines come from one [M*L, N*F] matrix product (viewed as [M, L, N, F]: no transpose
    copy), built in blocks of at most `chunk_elems` elements.
    """
    M, L, _ = text.shape
    N, F, _ = video.shape
    t = _augment(text, text_mask, text_side=True)  # (M, L, D + 2)
    v = _augment(video, video_mask, text_side=False)  # (N, F, D + 2)
    tw, vw = text_w.float(), video_w.float()
    cols = max(1, min(N, chunk_elems // max(1, L * F)))
    rows = max(1, min(M, chunk_elems // max(1, cols * L * F)))
    blocks = []
    for i in range(0, M, rows):
        ti, twi = t[i:i + rows], tw[i:i + rows]
        m = ti.shape[0]
        row = []
        for j in range(0, N, cols):
            vj = v[j:j + cols]
            n = vj.shape[0]
            c = (ti.reshape(m * L, -1) @ vj.reshape(n * F, -1).T).view(m, L, n, F)
            word_best = c.max(dim=3).values  # (m, L, n): best frame per word
            frame_best = c.max(dim=1).values  # (m, n, F): best word per frame
            t2v = torch.einsum("mln,ml->mn", word_best, twi)
            v2t = torch.einsum("mnf,nf->mn", frame_best, vw[j:j + cols])
            row.append(0.5 * (t2v + v2t))
        blocks.append(torch.cat(row, dim=1))
    return torch.cat(blocks, dim=0)  # (M, N)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over valid positions: x [B, L, D], mask [B, L] bool -> [B, D] (zeros if none valid)."""
    m = mask.to(x.dtype)[..., None]  # (B, L, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def cosine_scores(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity [M, N] of a [M, D] with b [N, D]."""
    return Fn.normalize(a.float(), dim=-1) @ Fn.normalize(b.float(), dim=-1).T
