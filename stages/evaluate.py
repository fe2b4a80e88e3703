"""`dret evaluate`: test metrics with and without the diffusion re-rank, OOD, search index."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, echo_table, guard, load

OtherOption = Annotated[
    Path | None,
    typer.Option("--other-dataset", help="Also evaluate another dataset: a folder holding its "
                 "prepared/ and features/ (same backbone); overrides evaluate.other_dataset."),
]


def main(params: ParamsOption = Path("params.yaml"), other_dataset: OtherOption = None) -> None:
    """Score the test split with stage 1 alone and with the diffusion re-rank, both directions.

    Writes metrics.json (R@1/5/10/50, MdR, MnR, R@1 bootstrap CI, counts, OOD AUROC/FPR@95TPR,
    cross-dataset), ranks.parquet, similarity.npz, plots/ (CSV + PNG), report.md and index/ (for
    `dret search`) under paths.evaluate, and prints the metrics table.
    """
    with guard():
        p = load(params)
        from pipeline import dist, tracking
        from pipeline.eval_outputs import metrics_header, metrics_rows
        from pipeline.evaluation import run_evaluate

        if not dist.env().is_main:  # one process scores everything; extra ranks have nothing to do
            return
        out = Path(p.paths.evaluate)
        with tracking.stage_run(p, "evaluate") as tracker:
            metrics = run_evaluate(p, str(other_dataset) if other_dataset else None)
            tracker.log_metrics(metrics)  # nested keys flattened, strings dropped
            for name in ("metrics.json", "report.md", "ranks.parquet", "plots"):
                tracker.log_artifact(out / name, None if name != "plots" else "plots")
            tracker.log_artifact(Path(p.paths.frames) / "failures.parquet")
        ks = p.evaluate.recall_ks
        echo_table(metrics_rows(metrics, ks), metrics_header(ks))
        for kind, per in metrics.get("ood", {}).items():
            typer.echo("ood " + kind + ": " + ", ".join(
                f"{s} AUROC {m['AUROC']:.1f} FPR95 {m['FPR95']:.1f}" for s, m in per.items()))
        if "other" in metrics:
            typer.echo(f"cross-dataset: {metrics['other']['dataset']}")
            echo_table(metrics_rows(metrics["other"], ks), metrics_header(ks))
