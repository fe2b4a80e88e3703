"""The one logging set-up of the project."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once: `LEVEL name: message` on stderr (rank prefix if >1)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    level = level or os.environ.get("DRET_LOG_LEVEL", "INFO")
    rank = os.environ.get("RANK")
    several = rank is not None and os.environ.get("WORLD_SIZE", "1") != "1"
    prefix = f"[rank {rank}] " if several else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "alembic", "mlflow", "git", "h5py", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
