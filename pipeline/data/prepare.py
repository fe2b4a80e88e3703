"""The prepare stage: one adapter's RawDataset -> validated Parquet tables under paths.prepared.

Shared by every dataset, in this order: schema and split checks (a video in two splits is an
error), de-duplication of video and caption ids, rejection of empty captions, path resolution
under the video root (paths leaving it are rejected), captions without a video and videos
without a caption dropped, validation split carved from train when the adapter has none,
existence flags and duration probes. Every dropped row is counted in `rejected` by reason.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from pipeline.config import Params
from pipeline.data.adapters import MALFORMED, Source, get_adapter
from pipeline.data.paths import VideoIndex
from pipeline.data.tables import CAPTION_COLUMNS, SPLITS, VIDEO_COLUMNS, RawDataset
from pipeline.errors import PipelineError
from pipeline.io import remove_stale_temps, write_json, write_parquet
from pipeline.video.probe import ProbeError, probe

log = logging.getLogger(__name__)

EMPTY_CAPTION = "empty caption"
OUTSIDE_ROOT = "path outside video root"
DUPLICATE_VIDEO = "duplicate video id"
DUPLICATE_CAPTION = "duplicate caption id"
ORPHAN_CAPTION = "caption of an unknown or rejected video"
NO_CAPTIONS = "video without captions"
PROBE_THREADS = 4


def run_prepare(params: Params) -> dict:
    """Build videos/captions(/ood_captions).parquet and summary.json; return the summary."""
    cfg = params.prepare
    out = Path(params.paths.prepared)
    root = out / "videos" if cfg.dataset == "synthetic" else Path(params.paths.videos)
    source = Source(Path(params.paths.annotations), root, cfg, params.seed)
    log.info("prepare %s: annotations %s, videos %s", cfg.dataset, source.annotations, root)
    raw = get_adapter(cfg.dataset)(source)
    rejected: Counter = Counter({k: int(v) for k, v in raw.rejected.items()})
    videos, captions = clean(raw, rejected)
    if not (videos["split"] == "val").any():
        val = carve_val(videos["video_id"].where(videos["split"] == "train"), cfg.val_fraction,
                        cfg.val_max, params.seed)
        videos.loc[val, "split"] = "val"
        captions["split"] = captions["video_id"].map(videos.set_index("video_id")["split"])
        log.info("carved %d validation videos from train (seed %d)", int(val.sum()), params.seed)
    videos["duration"] = videos["duration"].where(videos["exists"])
    probe_failed = 0
    if cfg.probe_duration:
        videos["duration"], probe_failed = probe_durations(raw.video_root, videos)
    summary = _summary(cfg.dataset, raw, videos, captions, rejected, probe_failed)
    if summary["videos_missing"]:
        log.warning("%d of %d videos not found under %s (kept with exists=False)",
                    summary["videos_missing"], len(videos), raw.video_root)
    _write(out, videos, captions, raw.ood_captions, summary)
    return summary


def clean(raw: RawDataset, rejected: Counter) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate, de-duplicate, resolve and filter an adapter's tables (counts into `rejected`)."""
    videos = _strings(_require(raw.videos, VIDEO_COLUMNS, "videos"), VIDEO_COLUMNS)
    captions = _strings(_require(raw.captions, CAPTION_COLUMNS, "captions"), CAPTION_COLUMNS)
    check_splits(videos, captions)
    videos = _drop(videos, videos["video_id"].duplicated(), DUPLICATE_VIDEO, rejected)
    captions = _drop(captions, captions["caption_id"].duplicated(), DUPLICATE_CAPTION, rejected)
    captions["text"] = captions["text"].str.strip()
    captions = _drop(captions, captions["text"] == "", EMPTY_CAPTION, rejected)
    videos = _drop(videos, videos["path"].str.strip() == "", MALFORMED, rejected)
    where = VideoIndex.build(raw.video_root).resolve(videos["path"])
    videos["path"], videos["exists"] = where["path"], where["exists"]
    videos = _drop(videos, where["outside"], OUTSIDE_ROOT, rejected)
    captions = _drop(captions, ~captions["video_id"].isin(videos["video_id"]), ORPHAN_CAPTION,
                     rejected)
    videos = _drop(videos, ~videos["video_id"].isin(captions["video_id"]), NO_CAPTIONS, rejected)
    if "duration" not in videos.columns:
        videos["duration"] = np.nan
    videos["duration"] = pd.to_numeric(videos["duration"], errors="coerce").astype("float64")
    extras = [c for c in videos.columns if c not in (*VIDEO_COLUMNS, "exists", "duration")]
    videos = videos[["video_id", "path", "exists", "duration", "split", *extras]]
    videos = videos.sort_values("video_id", kind="stable").reset_index(drop=True)
    captions = captions.sort_values("video_id", kind="stable").reset_index(drop=True)
    return videos, captions


def check_splits(videos: pd.DataFrame, captions: pd.DataFrame) -> None:
    """Raise PipelineError if a split is unknown or a video_id occurs in two splits."""
    pairs = pd.concat([videos[["video_id", "split"]], captions[["video_id", "split"]]])
    unknown = pairs.loc[~pairs["split"].isin(SPLITS), "split"]
    if len(unknown):
        raise PipelineError(f"unknown split '{unknown.iloc[0]}' (expected one of {SPLITS})")
    pairs = pairs.drop_duplicates()
    clash = pairs[pairs["video_id"].duplicated(keep=False)]
    if len(clash):
        vid = clash["video_id"].iloc[0]
        where = sorted(clash.loc[clash["video_id"] == vid, "split"])
        n = clash["video_id"].nunique()
        raise PipelineError(
            f"{n} video id(s) in two splits, e.g. '{vid}' in {' and '.join(where)}"
        )


def carve_val(train_ids: pd.Series, fraction: float, max_n: int, seed: int) -> pd.Series:
    """Mask of the ids moved to val: the `round(fraction * n)` (at most `max_n`, at least one
    when fraction > 0, never all) lowest seeded hashes of the non-null ids.

    The hash (pandas' SipHash keyed by the seed) depends on the id and seed alone, so the rule
    is deterministic across runs and machines and stable when videos are added or removed.
    """
    ids = train_ids.dropna().astype(str)
    n = len(ids)
    k = min(max_n, int(round(fraction * n)), n - 1)
    if fraction > 0 and n > 1 and max_n > 0:
        k = max(k, 1)
    mask = pd.Series(False, index=train_ids.index)
    if k <= 0:
        return mask
    key = hashlib.sha256(f"dret-val-{seed}".encode()).hexdigest()[:16]
    hashes = pd.util.hash_pandas_object(ids, index=False, hash_key=key)
    order = pd.DataFrame({"h": hashes.to_numpy(), "id": ids.to_numpy()}, index=ids.index)
    chosen = order.sort_values(["h", "id"]).index[:k]
    mask[chosen] = True
    return mask


def probe_durations(root: Path, videos: pd.DataFrame) -> tuple[pd.Series, int]:
    """Durations (s) probed for existing files whose duration is unknown; NaN and counted when
    a probe fails (the frames stage records the reason)."""
    duration = videos["duration"].copy()
    todo = videos.index[videos["exists"] & duration.isna()]
    paths = [root / p for p in videos.loc[todo, "path"]]
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        probed = list(tqdm(pool.map(_probe_one, paths), total=len(paths), desc="probe",
                           unit="video", disable=None, leave=False))
    values = pd.Series(probed, index=todo, dtype="float64")
    failed = int(values.isna().sum())
    if failed:
        log.warning("%d of %d videos could not be probed (duration left unknown)", failed,
                    len(paths))
    duration.loc[todo] = values.where(values > 0)
    return duration, failed


def _probe_one(path: Path) -> float:
    try:
        return probe(path).duration
    except ProbeError as exc:
        log.debug("probe failed for %s: %s", path, exc)
        return float("nan")


def _require(frame: pd.DataFrame, columns: list[str], what: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PipelineError(f"adapter returned {what} without column(s) {', '.join(missing)}")
    return frame.reset_index(drop=True).copy()


def _strings(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Contract columns as str (NaN becomes "": caught as empty captions / paths)."""
    frame[columns] = frame[columns].fillna("").astype(str)
    frame["split"] = frame["split"].str.strip()
    return frame


def _drop(frame: pd.DataFrame, mask: pd.Series, reason: str, rejected: Counter) -> pd.DataFrame:
    """Rows of `frame` outside `mask`; the dropped rows are counted under `reason`."""
    n = int(mask.sum())
    if n:
        rejected[reason] += n
        log.warning("rejected %d rows: %s", n, reason)
    return frame[~mask.to_numpy()].copy()


def _summary(dataset: str, raw: RawDataset, videos: pd.DataFrame, captions: pd.DataFrame,
             rejected: Counter, probe_failed: int) -> dict:
    nv = videos["split"].value_counts()
    nc = captions["split"].value_counts()
    core = {
        "dataset": dataset,
        "video_root": str(raw.video_root),
        "splits": {s: {"videos": int(nv.get(s, 0)), "captions": int(nc.get(s, 0))} for s in SPLITS},
        "videos": len(videos),
        "captions": len(captions),
        "videos_missing": int((~videos["exists"]).sum()),
        "probe_failed": probe_failed,
        "rejected": dict(sorted((k, int(v)) for k, v in rejected.items() if v)),
    }
    return {**core, **{k: v for k, v in raw.extra_summary.items() if k not in core}}


def _table(frame: pd.DataFrame) -> pa.Table:
    """Arrow table with plain `string` columns whatever pandas' string storage is."""
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    schema = pa.schema(
        [f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    )
    return table.cast(schema)


def _write(out: Path, videos: pd.DataFrame, captions: pd.DataFrame,
           ood: pd.DataFrame | None, summary: dict) -> None:
    """Each file atomically; summary.json last, so its presence marks a complete run."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    (out / "summary.json").unlink(missing_ok=True)
    write_parquet(out / "videos.parquet", _table(videos))
    write_parquet(out / "captions.parquet", _table(captions))
    if ood is not None:
        write_parquet(out / "ood_captions.parquet", _table(ood))
    else:
        (out / "ood_captions.parquet").unlink(missing_ok=True)
    write_json(out / "summary.json", summary)
    log.info("wrote %d videos, %d captions to %s", len(videos), len(captions), out)
