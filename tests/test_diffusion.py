"""Stage 2 (diffusion) units: schedule invariants, sampler, seeded noise, denoiser, mining, loss,
re-rank on random tensors; the stage end to end on a tiny fixture (two-rank DDP: `slow`)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.diffusion import (
    GaussianDiffusion,
    RerankSettings,
    hardest,
    mine_batch,
    one_hot_target,
    positive_cross_entropy,
    query_keys,
    rerank,
    respaced_timesteps,
    seeded_normal,
)
from pipeline.models.denoiser import Denoiser, DenoiserConfig, VideoFeats, timestep_embedding

D, H, HEADS, F_ = 16, 32, 4, 5


def _feats(m: int = 12, n: int = 9, seed: int = 0) -> tuple[torch.Tensor, VideoFeats]:
    g = torch.Generator().manual_seed(seed)
    texts = torch.randn(m, D, generator=g)
    frames = torch.randn(n, F_, D, generator=g)
    mask = torch.ones(n, F_, dtype=torch.bool)
    mask[::2, -2:] = False  # some videos shorter
    pooled = frames.mean(1)
    return texts, VideoFeats(frames, mask, pooled)


def _denoiser(query: str = "text", seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(DenoiserConfig(D, H, HEADS, query)).eval()


# ---------------------------------------------------------------------------------------------
# schedule + sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_alphas_cumprod_decreasing_in_unit_interval(schedule: str) -> None:
    d = GaussianDiffusion(50, schedule)
    abar = d.alphas_cumprod
    assert abar.dtype == torch.float32 and abar.shape == (50,)
    assert torch.all(abar[1:] < abar[:-1])
    assert 0 < abar[-1] < abar[0] < 1
    assert torch.allclose(d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2,
                          torch.ones(50), atol=1e-6)
    assert "alphas_cumprod" not in d.state_dict()  # schedule buffers never enter checkpoints


def test_cosine_schedule_matches_closed_form() -> None:
    T, s = 50, 0.008
    d = GaussianDiffusion(T, "cosine")
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)])
    assert torch.allclose(d.alphas_cumprod[:-1], expected[:-1].float(), rtol=1e-5)


def test_q_sample_mean_and_variance() -> None:
    d = GaussianDiffusion(50, "cosine")
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n,), 0.7)
    for t in (0, 20, 49):
        x_t = d.q_sample(x0, torch.full((n,), t), torch.randn(n, generator=g))
        abar = d.alphas_cumprod[t].item()
        assert abs(x_t.mean().item() - math.sqrt(abar) * 0.7) < 5 * math.sqrt((1 - abar) / n) + 1e-6
        assert abs(x_t.var().item() - (1 - abar)) < 0.02 * (1 - abar) + 1e-6


def test_respaced_timesteps() -> None:
    assert respaced_timesteps(50, 50) == list(range(49, -1, -1))
    assert respaced_timesteps(50, 1) == [49]
    ts = respaced_timesteps(50, 7)
    assert ts[0] == 49 and ts[-1] == 0 and len(set(ts)) == 7 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError):
        respaced_timesteps(50, 51)


@pytest.mark.parametrize("steps", [50, 10, 1])
def test_ddim_with_perfect_predictor_recovers_x0(steps: int) -> None:
    d = GaussianDiffusion(50, "cosine")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 8, generator=g) * 2 - 1
    x_T = torch.randn(6, 8, generator=g)
    seen: list[tuple[int, torch.Tensor]] = []

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((int(t[0]), x_t.clone()))
        return x0

    out = d.sample(oracle, (6, 8), steps, eta=0.0, noise=x_T)
    assert torch.allclose(out, x0, atol=1e-6)
    # eta = 0 keeps the trajectory on q_sample(x0, t, eps) with the starting eps
    abar_T = d.alphas_cumprod[49]
    eps = (x_T - abar_T.sqrt() * x0) / (1 - abar_T).sqrt()
    for t, x_t in seen:
        assert torch.allclose(x_t, d.q_sample(x0, torch.full((6,), t), eps), atol=1e-4)


def test_sample_seeded_reproducible_and_eta_uses_noise() -> None:
    d = GaussianDiffusion(20, "linear")
    fn = lambda x, t: torch.tanh(x + t[:, None] / 20)  # noqa: E731
    a = d.sample(fn, (3, 4), 20, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = d.sample(fn, (3, 4), 20, eta=1.0, generator=torch.Generator().manual_seed(5))
    c = d.sample(fn, (3, 4), 20, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# seeded noise
# ---------------------------------------------------------------------------------------------


def test_seeded_noise_depends_only_on_seed_and_id() -> None:
    ids = [f"cap{i}" for i in range(10)]
    k = query_keys(ids, seed=3)
    z = seeded_normal(k, 6)
    assert torch.equal(seeded_normal(query_keys(ids[4:7], seed=3), 6), z[4:7])
    assert torch.equal(seeded_normal(query_keys(ids[::-1], seed=3), 6), z.flip(0))
    assert torch.equal(seeded_normal(k, 4, offset=2), z[:, 2:])
    assert not torch.equal(seeded_normal(query_keys(ids, seed=4), 6), z)
    # a fixed value: the stream never changes across versions, processes or machines
    assert query_keys(["x"], 0).item() == query_keys(["x"], 0).item()
    big = seeded_normal(query_keys(["a"], 0), 100_000)
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


# ---------------------------------------------------------------------------------------------
# denoiser
# ---------------------------------------------------------------------------------------------


def _cond_inputs(query: str, b: int = 4, k: int = 6) -> tuple:
    texts, videos = _feats()
    g = torch.Generator().manual_seed(2)
    pool_q = texts.shape[0] if query == "text" else videos.frames.shape[0]
    pool_c = videos.frames.shape[0] if query == "text" else texts.shape[0]
    q = torch.randint(0, pool_q, (b,), generator=g)
    cands = torch.stack([torch.randperm(pool_c, generator=g)[:k] for _ in range(b)])
    x_t = torch.randn(b, k, generator=g)
    t = torch.randint(0, 50, (b,), generator=g)
    return texts, videos, q, cands, x_t, t


@pytest.mark.parametrize("query", ["text", "video"])
def test_denoiser_permutation_equivariant(query: str) -> None:
    m = _denoiser(query)
    texts, videos, q, cands, x_t, t = _cond_inputs(query)
    perm = torch.randperm(cands.shape[1], generator=torch.Generator().manual_seed(7))
    out = m(texts, videos, q, cands, x_t, t)
    out_p = m(texts, videos, q, cands[:, perm], x_t[:, perm], t)
    assert out.shape == cands.shape
    assert torch.allclose(out_p, out[:, perm], atol=1e-5)


@pytest.mark.parametrize("query", ["text", "video"])
def test_denoiser_mask_hides_candidates(query: str) -> None:
    m = _denoiser(query)
    texts, videos, q, cands, x_t, t = _cond_inputs(query)
    mask = torch.ones_like(cands, dtype=torch.bool)
    mask[:, -2:] = False
    out = m(texts, videos, q, cands, x_t, t, mask)
    x_t2 = x_t.clone()
    x_t2[:, -2:] = 50.0
    cands2 = cands.clone()
    cands2[:, -2:] = cands[:, :1]  # masked slots may point anywhere
    out2 = m(texts, videos, q, cands2, x_t2, t, mask)
    assert torch.allclose(out[:, :-2], out2[:, :-2], atol=1e-5)
    assert torch.all(out[:, -2:] == 0)
    # same as simply leaving the masked candidates out
    out3 = m(texts, videos, q, cands[:, :-2], x_t[:, :-2], t)
    assert torch.allclose(out[:, :-2], out3, atol=1e-5)


@pytest.mark.parametrize("query", ["text", "video"])
def test_denoiser_depends_on_xt_and_t(query: str) -> None:
    m = _denoiser(query)
    texts, videos, q, cands, x_t, t = _cond_inputs(query)
    cond = m.prepare(texts, videos, q, cands)
    base = m.denoise(cond, x_t, t)
    assert (m.denoise(cond, x_t.roll(1, dims=1), t) - base).abs().max() > 1e-4
    assert (m.denoise(cond, x_t, (t + 17) % 50) - base).abs().max() > 1e-4


def test_denoiser_split_first_layer_equals_concatenated_mlp() -> None:
    """The prepare/denoise split computes the documented MLP on [context; candidate; weights]."""
    m = _denoiser("text")
    texts, videos, q, cands, x_t, t = _cond_inputs("text")
    cond = m.prepare(texts, videos, q, cands)
    B, heads, K, dh = cond.values.shape
    Hd = heads * dh
    cand = cond.values.transpose(1, 2).reshape(B, K, Hd)  # candidate tokens c
    keys = m.attn_k(cand).view(B, K, heads, dh).transpose(1, 2)
    e = m.time(timestep_embedding(t, m.cfg.time_freqs))
    qh = m.attn_q(cond.query + e).view(B, heads, 1, dh)
    logits = (qh * keys).sum(-1) / math.sqrt(dh) + m.xt_gain[None, :, None] * x_t[:, None]
    a = logits.softmax(-1)
    ctx = torch.einsum("bnk,bknd->bnd", a, cand.view(B, K, heads, dh)).reshape(B, Hd)
    inp = torch.cat([ctx[:, None].expand(B, K, Hd), cand, a.transpose(1, 2)], dim=-1)
    ref = m.mlp_out(F.gelu(m.mlp_norm(m.mlp_in(inp) + e[:, None]))).squeeze(-1)
    assert torch.allclose(m.denoise(cond, x_t, t), ref, atol=1e-5)


def test_denoiser_size_at_paper_dims() -> None:
    n = sum(p.numel() for p in Denoiser(DenoiserConfig(512, 512, 8)).parameters())
    assert 2.4e6 < n < 3.0e6


# ---------------------------------------------------------------------------------------------
# mining + loss
# ---------------------------------------------------------------------------------------------


def test_mining_with_duplicate_videos() -> None:
    # captions 0, 1, 3 show video 7; caption 2 video 8; caption 4 video 9
    video_of = torch.tensor([7, 7, 8, 7, 9])
    sim = torch.tensor([
        [0.9, 0.95, 0.1, 0.8, 0.2],
        [0.5, 0.6, 0.3, 0.7, 0.4],
        [0.2, 0.9, 0.8, 0.1, 0.3],
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [0.6, 0.1, 0.2, 0.3, 0.7],
    ])
    t2v, v2t = mine_batch(sim, video_of, n_neg=3)
    assert t2v.candidates.shape == (5, 4)
    assert torch.equal(t2v.candidates[:, 0], torch.arange(5)) and t2v.mask[:, 0].all()
    for i in range(5):  # no valid negative shares the row's video; each video offered once
        negs = t2v.candidates[i, 1:][t2v.mask[i, 1:]]
        assert not (video_of[negs] == video_of[i]).any()
        assert len(set(video_of[negs].tolist())) == len(negs)
    # caption 2 (video 8): negatives = videos 7 (first column 0) and 9 -> 2 valid, 1 masked
    assert t2v.mask[2].tolist() == [True, True, True, False]
    assert set(t2v.candidates[2, 1:3].tolist()) == {0, 4}
    # v2t row 4 (video 9): negatives = captions 0..3 by sim[:, 4], hardest first
    assert v2t.candidates[4].tolist() == [4, 3, 1, 2]
    # v2t row 0 (video 7): only captions 2 and 4 are negatives (1 and 3 are also positives)
    assert v2t.mask[0].tolist() == [True, True, True, False]
    assert v2t.candidates[0, 1:3].tolist() == [4, 2]
    x0 = one_hot_target(t2v.mask)
    assert x0[:, 0].eq(1).all() and x0[:, 1:].eq(0).all()


def test_hardest_picks_top_scores() -> None:
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9]])
    m = hardest(s, torch.tensor([3]), torch.tensor([[True, True, True, False]]), 2)
    assert m.candidates.tolist() == [[3, 1, 2]] and m.mask.all()


def test_loss_hand_computed() -> None:
    x0_hat = torch.tensor([[0.02, 0.0, 0.01], [0.0, 0.01, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # row 0: logits 2, 0, 1; row 1: logits 0, 1 (third masked)
    r0 = -(2 - math.log(math.exp(2) + math.exp(0) + math.exp(1)))
    r1 = -(0 - math.log(math.exp(0) + math.exp(1)))
    got = positive_cross_entropy(x0_hat, mask, tau=100.0)
    assert got.item() == pytest.approx((r0 + r1) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# re-rank
# ---------------------------------------------------------------------------------------------


def _rerank_case(query: str = "text"):
    texts, videos = _feats(m=14, n=10)
    m = _denoiser(query)
    d = GaussianDiffusion(20, "cosine")
    g = torch.Generator().manual_seed(3)
    rows = texts.shape[0] if query == "text" else videos.frames.shape[0]
    cols = videos.frames.shape[0] if query == "text" else texts.shape[0]
    sim = torch.rand(rows, cols, generator=g) * 2 - 1
    ids = [f"q{i}" for i in range(rows)]
    return sim, m, d, texts, videos, ids


@pytest.mark.parametrize("query", ["text", "video"])
def test_rerank_independent_of_chunking_and_batch(query: str) -> None:
    sim, m, d, texts, videos, ids = _rerank_case(query)
    s = RerankSettings(top_k=4, steps=8, chunk=100, seed=1)
    full = rerank(sim, m, d, texts, videos, ids, s)
    chunked = rerank(sim, m, d, texts, videos, ids,
                     RerankSettings(top_k=4, steps=8, chunk=3, seed=1))
    assert torch.allclose(full, chunked, atol=1e-5)
    # a subset of queries, reordered, gives the same rows (query pool kept whole)
    sub = torch.tensor([5, 1, 3])
    if query == "text":
        part = rerank(sim[sub], m, d, texts[sub], videos, [ids[i] for i in sub], s)
    else:
        vsub = VideoFeats(videos.frames[sub], videos.mask[sub], videos.pooled[sub])
        part = rerank(sim[sub], m, d, texts, vsub, [ids[i] for i in sub], s)
    assert torch.allclose(part, full[sub], atol=1e-5)
    # eta > 0 is just as independent
    se = RerankSettings(top_k=4, steps=8, chunk=100, seed=1, eta=1.0)
    a = rerank(sim, m, d, texts, videos, ids, se)
    b = rerank(sim, m, d, texts, videos, ids, RerankSettings(**{**se.__dict__, "chunk": 4}))
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, full)


def test_rerank_only_touches_top_k() -> None:
    sim, m, d, texts, videos, ids = _rerank_case()
    out = rerank(sim, m, d, texts, videos, ids, RerankSettings(top_k=3, steps=5, alpha=0.5))
    delta = out - sim
    top = sim.topk(3, dim=1).indices
    touched = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, top, True)
    assert torch.all(delta[~touched] == 0)
    # the boosts of a row are alpha * a softmax: they sum to alpha
    assert torch.allclose(delta.sum(1), torch.full((sim.shape[0],), 0.5), atol=1e-5)
    # every top-K entry still beats every other entry: the generator only re-orders the top K
    lowest_top = out.masked_fill(~touched, 9).min(1).values
    assert (lowest_top > sim.masked_fill(touched, -9).max(1).values).all()
    assert torch.equal(rerank(sim, m, d, texts, videos, ids, RerankSettings(alpha=0.0)), sim)
    with pytest.raises(ValueError):
        rerank(sim, m, d, texts, videos, ids, RerankSettings(), direction="v2t")


def test_rerank_seed_changes_noise() -> None:
    sim, m, d, texts, videos, ids = _rerank_case()
    a = rerank(sim, m, d, texts, videos, ids, RerankSettings(top_k=4, steps=3, seed=0))
    b = rerank(sim, m, d, texts, videos, ids, RerankSettings(top_k=4, steps=3, seed=0))
    c = rerank(sim, m, d, texts, videos, ids, RerankSettings(top_k=4, steps=3, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# the stage, end to end on a tiny real fixture (features + stage-1 checkpoint)
# ---------------------------------------------------------------------------------------------


def _write_tiny_stage(root, n_videos: dict[str, int], caps: int = 2, dim: int = 16,
                      frames: int = 4, words: int = 6):
    """Prepared tables, one `final`-layer feature shard of random features and a random
    stage-1 checkpoint: everything `train-diffusion` reads, built in well under a second."""
    import numpy as np
    import pandas as pd

    from pipeline.config import Params, from_dict
    from pipeline.features.store import ShardWriter, shard_name
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel
    from pipeline.training import checkpoint

    params = from_dict(Params, {
        "paths": {k: str(root / k) for k in ("prepared", "features", "contrastive", "diffusion")},
        "diffusion": {"hidden": 16, "heads": 2, "negatives": 7, "batch_size": 8, "epochs": 2,
                      "timesteps": 10, "sampling_steps": 5, "top_k": 4, "chunk_queries": 5},
        "tracking": {"enabled": False},
    })
    rng = np.random.default_rng(0)
    vids = [(f"{s}{i:02d}", s) for s, n in n_videos.items() for i in range(n)]
    cap_rows = [(f"{v}#{j}", v, "text", s) for v, s in vids for j in range(caps)]
    prep = root / "prepared"
    prep.mkdir(parents=True)
    pd.DataFrame(vids, columns=["video_id", "split"]).to_parquet(prep / "videos.parquet")
    pd.DataFrame(cap_rows, columns=["caption_id", "video_id", "text", "split"]).to_parquet(
        prep / "captions.parquet")
    attrs = {"schema_version": 1, "backbone_fingerprint": "x", "cache_layer": "final",
             "dtype": "float16", "max_words": words}
    (root / "features").mkdir()
    with ShardWriter(root / "features" / shard_name(0), attrs, "float16") as w:
        n, m = len(vids), len(cap_rows)
        w.create_video([v for v, _ in vids], (frames, dim))
        vmask = np.ones((n, frames), dtype=bool)
        vmask[::3, -1] = False
        w.write_rows("video", 0, feats=rng.normal(size=(n, frames, dim)), mask=vmask)
        w.create_text("text", [c for c, *_ in cap_rows], [v for _, v, *_ in cap_rows],
                      (words, dim), dim)
        tmask = np.zeros((m, words), dtype=bool)
        tmask[:, :4] = True
        w.write_rows("text", 0, feats=rng.normal(size=(m, words, dim)), mask=tmask,
                     eos=np.full(m, 3, dtype=np.int32), pooled=rng.normal(size=(m, dim)))
    torch.manual_seed(0)
    cfg = RetrievalConfig(clip_config={"projection_dim": dim}, cache_layer="final",
                          max_frames=frames, temporal_layers=1, temporal_heads=2)
    checkpoint.save(root / "contrastive" / "best", RetrievalModel(cfg), {"step": 0},
                    config=cfg.to_dict())
    return params


@pytest.fixture(scope="module")
def stage_fixture(tmp_path_factory: pytest.TempPathFactory):
    return _write_tiny_stage(tmp_path_factory.mktemp("diffusion"), {"train": 16, "val": 4})


def test_stage_trains_selects_on_val_and_never_recomputes_stage1(
    stage_fixture, tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.diffusion_stage import run_train_diffusion
    from pipeline.dist import DistEnv
    from pipeline.inference import load_denoisers
    from pipeline.io import read_json
    from pipeline.models.retrieval import RetrievalModel
    from pipeline.tracking import Tracker

    params = stage_fixture
    calls = {"text": 0, "video": 0}
    enc_t, enc_v = RetrievalModel.encode_text, RetrievalModel.encode_video

    def count_t(self, *a):  # noqa: ANN001, ANN202
        calls["text"] += 1
        return enc_t(self, *a)

    def count_v(self, *a):  # noqa: ANN001, ANN202
        calls["video"] += 1
        return enc_v(self, *a)

    monkeypatch.setattr(RetrievalModel, "encode_text", count_t)
    monkeypatch.setattr(RetrievalModel, "encode_video", count_v)
    out = tmp_path / "diffusion"
    metrics = run_train_diffusion(params, Tracker(), DistEnv(), out_dir=out)
    # train + val, one chunk each: stage 1 ran once per split, never per step (8 steps here)
    assert calls == {"text": 2, "video": 2}
    assert metrics["steps"] == 8 and metrics["best_step"] in (4, 8)
    val = metrics["val"]
    for key in ("R1", "t2v_R1", "v2t_R1", "stage1_t2v_R1", "t2v_MnR", "rerank_seconds"):
        assert math.isfinite(val[key])
    assert read_json(out / "best" / "state.json")["selection_metric"] == "R1"
    assert read_json(out / "metrics.json")["val"] == val
    pair, diffusion = load_denoisers(out / "best", params, torch.device("cpu"))
    assert diffusion.timesteps == params.diffusion.timesteps
    from safetensors.torch import load_file

    names = load_file(str(out / "best" / "model.safetensors"))
    assert {n.split(".")[0] for n in names} == {"t2v", "v2t"}


def test_stage_loss_trains_both_denoisers(stage_fixture) -> None:
    from pipeline.diffusion_stage import DiffusionTask, build_pair, prepare_outputs

    stage1, train_out, val_out = prepare_outputs(stage_fixture, torch.device("cpu"))
    pair = build_pair(stage_fixture, train_out.text.sentence.shape[-1])
    task = DiffusionTask(pair, stage1, train_out, val_out, stage_fixture.diffusion, 0)
    batch = task.collate(list(range(8)))
    loss, parts = task.loss(pair, batch)
    loss.backward()
    assert loss.item() == pytest.approx(parts["t2v"] + parts["v2t"], rel=1e-5)
    assert pair.t2v.mlp_out.weight.grad.abs().sum() > 0
    assert pair.v2t.mlp_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stage1.parameters())
    _, _, t2v, v2t = task.batch_inputs(batch)
    # 16 train videos x 2 captions: batch of captions 0..7 = 4 videos, so 3 valid negatives
    assert t2v.mask.sum(1).tolist() == [4] * 8
    assert v2t.mask.sum(1).tolist() == [7] * 8


def test_cli_train_diffusion(stage_fixture, tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from pipeline.config import to_dict
    from stages.app import app

    raw = to_dict(stage_fixture)
    raw.pop("source")
    raw["paths"]["diffusion"] = str(tmp_path / "diffusion")
    good = tmp_path / "params.yaml"
    good.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train-diffusion", "--params", str(good)])
    assert result.exit_code == 0, result.output
    assert "(stage 1 -> re-ranked)" in result.output
    assert (tmp_path / "diffusion" / "metrics.json").is_file()
    raw["paths"]["contrastive"] = str(tmp_path / "nowhere")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train-diffusion", "--params", str(bad)])
    assert result.exit_code == 1
    assert "no stage-1 checkpoint" in result.output


def _train_rank(rank: int, world: int, port: int, params, out: str) -> None:
    import os

    import torch.distributed as torch_dist

    from pipeline.diffusion_stage import run_train_diffusion
    from pipeline.dist import DistEnv
    from pipeline.tracking import Tracker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = run_train_diffusion(params, Tracker(), DistEnv(rank, rank, world), out_dir=out)
        torch.save(metrics, f"{out}-rank{rank}.pt")
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_with_ddp(stage_fixture, tmp_path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "diffusion")
    torch.multiprocessing.spawn(_train_rank, args=(2, port, stage_fixture, out), nprocs=2,
                                join=True)
    m0, m1 = (torch.load(f"{out}-rank{r}.pt") for r in (0, 1))
    assert m0 == m1 and m0["steps"] == 4  # 32 captions / 2 ranks / batch 8 x 2 epochs
    assert (tmp_path / "diffusion" / "best" / "model.safetensors").is_file()
