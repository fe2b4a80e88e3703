"""The in-memory form of a prepared dataset, shared by every adapter."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

VIDEO_COLUMNS = ["video_id", "path", "split"]
CAPTION_COLUMNS = ["caption_id", "video_id", "text", "split"]
SPLITS = ("train", "val", "test")


@dataclass
class RawDataset:
    """What an adapter returns before prepare validates and writes it.

    videos: video_id, path (relative to video_root, or as found in the annotation), split, + extras.
    captions: caption_id, video_id, text, split (+ extras such as reversed_text).
    rejected: reason -> count of annotation rows dropped (malformed, empty caption, ...).
    """

    videos: pd.DataFrame
    captions: pd.DataFrame
    video_root: Path
    rejected: Counter = field(default_factory=Counter)
    ood_captions: pd.DataFrame | None = None
    extra_summary: dict = field(default_factory=dict)
