"""Stage-1 scoring shared by evaluation and search: encode cached features in chunks, score
text x video in chunks of queries, and hand stage-1 outputs to the denoisers."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as Fn
from torch import Tensor

from pipeline.diffusion.rerank import RerankSettings, rerank
from pipeline.diffusion.schedule import GaussianDiffusion
from pipeline.errors import PipelineError
from pipeline.features.store import FeatureStore
from pipeline.inference import Models
from pipeline.models.denoiser import Denoiser, VideoFeats
from pipeline.models.retrieval import TextOut, VideoOut

SCORE_BLOCK = 1 << 16  # elements of the cosine block scored at once (cache-sized)

# ----------------------------------------------------------------------------------------------


def encode_videos(models: Models, store: FeatureStore, ids: Sequence[str], chunk: int) -> VideoOut:
    """Stage-1 video outputs of `ids` (all must have features), in chunks. -> float32 on CPU."""
    from pipeline.contrastive import encode_videos as encode

    if not ids:
        raise PipelineError("no videos with features to encode")
    return VideoOut(*(x.cpu() for x in encode(models.stage1, store, list(ids), chunk)))


def encode_captions(
    models: Models, store: FeatureStore, ids: Sequence[str], chunk: int
) -> TextOut:
    """Stage-1 text outputs of caption `ids` from the cache, in chunks. -> float32 on CPU."""
    from pipeline.contrastive import encode_texts as encode

    if not ids:
        raise PipelineError("no captions to encode")
    return TextOut(*(x.cpu() for x in encode(models.stage1, store, list(ids), chunk)))


@torch.no_grad()
def frame_weights(models: Models, video: VideoOut, chunk: int) -> Tensor:
    """WTI frame weights [N, F] (query-independent, so the index stores them), in chunks.
    Zeros for the mean-pooling similarity, which has none."""
    m = models.stage1
    if m.cfg.similarity != "wti":
        return torch.zeros(video.mask.shape)
    dev = models.device
    parts = [m.frame_weights(video.frames[i : i + chunk].to(dev),
                             video.mask[i : i + chunk].to(dev)).cpu()
             for i in range(0, video.frames.shape[0], chunk)]
    return torch.cat(parts) if parts else torch.zeros(video.mask.shape)


class Gallery(NamedTuple):
    """Query-independent half of WTI, computed once per gallery: frames [N, F, D] L2-normalised,
    frame_bias [N, F] (0 valid, dtype min for padding), weights [N, F] (frame weights)."""

    frames: Tensor
    frame_bias: Tensor
    weights: Tensor


def gallery(video: VideoOut, video_w: Tensor, device: torch.device | str = "cpu") -> Gallery:
    """The Gallery of stage-1 video outputs and their frame weights (on `device`)."""
    frames = Fn.normalize(video.frames.to(device).float(), dim=-1)
    neg = torch.finfo(frames.dtype).min
    bias = torch.zeros(video.mask.shape, device=frames.device).masked_fill(
        ~video.mask.to(frames.device), neg)
    return Gallery(frames, bias, video_w.to(frames.device).float())


@torch.no_grad()
def scores(models: Models, text: TextOut, video: VideoOut, g: Gallery) -> Tensor:
    """Stage-1 scores [M, N] (on the model's device) against a prepared gallery.

    The same WTI as `pipeline.models.wti.wti_scores` (tests assert equality), with the gallery
    side (normalised frames, padding bias, frame-weight MLP) computed once instead of per query:
    per query at 10k videos that work cost more than the scoring itself.
    """
    m = models.stage1
    if m.cfg.similarity != "wti":
        return m.similarity(text, video)
    t = Fn.normalize(text.tokens.float(), dim=-1)  # (M, L, D)
    tw = m.text_weights(text.tokens, text.mask)  # (M, L)
    word_bias = torch.zeros(text.mask.shape, device=t.device).masked_fill(
        ~text.mask, torch.finfo(t.dtype).min)
    M, L, _ = t.shape
    N, F, _ = g.frames.shape
    # Blocks of videos bound the [M, n, L, F] cosine tensor. Small blocks stay in cache: for one
    # query, 2^24-element blocks made 100k videos cost 12x 10k (fresh 64 MB temporaries each);
    # 2^16 is linear (benchmarks/bench_search.py). Many queries keep >= 64 videos per block.
    block = min(m.cfg.chunk_elems, max(SCORE_BLOCK, M * L * F * 64))
    cols = max(1, min(N, block // max(1, M * L * F)))
    out = []
    for j in range(0, N, cols):
        c = torch.einsum("mld,nfd->mnlf", t, g.frames[j : j + cols])
        frame_best = (c + word_bias[:, None, :, None]).amax(dim=2)  # (M, n, F)
        word_best = c.add_(g.frame_bias[j : j + cols][None, :, None, :]).amax(dim=3)  # (M, n, L)
        t2v = (word_best * tw[:, None, :]).sum(-1)
        v2t = (frame_best * g.weights[j : j + cols][None]).sum(-1)
        out.append(0.5 * (t2v + v2t))
    return torch.cat(out, dim=1)


@torch.no_grad()
def similarity(models: Models, text: TextOut, video: VideoOut, g: Gallery, chunk: int) -> Tensor:
    """Stage-1 scores [M, N] on CPU in chunks of `chunk` queries."""
    dev = models.device
    vid = VideoOut(*(x.to(dev) for x in video))
    rows = [
        scores(models, TextOut(*(x[i : i + chunk].to(dev) for x in text)), vid, g).cpu()
        for i in range(0, text.tokens.shape[0], chunk)
    ]
    return torch.cat(rows) if rows else torch.zeros(0, video.frames.shape[0])


def rerank_candidates(
    sim: Tensor, denoiser: Denoiser, diffusion: GaussianDiffusion, texts: Tensor,
    video: VideoOut, query_ids: Sequence[str], settings: RerankSettings,
) -> Tensor:
    """t2v `rerank` with only the union of the rows' top-K videos handed to the denoiser.

    Identical result (the re-rank only touches each row's top K, and those are all kept), but
    the denoiser's per-call work over its video pool then scales with the candidates, not the
    gallery. sim [Q, N] -> [Q, N].
    """
    k = min(settings.top_k, sim.shape[1])
    cols = sim.topk(k, dim=1).indices.unique()  # sorted union
    sub = VideoFeats(*(x[cols] for x in video))
    out = sim.float().clone()
    out[:, cols] = rerank(sim[:, cols], denoiser, diffusion, texts, sub, query_ids, settings,
                          "t2v")
    return out


def video_feats(v: VideoOut, device: torch.device) -> VideoFeats:
    return VideoFeats(v.frames.to(device), v.mask.to(device), v.pooled.to(device))

