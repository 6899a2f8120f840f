"""Every Python block of the README runs as written, and CI runs the README's test command.

Each ```python block runs on its own, in a fresh interpreter in an empty temporary directory.
Blocks that use torch run when torch is importable; under CI=true a missing torch fails
(conftest.torch_or_skip).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import import_or_skip, in_ci, torch_or_skip

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _readme() -> str:
    if not README.is_file():
        message = f"{README} not found: copy README.md beside tests/ to check its examples"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return README.read_text(encoding="utf-8")


def _blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block in ``language``."""
    if not README.is_file():
        return []
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(rf"^```{language}\n(.*?)^```\s*$", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_python_blocks():
    _readme()
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(tmp_path, line, code):
    if re.search(r"^\s*(import torch|from torch|import fastadam\.torch|from fastadam\.torch|from fastadam import torch)", code, re.M):
        torch_or_skip()
    if "fastadam.distributed" in code:
        import_or_skip("mpi4py", 'mpi4py mpich (pip install "fastadam[mpi]")', "the README's sharded-optimizer block")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"README.md line {line}: the block failed\n{code}\n--- stderr:\n{out.stderr[-4000:]}"


def test_ci_runs_the_readmes_commands():
    """.ci/run runs the README's two set-up commands exactly as written."""
    _readme()
    commands = [line.strip() for _, code in _blocks("bash") for line in code.splitlines()]
    setup = [c for c in commands if c.endswith("python -m pytest") or c.endswith("python -m fastadam.examples.digits")]
    assert len(setup) == 2, setup
    if not (ROOT / ".ci" / "run").is_file():
        pytest.skip("no .ci/run beside tests/ (a copy of the tests outside the repository)")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in setup:
        assert command in (line.strip() for line in ci), f".ci/run does not run the README's command {command!r}"


def test_install_script_reads_the_test_extra():
    """tests/install.py (the README's test command) installs the [test] extra's requirements."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import install
    finally:
        sys.path.pop(0)

    class Dist:
        requires = ['numpy>=1.23', 'pytest>=7; extra == "test"', 'tqdm>=4.60; extra == "examples"',
                    'hypothesis>=6; extra == "test" or extra == "examples"', 'torch>=2.1; extra == "torch"']

    assert install.test_requirements(Dist()) == ["pytest>=7", "hypothesis>=6"]
