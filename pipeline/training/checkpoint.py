"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory written whole through `pipeline.io.atomic_dir`:

- `model.safetensors`: the model's state dict (unwrapped names).
- `state.json`: config, step, epoch, metrics, scheduler state, python/numpy RNG states, and the
  JSON index of the optimizer state (`optimizer`).
- `train_state.safetensors` (optional): optimizer tensors (`optim/<param id>/<key>`), EMA weights
  (`ema/<name>`), torch CPU / CUDA RNG states (`rng/<rank>/cpu`, `rng/<rank>/cuda/<i>`).

A kill during `save` leaves the previous complete checkpoint in place (or, in the instant between
the two renames of `atomic_dir`, under `.<name>.old`, which `find_resume_dir` also accepts).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim import Optimizer

from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, read_json, write_json

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
TRAIN_STATE_FILE = "train_state.safetensors"


@dataclass
class Checkpoint:
    """What `load` returns: model weights, the JSON state, and the extra tensors."""

    path: Path
    model: dict[str, Tensor]
    state: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses shared storage, e.g. tied weights)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def save(
    directory: str | Path,
    model: nn.Module | dict[str, Tensor],
    state: dict[str, Any],
    config: dict[str, Any] | None = None,
    tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; `state` must be JSON-serialisable."""
    directory = Path(directory)
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    doc = dict(state)
    if config is not None:
        doc["config"] = config
    with atomic_dir(directory) as tmp:
        save_file(_plain(weights), str(tmp / MODEL_FILE))
        if tensors:
            save_file(_plain(tensors), str(tmp / TRAIN_STATE_FILE))
        write_json(tmp / STATE_FILE, doc)
    return directory


def load(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory written by `save` (safetensors + JSON only, no pickle)."""
    directory = Path(directory)
    for name in (MODEL_FILE, STATE_FILE):
        if not (directory / name).is_file():
            raise PipelineError(f"{directory}: not a checkpoint ({name} missing)")
    dev = str(device)
    extra = directory / TRAIN_STATE_FILE
    return Checkpoint(
        path=directory,
        model=load_file(str(directory / MODEL_FILE), device=dev),
        state=read_json(directory / STATE_FILE),
        tensors=load_file(str(extra), device=dev) if extra.is_file() else {},
    )


def load_weights(directory: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load `model.safetensors` into `model` strictly (missing or extra keys fail); return state."""
    ckpt = load(directory)
    _check_config(directory, model, ckpt.state.get("config"))
    own = model.state_dict()
    shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in ckpt.model.items()
              if k in own and v.shape != own[k].shape]
    if shapes:  # load_state_dict would raise a bare RuntimeError
        raise PipelineError(f"{directory}: weights do not match the model (shape of {shapes[:3]})")
    result = model.load_state_dict(ckpt.model, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PipelineError(
            f"{directory}: weights do not match the model (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    return ckpt.state


def _check_config(directory: str | Path, model: nn.Module, saved: Any) -> None:
    """Refuse a checkpoint whose saved config differs from the model's on a shared key (same
    shapes can still mean another model, e.g. another number of attention heads)."""
    if hasattr(model, "config_dict"):
        mine = model.config_dict()
    elif hasattr(getattr(model, "cfg", None), "to_dict"):
        mine = model.cfg.to_dict()
    else:
        return
    if not isinstance(saved, dict):
        return
    from pipeline.config import flatten

    old, new = flatten(saved), flatten(json.loads(json.dumps(mine, default=list)))
    diff = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new))
            if old[k] != new[k]]
    if diff:
        raise PipelineError(f"{directory}: checkpoint was saved with another model config "
                            f"({'; '.join(diff[:5])})")


def find_resume_dir(out_dir: str | Path, name: str = "last") -> Path | None:
    """`out_dir/name` when complete, else the `.name.old` left by a kill mid-rename, else None."""
    out_dir = Path(out_dir)
    for cand in (out_dir / name, out_dir / f".{name}.old"):
        if (cand / MODEL_FILE).is_file() and (cand / STATE_FILE).is_file():
            return cand
    return None


# ----------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, JSON)
# ----------------------------------------------------------------------------------------------


def optimizer_to_flat(optimizer: Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into safetensors-ready tensors and a JSON index."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    index: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, entry in sd["state"].items():
        meta: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{pid}/{key}"] = value
                meta[key] = {"tensor": f"optim/{pid}/{key}"}
            else:
                meta[key] = {"value": value}
        index["state"][str(pid)] = meta
    return tensors, index


def optimizer_from_flat(
    optimizer: Optimizer, tensors: dict[str, Tensor], index: dict[str, Any],
) -> None:
    """Inverse of `optimizer_to_flat`: load the state back into `optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for pid, meta in index["state"].items():
        state[int(pid)] = {
            key: tensors[m["tensor"]] if "tensor" in m else m["value"] for key, m in meta.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": index["param_groups"]})


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's RNG states: torch CPU/CUDA as uint8 tensors; python/numpy as JSON."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    doc = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, doc


def set_rng_state(tensors: dict[str, Tensor], doc: dict[str, Any]) -> None:
    """Restore the states captured by `rng_state`."""
    torch.set_rng_state(tensors["cpu"].cpu())
    cuda = [tensors[k].cpu() for k in sorted(
        (k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1])
    )]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = doc["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = doc["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
