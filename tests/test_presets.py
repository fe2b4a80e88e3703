"""Every benchmark preset loads through the strict loader and prepares the shipped annotations."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.config import PathsConfig, PrepareConfig, load_params

PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_loads(preset: Path) -> None:
    p = load_params(preset)
    assert p.prepare.dataset == preset.stem
    assert p.features.backbone == "openai/clip-vit-base-patch32"
    assert p.contrastive.batch_size in (64, 128)


@pytest.mark.parametrize("name", ["msrvtt", "msvd", "didemo"])
def test_preset_prepares_shipped_annotations(
    name: str, bench_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.data.prepare import run_prepare

    ann = tmp_path / "ann"
    shutil.copytree(bench_dir / "annotations" / name, ann)
    if name == "msrvtt":  # MSRVTT_data.json (train captions) does not ship: a tiny stand-in
        (ann / "MSRVTT_data.json").write_text(
            '{"videos": [{"video_id": "video0", "split": "train"}],'
            ' "sentences": [{"caption": "a man talks", "video_id": "video0", "sen_id": 0}]}'
        )
    (tmp_path / "videos").mkdir()
    monkeypatch.chdir(tmp_path)
    p = load_params(Path(__file__).resolve().parents[1] / "presets" / f"{name}.yaml")
    p = replace(
        p,
        paths=replace(PathsConfig(), annotations=str(ann), videos=str(tmp_path / "videos"),
                      prepared=str(tmp_path / "prepared")),
        prepare=replace(p.prepare, probe_duration=False) if isinstance(p.prepare, PrepareConfig)
        else p.prepare,
    )
    summary = run_prepare(p)
    assert summary["splits"]["test"]["videos"] > 0
    assert summary["videos_missing"] == summary["videos"]  # no video files here
