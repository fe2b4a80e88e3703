"""Stage 1 (contrastive): WTI, the gathered symmetric InfoNCE, the model, the stage end to end."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as Fn
from torch import Tensor

from pipeline.losses import direction_loss, symmetric_info_nce
from pipeline.models.temporal import TemporalTransformer
from pipeline.models.wti import TokenWeights, wti_scores

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# WTI
# ----------------------------------------------------------------------------------------------


def _lengths_mask(lengths: list[int], width: int) -> Tensor:
    return torch.arange(width)[None] < torch.tensor(lengths)[:, None]


def _wti_reference(t, tm, tw, v, vm, vw) -> Tensor:
    """The WTI formula written as plain loops over captions, clips, words and frames."""
    out = torch.zeros(t.shape[0], v.shape[0])
    for i in range(t.shape[0]):
        for j in range(v.shape[0]):
            words = [k for k in range(t.shape[1]) if tm[i, k]]
            frames = [f for f in range(v.shape[1]) if vm[j, f]]
            c = {(k, f): float(Fn.cosine_similarity(t[i, k], v[j, f], dim=0))
                 for k in words for f in frames}
            t2v = sum(float(tw[i, k]) * max(c[k, f] for f in frames) for k in words)
            v2t = sum(float(vw[j, f]) * max(c[k, f] for k in words) for f in frames)
            out[i, j] = 0.5 * (t2v + v2t)
    return out


def test_wti_matches_loop_reference_with_masks() -> None:
    g = torch.Generator().manual_seed(0)
    M, N, L, F, D = 5, 4, 6, 5, 8
    t, v = torch.randn(M, L, D, generator=g), torch.randn(N, F, D, generator=g)
    tm, vm = _lengths_mask([6, 1, 3, 4, 2], L), _lengths_mask([5, 2, 1, 3], F)
    # garbage in padding must not matter
    t[~tm] = 1e3
    v[~vm] = -1e3
    tw = torch.softmax(torch.randn(M, L, generator=g).masked_fill(~tm, -torch.inf), -1)
    vw = torch.softmax(torch.randn(N, F, generator=g).masked_fill(~vm, -torch.inf), -1)
    ref = _wti_reference(t, tm, tw, v, vm, vw)
    full = wti_scores(t, tm, tw, v, vm, vw)
    tiny = wti_scores(t, tm, tw, v, vm, vw, chunk_elems=L * F)  # one (caption, clip) per block
    assert torch.allclose(full, ref, atol=1e-5)
    assert torch.allclose(tiny, full, atol=1e-6)
    assert full.abs().max() <= 1.0


def test_token_weights_softmax_over_valid_only() -> None:
    mod = TokenWeights(8)
    torch.nn.init.normal_(mod.mlp[2].weight)
    mask = _lengths_mask([3, 1, 5], 5)
    w = mod(torch.randn(3, 5, 8), mask)
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert (w[~mask] == 0).all() and (w[mask] > 0).all()


# ----------------------------------------------------------------------------------------------
# Temporal transformer
# ----------------------------------------------------------------------------------------------


def test_temporal_transformer_masks_padding_and_sees_order() -> None:
    torch.manual_seed(0)
    tt = TemporalTransformer(dim=16, layers=2, heads=4, max_frames=6).eval()
    x, mask = torch.randn(2, 6, 16), _lengths_mask([4, 6], 6)
    y = tt(x, mask)
    x2 = x.clone()
    x2[0, 4:] = 50.0  # padding content of clip 0 changes
    y2 = tt(x2, mask)
    assert torch.allclose(y[0, :4], y2[0, :4], atol=1e-5)
    assert torch.equal(y2[0, 4:], x2[0, 4:])  # padding rows pass through
    rev = tt(x.flip(1)[1:2], mask[1:2]).flip(1)  # same frames, reversed order
    assert not torch.allclose(rev, y[1:2], atol=1e-3)  # positions make it order-aware
    assert torch.equal(TemporalTransformer(16, 0, 4, 6)(x, mask), x)


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


class Feats(NamedTuple):
    x: Tensor


def _dot(a: Feats, b: Feats) -> Tensor:
    return Fn.normalize(a.x, dim=-1) @ Fn.normalize(b.x, dim=-1).T


def _clip_loss(sim: Tensor, scale: float) -> Tensor:
    labels = torch.arange(sim.shape[0])
    return 0.5 * (Fn.cross_entropy(scale * sim, labels) + Fn.cross_entropy(scale * sim.T, labels))


def test_info_nce_matches_clip_loss_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = Feats(torch.randn(6, 8, generator=g)), Feats(torch.randn(6, 8, generator=g))
    groups = torch.arange(6)
    loss, logs = symmetric_info_nce(a, b, groups, _dot, torch.tensor(10.0))
    swapped, _ = symmetric_info_nce(b, a, groups, _dot, torch.tensor(10.0))
    assert torch.allclose(loss, _clip_loss(_dot(a, b), 10.0), atol=1e-6)
    assert torch.allclose(loss, swapped, atol=1e-6)
    assert set(logs) >= {"loss_t2v", "loss_v2t", "logit_scale"}


def test_info_nce_masks_same_clip_off_diagonal() -> None:
    g = torch.Generator().manual_seed(2)
    text = Feats(torch.randn(4, 8, generator=g))
    video = torch.randn(4, 8, generator=g)
    video[2] = video[0]  # pairs 0 and 2: two captions of the same clip
    groups = torch.tensor([7, 3, 7, 5])
    loss, _ = symmetric_info_nce(text, Feats(video), groups, _dot, torch.tensor(10.0))
    # reference: drop the duplicate column (row) from each softmax by hand
    s = 10.0 * _dot(text, Feats(video))
    terms = []
    for i in range(4):
        keep = [j for j in range(4) if j == i or groups[j] != groups[i]]
        terms.append(-torch.log_softmax(s[i, keep], 0)[keep.index(i)])
        terms.append(-torch.log_softmax(s[keep, i], 0)[keep.index(i)])
    assert torch.allclose(loss, torch.stack(terms).sum() / 8, atol=1e-6)
    # a perfect batch apart from the shared clip has near-zero loss once masked
    same = Feats(video.clone())
    perfect, _ = symmetric_info_nce(same, Feats(video), groups, _dot, torch.tensor(100.0))
    assert perfect < 1e-3


def test_direction_loss_is_two_way_cross_entropy_per_caption() -> None:
    g = torch.Generator().manual_seed(3)
    text, video = Feats(torch.randn(7, 8, generator=g)), Feats(torch.randn(7, 8, generator=g))
    forward, backward = torch.tensor([0, 2, 3]), torch.tensor([4, 5, 6])  # pairs (0,4) (2,5) (3,6)
    loss = direction_loss(text, video, forward, backward, _dot, torch.tensor(10.0))
    s = 10.0 * _dot(text, video)
    terms = []
    for a, b in zip(forward.tolist(), backward.tolist(), strict=True):
        for own, other in ((a, b), (b, a)):  # caption `own` vs its clip and the reversed one
            terms.append(-torch.log_softmax(torch.stack([s[own, own], s[own, other]]), 0)[0])
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    # captions that match their own clip far better than its reversal: near-zero loss
    assert direction_loss(video, video, forward, backward, _dot, torch.tensor(100.0)) < 1e-3


# ----------------------------------------------------------------------------------------------
# The model, and the gradient through the cross-rank gather
# ----------------------------------------------------------------------------------------------


def tiny_clip(hidden: int = 32, layers: int = 2, proj: int = 24, image: int = 32):
    """A small randomly initialised CLIPModel (seeded by the caller)."""
    from transformers import CLIPConfig, CLIPModel

    cc = CLIPConfig(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=2 * hidden, vocab_size=64, max_position_embeddings=16,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2),
        vision_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                           intermediate_size=2 * hidden, image_size=image, patch_size=16),
        projection_dim=proj,
    )
    return CLIPModel(cc)


def tiny_model(cache_layer=1, similarity: str = "wti", learn: bool = True, seed: int = 0):
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel

    torch.manual_seed(seed)
    clip = tiny_clip()
    cfg = RetrievalConfig(clip_config=clip.config.to_dict(), cache_layer=cache_layer, max_frames=6,
                          similarity=similarity, temporal_layers=1, temporal_heads=2,
                          logit_scale=14.0, learn_logit_scale=learn)
    model = RetrievalModel(cfg, clip)
    if similarity == "wti":  # weights start uniform (zero last layer); make them input-dependent
        for mlp in (model.text_weights.mlp, model.frame_weights.mlp):
            torch.nn.init.normal_(mlp[2].weight, std=0.5)
    return model


def tiny_batch(n: int = 8, seed: int = 0):
    """n pairs at cache layer 1 (hidden 32); pairs 1 and 6 are two captions of one clip."""
    from pipeline.models.retrieval import PairBatch

    g = torch.Generator().manual_seed(seed)
    L, F, T, H = 7, 6, 5, 32
    tlen = torch.randint(2, L + 1, (n,), generator=g)
    vlen = torch.randint(1, F + 1, (n,), generator=g)
    video = torch.randn(n, F, T, H, generator=g)
    groups = torch.arange(n)
    video[6], vlen[6], groups[6] = video[1], vlen[1], groups[1]
    return PairBatch(torch.randn(n, L, H, generator=g), _lengths_mask(tlen.tolist(), L), tlen - 1,
                     video, _lengths_mask(vlen.tolist(), F), torch.zeros(0, dtype=torch.long),
                     groups)


def _loss(model, batch):
    inner = getattr(model, "module", model)
    text, video = model(batch)
    return symmetric_info_nce(text, video, batch.groups, inner.similarity, inner.scale())[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_rank(rank: int, world: int, port: int, out: str, split: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model()
        batch = tiny_batch()
        part = slice(0, split) if rank == 0 else slice(split, None)
        mine = type(batch)(*(f[part] for f in batch))
        longest = int(mine.text_mask.sum(1).max())  # ranks trim text differently (collate)
        mine = mine._replace(text_feats=mine.text_feats[:, :longest],
                             text_mask=mine.text_mask[:, :longest])
        ddp = DistributedDataParallel(model)
        _loss(ddp, mine).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("split", [4, 3])  # equal shares, and 3 + 5 pairs (reversed extras)
def test_two_ranks_gather_gives_single_process_gradients(tmp_path: Path, split: int) -> None:
    out = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(_gather_rank, args=(2, _free_port(), out, split), nprocs=2,
                                join=True)
    model = tiny_model()
    _loss(model, tiny_batch()).backward()
    ddp_grads = torch.load(out)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(ddp_grads) == set(names) and "logit_scale" in names
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert torch.allclose(ddp_grads[n], p.grad, atol=1e-5, rtol=1e-4), n


# ----------------------------------------------------------------------------------------------
# A fixture feature cache (cache layer 1 of `tiny_clip`) and training on it
# ----------------------------------------------------------------------------------------------


def write_fixture(root: Path, n: dict[str, int] | None = None, caps: int = 2, seed: int = 0,
                  fingerprint: str = "fixture", with_rev: bool = True) -> dict[str, list[str]]:
    """prepared/captions.parquet + features/shard-00000.h5 where each clip has a hidden code
    (6-dim, embedded in the hidden size): its frames carry the code, its captions a fixed linear
    map of it (learnable from a few clips, not given).
    Half the captions have a reversed twin. Returns caption ids per split."""
    import pandas as pd

    from pipeline.features.store import ShardWriter, shard_name

    n = n or {"train": 32, "val": 8, "test": 4}
    g = torch.Generator().manual_seed(seed)
    F, T, L, H = 4, 5, 6, 32
    proj = torch.linalg.qr(torch.randn(H, H, generator=g))[0]
    rows, vids, splits = [], [], {}
    for split, count in n.items():
        for v in range(count):
            vid = f"{split}{v:03d}"
            vids.append(vid)
            for c in range(caps):
                rows.append(dict(caption_id=f"{vid}#{c}", video_id=vid, text=f"clip {vid} {c}",
                                 split=split, reversed_text="rev" if c == 0 else ""))
        splits[split] = [r["caption_id"] for r in rows if r["split"] == split]
    caps_df = pd.DataFrame(rows)
    (root / "prepared").mkdir(parents=True)
    caps_df.to_parquet(root / "prepared" / "captions.parquet")
    code = 2.0 * torch.randn(len(vids), 6, generator=g) @ torch.randn(6, H, generator=g) / 6**0.5
    vmask = _lengths_mask(torch.randint(2, F + 1, (len(vids),), generator=g).tolist(), F)
    video = code[:, None, None, :] + 0.5 * torch.randn(len(vids), F, T, H, generator=g)
    vpos = {v: i for i, v in enumerate(vids)}
    idx = torch.tensor([vpos[v] for v in caps_df["video_id"]])
    tlen = torch.randint(3, L + 1, (len(caps_df),), generator=g)
    text = (code[idx] @ proj)[:, None, :] + 0.5 * torch.randn(len(caps_df), L, H, generator=g)
    attrs = dict(schema_version=1, backbone_fingerprint=fingerprint, cache_layer="1",
                 dtype="float16", max_words=L)
    (root / "features").mkdir()
    with ShardWriter(root / "features" / shard_name(0), attrs, "float16") as w:
        w.create_video(vids, (F, T, H))
        w.write_rows("video", 0, feats=video.numpy(), mask=vmask.numpy())
        groups = (("text", slice(None)), ("text_rev", caps_df["reversed_text"] != ""))
        for group, sel in groups[:2 if with_rev else 1]:
            sub = caps_df[sel]
            keep = torch.tensor(sel.tolist() if group == "text_rev" else [True] * len(caps_df))
            w.create_text(group, sub["caption_id"].tolist(), sub["video_id"].tolist(), (L, H), None)
            w.write_rows(group, 0, feats=(-text[keep] if group == "text_rev" else text).numpy(),
                         mask=_lengths_mask(tlen[keep].tolist(), L).numpy(),
                         eos=(tlen[keep] - 1).numpy().astype("int32"))
    return splits


def _settings(**kw):
    from pipeline.training import TrainSettings

    base = dict(seed=0, batch_size=16, epochs=12, max_steps=0, lr=3e-3, weight_decay=0.0,
                warmup_fraction=0.1, grad_clip=1.0, grad_accum=1, ema=0.0, amp=False,
                eval_every=0, checkpoint_every=0)
    return TrainSettings(**{**base, **kw})


def test_collate_appends_time_reversed_pairs(tmp_path: Path) -> None:
    from pipeline.config import ContrastiveConfig
    from pipeline.contrastive import ContrastiveTask
    from pipeline.features.dataset import reverse_frames
    from pipeline.features.store import FeatureStore

    splits = write_fixture(tmp_path)
    store = FeatureStore(tmp_path / "features")
    cfg = ContrastiveConfig(reverse_negatives=True)
    task = ContrastiveTask(tiny_model(), store, splits["train"], splits["val"], cfg)
    ds = task.train_dataset()
    items = [ds[i] for i in range(6)]  # captions #0 (with a twin) and #1 of clips 0-2
    batch = task.collate(items)
    assert batch.text_feats.shape[0] == 9 and batch.groups.tolist()[:6] == [0, 0, 1, 1, 2, 2]
    assert batch.groups.tolist()[6:] == [32, 33, 34]  # reversed clips: their own identities
    assert batch.video_feats.shape[0] == 6 and batch.backwards.tolist() == [0, 2, 4]
    rev_text, _, _ = store.load_texts([splits["train"][0]], reversed=True)
    length = batch.text_feats.shape[1]
    assert torch.equal(batch.text_feats[6], rev_text[0, :length])
    assert task.pairs_per_sample == 1.5
    # the model plays those clips backwards after its per-frame blocks: same as reversing inputs
    model = task.model.eval()
    with torch.no_grad():
        _, video = model(batch)
        rows = batch.backwards
        direct = model.encode_video(reverse_frames(batch.video_feats[rows], batch.video_mask[rows]),
                                    batch.video_mask[rows])
    assert video.frames.shape[0] == 9
    assert torch.allclose(video.frames[6:], direct.frames, atol=1e-5)
    assert not torch.allclose(video.frames[6:], video.frames[rows], atol=1e-3)


def test_direction_weight_adds_the_direction_term(tmp_path: Path) -> None:
    from pipeline.config import ContrastiveConfig
    from pipeline.contrastive import ContrastiveTask
    from pipeline.features.store import FeatureStore

    splits = write_fixture(tmp_path)
    store = FeatureStore(tmp_path / "features")
    losses = {}
    for w in (0.0, 2.0):
        cfg = ContrastiveConfig(reverse_negatives=True, direction_weight=w)
        task = ContrastiveTask(tiny_model(), store, splits["train"], splits["val"], cfg)
        ds = task.train_dataset()
        batch = task.collate([ds[i] for i in range(6)])
        losses[w] = task.loss(task.model.eval(), batch)
    (plain, plain_logs), (both, logs) = losses[0.0], losses[2.0]
    assert "loss_direction" not in plain_logs and logs["loss_direction"] > 0
    assert both.item() == pytest.approx(plain.item() + 2.0 * logs["loss_direction"], rel=1e-5)


def test_frame_layout_feeds_the_temporal_transformer_only() -> None:
    import dataclasses

    from pipeline.features.dataset import reverse_frames
    from pipeline.models.retrieval import RetrievalConfig, RetrievalModel

    assert tiny_model().layout is None  # off by default
    torch.manual_seed(0)
    clip = tiny_clip()
    cfg = dataclasses.replace(tiny_model().cfg, layout_dim=3)
    model = RetrievalModel(cfg, clip).eval()
    assert model.layout.out.in_features == 4 * 3  # 2x2 patches x 3 channels
    batch = tiny_batch()._replace(backwards=torch.tensor([0, 3]))
    with torch.no_grad():
        _, video = model(batch)
        rows = batch.backwards
        direct = model.encode_video(reverse_frames(batch.video_feats[rows], batch.video_mask[rows]),
                                    batch.video_mask[rows])
        assert torch.allclose(video.frames[8:], direct.frames, atol=1e-5)  # reversal exact
        # the layout changes the output through the transformer; frames in = frames out + h
        plain = RetrievalModel(tiny_model().cfg, clip).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(plain(batch)[1].frames, video.frames, atol=1e-3)
        model.layout.out.weight.zero_()
        model.layout.out.bias.zero_()  # a zero layout is the plain model
        assert torch.allclose(plain(batch)[1].frames, model(batch)[1].frames, atol=1e-6)
        again = RetrievalModel(RetrievalConfig.from_dict(cfg.to_dict())).eval()
        again.load_state_dict(model.state_dict())
        assert torch.equal(again(batch)[1].frames, model(batch)[1].frames)
    model.train()
    _loss(model, tiny_batch()).backward()
    assert float(model.layout.out.weight.grad.abs().sum()) > 0  # trained by the loss
    with pytest.raises(ValueError, match="layout_dim needs"):
        RetrievalModel(dataclasses.replace(cfg, temporal_layers=0), clip)


def test_reverse_negatives_without_reversed_captions_in_cache(tmp_path: Path) -> None:
    from pipeline.config import ContrastiveConfig
    from pipeline.contrastive import ContrastiveTask
    from pipeline.features.store import FeatureStore

    splits = write_fixture(tmp_path, with_rev=False)
    task = ContrastiveTask(tiny_model(), FeatureStore(tmp_path / "features"), splits["train"],
                           splits["val"], ContrastiveConfig(reverse_negatives=True))
    ds = task.train_dataset()
    batch = task.collate([ds[i] for i in range(4)])
    assert batch.text_feats.shape[0] == 4 and batch.backwards.numel() == 0
    assert task.pairs_per_sample == 1.0


def test_retrieval_ranks_multi_caption() -> None:
    from pipeline.contrastive import retrieval_ranks

    # captions 0,1 -> video 0; caption 2 -> video 1; caption 3 -> video 2
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.5, 0.4, 0.3], [0.1, 0.1, 0.7]])
    t2v, v2t = retrieval_ranks(sim, torch.tensor([0, 0, 1, 2]))
    assert t2v.tolist() == [1, 2, 2, 1]
    # video 1: its best caption (2) scores 0.4, video 0's best caption scores 0.8 -> rank 2
    assert v2t.tolist() == [1, 2, 1]


def test_tiny_training_learns_and_reloads(tmp_path: Path) -> None:
    from pipeline.config import ContrastiveConfig
    from pipeline.contrastive import ContrastiveTask, load_model
    from pipeline.features.store import FeatureStore
    from pipeline.tracking import Tracker
    from pipeline.training import train

    splits = write_fixture(tmp_path)
    store = FeatureStore(tmp_path / "features")
    model = tiny_model(learn=False)
    task = ContrastiveTask(model, store, splits["train"], splits["val"],
                           ContrastiveConfig(reverse_negatives=True))
    with torch.no_grad():
        before = task.validate(model.eval())
    result = train(task, _settings(), tmp_path / "out", Tracker())
    assert result["best_R1"] >= before["R1"] + 25, (before["R1"], result)
    reloaded = load_model(tmp_path / "out" / "best")
    with torch.no_grad():
        again = task.validate(reloaded)
    assert again["R1"] == pytest.approx(result["best_R1"])


def _learn_rank(rank: int, world: int, port: int, root: str, splits: dict[str, list[str]]) -> None:
    from pipeline import dist
    from pipeline.config import ContrastiveConfig
    from pipeline.contrastive import ContrastiveTask
    from pipeline.dist import DistEnv
    from pipeline.features.store import FeatureStore
    from pipeline.io import write_json
    from pipeline.tracking import Tracker
    from pipeline.training import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        task = ContrastiveTask(tiny_model(learn=False), FeatureStore(Path(root) / "features"),
                               splits["train"], splits["val"],
                               ContrastiveConfig(reverse_negatives=True))
        result = train(task, _settings(batch_size=8), Path(root) / "ddp", Tracker(),
                       env=DistEnv(rank, rank, world), device="cpu")
        write_json(Path(root) / f"result-{rank}.json", result)
    finally:
        dist.shutdown()


@pytest.mark.slow
def test_two_ranks_learn(tmp_path: Path) -> None:
    """Stage 1 on 2 gloo ranks (batch 8 each = the 1-rank test's 16) learns the fixture."""
    from pipeline.config import ContrastiveConfig
    from pipeline.contrastive import ContrastiveTask
    from pipeline.features.store import FeatureStore
    from pipeline.io import read_json

    splits = write_fixture(tmp_path)
    task = ContrastiveTask(tiny_model(learn=False), FeatureStore(tmp_path / "features"),
                           splits["train"], splits["val"], ContrastiveConfig())
    with torch.no_grad():
        before = task.validate(task.model.eval())
    torch.multiprocessing.spawn(_learn_rank, args=(2, _free_port(), str(tmp_path), splits),
                                nprocs=2, join=True)
    r0, r1 = (read_json(tmp_path / f"result-{r}.json") for r in (0, 1))
    assert r0["steps"] == r1["steps"] > 0 and r0["best_R1"] == r1["best_R1"]
    assert r0["best_R1"] >= before["R1"] + 25, (before["R1"], r0)
    assert (tmp_path / "ddp" / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_train_contrastive_command_end_to_end(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from pipeline.config import load_params
    from pipeline.features.backbone import run_backbone
    from stages.app import app

    write_fixture(tmp_path)
    params = {
        "paths": {k: str(tmp_path / k)
                  for k in ("prepared", "backbone", "features", "contrastive")},
        "features": {"cache_layer": 1, "max_words": 6, "scratch": dict(
            image_size=32, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
            text_hidden=32, text_layers=2, text_heads=2, intermediate_factor=2,
            projection_dim=24, vocab_size=300, max_position=16)},
        "contrastive": dict(temporal_layers=1, temporal_heads=2, batch_size=16, epochs=3,
                            lr=3e-3, reverse_negatives=True, checkpoint_every=0),
        "tracking": {"enabled": False},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    record = run_backbone(load_params(tmp_path / "params.yaml"))
    shutil.rmtree(tmp_path / "features")
    shutil.rmtree(tmp_path / "prepared")
    write_fixture(tmp_path, fingerprint=record["fingerprint"])
    result = CliRunner().invoke(app, ["train-contrastive", "-p", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "steps/s" in result.output and "samples/s" in result.output
    out = tmp_path / "contrastive"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 * (64 // 16) and metrics["steps_per_s"] > 0
    assert {"t2v_R1", "t2v_R5", "t2v_R10", "t2v_MnR", "v2t_R1", "v2t_MnR"} <= set(metrics["val"])
    assert (out / "best" / "model.safetensors").is_file()
    assert (out / "curves.csv").read_text().startswith("step,epoch,loss,lr")
    # a features cache from another backbone is refused with a one-line reason
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "features")
    shutil.rmtree(tmp_path / "prepared")
    write_fixture(tmp_path, fingerprint="another")
    result = CliRunner().invoke(app, ["train-contrastive", "-p", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1 and "rerun `dret features`" in result.output
