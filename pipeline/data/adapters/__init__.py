"""Dataset adapters: the registry (name -> loader) and the helpers the adapters share.

An adapter turns one dataset's annotation files into a `RawDataset` (ids as strings, paths as the
annotation gives them, rows it cannot parse counted in `rejected`). Everything common to all
datasets (path resolution, empty captions, duplicates, carving val, probing) lives in
`pipeline.data.prepare`.
"""
from __future__ import annotations

import importlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import PrepareConfig
from pipeline.data.tables import RawDataset
from pipeline.errors import PipelineError

MALFORMED = "malformed row"


@dataclass(frozen=True)
class Source:
    """Where an adapter reads from: annotation file or folder, video root, settings, seed."""

    annotations: Path
    video_root: Path
    prepare: PrepareConfig
    seed: int = 0


Loader = Callable[[Source], RawDataset]

_MODULES = {
    name: f"pipeline.data.adapters.{name}"
    for name in ("synthetic", "folder", "msrvtt", "msvd", "lsmdc", "activitynet", "didemo")
}


def names() -> list[str]:
    """Registered dataset names."""
    return sorted(_MODULES)


def get_adapter(name: str) -> Loader:
    """The loader of dataset `name` (imported on demand, so unused adapters cost nothing)."""
    if name not in _MODULES:
        raise PipelineError(f"unknown dataset '{name}' (known: {', '.join(names())})")
    return importlib.import_module(_MODULES[name]).load


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def require(folder: Path, *candidates: str) -> Path:
    """The first of `candidates` present in `folder`, else a PipelineError naming them."""
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise PipelineError(f"{folder}: annotation file {' or '.join(candidates)} not found")


def read_json(path: Path) -> Any:
    """Parse a JSON annotation file (a PipelineError names the file on bad JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None


def read_id_list(path: Path, column: str | None = None) -> pd.Index:
    """Ids from a one-per-line text file, or the `column` of a CSV with a header."""
    if column is not None:
        frame = read_csv(path, [column])
        ids = frame[column]
    else:
        ids = pd.Series(path.read_text(encoding="utf-8").splitlines(), dtype=str)
    ids = ids.str.strip()
    return pd.Index(ids[ids != ""].drop_duplicates(), dtype=str)


def read_csv(path: Path, columns: list[str], **kwargs: Any) -> pd.DataFrame:
    """A CSV read as strings (empty cells stay ""); PipelineError if `columns` are missing."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start:exc.start + 1]
        raise PipelineError(f"{path}: not UTF-8 text ({exc.reason}, byte {bad!r}); convert it, "
                            "e.g. `iconv -f latin1 -t utf-8`") from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: empty file (needs a header row with column(s) "
                            f"{', '.join(columns)})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PipelineError(
            f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(frame.columns)})"
        )
    return frame


def number_captions(video_ids: pd.Series) -> pd.Series:
    """Caption ids `<video_id>#<k>`, k counting each video's captions from 0 in row order."""
    k = video_ids.groupby(video_ids, sort=False).cumcount().astype(str)
    return video_ids.astype(str) + "#" + k


def paragraphs(sentences: pd.Series, video_ids: pd.Series) -> pd.Series:
    """One text per video: its non-empty sentences, stripped, joined with spaces in row order.

    Videos whose sentences are all empty get "" (prepare rejects and counts them).
    """
    frame = pd.DataFrame(
        {
            "video_id": video_ids.astype(str).to_numpy(),
            "text": sentences.fillna("").astype(str).str.strip().to_numpy(),
        }
    )
    order = pd.Index(frame["video_id"].drop_duplicates(), dtype=str)
    kept = frame[frame["text"] != ""]
    joined = kept.groupby("video_id", sort=False)["text"].agg(" ".join)
    return joined.reindex(order, fill_value="").astype(str)


def make_dataset(
    captions: pd.DataFrame,
    video_split: pd.Series,
    path_of: Callable[[pd.Index], pd.Series],
    video_root: Path,
    rejected: dict[str, int] | None = None,
) -> RawDataset:
    """Assemble a RawDataset from captions (caption_id, video_id, text) and video -> split.

    `path_of(video_ids)` gives each video's path as the dataset lays it out. Captions take their
    video's split; captions of videos with no split are dropped (they are not in the protocol).
    """
    videos = pd.DataFrame({"video_id": video_split.index.astype(str), "split": video_split.values})
    videos["path"] = path_of(pd.Index(videos["video_id"])).to_numpy()
    caps = captions[["caption_id", "video_id", "text"]].astype(str)
    caps = caps.merge(videos[["video_id", "split"]], on="video_id", how="inner")
    return RawDataset(
        videos=videos[["video_id", "path", "split"]],
        captions=caps,
        video_root=video_root,
        rejected=Counter({k: int(v) for k, v in (rejected or {}).items() if v}),
    )


def split_of(ids_by_split: dict[str, pd.Index]) -> pd.Series:
    """video_id -> split from id lists per split (an id listed twice keeps both rows)."""
    parts = [pd.Series(s, index=pd.Index(ids, dtype=str)) for s, ids in ids_by_split.items()]
    return pd.concat(parts).astype(str) if parts else pd.Series(dtype=str)
