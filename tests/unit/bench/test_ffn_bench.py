# SPDX-License-Identifier: Apache-2.0
"""``elas-bench ffn`` on the CPU: shapes from the model configs or given explicitly, the 2:4 ceilings, one tiny
run end to end with the extra elas forms, and the pieces of the core under Triton's interpreter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elas_megatron.bench import ffn
from elas_megatron.cli.bench import main

REPO = Path(__file__).resolve().parents[3]


def test_shapes_come_from_the_model_configs_and_ceilings_match_the_formula():
    assert ffn.ffn_shape("1b") == (2048, 5472, 512)           # d_ff 5461 rounded to a multiple of 4 * tp
    all3, used2 = ffn.ceilings(2048, 5632, 512)
    assert all3 == pytest.approx(1.225, abs=1e-3)          # 1 / (1 - 3 r d_ff / (12 r (d + d_ff))) at d_ff 5632
    assert 1.0 < used2 < all3


def test_explicit_shapes_and_their_errors():
    assert ffn.ffn_shape("2048x5632x512") == (2048, 5632, 512)
    with pytest.raises(ValueError, match="multiple of 4"):
        ffn.ffn_shape("64x130x16")
    with pytest.raises(ValueError, match="HIDDENxDFFxRANK"):
        ffn.ffn_shape("9b")


def test_tiny_run_writes_every_variant_and_agrees_with_the_reference(tmp_path):
    assert main(["ffn", "--sizes", "60m", "--tokens", "32", "--reps", "1", "--warmup", "0",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ffn.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(ffn.VARIANTS)
    elas = rows[-1]
    assert elas["rel_diff_vs_reference"] == 0.0                         # on the CPU auto is the reference
    assert elas["saved_bytes"] < rows[2]["saved_bytes"]                 # s instead of relu(y1) and relu(y1)^2
    assert all(r["peak_bytes"] is None for r in rows)                   # peak memory is measured on CUDA only
    assert "ceiling" in (tmp_path / "ffn.md").read_text()


def test_compare_adds_elas_rows_with_their_own_ratios(tmp_path):
    assert main(["ffn", "--sizes", "64x128x16", "--tokens", "32", "--reps", "1", "--warmup", "0",
                 "--compare", "reference,outside", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ffn.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [*ffn.VARIANTS, ffn.COMPARE["reference"], ffn.COMPARE["outside"]]
    base = rows[2]
    for row in rows[3:]:
        assert row["rel_diff_vs_reference"] == 0.0                      # the same math on the CPU
        assert row["vs_elas_dense"] == pytest.approx(base["fwd_bwd_ms"] / row["fwd_bwd_ms"])
        assert row["saved_bytes"] < base["saved_bytes"]
    assert rows[0]["size"] == "64x128x16" and rows[0]["ffn_hidden"] == 128
    assert (tmp_path / "ffn.md").read_text().count("| elas, ") == 2


@pytest.mark.parametrize("argv, message", [
    (["--compare", "nope"], "--compare 'nope' is unknown"),
    (["--compare", "dense-grad-h"], "needs CUDA"),
    (["--pieces", "fused,nope"], "--pieces 'fused,nope'"),
    (["--sizes", "9b"], "no model config"),
])
def test_bad_arguments_are_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["ffn", "--tokens", "32", *argv])


def ffn_pieces_module():
    pytest.importorskip("triton")
    from elas_megatron.bench import ffn_pieces

    return ffn_pieces


def test_fused_bytes_counts_the_compressed_s_as_nine_sixteenths():
    b = ffn_pieces_module().fused_bytes(64, 32)
    dense = 64 * 32 * 2
    assert b["compress"] == dense + dense * 9 // 16
    assert b["masked grad (in place) + dense s"] == 3 * dense + dense * 9 // 16


def test_pieces_run_under_the_triton_interpreter(tmp_path):
    """Every default section runs on the CPU (Triton's interpreter); the GPU-only rows are left out there."""
    pieces = ffn_pieces_module()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "elas_megatron.cli.bench", "ffn", "--sizes", "64x128x16",
                           "--tokens", "32", "--reps", "1", "--warmup", "0", "--dtype", "bfloat16",
                           "--pieces", "all", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "ffn.json").read_text())
    sections = result["pieces"]
    assert list(sections) == list(pieces.DEFAULT_PIECES)
    assert all("error" not in sec and sec["rows"] for sec in sections.values())
    fused = {row[2]: row for row in sections["fused"]["rows"]}
    nbytes = pieces.fused_bytes(32, 128)["compress"]
    copy = sections["ceilings"]["copy_TBps"]
    assert fused["decompress"][4] == pytest.approx(nbytes / (copy * 1e12) * 1e3)   # bound = bytes / bandwidth
    assert [row[2] for row in sections["core"]["rows"]] == ["dense relu(y1)**2 @ W (torch)", "reference (torch, 2:4)"]
    md = (tmp_path / "ffn.md").read_text()
    assert "### GEMMs of the core (ms)" in md and "back to back" in md
