"""Child-process helpers shared by the kill tests."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def sigkill_at_marker(proc: subprocess.Popen, marker: Path, timeout: float, what: str) -> None:
    """Wait until `proc` creates `marker`, SIGKILL it, and assert that the kill is what ended it.

    Fails with the child's stderr tail if it exits first, or with `what` after `timeout` s.
    """
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"the child never reached {what}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
