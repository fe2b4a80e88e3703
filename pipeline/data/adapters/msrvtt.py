"""MSR-VTT, the 1k-A protocol (JSFusion test split).

- train: the ids of `MSRVTT_train.9k.csv` (or `.7k.csv`, `prepare.msrvtt_train`) minus the
  validation and test ids; all their captions from `MSRVTT_data.json` (`sentences`: caption,
  video_id, sen_id), caption id `sen<sen_id>`.
- val: the official `MSRVTT_val.full.csv` (497 videos, also listed in the 9k and 7k lists, hence
  removed from train), all their captions from `MSRVTT_data.json`.
- test: the 1,000 rows of `MSRVTT_JSFUSION_test.csv` (key, vid_key, video_id, sentence): one
  caption per video, caption id = `key`.
Clips are `<video_id>.mp4` under the video root.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data.adapters import (
    MALFORMED,
    Source,
    make_dataset,
    read_csv,
    read_id_list,
    read_json,
    require,
    split_of,
)
from pipeline.data.tables import RawDataset
from pipeline.errors import PipelineError


def load(src: Source) -> RawDataset:
    """Read the MSR-VTT 1k-A split files and the captions JSON from the annotation folder."""
    folder = src.annotations
    train_list = f"MSRVTT_train.{src.prepare.msrvtt_train}.csv"
    train = read_id_list(require(folder, train_list), "video_id")
    val = read_id_list(require(folder, "MSRVTT_val.full.csv"), "video_id")
    test_file = require(folder, "MSRVTT_JSFUSION_test.csv")
    test = read_csv(test_file, ["key", "video_id", "sentence"])
    test_caps = pd.DataFrame(
        {"caption_id": test["key"], "video_id": test["video_id"], "text": test["sentence"]}
    )
    train_caps, malformed = _sentences(require(folder, "MSRVTT_data.json"))
    test_ids = pd.Index(test["video_id"].drop_duplicates(), dtype=str)
    train = train.difference(val.union(test_ids), sort=False)
    # test videos keep only their JSFusion caption, whatever MSRVTT_data.json holds for them
    captions = pd.concat(
        [train_caps[~train_caps["video_id"].isin(test_ids)], test_caps], ignore_index=True
    )
    return make_dataset(
        captions,
        split_of({"train": train, "val": val, "test": test_ids}),
        lambda vids: pd.Series(vids + ".mp4"),
        src.video_root,
        {MALFORMED: malformed},
    )


def _sentences(path: Path) -> tuple[pd.DataFrame, int]:
    """Captions of `MSRVTT_data.json` and the number of malformed sentence records."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise PipelineError(f"{path}: expected an object with a 'sentences' list")
    sents = pd.DataFrame.from_records(
        [s for s in data["sentences"] if isinstance(s, dict)],
        columns=["caption", "video_id", "sen_id"],
    )
    bad = sents["video_id"].isna() | sents["sen_id"].isna()
    malformed = int(bad.sum()) + len(data["sentences"]) - len(sents)
    sents = sents[~bad]
    sen_id = sents["sen_id"].astype(object).astype(str).str.replace(r"\.0$", "", regex=True)
    captions = pd.DataFrame(
        {
            "caption_id": "sen" + sen_id,
            "video_id": sents["video_id"].astype(str),
            "text": sents["caption"].fillna("").astype(str),
        }
    )
    return captions, malformed
