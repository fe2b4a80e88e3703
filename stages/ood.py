"""`dret ood`: how out-of-distribution a text query looks to the trained models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, echo_table, fail, guard, load
from stages.search import FileOption, IndexOption, JsonOption, read_queries

QueriesArg = Annotated[list[str] | None, typer.Argument(help="One or more text queries.")]


def main(
    queries: QueriesArg = None, file: FileOption = None, as_json: JsonOption = False,
    index: IndexOption = None, params: ParamsOption = Path("params.yaml"),
) -> None:
    """Score how out-of-distribution each query is (higher = more OOD).

    `generator`: normalised entropy (0..1) of the diffusion model's relevance distribution over
    the query's top-K test videos; `baseline`: -max stage-1 similarity over the test videos.
    """
    with guard():
        texts = read_queries(queries, file)
        if not texts:
            fail("no query: give one or more queries or --file")
        p = load(params)
        from pipeline.search import Searcher

        searcher = Searcher.from_dir(index or Path(p.paths.evaluate) / "index", params=p)
        scores = searcher.ood_scores(texts)
        if as_json:
            typer.echo(json.dumps([s.to_dict() for s in scores], indent=2))
            return
        echo_table([[s.query, "-" if s.generator is None else f"{s.generator:.4f}",
                     f"{s.baseline:.4f}"] for s in scores], ["query", "generator", "baseline"])
