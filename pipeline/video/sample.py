"""Uniform frame sampling: plan timestamps, then one ffmpeg decode per video (ffmpeg-python).

Sampling (DiffusionRet / CLIP4Clip style): candidate frames sit at t_k = k / fps for every k with
t_k < duration (fps is kept as an exact fraction, never truncated to an int); when there are more
than `max_frames` candidates, `max_frames` of them are picked uniformly (rounded linspace over the
candidate indices, first and last included). Shorter videos keep the frames they have.

One ffmpeg process per video does everything: `fps` (nearest frame at each tick; `eof_action=pass`
so the last tick before the end is produced), `select` of the planned ticks, scale of the short
side to `size` (bicubic, storage pixels: the sample aspect ratio is ignored, like CLIP4Clip's cv2
reader), centre crop, rgb24 rawvideo on a pipe; `-frames:v` stops the decode after the last
planned frame. Timestamps are seconds from the first video frame.

What a damaged file yields (a deliberate choice): ffmpeg runs tolerant (no `-xerror`), so a decode
error midway conceals or ends the stream instead of losing the whole video. Frames decoded before
the problem are kept when at least one came out, and the video is also listed in failures with a
reason starting `partial:` (fewer frames than planned, decode errors on stderr, or a non-zero exit
after some frames). Videos with no frame at all are dropped and listed with their reason.
"""
from __future__ import annotations

import math
import os
import re
import select
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO

import ffmpeg
import numpy as np

from pipeline.config import FramesConfig
from pipeline.video.probe import ProbeError, ffmpeg_exe, probe
from pipeline.video.shards import encode_frames

GLOBAL_ARGS = ("-nostdin", "-hide_banner", "-v", "error")
TIMEOUT_S = (60.0, 2.0)  # a decode is killed after base + factor * duration seconds


@dataclass(frozen=True)
class VideoTask:
    """One video to sample: id, path as in videos.parquet, resolved path, known duration (NaN)."""

    video_id: str
    path: str
    file: str
    duration: float


@dataclass
class VideoResult:
    """Outcome of one video: frames (encoded) + timestamps, and a reason when not fully sampled.

    frames empty + reason: dropped (a failure). frames present + reason: kept, but partial.
    """

    video_id: str
    path: str
    timestamps: list[float] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)
    height: int = 0
    width: int = 0
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.frames)


class DecodeError(RuntimeError):
    """A video that produced no frame (message: `<kind>: <detail>`)."""


def exact_rate(fps: float) -> Fraction:
    """fps as an exact fraction (2.5 -> 5/2, 29.97 -> 2997/100); never truncated."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(1_000_000)


def plan_timestamps(duration: float, fps: float, max_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the fps ticks to keep and their times in seconds (float64), for one video."""
    rate = exact_rate(fps)
    if not (duration > 0 and math.isfinite(duration)):
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    # k / rate < duration  <=>  k < duration * rate; tolerance for durations printed to 10 ms
    n = max(1, math.ceil(duration * rate.numerator / rate.denominator - 1e-6))
    if n <= max_frames:
        idx = np.arange(n, dtype=np.int64)
    else:  # distinct: the spacing (n-1)/(m-1) is > 1
        idx = np.rint(np.linspace(0, n - 1, max_frames)).astype(np.int64)
    return idx, idx * (rate.denominator / rate.numerator)


def ffmpeg_args(file: str, idx: np.ndarray, cfg: FramesConfig) -> list[str]:
    """The one ffmpeg command (built with ffmpeg-python) decoding the planned frames of `file`."""
    rate = exact_rate(cfg.fps)
    v = ffmpeg.input(file, threads=cfg.threads).video
    v = v.filter("fps", fps=f"{rate.numerator}/{rate.denominator}", eof_action="pass")
    if len(idx) and int(idx[-1]) + 1 != len(idx):  # a subset of the ticks: select them
        v = v.filter("select", "+".join(f"eq(n,{int(i)})" for i in idx))
    v = v.filter("scale", cfg.size, cfg.size, force_original_aspect_ratio="increase",
                 flags="bicubic")
    v = v.filter("crop", cfg.size, cfg.size)
    out = v.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough",
                   an=None, sn=None, dn=None, **{"frames:v": len(idx)})
    cmd = [ffmpeg_exe(), *GLOBAL_ARGS, "-filter_complex_threads", str(cfg.threads)]
    return out.compile(cmd=cmd)


def decode(
    file: str, duration: float, cfg: FramesConfig,
    on_frame: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Decode the planned frames: (uint8 [F,S,S,3], timestamps [F], partial reason or None).

    Frames are read from the pipe one at a time; `on_frame` (e.g. the JPEG encoder) runs on each
    while ffmpeg decodes the next, so encoding overlaps decoding. Raises DecodeError
    (`<kind>: <detail>`) when no frame comes out.
    """
    path = Path(file)
    if not path.exists():
        raise DecodeError("missing: file not found")
    if path.is_dir() or path.stat().st_size == 0:
        raise DecodeError("empty: zero-length file" if path.is_file() else "missing: not a file")
    if not (duration > 0 and math.isfinite(duration)):
        try:
            duration = probe(path).duration
        except ProbeError as exc:
            raise DecodeError(_classify(_ADDRESS.sub("", str(exc)), None)) from None
        if duration <= 0:
            raise DecodeError("unreadable: unknown duration")
    idx, ts = plan_timestamps(duration, cfg.fps, cfg.max_frames)
    frames = np.empty((len(idx), cfg.size, cfg.size, 3), np.uint8)
    timeout = TIMEOUT_S[0] + TIMEOUT_S[1] * duration
    deadline = time.monotonic() + timeout
    timed_out = False
    n = 0
    with tempfile.TemporaryFile() as err_file:  # a file, not a pipe: no stderr deadlock
        proc = subprocess.Popen(ffmpeg_args(str(path), idx, cfg), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err_file, bufsize=0)
        try:
            while n < len(idx) and _read_into(proc.stdout, memoryview(frames[n]).cast("B"),
                                              deadline):
                if on_frame is not None:
                    on_frame(frames[n])
                n += 1
            _read_into(proc.stdout, memoryview(bytearray(1 << 16)), deadline, to_eof=True)
        except TimeoutError:
            timed_out = True
            proc.kill()
        except BaseException:
            proc.kill()
            raise
        finally:
            returncode = proc.wait()  # stdout is at EOF: ffmpeg is exiting
            proc.stdout.close()
        err_file.seek(0)
        errors = _error_lines(err_file.read())
    if timed_out:
        errors.append(f"timed out after {timeout:.0f}s")
    if n == 0:
        raise DecodeError(_classify("\n".join(errors), returncode))
    reason = None
    detail = f" ({errors[-1][:160]})" if errors else ""
    if returncode != 0:
        reason = f"partial: ffmpeg exit {returncode} after {n} of {len(idx)} frames{detail}"
    elif n < len(idx):
        reason = f"partial: stream ended after {n} of {len(idx)} planned frames{detail}"
    elif errors:
        reason = f"partial: decode errors concealed, {n} frames kept{detail}"
    return frames[:n], ts[:n], reason


def _read_into(stream: IO[bytes], buf: memoryview, deadline: float, to_eof: bool = False) -> bool:
    """Fill `buf` from the (unbuffered) pipe; False at end of stream (a partial last frame is
    dropped); TimeoutError after `deadline` (time.monotonic). `to_eof`: read and discard
    until the writer closes the pipe (ffmpeg is done)."""
    got = 0
    while got < len(buf):
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([stream], [], [], wait)[0]:
            raise TimeoutError
        k = stream.readinto(buf[got:])
        if not k:
            return False
        got = 0 if to_eof else got + k
    return True


_ADDRESS = re.compile(r" @ 0x[0-9a-fA-F]+")


def _error_lines(stderr: bytes) -> list[str]:
    """ffmpeg's error lines without pointer addresses (reasons must be the same on every run)."""
    text = _ADDRESS.sub("", stderr.decode("utf-8", "replace"))
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _classify(stderr: str, returncode: int | None) -> str:
    """A short `<kind>: <detail>` reason from ffmpeg's (or the probe's) error text."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1].strip()[:160] if lines else "no output"
    low = stderr.lower()
    if "no such file" in low or "file not found" in low:
        return "missing: file not found"
    if "empty file" in low:
        return "empty: zero-length file"
    if "invalid data found" in low or "moov atom not found" in low:
        return "unreadable: not a video or damaged container (invalid data found)"
    if "matches no streams" in low or "no video stream" in low:
        return "no video stream: the file has no video track"
    if returncode is None:
        return f"unreadable: {last}"
    if returncode == 0:
        return f"no frames: ffmpeg decoded nothing ({last})"
    return f"decode error: ffmpeg exit {returncode} ({last})"


def sample_video(task: VideoTask, cfg: FramesConfig) -> VideoResult:
    """Decode + encode one video; never raises for a bad video."""
    res = VideoResult(task.video_id, task.path)
    encoded: list[bytes] = []

    def encode(frame: np.ndarray) -> None:
        encoded.extend(encode_frames(frame[None], cfg.format, cfg.jpeg_quality))

    try:
        frames, ts, res.reason = decode(task.file, task.duration, cfg, on_frame=encode)
    except DecodeError as exc:
        res.reason = str(exc)
        return res
    except OSError as exc:  # unreadable file, fork failure, ...
        res.reason = f"unreadable: {exc.strerror or exc}"
        return res
    res.frames = encoded[: len(frames)]
    res.timestamps = [float(t) for t in ts]
    res.height, res.width = int(frames.shape[1]), int(frames.shape[2])
    return res


def sample_chunk(arg: tuple[list[VideoTask], FramesConfig]) -> list[VideoResult]:
    """Pool entry point: sample a few videos. It lives here so that a spawned worker imports
    only this module's dependencies (no pandas/torch)."""
    tasks, cfg = arg
    return [sample_video(t, cfg) for t in tasks]


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
