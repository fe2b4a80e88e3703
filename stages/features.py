"""`dret features`: CLIP features of every frame and caption into HDF5 shards."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, guard, load


def main(
    params: ParamsOption = Path("params.yaml"),
    shard: Annotated[
        int | None, typer.Option("--shard", help="Build only this shard index (no manifest).")
    ] = None,
) -> None:
    """Encode frame shards and captions with the recorded backbone into paths.features.

    One shard-XXXXX.h5 per frames shard, up to features.cache_layer (final = frozen backbone,
    k = hidden states entering block k for fine-tuning the rest in stage 1). Up-to-date shards
    are reused, stale or corrupt ones rebuilt; under torchrun rank r builds shards r, r+W, ...
    """
    with guard():
        p = load(params)
        from pipeline import dist, tracking
        from pipeline.features.extract import run_features

        env = dist.init()
        try:
            with tracking.stage_run(p, "features", is_main=env.is_main) as tracker:
                summary = run_features(p, shard, env=env)
                tracker.log_metrics({k: v for k, v in summary.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
                tracker.log_metrics({f"rank0_{k}": v for k, v in summary.get("rank0", {}).items()})
                tracker.log_artifact(Path(p.paths.features) / "manifest.json")
        finally:
            dist.shutdown()
        if env.is_main and "n_shards" in summary:
            typer.echo(f"{summary['n_shards']} shards: {summary['videos']} videos, "
                       f"{summary['frames']} frames, {summary['captions']} captions, "
                       f"{summary['bytes'] / 1e6:.1f} MB "
                       f"({summary['frames_per_s']} frames/s built)")
        elif "shards_built" in summary:
            typer.echo(f"built {summary['shards_built']} shards, reused {summary['shards_reused']}")
