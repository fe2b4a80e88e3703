"""The CLI: --help everywhere, one-line errors with a non-zero exit on bad params."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.app import app

runner = CliRunner()
COMMANDS = sorted(c.name for c in app.registered_commands)


def test_app_help_lists_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in COMMANDS:
        assert name in res.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name: str) -> None:
    res = runner.invoke(app, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "--params" in res.output or name in ("search", "ood")
    assert len(res.output.strip().splitlines()) > 3


@pytest.mark.parametrize("name", [n for n in COMMANDS if n not in ("search", "ood")])
def test_bad_params_exit_nonzero_with_one_line(tmp_path: Path, name: str) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"frames": {"fsp": 1}}))
    res = runner.invoke(app, [name, "--params", str(bad)])
    assert res.exit_code == 1
    err_lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and "frames.fsp" in err_lines[0]


def test_python_m_stages_is_the_same_app() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stages", "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0
    assert "prepare" in out.stdout
