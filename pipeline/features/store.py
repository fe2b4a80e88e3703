"""HDF5 feature shards: the writer, the validator, and the training-side `FeatureStore` reader.

Layout (docs/contracts.md, features): groups `video`, `text` and optionally `text_rev`.
- `video/ids` [N] str, `video/feats` [N, F, D] (final) or [N, F, T, H] (layer k),
  `video/mask` [N, F] bool
- `text*/ids` [M] str, `text*/video_ids` [M] str, `text*/feats` [M, L, D|H], `text*/mask` [M, L],
  `text*/eos` [M] int32, `text*/pooled` [M, D] (final only)
- attrs: `schema_version`, `backbone_id`, `backbone_fingerprint`, `cache_layer`, `frames_params`,
  `dtype` and the rest of KEY_ATTRS (a shard whose key attrs differ from the run's is stale).
Feature datasets are chunked by row; a shard is written under a temp name and renamed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_path

SCHEMA_VERSION = 1
SHARD_GLOB = "shard-[0-9][0-9][0-9][0-9][0-9].h5"
TEXT_GROUPS = ("text", "text_rev")
# attrs that must equal the current run's for a shard to be reused (everything its bytes depend on)
KEY_ATTRS = (
    "schema_version", "backbone_fingerprint", "cache_layer", "frames_params", "max_words",
    "dtype", "compression", "frames_digest", "captions_digest",
)
_STR = h5py.string_dtype("utf-8")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def list_feature_shards(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def parse_cache_layer(value: Any) -> int | str:
    """The `cache_layer` attr ("final" or a digit string) -> "final" or int."""
    value = value.decode() if isinstance(value, bytes) else str(value)
    return "final" if value == "final" else int(value)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Write one feature shard: datasets are preallocated, filled by row blocks, then renamed.

    Use as a context manager; the file appears under `path` only when the block succeeds.
    """

    def __init__(
        self,
        path: str | Path,
        attrs: dict[str, Any],
        dtype: str,
        compression: str = "none",
        block_bytes: int = 32 << 20,
    ) -> None:
        self.path = Path(path)
        self.attrs = attrs
        self.dtype = np.dtype(dtype)
        self.compression = None if compression == "none" else compression
        self.block_bytes = block_bytes
        self._stack = contextlib.ExitStack()
        self.file: h5py.File | None = None
        self._ds: dict[str, h5py.Dataset] = {}  # "group/name" -> handle (lookups are slow)
        self._pending: dict[str, _Pending] = {}  # group -> rows buffered for one write

    def __enter__(self) -> ShardWriter:
        tmp = self._stack.enter_context(atomic_path(self.path))
        self.file = self._stack.enter_context(h5py.File(tmp, "w", libver="earliest"))
        for k, v in self.attrs.items():
            self.file.attrs[k] = v
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                for group in list(self._pending):
                    self._flush(group)
            except BaseException as err:  # a failed last write: drop the temp file, re-raise
                self._stack.__exit__(type(err), err, err.__traceback__)
                raise
        self._stack.__exit__(exc_type, exc, tb)  # closes the file, then renames (or drops) it

    def _feats(self, group: h5py.Group, name: str, shape: tuple[int, ...]) -> None:
        kw: dict[str, Any] = {"dtype": self.dtype, "track_times": False}
        if shape[0] > 0:  # HDF5 chunks may not exceed an empty dataset's extent
            kw.update(chunks=(1, *shape[1:]), compression=self.compression)
        group.create_dataset(name, shape=shape, **kw)

    def create_video(self, ids: Sequence[str], row_shape: tuple[int, ...]) -> None:
        """Preallocate `video/*` for len(ids) videos; row_shape = (F, D) or (F, T, H)."""
        g = self.file.create_group("video")
        n = len(ids)
        _strings_ds(g, "ids", ids)
        self._feats(g, "feats", (n, *row_shape))
        g.create_dataset("mask", shape=(n, row_shape[0]), dtype=bool, track_times=False)

    def create_text(
        self,
        group: str,
        ids: Sequence[str],
        video_ids: Sequence[str],
        row_shape: tuple[int, ...],
        pooled_dim: int | None,
    ) -> None:
        """Preallocate `<group>/*` for len(ids) captions; row_shape = (L, D) or (L, H)."""
        g = self.file.create_group(group)
        m = len(ids)
        _strings_ds(g, "ids", ids)
        _strings_ds(g, "video_ids", video_ids)
        self._feats(g, "feats", (m, *row_shape))
        g.create_dataset("mask", shape=(m, row_shape[0]), dtype=bool, track_times=False)
        g.create_dataset("eos", shape=(m,), dtype=np.int32, track_times=False)
        if pooled_dim is not None:
            self._feats(g, "pooled", (m, pooled_dim))

    def write_rows(self, group: str, start: int, **arrays: np.ndarray) -> None:
        """Write rows [start, start + n) of each named dataset of `group` (feats cast to dtype).

        Consecutive row blocks with the same datasets are buffered (up to `block_bytes`) and
        written as one block: many small h5py writes cost more than the data they carry.
        """
        n = len(next(iter(arrays.values())))
        if any(len(a) != n for a in arrays.values()):
            raise ValueError(f"{group}: arrays of different row counts")
        p = self._pending.get(group)
        if p is not None and (p.start + p.rows != start or p.parts.keys() != arrays.keys()):
            self._flush(group)
            p = None
        if p is None:
            p = self._pending[group] = _Pending(start, {k: [] for k in arrays})
        for name, arr in arrays.items():
            p.parts[name].append(np.asarray(arr))
            p.nbytes += arr.nbytes
        p.rows += n
        if p.nbytes >= self.block_bytes:
            self._flush(group)

    def _flush(self, group: str) -> None:
        p = self._pending.pop(group)
        for name, parts in p.parts.items():
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if name in ("feats", "pooled"):
                arr = _to_storage(arr, self.dtype, f"{group}/{name}")
            key = f"{group}/{name}"
            ds = self._ds.get(key)
            if ds is None:
                ds = self._ds[key] = self.file[key]
            ds[p.start : p.start + len(arr)] = arr


@dataclasses.dataclass
class _Pending:
    """Consecutive rows of one group not yet written: rows [start, start + rows)."""

    start: int
    parts: dict[str, list[np.ndarray]]  # dataset name -> row blocks in order
    rows: int = 0
    nbytes: int = 0


def _strings_ds(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    data = np.array(list(values), dtype=object)
    group.create_dataset(name, data=data, shape=(len(data),), dtype=_STR, track_times=False)


def _to_storage(arr: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    if arr.dtype == dtype:  # already in storage dtype: the producer checked the cast
        return arr
    out = arr.astype(dtype)
    if not np.isfinite(out).all():
        raise PipelineError(
            f"{what}: values overflow {dtype.name} storage (non-finite after the cast); "
            f"set features.dtype: float32"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_groups(f: h5py.File, text_groups: Sequence[str]) -> str | None:
    for group in ("video", *text_groups):
        names = ("ids", "feats", "mask") if group == "video" else ("ids", "video_ids", "feats",
                                                                    "mask", "eos")
        if group not in f:
            return f"missing group {group}"
        g = f[group]
        missing = [n for n in names if n not in g]
        if missing:
            return f"missing datasets {group}/{','.join(missing)}"
        rows = {n: g[n].shape[0] for n in (*names, *(["pooled"] if "pooled" in g else []))}
        if len(set(rows.values())) != 1:
            return f"inconsistent row counts in {group}: {rows}"
        if rows["ids"]:
            for n in rows:
                g[n][rows[n] - 1]  # touch the last row: a truncated or corrupt file fails here
    return None


def check_shard(
    path: str | Path, expected: dict[str, Any], text_groups: Sequence[str] = ("text",)
) -> str | None:
    """Why the shard at `path` cannot be reused (missing, stale, corrupt), or None if it can."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            for key in KEY_ATTRS:
                if key not in expected:
                    continue
                have = f.attrs.get(key)
                have = have.decode() if isinstance(have, bytes) else have
                if have is None or str(have) != str(expected[key]):
                    return f"stale: {key} is {have!r}, the run needs {expected[key]!r}"
            return _check_groups(f, text_groups)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        return f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"


def shard_counts(path: str | Path) -> dict[str, int]:
    """Row counts of a valid shard: videos, frames (valid), captions, captions_rev, bytes."""
    with h5py.File(path, "r") as f:
        out = {
            "videos": int(f["video/ids"].shape[0]),
            "frames": int(np.count_nonzero(f["video/mask"][()])),
            "captions": int(f["text/ids"].shape[0]),
            "captions_rev": int(f["text_rev/ids"].shape[0]) if "text_rev" in f else 0,
        }
    out["bytes"] = Path(path).stat().st_size
    return out


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]


class FeatureStore:
    """Read features by id from a folder of shards; h5py handles open lazily, per process.

    Index: video id -> (shard, row), caption id -> (shard, row) for `text` and `text_rev`.
    Handles opened before a fork are never used in the child (reopened when the pid changes);
    the store pickles without handles, so DataLoader workers (fork or spawn) can use it.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.paths = list_feature_shards(self.root)
        if not self.paths:
            raise PipelineError(f"no feature shards in {self.root}: run `dret features` first")
        self._index: dict[str, dict[str, tuple[int, int]]] = {
            "video": {}, "text": {}, "text_rev": {}
        }
        self.caption_video: dict[str, str] = {}  # caption id -> its video id
        attrs0: dict[str, Any] | None = None
        for s, path in enumerate(self.paths):
            with h5py.File(path, "r") as f:
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                if attrs0 is None:
                    attrs0 = attrs
                for key in ("schema_version", "backbone_fingerprint", "cache_layer", "dtype",
                            "max_words"):
                    if str(attrs.get(key)) != str(attrs0.get(key)):
                        raise PipelineError(
                            f"{path.name}: {key} {attrs.get(key)!r} differs from "
                            f"{self.paths[0].name}'s {attrs0.get(key)!r}: rerun `dret features`"
                        )
                for group in ("video", *TEXT_GROUPS):
                    if group in f:
                        for row, i in enumerate(_strings(f[group]["ids"])):
                            self._index[group][i] = (s, row)
                if "text" in f:
                    self.caption_video.update(
                        zip(_strings(f["text/ids"]), _strings(f["text/video_ids"]), strict=True)
                    )
        self.attrs: dict[str, Any] = attrs0 or {}
        self.cache_layer = parse_cache_layer(self.attrs["cache_layer"])
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    # -- ids ---------------------------------------------------------------------------------
    @property
    def video_ids(self) -> list[str]:
        return list(self._index["video"])

    @property
    def caption_ids(self) -> list[str]:
        return list(self._index["text"])

    @property
    def reversed_ids(self) -> list[str]:
        """Caption ids that have a direction-swapped (`reversed_text`) encoding."""
        return list(self._index["text_rev"])

    def has_video(self, video_id: str) -> bool:
        return video_id in self._index["video"]

    # -- handles -----------------------------------------------------------------------------
    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # forked: inherited HDF5 handles are not safe to use
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = h5py.File(self.paths[shard], "r")
        return f

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._handles.values():
                f.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    # -- reads -------------------------------------------------------------------------------
    def _gather(self, group: str, ids: Sequence[str], names: Sequence[str]) -> list[np.ndarray]:
        """Rows of `group/<name>` for `ids`, in the order of `ids` (duplicates allowed)."""
        index = self._index[group]
        try:
            where = np.array([index[i] for i in ids], dtype=np.int64).reshape(-1, 2)
        except KeyError as exc:
            raise KeyError(f"{group}: id {exc.args[0]!r} is not in the feature store") from None
        outs: list[np.ndarray] = []
        for name in names:
            ds0 = self._file(int(where[0, 0]) if len(where) else 0)[group][name]
            outs.append(np.empty((len(ids), *ds0.shape[1:]), dtype=ds0.dtype))
        for shard in np.unique(where[:, 0]):
            pos = np.flatnonzero(where[:, 0] == shard)
            rows, inverse = np.unique(where[pos, 1], return_inverse=True)
            g = self._file(int(shard))[group]
            for out, name in zip(outs, names, strict=True):
                ds = g[name]
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                # dense selections: one contiguous read beats h5py's point selection
                block = ds[lo:hi][rows - lo] if len(rows) * 2 > hi - lo else ds[rows]
                out[pos] = block[inverse]
        return outs

    def load_videos(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> feats [n, F, D] or [n, F, T, H] (stored dtype), mask [n, F] bool."""
        feats, mask = self._gather("video", ids, ("feats", "mask"))
        return torch.from_numpy(feats), torch.from_numpy(mask)

    def load_texts(
        self, ids: Sequence[str], reversed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> feats [m, L, D|H] (stored dtype), mask [m, L] bool, eos [m] int64.

        `reversed=True` reads the `reversed_text` encodings (ids = caption ids).
        """
        group = "text_rev" if reversed else "text"
        feats, mask, eos = self._gather(group, ids, ("feats", "mask", "eos"))
        return torch.from_numpy(feats), torch.from_numpy(mask), torch.from_numpy(eos).long()

    def load_pooled(self, ids: Sequence[str], reversed: bool = False) -> torch.Tensor:
        """-> [m, D] sentence embeddings (cache_layer final only)."""
        if self.cache_layer != "final":
            raise ValueError("pooled text features exist only for cache_layer final")
        (pooled,) = self._gather("text_rev" if reversed else "text", ids, ("pooled",))
        return torch.from_numpy(pooled)
