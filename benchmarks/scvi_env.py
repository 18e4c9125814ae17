"""Run a benchmark's scvi-tools contender in another Python (one with scvi-tools), as a
subprocess: the scvi-tools environment and pyrovae's need not be the same.

The script's last line of standard output is a JSON object, returned as a dict; on failure
the end of its standard error is printed and None returned, so that the benchmark skips
the contender with a message.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run_script(python: str, script: str, *args: Any, name: str = "scvi-tools") -> dict | None:
    """``python benchmarks/<script> args...``; its last output line parsed as JSON, or None
    (with a message) when it fails."""
    try:
        done = subprocess.run([python, str(HERE / script), *map(str, args)],
                              capture_output=True, text=True)
    except OSError as error:  # no such Python
        print(f"{name} skipped: {error}")
        return None
    if done.returncode != 0:
        print(f"{name} failed (skipped):", done.stderr[-2000:])
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"{name} skipped: no JSON result line in its output:", done.stdout[-500:])
        return None
