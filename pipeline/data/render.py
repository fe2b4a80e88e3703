"""Rendering of the synthetic benchmark's clips: vectorised numpy frames + H.264 encoding.

Knows shapes, colours, backgrounds and motions as canonical names and draws them; the words
used for them in captions live in `pipeline.data.synthetic`. One clip = one `RenderJob`, which
`render_job` turns into `<video_id>.mp4` (one ffmpeg process per clip, frames piped to stdin).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.video.probe import ffmpeg_exe

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 255),
    "yellow": (250, 230, 20),
    "magenta": (230, 30, 230),
    "orange": (255, 140, 0),
    "cyan": (20, 230, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "checkered": (0, 0, 0),  # drawn as a pattern, see _background
}
CHECKER_TONES = ((70, 70, 70), (150, 150, 150))
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "static", "grow", "shrink")
SPEEDS: tuple[str, ...] = ("slow", "fast")
STATIC_SPEED = "none"  # the speed of a static clip
REVERSE: dict[str, str] = {
    "left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink",
    "shrink": "grow", "static": "static",
}
RENDER_VERSION = 1  # bump when pixels change, so resumable runs re-render old clips

# Geometry, as fractions of the frame size (64 px: radius 9 px, object 18 px).
RADIUS = 0.14
SHIFT = {"slow": 0.22, "fast": 0.5}  # translation over the whole clip
SCALE = {"slow": (0.75, 1.25), "fast": (0.55, 1.45)}  # grow: start -> end (shrink: reversed)
MARGIN = 1.0  # px kept free at the frame border
GAP = 2.0  # px between two objects' bounding boxes


@dataclass(frozen=True)
class RenderJob:
    """Everything needed to draw and encode one clip (picklable, for the worker pool)."""

    video_id: str
    path: str  # absolute output path
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    background: str
    motion: str
    speed: str
    starts: tuple[tuple[float, float], ...]  # (x, y) centre of each object in the first frame
    size: int
    fps: int
    n_frames: int
    noise: float
    noise_seed: tuple[int, ...]
    fingerprint: str  # written into the MP4 comment tag; equal fingerprint = reusable file


def n_frames_of(seconds: float, fps: int) -> int:
    """Frames in a clip of `seconds` at `fps` (at least 2)."""
    return max(2, int(round(seconds * fps)))


def displacement(motion: str, speed: str, size: int) -> tuple[float, float]:
    """Total (dx, dy) in px over the clip for a translating motion, else (0, 0)."""
    if motion not in ("left", "right", "up", "down"):
        return 0.0, 0.0
    d = SHIFT[speed] * size
    return {"left": (-d, 0.0), "right": (d, 0.0), "up": (0.0, -d), "down": (0.0, d)}[motion]


def scales(motion: str, speed: str, n_frames: int) -> np.ndarray:
    """Per-frame size factor [T] (1 except for grow/shrink)."""
    if motion not in ("grow", "shrink"):
        return np.ones(n_frames)
    a, b = SCALE[speed]
    if motion == "shrink":
        a, b = b, a
    return np.linspace(a, b, n_frames)


def max_radius(motion: str, speed: str, size: int) -> float:
    """Largest half-extent in px an object reaches during the clip."""
    return RADIUS * size * (max(SCALE[speed]) if motion in ("grow", "shrink") else 1.0)


def start_range(motion: str, speed: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest (x, y) start centre that keeps the whole trajectory inside the frame."""
    r = max_radius(motion, speed, size) + MARGIN
    d = np.asarray(displacement(motion, speed, size))
    lo = r - np.minimum(d, 0.0)
    hi = (size - 1) - r - np.maximum(d, 0.0)
    return lo, hi


def end_positions(job_starts: np.ndarray, motion: str, speed: str, size: int) -> np.ndarray:
    """Centres in the last frame for starts [n, 2]."""
    return job_starts + np.asarray(displacement(motion, speed, size))


def layout_ok(starts: np.ndarray, motion: str, speed: str, size: int) -> bool:
    """True when every object stays in frame and objects never overlap (shared motion)."""
    lo, hi = start_range(motion, speed, size)
    if np.any(starts < lo - 1e-9) or np.any(starts > hi + 1e-9):
        return False
    if len(starts) < 2:
        return True
    sep = 2 * max_radius(motion, speed, size) + GAP
    diff = np.abs(starts[:, None, :] - starts[None, :, :]).max(-1)
    return bool(np.all(diff[np.triu_indices(len(starts), 1)] >= sep))


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in normalised coordinates (u right, v down; unit half-extent)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":  # apex up, base at v = 0.85
        return (v <= 0.85) & (v >= -1.0) & (np.abs(u) <= (v + 1.0) / 1.85)
    if shape == "cross":  # a plus sign
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.5**2)
    raise ValueError(f"unknown shape {shape!r}")


def _background(name: str, size: int) -> np.ndarray:
    """Background image [S, S, 3] float32."""
    if name == "checkered":
        cell = max(2, size // 8)
        idx = np.arange(size) // cell
        odd = (idx[:, None] + idx[None, :]) % 2 == 1
        tones = np.asarray(CHECKER_TONES, dtype=np.float32)
        return tones[odd.astype(int)]
    return np.broadcast_to(np.asarray(BACKGROUNDS[name], np.float32), (size, size, 3)).copy()


def render_frames(job: RenderJob, noise: bool = True) -> np.ndarray:
    """Frames [T, S, S, 3] uint8 of a clip; `noise=False` draws it noise-free."""
    T, S = job.n_frames, job.size
    t = np.linspace(0.0, 1.0, T)
    starts = np.asarray(job.starts, dtype=np.float64)  # [n, 2]
    d = np.asarray(displacement(job.motion, job.speed, S))
    centres = starts[None, :, :] + t[:, None, None] * d  # [T, n, 2]
    radius = RADIUS * S * scales(job.motion, job.speed, T)  # [T]
    coords = np.arange(S, dtype=np.float64)
    frames = np.broadcast_to(_background(job.background, S), (T, S, S, 3)).copy()
    for k, (shape, colour) in enumerate(zip(job.shapes, job.colours, strict=True)):
        u = (coords[None, None, :] - centres[:, k, 0, None, None]) / radius[:, None, None]
        v = (coords[None, :, None] - centres[:, k, 1, None, None]) / radius[:, None, None]
        mask = shape_mask(shape, u, v)  # [T, S, S]
        frames[mask] = COLOURS[colour]
    if noise and job.noise > 0:
        rng = np.random.default_rng(list(job.noise_seed))
        frames += rng.normal(0.0, job.noise, size=frames.shape).astype(np.float32)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def encode_mp4(frames: np.ndarray, path: Path, fps: int, comment: str = "") -> None:
    """Encode RGB frames [T, H, W, 3] to H.264/yuv420p MP4 at `path` (atomic; raises on failure)."""
    T, H, W, _ = frames.shape
    if H % 2 or W % 2:
        raise PipelineError(f"{path.name}: frame size {W}x{H} must be even for yuv420p")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}", "-r", str(fps), "-i", "pipe:0",
        "-an", "-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p",
        "-threads", "1", "-g", str(4 * fps), "-fflags", "+bitexact", "-flags:v", "+bitexact",
        "-map_metadata", "-1", "-metadata", f"comment={comment}", "-f", "mp4", str(tmp),
    ]
    try:
        proc = subprocess.run(
            cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True, check=False
        )
        err = proc.stderr.decode("utf-8", "replace").strip()
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            last = err.splitlines()[-1] if err else "no output"
            raise PipelineError(f"ffmpeg failed on {path.name} (exit {proc.returncode}): {last}")
        if err:  # -loglevel error: anything printed is an error, even with exit code 0
            raise PipelineError(f"ffmpeg reported errors on {path.name}: {err[:300]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_current(path: Path, fingerprint: str) -> bool:
    """True when `path` is a finished clip carrying `fingerprint` in its MP4 comment tag."""
    try:
        return fingerprint.encode() in path.read_bytes()
    except OSError:
        return False


def render_job(job: RenderJob) -> tuple[str, bool]:
    """Render + encode one clip unless a current copy exists; returns (video_id, rendered)."""
    path = Path(job.path)
    if is_current(path, job.fingerprint):
        return job.video_id, False
    encode_mp4(render_frames(job), path, job.fps, comment=job.fingerprint)
    return job.video_id, True


def decode_mp4(path: str | Path, size: int) -> np.ndarray:
    """Decode every frame of an MP4 to RGB [T, size, size, 3] uint8 (for checks and tests)."""
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
         "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
        capture_output=True, check=False,
    )
    if proc.returncode != 0:
        raise PipelineError(f"cannot decode {path}: {proc.stderr.decode(errors='replace')[-300:]}")
    data = np.frombuffer(proc.stdout, dtype=np.uint8)
    if data.size % (size * size * 3):
        raise PipelineError(f"{path}: decoded {data.size} bytes, not a multiple of {size}x{size}")
    return data.reshape(-1, size, size, 3)
