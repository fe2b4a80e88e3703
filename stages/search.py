"""`dret search`: text-to-video (or, with --video, video-to-text) search of the collection."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, echo_table, fail, guard, load

QueriesArg = Annotated[list[str] | None, typer.Argument(help="One or more text queries.")]
FileOption = Annotated[
    Path | None, typer.Option("--file", "-f", help="Read queries from a file, one per line.")
]
KOption = Annotated[int, typer.Option("--k", "-k", min=1, help="Results per query.")]
RerankOption = Annotated[
    bool, typer.Option("--rerank/--no-rerank", help="Re-rank the top K with the diffusion model.")
]
SplitOption = Annotated[
    str | None, typer.Option("--split", help="Search only this split (train, val or test).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (one document) instead.")]
VideoOption = Annotated[
    Path | None, typer.Option("--video", help="Video-to-text: captions matching this video file.")
]
IndexOption = Annotated[
    Path | None, typer.Option("--index", help="Index folder (default: <paths.evaluate>/index).")
]


def read_queries(queries: list[str] | None, file: Path | None) -> list[str]:
    """Queries from the arguments and/or a file (blank lines of the file are skipped)."""
    out = list(queries or [])
    if file is not None:
        if not file.is_file():
            fail(f"{file}: no such query file")
        out += [ln for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return out


def main(
    queries: QueriesArg = None, file: FileOption = None, k: KOption = 10,
    rerank: RerankOption = True, split: SplitOption = None, as_json: JsonOption = False,
    video: VideoOption = None, index: IndexOption = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Search the indexed collection (built by `dret evaluate`) for each query.

    Prints a table per query (rank, score, video id, split, path) or, with --json, one JSON
    document: [{"query": ..., "results": [{"rank", "video_id", "score", "stage1_score",
    "path", "split", "timestamps"}]}]. With --video, captions of the collection instead.
    """
    with guard():
        texts = read_queries(queries, file)
        if video is None and not texts:
            fail("no query: give one or more queries, --file or --video")
        p = load(params)
        from pipeline.search import Searcher

        searcher = Searcher.from_dir(index or Path(p.paths.evaluate) / "index", params=p,
                                     rerank=rerank)
        if video is not None:
            caps = searcher.search_video(video, k=k, rerank=rerank, split=split)
            if as_json:
                typer.echo(json.dumps({"video": str(video),
                                       "results": [c.to_dict() for c in caps]}, indent=2))
                return
            echo_table([[str(c.rank), f"{c.score:.4f}", c.video_id, c.text] for c in caps],
                       ["rank", "score", "video_id", "caption"])
            return
        results = searcher.search(texts, k=k, rerank=rerank, split=split)
        if as_json:
            doc = [{"query": q, "results": [r.to_dict() for r in res]}
                   for q, res in zip(texts, results, strict=True)]
            typer.echo(json.dumps(doc, indent=2))
            return
        for q, res in zip(texts, results, strict=True):
            typer.echo(f"query: {q}")
            echo_table([[str(r.rank), f"{r.score:.4f}", r.video_id, r.split, r.path]
                        for r in res], ["rank", "score", "video_id", "split", "path"])
