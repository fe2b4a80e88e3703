"""ActivityNet Captions, paragraph-to-video retrieval (the field's convention).

`train.json` and `val_1.json` map `v_<id>` -> {duration, timestamps, sentences}. Each video gets
one caption: its sentences, stripped, joined with spaces in temporal order. `val_1` is the test
split; the validation split is carved from train by prepare. Clips are `v_<id>.mp4` (other
containers, e.g. `.mkv` / `.webm`, resolve by stem).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.adapters import (
    MALFORMED,
    Source,
    make_dataset,
    paragraphs,
    read_json,
    require,
    split_of,
)
from pipeline.data.tables import RawDataset
from pipeline.errors import PipelineError

FILES = {"train": "train.json", "test": "val_1.json"}


def load(src: Source) -> RawDataset:
    """Read `train.json` (train) and `val_1.json` (test) from the annotation folder."""
    parts = {split: _read(require(src.annotations, name)) for split, name in FILES.items()}
    malformed = sum(bad for _, bad in parts.values())
    captions = pd.concat([caps for caps, _ in parts.values()], ignore_index=True)
    captions["caption_id"] = captions["video_id"]
    ids = {split: pd.Index(caps["video_id"], dtype=str) for split, (caps, _) in parts.items()}
    return make_dataset(
        captions,
        split_of(ids),
        lambda vids: pd.Series(vids + ".mp4"),
        src.video_root,
        {MALFORMED: malformed},
    )


def _read(path: Path) -> tuple[pd.DataFrame, int]:
    """One paragraph per video of an ActivityNet JSON file, and the count of malformed entries."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: expected an object v_<id> -> annotation")
    entries = pd.Series(data, dtype=object)
    sentences = entries.map(lambda v: v.get("sentences") if isinstance(v, dict) else None)
    ok = sentences.map(lambda v: isinstance(v, list)).astype(bool)
    exploded = sentences[ok].explode()
    text = paragraphs(exploded, exploded.index.to_series())
    captions = pd.DataFrame({"video_id": text.index.astype(str), "text": text.to_numpy()})
    return captions, int((~ok).sum())
