"""The evaluate stage on a tiny real fixture: outputs, protocol (missing videos, multi-caption
v2t) against brute force, chunk invariance, OOD, cross-dataset, the CLI."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import evalkit
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from pipeline.config import Params
from pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def params() -> Params:
    return evalkit.evaluated(0)


def _out(params: Params) -> Path:
    return Path(params.paths.evaluate)


@pytest.mark.slow
def test_outputs_and_metrics_schema(params: Params) -> None:
    out = _out(params)
    m = json.loads((out / "metrics.json").read_text())
    for d in ("t2v", "v2t"):
        for v in ("stage1", "rerank"):
            assert set(m[d][v]) >= {"R1", "R5", "R10", "MdR", "MnR", "R1_ci_low", "R1_ci_high"}
            assert m[d][v]["R1_ci_low"] <= m[d][v]["R1"] <= m[d][v]["R1_ci_high"]
    c = m["counts"]
    assert c["n_gallery"] == {"t2v": 12, "v2t": 12} and c["n_missing"] == 1
    assert c["n_queries"] == {"t2v": 24, "v2t": 12}
    assert set(m["ood"]) == {"novel_word", "novel_composition"}
    for per in m["ood"].values():
        assert set(per) == {"baseline", "generator"}
        assert all(0 <= s["AUROC"] <= 100 and 0 <= s["FPR95"] <= 100 for s in per.values())
    for name in ("recall_curve_t2v.csv", "rank_hist_v2t.csv", "recall_curve_v2t.png"):
        assert (out / "plots" / name).is_file()
    report = (out / "report.md").read_text()
    assert "| t2v | rerank |" in report and "plots/recall_curve_t2v.csv" in report
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert list(ranks.columns) == ["id", "direction", "variant", "rank", "dataset"]
    assert len(ranks) == 2 * (24 + 12)


def _brute_t2v(sim: np.ndarray, cap_video: list[str], cols: list[str], n_gallery: int) -> list:
    out = []
    for q, v in enumerate(cap_video):
        if v not in cols:
            out.append(n_gallery)  # a failed video: its captions miss at every K
            continue
        t = sim[q, cols.index(v)]
        out.append(1 + sum(1 for c in range(sim.shape[1]) if sim[q, c] > t))
    return out


@pytest.mark.slow
def test_ranks_follow_protocol_brute_force(params: Params) -> None:
    out = _out(params)
    npz = np.load(out / "similarity.npz")
    caps = pd.read_parquet(Path(params.paths.prepared) / "captions.parquet").set_index("caption_id")
    cap_ids, cols = list(npz["caption_ids"]), list(npz["video_ids"])
    cap_video = [caps.loc[c, "video_id"] for c in cap_ids]
    ranks = pd.read_parquet(out / "ranks.parquet").set_index(["direction", "variant", "id"])
    for variant in ("stage1", "rerank"):
        expect = _brute_t2v(npz[f"t2v_{variant}"], cap_video, cols, 12)
        got = [ranks.loc[("t2v", variant, c), "rank"] for c in cap_ids]
        assert got == expect
        # v2t: a video's best caption against every other video's best caption
        s = npz[f"v2t_{variant}"]
        for r, vid in enumerate(cols):
            best = {}
            for j, v in enumerate(cap_video):
                best[v] = max(best.get(v, -np.inf), s[r, j])
            expect_r = 1 + sum(1 for v, b in best.items() if v != vid and b > best[vid])
            assert ranks.loc[("v2t", variant, vid), "rank"] == expect_r
    missing = sorted(set(caps["video_id"]) & {v for v in caps.loc[cap_ids, "video_id"]} - set(cols))
    assert len(missing) == 1
    assert ranks.loc[("v2t", "stage1", missing[0]), "rank"] == 12


@pytest.mark.slow
def test_rerank_is_chunk_invariant(params: Params) -> None:
    from pipeline.evaluation import load_eval_set, score_set, settings_from
    from pipeline.features.store import FeatureStore
    from pipeline.inference import Models

    models = Models.load(params)
    store = FeatureStore(params.paths.features)
    es = load_eval_set("test", Path(params.paths.prepared), store, models, "test", 3, "float16")
    base = settings_from(params)
    a = score_set(es, models, base, 3, (1, 5), 0, 0)
    b = score_set(es, models, base.__class__(**{**base.__dict__, "chunk": 2}), 24, (1, 5), 0, 0)
    for d in ("t2v", "v2t"):
        assert torch.allclose(a.sims[d]["rerank"], b.sims[d]["rerank"], atol=1e-5)
        assert np.array_equal(a.ranks[d]["rerank"][1], b.ranks[d]["rerank"][1])
    stored = np.load(_out(params) / "similarity.npz")
    assert np.allclose(stored["t2v_rerank"], a.sims["t2v"]["rerank"].numpy(), atol=1e-5)


@pytest.mark.slow
def test_cli_evaluate_prints_table(params: Params, tmp_path: Path) -> None:
    from stages.app import app

    pf = evalkit.params_file(params, tmp_path / "params.yaml")
    res = CliRunner().invoke(app, ["evaluate", "--params", str(pf)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(ln.startswith("dir") and "R@1" in ln and "MnR" in ln for ln in lines)
    assert sum(1 for ln in lines if ln.startswith(("t2v", "v2t"))) == 4
    assert "ood novel_word" in res.output


@pytest.mark.slow
def test_cross_dataset_same_backbone_and_fingerprint_check(params: Params, tmp_path: Path) -> None:
    from pipeline.evaluation import run_evaluate

    other = tmp_path / "other"
    p2 = evalkit.tiny_params(other)
    evalkit.write_dataset(p2, seed=5, n={"train": 3, "test": 7}, missing=0, caps_per_video=3)
    shutil.copytree(params.paths.backbone, p2.paths.backbone)  # the same backbone
    from pipeline.features.extract import run_features

    run_features(p2)
    m = run_evaluate(params, other_dataset=str(other))
    o = m["other"]
    assert o["dataset"] == "other" and o["counts"]["n_gallery"]["t2v"] == 7
    assert o["counts"]["n_queries"]["t2v"] == 21 and o["counts"]["n_missing"] == 0
    assert set(o["t2v"]) == {"stage1", "rerank"}
    ranks = pd.read_parquet(_out(params) / "ranks.parquet")
    assert (ranks["dataset"] == "other").sum() == 2 * (21 + 7)
    assert "Cross-dataset: other" in (_out(params) / "report.md").read_text()
    # a dataset whose features come from another backbone is refused
    alien = tmp_path / "alien"
    p3 = dataclasses.replace(evalkit.tiny_params(alien), seed=1)  # other random weights
    evalkit.write_dataset(p3, seed=9, n={"train": 3, "test": 3}, missing=0)
    evalkit.build_features(p3)  # its own scratch backbone: another fingerprint
    with pytest.raises(PipelineError, match="backbone_fingerprint"):
        run_evaluate(params, other_dataset=str(alien))


def _random_models(n_frames: int = 5, dim: int = 16):
    from pipeline.diffusion.schedule import GaussianDiffusion
    from pipeline.inference import Models
    from pipeline.models.denoiser import DenoiserPair
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel

    torch.manual_seed(0)
    cfg = RetrievalConfig(clip_config={"projection_dim": dim}, cache_layer="final",
                          max_frames=n_frames, temporal_layers=1, temporal_heads=2,
                          chunk_elems=500)  # small blocks: several video blocks per call
    stage1 = RetrievalModel(cfg).eval()
    with torch.no_grad():
        for m in (stage1.text_weights, stage1.frame_weights):
            m.mlp[2].weight.normal_(0, 0.5)
    pair = DenoiserPair(dim, 16, 2).eval()
    return Models(Params(), stage1, pair, GaussianDiffusion(10), torch.device("cpu"))


def _random_outputs(m: int, n: int, f: int = 5, n_tok: int = 6, dim: int = 16):
    from pipeline.models.retrieval import TextOut, VideoOut

    g = torch.Generator().manual_seed(1)
    tmask = torch.arange(n_tok)[None] < torch.randint(1, n_tok + 1, (m, 1), generator=g)
    vmask = torch.arange(f)[None] < torch.randint(1, f + 1, (n, 1), generator=g)
    tokens, frames = torch.randn(m, n_tok, dim, generator=g), torch.randn(n, f, dim, generator=g)
    return (TextOut(tokens, tmask, tokens[:, 0]),
            VideoOut(frames, vmask, frames.mean(1)))


def test_gallery_scores_equal_model_similarity() -> None:
    from pipeline.scoring import frame_weights, gallery, similarity

    models = _random_models()
    text, video = _random_outputs(7, 23)
    with torch.no_grad():
        ref = models.stage1.similarity(text, video)
    g = gallery(video, frame_weights(models, video, 4))
    got = similarity(models, text, video, g, chunk=3)
    assert torch.allclose(got, ref, atol=1e-6)


def test_rerank_candidates_equals_full_rerank() -> None:
    from pipeline.diffusion.rerank import RerankSettings, rerank
    from pipeline.models.denoiser import VideoFeats
    from pipeline.scoring import rerank_candidates

    models = _random_models()
    text, video = _random_outputs(9, 40)
    sim = models.stage1.similarity(text, video).detach()
    s = RerankSettings(top_k=4, steps=5, chunk=4, seed=3)
    ids = [f"q{i}" for i in range(9)]
    full = rerank(sim, models.denoisers.t2v, models.diffusion, text.sentence,
                  VideoFeats(*video), ids, s, "t2v")
    sub = rerank_candidates(sim, models.denoisers.t2v, models.diffusion, text.sentence, video,
                            ids, s)
    assert torch.allclose(sub, full, atol=1e-6)
    assert not torch.equal(full, sim)  # the re-rank did change the top K
