"""`dret train-contrastive`: DiffusionRet stage 1, contrastive training on the feature cache."""
from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption, echo_table, guard, load


def main(params: ParamsOption = Path("params.yaml")) -> None:
    """Train the retrieval model (backbone tail + temporal transformer + WTI) on cached features.

    Symmetric InfoNCE over the training captions (gathered across ranks under torchrun), warmup +
    cosine LR, model selection by validation R@1 (mean of t2v and v2t). Writes best/ and last/
    checkpoints, curves.csv and metrics.json under paths.contrastive; resumes from last/. Prints
    the best validation metrics and the training speed (steps/s, samples/s).
    """
    with guard():
        p = load(params)
        from pipeline import dist, tracking
        from pipeline.contrastive import run_contrastive

        env = dist.init()
        try:
            with tracking.stage_run(p, "train_contrastive", is_main=env.is_main) as tracker:
                metrics = run_contrastive(p, tracker, env)
        finally:
            dist.shutdown()
        if env.is_main:
            val = metrics["val"]
            rows = [[d, *(f"{val.get(f'{d}_{k}', float('nan')):.1f}"
                          for k in ("R1", "R5", "R10", "MdR", "MnR"))] for d in ("t2v", "v2t")]
            typer.echo(f"best checkpoint: step {metrics['best_step']} of {metrics['steps']} "
                       f"(validation)")
            echo_table(rows, ["direction", "R@1", "R@5", "R@10", "MdR", "MnR"])
            typer.echo(f"speed: {metrics['steps_per_s']:.2f} steps/s, "
                       f"{metrics['samples_per_s']:.1f} samples/s "
                       f"({metrics['pairs_per_s']:.1f} pairs/s with reversed negatives), "
                       f"{metrics['elapsed_s']:.0f} s")
