"""The frames stage: sampling plan, decode, shard format, failures, resume, sharding, CLI."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import FramesConfig, Params, load_params
from pipeline.errors import PipelineError
from pipeline.frames import assign_shards, parse_shard, run_frames
from pipeline.video.probe import ffmpeg_exe
from pipeline.video.sample import decode, exact_rate, plan_timestamps
from pipeline.video.shards import file_metadata, iter_shard, list_shards

REPO = Path(__file__).resolve().parents[1]


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-y", "-nostdin", "-v", "error", *args], check=True)


def _clip(path: Path, src: str, seconds: float, rate: int = 8) -> Path:
    sep = ":" if "=" in src else "="
    _ffmpeg("-f", "lavfi", "-i", f"{src}{sep}s=80x60:r={rate}:d={seconds}", "-c:v", "libx264",
            "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic clips plus broken files a real collection contains."""
    d = tmp_path_factory.mktemp("clips")
    _clip(d / "red.mp4", "color=c=red", 3)
    _clip(d / "green.mp4", "color=c=lime", 2.5)
    _clip(d / "blue.mp4", "color=c=blue", 1.2)
    _clip(d / "long.mp4", "testsrc", 20)
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=2", str(d / "audio_only.mp4"))
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video at all\n")
    data = (d / "long.mp4").read_bytes()  # moov first: the cut keeps the first seconds
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return d


GOOD = ["red.mp4", "green.mp4", "blue.mp4", "long.mp4"]
BROKEN = ["audio_only.mp4", "empty.mp4", "text.mp4", "missing.mp4", "truncated.mp4"]


def make_params(root: Path, video_dir: Path, files: list[str], durations: dict | None = None,
                **frames: object) -> Params:
    """A prepared dir (videos.parquet + summary.json) and a params file under `root`."""
    prepared = root / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    durations = durations or {}
    pd.DataFrame({
        "video_id": [Path(f).stem for f in files], "path": files,
        "exists": [(video_dir / f).exists() for f in files],
        "duration": [float(durations.get(f, math.nan)) for f in files], "split": "test",
    }).to_parquet(prepared / "videos.parquet")
    (prepared / "summary.json").write_text(json.dumps({"video_root": str(video_dir)}))
    cfg = {"fps": 1.0, "max_frames": 4, "size": 32, "shard_size": 2, "workers": 1,
           "max_failure_rate": 0.9, **frames}
    doc = {"paths": {"prepared": str(prepared), "frames": str(root / "frames")},
           "frames": cfg, "tracking": {"enabled": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    return load_params(root / "params.yaml")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.parquet"))}


# --------------------------------------------------------------------------------------------
# Plan and decode
# --------------------------------------------------------------------------------------------


def test_plan_timestamps() -> None:
    idx, ts = plan_timestamps(3.0, 1.0, 12)  # short video: the frames it has, no padding
    assert idx.tolist() == [0, 1, 2] and ts.tolist() == [0.0, 1.0, 2.0]
    idx, ts = plan_timestamps(29.6, 1.0, 12)  # 30 ticks -> 12 spread, ends included
    assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 29 and len(set(idx.tolist())) == 12
    assert np.allclose(ts, idx)
    _, ts = plan_timestamps(2.0, 2.5, 64)  # fractional fps is never truncated
    assert np.allclose(ts, [0, 0.4, 0.8, 1.2, 1.6])
    assert plan_timestamps(0.3, 1.0, 8)[0].tolist() == [0]
    assert len(plan_timestamps(math.nan, 1.0, 8)[0]) == 0
    assert exact_rate(29.97) == exact_rate(2997 / 100)


def test_decode_red_clip_content_size_and_times(clips: Path) -> None:
    cfg = FramesConfig(fps=2.0, max_frames=4, size=24, format="raw")
    frames, ts, reason = decode(str(clips / "red.mp4"), 3.0, cfg)
    assert reason is None
    assert frames.shape == (4, 24, 24, 3) and frames.dtype == np.uint8
    assert np.allclose(ts, [0.0, 1.0, 1.5, 2.5])  # 6 ticks at 2 fps -> 4 spread
    mean = frames.reshape(-1, 3).mean(0)
    assert mean[0] > 200 and mean[1] < 40 and mean[2] < 40, mean


def test_decode_timeout_kills_ffmpeg(clips: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.video.sample as sample

    monkeypatch.setattr(sample, "TIMEOUT_S", (0.0, 0.0))
    with pytest.raises(sample.DecodeError, match="timed out after 0s"):
        decode(str(clips / "long.mp4"), 20.0, FramesConfig(size=16))


def test_stage_writes_readable_shards(tmp_path: Path, clips: Path) -> None:
    p = make_params(tmp_path, clips, GOOD, size=32, max_frames=4)
    m = run_frames(p)
    assert m["complete"] and m["videos_sampled"] == 4 and m["videos_failed"] == 0
    shards = list_shards(tmp_path / "frames")
    assert [s.name for s in shards] == ["shard-00000.parquet", "shard-00001.parquet"]
    got = {vid: (f, t) for s in shards for vid, f, t in iter_shard(s)}
    assert list(got) == ["blue", "green", "long", "red"]  # sorted by id
    assert got["blue"][0].shape == (2, 32, 32, 3)  # 1.2 s at 1 fps: 2 frames, no fakes
    assert got["green"][1].tolist() == [0.0, 1.0, 2.0]
    assert got["long"][1].tolist() == [0.0, 6.0, 13.0, 19.0]
    colours = {"red": 0, "green": 1, "blue": 2}
    for vid, ch in colours.items():
        mean = got[vid][0].reshape(-1, 3).mean(0)
        assert mean.argmax() == ch and mean[ch] > 200, (vid, mean)
    meta = file_metadata(shards[0])
    assert meta["dret.format"] == "jpeg"
    assert m["frames"] == 2 + 3 + 4 + 3
    assert json.loads((tmp_path / "frames" / "manifest.json").read_text())["frames"] == 12


def test_raw_format_is_exact(tmp_path: Path, clips: Path) -> None:
    p = make_params(tmp_path, clips, ["long.mp4"], format="raw", size=16)
    run_frames(p)
    ((vid, frames, ts),) = list(iter_shard(tmp_path / "frames" / "shard-00000.parquet"))
    ref, ref_ts, _ = decode(str(clips / "long.mp4"), math.nan, p.frames)
    assert vid == "long" and np.array_equal(frames, ref) and np.array_equal(ts, ref_ts)


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


def test_broken_files_are_recorded_and_stage_continues(tmp_path: Path, clips: Path) -> None:
    p = make_params(tmp_path, clips, GOOD + BROKEN)
    m = run_frames(p)
    fails = pd.read_parquet(tmp_path / "frames" / "failures.parquet").set_index("video_id")
    assert list(fails.columns) == ["path", "reason"]
    assert fails.loc["missing", "reason"].startswith("missing:")
    assert fails.loc["empty", "reason"].startswith("empty:")
    assert fails.loc["text", "reason"].startswith("unreadable:")
    assert fails.loc["audio_only", "reason"].startswith("no video stream")
    assert fails.loc["truncated", "reason"].startswith("partial:")  # frames before the cut kept
    sampled = {v for s in list_shards(tmp_path / "frames") for v, _, _ in iter_shard(s)}
    assert sampled == {"red", "green", "blue", "long", "truncated"}
    assert m["videos_failed"] == 4 and m["videos_partial"] == 1 and m["videos_sampled"] == 5
    assert m["failures_by_kind"] == {"empty": 1, "missing": 1, "no video stream": 1,
                                     "partial": 1, "unreadable": 1}


def test_failure_rate_exceeded_raises_after_writing(tmp_path: Path, clips: Path) -> None:
    p = make_params(tmp_path, clips, ["red.mp4", "empty.mp4", "text.mp4"], max_failure_rate=0.5)
    with pytest.raises(PipelineError, match="2 of 3 videos failed"):
        run_frames(p)
    assert (tmp_path / "frames" / "manifest.json").is_file()
    assert list(iter_shard(tmp_path / "frames" / "shard-00001.parquet")) == []  # all failed


def test_cli_exits_nonzero_with_one_line(tmp_path: Path, clips: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.app import app

    make_params(tmp_path, clips, ["red.mp4", "empty.mp4", "missing.mp4"], max_failure_rate=0.1)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["frames", "--params", "params.yaml"])
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "2 of 3 videos failed" in errors[0]
    res = CliRunner().invoke(app, ["frames", "--params", "params.yaml", "--shard", "2/2"])
    assert res.exit_code == 1 and "error: --shard must be I/N" in res.output


def test_real_benchmark_clips(tmp_path: Path, bench_dir: Path) -> None:
    """Every shared clip (AVI MPEG-4 / Cinepak, MP4 H.264, the damaged one) gives frames."""
    vids = tmp_path / "videos"
    shutil.copytree(bench_dir / "videos", vids)
    files = sorted(p.name for p in vids.iterdir())
    p = make_params(tmp_path, vids, files, size=32, max_frames=12, shard_size=8)
    m = run_frames(p)
    got = {v: (f, t) for s in list_shards(tmp_path / "frames") for v, f, t in iter_shard(s)}
    assert m["videos_failed"] == 0 and set(got) == {Path(f).stem for f in files}
    assert len(got["tree"][1]) == 12 and got["tree"][1][-1] == 29.0  # 29.6 s, Cinepak
    assert len(got["Megamind_bugy"][1]) == 9  # the damaged AVI decodes its 9 s cleanly
    assert all(f.shape[1:] == (32, 32, 3) and f.std() > 5 for f, _ in got.values())


# --------------------------------------------------------------------------------------------
# Sharding and resume
# --------------------------------------------------------------------------------------------


def test_assign_shards_and_parse() -> None:
    assert assign_shards(5, None, 0, 1) == [0, 1, 2, 3, 4]
    assert assign_shards(5, (1, 2), 0, 1) == [1, 3]
    assert assign_shards(5, None, 1, 2) == [1, 3]
    assert assign_shards(5, (0, 2), 1, 2) == [2]
    assert parse_shard("1/3") == (1, 3) and parse_shard(None) is None
    with pytest.raises(PipelineError):
        parse_shard("3/3")


def test_shard_split_matches_single_run(tmp_path: Path, clips: Path) -> None:
    files = GOOD + ["empty.mp4"]
    single = make_params(tmp_path / "a", clips, files)
    run_frames(single)
    split = make_params(tmp_path / "b", clips, files)
    m0 = run_frames(split, (0, 2))
    assert not m0["complete"] and not (tmp_path / "b/frames/manifest.json").exists()
    m1 = run_frames(split, (1, 2))
    assert m1["complete"] and m1["shards_written"] == 1
    assert _bytes(tmp_path / "a/frames") == _bytes(tmp_path / "b/frames")
    assert len(_bytes(tmp_path / "a/frames")) == 7  # 3 shards + 3 failures + failures.parquet


def test_resume_skips_done_shards_and_removes_temps(tmp_path: Path, clips: Path) -> None:
    p = make_params(tmp_path, clips, GOOD + ["text.mp4"])
    run_frames(p)
    out = tmp_path / "frames"
    ref = _bytes(out)
    (out / "failures-00001.parquet").unlink()  # killed between the shard and its marker
    (out / "shard-00002.parquet").unlink()
    (out / "failures-00002.parquet").unlink()
    (out / ".shard-00002.parquet.k1ll3d.tmp").write_bytes(b"half a shard")
    m = run_frames(p)
    assert m["shards_written"] == 2 and m["shards_skipped"] == 1
    assert _bytes(out) == ref and not list(out.glob(".*.tmp"))


def test_changed_params_redo_shards(tmp_path: Path, clips: Path) -> None:
    p = make_params(tmp_path, clips, ["red.mp4"], jpeg_quality=90)
    run_frames(p)
    p = make_params(tmp_path, clips, ["red.mp4"], jpeg_quality=50)
    assert run_frames(p)["shards_written"] == 1
    (tmp_path / "frames" / "shard-00007.parquet").write_bytes(b"from a larger earlier run")
    run_frames(p)
    assert [s.name for s in list_shards(tmp_path / "frames")] == ["shard-00000.parquet"]


# --------------------------------------------------------------------------------------------
# Slow: processes, ranks, kills
# --------------------------------------------------------------------------------------------


def _stage_cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages", "frames", "--params", str(root / "params.yaml"),
            *extra]


def _env(**kv: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DRET_TRACKING": "off", **kv}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if k not in kv:
            env.pop(k, None)
    return env


@pytest.mark.slow
def test_workers_pool_matches_inline(tmp_path: Path, clips: Path) -> None:
    files = GOOD + BROKEN
    run_frames(make_params(tmp_path / "a", clips, files, workers=1))
    run_frames(make_params(tmp_path / "b", clips, files, workers=2))
    assert _bytes(tmp_path / "a/frames") == _bytes(tmp_path / "b/frames")


@pytest.mark.slow
def test_two_ranks_match_single_run(tmp_path: Path, clips: Path) -> None:
    files = GOOD + BROKEN
    run_frames(make_params(tmp_path / "a", clips, files))
    make_params(tmp_path / "b", clips, files)
    procs = [subprocess.Popen(_stage_cmd(tmp_path / "b"), cwd=tmp_path,
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in (1, 0)]  # rank 1 first: rank 0 must wait for its shards
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    assert _bytes(tmp_path / "a/frames") == _bytes(tmp_path / "b/frames")
    assert json.loads((tmp_path / "b/frames/manifest.json").read_text())["videos"] == 9


@pytest.mark.slow
def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path: Path, clips: Path) -> None:
    vids = tmp_path / "videos"
    vids.mkdir()
    for i in range(10):  # enough work that the kill lands inside a shard write
        shutil.copy(clips / GOOD[i % 4], vids / f"v{i:02d}.mp4")
    files = sorted(p.name for p in vids.iterdir())
    run_frames(make_params(tmp_path / "ref", vids, files, size=64, max_frames=8))
    root = tmp_path / "run"
    make_params(root, vids, files, size=64, max_frames=8)
    out = root / "frames"
    proc = subprocess.Popen(_stage_cmd(root), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
        list(out.glob("failures-*.parquet")) and list(out.glob(".shard-*.tmp"))
    ):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # only the group this test started
    proc.wait()
    assert not (out / "manifest.json").exists(), "stage finished before the kill"
    assert list(out.glob(".*.tmp")), "kill did not land during a shard write"
    res = subprocess.run(_stage_cmd(root), cwd=tmp_path, env=_env(), capture_output=True)
    assert res.returncode == 0, res.stderr.decode()
    assert _bytes(tmp_path / "ref/frames") == _bytes(out)
    assert not list(out.glob(".*.tmp"))
    assert pq.read_metadata(out / "shard-00000.parquet").num_rows == 2
