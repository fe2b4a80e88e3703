"""A user's own collection: a video folder plus one caption table.

The table is a CSV (`.csv`) or JSON Lines (`.jsonl`) file, or a folder holding `captions.csv` or
`captions.jsonl`, with one row per caption:
- `video`: the clip's path relative to the video root (absolute paths are reduced to the file
  name and looked up under the root),
- `caption`: the text,
- `split` (optional): train, val or test.
Without a `split` column every video is train and prepare carves val from it; nothing is ever
carved into test, so a user who wants a test split must provide the column. Rows with an empty
`video` or an unknown split are rejected and counted. Video id = the relative path without its
extension (two files differing only by extension share an id: the first row's path wins).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline.data.adapters import MALFORMED, Source, number_captions, read_csv
from pipeline.data.paths import ids_from_paths, to_posix
from pipeline.data.tables import SPLITS, RawDataset
from pipeline.errors import PipelineError

TABLE_NAMES = ("captions.csv", "captions.jsonl")
UNKNOWN_SPLIT = "unknown split"


def load(src: Source) -> RawDataset:
    """Read the caption table at `src.annotations` (file or folder) into a RawDataset."""
    path = table_path(src.annotations)
    frame = _read(path)
    video = to_posix(frame["video"])
    if "split" in frame.columns:
        split = frame["split"].fillna("").astype(str).str.strip().str.lower()
    else:
        split = pd.Series("train", index=frame.index, dtype=str)
    blank = video == ""
    unknown = ~blank & ~split.isin(SPLITS)
    ok = ~blank & ~unknown
    rows = pd.DataFrame(
        {
            "video_id": ids_from_paths(video[ok]),
            "path": video[ok],
            "text": frame.loc[ok, "caption"].fillna("").astype(str),
            "split": split[ok],
        }
    ).reset_index(drop=True)
    rows["caption_id"] = number_captions(rows["video_id"])
    videos = rows.drop_duplicates(["video_id", "split"])[["video_id", "path", "split"]]
    return RawDataset(
        videos=videos.reset_index(drop=True),
        captions=rows[["caption_id", "video_id", "text", "split"]],
        video_root=src.video_root,
        rejected=+Counter({MALFORMED: int(blank.sum()), UNKNOWN_SPLIT: int(unknown.sum())}),
    )


def table_path(annotations: Path) -> Path:
    """The caption table: `annotations` itself, or captions.csv/.jsonl inside that folder."""
    if annotations.is_dir():
        for name in TABLE_NAMES:
            if (annotations / name).is_file():
                return annotations / name
        raise PipelineError(f"{annotations}: no {' or '.join(TABLE_NAMES)} in this folder")
    if not annotations.is_file():
        raise PipelineError(f"{annotations}: caption table not found")
    if annotations.suffix.lower() not in (".csv", ".jsonl"):
        raise PipelineError(f"{annotations}: caption table must be .csv or .jsonl")
    return annotations


def _read(path: Path) -> pd.DataFrame:
    """The table with `video` and `caption` columns (PipelineError names what is missing)."""
    if path.suffix.lower() == ".csv":
        return read_csv(path, ["video", "caption"])
    try:
        frame = pd.read_json(path, lines=True, dtype=False)
    except ValueError as exc:
        raise PipelineError(f"{path}: not valid JSON Lines ({exc})") from None
    missing = [c for c in ("video", "caption") if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing field(s) {', '.join(missing)} in every row")
    return frame
