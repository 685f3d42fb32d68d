# SPDX-License-Identifier: Apache-2.0
"""``elas-bench ffn`` on the CPU: shapes from the model configs, the 2:4 ceilings, one tiny run end to end."""
from __future__ import annotations

import json

import pytest

from elas_megatron.bench import ffn
from elas_megatron.cli.bench import main


def test_shapes_come_from_the_model_configs_and_ceilings_match_the_issue():
    assert ffn.ffn_shape("1b") == (2048, 5472, 512)           # d_ff 5461 rounded to a multiple of 4 * tp
    all3, used2 = ffn.ceilings(2048, 5632, 512)
    assert all3 == pytest.approx(1.225, abs=1e-3)          # issue 4's "~1.22x" at its 1B shapes (d_ff 5632)
    assert 1.0 < used2 < all3


def test_tiny_run_writes_every_variant_and_agrees_with_the_reference(tmp_path):
    assert main(["ffn", "--sizes", "60m", "--tokens", "32", "--reps", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ffn.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(ffn.VARIANTS)
    elas = rows[-1]
    assert elas["rel_diff_vs_reference"] == 0.0                         # on the CPU auto is the reference
    assert elas["saved_bytes"] < rows[2]["saved_bytes"]                 # s instead of relu(y1) and relu(y1)^2
    assert "ceiling" in (tmp_path / "ffn.md").read_text()


def test_bad_size_is_one_line():
    with pytest.raises(SystemExit, match="no model config"):
        main(["ffn", "--sizes", "9b"])
