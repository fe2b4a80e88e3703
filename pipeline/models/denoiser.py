"""DiffusionRet's denoiser: predicts the clean candidate-score vector x0 from a noisy one.

One class serves both directions (`query="text"`: t2v, `query="video"`: v2t). Everything lives in
the stage-1 joint space (sentences, frames and pooled videos all have dimension D), so a
(sentence, video) pair is always built the same way, whichever side is the query:

- pair pooling: the video's frames pooled by attention conditioned on the sentence,
  w_f = softmax_f(<Wq s, Wk f_f> / sqrt(H)), u = sum_f w_f f_f          (u in D)
- candidate token c_k = cand_in([u_k; g_k]), g_k = candidate's global feature
  (t2v: the candidate video's pooled feature; v2t: the candidate sentence)
- attention query h = query_in(g_q) + e_t, e_t = MLP(sinusoid(t))
- query-candidate attention (heads): logits_nk = <Wq' h, Wk' c_k>_n / sqrt(dh) + gain_n * x_t[k],
  a = softmax over valid candidates, context = per head sum_k a_nk c_k
- x0_hat_k = out(GELU(LN(W1 [context; c_k; a_k] + e_t)))

Permutation-equivariant over candidates (nothing depends on their order), candidate mask
supported. `prepare` computes every step-independent term once per sampling loop (pair pooling,
candidate tokens, attention keys, the candidate part of W1); `denoise` does the per-step rest.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DenoiserConfig:
    dim: int  # D, the stage-1 joint embedding size
    hidden: int = 512  # H
    heads: int = 8
    query: Literal["text", "video"] = "text"  # "text": t2v denoiser, "video": v2t denoiser
    time_freqs: int = 64  # sinusoid frequencies of the timestep embedding

    def to_dict(self) -> dict:
        return asdict(self)


class VideoFeats(NamedTuple):
    """Stage-1 video outputs: frames [N, F, D] (after the temporal transformer), mask [N, F],
    pooled [N, D]."""

    frames: Tensor
    mask: Tensor
    pooled: Tensor


class Cond(NamedTuple):
    """Step-independent terms of one batch of queries (B queries x K candidates)."""

    query: Tensor  # [B, H] query_in(g_q)
    values: Tensor  # [B, heads, K, dh] candidate tokens c split by head (attention values)
    keys_t: Tensor  # [B, heads, dh, K] attention keys Wk' c, transposed for one matmul
    cand_hidden: Tensor  # [B, K, H] W1[:, cand] c + b1
    mask: Tensor  # [B, K] bool, valid candidates


def timestep_embedding(t: Tensor, n_freqs: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps. t [B] -> [B, 2 * n_freqs]."""
    i = torch.arange(n_freqs, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / n_freqs)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def _unit(x: Tensor) -> Tensor:
    """L2-normalise the last dim and rescale to unit variance per component (norm sqrt(D))."""
    return F.normalize(x.float(), dim=-1) * math.sqrt(x.shape[-1])


class Denoiser(nn.Module):
    """x0 predictor over K candidates of each query; see the module docstring."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        if cfg.hidden % cfg.heads:
            raise ValueError(f"hidden {cfg.hidden} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        D, H = cfg.dim, cfg.hidden
        self.pool_q = nn.Linear(D, H)  # sentence -> pooling query
        self.pool_k = nn.Linear(D, H, bias=False)  # frame -> pooling key (a bias would cancel)
        self.cand_in = nn.Linear(2 * D, H)  # [pooled frames u; candidate global g_k] -> c
        self.query_in = nn.Linear(D, H)
        self.time = nn.Sequential(nn.Linear(2 * cfg.time_freqs, H), nn.SiLU(), nn.Linear(H, H))
        self.attn_q = nn.Linear(H, H)
        self.attn_k = nn.Linear(H, H)
        self.xt_gain = nn.Parameter(torch.ones(cfg.heads))
        self.mlp_in = nn.Linear(2 * H + cfg.heads, H)  # [context; c_k; a_k]
        self.mlp_norm = nn.LayerNorm(H)
        self.mlp_out = nn.Linear(H, 1)

    # ------------------------------------------------------------------------------------------
    def _pool_queries(self, sent: Tensor) -> Tensor:
        """Pooling queries, key projection folded in: Wk^T Wq s / sqrt(H). [.., D] -> [.., D]
        (frames are never projected: scores are dot products with the raw frames)."""
        return self.pool_q(sent) @ self.pool_k.weight / math.sqrt(self.cfg.hidden)

    @staticmethod
    def _pool(q: Tensor, frames: Tensor, mask: Tensor) -> Tensor:
        """Frames pooled by attention. q [B, K, D] folded queries; frames [B, F, D] (one video per
        query, v2t) or [B, K, F, D] (one per candidate, t2v), mask likewise -> u [B, K, D]."""
        if frames.ndim == 3:
            scores = torch.einsum("bkd,bfd->bkf", q, frames)
            mask = mask[:, None, :]
        else:
            scores = torch.einsum("bkd,bkfd->bkf", q, frames)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        w = scores.softmax(-1)  # (B, K, F)
        eq = "bkf,bfd->bkd" if frames.ndim == 3 else "bkf,bkfd->bkd"
        return torch.einsum(eq, w, frames)

    def prepare(
        self,
        texts: Tensor,
        videos: VideoFeats,
        query: Tensor,
        candidates: Tensor,
        cand_mask: Tensor | None = None,
    ) -> Cond:
        """Step-independent terms. texts [M, D] sentences, videos over N videos; query [B] indexes
        the query side (texts for t2v, videos for v2t), candidates [B, K] the other side;
        cand_mask [B, K] bool (None: all valid).

        Per-item projections run on the pools (each text / video once), then get gathered; only
        the pair pooling and what follows it run per (query, candidate).
        """
        frames, fmask, pooled = _unit(videos.frames), videos.mask.bool(), _unit(videos.pooled)
        texts = _unit(texts)
        B, K = candidates.shape
        D = self.cfg.dim
        w_u, w_g = self.cand_in.weight[:, :D], self.cand_in.weight[:, D:]
        if self.cfg.query == "text":
            q = self._pool_queries(texts[query])[:, None, :].expand(B, K, -1)  # (B, K, D)
            u = self._pool(q, frames[candidates], fmask[candidates])  # gathers (B, K, F, D)
            g_q, g_k = texts[query], F.linear(pooled, w_g)[candidates]  # (B, D), (B, K, H)
        else:
            q = self._pool_queries(texts)[candidates]  # (B, K, D)
            u = self._pool(q, frames[query], fmask[query])
            g_q, g_k = pooled[query], F.linear(texts, w_g)[candidates]
        c = F.linear(u, w_u, self.cand_in.bias) + g_k  # cand_in([u; g_k]), (B, K, H)
        H = self.cfg.hidden
        heads, dh = self.cfg.heads, H // self.cfg.heads
        values = c.view(B, K, heads, dh).transpose(1, 2).contiguous()  # (B, heads, K, dh)
        keys_t = self.attn_k(c).view(B, K, heads, dh).permute(0, 2, 3, 1).contiguous()
        cand_hidden = F.linear(c, self.mlp_in.weight[:, H : 2 * H], self.mlp_in.bias)
        if cand_mask is None:
            cand_mask = torch.ones(B, K, dtype=torch.bool, device=c.device)
        return Cond(self.query_in(g_q), values, keys_t, cand_hidden, cand_mask.bool())

    def denoise(self, cond: Cond, x_t: Tensor, t: Tensor) -> Tensor:
        """x0_hat [B, K] from noisy scores x_t [B, K] at timesteps t [B] (masked entries -> 0).

        Per step only [B, H]-sized work plus three passes over [B, K, H] (bias add, the
        attention-weight term, norm + GELU); everything else comes from `prepare`.
        """
        B, heads, K, dh = cond.values.shape
        H = heads * dh
        e = self.time(timestep_embedding(t, self.cfg.time_freqs))  # (B, H)
        q = self.attn_q(cond.query + e).view(B, heads, 1, dh)
        logits = (q @ cond.keys_t).squeeze(2) / math.sqrt(dh)  # (B, heads, K)
        logits = logits + self.xt_gain[None, :, None] * x_t[:, None, :].to(logits.dtype)
        logits = logits.masked_fill(~cond.mask[:, None, :], torch.finfo(logits.dtype).min)
        a = logits.softmax(-1)  # (B, heads, K)
        ctx = (a[:, :, None, :].to(cond.values.dtype) @ cond.values).reshape(B, H)
        w = self.mlp_in.weight
        per_query = F.linear(ctx, w[:, :H]) + e  # (B, H): context term + timestep
        hidden = torch.addmm(
            (cond.cand_hidden + per_query[:, None, :].to(cond.cand_hidden.dtype)).view(B * K, H),
            a.transpose(1, 2).reshape(B * K, heads).to(w.dtype),
            w[:, 2 * H :].t(),
        )  # (B*K, H) = W1 [context; c_k; a_k] + b1 + e
        x0 = self.mlp_out(F.gelu(self.mlp_norm(hidden))).view(B, K)
        return x0.masked_fill(~cond.mask, 0.0)

    def forward(
        self, texts: Tensor, videos: VideoFeats, query: Tensor, candidates: Tensor,
        x_t: Tensor, t: Tensor, cand_mask: Tensor | None = None,
    ) -> Tensor:
        """prepare + denoise in one call (training). -> x0_hat [B, K]."""
        return self.denoise(self.prepare(texts, videos, query, candidates, cand_mask), x_t, t)


class NoisyCandidates(NamedTuple):
    """One direction's training input: candidates [B, K] (pool indices), mask [B, K] bool,
    x_t [B, K] noisy scores, t [B] timesteps."""

    candidates: Tensor
    mask: Tensor
    x_t: Tensor
    t: Tensor


class DenoiserPair(nn.Module):
    """The two stage-2 denoisers, saved together: `t2v` and `v2t`."""

    def __init__(self, dim: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.t2v = Denoiser(DenoiserConfig(dim, hidden, heads, "text"))
        self.v2t = Denoiser(DenoiserConfig(dim, hidden, heads, "video"))

    def forward(
        self, texts: Tensor, videos: VideoFeats, query: Tensor,
        t2v: NoisyCandidates, v2t: NoisyCandidates,
    ) -> tuple[Tensor, Tensor]:
        """Both directions on one batch (the entry point DDP wraps): query [B] indexes texts for
        t2v and videos for v2t. -> (x0_hat t2v [B, K1], x0_hat v2t [B, K2])."""
        a = self.t2v(texts, videos, query, t2v.candidates, t2v.x_t, t2v.t, t2v.mask)
        b = self.v2t(texts, videos, query, v2t.candidates, v2t.x_t, v2t.t, v2t.mask)
        return a, b

    def config_dict(self) -> dict:
        c = self.t2v.cfg
        return {"dim": c.dim, "hidden": c.hidden, "heads": c.heads}
