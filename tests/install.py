"""Installs what ``python -m pytest`` needs: the README's test command is
``python tests/install.py && python -m pytest``.

* fastadam not installed from this source tree, or any source file changed since it was
  installed: ``pip install ".[test]"`` (builds the extension).
* otherwise (say, right after ``pip install ".[examples]"``): only the ``[test]`` extra's
  requirements, read from the installed metadata, so the extension is not compiled again.
  (pip rebuilds a local directory on every ``pip install .``, and scikit-build-core cannot
  reuse a build made in another of pip's isolated build environments.)

``--force`` always takes the first path.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("cpp", "python", "CMakeLists.txt", "pyproject.toml")


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for f in files:
            newest = max(newest, f.stat().st_mtime)
    return newest


def installed_from_here() -> importlib.metadata.Distribution | None:
    """The installed fastadam when it was installed (not editable) from this tree after its last change, else None."""
    try:
        dist = importlib.metadata.distribution("fastadam")
    except importlib.metadata.PackageNotFoundError:
        return None
    direct_url = dist.read_text("direct_url.json")
    if not direct_url:
        return None
    info = json.loads(direct_url)
    url = urlparse(info.get("url", ""))
    if url.scheme != "file" or info.get("dir_info", {}).get("editable"):
        return None
    if Path(unquote(url.path)).resolve() != ROOT:
        return None
    # RECORD is written at install time: a source file newer than it means a rebuild.
    records = [f for f in dist.files or [] if f.name == "RECORD" and f.parent.name.endswith(".dist-info")]
    if len(records) != 1 or not Path(dist.locate_file(records[0])).is_file():
        return None
    if os.stat(dist.locate_file(records[0])).st_mtime < _newest_source_mtime():
        return None
    return dist


def test_requirements(dist: importlib.metadata.Distribution) -> list[str]:
    """The requirements of the installed distribution's ``test`` extra (markers evaluated here)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": "test"}) and not req.marker.evaluate({"extra": ""}):
            req.marker = None
            out.append(str(req))
    return out


def main(argv: list[str]) -> int:
    pip = [sys.executable, "-m", "pip", "install"]
    dist = None if "--force" in argv else installed_from_here()
    if dist is None:
        cmd = pip + [f"{ROOT}[test]"]
    else:
        reqs = test_requirements(dist)
        print(f"fastadam {dist.version} is installed from {ROOT} and up to date: installing only its [test] requirements")
        cmd = pip + reqs
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
