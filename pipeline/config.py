"""Strict configuration: params.yaml sections -> frozen dataclasses.

Every stage reads its own section through `load_params`. Unknown keys, missing required keys and
wrong types fail with a `ConfigError` naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A params file that does not match the schema (message names key and file)."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathsConfig:
    """Where each stage writes; every path is relative to the working directory (repo root)."""

    videos: str = "data/raw/videos"  # video root of a real dataset (prepare reads it)
    annotations: str = "data/raw/annotations"  # annotation file or folder of a real dataset
    prepared: str = "data/prepared"
    frames: str = "data/frames"
    backbone: str = "data/backbone"
    features: str = "data/features"
    contrastive: str = "data/contrastive"
    diffusion: str = "data/diffusion"
    evaluate: str = "data/evaluate"


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and content of the procedurally generated demo benchmark."""

    n_train: int = 1500
    n_val: int = 100
    n_test: int = 200
    size: int = 64  # pixels, square
    seconds: float = 4.0
    fps: int = 8  # encoding rate of the clips
    captions_per_clip: int = 5
    max_objects: int = 2
    noise: float = 6.0  # std of per-pixel noise (0-255 scale)
    holdout_pairs: int = 4  # colour x shape pairs never rendered in train/val
    twin_fraction: float = 0.3  # share of test clips that are one-attribute twins of another
    n_ood: int = 100  # captions per OOD kind
    workers: int = 2


@dataclass(frozen=True)
class PrepareConfig:
    dataset: Literal["synthetic", "folder", "msrvtt", "msvd", "lsmdc", "activitynet", "didemo"] = (
        "synthetic"
    )
    val_fraction: float = 0.05  # carved from train when the dataset ships no val split
    val_max: int = 1000
    msrvtt_train: Literal["9k", "7k"] = "9k"
    probe_duration: bool = True
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class FramesConfig:
    """Frame sampling (pipeline/frames.py): uniform in time, short side resize + centre crop."""

    fps: float = 1.0  # sampling rate (exact, never truncated); DiffusionRet: 1
    max_frames: int = 12  # at most this many, spread uniformly; shorter videos keep fewer
    size: int = 224  # output frames are size x size
    format: Literal["jpeg", "raw"] = "jpeg"  # raw uint8: 3-7x cheaper end to end, 6-11x larger
    jpeg_quality: int = 90
    shard_size: int = 256  # videos per shard (sorted by id); fixes the shard contents
    workers: int = 2  # decode processes per rank
    threads: int = 1  # ffmpeg decode threads per worker (0 = ffmpeg's choice)
    max_failure_rate: float = 0.05  # exit 1 when a larger share of the videos gave no frame


@dataclass(frozen=True)
class ScratchBackboneConfig:
    """Size of the locally created CLIP-architecture backbone (features.backbone: scratch)."""

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    intermediate_factor: int = 4
    projection_dim: int = 128
    vocab_size: int = 1000
    max_position: int = 32


@dataclass(frozen=True)
class FeaturesConfig:
    backbone: str = "scratch"  # "scratch", a Hugging Face model id, or a local directory
    revision: str = "main"
    scratch: ScratchBackboneConfig = field(default_factory=ScratchBackboneConfig)
    cache_layer: Union[int, Literal["final"]] = "final"
    max_words: int = 32
    batch_size: int = 64
    dtype: Literal["float16", "float32"] = "float16"
    compression: Literal["none", "lzf", "gzip"] = "none"
    workers: int = 1  # >= 1: a reader thread decodes ahead (GPU, or CPU with a core left free)
    threads: int = 0  # torch intra-op threads (fixed -> bitwise reproducible shards); 0 = as is
    amp: bool = True  # bf16 autocast on CUDA (CPU always runs fp32)


@dataclass(frozen=True)
class ContrastiveConfig:
    similarity: Literal["wti", "mean"] = "wti"
    temporal_layers: int = 4
    temporal_heads: int = 8
    batch_size: int = 128
    epochs: int = 5
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 1e-4
    coef_lr: float = 1e-3
    weight_decay: float = 0.2
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema: float = 0.0  # 0 = off, else decay
    amp: bool = True  # bf16/fp16 autocast where the device supports it
    logit_scale: float = 100.0
    learn_logit_scale: bool = False
    reverse_negatives: bool = False  # time-reversed clips with direction-swapped captions
    # weight of a loss term: each caption with a reversed twin vs {its clip, clip reversed};
    # needs reverse_negatives (0 = off)
    direction_weight: float = 0.0
    # channels per patch of a frame-layout input to the temporal transformer, read from the
    # cached patch tokens (cache_layer k < final): where what is in each frame, so motion can be
    # read without the frame embeddings giving up content to carry positions (0 = off)
    layout_dim: int = 0
    eval_every: int = 0  # steps; 0 = once per epoch
    checkpoint_every: int = 100
    loader_workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave as is


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 50
    schedule: Literal["cosine", "linear"] = "cosine"
    sampling_steps: int = 50
    eta: float = 0.0
    hidden: int = 512
    heads: int = 8
    negatives: int = 127
    batch_size: int = 128
    epochs: int = 5
    max_steps: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema: float = 0.0
    amp: bool = True
    tau: float = 100.0  # temperature of the training cross-entropy
    top_k: int = 32
    alpha: float = 1.0
    rerank_temp: float = 1.0
    chunk_queries: int = 1024
    eval_every: int = 0
    checkpoint_every: int = 100
    loader_workers: int = 0
    threads: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    chunk: int = 1024
    bootstrap: int = 1000
    recall_ks: tuple[int, ...] = (1, 5, 10, 50)
    rerank: bool = True
    other_dataset: str = ""  # folder with prepared/ + features/ of another dataset
    ood: bool = True  # OOD detection on prepared/ood_captions.parquet when it exists
    index_splits: tuple[str, ...] = ("train", "val", "test")  # what `dret search` can retrieve
    index_dtype: Literal["float16", "float32"] = "float16"  # evaluation scores these tensors too


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = ""  # default: the dataset name
    uri: str = ""  # default: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db


@dataclass(frozen=True)
class Params:
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    source: str = field(default="params.yaml", compare=False)

    def section_hash(self, *names: str) -> str:
        """Stable short hash of the named sections (all when none are named)."""
        data = to_dict(self)
        data.pop("source", None)
        if names:
            data = {n: data[n] for n in names}
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read a params file into `Params`; raise ConfigError naming the key and file on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    raw = {k: v for k, v in raw.items() if k != "source"}
    return _build(Params, raw, "", str(path), extra={"source": str(path)})


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>") -> Any:
    """Build any config dataclass from a mapping with the same strict checks."""
    return _build(cls, data, "", source)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists)."""
    out = dataclasses.asdict(obj)
    return json.loads(json.dumps(out, default=list))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _build(cls: type, data: Any, where: str, source: str, extra: dict | None = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or '<root>'}' must be a mapping, got {_tname(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields or (extra and key in extra):
            known = ", ".join(sorted(k for k in fields if not extra or k not in extra))
            raise ConfigError(f"{source}: unknown key '{_join(where, key)}' (known: {known})")
    kwargs: dict[str, Any] = dict(extra or {})
    for name, f in fields.items():
        if name in kwargs:
            continue
        key = _join(where, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: '{key}' has invalid value {value!r} (expected {_tdesc(tp)})")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ConfigError(f"{source}: '{key}' has invalid value {value!r} (expected {_tdesc(tp)})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {_tname(value)}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{source}: '{key}' must be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{source}: '{key}' must be {_tdesc(tp)}, got {_tname(value)} {value!r}")


def _tdesc(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_tdesc(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _tname(value: Any) -> str:
    return type(value).__name__


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
