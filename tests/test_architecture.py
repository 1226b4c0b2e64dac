"""The code's layers hold: import-linter checks the contracts in pyproject.toml ([tool.importlinter]),
so an import against the direction (the core importing queues/, a transport imported by the core,
metrics importing the project) fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_imports_run_one_way():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_back_edge_is_caught():
    """The check is live: a core module importing queues/ breaks the layers contract."""
    bad = ROOT / "orchestrator" / "core" / "_back_edge_probe.py"
    bad.write_text("import queues.dispatch  # noqa: F401\n")
    try:
        lint = Path(sys.executable).parent / "lint-imports"
        r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        bad.unlink()
    assert r.returncode != 0
    assert "orchestrator.core._back_edge_probe -> queues.dispatch" in r.stdout
