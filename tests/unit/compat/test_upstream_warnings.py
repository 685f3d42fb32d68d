"""megatron-core's import-time warnings are dropped while the raising module imports, and nowhere else."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_megatron_imports_clean_under_W_error_and_the_same_message_still_shows_elsewhere():
    code = textwrap.dedent("""
        import warnings
        import elas_megatron
        import megatron.core
        import megatron.core.models.gpt.gpt_layer_specs
        from elas_megatron.layers.specs import get_layer_spec
        try:
            warnings.warn("Apex is not installed (raised by someone else)")
        except UserWarning:
            print("still raised")
    """)
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "still raised" and out.stderr == ""


def test_every_entry_gives_its_reason():
    from elas_megatron.compat.upstream_warnings import UPSTREAM_IMPORT_WARNINGS

    for module, entries in UPSTREAM_IMPORT_WARNINGS.items():
        assert module.startswith("megatron.core") and entries
        assert all(issubclass(cat, Warning) and msg and len(why) > 20 for cat, msg, why in entries)
