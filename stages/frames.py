"""`dret frames`: sample frames of every prepared video into resumable Parquet shards."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, echo_table, guard, load

ShardOption = Annotated[
    str | None,
    typer.Option("--shard", help="Write only shards i with i % N == I (I/N), e.g. 0/2 and 1/2 on "
                 "two machines; the last one to finish writes the manifest."),
]


def main(params: ParamsOption = Path("params.yaml"), shard: ShardOption = None) -> None:
    """Decode frames uniformly in time (frames.fps, at most frames.max_frames), resize + crop.

    Writes shard-XXXXX.parquet and failures-XXXXX.parquet per shard of frames.shard_size videos
    (sorted by video_id), then failures.parquet and manifest.json under paths.frames. Completed
    shards are skipped on rerun. Under torchrun each rank writes its share; rank 0 writes the
    manifest. Exits 1 when more than frames.max_failure_rate of the videos failed.
    """
    with guard():
        p = load(params)
        from pipeline import dist, tracking
        from pipeline.frames import check_failure_rate, parse_shard, run_frames

        spec = parse_shard(shard)
        env = dist.env()
        with tracking.stage_run(p, "frames", is_main=env.is_main) as tracker:
            manifest = run_frames(p, spec, check=False)
            if manifest.get("complete"):
                tracker.log_metrics({k: v for k, v in manifest.items() if k != "params"})
                out = Path(p.paths.frames)
                tracker.log_artifact(out / "failures.parquet")
                tracker.log_artifact(out / "manifest.json")
        if env.is_main:
            _report(manifest)
        check_failure_rate(manifest)


def _report(m: dict) -> None:
    if not m.get("complete"):
        typer.echo(f"wrote {m['shards_written']} shards ({m['shards_skipped']} already done); "
                   f"{m.get('shards_missing', '?')} shards of other groups still missing")
        return
    rows = [[k, str(m[k])] for k in (
        "videos", "videos_sampled", "videos_failed", "videos_partial", "frames",
        "frames_per_video_mean", "shards", "shards_written", "shards_skipped", "elapsed_s")]
    rows += [[f"in failures: {k}" + (" (frames kept)" if k == "partial" else ""), str(v)]
             for k, v in m["failures_by_kind"].items()]
    echo_table(rows, ["frames", "value"])
