"""Benchmark of the frames stage (issue 3).

1. per-video work of the stage (ffmpeg-python decode + numpy + JPEG/raw encode, `sample_video`)
   against a bare ffmpeg decode of the same videos with the same command (filters, threads),
   sequentially, min of `--repeat` interleaved rounds: ratio = bare time / stage time;
2. the whole stage (`run_frames`, pool start-up included, torch import excluded) with 1 and 2
   workers, one decode thread each, in a fresh subprocess per run: videos/s and peak memory
   (getrusage self + children, and the summed RSS of the process tree);
3. JPEG (Pillow, quality 90) vs raw uint8 frames at 64 and 224 px: encode, bytes, decode, and a
   shard write + `iter_shard` read per frame.

Videos: synthetic demo-like clips (64x64, 4 s, 8 fps, H.264, made with lavfi) and the real clips
of ../shared/benchmarks/videos. Prints tables; `--json` writes the numbers too.
Run: .venv/bin/python benchmarks/bench_frames.py [--clips 24] [--copies 20] [--only PART]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import FramesConfig, load_params  # noqa: E402
from pipeline.video.probe import ffmpeg_exe, probe  # noqa: E402
from pipeline.video.sample import (  # noqa: E402
    VideoTask,
    decode,
    ffmpeg_args,
    plan_timestamps,
    sample_video,
)
from pipeline.video.shards import ShardWriter, encode_frames, iter_shard  # noqa: E402

REAL = REPO.parent / "shared" / "benchmarks" / "videos"
DEMO = (2.0, 8)  # fps, max_frames of params.yaml (the offline demo)
SOURCES = ["testsrc2", "mandelbrot", "smptebars", "rgbtestsrc", "life", "cellauto"]


def make_clips(folder: Path, n: int) -> list[Path]:
    """n demo-like clips: 64x64, 4 s, 8 fps, H.264 (like the synthetic benchmark's)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"syn{i:03d}.mp4"
        src = SOURCES[i % len(SOURCES)]
        subprocess.run([ffmpeg_exe(), "-y", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                        f"{src}=s=64x64:r=8", "-t", "4", "-vf", f"noise=alls={i % 20}:allf=t",
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(p)],
                       check=True)
        out.append(p)
    return out


def load_str() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f}/{b:.2f}/{c:.2f}"


# ---------------------------------------------------------------------------------------------
# 1. stage per-video work vs bare ffmpeg
# ---------------------------------------------------------------------------------------------


def per_video(files: list[Path], cfg: FramesConfig, repeat: int) -> dict:
    durations = [probe(f).duration for f in files]
    cmds = [ffmpeg_args(str(f), plan_timestamps(d, cfg.fps, cfg.max_frames)[0], cfg)
            for f, d in zip(files, durations, strict=True)]
    tasks = [VideoTask(f.stem, f.name, str(f), d) for f, d in zip(files, durations, strict=True)]
    bare, stage, bare_cpu, stage_cpu = [], [], [], []
    for _ in range(repeat):  # interleaved rounds: load changes hit both alike
        t, c0 = time.perf_counter(), cpu_seconds()
        for c in cmds:
            subprocess.run(c, capture_output=True, check=True)
        bare.append(time.perf_counter() - t)
        bare_cpu.append(cpu_seconds() - c0)
        t, c0 = time.perf_counter(), cpu_seconds()
        for task in tasks:
            assert sample_video(task, cfg).ok
        stage.append(time.perf_counter() - t)
        stage_cpu.append(cpu_seconds() - c0)
    b, s = min(bare), min(stage)
    n = len(files)
    return {"videos": n, "bare_s": b, "stage_s": s, "bare_vps": n / b, "stage_vps": n / s,
            "ratio": b / s, "bare_cpu_ms": min(bare_cpu) / n * 1e3,
            "stage_cpu_ms": min(stage_cpu) / n * 1e3, "cpu_ratio": min(bare_cpu) / min(stage_cpu)}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


# ---------------------------------------------------------------------------------------------
# 2. whole stage, 1 vs 2 workers (fresh subprocess each)
# ---------------------------------------------------------------------------------------------


def tree_pss_mb(pid: int) -> float:
    """Summed PSS (shared pages split between sharers: no double count after fork) of a process
    and its descendants, in MiB; NaN without psutil."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return math.nan
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass
    return total / 2**20


def one_run(params_path: str) -> None:
    """Child mode: run the stage once, print elapsed + peak memory as JSON."""
    import pipeline.dist  # noqa: F401 - torch import: start-up, not throughput
    from pipeline.frames import run_frames

    p = load_params(params_path)
    print("ready", flush=True)
    t, c0 = time.perf_counter(), cpu_seconds()
    m = run_frames(p, progress=False)
    elapsed, cpu = time.perf_counter() - t, cpu_seconds() - c0
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"elapsed_s": elapsed, "videos": m["videos"], "failed": m["videos_failed"],
                      "frames": m["frames"], "self_mb": self_kb / 1024,
                      "child_mb": child_kb / 1024, "cpu_ms_per_video": cpu / m["videos"] * 1e3}))


def stage_runs(files: list[Path], copies: int, size: int, workdir: Path) -> list[dict]:
    rows = [(f"{f.stem}-{k:02d}", f.name) for k in range(copies) for f in files]
    rows.sort()
    durations = {f.name: probe(f).duration for f in files}  # prepare records them
    out = []
    for workers in (1, 2, 1, 2):  # twice each, alternating; the min per setting is reported
        root = workdir / f"run-w{workers}-{len(out)}"
        prepared = root / "prepared"
        prepared.mkdir(parents=True)
        pd.DataFrame({"video_id": [r[0] for r in rows], "path": [r[1] for r in rows],
                      "exists": True, "duration": [durations[r[1]] for r in rows],
                      "split": "train"}).to_parquet(prepared / "videos.parquet")
        (prepared / "summary.json").write_text(json.dumps({"video_root": str(files[0].parent)}))
        doc = {"paths": {"prepared": str(prepared), "frames": str(root / "frames")},
               "frames": {"fps": DEMO[0], "max_frames": DEMO[1], "size": size, "format": "jpeg",
                          "shard_size": 64, "workers": workers, "threads": 1},
               "tracking": {"enabled": False}}
        (root / "params.yaml").write_text(yaml.safe_dump(doc))
        before = load_str()
        # `-c`: spawned workers import only what unpickling the task needs, as under `dret`
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import bench_frames; bench_frames.one_run({str(root / 'params.yaml')!r})")
        proc = subprocess.Popen([sys.executable, "-c", code],
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "DRET_TRACKING": "off"})
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        peak = 0.0
        while proc.poll() is None:  # sampled from outside: the measured process stays clean
            peak = max(peak, tree_pss_mb(proc.pid))
            time.sleep(0.1)
        out_text = proc.stdout.read()
        assert proc.wait() == 0, out_text
        rec = json.loads(out_text.strip().splitlines()[-1])
        rec.update(workers=workers, load_before=before, load_after=load_str(),
                   vps=rec["videos"] / rec["elapsed_s"], tree_peak_mb=peak)
        out.append(rec)
        shutil.rmtree(root)
    return out


# ---------------------------------------------------------------------------------------------
# 3. JPEG vs raw
# ---------------------------------------------------------------------------------------------


def formats(files: list[Path], size: int, workdir: Path, repeat: int) -> list[dict]:
    cfg = FramesConfig(fps=1.0, max_frames=12, size=size, format="raw")
    frames = np.concatenate([decode(str(f), math.nan, cfg)[0] for f in files])
    frames = np.concatenate([frames] * max(1, 480 // len(frames)))  # amortise file overheads
    rows = []
    for fmt in ("jpeg", "raw"):
        enc_t, dec_t, io_t = [], [], []
        for _ in range(repeat):
            t = time.perf_counter()
            blobs = encode_frames(frames, fmt, 90)
            enc_t.append(time.perf_counter() - t)
            path = workdir / f"fmt-{fmt}-{size}.parquet"
            t = time.perf_counter()
            with ShardWriter(path, fmt, {}) as w:
                for i in range(0, len(blobs), 12):
                    w.add(f"v{i:05d}", [0.0] * len(blobs[i:i + 12]), blobs[i:i + 12], size, size)
            t_write = time.perf_counter() - t
            t = time.perf_counter()
            n = sum(len(f) for _, f, _ in iter_shard(path))
            dec_t.append(time.perf_counter() - t)
            io_t.append(t_write)
            assert n == len(frames)
        nbytes = sum(len(b) for b in blobs)
        err = 0.0
        if fmt == "jpeg":
            back = np.stack([f for _, fs, _ in iter_shard(path) for f in fs])
            err = float(np.abs(back.astype(np.int16) - frames).mean())
        nf = len(frames)
        rows.append({"size": size, "format": fmt, "frames": nf,
                     "encode_us": min(enc_t) / nf * 1e6, "kb_per_frame": nbytes / nf / 1024,
                     "write_us": min(io_t) / nf * 1e6, "read_decode_us": min(dec_t) / nf * 1e6,
                     "file_mb": path.stat().st_size / 2**20, "mean_abs_err": err})
    for r in rows:
        r["end_to_end_us"] = r["encode_us"] + r["write_us"] + r["read_decode_us"]
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else (
            f"{v:.0f}" if isinstance(v, float) else str(v))
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols)),
             "  ".join("-" * x for x in w)]
    lines += ["  ".join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=24, help="synthetic clips to generate")
    ap.add_argument("--copies", type=int, default=20, help="each clip listed this often (stage)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", choices=["per_video", "stage", "formats"], default=None,
                    help="run one part (e.g. the scaling test when the machine is quiet)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-frames-"))
    try:
        print(f"cpus {os.cpu_count()}, load {load_str()}, ffmpeg {ffmpeg_exe()}", flush=True)
        syn = make_clips(work / "syn", args.clips)
        real = sorted(REAL.glob("*")) if REAL.is_dir() else []
        report: dict = {"load_start": load_str()}
        parts = [args.only] if args.only else ["per_video", "stage", "formats"]
        if "per_video" in parts:
            report["per_video"] = part_per_video(syn, real, args.repeat)
        if "stage" in parts:
            report["stage"], report["speedup_2_vs_1"] = part_stage(syn, args.copies, work)
        if "formats" in parts:
            report["formats"] = part_formats(real or syn, work, args.repeat)
        report["load_end"] = load_str()
        print(f"\nload at start/end: {report['load_start']} -> {report['load_end']}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def part_per_video(syn: list[Path], real: list[Path], repeat: int) -> list[dict]:
    rows = []
    for name, files, size in [("synthetic", syn, 64), ("real", real, 64), ("real", real, 224)]:
        if not files:
            continue
        fps, max_frames = DEMO if name == "synthetic" else (1.0, 12)
        for fmt in ("jpeg", "raw"):
            cfg = FramesConfig(fps=fps, max_frames=max_frames, size=size, format=fmt, threads=1)
            r = per_video(files, cfg, repeat)
            r.update(set=name, size=size, format=fmt, load=load_str())
            rows.append(r)
    print("\n1. per-video work: stage (sample_video) vs bare ffmpeg, same command, "
          "1 decode thread, sequential (min of rounds); synthetic: fps 2 / 8 frames, "
          "real: fps 1 / 12 frames")
    print(table(rows, ["set", "size", "format", "videos", "bare_vps", "stage_vps", "ratio",
                       "bare_cpu_ms", "stage_cpu_ms", "cpu_ratio", "load"]))
    print("ratio = bare / stage wall time (>= 0.8 wanted); cpu_ratio the same in CPU "
          "seconds (self + children), which the other helpers' load does not inflate")
    return rows


def bare_scaling(files: list[Path], copies: int) -> float:
    """Control: the bare ffmpeg commands of the stage run by 1 vs 2 concurrent launchers.

    Its ratio is what two processes can gain on this machine right now (the other helpers'
    load included); the stage's 2-vs-1 speedup is read against it."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = FramesConfig(fps=DEMO[0], max_frames=DEMO[1], size=64, threads=1)
    cmds = [ffmpeg_args(str(f), plan_timestamps(probe(f).duration, *DEMO)[0], cfg)
            for f in files] * copies

    def run(chunk: list[list[str]]) -> None:
        for c in chunk:
            subprocess.run(c, capture_output=True, check=True)

    times = {}
    for n in (1, 2, 1, 2):
        t = time.perf_counter()
        with ThreadPoolExecutor(n) as ex:
            list(ex.map(run, [cmds[i::n] for i in range(n)]))
        times[n] = min(times.get(n, math.inf), time.perf_counter() - t)
    return times[1] / times[2]


def part_stage(syn: list[Path], copies: int, work: Path) -> tuple[list[dict], float]:
    control = bare_scaling(syn, copies)
    rows = stage_runs(syn, copies, 64, work)
    best = {w: min((r for r in rows if r["workers"] == w), key=lambda r: r["elapsed_s"])
            for w in (1, 2)}
    print(f"\n2. whole stage on {len(syn) * copies} synthetic videos (64 px, fps 2, "
          f"8 frames, jpeg), threads=1 per worker, pool start-up included")
    print(table(rows, ["workers", "videos", "elapsed_s", "vps", "cpu_ms_per_video", "self_mb",
                       "child_mb", "tree_peak_mb", "load_before", "load_after"]))
    print("self_mb/child_mb: getrusage maxrss of the stage process / its largest child "
          "(a child's figure includes the RSS it inherited at fork); tree_peak_mb: summed "
          "PSS of the stage's process tree, sampled every 100 ms from outside")
    speedup = best[2]["vps"] / best[1]["vps"]
    print(f"2 workers / 1 worker (best of each): {speedup:.2f}x; control, the bare ffmpeg "
          f"commands from 2 vs 1 launcher threads, just before: {control:.2f}x")
    return rows, speedup


def part_formats(files: list[Path], work: Path, repeat: int) -> list[dict]:
    rows = formats(files, 64, work, repeat) + formats(files, 224, work, repeat)
    print("\n3. JPEG (q90) vs raw, per frame: encode, shard write, read+decode "
          "(iter_shard); real clips")
    print(table(rows, ["size", "format", "frames", "encode_us", "kb_per_frame", "write_us",
                       "read_decode_us", "end_to_end_us", "mean_abs_err"]))
    return rows


if __name__ == "__main__":
    main()
