"""Running code in a fresh Python process that cannot import mla_convert."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK_MLA_CONVERT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "mla_convert":
            raise ImportError("mla_convert is blocked in this process")
sys.meta_path.insert(0, _Block())
"""


def run_without_mla_convert(code: str, cwd: Path, timeout: float = 300) -> str:
    """Run ``code`` in a new interpreter where ``import mla_convert`` fails; return its stdout."""
    script = BLOCK_MLA_CONVERT + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{result.stderr[-4000:]}")
    return result.stdout
