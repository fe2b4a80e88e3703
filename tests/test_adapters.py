"""Dataset adapters: real annotation files where they ship, small files in the format otherwise."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import Params, PathsConfig, PrepareConfig
from pipeline.data import adapters
from pipeline.data.adapters import MALFORMED, Source, get_adapter
from pipeline.data.prepare import run_prepare
from pipeline.data.tables import RawDataset
from pipeline.errors import PipelineError

NO_VIDEOS = Path("/nonexistent-video-root")


def load(name: str, annotations: Path, **cfg: object) -> RawDataset:
    return get_adapter(name)(Source(Path(annotations), NO_VIDEOS, PrepareConfig(**cfg), 0))


def counts(raw: RawDataset) -> dict[str, tuple[int, int]]:
    """split -> (videos, captions)."""
    v = raw.videos["split"].value_counts()
    c = raw.captions["split"].value_counts()
    return {s: (int(v.get(s, 0)), int(c.get(s, 0))) for s in ("train", "val", "test")}


def test_registry_knows_every_dataset() -> None:
    assert adapters.names() == sorted(
        ["activitynet", "didemo", "folder", "lsmdc", "msrvtt", "msvd", "synthetic"]
    )
    with pytest.raises(PipelineError, match="unknown dataset 'nope'"):
        get_adapter("nope")


# ---------------------------------------------------------------------------------------- MSR-VTT


@pytest.fixture
def msrvtt_dir(tmp_path: Path, bench_dir: Path) -> Path:
    """The real split CSVs plus a small MSRVTT_data.json in the official layout."""
    folder = tmp_path / "msrvtt"
    shutil.copytree(bench_dir / "annotations" / "msrvtt", folder)
    val = pd.read_csv(folder / "MSRVTT_val.full.csv")["video_id"]
    sentences = [
        {"caption": "a man cooks", "video_id": "video0", "sen_id": 0},
        {"caption": "someone is cooking", "video_id": "video0", "sen_id": 1},
        {"caption": "a cat plays", "video_id": "video1", "sen_id": 2},
        {"caption": "not the 1k-A caption", "video_id": "video7020", "sen_id": 3},
        {"caption": "no video id", "sen_id": 4},
        "not a record",
    ] + [{"caption": f"val clip {v}", "video_id": v, "sen_id": 100 + i} for i, v in enumerate(val)]
    videos = [{"video_id": "video0", "split": "train", "url": "", "start time": 0.0,
               "end time": 10.0, "category": 1}]
    (folder / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    return folder


def test_msrvtt_1k_a_protocol(msrvtt_dir: Path) -> None:
    raw = load("msrvtt", msrvtt_dir)
    v, c = raw.videos, raw.captions
    assert counts(raw)["test"] == (1000, 1000)
    assert counts(raw)["val"] == (497, 497)
    train = set(v.loc[v["split"] == "train", "video_id"])
    assert len(train) == 9000 - 497
    assert not train & set(v.loc[v["split"] != "train", "video_id"])
    test_caps = c[c["split"] == "test"]
    assert test_caps["video_id"].is_unique and test_caps["caption_id"].str.startswith("ret").all()
    assert c.loc[c["video_id"] == "video7020", "text"].tolist() != ["not the 1k-A caption"]
    assert set(c.loc[c["video_id"] == "video0", "caption_id"]) == {"sen0", "sen1"}
    assert (v["path"] == v["video_id"] + ".mp4").all()
    assert raw.rejected[MALFORMED] == 2


def test_msrvtt_7k_list_and_prepared_counts(msrvtt_dir: Path, tmp_path: Path) -> None:
    raw = load("msrvtt", msrvtt_dir, msrvtt_train="7k")
    assert counts(raw)["train"][0] == 7010 - 497
    params = Params(
        paths=PathsConfig(annotations=str(msrvtt_dir), videos=str(tmp_path / "none"),
                          prepared=str(tmp_path / "out")),
        prepare=PrepareConfig(dataset="msrvtt", msrvtt_train="7k", probe_duration=False),
    )
    summary = run_prepare(params)
    assert summary["splits"]["test"] == {"videos": 1000, "captions": 1000}
    assert summary["splits"]["train"] == {"videos": 2, "captions": 3}  # only they have captions
    assert summary["rejected"]["video without captions"] == 7010 - 497 - 2


def test_msrvtt_needs_captions_json(tmp_path: Path, bench_dir: Path) -> None:
    folder = shutil.copytree(bench_dir / "annotations" / "msrvtt", tmp_path / "m")
    with pytest.raises(PipelineError, match="MSRVTT_data.json"):
        load("msrvtt", folder)


# ------------------------------------------------------------------------------------------- MSVD


def test_msvd_real_files_keep_every_caption(bench_dir: Path) -> None:
    raw = load("msvd", bench_dir / "annotations" / "msvd")
    assert counts(raw) == {"train": (1200, 48774), "val": (100, 4290), "test": (670, 27763)}
    per_video = raw.captions[raw.captions["split"] == "test"].groupby("video_id").size()
    assert len(per_video) == 670 and per_video.min() > 1
    assert raw.captions["caption_id"].is_unique
    assert raw.videos["path"].str.endswith(".avi").all()


# ------------------------------------------------------------------------------------------ LSMDC


def test_lsmdc_tab_files_with_a_malformed_line(tmp_path: Path) -> None:
    clip = "0001_Movie_{:02d}.00.00.000-00.00.0{}.000"
    line = "{}\t00.00.00.000\t00.00.01.000\t00.00.00.000\t00.00.01.000\t{}"
    (tmp_path / "LSMDC16_annos_training.csv").write_text(
        "\n".join([line.format(clip.format(1, 1), "SOMEONE opens a door."),
                   line.format(clip.format(2, 2), "He\tsits."),  # a tab inside the sentence
                   f"{clip.format(3, 3)}\t00.00.00.000\tbroken", ""]) + "\n"
    )
    (tmp_path / "LSMDC16_annos_val.csv").write_text(line.format(clip.format(4, 4), "She waves.\n"))
    (tmp_path / "LSMDC16_challenge_1000_publictect.csv").write_text(
        line.format(clip.format(5, 5), "A car.") + "\n" + line.format(clip.format(6, 6), "Rain.")
    )
    raw = load("lsmdc", tmp_path)
    assert counts(raw) == {"train": (2, 2), "val": (1, 1), "test": (2, 2)}
    assert raw.rejected[MALFORMED] == 1
    assert "He\tsits." in raw.captions["text"].tolist()
    assert (raw.videos["path"] == raw.videos["video_id"] + ".avi").all()


# ------------------------------------------------------------------------------------ ActivityNet


def test_activitynet_paragraphs(tmp_path: Path) -> None:
    def ann(*sentences: str) -> dict:
        return {"duration": 10.0, "timestamps": [[0, 5]] * len(sentences),
                "sentences": list(sentences)}

    (tmp_path / "train.json").write_text(json.dumps(
        {"v_a": ann(" A man runs. ", "He stops."), "v_b": ann("A dog."), "v_bad": "oops",
         "v_empty": ann("", "  ")}
    ))
    (tmp_path / "val_1.json").write_text(json.dumps({"v_c": ann("Rain falls.", "It stops.")}))
    raw = load("activitynet", tmp_path)
    assert counts(raw) == {"train": (3, 3), "val": (0, 0), "test": (1, 1)}
    text = raw.captions.set_index("video_id")["text"]
    assert text["v_a"] == "A man runs. He stops." and text["v_c"] == "Rain falls. It stops."
    assert text["v_empty"] == ""  # prepare rejects it as an empty caption
    assert raw.rejected[MALFORMED] == 1
    assert raw.videos.set_index("video_id")["path"]["v_a"] == "v_a.mp4"


# ----------------------------------------------------------------------------------------- DiDeMo


def test_didemo_label_csvs_real_files(bench_dir: Path) -> None:
    raw = load("didemo", bench_dir / "annotations" / "didemo")
    assert counts(raw) == {"train": (8362, 8362), "val": (1062, 1062), "test": (1004, 1004)}
    v = raw.videos
    assert v["video_id"].is_unique
    assert not v["video_id"].str.contains(r"\.", regex=True).any()  # no extension, no trailing dot
    assert v["path"].str.startswith("/home/").all()  # prepare reduces these to the file name
    assert (raw.captions["caption_id"] == raw.captions["video_id"]).all()


def test_didemo_original_json(tmp_path: Path) -> None:
    def moment(video: str, desc: str, ann_id: int) -> dict:
        return {"video": video, "times": [[0, 1]], "description": desc, "annotation_id": ann_id}

    splits = {
        "train": [moment("a.mov", "second", 7), moment("a.mov", "first", 2),
                  moment("b.avi", "only", 1), {"times": [], "description": "no video"}],
        "val": [moment("c.mp4", "val text", 3)],
        "test": [moment("d.m4v", "test text", 4), moment("d.m4v", "more", 5)],
    }
    for split, rows in splits.items():
        (tmp_path / f"{split}_data.json").write_text(json.dumps(rows))
        (tmp_path / f"didemo_{split}_label.csv").write_text("video_path,text\n/x/zzz.mp4,ignored\n")
    raw = load("didemo", tmp_path)  # the JSON format wins when both are present
    assert counts(raw) == {"train": (2, 2), "val": (1, 1), "test": (1, 1)}
    text = raw.captions.set_index("video_id")["text"]
    assert text["a"] == "first second" and text["d"] == "test text more"
    assert raw.rejected[MALFORMED] == 1


def test_didemo_without_annotations(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="DiDeMo needs"):
        load("didemo", tmp_path)


# ----------------------------------------------------------------------------------------- folder


def test_folder_csv_with_split_column(tmp_path: Path) -> None:
    (tmp_path / "captions.csv").write_text(
        "video,caption,split\n"
        "clips/a.mp4,a red ball,train\nclips/a.mp4,a ball that is red,train\n"
        "b.avi,a blue box, Test\n,no video,train\nc.mp4,odd split,dev\n"
    )
    raw = load("folder", tmp_path)  # a folder holding captions.csv
    assert counts(raw) == {"train": (1, 2), "val": (0, 0), "test": (1, 1)}
    assert set(raw.videos["video_id"]) == {"clips/a", "b"}
    assert raw.captions["caption_id"].tolist() == ["clips/a#0", "clips/a#1", "b#0"]
    assert raw.rejected == {MALFORMED: 1, "unknown split": 1}


def test_folder_jsonl_without_split_is_all_train(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [{"video": "x.mp4", "caption": "one"}, {"video": "/abs/y.mkv", "caption": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = load("folder", path)
    assert counts(raw) == {"train": (2, 2), "val": (0, 0), "test": (0, 0)}
    assert set(raw.videos["video_id"]) == {"x", "y"}


def test_folder_rejects_bad_tables(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("path,text\na.mp4,hi\n")
    with pytest.raises(PipelineError, match="missing column"):
        load("folder", tmp_path / "t.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no captions.csv"):
        load("folder", tmp_path / "empty")
    with pytest.raises(PipelineError, match="not found"):
        load("folder", tmp_path / "missing.csv")


# -------------------------------------------------------------------------------------- synthetic


def test_synthetic_adapter_calls_the_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {}

    def generate(cfg: object, out_dir: Path, seed: int) -> RawDataset:
        calls.update(out_dir=out_dir, seed=seed)
        out_dir.mkdir(parents=True)
        (out_dir / "s0.mp4").write_bytes(b"")
        videos = pd.DataFrame({"video_id": ["s0", "s1"], "path": ["s0.mp4", "s1.mp4"],
                               "split": ["train", "val"], "n_objects": [1, 2]})
        captions = pd.DataFrame({"caption_id": ["s0#0", "s1#0"], "video_id": ["s0", "s1"],
                                 "text": ["a left", "b"], "split": ["train", "val"],
                                 "reversed_text": ["a right", ""]})
        ood = pd.DataFrame({"caption_id": ["o0"], "text": ["zebra"], "kind": ["novel_word"]})
        return RawDataset(videos, captions, out_dir, ood_captions=ood,
                          extra_summary={"holdout_pairs": 4})

    fake = types.SimpleNamespace(generate=generate)
    monkeypatch.setitem(sys.modules, "pipeline.data.synthetic", fake)
    prepared = tmp_path / "prepared"
    params = Params(seed=3, paths=PathsConfig(prepared=str(prepared)),
                    prepare=PrepareConfig(probe_duration=False))
    summary = run_prepare(params)
    assert calls == {"out_dir": prepared / "videos", "seed": 3}
    assert summary["video_root"] == str(prepared / "videos") and summary["holdout_pairs"] == 4
    assert summary["splits"]["val"] == {"videos": 1, "captions": 1}  # its own val: nothing carved
    videos = pd.read_parquet(prepared / "videos.parquet")
    assert videos["exists"].tolist() == [True, False] and videos["n_objects"].tolist() == [1, 2]
    assert "reversed_text" in pd.read_parquet(prepared / "captions.parquet").columns
    assert pd.read_parquet(prepared / "ood_captions.parquet")["kind"].tolist() == ["novel_word"]
