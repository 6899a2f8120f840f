"""fastadam.torch's native helper: torch's C++ API for the reads a step makes on every tensor.

A torch-mode step reads each parameter's ``.grad``, both data pointers, and bumps the
parameter's version. Through torch's Python API that costs 300-500 ns per tensor; the
helper (``torch_meta/torch_meta.cpp`` beside this file) does it in 40-170 ns. It must be
compiled against the torch it runs with, so it is built on first use with
``torch.utils.cpp_extension`` (about 15 s, once per torch version; then loaded from the
cache). docs/design.md, "The torch helper".

``FASTADAM_TORCH_HELPER``: unset, the helper is built if it can be, else fastadam.torch
warns once and reads tensors through torch's Python API (same results, slower);
``0``: never built or used; ``1``: a failed build raises.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ._version import __version__

_SOURCE = Path(__file__).resolve().parent / "torch_meta"
_NAME = "fastadam_torch_meta"
_SETTINGS = ("", "0", "1")
_log = logging.getLogger("fastadam")
_cached: list[Any] = []  # [capsule or None] once decided


def cache_dir() -> Path:
    """Where the helper is kept: ``$FASTADAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastadam``
    (``~/.cache/fastadam``), in a directory per torch build, Python ABI, machine, fastadam
    version and helper source."""
    root = os.environ.get("FASTADAM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastadam"
    key = hashlib.sha256()
    for part in (torch.__version__, getattr(torch.version, "git_version", ""), sysconfig.get_config_var("EXT_SUFFIX") or "",
                 platform.machine(), __version__):
        key.update(str(part).encode() + b"\0")
    for name in ("torch_meta.cpp", "torch_meta.h"):
        key.update((_SOURCE / name).read_bytes())
    return Path(root) / f"torch_meta-torch{torch.__version__.replace('+', '_')}-{key.hexdigest()[:16]}"


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> Any:
    """The helper module: loaded from the cache, or built there; RuntimeError saying why not.

    Each build runs in its own temporary directory and is moved into the cache whole, so
    processes building at once neither wait on a lock (a killed build would leave one
    behind for good) nor load a half-written file."""
    from torch.utils import cpp_extension

    step = "find its source"
    try:
        directory = cache_dir()
        target = directory / f"{_NAME}{cpp_extension.LIB_EXT}"
        if target.exists():
            try:
                return _load(target)
            except (ImportError, OSError) as error:  # damaged: build it again
                _log.warning("fastadam.torch: rebuilding its torch helper (%s could not be loaded: %s)", target, error)
        step = f"create its cache directory {directory} (set FASTADAM_CACHE_DIR to a writable one)"
        directory.mkdir(parents=True, exist_ok=True)
        step = "compile it (it needs a C++ compiler and ninja: pip install ninja)"
        env_path = os.environ.get("PATH", "")
        if shutil.which("ninja") is None:  # torch's builder runs `ninja` from PATH; pip's may sit outside it
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + env_path  # for this build only
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
                step = f"move it into {directory}"
                os.replace(Path(scratch) / target.name, target)  # the loaded module stays mapped
            return module
        finally:
            os.environ["PATH"] = env_path
    except Exception as error:
        text = str(error).strip().splitlines()
        raise RuntimeError(
            f"fastadam.torch: could not {step} for its torch helper ({type(error).__name__}: {text[-1] if text else ''})"
        ) from error


def api() -> Any:
    """The helper's API capsule, or None where it is off or could not be built (warned once)."""
    if _cached:
        return _cached[0]
    setting = os.environ.get("FASTADAM_TORCH_HELPER", "")
    if setting not in _SETTINGS:
        raise ValueError(f"FASTADAM_TORCH_HELPER={setting!r}: use 0 (off), 1 (required) or leave it unset (when it builds)")
    if setting == "0":
        _cached.append(None)
        return None
    try:
        capsule = build().api
    except RuntimeError as error:
        if setting == "1":
            raise
        _cached.append(None)  # decided before warning: a warning raised as an error must not rebuild at every step
        warnings.warn(
            f"{error}. Steps read each tensor through torch's Python API instead: the same results, about "
            "0.4 us more per tensor per step. Set FASTADAM_TORCH_HELPER=0 to silence this.",
            RuntimeWarning,
            stacklevel=6,  # api, _TorchPlanApi, _rebuild_and_step, _step_unhooked, step: the caller of step()
        )
        return None
    _cached.append(capsule)
    return capsule
