"""Megatron-Core's C++ dataset helpers (``helpers_cpp``): present on a normal install, compiled when not.

``GPTDataset`` and ``BlendedDataset`` build their sample and blending indices with
``megatron.core.datasets.helpers_cpp``, a pybind11 extension. The megatron-core 0.16.1 wheels on PyPI ship it
prebuilt (``helpers_cpp.cpython-311-x86_64-linux-gnu.so`` for CPython 3.11 on x86-64 Linux), so a fresh
``pip install`` needs no compiler. Megatron's own fallback, ``compile_helpers()``, runs ``make`` in the package
directory, but the wheel ships no Makefile, and the package directory is often read-only -- so on a platform
without a prebuilt extension (another CPU architecture, a source install) we compile ``helpers.cpp`` ourselves:
with the C++ compiler (``$CXX`` or ``c++``) and pybind11's headers (``pip install pybind11``), into a per-user cache
directory keyed by the source's hash, under a file lock so that concurrent ranks compile once. The result is
registered as ``megatron.core.datasets.helpers_cpp`` before Megatron imports it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["ensure_helpers", "compile_helpers"]

_MODULE = "megatron.core.datasets.helpers_cpp"


def _default_build_dir() -> Path:
    root = os.environ.get("ELAS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "elas-megatron")
    return Path(root) / "megatron_helpers"


def compile_helpers(build_dir: str | os.PathLike | None = None) -> Path:
    """Compile megatron-core's ``helpers.cpp`` into ``build_dir`` (once per source hash) and return the library.

    Raises:
        RuntimeError: no compiler, no pybind11 or a failed compile; the message says what to install.
    """
    import megatron.core.datasets as mcd

    source = Path(mcd.__file__).with_name("helpers.cpp")
    if not source.is_file():
        raise RuntimeError(f"megatron-core has no {source} to compile; reinstall megatron-core (pip install "
                           "--force-reinstall --no-deps 'megatron-core==0.16.1')")
    try:
        import pybind11
    except ImportError:
        raise RuntimeError("megatron-core's C++ dataset helpers are not built for this platform and compiling "
                           "them needs pybind11: pip install pybind11 (and a C++ compiler, e.g. apt-get install g++)"
                           ) from None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("megatron-core's C++ dataset helpers need compiling but no C++ compiler was found; "
                           "install one (apt-get install g++) or set CXX")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    digest = hashlib.sha256(source.read_bytes() + sys.version.encode() + pybind11.__version__.encode()).hexdigest()
    build_dir = Path(build_dir) if build_dir is not None else _default_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    target = build_dir / f"helpers_cpp-{digest[:16]}{suffix}"
    with open(build_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent ranks: the first compiles, the others wait and reuse
        if target.is_file():
            return target
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        cmd = [compiler, "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC", "-fdiagnostics-color=never",
               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(tmp)]
        logger.info("compiling megatron-core's dataset helpers: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise RuntimeError(f"compiling {source} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    return target


def _load_extension(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_MODULE] = module


def ensure_helpers(build_dir: str | os.PathLike | None = None) -> None:
    """Make ``megatron.core.datasets.helpers`` importable, compiling the C++ part if the install lacks it."""
    try:
        importlib.import_module("megatron.core.datasets.helpers")
        return
    except ImportError as err:
        logger.warning("megatron-core's prebuilt dataset helpers are unavailable (%s); compiling them", err)
    sys.modules.pop(_MODULE, None)
    _load_extension(compile_helpers(build_dir))
    importlib.import_module("megatron.core.datasets.helpers")
