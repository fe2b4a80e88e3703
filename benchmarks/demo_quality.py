"""Stage-1 quality on the synthetic demo's TEST split: the table of issue 5.

Variants: (a) `untrained`: the backbone's own final outputs, mean pooling, cosine; (b) `mean`:
stage 1 with mean pooling (no temporal transformer, so no frame layout, and no reversed
negatives: pooling cannot use them); (c) `wti`: stage 1 as configured in params.yaml (temporal
transformer + WTI). Columns: t2v / v2t R@1/5/10 and MnR; direction (share of moving test
clips' captions that score higher against the clip than against the clip played backwards;
chance 50%); t2v R@1 on clips whose attribute tuple never occurs in training (unseen) and on
one-attribute twins; per-attribute top-1 accuracy (the top-1 clip shares colour / shape /
motion with the right one).

    .venv/bin/python benchmarks/demo_quality.py --params params.yaml --seeds 0,1,2 \
        --work data/bench/stage1 [--variants untrained,mean,wti] [--checkpoint DIR ...]

Trains each (variant, seed) into WORK/<variant>-s<seed> (resumes / reuses finished runs), or
only evaluates the given checkpoint dirs. The test split is read here and in evaluation only.
Writes WORK/quality.json and WORK/quality.md and prints the table (mean +- std over seeds).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import torch
import typer

from pipeline.config import Params, load_params
from pipeline.contrastive import (
    build_model,
    encode_texts,
    encode_videos,
    load_model,
    retrieval_ranks,
    run_contrastive,
)
from pipeline.dist import DistEnv
from pipeline.features.dataset import CaptionVideoDataset
from pipeline.features.store import FeatureStore
from pipeline.io import read_json, write_json
from pipeline.log import setup_logging
from pipeline.models.retrieval import RetrievalModel
from pipeline.tracking import Tracker

ATTRIBUTES = ("colours", "shapes", "motion")
TIE = 1e-5  # score differences below this are ties (float noise of reordered sums)
COLUMNS = [
    "t2v_R1", "t2v_R5", "t2v_R10", "t2v_MnR", "v2t_R1", "v2t_R5", "v2t_R10", "v2t_MnR",
    "direction", "unseen_t2v_R1", "twins_t2v_R1", "colours_top1", "shapes_top1", "motion_top1",
]


def _canonical(value: str) -> str:
    """An attribute value independent of object order ("red|blue" == "blue|red")."""
    return "|".join(sorted(str(value).split("|")))


@torch.no_grad()
def test_quality(model: RetrievalModel, store: FeatureStore, prepared: Path) -> dict[str, float]:
    """The table's columns for one model on the test split (percent, MnR in ranks)."""
    model.eval()
    caps = pd.read_parquet(prepared / "captions.parquet", filters=[("split", "==", "test")])
    videos = pd.read_parquet(prepared / "videos.parquet", filters=[("split", "==", "test")])
    data = CaptionVideoDataset(store, caps["caption_id"].tolist())
    text = encode_texts(model, store, data.caption_ids)
    video = encode_videos(model, store, data.video_ids)
    backwards = encode_videos(model, store, data.video_ids, backwards=True)
    sim = model.similarity(text, video).cpu()  # (M, N)
    sim_back = model.similarity(text, backwards).cpu()
    gt = data.video_index
    t2v, v2t = retrieval_ranks(sim, gt)
    out: dict[str, float] = {}
    for d, r in (("t2v", t2v), ("v2t", v2t)):
        r = r.double()
        out.update({f"{d}_R{k}": float(100 * (r <= k).double().mean()) for k in (1, 5, 10)})
        out[f"{d}_MnR"] = float(r.mean())
    vmeta = videos.set_index("video_id").loc[data.video_ids]  # rows in video_index order
    moving = torch.tensor((vmeta["motion"] != "static").to_numpy())[gt]  # per caption
    rows = torch.arange(len(gt))
    margin = sim[rows, gt] - sim_back[rows, gt]
    # a tie (order-blind scores, e.g. mean pooling, up to float rounding) counts as a coin flip
    wins = (margin > TIE).double() + 0.5 * (margin.abs() <= TIE).double()
    out["direction"] = float(100 * wins[moving].mean())
    unseen = torch.tensor(~vmeta["seen_combo"].astype(bool).to_numpy())[gt]
    twins = torch.tensor((vmeta["twin_of"].fillna("") != "").to_numpy())[gt]
    out["unseen_t2v_R1"] = float(100 * (t2v[unseen] == 1).double().mean())
    out["twins_t2v_R1"] = float(100 * (t2v[twins] == 1).double().mean())
    top1 = sim.argmax(1)
    for attr in ATTRIBUTES:
        values = np.array([_canonical(v) for v in vmeta[attr]])
        out[f"{attr}_top1"] = float(100 * np.mean(values[top1.numpy()] == values[gt.numpy()]))
    out["n_queries"] = float(len(gt))
    out["n_moving"] = float(moving.sum())
    out["n_unseen"] = float(unseen.sum())
    out["n_twins"] = float(twins.sum())
    return out


def variant_params(params: Params, variant: str, seed: int, work: Path) -> Params:
    """The params of one training run: (b) mean pooling or (c) as configured."""
    c = params.contrastive
    if variant == "mean":
        c = dataclasses.replace(c, similarity="mean", temporal_layers=0, reverse_negatives=False,
                                layout_dim=0)
    elif variant != "wti":
        raise ValueError(f"unknown variant {variant!r}")
    paths = dataclasses.replace(params.paths, contrastive=str(work / f"{variant}-s{seed}"))
    return dataclasses.replace(params, seed=seed, contrastive=c, paths=paths)


def _train(params: Params) -> dict[str, float]:
    out = Path(params.paths.contrastive)
    if (out / "metrics.json").is_file():  # finished earlier: reuse
        return read_json(out / "metrics.json")
    return run_contrastive(params, Tracker(), DistEnv())


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def table(results: dict[str, list[dict[str, float]]]) -> str:
    """Markdown table: one row per variant, mean ± std over its runs."""
    head = "| variant | runs | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, runs in results.items():
        cells = [_fmt([r[c] for r in runs]) for c in COLUMNS]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(
    params: Annotated[Path, typer.Option("--params", "-p")] = Path("params.yaml"),
    work: Annotated[Path, typer.Option(help="Where runs, quality.json and quality.md go.")] = Path(
        "data/bench/stage1"),
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0",
    variants: Annotated[str, typer.Option(help="untrained, mean, wti (comma-separated).")] = (
        "untrained,mean,wti"),
    checkpoint: Annotated[list[Path] | None, typer.Option(
        help="Only evaluate these stage-1 checkpoint dirs (repeatable).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (0: leave as is).")] = 0,
) -> None:
    """Train (or load) the variants and print the test-split quality table."""
    setup_logging()
    os.environ.setdefault("DRET_TRACKING", "off")
    if threads:
        torch.set_num_threads(threads)
    p = load_params(params)
    store = FeatureStore(p.paths.features)
    prepared = Path(p.paths.prepared)
    results: dict[str, list[dict[str, float]]] = {}
    runs: dict[str, list[dict[str, float]]] = {}
    if checkpoint:
        for ckpt in checkpoint:
            results[str(ckpt)] = [test_quality(load_model(ckpt), store, prepared)]
    else:
        for variant in variants.split(","):
            for seed in (int(s) for s in seeds.split(",")):
                if variant == "untrained":
                    if seed != int(seeds.split(",")[0]):
                        continue  # deterministic given the backbone
                    q = test_quality(build_model(_untrained(p), store), store, prepared)
                else:
                    vp = variant_params(p, variant, seed, work)
                    t0 = time.perf_counter()
                    m = _train(vp)
                    runs.setdefault(variant, []).append({**m, "wall_s": time.perf_counter() - t0})
                    q = test_quality(load_model(Path(vp.paths.contrastive) / "best"), store,
                                     prepared)
                results.setdefault(variant, []).append(q)
    md = table(results)
    typer.echo(md)
    for variant, rs in runs.items():
        typer.echo(f"{variant}: " + "; ".join(
            f"{r['steps']} steps, {r['steps_per_s']:.2f} steps/s, {r['samples_per_s']:.0f} "
            f"samples/s, {r['elapsed_s']:.0f} s training" for r in rs))
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "quality.json", {"results": results, "runs": runs,
                                       "params": str(params)})
    (work / "quality.md").write_text(md + "\n", encoding="utf-8")
    typer.echo(json.dumps({k: len(v) for k, v in results.items()}))


def _untrained(params: Params) -> Params:
    c = dataclasses.replace(params.contrastive, similarity="mean", temporal_layers=0,
                            layout_dim=0)
    return dataclasses.replace(params, contrastive=c)


if __name__ == "__main__":
    typer.run(main)
