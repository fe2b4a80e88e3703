"""Shared CLI plumbing: the --params option, logging, and one-line errors with exit code 1."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import ConfigError, Params, load_params
from pipeline.errors import PipelineError
from pipeline.log import setup_logging

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Params file to read (strict schema).")
]


def fail(message: str, code: int = 1) -> None:
    """Print `error: <one line>` to stderr and exit non-zero."""
    line = " ".join(str(message).split())
    _close_progress_bars()
    typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def _close_progress_bars() -> None:
    """Close open tqdm bars so the error starts on its own line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Expected failures -> one-line reason, exit code 1 (tracebacks with DRET_DEBUG=1)."""
    try:
        yield
    except (ConfigError, PipelineError, FileNotFoundError) as exc:
        if os.environ.get("DRET_DEBUG"):
            raise
        fail(str(exc))
    except OSError as exc:  # a full disk or quota: one line, outputs were written atomically
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("DRET_DEBUG"):
            raise
        fail(f"no space left on device ({exc}); completed outputs were kept, free space and "
             "rerun")
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def load(params_path: Path) -> Params:
    """Set up logging and read the params file (ConfigError is handled by guard())."""
    setup_logging()
    return load_params(params_path)


def echo_table(rows: list[list[str]], header: list[str]) -> None:
    """Print a small aligned text table to stdout."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    typer.echo(fmt.format(*header))
    typer.echo(fmt.format(*("-" * w for w in widths)))
    for r in rows:
        typer.echo(fmt.format(*[str(c) for c in r]))
    sys.stdout.flush()
