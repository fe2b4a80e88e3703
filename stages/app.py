"""The `dret` command line: one typer app, one command per pipeline stage."""
from __future__ import annotations

import typer

from stages import (
    backbone,
    evaluate,
    features,
    frames,
    ood,
    prepare,
    search,
    train_contrastive,
    train_diffusion,
)

app = typer.Typer(
    name="dret",
    help=(
        "DiffusionRet text-video retrieval pipeline. Each command is one DVC stage "
        "(see dvc.yaml) and reads its settings from params.yaml (--params to use another file)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """DiffusionRet text-video retrieval pipeline (run `dret COMMAND --help` for a stage's help)."""


app.command("prepare")(prepare.main)
app.command("frames")(frames.main)
app.command("backbone")(backbone.main)
app.command("features")(features.main)
app.command("evaluate")(evaluate.main)
app.command("search")(search.main)
app.command("ood")(ood.main)
app.command("train-diffusion")(train_diffusion.main)
app.command("train-contrastive")(train_contrastive.main)
