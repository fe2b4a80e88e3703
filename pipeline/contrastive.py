"""DiffusionRet stage 1 ("discrimination"): contrastive training of the retrieval model.

Builds the `Task` the generic loop (`pipeline.training`) trains: every training caption is a
sample (paired with its clip), the loss is the gathered symmetric InfoNCE, model selection uses
validation R@1. The test split is never read here. With `reverse_negatives`, each sampled caption
that has a direction-swapped twin (`reversed_text`, encoded in the cache as `text_rev`) brings a
second pair into its batch: the swapped caption with the clip played backwards, so each pair is
a hard negative for the other (pooling cannot separate them; order-aware frames can). With
`direction_weight` > 0 those pairs also feed `losses.direction_loss` (each caption against its
clip and the clip reversed), added to the InfoNCE at that weight.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from pipeline import io
from pipeline.config import ContrastiveConfig, Params
from pipeline.dist import DistEnv
from pipeline.errors import PipelineError
from pipeline.features.dataset import CaptionVideoDataset, reverse_frames
from pipeline.features.store import FeatureStore
from pipeline.log import get_logger
from pipeline.losses import direction_loss, symmetric_info_nce
from pipeline.metrics.retrieval import ranks, recall_summary
from pipeline.models.retrieval import (
    PairBatch,
    RetrievalConfig,
    RetrievalModel,
    TextOut,
    VideoOut,
)
from pipeline.tracking import Tracker
from pipeline.training import TrainSettings, load_weights, train
from pipeline.training.loop import derive_seed, publish_metrics

log = get_logger(__name__)

IN_MEMORY_MAX_BYTES = 2 << 30  # training features smaller than this are read once into RAM
BACKBONE_PREFIXES = ("text_tail.", "vision_tail.")
KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def split_caption_ids(prepared: str | Path, split: str) -> list[str]:
    """Caption ids of one split of captions.parquet (train or val; the filter skips other rows)."""
    if split == "test":
        raise PipelineError("stage 1 never reads the test split")
    path = Path(prepared) / "captions.parquet"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run `dret prepare` first")
    table = pq.read_table(path, columns=["caption_id"], filters=[("split", "==", split)])
    return [str(c) for c in table.column("caption_id").to_pylist()]


def feature_bytes(store: FeatureStore, n_captions: int, n_videos: int) -> int:
    """Rough size of the features of n captions and n videos in their stored dtype."""
    vf, _ = store.load_videos(store.video_ids[:1])
    tf, _, _ = store.load_texts(store.caption_ids[:1])
    return (n_videos * vf[0].numel() * vf.element_size()
            + 2 * n_captions * tf[0].numel() * tf.element_size())  # captions + reversed twins


def collate_pairs(items: list[dict[str, Tensor]], n_videos: int, reverse: bool) -> PairBatch:
    """CaptionVideoDataset items -> PairBatch; with `reverse`, time-reversed extra pairs appended
    (the direction-swapped captions; their clips are played backwards inside the model).

    Group ids: the clip's index for forward pairs, index + n_videos for reversed clips. Text is
    trimmed to the batch's longest caption (the padding would cost compute in every block).
    """
    b = default_collate(items)
    text, mask, eos = b["text_feats"], b["text_mask"], b["text_eos"]
    groups = b["video_index"]
    backwards = torch.zeros(0, dtype=torch.long)
    if reverse:
        sel = b["has_rev"]
        backwards = sel.nonzero().squeeze(1)
        text = torch.cat([text, b["rev_feats"][sel]])
        mask = torch.cat([mask, b["rev_mask"][sel]])
        eos = torch.cat([eos, b["rev_eos"][sel]])
        groups = torch.cat([groups, groups[sel] + n_videos])
    length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return PairBatch(text[:, :length], mask[:, :length], eos.long(), b["video_feats"],
                     b["video_mask"], backwards, groups.long())


# ----------------------------------------------------------------------------------------------
# Model construction and loading
# ----------------------------------------------------------------------------------------------


def model_config(cfg: ContrastiveConfig, clip_config: dict[str, Any],
                 cache_layer: int | str, max_frames: int) -> RetrievalConfig:
    """RetrievalConfig of the stage's params and the backbone/cache it runs on."""
    return RetrievalConfig(
        clip_config=clip_config, cache_layer=cache_layer, max_frames=max_frames,
        similarity=cfg.similarity, temporal_layers=cfg.temporal_layers,
        temporal_heads=cfg.temporal_heads, logit_scale=cfg.logit_scale,
        learn_logit_scale=cfg.learn_logit_scale, layout_dim=cfg.layout_dim,
    )


def build_model(params: Params, store: FeatureStore) -> RetrievalModel:
    """A fresh model whose towers start from the backbone the features were computed with."""
    from pipeline.features.backbone import load_backbone

    backbone = load_backbone(Path(params.paths.backbone) / "backbone.json")
    cached = str(store.attrs.get("backbone_fingerprint", ""))
    if cached != backbone.fingerprint:
        raise PipelineError(
            f"features in {params.paths.features} come from backbone {cached[:12]}, but "
            f"{params.paths.backbone} holds {backbone.fingerprint[:12]}: rerun `dret features`"
        )
    vf, _ = store.load_videos(store.video_ids[:1])
    cfg = model_config(params.contrastive, backbone.model.config.to_dict(), store.cache_layer,
                       max_frames=vf.shape[1])
    torch.manual_seed(derive_seed(params.seed, "contrastive-init"))
    return RetrievalModel(cfg, backbone.model)


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> RetrievalModel:
    """The trained model of a stage-1 checkpoint dir (`best/` or `last/`), strict, eval mode."""
    state = io.read_json(Path(checkpoint_dir) / "state.json")
    model = RetrievalModel(RetrievalConfig.from_dict(state["config"]))
    load_weights(checkpoint_dir, model)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Encoding and retrieval metrics
# ----------------------------------------------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_texts(model: RetrievalModel, store: FeatureStore, caption_ids: Sequence[str],
                 batch_size: int = 512, reversed: bool = False) -> TextOut:
    """Encode captions from the cache in chunks -> TextOut with M = len(caption_ids)."""
    dev, parts = _device(model), []
    for i in range(0, len(caption_ids), batch_size):
        f, m, e = store.load_texts(caption_ids[i:i + batch_size], reversed=reversed)
        parts.append(model.encode_text(f.to(dev), m.to(dev), e.to(dev)))
    return TextOut(*(torch.cat(x) for x in zip(*parts, strict=True)))


@torch.no_grad()
def encode_videos(model: RetrievalModel, store: FeatureStore, video_ids: Sequence[str],
                  batch_size: int = 256, backwards: bool = False) -> VideoOut:
    """Encode clips from the cache in chunks (played backwards if asked) -> VideoOut [N = ids]."""
    dev, parts = _device(model), []
    for i in range(0, len(video_ids), batch_size):
        f, m = store.load_videos(video_ids[i:i + batch_size])
        if backwards:
            f = reverse_frames(f, m)
        parts.append(model.encode_video(f.to(dev), m.to(dev)))
    return VideoOut(*(torch.cat(x) for x in zip(*parts, strict=True)))


def retrieval_ranks(sim: Tensor, caption_video: Tensor) -> tuple[Tensor, Tensor]:
    """1-based ranks of both directions from sim [M captions, N videos], caption_video [M].

    t2v: every caption is a query, its video the answer. v2t (multi-caption datasets): a video's
    score for candidate video g is g's best caption; the query's own best caption must beat every
    other video's best. Videos without a caption get no v2t query. Ties: `metrics.ranks`.
    """
    sim, caption_video = sim.float().cpu(), caption_video.cpu()
    M, N = sim.shape
    t2v = torch.as_tensor(ranks(sim, caption_video))
    best = sim.new_full((N, N), float("-inf")).scatter_reduce(
        0, caption_video[:, None].expand(M, N), sim, reduce="amax")  # (groups, videos)
    queried = torch.zeros(N, dtype=torch.bool).index_fill_(0, caption_video, True)
    v2t = torch.as_tensor(ranks(best.T[queried], torch.arange(N)[queried]))
    return t2v, v2t


def retrieval_metrics(
    sim: Tensor, caption_video: Tensor, ks: tuple[int, ...] = KS,
) -> dict[str, float]:
    """t2v_/v2t_ R@k, MdR, MnR and R1 (mean of the two R@1, the selection metric)."""
    t2v, v2t = retrieval_ranks(sim, caption_video)
    out = {f"t2v_{k}": v for k, v in recall_summary(t2v.numpy(), ks).items()}
    out.update({f"v2t_{k}": v for k, v in recall_summary(v2t.numpy(), ks).items()})
    out["R1"] = 0.5 * (out["t2v_R1"] + out["v2t_R1"])
    return out


def evaluate_captions(model: RetrievalModel, store: FeatureStore, caption_ids: Sequence[str],
                      batch_size: int = 512) -> tuple[Tensor, Tensor, list[str]]:
    """Similarity [M, N] of the captions (with features) against their clips.

    -> (sim, caption_video [M] index into video_ids, video_ids); captions without video
    features are dropped.
    """
    data = CaptionVideoDataset(store, caption_ids)
    text = encode_texts(model, store, data.caption_ids, batch_size)
    video = encode_videos(model, store, data.video_ids, batch_size)
    with torch.no_grad():
        sim = model.similarity(text, video).cpu()
    return sim, data.video_index, data.video_ids


# ----------------------------------------------------------------------------------------------
# The Task the generic loop trains
# ----------------------------------------------------------------------------------------------


class ContrastiveTask:
    """Stage 1 for `pipeline.training.train` (see `Task`)."""

    selection_metric = "R1"

    def __init__(self, model: RetrievalModel, store: FeatureStore, train_ids: Sequence[str],
                 val_ids: Sequence[str], cfg: ContrastiveConfig) -> None:
        self.model = model
        self.store = store
        self.cfg = cfg
        in_memory = feature_bytes(store, len(train_ids), len(store.video_ids)) < IN_MEMORY_MAX_BYTES
        has_rev = bool(store.reversed_ids)
        if cfg.reverse_negatives and not has_rev:
            log.warning("reverse_negatives: the cache has no reversed captions (text_rev); off")
        self.train_set = CaptionVideoDataset(store, train_ids, in_memory=in_memory,
                                             reversed=cfg.reverse_negatives and has_rev)
        if len(self.train_set) == 0:
            raise PipelineError("no training caption has video features")
        self.val_ids = list(val_ids)
        if not self.val_ids:
            raise PipelineError("the validation split has no captions (model selection needs it)")
        self.reverse = bool(self.train_set.reversed and self.train_set.has_rev.any())

    @property
    def pairs_per_sample(self) -> float:
        """Mean pairs a sampled caption brings into its batch (1 + share with a reversed twin)."""
        return 1.0 + (float(self.train_set.has_rev.float().mean()) if self.reverse else 0.0)

    def train_dataset(self) -> Dataset:
        return self.train_set

    def collate(self, items: list[dict[str, Tensor]]) -> PairBatch:
        return collate_pairs(items, len(self.train_set.video_ids), self.reverse)

    def loss(self, model: nn.Module, batch: PairBatch) -> tuple[Tensor, dict[str, float]]:
        inner: RetrievalModel = getattr(model, "module", model)
        text, video = model(batch)
        loss, logs = symmetric_info_nce(text, video, batch.groups, inner.similarity,
                                        inner.scale())
        R = batch.backwards.numel()
        if self.cfg.direction_weight > 0 and R:
            B = batch.video_feats.shape[0]
            backward = torch.arange(B, B + R, device=batch.backwards.device)
            d = direction_loss(text, video, batch.backwards, backward, inner.similarity,
                               inner.scale())
            loss = loss + self.cfg.direction_weight * d
            logs["loss_direction"] = float(d.detach())
        return loss, logs

    def validate(self, model: nn.Module) -> dict[str, float]:
        sim, caption_video, _ = evaluate_captions(model, self.store, self.val_ids)
        return retrieval_metrics(sim, caption_video)

    def is_backbone(self, param_name: str) -> bool:
        return param_name.startswith(BACKBONE_PREFIXES)

    def config_dict(self) -> dict[str, Any]:
        return self.model.cfg.to_dict()


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def run_contrastive(params: Params, tracker: Tracker, env: DistEnv,
                    out_dir: str | Path | None = None) -> dict[str, Any]:
    """Train stage 1 into paths.contrastive (best/, last/, curves.csv, metrics.json).

    Returns the metrics written to metrics.json (rank 0; other ranks get the same dict).
    """
    out = Path(out_dir or params.paths.contrastive)
    store = FeatureStore(params.paths.features)
    train_ids = split_caption_ids(params.paths.prepared, "train")
    val_ids = split_caption_ids(params.paths.prepared, "val")
    model = build_model(params, store)
    task = ContrastiveTask(model, store, train_ids, val_ids, params.contrastive)
    settings = TrainSettings.from_config(params.contrastive, params.seed)
    log.info("stage 1: %d training captions (%.2f pairs each), %d val captions, %s similarity, "
             "%d temporal layers, cache layer %s", len(task.train_set), task.pairs_per_sample,
             len(val_ids), model.cfg.similarity, model.cfg.temporal_layers, model.cfg.cache_layer)
    result = train(task, settings, out, tracker, env)
    metrics = stage_metrics(result, out, task.pairs_per_sample)
    publish_metrics(out, metrics, tracker, env)
    return metrics


def stage_metrics(result: dict[str, Any], out: Path, pairs_per_sample: float) -> dict[str, Any]:
    """metrics.json: the best checkpoint's validation metrics + training speed and length."""
    best_state = out / "best" / "state.json"
    val = io.read_json(best_state)["metrics"] if best_state.is_file() else {}
    samples_per_s = float(result.get("samples_per_s", math.nan))
    return {
        "val": {k: float(v) for k, v in val.items()},
        "best_step": int(result.get("best_step", -1)),
        "steps": int(result.get("steps", 0)),
        "epochs": float(result.get("epochs", 0.0)),
        "final_loss": float(result.get("final_loss", math.nan)),
        "steps_per_s": float(result.get("steps_per_s", math.nan)),
        "samples_per_s": samples_per_s,
        "pairs_per_s": samples_per_s * pairs_per_sample,
        "elapsed_s": float(result.get("elapsed_s", math.nan)),
    }
