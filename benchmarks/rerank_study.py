"""Stage-2 study on a trained pipeline: stage 1 alone vs the re-rank, its ablations, knob sweeps.

    .venv/bin/python benchmarks/rerank_study.py --params params.yaml   # val split
    .venv/bin/python benchmarks/rerank_study.py --split val --sweep    # knobs: val only
    .venv/bin/python benchmarks/rerank_study.py --split test --out t.json  # final report

Reads `paths.contrastive/best`, `paths.diffusion/best` and the feature cache. Rows: `stage1`,
`rerank` (the params' settings), and the ablations `zero_xt` (the denoiser sees x_t = 0),
`one_step` (a single sampling step), `alpha0` (no boost = stage 1). `--sweep` adds one-knob-at-
a-time variants of top_k, alpha, rerank_temp and sampling_steps; it refuses the test split, so
knobs are never chosen on test. Captions whose video has no features are left out (the evaluate
stage's protocol counts them as misses instead). Prints a table, writes JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.contrastive import load_model  # noqa: E402
from pipeline.diffusion.rerank import RerankSettings  # noqa: E402
from pipeline.diffusion_stage import ablation_variants, compare_variants, split_outputs  # noqa: E402
from pipeline.features.store import FeatureStore  # noqa: E402
from pipeline.inference import load_denoisers  # noqa: E402

SWEEP = {
    "top_k": [8, 16, 64],
    "alpha": [0.25, 0.5, 2.0, 4.0],
    "temp": [0.1, 0.3, 3.0],
    "steps": [5, 10, 25],
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--sweep", action="store_true", help="one-knob-at-a-time sweep (val only)")
    p.add_argument("--out", default="", help="write the table as JSON here")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args()


def caption_ids(prepared: str, split: str) -> list[str]:
    t = pq.read_table(Path(prepared) / "captions.parquet", columns=["caption_id"],
                      filters=[("split", "==", split)])
    return [str(c) for c in t.column("caption_id").to_pylist()]


def main() -> None:
    a = parse()
    if a.sweep and a.split == "test":
        sys.exit("error: knobs are tuned on the validation split only (drop --sweep or use val)")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    params = load_params(a.params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stage1 = load_model(Path(params.paths.contrastive) / "best", device)
    pair, diffusion = load_denoisers(Path(params.paths.diffusion) / "best", params, device)
    store = FeatureStore(params.paths.features)
    out = split_outputs(stage1, store, caption_ids(params.paths.prepared, a.split), with_sim=True)
    base = RerankSettings.from_config(params.diffusion, params.seed)
    variants = ablation_variants(base)
    if a.sweep:
        for knob, values in SWEEP.items():
            variants.update({f"{knob}={v}": replace(base, **{knob: v}) for v in values})
    table = compare_variants(out, pair, diffusion, variants)
    cols = ["t2v_R1", "t2v_R5", "t2v_R10", "t2v_MnR", "v2t_R1", "v2t_R5", "v2t_R10", "v2t_MnR",
            "seconds"]
    print(f"{a.split}: {len(out.caption_ids)} captions, {len(out.video_ids)} videos, base {base}")
    print(f"{'variant':<14}" + "".join(f"{c:>9}" for c in cols))
    for name, m in table.items():
        print(f"{name:<14}" + "".join(f"{m.get(c, float('nan')):>9.2f}" for c in cols))
    if a.out:
        Path(a.out).write_text(json.dumps({"split": a.split, "base": base.__dict__,
                                           "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
