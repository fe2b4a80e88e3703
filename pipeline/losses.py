"""Symmetric InfoNCE (CLIP's contrastive cross-entropy) over a batch gathered across ranks.

Every rank encodes its own share of the batch; the features of all ranks are gathered with
gradients flowing back through the gather (`torch.distributed.nn.functional.all_gather`), and
each rank scores *its* queries against every candidate of the global batch ("local loss"):
its texts against all videos (t2v) and its videos against all texts (v2t). The local loss is
scaled so that, after DDP averages the parameter gradients over ranks, they equal the gradients
of the global-batch loss on one process (tested to 1e-5 with 2 gloo ranks).

A caption's positive is its own clip. Two captions of the same clip in one batch would make each
other's clip a false negative; entries that share a group id (the clip's identity) off the
diagonal are therefore removed from the softmax in both directions.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as Fn
from torch import Tensor

T = TypeVar("T", bound=NamedTuple)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' x [b_r, ...] concatenated along dim 0 in rank order -> ([sum b_r, ...], offset).

    `offset` is where this rank's rows start. Ranks may hold different numbers of rows, and
    different sizes of the other dims (text trimmed to each batch's longest caption): those are
    zero-padded (False for masks) to the largest across ranks. Floating tensors keep their
    autograd graph: the backward pass sums the gradients every rank computes for these rows.
    Without a process group this is (x, 0).
    """
    rank, world = _world()
    if world == 1:
        return x, 0
    shape_t = torch.tensor(x.shape, device=x.device)
    shapes_l = [torch.zeros_like(shape_t) for _ in range(world)]
    dist.all_gather(shapes_l, shape_t)
    shapes = torch.stack(shapes_l).cpu()  # (world, ndim)
    sizes = shapes[:, 0].tolist()
    top = shapes.max(0).values.tolist()
    pad = [p for d in reversed(range(x.dim())) for p in (0, top[d] - x.shape[d])]
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo has no bool collectives
    padded = Fn.pad(wire, pad) if any(pad) else wire
    if x.is_floating_point():
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        with warnings.catch_warnings():  # deprecated in favour of a private API; still exact
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(all_gather_with_grad(padded))
    else:  # masks and ids: no gradient
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        parts = [p.to(x.dtype) for p in parts]
    full = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
    return full, sum(sizes[:rank])


def gather_outputs(out: T) -> tuple[T, int]:
    """`gather_rows` applied to every field of a NamedTuple of tensors sharing dim 0."""
    fields = [gather_rows(f) for f in out]
    return type(out)(*(f for f, _ in fields)), fields[0][1]


def _masked_ce(logits: Tensor, labels: Tensor, row_groups: Tensor, col_groups: Tensor) -> Tensor:
    """Summed cross-entropy of logits [b, B] against labels [b]; same-group non-label columns
    (row_groups [b] vs col_groups [B]) are removed from the softmax."""
    same = row_groups[:, None] == col_groups[None, :]  # (b, B)
    same[torch.arange(len(labels), device=labels.device), labels] = False
    logits = logits.float().masked_fill(same, float("-inf"))
    return Fn.cross_entropy(logits, labels, reduction="sum")


def symmetric_info_nce(
    text: T, video: T, groups: Tensor, similarity: Callable[[T, T], Tensor], logit_scale: Tensor,
) -> tuple[Tensor, dict[str, float]]:
    """Symmetric InfoNCE of this rank's pairs against the global batch.

    text, video: NamedTuples of tensors with this rank's b pairs along dim 0 (pair i = text i with
    video i); groups [b] int64: identity of each pair's clip (same id = same clip);
    similarity(text, video) -> [m, n] unscaled scores; logit_scale: scalar multiplier.
    Returns (loss to backpropagate, logs). loss = world * (this rank's summed t2v + v2t
    cross-entropies) / (2 * global batch): summed over ranks it is the global mean loss, and DDP's
    gradient averaging turns it into the exact global gradient. With equal shares it equals the
    mean loss of this rank's queries.
    """
    _, world = _world()
    b = groups.shape[0]
    labels_local = torch.arange(b, device=groups.device)
    if world == 1:
        logits = logit_scale * similarity(text, video)  # (B, B)
        t2v = _masked_ce(logits, labels_local, groups, groups)
        v2t = _masked_ce(logits.T, labels_local, groups, groups)
        total = b
        hits = (logits.argmax(1) == labels_local).float().mean()
    else:
        all_text, offset = gather_outputs(text)
        all_video, _ = gather_outputs(video)
        all_groups, _ = gather_rows(groups)
        total = all_groups.shape[0]
        labels = labels_local + offset
        t2v_logits = logit_scale * similarity(text, all_video)  # (b, B)
        v2t_logits = logit_scale * similarity(all_text, video).T  # (b, B)
        t2v = _masked_ce(t2v_logits, labels, groups, all_groups)
        v2t = _masked_ce(v2t_logits, labels, groups, all_groups)
        hits = (t2v_logits.argmax(1) == labels).float().mean()
    loss = world * (t2v + v2t) / (2 * total)
    logs = {
        "loss_t2v": float(t2v.detach()) / max(b, 1),
        "loss_v2t": float(v2t.detach()) / max(b, 1),
        "batch_acc_t2v": float(hits),
        "logit_scale": float(torch.as_tensor(logit_scale).detach()),
    }
    return loss, logs


def direction_loss(
    text: T, video: T, forward: Tensor, backward: Tensor,
    similarity: Callable[[T, T], Tensor], logit_scale: Tensor,
) -> Tensor:
    """Mean two-way cross-entropy of each caption over {its clip, the same clip time-reversed}.

    Pairs forward[k] and backward[k] (row indices into this rank's text / video, [R] each) are a
    clip with its caption and that clip played backwards with the direction-swapped caption. Each
    of the 2R captions must score its own clip above the other one: a direct signal for motion
    direction, which the batch-wide InfoNCE gives only as one hard negative among many.
    """
    rows = torch.cat([forward, backward])  # (2R,)
    R = forward.shape[0]
    pick = [type(text)(*(f[rows] for f in text)), type(video)(*(f[rows] for f in video))]
    logits = logit_scale * similarity(*pick)  # (2R, 2R)
    own = logits.diagonal()
    swapped = torch.arange(2 * R, device=rows.device).roll(R)  # k <-> R + k
    other = logits.gather(1, swapped[:, None]).squeeze(1)
    return Fn.softplus((other - own).float()).mean()  # = CE over (own, other), label own
