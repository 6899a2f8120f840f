"""fastadam.torch's native helper: torch's C++ API for the reads a step makes on every tensor.

A torch-mode step reads each parameter's ``.grad``, both data pointers, and bumps the
parameter's version. Through torch's Python API that costs 300-500 ns per tensor; the
helper (``torch_meta.cpp`` beside this file) does it in about 30 ns. It must be compiled
against the torch it runs with, so it is built on first use with
``torch.utils.cpp_extension`` (about 15 s, once per torch version; then loaded from the
cache in about 0.1 s). docs/design.md, "The torch helper".

``FASTADAM_TORCH_HELPER``: unset, the helper is built if it can be, else fastadam.torch
warns once and reads tensors through torch's Python API (same results, slower);
``0``: never built or used; ``1``: a failed build raises.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ._version import __version__

_SOURCE = Path(__file__).resolve().parent / "torch_meta"
_NAME = "fastadam_torch_meta"
_log = logging.getLogger("fastadam")
_cached: list[Any] = []  # [capsule or None] once decided


def cache_dir() -> Path:
    """Where the helper is kept: ``$FASTADAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastadam``
    (``~/.cache/fastadam``), in a directory per torch, Python and fastadam version and source."""
    root = os.environ.get("FASTADAM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastadam"
    digest = hashlib.sha256(b"".join((_SOURCE / f).read_bytes() for f in ("torch_meta.cpp", "torch_meta.h"))).hexdigest()[:12]
    tag = f"torch_meta-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-fastadam{__version__}-{digest}"
    return Path(root) / tag.replace("+", "_")


def build() -> Any:
    """The helper module: loaded from the cache, or built there; RuntimeError saying why not.

    Each build runs in its own temporary directory and is moved into the cache whole, so
    processes building at once neither wait on a lock (a killed build would leave one
    behind for good) nor load a half-written file."""
    from torch.utils import cpp_extension

    directory = cache_dir()
    target = directory / f"{_NAME}{cpp_extension.LIB_EXT}"
    try:
        if target.exists():
            spec = importlib.util.spec_from_file_location(_NAME, target)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {target}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        directory.mkdir(parents=True, exist_ok=True)
        env_path = os.environ.get("PATH", "")
        if shutil.which("ninja") is None:  # torch's builder runs `ninja`; pip's ninja may sit outside PATH
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + env_path
            except ImportError:
                pass
        _log.info("fastadam.torch: building its torch helper in %s (once per torch version)", directory)
        try:
            with tempfile.TemporaryDirectory(prefix="build-", dir=directory) as scratch:
                module = cpp_extension.load(
                    name=_NAME,
                    sources=[str(_SOURCE / "torch_meta.cpp")],
                    extra_include_paths=[str(_SOURCE)],
                    extra_cflags=["-O2"],
                    build_directory=scratch,
                    verbose=False,
                )
                os.replace(Path(scratch) / target.name, target)  # the loaded module stays mapped
            return module
        finally:
            os.environ["PATH"] = env_path
    except Exception as error:  # a compiler, ninja, header or file-system problem: say which
        text = str(error).strip().splitlines()
        raise RuntimeError(
            "fastadam.torch: could not build its torch helper "
            f"({type(error).__name__}: {text[-1] if text else ''}); it needs a C++ compiler and ninja "
            "(pip install ninja)"
        ) from error


def api() -> Any:
    """The helper's API capsule, or None where it is off or could not be built (warned once)."""
    if _cached:
        return _cached[0]
    setting = os.environ.get("FASTADAM_TORCH_HELPER", "")
    capsule = None
    if setting != "0":
        try:
            capsule = build().api
        except RuntimeError as error:
            if setting == "1":
                raise
            warnings.warn(
                f"{error}. Steps read each tensor through torch's Python API instead: the same results, about "
                "0.4 us more per tensor per step. Set FASTADAM_TORCH_HELPER=0 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
    _cached.append(capsule)
    return capsule
