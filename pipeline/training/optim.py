"""AdamW with the parameter groups CLIP-style retrieval training uses."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import AdamW

if TYPE_CHECKING:
    from pipeline.training.loop import TrainSettings


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm gains (every <2-D parameter) and the logit scale are not decayed."""
    return param.ndim < 2 or name.split(".")[-1] == "logit_scale"


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, coef_lr: float,
    is_backbone: Callable[[str], bool],
) -> list[dict[str, Any]]:
    """Up to four groups (backbone x decay); frozen parameters are left out; empty groups dropped.

    Each group carries a `name` ("backbone_decay", "backbone_no_decay", "head_decay",
    "head_no_decay") and the names of its parameters under `param_names`.
    """
    buckets: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {
        (b, d): [] for b in (True, False) for d in (True, False)
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        buckets[(bool(is_backbone(name)), not no_weight_decay(name, p))].append((name, p))
    groups = []
    for (backbone, decay), items in buckets.items():
        if not items:
            continue
        groups.append({
            "name": f"{'backbone' if backbone else 'head'}_{'decay' if decay else 'no_decay'}",
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "lr": lr * coef_lr if backbone else lr,
            "weight_decay": weight_decay if decay else 0.0,
        })
    return groups


def build_optimizer(
    model: nn.Module, settings: TrainSettings, is_backbone: Callable[[str], bool],
) -> AdamW:
    """AdamW over `param_groups(model, ...)`; backbone parameters at lr * coef_lr."""
    groups = param_groups(model, settings.lr, settings.weight_decay, settings.coef_lr, is_backbone)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
