"""Torch Dataset over cached features: one item per caption, with its video's features.

Works with DistributedSampler (plain map-style dataset) and DataLoader workers (the store's h5py
handles are per process). `in_memory=True` reads the selected rows once (the demo is ~100 MB).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from pipeline.features.store import FeatureStore
from pipeline.log import get_logger

log = get_logger(__name__)


def reverse_frames(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Play clips backwards: reverse the order of the valid (leading) frames of each clip.

    feats [N, F, ...], mask [N, F] bool (valid frames first) -> [N, F, ...]; padding stays put.
    """
    n_valid = mask.sum(dim=1, keepdim=True)  # [N, 1]
    f = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # [N, F]
    src = torch.where(f < n_valid, n_valid - 1 - f, f)  # [N, F]
    index = src.view(*src.shape, *([1] * (feats.dim() - 2))).expand_as(feats)
    return feats.gather(1, index)


class CaptionVideoDataset(Dataset):
    """Per caption: its text features and its video's features.

    Item keys: `index` (position in this dataset), `video_index` (position of its video in
    `self.video_ids`: captions of one video share it), `text_feats` [L, D|H], `text_mask` [L]
    bool, `text_eos` () int64, `video_feats` [F, D] or [F, T, H], `video_mask` [F] bool; with
    `reversed=True` also `rev_feats`, `rev_mask`, `rev_eos` (the direction-swapped caption;
    zeros where none) and `has_rev` () bool. Features keep the stored dtype (fp16).
    Captions whose video has no features (frames failed) are dropped (logged).
    """

    def __init__(
        self,
        store: FeatureStore,
        caption_ids: Sequence[str],
        *,
        reversed: bool = False,
        in_memory: bool = False,
    ) -> None:
        self.store = store
        kept = [c for c in caption_ids if store.has_video(store.caption_video[c])]
        if len(kept) < len(caption_ids):
            log.warning("%d of %d captions have no video features (frames failed); dropped",
                        len(caption_ids) - len(kept), len(caption_ids))
        self.caption_ids: list[str] = kept
        video_of = [store.caption_video[c] for c in kept]
        self.video_ids: list[str] = sorted(set(video_of))
        pos = {v: i for i, v in enumerate(self.video_ids)}
        self.video_index = torch.tensor([pos[v] for v in video_of], dtype=torch.long)
        self.reversed = reversed
        rev_ids = set(store.reversed_ids) if reversed else set()
        self.has_rev = torch.tensor([c in rev_ids for c in kept], dtype=torch.bool)
        self.in_memory = in_memory
        self._mem: dict[str, torch.Tensor] = {}
        if in_memory:
            self._load_all()

    def _load_all(self) -> None:
        m = self._mem
        m["video_feats"], m["video_mask"] = self.store.load_videos(self.video_ids)
        m["text_feats"], m["text_mask"], m["text_eos"] = self.store.load_texts(self.caption_ids)
        if self.reversed:
            flags = self.has_rev.tolist()
            with_rev = [c for c, h in zip(self.caption_ids, flags, strict=True) if h]
            rf, rm, re_ = self.store.load_texts(with_rev, reversed=True)
            rows = self.has_rev.nonzero().squeeze(1)
            m["rev_feats"] = rf.new_zeros((len(self.caption_ids), *rf.shape[1:]))
            m["rev_mask"] = rm.new_zeros((len(self.caption_ids), *rm.shape[1:]))
            m["rev_eos"] = re_.new_zeros(len(self.caption_ids))
            m["rev_feats"][rows], m["rev_mask"][rows], m["rev_eos"][rows] = rf, rm, re_

    def __len__(self) -> int:
        return len(self.caption_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v = int(self.video_index[i])
        item: dict[str, torch.Tensor] = {"index": torch.tensor(i), "video_index": torch.tensor(v)}
        if self.in_memory:
            m = self._mem
            item.update(
                text_feats=m["text_feats"][i], text_mask=m["text_mask"][i],
                text_eos=m["text_eos"][i], video_feats=m["video_feats"][v],
                video_mask=m["video_mask"][v],
            )
            if self.reversed:
                item.update(rev_feats=m["rev_feats"][i], rev_mask=m["rev_mask"][i],
                            rev_eos=m["rev_eos"][i], has_rev=self.has_rev[i])
            return item
        cid = self.caption_ids[i]
        tf, tm, te = self.store.load_texts([cid])
        vf, vm = self.store.load_videos([self.video_ids[v]])
        item.update(text_feats=tf[0], text_mask=tm[0], text_eos=te[0], video_feats=vf[0],
                    video_mask=vm[0])
        if self.reversed:
            has = bool(self.has_rev[i])
            if has:
                rf, rm, re_ = self.store.load_texts([cid], reversed=True)
                rf, rm, re_ = rf[0], rm[0], re_[0]
            else:
                rf, rm, re_ = (torch.zeros_like(t[0]) for t in (tf, tm, te))
            item.update(rev_feats=rf, rev_mask=rm, rev_eos=re_, has_rev=torch.tensor(has))
        return item
