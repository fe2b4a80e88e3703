"""Frame shards: layout, deterministic Parquet writer, reader (docs/contracts.md, frames).

`shard-00000.parquet`: one row per sampled video (video_id, timestamps list<float64>, frames
list<binary> JPEG or raw HxWx3 uint8, height, width int32), schema metadata `dret.format`.
Writes are byte-for-byte reproducible: fixed row order, fixed row-group boundaries, no
timestamps in metadata, written to a temp name and renamed (pipeline/io.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.io import atomic_path

SCHEMA_VERSION = "1"
SHARD_GLOB = "shard-[0-9][0-9][0-9][0-9][0-9].parquet"
_SHARD_RE = re.compile(r"^shard-(\d{5})\.parquet$")
ROW_GROUP_BYTES = 32 << 20  # flush a row group once this many frame bytes are buffered

SCHEMA = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("timestamps", pa.list_(pa.float64()), nullable=False),
    pa.field("frames", pa.list_(pa.binary()), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
])
FAILURE_SCHEMA = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def failures_name(index: int) -> str:
    return f"failures-{index:05d}.parquet"


def list_shards(folder: str | Path) -> list[Path]:
    """The frame shards in `folder`, in index order."""
    return sorted(p for p in Path(folder).glob(SHARD_GLOB) if _SHARD_RE.match(p.name))


def shard_index(path: str | Path) -> int:
    m = _SHARD_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"not a frame shard name: {path}")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Frame encoding
# ---------------------------------------------------------------------------------------------


def encode_frames(frames: np.ndarray, fmt: str, quality: int = 90) -> list[bytes]:
    """[F,H,W,3] uint8 -> one bytes object per frame (JPEG via Pillow, or raw row-major)."""
    if fmt == "raw":
        return [f.tobytes() for f in frames]
    if fmt != "jpeg":
        raise ValueError(f"unknown frame format {fmt!r}")
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_jpeg(data: bytes) -> np.ndarray:
    """One JPEG frame -> [H,W,3] uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _metadata(fmt: str, extra: dict[str, Any]) -> dict[bytes, bytes]:
    """`dret.*` schema metadata: format, schema version and the caller's keys (JSON values)."""
    meta = {"dret.format": fmt, "dret.schema_version": SCHEMA_VERSION}
    meta.update({f"dret.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                 for k, v in extra.items()})
    return {k.encode(): v.encode() for k, v in meta.items()}


class ShardWriter:
    """Stream rows into one shard; the file appears (renamed from a temp) only on `close()`.

    Row groups are cut after ROW_GROUP_BYTES of frame data, so the bytes depend only on the rows.
    """

    def __init__(self, path: str | Path, fmt: str, extra_meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.schema = SCHEMA.with_metadata(_metadata(fmt, extra_meta))
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        # JPEG is already compressed; raw frames are left uncompressed for zero-copy reads
        self._writer = pq.ParquetWriter(
            self._tmp, self.schema, compression="none", use_dictionary=False,
            write_statistics=["video_id"], store_schema=True,
        )
        self._rows: list[tuple[str, list[float], list[bytes], int, int]] = []
        self._bytes = 0
        self.n_videos = 0
        self.n_frames = 0

    def add(self, video_id: str, timestamps: list[float], frames: list[bytes], height: int,
            width: int) -> None:
        self._rows.append((video_id, timestamps, frames, height, width))
        self._bytes += sum(len(f) for f in frames)
        self.n_videos += 1
        self.n_frames += len(frames)
        if self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        cols = list(zip(*self._rows, strict=True))
        arrays = [pa.array(c, type=f.type) for c, f in zip(cols, self.schema, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=len(self._rows))
        self._rows, self._bytes = [], 0

    def close(self) -> None:
        """Write the last row group and rename the temp file onto the shard name."""
        try:
            self._flush()
            self._writer.close()
        except BaseException:  # e.g. a full disk: drop the temp file, keep the first error
            with contextlib.suppress(Exception):
                self.abort()
            raise
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the temp file (on error)."""
        try:
            self._writer.close()
        finally:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_failures(path: str | Path, rows: Iterable[tuple[str, str, str]],
                   extra_meta: dict[str, Any] | None = None) -> None:
    """Atomically write a failures table (video_id, path, reason) in the given row order."""
    rows = list(rows)
    cols = list(zip(*rows, strict=True)) if rows else [[], [], []]
    schema = FAILURE_SCHEMA.with_metadata(_metadata("failures", extra_meta or {}))
    table = pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def read_failures(path: str | Path) -> pa.Table:
    return pq.read_table(path, schema=FAILURE_SCHEMA)


def file_metadata(path: str | Path) -> dict[str, str]:
    """The `dret.*` schema metadata of a Parquet file (footer only)."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"dret.")}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def iter_shard(
    path: str | Path, batch_rows: int = 16
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (video_id, uint8 [F,H,W,3], float64 timestamps [F]) for each video of a shard.

    Raw shards give read-only zero-copy views into the Arrow buffers (copy before writing).
    """
    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    fmt = meta.get(b"dret.format", b"jpeg").decode()
    for batch in pf.iter_batches(batch_size=batch_rows):
        ids = batch.column("video_id").to_pylist()
        ts_col = batch.column("timestamps")
        ts_off = ts_col.offsets.to_numpy()
        ts_val = ts_col.values.to_numpy()
        fr_col = batch.column("frames")
        fr_off = fr_col.offsets.to_numpy()
        blobs = fr_col.values
        heights = batch.column("height").to_numpy()
        widths = batch.column("width").to_numpy()
        if fmt == "raw":
            _, off_buf, data_buf = blobs.buffers()
            byte_off = np.frombuffer(off_buf, np.int32)[blobs.offset:blobs.offset + len(blobs) + 1]
            data = np.frombuffer(data_buf or b"", np.uint8)
        for r, vid in enumerate(ids):
            lo, hi = int(fr_off[r]), int(fr_off[r + 1])
            h, w = int(heights[r]), int(widths[r])
            if fmt == "raw":
                frames = data[byte_off[lo]:byte_off[hi]].reshape(hi - lo, h, w, 3)
            else:
                frames = np.stack([decode_jpeg(blobs[i].as_py()) for i in range(lo, hi)])
            yield vid, frames, ts_val[ts_off[r]:ts_off[r + 1]]
