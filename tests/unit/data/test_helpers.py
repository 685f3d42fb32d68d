"""Megatron's C++ dataset helpers: importable on this install, compiled from source when an install lacks them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from elas_megatron.data.helpers import compile_helpers, ensure_helpers


def test_prebuilt_helpers_are_used():
    ensure_helpers()
    from megatron.core.datasets import helpers

    assert callable(helpers.build_sample_idx)


def test_missing_pybind11_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pybind11", None)
    with pytest.raises(RuntimeError, match="needs pybind11: pip install pybind11"):
        compile_helpers(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ELAS_TEST_COMPILE_HELPERS") != "1",
                    reason="compiles megatron's helpers.cpp (~30 s); set ELAS_TEST_COMPILE_HELPERS=1")
def test_compile_fallback_when_the_extension_is_missing(tmp_path):
    pytest.importorskip("pybind11")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["megatron.core.datasets.helpers_cpp"] = None  # as on a platform without a prebuilt wheel
        from elas_megatron.data.helpers import ensure_helpers
        ensure_helpers({str(tmp_path)!r})
        from megatron.core.datasets import helpers
        import numpy as np
        sizes = np.array([5, 7, 3], dtype=np.int32)
        idx = helpers.build_sample_idx(sizes, np.arange(3, dtype=np.int32), 4, 1, 15, True, True)
        print("OK", idx.shape, sys.modules["megatron.core.datasets.helpers_cpp"].__file__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK (4, 2)" in proc.stdout and str(tmp_path) in proc.stdout
