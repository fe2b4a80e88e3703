"""The MLflow facade: store location, run grouping, no-op mode."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import Params, TrackingConfig


def test_repo_root_from_dvc_temp_experiment(tmp_path: Path) -> None:
    main = tmp_path / "proj"
    exp = main / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (exp / "sub").mkdir(parents=True)
    assert tracking.repo_root(exp / "sub") == main
    (main / ".git").mkdir()
    assert tracking.repo_root(main) == main


def test_default_uri_is_absolute_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri(Params())
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/y.db")
    assert tracking.tracking_uri(Params()) == "sqlite:////x/y.db"


def test_noop_when_disabled() -> None:
    p = replace(Params(), tracking=TrackingConfig(enabled=False))
    with tracking.stage_run(p, "prepare") as t:
        assert not t.active
        t.log_metrics({"a": 1.0})  # no error, no store


@pytest.mark.slow
def test_stage_runs_grouped_under_one_parent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DRET_TRACKING", "on")
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = replace(Params(), tracking=TrackingConfig(uri=uri, experiment="t"))
    for stage in ("prepare", "frames"):
        with tracking.stage_run(p, stage) as t:
            t.log_metrics({"loss": 1.5, "R@1": 3.0}, step=2)
            f = tmp_path / f"{stage}.json"
            f.write_text("{}")
            t.log_artifact(f)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "pipeline"]
    children = [r for r in runs if "stage" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.tags["pipeline_id"] for r in runs} == {parents[0].data.tags["pipeline_id"]}
    assert children[0].data.params["frames.max_frames"] == "12"
    assert children[0].data.metrics["R_at_1"] == 3.0
    assert exp.artifact_location.endswith("/mlruns")
