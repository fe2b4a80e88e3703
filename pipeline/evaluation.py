"""The evaluate stage: test-split metrics with and without the diffusion re-rank, both
directions, OOD detection, cross-dataset transfer, and the search index.

Protocol (see `pipeline.metrics.retrieval` for ranks and ties):

- gallery = every test video of videos.parquet; a video whose frames failed has no features, so
  it never outranks anything, but it stays in the gallery count, and the queries whose answer it
  is (its captions in t2v, itself in v2t) get the worst rank, n_gallery (a miss at every K).
- t2v: every test caption is a query. v2t: every test video is a query against all test
  captions grouped by video (multi-caption protocol).
- variants: `stage1` (the contrastive model's unscaled similarity) and `rerank` (the t2v / v2t
  denoiser re-orders each query's top K; `pipeline.diffusion.rerank`).
- R@1 carries a seeded percentile bootstrap 95% CI over queries.

Video representations are scored as the search index stores them (`evaluate.index_dtype`), so
`dret search --split test` reproduces these rankings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pipeline import dist
from pipeline.config import Params, to_dict
from pipeline.diffusion.rerank import RerankSettings, rerank
from pipeline.errors import PipelineError
from pipeline.eval_outputs import write_plots, write_ranks, write_report
from pipeline.features.store import FeatureStore
from pipeline.index import SearchIndex, round_video, trim_text
from pipeline.inference import Models, encode_texts
from pipeline.io import atomic_path, read_json, write_json
from pipeline.log import get_logger
from pipeline.metrics.retrieval import bootstrap_ci, grouped_ranks, ranks, recall_summary
from pipeline.models.retrieval import TextOut, VideoOut
from pipeline.ood import baseline_score, generator_score
from pipeline.scoring import (
    encode_captions,
    encode_videos,
    frame_weights,
    gallery,
    rerank_candidates,
    similarity,
    video_feats,
)

log = get_logger(__name__)

DIRECTIONS = ("t2v", "v2t")


@dataclass
class EvalSet:
    """A gallery of videos (present or not) and its caption queries, encoded."""

    name: str
    video_ids: list[str]  # gallery, every video of the split
    present: np.ndarray  # [N] bool: has features
    caption_ids: list[str]
    caption_video: np.ndarray  # [C] index into video_ids
    text: TextOut  # [C] every caption (the cache holds captions of failed videos too)
    video: VideoOut  # [n_present] rows = video_ids[present]
    video_w: Tensor  # [n_present, F] WTI frame weights

    @property
    def present_ids(self) -> list[str]:
        return [v for v, p in zip(self.video_ids, self.present, strict=True) if p]


@dataclass
class SetResult:
    sims: dict[str, dict[str, Tensor]]  # direction -> variant -> [Q, G] scores
    ranks: dict[str, dict[str, tuple[list[str], np.ndarray]]]
    metrics: dict[str, Any] = field(default_factory=dict)


def load_eval_set(
    name: str, prepared: Path, store: FeatureStore, models: Models, split: str, chunk: int,
    index_dtype: str, index: SearchIndex | None = None,
) -> EvalSet:
    """The `split` of a prepared dataset, encoded from its feature cache (video rows taken from
    `index` when it holds them, so that search and evaluation score identical tensors)."""
    videos = pd.read_parquet(prepared / "videos.parquet")
    captions = pd.read_parquet(prepared / "captions.parquet")
    videos = videos[videos["split"] == split].sort_values("video_id")
    if videos.empty:
        raise PipelineError(f"{prepared}: no videos in split {split!r}")
    video_ids = videos["video_id"].astype(str).tolist()
    pos = {v: i for i, v in enumerate(video_ids)}
    captions = captions[captions["video_id"].astype(str).isin(pos)].sort_values("caption_id")
    caption_ids = captions["caption_id"].astype(str).tolist()
    present = np.array([store.has_video(v) for v in video_ids], dtype=bool)
    if not present.any():
        raise PipelineError(f"{name}: no {split} video has features")
    present_ids = [v for v, p in zip(video_ids, present, strict=True) if p]
    if index is not None and set(present_ids) <= set(index.videos["video_id"]):
        row = {v: i for i, v in enumerate(index.videos["video_id"])}
        video, video_w = index.video_subset(torch.tensor([row[v] for v in present_ids]))
    else:
        video = round_video(encode_videos(models, store, present_ids, chunk), index_dtype)
        video_w = frame_weights(models, video, chunk)
    return EvalSet(
        name=name, video_ids=video_ids, present=present, caption_ids=caption_ids,
        caption_video=np.array([pos[v] for v in captions["video_id"].astype(str)], dtype=np.int64),
        text=encode_captions(models, store, caption_ids, chunk), video=video, video_w=video_w,
    )


def score_set(
    es: EvalSet, models: Models, settings: RerankSettings | None, chunk: int,
    ks: tuple[int, ...], n_boot: int, seed: int,
) -> SetResult:
    """Similarities, ranks and metrics of both directions; `settings` None = stage 1 only."""
    n_gallery = len(es.video_ids)
    present_pos = np.flatnonzero(es.present)  # gallery index of each similarity column / row
    col_of = np.full(n_gallery, -1, dtype=np.int64)
    col_of[present_pos] = np.arange(len(present_pos))
    g = gallery(es.video, es.video_w, models.device)
    sim = similarity(models, es.text, es.video, g, chunk)  # (C, n_present)
    sims: dict[str, dict[str, Tensor]] = {"t2v": {"stage1": sim}, "v2t": {"stage1": sim.T}}
    if settings is not None and models.denoisers is not None:
        dev = models.device
        vf, sent = video_feats(es.video, dev), es.text.sentence.to(dev)
        sims["t2v"]["rerank"] = rerank_candidates(sim.to(dev), models.denoisers.t2v,
                                                  models.diffusion, sent, vf, es.caption_ids,
                                                  settings).cpu()
        sims["v2t"]["rerank"] = rerank(sim.T.to(dev), models.denoisers.v2t, models.diffusion,
                                       sent, vf, es.present_ids, settings, "v2t").cpu()
    out: dict[str, dict[str, tuple[list[str], np.ndarray]]] = {"t2v": {}, "v2t": {}}
    gt_col = col_of[es.caption_video]  # (C,) -1: the caption's video has no features
    has_gt = gt_col >= 0
    for variant, s in sims["t2v"].items():
        r = np.full(len(es.caption_ids), n_gallery, dtype=np.int64)
        r[has_gt] = ranks(s[torch.from_numpy(has_gt)], gt_col[has_gt])
        out["t2v"][variant] = (es.caption_ids, r)
    for variant, s in sims["v2t"].items():
        r = np.full(n_gallery, n_gallery, dtype=np.int64)
        r[present_pos] = grouped_ranks(s, es.caption_video, present_pos, n_gallery)
        out["v2t"][variant] = (es.video_ids, r)
    metrics: dict[str, Any] = {}
    for d, per in out.items():
        metrics[d] = {}
        for variant, (_, r) in per.items():
            m = recall_summary(r, ks)
            lo, hi = bootstrap_ci(100.0 * (r <= 1), n_boot, seed)
            metrics[d][variant] = {**m, "R1_ci_low": lo, "R1_ci_high": hi}
    metrics["counts"] = {
        "n_queries": {"t2v": len(es.caption_ids), "v2t": n_gallery},
        "n_gallery": {"t2v": n_gallery, "v2t": n_gallery},
        "n_captions": len(es.caption_ids),
        "n_missing": int((~es.present).sum()),
    }
    return SetResult(sims=sims, ranks=out, metrics=metrics)


# ----------------------------------------------------------------------------------------------
# OOD detection
# ----------------------------------------------------------------------------------------------


def ood_metrics(
    es: EvalSet, sim_id: Tensor, ood: pd.DataFrame, models: Models,
    settings: RerankSettings, tau: float, chunk: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """AUROC / FPR@95TPR per OOD kind for the generator score and the max-similarity baseline.

    In-distribution queries: the test captions (sim_id [C, n_present]); OOD queries: `ood`
    (caption_id, text, kind), encoded through the backbone's text tower now.
    """
    from pipeline.metrics.ood import ood_summary

    feats, mask, eos = encode_texts(models, ood["text"].astype(str).tolist())
    with torch.no_grad():
        t = models.stage1.encode_text(feats.to(models.device), mask.to(models.device),
                                      eos.to(models.device))
    text_ood = TextOut(*(x.cpu() for x in t))
    g = gallery(es.video, es.video_w, models.device)
    sim_ood = similarity(models, text_ood, es.video, g, chunk)
    scores = {"baseline": (baseline_score(sim_ood), baseline_score(sim_id))}
    if models.denoisers is not None:
        vf = video_feats(es.video, models.device)
        gen = [
            generator_score(s.to(models.device), models.denoisers.t2v, models.diffusion,
                            sent.to(models.device), vf, ids, settings, tau).cpu()
            for s, sent, ids in (
                (sim_ood, text_ood.sentence, ood["caption_id"].astype(str).tolist()),
                (sim_id, es.text.sentence, es.caption_ids),
            )
        ]
        scores["generator"] = (gen[0], gen[1])
    kinds = ood["kind"].astype(str).to_numpy()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in sorted(set(kinds)):
        sel = torch.from_numpy(kinds == kind)
        out[kind] = {
            name: ood_summary(o[sel].numpy(), i.numpy()) for name, (o, i) in scores.items()
        }
    return out


# ----------------------------------------------------------------------------------------------
# Cross-dataset
# ----------------------------------------------------------------------------------------------


def other_dataset_set(root: Path, store_main: FeatureStore, models: Models, chunk: int,
                      index_dtype: str) -> EvalSet:
    """Another dataset's test split (all its videos if it has none), checked for compatibility.

    `root` holds `prepared/` (videos.parquet, captions.parquet) and `features/` (HDF5 shards)
    produced by this pipeline for that dataset with the same backbone and cache layer.
    """
    prepared, feats = root / "prepared", root / "features"
    for p in (prepared / "videos.parquet", prepared / "captions.parquet"):
        if not p.is_file():
            raise PipelineError(f"other dataset {root}: {p.relative_to(root)} missing")
    store = FeatureStore(feats)
    for key in ("backbone_fingerprint", "cache_layer"):
        mine, theirs = str(store_main.attrs.get(key)), str(store.attrs.get(key))
        if mine != theirs:
            raise PipelineError(f"other dataset {root}: {key} {theirs!r} differs from this "
                                f"pipeline's {mine!r}; extract its features with the same backbone")
    splits = set(pd.read_parquet(prepared / "videos.parquet", columns=["split"])["split"])
    split = "test" if "test" in splits else sorted(splits)[0]
    return load_eval_set(root.name, prepared, store, models, split, chunk, index_dtype)


def settings_from(params: Params) -> RerankSettings:
    """Re-rank knobs from `diffusion.*` and the global seed."""
    return RerankSettings.from_config(params.diffusion, params.seed)


# ----------------------------------------------------------------------------------------------
# The search index
# ----------------------------------------------------------------------------------------------


def frame_timestamps(frames_dir: Path) -> dict[str, list[float]]:
    """video id -> sampled frame timestamps (seconds), read from the frame shards' id columns."""
    import pyarrow.parquet as pq

    from pipeline.video.shards import list_shards

    out: dict[str, list[float]] = {}
    for shard in list_shards(frames_dir):
        t = pq.read_table(shard, columns=["video_id", "timestamps"]).to_pydict()
        out.update(zip(t["video_id"], t["timestamps"], strict=True))
    return out


def build_index(params: Params, models: Models, store: FeatureStore) -> SearchIndex:
    """Stage-1 representations of every video (with features) and caption of `index_splits`."""
    ev = params.evaluate
    prepared = Path(params.paths.prepared)
    videos = pd.read_parquet(prepared / "videos.parquet")
    captions = pd.read_parquet(prepared / "captions.parquet")
    videos["video_id"] = videos["video_id"].astype(str)
    captions["caption_id"] = captions["caption_id"].astype(str)
    captions["video_id"] = captions["video_id"].astype(str)
    videos = videos[videos["split"].isin(ev.index_splits)
                    & videos["video_id"].map(store.has_video)].sort_values("video_id")
    captions = captions[captions["split"].isin(ev.index_splits)].sort_values("caption_id")
    if videos.empty:
        raise PipelineError(f"no video of splits {list(ev.index_splits)} has features")
    summary = prepared / "summary.json"
    root = Path(read_json(summary).get("video_root", "")) if summary.is_file() else Path()
    ts = frame_timestamps(Path(params.paths.frames))
    table = pd.DataFrame({
        "video_id": videos["video_id"].tolist(),
        "path": [str(root / p) for p in videos["path"].astype(str)],
        "split": videos["split"].astype(str).tolist(),
        "timestamps": [list(map(float, ts.get(v, []))) for v in videos["video_id"]],
    })
    caps = captions[["caption_id", "video_id", "text", "split"]].reset_index(drop=True)
    log.info("indexing %d videos and %d captions", len(table), len(caps))
    video = round_video(encode_videos(models, store, table["video_id"].tolist(), ev.chunk),
                        ev.index_dtype)
    video_w = frame_weights(models, video, ev.chunk)
    text = trim_text(encode_captions(models, store, caps["caption_id"].tolist(), ev.chunk))
    manifest = {
        "dtype": ev.index_dtype,
        "params": to_dict(params),
        "root": str(Path.cwd().resolve()),
        "backbone_fingerprint": str(store.attrs.get("backbone_fingerprint")),
        "cache_layer": str(store.attrs.get("cache_layer")),
    }
    return SearchIndex(table, video, video_w, caps, text, manifest)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def write_similarity(path: Path, es: EvalSet, res: SetResult) -> None:
    """similarity.npz: <direction>_<variant> matrices (t2v: captions x present videos, v2t: its
    transpose's shape) + caption_ids and video_ids (present videos, the column order)."""
    arrays = {f"{d}_{v}": s.numpy() for d, per in res.sims.items() for v, s in per.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, caption_ids=np.array(es.caption_ids), video_ids=np.array(es.present_ids),
                 **arrays)


def run_evaluate(params: Params, other_dataset: str | None = None) -> dict[str, Any]:
    """Score the test split (+ OOD, + another dataset), write every output; return metrics."""
    ev = params.evaluate
    torch.manual_seed(params.seed)
    out = Path(params.paths.evaluate)
    prepared = Path(params.paths.prepared)
    models = Models.load(params, dist.device(), rerank=ev.rerank)
    store = FeatureStore(params.paths.features)
    index = build_index(params, models, store)
    index.save(out / "index")
    es = load_eval_set("test", prepared, store, models, "test", ev.chunk, ev.index_dtype, index)
    settings = settings_from(params)
    res = score_set(es, models, settings if ev.rerank else None, ev.chunk, ev.recall_ks,
                    ev.bootstrap, params.seed)
    metrics: dict[str, Any] = dict(res.metrics)
    ood_file = prepared / "ood_captions.parquet"
    if ev.ood and ood_file.is_file():
        metrics["ood"] = ood_metrics(es, res.sims["t2v"]["stage1"], pd.read_parquet(ood_file),
                                     models, settings, params.diffusion.tau, ev.chunk)
    tables = {"test": res.ranks}
    other = other_dataset or ev.other_dataset
    if other:
        oes = other_dataset_set(Path(other), store, models, ev.chunk, ev.index_dtype)
        ores = score_set(oes, models, settings if ev.rerank else None, ev.chunk, ev.recall_ks,
                         ev.bootstrap, params.seed)
        metrics["other"] = {"dataset": oes.name, **ores.metrics}
        tables[oes.name] = ores.ranks
    write_json(out / "metrics.json", metrics)
    write_ranks(out / "ranks.parquet", tables)
    write_similarity(out / "similarity.npz", es, res)
    plots = write_plots(out / "plots", res.ranks, metrics["counts"]["n_gallery"])
    write_report(out / "report.md", metrics, ev.recall_ks, plots)
    return metrics
