"""Exponential moving average of the trainable weights."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, over the parameters that require grad.

    Shadows are kept in fp32 on the parameters' device; names are the model's parameter names
    (unwrapped model, so checkpoints do not depend on DDP).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone().float()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the current weights of `model` (call after each optimizer step)."""
        params = dict(model.named_parameters())
        for name, s in self.shadow.items():
            s.lerp_(params[name].detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadow weights (name -> tensor), for safetensors."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore shadows; the names must match exactly."""
        if set(state) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state))
            extra = sorted(set(state) - set(self.shadow))
            raise KeyError(f"EMA state does not match the model (missing {missing}, extra {extra})")
        for name, s in self.shadow.items():
            s.copy_(state[name])

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the shadow weights into `model`; the trained weights come back after."""
        params = dict(model.named_parameters())
        backup = {name: params[name].detach().clone() for name in self.shadow}
        try:
            for name, s in self.shadow.items():
                params[name].copy_(s)
            yield model
        finally:
            for name, b in backup.items():
                params[name].copy_(b)
