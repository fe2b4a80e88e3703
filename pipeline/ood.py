"""Out-of-distribution scores of text queries (higher = more OOD).

Generator-based score (our choice): the normalised entropy of the relevance distribution the
stage-2 generator produces over the query's top-K stage-1 candidates,

    p = softmax(tau * x0),   score = H(p) / log K  in [0, 1],

where x0 [K] is the DDIM sample of the t2v denoiser (same seeded noise as the re-rank) and tau is
the temperature of its training cross-entropy (`diffusion.tau`), i.e. p is exactly the
distribution the generator was trained to make one-hot on the positive. Why this one:

- it asks the generator the question it was trained on ("which of these is the match?"). For a
  query made of words and compositions seen in training it commits to one candidate (low
  entropy); for a novel word or an unseen attribute combination no candidate is singled out
  consistently and the mass spreads (high entropy).
- it is invariant to the absolute level of the stage-1 cosines, which is what the baseline
  relies on and what generic in-distribution captions ("a shape moves") also make low;
- the max of p or 1 - max p carry less information (they ignore how the rest is spread), and a
  disagreement with stage 1 (KL to softmax of the top-K cosines) mixes in the stage-1 temperature,
  a free parameter that the generator's own distribution does not need.

Baseline: -max over the gallery of the stage-1 similarity (a query that matches nothing well is
OOD), the usual maximum-score detector.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.diffusion.noise import query_keys
from pipeline.diffusion.rerank import RerankSettings, generate_scores
from pipeline.diffusion.schedule import GaussianDiffusion
from pipeline.models.denoiser import Denoiser, VideoFeats


def baseline_score(sim: Tensor) -> Tensor:
    """-max stage-1 similarity per query. sim [Q, G] -> [Q] float32."""
    return -sim.float().amax(dim=1)


def normalised_entropy(x0: Tensor, tau: float) -> Tensor:
    """H(softmax(tau * x0)) / log K per row. x0 [Q, K] -> [Q] in [0, 1] (0 when K == 1)."""
    k = x0.shape[-1]
    logp = torch.log_softmax(tau * x0.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    return h / math.log(k) if k > 1 else torch.zeros_like(h)


@torch.no_grad()
def generator_score(
    sim: Tensor,
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    sentences: Tensor,
    videos: VideoFeats,
    query_ids: Sequence[str],
    settings: RerankSettings,
    tau: float,
) -> Tensor:
    """Generator-based OOD score [Q] (see module docstring).

    sim [Q, N] stage-1 scores of the Q queries (rows of `sentences` [Q, D]) against N videos;
    the top-K candidates of each row go through the t2v denoiser in chunks of settings.chunk.
    """
    Q, N = sim.shape
    k = min(settings.top_k, N)
    top = sim.float().topk(k, dim=1).indices  # (Q, k)
    keys = query_keys(list(query_ids), settings.seed).to(sim.device)
    out = torch.empty(Q, dtype=torch.float32, device=sim.device)
    for start in range(0, Q, settings.chunk):  # chunks of queries bound memory
        rows = torch.arange(start, min(start + settings.chunk, Q), device=sim.device)
        x0 = generate_scores(denoiser, diffusion, sentences, videos, rows, top[rows], keys[rows],
                             settings)
        out[rows] = normalised_entropy(x0, tau)
    return out
