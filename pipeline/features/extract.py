"""The `features` stage: frame shards + captions -> CLIP features in HDF5 shards (one per shard).

Streaming: one frames shard at a time, frames batched within the shard (features.batch_size
frames per forward), rows written as soon as a video is complete, so memory is bounded by a
batch and a shard's id lists. A shard's bytes depend only on its inputs and the params (not on
rank count): ranks take shards r, r + W, ...; completed, up-to-date shards are skipped; stale or
corrupt ones are rebuilt; rank 0 writes manifest.json once every shard is valid.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline import dist
from pipeline.config import Params, to_dict
from pipeline.errors import PipelineError
from pipeline.features.backbone import RECORD_FILE, SCRATCH, Backbone, load_backbone, read_record
from pipeline.features.store import (
    SCHEMA_VERSION,
    ShardWriter,
    check_shard,
    shard_counts,
    shard_name,
)
from pipeline.io import write_json
from pipeline.log import get_logger
from pipeline.models import clip_split

log = get_logger(__name__)
FRAME_KEYS = ("fps", "max_frames", "size", "format", "jpeg_quality", "shard_size")


# ----------------------------------------------------------------------------------------------
# The model side: batched forwards
# ----------------------------------------------------------------------------------------------


class Encoder:
    """Batched CLIP forwards for one cache layer: uint8 frames and texts -> arrays to store."""

    def __init__(
        self, backbone: Backbone, cache_layer: int | str, max_words: int,
        device: torch.device | str = "cpu", amp: bool = True, out_dtype: str = "float32",
    ) -> None:
        clip_split.check_cache_layer(backbone.model, cache_layer)
        self.out_dtype = getattr(torch, out_dtype)  # features leave the device in storage dtype
        self.out_dtype_np = np.dtype(out_dtype)
        self.model = backbone.model.to(device).eval()
        self.tokenizer = backbone.tokenizer
        self.cache_layer = cache_layer
        self.max_words = max_words
        self.device = torch.device(device)
        self.size = backbone.image_size
        mean = torch.tensor(backbone.image_mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(backbone.image_std, device=self.device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std  # (x / 255 - mean) / std
        self.eos_token_id = backbone.eos_token_id
        self._backend = _padded_backend(self.tokenizer, max_words)
        self.amp = amp and self.device.type == "cuda"
        max_pos = self.model.config.text_config.max_position_embeddings
        if max_words > max_pos:
            raise PipelineError(
                f"features.max_words {max_words} > the backbone's {max_pos} text positions"
            )

    @property
    def final(self) -> bool:
        return self.cache_layer == "final"

    def video_row_shape(self, n_frames: int) -> tuple[int, ...]:
        """(F, D) at final, else (F, T, H) with T = patches + 1."""
        vc = self.model.config.vision_config
        if self.final:
            return (n_frames, self.model.config.projection_dim)
        return (n_frames, (vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size)

    def text_row_shape(self) -> tuple[int, ...]:
        """(L, D) at final, else (L, H)."""
        cfg = self.model.config
        dim = cfg.projection_dim if self.final else cfg.text_config.hidden_size
        return (self.max_words, dim)

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised float [B, 3, S, S] on the device (resized if needed)."""
        x = torch.from_numpy(frames).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).contiguous().float()  # channel-first copy in uint8, then cast
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):  # frames sampled for another size: resize + crop
            scale = self.size / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            x = torch.nn.functional.interpolate(x, (nh, nw), mode="bicubic", antialias=True)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size].clamp(0, 255).contiguous()
        return x.mul_(self.scale).add_(self.shift)

    @torch.inference_mode()
    def frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, D] (final) or [B, T, H] (hidden entering block k)."""
        px = self.pixels(frames)
        with self._autocast():
            if self.final:
                out = clip_split.vision_final(self.model, px)
            else:
                out = clip_split.vision_head(self.model, px, self.cache_layer)
        return self._to_numpy(out, "video features")

    def _to_numpy(self, x: torch.Tensor, what: str) -> np.ndarray:
        """Cast to the output dtype on the device (fast), check it stayed finite, -> numpy."""
        x = x.to(self.out_dtype)
        if not bool(torch.isfinite(x).all()):
            name = str(self.out_dtype).removeprefix("torch.")
            raise PipelineError(f"{what}: values overflow {name} (non-finite after the cast); "
                                f"set features.dtype: float32")
        return x.cpu().numpy()

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> input ids [M, L] and attention mask [M, L] bool (padded to max_words).

        Exactly the tokenizer's `(texts, padding="max_length", truncation=True)` output (a test
        checks); with a fast tokenizer, its Rust backend is called directly: half the time.
        """
        if self._backend is None:
            enc = self.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=self.max_words, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"].bool()
        encs = self._backend.encode_batch(texts)
        ids = np.array([e.ids for e in encs], dtype=np.int64).reshape(len(texts), self.max_words)
        mask = np.array([e.attention_mask for e in encs], dtype=bool).reshape(ids.shape)
        return torch.from_numpy(ids), torch.from_numpy(mask)

    def texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Captions -> what `tokens` returns."""
        return self.tokens(*self.tokenize(texts))

    @torch.inference_mode()
    def tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        """Tokenised captions -> feats [M, L, D|H], mask [M, L], eos [M] int32, (pooled [M, D])."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        eos = clip_split.eos_index(ids, self.eos_token_id)
        out: dict[str, np.ndarray] = {}
        with self._autocast():
            if self.final:
                tokens, pooled = clip_split.text_final(self.model, ids, mask, eos)
                out["pooled"] = self._to_numpy(pooled, "pooled text features")
            else:
                tokens = clip_split.text_head(self.model, ids, mask, self.cache_layer)
        out.update(
            feats=self._to_numpy(tokens, "text features"), mask=mask.cpu().numpy(),
            eos=eos.cpu().numpy().astype(np.int32),
        )
        return out


def _padded_backend(tokenizer: Any, length: int) -> Any:
    """A copy of a fast tokenizer's backend that truncates and pads to `length`, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        return None
    from tokenizers import Tokenizer

    out = Tokenizer.from_str(backend.to_str())
    out.enable_truncation(length, direction=tokenizer.truncation_side)
    out.enable_padding(length=length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token,
                       direction=tokenizer.padding_side)
    return out


# ----------------------------------------------------------------------------------------------
# Planning: which videos and captions belong to which shard
# ----------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    index: int
    frames_path: Path
    out_path: Path
    video_ids: list[str]  # every video of the slice (also those whose frames failed)
    captions: pd.DataFrame  # caption_id, video_id, text, reversed_text


def frames_params(params: Params) -> dict[str, Any]:
    """The frames params that decide what the frame shards contain."""
    fr = to_dict(params.frames)
    return {k: fr[k] for k in FRAME_KEYS}


def plan_shards(params: Params) -> tuple[list[ShardPlan], bool]:
    """Shard slices of the prepared tables (videos sorted by id); whether reversed text exists."""
    prepared = Path(params.paths.prepared)
    for name in ("videos.parquet", "captions.parquet"):
        if not (prepared / name).is_file():
            raise PipelineError(f"{prepared / name} not found: run `dret prepare` first")
    videos = sorted(pd.read_parquet(prepared / "videos.parquet", columns=["video_id"])["video_id"]
                    .astype(str))
    caps = pd.read_parquet(prepared / "captions.parquet")
    caps = caps.astype({"caption_id": str, "video_id": str, "text": str})
    if "reversed_text" not in caps.columns:
        caps["reversed_text"] = ""
    caps["reversed_text"] = caps["reversed_text"].fillna("").astype(str)
    has_rev = bool((caps["reversed_text"] != "").any())
    size = params.frames.shard_size
    shard_of = {v: i // size for i, v in enumerate(videos)}
    caps["_shard"] = caps["video_id"].map(shard_of)
    orphans = int(caps["_shard"].isna().sum())
    if orphans:
        log.warning("%d captions belong to videos missing from videos.parquet; skipped", orphans)
    cols = ["caption_id", "video_id", "text", "reversed_text"]
    groups = dict(tuple(caps.dropna(subset=["_shard"]).groupby("_shard", sort=True)))
    plans = []
    for i in range((len(videos) + size - 1) // size):
        sel = groups.get(i, caps.iloc[:0])
        # captions in video order; within a video, in captions.parquet order (stable sort)
        sel = sel.sort_values("video_id", kind="stable")[cols].reset_index(drop=True)
        plans.append(ShardPlan(
            i, Path(params.paths.frames) / f"shard-{i:05d}.parquet",
            Path(params.paths.features) / shard_name(i), videos[i * size : (i + 1) * size], sel,
        ))
    return plans, has_rev


def _file_digest(path: Path) -> str:
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, cached per (path, size, mtime): the manifest re-checks every shard."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shard_attrs(params: Params, record: Any, plan: ShardPlan) -> dict[str, Any]:
    """The attrs a shard built by this run carries (KEY_ATTRS decide reuse)."""
    if not plan.frames_path.is_file():
        raise PipelineError(f"{plan.frames_path} not found: run `dret frames` first")
    fc = params.features
    cap_blob = json.dumps(plan.captions.values.tolist(), ensure_ascii=False).encode()
    return {
        "schema_version": SCHEMA_VERSION,
        "backbone_id": record.name,
        "backbone_revision": record.revision,
        "backbone_fingerprint": record.fingerprint,
        "cache_layer": str(fc.cache_layer),
        "frames_params": json.dumps(frames_params(params), sort_keys=True),
        "max_words": fc.max_words,
        "dtype": fc.dtype,
        "compression": fc.compression,
        "frames_digest": _file_digest(plan.frames_path),
        "captions_digest": hashlib.sha256(cap_blob).hexdigest(),
    }


# ----------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------


def _prefetch(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """Iterate `items` in a background thread (decode overlaps the forward); depth bounds memory."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def work() -> None:
        try:
            for item in items:
                q.put(item)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)
        q.put(end)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def _core_free(device: torch.device) -> bool:
    """Whether a reader thread can decode beside the forward without slowing it: on GPU always;
    on CPU only when torch leaves a core idle (measured on 2 cores: with both busy, the thread
    costs more than it hides)."""
    return device.type != "cpu" or torch.get_num_threads() < (os.cpu_count() or 1)


def _write_videos(enc: Encoder, w: ShardWriter, plan: ShardPlan, max_frames: int, bs: int,
                  workers: int, show: bool) -> int:
    from pipeline.video.shards import iter_shard

    ids = [str(v) for v in pq.read_table(plan.frames_path, columns=["video_id"])["video_id"]
           .to_pylist()]
    row_shape = enc.video_row_shape(max_frames)
    w.create_video(ids, row_shape)
    mask = np.zeros((len(ids), max_frames), dtype=bool)
    chunks: list[tuple[int, int, np.ndarray]] = []  # (row, first frame, frames) awaiting a forward
    rows: dict[int, np.ndarray] = {}  # rows being filled
    left: dict[int, int] = {}  # frames still to encode per row
    state = {"next": 0, "buffered": 0}

    def forward(n: int) -> None:
        take, got = [], 0
        while got < n:
            row, f0, fr = chunks[0]
            k = min(n - got, len(fr))
            take.append((row, f0, fr[:k]))
            if k == len(fr):
                chunks.pop(0)
            else:
                chunks[0] = (row, f0 + k, fr[k:])
            got += k
        out = enc.frames(np.concatenate([fr for _, _, fr in take]))
        pos = 0
        for row, f0, fr in take:
            rows[row][f0 : f0 + len(fr)] = out[pos : pos + len(fr)]
            left[row] -= len(fr)
            pos += len(fr)
        state["buffered"] -= n
        flush_rows()

    def flush_rows() -> None:
        start = end = state["next"]
        while end in left and left[end] == 0:
            end += 1
        if end > start:
            w.write_rows("video", start, feats=np.stack([rows.pop(r) for r in range(start, end)]))
            for r in range(start, end):
                del left[r]
            state["next"] = end

    source = iter_shard(plan.frames_path)
    if workers > 0 and _core_free(enc.device):
        source = _prefetch(source, depth=max(2, 2 * bs // max_frames))
    n_frames = 0
    for row, (vid, frames, _) in enumerate(tqdm(source, total=len(ids), desc=plan.out_path.name,
                                                unit="video", disable=not show, leave=False)):
        if vid != ids[row]:
            raise PipelineError(f"{plan.frames_path}: row {row} is {vid!r}, expected {ids[row]!r}")
        if len(frames) > max_frames:
            raise PipelineError(f"{plan.frames_path}: {vid} has {len(frames)} frames > "
                                f"frames.max_frames {max_frames}")
        mask[row, : len(frames)] = True
        rows[row] = np.zeros(row_shape, dtype=enc.out_dtype_np)
        left[row] = len(frames)
        n_frames += len(frames)
        if len(frames):
            chunks.append((row, 0, np.asarray(frames)))
            state["buffered"] += len(frames)
        while state["buffered"] >= bs:
            forward(bs)
        flush_rows()
    if state["buffered"]:
        forward(state["buffered"])
    if state["next"] != len(ids):
        raise PipelineError(f"{plan.frames_path}: {len(ids) - state['next']} videos not read")
    w.write_rows("video", 0, mask=mask)
    return n_frames


def _write_texts(enc: Encoder, w: ShardWriter, group: str, ids: list[str], video_ids: list[str],
                 texts: list[str], bs: int) -> None:
    w.create_text(group, ids, video_ids, enc.text_row_shape(),
                  enc.model.config.projection_dim if enc.final else None)
    if not texts:
        return
    ids_all, mask_all = enc.tokenize(texts)  # one call for the shard: far less per-call overhead
    for start in range(0, len(texts), bs):
        w.write_rows(group, start, **enc.tokens(ids_all[start : start + bs],
                                                mask_all[start : start + bs]))


def build_shard(enc: Encoder, plan: ShardPlan, attrs: dict[str, Any], params: Params,
                has_rev: bool, show: bool = True) -> dict[str, int]:
    """Extract one shard into a temp file and rename it onto plan.out_path; return counts."""
    fc = params.features
    caps = plan.captions
    with ShardWriter(plan.out_path, {**attrs, "compute": _compute_tag(enc)}, fc.dtype,
                     fc.compression) as w:
        n_frames = _write_videos(enc, w, plan, params.frames.max_frames, fc.batch_size,
                                 fc.workers, show)
        _write_texts(enc, w, "text", caps["caption_id"].tolist(), caps["video_id"].tolist(),
                     caps["text"].tolist(), fc.batch_size)
        if has_rev:
            rev = caps[caps["reversed_text"] != ""]
            _write_texts(enc, w, "text_rev", rev["caption_id"].tolist(), rev["video_id"].tolist(),
                         rev["reversed_text"].tolist(), fc.batch_size)
    return {"frames": n_frames, "captions": len(caps)}


def _compute_tag(enc: Encoder) -> str:
    return f"{enc.device.type}-{'bf16' if enc.amp else 'fp32'}-torch{torch.__version__}"


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def _record(params: Params) -> tuple[Any, Path]:
    path = Path(params.paths.backbone) / RECORD_FILE
    record = read_record(path)
    fc = params.features
    if record.name != fc.backbone:
        raise PipelineError(f"{path} is for backbone {record.name!r}, params say {fc.backbone!r}: "
                            f"run `dret backbone`")
    if record.source == SCRATCH and record.scratch != to_dict(fc.scratch):
        raise PipelineError(f"{path} was created with other features.scratch settings: "
                            f"run `dret backbone`")
    return record, path


def run_features(params: Params, shard: int | None = None, *,
                 env: dist.DistEnv | None = None) -> dict[str, Any]:
    """Build (or reuse) this rank's feature shards; rank 0 validates all and writes the manifest.

    `shard` builds only that shard index (no manifest). Returns the manifest (rank 0), or this
    rank's counts otherwise.
    """
    t0 = time.time()
    env = env or dist.env()
    fc = params.features
    if fc.threads > 0:
        torch.set_num_threads(fc.threads)
    record, record_path = _record(params)
    plans, has_rev = plan_shards(params)
    if shard is not None and not 0 <= shard < len(plans):
        raise PipelineError(f"--shard {shard} is outside [0, {len(plans)})")
    mine = [shard] if shard is not None else dist.my_items(len(plans), env.rank, env.world_size)
    groups = ("text", "text_rev") if has_rev else ("text",)
    encoder: Encoder | None = None
    built, reused, frames_built = 0, 0, 0
    for i in mine:
        plan = plans[i]
        attrs = shard_attrs(params, record, plan)
        reason = check_shard(plan.out_path, attrs, groups)
        if reason is None:
            reused += 1
            continue
        if reason != "missing":
            log.warning("rebuilding %s: %s", plan.out_path.name, reason)
        for tmp in plan.out_path.parent.glob(f".{plan.out_path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)  # a killed run's leftover (only this rank writes shard i)
        if encoder is None:
            if env.is_main or env.world_size == 1:
                log.info("loading backbone %s", record.name)
            backbone = load_backbone(record_path)
            encoder = Encoder(backbone, fc.cache_layer, fc.max_words, dist.device(env), fc.amp,
                              out_dtype=fc.dtype)
            if params.frames.size != encoder.size:
                log.warning("frames are %d px, the backbone takes %d px: resizing on the fly",
                            params.frames.size, encoder.size)
        counts = build_shard(encoder, plan, attrs, params, has_rev, show=env.is_main)
        frames_built += counts["frames"]
        built += 1
    elapsed = time.time() - t0
    mine_summary = {"shards_built": built, "shards_reused": reused, "frames_built": frames_built,
                    "elapsed_s": round(elapsed, 3)}
    log.info("rank %d: built %d shards, reused %d (%.1f s)", env.rank, built, reused, elapsed)
    if shard is not None:
        return mine_summary
    dist.barrier()
    if not env.is_main:
        return mine_summary
    return _write_manifest(params, record, plans, groups, mine_summary)


def _write_manifest(params: Params, record: Any, plans: list[ShardPlan], groups: tuple[str, ...],
                    rank0: dict[str, Any]) -> dict[str, Any]:
    shards, bad = [], []
    for plan in plans:
        reason = check_shard(plan.out_path, shard_attrs(params, record, plan), groups)
        if reason is not None:
            bad.append(f"{plan.out_path.name} ({reason})")
            continue
        shards.append({"file": plan.out_path.name, **shard_counts(plan.out_path)})
    if bad:
        raise PipelineError(f"{len(bad)} feature shards are not complete: {', '.join(bad[:5])}")
    totals = {k: sum(s[k] for s in shards) for k in ("videos", "frames", "captions",
                                                       "captions_rev", "bytes")}
    fc = params.features
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "backbone": {"name": record.name, "source": record.source, "revision": record.revision,
                     "fingerprint": record.fingerprint},
        "cache_layer": fc.cache_layer, "dtype": fc.dtype, "compression": fc.compression,
        "max_words": fc.max_words, "frames_params": frames_params(params),
        "n_shards": len(shards), **totals, "shards": shards, "rank0": rank0,
        "frames_per_s": round(rank0["frames_built"] / max(rank0["elapsed_s"], 1e-9), 2),
    }
    write_json(Path(params.paths.features) / "manifest.json", manifest)
    return manifest
