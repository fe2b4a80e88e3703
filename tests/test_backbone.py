"""Backbone resolution, loading errors, and the scratch backbone (create -> from_pretrained)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import CLIPModel  # imported at collection: slow the first time

from pipeline.config import Params, ScratchBackboneConfig, from_dict
from pipeline.errors import PipelineError
from pipeline.features import backbone as bb

TINY = ScratchBackboneConfig(
    image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
    text_hidden=32, text_layers=1, text_heads=2, intermediate_factor=2, projection_dim=16,
    vocab_size=300, max_position=16,
)
TRAIN = ["a red circle moves left", "two blue zebras grow slowly", "a green zebra shrinks"] * 20


def _params(tmp: Path, backbone: str = "scratch") -> Params:
    return from_dict(Params, {
        "seed": 3,
        "paths": {"prepared": str(tmp / "prepared"), "backbone": str(tmp / "backbone")},
        "features": {"backbone": backbone, "scratch": json.loads(json.dumps(TINY.__dict__)),
                     "max_words": 12},
        "tracking": {"enabled": False},
    })


def _write_captions(tmp: Path) -> None:
    (tmp / "prepared").mkdir(parents=True, exist_ok=True)
    test_only = ["a quokka jumps"] * 60
    df = pd.DataFrame({
        "caption_id": [f"c{i}" for i in range(len(TRAIN) + len(test_only))],
        "video_id": ["v"] * (len(TRAIN) + len(test_only)),
        "text": TRAIN + test_only,
        "split": ["train"] * len(TRAIN) + ["test"] * len(test_only),
    })
    df.to_parquet(tmp / "prepared" / "captions.parquet")


def test_missing_local_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as err:
        bb.resolve(str(tmp_path / "no-such-clip"))
    msg = str(err.value)
    assert "no-such-clip" in msg and "does not exist" in msg and "huggingface-cli download" in msg


def test_local_dir_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="model.safetensors"):
        bb.resolve(str(tmp_path))


def test_unavailable_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(PipelineError) as err:
        bb.resolve("dret-tests/clip-that-does-not-exist", "main")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    for part in ("dret-tests/clip-that-does-not-exist", "revision main", "Hugging Face cache",
                 "huggingface-cli download", "local directory"):
        assert part in msg, part


def test_scratch_tokenizer_matches_config_and_keeps_eos(tmp_path: Path) -> None:
    tok = bb.train_scratch_tokenizer(TRAIN, TINY.vocab_size, TINY.max_position)
    cfg = bb.scratch_config(TINY, tok).text_config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert cfg.eos_token_id != 2  # not CLIP's legacy argmax pooling
    enc = tok(["A RED circle " * 10, "zebra"], padding="max_length", truncation=True, max_length=8)
    ids = enc["input_ids"]
    assert ids[0][0] == tok.bos_token_id and ids[0][-1] == tok.eos_token_id  # truncated keeps EOS
    assert ids[1][-1] == tok.pad_token_id and enc["attention_mask"][1][-1] == 0
    assert tok("A Red")["input_ids"] == tok("a red")["input_ids"]  # lowercased


def test_scratch_round_trip_and_determinism(tmp_path: Path) -> None:
    p = _params(tmp_path)
    _write_captions(tmp_path)
    rec = bb.run_backbone(p)
    model_dir = Path(rec["path"])
    names = {f.name for f in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "preprocessor_config.json"} <= names
    on_disk = json.loads((tmp_path / "backbone" / bb.RECORD_FILE).read_text())
    assert on_disk == rec and rec["source"] == "scratch" and len(rec["fingerprint"]) == 64
    # the tokenizer saw the training captions only
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert "Ġzebra" in vocab and "Ġquokka" not in vocab
    # from_pretrained gives back the seeded model: same outputs as a fresh in-memory build
    loaded = bb.load_backbone(tmp_path / "backbone")
    assert loaded.image_size == 32 and loaded.fingerprint == rec["fingerprint"]
    tok = loaded.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        fresh = CLIPModel(bb.scratch_config(TINY, tok)).eval()
    px = torch.randn(2, 3, 32, 32)
    enc = tok(["a red zebra", "two circles"], padding="max_length", max_length=12,
              return_tensors="pt")
    with torch.no_grad():
        a = loaded.model(pixel_values=px, **enc)
        b = fresh(pixel_values=px, **enc)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, rtol=0, atol=0)
    # same seed + captions -> same fingerprint
    again = bb.run_backbone(p)
    assert again["fingerprint"] == rec["fingerprint"]


def test_changed_checkpoint_is_detected_on_load(tmp_path: Path) -> None:
    _write_captions(tmp_path)
    rec = bb.run_backbone(_params(tmp_path))
    cfg = Path(rec["path"]) / "config.json"
    cfg.write_text(cfg.read_text().replace('"projection_dim": 16', '"projection_dim": 16 '))
    with pytest.raises(PipelineError, match="changed since"):
        bb.load_backbone(tmp_path / "backbone")


def test_local_dir_resolves_and_loads(tmp_path: Path) -> None:
    _write_captions(tmp_path)
    rec = bb.run_backbone(_params(tmp_path))
    local = bb.resolve(rec["path"])
    assert local.source == "local" and local.fingerprint == rec["fingerprint"]
    loaded = bb.load_backbone(rec["path"])
    assert loaded.record.source == "local" and loaded.image_size == 32


def test_cli_unavailable_backbone_is_one_line(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from stages.app import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"backbone": str(tmp_path / "backbone")},
        "features": {"backbone": "dret-tests/clip-that-does-not-exist"},
        "tracking": {"enabled": False},
    }))
    res = CliRunner().invoke(app, ["backbone", "--params", str(params)])
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "huggingface-cli download" in errors[0]
