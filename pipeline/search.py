"""Search a collection with the trained models: text-to-video, video-to-text and OOD scores.

    s = Searcher.from_dir("data/evaluate/index")
    s.search(["a red circle moves left"], k=5)          # -> [[SearchResult, ...]]
    s.search_video("clip.mp4", k=5)                     # -> [CaptionResult, ...]
    s.ood_scores(["a purple unicorn sings"])            # -> [OODScore]

The models and the index are loaded once. A text query runs the backbone's text tower (the
features stage's encoder, rounded through the cache dtype) and the stage-1 text tower, is scored
against the index's precomputed video representations and, with `rerank`, re-ranked by the t2v
denoiser exactly as the evaluate stage does: a query's starting noise depends only on (seed,
query id), and the id defaults to the query text, so the same query always returns the same list.
Pass `query_ids` to reproduce the evaluation of a caption (its caption id seeds the noise).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.config import Params, from_dict
from pipeline.diffusion.rerank import rerank as rerank_scores
from pipeline.errors import PipelineError
from pipeline.evaluation import settings_from
from pipeline.index import SearchIndex
from pipeline.inference import Models, encode_texts, encode_video_file
from pipeline.models.retrieval import TextOut, VideoOut
from pipeline.ood import baseline_score, generator_score
from pipeline.scoring import (
    Gallery,
    frame_weights,
    gallery,
    rerank_candidates,
    scores,
    video_feats,
)

MAX_QUERY_CHARS = 1000


@dataclass(frozen=True)
class SearchResult:
    """One retrieved video."""

    rank: int
    video_id: str
    score: float  # final score (re-ranked when rerank=True)
    stage1_score: float
    path: str
    split: str
    timestamps: list[float]  # seconds of the frames the models saw

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CaptionResult:
    """One retrieved caption (video-to-text)."""

    rank: int
    caption_id: str
    video_id: str
    text: str
    score: float
    stage1_score: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OODScore:
    """How out-of-distribution a query looks; higher = more OOD (see `pipeline.ood`)."""

    query: str
    generator: float | None  # None without a stage-2 checkpoint
    baseline: float

    def to_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """Loads the models and the index once; answers many queries."""

    def __init__(self, models: Models, index: SearchIndex) -> None:
        self.models = models
        self.index = index
        self.settings = settings_from(models.params)
        self._galleries: dict[str | None, tuple[Tensor, VideoOut, Gallery]] = {}

    @classmethod
    def from_dir(
        cls, index_dir: str | Path, params: Params | None = None,
        device: torch.device | str | None = None, rerank: bool = True,
    ) -> Searcher:
        """Index from `index_dir`; models from the params it was built with (or `params`)."""
        index = SearchIndex.load(index_dir)
        params = params or from_dict(Params, index.manifest["params"], str(index_dir))
        root = Path(index.manifest.get("root", Path.cwd()))
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(Models.load(params, dev, rerank=rerank, root=root), index)

    # -- queries --------------------------------------------------------------------------------
    def check_queries(self, queries: Sequence[str]) -> list[str]:
        """Stripped queries; PipelineError for an empty one or one longer than the model reads."""
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not one string")
        out = [" ".join(str(q).split()) for q in queries]
        if not out:
            raise PipelineError("no query given")
        max_words = self.models.params.features.max_words
        tok = self.models.encoder.tokenizer
        for i, q in enumerate(out, 1):
            if not q:
                raise PipelineError(f"query {i} is empty")
            n = len(q) if len(q) > MAX_QUERY_CHARS else len(tok(q, verbose=False)["input_ids"])
            if len(q) > MAX_QUERY_CHARS or n > max_words:
                unit = "characters" if len(q) > MAX_QUERY_CHARS else "tokens"
                limit = MAX_QUERY_CHARS if unit == "characters" else max_words
                raise PipelineError(f"query {i} is too long ({n} {unit}, at most {limit}): "
                                    "shorten it")
        return out

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str]) -> TextOut:
        """Checked queries -> stage-1 text outputs (float32, CPU)."""
        feats, mask, eos = encode_texts(self.models, self.check_queries(queries))
        dev = self.models.device
        t = self.models.stage1.encode_text(feats.to(dev), mask.to(dev), eos.to(dev))
        return TextOut(*(x.cpu() for x in t))

    @torch.no_grad()
    def text_scores(
        self, text: TextOut, query_ids: Sequence[str], rerank: bool = True,
        split: str | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(final [Q, n], stage-1 [Q, n], index rows [n]) against the videos of `split`."""
        rows, video, g = self._gallery(split)
        dev = self.models.device
        sim = scores(self.models, TextOut(*(x.to(dev) for x in text)), video, g)
        final = sim
        if rerank and self.models.denoisers is not None:
            final = rerank_candidates(sim, self.models.denoisers.t2v, self.models.diffusion,
                                      text.sentence.to(dev), video, list(query_ids),
                                      self.settings)
        return final.cpu(), sim.cpu(), rows

    def _gallery(self, split: str | None) -> tuple[Tensor, VideoOut, Gallery]:
        """(index rows, video outputs on the device, prepared Gallery) of a split, cached."""
        if split not in self._galleries:
            rows = self.index.video_rows(split)
            if len(rows) == 0:
                raise PipelineError(f"the index holds no video of split {split!r}")
            video, video_w = self.index.video_subset(rows)
            dev = self.models.device
            video = VideoOut(*(x.to(dev) for x in video))
            self._galleries[split] = (rows, video, gallery(video, video_w, dev))
        return self._galleries[split]

    def search(
        self, queries: Sequence[str], k: int = 10, rerank: bool = True, split: str | None = None,
        query_ids: Sequence[str] | None = None,
    ) -> list[list[SearchResult]]:
        """Top-k videos per query (ties: lower index row first), best first."""
        text = self.encode_queries(queries)
        ids = list(query_ids) if query_ids is not None else self.check_queries(queries)
        final, sim, rows = self.text_scores(text, ids, rerank, split)
        k = max(1, min(k, final.shape[1]))
        top = stable_topk(final, k)
        v = self.index.videos
        out = []
        for q in range(final.shape[0]):  # result assembly only; scoring is batched above
            res = []
            for r, c in enumerate(top[q].tolist(), 1):
                row = int(rows[c])
                res.append(SearchResult(
                    rank=r, video_id=str(v["video_id"].iat[row]), score=float(final[q, c]),
                    stage1_score=float(sim[q, c]), path=str(v["path"].iat[row]),
                    split=str(v["split"].iat[row]),
                    timestamps=[float(t) for t in v["timestamps"].iat[row]],
                ))
            out.append(res)
        return out

    # -- video to text --------------------------------------------------------------------------
    @torch.no_grad()
    def search_video(
        self, path: str | Path, k: int = 10, rerank: bool = True, split: str | None = None,
    ) -> list[CaptionResult]:
        """Best-matching captions of the collection for a new video file."""
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"{path}: no such video file")
        feats, mask, _ = encode_video_file(self.models, path)
        dev = self.models.device
        video = self.models.stage1.encode_video(feats.to(dev), mask.to(dev))
        rows = self.index.caption_rows(split)
        if len(rows) == 0:
            raise PipelineError(f"the index holds no caption of split {split!r}")
        text = self.index.text_subset(rows)
        sim = scores(self.models, TextOut(*(x.to(dev) for x in text)), video,
                     gallery(video, frame_weights(self.models, video, 1), dev)).T
        final = sim
        if rerank and self.models.denoisers is not None:
            final = rerank_scores(sim, self.models.denoisers.v2t, self.models.diffusion,
                                  text.sentence.to(dev), video_feats(video, dev),
                                  [f"video:{path.name}"], self.settings, "v2t")
        final, sim = final.cpu(), sim.cpu()
        top = stable_topk(final, max(1, min(k, final.shape[1])))[0]
        c = self.index.captions.iloc[rows[top].numpy()]
        return [
            CaptionResult(rank=r, caption_id=str(cid), video_id=str(vid), text=str(txt),
                          score=float(final[0, j]), stage1_score=float(sim[0, j]))
            for r, (j, cid, vid, txt) in enumerate(
                zip(top.tolist(), c["caption_id"], c["video_id"], c["text"], strict=True), 1)
        ]

    # -- OOD ------------------------------------------------------------------------------------
    @torch.no_grad()
    def ood_scores(self, queries: Sequence[str], split: str | None = "test") -> list[OODScore]:
        """Generator-based and baseline OOD scores against the videos of `split` (None: all)."""
        checked = self.check_queries(queries)
        text = self.encode_queries(checked)
        _, sim, _ = self.text_scores(text, checked, rerank=False, split=split)
        base = baseline_score(sim)
        gen: list[float | None] = [None] * len(checked)
        if self.models.denoisers is not None:
            dev = self.models.device
            video = self._gallery(split)[1]
            g = generator_score(sim.to(dev), self.models.denoisers.t2v, self.models.diffusion,
                                text.sentence.to(dev), video_feats(video, dev), checked,
                                self.settings, self.models.params.diffusion.tau)
            gen = [float(x) for x in g.cpu()]
        return [OODScore(q, g, float(b)) for q, g, b in zip(checked, gen, base, strict=True)]


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices [Q, k] of the k highest scores per row; equal scores keep column order."""
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k]
    return torch.from_numpy(order)
