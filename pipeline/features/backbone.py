"""Resolve, create and load the CLIP backbone (the `backbone` stage and every later consumer).

One way to load: `transformers`' `from_pretrained` on a directory or Hub id (CLIPModel,
AutoTokenizer, CLIPImageProcessor for mean/std/size). `features.backbone` is

- `scratch`: a small CLIPConfig sized by `features.scratch`, seeded random init, and a byte-level
  BPE tokenizer trained on the training captions, saved as a standard HF directory;
- a local directory holding an HF CLIP checkpoint;
- a Hugging Face model id (e.g. openai/clip-vit-base-patch32), used unchanged from the HF cache.

The stage writes `backbone.json` (source, name, path, revision, fingerprint); the fingerprint is
the sha256 over the files that determine the features (config, weights, tokenizer, preprocessor).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Params, ScratchBackboneConfig, to_dict
from pipeline.errors import PipelineError
from pipeline.io import atomic_dir, write_json
from pipeline.log import get_logger

log = get_logger(__name__)

SCRATCH = "scratch"
RECORD_FILE = "backbone.json"
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SIDE_FILES = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "preprocessor_config.json",
)


@dataclass(frozen=True)
class BackboneRecord:
    """What `backbone.json` holds: enough to load the same weights again and to key caches."""

    source: str  # scratch | hub | local
    name: str  # features.backbone as given
    path: str  # directory that from_pretrained loads
    revision: str  # hub commit hash, "local" or "scratch"
    fingerprint: str  # sha256 over config + weights + tokenizer + preprocessor files
    scratch: dict[str, Any] | None = field(default=None)  # features.scratch used to create it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Backbone:
    """A loaded backbone: CLIPModel (eval mode), tokenizer and image preprocessing constants."""

    model: Any  # transformers.CLIPModel
    tokenizer: Any  # a transformers tokenizer
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_size: int
    record: BackboneRecord

    @property
    def fingerprint(self) -> str:
        return self.record.fingerprint

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def eos_token_id(self) -> int | None:
        return self.model.config.text_config.eos_token_id


# ----------------------------------------------------------------------------------------------
# Fingerprint and resolution
# ----------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The weight files from_pretrained reads in `path` (safetensors preferred, sharded or not)."""
    for base in WEIGHT_FILES:
        if (path / base).is_file():
            return [path / base]
        index = path / f"{base}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [index, *(path / s for s in shards)]
    return []


def fingerprint_dir(path: str | Path) -> str:
    """sha256 over (name, bytes) of the config, weight, tokenizer and preprocessor files."""
    path = Path(path)
    files = weight_files(path) + [path / f for f in SIDE_FILES if (path / f).is_file()]
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _how_to_provide(name: str, revision: str) -> str:
    return (
        f"to provide it: run `dret backbone` once with internet access, or "
        f"`huggingface-cli download {name} --revision {revision}`, or set features.backbone to a "
        f"local directory with config.json, model weights, tokenizer and preprocessor_config.json"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _check_local(path: Path, name: str, revision: str) -> None:
    if not path.is_dir():
        raise PipelineError(
            f"features.backbone: local directory '{path}' does not exist; "
            f"{_how_to_provide(name, revision)}"
        )
    missing = [f for f in ("config.json",) if not (path / f).is_file()]
    if not weight_files(path):
        missing.append("model.safetensors or pytorch_model.bin")
    if missing:
        raise PipelineError(
            f"features.backbone: '{path}' is not an HF checkpoint (missing {', '.join(missing)}); "
            f"{_how_to_provide(name, revision)}"
        )


def _hub_snapshot(name: str, revision: str) -> Path:
    """The HF cache snapshot dir of `name@revision` (config only: fails fast when unavailable)."""
    from huggingface_hub import constants
    from transformers.utils import cached_file

    try:
        config = cached_file(name, "config.json", revision=revision)
    except Exception as exc:  # OSError, EnvironmentError, HF hub errors
        offline = "on" if constants.HF_HUB_OFFLINE else "off"
        raise PipelineError(
            f"backbone '{name}' (revision {revision}) is not available: looked for a local "
            f"directory '{name}' and in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"(HF_HUB_OFFLINE {offline}; {type(exc).__name__}); {_how_to_provide(name, revision)}"
        ) from None
    if config is None:
        raise PipelineError(
            f"backbone '{name}' has no config.json; {_how_to_provide(name, revision)}"
        )
    return Path(config).parent


def resolve(name: str, revision: str = "main") -> BackboneRecord:
    """Resolve a local dir or Hub id to a record (downloads into the HF cache when online)."""
    if name == SCRATCH:
        raise ValueError("scratch backbones are created by create_scratch(), not resolved")
    local = Path(name).expanduser()
    if local.exists() or _looks_like_path(name):
        _check_local(local, name, revision)
        return BackboneRecord("local", name, str(local), "local", fingerprint_dir(local))
    snapshot = _hub_snapshot(name, revision)
    if not weight_files(snapshot) or not (snapshot / "preprocessor_config.json").is_file():
        _load_parts(name, revision)  # from_pretrained fetches weights, tokenizer and preprocessor
    _check_local(snapshot, name, revision)
    return BackboneRecord("hub", name, str(snapshot), snapshot.name, fingerprint_dir(snapshot))


# ----------------------------------------------------------------------------------------------
# Scratch backbone
# ----------------------------------------------------------------------------------------------


def train_scratch_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int) -> Any:
    """Byte-level BPE on `texts` (lowercased, CLIP's BOS/EOS template, pad) as an HF tokenizer."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
         normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=max_length,
    )


def scratch_config(cfg: ScratchBackboneConfig, tokenizer: Any) -> Any:
    """A small CLIPConfig sized by `cfg`; the text config's special ids match `tokenizer`."""
    from transformers import CLIPConfig

    eos = tokenizer.convert_tokens_to_ids(EOS)
    if eos == 2:  # CLIPTextModel would pool at argmax(ids) for eos_token_id == 2 (legacy configs)
        raise AssertionError("scratch tokenizer must not give EOS the id 2")
    text = dict(
        vocab_size=max(cfg.vocab_size, len(tokenizer)), hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * cfg.intermediate_factor,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_position, bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=eos, pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    vision = dict(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * cfg.intermediate_factor,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def create_scratch(
    cfg: ScratchBackboneConfig, texts: Sequence[str], seed: int, out_dir: Path
) -> None:
    """Write a seeded random-init CLIP + trained tokenizer + preprocessor as an HF directory."""
    from transformers import CLIPImageProcessor, CLIPModel

    if cfg.image_size % cfg.patch_size:
        raise PipelineError(
            f"features.scratch: image_size {cfg.image_size} is not a multiple of "
            f"patch_size {cfg.patch_size}"
        )
    if not texts:
        raise PipelineError("scratch backbone: no training captions to train the tokenizer on")
    tokenizer = train_scratch_tokenizer(texts, cfg.vocab_size, cfg.max_position)
    config = scratch_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    with _quiet_transformers():
        processor = CLIPImageProcessor(
            size={"shortest_edge": cfg.image_size},
            crop_size={"height": cfg.image_size, "width": cfg.image_size},
            image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        )
    with atomic_dir(out_dir) as tmp, _quiet_transformers():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        processor.save_pretrained(tmp)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' notices (CLIPImageProcessor's torchvision fallback, progress bars)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _load_parts(
    path_or_id: str, revision: str | None, attn: str | None = None
) -> tuple[Any, Any, Any]:
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    kwargs = {"revision": revision} if revision else {}
    try:
        with _quiet_transformers():
            model = CLIPModel.from_pretrained(
                path_or_id, attn_implementation=attn, dtype=torch.float32, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
            processor = CLIPImageProcessor.from_pretrained(path_or_id, **kwargs)
    except OSError as exc:
        raise PipelineError(
            f"backbone '{path_or_id}' could not be loaded ({' '.join(str(exc).split())[:300]}); "
            f"{_how_to_provide(path_or_id, revision or 'main')}"
        ) from None
    return model.eval(), tokenizer, processor


def read_record(path: str | Path) -> BackboneRecord:
    """Read `backbone.json` (a file, or the backbone stage's output directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: run `dret backbone` first")
    return BackboneRecord(**json.loads(path.read_text(encoding="utf-8")))


def _record_dir(record: BackboneRecord, record_file: Path) -> str:
    """Where to load a recorded backbone from on this machine."""
    if record.source == "hub":
        return str(_hub_snapshot(record.name, record.revision))
    path = Path(record.path)
    if path.is_dir() or path.is_absolute():
        return str(path)
    beside = record_file.parent / path.name  # a scratch dir that moved with its record
    return str(beside if beside.is_dir() else path)


def load_backbone(
    record_path_or_name: str | Path,
    revision: str = "main",
    *,
    verify: bool = True,
    attn_implementation: str | None = None,
) -> Backbone:
    """Load a backbone from a `backbone.json` (or its folder), a local dir or a Hub id.

    With a record and `verify`, the loaded directory's fingerprint must equal the recorded one
    (a changed checkpoint fails loudly instead of silently mixing features).
    """
    target = Path(record_path_or_name)
    record_file = target / RECORD_FILE if target.is_dir() else target
    if record_file.name == RECORD_FILE and record_file.is_file():
        record = read_record(record_file)
        path = _record_dir(record, record_file)
        if record.source != "hub":
            _check_local(Path(path), record.name, record.revision)
        if verify and (actual := fingerprint_dir(path)) != record.fingerprint:
            raise PipelineError(
                f"backbone at {path} changed since `dret backbone` recorded it "
                f"(fingerprint {actual[:12]} != {record.fingerprint[:12]}): rerun `dret backbone`"
            )
    else:
        if str(record_path_or_name) == SCRATCH:
            raise PipelineError(
                "the scratch backbone is created by `dret backbone`; load its backbone.json"
            )
        record = resolve(str(record_path_or_name), revision)
        path = record.path
    model, tokenizer, processor = _load_parts(path, None, attn_implementation)
    crop = processor.crop_size or {}
    size = model.config.vision_config.image_size
    if crop and crop.get("height") not in (None, size):
        log.warning("preprocessor crop %s != model image size %d; using the model's", crop, size)
    return Backbone(
        model=model, tokenizer=tokenizer, image_mean=tuple(processor.image_mean),
        image_std=tuple(processor.image_std), image_size=int(size), record=record,
    )


# ----------------------------------------------------------------------------------------------
# Stage logic
# ----------------------------------------------------------------------------------------------


def train_captions(params: Params) -> list[str]:
    """The training split's caption texts (the only text the scratch tokenizer may see)."""
    import pandas as pd

    path = Path(params.paths.prepared) / "captions.parquet"
    if not path.is_file():
        raise PipelineError(f"{path} not found: run `dret prepare` first")
    df = pd.read_parquet(path, columns=["text", "split"])
    return df.loc[df["split"] == "train", "text"].astype(str).tolist()


def run_backbone(params: Params) -> dict[str, Any]:
    """Resolve features.backbone once; write `<paths.backbone>/backbone.json`; return the record."""
    fc = params.features
    out = Path(params.paths.backbone)
    if fc.backbone == SCRATCH:
        if fc.max_words > fc.scratch.max_position:
            raise PipelineError(
                f"features.max_words {fc.max_words} > features.scratch.max_position "
                f"{fc.scratch.max_position}"
            )
        model_dir = out / "model"
        create_scratch(fc.scratch, train_captions(params), params.seed, model_dir)
        record = BackboneRecord(
            SCRATCH, SCRATCH, str(model_dir), SCRATCH, fingerprint_dir(model_dir),
            scratch=to_dict(fc.scratch),
        )
    else:
        record = resolve(fc.backbone, fc.revision)
    write_json(out / RECORD_FILE, record.to_dict())
    log.info("backbone %s (%s) at %s, fingerprint %s", record.name, record.source, record.path,
             record.fingerprint[:12])
    return record.to_dict()
