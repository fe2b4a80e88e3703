"""MSVD: `captions_msvd.json` (video id -> list of captions) + `{train,val,test}_list.txt`.

Every caption of every video is kept in all splits (test: 670 videos, all of their captions, the
multi-caption protocol). Clips are `<video_id>.avi` (YouTubeClips); other containers resolve by
stem.
"""
from __future__ import annotations

import pandas as pd

from pipeline.data.adapters import (
    MALFORMED,
    Source,
    make_dataset,
    number_captions,
    read_id_list,
    read_json,
    require,
    split_of,
)
from pipeline.data.tables import SPLITS, RawDataset
from pipeline.errors import PipelineError


def load(src: Source) -> RawDataset:
    """Read MSVD's captions JSON and split lists from the annotation folder."""
    folder = src.annotations
    data = read_json(require(folder, "captions_msvd.json"))
    if not isinstance(data, dict):
        raise PipelineError(f"{folder / 'captions_msvd.json'}: expected an object id -> captions")
    entries = pd.Series(data, dtype=object)
    is_list = entries.map(lambda v: isinstance(v, list)).astype(bool)
    texts = entries[is_list].explode().dropna()
    captions = pd.DataFrame({"video_id": texts.index.astype(str), "text": texts.astype(str).values})
    captions["caption_id"] = number_captions(captions["video_id"])
    ids = {split: read_id_list(require(folder, f"{split}_list.txt")) for split in SPLITS}
    return make_dataset(
        captions,
        split_of(ids),
        lambda vids: pd.Series(vids + ".avi"),
        src.video_root,
        {MALFORMED: int((~is_list).sum())},
    )
