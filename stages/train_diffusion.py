"""`dret train-diffusion`: DiffusionRet stage 2, the t2v and v2t denoisers on frozen stage 1."""
from __future__ import annotations

from pathlib import Path

import typer

from stages.common import ParamsOption, guard, load


def main(params: ParamsOption = Path("params.yaml")) -> None:
    """Train the two denoisers that re-rank stage 1's top-K candidates (paths.diffusion).

    Reads the feature cache and `paths.contrastive/best`; computes stage 1's outputs once, then
    trains with the shared loop (diffusion.* params); picks best/ by validation R@1 with the full
    re-rank. Writes best/ and last/ (both denoisers in one safetensors), curves.csv, metrics.json.
    """
    with guard():
        p = load(params)
        from pipeline import dist, tracking
        from pipeline.diffusion_stage import run_train_diffusion

        env = dist.init()
        try:
            with tracking.stage_run(p, "train_diffusion", is_main=env.is_main) as tracker:
                metrics = run_train_diffusion(p, tracker, env)
        finally:
            dist.shutdown()
        if env.is_main:
            v = metrics["val"]
            typer.echo(
                f"{metrics['steps']} steps in {metrics['elapsed_s']:.0f} s, best step "
                f"{metrics['best_step']}: val R@1 t2v {v.get('stage1_t2v_R1', float('nan')):.1f}"
                f" -> {v.get('t2v_R1', float('nan')):.1f}, v2t "
                f"{v.get('stage1_v2t_R1', float('nan')):.1f} -> {v.get('v2t_R1', float('nan')):.1f}"
                " (stage 1 -> re-ranked)"
            )
