"""`dret prepare`: build videos.parquet / captions.parquet for the chosen dataset."""
from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption, guard, load


def main(params: ParamsOption = Path("params.yaml")) -> None:
    """Read the dataset's annotations (or generate the synthetic demo) into Parquet tables.

    Writes videos.parquet, captions.parquet (synthetic: ood_captions.parquet and the clips) and
    summary.json under paths.prepared; prints counts per split, missing videos, rejected rows.
    """
    with guard():
        p = load(params)
        from pipeline import tracking
        from pipeline.data.prepare import run_prepare

        with tracking.stage_run(p, "prepare") as tracker:
            summary = run_prepare(p)
            tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            tracker.log_artifact(Path(p.paths.prepared) / "summary.json")
        typer.echo(summary_text(summary))


def summary_text(summary: dict) -> str:
    lines = [f"dataset {summary['dataset']}: video root {summary['video_root']}"]
    for split, c in summary["splits"].items():
        lines.append(f"  {split:<5} {c['videos']:>7} videos {c['captions']:>8} captions")
    lines.append(f"  missing on disk: {summary['videos_missing']}")
    for reason, n in summary.get("rejected", {}).items():
        lines.append(f"  rejected {n} rows: {reason}")
    return "\n".join(lines)
