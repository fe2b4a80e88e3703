"""MLflow behind one small facade: one run per stage execution, grouped per pipeline.

Default store: sqlite:///<repo root>/mlflow.db with artifacts under <repo root>/mlruns. The repo
root is resolved so that `dvc exp run --temp/--queue` (which run inside .dvc/tmp/exps/...) still
log into the main store. MLFLOW_TRACKING_URI or `tracking.uri` override it. `enabled: false` or
DRET_TRACKING=off gives a no-op tracker (unit tests).
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Params, flatten, to_dict
from pipeline.log import get_logger

log = get_logger(__name__)


def repo_root(start: str | Path | None = None) -> Path:
    """The main workspace root, also from inside a DVC experiment's temp copy."""
    here = Path(start or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for p in (here, *here.parents):
        if (p / ".dvc").is_dir() or (p / ".git").exists():
            return p
    return here


def git_commit(root: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root or os.getcwd(), capture_output=True, text=True,
            timeout=10, check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tracking_uri(params: Params) -> str:
    if params.tracking.uri:
        return params.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


class Tracker:
    """Log params, metrics (with steps) and artifacts of one stage run; no-op when disabled."""

    def __init__(self, client: Any = None, run_id: str | None = None) -> None:
        self._client = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k.replace("@", "_at_"), float(v), ts, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active or not Path(path).exists():
            return
        if Path(path).is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))


def _enabled(params: Params) -> bool:
    return params.tracking.enabled and os.environ.get("DRET_TRACKING", "on").lower() != "off"


@contextlib.contextmanager
def stage_run(params: Params, stage: str, is_main: bool = True) -> Iterator[Tracker]:
    """One MLflow run for one stage execution, child of the pipeline's parent run."""
    if not (_enabled(params) and is_main):
        yield Tracker()
        return
    from mlflow.tracking import MlflowClient

    root = repo_root()
    client = MlflowClient(tracking_uri=tracking_uri(params))
    exp_name = params.tracking.experiment or f"dret-{params.prepare.dataset}"
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        exp_id = client.create_experiment(exp_name, artifact_location=(root / "mlruns").as_uri())
    else:
        exp_id = exp.experiment_id
    commit = git_commit(root)
    params_hash = params.section_hash()
    pipeline_id = f"{commit[:12]}-{params_hash}"
    tags = {"pipeline_id": pipeline_id, "git_commit": commit, "params_hash": params_hash}
    parent = _parent_run(client, exp_id, pipeline_id, tags)
    run = client.create_run(
        exp_id,
        run_name=stage,
        tags={**tags, "stage": stage, "mlflow.parentRunId": parent, "params_file": params.source},
    )
    tracker = Tracker(client, run.info.run_id)
    tracker.log_params(to_dict(params))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)


def _parent_run(client: Any, exp_id: str, pipeline_id: str, tags: dict[str, str]) -> str:
    found = client.search_runs(
        [exp_id], filter_string=f"tags.pipeline_id = '{pipeline_id}' and tags.role = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id, run_name=f"pipeline {pipeline_id}", tags={**tags, "role": "pipeline"}
    )
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
