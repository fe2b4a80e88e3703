"""DiffusionRet stage 2 ("generation"): train the t2v and v2t denoisers on frozen stage 1.

Stage 1 is frozen and its outputs are computed ONCE per run from the feature cache: sentence and
token features of every training and validation caption, frame features (after the temporal
transformer) of every video, and the full validation similarity. Training steps only read them.

Mining needs the stage-1 score of every (caption, in-batch video) pair. The full training matrix
would cost M x N WTI evaluations up front (measured: ~140 s on 2 CPU cores for the demo's
7,500 x 1,500, ~3e14 FLOP for MSR-VTT 9k), of which a run reads a fraction; so each step scores
its B x B pairs from the cached token/frame outputs with stage 1's own `similarity` (a pure
function of cached outputs: no encoder runs per step).

The Task for the generic loop (`pipeline.training.train`, the same loop as stage 1):
- batch = B training captions; column j of the in-batch gallery = the video of caption j;
- per direction: positive + hardest in-batch negatives (`mining`), x0 = one-hot at index 0,
  t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), x0_hat = denoiser(...);
- loss = cross-entropy of softmax(tau * x0_hat) against index 0, t2v + v2t;
- validation = R@1 with the full re-rank on the val split (mean of both directions) picks best/.
The test split is never read here.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline import dist
from pipeline.config import DiffusionConfig, Params
from pipeline.contrastive import (
    encode_texts,
    encode_videos,
    load_model,
    retrieval_ranks,
    split_caption_ids,
)
from pipeline.contrastive import stage_metrics as contrastive_metrics
from pipeline.diffusion.loss import positive_cross_entropy
from pipeline.diffusion.mining import Mined, mine_batch, one_hot_target
from pipeline.diffusion.rerank import RerankSettings, rerank
from pipeline.diffusion.schedule import GaussianDiffusion
from pipeline.dist import DistEnv
from pipeline.errors import PipelineError
from pipeline.features.dataset import CaptionVideoDataset
from pipeline.features.store import FeatureStore
from pipeline.index import trim_text
from pipeline.log import get_logger
from pipeline.metrics.retrieval import recall_summary
from pipeline.models.denoiser import DenoiserPair, NoisyCandidates, VideoFeats
from pipeline.models.retrieval import RetrievalModel, TextOut, VideoOut
from pipeline.tracking import Tracker
from pipeline.training import TrainSettings, train
from pipeline.training.loop import derive_seed, publish_metrics

log = get_logger(__name__)

KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------
# Frozen stage-1 outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class SplitOutputs:
    """Stage-1 outputs of one split (captions whose video has features), computed once.

    caption_video [M] indexes video_ids; text: tokens [M, L', D] (L' = longest caption), mask,
    sentence [M, D]; video: frames [N, F, D], mask [N, F], pooled [N, D]; sim [M, N] unscaled
    stage-1 similarity (None when not computed).
    """

    caption_ids: list[str]
    video_ids: list[str]
    caption_video: Tensor
    text: TextOut
    video: VideoOut
    sim: Tensor | None = None

    def to(self, device: torch.device) -> SplitOutputs:
        return SplitOutputs(
            self.caption_ids, self.video_ids, self.caption_video.to(device),
            TextOut(*(x.to(device) for x in self.text)),
            VideoOut(*(x.to(device) for x in self.video)),
            None if self.sim is None else self.sim.to(device),
        )

    @property
    def video_feats(self) -> VideoFeats:
        return VideoFeats(*self.video)


@torch.no_grad()
def split_outputs(
    stage1: RetrievalModel, store: FeatureStore, caption_ids: Sequence[str],
    with_sim: bool, batch_size: int = 512,
) -> SplitOutputs:
    """Encode a split's captions and videos with frozen stage 1 (+ the full similarity)."""
    data = CaptionVideoDataset(store, caption_ids)  # drops captions whose video failed
    if not data.caption_ids:
        raise PipelineError("no caption of the split has video features")
    text = trim_text(encode_texts(stage1, store, data.caption_ids, batch_size))
    video = encode_videos(stage1, store, data.video_ids, batch_size)
    sim = stage1.similarity(text, video).float() if with_sim else None
    return SplitOutputs(data.caption_ids, data.video_ids, data.video_index.to(text.mask.device),
                        text, video, sim)


# ----------------------------------------------------------------------------------------------
# Validation / ablation: metrics of stage 1 alone and with re-rank variants
# ----------------------------------------------------------------------------------------------


def rerank_split(
    out: SplitOutputs, pair: DenoiserPair, diffusion: GaussianDiffusion, settings: RerankSettings,
) -> tuple[Tensor, Tensor]:
    """Re-ranked (t2v [M, N], v2t [N, M]) similarities of a split with stage-1 sim."""
    if out.sim is None:
        raise ValueError("split outputs without similarity")
    t2v = rerank(out.sim, pair.t2v, diffusion, out.text.sentence, out.video_feats,
                 out.caption_ids, settings, "t2v")
    v2t = rerank(out.sim.T, pair.v2t, diffusion, out.text.sentence, out.video_feats,
                 out.video_ids, settings, "v2t")
    return t2v, v2t


def direction_metrics(
    t2v: Tensor, v2t: Tensor, caption_video: Tensor, ks: tuple[int, ...] = KS, prefix: str = "",
) -> dict[str, float]:
    """{prefix}t2v_R1 ... / {prefix}v2t_... from t2v [M, N] and v2t [N, M] scores (multi-caption
    v2t protocol, ties as `pipeline.metrics.retrieval`), + {prefix}R1 = mean of both R@1."""
    cv = caption_video.cpu()
    r_t2v, _ = retrieval_ranks(t2v.float().cpu(), cv)
    _, r_v2t = retrieval_ranks(v2t.float().cpu().T, cv)
    m = {f"{prefix}t2v_{k}": v for k, v in recall_summary(r_t2v.numpy(), ks).items()}
    m.update({f"{prefix}v2t_{k}": v for k, v in recall_summary(r_v2t.numpy(), ks).items()})
    m[f"{prefix}R1"] = 0.5 * (m[f"{prefix}t2v_R1"] + m[f"{prefix}v2t_R1"])
    return m


def compare_variants(
    out: SplitOutputs, pair: DenoiserPair, diffusion: GaussianDiffusion,
    variants: dict[str, RerankSettings], ks: tuple[int, ...] = KS,
) -> dict[str, dict[str, float]]:
    """Metrics of stage 1 alone (`stage1`) and of each named re-rank variant, side by side, with
    the re-rank wall time (`seconds`, both directions)."""
    assert out.sim is not None
    table = {"stage1": direction_metrics(out.sim, out.sim.T, out.caption_video, ks)}
    for name, s in variants.items():
        t0 = time.perf_counter()
        t2v, v2t = rerank_split(out, pair, diffusion, s)
        seconds = time.perf_counter() - t0
        table[name] = {**direction_metrics(t2v, v2t, out.caption_video, ks), "seconds": seconds}
    return table


def ablation_variants(base: RerankSettings) -> dict[str, RerankSettings]:
    """The full re-rank and its ablations: x_t = 0, one sampling step, alpha = 0."""
    from dataclasses import replace

    return {
        "rerank": base,
        "zero_xt": replace(base, zero_xt=True),
        "one_step": replace(base, steps=1),
        "alpha0": replace(base, alpha=0.0),
    }


# ----------------------------------------------------------------------------------------------
# The Task the generic loop trains
# ----------------------------------------------------------------------------------------------


class _Captions(Dataset):
    """Training items = caption positions 0..M-1 in the cached outputs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class DiffusionTask:
    """Stage 2 for `pipeline.training.train` (see `Task`)."""

    selection_metric = "R1"

    def __init__(
        self, pair: DenoiserPair, stage1: RetrievalModel, train_out: SplitOutputs,
        val_out: SplitOutputs, cfg: DiffusionConfig, seed: int,
    ) -> None:
        self.model = pair
        self.stage1 = stage1.eval().requires_grad_(False)
        self.train_out = train_out
        self.val_out = val_out
        self.cfg = cfg
        self.diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule).to(
            train_out.caption_video.device)
        self.rerank_settings = RerankSettings.from_config(cfg, seed)

    def train_dataset(self) -> Dataset:
        return _Captions(len(self.train_out.caption_ids))

    def collate(self, items: list[int]) -> Tensor:
        """-> caption positions [B] int64."""
        return torch.tensor(items, dtype=torch.long)

    def batch_inputs(self, captions: Tensor) -> tuple[Tensor, VideoFeats, Mined, Mined]:
        """Pools of one batch (texts [B, D], the video of each caption) and both mined lists."""
        o = self.train_out
        captions = captions.to(o.caption_video.device)
        vid = o.caption_video[captions]  # (B,) column j = video of caption j
        text = TextOut(*(x[captions] for x in o.text))
        video = VideoOut(*(x[vid] for x in o.video))
        with torch.no_grad():
            sim = self.stage1.similarity(text, video)  # (B, B) from cached outputs only
        t2v, v2t = mine_batch(sim, vid, self.cfg.negatives)
        return text.sentence, VideoFeats(*video), t2v, v2t

    def _noisy(self, mined: Mined) -> tuple[NoisyCandidates, Tensor]:
        x0 = one_hot_target(mined.mask)
        t = torch.randint(0, self.cfg.timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.diffusion.q_sample(x0, t, torch.randn_like(x0))
        return NoisyCandidates(mined.candidates, mined.mask, x_t, t), x0

    def loss(self, model: nn.Module, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
        texts, videos, t2v, v2t = self.batch_inputs(batch)
        n_t2v, _ = self._noisy(t2v)
        n_v2t, _ = self._noisy(v2t)
        query = torch.arange(texts.shape[0], device=texts.device)
        x0_t2v, x0_v2t = model(texts, videos, query, n_t2v, n_v2t)
        l_t2v = positive_cross_entropy(x0_t2v, t2v.mask, self.cfg.tau)
        l_v2t = positive_cross_entropy(x0_v2t, v2t.mask, self.cfg.tau)
        return l_t2v + l_v2t, {"t2v": l_t2v.item(), "v2t": l_v2t.item()}

    def validate(self, model: nn.Module) -> dict[str, float]:
        """Val R@1 etc. with the full re-rank (selection: `R1`), beside stage 1 alone."""
        pair: DenoiserPair = getattr(model, "module", model)
        t0 = time.perf_counter()
        t2v, v2t = rerank_split(self.val_out, pair, self.diffusion, self.rerank_settings)
        seconds = time.perf_counter() - t0
        o = self.val_out
        assert o.sim is not None
        return {
            **direction_metrics(t2v, v2t, o.caption_video),
            **direction_metrics(o.sim, o.sim.T, o.caption_video, prefix="stage1_"),
            "rerank_seconds": seconds,
        }

    def is_backbone(self, param_name: str) -> bool:
        return False

    def config_dict(self) -> dict[str, Any]:
        """Read back by `pipeline.inference.load_denoisers`."""
        return {**self.model.config_dict(), "timesteps": self.cfg.timesteps,
                "schedule": self.cfg.schedule}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def prepare_outputs(
    params: Params, device: torch.device,
) -> tuple[RetrievalModel, SplitOutputs, SplitOutputs]:
    """Load frozen stage 1 (`paths.contrastive/best`) and encode train and val once."""
    ckpt = Path(params.paths.contrastive) / "best"
    if not (ckpt / "state.json").is_file():
        raise PipelineError(f"{ckpt}: no stage-1 checkpoint; run `dret train-contrastive` first")
    stage1 = load_model(ckpt, device).requires_grad_(False)
    store = FeatureStore(params.paths.features)
    t0 = time.perf_counter()
    train_out = split_outputs(stage1, store, split_caption_ids(params.paths.prepared, "train"),
                              with_sim=False)
    val_ids = split_caption_ids(params.paths.prepared, "val")
    if not val_ids:
        raise PipelineError("the validation split has no captions (model selection needs it)")
    val_out = split_outputs(stage1, store, val_ids, with_sim=True)
    log.info("stage-1 outputs: %d train captions / %d videos, %d val captions / %d videos "
             "(%.1f s, once)", len(train_out.caption_ids), len(train_out.video_ids),
             len(val_out.caption_ids), len(val_out.video_ids), time.perf_counter() - t0)
    return stage1, train_out, val_out


def build_pair(params: Params, dim: int) -> DenoiserPair:
    cfg = params.diffusion
    torch.manual_seed(derive_seed(params.seed, "diffusion-init"))
    return DenoiserPair(dim, cfg.hidden, cfg.heads)


def run_train_diffusion(
    params: Params, tracker: Tracker, env: DistEnv, out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train both denoisers into paths.diffusion (best/, last/, curves.csv, metrics.json)."""
    out = Path(out_dir or params.paths.diffusion)
    env = dist.init(env)
    device = dist.device(env)
    if params.diffusion.threads > 0:  # before the one-off encoding too, not only in the loop
        torch.set_num_threads(params.diffusion.threads)
    stage1, train_out, val_out = prepare_outputs(params, device)
    pair = build_pair(params, int(train_out.text.sentence.shape[-1]))
    task = DiffusionTask(pair, stage1, train_out.to(device), val_out.to(device), params.diffusion,
                         params.seed)
    settings = TrainSettings.from_config(params.diffusion, params.seed)
    n_params = sum(p.numel() for p in pair.parameters())
    log.info("stage 2: %d parameters (2 denoisers), %d negatives, T=%d %s, %d sampling steps",
             n_params, params.diffusion.negatives, params.diffusion.timesteps,
             params.diffusion.schedule, params.diffusion.sampling_steps)
    result = train(task, settings, out, tracker, env)
    metrics = {**contrastive_metrics(result, out, 1.0), "parameters": n_params}
    metrics.pop("pairs_per_s", None)  # stage 1's reversed-pair count; meaningless here
    publish_metrics(out, metrics, tracker, env)
    return metrics
