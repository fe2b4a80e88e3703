"""The frames stage: sample every video of videos.parquet into fixed, resumable Parquet shards.

Shard i holds the videos at rows [i*shard_size, (i+1)*shard_size) of videos.parquet sorted by
video_id, so a shard's bytes never depend on how many workers, ranks or machines run. Workers,
torchrun ranks and `--shard I/N` only decide which shards this process writes:
  shard i belongs to the `--shard I/N` group with i % N == I; inside the group, ranks take the
  group's shards round robin. `workers` processes (spawn pool) decode the videos of the
  shard being written, in order.
A shard is complete when `shard-i` and then `failures-i` exist with this run's sampling params
and input hash in their metadata; complete shards are skipped, stale temp files of a killed run
are removed, so a restarted run writes the same bytes as an uninterrupted one. The process that
sees every shard complete at the end (rank 0 waits for the other ranks) writes failures.parquet
and manifest.json; the failure rate is checked against `max_failure_rate` there.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.config import FramesConfig, Params, to_dict
from pipeline.errors import PipelineError
from pipeline.io import read_json, write_json, write_parquet
from pipeline.log import get_logger
from pipeline.video.sample import VideoResult, VideoTask, sample_chunk, sample_video
from pipeline.video.shards import (
    FAILURE_SCHEMA,
    ShardWriter,
    failures_name,
    file_metadata,
    read_failures,
    shard_name,
    write_failures,
)

log = get_logger(__name__)

SAMPLING_KEYS = ("fps", "max_frames", "size", "format", "jpeg_quality")  # change shard bytes
_TEMP = re.compile(r"^\.(.+)\.[a-z0-9_]+\.tmp$")
POLL_S = 1.0


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N; None stays None."""
    if spec is None or spec == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if m is None or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise PipelineError(f"--shard must be I/N with 0 <= I < N, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def load_videos(params: Params) -> tuple[pd.DataFrame, Path]:
    """videos.parquet sorted by video_id (ids as str) and the video root from summary.json."""
    prepared = Path(params.paths.prepared)
    table, summary = prepared / "videos.parquet", prepared / "summary.json"
    for f in (table, summary):
        if not f.is_file():
            raise PipelineError(f"{f} not found: run `dret prepare` first")
    df = pd.read_parquet(table)
    missing = {"video_id", "path"} - set(df.columns)
    if missing:
        raise PipelineError(f"{table}: missing columns {sorted(missing)}")
    if "duration" not in df.columns:
        df["duration"] = math.nan  # probed per video
    df = df[["video_id", "path", "duration"]].copy()
    df["video_id"] = df["video_id"].astype(str)
    if df["video_id"].duplicated().any():
        dup = df.loc[df["video_id"].duplicated(), "video_id"].iloc[0]
        raise PipelineError(f"{table}: duplicate video_id {dup!r}")
    df = df.sort_values("video_id", kind="stable").reset_index(drop=True)
    root = read_json(summary).get("video_root")
    if not root:
        raise PipelineError(f"{summary}: no video_root")
    return df, Path(root)


def validate(cfg: FramesConfig) -> None:
    """Range checks the type-checking loader cannot do (PipelineError naming the key)."""
    checks = {
        "fps": cfg.fps > 0 and math.isfinite(cfg.fps), "max_frames": cfg.max_frames >= 1,
        "size": cfg.size >= 1, "jpeg_quality": 1 <= cfg.jpeg_quality <= 100,
        "shard_size": cfg.shard_size >= 1, "workers": cfg.workers >= 1,
        "threads": cfg.threads >= 0, "max_failure_rate": 0 <= cfg.max_failure_rate <= 1,
    }
    for key, ok in checks.items():
        if not ok:
            raise PipelineError(f"frames.{key} out of range: {getattr(cfg, key)!r}")


def assign_shards(n_shards: int, shard: tuple[int, int] | None, rank: int, world: int) -> list[int]:
    """The shard indices one process writes; fixed by (n_shards, shard, rank, world) only."""
    group = list(range(n_shards)) if shard is None else list(range(shard[0], n_shards, shard[1]))
    return group[rank::world]


def sampling_params(cfg: FramesConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in SAMPLING_KEYS}


def _inputs_hash(rows: pd.DataFrame) -> str:
    """Hash of a shard's inputs (ids, paths, known durations): a changed list redoes the shard."""
    h = hashlib.sha256()
    for vid, path, dur in rows[["video_id", "path", "duration"]].itertuples(index=False):
        h.update(json.dumps([vid, str(path), None if pd.isna(dur) else float(dur)]).encode())
    return h.hexdigest()[:16]


def _is_complete(out: Path, index: int, meta: dict[str, str]) -> bool:
    for name in (shard_name(index), failures_name(index)):
        f = out / name
        if not f.is_file():
            return False
        try:
            found = file_metadata(f)
        except (OSError, pa.ArrowException):
            return False
        if any(found.get(f"dret.{k}") != v for k, v in meta.items()):
            return False
    return True


def _remove_temps(out: Path, names: set[str]) -> int:
    """Delete `.<name>.<random>.tmp` leftovers of killed writes, for the names this process owns."""
    n = 0
    for p in out.glob(".*.tmp"):
        m = _TEMP.match(p.name)
        if m and m.group(1) in names and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _pool(workers: int) -> Any:
    """A spawn pool: safe with threads in the parent (torch), portable, and its workers are
    direct children (their CPU and memory show in getrusage). Started once per run."""
    return mp.get_context("spawn").Pool(workers)


def _results(pool: Any, tasks: list[VideoTask], cfg: FramesConfig) -> Iterator[VideoResult]:
    """Sampled videos in task order (the pool decodes ahead)."""
    if pool is None:
        for t in tasks:
            yield sample_video(t, cfg)
        return
    # small chunks: balanced load, ordered results, bounded look-ahead
    chunks = [(tasks[i:i + 2], cfg) for i in range(0, len(tasks), 2)]
    for batch in pool.imap(sample_chunk, chunks):
        yield from batch


def _tasks(rows: pd.DataFrame, root: Path) -> list[VideoTask]:
    return [
        VideoTask(vid, str(path), str(root / str(path)),
                  float("nan") if pd.isna(dur) else float(dur))
        for vid, path, dur in rows[["video_id", "path", "duration"]].itertuples(index=False)
    ]


def _write_shards(out: Path, shards: list[tuple[int, list[VideoTask]]], cfg: FramesConfig,
                  metas: dict[int, dict[str, str]], pool: Any, bar: tqdm) -> None:
    """Write the given shards in order; one result stream across them keeps the pool busy
    at shard boundaries."""
    results = _results(pool, [t for _, tasks in shards for t in tasks], cfg)
    for index, tasks in shards:
        failures: list[tuple[str, str, str]] = []
        with ShardWriter(out / shard_name(index), cfg.format, metas[index]) as writer:
            for _ in tasks:
                res = next(results)
                if res.ok:
                    writer.add(res.video_id, res.timestamps, res.frames, res.height, res.width)
                if res.reason:
                    failures.append((res.video_id, res.path, res.reason))
                bar.update(1)
        write_failures(out / failures_name(index), failures, metas[index])  # marker: last


def run_frames(params: Params, shard: tuple[int, int] | None = None, *, check: bool = True,
               wait_timeout: float = 24 * 3600.0, progress: bool | None = None) -> dict[str, Any]:
    """Sample this process's shards, then (when all shards exist) write failures + manifest.

    Returns the manifest (`complete: false` and nothing written when other shards are missing).
    Raises PipelineError when the failure rate exceeds frames.max_failure_rate and `check`.
    """
    from pipeline import dist  # torch: imported only here, never in the workers

    t0 = time.perf_counter()
    cfg = params.frames
    validate(cfg)
    env = dist.env()
    videos, root = load_videos(params)
    out = Path(params.paths.frames)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(videos) / cfg.shard_size)
    mine = assign_shards(n_shards, shard, env.rank, env.world_size)
    owned = {n for i in mine for n in (shard_name(i), failures_name(i))}
    sole_writer = shard is None and env.is_main
    if sole_writer:
        owned |= {"failures.parquet", "manifest.json"}
    if removed := _remove_temps(out, owned):
        log.info("removed %d stale temp files in %s", removed, out)
    if sole_writer:  # a persisted output of a run with more videos: drop the extra shards
        for f in [*out.glob("shard-*.parquet"), *out.glob("failures-*.parquet")]:
            m = re.fullmatch(r"(?:shard|failures)-(\d{5})\.parquet", f.name)
            if m and int(m.group(1)) >= n_shards:
                f.unlink()

    metas = {}
    todo = []
    for i in mine:
        rows = videos.iloc[i * cfg.shard_size:(i + 1) * cfg.shard_size]
        metas[i] = {"params": json.dumps(sampling_params(cfg), sort_keys=True),
                    "inputs": _inputs_hash(rows), "shard": str(i)}
        if not _is_complete(out, i, metas[i]):
            todo.append(i)
    log.info("frames: %d videos, %d shards; this process owns %d, %d to write",
             len(videos), n_shards, len(mine), len(todo))
    work = [(i, _tasks(videos.iloc[i * cfg.shard_size:(i + 1) * cfg.shard_size], root))
            for i in todo]
    total = sum(len(tasks) for _, tasks in work)
    pool = _pool(cfg.workers) if cfg.workers > 1 and total > 1 else None
    try:
        disable = None if progress is None else not progress  # None: only on a terminal
        with tqdm(total=total, unit="video", desc="frames", disable=disable) as bar:
            _write_shards(out, work, cfg, metas, pool, bar)
    except BaseException:
        if pool is not None:
            pool.terminate()  # do not wait for queued videos on error or Ctrl-C
        raise
    if pool is not None:
        pool.close()
        pool.join()

    written = {"shards_owned": len(mine), "shards_written": len(todo),
               "shards_skipped": len(mine) - len(todo)}
    if not env.is_main:
        return {"complete": False, "rank": env.rank, **written}
    group = assign_shards(n_shards, shard, 0, 1)
    if env.distributed:
        _wait_for(out, group, wait_timeout)
    missing = [i for i in range(n_shards) if not (out / failures_name(i)).is_file()]
    if missing:
        log.info("%d of %d shards not written yet (other --shard groups); manifest deferred",
                 len(missing), n_shards)
        return {"complete": False, "shards_missing": len(missing), **written}
    manifest = _finish(out, videos, n_shards, cfg, time.perf_counter() - t0, written)
    if check:
        check_failure_rate(manifest)
    return manifest


def _wait_for(out: Path, shards: list[int], timeout: float) -> None:
    """Rank 0: poll until every shard of the group has its completion marker."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [i for i in shards if not (out / failures_name(i)).is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise PipelineError(f"timed out waiting for {len(missing)} shards from other ranks "
                                f"(first: {shard_name(missing[0])})")
        time.sleep(POLL_S)


def _finish(out: Path, videos: pd.DataFrame, n_shards: int, cfg: FramesConfig, elapsed: float,
            written: dict[str, int]) -> dict[str, Any]:
    """Gather every shard's counts and failures; write failures.parquet and manifest.json."""
    fail_tables, frames_per_video = [], []
    for i in range(n_shards):
        ts = pq.read_table(out / shard_name(i), columns=["timestamps"]).column("timestamps")
        frames_per_video.extend(pc.list_value_length(ts).to_pylist())
        fail_tables.append(read_failures(out / failures_name(i)).replace_schema_metadata(None))
    failures = pa.concat_tables(fail_tables) if fail_tables else FAILURE_SCHEMA.empty_table()
    write_parquet(out / "failures.parquet", failures)
    reasons = failures.column("reason").to_pylist()
    partial = sum(r.startswith("partial:") for r in reasons)
    dropped = len(reasons) - partial
    kinds = Counter(r.split(":", 1)[0] for r in reasons)
    n = len(videos)
    manifest = {
        "videos": n,
        "videos_sampled": len(frames_per_video),
        "videos_failed": dropped,
        "videos_partial": partial,
        "failure_rate": dropped / n if n else 0.0,
        "max_failure_rate": cfg.max_failure_rate,
        "frames": int(sum(frames_per_video)),
        "frames_per_video_min": min(frames_per_video, default=0),
        "frames_per_video_mean": (sum(frames_per_video) / len(frames_per_video)
                                  if frames_per_video else 0.0),
        "frames_per_video_max": max(frames_per_video, default=0),
        "failures_by_kind": dict(sorted(kinds.items())),
        "shards": n_shards,
        "format": cfg.format,
        "height": cfg.size,
        "width": cfg.size,
        "params": to_dict(cfg),
        "elapsed_s": round(elapsed, 3),
        "complete": True,
        **written,
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def check_failure_rate(manifest: dict[str, Any]) -> None:
    """Raise PipelineError (one line) when more videos failed than max_failure_rate allows."""
    if manifest.get("complete") and manifest["failure_rate"] > manifest["max_failure_rate"]:
        raise PipelineError(
            f"{manifest['videos_failed']} of {manifest['videos']} videos failed "
            f"({manifest['failure_rate']:.1%} > max_failure_rate "
            f"{manifest['max_failure_rate']:.1%}); see failures.parquet"
        )
