"""Probe a video's duration, fps and size with the ffmpeg binary alone (no ffprobe)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from pipeline.errors import PipelineError


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The ffmpeg binary: $DRET_FFMPEG, else the one on PATH, else imageio-ffmpeg's static build."""
    if os.environ.get("DRET_FFMPEG"):
        return os.environ["DRET_FFMPEG"]
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise PipelineError(
            "no ffmpeg binary: install the imageio-ffmpeg package or Debian's ffmpeg"
        ) from exc


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds
    fps: float  # average frame rate (exact fraction as float, never truncated)
    width: int
    height: int


_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_STREAM = re.compile(r"Stream #\S+.*?Video:.*?(\d{2,5})x(\d{2,5})")
_FPS = re.compile(r"(\d+(?:\.\d+)?(?:/\d+)?)\s*fps")
_TBR = re.compile(r"(\d+(?:\.\d+)?(?:k)?)\s*tbr")


class ProbeError(PipelineError):
    """The file is missing, empty, not a video, or unreadable."""


def probe(path: str | Path, timeout: float = 30.0) -> VideoInfo:
    """Duration, fps and size of a video from `ffmpeg -i` (raises ProbeError with a reason)."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError("file not found")
    if path.stat().st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        proc = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
            capture_output=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(f"probe timed out after {timeout:.0f}s") from None
    err = proc.stderr.decode("utf-8", "replace")
    stream = _STREAM.search(err)
    if stream is None:
        last = err.strip().splitlines()[-1] if err.strip() else "no output"
        raise ProbeError(f"no video stream ({last[:200]})")
    width, height = int(stream.group(1)), int(stream.group(2))
    line = err[stream.start() : err.find("\n", stream.start())]
    fps = _parse_rate(_FPS.search(line)) or _parse_rate(_TBR.search(line)) or 0.0
    m = _DURATION.search(err)
    duration = 0.0
    if m:
        duration = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    return VideoInfo(duration=duration, fps=fps, width=width, height=height)


def _parse_rate(m: re.Match | None) -> float | None:
    if m is None:
        return None
    s = m.group(1)
    if s.endswith("k"):
        return float(s[:-1]) * 1000
    return float(Fraction(s)) if "/" in s else float(s)
