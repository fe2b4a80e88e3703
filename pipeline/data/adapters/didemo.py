"""DiDeMo, paragraph-to-video retrieval: one caption per video, all its descriptions joined.

Two annotation formats, detected from the folder:
- the original JSON (`{train,val,test}_data.json`: lists of {video, times, description,
  annotation_id}); a video's paragraph is its descriptions in `annotation_id` order;
- the repackaged label CSVs (`didemo_{train,val,test}_label.csv`: success, video_path, starts,
  ends, text, ...), whose `text` already is the paragraph and whose `video_path` is an absolute
  path on another machine, sometimes without extension (prepare reduces it to the file name).
  Rows with `success` false are counted as rejected.
Video id = the file name without extension.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline.data.adapters import (
    MALFORMED,
    Source,
    paragraphs,
    read_csv,
    read_json,
)
from pipeline.data.paths import file_names, strip_extension, to_posix
from pipeline.data.tables import SPLITS, RawDataset
from pipeline.errors import PipelineError

JSON_FILE = "{split}_data.json"
CSV_FILE = "didemo_{split}_label.csv"
UNSUCCESSFUL = "source row marked unsuccessful"


def load(src: Source) -> RawDataset:
    """Read DiDeMo's train/val/test annotations (JSON if present, else the label CSVs)."""
    folder = src.annotations
    if all((folder / JSON_FILE.format(split=s)).is_file() for s in SPLITS):
        reader, pattern = _read_json, JSON_FILE
    elif all((folder / CSV_FILE.format(split=s)).is_file() for s in SPLITS):
        reader, pattern = _read_csv, CSV_FILE
    else:
        raise PipelineError(
            f"{folder}: DiDeMo needs {JSON_FILE.format(split='{train,val,test}')} or "
            f"{CSV_FILE.format(split='{train,val,test}')}"
        )
    rejected: Counter = Counter()
    parts = []
    for split in SPLITS:
        rows, counts = reader(folder / pattern.format(split=split))
        parts.append(rows.assign(split=split))
        rejected.update(counts)
    rows = pd.concat(parts, ignore_index=True)
    rows["video_id"] = strip_extension(file_names(to_posix(rows["path"])))
    videos = rows[["video_id", "path", "split"]].reset_index(drop=True)
    captions = rows.assign(caption_id=rows["video_id"])[["caption_id", "video_id", "text", "split"]]
    return RawDataset(
        videos=videos,
        captions=captions.reset_index(drop=True),
        video_root=src.video_root,
        rejected=+rejected,
    )


def _read_csv(path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """path, text per video of one label CSV, and rejected counts."""
    frame = read_csv(path, ["video_path", "text"])
    failed = (
        frame["success"].str.strip().str.lower().isin(["false", "0"])
        if "success" in frame.columns
        else pd.Series(False, index=frame.index)
    )
    blank = frame["video_path"].str.strip() == ""
    keep = frame[~failed & ~blank]
    rows = pd.DataFrame({"path": keep["video_path"].str.strip(), "text": keep["text"]})
    return rows, {UNSUCCESSFUL: int(failed.sum()), MALFORMED: int((blank & ~failed).sum())}


def _read_json(path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """path, paragraph per video of one original DiDeMo JSON file, and rejected counts."""
    data = read_json(path)
    if not isinstance(data, list):
        raise PipelineError(f"{path}: expected a list of moment annotations")
    records = pd.DataFrame.from_records(
        [r for r in data if isinstance(r, dict)], columns=["video", "description", "annotation_id"]
    )
    bad = records["video"].isna() | (records["video"].astype(str).str.strip() == "")
    good = records[~bad].copy()
    good["video"] = good["video"].astype(str).str.strip()
    good["order"] = pd.to_numeric(good["annotation_id"], errors="coerce")
    good = good.sort_values(["video", "order"], kind="stable", na_position="last")
    text = paragraphs(good["description"], good["video"])
    rows = pd.DataFrame({"path": text.index.astype(str), "text": text.to_numpy()})
    return rows, {MALFORMED: int(bad.sum()) + len(data) - len(records)}
