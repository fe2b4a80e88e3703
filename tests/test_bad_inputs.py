"""Bad inputs, one test per row of docs/bad_inputs.md (rows already covered elsewhere are only
referenced there), plus the safe-loading checks (no pickle on checkpoint or feature paths).

Outcomes are checked through the CLI where that is natural: exit 1 with exactly one `error:`
line, or exit 0 with the problem recorded (failures.parquet, summary.json).
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.config import Params, from_dict
from pipeline.errors import PipelineError
from pipeline.video.probe import ffmpeg_exe
from pipeline.video.shards import iter_shard, list_shards

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-y", "-nostdin", "-v", "error", *args], check=True)


def _cli(*args: str) -> tuple[int, list[str], str]:
    """Run `dret ARGS` in-process -> (exit code, `error:` lines, output); an exception that
    escaped the CLI's guard (a traceback for the user) fails the test."""
    from stages.app import app

    res = runner.invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    # an unfinished progress bar (no newline) may precede the error on the same line
    errors = [ln[ln.index("error: "):] for ln in res.output.splitlines() if "error: " in ln]
    return res.exit_code, errors, res.output


def _one_error(args: list[str], needle: str) -> str:
    code, errors, out = _cli(*args)
    assert code == 1, out
    assert len(errors) == 1 and needle in errors[0], out
    return errors[0]


# ----------------------------------------------------------------------------------------------
# Videos: one `dret frames` run over the awkward files (module fixture), one test per row
# ----------------------------------------------------------------------------------------------

GOOD = "good.mp4"


@pytest.fixture(scope="module")
def frames_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("badvideos")
    vids = root / "videos"
    vids.mkdir()
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    _ffmpeg("-f", "lavfi", "-i", "testsrc=s=80x60:r=8:d=2", *h264, str(vids / GOOD))
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=1", str(vids / "audio_only.m4a"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=s=4000x3000:r=2:d=1", *h264, str(vids / "huge.mp4"))
    # zero duration: a container with a video track but no frame in it
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x48:r=8:d=1", "-frames:v", "0", *h264,
            str(vids / "zero.mp4"))
    files = [GOOD, "audio_only.m4a", "huge.mp4", "zero.mp4"]
    prepared = root / "prepared"
    prepared.mkdir()
    pd.DataFrame({"video_id": [Path(f).stem for f in files], "path": files, "exists": True,
                  "duration": math.nan, "split": "test"}).to_parquet(prepared / "videos.parquet")
    (prepared / "summary.json").write_text(json.dumps({"video_root": str(vids)}))
    doc = {"paths": {"prepared": str(prepared), "frames": str(root / "frames")},
           "frames": {"fps": 1.0, "max_frames": 4, "size": 32, "format": "raw", "shard_size": 2,
                      "workers": 1, "max_failure_rate": 0.9},
           "tracking": {"enabled": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    code, errors, out = _cli("frames", "--params", str(root / "params.yaml"))
    peak_child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    fails = pd.read_parquet(root / "frames" / "failures.parquet").set_index("video_id")
    got = {v: (f.copy(), t.copy()) for s in list_shards(root / "frames")
           for v, f, t in iter_shard(s)}
    return dict(code=code, errors=errors, out=out, fails=fails, got=got, root=root,
                child_kb=max(peak_child_kb, before))


def test_frames_cli_records_problems_and_exits_0(frames_run: dict) -> None:
    assert frames_run["code"] == 0 and not frames_run["errors"], frames_run["out"]
    assert set(frames_run["got"]) == {"good", "huge"}
    assert frames_run["got"]["good"][0].shape == (2, 32, 32, 3)


def test_audio_only_file_is_recorded_as_no_video_stream(frames_run: dict) -> None:
    assert frames_run["fails"].loc["audio_only", "reason"].startswith("no video stream")


def test_zero_duration_video_is_recorded(frames_run: dict) -> None:
    assert frames_run["fails"].loc["zero", "reason"].startswith("no video stream")
    assert "zero" not in frames_run["got"]


def test_huge_resolution_is_downscaled_with_bounded_memory(frames_run: dict) -> None:
    frames, ts = frames_run["got"]["huge"]
    assert frames.shape == (1, 32, 32, 3) and ts.tolist() == [0.0] and frames.std() > 5
    assert "huge" not in frames_run["fails"].index
    # ffmpeg scales before piping: one 12 MP decode, never a full-size frame in Python
    assert frames_run["child_kb"] < 1_000_000, frames_run["child_kb"]


def test_duplicate_video_ids_in_videos_parquet_exit_1(frames_run: dict, tmp_path: Path) -> None:
    root = frames_run["root"]
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    df = pd.read_parquet(root / "prepared" / "videos.parquet")
    pd.concat([df, df.iloc[:1]]).to_parquet(prepared / "videos.parquet")
    (prepared / "summary.json").write_text((root / "prepared" / "summary.json").read_text())
    doc = yaml.safe_load((root / "params.yaml").read_text())
    doc["paths"] = {"prepared": str(prepared), "frames": str(tmp_path / "frames")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    _one_error(["frames", "--params", str(tmp_path / "params.yaml")], "duplicate video_id 'good'")
    assert not (tmp_path / "frames" / "manifest.json").exists()


# ----------------------------------------------------------------------------------------------
# Annotation files (folder adapter through `dret prepare`)
# ----------------------------------------------------------------------------------------------


def _prepare_params(tmp: Path, table: Path) -> Path:
    vids = tmp / "videos"
    vids.mkdir(exist_ok=True)
    for name in ("a.mp4", "b.mp4"):
        (vids / name).write_bytes(b"")
    doc = {"paths": {"annotations": str(table), "videos": str(vids),
                     "prepared": str(tmp / "prepared")},
           "prepare": {"dataset": "folder", "probe_duration": False, "val_fraction": 0.0},
           "tracking": {"enabled": False}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(doc))
    return tmp / "params.yaml"


@pytest.mark.parametrize("name, data, needle", [
    ("nocol.csv", b"vid,caption\na.mp4,x\n", "missing column(s) video"),
    ("latin1.csv", b"video,caption,split\na.mp4,a r\xe9d ball,train\n", "not UTF-8 text"),
    ("latin1.jsonl", b'{"video": "a.mp4", "caption": "caf\xe9"}\n', "not valid JSON Lines"),
    ("empty.csv", b"", "empty file"),
    ("nocol.jsonl", b'{"path": "a.mp4", "caption": "x"}\n', "missing field(s) video"),
])
def test_bad_annotation_file_is_one_error_line(tmp_path: Path, name: str, data: bytes,
                                               needle: str) -> None:
    (tmp_path / name).write_bytes(data)
    _one_error(["prepare", "--params", str(_prepare_params(tmp_path, tmp_path / name))], needle)
    assert not (tmp_path / "prepared" / "videos.parquet").exists()


def test_empty_long_and_duplicate_captions_are_recorded(tmp_path: Path) -> None:
    long = ("a red ball rolls " * 600)[:10_000]
    rows = [("a.mp4", long, "train"), ("a.mp4", "", "train"), ("a.mp4", "   ", "train"),
            ("b.mp4", "a blue box", "train"), ("b.mp4", "a blue box", "train")]
    table = tmp_path / "captions.csv"
    pd.DataFrame(rows, columns=["video", "caption", "split"]).to_csv(table, index=False)
    code, errors, out = _cli("prepare", "--params", str(_prepare_params(tmp_path, table)))
    assert code == 0 and not errors, out
    summary = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert summary["rejected"] == {"empty caption": 2}
    caps = pd.read_parquet(tmp_path / "prepared" / "captions.parquet")
    assert caps["text"].str.len().max() == len(long.strip())  # kept whole, truncated later
    assert (caps["text"] == "a blue box").sum() == 2  # same text twice: two distinct captions
    assert caps["caption_id"].is_unique


def test_10000_character_caption_is_truncated_to_max_words(tmp_path: Path) -> None:
    from pipeline.features.backbone import load_backbone, run_backbone
    from pipeline.features.extract import Encoder

    p = from_dict(Params, {
        "paths": {"prepared": str(tmp_path / "prepared"), "backbone": str(tmp_path / "bb")},
        "features": {"scratch": dict(image_size=32, patch_size=16, vision_hidden=32,
                                     vision_layers=1, vision_heads=2, text_hidden=32,
                                     text_layers=1, text_heads=2, intermediate_factor=2,
                                     projection_dim=16, vocab_size=300, max_position=16),
                     "max_words": 16, "cache_layer": "final"},
        "tracking": {"enabled": False}})
    (tmp_path / "prepared").mkdir()
    pd.DataFrame({"caption_id": ["c0", "c1"], "video_id": ["v", "v"],
                  "text": ["a red ball rolls left", "a blue box"], "split": "train"}
                 ).to_parquet(tmp_path / "prepared" / "captions.parquet")
    run_backbone(p)
    enc = Encoder(load_backbone(tmp_path / "bb" / "backbone.json"), "final", 16)
    out = enc.texts([("a red ball rolls " * 600)[:10_000], "", "a blue box"])
    assert out["feats"].shape[:2] == (3, 16) and out["mask"][0].all()
    assert out["eos"].tolist()[0] == 15 and bool(out["mask"][1].sum() >= 2)  # BOS + EOS
    assert all(map(math.isfinite, out["feats"].ravel().tolist()))

    # the direct backend call tokenises exactly as the Hugging Face tokenizer does
    texts = ["", "a red ball", ("a red ball rolls " * 600)[:10_000], "ünïcödé 🎈 rolls\tleft  "]
    ids, mask = enc.tokenize(texts)
    ref = enc.tokenizer(texts, padding="max_length", truncation=True, max_length=16,
                        return_tensors="pt")
    assert enc._backend is not None
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"].bool())

    # features that overflow float16 storage are refused, not written as inf
    half = Encoder(load_backbone(tmp_path / "bb" / "backbone.json"), "final", 16,
                   out_dtype="float16")
    assert half.texts(["a red ball"])["feats"].dtype == np.float16
    with torch.no_grad():
        half.model.text_projection.weight.mul_(1e6)
    with pytest.raises(PipelineError, match="overflow float16"):
        half.texts(["a red ball"])


# ----------------------------------------------------------------------------------------------
# Params (unknown keys and wrong types are in tests/test_config.py and tests/test_cli.py)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc, needle", [
    ({"contrastive": {"batch_size": "128"}}, "'contrastive.batch_size' must be int"),
    ({"diffusion": {"schedule": "quadratic"}}, "'diffusion.schedule'"),
    ({"features": {"dtype": "bfloat16"}}, "'features.dtype'"),
    ({"seed": None}, "'seed' must be int"),
])
def test_params_wrong_types_are_one_error_line(tmp_path: Path, doc: dict, needle: str) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(doc))
    _one_error(["train-contrastive", "--params", str(tmp_path / "p.yaml")], needle)


def test_params_range_errors_are_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "prepared").mkdir()
    pd.DataFrame({"video_id": ["a"], "path": ["a.mp4"]}).to_parquet(
        tmp_path / "prepared" / "videos.parquet")
    (tmp_path / "prepared" / "summary.json").write_text(json.dumps({"video_root": "."}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({
        "paths": {"prepared": str(tmp_path / "prepared"), "frames": str(tmp_path / "f")},
        "frames": {"fps": 0.0}, "tracking": {"enabled": False}}))
    _one_error(["frames", "--params", str(tmp_path / "p.yaml")], "frames.fps out of range")


# ----------------------------------------------------------------------------------------------
# Checkpoints from another config
# ----------------------------------------------------------------------------------------------


def _stage1(dim: int = 16, heads: int = 2, layers: int = 1):
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel

    torch.manual_seed(0)
    cfg = RetrievalConfig(clip_config={"projection_dim": dim}, cache_layer="final", max_frames=4,
                          temporal_layers=layers, temporal_heads=heads)
    return RetrievalModel(cfg)


@pytest.mark.parametrize("other, needle", [
    (dict(dim=32), "clip_config.projection_dim: 16 -> 32"),  # was a bare RuntimeError
    (dict(layers=2), "temporal_layers: 1 -> 2"),
    (dict(heads=4), "temporal_heads: 2 -> 4"),  # same shapes: was loaded silently before
])
def test_stage1_checkpoint_into_another_config_is_refused(tmp_path: Path, other: dict,
                                                          needle: str) -> None:
    from pipeline.training import checkpoint

    model = _stage1()
    checkpoint.save(tmp_path / "best", model, {"step": 1}, config=model.cfg.to_dict())
    assert checkpoint.load_weights(tmp_path / "best", _stage1())["step"] == 1
    with pytest.raises(PipelineError, match=re.escape(needle)) as err:
        checkpoint.load_weights(tmp_path / "best", _stage1(**other))
    assert str(tmp_path / "best") in str(err.value)


def test_weights_without_a_config_are_still_checked_by_shape(tmp_path: Path) -> None:
    from pipeline.training import checkpoint

    checkpoint.save(tmp_path / "w", _stage1().state_dict(), {"step": 1})  # no config saved
    with pytest.raises(PipelineError, match="shape of"):  # was a bare RuntimeError
        checkpoint.load_weights(tmp_path / "w", _stage1(dim=32))
    with pytest.raises(PipelineError, match="do not match"):
        checkpoint.load_weights(tmp_path / "w", _stage1(layers=2))


def test_denoiser_checkpoint_into_another_config_is_refused(tmp_path: Path) -> None:
    from pipeline.models.denoiser import DenoiserPair
    from pipeline.training import checkpoint

    pair = DenoiserPair(16, 16, 2)
    checkpoint.save(tmp_path / "best", pair, {"step": 1},
                    config={**pair.config_dict(), "timesteps": 10, "schedule": "cosine"})
    checkpoint.load_weights(tmp_path / "best", DenoiserPair(16, 16, 2))
    with pytest.raises(PipelineError, match="heads: 2 -> 4"):
        checkpoint.load_weights(tmp_path / "best", DenoiserPair(16, 16, 4))


# ----------------------------------------------------------------------------------------------
# Safe loading and local-only services
# ----------------------------------------------------------------------------------------------


def _sources() -> list[Path]:
    return sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").rglob("*.py")])


def test_no_pickle_or_unsafe_torch_load_in_pipeline() -> None:
    """Checkpoints are safetensors + JSON, features HDF5, tables Parquet: nothing unpickles."""
    bad = []
    for path in _sources():
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport (c?pickle|dill|joblib|cloudpickle)\b|\bpickle\.load", code):
                bad.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
            if re.search(r"allow_pickle\s*=\s*True", code):
                bad.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_checkpoint_loader_reads_only_safetensors_and_json(tmp_path: Path) -> None:
    """A pickle planted where a checkpoint belongs is never executed: load() refuses it."""
    from pipeline.training import checkpoint

    (tmp_path / "best").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "best" / "model.pt")  # a pickle file
    with pytest.raises(PipelineError, match="not a checkpoint"):
        checkpoint.load(tmp_path / "best")
    (tmp_path / "best" / "model.safetensors").write_bytes(
        (tmp_path / "best" / "model.pt").read_bytes())
    (tmp_path / "best" / "state.json").write_text("{}")
    with pytest.raises(Exception) as err:  # safetensors parses a header, never unpickles
        checkpoint.load(tmp_path / "best")
    assert "pickle" not in type(err.value).__module__


def test_mlflow_ui_command_binds_localhost() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    uis = [ln for ln in readme.splitlines() if "mlflow ui" in ln or "mlflow server" in ln]
    assert uis and all("--host 127.0.0.1" in ln for ln in uis), uis


# ----------------------------------------------------------------------------------------------
# benchmarks/bench_gpu.py: light imports, and a tiny CPU smoke run
# ----------------------------------------------------------------------------------------------


def test_bench_gpu_imports_no_mlflow_dvc_or_ffmpeg() -> None:
    code = ("import runpy, sys, json; sys.argv = ['bench_gpu.py', '--check-imports'];"
            "runpy.run_path('benchmarks/bench_gpu.py', run_name='__main__');"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mlflow', 'dvc', 'ffmpeg'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines() == ["[]", "[]"]


@pytest.mark.slow
def test_bench_gpu_tiny_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--seconds", "0.05",
                          "--workers", "1", "--json", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    table = res.stdout.splitlines()
    assert table[1].split()[:4] == ["section", "what", "throughput", "notes"]
    assert len(table) == 1 + 2 + 7  # device line, header, rule, 7 rows
    data = json.loads(out.read_text())
    assert data["tiny"] and data["features"]["stage_fps"] > 0 and data["rerank"]["seconds"] > 0
