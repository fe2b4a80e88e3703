"""Faults: kills, truncated shards, a full disk, params changed under a resumed run.

Already covered elsewhere (not repeated here): frames SIGKILL mid-shard then rerun byte-identical
(tests/test_frames.py::test_sigkill_midway_then_rerun_is_byte_identical), features SIGKILL then
rerun identical (tests/test_features.py::test_resume_after_kill), a truncated HDF5 feature shard
rebuilt bitwise (tests/test_features.py::test_rerun_reuses_and_stale_or_corrupt_shards_are_
rebuilt), the training loop killed inside a checkpoint save
(tests/test_training.py::test_sigkill_during_checkpoint_save_resumes_exactly) and a changed
setup refused by the loop (tests/test_training.py::test_resume_with_changed_setup_is_refused).

Added here: truncated Parquet frame shards; a full disk (ENOSPC injected into the frames writer,
the HDF5 writer and the checkpoint writer) leaving no half-written output, with a one-line CLI
error; the real `train-contrastive` and `train-diffusion` commands SIGKILLed at a seeded step and
rerun to outputs identical to an uninterrupted run; a params change between the kill and the
rerun refused with a message naming the key.
"""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPModel  # noqa: F401  (imported at collection: slow the first time)
from typer.testing import CliRunner

from pipeline.config import Params, from_dict
from pipeline.frames import run_frames
from pipeline.video.probe import ffmpeg_exe

REPO = Path(__file__).resolve().parents[1]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _bytes(folder: Path, pattern: str = "*.parquet") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def _cli(*args: str) -> tuple[int, list[str], str]:
    from stages.app import app

    res = CliRunner().invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    # an unfinished progress bar (no newline) may precede the error on the same line
    errors = [ln[ln.index("error: "):] for ln in res.output.splitlines() if "error: " in ln]
    return res.exit_code, errors, res.output


def _fail_on_call(n: int, real: Any) -> Any:
    """A wrapper that behaves like `real` except that its n-th call raises ENOSPC."""
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# Frames: a tiny video collection (module fixture)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("faultclips")
    for i, src in enumerate(["testsrc", "color=c=red", "testsrc2", "color=c=blue", "testsrc"]):
        sep = ":" if "=" in src else "="
        subprocess.run([ffmpeg_exe(), "-y", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                        f"{src}{sep}s=48x32:r=4:d={1 + i % 3}", "-c:v", "libx264", "-preset",
                        "ultrafast", "-pix_fmt", "yuv420p", str(d / f"v{i}.mp4")], check=True)
    return d


def frames_params(root: Path, video_dir: Path) -> Params:
    files = sorted(p.name for p in video_dir.glob("*.mp4"))
    prepared = root / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"video_id": [Path(f).stem for f in files], "path": files, "exists": True,
                  "duration": float("nan"), "split": "test"}).to_parquet(
        prepared / "videos.parquet")
    (prepared / "summary.json").write_text(json.dumps({"video_root": str(video_dir)}))
    doc = {"paths": {"prepared": str(prepared), "frames": str(root / "frames")},
           "frames": {"fps": 1.0, "max_frames": 3, "size": 32, "shard_size": 2, "workers": 1,
                      "format": "jpeg"},
           "tracking": {"enabled": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    return from_dict(Params, doc, str(root / "params.yaml"))


@pytest.fixture(scope="module")
def clean_frames(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("clean")
    run_frames(frames_params(root, videos), progress=False)
    return _bytes(root / "frames")


@pytest.mark.parametrize("cut", ["half", "footer", "empty"])
def test_truncated_parquet_shard_is_detected_and_rebuilt(
    tmp_path: Path, videos: Path, clean_frames: dict[str, bytes], cut: str,
) -> None:
    p = frames_params(tmp_path, videos)
    run_frames(p, progress=False)
    out = tmp_path / "frames"
    victim = out / "shard-00001.parquet"
    data = victim.read_bytes()
    keep = {"half": len(data) // 2, "footer": len(data) - 9, "empty": 0}[cut]
    victim.write_bytes(data[:keep])
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises: it is unreadable
        pq.read_metadata(victim)
    m = run_frames(p, progress=False)
    assert m["shards_written"] == 1 and m["shards_skipped"] == 2
    assert _bytes(out) == clean_frames


def test_truncated_failures_marker_redoes_its_shard(
    tmp_path: Path, videos: Path, clean_frames: dict[str, bytes],
) -> None:
    p = frames_params(tmp_path, videos)
    run_frames(p, progress=False)
    marker = tmp_path / "frames" / "failures-00002.parquet"
    marker.write_bytes(marker.read_bytes()[:10])
    assert run_frames(p, progress=False)["shards_written"] == 1
    assert _bytes(tmp_path / "frames") == clean_frames


def test_full_disk_during_frames_leaves_no_partial_shard(
    tmp_path: Path, videos: Path, clean_frames: dict[str, bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = frames_params(tmp_path, videos)
    out = tmp_path / "frames"
    # writes: shard 0, failures 0, shard 1 <- the disk is full here
    monkeypatch.setattr(pq.ParquetWriter, "write_table",
                        _fail_on_call(3, pq.ParquetWriter.write_table))
    with pytest.raises(OSError) as err:
        run_frames(p, progress=False)
    assert err.value.errno == errno.ENOSPC
    assert sorted(f.name for f in out.iterdir()) == ["failures-00000.parquet",
                                                     "shard-00000.parquet"]  # no temp, no half
    monkeypatch.undo()
    m = run_frames(p, progress=False)
    assert m["shards_skipped"] == 1 and _bytes(out) == clean_frames


def test_full_disk_is_one_error_line_in_the_cli(
    tmp_path: Path, videos: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames_params(tmp_path, videos)
    monkeypatch.setattr(pq.ParquetWriter, "write_table",
                        _fail_on_call(1, pq.ParquetWriter.write_table))
    code, errors, out = _cli("frames", "--params", str(tmp_path / "params.yaml"))
    assert code == 1 and len(errors) == 1, out
    assert "no space left on device" in errors[0].lower() and "rerun" in errors[0]
    assert not list((tmp_path / "frames").glob("shard-*")) and not list(
        (tmp_path / "frames").glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# Features: ENOSPC inside the HDF5 writer
# ----------------------------------------------------------------------------------------------


def test_full_disk_during_features_leaves_no_partial_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from test_features import digest, make_project

    from pipeline.features import store
    from pipeline.features.extract import run_features

    p = make_project(tmp_path, n_videos=5)
    out = Path(p.paths.features)
    real = store.ShardWriter.write_rows

    def write_rows(self: Any, *args: Any, **kwargs: Any) -> None:
        if (out / "shard-00000.h5").is_file():  # shard 0 done: shard 1 hits a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, *args, **kwargs)

    monkeypatch.setattr(store.ShardWriter, "write_rows", write_rows)
    with pytest.raises(OSError) as err:
        run_features(p)
    assert err.value.errno == errno.ENOSPC
    assert sorted(f.name for f in out.iterdir()) == ["shard-00000.h5"]
    assert not (out / "manifest.json").exists()
    first = digest(out / "shard-00000.h5")
    monkeypatch.undo()
    res = run_features(p)
    assert res["rank0"]["shards_reused"] == 1 and res["rank0"]["shards_built"] == 2
    assert digest(out / "shard-00000.h5") == first and not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# Training: ENOSPC during a checkpoint save; params changed before a resume (train-diffusion)
# ----------------------------------------------------------------------------------------------


def _tiny_stage2(root: Path, **diffusion: Any) -> Path:
    """prepared tables, one `final` feature shard and a random stage-1 checkpoint: all that
    train-diffusion reads (< 1 s). Returns the params file."""
    from pipeline.features.store import ShardWriter, shard_name
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel
    from pipeline.training import checkpoint

    rng = np.random.default_rng(0)
    vids = [(f"{s}{i:02d}", s) for s, n in (("train", 8), ("val", 4)) for i in range(n)]
    caps = [(f"{v}#{j}", v, "text", s) for v, s in vids for j in range(2)]
    prep = root / "prepared"
    prep.mkdir(parents=True)
    pd.DataFrame(vids, columns=["video_id", "split"]).to_parquet(prep / "videos.parquet")
    pd.DataFrame(caps, columns=["caption_id", "video_id", "text", "split"]).to_parquet(
        prep / "captions.parquet")
    attrs = {"schema_version": 1, "backbone_fingerprint": "x", "cache_layer": "final",
             "dtype": "float16", "max_words": 6}
    (root / "features").mkdir()
    n, m, dim = len(vids), len(caps), 16
    with ShardWriter(root / "features" / shard_name(0), attrs, "float16") as w:
        w.create_video([v for v, _ in vids], (4, dim))
        w.write_rows("video", 0, feats=rng.normal(size=(n, 4, dim)), mask=np.ones((n, 4), bool))
        w.create_text("text", [c for c, *_ in caps], [v for _, v, *_ in caps], (6, dim), dim)
        tmask = np.zeros((m, 6), dtype=bool)
        tmask[:, :4] = True
        w.write_rows("text", 0, feats=rng.normal(size=(m, 6, dim)), mask=tmask,
                     eos=np.full(m, 3, dtype=np.int32), pooled=rng.normal(size=(m, dim)))
    torch.manual_seed(0)
    cfg = RetrievalConfig(clip_config={"projection_dim": dim}, cache_layer="final", max_frames=4,
                          temporal_layers=1, temporal_heads=2)
    checkpoint.save(root / "contrastive" / "best", RetrievalModel(cfg), {"step": 0},
                    config=cfg.to_dict())
    doc = {"paths": {k: str(root / k) for k in ("prepared", "features", "contrastive",
                                                "diffusion")},
           "diffusion": {"hidden": 16, "heads": 2, "negatives": 7, "batch_size": 8,
                         "max_steps": 6, "timesteps": 10, "sampling_steps": 3, "top_k": 4,
                         "eval_every": 3, "checkpoint_every": 2, "threads": 1, **diffusion},
           "tracking": {"enabled": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    return root / "params.yaml"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = load_file(str(directory / "model.safetensors"))
    if (directory / "train_state.safetensors").is_file():
        out.update({f"state/{k}": v for k, v in
                    load_file(str(directory / "train_state.safetensors")).items()})
    return out


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), (a, b)
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, f"{a} vs {b}: {bad[:5]}"


def test_full_disk_during_checkpoint_save_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.training import checkpoint

    params = _tiny_stage2(tmp_path)
    out = tmp_path / "diffusion"
    # saves: last@2 (2 files), best@3 (1), last@4 (2), ... -> the 4th write is last@4's model
    monkeypatch.setattr(checkpoint, "save_file", _fail_on_call(4, checkpoint.save_file))
    code, errors, text = _cli("train-diffusion", "--params", str(params))
    assert code == 1 and len(errors) == 1 and "no space left" in errors[0].lower(), text[-3000:]
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half checkpoint
    monkeypatch.undo()
    code, errors, text = _cli("train-diffusion", "--params", str(params))
    assert code == 0, text
    ref = tmp_path / "ref"
    ref_params = _tiny_stage2(ref)
    assert _cli("train-diffusion", "--params", str(ref_params))[0] == 0
    _same_tensors(out / "last", ref / "diffusion" / "last")
    _same_tensors(out / "best", ref / "diffusion" / "best")


@pytest.mark.parametrize("change, needle", [
    ({"lr": 0.01}, "lr: 0.0001 -> 0.01"),
    ({"hidden": 32}, "config.hidden: 16 -> 32"),
    ({"batch_size": 4}, "batch_size: 8 -> 4"),
])
def test_params_changed_before_resume_are_refused(tmp_path: Path, change: dict,
                                                  needle: str) -> None:
    params = _tiny_stage2(tmp_path, max_steps=2)
    assert _cli("train-diffusion", "--params", str(params))[0] == 0
    before = (tmp_path / "diffusion" / "last" / "state.json").read_text()
    doc = yaml.safe_load(params.read_text())
    doc["diffusion"].update(change)
    params.write_text(yaml.safe_dump(doc))
    code, errors, out = _cli("train-diffusion", "--params", str(params))
    assert code == 1 and len(errors) == 1, out
    assert "cannot resume from" in errors[0] and needle in errors[0], errors[0]
    assert "delete" in errors[0]  # says how to start over
    assert (tmp_path / "diffusion" / "last" / "state.json").read_text() == before


# ----------------------------------------------------------------------------------------------
# Slow: the real training commands SIGKILLed at a seeded step, then rerun
# ----------------------------------------------------------------------------------------------

CHILD = """
import os, sys, time
from pipeline.training import loop
kill_at, marker = int(os.environ["DRET_KILL_AT"]), os.environ["DRET_KILL_MARKER"]
real = loop._Run._after_step
def after_step(self, bar):
    real(self, bar)
    if self.step == kill_at:  # the step ran (and validated); its checkpoint is not written yet
        open(marker, "w").close()
        time.sleep(600)
loop._Run._after_step = after_step
from stages.app import app
app(sys.argv[1:], prog_name="dret")
"""


def kill_at_seeded_step(cmd: str, params: Path, total: int, marker: Path) -> int:
    """Run `dret CMD` in a child, SIGKILL it right after a step chosen by a seeded rule
    (uniform over 1..total-1, seeded by the command name); return that step."""
    from procs import sigkill_at_marker
    from test_multirank import child_env

    step = random.Random(f"dret-faults-{cmd}").randint(1, total - 1)
    env = child_env(DRET_KILL_AT=str(step), DRET_KILL_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, cmd, "--params", str(params)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_at_marker(proc, marker, 180, "the kill step")
    return step


def _saved_step(out: Path) -> int:
    state = out / "last" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def _same_run(out: Path, ref: Path) -> None:
    """Two training outputs are the same: every tensor of best/ and last/, metrics and curves
    (timing fields aside)."""
    _same_tensors(out / "last", ref / "last")
    _same_tensors(out / "best", ref / "best")
    timing = {"steps_per_s", "samples_per_s", "pairs_per_s", "elapsed_s", "rerank_seconds",
              "train_seconds"}

    def strip(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in timing}
        return d

    m_out, m_ref = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert strip(m_out) == strip(m_ref)
    c_out, c_ref = (pd.read_csv(d / "curves.csv") for d in (out, ref))
    cols = [c for c in c_ref.columns if "seconds" not in c]
    pd.testing.assert_frame_equal(c_out[cols], c_ref[cols])
    for name in ("best", "last"):
        s_out, s_ref = (json.loads((d / name / "state.json").read_text()) for d in (out, ref))
        assert strip(s_out) == strip(s_ref), name


@pytest.fixture(scope="module")
def pipeline_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny synthetic dataset through prepare, frames, backbone and features (in-process),
    and an uninterrupted stage 1 + stage 2 run as the reference."""
    from test_multirank import build_base, tiny_doc, write_params

    from pipeline.contrastive import run_contrastive
    from pipeline.diffusion_stage import run_train_diffusion
    from pipeline.dist import DistEnv
    from pipeline.features.extract import run_features
    from pipeline.tracking import Tracker

    root = tmp_path_factory.mktemp("faultpipe")
    base = root / "base"
    build_base(base)
    ref = write_params(root / "ref.yaml", tiny_doc(base, root / "ref"))
    run_frames(ref, progress=False)
    run_features(ref)
    run_contrastive(ref, Tracker(), DistEnv())
    run_train_diffusion(ref, Tracker(), DistEnv())
    torch.set_num_threads(1)
    return {"root": root, "base": base, "ref": root / "ref"}


@pytest.mark.slow
def test_truncated_hdf5_tail_is_rebuilt_bitwise(pipeline_base: dict[str, Any],
                                               tmp_path: Path) -> None:
    """A shard that lost only its last bytes (a kill during the OS flush) is caught too."""
    import shutil

    from test_multirank import tiny_doc, write_params

    from pipeline.features.extract import run_features

    ref = pipeline_base["ref"]
    shutil.copytree(ref / "frames", tmp_path / "run" / "frames")
    shutil.copytree(ref / "features", tmp_path / "run" / "features")
    p = write_params(tmp_path / "p.yaml", tiny_doc(pipeline_base["base"], tmp_path / "run"))
    victim = tmp_path / "run" / "features" / "shard-00001.h5"
    data = victim.read_bytes()
    cut = random.Random("dret-faults-h5").randint(1, 4096)
    victim.write_bytes(data[: len(data) - cut])
    res = run_features(p)
    assert res["rank0"]["shards_built"] == 1 and res["rank0"]["shards_reused"] == 2
    assert victim.read_bytes() == (ref / "features" / victim.name).read_bytes()


@pytest.mark.slow
def test_train_contrastive_sigkill_then_changed_params_then_rerun(
    pipeline_base: dict[str, Any], tmp_path: Path,
) -> None:
    from test_multirank import tiny_doc, write_params

    base, ref = pipeline_base["base"], pipeline_base["ref"]
    doc = tiny_doc(base, tmp_path, paths={"frames": str(ref / "frames"),
                                          "features": str(ref / "features")})
    params = tmp_path / "params.yaml"
    write_params(params, doc)
    step = kill_at_seeded_step("train-contrastive", params, 6, tmp_path / "killed")
    out = tmp_path / "contrastive"
    saved = _saved_step(out)
    assert saved == (step - 1) // 2 * 2 and not (out / "metrics.json").exists()  # ckpt every 2
    # a params change between the kill and the rerun is refused, last/ untouched
    write_params(params, {**doc, "contrastive": {**doc["contrastive"], "lr": 2e-3}})
    code, errors, text = _cli("train-contrastive", "--params", str(params))
    assert code == 1 and len(errors) == 1, text
    assert "cannot resume from" in errors[0] and "lr: 0.001 -> 0.002" in errors[0]
    assert _saved_step(out) == saved
    # the original params resume and end where the uninterrupted run ended
    write_params(params, doc)
    code, errors, text = _cli("train-contrastive", "--params", str(params))
    assert code == 0, text
    _same_run(out, ref / "contrastive")


@pytest.mark.slow
def test_train_diffusion_sigkill_then_rerun_is_identical(
    pipeline_base: dict[str, Any], tmp_path: Path,
) -> None:
    from test_multirank import tiny_doc, write_params

    base, ref = pipeline_base["base"], pipeline_base["ref"]
    doc = tiny_doc(base, tmp_path, paths={k: str(ref / k)
                                          for k in ("frames", "features", "contrastive")})
    params = tmp_path / "params.yaml"
    write_params(params, doc)
    step = kill_at_seeded_step("train-diffusion", params, 6, tmp_path / "killed")
    out = tmp_path / "diffusion"
    saved = _saved_step(out)
    assert saved == (step - 1) // 2 * 2
    code, errors, text = _cli("train-diffusion", "--params", str(params))
    assert code == 0, text
    _same_run(out, ref / "diffusion")
