"""Shared test set-up: offline hubs, no MLflow unless a test opts in, one torch thread."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DRET_TRACKING", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if not SHARED.is_dir():  # CI clones into another folder with shared/ beside it
    SHARED = Path(os.environ.get("DRET_SHARED", REPO.parent / "shared"))
BENCH = SHARED / "benchmarks"


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def bench_dir() -> Path:
    if not BENCH.is_dir():
        pytest.skip(f"shared benchmarks not found at {BENCH}")
    return BENCH
