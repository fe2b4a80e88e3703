"""The prepare stage: path resolution, rejections, carved val, split checks, probes, outputs."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import Params, PathsConfig, PrepareConfig
from pipeline.data.paths import VideoIndex, ids_from_paths
from pipeline.data.prepare import carve_val, clean, run_prepare
from pipeline.data.tables import RawDataset
from pipeline.errors import PipelineError
from stages.prepare import summary_text


def folder_params(tmp_path: Path, rows: list[tuple[str, ...]], root: Path | None = None,
                  **cfg: object) -> Params:
    """Params for the folder adapter over a CSV of (video, caption[, split]) rows."""
    header = "video,caption,split" if len(rows[0]) == 3 else "video,caption"
    table = pd.DataFrame(rows, columns=header.split(","))
    table.to_csv(tmp_path / "captions.csv", index=False)
    cfg.setdefault("probe_duration", False)
    return Params(
        paths=PathsConfig(annotations=str(tmp_path / "captions.csv"),
                          videos=str(root or tmp_path / "videos"),
                          prepared=str(tmp_path / "prepared")),
        prepare=PrepareConfig(dataset="folder", **cfg),
    )


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


# ------------------------------------------------------------------------------- path resolution


def test_resolution_by_path_name_and_stem(tmp_path: Path) -> None:
    touch(tmp_path, "a.mp4", "movie1/clip.avi", "flickr_123.mov", "x.txt", "x.mp4", "deep/a/b.webm")
    index = VideoIndex.build(tmp_path)
    given = pd.Series([
        "a.mp4",                            # exact
        "/home/other/machine/a.mp4",        # absolute -> name
        "/home/other/flickr_123.",          # absolute, no extension -> stem
        "C:\\data\\clip.avi",               # Windows absolute -> name in a subfolder
        "movie1/clip.mkv",                  # other container -> stem
        "x",                                # stem: the video wins over x.txt
        "clip.avi",                         # name, in a per-movie subfolder (LSMDC)
        "sub/../a.mp4",                     # normalised, stays inside
        "../secret.mp4",                    # leaves the root
        "deep/../../a.mp4",                 # leaves the root
        "/elsewhere/ghost.mp4",             # missing: reduced to its name
        "gone/ghost2.mp4",                  # missing: kept as given
    ])
    got = index.resolve(given)
    assert got["path"].tolist()[:8] == ["a.mp4", "a.mp4", "flickr_123.mov", "movie1/clip.avi",
                                        "movie1/clip.avi", "x.mp4", "movie1/clip.avi", "a.mp4"]
    assert got["exists"].tolist() == [True] * 8 + [False] * 4
    assert got["outside"].tolist() == [False] * 8 + [True, True, False, False]
    assert got["path"].tolist()[10:] == ["ghost.mp4", "gone/ghost2.mp4"]


def test_ids_from_paths() -> None:
    got = ids_from_paths(pd.Series(["./clips/a.mp4", "/abs/b.avi", "c", "d."]))
    assert got.tolist() == ["clips/a", "b", "c", "d"]


# ----------------------------------------------------------------------------------- run_prepare


def test_folder_end_to_end_counts_and_contract(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    touch(root, "a.mp4", "sub/b.mp4", "t.mp4")
    params = folder_params(tmp_path, [
        ("a.mp4", "a red ball", "train"),
        ("a.mp4", "   ", "train"),             # whitespace caption
        ("a.mp4", "", "train"),                # empty caption
        ("/mnt/old/b.mp4", "blue box", "train"),  # absolute -> found in sub/
        ("missing.mp4", "not on disk", "train"),
        ("../outside.mp4", "escapes", "train"),
        ("", "no video", "train"),             # malformed
        ("t.mp4", "held out", "test"),
        ("only_empty.mp4", " ", "test"),       # a video whose only caption is empty
    ], root=root, val_fraction=0.0)
    summary = run_prepare(params)
    assert summary["rejected"] == {
        "empty caption": 3, "malformed row": 1, "path outside video root": 1,
        "caption of an unknown or rejected video": 1, "video without captions": 1,
    }
    assert summary["videos_missing"] == 1 and summary["probe_failed"] == 0
    assert summary["splits"] == {"train": {"videos": 3, "captions": 3},
                                 "val": {"videos": 0, "captions": 0},
                                 "test": {"videos": 1, "captions": 1}}
    out = Path(params.paths.prepared)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert not (out / "ood_captions.parquet").exists()
    vschema = pq.read_schema(out / "videos.parquet")
    assert [(f.name, f.type) for f in vschema] == [
        ("video_id", pa.string()), ("path", pa.string()), ("exists", pa.bool_()),
        ("duration", pa.float64()), ("split", pa.string())]
    cschema = pq.read_schema(out / "captions.parquet")
    assert [(f.name, f.type) for f in cschema] == [(c, pa.string()) for c in
                                                   ("caption_id", "video_id", "text", "split")]
    videos = pd.read_parquet(out / "videos.parquet").set_index("video_id")
    assert videos.loc["b", "path"] == "sub/b.mp4" and videos.loc["b", "exists"]
    assert not videos.loc["missing", "exists"] and math.isnan(videos.loc["missing", "duration"])
    text = summary_text(summary)
    assert "missing on disk: 1" in text and "rejected 3 rows: empty caption" in text


def test_duplicates_are_dropped_and_counted(tmp_path: Path) -> None:
    raw = RawDataset(
        videos=pd.DataFrame({"video_id": ["a", "a", "b"], "path": ["a.mp4", "a.mp4", "b.mp4"],
                             "split": ["train"] * 3}),
        captions=pd.DataFrame({"caption_id": ["c1", "c1", "c2"], "video_id": ["a", "a", "b"],
                               "text": ["x", "x again", "y"], "split": ["train"] * 3}),
        video_root=tmp_path,
    )
    rejected: Counter = Counter()
    videos, captions = clean(raw, rejected)
    assert rejected == {"duplicate video id": 1, "duplicate caption id": 1}
    assert videos["video_id"].tolist() == ["a", "b"] and captions["text"].tolist() == ["x", "y"]


def test_video_in_two_splits_is_an_error(tmp_path: Path) -> None:
    params = folder_params(tmp_path, [("a.mp4", "one", "train"), ("b.mp4", "two", "train"),
                                      ("a.mp4", "three", "test")])
    with pytest.raises(PipelineError, match=r"'a' in test and train"):
        run_prepare(params)


# ------------------------------------------------------------------------------------- carved val


def test_carve_val_is_seeded_and_bounded() -> None:
    ids = pd.Series([f"v{i}" for i in range(200)])
    first = carve_val(ids, 0.1, 1000, seed=0)
    assert first.sum() == 20 and first.equals(carve_val(ids, 0.1, 1000, seed=0))
    assert not first.equals(carve_val(ids, 0.1, 1000, seed=1))
    assert carve_val(ids, 0.1, 5, seed=0).sum() == 5
    assert carve_val(ids.iloc[::-1], 0.1, 1000, seed=0).sort_index().equals(first)  # order-free
    assert carve_val(ids.iloc[:3], 0.01, 10, seed=0).sum() == 1  # at least one ...
    assert carve_val(ids.iloc[:1], 0.5, 10, seed=0).sum() == 0  # ... but never all of train
    assert carve_val(ids, 0.0, 10, seed=0).sum() == 0


def test_carved_val_comes_from_train_only(tmp_path: Path) -> None:
    rows = [(f"tr{i}.mp4", f"train caption {i}", "train") for i in range(40)]
    rows += [(f"te{i}.mp4", f"test caption {i}", "test") for i in range(10)]
    params = folder_params(tmp_path, rows, val_fraction=0.25, val_max=1000)
    summary = run_prepare(params)
    assert summary["splits"]["val"] == {"videos": 10, "captions": 10}
    assert summary["splits"]["test"] == {"videos": 10, "captions": 10}
    out = Path(params.paths.prepared)
    videos = pd.read_parquet(out / "videos.parquet")
    assert videos.loc[videos["split"] == "val", "video_id"].str.startswith("tr").all()
    captions = pd.read_parquet(out / "captions.parquet")
    merged = captions.merge(videos, on="video_id", suffixes=("", "_v"))
    assert (merged["split"] == merged["split_v"]).all()
    again = run_prepare(params)
    assert again == summary
    assert pd.read_parquet(out / "videos.parquet").equals(videos)


def test_no_split_column_means_train_plus_carved_val(tmp_path: Path) -> None:
    rows = [(f"v{i}.mp4", f"caption {i}") for i in range(20)]
    summary = run_prepare(folder_params(tmp_path, rows, val_fraction=0.1))
    assert summary["splits"]["train"]["videos"] == 18 and summary["splits"]["val"]["videos"] == 2
    assert summary["splits"]["test"]["videos"] == 0


# ------------------------------------------------------------------------------- real benchmarks


def test_didemo_absolute_paths_resolve_under_the_root(tmp_path: Path, bench_dir: Path) -> None:
    labels = pd.read_csv(bench_dir / "annotations" / "didemo" / "didemo_test_label.csv")
    paths = labels["video_path"]
    with_ext = paths[paths.str.contains(r"\.[a-z0-9]+$", regex=True)].iloc[0]
    no_ext = paths[paths.str.endswith(".")].iloc[0]
    root = tmp_path / "videos"
    touch(root, "all/" + with_ext.rsplit("/", 1)[1], no_ext.rsplit("/", 1)[1] + "mp4")
    params = Params(
        paths=PathsConfig(annotations=str(bench_dir / "annotations" / "didemo"),
                          videos=str(root), prepared=str(tmp_path / "prepared")),
        prepare=PrepareConfig(dataset="didemo", probe_duration=False),
    )
    summary = run_prepare(params)
    assert summary["splits"]["test"] == {"videos": 1004, "captions": 1004}
    assert summary["videos_missing"] == 8362 + 1062 + 1004 - 2
    videos = pd.read_parquet(tmp_path / "prepared" / "videos.parquet")
    found = videos[videos["exists"]]
    assert sorted(found["path"]) == sorted(["all/" + with_ext.rsplit("/", 1)[1],
                                            no_ext.rsplit("/", 1)[1] + "mp4"])
    assert not videos["path"].str.startswith("/").any()


def test_probe_duration_of_a_real_clip_and_a_broken_one(tmp_path: Path, bench_dir: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    (root / "bikes.mp4").symlink_to(bench_dir / "videos" / "bikes.mp4")
    touch(root, "broken.mp4")  # zero bytes: the probe fails
    params = folder_params(tmp_path, [("bikes.mp4", "bikes", "test"),
                                      ("broken.mp4", "nothing", "test"),
                                      ("absent.mp4", "gone", "test")],
                           root=root, probe_duration=True)
    summary = run_prepare(params)
    assert summary["probe_failed"] == 1 and summary["videos_missing"] == 1
    videos = pd.read_parquet(tmp_path / "prepared" / "videos.parquet").set_index("video_id")
    assert videos.loc["bikes", "duration"] == pytest.approx(10.0, abs=0.05)
    assert videos.loc["broken", "exists"] and math.isnan(videos.loc["broken", "duration"])
    assert math.isnan(videos.loc["absent", "duration"])
