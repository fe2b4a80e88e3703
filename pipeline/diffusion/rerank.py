"""Inference-time re-ranking: the denoiser re-orders each query's top-K stage-1 candidates.

For every query (all at once, in memory-bounded chunks of queries): take the K best candidates of
its row of the unscaled stage-1 similarity, run the full DDIM loop from Gaussian noise (x0_hat
clamped to [-1, 1]) and add alpha * softmax(x0 / temp) to those K scores. Boosts are >= 0 and
the other candidates keep their score, so the top K stay ahead: the generator only re-orders
them. A query's starting noise depends only on (seed, query id) (see `noise`), so
results do not depend on chunk size, batch composition, rank count or device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pipeline.diffusion.noise import query_keys, seeded_normal
from pipeline.diffusion.schedule import GaussianDiffusion
from pipeline.models.denoiser import Denoiser, VideoFeats


@dataclass(frozen=True)
class RerankSettings:
    """Knobs of the re-rank (DiffusionConfig: top_k, alpha, rerank_temp, sampling_steps, eta,
    chunk_queries; seed from params)."""

    top_k: int = 32
    alpha: float = 1.0
    temp: float = 1.0
    steps: int = 50
    eta: float = 0.0
    chunk: int = 512
    seed: int = 0
    zero_xt: bool = False  # ablation: the denoiser sees x_t = 0 at every step

    @classmethod
    def from_config(cls, cfg: Any, seed: int, **overrides: Any) -> RerankSettings:
        """From a DiffusionConfig (duck-typed: this module never imports the config loader)."""
        values = dict(top_k=cfg.top_k, alpha=cfg.alpha, temp=cfg.rerank_temp,
                      steps=cfg.sampling_steps, eta=cfg.eta, chunk=cfg.chunk_queries, seed=seed)
        return cls(**{**values, **overrides})


@torch.no_grad()
def generate_scores(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    texts: Tensor,
    videos: VideoFeats,
    query: Tensor,
    candidates: Tensor,
    keys: Tensor,
    settings: RerankSettings,
) -> Tensor:
    """x0 [B, K] sampled for B queries (pool indices `query` [B]) and their candidates [B, K];
    keys [B] int64 noise keys of the queries."""
    B, K = candidates.shape
    device = candidates.device
    cond = denoiser.prepare(texts, videos, query, candidates)  # once per sampling loop
    x_T = seeded_normal(keys, K, device=device)
    step_noise = None
    if settings.eta > 0:  # fresh noise per step from the same per-query stream, after x_T
        step_noise = seeded_normal(keys, settings.steps * K, offset=K, device=device)
        step_noise = step_noise.view(B, settings.steps, K).transpose(0, 1)

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        return denoiser.denoise(cond, torch.zeros_like(x_t) if settings.zero_xt else x_t, t).float()

    return diffusion.sample(
        denoise, (B, K), settings.steps, settings.eta, noise=x_T, clamp=(-1.0, 1.0),
        step_noise=step_noise,
    )


@torch.no_grad()
def sample_top_k(
    sim: Tensor,
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    texts: Tensor,
    videos: VideoFeats,
    query_ids: Sequence[str],
    settings: RerankSettings,
) -> tuple[Tensor, Tensor]:
    """The generator's x0 for each query's top-K candidates, all queries in chunks.

    sim [Q, G] rows = queries in pool order (see `rerank`). -> (top [Q, K] column indices in
    descending stage-1 order, x0 [Q, K] float32 in [-1, 1]).
    """
    Q, G = sim.shape
    if len(query_ids) != Q:
        raise ValueError(f"{len(query_ids)} query ids for {Q} rows")
    k = min(settings.top_k, G)
    keys = query_keys(query_ids, settings.seed).to(sim.device)
    top = sim.float().topk(k, dim=1).indices  # (Q, k)
    x0 = torch.empty(Q, k, dtype=torch.float32, device=sim.device)
    for start in range(0, Q, settings.chunk):  # chunks bound memory: B * K * F * D per gather
        rows = torch.arange(start, min(start + settings.chunk, Q), device=sim.device)
        x0[rows] = generate_scores(
            denoiser, diffusion, texts, videos, rows, top[rows], keys[rows], settings
        ).float()
    return top, x0


@torch.no_grad()
def rerank(
    sim: Tensor,
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    texts: Tensor,
    videos: VideoFeats,
    query_ids: Sequence[str],
    settings: RerankSettings,
    direction: Literal["t2v", "v2t"] | None = None,
) -> Tensor:
    """Re-ranked copy of `sim` [Q, G] (unscaled stage-1 similarity, rows = queries).

    t2v: rows = captions (texts [M, D] row order), columns = videos; v2t: rows = videos, columns =
    captions, i.e. pass sim.T. `denoiser` must be the one of that direction (its cfg.query says
    which; `direction` is checked against it when given). query_ids [Q] give each row's noise
    seed. Returns float32 [Q, G] on sim's device: sim + alpha * softmax(x0 / temp) on the top K.
    """
    kind = "t2v" if denoiser.cfg.query == "text" else "v2t"
    if direction is not None and direction != kind:
        raise ValueError(f"a {kind} denoiser cannot re-rank {direction}")
    out = sim.float().clone()
    if settings.alpha == 0 or sim.shape[0] == 0:
        return out
    top, x0 = sample_top_k(sim, denoiser, diffusion, texts, videos, query_ids, settings)
    return out.scatter_add_(1, top, settings.alpha * torch.softmax(x0 / settings.temp, dim=-1))
