from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, flatten, load_params, to_dict


def write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_repo_params_load(repo_root: Path) -> None:
    p = load_params(repo_root / "params.yaml")
    assert isinstance(p, Params)
    assert p.prepare.dataset == "synthetic"
    assert p.frames.max_frames == 8


def test_defaults_when_sections_absent(tmp_path: Path) -> None:
    p = load_params(write(tmp_path, {"seed": 3}))
    assert p.seed == 3 and p.frames.fps == 1.0 and p.features.cache_layer == "final"


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"frames": {"fsp": 1}}, "unknown key 'frames.fsp'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"prepare": {"synthetic": {"n_trian": 3}}}, "'prepare.synthetic.n_trian'"),
        ({"frames": {"fps": "fast"}}, "'frames.fps' must be float"),
        ({"frames": {"max_frames": 2.5}}, "'frames.max_frames' must be int"),
        ({"frames": {"max_frames": True}}, "'frames.max_frames' must be int"),
        ({"features": {"cache_layer": "last"}}, "'features.cache_layer'"),
        ({"prepare": {"dataset": "kinetics"}}, "'prepare.dataset'"),
        ({"frames": 3}, "'frames' must be a mapping"),
        ({"evaluate": {"recall_ks": 5}}, "'evaluate.recall_ks' must be a list"),
    ],
)
def test_bad_params_name_key_and_file(tmp_path: Path, data: object, needle: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("frames: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_int_accepted_for_float_and_cache_layer_int(tmp_path: Path) -> None:
    p = load_params(write(tmp_path, {"frames": {"fps": 2}, "features": {"cache_layer": 3}}))
    assert p.frames.fps == 2.0 and isinstance(p.frames.fps, float)
    assert p.features.cache_layer == 3


def test_frozen_and_hash_stable(repo_root: Path) -> None:
    a = load_params(repo_root / "params.yaml")
    b = load_params(repo_root / "params.yaml")
    assert a.section_hash() == b.section_hash()
    assert a.section_hash("frames") != a.section_hash("features")
    with pytest.raises(AttributeError):
        a.seed = 1  # type: ignore[misc]


def test_flatten_roundtrip(repo_root: Path) -> None:
    flat = flatten(to_dict(load_params(repo_root / "params.yaml")))
    assert flat["frames.max_frames"] == 8
    assert flat["features.scratch.patch_size"] == 16
