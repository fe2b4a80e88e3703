"""LSMDC 2016 (the retrieval challenge split).

Tab-separated files, one caption per line: `clip_id, start, end, start, end, sentence`
(`LSMDC16_annos_training.csv`, `LSMDC16_annos_val.csv`, and the 1,000 public test clips of
`LSMDC16_challenge_1000_publictect.csv`, the original's spelling). A line with fewer than six
fields or no clip id is counted as malformed. Clips are `<clip_id>.avi`, usually in per-movie
subfolders: they resolve by file name anywhere under the video root.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.adapters import (
    MALFORMED,
    Source,
    make_dataset,
    number_captions,
    require,
    split_of,
)
from pipeline.data.tables import RawDataset

FILES = {
    "train": ("LSMDC16_annos_training.csv",),
    "val": ("LSMDC16_annos_val.csv",),
    "test": ("LSMDC16_challenge_1000_publictect.csv", "LSMDC16_challenge_1000_publictest.csv"),
}


def load(src: Source) -> RawDataset:
    """Read the three LSMDC 2016 annotation files from the annotation folder."""
    frames = {split: _read(require(src.annotations, *names)) for split, names in FILES.items()}
    malformed = sum(int(f["malformed"].sum()) for f in frames.values())
    rows = pd.concat([f[~f["malformed"]] for f in frames.values()], ignore_index=True)
    captions = pd.DataFrame({"video_id": rows["clip_id"], "text": rows["text"]})
    captions["caption_id"] = number_captions(captions["video_id"])
    ids = {s: pd.Index(f.loc[~f["malformed"], "clip_id"].unique(), dtype=str)
           for s, f in frames.items()}
    return make_dataset(
        captions,
        split_of(ids),
        lambda vids: pd.Series(vids + ".avi"),
        src.video_root,
        {MALFORMED: malformed},
    )


def _read(path: Path) -> pd.DataFrame:
    """clip_id, text and a `malformed` flag per non-blank line of one LSMDC file."""
    lines = pd.Series(path.read_text(encoding="utf-8").splitlines(), dtype=str)
    lines = lines[lines.str.strip() != ""]
    fields = lines.str.split("\t", n=5, expand=True).reindex(columns=range(6))
    clip_id = fields[0].fillna("").str.strip()
    return pd.DataFrame(
        {
            "clip_id": clip_id,
            "text": fields[5].fillna("").astype(str),
            "malformed": (fields[5].isna() | (clip_id == "")).astype(bool),
        }
    )
